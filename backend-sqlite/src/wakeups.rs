//! Wake-ups: an in-process watch channel bumped by every push through the
//! backend, plus, for file databases, a poller that notices jobs stored by
//! other connections or processes.
//!
//! The poller runs only while someone is subscribed. It keeps one dedicated
//! connection and asks it for `PRAGMA data_version`, which changes exactly
//! when another connection committed; only then does it read the id
//! sequence, and it signals when that grew (a new job was stored — retries,
//! completions and other writes do not wake anyone).

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

/// The newest id ever assigned (ids come from `AUTOINCREMENT`).
pub(crate) async fn last_id<'c, E>(conn: E) -> std::result::Result<i64, sqlx::Error>
where
    E: sqlx::Executor<'c, Database = sqlx::Sqlite>,
{
    sqlx::query_scalar(
        "SELECT COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'relayq_jobs'), 0)",
    )
    .fetch_one(conn)
    .await
}

/// Wake-ups for a new subscriber; `baseline` is the newest job id when it
/// subscribed (jobs stored by others after it are signalled).
pub(crate) fn subscribe(shared: &Arc<Shared>, baseline: i64) -> Wakeups {
    let rx = {
        let mut state = lock(&shared.poller);
        // Subscribe and check the poller under one lock, so the poller
        // cannot decide it has no subscribers in between and stop.
        let rx = shared.signals.subscribe();
        if !shared.in_memory && state.running.is_none() {
            state.started += 1;
            state.running = Some(state.started);
            let running = Running {
                shared: Arc::downgrade(shared),
                generation: state.started,
            };
            tokio::spawn(poll(running, baseline));
        }
        rx
    };
    // A watch channel cannot lose a signal between two waits: a push that
    // lands while the worker is busy is seen by its next `changed`.
    Wakeups::from_stream(futures::stream::unfold(rx, |mut rx| async move {
        rx.changed().await.ok()?;
        Some(((), rx))
    }))
}

async fn poll(running: Running, mut last_seq: i64) {
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
        match stored_new_jobs(c, &mut last_version, &mut last_seq).await {
            Ok(true) => shared.signal(),
            Ok(false) => {}
            Err(_) => conn = None,
        }
    }
}

/// Whether another connection stored a job since the last call.
async fn stored_new_jobs(
    conn: &mut SqliteConnection,
    last_version: &mut Option<i64>,
    last_seq: &mut i64,
) -> std::result::Result<bool, sqlx::Error> {
    let version: i64 = sqlx::query_scalar("PRAGMA data_version")
        .fetch_one(&mut *conn)
        .await?;
    if *last_version == Some(version) {
        return Ok(false);
    }
    *last_version = Some(version);
    let seq = last_id(&mut *conn).await?;
    let grew = seq > *last_seq;
    *last_seq = seq.max(*last_seq);
    Ok(grew)
}
