//! Reading rows into core types.

use std::sync::Arc;

use relayq_core::{Error, Job, JobStatus, Result};
use sqlx::Row;
use sqlx::postgres::PgRow;

use crate::db_err;

/// A status read from the table.
pub(crate) fn status(text: &str) -> Result<JobStatus> {
    text.parse()
        .map_err(|_| Error::backend(format!("unknown job status {text:?} in the jobs table")))
}

/// A job from a row holding [`crate::sql::JOB_COLUMNS`].
pub(crate) fn job(row: &PgRow) -> Result<Job> {
    // Borrowed from the row: a status and names of up to 24 bytes cost no
    // allocation.
    let status_text: &str = row.try_get("status").map_err(db_err)?;
    let queue: &str = row.try_get("queue").map_err(db_err)?;
    let kind: &str = row.try_get("kind").map_err(db_err)?;
    Ok(Job {
        id: row.try_get("id").map_err(db_err)?,
        queue: queue.into(),
        kind: kind.into(),
        payload: Arc::new(row.try_get("payload").map_err(db_err)?),
        priority: row.try_get("priority").map_err(db_err)?,
        status: status(status_text)?,
        attempts: row.try_get("attempts").map_err(db_err)?,
        max_attempts: row.try_get("max_attempts").map_err(db_err)?,
        lease_token: row.try_get("lease_token").map_err(db_err)?,
        run_at: row.try_get("run_at").map_err(db_err)?,
        locked_until: row.try_get("locked_until").map_err(db_err)?,
        unique_key: row.try_get("unique_key").map_err(db_err)?,
        last_error: row.try_get("last_error").map_err(db_err)?,
        result: row.try_get("result").map_err(db_err)?,
        created_at: row.try_get("created_at").map_err(db_err)?,
        updated_at: row.try_get("updated_at").map_err(db_err)?,
    })
}
