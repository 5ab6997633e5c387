-- The two indexes relayq's jobs table keeps beside the baseline's (see
-- backend-postgres/src/migrations/0001_jobs.sql), for claim100_indexed:
-- each claim adds an entry to the first, each completion one to the
-- second, where the baseline's table takes none. The third, on unique
-- keys, takes no entry for a job without a key, as none here has one.
SET search_path = relayq_baseline;
CREATE INDEX jobs_leased ON jobs (queue, locked_until) WHERE status = 'processing';
CREATE INDEX jobs_finished ON jobs (status, updated_at) WHERE status IN ('done', 'dead', 'cancelled');
