//! Loading a document: verify every chunk, quarantine what is bad, load the rest.
//!
//! A document is one prefix scan of the `data` tree. Each value's blake3 checksum is checked,
//! then its payload is checked to really be Automerge (see `validate`), then applied: the
//! snapshot with a strict load, incremental chunks in write order with `load_incremental`
//! (changes whose dependencies are missing are queued by Automerge, which is fine).
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
    let mut out = LoadedDoc {
        doc: Automerge::new(),
        chunks: 0,
        bytes: 0,
        corrupt: Vec::new(),
        sync_states: HashMap::new(),
    };
    let mut sizes = DocSizes::default();
    let mut seen_any = false;

    for item in data.scan_prefix(id.as_bytes()) {
        let (key, value) = item?;
        seen_any = true;
        let Some(parsed) = parse_key(&key) else {
            tracing::warn!(doc = %id, key = %hex(&key), "skipping a key that does not fit the layout");
            continue;
        };
        let payload = match checksum::open(&value) {
            Ok(p) => p,
            Err(e) => {
                let reason = match e {
                    FrameError::TooShort(len) => CorruptReason::Truncated { len },
                    FrameError::Mismatch => CorruptReason::ChecksumMismatch,
                };
                out.corrupt.push(CorruptChunk {
                    doc: *id,
                    key: key.to_vec(),
                    reason,
                });
                continue;
            }
        };
        match parsed {
            ParsedKey::SyncState { storage_id, .. } => {
                out.sync_states.insert(storage_id, payload.to_vec());
            }
            ParsedKey::Chunk { kind, .. } => match apply(&mut out.doc, kind, payload) {
                Ok(()) => {
                    out.chunks += 1;
                    out.bytes += payload.len() as u64;
                    match kind {
                        ChunkKind::Snapshot => sizes.snapshot_bytes += payload.len() as u64,
                        ChunkKind::Incremental => {
                            sizes.incremental_bytes += payload.len() as u64;
                            sizes.incremental_chunks += 1;
                        }
                    }
                }
                Err(msg) => out.corrupt.push(CorruptChunk {
                    doc: *id,
                    key: key.to_vec(),
                    reason: CorruptReason::NotAutomerge(msg),
                }),
            },
        }
    }

    if !seen_any && !docs.contains_key(id.as_bytes())? {
        return Ok(None);
    }
    for c in &out.corrupt {
        tracing::warn!(doc = %c.doc, chunk = %hex(&c.key), reason = ?c.reason, "corrupt chunk: moving it to quarantine");
    }
    quarantine_chunks(data, quarantine, &out.corrupt)?;
    Ok(Some(Loaded { doc: out, sizes }))
}

fn apply(doc: &mut Automerge, kind: ChunkKind, payload: &[u8]) -> Result<(), String> {
    if kind == ChunkKind::Snapshot && doc.is_empty() {
        // the common case: the real load is strict, no separate validation needed
        *doc = load_strict(payload).map_err(|e| e.to_string())?;
        return Ok(());
    }
    validate(payload)?;
    doc.load_incremental(payload)
        .map(|_| ())
        .map_err(|e| e.to_string())
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
