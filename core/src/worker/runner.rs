//! The pull loop of a started worker, and its graceful shutdown.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::{JoinError, JoinSet};
use tokio::time::Instant;

use super::WorkerBuilder;
use super::events::Outcome;
use super::execute::{Mode, Shared, batch_completions, execute};
use super::handler::Phase;
use super::keeper::{Hold, LeaseKeeper};
use super::prefetch::Prefetch;
use crate::error::Result;
use crate::lease::LeasedJob;
use crate::request::{MAX_PULL_BATCH, PullRequest};
use crate::wakeups::Wakeups;

/// What a graceful shutdown did with the jobs in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// Jobs whose attempt ended on its own during the grace period (done,
    /// failed or dead alike).
    pub finished: usize,
    /// Jobs still running at the deadline, stopped and given back: they are
    /// `Pending` and eligible at once for another worker, the attempt not
    /// spent.
    pub released: usize,
}

impl ShutdownReport {
    fn count(&mut self, joined: Result<Outcome, JoinError>) {
        match joined {
            Ok(Outcome::Released) => self.released += 1,
            Ok(_) => self.finished += 1,
            Err(e) => log_join_error(&e),
        }
    }
}

fn log_join_error(e: &JoinError) {
    // `execute` contains handler panics, so this is a bug in relayq itself.
    tracing::error!(error = %e, "a job task of the worker failed");
}

/// Subscribes to the backend's push signals; `None` means poll only.
async fn subscribe<S>(shared: &Shared<S>) -> Option<Wakeups> {
    match shared.backend.subscribe(&shared.config.queues).await {
        Ok(wakeups) => wakeups,
        Err(e) => {
            tracing::warn!(error = %e, "could not subscribe to wake-ups; polling instead");
            None
        }
    }
}

/// How many times the pull loop yields to let other handlers finish before
/// it pulls for the slots free so far (when it keeps no buffer).
const COALESCE_YIELDS: usize = 4;

/// How many pulls may be under way at once.
const PULLS_AT_ONCE: usize = 2;

/// How many releases run at once when a shutdown gives back the buffer.
const RELEASES_AT_ONCE: usize = 8;

fn free_slots(slots: &Semaphore) -> u32 {
    u32::try_from(slots.available_permits()).unwrap_or(u32::MAX)
}

async fn next_signal(wakeups: &mut Option<Wakeups>) -> Option<()> {
    match wakeups {
        Some(w) => w.next().await,
        None => std::future::pending().await,
    }
}

/// A pull under way.
type Pulling = Pin<Box<dyn Future<Output = Pulled> + Send>>;

/// What a pull came to.
struct Pulled {
    jobs: Result<Vec<LeasedJob>>,
    asked: u32,
    /// When it was sent.
    sent: Instant,
}

/// A leased job waiting for a slot.
struct Buffered {
    leased: LeasedJob,
    hold: Hold,
    /// When its pull came back.
    buffered_at: Instant,
}

/// Pulls and runs jobs until `stop` carries a deadline (or its sender is
/// gone), then drains: no more pulls, buffered jobs are released at once,
/// in-flight jobs get until the deadline, the rest are released.
pub(crate) async fn run<S: Send + Sync + 'static>(
    shared: Arc<Shared<S>>,
    mut stop: watch::Receiver<Option<Instant>>,
) -> ShutdownReport {
    let config = &shared.config;
    let (phase_tx, phase_rx) = watch::channel(Phase::Running);
    let (ack_tx, ack_rx) = mpsc::unbounded_channel();
    let completer = tokio::spawn(batch_completions(Arc::clone(&shared.backend), ack_rx));
    let keeper = LeaseKeeper::start(
        Arc::clone(&shared.backend),
        config.lease,
        config.backend_lease,
    );
    let caps = shared.backend.capabilities();
    let declares_wakeups = caps.in_process_wakeups || caps.cross_process_wakeups;
    let mut wakeups = subscribe(&shared).await;
    let request = PullRequest::queues(config.queues.clone()).lease(config.backend_lease);
    // One task per started job, until its outcome is recorded.
    let mut tasks: JoinSet<Outcome> = JoinSet::new();
    // One permit per handler allowed to run. A job task gives its permit
    // back as soon as its handler returns, before the outcome is recorded,
    // so the next job starts without waiting for the (batched)
    // acknowledgements.
    let slots = Arc::new(Semaphore::new(config.concurrency as usize));
    // Leased jobs waiting for a slot, their leases renewed by the keeper.
    let mut buffer: VecDeque<Buffered> = VecDeque::new();
    let mut prefetch = Prefetch::new(config.prefetch);
    let mut pulls: FuturesUnordered<Pulling> = FuturesUnordered::new();
    // Jobs asked for by the pulls under way.
    let mut asked = 0;
    // Every lease held (buffered, running, awaiting its record) or being
    // pulled stays within this.
    // A finished job's lease is renewed until its outcome is recorded, so
    // the bound on those awaiting it is about memory: were acknowledgements
    // slower than pulls (a database slowed by a vacuum, say), the backlog
    // would otherwise grow without end.
    let max_held = (config.concurrency + config.prefetch) as usize
        + WorkerBuilder::<S>::MAX_AWAITING_ACK as usize;

    // True while the queues may hold due jobs: after a full batch, a
    // wake-up or a poll tick; false after a short batch.
    let mut more = true;
    let mut next_poll = Instant::now() + config.poll_interval;
    tracing::info!(queues = ?config.queues, concurrency = config.concurrency, "worker started");

    let deadline = loop {
        while let Some(joined) = tasks.try_join_next() {
            more |= gives_back_due_now(joined);
        }
        if let Some(deadline) = *stop.borrow_and_update() {
            break deadline;
        }
        // Start buffered jobs on the free slots. Only this loop takes
        // permits, so the free count can only grow meanwhile.
        while !buffer.is_empty() {
            let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                break;
            };
            let Some(Buffered {
                leased,
                mut hold,
                buffered_at,
            }) = buffer.pop_front()
            else {
                break;
            };
            prefetch.waited(buffered_at.elapsed());
            if hold.is_lost() {
                // Taken while it waited (the store's clock jumped, or the
                // database was unreachable for a whole lease): not ours.
                continue;
            }
            let shared = Arc::clone(&shared);
            let mode = Mode::Spawned {
                phase: phase_rx.clone(),
                acks: ack_tx.clone(),
                slot: Some(slot),
                hold: Some(hold),
            };
            tasks.spawn(async move { execute(&shared, leased, mode).await });
        }

        // Pull for the free slots and what the buffer lacks, in up to
        // PULLS_AT_ONCE overlapping pulls, each for the free slots and its
        // share of the buffer, so that the store serves them side by side.
        while more && pulls.len() < PULLS_AT_ONCE {
            let mut free = free_slots(&slots);
            let target = prefetch.target() as usize;
            // Without a buffer to start from, let the handlers that are
            // about to return do so, so that one pull fills all their slots
            // instead of one round trip (and one commit) per slot. Costs
            // microseconds; a slow handler's slot is still refilled at once.
            if target == 0 && free > 0 && pulls.is_empty() {
                for _ in 0..COALESCE_YIELDS {
                    if free >= config.concurrency {
                        break;
                    }
                    tokio::task::yield_now().await;
                    free = free_slots(&slots);
                }
            }
            let held = tasks.len() + buffer.len() + asked;
            let room = max_held.saturating_sub(held);
            let lacking = (free as usize + target).saturating_sub(buffer.len() + asked);
            let share = free as usize + target.div_ceil(PULLS_AT_ONCE);
            let want = lacking.min(share).min(room).min(MAX_PULL_BATCH as usize);
            // Not for a sliver of the buffer: once a good part of a share
            // is missing.
            if want == 0 || want * 2 * PULLS_AT_ONCE < target {
                break;
            }
            let batch = u32::try_from(want).unwrap_or(MAX_PULL_BATCH);
            let backend = Arc::clone(&shared.backend);
            let request = request.clone().batch(batch);
            next_poll = Instant::now() + config.poll_interval;
            asked += want;
            pulls.push(Box::pin(async move {
                let sent = Instant::now();
                let jobs = backend.pull(&request).await;
                Pulled {
                    jobs,
                    asked: batch,
                    sent,
                }
            }) as Pulling);
        }

        let all_busy = free_slots(&slots) == 0;
        tokio::select! {
            biased;
            changed = stop.changed() => {
                if changed.is_err() {
                    // Every handle is gone without a shutdown call.
                    break Instant::now() + config.shutdown_timeout;
                }
            }
            Some(pulled) = pulls.next(), if !pulls.is_empty() => {
                asked -= pulled.asked as usize;
                match pulled.jobs {
                    Ok(jobs) => {
                        let now = Instant::now();
                        let full = jobs.len() >= pulled.asked as usize;
                        // Slots sat idle for this pull's round trip.
                        let starved = buffer.is_empty() && free_slots(&slots) > 0;
                        prefetch.pulled(now.duration_since(pulled.sent), full, starved);
                        more &= full;
                        for leased in jobs {
                            let hold = keeper.hold(&leased, pulled.sent);
                            buffer.push_back(Buffered { leased, hold, buffered_at: now });
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "pull failed; trying again at the next poll");
                        more = false;
                    }
                }
            }
            Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                more |= gives_back_due_now(joined);
            }
            // A handler finished: a buffered job may start, or more be pulled.
            permit = slots.acquire(), if all_busy && (!buffer.is_empty() || (more && pulls.len() < PULLS_AT_ONCE)) => {
                drop(permit);
            }
            signal = next_signal(&mut wakeups), if wakeups.is_some() => {
                more = true;
                if signal.is_none() {
                    tracing::warn!("wake-up subscription closed; polling until it is back");
                    wakeups = None;
                }
            }
            () = tokio::time::sleep_until(next_poll) => {
                more = true;
                next_poll = Instant::now() + config.poll_interval;
                if wakeups.is_none() && declares_wakeups {
                    wakeups = subscribe(&shared).await;
                }
            }
        }
    };

    tracing::info!(
        in_flight = tasks.len(),
        buffered = buffer.len(),
        "worker shutting down"
    );
    drop(wakeups);
    // Tell handlers (`JobContext::is_shutting_down`), then give them until
    // the deadline.
    let _ = phase_tx.send(Phase::Stopping);
    let mut report = ShutdownReport::default();
    // Jobs leased but not started go back at once, for another worker.
    while let Some(pulled) = pulls.next().await {
        for leased in pulled.jobs.unwrap_or_default() {
            let hold = keeper.hold(&leased, pulled.sent);
            buffer.push_back(Buffered {
                leased,
                hold,
                buffered_at: Instant::now(),
            });
        }
    }
    report.released += release_all(&shared, buffer).await;
    let drained = tokio::time::timeout_at(deadline, async {
        while let Some(joined) = tasks.join_next().await {
            report.count(joined);
        }
    })
    .await;
    if drained.is_err() {
        let _ = phase_tx.send(Phase::Abandoning);
        while let Some(joined) = tasks.join_next().await {
            report.count(joined);
        }
    }
    drop(ack_tx);
    if let Err(e) = completer.await {
        log_join_error(&e);
    }
    drop(keeper);
    tracing::info!(
        finished = report.finished,
        released = report.released,
        "worker stopped"
    );
    report
}

/// Whether a job task's end may have made a job due at once (one given
/// back with no delay), so the queues are worth pulling again.
fn gives_back_due_now(joined: std::result::Result<Outcome, JoinError>) -> bool {
    match joined {
        Ok(Outcome::Retrying { delay, .. }) => delay.is_zero(),
        Ok(_) => false,
        Err(e) => {
            log_join_error(&e);
            false
        }
    }
}

/// Releases buffered jobs; returns how many went back.
async fn release_all<S>(shared: &Shared<S>, buffer: VecDeque<Buffered>) -> usize {
    futures::stream::iter(buffer)
        .map(|Buffered { leased, hold, .. }| async move {
            // Renewed until released.
            let _hold = hold;
            match shared.backend.release(&leased.lease).await {
                Ok(()) => 1,
                Err(e) => {
                    tracing::warn!(error = %e, job = leased.lease.job_id, "could not release a buffered job; it returns when its lease ends");
                    0
                }
            }
        })
        .buffer_unordered(RELEASES_AT_ONCE)
        .fold(0, |n, released| async move { n + released })
        .await
}
