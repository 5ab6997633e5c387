//! The workloads of WORKLOAD.md.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use relayq::{Backend, JobType, NewJob};
use serde::{Deserialize, Serialize};

use crate::report::{Latencies, Line};

/// Microseconds on a monotonic clock shared by the whole process, so the
/// enqueue time in a payload and the handler's start time compare exactly.
pub(crate) fn monotonic_us() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// WORKLOAD.md's ~100-byte payload: the typed job both the enqueue side
/// and the handler use, as an application would.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct SendEmail {
    #[serde(rename = "type")]
    pub(crate) kind: String,
    pub(crate) seq: u64,
    pub(crate) enq_us: u64,
    pub(crate) to: String,
    pub(crate) pad: String,
}

impl JobType for SendEmail {
    const KIND: &'static str = "send_email";
}

/// Job `seq`, stamped just before the enqueue call.
pub(crate) fn job(seq: u64) -> NewJob {
    SendEmail {
        kind: SendEmail::KIND.to_owned(),
        seq,
        enq_us: monotonic_us(),
        to: "user@example.com".to_owned(),
        pad: "xxxxxxxxx".to_owned(),
    }
    .to_job()
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

/// N jobs in calls of `batch`, from `tasks` concurrent tasks (each sends
/// its calls one after another).
pub(crate) async fn enqueue_batch(
    label: &str,
    backend: Arc<dyn Backend>,
    n: u64,
    batch: u64,
    tasks: u64,
) -> Result<Line, String> {
    let calls = n.div_ceil(batch);
    let started = Instant::now();
    let mut handles = Vec::new();
    for t in 0..tasks.min(calls).max(1) {
        let backend = backend.clone();
        handles.push(tokio::spawn(async move {
            let mut latencies = Latencies::with_capacity((calls / tasks + 1) as usize);
            let mut call = t;
            while call < calls {
                let start = call * batch;
                let jobs: Vec<NewJob> = (start..(start + batch).min(n)).map(job).collect();
                let sent = Instant::now();
                backend.push_batch(jobs).await.map_err(|e| e.to_string())?;
                latencies.record(sent.elapsed());
                call += tasks;
            }
            Ok::<_, String>(latencies)
        }));
    }
    let mut latencies = Latencies::with_capacity(calls as usize);
    for handle in handles {
        latencies.extend(handle.await.map_err(|e| e.to_string())??);
    }
    let took = started.elapsed();
    let stored = count_jobs(backend.as_ref()).await?;
    let mut line = Line::new(label, "enqueue_batch")
        .rate(n as usize, took)
        .with("n", n)
        .with("batch", batch)
        .with("tasks", tasks)
        .check(stored == n, format!("stored {stored} of {n}"));
    line.latencies = latencies;
    Ok(line)
}

/// How long a workload may run before the benchmark gives up on it.
pub(crate) const WORKLOAD_DEADLINE: Duration = Duration::from_secs(600);
