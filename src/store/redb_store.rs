//! The embedded store: one redb file, `tickd.redb`, in the data directory.
//!
//! Each commit is one redb write transaction with immediate durability (fsync before `commit`
//! returns). redb is copy-on-write with checksummed pages, so a crash leaves the last committed
//! transaction intact.
//!
//! After a failed commit redb refuses every later transaction until the database is reopened
//! (a full disk is the common cause), so a failed commit closes the database and the next
//! commit reopens it first. Freeing space is then enough: no restart needed.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::{Snapshot, Store, StoreError, Write, codec};
use crate::domain::{FireRecord, JobSpec, JobStatus};

const SPECS: TableDefinition<&str, &[u8]> = TableDefinition::new("job_specs");
const STATUSES: TableDefinition<&str, &[u8]> = TableDefinition::new("job_statuses");
const FIRES: TableDefinition<&str, &[u8]> = TableDefinition::new("fires");

/// Page cache of the store. tickd reads the store once, at start-up, so the cache mostly
/// holds pages written recently; a small one is enough (16 MiB instead of 64: 48 bytes less
/// resident per job at a million jobs, commits no slower; the kernel's page cache keeps what
/// it drops).
pub const DEFAULT_CACHE_BYTES: usize = 16 * 1024 * 1024;

/// The file name inside the data directory.
pub const DB_FILE_NAME: &str = "tickd.redb";

/// A redb database file.
pub struct RedbStore {
    /// `None` after a failed commit closed it; the next commit reopens it.
    db: Mutex<Option<Database>>,
    path: PathBuf,
    cache_bytes: usize,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore")
            .field("path", &self.path)
            .finish()
    }
}

/// Maps a redb error to a store error: a full disk (or quota) to [`StoreError::Full`], every
/// other failure to [`StoreError::Io`]; `what` says which step failed.
fn io<E: Into<redb::Error>>(what: &'static str) -> impl Fn(E) -> StoreError {
    move |e| match e.into() {
        redb::Error::Io(e) if is_full(&e) => StoreError::Full(format!("{what}: {e}")),
        e => StoreError::Io(format!("{what}: {e}")),
    }
}

/// ENOSPC or EDQUOT.
fn is_full(e: &std::io::Error) -> bool {
    const ENOSPC: i32 = 28;
    const EDQUOT: i32 = 122;
    e.kind() == std::io::ErrorKind::StorageFull
        || e.kind() == std::io::ErrorKind::QuotaExceeded
        || matches!(e.raw_os_error(), Some(ENOSPC | EDQUOT))
}

impl RedbStore {
    /// Opens (or creates) the store in `data_dir`, creating the directory if needed, with
    /// redb's default page cache.
    pub fn open(data_dir: &Path) -> Result<RedbStore, StoreError> {
        Self::open_with_cache(data_dir, DEFAULT_CACHE_BYTES)
    }

    /// Opens (or creates) the store with a page cache of `cache_bytes`.
    pub fn open_with_cache(data_dir: &Path, cache_bytes: usize) -> Result<RedbStore, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|e| {
            StoreError::Io(format!(
                "cannot create data directory {}: {e}",
                data_dir.display()
            ))
        })?;
        let path = data_dir.join(DB_FILE_NAME);
        let db = open_database(&path, cache_bytes)?;
        Ok(RedbStore {
            db: Mutex::new(Some(db)),
            path,
            cache_bytes,
        })
    }

    /// The open database, reopened first if a failed commit closed it.
    fn database(&self) -> Result<MutexGuard<'_, Option<Database>>, StoreError> {
        let mut db = self
            .db
            .lock()
            .map_err(|_| StoreError::Io("store lock poisoned by a panic".into()))?;
        if db.is_none() {
            *db = Some(open_database(&self.path, self.cache_bytes)?);
            tracing::info!(path = %self.path.display(), "store reopened");
        }
        Ok(db)
    }
}

/// Opens (or creates) the database file and its tables.
fn open_database(path: &Path, cache_bytes: usize) -> Result<Database, StoreError> {
    let db = Database::builder()
        .set_cache_size(cache_bytes)
        .create(path)
        .map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Io(format!(
                "cannot open {}: another tickd process is using this data directory",
                path.display()
            )),
            e => match io::<redb::DatabaseError>("open")(e) {
                StoreError::Full(m) => {
                    StoreError::Full(format!("cannot open {}: {m}", path.display()))
                }
                StoreError::Io(m) => StoreError::Io(format!("cannot open {}: {m}", path.display())),
                other => other,
            },
        })?;
    // Create the tables up front so that a read of a fresh store finds them.
    let txn = db.begin_write().map_err(io("begin write"))?;
    for table in [SPECS, STATUSES, FIRES] {
        txn.open_table(table).map_err(io("open table"))?;
    }
    txn.commit().map_err(io("commit"))?;
    Ok(db)
}

impl Store for RedbStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        let db = self.database()?;
        let db = db
            .as_ref()
            .ok_or_else(|| StoreError::Io("store closed".into()))?;
        let txn = db.begin_read().map_err(io("begin read"))?;
        let specs = txn.open_table(SPECS).map_err(io("open job_specs"))?;
        let statuses = txn.open_table(STATUSES).map_err(io("open job_statuses"))?;
        let fires = txn.open_table(FIRES).map_err(io("open fires"))?;

        let mut snap = Snapshot::default();
        for entry in statuses.iter().map_err(io("scan job_statuses"))? {
            let (key, value) = entry.map_err(io("read job_statuses"))?;
            let id = key.value();
            let status: JobStatus = codec::decode("job_statuses", id, value.value())?;
            let spec_bytes = specs
                .get(id)
                .map_err(io("read job_specs"))?
                .ok_or_else(|| StoreError::MissingSpec(id.to_string()))?;
            let spec: JobSpec = codec::decode("job_specs", id, spec_bytes.value())?;
            snap.jobs.push((spec, status));
        }
        for entry in fires.iter().map_err(io("scan fires"))? {
            let (key, value) = entry.map_err(io("read fires"))?;
            let fire: FireRecord = codec::decode("fires", key.value(), value.value())?;
            snap.fires.push(fire);
        }
        Ok(snap)
    }

    fn commit(&self, writes: &[Write]) -> Result<(), StoreError> {
        let mut db = self.database()?;
        let result = db
            .as_ref()
            .ok_or_else(|| StoreError::Io("store closed".into()))
            .and_then(|db| commit_to(db, writes));
        if let Err(e) = &result
            && matches!(e, StoreError::Io(_) | StoreError::Full(_))
        {
            // redb refuses every later transaction after an I/O error until it is reopened.
            *db = None;
        }
        result
    }
}

/// One write transaction with every write in it.
fn commit_to(db: &Database, writes: &[Write]) -> Result<(), StoreError> {
    let txn = db.begin_write().map_err(io("begin write"))?;
    {
        let mut specs = txn.open_table(SPECS).map_err(io("open job_specs"))?;
        let mut statuses = txn.open_table(STATUSES).map_err(io("open job_statuses"))?;
        let mut fires = txn.open_table(FIRES).map_err(io("open fires"))?;
        for w in writes {
            match w {
                Write::PutSpec(spec) => {
                    let bytes = codec::encode(spec.as_ref())?;
                    specs
                        .insert(&*spec.id, bytes.as_slice())
                        .map_err(io("write job_specs"))?;
                }
                Write::PutStatus(id, status) => {
                    let bytes = codec::encode(status)?;
                    statuses
                        .insert(&**id, bytes.as_slice())
                        .map_err(io("write job_statuses"))?;
                }
                Write::PutFire(fire) => {
                    let bytes = codec::encode(fire)?;
                    fires
                        .insert(fire.fire_id.as_str(), bytes.as_slice())
                        .map_err(io("write fires"))?;
                }
                Write::DeleteFire(id) => {
                    fires.remove(id.as_str()).map_err(io("delete fire"))?;
                }
                Write::DeleteJob(id) => {
                    specs.remove(&**id).map_err(io("delete job_specs"))?;
                    statuses.remove(&**id).map_err(io("delete job_statuses"))?;
                }
            }
        }
    }
    // Durability::Immediate is redb's default: commit returns after fsync.
    txn.commit().map_err(io("commit"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::JobState;
    use std::sync::Arc;

    /// The redb store keeps the store contract.
    #[test]
    fn redb_store_round_trips() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = RedbStore::open(dir.path()).expect("open");
        super::super::contract::round_trips(&store);
    }

    /// What one handle committed, a new handle on the same directory reads back.
    #[test]
    fn data_survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = RedbStore::open(dir.path()).expect("open");
            store
                .commit(&[
                    Write::PutSpec(Arc::new(super::super::contract::spec("a"))),
                    Write::PutStatus(
                        "a".into(),
                        super::super::contract::status(JobState::Scheduled),
                    ),
                ])
                .expect("commit");
        }
        let store = RedbStore::open(dir.path()).expect("reopen");
        assert_eq!(store.load().expect("load").jobs.len(), 1);
    }

    /// A second process (or handle) on the same directory is refused with a clear reason.
    #[test]
    fn second_opener_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let _first = RedbStore::open(dir.path()).expect("open");
        let err = RedbStore::open(dir.path()).expect_err("already open");
        assert!(err.to_string().contains("another tickd process"), "{err}");
    }

    /// A corrupt record is reported with its table and key, not a panic.
    #[test]
    fn corrupt_record_is_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = RedbStore::open(dir.path()).expect("open");
        {
            let db = store.database().expect("db");
            let txn = db.as_ref().expect("open").begin_write().expect("txn");
            {
                let mut t = txn.open_table(FIRES).expect("table");
                t.insert("bad", &[0xc1_u8][..]).expect("insert");
            }
            txn.commit().expect("commit");
        }
        let err = store.load().expect_err("corrupt");
        assert!(err.to_string().contains("fires/bad"), "{err}");
    }
}
