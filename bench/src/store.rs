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

/// Opens a fresh store of `kind`. `url` is the Postgres server to use;
/// with `warm_pool`, its pool is opened to its size (see [`warm`]).
pub(crate) async fn open(kind: Kind, url: &str, warm_pool: bool) -> Result<Store, String> {
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
            // Named by PID alone: a file left by an earlier run whose PID
            // this one reuses would otherwise be opened with its jobs.
            for file in sqlite_files(&path) {
                match std::fs::remove_file(&file) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(format!("removing {}: {e}", file.display()));
                    }
                    _ => {}
                }
            }
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
            // Migrated only once the schema is gone: named by PID alone, a
            // schema left by an earlier run whose PID this one reuses would
            // otherwise be kept with its jobs.
            let backend = relayq_postgres::PgBackend::connect_with(options.clone().migrate(false))
                .await
                .map_err(|e| e.to_string())?;
            execute(&backend, drop_schema(&backend)).await?;
            backend.migrate().await.map_err(|e| e.to_string())?;
            if warm_pool {
                warm(backend.pool(), PG_POOL).await?;
            }
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
                    execute(backend, statement).await?;
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
                for file in sqlite_files(&path) {
                    let _ = std::fs::remove_file(file);
                }
            }
            #[cfg(feature = "postgres")]
            Owned::Postgres(backend, _) => {
                // The line is printed already; a schema left behind is
                // worth a word, not a failed run.
                if let Err(e) = execute(&backend, drop_schema(&backend)).await {
                    eprintln!("relayq-bench: schema {} left behind: {e}", backend.schema());
                }
                backend.close().await;
            }
        }
    }
}

/// The SQLite database at `path` and the files SQLite keeps beside it.
#[cfg(feature = "sqlite")]
fn sqlite_files(path: &std::path::Path) -> Vec<std::path::PathBuf> {
    ["", "-wal", "-shm"]
        .iter()
        .map(|suffix| format!("{}{suffix}", path.display()).into())
        .collect()
}

/// Runs `statement` on a connection of `backend`'s pool.
#[cfg(feature = "postgres")]
async fn execute(backend: &relayq_postgres::PgBackend, statement: String) -> Result<(), String> {
    relayq_postgres::sqlx::query(relayq_postgres::sqlx::AssertSqlSafe(statement))
        .execute(backend.pool())
        .await
        .map(drop)
        .map_err(|e| e.to_string())
}

/// The statement that drops `backend`'s schema, if there is one.
#[cfg(feature = "postgres")]
fn drop_schema(backend: &relayq_postgres::PgBackend) -> String {
    format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", backend.schema())
}

/// Opens `size` connections of `pool` (the pool's size) before the clock
/// starts: the pool opens them lazily, as the first statements on them
/// come, and a workload would otherwise time connecting (a few
/// milliseconds each, TLS and session set-up included), which its baseline
/// does not: pgbench reports its rate excluding the time its clients take
/// to connect. All are held at once, so none is handed out twice.
#[cfg(feature = "postgres")]
async fn warm(pool: &relayq_postgres::sqlx::PgPool, size: u32) -> Result<(), String> {
    let mut acquiring = tokio::task::JoinSet::new();
    for _ in 0..size {
        let pool = pool.clone();
        acquiring.spawn(async move { pool.acquire().await });
    }
    let mut held = Vec::new();
    while let Some(joined) = acquiring.join_next().await {
        held.push(
            joined
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?,
        );
    }
    drop(held);
    Ok(())
}
