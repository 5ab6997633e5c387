//! The job model: what is stored ([`Job`]), what is enqueued ([`NewJob`]) and
//! the lifecycle ([`JobStatus`]).

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use compact_str::CompactString;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;
use time::{Duration, OffsetDateTime};

use crate::clock::truncate_to_micros;
use crate::error::{Error, Result};
use crate::finite::Finite;
use crate::payload::Payload;

/// A job's id, assigned by the backend on insert. Ids grow with insertion order.
pub type JobId = i64;

/// The queue a job goes to when none is named.
pub const DEFAULT_QUEUE: &str = "default";

/// How many attempts a job gets when none is set.
pub const DEFAULT_MAX_ATTEMPTS: i32 = 25;

/// The longest `kind`, `queue` or `unique_key`, in bytes.
pub const MAX_NAME_LEN: usize = 255;

/// The deepest nesting of arrays and objects a payload or result may have.
pub const MAX_JSON_DEPTH: usize = 100;

/// The longest delay a job may be scheduled with (about 100 years).
pub const MAX_DELAY: Duration = Duration::days(36_525);

/// Where a job is in its life.
///
/// `Pending` and `Processing` are active; `Done`, `Dead` and `Cancelled` are
/// terminal and never change again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    /// Waiting to run: new, delayed, or waiting to be retried.
    Pending,
    /// Leased to one worker until its `locked_until`.
    Processing,
    /// Finished successfully.
    Done,
    /// Will not run again: attempts used up, killed, or unprocessable.
    Dead,
    /// Reserved for withdrawal by an administrator: no relayq call sets it
    /// yet, and every backend treats it as terminal.
    Cancelled,
}

impl JobStatus {
    /// Every status, in lifecycle order.
    pub const ALL: [JobStatus; 5] = [
        Self::Pending,
        Self::Processing,
        Self::Done,
        Self::Dead,
        Self::Cancelled,
    ];

    /// The lowercase name stored in SQL backends (`"pending"`, …).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Processing => "processing",
            Self::Done => "done",
            Self::Dead => "dead",
            Self::Cancelled => "cancelled",
        }
    }

    /// True for `Done`, `Dead` and `Cancelled`.
    pub const fn is_terminal(self) -> bool {
        matches!(self, Self::Done | Self::Dead | Self::Cancelled)
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobStatus {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| Error::invalid("status", format!("unknown job status {s:?}")))
    }
}

/// A stored job, as the backend sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// Backend-assigned id.
    pub id: JobId,
    /// The queue it waits in. Names are [`CompactString`]s: those of up to
    /// 24 bytes (on 64-bit targets) are stored inline, so copying a job
    /// (every lease a store grants) allocates nothing for them.
    pub queue: CompactString,
    /// Names the handler that runs it.
    pub kind: CompactString,
    /// The handler's input, shared: a store and the workers it hands the
    /// job to hold one payload, not a copy each.
    pub payload: Arc<Value>,
    /// Lower runs first.
    pub priority: i16,
    /// Where it is in its life.
    pub status: JobStatus,
    /// Leases spent so far (a released lease is given back).
    pub attempts: i32,
    /// Attempts allowed before it becomes `Dead`.
    pub max_attempts: i32,
    /// The fencing token of the newest lease granted; 0 before the first.
    pub lease_token: i64,
    /// Not eligible before this time.
    pub run_at: OffsetDateTime,
    /// While `Processing`: when the lease expires.
    pub locked_until: Option<OffsetDateTime>,
    /// Deduplication key, unique among active jobs of its queue.
    pub unique_key: Option<String>,
    /// The error of the latest failed attempt.
    pub last_error: Option<String>,
    /// What the handler returned, once `Done`.
    pub result: Option<Value>,
    /// When it was enqueued.
    pub created_at: OffsetDateTime,
    /// When its row last changed.
    pub updated_at: OffsetDateTime,
}

/// When a new job becomes eligible.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Schedule {
    /// At once.
    #[default]
    Now,
    /// This long after the store's `now` at insert time.
    After(Duration),
    /// At this instant.
    At(OffsetDateTime),
}

/// A job to enqueue. Build it with [`NewJob::new`] and the chained setters.
///
/// Nothing is checked until it is pushed; then every field is validated
/// and a bad one yields [`Error::InvalidInput`] naming it, with nothing
/// written.
///
/// ```
/// use relayq_core::NewJob;
/// use serde_json::json;
/// use time::Duration;
///
/// let job = NewJob::new("send_email", &json!({"to": "ada@example.com"}))
///     .queue("mail")
///     .priority(-5)
///     .delay(Duration::minutes(10))
///     .max_attempts(3)
///     .unique_key("welcome:ada");
/// assert_eq!(job.validate().unwrap().queue, "mail");
/// ```
#[derive(Debug, Clone)]
pub struct NewJob {
    kind: String,
    payload: std::result::Result<Box<RawValue>, String>,
    queue: String,
    priority: i16,
    schedule: Schedule,
    max_attempts: i32,
    unique_key: Option<String>,
}

impl NewJob {
    /// A job of `kind` carrying `payload` serialized to JSON text (see
    /// [`Payload`]), on the default queue, priority 0, due now, with 25
    /// attempts. A payload that does not serialize, holds a float that
    /// JSON cannot carry (NaN, an infinity, which serde_json would turn
    /// into `null`) or an integer beyond 64 bits (which serde_json reads
    /// back rounded), makes the push an [`Error::InvalidInput`] naming
    /// `payload`. (A `serde_json::Value` cannot hold them: `json!` has
    /// already made them `null`.)
    pub fn new(kind: impl Into<String>, payload: &impl Serialize) -> Self {
        Self {
            kind: kind.into(),
            payload: serde_json::value::to_raw_value(&Finite(payload)).map_err(|e| e.to_string()),
            queue: DEFAULT_QUEUE.to_owned(),
            priority: 0,
            schedule: Schedule::Now,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            unique_key: None,
        }
    }

    /// The queue to enqueue into.
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = queue.into();
        self
    }

    /// Lower runs first; the default is 0.
    pub fn priority(mut self, priority: i16) -> Self {
        self.priority = priority;
        self
    }

    /// Eligible `delay` after it is stored. Negative delays are rejected.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.schedule = Schedule::After(delay);
        self
    }

    /// Eligible at `at` (immediately, if `at` is in the past).
    pub fn run_at(mut self, at: OffsetDateTime) -> Self {
        self.schedule = Schedule::At(at);
        self
    }

    /// Attempts allowed before the job is `Dead`; at least 1.
    pub fn max_attempts(mut self, max_attempts: i32) -> Self {
        self.max_attempts = max_attempts;
        self
    }

    /// While a `Pending` or `Processing` job of the same queue has this key,
    /// pushing this job inserts nothing and reports that job's id.
    pub fn unique_key(mut self, key: impl Into<String>) -> Self {
        self.unique_key = Some(key.into());
        self
    }

    /// Checks every field and returns the job in the form backends store.
    pub fn validate(self) -> Result<ValidJob> {
        check_name("kind", &self.kind)?;
        check_name("queue", &self.queue)?;
        if let Some(key) = &self.unique_key {
            check_name("unique_key", key)?;
        }
        let payload = self
            .payload
            .map_err(|e| Error::invalid("payload", format!("does not serialize to JSON: {e}")))?;
        let payload = Payload::checked("payload", payload)?;
        check_max_attempts(self.max_attempts)?;
        match self.schedule {
            Schedule::After(d) => check_delay("delay", d)?,
            Schedule::At(at) => check_instant("run_at", at)?,
            Schedule::Now => {}
        }
        Ok(ValidJob {
            kind: self.kind,
            payload,
            queue: self.queue,
            priority: self.priority,
            schedule: self.schedule,
            max_attempts: self.max_attempts,
            unique_key: self.unique_key,
        })
    }
}

/// A [`NewJob`] whose fields passed validation. Backends store exactly this.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct ValidJob {
    /// Names the handler.
    pub kind: String,
    /// The handler's input, as checked JSON text.
    pub payload: Payload,
    /// The queue.
    pub queue: String,
    /// Lower runs first.
    pub priority: i16,
    /// When it becomes eligible.
    pub schedule: Schedule,
    /// At least 1.
    pub max_attempts: i32,
    /// Deduplication key.
    pub unique_key: Option<String>,
}

impl ValidJob {
    /// The instant it becomes eligible, given the store's `now`.
    /// It is in UTC and whole microseconds, as every store keeps it.
    pub fn run_at(&self, now: OffsetDateTime) -> Result<OffsetDateTime> {
        let at = match self.schedule {
            Schedule::Now => now,
            Schedule::At(at) => at,
            Schedule::After(d) => now
                .checked_add(d)
                .ok_or_else(|| Error::invalid("delay", "puts run_at out of range"))?,
        };
        let utc = at
            .checked_to_offset(time::UtcOffset::UTC)
            .ok_or_else(|| Error::invalid("run_at", "is outside the years 1..=9999"))?;
        Ok(truncate_to_micros(utc))
    }
}

/// Validates a whole batch; an error names the field and the job's index.
pub fn validate_batch(jobs: Vec<NewJob>) -> Result<Vec<ValidJob>> {
    jobs.into_iter()
        .enumerate()
        .map(|(i, job)| {
            job.validate().map_err(|e| match e {
                Error::InvalidInput { field, reason } => Error::InvalidInput {
                    field,
                    reason: format!("job {i} of the batch: {reason}"),
                },
                other => other,
            })
        })
        .collect()
}

/// Refuses a job allowing fewer than one attempt.
pub(crate) fn check_max_attempts(max_attempts: i32) -> Result<()> {
    if max_attempts < 1 {
        return Err(Error::invalid(
            "max_attempts",
            format!("must be at least 1, got {max_attempts}"),
        ));
    }
    Ok(())
}

/// Checks a name-like string: `kind`, `queue`, `unique_key`.
pub fn check_name(field: &'static str, value: &str) -> Result<()> {
    if value.is_empty() {
        return Err(Error::invalid(field, "must not be empty"));
    }
    if value.len() > MAX_NAME_LEN {
        return Err(Error::invalid(
            field,
            format!("is {} bytes long, the limit is {MAX_NAME_LEN}", value.len()),
        ));
    }
    if value.contains('\0') {
        return Err(Error::invalid(field, "must not contain NUL characters"));
    }
    Ok(())
}

/// Checks free text such as a retry's error message: no NUL characters
/// (PostgreSQL's `text` cannot store them).
pub fn check_text(field: &'static str, value: &str) -> Result<()> {
    if value.contains('\0') {
        return Err(Error::invalid(field, "must not contain NUL characters"));
    }
    Ok(())
}

/// Checks JSON for what every store can hold and read back: no NUL
/// character in any string or key (PostgreSQL's `jsonb`, which a stored
/// payload is cast to when queried with `jsonb` operators, cannot hold
/// `\u0000`), and at most [`MAX_JSON_DEPTH`] levels of nesting (JSON
/// readers such as serde_json refuse deeper documents, so a deeper job
/// could be stored but never read back).
pub fn check_json(field: &'static str, value: &Value) -> Result<()> {
    check_json_at(field, value, 0)
}

/// [`check_json`] of a value `depth` levels down. Recursive, without a heap
/// stack to allocate per job: the depth check ends the recursion at
/// [`MAX_JSON_DEPTH`], however deep the document, so it cannot overflow.
fn check_json_at(field: &'static str, value: &Value, depth: usize) -> Result<()> {
    if depth > MAX_JSON_DEPTH {
        return Err(Error::invalid(
            field,
            format!("nests deeper than {MAX_JSON_DEPTH} levels"),
        ));
    }
    match value {
        Value::String(s) if s.contains('\0') => Err(Error::invalid(
            field,
            "strings must not contain NUL characters",
        )),
        Value::Array(items) => items
            .iter()
            .try_for_each(|item| check_json_at(field, item, depth + 1)),
        Value::Object(map) => {
            if map.keys().any(|k| k.contains('\0')) {
                return Err(Error::invalid(
                    field,
                    "keys must not contain NUL characters",
                ));
            }
            map.values()
                .try_for_each(|item| check_json_at(field, item, depth + 1))
        }
        _ => Ok(()),
    }
}

/// Checks a delay: not negative, at most [`MAX_DELAY`].
pub fn check_delay(field: &'static str, delay: Duration) -> Result<()> {
    if delay.is_negative() {
        return Err(Error::invalid(
            field,
            format!("must not be negative, got {delay}"),
        ));
    }
    if delay > MAX_DELAY {
        return Err(Error::invalid(
            field,
            format!("must be at most {MAX_DELAY}, got {delay}"),
        ));
    }
    Ok(())
}

/// Which jobs of a status a [`Cleaner::clean`](crate::Cleaner::clean)
/// deletes, as [`check_clean`] reads its cutoff.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cutoff {
    /// None: the cutoff is at or before the first instant of the year 1,
    /// and no job is stamped earlier.
    Nothing,
    /// Those updated before this instant, a whole microsecond in UTC
    /// within the years 1–9999.
    Before(OffsetDateTime),
    /// All: the cutoff is past the last microsecond of the year 9999, and
    /// no job is stamped later.
    Everything,
}

impl Cutoff {
    /// Whether a job last updated at `updated_at` is deleted.
    pub fn takes(self, updated_at: OffsetDateTime) -> bool {
        match self {
            Self::Nothing => false,
            Self::Before(before) => updated_at < before,
            Self::Everything => true,
        }
    }
}

/// Checks a [`Cleaner::clean`](crate::Cleaner::clean) call and returns
/// which jobs of the status it deletes: those updated before `before`.
///
/// Only terminal statuses can be cleaned (`InvalidInput` naming `status`).
/// A store keeps whole microseconds within the years 1–9999 (and may not
/// even take an instant outside them, which a row another program stamped
/// outside them counts as stamped at the nearer end of): a `before` at or
/// before the first of them cleans nothing, one past the last everything,
/// and one within them is rounded up to a whole microsecond in UTC, so a
/// job updated at `t` is cleaned exactly when `t < before`, also when
/// `before` carries nanoseconds a store does not keep.
pub fn check_clean(status: JobStatus, before: OffsetDateTime) -> Result<Cutoff> {
    use time::macros::datetime;
    const FIRST: OffsetDateTime = datetime!(0001-01-01 0:00 UTC);
    const LAST: OffsetDateTime = datetime!(9999-12-31 23:59:59.999_999 UTC);
    if !status.is_terminal() {
        return Err(Error::invalid(
            "status",
            format!("only terminal jobs can be cleaned, not {status}"),
        ));
    }
    // Only an instant near the ends of `time`'s range leaves it in UTC.
    let before = match before.checked_to_offset(time::UtcOffset::UTC) {
        Some(utc) => utc,
        None if before.year() > 0 => return Ok(Cutoff::Everything),
        None => return Ok(Cutoff::Nothing),
    };
    if before <= FIRST {
        return Ok(Cutoff::Nothing);
    }
    if before > LAST {
        return Ok(Cutoff::Everything);
    }
    let down = truncate_to_micros(before);
    // Within the years, `down` is at most LAST, which has a next
    // microsecond in `time`'s range.
    Ok(Cutoff::Before(if down == before {
        before
    } else {
        down + Duration::MICROSECOND
    }))
}

/// Checks an instant lies in the range every store can hold (years 1–9999).
pub fn check_instant(field: &'static str, at: OffsetDateTime) -> Result<()> {
    // Converting an instant near the ends of `time`'s range to UTC can
    // leave that range: such an instant is out of range here too.
    let Some(utc) = at.checked_to_offset(time::UtcOffset::UTC) else {
        return Err(Error::invalid(field, "is outside the years 1..=9999"));
    };
    let year = utc.year();
    if !(1..=9999).contains(&year) {
        return Err(Error::invalid(
            field,
            format!("year {year} is outside 1..=9999"),
        ));
    }
    Ok(())
}

/// A processing job with lease token 1, for unit tests.
#[cfg(test)]
pub(crate) fn leased_for_tests(id: JobId) -> Job {
    let t = time::macros::datetime!(2030-01-01 00:00 UTC);
    Job {
        id,
        queue: "default".into(),
        kind: "k".into(),
        payload: Arc::new(Value::Null),
        priority: 0,
        status: JobStatus::Processing,
        attempts: 1,
        max_attempts: 5,
        lease_token: 1,
        run_at: t,
        locked_until: Some(t),
        unique_key: None,
        last_error: None,
        result: None,
        created_at: t,
        updated_at: t,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn defaults() {
        let job = NewJob::new("k", &json!({})).validate().unwrap();
        assert_eq!(job.queue, DEFAULT_QUEUE);
        assert_eq!(job.priority, 0);
        assert_eq!(job.max_attempts, DEFAULT_MAX_ATTEMPTS);
        assert_eq!(job.schedule, Schedule::Now);
    }

    #[test]
    fn status_round_trips_through_str() {
        for s in JobStatus::ALL {
            assert_eq!(s.as_str().parse::<JobStatus>().unwrap(), s);
        }
        assert_eq!(
            "nope".parse::<JobStatus>().unwrap_err().invalid_field(),
            Some("status")
        );
    }

    #[test]
    fn nul_in_nested_payload_is_rejected() {
        let err = NewJob::new("k", &json!({"a": [{"b": "x\u{0}y"}]}))
            .validate()
            .unwrap_err();
        assert_eq!(err.invalid_field(), Some("payload"));
    }
}
