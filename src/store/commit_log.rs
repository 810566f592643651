//! The commit log: how a batch becomes durable without flushing sled.
//!
//! # Why
//!
//! Making a batch durable through sled costs its `flush()` (the IO buffer handed to a sled IO
//! thread, `pwrite`, `sync_file_range(WAIT_AFTER)`, a wake-up back) and then our `fdatasync`
//! of the database file (see `durability`): two trips to the disk and two thread hops, 300-450
//! us per batch on the machine the store bench runs on (row 2). Appending the batch to a file
//! of our own and syncing it is one `pwrite` and one `fdatasync`: 60-90 us there. So the
//! writer appends a batch's key changes to this log and syncs it, then applies them to sled's
//! trees (in memory: readers see them at once, and sled writes them out on its own schedule),
//! and only then acknowledges the batch.
//!
//! # Checkpoints
//!
//! When a record does not fit in what is left of the log's area, the writer takes a
//! checkpoint: sled is made durable the old way (flush, `fdatasync`, blob fsyncs), so every
//! batch applied so far is in sled, and the log starts over. A clean close takes one too. At
//! open, the records written since the last checkpoint are applied to sled again, and a
//! checkpoint follows.
//!
//! # Why replaying is right
//!
//! A record is the batch's key changes as absolute writes: put this value under this key,
//! remove this key. After a crash sled holds everything up to the last checkpoint, and maybe
//! some later batches (it writes its log on its own schedule, in any state). Replaying every
//! record since the checkpoint, in order, leaves each key it mentions with the last value the
//! log gave it, which is the value it had after the last acknowledged batch; a key the log does
//! not mention was last written before the checkpoint. A batch reaches sled only after its
//! record is synced, so sled never holds what the log lacks, and a batch sled got only part of
//! (the writer applies a logged batch key by key) is made whole by the replay.
//!
//! # The file `<dir>/sheaf-commit-log`
//!
//! - Two header slots, at offsets 0 and [`SLOT_B`]: `SHEAFLOG`, a version (u32 LE), `start`
//!   (u64 LE, the sequence number of the first record after the checkpoint) and the first 16
//!   bytes of blake3 of the slot's first 20 bytes. The valid slot with the larger `start`
//!   counts. A checkpoint writes the other slot and syncs it before any record of the new
//!   generation is written, so a torn header write leaves the older slot, whose records are
//!   then still intact: replaying them again is harmless.
//! - Records from offset [`RECORDS`]: `len` (u32 LE), `seq` (u64 LE), 16 bytes of blake3 of
//!   `len`, `seq` and the payload, then the payload ([`encode`]). A new generation overwrites
//!   the old one from the start of the area; sequence numbers only grow, so a scan stops at the
//!   first record that is not the next one expected (an older generation's, or a torn write).
//! - A record that fails its checksum while the next record is intact was acknowledged and is
//!   now damaged: that is reported ([`StoreError::CommitLog`]), not skipped.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::StoreError;

/// The log's file name in the store directory.
pub(crate) const FILE_NAME: &str = "sheaf-commit-log";
const MAGIC: &[u8; 8] = b"SHEAFLOG";
const VERSION: u32 = 1;
/// Offset of the second header slot (a sector apart from the first).
pub(crate) const SLOT_B: u64 = 512;
/// Offset of the first record.
pub(crate) const RECORDS: u64 = 4096;
const SLOT_LEN: usize = 36;
/// `len`, `seq`, checksum.
pub(crate) const RECORD_HEADER: usize = 4 + 8 + 16;

/// A batch's key changes: `data` keys put (`Some`) or removed (`None`), document ids listed
/// (`true`) or removed (`false`) in the `docs` index.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct KeyWrites {
    pub data: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    pub docs: BTreeMap<[u8; 16], bool>,
}

impl KeyWrites {
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.data.is_empty() && self.docs.is_empty()
    }

    /// `later` applied on top of `self`.
    pub fn merge(&mut self, later: KeyWrites) {
        self.data.extend(later.data);
        self.docs.extend(later.docs);
    }
}

/// A record's payload: `[n u32][key_len u32, key, 0 | 1 val_len u32 val]*n [m u32][id 16,
/// 0 | 1]*m`, integers little-endian.
pub(crate) fn encode(
    data: &BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    docs: &BTreeMap<[u8; 16], bool>,
) -> Vec<u8> {
    let size: usize = data
        .iter()
        .map(|(k, v)| 9 + k.len() + v.as_ref().map_or(0, |v| 4 + v.len()))
        .sum::<usize>()
        + 8
        + docs.len() * 17;
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    for (k, v) in data {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(k);
        match v {
            Some(v) => {
                out.push(1);
                out.extend_from_slice(&(v.len() as u32).to_le_bytes());
                out.extend_from_slice(v);
            }
            None => out.push(0),
        }
    }
    out.extend_from_slice(&(docs.len() as u32).to_le_bytes());
    for (id, listed) in docs {
        out.extend_from_slice(id);
        out.push(u8::from(*listed));
    }
    out
}

/// Why a payload did not decode (its checksum matched, so this is a bug or a foreign file).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    #[error("payload ends inside a field at byte {0}")]
    Truncated(usize),
    #[error("unknown tag {tag} at byte {at}")]
    BadTag { tag: u8, at: usize },
    #[error("{0} bytes left over after the last field")]
    Trailing(usize),
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], PayloadError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|e| *e <= self.bytes.len())
            .ok_or(PayloadError::Truncated(self.at))?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u32(&mut self) -> Result<usize, PayloadError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    }
    fn flag(&mut self) -> Result<bool, PayloadError> {
        let at = self.at;
        match self.take(1)?[0] {
            0 => Ok(false),
            1 => Ok(true),
            tag => Err(PayloadError::BadTag { tag, at }),
        }
    }
}

/// The inverse of [`encode`]; total: any bytes give a value or an error.
pub(crate) fn decode(bytes: &[u8]) -> Result<KeyWrites, PayloadError> {
    let mut r = Reader { bytes, at: 0 };
    let mut out = KeyWrites::default();
    for _ in 0..r.u32()? {
        let len = r.u32()?;
        let key = r.take(len)?.to_vec();
        let value = if r.flag()? {
            let len = r.u32()?;
            Some(r.take(len)?.to_vec())
        } else {
            None
        };
        out.data.insert(key, value);
    }
    for _ in 0..r.u32()? {
        let id: [u8; 16] = r.take(16)?.try_into().expect("16 bytes taken");
        let listed = r.flag()?;
        out.docs.insert(id, listed);
    }
    match bytes.len() - r.at {
        0 => Ok(out),
        n => Err(PayloadError::Trailing(n)),
    }
}

fn check(len: u32, seq: u64, payload: &[u8]) -> [u8; 16] {
    let mut h = blake3::Hasher::new();
    h.update(&len.to_le_bytes());
    h.update(&seq.to_le_bytes());
    h.update(payload);
    h.finalize().as_bytes()[..16]
        .try_into()
        .expect("16 of 32 bytes")
}

fn slot_bytes(start: u64) -> [u8; SLOT_LEN] {
    let mut s = [0u8; SLOT_LEN];
    s[..8].copy_from_slice(MAGIC);
    s[8..12].copy_from_slice(&VERSION.to_le_bytes());
    s[12..20].copy_from_slice(&start.to_le_bytes());
    let sum = blake3::hash(&s[..20]);
    s[20..].copy_from_slice(&sum.as_bytes()[..16]);
    s
}

fn read_slot(file: &[u8], at: u64) -> Option<u64> {
    let at = usize::try_from(at).ok()?;
    let s = file.get(at..at + SLOT_LEN)?;
    let valid = &s[..8] == MAGIC
        && s[8..12] == VERSION.to_le_bytes()
        && s[20..] == blake3::hash(&s[..20]).as_bytes()[..16];
    valid.then(|| u64::from_le_bytes(s[12..20].try_into().expect("8 bytes")))
}

/// What a scan of the file found.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Scan {
    /// The header slot in use (0 or 1); `None` if neither is valid (a file whose first header
    /// never reached the disk: no record can have been acknowledged).
    pub slot: Option<u8>,
    /// Payloads of the records since the last checkpoint, in order.
    pub records: Vec<std::ops::Range<usize>>,
    /// The sequence number the next record gets.
    pub next_seq: u64,
}

/// Reads a whole log file. Stops at the first record that is not the next one expected (a
/// torn write or an older generation); fails only when an intact record follows a damaged one.
pub(crate) fn scan(file: &[u8]) -> Result<Scan, StoreError> {
    let (slot, start) = match (read_slot(file, 0), read_slot(file, SLOT_B)) {
        (None, None) => return Ok(Scan::default()),
        (Some(a), Some(b)) if b > a => (1, b),
        (Some(a), _) => (0, a),
        (None, Some(b)) => (1, b),
    };
    let mut out = Scan {
        slot: Some(slot),
        records: Vec::new(),
        next_seq: start,
    };
    let mut at = RECORDS as usize;
    loop {
        match record_at(file, at, out.next_seq) {
            Record::Valid(payload) => {
                at = payload.end;
                out.records.push(payload);
                out.next_seq += 1;
            }
            Record::End => return Ok(out),
            Record::Damaged { next } => {
                if matches!(record_at(file, next, out.next_seq + 1), Record::Valid(_)) {
                    return Err(StoreError::CommitLog {
                        offset: at as u64,
                        reason: format!(
                            "record {} fails its checksum but record {} after it is intact: \
                             an acknowledged batch is damaged",
                            out.next_seq,
                            out.next_seq + 1
                        ),
                    });
                }
                return Ok(out);
            }
        }
    }
}

enum Record {
    Valid(std::ops::Range<usize>),
    /// Not a record of this generation: the end of the log.
    End,
    /// Looks like record `seq` (its sequence number is right) but fails its checksum; `next`
    /// is where the record after it would start.
    Damaged {
        next: usize,
    },
}

fn record_at(file: &[u8], at: usize, seq: u64) -> Record {
    let Some(h) = file.get(at..at.saturating_add(RECORD_HEADER)) else {
        return Record::End;
    };
    let len = u32::from_le_bytes(h[..4].try_into().expect("4 bytes"));
    let got_seq = u64::from_le_bytes(h[4..12].try_into().expect("8 bytes"));
    if got_seq != seq {
        return Record::End;
    }
    let body = at + RECORD_HEADER;
    let next = body.saturating_add(len as usize);
    match file.get(body..next) {
        Some(payload) if check(len, seq, payload)[..] == h[12..] => Record::Valid(body..next),
        Some(_) => Record::Damaged { next },
        None => Record::End,
    }
}

/// The open log, owned by the writer thread.
pub(crate) struct CommitLog {
    file: File,
    /// Where the next record goes.
    pos: u64,
    next_seq: u64,
    /// The header slot in use.
    slot: u8,
    /// Bytes of records a generation may hold.
    capacity: u64,
    /// The file's length: the area up to here exists (zeros or old records).
    filled: u64,
}

/// The log grows by this much at a time, zero-filled (see [`CommitLog::append`]): enough to
/// make growing rare (a keystroke's record is 100-300 bytes), small enough that a nearly full
/// disk or a file size limit fails the batch that needs the room, not the first one.
const GROW: u64 = 64 * 1024;

/// What [`CommitLog::open`] found to replay.
pub(crate) struct Recovered {
    pub writes: KeyWrites,
    pub records: u64,
}

impl CommitLog {
    /// Opens (or creates) the log in `dir` and reads what it holds since the last checkpoint,
    /// merged into one set of key writes. The caller applies them, takes a checkpoint and then
    /// calls [`CommitLog::restart`] before appending.
    pub fn open(dir: &Path, capacity: u64) -> Result<(CommitLog, Recovered), StoreError> {
        let path = dir.join(FILE_NAME);
        let existed = path.exists();
        let mut file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| StoreError::io("opening the commit log", e))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(|e| StoreError::io("reading the commit log", e))?;
        let scan = scan(&bytes)?;
        let mut writes = KeyWrites::default();
        for r in &scan.records {
            let w = decode(&bytes[r.clone()]).map_err(|e| StoreError::CommitLog {
                offset: (r.start - RECORD_HEADER) as u64,
                reason: format!("a record with a valid checksum does not decode: {e}"),
            })?;
            writes.merge(w);
        }
        let mut log = CommitLog {
            file,
            pos: RECORDS,
            next_seq: scan.next_seq,
            // Neither slot valid: write slot 0 first (`restart` writes the other one).
            slot: scan.slot.unwrap_or(1),
            capacity,
            filled: bytes.len() as u64,
        };
        if !existed {
            // The first header, so that the file's entry and a valid slot are on disk.
            log.restart()?;
            if let Some(parent) = path.parent() {
                File::open(parent)
                    .and_then(|d| d.sync_all())
                    .map_err(|e| StoreError::io("syncing the store directory", e))?;
            }
        }
        let records = scan.records.len() as u64;
        Ok((log, Recovered { writes, records }))
    }

    /// Appends one record and syncs it. `Ok(false)` when it does not fit in what is left of
    /// this generation: take a checkpoint instead (nothing was written).
    pub fn append(&mut self, payload: &[u8]) -> Result<bool, StoreError> {
        let size = (RECORD_HEADER + payload.len()) as u64;
        let Ok(len) = u32::try_from(payload.len()) else {
            return Ok(false);
        };
        if self.pos - RECORDS + size > self.capacity {
            return Ok(false);
        }
        if self.pos + size > self.filled {
            // `fdatasync` of a write that grows the file also commits the new size to the
            // file system's journal: 90 us instead of 60 here. So grow it ahead, 64 KiB of
            // zeros at a time (`GROW`), and most records overwrite bytes that already exist.
            let to = (self.pos + size)
                .max(self.filled + GROW)
                .min(RECORDS + self.capacity);
            let zeros = vec![0u8; (to - self.filled) as usize];
            self.file
                .write_all_at(&zeros, self.filled)
                .map_err(|e| StoreError::io("growing the commit log", e))?;
            self.filled = to;
        }
        let mut rec = Vec::with_capacity(size as usize);
        rec.extend_from_slice(&len.to_le_bytes());
        rec.extend_from_slice(&self.next_seq.to_le_bytes());
        rec.extend_from_slice(&check(len, self.next_seq, payload));
        rec.extend_from_slice(payload);
        self.file
            .write_all_at(&rec, self.pos)
            .map_err(|e| StoreError::io("writing the commit log", e))?;
        self.file
            .sync_data()
            .map_err(|e| StoreError::io("fdatasync of the commit log", e))?;
        self.pos += size;
        self.next_seq += 1;
        Ok(true)
    }

    /// Starts a new generation; call only once everything logged so far is durable in sled.
    pub fn restart(&mut self) -> Result<(), StoreError> {
        let slot = 1 - self.slot;
        let at = if slot == 0 { 0 } else { SLOT_B };
        self.file
            .write_all_at(&slot_bytes(self.next_seq), at)
            .map_err(|e| StoreError::io("writing the commit log's header", e))?;
        self.filled = self.filled.max(at + SLOT_LEN as u64);
        self.file
            .sync_data()
            .map_err(|e| StoreError::io("fdatasync of the commit log", e))?;
        self.slot = slot;
        self.pos = RECORDS;
        Ok(())
    }

    /// After a checkpoint at a clean close: the records are no longer needed, so give their
    /// space back (the header stays; a crash in between leaves a log with nothing to replay).
    pub fn shrink(&mut self) -> Result<(), StoreError> {
        if self.pos != RECORDS {
            return Ok(());
        }
        self.file
            .set_len(RECORDS)
            .map_err(|e| StoreError::io("truncating the commit log", e))?;
        self.filled = RECORDS;
        Ok(())
    }

    /// Whether anything was logged since the last [`CommitLog::restart`].
    pub fn is_empty(&self) -> bool {
        self.pos == RECORDS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writes(n: u8) -> KeyWrites {
        let mut w = KeyWrites::default();
        w.data
            .insert(vec![n, 1, 2], Some(vec![n; (n as usize) * 7]));
        w.data.insert(vec![n, 9], None);
        w.docs.insert([n; 16], n.is_multiple_of(2));
        w
    }

    fn payload(n: u8) -> Vec<u8> {
        let w = writes(n);
        encode(&w.data, &w.docs)
    }

    /// A log file as bytes: header slot `start`, then records `start..` with the payloads.
    fn file_with(start: u64, payloads: &[Vec<u8>]) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = CommitLog::open(dir.path(), 1 << 20).unwrap();
        log.next_seq = start;
        log.restart().unwrap();
        for p in payloads {
            assert!(log.append(p).unwrap());
        }
        std::fs::read(dir.path().join(FILE_NAME)).unwrap()
    }

    #[test]
    fn payloads_round_trip_and_garbage_is_an_error() {
        let w = writes(3);
        assert_eq!(decode(&encode(&w.data, &w.docs)), Ok(w));
        let empty = KeyWrites::default();
        assert_eq!(decode(&encode(&empty.data, &empty.docs)), Ok(empty));
        let p = payload(4);
        for cut in 0..p.len() {
            assert!(decode(&p[..cut]).is_err(), "prefix of {cut} bytes");
        }
        let mut extra = p.clone();
        extra.push(0);
        assert_eq!(decode(&extra), Err(PayloadError::Trailing(1)));
        assert!(decode(&[255, 255, 255, 255]).is_err());
    }

    #[test]
    fn a_scan_returns_every_record_of_the_generation_in_order() {
        let f = file_with(7, &[payload(1), payload(2), payload(3)]);
        let s = scan(&f).unwrap();
        assert_eq!(s.next_seq, 10);
        let got: Vec<_> = s
            .records
            .iter()
            .map(|r| decode(&f[r.clone()]).unwrap())
            .collect();
        assert_eq!(got, vec![writes(1), writes(2), writes(3)]);
    }

    #[test]
    fn a_torn_last_record_ends_the_log() {
        let f = file_with(0, &[payload(1), payload(2)]);
        let full = scan(&f).unwrap();
        let last = full.records[1].clone();
        // cut anywhere inside the last record: the first one stays
        for cut in (last.start - RECORD_HEADER)..last.end {
            let s = scan(&f[..cut]).unwrap();
            assert_eq!(s.records.len(), 1, "cut at {cut}");
            assert_eq!(s.next_seq, 1);
        }
        // a torn write leaves garbage after the good bytes, not a short file
        let mut g = f.clone();
        g[last.end - 1] ^= 0xff;
        assert_eq!(scan(&g).unwrap().records.len(), 1);
    }

    #[test]
    fn a_damaged_record_followed_by_an_intact_one_is_reported() {
        let f = file_with(0, &[payload(1), payload(2), payload(3)]);
        let s = scan(&f).unwrap();
        let mut g = f.clone();
        g[s.records[1].start + 2] ^= 1;
        match scan(&g) {
            Err(StoreError::CommitLog { offset, .. }) => {
                assert_eq!(offset as usize, s.records[1].start - RECORD_HEADER)
            }
            other => panic!("expected a CommitLog error, got {other:?}"),
        }
    }

    #[test]
    fn a_new_generation_ignores_the_old_records_it_did_not_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, rec) = CommitLog::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(rec.records, 0);
        for n in 1..=3 {
            assert!(log.append(&payload(n)).unwrap());
        }
        log.restart().unwrap();
        // one short record over the first old one; the old second and third stay on disk
        let w = KeyWrites::default();
        assert!(log.append(&encode(&w.data, &w.docs)).unwrap());
        drop(log);
        let (_, rec) = CommitLog::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(rec.records, 1);
        assert!(rec.writes.is_empty());
    }

    #[test]
    fn a_torn_header_falls_back_to_the_previous_generation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let (mut log, _) = CommitLog::open(dir.path(), 1 << 20).unwrap();
        assert!(log.append(&payload(1)).unwrap());
        assert!(log.append(&payload(2)).unwrap());
        let slot = log.slot;
        log.restart().unwrap();
        drop(log);
        // the new header never made it: the two records are replayed again (harmless)
        let mut f = std::fs::read(&path).unwrap();
        let new_at = if slot == 0 { SLOT_B } else { 0 } as usize;
        f[new_at + 14] ^= 0x40;
        std::fs::write(&path, &f).unwrap();
        let (mut log, rec) = CommitLog::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(rec.records, 2);
        let mut both = writes(1);
        both.merge(writes(2));
        assert_eq!(rec.writes, both);
        // and the next generation continues the numbering
        assert_eq!(log.next_seq, 2);
        log.restart().unwrap();
        assert!(log.append(&payload(3)).unwrap());
        drop(log);
        let (_, rec) = CommitLog::open(dir.path(), 1 << 20).unwrap();
        assert_eq!((rec.records, rec.writes), (1, writes(3)));
    }

    #[test]
    fn a_record_that_does_not_fit_is_refused_unwritten() {
        let dir = tempfile::tempdir().unwrap();
        let p = payload(5);
        let cap = 2 * (RECORD_HEADER + p.len()) as u64;
        let (mut log, _) = CommitLog::open(dir.path(), cap).unwrap();
        assert!(log.append(&p).unwrap());
        assert!(log.append(&p).unwrap());
        assert!(!log.append(&p).unwrap());
        assert!(!log.is_empty());
        log.restart().unwrap();
        assert!(log.is_empty());
        assert!(log.append(&p).unwrap());
    }

    #[test]
    fn a_file_with_no_valid_header_holds_nothing() {
        assert_eq!(scan(&[]).unwrap(), Scan::default());
        assert_eq!(scan(&[7u8; 5000]).unwrap(), Scan::default());
    }

    proptest::proptest! {
        /// Any bytes scan to a result, never a panic, and every record a scan returns decodes
        /// or is reported.
        #[test]
        fn scanning_any_bytes_is_total(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..6000)) {
            if let Ok(s) = scan(&bytes) {
                for r in s.records {
                    let _ = decode(&bytes[r]);
                }
            }
        }

        /// Damage anywhere in a real log: the scan returns a prefix of the records written,
        /// each intact, or reports the damage.
        #[test]
        fn damage_yields_a_prefix_or_an_error(at in 0usize..4096 + 400, bit in 0u8..8) {
            let payloads: Vec<Vec<u8>> = (1..=4).map(payload).collect();
            let mut f = file_with(3, &payloads);
            if at < f.len() {
                f[at] ^= 1 << bit;
            }
            if let Ok(s) = scan(&f) {
                for (i, r) in s.records.iter().enumerate() {
                    proptest::prop_assert_eq!(&f[r.clone()], &payloads[i][..]);
                }
            }
        }
    }
}
