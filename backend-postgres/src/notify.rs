//! Waking listeners after a push: one `pg_notify` per queue that got jobs.
//!
//! NOTIFY is not free on PostgreSQL: a notifying transaction takes one
//! database-wide lock at commit and holds it until the commit is flushed,
//! so transactions that notify commit one at a time, never in a group.
//! Notifying from every push transaction (as a trigger did in schema
//! version 1) made concurrent pushes wait on each other's WAL flush.
//!
//! So a push through the pool ([`Pusher::push`](relayq_core::Pusher::push))
//! commits its insert alone, then hands the queues it added jobs to to one
//! [`Notifier`] task per backend (except a push on an idle backend, which
//! notifies in its insert's transaction committed without a flush, then
//! waits for the flush: see [`crate::fold`]). The task sends them in one statement,
//! folding every push that arrived while the previous statement ran (and
//! at most one statement per [`MIN_INTERVAL`]), in a
//! transaction with `synchronous_commit = off`: a notification is not
//! durable data, so its commit need not wait for a flush. Listeners hear of
//! a job only after its insert committed, as before.
//!
//! A push inside the caller's transaction (`push_in`) notifies in that
//! transaction instead, so workers are woken only if it commits.

use std::collections::BTreeSet;
use std::sync::{Mutex, PoisonError};

use sqlx::{PgPool, SqlStr};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Duration, Instant};

use crate::deadline::{Conn, Deadline};

/// Sends the notifications of pool pushes from a background task.
pub(crate) struct Notifier {
    pool: PgPool,
    deadline: Option<Deadline>,
    /// The statement notifying `$1::text[]` queues, at `synchronous_commit = off`.
    sql: SqlStr,
    /// The running task: its inbox and its handle. Replaced if the task has
    /// ended (its runtime shut down).
    task: Mutex<Option<Task>>,
}

/// A running notifier task.
struct Task {
    inbox: mpsc::UnboundedSender<Vec<String>>,
    handle: JoinHandle<()>,
}

impl Notifier {
    pub(crate) fn new(pool: PgPool, deadline: Option<Deadline>, sql: SqlStr) -> Self {
        Self {
            pool,
            deadline,
            sql,
            task: Mutex::new(None),
        }
    }

    /// Queues a notification for each of `queues`; returns at once.
    pub(crate) fn notify(&self, queues: Vec<String>) {
        if queues.is_empty() {
            return;
        }
        let mut task = self.task.lock().unwrap_or_else(PoisonError::into_inner);
        let queues = match task.as_ref() {
            Some(running) => match running.inbox.send(queues) {
                Ok(()) => return,
                Err(mpsc::error::SendError(queues)) => queues,
            },
            None => queues,
        };
        let (inbox, rx) = mpsc::unbounded_channel();
        // Cannot fail: the receiver is alive.
        let _ = inbox.send(queues);
        let handle = tokio::spawn(run(
            self.pool.clone(),
            self.deadline.clone(),
            self.sql.clone(),
            rx,
        ));
        *task = Some(Task { inbox, handle });
    }

    /// Sends the notifications still queued, then stops the task: called
    /// before the pool closes, which would make them fail (a program that
    /// pushes, then closes the backend and exits, still wakes the workers
    /// of other processes). A push after this starts a new task.
    pub(crate) async fn close(&self) {
        let task = self
            .task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(Task { inbox, handle }) = task {
            // The task sends what its inbox holds, then ends.
            drop(inbox);
            let _ = handle.await;
        }
    }
}

/// The shortest time between the starts of two notifying statements.
///
/// Each notifying statement is a transaction of its own (with an xid, a
/// commit record and the global notify lock) plus a pool round trip, about
/// as much server work as a push; sent back to back under a stream of
/// single pushes there is nearly one per push. A push arriving after a
/// quiet spell is still notified at once (the latency workload's pushes,
/// 50 ms apart, all are); pushes arriving within this time of the previous
/// statement are folded into the next one, so they wait at most this long
/// (plus a timer tick) for their wake-up. Measured: 20,000 pushes from 8
/// tasks sent 2,406 notifying statements.
const MIN_INTERVAL: Duration = Duration::from_millis(1);

/// The wait before a failed notification is sent again; it doubles with
/// each failure in a row, up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(100);

/// The longest wait between two attempts to send a notification.
const RETRY_MAX: Duration = Duration::from_secs(1);

/// Sends everything queued since the last statement in one statement, until
/// the backend (the sender) is gone.
///
/// A statement that fails (a connection broken by a server restart, the
/// pool's acquire timing out) is sent again after a backoff, with the
/// queues pushed to meanwhile: an extra wake-up costs a worker a pull that
/// may find nothing, a lost one leaves it asleep until its poll. It is
/// given up once the pool is closed, or once the backend is gone and an
/// attempt still fails.
async fn run(
    pool: PgPool,
    deadline: Option<Deadline>,
    sql: SqlStr,
    mut inbox: mpsc::UnboundedReceiver<Vec<String>>,
) {
    let mut next_at = Instant::now();
    while let Some(first) = inbox.recv().await {
        let mut queues: BTreeSet<String> = first.into_iter().collect();
        let mut backoff = RETRY_FIRST;
        loop {
            if Instant::now() < next_at {
                tokio::time::sleep_until(next_at).await;
            }
            next_at = Instant::now() + MIN_INTERVAL;
            while let Ok(more) = inbox.try_recv() {
                queues.extend(more);
            }
            let list: Vec<&String> = queues.iter().collect();
            let query = sqlx::query(sql.clone()).bind(&list);
            let notified = match Conn::acquire(&pool, deadline.as_ref()).await {
                Ok(mut conn) => conn.run(|c| query.execute(c)).await,
                Err(e) => Err(e),
            };
            let Err(e) = notified else {
                break;
            };
            if pool.is_closed() || inbox.is_closed() {
                tracing::warn!(error = %e, "relayq-postgres: could not notify pushed queues; workers find the jobs at their next poll");
                return;
            }
            tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "relayq-postgres: could not notify pushed queues; will try again");
            next_at = Instant::now() + backoff;
            backoff = (backoff * 2).min(RETRY_MAX);
        }
    }
}
