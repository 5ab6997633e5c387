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
//! [`Notifier`] task per backend. The task sends them in one statement,
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
use tokio::time::{Duration, Instant};

/// Sends the notifications of pool pushes from a background task.
pub(crate) struct Notifier {
    pool: PgPool,
    /// The statement notifying `$1::text[]` queues, at `synchronous_commit = off`.
    sql: SqlStr,
    /// The running task's inbox; replaced if the task has ended (its
    /// runtime shut down).
    inbox: Mutex<Option<mpsc::UnboundedSender<Vec<String>>>>,
}

impl Notifier {
    pub(crate) fn new(pool: PgPool, sql: SqlStr) -> Self {
        Self {
            pool,
            sql,
            inbox: Mutex::new(None),
        }
    }

    /// Queues a notification for each of `queues`; returns at once.
    pub(crate) fn notify(&self, queues: Vec<String>) {
        if queues.is_empty() {
            return;
        }
        let mut inbox = self.inbox.lock().unwrap_or_else(PoisonError::into_inner);
        let queues = match inbox.as_ref() {
            Some(tx) => match tx.send(queues) {
                Ok(()) => return,
                Err(mpsc::error::SendError(queues)) => queues,
            },
            None => queues,
        };
        let (tx, rx) = mpsc::unbounded_channel();
        // Cannot fail: the receiver is alive.
        let _ = tx.send(queues);
        tokio::spawn(run(self.pool.clone(), self.sql.clone(), rx));
        *inbox = Some(tx);
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

/// Sends everything queued since the last statement in one statement, until
/// the backend (the sender) is gone.
async fn run(pool: PgPool, sql: SqlStr, mut inbox: mpsc::UnboundedReceiver<Vec<String>>) {
    let mut next_at = Instant::now();
    while let Some(first) = inbox.recv().await {
        if Instant::now() < next_at {
            tokio::time::sleep_until(next_at).await;
        }
        next_at = Instant::now() + MIN_INTERVAL;
        let mut queues: BTreeSet<String> = first.into_iter().collect();
        while let Ok(more) = inbox.try_recv() {
            queues.extend(more);
        }
        let queues: Vec<String> = queues.into_iter().collect();
        if let Err(e) = sqlx::query(sql.clone()).bind(&queues).execute(&pool).await {
            // Workers still find the jobs at their next poll.
            tracing::warn!(error = %e, "relayq-postgres: could not notify pushed queues");
        }
    }
}
