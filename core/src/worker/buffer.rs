//! The prefetch buffer: leased jobs waiting for a concurrency slot.
//!
//! The pull loop fills it (and, on a backend with instant writes, the
//! lanes, as they find it dry); whoever sees a slot free takes from it:
//! the pull loop when a pull comes back, and a lane as soon as one of its
//! runs ends, in the same task, without waking the pull loop. The pull
//! loop is told only when the buffer runs low, or runs dry while a slot is
//! free (by a lane that pulls for itself: only once it has found it dry).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use super::board::Board;
use super::keeper::Hold;
use super::slots::{Slot, Slots};
use crate::job::Job;
use crate::lease::{Lease, LeasedJob};

/// A leased job waiting for a slot, its lease renewed by the keeper.
///
/// The job is behind the `Arc` its run will share with the handler's
/// context, made once as it is buffered: a buffered job is moved several
/// times (into the buffer, out of it, to a lane, into its run), and a
/// `Job` by value is some 250 bytes each time.
pub(crate) struct Buffered {
    pub(crate) lease: Lease,
    pub(crate) job: Arc<Job>,
    pub(crate) hold: Hold,
    /// When its pull came back.
    pub(crate) buffered_at: Instant,
}

impl Buffered {
    /// `leased`, held by `hold`, buffered at `now`.
    pub(crate) fn new(leased: LeasedJob, hold: Hold, now: Instant) -> Self {
        Self {
            lease: leased.lease,
            job: Arc::new(leased.job),
            hold,
            buffered_at: now,
        }
    }
}

struct Jobs {
    queue: VecDeque<Buffered>,
    /// No job is to start any more (the worker is shutting down).
    closed: bool,
}

pub(crate) struct Buffer {
    jobs: Mutex<Jobs>,
    /// The pull loop is told when taking a job leaves fewer than this.
    low_water: AtomicUsize,
    /// The longest wait for a slot among the jobs taken since the pull
    /// loop last asked, in microseconds.
    longest_wait: AtomicU64,
    /// Jobs not started since the pull loop last asked, their leases
    /// lapsed (see [`Self::take`]).
    lapsed: AtomicUsize,
    /// Jobs taken out to be given back (see [`Self::take_all_if_buffered_by`])
    /// whose leases are still held: raised under the lock as they leave.
    leaving: AtomicUsize,
    board: Arc<Board>,
}

impl Buffer {
    /// An empty buffer that tells the pull loop through `board`.
    pub(crate) fn new(board: Arc<Board>) -> Self {
        Self {
            jobs: Mutex::new(Jobs {
                queue: VecDeque::new(),
                closed: false,
            }),
            low_water: AtomicUsize::new(1),
            longest_wait: AtomicU64::new(0),
            lapsed: AtomicUsize::new(0),
            leaving: AtomicUsize::new(0),
            board,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Jobs> {
        // Every critical section is a single queue operation.
        self.jobs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn len(&self) -> usize {
        self.lock().queue.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The leases the buffer holds: its jobs, and those taken out to be
    /// given back and not yet given back.
    pub(crate) fn held(&self) -> usize {
        let jobs = self.lock();
        jobs.queue.len() + self.leaving.load(Ordering::SeqCst)
    }

    /// Adds jobs at the back; once the buffer is closed, refuses them and
    /// returns them, to be given back.
    #[must_use = "refused jobs are to be given back"]
    pub(crate) fn extend(&self, mut jobs: VecDeque<Buffered>) -> VecDeque<Buffered> {
        let mut buffered = self.lock();
        if !buffered.closed {
            buffered.queue.append(&mut jobs);
        }
        jobs
    }

    /// Below how many buffered jobs the pull loop wants to know (at least
    /// 1, so that it hears of a slot that finds the buffer empty).
    pub(crate) fn set_low_water(&self, jobs: usize) {
        self.low_water.store(jobs.max(1), Ordering::Relaxed);
    }

    /// The longest a job taken since the last call waited for its slot.
    pub(crate) fn take_longest_wait(&self) -> Duration {
        Duration::from_micros(self.longest_wait.swap(0, Ordering::Relaxed))
    }

    /// How many jobs were not started since the last call, their leases
    /// lapsed.
    pub(crate) fn take_lapsed(&self) -> usize {
        self.lapsed.swap(0, Ordering::Relaxed)
    }

    /// The next job to start and a free slot for it, if there are both,
    /// counted in `running` (the in-flight count of the lane that will run
    /// it). Skips jobs whose lease was lost while they waited, or may have
    /// ended by `now` (see [`WatchRef::lapsed`]: the store's clock jumped,
    /// it was unreachable, the pull's answer came late, the process was
    /// stalled). With `tell`,
    /// taking jobs tells the pull loop when the buffer runs low (a lane
    /// does, unless it pulls for itself; the pull loop itself need not be
    /// told). A job's wait for its slot
    /// ends at `now`, read once by the caller for all the jobs it starts
    /// together (a clock read per job is a measurable part of a quick
    /// job's cost, and the wait is compared with tens of milliseconds).
    pub(crate) fn take(
        &self,
        slots: &Arc<Slots>,
        tell: bool,
        running: &AtomicUsize,
        now: Instant,
    ) -> Option<(Buffered, Slot)> {
        loop {
            let slot = slots.try_take()?;
            let (next, left) = {
                let mut jobs = self.lock();
                let next = if jobs.closed {
                    None
                } else {
                    jobs.queue.pop_front()
                };
                // Counted as running before it leaves the buffer (under its
                // lock), so that the pull loop, which reads the buffer's
                // length before the running counts, never misses its lease.
                if next.is_some() {
                    running.fetch_add(1, Ordering::SeqCst);
                }
                (next, jobs.queue.len())
            };
            let low_water = self.low_water.load(Ordering::Relaxed);
            // With nothing to start, the slot is given back before the
            // pull loop is told: told first, it could look while the slot
            // was still taken, size its pull for no free slot, and wait.
            let Some(job) = next else {
                drop(slot);
                // Told whenever a free slot finds nothing to start.
                if tell && left < low_water {
                    self.board.ended.notify_one();
                }
                return None;
            };
            // Told once as the level crosses the mark.
            if tell && left < low_water && left + 1 >= low_water {
                self.board.ended.notify_one();
            }
            if job.hold.watch.lapsed(now) {
                running.fetch_sub(1, Ordering::SeqCst);
                self.lapsed.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let waited = now.saturating_duration_since(job.buffered_at).as_micros();
            let waited = u64::try_from(waited).unwrap_or(u64::MAX);
            // Read first: most jobs waited no longer than one taken before
            // them, and a read costs far less than a read-modify-write.
            if waited > self.longest_wait.load(Ordering::Relaxed) {
                self.longest_wait.fetch_max(waited, Ordering::Relaxed);
            }
            return Some((job, slot));
        }
    }

    /// Takes out every buffered job, to be given back, if the first one
    /// (the longest buffered, as a rule) was buffered by `since`; else
    /// none. They count as [held](Self::held) until [`Self::given_back`].
    pub(crate) fn take_all_if_buffered_by(&self, since: Instant) -> VecDeque<Buffered> {
        let mut jobs = self.lock();
        match jobs.queue.front() {
            Some(first) if first.buffered_at <= since => {
                self.leaving.fetch_add(jobs.queue.len(), Ordering::SeqCst);
                std::mem::take(&mut jobs.queue)
            }
            _ => VecDeque::new(),
        }
    }

    /// `n` jobs taken out to be given back are (or could not be): their
    /// leases no longer count, which the pull loop hears of if it waits for
    /// held leases to be let go.
    pub(crate) fn given_back(&self, n: usize) {
        self.leaving.fetch_sub(n, Ordering::SeqCst);
        if self.board.wants_ends.load(Ordering::SeqCst) {
            self.board.ended.notify_one();
        }
    }

    /// Stops all starts and returns the jobs left, to be given back.
    pub(crate) fn close(&self) -> VecDeque<Buffered> {
        let mut jobs = self.lock();
        jobs.closed = true;
        std::mem::take(&mut jobs.queue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::leased_for_tests;
    use crate::worker::keeper::WatchRef;

    fn buffered(id: i64) -> Buffered {
        let job = leased_for_tests(id);
        let lease = Lease {
            job_id: id,
            token: job.lease_token,
        };
        let hold = Hold {
            watch: WatchRef::alone(lease, job.run_at),
        };
        Buffered::new(LeasedJob { lease, job }, hold, Instant::now())
    }

    fn ids(jobs: &VecDeque<Buffered>) -> Vec<i64> {
        jobs.iter().map(|b| b.lease.job_id).collect()
    }

    #[test]
    fn a_closed_buffer_refuses_what_a_late_pull_adds() {
        let buffer = Buffer::new(Arc::new(Board::new(1)));
        let refused = buffer.extend([buffered(1), buffered(2)].into());
        assert!(refused.is_empty());
        let unstarted = buffer.close();
        assert_eq!(ids(&unstarted), [1, 2], "closing hands back what it held");
        let refused = buffer.extend([buffered(3)].into());
        assert_eq!(ids(&refused), [3], "a late pull's jobs are handed back");
        assert_eq!(buffer.len(), 0);
        let slots = Slots::new(1);
        let running = AtomicUsize::new(0);
        assert!(
            buffer
                .take(&slots, false, &running, Instant::now())
                .is_none()
        );
    }

    #[test]
    fn jobs_are_taken_out_once_the_first_has_waited_long_enough() {
        let buffer = Buffer::new(Arc::new(Board::new(1)));
        let first = buffered(1);
        let since = first.buffered_at;
        let _ = buffer.extend([first, buffered(2)].into());
        let before = since
            .checked_sub(Duration::from_millis(1))
            .expect("a clock past its start");
        assert!(buffer.take_all_if_buffered_by(before).is_empty());
        assert_eq!(buffer.len(), 2, "none waited since then");
        assert_eq!(ids(&buffer.take_all_if_buffered_by(since)), [1, 2]);
        assert!(buffer.is_empty());
        assert_eq!(buffer.held(), 2, "held until given back");
        buffer.given_back(2);
        assert_eq!(buffer.held(), 0);
        assert!(buffer.take_all_if_buffered_by(since).is_empty());
    }
}
