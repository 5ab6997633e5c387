//! Database faults (issue #7, item 2), on PostgreSQL, with worker OS
//! processes running through a few thousand jobs:
//!
//! - the server restarts mid-run (`pg_ctl restart -m fast`), and later
//!   goes down for 3 s and comes back (a throwaway cluster of the test's
//!   own: the shared server is never restarted);
//! - separately, every session of the workers — pool connections and the
//!   LISTEN connection alike — is killed with `pg_terminate_backend`,
//!   three times (only sessions whose `application_name` is the test's).
//!
//! The workers must recover by themselves: none exits, each runs jobs
//! again after the fault, each gets its LISTEN connection back, no job
//! stays `Processing` long past its lease, and every job ends `Done` with
//! its completion accepted from its newest lease.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use relayq_core::{Backend, JobId, JobType, Puller, Pusher};
use relayq_postgres::sqlx::{self, AssertSqlSafe, Connection, PgConnection};
use relayq_postgres::{PgBackend, PgOptions, testing};
use relayq_reliability::crash::{
    CrashJob, Fleet, Ledger, Store, WorkerArgs, all_jobs, check_outcome, status_counts,
};
use relayq_reliability::pg_cluster::TempCluster;

const WORKER: &str = env!("CARGO_BIN_EXE_relayq-crash-worker");

/// Liveness limit for each phase of a run.
const LIVENESS: Duration = Duration::from_secs(60);

/// The longest a job may stay `Processing` past its lease's end before it
/// counts as stuck (leases are 1 s; workers poll every 500 ms).
const STUCK_AFTER: Duration = Duration::from_secs(10);

const WORKERS: usize = 3;

fn template(url: &str, schema: &str, app: &str) -> WorkerArgs {
    let mut args = WorkerArgs::new(Store::Postgres {
        url: url.to_owned(),
        schema: schema.to_owned(),
        app: app.to_owned(),
    });
    args.concurrency = 8;
    args.pool = 3;
    args.sleep_min = Duration::from_millis(10);
    args.sleep_max = Duration::from_millis(40);
    args
}

/// Pushes `n` jobs numbered from `from`, retrying while the server is
/// unreachable (the test's own pool recovers like the workers').
async fn push(backend: &PgBackend, from: i64, n: i64, pushed: &mut BTreeSet<JobId>) {
    let started = Instant::now();
    for chunk in (from..from + n).step_by(500) {
        let count = (from + n - chunk).min(500);
        loop {
            match backend.push_batch(CrashJob::batch(chunk, count)).await {
                Ok(outcomes) => {
                    pushed.extend(outcomes.iter().map(|o| o.id()));
                    break;
                }
                Err(e) if started.elapsed() < LIVENESS => {
                    eprintln!("push failed, retrying: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("could not push for {LIVENESS:?}: {e}"),
            }
        }
    }
}

/// Sessions of the test's workers: (pid, application_name).
async fn sessions(admin: &mut PgConnection, prefix: &str) -> Vec<(i32, String)> {
    sqlx::query_as(
        "SELECT pid, application_name FROM pg_stat_activity WHERE application_name LIKE $1",
    )
    .bind(format!("{prefix}-w%"))
    .fetch_all(admin)
    .await
    .expect("read pg_stat_activity")
}

/// Seconds the most overdue `Processing` job is past its lease (0 if none).
async fn most_overdue(backend: &PgBackend) -> Option<f64> {
    sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT coalesce(extract(epoch FROM max(now() - locked_until)), 0)::float8
         FROM \"{}\".jobs WHERE status = 'processing'",
        backend.schema()
    )))
    .fetch_one(backend.pool())
    .await
    .ok()
}

/// Waits until every job is `Done`, failing on a worker that exited, a job
/// stuck past its lease, or the liveness limit.
async fn wait_all_done(backend: &PgBackend, fleet: &mut Fleet, total: u64, phase: &str) {
    let started = Instant::now();
    loop {
        fleet
            .check_running()
            .unwrap_or_else(|e| panic!("{phase}: {e}"));
        if let Some(overdue) = most_overdue(backend).await {
            assert!(
                overdue < STUCK_AFTER.as_secs_f64(),
                "{phase}: a job is Processing {overdue:.1} s past its lease"
            );
        }
        match status_counts(backend).await {
            Ok(counts) if counts.done >= total => return,
            Ok(counts) => assert!(
                started.elapsed() < LIVENESS,
                "{phase}: only {counts:?} of {total} jobs after {LIVENESS:?}"
            ),
            Err(e) => assert!(
                started.elapsed() < LIVENESS,
                "{phase}: store unreachable for {LIVENESS:?}: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until at least `n` jobs are `Done`.
async fn wait_done_at_least(backend: &PgBackend, fleet: &mut Fleet, n: u64) {
    let started = Instant::now();
    loop {
        fleet.check_running().unwrap_or_else(|e| panic!("{e}"));
        if status_counts(backend).await.is_ok_and(|c| c.done >= n) {
            return;
        }
        assert!(
            started.elapsed() < LIVENESS,
            "fewer than {n} jobs done after {LIVENESS:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until each running worker has exactly one LISTEN session again.
async fn wait_listeners(url: &str, prefix: &str, fleet: &Fleet) {
    let started = Instant::now();
    let expected: BTreeSet<String> = fleet
        .live()
        .into_iter()
        .filter_map(|id| fleet.app_name(id))
        .map(|app| format!("{app}-listener"))
        .collect();
    loop {
        let mut found = Vec::new();
        if let Ok(mut admin) = PgConnection::connect(url).await {
            found = sessions(&mut admin, prefix)
                .await
                .into_iter()
                .map(|(_, app)| app)
                .filter(|app| app.ends_with("-listener"))
                .collect();
            let _ = admin.close().await;
        }
        found.sort();
        let unique: BTreeSet<String> = found.iter().cloned().collect();
        if unique == expected && found.len() == expected.len() {
            return;
        }
        assert!(
            started.elapsed() < LIVENESS,
            "LISTEN sessions not back after {LIVENESS:?}: expected {expected:?}, found {found:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Fails unless every running worker wrote ledger rows after `mark`: each
/// recovered by itself, not just some of them.
async fn assert_all_worked_since(ledger: &Ledger, fleet: &Fleet, mark: i64) {
    let since = ledger.workers_since(mark).await.expect("ledger");
    let live: BTreeSet<u32> = fleet.live().into_iter().collect();
    assert!(
        live.is_subset(&since),
        "workers {:?} ran no job after the fault (only {since:?} did)",
        live.difference(&since).collect::<Vec<_>>()
    );
}

/// Checks the end of a fault run and stops the workers.
async fn finish(
    backend: &PgBackend,
    ledger: &Ledger,
    fleet: &mut Fleet,
    pushed: &BTreeSet<JobId>,
    after_fault: i64,
) {
    assert_all_worked_since(ledger, fleet, after_fault).await;
    fleet
        .shutdown(Duration::from_secs(20))
        .expect("graceful shutdown after the fault");
    let jobs = all_jobs(backend as &dyn Backend).await.expect("list jobs");
    let entries = ledger.entries().await.expect("ledger");
    // Completions lost with a connection make legitimate reruns, so reruns
    // are not limited to interrupted workers here.
    let summary = check_outcome(pushed, &jobs, &entries, None).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{summary:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_survive_a_postgres_restart() {
    let Some(cluster) = TempCluster::start_or_opt_out() else {
        return;
    };
    let url = cluster.url();
    let schema = "relayq_restart";
    let backend = PgBackend::connect_with(
        PgOptions::new(url.clone())
            .schema(schema)
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(10)),
    )
    .await
    .expect("connect to the throwaway cluster");
    let ledger = Ledger::postgres(&backend);
    ledger.create().await.expect("ledger");
    let mut pushed = BTreeSet::new();
    push(&backend, 0, 1500, &mut pushed).await;

    let logs = tempfile::tempdir().expect("logs");
    let prefix = format!("rq-restart-{}", std::process::id());
    let mut fleet = Fleet::new(WORKER, template(&url, schema, &prefix), logs.path());
    for _ in 0..WORKERS {
        fleet.spawn().expect("spawn");
    }
    fleet.wait_ready(LIVENESS).expect("workers ready");
    wait_listeners(&url, &prefix, &fleet).await;
    wait_done_at_least(&backend, &mut fleet, 300).await;

    let mark = ledger.high_water().await.expect("ledger");
    let restarted = Instant::now();
    tokio::task::block_in_place(|| cluster.restart()).expect("restart the throwaway cluster");
    eprintln!("restarted in {:?}", restarted.elapsed());
    push(&backend, 1500, 500, &mut pushed).await;

    wait_done_at_least(&backend, &mut fleet, 1200).await;
    wait_listeners(&url, &prefix, &fleet).await;
    assert_all_worked_since(&ledger, &fleet, mark).await;
    eprintln!("working again {:?} after the restart", restarted.elapsed());

    // Then a real outage: the server is down for 3 s (connections are
    // refused, the listener backs off), then comes back.
    let mark = ledger.high_water().await.expect("ledger");
    tokio::task::block_in_place(|| cluster.stop()).expect("stop the throwaway cluster");
    tokio::time::sleep(Duration::from_secs(3)).await;
    tokio::task::block_in_place(|| cluster.start_again()).expect("start it again");
    let back = Instant::now();
    push(&backend, 2000, 500, &mut pushed).await;

    wait_all_done(
        &backend,
        &mut fleet,
        pushed.len() as u64,
        "after the outage",
    )
    .await;
    wait_listeners(&url, &prefix, &fleet).await;
    eprintln!("all done {:?} after the server came back", back.elapsed());
    finish(&backend, &ledger, &mut fleet, &pushed, mark).await;
    backend.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_survive_terminated_connections() {
    let backend = testing::connect(testing::options()).await;
    let url = testing::database_url();
    let ledger = Ledger::postgres(&backend);
    ledger.create().await.expect("ledger");
    let mut pushed = BTreeSet::new();
    push(&backend, 0, 2000, &mut pushed).await;

    let logs = tempfile::tempdir().expect("logs");
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let prefix = format!("rq-term-{}-{nanos:x}", std::process::id());
    let mut fleet = Fleet::new(
        WORKER,
        template(&url, backend.schema(), &prefix),
        logs.path(),
    );
    for _ in 0..WORKERS {
        fleet.spawn().expect("spawn");
    }
    fleet.wait_ready(LIVENESS).expect("workers ready");
    wait_listeners(&url, &prefix, &fleet).await;

    let mut admin = testing::admin().await;
    let mut mark = 0;
    for round in 1..=3u64 {
        wait_done_at_least(&backend, &mut fleet, round * 400).await;
        mark = ledger.high_water().await.expect("ledger");
        // Read the pids first, then terminate them one by one: never a
        // filter and a terminate in one statement, never another session.
        let victims = sessions(&mut admin, &prefix).await;
        let listeners = victims
            .iter()
            .filter(|(_, app)| app.ends_with("-listener"))
            .count();
        assert_eq!(
            listeners, WORKERS,
            "round {round}: every worker's LISTEN session should be among the victims: {victims:?}"
        );
        for (pid, _) in &victims {
            sqlx::query("SELECT pg_terminate_backend($1)")
                .bind(pid)
                .execute(&mut admin)
                .await
                .expect("terminate");
        }
        eprintln!("round {round}: terminated {} sessions", victims.len());
        wait_listeners(&url, &prefix, &fleet).await;
    }
    wait_all_done(
        &backend,
        &mut fleet,
        pushed.len() as u64,
        "after the terminations",
    )
    .await;
    finish(&backend, &ledger, &mut fleet, &pushed, mark).await;
    let _ = admin.close().await;
    let schema = backend.schema().to_owned();
    backend.close().await;
    testing::drop_schema(&schema).await;
}

/// What the writers of [`a_server_crash_loses_no_acknowledged_write`] were
/// told was done.
#[derive(Default)]
struct Acknowledged {
    /// Each job pushed, with the `seq` of its payload: an id alone would
    /// be found again were a lost job's id handed to a later push.
    pushed: std::sync::Mutex<Vec<(JobId, i64)>>,
    completed: std::sync::Mutex<Vec<JobId>>,
    /// Writes that failed (the crash cut them off).
    failed: std::sync::atomic::AtomicUsize,
}

impl Acknowledged {
    fn pushed(&self, jobs: impl IntoIterator<Item = (JobId, i64)>) {
        self.pushed.lock().expect("lock").extend(jobs);
    }

    fn completed(&self, ids: impl IntoIterator<Item = JobId>) {
        self.completed.lock().expect("lock").extend(ids);
    }

    fn failed(&self) {
        self.failed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Lets `writers` run for a while, crashes `cluster` under them, and
/// checks that every write they were told was done survived: each push
/// stored, each completion `Done`. `busy` is the fewest pushes and
/// completions acknowledged before the crash for the run to count.
async fn crash_under(
    cluster: std::sync::Arc<TempCluster>,
    options: PgOptions,
    mut writers: tokio::task::JoinSet<()>,
    acked: &Acknowledged,
    busy: (usize, usize),
) {
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Counted before the crash: what was acknowledged after the restart
    // says nothing of how busy the writers were when it came.
    let before = (
        acked.pushed.lock().expect("lock").len(),
        acked.completed.lock().expect("lock").len(),
    );
    // The writers go on until the server is gone, and a little after.
    tokio::task::spawn_blocking(move || cluster.crash())
        .await
        .expect("crash task")
        .expect("crash and restart");
    // The writers loop for ever: one that ended failed a check of its own
    // (a panic the shutdown below would discard).
    while let Some(ended) = writers.try_join_next() {
        ended.expect("a writer failed");
    }
    writers.shutdown().await;
    let pushed = acked.pushed.lock().expect("lock").clone();
    let completed = acked.completed.lock().expect("lock").clone();
    let failed = acked.failed.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        before.0 >= busy.0 && before.1 >= busy.1 && failed > 0,
        "the writers were busy when the server crashed: {} pushes, {} completions \
         acknowledged before it, {failed} writes failed",
        before.0,
        before.1
    );
    let after = PgBackend::connect_with(options).await.expect("reconnect");
    let stored: std::collections::HashMap<JobId, (String, i64)> =
        sqlx::query_as::<_, (JobId, String, i64)>(AssertSqlSafe(format!(
            "SELECT id, status, (payload::jsonb ->> 'seq')::int8 FROM \"{}\".jobs",
            after.schema()
        )))
        .fetch_all(after.pool())
        .await
        .expect("read every job")
        .into_iter()
        .map(|(id, status, seq)| (id, (status, seq)))
        .collect();
    // Stored under its id with its own payload.
    let lost: Vec<JobId> = pushed
        .iter()
        .filter(|(id, seq)| stored.get(id).map(|(_, stored)| stored) != Some(seq))
        .map(|(id, _)| *id)
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged pushes were lost: {lost:?}",
        lost.len(),
        pushed.len()
    );
    let undone: Vec<JobId> = completed
        .iter()
        .filter(|id| stored.get(id).map(|(status, _)| status.as_str()) != Some("done"))
        .copied()
        .collect();
    assert!(
        undone.is_empty(),
        "{} of {} acknowledged completions were lost: {undone:?}",
        undone.len(),
        completed.len()
    );
    after.close().await;
}

/// A crash of the server (every PostgreSQL process killed at once, WAL not
/// yet written lost: `pg_ctl stop -m immediate`) on a cluster with stock
/// durability loses nothing relayq reported done.
///
/// First, single pushes after quiet spells, alone: each commits without
/// waiting for the WAL flush (its notification leaves with the commit) and
/// then waits for the flush before it is reported, which only a crash
/// with no other writer's commit after it can check. Then pushes folded
/// together, batches, and completions, single and batched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_crash_loses_no_acknowledged_write() {
    let Some(cluster) = TempCluster::start_durable_or_opt_out() else {
        return;
    };
    let cluster = std::sync::Arc::new(cluster);
    let options = |schema: &str| {
        PgOptions::new(cluster.url())
            .schema(schema)
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(2))
            .reply_timeout(Some(Duration::from_secs(2)))
    };

    let quiet = PgBackend::connect_with(options("quiet"))
        .await
        .expect("connect");
    let acked = std::sync::Arc::new(Acknowledged::default());
    let mut writers = tokio::task::JoinSet::new();
    let (b, a) = (quiet.clone(), acked.clone());
    writers.spawn(async move {
        for seq in 0.. {
            match b.push(CrashJob { seq }.to_job()).await {
                Ok(pushed) => a.pushed([(pushed.id(), seq)]),
                Err(_) => a.failed(),
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
    crash_under(cluster.clone(), options("quiet"), writers, &acked, (100, 0)).await;

    let backend = PgBackend::connect_with(options("busy"))
        .await
        .expect("connect");
    let acked = std::sync::Arc::new(Acknowledged::default());
    let mut writers = tokio::task::JoinSet::new();
    // Pushes back to back from four tasks: folded together.
    for task in 0..4 {
        let (b, a) = (backend.clone(), acked.clone());
        writers.spawn(async move {
            for n in 0.. {
                let seq = 1_000_000 * (task + 1) + n;
                match b.push(CrashJob { seq }.to_job()).await {
                    Ok(pushed) => a.pushed([(pushed.id(), seq)]),
                    Err(_) => a.failed(),
                }
            }
        });
    }
    let (b, a) = (backend.clone(), acked.clone());
    writers.spawn(async move {
        for n in 0.. {
            match b.push_batch(CrashJob::batch(10 * n, 10)).await {
                Ok(pushed) => a.pushed(pushed.iter().map(|o| o.id()).zip(10 * n..)),
                Err(_) => a.failed(),
            }
        }
    });
    let (b, a) = (backend.clone(), acked.clone());
    writers.spawn(async move {
        loop {
            let Ok(leased) = b
                .pull(&relayq_core::PullRequest::queue(CrashJob::QUEUE).batch(20))
                .await
            else {
                a.failed();
                continue;
            };
            let (one, rest) = leased.split_at(leased.len().min(5));
            for l in one {
                match b.complete(&l.lease, None).await {
                    Ok(()) => a.completed([l.job.id]),
                    Err(_) => a.failed(),
                }
            }
            let batch: Vec<relayq_core::Completion> = rest.iter().map(|l| l.lease.into()).collect();
            match b.complete_batch(batch).await {
                Ok(lost) => {
                    assert!(lost.is_empty(), "nothing else holds these: {lost:?}");
                    a.completed(rest.iter().map(|l| l.job.id));
                }
                Err(_) => a.failed(),
            }
        }
    });
    crash_under(
        cluster.clone(),
        options("busy"),
        writers,
        &acked,
        (1000, 100),
    )
    .await;
}
