-- relayq schema version 1. `{s}` is replaced by the quoted schema name,
-- `{lit}` by the schema name as a string literal.

CREATE TABLE {s}.jobs (
    id           bigint      GENERATED ALWAYS AS IDENTITY (SEQUENCE NAME {s}.jobs_id_seq) PRIMARY KEY,
    queue        text        NOT NULL,
    kind         text        NOT NULL,
    payload      jsonb       NOT NULL,
    priority     smallint    NOT NULL DEFAULT 0,
    status       text        NOT NULL DEFAULT 'pending',
    attempts     integer     NOT NULL DEFAULT 0,
    max_attempts integer     NOT NULL,
    lease_token  bigint      NOT NULL DEFAULT 0,
    run_at       timestamptz NOT NULL,
    locked_until timestamptz,
    unique_key   text,
    last_error   text,
    result       jsonb,
    created_at   timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL,
    CONSTRAINT jobs_status_check
        CHECK (status IN ('pending', 'processing', 'done', 'dead', 'cancelled')),
    CONSTRAINT jobs_attempts_check CHECK (attempts >= 0 AND max_attempts >= 1),
    CONSTRAINT jobs_lease_check CHECK ((status = 'processing') = (locked_until IS NOT NULL))
);

-- Claiming: walks active jobs of a queue in pull order. Partial, so it
-- holds only pending and processing rows: finished rows never slow a claim.
CREATE INDEX jobs_claim_idx ON {s}.jobs (queue, priority, run_at, id)
    WHERE status IN ('pending', 'processing');

-- Expired leases on their last attempt, found by lease end. Only
-- processing rows, i.e. about as many as there are busy workers.
CREATE INDEX jobs_leased_idx ON {s}.jobs (queue, locked_until)
    WHERE status = 'processing';

-- Deduplication: one active job per (queue, unique_key).
CREATE UNIQUE INDEX jobs_unique_key_idx ON {s}.jobs (queue, unique_key)
    WHERE unique_key IS NOT NULL AND status IN ('pending', 'processing');

-- Cleaning finished jobs by age.
CREATE INDEX jobs_finished_idx ON {s}.jobs (status, updated_at)
    WHERE status IN ('done', 'dead', 'cancelled');

-- The LISTEN/NOTIFY channel of a queue. Queue names may be long and hold
-- any character, channel names may not: hash them, with the schema, so
-- two relayq schemas in one database never wake each other. Built-ins are
-- schema-qualified so no search_path can shadow them.
CREATE FUNCTION {s}.notify_channel(queue text) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$ SELECT 'relayq_' || pg_catalog.md5({lit} || '.' || queue) $$;

-- Every INSERT statement notifies each queue it added jobs to, once, with
-- the queue name as payload. NOTIFY is transactional: delivered on commit,
-- dropped on rollback, and PostgreSQL folds identical notifications of
-- one transaction into one.
CREATE FUNCTION {s}.notify_pushed() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_catalog.pg_notify({s}.notify_channel(q.queue), q.queue)
        FROM (SELECT DISTINCT queue FROM pushed) AS q;
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_notify_pushed
    AFTER INSERT ON {s}.jobs
    REFERENCING NEW TABLE AS pushed
    FOR EACH STATEMENT EXECUTE FUNCTION {s}.notify_pushed();
