//! relayq's PostgreSQL backend.
//!
//! [`PgBackend`] implements every relayq trait on PostgreSQL (12 or newer):
//!
//! - **Claims in one statement.** `pull` is one `WITH … UPDATE … RETURNING`:
//!   CTEs select eligible ids in `(priority, run_at, id)` order with `FOR
//!   UPDATE SKIP LOCKED` (see [Schema](#schema)), so
//!   concurrent pullers pass each other by instead of queueing on row
//!   locks, and never receive the same job while its lease is live. Expired leases are eligible again; an expired lease on
//!   the job's last allowed attempt turns the job `Dead` instead, in the
//!   same statement.
//! - **Fenced acknowledgements.** `complete`, `retry`, `kill`, `extend`,
//!   `release` (and `complete_batch` and `extend_batch`, one statement for
//!   many leases) match the id, status `processing` *and* the lease's
//!   fencing token; anything else is [`Error::LeaseLost`] (or reported lost
//!   by the batch forms) and changes nothing. Each finds its rows through
//!   the primary key, whatever the planner's statistics say about how many
//!   jobs are leased, so its cost does not grow with the leases held.
//! - **Batch pushes in one round trip** (`UNNEST` of arrays), with
//!   `unique_key` enforced by a partial unique index and `ON CONFLICT DO
//!   NOTHING`, so a duplicate is reported instead of failing the batch.
//! - **Group commit for single pushes.** Concurrent [`Pusher::push`]
//!   calls on the pool (jobs without a `unique_key`) that arrive while two
//!   inserts are already under way (per Tokio runtime) wait for one of
//!   them to end and are folded into one multi-row `INSERT` and one commit
//!   (at most 1,000 jobs); any other push goes out at once. Each caller
//!   still gets its own id, its own error and its queue's notification; a
//!   job the database rejects fails only its own push. Keyed pushes,
//!   [`Pusher::push_batch`] and [`PgBackend::push_in`] are their own
//!   statements, as before.
//! - **Transactional enqueue**: [`PgBackend::push_in`] and
//!   [`PgBackend::push_batch_in`] take the caller's connection or
//!   transaction, so a job is enqueued if and only if the caller's
//!   transaction commits (on a connection outside any transaction, the
//!   push makes one of its own).
//! - **LISTEN/NOTIFY wake-ups.** Every push notifies each queue it added
//!   jobs to, once it has committed: a pool push hands its queues to one
//!   background task that notifies them, folding concurrent pushes into
//!   one statement, without waiting for a WAL flush (a notifying commit
//!   holds a database-wide lock, so notifying inside each push would make
//!   concurrent pushes commit one at a time). The task sends them just
//!   after the push returns, and again after a failure. A single pool
//!   push of a job without a unique key made after a quiet spell (no
//!   other such push's insert under way, none finished in the last
//!   millisecond) notifies in its own statement
//!   instead, committed without waiting for the WAL flush, and then waits
//!   for the flush with a transaction that writes one WAL record (a
//!   logical decoding message, prefix `relayq`, which logical decoding
//!   clients that ask for messages see) before it returns: its notification
//!   leaves at its commit, and no job runs before its insert is durable,
//!   since a claim commits durably, later in the WAL (unless the claiming
//!   session set `synchronous_commit` to `off`). Should that wait fail (its
//!   connection lost, say), the push reports the failure though its job is
//!   stored and may already be running: as for any write that fails
//!   transiently, it may have taken effect (see
//!   [`Error::is_transient`](relayq_core::Error::is_transient)). A role
//!   that may not run `pg_logical_emit_message` (PUBLIC may, unless
//!   revoked; checked at connect) notifies through the task.
//!   [`PgBackend::close`] sends those still queued. The task (like the
//!   LISTEN task) runs on the Tokio runtime of the first call that needed
//!   it: a backend shared with a runtime that is only driven now and then
//!   (a `current_thread` runtime under occasional `block_on`) sends its
//!   notifications only while that runtime runs. Should that runtime stop
//!   first, workers in other processes find the jobs at their next poll,
//!   and the next call starts the task again on its own runtime. A pool
//!   push also wakes the
//!   subscribers of its own backend (and its clones) directly, before it
//!   returns, which saves them the notification's round trip (measured on
//!   a server with `synchronous_commit = off`, so that no WAL flush hides
//!   it: the enqueue-to-start p50 fell from 2.4–2.5 ms to 1.9–2.2 ms).
//!   A pool push runs on a task of its own, so one whose caller stops
//!   waiting once it was first polled (a timeout, a dropped request) still
//!   commits and notifies as if its caller had waited (a caller that then
//!   pushes its jobs again stores them twice, unless they have unique
//!   keys). So does a push queued to be folded with others, unless 2,000
//!   or more pushes are queued at once (a burst larger than two
//!   statements take, or statements that hang on a connection gone
//!   silent): those whose callers left are then forgotten, as their
//!   callers may be pushing them again.
//!   [`PgBackend::push_in`] notifies inside the caller's transaction, so only a commit wakes
//!   anyone. A retry due at once notifies its queue the same way as a
//!   pool push; a release notifies in its own statement, so a worker
//!   shutting down has woken the others by the time its release returns,
//!   even if its process exits right after. [`Backend::subscribe`] listens on one dedicated connection (an
//!   sqlx `PgListener`, not a pool connection) that reconnects when it
//!   drops, or when its server stays silent to a check made after an
//!   acquire timeout with nothing heard. That connection must reach the
//!   server directly or through a session-mode pooler. Through a
//!   transaction-mode pooler (PgBouncer's `pool_mode = transaction`) do
//!   not subscribe: each LISTEN lands on whichever server connection the
//!   pooler picks, which other clients then share, so relayq hears little
//!   or nothing (its workers find other processes' jobs only at their
//!   polls) and those clients may receive its notifications.
//! - **TLS** with the `tls-rustls` feature (the facade's
//!   `postgres-tls-rustls`), for every connection, the LISTEN connection
//!   included. The URL's `sslmode` as sqlx reads it: `prefer` (the
//!   default) and `require` encrypt without checking the certificate,
//!   `verify-ca` and `verify-full` check it against Mozilla's roots plus
//!   the CA of `sslrootcert` (unlike libpq, that CA is added to the roots
//!   rather than trusted alone, and `require` never verifies). Without the
//!   feature, `sslmode=require` fails to connect.
//! - **URLs** take the query parameters sqlx reads (`sslmode`,
//!   `sslrootcert`, `sslcert`, `sslkey`, also spelt `ssl-mode`,
//!   `ssl-root-cert` or `ssl-ca`, `ssl-cert`, `ssl-key`; `host`,
//!   `hostaddr`, `port`, `dbname`, `user`, `password`, `application_name`,
//!   `options`, `options[…]`, `statement-cache-capacity`); any other (libpq's
//!   `connect_timeout`, `target_session_attrs`, a `schema`), or a list of
//!   hosts, is [`Error::Config`]: sqlx would connect without it. The
//!   schema is [`PgOptions::schema`].
//! - **Server time.** `now` is the server's `statement_timestamp()` unless
//!   a [`Clock`] is injected with [`PgOptions::clock`]; then it is bound as
//!   a parameter, which is how the conformance suite moves time.
//! - **Vacuums its own churn.** Claims leave dead entries at the head of
//!   the claim index, where every claim reads; after
//!   [`PgOptions::vacuum_threshold`] changed rows the backend runs
//!   `VACUUM (SKIP_LOCKED)` on the jobs table in the background, instead of
//!   waiting up to a minute (or forever) for autovacuum.
//! - **Versioned migrations** applied by [`PgBackend::migrate`] (and on
//!   connect) in one transaction under an advisory lock, recorded in
//!   `<schema>.schema_version`. A migration that must lock the jobs table
//!   while a long transaction uses it waits at most a second, gives way
//!   and tries again (for about two minutes), so queue operations never
//!   queue behind its lock request for longer. Once it has the lock, they
//!   wait for the migration itself: milliseconds, but version 4 rewrites
//!   the table (see [Schema](#schema)). A migrator that hangs inside its
//!   transaction (a stopped process, a network cut) is ended by the server
//!   after 10 s idle, releasing its locks, instead of holding them until
//!   TCP keepalive notices; continued, it migrates again. A
//!   `statement_timeout` or `lock_timeout` set for the role, the database
//!   or in the URL does not apply to a migration's transaction: with a
//!   `statement_timeout`, every process of a fleet deployed at once but
//!   the migrating one failed to start (its wait for the migration lock
//!   ended), and a table rewrite longer than the timeout never finished;
//!   with a `lock_timeout`, they failed after two minutes of retries.
//!
//! ```no_run
//! use relayq_core::{NewJob, PullRequest, Puller, Pusher};
//! use relayq_postgres::PgBackend;
//! use serde_json::json;
//!
//! # async fn demo() -> relayq_core::Result<()> {
//! let queue = PgBackend::connect("postgres://app@localhost/app").await?;
//! queue.push(NewJob::new("greet", &json!({"name": "Ada"}))).await?;
//!
//! // Enqueue atomically with the caller's own writes.
//! let mut tx = queue.pool().begin().await.map_err(relayq_postgres::error_from)?;
//! // … the application's own statements on `tx` …
//! queue.push_in(&mut tx, NewJob::new("welcome", &json!({"user": 7}))).await?;
//! tx.commit().await.map_err(relayq_postgres::error_from)?;
//!
//! for leased in queue.pull(&PullRequest::queue("default").batch(10)).await? {
//!     queue.complete(&leased.lease, None).await?;
//! }
//! # Ok(())
//! # }
//! ```
//!
//! # Schema
//!
//! All objects live in one schema ([`PgOptions::schema`], default
//! `relayq`): the `jobs` table (status is `text` with a `CHECK`, the fencing
//! token a `bigint`, payload and result `json`, times `timestamptz`), the
//! `schema_version` table, and four partial indexes:
//!
//! | index | columns | rows |
//! |---|---|---|
//! | `jobs_claim_idx` | `(queue, priority, run_at, id)` | `pending` |
//! | `jobs_leased_idx` | `(queue, locked_until)` | `processing` |
//! | `jobs_unique_key_idx` (unique) | `(queue, unique_key)` | active with a key |
//! | `jobs_finished_idx` | `(status, updated_at)` | `done`, `dead`, `cancelled` |
//!
//! The claim only touches the first two, which hold active jobs alone, so
//! its cost does not grow with the number of finished jobs kept. Due jobs
//! come from the claim index, expired leases from the lease index. (Until
//! schema version 3 the claim index also held `processing` rows: every
//! claim then added an entry at the index's head, which kept index scans
//! from marking the dead entries they passed, and claims slowed down as
//! those piled up between vacuums. The plan below is from that version;
//! version 3 adds a `reclaimable` CTE on `jobs_leased_idx` beside it.) Measured
//! on PostgreSQL 15 with 1,000,000 finished rows (900,000 `done`, 100,000
//! `dead`) and 1,000 due `pending` rows, claiming a batch of 10 from one
//! queue (`EXPLAIN (ANALYZE, BUFFERS)` via [`PgBackend::explain_pull`],
//! abridged; the test `claim_plan_with_a_million_finished_jobs` in
//! `tests/postgres.rs`, run with `--ignored --nocapture`, reproduces it):
//!
//! ```text
//! Sort (actual rows=10)  Buffers: shared hit=187
//!   CTE expired_last
//!     -> LockRows (actual rows=0)
//!          -> Index Scan using jobs_leased_idx on jobs (actual rows=0)
//!               Index Cond: ((queue = 'default') AND (locked_until < now))
//!               Buffers: shared hit=1
//!   CTE killed
//!     -> Update on jobs j (actual rows=0)
//!   CTE claimable
//!     -> Limit (actual rows=10)  Buffers: shared hit=35
//!          -> LockRows (actual rows=10)
//!               -> Index Scan using jobs_claim_idx on jobs (actual rows=10)
//!                    Index Cond: (queue = 'default')
//!                    Filter: (status = 'pending' AND run_at <= now) OR
//!                            (status = 'processing' AND locked_until < now
//!                             AND attempts < max_attempts)
//!                    Buffers: shared hit=25
//!   CTE claimed
//!     -> Update on jobs j_1 (actual rows=10)  Buffers: shared hit=187
//!          -> Nested Loop -> Index Scan using jobs_pkey on jobs j_1
//! Execution Time: 0.362 ms
//! ```
//!
//! Choosing the 10 jobs read 35 buffers (25 in the claim index) and no
//! finished row; the rest is the update of the 10 leased rows and their
//! index entries. The index is read one priority level at a time (the
//! plan above predates this): a probe finds the lowest level, then its due
//! jobs are read as an index range in `(run_at, id)` order, then the next
//! level's, only until the batch is full, so jobs scheduled for later
//! (delayed, or retrying after a backoff) are never read. A plain walk in
//! `(priority, run_at, id)` order read every scheduled job of a level
//! before the next level, and all of them whenever fewer jobs were due
//! than the batch: with 200,000 jobs scheduled for the next day and one
//! due, 1,210 buffers and 16 ms per claim, against 38 buffers and 0.6 ms
//! now. With several queues, each level is probed and read in every queue
//! (one index range each, locking up to a batch of each queue's due jobs)
//! and merged, keeping a batch; the others are unlocked at commit, and
//! concurrent pullers pass them by meanwhile. A claim costs a few index
//! probes per queue and level, and locks at most a batch per queue at
//! each level it reads, whatever the backlog (with many queues and large
//! batches that is many row locks, each a heap write). (It used to read
//! every pending job of those queues and sort them: 123 ms per claim of
//! 100 over two queues holding 200,000 due jobs, against 1.5–1.7 ms now,
//! `EXPLAIN ANALYZE` on PostgreSQL 15.)
//! `tests/postgres.rs` asserts this on 100,000 finished rows, and past
//! 40,000 scheduled and 20,000 due jobs from one queue and from two.
//!
//! Payloads and results are `json`, stored as the text relayq sent (since
//! schema version 4; `jsonb` before): a job pushed since reads back
//! exactly as the SQLite and memory stores give it, numbers included
//! (`jsonb` printed the float `1e17` as the integer `100000000000000000`
//! and `-0.0` as `0.0`, and jobs stored before keep those texts), and the
//! server only validates the text rather than building a tree from it
//! (`enqueue_batch` in BENCHMARKS.md). To query payloads with `jsonb`
//! operators, cast them: `payload::jsonb @> '{"user": 7}'`.
//!
//! Upgrading to version 4 rewrites the jobs table and its indexes, holding
//! its exclusive lock throughout, so queue operations wait for it: clean
//! finished jobs first on a large table. Views, indexes or constraints of
//! your own on `payload` or `result` that need `jsonb` (its operators or
//! index classes) make it fail until you drop them.
//! Processes of an older relayq must be restarted after it: their pooled
//! connections would fail every read with "cached plan must not change
//! result type" until replaced. (This version reads both column types
//! alike, so its processes started with [`PgOptions::migrate`]`(false)`
//! before the upgrade need no restart.)
//!
//! # Connections
//!
//! A backend and its clones share one pool ([`PgOptions::max_connections`],
//! default 10) plus, once [`Backend::subscribe`] is first called, exactly
//! one LISTEN connection, whose `application_name` ends in
//! [`LISTENER_SUFFIX`]. Nothing else is ever opened. When that connection
//! drops, or stays silent to a `SELECT 1` sent after an acquire timeout
//! with nothing heard, the listener task replaces it, each attempt bounded
//! by [`PgOptions::acquire_timeout`], retrying with backoff (50 ms
//! doubling to 5 s). After any reconnection every subscriber gets one
//! signal, since pushes in between were not heard.
//! [`PgBackend::close`] closes the pool and the listener.
//!
//! Pool connections run at READ COMMITTED whatever the database's default
//! (claims and migrations rely on it), with JIT compilation off (no queue
//! statement repays it) and, on PostgreSQL 14 and later, the server
//! checking every second that a statement's client is still there.
//!
//! A queue operation (push, claim, acknowledgement, lease extension or
//! release, `get`, and each chunk of a `clean`) whose statements go unanswered for
//! [`PgOptions::reply_timeout`] (default [`DEFAULT_REPLY_TIMEOUT`]) fails
//! with [`Error::Backend`] and closes its connection: a server gone without
//! a reset (a failover, a cut link) would otherwise hold it, and the pushes
//! folded behind it, until TCP gives up, about a quarter of an hour later.
//!
//! # Testing
//!
//! The crate's tests need a server they may create schemas in:
//! `RELAYQ_TEST_DATABASE_URL`, else `DATABASE_URL`, else
//! `postgres://postgres@127.0.0.1:5432/postgres`. Without one they fail,
//! saying how to provide one. The workspace's `scripts/test` finds or
//! starts a server by itself (see `scripts/postgres-env`).
//!
//! # Errors
//!
//! A bad URL, schema name or pool setting is [`Error::Config`], and so is
//! a database not encoded in UTF8 (or SQL_ASCII), which could refuse a
//! payload's or result's characters; a server
//! that cannot be reached, or any failure of the database, is
//! [`Error::Backend`]. Neither, nor `Debug` of [`PgBackend`] or
//! [`PgOptions`], ever shows a password.
//!
//! [`Error::is_transient`] is true for a connection lost, reset or silent
//! past [`PgOptions::reply_timeout`], a host name that did not resolve, no
//! pooled connection free within
//! [`PgOptions::acquire_timeout`] (which is also how a refused connection
//! ends: sqlx retries it until then), and the SQLSTATEs of a broken
//! connection (class `08`), a serialization failure (`40001`), a deadlock
//! (`40P01`), a lock timeout (`55P03`), a session ended by the server
//! (`57P01`, `57P02`, `57P05`, `25P03`, `25P04`), a server starting up (`57P03`) and the
//! connection limit (`53300`); false for the rest: constraint violations,
//! a statement cancelled (`57014`), a TLS certificate refused. For your
//! own statements around [`PgBackend::push_in`], [`error_from`] maps a
//! sqlx error the same way.

mod deadline;
mod fold;
mod json;
mod listen;
mod migrate;
mod notify;
mod options;
#[cfg(all(test, feature = "testing"))]
mod plans;
mod row;
mod sql;
#[cfg(feature = "testing")]
pub mod testing;
mod transient;
mod vacuum;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use relayq_core::{
    Backend, Capabilities, Cleaner, Clock, Completion, Cutoff, Error, Job, JobId, JobPage,
    JobStatus, LEASE_EXPIRED_ERROR, Lease, LeasedJob, ListFilter, NewJob, Observer, PullRequest,
    Puller, PushOutcome, Pusher, Result, Schedule, Stats, Unreadable, ValidJob, Wakeups,
    check_clean, check_lease, check_result, check_retry, check_text, pull_readable,
    retry_due_at_once, truncate_to_micros, validate_batch,
};
use sea_query::{Alias, Expr, ExprTrait, Order, PostgresQueryBuilder, Query};
use sea_query_sqlx::SqlxBinder;
use serde_json::Value;
use serde_json::value::RawValue;
use sqlx::postgres::{PgArguments, PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, PgConnection, PgPool, Postgres, Row, SqlSafeStr, SqlStr};
use time::{Duration, OffsetDateTime};

use crate::json::AsJson;
use crate::row::Unread;

pub use migrate::SCHEMA_VERSION;
pub use options::{
    DEFAULT_APPLICATION_NAME, DEFAULT_MAX_CONNECTIONS, DEFAULT_REPLY_TIMEOUT, DEFAULT_SCHEMA,
    DEFAULT_VACUUM_THRESHOLD, LISTENER_SUFFIX, PgOptions,
};

/// The sqlx this crate is built on, so callers of [`PgBackend::push_in`]
/// and [`PgBackend::pool`] use the same version.
pub use sqlx;

/// URL schemes this backend accepts in a connection URL.
pub const URL_SCHEMES: &[&str] = &["postgres", "postgresql"];

/// A pooled connection idle at least this long is pinged before use.
const PING_IF_IDLE_FOR: std::time::Duration = std::time::Duration::from_secs(1);

/// How often a server checks, while it runs a statement, that the
/// statement's client is still connected (see
/// [`set_up_connection`]).
const CLIENT_CHECK_INTERVAL: &str = "1s";

/// The settings [`set_up_connection`] makes on every server.
const REQUIRED_SETTINGS: &str = "set_config('default_transaction_isolation', 'read committed', false), \
     set_config('jit', 'off', false)";

/// Refuses a database whose encoding cannot hold every character (LATIN1,
/// say): payloads, results and errors are stored in it, and one holding a
/// character it lacks would be refused; for a result or an error, every
/// time the job's outcome was written, so the job ran again and again.
/// UTF8 holds every character; SQL_ASCII stores the bytes unchecked.
async fn check_encoding(pool: &sqlx::PgPool, target: &str) -> Result<()> {
    let encoding: String = sqlx::query_scalar("SELECT current_setting('server_encoding')")
        .fetch_one(pool)
        .await
        .map_err(error_from)?;
    if encoding != "UTF8" && encoding != "SQL_ASCII" {
        return Err(Error::config(
            "database",
            format!("{target} is encoded {encoding}: relayq-postgres needs a UTF8 database"),
        ));
    }
    Ok(())
}

/// Sets up a new pool connection, in one round trip on current servers:
///
/// - Its transactions run at READ COMMITTED, whatever the database's or
///   role's default: the claim relies on it (a row another puller claimed
///   since the statement began is re-checked and passed by, where
///   REPEATABLE READ and SERIALIZABLE fail the statement), and so does the
///   migration (it re-reads the schema's state once it holds the lock).
///   A transaction begun on a pool connection for
///   [`PgBackend::push_in`] is READ COMMITTED too, unless begun at another
///   level explicitly.
/// - JIT compilation is off: a claim over many queues with a large batch
///   is estimated costly enough for PostgreSQL to compile it (with 18
///   queues and a batch of 1,024, 90 ms instead of 14 ms), and no queue
///   statement runs long enough to repay compiling.
/// - The server checks, every [`CLIENT_CHECK_INTERVAL`] while it runs a
///   statement, that the client is still there, and abandons the statement
///   if not (PostgreSQL 14 and later, on Linux: older servers do not know
///   the setting, and servers on platforms that cannot check refuse it;
///   both go on without it). A connection closed for want of an answer
///   (see [`deadline`]) may belong to a server that is alive but blocked,
///   on a lock for instance: without this, its statement would wait on and
///   could still commit, after its caller was told it failed.
async fn set_up_connection(conn: &mut PgConnection) -> sqlx::Result<()> {
    let all = sqlx::query(AssertSqlSafe(format!(
        "SELECT {REQUIRED_SETTINGS}, set_config('client_connection_check_interval', $1, false)"
    )))
    .bind(CLIENT_CHECK_INTERVAL)
    .execute(&mut *conn)
    .await;
    match all {
        Err(sqlx::Error::Database(e))
            if matches!(
                e.code().as_deref(),
                Some(UNDEFINED_OBJECT | INVALID_PARAMETER_VALUE)
            ) =>
        {
            sqlx::query(AssertSqlSafe(format!("SELECT {REQUIRED_SETTINGS}")))
                .execute(conn)
                .await
                .map(drop)
        }
        other => other.map(drop),
    }
}

/// Whether the pool's role may wait for a WAL flush as pushes on an idle
/// backend do (see [`fold`]); false, so pushes notify as before, if the
/// server cannot tell.
async fn can_await_flush(pool: &PgPool, deadline: Option<&deadline::Deadline>) -> bool {
    let asked = async {
        let mut conn = deadline::Conn::acquire(pool, deadline).await?;
        conn.run(|c| sqlx::query_scalar(sql::CAN_AWAIT_FLUSH).fetch_one(c))
            .await
    };
    asked.await.unwrap_or_else(|e: sqlx::Error| {
        tracing::debug!(error = %e, "relayq-postgres: cannot tell whether pushes may wait for a WAL flush; they notify through the notifier");
        false
    })
}

/// The most jobs one statement of [`Cleaner::clean`] deletes: a few tens of
/// milliseconds of work, so no clean holds its transaction open for long.
const CLEAN_CHUNK: u64 = 10_000;

/// SQLSTATE of an unrecognized configuration parameter (PostgreSQL 13 and
/// older).
const UNDEFINED_OBJECT: &str = "42704";

/// SQLSTATE of a setting the server's platform cannot honour (the check
/// needs Linux).
const INVALID_PARAMETER_VALUE: &str = "22023";

/// A sqlx error as relayq's [`Error::Backend`], transient when a later
/// attempt may succeed (see [Errors](crate#errors)), as this backend's
/// own calls return it: for the caller's own statements around
/// [`PgBackend::push_in`], so that one test of
/// [`Error::is_transient`] decides whether to retry the transaction.
pub fn error_from(e: sqlx::Error) -> Error {
    transient::backend_error(transient::is_transient(&e), e)
}

/// A failure to reach the server, naming where (password redacted).
#[derive(Debug)]
struct ConnectError {
    target: String,
    source: sqlx::Error,
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cannot connect to {}: {}", self.target, self.source)
    }
}

impl std::error::Error for ConnectError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// A relayq store in a PostgreSQL schema. Clones share the pool and the
/// listener connection.
///
/// Build one with [`PgBackend::connect`] or [`PgBackend::connect_with`].
#[derive(Clone)]
pub struct PgBackend {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    /// How long a queue operation waits for an answer (see [`deadline`]).
    deadline: Option<deadline::Deadline>,
    schema: String,
    sql: sql::Statements,
    clock: Option<Arc<dyn Clock>>,
    /// The URL with the password redacted, for Debug and errors.
    target: String,
    /// Options for the listener connection.
    listen_options: PgConnectOptions,
    /// How long one listener (re)connection attempt may take.
    listen_timeout: std::time::Duration,
    hub: Mutex<Option<Arc<listen::Hub>>>,
    /// Notifies the queues of pool pushes after they commit.
    notifier: notify::Notifier,
    /// Counts the rows this backend changes and vacuums the jobs table.
    vacuum: vacuum::Vacuum,
    /// Folds concurrent single pool pushes into shared statements.
    fold: fold::Folder,
    /// Whether a pool push on an idle backend may notify with its insert
    /// and wait for the WAL flush after (see [`fold`]): the role may run
    /// `pg_logical_emit_message`.
    early_notify: std::sync::atomic::AtomicBool,
    /// Set by [`PgBackend::close`] before it stops the listener, so no
    /// subscription starts a new one meanwhile.
    closed: std::sync::atomic::AtomicBool,
}

impl fmt::Debug for PgBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = &self.inner;
        f.debug_struct("PgBackend")
            .field("url", &inner.target)
            .field("schema", &inner.schema)
            .field("clock", &inner.clock)
            .field("pool_size", &inner.pool.size())
            .field("pool_idle", &inner.pool.num_idle())
            .finish_non_exhaustive()
    }
}

impl PgBackend {
    /// Connects to `url` with the default [`PgOptions`] and applies any
    /// pending migrations to the `relayq` schema.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with(PgOptions::new(url)).await
    }

    /// Connects with `options`, opening one connection at once to check
    /// the server is reachable, and (unless turned off with
    /// [`PgOptions::migrate`]) applies pending migrations.
    pub async fn connect_with(options: PgOptions) -> Result<Self> {
        let (connect, application_name) = options.validate()?;
        let target = options.redacted_url();
        let pool_options = connect.clone().application_name(&application_name);
        let listen_options =
            connect.application_name(&format!("{application_name}{LISTENER_SUFFIX}"));
        let ping_within = (options.acquire_timeout / 2)
            .min(options.reply_timeout.unwrap_or(std::time::Duration::MAX));
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections)
            .min_connections(options.min_connections)
            .acquire_timeout(options.acquire_timeout)
            .idle_timeout(options.idle_timeout)
            .max_lifetime(options.max_lifetime)
            // sqlx pings every connection it hands out by default: one
            // extra round trip before every statement, which made a push
            // cost two. sqlx also pings every connection it takes back, so
            // an idle connection was alive when it was returned; ping it
            // again only once it has sat idle for a while, the kind an
            // idle-session timeout or a firewall drops. The cost: a server
            // restart (or pg_terminate_backend) within a second of a
            // connection's last use is not caught here, so that connection
            // fails its next statement with Error::Backend (the statement
            // never ran; the caller may retry it) and is discarded when
            // returned. Measured with reliability/tests/db_faults.rs: a
            // 0.4 s restart cost the test's pushes three such errors, and
            // the workers recovered as before. The ping gets at most half
            // the acquire timeout (and no more than the reply timeout): a
            // connection whose server went silent is then closed with time
            // left to open another.
            .test_before_acquire(false)
            .before_acquire(move |conn, meta| {
                Box::pin(async move {
                    if meta.idle_for >= PING_IF_IDLE_FOR {
                        deadline::within(ping_within, sqlx::Connection::ping(conn)).await?;
                    }
                    Ok(true)
                })
            })
            .after_connect(|conn, _| Box::pin(set_up_connection(conn)))
            .connect_with(pool_options)
            .await
            .map_err(|source| {
                transient::backend_error(
                    transient::is_transient(&source),
                    ConnectError {
                        target: target.clone(),
                        source,
                    },
                )
            })?;
        check_encoding(&pool, &target).await?;
        let sql = sql::Statements::new(&options.schema);
        let deadline = deadline::Deadline::new(options.reply_timeout).map_err(Error::backend)?;
        let early_notify = can_await_flush(&pool, deadline.as_ref()).await;
        let notifier =
            notify::Notifier::new(pool.clone(), deadline.clone(), sql.notify_async.clone());
        let vacuum =
            vacuum::Vacuum::new(pool.clone(), sql.vacuum.clone(), options.vacuum_threshold);
        let backend = Self {
            inner: Arc::new(Inner {
                pool,
                deadline,
                sql,
                notifier,
                vacuum,
                fold: fold::Folder::default(),
                early_notify: std::sync::atomic::AtomicBool::new(early_notify),
                closed: std::sync::atomic::AtomicBool::new(false),
                schema: options.schema,
                clock: options.clock,
                target,
                listen_options,
                listen_timeout: options.acquire_timeout,
                hub: Mutex::new(None),
            }),
        };
        if options.migrate {
            backend.migrate().await?;
        }
        Ok(backend)
    }

    /// Applies every pending migration, idempotently: creates the schema
    /// and its tables on first use, does nothing when up to date. Runs in
    /// one transaction under an advisory lock, so concurrent callers in
    /// any number of processes are safe. A schema newer than this crate
    /// knows is [`Error::SchemaTooNew`].
    pub async fn migrate(&self) -> Result<()> {
        migrate::migrate(&self.inner.pool, &self.inner.schema)
            .await
            .map(drop)
    }

    /// The schema version recorded in `<schema>.schema_version` (0 before
    /// the first migration).
    pub async fn schema_version(&self) -> Result<i32> {
        let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(format!("\"{}\".schema_version", self.inner.schema))
            .fetch_one(&self.inner.pool)
            .await
            .map_err(error_from)?;
        if !exists {
            return Ok(0);
        }
        sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT coalesce(max(version), 0) FROM \"{}\".schema_version",
            self.inner.schema
        )))
        .fetch_one(&self.inner.pool)
        .await
        .map_err(error_from)
    }

    /// Closes every connection: stops the listener (open subscriptions
    /// end), sends the notifications of pushes that returned before it
    /// (see the crate docs: they are sent in the background), and closes
    /// the pool, waiting for connections in use to be returned. Later
    /// operations on this backend or its clones fail with
    /// [`Error::Backend`].
    pub async fn close(&self) {
        self.inner
            .closed
            .store(true, std::sync::atomic::Ordering::Release);
        let hub = self.hub_slot().take();
        drop(hub);
        self.inner.notifier.close().await;
        self.inner.pool.close().await;
    }

    /// The connection pool, e.g. to begin a transaction for
    /// [`Self::push_in`]. Its connections run at READ COMMITTED whatever
    /// the database's default (relayq's claims need it), with JIT off
    /// (see [Connections](crate#connections)); begin at another level
    /// explicitly, e.g. `pool.begin_with("BEGIN ISOLATION LEVEL
    /// SERIALIZABLE")`.
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// The schema holding relayq's tables.
    pub fn schema(&self) -> &str {
        &self.inner.schema
    }

    /// Enqueues `job` on the caller's connection, typically inside the
    /// caller's transaction (pass `&mut tx`): the job exists, and workers
    /// are woken, only if that transaction commits. Same results as
    /// [`Pusher::push`]. On a connection outside any transaction it makes
    /// one of its own (see [`Self::push_batch_in`]).
    ///
    /// The statement runs at the transaction's isolation level (READ
    /// COMMITTED on a pool connection, unless begun otherwise; see
    /// [`Self::pool`]). At REPEATABLE READ or SERIALIZABLE, a job with a unique key that another session
    /// committed after the transaction's snapshot makes the push fail
    /// with a serialization failure (SQLSTATE 40001, in
    /// [`Error::Backend`]'s source) where READ COMMITTED would report a
    /// duplicate; as with any statement at those levels, retry the whole
    /// transaction.
    pub async fn push_in(&self, conn: &mut PgConnection, job: NewJob) -> Result<PushOutcome> {
        let mut outcomes = self.push_batch_in(conn, vec![job]).await?;
        outcomes
            .pop()
            .ok_or_else(|| Error::backend("push returned no outcome"))
    }

    /// Enqueues `jobs` on the caller's connection, all or nothing (one
    /// insert, then, for a batch with unique keys, a look for a key's
    /// holder that committed during it, and the notification); see
    /// [`Self::push_in`] and [`Pusher::push_batch`].
    ///
    /// On a connection outside any transaction the push makes one of its
    /// own, so that, as with [`Pusher::push_batch`], it is stored whole or
    /// not at all. A transaction is one begun through sqlx (`begin`, or a
    /// [`sqlx::Transaction`]): one begun with a plain `BEGIN` statement is
    /// not seen as one, and this push would commit it.
    pub async fn push_batch_in(
        &self,
        conn: &mut PgConnection,
        jobs: Vec<NewJob>,
    ) -> Result<Vec<PushOutcome>> {
        let jobs = validate_batch(jobs)?;
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        if sqlx::Connection::is_in_transaction(conn) {
            return self.push_announced(conn, &jobs).await;
        }
        // Its statements (the insert, a look for a key's holder, the
        // notification) would each commit alone: one failing after the
        // insert would report stored jobs as not stored.
        let mut tx = sqlx::Connection::begin(conn).await.map_err(error_from)?;
        let outcomes = self.push_announced(&mut tx, &jobs).await?;
        tx.commit().await.map_err(error_from)?;
        Ok(outcomes)
    }

    /// Stores validated jobs (a batch, or a job with a unique key) on a
    /// pool connection and wakes their queues' workers, on a task of
    /// `runtime`: a caller that stops waiting once the statement is sent (a
    /// timeout, a dropped request) leaves it to finish, and workers hear of
    /// the jobs once they are committed.
    async fn push_spawned(
        &self,
        runtime: &tokio::runtime::Handle,
        jobs: Vec<ValidJob>,
    ) -> Result<Vec<PushOutcome>> {
        let backend = self.clone();
        match runtime
            .spawn(async move { backend.push_pooled(jobs).await })
            .await
        {
            Ok(outcomes) => outcomes,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // Its runtime is shutting down: the push may or may not be stored.
            Err(_) => Err(Error::transient(
                "relayq-postgres: the push's task ended early",
            )),
        }
    }

    /// [`Self::push_spawned`]'s body.
    async fn push_pooled(&self, jobs: Vec<ValidJob>) -> Result<Vec<PushOutcome>> {
        // A batch with unique keys may look a key's holder up after its
        // insert (one that committed after the insert's snapshot): both in
        // one transaction, so that a failure of the look stores nothing,
        // as a batch is all or nothing. Others commit by themselves.
        let keyed = is_keyed_batch(&jobs);
        let mut conn = self.conn().await?;
        let valid = &jobs;
        let outcomes = conn
            .run(|c| async move {
                if !keyed {
                    return self.push_valid(c, valid).await;
                }
                let mut tx = sqlx::Connection::begin(c).await.map_err(error_from)?;
                let outcomes = self.push_valid(&mut tx, valid).await?;
                tx.commit().await.map_err(error_from)?;
                Ok(outcomes)
            })
            .await;
        drop(conn);
        match outcomes {
            // Committed: wake the listeners, off this call's path.
            Ok(outcomes) => {
                self.announce(created_queues(&jobs, &outcomes));
                Ok(outcomes)
            }
            Err(e) => {
                // Perhaps committed, its reply lost: a wake-up too many
                // costs a pull, one too few leaves the jobs to the poll.
                if e.is_transient() {
                    self.announce(distinct_queues(&jobs));
                }
                Err(e)
            }
        }
    }

    /// Stores validated jobs on `conn` and notifies their queues' workers
    /// there: when its transaction commits.
    async fn push_announced(
        &self,
        conn: &mut PgConnection,
        jobs: &[ValidJob],
    ) -> Result<Vec<PushOutcome>> {
        let outcomes = self.push_valid(conn, jobs).await?;
        // In the caller's transaction: delivered if and only if it commits.
        let queues = created_queues(jobs, &outcomes);
        if !queues.is_empty() {
            sqlx::query(self.inner.sql.notify.clone())
                .bind(&queues)
                .execute(&mut *conn)
                .await
                .map_err(error_from)?;
        }
        Ok(outcomes)
    }

    /// Stores validated jobs in one statement.
    async fn push_valid(
        &self,
        conn: &mut PgConnection,
        jobs: &[ValidJob],
    ) -> Result<Vec<PushOutcome>> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        if let [job] = jobs {
            return self.push_one(conn, job).await.map(|outcome| vec![outcome]);
        }
        if !is_keyed_batch(jobs) {
            return self.push_keyless(conn, jobs).await;
        }
        let now = self.now();
        let n = jobs.len();
        let schedules = jobs
            .iter()
            .map(|job| schedule(job, now))
            .collect::<Result<Vec<_>>>()?;
        let c = Columns::new(jobs, &schedules);
        let keys: Vec<Option<&str>> = jobs.iter().map(|job| job.unique_key.as_deref()).collect();
        let rows = c
            .bind(self.inner.sql.push.clone(), now)
            .bind(&keys)
            .fetch_all(&mut *conn)
            .await
            .map_err(error_from)?;
        if rows.len() != n {
            return Err(Error::backend(format!(
                "push returned {} rows for {n} jobs",
                rows.len()
            )));
        }
        let mut created_keys: HashMap<(&str, &str), JobId> = HashMap::new();
        let mut outcomes = Vec::with_capacity(n);
        for (job, row) in jobs.iter().zip(&rows) {
            let id: JobId = row.try_get("id").map_err(error_from)?;
            let created: bool = row.try_get("created").map_err(error_from)?;
            let key = job.unique_key.as_deref();
            if created {
                if let Some(key) = key {
                    created_keys.insert((job.queue.as_str(), key), id);
                }
                outcomes.push(PushOutcome::Created(id));
                continue;
            }
            let key = key.ok_or_else(|| Error::backend("a job without unique_key was skipped"))?;
            let holder = match created_keys.get(&(job.queue.as_str(), key)) {
                Some(&earlier) => earlier,
                None => match row
                    .try_get::<Option<JobId>, _>("holder")
                    .map_err(error_from)?
                {
                    Some(holder) => holder,
                    // The key's holder committed after the statement's
                    // snapshot: look again with a fresh one.
                    None => sqlx::query_scalar(self.inner.sql.find_key_holder.clone())
                        .bind(&job.queue)
                        .bind(key)
                        .fetch_optional(&mut *conn)
                        .await
                        .map_err(error_from)?
                        .ok_or_else(|| {
                            Error::transient("the job holding a unique_key vanished during push")
                        })?,
                },
            };
            outcomes.push(PushOutcome::Duplicate(holder));
        }
        Ok(outcomes)
    }

    /// Stores one validated job with a single-row `INSERT`.
    async fn push_one(&self, conn: &mut PgConnection, job: &ValidJob) -> Result<PushOutcome> {
        let now = self.now();
        let (run_at, delay) = schedule(job, now)?;
        let Some(key) = job.unique_key.as_deref() else {
            return self
                .push_one_raw(conn, now, job, (run_at, delay))
                .await
                .map(PushOutcome::Created)
                .map_err(error_from);
        };
        let sql = &self.inner.sql;
        let created: Option<JobId> =
            bind_one(sql.push_one_keyed.clone(), now, job, (run_at, delay))
                .bind(key)
                .fetch_optional(&mut *conn)
                .await
                .map_err(error_from)?;
        if let Some(id) = created {
            return Ok(PushOutcome::Created(id));
        }
        // The key is held by an active job, committed before the insert
        // gave up (ON CONFLICT waits for an in-progress holder): a new
        // snapshot sees it.
        let holder: JobId = sqlx::query_scalar(sql.find_key_holder.clone())
            .bind(&job.queue)
            .bind(key)
            .fetch_optional(&mut *conn)
            .await
            .map_err(error_from)?
            .ok_or_else(|| Error::transient("the job holding a unique_key vanished during push"))?;
        Ok(PushOutcome::Duplicate(holder))
    }

    /// Stores one validated job without a unique key, scheduled `at` (see
    /// [`schedule`]), with the single-row `INSERT`; the driver's error as is.
    async fn push_one_raw(
        &self,
        conn: &mut PgConnection,
        now: Option<OffsetDateTime>,
        job: &ValidJob,
        at: (Option<OffsetDateTime>, i64),
    ) -> sqlx::Result<JobId> {
        bind_one(self.inner.sql.push_one.clone(), now, job, at)
            .fetch_one(&mut *conn)
            .await
    }

    /// Stores validated jobs, none with a unique key, in one plain
    /// `INSERT … SELECT FROM unnest(…)`.
    async fn push_keyless(
        &self,
        conn: &mut PgConnection,
        jobs: &[ValidJob],
    ) -> Result<Vec<PushOutcome>> {
        let now = self.now();
        let schedules = jobs
            .iter()
            .map(|job| schedule(job, now))
            .collect::<Result<Vec<_>>>()?;
        let n = jobs.len();
        let ids = self
            .insert_keyless(conn, now, jobs, &schedules)
            .await
            .map_err(error_from)?;
        if ids.len() != n {
            return Err(Error::backend(format!(
                "push returned {} rows for {n} jobs",
                ids.len()
            )));
        }
        Ok(ids.into_iter().map(PushOutcome::Created).collect())
    }

    /// The keyless `UNNEST` insert of `jobs`, scheduled as `schedules`
    /// says: their ids in input order, or the driver's error as is.
    async fn insert_keyless(
        &self,
        conn: &mut PgConnection,
        now: Option<OffsetDateTime>,
        jobs: &[ValidJob],
        schedules: &[(Option<OffsetDateTime>, i64)],
    ) -> sqlx::Result<Vec<JobId>> {
        let row = match uniform(jobs, schedules) {
            Some((first, &(run_at, delay))) => {
                let payloads: Vec<AsJson<&RawValue>> = jobs
                    .iter()
                    .map(|job| AsJson(job.payload.as_raw()))
                    .collect();
                sqlx::query(self.inner.sql.push_uniform.clone())
                    .bind(now)
                    .bind(first.queue.as_str())
                    .bind(first.kind.as_str())
                    .bind(&payloads)
                    .bind(first.priority)
                    .bind(first.max_attempts)
                    .bind(run_at)
                    .bind(delay)
                    .fetch_one(&mut *conn)
                    .await?
            }
            None => {
                Columns::new(jobs, schedules)
                    .bind(self.inner.sql.push_keyless.clone(), now)
                    .fetch_one(&mut *conn)
                    .await?
            }
        };
        let mut ids: Vec<JobId> = row.try_get::<Option<Vec<JobId>>, _>(0)?.unwrap_or_default();
        // Drawn in input order (see the statement): ascending is input order.
        ids.sort_unstable();
        Ok(ids)
    }

    /// Runs the claim statement for `request` under `EXPLAIN (ANALYZE,
    /// BUFFERS)` inside a transaction that is rolled back, and returns the
    /// plan: for operators checking that claims walk the partial indexes
    /// (see the crate docs). Nothing is leased; the queues' workers, in
    /// every process, are woken after the rollback, as the claim held due
    /// jobs that they may have passed by.
    pub async fn explain_pull(&self, request: &PullRequest) -> Result<String> {
        request.validate()?;
        let mut tx = self.inner.pool.begin().await.map_err(error_from)?;
        let rows = self
            .pull_query(request, Some("EXPLAIN (ANALYZE, BUFFERS)"))
            .fetch_all(&mut *tx)
            .await;
        let rolled_back = tx.rollback().await;
        // Pullers beside it passed by every job it locked, due again now.
        self.announce(request.queues.clone());
        let rows = rows.map_err(error_from)?;
        rolled_back.map_err(error_from)?;
        let lines = rows
            .iter()
            .map(|row| row.try_get::<String, _>(0).map_err(error_from))
            .collect::<Result<Vec<_>>>()?;
        Ok(lines.join("\n"))
    }

    /// The claim statement for `request`, optionally behind `prefix`, with
    /// its parameters bound.
    fn pull_query(
        &self,
        request: &PullRequest,
        prefix: Option<&str>,
    ) -> sqlx::query::Query<'static, sqlx::Postgres, sqlx::postgres::PgArguments> {
        let sql = &self.inner.sql;
        // The claim over several queues needs each named once.
        let mut queues: Vec<&str> = request.queues.iter().map(String::as_str).collect();
        queues.sort_unstable();
        queues.dedup();
        let single = queues.len() == 1;
        let statement = if single {
            &sql.pull_one_queue
        } else {
            &sql.pull_many_queues
        };
        let statement = match prefix {
            Some(prefix) => {
                AssertSqlSafe(format!("{prefix} {}", statement.as_str())).into_sql_str()
            }
            None => statement.clone(),
        };
        let query = sqlx::query(statement).bind(self.now());
        let query = if single {
            query.bind(queues[0].to_owned())
        } else {
            query.bind(queues.into_iter().map(str::to_owned).collect::<Vec<_>>())
        };
        query
            .bind(i64::from(request.batch))
            .bind(LEASE_EXPIRED_ERROR)
            .bind(micros(request.lease))
    }

    /// Marks `job` dead, its unreadable column replaced by
    /// [`Unreadable::readable`].
    async fn kill_unreadable(&self, job: Unreadable) -> Result<()> {
        let sql = match job.column {
            "result" => &self.inner.sql.kill_unreadable_result,
            _ => &self.inner.sql.kill_unreadable_payload,
        };
        let readable = RawValue::from_string(job.readable).map_err(Error::backend)?;
        let query = self
            .fenced(sql, &job.lease)
            .bind(job.reason)
            .bind(AsJson(readable));
        let (_,): (JobId,) = self.acknowledge(query, &job.lease).await?;
        Ok(())
    }

    /// One claim statement for [`Puller::pull`]: the jobs it leased and
    /// read, and those it leased but could not read.
    async fn claim(&self, request: PullRequest) -> Result<(Vec<LeasedJob>, Vec<Unreadable>)> {
        let query = self.pull_query(&request, None);
        let rows = self
            .conn()
            .await?
            .run(|c| query.fetch_all(c))
            .await
            .map_err(error_from)?;
        self.inner.vacuum.record(rows.len() as u64);
        let passed_over = rows.first().is_some_and(|row| {
            // The jobs are leased: losing them over this flag would leave
            // them to their lease's end.
            row::passed_over(row).unwrap_or_else(|e| {
                tracing::warn!(error = %e, "relayq-postgres: cannot read whether a claim passed jobs over; waking the queues' workers");
                true
            })
        });
        if passed_over {
            // Pullers that came back short while this claim held those
            // jobs would otherwise wait for the next push or poll.
            self.announce(request.queues.clone());
        }
        let mut leased = Vec::with_capacity(rows.len());
        let mut unreadable = Vec::new();
        for row in &rows {
            match row::job(row) {
                Ok(job) => leased.push(LeasedJob::from(job)),
                Err(Unread::Json(job)) => unreadable.push(job),
                Err(Unread::Column(e)) => return Err(e),
            }
        }
        Ok((leased, unreadable))
    }

    /// A fenced acknowledgement: `sql` with `$1`–`$3` bound to `now`, the
    /// lease's job id and its token; the caller binds the rest.
    fn fenced<'q, T>(
        &self,
        sql: &sqlx::SqlStr,
        lease: &Lease,
    ) -> sqlx::query::QueryAs<'q, sqlx::Postgres, T, sqlx::postgres::PgArguments>
    where
        T: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>,
    {
        sqlx::query_as(sql.clone())
            .bind(self.now())
            .bind(lease.job_id)
            .bind(lease.token)
    }

    /// Runs a [`Self::fenced`] statement, returning the row it changed: none
    /// means the lease is no longer held, and nothing changed.
    async fn acknowledge<T>(
        &self,
        query: sqlx::query::QueryAs<'_, sqlx::Postgres, T, sqlx::postgres::PgArguments>,
        lease: &Lease,
    ) -> Result<T>
    where
        T: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin,
    {
        let row = self
            .conn()
            .await?
            .run(|c| query.fetch_optional(c))
            .await
            .map_err(error_from)?;
        let row = row.ok_or_else(|| lease.lost())?;
        self.inner.vacuum.record(1);
        Ok(row)
    }

    /// A pooled connection for a queue operation, whose statements must be
    /// answered within the reply timeout (see [`deadline`]).
    async fn conn(&self) -> Result<deadline::Conn> {
        deadline::Conn::acquire(&self.inner.pool, self.inner.deadline.as_ref())
            .await
            .map_err(error_from)
    }

    /// The injected clock's time, or `None` for the server's.
    fn now(&self) -> Option<OffsetDateTime> {
        self.inner.clock.as_ref().map(|clock| clock.now())
    }

    /// With an injected clock, `now + by` must be representable (as in the
    /// reference backend); the server checks its own arithmetic.
    fn check_after(&self, by: Duration, field: &'static str, what: &str) -> Result<()> {
        match self.now() {
            Some(now) if now.checked_add(by).is_none() => {
                Err(Error::invalid(field, format!("puts {what} out of range")))
            }
            _ => Ok(()),
        }
    }

    /// Wakes the workers of `queues`, in which a pool push or a retry due
    /// at once just committed jobs due now (or a push that failed
    /// transiently may have), or a claim left jobs due that other pullers
    /// passed by while it held them: this backend's (and its clones') at
    /// once, every process's through NOTIFY.
    fn announce(&self, queues: Vec<String>) {
        if queues.is_empty() {
            return;
        }
        self.wake_here(&queues);
        self.inner.notifier.notify(queues);
    }

    /// Wakes the subscribers of this backend (and its clones) to `queues`.
    pub(crate) fn wake_here(&self, queues: &[String]) {
        let hub = self.hub_slot().clone();
        if let Some(hub) = hub {
            hub.wake(queues);
        }
    }

    /// Where the listener hub is kept, once started (a poisoned lock is
    /// taken as is: the slot holds no invariant a panic could break).
    fn hub_slot(&self) -> MutexGuard<'_, Option<Arc<listen::Hub>>> {
        self.inner
            .hub
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The listener hub, started on first use. A hub whose task has ended
    /// (its runtime shut down) is replaced.
    fn hub(&self) -> Result<Arc<listen::Hub>> {
        let mut hub = self.hub_slot();
        match hub.as_ref() {
            Some(running) if !running.is_closed() => Ok(running.clone()),
            _ if self.inner.closed.load(std::sync::atomic::Ordering::Acquire)
                || self.inner.pool.is_closed() =>
            {
                Err(Error::backend("relayq-postgres: the backend was closed"))
            }
            _ => {
                let started = Arc::new(listen::Hub::start(
                    self.inner.listen_options.clone(),
                    self.inner.listen_timeout,
                    self.inner.sql.channels.clone(),
                ));
                *hub = Some(started.clone());
                Ok(started)
            }
        }
    }
}

/// The distinct queues that `outcomes` added a job to.
fn created_queues(jobs: &[ValidJob], outcomes: &[PushOutcome]) -> Vec<String> {
    distinct_queues(
        jobs.iter()
            .zip(outcomes)
            .filter(|(_, outcome)| !outcome.is_duplicate())
            .map(|(job, _)| job),
    )
}

/// The Tokio runtime the caller runs on: the driver's I/O and the folded
/// pushes' insert tasks need one. A typed error, not sqlx's panic, for a
/// push polled by another executor.
fn tokio_runtime() -> Result<tokio::runtime::Handle> {
    tokio::runtime::Handle::try_current()
        .map_err(|_| Error::backend("relayq-postgres: a push must run on a Tokio runtime"))
}

/// The distinct queues of `jobs`, in first-seen order.
fn distinct_queues<'a>(jobs: impl IntoIterator<Item = &'a ValidJob>) -> Vec<String> {
    let mut queues: Vec<String> = Vec::new();
    for job in jobs {
        if !queues.contains(&job.queue) {
            queues.push(job.queue.clone());
        }
    }
    queues
}

/// A single-row push statement (`PUSH_ONE` or `PUSH_ONE_KEYED`) with
/// `$1`–`$8` bound: `now`, the job's fields and its [`schedule`].
fn bind_one(
    statement: SqlStr,
    now: Option<OffsetDateTime>,
    job: &ValidJob,
    (run_at, delay): (Option<OffsetDateTime>, i64),
) -> sqlx::query::QueryScalar<'_, Postgres, JobId, PgArguments> {
    sqlx::query_scalar(statement)
        .bind(now)
        .bind(&job.queue)
        .bind(&job.kind)
        .bind(AsJson(job.payload.as_raw()))
        .bind(job.priority)
        .bind(job.max_attempts)
        .bind(run_at)
        .bind(delay)
}

/// Jobs as the columns the `UNNEST` push statements bind, one array per
/// field, in input order; `schedules` holds each job's [`schedule`].
struct Columns<'a> {
    queues: Vec<&'a str>,
    kinds: Vec<&'a str>,
    payloads: Vec<AsJson<&'a RawValue>>,
    priorities: Vec<i16>,
    max_attempts: Vec<i32>,
    run_ats: Vec<Option<OffsetDateTime>>,
    delays: Vec<i64>,
}

impl<'a> Columns<'a> {
    fn new(jobs: &'a [ValidJob], schedules: &[(Option<OffsetDateTime>, i64)]) -> Self {
        Self {
            queues: jobs.iter().map(|job| job.queue.as_str()).collect(),
            kinds: jobs.iter().map(|job| job.kind.as_str()).collect(),
            payloads: jobs
                .iter()
                .map(|job| AsJson(job.payload.as_raw()))
                .collect(),
            priorities: jobs.iter().map(|job| job.priority).collect(),
            max_attempts: jobs.iter().map(|job| job.max_attempts).collect(),
            run_ats: schedules.iter().map(|&(run_at, _)| run_at).collect(),
            delays: schedules.iter().map(|&(_, delay)| delay).collect(),
        }
    }

    /// `statement` with `now` and these columns bound as `$1`–`$8`, the
    /// parameters every `UNNEST` push statement starts with.
    fn bind(
        &'a self,
        statement: SqlStr,
        now: Option<OffsetDateTime>,
    ) -> sqlx::query::Query<'a, Postgres, PgArguments> {
        sqlx::query(statement)
            .bind(now)
            .bind(&self.queues)
            .bind(&self.kinds)
            .bind(&self.payloads)
            .bind(&self.priorities)
            .bind(&self.max_attempts)
            .bind(&self.run_ats)
            .bind(&self.delays)
    }
}

/// The first job and schedule of a batch whose jobs differ only in their
/// payloads (queue, kind, priority, attempts and schedule alike), which
/// the uniform push statement (`sql.rs`) inserts binding those once; `None` otherwise.
fn uniform<'a>(
    jobs: &'a [ValidJob],
    schedules: &'a [(Option<OffsetDateTime>, i64)],
) -> Option<(&'a ValidJob, &'a (Option<OffsetDateTime>, i64))> {
    let (first, schedule) = (jobs.first()?, schedules.first()?);
    let alike = jobs.iter().zip(schedules).all(|(job, s)| {
        job.queue == first.queue
            && job.kind == first.kind
            && job.priority == first.priority
            && job.max_attempts == first.max_attempts
            && s == schedule
    });
    alike.then_some((first, schedule))
}

/// A job's `run_at` and delay (µs) as the push statements take them:
/// with an injected clock `now`, the time computed here, like the reference
/// backend (including its range errors); with the server's clock, an
/// explicit time, or a delay the server adds to its own `now`.
fn schedule(job: &ValidJob, now: Option<OffsetDateTime>) -> Result<(Option<OffsetDateTime>, i64)> {
    Ok(match now {
        Some(now) => (Some(truncate_to_micros(job.run_at(now)?)), 0),
        None => match job.schedule {
            Schedule::Now => (None, 0),
            Schedule::At(at) => (Some(truncate_to_micros(at)), 0),
            Schedule::After(d) => (None, micros(d)),
        },
    })
}

/// A duration in whole microseconds (the precision PostgreSQL stores),
/// rounded toward zero. Callers have bounded it (at most ~100 years).
fn micros(d: Duration) -> i64 {
    i64::try_from(d.whole_microseconds()).unwrap_or(i64::MAX)
}

/// Whether `jobs` go in as a batch with unique keys ([`sql::Statements::push`]),
/// whose insert may be followed by a second look for a key's holder: more
/// than one job (one goes in alone), one with a key at least.
fn is_keyed_batch(jobs: &[ValidJob]) -> bool {
    jobs.len() > 1 && jobs.iter().any(|job| job.unique_key.is_some())
}

#[async_trait]
impl Pusher for PgBackend {
    async fn push(&self, job: NewJob) -> Result<PushOutcome> {
        let runtime = tokio_runtime()?;
        // Validate before anything is sent (errors worded as for a batch).
        let job = validate_batch(vec![job])?
            .pop()
            .ok_or_else(|| Error::backend("validation returned no job"))?;
        if job.unique_key.is_some() {
            // Its own statement: ON CONFLICT decides duplicates.
            let mut outcomes = self.push_spawned(&runtime, vec![job]).await?;
            return outcomes
                .pop()
                .ok_or_else(|| Error::backend("push returned no outcome"));
        }
        // An injected clock's range errors, before anything is sent.
        schedule(&job, self.now())?;
        // Folded with concurrent pushes into one statement (see `fold`).
        self.push_folded(&runtime, job)
            .await
            .map(PushOutcome::Created)
    }

    async fn push_batch(&self, jobs: Vec<NewJob>) -> Result<Vec<PushOutcome>> {
        let runtime = tokio_runtime()?;
        // Validate before borrowing a connection.
        let jobs = validate_batch(jobs)?;
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        self.push_spawned(&runtime, jobs).await
    }
}

#[async_trait]
impl Puller for PgBackend {
    async fn pull(&self, request: &PullRequest) -> Result<Vec<LeasedJob>> {
        request.validate()?;
        self.check_after(request.lease, "lease", "locked_until")?;
        pull_readable(
            request,
            |round| self.claim(round),
            |job| self.kill_unreadable(job),
        )
        .await
    }

    async fn complete(&self, lease: &Lease, result: Option<Value>) -> Result<()> {
        check_result(result.as_ref())?;
        let query = self
            .fenced(&self.inner.sql.complete, lease)
            .bind(result.map(AsJson));
        let (_,): (JobId,) = self.acknowledge(query, lease).await?;
        Ok(())
    }

    async fn complete_batch(&self, completions: Vec<Completion>) -> Result<Vec<Lease>> {
        for c in &completions {
            check_result(c.result.as_ref())?;
        }
        if completions.is_empty() {
            return Ok(Vec::new());
        }
        // A lease named twice completes once: only its first naming is
        // sent. (Deduplicating in SQL, with DISTINCT ON, led the planner
        // into a nested loop over every leased row whenever its statistics
        // said few rows were processing: 50 ms for 256 completions.)
        let mut named = HashSet::with_capacity(completions.len());
        let mut sent: Vec<&Completion> = completions
            .iter()
            .filter(|c| named.insert(c.lease))
            .collect();
        sent.sort_by_key(|c| c.lease.job_id);
        let ids: Vec<i64> = sent.iter().map(|c| c.lease.job_id).collect();
        let tokens: Vec<i64> = sent.iter().map(|c| c.lease.token).collect();
        let results: Vec<Option<AsJson<&Value>>> =
            sent.iter().map(|c| c.result.as_ref().map(AsJson)).collect();
        let query = sqlx::query_scalar(self.inner.sql.complete_batch.clone())
            .bind(self.now())
            .bind(&ids)
            .bind(&tokens)
            .bind(&results);
        let done: Vec<i64> = self
            .conn()
            .await?
            .run(|c| query.fetch_all(c))
            .await
            .map_err(error_from)?;
        self.inner.vacuum.record(done.len() as u64);
        let mut completed: HashSet<Lease> = HashSet::with_capacity(done.len());
        for ord in done {
            // Ordinals are 1-based positions in what was sent.
            if let Some(c) = usize::try_from(ord - 1).ok().and_then(|i| sent.get(i)) {
                completed.insert(c.lease);
            }
        }
        // Every naming but the first of a completed lease is lost.
        Ok(completions
            .iter()
            .filter(|c| !completed.remove(&c.lease))
            .map(|c| c.lease)
            .collect())
    }

    async fn retry(&self, lease: &Lease, delay: Duration, error: &str) -> Result<JobStatus> {
        check_retry(delay, error)?;
        self.check_after(delay, "delay", "run_at")?;
        let query = self
            .fenced(&self.inner.sql.retry, lease)
            .bind(micros(delay))
            .bind(error);
        let (status, queue): (String, String) = self.acknowledge(query, lease).await?;
        let status = row::status(&status)?;
        if status == JobStatus::Pending && retry_due_at_once(delay) {
            self.announce(vec![queue]);
        }
        Ok(status)
    }

    async fn kill(&self, lease: &Lease, error: &str) -> Result<()> {
        check_text("error", error)?;
        let query = self.fenced(&self.inner.sql.kill, lease).bind(error);
        let (_,): (JobId,) = self.acknowledge(query, lease).await?;
        Ok(())
    }

    async fn extend(&self, lease: &Lease, by: Duration) -> Result<OffsetDateTime> {
        check_lease("by", by)?;
        self.check_after(by, "by", "locked_until")?;
        let query = self.fenced(&self.inner.sql.extend, lease).bind(micros(by));
        let (until,): (OffsetDateTime,) = self.acknowledge(query, lease).await?;
        Ok(until)
    }

    async fn extend_batch(
        &self,
        leases: &[Lease],
        by: Duration,
    ) -> Result<Vec<Option<OffsetDateTime>>> {
        check_lease("by", by)?;
        self.check_after(by, "by", "locked_until")?;
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        let mut sent = leases.to_vec();
        sent.sort_by_key(|lease| lease.job_id);
        let ids: Vec<JobId> = sent.iter().map(|lease| lease.job_id).collect();
        let tokens: Vec<i64> = sent.iter().map(|lease| lease.token).collect();
        let query = sqlx::query_as(self.inner.sql.extend_batch.clone())
            .bind(self.now())
            .bind(&ids)
            .bind(&tokens)
            .bind(micros(by));
        let rows: Vec<(JobId, i64, OffsetDateTime)> = self
            .conn()
            .await?
            .run(|c| query.fetch_all(c))
            .await
            .map_err(error_from)?;
        self.inner.vacuum.record(rows.len() as u64);
        let held: HashMap<(JobId, i64), OffsetDateTime> = rows
            .into_iter()
            .map(|(id, token, until)| ((id, token), until))
            .collect();
        Ok(leases
            .iter()
            .map(|lease| held.get(&(lease.job_id, lease.token)).copied())
            .collect())
    }

    async fn release(&self, lease: &Lease) -> Result<()> {
        // The statement notified every process; this one hears at once.
        let (queue,): (String,) = self
            .acknowledge(self.fenced(&self.inner.sql.release, lease), lease)
            .await?;
        self.wake_here(&[queue]);
        Ok(())
    }
}

#[async_trait]
impl Observer for PgBackend {
    async fn get(&self, id: JobId) -> Result<Option<Job>> {
        // A key lookup, bounded as queue operations are: `Worker::wait_for`
        // polls it.
        let query = sqlx::query(self.inner.sql.get.clone()).bind(id);
        let row = self
            .conn()
            .await?
            .run(|c| query.fetch_optional(c))
            .await
            .map_err(error_from)?;
        row.as_ref().map(row::observed).transpose()
    }

    async fn list(&self, filter: &ListFilter) -> Result<JobPage> {
        filter.validate()?;
        let mut query = Query::select();
        query
            .expr(Expr::cust(sql::JOB_COLUMNS))
            .from((Alias::new(self.inner.schema.as_str()), Alias::new("jobs")));
        if let Some(status) = filter.status {
            query.and_where(Expr::col(Alias::new("status")).eq(status.as_str()));
        }
        if let Some(queue) = &filter.queue {
            query.and_where(Expr::col(Alias::new("queue")).eq(queue.as_str()));
        }
        if let Some(kind) = &filter.kind {
            query.and_where(Expr::col(Alias::new("kind")).eq(kind.as_str()));
        }
        if let Some(after) = filter.after {
            query.and_where(Expr::col(Alias::new("id")).gt(after));
        }
        let limit = filter.limit as usize;
        query
            .order_by(Alias::new("id"), Order::Asc)
            .limit(limit as u64 + 1);
        let (sql, values) = query.build_sqlx(PostgresQueryBuilder);
        let rows = sqlx::query_with(AssertSqlSafe(sql), values)
            .fetch_all(&self.inner.pool)
            .await
            .map_err(error_from)?;
        let mut jobs = rows.iter().map(row::observed).collect::<Result<Vec<_>>>()?;
        let next = if jobs.len() > limit {
            jobs.truncate(limit);
            jobs.last().map(|job| job.id)
        } else {
            None
        };
        Ok(JobPage { jobs, next })
    }

    async fn stats(&self) -> Result<Stats> {
        let rows = sqlx::query(self.inner.sql.stats.clone())
            .fetch_all(&self.inner.pool)
            .await
            .map_err(error_from)?;
        let mut stats = Stats::default();
        for row in rows {
            let queue: String = row.try_get("queue").map_err(error_from)?;
            let status: String = row.try_get("status").map_err(error_from)?;
            let n: i64 = row.try_get("n").map_err(error_from)?;
            stats
                .queues
                .entry(queue)
                .or_default()
                .add(row::status(&status)?, n.unsigned_abs());
        }
        Ok(stats)
    }
}

#[async_trait]
impl Cleaner for PgBackend {
    async fn clean(&self, status: JobStatus, before: OffsetDateTime) -> Result<u64> {
        let before = match check_clean(status, before)? {
            Cutoff::Nothing => return Ok(0),
            Cutoff::Before(before) => Some(before),
            Cutoff::Everything => None,
        };
        let mut deleted = 0;
        loop {
            let query = sqlx::query(self.inner.sql.clean.clone())
                .persistent(false)
                .bind(status.as_str())
                .bind(before)
                .bind(CLEAN_CHUNK as i64);
            let chunk = self
                .conn()
                .await?
                .run(|c| query.execute(c))
                .await
                .map_err(error_from)?
                .rows_affected();
            self.inner.vacuum.record(chunk);
            deleted += chunk;
            if chunk < CLEAN_CHUNK {
                return Ok(deleted);
            }
        }
    }
}

#[async_trait]
impl Backend for PgBackend {
    fn capabilities(&self) -> Capabilities {
        Capabilities::none()
            .durable(true)
            .multi_process(true)
            .server_clock(true)
            .transactional_enqueue(true)
            .cross_process_wakeups(true)
            .in_process_wakeups(true)
    }

    async fn subscribe(&self, queues: &[String]) -> Result<Option<Wakeups>> {
        relayq_core::check_queue_names(queues)?;
        self.hub()?.subscribe(queues).await.map(Some)
    }
}
