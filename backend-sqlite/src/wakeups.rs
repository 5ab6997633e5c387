//! Wake-ups: an in-process watch channel bumped by every push, release and
//! retry due at once through the backend, plus, for file databases, a
//! poller that notices the same done by other connections or processes.
//!
//! The poller runs only while someone is subscribed. It keeps one dedicated
//! connection and asks it for `PRAGMA data_version`, which changes exactly
//! when another connection committed; only then does it read the
//! [`Marks`], and it signals when either grew: a new job was stored, or a
//! lease was released or a retry due at once recorded (those bump the
//! `relayq_wakeups` counter in their transaction, see [`announce`]).
//! Completions, delayed retries and other writes wake no one.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use relayq_core::Wakeups;
use sqlx::{ConnectOptions, SqliteConnection};
use tokio::time::MissedTickBehavior;

use crate::Shared;

/// Whether a poller runs, and which one.
#[derive(Debug, Default)]
pub(crate) struct PollerState {
    /// The generation of the running poller, if one runs.
    running: Option<u64>,
    /// Generations handed out so far.
    started: u64,
}

fn lock(state: &Mutex<PollerState>) -> MutexGuard<'_, PollerState> {
    // Every update of the state is a single assignment: always consistent.
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Marks its poller stopped however the task ends — returning, or being
/// dropped with the runtime it was spawned on — so a later subscriber
/// starts a new one.
struct Running {
    shared: Weak<Shared>,
    generation: u64,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.upgrade() {
            let mut state = lock(&shared.poller);
            if state.running == Some(self.generation) {
                state.running = None;
            }
        }
    }
}

/// Where the file's two wake-up sources stand; each only grows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Marks {
    /// The newest job id ever assigned (ids come from `AUTOINCREMENT`).
    stored: i64,
    /// The `relayq_wakeups` counter: jobs made due again.
    announced: i64,
}

impl Marks {
    /// Whether `self`, read later, shows a job that became due since
    /// `earlier`.
    fn past(self, earlier: Marks) -> bool {
        self.stored > earlier.stored || self.announced > earlier.announced
    }

    /// Both marks at their furthest: a mark never moves back.
    fn max(self, other: Marks) -> Marks {
        Marks {
            stored: self.stored.max(other.stored),
            announced: self.announced.max(other.announced),
        }
    }
}

/// Whether the file has the `relayq_wakeups` counter. Until it is seen,
/// each call looks (another process may migrate the file meanwhile).
async fn has_counter(
    shared: &Shared,
    conn: &mut SqliteConnection,
) -> std::result::Result<bool, sqlx::Error> {
    if shared.counter.load(Ordering::Relaxed) {
        return Ok(true);
    }
    let found: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM sqlite_schema \
         WHERE type = 'table' AND name = 'relayq_wakeups')",
    )
    .fetch_one(&mut *conn)
    .await?;
    if found {
        shared.counter.store(true, Ordering::Relaxed);
    }
    Ok(found)
}

/// Reads the [`Marks`] (without the counter on a file that has none).
pub(crate) async fn marks(
    shared: &Shared,
    conn: &mut SqliteConnection,
) -> std::result::Result<Marks, sqlx::Error> {
    let sql = if has_counter(shared, conn).await? {
        "SELECT COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'relayq_jobs'), 0), \
                COALESCE((SELECT seq FROM relayq_wakeups), 0)"
    } else {
        "SELECT COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'relayq_jobs'), 0), 0"
    };
    let (stored, announced) = sqlx::query_as(sql).fetch_one(&mut *conn).await?;
    Ok(Marks { stored, announced })
}

/// Tells other connections' pollers that a job became due, inside the
/// transaction making it due; `sqlite_sequence` already tells them of new
/// jobs. Nothing to do on a file without the counter.
pub(crate) async fn announce(
    shared: &Shared,
    conn: &mut sqlx::SqliteConnection,
) -> std::result::Result<(), sqlx::Error> {
    if has_counter(shared, conn).await? {
        sqlx::query("UPDATE relayq_wakeups SET seq = seq + 1")
            .execute(conn)
            .await?;
    }
    Ok(())
}

/// Wake-ups for a new subscriber; `baseline` is where the [`Marks`] stood
/// when it subscribed (what others do after it is signalled).
pub(crate) fn subscribe(shared: &Arc<Shared>, baseline: Marks) -> Wakeups {
    let (rx, start) = {
        let mut state = lock(&shared.poller);
        // Subscribe and check the poller under one lock, so the poller
        // cannot decide it has no subscribers in between and stop.
        let rx = shared.signals.subscribe();
        let start = (!shared.in_memory && state.running.is_none()).then(|| {
            state.started += 1;
            state.running = Some(state.started);
            Running {
                shared: Arc::downgrade(shared),
                generation: state.started,
            }
        });
        (rx, start)
    };
    // Spawned with the lock released: a runtime shutting down drops the
    // task inside `spawn`, and `Running`'s drop takes the lock.
    if let Some(running) = start {
        tokio::spawn(poll(running, baseline));
    }
    // A watch channel cannot lose a signal between two waits: a push that
    // lands while the worker is busy is seen by its next `changed`.
    Wakeups::from_stream(futures::stream::unfold(rx, |mut rx| async move {
        rx.changed().await.ok()?;
        Some(((), rx))
    }))
}

/// Whether no poller runs on `shared`'s file.
#[cfg(test)]
pub(crate) fn poller_stopped(shared: &Shared) -> bool {
    lock(&shared.poller).running.is_none()
}

async fn poll(running: Running, mut last_marks: Marks) {
    let shared = running.shared.clone();
    let Some((options, interval)) = shared
        .upgrade()
        .map(|s| (s.connect.clone(), s.poll_interval))
    else {
        return;
    };
    let mut conn: Option<SqliteConnection> = None;
    let mut last_version: Option<i64> = None;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        {
            // Ends with its subscribers, or with the backend's pool: a
            // closed backend keeps no connection to its file.
            let mut state = lock(&shared.poller);
            if shared.signals.receiver_count() == 0 || shared.pool.is_closed() {
                state.running = None;
                return;
            }
        }
        if conn.is_none() {
            // Reconnects on the next tick after a failure.
            conn = options.connect().await.ok();
            last_version = None;
        }
        let Some(c) = conn.as_mut() else {
            continue;
        };
        match made_due(&shared, c, &mut last_version, &mut last_marks).await {
            Ok(true) => shared.signal(),
            Ok(false) => {}
            Err(_) => conn = None,
        }
    }
}

/// Whether another connection stored a job, or made one due again, since
/// the last call.
async fn made_due(
    shared: &Shared,
    conn: &mut SqliteConnection,
    last_version: &mut Option<i64>,
    last_marks: &mut Marks,
) -> std::result::Result<bool, sqlx::Error> {
    let version: i64 = sqlx::query_scalar("PRAGMA data_version")
        .fetch_one(&mut *conn)
        .await?;
    if *last_version == Some(version) {
        return Ok(false);
    }
    *last_version = Some(version);
    let now = marks(shared, conn).await?;
    let grew = now.past(*last_marks);
    *last_marks = now.max(*last_marks);
    Ok(grew)
}
