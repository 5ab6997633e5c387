//! relayq's PostgreSQL backend.

/// URL schemes this backend accepts in a connection URL.
pub const URL_SCHEMES: &[&str] = &["postgres", "postgresql"];
