//! The workloads of WORKLOAD.md.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use relayq::{Backend, NewJob};
use serde_json::{Value, json};

use crate::report::{Latencies, Line};

/// Microseconds on a monotonic clock shared by the whole process, so the
/// enqueue time in a payload and the handler's start time compare exactly.
pub(crate) fn monotonic_us() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// The ~100-byte payload of WORKLOAD.md, stamped just before the enqueue call.
pub(crate) fn payload(seq: u64) -> Value {
    json!({
        "type": "send_email",
        "seq": seq,
        "enq_us": monotonic_us(),
        "to": "user@example.com",
        "pad": "xxxxxxxxx",
    })
}

pub(crate) fn job(seq: u64) -> NewJob {
    NewJob::new("send_email", &payload(seq))
}

async fn count_jobs(backend: &dyn Backend) -> Result<u64, String> {
    let stats = backend.stats().await.map_err(|e| e.to_string())?;
    Ok(stats.queues.values().map(|c| c.total()).sum())
}

/// N jobs, one per call, from `tasks` concurrent tasks.
pub(crate) async fn enqueue(
    label: &str,
    backend: Arc<dyn Backend>,
    n: u64,
    tasks: u64,
) -> Result<Line, String> {
    let started = Instant::now();
    let mut handles = Vec::new();
    for t in 0..tasks {
        let backend = backend.clone();
        handles.push(tokio::spawn(async move {
            let mut latencies = Latencies::with_capacity((n / tasks + 1) as usize);
            let mut seq = t;
            while seq < n {
                let call = Instant::now();
                backend.push(job(seq)).await.map_err(|e| e.to_string())?;
                latencies.record(call.elapsed());
                seq += tasks;
            }
            Ok::<_, String>(latencies)
        }));
    }
    let mut latencies = Latencies::with_capacity(n as usize);
    for handle in handles {
        latencies.extend(handle.await.map_err(|e| e.to_string())??);
    }
    let took = started.elapsed();
    let stored = count_jobs(backend.as_ref()).await?;
    let mut line = Line::new(label, "enqueue")
        .rate(n as usize, took)
        .with("n", n)
        .with("tasks", tasks)
        .check(stored == n, format!("stored {stored} of {n}"));
    line.latencies = latencies;
    Ok(line)
}

/// N jobs in calls of `batch`, one call at a time.
pub(crate) async fn enqueue_batch(
    label: &str,
    backend: Arc<dyn Backend>,
    n: u64,
    batch: u64,
) -> Result<Line, String> {
    let started = Instant::now();
    let mut latencies = Latencies::with_capacity((n / batch + 1) as usize);
    let mut seq = 0;
    while seq < n {
        let end = (seq + batch).min(n);
        let jobs: Vec<NewJob> = (seq..end).map(job).collect();
        let call = Instant::now();
        backend.push_batch(jobs).await.map_err(|e| e.to_string())?;
        latencies.record(call.elapsed());
        seq = end;
    }
    let took = started.elapsed();
    let stored = count_jobs(backend.as_ref()).await?;
    let mut line = Line::new(label, "enqueue_batch")
        .rate(n as usize, took)
        .with("n", n)
        .with("batch", batch)
        .check(stored == n, format!("stored {stored} of {n}"));
    line.latencies = latencies;
    Ok(line)
}

/// How long a workload may run before the benchmark gives up on it.
pub(crate) const WORKLOAD_DEADLINE: Duration = Duration::from_secs(600);
