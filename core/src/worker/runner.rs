//! The pull loops of a started worker, and its graceful shutdown.
//!
//! A worker has one runner (a pull loop and its lanes), or one per
//! runtime thread on a backend with instant writes (see [`runner_count`]).
//!
//! Started jobs run on a few long-lived lanes (one task each, about one
//! per runtime thread) rather than in a task apiece: a spawn, its large
//! future copied into a task cell, and a join per job cost more than a
//! quick handler itself. Each lane polls its jobs' futures side by side,
//! so handlers still run concurrently, on as many threads as there are
//! lanes; a handler panic is caught by `begin` or `finish`, its lease renewed by
//! the keeper's own task, its timeout and lease loss watched in its own
//! future. The price: a handler that blocks its thread (which async code
//! must not do) holds up the other jobs of its lane, not just those
//! queued on its thread.

use std::collections::VecDeque;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use futures::future::OptionFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinError, JoinSet};
use tokio::time::Instant;

use super::board::Board;
use super::buffer::{Buffer, Buffered};
use super::events::Outcome;
use super::execute::{
    Ack, Begun, Ended, MAX_ACK_BATCH, Mode, Shared, Started, batch_completions, begin, contained,
    execute, panic_message, record_contained,
};
use super::handler::{Phase, WorkerView};
use super::keeper::{Hold, LeaseKeeper};
use super::persist::{Fenced, write_fenced};
use super::signals::Signals;
use super::slots::{Slot, Slots};
use super::stock::{PULLS_AT_ONCE, Reserve, Stock};
use super::{WorkerBuilder, after};
use crate::error::Result;
use crate::job::JobStatus;
use crate::lease::LeasedJob;
use crate::request::{MAX_PULL_BATCH, PullRequest};
use crate::store::Backend;

/// What a graceful shutdown did with the jobs in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// Jobs whose attempt ended on its own during the grace period (done,
    /// failed or dead alike, or with its outcome refused as its lease was
    /// lost, or not recorded for a store error).
    pub finished: usize,
    /// Jobs given back without an outcome: those pulled ahead but not yet
    /// started when the shutdown began, and those still running at the
    /// deadline, stopped. They are `Pending` and eligible at once for
    /// another worker, the attempt not spent.
    pub released: usize,
}

impl ShutdownReport {
    fn count(&mut self, outcome: &Outcome) {
        match outcome {
            Outcome::Released => self.released += 1,
            _ => self.finished += 1,
        }
    }

    fn add(&mut self, joined: Result<Self, JoinError>) {
        match joined {
            Ok(lane) => {
                self.finished += lane.finished;
                self.released += lane.released;
            }
            Err(e) => log_join_error("a lane or runner", &e),
        }
    }
}

/// Logs that the task of `what` failed.
fn log_join_error(what: &str, e: &JoinError) {
    // Every job's panic is caught, so this is a bug in relayq itself.
    tracing::error!(error = %e, "{what} of the worker failed");
}

/// What a worker's runners share: each one's stock, and the keeper that
/// renews every lease they hold. One keeper for all, as a job one runner
/// buffered may run on another, until after the last runner has stopped.
struct Crew {
    stocks: Vec<Arc<Stock>>,
    keeper: LeaseKeeper,
}

/// What the pull loop and every lane of a runner share to start jobs.
struct Starter<S> {
    shared: Arc<Shared<S>>,
    started: Started,
    stock: Arc<Stock>,
    /// The worker's runners, whose keeper holds the leases a lane pulls.
    crew: Arc<Crew>,
    /// The runner's pull, to be sized.
    request: PullRequest,
    /// Carries the shutdown deadline once one is asked for: a lane pulls
    /// no more from then on, before its pull loop has seen it.
    stop: watch::Receiver<Option<Instant>>,
    /// The runner's push signals, heard by its pull loop or, on a backend
    /// with instant writes, by its first lane; none for a sibling of the
    /// first runner there (see [`Self::lane_listens`]).
    signals: Signals,
    /// Whether the runner subscribes to push signals at all: not a sibling
    /// of the first runner on a backend with instant writes (see
    /// [`Self::lane_listens`]).
    subscribes: bool,
}

/// What a lane's own pull (see [`Starter::pull_here`]) came to.
enum Refill {
    /// Jobs are buffered: the lane can take them.
    Buffered,
    /// None: the lane waits for its runs or the pull loop.
    Wait,
    /// The worker stopped while the pull was under way: these jobs are to
    /// be given back.
    Refused(VecDeque<Buffered>),
}

/// The jobs of a pull sent at `sent`, each registered with the `keeper`,
/// as buffered now. Collected before they go into the buffer, so that its
/// lock is not held while each job's `Arc` is allocated.
fn hold(keeper: &LeaseKeeper, jobs: Vec<LeasedJob>, sent: Instant) -> VecDeque<Buffered> {
    let now = Instant::now();
    keeper
        .hold_all(jobs, sent)
        .map(|(leased, hold)| Buffered::new(leased, hold, now))
        .collect()
}

impl<S: Send + Sync + 'static> Starter<S> {
    /// Whether the pull loop hears the runner's push signals: unless the
    /// backend's writes are instant (see [`Self::lane_listens`]).
    fn pull_loop_listens(&self) -> bool {
        !self.shared.instant_writes
    }

    /// Whether lane `index` hears the runner's push signals: the first
    /// lane, on a backend with instant writes, where a lane pulls for
    /// itself. A push to an idle worker then wakes the task that pulls the
    /// job and begins it at once, where through the pull loop it took one
    /// more task's wake-up (memory, 10 alternating pairs of 200 jobs:
    /// median p50 enqueue-to-start latency 0.085 ms before, 0.076 after).
    /// One lane only, as every lane woken would pull.
    ///
    /// And one runner only (the first): a push then wakes one task, which
    /// Tokio runs on the pushing thread once the pusher yields, where waking
    /// every runner's lane also had the pushing thread wake a parked one for
    /// the second task, before its own yield. The listening lane tells the
    /// sibling runners once the pushed job has begun (see
    /// [`Self::tell_siblings`]), and its own pull loop once its turn is
    /// over.
    fn lane_listens(&self, index: usize) -> bool {
        self.subscribes && !self.pull_loop_listens() && index == 0
    }

    /// The stocks of the worker's other runners.
    fn siblings(&self) -> impl Iterator<Item = &Stock> {
        let stocks = self.crew.stocks.iter();
        stocks
            .filter(|sibling| !Arc::ptr_eq(sibling, &self.stock))
            .map(|sibling| &**sibling)
    }

    /// Tells the sibling runners that the queues may hold due jobs (a push
    /// the first runner's lane heard), as their own subscriptions would:
    /// every sibling counts the sign, so that one whose slot frees later
    /// pulls for it (its lane, or its pull loop); those with a slot free
    /// now have their pull loops woken to pull for it.
    fn tell_siblings(&self) {
        for sibling in self.siblings() {
            sibling.may_have_more();
            if sibling.slots.free() > 0 {
                sibling.board.ended.notify_one();
            }
        }
    }

    /// On a backend with instant writes, a lane that finds the buffer empty
    /// with a slot free pulls for it itself, sized and counted in the stock
    /// as the pull loop's pulls are, instead of waiting for the pull loop
    /// to be scheduled, pull, and send it the jobs. Such a pull is a call
    /// into this process, and each hand-over costs two tasks' wake-ups.
    /// (A lane that keeps feeding itself still yields now and then: see
    /// [`STARTS_BETWEEN_YIELDS`].)
    ///
    /// Such a lane does not tell the pull loop that the buffer runs low
    /// (see [`Buffer::take`](super::buffer::Buffer::take)); once it has
    /// found the buffer dry with a slot free, and its pull (if it made one)
    /// has landed, it tells the pull loop, which then sees to what the
    /// lane's pull did not: jobs left over for sibling runners with a
    /// slot free, a lack of room under the bound on leases held, or the
    /// pull made for a share of the buffer. (A push signalled while the
    /// lane's pull was under way is heard by the listening lane next, and
    /// told to the siblings: see [`Self::lane_listens`].)
    async fn pull_here(&self) -> Refill {
        if !self.shared.instant_writes {
            // The lane's `take` told the pull loop.
            return Refill::Wait;
        }
        if self.stock.slots.free() == 0 {
            // `take` found no slot, not a dry buffer: nothing to tell.
            return Refill::Wait;
        }
        let refill = self.pull_if_worth_it().await;
        self.stock.board.ended.notify_one();
        refill
    }

    async fn pull_if_worth_it(&self) -> Refill {
        let stock = &*self.stock;
        // Not if the buffer was filled since the lane found it dry: the
        // pull loop, told next, starts those jobs. (Going back to take
        // them would spin should `take` keep refusing them.)
        let worth_it = stock.has_more()
            && stock.buffer.is_empty()
            && stock.slots.free() > 0
            && self.stop.borrow().is_none()
            && *self.started.phase.borrow() == Phase::Running;
        if !worth_it {
            return Refill::Wait;
        }
        let Reserve::Pull(want) = stock.reserve(stock.slots.free()) else {
            return Refill::Wait;
        };
        let batch = u32::try_from(want).unwrap_or(MAX_PULL_BATCH);
        let request = self.request.clone().batch(batch);
        let pulled = Pulled::send(
            Arc::clone(&self.shared.backend),
            request,
            stock.signs(),
            Arc::clone(&stock.board),
        )
        .await;
        // Slots were free with nothing buffered: starved.
        let refused = pulled.land(stock, &self.crew.keeper, true);
        if !refused.is_empty() {
            Refill::Refused(refused)
        } else if stock.buffer.is_empty() {
            Refill::Wait
        } else {
            Refill::Buffered
        }
    }

    /// Begins the run of a buffered job on the slot taken for it, with the
    /// lane's `cx` and `view` (see [`begin`]).
    fn begin<'a>(
        &'a self,
        (job, slot): Start,
        view: &'a Arc<WorkerView<S>>,
        cx: &mut Context<'_>,
    ) -> Begun<impl Future<Output = Ended> + Send + use<'a, S>> {
        let mode = self.mode(slot, job.hold, view);
        begin(&self.shared, job.lease, job.job, mode, Some(cx))
    }

    /// The whole run of a buffered job on the slot taken for it.
    fn run<'a>(
        &'a self,
        (job, slot): Start,
        view: &'a Arc<WorkerView<S>>,
    ) -> impl Future<Output = Ended> + Send + 'a {
        let mode = self.mode(slot, job.hold, view);
        execute(&self.shared, job.lease, job.job, mode)
    }

    fn mode<'a>(&'a self, slot: Slot, hold: Hold, view: &'a Arc<WorkerView<S>>) -> Mode<'a, S> {
        Mode::Spawned {
            started: &self.started,
            view,
            slot: Some(slot),
            hold: Some(hold),
        }
    }
}

/// How many jobs a lane starts between two yields to the scheduler.
const STARTS_BETWEEN_YIELDS: usize = 256;

/// A job handed to a lane.
type Start = (Buffered, Slot);

/// What a job's run came to, or the panic that escaped it.
type RunEnd = std::thread::Result<Ended>;

/// A run a lane drives beside its others.
type Run<'a> = Pin<Box<dyn Future<Output = RunEnd> + Send + 'a>>;

/// `run` as a lane drives it: boxed, a panic that escapes it caught.
fn contained_run<'a>(run: impl Future<Output = Ended> + Send + 'a) -> Run<'a> {
    Box::pin(AssertUnwindSafe(run).catch_unwind())
}

/// What `f` returns, given the calling task's context: a call made in
/// place, in the task's current poll.
async fn in_place<T>(f: impl FnOnce(&mut Context<'_>) -> T) -> T {
    let mut f = Some(f);
    std::future::poll_fn(|cx| {
        let f = f.take().expect("called once: it is ready at once");
        Poll::Ready(f(cx))
    })
    .await
}

/// The most jobs a lane begins in place in one turn; the rest of the
/// turn's jobs go to its `FuturesUnordered`, which polls them in turn with
/// its other runs. As many as a completion batch holds: at 64, a busy
/// lane sent one job in five to nine that way (as many as its slots, each
/// turn), each built, boxed, moved and woken as a run (memory `process`,
/// 300,000 jobs, alternating runs: CPU per job lower at 256 in 24 of 26
/// pairs on one thread, medians 0.64–0.68 against 0.68–0.73 µs over three
/// sets, and in 6 of 6 on two). The price: a run under way that is woken
/// waits for up to 256 first polls, not 64, before its next poll.
const FIRST_POLLS_AT_ONCE: usize = MAX_ACK_BATCH;

/// Counts a run's end on the lane's `board` and, once the worker is
/// shutting down, in its `report`; keeps its completion, if it left one,
/// in `acks` to be recorded with others.
fn settle(
    ended: RunEnd,
    board: &Board,
    index: usize,
    report: &mut ShutdownReport,
    acks: &mut Vec<Ack>,
) {
    let in_grace = board.stopping.load(Ordering::Relaxed);
    match ended {
        Ok(Ended::Recorded(outcome)) => {
            board.ended(index, Some(&outcome));
            if in_grace {
                report.count(&outcome);
            }
        }
        Ok(Ended::Handed) => {
            board.ended(index, None);
            report.finished += usize::from(in_grace);
        }
        Ok(Ended::Completed(ack)) => {
            acks.push(ack);
            board.ended(index, None);
            report.finished += usize::from(in_grace);
        }
        Err(panic) => {
            // `begin` and `finish` contain handler panics, so this is a bug in
            // relayq itself; the lane and its other jobs go on.
            board.ended(index, Some(&Outcome::LeaseLost));
            tracing::error!(
                panic = %panic_message(&*panic),
                "a job of the worker failed"
            );
        }
    }
}

/// Runs the jobs sent to it side by side, and starts buffered jobs on the
/// slots its own runs free (on a backend with instant writes, pulling them
/// itself once the buffer is dry: see [`Starter::pull_here`]), until its
/// sender is gone and its jobs have all ended; returns what they came to.
///
/// A job is begun in place as it starts (see [`begin`]): a quick handler
/// ends right there, an outcome a store records at once is recorded there
/// too, and only a run that is not done is given a task in `running`
/// (building its future, moving it there, and each later wake-up, cost
/// more than most quick handlers).
async fn lane<S: Send + Sync + 'static>(
    starter: Arc<Starter<S>>,
    index: usize,
    mut starts: mpsc::UnboundedReceiver<Start>,
) -> ShutdownReport {
    let board = &*starter.started.board;
    let stock = &*starter.stock;
    let in_flight = &board.in_flight[index];
    // What the contexts of the lane's jobs see of the worker: one per lane,
    // as a lane's jobs run on its thread (see `WorkerView`).
    let view = Arc::new(WorkerView {
        state: Arc::clone(&starter.shared.state),
        phase: starter.started.phase.clone(),
    });
    let mut running: FuturesUnordered<Run<'_>> = FuturesUnordered::new();
    let mut report = ShutdownReport::default();
    let mut open = true;
    let mut batch = Vec::new();
    let mut started = 0usize;
    // Whether taking from the buffer tells the pull loop when it runs low:
    // on a backend with instant writes the lane pulls for itself instead,
    // and tells the pull loop after (see `Starter::pull_here`).
    let tell = !starter.shared.instant_writes;
    // Completions of the runs that ended together, recorded in one call.
    let mut acks = Vec::new();
    let listens = starter.lane_listens(index);
    while open || !running.is_empty() {
        // Whether jobs were pushed (a signal heard this turn).
        let mut heard = false;
        // Whether to start buffered jobs on the free slots (pulling for
        // them if the buffer is dry): runs ended, or jobs were pushed.
        let mut refill = tokio::select! {
            biased;
            Some(ended) = running.next(), if !running.is_empty() => {
                // This run's end and those of the runs ready to end now.
                // (Polled without a waker, but `running` is polled with
                // the lane's own before the lane waits again.)
                let mut next = Some(ended);
                while let Some(ended) = next.take() {
                    settle(ended, board, index, &mut report, &mut acks);
                    if acks.len() < MAX_ACK_BATCH {
                        next = running.next().now_or_never().flatten();
                    }
                }
                true
            }
            // Exempt from Tokio's cooperative budget: polled after handlers
            // that may spend all of it on every poll, a budgeted receive
            // would never see the jobs sent here. It cannot hog the lane:
            // what it receives is bounded by the concurrency slots.
            received = tokio::task::unconstrained(starts.recv_many(&mut batch, 64)), if open => {
                if received == 0 {
                    open = false;
                }
                false
            }
            // Exempt from the budget too, for the same reason: a push
            // would go unheard while such a handler runs.
            () = tokio::task::unconstrained(starter.signals.next()), if listens && open => {
                stock.may_have_more();
                heard = true;
                true
            }
        };
        // Whether the sibling runners are yet to hear of this turn's push,
        // and how many jobs the turn has begun.
        let mut untold = heard;
        let mut begun = 0usize;
        // The jobs sent here, then (if runs ended or jobs were pushed)
        // buffered jobs on the free slots, and on those freed by the jobs
        // that end at their first poll.
        let mut polled = 0;
        let mut sent = batch.drain(..);
        let mut now = Instant::now();
        loop {
            let (job, slot) = match sent.next() {
                Some(start) => start,
                None if refill => match stock.buffer.take(&stock.slots, tell, in_flight, now) {
                    Some(start) => start,
                    None => match starter.pull_here().await {
                        Refill::Buffered => {
                            now = Instant::now();
                            continue;
                        }
                        Refill::Wait => break,
                        Refill::Refused(jobs) => {
                            report.released +=
                                release_all(&starter.shared, board, jobs, None).await;
                            break;
                        }
                    },
                },
                None => break,
            };
            // The siblings are told of a push heard this turn once its first
            // job (the pushed one, as a rule) has begun, not before: told
            // first, they would have this thread wake a parked one before
            // the job begins (memory, idle, a fifth of the enqueue-to-start
            // latency); nor after the rest of a turn that may be long.
            if untold && begun > 0 {
                untold = false;
                starter.tell_siblings();
            }
            begun += 1;
            // A lane kept busy (by a deep buffer, or by pulling for itself)
            // may never wait; it yields every so many starts, so the tasks
            // sharing its thread (the pull loop, which watches for the
            // shutdown, and the keeper, which renews leases) still run.
            // Counted here rather than with Tokio's cooperative budget,
            // which costs a thread-local access on every start and a
            // yield every 128 (4% of quick jobs' throughput, measured).
            started += 1;
            if started.is_multiple_of(STARTS_BETWEEN_YIELDS) {
                tokio::task::yield_now().await;
                // Time passed in the first polls and the yield: the next
                // jobs taken are judged against it (see `Buffer::take`).
                now = Instant::now();
            }
            let start = (job, slot);
            if polled >= FIRST_POLLS_AT_ONCE || acks.len() >= MAX_ACK_BATCH {
                running.push(contained_run(starter.run(start, &view)));
                continue;
            }
            polled += 1;
            let begun = in_place(|cx| {
                std::panic::catch_unwind(AssertUnwindSafe(|| starter.begin(start, &view, cx)))
            })
            .await;
            let ended = match begun {
                Ok(Begun::Ended(ended)) => Ok(ended),
                Ok(Begun::Waiting(rest)) => {
                    running.push(contained_run(rest));
                    continue;
                }
                Ok(Begun::Recording(rest)) => {
                    // Most records on a store with instant writes are
                    // done at their first poll, here.
                    let mut rest = contained_run(rest);
                    match in_place(|cx| rest.as_mut().poll(cx)).await {
                        Poll::Ready(ended) => ended,
                        Poll::Pending => {
                            running.push(rest);
                            continue;
                        }
                    }
                }
                Err(panic) => Err(panic),
            };
            settle(ended, board, index, &mut report, &mut acks);
            refill = true;
        }
        drop(sent);
        if heard {
            // Told once the lane has pulled for its free slots, so that the
            // pull loop pulls ahead into the buffer only what the lane did
            // not, and never races it for the pushed job.
            board.ended.notify_one();
            if untold {
                starter.tell_siblings();
            }
        }
        if !acks.is_empty() {
            let n = acks.len();
            // The next turn's completions get as much room as this one's.
            let batch = std::mem::replace(&mut acks, Vec::with_capacity(n));
            record_contained(&starter.shared, board, batch).await;
        }
    }
    report
}

/// The runtime's worker threads.
fn runtime_threads() -> usize {
    tokio::runtime::Handle::current().metrics().num_workers()
}

/// How many lanes run a runner's jobs: one per runtime thread the runner
/// has to itself, as a task per job would spread over them, but no more
/// than its jobs at once.
fn lane_count(runners: usize, concurrency: u32) -> usize {
    runtime_threads()
        .div_ceil(runners)
        .clamp(1, concurrency.max(1) as usize)
}

/// A runner's part of its worker's concurrency and prefetch.
#[derive(Debug, Clone, Copy)]
struct Share {
    concurrency: u32,
    prefetch: u32,
}

impl Share {
    /// Runner `index`'s share of `total` split between `runners`.
    fn part(total: u32, runners: usize, index: usize) -> u32 {
        let runners = u32::try_from(runners).unwrap_or(u32::MAX);
        let index = u32::try_from(index).unwrap_or(u32::MAX);
        total / runners + u32::from(index < total % runners)
    }
}

/// How many runners (a pull loop and its lanes each) a started worker has.
///
/// One, unless the backend's writes are instant (calls into this process,
/// as with the memory store): then one per runtime thread, each with its
/// share of the concurrency and prefetch. A runner's lanes are woken by
/// its pull loop (or, the first runner's, by a push: see
/// `Starter::lane_listens`), and Tokio
/// runs a woken task on the waking thread (in a slot no other thread may
/// steal), so one runner's work gathers on one thread however many lanes
/// it has; runners that each pull for themselves keep a thread each busy,
/// and share nothing per job. A runner with a free slot and an empty
/// buffer takes the jobs a sibling buffered but has no free slot for, so
/// a job never waits behind one runner's long handlers while the worker
/// has a slot free. For a backend with round trips a single runner keeps
/// its pulls large and its completions in one batch.
fn runner_count(instant_writes: bool, concurrency: u32) -> usize {
    if instant_writes {
        runtime_threads().clamp(1, concurrency.max(1) as usize)
    } else {
        1
    }
}

/// Runs the worker's runners until `stop` carries a deadline (see [`run`]);
/// returns what their shutdown did, summed.
pub(crate) async fn run_all<S: Send + Sync + 'static>(
    shared: Arc<Shared<S>>,
    stop: watch::Receiver<Option<Instant>>,
) -> ShutdownReport {
    let config = &shared.config;
    let runners = runner_count(shared.instant_writes, config.concurrency);
    let share = |index| Share {
        concurrency: Share::part(config.concurrency, runners, index),
        prefetch: Share::part(config.prefetch, runners, index),
    };
    let crew = Arc::new(Crew {
        stocks: (0..runners)
            .map(|index| {
                let share = share(index);
                // A finished job's lease is renewed until its outcome is
                // recorded, so the bound on those awaiting it is about
                // memory: were acknowledgements slower than pulls (a
                // database slowed by a vacuum, say), the backlog would
                // otherwise grow without end.
                let max_held = (share.concurrency + share.prefetch) as usize
                    + WorkerBuilder::<S>::MAX_AWAITING_ACK as usize;
                Arc::new(Stock::new(
                    lane_count(runners, share.concurrency),
                    share.concurrency,
                    share.prefetch,
                    max_held,
                ))
            })
            .collect(),
        keeper: LeaseKeeper::start(
            Arc::clone(&shared.backend),
            config.lease,
            config.backend_lease,
            Arc::clone(&config.untimed_kinds),
        ),
    });
    if runners == 1 {
        return run(Arc::clone(&shared), stop, share(0), crew, 0).await;
    }
    let mut tasks = JoinSet::new();
    for index in 0..runners {
        let runner = run(
            Arc::clone(&shared),
            stop.clone(),
            share(index),
            Arc::clone(&crew),
            index,
        );
        tasks.spawn(runner);
    }
    let mut report = ShutdownReport::default();
    while let Some(joined) = tasks.join_next().await {
        match joined {
            // As a single runner's panic would, through the handle.
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            joined => report.add(joined),
        }
    }
    report
}

/// How many times the pull loop yields to let other handlers finish before
/// it pulls for the slots free so far (when it keeps no buffer).
const COALESCE_YIELDS: usize = 4;

/// How many releases run at once when a shutdown gives back the buffer.
const RELEASES_AT_ONCE: usize = 8;

fn free_slots(slots: &Slots) -> u32 {
    u32::try_from(slots.free()).unwrap_or(u32::MAX)
}

/// A pull under way.
type Pulling = Pin<Box<dyn Future<Output = Pulled> + Send>>;

/// What a pull came to.
struct Pulled {
    jobs: Result<Vec<LeasedJob>>,
    asked: u32,
    /// When it was sent.
    sent: Instant,
    /// The stock's signs when it was sent.
    signs: u64,
}

impl Pulled {
    /// Sends `request`, reserved in a stock whose signs read `signs`. A
    /// panic in the backend's `pull` (a bug) counts as a failed pull, so
    /// that the lane or pull loop that sent it goes on and the pull is not
    /// counted as asked for ever after; the jobs it may have leased come
    /// back when their leases end.
    ///
    /// Sent at its first poll, which may come once the runner (whose board
    /// is `board`) is shutting down (its pull loop stops before polling the
    /// pull it just made): then not sent at all, as the jobs it leased
    /// would only go back (a handler's push made during the shutdown among
    /// them), and it comes back empty.
    async fn send(
        backend: Arc<dyn Backend>,
        request: PullRequest,
        signs: u64,
        board: Arc<Board>,
    ) -> Self {
        let sent = Instant::now();
        let jobs = if board.stopping.load(Ordering::SeqCst) {
            Ok(Vec::new())
        } else {
            contained("pull", backend.pull(&request)).await
        };
        Self {
            jobs,
            asked: request.batch,
            sent,
            signs,
        }
    }

    /// Lands the pull in `stock`: steers the buffer's depth (`starved`:
    /// slots sat free with nothing buffered for it), marks the queues
    /// drained if it came back short or failed, buffers its jobs with the
    /// `keeper` holding their leases, and stops counting them as asked
    /// for. Returns the jobs a closed buffer refused, to be given back.
    fn land(self, stock: &Stock, keeper: &LeaseKeeper, starved: bool) -> VecDeque<Buffered> {
        let refused = match self.jobs {
            Ok(jobs) => {
                let full = jobs.len() >= self.asked as usize;
                stock.pulled(self.sent.elapsed(), full, starved, self.signs);
                stock.buffer.extend(hold(keeper, jobs, self.sent))
            }
            Err(e) => {
                tracing::error!(error = %e, "pull failed; trying again at the next poll");
                stock.drained(self.signs);
                VecDeque::new()
            }
        };
        // Counted as asked until its jobs are in the buffer.
        stock.landed(self.asked as usize);
        refused
    }
}

/// Runner `index` of `crew` (its stock is `crew.stocks[index]`, the
/// others its siblings'): pulls and runs jobs until `stop` carries a
/// deadline (or its sender is gone), then drains: no more pulls, buffered
/// jobs are released at once, in-flight jobs get until the deadline, the
/// rest are released.
async fn run<S: Send + Sync + 'static>(
    shared: Arc<Shared<S>>,
    mut stop: watch::Receiver<Option<Instant>>,
    share: Share,
    crew: Arc<Crew>,
    index: usize,
) -> ShutdownReport {
    let config = &shared.config;
    let (phase_tx, phase_rx) = watch::channel(Phase::Running);
    let keeper = &crew.keeper;
    // On a backend with instant writes only the first runner subscribes
    // (see `Starter::lane_listens`).
    let subscribes = index == 0 || !shared.instant_writes;
    let signals = if subscribes {
        Signals::subscribe(
            Arc::clone(&shared.backend),
            config.queues.clone(),
            config.poll_interval,
        )
    } else {
        Signals::none(Arc::clone(&shared.backend))
    };
    let request = PullRequest::queues(config.queues.clone()).lease(config.backend_lease);
    // The lanes that run started jobs until their outcomes are recorded
    // or handed to the completion batcher.
    let stock = Arc::clone(&crew.stocks[index]);
    let board = Arc::clone(&stock.board);
    let lanes = board.in_flight.len();
    let (ack_tx, ack_rx) = mpsc::unbounded_channel();
    // A backend with instant writes has each completion recorded by its
    // lane as the handler returns; nothing is ever handed to a batcher.
    let completer = (!shared.instant_writes).then(|| {
        tokio::spawn(batch_completions(
            Arc::clone(&shared),
            Arc::clone(&board),
            ack_rx,
        ))
    });
    let starter = Arc::new(Starter {
        shared: Arc::clone(&shared),
        started: Started {
            phase: phase_rx,
            acks: ack_tx,
            board: Arc::clone(&board),
        },
        stock: Arc::clone(&stock),
        crew: Arc::clone(&crew),
        request: request.clone(),
        stop: stop.clone(),
        signals,
        subscribes,
    });
    if subscribes && shared.instant_writes {
        // The siblings subscribe to nothing: a push made after their first
        // pulls and before this subscription was made went unheard. They
        // look once more.
        starter.tell_siblings();
    }
    let (slots, buffer) = (&stock.slots, &stock.buffer);
    let mut lane_tasks: JoinSet<ShutdownReport> = JoinSet::new();
    let mut starts = Vec::with_capacity(lanes);
    for index in 0..lanes {
        let (tx, rx) = mpsc::unbounded_channel();
        starts.push(tx);
        lane_tasks.spawn(lane(Arc::clone(&starter), index, rx));
    }
    let mut pulls: FuturesUnordered<Pulling> = FuturesUnordered::new();
    // Jobs the buffer refused (none: see where they are added).
    let mut refused = VecDeque::new();
    // Buffered jobs being given back for waiting too long; their leases
    // are renewed until they are.
    let mut giving_back: JoinSet<usize> = JoinSet::new();
    // When the last pull was sent; the poll timer fires a poll interval
    // after it. Re-arming a timer costs more than a pull on a quick store,
    // so the timer is only moved once it fires.
    let mut last_pull = Instant::now();
    let poll = tokio::time::sleep_until(after(last_pull, config.poll_interval));
    tokio::pin!(poll);
    tracing::info!(queues = ?config.queues, concurrency = share.concurrency, "worker started");

    let deadline = loop {
        if board.due_now.swap(false, Ordering::SeqCst) {
            stock.may_have_more();
        }
        if let Some(deadline) = *stop.borrow_and_update() {
            break deadline;
        }
        // The leases held when the pull loop last stopped short for lack of
        // room under the stock's bound, if it did.
        let mut room_bound: Option<usize> = None;
        // Start buffered jobs on the free slots (lanes start the next one
        // themselves as their runs end). Then, unless stopping (a sibling
        // that saw the stop gives its buffer back), those a sibling buffered
        // beyond the slots it has free: its lanes start no more than that.
        // Counted against what it has free, not skipped while it has any: a
        // slot its lane is about to refill is no slot for the rest.
        let now = Instant::now();
        let start_from = |from: &Stock, surplus_only: bool| {
            while !surplus_only || from.buffer.len() > from.slots.free() {
                let lane = board.idlest_lane();
                let Some((job, slot)) = from.buffer.take(slots, false, &board.in_flight[lane], now)
                else {
                    break;
                };
                if starts[lane].send((job, slot)).is_err() {
                    // Lanes end only once their sender is dropped, below.
                    unreachable!("lane {lane} stopped while the worker runs");
                }
            }
        };
        start_from(&stock, false);
        if stop.borrow().is_none() {
            for sibling in starter.siblings() {
                start_from(sibling, true);
            }
        }
        // Jobs buffered here with no slot free: a sibling with one takes
        // them (told only then, so not for every job).
        if free_slots(slots) == 0 && !buffer.is_empty() {
            for sibling in starter
                .siblings()
                .filter(|sibling| sibling.slots.free() > 0)
            {
                sibling.board.ended.notify_one();
            }
        }
        // Jobs buffered here that waited a whole poll interval for a slot:
        // quick jobs deepened the buffer, and slow ones now hold every slot
        // (a sibling with one free took them above). They go back, for any
        // worker with a free slot, and the buffer starts over from empty.
        while giving_back.try_join_next().is_some() {}
        if let Some(since) = now.checked_sub(config.poll_interval) {
            let held = buffer.take_all_if_buffered_by(since);
            if !held.is_empty() {
                stock.prefetch().restart();
                tracing::debug!(
                    jobs = held.len(),
                    "giving back buffered jobs that waited a poll interval for a slot"
                );
                let (shared, stock) = (Arc::clone(&shared), Arc::clone(&stock));
                giving_back.spawn(async move {
                    release_all(&shared, &stock.board, held, Some(&stock.buffer)).await
                });
            }
        }
        stock.prefetch().waited(buffer.take_longest_wait());
        let lapsed = buffer.take_lapsed();
        if lapsed > 0 {
            tracing::warn!(
                jobs = lapsed,
                "jobs not started: their leases went unrenewed for five sixths of a lease \
                 (a pull answered late, the process stalled, or the store unreachable); \
                 another worker may run them"
            );
        }

        // Pull for the free slots and what the buffer lacks, in up to
        // PULLS_AT_ONCE overlapping pulls, each for the free slots and its
        // share of the buffer, so that the store serves them side by side.
        while stock.has_more() && pulls.len() < PULLS_AT_ONCE {
            let mut free = free_slots(slots);
            let target = stock.prefetch().target();
            // Without a buffer to start from, let the handlers that are
            // about to return do so, so that one pull fills all their slots
            // instead of one round trip (and one commit) per slot. Costs
            // microseconds; a slow handler's slot is still refilled at once.
            if target == 0 && free > 0 && pulls.is_empty() {
                for _ in 0..COALESCE_YIELDS {
                    if free >= share.concurrency {
                        break;
                    }
                    tokio::task::yield_now().await;
                    free = free_slots(slots);
                }
            }
            let want = match stock.reserve(free as usize) {
                Reserve::Pull(want) => want,
                Reserve::Enough => break,
                Reserve::Full(held) => {
                    room_bound = Some(held);
                    break;
                }
            };
            let batch = u32::try_from(want).unwrap_or(MAX_PULL_BATCH);
            let request = request.clone().batch(batch);
            last_pull = Instant::now();
            let pull = Pulled::send(
                Arc::clone(&shared.backend),
                request,
                stock.signs(),
                Arc::clone(&board),
            );
            pulls.push(Box::pin(pull) as Pulling);
        }

        // Taking jobs from the buffer (lanes do, as their runs end) wakes
        // this loop once so few are left that a pull is worth it (what the
        // buffer lacks reaches `least_worth_pulling`), unless the lanes pull
        // for themselves (see `Starter::pull_here`).
        buffer.set_low_water(stock.low_water());

        // Too many leases held to pull: only the end of a started job makes
        // room. Announced before counting again, so that an end between
        // the count and the wait is not missed.
        if let Some(held) = room_bound {
            board.wants_ends.store(true, Ordering::SeqCst);
            if stock.leases_held() < held {
                continue;
            }
        } else {
            board.wants_ends.store(false, Ordering::Relaxed);
        }
        tokio::select! {
            biased;
            changed = stop.changed() => {
                if changed.is_err() {
                    // Every handle is gone without a shutdown call.
                    break after(Instant::now(), config.shutdown_timeout);
                }
            }
            Some(pulled) = pulls.next(), if !pulls.is_empty() => {
                // Slots sat idle for this pull's round trip.
                let starved = buffer.is_empty() && free_slots(slots) > 0;
                // Only this loop closes the buffer, once it has left; were
                // a job refused, it would still be given back at the end.
                refused.extend(pulled.land(&stock, keeper, starved));
            }
            // The buffer ran low (or dry with a slot free; or a lane that
            // pulls for itself found it dry and pulled, or heard a push), a
            // job went back due at once, or one ended while the held leases
            // were at the bound.
            () = board.ended.notified() => {}
            () = starter.signals.next(), if starter.pull_loop_listens() => stock.may_have_more(),
            () = &mut poll => {
                let due = after(last_pull, config.poll_interval);
                let now = Instant::now();
                if due <= now {
                    stock.may_have_more();
                    last_pull = now;
                }
                poll.as_mut().reset(after(last_pull, config.poll_interval));
            }
        }
    };

    tracing::info!(
        in_flight = board.started(),
        buffered = buffer.len(),
        "worker shutting down"
    );
    starter.signals.stop();
    // Tell handlers (`JobContext::is_shutting_down`), then give them until
    // the deadline; the lanes count the runs that end from now on.
    board.stopping.store(true, Ordering::SeqCst);
    let _ = phase_tx.send(Phase::Stopping);
    let mut report = ShutdownReport::default();
    // Lanes end once their jobs have.
    drop(starts);
    // Jobs leased but not started go back at once, for another worker,
    // while the handlers run: however slow the store's releases, the
    // handlers are told to stop at the deadline. Those of pulls still out
    // go back as each lands, beside the others' releases: behind a slow
    // pull they would stay leased for as long as it took.
    let mut unstarted = buffer.close();
    unstarted.append(&mut refused);
    let releasing = async {
        let mut releases = FuturesUnordered::new();
        releases.push(release_all(&shared, &board, unstarted, None));
        let mut released = 0;
        let mut landing = true;
        while landing || !releases.is_empty() {
            tokio::select! {
                pulled = pulls.next(), if landing => match pulled {
                    Some(pulled) => {
                        let late = hold(keeper, pulled.jobs.unwrap_or_default(), pulled.sent);
                        stock.landed(pulled.asked as usize);
                        releases.push(release_all(&shared, &board, late, None));
                    }
                    None => landing = false,
                },
                Some(n) = releases.next(), if !releases.is_empty() => released += n,
            }
        }
        released
    };
    let winding_down = async {
        tokio::pin!(releasing);
        let (mut released, mut lanes_running) = (None, true);
        while released.is_none() || lanes_running {
            tokio::select! {
                n = &mut releasing, if released.is_none() => released = Some(n),
                joined = lane_tasks.join_next(), if lanes_running => match joined {
                    Some(joined) => report.add(joined),
                    None => lanes_running = false,
                },
            }
        }
        report.released += released.unwrap_or(0);
        // Given back before the shutdown: not counted in its report.
        while let Some(joined) = giving_back.join_next().await {
            if let Err(e) = joined {
                log_join_error("a release of buffered jobs", &e);
            }
        }
        // The batcher ends once every sender is gone: the last is the lanes'.
        drop(starter);
        if let Some(Err(e)) = OptionFuture::from(completer).await {
            log_join_error("the completion batcher", &e);
        }
    };
    // At the deadline, whatever is still going (handlers, releases, the
    // batcher's last writes, each of which may be trying again after a
    // transient failure) is told to give up: handlers are stopped and
    // their jobs given back, and failed writes are not made again.
    let abandon_at_deadline = async {
        tokio::time::sleep_until(deadline).await;
        board.abandoning.store(true, Ordering::SeqCst);
        let _ = phase_tx.send(Phase::Abandoning);
        std::future::pending::<()>().await;
    };
    tokio::select! {
        () = winding_down => {}
        () = abandon_at_deadline => {}
    }
    tracing::info!(
        finished = report.finished,
        released = report.released,
        "worker stopped"
    );
    report
}

/// Releases buffered jobs; returns how many went back. A release that
/// fails transiently is made again until the worker (whose `board` this
/// is) passes its shutdown deadline, as any outcome write (see
/// [`write_fenced`]): given back while the worker runs, a job left leased
/// would wait for its lease's end. Jobs taken out of `leaving` (given
/// back while the worker runs) are counted out of it one by one.
async fn release_all<S>(
    shared: &Shared<S>,
    board: &Board,
    buffer: VecDeque<Buffered>,
    leaving: Option<&Buffer>,
) -> usize {
    futures::stream::iter(buffer)
        .map(|Buffered { lease, hold, .. }| async move {
            // Renewed until released.
            let _hold = hold;
            let pending = |status| (status == JobStatus::Pending).then_some(());
            // A panic (a backend's bug) fails this release alone: in the
            // runner, it would abort the lanes in their grace period.
            let released = write_fenced(shared, Some(board), &lease, None, pending, || {
                contained("release", shared.backend.release(&lease))
            })
            .await;
            if let Some(leaving) = leaving {
                leaving.given_back(1);
            }
            match released {
                Fenced::Recorded(()) => 1,
                Fenced::LeaseLost => {
                    tracing::debug!(job = lease.job_id, "a buffered job's lease was gone before its release");
                    0
                }
                Fenced::Failed(e) => {
                    tracing::warn!(error = %e, job = lease.job_id, "could not release a buffered job; it returns when its lease ends");
                    0
                }
            }
        })
        .buffer_unordered(RELEASES_AT_ONCE)
        .fold(0, |n, released| async move { n + released })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_add_up_to_the_whole_and_differ_by_at_most_one() {
        for total in [0, 1, 2, 3, 10, 16, 1024] {
            for runners in 1..=5 {
                let parts: Vec<u32> = (0..runners)
                    .map(|i| Share::part(total, runners, i))
                    .collect();
                assert_eq!(parts.iter().sum::<u32>(), total, "{total} over {runners}");
                let (least, most) = (parts.iter().min(), parts.iter().max());
                assert!(
                    most.zip(least).is_some_and(|(m, l)| m - l <= 1),
                    "{parts:?}"
                );
            }
        }
    }
}
