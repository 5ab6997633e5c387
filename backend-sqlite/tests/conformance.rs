//! The whole conformance suite against the SQLite backend, used only
//! through `Arc<dyn Backend>`: once on a fresh temporary file per case, and
//! once on a fresh in-memory database per case.

use std::sync::Arc;

use async_trait::async_trait;
use relayq_conformance::{EPOCH, Harness};
use relayq_core::{
    Backend, Capabilities, Cleaner, Completion, Job, JobId, JobPage, JobStatus, Lease, LeasedJob,
    ListFilter, ManualClock, NewJob, Observer, PullRequest, Puller, PushOutcome, Pusher, Result,
    Stats, Wakeups,
};
use relayq_sqlite::{SqliteBackend, SqliteOptions};
use serde_json::Value;
use tempfile::TempDir;
use time::{Duration, OffsetDateTime};

async fn open(url: &str, clock: &ManualClock) -> SqliteBackend {
    SqliteBackend::connect_with(SqliteOptions::new(url).clock(Arc::new(clock.clone())))
        .await
        .expect("connect")
}

/// Each case on its own file in its own temporary directory, removed when
/// the case drops its harness.
mod file {
    use super::*;

    async fn fresh() -> Harness {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}", dir.path().join("jobs.db").display());
        let clock = ManualClock::new(EPOCH);
        let inner = open(&url, &clock).await;
        assert!(inner.capabilities().durable, "a file database is durable");
        Harness::new(Arc::new(OnTempFile { inner, _dir: dir }), clock)
    }

    relayq_conformance::conformance_tests!(fresh);
}

/// Each case on its own in-memory database.
mod memory {
    use super::*;

    async fn fresh() -> Harness {
        let clock = ManualClock::new(EPOCH);
        let backend = open("sqlite::memory:", &clock).await;
        assert!(!backend.capabilities().durable);
        Harness::new(Arc::new(backend), clock)
    }

    relayq_conformance::conformance_tests!(fresh);
}

/// A backend that owns the temporary directory its database lives in.
#[derive(Debug)]
struct OnTempFile {
    inner: SqliteBackend,
    _dir: TempDir,
}

#[async_trait]
impl Pusher for OnTempFile {
    async fn push(&self, job: NewJob) -> Result<PushOutcome> {
        self.inner.push(job).await
    }
    async fn push_batch(&self, jobs: Vec<NewJob>) -> Result<Vec<PushOutcome>> {
        self.inner.push_batch(jobs).await
    }
}

#[async_trait]
impl Puller for OnTempFile {
    async fn pull(&self, request: &PullRequest) -> Result<Vec<LeasedJob>> {
        self.inner.pull(request).await
    }
    async fn complete(&self, lease: &Lease, result: Option<Value>) -> Result<()> {
        self.inner.complete(lease, result).await
    }
    async fn complete_batch(&self, completions: Vec<Completion>) -> Result<Vec<Lease>> {
        self.inner.complete_batch(completions).await
    }
    async fn retry(&self, lease: &Lease, delay: Duration, error: &str) -> Result<JobStatus> {
        self.inner.retry(lease, delay, error).await
    }
    async fn kill(&self, lease: &Lease, error: &str) -> Result<()> {
        self.inner.kill(lease, error).await
    }
    async fn extend(&self, lease: &Lease, by: Duration) -> Result<OffsetDateTime> {
        self.inner.extend(lease, by).await
    }
    async fn release(&self, lease: &Lease) -> Result<()> {
        self.inner.release(lease).await
    }
}

#[async_trait]
impl Observer for OnTempFile {
    async fn get(&self, id: JobId) -> Result<Option<Job>> {
        self.inner.get(id).await
    }
    async fn list(&self, filter: &ListFilter) -> Result<JobPage> {
        self.inner.list(filter).await
    }
    async fn stats(&self) -> Result<Stats> {
        self.inner.stats().await
    }
}

#[async_trait]
impl Cleaner for OnTempFile {
    async fn clean(&self, status: JobStatus, before: OffsetDateTime) -> Result<u64> {
        self.inner.clean(status, before).await
    }
}

#[async_trait]
impl Backend for OnTempFile {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn subscribe(&self, queues: &[String]) -> Result<Option<Wakeups>> {
        self.inner.subscribe(queues).await
    }
}
