//! A runner's subscription to its backend's push signals ("jobs were
//! pushed"), renewed when it closes, and given up when the runner stops.
//!
//! The runner subscribes when it starts and unsubscribes when it stops.
//! Its pull loop listens; on a backend with instant writes only the first
//! runner subscribes, and its first lane listens (see
//! `runner::Starter::lane_listens`): a push then wakes the one task that
//! pulls the job and begins it, not a pull loop that would pull it and
//! hand it to a lane (each hand-over costs a task's wake-up, about a tenth
//! of an idle memory worker's enqueue-to-start latency); that lane tells
//! the sibling runners. The lock is only ever contended when the runner
//! stops.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::FutureExt;

use super::execute::contained;
use crate::store::Backend;
use crate::wakeups::Wakeups;

/// A subscription being made again, after the last one closed.
type Renewal = Pin<Box<dyn Future<Output = Option<Wakeups>> + Send>>;

enum State {
    /// Subscribed.
    Open(Wakeups),
    /// Subscribing again, once a poll interval has passed.
    Renewing(Renewal),
    /// No signals: the backend sends none, or the runner stopped.
    Off,
}

/// What one runner hears of pushes (see the module documentation). One
/// task polls it (a subscription wakes one waker): the pull loop, or the
/// lane that listens; the other only stops it.
pub(crate) struct Signals {
    state: Mutex<State>,
    backend: Arc<dyn Backend>,
    queues: Vec<String>,
    /// Whether a subscription that failed or closed is made again: the
    /// backend declares signals.
    renews: bool,
    /// How long after a subscription closed, or failed, it is tried again.
    retry_after: Duration,
}

impl Signals {
    /// Subscribes to `backend`'s signals for `queues`. Without a
    /// subscription the runner polls. A backend that declares signals but
    /// failed to subscribe (or whose subscription closes) is tried again
    /// every `retry_after`; one that declares none and returned none is not.
    ///
    /// A subscription made at its first poll (in process) is in place
    /// before the first pull, as a caller would expect. Any other is made
    /// beside the runner's first pulls, not before them, whatever the
    /// backend declares: on PostgreSQL subscribing opens the LISTEN
    /// connection, which takes up to the acquire timeout when the server is
    /// at its connection limit (or longer, behind a reconnect under way),
    /// while the pool could serve pulls at once; and one that never came
    /// would hold up the worker and its shutdown for ever. Such a
    /// subscription, once made, is a sign like a signal (pushes made
    /// before it went unheard), so the runner pulls again.
    pub(crate) fn subscribe(
        backend: Arc<dyn Backend>,
        queues: Vec<String>,
        retry_after: Duration,
    ) -> Self {
        let caps = backend.capabilities();
        let mut signals = Self {
            queues,
            renews: caps.in_process_wakeups || caps.cross_process_wakeups,
            retry_after,
            ..Self::none(backend)
        };
        let mut subscribing = renewal(&signals.backend, &signals.queues, Duration::ZERO);
        let state = match (&mut subscribing).now_or_never() {
            Some(Some(wakeups)) => State::Open(wakeups),
            Some(None) => signals.after_loss(),
            None => State::Renewing(subscribing),
        };
        signals.state = Mutex::new(state);
        signals
    }

    /// Signals that never come, for a runner that hears of pushes from a
    /// sibling instead (see `runner::Starter::lane_listens`).
    pub(crate) fn none(backend: Arc<dyn Backend>) -> Self {
        Self {
            state: Mutex::new(State::Off),
            backend,
            queues: Vec::new(),
            renews: false,
            retry_after: Duration::ZERO,
        }
    }

    /// What follows a subscription that closed or could not be made.
    fn after_loss(&self) -> State {
        if self.renews {
            State::Renewing(renewal(&self.backend, &self.queues, self.retry_after))
        } else {
            State::Off
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits for the next sign that jobs were pushed: a signal, the
    /// subscription closing (pushes made as it closed may have gone
    /// unheard), or a subscription made again after the last closed or
    /// failed (pushes made meanwhile went unheard). Never ends once off.
    /// Cancel-safe: a renewal under way is kept in `self`, not in the
    /// future.
    pub(crate) async fn next(&self) {
        std::future::poll_fn(|cx| self.poll_next(cx)).await;
    }

    fn poll_next(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut state = self.state();
        loop {
            match &mut *state {
                State::Open(wakeups) => match wakeups.poll_next(cx) {
                    Poll::Ready(Some(())) => return Poll::Ready(()),
                    Poll::Ready(None) => {
                        tracing::warn!("wake-up subscription closed; polling until it is back");
                        // The renewal is polled (and so registered) when
                        // the caller waits again.
                        *state = self.after_loss();
                        return Poll::Ready(());
                    }
                    Poll::Pending => return Poll::Pending,
                },
                State::Renewing(renewing) => match renewing.as_mut().poll(cx) {
                    Poll::Ready(Some(wakeups)) => {
                        *state = State::Open(wakeups);
                        return Poll::Ready(());
                    }
                    Poll::Ready(None) => *state = self.after_loss(),
                    Poll::Pending => return Poll::Pending,
                },
                State::Off => return Poll::Pending,
            }
        }
    }

    /// Unsubscribes for good (a renewal under way is dropped): the runner
    /// stops pulling.
    pub(crate) fn stop(&self) {
        let off = std::mem::replace(&mut *self.state(), State::Off);
        drop(off);
    }
}

/// `backend`'s subscription for `queues`, if it makes one. A panic in the
/// backend's `subscribe` (a bug) counts as a failed subscription: in the
/// runner, it would end the worker.
async fn try_subscribe(backend: &dyn Backend, queues: &[String]) -> Option<Wakeups> {
    match contained("subscribe", backend.subscribe(queues)).await {
        Ok(wakeups) => wakeups,
        Err(e) => {
            tracing::warn!(error = %e, "could not subscribe to wake-ups; polling instead");
            None
        }
    }
}

/// Subscribing again after `after`. Runs beside the runner's work, never
/// in its way: on PostgreSQL it waits for the listener to reconnect.
fn renewal(backend: &Arc<dyn Backend>, queues: &[String], after: Duration) -> Renewal {
    let (backend, queues) = (Arc::clone(backend), queues.to_vec());
    Box::pin(async move {
        // Not even a zero sleep: a timer is pending at its first poll.
        if !after.is_zero() {
            tokio::time::sleep(after).await;
        }
        try_subscribe(&*backend, &queues).await
    })
}
