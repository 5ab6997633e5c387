//! A worker whose acknowledgements are slower than its pulls must not let
//! finished jobs pile up waiting for them.
//!
//! A finished job's lease is no longer renewed while its completion waits
//! in the worker's batcher. Were the backlog unbounded (pull, run, pull
//! again while acknowledgements lag, as when a vacuum slows the database),
//! the waiting completions would outlive their leases: the jobs would run
//! again on other workers and the late completions be refused. The
//! million-job load test (`tests/load.rs`) saw exactly that: 2.4 % of jobs
//! ran twice, up to six times, with no fault injected. Here a real
//! in-memory store whose completions take 100 ms each (a slow database)
//! shows the bound directly: jobs leased but not yet recorded never exceed
//! twice the worker's concurrency.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use relayq_core::{
    Backend, Capabilities, Cleaner, Completion, HandlerError, Job, JobId, JobPage, JobStatus,
    JobType, Lease, LeasedJob, ListFilter, NewJob, Observer, PullRequest, Puller, PushOutcome,
    Pusher, Result, Stats, Wakeups, Worker,
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
        self.inner.capabilities()
    }
    async fn subscribe(&self, queues: &[String]) -> Result<Option<Wakeups>> {
        self.inner.subscribe(queues).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_jobs_waiting_for_slow_acknowledgements_stay_bounded() {
    const CONCURRENCY: u32 = 4;
    let store = SlowAcks {
        inner: MemoryBackend::new(),
        delay: Duration::from_millis(100),
    };
    store
        .push_batch(CrashJob::batch(0, 5_000))
        .await
        .expect("push");
    let worker = Worker::builder(Arc::new(store.clone()))
        .concurrency(CONCURRENCY)
        .lease(Duration::from_secs(30))
        .poll_interval(Duration::from_millis(20))
        .handle(|_job: CrashJob, _ctx| async move { Ok::<_, HandlerError>(()) })
        .build()
        .expect("worker");
    let running = worker.start();
    let started = Instant::now();
    let mut most = 0;
    while started.elapsed() < Duration::from_millis(1500) {
        let leased = store
            .stats()
            .await
            .expect("stats")
            .queue(CrashJob::QUEUE)
            .processing;
        most = most.max(leased);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    running.shutdown().await;
    let done = store
        .stats()
        .await
        .expect("stats")
        .queue(CrashJob::QUEUE)
        .done;
    assert!(done > 0, "nothing completed");
    assert!(
        most <= u64::from(2 * CONCURRENCY),
        "{most} jobs were leased at once awaiting their slow completions; a worker of \
         concurrency {CONCURRENCY} should hold at most {} (running + awaiting their record)",
        2 * CONCURRENCY
    );
    eprintln!("at most {most} jobs leased at once; {done} done");
}
