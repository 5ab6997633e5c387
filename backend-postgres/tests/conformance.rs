//! The whole conformance suite against PostgreSQL, each case in its own
//! schema, with an injected manual clock, used only through `Arc<dyn Backend>`.

use relayq_postgres::testing;

use std::sync::Arc;

use relayq_conformance::{EPOCH, Harness};
use relayq_core::{Backend, Capabilities, ManualClock};

async fn fresh() -> Harness {
    let clock = ManualClock::new(EPOCH);
    let backend = testing::connect(testing::options().clock(Arc::new(clock.clone()))).await;
    // Cases that need a capability skip a store without it: a store that
    // lost one it declares would pass those cases unrun.
    assert_eq!(
        backend.capabilities(),
        Capabilities::none()
            .durable(true)
            .multi_process(true)
            .server_clock(true)
            .transactional_enqueue(true)
            .cross_process_wakeups(true)
            .in_process_wakeups(true)
    );
    Harness::new(Arc::new(backend), clock)
}

relayq_conformance::conformance_tests!(fresh);
