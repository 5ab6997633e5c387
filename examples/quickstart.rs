//! Enqueue a few typed jobs, run a worker until each one is finished, print
//! every outcome, and exit.
//!
//! Run with `cargo run --example quickstart --features sqlite`. It uses
//! SQLite on a temporary file, or the store `DATABASE_URL` names (e.g.
//! `postgres://…`, with `--features sqlite,postgres`).

use std::time::Duration;

use relayq::{Event, HandlerError, JobContext, JobType, Outcome, RetryPolicy, Worker};
use serde::{Deserialize, Serialize};

/// The store used when `DATABASE_URL` is not set: SQLite on a fresh file.
fn default_url() -> (String, std::path::PathBuf) {
    let path = std::env::temp_dir().join(format!("relayq-quickstart-{}.db", std::process::id()));
    (format!("sqlite://{}", path.display()), path)
}

/// A typed job: its fields are the payload, `KIND` names its handler.
#[derive(Debug, Serialize, Deserialize)]
struct SendEmail {
    to: String,
    subject: String,
}

impl JobType for SendEmail {
    const KIND: &'static str = "send_email";
    // A queue of its own: on a store other programs use too, a worker
    // pulling theirs would make each job of a kind it has no handler for
    // `Dead` (SPEC).
    const QUEUE: &'static str = "quickstart";
    const MAX_ATTEMPTS: i32 = 3;
}

/// State every handler shares (a mail client, a pool, …).
struct Mailer {
    from: String,
}

#[tokio::main]
async fn main() -> relayq::Result<()> {
    let (url, temp_file) = match std::env::var("DATABASE_URL") {
        Ok(url) => (url, None),
        Err(_) => {
            let (url, path) = default_url();
            (url, Some(path))
        }
    };
    // The scheme and what follows any credentials, without the query
    // (which may hold a password too).
    let shown = url.split('?').next().unwrap_or_default();
    let shown = match shown.split_once("://") {
        Some((scheme, rest)) => format!("{scheme}://{}", rest.rsplit('@').next().unwrap_or(rest)),
        None => shown.to_owned(),
    };
    println!("store: {shown}");
    let backend = relayq::connect(&url).await?;

    let mut ids = Vec::new();
    for (to, subject) in [
        ("ada@example.com", "Welcome"),
        ("edsger@example.com", "Your weekly digest"),
        ("", "Nobody to send to"),
    ] {
        let email = SendEmail {
            to: to.to_owned(),
            subject: subject.to_owned(),
        };
        let id = backend.push(email.to_job()).await?.id();
        println!("enqueued job {id}: {subject:?} to {to:?}");
        ids.push(id);
    }

    let worker = Worker::builder(backend)
        .state(Mailer {
            from: "noreply@example.com".to_owned(),
        })
        .concurrency(4)
        .poll_interval(Duration::from_millis(100))
        .retry(RetryPolicy::exponential().base(Duration::from_millis(200)))
        .on_event(|event| {
            if let Event::Finished { job, outcome } = event {
                let what = match outcome {
                    Outcome::Completed { .. } => "done".to_owned(),
                    Outcome::Retrying { error, delay } => {
                        format!("failed ({error}), retrying in {delay:?}")
                    }
                    Outcome::Dead { error } => format!("dead ({error})"),
                    other => format!("{other:?}"),
                };
                println!("  job {} attempt {}: {what}", job.id, job.attempt);
            }
        })
        .handle(send_email)
        .build()?;

    let running = worker.start();
    for id in ids {
        let job = running.wait_for(id).await?;
        match job.result {
            Some(result) => println!("job {id} is {}: {result}", job.status),
            None => println!(
                "job {id} is {}: {}",
                job.status,
                job.last_error.unwrap_or_default()
            ),
        }
    }
    let report = running.shutdown().await;
    println!(
        "worker stopped ({} finished during shutdown, {} released)",
        report.finished, report.released
    );
    if let Some(path) = temp_file {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
    }
    Ok(())
}

/// The handler: a fresh future per job, with the shared state in `ctx`.
async fn send_email(email: SendEmail, ctx: JobContext<Mailer>) -> Result<String, HandlerError> {
    if email.to.is_empty() {
        // No retry can fix this one.
        return Err(HandlerError::permanent("no recipient"));
    }
    if email.to.starts_with("edsger") && ctx.attempt() == 1 {
        // A transient failure: retried after the policy's backoff.
        return Err(HandlerError::new("mailbox busy"));
    }
    Ok(format!(
        "sent {:?} from {} to {}",
        email.subject,
        ctx.state().from,
        email.to
    ))
}
