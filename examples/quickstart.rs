//! Enqueue a few jobs, lease them, acknowledge each, and print the outcome.
//!
//! Run with `cargo run --example quickstart`.

use relayq::memory::MemoryBackend;
use relayq::{Backend, JobStatus, NewJob, PullRequest};
use serde_json::json;
use time::Duration;

#[tokio::main]
async fn main() -> relayq::Result<()> {
    let queue = MemoryBackend::new();
    let backend: &dyn Backend = &queue;

    for (n, to) in ["ada@example.com", "grace@example.com", "edsger@example.com"]
        .into_iter()
        .enumerate()
    {
        let outcome = backend
            .push(NewJob::new("send_email", &json!({ "to": to, "n": n })).max_attempts(2))
            .await?;
        println!("enqueued job {}", outcome.id());
    }

    let request = PullRequest::queue("default")
        .batch(10)
        .lease(Duration::seconds(30));
    loop {
        let leased = backend.pull(&request).await?;
        if leased.is_empty() {
            break;
        }
        for item in leased {
            let to = item.job.payload["to"].as_str().unwrap_or_default();
            if to.starts_with("edsger") && item.job.attempts == 1 {
                let status = backend
                    .retry(&item.lease, Duration::ZERO, "mailbox busy")
                    .await?;
                println!("job {} failed once, now {status}", item.job.id);
            } else {
                backend
                    .complete(&item.lease, Some(json!({ "sent_to": to })))
                    .await?;
                println!("job {} sent to {to}", item.job.id);
            }
        }
    }

    let stats = backend.stats().await?.queue("default");
    println!(
        "done: {}, dead: {}, pending: {}",
        stats.done, stats.dead, stats.pending
    );
    assert_eq!(stats.get(JobStatus::Done), 3);
    Ok(())
}
