//! relayq: background jobs that are never lost, never run twice at once,
//! and survive crashes.
//!
//! This facade re-exports [`relayq_core`] (the job model, the
//! [`Pusher`]/[`Puller`]/[`Observer`]/[`Cleaner`] traits, leases, clocks,
//! errors) and the backends enabled by cargo features:
//!
//! | feature | module | backend |
//! |---|---|---|
//! | `memory` (default) | [`memory`] | in-process store, for tests and embedded use |
//! | `sqlite` | `sqlite` | SQLite, for development and single-host apps |
//! | `postgres` | `postgres` | PostgreSQL, for production |
//!
//! ```
//! use relayq::{NewJob, PullRequest, Puller, Pusher};
//! use serde_json::json;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> relayq::Result<()> {
//! let queue = relayq::memory::MemoryBackend::new();
//! queue.push(NewJob::new("send_email", &json!({"to": "ada@example.com"}))).await?;
//! for leased in queue.pull(&PullRequest::queue("default").batch(10)).await? {
//!     println!("running {} #{}", leased.job.kind, leased.job.id);
//!     queue.complete(&leased.lease, None).await?;
//! }
//! # Ok(())
//! # }
//! ```

pub use relayq_core::*;

/// The in-process backend (feature `memory`).
#[cfg(feature = "memory")]
pub mod memory {
    pub use relayq_memory::*;
}

/// The SQLite backend (feature `sqlite`).
#[cfg(feature = "sqlite")]
pub mod sqlite {
    pub use relayq_sqlite::*;
}

/// The PostgreSQL backend (feature `postgres`).
#[cfg(feature = "postgres")]
pub mod postgres {
    pub use relayq_postgres::*;
}

/// The README's example, compiled as a doctest so it cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeExample;
