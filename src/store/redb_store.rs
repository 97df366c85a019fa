//! The embedded store: one redb file, `tickd.redb`, in the data directory, with a journal in
//! front of it (`journal-<n>.log` files beside it; see [`super::journal`]).
//!
//! A commit is one record appended to the journal and fdatasynced before `commit` returns. A
//! checkpointer thread folds each full journal segment into the redb file in one write
//! transaction (the last write to each key wins, so a fire released and acked within a segment
//! never reaches the B-tree), records the segment's number in that same transaction, and then
//! deletes the segment. Opening the store first folds in every segment left over, so `load`
//! reads redb alone. redb is copy-on-write with checksummed pages, so a crash leaves its last
//! committed transaction intact; the journal's checksummed records cover what came after.
//!
//! Bounds: a segment is folded once it holds [`SEGMENT_BYTES`]; while [`MAX_SEGMENTS_WAITING`]
//! full segments wait for the checkpointer, commits wait too (and fail with its error if it
//! cannot write redb), so the journal never holds more than about 24 MiB and a restart never
//! replays more than that.
//!
//! After a failed transaction redb refuses every later one until the database is reopened (a
//! full disk is the common cause), so a failed checkpoint closes the database and the next
//! attempt reopens it first. Freeing space is then enough: no restart needed.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::journal::{self, Appender, Table};
use super::{Snapshot, Store, StoreError, Write, codec, is_full};
use crate::domain::{FireRecord, JobStatus, Occurrence};

const SPECS: TableDefinition<&str, &[u8]> = TableDefinition::new("job_specs");
const STATUSES: TableDefinition<&str, &[u8]> = TableDefinition::new("job_statuses");
const FIRES: TableDefinition<&str, &[u8]> = TableDefinition::new("fires");
const OCCURRENCES: TableDefinition<&str, &[u8]> = TableDefinition::new("occurrences");
/// `journal_folded`: the newest journal segment whose writes are in redb.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const FOLDED: &str = "journal_folded";

/// Page cache of the store. tickd reads the store once, at start-up, so the cache mostly
/// holds pages written recently; a small one is enough (16 MiB instead of 64: 48 bytes less
/// resident per job at a million jobs, commits no slower; the kernel's page cache keeps what
/// it drops).
pub const DEFAULT_CACHE_BYTES: usize = 16 * 1024 * 1024;

/// A journal segment is handed to the checkpointer once it holds this many bytes.
pub const SEGMENT_BYTES: u64 = 8 * 1024 * 1024;

/// Full segments that may wait for the checkpointer before commits wait for it.
pub const MAX_SEGMENTS_WAITING: usize = 2;

/// How long the checkpointer waits before trying a failed fold again.
const RETRY_FOLD_AFTER: Duration = Duration::from_millis(200);

/// The file name inside the data directory.
pub const DB_FILE_NAME: &str = "tickd.redb";

/// A redb database file with its journal.
pub struct RedbStore {
    shared: Arc<Shared>,
    journal: Mutex<Appender>,
    checkpointer: Option<JoinHandle<()>>,
    /// [`SEGMENT_BYTES`], smaller in tests.
    segment_bytes: u64,
}

/// What the committing side and the checkpointer share.
struct Shared {
    dir: PathBuf,
    path: PathBuf,
    cache_bytes: usize,
    /// `None` after a failed transaction closed it; the next use reopens it.
    db: Mutex<Option<Database>>,
    folding: Mutex<Folding>,
    /// Signalled when `folding` changes.
    changed: Condvar,
}

#[derive(Debug, Default)]
struct Folding {
    /// Full segments not yet folded into redb, oldest first.
    waiting: VecDeque<u64>,
    /// Why the last fold failed, until one succeeds.
    error: Option<(bool, String)>,
    stop: bool,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore")
            .field("path", &self.shared.path)
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

fn poisoned() -> StoreError {
    StoreError::Io("store lock poisoned by a panic".into())
}

impl RedbStore {
    /// Opens (or creates) the store in `data_dir`, creating the directory if needed, with
    /// redb's default page cache.
    pub fn open(data_dir: &Path) -> Result<RedbStore, StoreError> {
        Self::open_with_cache(data_dir, DEFAULT_CACHE_BYTES)
    }

    /// Opens (or creates) the store with a page cache of `cache_bytes`, folding into redb
    /// whatever the journal holds from before.
    pub fn open_with_cache(data_dir: &Path, cache_bytes: usize) -> Result<RedbStore, StoreError> {
        Self::open_with(data_dir, cache_bytes, SEGMENT_BYTES)
    }

    fn open_with(
        data_dir: &Path,
        cache_bytes: usize,
        segment_bytes: u64,
    ) -> Result<RedbStore, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|e| {
            StoreError::Io(format!(
                "cannot create data directory {}: {e}",
                data_dir.display()
            ))
        })?;
        let path = data_dir.join(DB_FILE_NAME);
        let db = open_database(&path, cache_bytes)?;
        let shared = Arc::new(Shared {
            dir: data_dir.to_path_buf(),
            path,
            cache_bytes,
            db: Mutex::new(Some(db)),
            folding: Mutex::new(Folding::default()),
            changed: Condvar::new(),
        });
        let folded = shared.folded()?;
        let segments = journal::segments_in(data_dir)?;
        let newest = segments.last().copied().unwrap_or(0);
        for &n in &segments {
            if n > folded {
                shared.fold(n, n == newest)?;
            }
            shared.remove_segment(n);
        }
        if !segments.is_empty() {
            journal::sync_dir(data_dir)?;
        }
        let appender = Appender::create(data_dir, newest.max(folded) + 1)?;
        let checkpointer = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("tickd-checkpoint".into())
                .spawn(move || shared.run_checkpointer())
                .map_err(|e| StoreError::Io(format!("cannot start the checkpointer: {e}")))?
        };
        Ok(RedbStore {
            shared,
            journal: Mutex::new(appender),
            checkpointer: Some(checkpointer),
            segment_bytes,
        })
    }

    /// Hands the current segment to the checkpointer and starts the next one.
    fn rotate(&self, journal: &mut Appender) -> Result<(), StoreError> {
        let next = Appender::create(&self.shared.dir, journal.number + 1)?;
        let full = std::mem::replace(journal, next);
        let mut folding = self.shared.folding.lock().map_err(|_| poisoned())?;
        folding.waiting.push_back(full.number);
        self.shared.changed.notify_all();
        Ok(())
    }

    /// Waits while more than `max` segments wait to be folded; fails with the checkpointer's
    /// error if it is failing meanwhile.
    fn wait_for_checkpointer(&self, max: usize) -> Result<(), StoreError> {
        let mut folding = self.shared.folding.lock().map_err(|_| poisoned())?;
        while folding.waiting.len() > max {
            if let Some((full, reason)) = &folding.error {
                let message = format!("the journal cannot be folded into {DB_FILE_NAME}: {reason}");
                return Err(if *full {
                    StoreError::Full(message)
                } else {
                    StoreError::Io(message)
                });
            }
            folding = self.shared.changed.wait(folding).map_err(|_| poisoned())?;
        }
        Ok(())
    }
}

impl Drop for RedbStore {
    fn drop(&mut self) {
        if let Ok(mut folding) = self.shared.folding.lock() {
            folding.stop = true;
        }
        self.shared.changed.notify_all();
        if let Some(handle) = self.checkpointer.take() {
            let _ = handle.join();
        }
    }
}

impl Shared {
    /// The open database, reopened first if a failed transaction closed it.
    fn database(&self) -> Result<MutexGuard<'_, Option<Database>>, StoreError> {
        let mut db = self.db.lock().map_err(|_| poisoned())?;
        if db.is_none() {
            *db = Some(open_database(&self.path, self.cache_bytes)?);
            tracing::info!(path = %self.path.display(), "store reopened");
        }
        Ok(db)
    }

    /// The newest segment folded into redb (0: none).
    fn folded(&self) -> Result<u64, StoreError> {
        let db = self.database()?;
        let db = db
            .as_ref()
            .ok_or_else(|| StoreError::Io("store closed".into()))?;
        let txn = db.begin_read().map_err(io("begin read"))?;
        let meta = txn.open_table(META).map_err(io("open meta"))?;
        Ok(meta
            .get(FOLDED)
            .map_err(io("read meta"))?
            .map(|v| v.value())
            .unwrap_or(0))
    }

    /// Folds segment `n` into redb in one transaction; only the `newest` segment may end in a
    /// record cut short by a crash.
    fn fold(&self, n: u64, newest: bool) -> Result<(), StoreError> {
        let segment = journal::read_segment(&self.dir, n)?;
        let corrupt = |reason: String| StoreError::Corrupt {
            table: "journal",
            key: journal::segment_name(n),
            reason,
        };
        if segment.torn > 0 {
            if !newest {
                return Err(corrupt(format!(
                    "{} bytes at its end are not a whole record, and a newer segment exists",
                    segment.torn
                )));
            }
            tracing::warn!(
                segment = %journal::segment_name(n),
                bytes = segment.torn,
                "the journal ends in a record cut short by a crash; it was never acknowledged and is ignored"
            );
        }
        let last = last_writes(&segment, corrupt)?;
        let mut db = self.database()?;
        let result = db
            .as_ref()
            .ok_or_else(|| StoreError::Io("store closed".into()))
            .and_then(|db| fold_into(db, n, &last));
        if let Err(e) = &result
            && matches!(e, StoreError::Io(_) | StoreError::Full(_))
        {
            // redb refuses every later transaction after an I/O error until it is reopened.
            *db = None;
        }
        result
    }

    /// Deletes a folded segment; one left behind is deleted at the next start.
    fn remove_segment(&self, n: u64) {
        let path = self.dir.join(journal::segment_name(n));
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::warn!(path = %path.display(), error = %e, "cannot delete a folded journal segment; it is deleted at the next start");
        }
    }

    /// Folds each full segment into redb as it comes, until told to stop.
    fn run_checkpointer(&self) {
        lower_priority();
        loop {
            let n = {
                let Ok(mut folding) = self.folding.lock() else {
                    return;
                };
                loop {
                    if folding.stop {
                        return;
                    }
                    if let Some(n) = folding.waiting.front() {
                        break *n;
                    }
                    folding = match self.changed.wait(folding) {
                        Ok(f) => f,
                        Err(_) => return,
                    };
                }
            };
            let result = self.fold(n, false);
            if result.is_ok() {
                self.remove_segment(n);
            }
            let Ok(mut folding) = self.folding.lock() else {
                return;
            };
            match result {
                Ok(()) => {
                    folding.waiting.pop_front();
                    folding.error = None;
                    self.changed.notify_all();
                }
                Err(e) => {
                    tracing::error!(segment = %journal::segment_name(n), error = %e, "cannot fold the journal into the store; retrying");
                    folding.error = Some((matches!(e, StoreError::Full(_)), e.to_string()));
                    self.changed.notify_all();
                    // Wait before retrying, but wake at once to stop.
                    let _ = self.changed.wait_timeout(folding, RETRY_FOLD_AFTER);
                }
            }
        }
    }
}

/// Nice level of the checkpointer thread. Folding can wait: on a busy machine it yields the CPU
/// to the threads that answer calls and release fires (a burst of 100,000 fires arrives about
/// a third sooner on 2 cores), and once two full segments wait, commits wait for it, which
/// gives it the CPU back.
const CHECKPOINTER_NICE: i32 = 10;

/// Lowers the calling thread's scheduling priority to [`CHECKPOINTER_NICE`] (Linux: a thread
/// has a nice value of its own). Failing to is harmless and only logged.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: gettid and setpriority take no pointers and only affect this thread.
        let rc = unsafe {
            let tid = libc::gettid();
            libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, CHECKPOINTER_NICE)
        };
        if rc != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "cannot lower the checkpointer's priority");
        }
    }
}

/// A key of a segment and the last value written to it (`None`: deleted).
pub(super) type LastWrite<'a> = ((Table, &'a str), Option<&'a [u8]>);

/// A write to one table: its key, and its value (none: a delete).
type TableWrite<'a> = (&'a str, Option<&'a [u8]>);

/// The last write to each key of a segment, by table, keys in order (which keeps redb's
/// inserts local). Each table's writes are sorted by key with a stable sort, so writes to one
/// key stay in journal order and the last of each run of equal keys is the one that counts.
/// Journal order is mostly key order already (jobs are created, and fall due, in id order),
/// which the sort's run detection turns into a merge of a few runs: a hash map to find the
/// last write, then an unstable sort of what it held, cost a third of a fold.
pub(super) fn last_writes<'a>(
    segment: &'a journal::Segment,
    corrupt: impl Fn(String) -> StoreError,
) -> Result<Vec<LastWrite<'a>>, StoreError> {
    let mut by_table: [Vec<TableWrite<'_>>; 4] = Default::default();
    for range in &segment.records {
        for op in journal::ops(&segment.bytes[range.clone()]).map_err(&corrupt)? {
            by_table[op.table as usize].push((op.key, op.value));
        }
    }
    let mut last = Vec::with_capacity(by_table.iter().map(Vec::len).sum());
    for (table, mut writes) in [
        Table::Specs,
        Table::Statuses,
        Table::Fires,
        Table::Occurrences,
    ]
    .into_iter()
    .zip(by_table)
    {
        writes.sort_by(|a, b| a.0.cmp(b.0));
        // `dedup_by` keeps the first of a run; it takes the value of each later one.
        writes.dedup_by(|later, kept| {
            let same = later.0 == kept.0;
            if same {
                kept.1 = later.1;
            }
            same
        });
        last.extend(writes.into_iter().map(|(key, value)| ((table, key), value)));
    }
    Ok(last)
}

/// One write transaction applying `last` and recording segment `n` as folded.
fn fold_into(db: &Database, n: u64, last: &[LastWrite<'_>]) -> Result<(), StoreError> {
    let txn = db.begin_write().map_err(io("begin write"))?;
    {
        let mut specs = txn.open_table(SPECS).map_err(io("open job_specs"))?;
        let mut statuses = txn.open_table(STATUSES).map_err(io("open job_statuses"))?;
        let mut fires = txn.open_table(FIRES).map_err(io("open fires"))?;
        let mut occurrences = txn
            .open_table(OCCURRENCES)
            .map_err(io("open occurrences"))?;
        let mut meta = txn.open_table(META).map_err(io("open meta"))?;
        for &((table, key), value) in last {
            let table = match table {
                Table::Specs => &mut specs,
                Table::Statuses => &mut statuses,
                Table::Fires => &mut fires,
                Table::Occurrences => &mut occurrences,
            };
            match value {
                Some(value) => {
                    table.insert(key, value).map_err(io("write"))?;
                }
                None => {
                    table.remove(key).map_err(io("delete"))?;
                }
            }
        }
        meta.insert(FOLDED, n).map_err(io("write meta"))?;
    }
    // Durability::Immediate is redb's default: commit returns after fsync.
    txn.commit().map_err(io("commit"))
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
    for table in [SPECS, STATUSES, FIRES, OCCURRENCES] {
        txn.open_table(table).map_err(io("open table"))?;
    }
    txn.open_table(META).map_err(io("open table"))?;
    txn.commit().map_err(io("commit"))?;
    Ok(db)
}

impl Store for RedbStore {
    /// Folds the whole journal into redb first, then reads redb.
    fn load(&self) -> Result<Snapshot, StoreError> {
        {
            let mut journal = self.journal.lock().map_err(|_| poisoned())?;
            if journal.len > journal::HEADER_LEN {
                self.rotate(&mut journal)?;
            }
            self.wait_for_checkpointer(0)?;
        }
        let db = self.shared.database()?;
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
            let spec = codec::decode_spec("job_specs", id, spec_bytes.value())?;
            snap.jobs.push((spec, status));
        }
        for entry in fires.iter().map_err(io("scan fires"))? {
            let (key, value) = entry.map_err(io("read fires"))?;
            let fire: FireRecord = codec::decode("fires", key.value(), value.value())?;
            snap.fires.push(fire);
        }
        let occurrences = txn
            .open_table(OCCURRENCES)
            .map_err(io("open occurrences"))?;
        for entry in occurrences.iter().map_err(io("scan occurrences"))? {
            let (key, value) = entry.map_err(io("read occurrences"))?;
            let key = key.value();
            let record: Occurrence = codec::decode("occurrences", key, value.value())?;
            snap.occurrences.push((key.to_string(), record));
        }
        Ok(snap)
    }

    /// Appends the batch to the journal and syncs it; starts a new segment when this one is
    /// full.
    fn commit(&self, writes: &[Write]) -> Result<(), StoreError> {
        let mut journal = self.journal.lock().map_err(|_| poisoned())?;
        self.wait_for_checkpointer(MAX_SEGMENTS_WAITING - 1)?;
        journal.append(writes)?;
        if journal.len >= self.segment_bytes
            && let Err(e) = self.rotate(&mut journal)
        {
            // The batch is durable; the segment just grows until a new one can be made.
            tracing::warn!(error = %e, "cannot start a new journal segment; the current one keeps growing");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::JobState;
    use crate::domain::PackedSpec;

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
                    Write::PutSpec(PackedSpec::new(&super::super::contract::spec("a"))),
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

    fn fire_batch(id: &str) -> Vec<Write> {
        vec![Write::PutFire(super::super::contract::fire(id))]
    }

    fn journal_files(dir: &Path) -> Vec<u64> {
        journal::segments_in(dir).expect("list")
    }

    /// Full segments are folded into redb and deleted while commits go on; the last write to a
    /// key wins across segments, and what a reopen reads is exactly what was committed.
    #[test]
    fn full_segments_are_folded_and_deleted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = RedbStore::open_with(dir.path(), DEFAULT_CACHE_BYTES, 1024).expect("open");
        for i in 0..200 {
            store
                .commit(&fire_batch(&format!("f{i:03}")))
                .expect("commit");
            if i % 3 == 0 {
                store
                    .commit(&[Write::DeleteFire(format!("f{i:03}").into())])
                    .expect("commit");
            }
            assert!(journal_files(dir.path()).len() <= MAX_SEGMENTS_WAITING + 1);
        }
        store.wait_for_checkpointer(0).expect("folded");
        assert!(
            store.shared.folded().expect("folded") >= 5,
            "several segments folded"
        );
        assert_eq!(
            journal_files(dir.path()).len(),
            1,
            "only the current segment is left"
        );
        let expected: Vec<String> = (0..200)
            .filter(|i| i % 3 != 0)
            .map(|i| format!("f{i:03}"))
            .collect();
        drop(store);
        let store = RedbStore::open(dir.path()).expect("reopen");
        let got: Vec<String> = store
            .load()
            .expect("load")
            .fires
            .into_iter()
            .map(|f| f.fire_id.to_string())
            .collect();
        assert_eq!(got, expected);
    }

    /// Within a segment the last write to each key counts, whatever the order of keys and
    /// tables in it; deletes count as writes; keys come out in order, table by table.
    #[test]
    fn a_fold_takes_the_last_write_to_each_key() {
        use super::super::contract::{fire, status};
        let attempt = |id: &str, n: u32| {
            let mut f = fire(id);
            f.attempt = n;
            Write::PutFire(f)
        };
        let running = |n: u64| {
            let mut s = status(crate::domain::JobState::Scheduled);
            s.fire_count = n;
            s
        };
        let batches = vec![
            vec![
                attempt("c", 1),
                attempt("a", 1),
                Write::PutStatus("j2".into(), running(1)),
                Write::PutStatus("j1".into(), running(1)),
            ],
            vec![
                Write::DeleteFire("a".into()),
                attempt("b", 1),
                Write::PutStatus("j2".into(), running(2)),
            ],
            vec![attempt("a", 3), Write::DeleteFire("c".into())],
            // Many writes to a few keys: an unstable sort would mix up their order.
            (4..60)
                .flat_map(|n| [attempt("d", n), attempt("e", n)])
                .collect(),
        ];
        let dir = tempfile::tempdir().expect("tempdir");
        let mut appender = Appender::create(dir.path(), 1).expect("segment");
        for batch in &batches {
            appender.append(batch).expect("append");
        }
        // The bytes each write is stored as, read back from a segment of its own.
        let stored = |write: Write| {
            let dir = tempfile::tempdir().expect("tempdir");
            Appender::create(dir.path(), 1)
                .and_then(|mut a| a.append(&[write]))
                .expect("segment");
            let segment = journal::read_segment(dir.path(), 1).expect("read");
            let bytes = &segment.bytes[segment.records[0].clone()];
            journal::ops(bytes).expect("ops")[0]
                .value
                .map(<[u8]>::to_vec)
        };
        let segment = journal::read_segment(dir.path(), 1).expect("read");
        type Owned = ((Table, String), Option<Vec<u8>>);
        let got: Vec<Owned> = last_writes(&segment, StoreError::Io)
            .expect("last writes")
            .into_iter()
            .map(|((table, key), value)| ((table, key.to_string()), value.map(<[u8]>::to_vec)))
            .collect();
        let want = vec![
            (
                (Table::Statuses, "j1".to_string()),
                stored(Write::PutStatus("j1".into(), running(1))),
            ),
            (
                (Table::Statuses, "j2".to_string()),
                stored(Write::PutStatus("j2".into(), running(2))),
            ),
            ((Table::Fires, "a".to_string()), stored(attempt("a", 3))),
            ((Table::Fires, "b".to_string()), stored(attempt("b", 1))),
            ((Table::Fires, "c".to_string()), None),
            ((Table::Fires, "d".to_string()), stored(attempt("d", 59))),
            ((Table::Fires, "e".to_string()), stored(attempt("e", 59))),
        ];
        assert_eq!(got, want);
    }

    /// A segment already folded but not deleted (a crash between the two) is not applied again:
    /// it would bring back a fire a later segment deleted.
    #[test]
    fn a_folded_segment_left_behind_is_not_replayed() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Segment 1 as the store below writes it (the checkpointer may delete the store's own
        // copy at any moment).
        let elsewhere = tempfile::tempdir().expect("tempdir");
        Appender::create(elsewhere.path(), 1)
            .and_then(|mut a| a.append(&fire_batch("f")))
            .expect("segment 1");
        let first = journal::segment_name(1);
        let saved = std::fs::read(elsewhere.path().join(&first));
        let store = RedbStore::open_with(dir.path(), DEFAULT_CACHE_BYTES, 16).expect("open");
        store.commit(&fire_batch("f")).expect("commit");
        store.wait_for_checkpointer(0).expect("folded");
        store
            .commit(&[Write::DeleteFire("f".into())])
            .expect("commit");
        store.wait_for_checkpointer(0).expect("folded");
        drop(store);
        std::fs::write(dir.path().join(&first), saved.expect("segment 1 was there"))
            .expect("put back");
        let store = RedbStore::open(dir.path()).expect("reopen");
        assert!(store.load().expect("load").fires.is_empty());
        assert!(!dir.path().join(&first).exists(), "deleted at start");
    }

    /// A record cut short at the end of the newest segment (a crash mid-append: never answered)
    /// is ignored; the same in an older segment is corruption, reported with the segment's name.
    #[test]
    fn a_cut_record_is_ignored_only_at_the_end_of_the_journal() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = RedbStore::open(dir.path()).expect("open");
            store.commit(&fire_batch("kept")).expect("commit");
        }
        let last = *journal_files(dir.path()).last().expect("a segment");
        let path = dir.path().join(journal::segment_name(last));
        let mut bytes = std::fs::read(&path).expect("read");
        bytes.extend_from_slice(&[40, 0, 0, 0, 1, 2, 3, 4, 5]);
        std::fs::write(&path, &bytes).expect("write");
        let newer = dir.path().join(journal::segment_name(last + 1));
        {
            let store = RedbStore::open(dir.path()).expect("a torn tail is not an error");
            let fires = store.load().expect("load").fires;
            assert_eq!(fires.len(), 1);
            assert!(!path.exists());
        }
        // Now the same torn segment with a newer one after it.
        std::fs::write(&path, &bytes).expect("write");
        std::fs::remove_file(&newer).ok();
        let newest = dir.path().join(journal::segment_name(last + 5));
        std::fs::copy(&path, &newest).expect("copy");
        // The store recorded segment `last + 1` (created by the reopen) as not folded; make the
        // torn one count as newer than what redb holds by renumbering both past it.
        let torn_again = dir.path().join(journal::segment_name(last + 4));
        std::fs::rename(&path, &torn_again).expect("rename");
        let err = RedbStore::open(dir.path()).expect_err("corrupt");
        assert!(
            err.to_string().contains(&journal::segment_name(last + 4)),
            "{err}"
        );
    }

    /// While the checkpointer cannot fold and two full segments wait, commits fail with its
    /// error (a full disk as `Full`), write nothing, and go through again once it recovers.
    #[test]
    fn commits_fail_while_the_checkpointer_is_failing_and_behind() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store =
            RedbStore::open_with(dir.path(), DEFAULT_CACHE_BYTES, 1 << 20).expect("open");
        // Stop the checkpointer, then set up what a failing one leaves behind.
        store.shared.folding.lock().expect("lock").stop = true;
        store.shared.changed.notify_all();
        store
            .checkpointer
            .take()
            .expect("running")
            .join()
            .expect("stopped");
        {
            let mut folding = store.shared.folding.lock().expect("lock");
            folding.waiting.extend([1_000, 1_001]);
            folding.error = Some((true, "No space left on device".into()));
        }
        let before = std::fs::metadata(dir.path().join(journal::segment_name(1)))
            .expect("segment")
            .len();
        let err = store
            .commit(&fire_batch("f"))
            .expect_err("behind and failing");
        assert!(matches!(err, StoreError::Full(_)), "{err}");
        assert!(err.to_string().contains("cannot be folded"), "{err}");
        let after = std::fs::metadata(dir.path().join(journal::segment_name(1)))
            .expect("segment")
            .len();
        assert_eq!(before, after, "nothing appended");
        {
            let mut folding = store.shared.folding.lock().expect("lock");
            folding.waiting.clear();
            folding.error = None;
        }
        store.commit(&fire_batch("f")).expect("recovered");
        drop(store);
        let store = RedbStore::open(dir.path()).expect("reopen");
        assert_eq!(store.load().expect("load").fires.len(), 1);
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
            let db = store.shared.database().expect("db");
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
