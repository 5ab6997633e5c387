//! The one error type every relayq backend returns.

use crate::lease::Lease;

/// A boxed error from a storage driver, kept as the source of [`Error::Backend`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Result alias used throughout relayq.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in a relayq operation.
///
/// Backends map their driver errors into these variants, so code written
/// against one backend handles failures from any other the same way.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No job has this id: from [`Worker::wait_for`](crate::Worker::wait_for)
    /// (an acknowledgement of a job that is gone is [`Error::LeaseLost`];
    /// [`Observer::get`](crate::Observer::get) returns `None`).
    #[error("job {id} not found")]
    NotFound {
        /// The id that was looked up.
        id: i64,
    },

    /// The lease is no longer held: the job was completed, retried, killed or
    /// released through it already, or its lease expired and it was leased
    /// again (with a newer fencing token), or the job is gone (cleaned).
    /// Nothing was changed.
    #[error("lease on job {} with fencing token {} is no longer held", .lease.job_id, .lease.token)]
    LeaseLost {
        /// The lease that was presented.
        lease: Lease,
    },

    /// An argument was rejected before anything was written.
    #[error("invalid {field}: {reason}")]
    InvalidInput {
        /// The name of the offending field, e.g. `"kind"` or `"delay"`.
        field: &'static str,
        /// Why it was rejected.
        reason: String,
    },

    /// The backend cannot do this at all (see its `Capabilities`). Reserved:
    /// no backend of this workspace returns it yet.
    #[error("unsupported by this backend: {what}")]
    Unsupported {
        /// What was asked for.
        what: &'static str,
    },

    /// The store's relayq schema is newer than this build of relayq knows:
    /// a newer relayq migrated it (say, before a rollback). Nothing was
    /// changed; upgrade relayq to use this store.
    #[error(
        "the store's relayq schema is version {found}, newer than version {supported}, \
         the newest this relayq knows: upgrade relayq"
    )]
    SchemaTooNew {
        /// The version the store records.
        found: i64,
        /// The newest version this build knows.
        supported: i64,
    },

    /// The configuration (a URL, a schema name, a pool setting) is unusable.
    #[error("invalid {setting} setting: {reason}")]
    Config {
        /// The setting that is unusable, e.g. `"url"`, `"schema"` or
        /// `"max_connections"`.
        setting: &'static str,
        /// What was wrong with it. Never contains a password.
        reason: String,
    },

    /// The store failed: connection lost, server unavailable, I/O error.
    /// Built with [`Error::backend`] or [`Error::transient`].
    #[error("backend error: {source}")]
    #[non_exhaustive]
    Backend {
        /// The driver's error.
        #[source]
        source: BoxError,
        /// Whether the same call may succeed if made again: see
        /// [`Error::is_transient`].
        transient: bool,
    },
}

impl Error {
    /// Builds [`Error::InvalidInput`].
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidInput {
            field,
            reason: reason.into(),
        }
    }

    /// Builds [`Error::Config`].
    pub fn config(setting: &'static str, reason: impl Into<String>) -> Self {
        Self::Config {
            setting,
            reason: reason.into(),
        }
    }

    /// The setting named by an [`Error::Config`], if this is one.
    pub fn config_setting(&self) -> Option<&'static str> {
        match self {
            Self::Config { setting, .. } => Some(setting),
            _ => None,
        }
    }

    /// Wraps a driver error as [`Error::Backend`], not transient.
    pub fn backend(source: impl Into<BoxError>) -> Self {
        Self::Backend {
            source: source.into(),
            transient: false,
        }
    }

    /// Wraps a driver error as a transient [`Error::Backend`]: the store
    /// was unreachable, too slow or too busy, and a later call may succeed.
    pub fn transient(source: impl Into<BoxError>) -> Self {
        Self::Backend {
            source: source.into(),
            transient: true,
        }
    }

    /// The field named by an [`Error::InvalidInput`], if this is one.
    pub fn invalid_field(&self) -> Option<&'static str> {
        match self {
            Self::InvalidInput { field, .. } => Some(field),
            _ => None,
        }
    }

    /// True for [`Error::LeaseLost`].
    pub fn is_lease_lost(&self) -> bool {
        matches!(self, Self::LeaseLost { .. })
    }

    /// True when the same call may succeed if made again, later: the store
    /// could not be reached or did not answer in time (a connection lost or
    /// refused, no pooled connection free within the acquire timeout, the
    /// server starting up, shutting down or at its connection limit, or
    /// ending the session, idle or past a transaction timeout), or
    /// it turned the call down for contention that passes (a serialization
    /// failure or deadlock, a lock not obtained in time, a SQLite database
    /// locked by another process past the lock timeout).
    ///
    /// False for everything else: bad input, a lost lease, a missing job or
    /// feature, a configuration or schema problem, and store failures that
    /// waiting does not mend (a full disk, a permission refused, a
    /// constraint a caller added).
    ///
    /// A transient failure of a write says nothing about whether it took
    /// effect: a connection lost after a push was sent may have stored the
    /// job, and an acknowledgement retried after it took effect finds its
    /// lease gone ([`Error::LeaseLost`]). A push retried with a
    /// [`unique_key`](crate::NewJob::unique_key) is not stored twice while
    /// the first is pending or running (a key is held only then). Within a
    /// caller's transaction (`push_in`), retry the whole transaction, on a
    /// fresh one: the failed one is aborted. (The worker makes this choice
    /// itself: a failed pull is tried again at the next poll, whatever the
    /// error; an outcome whose write failed transiently is written again,
    /// with a growing pause, for up to a lease (not past a shutdown's
    /// deadline); a job whose outcome was not recorded runs again once its
    /// lease expires.)
    ///
    /// ```
    /// use relayq_core::Error;
    ///
    /// let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
    /// assert!(Error::transient(refused).is_transient());
    /// assert!(!Error::invalid("kind", "must not be empty").is_transient());
    /// ```
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Backend {
                transient: true,
                ..
            }
        )
    }
}
