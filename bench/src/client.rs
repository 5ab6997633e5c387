//! Single-row inserts sent by this process's own client stack (tokio and
//! sqlx, as relayq uses), printed as `client` lines beside pgbench's
//! baseline. They are not workloads of WORKLOAD.md: they show what limits
//! relayq's PostgreSQL figures on this machine.
//!
//! - [`insert1`]: pgbench is a lean C client. With the 8 clients of the
//!   `insert1` baseline competing with PostgreSQL for two cores, the
//!   client's own cost per statement shows in the baseline's figure. This
//!   makes one plain insert of a job row per call, autocommit, from 8
//!   tasks, each on a pooled connection it holds, into relayq's own table:
//!   what a Rust client making one statement per job does. relayq's
//!   `enqueue` makes fewer statements (it folds concurrent pushes).
//! - [`idle_insert1`]: one such insert at a time on an idle server: the
//!   cost of one commit there (a durable one on a durable server, as
//!   `bench/run --stock` uses). A job of the `latency` workload waits for
//!   two: its push, then its claim.

use std::time::{Duration, Instant};

use relayq::{DEFAULT_MAX_ATTEMPTS, DEFAULT_QUEUE, JobType};
use relayq_postgres::PgBackend;
use relayq_postgres::sqlx::{self, AssertSqlSafe, SqlSafeStr, SqlStr};

use crate::report::{Latencies, Line};
use crate::store::jobs_table;
use crate::workloads::{SendEmail, payload, spread_with, stored_all};

/// The insert both make, into relayq's table of `backend`.
fn statement(backend: &PgBackend) -> SqlStr {
    AssertSqlSafe(format!(
        "INSERT INTO {} (queue, kind, payload, max_attempts, run_at, created_at, updated_at) \
         VALUES ($1, $2, $3::json, $4, now(), now(), now())",
        jobs_table(backend)
    ))
    .into_sql_str()
}

/// Inserts job `seq` with `statement` on `conn`.
async fn insert(statement: SqlStr, conn: &mut sqlx::PgConnection, seq: u64) -> Result<(), String> {
    // The payload's text, as relayq sends it (a `Json` would be bound as
    // `jsonb`, and parsed and printed again on its way into the column).
    let job = serde_json::to_string(&payload(seq)).map_err(|e| e.to_string())?;
    sqlx::query(statement)
        .bind(DEFAULT_QUEUE)
        .bind(SendEmail::KIND)
        .bind(job)
        .bind(DEFAULT_MAX_ATTEMPTS)
        .execute(conn)
        .await
        .map(drop)
        .map_err(|e| e.to_string())
}

/// `n` single-row inserts from `tasks` tasks, each holding a connection
/// opened before the clock starts (pgbench leaves its connecting out too).
pub(crate) async fn insert1(backend: &PgBackend, n: u64, tasks: u64) -> Result<Line, String> {
    let statement = statement(backend);
    let tasks = tasks.clamp(1, n.max(1));
    let pool = backend.pool();
    if tasks > u64::from(pool.options().get_max_connections()) {
        return Err(format!(
            "client-insert1 holds a connection per task: {tasks} tasks need more than the pool's {}",
            pool.options().get_max_connections()
        ));
    }
    let mut connections = Vec::new();
    for _ in 0..tasks {
        connections.push(pool.acquire().await.map_err(|e| e.to_string())?);
    }
    let started = Instant::now();
    let latencies = spread_with(n, connections, move |mut conn, seq| {
        let statement = statement.clone();
        async move {
            insert(statement, &mut conn, seq).await?;
            Ok(conn)
        }
    })
    .await?;
    let line = Line::new("client", "client_insert1")
        .with("n", n)
        .with("tasks", tasks);
    stored_all(line, backend, n, started, latencies).await
}

/// `n` single-row inserts one at a time, `gap` apart, on one held
/// connection.
pub(crate) async fn idle_insert1(
    backend: &PgBackend,
    n: u64,
    gap: Duration,
) -> Result<Line, String> {
    let statement = statement(backend);
    let mut conn = backend.pool().acquire().await.map_err(|e| e.to_string())?;
    let mut latencies = Latencies::with_capacity(n as usize);
    for seq in 0..n {
        let sent = Instant::now();
        insert(statement.clone(), &mut conn, seq).await?;
        latencies.record(sent.elapsed());
        tokio::time::sleep(gap).await;
    }
    let mut line = Line::new("client", "client_idle_insert1")
        .with("n", n)
        .with("gap_ms", gap.as_millis());
    line.latencies = latencies;
    Ok(line)
}
