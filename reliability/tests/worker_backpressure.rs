//! A worker whose acknowledgements are slower than its pulls must neither
//! lose the leases of finished jobs waiting for them nor let such jobs pile
//! up without bound.
//!
//! The million-job load test (`tests/load.rs`) once saw 2.4 % of jobs run
//! twice, with no fault injected: finished jobs waited in the worker's
//! completion batcher past their leases (no longer renewed once the handler
//! returned), so the worker itself leased them again. Now the worker's lease
//! keeper renews every lease it holds until the outcome is recorded, and
//! the backlog is bounded. Here a real in-memory store whose completions
//! take longer than a whole lease (a slow database, so it does not declare
//! `instant_writes` and its completions are batched) shows both: every job
//! runs exactly once, and the leases held never exceed the documented bound.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use relayq_core::{
    Backend, Capabilities, Cleaner, Completion, Event, HandlerError, Job, JobId, JobPage,
    JobStatus, JobType, Lease, LeasedJob, ListFilter, NewJob, Observer, Outcome, PullRequest,
    Puller, PushOutcome, Pusher, Result, Stats, Wakeups, Worker, WorkerBuilder,
};
use relayq_memory::MemoryBackend;
use relayq_reliability::crash::CrashJob;
use serde_json::Value;
use time::OffsetDateTime;

/// The memory store, with every completion taking `delay` first.
#[derive(Debug, Clone)]
struct SlowAcks {
    inner: MemoryBackend,
    delay: Duration,
}

#[async_trait]
impl Pusher for SlowAcks {
    async fn push(&self, job: NewJob) -> Result<PushOutcome> {
        self.inner.push(job).await
    }
    async fn push_batch(&self, jobs: Vec<NewJob>) -> Result<Vec<PushOutcome>> {
        self.inner.push_batch(jobs).await
    }
}

#[async_trait]
impl Puller for SlowAcks {
    async fn pull(&self, request: &PullRequest) -> Result<Vec<LeasedJob>> {
        self.inner.pull(request).await
    }
    async fn complete(&self, lease: &Lease, result: Option<Value>) -> Result<()> {
        tokio::time::sleep(self.delay).await;
        self.inner.complete(lease, result).await
    }
    async fn complete_batch(&self, completions: Vec<Completion>) -> Result<Vec<Lease>> {
        tokio::time::sleep(self.delay).await;
        self.inner.complete_batch(completions).await
    }
    async fn retry(&self, lease: &Lease, delay: time::Duration, error: &str) -> Result<JobStatus> {
        self.inner.retry(lease, delay, error).await
    }
    async fn kill(&self, lease: &Lease, error: &str) -> Result<()> {
        self.inner.kill(lease, error).await
    }
    async fn extend(&self, lease: &Lease, by: time::Duration) -> Result<OffsetDateTime> {
        self.inner.extend(lease, by).await
    }
    async fn release(&self, lease: &Lease) -> Result<()> {
        self.inner.release(lease).await
    }
}

#[async_trait]
impl Observer for SlowAcks {
    async fn get(&self, id: JobId) -> Result<Option<Job>> {
        self.inner.get(id).await
    }
    async fn list(&self, filter: &ListFilter) -> Result<JobPage> {
        self.inner.list(filter).await
    }
    async fn stats(&self) -> Result<Stats> {
        self.inner.stats().await
    }
}

#[async_trait]
impl Cleaner for SlowAcks {
    async fn clean(&self, status: JobStatus, before: OffsetDateTime) -> Result<u64> {
        self.inner.clean(status, before).await
    }
}

#[async_trait]
impl Backend for SlowAcks {
    fn capabilities(&self) -> Capabilities {
        // Its writes are slow, so completions go through the batcher, whose
        // backlog is what this test bounds.
        self.inner.capabilities().instant_writes(false)
    }
    async fn subscribe(&self, queues: &[String]) -> Result<Option<Wakeups>> {
        self.inner.subscribe(queues).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_jobs_waiting_for_slow_acknowledgements_keep_their_leases() {
    const CONCURRENCY: u32 = 4;
    const JOBS: usize = 3_000;
    const LEASE: Duration = Duration::from_millis(300);
    let store = SlowAcks {
        inner: MemoryBackend::new(),
        // Longer than a lease: without renewals every waiting completion
        // would come too late.
        delay: LEASE + Duration::from_millis(100),
    };
    store
        .push_batch(CrashJob::batch(0, JOBS as i64))
        .await
        .expect("push");
    let runs: Arc<Vec<AtomicUsize>> = Arc::new((0..JOBS).map(|_| AtomicUsize::new(0)).collect());
    let counted = Arc::clone(&runs);
    let worker = Worker::builder(Arc::new(store.clone()))
        .concurrency(CONCURRENCY)
        .lease(LEASE)
        .poll_interval(Duration::from_millis(20))
        .handle(move |job: CrashJob, _ctx| {
            let runs = Arc::clone(&counted);
            async move {
                runs[usize::try_from(job.seq).expect("seq")].fetch_add(1, Ordering::SeqCst);
                Ok::<_, HandlerError>(())
            }
        })
        .build()
        .expect("worker");
    let mut events = worker.events();
    let lost = tokio::spawn(async move {
        let mut lost = 0;
        while let Some(event) = events.recv().await {
            if let Event::Finished {
                outcome: Outcome::LeaseLost,
                ..
            } = event
            {
                lost += 1;
            }
        }
        lost
    });
    let running = worker.start();
    let bound = u64::from(CONCURRENCY + WorkerBuilder::<()>::DEFAULT_PREFETCH)
        + u64::from(WorkerBuilder::<()>::MAX_AWAITING_ACK);
    let started = Instant::now();
    let mut most = 0;
    while started.elapsed() < Duration::from_secs(3) {
        let stats = store.stats().await.expect("stats");
        most = most.max(stats.queue(CrashJob::QUEUE).processing);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    running.shutdown().await;
    drop(worker);
    let lost = lost.await.expect("events");
    let stats = store.stats().await.expect("stats");
    let done = stats.queue(CrashJob::QUEUE).done;
    assert!(done > u64::from(CONCURRENCY), "only {done} completed");
    let twice: Vec<usize> = (0..JOBS)
        .filter(|&n| runs[n].load(Ordering::SeqCst) > 1)
        .collect();
    assert!(twice.is_empty(), "jobs run more than once: {twice:?}");
    assert_eq!(lost, 0, "completions refused for lost leases");
    assert!(
        most <= bound,
        "{most} jobs were leased at once; a worker of concurrency {CONCURRENCY} holds at most {bound}"
    );
    eprintln!("at most {most} jobs leased at once; {done} done");
}
