//! Embedded, versioned migrations, applied under an advisory lock.

use relayq_core::{Error, Result};
use sqlx::{AssertSqlSafe, Connection, PgPool, Row};

use crate::error_from;

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
    Migration {
        version: 4,
        description: "payload and result as json, kept as sent",
        sql: include_str!("migrations/0004_json_payload.sql"),
    },
];

/// The schema version this build of relayq-postgres creates.
pub const SCHEMA_VERSION: i32 = 4;

/// Namespace of the advisory lock serializing migrations (the second key is
/// `hashtext(schema)`): "rq" in ASCII.
const LOCK_NAMESPACE: i32 = 0x7271;

/// How long one attempt of a migration waits for a lock on the jobs table
/// (a change to an existing table takes it exclusively): while it waits,
/// every queue operation on the table queues behind it.
const LOCK_TIMEOUT: &str = "1s";

/// How many times a migration that could not take its locks in
/// [`LOCK_TIMEOUT`] is tried before [`migrate`] gives up (about two
/// minutes, pauses included).
const LOCK_ATTEMPTS: u32 = 60;

/// How long the server lets a migration's transaction sit idle, waiting for
/// its client, before ending the session. Between two statements it waits
/// one round trip; a migrator that hangs there (a stopped process, a
/// network cut the server sees no reset of) would otherwise hold the
/// migration lock, and the jobs table's lock when it has one, until TCP
/// keepalive notices, two hours by default: every queue operation and
/// every other migrator would wait that long.
const IDLE_TIMEOUT: &str = "10s";

/// SQLSTATE of a lock not taken within `lock_timeout`.
const LOCK_NOT_AVAILABLE: &str = "55P03";

/// SQLSTATE of a session the server ended after [`IDLE_TIMEOUT`]: its
/// migration was rolled back, so it is tried again, as a process that was
/// only stopped for a while (a paused VM, say) would want.
const IDLE_IN_TRANSACTION_TIMEOUT: &str = "25P03";

/// Applies every pending migration to `schema`, in one transaction holding a
/// transaction-scoped advisory lock, so concurrent callers (threads or
/// processes) apply each migration exactly once and the lock is released
/// even if the connection dies. Returns the versions applied.
///
/// A migration that changes the jobs table while a long transaction uses
/// it (a caller's transaction holding a `push_in`, a large `clean`) waits
/// at most [`LOCK_TIMEOUT`] for its lock, gives up, and tries again a
/// moment later: waiting on, it would hold up every queue operation
/// behind it until that transaction ended.
pub(crate) async fn migrate(pool: &PgPool, schema: &str) -> Result<Vec<i32>> {
    let mut attempt = 1;
    loop {
        match migrate_once(pool, schema).await {
            Ok(applied) => return Ok(applied),
            Err(Failure::Refused(e)) => return Err(e),
            Err(Failure::Sql(sqlx::Error::Database(e)))
                if e.code().as_deref() == Some(IDLE_IN_TRANSACTION_TIMEOUT)
                    && attempt < LOCK_ATTEMPTS =>
            {
                tracing::warn!(
                    schema,
                    attempt,
                    "relayq-postgres: the server ended a migration that waited {IDLE_TIMEOUT} \
                     for this process; trying again"
                );
                attempt += 1;
            }
            Err(Failure::Sql(sqlx::Error::Database(e)))
                if e.code().as_deref() == Some(LOCK_NOT_AVAILABLE) && attempt < LOCK_ATTEMPTS =>
            {
                tracing::warn!(
                    schema,
                    attempt,
                    "relayq-postgres: a migration could not lock the jobs table within {LOCK_TIMEOUT} \
                     (a long transaction uses it); trying again"
                );
                attempt += 1;
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
            Err(Failure::Sql(e)) => return Err(error_from(e)),
        }
    }
}

/// Why one attempt at migrating failed.
enum Failure {
    Sql(sqlx::Error),
    Refused(Error),
}

impl From<sqlx::Error> for Failure {
    fn from(e: sqlx::Error) -> Self {
        Self::Sql(e)
    }
}

async fn migrate_once(pool: &PgPool, schema: &str) -> std::result::Result<Vec<i32>, Failure> {
    let quoted = format!("\"{schema}\"");
    let mut conn = pool.acquire().await?;
    let mut tx = conn.begin().await?;
    // A `statement_timeout` or `lock_timeout` set for the role, the
    // database or in the URL would end the wait for another migrator's
    // advisory lock (57014, which fails the connect: of a fleet deployed
    // at once all but one process failed to start; or 55P03, retried for
    // two minutes only), and a table rewrite longer than the timeout would
    // fail on every attempt: a migration is made whole, however long it
    // takes.
    sqlx::query(
        "SELECT set_config('idle_in_transaction_session_timeout', $1, true), \
                set_config('statement_timeout', '0', true), \
                set_config('lock_timeout', '0', true)",
    )
    .bind(IDLE_TIMEOUT)
    .execute(&mut *tx)
    .await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext($2))")
        .bind(LOCK_NAMESPACE)
        .bind(schema)
        .execute(&mut *tx)
        .await?;
    // Set once the advisory lock is held: other migrators wait for that
    // one as long as it takes.
    sqlx::query("SELECT set_config('lock_timeout', $1, true)")
        .bind(LOCK_TIMEOUT)
        .execute(&mut *tx)
        .await?;
    // Create only what is missing: CREATE … IF NOT EXISTS checks privileges
    // first, and a least-privilege role may use a schema a DBA created.
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
            .bind(schema)
            .fetch_one(&mut *tx)
            .await?;
    if !exists {
        sqlx::query(AssertSqlSafe(format!("CREATE SCHEMA {quoted}")))
            .execute(&mut *tx)
            .await?;
    }
    let has_table: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(format!("{quoted}.schema_version"))
        .fetch_one(&mut *tx)
        .await?;
    if !has_table {
        sqlx::query(AssertSqlSafe(format!(
            "CREATE TABLE {quoted}.schema_version (
                version     integer     PRIMARY KEY,
                description text        NOT NULL,
                applied_at  timestamptz NOT NULL DEFAULT now()
            )"
        )))
        .execute(&mut *tx)
        .await?;
    }
    let current: i32 = sqlx::query(AssertSqlSafe(format!(
        "SELECT coalesce(max(version), 0) AS v FROM {quoted}.schema_version"
    )))
    .fetch_one(&mut *tx)
    .await?
    .try_get("v")?;
    if current > SCHEMA_VERSION {
        return Err(Failure::Refused(Error::SchemaTooNew {
            found: i64::from(current),
            supported: i64::from(SCHEMA_VERSION),
        }));
    }
    let mut applied = Vec::new();
    for m in MIGRATIONS.iter().filter(|m| m.version > current) {
        // The schema name is validated (`^[a-z_][a-z0-9_]*$`), so it is safe
        // both as a quoted identifier and as a string literal.
        let sql = m
            .sql
            .replace("{s}", &quoted)
            .replace("{lit}", &format!("'{schema}'"));
        sqlx::raw_sql(AssertSqlSafe(sql)).execute(&mut *tx).await?;
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {quoted}.schema_version (version, description) VALUES ($1, $2)"
        )))
        .bind(m.version)
        .bind(m.description)
        .execute(&mut *tx)
        .await?;
        applied.push(m.version);
    }
    tx.commit().await?;
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
