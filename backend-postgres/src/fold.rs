//! Group commit for single pool pushes.
//!
//! Each [`Pusher::push`](relayq_core::Pusher::push) of a job without a
//! unique key on the pool is one statement and one commit; PostgreSQL and
//! sqlx spend more per statement (parse/bind/execute, a commit record,
//! a pool round trip) than per row. So concurrent pushes are folded:
//!
//! - A push arriving while fewer than [`MAX_RUNNING`] insert statements
//!   are under way starts one at once, on a task of its own: no push ever
//!   waits to gather company.
//! - A push arriving while [`MAX_RUNNING`] statements are under way
//!   waits; when one of them finishes, its task answers its callers, lets
//!   them run ([`ANSWERED_YIELDS`]) so that their next pushes join, takes
//!   every waiting push (at most [`MAX_FOLD`]) and inserts them with the
//!   keyless `UNNEST` statement, one statement and one commit, on the
//!   connection it already holds. A task ends, returning its connection,
//!   once nothing is waiting.
//!
//! Each caller gets its own id (the statement draws ids in input order),
//! its own error, and its queue's notification once the insert committed,
//! from the notifier. A statement of one push after a quiet spell of the
//! backend's folded pushes (none under way, none finished in the last
//! [`QUIET_FOR`]) instead sends the notification with the insert, and
//! waits for the WAL flush after the commit instead of in it (see
//! `PgBackend::insert_notifying`), so workers start its job sooner.
//! If the folded statement fails with an error that one job's data may
//! have caused (a data exception, a constraint, a limit, a trigger's
//! `RAISE`), nothing was inserted, and the jobs are inserted one by one so
//! a bad job fails only its own caller. Any other failure (the connection
//! broke, the server shut down, no answer came within the reply timeout,
//! see [`deadline`](crate::deadline)) may have happened after the commit,
//! so it is reported to every caller of the statement, as a lone push
//! would report it, and nothing is retried.
//!
//! The statement runs on a spawned task, so a caller that stops waiting
//! (its future dropped) cannot cancel other callers' inserts halfway, and
//! its own push is still inserted, as a lone push on its own task would
//! be: a caller that gives up after its first poll must find its job
//! stored, whether or not its push happened to wait for a fold. Only once
//! [`2 × MAX_FOLD`](MAX_FOLD) or more pushes are queued (a burst larger
//! than the two statements under way take, or statements that hang) are
//! queued pushes whose callers left forgotten (see
//! [`State::forget_left_when_long`]).
//!
//! Pushes fold only with pushes made on the same Tokio runtime, and are
//! inserted by tasks of that runtime: a backend shared by several runtimes
//! (one per thread, or one per test) never has a caller wait on a task of
//! another runtime, which may be shutting down and never run again.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use relayq_core::{Error, JobId, Result, ValidJob};
use time::OffsetDateTime;
use tokio::runtime::{Handle, Id as RuntimeId};
use tokio::sync::oneshot;

use crate::deadline::Conn;
use crate::{PgBackend, bind_one, distinct_queues, error_from, schedule, transient};

/// The most jobs folded into one statement.
pub(crate) const MAX_FOLD: usize = 1000;

/// The most payload bytes folded into one statement (a lone push may
/// carry more): PostgreSQL refuses a message of a gigabyte or more, so
/// many concurrent pushes of large payloads would otherwise fail together,
/// and fail again together when retried, though each alone would go in.
pub(crate) const MAX_FOLD_BYTES: usize = 64 << 20;

/// The most insert statements (so connections) under way at once for
/// the folded pushes of one Tokio runtime. Two let one statement execute
/// while the other's commit waits for its WAL flush. Measured with the `enqueue` workload (8 tasks,
/// 2 cores): 1 and 2 both roughly doubled throughput over unfolded pushes
/// (2 slightly ahead), 4 gained less (smaller folds, more commits).
pub(crate) const MAX_RUNNING: usize = 2;

/// How often, at most, a runner yields to the scheduler after answering
/// its callers and before taking the next batch; it stops once as many
/// pushes wait as it answered. A caller pushing jobs one after another
/// pushes its next one as soon as it runs; without the yields the
/// runner took its next batch before those callers had run, so each
/// statement carried the pushes of the other runner's callers only, and
/// each WAL flush covered one statement of about 2.7 jobs. Measured with
/// the `enqueue` workload on a stock cluster, alternating against
/// `insert1` (8 pgbench clients): no yield 0.81–0.93×, one yield
/// 1.09–1.11×, three 1.09–1.30×, eight no better than three. A yield
/// costs microseconds; a statement, a flush of a fraction of a millisecond.
const ANSWERED_YIELDS: usize = 3;

/// A push waiting for its statement.
pub(crate) struct Entry {
    pub(crate) job: ValidJob,
    pub(crate) reply: oneshot::Sender<Result<JobId>>,
}

/// How long the backend's folded pushes must have had no statement under
/// way for the next to count as quiet, and send its notification with its
/// insert (see [`PgBackend::insert_notifying`]). Pushes sent back to back
/// (a task pushing one job after another, about 0.3 ms apart here) find
/// the server's processes awake, and the notifier's statement runs beside
/// the next push: with every such push notifying, the extra statement
/// slowed that task by a quarter (2,130–2,450 pushes/s, against
/// 3,040–3,320 for `ba8f9f2`, which only had the notifier); with this
/// window, 3,050–3,280 against 2,920–3,030 (3 alternating pairs). After a
/// quiet spell, each statement wakes a sleeping server process, and
/// sending the notification with the insert saves one.
const QUIET_FOR: Duration = Duration::from_millis(1);

/// The pushes waiting, and how many statements are under way, for each
/// runtime pushing; and when the last statement finished.
#[derive(Default)]
pub(crate) struct Folder {
    shared: Mutex<Shared>,
}

#[derive(Default)]
struct Shared {
    runtimes: Vec<(RuntimeId, State)>,
    /// When a statement of the backend's folded pushes last finished.
    last_inserted: Option<Instant>,
}

/// What [`Folder::with`] tells its function about the backend's other
/// folded pushes.
#[derive(Clone, Copy)]
struct Around {
    /// Whether another runtime's pushes have a statement under way.
    others_inserting: bool,
    /// When a statement last finished.
    last_inserted: Option<Instant>,
}

impl Around {
    /// Whether no other runtime's statement is under way, and none
    /// finished within [`QUIET_FOR`].
    fn quiet(self) -> bool {
        !self.others_inserting
            && self
                .last_inserted
                .is_none_or(|at| at.elapsed() >= QUIET_FOR)
    }
}

#[derive(Default)]
struct State {
    waiting: VecDeque<Entry>,
    /// Runners (slots) under way.
    running: usize,
    /// Runners with a statement under way (the others are between
    /// batches).
    inserting: usize,
    /// The queue length at which pushes whose callers left are forgotten
    /// next (see [`State::forget_left_when_long`]).
    prune_at: usize,
}

impl State {
    /// Up to [`MAX_FOLD`] waiting pushes, oldest first, with at most
    /// [`MAX_FOLD_BYTES`] of payload (but at least one).
    fn take(&mut self) -> Vec<Entry> {
        self.take_within(MAX_FOLD_BYTES)
    }

    /// Forgets the pushes whose callers stopped waiting, once more are
    /// queued than two statements take: while the statements under way
    /// hang (a connection gone dead without a reset), callers that time
    /// out and push again would otherwise leave their jobs queued until
    /// the hang ends. Checked at each doubling, so a push costs O(1) on
    /// average.
    fn forget_left_when_long(&mut self) {
        if self.waiting.len() >= self.prune_at.max(2 * MAX_FOLD) {
            self.waiting.retain(|entry| !entry.reply.is_closed());
            self.prune_at = 2 * self.waiting.len();
        }
    }

    fn take_within(&mut self, max_bytes: usize) -> Vec<Entry> {
        let mut batch = Vec::with_capacity(self.waiting.len().min(MAX_FOLD));
        let mut bytes = 0;
        while batch.len() < MAX_FOLD {
            let Some(entry) = self.waiting.pop_front() else {
                break;
            };
            let size = entry.job.payload.as_raw().get().len();
            if !batch.is_empty() && bytes + size > max_bytes {
                self.waiting.push_front(entry);
                break;
            }
            bytes += size;
            batch.push(entry);
        }
        batch
    }
}

impl Folder {
    /// Runs `f` on `runtime`'s state, which is created on first use and
    /// forgotten once it has nothing waiting or running; `f` is also told
    /// about the other pushes.
    fn with<T>(&self, runtime: RuntimeId, f: impl FnOnce(&mut State, Around) -> T) -> T {
        let mut shared = self.lock();
        let Shared {
            runtimes,
            last_inserted,
        } = &mut *shared;
        let around = Around {
            others_inserting: runtimes
                .iter()
                .any(|(id, state)| *id != runtime && state.inserting > 0),
            last_inserted: *last_inserted,
        };
        let i = match runtimes.iter().position(|(id, _)| *id == runtime) {
            Some(i) => i,
            None => {
                runtimes.push((runtime, State::default()));
                runtimes.len() - 1
            }
        };
        let state = &mut runtimes[i].1;
        let out = f(state, around);
        if state.running == 0 && state.waiting.is_empty() {
            runtimes.swap_remove(i);
        }
        out
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `entry`; returns the batch to start a statement with when
    /// fewer than [`MAX_RUNNING`] are under way for `runtime` (the caller
    /// then holds a slot), and whether the backend's folded pushes were
    /// quiet before it: none of their statements under way, on any
    /// runtime, and none finished within [`QUIET_FOR`].
    fn enqueue(&self, runtime: RuntimeId, entry: Entry) -> Option<(Vec<Entry>, bool)> {
        self.with(runtime, |state, around| {
            state.waiting.push_back(entry);
            state.forget_left_when_long();
            if state.running >= MAX_RUNNING {
                return None;
            }
            let batch = state.take();
            if batch.is_empty() {
                return None;
            }
            let quiet = state.inserting == 0 && around.quiet();
            state.running += 1;
            state.inserting += 1;
            Some((batch, quiet))
        })
    }

    /// How many pushes made on `runtime` wait for a statement.
    fn waiting(&self, runtime: RuntimeId) -> usize {
        self.with(runtime, |state, _| state.waiting.len())
    }

    /// A runner's statement is done (answered).
    fn inserted(&self, runtime: RuntimeId) {
        // The time first: a push in between sees the statement still under
        // way, not a quiet spell.
        self.lock().last_inserted = Some(Instant::now());
        self.with(runtime, |state, _| state.inserting -= 1);
    }

    /// After a statement: the next batch for the same slot (never after a
    /// quiet spell: a statement just finished); or `None`, having given the
    /// slot back, when nothing waits.
    fn next(&self, runtime: RuntimeId) -> Option<Vec<Entry>> {
        self.with(runtime, |state, _| {
            let batch = state.take();
            if batch.is_empty() {
                state.running -= 1;
                return None;
            }
            state.inserting += 1;
            Some(batch)
        })
    }

    /// Gives back the slot of a runner that ended early. If no other
    /// runner is left to take them, the pushes still waiting are dropped,
    /// so their callers get an error instead of waiting forever (none of
    /// them was sent); the next push starts a runner again.
    fn abandon(&self, runtime: RuntimeId, inserting: bool) {
        self.with(runtime, |state, _| {
            state.running -= 1;
            if inserting {
                state.inserting -= 1;
            }
            if state.running == 0 {
                state.waiting.clear();
            }
        });
    }
}

/// Gives a runner's slot back if its task ends early (a panic, or its
/// runtime shutting down).
struct Slot {
    backend: PgBackend,
    runtime: RuntimeId,
    /// Whether its runner has a statement under way.
    inserting: bool,
    ended: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if !self.ended {
            self.backend
                .inner
                .fold
                .abandon(self.runtime, self.inserting);
        }
    }
}

impl PgBackend {
    /// Pushes a validated job without a unique key, folded with the
    /// concurrent ones; returns its id.
    pub(crate) async fn push_folded(&self, runtime: &Handle, job: ValidJob) -> Result<JobId> {
        let (reply, outcome) = oneshot::channel();
        if let Some((batch, quiet)) = self.inner.fold.enqueue(runtime.id(), Entry { job, reply }) {
            // Made before the task, so that the slot is given back even if
            // the task is dropped unpolled (its runtime shutting down).
            let slot = Slot {
                backend: self.clone(),
                runtime: runtime.id(),
                inserting: true,
                ended: false,
            };
            runtime.spawn(run(slot, batch, quiet));
        }
        outcome
            .await
            .map_err(|_| Error::transient("relayq-postgres: the push's insert task ended early"))?
    }

    /// Inserts `batch`, answering every caller in it, on `conn` (acquired
    /// if `None`; set back to `None` after a failure that may have broken
    /// it). `quiet`: the backend's pushes were quiet before it (see
    /// [`Folder::enqueue`] and [`Self::insert_notifying`]).
    async fn insert_folded(&self, conn: &mut Option<Conn>, batch: Vec<Entry>, quiet: bool) {
        // `now` once for the statement, as a batch push takes it; a job
        // whose schedule does not fit (checked at push time already, but an
        // injected clock may have moved) fails alone.
        let now = self.now();
        let mut jobs = Vec::with_capacity(batch.len());
        let mut replies = Vec::with_capacity(batch.len());
        let mut schedules = Vec::with_capacity(batch.len());
        for Entry { job, reply } in batch {
            match schedule(&job, now) {
                Ok(s) => {
                    jobs.push(job);
                    replies.push(reply);
                    schedules.push(s);
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            }
        }
        if jobs.is_empty() {
            return;
        }
        let c = match conn {
            Some(c) => c,
            None => match Conn::acquire(&self.inner.pool, self.inner.deadline.as_ref()).await {
                Ok(c) => conn.insert(c),
                Err(e) => return answer_all(replies, e),
            },
        };
        if let ([job], [at]) = (jobs.as_slice(), schedules.as_slice()) {
            // Alone: the single-row statement, exactly a lone push.
            let notified = if quiet {
                self.insert_notifying(c, now, job, *at).await
            } else {
                None
            };
            let result = match notified {
                Some(Ok(id)) => Ok(id),
                Some(Err(e)) => {
                    *conn = None;
                    Err(e)
                }
                None => self.insert_plain(c, now, job, *at).await.map_err(|e| {
                    if !may_be_one_jobs_fault(&e) {
                        *conn = None;
                    }
                    error_from(e)
                }),
            };
            if let Some(reply) = replies.pop() {
                let _ = reply.send(result);
            }
            return;
        }
        match c
            .run(|c| self.insert_keyless(c, now, &jobs, &schedules))
            .await
        {
            Ok(ids) if ids.len() == jobs.len() => {
                self.announce(distinct_queues(&jobs));
                for (reply, id) in replies.into_iter().zip(ids) {
                    let _ = reply.send(Ok(id));
                }
            }
            Ok(ids) => {
                let e = format!("push returned {} rows for {} jobs", ids.len(), jobs.len());
                for reply in replies {
                    let _ = reply.send(Err(Error::backend(e.clone())));
                }
            }
            Err(e) if may_be_one_jobs_fault(&e) => {
                // Nothing was inserted: the statement failed before its
                // commit. One by one, so only a bad job fails.
                let intact = self
                    .insert_one_by_one(c, now, &jobs, &schedules, replies)
                    .await;
                if !intact {
                    *conn = None;
                }
            }
            Err(e) => {
                *conn = None;
                // Perhaps committed, its reply lost (see insert_plain).
                if transient::is_transient(&e) {
                    self.announce(distinct_queues(&jobs));
                }
                answer_all(replies, e);
            }
        }
    }

    /// Inserts one job, committed durably, and wakes its queue's workers
    /// (also after a transient failure, which may have come after the
    /// commit): this process's before it returns (so the caller's workers
    /// are awake when its push returns), other processes' through the
    /// notifier.
    async fn insert_plain(
        &self,
        conn: &mut Conn,
        now: Option<OffsetDateTime>,
        job: &ValidJob,
        at: (Option<OffsetDateTime>, i64),
    ) -> sqlx::Result<JobId> {
        let inserted = conn.run(|c| self.push_one_raw(c, now, job, at)).await;
        // A transient failure may come after the commit, its reply lost:
        // the job is then due, and a wake-up too many costs only a pull.
        let perhaps_stored = match &inserted {
            Ok(_) => true,
            Err(e) => transient::is_transient(e),
        };
        if perhaps_stored {
            self.announce(vec![job.queue.clone()]);
        }
        inserted
    }

    /// Inserts one job after a quiet spell of the backend's folded pushes (no
    /// statement of theirs under way, none finished within [`QUIET_FOR`]),
    /// with its notification in the insert's own
    /// transaction, committed without waiting for the WAL flush; wakes
    /// this process's workers; then waits for the flush before the push is
    /// reported. Both statements share one reply timeout. `None` when the
    /// job is to be inserted with [`Self::insert_plain`] instead: the role
    /// may not wait for a flush (see `AWAIT_FLUSH` in [`crate::sql`]), or
    /// the statement was refused before its commit, so inserted nothing (a
    /// full notification queue fails the notification, not the push; a job
    /// at fault fails the plain insert too).
    ///
    /// The notification so leaves with the commit, and workers claim the
    /// job while its flush is under way, instead of hearing of it only
    /// after the flush and one more statement: on a server otherwise idle,
    /// each statement costs about as much as a commit, as it wakes a
    /// sleeping server process (enqueue-to-start p50 on a stock cluster,
    /// 4 alternating pairs: 1.32–1.43 ms against 1.73–1.80 ms). The push
    /// itself returns one round trip later than a plain one. No job runs
    /// before its insert is durable: a claim commits durably (unless the
    /// claiming session turned `synchronous_commit` off), later in the WAL.
    /// A crash before the flush loses a job whose push had not returned,
    /// as a crash during a commit may. A failed wait for the flush fails
    /// the push, naming the job it stored.
    ///
    /// After a refusal for an undefined object or a missing privilege
    /// (class 42, of either statement), the backend's pushes notify
    /// through the notifier from then on.
    async fn insert_notifying(
        &self,
        conn: &mut Conn,
        now: Option<OffsetDateTime>,
        job: &ValidJob,
        at: (Option<OffsetDateTime>, i64),
    ) -> Option<Result<JobId>> {
        if !self.inner.early_notify.load(Ordering::Relaxed) {
            return None;
        }
        let sql = &self.inner.sql;
        // The id once the insert committed: a reply timeout after it (during
        // the wait for the flush) is a stored job, not a failed push.
        let mut stored = None;
        let sent = conn
            .run(|c| async {
                let inserted = bind_one(sql.push_one_notifying.clone(), now, job, at)
                    .fetch_one(&mut *c)
                    .await;
                let id = match inserted {
                    Ok(id) => id,
                    Err(e) if refused_before_commit(&e) => return Ok(Notifying::Refused(e)),
                    Err(e) => return Err(e),
                };
                stored = Some(id);
                self.wake_here(std::slice::from_ref(&job.queue));
                match sqlx::query(sql.await_flush.clone()).execute(c).await {
                    Ok(_) => Ok(Notifying::Durable(id)),
                    Err(source) => Ok(Notifying::Unconfirmed(Unconfirmed { id, source })),
                }
            })
            .await;
        let sent = match (sent, stored) {
            (Ok(sent), _) => sent,
            (Err(source), Some(id)) => Notifying::Unconfirmed(Unconfirmed { id, source }),
            (Err(e), None) => return Some(Err(error_from(e))),
        };
        if let Notifying::Refused(e) | Notifying::Unconfirmed(Unconfirmed { source: e, .. }) = &sent
            && in_class(e, &["42"])
        {
            self.inner.early_notify.store(false, Ordering::Relaxed);
        }
        match sent {
            Notifying::Durable(id) => Some(Ok(id)),
            Notifying::Refused(_) => None,
            Notifying::Unconfirmed(u) => Some(Err(transient::backend_error(
                transient::is_transient(&u.source),
                u,
            ))),
        }
    }

    /// Inserts `jobs` one statement each after their folded statement
    /// failed, answering each caller with its own outcome. After a failure
    /// that is not about a job's data, the rest are not sent, and this
    /// returns false: the connection may be broken.
    async fn insert_one_by_one(
        &self,
        conn: &mut Conn,
        now: Option<OffsetDateTime>,
        jobs: &[ValidJob],
        schedules: &[(Option<OffsetDateTime>, i64)],
        replies: Vec<oneshot::Sender<Result<JobId>>>,
    ) -> bool {
        let mut replies = replies.into_iter();
        let mut broken: Option<Arc<sqlx::Error>> = None;
        for (job, at) in jobs.iter().zip(schedules) {
            let Some(reply) = replies.next() else { break };
            if let Some(e) = &broken {
                let _ = reply.send(Err(shared_err(e)));
                continue;
            }
            let result = match self.insert_plain(conn, now, job, *at).await {
                Ok(id) => Ok(id),
                Err(e) if may_be_one_jobs_fault(&e) => Err(error_from(e)),
                Err(e) => {
                    let e = Arc::new(e);
                    broken = Some(e.clone());
                    Err(shared_err(&e))
                }
            };
            let _ = reply.send(result);
        }
        broken.is_none()
    }
}

/// A slot's task: inserts batches until nothing waits. `quiet`: the
/// backend's pushes were quiet before the first batch.
async fn run(mut slot: Slot, mut batch: Vec<Entry>, mut quiet: bool) {
    let backend = slot.backend.clone();
    let fold = &backend.inner.fold;
    let mut conn = None;
    loop {
        let answered = batch.len();
        backend.insert_folded(&mut conn, batch, quiet).await;
        fold.inserted(slot.runtime);
        slot.inserting = false;
        // Given back after the batch when the pool is full with none idle:
        // a runner kept busy by a stream of pushes would otherwise hold it
        // as long as the stream lasts, while pulls, renewals, the other
        // runner or the application wait for one (with a pool of one, until
        // they time out). While the pool may grow, they open their own.
        // Given back once the pool is closed, so later batches fail as
        // other operations do.
        let pool = &backend.inner.pool;
        let full = pool.size() >= pool.options().get_max_connections() && pool.num_idle() == 0;
        if full || pool.is_closed() {
            conn = None;
        }
        for _ in 0..ANSWERED_YIELDS {
            if fold.waiting(slot.runtime) >= answered {
                break;
            }
            tokio::task::yield_now().await;
        }
        match fold.next(slot.runtime) {
            Some(next) => {
                (batch, quiet) = (next, false);
                slot.inserting = true;
            }
            None => break,
        }
    }
    slot.ended = true;
}

/// Whether a failed statement may have failed because of one job's data,
/// having inserted nothing: an error the server raised while executing it
/// (so before its commit), of a class that data causes: data exceptions
/// (22), integrity constraints (23), program limits such as a value too
/// large (54), and errors raised by PL/pgSQL, as in a trigger (P0).
fn may_be_one_jobs_fault(e: &sqlx::Error) -> bool {
    in_class(e, &["22", "23", "54", "P0"])
}

/// What became of a notifying insert (see [`PgBackend::insert_notifying`]).
enum Notifying {
    /// Inserted, and the WAL flushed through its commit.
    Durable(JobId),
    /// Refused before its commit: nothing was inserted.
    Refused(sqlx::Error),
    /// Committed and notified, but the wait for its flush failed.
    Unconfirmed(Unconfirmed),
}

/// A job stored and notified whose WAL flush could not be waited for: it
/// may run, and may be lost if the server crashes before the flush.
#[derive(Debug)]
struct Unconfirmed {
    id: JobId,
    source: sqlx::Error,
}

impl std::fmt::Display for Unconfirmed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "job {} was stored and its queue notified, but waiting for its WAL flush failed",
            self.id
        )
    }
}

impl std::error::Error for Unconfirmed {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// Whether a failed statement was refused before it could commit, so
/// inserted nothing: [`may_be_one_jobs_fault`], or a statement the server
/// would not run (class 42: an undefined object, a missing privilege).
fn refused_before_commit(e: &sqlx::Error) -> bool {
    may_be_one_jobs_fault(e) || in_class(e, &["42"])
}

/// Whether `e` is a server error whose SQLSTATE is of one of `classes`.
fn in_class(e: &sqlx::Error, classes: &[&str]) -> bool {
    let sqlx::Error::Database(db) = e else {
        return false;
    };
    db.code()
        .is_some_and(|code| classes.iter().any(|c| code.starts_with(c)))
}

/// Reports one failure to every caller of a statement.
fn answer_all(replies: Vec<oneshot::Sender<Result<JobId>>>, e: sqlx::Error) {
    let e = Arc::new(e);
    for reply in replies {
        let _ = reply.send(Err(shared_err(&e)));
    }
}

/// `e` as one of several callers' [`Error::Backend`], transient when `e` is.
fn shared_err(e: &Arc<sqlx::Error>) -> Error {
    transient::backend_error(transient::is_transient(e), SharedError(Arc::clone(e)))
}

/// One driver error reported to several callers.
#[derive(Debug)]
struct SharedError(Arc<sqlx::Error>);

impl std::fmt::Display for SharedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for SharedError {
    /// The driver's error itself, so that a caller walking the chain finds
    /// the `sqlx::Error` (telling a refused connection from a broken one)
    /// as it does for a push that went out alone.
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(payload_bytes: usize) -> (Entry, oneshot::Receiver<Result<JobId>>) {
        let job = relayq_core::NewJob::new("k", &"x".repeat(payload_bytes))
            .validate()
            .expect("valid");
        let (reply, answer) = oneshot::channel();
        (Entry { job, reply }, answer)
    }

    /// The statement a push on an idle backend waits for its flush with
    /// makes its transaction commit with a flush (PostgreSQL flushes at
    /// commit only a transaction that has an id and wrote WAL), and so
    /// returns once the WAL is flushed through a commit made before without
    /// waiting (durable commits asked for: the tests' throwaway cluster
    /// turns them off).
    #[tokio::test]
    async fn await_flush_flushes_what_was_committed_before() {
        use sqlx::{Connection, Executor, Row};
        let mut conn = sqlx::PgConnection::connect(&crate::testing::database_url())
            .await
            .expect("connect");
        let statements = crate::sql::Statements::new("unused");
        // Where the WAL ends now, then the statement under test.
        async fn await_flush_after_reading_the_end(
            conn: &mut sqlx::PgConnection,
            statements: &crate::sql::Statements,
        ) -> String {
            let end = sqlx::query_scalar("SELECT pg_catalog.pg_current_wal_insert_lsn()::text")
                .fetch_one(&mut *conn)
                .await
                .expect("insert position");
            sqlx::query(statements.await_flush.clone())
                .execute(conn)
                .await
                .expect("await the flush");
            end
        }
        conn.execute("BEGIN").await.expect("begin");
        let before = await_flush_after_reading_the_end(&mut conn, &statements).await;
        let row = sqlx::query(
            "SELECT pg_catalog.txid_current_if_assigned() IS NOT NULL AS has_id, \
             pg_catalog.pg_current_wal_insert_lsn() > $1::pg_lsn AS wrote",
        )
        .bind(&before)
        .fetch_one(&mut conn)
        .await
        .expect("transaction");
        assert!(row.get::<bool, _>("has_id"), "the transaction has an id");
        assert!(row.get::<bool, _>("wrote"), "the transaction wrote WAL");
        conn.execute("ROLLBACK").await.expect("rollback");

        conn.execute("SET synchronous_commit = on")
            .await
            .expect("set");
        conn.execute(
            "BEGIN; SET LOCAL synchronous_commit = off; \
             SELECT pg_catalog.pg_logical_emit_message(true, 'relayq_test', ''::text); COMMIT",
        )
        .await
        .expect("commit without a flush");
        let written = await_flush_after_reading_the_end(&mut conn, &statements).await;
        let flushed: bool =
            sqlx::query_scalar("SELECT pg_catalog.pg_current_wal_flush_lsn() >= $1::pg_lsn")
                .bind(&written)
                .fetch_one(&mut conn)
                .await
                .expect("flush position");
        assert!(flushed, "the WAL is flushed through {written}");
    }

    /// A statement is quiet when no other statement of the backend's
    /// folded pushes is under way, on any runtime, and none finished
    /// within [`QUIET_FOR`]; a runner between batches does not count.
    #[test]
    fn a_statement_is_quiet_after_a_quiet_spell_of_the_backends_pushes() {
        let runtime = || {
            tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("runtime")
        };
        let (here, elsewhere) = (runtime(), runtime());
        let (one, other) = (here.handle().id(), elsewhere.handle().id());
        let fold = Folder::default();
        let quiet = |started: Option<(Vec<Entry>, bool)>| started.expect("a slot").1;
        let long_ago = || fold.lock().last_inserted = Some(Instant::now() - QUIET_FOR);
        let (first, _a) = entry(1);
        assert!(quiet(fold.enqueue(one, first)), "nothing before it");
        let (second, _b) = entry(1);
        assert!(!quiet(fold.enqueue(one, second)), "the first is under way");
        let (third, _c) = entry(1);
        assert!(
            !quiet(fold.enqueue(other, third)),
            "under way on another runtime"
        );
        for _ in 0..2 {
            fold.inserted(one);
            assert!(fold.next(one).is_none());
        }
        long_ago();
        let (fourth, _d) = entry(1);
        assert!(
            !quiet(fold.enqueue(one, fourth)),
            "still under way on the other runtime"
        );
        fold.inserted(other);
        assert!(fold.next(other).is_none());
        // The fourth's runner finishes, and stays between batches.
        fold.inserted(one);
        let (fifth, _e) = entry(1);
        assert!(
            !quiet(fold.enqueue(other, fifth)),
            "a statement just finished, on any runtime"
        );
        fold.inserted(other);
        assert!(fold.next(other).is_none());
        long_ago();
        let (sixth, _f) = entry(1);
        assert!(
            quiet(fold.enqueue(one, sixth)),
            "after a quiet spell, a runner between batches too"
        );
        // A runner dropped mid-statement (its runtime shut down) gives
        // its statement back with its slot.
        fold.abandon(one, true);
        let (seventh, _g) = entry(1);
        assert!(quiet(fold.enqueue(other, seventh)));
    }

    #[test]
    fn a_fold_stops_at_its_payload_bytes_but_takes_at_least_one() {
        let mut state = State::default();
        let mut answers = Vec::new();
        for bytes in [40, 40, 40, 200] {
            let (entry, answer) = entry(bytes);
            state.waiting.push_back(entry);
            answers.push(answer);
        }
        // Each payload is its JSON string: two quotes more.
        assert_eq!(state.take_within(100).len(), 2);
        assert_eq!(state.take_within(100).len(), 1);
        assert_eq!(state.take_within(100).len(), 1, "one too large goes alone");
        assert!(state.take_within(100).is_empty());
    }

    #[test]
    fn a_long_queue_forgets_pushes_whose_callers_left() {
        let mut state = State::default();
        let mut kept = Vec::new();
        for n in 0..2 * MAX_FOLD {
            let (entry, answer) = entry(1);
            state.waiting.push_back(entry);
            // Every other caller stays.
            if n % 2 == 0 {
                kept.push(answer);
            } else {
                drop(answer);
            }
            state.forget_left_when_long();
        }
        assert_eq!(state.waiting.len(), MAX_FOLD);
        assert!(state.waiting.iter().all(|entry| !entry.reply.is_closed()));
    }

    #[test]
    fn a_fold_takes_pushes_whose_callers_left() {
        let mut state = State::default();
        let (gone, answer) = entry(10);
        drop(answer);
        let (kept, _answer) = entry(10);
        state.waiting.extend([gone, kept]);
        assert_eq!(state.take().len(), 2);
    }
}
