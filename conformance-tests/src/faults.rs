//! A backend that forwards every call to another, for tests that change
//! one call of a real store: make its completions slow or fail, close its
//! wake-up subscriptions, let a push land during a pull, slow its releases,
//! fail its renewals, retries or kills, declare other capabilities.
//!
//! ```
//! use std::sync::Arc;
//! use async_trait::async_trait;
//! use relayq_conformance::faults::{Faults, Faulty};
//! use relayq_core::{Backend, Completion, Lease, Result};
//!
//! /// Every batch of completions fails.
//! #[derive(Debug)]
//! struct NoAcks;
//!
//! #[async_trait]
//! impl Faults for NoAcks {
//!     async fn complete_batch(&self, _inner: &dyn Backend, _: Vec<Completion>) -> Result<Vec<Lease>> {
//!         Err(relayq_core::Error::backend("acknowledgements are down"))
//!     }
//! }
//!
//! # fn wrap(store: Arc<dyn Backend>) -> Arc<dyn Backend> {
//! Arc::new(Faulty::new(store, NoAcks))
//! # }
//! ```

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use relayq_core::{
    Backend, Capabilities, Cleaner, Completion, Job, JobId, JobPage, JobStatus, Lease, LeasedJob,
    ListFilter, NewJob, Observer, PullRequest, Puller, PushOutcome, Pusher, Result, Stats, Wakeups,
};
use serde_json::Value;
use time::{Duration, OffsetDateTime};

/// The calls a test may replace. Each is given the wrapped store and, left
/// alone, forwards to it.
#[async_trait]
pub trait Faults: fmt::Debug + Send + Sync + 'static {
    /// What the wrapped store declares, by default.
    fn capabilities(&self, inner: &dyn Backend) -> Capabilities {
        inner.capabilities()
    }

    /// [`Backend::subscribe`].
    async fn subscribe(&self, inner: &dyn Backend, queues: &[String]) -> Result<Option<Wakeups>> {
        inner.subscribe(queues).await
    }

    /// [`Puller::pull`].
    async fn pull(&self, inner: &dyn Backend, request: &PullRequest) -> Result<Vec<LeasedJob>> {
        inner.pull(request).await
    }

    /// [`Puller::complete`].
    async fn complete(
        &self,
        inner: &dyn Backend,
        lease: &Lease,
        result: Option<Value>,
    ) -> Result<()> {
        inner.complete(lease, result).await
    }

    /// [`Puller::retry`].
    async fn retry(
        &self,
        inner: &dyn Backend,
        lease: &Lease,
        delay: Duration,
        error: &str,
    ) -> Result<JobStatus> {
        inner.retry(lease, delay, error).await
    }

    /// [`Puller::kill`].
    async fn kill(&self, inner: &dyn Backend, lease: &Lease, error: &str) -> Result<()> {
        inner.kill(lease, error).await
    }

    /// [`Puller::release`].
    async fn release(&self, inner: &dyn Backend, lease: &Lease) -> Result<()> {
        inner.release(lease).await
    }

    /// [`Puller::extend_batch`].
    async fn extend_batch(
        &self,
        inner: &dyn Backend,
        leases: &[Lease],
        by: Duration,
    ) -> Result<Vec<Option<OffsetDateTime>>> {
        inner.extend_batch(leases, by).await
    }

    /// [`Puller::complete_batch`].
    async fn complete_batch(
        &self,
        inner: &dyn Backend,
        completions: Vec<Completion>,
    ) -> Result<Vec<Lease>> {
        inner.complete_batch(completions).await
    }
}

/// A shared fault, so a test can keep a handle on what it records.
#[async_trait]
impl<F: Faults> Faults for Arc<F> {
    fn capabilities(&self, inner: &dyn Backend) -> Capabilities {
        (**self).capabilities(inner)
    }

    async fn subscribe(&self, inner: &dyn Backend, queues: &[String]) -> Result<Option<Wakeups>> {
        (**self).subscribe(inner, queues).await
    }

    async fn pull(&self, inner: &dyn Backend, request: &PullRequest) -> Result<Vec<LeasedJob>> {
        (**self).pull(inner, request).await
    }

    async fn complete(
        &self,
        inner: &dyn Backend,
        lease: &Lease,
        result: Option<Value>,
    ) -> Result<()> {
        (**self).complete(inner, lease, result).await
    }

    async fn complete_batch(
        &self,
        inner: &dyn Backend,
        completions: Vec<Completion>,
    ) -> Result<Vec<Lease>> {
        (**self).complete_batch(inner, completions).await
    }

    async fn retry(
        &self,
        inner: &dyn Backend,
        lease: &Lease,
        delay: Duration,
        error: &str,
    ) -> Result<JobStatus> {
        (**self).retry(inner, lease, delay, error).await
    }

    async fn kill(&self, inner: &dyn Backend, lease: &Lease, error: &str) -> Result<()> {
        (**self).kill(inner, lease, error).await
    }

    async fn release(&self, inner: &dyn Backend, lease: &Lease) -> Result<()> {
        (**self).release(inner, lease).await
    }

    async fn extend_batch(
        &self,
        inner: &dyn Backend,
        leases: &[Lease],
        by: Duration,
    ) -> Result<Vec<Option<OffsetDateTime>>> {
        (**self).extend_batch(inner, leases, by).await
    }
}

/// A fault for wake-up races: the first pull to come back empty pushes a
/// job (through the wrapped store) before it returns, then waits, as a
/// push racing the pull would: the puller hears of the job while its pull,
/// whose snapshot could not see it, is still under way.
#[derive(Debug)]
pub struct PushDuringEmptyPull {
    /// The job to push, until it is pushed.
    job: std::sync::Mutex<Option<NewJob>>,
    pushed: std::sync::OnceLock<JobId>,
    wait: std::time::Duration,
}

impl PushDuringEmptyPull {
    /// Pushes `job` during the first empty pull, which then waits `wait`
    /// before it returns. The wait must outlast every way the store sends
    /// the push's wake-up (a poller's tick too): a signal arriving only
    /// after the pull returned would hide a worker that ignores the one
    /// that came during it.
    pub fn new(job: NewJob, wait: std::time::Duration) -> Self {
        Self {
            job: std::sync::Mutex::new(Some(job)),
            pushed: std::sync::OnceLock::new(),
            wait,
        }
    }

    /// The pushed job's id, once an empty pull has pushed it.
    pub fn pushed(&self) -> Option<JobId> {
        self.pushed.get().copied()
    }
}

#[async_trait]
impl Faults for PushDuringEmptyPull {
    async fn pull(&self, inner: &dyn Backend, request: &PullRequest) -> Result<Vec<LeasedJob>> {
        let jobs = inner.pull(request).await?;
        if !jobs.is_empty() {
            return Ok(jobs);
        }
        // Taken under the lock: of two empty pulls at once, one pushes.
        let job = self
            .job
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(job) = job {
            let id = match inner.push(job.clone()).await {
                Ok(outcome) => outcome.id(),
                Err(e) => {
                    // Pushed by the next empty pull instead.
                    *self
                        .job
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(job);
                    return Err(e);
                }
            };
            let _ = self.pushed.set(id);
            tokio::time::sleep(self.wait).await;
        }
        Ok(jobs)
    }
}

/// The store `inner`, with the calls `faults` overrides replaced.
#[derive(Debug)]
pub struct Faulty<F> {
    inner: Arc<dyn Backend>,
    faults: F,
}

impl<F: Faults> Faulty<F> {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Backend>, faults: F) -> Self {
        Self { inner, faults }
    }
}

#[async_trait]
impl<F: Faults> Pusher for Faulty<F> {
    async fn push(&self, job: NewJob) -> Result<PushOutcome> {
        self.inner.push(job).await
    }
    async fn push_batch(&self, jobs: Vec<NewJob>) -> Result<Vec<PushOutcome>> {
        self.inner.push_batch(jobs).await
    }
}

#[async_trait]
impl<F: Faults> Puller for Faulty<F> {
    async fn pull(&self, request: &PullRequest) -> Result<Vec<LeasedJob>> {
        self.faults.pull(&*self.inner, request).await
    }
    async fn complete(&self, lease: &Lease, result: Option<Value>) -> Result<()> {
        self.faults.complete(&*self.inner, lease, result).await
    }
    async fn complete_batch(&self, completions: Vec<Completion>) -> Result<Vec<Lease>> {
        self.faults.complete_batch(&*self.inner, completions).await
    }
    async fn retry(&self, lease: &Lease, delay: Duration, error: &str) -> Result<JobStatus> {
        self.faults.retry(&*self.inner, lease, delay, error).await
    }
    async fn kill(&self, lease: &Lease, error: &str) -> Result<()> {
        self.faults.kill(&*self.inner, lease, error).await
    }
    async fn extend(&self, lease: &Lease, by: Duration) -> Result<OffsetDateTime> {
        self.inner.extend(lease, by).await
    }
    async fn extend_batch(
        &self,
        leases: &[Lease],
        by: Duration,
    ) -> Result<Vec<Option<OffsetDateTime>>> {
        self.faults.extend_batch(&*self.inner, leases, by).await
    }
    async fn release(&self, lease: &Lease) -> Result<()> {
        self.faults.release(&*self.inner, lease).await
    }
}

#[async_trait]
impl<F: Faults> Observer for Faulty<F> {
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
impl<F: Faults> Cleaner for Faulty<F> {
    async fn clean(&self, status: JobStatus, before: OffsetDateTime) -> Result<u64> {
        self.inner.clean(status, before).await
    }
}

#[async_trait]
impl<F: Faults> Backend for Faulty<F> {
    fn capabilities(&self) -> Capabilities {
        self.faults.capabilities(&*self.inner)
    }
    async fn subscribe(&self, queues: &[String]) -> Result<Option<Wakeups>> {
        self.faults.subscribe(&*self.inner, queues).await
    }
}
