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
use relayq_conformance::faults::{Faults, Faulty};
use relayq_core::{
    Backend, Capabilities, Completion, Event, HandlerError, JobType, Lease, Observer, Outcome,
    Pusher, Result, Worker, WorkerBuilder,
};
use relayq_memory::MemoryBackend;
use relayq_reliability::crash::CrashJob;
use serde_json::Value;

/// The memory store, with every completion taking `delay` first.
#[derive(Debug)]
struct SlowAcks {
    delay: Duration,
}

#[async_trait]
impl Faults for SlowAcks {
    fn capabilities(&self, inner: &dyn Backend) -> Capabilities {
        // Its writes are slow, so completions go through the batcher, whose
        // backlog is what this test bounds.
        inner.capabilities().instant_writes(false)
    }

    async fn complete(
        &self,
        inner: &dyn Backend,
        lease: &Lease,
        result: Option<Value>,
    ) -> Result<()> {
        tokio::time::sleep(self.delay).await;
        inner.complete(lease, result).await
    }

    async fn complete_batch(
        &self,
        inner: &dyn Backend,
        completions: Vec<Completion>,
    ) -> Result<Vec<Lease>> {
        tokio::time::sleep(self.delay).await;
        inner.complete_batch(completions).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_jobs_waiting_for_slow_acknowledgements_keep_their_leases() {
    const CONCURRENCY: u32 = 4;
    const JOBS: usize = 3_000;
    // The store's leases run on the system clock: long enough that a
    // loaded machine's stalls do not end them.
    const LEASE: Duration = Duration::from_secs(1);
    let store = Arc::new(Faulty::new(
        Arc::new(MemoryBackend::new()),
        SlowAcks {
            // Longer than a lease: without renewals every waiting
            // completion would come too late.
            delay: LEASE + Duration::from_millis(100),
        },
    ));
    store
        .push_batch(CrashJob::batch(0, JOBS as i64))
        .await
        .expect("push");
    let runs: Arc<Vec<AtomicUsize>> = Arc::new((0..JOBS).map(|_| AtomicUsize::new(0)).collect());
    let counted = Arc::clone(&runs);
    let worker = Worker::builder(store.clone())
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
    while started.elapsed() < Duration::from_secs(4) {
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
    // The shutdown gave back what it held: nothing is left leased, no job
    // is lost, and each run job is done (its completion was waited for).
    let queue = stats.queue(CrashJob::QUEUE);
    assert_eq!(queue.processing, 0, "leases left held: {queue:?}");
    assert_eq!(queue.done + queue.pending, JOBS as u64, "{queue:?}");
    let ran = runs.iter().filter(|n| n.load(Ordering::SeqCst) > 0).count();
    assert_eq!(
        ran as u64, queue.done,
        "every run job is done, and only those"
    );
    eprintln!("at most {most} jobs leased at once; {done} done");
}
