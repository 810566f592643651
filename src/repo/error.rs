//! Errors of the runtime API (what app code sees).

use std::time::Duration;

use crate::id::DocumentId;

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("document {0} was not found locally and no peer has it")]
    NotFound(DocumentId),
    #[error(
        "finding document {id} timed out after {after:?} (no peer had it, or none was connected)"
    )]
    FindTimeout { id: DocumentId, after: Duration },
    #[error("not an Automerge document: {0}")]
    Import(#[source] crate::engine::AdmitError),
    #[error("the change failed: {0}")]
    Change(automerge::AutomergeError),
    /// The change would break an invariant of the note's kind; it was rolled back (nothing
    /// changed, nothing persisted or sent). Boxed: it is rare, and keeps `RepoError` small.
    #[error(transparent)]
    Invariant(Box<crate::schema::Rejected>),
    #[error("the repo is shut down")]
    Closed,
    /// The engine thread panicked (a bug in sheaf); see [`super::EngineStop::Panicked`].
    #[error("the repo's engine stopped after a panic: {0}")]
    EngineFailed(String),
    #[error("I/O error on {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Id(#[from] crate::id::IdError),
    #[error("connecting needs a tokio runtime")]
    NoRuntime,
    /// A view of a note as of fixed heads ([`super::DocHandle::view`], a URL with heads)
    /// cannot be changed; change the note through a handle without heads.
    #[error("document {0} is viewed as of fixed heads: it cannot be changed there")]
    FixedHeads(DocumentId),
    /// The note lacks these heads (not a version of it, or not synced here yet).
    #[error("document {id} has no change {}", missing.iter().map(crate::id::encode_head).collect::<Vec<_>>().join(", "))]
    UnknownHeads {
        id: DocumentId,
        missing: Vec<automerge::ChangeHash>,
    },
}

impl From<crate::schema::Rejected> for RepoError {
    fn from(r: crate::schema::Rejected) -> Self {
        RepoError::Invariant(Box::new(r))
    }
}
