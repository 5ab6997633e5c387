//! Load (issue #7, item 6): many jobs through 4 worker OS processes on
//! PostgreSQL, while jobs keep being pushed.
//!
//! Each handler run adds 1 to its job's row in a counter table
//! (`load_counter`, keyed by the job's number). At the end every job is
//! `Done` and every counter is exactly 1: nothing lost, nothing run twice.
//! Meanwhile, every 250 ms:
//!
//! - each worker's resident memory (`VmRSS` of `/proc/<pid>/status`);
//!   the rule: the largest sample of the last quarter of the run may not
//!   exceed the largest of the first quarter by more than 50 % + 20 MiB
//!   (flat memory, with room for allocator noise);
//! - each worker's sessions in `pg_stat_activity` (by its unique
//!   `application_name`, pool and listener): never more than its pool
//!   size plus the one LISTEN connection.
//!
//! CI runs 20,000 jobs. The full run, 1,000,000 jobs, is ignored by
//! default:
//!
//! ```text
//! cargo test -p relayq-reliability --release --test load -- --ignored --nocapture
//! ```
//!
//! It starts a throwaway cluster of its own, like the restart test.
//!
//! `RELAYQ_LOAD_JOBS=n` overrides the size of either test.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use relayq_core::Pusher;
use relayq_postgres::sqlx::{self, AssertSqlSafe, Connection, PgConnection};
use relayq_postgres::{PgBackend, PgOptions, testing};
use relayq_reliability::crash::{CrashJob, Fleet, Ledger, Mode, Store, WorkerArgs};
use relayq_reliability::pg_cluster::TempCluster;

const WORKER: &str = env!("CARGO_BIN_EXE_relayq-crash-worker");

const WORKERS: usize = 4;
const POOL: u32 = 4;
const PUSH_BATCH: i64 = 5_000;
/// The pusher keeps at most this many jobs waiting.
const BACKLOG: i64 = 50_000;
const SAMPLE_EVERY: Duration = Duration::from_millis(250);
/// Allowed growth of the late RSS peak over the early one.
const RSS_GROWTH_FACTOR: f64 = 1.5;
const RSS_GROWTH_SLACK_KIB: u64 = 20 * 1024;

fn jobs_from_env(default: i64) -> i64 {
    std::env::var("RELAYQ_LOAD_JOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Jobs not finished yet (`pending` or `processing`): read through the
/// partial claim index, so it stays cheap with a million finished rows.
async fn active(backend: &PgBackend) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT count(*) FROM \"{}\".jobs WHERE status IN ('pending', 'processing')",
        backend.schema()
    )))
    .fetch_one(backend.pool())
    .await
}

async fn load_run(url: String, backend: PgBackend, total: i64, liveness: Duration) {
    let ledger = Ledger::postgres(&backend);
    ledger.create().await.expect("create counter table");
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let prefix = format!("rq-load-{}-{nanos:x}", std::process::id());
    let mut template = WorkerArgs::new(Store::Postgres {
        url: url.clone(),
        schema: backend.schema().to_owned(),
        app: prefix.clone(),
    });
    template.mode = Mode::Count;
    template.concurrency = 16;
    template.pool = POOL;
    template.lease = Duration::from_secs(10);
    template.sleep_min = Duration::ZERO;
    template.sleep_max = Duration::ZERO;
    let tmp = tempfile::tempdir().expect("logs");
    // RELAYQ_KEEP_LOGS=1 keeps the workers' output for a post-mortem.
    let logs = if std::env::var("RELAYQ_KEEP_LOGS").as_deref() == Ok("1") {
        let kept = std::env::temp_dir().join(format!("relayq-load-logs-{}", std::process::id()));
        std::fs::create_dir_all(&kept).expect("logs");
        eprintln!("worker logs kept in {}", kept.display());
        kept
    } else {
        tmp.path().to_owned()
    };
    let mut fleet = Fleet::new(WORKER, template, &logs);
    for _ in 0..WORKERS {
        fleet.spawn().expect("spawn");
    }
    fleet
        .wait_ready(Duration::from_secs(60))
        .expect("workers ready");
    let ids = fleet.live();
    let apps: BTreeMap<String, u32> = ids
        .iter()
        .flat_map(|&id| {
            let app = fleet.app_name(id).expect("postgres app name");
            [(format!("{app}-listener"), id), (app, id)]
        })
        .collect();

    // The pusher: batches of 5,000 while fewer than 50,000 wait.
    let pushed = Arc::new(AtomicI64::new(0));
    let pusher = {
        let backend = backend.clone();
        let pushed = Arc::clone(&pushed);
        tokio::spawn(async move {
            let mut next = 0;
            while next < total {
                if active(&backend).await.expect("count active") >= BACKLOG {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                let n = PUSH_BATCH.min(total - next);
                backend
                    .push_batch(CrashJob::batch(next, n))
                    .await
                    .expect("push");
                next += n;
                pushed.store(next, Ordering::Relaxed);
            }
        })
    };

    let started = Instant::now();
    let mut rss: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    let mut max_sessions: BTreeMap<u32, i64> = BTreeMap::new();
    let mut admin = PgConnection::connect(&url).await.expect("admin connection");
    let mut last_report = Instant::now();
    loop {
        fleet.check_running().unwrap_or_else(|e| panic!("{e}"));
        for &id in &ids {
            if let Some(kib) = fleet.rss_kib(id) {
                rss.entry(id).or_default().push(kib);
            }
        }
        let sessions: Vec<(String, i64)> = sqlx::query_as(
            "SELECT application_name, count(*) FROM pg_stat_activity
             WHERE application_name LIKE $1 GROUP BY application_name",
        )
        .bind(format!("{prefix}-w%"))
        .fetch_all(&mut admin)
        .await
        .expect("pg_stat_activity");
        let mut now: BTreeMap<u32, i64> = BTreeMap::new();
        for (app, n) in sessions {
            let id = apps
                .get(&app)
                .unwrap_or_else(|| panic!("unexpected session {app:?}"));
            *now.entry(*id).or_default() += n;
        }
        for (id, n) in now {
            let max = max_sessions.entry(id).or_default();
            *max = (*max).max(n);
            assert!(
                n <= i64::from(POOL) + 1,
                "worker {id} holds {n} sessions, more than its pool of {POOL} plus one listener"
            );
        }
        let pushed_now = pushed.load(Ordering::Relaxed);
        let active_now = active(&backend).await.expect("count active");
        if pushed_now == total && active_now == 0 {
            break;
        }
        if last_report.elapsed() > Duration::from_secs(30) {
            eprintln!(
                "{:?}: {} done of {total}",
                started.elapsed(),
                pushed_now - active_now
            );
            last_report = Instant::now();
        }
        assert!(
            started.elapsed() < liveness,
            "{} of {total} jobs done after {liveness:?}",
            pushed_now - active_now
        );
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
    let elapsed = started.elapsed();
    pusher.await.expect("pusher");
    let final_rss: BTreeMap<u32, Option<u64>> =
        ids.iter().map(|&id| (id, fleet.rss_kib(id))).collect();
    fleet
        .shutdown(Duration::from_secs(30))
        .expect("graceful shutdown");

    // Every job Done, every counter exactly 1.
    let (done, all): (i64, i64) = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT count(*) FILTER (WHERE status = 'done'), count(*) FROM \"{}\".jobs",
        backend.schema()
    )))
    .fetch_one(backend.pool())
    .await
    .expect("count jobs");
    let (rows, sum, most, odd) = ledger.counter_summary().await.expect("counters");
    eprintln!(
        "{total} jobs through {WORKERS} worker processes in {elapsed:.1?} ({:.0} jobs/s)",
        total as f64 / elapsed.as_secs_f64()
    );
    eprintln!("max sessions per worker (pool {POOL} + 1 listener): {max_sessions:?}");
    for (id, samples) in &rss {
        let q = samples.len().div_ceil(4);
        eprintln!(
            "worker {id} RSS KiB: first {:?}, max first quarter {:?}, max last quarter {:?}, \
             last {:?}, samples {}",
            samples.first(),
            samples[..q].iter().max(),
            samples[samples.len() - q..].iter().max(),
            final_rss[id],
            samples.len()
        );
    }
    assert_eq!((done, all), (total, total), "jobs Done / all jobs");
    assert_eq!(
        (rows, sum, most, odd),
        (total, total, 1, 0),
        "(counters, runs, most runs of one job, jobs not run exactly once)"
    );

    // Connections: the bound was checked at every sample; the samples must
    // have seen the pool and the listener, or they measured nothing.
    for &id in &ids {
        let max = max_sessions.get(&id).copied().unwrap_or(0);
        assert!(
            max >= 2,
            "worker {id}: at most {max} sessions seen; sampling is broken"
        );
    }

    // Memory: flat, by the rule in the module docs.
    for (id, samples) in &rss {
        assert!(
            samples.len() >= 8,
            "worker {id}: only {} RSS samples",
            samples.len()
        );
        let q = samples.len() / 4;
        let early = samples[..q].iter().max().copied().unwrap_or(0);
        let late = samples[samples.len() - q..]
            .iter()
            .max()
            .copied()
            .unwrap_or(0);
        let limit = (early as f64 * RSS_GROWTH_FACTOR) as u64 + RSS_GROWTH_SLACK_KIB;
        assert!(
            late <= limit,
            "worker {id}: RSS grew from {early} KiB (max of the first quarter) to {late} KiB \
             (max of the last quarter), over the limit of {limit} KiB"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_jobs_through_four_workers() {
    let backend = testing::connect(testing::options()).await;
    let schema = backend.schema().to_owned();
    load_run(
        testing::database_url(),
        backend.clone(),
        jobs_from_env(20_000),
        Duration::from_secs(120),
    )
    .await;
    backend.close().await;
    testing::drop_schema(&schema).await;
}

/// The full-size run; see the module docs for the command. It runs on a
/// throwaway cluster of its own (autovacuum on, as in production; fsync
/// off), so its long churn neither loads the shared test server nor
/// depends on that server's settings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a million jobs take minutes; run with --ignored --release"]
async fn one_million_jobs_through_four_workers() {
    let cluster = TempCluster::start().unwrap_or_else(|e| panic!("throwaway cluster: {e}"));
    eprintln!("throwaway cluster at {}", cluster.url());
    let backend = PgBackend::connect_with(
        PgOptions::new(cluster.url())
            .schema("relayq_load")
            .max_connections(4),
    )
    .await
    .expect("connect to the throwaway cluster");
    load_run(
        cluster.url(),
        backend.clone(),
        jobs_from_env(1_000_000),
        Duration::from_secs(3600),
    )
    .await;
    backend.close().await;
}
