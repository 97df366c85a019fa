//! An in-memory store for tests: same contract as the embedded one, nothing on disk.
//! It can be told to fail commits, to test how the scheduler copes with a failing disk.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use super::{Snapshot, Store, StoreError, Write};
use crate::domain::{FireRecord, JobStatus, Occurrence, PackedSpec};

#[derive(Debug, Default)]
struct Tables {
    specs: BTreeMap<String, PackedSpec>,
    statuses: BTreeMap<String, JobStatus>,
    fires: BTreeMap<String, FireRecord>,
    occurrences: BTreeMap<String, Occurrence>,
}

/// Keeps everything in maps behind a mutex.
#[derive(Debug, Default)]
pub struct MemoryStore {
    tables: Mutex<Tables>,
    fail_commits: AtomicBool,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// While set, every commit fails and changes nothing.
    pub fn set_fail_commits(&self, fail: bool) {
        self.fail_commits.store(fail, Ordering::SeqCst);
    }
}

impl Store for MemoryStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        let t = self
            .tables
            .lock()
            .map_err(|_| StoreError::Io("memory store lock poisoned".into()))?;
        let mut jobs = Vec::with_capacity(t.statuses.len());
        for (id, status) in &t.statuses {
            let spec = t
                .specs
                .get(id)
                .ok_or_else(|| StoreError::MissingSpec(id.clone()))?;
            jobs.push((spec.clone(), status.clone()));
        }
        Ok(Snapshot {
            jobs,
            fires: t.fires.values().cloned().collect(),
            occurrences: t
                .occurrences
                .iter()
                .map(|(k, o)| (k.clone(), o.clone()))
                .collect(),
        })
    }

    fn commit(&self, writes: &[Write]) -> Result<(), StoreError> {
        if self.fail_commits.load(Ordering::SeqCst) {
            return Err(StoreError::Io("injected commit failure".into()));
        }
        let mut t = self
            .tables
            .lock()
            .map_err(|_| StoreError::Io("memory store lock poisoned".into()))?;
        for w in writes {
            match w {
                Write::PutSpec(spec) => {
                    t.specs.insert(spec.id().to_string(), spec.clone());
                }
                Write::PutStatus(id, status) => {
                    t.statuses.insert(id.to_string(), status.clone());
                }
                Write::PutFire(fire) => {
                    t.fires.insert(fire.fire_id.to_string(), fire.clone());
                }
                Write::DeleteFire(id) => {
                    t.fires.remove(&**id);
                }
                Write::PutOccurrence(job, record) => {
                    t.occurrences.insert(record.store_key(job), record.clone());
                }
                Write::DeleteOccurrence(key) => {
                    t.occurrences.remove(key);
                }
                Write::DeleteJob(id) => {
                    t.specs.remove(&**id);
                    t.statuses.remove(&**id);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The memory store keeps the store contract.
    #[test]
    fn memory_store_round_trips() {
        super::super::contract::round_trips(&MemoryStore::new());
    }

    /// A failing commit changes nothing.
    #[test]
    fn failed_commit_changes_nothing() {
        let store = MemoryStore::new();
        store.set_fail_commits(true);
        let fire = super::super::contract::fire("f");
        assert!(store.commit(&[Write::PutFire(fire)]).is_err());
        store.set_fail_commits(false);
        assert!(store.load().expect("load").fires.is_empty());
    }
}
