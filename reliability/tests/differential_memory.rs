//! Self-check of the differential harness: two independent memory stores
//! must agree on every generated sequence.

use std::sync::Arc;

use proptest::prelude::*;
use relayq_conformance::{EPOCH, Harness};
use relayq_core::ManualClock;
use relayq_memory::MemoryBackend;
use relayq_reliability::differential::{check, operations};

fn memory() -> Harness {
    let clock = ManualClock::new(EPOCH);
    Harness::new(
        Arc::new(MemoryBackend::with_clock(Arc::new(clock.clone()))),
        clock,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn memory_agrees_with_itself(ops in operations(60)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(check(memory(), memory(), &ops))?;
    }
}
