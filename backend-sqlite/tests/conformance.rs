//! The whole conformance suite against the SQLite backend, used only
//! through `Arc<dyn Backend>`: once on a fresh temporary file per case, and
//! once on a fresh in-memory database per case.

use std::sync::Arc;

use relayq_conformance::{EPOCH, Harness};
use relayq_core::{Backend, Capabilities, ManualClock};
use relayq_sqlite::{SqliteBackend, SqliteOptions};

async fn open(url: &str, clock: &ManualClock) -> SqliteBackend {
    SqliteBackend::connect_with(SqliteOptions::new(url).clock(Arc::new(clock.clone())))
        .await
        .expect("connect")
}

/// Each case on its own file in its own temporary directory, removed when
/// the case drops its harness.
mod file {
    use super::*;

    async fn fresh() -> Harness {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}", dir.path().join("jobs.db").display());
        let clock = ManualClock::new(EPOCH);
        let backend = open(&url, &clock).await;
        // Cases that need a capability skip a store without it: a store that
        // lost one it declares would pass those cases unrun.
        assert_eq!(
            backend.capabilities(),
            Capabilities::none()
                .durable(true)
                .multi_process(true)
                .transactional_enqueue(true)
                .cross_process_wakeups(true)
                .in_process_wakeups(true)
        );
        Harness::new(Arc::new(backend), clock).keep_alive(dir)
    }

    relayq_conformance::conformance_tests!(fresh);
}

/// Each case on its own in-memory database.
mod memory {
    use super::*;

    async fn fresh() -> Harness {
        let clock = ManualClock::new(EPOCH);
        let backend = open("sqlite::memory:", &clock).await;
        // Cases that need a capability skip a store without it: a store that
        // lost one it declares would pass those cases unrun.
        assert_eq!(
            backend.capabilities(),
            Capabilities::none()
                .transactional_enqueue(true)
                .in_process_wakeups(true)
        );
        Harness::new(Arc::new(backend), clock)
    }

    relayq_conformance::conformance_tests!(fresh);
}
