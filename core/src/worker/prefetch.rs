//! How many leased jobs a started worker keeps waiting beyond its free slots.
//!
//! A pull costs a round trip (and, on a durable store, a commit). Were
//! pulls sized to the free slots alone, a worker with quick handlers would
//! start at most `concurrency` jobs per round trip, its slots idle while
//! each pull is under way. So the worker keeps a buffer of leased jobs to
//! start while the next pull runs, its depth steered by the two things it
//! trades off:
//!
//! - **starved slots**: a pull that came back full (the queue has more)
//!   found free slots waiting for it, the buffer empty: they idled for its
//!   round trip, so the buffer's depth doubles;
//! - **waiting jobs**: a buffered job waited long for a slot (more than
//!   [`WAIT_LIMIT`] and two round trips): the buffer was deeper than the
//!   handlers drain, so its depth halves, at most once per pull.
//!
//! Quick handlers thus get a deep buffer (up to the configured limit);
//! handlers much slower than a round trip get next to none (the depth
//! settles between 0 and 1). And when quick handlers have deepened it and
//! slow ones then take every slot, the buffered jobs are not kept waiting
//! behind them: once the first has waited a whole poll interval (seen at
//! the next poll), the buffer is given back, for any worker with a free
//! slot, and its depth starts over from 0 ([`Prefetch::restart`]). So one
//! worker does not hoard jobs while another idles. (Handlers slower than
//! the poll interval on all of a worker's slots may so see the one job
//! buffered behind them given back and pulled again: a release and a pull
//! per such job, little next to it.)

use std::time::Duration;

/// A buffered job that waited longer than this (and two round trips) for
/// a slot shows the buffer is deeper than needed.
pub(crate) const WAIT_LIMIT: Duration = Duration::from_millis(10);

/// The weight of the newest round trip in the moving average.
const SMOOTHING: f64 = 0.25;

/// The adaptive depth of a worker's prefetch buffer.
#[derive(Debug)]
pub(crate) struct Prefetch {
    limit: u32,
    target: u32,
    /// A pull's round trip in seconds, smoothed.
    round_trip: f64,
    /// Whether the depth was halved since the last pull.
    shrunk: bool,
}

impl Prefetch {
    /// A buffer of at most `limit` jobs (0: pull for free slots only),
    /// empty to begin with.
    pub(crate) fn new(limit: u32) -> Self {
        Self {
            limit,
            target: 0,
            round_trip: 0.0,
            shrunk: false,
        }
    }

    /// Takes a finished pull into account: its round trip, whether it came
    /// back `full` (it got all it asked for) and whether free slots were
    /// `starved` (waiting for it, with no buffered job to start).
    pub(crate) fn pulled(&mut self, round_trip: Duration, full: bool, starved: bool) {
        self.round_trip += SMOOTHING * (round_trip.as_secs_f64() - self.round_trip);
        self.shrunk = false;
        if full && starved && self.limit > 0 {
            self.target = self.target.saturating_mul(2).clamp(1, self.limit);
        }
    }

    /// Takes into account that a buffered job waited `wait` for its slot.
    pub(crate) fn waited(&mut self, wait: Duration) {
        let limit = WAIT_LIMIT.max(Duration::from_secs_f64(2.0 * self.round_trip));
        if wait > limit && !self.shrunk {
            self.target /= 2;
            self.shrunk = true;
        }
    }

    /// The buffer was given back (its jobs waited too long for a slot):
    /// the depth starts over from 0, as for a new worker.
    pub(crate) fn restart(&mut self) {
        self.target = 0;
    }

    /// How many jobs to hold beyond the free slots now.
    pub(crate) fn target(&self) -> u32 {
        self.target
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RTT: Duration = Duration::from_millis(2);

    #[test]
    fn starved_slots_deepen_the_buffer_up_to_the_limit() {
        let mut p = Prefetch::new(256);
        assert_eq!(p.target(), 0);
        let mut depths = Vec::new();
        for _ in 0..12 {
            p.pulled(RTT, true, true);
            depths.push(p.target());
        }
        assert_eq!(&depths[..4], &[1, 2, 4, 8]);
        assert_eq!(p.target(), 256);
    }

    #[test]
    fn an_exhausted_queue_or_busy_slots_leave_it_alone() {
        let mut p = Prefetch::new(256);
        // Sporadic jobs on an idle worker: short pulls.
        p.pulled(RTT, false, true);
        // A deep backlog of slow jobs: no slot frees during a pull.
        p.pulled(RTT, true, false);
        assert_eq!(p.target(), 0);
    }

    #[test]
    fn long_waits_halve_it_once_per_pull() {
        let mut p = Prefetch::new(256);
        for _ in 0..12 {
            p.pulled(RTT, true, true);
        }
        p.waited(Duration::from_millis(1));
        assert_eq!(p.target(), 256, "a short wait is what the buffer is for");
        for _ in 0..100 {
            p.waited(Duration::from_millis(500));
        }
        assert_eq!(p.target(), 128);
        for _ in 0..8 {
            p.pulled(RTT, true, false);
            p.waited(Duration::from_millis(500));
        }
        assert_eq!(p.target(), 0, "slow handlers get no buffer");
    }

    #[test]
    fn a_restart_empties_it_until_slots_starve_again() {
        let mut p = Prefetch::new(256);
        for _ in 0..12 {
            p.pulled(RTT, true, true);
        }
        p.restart();
        assert_eq!(p.target(), 0);
        p.pulled(RTT, true, false);
        assert_eq!(p.target(), 0, "busy slots leave it empty");
        p.pulled(RTT, true, true);
        assert_eq!(p.target(), 1);
    }

    #[test]
    fn a_zero_limit_disables_it() {
        let mut p = Prefetch::new(0);
        for _ in 0..4 {
            p.pulled(RTT, true, true);
        }
        assert_eq!(p.target(), 0);
    }
}
