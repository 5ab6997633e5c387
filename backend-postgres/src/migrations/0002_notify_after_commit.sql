-- relayq schema version 2: pushes no longer notify from a trigger.
--
-- A notifying transaction holds a database-wide lock from its commit until
-- the commit is flushed, so the per-statement trigger made concurrent
-- pushes commit one at a time (no group commit). The backend now notifies
-- after the push committed, from one task, with synchronous_commit off (or,
-- for a push inside the caller's transaction, in that transaction).
-- notify_channel() stays: it names the channels.

DROP TRIGGER jobs_notify_pushed ON {s}.jobs;
DROP FUNCTION {s}.notify_pushed();
