//! Reading rows into core types.

use std::sync::Arc;

use relayq_core::{Error, Job, JobStatus, Lease, Result, Unreadable, from_unix_micros};
use serde_json::Value;
use sqlx::postgres::{PgRow, PgTypeInfo, PgValueFormat, PgValueRef};
use sqlx::{Decode, Postgres, Row, Type};
use time::OffsetDateTime;

use crate::error_from;

/// A status read from the table.
pub(crate) fn status(text: &str) -> Result<JobStatus> {
    text.parse()
        .map_err(|_| Error::backend(format!("unknown job status {text:?} in the jobs table")))
}

/// A `timestamptz` column, read without sqlx's conversion, which panics
/// past the years `OffsetDateTime` holds: a time another program stored
/// out of them (`infinity`, the year 10000) reads as the nearest one
/// instead (see [`from_unix_micros`]).
struct Timestamp(OffsetDateTime);

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01 UTC), from
/// which a binary `timestamptz` counts.
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

impl Type<Postgres> for Timestamp {
    fn type_info() -> PgTypeInfo {
        <OffsetDateTime as Type<Postgres>>::type_info()
    }

    fn compatible(ty: &PgTypeInfo) -> bool {
        <OffsetDateTime as Type<Postgres>>::compatible(ty)
    }
}

impl<'r> Decode<'r, Postgres> for Timestamp {
    fn decode(value: PgValueRef<'r>) -> Result<Self, sqlx::error::BoxDynError> {
        // relayq reads jobs with prepared statements, whose results come in
        // binary; text is only decoded (not saturated) for completeness.
        if value.format() == PgValueFormat::Text {
            return <OffsetDateTime as Decode<Postgres>>::decode(value).map(Self);
        }
        let micros: i64 = Decode::<Postgres>::decode(value)?;
        Ok(Self(from_unix_micros(
            micros.saturating_add(PG_EPOCH_MICROS),
        )))
    }
}

/// Why a row could not be read as a job.
pub(crate) enum Unread {
    /// A column did not decode, or holds a value relayq never stores (an
    /// unknown status).
    Column(Error),
    /// The job's stored JSON does not parse.
    Json(Unreadable),
}

impl From<Unread> for Error {
    fn from(e: Unread) -> Self {
        match e {
            Unread::Column(e) => e,
            Unread::Json(u) => Error::backend(format!("job {}: {}", u.lease.job_id, u.reason)),
        }
    }
}

/// A job from a row holding [`crate::sql::JOB_COLUMNS`].
pub(crate) fn job(row: &PgRow) -> Result<Job, Unread> {
    let column = |e| Unread::Column(error_from(e));
    let id = row.try_get("id").map_err(column)?;
    let lease_token = row.try_get("lease_token").map_err(column)?;
    // Parsed here rather than decoded by sqlx, so that JSON another
    // program stored, which `json` accepts and serde_json refuses, is told
    // apart from a column that does not decode.
    let json = |name: &'static str, text: &str| {
        serde_json::from_str::<Value>(text).map_err(|e| {
            let lease = Lease {
                job_id: id,
                token: lease_token,
            };
            Unread::Json(Unreadable::new(lease, name, text.as_bytes(), e))
        })
    };
    // Borrowed from the row: a status and names of up to 24 bytes cost no
    // allocation.
    let status_text: &str = row.try_get("status").map_err(column)?;
    let queue: &str = row.try_get("queue").map_err(column)?;
    let kind: &str = row.try_get("kind").map_err(column)?;
    let payload: &str = row.try_get("payload").map_err(column)?;
    let result: Option<&str> = row.try_get("result").map_err(column)?;
    let mut job = Job {
        id,
        queue: queue.into(),
        kind: kind.into(),
        payload: Arc::new(Value::Null),
        priority: row.try_get("priority").map_err(column)?,
        status: status(status_text).map_err(Unread::Column)?,
        attempts: row.try_get("attempts").map_err(column)?,
        max_attempts: row.try_get("max_attempts").map_err(column)?,
        lease_token,
        run_at: row.try_get::<Timestamp, _>("run_at").map_err(column)?.0,
        locked_until: row
            .try_get::<Option<Timestamp>, _>("locked_until")
            .map_err(column)?
            .map(|t| t.0),
        unique_key: row.try_get("unique_key").map_err(column)?,
        last_error: row.try_get("last_error").map_err(column)?,
        result: None,
        created_at: row.try_get::<Timestamp, _>("created_at").map_err(column)?.0,
        updated_at: row.try_get::<Timestamp, _>("updated_at").map_err(column)?.0,
    };
    // Last: a row with a column that does not decode is an error, whatever
    // its JSON.
    job.payload = Arc::new(json("payload", payload)?);
    job.result = result.map(|r| json("result", r)).transpose()?;
    Ok(job)
}
