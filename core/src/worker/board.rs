//! What a started worker's lanes and completion batcher tell its pull loop,
//! through counters it reads when it decides, so that it is woken only
//! when a decision may change, not for every job.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::sync::Notify;

use super::events::Outcome;

#[derive(Default)]
pub(crate) struct Board {
    /// Jobs started whose run has not ended, per lane.
    pub(crate) in_flight: Vec<AtomicUsize>,
    /// Finished jobs whose completion is handed to the batcher and not yet
    /// recorded: their leases are still held (and renewed).
    pub(crate) awaiting_ack: AtomicUsize,
    /// A job went back to the queue due at once (a retry with no delay):
    /// the queues are worth pulling again.
    pub(crate) due_now: AtomicBool,
    /// The pull loop waits for held leases to be let go (it holds as many
    /// as it may): each run's end and each recorded batch is signalled.
    pub(crate) wants_ends: AtomicBool,
    /// The worker is shutting down: runs that end from now on ended in
    /// the grace period, and count in the shutdown report.
    pub(crate) stopping: AtomicBool,
    /// The worker's shutdown deadline has passed: runs still going are
    /// stopped and given back, and outcome writes are not made again.
    pub(crate) abandoning: AtomicBool,
    /// Wakes the pull loop: signalled on `due_now`, while `wants_ends` on
    /// every end, by the buffer when it runs low, and by a lane that pulls
    /// for itself when it finds the buffer dry (see `runner::Starter::pull_here`)
    /// or hears a push (see `runner::Starter::lane_listens`).
    pub(crate) ended: Notify,
}

impl Board {
    /// A board for `lanes` lanes.
    pub(crate) fn new(lanes: usize) -> Self {
        Self {
            in_flight: (0..lanes).map(|_| AtomicUsize::new(0)).collect(),
            ..Self::default()
        }
    }

    /// Leases held by started jobs: running, or awaiting their record.
    pub(crate) fn started(&self) -> usize {
        self.in_flight
            .iter()
            .map(|n| n.load(Ordering::SeqCst))
            .sum::<usize>()
            + self.awaiting_ack.load(Ordering::SeqCst)
    }

    /// The lane with the fewest jobs, so that handlers spread over the
    /// runtime's threads.
    pub(crate) fn idlest_lane(&self) -> usize {
        (0..self.in_flight.len())
            .min_by_key(|&i| self.in_flight[i].load(Ordering::Relaxed))
            .unwrap_or(0)
    }

    /// A run on `lane` ended: with `outcome` once recorded, or (`None`)
    /// with its completion handed to the batcher.
    pub(crate) fn ended(&self, lane: usize, outcome: Option<&Outcome>) {
        self.in_flight[lane].fetch_sub(1, Ordering::SeqCst);
        let due = matches!(outcome, Some(Outcome::Retrying { delay, .. }) if delay.is_zero());
        if due {
            self.due_now.store(true, Ordering::SeqCst);
        }
        if due || self.wants_ends.load(Ordering::SeqCst) {
            self.ended.notify_one();
        }
    }

    /// A completion is handed to the batcher. Counted before the handing
    /// run ends, so that the pull loop never sees its lease let go early.
    pub(crate) fn handed(&self) {
        self.awaiting_ack.fetch_add(1, Ordering::SeqCst);
    }

    /// The batcher is done with `n` completions handed to it.
    pub(crate) fn recorded(&self, n: usize) {
        self.awaiting_ack.fetch_sub(n, Ordering::SeqCst);
        if self.wants_ends.load(Ordering::SeqCst) {
            self.ended.notify_one();
        }
    }
}
