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
    /// No job has this id.
    #[error("job {id} not found")]
    NotFound {
        /// The id that was looked up.
        id: i64,
    },

    /// The lease is no longer held: the job was completed, retried, killed or
    /// released through it already, or its lease expired and it was leased
    /// again (with a newer fencing token). Nothing was changed.
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

    /// The backend cannot do this at all (see its `Capabilities`).
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
    #[error("invalid configuration: {reason}")]
    Config {
        /// What was wrong. Never contains a password.
        reason: String,
    },

    /// The store failed: connection lost, server unavailable, I/O error.
    #[error("backend error: {source}")]
    Backend {
        /// The driver's error.
        #[source]
        source: BoxError,
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

    /// Wraps a driver error as [`Error::Backend`].
    pub fn backend(source: impl Into<BoxError>) -> Self {
        Self::Backend {
            source: source.into(),
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
}
