//! Key layout of the `data` tree.
//!
//! Everything that belongs to one document lives under its 16-byte id, so a document is one
//! prefix scan and a compaction or deletion touches one contiguous key range:
//!
//! ```text
//! [doc id: 16][KIND_SNAPSHOT    = 1][seq: 8, big-endian]   -> [blake3: 32][snapshot bytes]
//! [doc id: 16][KIND_INCREMENTAL = 2][seq: 8, big-endian]   -> [blake3: 32][change bytes]
//! [doc id: 16][KIND_SYNC_STATE  = 3][storage id, UTF-8]    -> [blake3: 32][sync state]
//! ```
//!
//! `seq` comes from sled's `generate_id()`, which is monotonic across restarts (sled skips a
//! reserved block after a crash), so big-endian keys sort in write order. Snapshots sort before
//! incrementals; a `Compact` removes every chunk written before it, so whatever incremental
//! chunks remain were written after the snapshot they follow.
//!
//! Keys are parsed with [`parse_key`], which never panics: a key that does not fit the layout is
//! reported as `None` and skipped by callers.

use crate::id::{DocumentId, StorageId};

pub(crate) const KIND_SNAPSHOT: u8 = 1;
pub(crate) const KIND_INCREMENTAL: u8 = 2;
pub(crate) const KIND_SYNC_STATE: u8 = 3;

/// Length of a chunk key: id, kind, sequence.
pub(crate) const CHUNK_KEY_LEN: usize = 16 + 1 + 8;

/// Which kind of chunk a key names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkKind {
    /// A full `Automerge::save()` written by a compaction.
    Snapshot,
    /// Change bytes appended since the last snapshot.
    Incremental,
}

impl ChunkKind {
    fn byte(self) -> u8 {
        match self {
            ChunkKind::Snapshot => KIND_SNAPSHOT,
            ChunkKind::Incremental => KIND_INCREMENTAL,
        }
    }
}

/// A key of the `data` tree, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ParsedKey {
    Chunk {
        doc: DocumentId,
        kind: ChunkKind,
        seq: u64,
    },
    SyncState {
        doc: DocumentId,
        storage_id: StorageId,
    },
}

pub(crate) fn chunk_key(doc: &DocumentId, kind: ChunkKind, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(CHUNK_KEY_LEN);
    k.extend_from_slice(doc.as_bytes());
    k.push(kind.byte());
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

pub(crate) fn sync_state_key(doc: &DocumentId, storage_id: &StorageId) -> Vec<u8> {
    let mut k = Vec::with_capacity(17 + storage_id.as_str().len());
    k.extend_from_slice(doc.as_bytes());
    k.push(KIND_SYNC_STATE);
    k.extend_from_slice(storage_id.as_str().as_bytes());
    k
}

/// The half-open key range holding a document's snapshot and incremental chunks (not its sync
/// states).
pub(crate) fn chunk_range(doc: &DocumentId) -> (Vec<u8>, Vec<u8>) {
    let mut start = doc.as_bytes().to_vec();
    start.push(KIND_SNAPSHOT);
    let mut end = doc.as_bytes().to_vec();
    end.push(KIND_SYNC_STATE);
    (start, end)
}

/// Decodes a `data` key; `None` for anything that does not fit the layout.
pub(crate) fn parse_key(key: &[u8]) -> Option<ParsedKey> {
    let (id, rest) = key.split_at_checked(16)?;
    let doc = DocumentId::try_from_slice(id).ok()?;
    let (&kind, rest) = rest.split_first()?;
    match kind {
        KIND_SNAPSHOT | KIND_INCREMENTAL => {
            let seq: [u8; 8] = rest.try_into().ok()?;
            let kind = if kind == KIND_SNAPSHOT {
                ChunkKind::Snapshot
            } else {
                ChunkKind::Incremental
            };
            Some(ParsedKey::Chunk {
                doc,
                kind,
                seq: u64::from_be_bytes(seq),
            })
        }
        KIND_SYNC_STATE => {
            let s = std::str::from_utf8(rest).ok()?;
            Some(ParsedKey::SyncState {
                doc,
                storage_id: StorageId::new(s),
            })
        }
        _ => None,
    }
}

/// A key as lowercase hex, for logs and error messages.
pub(crate) fn hex(key: &[u8]) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_keys_round_trip_and_sort_in_write_order() {
        let doc = DocumentId::from_bytes([4; 16]);
        let a = chunk_key(&doc, ChunkKind::Incremental, 255);
        let b = chunk_key(&doc, ChunkKind::Incremental, 256);
        assert!(a < b, "big-endian sequence must sort numerically");
        let s = chunk_key(&doc, ChunkKind::Snapshot, 1_000);
        assert!(s < a, "snapshots sort before incrementals");
        assert_eq!(
            parse_key(&b),
            Some(ParsedKey::Chunk {
                doc,
                kind: ChunkKind::Incremental,
                seq: 256
            })
        );
        let (start, end) = chunk_range(&doc);
        assert!(start <= s && b < end);
    }

    #[test]
    fn sync_keys_round_trip_and_stay_outside_the_chunk_range() {
        let doc = DocumentId::from_bytes([5; 16]);
        let sid = StorageId::new("abc-123");
        let k = sync_state_key(&doc, &sid);
        assert_eq!(
            parse_key(&k),
            Some(ParsedKey::SyncState {
                doc,
                storage_id: sid
            })
        );
        let (_, end) = chunk_range(&doc);
        assert!(k >= end);
    }

    #[test]
    fn malformed_keys_are_none() {
        assert_eq!(parse_key(&[]), None);
        assert_eq!(parse_key(&[1; 16]), None);
        let mut k = vec![1; 16];
        k.push(KIND_INCREMENTAL);
        k.extend_from_slice(&[0; 7]); // one byte short
        assert_eq!(parse_key(&k), None);
        let mut k = vec![1; 16];
        k.push(9);
        assert_eq!(parse_key(&k), None);
        let mut k = vec![1; 16];
        k.push(KIND_SYNC_STATE);
        k.push(0xff); // not UTF-8
        assert_eq!(parse_key(&k), None);
    }
}
