//! The pull loop of a started worker, and its graceful shutdown.

use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::{JoinError, JoinSet};
use tokio::time::Instant;

use super::events::Outcome;
use super::execute::{Mode, Shared, batch_completions, execute};
use super::handler::Phase;
use crate::request::PullRequest;
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
/// it pulls for the slots free so far.
const COALESCE_YIELDS: usize = 4;

fn free_slots(slots: &Semaphore) -> u32 {
    u32::try_from(slots.available_permits()).unwrap_or(u32::MAX)
}

/// Free slots that may be filled now: also bounded so that at most
/// `concurrency` finished jobs wait for their acknowledgement. A finished
/// job's lease is no longer renewed, so were acknowledgements slower than
/// pulls (a database slowed by a vacuum, say), an unbounded backlog would
/// wait past its leases: the jobs would run again elsewhere and their
/// completions be refused, while the backlog grew in memory.
fn fillable(slots: &Semaphore, tasks: usize, concurrency: u32) -> u32 {
    let cap = 2 * concurrency as usize;
    let room = u32::try_from(cap.saturating_sub(tasks)).unwrap_or(u32::MAX);
    free_slots(slots).min(room)
}

async fn next_signal(wakeups: &mut Option<Wakeups>) -> Option<()> {
    match wakeups {
        Some(w) => w.next().await,
        None => std::future::pending().await,
    }
}

/// Pulls and runs jobs until `stop` carries a deadline (or its sender is
/// gone), then drains: no more pulls, in-flight jobs get until the deadline,
/// the rest are released.
pub(crate) async fn run<S: Send + Sync + 'static>(
    shared: Arc<Shared<S>>,
    mut stop: watch::Receiver<Option<Instant>>,
) -> ShutdownReport {
    let config = &shared.config;
    let (phase_tx, phase_rx) = watch::channel(Phase::Running);
    let (ack_tx, ack_rx) = mpsc::unbounded_channel();
    let completer = tokio::spawn(batch_completions(Arc::clone(&shared.backend), ack_rx));
    let caps = shared.backend.capabilities();
    let declares_wakeups = caps.in_process_wakeups || caps.cross_process_wakeups;
    let mut wakeups = subscribe(&shared).await;
    let request = PullRequest::queues(config.queues.clone()).lease(config.backend_lease);
    let mut tasks: JoinSet<Outcome> = JoinSet::new();
    // One permit per handler allowed to run. A job task gives its permit
    // back as soon as its handler returns, before the outcome is recorded,
    // so the next pull overlaps with the (batched) acknowledgements instead
    // of waiting for them: at full load a pull leases a whole batch, never
    // one job per round trip.
    let slots = Arc::new(Semaphore::new(config.concurrency as usize));

    // True while the queues may hold due jobs: after a full batch, a
    // wake-up or a poll tick; false after a short batch.
    let mut more = true;
    let mut next_poll = Instant::now() + config.poll_interval;
    tracing::info!(queues = ?config.queues, concurrency = config.concurrency, "worker started");

    let deadline = loop {
        while let Some(joined) = tasks.try_join_next() {
            match joined {
                Ok(Outcome::Retrying { delay, .. }) if delay.is_zero() => more = true,
                Ok(_) => {}
                Err(e) => log_join_error(&e),
            }
        }
        if let Some(deadline) = *stop.borrow_and_update() {
            break deadline;
        }
        // Only this loop takes permits, so the free count can only grow
        // until the pulled jobs take theirs below.
        let mut free = fillable(&slots, tasks.len(), config.concurrency);
        if free > 0 && more {
            // Handlers started together tend to finish together: let the
            // others that are about to return do so, so that one pull fills
            // all their slots instead of one round trip (and one commit)
            // per slot. Costs microseconds; a slow handler's slot is still
            // refilled at once.
            for _ in 0..COALESCE_YIELDS {
                if free >= config.concurrency {
                    break;
                }
                tokio::task::yield_now().await;
                free = fillable(&slots, tasks.len(), config.concurrency);
            }
            next_poll = Instant::now() + config.poll_interval;
            match shared.backend.pull(&request.clone().batch(free)).await {
                Ok(jobs) => {
                    more = jobs.len() >= free as usize;
                    for leased in jobs {
                        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                            unreachable!("a pull never leases more jobs than free slots");
                        };
                        let shared = Arc::clone(&shared);
                        let mode = Mode::Spawned {
                            phase: phase_rx.clone(),
                            acks: ack_tx.clone(),
                            slot: Some(slot),
                        };
                        tasks.spawn(async move { execute(&shared, leased, mode).await });
                    }
                    continue;
                }
                Err(e) => {
                    tracing::error!(error = %e, "pull failed; trying again at the next poll");
                    more = false;
                }
            }
        }
        // When the acknowledgement bound (not the slots) limits `free`, a
        // freed slot changes nothing until a task ends (`join_next`).
        let slot_bound = free >= free_slots(&slots);
        tokio::select! {
            biased;
            changed = stop.changed() => {
                if changed.is_err() {
                    // Every handle is gone without a shutdown call.
                    break Instant::now() + config.shutdown_timeout;
                }
            }
            Some(joined) = tasks.join_next(), if !tasks.is_empty() => match joined {
                // A job given back due now needs no poll to be seen again.
                Ok(Outcome::Retrying { delay, .. }) if delay.is_zero() => more = true,
                Ok(_) => {}
                Err(e) => log_join_error(&e),
            },
            // Another handler finished while more jobs may be waiting.
            _ = slots.acquire_many(free + 1), if more && slot_bound && free < config.concurrency => {}
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

    tracing::info!(in_flight = tasks.len(), "worker shutting down");
    drop(wakeups);
    // Tell handlers (`JobContext::is_shutting_down`), then give them until
    // the deadline.
    let _ = phase_tx.send(Phase::Stopping);
    let mut report = ShutdownReport::default();
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
    tracing::info!(
        finished = report.finished,
        released = report.released,
        "worker stopped"
    );
    report
}
