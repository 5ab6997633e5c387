//! relayq-bench: runs one workload of the standard workload
//! (`shared/WORKLOAD.md`) against one backend, on a fresh store, and prints
//! one line: `<label> <workload> jobs_per_s=.. p50_ms=.. p99_ms=.. [k=v ...]`.
//!
//! `bench/run` runs every workload, each in its own process, next to the
//! raw-SQL baseline, and prints relayq ÷ baseline.

#[cfg(feature = "postgres")]
mod client;
mod cpu;
mod processing;
mod report;
mod store;
mod workloads;

use std::process::ExitCode;

use clap::Parser;

/// One workload of WORKLOAD.md, or one of the two client lines printed
/// beside its baseline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Workload {
    /// N jobs, one per call, from 8 concurrent tasks.
    Enqueue,
    /// N jobs in calls of 1,000, from 8 concurrent tasks (as many as the
    /// pgbench clients of its baseline).
    EnqueueBatch,
    /// N jobs enqueued beforehand, drained by a worker with concurrency 16.
    Process,
    /// 200 jobs pushed 50 ms apart to an idle worker; enqueue-to-start latency.
    Latency,
    /// N jobs (WORKLOAD.md: 1,000,000) processed while more are enqueued.
    Sustained,
    /// Not relayq: N single-row inserts into relayq's table from `--tasks`
    /// tasks, each on a connection of its own, through tokio and sqlx
    /// (PostgreSQL only): what a Rust client making one statement per job
    /// does, beside pgbench's `insert1` (see `client.rs`).
    ClientInsert1,
    /// Not relayq: 200 single-row inserts 50 ms apart on one connection
    /// (PostgreSQL only): the cost of one commit on an idle server. A job
    /// of the `latency` workload waits for its push's insert (committed
    /// without a flush, with its notification) and its claim's commit.
    ClientIdleInsert1,
}

/// WORKLOAD.md's `latency`: 200 jobs, …
const LATENCY_JOBS: u64 = 200;
/// … 50 ms apart.
const LATENCY_GAP: std::time::Duration = std::time::Duration::from_millis(50);

#[derive(Debug, Parser)]
#[command(about = "relayq's standard workload, one workload per process")]
struct Args {
    /// Backend to measure.
    #[arg(long, value_enum)]
    backend: store::Kind,
    /// Workload to run.
    #[arg(long, value_enum)]
    workload: Workload,
    /// Number of jobs (WORKLOAD.md: 50,000).
    #[arg(long, default_value_t = 50_000)]
    jobs: u64,
    /// PostgreSQL server for the postgres backend.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    url: String,
    /// Concurrent tasks sending the calls of `enqueue`, `enqueue-batch`
    /// and `client-insert1` (WORKLOAD.md's enqueue: 8).
    #[arg(long, default_value_t = 8)]
    tasks: u64,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    // The workload runs in a task, as an application's code does (a request
    // handler that enqueues, say), not in `block_on`'s future on the main
    // thread: every wake-up from there reaches the runtime's threads
    // through its injection queue and a thread unpark, which would add
    // ~50 µs of harness to each memory latency figure.
    let workload = tokio::spawn(async move { run(&args).await });
    match workload
        .await
        .unwrap_or_else(|e| Err(format!("the workload panicked: {e}")))
    {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(2),
        Err(e) => {
            eprintln!("relayq-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: &Args) -> Result<bool, String> {
    let label = args.backend.label();
    // The latency workload's jobs come one at a time after a settle: its
    // pools open as they are used, as a quiet application's do (a pool
    // opened to its size beforehand hands each statement to the connection
    // idle longest, a server process asleep: measured, 0.3-0.5 ms more p50
    // and twice the p99, see BENCHMARKS.md).
    let warm = !matches!(args.workload, Workload::Latency);
    let store = store::open(args.backend, &args.url, warm).await?;
    let backend = store.backend.clone();
    let work = async {
        match args.workload {
            Workload::Enqueue => workloads::enqueue(label, backend, args.jobs, args.tasks).await,
            Workload::EnqueueBatch => {
                workloads::enqueue_batch(label, backend, args.jobs, 1_000, args.tasks).await
            }
            Workload::Process => {
                processing::process(label, backend, args.jobs, store.settle()).await
            }
            Workload::Latency => {
                let pusher = store.peer().await?;
                let line = processing::latency(
                    label,
                    backend,
                    &pusher,
                    args.jobs.min(LATENCY_JOBS),
                    LATENCY_GAP,
                )
                .await;
                pusher.close().await;
                line
            }
            Workload::Sustained => processing::sustained(label, backend, args.jobs).await,
            Workload::ClientInsert1 | Workload::ClientIdleInsert1 => {
                client_line(&store, args).await
            }
        }
    };
    // A Ctrl-C ends the workload, not the process, so that its schema or
    // file is removed all the same.
    let interrupted = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let outcome = tokio::select! {
        timed = tokio::time::timeout(workloads::WORKLOAD_DEADLINE, work) => timed.map_err(|_| {
            format!(
                "workload did not finish within {:?}",
                workloads::WORKLOAD_DEADLINE
            )
        }),
        () = interrupted => Err("interrupted".to_owned()),
    };
    store.close().await;
    let mut line = outcome??;
    println!("{}", line.render());
    Ok(line.passed())
}

#[cfg(feature = "postgres")]
async fn client_line(store: &store::Store, args: &Args) -> Result<report::Line, String> {
    let backend = store
        .postgres()
        .ok_or("the client lines run on the postgres backend only")?;
    match args.workload {
        Workload::ClientIdleInsert1 => {
            client::idle_insert1(backend, args.jobs.min(LATENCY_JOBS), LATENCY_GAP).await
        }
        Workload::ClientInsert1 => client::insert1(backend, args.jobs, args.tasks).await,
        other => Err(format!("{other:?} is not a client line")),
    }
}

#[cfg(not(feature = "postgres"))]
async fn client_line(_: &store::Store, _: &Args) -> Result<report::Line, String> {
    Err("the client lines need the bench crate's `postgres` feature".to_owned())
}
