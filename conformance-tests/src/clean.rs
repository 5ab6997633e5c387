//! Deleting finished jobs.

use relayq_core::{Error, JobStatus};
use time::Duration;

use crate::harness::{Harness, job};
use crate::lease::assert_lost;

/// `clean` deletes jobs of the given terminal status last updated before
/// `before`, and nothing else.
pub async fn clean_deletes_only_old_terminal_jobs(h: Harness) {
    let t0 = h.now();
    let done_old = h.push(job("k", 1)).await;
    let dead_old = h.push(job("k", 2)).await;
    let pending = h.push(job("k", 3).delay(Duration::days(1))).await;
    let leased = h.pull("default", 2).await;
    h.backend
        .complete(&leased[0].lease, None)
        .await
        .expect("complete");
    h.backend.kill(&leased[1].lease, "x").await.expect("kill");
    h.advance(Duration::hours(1));
    let done_new = h.push(job("k", 4)).await;
    let leased = h.pull_one("default").await;
    h.backend
        .complete(&leased.lease, None)
        .await
        .expect("complete");

    let before = t0 + Duration::minutes(1);
    assert_eq!(
        h.backend
            .clean(JobStatus::Done, before)
            .await
            .expect("clean"),
        1
    );
    assert_eq!(h.backend.get(done_old).await.expect("get"), None);
    for id in [dead_old, pending, done_new] {
        assert!(
            h.backend.get(id).await.expect("get").is_some(),
            "job {id} kept"
        );
    }
    assert_eq!(
        h.backend
            .clean(JobStatus::Cancelled, h.now())
            .await
            .expect("clean"),
        0
    );
    assert_eq!(
        h.backend.clean(JobStatus::Dead, t0).await.expect("clean"),
        0,
        "before is exclusive"
    );
    // Stores keep whole microseconds; a cutoff between two still compares
    // exactly: the job died at t0, before t0 + 500 ns.
    assert_eq!(
        h.backend
            .clean(JobStatus::Dead, t0 + Duration::nanoseconds(500))
            .await
            .expect("clean"),
        1,
        "a cutoff with nanoseconds compares exactly"
    );
    assert_eq!(h.backend.get(dead_old).await.expect("get"), None);
    h.advance(Duration::seconds(1));
    assert_eq!(
        h.backend
            .clean(JobStatus::Done, h.now())
            .await
            .expect("clean"),
        1
    );
    assert_eq!(h.job(pending).await.status, JobStatus::Pending);
}

/// A cutoff anywhere in `time`'s range, at any offset, is a cutoff: one
/// past the years a store holds (1–9999) cleans every job of the status,
/// one before them none; no store fails on it, or panics.
pub async fn clean_takes_any_cutoff(h: Harness) {
    use time::macros::datetime;
    let done = h.push(job("k", 1)).await;
    let leased = h.pull_one("default").await;
    h.backend
        .complete(&leased.lease, None)
        .await
        .expect("complete");
    // Before the years held: nothing is older. After them: every job is,
    // but no job is dead.
    for (status, before) in [
        (JobStatus::Done, datetime!(-9999-01-01 0:00 UTC)),
        (JobStatus::Done, datetime!(0001-01-01 0:00 UTC)),
        (JobStatus::Done, datetime!(0001-01-01 0:30 +01:00)),
        (JobStatus::Done, datetime!(-9999-01-01 0:00 +23:59:59)),
        (JobStatus::Dead, datetime!(9999-12-31 23:00 -05:00)),
        (
            JobStatus::Dead,
            datetime!(+9999-12-31 23:59:59.999_999_999 -23:59:59),
        ),
    ] {
        assert_eq!(
            h.backend.clean(status, before).await.expect("clean"),
            0,
            "{status} before {before}"
        );
    }
    assert_eq!(h.job(done).await.status, JobStatus::Done);
    assert_eq!(
        h.backend
            .clean(JobStatus::Done, datetime!(9999-12-31 23:00 -05:00))
            .await
            .expect("clean"),
        1
    );
    assert_eq!(h.backend.get(done).await.expect("get"), None);
}

/// A job updated at the last microsecond relayq stamps (the end of the
/// year 9999) is older than any cutoff past it, and a job updated at the
/// first (the start of the year 1) is older than none at or before it.
pub async fn clean_takes_jobs_stamped_at_the_ends_of_the_years(h: Harness) {
    use time::macros::datetime;
    let last = datetime!(9999-12-31 23:59:59.999_999 UTC);
    for past_last in [
        datetime!(9999-12-31 23:59:59.999_999_5 UTC),
        datetime!(+9999-12-31 23:59:59.999_999_999 -23:59:59),
    ] {
        h.clock.set(last - Duration::hours(1));
        let done = h.push(job("k", 1)).await;
        let leased = h.pull_one("default").await;
        h.clock.set(last);
        h.backend
            .complete(&leased.lease, None)
            .await
            .expect("complete");
        assert_eq!(h.job(done).await.updated_at, last);
        assert_eq!(
            h.backend.clean(JobStatus::Done, last).await.expect("clean"),
            0
        );
        assert_eq!(
            h.backend
                .clean(JobStatus::Done, past_last)
                .await
                .expect("clean"),
            1,
            "before {past_last}"
        );
    }
    let first = datetime!(0001-01-01 0:00 UTC);
    h.clock.set(first);
    let dead = h.push(job("k", 2)).await;
    let leased = h.pull_one("default").await;
    h.backend.kill(&leased.lease, "stop").await.expect("kill");
    assert_eq!(h.job(dead).await.updated_at, first);
    assert_eq!(
        h.backend
            .clean(JobStatus::Dead, first)
            .await
            .expect("clean"),
        0
    );
    assert_eq!(
        h.backend
            .clean(JobStatus::Dead, first + Duration::nanoseconds(1))
            .await
            .expect("clean"),
        1
    );
}

/// Asking to clean `Pending` or `Processing` jobs is `InvalidInput` naming
/// `status`, and deletes nothing.
pub async fn clean_rejects_active_statuses(h: Harness) {
    let id = h.push(job("k", 1)).await;
    h.advance(Duration::hours(1));
    for status in [JobStatus::Pending, JobStatus::Processing] {
        match h.backend.clean(status, h.now()).await {
            Err(Error::InvalidInput {
                field: "status", ..
            }) => {}
            other => panic!("expected InvalidInput naming status, got {other:?}"),
        }
    }
    assert_eq!(h.job(id).await.status, JobStatus::Pending);
}

/// Ids are never reused, even once every job was cleaned: a lease kept
/// from a cleaned job (id and token) can never match a later job, which
/// fencing relies on.
pub async fn ids_are_not_reused_after_clean(h: Harness) {
    let first = h.push(job("k", 1)).await;
    let second = h.push(job("k", 2)).await;
    let mut stale = Vec::new();
    for _ in 0..2 {
        let leased = h.pull_one("default").await;
        h.backend
            .complete(&leased.lease, None)
            .await
            .expect("complete");
        stale.push(leased.lease);
    }
    h.advance(Duration::hours(1));
    assert_eq!(
        h.backend
            .clean(JobStatus::Done, h.now())
            .await
            .expect("clean"),
        2
    );
    let next = h.push(job("k", 3)).await;
    assert!(next > first.max(second), "{next} after {first}, {second}");
    let leased = h.pull_one("default").await;
    for lease in stale {
        // The cleaned job's lease completes nothing.
        assert_lost(h.backend.complete(&lease, None).await, lease);
    }
    assert_eq!(h.job(next).await.status, JobStatus::Processing);
    h.backend
        .complete(&leased.lease, None)
        .await
        .expect("the new job's own lease");
}
