//! A started worker's concurrency slots: how many more handlers may run.
//!
//! Taken without waiting (a job starts when a slot is free, or stays in
//! the buffer) and given back when a job's handler returns, so a counter
//! is all it takes: giving a slot back is one atomic add, where a
//! semaphore's release also locks its list of waiters, once per job.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The free slots of one worker.
#[derive(Debug)]
pub(crate) struct Slots {
    free: AtomicUsize,
}

impl Slots {
    /// `n` slots, all free.
    pub(crate) fn new(n: usize) -> Arc<Self> {
        Arc::new(Self {
            free: AtomicUsize::new(n),
        })
    }

    /// How many slots are free now.
    pub(crate) fn free(&self) -> usize {
        self.free.load(Ordering::Acquire)
    }

    /// A free slot, if there is one; it is free again once dropped.
    pub(crate) fn try_take(self: &Arc<Self>) -> Option<Slot> {
        self.free
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |free| {
                free.checked_sub(1)
            })
            .ok()
            .map(|_| Slot {
                slots: Arc::clone(self),
            })
    }
}

/// A slot taken; dropping it frees it.
#[derive(Debug)]
pub(crate) struct Slot {
    slots: Arc<Slots>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.free.fetch_add(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_taken_until_none_is_free_and_freed_on_drop() {
        let slots = Slots::new(2);
        let a = slots.try_take().expect("first");
        let b = slots.try_take().expect("second");
        assert_eq!(slots.free(), 0);
        assert!(slots.try_take().is_none());
        drop(a);
        assert_eq!(slots.free(), 1);
        let c = slots.try_take().expect("freed by the drop");
        drop((b, c));
        assert_eq!(slots.free(), 2);
    }

    #[test]
    fn no_slot_is_handed_out_twice_under_contention() {
        let slots = Slots::new(3);
        let held = AtomicUsize::new(0);
        let most = AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    for _ in 0..10_000 {
                        if let Some(slot) = slots.try_take() {
                            let now = held.fetch_add(1, Ordering::SeqCst) + 1;
                            most.fetch_max(now, Ordering::SeqCst);
                            held.fetch_sub(1, Ordering::SeqCst);
                            drop(slot);
                        }
                    }
                });
            }
        });
        assert!(most.load(Ordering::SeqCst) <= 3);
        assert_eq!(slots.free(), 3);
    }
}
