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

/// The schema version this crate creates and expects.
pub const SCHEMA_VERSION: i32 = 2;

/// One schema change.
struct Migration {
    version: i64,
    description: &'static str,
    sql: &'static str,
}

/// Every migration, in version order.
const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        description: "jobs table and its indexes",
        sql: include_str!("../migrations/0001_jobs.sql"),
    },
    Migration {
        version: 2,
        description: "wake-up counter for jobs made due again",
        sql: include_str!("../migrations/0002_wakeups.sql"),
    },
];

/// The newest schema version this build knows.
pub(crate) fn latest_version() -> i64 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

/// The schema version recorded in the database (0 before the first
/// migration).
pub(crate) async fn current_version(conn: &mut SqliteConnection) -> Result<i64, Fail> {
    let exists: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM sqlite_schema \
         WHERE type = 'table' AND name = 'relayq_schema_versions')",
    )
    .fetch_one(&mut *conn)
    .await?;
    if !exists {
        return Ok(0);
    }
    Ok(
        sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM relayq_schema_versions")
            .fetch_one(&mut *conn)
            .await?,
    )
}

/// Refuses a database at a version newer than this build knows
/// ([`relayq_core::Error::SchemaTooNew`]).
pub(crate) fn check_not_newer(current: i64) -> Result<(), Fail> {
    let latest = latest_version();
    if current > latest {
        return Err(Fail::Core(relayq_core::Error::SchemaTooNew {
            found: current,
            supported: latest,
        }));
    }
    Ok(())
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
    let current = current_version(conn).await?;
    check_not_newer(current)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_in_order_and_end_at_the_schema_version() {
        assert!(MIGRATIONS.windows(2).all(|w| w[0].version < w[1].version));
        assert_eq!(latest_version(), i64::from(SCHEMA_VERSION));
    }
}
