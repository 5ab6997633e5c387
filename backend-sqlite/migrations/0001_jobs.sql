-- relayq schema version 1: the jobs table and the indexes its hot paths use.
--
-- Timestamps are INTEGER microseconds since the Unix epoch (exact and
-- sortable); payload and result are JSON text; STRICT enforces the types.

CREATE TABLE relayq_jobs (
    id           INTEGER PRIMARY KEY AUTOINCREMENT, -- AUTOINCREMENT: ids are never reused, even after `clean`
    queue        TEXT    NOT NULL CHECK (queue <> ''),
    kind         TEXT    NOT NULL CHECK (kind <> ''),
    payload      TEXT    NOT NULL,
    priority     INTEGER NOT NULL CHECK (priority BETWEEN -32768 AND 32767),
    status       TEXT    NOT NULL CHECK (status IN ('pending', 'processing', 'done', 'dead', 'cancelled')),
    attempts     INTEGER NOT NULL CHECK (attempts >= 0),
    max_attempts INTEGER NOT NULL CHECK (max_attempts >= 1),
    lease_token  INTEGER NOT NULL CHECK (lease_token >= 0),
    run_at       INTEGER NOT NULL,
    locked_until INTEGER,
    unique_key   TEXT    CHECK (unique_key <> ''),
    last_error   TEXT,
    result       TEXT,
    created_at   INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL,
    -- A lease exists exactly while the job is processing.
    CHECK ((status = 'processing') = (locked_until IS NOT NULL))
) STRICT;

-- Claiming due jobs: one queue, in pull order.
CREATE INDEX relayq_jobs_claim ON relayq_jobs (queue, priority, run_at, id)
    WHERE status = 'pending';

-- Finding expired leases of one queue.
CREATE INDEX relayq_jobs_lease ON relayq_jobs (queue, locked_until)
    WHERE status = 'processing';

-- At most one active job per (queue, unique_key).
CREATE UNIQUE INDEX relayq_jobs_unique ON relayq_jobs (queue, unique_key)
    WHERE unique_key IS NOT NULL AND status IN ('pending', 'processing');

-- Cleaning old finished jobs.
CREATE INDEX relayq_jobs_finished ON relayq_jobs (status, updated_at)
    WHERE status IN ('done', 'dead', 'cancelled');
