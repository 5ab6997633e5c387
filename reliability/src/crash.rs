//! Crash, fault and load harness: real worker OS processes
//! (`relayq-crash-worker`, built from `src/bin/`) running relayq's worker
//! runtime against PostgreSQL or a SQLite file, and the tools a test
//! needs around them.
//!
//! - [`WorkerArgs`] describes one worker process (store, worker id,
//!   concurrency, lease, handler sleep, what the handler writes) and turns
//!   into / back from its command line; [`run_worker`] is the process's
//!   body.
//! - [`Ledger`]: the table the handler writes to, in the same database as
//!   the jobs — one row per handler run (`crash_ledger`: job id, attempt,
//!   worker id, pid, fencing token) or one counter per job
//!   (`load_counter`).
//! - [`Fleet`] starts, SIGKILLs, pauses (SIGSTOP/SIGCONT), samples and
//!   stops worker processes, remembering which were interrupted.
//! - [`check_outcome`] holds a finished run to the queue's promises: every
//!   job `Done`, none lost; a job ran again only after its holder was
//!   interrupted; the accepted completion came from the newest lease.
//! - [`Failpoint`]s make a worker die between the commits of a job's life;
//!   [`check_failpoints`] checks what became of each such job.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use relayq_conformance::faults::{Faults, Faulty};
use relayq_core::{
    Backend, Completion, Event, HandlerError, Job, JobContext, JobId, JobStatus, JobType, Lease,
    LeasedJob, ListFilter, NewJob, Outcome, PullRequest, RetryPolicy, StatusCounts, Worker,
};
use relayq_postgres::sqlx::{self, AssertSqlSafe, PgPool, Row};
use relayq_postgres::{PgBackend, PgOptions};
use relayq_sqlite::sqlx::SqlitePool;
use relayq_sqlite::{SqliteBackend, SqliteOptions};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// The job every harness run pushes: `seq` numbers it within the run.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct CrashJob {
    /// The job's number in its run, from 0.
    pub seq: i64,
}

impl JobType for CrashJob {
    const KIND: &'static str = "crash";
    const QUEUE: &'static str = "crash";
}

impl CrashJob {
    /// `n` jobs numbered `from..from + n`.
    pub fn batch(from: i64, n: i64) -> Vec<NewJob> {
        (from..from + n)
            .map(|seq| CrashJob { seq }.to_job())
            .collect()
    }
}

/// Where a worker process keeps its jobs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Store {
    /// A PostgreSQL schema.
    Postgres {
        /// Server URL.
        url: String,
        /// Schema holding the jobs and the ledger.
        schema: String,
        /// `application_name` of the worker's pool (its listener appends
        /// `-listener`); unique per worker so tests can find its sessions.
        app: String,
    },
    /// A SQLite file.
    Sqlite {
        /// `sqlite://…` URL of the file.
        url: String,
    },
}

/// What the handler writes for each run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// One `crash_ledger` row per handler run, written between two halves
    /// of the handler's sleep; the job's result names the worker and token.
    Ledger,
    /// `load_counter[seq] += 1` (PostgreSQL only), no sleep, no result.
    Count,
}

/// One worker process's configuration, as passed on its command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerArgs {
    /// The store.
    pub store: Store,
    /// The harness's number for this process (never reused in a run).
    pub worker_id: u32,
    /// Jobs run at once.
    pub concurrency: u32,
    /// Lease length.
    pub lease: Duration,
    /// Poll interval.
    pub poll: Duration,
    /// Pool size.
    pub pool: u32,
    /// Shortest handler sleep.
    pub sleep_min: Duration,
    /// Longest handler sleep.
    pub sleep_max: Duration,
    /// One job in this many (by id; 0 for none) is long: it sleeps
    /// `long_min..=long_max` instead, long enough to outlive a lease.
    pub long_one_in: u32,
    /// Shortest sleep of a long job.
    pub long_min: Duration,
    /// Longest sleep of a long job.
    pub long_max: Duration,
    /// What the handler writes.
    pub mode: Mode,
    /// One job in this many (by id; 0 for none) makes the process die at
    /// a failpoint on its first lease: see [`Failpoint`].
    pub failpoint_one_in: u32,
}

impl WorkerArgs {
    /// Defaults for `store`: worker 0, concurrency 8, 1 s lease, 500 ms
    /// poll, pool of 4, sleeps of 5–40 ms, ledger mode, no failpoints.
    pub fn new(store: Store) -> Self {
        Self {
            store,
            worker_id: 0,
            concurrency: 8,
            lease: Duration::from_secs(1),
            poll: Duration::from_millis(500),
            pool: 4,
            sleep_min: Duration::from_millis(5),
            sleep_max: Duration::from_millis(40),
            long_one_in: 0,
            long_min: Duration::ZERO,
            long_max: Duration::ZERO,
            mode: Mode::Ledger,
            failpoint_one_in: 0,
        }
    }

    /// The command line that [`Self::parse`] reads back.
    pub fn to_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        let mut put = |k: &str, v: String| {
            args.push(format!("--{k}"));
            args.push(v);
        };
        match &self.store {
            Store::Postgres { url, schema, app } => {
                put("postgres", url.clone());
                put("schema", schema.clone());
                put("app", app.clone());
            }
            Store::Sqlite { url } => put("sqlite", url.clone()),
        }
        put("worker-id", self.worker_id.to_string());
        put("concurrency", self.concurrency.to_string());
        put("lease-ms", self.lease.as_millis().to_string());
        put("poll-ms", self.poll.as_millis().to_string());
        put("pool", self.pool.to_string());
        put("sleep-min-ms", self.sleep_min.as_millis().to_string());
        put("sleep-max-ms", self.sleep_max.as_millis().to_string());
        put("long-one-in", self.long_one_in.to_string());
        put("long-min-ms", self.long_min.as_millis().to_string());
        put("long-max-ms", self.long_max.as_millis().to_string());
        put(
            "mode",
            match self.mode {
                Mode::Ledger => "ledger",
                Mode::Count => "count",
            }
            .to_owned(),
        );
        put("failpoint-one-in", self.failpoint_one_in.to_string());
        args
    }

    /// Reads the arguments written by [`Self::to_args`].
    pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Self, String> {
        let mut map = BTreeMap::new();
        let mut args = args.into_iter();
        while let Some(key) = args.next() {
            let key = key
                .strip_prefix("--")
                .ok_or_else(|| format!("expected --key, got {key:?}"))?
                .to_owned();
            let value = args
                .next()
                .ok_or_else(|| format!("--{key} needs a value"))?;
            map.insert(key, value);
        }
        let mut take = |k: &str| map.remove(k);
        let num = |k: &str, v: Option<String>| -> Result<u64, String> {
            v.ok_or_else(|| format!("--{k} is required"))?
                .parse()
                .map_err(|e| format!("--{k}: {e}"))
        };
        let store = match (take("postgres"), take("sqlite")) {
            (Some(url), None) => Store::Postgres {
                url,
                schema: take("schema").ok_or("--schema is required with --postgres")?,
                app: take("app").ok_or("--app is required with --postgres")?,
            },
            (None, Some(url)) => Store::Sqlite { url },
            _ => return Err("give exactly one of --postgres URL and --sqlite URL".into()),
        };
        let ms = |k: &str, v| num(k, v).map(Duration::from_millis);
        let small = |k: &str, v| {
            num(k, v).and_then(|n| u32::try_from(n).map_err(|e| format!("--{k}: {e}")))
        };
        let parsed = Self {
            store,
            worker_id: small("worker-id", take("worker-id"))?,
            concurrency: small("concurrency", take("concurrency"))?,
            lease: ms("lease-ms", take("lease-ms"))?,
            poll: ms("poll-ms", take("poll-ms"))?,
            pool: small("pool", take("pool"))?,
            sleep_min: ms("sleep-min-ms", take("sleep-min-ms"))?,
            sleep_max: ms("sleep-max-ms", take("sleep-max-ms"))?,
            long_one_in: small("long-one-in", take("long-one-in"))?,
            long_min: ms("long-min-ms", take("long-min-ms"))?,
            long_max: ms("long-max-ms", take("long-max-ms"))?,
            mode: match take("mode").as_deref() {
                Some("ledger") => Mode::Ledger,
                Some("count") => Mode::Count,
                other => return Err(format!("--mode must be ledger or count, got {other:?}")),
            },
            failpoint_one_in: small("failpoint-one-in", take("failpoint-one-in"))?,
        };
        if let Some(k) = map.keys().next() {
            return Err(format!("unknown argument --{k}"));
        }
        Ok(parsed)
    }
}

/// One handler run, as the ledger records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LedgerEntry {
    /// The job.
    pub job_id: JobId,
    /// `JobContext::attempt` of the run.
    pub attempt: i32,
    /// The harness's number of the worker process.
    pub worker_id: u32,
    /// Its OS process id.
    pub pid: u32,
    /// The fencing token of the lease the run held.
    pub token: i64,
}

/// The table(s) handlers write to, in the jobs' own database.
#[derive(Debug, Clone)]
pub enum Ledger {
    /// In a PostgreSQL schema.
    Postgres {
        /// The backend's pool.
        pool: PgPool,
        /// The schema (validated by the backend).
        schema: String,
    },
    /// In the SQLite file of the jobs.
    Sqlite {
        /// The backend's pool.
        pool: SqlitePool,
    },
}

impl Ledger {
    /// The ledger next to `backend`'s jobs.
    pub fn postgres(backend: &PgBackend) -> Self {
        Self::Postgres {
            pool: backend.pool().clone(),
            schema: backend.schema().to_owned(),
        }
    }

    /// The ledger in `backend`'s file.
    pub fn sqlite(backend: &SqliteBackend) -> Self {
        Self::Sqlite {
            pool: backend.pool().clone(),
        }
    }

    /// Creates the tables if missing.
    pub async fn create(&self) -> Result<(), sqlx::Error> {
        match self {
            Self::Postgres { pool, schema } => {
                sqlx::query(AssertSqlSafe(format!(
                    "CREATE TABLE IF NOT EXISTS \"{schema}\".crash_ledger (
                         id bigserial PRIMARY KEY, job_id bigint NOT NULL,
                         attempt int NOT NULL, worker_id int NOT NULL, pid int NOT NULL,
                         token bigint NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp())"
                )))
                .execute(pool)
                .await?;
                sqlx::query(AssertSqlSafe(format!(
                    "CREATE TABLE IF NOT EXISTS \"{schema}\".load_counter (
                         seq bigint PRIMARY KEY, n int NOT NULL)"
                )))
                .execute(pool)
                .await?;
            }
            Self::Sqlite { pool } => {
                sqlx::query(
                    "CREATE TABLE IF NOT EXISTS crash_ledger (
                         id INTEGER PRIMARY KEY AUTOINCREMENT, job_id INTEGER NOT NULL,
                         attempt INTEGER NOT NULL, worker_id INTEGER NOT NULL,
                         pid INTEGER NOT NULL, token INTEGER NOT NULL)",
                )
                .execute(pool)
                .await?;
            }
        }
        Ok(())
    }

    /// Records one handler run.
    pub async fn record(&self, e: &LedgerEntry) -> Result<(), sqlx::Error> {
        match self {
            Self::Postgres { pool, schema } => {
                sqlx::query(AssertSqlSafe(format!(
                    "INSERT INTO \"{schema}\".crash_ledger (job_id, attempt, worker_id, pid, token)
                     VALUES ($1, $2, $3, $4, $5)"
                )))
                .bind(e.job_id)
                .bind(e.attempt)
                .bind(i64::from(e.worker_id))
                .bind(i64::from(e.pid))
                .bind(e.token)
                .execute(pool)
                .await?;
            }
            Self::Sqlite { pool } => {
                sqlx::query(
                    "INSERT INTO crash_ledger (job_id, attempt, worker_id, pid, token)
                     VALUES (?, ?, ?, ?, ?)",
                )
                .bind(e.job_id)
                .bind(e.attempt)
                .bind(i64::from(e.worker_id))
                .bind(i64::from(e.pid))
                .bind(e.token)
                .execute(pool)
                .await?;
            }
        }
        Ok(())
    }

    /// Counts one run of job number `seq` (PostgreSQL only).
    pub async fn count(&self, seq: i64) -> Result<(), sqlx::Error> {
        match self {
            Self::Postgres { pool, schema } => {
                sqlx::query(AssertSqlSafe(format!(
                    "INSERT INTO \"{schema}\".load_counter AS c (seq, n) VALUES ($1, 1)
                     ON CONFLICT (seq) DO UPDATE SET n = c.n + 1"
                )))
                .bind(seq)
                .execute(pool)
                .await?;
                Ok(())
            }
            Self::Sqlite { .. } => Err(sqlx::Error::Protocol(
                "count mode is PostgreSQL only".into(),
            )),
        }
    }

    /// Every ledger row, in the order written.
    pub async fn entries(&self) -> Result<Vec<LedgerEntry>, sqlx::Error> {
        let sql = "SELECT job_id, attempt, CAST(worker_id AS bigint), CAST(pid AS bigint), token \
                   FROM {t} ORDER BY id";
        let rows: Vec<(i64, i32, i64, i64, i64)> = match self {
            Self::Postgres { pool, schema } => {
                let table = format!("\"{schema}\".crash_ledger");
                sqlx::query_as(AssertSqlSafe(sql.replace("{t}", &table)))
                    .fetch_all(pool)
                    .await?
            }
            Self::Sqlite { pool } => {
                sqlx::query_as(AssertSqlSafe(sql.replace("{t}", "crash_ledger")))
                    .fetch_all(pool)
                    .await?
            }
        };
        Ok(rows
            .into_iter()
            .map(|(job_id, attempt, worker_id, pid, token)| LedgerEntry {
                job_id,
                attempt,
                worker_id: u32::try_from(worker_id).unwrap_or(u32::MAX),
                pid: u32::try_from(pid).unwrap_or(u32::MAX),
                token,
            })
            .collect())
    }

    /// The highest ledger row id so far (0 when empty): entries written
    /// later have higher ids (PostgreSQL only).
    pub async fn high_water(&self) -> Result<i64, sqlx::Error> {
        match self {
            Self::Postgres { pool, schema } => {
                sqlx::query_scalar(AssertSqlSafe(format!(
                    "SELECT coalesce(max(id), 0) FROM \"{schema}\".crash_ledger"
                )))
                .fetch_one(pool)
                .await
            }
            Self::Sqlite { pool } => {
                sqlx::query_scalar("SELECT coalesce(max(id), 0) FROM crash_ledger")
                    .fetch_one(pool)
                    .await
            }
        }
    }

    /// The workers that wrote ledger rows with an id above `after`.
    pub async fn workers_since(&self, after: i64) -> Result<BTreeSet<u32>, sqlx::Error> {
        let ids: Vec<i64> =
            match self {
                Self::Postgres { pool, schema } => sqlx::query_scalar(AssertSqlSafe(format!(
                    "SELECT DISTINCT worker_id::int8 FROM \"{schema}\".crash_ledger WHERE id > $1"
                )))
                .bind(after)
                .fetch_all(pool)
                .await?,
                Self::Sqlite { pool } => {
                    sqlx::query_scalar("SELECT DISTINCT worker_id FROM crash_ledger WHERE id > ?")
                        .bind(after)
                        .fetch_all(pool)
                        .await?
                }
            };
        Ok(ids
            .into_iter()
            .filter_map(|id| u32::try_from(id).ok())
            .collect())
    }

    /// `(rows, sum of n, max n, rows with n <> 1)` of `load_counter`
    /// (PostgreSQL only).
    pub async fn counter_summary(&self) -> Result<(i64, i64, i32, i64), sqlx::Error> {
        match self {
            Self::Postgres { pool, schema } => {
                let row = sqlx::query(AssertSqlSafe(format!(
                    "SELECT count(*)::int8 AS rows, coalesce(sum(n), 0)::int8 AS total,
                            coalesce(max(n), 0)::int4 AS most,
                            count(*) FILTER (WHERE n <> 1)::int8 AS odd
                     FROM \"{schema}\".load_counter"
                )))
                .fetch_one(pool)
                .await?;
                Ok((
                    row.try_get("rows")?,
                    row.try_get("total")?,
                    row.try_get("most")?,
                    row.try_get("odd")?,
                ))
            }
            Self::Sqlite { .. } => Err(sqlx::Error::Protocol(
                "count mode is PostgreSQL only".into(),
            )),
        }
    }
}

/// What a worker process's handlers share.
#[derive(Debug)]
struct WorkerState {
    ledger: Ledger,
    worker_id: u32,
    pid: u32,
    sleep_min: Duration,
    sleep_max: Duration,
    long_one_in: u32,
    long_min: Duration,
    long_max: Duration,
    mode: Mode,
    /// Runs whose handler returned, by job id and attempt: whether it
    /// failed, and its lease's token. A lease lost after that is a
    /// completion (or a retry) the store refused; a completion recorded,
    /// one the store acknowledged under that token.
    finished: Arc<Mutex<HashMap<(JobId, i32), Returned>>>,
}

/// A run whose handler returned (see `WorkerState::finished`).
#[derive(Debug, Clone, Copy)]
struct Returned {
    /// It failed, by design ([`fails_first_attempt`]).
    failed: bool,
    /// Its lease's fencing token.
    token: i64,
}

/// The handler's sleep for a job: spread over `[min, max]` (or the long
/// range, for one job in `long_one_in`) by the job id, so runs of one job
/// sleep alike and different jobs differ.
fn sleep_for(state: &WorkerState, id: JobId) -> Duration {
    let hash = (id as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 33;
    let long = state.long_one_in > 0 && (hash >> 16).is_multiple_of(u64::from(state.long_one_in));
    let (min, max) = if long {
        (state.long_min, state.long_max)
    } else {
        (state.sleep_min, state.sleep_max)
    };
    let spread = max.saturating_sub(min).as_millis() as u64;
    min + Duration::from_millis(hash % (spread + 1))
}

/// Whether the job numbered `seq` fails its first attempt, by design, once
/// its run is recorded: one in 40. It is retried, and a worker frozen
/// while holding one may come back to retry it with a stale lease, which
/// the store must refuse.
pub fn fails_first_attempt(seq: i64) -> bool {
    seq % 40 == 13
}

async fn handle(
    job: CrashJob,
    ctx: JobContext<WorkerState>,
) -> Result<Option<serde_json::Value>, HandlerError> {
    let state = ctx.state();
    match state.mode {
        Mode::Count => {
            state.ledger.count(job.seq).await?;
            Ok(None)
        }
        Mode::Ledger => {
            let lease = ctx.lease();
            let fail = ctx.attempt() == 1 && fails_first_attempt(job.seq);
            // A failing attempt is long, as one in `long_one_in` jobs is: a
            // worker frozen while holding one then often wakes to retry it
            // after its lease was taken over.
            let half = if fail {
                state.long_min.max(sleep_for(state, ctx.id())) / 2
            } else {
                sleep_for(state, ctx.id()) / 2
            };
            tokio::time::sleep(half).await;
            state
                .ledger
                .record(&LedgerEntry {
                    job_id: ctx.id(),
                    attempt: ctx.attempt(),
                    worker_id: state.worker_id,
                    pid: state.pid,
                    token: lease.token,
                })
                .await?;
            tokio::time::sleep(half).await;
            state
                .finished
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(
                    (ctx.id(), ctx.attempt()),
                    Returned {
                        failed: fail,
                        token: lease.token,
                    },
                );
            if fail {
                return Err(HandlerError::new("the first attempt fails, by design"));
            }
            Ok(Some(
                json!({ "worker": state.worker_id, "token": lease.token }),
            ))
        }
    }
}

/// Printed by a worker (with the job id) when the store refused its
/// completion of a job: its lease had been taken over.
pub const REFUSED_COMPLETION: &str = "refused-completion";

/// Printed by a worker (with the job id and its lease's token) when the
/// store acknowledged its completion of a job: the job is done, and no
/// interruption of that worker excuses its running again.
pub const COMPLETED: &str = "completed";

/// Printed by a worker (with the job id) when the store refused to extend
/// a running job's lease: it had been taken over, the handler was stopped.
pub const REFUSED_EXTENSION: &str = "refused-extension";

/// Printed by a worker (with the job id) when the store refused its retry
/// of a job whose attempt failed by design ([`fails_first_attempt`]): its
/// lease had been taken over.
pub const REFUSED_RETRY: &str = "refused-retry";

/// A point in a job's life where a worker process dies by design, as a
/// crash could kill it there: between the commits that move the job on,
/// the windows a random kill only lands in by chance. A worker with
/// [`WorkerArgs::failpoint_one_in`] dies at one for one job in that many
/// (by id), on the job's first lease only, so the job then runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Failpoint {
    /// The claim committed; the handler has not started. The job must run
    /// again once the lease ends, never under the dead worker's token.
    Claimed,
    /// The handler ran; its completion was not sent. The job must run
    /// again, and be completed under the later lease.
    Ran,
    /// The completion committed; the worker had not heard back. The job is
    /// done and must never run again.
    Completed,
}

impl Failpoint {
    const ALL: [Self; 3] = [Self::Claimed, Self::Ran, Self::Completed];

    /// The failpoint job `id` arms for workers dying at one job in
    /// `one_in` (0: none): each point in turn.
    pub fn of(id: JobId, one_in: u32) -> Option<Self> {
        let one_in = i64::from(one_in);
        if one_in == 0 || id % one_in != 0 {
            return None;
        }
        Some(Self::ALL[((id / one_in) % 3) as usize])
    }

    fn name(self) -> &'static str {
        match self {
            Self::Claimed => "claimed",
            Self::Ran => "ran",
            Self::Completed => "completed",
        }
    }

    fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == name)
    }
}

/// Printed by a worker just before it dies at a failpoint:
/// `failpoint <claimed|ran|completed> <job id> <token>`.
pub const FAILPOINT: &str = "failpoint";

/// The exit status of a worker process that died at a failpoint.
pub const FAILPOINT_EXIT: i32 = 86;

/// The store of a worker that dies at its failpoints: it forwards every
/// call, and ends the process around the calls that cross one.
#[derive(Debug)]
struct Failpoints {
    one_in: u32,
}

impl Failpoints {
    /// Ends the process if one of `leases`, a first lease, arms `point`.
    fn cross<'a>(&self, point: Failpoint, leases: impl IntoIterator<Item = &'a Lease>) {
        let armed = leases
            .into_iter()
            .find(|l| l.token == 1 && Failpoint::of(l.job_id, self.one_in) == Some(point));
        if let Some(lease) = armed {
            die(point, lease);
        }
    }
}

/// Ends the process at once, as a crash would: no destructor runs, no
/// lease is given back, nothing more is sent.
fn die(point: Failpoint, lease: &Lease) -> ! {
    static DYING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    // Two tasks crossing failpoints at once: one ends the process, the
    // other waits for that (`exit` is not for two threads at once).
    if DYING.swap(true, std::sync::atomic::Ordering::SeqCst) {
        loop {
            std::thread::park();
        }
    }
    println!(
        "{FAILPOINT} {} {} {}",
        point.name(),
        lease.job_id,
        lease.token
    );
    let _ = std::io::Write::flush(&mut std::io::stdout());
    std::process::exit(FAILPOINT_EXIT);
}

#[async_trait::async_trait]
impl Faults for Failpoints {
    async fn pull(
        &self,
        inner: &dyn Backend,
        request: &PullRequest,
    ) -> relayq_core::Result<Vec<LeasedJob>> {
        let jobs = inner.pull(request).await?;
        self.cross(Failpoint::Claimed, jobs.iter().map(|j| &j.lease));
        Ok(jobs)
    }

    async fn complete(
        &self,
        inner: &dyn Backend,
        lease: &Lease,
        result: Option<serde_json::Value>,
    ) -> relayq_core::Result<()> {
        self.cross(Failpoint::Ran, [lease]);
        inner.complete(lease, result).await?;
        self.cross(Failpoint::Completed, [lease]);
        Ok(())
    }

    async fn complete_batch(
        &self,
        inner: &dyn Backend,
        completions: Vec<Completion>,
    ) -> relayq_core::Result<Vec<Lease>> {
        self.cross(Failpoint::Ran, completions.iter().map(|c| &c.lease));
        let leases: Vec<Lease> = completions.iter().map(|c| c.lease).collect();
        let lost = inner.complete_batch(completions).await?;
        self.cross(
            Failpoint::Completed,
            leases.iter().filter(|l| !lost.contains(l)),
        );
        Ok(lost)
    }
}

/// A worker's death at a failpoint, as its output records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fired {
    /// Where it died.
    pub point: Failpoint,
    /// The harness's number of the worker.
    pub worker_id: u32,
    /// The job whose lease armed the failpoint.
    pub job_id: JobId,
    /// That lease's fencing token.
    pub token: i64,
}

/// Checks what became of each job whose worker died at a failpoint
/// (`fired`), from the store's `jobs` and the `ledger`, and counts them by
/// point:
/// - [`Failpoint::Claimed`]: the dead worker never ran it, and a later
///   lease completed it;
/// - [`Failpoint::Ran`]: the dead worker ran it, and a later lease ran and
///   completed it;
/// - [`Failpoint::Completed`]: the dead worker ran and completed it, and no
///   lease came after.
pub fn check_failpoints(
    fired: &[Fired],
    jobs: &[Job],
    ledger: &[LedgerEntry],
) -> Result<BTreeMap<Failpoint, usize>, String> {
    let mut problems = Vec::new();
    let mut counts = BTreeMap::new();
    for f in fired {
        *counts.entry(f.point).or_insert(0) += 1;
        let Some(job) = jobs.iter().find(|j| j.id == f.job_id) else {
            problems.push(format!("job {} (failpoint {f:?}) is gone", f.job_id));
            continue;
        };
        let ran = ledger
            .iter()
            .any(|e| e.job_id == f.job_id && e.worker_id == f.worker_id && e.token == f.token);
        let later = ledger
            .iter()
            .any(|e| e.job_id == f.job_id && e.token > f.token);
        let fine = match f.point {
            Failpoint::Claimed => !ran && later && job.lease_token > f.token,
            Failpoint::Ran => ran && later && job.lease_token > f.token,
            Failpoint::Completed => ran && !later && job.lease_token == f.token,
        };
        if !fine || job.status != JobStatus::Done {
            problems.push(format!(
                "job {} after its worker died at {f:?}: {:?} under token {}; the dead \
                 worker's run {}, a later run {}",
                f.job_id,
                job.status,
                job.lease_token,
                if ran {
                    "is recorded"
                } else {
                    "is not recorded"
                },
                if later {
                    "is recorded"
                } else {
                    "is not recorded"
                },
            ));
        }
    }
    if problems.is_empty() {
        Ok(counts)
    } else {
        Err(problems.join("\n"))
    }
}

/// The body of a worker process: connects (retrying for up to 30 s),
/// runs a worker for [`CrashJob`]s until SIGTERM, then shuts it down
/// gracefully and closes the store. Prints `ready` once it pulls.
pub async fn run_worker(args: WorkerArgs) -> Result<(), String> {
    use tokio::signal::unix::{SignalKind, signal};

    let mut term = signal(SignalKind::terminate()).map_err(|e| format!("SIGTERM handler: {e}"))?;
    let started = Instant::now();
    let (backend, ledger, close): (Arc<dyn Backend>, Ledger, Closer) = loop {
        let attempt = connect(&args).await;
        match attempt {
            Ok(connected) => break connected,
            Err(e) if started.elapsed() < Duration::from_secs(30) => {
                eprintln!("worker {}: connect failed, retrying: {e}", args.worker_id);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(format!("connect: {e}")),
        }
    };
    let backend: Arc<dyn Backend> = if args.failpoint_one_in > 0 {
        Arc::new(Faulty::new(
            backend,
            Failpoints {
                one_in: args.failpoint_one_in,
            },
        ))
    } else {
        backend
    };
    let state = WorkerState {
        ledger,
        worker_id: args.worker_id,
        pid: std::process::id(),
        sleep_min: args.sleep_min,
        sleep_max: args.sleep_max,
        long_one_in: args.long_one_in,
        long_min: args.long_min,
        long_max: args.long_max,
        mode: args.mode,
        finished: Arc::default(),
    };
    let finished = Arc::clone(&state.finished);
    let worker = Worker::builder(backend)
        .state(state)
        .concurrency(args.concurrency)
        .lease(args.lease)
        .poll_interval(args.poll)
        .retry(
            RetryPolicy::exponential()
                .base(Duration::from_millis(50))
                .cap(Duration::from_millis(500)),
        )
        .shutdown_timeout(Duration::from_secs(5))
        .handle(handle)
        .on_event(move |event| {
            let Event::Finished { job, outcome } = event else {
                return;
            };
            let mut finished = finished.lock().unwrap_or_else(PoisonError::into_inner);
            let ran = finished.remove(&(job.id, job.attempt));
            match outcome {
                Outcome::Unrecorded { error } => println!("unrecorded {} {error}", job.id),
                Outcome::Retrying { error, .. } => println!("retrying {} {error}", job.id),
                Outcome::Completed { .. } => {
                    if let Some(Returned {
                        failed: false,
                        token,
                    }) = ran
                    {
                        println!("{COMPLETED} {} {token}", job.id);
                    }
                }
                _ => {}
            }
            if *outcome == Outcome::LeaseLost {
                // The store refused this lease: a completion or retry after
                // the handler returned, or an extension while it ran.
                match ran {
                    Some(Returned { failed: false, .. }) => {
                        println!("{REFUSED_COMPLETION} {}", job.id);
                    }
                    Some(Returned { failed: true, .. }) => println!("{REFUSED_RETRY} {}", job.id),
                    None => println!("{REFUSED_EXTENSION} {}", job.id),
                }
            }
        })
        .build()
        .map_err(|e| format!("build: {e}"))?;
    let running = worker.start();
    println!("ready");
    term.recv().await;
    let report = running.shutdown().await;
    eprintln!("worker {}: stopped: {report:?}", args.worker_id);
    close.close().await;
    Ok(())
}

enum Closer {
    Postgres(PgBackend),
    Sqlite(SqliteBackend),
}

impl Closer {
    async fn close(self) {
        match self {
            Self::Postgres(b) => b.close().await,
            Self::Sqlite(b) => b.close().await,
        }
    }
}

async fn connect(args: &WorkerArgs) -> Result<(Arc<dyn Backend>, Ledger, Closer), String> {
    match &args.store {
        Store::Postgres { url, schema, app } => {
            let backend = PgBackend::connect_with(
                PgOptions::new(url.clone())
                    .schema(schema.clone())
                    .application_name(app.clone())
                    .max_connections(args.pool)
                    .acquire_timeout(Duration::from_secs(10)),
            )
            .await
            .map_err(|e| e.to_string())?;
            let ledger = Ledger::postgres(&backend);
            Ok((Arc::new(backend.clone()), ledger, Closer::Postgres(backend)))
        }
        Store::Sqlite { url } => {
            let backend = SqliteBackend::connect_with(
                SqliteOptions::new(url.clone()).max_connections(args.pool),
            )
            .await
            .map_err(|e| e.to_string())?;
            let ledger = Ledger::sqlite(&backend);
            Ok((Arc::new(backend.clone()), ledger, Closer::Sqlite(backend)))
        }
    }
}

/// A small xorshift generator: the harness's randomness, seeded per run
/// and printed so a failing schedule can be told apart.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Seeded from the clock and process id.
    pub fn from_time() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        Self::new(nanos ^ (u64::from(std::process::id()) << 32))
    }

    /// Seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    /// The seed-derived state, for printing.
    pub fn state(&self) -> u64 {
        self.0
    }

    /// A number in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }

    /// A duration in `[lo, hi]`.
    pub fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        let spread = hi.saturating_sub(lo).as_millis() as u64;
        lo + Duration::from_millis(self.below(spread + 1))
    }
}

/// A started worker process.
#[derive(Debug)]
struct Proc {
    child: Child,
    pid: u32,
    log: PathBuf,
}

/// A set of worker processes started from one template.
#[derive(Debug)]
pub struct Fleet {
    exe: PathBuf,
    template: WorkerArgs,
    logs: PathBuf,
    procs: BTreeMap<u32, Proc>,
    next_id: u32,
    killed: BTreeSet<u32>,
    paused: BTreeSet<u32>,
    pids: BTreeMap<u32, u32>,
}

impl Fleet {
    /// Workers run `exe` with `template`'s arguments (each its own worker
    /// id, and for PostgreSQL the application name `<app>-w<id>`); their
    /// output goes to files in `logs`.
    pub fn new(exe: impl Into<PathBuf>, template: WorkerArgs, logs: &Path) -> Self {
        Self {
            exe: exe.into(),
            template,
            logs: logs.to_owned(),
            procs: BTreeMap::new(),
            next_id: 1,
            killed: BTreeSet::new(),
            paused: BTreeSet::new(),
            pids: BTreeMap::new(),
        }
    }

    /// The `application_name` of worker `id`'s pool (PostgreSQL).
    pub fn app_name(&self, id: u32) -> Option<String> {
        match &self.template.store {
            Store::Postgres { app, .. } => Some(format!("{app}-w{id}")),
            Store::Sqlite { .. } => None,
        }
    }

    /// Starts one more worker; returns its id.
    pub fn spawn(&mut self) -> std::io::Result<u32> {
        let id = self.next_id;
        self.next_id += 1;
        let mut args = self.template.clone();
        args.worker_id = id;
        if let Store::Postgres { app, .. } = &mut args.store {
            *app = format!("{app}-w{id}");
        }
        let log = self.logs.join(format!("worker-{id}.log"));
        let out = std::fs::File::create(&log)?;
        let child = Command::new(&self.exe)
            .args(args.to_args())
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()?;
        let pid = child.id();
        self.pids.insert(id, pid);
        self.procs.insert(id, Proc { child, pid, log });
        Ok(id)
    }

    /// Workers still running (not killed or stopped by the harness).
    pub fn live(&self) -> Vec<u32> {
        self.procs.keys().copied().collect()
    }

    /// OS pid of worker `id`, while it runs.
    pub fn pid(&self, id: u32) -> Option<u32> {
        self.procs.get(&id).map(|p| p.pid)
    }

    /// SIGKILLs worker `id` and reaps it.
    pub fn kill(&mut self, id: u32) -> std::io::Result<()> {
        if let Some(mut p) = self.procs.remove(&id) {
            p.child.kill()?;
            p.child.wait()?;
            self.killed.insert(id);
        }
        Ok(())
    }

    /// Asks worker `id` to shut down (SIGTERM), then SIGKILLs it `after`
    /// that, mid-shutdown if it is still finishing its jobs or giving them
    /// back, and reaps it. Returns whether it was still running then.
    pub async fn kill_while_stopping(&mut self, id: u32, after: Duration) -> std::io::Result<bool> {
        let Some(pid) = self.pid(id) else {
            return Ok(false);
        };
        signal(pid, "TERM")?;
        tokio::time::sleep(after).await;
        let running = match self.procs.get_mut(&id) {
            Some(p) => p.child.try_wait()?.is_none(),
            None => false,
        };
        self.kill(id)?;
        Ok(running)
    }

    /// Stops worker `id` with SIGSTOP for `pause`, then resumes it
    /// (SIGCONT): a process frozen past its leases, like a long GC pause
    /// or a VM migration, whose late completions must be refused.
    pub async fn pause(&mut self, id: u32, pause: Duration) -> std::io::Result<()> {
        let Some(pid) = self.pid(id) else {
            return Ok(());
        };
        self.paused.insert(id);
        signal(pid, "STOP")?;
        tokio::time::sleep(pause).await;
        signal(pid, "CONT")
    }

    /// Counts workers `ids` as frozen: on SQLite a frozen process may hold
    /// the file's write lock, which stalls every other worker's lease
    /// renewals too, so their leases may lapse as if they had been frozen.
    pub fn mark_frozen(&mut self, ids: impl IntoIterator<Item = u32>) {
        self.paused.extend(ids);
    }

    /// Workers SIGKILLed so far.
    pub fn killed(&self) -> &BTreeSet<u32> {
        &self.killed
    }

    /// Who was interrupted, and which stale leases the store refused to
    /// which worker (from every worker's output, killed ones included).
    pub fn interruptions(&self) -> Interruptions {
        let mut refused = BTreeSet::new();
        let mut completed = BTreeSet::new();
        for id in 1..self.next_id {
            let log = std::fs::read_to_string(self.logs.join(format!("worker-{id}.log")))
                .unwrap_or_default();
            for line in log.lines() {
                let mut words = line.split(' ');
                match (words.next(), words.next(), words.next()) {
                    (
                        Some(REFUSED_COMPLETION | REFUSED_EXTENSION | REFUSED_RETRY),
                        Some(job),
                        _,
                    ) => {
                        if let Ok(job) = job.parse() {
                            refused.insert((id, job));
                        }
                    }
                    (Some(COMPLETED), Some(job), Some(token)) => {
                        if let (Ok(job), Ok(token)) = (job.parse(), token.parse()) {
                            completed.insert((job, token));
                        }
                    }
                    _ => {}
                }
            }
        }
        Interruptions {
            killed: self.killed.clone(),
            frozen: self.paused.clone(),
            refused,
            completed,
        }
    }

    /// Worker id of every pid ever started.
    pub fn worker_of_pid(&self) -> BTreeMap<u32, u32> {
        self.pids.iter().map(|(&id, &pid)| (pid, id)).collect()
    }

    /// Reaps the workers that died at a failpoint, counting them as killed
    /// (they crashed), and returns how many; fails, naming them with their
    /// output, if other running workers exited by themselves.
    pub fn check_running(&mut self) -> Result<usize, String> {
        let mut dead = String::new();
        let mut crashed = Vec::new();
        for (&id, p) in &mut self.procs {
            match p.child.try_wait() {
                Ok(Some(status)) if died_at_failpoint(&self.template, status) => crashed.push(id),
                Ok(Some(status)) => {
                    let _ = writeln!(
                        dead,
                        "worker {id} (pid {}) exited by itself: {status}\n{}",
                        p.pid,
                        tail(&p.log)
                    );
                }
                _ => {}
            }
        }
        for id in &crashed {
            self.procs.remove(id);
            self.killed.insert(*id);
        }
        if dead.is_empty() {
            Ok(crashed.len())
        } else {
            Err(dead)
        }
    }

    /// Every death at a failpoint so far, from the workers' output.
    pub fn failpoints_fired(&self) -> Vec<Fired> {
        let mut fired = Vec::new();
        for worker_id in 1..self.next_id {
            let log = std::fs::read_to_string(self.logs.join(format!("worker-{worker_id}.log")))
                .unwrap_or_default();
            for line in log.lines() {
                let words: Vec<&str> = line.split(' ').collect();
                if let [FAILPOINT, point, job, token] = words[..]
                    && let (Some(point), Ok(job_id), Ok(token)) =
                        (Failpoint::parse(point), job.parse(), token.parse())
                {
                    fired.push(Fired {
                        point,
                        worker_id,
                        job_id,
                        token,
                    });
                }
            }
        }
        fired
    }

    /// VmRSS of worker `id` in KiB, from `/proc/<pid>/status`.
    pub fn rss_kib(&self, id: u32) -> Option<u64> {
        let pid = self.pid(id)?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    /// Lines of every worker's output, killed ones included, that start
    /// with `word` (e.g. [`REFUSED_COMPLETION`]).
    pub fn count_in_logs(&self, word: &str) -> usize {
        (1..self.next_id)
            .filter_map(|id| {
                std::fs::read_to_string(self.logs.join(format!("worker-{id}.log"))).ok()
            })
            .map(|log| {
                log.lines()
                    .filter(|l| l.split(' ').next() == Some(word))
                    .count()
            })
            .sum()
    }

    /// Every worker's warnings (killed ones included), each line prefixed
    /// with its worker: what to read when a run's outcome is wrong.
    pub fn warnings(&self) -> String {
        let mut out = String::new();
        for id in 1..self.next_id {
            let log = std::fs::read_to_string(self.logs.join(format!("worker-{id}.log")))
                .unwrap_or_default();
            for line in log.lines().filter(|l| l.contains(" WARN ")) {
                let _ = writeln!(out, "worker {id}: {line}");
            }
        }
        out
    }

    /// The end of worker `id`'s output.
    pub fn log_tail(&self, id: u32) -> String {
        tail(&self.logs.join(format!("worker-{id}.log")))
    }

    /// True once worker `id` has printed `ready` (it is connected, its
    /// worker started and its SIGTERM handler installed).
    pub fn is_ready(&self, id: u32) -> bool {
        std::fs::read_to_string(self.logs.join(format!("worker-{id}.log")))
            .is_ok_and(|log| log.lines().any(|l| l == "ready"))
    }

    /// Waits up to `limit` for every running worker to be ready.
    pub fn wait_ready(&mut self, limit: Duration) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        loop {
            self.check_running()?;
            let waiting: Vec<u32> = self
                .procs
                .keys()
                .copied()
                .filter(|&id| !self.is_ready(id))
                .collect();
            if waiting.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!("workers {waiting:?} not ready after {limit:?}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for every running worker to be ready (a worker signalled
    /// before it installed its handler would just die), SIGTERMs them and
    /// waits up to `limit` for each to exit; fails unless all exit
    /// successfully (graceful shutdown works) or die at a failpoint.
    pub fn shutdown(&mut self, limit: Duration) -> Result<(), String> {
        self.wait_ready(limit)?;
        for p in self.procs.values() {
            signal(p.pid, "TERM").map_err(|e| format!("SIGTERM {}: {e}", p.pid))?;
        }
        let deadline = Instant::now() + limit;
        let mut problems = String::new();
        for (id, mut p) in std::mem::take(&mut self.procs) {
            loop {
                match p.child.try_wait() {
                    Ok(Some(status)) if status.success() => break,
                    Ok(Some(status)) if died_at_failpoint(&self.template, status) => {
                        self.killed.insert(id);
                        break;
                    }
                    Ok(Some(status)) => {
                        let _ = writeln!(
                            problems,
                            "worker {id} exited with {status}:\n{}",
                            tail(&p.log)
                        );
                        break;
                    }
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    _ => {
                        let _ = p.child.kill();
                        let _ = p.child.wait();
                        let _ = writeln!(
                            problems,
                            "worker {id} did not stop within {limit:?} of SIGTERM:\n{}",
                            tail(&p.log)
                        );
                        break;
                    }
                }
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for p in self.procs.values_mut() {
            let _ = signal(p.pid, "CONT");
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
    }
}

/// Whether a worker started from `template` that exited with `status`
/// died at a failpoint (only workers with failpoints armed do).
fn died_at_failpoint(template: &WorkerArgs, status: std::process::ExitStatus) -> bool {
    template.failpoint_one_in > 0 && status.code() == Some(FAILPOINT_EXIT)
}

fn signal(pid: u32, name: &str) -> std::io::Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()?;
    if status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "kill -{name} {pid}: {status}"
        )))
    }
}

fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Every job of `backend`, by id.
pub async fn all_jobs(backend: &dyn Backend) -> relayq_core::Result<Vec<Job>> {
    let mut jobs = Vec::new();
    let mut after = None;
    loop {
        let page = backend
            .list(&ListFilter::new().after(after).limit(1000))
            .await?;
        jobs.extend(page.jobs);
        match page.next {
            Some(next) => after = Some(next),
            None => return Ok(jobs),
        }
    }
}

/// What a checked run came to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Jobs checked.
    pub jobs: usize,
    /// Ledger rows (handler runs).
    pub runs: usize,
    /// Jobs that ran more than once.
    pub rerun_jobs: usize,
    /// Handler runs under a lease other than the completing one.
    pub superseded_runs: usize,
}

/// What happened to the workers of a run, for [`check_outcome`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Interruptions {
    /// Workers SIGKILLed.
    pub killed: BTreeSet<u32>,
    /// Workers frozen past their leases (or stalled by a frozen one).
    pub frozen: BTreeSet<u32>,
    /// (worker, job) pairs where the store refused the worker's stale
    /// lease: a late completion or extension.
    pub refused: BTreeSet<(u32, JobId)>,
    /// (job, token) pairs whose completion the store acknowledged to the
    /// worker holding that lease.
    pub completed: BTreeSet<(JobId, i64)>,
}

/// Checks a finished run: `jobs` (every job of the store) against the
/// ids pushed and the `ledger`.
///
/// - Every pushed job exists and is `Done`; there are no other jobs.
/// - Each has ledger runs; the run with the highest token holds the token
///   the job was completed under (`lease_token`), and the stored result
///   names that run's worker and token: the accepted completion came from
///   the newest lease, never a stale one.
/// - No token appears twice for a job (one run per lease) or above the
///   job's `lease_token`.
/// - With `interruptions`, every other (superseded) run is explained: its
///   worker was frozen past its lease, or was killed while holding the job
///   (it never came back to it: the store never refused it that job's
///   lease — a worker killed later does not excuse a lease lost earlier).
///   With `None` (database faults, where a completion can be lost with its
///   connection) superseded runs are allowed.
pub fn check_outcome(
    pushed: &BTreeSet<JobId>,
    jobs: &[Job],
    ledger: &[LedgerEntry],
    interruptions: Option<&Interruptions>,
) -> Result<Summary, String> {
    let mut problems: Vec<String> = Vec::new();
    let mut by_job: BTreeMap<JobId, Vec<&LedgerEntry>> = BTreeMap::new();
    for e in ledger {
        by_job.entry(e.job_id).or_default().push(e);
    }
    let present: BTreeSet<JobId> = jobs.iter().map(|j| j.id).collect();
    for id in pushed.difference(&present) {
        problems.push(format!("job {id} was pushed but is gone"));
    }
    for id in present.difference(pushed) {
        problems.push(format!("job {id} exists but was never pushed"));
    }
    let mut summary = Summary {
        jobs: jobs.len(),
        runs: ledger.len(),
        ..Summary::default()
    };
    for job in jobs {
        if job.status != JobStatus::Done {
            problems.push(format!(
                "job {} is {:?}, not Done (attempts {}, last_error {:?})",
                job.id, job.status, job.attempts, job.last_error
            ));
            continue;
        }
        let Some(runs) = by_job.get(&job.id) else {
            problems.push(format!(
                "job {} is Done but no handler run was recorded",
                job.id
            ));
            continue;
        };
        if runs.len() > 1 {
            summary.rerun_jobs += 1;
        }
        let mut tokens = BTreeSet::new();
        for r in runs {
            if !tokens.insert(r.token) {
                problems.push(format!("job {}: token {} ran twice", job.id, r.token));
            }
        }
        let Some(last) = runs.iter().max_by_key(|r| r.token) else {
            continue;
        };
        let fails_first = serde_json::from_value::<CrashJob>((*job.payload).clone())
            .is_ok_and(|crash| fails_first_attempt(crash.seq));
        if fails_first && last.attempt == 1 {
            problems.push(format!(
                "job {} is Done by its first attempt, which fails by design",
                job.id
            ));
        }
        if last.token != job.lease_token {
            problems.push(format!(
                "job {}: completed under token {} but the newest run held token {}",
                job.id, job.lease_token, last.token
            ));
        }
        let expected = json!({ "worker": last.worker_id, "token": last.token });
        if job.result.as_ref() != Some(&expected) {
            problems.push(format!(
                "job {}: result {:?} is not the newest run's {expected} (a stale completion was accepted)",
                job.id, job.result
            ));
        }
        for r in runs.iter().filter(|r| r.token != last.token) {
            if r.token > job.lease_token {
                problems.push(format!(
                    "job {}: worker {} ran it under token {}, above the job's {}",
                    job.id, r.worker_id, r.token, job.lease_token
                ));
            }
            if fails_first && r.attempt == 1 {
                // Retried by design, not run again by mistake.
                continue;
            }
            summary.superseded_runs += 1;
            let Some(i) = interruptions else { continue };
            // Done once the store acknowledged it: nothing excuses a run
            // after that, whatever befell the worker later.
            if i.completed.contains(&(job.id, r.token)) {
                problems.push(format!(
                    "job {}: the store acknowledged worker {}'s completion under token {}, \
                     yet it ran again (token {}, worker {})",
                    job.id, r.worker_id, r.token, last.token, last.worker_id
                ));
                continue;
            }
            let frozen = i.frozen.contains(&r.worker_id);
            let died_holding =
                i.killed.contains(&r.worker_id) && !i.refused.contains(&(r.worker_id, job.id));
            if !frozen && !died_holding {
                problems.push(format!(
                    "job {}: worker {} ran it under token {}, was neither frozen nor killed \
                     holding it{}, yet it ran again (token {}, worker {})",
                    job.id,
                    r.worker_id,
                    r.token,
                    if i.refused.contains(&(r.worker_id, job.id)) {
                        " (the store refused it that lease)"
                    } else {
                        ""
                    },
                    last.token,
                    last.worker_id
                ));
            }
        }
    }
    if problems.is_empty() {
        Ok(summary)
    } else {
        let n = problems.len();
        problems.truncate(30);
        Err(format!(
            "{n} problem(s) in the run's outcome:\n{}",
            problems.join("\n")
        ))
    }
}

/// Counts of the harness's jobs (queue `crash`) per status.
pub async fn status_counts(backend: &dyn Backend) -> relayq_core::Result<StatusCounts> {
    Ok(backend.stats().await?.queue(CrashJob::QUEUE))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// A run's entry in the ledger.
    fn run(job_id: JobId, attempt: i32, worker_id: u32, token: i64) -> LedgerEntry {
        LedgerEntry {
            job_id,
            attempt,
            worker_id,
            pid: 1000 + worker_id,
            token,
        }
    }

    /// Job `id` (crash job `seq`) done under `token` by `worker`, with the
    /// result that worker's handler returns.
    fn done(id: JobId, seq: i64, worker: u32, token: i64) -> Job {
        let at = time::OffsetDateTime::UNIX_EPOCH;
        Job {
            id,
            queue: CrashJob::QUEUE.into(),
            kind: CrashJob::KIND.into(),
            payload: Arc::new(json!({ "seq": seq })),
            priority: 0,
            status: JobStatus::Done,
            attempts: i32::try_from(token).expect("small"),
            max_attempts: 25,
            lease_token: token,
            run_at: at,
            locked_until: None,
            unique_key: None,
            last_error: None,
            result: Some(json!({ "worker": worker, "token": token })),
            created_at: at,
            updated_at: at,
        }
    }

    fn interrupted(killed: &[u32], frozen: &[u32], refused: &[(u32, JobId)]) -> Interruptions {
        Interruptions {
            killed: killed.iter().copied().collect(),
            frozen: frozen.iter().copied().collect(),
            refused: refused.iter().copied().collect(),
            completed: BTreeSet::new(),
        }
    }

    fn check(jobs: &[Job], ledger: &[LedgerEntry], i: &Interruptions) -> Result<Summary, String> {
        let pushed = jobs.iter().map(|j| j.id).collect();
        check_outcome(&pushed, jobs, ledger, Some(i))
    }

    #[test]
    fn a_clean_run_and_a_rerun_after_a_kill_pass() {
        let jobs = [done(1, 0, 1, 1), done(2, 1, 2, 2)];
        // Job 2 ran on worker 1, which was killed holding it; then on 2.
        let ledger = [run(1, 1, 1, 1), run(2, 1, 1, 1), run(2, 2, 2, 2)];
        let summary = check(&jobs, &ledger, &interrupted(&[1], &[], &[])).expect("sound");
        assert_eq!((summary.rerun_jobs, summary.superseded_runs), (1, 1));
    }

    #[test]
    fn a_rerun_after_an_acknowledged_completion_is_flagged_whatever_befell_its_worker() {
        let jobs = [done(2, 1, 2, 2)];
        let ledger = [run(2, 1, 1, 1), run(2, 2, 2, 2)];
        let mut i = interrupted(&[1], &[1], &[]);
        assert!(
            check(&jobs, &ledger, &i).is_ok(),
            "killed and frozen: excused"
        );
        // The store had told worker 1 its completion under token 1 was
        // done: the job must never have run again.
        i.completed.insert((2, 1));
        let e = check(&jobs, &ledger, &i).expect_err("acknowledged, then run again");
        assert!(e.contains("acknowledged worker 1's completion"), "{e}");
    }

    #[test]
    fn an_unexplained_rerun_is_flagged() {
        let jobs = [done(1, 0, 2, 2)];
        let ledger = [run(1, 1, 1, 1), run(1, 2, 2, 2)];
        let e = check(&jobs, &ledger, &interrupted(&[], &[], &[])).expect_err("worker 1 ran on");
        assert!(e.contains("neither frozen nor killed"), "{e}");
        // Killed, but the store had refused it that lease: it did not die
        // holding the job.
        let e = check(&jobs, &ledger, &interrupted(&[1], &[], &[(1, 1)])).expect_err("refused");
        assert!(e.contains("the store refused it that lease"), "{e}");
    }

    #[test]
    fn an_accepted_stale_completion_is_flagged() {
        // Stored under the newest token, but with the stale run's result.
        let mut job = done(1, 0, 2, 2);
        job.result = Some(json!({ "worker": 1, "token": 1 }));
        let ledger = [run(1, 1, 1, 1), run(1, 2, 2, 2)];
        let e = check(&[job], &ledger, &interrupted(&[], &[1], &[])).expect_err("stale");
        assert!(e.contains("a stale completion was accepted"), "{e}");
        // Completed under a token older than the newest run's.
        let job = done(1, 0, 1, 1);
        let e = check(&[job], &ledger, &interrupted(&[], &[1], &[])).expect_err("old token");
        assert!(e.contains("but the newest run held token 2"), "{e}");
    }

    #[test]
    fn a_token_run_twice_a_lost_job_and_an_unfinished_one_are_flagged() {
        let ledger = [run(1, 1, 1, 1), run(1, 1, 2, 1)];
        let e =
            check(&[done(1, 0, 2, 1)], &ledger, &interrupted(&[1], &[], &[])).expect_err("twice");
        assert!(e.contains("token 1 ran twice"), "{e}");
        let pushed: BTreeSet<JobId> = [1, 2].into();
        let e = check_outcome(&pushed, &[done(1, 0, 1, 1)], &[run(1, 1, 1, 1)], None)
            .expect_err("lost");
        assert!(e.contains("job 2 was pushed but is gone"), "{e}");
        let mut pending = done(1, 0, 1, 1);
        pending.status = JobStatus::Pending;
        let e = check(&[pending], &[run(1, 1, 1, 1)], &interrupted(&[], &[], &[]))
            .expect_err("unfinished");
        assert!(e.contains("not Done"), "{e}");
    }

    #[test]
    fn only_the_failing_first_attempt_of_a_failing_job_is_excused() {
        // Crash job 13 fails its first attempt by design.
        assert!(fails_first_attempt(13) && !fails_first_attempt(14));
        let ledger = [run(1, 1, 1, 1), run(1, 2, 1, 2)];
        let summary = check(&[done(1, 13, 1, 2)], &ledger, &interrupted(&[], &[], &[]))
            .expect("retried by design");
        assert_eq!(
            summary.superseded_runs, 0,
            "a designed retry is no interruption"
        );
        let e = check(&[done(1, 14, 1, 2)], &ledger, &interrupted(&[], &[], &[]))
            .expect_err("job 14 has no designed failure");
        assert!(e.contains("neither frozen nor killed"), "{e}");
        let e = check(
            &[done(1, 13, 1, 1)],
            &[run(1, 1, 1, 1)],
            &interrupted(&[], &[], &[]),
        )
        .expect_err("done by the failing attempt");
        assert!(e.contains("which fails by design"), "{e}");
    }

    #[test]
    fn one_job_in_n_arms_each_failpoint_in_turn() {
        let armed: Vec<_> = (1..=7).map(|id| Failpoint::of(id * 10, 10)).collect();
        use Failpoint::{Claimed, Completed, Ran};
        let expected = [Ran, Completed, Claimed, Ran, Completed, Claimed, Ran];
        assert_eq!(armed, expected.map(Some));
        assert_eq!(Failpoint::of(11, 10), None);
        assert_eq!(Failpoint::of(10, 0), None, "0 arms none");
        for point in Failpoint::ALL {
            assert_eq!(Failpoint::parse(point.name()), Some(point));
        }
        let mut args = WorkerArgs::new(Store::Sqlite {
            url: "sqlite://x.db".into(),
        });
        args.failpoint_one_in = 100;
        assert_eq!(WorkerArgs::parse(args.to_args()), Ok(args));
    }

    #[test]
    fn each_failpoint_holds_its_job_to_its_window() {
        let fired = |point, job_id| Fired {
            point,
            worker_id: 1,
            job_id,
            token: 1,
        };
        // Job 1: claimed by worker 1, which died before running it.
        // Job 2: run by worker 1, which died before completing it.
        // Job 3: run and completed by worker 1, which died then.
        let jobs = [done(1, 0, 2, 2), done(2, 1, 2, 2), done(3, 2, 1, 1)];
        let ledger = [
            run(1, 2, 2, 2),
            run(2, 1, 1, 1),
            run(2, 2, 2, 2),
            run(3, 1, 1, 1),
        ];
        let deaths = [
            fired(Failpoint::Claimed, 1),
            fired(Failpoint::Ran, 2),
            fired(Failpoint::Completed, 3),
        ];
        let counts = check_failpoints(&deaths, &jobs, &ledger).expect("each in its window");
        assert_eq!(counts.values().sum::<usize>(), 3);
        assert_eq!(counts.len(), 3);

        // A claim whose handler ran anyway, under the dead worker's lease.
        let e = check_failpoints(&deaths[..1], &jobs, &[run(1, 1, 1, 1), run(1, 2, 2, 2)])
            .expect_err("ran after its worker died");
        assert!(e.contains("the dead worker's run is recorded"), "{e}");
        // A job that ran but never ran again.
        let e = check_failpoints(&deaths[1..2], &[done(2, 1, 1, 1)], &ledger[1..2])
            .expect_err("completed by the dead worker");
        assert!(e.contains("a later run is not recorded"), "{e}");
        // A completed job that ran again.
        let ledger = [run(3, 1, 1, 1), run(3, 2, 2, 2)];
        let e = check_failpoints(&deaths[2..], &[done(3, 2, 2, 2)], &ledger)
            .expect_err("ran after its completion");
        assert!(e.contains("a later run is recorded"), "{e}");
        // A job left unfinished.
        let mut pending = done(1, 0, 2, 2);
        pending.status = JobStatus::Pending;
        let e =
            check_failpoints(&deaths[..1], &[pending], &[run(1, 2, 2, 2)]).expect_err("not done");
        assert!(e.contains("Pending"), "{e}");
    }
}
