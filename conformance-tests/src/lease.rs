//! Leases and fencing: expiry, stale holders, extend, retry, kill, release,
//! complete.

use relayq_core::{
    Completion, Error, Job, JobStatus, LEASE_EXPIRED_ERROR, Lease, LeasedJob, MAX_LEASE,
    PullRequest,
};
use serde_json::json;
use time::Duration;

use crate::harness::{Harness, job};

pub(crate) fn assert_lost<T: std::fmt::Debug>(result: Result<T, Error>, lease: Lease) {
    match result {
        Err(Error::LeaseLost { lease: l }) if l == lease => {}
        other => panic!("expected LeaseLost for {lease:?}, got {other:?}"),
    }
}

/// Pushes three jobs and leases them in one pull.
async fn push_and_lease_three(h: &Harness) -> Vec<LeasedJob> {
    for n in 0..3 {
        h.push(job("k", n)).await;
    }
    let leased = h
        .backend
        .pull(&PullRequest::queue("default").batch(3))
        .await
        .expect("pull");
    assert_eq!(leased.len(), 3);
    leased
}

/// A lease is live through `locked_until` and expires after it; the job is
/// then pulled again with attempts + 1 and a larger token.
pub async fn expired_lease_is_pulled_again_with_a_new_token(h: Harness) {
    let id = h.push(job("k", 1)).await;
    let first = h.pull_one("default").await;
    h.advance(Duration::seconds(30));
    assert!(
        h.pull("default", 1).await.is_empty(),
        "live until locked_until"
    );
    assert_eq!(h.job(id).await.status, JobStatus::Processing);
    h.advance(Duration::seconds(1));
    let second = h.pull_one("default").await;
    assert_eq!(second.job.id, id);
    assert_eq!(second.job.attempts, 2);
    assert!(second.lease.token > first.lease.token);
    assert_eq!(
        second.job.locked_until,
        Some(h.now() + Duration::seconds(30))
    );
}

/// With a stale lease (expired and re-leased), complete, retry, kill, extend
/// and release all fail with `LeaseLost` and leave the job untouched; the
/// current holder still completes it, after which its lease is void too.
pub async fn stale_lease_acknowledgements_fail_and_change_nothing(h: Harness) {
    let id = h.push(job("k", 1)).await;
    let stale = h.pull_one("default").await.lease;
    h.advance(Duration::seconds(31));
    let current = h.pull_one("default").await.lease;
    let snapshot = h.job(id).await;
    let b = &h.backend;
    assert_lost(b.complete(&stale, Some(json!("late"))).await, stale);
    assert_lost(b.retry(&stale, Duration::ZERO, "late").await, stale);
    assert_lost(b.kill(&stale, "late").await, stale);
    assert_lost(b.extend(&stale, Duration::minutes(5)).await, stale);
    assert_lost(b.release(&stale).await, stale);
    let lost = b
        .complete_batch(vec![Completion::from(stale)])
        .await
        .expect("complete_batch");
    assert_eq!(lost, vec![stale]);
    assert_eq!(
        h.job(id).await,
        snapshot,
        "stale acknowledgements change nothing"
    );

    let forged = Lease {
        job_id: id,
        token: current.token + 1,
    };
    assert_lost(b.complete(&forged, None).await, forged);
    let missing = Lease {
        job_id: id + 1_000_000,
        token: 1,
    };
    assert_lost(b.complete(&missing, None).await, missing);

    b.complete(&current, None)
        .await
        .expect("current holder completes");
    assert_lost(b.complete(&current, None).await, current);
    assert_lost(b.retry(&current, Duration::ZERO, "again").await, current);
    assert_eq!(h.job(id).await.status, JobStatus::Done);
}

/// How a lease can end while its token stays the job's latest: every way
/// but another pull leasing the job again.
#[derive(Clone, Copy, Debug)]
enum Ending {
    Release,
    RetryToPending,
    RetryToDead,
    Complete,
    Kill,
    /// Expired on the last attempt, then swept `Dead` by a pull.
    Swept,
}

/// A lease ended without the job being leased again, so its token is
/// still the job's latest (release, retry, the last attempt's retry,
/// complete, kill, the sweep of an abandoned last attempt): complete,
/// complete_batch, retry, kill, extend, extend_batch and release with it
/// all fail as lost and change nothing. Only the job's status tells them
/// apart from the live lease.
pub async fn acknowledgements_of_an_ended_lease_fail_and_change_nothing(h: Harness) {
    use Ending::*;
    // The sweep moves the clock past every lease: last.
    for ending in [Release, RetryToPending, RetryToDead, Complete, Kill, Swept] {
        let queue = format!("{ending:?}");
        let last = matches!(ending, RetryToDead | Swept);
        let id = h
            .push(
                job("k", 1)
                    .queue(&queue)
                    .max_attempts(if last { 1 } else { 3 }),
            )
            .await;
        let lease = h.pull_one(&queue).await.lease;
        let b = &h.backend;
        match ending {
            Release => b.release(&lease).await.expect("release"),
            RetryToPending | RetryToDead => {
                b.retry(&lease, Duration::minutes(1), "failed")
                    .await
                    .expect("retry");
            }
            Complete => b.complete(&lease, None).await.expect("complete"),
            Kill => b.kill(&lease, "killed").await.expect("kill"),
            Swept => {
                h.advance(Duration::seconds(31));
                assert!(h.pull(&queue, 10).await.is_empty());
                assert_eq!(h.job(id).await.status, JobStatus::Dead);
            }
        }
        let snapshot = h.job(id).await;
        assert_eq!(snapshot.lease_token, lease.token, "{ending:?}");
        assert_lost(b.complete(&lease, Some(json!("late"))).await, lease);
        assert_lost(b.retry(&lease, Duration::ZERO, "late").await, lease);
        assert_lost(b.kill(&lease, "late").await, lease);
        assert_lost(b.extend(&lease, Duration::minutes(5)).await, lease);
        assert_lost(b.release(&lease).await, lease);
        let lost = b
            .complete_batch(vec![Completion::from(lease)])
            .await
            .expect("complete_batch");
        assert_eq!(lost, vec![lease], "{ending:?}");
        let ends = b
            .extend_batch(&[lease], Duration::minutes(5))
            .await
            .expect("extend_batch");
        assert_eq!(ends, vec![None], "{ending:?}");
        assert_eq!(h.job(id).await, snapshot, "{ending:?} changes nothing");
    }
}

/// A lease past `locked_until` that no pull has taken back yet is still
/// its holder's: it completes (even on the last attempt, which the next
/// pull would have swept `Dead`) and extends.
pub async fn an_expired_lease_not_yet_taken_back_still_acknowledges(h: Harness) {
    let done = h.push(job("k", 1).max_attempts(1)).await;
    let renewed = h.push(job("k", 2)).await;
    let leased = h.pull("default", 2).await;
    h.advance(Duration::seconds(45));
    h.backend
        .complete(&leased[0].lease, Some(json!("late but mine")))
        .await
        .expect("complete");
    let job = h.job(done).await;
    assert_eq!(job.status, JobStatus::Done);
    assert_eq!(job.result, Some(json!("late but mine")));
    let until = h
        .backend
        .extend(&leased[1].lease, Duration::seconds(30))
        .await
        .expect("extend");
    assert_eq!(until, h.now() + Duration::seconds(30));
    assert_eq!(h.job(renewed).await.locked_until, Some(until));
    assert!(h.pull("default", 10).await.is_empty(), "held again");
}

/// A pull sweeps every abandoned last attempt of the queues it names
/// (all of them, whatever its batch size), and they take none of its
/// batch: a batch of one still gets the due job.
pub async fn the_sweep_takes_every_abandoned_last_attempt_whatever_the_batch(h: Harness) {
    let mut abandoned = Vec::new();
    for (n, queue) in [(1, "a"), (2, "a"), (3, "a"), (4, "b"), (5, "b")] {
        abandoned.push(h.push(job("k", n).queue(queue).max_attempts(1)).await);
    }
    for queue in ["a", "b"] {
        assert!(!h.pull(queue, 10).await.is_empty());
    }
    h.advance(Duration::seconds(31));
    let due = h.push(job("k", 6).queue("b")).await;
    let got = h
        .backend
        .pull(&PullRequest::queues(["a", "b"]).batch(1))
        .await
        .expect("pull");
    assert_eq!(got.iter().map(|l| l.job.id).collect::<Vec<_>>(), [due]);
    for id in abandoned {
        let job = h.job(id).await;
        assert_eq!(job.status, JobStatus::Dead, "job {id}");
        assert_eq!(job.last_error.as_deref(), Some(LEASE_EXPIRED_ERROR));
    }
}

/// A last attempt's lease that has not ended (up to and at its very end:
/// expired means `locked_until < now`) is left alone by every pull, of
/// its queue alone or with others: not swept Dead, not re-leased, and its
/// holder still completes it.
pub async fn the_sweep_leaves_a_live_last_attempt_alone(h: Harness) {
    let id = h.push(job("k", 1).queue("a").max_attempts(1)).await;
    let leased = h.pull_one("a").await;
    let before = h.job(id).await;
    for by in [Duration::seconds(29), Duration::seconds(1)] {
        h.advance(by);
        assert!(h.pull("a", 10).await.is_empty());
        let got = h
            .backend
            .pull(&PullRequest::queues(["a", "b"]).batch(10))
            .await
            .expect("pull");
        assert!(got.is_empty(), "{got:?}");
        let job = h.job(id).await;
        assert_eq!(
            (job.status, job.lease_token, job.locked_until, job.attempts),
            (
                JobStatus::Processing,
                before.lease_token,
                before.locked_until,
                1
            ),
            "the live lease is untouched {by} on"
        );
    }
    assert_eq!(h.job(id).await.locked_until, Some(h.now()));
    h.backend
        .complete(&leased.lease, None)
        .await
        .expect("the holder completes it");
    assert_eq!(h.job(id).await.status, JobStatus::Done);
}

/// `extend` moves `locked_until` to `now + by`, so the job stays leased past
/// its first lease, and becomes pullable only after the extension ends.
pub async fn extend_keeps_the_job_invisible_past_its_first_lease(h: Harness) {
    let id = h.push(job("k", 1)).await;
    let leased = h.pull_one("default").await;
    h.advance(Duration::seconds(20));
    let until = h
        .backend
        .extend(&leased.lease, Duration::seconds(60))
        .await
        .expect("extend");
    assert_eq!(until, h.now() + Duration::seconds(60));
    let job = h.job(id).await;
    assert_eq!(job.locked_until, Some(until));
    assert_eq!((job.attempts, job.lease_token), (1, leased.lease.token));

    h.advance(Duration::seconds(40));
    assert!(
        h.pull("default", 1).await.is_empty(),
        "extended past the first lease"
    );
    h.advance(Duration::seconds(20));
    assert!(
        h.pull("default", 1).await.is_empty(),
        "live through the new locked_until"
    );
    h.advance(Duration::seconds(1));
    assert_eq!(h.pull_one("default").await.job.id, id);
}

/// `extend_batch` extends every lease still held to `now + by` in one step
/// and reports, in input order, each one's new end or `None` for a lease
/// no longer held (completed, or expired and re-leased), changing nothing
/// for those; a lease named twice is extended once; an invalid `by`
/// changes nothing.
pub async fn extend_batch_extends_the_held_and_names_the_lost(h: Harness) {
    let leased = push_and_lease_three(&h).await;
    let (held, done, expired) = (leased[0].lease, leased[1].lease, leased[2].lease);
    h.backend.complete(&done, None).await.expect("complete");
    // The first lease is renewed past the others' end; the third expires
    // and is leased again.
    h.advance(Duration::seconds(20));
    h.backend
        .extend(&held, Duration::seconds(30))
        .await
        .expect("extend");
    h.advance(Duration::seconds(11));
    let again = h.pull_one("default").await.lease;
    assert_eq!(again.job_id, expired.job_id);
    let snapshot = (h.job(done.job_id).await, h.job(expired.job_id).await);

    h.advance(Duration::seconds(5));
    let by = Duration::seconds(90);
    let ends = h
        .backend
        .extend_batch(&[held, done, expired, again, held], by)
        .await
        .expect("extend_batch");
    let until = h.now() + by;
    assert_eq!(
        ends,
        vec![Some(until), None, None, Some(until), Some(until)]
    );
    assert_eq!(h.job(held.job_id).await.locked_until, Some(until));
    let renewed = h.job(again.job_id).await;
    assert_eq!(
        (renewed.locked_until, renewed.lease_token),
        (Some(until), again.token)
    );
    assert_eq!(
        h.job(done.job_id).await,
        snapshot.0,
        "a completed job is untouched"
    );
    // A stale lease alone changes nothing, whoever holds the job now.
    let before = h.job(expired.job_id).await;
    assert_eq!(
        h.backend
            .extend_batch(&[expired], Duration::seconds(300))
            .await
            .expect("extend_batch"),
        vec![None]
    );
    assert_eq!(
        h.job(expired.job_id).await,
        before,
        "a stale lease extends nothing"
    );
    let expired_job = h.job(expired.job_id).await;
    assert_eq!(
        expired_job,
        Job {
            locked_until: Some(until),
            updated_at: h.now(),
            ..snapshot.1
        }
    );

    for bad in [
        Duration::ZERO,
        Duration::seconds(-1),
        MAX_LEASE + Duration::seconds(1),
    ] {
        match h.backend.extend_batch(&[held], bad).await {
            Err(Error::InvalidInput { field: "by", .. }) => {}
            other => panic!("extend_batch by {bad}: expected InvalidInput, got {other:?}"),
        }
    }
    assert_eq!(
        h.job(held.job_id).await.locked_until,
        Some(until),
        "nothing changed"
    );
    assert_eq!(
        h.backend.extend_batch(&[], by).await.expect("empty"),
        Vec::<Option<time::OffsetDateTime>>::new()
    );
}

/// `retry` puts the job back to `Pending` at `now + delay` with the error
/// recorded; it runs again once due.
pub async fn retry_reschedules_after_the_delay(h: Harness) {
    let id = h.push(job("k", 1)).await;
    let first = h.pull_one("default").await;
    let status = h
        .backend
        .retry(&first.lease, Duration::seconds(10), "boom")
        .await
        .expect("retry");
    assert_eq!(status, JobStatus::Pending);
    let job = h.job(id).await;
    assert_eq!(job.status, JobStatus::Pending);
    assert_eq!(job.run_at, h.now() + Duration::seconds(10));
    assert_eq!(job.last_error.as_deref(), Some("boom"));
    assert_eq!(job.attempts, 1);
    assert_eq!(job.locked_until, None);
    assert_lost(h.backend.complete(&first.lease, None).await, first.lease);

    h.advance(Duration::seconds(9));
    assert!(h.pull("default", 1).await.is_empty());
    h.advance(Duration::seconds(1));
    let second = h.pull_one("default").await;
    assert_eq!(second.job.attempts, 2);
    assert!(second.lease.token > first.lease.token);
    assert_eq!(second.job.last_error.as_deref(), Some("boom"));
}

/// `retry` on the last allowed attempt makes the job `Dead`.
pub async fn retry_on_the_last_attempt_is_dead(h: Harness) {
    let id = h.push(job("k", 1).max_attempts(2)).await;
    let first = h.pull_one("default").await;
    let status = h.backend.retry(&first.lease, Duration::ZERO, "one").await;
    assert_eq!(status.expect("retry"), JobStatus::Pending);
    let second = h.pull_one("default").await;
    let status = h.backend.retry(&second.lease, Duration::ZERO, "two").await;
    assert_eq!(status.expect("retry"), JobStatus::Dead);
    let job = h.job(id).await;
    assert_eq!(job.status, JobStatus::Dead);
    assert_eq!(job.attempts, 2);
    assert_eq!(job.last_error.as_deref(), Some("two"));
    assert_eq!(job.locked_until, None);
    h.advance(Duration::hours(1));
    assert!(h.pull("default", 1).await.is_empty());
}

/// An expired lease on the last allowed attempt is not re-leased: the next
/// pull of its queue marks it `Dead`, saying the lease expired.
pub async fn abandoned_last_attempt_is_dead_with_a_reason(h: Harness) {
    let id = h.push(job("k", 1).max_attempts(1)).await;
    let other = h.push(job("k", 2).queue("other").max_attempts(1)).await;
    let lease = h.pull_one("default").await.lease;
    h.pull_one("other").await;
    h.advance(Duration::seconds(31));
    assert!(h.pull("default", 10).await.is_empty());
    let job = h.job(id).await;
    assert_eq!(job.status, JobStatus::Dead);
    assert_eq!(job.last_error.as_deref(), Some(LEASE_EXPIRED_ERROR));
    assert_eq!(job.attempts, 1);
    assert_eq!(job.locked_until, None);
    assert_lost(h.backend.complete(&lease, None).await, lease);
    assert_eq!(
        h.job(other).await.status,
        JobStatus::Processing,
        "only the pulled queue is swept"
    );
}

/// `kill` makes the job `Dead` at once, whatever attempts remain.
pub async fn kill_is_dead_at_once(h: Harness) {
    let id = h.push(job("k", 1)).await;
    let leased = h.pull_one("default").await;
    h.backend
        .kill(&leased.lease, "unprocessable")
        .await
        .expect("kill");
    let job = h.job(id).await;
    assert_eq!(job.status, JobStatus::Dead);
    assert_eq!(job.attempts, 1);
    assert_eq!(job.last_error.as_deref(), Some("unprocessable"));
    assert_eq!((job.locked_until, job.updated_at), (None, h.now()));
    assert!(h.pull("default", 1).await.is_empty());
}

/// `release` returns the job to `Pending` without spending the attempt,
/// due at once and in its place in line (its `run_at` kept, so ahead of
/// jobs pushed while it ran), and the released lease stays void after the
/// job is leased again.
pub async fn release_gives_back_the_attempt_and_voids_the_lease(h: Harness) {
    let id = h.push(job("k", 1).max_attempts(1)).await;
    let pushed = h.job(id).await;
    h.advance(Duration::seconds(10));
    let first = h.pull_one("default").await;
    let behind = h.push(job("k", 2)).await;
    h.advance(Duration::seconds(1));
    h.backend.release(&first.lease).await.expect("release");
    let job = h.job(id).await;
    assert_eq!(
        job,
        Job {
            attempts: 0,
            lease_token: first.lease.token,
            updated_at: h.now(),
            ..pushed
        },
        "pending again, as pushed but for its token"
    );
    assert_lost(h.backend.release(&first.lease).await, first.lease);

    let second = h.pull_one("default").await;
    assert_eq!(second.job.id, id, "ahead of the job pushed while it ran");
    assert_eq!(
        second.job.attempts, 1,
        "the released attempt was given back"
    );
    assert!(
        second.lease.token > first.lease.token,
        "tokens are never reused"
    );
    assert_lost(h.backend.complete(&first.lease, None).await, first.lease);
    assert_lost(h.backend.release(&first.lease).await, first.lease);
    h.backend
        .complete(&second.lease, None)
        .await
        .expect("complete");
    assert_eq!(h.job(id).await.status, JobStatus::Done);
    assert_eq!(h.pull_one("default").await.job.id, behind);
}

/// `complete` stores the result and ends the lease.
pub async fn complete_stores_the_result(h: Harness) {
    let id = h.push(job("k", 1)).await;
    let leased = h.pull_one("default").await;
    h.advance(Duration::seconds(2));
    let result = json!({"sent": true, "ids": [1, 2, 3], "note": "ünïcode"});
    h.backend
        .complete(&leased.lease, Some(result.clone()))
        .await
        .expect("complete");
    let job = h.job(id).await;
    assert_eq!(job.status, JobStatus::Done);
    assert_eq!(job.result, Some(result));
    assert_eq!(job.locked_until, None);
    assert_eq!(job.updated_at, h.now());
    assert_eq!(job.attempts, 1);
    h.advance(Duration::hours(1));
    assert!(h.pull("default", 1).await.is_empty());
}

/// `complete_batch` completes every held lease and reports exactly the lost ones.
pub async fn complete_batch_is_fenced_per_lease(h: Harness) {
    let leased = push_and_lease_three(&h).await;
    let released = leased[1].lease;
    h.backend.release(&released).await.expect("release");
    let again = h.pull_one("default").await;
    assert_eq!(again.job.id, released.job_id);

    let completions = leased
        .iter()
        .map(|l| Completion {
            lease: l.lease,
            result: Some(json!(l.job.id)),
        })
        .collect();
    let lost = h
        .backend
        .complete_batch(completions)
        .await
        .expect("complete_batch");
    assert_eq!(lost, vec![released]);
    for l in [&leased[0], &leased[2]] {
        let job = h.job(l.job.id).await;
        assert_eq!(job.status, JobStatus::Done);
        assert_eq!(job.result, Some(json!(l.job.id)));
    }
    let still = h.job(released.job_id).await;
    assert_eq!(still.status, JobStatus::Processing);
    assert_eq!(still.lease_token, again.lease.token);
    assert_eq!(
        h.backend.complete_batch(Vec::new()).await.expect("empty"),
        vec![]
    );

    // A lease named twice completes once, with the first naming's result,
    // and is reported lost once.
    let named = |result: &str| Completion {
        lease: again.lease,
        result: Some(serde_json::json!(result)),
    };
    let twice = vec![named("first"), named("second")];
    let lost = h
        .backend
        .complete_batch(twice)
        .await
        .expect("complete_batch");
    assert_eq!(lost, vec![again.lease]);
    let done = h.job(again.job.id).await;
    assert_eq!(done.status, JobStatus::Done);
    assert_eq!(done.result, Some(serde_json::json!("first")));
}
