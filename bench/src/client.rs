//! Raw single-row inserts sent by this process's own client stack (tokio
//! and sqlx, as relayq uses), beside pgbench's baseline.
//!
//! - [`insert1`]: pgbench is a lean C client. With the 8 clients of the
//!   `insert1` baseline competing with PostgreSQL for two cores, the
//!   client's own cost per statement shows in the baseline's figure. This
//!   sends the same kind of statement (one job row, autocommit) from 8
//!   tasks, each on a pooled connection it holds, into relayq's own table:
//!   the limit for a Rust client making one statement per job, which
//!   relayq's `enqueue` (folding concurrent pushes into shared statements)
//!   is compared with.
//! - [`idle_insert1`]: one such insert at a time on an idle server, the
//!   cost of one durable commit there; a job of the `latency` workload
//!   waits for two.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use relayq_postgres::PgBackend;
use relayq_postgres::sqlx::{self, AssertSqlSafe, types::Json};
use tokio::task::JoinSet;

use crate::report::{Latencies, Line};
use crate::workloads::{SendEmail, payload};

/// The statement [`insert1`] sends, in relayq's table of `backend`.
fn statement(backend: &PgBackend) -> String {
    format!(
        "INSERT INTO \"{}\".jobs (queue, kind, payload, max_attempts, run_at, created_at, updated_at) \
         VALUES ('default', 'send_email', $1, 25, now(), now(), now())",
        backend.schema()
    )
}

/// `n` single-row inserts from `tasks` tasks, each holding a connection
/// opened before the clock starts (pgbench leaves its connecting out too).
pub(crate) async fn insert1(backend: &PgBackend, n: u64, tasks: u64) -> Result<Line, String> {
    let statement = Arc::new(statement(backend));
    let tasks = tasks.clamp(1, n.max(1));
    let mut connections = Vec::new();
    for _ in 0..tasks {
        connections.push(backend.pool().acquire().await.map_err(|e| e.to_string())?);
    }
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut running = JoinSet::new();
    for mut conn in connections {
        let (next, statement) = (Arc::clone(&next), Arc::clone(&statement));
        running.spawn(async move {
            let mut latencies = Latencies::with_capacity((n / tasks + 1) as usize);
            loop {
                let seq = next.fetch_add(1, Ordering::Relaxed);
                if seq >= n {
                    break;
                }
                let job: SendEmail = payload(seq);
                let sent = Instant::now();
                sqlx::query(AssertSqlSafe(statement.as_str()))
                    .bind(Json(&job))
                    .execute(&mut *conn)
                    .await
                    .map_err(|e| e.to_string())?;
                latencies.record(sent.elapsed());
            }
            Ok::<_, String>(latencies)
        });
    }
    let mut latencies = Latencies::with_capacity(n as usize);
    while let Some(joined) = running.join_next().await {
        latencies.extend(joined.map_err(|e| e.to_string())??);
    }
    let took = started.elapsed();
    let stored: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT count(*) FROM \"{}\".jobs",
        backend.schema()
    )))
    .fetch_one(backend.pool())
    .await
    .map_err(|e| e.to_string())?;
    let mut line = Line::new("baseline", "client_insert1")
        .rate(n as usize, took)
        .with("n", n)
        .with("tasks", tasks)
        .check(stored == n as i64, format!("stored {stored} of {n}"));
    line.latencies = latencies;
    Ok(line)
}

/// `n` single-row inserts one at a time, `gap` apart, on one held
/// connection: what one durable commit costs when the server is otherwise
/// idle, as in the `latency` workload, where a job waits for two (its
/// push, then its claim).
pub(crate) async fn idle_insert1(
    backend: &PgBackend,
    n: u64,
    gap: Duration,
) -> Result<Line, String> {
    let statement = statement(backend);
    let mut conn = backend.pool().acquire().await.map_err(|e| e.to_string())?;
    let mut latencies = Latencies::with_capacity(n as usize);
    for seq in 0..n {
        let job: SendEmail = payload(seq);
        let sent = Instant::now();
        sqlx::query(AssertSqlSafe(statement.as_str()))
            .bind(Json(&job))
            .execute(&mut *conn)
            .await
            .map_err(|e| e.to_string())?;
        latencies.record(sent.elapsed());
        tokio::time::sleep(gap).await;
    }
    let mut line = Line::new("baseline", "client_idle_insert1")
        .with("n", n)
        .with("gap_ms", gap.as_millis());
    line.latencies = latencies;
    Ok(line)
}
