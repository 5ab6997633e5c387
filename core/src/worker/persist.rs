//! Outcome writes made again after a transient failure.
//!
//! A job whose outcome is not recorded runs again once its lease ends. A
//! failure that passes (a connection lost, a failover, a deadlock, no
//! pooled connection free) need not cost that run: the write is fenced, so
//! the same write made again takes effect once or finds the lease gone, and
//! the worker's keeper renews the lease meanwhile.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use super::board::Board;
use super::execute::Shared;
use crate::error::{Error, Result};
use crate::job::JobStatus;
use crate::lease::Lease;
use crate::retry::{Jitter, apply_jitter};
use crate::store::Backend;

/// The first pause before a write that failed transiently is made again;
/// each next one doubles (jittered), up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(50);

/// The longest pause between two tries of a write.
const MAX_PAUSE: Duration = Duration::from_secs(1);

/// What [`persist`] came to.
pub(crate) struct Persisted<T> {
    /// The last try's result.
    pub(crate) result: Result<T>,
    /// Whether an earlier try failed transiently: it may have taken effect
    /// with its reply lost, so that the last finds the lease gone (see
    /// [`effect`]).
    pub(crate) retried: bool,
}

/// Makes the outcome write `write` until it is recorded, refused, or has
/// failed transiently ([`Error::is_transient`]) for as long as a lease
/// lasts; not again once the worker (whose `board` this is, if any) has
/// passed its shutdown deadline, so that a store that stays down does not
/// hold the shutdown up.
pub(crate) async fn persist<S, T, F>(
    shared: &Shared<S>,
    board: Option<&Board>,
    mut write: impl FnMut() -> F,
) -> Persisted<T>
where
    F: Future<Output = Result<T>>,
{
    let give_up = Instant::now() + shared.config.lease;
    let mut pause = FIRST_PAUSE;
    let mut retried = false;
    loop {
        let result = write().await;
        let abandoning = board.is_some_and(|board| board.abandoning.load(Ordering::SeqCst));
        match result {
            Err(e) if e.is_transient() && !abandoning && Instant::now() + pause < give_up => {
                tracing::warn!(error = %e, retry_in = ?pause, "recording an outcome failed; trying again");
                tokio::time::sleep(apply_jitter(pause, Jitter::Equal)).await;
                pause = (pause * 2).min(MAX_PAUSE);
                retried = true;
            }
            result => return Persisted { result, retried },
        }
    }
}

/// What a fenced write under one lease came to (see [`write_fenced`]).
pub(crate) enum Fenced<T> {
    /// Recorded, by the last try or an earlier one.
    Recorded(T),
    /// The lease was gone: nothing was changed.
    LeaseLost,
    /// Not recorded.
    Failed(Error),
}

/// [`persist`]s the write `write` under `lease`; should a try after one
/// that failed transiently find the lease gone, or fail, reads the job to
/// learn whether that earlier try took effect, its reply lost: `shows` names
/// what the write returns when the job is in the status given (writing
/// `error` as its last error, if any), and `None` for a status it does not
/// leave.
pub(crate) async fn write_fenced<S, T, F>(
    shared: &Shared<S>,
    board: Option<&Board>,
    lease: &Lease,
    error: Option<&str>,
    shows: impl Fn(JobStatus) -> Option<T>,
    write: impl FnMut() -> F,
) -> Fenced<T>
where
    F: Future<Output = Result<T>>,
{
    let written = persist(shared, board, write).await;
    match written.result {
        Ok(out) => Fenced::Recorded(out),
        // An earlier try may have taken effect, its reply lost: the last
        // found the lease gone, or failed.
        Err(e) if written.retried => {
            let lost = e.is_lease_lost();
            let not_shown = || {
                if lost {
                    Fenced::LeaseLost
                } else {
                    Fenced::Failed(e)
                }
            };
            match effect(&*shared.backend, lease, error).await {
                Ok(Some(status)) => shows(status).map_or_else(not_shown, Fenced::Recorded),
                Ok(None) => not_shown(),
                Err(read) if lost => Fenced::Failed(read),
                Err(_) => not_shown(),
            }
        }
        Err(e) if e.is_lease_lost() => Fenced::LeaseLost,
        Err(e) => Fenced::Failed(e),
    }
}

/// The status a write under `lease` left its job in, if the job shows it:
/// still under the lease's token (the next lease has a newer one), no
/// longer `Processing`, and with `error` as its last error where one was
/// written. For a write whose earlier try may have taken effect, its reply
/// lost, and whose last try found the lease gone. An error if the job
/// cannot be read: whether the write took effect is then unknown.
pub(crate) async fn effect(
    backend: &dyn Backend,
    lease: &Lease,
    error: Option<&str>,
) -> Result<Option<JobStatus>> {
    let Some(job) = backend.get(lease.job_id).await? else {
        return Ok(None);
    };
    let ours = job.lease_token == lease.token
        && job.status != JobStatus::Processing
        && error.is_none_or(|error| job.last_error.as_deref() == Some(error));
    Ok(ours.then_some(job.status))
}
