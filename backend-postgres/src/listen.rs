//! LISTEN/NOTIFY wake-ups on one dedicated, self-healing connection.
//!
//! A backend (and all its clones) has at most one listener connection, run
//! by one task. Each subscription registers its queues with the task, which
//! LISTENs on their channels (see `notify_channel` in the migration) before
//! the subscription is handed out, so no later push can be missed. A
//! notification's payload is its queue name; subscribers of that queue get
//! a signal. Signals coalesce: a subscriber that has not consumed its last
//! signal gets no second one.
//!
//! The connection is an sqlx [`PgListener`] over a private one-connection
//! pool built from the backend's connect options (never a connection of the
//! backend's pool). When it drops — server restart, `pg_terminate_backend`,
//! network failure — the task reconnects with backoff, LISTENs again, and
//! signals every subscriber once, since pushes made meanwhile were not
//! notified to it. (The task reconnects itself, never sqlx: a reconnection
//! sqlx made inside a receive that a new subscription interrupted would
//! send no such signal.) A subscription or reconnection that gets no answer
//! within the acquire timeout fails, as when the server went silent
//! without a reset; a new connection is made (the silent one's socket is
//! left to TCP, which gives up on it about a quarter of an hour later).
//!
//! A connection that only receives never notices its server went silent
//! (a failover that moved the address, a NAT or firewall that dropped the
//! idle connection): TCP has nothing to retransmit. So after an acquire
//! timeout with nothing heard, the task asks the server `SELECT 1`, and
//! reconnects when no answer comes within the acquire timeout.
//!
//! The channels LISTENed follow the live subscriptions: one that only
//! dropped subscriptions named is UNLISTENed when the next subscription
//! is made, and left out when the connection is replaced. (Until then its
//! notifications still arrive, and wake no one.)
//!
//! A pool push of the backend (or a clone) also signals the subscribers of
//! its queues directly ([`Hub::wake`]) as soon as its insert committed,
//! without waiting for its notification's round trip through the server;
//! the notification still follows, for other processes, and signals them
//! here a second time (one pull that may find nothing, unless the first
//! signal is still pending, since signals coalesce).

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use relayq_core::{Error, Result, Wakeups};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use sqlx::{Row, SqlStr};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, Sleep};

use crate::deadline::within;
use crate::error_from;

/// The longest wait between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// The first wait after a connection is lost.
const MIN_BACKOFF: Duration = Duration::from_millis(50);

/// The handle a backend keeps; dropping it (with the last backend clone)
/// ends the task and closes the connection.
#[derive(Debug)]
pub(crate) struct Hub {
    commands: mpsc::UnboundedSender<Subscribe>,
    subscribers: Subscribers,
}

/// The live subscriptions, shared by the task and the pushes that wake
/// them directly.
#[derive(Debug, Clone, Default)]
struct Subscribers(Arc<Mutex<Vec<Subscriber>>>);

impl Subscribers {
    fn lock(&self) -> MutexGuard<'_, Vec<Subscriber>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Signals the subscribers of any of `queues`; forgets dropped ones.
    fn wake(&self, queues: &[impl AsRef<str>]) {
        self.lock().retain(|s| {
            if queues.iter().any(|q| s.queues.contains(q.as_ref())) {
                s.wake()
            } else {
                !s.signal.is_closed()
            }
        });
    }

    /// Signals every subscriber; forgets dropped ones.
    fn wake_all(&self) {
        self.lock().retain(Subscriber::wake);
    }

    /// The queues the live subscriptions name; forgets dropped ones.
    fn live_queues(&self) -> HashSet<String> {
        let mut subscribers = self.lock();
        subscribers.retain(|s| !s.signal.is_closed());
        subscribers
            .iter()
            .flat_map(|s| s.queues.iter().cloned())
            .collect()
    }
}

struct Subscribe {
    queues: Vec<String>,
    signal: mpsc::Sender<()>,
    reply: oneshot::Sender<Result<()>>,
}

#[derive(Debug)]
struct Subscriber {
    queues: HashSet<String>,
    signal: mpsc::Sender<()>,
}

impl Subscriber {
    /// Signals, unless a signal is already pending. False once the
    /// subscription was dropped.
    fn wake(&self) -> bool {
        !matches!(
            self.signal.try_send(()),
            Err(mpsc::error::TrySendError::Closed(()))
        )
    }
}

impl Hub {
    /// Starts the task. It connects on the first subscription.
    /// `connect_timeout` bounds each (re)connection attempt, including
    /// the retries its pool makes within one, and each silence check.
    pub(crate) fn start(
        connect: PgConnectOptions,
        connect_timeout: Duration,
        channels_sql: SqlStr,
    ) -> Self {
        let (commands, rx) = mpsc::unbounded_channel();
        let subscribers = Subscribers::default();
        let task = Task {
            connect,
            connect_timeout,
            channels_sql,
            listener: None,
            channels: HashMap::new(),
            subscribers: subscribers.clone(),
        };
        tokio::spawn(task.run(rx));
        Self {
            commands,
            subscribers,
        }
    }

    /// Signals the subscribers of `queues` made through this hub (this
    /// backend and its clones), to which jobs were just committed.
    pub(crate) fn wake(&self, queues: &[String]) {
        self.subscribers.wake(queues);
    }

    /// True once the task has ended (e.g. its runtime shut down).
    pub(crate) fn is_closed(&self) -> bool {
        self.commands.is_closed()
    }

    /// A subscription to pushes to `queues`, live once this returns.
    pub(crate) async fn subscribe(&self, queues: &[String]) -> Result<Wakeups> {
        let (signal, mut signals) = mpsc::channel(1);
        let (reply, replied) = oneshot::channel();
        let closed = || Error::transient("relayq-postgres: the listener task has stopped");
        self.commands
            .send(Subscribe {
                queues: queues.to_vec(),
                signal,
                reply,
            })
            .map_err(|_| closed())?;
        replied.await.map_err(|_| closed())??;
        Ok(Wakeups::from_stream(futures::stream::poll_fn(move |cx| {
            signals.poll_recv(cx)
        })))
    }
}

enum State {
    /// No subscription yet, or reconnecting at the given instant.
    Waiting(Option<Instant>, Duration),
    /// Listening.
    Connected,
}

struct Task {
    connect: PgConnectOptions,
    connect_timeout: Duration,
    channels_sql: SqlStr,
    listener: Option<PgListener>,
    /// queue -> channel, for every queue LISTENed (but one whose UNLISTEN
    /// failed, until the connection it failed on is replaced).
    channels: HashMap<String, String>,
    subscribers: Subscribers,
}

impl Drop for Task {
    /// Ends the subscriptions with the task (say, its runtime shut down),
    /// so their holders see the end and subscribe again, which starts a new
    /// task: the hub keeps the list, but no one would signal it from NOTIFY.
    fn drop(&mut self) {
        self.subscribers.lock().clear();
    }
}

impl Task {
    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Subscribe>) {
        let mut state = State::Waiting(None, MIN_BACKOFF);
        let lost = || State::Waiting(Some(Instant::now() + MIN_BACKOFF), MIN_BACKOFF);
        // While connected: when the server was last heard from, and the one
        // timer that checks on it, re-armed only when it fires (a timer per
        // notification would cost a driver wake-up each).
        let mut heard = Instant::now();
        let check = tokio::time::sleep_until(heard);
        tokio::pin!(check);
        loop {
            let retry_at = match state {
                State::Waiting(at, _) => at,
                State::Connected => None,
            };
            let connected = matches!(state, State::Connected);
            tokio::select! {
                command = commands.recv() => {
                    let Some(command) = command else { return };
                    // A subscriber that stopped waiting (a worker stopping
                    // during its renewal, a caller's timeout) is not
                    // served: during an outage each such command would
                    // cost a connection attempt ahead of the live ones.
                    if command.reply.is_closed() {
                        continue;
                    }
                    let result = self.serve(command.queues, command.signal).await;
                    if let Err(e) = &result {
                        tracing::warn!(error = %e, "relayq-postgres: LISTEN failed");
                        // A connection lost or silent is replaced; one the
                        // server answered with a refusal (of this
                        // subscription's queries) still serves the others,
                        // whose channels it still LISTENs on.
                        if e.is_transient() || self.listener.is_none() {
                            self.listener = None;
                            if connected {
                                state = lost();
                            }
                        }
                    } else if !connected {
                        // A new connection. (A subscription on one already
                        // up may have sent nothing: it does not count as
                        // hearing from the server.)
                        state = State::Connected;
                        heard_from_server(&mut heard, check.as_mut(), self.connect_timeout);
                    }
                    // The caller may have gone; nothing to do then.
                    let _ = command.reply.send(result);
                }
                received = recv(self.listener.as_mut()), if connected => {
                    match received {
                        Ok(Some(notification)) => {
                            self.subscribers.wake(&[notification.payload()]);
                            heard = Instant::now();
                        }
                        // The connection closed (sqlx does not reconnect by
                        // itself here): reconnect, then signal everyone.
                        Ok(None) => {
                            tracing::warn!("relayq-postgres: listener connection closed");
                            self.listener = None;
                            state = lost();
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "relayq-postgres: listener connection lost");
                            self.listener = None;
                            state = lost();
                        }
                    }
                }
                () = &mut check, if connected => {
                    let due = heard + self.connect_timeout;
                    if due > Instant::now() {
                        check.as_mut().reset(due);
                        continue;
                    }
                    match within(self.connect_timeout, self.still_there()).await {
                        Ok(()) => {
                            heard_from_server(&mut heard, check.as_mut(), self.connect_timeout);
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "relayq-postgres: listener connection silent");
                            self.listener = None;
                            state = lost();
                        }
                    }
                }
                () = sleep_until(retry_at), if retry_at.is_some() => {
                    let State::Waiting(_, backoff) = state else { continue };
                    let limit = self.connect_timeout;
                    match within(limit, self.reconnect()).await {
                        Ok(()) => {
                            tracing::info!("relayq-postgres: listener reconnected");
                            state = State::Connected;
                            heard_from_server(&mut heard, check.as_mut(), self.connect_timeout);
                            self.subscribers.wake_all();
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "relayq-postgres: listener reconnect failed");
                            let backoff = (backoff * 2).min(MAX_BACKOFF);
                            state = State::Waiting(Some(Instant::now() + backoff), backoff);
                        }
                    }
                }
            }
        }
    }

    /// Asks the server for an answer on the LISTEN connection.
    async fn still_there(&mut self) -> Result<()> {
        let listener = self
            .listener
            .as_mut()
            .ok_or_else(|| Error::transient("relayq-postgres: listener not connected"))?;
        sqlx::query("SELECT 1")
            .execute(&mut *listener)
            .await
            .map_err(error_from)?;
        Ok(())
    }

    /// The queues LISTENed for that no live subscription, nor `keep`,
    /// names; forgets the dropped subscriptions.
    fn unused(&self, keep: &[String]) -> Vec<String> {
        // Read under the lock pushes take to wake subscribers; compared
        // after it is let go.
        let live = self.subscribers.live_queues();
        self.channels
            .keys()
            .filter(|queue| !keep.contains(queue) && !live.contains(*queue))
            .cloned()
            .collect()
    }

    /// Connects if not connected, LISTENing on the channels of the live
    /// subscriptions. True when it made a connection and LISTENed on any:
    /// a connection replacing one that was lost, so their subscribers may
    /// have missed pushes.
    async fn ensure_connected(&mut self) -> Result<bool> {
        if self.listener.is_some() {
            return Ok(false);
        }
        for queue in self.unused(&[]) {
            self.channels.remove(&queue);
        }
        // A private pool of one, dropped with the listener: a lost
        // connection is replaced by a new listener, never reconnected by
        // sqlx (eager reconnect is off, below).
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .min_connections(0)
            .idle_timeout(None)
            .max_lifetime(None)
            .acquire_timeout(self.connect_timeout)
            .connect_with(self.connect.clone())
            .await
            .map_err(error_from)?;
        let mut listener = PgListener::connect_with(&pool).await.map_err(error_from)?;
        // Reconnections are the task's, so each one signals (see above).
        listener.eager_reconnect(false);
        if !self.channels.is_empty() {
            listener
                .listen_all(self.channels.values().map(String::as_str))
                .await
                .map_err(error_from)?;
        }
        self.listener = Some(listener);
        Ok(!self.channels.is_empty())
    }

    async fn reconnect(&mut self) -> Result<()> {
        self.listener = None;
        self.ensure_connected().await.map(drop)
    }

    /// [`Self::subscribe`], bounded by the connect timeout: a LISTEN
    /// connection whose server went silent answers nothing, and TCP gives
    /// up only after about a quarter of an hour, while subscribers (a
    /// worker starting up) wait on this task. A connection that fails it
    /// at once may have died before the task read its end (a server
    /// restarted, a backend terminated): the subscription is then tried
    /// once more, on a new connection, within what is left of the bound,
    /// rather than failed until the subscriber's next try.
    async fn serve(&mut self, queues: Vec<String>, signal: mpsc::Sender<()>) -> Result<()> {
        let until = Instant::now() + self.connect_timeout;
        let had_listener = self.listener.is_some();
        let first = within(
            self.connect_timeout,
            self.subscribe(queues.clone(), signal.clone()),
        )
        .await;
        let left = until.saturating_duration_since(Instant::now());
        match first {
            Err(e) if had_listener && e.is_transient() && !left.is_zero() => {
                tracing::debug!(error = %e, "relayq-postgres: LISTEN failed; trying a new connection");
                self.listener = None;
                within(left, self.subscribe(queues, signal)).await
            }
            first => first,
        }
    }

    async fn subscribe(&mut self, queues: Vec<String>, signal: mpsc::Sender<()>) -> Result<()> {
        let sql = self.channels_sql.clone();
        let reconnected = self.ensure_connected().await?;
        if reconnected {
            self.subscribers.wake_all();
        }
        // Channels LISTENed for subscriptions since dropped (a worker of
        // queues no longer served) are let go as each new one comes, so
        // the set follows the live subscriptions instead of only growing.
        // Each is forgotten before its UNLISTEN: were one to fail, the
        // connection is replaced, and the new one LISTENs only on the
        // queues still known that a live subscription names.
        let unused = self.unused(&queues);
        let listener = self
            .listener
            .as_mut()
            .ok_or_else(|| Error::transient("relayq-postgres: listener not connected"))?;
        for queue in unused {
            if let Some(channel) = self.channels.remove(&queue) {
                listener.unlisten(&channel).await.map_err(error_from)?;
            }
        }
        let new: Vec<String> = queues
            .iter()
            .filter(|q| !self.channels.contains_key(*q))
            .cloned()
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        if !new.is_empty() {
            let rows = sqlx::query(sql)
                .bind(&new)
                .fetch_all(&mut *listener)
                .await
                .map_err(error_from)?;
            let mut named = Vec::with_capacity(rows.len());
            for row in rows {
                let queue: String = row.try_get("queue").map_err(error_from)?;
                let channel: String = row.try_get("channel").map_err(error_from)?;
                named.push((queue, channel));
            }
            listener
                .listen_all(named.iter().map(|(_, c)| c.as_str()))
                .await
                .map_err(error_from)?;
            self.channels.extend(named);
        }
        self.subscribers.lock().push(Subscriber {
            queues: queues.into_iter().collect(),
            signal,
        });
        Ok(())
    }
}

async fn recv(
    listener: Option<&mut PgListener>,
) -> Result<Option<sqlx::postgres::PgNotification>, sqlx::Error> {
    match listener {
        Some(listener) => listener.try_recv().await,
        None => std::future::pending().await,
    }
}

/// The server was just heard from (or connected to): the next check on
/// it is `timeout` away.
fn heard_from_server(heard: &mut Instant, check: Pin<&mut Sleep>, timeout: Duration) {
    *heard = Instant::now();
    check.reset(*heard + timeout);
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;

    /// A listener task, not started, for `backend`'s schema.
    fn task_of(backend: &crate::PgBackend) -> Task {
        let inner = &backend.inner;
        Task {
            connect: inner.listen_options.clone(),
            connect_timeout: inner.listen_timeout,
            channels_sql: inner.sql.channels.clone(),
            listener: None,
            channels: HashMap::new(),
            subscribers: Subscribers::default(),
        }
    }

    /// The channels the task's connection LISTENs on, as the server has them.
    async fn listening(task: &mut Task) -> Vec<String> {
        let listener = task.listener.as_mut().expect("connected");
        let mut channels: Vec<String> = sqlx::query_scalar("SELECT pg_listening_channels()")
            .fetch_all(&mut *listener)
            .await
            .expect("pg_listening_channels");
        channels.sort();
        channels
    }

    /// The channels of `queues`, as the task named them.
    fn channels_of(task: &Task, queues: &[&str]) -> Vec<String> {
        let mut channels: Vec<String> = queues
            .iter()
            .map(|q| task.channels.get(*q).expect("a known queue").clone())
            .collect();
        channels.sort();
        channels
    }

    /// A subscription the server refuses on a healthy connection (here its
    /// channels query fails) fails alone: the listener is kept, so the
    /// other subscriptions are not woken as after a reconnection, and they
    /// still hear their queues' notifications.
    #[tokio::test]
    async fn a_refused_subscription_keeps_the_listener() {
        let backend = testing::connect(testing::options()).await;
        let inner = &backend.inner;
        let refusing = sqlx::SqlSafeStr::into_sql_str(sqlx::AssertSqlSafe(format!(
            "SELECT q AS queue, CASE WHEN q = 'bad' THEN (1 / (length(q) - 3))::text \
             ELSE \"{}\".notify_channel(q) END AS channel FROM unnest($1::text[]) AS q",
            inner.schema
        )));
        let hub = Hub::start(inner.listen_options.clone(), inner.listen_timeout, refusing);
        let mut a = hub.subscribe(&["a".to_owned()]).await.expect("subscribe");
        hub.subscribe(&["bad".to_owned()])
            .await
            .expect_err("the server refuses it");
        let quiet = tokio::time::timeout(Duration::from_millis(500), a.next()).await;
        assert!(quiet.is_err(), "woken as after a reconnection: {quiet:?}");
        relayq_core::Pusher::push(
            &backend,
            relayq_core::NewJob::new("k", &serde_json::json!(1)).queue("a"),
        )
        .await
        .expect("push");
        tokio::time::timeout(Duration::from_secs(10), a.next())
            .await
            .expect("the push's notification")
            .expect("a signal");
        testing::drop_schema(backend.schema()).await;
    }

    /// A subscription made after the listener's server process ended, but
    /// before the task read the connection's end, is made on a new
    /// connection (it failed, and the subscriber tried again only at its
    /// next poll), and the other subscriptions are woken, as after any
    /// reconnection: notifications may have been missed meanwhile.
    #[tokio::test]
    async fn a_subscription_on_a_listener_just_ended_reconnects() {
        let backend = testing::connect(testing::options()).await;
        let mut task = task_of(&backend);
        let (first, mut first_rx) = mpsc::channel(1);
        task.serve(vec!["a".to_owned()], first)
            .await
            .expect("subscribe");
        let listener = task.listener.as_mut().expect("connected");
        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut *listener)
            .await
            .expect("pid");
        let mut admin = testing::admin().await;
        let ended: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
            .bind(pid)
            .fetch_one(&mut admin)
            .await
            .expect("terminate");
        assert!(ended);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (second, _second_rx) = mpsc::channel(1);
        task.serve(vec!["b".to_owned()], second)
            .await
            .expect("made on a new connection");
        let channels = channels_of(&task, &["a", "b"]);
        assert_eq!(listening(&mut task).await, channels);
        assert!(
            first_rx.try_recv().is_ok(),
            "the first subscription is woken"
        );
        testing::drop_schema(backend.schema()).await;
    }

    /// The LISTEN set follows the live subscriptions: a channel only
    /// dropped subscriptions named is let go when the next subscription is
    /// made, and left out when the connection is replaced; one a live
    /// subscription still names is kept.
    #[tokio::test]
    async fn only_the_channels_of_live_subscriptions_are_listened_on() {
        let backend = testing::connect(testing::options()).await;
        let mut task = task_of(&backend);
        let queues = |names: &[&str]| names.iter().map(|q| (*q).to_owned()).collect::<Vec<_>>();

        let (first, first_rx) = mpsc::channel(1);
        task.subscribe(queues(&["a", "b"]), first)
            .await
            .expect("subscribe");
        let (second, second_rx) = mpsc::channel(1);
        task.subscribe(queues(&["b", "c"]), second)
            .await
            .expect("subscribe");
        let abc = channels_of(&task, &["a", "b", "c"]);
        assert_eq!(listening(&mut task).await, abc);

        // The first dropped: "a" is let go, "b" kept for the second.
        drop(first_rx);
        let (third, third_rx) = mpsc::channel(1);
        task.subscribe(queues(&["d"]), third)
            .await
            .expect("subscribe");
        assert!(!task.channels.contains_key("a"));
        let bcd = channels_of(&task, &["b", "c", "d"]);
        assert_eq!(listening(&mut task).await, bcd);

        // The second dropped too: a new connection LISTENs for the third only.
        drop(second_rx);
        task.reconnect().await.expect("reconnect");
        let d = channels_of(&task, &["d"]);
        assert_eq!(listening(&mut task).await, d);
        assert_eq!(task.channels.len(), 1);

        // A queue let go is LISTENed again for a new subscription.
        let (fourth, mut fourth_rx) = mpsc::channel(1);
        task.subscribe(queues(&["a"]), fourth)
            .await
            .expect("subscribe");
        let ad = channels_of(&task, &["a", "d"]);
        assert_eq!(listening(&mut task).await, ad);

        // The connection lost with the third subscription gone: the next
        // subscription, to its queue, reconnects, leaves out "d" as the
        // new connection is made, LISTENs on it again for itself, and
        // signals the live subscriptions (pushes may have been missed).
        drop(third_rx);
        task.listener = None;
        let (fifth, mut fifth_rx) = mpsc::channel(1);
        task.subscribe(queues(&["d"]), fifth)
            .await
            .expect("subscribe");
        assert_eq!(listening(&mut task).await, ad);
        assert_eq!(
            fourth_rx.try_recv(),
            Ok(()),
            "the live subscription is signalled"
        );
        assert!(fifth_rx.try_recv().is_err(), "not the new one, added after");

        let schema = backend.inner.schema.clone();
        drop(task);
        backend.close().await;
        testing::drop_schema(&schema).await;
    }
}
