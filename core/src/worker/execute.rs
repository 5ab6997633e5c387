//! Running one leased job: dispatch, the handler under a timeout and a lease
//! keeper, and recording the outcome with the lease.

use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use rustc_hash::FxHashMap;
use serde_json::Value;
use time::OffsetDateTime;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::time::Instant;
use tracing::Instrument;

use super::board::Board;
use super::events::{Event, JobInfo, Outcome, Subscription};
use super::handler::{Entry, HandlerError, JobContext, Phase, RunFuture, WorkerView};
use super::keeper::{Hold, LeaseWatch, WatchRef};
use super::persist::{Fenced, effect, persist, write_fenced};
use super::slots::Slot;
use crate::error::Error;
use crate::job::{Job, JobStatus, MAX_DELAY};
use crate::lease::{Lease, check_result};
use crate::request::Completion;
use crate::retry::RetryPolicy;
use crate::store::Backend;

/// A callback run on every event.
pub(crate) type Hook = Arc<dyn Fn(&Event) + Send + Sync>;

/// The longest error message stored; longer ones are cut.
pub(crate) const MAX_ERROR_LEN: usize = 8 * 1024;

/// The most completions sent in one `complete_batch`.
pub(crate) const MAX_ACK_BATCH: usize = 256;

/// The worker's settings, checked by the builder.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) queues: Vec<String>,
    pub(crate) concurrency: u32,
    pub(crate) prefetch: u32,
    pub(crate) lease: Duration,
    pub(crate) backend_lease: time::Duration,
    pub(crate) poll_interval: Duration,
    pub(crate) retry: RetryPolicy,
    pub(crate) timeout: Option<Duration>,
    pub(crate) shutdown_timeout: Duration,
    /// The kinds whose handlers have no timeout, which the lease keeper
    /// names when one runs long (see [`Entry::untimed`]).
    pub(crate) untimed_kinds: Arc<[&'static str]>,
}

/// Everything the worker's tasks share.
pub(crate) struct Shared<S> {
    pub(crate) backend: Arc<dyn Backend>,
    /// The backend's [`Capabilities::instant_writes`](crate::Capabilities::instant_writes):
    /// completions are recorded one by one, as handlers return.
    pub(crate) instant_writes: bool,
    /// By kind, looked up once per job. Fx hashing, not SipHash: the keys
    /// are the registered kinds, fixed before any job is read, so a job's
    /// kind cannot flood the table.
    pub(crate) handlers: FxHashMap<String, Entry<S>>,
    pub(crate) state: Arc<S>,
    pub(crate) config: Config,
    pub(crate) events: broadcast::Sender<Event>,
    /// Live subscriptions to `events`.
    pub(crate) listeners: Arc<AtomicUsize>,
    pub(crate) hooks: Vec<Hook>,
}

impl<S> fmt::Debug for Shared<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut kinds: Vec<&String> = self.handlers.keys().collect();
        kinds.sort();
        f.debug_struct("Worker")
            .field("backend", &self.backend)
            .field("kinds", &kinds)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<S> Shared<S> {
    /// Whether an event would reach anyone: a hook or a subscriber.
    pub(crate) fn is_observed(&self) -> bool {
        !self.hooks.is_empty() || self.listeners.load(Ordering::SeqCst) > 0
    }

    /// A counted subscription to the events.
    pub(crate) fn subscribe(&self) -> Subscription {
        Subscription::new(&self.events, &self.listeners)
    }

    pub(crate) fn emit(&self, event: Event) {
        for hook in &self.hooks {
            if std::panic::catch_unwind(AssertUnwindSafe(|| hook(&event))).is_err() {
                tracing::error!("an event hook panicked; the worker goes on");
            }
        }
        // No subscriber is not an error.
        let _ = self.events.send(event);
    }
}

/// How an outcome reaches the backend.
pub(crate) enum Mode<'a, S> {
    /// In the calling task, one call per acknowledgement, no timers but the
    /// handler's timeout.
    Inline,
    /// On one of a started worker's lanes, beside other jobs: its lease
    /// kept alive, completions batched (unless the backend has
    /// [`instant_writes`](crate::Capabilities::instant_writes)).
    Spawned {
        /// What the worker's jobs share.
        started: &'a Started,
        /// What the contexts of the lane's jobs see of the worker.
        view: &'a Arc<WorkerView<S>>,
        /// The worker's concurrency slot, given back once the handler has
        /// returned: recording the outcome does not count against the
        /// concurrency, so the next pull need not wait for it.
        slot: Option<Slot>,
        /// The lease's registration with the worker's keeper, which renews
        /// it until the outcome is recorded.
        hold: Option<Hold>,
    },
}

/// What every job of a started worker shares.
pub(crate) struct Started {
    /// The worker's phase: running, stopping, or abandoning its jobs.
    pub(crate) phase: watch::Receiver<Phase>,
    /// Where completions go to be recorded in batches.
    pub(crate) acks: mpsc::UnboundedSender<Ack>,
    /// Counts the completions handed over.
    pub(crate) board: Arc<Board>,
}

/// How a job's run ended.
pub(crate) enum Ended {
    /// Its outcome is recorded (or could not be): this one.
    Recorded(Outcome),
    /// It succeeded and its completion went to the batcher, which records
    /// it with others and reports the outcome.
    Handed,
    /// It succeeded, on a backend with instant writes: its lane records
    /// the completion with those of the other runs that end with it (one
    /// call and one lock for the lot), and reports the outcome.
    Completed(Ack),
}

/// What one handler run came to, before it is recorded.
enum Attempt {
    Succeeded(Option<Value>),
    Failed(HandlerError),
    Panicked(String),
    TimedOut(Duration),
    LeaseLost,
    Abandoned,
}

impl Attempt {
    /// What a handler's run that ran to its end (returned or panicked)
    /// came to.
    fn of(finished: std::thread::Result<Result<Option<Value>, HandlerError>>) -> Self {
        match finished {
            Ok(Ok(result)) => Self::Succeeded(result),
            Ok(Err(error)) => Self::Failed(error),
            Err(panic) => Self::Panicked(panic_message(&*panic)),
        }
    }
}

/// A job's run, begun (see [`begin`]).
pub(crate) enum Begun<F> {
    /// The run ended there: on a started worker, the handler returned at
    /// its first poll and its completion was handed on to be recorded with
    /// others.
    Ended(Ended),
    /// The handler is running: the rest of the run waits for it, then
    /// records its outcome. Its first poll registered the caller's waker;
    /// the future's own first poll polls the handler again, which is
    /// needed: it registers the waker of whatever polls the future (a
    /// lane's set of runs has one per run) and arms the timeout, lease
    /// and shutdown watches.
    Waiting(F),
    /// The handler is done, or the job cannot run: the rest of the run
    /// records the outcome, which a first poll may finish at once.
    Recording(F),
}

/// What is left of a run once it is begun.
enum Rest<'a, S> {
    /// The handler has not returned, or not been polled yet.
    Running(&'a Entry<S>, RunFuture, Option<Deadline>),
    /// An outcome to record.
    Record(Record<'a, S>),
}

/// When a handler's time is up.
#[derive(Clone, Copy)]
struct Deadline {
    limit: Duration,
    at: Instant,
}

/// The farthest deadline set: about 30 years, as Tokio's own `sleep` caps
/// one (a timeout of `Duration::MAX` means "none"; Tokio's timer cannot
/// take an instant near the clock's end).
const FAR_OFF: Duration = Duration::from_secs(30 * 365 * 24 * 60 * 60);

impl Deadline {
    /// `limit` from now.
    fn after(limit: Option<Duration>) -> Option<Self> {
        limit.map(|limit| Self {
            limit,
            at: Instant::now() + limit.min(FAR_OFF),
        })
    }
}

/// An outcome to record.
enum Record<'a, S> {
    /// The attempt failed (its handler erred, panicked or timed out):
    /// retried or dead, as its retry policy says; or it returned a result
    /// that cannot be stored: dead at once.
    Failure(&'a Entry<S>, HandlerError),
    /// The lease was lost: nothing is recorded.
    LeaseLost,
    /// Abandoned at the shutdown deadline: the job is given back.
    Abandoned,
    /// A success no batcher takes (the test mode's runs, or the batcher is
    /// gone): recorded here.
    Completion(Completion),
    /// The job cannot run (no handler for its kind, or a payload its
    /// handler cannot decode): it is killed with this error.
    Kill(String),
}

/// Runs one leased job to an outcome and reports it: [`begin`], without
/// polling the handler there.
pub(crate) async fn execute<S: Send + Sync + 'static>(
    shared: &Shared<S>,
    lease: Lease,
    job: Arc<Job>,
    mode: Mode<'_, S>,
) -> Ended {
    match begin(shared, lease, job, mode, None) {
        Begun::Ended(ended) => ended,
        Begun::Waiting(rest) | Begun::Recording(rest) => rest.await,
    }
}

/// Begins the run of one leased job: dispatches it and decodes its
/// payload, then, given the lane's `cx`, polls its handler once there. On
/// a started worker a handler that returns at that poll (most quick jobs)
/// ends the run right there, its completion handed on to be recorded with
/// others, and the future the rest of a run takes is never made: building
/// it, allocating it and moving it cost about a tenth of a quick job on
/// the memory store (measured). Every other run goes on in the returned
/// future, whose first poll, without `cx`, makes the handler's first.
///
/// The rest of a run borrows what the worker shares rather than holding a
/// count on it: runners on other threads would otherwise contend for that
/// count's cache line on every job. Keep it under about 1 KiB (832 bytes
/// boxed when last measured, in a release build): glibc's malloc serves
/// larger blocks by sorting its free lists on every allocation; at 1,120
/// bytes the memory backend processed 18% fewer jobs per second.
pub(crate) fn begin<'a, S: Send + Sync + 'static>(
    shared: &'a Shared<S>,
    lease: Lease,
    job: Arc<Job>,
    mode: Mode<'a, S>,
    cx: Option<&mut Context<'_>>,
) -> Begun<impl Future<Output = Ended> + Send + use<'a, S>> {
    let (worker, view, mut slot, mut hold) = match mode {
        Mode::Spawned {
            started,
            view,
            slot,
            hold,
        } => (Some(started), Some(view), slot, hold),
        Mode::Inline => (None, None, None, None),
    };
    let span = job_span(&job);
    // Building events costs work per job (a `JobInfo` each, sent on a
    // broadcast channel): skip them when nobody is listening (no hook, no
    // subscriber) when the attempt starts.
    let observed = shared.is_observed();
    let job_run = JobRun {
        shared,
        worker,
        job,
        lease,
    };
    let begun = span.in_scope(|| {
        if observed {
            shared.emit(Event::Started {
                job: JobInfo::from(&*job_run.job),
            });
        }
        tracing::debug!("started");
        job_run.dispatch(view, &mut hold, cx)
    });
    let rest = match begun {
        Ok(ended) => return Begun::Ended(ended),
        Err(rest) => rest,
    };
    let waiting = matches!(rest, Rest::Running(..));
    if !waiting {
        // The handler is done (or never ran): its slot is free.
        drop(slot.take());
    }
    let run = finish(job_run, rest, slot, hold, observed).instrument(span);
    if waiting {
        Begun::Waiting(run)
    } else {
        Begun::Recording(run)
    }
}

/// One job's run: the job, its lease, and the worker it runs on.
struct JobRun<'a, S> {
    shared: &'a Shared<S>,
    /// `None` for the test mode's runs.
    worker: Option<&'a Started>,
    job: Arc<Job>,
    lease: Lease,
}

impl<'a, S: Send + Sync + 'static> JobRun<'a, S> {
    /// The board of the runner the job runs on; none in the test mode.
    fn board(&self) -> Option<&'a Board> {
        self.worker.map(|started| &*started.board)
    }

    /// Dispatches the job, decodes its payload and, given `cx`, polls its
    /// handler once. `Ok` if the run ended there (see [`Self::conclude`]).
    fn dispatch(
        &self,
        view: Option<&Arc<WorkerView<S>>>,
        hold: &mut Option<Hold>,
        cx: Option<&mut Context<'_>>,
    ) -> Result<Ended, Rest<'a, S>> {
        let (shared, job) = (self.shared, &self.job);
        let Some(entry) = shared.handlers.get(job.kind.as_str()) else {
            let mut kinds: Vec<&str> = shared.handlers.keys().map(String::as_str).collect();
            kinds.sort_unstable();
            return Err(Rest::Record(Record::Kill(format!(
                "no handler is registered for kind {:?} (this worker handles {kinds:?})",
                job.kind
            ))));
        };
        let lease_watch = match hold {
            Some(hold) => hold.watch.clone(),
            None => WatchRef::alone(
                self.lease,
                job.locked_until.unwrap_or(OffsetDateTime::UNIX_EPOCH),
            ),
        };
        let view = match view {
            Some(view) => Arc::clone(view),
            None => Arc::new(WorkerView {
                state: Arc::clone(&shared.state),
                // Nothing shuts an inline run down.
                phase: watch::channel(Phase::Running).1,
            }),
        };
        let ctx = JobContext::new(Arc::clone(job), self.lease, lease_watch, view);
        // The handler's time starts as its work does.
        let deadline = Deadline::after(entry.timeout.or(shared.config.timeout));
        // Decoding the payload, building the handler's future and polling
        // it run user code: a panic in any is the attempt's.
        let started = std::panic::catch_unwind(AssertUnwindSafe(|| (entry.run)(&job.payload, ctx)));
        let mut run = match started {
            Err(panic) => {
                let attempt = Attempt::of(Err(panic));
                return self.conclude(entry, attempt, hold).map_err(Rest::Record);
            }
            Ok(Err(unusable)) => return Err(Rest::Record(Record::Kill(unusable))),
            Ok(Ok(run)) => run,
        };
        let Some(cx) = cx else {
            return Err(Rest::Running(entry, run, deadline));
        };
        let attempt = match std::panic::catch_unwind(AssertUnwindSafe(|| run.as_mut().poll(cx))) {
            Ok(Poll::Pending) => return Err(Rest::Running(entry, run, deadline)),
            Ok(Poll::Ready(returned)) => Attempt::of(Ok(returned)),
            Err(panic) => Attempt::of(Err(panic)),
        };
        self.conclude(entry, attempt, hold).map_err(Rest::Record)
    }

    /// What an attempt comes to. On a started worker a success is handed
    /// on without waiting (`Ok`): to the lane on a backend with instant
    /// writes, else to the batcher. Anything else is to be recorded here,
    /// a success too if the batcher is gone (`hold` then holds the lease
    /// again).
    fn conclude(
        &self,
        entry: &'a Entry<S>,
        attempt: Attempt,
        hold: &mut Option<Hold>,
    ) -> Result<Ended, Record<'a, S>> {
        let result = match attempt {
            Attempt::Succeeded(result) => result,
            Attempt::Failed(error) => return Err(Record::Failure(entry, error)),
            Attempt::Panicked(message) => {
                let error = HandlerError::new(format!("the handler panicked: {message}"));
                return Err(Record::Failure(entry, error));
            }
            Attempt::TimedOut(after) => {
                let error = HandlerError::new(format!("the handler timed out after {after:?}"));
                return Err(Record::Failure(entry, error));
            }
            Attempt::LeaseLost => return Err(Record::LeaseLost),
            Attempt::Abandoned => return Err(Record::Abandoned),
        };
        if let Err(e) = check_result(result.as_ref()) {
            // Permanent: the handler's work is done, and another attempt
            // would do it again only to return the same result.
            let error =
                HandlerError::permanent(format!("the handler's result cannot be stored: {e}"));
            return Err(Record::Failure(entry, error));
        }
        let completion = Completion {
            lease: self.lease,
            result,
        };
        let Some(started) = self.worker else {
            return Err(Record::Completion(completion));
        };
        let (shared, job) = (self.shared, Arc::clone(&self.job));
        if shared.instant_writes {
            let ack = ack(shared, started, completion, job, hold.take());
            return Ok(Ended::Completed(ack));
        }
        match hand(shared, started, completion, job, hold.take()) {
            Ok(()) => Ok(Ended::Handed),
            Err(ack) => {
                *hold = ack.hold;
                Err(Record::Completion(ack.completion))
            }
        }
    }

    /// Records `record`; the lease is let go after.
    async fn record(&self, record: Record<'a, S>, hold: Option<Hold>) -> Outcome {
        let (shared, backend) = (self.shared, &*self.shared.backend);
        let outcome = match record {
            Record::Failure(entry, error) => {
                record_failure(shared, self.board(), entry, &self.job, self.lease, error).await
            }
            Record::LeaseLost => Outcome::LeaseLost,
            Record::Abandoned => match backend.release(&self.lease).await {
                Ok(()) => Outcome::Released,
                Err(e) => unrecorded(e),
            },
            Record::Completion(completion) => {
                // The outcome's copy of the result: for the test mode's
                // report, or for whoever listens.
                let keep = self.worker.is_none() || shared.is_observed();
                complete(shared, self.board(), completion, keep).await
            }
            Record::Kill(error) => record_kill(shared, self.board(), &self.lease, error).await,
        };
        // Renewed until recorded.
        drop(hold);
        outcome
    }
}

/// The rest of a run [`begin`] began: the handler run to its end, then
/// its outcome recorded and reported.
async fn finish<S: Send + Sync + 'static>(
    run: JobRun<'_, S>,
    rest: Rest<'_, S>,
    slot: Option<Slot>,
    mut hold: Option<Hold>,
    observed: bool,
) -> Ended {
    let record = match rest {
        Rest::Record(record) => record,
        Rest::Running(entry, handler, deadline) => {
            let attempt = match (run.worker, &hold) {
                (Some(worker), Some(hold)) => {
                    // Only a handler not done at its first poll can run
                    // long: the keeper is told of it here, off the path of
                    // quick jobs.
                    hold.watch.runs_untimed(entry.untimed);
                    let attempt = run_spawned(handler, deadline, &hold.watch, &worker.phase).await;
                    hold.watch.runs_untimed(0);
                    attempt
                }
                _ => run_inline(handler, deadline).await,
            };
            // The handler is done; only the acknowledgement is left.
            drop(slot);
            match run.conclude(entry, attempt, &mut hold) {
                Ok(ended) => return ended,
                Err(record) => record,
            }
        }
    };
    let outcome = run.record(record, hold).await;
    report(run.shared, &run.job, &outcome, observed);
    Ended::Recorded(outcome)
}

/// The span of a job's attempt; a disabled one when no subscriber takes
/// spans at its level. That is the level test `info_span!` makes itself;
/// made here first, it also skips the span tracing's `log` compatibility
/// builds and logs when no subscriber exists at all, which cost hundreds
/// of instructions per job (a twentieth of what the memory backend spends
/// on one). Filters by span name or field still see every job span: a
/// subscriber that may enable spans at this level raises the current
/// level filter to it.
fn job_span(job: &Job) -> tracing::Span {
    use tracing::level_filters::{LevelFilter, STATIC_MAX_LEVEL};
    let level = tracing::Level::INFO;
    if level > STATIC_MAX_LEVEL || level > LevelFilter::current() {
        return tracing::Span::none();
    }
    tracing::info_span!(
        "job",
        id = job.id,
        kind = %job.kind,
        queue = %job.queue,
        attempt = job.attempts
    )
}

/// Logs how an attempt ended and tells hooks and subscribers, if any were
/// `observed` when it started or are now.
fn report<S>(shared: &Shared<S>, job: &Job, outcome: &Outcome, observed: bool) {
    match outcome {
        Outcome::Completed { .. } => tracing::debug!("completed"),
        Outcome::Retrying { error, delay } => {
            tracing::warn!(%error, ?delay, "failed; will retry");
        }
        Outcome::Dead { error } => tracing::error!(%error, "dead"),
        Outcome::Released => tracing::info!("released at shutdown"),
        Outcome::LeaseLost => tracing::warn!("lease lost; outcome discarded"),
        Outcome::Unrecorded { error } => {
            tracing::error!(%error, "could not record the outcome");
        }
    }
    if observed || shared.is_observed() {
        shared.emit(Event::Finished {
            job: JobInfo::from(job),
            outcome: outcome.clone(),
        });
    }
}

async fn run_inline(fut: RunFuture, deadline: Option<Deadline>) -> Attempt {
    let mut run = AssertUnwindSafe(fut).catch_unwind();
    let finished = match deadline {
        None => run.await,
        Some(deadline) => match tokio::time::timeout_at(deadline.at, &mut run).await {
            Ok(finished) => finished,
            Err(_) => {
                stop(run);
                return Attempt::TimedOut(deadline.limit);
            }
        },
    };
    Attempt::of(finished)
}

/// Drops a handler's future stopped before its end. A panic of a
/// destructor it runs (a guard that asserts it was used up, say) is
/// logged, not let unwind into the worker: the attempt ends as it was
/// stopped, and its outcome is recorded.
fn stop(run: impl Sized) {
    if let Err(panic) = std::panic::catch_unwind(AssertUnwindSafe(|| drop(run))) {
        tracing::error!(
            panic = %panic_message(&*panic),
            "a handler panicked as it was stopped"
        );
    }
}

/// Runs a handler until it returns, times out, loses its lease (the
/// keeper found it taken) or is abandoned at the shutdown deadline; the
/// last three drop the handler's future, stopping it.
async fn run_spawned(
    fut: RunFuture,
    deadline: Option<Deadline>,
    lease: &LeaseWatch,
    phase: &watch::Receiver<Phase>,
) -> Attempt {
    // A panic is caught here, so the lane's other jobs go on; a handler
    // that blocks its thread delays no lease's renewal (the keeper renews
    // them from its own task).
    let mut run = AssertUnwindSafe(fut).catch_unwind();
    // Boxed: a timer is large, and most jobs have no timeout.
    let expiry = async {
        match deadline {
            Some(deadline) => Box::pin(tokio::time::sleep_until(deadline.at)).await,
            None => std::future::pending().await,
        }
    };
    // Cloned only if polled (`wait_for` needs a receiver of its own), as
    // registering its waker takes the channel's lock.
    let abandoned = async {
        let mut phase = phase.clone();
        if phase.wait_for(|p| *p == Phase::Abandoning).await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    // The handler first: one that is done at this poll ends the run before
    // the other three are ever polled, so they register no waker. The
    // timeout and the shutdown deadline are exempt from Tokio's cooperative
    // budget: polled after a handler that spends the lane's whole budget
    // on every poll (a loop over ready I/O, say),
    // a budgeted timer would never fire. Each resolves once, so it cannot
    // hog the lane. (`lost` takes no budget.) A handler done as its lease
    // is lost or its time is up keeps its result; its completion is then
    // fenced by the store.
    let attempt = tokio::select! {
        biased;
        finished = &mut run => return Attempt::of(finished),
        () = lease.lost() => Attempt::LeaseLost,
        () = tokio::task::unconstrained(expiry) => {
            Attempt::TimedOut(deadline.map_or(Duration::ZERO, |d| d.limit))
        }
        () = tokio::task::unconstrained(abandoned) => Attempt::Abandoned,
    };
    stop(run);
    attempt
}

async fn record_failure<S>(
    shared: &Shared<S>,
    board: Option<&Board>,
    entry: &Entry<S>,
    job: &Job,
    lease: Lease,
    failure: HandlerError,
) -> Outcome {
    let error = sanitize(failure.message());
    if failure.is_permanent() {
        return record_kill(shared, board, &lease, error).await;
    }
    let delay = failure
        .retry_delay()
        .unwrap_or_else(|| policy_delay(entry.retry.as_ref().unwrap_or(&shared.config.retry), job));
    // Stores keep whole microseconds: a delay with nanoseconds is rounded
    // up, so that the job is never due before its delay has passed.
    let backend_delay = time::Duration::try_from(delay)
        .unwrap_or(MAX_DELAY)
        .min(MAX_DELAY);
    let backend_delay = match backend_delay.subsec_nanoseconds() % 1_000 {
        0 => backend_delay,
        rest => backend_delay + time::Duration::nanoseconds(i64::from(1_000 - rest)),
    };
    // Left `Pending` to run again, or `Dead` with its attempts spent.
    let left = |status| matches!(status, JobStatus::Pending | JobStatus::Dead).then_some(status);
    let written = write_fenced(shared, board, &lease, Some(&error), left, || {
        shared.backend.retry(&lease, backend_delay, &error)
    })
    .await;
    match written {
        Fenced::Recorded(JobStatus::Dead) => Outcome::Dead { error },
        // The delay stored (capped, rounded up), not the one asked for.
        Fenced::Recorded(_) => Outcome::Retrying {
            error,
            delay: Duration::try_from(backend_delay).unwrap_or(delay),
        },
        Fenced::LeaseLost => Outcome::LeaseLost,
        Fenced::Failed(e) => unrecorded(e),
    }
}

/// The delay `policy` sets after `job`'s failed attempt; the default
/// policy's if it panics (a custom policy's bug), so that the job is still
/// retried, with a backoff, rather than left to its lease's end.
fn policy_delay(policy: &RetryPolicy, job: &Job) -> Duration {
    std::panic::catch_unwind(AssertUnwindSafe(|| policy.delay(job, job.attempts))).unwrap_or_else(
        |panic| {
            tracing::error!(
                job = job.id,
                panic = %panic_message(&*panic),
                "the retry policy panicked; the job is retried as the default policy says"
            );
            RetryPolicy::default().delay(job, job.attempts)
        },
    )
}

async fn record_kill<S>(
    shared: &Shared<S>,
    board: Option<&Board>,
    lease: &Lease,
    error: String,
) -> Outcome {
    let error = sanitize(&error);
    let dead = |status| (status == JobStatus::Dead).then_some(());
    let written = write_fenced(shared, board, lease, Some(&error), dead, || {
        shared.backend.kill(lease, &error)
    })
    .await;
    match written {
        Fenced::Recorded(()) => Outcome::Dead { error },
        Fenced::LeaseLost => Outcome::LeaseLost,
        Fenced::Failed(e) => unrecorded(e),
    }
}

/// A completion to record with others, with the hold that keeps its lease
/// renewed until it is recorded, counted as awaiting its record.
fn ack<S>(
    shared: &Shared<S>,
    started: &Started,
    completion: Completion,
    job: Arc<Job>,
    hold: Option<Hold>,
) -> Ack {
    // The outcome's copy of the result, only if anyone will see it.
    let reported = shared.is_observed().then(|| completion.result.clone());
    started.board.handed();
    Ack {
        completion,
        job,
        reported,
        hold,
    }
}

/// Hands a completion to the worker's batcher (see [`ack`]); gives it back
/// if the batcher is gone. Not async: the job's future, allocated per job,
/// stays smaller.
fn hand<S>(
    shared: &Shared<S>,
    started: &Started,
    completion: Completion,
    job: Arc<Job>,
    hold: Option<Hold>,
) -> Result<(), Ack> {
    let ack = ack(shared, started, completion, job, hold);
    started
        .acks
        .send(ack)
        .map_err(|mpsc::error::SendError(ack)| {
            started.board.recorded(1);
            ack
        })
}

/// Records one completion on its own; the outcome carries the result if
/// `keep_result`.
async fn complete<S>(
    shared: &Shared<S>,
    board: Option<&Board>,
    completion: Completion,
    keep_result: bool,
) -> Outcome {
    let Completion { lease, result } = completion;
    let done = |status| (status == JobStatus::Done).then_some(());
    let written = write_fenced(shared, board, &lease, None, done, || {
        shared.backend.complete(&lease, result.clone())
    })
    .await;
    match written {
        Fenced::Recorded(()) => Outcome::Completed {
            result: if keep_result { result } else { None },
        },
        Fenced::LeaseLost => Outcome::LeaseLost,
        Fenced::Failed(e) => unrecorded(e),
    }
}

fn unrecorded(e: Error) -> Outcome {
    if e.is_lease_lost() {
        Outcome::LeaseLost
    } else {
        Outcome::Unrecorded {
            error: e.to_string(),
        }
    }
}

/// One completion waiting to be batched.
pub(crate) struct Ack {
    completion: Completion,
    job: Arc<Job>,
    /// The result for the outcome reported once recorded, if anyone was
    /// listening when the handler returned.
    reported: Option<Option<Value>>,
    /// Keeps the lease renewed until the completion is recorded.
    hold: Option<Hold>,
}

/// How many `complete_batch` calls may be under way at once. On a durable
/// store each waits for its commit to reach disk; overlapping two lets the
/// database flush one while the other runs, and more split the same
/// completions into smaller statements and commits. Measured with two
/// claims at once (see `stock::PULLS_AT_ONCE`), PostgreSQL `process` at
/// 100,000 jobs, 5 alternating pairs: two ahead of four in all five
/// (medians 46,000 against 43,000 stored jobs/s).
const ACK_BATCHES_AT_ONCE: usize = 2;

/// Records completions with `complete_batch`: whatever is queued when a
/// call may start goes in it (up to [`ACK_BATCHES_AT_ONCE`] calls at once),
/// so an idle worker acks at once and a busy one in bulk; then reports
/// each outcome and lets the leases go. Ends when every sender is gone and
/// every call has returned.
pub(crate) async fn batch_completions<S>(
    shared: Arc<Shared<S>>,
    board: Arc<Board>,
    mut acks: mpsc::UnboundedReceiver<Ack>,
) {
    let mut sending = FuturesUnordered::new();
    let mut open = true;
    while open || !sending.is_empty() {
        tokio::select! {
            received = acks.recv(), if open && sending.len() < ACK_BATCHES_AT_ONCE => {
                let Some(first) = received else {
                    open = false;
                    continue;
                };
                let mut batch = vec![first];
                while batch.len() < MAX_ACK_BATCH {
                    match acks.try_recv() {
                        Ok(ack) => batch.push(ack),
                        Err(_) => break,
                    }
                }
                sending.push(record_contained(&shared, &board, batch));
            }
            Some(()) = sending.next(), if !sending.is_empty() => {}
        }
    }
}

/// [`record_completions`], a panic in it (a backend's bug) contained: the
/// batch counts as recorded, so that the bound on leases held does not
/// shrink for good, and its jobs' leases run out: they run again. The
/// worker and its other jobs go on.
pub(crate) async fn record_contained<S>(shared: &Shared<S>, board: &Board, batch: Vec<Ack>) {
    let n = batch.len();
    let recording = record_completions(shared, board, batch);
    if AssertUnwindSafe(recording).catch_unwind().await.is_err() {
        board.recorded(n);
        tracing::error!(jobs = n, "recording completions panicked");
    }
}

/// Records one batch of completions and reports each outcome.
async fn record_completions<S>(shared: &Shared<S>, board: &Board, batch: Vec<Ack>) {
    let n = batch.len();
    let mut completions = Vec::with_capacity(n);
    let mut rest = Vec::with_capacity(n);
    for ack in batch {
        rest.push((ack.completion.lease, ack.job, ack.reported, ack.hold));
        completions.push(ack.completion);
    }
    let (result, retried) = if shared.instant_writes {
        // A call into this process: no failure passes by trying again.
        (shared.backend.complete_batch(completions).await, false)
    } else {
        let written = persist(shared, Some(board), || {
            shared.backend.complete_batch(completions.clone())
        })
        .await;
        (written.result, written.retried)
    };
    let (recorded, gone) = match result {
        Ok(lost) if retried && !lost.is_empty() => {
            (Ok(()), settle(&*shared.backend, lost, None).await)
        }
        Ok(lost) => (
            Ok(()),
            Gone {
                lost,
                unrecorded: Vec::new(),
            },
        ),
        // An earlier try may have completed them, its reply lost.
        Err(e) if retried => {
            let leases = rest.iter().map(|(lease, ..)| *lease).collect();
            (Ok(()), settle(&*shared.backend, leases, Some(&e)).await)
        }
        Err(e) => (Err(e), Gone::default()),
    };
    for (lease, job, reported, hold) in rest {
        // Recorded (or given up on): the lease is let go.
        drop(hold);
        // Also told to whoever subscribed since the handler returned (a
        // `wait_for` that read the job as still processing).
        let observed = reported.is_some() || shared.is_observed();
        let unrecorded = gone.unrecorded.iter().find(|(gone, _)| *gone == lease);
        let outcome = match (&recorded, unrecorded) {
            (Err(e), _) => Outcome::Unrecorded {
                error: e.to_string(),
            },
            (Ok(()), Some((_, error))) => Outcome::Unrecorded {
                error: error.clone(),
            },
            (Ok(()), None) if gone.lost.contains(&lease) => Outcome::LeaseLost,
            (Ok(()), None) => Outcome::Completed {
                result: reported.flatten(),
            },
        };
        // Only what is seen is built: a quiet, successful batch costs
        // neither spans nor events.
        if observed || !matches!(outcome, Outcome::Completed { .. }) {
            job_span(&job).in_scope(|| report(shared, &job, &outcome, observed));
        } else {
            tracing::debug!(job = job.id, "completed");
        }
    }
    board.recorded(n);
}

/// What became of the leases of a batch of completions that an earlier,
/// transiently failed try may have recorded (see [`settle`]).
#[derive(Default)]
struct Gone {
    /// Lost: their job was not completed under them.
    lost: Vec<Lease>,
    /// Not known to be recorded, and why: their job could not be read, or
    /// the last try failed and the job shows no completion.
    unrecorded: Vec<(Lease, String)>,
}

/// Reads the jobs of `leases`, whose completion an earlier try may have
/// recorded, its reply lost: those it completed are recorded. Of the rest,
/// with `failure` (the last try failed), none is; without (the last try
/// found their leases gone), each is lost.
async fn settle(backend: &dyn Backend, leases: Vec<Lease>, failure: Option<&Error>) -> Gone {
    let read: Vec<(Lease, Result<Option<JobStatus>, Error>)> = futures::stream::iter(leases)
        .map(|lease| async move { (lease, effect(backend, &lease, None).await) })
        .buffered(READS_AT_ONCE)
        .collect()
        .await;
    let mut gone = Gone::default();
    for (lease, status) in read {
        match (status, failure) {
            (Ok(Some(JobStatus::Done)), _) => {}
            (Ok(_), None) => gone.lost.push(lease),
            (Ok(_), Some(failure)) => gone.unrecorded.push((lease, failure.to_string())),
            (Err(e), _) => gone.unrecorded.push((lease, e.to_string())),
        }
    }
    gone
}

/// How many jobs [`settle`] reads at once.
const READS_AT_ONCE: usize = 8;

/// Makes a message storable: NUL (which PostgreSQL's `text` rejects) becomes
/// U+FFFD, and the length is capped at [`MAX_ERROR_LEN`] bytes.
pub(crate) fn sanitize(message: &str) -> String {
    let mut clean = message.replace('\0', "\u{FFFD}");
    if clean.len() > MAX_ERROR_LEN {
        let mut cut = MAX_ERROR_LEN - '…'.len_utf8();
        while !clean.is_char_boundary(cut) {
            cut -= 1;
        }
        clean.truncate(cut);
        clean.push('…');
    }
    clean
}

/// `call`, a call into the backend named `what`, with a panic in it (a
/// backend's bug) turned into the call's failure: the task that made it
/// (a lane, the pull loop, the keeper) goes on.
pub(crate) async fn contained<T>(
    what: &str,
    call: impl Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    AssertUnwindSafe(call)
        .catch_unwind()
        .await
        .unwrap_or_else(|panic| {
            Err(Error::backend(format!(
                "the backend's {what} panicked: {}",
                panic_message(&*panic)
            )))
        })
}

/// The text of a panic payload.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "a non-string panic payload".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitize_replaces_nul_and_caps_length() {
        assert_eq!(sanitize("a\0b"), "a\u{FFFD}b");
        let long = "é".repeat(MAX_ERROR_LEN);
        let cut = sanitize(&long);
        assert!(cut.len() <= MAX_ERROR_LEN);
        assert!(cut.ends_with('…'));
        assert!(crate::job::check_text("error", &cut).is_ok());
        assert_eq!(sanitize("fine"), "fine");
    }

    #[test]
    fn panic_messages() {
        let p = std::panic::catch_unwind(|| panic!("boom {}", 7)).unwrap_err();
        assert_eq!(panic_message(&*p), "boom 7");
        let p = std::panic::catch_unwind(|| panic!("static")).unwrap_err();
        assert_eq!(panic_message(&*p), "static");
        let p = std::panic::catch_unwind(|| std::panic::panic_any(5_u8)).unwrap_err();
        assert_eq!(panic_message(&*p), "a non-string panic payload");
    }
}
