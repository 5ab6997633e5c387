//! Typed jobs and their handlers: [`JobType`], [`Handler`], [`JobContext`],
//! [`HandlerError`], and the type-erased registry the worker dispatches on.

use std::any::{TypeId, type_name};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use time::OffsetDateTime;
use tokio::sync::watch;

use super::keeper::WatchRef;
use crate::job::{DEFAULT_MAX_ATTEMPTS, DEFAULT_QUEUE, Job, JobId, NewJob};
use crate::lease::Lease;

/// A job payload type: its serde form is the payload, and [`Self::KIND`]
/// names the handler that runs it.
///
/// ```
/// use relayq_core::JobType;
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize)]
/// struct SendEmail {
///     to: String,
/// }
///
/// impl JobType for SendEmail {
///     const KIND: &'static str = "send_email";
///     const QUEUE: &'static str = "mail";
/// }
///
/// let job = SendEmail { to: "ada@example.com".into() }.to_job().priority(-1);
/// assert_eq!(job.validate().unwrap().queue, "mail");
/// ```
pub trait JobType: Serialize + DeserializeOwned + Send + 'static {
    /// The kind stored with each job; the worker dispatches on it. Keep it
    /// stable: renaming it strands jobs already enqueued under the old name.
    const KIND: &'static str;

    /// The queue [`Self::to_job`] enqueues into. A worker with no explicit
    /// queues pulls from the queues of the kinds it handles.
    const QUEUE: &'static str = DEFAULT_QUEUE;

    /// The attempts [`Self::to_job`] allows.
    const MAX_ATTEMPTS: i32 = DEFAULT_MAX_ATTEMPTS;

    /// A [`NewJob`] of this kind carrying `self`, on [`Self::QUEUE`] with
    /// [`Self::MAX_ATTEMPTS`]; chain setters to change anything else.
    fn to_job(&self) -> NewJob {
        NewJob::new(Self::KIND, self)
            .queue(Self::QUEUE)
            .max_attempts(Self::MAX_ATTEMPTS)
    }
}

/// Why a handler's attempt failed.
///
/// Any `std::error::Error` converts into it, so `?` works in handlers on
/// such errors (an `anyhow::Error` or a boxed error is not one: map it
/// with `.map_err(|e| HandlerError::new(format!("{e:#}")))`). By
/// default a failure is retried after the worker's [`RetryPolicy`](crate::RetryPolicy)
/// delay; [`Self::permanent`] makes the job `Dead` at once, and
/// [`Self::retry_after`] picks the delay.
///
/// Deliberately not an `std::error::Error` itself, so that the blanket
/// conversion from every error type can exist.
pub struct HandlerError {
    message: String,
    permanent: bool,
    retry_after: Option<Duration>,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl HandlerError {
    /// A retryable failure with this message.
    pub fn new(message: impl fmt::Display) -> Self {
        Self {
            message: message.to_string(),
            permanent: false,
            retry_after: None,
            source: None,
        }
    }

    /// A failure that no retry can fix: the job becomes `Dead` at once.
    pub fn permanent(message: impl fmt::Display) -> Self {
        Self {
            permanent: true,
            ..Self::new(message)
        }
    }

    /// Retries after `delay` (rounded up to a whole microsecond, at most
    /// [`MAX_DELAY`](crate::MAX_DELAY)) instead of the policy's delay
    /// (still `Dead` once the attempts are used up).
    pub fn retry_after(mut self, delay: Duration) -> Self {
        self.retry_after = Some(delay);
        self
    }

    /// The message stored as the job's `last_error`.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// True when the job is not to be retried.
    pub fn is_permanent(&self) -> bool {
        self.permanent
    }

    /// The delay chosen with [`Self::retry_after`], if any.
    pub fn retry_delay(&self) -> Option<Duration> {
        self.retry_after
    }

    /// The error this one was converted from, if any.
    pub fn source(&self) -> Option<&(dyn std::error::Error + Send + Sync + 'static)> {
        self.source.as_deref()
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for HandlerError {
    fn from(error: E) -> Self {
        // Keep the whole cause chain in the stored message.
        let mut message = error.to_string();
        let mut cause = error.source();
        while let Some(c) = cause {
            message.push_str(": ");
            message.push_str(&c.to_string());
            cause = c.source();
        }
        Self {
            message,
            permanent: false,
            retry_after: None,
            source: Some(Box::new(error)),
        }
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerError")
            .field("message", &self.message)
            .field("permanent", &self.permanent)
            .field("retry_after", &self.retry_after)
            .finish_non_exhaustive()
    }
}

/// Where the worker is in its life, as handlers see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Running,
    /// Not pulling any more; in-flight jobs may finish.
    Stopping,
    /// The shutdown deadline passed: unfinished jobs are released.
    Abandoning,
}

/// What a handler knows about the attempt it runs, plus the worker's
/// shared state.
pub struct JobContext<S = ()> {
    job: Arc<Job>,
    lease: Lease,
    lease_watch: WatchRef,
    worker: Arc<WorkerView<S>>,
}

/// What a job's context sees of its worker: the shared state and the
/// worker's phase. A started worker makes one per lane (a lane runs its
/// jobs on one thread at a time) and every context its jobs get holds a
/// count on it, rather than one each on the state and on the phase's
/// channel: those counts are the worker's alone, so every runtime thread
/// would take their cache lines from the others on every job (several
/// percent of a quick job's cost, measured).
pub(crate) struct WorkerView<S> {
    pub(crate) state: Arc<S>,
    pub(crate) phase: watch::Receiver<Phase>,
}

impl<S> Clone for JobContext<S> {
    fn clone(&self) -> Self {
        Self {
            job: Arc::clone(&self.job),
            lease: self.lease,
            lease_watch: self.lease_watch.clone(),
            worker: Arc::clone(&self.worker),
        }
    }
}

impl<S> fmt::Debug for JobContext<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JobContext")
            .field("id", &self.job.id)
            .field("kind", &self.job.kind)
            .field("attempt", &self.job.attempts)
            .field("lease_deadline", &self.lease_deadline())
            .finish_non_exhaustive()
    }
}

impl<S> JobContext<S> {
    pub(crate) fn new(
        job: Arc<Job>,
        lease: Lease,
        lease_watch: WatchRef,
        worker: Arc<WorkerView<S>>,
    ) -> Self {
        Self {
            job,
            lease,
            lease_watch,
            worker,
        }
    }

    /// The job's id.
    pub fn id(&self) -> JobId {
        self.job.id
    }

    /// This attempt's number: 1 for the first run.
    pub fn attempt(&self) -> i32 {
        self.job.attempts
    }

    /// The attempts the job is allowed in all.
    pub fn max_attempts(&self) -> i32 {
        self.job.max_attempts
    }

    /// True when this is the job's last allowed attempt.
    pub fn is_last_attempt(&self) -> bool {
        self.job.attempts >= self.job.max_attempts
    }

    /// The job as it was leased (queue, kind, raw payload, timestamps, …).
    pub fn job(&self) -> &Job {
        &self.job
    }

    /// The lease this attempt runs under.
    pub fn lease(&self) -> Lease {
        self.lease
    }

    /// When the lease currently expires, on the backend's clock. A started
    /// worker moves it forward while the handler runs (test mode,
    /// [`Worker::run_until_idle`](crate::Worker::run_until_idle), does not).
    pub fn lease_deadline(&self) -> OffsetDateTime {
        self.lease_watch.deadline()
    }

    /// The state shared by every handler of the worker.
    pub fn state(&self) -> &S {
        &self.worker.state
    }

    /// The shared state as an `Arc`, to move into spawned tasks.
    pub fn state_arc(&self) -> Arc<S> {
        Arc::clone(&self.worker.state)
    }

    /// True once the worker has begun shutting down: a long handler may
    /// wrap up early (an unfinished job is released, not failed, when the
    /// shutdown deadline passes).
    pub fn is_shutting_down(&self) -> bool {
        *self.worker.phase.borrow() != Phase::Running
    }

    /// Resolves once the worker begins shutting down (never, if it does not).
    pub async fn shutdown_requested(&self) {
        let mut phase = self.worker.phase.clone();
        if phase.wait_for(|p| *p != Phase::Running).await.is_err() {
            // The worker is gone without a shutdown: nothing will come.
            std::future::pending::<()>().await;
        }
    }

    /// The same context over other state; used to run handlers registered
    /// before the state was set. Such a context gets a view of its own,
    /// one allocation per job.
    pub(crate) fn with_state<T>(self, state: Arc<T>) -> JobContext<T> {
        let worker = Arc::new(WorkerView {
            state,
            phase: self.worker.phase.clone(),
        });
        JobContext {
            job: self.job,
            lease: self.lease,
            lease_watch: self.lease_watch,
            worker,
        }
    }
}

/// A handler for one [`JobType`], written as a type. The worker makes a
/// fresh value for every job (see
/// [`WorkerBuilder::handler`](crate::WorkerBuilder::handler)), so `run` takes
/// `self` and concurrent jobs never share mutable state.
///
/// ```
/// use relayq_core::{Handler, HandlerError, JobContext, JobType};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize)]
/// struct Resize { width: u32 }
/// impl JobType for Resize { const KIND: &'static str = "resize"; }
///
/// struct App { max_width: u32 }
///
/// struct Resizer { max_width: u32, steps: Vec<String> }
///
/// impl Handler<App> for Resizer {
///     type Job = Resize;
///     type Output = Vec<String>;
///
///     async fn run(mut self, job: Resize, _ctx: JobContext<App>) -> Result<Vec<String>, HandlerError> {
///         if job.width > self.max_width {
///             return Err(HandlerError::permanent("too wide"));
///         }
///         self.steps.push(format!("resized to {}", job.width));
///         Ok(self.steps)
///     }
/// }
/// # let _ = |b: relayq_core::WorkerBuilder<App>| {
/// #     b.handler(|app: &App| Resizer { max_width: app.max_width, steps: Vec::new() })
/// # };
/// ```
pub trait Handler<S = ()>: Send + 'static {
    /// The payload type this handler runs.
    type Job: JobType;
    /// What a successful run returns; stored as the job's result (`()` and
    /// other values serializing to `null` store none). One no store can
    /// keep (it does not serialize, holds NUL or nests too deep) makes the
    /// job `Dead` at once.
    type Output: Serialize;

    /// Runs one attempt. An `Err` or a panic is a failed attempt.
    fn run(
        self,
        job: Self::Job,
        ctx: JobContext<S>,
    ) -> impl Future<Output = Result<Self::Output, HandlerError>> + Send;
}

/// A handler's run, boxed.
pub(crate) type RunFuture =
    Pin<Box<dyn Future<Output = Result<Option<Value>, HandlerError>> + Send>>;

/// Decodes a payload and starts a handler; `Err` says why the payload is
/// unusable.
pub(crate) type ErasedHandler<S> =
    Arc<dyn Fn(&Value, JobContext<S>) -> Result<RunFuture, String> + Send + Sync>;

/// The Rust type a handler or a per-type setting was registered for.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TypeOf {
    pub(crate) id: TypeId,
    pub(crate) name: &'static str,
}

impl TypeOf {
    pub(crate) fn of<J: 'static>() -> Self {
        Self {
            id: TypeId::of::<J>(),
            name: type_name::<J>(),
        }
    }
}

/// One registered kind.
pub(crate) struct Entry<S> {
    pub(crate) run: ErasedHandler<S>,
    pub(crate) kind: &'static str,
    /// The job type registered for `kind`: per-type settings must name it.
    pub(crate) job_type: TypeOf,
    /// Its `MAX_ATTEMPTS`, checked when the worker is built.
    pub(crate) max_attempts: i32,
    /// What a lease keeper knows this kind by while its handler runs with
    /// no timeout: its place in [`Config::untimed_kinds`](super::execute::Config)
    /// plus one; 0 if the handler has a timeout.
    pub(crate) untimed: u32,
    pub(crate) queue: &'static str,
    pub(crate) timeout: Option<Duration>,
    pub(crate) retry: Option<crate::RetryPolicy>,
}

impl<S> Clone for Entry<S> {
    fn clone(&self) -> Self {
        Self {
            run: Arc::clone(&self.run),
            kind: self.kind,
            job_type: self.job_type,
            max_attempts: self.max_attempts,
            untimed: self.untimed,
            queue: self.queue,
            timeout: self.timeout,
            retry: self.retry.clone(),
        }
    }
}

impl<S: Send + Sync + 'static> Entry<S> {
    /// Wraps a closure-style handler.
    pub(crate) fn from_fn<J, F, Fut, R>(f: F) -> Self
    where
        J: JobType,
        F: Fn(J, JobContext<S>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, HandlerError>> + Send + 'static,
        R: Serialize,
    {
        let run: ErasedHandler<S> = Arc::new(move |payload: &Value, ctx: JobContext<S>| {
            let job = decode::<J>(payload)?;
            let fut = f(job, ctx);
            Ok(Box::pin(async move { encode(fut.await?) }) as RunFuture)
        });
        Self::new::<J>(run)
    }

    /// Wraps a [`Handler`] type made fresh by `make` for every job.
    pub(crate) fn from_handler<H, F>(make: F) -> Self
    where
        H: Handler<S>,
        F: Fn(&S) -> H + Send + Sync + 'static,
    {
        let run: ErasedHandler<S> = Arc::new(move |payload: &Value, ctx: JobContext<S>| {
            let job = decode::<H::Job>(payload)?;
            let handler = make(ctx.state());
            Ok(Box::pin(async move { encode(handler.run(job, ctx).await?) }) as RunFuture)
        });
        Self::new::<H::Job>(run)
    }

    fn new<J: JobType>(run: ErasedHandler<S>) -> Self {
        Self {
            run,
            kind: J::KIND,
            job_type: TypeOf::of::<J>(),
            max_attempts: J::MAX_ATTEMPTS,
            untimed: 0,
            queue: J::QUEUE,
            timeout: None,
            retry: None,
        }
    }

    /// The same handler for a worker whose state is `T`; the handler still
    /// sees the `S` it was registered with.
    pub(crate) fn adapt<T: Send + Sync + 'static>(self, state: Arc<S>) -> Entry<T> {
        let inner = self.run;
        let run: ErasedHandler<T> = Arc::new(move |payload: &Value, ctx: JobContext<T>| {
            inner(payload, ctx.with_state(Arc::clone(&state)))
        });
        Entry {
            run,
            kind: self.kind,
            job_type: self.job_type,
            max_attempts: self.max_attempts,
            untimed: self.untimed,
            queue: self.queue,
            timeout: self.timeout,
            retry: self.retry,
        }
    }
}

fn decode<J: JobType>(payload: &Value) -> Result<J, String> {
    J::deserialize(payload).map_err(|e| {
        format!(
            "payload does not deserialize as {} (kind {:?}): {e}",
            type_name::<J>(),
            J::KIND
        )
    })
}

/// The handler's result as JSON. Unlike a payload, a result holding NaN or
/// an infinity is kept (as `null`, serde_json's way): the job's work is
/// done, and failing the attempt would run it again. One that does not
/// serialize at all fails the job for good, for the same reason.
fn encode<R: Serialize>(output: R) -> Result<Option<Value>, HandlerError> {
    match serde_json::to_value(output) {
        Ok(Value::Null) => Ok(None),
        Ok(value) => Ok(Some(value)),
        Err(e) => Err(HandlerError::permanent(format!(
            "the handler's result does not serialize to JSON: {e}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use serde_json::json;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Ping {
        n: u32,
    }
    impl JobType for Ping {
        const KIND: &'static str = "ping";
        const QUEUE: &'static str = "pings";
        const MAX_ATTEMPTS: i32 = 3;
    }

    #[test]
    fn to_job_uses_the_type_defaults() {
        let job = Ping { n: 7 }.to_job().validate().unwrap();
        assert_eq!(
            (job.kind.as_str(), job.queue.as_str(), job.max_attempts),
            ("ping", "pings", 3)
        );
        assert_eq!(job.payload.to_value().unwrap(), json!({"n": 7}));
    }

    #[test]
    fn decode_errors_name_the_type_and_kind() {
        let err = decode::<Ping>(&json!({"n": "seven"})).unwrap_err();
        assert!(err.contains("Ping"), "{err}");
        assert!(err.contains("\"ping\""), "{err}");
        assert_eq!(decode::<Ping>(&json!({"n": 1})).unwrap(), Ping { n: 1 });
    }

    #[test]
    fn encode_maps_null_to_no_result() {
        assert_eq!(encode(()).unwrap(), None);
        assert_eq!(encode(json!(null)).unwrap(), None);
        assert_eq!(encode(5).unwrap(), Some(json!(5)));
        let mut bad = std::collections::HashMap::new();
        bad.insert((1, 2), 3);
        let e = encode(bad).unwrap_err();
        assert!(
            e.message().contains("serialize") && e.is_permanent(),
            "{e:?}"
        );
    }

    #[test]
    fn handler_error_conversions() {
        let io = std::io::Error::other("disk full");
        let e: HandlerError = io.into();
        assert_eq!(e.message(), "disk full");
        assert!(e.source().is_some());
        assert!(!e.is_permanent());
        let e = HandlerError::permanent("bad input").retry_after(Duration::from_secs(1));
        assert!(e.is_permanent());
        assert_eq!(e.retry_delay(), Some(Duration::from_secs(1)));
        assert_eq!(e.to_string(), "bad input");
    }
}
