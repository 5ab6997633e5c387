//! Keeps alive every lease a started worker holds: one task renews each
//! held lease a third of a lease after its last renewal, whether its job
//! waits in the prefetch buffer, runs, or has finished and waits for its
//! completion to be recorded, and tells the job's holder when a renewal
//! finds the lease lost.
//!
//! One task for all leases, rather than a timer per job: a job costs the
//! keeper a map entry, and a handler that blocks its thread cannot stall
//! the renewals of the others.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::Poll;
use std::time::Duration;

use futures::StreamExt;
use futures::task::AtomicWaker;
use time::OffsetDateTime;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::job::JobId;
use crate::lease::{Lease, LeasedJob};
use crate::store::Backend;

/// How many renewals run at once: enough to renew hundreds of leases within
/// a tick on a remote database, few enough not to take the pool.
const RENEWALS_AT_ONCE: usize = 8;

/// What the keeper tells a lease's holder, in one allocation per lease:
/// the lease's end as last renewed, and whether a renewal found it lost.
#[derive(Debug)]
pub(crate) struct LeaseWatch {
    deadline: Mutex<OffsetDateTime>,
    lost: AtomicBool,
    /// The task waiting in [`Self::lost`], if any.
    waiter: AtomicWaker,
}

impl LeaseWatch {
    /// A lease that ends at `deadline` on the store's clock.
    pub(crate) fn new(deadline: OffsetDateTime) -> Self {
        Self {
            deadline: Mutex::new(deadline),
            lost: AtomicBool::new(false),
            waiter: AtomicWaker::new(),
        }
    }

    /// The lease's end on the store's clock, as last renewed.
    pub(crate) fn deadline(&self) -> OffsetDateTime {
        *self.deadline.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn renewed(&self, until: OffsetDateTime) {
        *self.deadline.lock().unwrap_or_else(PoisonError::into_inner) = until;
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

    fn mark_lost(&self) {
        self.lost.store(true, Ordering::Release);
        self.waiter.wake();
    }
}

/// A lease the worker holds.
struct Held {
    lease: Lease,
    /// Shared with the lease's [`Hold`] and the job's context.
    watch: Arc<LeaseWatch>,
    /// When the last renewal (or the pull) was sent.
    renewed_at: Instant,
}

/// Hashes a job id with one multiplication. Every job passes through the
/// registry twice, and ids come from the store, not from an adversary, so
/// SipHash's resistance to chosen keys buys nothing here.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_i64(&mut self, n: i64) {
        // Fibonacci hashing: the high bits, which the table's control bytes
        // use, depend on every bit of the id.
        self.0 = (n as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type Leases = HashMap<JobId, Held, BuildHasherDefault<IdHasher>>;

type Registry = Arc<Mutex<Leases>>;

fn lock(registry: &Registry) -> MutexGuard<'_, Leases> {
    registry.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Renews the leases registered with it until dropped.
pub(crate) struct LeaseKeeper {
    registry: Registry,
    task: JoinHandle<()>,
}

impl LeaseKeeper {
    /// Starts renewing: every lease is extended by `backend_lease` once a
    /// third of `lease` has passed since its last renewal.
    pub(crate) fn start(
        backend: Arc<dyn Backend>,
        lease: Duration,
        backend_lease: time::Duration,
    ) -> Self {
        let registry = Registry::default();
        let task = tokio::spawn(renew(backend, Arc::clone(&registry), lease, backend_lease));
        Self { registry, task }
    }

    /// Registers the jobs of one pull (sent at `pulled_at`), under one
    /// lock, and returns each with the hold that keeps it registered.
    pub(crate) fn hold_all(
        &self,
        jobs: Vec<LeasedJob>,
        pulled_at: Instant,
    ) -> impl Iterator<Item = (LeasedJob, Hold)> {
        let mut registry = lock(&self.registry);
        registry.reserve(jobs.len());
        let held: Vec<(LeasedJob, Hold)> = jobs
            .into_iter()
            .map(|leased| {
                let watch = Arc::new(LeaseWatch::new(
                    leased
                        .job
                        .locked_until
                        .unwrap_or(OffsetDateTime::UNIX_EPOCH),
                ));
                registry.insert(
                    leased.lease.job_id,
                    Held {
                        lease: leased.lease,
                        watch: Arc::clone(&watch),
                        renewed_at: pulled_at,
                    },
                );
                let hold = Hold {
                    lease: leased.lease,
                    registry: Arc::clone(&self.registry),
                    watch,
                };
                (leased, hold)
            })
            .collect();
        drop(registry);
        held.into_iter()
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One registered lease; dropping it stops the renewals.
pub(crate) struct Hold {
    lease: Lease,
    registry: Registry,
    /// What the keeper's renewals found.
    pub(crate) watch: Arc<LeaseWatch>,
}

impl Drop for Hold {
    fn drop(&mut self) {
        let mut held = lock(&self.registry);
        // A later lease of the same job (lost here, leased again) is not ours.
        if let Entry::Occupied(entry) = held.entry(self.lease.job_id)
            && entry.get().lease == self.lease
        {
            entry.remove();
        }
    }
}

async fn renew(
    backend: Arc<dyn Backend>,
    registry: Registry,
    lease: Duration,
    backend_lease: time::Duration,
) {
    let every = lease / 3;
    // Ticking twice per renewal period renews each lease between a third
    // and a half of a lease after the previous renewal.
    let mut tick = tokio::time::interval(every / 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = Instant::now();
        let due: Vec<(Lease, Arc<LeaseWatch>)> = lock(&registry)
            .values()
            .filter(|h| now.duration_since(h.renewed_at) >= every)
            .map(|h| (h.lease, Arc::clone(&h.watch)))
            .collect();
        futures::stream::iter(due)
            .for_each_concurrent(RENEWALS_AT_ONCE, |(lease, watch)| {
                let (backend, registry) = (&backend, &registry);
                async move {
                    let sent = Instant::now();
                    match backend.extend(&lease, backend_lease).await {
                        Ok(until) => {
                            watch.renewed(until);
                            if let Some(h) = lock(registry).get_mut(&lease.job_id)
                                && h.lease == lease
                            {
                                h.renewed_at = sent;
                            }
                        }
                        Err(e) if e.is_lease_lost() => {
                            let mut held = lock(registry);
                            if held.get(&lease.job_id).is_some_and(|h| h.lease == lease)
                                && let Some(h) = held.remove(&lease.job_id)
                            {
                                h.watch.mark_lost();
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, job = lease.job_id, "could not extend the lease; will try again");
                        }
                    }
                }
            })
            .await;
    }
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
    fn renewals_move_the_deadline() {
        let watch = LeaseWatch::new(OffsetDateTime::UNIX_EPOCH);
        let later = OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(30);
        watch.renewed(later);
        assert_eq!(watch.deadline(), later);
    }
}
