//! Model-based differential testing.
//!
//! [`operations`] generates random sequences of every operation a store
//! offers — push, push_batch, pull, complete, complete_batch, retry, kill,
//! extend, extend_batch, release, clock moves, clean, get, list, stats — including stale
//! leases and invalid input. [`check`] runs one sequence against the memory
//! backend (the model) and against the backend under test, each with its own
//! manual clock moved in step, and demands that every result and the final
//! state agree.
//!
//! Ids are backend-assigned and need not match (a PostgreSQL sequence skips
//! values on conflicts), so results are compared with every job id replaced
//! by the job's creation ordinal.

use std::fmt::Debug;

use proptest::prelude::*;
use relayq_conformance::Harness;
use relayq_core::{
    Completion, Error, Job, JobId, JobStatus, Lease, ListFilter, NewJob, PullRequest, PushOutcome,
};
use serde_json::json;
use time::Duration;

/// Queue names the generator draws from.
const QUEUES: [&str; 2] = ["alpha", "beta"];

/// A job to push, in terms the generator can shrink.
#[derive(Debug, Clone)]
pub struct JobSpec {
    queue: usize,
    kind: u8,
    priority: i16,
    delay_s: i64,
    max_attempts: i32,
    unique: Option<u8>,
}

impl JobSpec {
    fn to_job(&self, seq: usize) -> NewJob {
        let mut job = NewJob::new(format!("kind{}", self.kind), &json!({ "seq": seq }))
            .queue(QUEUES[self.queue])
            .priority(self.priority)
            .max_attempts(self.max_attempts);
        if self.delay_s != 0 {
            job = job.delay(Duration::seconds(self.delay_s));
        }
        if let Some(key) = self.unique {
            job = job.unique_key(format!("key{key}"));
        }
        job
    }
}

/// One step of a generated sequence. Lease and job references are indexes
/// into the leases and jobs seen so far (modulo their count), so a
/// reference may well point at a stale lease: that is the point.
#[derive(Debug, Clone)]
#[allow(missing_docs)]
pub enum Op {
    Push(JobSpec),
    PushBatch(Vec<JobSpec>),
    Pull {
        queues: Vec<usize>,
        batch: u32,
        lease_s: i64,
    },
    Complete {
        lease: usize,
        with_result: bool,
    },
    CompleteBatch {
        leases: Vec<usize>,
    },
    Retry {
        lease: usize,
        delay_s: i64,
    },
    Kill {
        lease: usize,
    },
    Extend {
        lease: usize,
        by_s: i64,
    },
    ExtendBatch {
        leases: Vec<usize>,
        by_s: i64,
    },
    Release {
        lease: usize,
    },
    Advance {
        secs: i64,
    },
    Clean {
        status: JobStatus,
        ago_s: i64,
    },
    Get {
        job: usize,
    },
    List {
        status: Option<JobStatus>,
        queue: Option<usize>,
        after: Option<usize>,
        limit: u32,
    },
    Stats,
}

fn job_spec() -> impl Strategy<Value = JobSpec> {
    (
        0..QUEUES.len(),
        0u8..3,
        -2i16..3,
        prop_oneof![3 => Just(0i64), 2 => 1i64..20, 1 => Just(-1i64)],
        prop_oneof![1 => Just(0), 3 => 1i32..4],
        proptest::option::weighted(0.4, 0u8..3),
    )
        .prop_map(
            |(queue, kind, priority, delay_s, max_attempts, unique)| JobSpec {
                queue,
                kind,
                priority,
                delay_s,
                max_attempts,
                unique,
            },
        )
}

fn status() -> impl Strategy<Value = JobStatus> {
    proptest::sample::select(JobStatus::ALL.to_vec())
}

fn op() -> impl Strategy<Value = Op> {
    let lease = 0usize..64;
    prop_oneof![
        6 => job_spec().prop_map(Op::Push),
        2 => proptest::collection::vec(job_spec(), 0..5).prop_map(Op::PushBatch),
        6 => (proptest::collection::vec(0..QUEUES.len(), 1..3), 1u32..4, prop_oneof![4 => 1i64..40, 1 => Just(0i64)])
            .prop_map(|(queues, batch, lease_s)| Op::Pull { queues, batch, lease_s }),
        3 => (lease.clone(), any::<bool>()).prop_map(|(lease, with_result)| Op::Complete { lease, with_result }),
        1 => proptest::collection::vec(lease.clone(), 0..4).prop_map(|leases| Op::CompleteBatch { leases }),
        2 => (lease.clone(), prop_oneof![4 => 0i64..30, 1 => Just(-5i64)]).prop_map(|(lease, delay_s)| Op::Retry { lease, delay_s }),
        1 => lease.clone().prop_map(|lease| Op::Kill { lease }),
        2 => (lease.clone(), prop_oneof![4 => 1i64..60, 1 => Just(0i64)]).prop_map(|(lease, by_s)| Op::Extend { lease, by_s }),
        1 => (proptest::collection::vec(lease.clone(), 0..4), prop_oneof![4 => 1i64..60, 1 => Just(0i64)])
            .prop_map(|(leases, by_s)| Op::ExtendBatch { leases, by_s }),
        1 => lease.prop_map(|lease| Op::Release { lease }),
        // Now and then back: a clock stepped back (NTP, a VM restored)
        // must leave leases that have not ended on it alone everywhere.
        4 => prop_oneof![4 => 0i64..5, 4 => 5i64..90, 1 => -40i64..0].prop_map(|secs| Op::Advance { secs }),
        1 => (status(), 0i64..100).prop_map(|(status, ago_s)| Op::Clean { status, ago_s }),
        2 => (0usize..64).prop_map(|job| Op::Get { job }),
        1 => (proptest::option::of(status()), proptest::option::of(0..QUEUES.len()), proptest::option::of(0usize..64), 1u32..6)
            .prop_map(|(status, queue, after, limit)| Op::List { status, queue, after, limit }),
        1 => Just(Op::Stats),
    ]
}

/// Random operation sequences of up to `max_len` steps.
pub fn operations(max_len: usize) -> impl Strategy<Value = Vec<Op>> {
    proptest::collection::vec(op(), 1..max_len)
}

/// One store being driven, with what it has handed out so far.
struct Driven {
    harness: Harness,
    /// Job ids in creation order: the ordinal is the comparable identity.
    ids: Vec<JobId>,
    leases: Vec<Lease>,
}

/// A result with ids replaced by ordinals and errors by their kind.
type Observed = Result<serde_json::Value, String>;

impl Driven {
    fn ordinal(&self, id: JobId) -> i64 {
        self.ids
            .iter()
            .position(|known| *known == id)
            .map_or(-1, |p| p as i64)
    }

    fn normal_job(&self, mut job: Job) -> serde_json::Value {
        job.id = self.ordinal(job.id);
        serde_json::to_value(job).expect("jobs serialize")
    }

    fn normal_lease(&self, lease: Lease) -> serde_json::Value {
        json!([self.ordinal(lease.job_id), lease.token])
    }

    fn lease(&self, index: usize) -> Option<Lease> {
        (!self.leases.is_empty()).then(|| self.leases[index % self.leases.len()])
    }

    fn job_id(&self, index: usize) -> Option<JobId> {
        (!self.ids.is_empty()).then(|| self.ids[index % self.ids.len()])
    }

    fn record_push(&mut self, outcome: PushOutcome) -> serde_json::Value {
        match outcome {
            PushOutcome::Created(id) => {
                self.ids.push(id);
                json!({ "created": self.ids.len() - 1 })
            }
            PushOutcome::Duplicate(id) => json!({ "duplicate": self.ordinal(id) }),
        }
    }

    async fn apply(&mut self, step: usize, op: &Op) -> Observed {
        let b = self.harness.backend.clone();
        let now = self.harness.now();
        match op {
            Op::Push(spec) => {
                let outcome = b.push(spec.to_job(step)).await.map_err(kind)?;
                Ok(self.record_push(outcome))
            }
            Op::PushBatch(specs) => {
                let jobs = specs.iter().map(|s| s.to_job(step)).collect();
                let outcomes = b.push_batch(jobs).await.map_err(kind)?;
                Ok(json!(
                    outcomes
                        .into_iter()
                        .map(|o| self.record_push(o))
                        .collect::<Vec<_>>()
                ))
            }
            Op::Pull {
                queues,
                batch,
                lease_s,
            } => {
                let request = PullRequest::queues(queues.iter().map(|q| QUEUES[*q]))
                    .batch(*batch)
                    .lease(Duration::seconds(*lease_s));
                let leased = b.pull(&request).await.map_err(kind)?;
                let mut out = Vec::new();
                for l in leased {
                    self.leases.push(l.lease);
                    out.push(json!([self.normal_lease(l.lease), self.normal_job(l.job)]));
                }
                Ok(json!(out))
            }
            Op::Complete { lease, with_result } => {
                let Some(lease) = self.lease(*lease) else {
                    return Ok(json!(null));
                };
                let result = with_result.then(|| json!({ "ok": step }));
                b.complete(&lease, result).await.map_err(kind)?;
                Ok(json!("completed"))
            }
            Op::CompleteBatch { leases } => {
                let completions: Vec<Completion> = leases
                    .iter()
                    .filter_map(|l| self.lease(*l))
                    .map(Completion::from)
                    .collect();
                // A batch naming one lease twice is legal; the second is lost.
                let lost = b.complete_batch(completions).await.map_err(kind)?;
                Ok(json!(
                    lost.into_iter()
                        .map(|l| self.normal_lease(l))
                        .collect::<Vec<_>>()
                ))
            }
            Op::Retry { lease, delay_s } => {
                let Some(lease) = self.lease(*lease) else {
                    return Ok(json!(null));
                };
                let status = b
                    .retry(
                        &lease,
                        Duration::seconds(*delay_s),
                        &format!("failed at {step}"),
                    )
                    .await
                    .map_err(kind)?;
                Ok(json!(status))
            }
            Op::Kill { lease } => {
                let Some(lease) = self.lease(*lease) else {
                    return Ok(json!(null));
                };
                b.kill(&lease, "killed").await.map_err(kind)?;
                Ok(json!("killed"))
            }
            Op::Extend { lease, by_s } => {
                let Some(lease) = self.lease(*lease) else {
                    return Ok(json!(null));
                };
                let until = b
                    .extend(&lease, Duration::seconds(*by_s))
                    .await
                    .map_err(kind)?;
                Ok(json!(until.unix_timestamp_nanos().to_string()))
            }
            Op::ExtendBatch { leases, by_s } => {
                // A batch may name one lease twice, or stale ones.
                let leases: Vec<Lease> = leases.iter().filter_map(|l| self.lease(*l)).collect();
                let ends = b
                    .extend_batch(&leases, Duration::seconds(*by_s))
                    .await
                    .map_err(kind)?;
                Ok(json!(
                    ends.into_iter()
                        .map(|end| end.map(|until| until.unix_timestamp_nanos().to_string()))
                        .collect::<Vec<_>>()
                ))
            }
            Op::Release { lease } => {
                let Some(lease) = self.lease(*lease) else {
                    return Ok(json!(null));
                };
                b.release(&lease).await.map_err(kind)?;
                Ok(json!("released"))
            }
            Op::Advance { secs } => {
                self.harness.advance(Duration::seconds(*secs));
                Ok(json!(null))
            }
            Op::Clean { status, ago_s } => {
                let n = b
                    .clean(*status, now - Duration::seconds(*ago_s))
                    .await
                    .map_err(kind)?;
                Ok(json!(n))
            }
            Op::Get { job } => {
                let Some(id) = self.job_id(*job) else {
                    return Ok(json!(null));
                };
                let job = b.get(id).await.map_err(kind)?;
                Ok(json!(job.map(|j| self.normal_job(j))))
            }
            Op::List {
                status,
                queue,
                after,
                limit,
            } => {
                let mut filter = ListFilter::new().limit(*limit);
                filter.status = *status;
                filter.queue = queue.map(|q| QUEUES[q].to_owned());
                filter.after = after.and_then(|a| self.job_id(a));
                let page = b.list(&filter).await.map_err(kind)?;
                let jobs: Vec<_> = page.jobs.into_iter().map(|j| self.normal_job(j)).collect();
                Ok(json!({ "jobs": jobs, "next": page.next.map(|n| self.ordinal(n)) }))
            }
            Op::Stats => {
                let stats = b.stats().await.map_err(kind)?;
                Ok(serde_json::to_value(stats).expect("stats serialize"))
            }
        }
    }

    /// Every job, in creation order, normalised.
    async fn final_state(&self) -> Vec<serde_json::Value> {
        let mut jobs = Vec::new();
        let mut after = None;
        loop {
            let page = self
                .harness
                .backend
                .list(&ListFilter::new().after(after).limit(1_000))
                .await
                .expect("list");
            jobs.extend(page.jobs.into_iter().map(|j| self.normal_job(j)));
            match page.next {
                Some(next) => after = Some(next),
                None => return jobs,
            }
        }
    }
}

/// Errors compare by kind (and field): their wording may differ.
fn kind(error: Error) -> String {
    match error {
        Error::InvalidInput { field, .. } => format!("InvalidInput({field})"),
        Error::LeaseLost { .. } => "LeaseLost".to_owned(),
        Error::NotFound { .. } => "NotFound".to_owned(),
        other => panic!("the store failed instead of answering: {other}"),
    }
}

/// Runs `ops` against `model` and `subject` in step; the first divergence
/// fails with the step, the operation and both results.
pub async fn check(model: Harness, subject: Harness, ops: &[Op]) -> Result<(), TestCaseError> {
    let mut model = Driven {
        harness: model,
        ids: Vec::new(),
        leases: Vec::new(),
    };
    let mut subject = Driven {
        harness: subject,
        ids: Vec::new(),
        leases: Vec::new(),
    };
    for (step, op) in ops.iter().enumerate() {
        let expected = model.apply(step, op).await;
        let got = subject.apply(step, op).await;
        prop_assert_eq!(&got, &expected, "step {} diverged: {:?}", step, op);
    }
    let expected = model.final_state().await;
    let got = subject.final_state().await;
    prop_assert_eq!(got, expected, "final states diverged");
    Ok(())
}
