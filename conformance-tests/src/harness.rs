//! What every case is handed: a fresh store and the clock it reads.

use std::sync::Arc;

use relayq_core::{
    Backend, Clock, Job, JobId, LeasedJob, ManualClock, NewJob, PullRequest, PushOutcome, Worker,
    WorkerBuilder,
};
use time::{Duration, OffsetDateTime, macros::datetime};

/// Where every harness clock starts: a fixed instant, so runs repeat exactly.
pub const EPOCH: OffsetDateTime = datetime!(2030-01-01 00:00 UTC);

/// A fresh, isolated store and the manual clock it reads. Cases move time
/// with [`Harness::advance`], never by sleeping.
#[derive(Clone)]
pub struct Harness {
    /// The store under test, used only through the core traits.
    pub backend: Arc<dyn Backend>,
    /// The clock injected into `backend`.
    pub clock: ManualClock,
    /// Whatever the store needs alive until the case ends (a temporary
    /// directory, say); dropped with the last clone of the harness.
    keep_alive: Option<Arc<dyn std::any::Any + Send + Sync>>,
}

impl std::fmt::Debug for Harness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Harness")
            .field("backend", &self.backend)
            .field("clock", &self.clock)
            .finish_non_exhaustive()
    }
}

impl Harness {
    /// Wraps a store that reads `clock`.
    pub fn new(backend: Arc<dyn Backend>, clock: ManualClock) -> Self {
        Self {
            backend,
            clock,
            keep_alive: None,
        }
    }

    /// Keeps `guard` (e.g. the `TempDir` a database file lives in) alive as
    /// long as the harness, so the store outlives every use in the case.
    pub fn keep_alive(mut self, guard: impl std::any::Any + Send + Sync) -> Self {
        self.keep_alive = Some(Arc::new(guard));
        self
    }

    /// The store's current time.
    pub fn now(&self) -> OffsetDateTime {
        self.clock.now()
    }

    /// Moves the store's time forward.
    pub fn advance(&self, by: Duration) {
        self.clock.advance(by);
    }

    /// A worker builder on this store whose handlers get the harness as
    /// their state (to move the clock or inspect the store mid-run).
    pub fn worker(&self) -> WorkerBuilder<Harness> {
        Worker::builder(Arc::clone(&self.backend)).state(self.clone())
    }

    /// Pushes a job that must be created, returning its id.
    pub async fn push(&self, job: NewJob) -> JobId {
        match self.backend.push(job).await.expect("push") {
            PushOutcome::Created(id) => id,
            other => panic!("expected a new job, got {other:?}"),
        }
    }

    /// Pulls up to `batch` jobs from `queue` with a 30 s lease.
    pub async fn pull(&self, queue: &str, batch: u32) -> Vec<LeasedJob> {
        self.backend
            .pull(&PullRequest::queue(queue).batch(batch))
            .await
            .expect("pull")
    }

    /// Pulls exactly one job from `queue`.
    pub async fn pull_one(&self, queue: &str) -> LeasedJob {
        let mut jobs = self.pull(queue, 1).await;
        assert_eq!(jobs.len(), 1, "expected one job from {queue:?}");
        jobs.remove(0)
    }

    /// The job with `id`, which must exist.
    pub async fn job(&self, id: JobId) -> Job {
        self.backend
            .get(id)
            .await
            .expect("get")
            .unwrap_or_else(|| panic!("job {id} should exist"))
    }
}

/// A job of `kind` with a small payload naming `n`.
pub(crate) fn job(kind: &str, n: i64) -> NewJob {
    NewJob::new(kind, &serde_json::json!({ "n": n }))
}
