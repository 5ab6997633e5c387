//! Leases: the right to finish one job, checked by a fencing token.

use std::future::Future;

use serde::{Deserialize, Serialize};
use time::Duration;

use crate::error::{Error, Result};
use crate::job::{Job, JobId};
use crate::request::PullRequest;

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

impl From<Job> for LeasedJob {
    /// A job just leased, with the lease its id and `lease_token` name.
    fn from(job: Job) -> Self {
        Self {
            lease: Lease {
                job_id: job.id,
                token: job.lease_token,
            },
            job,
        }
    }
}

/// A job a `pull` leased whose stored JSON does not read back: a row
/// another program wrote, since a SQL store accepts JSON that serde_json
/// refuses (a lone surrogate escape, a number beyond `f64`, nesting deeper
/// than it reads, text that is not UTF-8). See [`pull_readable`].
/// relayq itself never stores one: it checks JSON before writing it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreadable {
    /// The lease the pull took on the job.
    pub lease: Lease,
    /// The column that does not read back: `"payload"` or `"result"`.
    pub column: &'static str,
    /// Why it cannot be read, stored as the job's `last_error`.
    pub reason: String,
    /// What to store in `column` instead: a JSON string holding the
    /// stored text (bytes that are not UTF-8 replaced by U+FFFD), which
    /// reads back.
    pub readable: String,
}

impl Unreadable {
    /// The job of `lease`, whose stored `column` (`"payload"` or
    /// `"result"`), `stored`, failed to parse with `error`.
    pub fn new(
        lease: Lease,
        column: &'static str,
        stored: &[u8],
        error: impl std::fmt::Display,
    ) -> Self {
        let text = String::from_utf8_lossy(stored);
        Self {
            lease,
            column,
            reason: format!("relayq cannot read this job's stored {column}: {error}"),
            readable: serde_json::Value::from(text).to_string(),
        }
    }
}

/// The most claims one pull makes, replacing jobs it found unreadable.
pub const CLAIM_ROUNDS: usize = 8;

/// For backends' `pull`: runs `claim` (one claim: the jobs it leased and
/// read, and those it leased but could not read), hands each unreadable
/// job to `kill` (which marks it `Dead` through its lease with the reason
/// as `last_error`, and stores [`Unreadable::readable`] in its column, so
/// that `get` and `list` can show it), and claims again as many as it
/// killed, so that a pull comes back short only when the queue had no
/// more (a worker takes a short pull for an empty queue), or after
/// [`CLAIM_ROUNDS`] claims that met unreadable jobs. Returns the jobs in
/// pull order (priority, `run_at`, id). Such a pull takes several
/// statements, each atomic.
///
/// Failing the pull instead would leave every job it leased to no one
/// until the leases expired, and the unreadable one would come back at
/// each expiry: a poison job stalling its queue and spending the attempts
/// of the jobs pulled with it. A kill that fails is logged; the job comes
/// back when its lease expires and is killed then, or, on its last
/// attempt, dies with the lease's expiry as its error. An error of a claim
/// after the first is logged, and the jobs leased so far are returned
/// (the error itself when there are none).
pub async fn pull_readable<C, F, K, KF>(
    request: &PullRequest,
    mut claim: C,
    mut kill: K,
) -> Result<Vec<LeasedJob>>
where
    C: FnMut(PullRequest) -> F,
    F: Future<Output = Result<(Vec<LeasedJob>, Vec<Unreadable>)>>,
    K: FnMut(Unreadable) -> KF,
    KF: Future<Output = Result<()>>,
{
    let mut leased = Vec::new();
    let mut round = Some(request.clone());
    for _ in 0..CLAIM_ROUNDS {
        let Some(this) = round.take() else { break };
        let batch = this.clone();
        let (jobs, unreadable) = match claim(this).await {
            Ok(claimed) => claimed,
            Err(e) if leased.is_empty() => return Err(e),
            Err(e) => {
                tracing::warn!(error = %e, "a claim replacing unreadable jobs failed");
                break;
            }
        };
        if leased.is_empty() {
            leased = jobs;
        } else {
            leased.extend(jobs);
        }
        if unreadable.is_empty() {
            break;
        }
        let killed = u32::try_from(unreadable.len()).unwrap_or(u32::MAX);
        for job in unreadable {
            let id = job.lease.job_id;
            tracing::error!(job = id, reason = %job.reason, "a pulled job cannot be read; marking it dead");
            if let Err(e) = kill(job).await {
                tracing::warn!(job = id, error = %e, "could not mark an unreadable job dead");
            }
        }
        round = Some(batch.batch(killed));
    }
    leased.sort_unstable_by_key(|l| (l.job.priority, l.job.run_at, l.job.id));
    Ok(leased)
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

/// Whether a retry after `delay` (checked) leaves its job due at once,
/// so that its queue's subscribers are to be woken: stores keep whole
/// microseconds, rounding down, so a delay under one is none.
pub fn retry_due_at_once(delay: Duration) -> bool {
    delay < Duration::MICROSECOND
}

/// Checks the result handed to `complete`.
pub fn check_result(result: Option<&serde_json::Value>) -> Result<()> {
    result.map_or(Ok(()), |r| crate::job::check_json("result", r))
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Mutex;

    use super::*;
    use crate::job::leased_for_tests;

    /// A queue of jobs, `true` for readable ones, claimed from the front in
    /// id order (ids from 1); returns what `pull_readable` returned and the
    /// ids it killed.
    async fn pull(queue: &[bool], batch: u32) -> (Result<Vec<JobId>>, Vec<JobId>) {
        let jobs: Mutex<VecDeque<(JobId, bool)>> =
            Mutex::new((1..).zip(queue.iter().copied()).collect());
        let killed = Mutex::new(Vec::new());
        let claim = |request: PullRequest| {
            let mut jobs = jobs.lock().unwrap();
            let n = jobs.len().min(request.batch as usize);
            let mut claimed = (Vec::new(), Vec::new());
            for (id, readable) in jobs.drain(..n) {
                let lease = Lease {
                    job_id: id,
                    token: 1,
                };
                if readable {
                    claimed.0.push(LeasedJob {
                        lease,
                        job: leased_for_tests(id),
                    });
                } else {
                    claimed.1.push(Unreadable::new(
                        lease,
                        "payload",
                        b"[1e400]",
                        "out of range",
                    ));
                }
            }
            std::future::ready(Ok(claimed))
        };
        let kill = |job: Unreadable| {
            killed.lock().unwrap().push(job.lease.job_id);
            std::future::ready(Ok(()))
        };
        let request = PullRequest::queue("q").batch(batch);
        let leased = pull_readable(&request, claim, kill).await;
        let leased = leased.map(|l| l.iter().map(|l| l.job.id).collect());
        (leased, killed.into_inner().unwrap())
    }

    #[tokio::test]
    async fn unreadable_jobs_are_killed_and_replaced_up_to_the_batch() {
        let (leased, killed) = pull(&[true, false, false, true, true], 2).await;
        assert_eq!((leased.unwrap(), killed), (vec![1, 4], vec![2, 3]));
        // Never more than the batch, never a readable job killed.
        let (leased, killed) = pull(&[false, true, true, true], 2).await;
        assert_eq!((leased.unwrap(), killed), (vec![2, 3], vec![1]));
    }

    #[tokio::test]
    async fn a_pull_stops_after_its_claim_rounds() {
        let mut queue = vec![false; CLAIM_ROUNDS];
        queue.push(true);
        let (leased, killed) = pull(&queue, 1).await;
        assert_eq!(leased.unwrap(), Vec::<JobId>::new());
        assert_eq!(killed.len(), CLAIM_ROUNDS);
        let (leased, _) = pull(&queue[1..], 1).await;
        assert_eq!(leased.unwrap(), vec![CLAIM_ROUNDS as JobId]);
    }

    #[tokio::test]
    async fn a_failed_later_claim_returns_what_was_leased() {
        let request = PullRequest::queue("q").batch(2);
        let mut round = 0;
        let claim = |_: PullRequest| {
            round += 1;
            let lease = |id| Lease {
                job_id: id,
                token: 1,
            };
            std::future::ready(match round {
                1 => Ok((
                    vec![LeasedJob {
                        lease: lease(1),
                        job: leased_for_tests(1),
                    }],
                    vec![Unreadable::new(lease(2), "payload", b"x", "bad")],
                )),
                _ => Err(Error::transient("gone")),
            })
        };
        let leased = pull_readable(&request, claim, |_| std::future::ready(Ok(())))
            .await
            .expect("the first round's job");
        assert_eq!(leased.len(), 1);
    }
}
