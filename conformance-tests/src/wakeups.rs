//! Push notifications for workers.

use std::time::Duration as StdDuration;

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
