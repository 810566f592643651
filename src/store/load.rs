//! Loading a document: verify every chunk, quarantine what is bad, load the rest.
//!
//! A document is one prefix scan of the `data` tree. Each value's blake3 checksum is checked,
//! then its payload is checked to really be Automerge (see `validate`), then applied: the
//! snapshot with a strict load, then the incremental chunks, in write order, in as few
//! `load_incremental` calls as possible: one per 8 MiB of payload (changes whose dependencies
//! are missing are queued by Automerge, which is fine).
//!
//! Why few calls: in automerge 0.12 every `load_incremental` whose changes touch a text walks
//! that text's ops (`../shared/NOTES.md` section 2), 25 ms per call on a 100k-character note
//! however few changes it carries. A note with 40 stored chunks would pay that 40 times. The
//! scan streams: only the group being gathered is held in memory. Each chunk is validated on
//! its own first, so a group cannot meet a chunk that does not parse; if Automerge refuses a
//! group anyway (a change it will not apply), the load starts over chunk by chunk to name the
//! culprit.
//!
//! A chunk that fails is reported as a [`CorruptChunk`], logged with `tracing::warn!` naming the
//! document and key, and moved (bytes untouched, same key) to the `quarantine` tree in one
//! transaction, so it is kept for inspection but no later load sees it. The document is loaded
//! from what remains.

use std::collections::HashMap;

use automerge::Automerge;
use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};

use super::checksum::{self, FrameError};
use super::error::{CorruptChunk, CorruptReason};
use super::keys::{hex, parse_key, ChunkKind, ParsedKey};
use super::sizes::DocSizes;
use super::validate::{load_strict, validate};
use super::StoreError;
use crate::id::{DocumentId, StorageId};

/// A document as read from the store.
#[derive(Debug)]
pub struct LoadedDoc {
    /// The snapshot, then incremental chunks in write order.
    pub doc: Automerge,
    /// Chunks applied.
    pub chunks: usize,
    /// Payload bytes applied.
    pub bytes: u64,
    /// Chunks that were quarantined during this load.
    pub corrupt: Vec<CorruptChunk>,
    pub sync_states: HashMap<StorageId, Vec<u8>>,
}

pub(crate) struct Loaded {
    pub doc: LoadedDoc,
    pub sizes: DocSizes,
}

pub(crate) fn load(
    data: &sled::Tree,
    docs: &sled::Tree,
    quarantine: &sled::Tree,
    id: &DocumentId,
) -> Result<Option<Loaded>, StoreError> {
    let mut pass = read(data, id, Some(BATCH_BYTES))?;
    if pass.refused {
        // Automerge refused a group, which may have been applied in part: start over chunk by
        // chunk, to name the culprit.
        pass = read(data, id, None)?;
    }
    if !pass.seen_any && !docs.contains_key(id.as_bytes())? {
        return Ok(None);
    }
    for c in &pass.out.corrupt {
        tracing::warn!(doc = %c.doc, chunk = %hex(&c.key), reason = ?c.reason, "corrupt chunk: moving it to quarantine");
    }
    quarantine_chunks(data, quarantine, &pass.out.corrupt)?;
    Ok(Some(Loaded {
        doc: pass.out,
        sizes: pass.sizes,
    }))
}

/// Most payload bytes given to one `load_incremental` call (more only for a lone larger
/// chunk): bounds the copy the grouping makes.
const BATCH_BYTES: usize = 8 * 1024 * 1024;

/// One scan of a document's keys.
struct Pass {
    out: LoadedDoc,
    sizes: DocSizes,
    seen_any: bool,
    /// Automerge refused a group of chunks; the pass stopped there.
    refused: bool,
}

/// Valid incremental chunks waiting to be applied together.
#[derive(Default)]
struct Group {
    bytes: Vec<u8>,
    chunks: Vec<(ChunkKind, u64)>,
}

impl Pass {
    fn count(&mut self, kind: ChunkKind, len: u64) {
        self.out.chunks += 1;
        self.out.bytes += len;
        match kind {
            ChunkKind::Snapshot => self.sizes.snapshot_bytes += len,
            ChunkKind::Incremental => {
                self.sizes.incremental_bytes += len;
                self.sizes.incremental_chunks += 1;
            }
        }
    }

    /// Applies the group in one call; `false` if Automerge refused it.
    fn apply(&mut self, group: &mut Group) -> bool {
        if group.chunks.is_empty() {
            return true;
        }
        if self.out.doc.load_incremental(&group.bytes).is_err() {
            return false;
        }
        for (kind, len) in group.chunks.drain(..) {
            self.count(kind, len);
        }
        group.bytes.clear();
        true
    }
}

/// Scans the document once, streaming: checksums, then the first snapshot with a strict load,
/// then every other chunk validated on its own and applied in groups of up to `batch` bytes
/// (`None`: one chunk per call, naming any chunk Automerge refuses as corrupt).
fn read(data: &sled::Tree, id: &DocumentId, batch: Option<usize>) -> Result<Pass, StoreError> {
    let mut p = Pass {
        out: LoadedDoc {
            doc: Automerge::new(),
            chunks: 0,
            bytes: 0,
            corrupt: Vec::new(),
            sync_states: HashMap::new(),
        },
        sizes: DocSizes::default(),
        seen_any: false,
        refused: false,
    };
    let mut group = Group::default();
    for item in data.scan_prefix(id.as_bytes()) {
        let (key, value) = item?;
        p.seen_any = true;
        let Some(parsed) = parse_key(&key) else {
            tracing::warn!(doc = %id, key = %hex(&key), "skipping a key that does not fit the layout");
            continue;
        };
        let payload = match checksum::open(&value) {
            Ok(payload) => payload,
            Err(e) => {
                let reason = match e {
                    FrameError::TooShort(len) => CorruptReason::Truncated { len },
                    FrameError::Mismatch => CorruptReason::ChecksumMismatch,
                };
                p.out.corrupt.push(corrupt(id, &key, reason));
                continue;
            }
        };
        let kind = match parsed {
            ParsedKey::SyncState { storage_id, .. } => {
                p.out.sync_states.insert(storage_id, payload.to_vec());
                continue;
            }
            ParsedKey::Chunk { kind, .. } => kind,
        };
        let len = payload.len() as u64;
        if kind == ChunkKind::Snapshot && p.out.doc.is_empty() && group.chunks.is_empty() {
            // the common case: the real load is strict, no separate validation needed
            match load_strict(payload) {
                Ok(doc) => {
                    p.out.doc = doc;
                    p.count(kind, len);
                }
                Err(e) => p.out.corrupt.push(not_automerge(id, &key, e.to_string())),
            }
            continue;
        }
        if let Err(msg) = validate(payload) {
            p.out.corrupt.push(not_automerge(id, &key, msg));
            continue;
        }
        let Some(max) = batch else {
            match p.out.doc.load_incremental(payload) {
                Ok(_) => p.count(kind, len),
                Err(e) => p.out.corrupt.push(not_automerge(id, &key, e.to_string())),
            }
            continue;
        };
        if !group.bytes.is_empty()
            && group.bytes.len() + payload.len() > max
            && !p.apply(&mut group)
        {
            p.refused = true;
            return Ok(p);
        }
        group.bytes.extend_from_slice(payload);
        group.chunks.push((kind, len));
    }
    if !p.apply(&mut group) {
        p.refused = true;
    }
    Ok(p)
}

fn corrupt(id: &DocumentId, key: &[u8], reason: CorruptReason) -> CorruptChunk {
    CorruptChunk {
        doc: *id,
        key: key.to_vec(),
        reason,
    }
}

fn not_automerge(id: &DocumentId, key: &[u8], msg: String) -> CorruptChunk {
    corrupt(id, key, CorruptReason::NotAutomerge(msg))
}

fn quarantine_chunks(
    data: &sled::Tree,
    quarantine: &sled::Tree,
    corrupt: &[CorruptChunk],
) -> Result<(), StoreError> {
    if corrupt.is_empty() {
        return Ok(());
    }
    (data, quarantine)
        .transaction(|(d, q)| {
            for c in corrupt {
                if let Some(v) = d.remove(c.key.as_slice())? {
                    q.insert(c.key.as_slice(), v)?;
                }
            }
            Ok::<(), ConflictableTransactionError<()>>(())
        })
        .map_err(|e: TransactionError<()>| match e {
            TransactionError::Storage(e) => StoreError::Sled(e),
            TransactionError::Abort(()) => {
                StoreError::Sled(sled::Error::Unsupported("transaction aborted".into()))
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::keys::chunk_key;
    use automerge::{transaction::Transactable, AutoCommit, ReadDoc, ROOT};

    #[test]
    fn groups_of_any_size_load_the_same_document() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let data = db.open_tree("data").unwrap();
        let id = DocumentId::from_bytes([7; 16]);
        let mut d = AutoCommit::new();
        let mut one_chunk = 0;
        for i in 0..40 {
            d.put(ROOT, format!("k{i}"), i as i64).unwrap();
            let payload = d.save_incremental();
            one_chunk = payload.len();
            let key = chunk_key(&id, ChunkKind::Incremental, i);
            data.insert(key, checksum::seal(&payload)).unwrap();
        }
        // one group, several groups, one chunk per group, and chunk by chunk
        for batch in [Some(usize::MAX), Some(one_chunk * 7), Some(1), None] {
            let p = read(&data, &id, batch).unwrap();
            assert!(!p.refused && p.out.corrupt.is_empty(), "{batch:?}");
            assert_eq!(p.out.chunks, 40, "{batch:?}");
            assert_eq!(p.sizes.incremental_chunks, 40, "{batch:?}");
            assert_eq!(p.out.doc.get_heads(), d.get_heads(), "{batch:?}");
            assert_eq!(p.out.doc.length(ROOT), 40);
        }
    }
}
