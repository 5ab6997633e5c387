//! This process's write lock, and the one connection every write of a file
//! database runs on.
//!
//! Writes are serialized anyway (SQLite has one writer at a time), so they
//! share one dedicated connection held under the lock instead of taking a
//! pooled one per write. A pooled connection costs a round trip to its
//! worker thread on checkout (the liveness ping) and another on return,
//! from a spawned task; and since the return is asynchronous, consecutive
//! writes land on different connections, each with a cold page cache
//! (SQLite drops a connection's cache whenever another one wrote) and its
//! own prepared statements. On the hot paths (`pull`, `complete_batch`,
//! single pushes) those round trips were as many as the statements run.

use std::ops::{Deref, DerefMut};

use sqlx::pool::PoolConnection;
use sqlx::{ConnectOptions, Sqlite, SqliteConnection};

use crate::Shared;
use crate::retry::Fail;

/// The write lock's contents: the dedicated connection, opened on first use
/// and reopened after it broke.
#[derive(Default)]
pub(crate) struct Writer {
    conn: Option<SqliteConnection>,
}

/// The connection a write runs on.
pub(crate) enum WriteConn<'w> {
    /// The dedicated connection of a file database.
    Own(&'w mut SqliteConnection),
    /// The pool's only connection: an in-memory database lives in it, so
    /// writes cannot have a connection of their own.
    Pooled(PoolConnection<Sqlite>),
}

impl Deref for WriteConn<'_> {
    type Target = SqliteConnection;

    fn deref(&self) -> &SqliteConnection {
        match self {
            Self::Own(conn) => conn,
            Self::Pooled(conn) => conn,
        }
    }
}

impl DerefMut for WriteConn<'_> {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        match self {
            Self::Own(conn) => conn,
            Self::Pooled(conn) => conn,
        }
    }
}

impl Writer {
    /// The connection to write on, opening it if needed. Fails once the
    /// backend is closed, so a write after [`crate::SqliteBackend::close`]
    /// cannot reopen the database.
    pub(crate) async fn conn(&mut self, shared: &Shared) -> Result<WriteConn<'_>, sqlx::Error> {
        if shared.pool.is_closed() {
            return Err(sqlx::Error::PoolClosed);
        }
        if shared.in_memory {
            return Ok(WriteConn::Pooled(shared.pool.acquire().await?));
        }
        let conn = match self.conn.take() {
            Some(conn) => conn,
            None => shared.connect.connect().await?,
        };
        Ok(WriteConn::Own(self.conn.insert(conn)))
    }

    /// Drops the connection after a failure that may have broken it (the
    /// worker thread died, an I/O error outside SQLite), so the next write
    /// opens a fresh one. Errors SQLite reported (a constraint, a lock) leave
    /// the connection usable.
    pub(crate) fn after<T>(&mut self, outcome: &Result<T, Fail>) {
        if let Err(Fail::Db(e)) = outcome
            && !matches!(e, sqlx::Error::Database(_))
        {
            self.conn = None;
        }
    }

    /// Takes the connection out, to close it.
    pub(crate) fn take(&mut self) -> Option<SqliteConnection> {
        self.conn.take()
    }
}
