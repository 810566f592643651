//! Per-connection state: where the handshake is, and which documents the peer syncs.

use std::collections::BTreeSet;

use crate::id::{DocumentId, PeerId, StorageId};
use crate::protocol::PeerMetadata;

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
}

impl Conn {
    pub fn new(phase: ConnPhase) -> Self {
        Self {
            phase,
            docs: BTreeSet::new(),
        }
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
