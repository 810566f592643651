//! Loading a document: verify every chunk, quarantine what is bad, load the rest.
//!
//! A document is one prefix scan of the `data` tree. Each value's blake3 checksum is checked,
//! then its payload is checked to really be Automerge (see `validate`), then applied: the
//! snapshot with a strict load, then the incremental chunks, in write order, in as few
//! `load_incremental` calls as possible: one per 8 MiB of payload (changes whose dependencies
//! are missing are queued by Automerge, which is fine).
//!
//! Why one call: in automerge 0.12 every `load_incremental` whose changes touch a text walks
//! that text's ops (`../shared/NOTES.md` section 2), 25 ms per call on a 100k-character note
//! however few changes it carries. A note with 40 stored chunks would pay that 40 times. Each
//! chunk is validated on its own first, so the batched call cannot meet a chunk that does not
//! parse; if it fails anyway (a change Automerge refuses to apply), the load starts over chunk
//! by chunk to name the culprit.
//!
//! A chunk that fails is reported as a [`CorruptChunk`], logged with `tracing::warn!` naming the
//! document and key, and moved (bytes untouched, same key) to the `quarantine` tree in one
//! transaction, so it is kept for inspection but no later load sees it. The document is loaded
//! from what remains.

use std::collections::HashMap;
use std::ops::Range;

use automerge::Automerge;
use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};
use sled::IVec;

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

/// A chunk whose checksum held: its key, kind, value, and where the payload sits in the value.
struct Stored {
    key: IVec,
    kind: ChunkKind,
    value: IVec,
    payload: Range<usize>,
}

impl Stored {
    fn payload(&self) -> &[u8] {
        &self.value[self.payload.clone()]
    }
}

pub(crate) fn load(
    data: &sled::Tree,
    docs: &sled::Tree,
    quarantine: &sled::Tree,
    id: &DocumentId,
) -> Result<Option<Loaded>, StoreError> {
    let mut sync_states = HashMap::new();
    let mut corrupt = Vec::new();
    let mut chunks = Vec::new();
    let mut seen_any = false;

    for item in data.scan_prefix(id.as_bytes()) {
        let (key, value) = item?;
        seen_any = true;
        let Some(parsed) = parse_key(&key) else {
            tracing::warn!(doc = %id, key = %hex(&key), "skipping a key that does not fit the layout");
            continue;
        };
        let payload = match checksum::open(&value) {
            Ok(p) => p.len(),
            Err(e) => {
                let reason = match e {
                    FrameError::TooShort(len) => CorruptReason::Truncated { len },
                    FrameError::Mismatch => CorruptReason::ChecksumMismatch,
                };
                corrupt.push(CorruptChunk {
                    doc: *id,
                    key: key.to_vec(),
                    reason,
                });
                continue;
            }
        };
        let payload = value.len() - payload..value.len();
        match parsed {
            ParsedKey::SyncState { storage_id, .. } => {
                sync_states.insert(storage_id, value[payload].to_vec());
            }
            ParsedKey::Chunk { kind, .. } => chunks.push(Stored {
                key,
                kind,
                value,
                payload,
            }),
        }
    }

    if !seen_any && !docs.contains_key(id.as_bytes())? {
        return Ok(None);
    }
    let built = build(id, &chunks, BATCH_BYTES);
    corrupt.extend(built.corrupt);
    for c in &corrupt {
        tracing::warn!(doc = %c.doc, chunk = %hex(&c.key), reason = ?c.reason, "corrupt chunk: moving it to quarantine");
    }
    quarantine_chunks(data, quarantine, &corrupt)?;
    let mut sizes = DocSizes::default();
    let mut bytes = 0;
    for &i in &built.applied {
        let c = &chunks[i];
        let len = c.payload.len() as u64;
        bytes += len;
        match c.kind {
            ChunkKind::Snapshot => sizes.snapshot_bytes += len,
            ChunkKind::Incremental => {
                sizes.incremental_bytes += len;
                sizes.incremental_chunks += 1;
            }
        }
    }
    Ok(Some(Loaded {
        doc: LoadedDoc {
            doc: built.doc,
            chunks: built.applied.len(),
            bytes,
            corrupt,
            sync_states,
        },
        sizes,
    }))
}

struct Built {
    doc: Automerge,
    /// Indices into the chunk list.
    applied: Vec<usize>,
    corrupt: Vec<CorruptChunk>,
}

/// Applies the chunks: the first snapshot (snapshots sort first) with a strict load, then the
/// other valid chunks in as few `load_incremental` calls as `batch_bytes` per call allows; if a
/// call fails, starts over chunk by chunk.
fn build(id: &DocumentId, chunks: &[Stored], batch_bytes: usize) -> Built {
    let (mut out, rest) = prepare(id, chunks);
    let mut ok = true;
    // Groups of at most BATCH_BYTES (a lone larger chunk is a group of its own), so the copy
    // stays bounded while a note pays one apply per group instead of one per chunk.
    let mut group: Vec<u8> = Vec::new();
    for (n, &i) in rest.iter().enumerate() {
        group.extend_from_slice(chunks[i].payload());
        let full = match rest.get(n + 1) {
            None => true,
            Some(&j) => group.len() + chunks[j].payload.len() > batch_bytes,
        };
        if full {
            if out.doc.load_incremental(&group).is_err() {
                ok = false;
                break;
            }
            group.clear();
        }
    }
    if ok {
        out.applied.extend(rest);
        return out;
    }
    // The failed call may have applied part of its input: start from scratch.
    let (mut out, rest) = prepare(id, chunks);
    for i in rest {
        match out.doc.load_incremental(chunks[i].payload()) {
            Ok(_) => out.applied.push(i),
            Err(e) => out.corrupt.push(corrupt(id, &chunks[i], e.to_string())),
        }
    }
    out
}

/// Most payload bytes given to one `load_incremental` call (more only for a lone larger chunk):
/// bounds the copy the grouping makes.
const BATCH_BYTES: usize = 8 * 1024 * 1024;

/// Loads the first snapshot and validates everything else; returns the valid rest, unapplied.
fn prepare(id: &DocumentId, chunks: &[Stored]) -> (Built, Vec<usize>) {
    let mut out = Built {
        doc: Automerge::new(),
        applied: Vec::new(),
        corrupt: Vec::new(),
    };
    let mut rest = Vec::new();
    for (i, c) in chunks.iter().enumerate() {
        if c.kind == ChunkKind::Snapshot && out.doc.is_empty() && rest.is_empty() {
            // the common case: the real load is strict, no separate validation needed
            match load_strict(c.payload()) {
                Ok(doc) => {
                    out.doc = doc;
                    out.applied.push(i);
                }
                Err(e) => out.corrupt.push(corrupt(id, c, e.to_string())),
            }
            continue;
        }
        match validate(c.payload()) {
            Ok(()) => rest.push(i),
            Err(msg) => out.corrupt.push(corrupt(id, c, msg)),
        }
    }
    (out, rest)
}

fn corrupt(id: &DocumentId, c: &Stored, msg: String) -> CorruptChunk {
    CorruptChunk {
        doc: *id,
        key: c.key.to_vec(),
        reason: CorruptReason::NotAutomerge(msg),
    }
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
    use automerge::{transaction::Transactable, AutoCommit, ReadDoc, ROOT};

    fn stored(seq: u64, payload: &[u8]) -> Stored {
        let doc = DocumentId::from_bytes([7; 16]);
        let value = IVec::from(checksum::seal(payload));
        Stored {
            key: IVec::from(super::super::keys::chunk_key(
                &doc,
                ChunkKind::Incremental,
                seq,
            )),
            kind: ChunkKind::Incremental,
            payload: checksum::CHECKSUM_LEN..value.len(),
            value,
        }
    }

    #[test]
    fn groups_of_any_size_load_the_same_document() {
        let mut d = AutoCommit::new();
        let chunks: Vec<Stored> = (0..40)
            .map(|i| {
                d.put(ROOT, format!("k{i}"), i as i64).unwrap();
                stored(i, &d.save_incremental())
            })
            .collect();
        let id = DocumentId::from_bytes([7; 16]);
        let one_chunk = chunks[0].payload.len();
        // one group, several groups, one chunk per group
        for batch in [usize::MAX, one_chunk * 7, 1] {
            let built = build(&id, &chunks, batch);
            assert!(built.corrupt.is_empty());
            assert_eq!(built.applied.len(), 40, "batch {batch}");
            assert_eq!(built.doc.get_heads(), d.get_heads(), "batch {batch}");
            assert_eq!(built.doc.length(ROOT), 40);
        }
    }
}
