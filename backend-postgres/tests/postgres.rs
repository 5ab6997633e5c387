//! What only the PostgreSQL backend does: migrations under concurrency,
//! enqueue in the caller's transaction, LISTEN/NOTIFY and its reconnection,
//! the connection budget, configuration errors, the server clock, and the
//! claim plan.

use relayq_postgres::testing;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration as StdDuration;

use relayq_core::{
    Backend, Cleaner, Clock, Completion, Error, JobStatus, Lease, ListFilter, ManualClock, NewJob,
    Observer, PullRequest, Puller, PushOutcome, Pusher, Wakeups,
};
use relayq_postgres::{LISTENER_SUFFIX, PgBackend, PgOptions, SCHEMA_VERSION};
use serde_json::json;
use sqlx::Row;
use time::Duration;

/// A liveness bound for signals that must arrive.
const SIGNAL_DEADLINE: StdDuration = StdDuration::from_secs(10);
/// How long to watch for a signal that must not arrive.
const QUIET: StdDuration = StdDuration::from_millis(500);

fn job(n: i64) -> NewJob {
    NewJob::new("k", &json!({ "n": n }))
}

/// A subscription of `backend` to `queues`, which PostgreSQL supports.
async fn subscribed(backend: &PgBackend, queues: &[String]) -> Wakeups {
    backend
        .subscribe(queues)
        .await
        .expect("subscribe")
        .expect("subscription")
}

async fn expect_signal(wakeups: &mut Wakeups, why: &str) {
    match tokio::time::timeout(SIGNAL_DEADLINE, wakeups.next()).await {
        Ok(Some(())) => {}
        Ok(None) => panic!("subscription closed while waiting: {why}"),
        Err(_) => panic!("no signal within {SIGNAL_DEADLINE:?}: {why}"),
    }
}

/// Consumes the signals already sent, until none comes for `quiet`.
async fn drain(wakeups: &mut Wakeups, quiet: StdDuration) {
    while let Ok(Some(())) = tokio::time::timeout(quiet, wakeups.next()).await {}
}

async fn expect_quiet(wakeups: &mut Wakeups, why: &str) {
    if let Ok(signal) = tokio::time::timeout(QUIET, wakeups.next()).await {
        panic!("unexpected signal {signal:?}: {why}");
    }
}

/// A backend on `backend`'s schema that shares nothing else with it, as
/// another process's would: its pushes reach `backend`'s subscribers only
/// through NOTIFY (a push wakes its own backend's subscribers directly).
async fn other_process(backend: &PgBackend) -> PgBackend {
    testing::connect(
        PgOptions::new(testing::database_url())
            .schema(backend.schema())
            .max_connections(1),
    )
    .await
}

fn app_name(tag: &str) -> String {
    format!("rq_{tag}_{}", std::process::id())
}

/// Pool and listener connections of `app` (pool connections report `app`,
/// the listener `app` + LISTENER_SUFFIX).
async fn connections(app: &str) -> (i64, i64) {
    let mut conn = testing::admin().await;
    let row = sqlx::query(
        "SELECT count(*) FILTER (WHERE application_name = $1) AS pool,
                count(*) FILTER (WHERE application_name = $2) AS listener
         FROM pg_stat_activity",
    )
    .bind(app)
    .bind(format!("{app}{LISTENER_SUFFIX}"))
    .fetch_one(&mut conn)
    .await
    .expect("pg_stat_activity");
    (row.get("pool"), row.get("listener"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_migrations_apply_each_version_once() {
    for isolation in [None, Some("repeatable read"), Some("serializable")] {
        migrate_one_schema_at_once(isolation).await;
    }
}

/// Pullers racing for the same rows on a database whose sessions default
/// to SERIALIZABLE: each claim still passes over the rows others took
/// (at READ COMMITTED) instead of failing with a serialization error, and
/// every job is delivered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_race_cleanly_whatever_the_databases_default_isolation() {
    let options = PgOptions::new(url_defaulting_to(Some("serializable")))
        .schema(testing::unique_schema())
        .max_connections(8);
    let backend = testing::connect(options).await;
    let isolation: String = sqlx::query_scalar("SHOW transaction_isolation")
        .fetch_one(backend.pool())
        .await
        .expect("show");
    assert_eq!(isolation, "read committed");
    const JOBS: i64 = 400;
    backend
        .push_batch((0..JOBS).map(job).collect())
        .await
        .expect("push");
    let pullers: Vec<_> = (0..8)
        .map(|_| {
            let backend = backend.clone();
            tokio::spawn(async move {
                let mut ids = Vec::new();
                loop {
                    let leased = backend
                        .pull(&PullRequest::queue("default").batch(2))
                        .await
                        .expect("a claim racing others succeeds");
                    if leased.is_empty() {
                        return ids;
                    }
                    ids.extend(leased.iter().map(|l| l.job.id));
                }
            })
        })
        .collect();
    let mut ids = Vec::new();
    for puller in pullers {
        ids.extend(puller.await.expect("puller"));
    }
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), JOBS as usize);
    testing::drop_schema(backend.schema()).await;
}

/// A job marked `Cancelled` (a status SPEC reserves, which no call makes
/// yet) reads back as one: the schema needs no change when it comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_job_reads_back() {
    let clock = ManualClock::new(relayq_conformance::EPOCH);
    let backend = testing::connect(testing::options().clock(Arc::new(clock.clone()))).await;
    let h = relayq_conformance::Harness::new(Arc::new(backend.clone()), clock.clone());
    let id = relayq_conformance::observe::push_a_job_to_cancel(&h).await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE \"{}\".jobs SET status = 'cancelled', updated_at = $2 WHERE id = $1",
        backend.schema()
    )))
    .bind(id)
    .bind(h.now())
    .execute(backend.pool())
    .await
    .expect("cancel");
    relayq_conformance::observe::a_cancelled_job_reads_back(&h, id).await;
    testing::drop_schema(backend.schema()).await;
}

/// A backend on a schema of its own holding one pending job, whose
/// version 4 is pending again: it alters the jobs table's columns (to the
/// types they already have, so nothing is rewritten), which takes the
/// table's exclusive lock. Returns the backend, its schema and the job.
async fn version_4_pending() -> (PgBackend, String, i64) {
    let backend = testing::connect(testing::options()).await;
    let schema = backend.schema().to_owned();
    let id = backend.push(job(1)).await.expect("push").id();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DELETE FROM \"{schema}\".schema_version WHERE version = 4"
    )))
    .execute(backend.pool())
    .await
    .expect("forget version 4");
    (backend, schema, id)
}

/// A migration that must lock the jobs table while a long transaction
/// uses it gives way instead of queueing every queue operation behind its
/// lock request, and finishes once that transaction ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_waiting_on_a_long_transaction_holds_up_no_queue_operation() {
    let (backend, schema, id) = version_4_pending().await;
    // A caller's transaction with a push in it, left open.
    let mut holder = testing::admin().await;
    let mut tx = sqlx::Connection::begin(&mut holder).await.expect("begin");
    backend.push_in(&mut tx, job(2)).await.expect("push_in");
    let migrating = tokio::spawn(PgBackend::connect_with(
        PgOptions::new(testing::database_url())
            .schema(schema.clone())
            .max_connections(1),
    ));
    // Wait until the migration has asked for its lock at least once (each
    // attempt asks for a second, then pauses for one).
    let mut waited = false;
    let asked_by = std::time::Instant::now() + SIGNAL_DEADLINE;
    while std::time::Instant::now() < asked_by {
        let waiting: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_locks l JOIN pg_class c ON c.oid = l.relation
              JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = $1 AND c.relname = 'jobs' AND l.mode = 'AccessExclusiveLock'
                AND NOT l.granted)",
        )
        .bind(&schema)
        .fetch_one(backend.pool())
        .await
        .expect("locks");
        if waiting {
            waited = true;
            break;
        }
        tokio::time::sleep(StdDuration::from_millis(10)).await;
    }
    assert!(waited, "the migration waits for the table");
    // Queue operations go on while the transaction stays open.
    for _ in 0..3 {
        let found = backend.get(id).await.expect("get").expect("job");
        assert_eq!(found.status, JobStatus::Pending);
        backend.push(job(3)).await.expect("push");
    }
    assert!(!migrating.is_finished(), "the migration still waits");
    tx.commit().await.expect("commit");
    let migrated = migrating.await.expect("task").expect("migrated at last");
    assert_eq!(
        migrated.schema_version().await.expect("version"),
        SCHEMA_VERSION
    );
    testing::drop_schema(&schema).await;
}

/// A migrator that hangs inside its transaction (a stopped process, a cut
/// the server sees no reset of), here with the jobs table locked by a
/// migration, holds up queue operations and other migrators only until
/// the server ends its idle session, not until TCP keepalive notices.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migrator_hung_in_its_transaction_is_ended_by_the_server() {
    let (backend, schema, id) = version_4_pending().await;
    let url = testing::database_url();
    let target: sqlx::postgres::PgConnectOptions = url.parse().expect("test URL");
    let proxy = Proxy::stalling_on(
        format!("{}:{}", target.get_host(), target.get_port()),
        b"ALTER COLUMN payload TYPE json",
    )
    .await;
    // In clear text, so the proxy sees the statement.
    let clear = proxy.url(&url);
    let clear = format!(
        "{clear}{}sslmode=disable",
        if clear.contains('?') { '&' } else { '?' }
    );
    let hung = tokio::spawn(PgBackend::connect_with(
        PgOptions::new(clear)
            .schema(schema.clone())
            .max_connections(1),
    ));
    tokio::time::timeout(SIGNAL_DEADLINE, proxy.stalled.notified())
        .await
        .expect("the migrator reached version 4");
    // The hung migrator holds the jobs table.
    let mut admin = testing::admin().await;
    tokio::time::timeout(SIGNAL_DEADLINE, async {
        loop {
            let locked: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM pg_locks l JOIN pg_class c ON c.oid = l.relation
                  JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE n.nspname = $1 AND c.relname = 'jobs'
                    AND l.mode = 'AccessExclusiveLock' AND l.granted)",
            )
            .bind(&schema)
            .fetch_one(&mut admin)
            .await
            .expect("locks");
            if locked {
                break;
            }
            tokio::time::sleep(StdDuration::from_millis(10)).await;
        }
    })
    .await
    .expect("the hung migrator locked the jobs table");

    // Within the server's idle timeout (10 s) and well before the reply
    // timeout, not two hours.
    let within = StdDuration::from_secs(40);
    let found = tokio::time::timeout(within, backend.get(id))
        .await
        .expect("the jobs table is free again")
        .expect("get")
        .expect("job");
    assert_eq!(found.status, JobStatus::Pending);
    let migrated = tokio::time::timeout(
        within,
        PgBackend::connect_with(testing::options().schema(schema.clone())),
    )
    .await
    .expect("the migration lock is free again")
    .expect("migrate");
    assert_eq!(
        migrated.schema_version().await.expect("version"),
        SCHEMA_VERSION
    );
    assert!(!hung.is_finished(), "the hung migrator still hangs");
    // Continued, it finds its session ended (a rolled-back transaction) and
    // migrates again: nothing is left to apply.
    proxy.resume();
    let resumed = tokio::time::timeout(within, hung)
        .await
        .expect("the resumed migrator ends")
        .expect("task")
        .expect("the resumed migrator tries again");
    assert_eq!(
        resumed.schema_version().await.expect("version"),
        SCHEMA_VERSION
    );
    proxy.cut().await;
    testing::drop_schema(&schema).await;
}

/// A store of schema version 3 (payload and result as `jsonb`) keeps its
/// jobs through the version 4 migration to `json`, and reads them back
/// with the same values; a process running on version 3 (started with
/// `migrate(false)`) goes on reading through the statements it prepared
/// there.
#[tokio::test]
async fn migrating_jsonb_payloads_to_json_keeps_every_job() {
    // One connection, so its prepared statements are the ones reused.
    let backend = testing::connect(testing::options().max_connections(1)).await;
    let schema = backend.schema().to_owned();
    let payload = json!({"user": 7, "tags": ["a", "b"], "ratio": 0.25});
    let pending = backend
        .push(NewJob::new("k", &payload))
        .await
        .expect("push")
        .id();
    let done = backend
        .push(NewJob::new("k", &payload))
        .await
        .expect("push")
        .id();
    complete_only(&backend, done, json!({"sent": true})).await;
    // Back to version 3, as an older relayq left it.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "ALTER TABLE \"{schema}\".jobs
             ALTER COLUMN payload TYPE jsonb USING payload::jsonb,
             ALTER COLUMN result TYPE jsonb USING result::jsonb;
         DELETE FROM \"{schema}\".schema_version WHERE version = 4"
    )))
    .execute(backend.pool())
    .await
    .expect("back to version 3");
    // This version writes to version 3 as well (`json` parameters into
    // `jsonb` columns); the jobs done so far are cleaned before the checks
    // below, and `done` pushed again.
    let extra = backend
        .push(NewJob::new("k", &payload))
        .await
        .expect("push on version 3")
        .id();
    complete_only(&backend, extra, json!({"v": 3})).await;
    let cleaned = backend
        .clean(
            JobStatus::Done,
            time::OffsetDateTime::now_utc() + Duration::hours(1),
        )
        .await
        .expect("clean");
    assert_eq!(cleaned, 2);
    let done = backend
        .push(NewJob::new("k", &payload))
        .await
        .expect("push")
        .id();
    complete_only(&backend, done, json!({"sent": true})).await;
    // Prepared on version 3, then run again on version 4.
    assert_reads(&backend, (pending, done), &payload).await;
    let migrated = PgBackend::connect_with(testing::options().schema(schema.clone()))
        .await
        .expect("migrate to version 4");
    assert_reads(&backend, (pending, done), &payload).await;
    assert_reads(&migrated, (pending, done), &payload).await;
    let types: Vec<String> = sqlx::query_scalar(
        "SELECT data_type::text FROM information_schema.columns
         WHERE table_schema = $1 AND table_name = 'jobs' AND column_name IN ('payload', 'result')",
    )
    .bind(&schema)
    .fetch_all(migrated.pool())
    .await
    .expect("column types");
    assert_eq!(types, ["json", "json"]);
    let leased = backend
        .pull(&PullRequest::queue("default"))
        .await
        .expect("pull after migrating");
    assert_eq!(leased.len(), 1);
    assert_eq!(*leased[0].job.payload, payload);
    testing::drop_schema(&schema).await;
}

/// Pulls the two pending jobs of `migrating_jsonb_payloads_to_json_keeps_every_job`,
/// completes job `id` with `result` and releases the other.
async fn complete_only(backend: &PgBackend, id: i64, result: serde_json::Value) {
    let leased = backend
        .pull(&PullRequest::queue("default").batch(2))
        .await
        .expect("pull");
    assert!(leased.iter().any(|l| l.job.id == id), "job {id} leased");
    for l in &leased {
        if l.job.id == id {
            let result = Some(result.clone());
            backend.complete(&l.lease, result).await.expect("complete");
        } else {
            backend.release(&l.lease).await.expect("release");
        }
    }
}

/// `get` and `list` on `backend` read the pending job's `payload` and the
/// done job's result of `migrating_jsonb_payloads_to_json_keeps_every_job`.
async fn assert_reads(
    backend: &PgBackend,
    (pending, done): (i64, i64),
    payload: &serde_json::Value,
) {
    let job = backend
        .get(pending)
        .await
        .expect("get")
        .expect("pending job");
    assert_eq!(*job.payload, *payload);
    let job = backend.get(done).await.expect("get").expect("done job");
    assert_eq!(job.result, Some(json!({"sent": true})));
    let page = backend.list(&ListFilter::new()).await.expect("list");
    assert_eq!(page.jobs.len(), 2);
}

/// A pulled job whose stored payload serde_json cannot read (another
/// program wrote it: `json` takes a lone surrogate escape or a number
/// beyond `f64`) is marked dead with the reason, and the jobs pulled with
/// it are handed out, as many as asked for while the queue has them;
/// before, the whole pull failed, again at every lease
/// expiry, spending the attempts of every job pulled with it.
#[tokio::test]
async fn a_pulled_job_with_unreadable_json_is_dead_and_the_rest_are_leased() {
    let backend = testing::connect(testing::options()).await;
    let schema = backend.schema().to_owned();
    let mut ids = Vec::new();
    for n in 0..4 {
        ids.push(backend.push(job(n)).await.expect("push").id());
    }
    let poisoned = [(ids[1], r#"{"s":"\ud800"}"#), (ids[2], r#"{"n":1e400}"#)];
    for (id, payload) in poisoned {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE \"{schema}\".jobs SET payload = $2::json WHERE id = $1"
        )))
        .bind(id)
        .bind(payload)
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
        let (status, error): (String, String) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT status, last_error FROM \"{schema}\".jobs WHERE id = $1"
        )))
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
    assert!(
        backend
            .pull(&PullRequest::queue("default").batch(10))
            .await
            .expect("pull")
            .is_empty()
    );
    testing::drop_schema(&schema).await;
}

/// A job whose times another program stored beyond the years relayq holds
/// (-9999 to 9999: PostgreSQL's `infinity`, the year 10000) reads as the
/// nearest instant it holds, so it is pulled, run and observed like any
/// other (sqlx's own conversion panicked, in every read of it, the pulls
/// that met it included).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn times_beyond_what_relayq_holds_read_as_the_nearest() {
    use time::macros::datetime;
    let backend = testing::connect(testing::options()).await;
    let id = backend.push(job(1)).await.expect("push").id();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE \"{}\".jobs SET run_at = '-infinity', created_at = 'infinity', \
         updated_at = '10000-01-01 00:00 UTC' WHERE id = $1",
        backend.schema()
    )))
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
    testing::drop_schema(backend.schema()).await;
}

/// A column another program changed to a type relayq does not read fails
/// the read with an error that names the column (rows are read by
/// position, which sqlx's own error would give as a number).
#[tokio::test]
async fn a_column_that_does_not_decode_is_named() {
    let backend = testing::connect(testing::options()).await;
    let id = backend.push(job(1)).await.expect("push").id();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER TABLE \"{}\".jobs ALTER COLUMN max_attempts TYPE numeric",
        backend.schema()
    )))
    .execute(backend.pool())
    .await
    .expect("another program's column type");
    let e = backend
        .get(id)
        .await
        .expect_err("max_attempts is not an int4");
    assert!(matches!(e, Error::Backend { .. }), "{e:?}");
    assert!(e.to_string().contains("\"max_attempts\""), "{e}");
    testing::drop_schema(backend.schema()).await;
}

/// A pooled connection the server ended (an administrator, a failover)
/// fails the call made on it with a transient error, and the next call
/// gets a new connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_the_server_ended_fails_transiently() {
    let backend = testing::connect(testing::options().max_connections(1)).await;
    let mut admin = testing::admin().await;
    // Before the connection goes back to the pool: it is idle for less.
    let idle_since = std::time::Instant::now();
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(backend.pool())
        .await
        .expect("pid");
    // Back in the pool (sqlx checks a returned connection first), so the
    // push below takes the connection that is about to end.
    idle_connections(&backend, 1).await;
    let ended: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1, 10000)")
        .bind(pid)
        .fetch_one(&mut admin)
        .await
        .expect("terminate");
    assert!(ended, "the connection ended");
    match backend.push(job(1)).await {
        Err(e) => assert!(e.is_transient(), "{e:?}"),
        // A connection idle for a second is pinged before use, and
        // replaced: on a loaded machine the push may come that late.
        Ok(outcome) => assert!(
            idle_since.elapsed() >= StdDuration::from_secs(1),
            "pushed as {outcome:?} on a connection the server ended"
        ),
    }
    backend
        .push(job(2))
        .await
        .expect("a push on a new connection");
    testing::drop_schema(backend.schema()).await;
}

/// The test database's URL with `param` (`key=value`) added to its query.
fn test_url_with(param: &str) -> String {
    let url = testing::database_url();
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{param}")
}

/// The test database's URL, with sessions defaulting to `isolation` (as
/// `ALTER DATABASE … SET default_transaction_isolation` would make them).
fn url_defaulting_to(isolation: Option<&str>) -> String {
    match isolation {
        None => testing::database_url(),
        Some(level) => {
            // A space in an option value is escaped with a backslash.
            let level = level.replace(' ', "%5C%20");
            test_url_with(&format!(
                "options=-c%20default_transaction_isolation%3D{level}"
            ))
        }
    }
}

async fn migrate_one_schema_at_once(isolation: Option<&str>) {
    let schema = testing::unique_schema();
    testing::sweep_stale_schemas().await;
    let url = url_defaulting_to(isolation);
    // Six backends, each with its own pool, migrating one new schema at once.
    let tasks: Vec<_> = (0..6)
        .map(|_| {
            let options = PgOptions::new(url.clone())
                .schema(schema.clone())
                .max_connections(1);
            tokio::spawn(PgBackend::connect_with(options))
        })
        .collect();
    let mut backends = Vec::new();
    for task in tasks {
        let backend = task.await.expect("task");
        backends
            .push(backend.unwrap_or_else(|e| panic!("{isolation:?}: connect and migrate: {e:?}")));
    }
    let backend = &backends[0];
    assert_eq!(
        backend.schema_version().await.expect("version"),
        SCHEMA_VERSION
    );
    let versions: Vec<i32> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT version FROM \"{schema}\".schema_version ORDER BY version"
    )))
    .fetch_all(backend.pool())
    .await
    .expect("versions");
    assert_eq!(versions, (1..=SCHEMA_VERSION).collect::<Vec<_>>());
    // Idempotent, and the schema works.
    backend.migrate().await.expect("migrate again");
    backends[5].push(job(1)).await.expect("push");
    assert_eq!(
        backend
            .pull(&PullRequest::queue("default"))
            .await
            .expect("pull")
            .len(),
        1
    );
    testing::drop_schema(&schema).await;
}

/// A `statement_timeout` and a `lock_timeout` of the session (set for the
/// role, the database or, here, in the URL) do not end a migration's wait
/// for another migrator: each process of a fleet deployed at once starts.
/// With them, the wait for the advisory lock failed after 200 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_outwaits_the_sessions_statement_and_lock_timeouts() {
    let schema = testing::unique_schema();
    // Another migrator of the same schema, holding the migration lock.
    let mut other = testing::admin().await;
    let mut tx = sqlx::Connection::begin(&mut other).await.expect("begin");
    sqlx::query("SELECT pg_advisory_xact_lock(x'7271'::int, hashtext($1))")
        .bind(&schema)
        .execute(&mut *tx)
        .await
        .expect("the migration lock");
    let url = test_url_with("options=-c%20statement_timeout%3D200ms%20-c%20lock_timeout%3D200ms");
    let migrating = tokio::spawn(PgBackend::connect_with(
        PgOptions::new(url)
            .schema(schema.clone())
            .max_connections(1),
    ));
    tokio::time::sleep(StdDuration::from_secs(1)).await;
    assert!(!migrating.is_finished(), "the migration waits for the lock");
    tx.commit().await.expect("release the lock");
    let backend = migrating
        .await
        .expect("task")
        .expect("migrated once the lock was free");
    assert_eq!(
        backend.schema_version().await.expect("version"),
        SCHEMA_VERSION
    );
    backend.push(job(1)).await.expect("push");
    testing::drop_schema(&schema).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_newer_than_the_crate_is_refused() {
    let options = testing::options();
    let backend = testing::connect(options.clone()).await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO \"{}\".schema_version (version, description) VALUES ($1, 'future')",
        backend.schema()
    )))
    .bind(SCHEMA_VERSION + 1)
    .execute(backend.pool())
    .await
    .expect("insert");
    match backend.migrate().await {
        Err(Error::SchemaTooNew { found, supported }) => assert_eq!(
            (found, supported),
            (i64::from(SCHEMA_VERSION) + 1, i64::from(SCHEMA_VERSION))
        ),
        other => panic!("expected SchemaTooNew, got {other:?}"),
    }
    testing::drop_schema(backend.schema()).await;
}

/// With the `tls-rustls` feature, `sslmode=require` encrypts every
/// connection the backend opens, its LISTEN connection included. The test
/// server must offer TLS, as Debian's packaged server and the throwaway
/// clusters of scripts/postgres-env do.
#[cfg(feature = "tls-rustls")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmode_require_encrypts_every_connection() {
    let name = format!("relayq-tls-{}", std::process::id());
    let options = PgOptions::new(test_url_with("sslmode=require"))
        .schema(testing::unique_schema())
        .max_connections(4)
        .application_name(name.clone());
    let backend = match PgBackend::connect_with(options).await {
        Ok(backend) => backend,
        Err(e) => panic!("sslmode=require: {e:?} (does the test server have ssl = on?)"),
    };
    let mut wakeups = backend
        .subscribe(&["default".to_owned()])
        .await
        .expect("subscribe")
        .expect("wake-ups");
    backend.push(job(1)).await.expect("push");
    expect_signal(&mut wakeups, "a push over TLS, heard over TLS").await;
    let leased = backend
        .pull(&PullRequest::queue("default"))
        .await
        .expect("pull");
    backend
        .complete(&leased[0].lease, None)
        .await
        .expect("complete");

    let mut admin = testing::admin().await;
    let connections: Vec<(String, bool)> = sqlx::query_as(
        "SELECT a.application_name, s.ssl FROM pg_stat_activity a \
         JOIN pg_stat_ssl s USING (pid) WHERE a.application_name LIKE $1 || '%'",
    )
    .bind(&name)
    .fetch_all(&mut admin)
    .await
    .expect("pg_stat_ssl");
    let listener = format!("{name}{LISTENER_SUFFIX}");
    assert!(
        connections.iter().any(|(app, _)| *app == listener),
        "the LISTEN connection is among {connections:?}"
    );
    assert!(
        connections.iter().any(|(app, _)| *app == name),
        "a pool connection is among {connections:?}"
    );
    assert!(
        connections.iter().all(|(_, ssl)| *ssl),
        "every connection is encrypted: {connections:?}"
    );
    testing::drop_schema(backend.schema()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_in_the_callers_transaction() {
    let backend = testing::connect(testing::options()).await;
    let schema = backend.schema().to_owned();
    let queues = vec!["tx".to_owned()];
    let mut wakeups = subscribed(&backend, &queues).await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE \"{schema}\".orders (id int PRIMARY KEY)"
    )))
    .execute(backend.pool())
    .await
    .expect("create orders");
    let insert_order = format!("INSERT INTO \"{schema}\".orders VALUES ($1)");

    // Rolled back: neither the order nor the job exists, and nobody woke.
    let mut tx = backend.pool().begin().await.expect("begin");
    sqlx::query(sqlx::AssertSqlSafe(insert_order.clone()))
        .bind(1)
        .execute(&mut *tx)
        .await
        .expect("order");
    let rolled_back = backend
        .push_in(&mut tx, job(1).queue("tx"))
        .await
        .expect("push_in")
        .id();
    assert_eq!(
        backend.get(rolled_back).await.expect("get"),
        None,
        "invisible before commit"
    );
    expect_quiet(&mut wakeups, "no wake-up before commit").await;
    tx.rollback().await.expect("rollback");
    expect_quiet(&mut wakeups, "no wake-up after rollback").await;
    assert_eq!(backend.get(rolled_back).await.expect("get"), None);
    assert!(
        backend
            .pull(&PullRequest::queue("tx"))
            .await
            .expect("pull")
            .is_empty()
    );

    // Committed: the order, the jobs, and one wake-up.
    let mut tx = backend.pool().begin().await.expect("begin");
    sqlx::query(sqlx::AssertSqlSafe(insert_order))
        .bind(2)
        .execute(&mut *tx)
        .await
        .expect("order");
    let one = backend
        .push_in(&mut tx, job(2).queue("tx").unique_key("order:2"))
        .await
        .expect("push_in");
    let more = backend
        .push_batch_in(
            &mut tx,
            vec![job(3).queue("tx"), job(4).queue("tx").unique_key("order:2")],
        )
        .await
        .expect("push_batch_in");
    assert_eq!(
        more[1],
        PushOutcome::Duplicate(one.id()),
        "dedupes within the transaction"
    );
    tx.commit().await.expect("commit");
    expect_signal(&mut wakeups, "commit wakes the subscriber").await;
    let job = backend
        .get(one.id())
        .await
        .expect("get")
        .expect("visible after commit");
    assert_eq!(job.status, JobStatus::Pending);
    let orders: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM \"{schema}\".orders"
    )))
    .fetch_one(backend.pool())
    .await
    .expect("count");
    assert_eq!(orders, 1);
    let leased = backend
        .pull(&PullRequest::queue("tx").batch(10))
        .await
        .expect("pull");
    assert_eq!(leased.len(), 2);

    // Invalid input is rejected before touching the caller's transaction.
    let mut conn = backend.pool().acquire().await.expect("acquire");
    match backend
        .push_in(&mut conn, NewJob::new("", &json!({})))
        .await
    {
        Err(Error::InvalidInput { field: "kind", .. }) => {}
        other => panic!("expected InvalidInput, got {other:?}"),
    }
    drop(conn);
    testing::drop_schema(&schema).await;
}

/// A caller's transaction the server ended for idling
/// (`idle_in_transaction_session_timeout`) fails the push transiently: the
/// session is gone, and the whole transaction made again on a fresh one
/// succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_in_a_transaction_the_server_ended_for_idling_is_transient() {
    let backend = testing::connect(testing::options()).await;
    let mut tx = backend.pool().begin().await.expect("begin");
    sqlx::query("SET LOCAL idle_in_transaction_session_timeout = '100ms'")
        .execute(&mut *tx)
        .await
        .expect("set the timeout");
    tokio::time::sleep(StdDuration::from_millis(500)).await;
    let e = backend
        .push_in(&mut tx, job(1))
        .await
        .expect_err("the session was ended");
    assert!(e.is_transient(), "{e:?}");
    drop(tx);
    let mut tx = backend.pool().begin().await.expect("begin again");
    backend.push_in(&mut tx, job(1)).await.expect("push again");
    tx.commit().await.expect("commit");
    assert_eq!(
        backend
            .stats()
            .await
            .expect("stats")
            .queue("default")
            .pending,
        1
    );
    testing::drop_schema(backend.schema()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_notification_per_queue_per_transaction() {
    let backend = testing::connect(testing::options()).await;
    let mut listener = sqlx::postgres::PgListener::connect(&testing::database_url())
        .await
        .expect("listener");
    let channels: Vec<(String, String)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT q, \"{}\".notify_channel(q) FROM unnest(ARRAY['a', 'b']) AS q",
        backend.schema()
    )))
    .fetch_all(backend.pool())
    .await
    .expect("channels");
    for (_, channel) in &channels {
        listener.listen(channel).await.expect("listen");
    }
    let mut tx = backend.pool().begin().await.expect("begin");
    backend
        .push_batch_in(&mut tx, (0..100).map(|n| job(n).queue("a")).collect())
        .await
        .expect("batch a");
    backend
        .push_batch_in(
            &mut tx,
            (0..50)
                .map(|n| job(n).queue(if n % 2 == 0 { "a" } else { "b" }))
                .collect(),
        )
        .await
        .expect("batch a and b");
    backend
        .push_in(&mut tx, job(0).queue("b"))
        .await
        .expect("push b");
    tx.commit().await.expect("commit");

    // The two expected, however late they come; then any more, within QUIET.
    let mut received = Vec::new();
    while received.len() < 2 {
        match tokio::time::timeout(SIGNAL_DEADLINE, listener.try_recv()).await {
            Ok(Ok(Some(n))) => received.push((n.channel().to_owned(), n.payload().to_owned())),
            _ => break,
        }
    }
    while let Ok(Ok(Some(n))) = tokio::time::timeout(QUIET, listener.try_recv()).await {
        received.push((n.channel().to_owned(), n.payload().to_owned()));
    }
    received.sort();
    let mut expected: Vec<(String, String)> = channels
        .iter()
        .map(|(queue, channel)| (channel.clone(), queue.clone()))
        .collect();
    expected.sort();
    assert_eq!(
        received, expected,
        "one notification per queue, payload = queue"
    );
    assert!(expected[0].0.starts_with("relayq_") && expected[0].0.len() < 64);

    // Duplicates insert nothing and notify nothing.
    backend
        .push(job(1).queue("a").unique_key("k"))
        .await
        .expect("push");
    tokio::time::timeout(SIGNAL_DEADLINE, listener.try_recv())
        .await
        .expect("the first push notifies")
        .expect("listener")
        .expect("a notification");
    backend
        .push(job(2).queue("a").unique_key("k"))
        .await
        .expect("push");
    assert!(
        tokio::time::timeout(QUIET, listener.try_recv())
            .await
            .is_err(),
        "a duplicate notifies nobody"
    );
    testing::drop_schema(backend.schema()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_are_per_queue() {
    let backend = testing::connect(testing::options()).await;
    let mut only_a = subscribed(&backend, &["a".to_owned()]).await;
    let mut a_and_b = subscribed(&backend, &["a".to_owned(), "b".to_owned()]).await;
    backend.push(job(1).queue("b")).await.expect("push");
    expect_signal(&mut a_and_b, "b wakes the a+b subscriber").await;
    expect_quiet(&mut only_a, "b does not wake the a subscriber").await;
    backend.push(job(2).queue("a")).await.expect("push");
    expect_signal(&mut only_a, "a wakes the a subscriber").await;
    expect_signal(&mut a_and_b, "a wakes the a+b subscriber").await;
    // The backend's listener hears pushes through other backends (other
    // processes) too.
    let other = other_process(&backend).await;
    drain(&mut only_a, QUIET).await;
    other
        .push(job(3).queue("a"))
        .await
        .expect("push from another pool");
    expect_signal(&mut only_a, "a push through another pool wakes too").await;
    testing::drop_schema(backend.schema()).await;
}

/// A backend on `backend`'s schema, as another process's, whose
/// connections go through a proxy that passes on what holds
/// [`REPLY_LOST`] and then nothing more either way: its statement commits,
/// and its reply never comes (the reply timeout is 1 s).
async fn losing_replies(backend: &PgBackend) -> (Proxy, PgBackend) {
    let url = testing::database_url();
    let target: sqlx::postgres::PgConnectOptions = url.parse().expect("test URL");
    let proxy = Proxy::stalling_on(
        format!("{}:{}", target.get_host(), target.get_port()),
        REPLY_LOST.as_bytes(),
    )
    .await;
    // In clear text, so the proxy sees the payload.
    let clear = proxy.url(&url);
    let clear = format!(
        "{clear}{}sslmode=disable",
        if clear.contains('?') { '&' } else { '?' }
    );
    let through = testing::connect(
        PgOptions::new(clear)
            .schema(backend.schema())
            .max_connections(2)
            .reply_timeout(Some(StdDuration::from_secs(1))),
    )
    .await;
    (proxy, through)
}

/// What a payload holds for [`losing_replies`] to lose its push's reply.
const REPLY_LOST: &str = "the-reply-is-lost";

/// A push whose reply is lost after the server committed it fails
/// transiently, and still wakes the queue's workers, in every process:
/// its jobs are stored and due, and without a wake-up they were found only
/// at the next poll. Here a batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_whose_reply_was_lost_wakes_the_workers() {
    let backend = testing::connect(testing::options()).await;
    let mut woken = subscribed(&backend, &["default".to_owned()]).await;
    let (proxy, through) = losing_replies(&backend).await;
    drain(&mut woken, QUIET).await;
    let batch = vec![NewJob::new("k", &json!({ "note": REPLY_LOST })), job(2)];
    let e = through
        .push_batch(batch)
        .await
        .expect_err("the reply never came");
    assert!(e.is_transient(), "{e}");
    expect_signal(&mut woken, "the stored jobs wake the workers").await;
    let stats = backend.stats().await.expect("stats");
    assert_eq!(stats.queue("default").pending, 2, "the batch was stored");
    proxy.resume();
    testing::drop_schema(backend.schema()).await;
}

/// [`a_push_whose_reply_was_lost_wakes_the_workers`] for a single push
/// folded behind another one under way, which is inserted without its
/// notification (sent once the insert is answered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_folded_push_whose_reply_was_lost_wakes_the_workers() {
    let backend = testing::connect(testing::options()).await;
    let mut woken = subscribed(&backend, &["lost".to_owned()]).await;
    let (proxy, through) = losing_replies(&backend).await;
    drain(&mut woken, QUIET).await;
    let lost = NewJob::new("k", &json!({ "note": REPLY_LOST })).queue("lost");
    let (first, lost) = tokio::join!(through.push(job(1)), through.push(lost));
    first.expect("the first push");
    let e = lost.expect_err("the reply never came");
    assert!(e.is_transient(), "{e}");
    expect_signal(&mut woken, "the stored job wakes the workers").await;
    let stats = backend.stats().await.expect("stats");
    assert_eq!(stats.queue("lost").pending, 1, "the job was stored");
    proxy.resume();
    testing::drop_schema(backend.schema()).await;
}

#[test]
fn the_test_database_is_swapped_in_the_url() {
    assert_eq!(
        testing::with_database("postgres://u:p@h:5432/postgres?sslmode=disable", "t"),
        "postgres://u:p@h:5432/t?sslmode=disable"
    );
    assert_eq!(
        testing::with_database("postgres://h", "t"),
        "postgres://h/t"
    );
    assert_eq!(
        testing::with_database("postgres://h/", "t"),
        "postgres://h/t"
    );
}

/// A database whose encoding lacks characters (LATIN1) is refused at
/// connect, naming the setting: it would refuse a result holding one each
/// time the job's outcome was written, and the job would run again and
/// again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_not_encoded_in_utf8_is_refused() {
    let name = testing::unique_schema();
    let mut admin = testing::admin().await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE DATABASE \"{name}\" ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"
    )))
    .execute(&mut admin)
    .await
    .expect("create a LATIN1 database");
    let refused = PgBackend::connect(&testing::url_of_database(&name)).await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE \"{name}\" WITH (FORCE)"
    )))
    .execute(&mut admin)
    .await
    .expect("drop the database");
    match refused {
        Err(e) => assert_eq!(e.config_setting(), Some("database"), "{e}"),
        Ok(_) => panic!("a LATIN1 database was accepted"),
    }
}

/// A claim may lock more due jobs than it keeps: a batch from each of
/// several queues at one priority, or due jobs beside expired leases. A
/// puller running beside it passes those by and may come back short,
/// taking its queues for drained, though the jobs are unlocked as soon as
/// the claim commits. So such a claim wakes the queues' workers, in every
/// process; a claim that kept every job it locked does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_that_passed_due_jobs_over_wakes_their_workers() {
    let clock = ManualClock::new(relayq_conformance::EPOCH);
    let backend = testing::connect(testing::options().clock(Arc::new(clock.clone()))).await;
    let other = other_process(&backend).await;
    let mut woken = subscribed(&other, &["a".to_owned(), "b".to_owned()]).await;
    let push = |queue: &'static str, priority: i16, count: i64| {
        let backend = backend.clone();
        async move {
            for n in 0..count {
                let job = job(n).queue(queue).priority(priority);
                backend.push(job).await.expect("push");
            }
        }
    };
    let both = PullRequest::queues(["a", "b"]).batch(2);

    // One level of two queues: 2 locked in each, 2 kept.
    push("a", 0, 2).await;
    push("b", 0, 2).await;
    drain(&mut woken, QUIET).await;
    assert_eq!(backend.pull(&both).await.expect("pull").len(), 2);
    expect_signal(&mut woken, "a claim of 2 over two queues locked 4").await;
    drain(&mut woken, QUIET).await;
    assert_eq!(backend.pull(&both).await.expect("pull").len(), 2);
    expect_quiet(&mut woken, "a claim of the last 2 kept every job it locked").await;

    // Two levels: 1 locked at the first, 2 at the second (one in each
    // queue), 2 kept in all.
    push("a", 1, 1).await;
    push("a", 2, 1).await;
    push("b", 2, 1).await;
    drain(&mut woken, QUIET).await;
    assert_eq!(backend.pull(&both).await.expect("pull").len(), 2);
    expect_signal(&mut woken, "a claim of 2 over two levels locked 3").await;

    // One queue is read a job at a time, so its claim locks what it keeps.
    push("b", 3, 3).await;
    drain(&mut woken, QUIET).await;
    let b = PullRequest::queue("b").batch(2);
    assert_eq!(backend.pull(&b).await.expect("pull").len(), 2);
    expect_quiet(&mut woken, "a claim of 2 from one queue locked 2").await;

    // Every lease has expired, 4 in each queue; 2 jobs of queue b are due
    // beside them.
    clock.advance(PullRequest::DEFAULT_LEASE + Duration::seconds(1));
    assert_eq!(
        backend
            .pull(&PullRequest::queue("a").batch(2))
            .await
            .expect("pull")
            .len(),
        2
    );
    expect_quiet(&mut woken, "a claim of 2 expired leases locked 2").await;
    drain(&mut woken, QUIET).await;
    assert_eq!(backend.pull(&b).await.expect("pull").len(), 2);
    expect_signal(
        &mut woken,
        "a claim of 2 locked 2 due jobs and 2 expired leases",
    )
    .await;

    // A plan's claim is rolled back: every job it locked is due again.
    drain(&mut woken, QUIET).await;
    backend.explain_pull(&b).await.expect("explain");
    expect_signal(&mut woken, "a claim under EXPLAIN was rolled back").await;
    testing::drop_schema(backend.schema()).await;
}

/// A pool push wakes this process's subscribers of its queue before it
/// returns, without waiting for its notification's round trip through the
/// server (which still follows, for other processes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_push_wakes_local_subscribers_before_it_returns() {
    use futures::FutureExt;
    let backend = testing::connect(testing::options()).await;
    let mut wakeups = subscribed(&backend, &["a".to_owned()]).await;
    let pushes: [(&str, NewJob); 3] = [
        ("a single push", job(1).queue("a")),
        ("a keyed push", job(2).queue("a").unique_key("k")),
        ("a batch push", job(3).queue("a")),
    ];
    for (what, new) in pushes {
        // Consume the signals of earlier pushes' notifications.
        drain(&mut wakeups, StdDuration::from_millis(300)).await;
        if what == "a batch push" {
            backend.push_batch(vec![new]).await.expect("push");
        } else {
            backend.push(new).await.expect("push");
        }
        assert_eq!(
            wakeups.next().now_or_never(),
            Some(Some(())),
            "{what} has signalled by the time it returns"
        );
    }
    testing::drop_schema(backend.schema()).await;
}

/// A push on an idle backend (after a quiet spell) notifies in its own
/// transaction: by the time it returns, its notification is committed, so
/// a listening session has it once its next query completes (the server
/// hands pending notifications over before saying it is ready). Sent in a
/// statement after the push, it would have to win that race at every
/// push. Each push notifies once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_on_an_idle_backend_has_notified_when_it_returns() {
    let backend = testing::connect(testing::options()).await;
    let channel: String = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT \"{}\".notify_channel('q0')",
        backend.schema()
    )))
    .fetch_one(backend.pool())
    .await
    .expect("channel");
    let mut listener = sqlx::postgres::PgListener::connect(&testing::database_url())
        .await
        .expect("listener");
    listener.listen(&channel).await.expect("listen");
    for n in 0..5 {
        // After a quiet spell: pushes back to back notify through the
        // notifier, beside the next push.
        tokio::time::sleep(StdDuration::from_millis(20)).await;
        // spread_job(0) goes to q0.
        backend.push(spread_job(0)).await.expect("push");
        sqlx::query("SELECT 1")
            .execute(&mut listener)
            .await
            .expect("query");
        let heard = listener.next_buffered().map(|n| n.payload().to_owned());
        assert_eq!(heard.as_deref(), Some("q0"), "push {n}");
        assert!(
            listener.next_buffered().is_none(),
            "push {n} notified twice"
        );
    }
    testing::drop_schema(backend.schema()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_reconnects_after_pg_terminate_backend() {
    let app = app_name("reconnect");
    let backend = testing::connect(testing::options().application_name(&app)).await;
    let mut wakeups = subscribed(&backend, &["default".to_owned()]).await;
    let pusher = other_process(&backend).await;
    pusher.push(job(1)).await.expect("push");
    expect_signal(&mut wakeups, "before the connection is killed").await;

    let mut admin = testing::admin().await;
    let listener = format!("{app}{LISTENER_SUFFIX}");
    // Two steps: in one statement the planner may call
    // pg_terminate_backend before filtering by application_name.
    let killed: Vec<i32> =
        sqlx::query_scalar("SELECT pid FROM pg_stat_activity WHERE application_name = $1")
            .bind(&listener)
            .fetch_all(&mut admin)
            .await
            .expect("listener pid");
    for pid in &killed {
        let terminated: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
            .bind(pid)
            .fetch_one(&mut admin)
            .await
            .expect("terminate");
        assert!(terminated);
    }
    assert_eq!(killed.len(), 1, "exactly one listener connection");

    // The reconnect itself signals (pushes in between were not heard)…
    expect_signal(&mut wakeups, "reconnecting signals once").await;
    let mut new_pid = None;
    for _ in 0..100 {
        let pids: Vec<i32> =
            sqlx::query_scalar("SELECT pid FROM pg_stat_activity WHERE application_name = $1")
                .bind(&listener)
                .fetch_all(&mut admin)
                .await
                .expect("pids");
        if let [pid] = pids[..] {
            new_pid = Some(pid);
            break;
        }
        tokio::time::sleep(StdDuration::from_millis(100)).await;
    }
    let new_pid = new_pid.expect("a new listener connection");
    assert_ne!(new_pid, killed[0]);
    drain(&mut wakeups, StdDuration::from_millis(200)).await;
    // …and the next push wakes the subscriber through the new connection.
    pusher.push(job(2)).await.expect("push");
    expect_signal(&mut wakeups, "a push after the reconnect").await;
    testing::drop_schema(backend.schema()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_never_exceed_the_pool_plus_one_listener() {
    let app = app_name("budget");
    let backend =
        testing::connect(testing::options().application_name(&app).max_connections(3)).await;
    for n in 0..200 {
        backend.push(job(n)).await.expect("push");
    }
    // Several subscriptions, one listener.
    let mut subscriptions = Vec::new();
    for queues in [vec!["default"], vec!["x", "default"], vec!["y"]] {
        let queues: Vec<String> = queues.into_iter().map(str::to_owned).collect();
        subscriptions.push(backend.subscribe(&queues).await.expect("subscribe"));
    }
    let workers: Vec<_> = (0..12)
        .map(|_| {
            let backend = backend.clone();
            tokio::spawn(async move {
                loop {
                    let leased = backend
                        .pull(&PullRequest::queue("default").batch(3))
                        .await
                        .expect("pull");
                    if leased.is_empty() {
                        break;
                    }
                    for l in leased {
                        backend.push(job(0).queue("y")).await.expect("push");
                        backend.complete(&l.lease, None).await.expect("complete");
                    }
                }
            })
        })
        .collect();
    let mut max_seen = (0, 0);
    while !workers.iter().all(|w| w.is_finished()) {
        let (pool, listener) = connections(&app).await;
        assert!(pool <= 3, "pool connections {pool} > 3");
        assert!(listener <= 1, "listener connections {listener} > 1");
        max_seen = (max_seen.0.max(pool), max_seen.1.max(listener));
        tokio::time::sleep(StdDuration::from_millis(5)).await;
    }
    for w in workers {
        w.await.expect("worker");
    }
    assert!(max_seen.0 <= 3 && max_seen.1 <= 1, "{max_seen:?}");
    // Hold the whole pool: a fourth connection is not opened, it waits.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(backend.pool().acquire().await.expect("acquire"));
    }
    let fourth = tokio::time::timeout(StdDuration::from_millis(300), backend.pool().acquire());
    assert!(
        fourth.await.is_err(),
        "a fourth pooled connection was opened"
    );
    let (pool, listener) = connections(&app).await;
    assert_eq!((pool, listener), (3, 1), "the full pool plus one listener");
    drop(held);
    // close() closes the pool and the listener, and ends subscriptions.
    backend.close().await;
    let mut left = connections(&app).await;
    for _ in 0..100 {
        if left == (0, 0) {
            break;
        }
        tokio::time::sleep(StdDuration::from_millis(50)).await;
        left = connections(&app).await;
    }
    assert_eq!(left, (0, 0), "close() leaves no connection open");
    for subscription in &mut subscriptions {
        let wakeups = subscription.as_mut().expect("subscription");
        let end = tokio::time::timeout(SIGNAL_DEADLINE, async {
            while wakeups.next().await.is_some() {}
        });
        end.await.expect("subscriptions end after close()");
    }
    assert!(backend.push(job(0)).await.is_err());
    assert!(backend.subscribe(&[]).await.is_err());
    testing::drop_schema(backend.schema()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configuration_is_a_typed_error_without_the_password() {
    let secret = "s3cr3t-pw";
    let shows_secret = |e: &Error| {
        let mut text = format!("{e} {e:?}");
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            text.push_str(&format!(" {s} {s:?}"));
            source = s.source();
        }
        text.contains(secret)
    };

    for url in [
        format!("postgres://u:{secret}@127.0.0.1:notaport/db"),
        format!("mysql://u:{secret}@127.0.0.1/db"),
        format!("postgres://u:{secret}@127.0.0.1/db?sslmode=sometimes"),
        "not a url".to_owned(),
    ] {
        match PgBackend::connect(&url).await {
            Err(e @ Error::Config { .. }) => assert!(!shows_secret(&e), "{e}"),
            other => panic!("{url}: expected Config, got {other:?}"),
        }
    }

    let url = testing::database_url();
    for (options, what) in [
        (
            PgOptions::new(&url).schema("Robert'); DROP TABLE x; --"),
            "schema",
        ),
        (PgOptions::new(&url).schema("pg_catalog"), "schema"),
        (PgOptions::new(&url).schema(""), "schema"),
        (PgOptions::new(&url).max_connections(0), "max_connections"),
        (
            PgOptions::new(&url).vacuum_threshold(Some(0)),
            "vacuum_threshold",
        ),
        (
            PgOptions::new(&url).reply_timeout(Some(StdDuration::ZERO)),
            "reply_timeout",
        ),
        (
            PgOptions::new(&url).reply_timeout(Some(StdDuration::from_secs(2 * 86_400))),
            "reply_timeout",
        ),
        (
            PgOptions::new(&url).acquire_timeout(StdDuration::MAX),
            "acquire_timeout",
        ),
        (
            PgOptions::new(&url).max_connections(2).min_connections(3),
            "min_connections",
        ),
        (
            PgOptions::new(&url).application_name("bad\nname"),
            "application_name",
        ),
    ] {
        match PgBackend::connect_with(options).await {
            Err(e @ Error::Config { .. }) => assert_eq!(e.config_setting(), Some(what), "{e}"),
            other => panic!("expected Config naming {what}, got {other:?}"),
        }
    }

    // Nothing listens on port 1: a Backend error naming the target.
    let unreachable = PgOptions::new(format!("postgres://u:{secret}@127.0.0.1:1/db"))
        .acquire_timeout(StdDuration::from_secs(5));
    assert!(!format!("{unreachable:?}").contains(secret));
    match PgBackend::connect_with(unreachable).await {
        Err(e @ Error::Backend { .. }) => {
            assert!(!shows_secret(&e), "{e}");
            assert!(e.to_string().contains("127.0.0.1:1"), "{e}");
            assert!(
                e.is_transient(),
                "a refused connection may be accepted later: {e:?}"
            );
        }
        other => panic!("expected Backend, got {other:?}"),
    }

    // A host name that does not resolve (`.invalid` never does): the same,
    // as a name may resolve later.
    let unresolved = PgOptions::new(format!("postgres://u:{secret}@relayq-test.invalid/db"))
        .acquire_timeout(StdDuration::from_secs(5));
    match PgBackend::connect_with(unresolved).await {
        Err(e @ Error::Backend { .. }) => {
            assert!(!shows_secret(&e), "{e}");
            assert!(e.to_string().contains("relayq-test.invalid"), "{e}");
            assert!(e.is_transient(), "a name may resolve later: {e:?}");
        }
        other => panic!("expected Backend, got {other:?}"),
    }

    // A working backend's Debug hides the password too (trust auth ignores
    // one added to a URL that has none).
    let with_password = if url.contains('@') || !url.contains("://") {
        url.clone()
    } else {
        url.replacen("://", "://postgres@", 1)
    };
    let with_password = match with_password.split_once("://") {
        Some((scheme, rest)) => match rest.split_once('@') {
            Some((user, host)) if !user.contains(':') => {
                format!("{scheme}://{user}:{secret}@{host}")
            }
            _ => with_password.clone(),
        },
        None => with_password.clone(),
    };
    if with_password.contains(secret) {
        let backend = PgBackend::connect_with(
            PgOptions::new(&with_password)
                .schema(testing::unique_schema())
                .max_connections(1),
        )
        .await
        .expect("connect with a password in the URL");
        let debug = format!("{backend:?}");
        assert!(!debug.contains(secret), "{debug}");
        assert!(debug.contains("***"), "{debug}");
        testing::drop_schema(backend.schema()).await;
    }
}

/// With no clock injected, every statement takes `now` from the server,
/// never from this host: here from a server whose clock runs a day ahead
/// (for this backend's sessions, `statement_timestamp` is shadowed through
/// their search_path by one that adds a day).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_statement_reads_the_servers_clock() {
    let skew = testing::unique_schema();
    let mut admin = testing::admin().await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE SCHEMA \"{skew}\";
         CREATE FUNCTION \"{skew}\".statement_timestamp() RETURNS timestamptz
             LANGUAGE sql STABLE AS $$ SELECT pg_catalog.statement_timestamp() + interval '1 day' $$"
    )))
    .execute(&mut admin)
    .await
    .expect("a clock a day ahead");
    let url = testing::database_url();
    let url = format!(
        "{url}{}options=-c%20search_path%3D{skew}%2Cpg_catalog",
        if url.contains('?') { '&' } else { '?' }
    );
    let backend = testing::connect(
        PgOptions::new(url)
            .schema(testing::unique_schema())
            .max_connections(4),
    )
    .await;
    let ahead = time::OffsetDateTime::now_utc() + Duration::days(1);
    let stored = |id: i64| {
        let backend = backend.clone();
        async move { backend.get(id).await.expect("get").expect("job") }
    };
    let near = |at: time::OffsetDateTime, what: &str| {
        assert!(
            (at - ahead).abs() < Duration::minutes(1),
            "{what}: {at}, not the server's {ahead}"
        );
    };

    // Single pushes, folded ones among them, and a batch.
    let mut ids: Vec<i64> = futures::future::join_all((0..20).map(|n| backend.push(job(n))))
        .await
        .into_iter()
        .map(|pushed| pushed.expect("push").id())
        .collect();
    ids.extend(
        backend
            .push_batch(vec![job(20), job(21)])
            .await
            .expect("push_batch")
            .iter()
            .map(|outcome| outcome.id()),
    );
    // Due in an hour by this host's clock: already due on the server's.
    ids.push(
        backend
            .push(job(22).run_at(time::OffsetDateTime::now_utc() + Duration::hours(1)))
            .await
            .expect("push")
            .id(),
    );
    for &id in &ids[..22] {
        near(stored(id).await.created_at, "created_at");
    }
    let leased = backend
        .pull(&PullRequest::queue("default").batch(100))
        .await
        .expect("pull");
    assert_eq!(leased.len(), ids.len(), "every job is due on the server");
    for l in &leased {
        let until = l.job.locked_until.expect("leased");
        near(until - Duration::seconds(30), "the pull's lease");
    }
    let until = backend
        .extend(&leased[0].lease, Duration::minutes(5))
        .await
        .expect("extend");
    near(until - Duration::minutes(5), "an extension");
    backend
        .retry(&leased[1].lease, Duration::ZERO, "again")
        .await
        .expect("retry");
    near(stored(leased[1].job.id).await.run_at, "a retry's run_at");
    backend
        .complete(&leased[2].lease, None)
        .await
        .expect("complete");
    near(stored(leased[2].job.id).await.updated_at, "a completion");
    backend.release(&leased[3].lease).await.expect("release");
    near(stored(leased[3].job.id).await.updated_at, "a release");
    testing::drop_schema(backend.schema()).await;
    testing::drop_schema(&skew).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_clock_by_default() {
    let backend = testing::connect(testing::options()).await;
    assert!(backend.capabilities().server_clock);
    let server_now: time::OffsetDateTime = sqlx::query_scalar("SELECT now()")
        .fetch_one(backend.pool())
        .await
        .expect("now");
    let id = backend.push(job(1)).await.expect("push").id();
    let delayed = backend
        .push(job(2).delay(Duration::hours(1)))
        .await
        .expect("push")
        .id();
    let pushed = backend.get(id).await.expect("get").expect("job");
    assert_eq!(pushed.created_at, pushed.updated_at);
    assert_eq!(pushed.run_at, pushed.created_at, "due now means now");
    assert!(
        (pushed.created_at - server_now).abs() < Duration::minutes(1),
        "server time: {} vs {server_now}",
        pushed.created_at
    );
    let later = backend.get(delayed).await.expect("get").expect("job");
    assert_eq!(later.run_at, later.created_at + Duration::hours(1));
    // So does a large batch.
    let batch = (0..200).map(|n| match n % 2 {
        0 => job(n).queue("copied"),
        _ => job(n).queue("copied").delay(Duration::hours(1)),
    });
    let ids = backend
        .push_batch(batch.collect())
        .await
        .expect("push_batch");
    for (n, outcome) in ids.iter().enumerate() {
        let stored = backend.get(outcome.id()).await.expect("get").expect("job");
        assert_eq!(stored.created_at, stored.updated_at);
        assert!((stored.created_at - server_now).abs() < Duration::minutes(1));
        let delay = if n % 2 == 0 {
            Duration::ZERO
        } else {
            Duration::hours(1)
        };
        assert_eq!(stored.run_at, stored.created_at + delay, "job {n}");
    }
    // And batches of alike jobs, whose schedule is bound once, or alike but
    // for the last job's delay.
    for (delay, last) in [
        (Duration::ZERO, Duration::ZERO),
        (Duration::hours(2), Duration::hours(2)),
        (Duration::hours(1), Duration::hours(2)),
    ] {
        let batch = (0..50).map(|n| {
            let delay = if n == 49 { last } else { delay };
            job(n).queue("alike").delay(delay)
        });
        let ids = backend
            .push_batch(batch.collect())
            .await
            .expect("push_batch");
        for (n, outcome) in ids.iter().enumerate() {
            let stored = backend.get(outcome.id()).await.expect("get").expect("job");
            assert_eq!(*stored.payload, json!({ "n": n }));
            assert!((stored.created_at - server_now).abs() < Duration::minutes(1));
            let delay = if n == 49 { last } else { delay };
            assert_eq!(stored.run_at, stored.created_at + delay, "job {n}");
        }
    }

    let leased = backend
        .pull(
            &PullRequest::queue("default")
                .batch(5)
                .lease(Duration::seconds(45)),
        )
        .await
        .expect("pull");
    assert_eq!(leased.len(), 1, "the delayed job is not due");
    let job = &leased[0].job;
    assert_eq!(
        job.locked_until,
        Some(job.updated_at + Duration::seconds(45))
    );
    let until = backend
        .extend(&leased[0].lease, Duration::minutes(5))
        .await
        .expect("extend");
    let extended = backend.get(id).await.expect("get").expect("job");
    assert_eq!(extended.locked_until, Some(until));
    assert_eq!(until, extended.updated_at + Duration::minutes(5));
    // So does a batch of renewals.
    let ends = backend
        .extend_batch(&[leased[0].lease], Duration::minutes(7))
        .await
        .expect("extend_batch");
    let extended = backend.get(id).await.expect("get").expect("job");
    assert_eq!(ends, vec![extended.locked_until]);
    assert_eq!(ends[0], Some(extended.updated_at + Duration::minutes(7)));
    assert!((extended.updated_at - server_now).abs() < Duration::minutes(1));
    assert_eq!(
        backend
            .retry(&leased[0].lease, Duration::seconds(30), "later")
            .await
            .expect("retry"),
        JobStatus::Pending
    );
    let retried = backend.get(id).await.expect("get").expect("job");
    assert_eq!(retried.run_at, retried.updated_at + Duration::seconds(30));
    testing::drop_schema(backend.schema()).await;
}

/// With no clock injected (the statements read the server's), a lease
/// ends when its time has passed: the next pull takes back the job with
/// attempts left and marks the one on its last attempt `Dead`; release,
/// kill and complete stamp times in step with the server's `now()`, and
/// clean deletes by them. (On one machine the server's clock and the
/// process's agree, so this exercises that path rather than telling the
/// two apart; `server_clock_by_default` checks the capability.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_expire_and_jobs_finish_on_the_server_clock() {
    let backend = testing::connect(testing::options()).await;
    let again = backend.push(job(1)).await.expect("push").id();
    let last = backend
        .push(job(2).max_attempts(1))
        .await
        .expect("push")
        .id();
    let short = PullRequest::queue("default")
        .batch(2)
        .lease(Duration::seconds(2));
    let first = backend.pull(&short).await.expect("pull");
    assert_eq!(first.len(), 2);
    assert!(
        backend.pull(&short).await.expect("pull").is_empty(),
        "held until the leases end"
    );
    tokio::time::sleep(StdDuration::from_millis(2_500)).await;
    let taken_back = backend.pull(&short).await.expect("pull");
    assert_eq!(
        taken_back.iter().map(|l| l.job.id).collect::<Vec<_>>(),
        [again]
    );
    let held_before = first.iter().find(|l| l.job.id == again).expect("leased");
    assert!(taken_back[0].lease.token > held_before.lease.token);
    let dead = backend.get(last).await.expect("get").expect("job");
    assert_eq!(dead.status, JobStatus::Dead);
    assert_eq!(
        dead.last_error.as_deref(),
        Some(relayq_core::LEASE_EXPIRED_ERROR)
    );

    let server_now = || async {
        sqlx::query_scalar::<_, time::OffsetDateTime>("SELECT now()")
            .fetch_one(backend.pool())
            .await
            .expect("now")
    };
    let before = server_now().await;
    backend
        .release(&taken_back[0].lease)
        .await
        .expect("release");
    let released = backend.get(again).await.expect("get").expect("job");
    assert_eq!(
        (released.status, released.attempts),
        (JobStatus::Pending, 1)
    );
    assert!(released.updated_at >= before, "{released:?}");
    let leased = backend
        .pull(&PullRequest::queue("default"))
        .await
        .expect("pull");
    backend.kill(&leased[0].lease, "no").await.expect("kill");
    let killed = backend.get(again).await.expect("get").expect("job");
    assert_eq!(killed.status, JobStatus::Dead);
    assert!(killed.updated_at >= released.updated_at, "{killed:?}");
    let done = backend.push(job(3)).await.expect("push").id();
    let leased = backend
        .pull(&PullRequest::queue("default"))
        .await
        .expect("pull");
    backend
        .complete(&leased[0].lease, None)
        .await
        .expect("complete");
    let completed = backend.get(done).await.expect("get").expect("job");
    assert!((completed.updated_at - server_now().await).abs() < Duration::minutes(1));
    assert_eq!(
        backend
            .clean(JobStatus::Done, server_now().await + Duration::seconds(1))
            .await
            .expect("clean"),
        1
    );
    assert_eq!(
        backend
            .clean(JobStatus::Dead, completed.updated_at - Duration::hours(1))
            .await
            .expect("clean"),
        0,
        "nothing finished an hour before"
    );
    testing::drop_schema(backend.schema()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn complete_batch_fences_each_lease_in_one_statement() {
    let clock = ManualClock::new(relayq_conformance::EPOCH);
    let backend = testing::connect(testing::options().clock(Arc::new(clock.clone()))).await;
    backend
        .push_batch((0..300).map(job).collect())
        .await
        .expect("push");
    let leased = backend
        .pull(&PullRequest::queue("default").batch(300))
        .await
        .expect("pull");
    assert_eq!(leased.len(), 300);
    let (first, rest) = leased.split_at(1);
    // Lose the first lease: it expires and is leased again.
    clock.advance(Duration::seconds(10));
    let mut completions: Vec<Completion> = rest
        .iter()
        .map(|l| Completion {
            lease: l.lease,
            result: Some(json!({ "done": l.job.id })),
        })
        .collect();
    let stale = first[0].lease;
    clock.advance(Duration::seconds(21));
    // Every other lease expired too now, but was not re-leased: still held.
    let again = backend
        .pull(&PullRequest::queue("default").batch(1))
        .await
        .expect("pull");
    assert_eq!(again[0].lease.job_id, stale.job_id, "oldest job first");
    let forged = Lease {
        job_id: rest[0].lease.job_id,
        token: rest[0].lease.token + 7,
    };
    let missing = Lease {
        job_id: -5,
        token: 1,
    };
    let repeated = rest[1].lease;
    completions.push(Completion::from(stale));
    completions.push(Completion::from(forged));
    completions.push(Completion::from(missing));
    completions.push(Completion {
        lease: repeated,
        result: Some(json!("second")),
    });
    let lost = backend
        .complete_batch(completions)
        .await
        .expect("complete_batch");
    assert_eq!(lost, vec![stale, forged, missing, repeated]);
    for l in rest {
        let job = backend.get(l.job.id).await.expect("get").expect("job");
        assert_eq!(job.status, JobStatus::Done);
        assert_eq!(
            job.result,
            Some(json!({ "done": l.job.id })),
            "the first entry wins"
        );
        assert_eq!(job.updated_at, clock.now());
        assert_eq!(job.locked_until, None);
    }
    let current = backend.get(stale.job_id).await.expect("get").expect("job");
    assert_eq!(
        current.status,
        JobStatus::Processing,
        "the new holder keeps it"
    );
    assert_eq!(
        backend.complete_batch(Vec::new()).await.expect("empty"),
        Vec::<Lease>::new()
    );
    testing::drop_schema(backend.schema()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_pushes_of_one_unique_key_create_one_job() {
    let backend = testing::connect(testing::options().max_connections(5)).await;
    for round in 0..5 {
        let key = format!("race:{round}");
        let tasks: Vec<_> = (0..10)
            .map(|n| {
                let backend = backend.clone();
                let key = key.clone();
                tokio::spawn(
                    async move { backend.push(job(n).unique_key(key)).await.expect("push") },
                )
            })
            .collect();
        let mut outcomes = Vec::new();
        for t in tasks {
            outcomes.push(t.await.expect("task"));
        }
        let created: Vec<_> = outcomes.iter().filter(|o| !o.is_duplicate()).collect();
        assert_eq!(created.len(), 1, "{outcomes:?}");
        let ids: HashSet<_> = outcomes.iter().map(|o| o.id()).collect();
        assert_eq!(
            ids.len(),
            1,
            "every duplicate names the holder: {outcomes:?}"
        );
    }
    testing::drop_schema(backend.schema()).await;
}

/// A batch whose key is held by a push still uncommitted in another
/// transaction waits for it (`ON CONFLICT` does), then finds the job that
/// holds the key: committed after the batch statement's snapshot, so found
/// by a second look. The batch's other jobs are created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_racing_an_uncommitted_holder_of_its_key_names_it() {
    let backend = testing::connect(testing::options()).await;
    let mut tx = backend.pool().begin().await.expect("begin");
    let holder = backend
        .push_in(&mut tx, job(0).unique_key("raced"))
        .await
        .expect("push_in")
        .id();
    let batch = {
        let backend = backend.clone();
        tokio::spawn(async move {
            backend
                .push_batch(vec![job(1), job(2).unique_key("raced"), job(3)])
                .await
        })
    };
    // Committed once the batch waits on the uncommitted key.
    tokio::time::timeout(StdDuration::from_secs(10), waiting_on_locks(&backend, 1))
        .await
        .expect("the batch waits on the uncommitted key");
    tx.commit().await.expect("commit");
    let outcomes = batch.await.expect("task").expect("push_batch");
    assert_eq!(outcomes[1], PushOutcome::Duplicate(holder), "{outcomes:?}");
    assert!(
        !outcomes[0].is_duplicate() && !outcomes[2].is_duplicate(),
        "{outcomes:?}"
    );
    testing::drop_schema(backend.schema()).await;
}

/// A batch whose second look for a key's holder fails stores nothing: the
/// holder committed after the batch's insert began (so the insert skipped
/// the key, and its snapshot cannot name the holder), then finished and
/// was cleaned before the look. The batch fails transiently,
/// and, all or nothing, none of its other jobs is stored; before, they
/// were, unannounced, while the caller was told the push failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_whose_look_for_a_holder_fails_stores_nothing() {
    a_batch_whose_look_for_a_holder_fails(false).await;
}

/// [`a_batch_whose_look_for_a_holder_fails_stores_nothing`] through
/// `push_batch_in` on a connection outside any transaction: the same, all
/// or nothing (before, it was not).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_on_a_bare_connection_whose_look_for_a_holder_fails_stores_nothing() {
    a_batch_whose_look_for_a_holder_fails(true).await;
}

/// The batch made through `push_batch` or (`on_bare_connection`)
/// `push_batch_in` on a pool connection.
async fn a_batch_whose_look_for_a_holder_fails(on_bare_connection: bool) {
    // The advisory lock keys of the gates: (gates_key, 1) and (gates_key, 2),
    // database-wide, so each variant has its own.
    let gates_key: i32 = if on_bare_connection { 7_243 } else { 7_242 };
    let backend = testing::connect(testing::options()).await;
    let schema = backend.schema().to_owned();
    // The batch's rows (priority 7) keyed `gate-1` and `gate-2` wait, as
    // they are inserted, for the test to open their gate (an advisory lock).
    for statement in [
        format!(
            "CREATE FUNCTION \"{schema}\".gate() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
             PERFORM pg_advisory_lock_shared({gates_key}, right(NEW.unique_key, 1)::int); \
             PERFORM pg_advisory_unlock_shared({gates_key}, right(NEW.unique_key, 1)::int); \
             RETURN NEW; END $$"
        ),
        format!(
            "CREATE TRIGGER gate BEFORE INSERT ON \"{schema}\".jobs FOR EACH ROW \
             WHEN (NEW.priority = 7 AND NEW.unique_key LIKE 'gate-_') \
             EXECUTE FUNCTION \"{schema}\".gate()"
        ),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(statement))
            .execute(backend.pool())
            .await
            .expect("the gate");
    }
    let mut gates = backend.pool().acquire().await.expect("connection");
    for gate in [1, 2] {
        sqlx::query("SELECT pg_advisory_lock($1, $2)")
            .bind(gates_key)
            .bind(gate)
            .execute(&mut *gates)
            .await
            .expect("close the gate");
    }
    let open = |gate: i32| {
        sqlx::query("SELECT pg_advisory_unlock($1, $2)")
            .bind(gates_key)
            .bind(gate)
    };
    // Waits at that gate (its lock asked for, not granted): not merely
    // seen waiting at one, which a batch just let through still is.
    let pool = backend.pool().clone();
    let at_gate = |gate: i32| {
        let pool = pool.clone();
        async move {
            loop {
                let waiting: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' \
                 AND classid = $1 AND objid = $2 AND objsubid = 2 AND NOT granted",
                )
                .bind(i64::from(gates_key))
                .bind(i64::from(gate))
                .fetch_one(&pool)
                .await
                .expect("pg_locks");
                if waiting > 0 {
                    return;
                }
                tokio::time::sleep(StdDuration::from_millis(5)).await;
            }
        }
    };
    let batch = {
        let backend = backend.clone();
        let jobs = ["before", "gate-1", "gate-2"]
            .map(|key| job(1).priority(7).unique_key(key))
            .to_vec();
        tokio::spawn(async move {
            if on_bare_connection {
                let mut conn = backend.pool().acquire().await.expect("connection");
                backend.push_batch_in(&mut conn, jobs).await
            } else {
                backend.push_batch(jobs).await
            }
        })
    };
    tokio::time::timeout(StdDuration::from_secs(10), at_gate(1))
        .await
        .expect("the batch waits at gate 1");
    // Committed after the batch's snapshot, before its insert of the key.
    let holder = backend
        .push(job(0).unique_key("gate-1"))
        .await
        .expect("holder")
        .id();
    open(1).execute(&mut *gates).await.expect("open gate 1");
    tokio::time::timeout(StdDuration::from_secs(10), at_gate(2))
        .await
        .expect("the batch waits at gate 2");
    // The holder finishes, and is cleaned, before the batch looks for it.
    let leased = backend
        .pull(&PullRequest::queue("default"))
        .await
        .expect("pull");
    assert_eq!(
        leased.iter().map(|l| l.job.id).collect::<Vec<_>>(),
        [holder]
    );
    backend
        .complete(&leased[0].lease, None)
        .await
        .expect("complete");
    let cleaned = backend
        .clean(
            JobStatus::Done,
            time::OffsetDateTime::now_utc() + Duration::hours(1),
        )
        .await
        .expect("clean");
    assert_eq!(cleaned, 1);
    open(2).execute(&mut *gates).await.expect("open gate 2");
    let e = batch
        .await
        .expect("task")
        .expect_err("no job holds gate-1 any more");
    assert!(e.is_transient(), "{e:?}");
    let stats = backend.stats().await.expect("stats");
    assert_eq!(
        stats.queue("default").total(),
        0,
        "nothing is stored: {stats:?}"
    );
    drop(gates);
    testing::drop_schema(backend.schema()).await;
}

/// Two batches naming the same unique keys in opposite orders never
/// deadlock: each inserts its keys in one order (by queue and key), so the
/// one that waits on the other holds none the other needs. Both wait on a
/// key an uncommitted transaction holds, then race once it rolls back;
/// inserting in input order, the one that got that key next waited on the
/// other's first key while holding it (40P01 after a second).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_naming_keys_in_opposite_orders_do_not_deadlock() {
    let backend = testing::connect(testing::options()).await;
    let mut tx = backend.pool().begin().await.expect("begin");
    backend
        .push_in(&mut tx, job(0).unique_key("gate"))
        .await
        .expect("push_in");
    let batch = |keys: [&str; 3]| {
        let backend = backend.clone();
        let jobs: Vec<NewJob> = keys.iter().map(|key| job(1).unique_key(*key)).collect();
        tokio::spawn(async move { backend.push_batch(jobs).await })
    };
    let forward = batch(["k1", "gate", "k2"]);
    let backward = batch(["k2", "gate", "k1"]);
    tokio::time::timeout(StdDuration::from_secs(10), waiting_on_locks(&backend, 2))
        .await
        .expect("both batches wait on the uncommitted key");
    tx.rollback().await.expect("rollback");
    let forward = forward.await.expect("task").expect("the forward batch");
    let backward = backward.await.expect("task").expect("the backward batch");
    // One batch stored all three keys, the other found each held.
    let created = |outcomes: &[PushOutcome]| outcomes.iter().filter(|o| !o.is_duplicate()).count();
    let mut counts = [created(&forward), created(&backward)];
    counts.sort_unstable();
    assert_eq!(counts, [0, 3], "{forward:?} {backward:?}");
    let stats = backend.stats().await.expect("stats");
    assert_eq!(stats.queue("default").pending, 3, "{stats:?}");
    testing::drop_schema(backend.schema()).await;
}

/// Every acknowledgement of a stale lease that finds its job's row locked
/// by another worker's claim of it, and waits, then judges the row that
/// claim committed: the lease is lost and the new holder's row unchanged.
/// (Each acknowledgement is one fenced `UPDATE`, which PostgreSQL checks
/// again on the row it waited for; a token read before the wait would
/// write over the new holder.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_acknowledgement_waiting_on_a_reclaim_changes_nothing() {
    let backend = testing::connect(testing::options()).await;
    let schema = backend.schema().to_owned();
    for op in [
        "complete",
        "complete_batch",
        "retry",
        "kill",
        "release",
        "extend",
        "extend_batch",
    ] {
        backend.push(job(1)).await.expect("push");
        let stale = backend
            .pull(&PullRequest::queue("default").batch(1))
            .await
            .expect("pull")
            .remove(0)
            .lease;
        // Another worker's claim of the job once that lease ended, not
        // committed yet.
        let mut other = testing::admin().await;
        let mut claim = sqlx::Connection::begin(&mut other).await.expect("begin");
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE \"{schema}\".jobs SET lease_token = lease_token + 1, attempts = attempts + 1,
                 locked_until = now() + interval '1 hour' WHERE id = $1"
        )))
        .bind(stale.job_id)
        .execute(&mut *claim)
        .await
        .expect("reclaim");
        let acknowledging = {
            let backend = backend.clone();
            tokio::spawn(async move {
                let by = Duration::seconds(30);
                match op {
                    "complete" => backend.complete(&stale, Some(json!("stale"))).await,
                    "complete_batch" => backend
                        .complete_batch(vec![stale.into()])
                        .await
                        .map(|lost| assert_eq!(lost, [stale], "reported lost")),
                    "retry" => backend.retry(&stale, by, "stale").await.map(drop),
                    "kill" => backend.kill(&stale, "stale").await,
                    "release" => backend.release(&stale).await,
                    "extend" => backend.extend(&stale, by).await.map(drop),
                    _ => backend
                        .extend_batch(&[stale], by)
                        .await
                        .map(|ends| assert_eq!(ends, [None], "reported lost")),
                }
            })
        };
        tokio::time::timeout(StdDuration::from_secs(10), waiting_on_locks(&backend, 1))
            .await
            .unwrap_or_else(|_| panic!("{op} waits for the claim's row lock"));
        claim.commit().await.expect("commit the claim");
        let outcome = acknowledging.await.expect("task");
        if !op.ends_with("batch") {
            assert!(
                matches!(outcome, Err(Error::LeaseLost { lease }) if lease == stale),
                "{op}: {outcome:?}"
            );
        } else {
            outcome.unwrap_or_else(|e| panic!("{op}: {e}"));
        }
        let held = backend.get(stale.job_id).await.expect("get").expect("job");
        assert_eq!(
            (
                held.status,
                held.lease_token,
                held.attempts,
                held.result,
                held.last_error
            ),
            (JobStatus::Processing, stale.token + 1, 2, None, None),
            "{op} changed the new holder's row"
        );
        assert!(
            held.locked_until.expect("leased")
                > time::OffsetDateTime::now_utc() + Duration::minutes(59),
            "{op} moved the new holder's lease"
        );
        backend
            .kill(
                &relayq_core::Lease {
                    job_id: held.id,
                    token: held.lease_token,
                },
                "done with it",
            )
            .await
            .expect("the new holder's lease holds");
    }
    testing::drop_schema(&schema).await;
}

/// Returns once at least `statements` statements on `backend`'s schema
/// wait for a lock (bound it with a timeout).
async fn waiting_on_locks(backend: &PgBackend, statements: i64) {
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE wait_event_type = 'Lock' AND query LIKE '%' || $1 || '%'",
        )
        .bind(backend.schema())
        .fetch_one(backend.pool())
        .await
        .expect("pg_stat_activity");
        if waiting >= statements {
            return;
        }
        tokio::time::sleep(StdDuration::from_millis(5)).await;
    }
}

/// Fills a schema with `finished` done/dead jobs and `pending` due jobs.
async fn fill(backend: &PgBackend, finished: i64, pending: i64) {
    let schema = backend.schema();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO \"{schema}\".jobs (queue, kind, payload, priority, status, attempts,
             max_attempts, lease_token, run_at, created_at, updated_at, result)
         SELECT 'default', 'k', '{{}}', 0, CASE WHEN g % 10 = 0 THEN 'dead' ELSE 'done' END,
                1, 25, 1, now() - interval '1 day', now() - interval '1 day', now(), 'null'
         FROM generate_series(1, $1) AS g"
    )))
    .bind(finished)
    .execute(backend.pool())
    .await
    .expect("finished rows");
    backend
        .push_batch((0..pending).map(job).collect())
        .await
        .expect("pending rows");
    sqlx::query(sqlx::AssertSqlSafe(format!("ANALYZE \"{schema}\".jobs")))
        .execute(backend.pool())
        .await
        .expect("analyze");
}

/// A clean of more jobs than one statement deletes (10,000) runs chunk
/// after chunk until none is left, and counts them all: an exact multiple
/// of the chunk, and a chunk and a half; recent and active jobs stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_deletes_chunk_after_chunk() {
    let backend = testing::connect(testing::options()).await;
    let schema = backend.schema();
    for (status, n, age) in [
        ("done", 20_000, "1 day"),
        ("dead", 15_000, "1 day"),
        ("done", 5, "1 second"),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO \"{schema}\".jobs (queue, kind, payload, status, attempts, max_attempts,
                 run_at, created_at, updated_at)
             SELECT 'default', 'k', '{{}}', $1, 1, 1, now(), now(), now() - $3::interval
             FROM generate_series(1, $2) AS g"
        )))
        .bind(status)
        .bind(n)
        .bind(age)
        .execute(backend.pool())
        .await
        .expect("finished rows");
    }
    backend.push(job(1)).await.expect("push");
    let before = time::OffsetDateTime::now_utc() - Duration::hours(1);
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
    testing::drop_schema(backend.schema()).await;
}

/// Shared buffers (hit + read) the choice of jobs to claim touched: the
/// first `Buffers:` line under the `claimable` CTE. (Leasing the chosen
/// rows then costs the same whatever the table holds.)
fn claim_buffers(plan: &str) -> u64 {
    plan.lines()
        .skip_while(|l| !l.contains("CTE claimable"))
        .find(|l| l.trim_start().starts_with("Buffers:"))
        .map(|l| {
            l.split_whitespace()
                .filter_map(|w| w.split_once('='))
                .filter(|(k, _)| *k == "hit" || *k == "read")
                .filter_map(|(_, v)| v.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or_else(|| panic!("no Buffers under the claimable CTE:\n{plan}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_walk_the_partial_index_not_finished_rows() {
    let backend = testing::connect(testing::options()).await;
    fill(&backend, 100_000, 200).await;
    let request = PullRequest::queue("default").batch(10);
    // Warm up, so the plan is the one a busy worker gets.
    for _ in 0..6 {
        backend.explain_pull(&request).await.expect("explain");
    }
    let plan = backend.explain_pull(&request).await.expect("explain");
    assert!(plan.contains("jobs_claim_idx"), "{plan}");
    assert!(!plan.contains("Seq Scan on jobs"), "{plan}");
    assert!(plan.contains("rows=10"), "{plan}");
    // A seq scan of 100,000 rows reads well over a thousand pages; the
    // partial indexes only hold the 200 active rows.
    let touched = claim_buffers(&plan);
    assert!(touched > 0 && touched < 100, "{touched} buffers:\n{plan}");
    let multi = backend
        .explain_pull(&PullRequest::queues(["default", "other"]).batch(10))
        .await
        .expect("explain");
    assert!(!multi.contains("Seq Scan on jobs"), "{multi}");
    assert!(claim_buffers(&multi) < 100, "{multi}");
    // EXPLAIN ANALYZE ran in a rolled-back transaction: nothing was leased.
    let stats = backend.stats().await.expect("stats").queue("default");
    assert_eq!((stats.pending, stats.processing), (200, 0));
    testing::drop_schema(backend.schema()).await;
}

/// A claim reads the due jobs of each priority level as an index range,
/// never the jobs scheduled for later, and only as many due jobs as it
/// takes: with 40,000 jobs scheduled for tomorrow (a backlog of retries in
/// backoff, or of delayed jobs) at the levels the due jobs sit at and
/// below, and 20,000 due jobs at the next level, it still touches a few
/// dozen buffers, and takes the due jobs in pull order. Over several
/// queues, the jobs are spread across them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_skip_jobs_scheduled_for_later() {
    for queues in [&["default"][..], &["default", "other"]] {
        let backend = testing::connect(testing::options()).await;
        let queue = |n: i64| queues[n as usize % queues.len()];
        for priority in [0, 1] {
            let later = (0..20_000)
                .map(|n| {
                    job(n)
                        .queue(queue(n))
                        .priority(priority)
                        .delay(Duration::days(1))
                })
                .collect();
            backend.push_batch(later).await.expect("scheduled jobs");
        }
        let mut due = Vec::new();
        for (n, priority) in [(1, 2), (2, 0), (3, 2), (4, 0), (5, 2)] {
            let pushed = backend
                .push(job(n).queue(queue(n)).priority(priority))
                .await;
            due.push((priority, n, pushed.expect("push").id()));
        }
        let backlog = (0..20_000)
            .map(|n| job(n).queue(queue(n)).priority(3))
            .collect();
        let backlog = backend.push_batch(backlog).await.expect("due backlog");
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "ANALYZE \"{}\".jobs",
            backend.schema()
        )))
        .execute(backend.pool())
        .await
        .expect("analyze");
        let request = PullRequest::queues(queues.iter().copied()).batch(10);
        // Warm up, so the plan is the one a busy worker gets.
        for _ in 0..6 {
            backend.explain_pull(&request).await.expect("explain");
        }
        let plan = backend.explain_pull(&request).await.expect("explain");
        let touched = claim_buffers(&plan);
        // Reading past the scheduled jobs of level 0 alone takes over a
        // hundred index pages; over two queues, reading and sorting all
        // their pending jobs took 996 buffers. Each queue adds a probe per
        // level visited.
        assert!(
            touched > 0 && touched < 60 * queues.len() as u64,
            "{queues:?}: {touched} buffers:\n{plan}"
        );
        let pulled = backend.pull(&request).await.expect("pull");
        due.sort_by_key(|(priority, n, _)| (*priority, *n));
        let expected: Vec<i64> = due
            .into_iter()
            .map(|(_, _, id)| id)
            .chain(backlog.iter().take(5).map(|pushed| pushed.id()))
            .collect();
        let got: Vec<i64> = pulled.iter().map(|leased| leased.job.id).collect();
        assert_eq!(got, expected, "{queues:?}: the due jobs, in pull order");
        testing::drop_schema(backend.schema()).await;
    }
}

/// A claim passes over the jobs another puller holds locked (its claim not
/// yet committed) to the next ones in pull order, at the same level, the
/// next levels and in the other queues, instead of coming back short.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_pass_over_jobs_another_puller_holds() {
    for queues in [&["one"][..], &["one", "two"]] {
        let backend = testing::connect(testing::options()).await;
        let mut in_order = Vec::new();
        for priority in 0..20 {
            for queue in queues {
                let pushed = backend
                    .push(job(0).queue(*queue).priority(priority))
                    .await
                    .expect("push");
                in_order.push(pushed.id());
            }
        }
        // Another puller's claim, in flight: the first ten in pull order.
        let mut other = testing::admin().await;
        let mut tx = sqlx::Connection::begin(&mut other).await.expect("begin");
        let held: Vec<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT id FROM \"{}\".jobs WHERE id = ANY($1) FOR UPDATE",
            backend.schema()
        )))
        .bind(&in_order[..10])
        .fetch_all(&mut *tx)
        .await
        .expect("lock");
        assert_eq!(held.len(), 10);
        let got = backend
            .pull(&PullRequest::queues(queues.iter().copied()).batch(10))
            .await
            .expect("pull");
        let got: Vec<i64> = got.iter().map(|leased| leased.job.id).collect();
        assert_eq!(got, in_order[10..20], "{queues:?}: the next ten");
        tx.rollback().await.expect("rollback");
        testing::drop_schema(backend.schema()).await;
    }
}

/// The measurement quoted in the crate docs: 1,000,000 finished jobs.
/// Run with `cargo test -p relayq-postgres --test postgres -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow: fills a table with a million rows"]
async fn claim_plan_with_a_million_finished_jobs() {
    let backend = testing::connect(testing::options()).await;
    fill(&backend, 1_000_000, 1_000).await;
    let request = PullRequest::queue("default").batch(10);
    for _ in 0..6 {
        backend.explain_pull(&request).await.expect("explain");
    }
    let plan = backend.explain_pull(&request).await.expect("explain");
    println!("{plan}");
    assert!(plan.contains("jobs_claim_idx"), "{plan}");
    assert!(claim_buffers(&plan) < 100, "{plan}");
    testing::drop_schema(backend.schema()).await;
}

/// A release has notified every process by the time it returns: a worker
/// shutting down may exit right after, taking any task that would have
/// sent the notification later with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_has_notified_other_processes_when_it_returns() {
    let backend = testing::connect(testing::options()).await;
    let mut wakeups = subscribed(&backend, &["default".to_owned()]).await;
    backend.push(job(1)).await.expect("push");
    while let Ok(Some(())) =
        tokio::time::timeout(StdDuration::from_millis(300), wakeups.next()).await
    {}
    // Another process: its own backend on a runtime that ends as soon as
    // the release returns.
    let schema = backend.schema().to_owned();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let other = PgBackend::connect_with(
                PgOptions::new(testing::database_url())
                    .schema(schema)
                    .max_connections(1),
            )
            .await
            .expect("connect");
            let leased = other
                .pull(&PullRequest::queue("default"))
                .await
                .expect("pull");
            other.release(&leased[0].lease).await.expect("release");
        });
    })
    .join()
    .expect("the other process");
    let signal = tokio::time::timeout(StdDuration::from_secs(10), wakeups.next()).await;
    assert_eq!(signal, Ok(Some(())), "the release woke this process");
    testing::drop_schema(backend.schema()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribing_again_after_the_listener_runtime_ended() {
    let backend = testing::connect(testing::options()).await;
    // Subscribe from a runtime that then shuts down, taking the listener
    // task with it.
    let elsewhere = backend.clone();
    let mut ended = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let mut wakeups = subscribed(&elsewhere, &["default".to_owned()]).await;
            other_process(&elsewhere)
                .await
                .push(job(1))
                .await
                .expect("push");
            expect_signal(&mut wakeups, "in the first runtime").await;
            wakeups
        })
    })
    .join()
    .expect("thread");
    // The subscription ended with its listener task, so its holder (a
    // worker) knows to subscribe again rather than wait for signals that
    // no task would send.
    assert_eq!(
        tokio::time::timeout(SIGNAL_DEADLINE, ended.next())
            .await
            .expect("the subscription ends"),
        None
    );
    let mut wakeups = backend
        .subscribe(&["default".to_owned()])
        .await
        .expect("subscribe after the first runtime ended")
        .expect("subscription");
    other_process(&backend)
        .await
        .push(job(2))
        .await
        .expect("push");
    expect_signal(&mut wakeups, "through a new listener task").await;
    testing::drop_schema(backend.schema()).await;
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Double {
    n: i64,
}

impl relayq_core::JobType for Double {
    const KIND: &'static str = "double";
    const QUEUE: &'static str = "work";
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_runtime_runs_jobs_woken_by_notify() {
    use relayq_core::JobType;
    let backend = Arc::new(testing::connect(testing::options()).await);
    // Polling once a minute: jobs pushed later can only start promptly
    // because a NOTIFY woke the worker.
    let worker = relayq_core::Worker::builder(backend.clone())
        .concurrency(4)
        .poll_interval(StdDuration::from_secs(60))
        .handle(|job: Double, _ctx| async move { Ok(job.n * 2) })
        .build()
        .expect("worker");
    let running = worker.start();
    tokio::time::sleep(StdDuration::from_millis(300)).await;
    // Pushed through another backend, as by another process: a push
    // through the worker's own backend would wake it without NOTIFY.
    let pusher = other_process(&backend).await;
    for round in 0..3 {
        let outcomes = pusher
            .push_batch(
                (0..10)
                    .map(|n| Double { n: round * 10 + n }.to_job())
                    .collect(),
            )
            .await
            .expect("push");
        for (n, outcome) in outcomes.into_iter().enumerate() {
            let done = tokio::time::timeout(SIGNAL_DEADLINE, running.wait_for(outcome.id()))
                .await
                .expect("run within the deadline, not the next poll")
                .expect("wait_for");
            assert_eq!(done.status, JobStatus::Done);
            assert_eq!(done.result, Some(json!((round * 10 + n as i64) * 2)));
        }
    }
    running.shutdown().await;
    testing::drop_schema(backend.schema()).await;
}

/// A TCP proxy to the test server that can drop every connection and
/// refuse new ones for a while, like a server restart or a network cut, or
/// silence the connections it holds, like a server gone without a reset.
struct Proxy {
    port: u16,
    upstream: String,
    tasks: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    /// Bumped by [`Proxy::silence`]: a connection made before stops
    /// forwarding either way, and stays open.
    silenced: Arc<tokio::sync::watch::Sender<u64>>,
    /// With [`Proxy::stalling_on`]: what a client sends last.
    stall_on: Option<&'static [u8]>,
    /// Notified when a client sent `stall_on`.
    stalled: Arc<tokio::sync::Notify>,
    /// Set by [`Proxy::resume`]: stalled connections forward again.
    resumed: Arc<tokio::sync::watch::Sender<bool>>,
}

impl Proxy {
    async fn start(upstream: String) -> Self {
        Self::start_with(upstream, None).await
    }

    /// A proxy whose connections, once their client sent `pattern`,
    /// forward it to the server and then nothing more either way, and stay
    /// open: a client that hangs right after that statement.
    async fn stalling_on(upstream: String, pattern: &'static [u8]) -> Self {
        Self::start_with(upstream, Some(pattern)).await
    }

    async fn start_with(upstream: String, stall_on: Option<&'static [u8]>) -> Self {
        let listener = proxy_listener().await;
        let port = listener.local_addr().expect("addr").port();
        let proxy = Self {
            port,
            upstream,
            tasks: Arc::default(),
            silenced: Arc::new(tokio::sync::watch::Sender::new(0)),
            stall_on,
            stalled: Arc::default(),
            resumed: Arc::new(tokio::sync::watch::Sender::new(false)),
        };
        proxy.serve(listener);
        proxy
    }

    fn serve(&self, listener: tokio::net::TcpListener) {
        let upstream = self.upstream.clone();
        let tasks = self.tasks.clone();
        let silenced = self.silenced.clone();
        let (stall_on, stalled) = (self.stall_on, self.stalled.clone());
        let resumed = self.resumed.clone();
        let acceptor = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let upstream = upstream.clone();
                let mut silence = silenced.subscribe();
                let born = *silence.borrow_and_update();
                let stalled = stalled.clone();
                let resumed = resumed.subscribe();
                let pipe = tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await else {
                        return;
                    };
                    if let Some(pattern) = stall_on {
                        return stall_after(client, server, pattern, &stalled, resumed).await;
                    }
                    let copy = tokio::io::copy_bidirectional(&mut client, &mut server);
                    // Biased: a pipe woken by data a client wrote after
                    // `silence` returned sees the silence first.
                    let silent = tokio::select! {
                        biased;
                        _ = silence.wait_for(|n| *n > born) => true,
                        _ = copy => false,
                    };
                    if silent {
                        // Both sockets stay open, unread, until cut.
                        std::future::pending::<()>().await;
                    }
                });
                tasks.lock().expect("tasks").push(pipe.abort_handle());
            }
        });
        self.tasks
            .lock()
            .expect("tasks")
            .push(acceptor.abort_handle());
    }

    /// Lets stalled connections go on: what their server sent meanwhile
    /// reaches their client, and they forward again, like a process that
    /// was stopped and is continued.
    fn resume(&self) {
        self.resumed.send_replace(true);
    }

    /// Drops every connection and stops listening; returns once a new
    /// connection is refused. (The listener closes when its aborted task
    /// is dropped, a moment later: a connection made meanwhile would be
    /// accepted by the kernel and then reset, which a client gives up on
    /// at once, where a refused one is tried again.)
    async fn cut(&self) {
        for task in self.tasks.lock().expect("tasks").drain(..) {
            task.abort();
        }
        tokio::time::timeout(SIGNAL_DEADLINE, async {
            while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                tokio::time::sleep(StdDuration::from_millis(1)).await;
            }
        })
        .await
        .expect("the proxy stops listening");
    }

    /// Stops forwarding on every connection open now, keeping them open;
    /// new connections forward as before.
    fn silence(&self) {
        self.silenced.send_modify(|n| *n += 1);
    }

    /// Listens again on the same port.
    async fn restore(&self) {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port))
            .await
            .expect("rebind");
        self.serve(listener);
    }

    /// `url` with its host and port replaced by the proxy's.
    fn url(&self, url: &str) -> String {
        let (scheme, rest) = url.split_once("://").expect("a URL");
        let (userinfo, hostpath) = match rest.rsplit_once('@') {
            Some((userinfo, hostpath)) => (format!("{userinfo}@"), hostpath),
            None => (String::new(), rest),
        };
        let path = hostpath.find(['/', '?']).map_or("", |i| &hostpath[i..]);
        format!("{scheme}://{userinfo}127.0.0.1:{}{path}", self.port)
    }
}

/// A listener on a port of its own for a [`Proxy`], below the range the
/// kernel hands out to `bind` on port 0 and to outgoing connections
/// (32768 and up on Linux), each port used once per test process. While a
/// proxy is cut its port is free: were it an ephemeral one, another
/// test's proxy could be given it meanwhile, and a connection meant to be
/// refused would reach the server through that one (seen once in CI).
async fn proxy_listener() -> tokio::net::TcpListener {
    const FIRST: u16 = 20_000;
    const PORTS: u16 = 10_000;
    static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    // Spread by process, so that a test process started right after
    // another (whose sockets may linger) starts elsewhere.
    let offset = (std::process::id() % u32::from(PORTS)) as u16;
    for _ in 0..PORTS {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % PORTS;
        let port = FIRST + (offset + n) % PORTS;
        if let Ok(listener) = tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
            return listener;
        }
    }
    panic!(
        "no free port for a proxy between {FIRST} and {}",
        FIRST + PORTS
    );
}

/// Forwards between `client` and `server` until the client sent `pattern`:
/// that goes to the server, then nothing more either way, both connections
/// staying open, until `resumed`: then what the server sent meanwhile goes
/// to the client, and forwarding goes on.
async fn stall_after(
    client: tokio::net::TcpStream,
    server: tokio::net::TcpStream,
    pattern: &[u8],
    stalled: &tokio::sync::Notify,
    resumed: tokio::sync::watch::Receiver<bool>,
) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let cut = AtomicBool::new(false);
    let resume = || {
        let mut resumed = resumed.clone();
        async move {
            let _ = resumed.wait_for(|on| *on).await;
        }
    };
    let replies = async {
        let mut buf = vec![0; 8192];
        let mut held = Vec::new();
        let mut resuming = std::pin::pin!(resume());
        let mut flushed = false;
        loop {
            let read = tokio::select! {
                read = server_read.read(&mut buf) => read,
                () = &mut resuming, if !flushed && cut.load(Ordering::SeqCst) => {
                    flushed = true;
                    let _ = client_write.write_all(&std::mem::take(&mut held)).await;
                    continue;
                }
            };
            let Ok(n @ 1..) = read else { break };
            if cut.load(Ordering::SeqCst) && !*resumed.borrow() {
                held.extend_from_slice(&buf[..n]);
            } else if client_write.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        // The server closed: the client hears of it (once resumed).
        if cut.load(Ordering::SeqCst) {
            resume().await;
            let _ = client_write.write_all(&held).await;
        }
        let _ = client_write.shutdown().await;
    };
    let requests = async {
        let mut buf = vec![0; 8192];
        let mut seen = Vec::new();
        while let Ok(n @ 1..) = client_read.read(&mut buf).await {
            seen.extend_from_slice(&buf[..n]);
            let stall =
                !cut.load(Ordering::SeqCst) && seen.windows(pattern.len()).any(|w| w == pattern);
            seen.drain(..seen.len().saturating_sub(pattern.len()));
            if stall {
                // Cut before the server can answer.
                cut.store(true, Ordering::SeqCst);
                let _ = server_write.write_all(&buf[..n]).await;
                stalled.notify_one();
                resume().await;
                continue;
            }
            if server_write.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    };
    tokio::join!(replies, requests);
}

/// A backend on a schema of its own, and a second backend on that schema
/// reached through a [`Proxy`], with `through`'s options.
async fn behind_proxy(
    through: impl FnOnce(PgOptions) -> PgOptions,
) -> (Proxy, PgBackend, PgBackend) {
    behind_proxy_on(testing::database_url(), through).await
}

/// [`behind_proxy`], reaching the server at `url`.
async fn behind_proxy_on(
    url: String,
    through: impl FnOnce(PgOptions) -> PgOptions,
) -> (Proxy, PgBackend, PgBackend) {
    let target: sqlx::postgres::PgConnectOptions = url.parse().expect("test URL");
    let proxy = Proxy::start(format!("{}:{}", target.get_host(), target.get_port())).await;
    let backend = testing::connect(testing::options()).await;
    let options = through(PgOptions::new(proxy.url(&url)).schema(backend.schema()));
    let through = PgBackend::connect_with(options)
        .await
        .expect("connect through the proxy");
    (proxy, backend, through)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_reconnects_after_the_server_was_unreachable() {
    let url = testing::database_url();
    let target: sqlx::postgres::PgConnectOptions = url.parse().expect("test URL");
    let proxy = Proxy::start(format!("{}:{}", target.get_host(), target.get_port())).await;
    let backend = testing::connect(
        testing::options()
            .max_connections(2)
            .acquire_timeout(StdDuration::from_secs(20)),
    )
    .await;
    // The same schema, reached through the proxy.
    let through = PgBackend::connect_with(
        PgOptions::new(proxy.url(&url))
            .schema(backend.schema())
            .max_connections(2)
            .acquire_timeout(StdDuration::from_millis(500)),
    )
    .await
    .expect("connect through the proxy");
    let mut wakeups = subscribed(&through, &["default".to_owned()]).await;
    backend.push(job(1)).await.expect("push");
    expect_signal(&mut wakeups, "before the cut").await;

    // Every connection drops and reconnecting fails for longer than one
    // attempt may take: sqlx's own reconnect gives up, so the backend's
    // backoff loop takes over.
    proxy.cut().await;
    tokio::time::sleep(StdDuration::from_millis(2500)).await;
    backend.push(job(2)).await.expect("push while cut off");
    proxy.restore().await;
    expect_signal(
        &mut wakeups,
        "the reconnect signals (pushes may have been missed)",
    )
    .await;
    drain(&mut wakeups, StdDuration::from_millis(200)).await;
    backend.push(job(3)).await.expect("push");
    expect_signal(&mut wakeups, "a push after the outage").await;
    assert_eq!(
        through
            .pull(&PullRequest::queue("default").batch(10))
            .await
            .expect("the pool reconnects too")
            .len(),
        3
    );
    proxy.cut().await;
    testing::drop_schema(backend.schema()).await;
}

/// A subscription whose caller stopped waiting (a worker stopping, a
/// caller's timeout) is not made: while the server is unreachable, each
/// would cost a connection attempt of up to the acquire timeout, ahead of
/// the subscribers still waiting. Ten abandoned ones held a live one up
/// for about ten acquire timeouts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_subscriptions_do_not_hold_up_the_live_ones() {
    let acquire = StdDuration::from_millis(500);
    let (proxy, backend, through) =
        behind_proxy(|options| options.max_connections(2).acquire_timeout(acquire)).await;
    let queues = ["default".to_owned()];
    proxy.cut().await;
    for _ in 0..10 {
        let abandoned =
            tokio::time::timeout(StdDuration::from_millis(10), through.subscribe(&queues)).await;
        assert!(abandoned.is_err(), "no subscription while cut off");
    }
    let started = std::time::Instant::now();
    let live = tokio::time::timeout(SIGNAL_DEADLINE, through.subscribe(&queues))
        .await
        .expect("answered");
    let took = started.elapsed();
    assert!(live.is_err(), "no subscription while cut off");
    // One attempt, not eleven (with room for a slow machine).
    assert!(took < acquire * 5, "the live subscription waited {took:?}");
    proxy.cut().await;
    testing::drop_schema(backend.schema()).await;
}

/// Waits until `backend`'s pool holds `n` idle connections: returned, past
/// the ping sqlx sends as it takes a connection back.
async fn idle_connections(backend: &PgBackend, n: usize) {
    tokio::time::timeout(SIGNAL_DEADLINE, async {
        while backend.pool().num_idle() < n {
            tokio::time::sleep(StdDuration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{n} idle connections"));
}

/// Whether `e`'s chain holds an I/O error of kind `TimedOut`.
fn timed_out(e: &Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return io.kind() == std::io::ErrorKind::TimedOut;
        }
        source = s.source();
    }
    false
}

/// Every queue operation on a pooled connection whose server stopped
/// answering (a failover, a cut link: no reset ever comes) fails once the
/// reply timeout passes, instead of waiting for TCP to give up, and closes
/// that connection: with a pool of one, the next call runs at once on a
/// new one (a connection returned to the pool would hold its only slot
/// while sqlx waited on it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_operations_on_a_silent_connection_fail_within_the_reply_timeout() {
    // Long enough that the healthy statements (through the proxy too) are
    // answered within it on a loaded machine.
    const REPLY: StdDuration = StdDuration::from_secs(1);
    let (proxy, backend, through) =
        behind_proxy(|options| options.max_connections(1).reply_timeout(Some(REPLY))).await;
    backend
        .push_batch((0..2).map(job).collect())
        .await
        .expect("push");
    let leased = backend
        .pull(&PullRequest::queue("default").batch(2))
        .await
        .expect("pull");
    let (first, second) = (leased[0].lease, leased[1].lease);
    let ops: [(
        &str,
        futures::future::BoxFuture<'_, relayq_core::Result<()>>,
    ); 8] = [
        (
            "push",
            Box::pin(async { through.push(job(10)).await.map(drop) }),
        ),
        (
            "push with a unique key",
            Box::pin(async { through.push(job(11).unique_key("eleven")).await.map(drop) }),
        ),
        (
            "push_batch",
            Box::pin(async { through.push_batch(vec![job(12), job(13)]).await.map(drop) }),
        ),
        (
            "pull",
            Box::pin(async { through.pull(&PullRequest::queue("default")).await.map(drop) }),
        ),
        ("complete", Box::pin(through.complete(&first, None))),
        (
            "retry",
            Box::pin(async { through.retry(&first, Duration::ZERO, "x").await.map(drop) }),
        ),
        (
            "extend",
            Box::pin(async {
                through
                    .extend(&second, Duration::minutes(1))
                    .await
                    .map(drop)
            }),
        ),
        (
            "extend_batch",
            Box::pin(async {
                through
                    .extend_batch(&[second], Duration::minutes(1))
                    .await
                    .map(drop)
            }),
        ),
    ];
    // Hears the notifications `through` sends.
    let mut woken = subscribed(&backend, &["default".to_owned()]).await;
    for (what, op) in ops {
        // The pool's one connection, just used and idle (sqlx pings only
        // connections idle for a second before handing them out).
        through.get(first.job_id).await.expect("get");
        idle_connections(&through, 1).await;
        proxy.silence();
        let outcome = tokio::time::timeout(SIGNAL_DEADLINE, op)
            .await
            .unwrap_or_else(|_| panic!("{what} still waits after {SIGNAL_DEADLINE:?}"));
        let e = outcome.expect_err(what);
        assert!(timed_out(&e), "{what}: {e}");
        assert!(e.is_transient(), "{what}: {e:?}");
        // A push that failed so wakes its queue's workers (it may have
        // been stored): that notification goes out on a new connection of
        // the pool's one slot, so let it go before the next operation,
        // which must find the silenced connection. (A keyless single push
        // whose notification rode with its insert sends none.)
        if ["push with a unique key", "push_batch"].contains(&what) {
            expect_signal(&mut woken, "the failed push's notification").await;
        }
        drain(&mut woken, QUIET).await;
    }
    // Nothing the silenced statements carried reached the server.
    let stats = backend.stats().await.expect("stats");
    assert_eq!(stats.queue("default").total(), 2, "{stats:?}");
    through
        .push(job(20))
        .await
        .expect("a push on a new connection");
    proxy.cut().await;
    testing::drop_schema(backend.schema()).await;
}

/// Folded pushes queued behind statements on connections gone silent go
/// in on new connections once the reply timeout has failed those
/// statements' callers; before, they waited for TCP to give up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_queued_behind_a_silent_fold_go_in_on_new_connections() {
    let (proxy, backend, through) = behind_proxy(|options| {
        options
            .max_connections(2)
            .min_connections(2)
            .reply_timeout(Some(StdDuration::from_secs(1)))
    })
    .await;
    // Both connections just used, so that neither is pinged as it is
    // handed out (sqlx pings those idle for a second).
    idle_connections(&through, 2).await;
    let both = (
        through.pool().acquire().await.expect("acquire"),
        through.pool().acquire().await.expect("acquire"),
    );
    drop(both);
    idle_connections(&through, 2).await;
    proxy.silence();
    // The first two pushes start the two fold runners on the two silent
    // connections; the other four wait for a runner.
    let outcomes = tokio::time::timeout(
        SIGNAL_DEADLINE,
        futures::future::join_all((0..6).map(|n| through.push(spread_job(n)))),
    )
    .await
    .expect("every push answered before TCP gives up");
    for (n, outcome) in outcomes.iter().enumerate() {
        match (n, outcome) {
            (0 | 1, Err(e)) => assert!(timed_out(e), "push {n}: {e}"),
            (0 | 1, Ok(o)) => panic!("push {n} went through a silent connection: {o:?}"),
            (_, Ok(o)) => assert_is_job(&backend, o.id(), n as i64).await,
            (_, Err(e)) => panic!("push {n}, queued behind the silent ones: {e}"),
        }
    }
    proxy.cut().await;
    testing::drop_schema(backend.schema()).await;
}

/// A subscription whose LISTEN goes unanswered (the listener's server went
/// silent without a reset) fails within the acquire timeout instead of
/// waiting for TCP to give up, with a worker starting up waiting on it; the
/// next subscription runs on a new listener connection, and hears pushes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_on_a_silent_listener_fails_within_the_acquire_timeout() {
    let (proxy, backend, through) =
        behind_proxy(|options| options.acquire_timeout(StdDuration::from_millis(500))).await;
    let _first = subscribed(&through, &["default".to_owned()]).await;
    proxy.silence();
    let silent = tokio::time::timeout(SIGNAL_DEADLINE, through.subscribe(&["other".to_owned()]))
        .await
        .expect("the subscription gave up in time");
    let e = silent.expect_err("no LISTEN on a silent connection");
    assert!(timed_out(&e), "{e}");
    let mut again = tokio::time::timeout(SIGNAL_DEADLINE, async {
        loop {
            if let Ok(Some(wakeups)) = through.subscribe(&["other".to_owned()]).await {
                return wakeups;
            }
            tokio::time::sleep(StdDuration::from_millis(50)).await;
        }
    })
    .await
    .expect("a new listener connection");
    drain(&mut again, QUIET).await;
    backend.push(job(1).queue("other")).await.expect("push");
    expect_signal(&mut again, "a push after the new subscription").await;
    proxy.cut().await;
    testing::drop_schema(backend.schema()).await;
}

/// A LISTEN connection whose server went silent while it waited for
/// notifications (a NAT that dropped it, say: nothing to retransmit, so
/// TCP never gives up) is found out by the listener's check after an
/// acquire timeout of silence and replaced; every subscriber is then
/// signalled, for the pushes it could not hear, and hears later ones.
/// Subscriptions to queues already listened to, which send the server
/// nothing, do not put the check off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_whose_server_went_silent_is_replaced() {
    // Checked 2 s after the connection was made: the silence starts well
    // before, so only the check (not one made as it starts) can find it.
    let (proxy, backend, through) =
        behind_proxy(|options| options.acquire_timeout(StdDuration::from_secs(2))).await;
    let mut wakeups = subscribed(&through, &["default".to_owned()]).await;
    drain(&mut wakeups, QUIET).await;
    proxy.silence();
    let resubscribing = {
        let through = through.clone();
        tokio::spawn(async move {
            loop {
                let _ = through.subscribe(&["default".to_owned()]).await;
                tokio::time::sleep(StdDuration::from_millis(100)).await;
            }
        })
    };
    backend.push(job(1)).await.expect("push");
    expect_signal(
        &mut wakeups,
        "the catch-up after the silent listener was replaced",
    )
    .await;
    drain(&mut wakeups, QUIET).await;
    backend.push(job(2)).await.expect("push");
    expect_signal(&mut wakeups, "a push heard on the new listener").await;
    resubscribing.abort();
    proxy.cut().await;
    testing::drop_schema(backend.schema()).await;
}

/// A pooled connection idle long enough to be pinged before use, whose
/// server went silent meanwhile, is closed once half the acquire timeout
/// (at most the reply timeout) has passed, and the call goes on with a new
/// connection; before, the ping took the whole acquire timeout and the
/// call failed.
///
/// Without TLS: over TLS, sqlx's close of the failed connection waits to
/// hear from the silent server, so the call fails at the acquire timeout
/// instead (documented at [`PgOptions::reply_timeout`]).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_idle_connection_is_replaced_as_it_is_handed_out() {
    let plain = test_url_with("sslmode=disable");
    let (proxy, backend, through) = behind_proxy_on(plain, |options| {
        options
            .max_connections(1)
            .acquire_timeout(StdDuration::from_secs(30))
            .reply_timeout(Some(StdDuration::from_secs(1)))
    })
    .await;
    idle_connections(&through, 1).await;
    // Idle for longer than the second after which sqlx pings it.
    tokio::time::sleep(StdDuration::from_millis(1200)).await;
    proxy.silence();
    let pushed = tokio::time::timeout(SIGNAL_DEADLINE, through.push(job(1)))
        .await
        .expect("the ping gave up in time")
        .expect("pushed on a new connection");
    assert!(backend.get(pushed.id()).await.expect("get").is_some());
    proxy.cut().await;
    testing::drop_schema(backend.schema()).await;
}

/// A call dropped mid-statement (its caller stopped waiting) leaves its
/// connection owing an answer: it goes back to the pool once the answer
/// came, within the reply timeout, rather than being closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_whose_caller_left_returns_to_the_pool_once_answered() {
    let backend = testing::connect(testing::options()).await;
    let one = PgBackend::connect_with(
        testing::options()
            .schema(backend.schema())
            .max_connections(1)
            .reply_timeout(Some(StdDuration::from_secs(30))),
    )
    .await
    .expect("connect");
    let pid = || async {
        sqlx::query_scalar::<_, i32>("SELECT pg_backend_pid()")
            .fetch_one(one.pool())
            .await
            .expect("pid")
    };
    let before = pid().await;
    // A transaction holds the unique key, so a push of the same key waits
    // for it (ON CONFLICT waits for an in-progress holder).
    let mut tx = backend.pool().begin().await.expect("begin");
    backend
        .push_in(&mut tx, job(1).unique_key("held"))
        .await
        .expect("push_in");
    // The caller leaves once its statement is on the server, waiting.
    let waiting = async {
        loop {
            let event: Option<String> =
                sqlx::query_scalar("SELECT wait_event_type FROM pg_stat_activity WHERE pid = $1")
                    .bind(before)
                    .fetch_optional(backend.pool())
                    .await
                    .expect("activity")
                    .flatten();
            if event.as_deref() == Some("Lock") {
                return;
            }
            tokio::time::sleep(StdDuration::from_millis(10)).await;
        }
    };
    tokio::select! {
        pushed = one.push(job(2).unique_key("held")) => panic!("the push did not wait: {pushed:?}"),
        () = waiting => {}
        () = tokio::time::sleep(SIGNAL_DEADLINE) => panic!("the push never waited on the lock"),
    }
    tx.commit().await.expect("commit");
    assert_eq!(pid().await, before, "the connection was closed");
    testing::drop_schema(backend.schema()).await;
}

/// A push whose caller stopped waiting once its statement was on the
/// server (a timeout, a dropped request) still wakes the workers of every
/// process when it commits: a job with a unique key, and a batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_whose_caller_left_wakes_workers_once_it_commits() {
    let backend = testing::connect(testing::options()).await;
    let pusher = testing::connect(
        PgOptions::new(testing::database_url())
            .schema(backend.schema())
            .max_connections(1),
    )
    .await;
    let listener = other_process(&backend).await;
    let mut wakeups = subscribed(&listener, &["default".to_owned()]).await;
    drain(&mut wakeups, QUIET).await;
    for (round, batch) in [false, true].into_iter().enumerate() {
        let key = format!("held-{round}");
        // A transaction holds the key, so a push of it waits for it.
        let mut tx = backend.pool().begin().await.expect("begin");
        backend
            .push_in(&mut tx, job(1).unique_key(key.clone()))
            .await
            .expect("push_in");
        let push = async {
            if batch {
                pusher
                    .push_batch(vec![job(2).unique_key(key.clone()), job(3)])
                    .await
                    .map(drop)
            } else {
                pusher.push(job(2).unique_key(key.clone())).await.map(drop)
            }
        };
        let waiting = waiting_on_locks(&backend, 1);
        // The caller leaves once its statement waits on the server.
        tokio::select! {
            pushed = push => panic!("the push did not wait: {pushed:?}"),
            () = waiting => {}
            () = tokio::time::sleep(SIGNAL_DEADLINE) => panic!("the push never waited on the lock"),
        }
        // The holder goes: the push goes on, and commits.
        tx.rollback().await.expect("rollback");
        expect_signal(&mut wakeups, "a push whose caller left").await;
        drain(&mut wakeups, QUIET).await;
    }
    let stats = backend.stats().await.expect("stats");
    assert_eq!(stats.queue("default").pending, 3, "{stats:?}");
    testing::drop_schema(backend.schema()).await;
}

/// A push queued behind the two statements of folded pushes under way,
/// whose caller then stops waiting, is still inserted with the next fold,
/// as a push on a task of its own would be. It was skipped: its job lost,
/// though the caller was entitled to take it as stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_folded_push_whose_caller_left_is_stored() {
    let backend = testing::connect(testing::options()).await;
    let pusher =
        testing::connect(PgOptions::new(testing::database_url()).schema(backend.schema())).await;
    // Inserts wait while this transaction holds the table.
    let mut tx = backend.pool().begin().await.expect("begin");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "LOCK TABLE \"{}\".jobs IN SHARE MODE",
        backend.schema()
    )))
    .execute(&mut *tx)
    .await
    .expect("lock");
    let first = tokio::spawn({
        let pusher = pusher.clone();
        async move { pusher.push(job(1)).await }
    });
    let second = tokio::spawn({
        let pusher = pusher.clone();
        async move { pusher.push(job(2)).await }
    });
    // Both statements wait on the table: the next push is queued.
    tokio::time::timeout(SIGNAL_DEADLINE, waiting_on_locks(&backend, 2))
        .await
        .expect("two statements wait on the lock");
    let left = tokio::time::timeout(StdDuration::from_millis(50), pusher.push(job(3))).await;
    assert!(left.is_err(), "the third push waited: {left:?}");
    tx.commit().await.expect("commit");
    first.await.expect("task").expect("first push");
    second.await.expect("task").expect("second push");
    let stored = tokio::time::timeout(SIGNAL_DEADLINE, async {
        loop {
            if backend
                .stats()
                .await
                .expect("stats")
                .queue("default")
                .pending
                == 3
            {
                return;
            }
            tokio::time::sleep(StdDuration::from_millis(10)).await;
        }
    })
    .await;
    let stats = backend.stats().await.expect("stats");
    testing::drop_schema(backend.schema()).await;
    assert!(stored.is_ok(), "the queued push was not stored: {stats:?}");
}

/// Pool connections ask the server to check, while it runs a statement,
/// that their client is still there (PostgreSQL 14 and later), so a
/// statement whose connection was closed for want of an answer does not
/// wait on behind a lock and commit after its caller was told it failed;
/// and they never JIT-compile (a costly-looking claim over many queues
/// took six times as long compiled).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_connections_have_the_server_check_for_their_client() {
    let backend = testing::connect(testing::options()).await;
    let (version, interval, jit): (i32, Option<String>, String) = sqlx::query_as(
        "SELECT current_setting('server_version_num')::int, \
                current_setting('client_connection_check_interval', true), \
                current_setting('jit')",
    )
    .fetch_one(backend.pool())
    .await
    .expect("settings");
    if version >= 140_000 {
        assert_eq!(interval.as_deref(), Some("1s"));
    }
    assert_eq!(jit, "off");
    testing::drop_schema(backend.schema()).await;
}

/// A keyless batch (one plain `INSERT … unnest`) and a batch with keys
/// (speculative insertion) both report ids in input order, each naming its
/// own job, with ids growing in input order so pull order among equals is
/// push order; a single push of each kind reports its own id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_ids_name_their_jobs_in_input_order() {
    let backend = testing::connect(testing::options()).await;
    for (numbers, keyed) in [(0..1000, false), (1000..1010, true)] {
        let batch: Vec<NewJob> = numbers
            .clone()
            .map(|n| match keyed {
                true => job(n).unique_key(format!("key-{n}")),
                false => job(n),
            })
            .collect();
        let expected: Vec<serde_json::Value> = numbers.map(|n| json!({ "n": n })).collect();
        let outcomes = backend.push_batch(batch).await.expect("push_batch");
        let ids: Vec<i64> = outcomes.iter().map(|o| o.id()).collect();
        assert!(
            outcomes.iter().all(|o| !o.is_duplicate()),
            "all created: {outcomes:?}"
        );
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids grow: {ids:?}");
        for (id, payload) in ids.iter().zip(&expected) {
            let stored = backend.get(*id).await.expect("get").expect("stored");
            assert_eq!(&*stored.payload, payload, "job {id}");
        }
    }
    let one = backend.push(job(2000)).await.expect("push").id();
    assert_eq!(
        backend
            .get(one)
            .await
            .expect("get")
            .expect("stored")
            .payload
            .as_ref(),
        &json!({ "n": 2000 })
    );
    let keyed = backend
        .push(job(2001).unique_key("key-1000"))
        .await
        .expect("push keyed");
    assert!(keyed.is_duplicate(), "key-1000 is held: {keyed:?}");
    let fresh = backend
        .push(job(2002).unique_key("key-2002"))
        .await
        .expect("push keyed")
        .id();
    assert_eq!(
        backend
            .get(fresh)
            .await
            .expect("get")
            .expect("stored")
            .payload
            .as_ref(),
        &json!({ "n": 2002 })
    );
    testing::drop_schema(backend.schema()).await;
}

/// Pushes `per_task` jobs from each of `tasks` concurrent tasks; job `n`
/// is pushed to queue `q{n % 3}` with priority `n % 7`, and `make` may
/// alter it. Returns, per job number, what its own push returned.
async fn push_concurrently(
    backend: &PgBackend,
    tasks: i64,
    per_task: i64,
    make: fn(i64) -> NewJob,
) -> Vec<(i64, relayq_core::Result<PushOutcome>)> {
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            let backend = backend.clone();
            tokio::spawn(async move {
                let mut results = Vec::new();
                for i in 0..per_task {
                    let n = t * per_task + i;
                    results.push((n, backend.push(make(n)).await));
                }
                results
            })
        })
        .collect();
    let mut results = Vec::new();
    for handle in handles {
        results.extend(handle.await.expect("push task"));
    }
    results
}

fn spread_job(n: i64) -> NewJob {
    job(n)
        .queue(format!("q{}", n % 3))
        .priority(i16::try_from(n % 7).expect("small"))
}

/// Checks the job `id` is job `n` of [`spread_job`].
async fn assert_is_job(backend: &PgBackend, id: i64, n: i64) {
    let stored = backend.get(id).await.expect("get").expect("stored");
    assert_eq!(*stored.payload, json!({ "n": n }), "job {id}");
    assert_eq!(stored.queue, format!("q{}", n % 3), "job {id}");
    assert_eq!(i64::from(stored.priority), n % 7, "job {id}");
    assert_eq!(stored.status, JobStatus::Pending, "job {id}");
}

/// How many distinct insert statements stored the schema's jobs: rows one
/// statement inserted share its `statement_timestamp()`.
async fn insert_statements(backend: &PgBackend) -> (i64, i64) {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) AS n, count(DISTINCT created_at) AS statements FROM \"{}\".jobs",
        backend.schema()
    )))
    .fetch_one(backend.pool())
    .await
    .expect("count");
    (row.get("n"), row.get("statements"))
}

/// Concurrent single pushes are folded into shared statements (group
/// commit), and each caller still gets the id of its own job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pushes_are_folded_and_each_gets_its_own_id() {
    let backend = testing::connect(testing::options()).await;
    let results = push_concurrently(&backend, 16, 100, spread_job).await;
    let mut ids = HashSet::new();
    for (n, result) in &results {
        let outcome = result.as_ref().expect("push");
        assert!(!outcome.is_duplicate(), "{outcome:?}");
        assert!(ids.insert(outcome.id()), "id {} given twice", outcome.id());
        assert_is_job(&backend, outcome.id(), *n).await;
    }
    let (rows, statements) = insert_statements(&backend).await;
    assert_eq!(rows, 1600);
    assert!(
        statements < rows,
        "16 concurrent tasks' pushes were never folded: {statements} statements for {rows} jobs"
    );
    // A push after the others goes out alone, at once.
    let alone = backend.push(spread_job(5000)).await.expect("push").id();
    assert_is_job(&backend, alone, 5000).await;
    testing::drop_schema(backend.schema()).await;
}

/// A stream of folded pushes does not keep the pool's only connection
/// from everyone else: with a pool of one, pushes from several tasks and
/// other operations all go through within the acquire timeout (a fold
/// runner that held its connection for as long as pushes kept arriving
/// made the second runner's pushes, and every other call, time out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_share_a_pool_of_one_with_other_calls() {
    let options = testing::options()
        .max_connections(1)
        .acquire_timeout(StdDuration::from_secs(1));
    let backend = testing::connect(options).await;
    let until = tokio::time::Instant::now() + StdDuration::from_secs(3);
    let mut pushers = tokio::task::JoinSet::new();
    for task in 0..4 {
        let backend = backend.clone();
        pushers.spawn(async move {
            let mut n = 0;
            while tokio::time::Instant::now() < until {
                backend
                    .push(spread_job(task * 1_000_000 + n))
                    .await
                    .unwrap_or_else(|e| panic!("push {n} of task {task}: {e}"));
                n += 1;
            }
            n
        });
    }
    while tokio::time::Instant::now() < until {
        backend.stats().await.expect("stats while pushes stream");
        tokio::time::sleep(StdDuration::from_millis(100)).await;
    }
    let mut pushed = 0;
    while let Some(joined) = pushers.join_next().await {
        pushed += joined.expect("pusher");
    }
    let stats = backend.stats().await.expect("stats");
    assert_eq!(
        stats.queues.values().map(|c| c.total()).sum::<u64>(),
        pushed as u64
    );
    testing::drop_schema(backend.schema()).await;
}

/// Adds a CHECK constraint, as an application extending the table might,
/// that rejects jobs whose `n` ends in 7.
async fn reject_jobs_ending_in_7(backend: &PgBackend) {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER TABLE \"{}\".jobs ADD CONSTRAINT no_poison CHECK ((payload->>'n')::int8 % 10 <> 7)",
        backend.schema()
    )))
    .execute(backend.pool())
    .await
    .expect("add constraint");
}

/// A job the database rejects fails only its own push, even when it was
/// folded with others: the rest are stored, each under its caller's id.
/// Core validation lets nothing through that the stock schema rejects per
/// row (NULs are refused before sending, sizes are bounded by
/// PostgreSQL's 1 GB limits only), so the test adds a CHECK constraint, as
/// an application extending the table might, that rejects some payloads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_job_among_folded_pushes_fails_only_its_caller() {
    let backend = testing::connect(testing::options()).await;
    reject_jobs_ending_in_7(&backend).await;
    let results = push_concurrently(&backend, 16, 50, spread_job).await;
    let mut ids = HashSet::new();
    for (n, result) in &results {
        match result {
            Ok(outcome) => {
                assert_ne!(
                    n % 10,
                    7,
                    "job {n} violates the constraint, yet {outcome:?}"
                );
                assert!(ids.insert(outcome.id()), "id {} given twice", outcome.id());
                assert_is_job(&backend, outcome.id(), *n).await;
            }
            Err(e) => {
                assert_eq!(n % 10, 7, "job {n} was fine, yet failed: {e}");
                assert!(matches!(e, Error::Backend { .. }), "{e:?}");
                assert!(!e.is_transient(), "a constraint rejects it again: {e:?}");
            }
        }
    }
    let (rows, statements) = insert_statements(&backend).await;
    assert_eq!(rows, 720, "every job but the 80 rejected is stored");
    assert!(statements <= rows);
    testing::drop_schema(backend.schema()).await;
}

/// Every successful push wakes its backend's subscribers of its queue by
/// the time it returns, whether it went out alone, folded with others, or
/// one by one after its folded statement failed on another job's data
/// (the CHECK constraint below).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_folded_push_wakes_local_subscribers_before_it_returns() {
    use futures::FutureExt;
    let backend = testing::connect(testing::options()).await;
    reject_jobs_ending_in_7(&backend).await;
    let tasks: Vec<_> = (0..8)
        .map(|t| {
            let backend = backend.clone();
            tokio::spawn(async move {
                let queue = format!("own{t}");
                let mut wakeups = subscribed(&backend, std::slice::from_ref(&queue)).await;
                for i in 0..40 {
                    // Signals of earlier pushes' notifications.
                    while let Some(Some(())) = wakeups.next().now_or_never() {}
                    let n = t * 40 + i;
                    match backend.push(job(n).queue(&queue)).await {
                        Ok(_) => assert_eq!(
                            wakeups.next().now_or_never(),
                            Some(Some(())),
                            "push {n} returned before waking its queue's subscriber"
                        ),
                        Err(e) => assert_eq!(n % 10, 7, "job {n} was fine, yet failed: {e}"),
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("pushing task");
    }
    testing::drop_schema(backend.schema()).await;
}

/// Folded pushes notify the queues they added jobs to, after committing,
/// to other processes too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn folded_pushes_notify_their_queues() {
    let backend = testing::connect(testing::options()).await;
    let listening = other_process(&backend).await;
    let mut subscriptions = Vec::new();
    for q in ["q0", "q1", "q2"] {
        let wakeups = listening
            .subscribe(&[q.to_owned()])
            .await
            .expect("subscribe")
            .expect("postgres wakes subscribers");
        subscriptions.push(wakeups);
    }
    let mut unrelated = listening
        .subscribe(&["elsewhere".to_owned()])
        .await
        .expect("subscribe")
        .expect("postgres wakes subscribers");
    let results = push_concurrently(&backend, 8, 30, spread_job).await;
    assert!(results.iter().all(|(_, r)| r.is_ok()), "{results:?}");
    for wakeups in &mut subscriptions {
        expect_signal(wakeups, "jobs were pushed to the queue").await;
    }
    expect_quiet(&mut unrelated, "no job went to this queue").await;
    testing::drop_schema(backend.schema()).await;
}

/// A notification whose statement fails is sent again, so a worker in
/// another process is not left asleep until its poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_notification_is_sent_again() {
    let (backend, _listening, mut wakeups, mut admin) = push_while_notifications_fail().await;
    expect_quiet(&mut wakeups, "the notification cannot be sent").await;
    rename_channel_function(
        &mut admin,
        &backend,
        "notify_channel_away",
        "notify_channel",
    )
    .await;
    expect_signal(&mut wakeups, "the failed notification is sent again").await;
    testing::drop_schema(backend.schema()).await;
}

/// A push's notification, sent in the background after the push returned,
/// is sent before `close` closes the pool: a program that pushes, closes
/// the backend and exits still wakes the workers of other processes. (The
/// notification is held back when `close` is called: its first attempt
/// failed, and it waits to be sent again.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_sends_the_notifications_of_earlier_pushes() {
    let (backend, _listening, mut wakeups, mut admin) = push_while_notifications_fail().await;
    tokio::time::sleep(StdDuration::from_millis(30)).await;
    rename_channel_function(
        &mut admin,
        &backend,
        "notify_channel_away",
        "notify_channel",
    )
    .await;
    backend.close().await;
    expect_signal(&mut wakeups, "the push's notification was sent").await;
    testing::drop_schema(backend.schema()).await;
}

/// A backend whose notifications fail, and nothing else (its schema's
/// channel function renamed away, to `notify_channel_away`), once it has
/// pushed a job to q0; with another process's backend (kept alive for its
/// subscription) and drained subscription to q0, and an admin connection
/// to rename the function back with.
async fn push_while_notifications_fail() -> (PgBackend, PgBackend, Wakeups, sqlx::PgConnection) {
    let backend = testing::connect(testing::options()).await;
    let listening = other_process(&backend).await;
    let mut wakeups = subscribed(&listening, &["q0".to_owned()]).await;
    drain(&mut wakeups, StdDuration::from_millis(300)).await;
    let mut admin = testing::admin().await;
    rename_channel_function(
        &mut admin,
        &backend,
        "notify_channel",
        "notify_channel_away",
    )
    .await;
    // spread_job(0) goes to q0.
    backend.push(spread_job(0)).await.expect("push");
    (backend, listening, wakeups, admin)
}

/// Renames `backend`'s channel function `from` to `to`.
async fn rename_channel_function(
    admin: &mut sqlx::PgConnection,
    backend: &PgBackend,
    from: &str,
    to: &str,
) {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER FUNCTION \"{}\".{from}(text) RENAME TO {to}",
        backend.schema()
    )))
    .execute(admin)
    .await
    .expect("rename the channel function");
}

/// With an injected clock, folded pushes take their times from it, and a
/// push whose delay is out of range fails alone, before anything is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn folded_pushes_use_the_injected_clock_and_validate_each_push() {
    let clock = ManualClock::new(relayq_conformance::EPOCH);
    let backend = testing::connect(testing::options().clock(Arc::new(clock.clone()))).await;
    fn delayed(n: i64) -> NewJob {
        match n % 10 {
            3 => job(n).delay(Duration::seconds(-1)),
            _ => job(n).delay(Duration::seconds(n % 5)),
        }
    }
    let results = push_concurrently(&backend, 8, 40, delayed).await;
    for (n, result) in &results {
        match result {
            Ok(outcome) => {
                let stored = backend
                    .get(outcome.id())
                    .await
                    .expect("get")
                    .expect("stored");
                assert_eq!(*stored.payload, json!({ "n": n }));
                assert_eq!(stored.created_at, relayq_conformance::EPOCH);
                assert_eq!(
                    stored.run_at,
                    relayq_conformance::EPOCH + Duration::seconds(n % 5)
                );
            }
            Err(e) => {
                assert_eq!(n % 10, 3, "job {n}: {e}");
                assert_eq!(e.invalid_field(), Some("delay"), "{e:?}");
            }
        }
    }
    let (rows, _) = insert_statements(&backend).await;
    assert_eq!(rows, 320 - 32);
    testing::drop_schema(backend.schema()).await;
}

/// A runtime shutting down while its tasks are inserting folded pushes
/// does not leave the backend's pushes stuck: pushes from another runtime
/// still go through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn folded_pushes_survive_a_runtime_shutting_down_mid_insert() {
    let backend = testing::connect(testing::options()).await;
    let elsewhere = backend.clone();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        for t in 0..8 {
            let backend = elsewhere.clone();
            runtime.spawn(async move {
                for i in 0.. {
                    let _ = backend.push(job(t * 1_000_000 + i)).await;
                }
            });
        }
        std::thread::sleep(StdDuration::from_millis(300));
        runtime.shutdown_background();
    })
    .join()
    .expect("thread");
    // Each pooled connection the shut-down runtime opened fails once (its
    // I/O belonged to that runtime) and is discarded, so allow one failure
    // per pooled connection, for the push and for the read alike.
    const ATTEMPTS: usize = 64;
    let mut pushed = None;
    for _ in 0..ATTEMPTS {
        let push = tokio::time::timeout(SIGNAL_DEADLINE, backend.push(job(-1)))
            .await
            .expect("a push after the shutdown returns");
        if let Ok(outcome) = push {
            pushed = Some(outcome.id());
            break;
        }
    }
    let id = pushed.expect("a push after the shutdown succeeds");
    let mut stored = None;
    for _ in 0..ATTEMPTS {
        if let Ok(job) = backend.get(id).await {
            stored = job;
            break;
        }
    }
    let stored = stored.expect("stored");
    assert_eq!(*stored.payload, json!({ "n": -1 }));
    testing::drop_schema(backend.schema()).await;
}

/// A push polled by an executor other than Tokio gets an error naming the
/// cause rather than a panic from spawning its insert, and writes nothing.
#[tokio::test]
async fn a_push_outside_a_tokio_runtime_is_an_error() {
    let backend = testing::connect(testing::options()).await;
    let elsewhere = backend.clone();
    let outcome = std::thread::spawn(move || futures::executor::block_on(elsewhere.push(job(1))))
        .join()
        .expect("no panic");
    let err = outcome.expect_err("no runtime to insert on");
    assert!(err.to_string().contains("Tokio runtime"), "{err}");
    assert_eq!(insert_statements(&backend).await, (0, 0));
    testing::drop_schema(backend.schema()).await;
}
