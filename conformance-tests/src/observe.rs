//! Reading: get, stats, list with filters and cursors.

use std::collections::BTreeSet;

use relayq_core::{Backend, JobId, JobStatus, ListFilter, StatusCounts};
use time::Duration;

use crate::harness::{Harness, job};

/// `get` of an id that was never stored is `None`, not an error.
pub async fn get_of_a_missing_job_is_none(h: Harness) {
    assert_eq!(h.backend.get(1).await.expect("get"), None);
    let id = h.push(job("k", 1)).await;
    assert_eq!(h.backend.get(id + 1_000).await.expect("get"), None);
    assert_eq!(h.backend.get(-1).await.expect("get"), None);
}

/// `stats` counts every job by queue and status; empty queues are absent.
pub async fn stats_count_per_queue_and_status(h: Harness) {
    assert!(h.backend.stats().await.expect("stats").queues.is_empty());
    for n in 0..4 {
        h.push(job("k", n).queue("a")).await;
    }
    h.push(job("k", 9).queue("b")).await;
    h.push(job("k", 10).queue("b").delay(Duration::hours(1)))
        .await;
    let a = h.pull("a", 2).await;
    h.backend
        .complete(&a[0].lease, None)
        .await
        .expect("complete");
    let b = h.pull_one("b").await;
    h.backend.kill(&b.lease, "x").await.expect("kill");

    let stats = h.backend.stats().await.expect("stats");
    assert_eq!(stats.queues.len(), 2);
    let expect_a = StatusCounts {
        pending: 2,
        processing: 1,
        done: 1,
        ..StatusCounts::default()
    };
    let expect_b = StatusCounts {
        pending: 1,
        dead: 1,
        ..StatusCounts::default()
    };
    assert_eq!(stats.queue("a"), expect_a);
    assert_eq!(stats.queue("b"), expect_b);
    assert_eq!(stats.queue("none"), StatusCounts::default());
}

async fn ids(h: &Harness, filter: ListFilter) -> Vec<JobId> {
    let page = h.backend.list(&filter).await.expect("list");
    page.jobs.iter().map(|j| j.id).collect()
}

/// Each filter narrows the list to exactly the matching jobs, by ascending id.
pub async fn list_filters_by_status_queue_and_kind(h: Harness) {
    let mut mail = Vec::new();
    let mut sms = Vec::new();
    for n in 0..6 {
        let kind = if n % 2 == 0 { "email" } else { "sms" };
        let queue = if n < 3 { "q1" } else { "q2" };
        let id = h.push(job(kind, n).queue(queue)).await;
        if kind == "email" { &mut mail } else { &mut sms }.push(id);
    }
    let leased = h.pull("q1", 1).await;
    let processing = leased[0].job.id;

    assert_eq!(ids(&h, ListFilter::new().kind("email")).await, mail);
    assert_eq!(ids(&h, ListFilter::new().kind("sms")).await, sms);
    assert_eq!(
        ids(&h, ListFilter::new().status(JobStatus::Processing)).await,
        vec![processing]
    );
    let q2 = ids(&h, ListFilter::new().queue("q2")).await;
    assert_eq!(q2.len(), 3);
    let q2_email = ids(&h, ListFilter::new().queue("q2").kind("email")).await;
    assert_eq!(q2_email, vec![mail[2]]);
    let pending_q1 = ids(&h, ListFilter::new().queue("q1").status(JobStatus::Pending)).await;
    assert_eq!(pending_q1.len(), 2);
    assert!(!pending_q1.contains(&processing));
    assert!(
        ids(&h, ListFilter::new().status(JobStatus::Done))
            .await
            .is_empty()
    );
    assert!(ids(&h, ListFilter::new().kind("nope")).await.is_empty());
}

/// Walking pages by cursor yields every job once, in id order, with `next`
/// `None` exactly on the last page — even when jobs change status meanwhile.
pub async fn list_pages_have_no_gaps_or_repeats(h: Harness) {
    let mut all = Vec::new();
    for n in 0..25 {
        all.push(h.push(job("k", n)).await);
    }
    let mut seen = Vec::new();
    let mut after = None;
    let mut pages = 0;
    loop {
        let page = h
            .backend
            .list(&ListFilter::new().after(after).limit(10))
            .await
            .expect("list");
        pages += 1;
        seen.extend(page.jobs.iter().map(|j| j.id));
        if pages == 1 {
            // Changing jobs between pages must not disturb the walk.
            h.pull("default", 5).await;
        }
        match page.next {
            Some(next) => {
                assert_eq!(Some(next), page.jobs.last().map(|j| j.id));
                after = Some(next);
            }
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, all);
    assert_eq!(seen.iter().collect::<BTreeSet<_>>().len(), 25);

    let exact = h
        .backend
        .list(&ListFilter::new().limit(25))
        .await
        .expect("list");
    assert_eq!(
        (exact.jobs.len(), exact.next),
        (25, None),
        "a full last page has no next"
    );
    let tail = h
        .backend
        .list(&ListFilter::new().after(Some(all[24])))
        .await
        .expect("list");
    assert_eq!((tail.jobs.len(), tail.next), (0, None));

    // A filtered walk: the cursor skips what the filter leaves out.
    let mut wanted = Vec::new();
    for n in 0..30 {
        let queue = if n % 3 == 0 { "picked" } else { "other" };
        let id = h.push(job("k", n).queue(queue)).await;
        if queue == "picked" {
            wanted.push(id);
        }
    }
    let (mut seen, mut after) = (Vec::new(), None);
    loop {
        let page = h
            .backend
            .list(&ListFilter::new().queue("picked").after(after).limit(4))
            .await
            .expect("list");
        assert!(page.jobs.iter().all(|j| j.queue == "picked"));
        seen.extend(page.jobs.iter().map(|j| j.id));
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    assert_eq!(seen, wanted);
}

/// A walk through pages goes on past changes made between them: a job
/// pushed meanwhile comes on a later page, the cursor's own job cleaned
/// meanwhile leaves the walk in place, and a walk filtered by status
/// sees the jobs that have the status when their page is read. `stats`
/// drops a queue once `clean` has emptied it.
pub async fn list_walks_past_changes_between_pages(h: Harness) {
    let mut first = Vec::new();
    for n in 0..6 {
        first.push(h.push(job("k", n).queue("walk")).await);
    }
    let page = h
        .backend
        .list(&ListFilter::new().queue("walk").limit(3))
        .await
        .expect("list");
    assert_eq!(
        page.jobs.iter().map(|j| j.id).collect::<Vec<_>>(),
        first[..3]
    );
    // The cursor's own job finishes and is cleaned; another is pushed.
    let leased = h.pull("walk", 3).await;
    for l in &leased {
        h.backend.complete(&l.lease, None).await.expect("complete");
    }
    let later = h.now() + Duration::seconds(1);
    assert_eq!(
        h.backend
            .clean(JobStatus::Done, later)
            .await
            .expect("clean"),
        3
    );
    let pushed = h.push(job("k", 6).queue("walk")).await;
    let mut rest = Vec::new();
    let mut after = page.next;
    while let Some(cursor) = after {
        let page = h
            .backend
            .list(&ListFilter::new().queue("walk").after(Some(cursor)).limit(3))
            .await
            .expect("list");
        rest.extend(page.jobs.iter().map(|j| j.id));
        after = page.next;
    }
    let mut expected = first[3..].to_vec();
    expected.push(pushed);
    assert_eq!(rest, expected);

    // Filtered by status: the first page's job leaves `Pending` before the
    // second page is read, a later one as well; neither is seen twice,
    // and the later one is not seen at all.
    let pending = |after| {
        ListFilter::new()
            .queue("walk")
            .status(JobStatus::Pending)
            .after(after)
            .limit(2)
    };
    let page = h.backend.list(&pending(None)).await.expect("list");
    assert_eq!(
        page.jobs.iter().map(|j| j.id).collect::<Vec<_>>(),
        first[3..5]
    );
    let leased = h.pull("walk", 4).await;
    assert_eq!(leased.len(), 4);
    let page = h.backend.list(&pending(page.next)).await.expect("list");
    assert!(page.jobs.is_empty() && page.next.is_none(), "{page:?}");

    // Emptied by clean, the queue leaves the stats.
    for l in &leased {
        h.backend.complete(&l.lease, None).await.expect("complete");
    }
    let counts = h.backend.stats().await.expect("stats").queue("walk");
    assert_eq!(counts.done, 4);
    assert_eq!(
        h.backend
            .clean(JobStatus::Done, later)
            .await
            .expect("clean"),
        4
    );
    let stats = h.backend.stats().await.expect("stats");
    assert!(!stats.queues.contains_key("walk"), "{stats:?}");
}

/// For a backend's own tests: pushes a job with unique key `"held"` and
/// returns its id, for the caller to mark `Cancelled` (a status reserved
/// in SPEC, which no call makes yet) in its store's own way, then to hand
/// to [`a_cancelled_job_reads_back`].
pub async fn push_a_job_to_cancel(h: &Harness) -> JobId {
    h.push(job("k", 1).unique_key("held")).await
}

/// Checks that a job marked `Cancelled` behind the traits' back (see
/// [`push_a_job_to_cancel`]) reads back as one: `get`, `list` by status
/// and `stats` show it; `pull` never leases it; it holds its unique key no
/// more; and `clean` takes it, as a finished job.
pub async fn a_cancelled_job_reads_back(h: &Harness, id: JobId) {
    assert_eq!(h.job(id).await.status, JobStatus::Cancelled);
    let page = h
        .backend
        .list(&ListFilter::new().status(JobStatus::Cancelled))
        .await
        .expect("list");
    assert_eq!(page.jobs.iter().map(|j| j.id).collect::<Vec<_>>(), [id]);
    let stats = h.backend.stats().await.expect("stats");
    assert_eq!(stats.queue("default").cancelled, 1, "{stats:?}");
    assert!(
        h.pull("default", 10).await.is_empty(),
        "a cancelled job is never leased"
    );
    let again = h
        .backend
        .push(job("k", 2).unique_key("held"))
        .await
        .expect("push");
    assert!(
        !again.is_duplicate(),
        "a cancelled job holds its key no more"
    );
    h.advance(Duration::days(1));
    let cleaned = h
        .backend
        .clean(JobStatus::Cancelled, h.now())
        .await
        .expect("clean");
    assert_eq!(cleaned, 1);
    assert!(h.backend.get(id).await.expect("get").is_none());
}

/// For a backend's own tests: checks that each job of `unreadable` (its
/// id, and the payload text another program stored in its place, which
/// relayq cannot read as JSON) reads through `get` in `status`, its
/// payload a JSON string holding that text, and that a listing of the
/// store's `total` jobs, them included, reads.
pub async fn unreadable_payloads_read_as_text(
    backend: &dyn Backend,
    unreadable: &[(JobId, &str)],
    status: JobStatus,
    total: usize,
) {
    for &(id, payload) in unreadable {
        let job = backend.get(id).await.expect("get").expect("job");
        assert_eq!(
            (job.status, &*job.payload),
            (status, &serde_json::json!(payload)),
            "job {id}"
        );
    }
    let page = backend.list(&ListFilter::new()).await.expect("list");
    assert_eq!(page.jobs.len(), total);
}
