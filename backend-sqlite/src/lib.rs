//! relayq's SQLite backend, for development and single-host applications.
//!
//! [`SqliteBackend`] stores jobs in one SQLite file (or an in-memory
//! database) and obeys the same contract as the PostgreSQL and memory
//! backends, so an application moves to PostgreSQL by changing its URL.
//!
//! ```no_run
//! use relayq_core::{NewJob, PullRequest, Puller, Pusher};
//! use relayq_sqlite::SqliteBackend;
//! use serde_json::json;
//!
//! # async fn run() -> relayq_core::Result<()> {
//! let queue = SqliteBackend::connect("sqlite://jobs.db").await?;
//! queue.push(NewJob::new("greet", &json!({"name": "Ada"}))).await?;
//! let leased = queue.pull(&PullRequest::queue("default")).await?;
//! queue.complete(&leased[0].lease, None).await?;
//! # Ok(())
//! # }
//! ```
//!
//! # How it uses SQLite
//!
//! - **SQLite 3.37 or newer** ([`MIN_SQLITE_VERSION`]): claims use
//!   `UPDATE … RETURNING` (3.35) and the table is `STRICT` (3.37). sqlx's
//!   `sqlite` feature compiles in its own copy of SQLite (3.51.x with
//!   sqlx 0.9.1 / libsqlite3-sys 0.37), and connecting checks the version.
//! - **WAL**, `synchronous = NORMAL` (or `FULL`, see
//!   [`SqliteOptions::full_sync`]), `foreign_keys = ON`, a busy timeout and
//!   a cap on the log file's size once checkpointed
//!   ([`SqliteOptions::wal_size_limit`]) on every connection: readers never
//!   block the writer or each other.
//! - **Every multi-statement write is one `BEGIN IMMEDIATE` transaction**
//!   (`pull`'s two statements, `complete_batch`'s one and the one `INSERT`
//!   of a push of at most 1,000 jobs without unique keys are each atomic
//!   alone and run in autocommit mode, saving two round trips). It takes the write
//!   lock up front, so a transaction never has to upgrade a read lock
//!   midway — the deadlock-shaped `SQLITE_BUSY` that no busy timeout can
//!   cure. Writers of one process queue on an async mutex instead of
//!   spinning in SQLite's busy handler, and run on one dedicated connection
//!   it guards (its page cache and prepared statements stay warm, and no
//!   pool checkout costs a round trip); writers of other processes wait in
//!   the busy handler. Should `SQLITE_BUSY` or `SQLITE_LOCKED` still come
//!   back (another process held the lock past the busy timeout), the whole
//!   transaction is retried with backoff until the
//!   [lock timeout](SqliteOptions::lock_timeout): it never reaches the caller
//!   as such.
//! - **A claim is one `UPDATE … WHERE id IN (SELECT … ORDER BY priority,
//!   run_at, id LIMIT ?) RETURNING …`**, sent right after the statement
//!   that marks abandoned last-attempt jobs `Dead` (each atomic alone: the
//!   claim's write lock is taken before it reads, so two claims never see
//!   the same pending job). Each queue's
//!   candidates come from partial indexes in pull order, so a claim reads
//!   about `batch` index entries per queue however long the backlog is, plus
//!   one probe per distinct priority of the queue: due jobs are read one
//!   priority level at a time, each level's as an index range, so jobs
//!   scheduled for later are never read (see `claim_sql`).
//!
//!   The plan, from [`SqliteBackend::explain_pull`] for one queue with
//!   100,000 finished jobs in the table (the test
//!   `claims_walk_the_partial_indexes` asserts its shape, for one queue and
//!   for several):
//!
//!   ```text
//!   sweep:
//!   SEARCH relayq_jobs USING INDEX relayq_jobs_lease (queue=? AND locked_until<?)
//!   claim:
//!   SEARCH relayq_jobs USING INTEGER PRIMARY KEY (rowid=?)
//!   LIST SUBQUERY 9
//!     CO-ROUTINE (subquery-8)
//!       COMPOUND QUERY
//!         LEFT-MOST SUBQUERY
//!           CO-ROUTINE (subquery-5)
//!             CO-ROUTINE levels
//!               SETUP
//!                 SCAN CONSTANT ROW
//!                 SCALAR SUBQUERY 1
//!                   SEARCH relayq_jobs USING COVERING INDEX relayq_jobs_claim (queue=?)
//!               RECURSIVE STEP
//!                 SCAN levels
//!                 CORRELATED SCALAR SUBQUERY 3
//!                   SEARCH relayq_jobs USING COVERING INDEX relayq_jobs_claim (queue=? AND priority>?)
//!             SCAN levels
//!             SEARCH j USING COVERING INDEX relayq_jobs_claim (queue=? AND priority=? AND run_at<?)
//!           SCAN (subquery-5)
//!         UNION ALL
//!           CO-ROUTINE (subquery-7)
//!             SEARCH relayq_jobs USING INDEX relayq_jobs_lease (queue=? AND locked_until<?)
//!             USE TEMP B-TREE FOR ORDER BY
//!           SCAN (subquery-7)
//!     SCAN (subquery-8)
//!     USE TEMP B-TREE FOR ORDER BY
//!   ```
//!
//!   Due jobs come from the claim index already in pull order and stop at
//!   the batch; only expired leases (usually none) and the at most
//!   `2 × batch` candidates per queue are sorted. Finished jobs are never read.
//! - Timestamps are `INTEGER` microseconds since the Unix epoch (exact,
//!   sortable, relayq's precision); payloads and results are JSON text.
//!   `now` comes from the host clock ([`relayq_core::SystemClock`]) unless
//!   another [`Clock`] is injected: SQLite has no server clock.
//! - Ids come from `AUTOINCREMENT`, so an id is never reused after `clean`
//!   deletes the newest job, and a stale lease can never match a new job.
//! - A claim that waited for the write lock (another process's write)
//!   more than a tenth of its lease stores its leases ending that much later:
//!   its `now` was read before the wait, and its leases are to run their
//!   whole length from when they are granted.
//!
//! # Cancellation
//!
//! sqlx runs each SQLite statement on the connection's own thread, which
//! finishes a statement it was sent even when the future that sent it is
//! dropped, waiting in SQLite's busy handler included. So a push dropped
//! under a timeout may still store its job (a caller that then pushes it
//! again stores it twice, unless it has a unique key), and a dropped pull
//! may still lease jobs that no one then holds: they come back when their
//! lease ends, the attempt spent. A transaction a dropped call left open
//! is rolled back before its connection is used again. The worker never
//! drops its own pulls or acknowledgements.
//!
//! # In-memory databases
//!
//! `sqlite::memory:` (also `sqlite://:memory:`, `sqlite://?mode=memory`)
//! opens a private in-memory database on a pool of **exactly one
//! connection** that is never closed while the backend lives. An in-memory
//! database lives as long as the connection that opened it, and a second
//! connection would see an empty database of its own; SQLite's shared-cache
//! mode could share it, but it is discouraged by SQLite, uses table-level
//! locks whose `SQLITE_LOCKED` errors ignore the busy timeout, and loses the
//! data whenever the pool closes its last idle connection. With one
//! connection every operation is serialized — which SQLite does for writes
//! anyway — and nothing can be lost. Do not hold a transaction from
//! [`SqliteBackend::pool`] open while awaiting another operation of the same
//! in-memory backend: that operation waits for the one connection.
//!
//! # Transactional enqueue
//!
//! [`SqliteBackend::push_in`] and [`SqliteBackend::push_batch_in`] insert jobs
//! inside the caller's own transaction, so the jobs exist exactly if the
//! caller's other writes commit. Start that transaction with
//! `BEGIN IMMEDIATE` (see [`SqliteBackend::begin`]) so it cannot fail midway
//! with `SQLITE_BUSY_SNAPSHOT`.
//!
//! # Wake-ups
//!
//! [`Backend::subscribe`] signals pushes, releases and retries due at once
//! made through the same backend value (or its clones) at once, through a
//! watch channel that never loses a signal between waits. For a file
//! database it also polls
//! `PRAGMA data_version` on a dedicated connection every
//! [poll interval](SqliteOptions::poll_interval) and signals when another
//! connection or process stored a new job, released a lease or recorded a
//! retry due at once, so workers in other processes wake within one
//! interval.
//!
//! # Throughput
//!
//! The standard workload (`shared/WORKLOAD.md`) on a temporary file, 2 cores,
//! default settings, release build, is measured by the repository's
//! `bench/run`; its README (Performance) and `BENCHMARKS.md` keep the
//! figures of each run, with the machine and the date. Five runs of
//! 2026-12-07 gave a worker (prefetching, concurrency 16) 27,500–43,100
//! finished jobs/s, batches of 1,000 130,000–175,000 jobs/s, and 0.69–0.84
//! ms p50 from enqueue to handler start; three later that day, on a host
//! about twice as fast, 67,300–76,700, 324,000–380,000 and 0.56–0.69 ms.
//!
//! Single pushes include SQLite's automatic checkpoints (two `fsync`s per
//! ~200 pushes), which keep the write-ahead log from growing without bound.

mod options;
mod retry;
mod rows;
mod schema;
mod wakeups;
mod writer;

use std::collections::BTreeSet;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration as StdDuration;

use async_trait::async_trait;
use relayq_core::{
    Backend, Capabilities, Cleaner, Clock, Completion, Cutoff, Error, Job, JobId, JobPage,
    JobStatus, LEASE_EXPIRED_ERROR, Lease, LeasedJob, ListFilter, NewJob, Observer, PullRequest,
    Puller, PushOutcome, Pusher, Result, Stats, Unreadable, ValidJob, Wakeups, check_clean,
    check_lease, check_result, check_retry, check_text, pull_readable, retry_due_at_once,
    truncate_to_micros, validate_batch,
};
use sea_query::{Expr, ExprTrait, Iden, Order, Query, SqliteQueryBuilder};
use sea_query_sqlx::SqlxBinder;
use serde_json::Value;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions};
use sqlx::{AssertSqlSafe, Connection as _, Row, Sqlite, SqliteConnection, Transaction};
use time::{Duration, OffsetDateTime};
use tokio::sync::watch;

pub use options::SqliteOptions;
pub use retry::error_from;
pub use schema::SCHEMA_VERSION;
/// The sqlx this crate is built on, for naming its types
/// ([`sqlx::SqliteConnection`], [`sqlx::Transaction`]) at the same version.
pub use sqlx;

use retry::{Backoff, Fail};
use rows::{COLUMNS, TABLE, Unread, job_from_row, micros, observed_job};
use writer::Writer;

/// URL schemes this backend accepts in a connection URL.
pub const URL_SCHEMES: &[&str] = &["sqlite"];

/// The most jobs one transaction of [`Cleaner::clean`] deletes, holding
/// the write lock for a few tens of milliseconds.
const CLEAN_CHUNK: u64 = 10_000;

/// The oldest SQLite this backend runs on: `RETURNING` needs 3.35 and
/// `STRICT` tables 3.37.
pub const MIN_SQLITE_VERSION: &str = "3.37.0";

/// A job store in one SQLite database. Clones share the pool, the write
/// lock and the wake-up channel.
///
/// Open it with [`SqliteBackend::connect`] or [`SqliteBackend::connect_with`];
/// use it through the core traits ([`Pusher`], [`Puller`], [`Observer`],
/// [`Cleaner`], [`Backend`]).
#[derive(Clone)]
pub struct SqliteBackend {
    shared: Arc<Shared>,
}

pub(crate) struct Shared {
    pool: SqlitePool,
    /// How the pool connects; the wake-up poller opens its own connection.
    connect: SqliteConnectOptions,
    clock: Arc<dyn Clock>,
    in_memory: bool,
    /// Serializes this process's writes, and holds the connection they run
    /// on (see `writer.rs`).
    writer: tokio::sync::Mutex<Writer>,
    lock_timeout: StdDuration,
    poll_interval: StdDuration,
    /// Bumped whenever a job may have become due: a push through this
    /// backend stored one, it released a lease or recorded a retry due at
    /// once, or the poller saw another connection store a job or make one
    /// due again. Subscribers watch it.
    signals: watch::Sender<u64>,
    /// Whether the cross-process poller task runs.
    poller: Mutex<wakeups::PollerState>,
    /// Whether the file is known to have the `relayq_wakeups` counter
    /// (schema version 2 on); looked up at each use until found. A backend
    /// opened without migrating on an older file works without it (other
    /// processes then hear of its releases and retries at their next poll,
    /// as before) until a migration adds it.
    counter: AtomicBool,
    lock_retries: AtomicU64,
}

impl Shared {
    /// Tells subscribers a job may have become due.
    pub(crate) fn signal(&self) {
        self.signals.send_modify(|n| *n = n.wrapping_add(1));
    }
}

impl fmt::Debug for SqliteBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.shared;
        let mut d = f.debug_struct("SqliteBackend");
        if s.in_memory {
            d.field("database", &":memory:");
        } else {
            d.field("database", &s.connect.get_filename());
        }
        d.field("connections", &s.pool.size())
            .field("clock", &s.clock)
            .finish_non_exhaustive()
    }
}

/// Runs `$body` on the write connection `$conn` in autocommit mode, under
/// this process's write lock, with `$now` (when named) read once the lock is
/// held: for writes made of statements that are each correct on their own,
/// so each commits by itself and the `BEGIN` and `COMMIT` round trips to
/// SQLite's worker thread are saved (on the hot paths, `pull` and
/// `complete_batch`, they were most of the cost). `$body` is one attempt:
/// `?` inside it converts driver and relayq errors and ends the attempt; a
/// relayq error ends the operation, a lock error retries the whole body
/// with backoff until the lock timeout.
///
/// Every write goes through here (`write_tx!` too), so the write lock, the
/// retries and the write connection's upkeep live in one place.
macro_rules! write_each {
    ($backend:expr, |$conn:ident, $now:ident| $body:block) => {
        write_each!($backend, |$conn| {
            let $now: OffsetDateTime = $backend.shared.clock.now();
            $body
        })
    };
    ($backend:expr, |$conn:ident| $body:block) => {{
        let shared = &$backend.shared;
        let mut backoff = Backoff::new(shared.lock_timeout);
        loop {
            let attempt: std::result::Result<_, Fail> = async {
                let mut writer = shared.writer.lock().await;
                let attempt: std::result::Result<_, Fail> = async {
                    let mut $conn = writer.conn(shared).await?;
                    Ok($body)
                }
                .await;
                writer.after(&attempt);
                attempt
            }
            .await;
            match attempt {
                Ok(out) => break Ok(out),
                Err(fail) => {
                    if let Err(e) = backoff.after(fail, &shared.lock_retries).await {
                        break Err(e);
                    }
                }
            }
        }
    }};
}

/// Runs `$body` in a `BEGIN IMMEDIATE` transaction `$tx`, as one attempt of
/// `write_each!`, with `$now` read once the transaction holds SQLite's write
/// lock. A relayq error from `$body` rolls back and ends the operation; a
/// lock error retries the whole transaction.
macro_rules! write_tx {
    ($backend:expr, |$tx:ident, $now:ident| $body:block) => {
        write_each!($backend, |conn| {
            let mut $tx = conn.begin_with("BEGIN IMMEDIATE").await?;
            let $now: OffsetDateTime = $backend.shared.clock.now();
            let outcome: std::result::Result<_, Fail> = async { Ok($body) }.await;
            match outcome {
                Ok(out) => {
                    $tx.commit().await?;
                    out
                }
                Err(fail) => {
                    // Roll back before the write lock is released.
                    let _ = $tx.rollback().await;
                    return Err(fail);
                }
            }
        })
    };
}

/// Runs the read `$body` (which uses `$pool`), retrying lock errors.
macro_rules! read {
    ($backend:expr, |$pool:ident| $body:block) => {{
        let shared = &$backend.shared;
        let mut backoff = Backoff::new(shared.lock_timeout);
        loop {
            let $pool = &shared.pool;
            let attempt: std::result::Result<_, Fail> = async { Ok($body) }.await;
            match attempt {
                Ok(out) => break Ok(out),
                Err(fail) => {
                    if let Err(e) = backoff.after(fail, &shared.lock_retries).await {
                        break Err(e);
                    }
                }
            }
        }
    }};
}

impl SqliteBackend {
    /// Opens the database at `url` with default [`SqliteOptions`] and runs
    /// [`Self::migrate`]. A file database is created if missing, unless the
    /// URL says `mode=rw` (open an existing file only) or `mode=ro`.
    ///
    /// A URL this backend cannot use is [`Error::Config`]; a database that
    /// cannot be opened (missing directory, permissions, not a database) is
    /// [`Error::Backend`].
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with(SqliteOptions::new(url)).await
    }

    /// Opens the database described by `options`, then runs
    /// [`Self::migrate`] unless [`SqliteOptions::migrate`] is off.
    pub async fn connect_with(options: SqliteOptions) -> Result<Self> {
        let resolved = options.resolve()?;
        let pool_options = if resolved.in_memory {
            // The one connection holds the database: never let it go.
            SqlitePoolOptions::new()
                .max_connections(1)
                .min_connections(1)
                .idle_timeout(None)
                .max_lifetime(None)
        } else {
            SqlitePoolOptions::new().max_connections(options.max_connections)
        }
        // The checkout ping only asks the connection's own thread whether it
        // still runs (a SQLite connection has no peer to lose): a round trip
        // per read for nothing. A connection whose thread died fails its
        // query and is discarded when it returns to the pool.
        .test_before_acquire(false);
        // Opening a new file, or switching it to WAL, takes locks that
        // other processes may hold: retry those like any other operation.
        let lock_retries = AtomicU64::new(0);
        let mut backoff = Backoff::new(options.lock_timeout);
        let pool = loop {
            match pool_options
                .clone()
                .connect_with(resolved.connect.clone())
                .await
            {
                Ok(pool) => break pool,
                Err(e) => backoff.after(Fail::Db(e), &lock_retries).await?,
            }
        };
        let backend = Self {
            shared: Arc::new(Shared {
                pool,
                connect: resolved.connect,
                clock: options.clock,
                in_memory: resolved.in_memory,
                writer: tokio::sync::Mutex::new(Writer::default()),
                lock_timeout: options.lock_timeout,
                poll_interval: options.poll_interval,
                signals: watch::Sender::new(0),
                poller: Mutex::new(wakeups::PollerState::default()),
                counter: AtomicBool::new(false),
                lock_retries,
            }),
        };
        backend.check_version().await?;
        if options.migrate {
            backend.migrate().await?;
        }
        Ok(backend)
    }

    async fn check_version(&self) -> Result<()> {
        let version: String = read!(self, |pool| {
            sqlx::query_scalar("SELECT sqlite_version()")
                .fetch_one(pool)
                .await?
        })?;
        if parse_version(&version) < parse_version(MIN_SQLITE_VERSION) {
            return Err(Error::config(
                "sqlite_version",
                format!(
                    "SQLite {version} is too old: relayq-sqlite needs {MIN_SQLITE_VERSION} or newer"
                ),
            ));
        }
        Ok(())
    }

    /// Applies every pending migration, idempotently: creates the tables
    /// on first use, only reads the version when up to date (so a
    /// connection that cannot write opens a migrated file). Migrates in one
    /// `BEGIN IMMEDIATE` transaction, which holds the write lock from the
    /// start, so concurrent callers in any number of processes are safe. A
    /// schema newer than this crate knows is [`Error::SchemaTooNew`].
    ///
    /// Upgrading processes that share a file one at a time: the first one
    /// that migrates makes the file newer than the others know, and an
    /// older process that then restarts with migrations on refuses to
    /// start; run the older ones with [`SqliteOptions::migrate`] off until
    /// all are upgraded. Version 2 (the `relayq_wakeups` counter) only adds
    /// a table, so older processes run on it unchanged, but their
    /// releases and retries wake other processes only at their next poll.
    pub async fn migrate(&self) -> Result<()> {
        // Answered by a read when there is nothing to do, so that a
        // connection that cannot write (`mode=ro`, a file this user may
        // only read) opens a migrated file; the write lock is taken only
        // to migrate, and the version read again under it.
        let current = read!(self, |pool| {
            let mut conn = pool.acquire().await?;
            let current = schema::current_version(&mut conn).await?;
            schema::check_not_newer(current)?;
            current
        })?;
        if current == schema::latest_version() {
            return Ok(());
        }
        write_tx!(self, |tx, now| { schema::migrate(&mut tx, now).await? }).map(drop)
    }

    /// The schema version recorded in `relayq_schema_versions` (0 before
    /// the first migration); [`SCHEMA_VERSION`] once migrated.
    pub async fn schema_version(&self) -> Result<i32> {
        let version = read!(self, |pool| {
            let mut conn = pool.acquire().await?;
            schema::current_version(&mut conn).await?
        })?;
        i32::try_from(version)
            .map_err(|_| Error::backend(format!("schema version {version} out of range")))
    }

    /// The connection pool, e.g. to begin a transaction for
    /// [`Self::push_in`]. Prefer [`Self::begin`], which starts it with
    /// `BEGIN IMMEDIATE`.
    pub fn pool(&self) -> &SqlitePool {
        &self.shared.pool
    }

    /// Begins a `BEGIN IMMEDIATE` transaction on a pooled connection, for the
    /// caller's own writes plus [`Self::push_in`]. It holds the database's
    /// write lock until it commits or rolls back, so keep it short: every
    /// other write meanwhile, this process's included (pushes through the
    /// backend rather than [`Self::push_in`], claims, its workers' lease
    /// renewals), waits for it, for up to the
    /// [lock timeout](SqliteOptions::lock_timeout). Inside it, push with
    /// [`Self::push_in`], and await no other write of this backend: that
    /// write would wait for the transaction, which waits for it. Lock errors
    /// while beginning are retried like any other write.
    pub async fn begin(&self) -> Result<Transaction<'static, Sqlite>> {
        read!(self, |pool| { pool.begin_with("BEGIN IMMEDIATE").await? })
    }

    /// Enqueues `job` inside the caller's open transaction on `conn`: the
    /// job is stored if and only if that transaction commits. Validation,
    /// defaults and unique keys work as in [`Pusher::push`]. Start the
    /// transaction with `BEGIN IMMEDIATE` ([`Self::begin`]); a lock error
    /// here is returned as a transient [`Error::Backend`] since only the
    /// caller can retry its transaction.
    pub async fn push_in(&self, conn: &mut SqliteConnection, job: NewJob) -> Result<PushOutcome> {
        let mut outcomes = self.push_batch_in(conn, vec![job]).await?;
        outcomes
            .pop()
            .ok_or_else(|| Error::backend("a one-job push returned no outcome"))
    }

    /// Enqueues `jobs` inside the caller's open transaction on `conn`, like
    /// [`Pusher::push_batch`]: one invalid job rejects them all before
    /// anything is written, and a batch that fails partway (several
    /// statements: more than 1,000 jobs, or jobs with unique keys) leaves
    /// none of its jobs in the transaction.
    pub async fn push_batch_in(
        &self,
        conn: &mut SqliteConnection,
        jobs: Vec<NewJob>,
    ) -> Result<Vec<PushOutcome>> {
        let jobs = validate_batch(jobs)?;
        let now = self.shared.clock.now();
        let outcomes = insert_jobs_whole(conn, &jobs, now)
            .await
            .map_err(|fail| match fail {
                Fail::Core(e) => e,
                Fail::Db(e) => error_from(e),
            })?;
        // The insert holds the write lock until the caller's transaction
        // ends, so a woken worker's pull waits for the commit and sees the job.
        self.notify_pushed(&outcomes);
        Ok(outcomes)
    }

    /// The query plans of the two statements `pull` runs for `request` —
    /// the sweep of abandoned last attempts, then the claim — from
    /// `EXPLAIN QUERY PLAN`, for checking that claims walk the partial
    /// indexes (see the crate docs). Nothing is executed or leased.
    pub async fn explain_pull(&self, request: &PullRequest) -> Result<String> {
        request.validate()?;
        let statements = PullStatements::new(request);
        let now = self.shared.clock.now();
        let until = later(now, request.lease, "lease")?;
        let (sweep, claim) = read!(self, |pool| {
            let sweep = statements
                .sweep_with("EXPLAIN QUERY PLAN ", now)
                .fetch_all(pool)
                .await?;
            let claim = statements
                .claim_with("EXPLAIN QUERY PLAN ", now, until)
                .fetch_all(pool)
                .await?;
            (sweep, claim)
        })?;
        Ok(format!(
            "sweep:\n{}\nclaim:\n{}",
            render_plan(&sweep)?,
            render_plan(&claim)?
        ))
    }

    /// Settles the database after a bulk load or a large `clean`: refreshes
    /// the query planner's statistics (`PRAGMA optimize`) and copies the
    /// write-ahead log into the database file, truncating it
    /// (`PRAGMA wal_checkpoint(TRUNCATE)`; readers still open in other
    /// processes may keep part of the log, which SQLite checkpoints later).
    /// Safe at any time; nothing changes for readers.
    pub async fn checkpoint(&self) -> Result<()> {
        write_each!(self, |conn| {
            sqlx::query("PRAGMA optimize").execute(&mut *conn).await?;
            if !self.shared.in_memory {
                sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
                    .execute(&mut *conn)
                    .await?;
            }
        })
    }

    /// How many times an operation was retried because the database was
    /// locked, since this backend was opened (shared by its clones). For
    /// monitoring lock contention between processes.
    pub fn lock_retries(&self) -> u64 {
        self.shared.lock_retries.load(Ordering::Relaxed)
    }

    /// Closes every connection; later operations fail.
    pub async fn close(&self) {
        // Closing the pool first makes every later write fail instead of
        // reopening the write connection.
        self.shared.pool.close().await;
        let writer = self.shared.writer.lock().await.take();
        if let Some(conn) = writer {
            let _ = conn.close().await;
        }
    }

    fn notify_pushed(&self, outcomes: &[PushOutcome]) {
        if outcomes.iter().any(|o| !o.is_duplicate()) {
            self.shared.signal();
        }
    }
}

/// "3.51.3" as (3, 51, 3); missing or bad parts count as 0.
fn parse_version(v: &str) -> (u32, u32, u32) {
    let mut parts = v.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let mut next = || parts.next().unwrap_or(0);
    (next(), next(), next())
}

/// Inserts `jobs` in order on `conn`, inside whatever transaction it holds.
/// [`insert_jobs`] in a transaction of its own when it takes more than
/// one statement (a savepoint inside the caller's transaction), so that a
/// failure partway rolls back the statements before it: the caller's
/// transaction, which may go on and commit, holds all of the jobs or none.
/// sqlx's transaction is rolled back should this future be dropped midway,
/// and counts its depth with the caller's own. (A transaction the caller
/// began with a raw `BEGIN`, unknown to sqlx, refuses a nested `BEGIN`:
/// there the batch goes in as before, statement by statement.)
async fn insert_jobs_whole(
    conn: &mut SqliteConnection,
    jobs: &[ValidJob],
    now: OffsetDateTime,
) -> Result<Vec<PushOutcome>, Fail> {
    let one_statement = jobs.len() <= INSERT_CHUNK
        && (jobs.len() == 1 || jobs.iter().all(|job| job.unique_key.is_none()));
    if one_statement {
        return insert_jobs(conn, jobs, now).await;
    }
    let Ok(mut tx) = sqlx::Connection::begin(&mut *conn).await else {
        return insert_jobs(conn, jobs, now).await;
    };
    let outcomes = insert_jobs(&mut tx, jobs, now).await?;
    tx.commit().await?;
    Ok(outcomes)
}

async fn insert_jobs(
    conn: &mut SqliteConnection,
    jobs: &[ValidJob],
    now: OffsetDateTime,
) -> Result<Vec<PushOutcome>, Fail> {
    // Every schedule first: one that does not fit fails the batch before
    // anything is written, also in a caller's transaction (begun with a
    // raw `BEGIN`) that would keep the statements before it.
    let run_ats = jobs
        .iter()
        .map(|job| job.run_at(now).map(micros))
        .collect::<relayq_core::Result<Vec<i64>>>()?;
    if jobs.iter().all(|job| job.unique_key.is_none()) {
        return insert_keyless(conn, jobs, &run_ats, now).await;
    }
    let mut outcomes = Vec::with_capacity(jobs.len());
    for (job, run_at) in jobs.iter().zip(run_ats) {
        // `ON CONFLICT DO NOTHING` covers the partial unique index on
        // (queue, unique_key) of active jobs: a duplicate inserts nothing.
        let id: Option<i64> = sqlx::query_scalar(
            "INSERT INTO relayq_jobs (queue, kind, payload, priority, status, attempts, \
             max_attempts, lease_token, run_at, unique_key, created_at, updated_at) \
             VALUES (?, ?, ?, ?, 'pending', 0, ?, 0, ?, ?, ?, ?) \
             ON CONFLICT DO NOTHING RETURNING id",
        )
        .bind(&job.queue)
        .bind(&job.kind)
        .bind(job.payload.as_str())
        .bind(i64::from(job.priority))
        .bind(job.max_attempts)
        .bind(run_at)
        .bind(&job.unique_key)
        .bind(micros(now))
        .bind(micros(now))
        .fetch_optional(&mut *conn)
        .await?;
        let outcome = match (id, &job.unique_key) {
            (Some(id), _) => PushOutcome::Created(id),
            (None, Some(key)) => {
                let existing: i64 = sqlx::query_scalar(
                    "SELECT id FROM relayq_jobs WHERE queue = ? AND unique_key = ? \
                     AND status IN ('pending', 'processing')",
                )
                .bind(&job.queue)
                .bind(key)
                .fetch_one(&mut *conn)
                .await?;
                PushOutcome::Duplicate(existing)
            }
            (None, None) => {
                return Err(Fail::Core(Error::backend(
                    "an insert without a unique key stored nothing",
                )));
            }
        };
        outcomes.push(outcome);
    }
    Ok(outcomes)
}

/// The most rows in one multi-row `INSERT` (8 parameters each, well under
/// SQLite's 32,766-parameter limit). A push of up to this many keyless jobs
/// is one statement, so it needs no transaction.
const INSERT_CHUNK: usize = 1_000;

/// Inserts jobs without unique keys (nothing can conflict) with multi-row
/// `INSERT`s, a statement per [`INSERT_CHUNK`] jobs instead of one per job.
///
/// The ids are not returned row by row (each `RETURNING` row is a message
/// from SQLite's worker thread, most of a large batch's cost): with
/// `AUTOINCREMENT` every row of one statement gets the largest id so far
/// plus one, in `VALUES` order, and no other connection can write while
/// one statement runs, so a statement's ids are the consecutive run ending
/// at its last inserted rowid.
async fn insert_keyless(
    conn: &mut SqliteConnection,
    jobs: &[ValidJob],
    run_ats: &[i64],
    now: OffsetDateTime,
) -> Result<Vec<PushOutcome>, Fail> {
    let mut outcomes = Vec::with_capacity(jobs.len());
    for (chunk, run_ats) in jobs.chunks(INSERT_CHUNK).zip(run_ats.chunks(INSERT_CHUNK)) {
        let values =
            vec!["(?, ?, ?, ?, 'pending', 0, ?, 0, ?, NULL, ?, ?)"; chunk.len()].join(", ");
        let sql = format!(
            "INSERT INTO {TABLE} (queue, kind, payload, priority, status, attempts, \
             max_attempts, lease_token, run_at, unique_key, created_at, updated_at) \
             VALUES {values}"
        );
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for (job, run_at) in chunk.iter().zip(run_ats) {
            query = query
                .bind(&job.queue)
                .bind(&job.kind)
                .bind(job.payload.as_str())
                .bind(i64::from(job.priority))
                .bind(job.max_attempts)
                .bind(*run_at)
                .bind(micros(now))
                .bind(micros(now));
        }
        let done = query.execute(&mut *conn).await?;
        // A chunk holds at most INSERT_CHUNK rows: the casts cannot truncate.
        let n = chunk.len() as i64;
        if done.rows_affected() != chunk.len() as u64 {
            return Err(Fail::Core(Error::backend(format!(
                "a multi-row insert stored {} of {n} jobs",
                done.rows_affected(),
            ))));
        }
        let last = done.last_insert_rowid();
        outcomes.extend((last - n + 1..=last).map(PushOutcome::Created));
    }
    Ok(outcomes)
}

/// Marks `Dead` every expired lease on its last attempt in the named queues.
fn sweep_sql(queues: usize) -> String {
    let marks = vec!["?"; queues].join(", ");
    format!(
        "UPDATE {TABLE} SET status = 'dead', last_error = ?, locked_until = NULL, updated_at = ? \
         WHERE status = 'processing' AND queue IN ({marks}) AND locked_until < ? \
         AND attempts >= max_attempts"
    )
}

/// Leases up to `batch` eligible jobs of the named queues in pull order.
/// Each queue contributes its first `batch` due pending jobs and its first
/// `batch` expired leases.
///
/// A queue's due jobs are read one priority level at a time: `levels`
/// walks the queue's distinct priorities up from the lowest, one index probe
/// each, and only as far as the claim reads (`NOT MATERIALIZED` keeps it a
/// co-routine: materialized, it would probe every level of the queue on
/// every claim); at each level the due jobs are an index range,
/// `run_at <= now`, in `(run_at, id)` order. `CROSS JOIN` keeps `levels` the
/// outer loop and `INDEXED BY` the claim index the inner one, so the rows
/// come in pull order and the `LIMIT` stops the walk (an `ORDER BY` here
/// would sort every due job first; the conformance case
/// `small_batches_take_due_jobs_in_pull_order_past_scheduled_ones` checks
/// the order where the `LIMIT` cuts). A
/// plain walk of the claim index in `(priority, run_at, id)` order could
/// only filter on `run_at`: it read every job scheduled for later at a
/// level (delayed, or retrying after a backoff) before the next level, and
/// all of them whenever fewer jobs were due than the batch, holding the
/// database's write lock all the while: 13 ms per claim with 200,000 jobs
/// scheduled for the next day, against 0.35 ms now (and 30 µs against
/// 28 µs for a batch of 64 from a backlog of due jobs).
///
/// The limits are written `+?`, not `?`: SQLite (since 3.47) reads a bare
/// bound `LIMIT ?` while planning, which marks the statement to be
/// recompiled whenever that parameter is bound again — on every execution,
/// since sqlx rebinds each time. Recompiling this statement was an eighth
/// of the CPU a worker draining a queue used; `+?` is evaluated at run time
/// like any other expression, so the prepared statement is reused.
fn claim_sql(queues: usize) -> String {
    let branch = format!(
        "SELECT id, priority, run_at FROM (WITH RECURSIVE levels(p) AS NOT MATERIALIZED ( \
             SELECT (SELECT priority FROM {TABLE} INDEXED BY relayq_jobs_claim \
                     WHERE status = 'pending' AND queue = ? ORDER BY priority LIMIT 1) \
             UNION ALL \
             SELECT (SELECT priority FROM {TABLE} INDEXED BY relayq_jobs_claim \
                     WHERE status = 'pending' AND queue = ? AND priority > levels.p \
                     ORDER BY priority LIMIT 1) \
             FROM levels WHERE levels.p IS NOT NULL) \
         SELECT j.id, j.priority, j.run_at \
         FROM levels CROSS JOIN {TABLE} AS j INDEXED BY relayq_jobs_claim \
         WHERE j.status = 'pending' AND j.queue = ? AND j.priority = levels.p \
         AND j.run_at <= ? LIMIT +?) \
         UNION ALL \
         SELECT id, priority, run_at FROM (SELECT id, priority, run_at FROM {TABLE} \
         WHERE status = 'processing' AND queue = ? AND locked_until < ? \
         AND attempts < max_attempts ORDER BY priority, run_at, id LIMIT +?)"
    );
    let branches = vec![branch; queues].join(" UNION ALL ");
    format!(
        "UPDATE {TABLE} SET status = 'processing', attempts = attempts + 1, \
         lease_token = lease_token + 1, locked_until = ? + {WAITED}, updated_at = ? \
         WHERE id IN (SELECT id FROM ({branches}) ORDER BY priority, run_at, id LIMIT +?) \
         RETURNING {COLUMNS}"
    )
}

/// How long (µs) a claim waited for the file's write lock, when that is
/// more than its bound threshold (first parameter; else 0): the host's
/// time as SQLite reads it at the claim (to the millisecond) less the
/// time the pull read when it bound the claim (second parameter). The
/// claim's `now`, and so its lease's end, was read before SQLite's busy
/// handler waited for another process's write: its leases would end that
/// much sooner than asked, and, had the wait outlasted them, have ended
/// already when they were granted, free for any other puller to take (or,
/// a last attempt, to mark dead unrun). They end the wait later instead.
/// Measured on the host's clock even where a clock is injected: the wait
/// is real time. Below the threshold, as always without contention, the
/// lease ends exactly at `now + lease`.
const WAITED: &str = "(SELECT CASE WHEN w > ? THEN w ELSE 0 END FROM \
     (SELECT CAST((julianday('now') - 2440587.5) * 86400000000.0 AS INTEGER) - ? AS w))";

/// The two statements of one `pull`, built for its distinct queues.
struct PullStatements<'r> {
    queues: Vec<&'r str>,
    batch: i64,
    sweep: String,
    claim: String,
    /// The sweep, then the claim, as one SQL text: sqlx runs both in one
    /// request to the connection's worker thread, a round trip less.
    both: String,
}

type SqliteQuery<'q> = sqlx::query::Query<'q, Sqlite, sqlx::sqlite::SqliteArguments>;

impl<'r> PullStatements<'r> {
    fn new(request: &'r PullRequest) -> Self {
        let queues: Vec<&str> = request
            .queues
            .iter()
            .map(String::as_str)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let sweep = sweep_sql(queues.len());
        let claim = claim_sql(queues.len());
        Self {
            batch: i64::from(request.batch),
            both: format!("{sweep}; {claim}"),
            sweep,
            claim,
            queues,
        }
    }

    /// Marks the abandoned last attempts of the queues `Dead`, then leases
    /// the jobs, returning them: two statements, each atomic alone.
    fn sweep_and_claim(&self, now: OffsetDateTime, until: OffsetDateTime) -> SqliteQuery<'_> {
        let query = sqlx::query(AssertSqlSafe(self.both.as_str()));
        self.bind_claim(self.bind_sweep(query, now), now, until)
    }

    fn sweep_with(&self, prefix: &str, now: OffsetDateTime) -> SqliteQuery<'_> {
        let sql = format!("{prefix}{}", self.sweep);
        self.bind_sweep(sqlx::query(AssertSqlSafe(sql)), now)
    }

    fn bind_sweep<'q>(&'q self, query: SqliteQuery<'q>, now: OffsetDateTime) -> SqliteQuery<'q> {
        let mut query = query.bind(LEASE_EXPIRED_ERROR).bind(micros(now));
        for queue in &self.queues {
            query = query.bind(*queue);
        }
        query.bind(micros(now))
    }

    fn claim_with(
        &self,
        prefix: &str,
        now: OffsetDateTime,
        until: OffsetDateTime,
    ) -> SqliteQuery<'_> {
        let sql = format!("{prefix}{}", self.claim);
        self.bind_claim(sqlx::query(AssertSqlSafe(sql)), now, until)
    }

    fn bind_claim<'q>(
        &'q self,
        query: SqliteQuery<'q>,
        now: OffsetDateTime,
        until: OffsetDateTime,
    ) -> SqliteQuery<'q> {
        // A wait of a tenth of the lease is put right (see `WAITED`).
        let threshold: time::Duration = (until - now) / 10;
        let mut query = query
            .bind(micros(until))
            .bind(i64::try_from(threshold.whole_microseconds()).unwrap_or(i64::MAX))
            .bind(micros(OffsetDateTime::now_utc()))
            .bind(micros(now));
        for queue in &self.queues {
            query = query
                .bind(*queue)
                .bind(*queue)
                .bind(*queue)
                .bind(micros(now))
                .bind(self.batch)
                .bind(*queue)
                .bind(micros(now))
                .bind(self.batch);
        }
        query.bind(self.batch)
    }
}

/// Renders `EXPLAIN QUERY PLAN` rows (id, parent, notused, detail) as an
/// indented tree, like the `sqlite3` shell does.
fn render_plan(rows: &[sqlx::sqlite::SqliteRow]) -> Result<String> {
    let mut depth_of: std::collections::HashMap<i64, usize> = std::collections::HashMap::new();
    let mut lines = Vec::with_capacity(rows.len());
    for row in rows {
        let id: i64 = row.try_get(0).map_err(Error::backend)?;
        let parent: i64 = row.try_get(1).map_err(Error::backend)?;
        let detail: String = row.try_get(3).map_err(Error::backend)?;
        let depth = depth_of.get(&parent).map_or(0, |d| d + 1);
        depth_of.insert(id, depth);
        lines.push(format!("{}{detail}", "  ".repeat(depth)));
    }
    Ok(lines.join("\n"))
}

/// `at + by`, or `InvalidInput` naming `field` when out of range.
fn later(at: OffsetDateTime, by: Duration, field: &'static str) -> Result<OffsetDateTime> {
    at.checked_add(by)
        .ok_or_else(|| Error::invalid(field, "puts the time out of range"))
}

#[async_trait]
impl Pusher for SqliteBackend {
    async fn push(&self, job: NewJob) -> Result<PushOutcome> {
        let mut outcomes = self.push_batch(vec![job]).await?;
        outcomes
            .pop()
            .ok_or_else(|| Error::backend("a one-job push returned no outcome"))
    }

    async fn push_batch(&self, jobs: Vec<NewJob>) -> Result<Vec<PushOutcome>> {
        let jobs = validate_batch(jobs)?;
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        // Keyless jobs that fit one INSERT are one atomic statement: no
        // transaction needed (saves the BEGIN and COMMIT round trips).
        let one_statement =
            jobs.len() <= INSERT_CHUNK && jobs.iter().all(|job| job.unique_key.is_none());
        let outcomes = if one_statement {
            write_each!(self, |conn, now| {
                insert_jobs(&mut conn, &jobs, now).await?
            })?
        } else {
            write_tx!(self, |tx, now| { insert_jobs(&mut tx, &jobs, now).await? })?
        };
        self.notify_pushed(&outcomes);
        Ok(outcomes)
    }
}

impl SqliteBackend {
    /// Marks `job` dead, as `kill` does, its unreadable column replaced by
    /// [`Unreadable::readable`].
    async fn kill_unreadable(&self, job: Unreadable) -> Result<()> {
        let sql = match job.column {
            "result" => {
                "UPDATE relayq_jobs SET status = 'dead', last_error = ?, result = ?, \
                 locked_until = NULL, updated_at = ? \
                 WHERE id = ? AND status = 'processing' AND lease_token = ?"
            }
            _ => {
                "UPDATE relayq_jobs SET status = 'dead', last_error = ?, payload = ?, \
                 locked_until = NULL, updated_at = ? \
                 WHERE id = ? AND status = 'processing' AND lease_token = ?"
            }
        };
        fenced(
            self,
            &job.lease,
            sql,
            &[&job.reason, &job.readable],
            Due::No,
        )
        .await
    }

    /// One claim for [`Puller::pull`]: the jobs it leased and read, and
    /// those it leased but could not read (killed by `pull_readable` once
    /// the write lock is released: each kill takes it).
    async fn claim(&self, request: PullRequest) -> Result<(Vec<LeasedJob>, Vec<Unreadable>)> {
        let statements = PullStatements::new(&request);
        // Two statements, each atomic alone: the sweep only marks abandoned
        // last attempts `Dead`, and the claim never leases one itself.
        write_each!(self, |conn, now| {
            let until = later(now, request.lease, "lease")?;
            let rows = statements
                .sweep_and_claim(now, until)
                .fetch_all(&mut *conn)
                .await?;
            let mut leased = Vec::with_capacity(rows.len());
            let mut unreadable = Vec::new();
            for row in &rows {
                match job_from_row(row) {
                    Ok(job) => leased.push(LeasedJob::from(job)),
                    Err(Unread::Json(job)) => unreadable.push(job),
                    Err(Unread::Fail(e)) => return Err(e),
                }
            }
            (leased, unreadable)
        })
    }
}

#[async_trait]
impl Puller for SqliteBackend {
    async fn pull(&self, request: &PullRequest) -> Result<Vec<LeasedJob>> {
        request.validate()?;
        // Sorted there: RETURNING yields rows in no promised order.
        pull_readable(
            request,
            |round| self.claim(round),
            |job| self.kill_unreadable(job),
        )
        .await
    }

    async fn complete(&self, lease: &Lease, result: Option<Value>) -> Result<()> {
        check_result(result.as_ref())?;
        let result = result.map(|r| r.to_string());
        let lost = write_tx!(self, |tx, now| {
            complete_one(&mut tx, lease, result.as_deref(), now).await?
        })?;
        if lost { Err(lease.lost()) } else { Ok(()) }
    }

    async fn complete_batch(&self, completions: Vec<Completion>) -> Result<Vec<Lease>> {
        for c in &completions {
            check_result(c.result.as_ref())?;
        }
        if completions.is_empty() {
            return Ok(Vec::new());
        }
        let leases: Vec<Lease> = completions.iter().map(|c| c.lease).collect();
        // One JSON array of [id, token, result text] rows, bound once: one
        // statement for the whole batch instead of one per job. A lease
        // named twice is sent once, with its first result: the UPDATE would
        // take any of its rows.
        let mut named = std::collections::HashSet::with_capacity(leases.len());
        let rows: Vec<Value> = completions
            .into_iter()
            .filter(|c| named.insert((c.lease.job_id, c.lease.token)))
            .map(|c| {
                let result = c.result.map(|r| Value::String(r.to_string()));
                Value::Array(vec![
                    c.lease.job_id.into(),
                    c.lease.token.into(),
                    result.unwrap_or(Value::Null),
                ])
            })
            .collect();
        let rows = Value::Array(rows).to_string();
        let done: Vec<(i64, i64)> = write_each!(self, |conn, now| {
            sqlx::query_as(COMPLETE_BATCH_SQL)
                .bind(micros(now))
                .bind(&rows)
                .fetch_all(&mut *conn)
                .await?
        })?;
        Ok(lost_leases(&leases, &done))
    }

    async fn retry(&self, lease: &Lease, delay: Duration, error: &str) -> Result<JobStatus> {
        check_retry(delay, error)?;
        let due_at_once = retry_due_at_once(delay);
        let status: Option<String> = write_tx!(self, |tx, now| {
            let run_at = later(now, delay, "delay")?;
            let status: Option<String> = sqlx::query_scalar(
                "UPDATE relayq_jobs SET \
                 status = CASE WHEN attempts >= max_attempts THEN 'dead' ELSE 'pending' END, \
                 run_at = CASE WHEN attempts >= max_attempts THEN run_at ELSE ? END, \
                 last_error = ?, locked_until = NULL, updated_at = ? \
                 WHERE id = ? AND status = 'processing' AND lease_token = ? \
                 RETURNING status",
            )
            .bind(micros(run_at))
            .bind(error)
            .bind(micros(now))
            .bind(lease.job_id)
            .bind(lease.token)
            .fetch_optional(&mut *tx)
            .await?;
            if status.as_deref() == Some("pending") && due_at_once {
                wakeups::announce(&self.shared, &mut tx).await?;
            }
            status
        })?;
        let status: JobStatus = match status {
            Some(status) => status.parse().map_err(|_| {
                Error::backend(format!("retry stored an unknown status {status:?}"))
            })?,
            None => return Err(lease.lost()),
        };
        if status == JobStatus::Pending && due_at_once {
            self.shared.signal();
        }
        Ok(status)
    }

    async fn kill(&self, lease: &Lease, error: &str) -> Result<()> {
        check_text("error", error)?;
        fenced(
            self,
            lease,
            "UPDATE relayq_jobs SET status = 'dead', last_error = ?, locked_until = NULL, \
             updated_at = ? WHERE id = ? AND status = 'processing' AND lease_token = ?",
            &[error],
            Due::No,
        )
        .await
    }

    async fn extend_batch(
        &self,
        leases: &[Lease],
        by: Duration,
    ) -> Result<Vec<Option<OffsetDateTime>>> {
        check_lease("by", by)?;
        if leases.is_empty() {
            // Still refused when it would put a lease out of range.
            later(self.shared.clock.now(), by, "by")?;
            return Ok(Vec::new());
        }
        // One statement for all (one commit, one turn at the file's write
        // lock, which every other writer queues for), the leases bound as
        // one JSON array of [id, token] pairs, as `complete_batch` does. In
        // a transaction begun with the file's lock, so that `now` is read
        // once it is held: a renewal waiting for another process's write
        // would otherwise end that much sooner than asked.
        let pairs = Value::Array(
            leases
                .iter()
                .map(|lease| Value::Array(vec![lease.job_id.into(), lease.token.into()]))
                .collect(),
        )
        .to_string();
        let (until, held): (OffsetDateTime, Vec<(i64, i64)>) = write_tx!(self, |tx, now| {
            // As stored: whole microseconds.
            let until = truncate_to_micros(later(now, by, "by")?);
            let held = sqlx::query_as(EXTEND_BATCH_SQL)
                .bind(micros(until))
                .bind(micros(now))
                .bind(&pairs)
                .fetch_all(&mut *tx)
                .await?;
            (until, held)
        })?;
        // A lease named twice was renewed once: both entries report its end.
        let held: std::collections::HashSet<(i64, i64)> = held.into_iter().collect();
        Ok(leases
            .iter()
            .map(|lease| held.contains(&(lease.job_id, lease.token)).then_some(until))
            .collect())
    }

    async fn release(&self, lease: &Lease) -> Result<()> {
        fenced(
            self,
            lease,
            "UPDATE relayq_jobs SET status = 'pending', attempts = attempts - 1, \
             locked_until = NULL, updated_at = ? \
             WHERE id = ? AND status = 'processing' AND lease_token = ?",
            &[],
            Due::Again,
        )
        .await
    }
}

/// Completes every `[id, token, result]` of the JSON array `?2` whose lease
/// holds, in one statement; returns the (id, token) of each job completed.
/// Within one batch, entries for one job with the same token write the same
/// row once (SQLite uses one of them: the worker never sends two).
///
/// `NOT INDEXED` leaves SQLite one good plan: walk the batch and look each
/// job up by id. Otherwise statistics gathered while few jobs were leased
/// (`checkpoint` after a bulk load runs `PRAGMA optimize`) make the lease
/// index look free to scan, and SQLite walked every leased job and, for
/// each, the whole batch: quadratic, most of a worker's CPU at 256-job batches.
const COMPLETE_BATCH_SQL: &str = "UPDATE relayq_jobs NOT INDEXED SET status = 'done', \
     result = c.result, \
     locked_until = NULL, updated_at = ?1 \
     FROM (SELECT json_extract(value, '$[0]') AS id, json_extract(value, '$[1]') AS token, \
           json_extract(value, '$[2]') AS result FROM json_each(?2)) AS c \
     WHERE relayq_jobs.id = c.id AND relayq_jobs.lease_token = c.token \
     AND relayq_jobs.status = 'processing' \
     RETURNING relayq_jobs.id, relayq_jobs.lease_token";

/// Moves the end of every `[id, token]` lease of the JSON array `?3` that
/// is held to `?1` (and the job's `updated_at` to `?2`), in one statement;
/// returns the (id, token) of each renewed. A lease named twice is renewed
/// once. `NOT INDEXED` for the reason [`COMPLETE_BATCH_SQL`] gives.
const EXTEND_BATCH_SQL: &str = "UPDATE relayq_jobs NOT INDEXED SET locked_until = ?1, \
     updated_at = ?2 \
     FROM (SELECT json_extract(value, '$[0]') AS id, json_extract(value, '$[1]') AS token \
           FROM json_each(?3)) AS e \
     WHERE relayq_jobs.id = e.id AND relayq_jobs.lease_token = e.token \
     AND relayq_jobs.status = 'processing' \
     RETURNING relayq_jobs.id, relayq_jobs.lease_token";

/// The leases of a batch that were not completed, given the (id, token) of
/// the jobs that were: of several entries for one completed job, only the
/// first holding its token counts, as if they were applied in order.
fn lost_leases(leases: &[Lease], done: &[(i64, i64)]) -> Vec<Lease> {
    let mut done: std::collections::HashSet<(i64, i64)> = done.iter().copied().collect();
    leases
        .iter()
        .filter(|lease| !done.remove(&(lease.job_id, lease.token)))
        .copied()
        .collect()
}

/// Completes one job; returns whether its lease was lost.
async fn complete_one(
    conn: &mut SqliteConnection,
    lease: &Lease,
    result: Option<&str>,
    now: OffsetDateTime,
) -> Result<bool, Fail> {
    let done = sqlx::query(
        "UPDATE relayq_jobs SET status = 'done', result = ?, locked_until = NULL, updated_at = ? \
         WHERE id = ? AND status = 'processing' AND lease_token = ?",
    )
    .bind(result)
    .bind(micros(now))
    .bind(lease.job_id)
    .bind(lease.token)
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected() == 0)
}

/// Whether a fenced write makes its job due.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Due {
    /// It does not: subscribers are not told.
    No,
    /// It does: subscribers here and in other processes are told.
    Again,
}

/// Runs a fenced `UPDATE` whose parameters are `first…, updated_at, id,
/// token`: `LeaseLost` when it matched no row.
async fn fenced(
    backend: &SqliteBackend,
    lease: &Lease,
    sql: &'static str,
    first: &[&str],
    due: Due,
) -> Result<()> {
    let changed = write_tx!(backend, |tx, now| {
        let mut query = sqlx::query(sql);
        for text in first {
            query = query.bind(*text);
        }
        let changed = query
            .bind(micros(now))
            .bind(lease.job_id)
            .bind(lease.token)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if changed == 1 && due == Due::Again {
            wakeups::announce(&backend.shared, &mut tx).await?;
        }
        changed
    })?;
    if changed != 1 {
        return Err(lease.lost());
    }
    if due == Due::Again {
        backend.shared.signal();
    }
    Ok(())
}

/// The jobs table and its columns, for sea-query.
#[derive(Iden, Clone, Copy)]
enum Jobs {
    #[iden = "relayq_jobs"]
    Table,
    Id,
    Queue,
    Kind,
    Payload,
    Priority,
    Status,
    Attempts,
    MaxAttempts,
    LeaseToken,
    RunAt,
    LockedUntil,
    UniqueKey,
    LastError,
    Result,
    CreatedAt,
    UpdatedAt,
}

const ALL_COLUMNS: [Jobs; 16] = [
    Jobs::Id,
    Jobs::Queue,
    Jobs::Kind,
    Jobs::Payload,
    Jobs::Priority,
    Jobs::Status,
    Jobs::Attempts,
    Jobs::MaxAttempts,
    Jobs::LeaseToken,
    Jobs::RunAt,
    Jobs::LockedUntil,
    Jobs::UniqueKey,
    Jobs::LastError,
    Jobs::Result,
    Jobs::CreatedAt,
    Jobs::UpdatedAt,
];

#[async_trait]
impl Observer for SqliteBackend {
    async fn get(&self, id: JobId) -> Result<Option<Job>> {
        read!(self, |pool| {
            let row = sqlx::query(AssertSqlSafe(GET_SQL.as_str()))
                .bind(id)
                .fetch_optional(pool)
                .await?;
            row.as_ref().map(observed_job).transpose()?
        })
    }

    async fn list(&self, filter: &ListFilter) -> Result<JobPage> {
        filter.validate()?;
        let limit = filter.limit as usize;
        let (sql, values) = Query::select()
            .columns(ALL_COLUMNS)
            .from(Jobs::Table)
            .and_where_option(
                filter
                    .status
                    .map(|s| Expr::col(Jobs::Status).eq(s.as_str())),
            )
            .and_where_option(
                filter
                    .queue
                    .as_deref()
                    .map(|q| Expr::col(Jobs::Queue).eq(q)),
            )
            .and_where_option(filter.kind.as_deref().map(|k| Expr::col(Jobs::Kind).eq(k)))
            .and_where_option(filter.after.map(|after| Expr::col(Jobs::Id).gt(after)))
            .order_by(Jobs::Id, Order::Asc)
            .limit(filter.limit as u64 + 1)
            .build_sqlx(SqliteQueryBuilder);
        let mut jobs = read!(self, |pool| {
            let rows = sqlx::query_with(AssertSqlSafe(sql.as_str()), values.clone())
                .fetch_all(pool)
                .await?;
            rows.iter()
                .map(observed_job)
                .collect::<std::result::Result<Vec<_>, _>>()?
        })?;
        let next = if jobs.len() > limit {
            jobs.truncate(limit);
            jobs.last().map(|job| job.id)
        } else {
            None
        };
        Ok(JobPage { jobs, next })
    }

    async fn stats(&self) -> Result<Stats> {
        let rows = read!(self, |pool| {
            sqlx::query(
                "SELECT queue, status, COUNT(*) AS n FROM relayq_jobs GROUP BY queue, status",
            )
            .fetch_all(pool)
            .await?
        })?;
        let mut stats = Stats::default();
        for row in rows {
            // Read as bytes, as a job's are: text another program stored
            // that is not UTF-8 reads with U+FFFD in its place.
            let queue: &[u8] = row.try_get("queue").map_err(Error::backend)?;
            let queue = String::from_utf8_lossy(queue).into_owned();
            let status: String = row.try_get("status").map_err(Error::backend)?;
            let n: i64 = row.try_get("n").map_err(Error::backend)?;
            let status: JobStatus = status
                .parse()
                .map_err(|_| Error::backend(format!("unknown status {status:?} in the table")))?;
            stats
                .queues
                .entry(queue)
                .or_default()
                .add(status, n.unsigned_abs());
        }
        Ok(stats)
    }
}

/// `get`'s query, built once.
static GET_SQL: LazyLock<String> =
    LazyLock::new(|| format!("SELECT {COLUMNS} FROM {TABLE} WHERE id = ?"));

#[async_trait]
impl Cleaner for SqliteBackend {
    async fn clean(&self, status: JobStatus, before: OffsetDateTime) -> Result<u64> {
        // The literal IN list lets SQLite use the partial index on finished
        // jobs; the bound status picks one of them. Everything gets a
        // statement of its own rather than `(? IS NULL OR updated_at < ?)`,
        // with which SQLite would read every job of the status to find
        // the old ones.
        let (sql, before) = match check_clean(status, before)? {
            Cutoff::Nothing => return Ok(0),
            Cutoff::Before(before) => (
                "DELETE FROM relayq_jobs WHERE id IN (SELECT id FROM relayq_jobs \
                 WHERE status IN ('done', 'dead', 'cancelled') \
                 AND status = ?1 AND updated_at < ?3 LIMIT ?2)",
                Some(micros(before)),
            ),
            Cutoff::Everything => (
                "DELETE FROM relayq_jobs WHERE id IN (SELECT id FROM relayq_jobs \
                 WHERE status IN ('done', 'dead', 'cancelled') \
                 AND status = ?1 LIMIT ?2)",
                None,
            ),
        };
        let mut deleted = 0;
        loop {
            // Each chunk in its own transaction: the write lock is free
            // between them for claims and lease renewals.
            let chunk = write_tx!(self, |tx, _now| {
                let query = sqlx::query(sql)
                    .bind(status.as_str())
                    .bind(CLEAN_CHUNK as i64);
                match before {
                    Some(before) => query.bind(before),
                    None => query,
                }
                .execute(&mut *tx)
                .await?
                .rows_affected()
            })?;
            deleted += chunk;
            if chunk < CLEAN_CHUNK {
                return Ok(deleted);
            }
        }
    }
}

#[async_trait]
impl Backend for SqliteBackend {
    fn capabilities(&self) -> Capabilities {
        let file = !self.shared.in_memory;
        Capabilities::none()
            .durable(file)
            .multi_process(file)
            .server_clock(false)
            .transactional_enqueue(true)
            .cross_process_wakeups(file)
            .in_process_wakeups(true)
    }

    async fn subscribe(&self, queues: &[String]) -> Result<Option<Wakeups>> {
        relayq_core::check_queue_names(queues)?;
        // Jobs stored by others after this point will be signalled; a busy
        // file is waited out as for any other read.
        let baseline = if self.shared.in_memory {
            wakeups::Marks::default()
        } else {
            read!(self, |pool| {
                let mut conn = pool.acquire().await?;
                wakeups::marks(&self.shared, &mut conn).await?
            })?
        };
        Ok(Some(wakeups::subscribe(&self.shared, baseline)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A subscription made while the runtime shuts down, whose spawn drops
    /// the new poller at once, returns: the dropped poller marks itself
    /// stopped, which took the lock `subscribe` held around the spawn,
    /// and the thread hung for good (and the runtime's drop with it).
    #[test]
    fn subscribing_on_a_runtime_shutting_down_returns() {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}", dir.path().join("jobs.db").display());
        let opened = tokio::runtime::Runtime::new().expect("runtime");
        let backend = opened
            .block_on(SqliteBackend::connect(&url))
            .expect("connect");
        let closed = tokio::runtime::Runtime::new().expect("runtime");
        let handle = closed.handle().clone();
        drop(closed);
        let (tx, rx) = std::sync::mpsc::channel();
        let shared = Arc::clone(&backend.shared);
        std::thread::spawn(move || {
            let _entered = handle.enter();
            let wakeups = wakeups::subscribe(&shared, wakeups::Marks::default());
            drop(wakeups);
            let _ = tx.send(());
        });
        assert_eq!(
            rx.recv_timeout(std::time::Duration::from_secs(20)),
            Ok(()),
            "subscribe returned"
        );
        assert!(
            wakeups::poller_stopped(&backend.shared),
            "the dropped poller is marked stopped"
        );
        opened.block_on(backend.close());
    }

    /// Planner statistics gathered while no job is leased (the lease index
    /// then looks empty, e.g. `checkpoint` after a bulk load) must not turn
    /// `complete_batch` or `extend_batch` into a scan of the leased jobs
    /// per entry: each walks its batch and looks each job up by id.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batch_statements_look_jobs_up_by_id_whatever_the_statistics() {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}", dir.path().join("jobs.db").display());
        let backend = SqliteBackend::connect(&url).await.expect("connect");
        let jobs = (0..2_000)
            .map(|n| NewJob::new("k", &serde_json::json!({ "n": n })))
            .collect();
        backend.push_batch(jobs).await.expect("push_batch");
        backend.checkpoint().await.expect("checkpoint");
        let leased = backend
            .pull(&PullRequest::queue("default").batch(256))
            .await
            .expect("pull");
        assert_eq!(leased.len(), 256);
        // Both batch statements: completions and renewals.
        for (statement, params) in [(COMPLETE_BATCH_SQL, 1), (EXTEND_BATCH_SQL, 2)] {
            let mut explain = sqlx::query(AssertSqlSafe(format!("EXPLAIN QUERY PLAN {statement}")));
            for _ in 0..params {
                explain = explain.bind(0_i64);
            }
            let rows = explain
                .bind("[]")
                .fetch_all(backend.pool())
                .await
                .expect("explain");
            let plan = render_plan(&rows).expect("plan");
            println!("{plan}");
            let lines: Vec<&str> = plan.lines().collect();
            assert!(lines[0].contains("json_each"), "{plan}");
            assert!(
                lines[1].contains("SEARCH relayq_jobs USING INTEGER PRIMARY KEY"),
                "{plan}"
            );
        }
        let completions = leased.iter().map(|l| Completion::from(l.lease)).collect();
        let lost = backend.complete_batch(completions).await.expect("complete");
        assert!(lost.is_empty());
    }
}
