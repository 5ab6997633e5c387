//! Deduplication by `unique_key`.

use std::sync::Arc;

use relayq_core::{JobStatus, PushOutcome};
use time::Duration;

use crate::harness::{Harness, job};

/// While a job with a key is `Pending` or `Processing`, pushing the same key
/// to the same queue stores nothing and reports that job; other queues are
/// independent.
pub async fn unique_key_dedupes_while_active(h: Harness) {
    let first = h.push(job("k", 1).unique_key("report:7")).await;
    let again = h.backend.push(job("k", 2).unique_key("report:7")).await;
    assert_eq!(again.expect("push"), PushOutcome::Duplicate(first));
    let elsewhere = h
        .push(job("k", 3).queue("other").unique_key("report:7"))
        .await;
    assert_ne!(elsewhere, first);

    let leased = h.pull_one("default").await;
    assert_eq!(leased.job.id, first);
    let while_processing = h.backend.push(job("k", 4).unique_key("report:7")).await;
    assert_eq!(
        while_processing.expect("push"),
        PushOutcome::Duplicate(first)
    );

    h.backend
        .retry(&leased.lease, Duration::seconds(5), "again")
        .await
        .expect("retry");
    let while_retrying = h.backend.push(job("k", 5).unique_key("report:7")).await;
    assert_eq!(while_retrying.expect("push"), PushOutcome::Duplicate(first));
    assert_eq!(
        *h.job(first).await.payload,
        serde_json::json!({"n": 1}),
        "duplicate changes nothing"
    );
    let stats = h.backend.stats().await.expect("stats");
    assert_eq!(stats.queue("default").total(), 1);
}

/// Once the job holding a key is `Done` or `Dead`, the key is free again.
pub async fn unique_key_is_free_once_terminal(h: Harness) {
    let first = h.push(job("k", 1).unique_key("once")).await;
    let leased = h.pull_one("default").await;
    h.backend
        .complete(&leased.lease, None)
        .await
        .expect("complete");
    let second = h.push(job("k", 2).unique_key("once")).await;
    assert!(second > first);

    let leased = h.pull_one("default").await;
    assert_eq!(leased.job.id, second);
    h.backend.kill(&leased.lease, "dead").await.expect("kill");
    let third = h.push(job("k", 3).unique_key("once")).await;
    assert!(third > second);
    assert_eq!(h.job(third).await.status, JobStatus::Pending);
}

/// A key stays held while its job may still run (released, or leased
/// past `locked_until` but not yet swept) and is free once the job ends
/// any way: done, killed, dead after its last retry, or swept `Dead` after
/// its last lease expired.
pub async fn unique_key_is_held_until_the_job_ends_every_way(h: Harness) {
    let b = &h.backend;
    // Each way in a queue of its own, named after the key: a push that
    // finds the key free creates a job there.
    let holds = |key: &'static str| async move {
        let outcome = b
            .push(job("k", 0).queue(key).unique_key(key))
            .await
            .expect("push");
        outcome.is_duplicate()
    };
    let first = |key: &'static str| {
        let h = h.clone();
        async move {
            h.push(job("k", 1).queue(key).unique_key(key).max_attempts(1))
                .await;
            h.pull_one(key).await.lease
        }
    };

    let lease = first("released").await;
    b.release(&lease).await.expect("release");
    assert!(holds("released").await, "released: pending again");
    let lease = h.pull_one("released").await.lease;
    b.complete(&lease, None).await.expect("complete");
    assert!(!holds("released").await, "done");

    let lease = first("retried").await;
    assert_eq!(
        b.retry(&lease, Duration::ZERO, "failed")
            .await
            .expect("retry"),
        JobStatus::Dead
    );
    assert!(!holds("retried").await, "dead after its last retry");

    first("expired").await;
    h.advance(Duration::seconds(31));
    assert!(holds("expired").await, "expired but not yet swept");
    assert!(h.pull("expired", 10).await.is_empty(), "swept");
    assert!(!holds("expired").await, "swept dead");
}

/// In one batch, a repeated key (same queue) is a duplicate of the earlier
/// job of that batch; an existing active job wins over both.
pub async fn unique_key_dedupes_within_a_batch(h: Harness) {
    let existing = h.push(job("k", 0).unique_key("old")).await;
    let outcomes = h
        .backend
        .push_batch(vec![
            job("k", 1).unique_key("new"),
            job("k", 2).unique_key("new"),
            job("k", 3).unique_key("old"),
            job("k", 4).unique_key("new").queue("q2"),
            job("k", 5),
        ])
        .await
        .expect("push_batch");
    let created = outcomes[0].id();
    assert_eq!(outcomes[0], PushOutcome::Created(created));
    assert_eq!(outcomes[1], PushOutcome::Duplicate(created));
    assert_eq!(outcomes[2], PushOutcome::Duplicate(existing));
    assert!(!outcomes[3].is_duplicate());
    assert!(!outcomes[4].is_duplicate());
    assert_eq!(*h.job(created).await.payload, serde_json::json!({"n": 1}));
    let stats = h.backend.stats().await.expect("stats");
    assert_eq!(stats.queue("default").total(), 3);
    assert_eq!(stats.queue("q2").total(), 1);
}

/// Pushes of one key that race (single pushes and batches naming it, all
/// released at once) create one job: every other push reports it.
pub async fn racing_pushes_of_one_key_create_one_job(h: Harness) {
    let start = Arc::new(tokio::sync::Barrier::new(20));
    let mut racers = tokio::task::JoinSet::new();
    for n in 0..20 {
        let (backend, start) = (Arc::clone(&h.backend), Arc::clone(&start));
        racers.spawn(async move {
            start.wait().await;
            if n % 5 == 0 {
                // A batch: the keyed job between two keyless ones.
                let outcomes = backend
                    .push_batch(vec![
                        job("k", 1000 + n),
                        job("k", n).unique_key("raced"),
                        job("k", 2000 + n),
                    ])
                    .await
                    .expect("push_batch");
                assert!(!outcomes[0].is_duplicate() && !outcomes[2].is_duplicate());
                outcomes[1]
            } else {
                backend
                    .push(job("k", n).unique_key("raced"))
                    .await
                    .expect("push")
            }
        });
    }
    let outcomes = racers.join_all().await;
    let created: Vec<_> = outcomes.iter().filter(|o| !o.is_duplicate()).collect();
    assert_eq!(created.len(), 1, "one push creates the job: {outcomes:?}");
    let id = created[0].id();
    assert!(
        outcomes.iter().all(|o| o.id() == id),
        "every other push names it: {outcomes:?}"
    );
    let stats = h.backend.stats().await.expect("stats");
    // The keyed job and the 8 keyless ones of the 4 batches.
    assert_eq!(stats.queue("default").total(), 9);
}
