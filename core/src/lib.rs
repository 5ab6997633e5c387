//! relayq's storage-agnostic core.
//!
//! - [`NewJob`] and [`Job`]: what is enqueued and what is stored;
//! - [`Pusher`], [`Puller`], [`Observer`], [`Cleaner`], bundled as
//!   [`Backend`]: the object-safe traits every store implements;
//! - [`Lease`]: the right to finish a job, fenced by a token that no later
//!   lease reuses;
//! - [`Clock`]: injectable time, with [`ManualClock`] for tests;
//! - [`Error`]: the one error type;
//! - [`Worker`]: the runtime that runs typed handlers ([`JobType`],
//!   [`Handler`]) for jobs of any backend, with retries ([`RetryPolicy`]),
//!   lease renewal, wake-ups, graceful shutdown, events, and a
//!   deterministic test mode ([`Worker::run_until_idle`]).
//!
//! Backends live in their own crates (`relayq-postgres`, `relayq-sqlite`,
//! `relayq-memory`); the `relayq` crate re-exports this one with them.

mod capabilities;
mod clock;
mod error;
mod finite;
mod job;
mod lease;
mod payload;
mod request;
mod retry;
mod store;
mod wakeups;
pub mod worker;

pub use capabilities::Capabilities;
pub use clock::{Clock, ManualClock, SystemClock, from_unix_micros, truncate_to_micros};
/// The string type of a [`Job`]'s queue and kind (re-exported from `compact_str`).
pub use compact_str::CompactString;
pub use error::{BoxError, Error, Result};
pub use job::{
    Cutoff, DEFAULT_MAX_ATTEMPTS, DEFAULT_QUEUE, Job, JobId, JobStatus, MAX_DELAY, MAX_JSON_DEPTH,
    MAX_NAME_LEN, NewJob, Schedule, ValidJob, check_clean, check_delay, check_instant, check_json,
    check_name, check_text, validate_batch,
};
pub use lease::{
    CLAIM_ROUNDS, Lease, LeasedJob, MAX_LEASE, Unreadable, check_lease, check_result, check_retry,
    pull_readable, retry_due_at_once,
};
pub use payload::Payload;
pub use request::{
    Completion, JobPage, ListFilter, MAX_LIST_LIMIT, MAX_PULL_BATCH, MAX_PULL_QUEUES, PullRequest,
    PushOutcome, Stats, StatusCounts, check_queue_names,
};
pub use retry::{Jitter, RetryPolicy};
pub use store::{Backend, Cleaner, Observer, Puller, Pusher};
pub use wakeups::Wakeups;
pub use worker::{
    Event, EventStream, Handler, HandlerError, IdleReport, JobContext, JobInfo, JobType, Outcome,
    ShutdownReport, Worker, WorkerBuilder, WorkerHandle,
};

/// The reason stored in `last_error` when a job's lease expired on its last
/// allowed attempt and it was marked `Dead` instead of being leased again.
pub const LEASE_EXPIRED_ERROR: &str = "lease expired on the last allowed attempt";
