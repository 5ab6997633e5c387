//! Reading rows into core types.

use std::sync::Arc;

use relayq_core::{Error, Job, JobStatus, Lease, Result, Unreadable, from_unix_micros};
use serde_json::Value;
use sqlx::postgres::{PgRow, PgTypeInfo, PgValueFormat, PgValueRef};
use sqlx::{Column, Decode, Postgres, Row, Type};
use time::OffsetDateTime;

use crate::error_from;
use crate::sql::JOB_COLUMN_NAMES;

/// The position of column `name` in [`JOB_COLUMN_NAMES`]; evaluated at
/// compile time, where a name not there fails the build.
const fn at(name: &str) -> usize {
    let mut i = 0;
    while i < JOB_COLUMN_NAMES.len() {
        if same(JOB_COLUMN_NAMES[i].as_bytes(), name.as_bytes()) {
            return i;
        }
        i += 1;
    }
    panic!("not a job column");
}

/// `a == b`, for [`at`] (`==` on slices is not `const`).
const fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

const ID: usize = at("id");
const QUEUE: usize = at("queue");
const KIND: usize = at("kind");
const PAYLOAD: usize = at("payload");
const PRIORITY: usize = at("priority");
const STATUS: usize = at("status");
const ATTEMPTS: usize = at("attempts");
const MAX_ATTEMPTS: usize = at("max_attempts");
const LEASE_TOKEN: usize = at("lease_token");
const RUN_AT: usize = at("run_at");
const LOCKED_UNTIL: usize = at("locked_until");
const UNIQUE_KEY: usize = at("unique_key");
const LAST_ERROR: usize = at("last_error");
const RESULT: usize = at("result");
const CREATED_AT: usize = at("created_at");
const UPDATED_AT: usize = at("updated_at");

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

/// Column `at` of a job row, or why it does not decode, naming the column
/// (sqlx, given a position, would name it by its number).
fn get<'r, T>(row: &'r PgRow, at: usize) -> Result<T, Unread>
where
    T: Decode<'r, Postgres> + Type<Postgres>,
{
    row.try_get(at).map_err(|e| {
        let e = match e {
            sqlx::Error::ColumnDecode { source, .. } => sqlx::Error::ColumnDecode {
                index: format!("{:?}", JOB_COLUMN_NAMES[at]),
                source,
            },
            e => e,
        };
        Unread::Column(error_from(e))
    })
}

/// A job from a row starting with [`crate::sql::JOB_COLUMNS`], in their
/// order, for a pull: JSON relayq cannot read is an [`Unread::Json`], so
/// that the pull kills the job.
pub(crate) fn job(row: &PgRow) -> Result<Job, Unread> {
    read(row, false)
}

/// Whether the claim that returned `row` locked due jobs it did not keep:
/// the `passed_over` column following the job's.
pub(crate) fn passed_over(row: &PgRow) -> Result<bool> {
    row.try_get(JOB_COLUMN_NAMES.len()).map_err(error_from)
}

/// [`job`] for an observer (`get`, `list`): JSON relayq cannot read (which
/// another program stored) reads as a JSON string holding the stored text,
/// as it is stored once a pull kills the job, rather than failing the
/// read, and every page of a listing holding the job.
pub(crate) fn observed(row: &PgRow) -> Result<Job> {
    Ok(read(row, true)?)
}

fn read(row: &PgRow, unreadable_as_text: bool) -> Result<Job, Unread> {
    debug_assert!(
        row.columns()
            .iter()
            .map(Column::name)
            .take(JOB_COLUMN_NAMES.len())
            .eq(JOB_COLUMN_NAMES),
        "a job row starts with JOB_COLUMNS, in order"
    );
    let id = get(row, ID)?;
    let lease_token = get(row, LEASE_TOKEN)?;
    // Parsed here rather than decoded by sqlx, so that JSON another
    // program stored, which `json` accepts and serde_json refuses, is told
    // apart from a column that does not decode.
    let json = |name: &'static str, text: &str| match serde_json::from_str::<Value>(text) {
        Ok(value) => Ok(value),
        Err(_) if unreadable_as_text => Ok(Value::String(text.to_owned())),
        Err(e) => {
            let lease = Lease {
                job_id: id,
                token: lease_token,
            };
            Err(Unread::Json(Unreadable::new(
                lease,
                name,
                text.as_bytes(),
                e,
            )))
        }
    };
    // Borrowed from the row: a status and names of up to 24 bytes cost no
    // allocation.
    let status_text: &str = get(row, STATUS)?;
    let queue: &str = get(row, QUEUE)?;
    let kind: &str = get(row, KIND)?;
    let payload: &str = get(row, PAYLOAD)?;
    let result: Option<&str> = get(row, RESULT)?;
    let mut job = Job {
        id,
        queue: queue.into(),
        kind: kind.into(),
        payload: Arc::new(Value::Null),
        priority: get(row, PRIORITY)?,
        status: status(status_text).map_err(Unread::Column)?,
        attempts: get(row, ATTEMPTS)?,
        max_attempts: get(row, MAX_ATTEMPTS)?,
        lease_token,
        run_at: get::<Timestamp>(row, RUN_AT)?.0,
        locked_until: get::<Option<Timestamp>>(row, LOCKED_UNTIL)?.map(|t| t.0),
        unique_key: get(row, UNIQUE_KEY)?,
        last_error: get(row, LAST_ERROR)?,
        result: None,
        created_at: get::<Timestamp>(row, CREATED_AT)?.0,
        updated_at: get::<Timestamp>(row, UPDATED_AT)?.0,
    };
    // Last: a row with a column that does not decode is an error, whatever
    // its JSON.
    job.payload = Arc::new(json("payload", payload)?);
    job.result = result.map(|r| json("result", r)).transpose()?;
    Ok(job)
}
