//! The store's state and its transitions. Every method runs under the
//! backend's one lock, so each is atomic.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use relayq_core::{
    CompactString, Cutoff, Job, JobId, JobPage, JobStatus, LEASE_EXPIRED_ERROR, Lease, LeasedJob,
    ListFilter, PullRequest, PushOutcome, Result, Stats, ValidJob,
};
use rustc_hash::FxHashMap;
use serde_json::Value;
use time::OffsetDateTime;

use crate::table::JobTable;

/// An instant as index keys hold it: nanoseconds since the Unix epoch.
/// Ordered as the `OffsetDateTime` it comes from, but compared far more
/// cheaply (no offset to normalise), which counts in every index step.
type Ts = i128;

fn ts(at: OffsetDateTime) -> Ts {
    at.unix_timestamp_nanos()
}

/// Pull order: priority, then run_at, then id.
type ReadyKey = (i16, Ts, JobId);

/// The indexes of one queue. A job is in at most one of them: `scheduled`
/// or `ready` while `Pending`, `leased` or `reclaimable` while `Processing`.
#[derive(Debug, Default)]
struct QueueIndex {
    /// Pending jobs not yet due when last indexed, by (run_at, id).
    scheduled: BTreeSet<(Ts, JobId)>,
    /// Pending jobs found due, in pull order. A pull still checks each:
    /// on its own clock one may not be due yet (the clock was moved back,
    /// or the pull read it just before a racing push read its own).
    ready: BTreeSet<ReadyKey>,
    /// Processing jobs by locked_until.
    leased: Leases,
    /// Processing jobs whose lease a pull found ended, attempts left, in
    /// pull order: each later pull takes the first of them back, as it
    /// takes ready jobs, rather than sorting every ended lease again (a
    /// worker that died holding thousands of jobs would make each pull
    /// until they are all taken back sort them all). A pull still checks
    /// each has ended on its own clock.
    reclaimable: BTreeSet<ReadyKey>,
}

/// Processing jobs by the instant their lease ends. A pull leases its whole
/// batch until one instant, so an instant holds many ids: letting a lease
/// go finds its instant and scans that short list, where a tree of
/// (instant, id) pairs would remove a key and rebalance, once per job.
/// The list keeps pull order, in which a worker mostly finishes its jobs,
/// so the id let go is found at or near its front (a `swap_remove` would
/// move the last id there, and each of a pull's leases would be found
/// after a scan of half the pull).
#[derive(Debug, Default)]
struct Leases(BTreeMap<Ts, VecDeque<JobId>>);

impl Leases {
    fn insert(&mut self, until: Ts, id: JobId) {
        self.0.entry(until).or_default().push_back(id);
    }

    /// Adds a pull's leases, all ending at `until`, in one piece (not
    /// copied as a list grows one id at a time).
    fn insert_all(&mut self, until: Ts, mut ids: VecDeque<JobId>) {
        if ids.is_empty() {
            return;
        }
        match self.0.entry(until) {
            Entry::Vacant(vacant) => {
                vacant.insert(ids);
            }
            Entry::Occupied(mut held) => held.get_mut().append(&mut ids),
        }
    }

    /// Forgets the lease of `id` that ends at `until`; false if it was
    /// not here.
    fn remove(&mut self, until: Ts, id: JobId) -> bool {
        if let Some(ids) = self.0.get_mut(&until)
            && let Some(at) = ids.iter().position(|&held| held == id)
        {
            ids.remove(at);
            if ids.is_empty() {
                self.0.remove(&until);
            }
            return true;
        }
        false
    }

    /// Takes out a lease that ended before `now`, if there is one.
    fn pop_expired(&mut self, now: Ts) -> Option<(Ts, JobId)> {
        let mut first = self.0.first_entry()?;
        let until = *first.key();
        if until >= now {
            return None;
        }
        let id = first
            .get_mut()
            .pop_back()
            .expect("no instant is kept without ids");
        if first.get().is_empty() {
            first.remove();
        }
        Some((until, id))
    }
}

impl QueueIndex {
    /// Whether it indexes no job (every job of the queue finished, or none
    /// was ever pushed).
    fn is_empty(&self) -> bool {
        self.scheduled.is_empty()
            && self.ready.is_empty()
            && self.leased.0.is_empty()
            && self.reclaimable.is_empty()
    }

    /// Indexes pending job `id`: in `ready` at once if it is due at `now`
    /// (most jobs are pushed to run at once), else in `scheduled` until a
    /// pull finds it due.
    fn wait(&mut self, priority: i16, run_at: Ts, id: JobId, now: Ts) {
        if run_at <= now {
            self.ready.insert((priority, run_at, id));
        } else {
            self.scheduled.insert((run_at, id));
        }
    }

    /// Moves every scheduled job due at `now` into `ready`.
    fn promote(&mut self, now: Ts, jobs: &JobTable) {
        while let Some(&(run_at, id)) = self.scheduled.first() {
            if run_at > now {
                break;
            }
            self.scheduled.pop_first();
            self.ready.insert((jobs[id].priority, run_at, id));
        }
    }
}

/// Leases `job` until `until`; the caller indexes the lease.
fn grant(job: &mut Job, now: OffsetDateTime, until: OffsetDateTime) -> LeasedJob {
    job.status = JobStatus::Processing;
    job.attempts += 1;
    job.lease_token += 1;
    job.locked_until = Some(until);
    job.updated_at = now;
    LeasedJob::from(job.clone())
}

/// Takes the first `n` keys out of `set`, in order. Split off as one
/// subtree rather than popped one by one: each pop may rebalance the tree,
/// and a pull takes up to a thousand.
fn take_first(set: &mut BTreeSet<ReadyKey>, n: usize) -> BTreeSet<ReadyKey> {
    match set.iter().nth(n).copied() {
        Some(first_kept) => {
            let kept = set.split_off(&first_kept);
            std::mem::replace(set, kept)
        }
        None => std::mem::take(set),
    }
}

#[derive(Debug, Default)]
pub(crate) struct State {
    jobs: JobTable,
    /// By name, looked up on every acknowledgement. Fx hashing, not
    /// SipHash: this store serves tests and single processes, whose queue
    /// names come from their own code, not from an adversary.
    queues: FxHashMap<CompactString, QueueIndex>,
    /// (queue, unique_key) of every active job that has a key.
    unique: HashMap<(CompactString, String), JobId>,
}

impl State {
    pub(crate) fn job_count(&self) -> usize {
        self.jobs.len()
    }

    pub(crate) fn all_jobs(&self) -> Vec<Job> {
        self.jobs.values().cloned().collect()
    }

    pub(crate) fn get(&self, id: JobId) -> Option<&Job> {
        self.jobs.get(id)
    }

    pub(crate) fn insert(
        &mut self,
        job: ValidJob,
        payload: Arc<Value>,
        run_at: OffsetDateTime,
        now: OffsetDateTime,
    ) -> PushOutcome {
        if let Some(key) = &job.unique_key
            && let Some(&id) = self.unique.get(&(job.queue.as_str().into(), key.clone()))
        {
            return PushOutcome::Duplicate(id);
        }
        let id = self.jobs.next_id();
        if let Some(key) = &job.unique_key {
            self.unique
                .insert((job.queue.as_str().into(), key.clone()), id);
        }
        // Looked up before it is inserted: `entry` would copy the name on
        // every push.
        let index = match self.queues.get_mut(job.queue.as_str()) {
            Some(index) => index,
            None => self.queues.entry(job.queue.as_str().into()).or_default(),
        };
        index.wait(job.priority, ts(run_at), id, ts(now));
        self.jobs.push(Job {
            id,
            queue: job.queue.into(),
            kind: job.kind.into(),
            payload,
            priority: job.priority,
            status: JobStatus::Pending,
            attempts: 0,
            max_attempts: job.max_attempts,
            lease_token: 0,
            run_at,
            locked_until: None,
            unique_key: job.unique_key,
            last_error: None,
            result: None,
            created_at: now,
            updated_at: now,
        });
        PushOutcome::Created(id)
    }

    pub(crate) fn pull(
        &mut self,
        request: &PullRequest,
        now: OffsetDateTime,
        until: OffsetDateTime,
    ) -> Vec<LeasedJob> {
        let batch = request.batch as usize;
        let queues: BTreeSet<&str> = request.queues.iter().map(String::as_str).collect();
        let mut candidates: Vec<ReadyKey> = Vec::new();
        let (now_ts, until_ts) = (ts(now), ts(until));
        let mut died: Vec<JobId> = Vec::new();
        for queue in &queues {
            let Some(index) = self.queues.get_mut(*queue) else {
                continue;
            };
            while let Some((_, id)) = index.leased.pop_expired(now_ts) {
                let job = &self.jobs[id];
                if job.attempts >= job.max_attempts {
                    died.push(id);
                } else {
                    index.reclaimable.insert((job.priority, ts(job.run_at), id));
                }
            }
            // The first ended leases in pull order; one whose lease has
            // not ended on this pull's clock (moved back) is leased again.
            let mut taken = 0;
            let mut live = Vec::new();
            for &key @ (_, _, id) in &index.reclaimable {
                if taken == batch {
                    break;
                }
                match self.jobs[id].locked_until.map(ts) {
                    Some(until) if until >= now_ts => live.push((until, key)),
                    _ => {
                        candidates.push(key);
                        taken += 1;
                    }
                }
            }
            for (until, key @ (_, _, id)) in live {
                index.reclaimable.remove(&key);
                index.leased.insert(until, id);
            }
            index.promote(now_ts, &self.jobs);
        }
        for id in died {
            self.finish(id, JobStatus::Dead, now, |job| {
                job.last_error = Some(LEASE_EXPIRED_ERROR.to_owned());
            });
        }
        if let (1, true) = (queues.len(), candidates.is_empty())
            && let Some(index) = queues.first().and_then(|q| self.queues.get_mut(*q))
        {
            // The common case, one queue and no abandoned lease to take
            // back: its ready index is already in pull order, so its first
            // jobs are popped, without collecting, sorting and searching
            // for them again.
            let mut leased = Vec::with_capacity(batch.min(index.ready.len()));
            let mut ids = VecDeque::with_capacity(leased.capacity());
            let mut not_due = Vec::new();
            while leased.len() < batch && !index.ready.is_empty() {
                for key @ (_, run_at, id) in take_first(&mut index.ready, batch - leased.len()) {
                    if run_at > now_ts {
                        not_due.push(key);
                        continue;
                    }
                    ids.push_back(id);
                    leased.push(grant(&mut self.jobs[id], now, until));
                }
            }
            index.leased.insert_all(until_ts, ids);
            index.ready.extend(not_due);
            return leased;
        }
        for queue in &queues {
            if let Some(index) = self.queues.get(*queue) {
                let due = index
                    .ready
                    .iter()
                    .filter(|&&(_, run_at, _)| run_at <= now_ts);
                candidates.extend(due.take(batch).copied());
            }
        }
        candidates.sort_unstable();
        candidates.truncate(batch);

        let mut leased = Vec::with_capacity(candidates.len());
        for key @ (_, _, id) in candidates {
            let job = &mut self.jobs[id];
            let index = self.queues.get_mut(&job.queue).expect("queue indexed");
            if job.status == JobStatus::Pending {
                index.ready.remove(&key);
            } else {
                index.reclaimable.remove(&key);
            }
            index.leased.insert(until_ts, id);
            leased.push(grant(job, now, until));
        }
        leased
    }

    /// Checks `lease` is held and takes the job out of the lease index.
    /// The caller must then move the job to another status.
    fn take_lease(&mut self, lease: &Lease) -> Result<&mut Job> {
        let job = self
            .jobs
            .get_mut(lease.job_id)
            .filter(|job| job.status == JobStatus::Processing && job.lease_token == lease.token)
            .ok_or_else(|| lease.lost())?;
        let locked_until = job.locked_until.expect("processing job has a lease");
        let index = self.queues.get_mut(&job.queue).expect("queue indexed");
        if !index.leased.remove(ts(locked_until), job.id) {
            // A pull found its lease ended, and no pull has taken it back.
            index
                .reclaimable
                .remove(&(job.priority, ts(job.run_at), job.id));
        }
        job.locked_until = None;
        Ok(job)
    }

    /// Moves a job out of the active set into terminal `status`.
    fn finish(
        &mut self,
        id: JobId,
        status: JobStatus,
        now: OffsetDateTime,
        update: impl FnOnce(&mut Job),
    ) {
        let job = &mut self.jobs[id];
        job.status = status;
        job.locked_until = None;
        job.updated_at = now;
        update(job);
        if let Some(key) = &job.unique_key {
            self.unique.remove(&(job.queue.clone(), key.clone()));
        }
    }

    /// Puts a taken job back in its queue as `Pending`.
    fn reschedule(&mut self, id: JobId, run_at: OffsetDateTime, now: OffsetDateTime) {
        let job = &mut self.jobs[id];
        job.status = JobStatus::Pending;
        job.run_at = run_at;
        job.updated_at = now;
        self.queues
            .get_mut(&job.queue)
            .expect("queue indexed")
            .wait(job.priority, ts(run_at), id, ts(now));
    }

    pub(crate) fn complete(
        &mut self,
        lease: &Lease,
        result: Option<Value>,
        now: OffsetDateTime,
    ) -> Result<()> {
        let id = self.take_lease(lease)?.id;
        self.finish(id, JobStatus::Done, now, |job| job.result = result);
        Ok(())
    }

    pub(crate) fn retry(
        &mut self,
        lease: &Lease,
        run_at: OffsetDateTime,
        error: &str,
        now: OffsetDateTime,
    ) -> Result<JobStatus> {
        let job = self.take_lease(lease)?;
        job.last_error = Some(error.to_owned());
        let (id, exhausted) = (job.id, job.attempts >= job.max_attempts);
        if exhausted {
            self.finish(id, JobStatus::Dead, now, |_| {});
            Ok(JobStatus::Dead)
        } else {
            self.reschedule(id, run_at, now);
            Ok(JobStatus::Pending)
        }
    }

    pub(crate) fn kill(&mut self, lease: &Lease, error: &str, now: OffsetDateTime) -> Result<()> {
        let id = self.take_lease(lease)?.id;
        self.finish(id, JobStatus::Dead, now, |job| {
            job.last_error = Some(error.to_owned());
        });
        Ok(())
    }

    pub(crate) fn extend(
        &mut self,
        lease: &Lease,
        until: OffsetDateTime,
        now: OffsetDateTime,
    ) -> Result<()> {
        let job = self.take_lease(lease)?;
        job.locked_until = Some(until);
        job.updated_at = now;
        let id = job.id;
        let index = self.queues.get_mut(&self.jobs[id].queue);
        index.expect("queue indexed").leased.insert(ts(until), id);
        Ok(())
    }

    pub(crate) fn release(&mut self, lease: &Lease, now: OffsetDateTime) -> Result<()> {
        let job = self.take_lease(lease)?;
        job.attempts -= 1;
        let (id, run_at) = (job.id, job.run_at);
        self.reschedule(id, run_at, now);
        Ok(())
    }

    pub(crate) fn list(&self, filter: &ListFilter) -> JobPage {
        let start = filter
            .after
            .map_or(JobId::MIN, |after| after.saturating_add(1));
        let limit = filter.limit as usize;
        let mut jobs: Vec<Job> = self
            .jobs
            .since(start)
            .filter(|job| filter.status.is_none_or(|s| job.status == s))
            .filter(|job| filter.queue.as_ref().is_none_or(|q| job.queue == q))
            .filter(|job| filter.kind.as_ref().is_none_or(|k| job.kind == k))
            .take(limit + 1)
            .cloned()
            .collect();
        let next = if jobs.len() > limit {
            jobs.truncate(limit);
            jobs.last().map(|job| job.id)
        } else {
            None
        };
        JobPage { jobs, next }
    }

    pub(crate) fn stats(&self) -> Stats {
        let mut stats = Stats::default();
        for job in self.jobs.values() {
            stats
                .queues
                .entry(job.queue.to_string())
                .or_default()
                .add(job.status, 1);
        }
        stats
    }

    pub(crate) fn clean(&mut self, status: JobStatus, cutoff: Cutoff) -> u64 {
        let before_len = self.jobs.len();
        self.jobs
            .retain(|job| !(job.status == status && cutoff.takes(job.updated_at)));
        // The indexes of queues with no job pending or running go too: a
        // long-lived store whose queue names come and go (one per tenant,
        // say) would otherwise keep one for every name it ever saw. Here,
        // not as a queue empties: a queue emptied and filled again on every
        // job would make and drop its index each time.
        self.queues.retain(|_, index| !index.is_empty());
        // The maps keep their peak capacity unless asked (the unique keys'
        // too, released as their jobs finished).
        if self.queues.len() < self.queues.capacity() / 4 {
            self.queues.shrink_to_fit();
        }
        if self.unique.len() < self.unique.capacity() / 4 {
            self.unique.shrink_to_fit();
        }
        (before_len - self.jobs.len()) as u64
    }

    /// How many queues are indexed.
    #[cfg(test)]
    pub(crate) fn queue_count(&self) -> usize {
        self.queues.len()
    }

    /// How many of `queue`'s jobs a pull found with an ended lease and no
    /// pull has taken back yet.
    #[cfg(test)]
    pub(crate) fn reclaimable_count(&self, queue: &str) -> usize {
        self.queues.get(queue).map_or(0, |q| q.reclaimable.len())
    }
}
