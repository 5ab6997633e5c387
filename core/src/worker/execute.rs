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
use tracing::Instrument;

use super::board::Board;
use super::events::{Event, JobInfo, Outcome, Subscription};
use super::handler::{Entry, HandlerError, JobContext, Phase, RunFuture, WorkerView};
use super::keeper::{Hold, LeaseWatch, WatchRef};
use super::slots::Slot;
use crate::error::Error;
use crate::job::{Job, MAX_DELAY};
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
        /// What the contexts of the runner's jobs see of the worker.
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

/// A job's run, begun: its handler has been polled once.
pub(crate) enum Begun<F> {
    /// The run ended at that poll: on a started worker, the handler
    /// returned at once and its completion was handed on to be recorded
    /// with others.
    Ended(Ended),
    /// The rest of the run: the handler still running, or its outcome to
    /// record, then report.
    Running(F),
}

/// What is left of a run after its handler's first poll.
enum Rest<'a, S> {
    /// The handler has not returned.
    Running(&'a Entry<S>, RunFuture),
    /// The attempt is over; its outcome is to be recorded.
    Done(&'a Entry<S>, Attempt),
    /// The handler succeeded, and no batcher takes its completion (an
    /// inline run, or the batcher is gone): it is recorded here.
    Complete(Completion),
    /// The job cannot run (no handler for its kind, or a payload its
    /// handler cannot decode): it is killed with this error.
    Unrunnable(String),
}

/// Runs one leased job to an outcome and reports it (the test mode's
/// inline runs, and a lane's runs beyond those it begins in place): see
/// [`begin`].
pub(crate) async fn execute<S: Send + Sync + 'static>(
    shared: &Shared<S>,
    lease: Lease,
    job: Arc<Job>,
    mode: Mode<'_, S>,
) -> Ended {
    let mut job = Some((job, mode));
    let begun = std::future::poll_fn(|cx| {
        let (job, mode) = job.take().expect("polled once: it is ready at once");
        Poll::Ready(begin(shared, lease, job, mode, cx))
    })
    .await;
    match begun {
        Begun::Ended(ended) => ended,
        Begun::Running(rest) => rest.await,
    }
}

/// Begins the run of one leased job with `cx`: dispatches it, decodes its
/// payload and polls its handler once. On a started worker, a handler that
/// returns at that poll (most quick jobs) ends the run there, its
/// completion handed on to be recorded with others, without the future
/// the rest of a run takes: building it, allocating it and moving it
/// there cost about a tenth of a quick job on the memory store
/// (measured). Every other run goes on in the returned future.
///
/// The job comes behind an `Arc` rather than by value: a started worker
/// keeps one such future per running job, and a smaller one is cheaper to
/// allocate and move. It borrows what the worker shares rather than
/// holding a count on it: runners on other threads would otherwise
/// contend for that count's cache line on every job. Keep it under about
/// 1 KiB: glibc's malloc serves larger blocks by sorting its free lists on
/// every allocation; at 1,120 bytes the memory backend processed 18% fewer
/// jobs per second.
pub(crate) fn begin<'a, S: Send + Sync + 'static>(
    shared: &'a Shared<S>,
    lease: Lease,
    job: Arc<Job>,
    mode: Mode<'a, S>,
    cx: &mut Context<'_>,
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
    let first = span.in_scope(|| {
        if observed {
            shared.emit(Event::Started {
                job: JobInfo::from(&*job),
            });
        }
        tracing::debug!("started");
        first_poll(shared, &job, lease, view, hold.as_ref(), cx)
    });
    let rest = match (first, worker) {
        (Rest::Done(_, Attempt::Succeeded(result)), Some(started))
            if check_result(result.as_ref()).is_ok() =>
        {
            // The handler is done; only the acknowledgement is left.
            drop(slot.take());
            let completion = Completion { lease, result };
            match hand_on(shared, started, &job, completion, &mut hold) {
                Ok(ended) => return Begun::Ended(ended),
                Err(completion) => Rest::Complete(completion),
            }
        }
        (rest, _) => rest,
    };
    let run = async move {
        let ended = finish(shared, &job, lease, rest, worker, slot, hold).await;
        if let Ended::Recorded(outcome) = &ended {
            report(shared, &job, outcome, observed);
        }
        ended
    };
    Begun::Running(run.instrument(span))
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

/// Dispatches `job`, decodes its payload and polls its handler once.
fn first_poll<'a, S: Send + Sync + 'static>(
    shared: &'a Shared<S>,
    job: &Arc<Job>,
    lease: Lease,
    view: Option<&Arc<WorkerView<S>>>,
    hold: Option<&Hold>,
    cx: &mut Context<'_>,
) -> Rest<'a, S> {
    let Some(entry) = shared.handlers.get(job.kind.as_str()) else {
        let mut kinds: Vec<&str> = shared.handlers.keys().map(String::as_str).collect();
        kinds.sort_unstable();
        return Rest::Unrunnable(format!(
            "no handler is registered for kind {:?} (this worker handles {kinds:?})",
            job.kind
        ));
    };
    let lease_watch = match hold {
        Some(hold) => hold.watch.clone(),
        None => WatchRef::alone(
            lease,
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
    let ctx = JobContext::new(Arc::clone(job), lease, lease_watch, view);
    // Decoding the payload, building the handler's future and polling it
    // run user code: a panic in any is the attempt's.
    let started = std::panic::catch_unwind(AssertUnwindSafe(|| (entry.run)(&job.payload, ctx)));
    let mut run = match started {
        Err(panic) => return Rest::Done(entry, Attempt::Panicked(panic_message(&*panic))),
        Ok(Err(unusable)) => return Rest::Unrunnable(unusable),
        Ok(Ok(run)) => run,
    };
    match std::panic::catch_unwind(AssertUnwindSafe(|| run.as_mut().poll(cx))) {
        Ok(Poll::Pending) => Rest::Running(entry, run),
        Ok(Poll::Ready(returned)) => Rest::Done(entry, Attempt::of(Ok(returned))),
        Err(panic) => Rest::Done(entry, Attempt::of(Err(panic))),
    }
}

/// Hands a started worker's completion on without waiting: to its lane on
/// a backend with instant writes, else to the batcher. Gives it back if
/// the batcher is gone (`hold` then holds the lease again).
fn hand_on<S>(
    shared: &Shared<S>,
    started: &Started,
    job: &Arc<Job>,
    completion: Completion,
    hold: &mut Option<Hold>,
) -> Result<Ended, Completion> {
    if shared.instant_writes {
        let ack = ack(shared, started, completion, Arc::clone(job), hold.take());
        return Ok(Ended::Completed(ack));
    }
    match hand(shared, started, completion, Arc::clone(job), hold.take()) {
        Ok(()) => Ok(Ended::Handed),
        Err(ack) => {
            *hold = ack.hold;
            Err(ack.completion)
        }
    }
}

/// The rest of a run begun by [`begin`]: the handler run to its end, then
/// its outcome recorded.
async fn finish<S: Send + Sync + 'static>(
    shared: &Shared<S>,
    job: &Arc<Job>,
    lease: Lease,
    rest: Rest<'_, S>,
    worker: Option<&Started>,
    slot: Option<Slot>,
    mut hold: Option<Hold>,
) -> Ended {
    let backend = &*shared.backend;
    let (entry, attempt) = match rest {
        Rest::Unrunnable(error) => {
            return Ended::Recorded(record_kill(backend, &lease, error).await);
        }
        Rest::Complete(completion) => {
            drop(slot);
            return Ended::Recorded(record_here(shared, worker, completion, hold).await);
        }
        Rest::Done(entry, attempt) => (entry, attempt),
        Rest::Running(entry, run) => {
            let timeout = entry.timeout.or(shared.config.timeout);
            let attempt = match (worker, &hold) {
                (Some(worker), Some(hold)) => {
                    run_spawned(run, timeout, &hold.watch, &worker.phase).await
                }
                _ => run_inline(run, timeout).await,
            };
            (entry, attempt)
        }
    };
    // The handler is done; only the acknowledgement is left.
    drop(slot);

    let outcome = match attempt {
        Attempt::Succeeded(result) => match check_result(result.as_ref()) {
            Ok(()) => {
                let completion = Completion { lease, result };
                let completion = match worker {
                    Some(worker) => match hand_on(shared, worker, job, completion, &mut hold) {
                        Ok(ended) => return ended,
                        Err(completion) => completion,
                    },
                    None => completion,
                };
                record_here(shared, worker, completion, hold).await
            }
            Err(e) => {
                let error =
                    HandlerError::new(format!("the handler's result cannot be stored: {e}"));
                record_failure(shared, entry, job, lease, error).await
            }
        },
        Attempt::Failed(error) => record_failure(shared, entry, job, lease, error).await,
        Attempt::Panicked(message) => {
            let error = HandlerError::new(format!("the handler panicked: {message}"));
            record_failure(shared, entry, job, lease, error).await
        }
        Attempt::TimedOut(after) => {
            let error = HandlerError::new(format!("the handler timed out after {after:?}"));
            record_failure(shared, entry, job, lease, error).await
        }
        Attempt::LeaseLost => Outcome::LeaseLost,
        Attempt::Abandoned => match backend.release(&lease).await {
            Ok(()) => Outcome::Released,
            Err(e) => unrecorded(e),
        },
    };
    Ended::Recorded(outcome)
}

/// Records a completion no batcher takes (see [`Rest::Complete`]); lets
/// the lease go after.
async fn record_here<S>(
    shared: &Shared<S>,
    worker: Option<&Started>,
    completion: Completion,
    hold: Option<Hold>,
) -> Outcome {
    // The outcome's copy of the result: for the test mode's report, or for
    // whoever listens.
    let keep = worker.is_none() || shared.is_observed();
    let outcome = complete(&*shared.backend, completion, keep).await;
    // Renewed until recorded.
    drop(hold);
    outcome
}

async fn run_inline(fut: RunFuture, timeout: Option<Duration>) -> Attempt {
    let run = AssertUnwindSafe(fut).catch_unwind();
    let finished = match timeout {
        None => run.await,
        Some(limit) => match tokio::time::timeout(limit, run).await {
            Ok(finished) => finished,
            Err(_) => return Attempt::TimedOut(limit),
        },
    };
    Attempt::of(finished)
}

/// Runs a handler until it returns, times out, loses its lease (the
/// keeper found it taken) or is abandoned at the shutdown deadline; the
/// last three drop the handler's future, stopping it.
async fn run_spawned(
    fut: RunFuture,
    timeout: Option<Duration>,
    lease: &LeaseWatch,
    phase: &watch::Receiver<Phase>,
) -> Attempt {
    // A panic is caught here, so the lane's other jobs go on; a handler
    // that blocks its thread delays no lease's renewal (the keeper renews
    // them from its own task).
    let run = AssertUnwindSafe(fut).catch_unwind();
    // Boxed: a timer is large, and most jobs have no timeout.
    let expiry = async {
        match timeout {
            Some(limit) => Box::pin(tokio::time::sleep(limit)).await,
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
    // The handler first: one that is done at its first poll (most quick
    // jobs) ends the run before the other three are ever polled, so they
    // register no waker. The timeout and the shutdown deadline are exempt
    // from Tokio's cooperative budget: polled after a handler that spends
    // the lane's whole budget on every poll (a loop over ready I/O, say),
    // a budgeted timer would never fire. Each resolves once, so it cannot
    // hog the lane. (`lost` takes no budget.) A handler done as its lease
    // is lost or its time is up keeps its result; its completion is then
    // fenced by the store.
    tokio::select! {
        biased;
        finished = run => Attempt::of(finished),
        () = lease.lost() => Attempt::LeaseLost,
        () = tokio::task::unconstrained(expiry) => Attempt::TimedOut(timeout.unwrap_or_default()),
        () = tokio::task::unconstrained(abandoned) => Attempt::Abandoned,
    }
}

async fn record_failure<S>(
    shared: &Shared<S>,
    entry: &Entry<S>,
    job: &Job,
    lease: Lease,
    failure: HandlerError,
) -> Outcome {
    let error = sanitize(failure.message());
    if failure.is_permanent() {
        return record_kill(&*shared.backend, &lease, error).await;
    }
    let delay = failure.retry_delay().unwrap_or_else(|| {
        entry
            .retry
            .as_ref()
            .unwrap_or(&shared.config.retry)
            .delay(job, job.attempts)
    });
    let backend_delay = time::Duration::try_from(delay)
        .unwrap_or(MAX_DELAY)
        .min(MAX_DELAY);
    match shared.backend.retry(&lease, backend_delay, &error).await {
        Ok(crate::job::JobStatus::Dead) => Outcome::Dead { error },
        Ok(_) => Outcome::Retrying { error, delay },
        Err(e) => unrecorded(e),
    }
}

async fn record_kill(backend: &dyn Backend, lease: &Lease, error: String) -> Outcome {
    let error = sanitize(&error);
    match backend.kill(lease, &error).await {
        Ok(()) => Outcome::Dead { error },
        Err(e) => unrecorded(e),
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
async fn complete(backend: &dyn Backend, completion: Completion, keep_result: bool) -> Outcome {
    let kept = if keep_result {
        completion.result.clone()
    } else {
        None
    };
    match backend.complete(&completion.lease, completion.result).await {
        Ok(()) => Outcome::Completed { result: kept },
        Err(e) => unrecorded(e),
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
/// store each waits for its commit to reach disk; overlapping a few lets
/// the database flush them together instead of one after another.
const ACK_BATCHES_AT_ONCE: usize = 4;

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
    let recorded = shared.backend.complete_batch(completions).await;
    for (lease, job, reported, hold) in rest {
        // Recorded (or given up on): the lease is let go.
        drop(hold);
        // Also told to whoever subscribed since the handler returned (a
        // `wait_for` that read the job as still processing).
        let observed = reported.is_some() || shared.is_observed();
        let outcome = match &recorded {
            Ok(lost) if lost.contains(&lease) => Outcome::LeaseLost,
            Ok(_) => Outcome::Completed {
                result: reported.flatten(),
            },
            Err(e) => Outcome::Unrecorded {
                error: e.to_string(),
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
