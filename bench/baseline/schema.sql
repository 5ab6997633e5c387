-- The raw-SQL baseline's table: the columns a job queue needs, with a
-- partial index on pending rows only (the shape of WORKLOAD.md's baseline).
DROP SCHEMA IF EXISTS relayq_baseline CASCADE;
CREATE SCHEMA relayq_baseline;
SET search_path = relayq_baseline;
CREATE TABLE jobs (
    id           bigserial PRIMARY KEY,
    queue        text        NOT NULL DEFAULT 'default',
    kind         text        NOT NULL,
    payload      jsonb       NOT NULL,
    priority     smallint    NOT NULL DEFAULT 0,
    status       text        NOT NULL DEFAULT 'pending',
    attempts     integer     NOT NULL DEFAULT 0,
    max_attempts integer     NOT NULL DEFAULT 25,
    lease_token  bigint      NOT NULL DEFAULT 0,
    run_at       timestamptz NOT NULL DEFAULT now(),
    locked_until timestamptz,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX jobs_pending ON jobs (queue, priority, run_at, id) WHERE status = 'pending';
