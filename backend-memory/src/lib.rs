//! relayq's in-process backend.
//!
//! [`MemoryBackend`] keeps every job in one mutex-guarded state and obeys the
//! whole contract — unique keys, priorities, delays, lease expiry, fencing,
//! `Dead` on an abandoned last attempt, stats, cursors, cleaning — so it is
//! both a product feature (unit tests, embedded single-process queues) and
//! the reference model the SQL backends are tested against.
//!
//! ```
//! use relayq_core::{NewJob, PullRequest, Puller, Pusher};
//! use relayq_memory::MemoryBackend;
//! use serde_json::json;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), relayq_core::Error> {
//! let queue = MemoryBackend::new();
//! queue.push(NewJob::new("greet", &json!({"name": "Ada"}))).await?;
//! let leased = queue.pull(&PullRequest::queue("default")).await?;
//! queue.complete(&leased[0].lease, None).await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Test mode
//!
//! With a [`ManualClock`](relayq_core::ManualClock) injected,
//! [`Worker::run_until_idle`](relayq_core::Worker::run_until_idle) runs
//! every due job in the calling task, deterministically, and retries wait
//! until the test moves the clock. The [`testing`] module adds typed
//! assertions on what was enqueued ([`MemoryBackend::assert_enqueued`]) and
//! an inline mode where a push runs its handler at once
//! ([`testing::Inline`]).

mod state;
mod table;
pub mod testing;

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use relayq_core::{
    Backend, Capabilities, Cleaner, Clock, Completion, Error, Job, JobId, JobPage, JobStatus,
    Lease, LeasedJob, ListFilter, NewJob, Observer, PullRequest, Puller, PushOutcome, Pusher,
    Result, Stats, SystemClock, Wakeups, check_clean, check_lease, check_result, check_retry,
    check_text, truncate_to_micros, validate_batch,
};
use serde_json::Value;
use time::{Duration, OffsetDateTime};
use tokio::sync::watch;

use state::State;

/// An in-process job store. Clones share the same jobs.
#[derive(Clone)]
pub struct MemoryBackend {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    clock: Arc<dyn Clock>,
    /// Bumped whenever a job may have become due: a push stored one, a
    /// lease was released, or a retry is due at once. Subscribers watch it.
    signals: watch::Sender<u64>,
}

impl fmt::Debug for MemoryBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryBackend")
            .field("jobs", &self.lock().job_count())
            .field("clock", &self.shared.clock)
            .finish()
    }
}

impl Default for MemoryBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryBackend {
    /// An empty store on the system clock.
    pub fn new() -> Self {
        Self::with_clock(Arc::new(SystemClock))
    }

    /// An empty store reading `now` from `clock` (e.g. a
    /// [`ManualClock`](relayq_core::ManualClock) in tests).
    pub fn with_clock(clock: Arc<dyn Clock>) -> Self {
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                clock,
                signals: watch::Sender::new(0),
            }),
        }
    }

    /// The clock this store reads.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.shared.clock
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every mutation of the state completes before the guard drops, so a
        // panic elsewhere cannot leave it half-written: recover the guard.
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The clock's time as stored: UTC, whole microseconds, whatever a
    /// custom clock returns (the SQL stores keep no more).
    fn now(&self) -> OffsetDateTime {
        let now = self.shared.clock.now();
        truncate_to_micros(now.checked_to_offset(time::UtcOffset::UTC).unwrap_or(now))
    }

    /// Tells subscribers a job may have become due.
    fn signal(&self) {
        self.shared.signals.send_modify(|n| *n = n.wrapping_add(1));
    }
}

#[async_trait]
impl Pusher for MemoryBackend {
    async fn push(&self, job: NewJob) -> Result<PushOutcome> {
        let mut outcomes = self.push_batch(vec![job]).await?;
        Ok(outcomes.remove(0))
    }

    async fn push_batch(&self, jobs: Vec<NewJob>) -> Result<Vec<PushOutcome>> {
        let jobs = validate_batch(jobs)?;
        let now = self.now();
        // Scheduled and parsed before the lock is taken.
        let stored = jobs
            .iter()
            .map(|job| Ok((job.run_at(now)?, Arc::new(job.payload.to_value()?))))
            .collect::<Result<Vec<_>>>()?;
        let outcomes = {
            let mut state = self.lock();
            jobs.into_iter()
                .zip(stored)
                .map(|(job, (run_at, payload))| state.insert(job, payload, run_at, now))
                .collect::<Vec<_>>()
        };
        if outcomes.iter().any(|o| !o.is_duplicate()) {
            self.signal();
        }
        Ok(outcomes)
    }
}

#[async_trait]
impl Puller for MemoryBackend {
    async fn pull(&self, request: &PullRequest) -> Result<Vec<LeasedJob>> {
        request.validate()?;
        let now = self.now();
        let until = now
            .checked_add(request.lease)
            .map(truncate_to_micros)
            .ok_or_else(|| Error::invalid("lease", "puts locked_until out of range"))?;
        Ok(self.lock().pull(request, now, until))
    }

    async fn complete(&self, lease: &Lease, result: Option<Value>) -> Result<()> {
        check_result(result.as_ref())?;
        let now = self.now();
        self.lock().complete(lease, result, now)
    }

    async fn complete_batch(&self, completions: Vec<Completion>) -> Result<Vec<Lease>> {
        for c in &completions {
            check_result(c.result.as_ref())?;
        }
        let now = self.now();
        let mut state = self.lock();
        Ok(completions
            .into_iter()
            .filter_map(|c| {
                state
                    .complete(&c.lease, c.result, now)
                    .err()
                    .map(|_| c.lease)
            })
            .collect())
    }

    async fn retry(&self, lease: &Lease, delay: Duration, error: &str) -> Result<JobStatus> {
        check_retry(delay, error)?;
        let now = self.now();
        let run_at = now
            .checked_add(delay)
            .map(truncate_to_micros)
            .ok_or_else(|| Error::invalid("delay", "puts run_at out of range"))?;
        let status = self.lock().retry(lease, run_at, error, now)?;
        if status == JobStatus::Pending && run_at <= now {
            self.signal();
        }
        Ok(status)
    }

    async fn kill(&self, lease: &Lease, error: &str) -> Result<()> {
        check_text("error", error)?;
        let now = self.now();
        self.lock().kill(lease, error, now)
    }

    async fn extend_batch(
        &self,
        leases: &[Lease],
        by: Duration,
    ) -> Result<Vec<Option<OffsetDateTime>>> {
        check_lease("by", by)?;
        let now = self.now();
        let until = now
            .checked_add(by)
            .map(truncate_to_micros)
            .ok_or_else(|| Error::invalid("by", "puts locked_until out of range"))?;
        let mut state = self.lock();
        Ok(leases
            .iter()
            .map(|lease| state.extend(lease, until, now).ok().map(|()| until))
            .collect())
    }

    async fn release(&self, lease: &Lease) -> Result<()> {
        let now = self.now();
        self.lock().release(lease, now)?;
        self.signal();
        Ok(())
    }
}

#[async_trait]
impl Observer for MemoryBackend {
    async fn get(&self, id: JobId) -> Result<Option<Job>> {
        Ok(self.lock().get(id).cloned())
    }

    async fn list(&self, filter: &ListFilter) -> Result<JobPage> {
        filter.validate()?;
        Ok(self.lock().list(filter))
    }

    async fn stats(&self) -> Result<Stats> {
        Ok(self.lock().stats())
    }
}

#[async_trait]
impl Cleaner for MemoryBackend {
    async fn clean(&self, status: JobStatus, before: OffsetDateTime) -> Result<u64> {
        let cutoff = check_clean(status, before)?;
        Ok(self.lock().clean(status, cutoff))
    }
}

#[async_trait]
impl Backend for MemoryBackend {
    fn capabilities(&self) -> Capabilities {
        Capabilities::none()
            .in_process_wakeups(true)
            .instant_writes(true)
    }

    async fn subscribe(&self, queues: &[String]) -> Result<Option<Wakeups>> {
        relayq_core::check_queue_names(queues)?;
        // A watch channel cannot lose a signal between two waits: a push
        // that lands while the worker is busy is seen by its next `changed`.
        let rx = self.shared.signals.subscribe();
        Ok(Some(Wakeups::from_stream(futures::stream::unfold(
            rx,
            |mut rx| async move {
                rx.changed().await.ok()?;
                Some(((), rx))
            },
        ))))
    }
}

#[cfg(test)]
mod tests {
    use relayq_core::{Cleaner, JobStatus, NewJob, PullRequest, Puller, Pusher};
    use serde_json::json;

    use super::*;

    /// A clean forgets the indexes of queues with no job left pending or
    /// running, and keeps the others.
    #[tokio::test]
    async fn clean_forgets_the_indexes_of_queues_left_empty() {
        let b = MemoryBackend::new();
        for queue in 0..100 {
            let job = NewJob::new("k", &json!({})).queue(format!("q{queue}"));
            b.push(job).await.expect("push");
        }
        b.push(NewJob::new("k", &json!({})).queue("waiting"))
            .await
            .expect("push");
        for queue in 0..100 {
            let leased = b
                .pull(&PullRequest::queue(format!("q{queue}")))
                .await
                .expect("pull");
            b.complete(&leased[0].lease, None).await.expect("complete");
        }
        assert_eq!(b.lock().queue_count(), 101);
        let far = OffsetDateTime::now_utc() + Duration::days(1);
        assert_eq!(b.clean(JobStatus::Done, far).await.expect("clean"), 100);
        assert_eq!(
            b.lock().queue_count(),
            1,
            "the queue with a job pending stays"
        );
        let leased = b.pull(&PullRequest::queue("waiting")).await.expect("pull");
        assert_eq!(leased.len(), 1);
        b.push(NewJob::new("k", &json!({})).queue("q0"))
            .await
            .expect("a queue forgotten takes jobs again");
        let again = b.pull(&PullRequest::queue("q0")).await.expect("pull");
        assert_eq!(again.len(), 1);
    }

    /// Thousands of leases ended at once (a worker died holding them) are
    /// taken back in pull order, each pull taking the first of them from
    /// an index kept in that order, not sorting them all again.
    #[tokio::test]
    async fn ended_leases_are_taken_back_in_pull_order_from_their_own_index() {
        let clock = relayq_core::ManualClock::new(OffsetDateTime::UNIX_EPOCH + Duration::days(1));
        let b = MemoryBackend::with_clock(Arc::new(clock.clone()));
        let jobs: Vec<NewJob> = (0..3_000)
            .map(|i| NewJob::new("k", &json!({ "i": i })).priority(i % 3))
            .collect();
        b.push_batch(jobs).await.expect("push");
        let lease = Duration::seconds(10);
        let held = b
            .pull(&PullRequest::queue("default").batch(3_000).lease(lease))
            .await
            .expect("pull");
        assert_eq!(held.len(), 3_000);
        let mut order: Vec<(i16, i64)> = held.iter().map(|l| (l.job.priority, l.job.id)).collect();
        order.sort_unstable();
        clock.advance(Duration::seconds(20));
        let mut taken = Vec::new();
        loop {
            let leased = b
                .pull(&PullRequest::queue("default").lease(lease))
                .await
                .expect("pull");
            let [one] = leased.as_slice() else {
                assert!(leased.is_empty(), "{leased:?}");
                break;
            };
            taken.push((one.job.priority, one.job.id));
            if taken.len() == 1 {
                assert_eq!(b.lock().reclaimable_count("default"), 2_999);
            }
        }
        assert_eq!(taken, order, "each taken back once, in pull order");
        assert_eq!(b.lock().reclaimable_count("default"), 0);
    }

    /// A lease a pull found ended but did not take back is still its
    /// holder's to let go (and is then never leased again), and one that
    /// has not ended on the clock of a later pull (moved back) is not
    /// taken.
    #[tokio::test]
    async fn ended_leases_not_taken_back_stay_their_holders_until_taken() {
        let t0 = OffsetDateTime::UNIX_EPOCH + Duration::days(1);
        let clock = relayq_core::ManualClock::new(t0);
        let b = MemoryBackend::with_clock(Arc::new(clock.clone()));
        for i in 0..3 {
            b.push(NewJob::new("k", &json!({ "i": i })))
                .await
                .expect("push");
        }
        let lease = Duration::seconds(10);
        let held = b
            .pull(&PullRequest::queue("default").batch(3).lease(lease))
            .await
            .expect("pull");
        clock.set(t0 + Duration::seconds(20));
        let first = b
            .pull(&PullRequest::queue("default").lease(lease))
            .await
            .expect("pull");
        assert_eq!(first[0].job.id, held[0].job.id);
        assert_eq!(b.lock().reclaimable_count("default"), 2);
        // Let go by its holder while waiting to be taken back.
        b.complete(&held[1].lease, None).await.expect("still held");
        assert_eq!(b.lock().reclaimable_count("default"), 1);
        clock.set(t0 + Duration::seconds(5));
        let none = b
            .pull(&PullRequest::queue("default").lease(lease))
            .await
            .expect("pull");
        assert!(none.is_empty(), "{none:?}");
        assert_eq!(b.lock().reclaimable_count("default"), 0);
        b.release(&held[2].lease).await.expect("still held");
        // Past the end of the first job's second lease: it and the released
        // job are leased, the completed one never again.
        clock.set(t0 + Duration::seconds(40));
        let again = b
            .pull(&PullRequest::queue("default").batch(3).lease(lease))
            .await
            .expect("pull");
        let mut ids: Vec<_> = again.iter().map(|l| l.job.id).collect();
        ids.sort_unstable();
        assert_eq!(ids, [held[0].job.id, held[2].job.id]);
    }
}
