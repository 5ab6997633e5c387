//! relayq's SQLite backend.

/// URL schemes this backend accepts in a connection URL.
pub const URL_SCHEMES: &[&str] = &["sqlite"];
