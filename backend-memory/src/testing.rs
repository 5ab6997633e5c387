//! Helpers for unit tests of code that enqueues and runs jobs.
//!
//! - [`MemoryBackend::enqueued`], [`MemoryBackend::assert_enqueued`] and
//!   friends: what was pushed, typed, without pulling it;
//! - [`Inline`]: a [`Pusher`] whose `push` runs the job's handler at once;
//! - [`Worker::run_until_idle`](relayq_core::Worker::run_until_idle), from
//!   core: every due job run in the calling task, with a
//!   [`ManualClock`](relayq_core::ManualClock) deciding what is due.
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use relayq_core::{HandlerError, JobType, ManualClock, Pusher, RetryPolicy, Worker};
//! use relayq_memory::MemoryBackend;
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Debug, PartialEq, Serialize, Deserialize)]
//! struct Charge { cents: u32 }
//! impl JobType for Charge { const KIND: &'static str = "charge"; }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> relayq_core::Result<()> {
//! let clock = ManualClock::starting_now();
//! let queue = MemoryBackend::with_clock(Arc::new(clock.clone()));
//!
//! // The code under test enqueues...
//! queue.push(Charge { cents: 500 }.to_job()).await?;
//! queue.assert_enqueued(|c: &Charge| c.cents == 500);
//!
//! // ...and the worker runs it, here failing once.
//! let worker = Worker::builder(Arc::new(queue.clone()))
//!     .retry(RetryPolicy::fixed(Duration::from_secs(60)))
//!     .handle(|charge: Charge, ctx| async move {
//!         if ctx.attempt() == 1 {
//!             return Err(HandlerError::new("card network down"));
//!         }
//!         Ok(charge.cents)
//!     })
//!     .build()?;
//! assert_eq!(worker.run_until_idle().await?.retrying(), 1);
//! assert_eq!(worker.run_until_idle().await?.ran(), 0, "not due yet");
//! clock.advance(time::Duration::seconds(60));
//! assert_eq!(worker.run_until_idle().await?.completed(), 1);
//! assert!(queue.enqueued::<Charge>().is_empty());
//! # Ok(())
//! # }
//! ```

use std::fmt;

use async_trait::async_trait;
use relayq_core::{Job, JobStatus, JobType, NewJob, PushOutcome, Pusher, Result, Worker};

use crate::MemoryBackend;

impl MemoryBackend {
    /// Every job in the store, by ascending id, whatever its status.
    pub fn jobs(&self) -> Vec<Job> {
        self.lock().all_jobs()
    }

    /// The `Pending` jobs of `J`'s kind (due or not), by id, decoded.
    ///
    /// # Panics
    ///
    /// If one of them has a payload that does not decode as `J`: a test
    /// helper says so loudly rather than hide the job.
    pub fn enqueued<J: JobType>(&self) -> Vec<J> {
        self.jobs()
            .into_iter()
            .filter(|job| job.status == JobStatus::Pending && job.kind == J::KIND)
            .map(|job| {
                serde_json::from_value(serde_json::Value::clone(&job.payload)).unwrap_or_else(|e| {
                    panic!(
                        "job {} of kind {:?} does not decode as {}: {e}; payload {}",
                        job.id,
                        J::KIND,
                        std::any::type_name::<J>(),
                        job.payload
                    )
                })
            })
            .collect()
    }

    /// Asserts that a `Pending` job of `J`'s kind matches `matches`.
    ///
    /// # Panics
    ///
    /// If none does, listing the payloads that are enqueued.
    #[track_caller]
    pub fn assert_enqueued<J: JobType>(&self, matches: impl Fn(&J) -> bool) {
        let pending = self.enqueued::<J>();
        if !pending.iter().any(matches) {
            panic!(
                "no pending {:?} job matches; enqueued: {}",
                J::KIND,
                self.describe::<J>()
            );
        }
    }

    /// Asserts that no `Pending` job of `J`'s kind is in the store.
    ///
    /// # Panics
    ///
    /// If one is, listing them.
    #[track_caller]
    pub fn assert_not_enqueued<J: JobType>(&self) {
        if !self.enqueued::<J>().is_empty() {
            panic!(
                "expected no pending {:?} job; enqueued: {}",
                J::KIND,
                self.describe::<J>()
            );
        }
    }

    fn describe<J: JobType>(&self) -> String {
        let payloads: Vec<String> = self
            .jobs()
            .into_iter()
            .filter(|job| job.status == JobStatus::Pending && job.kind == J::KIND)
            .map(|job| format!("#{} {}", job.id, job.payload))
            .collect();
        if payloads.is_empty() {
            "none".to_owned()
        } else {
            payloads.join(", ")
        }
    }
}

/// Inline mode: a [`Pusher`] that stores each job, then runs every due job
/// with [`Worker::run_until_idle`] before returning, so a push "runs its
/// handler at once". Hand it to the code under test where it expects an
/// `Arc<dyn Pusher>`.
///
/// A handler's failure does not fail the push (the job is retried or dead
/// in the store, as usual); only a store error does, also one met while
/// running jobs after this one was stored.
///
/// Only due jobs of the worker's queues run: a job for another queue, or
/// scheduled for later, stays `Pending` in the store, where
/// [`MemoryBackend::assert_enqueued`] finds it (advance a `ManualClock` and
/// call [`Worker::run_until_idle`] to run the scheduled ones).
///
/// ```
/// use std::sync::Arc;
/// use relayq_core::{HandlerError, JobStatus, JobType, Pusher, Worker};
/// use relayq_memory::{MemoryBackend, testing::Inline};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize)]
/// struct Greet { name: String }
/// impl JobType for Greet { const KIND: &'static str = "greet"; }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> relayq_core::Result<()> {
/// let queue = MemoryBackend::new();
/// let worker = Worker::builder(Arc::new(queue.clone()))
///     .handle(|g: Greet, _ctx| async move { Ok::<_, HandlerError>(format!("hello {}", g.name)) })
///     .build()?;
/// let pusher: Arc<dyn Pusher> = Arc::new(Inline::new(worker));
///
/// let id = pusher.push(Greet { name: "Ada".into() }.to_job()).await?.id();
/// let job = queue.jobs().into_iter().find(|j| j.id == id).unwrap();
/// assert_eq!(job.status, JobStatus::Done);
/// assert_eq!(job.result, Some(serde_json::json!("hello Ada")));
/// # Ok(())
/// # }
/// ```
pub struct Inline<S = ()> {
    worker: Worker<S>,
}

impl<S> fmt::Debug for Inline<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Inline")
            .field("worker", &self.worker)
            .finish()
    }
}

impl<S: Send + Sync + 'static> Inline<S> {
    /// Pushes into `worker`'s backend and runs jobs with `worker`.
    pub fn new(worker: Worker<S>) -> Self {
        Self { worker }
    }

    /// The worker that runs the pushed jobs.
    pub fn worker(&self) -> &Worker<S> {
        &self.worker
    }
}

#[async_trait]
impl<S: Send + Sync + 'static> Pusher for Inline<S> {
    async fn push(&self, job: NewJob) -> Result<PushOutcome> {
        let outcome = self.worker.backend().push(job).await?;
        self.worker.run_until_idle().await?;
        Ok(outcome)
    }

    async fn push_batch(&self, jobs: Vec<NewJob>) -> Result<Vec<PushOutcome>> {
        let outcomes = self.worker.backend().push_batch(jobs).await?;
        self.worker.run_until_idle().await?;
        Ok(outcomes)
    }
}
