//! Which driver errors are transient ([`relayq_core::Error::is_transient`]).

use std::io::ErrorKind;

use relayq_core::{BoxError, Error};

/// SQLSTATEs outside class `08` (a broken connection) after which the same
/// call may succeed later: contention between transactions, and a server
/// that ended the session, is starting or shutting down, or is at its
/// connection limit. (Not `57014`: a statement cancelled, by its timeout or
/// by someone, is likely cancelled again.)
const TRANSIENT_STATES: &[&str] = &[
    "40001", // serialization_failure
    "40P01", // deadlock_detected
    "55P03", // lock_not_available (lock_timeout)
    "57P01", // admin_shutdown
    "57P02", // crash_shutdown
    "57P03", // cannot_connect_now (starting up, recovering)
    "57P05", // idle_session_timeout
    "25P03", // idle_in_transaction_session_timeout (the session is ended)
    "25P04", // transaction_timeout (PostgreSQL 17; the session is ended)
    "53300", // too_many_connections
];

/// Whether a later attempt of what failed with `e` may succeed: the
/// network failed or the server did not answer (an I/O error of a
/// connection, which is also how a passed reply deadline fails; not a TLS
/// certificate refused or a certificate file missing, which sqlx reports
/// as I/O too), the server's host name did not resolve (see
/// [`is_failed_lookup`]), no pooled connection came free in time (which is
/// also how a refused connection ends, once sqlx has retried it for the
/// acquire timeout), the connection broke (SQLSTATE class `08`, which includes
/// `08P01`, how PgBouncer reports a server it lost), or the server turned
/// the statement down for one of [`TRANSIENT_STATES`].
pub(crate) fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(io) => {
            matches!(
                io.kind(),
                ErrorKind::ConnectionRefused
                    | ErrorKind::ConnectionReset
                    | ErrorKind::ConnectionAborted
                    | ErrorKind::NotConnected
                    | ErrorKind::BrokenPipe
                    | ErrorKind::UnexpectedEof
                    | ErrorKind::TimedOut
                    | ErrorKind::HostUnreachable
                    | ErrorKind::NetworkUnreachable
                    | ErrorKind::NetworkDown
                    | ErrorKind::Interrupted
            ) || is_failed_lookup(io)
        }
        sqlx::Error::PoolTimedOut => true,
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|code| code.starts_with("08") || TRANSIENT_STATES.contains(&&*code)),
        _ => false,
    }
}

/// Whether `io` is the standard library's report of a host name that did
/// not resolve, at connect: it has no [`ErrorKind`] of its own to match
/// (it is `Uncategorized`, which stable Rust cannot name), only its
/// message. Transient because a name may resolve later (a DNS server that
/// timed out, a database whose service name is being recreated), as a
/// refused connection may be accepted later; a misspelled name looks the
/// same, and so does a wrong port.
fn is_failed_lookup(io: &std::io::Error) -> bool {
    io.to_string()
        .starts_with("failed to lookup address information")
}

/// `source`, caused by a driver error that [`is_transient`] or not, as an
/// [`Error::Backend`].
pub(crate) fn backend_error(transient: bool, source: impl Into<BoxError>) -> Error {
    if transient {
        Error::transient(source)
    } else {
        Error::backend(source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_failures_and_pool_timeouts_are_transient() {
        for kind in [
            ErrorKind::ConnectionRefused,
            ErrorKind::ConnectionReset,
            ErrorKind::UnexpectedEof,
            ErrorKind::TimedOut,
        ] {
            assert!(is_transient(&sqlx::Error::Io(kind.into())), "{kind:?}");
        }
        assert!(is_transient(&sqlx::Error::PoolTimedOut));
    }

    #[test]
    fn a_host_name_that_does_not_resolve_is_transient() {
        use std::net::ToSocketAddrs;
        // `.invalid` never resolves (RFC 6761); the error is the one sqlx
        // passes on from tokio, which asks the standard library.
        let lookup = ("relayq-test.invalid", 5432)
            .to_socket_addrs()
            .expect_err("an .invalid name does not resolve");
        assert!(is_transient(&sqlx::Error::Io(lookup)));
        assert!(!is_transient(&sqlx::Error::Io(std::io::Error::other(
            "failed to look at something else"
        ))));
    }

    #[test]
    fn certificates_configuration_and_closed_pools_are_not() {
        // rustls reports a certificate it refused as InvalidData; a
        // missing or unreadable certificate file is NotFound or
        // PermissionDenied.
        for kind in [
            ErrorKind::InvalidData,
            ErrorKind::NotFound,
            ErrorKind::PermissionDenied,
            ErrorKind::InvalidInput,
        ] {
            assert!(!is_transient(&sqlx::Error::Io(kind.into())), "{kind:?}");
        }
        assert!(!is_transient(&sqlx::Error::PoolClosed));
        assert!(!is_transient(&sqlx::Error::RowNotFound));
        assert!(!is_transient(&sqlx::Error::Protocol("bad".into())));
        assert!(!is_transient(&sqlx::Error::Configuration("bad".into())));
    }
}
