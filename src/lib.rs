//! relayq: background jobs that are never lost, never run twice at once,
//! and survive crashes (the README says exactly what holds: durability on
//! PostgreSQL, and on SQLite with `full_sync`; one holder at a time while
//! handlers yield; fencing always).
//!
//! This facade re-exports [`relayq_core`] (the job model, the
//! [`Pusher`]/[`Puller`]/[`Observer`]/[`Cleaner`] traits, leases, clocks,
//! errors, and the [`Worker`] runtime with typed handlers) and the backends
//! enabled by cargo features; [`connect`] picks one from a URL:
//!
//! | feature | module | backend | URL |
//! |---|---|---|---|
//! | `memory` (default) | [`memory`] | in-process store, for tests and embedded use | `memory://` |
//! | `sqlite` | `sqlite` | SQLite, for development and single-host apps | `sqlite://…` |
//! | `postgres` | `postgres` | PostgreSQL, for production | `postgres://…` |
//!
//! ```
//! use relayq::{HandlerError, JobType, Worker};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize)]
//! struct SendEmail { to: String }
//! impl JobType for SendEmail { const KIND: &'static str = "send_email"; }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> relayq::Result<()> {
//! let backend = relayq::connect("memory://").await?;
//! let id = backend.push(SendEmail { to: "ada@example.com".into() }.to_job()).await?.id();
//!
//! let worker = Worker::builder(backend)
//!     .handle(|email: SendEmail, _ctx| async move {
//!         Ok::<_, HandlerError>(format!("sent to {}", email.to))
//!     })
//!     .build()?;
//! worker.run_until_idle().await?; // or worker.start() in a service
//! assert_eq!(worker.wait_for(id).await?.result, Some("sent to ada@example.com".into()));
//! # Ok(())
//! # }
//! ```

pub use relayq_core::*;
/// The `serde_json` relayq's API uses (payloads, results), re-exported so
/// applications use the same version.
pub use serde_json;
/// The `time` relayq's API uses (`NewJob::delay`, `run_at`, leases),
/// re-exported so applications use the same version.
pub use time;

use std::sync::Arc;

/// Opens the backend that `url` names, chosen by its scheme among the
/// backends enabled by cargo features:
///
/// | scheme | feature | backend |
/// |---|---|---|
/// | `memory://` | `memory` (default) | a new, empty in-process store (each call gets its own) |
/// | `sqlite://…`, `sqlite:…` | `sqlite` | SQLite |
/// | `postgres://…`, `postgresql://…` | `postgres` | PostgreSQL |
///
/// A scheme whose feature is off, or an unknown one, is an
/// [`Error::Config`] that says which feature to enable or which schemes
/// exist. Error messages never contain the URL's password, so it stays out
/// of logs (PostgreSQL's name the server with the password masked).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> relayq::Result<()> {
/// let url = std::env::var("DATABASE_URL").unwrap_or_else(|_| "memory://".into());
/// # let url = "memory://";
/// let backend = relayq::connect(&url).await?;
/// backend.push(relayq::NewJob::new("hello", &"world")).await?;
/// # Ok(())
/// # }
/// ```
pub async fn connect(url: &str) -> Result<Arc<dyn Backend>> {
    match Scheme::of(url)? {
        Scheme::Memory => open_memory(url),
        Scheme::Sqlite => open_sqlite(url).await,
        Scheme::Postgres => open_postgres(url).await,
    }
}

/// The backends `connect` knows, by URL scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scheme {
    Memory,
    Sqlite,
    Postgres,
}

impl Scheme {
    fn of(url: &str) -> Result<Self> {
        let scheme = url
            .split_once(':')
            .map(|(scheme, _)| scheme)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                Error::config(
                    "url",
                    format!("expected a URL with a scheme, such as {}", Self::KNOWN),
                )
            })?;
        match scheme.to_ascii_lowercase().as_str() {
            "memory" => Ok(Self::Memory),
            "sqlite" => Ok(Self::Sqlite),
            "postgres" | "postgresql" => Ok(Self::Postgres),
            // The scheme only: the rest of the URL may hold a password.
            _ => Err(Error::config(
                "url",
                format!(
                    "unknown URL scheme {:?}; relayq connects to {}",
                    scheme.chars().take(32).collect::<String>(),
                    Self::KNOWN
                ),
            )),
        }
    }

    const KNOWN: &str = "postgres://, postgresql://, sqlite:// and memory:// URLs";
}

/// The error for a scheme whose backend is compiled out.
#[cfg(not(all(feature = "memory", feature = "sqlite", feature = "postgres")))]
fn feature_off(scheme: &str, feature: &str) -> Error {
    Error::config(
        "url",
        format!(
            "{scheme} URLs need relayq's `{feature}` cargo feature, which is not enabled \
             (relayq = {{ features = [\"{feature}\"] }})"
        ),
    )
}

#[cfg(feature = "memory")]
fn open_memory(url: &str) -> Result<Arc<dyn Backend>> {
    let rest = url.split_once(':').map_or("", |(_, rest)| rest);
    if !matches!(rest, "" | "//") {
        return Err(Error::config(
            "url",
            "memory:// URLs take no host, path or options",
        ));
    }
    Ok(Arc::new(relayq_memory::MemoryBackend::new()))
}

#[cfg(not(feature = "memory"))]
fn open_memory(_url: &str) -> Result<Arc<dyn Backend>> {
    Err(feature_off("memory://", "memory"))
}

#[cfg(feature = "sqlite")]
async fn open_sqlite(url: &str) -> Result<Arc<dyn Backend>> {
    Ok(Arc::new(relayq_sqlite::SqliteBackend::connect(url).await?))
}

#[cfg(not(feature = "sqlite"))]
async fn open_sqlite(_url: &str) -> Result<Arc<dyn Backend>> {
    Err(feature_off("sqlite://", "sqlite"))
}

#[cfg(feature = "postgres")]
async fn open_postgres(url: &str) -> Result<Arc<dyn Backend>> {
    Ok(Arc::new(relayq_postgres::PgBackend::connect(url).await?))
}

#[cfg(not(feature = "postgres"))]
async fn open_postgres(_url: &str) -> Result<Arc<dyn Backend>> {
    Err(feature_off("postgres://", "postgres"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_reason(result: Result<Arc<dyn Backend>>) -> String {
        match result {
            Err(Error::Config {
                setting: "url",
                reason,
            }) => reason,
            other => panic!("expected a configuration error, got {other:?}"),
        }
    }

    #[test]
    fn schemes_are_recognised_case_insensitively() {
        assert_eq!(Scheme::of("memory://").ok(), Some(Scheme::Memory));
        assert_eq!(Scheme::of("SQLite://x.db").ok(), Some(Scheme::Sqlite));
        assert_eq!(Scheme::of("sqlite::memory:").ok(), Some(Scheme::Sqlite));
        assert_eq!(Scheme::of("postgresql://h/db").ok(), Some(Scheme::Postgres));
        assert_eq!(Scheme::of("postgres://h/db").ok(), Some(Scheme::Postgres));
    }

    #[tokio::test]
    async fn unknown_or_missing_schemes_say_what_exists_without_echoing_the_url() {
        let reason = config_reason(connect("redis://user:hunter2@host/0").await);
        assert!(reason.contains("\"redis\""), "{reason}");
        assert!(reason.contains("postgres://"), "{reason}");
        assert!(!reason.contains("hunter2"), "{reason}");
        let reason = config_reason(connect("just-a-path").await);
        assert!(reason.contains("scheme"), "{reason}");
        let reason = config_reason(connect(":nothing").await);
        assert!(reason.contains("scheme"), "{reason}");
    }

    #[cfg(feature = "memory")]
    #[tokio::test]
    async fn memory_urls_open_a_fresh_store() {
        let a = connect("memory://").await.expect("memory://");
        let b = connect("memory:").await.expect("memory:");
        a.push(NewJob::new("k", &1)).await.expect("push");
        assert_eq!(a.stats().await.expect("stats").queue("default").pending, 1);
        assert_eq!(b.stats().await.expect("stats").queue("default").pending, 0);
        let reason = config_reason(connect("memory://somewhere").await);
        assert!(reason.contains("memory://"), "{reason}");
    }

    #[cfg(feature = "sqlite")]
    #[tokio::test]
    async fn sqlite_urls_open_a_migrated_file_store() {
        let dir = std::env::temp_dir().join(format!("relayq-connect-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let url = format!("sqlite://{}", dir.join("jobs.db").display());
        let backend = connect(&url).await.expect("sqlite://");
        let id = backend.push(NewJob::new("k", &1)).await.expect("push").id();
        assert!(backend.get(id).await.expect("get").is_some());
        assert!(backend.capabilities().durable);
        // Schemes are case-insensitive: the same file.
        let upper = format!("SQLite://{}", dir.join("jobs.db").display());
        let same = connect(&upper).await.expect("SQLite://");
        assert!(same.get(id).await.expect("get").is_some(), "{upper}");
        drop((backend, same));
        std::fs::remove_dir_all(&dir).expect("clean up");
    }

    #[cfg(feature = "postgres")]
    #[tokio::test]
    async fn postgres_errors_never_echo_the_password() {
        // A "server" that hangs up at once: the error must still not repeat
        // the URL. (Not a closed port: a refused connection is retried, as
        // a server still starting up, until the pool's 30 s acquire timeout.)
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("address").port();
        let hang_up = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                drop(socket);
            }
        });
        let url = format!("postgres://relayq:hunter2@127.0.0.1:{port}/nowhere");
        let result = connect(&url).await;
        hang_up.abort();
        let error = result.expect_err("the server hangs up");
        // It names the server, with the password masked.
        assert!(
            error.to_string().contains("relayq:***@127.0.0.1"),
            "{error}"
        );
        assert!(!error.to_string().contains("hunter2"), "{error}");
        assert!(!format!("{error:?}").contains("hunter2"), "{error:?}");
    }

    #[cfg(feature = "postgres")]
    #[tokio::test]
    async fn postgres_urls_open_a_migrated_store_in_the_relayq_schema() {
        use relayq_postgres::sqlx::{self, AssertSqlSafe, Connection};
        use relayq_postgres::testing;

        // `connect` takes the default schema, `relayq`: a database of the
        // test's own keeps it apart from every other test's.
        let name = testing::unique_schema();
        let mut admin = testing::admin().await;
        sqlx::query(AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&mut admin)
            .await
            .expect("create a database");
        let url = testing::url_of_database(&name);
        #[derive(serde::Serialize, serde::Deserialize)]
        struct AddOne(i64);
        impl JobType for AddOne {
            const KIND: &'static str = "add_one";
        }
        let run = tokio::spawn({
            let url = url.clone();
            async move {
                let backend = connect(&url).await.expect("postgres://");
                let id = backend.push(AddOne(1).to_job()).await.expect("push").id();
                let worker = Worker::builder(Arc::clone(&backend))
                    .handle(|AddOne(n), _ctx| async move { Ok::<_, HandlerError>(n + 1) })
                    .build()
                    .expect("worker");
                worker.run_until_idle().await.expect("run");
                // The scheme is case-insensitive, `postgresql` too: the same store.
                let rest = url.split_once("://").map_or("", |(_, rest)| rest);
                let upper = format!("PostgreSQL://{rest}");
                let same = connect(&upper).await.expect("PostgreSQL://");
                let job = same.get(id).await.expect("get").expect("the job");
                assert_eq!((job.status, job.result), (JobStatus::Done, Some(2.into())));
                let mut direct = sqlx::PgConnection::connect(&url).await.expect("connect");
                let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM relayq.jobs")
                    .fetch_one(&mut direct)
                    .await
                    .expect("the relayq schema holds the jobs");
                assert_eq!(rows, 1);
            }
        })
        .await;
        sqlx::query(AssertSqlSafe(format!(
            "DROP DATABASE \"{name}\" WITH (FORCE)"
        )))
        .execute(&mut admin)
        .await
        .expect("drop the database");
        if let Err(e) = run {
            std::panic::resume_unwind(e.into_panic());
        }
    }

    #[cfg(not(feature = "sqlite"))]
    #[tokio::test]
    async fn a_disabled_backend_names_its_feature() {
        let reason = config_reason(connect("sqlite://jobs.db").await);
        assert!(reason.contains("`sqlite` cargo feature"), "{reason}");
    }

    #[cfg(not(feature = "memory"))]
    #[tokio::test]
    async fn a_disabled_memory_backend_names_its_feature() {
        let reason = config_reason(connect("memory://").await);
        assert!(reason.contains("`memory` cargo feature"), "{reason}");
    }

    #[cfg(not(feature = "postgres"))]
    #[tokio::test]
    async fn a_disabled_postgres_names_its_feature() {
        let reason = config_reason(connect("postgres://u:secret@h/db").await);
        assert!(reason.contains("`postgres` cargo feature"), "{reason}");
        assert!(!reason.contains("secret"), "{reason}");
    }
}

/// The in-process backend (feature `memory`).
#[cfg(feature = "memory")]
pub mod memory {
    pub use relayq_memory::*;
}

/// The SQLite backend (feature `sqlite`).
#[cfg(feature = "sqlite")]
pub mod sqlite {
    pub use relayq_sqlite::*;
}

/// The PostgreSQL backend (feature `postgres`).
#[cfg(feature = "postgres")]
pub mod postgres {
    pub use relayq_postgres::*;
}

/// The README's example, compiled as a doctest so it cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeExample;
