//! The four traits every backend implements, and [`Backend`], which bundles them.
//!
//! All are object-safe: a worker or an application holds an
//! `Arc<dyn Backend>` (or just the `Arc<dyn Pusher>` it needs) and never
//! names the storage it runs on.

use std::fmt::Debug;

use async_trait::async_trait;
use serde_json::Value;
use time::{Duration, OffsetDateTime};

use crate::capabilities::Capabilities;
use crate::error::Result;
use crate::job::{Job, JobId, JobStatus, NewJob};
use crate::lease::{Lease, LeasedJob};
use crate::request::{Completion, JobPage, ListFilter, PullRequest, PushOutcome, Stats};
use crate::wakeups::Wakeups;

/// Enqueues jobs.
#[async_trait]
pub trait Pusher: Send + Sync {
    /// Stores one job, or reports the active job that already holds its
    /// `unique_key`. Invalid input is [`Error::InvalidInput`](crate::Error::InvalidInput)
    /// and nothing is written.
    async fn push(&self, job: NewJob) -> Result<PushOutcome>;

    /// Stores every job or none: one invalid job rejects the whole batch.
    /// Outcomes are in input order; a job whose `unique_key` repeats an
    /// earlier one of the batch (same queue) is a duplicate of that job.
    async fn push_batch(&self, jobs: Vec<NewJob>) -> Result<Vec<PushOutcome>>;
}

/// Leases jobs and acknowledges them, fenced by the lease's token.
///
/// Every acknowledgement succeeds only while the job is still `Processing`
/// under the presented lease's token; otherwise it is
/// [`Error::LeaseLost`](crate::Error::LeaseLost) (the batch forms report
/// the lease as lost instead) and nothing changes for that job.
#[async_trait]
pub trait Puller: Send + Sync {
    /// Leases up to `request.batch` eligible jobs from the named queues,
    /// ordered by priority (lower first), then `run_at`, then id. Each claim
    /// is atomic (no job is leased twice); a backend may make a pull of
    /// several (SQLite sweeps expired last attempts first).
    ///
    /// Eligible: `Pending` with `run_at <= now`, or `Processing` whose
    /// lease expired (`locked_until < now`). Each leased job becomes
    /// `Processing` with `attempts + 1`, a new fencing token and
    /// `locked_until = now + request.lease`. An expired lease on the job's
    /// last allowed attempt is not re-leased: the job becomes `Dead` with
    /// `last_error` saying the lease expired.
    ///
    /// A pull whose future is dropped once the store has it (under a
    /// timeout, say) may still lease jobs that no one then holds: they come
    /// back when their lease ends, the attempt spent.
    async fn pull(&self, request: &PullRequest) -> Result<Vec<LeasedJob>>;

    /// Marks the job `Done`, storing the handler's result.
    async fn complete(&self, lease: &Lease, result: Option<Value>) -> Result<()>;

    /// Completes many jobs in one step, each still fenced by its own lease.
    /// Returns the leases that were no longer held (and so changed nothing),
    /// in input order; an empty vector means every job is now `Done`. A
    /// lease named twice completes once and is reported lost the second time.
    async fn complete_batch(&self, completions: Vec<Completion>) -> Result<Vec<Lease>>;

    /// Records a failed attempt: back to `Pending` at `now + delay`, or
    /// `Dead` when the attempts are used up. Returns the new status.
    async fn retry(&self, lease: &Lease, delay: Duration, error: &str) -> Result<JobStatus>;

    /// Marks the job `Dead` at once, whatever attempts remain.
    async fn kill(&self, lease: &Lease, error: &str) -> Result<()>;

    /// Keeps the lease alive: it now expires at `now + by`, which is returned.
    ///
    /// The default is [`Self::extend_batch`] of this one lease; a backend
    /// with a cheaper way to renew a single lease overrides it.
    async fn extend(&self, lease: &Lease, by: Duration) -> Result<OffsetDateTime> {
        let mut ends = self.extend_batch(std::slice::from_ref(lease), by).await?;
        ends.pop().flatten().ok_or_else(|| lease.lost())
    }

    /// Keeps many leases alive in one step (one statement, lock or
    /// transaction: a worker's keeper renews all its due leases with one
    /// call): each one still held now expires at `now + by`. Returns, in
    /// input order, each lease's new end, or `None` for a lease no longer
    /// held (for which nothing changed); a lease named twice is extended
    /// once and both entries report its end. An invalid `by` is
    /// [`Error::InvalidInput`](crate::Error::InvalidInput) and nothing
    /// changes.
    async fn extend_batch(
        &self,
        leases: &[Lease],
        by: Duration,
    ) -> Result<Vec<Option<OffsetDateTime>>>;

    /// Gives the job back: `Pending`, eligible now (in its place in line:
    /// `run_at` is kept), without spending the attempt, and signals the
    /// queue's subscribers (see [`Backend::subscribe`]). The released lease
    /// never becomes valid again. The worker uses it at shutdown, for
    /// buffered jobs it gives back to other workers, and for the job of a
    /// dropped [`run_until_idle`](crate::Worker::run_until_idle).
    async fn release(&self, lease: &Lease) -> Result<()>;
}

/// Reads jobs without changing them.
#[async_trait]
pub trait Observer: Send + Sync {
    /// The job with this id, or `None`.
    ///
    /// A job whose stored payload or result a database backend cannot
    /// read as JSON (another program wrote it) reads with that column as a
    /// JSON string holding the stored text (on SQLite, bytes that are not
    /// UTF-8 as U+FFFD), as a pull stores it once it kills the job; so
    /// does it in [`Self::list`]. Such a column cannot be told apart from
    /// one that holds that string.
    async fn get(&self, id: JobId) -> Result<Option<Job>>;

    /// One page of jobs matching `filter`, by ascending id.
    ///
    /// The cursor ([`JobPage::next`](crate::JobPage::next)) is an id: pages
    /// never repeat a job nor skip one committed when the first page was
    /// read. A job committed later with a lower id than a page already
    /// read (on PostgreSQL, ids are drawn as rows are inserted, not as
    /// they commit: a long `push_in` transaction) is not on the later pages.
    async fn list(&self, filter: &ListFilter) -> Result<JobPage>;

    /// Counts of jobs per queue and status.
    async fn stats(&self) -> Result<Stats>;
}

/// Deletes finished jobs.
#[async_trait]
pub trait Cleaner: Send + Sync {
    /// Deletes jobs in the terminal `status` last updated before `before`,
    /// returning how many. A non-terminal status is
    /// [`Error::InvalidInput`](crate::Error::InvalidInput). Any `before` is
    /// taken (see [`check_clean`](crate::check_clean)): one past the years
    /// 1–9999 cleans every job of the status, one at or before their start
    /// none.
    ///
    /// A database backend deletes in chunks, each committed alone, so a
    /// clean of millions of jobs never holds its locks (SQLite's write
    /// lock, a long PostgreSQL transaction that holds back vacuum) for more
    /// than one chunk. Should it fail partway, the chunks already deleted
    /// stay deleted; calling it again finishes the work.
    async fn clean(&self, status: JobStatus, before: OffsetDateTime) -> Result<u64>;
}

/// A complete store: all four traits plus what it can do.
#[async_trait]
pub trait Backend: Pusher + Puller + Observer + Cleaner + Debug + Send + Sync {
    /// What this backend supports, so callers branch on abilities rather
    /// than on which backend it is.
    fn capabilities(&self) -> Capabilities;

    /// Signals jobs that became due in any of `queues` (pushes, releases,
    /// retries due at once), so a worker can pull at once instead of
    /// waiting for its next poll. `None` when the backend has no push
    /// notifications (callers then poll). Signals are hints: one may be
    /// spurious, and several pushes may yield one signal. A backend that
    /// declares cross-process wake-ups also signals what other processes
    /// did, possibly later (SQLite: within its poll interval). A queue
    /// name that could name no queue is
    /// [`Error::InvalidInput`](crate::Error::InvalidInput) (see
    /// [`check_queue_names`](crate::check_queue_names)).
    async fn subscribe(&self, queues: &[String]) -> Result<Option<Wakeups>>;
}
