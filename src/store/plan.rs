//! Turning a group of [`WriteOp`]s into one atomic set of key changes.
//!
//! The writer applies every op of a group, in submission order, to an in-memory overlay of the
//! `data` and `docs` trees; the overlay is then committed as one sled transaction. Working on an
//! overlay is what lets a `Compact` or `DeleteDoc` also cover chunks appended earlier in the
//! same group, and lets consecutive appends to one document become one stored chunk.

use std::collections::{BTreeMap, HashMap};

use super::checksum::seal;
use super::config::StoreConfig;
use super::keys::{chunk_key, chunk_range, sync_state_key, ChunkKind};
use super::sizes::{Base, SizeEffect};
use super::StoreError;
use crate::id::{DocumentId, StorageId};

/// One change to the store. A `write` call's ops, and the ops of calls made after it, are
/// applied in submission order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOp {
    /// An incremental chunk: Automerge change bytes, several concatenated changes, or
    /// `save_after` output. Empty bytes are ignored.
    AppendChunk { doc: DocumentId, bytes: Vec<u8> },
    /// Atomically insert `snapshot` (a `doc.save()`) and remove every chunk of `doc` written
    /// before this op. The snapshot must cover those chunks.
    Compact { doc: DocumentId, snapshot: Vec<u8> },
    /// Persist the sync state for one peer's storage.
    PutSyncState {
        doc: DocumentId,
        storage_id: StorageId,
        bytes: Vec<u8>,
    },
    /// Remove the document's chunks, sync states and its entry in the docs index.
    DeleteDoc { doc: DocumentId },
}

impl WriteOp {
    pub(crate) fn payload_len(&self) -> usize {
        match self {
            WriteOp::AppendChunk { bytes, .. } | WriteOp::PutSyncState { bytes, .. } => bytes.len(),
            WriteOp::Compact { snapshot, .. } => snapshot.len(),
            WriteOp::DeleteDoc { .. } => 0,
        }
    }
}

/// What the plan needs to know about committed state.
pub(crate) trait Committed {
    fn doc_exists(&self, doc: &DocumentId) -> Result<bool, StoreError>;
    /// Keys of the document's chunks (`chunks_only`) or of everything it has.
    fn doc_keys(&self, doc: &DocumentId, chunks_only: bool) -> Result<Vec<Vec<u8>>, StoreError>;
    fn next_seq(&self) -> Result<u64, StoreError>;
}

struct OpenAppend {
    key: Vec<u8>,
    payload: Vec<u8>,
}

/// The overlay built from one group of ops.
#[derive(Default)]
pub(crate) struct Plan {
    /// `Some(value)` = insert, `None` = remove.
    pub data: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// `true` = listed, `false` = removed from the docs index.
    pub docs: BTreeMap<[u8; 16], bool>,
    pub sizes: HashMap<DocumentId, SizeEffect>,
    pub ops: u64,
    pub chunks: u64,
    pub bytes: u64,
    open: HashMap<DocumentId, OpenAppend>,
}

impl Plan {
    pub fn add(
        &mut self,
        op: WriteOp,
        committed: &impl Committed,
        config: &StoreConfig,
    ) -> Result<(), StoreError> {
        self.ops += 1;
        self.bytes += op.payload_len() as u64;
        match op {
            WriteOp::AppendChunk { doc, bytes } => {
                if bytes.is_empty() {
                    return Ok(());
                }
                let len = bytes.len() as u64;
                if let Some(open) = self.open.get_mut(&doc) {
                    if open.payload.len() + bytes.len() <= config.max_coalesced_chunk_bytes {
                        open.payload.extend_from_slice(&bytes);
                        self.sizes.entry(doc).or_default().append(len, false);
                        return Ok(());
                    }
                }
                self.close(&doc);
                if !self.exists(&doc, committed)? {
                    self.docs.insert(*doc.as_bytes(), true);
                    let e = self.sizes.entry(doc).or_default();
                    if e.base == Base::Keep {
                        e.reset(0);
                    }
                }
                let key = chunk_key(&doc, ChunkKind::Incremental, committed.next_seq()?);
                self.open.insert(
                    doc,
                    OpenAppend {
                        key,
                        payload: bytes,
                    },
                );
                self.sizes.entry(doc).or_default().append(len, true);
            }
            WriteOp::Compact { doc, snapshot } => {
                self.open.remove(&doc);
                self.remove_doc_keys(&doc, true, committed)?;
                let key = chunk_key(&doc, ChunkKind::Snapshot, committed.next_seq()?);
                self.sizes
                    .entry(doc)
                    .or_default()
                    .reset(snapshot.len() as u64);
                self.data.insert(key, Some(seal(&snapshot)));
                self.chunks += 1;
                self.docs.insert(*doc.as_bytes(), true);
            }
            WriteOp::PutSyncState {
                doc,
                storage_id,
                bytes,
            } => {
                self.data
                    .insert(sync_state_key(&doc, &storage_id), Some(seal(&bytes)));
            }
            WriteOp::DeleteDoc { doc } => {
                self.open.remove(&doc);
                self.remove_doc_keys(&doc, false, committed)?;
                self.docs.insert(*doc.as_bytes(), false);
                self.sizes.entry(doc).or_default().remove();
            }
        }
        Ok(())
    }

    /// Seals the appends still open. Call once, after the last `add`.
    pub fn finish(&mut self) {
        let docs: Vec<DocumentId> = self.open.keys().copied().collect();
        for doc in docs {
            self.close(&doc);
        }
    }

    fn close(&mut self, doc: &DocumentId) {
        if let Some(open) = self.open.remove(doc) {
            self.data.insert(open.key, Some(seal(&open.payload)));
            self.chunks += 1;
        }
    }

    fn exists(&self, doc: &DocumentId, committed: &impl Committed) -> Result<bool, StoreError> {
        match self.docs.get(doc.as_bytes()) {
            Some(&listed) => Ok(listed),
            None => committed.doc_exists(doc),
        }
    }

    fn remove_doc_keys(
        &mut self,
        doc: &DocumentId,
        chunks_only: bool,
        committed: &impl Committed,
    ) -> Result<(), StoreError> {
        let (start, end) = if chunks_only {
            chunk_range(doc)
        } else {
            let mut end = doc.as_bytes().to_vec();
            end.push(0xff);
            (doc.as_bytes().to_vec(), end)
        };
        let pending: Vec<Vec<u8>> = self
            .data
            .range(start..end)
            .map(|(k, _)| k.clone())
            .collect();
        for k in pending {
            self.data.insert(k, None);
        }
        for k in committed.doc_keys(doc, chunks_only)? {
            self.data.insert(k, None);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[derive(Default)]
    struct Fake {
        seq: Cell<u64>,
        existing: Vec<Vec<u8>>,
    }
    impl Committed for Fake {
        fn doc_exists(&self, _: &DocumentId) -> Result<bool, StoreError> {
            Ok(!self.existing.is_empty())
        }
        fn doc_keys(&self, _: &DocumentId, _: bool) -> Result<Vec<Vec<u8>>, StoreError> {
            Ok(self.existing.clone())
        }
        fn next_seq(&self) -> Result<u64, StoreError> {
            self.seq.set(self.seq.get() + 1);
            Ok(self.seq.get())
        }
    }

    fn append(doc: DocumentId, b: &[u8]) -> WriteOp {
        WriteOp::AppendChunk {
            doc,
            bytes: b.to_vec(),
        }
    }

    #[test]
    fn consecutive_appends_of_one_doc_coalesce() {
        let (a, b) = (
            DocumentId::from_bytes([1; 16]),
            DocumentId::from_bytes([2; 16]),
        );
        let fake = Fake::default();
        let cfg = StoreConfig::default();
        let mut p = Plan::default();
        for op in [
            append(a, b"1"),
            append(b, b"x"),
            append(a, b"2"),
            append(a, b"3"),
        ] {
            p.add(op, &fake, &cfg).unwrap();
        }
        p.finish();
        assert_eq!(p.ops, 4);
        assert_eq!(p.chunks, 2);
        let a_val = p
            .data
            .iter()
            .find(|(k, _)| k.starts_with(a.as_bytes()))
            .and_then(|(_, v)| v.clone())
            .unwrap();
        assert_eq!(super::super::checksum::open(&a_val).unwrap(), b"123");
        assert_eq!(p.docs.get(a.as_bytes()), Some(&true));
        assert_eq!(p.sizes[&a].add_chunks, 1);
        assert_eq!(p.sizes[&a].add_bytes, 3);
    }

    #[test]
    fn coalescing_respects_the_size_cap() {
        let a = DocumentId::from_bytes([1; 16]);
        let cfg = StoreConfig {
            max_coalesced_chunk_bytes: 4,
            ..Default::default()
        };
        let mut p = Plan::default();
        let fake = Fake::default();
        for _ in 0..3 {
            p.add(append(a, b"abc"), &fake, &cfg).unwrap();
        }
        p.finish();
        assert_eq!(p.chunks, 3);
    }

    #[test]
    fn compact_removes_committed_and_pending_chunks_of_that_doc() {
        let a = DocumentId::from_bytes([1; 16]);
        let old = chunk_key(&a, ChunkKind::Incremental, 100);
        let fake = Fake {
            existing: vec![old.clone()],
            ..Default::default()
        };
        let cfg = StoreConfig::default();
        let mut p = Plan::default();
        p.add(append(a, b"1"), &fake, &cfg).unwrap();
        p.add(
            WriteOp::Compact {
                doc: a,
                snapshot: b"snap".to_vec(),
            },
            &fake,
            &cfg,
        )
        .unwrap();
        p.add(append(a, b"2"), &fake, &cfg).unwrap();
        p.finish();
        let inserts: Vec<_> = p.data.iter().filter(|(_, v)| v.is_some()).collect();
        assert_eq!(inserts.len(), 2, "snapshot and the append after it");
        assert_eq!(p.data.get(&old), Some(&None));
        assert_eq!(p.sizes[&a].base, Base::Reset(4));
        assert_eq!(p.sizes[&a].add_bytes, 1);
    }

    #[test]
    fn delete_removes_everything_including_sync_state() {
        let a = DocumentId::from_bytes([1; 16]);
        let fake = Fake::default();
        let cfg = StoreConfig::default();
        let mut p = Plan::default();
        p.add(append(a, b"1"), &fake, &cfg).unwrap();
        p.add(
            WriteOp::PutSyncState {
                doc: a,
                storage_id: StorageId::new("s"),
                bytes: b"st".to_vec(),
            },
            &fake,
            &cfg,
        )
        .unwrap();
        p.add(WriteOp::DeleteDoc { doc: a }, &fake, &cfg).unwrap();
        p.finish();
        assert!(p.data.values().all(Option::is_none));
        assert_eq!(p.docs.get(a.as_bytes()), Some(&false));
    }
}
