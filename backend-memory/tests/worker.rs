//! The worker's API on the memory backend: builder checks, handler styles,
//! state, test mode, inline mode, typed assertions, events and wait_for.
//! (The behaviour every backend shares is in the conformance suite.)

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration as StdDuration;

use relayq_conformance::EPOCH;
use relayq_conformance::faults::{Faults, Faulty, PushDuringEmptyPull};
use relayq_core::{
    Backend, Capabilities, Error, Event, Handler, HandlerError, JobContext, JobStatus, JobType,
    ManualClock, NewJob, Observer, Outcome, Pusher, Result, Wakeups, Worker,
};
use relayq_memory::MemoryBackend;
use relayq_memory::testing::Inline;
use serde::{Deserialize, Serialize};
use serde_json::json;
use time::Duration;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Email {
    to: String,
}
impl JobType for Email {
    const KIND: &'static str = "email";
    const QUEUE: &'static str = "mail";
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Report {
    id: u32,
}
impl JobType for Report {
    const KIND: &'static str = "report";
}

fn store() -> (MemoryBackend, ManualClock) {
    let clock = ManualClock::new(EPOCH);
    (MemoryBackend::with_clock(Arc::new(clock.clone())), clock)
}

fn dyn_backend(b: &MemoryBackend) -> Arc<dyn Backend> {
    Arc::new(b.clone())
}

fn ok_email() -> impl Fn(Email, JobContext<()>) -> std::future::Ready<Result<String, HandlerError>>
+ Send
+ Sync
+ 'static {
    |e: Email, _ctx| std::future::ready(Ok(e.to))
}

#[test]
fn build_names_each_mistake() {
    let (b, _) = store();
    let field = |r: relayq_core::Result<Worker<()>>| r.expect_err("must fail").invalid_field();
    let email_worker = || Worker::builder(dyn_backend(&b)).handle(ok_email());

    assert_eq!(
        field(Worker::builder(dyn_backend(&b)).build()),
        Some("handlers")
    );
    assert_eq!(
        field(email_worker().handle(ok_email()).build()),
        Some("kind")
    );
    assert_eq!(
        field(
            email_worker()
                .retry_for::<Report>(relayq_core::RetryPolicy::default())
                .build()
        ),
        Some("retry_for")
    );
    // Another type of a handled kind: its settings would apply to a
    // handler it is not.
    #[derive(Serialize, Deserialize)]
    struct EmailV2 {
        to: String,
    }
    impl JobType for EmailV2 {
        const KIND: &'static str = "email";
    }
    assert_eq!(
        field(
            email_worker()
                .retry_for::<EmailV2>(relayq_core::RetryPolicy::default())
                .build()
        ),
        Some("retry_for")
    );
    assert_eq!(
        field(
            email_worker()
                .timeout_for::<EmailV2>(StdDuration::from_secs(1))
                .build()
        ),
        Some("timeout_for")
    );
    // Named after the handled type's own setting, it is not overwritten.
    assert_eq!(
        field(
            email_worker()
                .retry_for::<EmailV2>(relayq_core::RetryPolicy::default())
                .retry_for::<Email>(relayq_core::RetryPolicy::default())
                .build()
        ),
        Some("retry_for")
    );
    // A type whose every `to_job` push would be refused.
    #[derive(Serialize, Deserialize)]
    struct Never;
    impl JobType for Never {
        const KIND: &'static str = "never";
        const MAX_ATTEMPTS: i32 = 0;
    }
    assert_eq!(
        field(
            Worker::builder(dyn_backend(&b))
                .handle(|_: Never, _ctx: JobContext<()>| async { Ok::<_, HandlerError>(()) })
                .build()
        ),
        Some("max_attempts")
    );
    assert_eq!(
        field(
            email_worker()
                .retry(relayq_core::RetryPolicy::exponential().factor(0.5))
                .build()
        ),
        Some("retry")
    );
    assert_eq!(
        field(
            email_worker()
                .retry_for::<Email>(
                    relayq_core::RetryPolicy::exponential()
                        .base(StdDuration::from_secs(60))
                        .cap(StdDuration::from_secs(1))
                )
                .build()
        ),
        Some("retry_for")
    );
    assert_eq!(
        field(
            email_worker()
                .timeout_for::<Report>(StdDuration::from_secs(1))
                .build()
        ),
        Some("timeout_for")
    );
    assert_eq!(
        field(email_worker().concurrency(0).build()),
        Some("concurrency")
    );
    assert_eq!(
        field(email_worker().lease(StdDuration::from_millis(10)).build()),
        Some("lease")
    );
    assert_eq!(
        field(
            email_worker()
                .lease(StdDuration::from_secs(2 * 86_400))
                .build()
        ),
        Some("lease")
    );
    assert_eq!(
        field(email_worker().poll_interval(StdDuration::ZERO).build()),
        Some("poll_interval")
    );
    assert_eq!(field(email_worker().queue("").build()), Some("queue"));
}

#[test]
fn queues_default_to_the_registered_kinds() {
    let (b, _) = store();
    let worker = Worker::builder(dyn_backend(&b))
        .handle(ok_email())
        .handle(|r: Report, _ctx| async move { Ok::<_, HandlerError>(r.id) })
        .build()
        .expect("build");
    assert_eq!(worker.queues(), ["default", "mail"]);
    assert_eq!(worker.kinds(), ["email", "report"]);
    let worker = Worker::builder(dyn_backend(&b))
        .handle(ok_email())
        .queue("a")
        .queue("b")
        .build()
        .expect("build");
    assert_eq!(worker.queues(), ["a", "b"]);
}

/// A `Handler` type gets a fresh value per job from the factory, built
/// from the shared state; closures registered before `state()` keep working.
#[tokio::test]
async fn handler_types_are_made_fresh_per_job_with_the_state() {
    struct App {
        greeting: String,
        made: AtomicUsize,
    }
    struct Greeter {
        greeting: String,
        seen: Vec<String>,
    }
    impl Handler<App> for Greeter {
        type Job = Email;
        type Output = Vec<String>;
        async fn run(
            mut self,
            job: Email,
            ctx: JobContext<App>,
        ) -> Result<Vec<String>, HandlerError> {
            // A fresh value: nothing from an earlier job is here.
            assert!(self.seen.is_empty());
            self.seen.push(format!(
                "{} {} (attempt {})",
                self.greeting,
                job.to,
                ctx.attempt()
            ));
            Ok(self.seen)
        }
    }

    let (b, _) = store();
    let worker = Worker::builder(dyn_backend(&b))
        .handle(|r: Report, _ctx| async move { Ok::<_, HandlerError>(r.id * 2) })
        .state(App {
            greeting: "hello".into(),
            made: AtomicUsize::new(0),
        })
        .handler(|app: &App| {
            app.made.fetch_add(1, Ordering::SeqCst);
            Greeter {
                greeting: app.greeting.clone(),
                seen: Vec::new(),
            }
        })
        .build()
        .expect("build");
    let a = b
        .push(Email { to: "ada".into() }.to_job())
        .await
        .expect("push")
        .id();
    let g = b
        .push(Email { to: "grace".into() }.to_job())
        .await
        .expect("push")
        .id();
    let r = b.push(Report { id: 21 }.to_job()).await.expect("push").id();
    let report = worker.run_until_idle().await.expect("run");
    assert_eq!(report.completed(), 3);
    assert_eq!(worker.state().made.load(Ordering::SeqCst), 2);
    let result = |id| {
        b.jobs()
            .into_iter()
            .find(|j| j.id == id)
            .and_then(|j| j.result)
    };
    assert_eq!(result(a), Some(json!(["hello ada (attempt 1)"])));
    assert_eq!(result(g), Some(json!(["hello grace (attempt 1)"])));
    assert_eq!(result(r), Some(json!(42)));
}

/// Test mode runs jobs in pull order, including jobs that handlers push,
/// and only what is due.
#[tokio::test]
async fn run_until_idle_is_deterministic() {
    let (b, clock) = store();
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = Arc::clone(&order);
    let worker = Worker::builder(dyn_backend(&b))
        .state(b.clone())
        .handle(move |r: Report, ctx: JobContext<MemoryBackend>| {
            let seen = Arc::clone(&seen);
            async move {
                seen.lock().expect("lock").push(r.id);
                if r.id == 1 {
                    // Pushed mid-run with a higher priority: runs next.
                    ctx.state()
                        .push(Report { id: 100 }.to_job().priority(-1))
                        .await?;
                    ctx.state()
                        .push(Report { id: 200 }.to_job().delay(Duration::minutes(5)))
                        .await?;
                }
                Ok::<_, HandlerError>(())
            }
        })
        .build()
        .expect("build");
    for id in [1, 2, 3] {
        b.push(Report { id }.to_job()).await.expect("push");
    }
    b.push(Report { id: 0 }.to_job().priority(5))
        .await
        .expect("push");
    assert_eq!(worker.run_until_idle().await.expect("run").ran(), 5);
    assert_eq!(*order.lock().expect("lock"), [1, 100, 2, 3, 0]);
    assert_eq!(
        b.enqueued::<Report>(),
        [Report { id: 200 }],
        "delayed one waits"
    );
    clock.advance(Duration::minutes(5));
    assert_eq!(worker.run_until_idle().await.expect("run").ran(), 1);
    assert_eq!(order.lock().expect("lock").last(), Some(&200));
    b.assert_not_enqueued::<Report>();
}

/// `run_until_idle` runs every handler in the task that calls it (SPEC's
/// test mode), not in tasks of its own: a test's task-local state, and
/// its panics, stay with the test.
#[tokio::test]
async fn run_until_idle_runs_handlers_in_the_calling_task() {
    let (b, _) = store();
    let tasks = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = Arc::clone(&tasks);
    let worker = Worker::builder(dyn_backend(&b))
        .handle(move |_: Report, _ctx: JobContext<()>| {
            let seen = Arc::clone(&seen);
            async move {
                seen.lock().expect("lock").push(tokio::task::try_id());
                tokio::task::yield_now().await;
                seen.lock().expect("lock").push(tokio::task::try_id());
                Ok::<_, HandlerError>(())
            }
        })
        .build()
        .expect("build");
    for id in [1, 2, 3] {
        b.push(Report { id }.to_job()).await.expect("push");
    }
    let caller = tokio::spawn(async move {
        assert_eq!(worker.run_until_idle().await.expect("run").ran(), 3);
        tokio::task::id()
    })
    .await
    .expect("the calling task");
    assert_eq!(*tasks.lock().expect("lock"), vec![Some(caller); 6]);
}

/// A `run_until_idle` dropped mid-run (here by a timeout) gives its job
/// back, its attempt with it: the very next call runs it, with no clock
/// moved and nothing awaited in between.
#[tokio::test]
async fn a_dropped_run_until_idle_gives_its_job_back() {
    let (b, _) = store();
    let calls = Arc::new(AtomicUsize::new(0));
    let worker = Worker::builder(dyn_backend(&b))
        .handle({
            let calls = Arc::clone(&calls);
            move |e: Email, _ctx: JobContext<()>| {
                let first = calls.fetch_add(1, Ordering::SeqCst) == 0;
                async move {
                    if first {
                        std::future::pending::<()>().await;
                    }
                    Ok::<_, HandlerError>(e.to)
                }
            }
        })
        .build()
        .expect("build");
    let id = b
        .push(Email { to: "a".into() }.to_job())
        .await
        .expect("push")
        .id();
    assert!(
        tokio::time::timeout(StdDuration::from_millis(50), worker.run_until_idle())
            .await
            .is_err(),
        "the first run never ends"
    );
    let report = worker.run_until_idle().await.expect("run");
    assert_eq!(report.completed(), 1);
    let job = b.get(id).await.expect("get").expect("job");
    assert_eq!((job.status, job.attempts), (JobStatus::Done, 1));
}

/// A run that never idles (its one job retried at once, for ever) ends
/// under a timeout: it yields between jobs. On the memory store nothing
/// else in it waits, so a timeout around it never got to fire, and the
/// thread spun for good.
#[test]
fn a_timeout_ends_a_run_that_never_idles() {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let (b, _) = store();
            let worker = Worker::builder(dyn_backend(&b))
                .handle(|_: Email, _ctx: JobContext<()>| async {
                    Err::<(), _>(HandlerError::new("again").retry_after(StdDuration::ZERO))
                })
                .build()
                .expect("build");
            let job = Email { to: "a".into() }.to_job().max_attempts(i32::MAX);
            b.push(job).await.expect("push");
            let run = worker.run_until_idle();
            let timed_out = tokio::time::timeout(StdDuration::from_millis(100), run)
                .await
                .is_err();
            let _ = tx.send(timed_out);
        });
    });
    assert_eq!(
        rx.recv_timeout(StdDuration::from_secs(20)),
        Ok(true),
        "the timeout ended the run"
    );
}

#[tokio::test]
async fn inline_push_runs_the_handler_at_once() {
    let (b, clock) = store();
    let runs = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&runs);
    let worker = Worker::builder(dyn_backend(&b))
        .handle(move |e: Email, _ctx| {
            counter.fetch_add(1, Ordering::SeqCst);
            async move { Ok::<_, HandlerError>(e.to) }
        })
        .build()
        .expect("build");
    let pusher: Arc<dyn Pusher> = Arc::new(Inline::new(worker));
    let id = pusher
        .push(Email { to: "ada".into() }.to_job())
        .await
        .expect("push")
        .id();
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    let job = b.jobs().into_iter().find(|j| j.id == id).expect("job");
    assert_eq!(
        (job.status, job.result),
        (JobStatus::Done, Some(json!("ada")))
    );

    // A delayed job is not due: stored, not run, until time moves.
    pusher
        .push(
            Email { to: "later".into() }
                .to_job()
                .delay(Duration::hours(1)),
        )
        .await
        .expect("push");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    b.assert_enqueued(|e: &Email| e.to == "later");
    clock.advance(Duration::hours(1));
    pusher
        .push_batch(vec![Email { to: "now".into() }.to_job()])
        .await
        .expect("push_batch");
    assert_eq!(runs.load(Ordering::SeqCst), 3);
    b.assert_not_enqueued::<Email>();
}

#[test]
#[should_panic(expected = "no pending \"email\" job matches; enqueued: #1 {\"to\":\"ada\"}")]
fn assert_enqueued_lists_what_is_there() {
    let (b, _) = store();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    rt.block_on(b.push(Email { to: "ada".into() }.to_job()))
        .expect("push");
    b.assert_enqueued(|e: &Email| e.to == "grace");
}

#[test]
#[should_panic(expected = "does not decode as")]
fn enqueued_refuses_to_hide_undecodable_jobs() {
    let (b, _) = store();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    rt.block_on(b.push(NewJob::new(Email::KIND, &json!({"wrong": 1}))))
        .expect("push");
    let _ = b.enqueued::<Email>();
}

#[tokio::test]
async fn events_and_wait_for() {
    let (b, _) = store();
    let worker = Worker::builder(dyn_backend(&b))
        .handle(|e: Email, _ctx| async move {
            if e.to.is_empty() {
                return Err(HandlerError::permanent("no recipient"));
            }
            Ok(e.to)
        })
        .build()
        .expect("build");
    let mut events = worker.events();
    let ok = b
        .push(Email { to: "ada".into() }.to_job())
        .await
        .expect("push")
        .id();
    let bad = b
        .push(Email { to: String::new() }.to_job())
        .await
        .expect("push")
        .id();
    worker.run_until_idle().await.expect("run");

    let mut seen = Vec::new();
    while let Some(event) = events.try_recv() {
        seen.push(event);
    }
    assert_eq!(seen.len(), 4, "{seen:?}");
    assert!(matches!(&seen[0], Event::Started { job } if job.id == ok && job.attempt == 1));
    assert_eq!(
        seen[1].outcome(),
        Some(&Outcome::Completed {
            result: Some(json!("ada"))
        })
    );
    assert_eq!(seen[3].job().id, bad);
    assert_eq!(
        seen[3].outcome(),
        Some(&Outcome::Dead {
            error: "no recipient".into()
        })
    );

    let job = worker.wait_for(ok).await.expect("wait_for");
    assert_eq!(job.result, Some(json!("ada")));
    assert_eq!(
        worker.wait_for(bad).await.expect("wait_for").status,
        JobStatus::Dead
    );
    assert!(matches!(
        worker.wait_for(999).await,
        Err(Error::NotFound { id: 999 })
    ));
}

/// Handler error messages are made storable: NUL becomes U+FFFD.
#[tokio::test]
async fn error_messages_with_nul_are_sanitized() {
    let (b, _) = store();
    let worker = Worker::builder(dyn_backend(&b))
        .handle(|_e: Email, _ctx| async move { Err::<(), _>(HandlerError::permanent("bad\0byte")) })
        .build()
        .expect("build");
    let id = b
        .push(Email { to: "x".into() }.to_job())
        .await
        .expect("push")
        .id();
    worker.run_until_idle().await.expect("run");
    let job = worker.wait_for(id).await.expect("wait_for");
    assert_eq!(job.last_error.as_deref(), Some("bad\u{FFFD}byte"));
}

/// On a started worker, a handler registered before `state()` keeps the
/// state it was registered with, one registered after gets the new one, and
/// both see the worker begin to shut down (their contexts share one view
/// of the worker per lane, built for adapted handlers per job).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn started_handlers_see_their_own_state_and_the_shutdown() {
    let (b, _) = store();
    let entered = Arc::new(tokio::sync::Semaphore::new(0));
    let wait_then = |entered: &Arc<tokio::sync::Semaphore>| {
        let entered = Arc::clone(entered);
        move |shutting_down_at_start: bool| {
            assert!(!shutting_down_at_start, "the worker is running");
            entered.add_permits(1);
        }
    };
    let (email_entered, report_entered) = (wait_then(&entered), wait_then(&entered));
    let worker = Worker::builder(dyn_backend(&b))
        .state(String::from("hello"))
        .handle(move |e: Email, ctx: JobContext<String>| {
            email_entered(ctx.is_shutting_down());
            async move {
                ctx.shutdown_requested().await;
                assert!(ctx.is_shutting_down());
                Ok::<_, HandlerError>(format!("{} {}", ctx.state(), e.to))
            }
        })
        .state(7u32)
        .handle(move |r: Report, ctx: JobContext<u32>| {
            report_entered(ctx.is_shutting_down());
            async move {
                ctx.shutdown_requested().await;
                Ok::<_, HandlerError>(r.id + *ctx.state())
            }
        })
        .concurrency(4)
        .build()
        .expect("build");
    let email = b
        .push(Email { to: "ada".into() }.to_job())
        .await
        .expect("push")
        .id();
    let report = b.push(Report { id: 35 }.to_job()).await.expect("push").id();
    let handle = worker.start();
    let both = entered.acquire_many(2);
    let _both = tokio::time::timeout(StdDuration::from_secs(20), both)
        .await
        .expect("both handlers started in time")
        .expect("semaphore open");
    let shutdown = handle.shutdown_within(StdDuration::from_secs(20)).await;
    assert_eq!((shutdown.finished, shutdown.released), (2, 0));
    let result = |id| {
        b.jobs()
            .into_iter()
            .find(|j| j.id == id)
            .and_then(|j| j.result)
    };
    assert_eq!(result(email), Some(json!("hello ada")));
    assert_eq!(result(report), Some(json!(42)));
}

/// Dropping the handle shuts the worker down: it stops pulling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_handle_stops_the_worker() {
    let (b, _) = store();
    let worker = Worker::builder(dyn_backend(&b))
        .poll_interval(StdDuration::from_millis(20))
        .handle(ok_email())
        .build()
        .expect("build");
    let first = b
        .push(Email { to: "a".into() }.to_job())
        .await
        .expect("push")
        .id();
    let handle = worker.start();
    tokio::time::timeout(StdDuration::from_secs(20), handle.wait_for(first))
        .await
        .expect("in time")
        .expect("wait_for");
    let mut events = worker.events();
    drop(handle);
    // Wait until the runner is surely gone: poll ticks would have pulled.
    tokio::time::sleep(StdDuration::from_millis(200)).await;
    let later = b
        .push(Email { to: "b".into() }.to_job())
        .await
        .expect("push")
        .id();
    tokio::time::sleep(StdDuration::from_millis(200)).await;
    assert!(events.try_recv().is_none(), "nothing ran after the drop");
    let job = b.jobs().into_iter().find(|j| j.id == later).expect("job");
    assert_eq!(job.status, JobStatus::Pending);
}

/// `Duration::MAX`, for "indefinitely", is a valid poll interval (wake-ups
/// only), shutdown timeout and grace period: each deadline is far off
/// instead of overflowing the clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn indefinite_durations_mean_far_off_deadlines() {
    let (b, _) = store();
    let worker = Worker::builder(dyn_backend(&b))
        .poll_interval(StdDuration::MAX)
        .shutdown_timeout(StdDuration::MAX)
        .handle(ok_email())
        .build()
        .expect("build");
    let handle = worker.start();
    let id = b
        .push(Email { to: "a".into() }.to_job())
        .await
        .expect("push")
        .id();
    tokio::time::timeout(StdDuration::from_secs(20), handle.wait_for(id))
        .await
        .expect("run on a wake-up")
        .expect("wait_for");
    let report = tokio::time::timeout(
        StdDuration::from_secs(20),
        handle.shutdown_within(StdDuration::MAX),
    )
    .await
    .expect("nothing in flight: at once");
    assert_eq!(report.released, 0);
    // Dropping a started handle stops the worker with the shutdown timeout.
    drop(worker.start());
}

/// A log that tests read back: what the worker warned of.
#[derive(Clone, Default)]
struct Log(Arc<std::sync::Mutex<Vec<u8>>>);

impl Log {
    /// Collects what this thread logs until the guard is dropped.
    fn capture(&self) -> tracing::subscriber::DefaultGuard {
        let log = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || log.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    fn lines_with(&self, needle: &str) -> Vec<String> {
        let text = String::from_utf8_lossy(&self.0.lock().expect("log")).into_owned();
        text.lines()
            .filter(|line| line.contains(needle))
            .map(str::to_owned)
            .collect()
    }
}

impl std::io::Write for Log {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A handler with no timeout that runs for long is logged, naming its job
/// and kind, once it has run ten minutes, and again as that time doubles;
/// one with a timeout, however long, is not.
#[tokio::test(start_paused = true)]
async fn a_handler_running_long_with_no_timeout_is_logged() {
    let log = Log::default();
    let _capture = log.capture();
    let (b, _) = store();
    let finish = Arc::new(tokio::sync::Notify::new());
    let worker = Worker::builder(dyn_backend(&b))
        .queues(["mail", "default"])
        .handle({
            let finish = Arc::clone(&finish);
            move |_: Email, _ctx: JobContext<()>| {
                let finish = Arc::clone(&finish);
                async move {
                    finish.notified().await;
                    Ok::<_, HandlerError>(())
                }
            }
        })
        .handle({
            let finish = Arc::clone(&finish);
            move |_: Report, _ctx: JobContext<()>| {
                let finish = Arc::clone(&finish);
                async move {
                    finish.notified().await;
                    Ok::<_, HandlerError>(())
                }
            }
        })
        .timeout_for::<Report>(StdDuration::from_secs(24 * 60 * 60))
        .build()
        .expect("build");
    let handle = worker.start();
    let email = b
        .push(Email { to: "a".into() }.to_job())
        .await
        .expect("push")
        .id();
    let report = b.push(Report { id: 1 }.to_job()).await.expect("push").id();
    let warned = |id| log.lines_with(&format!("job={id} kind=")).len();

    tokio::time::sleep(StdDuration::from_secs(9 * 60)).await;
    assert_eq!(warned(email), 0, "not before ten minutes");
    tokio::time::sleep(StdDuration::from_secs(2 * 60)).await;
    let lines = log.lines_with(&format!("job={email} kind=\"email\""));
    assert_eq!(lines.len(), 1, "once at ten minutes: {lines:?}");
    assert!(lines[0].contains("WARN") && lines[0].contains("no timeout"));
    tokio::time::sleep(StdDuration::from_secs(8 * 60)).await;
    assert_eq!(warned(email), 1, "not again before twenty minutes");
    tokio::time::sleep(StdDuration::from_secs(2 * 60)).await;
    assert_eq!(warned(email), 2, "again at twenty minutes");
    assert_eq!(warned(report), 0, "a handler with a timeout is not logged");

    finish.notify_waiters();
    for id in [email, report] {
        let done = handle.wait_for(id).await.expect("wait_for");
        assert_eq!(done.status, JobStatus::Done);
    }
    handle.shutdown().await;
}

/// A store whose wake-up subscription closes at once: the worker falls
/// back to polling, and tries to subscribe again every poll interval.
#[derive(Debug)]
struct ClosingWakeups {
    subscribes: Arc<AtomicUsize>,
    /// Whether subscribing again never ends (a listener that cannot
    /// reconnect and is not bounded).
    hang_again: bool,
    /// Whether the store declares instant writes, so that a lane listens,
    /// not the pull loop.
    instant_writes: bool,
}

#[async_trait::async_trait]
impl Faults for ClosingWakeups {
    fn capabilities(&self, _inner: &dyn Backend) -> Capabilities {
        Capabilities::none()
            .in_process_wakeups(true)
            .instant_writes(self.instant_writes)
    }

    async fn subscribe(&self, _inner: &dyn Backend, _queues: &[String]) -> Result<Option<Wakeups>> {
        if self.subscribes.fetch_add(1, Ordering::SeqCst) > 0 && self.hang_again {
            std::future::pending::<()>().await;
        }
        Ok(Some(Wakeups::from_stream(futures::stream::empty())))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_subscription_falls_back_to_polling() {
    polls_after_the_subscription_closed(false, false).await;
}

/// As [`a_closed_subscription_falls_back_to_polling`], where a lane
/// listens for the signals (a store with instant writes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_subscription_a_lane_listened_to_falls_back_to_polling() {
    polls_after_the_subscription_closed(false, true).await;
}

/// Subscribing again goes on beside the pull loop and the lanes: one that
/// never ends holds up neither the polls nor the shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_resubscription_holds_up_nothing() {
    polls_after_the_subscription_closed(true, false).await;
    polls_after_the_subscription_closed(true, true).await;
}

async fn polls_after_the_subscription_closed(hang_again: bool, instant_writes: bool) {
    let subscribes = Arc::new(AtomicUsize::new(0));
    runs_pushed_jobs_by_polling(ClosingWakeups {
        subscribes: Arc::clone(&subscribes),
        hang_again,
        instant_writes,
    })
    .await;
    assert!(
        subscribes.load(Ordering::SeqCst) >= 2,
        "the worker subscribes again after the subscription closed"
    );
}

/// A store whose first subscription is never answered (on PostgreSQL, a
/// LISTEN connection that cannot be opened while the server is at its
/// connection limit, for up to the acquire timeout).
#[derive(Debug)]
struct SubscriptionNeverAnswered {
    /// Whether the store declares wake-ups (one that does not may still
    /// be subscribed to).
    declared: bool,
    instant_writes: bool,
}

#[async_trait::async_trait]
impl Faults for SubscriptionNeverAnswered {
    fn capabilities(&self, _inner: &dyn Backend) -> Capabilities {
        Capabilities::none()
            .in_process_wakeups(self.declared)
            .instant_writes(self.instant_writes)
    }

    async fn subscribe(&self, _inner: &dyn Backend, _queues: &[String]) -> Result<Option<Wakeups>> {
        std::future::pending().await
    }
}

/// A worker pulls from its start, whether or not its subscription to
/// wake-ups is made yet: one never answered holds up neither its polls
/// nor its shutdown, also on a store that declares no wake-ups (whose
/// subscription was awaited before the first pull, for ever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_subscription_never_answered_holds_up_nothing() {
    for (declared, instant_writes) in [(true, false), (true, true), (false, false)] {
        runs_pushed_jobs_by_polling(SubscriptionNeverAnswered {
            declared,
            instant_writes,
        })
        .await;
    }
}

/// Pushes three jobs, 30 ms apart, to a one-runner worker polling every
/// 20 ms on the memory store with `faults`; each must run in time, and
/// the shutdown must not be held up.
async fn runs_pushed_jobs_by_polling(faults: impl Faults + 'static) {
    let (inner, _) = store();
    let backend = Arc::new(Faulty::new(Arc::new(inner), faults));
    // One runner, so one subscription at the start.
    let worker = Worker::builder(backend.clone())
        .concurrency(1)
        .poll_interval(StdDuration::from_millis(20))
        .handle(ok_email())
        .build()
        .expect("build");
    let running = worker.start();
    let mut ids = Vec::new();
    for to in ["a", "b", "c"] {
        ids.push(
            backend
                .push(Email { to: to.into() }.to_job())
                .await
                .expect("push")
                .id(),
        );
        tokio::time::sleep(StdDuration::from_millis(30)).await;
    }
    for id in ids {
        let job = tokio::time::timeout(StdDuration::from_secs(20), running.wait_for(id))
            .await
            .expect("polling finds it in time")
            .expect("wait_for");
        assert_eq!(job.status, JobStatus::Done);
    }
    tokio::time::timeout(
        StdDuration::from_secs(20),
        running.shutdown_within(StdDuration::from_secs(20)),
    )
    .await
    .expect("the shutdown is not held up");
}

/// A store with no wake-ups to give, or whose subscription fails.
#[derive(Debug)]
struct NoWakeups {
    subscribes: Arc<AtomicUsize>,
    /// Whether subscribing fails (the store declares wake-ups it cannot
    /// give now); else the store declares none and returns none.
    fails: bool,
    /// Whether a failing subscription panics (a backend's bug) rather than
    /// return an error.
    panics: bool,
    /// Whether the store declares instant writes, so that a lane listens,
    /// not the pull loop.
    instant_writes: bool,
}

#[async_trait::async_trait]
impl Faults for NoWakeups {
    fn capabilities(&self, _inner: &dyn Backend) -> Capabilities {
        Capabilities::none()
            .in_process_wakeups(self.fails)
            .instant_writes(self.instant_writes)
    }

    async fn subscribe(&self, _inner: &dyn Backend, _queues: &[String]) -> Result<Option<Wakeups>> {
        self.subscribes.fetch_add(1, Ordering::SeqCst);
        if self.fails && self.panics {
            panic!("a backend's bug in subscribe");
        }
        if self.fails {
            return Err(relayq_core::Error::transient("the listener is down"));
        }
        Ok(None)
    }
}

/// A store that declares no wake-ups and gives none: the worker polls,
/// and does not ask again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_without_wake_ups_is_polled() {
    for instant_writes in [false, true] {
        let subscribes = polls_without_wake_ups(false, false, instant_writes).await;
        assert_eq!(subscribes, 1, "asked once, by its one runner");
    }
}

/// A store whose subscription fails: the worker polls, and tries to
/// subscribe again every poll interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_subscription_falls_back_to_polling() {
    for instant_writes in [false, true] {
        let subscribes = polls_without_wake_ups(true, false, instant_writes).await;
        assert!(subscribes >= 2, "asked again after it failed: {subscribes}");
    }
}

/// A subscription that panics (a backend's bug) fails like one that
/// returns an error: the worker polls rather than end. (That it asks again
/// is the failed subscription's case: printing the panic's backtrace can
/// outlast this one's run.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_subscription_falls_back_to_polling() {
    for instant_writes in [false, true] {
        let subscribes = polls_without_wake_ups(true, true, instant_writes).await;
        assert!(subscribes >= 1, "{subscribes}");
    }
}

/// Runs three pushed jobs on a [`NoWakeups`] store (see
/// [`runs_pushed_jobs_by_polling`]); returns how often it subscribed.
async fn polls_without_wake_ups(fails: bool, panics: bool, instant_writes: bool) -> usize {
    let subscribes = Arc::new(AtomicUsize::new(0));
    runs_pushed_jobs_by_polling(NoWakeups {
        subscribes: Arc::clone(&subscribes),
        fails,
        panics,
        instant_writes,
    })
    .await;
    subscribes.load(Ordering::SeqCst)
}

/// On one runtime thread, a lane that keeps pulling quick jobs for itself
/// (it never waits while the queue has them) still lets the lease keeper
/// run: a long job leased with them keeps its lease, and runs once, however
/// long the quick jobs keep the lane busy.
#[tokio::test]
async fn a_lane_feeding_itself_lets_the_keeper_renew_on_one_thread() {
    const QUICK: usize = 100_000;
    let b = MemoryBackend::new();
    let quick_done = Arc::new(AtomicUsize::new(0));
    let long_runs = Arc::new(AtomicUsize::new(0));
    let (done, runs) = (Arc::clone(&quick_done), Arc::clone(&long_runs));
    let worker = Worker::builder(dyn_backend(&b))
        .queues(["default"])
        .concurrency(4)
        // A quarter of the time the quick jobs take here (about 2 s in a
        // debug build), yet long enough that a loaded machine's stalls do
        // not end it on the system clock.
        .lease(StdDuration::from_millis(500))
        .handle(move |_: Email, _ctx: JobContext<()>| {
            done.fetch_add(1, Ordering::SeqCst);
            std::future::ready(Ok::<_, HandlerError>(()))
        })
        .handle(move |_: Report, _ctx: JobContext<()>| {
            runs.fetch_add(1, Ordering::SeqCst);
            let done = Arc::clone(&quick_done);
            async move {
                while done.load(Ordering::SeqCst) < QUICK {
                    tokio::time::sleep(StdDuration::from_millis(5)).await;
                }
                Ok::<_, HandlerError>(())
            }
        })
        .build()
        .expect("build");
    let long = b.push(Report { id: 0 }.to_job()).await.expect("push").id();
    for _ in 0..QUICK / 1_000 {
        let jobs = (0..1_000).map(|_| Email { to: "q".into() }.to_job().queue("default"));
        b.push_batch(jobs.collect()).await.expect("push");
    }
    let running = worker.start();
    let job = tokio::time::timeout(StdDuration::from_secs(60), running.wait_for(long))
        .await
        .expect("the long job ends in time")
        .expect("wait_for");
    running.shutdown_within(StdDuration::from_secs(20)).await;
    assert_eq!(job.status, JobStatus::Done);
    assert_eq!(job.attempts, 1, "its lease never lapsed");
    assert_eq!(long_runs.load(Ordering::SeqCst), 1);
}

/// A worker whose lane makes the second pull: one slot and no buffer, so
/// the pull loop's first pull (for one job) comes back full, and the lane
/// pulls for itself when that job ends. The job (to "first") takes long
/// enough for the pull loop to be waiting by then; the poll interval is an
/// hour, so only wake-ups make it pull.
fn lane_pulling_worker(backend: &Arc<dyn Backend>) -> Worker<()> {
    Worker::builder(Arc::clone(backend))
        .queues(["mail"])
        .concurrency(1)
        .prefetch(0)
        .poll_interval(StdDuration::from_secs(3600))
        .handle(|e: Email, _ctx: JobContext<()>| async move {
            if e.to == "first" {
                tokio::time::sleep(StdDuration::from_millis(200)).await;
            }
            Ok::<_, HandlerError>(())
        })
        .build()
        .expect("build")
}

/// A push to an idle worker on the memory store wakes the lane that runs
/// the job, which pulls it itself: no hand-over from the pull loop (whose
/// first pull, at the start, found the queue empty). Three pushes, one
/// after another's job is done: in the microseconds between the pull
/// loop's logged first pull and its landing, the lane would leave the
/// push to the pull loop's pull then under way. Pulls are told apart by
/// task: one slot makes one runner (one pull loop, one lane), and a pull
/// runs in the task that sends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_to_an_idle_worker_is_pulled_by_the_lane_that_runs_it() {
    let (inner, _) = store();
    let log = Arc::new(PullLog::default());
    let backend: Arc<dyn Backend> = Arc::new(Faulty::new(dyn_backend(&inner), Arc::clone(&log)));
    let running = lane_pulling_worker(&backend).start();
    let pull_loop = once_some(|| log.first_puller(), "the pull loop pulls at the start").await;
    assert!(pull_loop.is_some(), "pulls are made in tasks");
    let mut pullers = Vec::new();
    for to in ["idle 1", "idle 2", "idle 3"] {
        let id = backend
            .push(Email { to: to.into() }.to_job())
            .await
            .expect("push")
            .id();
        let job = tokio::time::timeout(StdDuration::from_secs(20), running.wait_for(id))
            .await
            .expect("the push is heard: the poll interval is an hour")
            .expect("wait_for");
        assert_eq!(job.status, JobStatus::Done);
        pullers.push(log.pull_of(id).expect("pulled").0);
    }
    assert!(
        pullers.iter().any(|puller| *puller != pull_loop),
        "the lane pulled them, not the pull loop: {pullers:?}, pull loop {pull_loop:?}"
    );
    running.shutdown_within(StdDuration::from_secs(20)).await;
}

/// On the memory store only the first runner hears pushes: a push it has
/// no free slot for runs on a sibling runner at once (the first tells its
/// siblings with a free slot), not at the next poll tick an hour later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_the_listening_runner_has_no_slot_for_runs_on_a_sibling() {
    let (inner, _) = store();
    let backend = dyn_backend(&inner);
    let release = Arc::new(tokio::sync::Notify::new());
    let slow_started = Arc::new(AtomicUsize::new(0));
    let worker = {
        let (release, slow_started) = (Arc::clone(&release), Arc::clone(&slow_started));
        Worker::builder(backend.clone())
            // Two runners (one per runtime thread), a slot each, and no
            // buffer, from which a sibling would also take the job.
            .concurrency(2)
            .prefetch(0)
            .poll_interval(StdDuration::from_secs(3600))
            .handle(move |email: Email, _ctx: JobContext<()>| {
                let (release, slow_started) = (Arc::clone(&release), Arc::clone(&slow_started));
                async move {
                    if email.to == "slow" {
                        slow_started.fetch_add(1, Ordering::SeqCst);
                        release.notified().await;
                    }
                    Ok::<_, HandlerError>(email.to)
                }
            })
            .build()
            .expect("build")
    };
    let running = worker.start();
    // The runners' first pulls (of nothing) are over.
    tokio::time::sleep(StdDuration::from_millis(100)).await;
    let push = |to: &str| backend.push(Email { to: to.into() }.to_job());
    // Heard, pulled and begun by the first runner's lane: its one slot.
    let slow = push("slow").await.expect("push").id();
    once_some(
        || (slow_started.load(Ordering::SeqCst) > 0).then_some(()),
        "the slow job starts",
    )
    .await;
    let quick = push("quick").await.expect("push").id();
    let job = tokio::time::timeout(StdDuration::from_secs(20), running.wait_for(quick))
        .await
        .expect("a sibling runs it: the poll interval is an hour")
        .expect("wait_for");
    assert_eq!(job.status, JobStatus::Done);
    release.notify_one();
    let job = tokio::time::timeout(StdDuration::from_secs(20), running.wait_for(slow))
        .await
        .expect("in time")
        .expect("wait_for");
    assert_eq!(job.status, JobStatus::Done);
    running.shutdown_within(StdDuration::from_secs(20)).await;
}

/// Starts [`lane_pulling_worker`] on `backend` and waits until its first
/// job (to "first") is done: as that job ends, the lane pulls for itself.
async fn past_the_first_job(backend: &Arc<dyn Backend>) -> relayq_core::WorkerHandle<()> {
    let first = backend
        .push(Email { to: "first".into() }.to_job())
        .await
        .expect("push")
        .id();
    let running = lane_pulling_worker(backend).start();
    let done = tokio::time::timeout(StdDuration::from_secs(20), running.wait_for(first))
        .await
        .expect("in time")
        .expect("wait_for");
    assert_eq!(done.status, JobStatus::Done);
    running
}

/// A push whose wake-up comes while a lane's own pull is under way (on
/// the memory store the lane hears it, once that pull is over) is pulled
/// once the lane's pull comes back empty, not at the next poll tick.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_during_a_lanes_empty_pull_is_not_missed() {
    let (inner, _) = store();
    // The wait is long enough for the worker to hear of the push meanwhile.
    let racing = Arc::new(PushDuringEmptyPull::new(
        Email { to: "late".into() }.to_job(),
        StdDuration::from_millis(100),
    ));
    let backend: Arc<dyn Backend> = Arc::new(Faulty::new(Arc::new(inner), Arc::clone(&racing)));
    let running = past_the_first_job(&backend).await;
    let within = |id| tokio::time::timeout(StdDuration::from_secs(20), running.wait_for(id));
    let late = once_some(|| racing.pushed(), "an empty pull was made").await;
    let job = within(late)
        .await
        .expect("the late push is pulled before the next poll tick")
        .expect("wait_for");
    assert_eq!(job.status, JobStatus::Done);
    running.shutdown_within(StdDuration::from_secs(20)).await;
}

/// What `probe` returns once it returns something, looked at every 5 ms;
/// fails the test, saying `what` did not happen, after 20 s.
async fn once_some<T>(probe: impl Fn() -> Option<T>, what: &str) -> T {
    tokio::time::timeout(StdDuration::from_secs(20), async {
        loop {
            if let Some(found) = probe() {
                return found;
            }
            tokio::time::sleep(StdDuration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("in time: {what}"))
}

/// Notifies when dropped.
#[derive(Debug)]
struct NotifyOnDrop(Arc<tokio::sync::Notify>);

impl Drop for NotifyOnDrop {
    fn drop(&mut self) {
        self.0.notify_one();
    }
}

/// A store whose second pull, once it has leased its jobs, waits until the
/// test lets it return; it tells which tasks pulled, and when the worker
/// dropped its wake-up subscription (as its pull loop stops, just before
/// it gives its buffer back).
#[derive(Debug, Default)]
struct HeldSecondPull {
    pullers: Arc<std::sync::Mutex<Vec<Option<tokio::task::Id>>>>,
    entered: Arc<tokio::sync::Notify>,
    go_on: Arc<tokio::sync::Notify>,
    unsubscribed: Arc<tokio::sync::Notify>,
}

#[async_trait::async_trait]
impl Faults for HeldSecondPull {
    async fn subscribe(&self, inner: &dyn Backend, queues: &[String]) -> Result<Option<Wakeups>> {
        let Some(wakeups) = inner.subscribe(queues).await? else {
            return Ok(None);
        };
        let guard = NotifyOnDrop(Arc::clone(&self.unsubscribed));
        let signals = futures::stream::unfold((wakeups, guard), |(mut w, guard)| async move {
            w.next().await.map(|()| ((), (w, guard)))
        });
        Ok(Some(Wakeups::from_stream(signals)))
    }

    async fn pull(
        &self,
        inner: &dyn Backend,
        request: &relayq_core::PullRequest,
    ) -> Result<Vec<relayq_core::LeasedJob>> {
        let jobs = inner.pull(request).await?;
        let pulls = {
            let mut pullers = self.pullers.lock().expect("lock");
            pullers.push(tokio::task::try_id());
            pullers.len()
        };
        if pulls == 2 {
            self.entered.notify_one();
            self.go_on.notified().await;
        }
        Ok(jobs)
    }
}

/// A lane whose own pull lands after the worker began shutting down (its
/// buffer already given back) gives the jobs it leased back at once, the
/// attempt not spent, and the shutdown report counts them as released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lanes_pull_landing_after_the_shutdown_gives_its_jobs_back() {
    let (inner, _) = store();
    let faults = HeldSecondPull::default();
    let (entered, go_on) = (Arc::clone(&faults.entered), Arc::clone(&faults.go_on));
    let (pullers, unsubscribed) = (
        Arc::clone(&faults.pullers),
        Arc::clone(&faults.unsubscribed),
    );
    let memory = inner.clone();
    let backend: Arc<dyn Backend> = Arc::new(Faulty::new(Arc::new(inner), faults));
    let worker = lane_pulling_worker(&backend);
    let mut ids = Vec::new();
    for to in ["first", "second"] {
        let job = Email { to: to.into() }.to_job();
        ids.push(backend.push(job).await.expect("push").id());
    }
    let running = worker.start();
    tokio::time::timeout(StdDuration::from_secs(20), entered.notified())
        .await
        .expect("a second pull");
    {
        let pullers = pullers.lock().expect("lock");
        assert!(pullers[1].is_some(), "pulls are made in tasks");
        assert_ne!(
            pullers[0], pullers[1],
            "the lane made the second pull, not the pull loop"
        );
    }
    let shutdown = tokio::spawn(running.shutdown_within(StdDuration::from_secs(20)));
    // The pull loop saw the stop: it drops its subscription, then (in the
    // same poll) gives its empty buffer back.
    tokio::time::timeout(StdDuration::from_secs(20), unsubscribed.notified())
        .await
        .expect("the pull loop stops");
    tokio::time::sleep(StdDuration::from_millis(50)).await;
    go_on.notify_one();
    let report = tokio::time::timeout(StdDuration::from_secs(20), shutdown)
        .await
        .expect("in time")
        .expect("shutdown");
    // The first job ended before the shutdown (the lane pulled once it
    // had): only the late pull's job counts, as released.
    assert_eq!((report.finished, report.released), (0, 1));
    let second = memory
        .jobs()
        .into_iter()
        .find(|j| j.id == ids[1])
        .expect("job");
    assert_eq!(second.status, JobStatus::Pending);
    assert_eq!(second.attempts, 0, "given back, the attempt not spent");
}

/// Pushes `n` quick jobs to "mail", to `{prefix}0`…, and waits until
/// `running` has run them all: full pulls with slots waiting deepen each
/// runner's buffer.
async fn run_quick_jobs(
    backend: &Arc<dyn Backend>,
    running: &relayq_core::WorkerHandle<()>,
    prefix: &str,
    n: usize,
) {
    let jobs: Vec<NewJob> = (0..n)
        .map(|i| {
            Email {
                to: format!("{prefix}{i}"),
            }
            .to_job()
        })
        .collect();
    for outcome in backend.push_batch(jobs).await.expect("push") {
        tokio::time::timeout(StdDuration::from_secs(20), running.wait_for(outcome.id()))
            .await
            .expect("in time")
            .expect("wait_for");
    }
}

/// The task that made each pull, and the ids it returned.
#[derive(Debug, Default)]
struct PullLog(std::sync::Mutex<Vec<(Option<tokio::task::Id>, Vec<relayq_core::JobId>)>>);

impl PullLog {
    /// The ids pulled with `id`, by the pull that returned it.
    fn pulled_with(&self, id: relayq_core::JobId) -> Vec<relayq_core::JobId> {
        self.pull_of(id).map(|(_, ids)| ids).unwrap_or_default()
    }

    /// The pull that returned `id`.
    fn pull_of(
        &self,
        id: relayq_core::JobId,
    ) -> Option<(Option<tokio::task::Id>, Vec<relayq_core::JobId>)> {
        let pulls = self.0.lock().expect("lock");
        pulls.iter().find(|(_, ids)| ids.contains(&id)).cloned()
    }

    /// The task that made the first pull, once one was made.
    fn first_puller(&self) -> Option<Option<tokio::task::Id>> {
        self.0.lock().expect("lock").first().map(|(task, _)| *task)
    }
}

#[async_trait::async_trait]
impl Faults for PullLog {
    async fn pull(
        &self,
        inner: &dyn Backend,
        request: &relayq_core::PullRequest,
    ) -> Result<Vec<relayq_core::LeasedJob>> {
        let jobs = inner.pull(request).await?;
        let ids = jobs.iter().map(|leased| leased.job.id).collect();
        self.0
            .lock()
            .expect("lock")
            .push((tokio::task::try_id(), ids));
        Ok(jobs)
    }
}

/// A job one runner pulled beyond its free slots is run by an idle sibling
/// runner at once, not after the long job holding the first runner's slot.
/// (On the memory store a started worker has a runner per runtime thread,
/// each with its share of the concurrency: here two runners of one slot.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runners_surplus_is_run_by_an_idle_sibling() {
    let (inner, _) = store();
    let log = Arc::new(PullLog::default());
    let backend: Arc<dyn Backend> = Arc::new(Faulty::new(dyn_backend(&inner), Arc::clone(&log)));
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let worker = Worker::builder(Arc::clone(&backend))
        .queues(["mail"])
        .concurrency(2)
        .prefetch(64)
        .poll_interval(StdDuration::from_secs(3600))
        .handle({
            let release = Arc::clone(&release);
            move |e: Email, _ctx: JobContext<()>| {
                let release = Arc::clone(&release);
                async move {
                    if e.to == "long" {
                        // Used up, so a later round's long job waits too.
                        release.acquire().await.expect("open").forget();
                    }
                    Ok::<_, HandlerError>(())
                }
            }
        })
        .build()
        .expect("build");
    let running = worker.start();
    let within = |id| tokio::time::timeout(StdDuration::from_secs(20), running.wait_for(id));
    let push = |to: Vec<String>| {
        let backend = Arc::clone(&backend);
        async move {
            let jobs = to.into_iter().map(|to| Email { to }.to_job()).collect();
            let pushed = backend.push_batch(jobs).await.expect("push");
            pushed.into_iter().map(|o| o.id()).collect::<Vec<_>>()
        }
    };
    // The case needs the pull that takes the long job to take quick ones
    // too, which it does once the pulling runner's buffer is deep; should
    // a round's timing keep it shallow, the round is run again.
    for _round in 0..5 {
        // Quick jobs first, so that a pull takes more than its one slot.
        run_quick_jobs(&backend, &running, "warm", 400).await;
        let ids = push(
            ["long", "quick1", "quick2", "quick3"]
                .map(String::from)
                .to_vec(),
        )
        .await;
        for &id in &ids[1..] {
            let job = within(id)
                .await
                .expect("a quick job runs while the long one holds its runner's slot")
                .expect("wait_for");
            assert_eq!(job.status, JobStatus::Done);
        }
        let with_long = log.pulled_with(ids[0]);
        release.add_permits(1);
        let long = within(ids[0]).await.expect("in time").expect("wait_for");
        assert_eq!(long.status, JobStatus::Done);
        if ids[1..].iter().any(|id| with_long.contains(id)) {
            running.shutdown_within(StdDuration::from_secs(20)).await;
            return;
        }
    }
    panic!("in five rounds, no pull took a quick job with the long one");
}

/// Releases that take `delay` each, counted.
#[derive(Debug)]
struct SlowReleases {
    delay: StdDuration,
    made: AtomicUsize,
    /// Whether each release then panics (a backend's bug).
    panics: bool,
}

#[async_trait::async_trait]
impl Faults for SlowReleases {
    async fn release(&self, inner: &dyn Backend, lease: &relayq_core::Lease) -> Result<()> {
        self.made.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        if self.panics {
            panic!("the store's release broke");
        }
        inner.release(lease).await
    }
}

/// Handlers are stopped at the shutdown's deadline however slowly the
/// store gives the buffered jobs back: the releases go on beside the
/// handlers, not before their grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_releases_of_buffered_jobs_do_not_delay_the_deadline() {
    let report = shutdown_while_releasing(StdDuration::from_secs(4), false).await;
    assert!(report.released >= 2, "{report:?}");
}

/// A release that panics (a backend's bug) fails alone: the shutdown
/// still stops the handlers at its deadline and ends, without the panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panicking_releases_fail_alone() {
    let report = shutdown_while_releasing(StdDuration::from_millis(50), true).await;
    assert_eq!(report.released, 0, "{report:?}");
}

/// Runs quick jobs through `running`'s worker (of one slot) to deepen its
/// buffer, then pushes a job to "long" and eight queued behind it, which
/// the long job's pull then leases too; returns their ids, the long one's
/// first.
async fn push_long_and_queued(
    backend: &Arc<dyn Backend>,
    running: &relayq_core::WorkerHandle<()>,
) -> Vec<relayq_core::JobId> {
    run_quick_jobs(backend, running, "warm", 400).await;
    let jobs: Vec<NewJob> = std::iter::once("long".to_owned())
        .chain((0..8).map(|i| format!("queued{i}")))
        .map(|to| Email { to }.to_job())
        .collect();
    backend
        .push_batch(jobs)
        .await
        .expect("push")
        .iter()
        .map(|o| o.id())
        .collect()
}

/// Starts a long job with buffered jobs behind it, then shuts down within
/// 200 ms while each release takes `delay` (and then panics, with
/// `panics`); checks the long job's handler was stopped at the deadline.
async fn shutdown_while_releasing(delay: StdDuration, panics: bool) -> relayq_core::ShutdownReport {
    let (inner, _) = store();
    let slow = Arc::new(SlowReleases {
        delay,
        made: AtomicUsize::new(0),
        panics,
    });
    let backend: Arc<dyn Backend> = Arc::new(Faulty::new(dyn_backend(&inner), Arc::clone(&slow)));
    let entered = Arc::new(tokio::sync::Notify::new());
    // Set when the long job's handler is stopped (its future dropped).
    let stopped = Arc::new(std::sync::Mutex::new(None::<std::time::Instant>));
    struct OnDrop(Arc<std::sync::Mutex<Option<std::time::Instant>>>);
    impl Drop for OnDrop {
        fn drop(&mut self) {
            *self.0.lock().expect("lock") = Some(std::time::Instant::now());
        }
    }
    let worker = Worker::builder(Arc::clone(&backend))
        .queues(["mail"])
        .concurrency(1)
        .prefetch(16)
        // Buffered jobs are given back after a poll interval's wait.
        .poll_interval(StdDuration::from_secs(60))
        .handle({
            let (entered, stopped) = (Arc::clone(&entered), Arc::clone(&stopped));
            move |e: Email, _ctx: JobContext<()>| {
                let (entered, stopped) = (Arc::clone(&entered), Arc::clone(&stopped));
                async move {
                    if e.to == "long" {
                        let _guard = OnDrop(stopped);
                        entered.notify_one();
                        std::future::pending::<()>().await;
                    }
                    Ok::<_, HandlerError>(())
                }
            }
        })
        .build()
        .expect("build");
    let running = worker.start();
    push_long_and_queued(&backend, &running).await;
    tokio::time::timeout(StdDuration::from_secs(20), entered.notified())
        .await
        .expect("the long job started");
    let asked = std::time::Instant::now();
    let shutdown = tokio::spawn(running.shutdown_within(StdDuration::from_millis(200)));
    let stopped_at = tokio::time::timeout(StdDuration::from_secs(20), async {
        loop {
            if let Some(at) = *stopped.lock().expect("lock") {
                return at;
            }
            tokio::time::sleep(StdDuration::from_millis(10)).await;
        }
    })
    .await
    .expect("the long job's handler is stopped");
    assert!(
        slow.made.load(Ordering::SeqCst) > 0,
        "the case needs buffered jobs to give back"
    );
    // Stopped at the 200 ms deadline, not after the 4 s releases.
    assert!(
        stopped_at.duration_since(asked) < StdDuration::from_secs(2),
        "the handler ran {:?} past the shutdown call",
        stopped_at.duration_since(asked)
    );
    tokio::time::timeout(StdDuration::from_secs(30), shutdown)
        .await
        .expect("in time")
        .expect("shutdown")
}

/// A store whose pulls, once armed, take `delay` (a slow store).
#[derive(Debug)]
struct SlowPullsWhenArmed {
    armed: std::sync::atomic::AtomicBool,
    delay: StdDuration,
    /// Told when an armed pull has been sent.
    sent: tokio::sync::Notify,
}

#[async_trait::async_trait]
impl Faults for SlowPullsWhenArmed {
    async fn pull(
        &self,
        inner: &dyn Backend,
        request: &relayq_core::PullRequest,
    ) -> Result<Vec<relayq_core::LeasedJob>> {
        if self.armed.load(Ordering::SeqCst) {
            self.sent.notify_one();
            tokio::time::sleep(self.delay).await;
        }
        inner.pull(request).await
    }
}

/// A shutdown gives buffered jobs back at once, while a pull sent before
/// it is still out: they went back only once that pull had landed, held
/// for as long as the slow store took.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffered_jobs_go_back_at_once_while_a_pull_is_out() {
    let (inner, _) = store();
    let slow = Arc::new(SlowPullsWhenArmed {
        armed: std::sync::atomic::AtomicBool::new(false),
        delay: StdDuration::from_secs(5),
        sent: tokio::sync::Notify::new(),
    });
    let backend: Arc<dyn Backend> = Arc::new(Faulty::new(dyn_backend(&inner), Arc::clone(&slow)));
    let entered = Arc::new(tokio::sync::Notify::new());
    let worker = Worker::builder(Arc::clone(&backend))
        .queues(["mail"])
        .concurrency(1)
        .prefetch(16)
        .poll_interval(StdDuration::from_secs(60))
        .handle({
            let entered = Arc::clone(&entered);
            move |e: Email, ctx: JobContext<()>| {
                let entered = Arc::clone(&entered);
                async move {
                    if e.to == "long" {
                        entered.notify_one();
                        ctx.shutdown_requested().await;
                    }
                    Ok::<_, HandlerError>(())
                }
            }
        })
        .build()
        .expect("build");
    let running = worker.start();
    let ids = push_long_and_queued(&backend, &running).await;
    tokio::time::timeout(StdDuration::from_secs(20), entered.notified())
        .await
        .expect("the long job started");
    tokio::time::timeout(StdDuration::from_secs(20), async {
        while inner.stats().await.expect("stats").queue("mail").processing < 9 {
            tokio::time::sleep(StdDuration::from_millis(5)).await;
        }
    })
    .await
    .expect("the queued jobs are buffered behind the long one");
    // A push makes the worker pull again (its buffer has room), slowly.
    slow.armed.store(true, Ordering::SeqCst);
    backend
        .push(Email { to: "more".into() }.to_job())
        .await
        .expect("push");
    tokio::time::timeout(StdDuration::from_secs(20), slow.sent.notified())
        .await
        .expect("a pull is out");
    let shutdown = tokio::spawn(running.shutdown_within(StdDuration::from_secs(20)));
    let back = tokio::time::timeout(StdDuration::from_secs(2), async {
        loop {
            let mut all = true;
            for &id in &ids[1..] {
                let job = inner.get(id).await.expect("get").expect("job");
                all &= (job.status, job.attempts) == (JobStatus::Pending, 0);
            }
            if all {
                return;
            }
            tokio::time::sleep(StdDuration::from_millis(10)).await;
        }
    })
    .await;
    let report = tokio::time::timeout(StdDuration::from_secs(30), shutdown)
        .await
        .expect("in time")
        .expect("shutdown");
    assert!(
        back.is_ok(),
        "the buffered jobs waited for the pull out: {report:?}"
    );
    assert_eq!(report.finished, 1, "{report:?}");
}

/// A store whose second pull panics (a backend's bug).
#[derive(Debug, Default)]
struct PanickingSecondPull {
    pulls: AtomicUsize,
}

#[async_trait::async_trait]
impl Faults for PanickingSecondPull {
    async fn pull(
        &self,
        inner: &dyn Backend,
        request: &relayq_core::PullRequest,
    ) -> Result<Vec<relayq_core::LeasedJob>> {
        if self.pulls.fetch_add(1, Ordering::SeqCst) == 1 {
            panic!("the store's pull broke");
        }
        inner.pull(request).await
    }
}

/// A panic in the store's `pull` counts as a failed pull: the worker goes
/// on and runs the jobs pushed after it. (The second pull is a lane's own,
/// made as its first job ends; before, the panic killed the lane, and with
/// it that job's record and every later start.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_pull_is_a_failed_pull() {
    let (inner, _) = store();
    let backend: Arc<dyn Backend> = Arc::new(Faulty::new(
        dyn_backend(&inner),
        PanickingSecondPull::default(),
    ));
    let running = past_the_first_job(&backend).await;
    let within = |id| tokio::time::timeout(StdDuration::from_secs(20), running.wait_for(id));
    // The lane's own pull, as "first" ended, panicked; later pushes run.
    tokio::time::sleep(StdDuration::from_millis(100)).await;
    for to in ["second", "third"] {
        let id = backend
            .push(Email { to: to.into() }.to_job())
            .await
            .expect("push")
            .id();
        let job = within(id)
            .await
            .expect("a job pushed after the panic runs")
            .expect("wait_for");
        assert_eq!(job.status, JobStatus::Done);
    }
    running.shutdown_within(StdDuration::from_secs(20)).await;
}
