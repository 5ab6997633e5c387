-- relayq schema version 4: payload and result are `json`, kept as sent.
--
-- `jsonb` rebuilt each payload into a tree on the way in and printed it
-- back on the way out: numbers came back normalized (a float `1e17` as the
-- integer `100000000000000000`, `-0.0` as `0.0`), unlike the SQLite and
-- memory stores, and building the tree was the largest part of a batch
-- insert's server time that a plain insert does not have. `json` is
-- validated and stored as is. Cast to `jsonb` to query a payload with
-- `jsonb` operators (`payload::jsonb @> '{"user": 7}'`).
--
-- This rewrites the jobs table and its indexes under an exclusive lock:
-- on a large table, clean finished jobs first. Views, indexes or
-- constraints added on payload or result that need jsonb (its operators
-- or index classes) make it fail until dropped.
-- Restart processes of an older relayq after it: their prepared reads
-- return jsonb and fail ("cached plan must not change result type") until
-- their connections are replaced.

ALTER TABLE {s}.jobs
    ALTER COLUMN payload TYPE json USING payload::json,
    ALTER COLUMN result TYPE json USING result::json;
