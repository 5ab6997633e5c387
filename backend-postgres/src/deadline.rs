//! A deadline on the server's answer to each statement of the queue's own
//! operations.
//!
//! A connection whose server vanished without a reset (a failover, a cut
//! link, a frozen host) answers nothing, and neither sqlx nor PostgreSQL
//! bounds the wait: TCP gives up after about a quarter of an hour. Without
//! a deadline a push, a claim or an acknowledgement on such a connection
//! waits that long, and so do the folded pushes queued behind it (see
//! [`fold`](crate::fold)). With one, the operation fails with
//! [`Error::Backend`](relayq_core::Error::Backend) once the deadline
//! passes, and the connection is closed rather than returned to the pool,
//! where sqlx would wait on it again to check it.
//!
//! A connection whose operation is dropped mid-statement (its caller
//! stopped waiting) is closed the same way: its answer is still owed, so
//! it is not fit for the next statement.
//!
//! The deadlines are counted in ticks of one clock per backend, a thread
//! that ticks [`TICKS_PER_LIMIT`] times per limit, rather than by a Tokio
//! timer per statement: registering a timer wakes the runtime's parked
//! driver whenever no earlier one is pending, a system call and a thread
//! wake-up per statement, which cost 3% of the `enqueue` benchmark.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, PgPool, Postgres};
use tokio::sync::Notify;

/// Ticks of the clock per limit: a statement fails between one limit and
/// one limit and a quarter after it was sent.
const TICKS_PER_LIMIT: u64 = 4;

/// No answer came within the deadline. The statement may or may not have
/// taken effect: the server may have run it and lost the way back.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NoReply {
    after: Duration,
}

impl std::fmt::Display for NoReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PostgreSQL did not answer within {:?} (PgOptions::reply_timeout); the connection \
             was closed, and the statement may or may not have taken effect",
            self.after
        )
    }
}

impl std::error::Error for NoReply {}

impl From<NoReply> for sqlx::Error {
    fn from(e: NoReply) -> Self {
        sqlx::Error::Io(std::io::Error::new(std::io::ErrorKind::TimedOut, e))
    }
}

impl From<NoReply> for relayq_core::Error {
    fn from(e: NoReply) -> Self {
        relayq_core::Error::backend(sqlx::Error::from(e))
    }
}

/// The reply timeout of a backend and the clock that counts it; clones
/// share the clock, which stops once the last is dropped.
#[derive(Clone)]
pub(crate) struct Deadline {
    limit: Duration,
    clock: Arc<Clock>,
}

struct Clock {
    ticks: AtomicU64,
    tick: Notify,
}

impl Deadline {
    /// A deadline of `limit`, or none; starts the clock's thread.
    pub(crate) fn new(limit: Option<Duration>) -> std::io::Result<Option<Self>> {
        let Some(limit) = limit else {
            return Ok(None);
        };
        let clock = Arc::new(Clock {
            ticks: AtomicU64::new(0),
            tick: Notify::new(),
        });
        let weak = Arc::downgrade(&clock);
        let period = (limit / TICKS_PER_LIMIT as u32).max(Duration::from_millis(1));
        std::thread::Builder::new()
            .name("relayq-pg-deadline".to_owned())
            .spawn(move || tick(&weak, period))?;
        Ok(Some(Self { limit, clock }))
    }

    /// `op`, or [`NoReply`] once the limit has passed.
    async fn bound<T>(&self, op: impl Future<Output = T>) -> Result<T, NoReply> {
        let start = self.clock.ticks.load(Ordering::Acquire);
        let passed = async {
            loop {
                let tick = self.clock.tick.notified();
                tokio::pin!(tick);
                // Registered before reading the count: no tick is missed.
                tick.as_mut().enable();
                if self.clock.ticks.load(Ordering::Acquire) - start > TICKS_PER_LIMIT {
                    return;
                }
                tick.await;
            }
        };
        tokio::select! {
            biased;
            out = op => Ok(out),
            () = passed => Err(NoReply { after: self.limit }),
        }
    }
}

/// The clock's thread: ticks every `period` for as long as a [`Deadline`]
/// holds the clock.
fn tick(clock: &Weak<Clock>, period: Duration) {
    loop {
        std::thread::sleep(period);
        let Some(clock) = clock.upgrade() else {
            return;
        };
        clock.ticks.fetch_add(1, Ordering::AcqRel);
        clock.tick.notify_waiters();
    }
}

/// A pooled connection whose statements must be answered within a
/// [`Deadline`].
pub(crate) struct Conn {
    /// `Some` until dropped.
    conn: Option<PoolConnection<Postgres>>,
    deadline: Option<Deadline>,
    /// A statement's answer is owed: set while [`Conn::run`] waits, and
    /// for good once the deadline passed.
    awaiting: bool,
}

impl Conn {
    /// A connection from `pool` (within the pool's acquire timeout).
    pub(crate) async fn acquire(pool: &PgPool, deadline: Option<&Deadline>) -> sqlx::Result<Self> {
        Ok(Self {
            conn: Some(pool.acquire().await?),
            deadline: deadline.cloned(),
            awaiting: false,
        })
    }

    /// Runs `op` on the connection. If the server has not answered within
    /// the deadline, fails with [`NoReply`], as does every later call: the
    /// connection is closed when this is dropped.
    pub(crate) async fn run<'c, T, E, F>(
        &'c mut self,
        op: impl FnOnce(&'c mut PgConnection) -> F,
    ) -> Result<T, E>
    where
        F: Future<Output = Result<T, E>> + 'c,
        E: From<NoReply>,
    {
        let Self {
            conn,
            deadline,
            awaiting,
        } = self;
        let (false, Some(open)) = (*awaiting, conn.as_deref_mut()) else {
            let after = deadline.as_ref().map_or(Duration::ZERO, |d| d.limit);
            return Err(NoReply { after }.into());
        };
        *awaiting = true;
        let out = match deadline {
            Some(deadline) => deadline.bound(op(open)).await?,
            None => op(open).await,
        };
        *awaiting = false;
        out
    }
}

impl Drop for Conn {
    /// A connection that still owes an answer is closed at once (the pool
    /// may open another in its place), not returned: sqlx would wait for
    /// that answer before handing it out again.
    fn drop(&mut self) {
        if let (true, Some(conn)) = (self.awaiting, self.conn.take()) {
            drop(conn.detach());
        }
    }
}
