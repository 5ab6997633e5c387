//! The worker runtime: typed handlers registered by kind, run with bounded
//! concurrency on any [`Backend`].
//!
//! - [`JobType`] names a payload type's kind; [`Handler`] (or a closure)
//!   runs it, made fresh for every job, with the worker's shared state in
//!   its [`JobContext`].
//! - [`WorkerBuilder`] sets queues, concurrency, lease length, poll
//!   interval, timeouts and the [`RetryPolicy`], per
//!   kind where it matters.
//! - [`Worker::start`] runs it in the background until
//!   [`WorkerHandle::shutdown`]: batch pulls sized to the free slots plus an
//!   adaptive prefetch buffer ([`WorkerBuilder::prefetch`]), every held
//!   lease kept alive by a keeper task, wake-ups from
//!   [`Backend::subscribe`] with polling as the fallback, completions
//!   batched. On a backend with
//!   [`Capabilities::instant_writes`](crate::Capabilities::instant_writes)
//!   completions are recorded by their lane as handlers return (those
//!   that end in the same turn together), and the
//!   worker runs one pull loop per runtime thread, each with its share of
//!   the concurrency, so that all threads do work; a push wakes a task
//!   that pulls the job and runs it at once, not a pull loop that would
//!   hand it on.
//! - [`Worker::run_until_idle`] runs every due job in the calling task,
//!   deterministically: the test mode.
//!
//! ```
//! use std::sync::Arc;
//! use relayq_core::{Backend, HandlerError, JobType, Worker};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize)]
//! struct SendEmail { to: String }
//! impl JobType for SendEmail { const KIND: &'static str = "send_email"; }
//!
//! struct App { sender: String }
//!
//! # async fn example(backend: Arc<dyn Backend>) -> relayq_core::Result<()> {
//! let worker = Worker::builder(backend.clone())
//!     .state(App { sender: "noreply@example.com".into() })
//!     .concurrency(16)
//!     .handle(|email: SendEmail, ctx| async move {
//!         if email.to.is_empty() {
//!             return Err(HandlerError::permanent("no recipient"));
//!         }
//!         Ok(format!("{} -> {}", ctx.state().sender, email.to))
//!     })
//!     .build()?;
//!
//! let id = backend.push(SendEmail { to: "ada@example.com".into() }.to_job()).await?.id();
//! let running = worker.start();
//! let job = running.wait_for(id).await?;
//! println!("{id}: {:?} {:?}", job.status, job.result);
//! running.shutdown().await;
//! # Ok(())
//! # }
//! ```

mod board;
mod buffer;
mod events;
mod execute;
mod handler;
mod keeper;
mod persist;
mod prefetch;
mod runner;
mod signals;
mod slots;
mod stock;

use std::any::TypeId;
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use rustc_hash::FxHashMap;
use serde::Serialize;
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

pub use events::{Event, EventStream, JobInfo, Outcome};
pub use handler::{Handler, HandlerError, JobContext, JobType};
pub use runner::ShutdownReport;

use execute::{Config, Ended, Hook, Mode, Shared, contained, execute};
use handler::{Entry, TypeOf};

use crate::error::{Error, Result};
use crate::job::{Job, JobId, check_max_attempts, check_name};
use crate::lease::{Lease, check_lease};
use crate::request::{MAX_PULL_BATCH, MAX_PULL_QUEUES, PullRequest, check_queue_names};
use crate::retry::RetryPolicy;
use crate::store::Backend;

/// Runs typed handlers for jobs of a [`Backend`]. Cheap to clone: clones
/// share handlers, state and events.
///
/// Build one with [`Worker::builder`]; then either [`start`](Self::start)
/// it in the background, or drive it with
/// [`run_until_idle`](Self::run_until_idle) in tests.
pub struct Worker<S = ()> {
    shared: Arc<Shared<S>>,
}

impl<S> Clone for Worker<S> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<S> fmt::Debug for Worker<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.shared.fmt(f)
    }
}

impl Worker<()> {
    /// A builder for a worker on `backend`, with no shared state yet (set
    /// one with [`WorkerBuilder::state`]).
    pub fn builder(backend: Arc<dyn Backend>) -> WorkerBuilder<()> {
        WorkerBuilder::new(backend, Arc::new(()))
    }
}

impl<S: Send + Sync + 'static> Worker<S> {
    /// The backend it runs jobs of.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.shared.backend
    }

    /// The queues it pulls from.
    pub fn queues(&self) -> &[String] {
        &self.shared.config.queues
    }

    /// The kinds it has handlers for, sorted.
    pub fn kinds(&self) -> Vec<&str> {
        let mut kinds: Vec<&str> = self.shared.handlers.keys().map(String::as_str).collect();
        kinds.sort_unstable();
        kinds
    }

    /// The state shared by its handlers.
    pub fn state(&self) -> &S {
        &self.shared.state
    }

    /// Subscribes to its events from now on (see also
    /// [`WorkerBuilder::on_event`]).
    pub fn events(&self) -> EventStream {
        EventStream::new(self.shared.subscribe())
    }

    /// Starts pulling and running jobs in a background task, until the
    /// returned handle is shut down (or dropped). Needs a Tokio runtime.
    ///
    /// Each call starts an independent runner with its own concurrency
    /// budget; one is the norm.
    #[must_use = "dropping the handle starts the worker's shutdown at once"]
    pub fn start(&self) -> WorkerHandle<S> {
        let (stop, stopped) = watch::channel(None);
        let task = tokio::spawn(runner::run_all(Arc::clone(&self.shared), stopped));
        WorkerHandle {
            worker: self.clone(),
            stop,
            task: Some(task),
        }
    }

    /// Runs until `signal` resolves (e.g. `tokio::signal::ctrl_c()`), then
    /// shuts down gracefully within the configured
    /// [`shutdown_timeout`](WorkerBuilder::shutdown_timeout).
    pub async fn run_until(&self, signal: impl Future<Output = ()>) -> ShutdownReport {
        let handle = self.start();
        signal.await;
        handle.shutdown().await
    }

    /// Test mode: runs every due job, one at a time, in the calling task,
    /// until a pull finds none; returns what each attempt came to.
    ///
    /// Deterministic: jobs run in pull order (priority, `run_at`, id); no
    /// timer runs but a configured handler timeout and the pauses before
    /// an outcome write that failed transiently is made again (both on
    /// Tokio's clock: moving a [`ManualClock`](crate::ManualClock) times
    /// out no handler); a job retried with a delay is not due again until
    /// the backend's clock (a `ManualClock` in tests) has moved past it
    /// (the default [`RetryPolicy`] jitters its delays: move the clock by
    /// [`RetryPolicy::ceiling`], or set [`Jitter::None`](crate::Jitter::None));
    /// jobs pushed by handlers run in the same call when due. Leases are
    /// not extended. Works on any backend. It yields to the runtime after
    /// each job, so a `tokio::time::timeout` around it ends even a run
    /// that never idles. Dropped before it returns (under a timeout, say),
    /// it stops the job it was running and
    /// gives it back, as a shutdown would, rather than leave it leased: on
    /// the memory backend before the drop returns, elsewhere from a
    /// spawned task (should the runtime end first, the job comes back when
    /// its lease ends). Dropped during its pull, it may leave the job that
    /// pull leased until its lease ends (see [`Puller::pull`](crate::Puller::pull)).
    pub async fn run_until_idle(&self) -> Result<IdleReport> {
        let request = PullRequest::queues(self.shared.config.queues.clone())
            .lease(self.shared.config.backend_lease)
            .batch(1);
        let mut report = IdleReport::default();
        loop {
            let Some(leased) = self.shared.backend.pull(&request).await?.pop() else {
                return Ok(report);
            };
            let info = JobInfo::from(&leased.job);
            let unfinished = GiveBackUnlessFinished {
                backend: Some(Arc::clone(&self.shared.backend)),
                lease: leased.lease,
            };
            let ended = execute(
                &self.shared,
                leased.lease,
                Arc::new(leased.job),
                Mode::Inline,
            )
            .await;
            unfinished.finished();
            let Ended::Recorded(outcome) = ended else {
                unreachable!("an inline run records its own outcome")
            };
            report.outcomes.push((info, outcome));
            // On the memory store nothing else in a run waits: without
            // this, a run that never idles (a job retried at once for
            // ever, a handler pushing a follow-up each run) would never
            // let a timeout around it fire.
            tokio::task::yield_now().await;
        }
    }

    /// Waits until job `id` is terminal (`Done`, `Dead` or `Cancelled`),
    /// whoever runs it, and returns it with its result or last error.
    /// [`Error::NotFound`] if there is no such job. Wrap it in
    /// `tokio::time::timeout` to bound the wait.
    pub async fn wait_for(&self, id: JobId) -> Result<Job> {
        let mut events = self.shared.subscribe();
        loop {
            let job = self
                .shared
                .backend
                .get(id)
                .await?
                .ok_or(Error::NotFound { id })?;
            if job.status.is_terminal() {
                return Ok(job);
            }
            // Until this worker reports the job finished, or the next poll
            // (another worker may run it).
            let poll = tokio::time::sleep(self.shared.config.poll_interval);
            tokio::pin!(poll);
            loop {
                tokio::select! {
                    event = events.rx.recv() => match event {
                        Ok(Event::Finished { job, outcome })
                            if job.id == id && outcome.is_terminal() => break,
                        Ok(_) => {}
                        Err(broadcast::error::RecvError::Lagged(_)) => break,
                        Err(broadcast::error::RecvError::Closed) => {
                            (&mut poll).await;
                            break;
                        }
                    },
                    () = &mut poll => break,
                }
            }
        }
    }
}

/// What [`Worker::run_until_idle`] ran: one entry per attempt, in order.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct IdleReport {
    /// Each attempt's job and outcome, in the order they ran.
    pub outcomes: Vec<(JobInfo, Outcome)>,
}

impl IdleReport {
    /// How many attempts ran.
    pub fn ran(&self) -> usize {
        self.outcomes.len()
    }

    /// How many ended `Done`.
    pub fn completed(&self) -> usize {
        self.count(|o| matches!(o, Outcome::Completed { .. }))
    }

    /// How many failed and wait for another attempt.
    pub fn retrying(&self) -> usize {
        self.count(|o| matches!(o, Outcome::Retrying { .. }))
    }

    /// How many ended `Dead`.
    pub fn dead(&self) -> usize {
        self.count(|o| matches!(o, Outcome::Dead { .. }))
    }

    fn count(&self, f: impl Fn(&Outcome) -> bool) -> usize {
        self.outcomes.iter().filter(|(_, o)| f(o)).count()
    }
}

/// A started worker. Shut it down with [`shutdown`](Self::shutdown);
/// dropping it starts the same graceful shutdown without waiting for it.
#[must_use = "dropping the handle starts the worker's shutdown at once"]
pub struct WorkerHandle<S = ()> {
    worker: Worker<S>,
    stop: watch::Sender<Option<Instant>>,
    task: Option<JoinHandle<ShutdownReport>>,
}

impl<S> fmt::Debug for WorkerHandle<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkerHandle")
            .field("worker", &self.worker)
            .field("stopping", &self.stop.borrow().is_some())
            .finish()
    }
}

impl<S: Send + Sync + 'static> WorkerHandle<S> {
    /// The worker it runs.
    pub fn worker(&self) -> &Worker<S> {
        &self.worker
    }

    /// Subscribes to the worker's events from now on.
    pub fn events(&self) -> EventStream {
        self.worker.events()
    }

    /// See [`Worker::wait_for`].
    pub async fn wait_for(&self, id: JobId) -> Result<Job> {
        self.worker.wait_for(id).await
    }

    /// Stops pulling, lets in-flight jobs finish within the configured
    /// [`shutdown_timeout`](WorkerBuilder::shutdown_timeout), releases the
    /// rest so another worker takes them at once, and returns what happened.
    ///
    /// Past that deadline, outcome writes and releases that fail
    /// transiently are not made again (a try already sent still waits for
    /// the store's answer, for at most the store's own timeouts): the jobs
    /// they were for come back when their leases end, as after a crash
    /// (the attempt spent; a job whose completion was not written runs
    /// again).
    pub async fn shutdown(self) -> ShutdownReport {
        let grace = self.worker.shared.config.shutdown_timeout;
        self.shutdown_within(grace).await
    }

    /// [`shutdown`](Self::shutdown) with this grace period instead.
    pub async fn shutdown_within(mut self, grace: Duration) -> ShutdownReport {
        self.request_stop(grace);
        let Some(task) = self.task.take() else {
            return ShutdownReport::default();
        };
        match task.await {
            Ok(report) => report,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // The runtime is shutting down under us.
            Err(_) => ShutdownReport::default(),
        }
    }
}

impl<S> WorkerHandle<S> {
    fn request_stop(&self, grace: Duration) {
        let deadline = after(Instant::now(), grace);
        self.stop.send_if_modified(|stop| {
            if stop.is_none() {
                *stop = Some(deadline);
                true
            } else {
                false
            }
        });
    }
}

impl<S> Drop for WorkerHandle<S> {
    fn drop(&mut self) {
        if self.task.is_some() {
            self.request_stop(self.worker.shared.config.shutdown_timeout);
        }
    }
}

/// Configures a [`Worker`]: handlers, queues, concurrency, leases, polling,
/// retries, timeouts, shutdown and event hooks.
///
/// Defaults: the queues of the registered kinds' [`JobType::QUEUE`]s,
/// concurrency 10, an adaptive prefetch buffer of at most 1,024 jobs, lease 30 s, poll every 1 s, [`RetryPolicy::default`], no
/// timeout, 25 s to shut down.
pub struct WorkerBuilder<S = ()> {
    backend: Arc<dyn Backend>,
    state: Arc<S>,
    handlers: Vec<(&'static str, Entry<S>)>,
    queues: Option<Vec<String>>,
    concurrency: u32,
    prefetch: u32,
    lease: Duration,
    poll_interval: Duration,
    retry: RetryPolicy,
    retry_for: HashMap<TypeId, (&'static str, TypeOf, RetryPolicy)>,
    timeout: Option<Duration>,
    timeout_for: HashMap<TypeId, (&'static str, TypeOf, Duration)>,
    shutdown_timeout: Duration,
    hooks: Vec<Hook>,
}

impl<S> fmt::Debug for WorkerBuilder<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kinds: Vec<&str> = self.handlers.iter().map(|(k, _)| *k).collect();
        f.debug_struct("WorkerBuilder")
            .field("backend", &self.backend)
            .field("kinds", &kinds)
            .field("queues", &self.queues)
            .field("concurrency", &self.concurrency)
            .field("prefetch", &self.prefetch)
            .field("lease", &self.lease)
            .field("poll_interval", &self.poll_interval)
            .field("retry", &self.retry)
            .field("timeout", &self.timeout)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .finish_non_exhaustive()
    }
}

impl<S: Send + Sync + 'static> WorkerBuilder<S> {
    /// The default number of jobs run at once.
    pub const DEFAULT_CONCURRENCY: u32 = 10;
    /// The default bound of the prefetch buffer.
    pub const DEFAULT_PREFETCH: u32 = 1024;
    /// The most finished jobs that wait for their outcome to be recorded
    /// by the completion batcher (a backend with
    /// [`instant_writes`](crate::Capabilities::instant_writes) records each
    /// at once, in its lane). Their leases are renewed while they wait,
    /// and count toward those a worker may hold: a started worker holds at
    /// most `concurrency + prefetch + MAX_AWAITING_ACK` leases, buffered,
    /// running or awaiting their record, and pulls no more while it holds
    /// that many. (On
    /// a backend with instant writes a started worker runs a runner per
    /// runtime thread, each bounded alike by its share of the concurrency
    /// and prefetch plus this many, so the bound is this many per runner;
    /// their lanes record completions as they come, so few ever wait.)
    pub const MAX_AWAITING_ACK: u32 = 512;
    /// The default lease length.
    pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);
    /// The shortest lease a worker accepts: it renews every third of it.
    pub const MIN_LEASE: Duration = Duration::from_millis(100);
    /// The default poll interval.
    pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);
    /// The default time in-flight jobs get to finish at shutdown: 25 s,
    /// leaving room for the releases that follow within the 30 s that
    /// Kubernetes (`terminationGracePeriodSeconds`) and Heroku give a
    /// process between its SIGTERM and its SIGKILL.
    pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(25);

    fn new(backend: Arc<dyn Backend>, state: Arc<S>) -> Self {
        Self {
            backend,
            state,
            handlers: Vec::new(),
            queues: None,
            concurrency: Self::DEFAULT_CONCURRENCY,
            prefetch: Self::DEFAULT_PREFETCH,
            lease: Self::DEFAULT_LEASE,
            poll_interval: Self::DEFAULT_POLL_INTERVAL,
            retry: RetryPolicy::default(),
            retry_for: HashMap::new(),
            timeout: None,
            timeout_for: HashMap::new(),
            shutdown_timeout: Self::DEFAULT_SHUTDOWN_TIMEOUT,
            hooks: Vec::new(),
        }
    }

    /// Shares `state` (a pool, a client, configuration) with every handler
    /// registered after this call, through [`JobContext::state`]. Handlers
    /// registered before keep the state they were registered with.
    pub fn state<T: Send + Sync + 'static>(self, state: T) -> WorkerBuilder<T> {
        let old = self.state;
        WorkerBuilder {
            backend: self.backend,
            state: Arc::new(state),
            handlers: self
                .handlers
                .into_iter()
                .map(|(kind, entry)| (kind, entry.adapt(Arc::clone(&old))))
                .collect(),
            queues: self.queues,
            concurrency: self.concurrency,
            prefetch: self.prefetch,
            lease: self.lease,
            poll_interval: self.poll_interval,
            retry: self.retry,
            retry_for: self.retry_for,
            timeout: self.timeout,
            timeout_for: self.timeout_for,
            shutdown_timeout: self.shutdown_timeout,
            hooks: self.hooks,
        }
    }

    /// Registers a closure for the job type named by its first argument's
    /// type. It is called once per job, so each run gets its own future
    /// and state is shared only through the context. Returning a value
    /// stores it as the job's result; `Err` (or a panic) fails the attempt.
    /// A value no store can keep (one that does not serialize to JSON, or
    /// holds a NUL character or nests deeper than
    /// [`MAX_JSON_DEPTH`](crate::MAX_JSON_DEPTH)) makes the job `Dead` at
    /// once: its work is done, and another attempt would only do it again.
    ///
    /// ```
    /// # use relayq_core::{HandlerError, JobType, Worker};
    /// # use serde::{Deserialize, Serialize};
    /// #[derive(Serialize, Deserialize)]
    /// struct Add { a: i64, b: i64 }
    /// impl JobType for Add { const KIND: &'static str = "add"; }
    ///
    /// # fn f(backend: std::sync::Arc<dyn relayq_core::Backend>) {
    /// let builder = Worker::builder(backend)
    ///     .handle(|job: Add, _ctx| async move { Ok::<_, HandlerError>(job.a + job.b) });
    /// # let _ = builder;
    /// # }
    /// ```
    pub fn handle<J, F, Fut, R>(mut self, f: F) -> Self
    where
        J: JobType,
        F: Fn(J, JobContext<S>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, HandlerError>> + Send + 'static,
        R: Serialize,
    {
        self.handlers.push((J::KIND, Entry::from_fn(f)));
        self
    }

    /// Registers a [`Handler`] type; `make` builds a fresh value of it for
    /// every job, from the shared state (`|_| MyHandler::default()` when it
    /// needs none).
    pub fn handler<H, F>(mut self, make: F) -> Self
    where
        H: Handler<S>,
        F: Fn(&S) -> H + Send + Sync + 'static,
    {
        self.handlers
            .push((H::Job::KIND, Entry::from_handler::<H, F>(make)));
        self
    }

    /// Pulls from `queue`, besides the queues named so far. Naming any queue
    /// replaces the default (the registered kinds' queues): name those too
    /// if the worker is to pull from them.
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queues.get_or_insert_with(Vec::new).push(queue.into());
        self
    }

    /// Pulls from exactly these queues.
    pub fn queues<Q: Into<String>>(mut self, queues: impl IntoIterator<Item = Q>) -> Self {
        self.queues = Some(queues.into_iter().map(Into::into).collect());
        self
    }

    /// The most jobs run at once (1 to [`MAX_PULL_BATCH`]). Each pull asks
    /// for as many jobs as there are free slots, plus what the prefetch
    /// buffer lacks ([`prefetch`](Self::prefetch)).
    pub fn concurrency(mut self, concurrency: u32) -> Self {
        self.concurrency = concurrency;
        self
    }

    /// The most leased jobs kept waiting for a free slot (0 to
    /// [`MAX_PULL_BATCH`]; [`Self::DEFAULT_PREFETCH`] by default).
    ///
    /// A pull costs a round trip, so a worker whose handlers are quick
    /// keeps a buffer of leased jobs to start while its next pull is under
    /// way, instead of leaving its slots idle. The buffer's depth adapts:
    /// the jobs the handlers start during about two pulls' round trips, up
    /// to this bound. Handlers much slower than a round trip get no buffer;
    /// once the oldest buffered job has waited a
    /// [poll interval](Self::poll_interval) behind slow ones that took
    /// every slot (seen at the next poll: within two), the whole buffer is
    /// given back, for any worker with a free slot. So one
    /// worker does not hoard jobs while another idles. Buffered leases are renewed like running ones, and
    /// given back at once on shutdown. 0 pulls only for free slots.
    pub fn prefetch(mut self, limit: u32) -> Self {
        self.prefetch = limit;
        self
    }

    /// How long each lease lasts (at least [`Self::MIN_LEASE`]); while a
    /// handler runs the lease is renewed every third of this, so a job that
    /// runs longer is not leased to another worker (as long as its handler
    /// yields: one that blocks its thread is stopped only at its next
    /// `.await`, and handlers blocking every runtime thread hold up the
    /// renewals too). Shorter leases bring a crashed worker's jobs back
    /// sooner.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// How often to look for due jobs when no wake-up came (delayed jobs and
    /// retries become due silently; backends without wake-ups rely on it),
    /// and how long a buffered job may wait for a slot before it is given
    /// back (see [`prefetch`](Self::prefetch)).
    pub fn poll_interval(mut self, every: Duration) -> Self {
        self.poll_interval = every;
        self
    }

    /// The retry policy for kinds without their own.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// The retry policy for jobs of type `J`, a type with a handler
    /// ([`Self::build`] refuses another, one of the same kind included).
    pub fn retry_for<J: JobType>(mut self, policy: RetryPolicy) -> Self {
        let job_type = TypeOf::of::<J>();
        self.retry_for
            .insert(job_type.id, (J::KIND, job_type, policy));
        self
    }

    /// The longest a handler may run before its attempt fails, for kinds
    /// without their own. None by default: a started worker logs a
    /// warning naming a job whose handler has none and is still running
    /// once it has held the job for ten minutes since its pull, and again
    /// each time that time doubles (seen when its lease keeper looks, every
    /// twelfth of a lease).
    pub fn timeout(mut self, limit: Duration) -> Self {
        self.timeout = Some(limit);
        self
    }

    /// The longest a handler for `J` may run before its attempt fails; `J`
    /// must have a handler, as for [`Self::retry_for`].
    pub fn timeout_for<J: JobType>(mut self, limit: Duration) -> Self {
        let job_type = TypeOf::of::<J>();
        self.timeout_for
            .insert(job_type.id, (J::KIND, job_type, limit));
        self
    }

    /// How long [`WorkerHandle::shutdown`] lets in-flight jobs finish before
    /// releasing them ([`Self::DEFAULT_SHUTDOWN_TIMEOUT`] by default). Keep
    /// it a few seconds below the time the process is given to exit after
    /// its stop signal (an orchestrator's grace period), so that the jobs
    /// still running are released, not abandoned with their leases.
    pub fn shutdown_timeout(mut self, grace: Duration) -> Self {
        self.shutdown_timeout = grace;
        self
    }

    /// Calls `hook` on every event: in the task that runs the job, but for
    /// completions recorded in batches (on a backend without
    /// [`instant_writes`](crate::Capabilities::instant_writes)), whose
    /// events come from the worker's completion task once recorded. Keep
    /// it quick (a slow hook there holds up the next batch); a panic in it
    /// is logged and ignored.
    pub fn on_event(mut self, hook: impl Fn(&Event) + Send + Sync + 'static) -> Self {
        self.hooks.push(Arc::new(hook));
        self
    }

    /// Checks the configuration and builds the worker. Every mistake is an
    /// [`Error::InvalidInput`] naming the setting: no handler, two handlers
    /// for one kind, a type whose `MAX_ATTEMPTS` is below 1, a per-type
    /// setting for a type with no handler (another type of the same kind
    /// does not count), bad
    /// queue names, concurrency out of range, a lease out of range, a zero
    /// poll interval or timeout, a retry policy [`RetryPolicy::check`]
    /// refuses.
    pub fn build(self) -> Result<Worker<S>> {
        if self.handlers.is_empty() {
            return Err(Error::invalid(
                "handlers",
                "register at least one with handle() or handler()",
            ));
        }
        let mut handlers: FxHashMap<String, Entry<S>> = FxHashMap::default();
        for (kind, entry) in self.handlers {
            check_name("kind", kind)?;
            // Every `to_job` push of the type would be refused.
            if let Err(Error::InvalidInput { reason, .. }) = check_max_attempts(entry.max_attempts)
            {
                let name = entry.job_type.name;
                return Err(Error::invalid(
                    "max_attempts",
                    format!("{name}::MAX_ATTEMPTS {reason}"),
                ));
            }
            if handlers.insert(kind.to_owned(), entry).is_some() {
                return Err(Error::invalid(
                    "kind",
                    format!("two handlers are registered for kind {kind:?}"),
                ));
            }
        }
        self.retry.check("retry")?;
        for (kind, job_type, policy) in self.retry_for.into_values() {
            policy.check("retry_for")?;
            handler_for(&mut handlers, "retry_for", kind, job_type)?.retry = Some(policy);
        }
        for (kind, job_type, limit) in self.timeout_for.into_values() {
            check_positive("timeout_for", limit)?;
            handler_for(&mut handlers, "timeout_for", kind, job_type)?.timeout = Some(limit);
        }
        let queues = match self.queues {
            Some(queues) => queues,
            None => {
                let mut queues: Vec<String> =
                    handlers.values().map(|e| e.queue.to_owned()).collect();
                queues.sort();
                queues.dedup();
                queues
            }
        };
        if queues.is_empty() || queues.len() > MAX_PULL_QUEUES {
            return Err(Error::invalid(
                "queues",
                format!("name 1 to {MAX_PULL_QUEUES} queues, got {}", queues.len()),
            ));
        }
        check_queue_names(&queues)?;
        if !(1..=MAX_PULL_BATCH).contains(&self.concurrency) {
            return Err(Error::invalid(
                "concurrency",
                format!("must be 1 to {MAX_PULL_BATCH}, got {}", self.concurrency),
            ));
        }
        if self.prefetch > MAX_PULL_BATCH {
            return Err(Error::invalid(
                "prefetch",
                format!("must be 0 to {MAX_PULL_BATCH}, got {}", self.prefetch),
            ));
        }
        if self.lease < Self::MIN_LEASE {
            return Err(Error::invalid(
                "lease",
                format!(
                    "must be at least {:?}, got {:?}",
                    Self::MIN_LEASE,
                    self.lease
                ),
            ));
        }
        let backend_lease = time::Duration::try_from(self.lease)
            .map_err(|e| Error::invalid("lease", e.to_string()))?;
        check_lease("lease", backend_lease)?;
        check_positive("poll_interval", self.poll_interval)?;
        if let Some(limit) = self.timeout {
            check_positive("timeout", limit)?;
        }
        let mut untimed_kinds = Vec::new();
        for entry in handlers.values_mut() {
            if entry.timeout.or(self.timeout).is_none() {
                untimed_kinds.push(entry.kind);
                entry.untimed = untimed_kinds.len() as u32;
            }
        }
        let (events, _) = broadcast::channel(EventStream::CAPACITY);
        Ok(Worker {
            shared: Arc::new(Shared {
                instant_writes: self.backend.capabilities().instant_writes,
                backend: self.backend,
                handlers,
                state: self.state,
                config: Config {
                    queues,
                    concurrency: self.concurrency,
                    prefetch: self.prefetch,
                    lease: self.lease,
                    backend_lease,
                    poll_interval: self.poll_interval,
                    retry: self.retry,
                    timeout: self.timeout,
                    shutdown_timeout: self.shutdown_timeout,
                    untimed_kinds: untimed_kinds.into(),
                },
                events,
                listeners: Arc::default(),
                hooks: self.hooks,
            }),
        })
    }
}

/// Releases a lease run inline unless its run finished: dropped with the
/// run (the caller stopped waiting), it gives the job back, fenced like
/// any release (a no-op if the outcome was recorded): at once where the
/// release needs no wait (the memory backend), so the caller's next call
/// finds the job, else from a task of its own.
struct GiveBackUnlessFinished {
    backend: Option<Arc<dyn Backend>>,
    lease: Lease,
}

impl GiveBackUnlessFinished {
    fn finished(mut self) {
        self.backend = None;
    }
}

impl Drop for GiveBackUnlessFinished {
    fn drop(&mut self) {
        let (Some(backend), Ok(runtime)) =
            (self.backend.take(), tokio::runtime::Handle::try_current())
        else {
            return;
        };
        let lease = self.lease;
        let mut release = Box::pin(async move {
            if let Err(e) = contained("release", backend.release(&lease)).await {
                tracing::warn!(error = %e, job = lease.job_id, "could not give back a job whose inline run was dropped; it returns when its lease ends");
            }
        });
        if (&mut release).now_or_never().is_none() {
            runtime.spawn(release);
        }
    }
}

/// `by` after `start`, or a far-off instant (about 30 years on, as Tokio's
/// own timers do) where the sum overflows: durations such as
/// `Duration::MAX` for "wait indefinitely" are the caller's to pick.
pub(crate) fn after(start: Instant, by: Duration) -> Instant {
    start
        .checked_add(by)
        .unwrap_or_else(|| start + Duration::from_secs(86_400 * 365 * 30))
}

/// The handler that per-type setting `field`, given for `job_type` of
/// `kind`, applies to: the one registered for that very type.
fn handler_for<'a, S>(
    handlers: &'a mut FxHashMap<String, Entry<S>>,
    field: &'static str,
    kind: &str,
    job_type: TypeOf,
) -> Result<&'a mut Entry<S>> {
    let entry = handlers.get_mut(kind).ok_or_else(|| {
        Error::invalid(field, format!("no handler is registered for kind {kind:?}"))
    })?;
    if entry.job_type.id != job_type.id {
        return Err(Error::invalid(
            field,
            format!(
                "names {}, but kind {kind:?} is handled for {}",
                job_type.name, entry.job_type.name
            ),
        ));
    }
    Ok(entry)
}

fn check_positive(field: &'static str, value: Duration) -> Result<()> {
    if value.is_zero() {
        return Err(Error::invalid(field, "must be more than zero"));
    }
    Ok(())
}
