//! Leases: the right to finish one job, checked by a fencing token.

use serde::{Deserialize, Serialize};
use time::Duration;

use crate::error::{Error, Result};
use crate::job::{Job, JobId};
use crate::store::Puller;

/// The right to finish one job, returned by `pull`.
///
/// `token` is the job's fencing token for this lease: a per-job counter that
/// grows with every lease granted and is never reused. Every acknowledgement
/// (`complete`, `retry`, `kill`, `extend`, `release`) succeeds only while the
/// job is still `Processing` under this same token, so a worker whose lease
/// expired or was released can never overwrite the next holder's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Lease {
    /// The leased job.
    pub job_id: JobId,
    /// The fencing token of this lease.
    pub token: i64,
}

impl Lease {
    /// The [`Error::LeaseLost`] for this lease.
    pub fn lost(self) -> Error {
        Error::LeaseLost { lease: self }
    }
}

/// A job handed out by `pull`, with the lease that lets its holder finish it.
#[derive(Debug, Clone, PartialEq)]
pub struct LeasedJob {
    /// The lease to present when acknowledging.
    pub lease: Lease,
    /// The job as it was just after it was leased.
    pub job: Job,
}

/// A job a `pull` leased whose stored JSON does not read back: a row
/// another program wrote, since a SQL store accepts JSON that serde_json
/// refuses (a lone surrogate escape, a number beyond `f64`, nesting deeper
/// than it reads). See [`kill_unreadable`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreadable {
    /// The lease the pull took on the job.
    pub lease: Lease,
    /// Why it cannot be read, stored as the job's `last_error`.
    pub reason: String,
}

impl Unreadable {
    /// The job of `lease`, whose stored `column` (`"payload"` or
    /// `"result"`) failed to parse with `error`.
    pub fn new(lease: Lease, column: &str, error: impl std::fmt::Display) -> Self {
        Self {
            lease,
            reason: format!("relayq cannot read this job's stored {column}: {error}"),
        }
    }
}

/// For backends' `pull`: marks each unreadable job `Dead` through its
/// lease, with `last_error` saying why, rather than failing the pull. A
/// failed pull would leave every job it leased to no one until the leases
/// expired, and the unreadable one would come back at each expiry: a
/// poison job stalling its queue and spending the attempts of the jobs
/// pulled with it. A kill that fails is logged; the job then dies when its
/// lease expires on its last attempt.
pub async fn kill_unreadable<P: Puller + ?Sized>(puller: &P, unreadable: Vec<Unreadable>) {
    for Unreadable { lease, reason } in unreadable {
        tracing::error!(job = lease.job_id, %reason, "a pulled job cannot be read; marking it dead");
        if let Err(e) = puller.kill(&lease, &reason).await {
            tracing::warn!(job = lease.job_id, error = %e, "could not mark an unreadable job dead");
        }
    }
}

/// The longest lease one `pull` or `extend` may grant (one day).
pub const MAX_LEASE: Duration = Duration::days(1);

/// Checks a lease length: positive and at most [`MAX_LEASE`].
pub fn check_lease(field: &'static str, lease: Duration) -> Result<()> {
    if !lease.is_positive() {
        return Err(Error::invalid(
            field,
            format!("must be positive, got {lease}"),
        ));
    }
    if lease > MAX_LEASE {
        return Err(Error::invalid(
            field,
            format!("must be at most {MAX_LEASE}, got {lease}"),
        ));
    }
    Ok(())
}

/// Checks the arguments of `retry`.
pub fn check_retry(delay: Duration, error: &str) -> Result<()> {
    crate::job::check_delay("delay", delay)?;
    crate::job::check_text("error", error)
}

/// Checks the result handed to `complete`.
pub fn check_result(result: Option<&serde_json::Value>) -> Result<()> {
    result.map_or(Ok(()), |r| crate::job::check_json("result", r))
}
