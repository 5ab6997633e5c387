//! The whole conformance suite against the memory backend, used only
//! through `Arc<dyn Backend>`.

use std::sync::Arc;

use relayq_conformance::{EPOCH, Harness};
use relayq_core::ManualClock;
use relayq_memory::MemoryBackend;

async fn fresh() -> Harness {
    let clock = ManualClock::new(EPOCH);
    let backend = MemoryBackend::with_clock(Arc::new(clock.clone()));
    Harness::new(Arc::new(backend), clock)
}

relayq_conformance::conformance_tests!(fresh);
