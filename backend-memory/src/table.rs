//! The store's jobs by id.
//!
//! Ids are handed out in sequence and never reused, so the jobs sit in one
//! deque, a job at its id's offset from the oldest slot kept: a lookup is
//! an index, not a tree search through nodes of large values, which every
//! pull, acknowledgement and renewal does per job. A cleaned job leaves an
//! empty slot; slots at the front are dropped as they empty.

use std::collections::VecDeque;
use std::ops::{Index, IndexMut};

use relayq_core::{Job, JobId};

#[derive(Debug)]
pub(crate) struct JobTable {
    /// The id of `slots[0]`.
    first: JobId,
    /// The job of each id from `first` on, `None` once cleaned.
    slots: VecDeque<Option<Job>>,
    /// Jobs held (`Some` slots).
    len: usize,
}

impl Default for JobTable {
    fn default() -> Self {
        Self {
            first: 1,
            slots: VecDeque::new(),
            len: 0,
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
        self.len += 1;
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    fn slot(&self, id: JobId) -> Option<usize> {
        usize::try_from(id.checked_sub(self.first)?).ok()
    }

    pub(crate) fn get(&self, id: JobId) -> Option<&Job> {
        self.slots.get(self.slot(id)?)?.as_ref()
    }

    pub(crate) fn get_mut(&mut self, id: JobId) -> Option<&mut Job> {
        let slot = self.slot(id)?;
        self.slots.get_mut(slot)?.as_mut()
    }

    /// Every job, by id.
    pub(crate) fn values(&self) -> impl Iterator<Item = &Job> {
        self.slots.iter().flatten()
    }

    /// The jobs from id `start` on, by id.
    pub(crate) fn since(&self, start: JobId) -> impl Iterator<Item = &Job> {
        let skip = usize::try_from(start.saturating_sub(self.first).max(0)).unwrap_or(usize::MAX);
        self.slots.iter().skip(skip).flatten()
    }

    /// Drops the jobs `keep` says no to.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&Job) -> bool) {
        for slot in &mut self.slots {
            if slot.as_ref().is_some_and(|job| !keep(job)) {
                *slot = None;
                self.len -= 1;
            }
        }
        while let Some(None) = self.slots.front() {
            self.slots.pop_front();
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
}
