//! Option structs for the trait methods, and what some of them return.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use time::Duration;

use crate::error::{Error, Result};
use crate::job::{DEFAULT_QUEUE, Job, JobId, JobStatus, check_name};
use crate::lease::{Lease, check_lease};

/// The most jobs one `pull` may lease.
pub const MAX_PULL_BATCH: u32 = 10_000;

/// The most queues one `pull` may name.
pub const MAX_PULL_QUEUES: usize = 100;

/// The most jobs one `list` page may hold.
pub const MAX_LIST_LIMIT: u32 = 1_000;

/// What to lease: from which queues, how many, and for how long.
///
/// ```
/// use relayq_core::PullRequest;
/// use time::Duration;
///
/// let request = PullRequest::queue("mail").batch(16).lease(Duration::seconds(30));
/// assert!(request.validate().is_ok());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PullRequest {
    /// Queues to lease from; at least one.
    pub queues: Vec<String>,
    /// The most jobs to lease, 1 to [`MAX_PULL_BATCH`].
    pub batch: u32,
    /// How long each lease lasts before the job may be leased again.
    pub lease: Duration,
}

impl Default for PullRequest {
    fn default() -> Self {
        Self::queue(DEFAULT_QUEUE)
    }
}

impl PullRequest {
    /// The default lease length: 30 seconds.
    pub const DEFAULT_LEASE: Duration = Duration::seconds(30);

    /// One job from `queue`, leased for [`Self::DEFAULT_LEASE`].
    pub fn queue(queue: impl Into<String>) -> Self {
        Self::queues([queue])
    }

    /// One job from any of `queues`, leased for [`Self::DEFAULT_LEASE`].
    pub fn queues<S: Into<String>>(queues: impl IntoIterator<Item = S>) -> Self {
        Self {
            queues: queues.into_iter().map(Into::into).collect(),
            batch: 1,
            lease: Self::DEFAULT_LEASE,
        }
    }

    /// The most jobs to lease at once.
    pub fn batch(mut self, batch: u32) -> Self {
        self.batch = batch;
        self
    }

    /// How long each lease lasts.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// Checks every field; backends call this before touching the store.
    pub fn validate(&self) -> Result<()> {
        if self.queues.is_empty() {
            return Err(Error::invalid("queues", "name at least one queue"));
        }
        if self.queues.len() > MAX_PULL_QUEUES {
            return Err(Error::invalid(
                "queues",
                format!(
                    "at most {MAX_PULL_QUEUES} queues, got {}",
                    self.queues.len()
                ),
            ));
        }
        check_queue_names(&self.queues)?;
        if !(1..=MAX_PULL_BATCH).contains(&self.batch) {
            return Err(Error::invalid(
                "batch",
                format!("must be 1 to {MAX_PULL_BATCH}, got {}", self.batch),
            ));
        }
        check_lease("lease", self.lease)
    }
}

/// What a push did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PushOutcome {
    /// A new job was stored with this id.
    Created(JobId),
    /// An active job of the same queue already had the `unique_key`; nothing
    /// was stored, and this is that job's id.
    Duplicate(JobId),
}

impl PushOutcome {
    /// The new job's id, or the existing job's for a duplicate.
    pub fn id(self) -> JobId {
        match self {
            Self::Created(id) | Self::Duplicate(id) => id,
        }
    }

    /// True when nothing was stored.
    pub fn is_duplicate(self) -> bool {
        matches!(self, Self::Duplicate(_))
    }
}

/// One successful outcome for [`Puller::complete_batch`](crate::Puller::complete_batch).
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// The lease being completed.
    pub lease: Lease,
    /// What the handler returned.
    pub result: Option<serde_json::Value>,
}

impl From<Lease> for Completion {
    /// Completes `lease` with no result.
    fn from(lease: Lease) -> Self {
        Self {
            lease,
            result: None,
        }
    }
}

/// Which jobs `list` returns: filters, a cursor and a page size.
///
/// Pages are ordered by id. Pass a page's [`JobPage::next`] as `after` to
/// get the following page; pages never repeat or skip a job that existed
/// throughout. Jobs pushed meanwhile may be missed: on PostgreSQL an id is
/// drawn when a job is inserted, not when its transaction commits, so a
/// job committed after a later-numbered one can land behind a cursor
/// already past it. To follow new jobs, use a worker or wake-ups, not
/// `list` as a tail.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ListFilter {
    /// Only jobs in this status.
    pub status: Option<JobStatus>,
    /// Only jobs in this queue.
    pub queue: Option<String>,
    /// Only jobs of this kind.
    pub kind: Option<String>,
    /// Only jobs with an id greater than this (the cursor).
    pub after: Option<JobId>,
    /// Page size, 1 to [`MAX_LIST_LIMIT`]; default 100.
    pub limit: u32,
}

impl Default for ListFilter {
    fn default() -> Self {
        Self {
            status: None,
            queue: None,
            kind: None,
            after: None,
            limit: 100,
        }
    }
}

impl ListFilter {
    /// Every job, 100 to a page.
    pub fn new() -> Self {
        Self::default()
    }

    /// Only jobs in `status`.
    pub fn status(mut self, status: JobStatus) -> Self {
        self.status = Some(status);
        self
    }

    /// Only jobs in `queue`.
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = Some(queue.into());
        self
    }

    /// Only jobs of `kind`.
    pub fn kind(mut self, kind: impl Into<String>) -> Self {
        self.kind = Some(kind.into());
        self
    }

    /// Only jobs after the cursor `after` (a previous page's `next`).
    pub fn after(mut self, after: Option<JobId>) -> Self {
        self.after = after;
        self
    }

    /// Page size.
    pub fn limit(mut self, limit: u32) -> Self {
        self.limit = limit;
        self
    }

    /// Checks every field; backends call this before touching the store.
    pub fn validate(&self) -> Result<()> {
        if !(1..=MAX_LIST_LIMIT).contains(&self.limit) {
            return Err(Error::invalid(
                "limit",
                format!("must be 1 to {MAX_LIST_LIMIT}, got {}", self.limit),
            ));
        }
        if let Some(queue) = &self.queue {
            check_name("queue", queue)?;
        }
        if let Some(kind) = &self.kind {
            check_name("kind", kind)?;
        }
        Ok(())
    }
}

/// One page of [`Observer::list`](crate::Observer::list).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct JobPage {
    /// The jobs, by ascending id.
    pub jobs: Vec<Job>,
    /// The cursor for the next page; `None` when this page is the last.
    pub next: Option<JobId>,
}

/// Job counts by status, for one queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct StatusCounts {
    /// `Pending` jobs.
    pub pending: u64,
    /// `Processing` jobs (including leases that expired but were not yet re-leased).
    pub processing: u64,
    /// `Done` jobs.
    pub done: u64,
    /// `Dead` jobs.
    pub dead: u64,
    /// `Cancelled` jobs.
    pub cancelled: u64,
}

impl StatusCounts {
    /// The count for `status`.
    pub fn get(&self, status: JobStatus) -> u64 {
        match status {
            JobStatus::Pending => self.pending,
            JobStatus::Processing => self.processing,
            JobStatus::Done => self.done,
            JobStatus::Dead => self.dead,
            JobStatus::Cancelled => self.cancelled,
        }
    }

    /// Adds `n` to the count for `status`.
    pub fn add(&mut self, status: JobStatus, n: u64) {
        let slot = match status {
            JobStatus::Pending => &mut self.pending,
            JobStatus::Processing => &mut self.processing,
            JobStatus::Done => &mut self.done,
            JobStatus::Dead => &mut self.dead,
            JobStatus::Cancelled => &mut self.cancelled,
        };
        *slot += n;
    }

    /// All jobs counted.
    pub fn total(&self) -> u64 {
        JobStatus::ALL.iter().map(|s| self.get(*s)).sum()
    }
}

/// Job counts per queue and status. Queues with no jobs are absent.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Stats {
    /// Counts keyed by queue name.
    pub queues: BTreeMap<String, StatusCounts>,
}

impl Stats {
    /// The counts for `queue` (all zero when it has no jobs).
    pub fn queue(&self, queue: &str) -> StatusCounts {
        self.queues.get(queue).copied().unwrap_or_default()
    }
}

/// Checks queue names, as a pull, a worker and every backend's
/// [`Backend::subscribe`](crate::Backend::subscribe) do: each a valid
/// queue name ([`InvalidInput`](crate::Error::InvalidInput) naming `queue`).
pub fn check_queue_names(queues: &[String]) -> Result<()> {
    queues
        .iter()
        .try_for_each(|queue| check_name("queue", queue))
}
