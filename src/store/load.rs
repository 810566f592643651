//! Loading a document: verify every chunk, quarantine what is bad, load the rest.
//!
//! A document is one prefix scan of the `data` tree. Each value's blake3 checksum is checked,
//! then its payload is checked to really be Automerge (see `validate`), then applied: the
//! snapshot with a strict load, then every incremental chunk, in write order, in **one**
//! `load_incremental` call (changes whose dependencies are missing are queued by Automerge,
//! which is fine).
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
    let built = build(id, &chunks);
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

/// Applies the chunks: the first snapshot (snapshots sort first) with a strict load, then every
/// other valid chunk in one `load_incremental`; if that call fails, starts over chunk by chunk.
fn build(id: &DocumentId, chunks: &[Stored]) -> Built {
    let (mut out, rest) = prepare(id, chunks);
    let ok = match rest.as_slice() {
        [] => true,
        [i] => out.doc.load_incremental(chunks[*i].payload()).is_ok(),
        many => {
            let len = many.iter().map(|&i| chunks[i].payload.len()).sum();
            let mut all = Vec::with_capacity(len);
            for &i in many {
                all.extend_from_slice(chunks[i].payload());
            }
            out.doc.load_incremental(&all).is_ok()
        }
    };
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
