//! [`SqliteOptions`]: the URL and the knobs of a [`SqliteBackend`](crate::SqliteBackend).

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use relayq_core::{Clock, Error, Result, SystemClock};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};

/// How to open a [`SqliteBackend`](crate::SqliteBackend): the URL plus pool,
/// locking, wake-up and clock settings. Every setter has a sensible default.
///
/// URLs:
/// - `sqlite://path/to/jobs.db` or `sqlite:jobs.db` — a file, created if
///   missing (unless the URL says `mode=rw`, which opens an existing file
///   only, or `mode=ro`), opened in WAL mode;
/// - `sqlite::memory:`, `sqlite://:memory:` or `sqlite://?mode=memory` — a
///   private in-memory database (see [`SqliteBackend`](crate::SqliteBackend)
///   for how it is shared by the backend's clones).
///
/// ```
/// use std::time::Duration;
/// use relayq_sqlite::SqliteOptions;
///
/// let options = SqliteOptions::new("sqlite://jobs.db")
///     .max_connections(4)
///     .busy_timeout(Duration::from_secs(10));
/// # let _ = options;
/// ```
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    pub(crate) url: String,
    pub(crate) max_connections: u32,
    pub(crate) busy_timeout: Duration,
    pub(crate) lock_timeout: Duration,
    pub(crate) poll_interval: Duration,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) migrate: bool,
    pub(crate) full_sync: bool,
    pub(crate) wal_size_limit: u64,
}

impl SqliteOptions {
    /// Default [`Self::max_connections`] for a file database.
    pub const DEFAULT_MAX_CONNECTIONS: u32 = 8;
    /// Default [`Self::busy_timeout`].
    pub const DEFAULT_BUSY_TIMEOUT: Duration = Duration::from_secs(5);
    /// Default [`Self::lock_timeout`].
    pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(60);
    /// Default [`Self::poll_interval`].
    pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(200);
    /// The longest [`Self::poll_interval`] accepted.
    pub const MAX_POLL_INTERVAL: Duration = Duration::from_secs(24 * 60 * 60);
    /// Default [`Self::wal_size_limit`]: 64 MiB, far above what the log
    /// holds between SQLite's own checkpoints (every 1,000 pages, 4 MiB),
    /// so only a transaction larger than that (a bulk push) leaves work to
    /// cut back.
    pub const DEFAULT_WAL_SIZE_LIMIT: u64 = 64 << 20;

    /// Options for `url` with every default: 8 connections, a 5 s busy
    /// timeout, a 60 s lock timeout, a 200 ms wake-up poll, the system clock,
    /// and migrations run on connect.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            max_connections: Self::DEFAULT_MAX_CONNECTIONS,
            busy_timeout: Self::DEFAULT_BUSY_TIMEOUT,
            lock_timeout: Self::DEFAULT_LOCK_TIMEOUT,
            poll_interval: Self::DEFAULT_POLL_INTERVAL,
            clock: Arc::new(SystemClock),
            migrate: true,
            full_sync: false,
            wal_size_limit: Self::DEFAULT_WAL_SIZE_LIMIT,
        }
    }

    /// The most pooled connections (at least 1). Writes are serialized
    /// anyway and run on one more connection of their own; the pool serves
    /// concurrent reads and [`SqliteBackend::begin`](crate::SqliteBackend::begin).
    /// Ignored for in-memory databases, which always use exactly one connection.
    pub fn max_connections(mut self, max: u32) -> Self {
        self.max_connections = max;
        self
    }

    /// How long SQLite itself waits for a lock held by another connection
    /// or process before giving up one attempt (`PRAGMA busy_timeout`).
    pub fn busy_timeout(mut self, timeout: Duration) -> Self {
        self.busy_timeout = timeout;
        self
    }

    /// How long an operation keeps retrying, with backoff, when the database
    /// stays locked past [`Self::busy_timeout`]. `SQLITE_BUSY` never reaches
    /// the caller before this much time has passed; after it, the operation
    /// fails with a transient [`Error::Backend`] saying the write lock was
    /// not obtained ([`Error::is_transient`]).
    pub fn lock_timeout(mut self, timeout: Duration) -> Self {
        self.lock_timeout = timeout;
        self
    }

    /// How often a subscription checks the file for jobs other processes
    /// pushed, released or retried due at once (`PRAGMA data_version` on a
    /// dedicated connection). Positive and at most
    /// [`Self::MAX_POLL_INTERVAL`].
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// The clock `now` is read from (a [`relayq_core::ManualClock`] in tests).
    /// The default is the host's [`SystemClock`]: SQLite runs on one host, so
    /// there is no server clock to prefer.
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Whether [`SqliteBackend::connect_with`](crate::SqliteBackend::connect_with)
    /// applies pending migrations (the default) or leaves the schema alone,
    /// for deployments that run
    /// [`SqliteBackend::migrate`](crate::SqliteBackend::migrate) as a
    /// separate step.
    pub fn migrate(mut self, yes: bool) -> Self {
        self.migrate = yes;
        self
    }

    /// `PRAGMA synchronous = FULL` instead of the default `NORMAL`. In WAL
    /// mode `NORMAL` never corrupts the database and loses nothing when the
    /// application crashes, but the last transactions before a power loss
    /// or OS crash may roll back; `FULL` syncs the WAL on every commit to
    /// rule that out, at a cost in write throughput.
    pub fn full_sync(mut self, yes: bool) -> Self {
        self.full_sync = yes;
        self
    }

    /// The size, in bytes, the write-ahead log file is cut back to once
    /// SQLite has copied it into the database (`PRAGMA
    /// journal_size_limit`). A checkpoint rewinds the log but keeps its
    /// file at its largest, one large transaction's worth, unless this
    /// caps it. [`Self::DEFAULT_WAL_SIZE_LIMIT`] by default.
    pub fn wal_size_limit(mut self, bytes: u64) -> Self {
        self.wal_size_limit = bytes;
        self
    }

    /// Checks every setting and turns the URL into sqlx connect options.
    pub(crate) fn resolve(&self) -> Result<Resolved> {
        if self.max_connections == 0 {
            return Err(Error::config("max_connections", "must be at least 1"));
        }
        if i32::try_from(self.busy_timeout.as_millis()).is_err() {
            return Err(Error::config(
                "busy_timeout",
                format!("must be at most {} ms", i32::MAX),
            ));
        }
        // The poller's timer adds it to the current instant, which a huge
        // one overflows.
        if self.poll_interval.is_zero() || self.poll_interval > Self::MAX_POLL_INTERVAL {
            return Err(Error::config(
                "poll_interval",
                "must be positive and at most a day",
            ));
        }
        let rest = strip_scheme(&self.url).ok_or_else(|| {
            Error::config(
                "url",
                "must start with `sqlite:` (e.g. `sqlite://jobs.db` or `sqlite::memory:`)",
            )
        })?;
        let (database, params) = rest.split_once('?').unwrap_or((rest, ""));
        let in_memory = database == ":memory:" || params.split('&').any(|p| p == "mode=memory");
        // `mode=rw` (open, never create) and `mode=ro` are the URL's to
        // keep; without a mode, a missing file is created.
        let mode_given = params.split('&').any(|p| p.starts_with("mode="));

        // Let sqlx validate the URL (unknown parameters, bad values); it
        // knows the scheme in lower case only.
        let after_scheme = self.url.split_once(':').map_or("", |(_, rest)| rest);
        let parsed = SqliteConnectOptions::from_str(&format!("sqlite:{after_scheme}"))
            .map_err(|e| Error::config("url", e.to_string()))?;
        let connect = if in_memory {
            // One private in-memory database, held by the pool's single
            // connection for the pool's whole life.
            SqliteConnectOptions::new()
                .in_memory(true)
                .shared_cache(false)
        } else {
            if database.is_empty() {
                return Err(Error::config(
                    "url",
                    "names no database file (use `sqlite::memory:` for an in-memory one)",
                ));
            }
            // Every connection the pool, the writer and the wake-up poller
            // open later opens this path: a relative one would be read
            // from the working directory then, and a process that changed
            // it (a daemon, say) would create a new, empty file there.
            let file = std::path::absolute(parsed.get_filename())
                .map_err(|e| Error::config("url", format!("names no usable path: {e}")))?;
            let parsed = parsed.filename(file);
            let parsed = if mode_given {
                parsed
            } else {
                parsed.create_if_missing(true)
            };
            parsed
                .journal_mode(SqliteJournalMode::Wal)
                .pragma("journal_size_limit", self.wal_size_limit.to_string())
                .synchronous(if self.full_sync {
                    SqliteSynchronous::Full
                } else {
                    SqliteSynchronous::Normal
                })
        }
        .foreign_keys(true)
        .busy_timeout(self.busy_timeout);
        Ok(Resolved { connect, in_memory })
    }
}

/// What [`SqliteOptions::resolve`] yields.
pub(crate) struct Resolved {
    pub(crate) connect: SqliteConnectOptions,
    pub(crate) in_memory: bool,
}

fn strip_scheme(url: &str) -> Option<&str> {
    let (scheme, rest) = url.split_once(':')?;
    if !scheme.eq_ignore_ascii_case("sqlite") {
        return None;
    }
    Some(rest.strip_prefix("//").unwrap_or(rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(url: &str) -> Result<Resolved> {
        SqliteOptions::new(url).resolve()
    }

    #[test]
    fn recognises_in_memory_urls() {
        for url in [
            "sqlite::memory:",
            "sqlite://:memory:",
            "sqlite://?mode=memory",
        ] {
            assert!(resolve(url).map(|r| r.in_memory).unwrap_or(false), "{url}");
        }
        for (url, file) in [
            ("sqlite://jobs.db", "jobs.db"),
            ("sqlite:jobs.db", "jobs.db"),
            ("SQLITE://dir/jobs.db", "dir/jobs.db"),
            ("SQLite:///tmp/jobs.db", "/tmp/jobs.db"),
        ] {
            let resolved = resolve(url).expect(url);
            assert!(!resolved.in_memory, "{url}");
            // Relative paths are fixed when resolved: later connections
            // must open the same file whatever the working directory.
            let cwd = std::env::current_dir().expect("working directory");
            assert_eq!(resolved.connect.get_filename(), cwd.join(file), "{url}");
        }
    }

    #[test]
    fn rejects_bad_urls_and_settings_as_config_errors() {
        for url in [
            "postgres://localhost/db",
            "jobs.db",
            "sqlite://",
            "sqlite://jobs.db?mode=bogus",
            "sqlite://jobs.db?nope=1",
        ] {
            assert!(
                matches!(resolve(url), Err(Error::Config { setting: "url", .. })),
                "{url} should be a config error naming the URL"
            );
        }
        let memory = || SqliteOptions::new("sqlite::memory:");
        let bad = [
            (memory().max_connections(0), "max_connections"),
            (memory().poll_interval(Duration::ZERO), "poll_interval"),
            (memory().poll_interval(Duration::MAX), "poll_interval"),
            (
                memory().busy_timeout(Duration::from_secs(u64::MAX / 2)),
                "busy_timeout",
            ),
        ];
        for (options, setting) in bad {
            let e = options.resolve().err().expect("refused");
            assert_eq!(e.config_setting(), Some(setting), "{e}");
        }
    }
}
