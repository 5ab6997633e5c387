//! The CPU time this process's threads have spent, to report the CPU a
//! workload costs per job beside its throughput. Throughput on this box
//! moves with how much of its two cores the host lends it; CPU time per
//! job moves far less, so two builds (or relayq and a peer) compare on it
//! where their rates are within the noise.
//!
//! Read from `/proc/self/task/*/schedstat` (nanoseconds each thread has
//! run), as the standard library offers no process CPU clock and this
//! crate uses no `unsafe`. Threads that exit during the window take their
//! time with them; the runtime's worker threads, which run the workload,
//! live as long as the process. Elsewhere than Linux: `None`.

use std::time::Duration;

/// The CPU time of the process's live threads so far, if it can be read.
pub(crate) fn process_cpu() -> Option<Duration> {
    let mut total = 0u64;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let stat = std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok()?;
        let ran: u64 = stat.split_whitespace().next()?.parse().ok()?;
        total += ran;
    }
    Some(Duration::from_nanos(total))
}

/// CPU microseconds per job between two [`process_cpu`] readings.
pub(crate) fn per_job_us(from: Option<Duration>, to: Option<Duration>, jobs: u64) -> String {
    match (from, to) {
        (Some(from), Some(to)) if jobs > 0 && to >= from => {
            format!("{:.3}", (to - from).as_secs_f64() * 1e6 / jobs as f64)
        }
        _ => "NA".to_owned(),
    }
}
