//! A note's history: its changes, the note as it was at any heads, the difference between two
//! versions as patches, and forking a past version into a new note.

use automerge::{ChangeHash, ChangeMetadata, Patch};

use super::{DocHandle, Repo, RepoError};

/// One change in a note's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeInfo {
    pub hash: ChangeHash,
    /// The actor (device/session) that made it, hex.
    pub actor: String,
    /// Its number among that actor's changes, from 1.
    pub seq: u64,
    /// Seconds since the Unix epoch as the author's clock said (0 if unset).
    pub time: i64,
    pub message: Option<String>,
    /// The changes it was made on top of.
    pub deps: Vec<ChangeHash>,
    /// How many operations it holds.
    pub ops: u64,
}

impl From<ChangeMetadata<'_>> for ChangeInfo {
    fn from(m: ChangeMetadata<'_>) -> Self {
        Self {
            hash: m.hash,
            actor: m.actor.to_hex_string(),
            seq: m.seq,
            time: m.timestamp,
            message: m.message.map(|s| s.into_owned()),
            deps: m.deps,
            ops: (m.max_op + 1).saturating_sub(m.start_op),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("the note has no change {0}")]
    UnknownHead(ChangeHash),
    #[error(transparent)]
    Automerge(automerge::AutomergeError),
    #[error(transparent)]
    Repo(Box<RepoError>),
}

impl From<RepoError> for HistoryError {
    fn from(e: RepoError) -> Self {
        Self::Repo(Box::new(e))
    }
}

fn check_heads(doc: &automerge::Automerge, heads: &[ChangeHash]) -> Result<(), HistoryError> {
    match heads
        .iter()
        .find(|h| doc.get_change_meta_by_hash(h).is_none())
    {
        Some(h) => Err(HistoryError::UnknownHead(*h)),
        None => Ok(()),
    }
}

impl DocHandle {
    /// Every change of the note, oldest first (each after its dependencies).
    pub fn history(&self) -> Vec<ChangeInfo> {
        self.with_doc(|d| {
            d.get_changes_meta(&[])
                .into_iter()
                .map(Into::into)
                .collect()
        })
    }

    /// One change by hash.
    pub fn change_info(&self, hash: &ChangeHash) -> Option<ChangeInfo> {
        self.with_doc(|d| d.get_change_meta_by_hash(hash).map(Into::into))
    }

    /// The note as JSON as it was at `heads` (same shape as [`DocHandle::to_json`]).
    pub fn json_at(&self, heads: &[ChangeHash]) -> Result<serde_json::Value, HistoryError> {
        // fork_at copies the change graph up to `heads`; the forked document is then serialized
        // exactly like the live one.
        let past = self.with_doc(|d| {
            check_heads(d, heads)?;
            d.fork_at(heads).map_err(HistoryError::Automerge)
        })?;
        Ok(serde_json::to_value(automerge::AutoSerde::from(&past))
            .unwrap_or(serde_json::Value::Null))
    }

    /// What changed from `before` to `after`, as patches (apply them to `before` to get
    /// `after`; swap the arguments to undo).
    pub fn diff(
        &self,
        before: &[ChangeHash],
        after: &[ChangeHash],
    ) -> Result<Vec<Patch>, HistoryError> {
        self.with_doc(|d| {
            check_heads(d, before)?;
            check_heads(d, after)?;
            Ok(d.diff(before, after))
        })
    }
}

impl Repo {
    /// A new note (fresh id, fresh actor) holding `handle`'s note as it was at `heads`. The
    /// fork shares the history up to `heads`, so it can still merge with the original.
    pub async fn fork(
        &self,
        handle: &DocHandle,
        heads: &[ChangeHash],
    ) -> Result<DocHandle, HistoryError> {
        let mut doc = handle.with_doc(|d| {
            check_heads(d, heads)?;
            d.fork_at(heads).map_err(HistoryError::Automerge)
        })?;
        if doc.get_heads().is_empty() {
            doc.empty_commit(Default::default());
        }
        Ok(self.create_from(doc).await?)
    }
}
