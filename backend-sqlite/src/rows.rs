//! How jobs are stored: timestamps as INTEGER microseconds since the Unix
//! epoch, JSON as text, the status as its lowercase name.

use std::sync::Arc;

use relayq_core::{Error, Job, JobStatus, Lease, Unreadable, from_unix_micros};
use serde_json::Value;
use sqlx::Row;
use sqlx::sqlite::SqliteRow;
use time::OffsetDateTime;

use crate::retry::Fail;

/// The jobs table.
pub(crate) const TABLE: &str = "relayq_jobs";

/// Every column of a job, in the order [`job_from_row`] reads them.
pub(crate) const COLUMNS: &str = "id, queue, kind, payload, priority, status, attempts, \
     max_attempts, lease_token, run_at, locked_until, unique_key, last_error, result, \
     created_at, updated_at";

/// Microseconds since the Unix epoch, rounded down (relayq's precision).
pub(crate) fn micros(t: OffsetDateTime) -> i64 {
    let m = t.unix_timestamp_nanos().div_euclid(1_000);
    // `OffsetDateTime` spans at most ±999,999 years: always within i64.
    i64::try_from(m).unwrap_or(if m < 0 { i64::MIN } else { i64::MAX })
}

fn corrupt(what: String) -> Fail {
    Fail::Core(Error::backend(format!("unreadable job row: {what}")))
}

/// Why a row could not be read as a job.
pub(crate) enum Unread {
    /// A column did not decode, or holds what relayq never stores.
    Fail(Fail),
    /// The job's stored JSON does not parse: another program wrote it
    /// (relayq caps nesting at `MAX_JSON_DEPTH`, below serde_json's own
    /// limit, and checks strings, so everything it stores reads back).
    Json(Unreadable),
}

impl From<sqlx::Error> for Unread {
    fn from(e: sqlx::Error) -> Self {
        Self::Fail(Fail::Db(e))
    }
}

impl From<Fail> for Unread {
    fn from(e: Fail) -> Self {
        Self::Fail(e)
    }
}

impl From<Unread> for Fail {
    fn from(e: Unread) -> Self {
        match e {
            Unread::Fail(e) => e,
            Unread::Json(u) => corrupt(format!("job {}: {}", u.lease.job_id, u.reason)),
        }
    }
}

/// A count stored as an `INTEGER` (another program may have stored one
/// beyond `i32`; relayq never does): the nearest `i32`.
fn nearest_i32(stored: i64) -> i32 {
    i32::try_from(stored).unwrap_or(if stored < 0 { i32::MIN } else { i32::MAX })
}

/// Decodes a row selected with [`COLUMNS`], for a pull: JSON relayq
/// cannot read is an [`Unread::Json`], so that the pull kills the job.
pub(crate) fn job_from_row(row: &SqliteRow) -> Result<Job, Unread> {
    read(row, false)
}

/// [`job_from_row`] for an observer (`get`, `list`): JSON relayq cannot
/// read (which another program stored) reads as a JSON string holding the
/// stored text (bytes that are not UTF-8 replaced by U+FFFD), as it is
/// stored once a pull kills the job, rather than failing the read, and
/// every page of a listing holding the job.
pub(crate) fn observed_job(row: &SqliteRow) -> Result<Job, Fail> {
    Ok(read(row, true)?)
}

fn read(row: &SqliteRow, unreadable_as_text: bool) -> Result<Job, Unread> {
    let id = row.try_get("id")?;
    let lease_token = row.try_get("lease_token")?;
    // Bytes, not `&str`: text that is not UTF-8 is unreadable JSON too.
    let json = |column: &'static str, text: &[u8]| match serde_json::from_slice::<Value>(text) {
        Ok(value) => Ok(value),
        Err(_) if unreadable_as_text => {
            Ok(Value::String(String::from_utf8_lossy(text).into_owned()))
        }
        Err(e) => {
            let lease = Lease {
                job_id: id,
                token: lease_token,
            };
            Err(Unread::Json(Unreadable::new(lease, column, text, e)))
        }
    };
    let priority: i64 = row.try_get("priority")?;
    // Borrowed from the row: a status and names of up to 24 bytes cost no
    // allocation, and JSON is parsed from the row's text. Text as bytes:
    // SQLite keeps text that is not UTF-8 (another program wrote it), read
    // with U+FFFD for the bytes that are not, rather than failing every
    // read of the row, the pulls that meet it included (and the whole
    // batch such a pull had leased with it).
    let status: &str = row.try_get("status")?;
    let queue: &[u8] = row.try_get("queue")?;
    let kind: &[u8] = row.try_get("kind")?;
    let unique_key: Option<&[u8]> = row.try_get("unique_key")?;
    let last_error: Option<&[u8]> = row.try_get("last_error")?;
    let payload: &[u8] = row.try_get("payload")?;
    let result: Option<&[u8]> = row.try_get("result")?;
    let locked_until: Option<i64> = row.try_get("locked_until")?;
    let mut job = Job {
        id,
        queue: String::from_utf8_lossy(queue).as_ref().into(),
        kind: String::from_utf8_lossy(kind).as_ref().into(),
        payload: Arc::new(Value::Null),
        priority: i16::try_from(priority)
            .map_err(|_| corrupt(format!("priority {priority} out of range")))?,
        status: status
            .parse::<JobStatus>()
            .map_err(|_| corrupt(format!("unknown status {status:?}")))?,
        attempts: nearest_i32(row.try_get("attempts")?),
        max_attempts: nearest_i32(row.try_get("max_attempts")?),
        lease_token,
        run_at: from_unix_micros(row.try_get("run_at")?),
        locked_until: locked_until.map(from_unix_micros),
        unique_key: unique_key.map(|key| String::from_utf8_lossy(key).into_owned()),
        last_error: last_error.map(|error| String::from_utf8_lossy(error).into_owned()),
        result: None,
        created_at: from_unix_micros(row.try_get("created_at")?),
        updated_at: from_unix_micros(row.try_get("updated_at")?),
    };
    // Last: a row with a column that does not decode is an error, whatever
    // its JSON.
    job.payload = Arc::new(json("payload", payload)?);
    job.result = result.map(|r| json("result", r)).transpose()?;
    Ok(job)
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn micros_round_trip_and_round_down() {
        for t in [
            datetime!(2030-01-01 00:00:00.123456 UTC),
            datetime!(1969-12-31 23:59:59.999999 UTC),
            datetime!(0001-01-01 00:00 UTC),
            datetime!(9999-12-31 23:59:59.999999 UTC),
        ] {
            assert_eq!(from_unix_micros(micros(t)), t);
        }
        assert_eq!(micros(datetime!(1970-01-01 00:00:00.000001999 UTC)), 1);
        assert_eq!(micros(datetime!(1969-12-31 23:59:59.999999001 UTC)), -1);
    }
}
