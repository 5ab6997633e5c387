//! Test support for code that runs against a real PostgreSQL (feature
//! `testing`): where the test database is, a fresh schema per test, and a
//! clear failure — never a silent pass — when no server is reachable.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::{Connection, PgConnection};

use crate::{PgBackend, PgOptions};

/// Test schemas are named `relayq_test_<unix seconds>_<pid>_<counter>`;
/// ones older than this (far longer than a whole test run) are dropped by
/// the first test of a later run.
const STALE_AFTER: Duration = Duration::from_secs(900);

/// How to give the tests a server; part of every connection failure.
pub const HOW_TO: &str = "The PostgreSQL tests need a PostgreSQL server they may create \
schemas in. Set RELAYQ_TEST_DATABASE_URL (or DATABASE_URL), e.g. \
postgres://postgres@127.0.0.1:5432/postgres, or run scripts/test, which finds \
a server (or starts a throwaway one) by itself.";

/// The database the tests use: `RELAYQ_TEST_DATABASE_URL`, else
/// `DATABASE_URL`, else the local default.
pub fn database_url() -> String {
    std::env::var("RELAYQ_TEST_DATABASE_URL")
        .or_else(|_| std::env::var("DATABASE_URL"))
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// A schema name no other test (in this or another process) uses.
pub fn unique_schema() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    format!(
        "relayq_test_{}_{}_{}_{:04x}",
        now.as_secs(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        now.subsec_nanos() & 0xffff
    )
}

/// A direct connection to the test database; fails the test, saying how
/// to provide one, when none is reachable.
pub async fn admin() -> PgConnection {
    let url = database_url();
    match PgConnection::connect(&url).await {
        Ok(conn) => conn,
        Err(e) => panic!("cannot connect to the test database ({e}). {HOW_TO}"),
    }
}

/// Drops test schemas, and test databases (named as schemas are, see
/// [`unique_schema`] and [`url_of_database`]), left by earlier runs, once
/// per process.
pub async fn sweep_stale_schemas() {
    static SWEPT: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    SWEPT
        .get_or_init(|| async {
            let mut conn = admin().await;
            let schemas: Vec<String> = sqlx::query_scalar(
                "SELECT nspname::text FROM pg_namespace WHERE nspname LIKE 'relayq\\_test\\_%'",
            )
            .fetch_all(&mut conn)
            .await
            .expect("list test schemas");
            let databases: Vec<String> = sqlx::query_scalar(
                "SELECT datname::text FROM pg_database WHERE datname LIKE 'relayq\\_test\\_%'",
            )
            .fetch_all(&mut conn)
            .await
            .expect("list test databases");
            let drops = schemas
                .into_iter()
                .filter(|name| is_stale(name))
                .map(|name| format!("DROP SCHEMA IF EXISTS \"{name}\" CASCADE"))
                .chain(
                    databases
                        .into_iter()
                        .filter(|name| is_stale(name))
                        .map(|name| format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")),
                );
            for drop in drops {
                // Another process may be sweeping too: ignore failures.
                let _ = sqlx::query(sqlx::AssertSqlSafe(drop))
                    .execute(&mut conn)
                    .await;
            }
        })
        .await;
}

/// Whether `name` is one [`unique_schema`] made, longer than
/// [`STALE_AFTER`] ago.
fn is_stale(name: &str) -> bool {
    // relayq_test_<secs>_<pid>_<n>_<hex>.
    let parts: Vec<&str> = name.split('_').collect();
    let Some(born) = parts
        .get(2)
        .filter(|_| parts.len() == 6)
        .and_then(|s| s.parse::<u64>().ok())
    else {
        return false;
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    now.as_secs().saturating_sub(born) > STALE_AFTER.as_secs()
}

/// The test database's URL ([`database_url`]) naming database `name`
/// instead, for a test that needs a database of its own (name it with
/// [`unique_schema`], so that a run that dies before dropping it leaves it
/// to the next run's sweep).
pub fn url_of_database(name: &str) -> String {
    with_database(&database_url(), name)
}

/// `url`, a PostgreSQL URL, naming database `name` instead (whether it
/// named one or not).
pub fn with_database(url: &str, name: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let server = match base.rsplit_once('/') {
        // Past the `//` of the scheme: a path names the database.
        Some((server, _)) if server.len() > base.find("//").map_or(0, |i| i + 1) => server,
        _ => base,
    };
    match query {
        Some(query) => format!("{server}/{name}?{query}"),
        None => format!("{server}/{name}"),
    }
}

/// Options for a fresh schema with a small pool, so parallel tests stay
/// well under the server's max_connections.
pub fn options() -> PgOptions {
    PgOptions::new(database_url())
        .schema(unique_schema())
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(60))
}

/// Connects (and migrates) with `options`; fails the test, saying how to
/// provide a database, when none is reachable.
pub async fn connect(options: PgOptions) -> PgBackend {
    sweep_stale_schemas().await;
    match PgBackend::connect_with(options).await {
        Ok(backend) => backend,
        Err(e) => panic!("cannot set up a relayq schema in the test database ({e}). {HOW_TO}"),
    }
}

/// Drops a test's schema.
pub async fn drop_schema(schema: &str) {
    let mut conn = admin().await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"
    )))
    .execute(&mut conn)
    .await
    .expect("drop schema");
}
