//! The workloads of WORKLOAD.md.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use relayq::{Backend, JobType, ListFilter, MAX_LIST_LIMIT, NewJob};
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;

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

/// The payload of job `seq`, stamped now.
pub(crate) fn payload(seq: u64) -> SendEmail {
    SendEmail {
        kind: SendEmail::KIND.to_owned(),
        seq,
        enq_us: monotonic_us(),
        to: "user@example.com".to_owned(),
        pad: "xxxxxxxxx".to_owned(),
    }
}

/// Job `seq`, stamped just before the enqueue call.
pub(crate) fn job(seq: u64) -> NewJob {
    payload(seq).to_job()
}

/// What the store holds after an enqueue run of jobs `0..n`.
struct Census {
    /// Jobs stored.
    stored: u64,
    /// Distinct `seq`s among them, of `0..n`.
    distinct: u64,
}

/// Walks every stored job (untimed), so a job stored twice and another
/// not at all cannot pass for `n` jobs.
async fn census(backend: &dyn Backend, n: u64) -> Result<Census, String> {
    let mut seen = vec![false; usize::try_from(n).map_err(|e| e.to_string())?];
    let (mut stored, mut distinct) = (0, 0);
    let mut after = None;
    loop {
        let page = backend
            .list(&ListFilter::new().after(after).limit(MAX_LIST_LIMIT))
            .await
            .map_err(|e| e.to_string())?;
        for job in &page.jobs {
            stored += 1;
            let slot = job
                .payload
                .get("seq")
                .and_then(serde_json::Value::as_u64)
                .and_then(|seq| seen.get_mut(usize::try_from(seq).ok()?));
            if let Some(slot) = slot
                && !std::mem::replace(slot, true)
            {
                distinct += 1;
            }
        }
        match page.next {
            Some(next) => after = Some(next),
            None => return Ok(Census { stored, distinct }),
        }
    }
}

/// N jobs, one per call, from `tasks` concurrent tasks.
pub(crate) async fn enqueue(
    label: &str,
    backend: Arc<dyn Backend>,
    n: u64,
    tasks: u64,
) -> Result<Line, String> {
    let started = Instant::now();
    let pusher = Arc::clone(&backend);
    let (latencies, tasks) = spread(n, tasks, move |seq| {
        let backend = Arc::clone(&pusher);
        // Built in the timed call: `enq_us` is stamped just before the push.
        async move { backend.push(job(seq)).await.map(drop) }
    })
    .await?;
    let line = Line::new(label, "enqueue")
        .with("n", n)
        .with("tasks", tasks);
    stored_all(line, backend.as_ref(), n, started, latencies).await
}

/// N jobs in calls of `batch`, from `tasks` concurrent tasks.
pub(crate) async fn enqueue_batch(
    label: &str,
    backend: Arc<dyn Backend>,
    n: u64,
    batch: u64,
    tasks: u64,
) -> Result<Line, String> {
    let started = Instant::now();
    let pusher = Arc::clone(&backend);
    let (latencies, tasks) = spread(n.div_ceil(batch), tasks, move |call| {
        let backend = Arc::clone(&pusher);
        let first = call * batch;
        let jobs: Vec<NewJob> = (first..(first + batch).min(n)).map(job).collect();
        async move { backend.push_batch(jobs).await.map(drop) }
    })
    .await?;
    let line = Line::new(label, "enqueue_batch")
        .with("n", n)
        .with("batch", batch)
        .with("tasks", tasks);
    stored_all(line, backend.as_ref(), n, started, latencies).await
}

/// Makes calls `0..calls` from `tasks` concurrent tasks (at least one, at
/// most one per call), each task taking the next call no task has taken
/// once its last one returned, like pgbench's clients, which each start
/// their next transaction as soon as one ends; returns how long each took
/// from the moment `call` handed over its future (what `call` does before
/// returning it is not timed), and how many tasks made them. The first
/// failure stops every task.
///
/// Taking calls in turn, not in fixed shares (task `t` making calls `t`,
/// `t + tasks`, …), keeps every task busy to the end: with 50 calls of
/// 1,000 jobs from 8 tasks, fixed shares left one task making a seventh
/// call of ~40 ms while the others had ended (measured: the last 40 ms of
/// a 280 ms run at a quarter of the concurrency).
async fn spread<F, Fut>(calls: u64, tasks: u64, call: F) -> Result<(Latencies, u64), String>
where
    F: Fn(u64) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = relayq::Result<()>> + Send,
{
    let tasks = tasks.clamp(1, calls.max(1));
    let states = (0..tasks).map(|_| ()).collect();
    let latencies = spread_with(calls, states, move |(), i| {
        let made = call(i);
        async move { made.await.map_err(|e| e.to_string()) }
    })
    .await?;
    Ok((latencies, tasks))
}

/// [`spread`] from one task per element of `states`, each passing its
/// state (a connection it holds, say) from call to call.
pub(crate) async fn spread_with<S, F, Fut>(
    calls: u64,
    states: Vec<S>,
    call: F,
) -> Result<Latencies, String>
where
    S: Send + 'static,
    F: Fn(S, u64) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<S, String>> + Send,
{
    if states.is_empty() {
        return Err("no task to make the calls".to_owned());
    }
    let next = Arc::new(AtomicU64::new(0));
    let per_task = calls / states.len() as u64 + 1;
    let mut running = JoinSet::new();
    for state in states {
        let call = call.clone();
        let next = Arc::clone(&next);
        running.spawn(async move {
            let mut latencies = Latencies::with_capacity(per_task as usize);
            let mut state = Some(state);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= calls {
                    break;
                }
                let made = call(state.take().expect("returned by the last call"), i);
                let sent = Instant::now();
                state = Some(made.await?);
                latencies.record(sent.elapsed());
            }
            Ok::<_, String>(latencies)
        });
    }
    let mut latencies = Latencies::with_capacity(calls as usize);
    // Returning early drops the set, which aborts the tasks still running.
    while let Some(joined) = running.join_next().await {
        latencies.extend(joined.map_err(|e| e.to_string())??);
    }
    Ok(latencies)
}

/// `line` with the rate of `n` jobs since `started` and its per-call
/// `latencies`, checked against the jobs the store holds.
pub(crate) async fn stored_all(
    line: Line,
    backend: &dyn Backend,
    n: u64,
    started: Instant,
    latencies: Latencies,
) -> Result<Line, String> {
    let took = started.elapsed();
    let Census { stored, distinct } = census(backend, n).await?;
    let mut line = line
        .rate(n as usize, took)
        .check(stored == n, format!("stored {stored} of {n}"))
        .check(distinct == n, format!("{distinct} of {n} jobs stored"));
    line.latencies = latencies;
    Ok(line)
}

/// How long a workload may run before the benchmark gives up on it.
pub(crate) const WORKLOAD_DEADLINE: Duration = Duration::from_secs(600);
