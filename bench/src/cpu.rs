//! The CPU time this process has spent, to report the CPU a workload
//! costs per job beside its throughput. Throughput on this box moves with
//! how much of its two cores the host lends it; CPU time per job moves far
//! less, so two builds (or relayq and a peer) compare on it where their
//! rates are within the noise.
//!
//! The process's CPU clock (`CLOCK_PROCESS_CPUTIME_ID`, through rustix, as
//! the standard library offers none and this crate uses no `unsafe`):
//! every thread's time, those that exited included, to the nanosecond.

use std::time::Duration;

/// The CPU time the process has spent so far.
pub(crate) fn process_cpu() -> Duration {
    let spent = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    let secs = u64::try_from(spent.tv_sec).unwrap_or(0);
    let nanos = u32::try_from(spent.tv_nsec).unwrap_or(0);
    Duration::new(secs, nanos)
}

/// CPU microseconds per job between two [`process_cpu`] readings.
pub(crate) fn per_job_us(from: Duration, to: Duration, jobs: u64) -> String {
    if jobs == 0 || to <= from {
        return "NA".to_owned();
    }
    format!("{:.3}", (to - from).as_secs_f64() * 1e6 / jobs as f64)
}
