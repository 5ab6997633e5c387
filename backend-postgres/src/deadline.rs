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
//! stopped waiting) still owes that statement's answer. A task waits for
//! it, within the deadline, and returns the connection to the pool once it
//! came; otherwise the connection is closed.
//!
//! One gap is left: sqlx pings every connection returned to its pool, and
//! nothing bounds that ping. A server that goes silent within that round
//! trip holds the connection's pool slot until TCP gives up.
//!
//! The deadlines are counted in ticks of one clock per backend, a thread
//! that ticks [`TICKS_PER_LIMIT`] times per limit, rather than by a Tokio
//! timer per operation: registering a timer wakes the runtime's parked
//! driver whenever no earlier one is pending, a system call and a thread
//! wake-up per statement, which cost 3% of the `enqueue` benchmark.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::thread::Thread;
use std::time::{Duration, Instant};

use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, PgPool, Postgres};
use tokio::sync::Notify;

/// Ticks of the clock per limit: an operation fails between one limit and
/// one limit and a quarter after it began.
const TICKS_PER_LIMIT: u64 = 4;

/// The clock's shortest tick, so a limit under 4 ms is 4 to 5 ms.
const MIN_TICK: Duration = Duration::from_millis(1);

/// The clock thread's stack: it only sleeps and wakes waiters.
const CLOCK_STACK: usize = 64 << 10;

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
            "PostgreSQL did not answer within {:?}; the connection was closed, and what was \
             sent may or may not have taken effect",
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
        relayq_core::Error::transient(sqlx::Error::from(e))
    }
}

/// `op`, or [`NoReply`] once `limit` has passed, on a Tokio timer: for the
/// rare waits (a ping of an idle connection, the LISTEN connection), where
/// the timer's wake-up of the runtime's driver costs nothing that matters.
/// The queue's own operations use a [`Deadline`] instead.
pub(crate) async fn within<T, E: From<NoReply>>(
    limit: Duration,
    op: impl Future<Output = Result<T, E>>,
) -> Result<T, E> {
    tokio::time::timeout(limit, op)
        .await
        .unwrap_or_else(|_| Err(NoReply { after: limit }.into()))
}

/// The reply timeout of a backend and the clock that counts it; clones
/// share the clock, whose thread ends when the last is dropped.
#[derive(Clone)]
pub(crate) struct Deadline {
    limit: Duration,
    clock: Arc<Clock>,
}

struct Clock {
    ticks: AtomicU64,
    tick: Notify,
    /// The clock's thread, woken to end when the clock is dropped.
    thread: OnceLock<Thread>,
}

impl Drop for Clock {
    fn drop(&mut self) {
        if let Some(thread) = self.thread.get() {
            thread.unpark();
        }
    }
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
            thread: OnceLock::new(),
        });
        let weak = Arc::downgrade(&clock);
        let period = (limit / TICKS_PER_LIMIT as u32).max(MIN_TICK);
        let thread = std::thread::Builder::new()
            .name("relayq-pg-deadline".to_owned())
            .stack_size(CLOCK_STACK)
            .spawn(move || tick(&weak, period))?;
        let _ = clock.thread.set(thread.thread().clone());
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
    let mut next = Instant::now() + period;
    loop {
        // Parked rather than asleep, so the clock's drop ends it at once;
        // an early wake-up (parking may end spuriously) ticks nothing.
        std::thread::park_timeout(next.saturating_duration_since(Instant::now()));
        let Some(clock) = clock.upgrade() else {
            return;
        };
        if Instant::now() >= next {
            next += period;
            clock.ticks.fetch_add(1, Ordering::AcqRel);
            clock.tick.notify_waiters();
        }
    }
}

/// A pooled connection whose operations must be answered within a
/// [`Deadline`].
pub(crate) struct Conn {
    /// `Some` until dropped.
    conn: Option<PoolConnection<Postgres>>,
    deadline: Option<Deadline>,
    state: State,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    /// Nothing owed: fit for the next operation, or for the pool.
    Ready,
    /// [`Conn::run`] waits for an answer (if dropped so, its caller left).
    Awaiting,
    /// No answer came within the deadline: closed when dropped.
    Silent,
}

impl Conn {
    /// A connection from `pool` (within the pool's acquire timeout).
    pub(crate) async fn acquire(pool: &PgPool, deadline: Option<&Deadline>) -> sqlx::Result<Self> {
        Ok(Self {
            conn: Some(pool.acquire().await?),
            deadline: deadline.cloned(),
            state: State::Ready,
        })
    }

    /// Runs `op` on the connection. If the server has not answered within
    /// the deadline, fails with [`NoReply`], as does every later call: the
    /// connection is closed when this is dropped. All of `op`'s statements
    /// share the one deadline.
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
            state,
        } = self;
        let (State::Ready, Some(open)) = (*state, conn.as_deref_mut()) else {
            let after = deadline.as_ref().map_or(Duration::ZERO, |d| d.limit);
            return Err(NoReply { after }.into());
        };
        *state = State::Awaiting;
        let out = match deadline {
            Some(deadline) => match deadline.bound(op(open)).await {
                Ok(out) => out,
                Err(no_reply) => {
                    *state = State::Silent;
                    return Err(no_reply.into());
                }
            },
            None => op(open).await,
        };
        *state = State::Ready;
        out
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        match (self.state, &self.deadline) {
            (State::Ready, _) | (State::Awaiting, None) => drop(conn),
            (State::Awaiting, Some(deadline)) => drain(conn, deadline.clone()),
            (State::Silent, _) => close(conn),
        }
    }
}

/// Waits, on a task, for the answer a connection whose caller left still
/// owes, within `deadline`; returns the connection to the pool once it
/// came, or closes it.
fn drain(mut conn: PoolConnection<Postgres>, deadline: Deadline) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return close(conn);
    };
    runtime.spawn(async move {
        // A ping's answer comes after every answer owed before it.
        match deadline.bound(sqlx::Connection::ping(&mut *conn)).await {
            Ok(Ok(())) => drop(conn),
            _ => close(conn),
        }
    });
}

/// Closes a connection at once, not returning it to the pool (which may
/// open another in its place): sqlx would ping it before pooling it again,
/// and wait on a silent one without end.
fn close(conn: PoolConnection<Postgres>) {
    drop(conn.detach());
}
