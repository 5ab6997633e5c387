//! WORKLOAD.md's `process` workload on apalis 1.0's `MemoryStorage`, the
//! peer that issue #6 compares relayq-memory with. It prints one line in the
//! standard format so `bench/run` can put relayq ÷ apalis next to it:
//!
//! ```text
//! peer apalis-memory process jobs_per_s=<n> p50_ms=NA p99_ms=NA cpu_us_per_job=<x> handled=<n> duplicates=<n> n=<n>
//! ```
//!
//! Same shape as relayq's run: N jobs pushed before the clock starts (in a
//! task, not `block_on`'s future), one
//! worker with concurrency 16 on the multi-thread runtime, a handler that
//! counts completions and marks `seq` in a bitmap. Handlers run in the
//! worker's own task, apalis's default, which is faster here than
//! `.parallelize(tokio::spawn)` (about 850,000 against 400,000–750,000
//! jobs/s in one loaded run). apalis's memory storage is a channel: no
//! leases, no acknowledgements, nothing to record.

// relayq-bench's CPU clock, so both report CPU per job the same way.
#[path = "../../../src/cpu.rs"]
mod cpu;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use apalis::layers::WorkerBuilderExt;
use apalis::prelude::*;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

/// WORKLOAD.md's payload.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SendEmail {
    #[serde(rename = "type")]
    kind: String,
    seq: u64,
    enq_us: u64,
    to: String,
    pad: String,
}

/// Completions, and a bitmap of seen `seq`s to catch duplicate executions.
struct Ledger {
    handled: AtomicU64,
    duplicates: AtomicU64,
    seen: Vec<AtomicU64>,
    target: u64,
    reached: Notify,
}

async fn handle(job: SendEmail, ledger: Data<Arc<Ledger>>) {
    let bit = 1u64 << (job.seq % 64);
    if ledger.seen[(job.seq / 64) as usize].fetch_or(bit, Ordering::Relaxed) & bit != 0 {
        ledger.duplicates.fetch_add(1, Ordering::Relaxed);
    }
    if ledger.handled.fetch_add(1, Ordering::AcqRel) + 1 == ledger.target {
        ledger.reached.notify_one();
    }
}

fn jobs_arg() -> Result<u64, String> {
    let mut args = std::env::args().skip(1);
    match (args.next().as_deref(), args.next()) {
        (Some("--jobs"), Some(n)) => n.parse().map_err(|e| format!("--jobs {n}: {e}")),
        (None, _) => Ok(50_000),
        _ => Err("usage: relayq-peer-apalis-memory [--jobs N]".to_owned()),
    }
}

#[tokio::main]
async fn main() -> Result<(), String> {
    let n = jobs_arg()?;
    // In a task, like relayq-bench's workloads.
    tokio::spawn(process(n))
        .await
        .map_err(|e| format!("the workload panicked: {e}"))?
}

async fn process(n: u64) -> Result<(), String> {
    let ledger = Arc::new(Ledger {
        handled: AtomicU64::new(0),
        duplicates: AtomicU64::new(0),
        seen: (0..n.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
        target: n,
        reached: Notify::new(),
    });
    let mut storage = MemoryStorage::new();
    for seq in 0..n {
        let job = SendEmail {
            kind: "send_email".to_owned(),
            seq,
            enq_us: 0,
            to: "user@example.com".to_owned(),
            pad: "xxxxxxxxx".to_owned(),
        };
        storage.push(job).await.map_err(|e| e.to_string())?;
    }
    let worker = WorkerBuilder::new("bench")
        .backend(storage)
        .concurrency(16)
        .data(Arc::clone(&ledger))
        .build(handle);
    let cpu_before = cpu::process_cpu();
    let started = Instant::now();
    let running = tokio::spawn(worker.run());
    ledger.reached.notified().await;
    let took = started.elapsed();
    let cpu_after = cpu::process_cpu();
    running.abort();
    let handled = ledger.handled.load(Ordering::Acquire);
    let duplicates = ledger.duplicates.load(Ordering::Acquire);
    let check = if handled == n && duplicates == 0 {
        String::new()
    } else {
        format!(" CHECK_FAILED=handled_{handled}_of_{n}_duplicates_{duplicates}")
    };
    println!(
        "peer apalis-memory process jobs_per_s={:.0} p50_ms=NA p99_ms=NA cpu_us_per_job={} handled={handled} duplicates={duplicates} n={n}{check}",
        n as f64 / took.as_secs_f64(),
        cpu::per_job_us(cpu_before, cpu_after, n),
    );
    Ok(())
}
