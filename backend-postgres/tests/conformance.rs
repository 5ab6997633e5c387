//! The whole conformance suite against PostgreSQL, each case in its own
//! schema, with an injected manual clock, used only through `Arc<dyn Backend>`.

use relayq_postgres::testing;

use std::sync::Arc;

use relayq_conformance::{EPOCH, Harness};
use relayq_core::ManualClock;

async fn fresh() -> Harness {
    let clock = ManualClock::new(EPOCH);
    let backend = testing::connect(testing::options().clock(Arc::new(clock.clone()))).await;
    Harness::new(Arc::new(backend), clock)
}

relayq_conformance::conformance_tests!(fresh);
