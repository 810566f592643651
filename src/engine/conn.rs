//! Per-connection state: where the handshake is, and which documents the peer syncs.

use std::collections::BTreeSet;

use crate::auth::Access;
use crate::id::{DocumentId, PeerId, StorageId};
use crate::protocol::PeerMetadata;

use super::types::{Denied, Millis};

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
    /// Batches of its changes refused since `refused_since` (see
    /// `EngineConfig::refusals_before_close`).
    refusals: u32,
    refused_since: Millis,
}

impl Conn {
    pub fn new(phase: ConnPhase, access: Option<Access>) -> Self {
        Self {
            phase,
            docs: BTreeSet::new(),
            access,
            refusals: 0,
            refused_since: Millis(0),
        }
    }

    /// Count a refused batch of its changes at `now`; returns the refusals within the
    /// last `window_ms` (counted from the first of them).
    pub fn refused(&mut self, now: Millis, window_ms: u64) -> u32 {
        if self.refusals == 0 || now.saturating_sub(self.refused_since) > window_ms {
            self.refusals = 0;
            self.refused_since = now;
        }
        self.refusals += 1;
        self.refusals
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

    /// The peer takes changes we have not checked yet (see `PeerMetadata::accepts_unchecked`).
    pub fn accepts_unchecked(&self) -> bool {
        matches!(&self.phase, ConnPhase::Ready { meta, .. } if meta.accepts_unchecked)
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
