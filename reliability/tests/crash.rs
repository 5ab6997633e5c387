//! Crash test (issue #7, item 1): worker OS processes are SIGKILLed (and
//! sometimes frozen with SIGSTOP past their leases) at random mid-job while
//! they work through a few thousand jobs, on PostgreSQL and on a SQLite
//! file; replacements are started. One job in 100 to 150 also makes its worker
//! die at a failpoint: just after its claim committed, just after its
//! handler ran, or just after its completion committed (see
//! `relayq_reliability::crash::Failpoint`), windows a random kill seldom
//! hits. Each handler run writes (job, attempt,
//! worker, pid, fencing token) to a ledger table in the same database.
//!
//! At the end every job must be `Done` and none lost; a job may have run
//! more than once only where a worker holding it was interrupted; and the
//! completion the store accepted must come from the newest lease (the job's
//! token and result match its newest ledger run), never from a stale one.
//! See `relayq_reliability::crash::check_outcome`.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use relayq_core::Backend;
use relayq_postgres::testing;
use relayq_reliability::crash::{
    CrashJob, Fleet, Ledger, REFUSED_COMPLETION, REFUSED_EXTENSION, REFUSED_RETRY, Rng, Store,
    WorkerArgs, all_jobs, check_failpoints, check_outcome, status_counts,
};
use relayq_sqlite::SqliteBackend;

const WORKER: &str = env!("CARGO_BIN_EXE_relayq-crash-worker");

/// How long a run may take before the test fails: a liveness limit only.
const LIVENESS: Duration = Duration::from_secs(90);

struct Run {
    backend: Arc<dyn Backend>,
    ledger: Ledger,
    template: WorkerArgs,
    jobs: i64,
    workers: usize,
    /// Every this many faults, freeze a worker instead of killing one.
    pause_every: u32,
    /// Whether a frozen worker stalls every worker (SQLite: it may hold
    /// the file's write lock, so no one can renew a lease meanwhile).
    pause_stalls_all: bool,
    /// Whether the run must have seen the store refuse a stale completion.
    expect_refused_completion: bool,
}

/// Jobs pushed per extra round of faults.
const EXTRA_ROUND: i64 = 500;

/// Pushes the crash jobs numbered `range`, in batches of 500.
async fn push_jobs(backend: &dyn Backend, pushed: &mut BTreeSet<i64>, range: std::ops::Range<i64>) {
    for from in range.clone().step_by(500) {
        let n = (range.end - from).min(500);
        for outcome in backend
            .push_batch(CrashJob::batch(from, n))
            .await
            .expect("push")
        {
            pushed.insert(outcome.id());
        }
    }
}

async fn crash_run(run: Run) {
    let mut rng = Rng::from_time();
    eprintln!("rng seed state {}", rng.state());
    let logs = tempfile::tempdir().expect("log dir");
    run.ledger.create().await.expect("create ledger");

    let mut pushed = BTreeSet::new();
    push_jobs(&*run.backend, &mut pushed, 0..run.jobs).await;
    let mut total = pushed.len() as u64;

    let mut fleet = Fleet::new(WORKER, run.template.clone(), logs.path());
    for _ in 0..run.workers {
        fleet.spawn().expect("spawn worker");
    }

    // Chaos while the jobs run: every 100–300 ms kill a random worker and
    // start a replacement, or (now and then) freeze one with SIGSTOP past
    // its lease and let it go on: its late completions must be refused.
    let started = Instant::now();
    let mut kills = 0u32;
    let mut pauses = 0u32;
    let mut stopping_kills = 0u32;
    let mut mid_shutdown = 0u32;
    loop {
        // Workers that died at a failpoint are replaced like killed ones.
        let crashed = fleet.check_running().unwrap_or_else(|e| panic!("{e}"));
        for _ in 0..crashed {
            fleet.spawn().expect("spawn replacement");
        }
        let counts = status_counts(&*run.backend).await.expect("stats");
        // Jobs allow 25 attempts: a Dead one is lost work.
        assert_eq!(counts.dead, 0, "jobs died: {counts:?}");
        if counts.done >= total {
            // Whether a frozen worker wakes with a finished handler while
            // another holds its job is down to timing (on SQLite a frozen
            // worker may hold the write lock, so nobody takes its jobs):
            // another round of jobs and faults until it has happened, as
            // long as there is time for one.
            let more_time = started.elapsed() < LIVENESS * 2 / 3;
            if run.expect_refused_completion
                && more_time
                && fleet.count_in_logs(REFUSED_COMPLETION) == 0
            {
                let next = total as i64;
                push_jobs(&*run.backend, &mut pushed, next..next + EXTRA_ROUND).await;
                total = pushed.len() as u64;
                continue;
            }
            break;
        }
        assert!(
            started.elapsed() < LIVENESS,
            "only {counts:?} of {total} jobs finished after {LIVENESS:?} ({kills} kills, {pauses} pauses)"
        );
        tokio::time::sleep(rng.between(Duration::from_millis(100), Duration::from_millis(300)))
            .await;
        let live = fleet.live();
        let victim = live[rng.below(live.len() as u64) as usize];
        // Extra rounds are for a frozen worker waking with a finished
        // handler: every fault of theirs is a freeze.
        let extra_round = total > run.jobs as u64;
        if extra_round || (kills + pauses) % run.pause_every == run.pause_every - 1 {
            let freeze = run.template.lease
                + rng.between(Duration::from_millis(300), Duration::from_millis(800));
            fleet.pause(victim, freeze).await.expect("pause");
            if run.pause_stalls_all {
                fleet.mark_frozen(live);
            }
            pauses += 1;
        } else if kills % 4 == 3 {
            // Killed during its graceful shutdown: while it finishes its
            // running jobs or gives its buffered ones back.
            let after = rng.between(Duration::ZERO, Duration::from_millis(300));
            if fleet
                .kill_while_stopping(victim, after)
                .await
                .expect("kill while stopping")
            {
                mid_shutdown += 1;
            }
            fleet.spawn().expect("spawn replacement");
            kills += 1;
            stopping_kills += 1;
        } else {
            fleet.kill(victim).expect("kill");
            fleet.spawn().expect("spawn replacement");
            kills += 1;
        }
    }
    let elapsed = started.elapsed();
    fleet
        .shutdown(Duration::from_secs(20))
        .expect("graceful shutdown of the survivors");

    let jobs = all_jobs(&*run.backend).await.expect("list jobs");
    let ledger = run.ledger.entries().await.expect("read ledger");
    let interruptions = fleet.interruptions();
    let summary = check_outcome(&pushed, &jobs, &ledger, Some(&interruptions))
        .unwrap_or_else(|e| panic!("{e}\nworkers' warnings:\n{}", fleet.warnings()));
    let fired = check_failpoints(&fleet.failpoints_fired(), &jobs, &ledger)
        .unwrap_or_else(|e| panic!("{e}\nworkers' warnings:\n{}", fleet.warnings()));
    let refused_completions = fleet.count_in_logs(REFUSED_COMPLETION);
    let refused_extensions = fleet.count_in_logs(REFUSED_EXTENSION);
    let refused_retries = fleet.count_in_logs(REFUSED_RETRY);
    let warnings = fleet.warnings();
    eprintln!(
        "workers' warnings ({} lines, first 10):\n{}",
        warnings.lines().count(),
        warnings.lines().take(10).collect::<Vec<_>>().join("\n")
    );
    eprintln!(
        "{total} jobs in {elapsed:?}: {kills} kills ({stopping_kills} while stopping, \
         {mid_shutdown} of them before the shutdown ended), {pauses} pauses; deaths at \
         failpoints {fired:?}; {summary:?}; stale leases refused: {refused_completions} \
         completions, {refused_retries} retries, {refused_extensions} extensions"
    );
    // A worker died in each window between a job's commits at least once
    // (a job whose first lease died with another crash arms nothing).
    assert!(
        run.template.failpoint_one_in == 0 || fired.len() == 3,
        "not every failpoint was crossed: {fired:?}"
    );
    // The faults must have landed mid-job, or the run proved nothing.
    assert!(
        kills >= 5 && pauses >= 1 && stopping_kills >= 1,
        "only {kills} kills ({stopping_kills} while stopping) and {pauses} pauses happened \
         before the jobs ran out"
    );
    assert!(
        summary.superseded_runs > 0,
        "no handler run was interrupted: the kills never landed mid-job ({summary:?})"
    );
    // And a frozen worker must have come back with a finished handler and
    // a stale lease, or the fencing of completions went untested.
    assert!(
        !run.expect_refused_completion || refused_completions > 0,
        "no stale completion was attempted: the pauses never hit a finished handler"
    );
}

/// Records every change of a job row's status, fencing token or lease
/// end, with the changing statement's `now` (the server's
/// `statement_timestamp()`, which relayq's statements read too), so the
/// run can be checked change by change, not only at its end.
async fn record_lease_history(backend: &relayq_postgres::PgBackend) {
    let schema = backend.schema();
    relayq_postgres::sqlx::raw_sql(relayq_postgres::sqlx::AssertSqlSafe(format!(
        r#"CREATE TABLE "{schema}".lease_history (
               id bigint, old_status text, new_status text, old_token bigint,
               new_token bigint, old_until timestamptz, now timestamptz);
           CREATE FUNCTION "{schema}".record_lease() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN
               INSERT INTO "{schema}".lease_history VALUES (OLD.id, OLD.status, NEW.status,
                   OLD.lease_token, NEW.lease_token, OLD.locked_until,
                   pg_catalog.statement_timestamp());
               RETURN NULL;
           END $$;
           CREATE TRIGGER record_lease AFTER UPDATE ON "{schema}".jobs FOR EACH ROW
               WHEN (OLD.status IS DISTINCT FROM NEW.status
                     OR OLD.lease_token IS DISTINCT FROM NEW.lease_token
                     OR OLD.locked_until IS DISTINCT FROM NEW.locked_until)
               EXECUTE FUNCTION "{schema}".record_lease();"#
    )))
    .execute(backend.pool())
    .await
    .expect("lease history");
}

/// Checks every recorded change: a job was leased again (a new token) only
/// while pending or once its lease had ended (`locked_until < now`, as
/// the claim reads it), never while another worker's lease was live; and
/// a finished job never changed again.
async fn check_lease_history(backend: &relayq_postgres::PgBackend) {
    let schema = backend.schema();
    let counts: (i64, i64, i64, i64) =
        relayq_postgres::sqlx::query_as(relayq_postgres::sqlx::AssertSqlSafe(format!(
            r#"SELECT count(*),
                  count(*) FILTER (WHERE new_token <> old_token AND old_status = 'processing'),
                  count(*) FILTER (WHERE new_token <> old_token
                      AND NOT (old_status = 'pending'
                               OR (old_status = 'processing' AND old_until < now))),
                  count(*) FILTER (WHERE old_status IN ('done', 'dead'))
               FROM "{schema}".lease_history"#
        )))
        .fetch_one(backend.pool())
        .await
        .expect("read the lease history");
    judge_lease_history(counts);
}

/// The rules of [`check_lease_history`], on the history's counts: changes,
/// expired leases taken back, leases taken back while live, changes of
/// finished jobs.
fn judge_lease_history((changes, reclaims, early, after_end): (i64, i64, i64, i64)) {
    eprintln!("lease history: {changes} changes, {reclaims} expired leases taken back");
    assert_eq!(early, 0, "jobs leased again while a lease on them was live");
    assert_eq!(after_end, 0, "finished jobs changed");
    assert!(
        reclaims > 0,
        "no expired lease was taken back: the history tested nothing"
    );
}

/// [`record_lease_history`] in a SQLite file. SQLite's statements bind
/// `now` from the process clock, so the history takes the trigger's own
/// time (this host's clock, read a moment after the statement's, to the
/// millisecond).
async fn record_sqlite_lease_history(backend: &SqliteBackend) {
    relayq_postgres::sqlx::raw_sql(
        "CREATE TABLE lease_history (
             id INTEGER, old_status TEXT, new_status TEXT, old_token INTEGER,
             new_token INTEGER, old_until INTEGER, now INTEGER);
         CREATE TRIGGER record_lease AFTER UPDATE ON relayq_jobs
         WHEN OLD.status IS NOT NEW.status OR OLD.lease_token IS NOT NEW.lease_token
              OR OLD.locked_until IS NOT NEW.locked_until
         BEGIN
             INSERT INTO lease_history VALUES (OLD.id, OLD.status, NEW.status,
                 OLD.lease_token, NEW.lease_token, OLD.locked_until,
                 CAST((julianday('now') - 2440587.5) * 86400000000.0 AS INTEGER));
         END;",
    )
    .execute(backend.pool())
    .await
    .expect("lease history");
}

/// [`check_lease_history`] on [`record_sqlite_lease_history`]'s record,
/// with a millisecond's slack for the trigger's clock.
async fn check_sqlite_lease_history(backend: &SqliteBackend) {
    let counts: (i64, i64, i64, i64) = relayq_postgres::sqlx::query_as(
        "SELECT count(*),
                 coalesce(sum(new_token <> old_token AND old_status = 'processing'), 0),
                 coalesce(sum(new_token <> old_token
                     AND NOT (old_status = 'pending'
                              OR (old_status = 'processing' AND old_until < now + 1000))), 0),
                 coalesce(sum(old_status IN ('done', 'dead')), 0)
             FROM lease_history",
    )
    .fetch_one(backend.pool())
    .await
    .expect("read the lease history");
    judge_lease_history(counts);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_workers_killed_mid_job_lose_nothing() {
    let options = testing::options();
    let backend = testing::connect(options).await;
    let schema = backend.schema().to_owned();
    record_lease_history(&backend).await;
    let app = format!("rq-crash-{}", std::process::id());
    let mut template = WorkerArgs::new(Store::Postgres {
        url: testing::database_url(),
        schema: schema.clone(),
        app,
    });
    template.concurrency = 8;
    template.pool = 3;
    // A 2 s lease, renewed every 667 ms. With 1 s (renewed every 333 ms) a
    // worker that was neither frozen nor killed once had two leases lapse
    // in CI, where this run shares two cores with the SQLite run's worker
    // processes: a renewal must then land within 667 ms of a slow disk's
    // commits and a starved process.
    template.lease = Duration::from_secs(2);
    // One job in 25 is long (1–2.5 s), and most of those outlive the lease
    // (and are extended): a frozen worker holding one often finds, when it
    // wakes, its handler done and the job running elsewhere, and tries to
    // complete it with its stale lease.
    template.long_one_in = 25;
    template.long_min = Duration::from_millis(1000);
    template.long_max = Duration::from_millis(2500);
    // And one in 150 makes its worker die between its commits.
    template.failpoint_one_in = 150;
    crash_run(Run {
        ledger: Ledger::postgres(&backend),
        backend: Arc::new(backend.clone()),
        template,
        jobs: 3000,
        workers: 4,
        pause_every: 5,
        pause_stalls_all: false,
        expect_refused_completion: true,
    })
    .await;
    check_lease_history(&backend).await;
    backend.close().await;
    testing::drop_schema(&schema).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_workers_killed_mid_job_lose_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("crash.db").display());
    let backend = SqliteBackend::connect(&url)
        .await
        .expect("open SQLite file");
    record_sqlite_lease_history(&backend).await;
    let mut template = WorkerArgs::new(Store::Sqlite { url });
    template.concurrency = 8;
    template.pool = 4;
    // Every write of every process queues for the one write lock, so a
    // lease renewal can wait far longer than on PostgreSQL: a 2 s lease
    // (renewed every 667 ms) keeps uninterrupted workers' leases alive on
    // a loaded machine.
    template.lease = Duration::from_secs(2);
    template.long_one_in = 25;
    template.long_min = Duration::from_millis(1000);
    template.long_max = Duration::from_millis(2500);
    template.failpoint_one_in = 100;
    crash_run(Run {
        ledger: Ledger::sqlite(&backend),
        backend: Arc::new(backend.clone()),
        template,
        jobs: 2000,
        workers: 4,
        pause_every: 6,
        pause_stalls_all: true,
        // A frozen worker often holds the file's write lock, so nobody can
        // take its jobs while it is frozen; on a loaded machine no stale
        // completion came about in three runs in a row. Whether one does
        // is timing; that a stale completion is refused when it does is
        // the conformance case `worker_discards_the_result_of_a_lost_lease`,
        // run on SQLite too. What this run must show is the outcome check:
        // nothing lost, no stale completion accepted.
        expect_refused_completion: false,
    })
    .await;
    check_sqlite_lease_history(&backend).await;
    backend.close().await;
}
