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
    owned: Owned,
}

/// What `open` created, to settle and remove.
#[derive(Debug)]
enum Owned {
    Nothing,
    #[cfg(feature = "sqlite")]
    Sqlite(relayq_sqlite::SqliteBackend, std::path::PathBuf),
    #[cfg(feature = "postgres")]
    Postgres(relayq_postgres::PgBackend, relayq_postgres::PgOptions),
}

/// WORKLOAD.md: at most 20 connections; the backend's LISTEN connection is
/// one of them.
#[cfg(feature = "postgres")]
const PG_POOL: u32 = 19;

/// The pool of the latency workload's pusher on PostgreSQL, which pushes
/// one job at a time.
#[cfg(feature = "postgres")]
const PG_PUSHER_POOL: u32 = 2;

/// Another handle on a store, to push from as another process would.
#[derive(Debug)]
pub(crate) struct Peer {
    pub(crate) backend: Arc<dyn Backend>,
    /// How a worker on the store hears of this handle's pushes.
    pub(crate) woken_by: &'static str,
    #[cfg(feature = "postgres")]
    postgres: Option<relayq_postgres::PgBackend>,
}

impl Peer {
    /// Closes what the peer opened (the store itself stays).
    pub(crate) async fn close(self) {
        #[cfg(feature = "postgres")]
        if let Some(backend) = self.postgres {
            // Sends its last notifications first.
            backend.close().await;
        }
    }
}

/// relayq's jobs table of `backend`, quoted for SQL.
#[cfg(feature = "postgres")]
pub(crate) fn jobs_table(backend: &relayq_postgres::PgBackend) -> String {
    format!("\"{}\".jobs", backend.schema())
}

/// Opens a fresh store of `kind`. `url` is the Postgres server to use.
pub(crate) async fn open(kind: Kind, url: &str) -> Result<Store, String> {
    let _ = url;
    match kind {
        #[cfg(feature = "memory")]
        Kind::Memory => Ok(Store {
            backend: Arc::new(relayq::memory::MemoryBackend::new()),
            owned: Owned::Nothing,
        }),
        #[cfg(feature = "sqlite")]
        Kind::Sqlite => {
            let path = std::env::temp_dir().join(format!("relayq-bench-{}.db", std::process::id()));
            let backend =
                relayq_sqlite::SqliteBackend::connect(&format!("sqlite://{}", path.display()))
                    .await
                    .map_err(|e| e.to_string())?;
            Ok(Store {
                backend: Arc::new(backend.clone()),
                owned: Owned::Sqlite(backend, path),
            })
        }
        #[cfg(feature = "postgres")]
        Kind::Postgres => {
            let schema = format!("relayq_bench_{}", std::process::id());
            let options = relayq_postgres::PgOptions::new(url)
                .schema(schema)
                .max_connections(PG_POOL);
            let backend = relayq_postgres::PgBackend::connect_with(options.clone())
                .await
                .map_err(|e| e.to_string())?;
            Ok(Store {
                backend: Arc::new(backend.clone()),
                owned: Owned::Postgres(backend, options),
            })
        }
        #[allow(unreachable_patterns)]
        other => Err(format!(
            "{} is not built in; enable the bench crate's `{}` feature",
            other.label(),
            format!("{other:?}").to_lowercase()
        )),
    }
}

impl Store {
    /// The PostgreSQL backend, when the store is one.
    #[cfg(feature = "postgres")]
    pub(crate) fn postgres(&self) -> Option<&relayq_postgres::PgBackend> {
        match &self.owned {
            Owned::Postgres(backend, _) => Some(backend),
            _ => None,
        }
    }

    /// A handle to push from as another process would: on PostgreSQL a
    /// second backend with a pool of its own, whose pushes reach this
    /// store's workers through LISTEN/NOTIFY; elsewhere this backend
    /// (single-host stores, woken in process).
    pub(crate) async fn peer(&self) -> Result<Peer, String> {
        match &self.owned {
            #[cfg(feature = "postgres")]
            Owned::Postgres(_, options) => {
                let backend = relayq_postgres::PgBackend::connect_with(
                    options.clone().max_connections(PG_PUSHER_POOL),
                )
                .await
                .map_err(|e| e.to_string())?;
                Ok(Peer {
                    backend: Arc::new(backend.clone()),
                    woken_by: "listen_notify",
                    postgres: Some(backend),
                })
            }
            _ => Ok(Peer {
                backend: self.backend.clone(),
                woken_by: "in_process",
                #[cfg(feature = "postgres")]
                postgres: None,
            }),
        }
    }

    /// Brings the store to a steady state after a bulk load (WORKLOAD.md:
    /// VACUUM ANALYZE and CHECKPOINT on PostgreSQL).
    pub(crate) async fn settle(&self) -> Result<(), String> {
        match &self.owned {
            Owned::Nothing => Ok(()),
            #[cfg(feature = "sqlite")]
            Owned::Sqlite(backend, _) => backend.checkpoint().await.map_err(|e| e.to_string()),
            #[cfg(feature = "postgres")]
            Owned::Postgres(backend, _) => {
                let table = jobs_table(backend);
                for statement in [format!("VACUUM ANALYZE {table}"), "CHECKPOINT".to_owned()] {
                    relayq_postgres::sqlx::query(relayq_postgres::sqlx::AssertSqlSafe(statement))
                        .execute(backend.pool())
                        .await
                        .map_err(|e| e.to_string())?;
                }
                Ok(())
            }
        }
    }

    /// Removes what `open` created.
    pub(crate) async fn close(self) {
        drop(self.backend);
        match self.owned {
            Owned::Nothing => {}
            #[cfg(feature = "sqlite")]
            Owned::Sqlite(backend, path) => {
                backend.close().await;
                for suffix in ["", "-wal", "-shm"] {
                    let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
                }
            }
            #[cfg(feature = "postgres")]
            Owned::Postgres(backend, _) => {
                let drop = format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", backend.schema());
                let _ = relayq_postgres::sqlx::query(relayq_postgres::sqlx::AssertSqlSafe(drop))
                    .execute(backend.pool())
                    .await;
                backend.close().await;
            }
        }
    }
}
