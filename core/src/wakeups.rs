//! Push notifications from a backend to the workers waiting on it.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::Stream;

/// A subscription to "jobs were pushed" signals, from
/// [`Backend::subscribe`](crate::Backend::subscribe). Dropping it unsubscribes.
pub struct Wakeups {
    signals: Pin<Box<dyn Stream<Item = ()> + Send>>,
}

impl fmt::Debug for Wakeups {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Wakeups").finish_non_exhaustive()
    }
}

impl Wakeups {
    /// Wraps a stream that yields once per signal and ends when the source
    /// is gone for good.
    pub fn from_stream(signals: impl Stream<Item = ()> + Send + 'static) -> Self {
        Self {
            signals: Box::pin(signals),
        }
    }

    /// Waits for the next signal; `None` once the source has closed.
    pub async fn next(&mut self) -> Option<()> {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }

    /// Polls for the next signal; `Ready(None)` once the source has closed.
    pub(crate) fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<()>> {
        self.signals.as_mut().poll_next(cx)
    }
}
