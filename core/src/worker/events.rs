//! What a worker reports as it runs jobs: [`Event`]s, each naming a job
//! ([`JobInfo`]) and, once an attempt ends, its [`Outcome`].

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::broadcast;

use crate::job::{Job, JobId};
use compact_str::CompactString;

/// The job an [`Event`] is about.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct JobInfo {
    /// The job's id.
    pub id: JobId,
    /// Its kind.
    pub kind: CompactString,
    /// Its queue.
    pub queue: CompactString,
    /// The attempt this event is about (1 for the first).
    pub attempt: i32,
    /// The attempts it is allowed.
    pub max_attempts: i32,
}

impl From<&Job> for JobInfo {
    fn from(job: &Job) -> Self {
        Self {
            id: job.id,
            kind: job.kind.clone(),
            queue: job.queue.clone(),
            attempt: job.attempts,
            max_attempts: job.max_attempts,
        }
    }
}

/// How one attempt ended.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Outcome {
    /// The handler succeeded; the job is `Done` with this result.
    Completed {
        /// What the handler returned (`None` for `null` or `()`).
        result: Option<Value>,
    },
    /// The attempt failed (an error, a panic, a timeout); the job waits
    /// `delay` for its next attempt.
    Retrying {
        /// The error stored as `last_error`.
        error: String,
        /// The wait before the next attempt.
        delay: Duration,
    },
    /// The job is `Dead`: attempts used up, a permanent error, a payload
    /// that does not deserialize, or a kind with no handler.
    Dead {
        /// The error stored as `last_error`.
        error: String,
    },
    /// Shutdown's deadline passed before the handler finished: the job was
    /// given back, eligible at once, without spending the attempt.
    Released,
    /// The lease was lost (it expired and another worker took the job, or
    /// an extension found it gone), or no renewal of it was answered for
    /// five sixths of a lease, so it may soon end on the store: the handler
    /// was stopped and its outcome discarded, as a new holder owns (or may
    /// soon own) the job.
    LeaseLost,
    /// The backend failed to record the outcome (for good, or transiently
    /// on every try for up to a lease, or until the shutdown's deadline);
    /// the job comes back when its lease expires.
    Unrecorded {
        /// The backend's error.
        error: String,
    },
}

impl Outcome {
    /// True when the job reached a terminal status (`Done` or `Dead`).
    pub fn is_terminal(&self) -> bool {
        matches!(self, Self::Completed { .. } | Self::Dead { .. })
    }
}

/// Something a worker did.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// An attempt began.
    Started {
        /// The job.
        job: JobInfo,
    },
    /// An attempt ended.
    Finished {
        /// The job.
        job: JobInfo,
        /// How it ended.
        outcome: Outcome,
    },
}

impl Event {
    /// The job the event is about.
    pub fn job(&self) -> &JobInfo {
        match self {
            Self::Started { job } | Self::Finished { job, .. } => job,
        }
    }

    /// The outcome, for [`Event::Finished`].
    pub fn outcome(&self) -> Option<&Outcome> {
        match self {
            Self::Finished { outcome, .. } => Some(outcome),
            Self::Started { .. } => None,
        }
    }
}

/// A receiver of a worker's events, counted while it lives: the worker
/// asks the count, not the channel (whose count sits behind its lock),
/// whether anyone listens before it builds a job's events.
#[derive(Debug)]
pub(crate) struct Subscription {
    pub(crate) rx: broadcast::Receiver<Event>,
    listeners: Arc<AtomicUsize>,
}

impl Subscription {
    /// Subscribes to `events`, counted in `listeners` until dropped.
    pub(crate) fn new(events: &broadcast::Sender<Event>, listeners: &Arc<AtomicUsize>) -> Self {
        listeners.fetch_add(1, Ordering::SeqCst);
        Self {
            rx: events.subscribe(),
            listeners: Arc::clone(listeners),
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.listeners.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A subscription to a worker's events, from
/// [`Worker::events`](crate::Worker::events).
///
/// Events sent before subscribing are not seen. A subscriber that falls
/// more than [`EventStream::CAPACITY`] events behind skips the oldest
/// (with a warning in the log) rather than slowing the worker down.
#[derive(Debug)]
pub struct EventStream {
    sub: Subscription,
}

impl EventStream {
    /// How many events a slow subscriber may fall behind.
    pub const CAPACITY: usize = 1024;

    pub(crate) fn new(sub: Subscription) -> Self {
        Self { sub }
    }

    /// The next event; `None` once the worker and every handle to it are gone.
    pub async fn recv(&mut self) -> Option<Event> {
        loop {
            match self.sub.rx.recv().await {
                Ok(event) => return Some(event),
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(skipped = n, "event subscriber fell behind");
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }

    /// The next event if one is already waiting, without blocking.
    pub fn try_recv(&mut self) -> Option<Event> {
        loop {
            match self.sub.rx.try_recv() {
                Ok(event) => return Some(event),
                Err(broadcast::error::TryRecvError::Lagged(n)) => {
                    tracing::warn!(skipped = n, "event subscriber fell behind");
                }
                Err(_) => return None,
            }
        }
    }
}
