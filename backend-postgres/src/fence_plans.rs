//! Tests of the acknowledgement statements' plans (see `sql::COMPLETE`):
//! each reads the rows it names, not every leased job, whatever the
//! planner's statistics say about how many are leased.

use relayq_core::{Lease, NewJob, PullRequest, Puller, Pusher};
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

/// Jobs leased when the statements are planned.
const LEASED: usize = 3_000;

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

/// Runs `sql` under `EXPLAIN ANALYZE` in a transaction rolled back (so
/// nothing changes), with `now` as `$1` and what `bind` adds, and returns
/// the rows it read from the jobs table and its plan.
async fn explain(
    backend: &PgBackend,
    sql: &SqlStr,
    bind: impl FnOnce(Bound) -> Bound,
) -> (f64, Value) {
    let explained = AssertSqlSafe(format!("EXPLAIN (ANALYZE, FORMAT JSON) {}", sql.as_str()));
    let query = bind(sqlx::query(explained).bind(backend.now()));
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
            bind(q.bind(lease.job_id).bind(lease.token))
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
        q.bind(ids.clone()).bind(tokens.clone()).bind(results)
    })
    .await;
    if read > 20.0 {
        over.push(format!("complete_batch read {read} rows:\n{plan:#}"));
    }
    let (read, plan) = explain(&backend, &sql.extend_batch, |q| {
        q.bind(ids).bind(tokens).bind(micros)
    })
    .await;
    if read > 20.0 {
        over.push(format!("extend_batch read {read} rows:\n{plan:#}"));
    }
    testing::drop_schema(&schema).await;
    assert!(over.is_empty(), "{}", over.join("\n"));
}
