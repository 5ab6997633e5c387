//! Leases: the right to finish one job, checked by a fencing token.

use serde::{Deserialize, Serialize};
use time::Duration;

use crate::error::{Error, Result};
use crate::job::{Job, JobId};

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
