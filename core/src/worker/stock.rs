//! A runner's stock: its buffered jobs, its concurrency slots, and the
//! accounting of the pulls that fill the buffer.
//!
//! Two kinds of task pull for a runner: its pull loop, and, on a backend
//! with instant writes, its lanes themselves as they find the buffer empty
//! with a slot free (see `runner::Starter::pull_here`). Both size their
//! pulls here and count them in one place, so that together they keep
//! within the bound on leases held and the prefetch depth, and neither
//! misses a sign that the queues hold due jobs.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use super::board::Board;
use super::buffer::Buffer;
use super::prefetch::Prefetch;
use super::slots::Slots;
use crate::request::MAX_PULL_BATCH;

/// How many of the pull loop's pulls may be under way at once (each
/// sized for a share of the buffer's depth). A lane's own pull comes on
/// top: it is made inline, and over once the lane goes on.
///
/// Two: the jobs asked for at once are the same whatever the split, and
/// on PostgreSQL every claim under way walks past the rows the others hold
/// locked (`SKIP LOCKED`), so fewer, larger claims do more. Measured in
/// alternating pairs, PostgreSQL `process` 13 pairs: two ahead of four in
/// 11 (5 pairs at 100,000 jobs: medians 43,700 against 41,700 stored
/// jobs/s); eight was 10–18% behind four (4 pairs).
pub(crate) const PULLS_AT_ONCE: usize = 2;

/// The fewest jobs a pull is sent for while the buffer aims at `target`:
/// not for a sliver of it, but once a good part of a pull's share is
/// missing.
fn least_worth_pulling(target: usize) -> usize {
    target.div_ceil(2 * PULLS_AT_ONCE)
}

/// A runner's jobs waiting to start and its slots to start them on, with
/// the board its pull loop reads. Its sibling runners see it too: one with
/// a free slot and nothing buffered takes what this one buffered but has
/// no slot for (see `runner::run_all`).
pub(crate) struct Stock {
    pub(crate) board: Arc<Board>,
    pub(crate) buffer: Buffer,
    /// One slot per handler allowed to run. A job gives its slot back
    /// as soon as its handler returns, before the outcome is recorded, so
    /// the next job starts without waiting for the acknowledgement.
    pub(crate) slots: Arc<Slots>,
    /// The adaptive depth of the buffer, steered by every pull. Its lock
    /// also makes reservations one at a time (see [`Self::reserve`]).
    prefetch: Mutex<Prefetch>,
    /// Jobs asked for by the pulls under way: raised under the `prefetch`
    /// lock, lowered by a pull as it lands.
    asked: AtomicUsize,
    /// Every lease held (buffered, running, awaiting its record) or being
    /// pulled stays within this.
    max_held: usize,
    /// Counts the signs that the queues may hold due jobs: the start, a
    /// wake-up, a poll tick, a job due again at once.
    signs: AtomicU64,
    /// `signs` as it was when the last pull that came back short (or
    /// failed) was sent: no sign since means nothing is worth pulling.
    drained_at: AtomicU64,
}

/// What a pull may ask for now (see [`Stock::reserve`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reserve {
    /// A pull for this many jobs, counted as asked for.
    Pull(usize),
    /// Not worth a pull: the buffer lacks too little.
    Enough,
    /// No room for a worthwhile pull under the bound on leases held, with
    /// this many held: only the end of a started job makes room.
    Full(usize),
}

impl Stock {
    /// The stock of a runner with `lanes` lanes, `concurrency` slots, a
    /// buffer of up to `prefetch` jobs and at most `max_held` leases.
    pub(crate) fn new(lanes: usize, concurrency: u32, prefetch: u32, max_held: usize) -> Self {
        let board = Arc::new(Board::new(lanes));
        Self {
            buffer: Buffer::new(Arc::clone(&board)),
            board,
            slots: Slots::new(concurrency as usize),
            prefetch: Mutex::new(Prefetch::new(prefetch)),
            asked: AtomicUsize::new(0),
            max_held,
            signs: AtomicU64::new(1),
            drained_at: AtomicU64::new(0),
        }
    }

    /// The buffer's adaptive depth, to read or steer.
    pub(crate) fn prefetch(&self) -> MutexGuard<'_, Prefetch> {
        // Held for one call on the `Prefetch`, or for one reservation,
        // which only reads counters: never across an await.
        self.prefetch.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn asked(&self) -> usize {
        self.asked.load(Ordering::SeqCst)
    }

    /// The leases held: asked for by the pulls under way, buffered (or
    /// taken out of the buffer to be given back), and started (running or
    /// awaiting their record). Read in that order, none is missed: a pull
    /// that lands adds its jobs to the buffer before it stops counting them
    /// as asked, and a job a lane takes is counted as started before it
    /// leaves the buffer.
    pub(crate) fn leases_held(&self) -> usize {
        let asked = self.asked();
        asked + self.buffer.held() + self.board.started()
    }

    /// Sizes a pull for the `free` slots and its share of what the buffer
    /// lacks, within the room left under the bound on leases held, and
    /// counts it as asked for (until [`Self::landed`]). Reservations are
    /// made one at a time, so two never take the same room; a pull that
    /// lands meanwhile is counted twice at most (in the buffer and as
    /// asked), never missed (the counts are read in the order
    /// [`Self::leases_held`] reads them).
    pub(crate) fn reserve(&self, free: usize) -> Reserve {
        let prefetch = self.prefetch();
        let target = prefetch.target() as usize;
        let asked = self.asked();
        let buffered = self.buffer.len();
        let held = asked + self.buffer.held() + self.board.started();
        let room = self.max_held.saturating_sub(held);
        let lacking = (free + target).saturating_sub(buffered + asked);
        let share = free + target.div_ceil(PULLS_AT_ONCE);
        let wanted = lacking.min(share).min(MAX_PULL_BATCH as usize);
        let want = wanted.min(room);
        if want == 0 || want < least_worth_pulling(target) {
            return if room < wanted {
                Reserve::Full(held)
            } else {
                Reserve::Enough
            };
        }
        self.asked.fetch_add(want, Ordering::SeqCst);
        drop(prefetch);
        Reserve::Pull(want)
    }

    /// A pull sent when [`Self::signs`] read `signs` came back (`full` or
    /// short) after `round_trip`, finding slots `starved` (free, with
    /// nothing buffered): steers the buffer's depth, and a short pull marks
    /// the queues drained.
    pub(crate) fn pulled(&self, round_trip: Duration, full: bool, starved: bool, signs: u64) {
        self.prefetch().pulled(round_trip, full, starved);
        if !full {
            self.drained(signs);
        }
    }

    /// A pull reserved for `asked` jobs is over, its jobs (if any) in the
    /// buffer or given back.
    pub(crate) fn landed(&self, asked: usize) {
        self.asked.fetch_sub(asked, Ordering::SeqCst);
    }

    /// The buffer level below which the pull loop wants to be told, given
    /// the slots free now.
    pub(crate) fn low_water(&self) -> usize {
        let target = self.prefetch().target() as usize;
        (self.slots.free() + target).saturating_sub(self.asked() + least_worth_pulling(target)) + 1
    }

    /// The queues may hold due jobs again (a wake-up, a poll tick, a job
    /// due again at once).
    pub(crate) fn may_have_more(&self) {
        self.signs.fetch_add(1, Ordering::SeqCst);
    }

    /// The signs so far, read before a pull is sent, to pass to
    /// [`Self::drained`] if it comes back short.
    pub(crate) fn signs(&self) -> u64 {
        self.signs.load(Ordering::SeqCst)
    }

    /// A pull sent when `signs` had been counted came back short or
    /// failed: nothing is worth pulling until the next sign. A sign that
    /// came while it was under way still counts.
    pub(crate) fn drained(&self, signs: u64) {
        self.drained_at.fetch_max(signs, Ordering::SeqCst);
    }

    /// Whether the queues may hold due jobs: a sign came after the last
    /// short pull was sent.
    pub(crate) fn has_more(&self) -> bool {
        self.signs.load(Ordering::SeqCst) > self.drained_at.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_pull_drains_only_the_signs_it_saw() {
        let stock = Stock::new(1, 4, 0, 100);
        assert!(stock.has_more(), "a new worker pulls");
        let before = stock.signs();
        // A push's wake-up while the pull is under way.
        stock.may_have_more();
        stock.drained(before);
        assert!(stock.has_more(), "the wake-up during the pull is kept");
        stock.drained(stock.signs());
        assert!(!stock.has_more());
        // A stale short pull reported late changes nothing.
        stock.drained(before);
        stock.may_have_more();
        assert!(stock.has_more());
    }

    #[test]
    fn reservations_share_the_room_under_the_bound() {
        // No prefetch: pulls are for the free slots, 10 leases at most.
        let stock = Stock::new(1, 16, 0, 10);
        assert_eq!(stock.reserve(8), Reserve::Pull(8));
        // The first pull's 8 count as asked: a second caller gets the
        // free slots the first did not ask for, within the bound.
        assert_eq!(stock.reserve(16), Reserve::Pull(2));
        assert_eq!(stock.reserve(16), Reserve::Full(10));
        stock.landed(8);
        assert_eq!(stock.leases_held(), 2);
        assert_eq!(stock.reserve(16), Reserve::Pull(8));
    }

    #[test]
    fn nothing_lacking_is_not_worth_a_pull() {
        let stock = Stock::new(1, 4, 0, 100);
        assert_eq!(stock.reserve(0), Reserve::Enough);
    }
}
