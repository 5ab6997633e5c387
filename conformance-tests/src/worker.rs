//! The worker runtime on this backend: retries on the backoff schedule,
//! `Dead` after the last attempt, unusable jobs killed once, panics and
//! timeouts contained, leases renewed, concurrency bounded, wake-ups used,
//! graceful shutdown.
//!
//! Cases that need the deterministic path use
//! [`Worker::run_until_idle`](relayq_core::Worker::run_until_idle) with the
//! harness's manual clock. Cases about the background runner use real time,
//! but only through liveness bounds ([`LIVENESS`]) that a correct worker
//! meets with a wide margin; none measures speed.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration as StdDuration;

use relayq_core::{
    Backend, Event, HandlerError, Jitter, JobContext, JobId, JobStatus, JobType, NewJob, Outcome,
    RetryPolicy, Worker, WorkerBuilder,
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use time::Duration;

use crate::faults::{Faulty, PushDuringEmptyPull};
use crate::harness::Harness;

/// The longest any wait in these cases may take before the case fails: a
/// bound on liveness, not a performance target.
pub const LIVENESS: StdDuration = StdDuration::from_secs(20);

/// The typed job every worker case runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    /// Tells the handler what to do.
    pub n: i64,
}

impl JobType for Task {
    const KIND: &'static str = "conformance.task";
}

/// How many handlers run at once, and the most that ever did.
#[derive(Default)]
struct Overlap {
    now: AtomicUsize,
    peak: AtomicUsize,
}

/// A handler counted as running by its [`Overlap`] until dropped.
struct Running<'a>(&'a Overlap);

impl Overlap {
    fn enter(&self) -> Running<'_> {
        let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        Running(self)
    }

    fn peak(&self) -> usize {
        self.peak.load(Ordering::SeqCst)
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.now.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Awaits `fut`, failing the case if it takes longer than [`LIVENESS`].
async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(LIVENESS, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// Returns once job `id` has `status` in the store (bound it with
/// [`within`]).
async fn status_reached(h: &Harness, id: JobId, status: JobStatus) {
    while h.job(id).await.status != status {
        tokio::time::sleep(StdDuration::from_millis(10)).await;
    }
}

/// Pushes tasks `0..n`, recording each id in `ids` (where the handlers
/// read them) before the worker starts, then starts `worker`, checks that
/// every job ends `Done` on its first attempt and shuts the worker down.
async fn push_and_finish_each_once(
    h: &Harness,
    worker: Worker<Harness>,
    ids: &Mutex<Vec<JobId>>,
    n: i64,
) {
    for n in 0..n {
        let id = h.push(Task { n }.to_job()).await;
        ids.lock().expect("lock").push(id);
    }
    let all: Vec<JobId> = ids.lock().expect("lock").clone();
    let running = worker.start();
    for &id in &all {
        let job = within("every job", running.wait_for(id))
            .await
            .expect("wait_for");
        assert_eq!((job.status, job.attempts), (JobStatus::Done, 1), "{job:?}");
    }
    running.shutdown_within(LIVENESS).await;
}

fn std_to_time(d: StdDuration) -> Duration {
    Duration::try_from(d).expect("duration in range")
}

/// With an exact exponential policy (no jitter), each failed attempt is
/// retried after base · factor^(attempt−1), capped: the job is not due a
/// microsecond before, and runs as soon as it is.
pub async fn worker_retries_follow_the_backoff_schedule(h: Harness) {
    let policy = RetryPolicy::exponential()
        .base(StdDuration::from_secs(10))
        .factor(2.0)
        .cap(StdDuration::from_secs(60))
        .jitter(Jitter::None);
    let worker = h
        .worker()
        .retry(policy)
        .handle(|task: Task, ctx: JobContext<Harness>| async move {
            Err::<(), _>(HandlerError::new(format!(
                "failure {} of task {}",
                ctx.attempt(),
                task.n
            )))
        })
        .build()
        .expect("build");
    let id = h.push(Task { n: 7 }.to_job().max_attempts(5)).await;
    let schedule = [10, 20, 40, 60];
    for (i, secs) in schedule.into_iter().enumerate() {
        let attempt = i + 1;
        let report = worker.run_until_idle().await.expect("run");
        assert_eq!(report.ran(), 1, "attempt {attempt} runs once");
        assert_eq!(report.retrying(), 1, "attempt {attempt} is retried");
        let job = h.job(id).await;
        assert_eq!(job.status, JobStatus::Pending);
        assert_eq!(job.attempts, i32::try_from(attempt).expect("small"));
        assert_eq!(job.run_at, h.now() + Duration::seconds(secs));
        assert_eq!(
            job.last_error.as_deref(),
            Some(format!("failure {attempt} of task 7").as_str())
        );
        h.advance(Duration::seconds(secs) - Duration::microseconds(1));
        assert_eq!(
            worker.run_until_idle().await.expect("run").ran(),
            0,
            "not due before the delay after attempt {attempt}"
        );
        h.advance(Duration::microseconds(1));
    }
    let report = worker.run_until_idle().await.expect("run");
    assert_eq!(
        (report.ran(), report.dead()),
        (1, 1),
        "the fifth attempt is the last"
    );
    let job = h.job(id).await;
    assert_eq!(job.status, JobStatus::Dead);
    assert_eq!(job.attempts, 5);
    assert_eq!(job.last_error.as_deref(), Some("failure 5 of task 7"));
}

/// A retry delay with nanoseconds, which stores do not keep, is rounded
/// up: the job is not due again until the whole delay has passed.
pub async fn worker_retry_delays_round_up_to_whole_microseconds(h: Harness) {
    let worker = h
        .worker()
        .handle(|_task: Task, _ctx: JobContext<Harness>| async move {
            Err::<(), _>(HandlerError::new("soon").retry_after(StdDuration::from_nanos(1_500)))
        })
        .build()
        .expect("build");
    let id = h.push(Task { n: 1 }.to_job().max_attempts(3)).await;
    let report = worker.run_until_idle().await.expect("run");
    assert_eq!((report.ran(), report.retrying()), (1, 1), "{report:?}");
    assert_eq!(h.job(id).await.run_at, h.now() + Duration::microseconds(2));
    // The outcome says the delay the job waits, not the one asked for.
    assert!(
        matches!(
            report.outcomes[0].1,
            Outcome::Retrying { delay, .. } if delay == StdDuration::from_micros(2)
        ),
        "{report:?}"
    );
    h.advance(Duration::microseconds(1));
    assert_eq!(
        worker.run_until_idle().await.expect("run").ran(),
        0,
        "not due yet"
    );
    h.advance(Duration::microseconds(1));
    assert_eq!(worker.run_until_idle().await.expect("run").ran(), 1, "due");
}

/// A per-kind policy replaces the worker's, and a handler's
/// `retry_after` replaces both.
pub async fn worker_retry_overrides_apply(h: Harness) {
    let worker = h
        .worker()
        .retry(RetryPolicy::fixed(StdDuration::from_secs(1000)))
        .retry_for::<Task>(RetryPolicy::fixed(StdDuration::from_secs(5)))
        .handle(|task: Task, _ctx: JobContext<Harness>| async move {
            let error = HandlerError::new("try later");
            Err::<(), _>(if task.n == 2 {
                error.retry_after(StdDuration::from_secs(42))
            } else {
                error
            })
        })
        .build()
        .expect("build");
    let by_kind = h.push(Task { n: 1 }.to_job()).await;
    let by_handler = h.push(Task { n: 2 }.to_job()).await;
    assert_eq!(worker.run_until_idle().await.expect("run").retrying(), 2);
    assert_eq!(h.job(by_kind).await.run_at, h.now() + Duration::seconds(5));
    assert_eq!(
        h.job(by_handler).await.run_at,
        h.now() + Duration::seconds(42)
    );
}

/// A custom retry policy that panics (its bug) does not lose the failed
/// attempt: the job is retried as the default policy says, with the
/// handler's error.
pub async fn worker_retries_by_default_when_the_policy_panics(h: Harness) {
    let worker = h
        .worker()
        .retry(RetryPolicy::custom(|_job, _attempt| panic!("a policy bug")))
        .handle(|_task: Task, _ctx: JobContext<Harness>| async move {
            Err::<(), _>(HandlerError::new("try later"))
        })
        .build()
        .expect("build");
    let id = h.push(Task { n: 1 }.to_job()).await;
    let report = worker.run_until_idle().await.expect("run");
    assert_eq!((report.ran(), report.retrying()), (1, 1), "{report:?}");
    let job = h.job(id).await;
    assert_eq!(
        (job.status, job.attempts, job.last_error.as_deref()),
        (JobStatus::Pending, 1, Some("try later"))
    );
    // The default policy's first delay: 1 s, with equal jitter.
    let delay = job.run_at - h.now();
    assert!(
        (Duration::milliseconds(500)..=Duration::seconds(1)).contains(&delay),
        "{delay}"
    );
}

/// Outcome writes that fail transiently (a connection lost, a failover, a
/// deadlock) are made again while the lease is held: a completion, alone
/// or batched, a retry and a kill are each recorded, no handler runs
/// twice (a job finishing in a shutdown's grace period included), and each
/// outcome is reported as it was recorded, also where the
/// failed try had taken effect and only its reply was lost (the next try
/// then finds the lease gone, or is refused for good).
pub async fn worker_makes_outcome_writes_that_failed_transiently_again(h: Harness) {
    for (lose_replies, refuse_last) in [(false, false), (true, false), (true, true)] {
        outcome_writes_made_again(&h, lose_replies, refuse_last).await;
    }
}

async fn outcome_writes_made_again(h: &Harness, lose_replies: bool, refuse_last: bool) {
    let flaky = Arc::new(FlakyWrites {
        left: AtomicUsize::new(0),
        lose_replies,
        refuse_last,
    });
    let backend: Arc<dyn Backend> =
        Arc::new(Faulty::new(Arc::clone(&h.backend), Arc::clone(&flaky)));
    let runs = Arc::new(AtomicUsize::new(0));
    let worker = Worker::builder(backend)
        .state(h.clone())
        .retry(RetryPolicy::fixed(StdDuration::from_secs(3600)))
        .handle({
            let runs = Arc::clone(&runs);
            move |task: Task, ctx: JobContext<Harness>| {
                runs.fetch_add(1, Ordering::SeqCst);
                async move {
                    match task.n {
                        1 => Ok(()),
                        2 => Err(HandlerError::new("fails")),
                        3 => Err(HandlerError::permanent("fails for good")),
                        // Finishes once the worker is shutting down.
                        _ => {
                            ctx.shutdown_requested().await;
                            Ok(())
                        }
                    }
                }
            }
        })
        .build()
        .expect("build");
    let case = match (lose_replies, refuse_last) {
        (true, true) => "replies lost, then refused",
        (true, false) => "replies lost",
        _ => "writes failed",
    };
    // The test mode records each outcome alone.
    let mut ids = Vec::new();
    for n in 1..=3 {
        flaky.fail_next(2);
        ids.push(h.push(Task { n }.to_job()).await);
        let report = worker.run_until_idle().await.expect("run");
        let recorded = (report.completed(), report.retrying(), report.dead());
        let expected = [(1, 0, 0), (0, 1, 0), (0, 0, 1)][usize::try_from(n - 1).expect("small")];
        assert_eq!(recorded, expected, "{case}: task {n}: {report:?}");
    }
    // A started worker batches its completions.
    flaky.fail_next(2);
    let batched = h.push(Task { n: 1 }.to_job()).await;
    let mut events = worker.events();
    let running = worker.start();
    let outcome = outcome_of(&mut events, batched).await;
    assert!(
        matches!(outcome, Outcome::Completed { .. }),
        "{case}: {outcome:?}"
    );
    // And during a shutdown's grace period: a job that finishes then.
    let finishing = h.push(Task { n: 4 }.to_job()).await;
    starts(&mut events, 1, "the job that finishes at shutdown to start").await;
    flaky.fail_next(2);
    running.shutdown_within(LIVENESS).await;
    let mut seen = Vec::new();
    for id in [ids[0], ids[1], ids[2], batched, finishing] {
        let job = h.job(id).await;
        seen.push((job.status, job.attempts, job.last_error));
    }
    assert_eq!(
        seen,
        [
            (JobStatus::Done, 1, None),
            (JobStatus::Pending, 1, Some("fails".to_owned())),
            (JobStatus::Dead, 1, Some("fails for good".to_owned())),
            (JobStatus::Done, 1, None),
            (JobStatus::Done, 1, None),
        ],
        "{case}"
    );
    assert_eq!(
        runs.load(Ordering::SeqCst),
        5,
        "{case}: each handler ran once"
    );
    assert_eq!(
        flaky.left.load(Ordering::SeqCst),
        0,
        "{case}: every failure was met"
    );
}

/// Fails the next outcome writes (completions, alone or batched, retries
/// and kills) transiently: without making them, or, with `lose_replies`,
/// after making them, as a reply lost after the commit; with
/// `refuse_last`, the last of them fails for good instead, without making
/// it. Declares no instant writes, so that a worker batches its
/// completions on any store.
#[derive(Debug)]
struct FlakyWrites {
    left: AtomicUsize,
    lose_replies: bool,
    refuse_last: bool,
}

impl FlakyWrites {
    fn fail_next(&self, n: usize) {
        self.left.store(n, Ordering::SeqCst);
    }

    /// Makes `write`, or fails it (counted) as set.
    async fn write<T>(
        &self,
        write: impl Future<Output = relayq_core::Result<T>>,
    ) -> relayq_core::Result<T> {
        let Ok(failures_left) = self
            .left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        else {
            return write.await;
        };
        if self.refuse_last && failures_left == 1 {
            return Err(relayq_core::Error::backend("the store refuses the write"));
        }
        if self.lose_replies {
            // Lost with its reply: a lease it found gone is no failure to keep.
            let _ = write.await;
        }
        Err(relayq_core::Error::transient(
            "the store is briefly unreachable",
        ))
    }
}

#[async_trait::async_trait]
impl crate::faults::Faults for FlakyWrites {
    fn capabilities(&self, inner: &dyn Backend) -> relayq_core::Capabilities {
        inner.capabilities().instant_writes(false)
    }

    async fn complete(
        &self,
        inner: &dyn Backend,
        lease: &relayq_core::Lease,
        result: Option<serde_json::Value>,
    ) -> relayq_core::Result<()> {
        self.write(inner.complete(lease, result)).await
    }

    async fn complete_batch(
        &self,
        inner: &dyn Backend,
        completions: Vec<relayq_core::Completion>,
    ) -> relayq_core::Result<Vec<relayq_core::Lease>> {
        self.write(inner.complete_batch(completions)).await
    }

    async fn retry(
        &self,
        inner: &dyn Backend,
        lease: &relayq_core::Lease,
        delay: Duration,
        error: &str,
    ) -> relayq_core::Result<JobStatus> {
        self.write(inner.retry(lease, delay, error)).await
    }

    async fn kill(
        &self,
        inner: &dyn Backend,
        lease: &relayq_core::Lease,
        error: &str,
    ) -> relayq_core::Result<()> {
        self.write(inner.kill(lease, error)).await
    }
}

/// A job that fails on every attempt is `Dead` after `max_attempts`, with
/// the last error; a permanent error makes it `Dead` at once. Every attempt
/// is reported as an event.
pub async fn worker_marks_dead_after_max_attempts(h: Harness) {
    let outcomes: Arc<Mutex<Vec<(JobId, Outcome)>>> = Arc::default();
    let seen = Arc::clone(&outcomes);
    let worker = h
        .worker()
        .retry(RetryPolicy::fixed(StdDuration::ZERO))
        .on_event(move |event| {
            if let Event::Finished { job, outcome } = event {
                seen.lock().expect("lock").push((job.id, outcome.clone()));
            }
        })
        .handle(|task: Task, _ctx: JobContext<Harness>| async move {
            Err::<(), _>(if task.n == 0 {
                HandlerError::permanent("cannot ever work")
            } else {
                HandlerError::new("flaky")
            })
        })
        .build()
        .expect("build");
    let flaky = h.push(Task { n: 1 }.to_job().max_attempts(3)).await;
    let hopeless = h.push(Task { n: 0 }.to_job().max_attempts(3)).await;
    let report = worker.run_until_idle().await.expect("run");
    assert_eq!(report.ran(), 4, "three attempts and one");
    assert_eq!(report.dead(), 2);

    let job = h.job(flaky).await;
    assert_eq!(
        (job.status, job.attempts, job.last_error.as_deref()),
        (JobStatus::Dead, 3, Some("flaky"))
    );
    let job = h.job(hopeless).await;
    assert_eq!(
        (job.status, job.attempts, job.last_error.as_deref()),
        (JobStatus::Dead, 1, Some("cannot ever work"))
    );
    let outcomes = outcomes.lock().expect("lock").clone();
    let flaky_outcomes: Vec<&Outcome> = outcomes
        .iter()
        .filter(|(id, _)| *id == flaky)
        .map(|(_, o)| o)
        .collect();
    assert!(
        matches!(
            flaky_outcomes[..],
            [
                Outcome::Retrying { .. },
                Outcome::Retrying { .. },
                Outcome::Dead { .. }
            ]
        ),
        "{flaky_outcomes:?}"
    );
    assert_eq!(worker.run_until_idle().await.expect("run").ran(), 0);
}

/// A handler whose result cannot be stored (a string holding NUL, a map
/// that does not serialize) ran once: its job is `Dead` with an error
/// saying why, not retried to do its work again for the same result.
pub async fn worker_kills_a_job_whose_result_cannot_be_stored(h: Harness) {
    let runs = Arc::new(AtomicUsize::new(0));
    let worker = h
        .worker()
        .handle({
            let runs = Arc::clone(&runs);
            move |task: Task, _ctx: JobContext<Harness>| {
                runs.fetch_add(1, Ordering::SeqCst);
                async move {
                    /// Serializes as its content.
                    #[derive(Serialize)]
                    #[serde(untagged)]
                    enum Odd {
                        /// Tuple keys: no JSON object holds them.
                        Map(std::collections::HashMap<(i32, i32), i32>),
                        /// NUL: no store keeps it.
                        Text(String),
                    }
                    Ok::<_, HandlerError>(if task.n == 1 {
                        Odd::Map([((1, 2), 3)].into())
                    } else {
                        Odd::Text("nul\0inside".to_owned())
                    })
                }
            }
        })
        .build()
        .expect("build");
    let ids = [
        h.push(Task { n: 1 }.to_job().max_attempts(5)).await,
        h.push(Task { n: 2 }.to_job().max_attempts(5)).await,
    ];
    let report = within("the two jobs", worker.run_until_idle())
        .await
        .expect("run");
    assert_eq!((report.ran(), report.dead()), (2, 2), "{report:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 2, "each ran once");
    for id in ids {
        let job = h.job(id).await;
        assert_eq!((job.status, job.attempts), (JobStatus::Dead, 1));
        let error = job.last_error.expect("an error");
        assert!(
            error.contains("cannot be stored") || error.contains("does not serialize"),
            "{error}"
        );
    }
}

/// A payload that does not deserialize, and a kind with no handler, are
/// `Dead` after one attempt with an error saying why; the handler never
/// runs for them and nothing is retried. Good jobs around them complete.
pub async fn worker_kills_unusable_jobs_once(h: Harness) {
    let (worker, calls) = counting_tens(h.worker());
    let (bad_payload, unknown, good) = push_two_unusable_and_a_good_one(&h).await;

    let report = worker.run_until_idle().await.expect("run");
    assert_eq!((report.ran(), report.dead(), report.completed()), (3, 2, 1));
    assert_eq!(calls.load(Ordering::SeqCst), 1, "only the good job ran");

    let job = h.job(bad_payload).await;
    assert_eq!((job.status, job.attempts), (JobStatus::Dead, 1));
    let error = job.last_error.expect("an error");
    assert!(error.contains("does not deserialize"), "{error}");
    assert!(error.contains(Task::KIND), "{error}");

    let job = h.job(unknown).await;
    assert_eq!((job.status, job.attempts), (JobStatus::Dead, 1));
    let error = job.last_error.expect("an error");
    assert!(error.contains("no handler"), "{error}");
    assert!(error.contains("conformance.nobody_handles_this"), "{error}");

    let job = h.job(good).await;
    assert_eq!((job.status, job.result), (JobStatus::Done, Some(json!(40))));

    h.advance(Duration::days(1));
    assert_eq!(worker.run_until_idle().await.expect("run").ran(), 0);
}

/// A worker whose handler returns ten times its task's `n`, counting its
/// calls.
fn counting_tens(builder: WorkerBuilder<Harness>) -> (Worker<Harness>, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&calls);
    let worker = builder
        .handle(move |task: Task, _ctx: JobContext<Harness>| {
            counter.fetch_add(1, Ordering::SeqCst);
            async move { Ok::<_, HandlerError>(task.n * 10) }
        })
        .build()
        .expect("build");
    (worker, calls)
}

/// Pushes a task whose payload does not decode, a job of a kind no one
/// handles, and a good task (`n` = 4), returning their ids in that order.
async fn push_two_unusable_and_a_good_one(h: &Harness) -> (JobId, JobId, JobId) {
    let bad_payload = h
        .push(NewJob::new(Task::KIND, &json!({ "n": "seven" })))
        .await;
    let unknown = h
        .push(NewJob::new("conformance.nobody_handles_this", &json!({})))
        .await;
    let good = h.push(Task { n: 4 }.to_job()).await;
    (bad_payload, unknown, good)
}

/// A started worker, too, kills a payload that does not decode and a kind
/// it has no handler for at once (through its batched or per-lane outcome
/// writes), runs neither again, and runs the good job beside them.
pub async fn started_worker_kills_unusable_jobs_once(h: Harness) {
    let (worker, calls) = counting_tens(h.worker().poll_interval(StdDuration::from_millis(50)));
    let (bad_payload, unknown, good) = push_two_unusable_and_a_good_one(&h).await;
    let mut events = worker.events();
    let running = worker.start();
    for (id, status) in [
        (bad_payload, JobStatus::Dead),
        (unknown, JobStatus::Dead),
        (good, JobStatus::Done),
    ] {
        let job = within("each job's outcome", running.wait_for(id))
            .await
            .expect("wait_for");
        assert_eq!((job.status, job.attempts), (status, 1), "{job:?}");
    }
    let error = h.job(bad_payload).await.last_error.expect("an error");
    assert!(error.contains("does not deserialize"), "{error}");
    let error = h.job(unknown).await.last_error.expect("an error");
    assert!(error.contains("no handler"), "{error}");
    running.shutdown_within(LIVENESS).await;
    // One attempt each, ended once: Dead for the two, reported once.
    let mut ended = Vec::new();
    while let Some(event) = events.try_recv() {
        if let Event::Finished { job, outcome } = event {
            ended.push((job.id, matches!(outcome, Outcome::Dead { .. })));
        }
    }
    ended.sort_unstable();
    let mut expected = vec![(bad_payload, true), (unknown, true), (good, false)];
    expected.sort_unstable();
    assert_eq!(ended, expected);
    assert_eq!(calls.load(Ordering::SeqCst), 1, "only the good job ran");
}

/// Jobs that fall due as time passes, with no push or release to signal
/// them (a delayed job, a failed attempt's retry), are run by a started
/// worker at its next poll, its wake-up subscription open or not.
pub async fn worker_runs_jobs_that_fall_due_without_a_signal(h: Harness) {
    let worker = h
        .worker()
        .poll_interval(StdDuration::from_millis(50))
        .retry(RetryPolicy::fixed(StdDuration::from_secs(5)))
        .handle(|task: Task, ctx: JobContext<Harness>| async move {
            if task.n == 1 && ctx.job().attempts == 1 {
                return Err(HandlerError::new("the first attempt fails"));
            }
            Ok::<_, HandlerError>(task.n)
        })
        .build()
        .expect("build");
    let delayed = h
        .push(Task { n: 0 }.to_job().delay(Duration::seconds(10)))
        .await;
    let failing = h.push(Task { n: 1 }.to_job()).await;
    let running = worker.start();
    within("the failed first attempt", async {
        loop {
            let job = h.job(failing).await;
            if (job.status, job.attempts) == (JobStatus::Pending, 1) {
                break;
            }
            tokio::time::sleep(StdDuration::from_millis(10)).await;
        }
    })
    .await;
    // Several polls while neither is due: neither runs.
    tokio::time::sleep(StdDuration::from_millis(300)).await;
    assert_eq!(
        (h.job(delayed).await.status, h.job(delayed).await.attempts),
        (JobStatus::Pending, 0)
    );
    assert_eq!(h.job(failing).await.attempts, 1);
    // Both fall due; nothing signals it.
    h.advance(Duration::seconds(10));
    for (id, attempts) in [(delayed, 1), (failing, 2)] {
        let job = within("a job fallen due", running.wait_for(id))
            .await
            .expect("wait_for");
        assert_eq!((job.status, job.attempts), (JobStatus::Done, attempts));
    }
    running.shutdown_within(LIVENESS).await;
}

/// A handler that overruns its kind's timeout fails the attempt with an
/// error saying so.
pub async fn worker_times_out_a_slow_handler(h: Harness) {
    let worker = h
        .worker()
        .timeout_for::<Task>(StdDuration::from_millis(50))
        .handle(|_task: Task, _ctx: JobContext<Harness>| async move {
            tokio::time::sleep(LIVENESS * 2).await;
            Ok::<_, HandlerError>(())
        })
        .build()
        .expect("build");
    let id = h.push(Task { n: 1 }.to_job().max_attempts(1)).await;
    let report = within("the timed-out attempt", worker.run_until_idle())
        .await
        .expect("run");
    assert_eq!(report.dead(), 1);
    let job = h.job(id).await;
    assert_eq!(job.status, JobStatus::Dead);
    let error = job.last_error.expect("an error");
    assert!(error.contains("timed out"), "{error}");
}

/// A handler stopped by its timeout whose future panics as it is dropped
/// (a guard asserting it was used up, say) still has its attempt recorded
/// as timed out, in the test mode and on a started worker: the panic stays
/// with the handler.
pub async fn worker_records_a_stopped_handler_that_panics_as_it_is_dropped(h: Harness) {
    /// Panics when dropped.
    struct Bomb;
    impl Drop for Bomb {
        fn drop(&mut self) {
            if !std::thread::panicking() {
                panic!("dropped while armed");
            }
        }
    }
    let handler = |_task: Task, _ctx: JobContext<Harness>| async move {
        let _bomb = Bomb;
        std::future::pending::<()>().await;
        Ok::<_, HandlerError>(())
    };
    let timed = || {
        h.worker()
            .timeout_for::<Task>(StdDuration::from_millis(50))
            .handle(handler)
            .build()
            .expect("build")
    };
    let id = h.push(Task { n: 1 }.to_job().max_attempts(1)).await;
    let report = within("the timed-out attempt", timed().run_until_idle())
        .await
        .expect("run");
    assert_eq!(report.dead(), 1, "{report:?}");
    let running = timed().start();
    let started = h.push(Task { n: 2 }.to_job().max_attempts(1)).await;
    let job = within("a job under a timeout", running.wait_for(started))
        .await
        .expect("wait_for");
    running.shutdown_within(LIVENESS).await;
    for job in [h.job(id).await, job] {
        assert_eq!(job.status, JobStatus::Dead, "{job:?}");
        let error = job.last_error.expect("an error");
        assert!(error.contains("timed out"), "{error}");
    }
}

/// On a started worker, a handler whose first poll comes back pending and
/// that nothing ever wakes is still stopped by its timeout; a timeout of
/// `Duration::MAX` means none, and a job under it runs to its end.
pub async fn worker_times_out_a_started_handler_that_never_wakes(h: Harness) {
    let handler = |task: Task, _ctx: JobContext<Harness>| async move {
        if task.n < 0 {
            std::future::pending::<()>().await;
        }
        Ok::<_, HandlerError>(task.n)
    };
    for (timeout, n) in [(StdDuration::MAX, 7), (StdDuration::from_millis(50), -1)] {
        let worker = h.worker().timeout(timeout).handle(handler).build();
        let running = worker.expect("build").start();
        let id = h.push(Task { n }.to_job().max_attempts(1)).await;
        let job = within("a job under a timeout", running.wait_for(id))
            .await
            .expect("wait_for");
        if n < 0 {
            assert_eq!(job.status, JobStatus::Dead);
            let error = job.last_error.expect("an error");
            assert!(error.contains("timed out after 50ms"), "{error}");
        } else {
            assert_eq!((job.status, job.result), (JobStatus::Done, Some(json!(7))));
        }
        running.shutdown_within(LIVENESS).await;
    }
}

/// A handler that keeps its lane busy, with work that is always ready
/// (here Tokio's cooperative budget spent on every poll), is still stopped
/// by its timeout in a started worker and by the deadline at shutdown, and
/// does not keep other jobs from starting.
pub async fn worker_contains_a_busy_handler(h: Harness) {
    async fn busy() -> Result<(), HandlerError> {
        loop {
            tokio::task::consume_budget().await;
        }
    }
    let timed = h
        .worker()
        .timeout_for::<Task>(StdDuration::from_millis(50))
        .handle(|_task: Task, _ctx: JobContext<Harness>| busy())
        .build()
        .expect("build");
    let id = h.push(Task { n: 1 }.to_job().max_attempts(1)).await;
    let running = timed.start();
    let job = within("the busy handler's timeout", running.wait_for(id))
        .await
        .expect("wait");
    assert_eq!(job.status, JobStatus::Dead);
    let error = job.last_error.expect("an error");
    assert!(error.contains("timed out"), "{error}");
    within("shutdown", running.shutdown()).await;

    let untimed = h
        .worker()
        .handle(|_task: Task, _ctx: JobContext<Harness>| busy())
        .build()
        .expect("build");
    let mut events = untimed.events();
    let id = h.push(Task { n: 2 }.to_job()).await;
    let running = untimed.start();
    starts(&mut events, 1, "the busy job to start").await;
    let report = within(
        "shutdown past its deadline",
        running.shutdown_within(StdDuration::from_millis(100)),
    )
    .await;
    assert_eq!((report.finished, report.released), (0, 1), "{report:?}");
    assert_eq!(h.job(id).await.status, JobStatus::Pending);

    // Busy handlers on every lane (the runtime has two threads, so two
    // lanes) do not keep the next job from starting: the job released
    // above and one more keep both lanes busy, then a quick one runs.
    let shared = h
        .worker()
        .concurrency(4)
        .handle(|task: Task, _ctx: JobContext<Harness>| async move {
            match task.n {
                3 => Ok(()),
                _ => busy().await,
            }
        })
        .build()
        .expect("build");
    let mut events = shared.events();
    h.push(Task { n: 1 }.to_job()).await;
    let running = shared.start();
    starts(&mut events, 2, "both busy jobs to start").await;
    let quick = h.push(Task { n: 3 }.to_job()).await;
    let job = within("a quick job beside busy ones", running.wait_for(quick))
        .await
        .expect("wait");
    assert_eq!(job.status, JobStatus::Done);
    let report = within(
        "shutdown past its deadline",
        running.shutdown_within(StdDuration::from_millis(100)),
    )
    .await;
    assert_eq!(report.released, 2, "{report:?}");
}

/// A panicking handler is a failed attempt (retried, then `Dead` with the
/// panic's message), in the background runner as in test mode; the worker
/// goes on running other jobs and stores their results.
pub async fn worker_contains_a_panic(h: Harness) {
    let worker = h
        .worker()
        .retry(RetryPolicy::fixed(StdDuration::ZERO))
        .poll_interval(StdDuration::from_millis(50))
        .handle(|task: Task, _ctx: JobContext<Harness>| async move {
            if task.n == 1 {
                panic!("boom in task {}", task.n);
            }
            Ok::<_, HandlerError>(json!({ "doubled": task.n * 2 }))
        })
        .build()
        .expect("build");
    let panicky = h.push(Task { n: 1 }.to_job().max_attempts(2)).await;
    let fine = h.push(Task { n: 2 }.to_job()).await;
    let running = worker.start();
    let job = within("the panicking job", running.wait_for(panicky))
        .await
        .expect("wait_for");
    assert_eq!((job.status, job.attempts), (JobStatus::Dead, 2));
    let error = job.last_error.expect("an error");
    assert!(error.contains("panicked"), "{error}");
    assert!(error.contains("boom in task 1"), "{error}");
    let job = within("the other job", running.wait_for(fine))
        .await
        .expect("wait_for");
    assert_eq!(job.status, JobStatus::Done);
    assert_eq!(job.result, Some(json!({ "doubled": 4 })));

    // Still alive after the panics.
    let later = h.push(Task { n: 3 }.to_job()).await;
    let job = within("a job after the panics", running.wait_for(later))
        .await
        .expect("wait_for");
    assert_eq!(job.status, JobStatus::Done);
    running.shutdown_within(LIVENESS).await;

    // Test mode contains it too.
    let inline = h.push(Task { n: 1 }.to_job().max_attempts(1)).await;
    let report = worker.run_until_idle().await.expect("run");
    assert_eq!(report.dead(), 1);
    let job = h.job(inline).await;
    assert!(
        job.last_error
            .as_deref()
            .is_some_and(|e| e.contains("boom")),
        "{job:?}"
    );
}

/// A handler that panics before it returns its future (in the closure's
/// own body, as a payload type's `Deserialize` might) is a failed attempt
/// too, in the background runner as in test mode, and the worker goes on.
pub async fn worker_contains_a_panic_before_the_handlers_future(h: Harness) {
    let worker = h
        .worker()
        .retry(RetryPolicy::fixed(StdDuration::ZERO))
        .poll_interval(StdDuration::from_millis(50))
        .handle(|task: Task, _ctx: JobContext<Harness>| {
            if task.n == 1 {
                panic!("boom before the future of task {}", task.n);
            }
            async move { Ok::<_, HandlerError>(json!({ "doubled": task.n * 2 })) }
        })
        .build()
        .expect("build");
    let panicky = h.push(Task { n: 1 }.to_job().max_attempts(2)).await;
    let running = worker.start();
    let job = within("the panicking job", running.wait_for(panicky))
        .await
        .expect("wait_for");
    assert_eq!((job.status, job.attempts), (JobStatus::Dead, 2));
    let error = job.last_error.expect("an error");
    assert!(error.contains("panicked"), "{error}");
    assert!(
        error.contains("boom before the future of task 1"),
        "{error}"
    );
    let later = h.push(Task { n: 3 }.to_job()).await;
    let job = within("a job after the panics", running.wait_for(later))
        .await
        .expect("wait_for");
    assert_eq!(job.result, Some(json!({ "doubled": 6 })));
    running.shutdown_within(LIVENESS).await;

    let inline = h.push(Task { n: 1 }.to_job().max_attempts(1)).await;
    let report = worker.run_until_idle().await.expect("run");
    assert_eq!(report.dead(), 1);
    let error = h.job(inline).await.last_error.unwrap_or_default();
    assert!(error.contains("boom before the future"), "{error}");
}

/// A started worker reports each completion (`Event::Finished`, with the
/// handler's result) only once the store has recorded it: the hook reads
/// the store as it is told.
pub async fn worker_reports_completions_once_recorded(h: Harness) {
    let seen: Arc<Mutex<Vec<(JobId, Outcome, JobStatus)>>> = Arc::default();
    let (record, store) = (Arc::clone(&seen), h.clone());
    let worker = h
        .worker()
        .handle(
            |task: Task, _ctx: JobContext<Harness>| async move { Ok::<_, HandlerError>(task.n) },
        )
        .on_event(move |event| {
            if let Event::Finished { job, outcome } = event {
                // Blocks the reporting task until the read is done, so the
                // store is seen as it was when the event was sent.
                let status = tokio::task::block_in_place(|| {
                    tokio::runtime::Handle::current().block_on(store.job(job.id))
                })
                .status;
                record
                    .lock()
                    .expect("lock")
                    .push((job.id, outcome.clone(), status));
            }
        })
        .build()
        .expect("build");
    let mut ids = Vec::new();
    for n in 0..3 {
        ids.push(h.push(Task { n }.to_job()).await);
    }
    let running = worker.start();
    for &id in &ids {
        within("every job", running.wait_for(id))
            .await
            .expect("wait_for");
    }
    // The batcher, and so every report, is done once shutdown returns.
    running.shutdown_within(LIVENESS).await;
    let mut seen = seen.lock().expect("lock").clone();
    seen.sort_by_key(|(id, ..)| *id);
    let expected: Vec<_> = ids
        .iter()
        .zip(0..)
        .map(|(&id, n)| {
            let result = Some(json!(n));
            (id, Outcome::Completed { result }, JobStatus::Done)
        })
        .collect();
    assert_eq!(seen, expected);
}

/// Moves the store's clock on by half a `lease`, `steps` times, and checks
/// after each that a started worker renewed job `id`'s lease from the new
/// `now` (within a quarter of [`LIVENESS`] of real time) and that another
/// puller finds no job of `queue` to take; says what went wrong first.
async fn watch_renewals(
    h: &Harness,
    id: JobId,
    queue: &str,
    lease: Duration,
    steps: u32,
) -> Option<String> {
    for step in 1..=steps {
        h.advance(lease / 2);
        let renewed = tokio::time::timeout(LIVENESS / 4, async {
            while h.job(id).await.locked_until != Some(h.now() + lease) {
                tokio::time::sleep(StdDuration::from_millis(10)).await;
            }
        })
        .await;
        if renewed.is_err() {
            return Some(format!(
                "step {step}: the lease of job {id} was not renewed"
            ));
        }
        if !h.pull(queue, 10).await.is_empty() {
            return Some(format!(
                "step {step}: another puller got a job of {queue:?}"
            ));
        }
    }
    None
}

/// While a handler runs, the worker renews its lease, so a job running for
/// three lease lengths (on the store's clock) is never handed to another
/// puller, and completes on its first attempt.
pub async fn worker_renews_the_lease_of_a_long_job(h: Harness) {
    const LEASE: StdDuration = StdDuration::from_millis(600);
    let lease = std_to_time(LEASE);
    let problems: Arc<Mutex<Vec<String>>> = Arc::default();
    let report = Arc::clone(&problems);
    let worker = h
        .worker()
        .lease(LEASE)
        .handle(move |_task: Task, ctx: JobContext<Harness>| {
            let problems = Arc::clone(&report);
            async move {
                let h = ctx.state();
                if let Some(problem) = watch_renewals(h, ctx.id(), &ctx.job().queue, lease, 6).await
                {
                    problems.lock().expect("lock").push(problem);
                }
                Ok::<_, HandlerError>(())
            }
        })
        .build()
        .expect("build");
    let mut events = worker.events();
    let id = h.push(Task { n: 1 }.to_job()).await;
    let running = worker.start();
    let outcome = within("the long job", async {
        loop {
            if let Some(Event::Finished { job, outcome }) = events.recv().await
                && job.id == id
            {
                return outcome;
            }
        }
    })
    .await;
    running.shutdown_within(LIVENESS).await;
    assert_eq!(*problems.lock().expect("lock"), Vec::<String>::new());
    assert!(matches!(outcome, Outcome::Completed { .. }), "{outcome:?}");
    let job = h.job(id).await;
    assert_eq!((job.status, job.attempts), (JobStatus::Done, 1));
    assert!(h.now() - job.created_at >= lease * 3);
}

/// The worker runs up to `concurrency` jobs at once, and no more.
pub async fn worker_runs_up_to_concurrency_jobs_at_once(h: Harness) {
    const CONCURRENCY: usize = 3;
    let barrier = Arc::new(tokio::sync::Barrier::new(CONCURRENCY));
    let overlap = Arc::new(Overlap::default());
    let (b, o) = (Arc::clone(&barrier), Arc::clone(&overlap));
    let worker = h
        .worker()
        .concurrency(u32::try_from(CONCURRENCY).expect("small"))
        .poll_interval(StdDuration::from_millis(50))
        .handle(move |task: Task, _ctx: JobContext<Harness>| {
            let (barrier, overlap) = (Arc::clone(&b), Arc::clone(&o));
            async move {
                let _running = overlap.enter();
                // Only passes once CONCURRENCY jobs run together.
                barrier.wait().await;
                Ok::<_, HandlerError>(task.n)
            }
        })
        .build()
        .expect("build");
    let mut ids = Vec::new();
    for n in 0..2 * CONCURRENCY {
        ids.push(h.push(Task { n: n as i64 }.to_job()).await);
    }
    let running = worker.start();
    for (n, id) in ids.into_iter().enumerate() {
        let job = within("a job behind the barrier", running.wait_for(id))
            .await
            .expect("wait_for");
        assert_eq!(job.status, JobStatus::Done);
        assert_eq!(job.result, Some(json!(n)));
    }
    running.shutdown_within(LIVENESS).await;
    assert_eq!(overlap.peak(), CONCURRENCY);
}

/// A worker whose handler returns each task's `n`, and whose poll
/// interval (an hour) leaves only wake-ups to make it pull in a case.
fn woken_only(builder: WorkerBuilder<Harness>) -> Worker<Harness> {
    builder
        .poll_interval(StdDuration::from_secs(3600))
        .handle(
            |task: Task, _ctx: JobContext<Harness>| async move { Ok::<_, HandlerError>(task.n) },
        )
        .build()
        .expect("build")
}

/// On a backend that declares wake-ups, an idle worker runs a job pushed
/// later at once, without waiting for its (hour-long) poll.
pub async fn worker_wakes_up_on_push(h: Harness) {
    let caps = h.backend.capabilities();
    if !caps.in_process_wakeups && !caps.cross_process_wakeups {
        return;
    }
    let running = woken_only(h.worker()).start();
    let first = h.push(Task { n: 1 }.to_job()).await;
    within("the first job", running.wait_for(first))
        .await
        .expect("wait_for");
    // The worker is idle now: only a wake-up can start this one in time.
    let second = h.push(Task { n: 2 }.to_job()).await;
    let job = within("a job pushed to an idle worker", running.wait_for(second))
        .await
        .expect("wait_for");
    assert_eq!(job.status, JobStatus::Done);
    running.shutdown_within(LIVENESS).await;
}

/// On a backend that declares wake-ups, a push whose wake-up arrives while
/// the worker's pull is under way, a pull that then comes back empty
/// (its snapshot predates the push), is run at once: the wake-up is not
/// taken as answered by the pull it raced, and the worker does not wait
/// for its (hour-long) poll.
pub async fn worker_hears_a_push_made_during_its_empty_pull(h: Harness) {
    let caps = h.backend.capabilities();
    if !caps.in_process_wakeups && !caps.cross_process_wakeups {
        return;
    }
    // Longer than any store's own way of signalling the push (SQLite's
    // change poller ticks every 200 ms).
    let racing = Arc::new(PushDuringEmptyPull::new(
        Task { n: 7 }.to_job(),
        StdDuration::from_millis(500),
    ));
    let backend: Arc<dyn Backend> =
        Arc::new(Faulty::new(Arc::clone(&h.backend), Arc::clone(&racing)));
    // Nothing is queued: the worker's first pull comes back empty. One
    // slot, so one runner even where a worker has one per thread: an idle
    // sibling, hearing the push too, would run the job for a runner that
    // ignored the wake-up.
    let worker = Worker::builder(backend).state(h.clone()).concurrency(1);
    let running = woken_only(worker).start();
    let late = within("the first, empty pull", async {
        loop {
            if let Some(id) = racing.pushed() {
                return id;
            }
            tokio::time::sleep(StdDuration::from_millis(5)).await;
        }
    })
    .await;
    let job = within("a job pushed during an empty pull", running.wait_for(late))
        .await
        .expect("wait_for");
    assert_eq!(job.status, JobStatus::Done);
    assert_eq!(job.result, Some(json!(7)));
    running.shutdown_within(LIVENESS).await;
}

/// The shutdown report counts the runs that ended during the grace
/// period, not every job the worker ran before it.
pub async fn worker_shutdown_report_counts_only_the_grace_period(h: Harness) {
    let entered = Arc::new(tokio::sync::Notify::new());
    let worker = h
        .worker()
        .handle({
            let entered = Arc::clone(&entered);
            move |task: Task, ctx: JobContext<Harness>| {
                let entered = Arc::clone(&entered);
                async move {
                    if task.n < 0 {
                        entered.notify_one();
                        // Ends only once the stop has reached the worker.
                        ctx.shutdown_requested().await;
                    }
                    Ok::<_, HandlerError>(task.n)
                }
            }
        })
        .build()
        .expect("build");
    let running = worker.start();
    for n in 0..20 {
        let id = h.push(Task { n }.to_job()).await;
        within("a quick job", running.wait_for(id))
            .await
            .expect("wait_for");
    }
    h.push(Task { n: -1 }.to_job()).await;
    within("the long job to start", entered.notified()).await;
    let report = within("the shutdown", running.shutdown_within(LIVENESS)).await;
    assert_eq!((report.finished, report.released), (1, 0), "{report:?}");
}

/// A handler whose lease no renewal reached for a whole lease is stopped,
/// whether the renewals fail (the store unreachable), hang (a connection
/// gone silent) or panic (a backend's bug): the store may have leased its
/// job to another worker by then, which must not find it still running
/// here.
pub async fn worker_stops_a_handler_no_renewal_reached_for_a_whole_lease(h: Harness) {
    for renewals in [
        BrokenRenewals::Fail,
        BrokenRenewals::Hang,
        BrokenRenewals::Panic,
    ] {
        let queue = format!("{renewals:?}");
        let backend: Arc<dyn Backend> = Arc::new(Faulty::new(Arc::clone(&h.backend), renewals));
        let stopped = Arc::new(tokio::sync::Notify::new());
        /// Tells when the handler's future is dropped.
        struct NotifyOnStop(Arc<tokio::sync::Notify>);
        impl Drop for NotifyOnStop {
            fn drop(&mut self) {
                self.0.notify_one();
            }
        }
        let worker = Worker::builder(backend)
            .state(h.clone())
            .queues([queue.as_str()])
            .lease(StdDuration::from_millis(600))
            .handle({
                let stopped = Arc::clone(&stopped);
                move |_: Task, _ctx: JobContext<Harness>| {
                    let stopped = Arc::clone(&stopped);
                    async move {
                        let _guard = NotifyOnStop(stopped);
                        std::future::pending::<()>().await;
                        Ok::<_, HandlerError>(0)
                    }
                }
            })
            .build()
            .expect("build");
        h.push(Task { n: 1 }.to_job().queue(&queue)).await;
        let running = worker.start();
        within(
            "the handler stopped once its lease lapsed",
            stopped.notified(),
        )
        .await;
        running.shutdown_within(LIVENESS).await;
    }
}

/// With no prefetch buffer (`prefetch(0)`), every pull asks for no more
/// jobs than the worker has free slots: the jobs it asks for plus the
/// handlers running never exceed its concurrency (SPEC: batch pulls sized
/// to free slots).
pub async fn worker_without_prefetch_pulls_for_free_slots_only(h: Harness) {
    const CONCURRENCY: u32 = 3;
    let running = Arc::new(AtomicUsize::new(0));
    let pulls = Arc::new(PullsBeside {
        running: Arc::clone(&running),
        seen: Mutex::new(Vec::new()),
    });
    let backend: Arc<dyn Backend> =
        Arc::new(Faulty::new(Arc::clone(&h.backend), Arc::clone(&pulls)));
    let worker = Worker::builder(backend)
        .state(h.clone())
        .queues(["slots"])
        .concurrency(CONCURRENCY)
        .prefetch(0)
        .handle({
            let running = Arc::clone(&running);
            move |_: Task, _ctx: JobContext<Harness>| {
                let running = Arc::clone(&running);
                async move {
                    running.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(StdDuration::from_millis(10)).await;
                    running.fetch_sub(1, Ordering::SeqCst);
                    Ok::<_, HandlerError>(())
                }
            }
        })
        .build()
        .expect("build");
    let jobs: Vec<NewJob> = (0..30)
        .map(|n| Task { n }.to_job().queue("slots"))
        .collect();
    let ids: Vec<JobId> = h
        .backend
        .push_batch(jobs)
        .await
        .expect("push")
        .iter()
        .map(|o| o.id())
        .collect();
    let handle = worker.start();
    for id in ids {
        within("every job", handle.wait_for(id))
            .await
            .expect("wait_for");
    }
    handle.shutdown_within(LIVENESS).await;
    let seen = pulls.seen.lock().expect("lock");
    assert!(!seen.is_empty());
    for &(batch, running) in seen.iter() {
        assert!(
            batch as usize + running <= CONCURRENCY as usize,
            "a pull of {batch} with {running} handlers running: {seen:?}"
        );
    }
}

/// Records each pull's batch beside the handlers running when it is made.
#[derive(Debug)]
struct PullsBeside {
    running: Arc<AtomicUsize>,
    seen: Mutex<Vec<(u32, usize)>>,
}

#[async_trait::async_trait]
impl crate::faults::Faults for PullsBeside {
    async fn pull(
        &self,
        inner: &dyn Backend,
        request: &relayq_core::PullRequest,
    ) -> relayq_core::Result<Vec<relayq_core::LeasedJob>> {
        let running = self.running.load(Ordering::SeqCst);
        self.seen
            .lock()
            .expect("lock")
            .push((request.batch, running));
        inner.pull(request).await
    }
}

/// A renewal that never comes back is abandoned after a third of the
/// lease and the next one sent: a job running for several leases keeps
/// its lease through it, and runs once.
pub async fn worker_renews_past_a_renewal_that_hangs(h: Harness) {
    let backend: Arc<dyn Backend> = Arc::new(Faulty::new(
        Arc::clone(&h.backend),
        FirstRenewalHangs::default(),
    ));
    let worker = Worker::builder(backend)
        .state(h.clone())
        // Long enough that the renewal sent after the hung one has half a
        // second to be answered before the worker gives the lease up, on
        // a loaded machine too.
        .lease(StdDuration::from_millis(1_500))
        .handle(|_: Task, _ctx: JobContext<Harness>| async move {
            tokio::time::sleep(StdDuration::from_millis(3_000)).await;
            Ok::<_, HandlerError>(())
        })
        .build()
        .expect("build");
    let id = h.push(Task { n: 1 }.to_job()).await;
    let running = worker.start();
    let job = within("the long job", running.wait_for(id))
        .await
        .expect("wait_for");
    assert_eq!((job.status, job.attempts), (JobStatus::Done, 1));
    running.shutdown_within(LIVENESS).await;
}

/// A store whose first lease renewal is never answered.
#[derive(Debug, Default)]
struct FirstRenewalHangs {
    renewals: AtomicUsize,
}

#[async_trait::async_trait]
impl crate::faults::Faults for FirstRenewalHangs {
    async fn extend_batch(
        &self,
        inner: &dyn Backend,
        leases: &[relayq_core::Lease],
        by: Duration,
    ) -> relayq_core::Result<Vec<Option<time::OffsetDateTime>>> {
        if self.renewals.fetch_add(1, Ordering::SeqCst) == 0 {
            std::future::pending::<()>().await;
        }
        inner.extend_batch(leases, by).await
    }
}

/// A job whose pull is answered after its lease could have ended on the
/// store (a slow store, a stalled process) is not started: another worker
/// may hold the job by then, and both would run it at once.
pub async fn worker_does_not_start_a_job_pulled_too_late_to_hold(h: Harness) {
    let lease = StdDuration::from_millis(600);
    let late = Arc::new(LatePull {
        answer_after: lease,
        leased: tokio::sync::Notify::new(),
        answered: tokio::sync::Notify::new(),
        delayed: std::sync::atomic::AtomicBool::new(false),
    });
    let backend: Arc<dyn Backend> =
        Arc::new(Faulty::new(Arc::clone(&h.backend), Arc::clone(&late)));
    let started = Arc::new(AtomicUsize::new(0));
    // One runner and no buffer: no other pull of this worker can take the
    // job back once its lease has ended.
    let worker = Worker::builder(backend)
        .state(h.clone())
        .queues(["late"])
        .concurrency(1)
        .prefetch(0)
        .lease(lease)
        .handle({
            let started = Arc::clone(&started);
            move |_: Task, _ctx: JobContext<Harness>| {
                started.fetch_add(1, Ordering::SeqCst);
                async { Ok::<_, HandlerError>(0) }
            }
        })
        .build()
        .expect("build");
    let id = h.push(Task { n: 1 }.to_job().queue("late")).await;
    let running = worker.start();
    within("the worker's pull to lease the job", late.leased.notified()).await;
    // The lease ends on the store, and another worker takes the job over
    // while the first pull's answer is on its way.
    h.advance(Duration::milliseconds(700));
    let rival = h.pull_one("late").await;
    assert_eq!(rival.lease.job_id, id);
    within("the late answer", late.answered.notified()).await;
    // Time for the worker to start the job, were it to; the shutdown then
    // ends whatever it started.
    tokio::time::sleep(StdDuration::from_millis(300)).await;
    running.shutdown_within(LIVENESS).await;
    assert_eq!(
        started.load(Ordering::SeqCst),
        0,
        "the job was started though its lease had ended before its pull returned"
    );
    h.backend
        .complete(&rival.lease, None)
        .await
        .expect("the rival's lease holds");
}

/// The first pull that leases jobs answers `answer_after` it was sent.
#[derive(Debug)]
struct LatePull {
    answer_after: StdDuration,
    /// Told once that pull has leased its jobs.
    leased: tokio::sync::Notify,
    /// Told once it has answered.
    answered: tokio::sync::Notify,
    delayed: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl crate::faults::Faults for LatePull {
    async fn pull(
        &self,
        inner: &dyn Backend,
        request: &relayq_core::PullRequest,
    ) -> relayq_core::Result<Vec<relayq_core::LeasedJob>> {
        let sent = tokio::time::Instant::now();
        let jobs = inner.pull(request).await?;
        if jobs.is_empty() || self.delayed.swap(true, Ordering::SeqCst) {
            return Ok(jobs);
        }
        self.leased.notify_one();
        tokio::time::sleep_until(sent + self.answer_after).await;
        self.answered.notify_one();
        Ok(jobs)
    }
}

/// Renewals the store never makes.
#[derive(Debug, Clone, Copy)]
enum BrokenRenewals {
    /// Each fails at once.
    Fail,
    /// None is ever answered.
    Hang,
    /// Each panics.
    Panic,
}

#[async_trait::async_trait]
impl crate::faults::Faults for BrokenRenewals {
    async fn extend_batch(
        &self,
        _inner: &dyn Backend,
        _leases: &[relayq_core::Lease],
        _by: Duration,
    ) -> relayq_core::Result<Vec<Option<time::OffsetDateTime>>> {
        match self {
            Self::Fail => Err(relayq_core::Error::backend("the store is unreachable")),
            Self::Hang => std::future::pending().await,
            Self::Panic => panic!("a backend's bug in extend_batch"),
        }
    }
}

/// Shutdown stops pulling at once, lets in-flight jobs finish within the
/// deadline, then releases the rest: `Pending`, the attempt given back,
/// eligible for another worker without waiting for the lease to expire.
pub async fn worker_shutdown_finishes_in_flight_then_releases(h: Harness) {
    let worker = h
        .worker()
        .concurrency(4)
        .handle(|task: Task, ctx: JobContext<Harness>| async move {
            match task.n {
                // Finishes once shutdown begins, enqueueing a job that no
                // one may pull any more.
                1 => {
                    ctx.shutdown_requested().await;
                    ctx.state().push(Task { n: 3 }.to_job()).await;
                    Ok::<_, HandlerError>(())
                }
                // Never finishes by itself.
                _ => std::future::pending().await,
            }
        })
        .build()
        .expect("build");
    let mut events = worker.events();
    let finishing = h.push(Task { n: 1 }.to_job()).await;
    let stuck = h.push(Task { n: 2 }.to_job()).await;
    let running = worker.start();
    starts(&mut events, 2, "both jobs to start").await;

    // A grace period the finishing job's push fits in on a loaded box
    // (with 1 s it once did not, with the whole suite running on 2 cores).
    let report = within(
        "shutdown",
        running.shutdown_within(StdDuration::from_secs(3)),
    )
    .await;
    // One finished in the grace period and one released; and the job
    // pushed during the shutdown, if a pull sent just before it began (on
    // a sign that the subscription was made, say) caught it: released too.
    assert_eq!(report.finished, 1, "{report:?}");
    assert!(
        matches!(report.released, 1 | 2),
        "the stuck job released, perhaps the pushed one: {report:?}"
    );

    assert_eq!(h.job(finishing).await.status, JobStatus::Done);
    let job = h.job(stuck).await;
    assert_eq!(
        (job.status, job.attempts, job.locked_until),
        (JobStatus::Pending, 0, None),
        "released with the attempt given back"
    );
    // Another worker gets both the released job and the one pushed during
    // shutdown, at once.
    let leased = h.pull("default", 10).await;
    let mut ids: Vec<JobId> = leased.iter().map(|l| l.job.id).collect();
    ids.sort_unstable();
    assert_eq!(ids.len(), 2, "{ids:?}");
    assert_eq!(ids[0], stuck);
    let third = leased
        .iter()
        .find(|l| l.job.id != stuck)
        .expect("the job pushed during shutdown");
    assert_eq!(*third.job.payload, json!({ "n": 3 }));
    assert_eq!(third.job.attempts, 1, "never started before");
}

/// A job a worker gives back at shutdown is taken at once by an idle
/// worker of the same store, which polls only once a minute: the release
/// wakes it (on a backend that declares wake-ups).
pub async fn worker_shutting_down_hands_its_jobs_to_an_idle_one(h: Harness) {
    let caps = h.backend.capabilities();
    if !caps.in_process_wakeups && !caps.cross_process_wakeups {
        return;
    }
    let build = |queue: &str| {
        h.worker()
            .queues([queue])
            .poll_interval(StdDuration::from_secs(60))
            .handle(|task: Task, _ctx: JobContext<Harness>| async move {
                if task.n == 1 {
                    // Runs until the shutdown's deadline stops it.
                    std::future::pending::<()>().await;
                }
                Ok::<_, HandlerError>(())
            })
            .build()
            .expect("build")
    };
    let leaving = build("handover");
    let mut events = leaving.events();
    let id = h.push(Task { n: 1 }.to_job().queue("handover")).await;
    let running = leaving.start();
    starts(&mut events, 1, "the job to start").await;
    // The idle worker has pulled, found nothing, and waits.
    let staying = build("handover").start();
    tokio::time::sleep(StdDuration::from_millis(200)).await;
    let report = within("shutdown", running.shutdown_within(StdDuration::ZERO)).await;
    assert_eq!(report.released, 1, "{report:?}");
    // Its next attempt must not finish (its handler never does), so watch
    // for it to start instead.
    within("the other worker to take the released job", async {
        loop {
            let job = h.job(id).await;
            if job.status == JobStatus::Processing && job.attempts == 1 {
                return;
            }
            tokio::time::sleep(StdDuration::from_millis(20)).await;
        }
    })
    .await;
    staying.shutdown_within(StdDuration::ZERO).await;
}

/// Waits for the outcome of job `id`'s next finished attempt.
async fn outcome_of(events: &mut relayq_core::EventStream, id: JobId) -> Outcome {
    within("the job's outcome", async {
        loop {
            match events.recv().await {
                Some(Event::Finished { job, outcome }) if job.id == id => return outcome,
                Some(_) => {}
                None => panic!("the worker is gone"),
            }
        }
    })
    .await
}

/// Waits until `jobs` jobs of the default queue are done.
async fn all_done(h: &Harness, jobs: usize) {
    within("every job to be done", async {
        loop {
            let stats = h.backend.stats().await.expect("stats");
            if stats.queue("default").done == jobs as u64 {
                return;
            }
            tokio::time::sleep(StdDuration::from_millis(20)).await;
        }
    })
    .await;
}

/// Waits until `n` more attempts have started (`what` names them if not).
async fn starts(events: &mut relayq_core::EventStream, n: usize, what: &str) {
    within(what, async {
        let mut started = 0;
        while started < n {
            match events.recv().await {
                Some(Event::Started { .. }) => started += 1,
                Some(_) => {}
                None => panic!("the worker is gone"),
            }
        }
    })
    .await;
}

/// A handler that finishes after its lease was lost (expired and taken by
/// another puller) has its result discarded: the completion (batched or
/// not) is still fenced, and the new holder keeps the job.
///
/// One slot and no prefetch keep the worker from pulling while its job
/// runs: otherwise a pull of its own, sent between the handler's clock
/// jump and its steal, takes the expired job first and runs it again.
pub async fn worker_discards_the_result_of_a_lost_lease(h: Harness) {
    let worker = h
        .worker()
        .concurrency(1)
        .prefetch(0)
        .handle(|_task: Task, ctx: JobContext<Harness>| async move {
            let h = ctx.state();
            // Long before the first renewal (a third of the 30 s lease), the
            // lease expires on the store's clock and another puller takes it.
            h.advance(Duration::seconds(31));
            let stolen = h.pull(&ctx.job().queue, 1).await;
            assert_eq!(stolen.len(), 1, "the expired job is pulled again");
            Ok::<_, HandlerError>("too late")
        })
        .build()
        .expect("build");
    let mut events = worker.events();
    let id = h.push(Task { n: 1 }.to_job()).await;
    let running = worker.start();
    let outcome = outcome_of(&mut events, id).await;
    running.shutdown_within(LIVENESS).await;
    assert_eq!(outcome, Outcome::LeaseLost);
    let job = h.job(id).await;
    assert_eq!(
        (job.status, job.attempts, job.result),
        (JobStatus::Processing, 2, None),
        "the second holder owns it"
    );
}

/// When renewing finds the lease gone, the worker stops the handler and
/// records nothing: the new holder's lease stays intact.
/// (One slot and no prefetch, as in
/// [`worker_discards_the_result_of_a_lost_lease`].)
pub async fn worker_stops_a_handler_whose_lease_was_taken(h: Harness) {
    const LEASE: StdDuration = StdDuration::from_millis(300);
    let worker = h
        .worker()
        .concurrency(1)
        .prefetch(0)
        .lease(LEASE)
        .handle(|_task: Task, ctx: JobContext<Harness>| async move {
            let h = ctx.state();
            h.advance(std_to_time(LEASE) + Duration::seconds(1));
            let stolen = h.pull(&ctx.job().queue, 1).await;
            assert_eq!(stolen.len(), 1, "the expired job is pulled again");
            // Would run forever: only the worker can stop it.
            std::future::pending::<()>().await;
            Ok::<_, HandlerError>(())
        })
        .build()
        .expect("build");
    let mut events = worker.events();
    let id = h.push(Task { n: 1 }.to_job()).await;
    let running = worker.start();
    let outcome = outcome_of(&mut events, id).await;
    assert_eq!(outcome, Outcome::LeaseLost);
    let report = running.shutdown_within(LIVENESS).await;
    assert_eq!(report.released, 0, "nothing left to release");
    let job = h.job(id).await;
    assert_eq!((job.status, job.attempts), (JobStatus::Processing, 2));
    assert_eq!(job.locked_until, Some(h.now() + Duration::seconds(30)));
}

/// Two workers draining one queue of quick jobs at once (so each keeps a
/// prefetch buffer of leased jobs) run every job exactly once.
pub async fn worker_pair_runs_every_job_exactly_once(h: Harness) {
    const JOBS: usize = 1_000;
    let runs: Arc<Vec<AtomicUsize>> = Arc::new((0..JOBS).map(|_| AtomicUsize::new(0)).collect());
    let build = |runs: Arc<Vec<AtomicUsize>>| {
        h.worker()
            .concurrency(4)
            .handle(move |task: Task, _ctx: JobContext<Harness>| {
                let runs = Arc::clone(&runs);
                async move {
                    let n = usize::try_from(task.n).expect("n");
                    runs[n].fetch_add(1, Ordering::SeqCst);
                    Ok::<_, HandlerError>(())
                }
            })
            .build()
            .expect("build")
    };
    let (first, second) = (build(Arc::clone(&runs)), build(Arc::clone(&runs)));
    let jobs: Vec<NewJob> = (0..JOBS).map(|n| Task { n: n as i64 }.to_job()).collect();
    h.backend.push_batch(jobs).await.expect("push_batch");
    let (a, b) = (first.start(), second.start());
    all_done(&h, JOBS).await;
    let (ra, rb) = (
        a.shutdown_within(LIVENESS).await,
        b.shutdown_within(LIVENESS).await,
    );
    assert_eq!(
        (ra.released, rb.released),
        (0, 0),
        "nothing left to give back"
    );
    let twice: Vec<usize> = (0..JOBS)
        .filter(|&n| runs[n].load(Ordering::SeqCst) != 1)
        .collect();
    assert!(twice.is_empty(), "jobs not run exactly once: {twice:?}");
}

/// One worker drains a mix of quick jobs, slow ones and ones that fail
/// their first attempt: every job succeeds exactly once (those that failed,
/// at their second attempt), and no more than `concurrency` handlers ever
/// run at once, however the worker spreads its jobs over its threads.
pub async fn worker_drains_a_mixed_queue_exactly_once_within_concurrency(h: Harness) {
    const JOBS: usize = 1_500;
    const CONCURRENCY: usize = 6;
    let successes: Arc<Vec<AtomicUsize>> =
        Arc::new((0..JOBS).map(|_| AtomicUsize::new(0)).collect());
    let overlap = Arc::new(Overlap::default());
    let (s, o) = (Arc::clone(&successes), Arc::clone(&overlap));
    let worker = h
        .worker()
        .concurrency(u32::try_from(CONCURRENCY).expect("small"))
        .handle(move |task: Task, ctx: JobContext<Harness>| {
            let (successes, overlap) = (Arc::clone(&s), Arc::clone(&o));
            async move {
                let _running = overlap.enter();
                let n = usize::try_from(task.n).expect("n");
                if n % 97 == 0 {
                    tokio::time::sleep(StdDuration::from_millis(20)).await;
                }
                if n % 13 == 0 && ctx.attempt() == 1 {
                    Err(HandlerError::new("fails once").retry_after(StdDuration::ZERO))
                } else {
                    successes[n].fetch_add(1, Ordering::SeqCst);
                    Ok(())
                }
            }
        })
        .build()
        .expect("build");
    let jobs: Vec<NewJob> = (0..JOBS).map(|n| Task { n: n as i64 }.to_job()).collect();
    let ids: Vec<_> = h
        .backend
        .push_batch(jobs)
        .await
        .expect("push_batch")
        .iter()
        .map(|o| o.id())
        .collect();
    let running = worker.start();
    all_done(&h, JOBS).await;
    let report = running.shutdown_within(LIVENESS).await;
    assert_eq!(report.released, 0, "{report:?}");
    let wrong: Vec<usize> = (0..JOBS)
        .filter(|&n| successes[n].load(Ordering::SeqCst) != 1)
        .collect();
    assert!(
        wrong.is_empty(),
        "jobs not succeeding exactly once: {wrong:?}"
    );
    let peak = overlap.peak();
    assert!(peak <= CONCURRENCY, "{peak} handlers ran at once");
    for n in (0..JOBS).step_by(13) {
        let job = h.job(ids[n]).await;
        assert_eq!((job.status, job.attempts), (JobStatus::Done, 2), "job {n}");
    }
}

/// Jobs a worker leased ahead of a free slot (its prefetch buffer) are
/// given back at once on shutdown, the attempt not spent, while the running
/// job finishes.
pub async fn worker_shutdown_releases_prefetched_jobs(h: Harness) {
    let worker = h
        .worker()
        .concurrency(1)
        // Buffered jobs are given back after a poll interval's wait.
        .poll_interval(LIVENESS)
        .handle(|task: Task, ctx: JobContext<Harness>| async move {
            if task.n == 0 {
                ctx.shutdown_requested().await;
                return Ok::<_, HandlerError>(());
            }
            std::future::pending().await
        })
        .build()
        .expect("build");
    let mut events = worker.events();
    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(h.push(Task { n }.to_job()).await);
    }
    let running = worker.start();
    // The first job runs on the only slot; the pull that filled it came back
    // full with the slot waiting, so the worker leases one more ahead.
    within("a job leased ahead of the busy slot", async {
        status_reached(&h, ids[1], JobStatus::Processing).await;
    })
    .await;
    // Leased by the same pull as the next, perhaps, so started only now.
    starts(&mut events, 1, "the first job to start").await;
    let report = within(
        "shutdown",
        running.shutdown_within(StdDuration::from_secs(5)),
    )
    .await;
    assert_eq!(report.finished, 1, "{report:?}");
    assert!(report.released >= 1, "{report:?}");
    assert_eq!(h.job(ids[0]).await.status, JobStatus::Done);
    for &id in &ids[1..] {
        let job = h.job(id).await;
        assert_eq!(
            (job.status, job.attempts, job.locked_until),
            (JobStatus::Pending, 0, None),
            "job {id} is back, its attempt not spent"
        );
    }
}

/// Releases that fail transiently at every try, and so are made again,
/// give up at the shutdown's deadline, not a lease later: a store that
/// stays down does not hold the shutdown up. Its jobs keep their leases
/// (they come back when those end).
pub async fn worker_shutdown_gives_up_failing_releases_at_its_deadline(h: Harness) {
    /// Every release fails, as with the store unreachable.
    #[derive(Debug)]
    struct ReleasesDown;
    #[async_trait::async_trait]
    impl crate::faults::Faults for ReleasesDown {
        async fn release(
            &self,
            _inner: &dyn Backend,
            _lease: &relayq_core::Lease,
        ) -> relayq_core::Result<()> {
            Err(relayq_core::Error::transient("the store is unreachable"))
        }
    }
    let backend: Arc<dyn Backend> = Arc::new(Faulty::new(Arc::clone(&h.backend), ReleasesDown));
    let worker = Worker::builder(backend)
        .state(h.clone())
        .concurrency(1)
        // Failed writes are made again for up to a lease: far longer than
        // the shutdown may take.
        .lease(StdDuration::from_secs(3600))
        .poll_interval(LIVENESS)
        .handle(|task: Task, ctx: JobContext<Harness>| async move {
            if task.n == 0 {
                ctx.shutdown_requested().await;
            }
            Ok::<_, HandlerError>(())
        })
        .build()
        .expect("build");
    let mut events = worker.events();
    let mut ids = Vec::new();
    for n in 0..4 {
        ids.push(h.push(Task { n }.to_job()).await);
    }
    let running = worker.start();
    within("a job leased ahead of the busy slot", async {
        status_reached(&h, ids[1], JobStatus::Processing).await;
    })
    .await;
    starts(&mut events, 1, "the first job to start").await;
    let report = within(
        "a shutdown whose releases keep failing",
        running.shutdown_within(StdDuration::from_millis(300)),
    )
    .await;
    assert_eq!((report.finished, report.released), (1, 0), "{report:?}");
    assert_eq!(h.job(ids[0]).await.status, JobStatus::Done);
    let held = h.job(ids[1]).await;
    assert_eq!(
        (held.status, held.attempts),
        (JobStatus::Processing, 1),
        "not given back: its lease stands"
    );
}

/// Jobs leased ahead of the only slot, which a slow job then holds, are
/// given back once they have waited a poll interval, their attempt not
/// spent: another worker with a free slot runs them meanwhile, and the
/// first leases none again while its slot stays busy.
pub async fn worker_gives_back_jobs_held_behind_a_busy_slot(h: Harness) {
    const POLL: StdDuration = StdDuration::from_millis(200);
    let ids: Arc<Mutex<Vec<JobId>>> = Arc::default();
    let waiting = Arc::clone(&ids);
    let slow = h
        .worker()
        .concurrency(1)
        .poll_interval(POLL)
        .handle(move |task: Task, ctx: JobContext<Harness>| {
            let ids = Arc::clone(&waiting);
            async move {
                if task.n == 0 {
                    // Holds the slot until every other job is done.
                    let others: Vec<JobId> = ids.lock().expect("lock")[1..].to_vec();
                    for id in others {
                        status_reached(ctx.state(), id, JobStatus::Done).await;
                    }
                }
                Ok::<_, HandlerError>(())
            }
        })
        .build()
        .expect("build");
    for n in 0..3 {
        let id = h.push(Task { n }.to_job()).await;
        ids.lock().expect("lock").push(id);
    }
    let ids: Vec<JobId> = ids.lock().expect("lock").clone();
    let slow = slow.start();
    // The first job runs on the only slot; the pull that filled it came back
    // full with the slot waiting, so the worker leases one more ahead (the
    // next in line): watched for as leased once and pending again, not
    // caught while leased, which a loaded machine may miss.
    within(
        "a job leased ahead of the busy slot to be given back",
        async {
            loop {
                let job = h.job(ids[1]).await;
                if job.lease_token > 0 && job.status == JobStatus::Pending {
                    return;
                }
                tokio::time::sleep(StdDuration::from_millis(10)).await;
            }
        },
    )
    .await;
    // Each job's fencing token now: a lease granted later raises it, even
    // one given back again (which restores the attempt).
    let mut tokens = Vec::new();
    for &id in &ids[1..] {
        tokens.push(h.job(id).await.lease_token);
    }
    tokio::time::sleep(2 * POLL).await;
    for (&id, token) in ids[1..].iter().zip(tokens) {
        let job = h.job(id).await;
        assert_eq!(
            (job.status, job.attempts, job.lease_token),
            (JobStatus::Pending, 0, token),
            "job {id}: given back with its attempt, none leased again by a worker with no free slot"
        );
    }
    let other = h
        .worker()
        .poll_interval(POLL)
        .handle(|_task: Task, _ctx: JobContext<Harness>| async move { Ok::<_, HandlerError>(()) })
        .build()
        .expect("build")
        .start();
    for &id in &ids {
        within(
            "every job to be done",
            status_reached(&h, id, JobStatus::Done),
        )
        .await;
        assert_eq!(h.job(id).await.attempts, 1, "job {id} ran once");
    }
    slow.shutdown_within(LIVENESS).await;
    other.shutdown_within(LIVENESS).await;
}

/// A job leased ahead of a free slot (the prefetch buffer) keeps its lease
/// renewed while it waits, like a running one: no other puller gets it.
pub async fn worker_renews_the_leases_of_prefetched_jobs(h: Harness) {
    const LEASE: StdDuration = StdDuration::from_millis(600);
    let lease = std_to_time(LEASE);
    let problems: Arc<Mutex<Vec<String>>> = Arc::default();
    let (report, ids) = (Arc::clone(&problems), Arc::new(Mutex::new(Vec::new())));
    let waiting = Arc::clone(&ids);
    let worker = h
        .worker()
        .concurrency(1)
        .lease(LEASE)
        // Buffered jobs are given back after a poll interval's wait.
        .poll_interval(LIVENESS)
        .handle(move |task: Task, ctx: JobContext<Harness>| {
            let (problems, ids) = (Arc::clone(&report), Arc::clone(&waiting));
            async move {
                if task.n != 0 {
                    return Ok::<_, HandlerError>(());
                }
                let h = ctx.state();
                let buffered: JobId = ids.lock().expect("lock")[1];
                // The first job holds the only slot until the next one is
                // leased ahead of it.
                within(
                    "a job leased ahead of the busy slot",
                    status_reached(h, buffered, JobStatus::Processing),
                )
                .await;
                if let Some(problem) = watch_renewals(h, buffered, &ctx.job().queue, lease, 4).await
                {
                    problems.lock().expect("lock").push(problem);
                }
                Ok(())
            }
        })
        .build()
        .expect("build");
    // Two jobs only: once the second is leased ahead, nothing is pending,
    // so any job another puller gets was taken from the worker.
    push_and_finish_each_once(&h, worker, &ids, 2).await;
    assert_eq!(*problems.lock().expect("lock"), Vec::<String>::new());
}

/// A long job leased in the same pull as quick ones keeps its lease
/// renewed after they have finished and their leases were let go: each
/// lease is renewed for as long as its own job holds it.
pub async fn worker_renews_a_long_job_leased_with_quick_ones(h: Harness) {
    const LEASE: StdDuration = StdDuration::from_millis(600);
    let lease = std_to_time(LEASE);
    let problems: Arc<Mutex<Vec<String>>> = Arc::default();
    let (report, ids) = (Arc::clone(&problems), Arc::new(Mutex::new(Vec::new())));
    let quick = Arc::clone(&ids);
    let worker = h
        .worker()
        .concurrency(4)
        .lease(LEASE)
        .handle(move |task: Task, ctx: JobContext<Harness>| {
            let (problems, quick) = (Arc::clone(&report), Arc::clone(&quick));
            async move {
                if task.n != 0 {
                    return Ok::<_, HandlerError>(());
                }
                let h = ctx.state();
                let quick: Vec<JobId> = quick.lock().expect("lock")[1..].to_vec();
                within("the quick jobs leased with the long one", async {
                    for id in quick {
                        status_reached(h, id, JobStatus::Done).await;
                    }
                })
                .await;
                if let Some(problem) = watch_renewals(h, ctx.id(), &ctx.job().queue, lease, 4).await
                {
                    problems.lock().expect("lock").push(problem);
                }
                Ok(())
            }
        })
        .build()
        .expect("build");
    // All pushed before the worker starts, which leases them in one pull
    // for its four free slots: the long job first, then three quick ones.
    push_and_finish_each_once(&h, worker, &ids, 4).await;
    assert_eq!(*problems.lock().expect("lock"), Vec::<String>::new());
}
