//! Storage: what tickd keeps on disk, behind a small trait.
//!
//! The layout is four tables: job specs (written once, when a job is scheduled), job statuses
//! (small, rewritten whenever a job fires, pauses or completes), fires (written when a fire
//! is released or redelivered, deleted when it is acked) and the ledger of occurrences
//! (written once per occurrence, when its fate is sealed; deleted when it falls out of the
//! ledger's bounds). Splitting spec from status keeps a large payload from being rewritten on
//! every fire.
//!
//! A store only applies ordered batches of writes atomically and durably, and loads everything
//! back. It makes no decisions: the scheduler decides, then commits. It must not assume it is the
//! only process using the data, or that the data is local.
//!
//! [`postgres`] is the other kind: the tables shared by replicas, where the database itself
//! decides what is due and who holds a fire (in the statements the replicated engine runs), so
//! it is not a [`Store`].

mod journal;
mod memory;
pub mod postgres;
mod redb_store;

pub use memory::MemoryStore;
pub use redb_store::{DB_FILE_NAME, RedbStore};

use crate::domain::{FireRecord, JobId, JobStatus, Occurrence, PackedSpec};

/// One change in a batch. Batches are applied in order, all or nothing.
#[derive(Debug, Clone)]
pub enum Write {
    /// A new job's spec (encoded as the [`JobSpec`](crate::domain::JobSpec) it holds).
    PutSpec(PackedSpec),
    /// A job's current status.
    PutStatus(JobId, JobStatus),
    /// A fire, new or updated.
    PutFire(FireRecord),
    /// A fire that is acked or dropped.
    DeleteFire(crate::domain::FireId),
    /// A job (spec and status) that retention or DeleteJob removed. Its ledger records go
    /// with their own deletes.
    DeleteJob(JobId),
    /// A ledger record of a job: what became of an occurrence.
    PutOccurrence(JobId, Occurrence),
    /// A ledger record that is no longer kept, by its store key
    /// ([`Occurrence::store_key`](crate::domain::Occurrence::store_key)).
    DeleteOccurrence(String),
}

/// Everything a store holds, as loaded at start-up.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Packed as they are read, so that a million specs are never held twice at start-up.
    pub jobs: Vec<(PackedSpec, JobStatus)>,
    pub fires: Vec<FireRecord>,
    /// Ledger records, by store key.
    pub occurrences: Vec<(String, Occurrence)>,
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store I/O failed: {0}")]
    Io(String),
    /// The disk (or the quota) is full; freeing space lets commits succeed again.
    #[error("the store's disk is full: {0}")]
    Full(String),
    #[error("store record {table}/{key} cannot be read: {reason}")]
    Corrupt {
        table: &'static str,
        key: String,
        reason: String,
    },
    #[error("job {0} has a status but no spec in the store")]
    MissingSpec(String),
}

/// ENOSPC or EDQUOT: the disk (or quota) is full, and freeing space lets writes succeed again.
fn is_full(e: &std::io::Error) -> bool {
    const ENOSPC: i32 = 28;
    const EDQUOT: i32 = 122;
    e.kind() == std::io::ErrorKind::StorageFull
        || e.kind() == std::io::ErrorKind::QuotaExceeded
        || matches!(e.raw_os_error(), Some(ENOSPC | EDQUOT))
}

/// A durable home for jobs and fires.
pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    /// Loads every job and fire.
    fn load(&self) -> Result<Snapshot, StoreError>;

    /// Applies `writes` in order as one atomic, durable transaction: when this returns `Ok`, the
    /// writes survive a crash; when it returns `Err`, none of them happened.
    fn commit(&self, writes: &[Write]) -> Result<(), StoreError>;
}

/// Record encoding shared by the stores: MessagePack, each struct an array of its fields in
/// declaration order (no field names: a fire record is less than half the size with them).
/// A field is only ever added at the end of its struct, with `#[serde(default)]`, so records
/// written before it existed still read. Records written as maps with field names (as
/// earlier builds of tickd did) read too: serde takes either form. Public only for the fuzz
/// targets in `fuzz/`.
#[doc(hidden)]
pub mod codec {
    use serde::{Serialize, de::DeserializeOwned};

    use super::StoreError;
    use crate::domain::{JobSpec, PackedSpec};

    pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
        rmp_serde::to_vec(value).map_err(|e| StoreError::Io(format!("encode: {e}")))
    }

    pub fn decode<T: DeserializeOwned>(
        table: &'static str,
        key: &str,
        bytes: &[u8],
    ) -> Result<T, StoreError> {
        rmp_serde::from_slice(bytes).map_err(|e| StoreError::Corrupt {
            table,
            key: key.to_string(),
            reason: e.to_string(),
        })
    }

    /// A job spec record, straight into the packed form (no allocation per string on the
    /// way); a record that form cannot borrow from is read as a [`JobSpec`] first.
    pub fn decode_spec(
        table: &'static str,
        key: &str,
        bytes: &[u8],
    ) -> Result<PackedSpec, StoreError> {
        match decode::<PackedSpec>(table, key, bytes) {
            Ok(spec) => Ok(spec),
            Err(_) => Ok(PackedSpec::new(&decode::<JobSpec>(table, key, bytes)?)),
        }
    }

    #[cfg(test)]
    mod tests {
        use super::super::contract::{fire, spec, status};
        use super::*;
        use crate::domain::{FireRecord, JobSpec, JobState, JobStatus};

        /// Records written with field names (before positional encoding) still read.
        #[test]
        fn records_with_field_names_still_read() {
            let old = rmp_serde::to_vec_named(&spec("a")).expect("encode");
            let read: JobSpec = decode("job_specs", "a", &old).expect("decode");
            assert_eq!(read, spec("a"));
            let old = rmp_serde::to_vec_named(&status(JobState::Paused)).expect("encode");
            let read: JobStatus = decode("job_statuses", "a", &old).expect("decode");
            assert_eq!(read, status(JobState::Paused));
            let new = encode(&fire("f")).expect("encode");
            assert!(new.len() * 2 < rmp_serde::to_vec_named(&fire("f")).expect("encode").len());
            let read: FireRecord = decode("fires", "f", &new).expect("decode");
            assert_eq!(read, fire("f"));
        }

        /// A record written before a trailing defaulted field existed reads with its default.
        #[test]
        fn a_record_missing_a_trailing_field_reads_with_its_default() {
            let f = fire("f");
            let without_trace = (
                &f.fire_id,
                &*f.job_id,
                &f.queue,
                f.scheduled_time,
                f.fire_time,
                f.attempt,
                f.not_before,
                f.dead_lettered,
            );
            let bytes = rmp_serde::to_vec(&without_trace).expect("encode");
            let read: FireRecord = decode("fires", "f", &bytes).expect("decode");
            assert_eq!(read, f);
        }
    }
}

/// What opening the embedded store makes of a journal segment, for the fuzz targets in
/// `fuzz/` (not an API).
#[doc(hidden)]
pub mod fuzzing {
    use super::{StoreError, Write, journal, redb_store};

    /// A write read back from a journal segment: table (0 job specs, 1 job statuses, 2 fires,
    /// 3 occurrences), key, and the record (`None` for a delete), still encoded.
    pub type JournalWrite = (u8, String, Option<Vec<u8>>);

    /// The last write to each key of a segment's bytes, as opening the store folds them into
    /// redb, and how many bytes at its end are not a whole record.
    pub fn journal_segment(bytes: Vec<u8>) -> Result<(Vec<JournalWrite>, usize), StoreError> {
        let segment = journal::parse_segment(1, bytes)?;
        let last = redb_store::last_writes(&segment, |reason| StoreError::Corrupt {
            table: "journal",
            key: journal::segment_name(1),
            reason,
        })?;
        let writes = last
            .into_iter()
            .map(|((table, key), value)| (table as u8, key.to_string(), value.map(<[u8]>::to_vec)))
            .collect();
        Ok((writes, segment.torn))
    }

    /// A segment holding `writes` as one record, as a commit appends it.
    pub fn journal_segment_of(writes: &[Write]) -> Result<Vec<u8>, StoreError> {
        let mut bytes = journal::MAGIC.to_vec();
        journal::encode_batch(writes, &mut bytes)?;
        Ok(bytes)
    }
}

#[cfg(test)]
pub(crate) mod contract {
    //! Tests every store must pass.

    use super::*;
    use crate::domain::{JobSpec, JobState, MisfirePolicy, Timestamp, TriggerSpec};
    use bytes::Bytes;
    use std::collections::BTreeMap;

    pub fn spec(id: &str) -> JobSpec {
        JobSpec {
            id: id.into(),
            queue: "q".into(),
            trigger: TriggerSpec::After { after: 1 },
            payload: Bytes::from_static(b"payload"),
            labels: BTreeMap::from([("k".to_string(), "v".to_string())]),
            max_fires: 0,
            end_time: None,
            misfire_policy: MisfirePolicy::FireOnce,
            misfire_grace: 5,
            ack_deadline: 30,
            max_attempts: 10,
            dead_letter_queue: None,
            overlap_policy: Default::default(),
        }
    }

    pub fn status(state: JobState) -> JobStatus {
        JobStatus {
            state,
            next_occurrence: Some(Timestamp(7)),
            fire_count: 3,
            create_time: Timestamp(1),
            last_fire_time: None,
            finish_time: None,
            trace: None,
        }
    }

    pub fn fire(id: &str) -> FireRecord {
        FireRecord {
            fire_id: id.into(),
            job_id: "a".into(),
            queue: "q".into(),
            scheduled_time: Timestamp(5),
            fire_time: Timestamp(6),
            attempt: 1,
            not_before: None,
            dead_lettered: false,
            trace: None,
            held: false,
        }
    }

    /// Writes are applied in order, and a load returns exactly what was committed.
    pub fn round_trips(store: &dyn Store) {
        let a = PackedSpec::new(&spec("a"));
        store
            .commit(&[
                Write::PutSpec(a.clone()),
                Write::PutStatus("a".into(), status(JobState::Scheduled)),
                Write::PutFire(fire("f1")),
                Write::PutFire(fire("f2")),
            ])
            .expect("commit");
        store
            .commit(&[
                Write::PutStatus("a".into(), status(JobState::Paused)),
                Write::DeleteFire("f1".into()),
                Write::DeleteFire("never-existed".into()),
            ])
            .expect("commit");
        let snap = store.load().expect("load");
        assert_eq!(
            snap.jobs,
            vec![(PackedSpec::new(&spec("a")), status(JobState::Paused))]
        );
        assert_eq!(snap.fires, vec![fire("f2")]);
    }
}
