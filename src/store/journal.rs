//! The embedded store's journal: an append-only log of committed batches in front of the redb
//! file.
//!
//! A commit appends one record holding every write of its batch to the current segment file and
//! fdatasyncs it; that is all a caller waits for. A redb commit rewrites copy-on-write B-tree
//! pages and costs 1.5 ms for a few dozen writes, where an append and fdatasync cost 0.1 ms. A
//! checkpointer thread later folds each full segment into the redb file in one transaction,
//! where a fire released and acked within the segment costs nothing at all, and then deletes
//! the segment. Opening the store replays whatever segments were not folded in yet.
//!
//! Segment `journal-<n>.log` is the magic bytes, then records: payload length (u32 LE), CRC-32
//! of the length and payload (u32 LE), payload. A payload is a sequence of operations: table (u8), kind
//! (u8: put or delete), key length (u32 LE), key, and for a put the value length (u32 LE) and
//! value (the record as [`super::codec`] encodes it). Only the newest segment may end in a
//! record cut short (a crash mid-append, never answered OK); anywhere else it is corruption.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write as _};
use std::path::{Path, PathBuf};

use super::{StoreError, Write};

pub(super) const MAGIC: &[u8; 8] = b"TICKDJ1\n";
/// Bytes before the first record of a segment.
pub(super) const HEADER_LEN: u64 = MAGIC.len() as u64;
const FRAME_LEN: usize = 8;

/// The redb tables a journal operation touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) enum Table {
    Specs = 0,
    Statuses = 1,
    Fires = 2,
    Occurrences = 3,
}

const PUT: u8 = 0;
const DELETE: u8 = 1;

/// One operation read back from a record: a put of `value`, or a delete when it is `None`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct LoggedOp<'a> {
    pub table: Table,
    pub key: &'a str,
    pub value: Option<&'a [u8]>,
}

/// The file name of segment `n`.
pub(super) fn segment_name(n: u64) -> String {
    format!("journal-{n:020}.log")
}

/// The segment number in a file name, if it is a segment's.
pub(super) fn segment_number(name: &str) -> Option<u64> {
    name.strip_prefix("journal-")?
        .strip_suffix(".log")?
        .parse()
        .ok()
}

/// The segments in `dir`, oldest first.
pub(super) fn segments_in(dir: &Path) -> Result<Vec<u64>, StoreError> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| StoreError::Io(format!("cannot list {}: {e}", dir.display())))?;
    let mut found = Vec::new();
    for entry in entries {
        let entry =
            entry.map_err(|e| StoreError::Io(format!("cannot list {}: {e}", dir.display())))?;
        if let Some(n) = entry.file_name().to_str().and_then(segment_number) {
            found.push(n);
        }
    }
    found.sort_unstable();
    Ok(found)
}

/// Appends one framed record holding `writes` to `buf`.
pub(super) fn encode_batch(writes: &[Write], buf: &mut Vec<u8>) -> Result<(), StoreError> {
    let start = buf.len();
    buf.extend_from_slice(&[0; FRAME_LEN]);
    for w in writes {
        match w {
            Write::PutSpec(spec) => put(buf, Table::Specs, spec.id(), spec)?,
            Write::PutStatus(id, status) => put(buf, Table::Statuses, id, status)?,
            Write::PutFire(fire) => put(buf, Table::Fires, &fire.fire_id, fire)?,
            Write::DeleteFire(id) => delete(buf, Table::Fires, id)?,
            Write::DeleteJob(id) => {
                delete(buf, Table::Specs, id)?;
                delete(buf, Table::Statuses, id)?;
            }
            Write::PutOccurrence(job, record) => {
                put(buf, Table::Occurrences, &record.store_key(job), record)?
            }
            Write::DeleteOccurrence(key) => delete(buf, Table::Occurrences, key)?,
        }
    }
    let payload = &buf[start + FRAME_LEN..];
    let len = length(payload.len())?;
    let crc = checksum(len, payload);
    buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// CRC-32 of the length and the payload, so that a run of zeros is not a valid empty record
/// (crc32fast: several GB/s with the CPU's carry-less multiply).
fn checksum(len: u32, payload: &[u8]) -> u32 {
    let mut digest = crc32fast::Hasher::new();
    digest.update(&len.to_le_bytes());
    digest.update(payload);
    digest.finalize()
}

fn length(n: usize) -> Result<u32, StoreError> {
    u32::try_from(n).map_err(|_| StoreError::Io(format!("a batch of {n} bytes is too large")))
}

fn key_header(buf: &mut Vec<u8>, table: Table, kind: u8, key: &str) -> Result<(), StoreError> {
    buf.push(table as u8);
    buf.push(kind);
    buf.extend_from_slice(&length(key.len())?.to_le_bytes());
    buf.extend_from_slice(key.as_bytes());
    Ok(())
}

fn put<T: serde::Serialize>(
    buf: &mut Vec<u8>,
    table: Table,
    key: &str,
    value: &T,
) -> Result<(), StoreError> {
    key_header(buf, table, PUT, key)?;
    let at = buf.len();
    buf.extend_from_slice(&[0; 4]);
    rmp_serde::encode::write(buf, value).map_err(|e| StoreError::Io(format!("encode: {e}")))?;
    let len = length(buf.len() - at - 4)?;
    buf[at..at + 4].copy_from_slice(&len.to_le_bytes());
    Ok(())
}

fn delete(buf: &mut Vec<u8>, table: Table, key: &str) -> Result<(), StoreError> {
    key_header(buf, table, DELETE, key)
}

/// A segment's records as read from disk.
#[derive(Debug)]
pub(super) struct Segment {
    /// The payloads of its whole records, in order.
    pub records: Vec<std::ops::Range<usize>>,
    pub bytes: Vec<u8>,
    /// Bytes after the last whole record (a record cut short by a crash).
    pub torn: usize,
}

/// Reads segment `n` of `dir`.
pub(super) fn read_segment(dir: &Path, n: u64) -> Result<Segment, StoreError> {
    let path = dir.join(segment_name(n));
    let bytes = std::fs::read(&path)
        .map_err(|e| StoreError::Io(format!("cannot read {}: {e}", path.display())))?;
    parse_segment(n, bytes)
}

/// Splits the bytes of segment `n` into its whole records (reading nothing inside them).
pub(super) fn parse_segment(n: u64, bytes: Vec<u8>) -> Result<Segment, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt {
        table: "journal",
        key: segment_name(n),
        reason,
    };
    if bytes.len() < MAGIC.len() {
        // Created but its header not yet written when the process died: nothing in it.
        return Ok(Segment {
            records: Vec::new(),
            torn: bytes.len(),
            bytes,
        });
    }
    if &bytes[..MAGIC.len()] != MAGIC {
        return Err(corrupt("not a tickd journal segment".into()));
    }
    let mut records = Vec::new();
    let mut at = MAGIC.len();
    while bytes.len() - at >= FRAME_LEN {
        let len = u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
        let crc = u32::from_le_bytes([bytes[at + 4], bytes[at + 5], bytes[at + 6], bytes[at + 7]]);
        let start = at + FRAME_LEN;
        let Some(end) = start
            .checked_add(len as usize)
            .filter(|e| *e <= bytes.len())
        else {
            break;
        };
        if checksum(len, &bytes[start..end]) != crc {
            break;
        }
        records.push(start..end);
        at = end;
    }
    Ok(Segment {
        records,
        torn: bytes.len() - at,
        bytes,
    })
}

/// The operations of one record's payload, in order.
pub(super) fn ops(payload: &[u8]) -> Result<Vec<LoggedOp<'_>>, String> {
    let mut out = Vec::new();
    let mut at = 0;
    let take = |at: &mut usize, n: usize| -> Result<&[u8], String> {
        let end = at
            .checked_add(n)
            .filter(|e| *e <= payload.len())
            .ok_or_else(|| format!("operation cut short at byte {at}"))?;
        let part = &payload[*at..end];
        *at = end;
        Ok(part)
    };
    let take_len = |at: &mut usize| -> Result<usize, String> {
        let b = take(at, 4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    while at < payload.len() {
        let head = take(&mut at, 2)?;
        let table = match head[0] {
            0 => Table::Specs,
            1 => Table::Statuses,
            2 => Table::Fires,
            3 => Table::Occurrences,
            t => return Err(format!("unknown table {t}")),
        };
        let kind = head[1];
        let key_len = take_len(&mut at)?;
        let key = std::str::from_utf8(take(&mut at, key_len)?)
            .map_err(|_| "a key is not UTF-8".to_string())?;
        let value = match kind {
            PUT => {
                let len = take_len(&mut at)?;
                Some(take(&mut at, len)?)
            }
            DELETE => None,
            k => return Err(format!("unknown operation {k}")),
        };
        out.push(LoggedOp { table, key, value });
    }
    Ok(out)
}

/// The segment being appended to.
#[derive(Debug)]
pub(super) struct Appender {
    dir: PathBuf,
    file: File,
    pub number: u64,
    /// Bytes of whole, synced records (and the header).
    pub len: u64,
    /// A failed append may have left bytes past `len`; they are cut before the next append.
    cut_needed: bool,
    buf: Vec<u8>,
}

impl Appender {
    /// Creates segment `n` in `dir` (it must not exist) and makes its name durable.
    pub fn create(dir: &Path, n: u64) -> Result<Appender, StoreError> {
        let path = dir.join(segment_name(n));
        let mut file = OpenOptions::new()
            .create_new(true)
            .write(true)
            .open(&path)
            .map_err(|e| file_error("cannot create", &path, e))?;
        let started = file
            .write_all(MAGIC)
            .and_then(|()| file.sync_data())
            .map_err(|e| file_error("cannot write", &path, e))
            .and_then(|()| sync_dir(dir));
        if let Err(e) = started {
            // Leave no half-made segment behind for the next attempt to trip over.
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        Ok(Appender {
            dir: dir.to_path_buf(),
            file,
            number: n,
            len: HEADER_LEN,
            cut_needed: false,
            buf: Vec::new(),
        })
    }

    /// Appends `writes` as one record and syncs it: when this returns `Ok` they are durable;
    /// when it returns `Err`, the record is cut from the file before anything else is written.
    pub fn append(&mut self, writes: &[Write]) -> Result<(), StoreError> {
        if self.cut_needed {
            self.cut()?;
        }
        self.buf.clear();
        encode_batch(writes, &mut self.buf)?;
        let written = self
            .file
            .write_all(&self.buf)
            .and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            self.cut_needed = true;
            // Best effort now; if it fails the next append tries again before writing.
            let _ = self.cut();
            return Err(file_error("cannot append to", &self.path(), e));
        }
        self.len += self.buf.len() as u64;
        // Do not keep a huge batch's buffer around.
        if self.buf.capacity() > 1 << 20 {
            self.buf = Vec::new();
        }
        Ok(())
    }

    /// Cuts the file back to its last synced record.
    fn cut(&mut self) -> Result<(), StoreError> {
        self.file
            .set_len(self.len)
            .and_then(|()| self.file.seek(SeekFrom::Start(self.len)).map(|_| ()))
            .and_then(|()| self.file.sync_data())
            .map_err(|e| file_error("cannot cut a failed write from", &self.path(), e))?;
        self.cut_needed = false;
        Ok(())
    }

    fn path(&self) -> PathBuf {
        self.dir.join(segment_name(self.number))
    }
}

/// Syncs a directory so that a file created or removed in it stays so after a crash.
pub(super) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| file_error("cannot sync directory", dir, e))
}

/// A file error as a store error: a full disk (or quota) as [`StoreError::Full`].
pub(super) fn file_error(what: &str, path: &Path, e: std::io::Error) -> StoreError {
    let message = format!("{what} {}: {e}", path.display());
    if super::is_full(&e) {
        StoreError::Full(message)
    } else {
        StoreError::Io(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::PackedSpec;
    use crate::store::contract::{fire, spec, status};

    fn batch() -> Vec<Write> {
        vec![
            Write::PutSpec(PackedSpec::new(&spec("a"))),
            Write::PutStatus("a".into(), status(crate::domain::JobState::Scheduled)),
            Write::PutFire(fire("f")),
            Write::DeleteFire("g".into()),
            Write::DeleteJob("b".into()),
        ]
    }

    /// A batch reads back as its operations, in order, with values the codec decodes.
    #[test]
    fn a_batch_reads_back_as_its_operations() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut app = Appender::create(dir.path(), 7).expect("create");
        app.append(&batch()).expect("append");
        app.append(&[Write::DeleteFire("f".into())])
            .expect("append");
        let seg = read_segment(dir.path(), 7).expect("read");
        assert_eq!(seg.torn, 0);
        assert_eq!(seg.records.len(), 2);
        let first = ops(&seg.bytes[seg.records[0].clone()]).expect("ops");
        let shape: Vec<_> = first
            .iter()
            .map(|op| (op.table, op.key, op.value.is_some()))
            .collect();
        assert_eq!(
            shape,
            vec![
                (Table::Specs, "a", true),
                (Table::Statuses, "a", true),
                (Table::Fires, "f", true),
                (Table::Fires, "g", false),
                (Table::Specs, "b", false),
                (Table::Statuses, "b", false),
            ]
        );
        let read: crate::domain::FireRecord =
            crate::store::codec::decode("fires", "f", first[2].value.expect("put")).expect("fire");
        assert_eq!(read, fire("f"));
        assert_eq!(segments_in(dir.path()).expect("list"), vec![7]);
    }

    /// A record cut short anywhere (a crash mid-append) ends the segment there; the whole
    /// records before it read.
    #[test]
    fn a_record_cut_short_ends_the_segment() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut app = Appender::create(dir.path(), 1).expect("create");
        app.append(&batch()).expect("append");
        let whole = app.len;
        app.append(&batch()).expect("append");
        let full = std::fs::read(dir.path().join(segment_name(1))).expect("read");
        for cut in whole as usize..full.len() {
            std::fs::write(dir.path().join(segment_name(1)), &full[..cut]).expect("write");
            let seg = read_segment(dir.path(), 1).expect("read");
            assert_eq!(seg.records.len(), 1, "cut at {cut}");
            assert_eq!(seg.torn, cut - whole as usize);
        }
        // Zeros after the whole records (a file grown but not written) are not a record.
        let mut zeros = full[..whole as usize].to_vec();
        zeros.extend_from_slice(&[0; 64]);
        std::fs::write(dir.path().join(segment_name(1)), &zeros).expect("write");
        let seg = read_segment(dir.path(), 1).expect("read");
        assert_eq!((seg.records.len(), seg.torn), (1, 64));
        // A flipped byte inside the last record fails its checksum.
        let mut flipped = full.clone();
        let last = flipped.len() - 3;
        flipped[last] ^= 0x40;
        std::fs::write(dir.path().join(segment_name(1)), &flipped).expect("write");
        assert_eq!(read_segment(dir.path(), 1).expect("read").records.len(), 1);
    }

    /// Garbage in a payload is an error naming what is wrong, never a panic.
    #[test]
    fn garbage_operations_are_an_error() {
        for bad in [
            &[9u8, 0, 0, 0, 0, 0][..],
            &[0, 7, 0, 0, 0, 0],
            &[0, 0, 200, 0, 0, 0, b'a'],
            &[0, 0, 1, 0, 0, 0, 0xff],
            &[0, 0, 1, 0, 0, 0, b'a', 9, 0],
        ] {
            assert!(ops(bad).is_err(), "{bad:?}");
        }
        assert_eq!(ops(&[]).expect("empty"), Vec::new());
    }

    /// A failed append leaves nothing of its record behind.
    #[test]
    fn a_cut_removes_a_failed_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut app = Appender::create(dir.path(), 1).expect("create");
        app.append(&batch()).expect("append");
        let len = app.len;
        // Simulate a record written but not synced, then cut.
        app.file.write_all(b"half a record").expect("write");
        app.cut_needed = true;
        app.append(&[Write::DeleteFire("x".into())])
            .expect("append");
        let seg = read_segment(dir.path(), 1).expect("read");
        assert_eq!(seg.records.len(), 2);
        assert_eq!(seg.torn, 0);
        assert_eq!(seg.records[1].start as u64, len + FRAME_LEN as u64);
    }
}
