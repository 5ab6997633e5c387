//! A relayq worker process for the crash, fault and load harnesses
//! (see `relayq_reliability::crash`): runs `CrashJob`s against PostgreSQL
//! or a SQLite file until SIGTERM.
//!
//! ```text
//! relayq-crash-worker --postgres URL --schema S --app NAME | --sqlite URL
//!     --worker-id N --concurrency N --lease-ms N --poll-ms N --pool N
//!     --sleep-min-ms N --sleep-max-ms N --long-one-in N --long-min-ms N
//!     --long-max-ms N --mode ledger|count --failpoint-one-in N
//! ```

use std::process::ExitCode;

use relayq_reliability::crash::{WorkerArgs, run_worker};

fn main() -> ExitCode {
    let args = match WorkerArgs::parse(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("relayq-crash-worker: {e}");
            return ExitCode::from(2);
        }
    };
    // The worker's warnings (a slow or failed lease renewal, say) go to
    // its log, which the harness shows when a run's outcome is wrong.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(tracing_subscriber::filter::LevelFilter::WARN)
        .with_ansi(false)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("relayq-crash-worker: runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run_worker(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("relayq-crash-worker: {e}");
            ExitCode::FAILURE
        }
    }
}
