//! Leasing: order, visibility, batch and queue selection, concurrency.

use std::collections::HashMap;

use relayq_core::{Completion, JobStatus, LeasedJob, NewJob, PullRequest};
use time::Duration;

use crate::harness::{Harness, job};
use crate::lease::assert_lost;

/// Lower priority first, then earlier `run_at`, then lower id — both in one
/// batch (which comes back in that order) and one job at a time.
pub async fn pull_orders_by_priority_then_run_at_then_id(h: Harness) {
    let now = h.now();
    for one_at_a_time in [false, true] {
        let queue = if one_at_a_time { "single" } else { "batch" };
        let j1 = h.push(job("j1", 1).queue(queue)).await;
        let j2 = h
            .push(
                job("j2", 2)
                    .queue(queue)
                    .run_at(now - Duration::seconds(10)),
            )
            .await;
        let j3 = h.push(job("j3", 3).queue(queue).priority(-1)).await;
        let j4 = h.push(job("j4", 4).queue(queue)).await;
        let j5 = h
            .push(
                job("j5", 5)
                    .queue(queue)
                    .priority(10)
                    .run_at(now - Duration::hours(1)),
            )
            .await;
        let j6 = h
            .push(job("j6", 6).queue(queue).priority(i16::MIN).run_at(now))
            .await;
        let expected = vec![j6, j3, j2, j1, j4, j5];
        let got: Vec<_> = if one_at_a_time {
            let mut got = Vec::new();
            for _ in 0..6 {
                got.push(h.pull_one(queue).await.job.id);
            }
            got
        } else {
            h.pull(queue, 10).await.iter().map(|l| l.job.id).collect()
        };
        assert_eq!(got, expected, "pull order ({queue})");
        assert!(h.pull(queue, 10).await.is_empty());
    }
}

/// A pulled job is `Processing` with attempts + 1, a fresh token and
/// `locked_until = now + lease`, and `get` agrees with what pull returned.
pub async fn pull_sets_the_lease_fields(h: Harness) {
    let id = h.push(job("k", 1)).await;
    h.advance(Duration::seconds(3));
    let leased = h
        .backend
        .pull(&PullRequest::queue("default").lease(Duration::seconds(45)))
        .await
        .expect("pull");
    assert_eq!(leased.len(), 1);
    let leased = &leased[0];
    assert_eq!(leased.lease.job_id, id);
    assert_eq!(leased.lease.token, leased.job.lease_token);
    assert!(leased.lease.token > 0);
    let job = &leased.job;
    assert_eq!(job.status, JobStatus::Processing);
    assert_eq!(job.attempts, 1);
    assert_eq!(job.locked_until, Some(h.now() + Duration::seconds(45)));
    assert_eq!(job.updated_at, h.now());
    assert_eq!(&h.job(id).await, job);
}

/// A delayed job is not eligible until `run_at <= now`.
pub async fn delayed_job_stays_invisible_until_due(h: Harness) {
    let id = h.push(job("later", 1).delay(Duration::seconds(60))).await;
    assert!(h.pull("default", 10).await.is_empty());
    h.advance(Duration::seconds(59));
    assert!(h.pull("default", 10).await.is_empty());
    h.advance(Duration::seconds(1));
    assert_eq!(h.pull_one("default").await.job.id, id);
}

/// Due is judged on the store's clock at the pull: a job pushed due is not
/// handed out once the clock has moved back before its `run_at`.
pub async fn pull_judges_due_on_its_own_clock(h: Harness) {
    let id = h.push(job("now", 1)).await;
    h.advance(Duration::seconds(-1));
    assert!(
        h.pull("default", 10).await.is_empty(),
        "not due at now - 1 s"
    );
    let both = h
        .backend
        .pull(&PullRequest::queues(["default", "other"]).batch(10))
        .await
        .expect("pull");
    assert!(both.is_empty(), "not due for a pull of two queues either");
    h.advance(Duration::seconds(1));
    assert_eq!(h.pull_one("default").await.job.id, id);
}

/// A job ahead in pull order but not due on the pull's clock does not hold
/// back the due jobs behind it, however small the batch, and keeps its
/// place for when it is due.
pub async fn job_not_due_yet_holds_back_no_due_job_behind_it(h: Harness) {
    let early = h.push(job("early", 1).priority(0)).await;
    h.advance(Duration::seconds(-1));
    let first = h.push(job("due", 2).priority(5)).await;
    let second = h.push(job("due", 3).priority(5)).await;
    let ids = |leased: Vec<LeasedJob>| leased.iter().map(|l| l.job.id).collect::<Vec<_>>();
    assert_eq!(ids(h.pull("default", 1).await), [first], "a batch of one");
    assert_eq!(ids(h.pull("default", 10).await), [second]);
    h.advance(Duration::seconds(1));
    assert_eq!(ids(h.pull("default", 10).await), [early]);
}

/// A delayed job that became due takes its place by priority ahead of due
/// jobs of lower priority pushed before it.
pub async fn delayed_job_is_ordered_by_priority_once_due(h: Harness) {
    let low = h.push(job("low", 1).priority(5)).await;
    let urgent = h
        .push(job("urgent", 2).priority(0).delay(Duration::seconds(10)))
        .await;
    h.advance(Duration::seconds(10));
    let got: Vec<_> = h
        .pull("default", 10)
        .await
        .iter()
        .map(|l| l.job.id)
        .collect();
    assert_eq!(got, [urgent, low]);
}

/// A batch smaller than the due jobs takes the first of them in pull order
/// (priority, then `run_at`, then id), passing over the jobs scheduled for
/// later at the same priorities and at more urgent ones, from one queue and
/// from several (the jobs spread across them, and a queue named twice
/// counting once).
pub async fn small_batches_take_due_jobs_in_pull_order_past_scheduled_ones(h: Harness) {
    let now = h.now();
    for queues in [
        vec!["one"],
        vec!["many", "other"],
        vec!["twice", "again", "twice"],
    ] {
        let push = |n: i64, priority: i16, run_at: time::OffsetDateTime| {
            let queue = queues[n as usize % queues.len()];
            h.push(job("k", n).queue(queue).priority(priority).run_at(run_at))
        };
        // Scheduled for later, at the most urgent level and among the due.
        for n in 0..3 {
            push(n, -5, now + Duration::hours(1)).await;
            push(10 + n, 0, now + Duration::minutes(n + 1)).await;
        }
        // In id order: late, tied, early; in pull order: early, late, tied.
        let late = push(20, 0, now - Duration::seconds(1)).await;
        let tied_second = push(21, 0, now - Duration::seconds(1)).await;
        let early = push(22, 0, now - Duration::seconds(30)).await;
        let next_level = push(23, 3, now - Duration::hours(2)).await;
        let last_level = push(24, 7, now).await;
        let request = PullRequest::queues(queues.clone()).batch(2);
        let mut got = Vec::new();
        for _ in 0..3 {
            let batch = h.backend.pull(&request).await.expect("pull");
            assert!(batch.len() <= 2);
            got.extend(batch.iter().map(|l| l.job.id));
        }
        assert_eq!(
            got,
            [early, late, tied_second, next_level, last_level],
            "pull order in batches of two ({queues:?})"
        );
        assert!(h.backend.pull(&request).await.expect("pull").is_empty());
    }
}

/// An expired lease with attempts left is pulled again in its place in
/// pull order among the due jobs (by its priority and `run_at`), from one
/// queue and from several.
pub async fn expired_leases_take_their_place_in_pull_order(h: Harness) {
    for queues in [vec!["one"], vec!["many", "other"]] {
        let (first, last) = (queues[0], queues[queues.len() - 1]);
        let start = h.now();
        let expired = h
            .push(
                job("k", 1)
                    .queue(first)
                    .run_at(start - Duration::seconds(60)),
            )
            .await;
        let lease = h.pull_one(first).await.lease;
        h.advance(Duration::seconds(31));
        let now = h.now();
        let later = h.push(job("k", 2).queue(first)).await;
        let urgent = h.push(job("k", 3).queue(first).priority(-1)).await;
        let older = h
            .push(job("k", 4).queue(last).run_at(now - Duration::seconds(120)))
            .await;
        let request = PullRequest::queues(queues.clone());
        let ids = |leased: &[LeasedJob]| leased.iter().map(|l| l.job.id).collect::<Vec<_>>();
        let two = h
            .backend
            .pull(&request.clone().batch(2))
            .await
            .expect("pull");
        assert_eq!(ids(&two), [urgent, older], "{queues:?}");
        let rest = h.backend.pull(&request.batch(10)).await.expect("pull");
        assert_eq!(ids(&rest), [expired, later], "{queues:?}");
        assert_eq!(rest[0].job.attempts, 2);
        assert!(rest[0].lease.token > lease.token);
        for leased in two.iter().chain(&rest) {
            h.backend
                .complete(&leased.lease, None)
                .await
                .expect("complete");
        }
    }
}

/// At most `batch` jobs come back, only from the named queues.
pub async fn pull_honours_batch_size_and_queues(h: Harness) {
    for n in 0..5 {
        h.push(job("k", n).queue("a")).await;
    }
    for n in 0..3 {
        h.push(job("k", n).queue("b")).await;
    }
    h.push(job("k", 0).queue("c")).await;

    let two = h.pull("a", 2).await;
    assert_eq!(two.len(), 2);
    assert!(two.iter().all(|l| l.job.queue == "a"));
    assert!(h.pull("nowhere", 10).await.is_empty());

    let rest = h
        .backend
        .pull(&PullRequest::queues(["a", "b", "a"]).batch(100))
        .await
        .expect("pull");
    assert_eq!(rest.len(), 6, "3 left in a, 3 in b, each once");
    assert_eq!(rest.iter().filter(|l| l.job.queue == "a").count(), 3);
    assert!(h.pull("a", 10).await.is_empty());
    assert!(h.pull("b", 10).await.is_empty());
    assert_eq!(h.pull("c", 10).await.len(), 1);
}

/// 8 concurrent pullers over 400 expired leases (half on their last
/// attempt) and 200 pending jobs: every expired lease with attempts left
/// and every pending job is leased again exactly once, every expired lease
/// on its last attempt is `Dead`, and the stale leases stay refused.
pub async fn concurrent_pullers_take_back_each_expired_lease_once(h: Harness) {
    const EXPIRED: i64 = 400;
    const PENDING: i64 = 200;
    const PULLERS: usize = 8;
    let batch: Vec<NewJob> = (0..EXPIRED)
        .map(|n| job("k", n).max_attempts(if n % 2 == 0 { 1 } else { 3 }))
        .collect();
    h.backend.push_batch(batch).await.expect("push_batch");
    let first = h.pull("default", EXPIRED as u32).await;
    assert_eq!(first.len(), EXPIRED as usize);
    h.advance(Duration::minutes(10));
    h.backend
        .push_batch((EXPIRED..EXPIRED + PENDING).map(|n| job("k", n)).collect())
        .await
        .expect("push_batch");
    let mut tasks = Vec::new();
    for puller in 0..PULLERS {
        let backend = h.backend.clone();
        tasks.push(tokio::spawn(async move {
            let request = PullRequest::queue("default").batch(1 + (puller as u32 % 5) * 7);
            let mut seen = Vec::new();
            loop {
                let leased = backend.pull(&request).await.expect("pull");
                if leased.is_empty() {
                    return seen;
                }
                seen.extend(leased.iter().map(|l| (l.job.id, l.lease.token)));
            }
        }));
    }
    let mut deliveries: HashMap<i64, Vec<i64>> = HashMap::new();
    for task in tasks {
        for (id, token) in task.await.expect("puller task") {
            deliveries.entry(id).or_default().push(token);
        }
    }
    let twice: Vec<_> = deliveries.iter().filter(|(_, t)| t.len() > 1).collect();
    assert!(twice.is_empty(), "leased twice: {twice:?}");
    assert_eq!(
        deliveries.len() as i64,
        EXPIRED / 2 + PENDING,
        "every expired lease with attempts left and every pending job"
    );
    for leased in &first {
        let job = h.job(leased.job.id).await;
        if leased.job.max_attempts == 1 {
            assert_eq!(job.status, JobStatus::Dead, "{job:?}");
            assert!(!deliveries.contains_key(&job.id), "{job:?}");
        } else {
            let tokens = &deliveries[&job.id];
            assert!(
                tokens.len() == 1 && tokens[0] > leased.lease.token,
                "{job:?} {tokens:?}"
            );
            assert_eq!((job.status, job.attempts), (JobStatus::Processing, 2));
        }
        // The stale lease is refused.
        assert_lost(h.backend.complete(&leased.lease, None).await, leased.lease);
    }
}

/// 16 concurrent pullers over 2,000 jobs in two queues, each job at a
/// priority level of its own, half of the pullers pulling from both: each
/// stops at its first empty pull, and together they deliver every job
/// exactly once.
pub async fn concurrent_pullers_receive_each_job_exactly_once(h: Harness) {
    const JOBS: i64 = 2_000;
    const PULLERS: usize = 16;
    const QUEUES: [&str; 2] = ["default", "spare"];
    for chunk in (0..JOBS).collect::<Vec<_>>().chunks(500) {
        let batch: Vec<NewJob> = chunk
            .iter()
            .map(|n| {
                job("k", *n)
                    .queue(QUEUES[*n as usize % 2])
                    .priority(*n as i16)
            })
            .collect();
        h.backend.push_batch(batch).await.expect("push_batch");
    }
    let mut tasks = Vec::new();
    for worker in 0..PULLERS {
        let backend = h.backend.clone();
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            // Half the pullers take from both queues, half from one.
            let queues = if worker % 2 == 0 {
                &QUEUES[..]
            } else {
                &QUEUES[..1]
            };
            let request =
                PullRequest::queues(queues.iter().copied()).batch(1 + (worker as u32 % 7));
            loop {
                let leased = backend.pull(&request).await.expect("pull");
                if leased.is_empty() {
                    return seen;
                }
                let completions = leased.iter().map(|l| Completion::from(l.lease)).collect();
                let lost = backend.complete_batch(completions).await.expect("complete");
                assert!(lost.is_empty(), "no lease can be lost here: {lost:?}");
                seen.extend(leased.iter().map(|l| l.job.id));
            }
        }));
    }
    let mut deliveries: HashMap<i64, usize> = HashMap::new();
    for task in tasks {
        for id in task.await.expect("puller task") {
            *deliveries.entry(id).or_default() += 1;
        }
    }
    assert_eq!(deliveries.len(), JOBS as usize, "every job delivered");
    let repeated: Vec<_> = deliveries.iter().filter(|(_, n)| **n > 1).collect();
    assert!(repeated.is_empty(), "jobs delivered twice: {repeated:?}");
    for queue in QUEUES {
        let stats = h.backend.stats().await.expect("stats").queue(queue);
        assert_eq!(stats.done, JOBS as u64 / 2, "{queue}");
        assert_eq!(stats.total(), JOBS as u64 / 2, "{queue}");
    }
}
