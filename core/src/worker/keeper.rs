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
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures::StreamExt;
use time::OffsetDateTime;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::job::JobId;
use crate::lease::{Lease, LeasedJob};
use crate::store::Backend;

/// How many renewals run at once: enough to renew hundreds of leases within
/// a tick on a remote database, few enough not to take the pool.
const RENEWALS_AT_ONCE: usize = 8;

/// A lease the worker holds.
struct Held {
    lease: Lease,
    /// The lease's end on the store's clock, shared with the job's context.
    deadline: Arc<Mutex<OffsetDateTime>>,
    /// When the last renewal (or the pull) was sent.
    renewed_at: Instant,
    /// Fired when a renewal finds the lease lost.
    lost: oneshot::Sender<()>,
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
                let deadline = Arc::new(Mutex::new(
                    leased
                        .job
                        .locked_until
                        .unwrap_or(OffsetDateTime::UNIX_EPOCH),
                ));
                let (lost_tx, lost) = oneshot::channel();
                registry.insert(
                    leased.lease.job_id,
                    Held {
                        lease: leased.lease,
                        deadline: Arc::clone(&deadline),
                        renewed_at: pulled_at,
                        lost: lost_tx,
                    },
                );
                let hold = Hold {
                    lease: leased.lease,
                    registry: Arc::clone(&self.registry),
                    deadline,
                    lost,
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
    /// The lease's end on the store's clock, as last renewed.
    pub(crate) deadline: Arc<Mutex<OffsetDateTime>>,
    /// Resolves when a renewal found the lease lost.
    pub(crate) lost: oneshot::Receiver<()>,
}

impl Hold {
    /// Whether a renewal has found the lease lost.
    pub(crate) fn is_lost(&mut self) -> bool {
        !matches!(
            self.lost.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        )
    }
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
        let due: Vec<(Lease, Arc<Mutex<OffsetDateTime>>)> = lock(&registry)
            .values()
            .filter(|h| now.duration_since(h.renewed_at) >= every)
            .map(|h| (h.lease, Arc::clone(&h.deadline)))
            .collect();
        futures::stream::iter(due)
            .for_each_concurrent(RENEWALS_AT_ONCE, |(lease, deadline)| {
                let (backend, registry) = (&backend, &registry);
                async move {
                    let sent = Instant::now();
                    match backend.extend(&lease, backend_lease).await {
                        Ok(until) => {
                            *deadline.lock().unwrap_or_else(PoisonError::into_inner) = until;
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
                                let _ = h.lost.send(());
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
