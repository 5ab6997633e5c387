//! Tests of the statements' plans: each reads the rows it needs, not every
//! leased or finished job, whatever the planner's statistics say and
//! however many jobs the table keeps.

use relayq_core::{Cleaner, JobStatus, Lease, NewJob, PullRequest, Puller, Pusher};
use serde_json::{Value, json};
use sqlx::postgres::PgArguments;
use sqlx::query::Query;
use sqlx::{AssertSqlSafe, Postgres, Row, SqlStr};

use crate::json::AsJson;
use crate::{PgBackend, testing};

/// A statement with some of its parameters bound.
type Bound = Query<'static, Postgres, PgArguments>;

/// Binds a statement's parameters after the lease's.
type Binder = Box<dyn FnOnce(Bound) -> Bound>;

/// Jobs leased when the acknowledgements are planned.
const LEASED: usize = 3_000;

/// Finished jobs kept beside the active ones.
const FINISHED: i64 = 20_000;

/// Rows a plan read from the jobs table: at each scan of it, the rows it
/// returned and those its filter dropped, over all its loops.
fn rows_read(node: &Value) -> f64 {
    let number = |key: &str| node.get(key).and_then(Value::as_f64).unwrap_or(0.0);
    let own = if node.get("Relation Name").and_then(Value::as_str) == Some("jobs")
        && node.get("Node Type").and_then(Value::as_str) != Some("ModifyTable")
    {
        (number("Actual Rows") + number("Rows Removed by Filter")) * number("Actual Loops")
    } else {
        0.0
    };
    let children = node
        .get("Plans")
        .and_then(Value::as_array)
        .map_or(0.0, |plans| plans.iter().map(rows_read).sum());
    own + children
}

/// Runs `sql` under `EXPLAIN ANALYZE`, unprepared (planned with its values,
/// and left out of the connection's prepared statements), in a transaction
/// rolled back (so nothing changes), with the parameters `bind` binds, and returns the
/// rows it read from the jobs table and its plan.
async fn explain(
    backend: &PgBackend,
    sql: &SqlStr,
    bind: impl FnOnce(Bound) -> Bound,
) -> (f64, Value) {
    let explained = AssertSqlSafe(format!("EXPLAIN (ANALYZE, FORMAT JSON) {}", sql.as_str()));
    let query = bind(sqlx::query(explained).persistent(false));
    let mut tx = backend.pool().begin().await.expect("begin");
    let plan: Value = query
        .fetch_one(&mut *tx)
        .await
        .and_then(|row| row.try_get(0))
        .expect("explain");
    tx.rollback().await.expect("rollback");
    let root = &plan[0]["Plan"];
    (rows_read(root), plan)
}

/// With statistics gathered while no job was leased (as after a bulk
/// load and its `ANALYZE`), each acknowledgement reads the rows it names
/// by primary key. Tested by `status = 'processing'`, a single `complete`
/// read all 3,000 leased jobs through the lease index, and a batch of 10
/// did too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledgements_read_only_their_rows_whatever_the_statistics() {
    let backend = testing::connect(testing::options()).await;
    let schema = backend.schema().to_owned();
    let jobs = (0..2 * LEASED)
        .map(|i| NewJob::new("k", &json!({ "i": i })))
        .collect();
    backend.push_batch(jobs).await.expect("push");
    sqlx::query(AssertSqlSafe(format!("ANALYZE \"{schema}\".jobs")))
        .execute(backend.pool())
        .await
        .expect("analyze");
    let request = PullRequest::queue("default").batch(LEASED as u32);
    let leases: Vec<Lease> = backend
        .pull(&request)
        .await
        .expect("pull")
        .into_iter()
        .map(|leased| leased.lease)
        .collect();
    assert_eq!(leases.len(), LEASED);
    let lease = leases[LEASED / 2];
    let sql = &backend.inner.sql;
    let micros = 1_000_000_i64;
    let single: [(&str, &SqlStr, Binder); 7] = [
        (
            "complete",
            &sql.complete,
            Box::new(|q| q.bind(AsJson(json!(1)))),
        ),
        (
            "retry",
            &sql.retry,
            Box::new(move |q| q.bind(micros).bind("e")),
        ),
        ("kill", &sql.kill, Box::new(|q| q.bind("e"))),
        (
            "kill_unreadable_payload",
            &sql.kill_unreadable_payload,
            Box::new(|q| q.bind("e").bind(AsJson("p"))),
        ),
        (
            "kill_unreadable_result",
            &sql.kill_unreadable_result,
            Box::new(|q| q.bind("e").bind(AsJson("r"))),
        ),
        ("extend", &sql.extend, Box::new(move |q| q.bind(micros))),
        ("release", &sql.release, Box::new(|q| q)),
    ];
    // Each statement over its bound, with its plan.
    let mut over = Vec::new();
    for (name, statement, bind) in single {
        let (read, plan) = explain(&backend, statement, |q| {
            bind(q.bind(backend.now()).bind(lease.job_id).bind(lease.token))
        })
        .await;
        if read > 2.0 {
            over.push(format!("{name} read {read} rows:\n{plan:#}"));
        }
    }
    let batch = &leases[100..110];
    let ids: Vec<i64> = batch.iter().map(|lease| lease.job_id).collect();
    let tokens: Vec<i64> = batch.iter().map(|lease| lease.token).collect();
    let results: Vec<Option<AsJson<Value>>> = vec![None; batch.len()];
    let (read, plan) = explain(&backend, &sql.complete_batch, |q| {
        q.bind(backend.now())
            .bind(ids.clone())
            .bind(tokens.clone())
            .bind(results)
    })
    .await;
    if read > 20.0 {
        over.push(format!("complete_batch read {read} rows:\n{plan:#}"));
    }
    let (read, plan) = explain(&backend, &sql.extend_batch, |q| {
        q.bind(backend.now()).bind(ids).bind(tokens).bind(micros)
    })
    .await;
    if read > 20.0 {
        over.push(format!("extend_batch read {read} rows:\n{plan:#}"));
    }
    testing::drop_schema(&schema).await;
    assert!(over.is_empty(), "{}", over.join("\n"));
}

/// Stores `n` finished jobs of queue `default`, a day old, and refreshes
/// the statistics.
async fn keep_finished(backend: &PgBackend, n: i64) {
    let schema = backend.schema();
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO \"{schema}\".jobs (queue, kind, payload, status, attempts, max_attempts,
             lease_token, run_at, created_at, updated_at)
         SELECT 'default', 'k', '{{}}', 'done', 1, 25, 1, now() - interval '1 day',
                now() - interval '1 day', now() - interval '1 day'
         FROM generate_series(1, $1)"
    )))
    .bind(n)
    .execute(backend.pool())
    .await
    .expect("finished jobs");
    sqlx::query(AssertSqlSafe(format!("ANALYZE \"{schema}\".jobs")))
        .execute(backend.pool())
        .await
        .expect("analyze");
}

/// A push that finds its unique key held looks the holder up through the
/// unique index. Over all jobs with the key, the look-up could use no
/// index and read every job kept, for each duplicate push.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_key_is_found_through_the_unique_index() {
    let backend = testing::connect(testing::options()).await;
    keep_finished(&backend, FINISHED).await;
    let holder = backend
        .push(NewJob::new("k", &json!({})).unique_key("key"))
        .await
        .expect("push")
        .id();
    let duplicate = backend
        .push(NewJob::new("k", &json!({})).unique_key("key"))
        .await
        .expect("push");
    assert_eq!(duplicate.id(), holder);
    assert!(duplicate.is_duplicate());
    let (read, plan) = explain(&backend, &backend.inner.sql.find_key_holder, |q| {
        q.bind("default").bind("key")
    })
    .await;
    // Once the holder has finished, the look-up finds it all the same (a
    // push that gave up on the key as the holder finished reports it).
    let leased = backend
        .pull(&PullRequest::queue("default"))
        .await
        .expect("pull");
    backend
        .complete(&leased[0].lease, None)
        .await
        .expect("complete");
    let finished: Option<i64> = sqlx::query_scalar(backend.inner.sql.find_key_holder.clone())
        .bind("default")
        .bind("key")
        .fetch_optional(backend.pool())
        .await
        .expect("look-up");
    testing::drop_schema(backend.schema()).await;
    assert!(read <= 1.0, "the look-up read {read} rows:\n{plan:#}");
    assert_eq!(finished, Some(holder));
}

/// A clean is planned with its values for every chunk: prepared, it was
/// given a generic plan after five chunks, which cannot use the index on
/// finished jobs (the status is a parameter) and scanned the whole table
/// for each chunk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_is_planned_with_its_values() {
    let backend = testing::connect(testing::options().max_connections(1)).await;
    keep_finished(&backend, FINISHED).await;
    // With a cutoff before every job, a chunk reads none of them: the
    // statement, its values bound, walks the index on finished jobs.
    let two_days_ago = time::OffsetDateTime::now_utc() - time::Duration::days(2);
    let (read, plan) = explain(&backend, &backend.inner.sql.clean, |q| {
        q.bind("done").bind(Some(two_days_ago)).bind(10_000_i64)
    })
    .await;
    assert!(read <= 1.0, "a chunk read {read} rows:\n{plan:#}");
    let deleted = backend
        .clean(JobStatus::Done, time::OffsetDateTime::now_utc())
        .await
        .expect("clean");
    assert_eq!(deleted, FINISHED as u64);
    // The pool's one connection, which made every chunk. (The pattern is
    // built so that this statement, prepared too, does not match it.)
    let mut conn = backend.pool().acquire().await.expect("connection");
    let prepared: Vec<String> = sqlx::query_scalar(
        "SELECT statement FROM pg_prepared_statements \
         WHERE statement LIKE '%' || 'DELETE' || ' FROM%'",
    )
    .fetch_all(&mut *conn)
    .await
    .expect("prepared statements");
    drop(conn);
    testing::drop_schema(backend.schema()).await;
    assert!(prepared.is_empty(), "clean was prepared: {prepared:?}");
}
