//! Which driver errors are transient ([`relayq_core::Error::is_transient`]).

use relayq_core::{BoxError, Error};

/// SQLSTATEs of a refusal that a later attempt may not meet: the server
/// starting, shutting down or at its connection limit, and contention
/// between transactions.
const TRANSIENT_STATES: &[&str] = &[
    "40001", // serialization_failure
    "40P01", // deadlock_detected
    "55P03", // lock_not_available (lock_timeout)
    "57014", // query_canceled (statement_timeout)
    "57P01", // admin_shutdown
    "57P02", // crash_shutdown
    "57P03", // cannot_connect_now (starting up, recovering)
    "53300", // too_many_connections
];

/// Whether a later attempt of what failed with `e` may succeed: the server
/// could not be reached or did not answer ([`sqlx::Error::Io`], which is
/// also how a passed reply deadline fails), no pooled connection came free
/// in time, the connection broke (SQLSTATE class 08), or the server turned
/// the statement down for one of [`TRANSIENT_STATES`].
pub(crate) fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut => true,
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|code| code.starts_with("08") || TRANSIENT_STATES.contains(&&*code)),
        _ => false,
    }
}

/// `source`, caused by a driver error that [`is_transient`] or not, as an
/// [`Error::Backend`].
pub(crate) fn backend_error(transient: bool, source: impl Into<BoxError>) -> Error {
    Error::Backend {
        source: source.into(),
        transient,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_and_pool_timeouts_are_transient_configuration_is_not() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(is_transient(&sqlx::Error::Io(refused)));
        assert!(is_transient(&sqlx::Error::PoolTimedOut));
        assert!(!is_transient(&sqlx::Error::PoolClosed));
        assert!(!is_transient(&sqlx::Error::RowNotFound));
        assert!(!is_transient(&sqlx::Error::Protocol("bad".into())));
    }
}
