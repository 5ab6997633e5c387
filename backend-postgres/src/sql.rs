//! The statements, built once per backend for its schema.
//!
//! Every value is a bind parameter. `$1` is always `now`: the injected
//! clock's time, or NULL to use the server's `statement_timestamp()` (one
//! instant for the whole statement, so `created_at = updated_at`).

use sqlx::{AssertSqlSafe, SqlSafeStr, SqlStr};

/// `now` in every statement.
const NOW: &str = "COALESCE($1::timestamptz, statement_timestamp())";

/// The columns of a job, named and ordered as [`JOB_COLUMN_NAMES`] says:
/// [`crate::row::job`] reads them by position.
/// `payload` and `result` come as text, which `row::job` parses (telling
/// JSON it cannot read from a column that does not decode), and which is
/// the same result type whether they are `json` (schema version 4) or
/// `jsonb` (before): a process started with `PgOptions::migrate(false)`
/// before that migration would otherwise fail every read on connections
/// that had prepared it (PostgreSQL will not run a prepared statement
/// whose result types changed: "cached plan must not change result type").
/// For `json`, the text is what is stored.
pub(crate) const JOB_COLUMNS: &str = "id, queue, kind, payload::text AS payload, priority, \
     status, attempts, max_attempts, lease_token, run_at, locked_until, unique_key, last_error, \
     result::text AS result, created_at, updated_at";

/// The names [`JOB_COLUMNS`] gives its columns, in its order: rows are read
/// by position (see [`crate::row::job`]), as a lookup by name hashes the
/// name, once per column of every row.
pub(crate) const JOB_COLUMN_NAMES: [&str; 16] = [
    "id",
    "queue",
    "kind",
    "payload",
    "priority",
    "status",
    "attempts",
    "max_attempts",
    "lease_token",
    "run_at",
    "locked_until",
    "unique_key",
    "last_error",
    "result",
    "created_at",
    "updated_at",
];

/// The statements of one schema.
#[derive(Debug)]
pub(crate) struct Statements {
    pub(crate) push: SqlStr,
    pub(crate) push_one: SqlStr,
    pub(crate) push_one_notifying: SqlStr,
    pub(crate) await_flush: SqlStr,
    pub(crate) push_one_keyed: SqlStr,
    pub(crate) push_keyless: SqlStr,
    pub(crate) push_uniform: SqlStr,
    pub(crate) find_key_holder: SqlStr,
    pub(crate) pull_one_queue: SqlStr,
    pub(crate) pull_many_queues: SqlStr,
    pub(crate) complete: SqlStr,
    pub(crate) complete_batch: SqlStr,
    pub(crate) retry: SqlStr,
    pub(crate) kill: SqlStr,
    pub(crate) kill_unreadable_payload: SqlStr,
    pub(crate) kill_unreadable_result: SqlStr,
    pub(crate) extend: SqlStr,
    pub(crate) extend_batch: SqlStr,
    pub(crate) release: SqlStr,
    pub(crate) get: SqlStr,
    pub(crate) stats: SqlStr,
    pub(crate) clean: SqlStr,
    pub(crate) channels: SqlStr,
    pub(crate) notify: SqlStr,
    pub(crate) notify_async: SqlStr,
    pub(crate) vacuum: SqlStr,
}

fn build(template: &str, quoted_schema: &str) -> SqlStr {
    AssertSqlSafe(
        template
            .replace("{now}", NOW)
            .replace("{cols}", JOB_COLUMNS)
            .replace("{s}", quoted_schema),
    )
    .into_sql_str()
}

/// Pushes a batch in one statement. Ids are drawn from the sequence in
/// input order before inserting, so each input row knows its id whether or
/// not it is inserted; `ON CONFLICT … DO NOTHING` on the partial unique
/// index skips rows whose key is held by an active job (or by an earlier
/// row of the batch). For a skipped row, `holder` is the active job that
/// held the key when the statement began, if any.
///
/// Rows are inserted in key order (then input order, so that of a key
/// named twice the first wins), not in input order: an insert waits on an
/// uncommitted holder of its key while holding the keys it inserted
/// before, so two batches naming shared keys in different orders could
/// each wait on the other (a deadlock, one aborted after a second). In one
/// order, the one that waits holds no key the other needs.
const PUSH: &str = r#"
WITH input AS (
    SELECT *
    FROM unnest($2::text[], $3::text[], $4::json[], $5::int2[], $6::int4[],
                $7::timestamptz[], $8::int8[], $9::text[])
         WITH ORDINALITY AS t(queue, kind, payload, priority, max_attempts, run_at,
                              delay_us, unique_key, ord)
), numbered AS MATERIALIZED (
    SELECT input.*, nextval('{s}.jobs_id_seq') AS id FROM input
), inserted AS (
    INSERT INTO {s}.jobs (id, queue, kind, payload, priority, status, attempts, max_attempts,
                          lease_token, run_at, unique_key, created_at, updated_at)
    OVERRIDING SYSTEM VALUE
    SELECT id, queue, kind, payload, priority, 'pending', 0, max_attempts, 0,
           COALESCE(run_at, {now} + delay_us * interval '1 microsecond'),
           unique_key, {now}, {now}
    FROM numbered
    ORDER BY queue, unique_key, ord
    ON CONFLICT (queue, unique_key)
        WHERE unique_key IS NOT NULL AND status IN ('pending', 'processing')
        DO NOTHING
    RETURNING id
)
SELECT n.id, i.id IS NOT NULL AS created,
       CASE WHEN i.id IS NULL AND n.unique_key IS NOT NULL THEN (
           SELECT j.id FROM {s}.jobs j
           WHERE j.queue = n.queue AND j.unique_key = n.unique_key
             AND j.status IN ('pending', 'processing')
       ) END AS holder
FROM numbered n LEFT JOIN inserted i ON i.id = n.id
ORDER BY n.ord
"#;

/// The single-row `INSERT` of one job without a unique key, the cheapest
/// statement PostgreSQL has for it (no arrays to unpack, no speculative
/// insertion, nothing to join). `$2`–`$8`: queue, kind, payload,
/// priority, max_attempts, run_at (or NULL), delay in µs.
macro_rules! insert_one {
    () => {
        r#"
INSERT INTO {s}.jobs (queue, kind, payload, priority, status, attempts, max_attempts,
                      lease_token, run_at, created_at, updated_at)
VALUES ($2, $3, $4, $5, 'pending', 0, $6, 0,
        COALESCE($7, {now} + $8 * interval '1 microsecond'), {now}, {now})
"#
    };
}

/// Pushes one job without a unique key: [`insert_one!`], returning its id.
const PUSH_ONE: &str = concat!(insert_one!(), "RETURNING id");

/// [`PUSH_ONE`] with its queue's notification, committed without waiting
/// for the WAL flush, so the notification leaves at once and the commit
/// holds the database-wide notify lock only briefly. Not yet durable when
/// it returns: the caller waits for the flush with [`AWAIT_FLUSH`] before
/// it reports the push (see [`crate::fold`]).
const PUSH_ONE_NOTIFYING: &str = concat!(
    "WITH job AS (",
    insert_one!(),
    "RETURNING id, queue) ",
    "SELECT job.id FROM job, ",
    "pg_catalog.set_config('synchronous_commit', 'off', true), ",
    "pg_catalog.pg_notify({s}.notify_channel(job.queue), job.queue)"
);

/// Returns once the WAL is flushed (as the session's `synchronous_commit`
/// asks) through everything committed before it, on any connection: a
/// transaction that writes one WAL record besides its commit (a
/// transactional logical decoding message with prefix `relayq` and no
/// content), and commits. (A transaction that writes no WAL commits
/// without a flush.) Logical decoding clients that ask for messages see
/// one per such call.
const AWAIT_FLUSH: &str =
    "SELECT pg_catalog.pg_logical_emit_message(true, 'relayq'::text, ''::text)";

/// Whether the session's role may run [`AWAIT_FLUSH`] (PUBLIC may, unless
/// an administrator revoked it); false where the function does not exist.
/// PostgreSQL 17 added a fourth argument with a default (`flush`).
pub(crate) const CAN_AWAIT_FLUSH: &str = "SELECT coalesce(bool_or(\
     pg_catalog.has_function_privilege(f, 'EXECUTE')), false) FROM unnest(ARRAY[\
     pg_catalog.to_regprocedure('pg_catalog.pg_logical_emit_message(boolean,text,text)'), \
     pg_catalog.to_regprocedure('pg_catalog.pg_logical_emit_message(boolean,text,text,boolean)')\
     ]) AS f";

/// [`PUSH_ONE`] for a job with a unique key (`$9`): inserts nothing and
/// returns no row when an active job of the queue holds the key (the
/// caller then looks the holder up with [`FIND_KEY_HOLDER`]).
const PUSH_ONE_KEYED: &str = r#"
INSERT INTO {s}.jobs (queue, kind, payload, priority, status, attempts, max_attempts,
                      lease_token, run_at, unique_key, created_at, updated_at)
VALUES ($2, $3, $4, $5, 'pending', 0, $6, 0,
        COALESCE($7, {now} + $8 * interval '1 microsecond'), $9, {now}, {now})
ON CONFLICT (queue, unique_key)
    WHERE unique_key IS NOT NULL AND status IN ('pending', 'processing')
    DO NOTHING
RETURNING id
"#;

/// Pushes a batch in which no job has a unique key: nothing can conflict,
/// so a plain `INSERT … SELECT FROM unnest(…)`, without [`PUSH`]'s
/// speculative insertion, materialized CTE and join. The identity default
/// (`nextval`) is evaluated above the `SELECT`, row by row in its order,
/// which `ORDER BY ord` makes input order (free: the planner knows
/// `WITH ORDINALITY` output is already in that order, and adds no sort).
/// Each `nextval` is larger than the last, so the ids sorted ascending are
/// the input's ids in order; the caller sorts them rather than rely on the
/// order of `RETURNING`. They come back as one array in one row: a row per
/// job cost the client more to receive than the rest of the push (a fifth
/// of its CPU time in a profile of 1,000-job batches).
const PUSH_KEYLESS: &str = r#"
WITH inserted AS (
INSERT INTO {s}.jobs (queue, kind, payload, priority, status, attempts, max_attempts,
                      lease_token, run_at, created_at, updated_at)
SELECT queue, kind, payload, priority, 'pending', 0, max_attempts, 0,
       COALESCE(run_at, {now} + delay_us * interval '1 microsecond'), {now}, {now}
FROM unnest($2::text[], $3::text[], $4::json[], $5::int2[], $6::int4[],
            $7::timestamptz[], $8::int8[])
     WITH ORDINALITY AS t(queue, kind, payload, priority, max_attempts, run_at, delay_us, ord)
ORDER BY ord
RETURNING id
)
SELECT array_agg(id) FROM inserted
"#;

/// [`PUSH_KEYLESS`] for the usual batch, whose jobs share everything but
/// their payloads (one kind for one queue, scheduled alike): those fields
/// are bound once, `$2`, `$3` and `$5`–`$8`, and only the payloads (`$4`)
/// are unpacked. One array instead of seven: measured with pgbench, 1,000
/// rows per statement, about a tenth more rows per second.
const PUSH_UNIFORM: &str = r#"
WITH inserted AS (
INSERT INTO {s}.jobs (queue, kind, payload, priority, status, attempts, max_attempts,
                      lease_token, run_at, created_at, updated_at)
SELECT $2::text, $3::text, payload, $5::int2, 'pending', 0, $6::int4, 0,
       COALESCE($7::timestamptz, {now} + $8::int8 * interval '1 microsecond'), {now}, {now}
FROM unnest($4::json[]) WITH ORDINALITY AS t(payload, ord)
ORDER BY ord
RETURNING id
)
SELECT array_agg(id) FROM inserted
"#;

/// The job holding a key, for a single push that found it held, and for
/// the rare batch push that conflicted with a job committed after its
/// statement's snapshot was taken: the active job with the key, through
/// the unique index, or else (its holder finished since the push gave up)
/// the newest job with the key, read only then. One query over all jobs
/// with the key could use no index (the unique index holds active jobs
/// only) and read the whole table for each duplicate push: 190 ms beside
/// a million finished jobs.
const FIND_KEY_HOLDER: &str = r#"
(SELECT id FROM {s}.jobs
 WHERE queue = $1 AND unique_key = $2 AND status IN ('pending', 'processing'))
UNION ALL
(SELECT id FROM {s}.jobs
 WHERE queue = $1 AND unique_key = $2
 ORDER BY id DESC
 LIMIT 1)
LIMIT 1
"#;

/// Claims in one statement. First, expired leases on their last attempt in
/// the named queues become `dead` (all of them, whatever the batch size).
/// Then up to `$3` eligible jobs are chosen in pull order from two
/// candidate lists, each locked with `FOR UPDATE SKIP LOCKED` so concurrent
/// pullers pass each other by: `claimable`, the first `$3` due `pending`
/// jobs from the pending-only claim index, and `reclaimable`, the first
/// `$3` expired leases with attempts left, from the lease index (two CTEs:
/// PostgreSQL allows no `FOR UPDATE` in a `UNION`). The `UPDATE …
/// RETURNING` leases them. The killed and chosen sets are disjoint, so one
/// statement may update both. Candidates locked but not chosen stay
/// pending and are unlocked at commit; meanwhile a concurrent puller passed
/// them by, and may have come back short, taking its queues for drained.
/// So each row also says whether any were (`passed_over`), and the caller
/// then wakes the queues' workers. Not counted: a row that changed between
/// the claim's snapshot and its lock (an expired lease released meanwhile)
/// fails the lock's re-check but stays locked; and a claim that fails
/// wakes no one. A puller that passed such rows by waits for the next push
/// or poll. The leased rows come back in no
/// order (the caller sorts them): a sort here would sort whole rows,
/// payloads included, which for large payloads can spill past
/// `work_mem`.
///
/// `{queue}` is `queue = $2` for one queue or `queue = ANY($2)` for
/// several; `{levels}`, `{claimable}` and `{claimable_locked}` are a
/// [`Claimable`]'s.
const PULL: &str = r#"
WITH RECURSIVE {levels}expired_last AS (
    SELECT id FROM {s}.jobs
    WHERE {queue} AND status = 'processing'
      AND locked_until < {now} AND attempts >= max_attempts
    FOR UPDATE SKIP LOCKED
), killed AS (
    UPDATE {s}.jobs j
    SET status = 'dead', last_error = $4, locked_until = NULL, updated_at = {now}
    FROM expired_last e
    WHERE j.id = e.id
    RETURNING j.id
), claimable AS ({claimable}
), reclaimable AS (
    SELECT id, priority, run_at FROM {s}.jobs
    WHERE {queue} AND status = 'processing' AND locked_until < {now}
      AND attempts < max_attempts
    ORDER BY priority, run_at, id
    LIMIT $3
    FOR UPDATE SKIP LOCKED
), chosen AS (
    SELECT id FROM (
        SELECT id, priority, run_at FROM claimable
        UNION ALL
        SELECT id, priority, run_at FROM reclaimable
    ) AS candidates
    ORDER BY priority, run_at, id
    LIMIT $3
), claimed AS (
    UPDATE {s}.jobs j
    SET status = 'processing', attempts = j.attempts + 1, lease_token = j.lease_token + 1,
        locked_until = {now} + $5 * interval '1 microsecond', updated_at = {now}
    FROM chosen c
    WHERE j.id = c.id
    RETURNING j.*
)
SELECT {cols},
       {claimable_locked} + (SELECT count(*) FROM reclaimable) > (SELECT count(*) FROM chosen)
           AS passed_over
FROM claimed
"#;

/// The due jobs of one queue, in pull order, one priority level at a time.
/// `levels` walks the queue's distinct priorities up from the lowest, one
/// index probe each, and only as far as the claim reads; at each level the
/// due jobs are an index range, `run_at <= now`, read in `(run_at, id)`
/// order. A plain scan of the claim index in `(priority, run_at, id)` order
/// could only filter on `run_at`: it read every scheduled job of a level
/// (a backlog of retries in backoff, or of jobs delayed until tomorrow)
/// before it reached the next level, and all of them whenever fewer jobs
/// were due than the batch asked for. With 200,000 jobs scheduled for the
/// next day and one due, that was 1,210 buffers and 16 ms per claim.
const CLAIMABLE_ONE_QUEUE: Claimable = Claimable {
    levels: r#"levels AS (
    (SELECT priority FROM {s}.jobs
     WHERE queue = $2::text AND status = 'pending'
     ORDER BY priority LIMIT 1)
    UNION ALL
    SELECT (SELECT j.priority FROM {s}.jobs j
            WHERE j.queue = $2::text AND j.status = 'pending' AND j.priority > l.priority
            ORDER BY j.priority LIMIT 1)
    FROM levels l
    WHERE l.priority IS NOT NULL
), "#,
    due: r#"
    SELECT due.id, due.priority, due.run_at
    FROM levels l
    CROSS JOIN LATERAL (
        SELECT id, priority, run_at FROM {s}.jobs
        WHERE queue = $2::text AND status = 'pending' AND priority = l.priority
          AND run_at <= {now}
        ORDER BY run_at, id
        LIMIT $3
        FOR UPDATE SKIP LOCKED
    ) AS due
    LIMIT $3"#,
    // Each level's rows are locked as the outer LIMIT reads them.
    locked: "(SELECT count(*) FROM claimable)",
};

/// The due jobs of several queues, in pull order. `levels` walks the
/// priorities of all the queues together, one index probe per queue and
/// level, only as far as the claim reads; at each level every queue's due
/// jobs are read as an index range in `(run_at, id)` order, locked, and
/// merged. A level's merge needs all it reads, so it locks up to `$3` jobs
/// of each queue to keep `$3` (those not kept are unlocked at commit, a
/// concurrent puller passes them by meanwhile, and the claim then wakes
/// the queues' workers, see [`PULL`]): at worst queues × batch
/// row locks at a level, each a heap write (18 queues with deep backlogs
/// and a batch of 1,024: 18,432). Counting first without
/// locks and then locking only the counted jobs locked less, but a puller
/// racing another found the counted jobs taken and could not go past them
/// to the next level or queue: it came back empty with jobs due. Before
/// that, one scan read every pending job of the queues and sorted them
/// all: 123 ms per claim over two queues holding 200,000 due jobs. `$2`
/// names each queue once: a queue named twice would be read twice.
const CLAIMABLE_MANY_QUEUES: Claimable = Claimable {
    levels: r#"levels AS (
    (SELECT min(f.priority) AS priority
     FROM unnest($2::text[]) AS q(queue)
     CROSS JOIN LATERAL (
         SELECT priority FROM {s}.jobs
         WHERE queue = q.queue AND status = 'pending'
         ORDER BY priority LIMIT 1) AS f)
    UNION ALL
    SELECT (SELECT min(f.priority)
            FROM unnest($2::text[]) AS q(queue)
            CROSS JOIN LATERAL (
                SELECT j.priority FROM {s}.jobs j
                WHERE j.queue = q.queue AND j.status = 'pending' AND j.priority > l.priority
                ORDER BY j.priority LIMIT 1) AS f)
    FROM levels l
    WHERE l.priority IS NOT NULL
), "#,
    due: r#"
    SELECT due.id, due.priority, due.run_at, due.locked
    FROM levels l
    CROSS JOIN LATERAL (
        SELECT d.id, d.priority, d.run_at, count(*) OVER () AS locked
        FROM unnest($2::text[]) AS q(queue)
        CROSS JOIN LATERAL (
            SELECT id, priority, run_at FROM {s}.jobs
            WHERE queue = q.queue AND status = 'pending' AND priority = l.priority
              AND run_at <= {now}
            ORDER BY run_at, id
            LIMIT $3
            FOR UPDATE SKIP LOCKED
        ) AS d
        ORDER BY d.run_at, d.id
        LIMIT $3
    ) AS due
    LIMIT $3"#,
    // A level's merge locked all it read, whatever the outer LIMIT took
    // (which took at least one row of each level it reached).
    locked: "(SELECT coalesce(sum(locked), 0) FROM (SELECT DISTINCT priority, locked FROM claimable) AS l)",
};

/// How [`PULL`] chooses the due jobs of its queues.
struct Claimable {
    /// A CTE, `levels`, of the queues' priority levels, followed by `, `.
    levels: &'static str,
    /// `claimable`: the due jobs, locked, in pull order, `$3` at most,
    /// starting with columns `id, priority, run_at`.
    due: &'static str,
    /// How many jobs `claimable` locked, kept or not.
    locked: &'static str,
}

/// [`PULL`] for one queue or several.
fn pull(queue: &str, claimable: Claimable) -> String {
    PULL.replace("{levels}", claimable.levels)
        .replace("{claimable_locked}", claimable.locked)
        .replace("{claimable}", claimable.due)
        .replace("{queue}", queue)
}

/// Every acknowledgement matches id, fencing token and a held lease, and
/// returns the row it changed; none means the lease is lost and nothing
/// changed.
///
/// A lease is held while `locked_until` is set: the same rows as `status =
/// 'processing'` (the `jobs_lease_check` constraint), but a test the
/// planner cannot answer from the lease index, so the row is always found
/// through the primary key. With `status = 'processing'`, statistics
/// gathered while few jobs were leased (an `ANALYZE` after a bulk load, or
/// in a quiet hour) make that partial index look nearly empty, hence
/// cheaper to scan whole than one primary-key probe, and PostgreSQL read
/// every leased job for each acknowledgement: 20,000 leased, 11 ms for one
/// `complete` instead of 0.1 ms. The batch statements put the test in
/// their join (`OR i.id IS NULL`, never true as `j.id = i.id` already
/// needs `i.id`): as a filter on the table alone, the same statistics made
/// it look as if almost no row passed, and the planner scanned the whole
/// table first and then the batch once per leased job.
const COMPLETE: &str = r#"
UPDATE {s}.jobs
SET status = 'done', result = $4, locked_until = NULL, updated_at = {now}
WHERE id = $2 AND lease_token = $3 AND locked_until IS NOT NULL
RETURNING id
"#;

/// Completes a batch in one statement, each row fenced by its own token.
/// Of several entries for one job, the first whose token holds wins (as if
/// they were applied in order). Returns the input positions completed.
const COMPLETE_BATCH: &str = r#"
WITH input AS (
    SELECT * FROM unnest($2::int8[], $3::int8[], $4::json[])
        WITH ORDINALITY AS t(id, token, result, ord)
)
UPDATE {s}.jobs j
SET status = 'done', result = i.result, locked_until = NULL, updated_at = {now}
FROM input i
WHERE j.id = i.id AND j.lease_token = i.token AND (j.locked_until IS NOT NULL OR i.id IS NULL)
RETURNING i.ord
"#;

const RETRY: &str = r#"
UPDATE {s}.jobs
SET last_error = $5, locked_until = NULL, updated_at = {now},
    status = CASE WHEN attempts >= max_attempts THEN 'dead' ELSE 'pending' END,
    run_at = CASE WHEN attempts >= max_attempts THEN run_at
                  ELSE {now} + $4 * interval '1 microsecond' END
WHERE id = $2 AND lease_token = $3 AND locked_until IS NOT NULL
RETURNING status, queue
"#;

const KILL: &str = r#"
UPDATE {s}.jobs
SET status = 'dead', last_error = $4, locked_until = NULL, updated_at = {now}
WHERE id = $2 AND lease_token = $3 AND locked_until IS NOT NULL
RETURNING id
"#;

/// [`KILL`] for a job whose stored JSON in `{column}` does not read back:
/// that column becomes `$5`, JSON that does.
const KILL_UNREADABLE: &str = r#"
UPDATE {s}.jobs
SET status = 'dead', last_error = $4, locked_until = NULL, updated_at = {now}, {column} = $5
WHERE id = $2 AND lease_token = $3 AND locked_until IS NOT NULL
RETURNING id
"#;

const EXTEND: &str = r#"
UPDATE {s}.jobs
SET locked_until = {now} + $4 * interval '1 microsecond', updated_at = {now}
WHERE id = $2 AND lease_token = $3 AND locked_until IS NOT NULL
RETURNING locked_until
"#;

/// [`EXTEND`] for many leases: `$2` ids and `$3` tokens, side by side.
/// Returns the (id, token) of each lease still held, with its new end; a
/// lease named twice matches its row once.
///
/// A worker's keeper may renew leases whose completions its lanes are
/// recording at the same moment, so this and [`COMPLETE_BATCH`] can name
/// the same rows in one instant. Both are sent sorted by id, and planned as
/// a nested loop over the primary key in input order they lock shared rows
/// in the same order. The planner may choose another plan (a hash join
/// over a small table, say), which locks rows in another order: should
/// the two then deadlock, PostgreSQL aborts one after `deadlock_timeout`
/// (`40P01`, transient), and the worker makes that write again.
const EXTEND_BATCH: &str = r#"
UPDATE {s}.jobs j
SET locked_until = {now} + $4 * interval '1 microsecond', updated_at = {now}
FROM unnest($2::int8[], $3::int8[]) AS i(id, token)
WHERE j.id = i.id AND j.lease_token = i.token AND (j.locked_until IS NOT NULL OR i.id IS NULL)
RETURNING j.id, j.lease_token, j.locked_until
"#;

/// Releases a lease and notifies its queue in the same transaction, so the
/// notification leaves with the commit: releases come from workers
/// shutting down, whose process may exit as soon as they return, before a
/// notification sent in the background would have left. The commit does
/// not wait for a WAL flush (a notifying commit holds a database-wide lock
/// until it is done, and a shutdown releases many jobs at once): a release
/// lost to a crash right after leaves the job leased until its lease ends,
/// as if it had never been released.
const RELEASE: &str = r#"
WITH released AS (
    UPDATE {s}.jobs
    SET status = 'pending', attempts = attempts - 1, locked_until = NULL, updated_at = {now}
    WHERE id = $2 AND lease_token = $3 AND locked_until IS NOT NULL
    RETURNING queue
)
SELECT r.queue
FROM released r,
     pg_catalog.set_config('synchronous_commit', 'off', true),
     pg_catalog.pg_notify({s}.notify_channel(r.queue), r.queue)
"#;

const GET: &str = "SELECT {cols} FROM {s}.jobs WHERE id = $1";

const STATS: &str = "SELECT queue, status, count(*) AS n FROM {s}.jobs GROUP BY queue, status";

/// One chunk of a clean: at most `$3` of the jobs to delete, passing over
/// those a concurrent clean is deleting. The ids are gathered into an
/// array first, so each is deleted through the primary key: as `id IN
/// (subquery)`, the planner chose a hash join over a scan of the whole
/// table, for every chunk (377 ms per chunk on 2.15 million rows; 15 ms
/// this way on 400,000).
///
/// `$2` is null to delete every job of the status (a cutoff past the
/// years relayq stamps: rows another program stamped `infinity` go too).
///
/// Sent unprepared, so that each chunk is planned with its values (and the
/// test of a null `$2` folded away): as a
/// prepared statement, PostgreSQL switched to a generic plan after five
/// chunks, and with the status unknown that plan cannot use the partial
/// index on finished jobs: a scan of the whole table per chunk (beside a
/// million finished jobs, 851,000 rows read to delete 10,000, and 940,000
/// to find 38 dead ones).
const CLEAN: &str = r#"
DELETE FROM {s}.jobs WHERE id = ANY(ARRAY(
    SELECT id FROM {s}.jobs
    WHERE status = $1 AND ($2::timestamptz IS NULL OR updated_at < $2)
    LIMIT $3
    FOR UPDATE SKIP LOCKED
))
"#;

/// Notifies the channel of each queue in `$1`, with the queue as payload.
/// PostgreSQL folds identical notifications of one transaction into one.
const NOTIFY: &str = "SELECT pg_catalog.pg_notify({s}.notify_channel(q), q) \
     FROM unnest($1::text[]) AS q";

/// [`NOTIFY`] in its own transaction, committed without waiting for a WAL
/// flush (`set_config(…, true)` lasts until that commit): a notification is
/// not durable data, and the commit of a notifying transaction holds a
/// database-wide lock until it is done.
const NOTIFY_ASYNC: &str = "SELECT pg_catalog.set_config('synchronous_commit', 'off', true), \
     pg_catalog.pg_notify({s}.notify_channel(q), q) FROM unnest($1::text[]) AS q";

/// Vacuums the jobs table unless another VACUUM (of another backend, or
/// autovacuum) holds it: see [`crate::vacuum`].
const VACUUM: &str = "VACUUM (SKIP_LOCKED) {s}.jobs";

/// The LISTEN channels of some queues.
const CHANNELS: &str =
    "SELECT q AS queue, {s}.notify_channel(q) AS channel FROM unnest($1::text[]) AS q";

impl Statements {
    /// The statements for `schema` (already validated).
    pub(crate) fn new(schema: &str) -> Self {
        let s = format!("\"{schema}\"");
        Self {
            push: build(PUSH, &s),
            push_one: build(PUSH_ONE, &s),
            push_one_notifying: build(PUSH_ONE_NOTIFYING, &s),
            await_flush: build(AWAIT_FLUSH, &s),
            push_one_keyed: build(PUSH_ONE_KEYED, &s),
            push_keyless: build(PUSH_KEYLESS, &s),
            push_uniform: build(PUSH_UNIFORM, &s),
            find_key_holder: build(FIND_KEY_HOLDER, &s),
            pull_one_queue: build(&pull("queue = $2::text", CLAIMABLE_ONE_QUEUE), &s),
            pull_many_queues: build(&pull("queue = ANY($2::text[])", CLAIMABLE_MANY_QUEUES), &s),
            complete: build(COMPLETE, &s),
            complete_batch: build(COMPLETE_BATCH, &s),
            retry: build(RETRY, &s),
            kill: build(KILL, &s),
            kill_unreadable_payload: build(&KILL_UNREADABLE.replace("{column}", "payload"), &s),
            kill_unreadable_result: build(&KILL_UNREADABLE.replace("{column}", "result"), &s),
            extend: build(EXTEND, &s),
            extend_batch: build(EXTEND_BATCH, &s),
            release: build(RELEASE, &s),
            get: build(GET, &s),
            stats: build(STATS, &s),
            clean: build(CLEAN, &s),
            channels: build(CHANNELS, &s),
            notify: build(NOTIFY, &s),
            notify_async: build(NOTIFY_ASYNC, &s),
            vacuum: build(VACUUM, &s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows are read by position: each column of `JOB_COLUMNS` must be
    /// named, in order, as `JOB_COLUMN_NAMES` says.
    #[test]
    fn job_columns_are_named_in_order() {
        let names: Vec<&str> = JOB_COLUMNS
            .split(',')
            .map(|column| column.split_whitespace().last().unwrap_or_default())
            .collect();
        assert_eq!(names, JOB_COLUMN_NAMES);
    }
}
