//! Embedded, versioned migrations, applied under an advisory lock.

use relayq_core::{Error, Result};
use sqlx::{AssertSqlSafe, Connection, PgPool, Row};

use crate::db_err;

/// One schema change. `sql` may hold several statements; `{s}` stands for
/// the quoted schema name, `{lit}` for the name as a string literal.
struct Migration {
    version: i32,
    description: &'static str,
    sql: &'static str,
}

/// Every migration, in order. Append only: an applied migration never changes.
const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        description: "jobs table, claim and unique indexes, push notifications",
        sql: include_str!("migrations/0001_jobs.sql"),
    },
    Migration {
        version: 2,
        description: "notify after the push commits, not from a trigger",
        sql: include_str!("migrations/0002_notify_after_commit.sql"),
    },
    Migration {
        version: 3,
        description: "claim index on pending rows only",
        sql: include_str!("migrations/0003_pending_claim_index.sql"),
    },
];

/// The schema version this build of relayq-postgres creates.
pub const SCHEMA_VERSION: i32 = 3;

/// Namespace of the advisory lock serializing migrations (the second key is
/// `hashtext(schema)`): "rq" in ASCII.
const LOCK_NAMESPACE: i32 = 0x7271;

/// Applies every pending migration to `schema`, in one transaction holding a
/// transaction-scoped advisory lock, so concurrent callers (threads or
/// processes) apply each migration exactly once and the lock is released
/// even if the connection dies. Returns the versions applied.
pub(crate) async fn migrate(pool: &PgPool, schema: &str) -> Result<Vec<i32>> {
    let quoted = format!("\"{schema}\"");
    let mut conn = pool.acquire().await.map_err(db_err)?;
    let mut tx = conn.begin().await.map_err(db_err)?;
    sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext($2))")
        .bind(LOCK_NAMESPACE)
        .bind(schema)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
    // Create only what is missing: CREATE … IF NOT EXISTS checks privileges
    // first, and a least-privilege role may use a schema a DBA created.
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
            .bind(schema)
            .fetch_one(&mut *tx)
            .await
            .map_err(db_err)?;
    if !exists {
        sqlx::query(AssertSqlSafe(format!("CREATE SCHEMA {quoted}")))
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
    }
    let has_table: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(format!("{quoted}.schema_version"))
        .fetch_one(&mut *tx)
        .await
        .map_err(db_err)?;
    if !has_table {
        sqlx::query(AssertSqlSafe(format!(
            "CREATE TABLE {quoted}.schema_version (
                version     integer     PRIMARY KEY,
                description text        NOT NULL,
                applied_at  timestamptz NOT NULL DEFAULT now()
            )"
        )))
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
    }
    let current: i32 = sqlx::query(AssertSqlSafe(format!(
        "SELECT coalesce(max(version), 0) AS v FROM {quoted}.schema_version"
    )))
    .fetch_one(&mut *tx)
    .await
    .map_err(db_err)?
    .try_get("v")
    .map_err(db_err)?;
    if current > SCHEMA_VERSION {
        return Err(Error::Config {
            reason: format!(
                "schema {schema:?} is at version {current}, newer than this relayq-postgres \
                 (version {SCHEMA_VERSION}); upgrade relayq-postgres"
            ),
        });
    }
    let mut applied = Vec::new();
    for m in MIGRATIONS.iter().filter(|m| m.version > current) {
        // The schema name is validated (`^[a-z_][a-z0-9_]*$`), so it is safe
        // both as a quoted identifier and as a string literal.
        let sql = m
            .sql
            .replace("{s}", &quoted)
            .replace("{lit}", &format!("'{schema}'"));
        sqlx::raw_sql(AssertSqlSafe(sql))
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {quoted}.schema_version (version, description) VALUES ($1, $2)"
        )))
        .bind(m.version)
        .bind(m.description)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        applied.push(m.version);
    }
    tx.commit().await.map_err(db_err)?;
    if !applied.is_empty() {
        tracing::info!(schema, ?applied, "relayq-postgres: applied migrations");
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_consecutive_and_end_at_schema_version() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version, i as i32 + 1);
            assert!(m.sql.contains("{s}"));
        }
        assert_eq!(MIGRATIONS.last().map(|m| m.version), Some(SCHEMA_VERSION));
    }
}
