//! Enqueueing: round trips, defaults, batches, and rejected input.

use std::collections::BTreeMap;

use relayq_core::{
    Completion, DEFAULT_MAX_ATTEMPTS, DEFAULT_QUEUE, Error, JobStatus, ListFilter, MAX_DELAY,
    MAX_LEASE, MAX_LIST_LIMIT, MAX_NAME_LEN, MAX_PULL_BATCH, MAX_PULL_QUEUES, NewJob, PullRequest,
    PushOutcome, Schedule,
};
use serde::{Serialize, Serializer};
use serde_json::{Value, json};
use time::Duration;
use time::macros::datetime;

use crate::harness::{EPOCH, Harness, job};

fn assert_invalid<T: std::fmt::Debug>(result: Result<T, Error>, field: &str) {
    match result {
        Err(Error::InvalidInput { field: f, .. }) if f == field => {}
        other => panic!("expected InvalidInput naming {field:?}, got {other:?}"),
    }
}

async fn assert_store_empty(h: &Harness) {
    let page = h.backend.list(&ListFilter::new()).await.expect("list");
    assert!(
        page.jobs.is_empty(),
        "nothing should have been written: {page:?}"
    );
}

/// Every field pushed comes back from `get` exactly, with the stored
/// defaults of a new job.
pub async fn push_then_get_round_trips_every_field(h: Harness) {
    let payload =
        json!({"to": "ada@example.com", "n": 42, "tags": ["a", "β"], "nested": {"ok": true}});
    let id = h
        .push(
            NewJob::new("send_email", &payload)
                .queue("mail")
                .priority(-3)
                .max_attempts(7)
                .unique_key("welcome:ada")
                .delay(Duration::seconds(5)),
        )
        .await;
    let job = h.job(id).await;
    assert_eq!(job.id, id);
    assert_eq!(job.queue, "mail");
    assert_eq!(job.kind, "send_email");
    assert_eq!(*job.payload, payload);
    assert_eq!(job.priority, -3);
    assert_eq!(job.status, JobStatus::Pending);
    assert_eq!(job.attempts, 0);
    assert_eq!(job.max_attempts, 7);
    assert_eq!(job.lease_token, 0);
    assert_eq!(job.run_at, h.now() + Duration::seconds(5));
    assert_eq!(job.locked_until, None);
    assert_eq!(job.unique_key.as_deref(), Some("welcome:ada"));
    assert_eq!(job.last_error, None);
    assert_eq!(job.result, None);
    assert_eq!(job.created_at, h.now());
    assert_eq!(job.updated_at, h.now());

    let at = h.now() + Duration::hours(3);
    let id = h.push(job_at("later", at)).await;
    assert_eq!(h.job(id).await.run_at, at);
}

/// A large batch (backends may store one differently from a small one,
/// or a batch of alike jobs differently from a mixed one) round-trips
/// every field of every job, whatever its queue, priority, attempts and
/// schedule, with ids growing in input order.
pub async fn large_batches_round_trip_every_field(h: Harness) {
    mixed_batch_round_trips(&h).await;
    let at = h.now() + Duration::hours(3);
    // Batches whose jobs differ only in their payloads, one per schedule.
    for (n, (schedule, run_at)) in [
        (Schedule::Now, h.now()),
        (
            Schedule::After(Duration::seconds(90)),
            h.now() + Duration::seconds(90),
        ),
        (Schedule::At(at), at),
    ]
    .into_iter()
    .enumerate()
    {
        let make = |i: usize| {
            let job = NewJob::new("alike", &json!({ "i": i, "batch": n }))
                .queue("alike-q")
                .priority(-3)
                .max_attempts(4);
            match schedule {
                Schedule::Now => job,
                Schedule::After(d) => job.delay(d),
                Schedule::At(at) => job.run_at(at),
            }
        };
        let outcomes = h
            .backend
            .push_batch((0..1200).map(make).collect())
            .await
            .expect("push_batch");
        let ids: Vec<_> = outcomes.iter().map(|o| o.id()).collect();
        assert_eq!(ids.len(), 1200);
        assert!(outcomes.iter().all(|o| !o.is_duplicate()), "{outcomes:?}");
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "ids grow in input order"
        );
        for (i, id) in ids.into_iter().enumerate() {
            let job = h.job(id).await;
            assert_eq!(*job.payload, json!({ "i": i, "batch": n }));
            assert_eq!(
                (job.kind.as_str(), job.queue.as_str()),
                ("alike", "alike-q")
            );
            assert_eq!((job.priority, job.max_attempts), (-3, 4));
            assert_eq!((job.status, job.attempts), (JobStatus::Pending, 0));
            assert_eq!(job.run_at, run_at, "batch {n}, job {i}");
            assert_eq!((job.created_at, job.updated_at), (h.now(), h.now()));
        }
    }
}

/// Batches of jobs alike in everything but their payloads, except for the
/// last job, which differs in one field (a backend may store an alike
/// batch with one statement binding those fields once): every job keeps
/// its own fields.
pub async fn batches_alike_but_for_one_job_round_trip_every_field(h: Harness) {
    #[derive(Clone)]
    struct Spec {
        kind: &'static str,
        queue: &'static str,
        priority: i16,
        max_attempts: i32,
        schedule: Schedule,
    }
    let at = h.now() + Duration::hours(3);
    let alike = Spec {
        kind: "alike",
        queue: "alike-q",
        priority: 2,
        max_attempts: 3,
        schedule: Schedule::Now,
    };
    let with = |change: fn(&mut Spec)| {
        let mut spec = alike.clone();
        change(&mut spec);
        spec
    };
    let variations: Vec<(&str, Spec, Spec)> = vec![
        ("queue", alike.clone(), with(|s| s.queue = "other-q")),
        ("kind", alike.clone(), with(|s| s.kind = "other-kind")),
        ("priority", alike.clone(), with(|s| s.priority = -2)),
        ("max_attempts", alike.clone(), with(|s| s.max_attempts = 9)),
        (
            "delay",
            with(|s| s.schedule = Schedule::After(Duration::seconds(5))),
            with(|s| s.schedule = Schedule::After(Duration::seconds(7))),
        ),
        (
            "run_at",
            Spec {
                schedule: Schedule::At(at),
                ..alike.clone()
            },
            Spec {
                schedule: Schedule::At(at + Duration::minutes(1)),
                ..alike.clone()
            },
        ),
        (
            "now, then run_at",
            alike.clone(),
            Spec {
                schedule: Schedule::At(at),
                ..alike.clone()
            },
        ),
        (
            "run_at, then now",
            Spec {
                schedule: Schedule::At(at),
                ..alike.clone()
            },
            alike.clone(),
        ),
    ];
    for (name, spec, odd) in variations {
        let specs: Vec<Spec> = (0..5).map(|_| spec.clone()).chain([odd]).collect();
        let jobs = specs.iter().enumerate().map(|(i, s)| {
            let job = NewJob::new(s.kind, &json!({ "i": i, "batch": name }))
                .queue(s.queue)
                .priority(s.priority)
                .max_attempts(s.max_attempts);
            match s.schedule {
                Schedule::Now => job,
                Schedule::After(d) => job.delay(d),
                Schedule::At(t) => job.run_at(t),
            }
        });
        let outcomes = h
            .backend
            .push_batch(jobs.collect())
            .await
            .expect("push_batch");
        assert_eq!(outcomes.len(), specs.len(), "{name}");
        for (i, (outcome, s)) in outcomes.iter().zip(&specs).enumerate() {
            let job = h.job(outcome.id()).await;
            let run_at = match s.schedule {
                Schedule::Now => h.now(),
                Schedule::After(d) => h.now() + d,
                Schedule::At(t) => t,
            };
            assert_eq!(
                *job.payload,
                json!({ "i": i, "batch": name }),
                "{name}, job {i}"
            );
            assert_eq!(
                (job.kind.as_str(), job.queue.as_str()),
                (s.kind, s.queue),
                "{name}, job {i}"
            );
            assert_eq!(
                (job.priority, job.max_attempts),
                (s.priority, s.max_attempts),
                "{name}, job {i}"
            );
            assert_eq!(job.run_at, run_at, "{name}, job {i}");
        }
    }
}

/// A batch of mixed queues, kinds, priorities, attempts and schedules.
async fn mixed_batch_round_trips(h: &Harness) {
    let at = h.now() + Duration::hours(3);
    let make = |i: i64| {
        let job = NewJob::new(
            format!("kind-{}", i % 3),
            &json!({ "i": i, "text": "β\"\\" }),
        )
        .queue(format!("q{}", i % 4))
        .priority((i % 5 - 2) as i16)
        .max_attempts((i % 7 + 1) as i32);
        match i % 3 {
            0 => job,
            1 => job.delay(Duration::seconds(i)),
            _ => job.run_at(at),
        }
    };
    let outcomes = h
        .backend
        .push_batch((0..1500).map(make).collect())
        .await
        .expect("push_batch");
    assert_eq!(outcomes.len(), 1500);
    let ids: Vec<_> = outcomes.iter().map(|o| o.id()).collect();
    assert!(outcomes.iter().all(|o| !o.is_duplicate()), "{outcomes:?}");
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "ids grow in input order"
    );
    for (i, id) in (0..).zip(ids) {
        let job = h.job(id).await;
        assert_eq!(job.kind, format!("kind-{}", i % 3));
        assert_eq!(*job.payload, json!({ "i": i, "text": "β\"\\" }));
        assert_eq!(job.queue, format!("q{}", i % 4));
        assert_eq!(i64::from(job.priority), i % 5 - 2);
        assert_eq!(i64::from(job.max_attempts), i % 7 + 1);
        assert_eq!(job.status, JobStatus::Pending);
        assert_eq!((job.attempts, job.lease_token), (0, 0));
        assert_eq!(job.unique_key, None);
        assert_eq!(job.created_at, h.now());
        assert_eq!(job.updated_at, h.now());
        let run_at = match i % 3 {
            0 => h.now(),
            1 => h.now() + Duration::seconds(i),
            _ => at,
        };
        assert_eq!(job.run_at, run_at, "job {i}");
    }
}

fn job_at(kind: &str, at: time::OffsetDateTime) -> NewJob {
    job(kind, 0).run_at(at)
}

/// A job with nothing but a kind and payload gets the documented defaults.
pub async fn push_applies_defaults(h: Harness) {
    let id = h.push(job("plain", 1)).await;
    let job = h.job(id).await;
    // SPEC's values, not the constants that carry them, so a change of
    // either shows here.
    assert_eq!(job.queue, "default");
    assert_eq!(DEFAULT_QUEUE, "default");
    assert_eq!(job.priority, 0);
    assert_eq!(job.max_attempts, 25);
    assert_eq!(DEFAULT_MAX_ATTEMPTS, 25);
    assert_eq!(job.run_at, h.now());
    assert_eq!(job.unique_key, None);
}

/// One invalid job rejects the whole batch and writes nothing; a valid batch
/// is stored in order with increasing ids.
pub async fn push_batch_is_all_or_nothing(h: Harness) {
    let batch = vec![
        job("a", 1),
        job("b", 2),
        NewJob::new("", &json!({})),
        job("c", 3),
    ];
    assert_invalid(h.backend.push_batch(batch).await, "kind");
    assert_store_empty(&h).await;

    // Found by the store itself, well into a batch larger than one
    // statement: a delay that puts run_at past the year 9999.
    h.advance(datetime!(9999-12-30 00:00 UTC) - h.now());
    let batch = (0..1_500)
        .map(|n| match n {
            1_400 => job("late", n).delay(Duration::days(2)),
            _ => job("k", n).delay(Duration::hours(1)),
        })
        .collect();
    assert_invalid(h.backend.push_batch(batch).await, "delay");
    assert_store_empty(&h).await;
    h.advance(EPOCH - h.now());

    let outcomes = h
        .backend
        .push_batch(vec![job("a", 1), job("b", 2), job("c", 3)])
        .await
        .expect("push_batch");
    assert_eq!(outcomes.len(), 3);
    let ids: Vec<_> = outcomes
        .iter()
        .map(|o| match o {
            PushOutcome::Created(id) => *id,
            other => panic!("expected Created, got {other:?}"),
        })
        .collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "ids grow in input order: {ids:?}"
    );
    for (id, kind) in ids.iter().zip(["a", "b", "c"]) {
        assert_eq!(h.job(*id).await.kind, kind);
    }
    assert_eq!(
        h.backend.push_batch(Vec::new()).await.expect("empty batch"),
        vec![]
    );
}

/// A payload whose serialization fails.
struct Unserializable;

impl Serialize for Unserializable {
    fn serialize<S: Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        Err(serde::ser::Error::custom("refuses to serialize"))
    }
}

/// `text` as pre-serialized JSON, which serializes as is.
fn raw_json(text: &str) -> Box<serde_json::value::RawValue> {
    serde_json::value::RawValue::from_string(text.to_owned()).expect("valid JSON text")
}

/// Each invalid field of a job is an `InvalidInput` naming it, from `push`
/// and from `push_batch`, and nothing is written.
pub async fn invalid_job_fields_are_named_and_nothing_is_written(h: Harness) {
    let long = "q".repeat(MAX_NAME_LEN + 1);
    let non_string_keys: BTreeMap<(i32, i32), i32> = [((1, 2), 3)].into();
    let cases: Vec<(NewJob, &str)> = vec![
        (NewJob::new("", &json!({})), "kind"),
        (NewJob::new("k\0nul", &json!({})), "kind"),
        (
            NewJob::new("k".repeat(MAX_NAME_LEN + 1), &json!({})),
            "kind",
        ),
        (job("k", 1).queue(""), "queue"),
        (job("k", 1).queue(long.as_str()), "queue"),
        (job("k", 1).queue("a\0b"), "queue"),
        (NewJob::new("k", &Unserializable), "payload"),
        (NewJob::new("k", &non_string_keys), "payload"),
        // JSON has no NaN or infinity: serde_json would store null.
        (NewJob::new("k", &[1.0, f64::NAN]), "payload"),
        (NewJob::new("k", &Some(f64::INFINITY)), "payload"),
        (NewJob::new("k", &json!({"s": "nul\0inside"})), "payload"),
        (NewJob::new("k", &json!({"nul\0key": 1})), "payload"),
        // Pre-serialized JSON is checked as well: an escaped NUL, and a
        // lone UTF-16 surrogate (which serde_json cannot read back).
        (NewJob::new("k", &raw_json(r#"{"s":"\u0000"}"#)), "payload"),
        // A number serde_json would not read back (pre-serialized JSON is
        // not range-checked).
        (NewJob::new("k", &raw_json("[1e400]")), "payload"),
        // An integer past 64 bits, which serde_json reads back rounded.
        (NewJob::new("k", &[u128::MAX]), "payload"),
        (
            NewJob::new("k", &raw_json("[-9223372036854775809]")),
            "payload",
        ),
        (NewJob::new("k", &raw_json(r#"["\ud800"]"#)), "payload"),
        (
            NewJob::new("k", &raw_json(r#"{"s":"\udc00\ud800"}"#)),
            "payload",
        ),
        (job("k", 1).delay(Duration::seconds(-1)), "delay"),
        (job("k", 1).delay(MAX_DELAY + Duration::seconds(1)), "delay"),
        // Stores hold the years 1 to 9999, in UTC: 23:00 at -05:00 on the
        // last day is already the year 10000 (beyond `time`'s own range).
        (
            job("k", 1).run_at(datetime!(9999-12-31 23:00 -05:00)),
            "run_at",
        ),
        (
            job("k", 1).run_at(datetime!(0000-12-31 23:00 UTC)),
            "run_at",
        ),
        (
            job("k", 1).run_at(datetime!(0001-01-01 01:00 +02:00)),
            "run_at",
        ),
        (job("k", 1).max_attempts(0), "max_attempts"),
        (job("k", 1).max_attempts(-5), "max_attempts"),
        (job("k", 1).unique_key(""), "unique_key"),
        (job("k", 1).unique_key("u\0"), "unique_key"),
    ];
    for (bad, field) in cases {
        assert_invalid(h.backend.push(bad.clone()).await, field);
        assert_invalid(h.backend.push_batch(vec![job("ok", 1), bad]).await, field);
    }
    assert_store_empty(&h).await;
    // The maximum lengths themselves are fine.
    h.push(NewJob::new("k".repeat(MAX_NAME_LEN), &json!({})).queue("q".repeat(MAX_NAME_LEN)))
        .await;
}

/// Invalid arguments to the other operations are named too, and change nothing.
pub async fn invalid_arguments_are_named(h: Harness) {
    let id = h.push(job("k", 1)).await;
    let b = &h.backend;
    assert_invalid(
        b.pull(&PullRequest::queue("default").batch(0)).await,
        "batch",
    );
    assert_invalid(
        b.pull(&PullRequest::queue("default").lease(Duration::ZERO))
            .await,
        "lease",
    );
    assert_invalid(
        b.pull(&PullRequest::queue("default").lease(Duration::seconds(-1)))
            .await,
        "lease",
    );
    assert_invalid(
        b.pull(&PullRequest::queues(Vec::<String>::new())).await,
        "queues",
    );
    assert_invalid(b.pull(&PullRequest::queue("")).await, "queue");
    assert_invalid(b.list(&ListFilter::new().limit(0)).await, "limit");
    assert_eq!(
        h.job(id).await.status,
        JobStatus::Pending,
        "failed pulls lease nothing"
    );

    let leased = h.pull_one("default").await;
    let before = h.job(id).await;
    let lease = &leased.lease;
    assert_invalid(b.retry(lease, Duration::seconds(-1), "e").await, "delay");
    assert_invalid(b.retry(lease, Duration::ZERO, "nul\0").await, "error");
    assert_invalid(b.kill(lease, "nul\0").await, "error");
    assert_invalid(b.extend(lease, Duration::ZERO).await, "by");
    assert_invalid(b.complete(lease, Some(json!("nul\0"))).await, "result");
    assert_eq!(
        h.job(id).await,
        before,
        "rejected acknowledgements change nothing"
    );
}

/// Every upper bound on an argument holds at the bound and is refused
/// just past it, named, with nothing changed (and an unstorable result in
/// a `complete_batch`, which the other acknowledgements' case leaves out).
pub async fn arguments_are_refused_just_past_their_bounds(h: Harness) {
    let id = h.push(job("k", 1)).await;
    let b = &h.backend;
    let long = "q".repeat(MAX_NAME_LEN + 1);
    let queues =
        |n: usize| PullRequest::queues((0..n).map(|i| format!("q{i}")).collect::<Vec<_>>());
    let batch = |n: u32| PullRequest::queue("nothing-here").batch(n);
    let lease = |d: Duration| PullRequest::queue("nothing-here").lease(d);
    let step = Duration::microseconds(1);
    b.pull(&queues(MAX_PULL_QUEUES))
        .await
        .expect("the most queues");
    assert_invalid(b.pull(&queues(MAX_PULL_QUEUES + 1)).await, "queues");
    b.pull(&batch(MAX_PULL_BATCH))
        .await
        .expect("the largest batch");
    assert_invalid(b.pull(&batch(MAX_PULL_BATCH + 1)).await, "batch");
    b.pull(&lease(MAX_LEASE)).await.expect("the longest lease");
    assert_invalid(b.pull(&lease(MAX_LEASE + step)).await, "lease");
    let longest = "q".repeat(MAX_NAME_LEN);
    b.pull(&PullRequest::queue(longest.clone()))
        .await
        .expect("the longest queue name");
    assert_invalid(b.pull(&PullRequest::queue(long.clone())).await, "queue");
    b.list(&ListFilter::new().limit(MAX_LIST_LIMIT))
        .await
        .expect("the largest page");
    assert_invalid(
        b.list(&ListFilter::new().limit(MAX_LIST_LIMIT + 1)).await,
        "limit",
    );
    b.list(&ListFilter::new().queue(longest.clone()).kind(longest))
        .await
        .expect("the longest names");
    assert_invalid(
        b.list(&ListFilter::new().queue(long.clone())).await,
        "queue",
    );
    assert_invalid(b.list(&ListFilter::new().kind(long)).await, "kind");
    assert_invalid(b.list(&ListFilter::new().queue("")).await, "queue");
    assert_invalid(b.list(&ListFilter::new().kind("")).await, "kind");
    assert_invalid(b.list(&ListFilter::new().queue("a\0b")).await, "queue");
    assert_invalid(b.list(&ListFilter::new().kind("a\0b")).await, "kind");
    assert_eq!(
        h.job(id).await.status,
        JobStatus::Pending,
        "refused pulls lease nothing"
    );

    let leased = h.pull_one("default").await;
    let before = h.job(id).await;
    let lease = &leased.lease;
    assert_invalid(b.extend(lease, MAX_LEASE + step).await, "by");
    assert_invalid(
        b.extend_batch(std::slice::from_ref(lease), MAX_LEASE + step)
            .await,
        "by",
    );
    assert_invalid(b.retry(lease, MAX_DELAY + step, "e").await, "delay");
    let bad = Completion {
        lease: *lease,
        result: Some(json!("nul\0")),
    };
    assert_invalid(b.complete_batch(vec![bad]).await, "result");
    assert_eq!(
        h.job(id).await,
        before,
        "refused acknowledgements change nothing"
    );
    // At the bounds, they go through.
    b.extend(lease, MAX_LEASE)
        .await
        .expect("the longest extension");
    b.extend_batch(std::slice::from_ref(lease), MAX_LEASE)
        .await
        .expect("the longest extensions");
    assert_eq!(
        b.retry(lease, MAX_DELAY, "again in a century")
            .await
            .expect("the longest delay"),
        JobStatus::Pending
    );
}

/// Strings that look like SQL, or use any Unicode, are stored verbatim.
pub async fn hostile_strings_round_trip(h: Harness) {
    let names = [
        "'; DROP TABLE jobs; --",
        "Robert'); DELETE FROM jobs WHERE ('1'='1",
        "$1 ? :name %s",
        "日本語 ✓ émoji 🦀",
        "back\\slash \"quoted\" \n newline \t tab",
    ];
    for (i, name) in names.iter().enumerate() {
        let payload = json!({"text": name, "deep": [[[[{"k": name}]]]], "n": i});
        let id = h
            .push(NewJob::new(*name, &payload).queue(*name).unique_key(*name))
            .await;
        let job = h.job(id).await;
        assert_eq!((job.kind.as_str(), job.queue.as_str()), (*name, *name));
        assert_eq!(job.unique_key.as_deref(), Some(*name));
        assert_eq!(*job.payload, payload);
        let leased = h.pull_one(name).await;
        assert_eq!(leased.job.id, id);
        h.backend
            .kill(&leased.lease, name)
            .await
            .expect("kill with a hostile reason");
        assert_eq!(h.job(id).await.last_error.as_deref(), Some(*name));
    }
    assert_eq!(
        h.backend.stats().await.expect("stats").queues.len(),
        names.len()
    );
}

/// `run_at` is kept in UTC at whole microseconds, whatever offset and
/// precision it was given with, and orders pulls by that instant; so are
/// the store's own timestamps when its clock reads in another offset.
pub async fn run_at_is_stored_in_utc_microseconds(h: Harness) {
    let given = (h.now() - Duration::seconds(5) + Duration::nanoseconds(123_456_789))
        .to_offset(time::macros::offset!(+02:00));
    let id = h.push(job("k", 1).run_at(given)).await;
    let stored = h.job(id).await.run_at;
    assert_eq!(stored.offset(), time::UtcOffset::UTC);
    // Worked out here, not by the library's own truncation.
    assert_eq!(
        h.now().nanosecond() % 1_000,
        0,
        "the harness clock starts whole"
    );
    assert_eq!(
        stored,
        h.now() - Duration::seconds(5) + Duration::microseconds(123_456)
    );
    assert_eq!(stored.nanosecond() % 1_000, 0);
    let leased = h.pull_one("default").await;
    assert_eq!(leased.job.run_at, stored);

    h.clock
        .set(h.now().to_offset(time::macros::offset!(-07:00)));
    let id = h.push(job("k", 2)).await;
    let leased = h.pull_one("default").await;
    let locked_until = leased.job.locked_until.expect("leased");
    let job = h.job(id).await;
    for (name, at) in [
        ("run_at", job.run_at),
        ("created_at", job.created_at),
        ("updated_at", job.updated_at),
        ("locked_until", locked_until),
    ] {
        assert_eq!(at.offset(), time::UtcOffset::UTC, "{name}");
    }
}

/// JSON `levels` arrays deep around a string.
fn nested(levels: usize) -> serde_json::Value {
    (0..levels).fold(json!("core"), |inner, _| json!([inner]))
}

/// Payloads and results nested up to `MAX_JSON_DEPTH` levels round trip;
/// deeper ones are `InvalidInput` and nothing is written — so no accepted
/// job can fail to be read back.
pub async fn deep_json_round_trips_up_to_the_limit(h: Harness) {
    let deepest = nested(relayq_core::MAX_JSON_DEPTH);
    assert_invalid(
        h.backend
            .push(NewJob::new("k", &nested(relayq_core::MAX_JSON_DEPTH + 1)))
            .await,
        "payload",
    );
    assert_store_empty(&h).await;
    let id = h.push(NewJob::new("k", &deepest)).await;
    let leased = h.pull_one("default").await;
    assert_eq!(*leased.job.payload, deepest);
    assert_invalid(
        h.backend
            .complete(&leased.lease, Some(nested(relayq_core::MAX_JSON_DEPTH + 1)))
            .await,
        "result",
    );
    h.backend
        .complete(&leased.lease, Some(deepest.clone()))
        .await
        .expect("complete with the deepest result");
    let job = h.job(id).await;
    assert_eq!(
        (Value::clone(&job.payload), job.result),
        (deepest.clone(), Some(deepest))
    );
}

/// Numbers whose JSON text a store could normalize, as `serde_json`
/// writes them: `1e17` is a float (an integer once normalized), `-0.0`
/// has its sign (lost as a SQL numeric), and the rest are floats with
/// long or short texts.
fn numbers() -> Value {
    // `long` and `near_max` have 17 significant digits, which an
    // approximate parse of their shortest text reads back one or two
    // units in the last place off.
    json!({
        "float": 1e17, "neg_zero": -0.0, "tiny": 1.5e-7, "whole": 100.0, "big": u64::MAX,
        "long": 1.0_f64 / 11.0, "near_max": f64::MAX / 3.0,
    })
}

/// `numbers()` as read back: every number of the same kind and value, and
/// zero with its sign.
fn assert_numbers_as_written(read: &Value, what: &str) {
    let written = numbers();
    assert_eq!(read, &written, "{what}");
    for (key, number) in written.as_object().expect("an object") {
        let back = &read[key];
        assert_eq!(
            (back.is_f64(), back.is_u64(), back.is_i64()),
            (number.is_f64(), number.is_u64(), number.is_i64()),
            "{what}: {key} read back as {back}"
        );
    }
    let zero = read["neg_zero"].as_f64().expect("a float");
    assert!(zero.is_sign_negative(), "{what}: -0.0 read back as {zero}");
}

/// Payloads and results read back with their numbers as written, pushed
/// alone or in a batch and completed alone or in a batch: swapping one
/// store for another never changes what a handler sees.
pub async fn numbers_read_back_as_written(h: Harness) {
    let alone = h.push(NewJob::new("k", &numbers())).await;
    let batch = h
        .backend
        .push_batch(vec![
            NewJob::new("k", &numbers()),
            NewJob::new("k", &numbers()),
        ])
        .await
        .expect("push_batch");
    assert_eq!(batch.len(), 2);
    let leased = h.pull("default", 3).await;
    assert_eq!(leased.len(), 3);
    for l in &leased {
        assert_numbers_as_written(&l.job.payload, "pulled payload");
    }
    let (first, rest) = leased.split_first().expect("three leases");
    h.backend
        .complete(&first.lease, Some(numbers()))
        .await
        .expect("complete");
    let completions = rest
        .iter()
        .map(|l| Completion {
            lease: l.lease,
            result: Some(numbers()),
        })
        .collect();
    let lost = h
        .backend
        .complete_batch(completions)
        .await
        .expect("complete_batch");
    assert!(lost.is_empty(), "{lost:?}");
    let ids = std::iter::once(alone).chain(batch.iter().map(|o| o.id()));
    for id in ids {
        let job = h.job(id).await;
        assert_numbers_as_written(&job.payload, "stored payload");
        assert_numbers_as_written(job.result.as_ref().expect("a result"), "stored result");
    }
}

/// A 2.5 MB payload and result round trip exactly, and hostile or
/// invalid pushes around them leave every other job untouched.
pub async fn huge_payloads_round_trip_and_rejections_touch_no_other_row(h: Harness) {
    let bystander = h.push(job("bystander", 0).unique_key("mine")).await;
    let before = h.job(bystander).await;

    let big = json!({
        "text": "ü€𝄞x".repeat(1 << 18),
        "items": (0..50_000).collect::<Vec<u32>>(),
    });
    let id = h.push(NewJob::new("huge", &big).queue("big")).await;
    assert_eq!(*h.job(id).await.payload, big);
    let leased = h.pull_one("big").await;
    assert_eq!(*leased.job.payload, big);
    h.backend
        .complete(&leased.lease, Some(big.clone()))
        .await
        .expect("complete with a huge result");
    assert_eq!(h.job(id).await.result, Some(big));

    for bad in [
        NewJob::new("k", &json!({"s": "\0"})),
        job("k", 1).queue("q".repeat(MAX_NAME_LEN + 1)),
        job("k", 1).delay(Duration::days(365 * 10_000)),
        job("k", 1).max_attempts(0),
        job("'; DELETE FROM jobs; --", 1).unique_key(""),
    ] {
        assert!(h.backend.push(bad.clone()).await.is_err());
        assert!(h.backend.push_batch(vec![job("ok", 1), bad]).await.is_err());
    }
    assert_eq!(
        h.job(bystander).await,
        before,
        "rejected pushes change no other job"
    );
    let dup = h.backend.push(job("again", 1).unique_key("mine")).await;
    assert_eq!(dup.expect("push"), PushOutcome::Duplicate(bystander));
    assert_eq!(
        h.job(bystander).await,
        before,
        "a duplicate changes nothing"
    );
    let stats = h.backend.stats().await.expect("stats");
    assert_eq!(stats.queue("default").total(), 1);
    assert_eq!(stats.queue("big").total(), 1);
}
