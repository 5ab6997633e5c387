//! Push notifications for workers.

use std::time::Duration as StdDuration;

use futures::FutureExt;

use crate::harness::{Harness, job};

/// How long a signal may take before the case fails (a liveness bound, not
/// a performance assertion).
const SIGNAL_DEADLINE: StdDuration = StdDuration::from_secs(10);

/// A backend that declares wake-ups delivers a signal for a push made after
/// subscribing, including one made while the subscriber was not waiting; a
/// backend that declares none returns `None`.
pub async fn push_wakes_a_subscriber(h: Harness) {
    let caps = h.backend.capabilities();
    let queues = vec!["default".to_owned()];
    let subscription = h.backend.subscribe(&queues).await.expect("subscribe");
    let Some(mut wakeups) = subscription else {
        assert!(
            !caps.in_process_wakeups && !caps.cross_process_wakeups,
            "a backend declaring wake-ups must return a subscription"
        );
        return;
    };
    // Pushed before anyone waits: must still be seen.
    h.push(job("k", 1)).await;
    tokio::time::timeout(SIGNAL_DEADLINE, wakeups.next())
        .await
        .expect("a push signals the subscriber")
        .expect("subscription open");
    let waiter =
        tokio::spawn(async move { tokio::time::timeout(SIGNAL_DEADLINE, wakeups.next()).await });
    tokio::task::yield_now().await;
    h.push(job("k", 2)).await;
    let signal = waiter.await.expect("waiter task");
    assert_eq!(signal.expect("a second push signals too"), Some(()));
}

/// A backend that declares in-process wake-ups has signalled the
/// subscribers made through it by the time a push (single, keyed or batch)
/// returns, so a worker in the pushing process never waits on a round trip
/// to hear of it.
pub async fn push_has_signalled_in_process_subscribers_when_it_returns(h: Harness) {
    if !h.backend.capabilities().in_process_wakeups {
        return;
    }
    let queues = vec!["default".to_owned()];
    let mut wakeups = h
        .backend
        .subscribe(&queues)
        .await
        .expect("subscribe")
        .expect("a backend declaring wake-ups returns a subscription");
    for what in ["a single push", "a keyed push", "a batch push"] {
        // Signals left by earlier pushes (a backend may also signal through
        // a round trip, later).
        while let Ok(Some(())) =
            tokio::time::timeout(StdDuration::from_millis(300), wakeups.next()).await
        {}
        match what {
            "a single push" => h.push(job("k", 1)).await,
            "a keyed push" => h.push(job("k", 2).unique_key("in-process")).await,
            _ => {
                h.backend
                    .push_batch(vec![job("k", 3)])
                    .await
                    .expect("push_batch");
                0
            }
        };
        assert_eq!(
            wakeups.next().now_or_never(),
            Some(Some(())),
            "{what} has signalled by the time it returns"
        );
    }
}

/// A backend that declares wake-ups also signals when a lease is released
/// or a retry is due at once: a worker shutting down gives its jobs back
/// for the others to take at once, not at their next poll.
pub async fn release_and_retry_due_at_once_wake_a_subscriber(h: Harness) {
    let queues = vec!["default".to_owned()];
    let Some(mut wakeups) = h.backend.subscribe(&queues).await.expect("subscribe") else {
        return;
    };
    h.push(job("k", 1)).await;
    for what in [
        "a release",
        "a retry due at once",
        "a retry due within a microsecond",
    ] {
        let lease = h.pull_one("default").await.lease;
        // The signals of what came before (a backend may deliver them
        // after a round trip).
        while let Ok(Some(())) =
            tokio::time::timeout(StdDuration::from_millis(300), wakeups.next()).await
        {}
        if what == "a release" {
            h.backend.release(&lease).await.expect("release");
        } else {
            // Stores keep whole microseconds: 500 ns is due at once too.
            let delay = if what == "a retry due at once" {
                time::Duration::ZERO
            } else {
                time::Duration::nanoseconds(500)
            };
            h.backend
                .retry(&lease, delay, "again")
                .await
                .expect("retry");
        }
        tokio::time::timeout(SIGNAL_DEADLINE, wakeups.next())
            .await
            .unwrap_or_else(|_| panic!("{what} signals the subscriber"))
            .expect("subscription open");
    }
}

/// A subscription naming a queue that could name none (empty, too long,
/// holding NUL) is `InvalidInput` naming `queue`, on every backend.
pub async fn subscribe_rejects_bad_queue_names(h: Harness) {
    for bad in [String::new(), "q".repeat(300), "a\0b".to_owned()] {
        let queues = vec!["default".to_owned(), bad.clone()];
        match h.backend.subscribe(&queues).await {
            Err(relayq_core::Error::InvalidInput { field: "queue", .. }) => {}
            other => panic!(
                "{bad:?}: expected InvalidInput naming queue, got {:?}",
                other.map(|w| w.is_some())
            ),
        }
    }
}
