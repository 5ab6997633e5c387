//! The workloads that run the worker: process, latency, sustained.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use relayq::{Backend, HandlerError, JobContext, NewJob, Worker};
use tokio::sync::Notify;

use crate::cpu;
use crate::report::{Latencies, Line};
use crate::store::Peer;
use crate::workloads::{SendEmail, job, monotonic_us};

/// The handler's bookkeeping: completions, a bitmap of seen `seq`s to catch
/// duplicate executions, and (for latency) enqueue-to-start times.
#[derive(Debug)]
struct Ledger {
    handled: AtomicU64,
    duplicates: AtomicU64,
    seen: Vec<AtomicU64>,
    target: u64,
    reached: Notify,
    /// Handled count at which each slice of the run ended, with its instant.
    slice_ends: Mutex<Vec<Instant>>,
    slice: u64,
    latencies: Mutex<Latencies>,
    record_latency: bool,
}

impl Ledger {
    /// A ledger for jobs of `seq` below `capacity`, whose run is timed
    /// until `n` are handled, in `slices` slices.
    fn new(capacity: u64, n: u64, slices: u64, record_latency: bool) -> Arc<Self> {
        Arc::new(Self {
            handled: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            seen: (0..capacity.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            target: n,
            reached: Notify::new(),
            slice_ends: Mutex::new(Vec::new()),
            slice: (n / slices.max(1)).max(1),
            latencies: Mutex::new(Latencies::default()),
            record_latency,
        })
    }

    fn record(&self, job: &SendEmail) {
        if self.record_latency {
            let waited = monotonic_us().saturating_sub(job.enq_us);
            self.latencies
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .record(Duration::from_micros(waited));
        }
        let bit = 1u64 << (job.seq % 64);
        let word = &self.seen[(job.seq / 64) as usize];
        if word.fetch_or(bit, Ordering::Relaxed) & bit != 0 {
            self.duplicates.fetch_add(1, Ordering::Relaxed);
        }
        let handled = self.handled.fetch_add(1, Ordering::AcqRel) + 1;
        if handled.is_multiple_of(self.slice) && handled <= self.target {
            self.slice_ends
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(Instant::now());
        }
        if handled == self.target {
            self.reached.notify_one();
        }
    }

    /// `line` with WORKLOAD.md's checks: every one of the `n` jobs
    /// handled, none twice.
    fn verdict(&self, line: Line, n: u64) -> Line {
        let handled = self.handled.load(Ordering::Acquire);
        let duplicates = self.duplicates.load(Ordering::Acquire);
        line.check(handled == n, format!("handled {handled} of {n}"))
            .check(
                duplicates == 0,
                format!("{duplicates} duplicate executions"),
            )
    }

    async fn wait(&self) {
        // notify_one stores a permit, so a target reached before we wait is not missed.
        self.reached.notified().await;
    }
}

fn worker(backend: Arc<dyn Backend>, ledger: Arc<Ledger>) -> Result<Worker<Arc<Ledger>>, String> {
    Worker::builder(backend)
        .state(ledger)
        .concurrency(16)
        .handle(|job: SendEmail, ctx: JobContext<Arc<Ledger>>| async move {
            ctx.state().record(&job);
            Ok::<_, HandlerError>(())
        })
        .build()
        .map_err(|e| e.to_string())
}

/// How long the store may take to show every handled job finished.
const RECORDING_DEADLINE: Duration = Duration::from_secs(60);

/// How the store stood once every job was finished, or when it gave up
/// waiting.
struct Finished {
    done: u64,
    dead: u64,
    /// When the store first showed `n` jobs finished; `None` if it did not
    /// within [`RECORDING_DEADLINE`].
    at: Option<Instant>,
}

impl Finished {
    /// Polls the store until `n` jobs are finished (done or dead).
    async fn wait(backend: &dyn Backend, n: u64) -> Result<Self, String> {
        let give_up = Instant::now() + RECORDING_DEADLINE;
        loop {
            let stats = backend.stats().await.map_err(|e| e.to_string())?;
            let (done, dead) = stats
                .queues
                .values()
                .fold((0, 0), |(done, dead), c| (done + c.done, dead + c.dead));
            let now = Instant::now();
            if done + dead >= n || now >= give_up {
                let at = (done + dead >= n).then_some(now);
                return Ok(Self { done, dead, at });
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// `line` with the store's check: every job done exactly once, none dead.
    fn verdict(&self, line: Line, n: u64) -> Line {
        let Self { done, dead, .. } = *self;
        line.check(
            done == n && dead == 0,
            format!("the store shows {done} of {n} done and {dead} dead"),
        )
    }
}

/// Enqueues `seq_range` in batches of 1,000, untimed.
async fn preload(backend: &dyn Backend, from: u64, to: u64) -> Result<(), String> {
    let mut seq = from;
    while seq < to {
        let end = (seq + 1_000).min(to);
        let jobs: Vec<NewJob> = (seq..end).map(job).collect();
        backend.push_batch(jobs).await.map_err(|e| e.to_string())?;
        seq = end;
    }
    Ok(())
}

/// N jobs enqueued beforehand, then a worker (concurrency 16) drains them.
pub(crate) async fn process(
    label: &str,
    backend: Arc<dyn Backend>,
    n: u64,
    settle: impl std::future::Future<Output = Result<(), String>>,
) -> Result<Line, String> {
    preload(backend.as_ref(), 0, n).await?;
    settle.await?;
    let ledger = Ledger::new(n, n, 1, false);
    let worker = worker(backend.clone(), ledger.clone())?;
    let cpu_before = cpu::process_cpu();
    let started = Instant::now();
    let running = worker.start();
    ledger.wait().await;
    let handled_in = started.elapsed();
    let cpu_after = cpu::process_cpu();
    let finished = Finished::wait(backend.as_ref(), n).await?;
    running.shutdown().await;
    let stored = finished.at.map_or("NA".to_owned(), |at| {
        format!("{:.0}", n as f64 / (at - started).as_secs_f64())
    });
    let handled = ledger.handled.load(Ordering::Acquire);
    let duplicates = ledger.duplicates.load(Ordering::Acquire);
    let line = Line::new(label, "process")
        .rate(n as usize, handled_in)
        .with("stored_jobs_per_s", stored)
        .with("cpu_us_per_job", cpu::per_job_us(cpu_before, cpu_after, n))
        .with("handled", handled)
        .with("duplicates", duplicates)
        .with("n", n);
    Ok(finished.verdict(ledger.verdict(line, n), n))
}

/// An idle worker on `backend`, then `n` jobs enqueued one at a time, `gap`
/// apart, through `pusher`: on PostgreSQL another backend value with a pool
/// of its own, as in another process, so the worker hears of each job
/// through LISTEN/NOTIFY, not from a push of its own backend.
pub(crate) async fn latency(
    label: &str,
    backend: Arc<dyn Backend>,
    pusher: &Peer,
    n: u64,
    gap: Duration,
) -> Result<Line, String> {
    let ledger = Ledger::new(n, n, 1, true);
    let worker = worker(backend.clone(), ledger.clone())?;
    let running = worker.start();
    tokio::time::sleep(Duration::from_secs(2)).await;
    for seq in 0..n {
        pusher
            .backend
            .push(job(seq))
            .await
            .map_err(|e| e.to_string())?;
        tokio::time::sleep(gap).await;
    }
    ledger.wait().await;
    let finished = Finished::wait(backend.as_ref(), n).await?;
    running.shutdown().await;
    let latencies = std::mem::take(
        &mut *ledger
            .latencies
            .lock()
            .unwrap_or_else(PoisonError::into_inner),
    );
    let mut line = Line::new(label, "latency")
        .with("n", n)
        .with("gap_ms", gap.as_millis())
        .with("woken_by", pusher.woken_by);
    line.latencies = latencies;
    Ok(finished.verdict(ledger.verdict(line, n), n))
}

/// `n` jobs processed while a producer keeps enqueuing, finished rows kept;
/// the rate of each tenth of the run shows decay as finished rows pile up.
/// The producer goes on until the `n`th job is handled, so the last tenth
/// runs under the same load as the others; the jobs it enqueued beyond `n`
/// (at most a backlog's worth and a batch) are run and checked too, after
/// the clock stopped.
pub(crate) async fn sustained(
    label: &str,
    backend: Arc<dyn Backend>,
    n: u64,
) -> Result<Line, String> {
    const BACKLOG: u64 = 20_000;
    const BATCH: u64 = 1_000;
    let backlog = n.min(BACKLOG);
    preload(backend.as_ref(), 0, backlog).await?;
    let ledger = Ledger::new(n + backlog + BATCH, n, 10, false);
    let worker = worker(backend.clone(), ledger.clone())?;
    let started = Instant::now();
    let running = worker.start();
    let producer = {
        let backend = backend.clone();
        let ledger = ledger.clone();
        tokio::spawn(async move {
            let mut next = backlog;
            loop {
                // Keep about `backlog` jobs waiting: enough to never starve the worker.
                let handled = ledger.handled.load(Ordering::Acquire);
                if handled >= n {
                    return Ok::<_, String>(next);
                }
                if next.saturating_sub(handled) < backlog {
                    preload(backend.as_ref(), next, next + BATCH).await?;
                    next += BATCH;
                } else {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        })
    };
    // A producer that fails ends the run with its error, rather than
    // leaving it to wait for jobs never enqueued.
    let mut producer = AbortOnDrop(producer);
    let produced = tokio::select! {
        () = ledger.wait() => None,
        // It ends well only once the nth job was handled.
        ended = &mut producer.0 => Some(ended.map_err(|e| e.to_string())??),
    };
    if produced.is_some() {
        ledger.wait().await;
    }
    let took = started.elapsed();
    let produced = match produced {
        Some(produced) => produced,
        None => (&mut producer.0).await.map_err(|e| e.to_string())??,
    };
    let finished = Finished::wait(backend.as_ref(), produced).await?;
    running.shutdown().await;
    let ends = ledger
        .slice_ends
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let mut previous = started;
    let slices: Vec<String> = ends
        .iter()
        .map(|end| {
            let rate = ledger.slice as f64 / end.duration_since(previous).as_secs_f64();
            previous = *end;
            format!("{rate:.0}")
        })
        .collect();
    let duplicates = ledger.duplicates.load(Ordering::Acquire);
    let (first, last) = (slices.first().cloned(), slices.last().cloned());
    let ratio = match (
        first.and_then(|f| f.parse::<f64>().ok()),
        last.and_then(|l| l.parse::<f64>().ok()),
    ) {
        (Some(f), Some(l)) if f > 0.0 => format!("{:.2}", l / f),
        _ => "NA".to_owned(),
    };
    let line = Line::new(label, "sustained")
        .rate(n as usize, took)
        .with("n", n)
        .with("produced", produced)
        .with("slices", slices.join(","))
        .with("last_over_first", ratio)
        .with("duplicates", duplicates);
    Ok(finished.verdict(ledger.verdict(line, produced), produced))
}

/// Aborts the task when dropped: an early return leaves no task enqueuing.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
