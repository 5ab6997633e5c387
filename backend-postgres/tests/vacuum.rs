//! The backend vacuums its jobs table as it churns (see
//! `PgOptions::vacuum_threshold`), so claims do not slow down between
//! autovacuum runs, or where autovacuum is off.

use relayq_postgres::testing;

use std::time::{Duration as StdDuration, Instant};

use relayq_core::{Completion, NewJob, PullRequest, Puller, Pusher};
use relayq_postgres::PgBackend;
use serde_json::json;

/// A liveness bound for the background VACUUM to be seen.
const VACUUM_DEADLINE: StdDuration = StdDuration::from_secs(30);

/// Pushes, claims and completes `n` jobs: 2n changed rows.
async fn churn(backend: &PgBackend, n: i64) {
    let jobs = (0..n)
        .map(|i| NewJob::new("k", &json!({ "i": i })))
        .collect();
    backend.push_batch(jobs).await.expect("push");
    let request = PullRequest::queues(["default"]).batch(u32::try_from(n).expect("n"));
    let leased = backend.pull(&request).await.expect("pull");
    assert_eq!(leased.len() as i64, n);
    let completions = leased.iter().map(|l| Completion::from(l.lease)).collect();
    let lost = backend.complete_batch(completions).await.expect("complete");
    assert!(lost.is_empty(), "{lost:?}");
}

/// How many times the server has vacuumed the schema's jobs table by hand
/// (not autovacuum).
async fn vacuum_count(backend: &PgBackend) -> i64 {
    sqlx::query_scalar(
        "SELECT vacuum_count FROM pg_stat_user_tables WHERE schemaname = $1 AND relname = 'jobs'",
    )
    .bind(backend.schema())
    .fetch_one(backend.pool())
    .await
    .expect("pg_stat_user_tables")
}

#[tokio::test]
async fn the_jobs_table_is_vacuumed_once_enough_rows_changed() {
    let backend = testing::connect(testing::options().vacuum_threshold(Some(100))).await;
    assert_eq!(vacuum_count(&backend).await, 0);

    // 40 claims and 40 completions: under the threshold, nothing starts.
    churn(&backend, 40).await;
    assert_eq!(vacuum_count(&backend).await, 0);
    // 10 claims, then 10 completions: the last one crosses it.
    churn(&backend, 10).await;
    let started = Instant::now();
    while vacuum_count(&backend).await == 0 {
        assert!(
            started.elapsed() < VACUUM_DEADLINE,
            "no VACUUM within {VACUUM_DEADLINE:?} of crossing the threshold"
        );
        tokio::time::sleep(StdDuration::from_millis(50)).await;
    }
    testing::drop_schema(backend.schema()).await;
}
