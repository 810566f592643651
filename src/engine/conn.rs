//! Per-connection state: where the handshake is, and which documents the peer syncs.

use std::collections::BTreeSet;

use crate::auth::Access;
use crate::id::{DocumentId, PeerId, StorageId};
use crate::protocol::PeerMetadata;

use super::types::Denied;

pub(super) enum ConnPhase {
    /// We accepted the socket and wait for the client's `join`.
    AwaitingJoin,
    /// We dialed and sent `join`; we wait for `peer`.
    AwaitingPeer,
    Ready {
        peer: PeerId,
        meta: PeerMetadata,
    },
}

pub(super) struct Conn {
    pub phase: ConnPhase,
    pub docs: BTreeSet<DocumentId>,
    /// What the peer may do; `None` = anything.
    pub access: Option<Access>,
}

impl Conn {
    pub fn new(phase: ConnPhase, access: Option<Access>) -> Self {
        Self {
            phase,
            docs: BTreeSet::new(),
            access,
        }
    }

    /// Why this peer may not sync `doc` (not covered by its token, or one document over its
    /// cap), if it may not.
    pub fn denied(&self, doc: &DocumentId) -> Option<Denied> {
        let a = self.access.as_ref()?;
        if !a.docs.covers(doc) {
            return Some(Denied::NotCovered);
        }
        match a.max_docs {
            Some(max) if !self.docs.contains(doc) && self.docs.len() >= max => {
                Some(Denied::DocLimit)
            }
            _ => None,
        }
    }

    /// The peer's changes are ignored.
    pub fn read_only(&self) -> bool {
        self.access.as_ref().is_some_and(|a| !a.write)
    }

    pub fn peer_id(&self) -> Option<&PeerId> {
        match &self.phase {
            ConnPhase::Ready { peer, .. } => Some(peer),
            _ => None,
        }
    }

    /// The storage id under which we persist sync state for this peer (ephemeral peers
    /// have none worth keeping).
    pub fn storage_id(&self) -> Option<&StorageId> {
        match &self.phase {
            ConnPhase::Ready { meta, .. } if !meta.is_ephemeral => meta.storage_id.as_ref(),
            _ => None,
        }
    }
}
