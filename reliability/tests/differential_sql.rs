//! Model-based differential tests: random operation sequences run against
//! the memory backend (the model) and against SQLite and PostgreSQL; every
//! result and the final state must agree.
//!
//! `RELAYQ_DIFFERENTIAL_CASES` sets how many sequences each test tries
//! (default 24). Proptest shrinks a failure to a minimal sequence, which
//! then belongs in the conformance suite as a regular case.

use std::sync::Arc;

use proptest::test_runner::{Config, TestRunner};
use relayq_conformance::{EPOCH, Harness};
use relayq_core::ManualClock;
use relayq_memory::MemoryBackend;
use relayq_postgres::{PgBackend, testing};
use relayq_reliability::differential::{check, operations};
use relayq_sqlite::{SqliteBackend, SqliteOptions};

fn model() -> Harness {
    let clock = ManualClock::new(EPOCH);
    Harness::new(
        Arc::new(MemoryBackend::with_clock(Arc::new(clock.clone()))),
        clock,
    )
}

/// A subject store and what must be removed after its sequence ran.
enum Subject {
    Sqlite(SqliteBackend, tempfile::TempDir),
    Postgres(PgBackend),
}

impl Subject {
    async fn sqlite(clock: &ManualClock) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}", dir.path().join("jobs.db").display());
        let options = SqliteOptions::new(url).clock(Arc::new(clock.clone()));
        let backend = SqliteBackend::connect_with(options)
            .await
            .expect("connect sqlite");
        Self::Sqlite(backend, dir)
    }

    async fn postgres(clock: &ManualClock) -> Self {
        let options = testing::options().clock(Arc::new(clock.clone()));
        Self::Postgres(testing::connect(options).await)
    }

    fn backend(&self) -> Arc<dyn relayq_core::Backend> {
        match self {
            Self::Sqlite(backend, _) => Arc::new(backend.clone()),
            Self::Postgres(backend) => Arc::new(backend.clone()),
        }
    }

    async fn remove(self) {
        match self {
            Self::Sqlite(backend, dir) => {
                backend.close().await;
                drop(dir);
            }
            Self::Postgres(backend) => {
                let schema = backend.schema().to_owned();
                backend.close().await;
                testing::drop_schema(&schema).await;
            }
        }
    }
}

fn cases() -> u32 {
    std::env::var("RELAYQ_DIFFERENTIAL_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(24)
}

/// Runs generated sequences, each against a fresh model and a fresh subject.
fn agree_with_the_model<F, Fut>(open: F)
where
    F: Fn(ManualClock) -> Fut,
    Fut: std::future::Future<Output = Subject>,
{
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut runner = TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&operations(60), |ops| {
        rt.block_on(async {
            let clock = ManualClock::new(EPOCH);
            let subject = open(clock.clone()).await;
            let outcome = check(model(), Harness::new(subject.backend(), clock), &ops).await;
            subject.remove().await;
            outcome
        })
    });
    if let Err(failure) = result {
        panic!("the backend diverged from the memory model: {failure}");
    }
}

#[test]
fn sqlite_agrees_with_the_memory_model() {
    agree_with_the_model(|clock| async move { Subject::sqlite(&clock).await });
}

#[test]
fn postgres_agrees_with_the_memory_model() {
    agree_with_the_model(|clock| async move { Subject::postgres(&clock).await });
}
