//! The store's error type and the report of a corrupt chunk.

use std::path::PathBuf;
use std::sync::Arc;

use crate::id::DocumentId;

/// Everything that can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another process (or another `Store` in this one) has the database open. sled takes an
    /// exclusive `flock` on `<dir>/db`; flock belongs to the open file, so a second open in the
    /// same process is refused too.
    #[error("store at {} is locked: another process has it open ({detail})", path.display())]
    Locked { path: PathBuf, detail: String },
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    #[error("I/O error while {context}: {source}")]
    Io {
        context: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The commit log (`<dir>/sheaf-commit-log`, see `store::commit_log`) holds a damaged
    /// record that was acknowledged, or one that does not decode. The store does not open:
    /// replaying past it would lose that batch silently. The files are left as they are.
    #[error("commit log damaged at byte {offset}: {reason}")]
    CommitLog { offset: u64, reason: String },
    /// The writer thread is gone (the store is being dropped).
    #[error("the store's writer thread has stopped")]
    Closed,
    /// A write batch failed; every request in the batch receives the same error.
    #[error("write batch failed: {0}")]
    BatchFailed(Arc<StoreError>),
    /// An earlier write, flush or fsync failed. After a failed fsync the kernel may have
    /// dropped the dirty pages, and sled after a failed write waits forever on its next flush,
    /// so nothing written later can be promised durable. The database stays open (and locked)
    /// until the process exits: restart it to open the store again.
    #[error("store is unusable after an earlier write failure ({0}); restart to reopen it")]
    Poisoned(String),
}

impl StoreError {
    pub(crate) fn io(context: &'static str, source: std::io::Error) -> Self {
        StoreError::Io { context, source }
    }
}

/// A stored chunk that could not be used. It has been moved to the `quarantine` tree under the
/// same key (bytes untouched) and the document was loaded without it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorruptChunk {
    pub doc: DocumentId,
    /// The chunk's key in the `data` tree (and now in `quarantine`).
    pub key: Vec<u8>,
    pub reason: CorruptReason,
}

/// Why a chunk was quarantined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CorruptReason {
    /// The value is shorter than its 32-byte checksum.
    Truncated { len: usize },
    /// blake3 of the payload does not match the stored checksum.
    ChecksumMismatch,
    /// The checksum matched but Automerge rejected the payload.
    NotAutomerge(String),
}

impl std::fmt::Display for CorruptChunk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "doc {} chunk {}: {:?}",
            self.doc,
            super::keys::hex(&self.key),
            self.reason
        )
    }
}
