//! Embedded, versioned migrations.
//!
//! `relayq_schema_versions` records every applied version. Migrating runs in
//! one `BEGIN IMMEDIATE` transaction: it holds the write lock from the
//! start, so two processes migrating the same file at once are serialized
//! and the second finds nothing left to do.

use sqlx::SqliteConnection;
use time::OffsetDateTime;

use crate::retry::Fail;
use crate::rows::micros;

/// One schema change.
struct Migration {
    version: i64,
    description: &'static str,
    sql: &'static str,
}

/// Every migration, in version order.
const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    description: "jobs table and its indexes",
    sql: include_str!("../migrations/0001_jobs.sql"),
}];

/// The newest schema version this build knows.
pub(crate) fn latest_version() -> i64 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

/// Applies every migration newer than the database's version, inside the
/// caller's `BEGIN IMMEDIATE` transaction. Returns the versions applied.
pub(crate) async fn migrate(
    conn: &mut SqliteConnection,
    now: OffsetDateTime,
) -> Result<Vec<i64>, Fail> {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS relayq_schema_versions (
             version     INTEGER PRIMARY KEY,
             description TEXT    NOT NULL,
             applied_at  INTEGER NOT NULL
         ) STRICT",
    )
    .execute(&mut *conn)
    .await?;
    let current: i64 =
        sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM relayq_schema_versions")
            .fetch_one(&mut *conn)
            .await?;
    let latest = latest_version();
    if current > latest {
        return Err(Fail::Core(relayq_core::Error::Config {
            reason: format!(
                "the database's relayq schema is version {current}, newer than the \
                 {latest} this relayq-sqlite knows: upgrade relayq-sqlite"
            ),
        }));
    }
    let mut applied = Vec::new();
    for migration in MIGRATIONS.iter().filter(|m| m.version > current) {
        sqlx::raw_sql(migration.sql).execute(&mut *conn).await?;
        sqlx::query(
            "INSERT INTO relayq_schema_versions (version, description, applied_at) \
             VALUES (?, ?, ?)",
        )
        .bind(migration.version)
        .bind(migration.description)
        .bind(micros(now))
        .execute(&mut *conn)
        .await?;
        applied.push(migration.version);
    }
    Ok(applied)
}
