//! The whole conformance suite against the memory backend, used only
//! through `Arc<dyn Backend>`.

use std::sync::Arc;

use relayq_conformance::{EPOCH, Harness};
use relayq_core::{Backend, Capabilities, ManualClock};
use relayq_memory::MemoryBackend;

async fn fresh() -> Harness {
    let clock = ManualClock::new(EPOCH);
    let backend = MemoryBackend::with_clock(Arc::new(clock.clone()));
    // Cases that need a capability skip a store without it: a store that
    // lost one it declares would pass those cases unrun.
    assert_eq!(
        backend.capabilities(),
        Capabilities::none()
            .in_process_wakeups(true)
            .instant_writes(true)
    );
    Harness::new(Arc::new(backend), clock)
}

relayq_conformance::conformance_tests!(fresh);
