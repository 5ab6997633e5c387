//! The store's jobs by id.
//!
//! Ids are handed out in sequence and never reused, so the jobs sit in one
//! deque, a job at its id's offset from the oldest slot kept: a lookup is
//! an index, not a tree search through nodes of large values, which every
//! pull, acknowledgement and renewal does per job. A cleaned job leaves an
//! empty slot; slots at the front are dropped as they empty.
//!
//! One long-lived job (scheduled for next year, say) would otherwise hold
//! an empty slot for every job pushed and cleaned after it. So when empty
//! slots come to outnumber the jobs in the deque, the jobs at its front
//! move to a map of stragglers until they no longer do: memory and walks
//! stay proportional to the jobs held.

use std::collections::{BTreeMap, VecDeque};
use std::ops::{Index, IndexMut};

use relayq_core::{Job, JobId};

#[derive(Debug)]
pub(crate) struct JobTable {
    /// The id of `slots[0]`.
    first: JobId,
    /// The job of each id from `first` on, `None` once cleaned.
    slots: VecDeque<Option<Job>>,
    /// Jobs held in `slots` (its `Some` slots).
    in_slots: usize,
    /// Jobs older than `first`, moved out of the deque's front when empty
    /// slots outnumbered the jobs in it.
    stragglers: BTreeMap<JobId, Job>,
}

/// Below this many slots the deque is left as it is, holes and all.
const COMPACT_ABOVE: usize = 1_024;

impl Default for JobTable {
    fn default() -> Self {
        Self {
            first: 1,
            slots: VecDeque::new(),
            in_slots: 0,
            stragglers: BTreeMap::new(),
        }
    }
}

impl JobTable {
    /// The id the next job gets.
    pub(crate) fn next_id(&self) -> JobId {
        self.first + self.slots.len() as JobId
    }

    /// Stores `job`, whose id must be [`Self::next_id`].
    pub(crate) fn push(&mut self, job: Job) {
        debug_assert_eq!(job.id, self.next_id(), "ids are handed out in sequence");
        self.slots.push_back(Some(job));
        self.in_slots += 1;
    }

    pub(crate) fn len(&self) -> usize {
        self.in_slots + self.stragglers.len()
    }

    fn slot(&self, id: JobId) -> Option<usize> {
        usize::try_from(id.checked_sub(self.first)?).ok()
    }

    pub(crate) fn get(&self, id: JobId) -> Option<&Job> {
        match self.slot(id) {
            Some(slot) => self.slots.get(slot)?.as_ref(),
            None => self.stragglers.get(&id),
        }
    }

    pub(crate) fn get_mut(&mut self, id: JobId) -> Option<&mut Job> {
        match self.slot(id) {
            Some(slot) => self.slots.get_mut(slot)?.as_mut(),
            None => self.stragglers.get_mut(&id),
        }
    }

    /// Every job, by id.
    pub(crate) fn values(&self) -> impl Iterator<Item = &Job> {
        self.since(JobId::MIN)
    }

    /// The jobs from id `start` on, by id.
    pub(crate) fn since(&self, start: JobId) -> impl Iterator<Item = &Job> {
        let skip = usize::try_from(start.saturating_sub(self.first).max(0)).unwrap_or(usize::MAX);
        self.stragglers
            .range(start..)
            .map(|(_, job)| job)
            .chain(self.slots.iter().skip(skip).flatten())
    }

    /// Drops the jobs `keep` says no to, and gives back the memory of
    /// slots no longer needed: a deque never shrinks by itself, so a burst
    /// of jobs, once cleaned, would hold its peak for the store's life.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&Job) -> bool) {
        self.stragglers.retain(|_, job| keep(job));
        for slot in &mut self.slots {
            if slot.as_ref().is_some_and(|job| !keep(job)) {
                *slot = None;
                self.in_slots -= 1;
            }
        }
        self.compact();
        if self.slots.capacity() > COMPACT_ABOVE && self.slots.capacity() / 4 > self.slots.len() {
            self.slots.shrink_to(self.slots.len() * 2);
        }
    }

    /// Drops the empty slots at the deque's front and, while empty slots
    /// outnumber its jobs, moves its front job to the stragglers.
    fn compact(&mut self) {
        loop {
            let holes = self.slots.len() - self.in_slots;
            let sparse = self.slots.len() > COMPACT_ABOVE && holes > self.in_slots;
            match self.slots.front() {
                Some(None) => {}
                Some(Some(_)) if sparse => {}
                _ => return,
            }
            if let Some(job) = self.slots.pop_front().flatten() {
                self.in_slots -= 1;
                self.stragglers.insert(job.id, job);
            }
            self.first += 1;
        }
    }
}

impl Index<JobId> for JobTable {
    type Output = Job;

    fn index(&self, id: JobId) -> &Job {
        self.get(id).expect("indexed job exists")
    }
}

impl IndexMut<JobId> for JobTable {
    fn index_mut(&mut self, id: JobId) -> &mut Job {
        self.get_mut(id).expect("indexed job exists")
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use relayq_core::JobStatus;
    use time::OffsetDateTime;

    use super::*;

    fn job(id: JobId) -> Job {
        let t = OffsetDateTime::UNIX_EPOCH;
        Job {
            id,
            queue: "q".into(),
            kind: "k".into(),
            payload: Arc::new(serde_json::Value::Null),
            priority: 0,
            status: JobStatus::Done,
            attempts: 0,
            max_attempts: 1,
            lease_token: 0,
            run_at: t,
            locked_until: None,
            unique_key: None,
            last_error: None,
            result: None,
            created_at: t,
            updated_at: t,
        }
    }

    fn ids<'a>(jobs: impl Iterator<Item = &'a Job>) -> Vec<JobId> {
        jobs.map(|job| job.id).collect()
    }

    #[test]
    fn cleaning_leaves_holes_and_drops_the_front() {
        let mut table = JobTable::default();
        for _ in 0..6 {
            table.push(job(table.next_id()));
        }
        table.retain(|job| job.id % 2 == 0 && job.id != 2);
        assert_eq!(ids(table.values()), [4, 6]);
        assert_eq!(table.len(), 2);
        assert_eq!(table.next_id(), 7, "ids are never reused");
        assert!(table.get(1).is_none() && table.get(3).is_none() && table.get(99).is_none());
        assert_eq!(table[4].id, 4);
        assert_eq!(ids(table.since(5)), [6]);
        assert_eq!(ids(table.since(0)), [4, 6]);
        table.retain(|_| false);
        assert_eq!((table.len(), table.next_id()), (0, 7));
        table.push(job(7));
        assert_eq!(ids(table.since(JobId::MIN)), [7]);
    }

    /// Jobs pushed and cleaned behind a long-lived one leave no slots
    /// behind; the long-lived job stays where lookups and walks find it.
    #[test]
    fn a_long_lived_job_holds_no_slots_for_the_jobs_cleaned_after_it() {
        let mut table = JobTable::default();
        let mut long_lived = job(table.next_id());
        long_lived.status = JobStatus::Pending;
        table.push(long_lived);
        for round in 0..50 {
            for _ in 0..1_000 {
                table.push(job(table.next_id()));
            }
            table.retain(|job| job.status == JobStatus::Pending);
            assert_eq!(table.len(), 1, "round {round}");
            assert!(table.slots.len() <= COMPACT_ABOVE, "round {round}");
        }
        assert_eq!(table[1].status, JobStatus::Pending);
        assert!(
            table.slots.capacity() <= 4 * COMPACT_ABOVE,
            "the deque's memory is given back"
        );
        table[1].status = JobStatus::Done;
        assert_eq!(ids(table.values()), [1]);
        assert_eq!(ids(table.since(1)), [1]);
        assert_eq!(ids(table.since(2)), Vec::<JobId>::new());
        assert_eq!(table.next_id(), 50_002);

        // Newer jobs keep their place in the deque, after the straggler.
        let newer = table.next_id();
        table.push(job(newer));
        assert_eq!(ids(table.values()), [1, newer]);
        assert_eq!(ids(table.since(2)), [newer]);
        table.retain(|job| job.id != 1);
        assert_eq!(ids(table.values()), [newer]);
        assert_eq!(table.len(), 1);
    }

    /// A burst of jobs, once cleaned, leaves no slots' memory behind.
    #[test]
    fn cleaning_a_burst_gives_its_memory_back() {
        let mut table = JobTable::default();
        for _ in 0..100_000 {
            table.push(job(table.next_id()));
        }
        table.retain(|job| job.id > 99_000);
        assert_eq!(table.len(), 1_000);
        assert!(
            table.slots.capacity() < 4 * 1_000,
            "{}",
            table.slots.capacity()
        );
        table.retain(|_| false);
        assert!(
            table.slots.capacity() <= COMPACT_ABOVE,
            "{}",
            table.slots.capacity()
        );
        assert_eq!(table.next_id(), 100_001);
    }
}
