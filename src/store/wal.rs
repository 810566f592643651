//! The commit log: one `fdatasync` makes a write batch durable.
//!
//! # Why
//!
//! Making a batch durable through sled costs two trips to the device: `Db::flush()` writes
//! sled's IO buffers and waits for them with `sync_file_range`, and the `fdatasync` that
//! power-loss safety needs comes after it (see `durability`). Measured here: flush 170 µs,
//! fdatasync 160 µs, most of a 486 µs group-commit cycle. Instead, the writer appends each
//! batch's key changes to this log and fdatasyncs it: one trip, about 90 µs on a file whose
//! blocks were written before (an `fallocate`d block costs a metadata update on its first
//! write; the log is zero-filled ahead so it never does). Then the batch is applied to sled
//! *without* a flush, and the callbacks run. sled is made durable at checkpoints (flush,
//! fdatasync, blob fsyncs), after which the log starts over; at open, what the log holds is
//! applied again.
//!
//! # Why replaying is correct
//!
//! A record holds blind key writes: insert this value, or remove this key, already resolved
//! by the writer (a `Compact` becomes the removal of each chunk it covers). Record *n* is
//! durable before batch *n* touches sled, so after a crash sled holds the checkpoint's state
//! plus batches `1..j` for some `j <= k`, where records `1..k` are those that reached the disk
//! whole. Applying records `1..k` in order onto any such state gives the state after batch *k*:
//! the last write to each key wins, and every key a record touches is written again.
//!
//! That argument needs every record applied to be newer than the checkpoint. So the header
//! names an *epoch*; a checkpoint writes the next epoch and new records start right after the
//! header again. Records of an older epoch further in the file are ignored: applied onto a
//! newer state they would bring back removed chunks. A record whose checksum fails is where
//! the log ends (a write torn by the crash).
//!
//! # Format
//!
//! ```text
//! header  [magic "SHEAFWAL": 8][version: u32 LE][0: u32][epoch: u64 LE][blake3 of the 24 bytes before: 8]
//! record  [len: u32 LE][epoch: u64 LE][blake3(len, epoch, payload): 16][payload: len]
//! payload entries: [tree: u8 (0 data, 1 docs)][op: u8 (0 remove, 1 insert)]
//!                  [key len: u32 LE][key]([value len: u32 LE][value] if insert)
//! ```
//!
//! Decoding never panics: lengths are checked against what is left, and a bad record ends the
//! replay where it stands.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::StoreError;

/// The log's file name inside the store directory.
pub(crate) const FILE_NAME: &str = "sheaf.wal";
const MAGIC: &[u8; 8] = b"SHEAFWAL";
const VERSION: u32 = 1;
const HEADER_LEN: u64 = 32;
const RECORD_HEADER_LEN: usize = 4 + 8 + 16;
/// The file is zero-filled ahead of the writes in steps of at least this much.
const GROW_STEP: u64 = 1 << 20;
/// No record is this big (a batch is capped far below it); a length above it is damage.
const MAX_RECORD: u64 = 1 << 31;

/// When the writer checkpoints: once the log holds this many bytes, or this long after the
/// last checkpoint (bounding both the replay at open and what sled holds unsynced).
pub(crate) const CHECKPOINT_BYTES: u64 = 8 << 20;
pub(crate) const CHECKPOINT_EVERY: Duration = Duration::from_secs(2);

/// Which sled tree an entry writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tree {
    Data,
    Docs,
}

/// One key write of a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub tree: Tree,
    pub key: Vec<u8>,
    /// `None` removes the key.
    pub value: Option<Vec<u8>>,
}

/// Builds a record's payload.
#[derive(Default)]
pub(crate) struct Payload(Vec<u8>);

impl Payload {
    pub fn put(&mut self, tree: Tree, key: &[u8], value: Option<&[u8]>) {
        self.0.push(match tree {
            Tree::Data => 0,
            Tree::Docs => 1,
        });
        self.0.push(u8::from(value.is_some()));
        self.0.extend_from_slice(&(key.len() as u32).to_le_bytes());
        self.0.extend_from_slice(key);
        if let Some(v) = value {
            self.0.extend_from_slice(&(v.len() as u32).to_le_bytes());
            self.0.extend_from_slice(v);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Why a record's payload could not be decoded (its checksum matched: a bug, not a torn write).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed commit-log payload at byte {at}: {what}")]
pub(crate) struct PayloadError {
    at: usize,
    what: &'static str,
}

/// Decodes a record's payload.
pub(crate) fn decode_payload(mut p: &[u8]) -> Result<Vec<Entry>, PayloadError> {
    let total = p.len();
    let mut out = Vec::new();
    let take = |p: &mut &[u8], n: usize, what: &'static str| -> Result<Vec<u8>, PayloadError> {
        if p.len() < n {
            return Err(PayloadError {
                at: total - p.len(),
                what,
            });
        }
        let (a, b) = p.split_at(n);
        *p = b;
        Ok(a.to_vec())
    };
    let len = |p: &mut &[u8], what: &'static str| -> Result<usize, PayloadError> {
        let b = take(p, 4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    while !p.is_empty() {
        let head = take(&mut p, 2, "entry header")?;
        let tree = match head[0] {
            0 => Tree::Data,
            1 => Tree::Docs,
            _ => {
                return Err(PayloadError {
                    at: total - p.len() - 2,
                    what: "unknown tree",
                })
            }
        };
        let n = len(&mut p, "key length")?;
        let key = take(&mut p, n, "key")?;
        let value = match head[1] {
            0 => None,
            1 => {
                let n = len(&mut p, "value length")?;
                Some(take(&mut p, n, "value")?)
            }
            _ => {
                return Err(PayloadError {
                    at: total - p.len(),
                    what: "unknown op",
                })
            }
        };
        out.push(Entry { tree, key, value });
    }
    Ok(out)
}

fn header(epoch: u64) -> [u8; HEADER_LEN as usize] {
    let mut h = [0u8; HEADER_LEN as usize];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[16..24].copy_from_slice(&epoch.to_le_bytes());
    let sum = blake3::hash(&h[..24]);
    h[24..32].copy_from_slice(&sum.as_bytes()[..8]);
    h
}

/// What a header says.
#[derive(Debug, PartialEq, Eq)]
enum Header {
    Epoch(u64),
    /// All zeros or shorter than a header: a log created but never written.
    Empty,
    /// Neither: damaged.
    Damaged,
    UnknownVersion(u32),
}

fn parse_header(h: &[u8]) -> Header {
    if h.len() < HEADER_LEN as usize || h.iter().all(|b| *b == 0) {
        return Header::Empty;
    }
    if &h[..8] != MAGIC {
        return Header::Damaged;
    }
    let version = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
    let sum = blake3::hash(&h[..24]);
    if h[24..32] != sum.as_bytes()[..8] {
        return Header::Damaged;
    }
    if version != VERSION {
        return Header::UnknownVersion(version);
    }
    let mut e = [0u8; 8];
    e.copy_from_slice(&h[16..24]);
    Header::Epoch(u64::from_le_bytes(e))
}

fn record_sum(len: u32, epoch: u64, payload: &[u8]) -> [u8; 16] {
    let mut h = blake3::Hasher::new();
    h.update(&len.to_le_bytes());
    h.update(&epoch.to_le_bytes());
    h.update(payload);
    let mut out = [0u8; 16];
    out.copy_from_slice(&h.finalize().as_bytes()[..16]);
    out
}

/// What opening the log found.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Replay {
    /// Records applied.
    pub records: u64,
    /// Why the scan stopped before the end of the file, if it was not the end of the epoch's
    /// records (zeros or an older epoch): a torn or damaged record, or a damaged header.
    pub stopped: Option<String>,
}

/// The open log, owned by the writer thread.
pub(crate) struct Wal {
    file: File,
    path: PathBuf,
    epoch: u64,
    /// Where the next record goes.
    end: u64,
    /// Bytes of the file already written (zeros ahead of `end`).
    capacity: u64,
    last_checkpoint: Instant,
}

impl Wal {
    /// Opens (or creates) the log in `dir` and hands every record of its current epoch to
    /// `apply`, in order. The caller must make what `apply` wrote durable and then call
    /// [`Wal::checkpoint`] before appending.
    pub fn open(
        dir: &Path,
        mut apply: impl FnMut(Vec<Entry>) -> Result<(), StoreError>,
    ) -> Result<(Wal, Replay), StoreError> {
        let path = dir.join(FILE_NAME);
        let created = !path.exists();
        let mut file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| StoreError::io("opening the commit log", e))?;
        let size = file
            .metadata()
            .map_err(|e| StoreError::io("reading the commit log's size", e))?
            .len();
        let mut replay = Replay::default();
        let mut epoch = 0;
        if !created {
            let mut h = vec![0u8; HEADER_LEN.min(size) as usize];
            file.read_exact(&mut h)
                .map_err(|e| StoreError::io("reading the commit log's header", e))?;
            match parse_header(&h) {
                Header::Epoch(e) => {
                    epoch = e;
                    replay = scan(&mut file, size, e, &mut apply)?;
                }
                Header::Empty => {}
                Header::Damaged => {
                    // A checkpoint writes the header only once sled is durable, and records
                    // follow only once the header is: a damaged header means damage, not a
                    // crash. Nothing here can be trusted to be newer than sled's state.
                    replay.stopped = Some("damaged header; nothing replayed".into());
                }
                Header::UnknownVersion(v) => {
                    return Err(StoreError::io(
                        "reading the commit log",
                        std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            format!(
                                "{} has version {v}; this build reads version {VERSION}. \
                                 It may hold acknowledged writes: open it with the sheaf \
                                 version that wrote it",
                                path.display()
                            ),
                        ),
                    ));
                }
            }
        }
        let wal = Wal {
            file,
            path,
            epoch,
            end: HEADER_LEN,
            capacity: size,
            last_checkpoint: Instant::now(),
        };
        if created {
            if let Some(parent) = wal.path.parent() {
                super::durability::sync_dir(parent)
                    .map_err(|e| StoreError::io("syncing the store directory", e))?;
            }
        }
        Ok((wal, replay))
    }

    /// Appends one record and makes it durable.
    pub fn append(&mut self, payload: &Payload) -> Result<(), StoreError> {
        let len = u32::try_from(payload.0.len())
            .ok()
            .filter(|l| u64::from(*l) < MAX_RECORD)
            .ok_or_else(|| {
                StoreError::io(
                    "writing the commit log",
                    std::io::Error::new(std::io::ErrorKind::InvalidInput, "batch too large"),
                )
            })?;
        let mut rec = Vec::with_capacity(RECORD_HEADER_LEN + payload.0.len());
        rec.extend_from_slice(&len.to_le_bytes());
        rec.extend_from_slice(&self.epoch.to_le_bytes());
        rec.extend_from_slice(&record_sum(len, self.epoch, &payload.0));
        rec.extend_from_slice(&payload.0);
        self.ensure_capacity(self.end + rec.len() as u64)?;
        write_at(&self.file, &rec, self.end)
            .map_err(|e| StoreError::io("writing the commit log", e))?;
        self.file
            .sync_data()
            .map_err(|e| StoreError::io("fdatasync of the commit log", e))?;
        self.end += rec.len() as u64;
        Ok(())
    }

    /// Zero-fills the file up to at least `needed` bytes, so that record writes overwrite
    /// written blocks (no metadata for `fdatasync` to commit).
    fn ensure_capacity(&mut self, needed: u64) -> Result<(), StoreError> {
        if needed <= self.capacity {
            return Ok(());
        }
        let target = needed
            .max(self.capacity.saturating_mul(2))
            .max(GROW_STEP)
            .div_ceil(GROW_STEP)
            * GROW_STEP;
        let zeros = vec![0u8; GROW_STEP as usize];
        let mut at = self.capacity;
        while at < target {
            let n = (target - at).min(GROW_STEP) as usize;
            write_at(&self.file, &zeros[..n], at)
                .map_err(|e| StoreError::io("growing the commit log", e))?;
            at += n as u64;
        }
        self.capacity = target;
        Ok(())
    }

    /// Whether the writer should checkpoint now.
    pub fn wants_checkpoint(&self) -> bool {
        self.end > HEADER_LEN
            && (self.end >= CHECKPOINT_BYTES || self.last_checkpoint.elapsed() >= CHECKPOINT_EVERY)
    }

    /// Starts a new epoch: call only once everything the log holds is durable in sled.
    pub fn checkpoint(&mut self) -> Result<(), StoreError> {
        if self.capacity > 4 * CHECKPOINT_BYTES {
            // A huge batch (a big snapshot) grew the file; give the space back.
            self.file
                .set_len(CHECKPOINT_BYTES)
                .map_err(|e| StoreError::io("shrinking the commit log", e))?;
            self.capacity = CHECKPOINT_BYTES;
        }
        self.epoch += 1;
        self.ensure_capacity(HEADER_LEN)?;
        write_at(&self.file, &header(self.epoch), 0)
            .map_err(|e| StoreError::io("writing the commit log's header", e))?;
        self.file
            .sync_data()
            .map_err(|e| StoreError::io("fdatasync of the commit log", e))?;
        self.end = HEADER_LEN;
        self.last_checkpoint = Instant::now();
        Ok(())
    }

    /// Bytes of records since the last checkpoint.
    pub fn pending_bytes(&self) -> u64 {
        self.end - HEADER_LEN
    }
}

/// Reads the records of `epoch` from just after the header, handing each to `apply`.
fn scan(
    file: &mut File,
    size: u64,
    epoch: u64,
    apply: &mut impl FnMut(Vec<Entry>) -> Result<(), StoreError>,
) -> Result<Replay, StoreError> {
    let mut replay = Replay::default();
    file.seek(SeekFrom::Start(HEADER_LEN))
        .map_err(|e| StoreError::io("reading the commit log", e))?;
    let mut reader = std::io::BufReader::with_capacity(1 << 16, file);
    let mut at = HEADER_LEN;
    loop {
        if size - at < RECORD_HEADER_LEN as u64 {
            break;
        }
        let mut rh = [0u8; RECORD_HEADER_LEN];
        reader
            .read_exact(&mut rh)
            .map_err(|e| StoreError::io("reading the commit log", e))?;
        let len = u32::from_le_bytes([rh[0], rh[1], rh[2], rh[3]]);
        let mut e = [0u8; 8];
        e.copy_from_slice(&rh[4..12]);
        let rec_epoch = u64::from_le_bytes(e);
        if rec_epoch != epoch {
            // zeros ahead of the last record, or a record of an older epoch: the end
            if rh.iter().any(|b| *b != 0) && rec_epoch > epoch {
                replay.stopped = Some(format!("record at byte {at} names a later epoch"));
            }
            break;
        }
        if u64::from(len) > size - at - RECORD_HEADER_LEN as u64 {
            replay.stopped = Some(format!("record at byte {at} runs past the end (torn)"));
            break;
        }
        let mut payload = vec![0u8; len as usize];
        reader
            .read_exact(&mut payload)
            .map_err(|e| StoreError::io("reading the commit log", e))?;
        if rh[12..28] != record_sum(len, epoch, &payload) {
            replay.stopped = Some(format!("record at byte {at} fails its checksum (torn)"));
            break;
        }
        let entries = match decode_payload(&payload) {
            Ok(e) => e,
            Err(e) => {
                replay.stopped = Some(format!("record at byte {at}: {e}"));
                break;
            }
        };
        apply(entries)?;
        replay.records += 1;
        at += RECORD_HEADER_LEN as u64 + u64::from(len);
    }
    Ok(replay)
}

#[cfg(unix)]
fn write_at(file: &File, buf: &[u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(file, buf, offset)
}

#[cfg(not(unix))]
fn write_at(mut file: &File, buf: &[u8], offset: u64) -> std::io::Result<()> {
    use std::io::Write;
    file.seek(SeekFrom::Start(offset))?;
    file.write_all(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(n: u8) -> Payload {
        let mut p = Payload::default();
        p.put(Tree::Data, &[n; 25], Some(&[n; 100]));
        p.put(Tree::Docs, &[n; 16], Some(&[]));
        p.put(Tree::Data, &[n, 1], None);
        p
    }

    fn replay_all(dir: &Path) -> (Wal, Replay, Vec<Vec<Entry>>) {
        let mut got = Vec::new();
        let (wal, r) = Wal::open(dir, |e| {
            got.push(e);
            Ok(())
        })
        .unwrap();
        (wal, r, got)
    }

    #[test]
    fn payloads_round_trip() {
        let p = payload(7);
        let e = decode_payload(&p.0).unwrap();
        assert_eq!(e.len(), 3);
        assert_eq!(e[0].tree, Tree::Data);
        assert_eq!(e[0].value.as_deref(), Some(&[7u8; 100][..]));
        assert_eq!(e[1].tree, Tree::Docs);
        assert_eq!(e[1].value.as_deref(), Some(&[][..]));
        assert_eq!(e[2].value, None);
    }

    #[test]
    fn every_truncation_of_a_payload_is_an_error_not_a_panic() {
        let p = payload(3);
        // entry boundaries: 2 + 4 + 25 + 4 + 100, then 2 + 4 + 16 + 4
        let whole = [0, 135, 161];
        for n in 0..p.0.len() {
            let r = decode_payload(&p.0[..n]);
            assert_eq!(r.is_ok(), whole.contains(&n), "prefix {n}: {r:?}");
        }
        assert!(decode_payload(&[9, 0, 0, 0, 0, 0]).is_err());
        assert!(decode_payload(&[0, 9, 0, 0, 0, 0]).is_err());
    }

    #[test]
    fn records_of_the_current_epoch_are_replayed_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, r, got) = replay_all(dir.path());
        assert_eq!((r.records, got.len()), (0, 0));
        wal.checkpoint().unwrap();
        for n in 1..=3 {
            wal.append(&payload(n)).unwrap();
        }
        drop(wal);
        let (_, r, got) = replay_all(dir.path());
        assert_eq!(r, Replay { records: 3, stopped: None });
        let firsts: Vec<u8> = got.iter().map(|e| e[0].key[0]).collect();
        assert_eq!(firsts, vec![1, 2, 3]);
    }

    #[test]
    fn a_checkpoint_retires_every_earlier_record() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _, _) = replay_all(dir.path());
        wal.checkpoint().unwrap();
        for n in 1..=5 {
            wal.append(&payload(n)).unwrap();
        }
        wal.checkpoint().unwrap();
        wal.append(&payload(9)).unwrap();
        drop(wal);
        // records 2..5 of the old epoch still sit after the new one: not replayed
        let (mut wal, r, got) = replay_all(dir.path());
        assert_eq!(r, Replay { records: 1, stopped: None });
        assert_eq!(got[0][0].key[0], 9);
        wal.checkpoint().unwrap();
        drop(wal);
        let (_, r, _) = replay_all(dir.path());
        assert_eq!(r.records, 0);
    }

    #[test]
    fn a_torn_or_damaged_record_ends_the_replay_there() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _, _) = replay_all(dir.path());
        wal.checkpoint().unwrap();
        for n in 1..=3 {
            wal.append(&payload(n)).unwrap();
        }
        let second = HEADER_LEN + (RECORD_HEADER_LEN + payload(1).0.len()) as u64;
        drop(wal);
        let path = dir.path().join(FILE_NAME);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[second as usize + RECORD_HEADER_LEN + 10] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let (_, r, got) = replay_all(dir.path());
        assert_eq!(r.records, 1);
        assert_eq!(got.len(), 1);
        assert!(r.stopped.unwrap().contains("checksum"));

        // a length running past the end of the file
        bytes[second as usize + RECORD_HEADER_LEN + 10] ^= 0xff;
        bytes.truncate(second as usize + 40);
        std::fs::write(&path, &bytes).unwrap();
        let (_, r, _) = replay_all(dir.path());
        assert_eq!(r.records, 1);
        assert!(r.stopped.unwrap().contains("torn"));
    }

    #[test]
    fn garbage_headers_replay_nothing_and_unknown_versions_refuse_to_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        std::fs::write(&path, b"not a log at all, but long enough for a header....").unwrap();
        let (mut wal, r, got) = replay_all(dir.path());
        assert!(got.is_empty());
        assert!(r.stopped.unwrap().contains("damaged header"));
        wal.checkpoint().unwrap();
        wal.append(&payload(1)).unwrap();
        drop(wal);
        assert_eq!(replay_all(dir.path()).1.records, 1);

        let mut h = header(5);
        h[8..12].copy_from_slice(&2u32.to_le_bytes());
        let sum = blake3::hash(&h[..24]);
        h[24..32].copy_from_slice(&sum.as_bytes()[..8]);
        std::fs::write(&path, h).unwrap();
        let err = Wal::open(dir.path(), |_| Ok(())).err().unwrap();
        assert!(err.to_string().contains("version 2"), "{err}");
        // and the file is untouched
        assert_eq!(std::fs::read(&path).unwrap(), h);
    }

    #[test]
    fn the_file_grows_for_big_records_and_shrinks_back_at_a_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _, _) = replay_all(dir.path());
        wal.checkpoint().unwrap();
        let mut big = Payload::default();
        big.put(Tree::Data, b"k", Some(&vec![1u8; 40 << 20]));
        wal.append(&big).unwrap();
        let len = std::fs::metadata(dir.path().join(FILE_NAME)).unwrap().len();
        assert!(len > 40 << 20);
        wal.checkpoint().unwrap();
        let len = std::fs::metadata(dir.path().join(FILE_NAME)).unwrap().len();
        assert_eq!(len, CHECKPOINT_BYTES);
        wal.append(&payload(2)).unwrap();
        drop(wal);
        assert_eq!(replay_all(dir.path()).1.records, 1);
    }
}
