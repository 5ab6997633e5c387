//! Keeps alive every lease a started worker holds: one task renews each
//! held lease a third of a lease after its last renewal, whether its job
//! waits in the prefetch buffer, runs, or has finished and waits for its
//! completion to be recorded, and tells the job's holder when a renewal
//! finds the lease lost, or when no renewal has reached the store for five
//! sixths of a lease (see [`Timing::give_up`]), renewals that fail, hang
//! or panic alike; a job whose lease has gone that long unrenewed is not
//! started ([`WatchRef::lapsed`]). The leases due at a tick are renewed together
//! ([`Puller::extend_batch`]: one statement on PostgreSQL, one transaction
//! on SQLite), so renewals take one pool connection, not one per job.
//!
//! [`Puller::extend_batch`]: crate::Puller::extend_batch
//!
//! One task for all leases, rather than a timer per job: a pull costs the
//! keeper one slot in a list (its leases registered together, see
//! [`PulledLeases`]), and a handler that blocks its thread cannot stall the
//! renewals of the others. Letting a lease go sets a flag on its
//! [`LeaseWatch`], without a lock; a pull leaves the list once all its
//! leases are let go or lost and the list is swept: at every renewal tick,
//! and whenever the leases its pulls hold have doubled since the last
//! sweep.
//!
//! The keeper also tells of handlers that run for long with no timeout
//! (see [`LONG_RUN`]): a handler that never returns would otherwise hold
//! its slot, and its lease, for as long as the worker runs, unnoticed.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::Poll;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use futures::task::AtomicWaker;
use time::OffsetDateTime;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::execute::contained;
use crate::job::JobId;
use crate::lease::{Lease, LeasedJob};
use crate::store::Backend;

/// The most leases one renewal statement extends ([`Puller::extend_batch`]).
///
/// [`Puller::extend_batch`]: crate::Puller::extend_batch
const RENEWAL_BATCH: usize = 1000;

/// How many renewal statements run at once, for a worker holding more than
/// [`RENEWAL_BATCH`] leases: few enough not to take the pool.
const RENEWALS_AT_ONCE: usize = 4;

/// The most rounds of renewals under way at once: more than one only while
/// the store leaves one unanswered. Two rounds of [`RENEWALS_AT_ONCE`]
/// statements stay within a default pool of 10 connections.
const ROUNDS_AT_ONCE: usize = 2;

/// The list of registered pulls is not swept before their leases, held or
/// not, are this many.
const LEAST_SWEEP: usize = 1024;

/// How long after its pull a job whose handler has no timeout may be held
/// before the keeper logs a warning naming it; it warns again each time
/// that time has doubled.
pub(crate) const LONG_RUN: Duration = Duration::from_secs(10 * 60);

/// A lease's end as last renewed, and when that renewal (or the pull) was
/// sent.
#[derive(Debug, Clone, Copy)]
struct Renewal {
    until: OffsetDateTime,
    /// `None` for a lease no keeper renews (the test mode's inline runs).
    sent: Option<Instant>,
}

/// What the keeper and a lease's holder tell each other (kept with the
/// other leases of its pull, see [`PulledLeases`]): the lease's end as last
/// renewed, whether a renewal found it lost, and whether the holder has let
/// it go.
#[derive(Debug)]
pub(crate) struct LeaseWatch {
    renewal: Mutex<Renewal>,
    lost: AtomicBool,
    /// The holder let the lease go: the keeper stops renewing it.
    released: AtomicBool,
    /// The task waiting in [`Self::lost`], if any.
    waiter: AtomicWaker,
    /// Once a handler with no timeout runs the job: its kind, as the
    /// worker numbers those (see `Entry::untimed`); else 0.
    untimed: AtomicU32,
    /// How many times the keeper has warned that it runs long.
    long_run_warnings: AtomicU32,
}

impl LeaseWatch {
    /// A lease that ends at `deadline` on the store's clock, which no
    /// keeper renews.
    pub(crate) fn new(deadline: OffsetDateTime) -> Self {
        Self::renewed_at(deadline, None)
    }

    fn renewed_at(until: OffsetDateTime, sent: Option<Instant>) -> Self {
        Self {
            renewal: Mutex::new(Renewal { until, sent }),
            lost: AtomicBool::new(false),
            released: AtomicBool::new(false),
            waiter: AtomicWaker::new(),
            untimed: AtomicU32::new(0),
            long_run_warnings: AtomicU32::new(0),
        }
    }

    fn renewal(&self) -> Renewal {
        *self.renewal.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The lease's end on the store's clock, as last renewed.
    pub(crate) fn deadline(&self) -> OffsetDateTime {
        self.renewal().until
    }

    /// Records a renewal sent at `sent` and answered with `until`, unless
    /// a later one was answered first: rounds of renewals may overlap when
    /// the store leaves one unanswered for a while, and a late answer must
    /// not move the lease's last renewal back.
    fn renewed(&self, until: OffsetDateTime, sent: Instant) {
        let mut renewal = self.renewal.lock().unwrap_or_else(PoisonError::into_inner);
        if renewal.sent.is_none_or(|last| last <= sent) {
            *renewal = Renewal {
                until,
                sent: Some(sent),
            };
        }
    }

    /// Whether a renewal has found the lease lost.
    pub(crate) fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }

    /// Resolves once a renewal has found the lease lost. One task waits at
    /// a time (the job's own run): a second waiter would take the first's
    /// place.
    pub(crate) async fn lost(&self) {
        std::future::poll_fn(|cx| {
            if self.is_lost() {
                return Poll::Ready(());
            }
            self.waiter.register(cx.waker());
            // Checked again: the flag may have been set between the first
            // look and the registration.
            if self.is_lost() {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
    }

    /// Tells the keeper that a handler with no timeout, of the kind the
    /// worker numbers `kind`, runs the job, so it warns once that has gone
    /// on for [`LONG_RUN`]; 0 once it returned (or when it has a timeout).
    pub(crate) fn runs_untimed(&self, kind: u32) {
        self.untimed.store(kind, Ordering::Relaxed);
    }

    /// The warning due for a job held for `held`, if any: its kind's
    /// number, if a handler with no timeout runs it and `held` has reached
    /// a doubling of [`LONG_RUN`] it was not warned of yet. Several reached
    /// since the last look (the keeper looks every twelfth of a lease, and a
    /// lease may be long) make one warning.
    fn long_run_due(&self, held: Duration) -> Option<u32> {
        let kind = self.untimed.load(Ordering::Relaxed);
        if kind == 0 {
            return None;
        }
        // How many of LONG_RUN, 2 × LONG_RUN, 4 × LONG_RUN, … `held` reached.
        let reached = (0..u32::BITS)
            .take_while(|&k| held >= LONG_RUN.saturating_mul(1 << k))
            .count() as u32;
        if reached <= self.long_run_warnings.load(Ordering::Relaxed) {
            return None;
        }
        self.long_run_warnings.store(reached, Ordering::Relaxed);
        Some(kind)
    }

    fn mark_lost(&self) {
        self.lost.store(true, Ordering::Release);
        self.waiter.wake();
    }

    fn is_released(&self) -> bool {
        self.released.load(Ordering::Acquire)
    }

    /// Whether the keeper is still to renew the lease.
    fn is_held(&self) -> bool {
        !self.is_released() && !self.is_lost()
    }
}

/// The leases of one pull, registered together: one allocation and one
/// registry entry for the lot, rather than one per lease, as a pull of
/// many jobs would otherwise allocate many watches at once (a burst that
/// overflows the allocator's per-thread cache).
#[derive(Debug)]
pub(crate) struct PulledLeases {
    leases: Box<[(Lease, LeaseWatch)]>,
    /// When the pull was sent: its jobs' runs start at most a couple of
    /// poll intervals later (a job buffered longer is given back).
    pulled_at: Instant,
    /// How long after its last renewal was sent (or its pull) a lease is
    /// given up ([`Timing::give_up`]).
    give_up: Duration,
}

impl PulledLeases {
    /// Whether the keeper is still to renew any of them.
    fn any_held(&self) -> bool {
        self.leases.iter().any(|(_, watch)| watch.is_held())
    }
}

/// One lease's [`LeaseWatch`] within its pull's registration.
#[derive(Clone)]
pub(crate) struct WatchRef {
    pull: Arc<PulledLeases>,
    index: usize,
}

impl WatchRef {
    /// `lease`, ending at `deadline` on the store's clock, registered with
    /// no keeper (the test mode's inline runs).
    pub(crate) fn alone(lease: Lease, deadline: OffsetDateTime) -> Self {
        Self {
            pull: Arc::new(PulledLeases {
                leases: Box::new([(lease, LeaseWatch::new(deadline))]),
                pulled_at: Instant::now(),
                give_up: Duration::MAX,
            }),
            index: 0,
        }
    }

    fn lease(&self) -> Lease {
        self.pull.leases[self.index].0
    }

    /// Whether the lease may have ended on the store by `now`: a renewal
    /// found it lost, or none was answered for the keeper's give-up time
    /// (then it is marked lost here, as the keeper would at its next tick).
    /// For a job about to start: the keeper looks only once a tick, and a
    /// job pulled (or stalled) past its give-up time would otherwise start
    /// before that look, beside another worker that took the lease over.
    pub(crate) fn lapsed(&self, now: Instant) -> bool {
        if self.is_lost() {
            return true;
        }
        // No renewal is older than the pull: a lease pulled less than the
        // give-up time ago has not lapsed, which is all most starts need
        // to know (without taking the renewal's lock).
        let give_up = self.pull.give_up;
        if now.saturating_duration_since(self.pull.pulled_at) < give_up {
            return false;
        }
        let lapsed = self
            .renewal()
            .sent
            .is_some_and(|sent| now.saturating_duration_since(sent) >= give_up);
        if lapsed {
            self.mark_lost();
        }
        lapsed
    }
}

impl fmt::Debug for WatchRef {
    // Its own lease only, not the whole pull's.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (lease, watch) = &self.pull.leases[self.index];
        f.debug_struct("WatchRef")
            .field("lease", lease)
            .field("watch", watch)
            .finish()
    }
}

impl std::ops::Deref for WatchRef {
    type Target = LeaseWatch;

    fn deref(&self) -> &LeaseWatch {
        &self.pull.leases[self.index].1
    }
}

/// The pulls registered with the keeper, kept until none of their leases
/// is held any more (let go or lost) and the list is next swept.
#[derive(Default)]
struct Held {
    pulls: Vec<Arc<PulledLeases>>,
    /// The leases of the registered pulls, held or not.
    leases: usize,
    /// The number of leases at which the list is swept next.
    sweep_at: usize,
}

impl Held {
    /// Forgets the pulls whose leases are all let go or lost.
    fn sweep(&mut self) {
        self.pulls.retain(|pull| pull.any_held());
        self.leases = self.pulls.iter().map(|pull| pull.leases.len()).sum();
        self.sweep_at = (2 * self.leases).max(LEAST_SWEEP);
    }
}

type Registry = Arc<Mutex<Held>>;

fn lock(registry: &Registry) -> MutexGuard<'_, Held> {
    registry.lock().unwrap_or_else(PoisonError::into_inner)
}

/// When the keeper renews a lease and when it gives one up.
#[derive(Debug, Clone, Copy)]
struct Timing {
    /// A lease is renewed once this long has passed since its last
    /// renewal: a third of a lease.
    every: Duration,
    /// The keeper looks at every lease this often, a twelfth of a lease:
    /// each is renewed between a third of a lease and a quarter more after
    /// the last.
    period: Duration,
    /// A lease whose last renewal that the store answered (or whose pull)
    /// was sent this long ago is given up: its run is stopped, or it is
    /// not started. The store extended it from a moment after the sending,
    /// so it ends there a whole lease after, at the earliest. Given up a
    /// sixth of a lease, two looks, early: the first look past this time
    /// comes at least a look's period before the lease ends on the store,
    /// for the run to stop in (and for a look that comes late, its thread
    /// busy). (Looking every sixth of a lease and giving up one look early,
    /// the lease could end at the very moment of the look.)
    give_up: Duration,
}

impl Timing {
    fn new(lease_length: Duration, backend_lease: time::Duration) -> Self {
        let every = lease_length / 3;
        let period = every / 4;
        let lapse = Duration::try_from(backend_lease).unwrap_or(Duration::MAX);
        Self {
            every,
            period,
            give_up: lapse.saturating_sub(2 * period),
        }
    }
}

/// Renews the leases registered with it until dropped.
pub(crate) struct LeaseKeeper {
    registry: Registry,
    timing: Timing,
    task: JoinHandle<()>,
}

impl LeaseKeeper {
    /// Starts renewing: every lease is extended by `backend_lease` once a
    /// third of `lease` has passed since its last renewal. `untimed_kinds`
    /// names the kinds [`LeaseWatch::runs_untimed`] is told of, by number.
    pub(crate) fn start(
        backend: Arc<dyn Backend>,
        lease: Duration,
        backend_lease: time::Duration,
        untimed_kinds: Arc<[&'static str]>,
    ) -> Self {
        let registry = Registry::default();
        let timing = Timing::new(lease, backend_lease);
        let task = tokio::spawn(renew(
            backend,
            Arc::clone(&registry),
            lease,
            timing,
            backend_lease,
            untimed_kinds,
        ));
        Self {
            registry,
            timing,
            task,
        }
    }

    /// Registers the jobs of one pull (sent at `pulled_at`) as one entry,
    /// and returns each with the hold that keeps it registered. Every hold
    /// exists before this returns: a lease registered with no hold would be
    /// renewed until the worker stops.
    pub(crate) fn hold_all(
        &self,
        jobs: Vec<LeasedJob>,
        pulled_at: Instant,
    ) -> impl Iterator<Item = (LeasedJob, Hold)> {
        let holds: Vec<Hold> = if jobs.is_empty() {
            Vec::new()
        } else {
            let pull = Arc::new(PulledLeases {
                leases: jobs
                    .iter()
                    .map(|leased| {
                        let until = leased
                            .job
                            .locked_until
                            .unwrap_or(OffsetDateTime::UNIX_EPOCH);
                        (leased.lease, LeaseWatch::renewed_at(until, Some(pulled_at)))
                    })
                    .collect(),
                pulled_at,
                give_up: self.timing.give_up,
            });
            let holds = (0..jobs.len())
                .map(|index| Hold {
                    watch: WatchRef {
                        pull: Arc::clone(&pull),
                        index,
                    },
                })
                .collect();
            let mut registry = lock(&self.registry);
            if registry.leases + jobs.len() > registry.sweep_at {
                registry.sweep();
            }
            registry.leases += jobs.len();
            registry.pulls.push(pull);
            holds
        };
        // The holds exist before the jobs are handed out one by one, so the
        // leases of jobs never taken from the iterator are let go with it.
        jobs.into_iter().zip(holds)
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One registered lease; dropping it stops the renewals.
pub(crate) struct Hold {
    /// What the keeper's renewals found.
    pub(crate) watch: WatchRef,
}

impl Drop for Hold {
    fn drop(&mut self) {
        // No lock: a sweep forgets the pull once all its leases are let go.
        self.watch.released.store(true, Ordering::Release);
    }
}

async fn renew(
    backend: Arc<dyn Backend>,
    registry: Registry,
    lease_length: Duration,
    timing: Timing,
    backend_lease: time::Duration,
    untimed_kinds: Arc<[&'static str]>,
) {
    let Timing {
        every,
        period,
        give_up,
    } = timing;
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Rounds of renewals are awaited beside the ticks rather than before
    // the next: a store that stops answering must not stall the lapse
    // checks (the handlers of leases it let end would run on beside their
    // next holders). A round unanswered for two looks (a sixth of a
    // lease) no longer holds back the next, which sends again what it has
    // not renewed (on PostgreSQL,
    // one silent connection must not keep every lease from renewals on
    // the others until they all lapse); at most [`ROUNDS_AT_ONCE`] are
    // under way, and each is dropped once none of its leases could still
    // be saved: sent at least a third of a lease after their last renewal,
    // they are given up `give_up` after it.
    let round_limit = give_up.saturating_sub(every).max(period);
    let mut rounds = FuturesUnordered::new();
    // The tick that sent the newest round still under way: ticks keep to
    // their schedule, so the next ones are whole periods after it.
    let mut newest: Option<Instant> = None;
    loop {
        let ticked = tokio::select! {
            ticked = tick.tick() => ticked,
            Some(renewed) = rounds.next(), if !rounds.is_empty() => {
                if let Err(tokio::time::error::Elapsed { .. }) = renewed {
                    tracing::warn!(
                        lease_ms = lease_length.as_millis() as u64,
                        "a renewal of leases went unanswered until its leases were beyond saving"
                    );
                }
                if rounds.is_empty() {
                    newest = None;
                }
                continue;
            }
        };
        let now = Instant::now();
        let renewing = rounds.len() >= ROUNDS_AT_ONCE
            || newest.is_some_and(|sent| ticked.duration_since(sent) < 2 * period);
        let mut lapsed = 0usize;
        let mut due: Vec<WatchRef> = Vec::new();
        let mut long_runs: Vec<(JobId, u32, Duration)> = Vec::new();
        {
            let mut held = lock(&registry);
            held.sweep();
            for pull in &held.pulls {
                let held_for = now.duration_since(pull.pulled_at);
                for (index, (lease, watch)) in pull.leases.iter().enumerate() {
                    let Some(sent) = watch.renewal().sent.filter(|_| watch.is_held()) else {
                        continue;
                    };
                    if let Some(kind) = watch.long_run_due(held_for) {
                        long_runs.push((lease.job_id, kind, held_for));
                    }
                    let since = now.duration_since(sent);
                    if since >= give_up {
                        // Renewals failed or went unanswered for five
                        // sixths of a lease: its run stops, or it is not
                        // started.
                        watch.mark_lost();
                        lapsed += 1;
                    } else if since >= every && !renewing {
                        due.push(WatchRef {
                            pull: Arc::clone(pull),
                            index,
                        });
                    }
                }
            }
        }
        // One warning for all, naming the job held longest: a service
        // every handler waits on that hangs would otherwise log a line per
        // job.
        if let Some(&(job, kind, held_for)) = long_runs.iter().max_by_key(|(.., held)| *held) {
            let kind = untimed_kinds.get(kind as usize - 1).copied().unwrap_or("?");
            tracing::warn!(
                jobs = long_runs.len(),
                job,
                kind,
                running_s = held_for.as_secs(),
                "jobs whose handler has no timeout have been held a long time (counted from \
                 their pull; the longest is named); a handler that never returns holds its \
                 slot and the job's lease for as long as the worker runs (set \
                 WorkerBuilder::timeout or timeout_for to bound it)"
            );
        }
        if lapsed > 0 {
            tracing::warn!(
                leases = lapsed,
                lease_ms = lease_length.as_millis() as u64,
                "leases lapsed: no renewal was answered for five sixths of a lease; their jobs are stopped, or not started, and another worker may run them"
            );
        }
        if !due.is_empty() {
            newest = Some(ticked);
            rounds.push(tokio::time::timeout(
                round_limit,
                renew_due(Arc::clone(&backend), due, lease_length, backend_lease),
            ));
        }
    }
}

/// One round of renewals: the leases `due`, in statements of at most
/// [`RENEWAL_BATCH`], [`RENEWALS_AT_ONCE`] at a time.
async fn renew_due(
    backend: Arc<dyn Backend>,
    due: Vec<WatchRef>,
    lease_length: Duration,
    backend_lease: time::Duration,
) {
    futures::stream::iter(due.chunks(RENEWAL_BATCH))
        .for_each_concurrent(RENEWALS_AT_ONCE, |watches| {
            let backend = &backend;
            async move {
                let leases: Vec<Lease> = watches.iter().map(WatchRef::lease).collect();
                let sent = Instant::now();
                // A panic (a backend's bug) fails this renewal, not the
                // keeper: the renewals and lapse checks of every lease
                // would end with it.
                let outcome =
                    contained("extend_batch", backend.extend_batch(&leases, backend_lease)).await;
                // A renewal that took a third of a lease leaves the next
                // one little time: the pool or the store is too slow for
                // this lease, which operators should hear of before leases
                // lapse.
                let took = sent.elapsed();
                if took >= lease_length / 3 {
                    tracing::warn!(
                        leases = leases.len(),
                        took_ms = took.as_millis() as u64,
                        lease_ms = lease_length.as_millis() as u64,
                        "renewing leases took a third of the lease or more"
                    );
                }
                let ends = match outcome {
                    Ok(ends) if ends.len() == leases.len() => ends,
                    Ok(ends) => {
                        tracing::error!(
                            leases = leases.len(),
                            answers = ends.len(),
                            "the backend answered a renewal of leases with the wrong count; will try again"
                        );
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, leases = leases.len(), "could not extend leases; will try again");
                        return;
                    }
                };
                // Lost leases, told in one warning (a stalled worker
                // may find many lost at once): their count, and the
                // first with its time since the last renewal.
                let (mut lost, mut first) = (0usize, None);
                for (watch, end) in watches.iter().zip(ends) {
                    match end {
                        Some(until) => watch.renewed(until, sent),
                        // A lease let go meanwhile (its completion
                        // recorded, say) is no loss to anyone.
                        None if watch.is_released() => {}
                        None => {
                            lost += 1;
                            first.get_or_insert_with(|| {
                                let since = watch.renewal().sent.map(|last| sent - last);
                                (watch.lease().job_id, since)
                            });
                            watch.mark_lost();
                        }
                    }
                }
                if let Some((job, since)) = first {
                    tracing::warn!(
                        leases = lost,
                        job,
                        since_last_renewal_ms = since.map(|d| d.as_millis() as u64),
                        took_ms = took.as_millis() as u64,
                        lease_ms = lease_length.as_millis() as u64,
                        "a renewal found leases no longer held: each lapsed and its job was \
                         leased again (more than a lease since the last renewal), or its \
                         outcome was being recorded (the first is named)"
                    );
                }
            }
        })
        .await;
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_lost_lease_wakes_its_waiter() {
        let watch = Arc::new(LeaseWatch::new(OffsetDateTime::UNIX_EPOCH));
        let waiting = tokio::spawn({
            let watch = Arc::clone(&watch);
            async move { watch.lost().await }
        });
        // The waiter registers before the lease is lost.
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished() && !watch.is_lost());
        watch.mark_lost();
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("woken")
            .expect("no panic");
        assert!(watch.is_lost());
        // Once lost, waiting again ends at once.
        watch.lost().await;
    }

    #[test]
    fn a_long_run_is_warned_of_once_per_doubling_reached() {
        let watch = LeaseWatch::new(OffsetDateTime::UNIX_EPOCH);
        let minutes = |m: u64| Duration::from_secs(60 * m);
        assert_eq!(
            watch.long_run_due(minutes(60)),
            None,
            "a handler with a timeout"
        );
        watch.runs_untimed(3);
        assert_eq!(watch.long_run_due(minutes(9)), None);
        assert_eq!(watch.long_run_due(minutes(10)), Some(3));
        assert_eq!(watch.long_run_due(minutes(19)), None);
        // 20 and 40 minutes both passed since the last look: one warning.
        assert_eq!(watch.long_run_due(minutes(45)), Some(3));
        assert_eq!(watch.long_run_due(minutes(79)), None);
        assert_eq!(watch.long_run_due(minutes(80)), Some(3));
        assert_eq!(watch.long_run_due(Duration::MAX), Some(3));
        assert_eq!(watch.long_run_due(Duration::MAX), None);
        watch.runs_untimed(0);
        assert_eq!(watch.long_run_due(Duration::MAX), None, "returned");
    }

    #[test]
    fn renewals_move_the_deadline() {
        let watch = LeaseWatch::new(OffsetDateTime::UNIX_EPOCH);
        let later = OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(30);
        watch.renewed(later, Instant::now());
        assert_eq!(watch.deadline(), later);
    }

    /// Looks come every period, at any phase to a lease's last renewal:
    /// the first that finds it past the give-up time comes at least a
    /// period before the lease ends on the store, for the run to stop in.
    /// (Given up one period early instead, the lease could end at the very
    /// moment of that look.)
    #[test]
    fn a_lapse_is_seen_a_period_before_the_store_ends_the_lease() {
        for ms in [100, 600, 30_000, 3_600_000] {
            let lease = Duration::from_millis(ms);
            let timing = Timing::new(lease, time::Duration::try_from(lease).expect("lease"));
            for step in 0..100 {
                let phase = timing.period * step / 100;
                let first_look = (0..)
                    .map(|k| phase + timing.period * k)
                    .find(|&look| look >= timing.give_up)
                    .expect("a look");
                assert!(
                    lease.saturating_sub(first_look) >= timing.period,
                    "lease {lease:?}: seen at {first_look:?} ({timing:?})"
                );
            }
        }
    }

    /// A lease unrenewed for the give-up time counts as lapsed for a start,
    /// before the keeper's next look, and stays lost; a renewal sent since
    /// the pull moves that time on.
    #[test]
    fn a_lease_lapses_for_a_start_at_the_give_up_time() {
        let pulled_at = Instant::now();
        let give_up = Duration::from_millis(400);
        let watch = |renewed: Option<Duration>| {
            let watch = LeaseWatch::renewed_at(OffsetDateTime::UNIX_EPOCH, Some(pulled_at));
            if let Some(after) = renewed {
                watch.renewed(OffsetDateTime::UNIX_EPOCH, pulled_at + after);
            }
            WatchRef {
                pull: Arc::new(PulledLeases {
                    leases: Box::new([(
                        Lease {
                            job_id: 1,
                            token: 1,
                        },
                        watch,
                    )]),
                    pulled_at,
                    give_up,
                }),
                index: 0,
            }
        };
        let pulled = watch(None);
        assert!(!pulled.lapsed(pulled_at + Duration::from_millis(399)));
        assert!(!pulled.is_lost());
        assert!(pulled.lapsed(pulled_at + give_up));
        assert!(pulled.is_lost(), "marked lost for its run and the keeper");
        assert!(pulled.lapsed(pulled_at), "lost for good");
        let renewed = watch(Some(Duration::from_millis(300)));
        assert!(!renewed.lapsed(pulled_at + Duration::from_millis(699)));
        assert!(renewed.lapsed(pulled_at + Duration::from_millis(700)));
    }

    #[test]
    fn a_late_answer_to_an_earlier_renewal_moves_nothing_back() {
        let watch = LeaseWatch::new(OffsetDateTime::UNIX_EPOCH);
        let (first, second) = (Instant::now(), Instant::now() + Duration::from_millis(5));
        let (early, late) = (
            OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(30),
            OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(31),
        );
        watch.renewed(late, second);
        watch.renewed(early, first);
        assert_eq!(watch.deadline(), late);
        assert_eq!(watch.renewal().sent, Some(second));
    }
}
