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

use relayq_core::{Result, Wakeups};
use sqlx::{ConnectOptions, SqliteConnection};
use tokio::time::MissedTickBehavior;

use crate::Shared;
use crate::retry::map_sqlx;

fn lock(running: &Mutex<bool>) -> MutexGuard<'_, bool> {
    // Only a bool is guarded; it is always consistent.
    running.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The newest id ever assigned (ids come from `AUTOINCREMENT`).
async fn last_id<'c, E>(conn: E) -> std::result::Result<i64, sqlx::Error>
where
    E: sqlx::Executor<'c, Database = sqlx::Sqlite>,
{
    sqlx::query_scalar(
        "SELECT COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'relayq_jobs'), 0)",
    )
    .fetch_one(conn)
    .await
}

pub(crate) async fn subscribe(shared: &Arc<Shared>) -> Result<Wakeups> {
    // Jobs stored by others after this point will be signalled.
    let baseline = if shared.in_memory {
        0
    } else {
        last_id(&shared.pool).await.map_err(map_sqlx)?
    };
    let rx = {
        let mut running = lock(&shared.poller);
        // Subscribe and check the poller under one lock, so the poller
        // cannot decide it has no subscribers in between and stop.
        let rx = shared.pushed.subscribe();
        if !shared.in_memory && !*running {
            *running = true;
            tokio::spawn(poll(Arc::downgrade(shared), baseline));
        }
        rx
    };
    // A watch channel cannot lose a signal between two waits: a push that
    // lands while the worker is busy is seen by its next `changed`.
    Ok(Wakeups::from_stream(futures::stream::unfold(
        rx,
        |mut rx| async move {
            rx.changed().await.ok()?;
            Some(((), rx))
        },
    )))
}

async fn poll(shared: Weak<Shared>, mut last_seq: i64) {
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
            let mut running = lock(&shared.poller);
            if shared.pushed.receiver_count() == 0 {
                *running = false;
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
            Ok(true) => shared.pushed.send_modify(|n| *n = n.wrapping_add(1)),
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
