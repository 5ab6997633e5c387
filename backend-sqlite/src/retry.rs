//! Driver errors, and retrying an operation the database refused because it
//! was locked (`SQLITE_BUSY` / `SQLITE_LOCKED`), so neither reaches the caller.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use relayq_core::Error;

/// Why one attempt of an operation failed.
#[derive(Debug)]
pub(crate) enum Fail {
    /// The driver failed; maybe only because the database was locked.
    Db(sqlx::Error),
    /// A final answer (`LeaseLost`, `InvalidInput`, …): never retried.
    Core(Error),
}

impl From<sqlx::Error> for Fail {
    fn from(e: sqlx::Error) -> Self {
        Self::Db(e)
    }
}

impl From<Error> for Fail {
    fn from(e: Error) -> Self {
        Self::Core(e)
    }
}

/// `SQLITE_BUSY` and `SQLITE_LOCKED`, with any extended code
/// (`SQLITE_BUSY_SNAPSHOT`, `SQLITE_BUSY_TIMEOUT`, `SQLITE_LOCKED_SHAREDCACHE`, …).
pub(crate) fn is_lock_contention(e: &sqlx::Error) -> bool {
    const SQLITE_BUSY: i64 = 5;
    const SQLITE_LOCKED: i64 = 6;
    let sqlx::Error::Database(db) = e else {
        return false;
    };
    db.code()
        .and_then(|code| code.parse::<i64>().ok())
        .is_some_and(|code| matches!(code & 0xff, SQLITE_BUSY | SQLITE_LOCKED))
}

/// A sqlx error as relayq's [`Error`], as this backend's own calls return
/// it when they do not retry it: for the caller's own statements around
/// [`SqliteBackend::push_in`](crate::SqliteBackend::push_in), so that one
/// test of [`Error::is_transient`] decides whether to retry the
/// transaction. Transient when the database was locked (which reaches a
/// caller only from its own transaction: retry that transaction), no
/// pooled connection came free in time, or a connection's worker thread
/// died (the next write opens a new connection). SQLite's own I/O errors,
/// a full disk and a corrupt file are not: waiting does not mend them.
pub fn error_from(e: sqlx::Error) -> Error {
    match e {
        sqlx::Error::Configuration(source) => Error::config("url", source.to_string()),
        e if is_lock_contention(&e)
            || matches!(e, sqlx::Error::PoolTimedOut | sqlx::Error::WorkerCrashed) =>
        {
            Error::transient(e)
        }
        other => Error::backend(other),
    }
}

/// The error returned when the database stayed locked for the whole
/// lock timeout.
#[derive(Debug)]
pub(crate) struct LockTimeout {
    waited: Duration,
    last: sqlx::Error,
}

impl fmt::Display for LockTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the SQLite database stayed locked by another connection for {:?} \
             (the lock timeout); last attempt: {}",
            self.waited, self.last
        )
    }
}

impl std::error::Error for LockTimeout {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.last)
    }
}

/// Spacing between attempts of one operation.
#[derive(Debug)]
pub(crate) struct Backoff {
    started: Instant,
    limit: Duration,
    delay: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(1);
    const MAX: Duration = Duration::from_millis(100);

    pub(crate) fn new(limit: Duration) -> Self {
        Self {
            started: Instant::now(),
            limit,
            delay: Self::FIRST,
        }
    }

    /// Decides what to do after a failed attempt: `Ok(())` after sleeping
    /// when it should be tried again, or the error to return.
    pub(crate) async fn after(&mut self, fail: Fail, retries: &AtomicU64) -> Result<(), Error> {
        let e = match fail {
            Fail::Core(e) => return Err(e),
            Fail::Db(e) if is_lock_contention(&e) => e,
            Fail::Db(e) => return Err(error_from(e)),
        };
        let waited = self.started.elapsed();
        if waited >= self.limit {
            return Err(Error::transient(LockTimeout { waited, last: e }));
        }
        retries.fetch_add(1, Ordering::Relaxed);
        // A little jitter so several waiters do not retry in lockstep.
        let jitter = Duration::from_micros(u64::from(waited.subsec_nanos() % 1_000));
        tokio::time::sleep(self.delay + jitter).await;
        self.delay = (self.delay * 2).min(Self::MAX);
        Ok(())
    }
}
