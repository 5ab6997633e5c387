//! SQLite-specific behaviour: in-memory databases, transactional enqueue,
//! lock contention between connections and between processes, migrations,
//! wake-ups across connections, and typed configuration errors.
//!
//! `multi_process_exactly_once` re-executes this test binary as child
//! processes; a child is selected by the `RELAYQ_SQLITE_CHILD` variable.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration as StdDuration;

use relayq_core::{
    Backend, Cleaner, Completion, Error, JobStatus, Lease, ListFilter, ManualClock, NewJob,
    Observer, PullRequest, Puller, PushOutcome, Pusher, Wakeups,
};
use relayq_sqlite::{MIN_SQLITE_VERSION, SCHEMA_VERSION, SqliteBackend, SqliteOptions};
use serde_json::json;
use sqlx::Row;
use tempfile::TempDir;
use time::Duration;
use time::macros::datetime;

/// A job marked `Cancelled` (a status SPEC reserves, which no call makes
/// yet) reads back as one: the schema needs no change when it comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_job_reads_back() {
    let dir = tempfile::tempdir().expect("temp dir");
    let clock = relayq_core::ManualClock::new(relayq_conformance::EPOCH);
    let backend = SqliteBackend::connect_with(
        SqliteOptions::new(file_url(&dir)).clock(Arc::new(clock.clone())),
    )
    .await
    .expect("connect");
    let h = relayq_conformance::Harness::new(Arc::new(backend.clone()), clock.clone());
    let id = relayq_conformance::observe::push_a_job_to_cancel(&h).await;
    let now = h.now();
    let micros = now.unix_timestamp() * 1_000_000 + i64::from(now.microsecond());
    sqlx::query("UPDATE relayq_jobs SET status = 'cancelled', updated_at = ? WHERE id = ?")
        .bind(micros)
        .bind(id)
        .execute(backend.pool())
        .await
        .expect("cancel");
    relayq_conformance::observe::a_cancelled_job_reads_back(&h, id).await;
}

/// Connecting to a migrated file only reads its version. So it opens
/// while another connection holds the write lock for longer than the lock
/// timeout (a long batch, say), where it waited for the lock and failed
/// before; and it opens read-only (`mode=ro`, as a dashboard would), where
/// reads work and a push fails, writing nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connecting_to_a_migrated_file_takes_no_write_lock() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = file_url(&dir);
    let writer = SqliteBackend::connect(&url).await.expect("connect");
    writer.push(job(1)).await.expect("push");
    let pending = |stats: relayq_core::Stats| stats.queue("default").pending;

    let mut holder = writer.pool().acquire().await.expect("connection");
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut *holder)
        .await
        .expect("begin");
    let beside = SqliteBackend::connect_with(
        SqliteOptions::new(url.clone())
            .busy_timeout(StdDuration::from_millis(50))
            .lock_timeout(StdDuration::from_millis(200)),
    )
    .await
    .expect("opens while another connection holds the write lock");
    assert_eq!(pending(beside.stats().await.expect("stats")), 1);
    sqlx::query("ROLLBACK")
        .execute(&mut *holder)
        .await
        .expect("rollback");
    drop(holder);
    beside.close().await;

    let reader = SqliteBackend::connect(&format!("{url}?mode=ro"))
        .await
        .expect("a read-only connection opens a migrated file");
    assert_eq!(pending(reader.stats().await.expect("stats")), 1);
    assert!(matches!(
        reader.push(job(2)).await,
        Err(Error::Backend { .. })
    ));
    assert_eq!(pending(writer.stats().await.expect("stats")), 1);
    reader.close().await;
    writer.close().await;
}

/// The write-ahead log file is cut back to its size limit once SQLite's
/// own checkpoints have copied it into the database: one large batch no
/// longer leaves it at its largest for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_file_shrinks_after_a_large_batch() {
    let dir = tempfile::tempdir().expect("temp dir");
    let limit = 1 << 20;
    let backend =
        SqliteBackend::connect_with(SqliteOptions::new(file_url(&dir)).wal_size_limit(limit))
            .await
            .expect("connect");
    let wal = dir.path().join("jobs.db-wal");
    let filler = "x".repeat(2_000);
    let batch = (0..2_000)
        .map(|n| NewJob::new("k", &json!({ "n": n, "filler": filler })))
        .collect();
    backend.push_batch(batch).await.expect("push_batch");
    let size = || std::fs::metadata(&wal).expect("log file").len();
    assert!(size() > limit, "the batch's log: {} bytes", size());
    for n in 0..3 {
        backend.push(job(n)).await.expect("push");
    }
    assert!(size() <= limit, "the log kept {} bytes", size());
}

/// `mode=rw` in the URL opens an existing file and never creates one: a
/// typo in its path is an error, not a new, empty database. Without a
/// mode, the file is created (and then opens with `mode=rw`).
#[tokio::test]
async fn a_url_with_mode_rw_never_creates_the_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("jobs.db");
    let rw = format!("sqlite://{}?mode=rw", path.display());
    SqliteBackend::connect(&rw)
        .await
        .expect_err("no such file to open");
    assert!(!path.exists(), "mode=rw created {}", path.display());
    let created = SqliteBackend::connect(&format!("sqlite://{}", path.display()))
        .await
        .expect("created");
    created.close().await;
    let opened = SqliteBackend::connect(&rw).await.expect("opened");
    opened.close().await;
}

fn file_url(dir: &TempDir) -> String {
    format!("sqlite://{}", dir.path().join("jobs.db").display())
}

fn job(n: i64) -> NewJob {
    NewJob::new("k", &json!({ "n": n }))
}

/// Pulls and completes until the queue has nothing left to lease; returns
/// the ids completed, in order. Half the batches complete one by one, half
/// with `complete_batch`.
async fn drain(backend: &SqliteBackend, batch: u32) -> Vec<i64> {
    let request = PullRequest::queue("default")
        .batch(batch)
        .lease(Duration::minutes(10));
    let mut done = Vec::new();
    let mut round = 0u64;
    loop {
        let leased = backend.pull(&request).await.expect("pull");
        if leased.is_empty() {
            return done;
        }
        round += 1;
        if round.is_multiple_of(2) {
            let completions = leased
                .iter()
                .map(|l| Completion {
                    lease: l.lease,
                    result: Some(json!(l.job.id)),
                })
                .collect();
            let lost = backend
                .complete_batch(completions)
                .await
                .expect("complete_batch");
            assert!(lost.is_empty(), "no lease may be lost: {lost:?}");
        } else {
            for l in &leased {
                backend
                    .complete(&l.lease, Some(json!(l.job.id)))
                    .await
                    .expect("complete");
            }
        }
        done.extend(leased.iter().map(|l| l.job.id));
    }
}

// ---------------------------------------------------------------- in-memory

/// Both in-memory URL spellings give one database that every operation of
/// the backend and its clones sees, from many concurrent tasks; two
/// backends never share one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_memory_database_is_shared_by_the_pool_and_private_to_the_backend() {
    for url in [
        "sqlite::memory:",
        "sqlite://:memory:",
        "sqlite://?mode=memory",
    ] {
        let backend = SqliteBackend::connect(url).await.expect(url);
        let caps = backend.capabilities();
        assert!(!caps.durable && !caps.multi_process && !caps.cross_process_wakeups);
        assert!(caps.transactional_enqueue && caps.in_process_wakeups);

        let mut tasks = Vec::new();
        for t in 0..8 {
            let b = backend.clone();
            tasks.push(tokio::spawn(async move {
                for n in 0..25 {
                    b.push(job(t * 100 + n)).await.expect("push");
                    // Reads interleave with writes on the same database.
                    b.stats().await.expect("stats");
                }
            }));
        }
        for task in tasks {
            task.await.expect("task");
        }
        let page = backend
            .list(&ListFilter::new().limit(1_000))
            .await
            .expect("list");
        assert_eq!(page.jobs.len(), 200, "{url}: every push is visible");
        let done = drain(&backend, 7).await;
        assert_eq!(done.len(), 200);
        backend.checkpoint().await.expect("checkpoint in memory");
        assert_eq!(
            backend.stats().await.expect("stats").queue("default").done,
            200
        );

        let other = SqliteBackend::connect(url).await.expect(url);
        assert!(
            other.stats().await.expect("stats").queues.is_empty(),
            "{url}: a second backend has its own database"
        );
    }
}

// ------------------------------------------------------ transactional enqueue

/// Jobs pushed inside the caller's transaction exist exactly when it
/// commits, together with the caller's own writes, and are invisible to
/// other connections until then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_in_the_callers_transaction_commits_and_rolls_back_with_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let backend = SqliteBackend::connect(&file_url(&dir))
        .await
        .expect("connect");
    sqlx::query("CREATE TABLE orders (id INTEGER PRIMARY KEY, item TEXT NOT NULL)")
        .execute(backend.pool())
        .await
        .expect("create orders");

    // Rolled back: neither the order nor the jobs exist.
    let mut tx = backend.begin().await.expect("begin");
    sqlx::query("INSERT INTO orders (id, item) VALUES (1, 'book')")
        .execute(&mut *tx)
        .await
        .expect("insert order");
    let one = backend
        .push_in(&mut tx, job(1).unique_key("order:1"))
        .await
        .expect("push_in");
    let batch = backend
        .push_batch_in(&mut tx, vec![job(2), job(3).unique_key("order:1"), job(4)])
        .await
        .expect("push_batch_in");
    assert_eq!(
        batch[1],
        PushOutcome::Duplicate(one.id()),
        "dedupes inside the transaction"
    );
    assert!(
        backend.get(one.id()).await.expect("get").is_none(),
        "uncommitted jobs are invisible to other connections"
    );
    tx.rollback().await.expect("rollback");
    assert!(backend.get(one.id()).await.expect("get").is_none());
    assert!(backend.stats().await.expect("stats").queues.is_empty());
    let orders: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM orders")
        .fetch_one(backend.pool())
        .await
        .expect("count");
    assert_eq!(orders, 0);

    // Invalid input is rejected before anything is written.
    let mut tx = backend.begin().await.expect("begin");
    let err = backend
        .push_batch_in(&mut tx, vec![job(5), NewJob::new("", &json!({}))])
        .await
        .expect_err("invalid kind");
    assert_eq!(err.invalid_field(), Some("kind"));

    // Committed: the order and the jobs exist, and the jobs run.
    sqlx::query("INSERT INTO orders (id, item) VALUES (2, 'pen')")
        .execute(&mut *tx)
        .await
        .expect("insert order");
    let created = backend
        .push_batch_in(&mut tx, vec![job(6).unique_key("order:2"), job(7)])
        .await
        .expect("push_batch_in");
    tx.commit().await.expect("commit");
    for outcome in &created {
        let stored = backend
            .get(outcome.id())
            .await
            .expect("get")
            .expect("exists");
        assert_eq!(stored.status, JobStatus::Pending);
    }
    assert_eq!(
        backend
            .push(job(8).unique_key("order:2"))
            .await
            .expect("push"),
        PushOutcome::Duplicate(created[0].id()),
        "a committed key is active for later pushes"
    );
    let mut done = drain(&backend, 10).await;
    done.sort_unstable();
    assert_eq!(done, created.iter().map(|o| o.id()).collect::<Vec<_>>());
    let orders: Vec<String> = sqlx::query("SELECT item FROM orders")
        .fetch_all(backend.pool())
        .await
        .expect("orders")
        .iter()
        .map(|r| r.get("item"))
        .collect();
    assert_eq!(orders, vec!["pen".to_owned()]);
}

/// A batch pushed in the caller's transaction that fails partway (its
/// second chunk of 1,000, or its second job with a unique key) leaves none
/// of its jobs behind: the caller may go on and commit its own writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_failing_partway_leaves_nothing_in_the_callers_transaction() {
    let dir = tempfile::tempdir().expect("temp dir");
    let backend = SqliteBackend::connect(&file_url(&dir))
        .await
        .expect("connect");
    let mut tx = backend.begin().await.expect("begin");
    // The caller's own trigger refuses one kind of job.
    sqlx::query(
        "CREATE TEMP TRIGGER refuse_boom BEFORE INSERT ON relayq_jobs \
         WHEN NEW.kind = 'boom' BEGIN SELECT RAISE(ABORT, 'boom refused'); END",
    )
    .execute(&mut *tx)
    .await
    .expect("trigger");
    let boom = |n: i64| NewJob::new("boom", &json!({ "n": n }));
    let chunks: Vec<NewJob> = (0..1500)
        .map(|n| if n == 1200 { boom(n) } else { job(n) })
        .collect();
    let keyed = vec![job(1).unique_key("a"), boom(2).unique_key("b")];
    for batch in [chunks, keyed] {
        let err = backend
            .push_batch_in(&mut tx, batch)
            .await
            .expect_err("the trigger refuses a job");
        assert!(err.to_string().contains("boom refused"), "{err}");
    }
    let kept = backend
        .push_in(&mut tx, job(3))
        .await
        .expect("the transaction goes on");
    tx.commit().await.expect("commit");
    let stats = backend.stats().await.expect("stats").queue("default");
    assert_eq!(stats.total(), 1, "{stats:?}");
    assert!(backend.get(kept.id()).await.expect("get").is_some());
}

/// The same on an in-memory database, whose one connection the caller's
/// transaction borrows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_in_works_on_an_in_memory_database() {
    let backend = SqliteBackend::connect("sqlite::memory:")
        .await
        .expect("connect");
    let mut tx = backend.begin().await.expect("begin");
    let rolled_back = backend.push_in(&mut tx, job(1)).await.expect("push_in");
    tx.rollback().await.expect("rollback");
    assert!(backend.get(rolled_back.id()).await.expect("get").is_none());

    let mut tx = backend.begin().await.expect("begin");
    let kept = backend.push_in(&mut tx, job(2)).await.expect("push_in");
    tx.commit().await.expect("commit");
    assert_eq!(drain(&backend, 1).await, vec![kept.id()]);
}

// ----------------------------------------------------------- lock contention

/// Three backends on one file — separate pools, separate in-process write
/// locks, so they contend exactly like processes do — with a 1 ms busy
/// timeout, pushing and draining from 24 tasks at once: SQLite reports
/// "database is locked" constantly, yet no operation fails and every job is
/// completed exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contended_writers_never_see_busy() {
    const PUSHERS: i64 = 12;
    const PER_PUSHER: i64 = 100;
    let dir = tempfile::tempdir().expect("temp dir");
    let url = file_url(&dir);
    let mut backends = Vec::new();
    for _ in 0..3 {
        let options = SqliteOptions::new(&url).busy_timeout(StdDuration::from_millis(1));
        backends.push(SqliteBackend::connect_with(options).await.expect("connect"));
    }
    let mut pushers = Vec::new();
    for p in 0..PUSHERS {
        let b = backends[p as usize % 3].clone();
        pushers.push(tokio::spawn(async move {
            for n in 0..PER_PUSHER {
                if n % 10 == 0 {
                    let batch = (0..5).map(|i| job(p * 1_000 + n * 10 + i)).collect();
                    b.push_batch(batch).await.expect("push_batch");
                } else {
                    b.push(job(p * 1_000 + n)).await.expect("push");
                }
            }
        }));
    }
    let mut pullers = Vec::new();
    for w in 0..12u32 {
        let b = backends[w as usize % 3].clone();
        pullers.push(tokio::spawn(async move {
            let mut done = Vec::new();
            // Keep draining while pushes are still arriving.
            for _ in 0..50 {
                done.extend(drain(&b, 1 + w % 5).await);
                tokio::task::yield_now().await;
            }
            done
        }));
    }
    for p in pushers {
        p.await.expect("pusher");
    }
    let mut deliveries: HashMap<i64, usize> = HashMap::new();
    for p in pullers {
        for id in p.await.expect("puller") {
            *deliveries.entry(id).or_default() += 1;
        }
    }
    for id in drain(&backends[0], 100).await {
        *deliveries.entry(id).or_default() += 1;
    }
    let expected = (PUSHERS * (PER_PUSHER - PER_PUSHER / 10 + PER_PUSHER / 10 * 5)) as usize;
    assert_eq!(deliveries.len(), expected, "every job completed");
    assert!(
        deliveries.values().all(|n| *n == 1),
        "no job completed twice"
    );
    let stats = backends[0].stats().await.expect("stats").queue("default");
    assert_eq!(stats.done, expected as u64);
    let retries: u64 = backends.iter().map(SqliteBackend::lock_retries).sum();
    assert!(
        retries > 0,
        "with a 1 ms busy timeout the lock must have been contended (and retried)"
    );
}

// -------------------------------------------------------------- processes

const CHILD_ENV: &str = "RELAYQ_SQLITE_CHILD";
const PROCESS_JOBS: i64 = 3_000;
const CHILDREN: usize = 3;

/// Three child processes plus this one pull and complete from one file at
/// the same time, each with a 1 ms busy timeout. Every job is completed
/// exactly once, no process sees an error, and the processes' completion
/// times overlap (they really ran at once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_process_exactly_once() {
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        return child(&spec).await;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let url = file_url(&dir);
    let backend = SqliteBackend::connect_with(
        SqliteOptions::new(&url).busy_timeout(StdDuration::from_millis(1)),
    )
    .await
    .expect("connect");
    for chunk in (0..PROCESS_JOBS).collect::<Vec<_>>().chunks(500) {
        backend
            .push_batch(chunk.iter().map(|n| job(*n)).collect())
            .await
            .expect("push_batch");
    }

    let exe = std::env::current_exe().expect("current exe");
    let mut children = Vec::new();
    for i in 0..CHILDREN {
        let spec = format!("{i}|{}|{}", url, dir.path().display());
        let child = Command::new(&exe)
            .args([
                "--exact",
                "multi_process_exactly_once",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, spec)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn child");
        children.push(child);
    }
    // Start everyone together.
    wait_for_files(dir.path(), (0..CHILDREN).map(|i| format!("ready-{i}"))).await;
    std::fs::write(dir.path().join("go"), b"").expect("go");
    let mine = drain(&backend, 3).await;

    let mut per_process: Vec<Vec<i64>> = vec![mine];
    for (i, child) in children.into_iter().enumerate() {
        let output = tokio::task::spawn_blocking(move || child.wait_with_output())
            .await
            .expect("join")
            .expect("child output");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success(),
            "child {i} failed ({}):\n{stdout}\n{stderr}",
            output.status
        );
        assert!(
            !stdout.contains("database is locked") && !stderr.contains("database is locked"),
            "child {i} saw a lock error:\n{stdout}\n{stderr}"
        );
        for line in stdout.lines().filter(|l| l.contains("lock retries")) {
            println!("{line}");
        }
        let ids = std::fs::read_to_string(dir.path().join(format!("done-{i}")))
            .expect("child's ids")
            .lines()
            .map(|l| l.parse::<i64>().expect("id"))
            .collect();
        per_process.push(ids);
    }

    let mut deliveries: HashMap<i64, usize> = HashMap::new();
    for ids in &per_process {
        for id in ids {
            *deliveries.entry(*id).or_default() += 1;
        }
    }
    assert_eq!(
        deliveries.len(),
        PROCESS_JOBS as usize,
        "every job completed"
    );
    let twice: Vec<_> = deliveries.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "jobs completed twice: {twice:?}");
    let stats = backend.stats().await.expect("stats").queue("default");
    assert_eq!(
        (stats.done, stats.total()),
        (PROCESS_JOBS as u64, PROCESS_JOBS as u64)
    );

    // When did each process complete its jobs? `updated_at` is the
    // completion time (system clock) of every Done job.
    let mut spans = Vec::new();
    for ids in per_process.iter().filter(|ids| !ids.is_empty()) {
        let mut first = None;
        let mut last = None;
        for id in ids {
            let at = backend
                .get(*id)
                .await
                .expect("get")
                .expect("job")
                .updated_at;
            first = Some(first.map_or(at, |f: time::OffsetDateTime| f.min(at)));
            last = Some(last.map_or(at, |l: time::OffsetDateTime| l.max(at)));
        }
        spans.push((first.expect("first"), last.expect("last")));
    }
    let counts: Vec<usize> = per_process.iter().map(Vec::len).collect();
    println!(
        "jobs completed per process (this one first): {counts:?}; lock retries here: {}",
        backend.lock_retries()
    );
    assert!(
        spans.len() >= 2,
        "at least two processes completed jobs: {counts:?}"
    );
    let overlapping = spans
        .iter()
        .enumerate()
        .any(|(i, a)| spans[i + 1..].iter().any(|b| a.0 <= b.1 && b.0 <= a.1));
    assert!(
        overlapping,
        "processes completed jobs at the same time: {counts:?} {spans:?}"
    );
}

/// A child process: waits for the start signal, drains the queue, and
/// writes the ids it completed to `done-<i>`.
async fn child(spec: &str) {
    let mut parts = spec.splitn(3, '|');
    let (Some(i), Some(url), Some(dir)) = (parts.next(), parts.next(), parts.next()) else {
        panic!("bad child spec {spec:?}");
    };
    let i: u32 = i.parse().expect("child index");
    let dir = PathBuf::from(dir);
    // `connect` migrates too: a no-op here, serialized by BEGIN IMMEDIATE.
    let backend = SqliteBackend::connect_with(
        SqliteOptions::new(url).busy_timeout(StdDuration::from_millis(1)),
    )
    .await
    .expect("child connect");
    std::fs::write(dir.join(format!("ready-{i}")), b"").expect("ready");
    wait_for_files(&dir, ["go".to_owned()]).await;
    let done = drain(&backend, 1 + i).await;
    let lines: String = done.iter().map(|id| format!("{id}\n")).collect();
    std::fs::write(dir.join(format!("done-{i}")), lines).expect("write ids");
    println!(
        "child {i}: completed {} jobs, {} lock retries",
        done.len(),
        backend.lock_retries()
    );
}

async fn wait_for_files(dir: &Path, names: impl IntoIterator<Item = String>) {
    let names: Vec<String> = names.into_iter().collect();
    let deadline = tokio::time::Instant::now() + StdDuration::from_secs(60);
    while !names.iter().all(|n| dir.join(n).exists()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {names:?}"
        );
        tokio::time::sleep(StdDuration::from_millis(2)).await;
    }
}

// ------------------------------------------------------------- migrations

/// `migrate` is idempotent, records its versions, refuses a newer schema,
/// and many connections migrating a fresh file at once all succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_are_versioned_idempotent_and_safe_concurrently() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = file_url(&dir);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        // A 1 ms busy timeout: creating the file, switching it to WAL and
        // migrating all contend, and must all be retried, not reported.
        let options = SqliteOptions::new(&url).busy_timeout(StdDuration::from_millis(1));
        tasks.push(tokio::spawn(async move {
            SqliteBackend::connect_with(options)
                .await
                .expect("connect and migrate")
        }));
    }
    let mut backends = Vec::new();
    for task in tasks {
        backends.push(task.await.expect("task"));
    }
    let backend = &backends[0];
    let versions: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM relayq_schema_versions ORDER BY version")
            .fetch_all(backend.pool())
            .await
            .expect("versions");
    assert_eq!(
        versions,
        (1..=i64::from(SCHEMA_VERSION)).collect::<Vec<_>>(),
        "each version applied once"
    );
    backend.migrate().await.expect("migrating again is a no-op");
    assert_eq!(
        backend.schema_version().await.expect("version"),
        SCHEMA_VERSION
    );
    let versions: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM relayq_schema_versions")
        .fetch_one(backend.pool())
        .await
        .expect("versions");
    assert_eq!(versions, i64::from(SCHEMA_VERSION));

    sqlx::query("INSERT INTO relayq_schema_versions VALUES (99, 'from the future', 0)")
        .execute(backend.pool())
        .await
        .expect("insert");
    let newer = |result: Result<(), Error>| match result {
        Err(Error::SchemaTooNew { found, supported }) => {
            assert_eq!((found, supported), (99, i64::from(SCHEMA_VERSION)));
        }
        other => panic!("expected SchemaTooNew, got {other:?}"),
    };
    newer(backend.migrate().await);
    newer(SqliteBackend::connect(&url).await.map(drop));
    // Without migrating, connecting still works, and a fresh file stays
    // empty until migrated.
    SqliteBackend::connect_with(SqliteOptions::new(&url).migrate(false))
        .await
        .expect("connect without migrating");
    let fresh = SqliteBackend::connect_with(
        SqliteOptions::new(format!(
            "sqlite://{}",
            dir.path().join("fresh.db").display()
        ))
        .migrate(false),
    )
    .await
    .expect("connect");
    assert_eq!(fresh.schema_version().await.expect("version"), 0);
    fresh.migrate().await.expect("migrate");
    assert_eq!(
        fresh.schema_version().await.expect("version"),
        SCHEMA_VERSION
    );
    fresh.push(job(1)).await.expect("push after migrating");
}

/// A backend on a file in `dir` whose clock stands still at `now`.
async fn with_clock_at(dir: &TempDir, now: time::OffsetDateTime) -> SqliteBackend {
    SqliteBackend::connect_with(
        SqliteOptions::new(file_url(dir)).clock(Arc::new(ManualClock::new(now))),
    )
    .await
    .expect("connect")
}

/// A batch of several statements refused at its job 1,400 (a delay past
/// the year 9999) leaves none of its jobs in the caller's transaction,
/// even one begun with a plain `BEGIN`, which the caller then commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_refused_partway_leaves_nothing_in_a_plain_transaction() {
    let dir = tempfile::tempdir().expect("temp dir");
    let backend = with_clock_at(&dir, datetime!(9999-12-30 00:00 UTC)).await;
    let mut conn = backend.pool().acquire().await.expect("connection");
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut *conn)
        .await
        .expect("begin");
    let batch = (0..1_500)
        .map(|n| match n {
            1_400 => job(n).delay(Duration::days(2)),
            _ => job(n).delay(Duration::hours(1)),
        })
        .collect();
    match backend.push_batch_in(&mut conn, batch).await {
        Err(Error::InvalidInput { field: "delay", .. }) => {}
        other => panic!("expected the delay refused, got {other:?}"),
    }
    sqlx::query("COMMIT")
        .execute(&mut *conn)
        .await
        .expect("commit");
    drop(conn);
    let stats = backend.stats().await.expect("stats");
    assert_eq!(stats.queue("default").total(), 0, "nothing was written");
}

/// A clean of more jobs than one transaction deletes (10,000) runs chunk
/// after chunk until none is left, and counts them all: an exact multiple
/// of the chunk, and a chunk and a half; recent and active jobs stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_deletes_chunk_after_chunk() {
    let dir = tempfile::tempdir().expect("temp dir");
    let now = datetime!(2030-01-01 00:00 UTC);
    let backend = with_clock_at(&dir, now).await;
    for (status, n, age) in [
        ("done", 20_000, Duration::days(1)),
        ("dead", 15_000, Duration::days(1)),
        ("done", 5, Duration::seconds(1)),
    ] {
        let updated_at = (now - age).unix_timestamp_nanos() / 1_000;
        sqlx::query(
            "WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < ?) \
             INSERT INTO relayq_jobs (queue, kind, payload, priority, status, attempts, \
                 max_attempts, lease_token, run_at, created_at, updated_at) \
             SELECT 'default', 'k', '{}', 0, ?, 1, 1, 1, ?, ?, ? FROM g",
        )
        .bind(n)
        .bind(status)
        .bind(updated_at as i64)
        .bind(updated_at as i64)
        .bind(updated_at as i64)
        .execute(backend.pool())
        .await
        .expect("finished rows");
    }
    backend.push(job(1)).await.expect("push");
    let before = now - Duration::hours(1);
    assert_eq!(
        backend.clean(JobStatus::Done, before).await.expect("clean"),
        20_000
    );
    assert_eq!(
        backend.clean(JobStatus::Dead, before).await.expect("clean"),
        15_000
    );
    let stats = backend.stats().await.expect("stats").queue("default");
    assert_eq!((stats.done, stats.dead, stats.pending), (5, 0, 1));
}

/// A file database is in WAL mode, runs on a new enough SQLite, and keeps
/// its jobs across backends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_database_is_wal_and_durable() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = file_url(&dir);
    let clock = ManualClock::new(datetime!(2030-01-01 00:00 UTC));
    let backend =
        SqliteBackend::connect_with(SqliteOptions::new(&url).clock(Arc::new(clock.clone())))
            .await
            .expect("connect");
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(backend.pool())
        .await
        .expect("journal_mode");
    assert_eq!(mode, "wal");
    let synchronous: i64 = sqlx::query_scalar("PRAGMA synchronous")
        .fetch_one(backend.pool())
        .await
        .expect("synchronous");
    assert_eq!(synchronous, 1, "NORMAL by default");
    let full = SqliteBackend::connect_with(SqliteOptions::new(&url).full_sync(true))
        .await
        .expect("connect");
    let synchronous: i64 = sqlx::query_scalar("PRAGMA synchronous")
        .fetch_one(full.pool())
        .await
        .expect("synchronous");
    assert_eq!(synchronous, 2, "FULL when asked");
    let version: String = sqlx::query_scalar("SELECT sqlite_version()")
        .fetch_one(backend.pool())
        .await
        .expect("version");
    let parse = |v: &str| -> Vec<u32> { v.split('.').map(|p| p.parse().unwrap_or(0)).collect() };
    assert!(
        parse(&version) >= parse(MIN_SQLITE_VERSION),
        "SQLite {version}"
    );
    let caps = backend.capabilities();
    assert!(caps.durable && caps.multi_process && !caps.server_clock);

    let id = backend.push(job(1)).await.expect("push").id();
    let before = backend.get(id).await.expect("get").expect("job");
    let wal = dir.path().join("jobs.db-wal");
    assert!(std::fs::metadata(&wal).expect("wal").len() > 0);
    backend.checkpoint().await.expect("checkpoint");
    assert_eq!(
        std::fs::metadata(&wal).expect("wal").len(),
        0,
        "the log was copied into the database and truncated"
    );
    backend.close().await;
    drop(backend);

    let reopened =
        SqliteBackend::connect_with(SqliteOptions::new(&url).clock(Arc::new(clock.clone())))
            .await
            .expect("reopen");
    assert_eq!(reopened.get(id).await.expect("get"), Some(before));
    // Deleting the newest job does not free its id.
    let leased = reopened
        .pull(&PullRequest::queue("default"))
        .await
        .expect("pull");
    reopened
        .complete(&leased[0].lease, None)
        .await
        .expect("complete");
    assert_eq!(
        reopened
            .clean(JobStatus::Done, datetime!(9999-01-01 00:00 UTC))
            .await
            .expect("clean"),
        1
    );
    let next = reopened.push(job(2)).await.expect("push").id();
    assert!(next > id, "ids are never reused ({next} after {id})");
}

/// Single pushes (and every other write) leave the write-ahead log to
/// SQLite's automatic checkpoints, so it stays near their 1,000-page
/// threshold. Pushes used to commit when their `RETURNING` statement was
/// reset after its first row, which skips the checkpoint hook: the log grew
/// by about 13 KB per push, without bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_pushes_keep_the_log_checkpointed() {
    let dir = tempfile::tempdir().expect("temp dir");
    let backend = SqliteBackend::connect(&file_url(&dir))
        .await
        .expect("connect");
    for n in 0..3_000 {
        backend.push(job(n)).await.expect("push");
    }
    let wal = std::fs::metadata(dir.path().join("jobs.db-wal"))
        .expect("wal")
        .len();
    assert!(
        wal < 16 << 20,
        "the log holds {wal} bytes after 3,000 pushes: it is not being checkpointed"
    );
}

// --------------------------------------------------------------- wake-ups

/// How many of this process's open files are `path` (Linux: /proc/self/fd).
#[cfg(target_os = "linux")]
fn open_handles(path: &Path) -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("fd dir")
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter(|target| target == path)
        .count()
}

/// A closed backend keeps no connection to its file, though its wake-ups
/// are still held: the poller that watches for other processes' pushes
/// ends with the pool.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_ends_the_wakeup_poller() {
    let dir = tempfile::tempdir().expect("temp dir");
    let options = SqliteOptions::new(file_url(&dir)).poll_interval(StdDuration::from_millis(20));
    let backend = SqliteBackend::connect_with(options).await.expect("connect");
    let path = dir.path().join("jobs.db").canonicalize().expect("db file");
    let _wakeups = backend
        .subscribe(&["default".to_owned()])
        .await
        .expect("subscribe")
        .expect("wake-ups declared");
    // The poller's own connection, besides the pool's and the writer's.
    tokio::time::sleep(StdDuration::from_millis(200)).await;
    assert!(open_handles(&path) > 0);
    backend.close().await;
    tokio::time::timeout(StdDuration::from_secs(10), async {
        while open_handles(&path) > 0 {
            tokio::time::sleep(StdDuration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{} handles on the file after close", open_handles(&path)));
}

/// Whether `wakeups` stays silent for 300 ms.
async fn quiet(wakeups: &mut Wakeups) -> bool {
    tokio::time::timeout(StdDuration::from_millis(300), wakeups.next())
        .await
        .is_err()
}

/// Takes the signals already sent (a poller's late ones, say) until none
/// comes for 300 ms.
async fn settle(wakeups: &mut Wakeups) {
    loop {
        match tokio::time::timeout(StdDuration::from_millis(300), wakeups.next()).await {
            Err(_) => return,
            Ok(Some(())) => {}
            Ok(None) => panic!("the subscription ended"),
        }
    }
}

/// Waits for a signal, failing the test with `why` after 10 s.
async fn woken(wakeups: &mut Wakeups, why: &str) {
    match tokio::time::timeout(StdDuration::from_secs(10), wakeups.next()).await {
        Ok(Some(())) => {}
        Ok(None) => panic!("the subscription ended; expected: {why}"),
        Err(_) => panic!("no signal within 10 s: {why}"),
    }
}

/// A subscription to the default queue.
async fn subscribed(backend: &SqliteBackend) -> Wakeups {
    backend
        .subscribe(&["default".to_owned()])
        .await
        .expect("subscribe")
        .expect("wake-ups declared")
}

/// The lease of the one due job of the default queue.
async fn lease_of_the_due_job(backend: &SqliteBackend) -> Lease {
    let leased = backend
        .pull(&PullRequest::queue("default"))
        .await
        .expect("pull");
    assert_eq!(leased.len(), 1, "one job is due");
    leased[0].lease
}

/// A subscriber is woken by a push through another backend on the same
/// file (another connection, as another process would be), by a push in the
/// caller's transaction, by a release and by a retry due at once, and not
/// by other writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wakeups_cross_connections_and_ignore_other_writes() {
    const DEADLINE: StdDuration = StdDuration::from_secs(10);
    let dir = tempfile::tempdir().expect("temp dir");
    let url = file_url(&dir);
    let options = SqliteOptions::new(&url).poll_interval(StdDuration::from_millis(20));
    let worker_side = SqliteBackend::connect_with(options.clone())
        .await
        .expect("connect");
    let other = SqliteBackend::connect_with(options).await.expect("connect");
    let mut wakeups = subscribed(&worker_side).await;

    other.push(job(1)).await.expect("push");
    woken(
        &mut wakeups,
        "a push by another connection wakes the subscriber",
    )
    .await;

    // Completing it is a write but stores no job: no signal.
    let lease = lease_of_the_due_job(&other).await;
    other.complete(&lease, None).await.expect("complete");
    assert!(quiet(&mut wakeups).await, "completions do not wake workers");

    let mut tx = other.begin().await.expect("begin");
    other.push_in(&mut tx, job(2)).await.expect("push_in");
    tx.commit().await.expect("commit");
    woken(
        &mut wakeups,
        "a committed push_in by another connection wakes the subscriber",
    )
    .await;

    // Making a stored job due again wakes it too; a retry for later does not.
    let lease = lease_of_the_due_job(&other).await;
    assert!(quiet(&mut wakeups).await, "a pull wakes no one");
    other.release(&lease).await.expect("release");
    woken(
        &mut wakeups,
        "a release by another connection wakes the subscriber",
    )
    .await;
    let lease = lease_of_the_due_job(&other).await;
    other
        .retry(&lease, Duration::ZERO, "again")
        .await
        .expect("retry");
    woken(
        &mut wakeups,
        "a retry due at once by another connection wakes the subscriber",
    )
    .await;
    let lease = lease_of_the_due_job(&other).await;
    other
        .retry(&lease, Duration::hours(1), "later")
        .await
        .expect("retry");
    assert!(quiet(&mut wakeups).await, "a retry due later wakes no one");

    // Dropping every backend ends the subscription.
    drop(worker_side);
    drop(other);
    let end =
        tokio::time::timeout(DEADLINE, async { while wakeups.next().await.is_some() {} }).await;
    assert!(end.is_ok(), "the subscription ends with its backend");
}

/// A backend opened without migrating on a version-1 file (from before
/// the wake-up counter) releases, retries and wakes its own subscribers as
/// before; once another process migrated the file, releases wake
/// subscribers across the two, both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_1_file_opened_without_migrating_works_as_before() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = file_url(&dir);
    let setup = SqliteBackend::connect(&url).await.expect("connect");
    sqlx::raw_sql(
        "DROP TABLE relayq_wakeups; DELETE FROM relayq_schema_versions WHERE version >= 2",
    )
    .execute(setup.pool())
    .await
    .expect("back to version 1");
    setup.close().await;

    let options = SqliteOptions::new(&url)
        .migrate(false)
        .poll_interval(StdDuration::from_millis(20));
    let backend = SqliteBackend::connect_with(options.clone())
        .await
        .expect("connect");
    assert_eq!(backend.schema_version().await.expect("version"), 1);
    let mut wakeups = subscribed(&backend).await;
    backend.push(job(1)).await.expect("push");
    woken(&mut wakeups, "the push wakes the subscriber").await;
    // The poller also sees this backend's writes, and signals them late.
    settle(&mut wakeups).await;
    let lease = lease_of_the_due_job(&backend).await;
    backend
        .release(&lease)
        .await
        .expect("release on a version-1 file");
    woken(&mut wakeups, "the release wakes this backend's subscriber").await;
    settle(&mut wakeups).await;
    let lease = lease_of_the_due_job(&backend).await;
    backend
        .retry(&lease, Duration::ZERO, "again")
        .await
        .expect("retry on a version-1 file");
    woken(&mut wakeups, "the retry wakes this backend's subscriber").await;

    let other = SqliteBackend::connect_with(options.migrate(true))
        .await
        .expect("connect and migrate");
    let mut theirs = subscribed(&other).await;
    let lease = lease_of_the_due_job(&other).await;
    settle(&mut wakeups).await;
    other.release(&lease).await.expect("release");
    woken(
        &mut wakeups,
        "once migrated, the other process's release wakes the first",
    )
    .await;
    let lease = lease_of_the_due_job(&backend).await;
    settle(&mut theirs).await;
    backend.release(&lease).await.expect("release");
    woken(
        &mut theirs,
        "the first process's release, counted now, wakes the other",
    )
    .await;
}

// ------------------------------------------------------------------ errors

/// Bad URLs and options are `Error::Config`; a database that cannot be
/// opened is `Error::Backend`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_urls_and_unopenable_paths_are_typed_errors() {
    for url in [
        "postgres://localhost/jobs",
        "jobs.db",
        "sqlite://",
        "sqlite://jobs.db?mode=sideways",
        "sqlite://jobs.db?unknown=1",
    ] {
        match SqliteBackend::connect(url).await {
            Err(Error::Config { .. }) => {}
            other => panic!("{url}: expected Error::Config, got {other:?}"),
        }
    }
    match SqliteBackend::connect_with(SqliteOptions::new("sqlite::memory:").max_connections(0))
        .await
    {
        Err(Error::Config { .. }) => {}
        other => panic!("expected Error::Config, got {other:?}"),
    }

    let dir = tempfile::tempdir().expect("temp dir");
    let not_a_dir = dir.path().join("plain-file");
    std::fs::write(&not_a_dir, b"x").expect("write");
    let not_a_db = dir.path().join("garbage.db");
    std::fs::write(&not_a_db, vec![0x5a; 8192]).expect("write");
    for path in [
        not_a_dir.join("jobs.db"),
        dir.path().join("missing").join("dir").join("jobs.db"),
        dir.path().to_path_buf(),
        not_a_db,
    ] {
        let url = format!("sqlite://{}", path.display());
        match SqliteBackend::connect(&url).await {
            // Waiting mends none of them.
            Err(e @ Error::Backend { .. }) => assert!(!e.is_transient(), "{url}: {e:?}"),
            other => panic!("{url}: expected Error::Backend, got {other:?}"),
        }
    }
}

/// A write that cannot take the database's write lock within the lock
/// timeout (another process holds it) fails with a transient
/// `Error::Backend` and writes nothing; the same write succeeds once the
/// lock is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_locked_out_past_the_lock_timeout_is_transient() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = file_url(&dir);
    let holder = SqliteBackend::connect(&url).await.expect("holder");
    let backend = SqliteBackend::connect_with(
        SqliteOptions::new(&url)
            .busy_timeout(std::time::Duration::from_millis(10))
            .lock_timeout(std::time::Duration::from_millis(200)),
    )
    .await
    .expect("backend");
    let mut conn = holder.pool().acquire().await.expect("connection");
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut *conn)
        .await
        .expect("take the write lock");
    match backend.push(job(1)).await {
        Err(e @ Error::Backend { .. }) => {
            assert!(e.is_transient(), "{e:?}");
            assert!(e.to_string().contains("lock timeout"), "{e}");
        }
        other => panic!("expected a transient Backend error, got {other:?}"),
    }
    sqlx::query("ROLLBACK")
        .execute(&mut *conn)
        .await
        .expect("release the write lock");
    drop(conn);
    let stats = backend.stats().await.expect("stats");
    assert_eq!(stats.queue("default").total(), 0, "nothing was written");
    backend
        .push(job(1))
        .await
        .expect("push once the lock is free");
}

/// A pull that waited for the file's write lock (another process's write)
/// longer than its lease still grants a live lease of the length asked
/// for, live from the moment it is stored: before, `now` was read before
/// the wait, and the lease it granted had ended by the time the pull
/// returned, free for any other puller to take while the first ran the
/// job (and, until a second write renewed it, had ended as it was stored:
/// a last attempt could be marked dead unrun).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_that_waited_for_the_write_lock_leases_from_when_it_got_it() {
    const LEASE: Duration = Duration::seconds(2);
    let dir = tempfile::tempdir().expect("temp dir");
    let url = file_url(&dir);
    let holder = SqliteBackend::connect(&url).await.expect("holder");
    let backend = SqliteBackend::connect(&url).await.expect("backend");
    let id = backend.push(job(1)).await.expect("push").id();
    // Every lease end stored, beside the host's time (µs) as it was stored.
    sqlx::raw_sql(
        "CREATE TABLE lease_ends (until INTEGER, at INTEGER);
         CREATE TRIGGER record_lease_end AFTER UPDATE OF locked_until ON relayq_jobs
         WHEN NEW.locked_until IS NOT NULL
         BEGIN
             INSERT INTO lease_ends VALUES (NEW.locked_until,
                 CAST((julianday('now') - 2440587.5) * 86400000000.0 AS INTEGER));
         END;",
    )
    .execute(holder.pool())
    .await
    .expect("record lease ends");
    let mut conn = holder.pool().acquire().await.expect("connection");
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut *conn)
        .await
        .expect("take the write lock");
    let pulling = tokio::spawn({
        let backend = backend.clone();
        async move {
            backend
                .pull(&PullRequest::queue("default").lease(LEASE))
                .await
        }
    });
    // Longer than the lease; shorter than the busy timeout (5 s), so the
    // pull waits in SQLite's busy handler rather than trying again.
    tokio::time::sleep(StdDuration::from_secs(3)).await;
    sqlx::query("COMMIT")
        .execute(&mut *conn)
        .await
        .expect("release the write lock");
    drop(conn);
    let leased = pulling.await.expect("task").expect("pull");
    assert_eq!(leased.iter().map(|l| l.job.id).collect::<Vec<_>>(), [id]);
    let until = leased[0].job.locked_until.expect("leased");
    assert!(
        until > time::OffsetDateTime::now_utc(),
        "the lease ended at {until}"
    );
    assert_eq!(
        backend
            .get(id)
            .await
            .expect("get")
            .expect("stored")
            .locked_until,
        Some(until)
    );
    let other = holder
        .pull(&PullRequest::queue("default").lease(LEASE))
        .await
        .expect("another pull");
    assert!(other.is_empty(), "another puller took the job: {other:?}");
    let ends: Vec<(i64, i64)> = sqlx::query_as("SELECT until, at FROM lease_ends")
        .fetch_all(holder.pool())
        .await
        .expect("lease ends");
    assert!(!ends.is_empty());
    for (until, at) in ends {
        assert!(
            until - at > LEASE.whole_microseconds() as i64 * 9 / 10,
            "a lease was stored ending {} ms after it was stored",
            (until - at) / 1000
        );
    }
    backend
        .complete(&leased[0].lease, None)
        .await
        .expect("complete");
}

/// A job whose text another program stored as bytes that are not UTF-8
/// (SQLite keeps them) reads with U+FFFD in their place, and counts beyond
/// `i32` read as the nearest: pulled (with the job pulled beside it),
/// failed for its kind no handler has, and observed, where every read of
/// it used to fail, a pull's included, leaving the jobs that pull had
/// leased with it to no one.
#[tokio::test]
async fn text_that_is_not_utf8_and_counts_beyond_i32_read_as_the_nearest() {
    let dir = tempfile::tempdir().expect("temp dir");
    let backend = SqliteBackend::connect(&file_url(&dir))
        .await
        .expect("connect");
    let odd = backend.push(job(1)).await.expect("push").id();
    let plain = backend.push(job(2)).await.expect("push").id();
    sqlx::query(
        "UPDATE relayq_jobs SET kind = CAST(X'6BFF' AS TEXT), \
         last_error = CAST(X'FE6F6B' AS TEXT), unique_key = CAST(X'FF' AS TEXT), \
         max_attempts = 5000000000 WHERE id = ?",
    )
    .bind(odd)
    .execute(backend.pool())
    .await
    .expect("another program's bytes");
    let leased = backend
        .pull(&PullRequest::queue("default").batch(10))
        .await
        .expect("pull");
    assert_eq!(
        leased.iter().map(|l| l.job.id).collect::<Vec<_>>(),
        [odd, plain]
    );
    let read = &leased[0].job;
    assert_eq!(read.kind, "k\u{FFFD}");
    assert_eq!(read.last_error.as_deref(), Some("\u{FFFD}ok"));
    assert_eq!(read.unique_key.as_deref(), Some("\u{FFFD}"));
    assert_eq!(read.max_attempts, i32::MAX);
    backend
        .kill(&leased[0].lease, "no handler")
        .await
        .expect("kill");
    let stored = backend.get(odd).await.expect("get").expect("stored");
    assert_eq!(stored.status, JobStatus::Dead);
    let page = backend.list(&ListFilter::default()).await.expect("list");
    assert_eq!(page.jobs.len(), 2);
    // A queue name of such bytes counts in the stats under its reading.
    let third = backend.push(job(3)).await.expect("push").id();
    sqlx::query("UPDATE relayq_jobs SET queue = CAST(X'71FF' AS TEXT) WHERE id = ?")
        .bind(third)
        .execute(backend.pool())
        .await
        .expect("another program's queue");
    let stats = backend.stats().await.expect("stats");
    assert_eq!(stats.queue("q\u{FFFD}").pending, 1, "{stats:?}");
}

/// A job whose times another program stored beyond the years relayq holds
/// (-9999 to 9999) reads as the nearest instant it holds, so it is
/// pulled, run and observed like any other (it used to fail every read of
/// it, the pulls that met it included).
#[tokio::test]
async fn times_beyond_what_relayq_holds_read_as_the_nearest() {
    let dir = tempfile::tempdir().expect("temp dir");
    let backend = SqliteBackend::connect(&file_url(&dir))
        .await
        .expect("connect");
    let id = backend.push(job(1)).await.expect("push").id();
    sqlx::query("UPDATE relayq_jobs SET run_at = ?, created_at = ?, updated_at = ? WHERE id = ?")
        .bind(i64::MIN)
        .bind(i64::MAX)
        .bind(253_402_300_800_000_000_i64) // 10000-01-01
        .bind(id)
        .execute(backend.pool())
        .await
        .expect("another program's times");
    let latest = datetime!(9999-12-31 23:59:59.999999 UTC);
    let stored = backend.get(id).await.expect("get").expect("stored");
    assert_eq!(stored.run_at, datetime!(-9999-01-01 00:00 UTC));
    assert_eq!((stored.created_at, stored.updated_at), (latest, latest));
    let leased = backend
        .pull(&PullRequest::queue("default"))
        .await
        .expect("pull");
    assert_eq!(leased.iter().map(|l| l.job.id).collect::<Vec<_>>(), [id]);
    backend
        .complete(&leased[0].lease, None)
        .await
        .expect("complete");
    let done = backend.get(id).await.expect("get").expect("stored");
    assert_eq!(done.status, JobStatus::Done);
}

/// A pulled job whose stored payload is not JSON serde_json reads
/// (another program wrote it) is marked dead with the reason, and the
/// jobs pulled with it are handed out, as many as asked for while the
/// queue has them; before, the whole pull failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pulled_job_with_unreadable_json_is_dead_and_the_rest_are_leased() {
    let dir = tempfile::tempdir().expect("temp dir");
    let backend = SqliteBackend::connect(&file_url(&dir))
        .await
        .expect("connect");
    let mut ids = Vec::new();
    for n in 0..4 {
        ids.push(backend.push(job(n)).await.expect("push").id());
    }
    let poisoned = [(ids[1], r#"{"s":"\ud800"}"#), (ids[2], "not json")];
    for (id, payload) in poisoned {
        sqlx::query("UPDATE relayq_jobs SET payload = ? WHERE id = ?")
            .bind(payload)
            .bind(id)
            .execute(backend.pool())
            .await
            .expect("another program's payload");
    }
    // Before any pull, observers read them with their text as a JSON
    // string, as they are stored once killed: a listing holding them reads.
    relayq_conformance::observe::unreadable_payloads_read_as_text(
        &backend,
        &poisoned,
        JobStatus::Pending,
        4,
    )
    .await;
    let leased = backend
        .pull(&PullRequest::queue("default").batch(2))
        .await
        .expect("the pull succeeds");
    let leased: Vec<i64> = leased.iter().map(|l| l.job.id).collect();
    assert_eq!(leased, [ids[0], ids[3]]);
    for (id, _) in poisoned {
        let (status, error): (String, String) =
            sqlx::query_as("SELECT status, last_error FROM relayq_jobs WHERE id = ?")
                .bind(id)
                .fetch_one(backend.pool())
                .await
                .expect("row");
        assert_eq!(status, "dead");
        assert!(error.contains("payload"), "{error}");
    }
    // Their JSON is kept as a string of its text, so they read back.
    relayq_conformance::observe::unreadable_payloads_read_as_text(
        &backend,
        &poisoned,
        JobStatus::Dead,
        4,
    )
    .await;
    // Text that is not UTF-8 is unreadable too, and kept with U+FFFD.
    let bytes = backend.push(job(4)).await.expect("push").id();
    sqlx::query("UPDATE relayq_jobs SET payload = CAST(x'7b22ff227d' AS TEXT) WHERE id = ?")
        .bind(bytes)
        .execute(backend.pool())
        .await
        .expect("another program's bytes");
    assert!(
        backend
            .pull(&PullRequest::queue("default").batch(10))
            .await
            .expect("pull")
            .is_empty()
    );
    let job = backend.get(bytes).await.expect("get").expect("job");
    assert_eq!(
        (job.status, &*job.payload),
        (JobStatus::Dead, &json!("{\"\u{fffd}\"}"))
    );
    let page = backend.list(&ListFilter::new()).await.expect("list");
    assert_eq!(page.jobs.len(), 5);
}

/// Debug output names the database and never panics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_names_the_database() {
    let dir = tempfile::tempdir().expect("temp dir");
    let backend = SqliteBackend::connect(&file_url(&dir))
        .await
        .expect("connect");
    let shown = format!("{backend:?}");
    assert!(shown.contains("jobs.db"), "{shown}");
    let memory = SqliteBackend::connect("sqlite::memory:")
        .await
        .expect("connect");
    assert!(format!("{memory:?}").contains(":memory:"));
}

/// The cross-process poller belongs to the runtime that started it; when
/// that runtime is gone, the next subscription (on another runtime) starts
/// a new one and still hears pushes from other connections.
#[test]
fn wakeups_survive_the_runtime_that_started_the_poller() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = file_url(&dir);
    let options = SqliteOptions::new(&url).poll_interval(StdDuration::from_millis(20));
    let runtime = || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime")
    };
    let first = runtime();
    let (worker_side, old_subscription) = first.block_on(async {
        let backend = SqliteBackend::connect_with(options.clone())
            .await
            .expect("connect");
        let wakeups = backend.subscribe(&[]).await.expect("subscribe");
        (backend, wakeups)
    });
    drop(first);
    drop(old_subscription);

    runtime().block_on(async {
        let mut wakeups = worker_side
            .subscribe(&[])
            .await
            .expect("subscribe")
            .expect("wake-ups");
        let other = SqliteBackend::connect_with(options).await.expect("connect");
        other.push(job(1)).await.expect("push");
        tokio::time::timeout(StdDuration::from_secs(10), wakeups.next())
            .await
            .expect("a push by another connection wakes the new subscriber")
            .expect("open");
    });
}

/// Past jobs scheduled for later at the levels due jobs sit at and below
/// (a backlog of retries in backoff, or of jobs delayed until tomorrow), a
/// claim takes the due jobs in pull order. (The plan test above checks
/// that each level's due jobs are read as an index range, so the scheduled
/// ones are never read.)
#[tokio::test]
async fn claims_take_due_jobs_past_jobs_scheduled_for_later() {
    let dir = tempfile::tempdir().expect("temp dir");
    let backend = SqliteBackend::connect(&file_url(&dir))
        .await
        .expect("connect");
    for priority in [0, 1] {
        let later = (0..20_000)
            .map(|n| job(n).priority(priority).delay(time::Duration::days(1)))
            .collect();
        backend.push_batch(later).await.expect("scheduled jobs");
    }
    let mut due = Vec::new();
    for (n, priority) in [(1, 2), (2, 0), (3, 2), (4, 0), (5, 2)] {
        let id = backend
            .push(job(n).priority(priority))
            .await
            .expect("push")
            .id();
        due.push((priority, id));
    }
    due.sort();
    let pulled = backend
        .pull(&PullRequest::queue("default").batch(10))
        .await
        .expect("pull");
    let got: Vec<(i16, i64)> = pulled
        .iter()
        .map(|leased| (leased.job.priority, leased.job.id))
        .collect();
    assert_eq!(got, due, "the due jobs, in pull order");
}
/// With 100,000 finished jobs in the table, the sweep and the claim read
/// only the partial indexes of active jobs — never a full scan — for one
/// queue and for several.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_walk_the_partial_indexes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let backend = SqliteBackend::connect(&file_url(&dir))
        .await
        .expect("connect");
    sqlx::query(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 100000) \
         INSERT INTO relayq_jobs (queue, kind, payload, priority, status, attempts, \
         max_attempts, lease_token, run_at, created_at, updated_at) \
         SELECT CASE WHEN i % 2 = 0 THEN 'default' ELSE 'other' END, 'k', '{}', 0, \
         CASE WHEN i % 10 = 0 THEN 'dead' ELSE 'done' END, 1, 25, 1, 0, 0, 0 FROM n",
    )
    .execute(backend.pool())
    .await
    .expect("fill");
    for queue in ["default", "other", "third"] {
        backend
            .push_batch((0..200).map(|n| job(n).queue(queue)).collect())
            .await
            .expect("push_batch");
    }
    for request in [
        PullRequest::queue("default").batch(10),
        PullRequest::queues(["default", "other", "third"]).batch(10),
    ] {
        let plan = backend.explain_pull(&request).await.expect("explain");
        println!("{:?}:\n{plan}", request.queues);
        assert!(
            !plan.lines().any(|l| l.contains("SCAN relayq_jobs")),
            "no full scan of the jobs table:\n{plan}"
        );
        let (sweep, claim) = plan.split_once("claim:").expect("two plans");
        assert!(sweep.contains("INDEX relayq_jobs_lease"), "{plan}");
        // Each level's due jobs are an index range: the jobs scheduled for
        // later are never read.
        assert!(
            claim.contains("INDEX relayq_jobs_claim (queue=? AND priority=? AND run_at<?)"),
            "{plan}"
        );
        // Walked only as far as the claim reads, not materialized whole.
        assert!(claim.contains("CO-ROUTINE levels"), "{plan}");
        assert!(claim.contains("INDEX relayq_jobs_lease"), "{plan}");
        let lines: Vec<&str> = claim.lines().collect();
        assert!(
            lines
                .windows(2)
                .all(|w| !(w[0].contains("INDEX relayq_jobs_claim")
                    && w[1].contains("USE TEMP B-TREE"))),
            "due jobs are read in pull order, not sorted:\n{plan}"
        );
        let leased = backend.pull(&request).await.expect("pull");
        assert_eq!(leased.len(), 10);
    }
}
