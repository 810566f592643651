//! The automerge-repo WebSocket protocol (as `@automerge/automerge-repo` 2.x speaks it).
//!
//! One binary WebSocket frame carries one CBOR map with text keys. This module holds the
//! message types ([`Message`]) and the codec ([`codec::decode`], [`codec::encode`]). The
//! decoder is total: any bytes give a message or a typed [`DecodeError`], never a panic,
//! and it tolerates what real JS peers send (CBOR `undefined` for absent optionals, floats
//! where integers are meant, unknown keys).
//!
//! Nothing here knows about sockets or documents' contents: `data` fields are opaque bytes
//! (an Automerge sync message for `sync`/`request`, CBOR of an app payload for `ephemeral`).
//!
//! # Wire facts (from frames captured from JS automerge-repo 2.5.6, `tests/fixtures/js-frames`)
//!
//! - A repo without storage sends `peerMetadata: {storageId: undefined, isEphemeral: true}`
//!   (CBOR `undefined`, not an absent key); `remote-subscription-change` carries
//!   `remove: undefined` when it only adds.
//! - Millisecond timestamps arrive as float64; cbor-x writes maps with a 16-bit length head.
//! - `ephemeral` keeps the *originator's* `senderId` when forwarded, so it may differ from the
//!   peer on the socket. JS clients also re-gossip ephemerals they receive back to the server
//!   (with the originator's `senderId`); the JS server drops any non-`join` frame whose
//!   `senderId` is not the peer that joined on that socket.
//! - The JS server answers `request` for an unknown document with `doc-unavailable` and a
//!   join without protocol "1" with `error {senderId, message, targetId}`, then closes.

pub mod codec;

pub use codec::{decode, encode, DecodeError};

use std::collections::BTreeMap;

use crate::id::{DocumentId, PeerId, StorageId};

/// The only protocol version automerge-repo 2.x speaks.
pub const PROTOCOL_VERSION: &str = "1";

/// What a peer says about itself in `join` and `peer`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerMetadata {
    pub storage_id: Option<StorageId>,
    pub is_ephemeral: bool,
    /// `sheafAcceptsUnchecked: true` (a sheaf extension; JS peers neither send nor read
    /// it): this peer checks the changes it is sent and keeps the connection when it
    /// refuses some, so a relay may pass changes on to it before the relay has applied and
    /// checked them itself (see `engine::forward`). Other peers only get changes the relay
    /// has admitted: a forged change passed on unchecked could make a JS peer's Automerge
    /// panic.
    pub accepts_unchecked: bool,
}

/// Heads a storage holds for a document, with the time they were seen (ms since epoch).
#[derive(Debug, Clone, PartialEq)]
pub struct HeadsAt {
    /// base58check-encoded change hashes (see [`crate::id::encode_head`]).
    pub heads: Vec<String>,
    pub timestamp: f64,
}

/// One protocol message. Field names follow the JS wire names in camelCase.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// Client -> server on connect.
    Join {
        sender_id: PeerId,
        peer_metadata: PeerMetadata,
        /// Missing on the wire means `["1"]`.
        supported_protocol_versions: Vec<String>,
    },
    /// Server -> client answer to `join`.
    Peer {
        sender_id: PeerId,
        target_id: PeerId,
        peer_metadata: PeerMetadata,
        selected_protocol_version: String,
    },
    /// A protocol error; the sender closes the connection afterwards.
    Error {
        sender_id: Option<PeerId>,
        target_id: Option<PeerId>,
        message: String,
    },
    /// `data` is an encoded `automerge::sync::Message`.
    Sync {
        sender_id: PeerId,
        target_id: PeerId,
        document_id: DocumentId,
        data: Vec<u8>,
    },
    /// Like `Sync`, sent by a peer whose copy is empty: it is asking for the document.
    Request {
        sender_id: PeerId,
        target_id: PeerId,
        document_id: DocumentId,
        data: Vec<u8>,
    },
    /// Neither the sender nor any of its other peers has the document.
    DocUnavailable {
        sender_id: PeerId,
        target_id: PeerId,
        document_id: DocumentId,
    },
    /// App payload (presence, cursors), forwarded to the document's other peers and
    /// de-duplicated by `sender_id:session_id:count`.
    Ephemeral {
        sender_id: PeerId,
        target_id: PeerId,
        document_id: DocumentId,
        session_id: String,
        count: u64,
        data: Vec<u8>,
    },
    RemoteSubscriptionChange {
        sender_id: PeerId,
        target_id: PeerId,
        add: Vec<StorageId>,
        remove: Vec<StorageId>,
    },
    RemoteHeadsChanged {
        sender_id: PeerId,
        target_id: PeerId,
        document_id: DocumentId,
        new_heads: BTreeMap<StorageId, HeadsAt>,
    },
}

impl Message {
    /// The wire `type` string.
    pub fn type_name(&self) -> &'static str {
        match self {
            Message::Join { .. } => "join",
            Message::Peer { .. } => "peer",
            Message::Error { .. } => "error",
            Message::Sync { .. } => "sync",
            Message::Request { .. } => "request",
            Message::DocUnavailable { .. } => "doc-unavailable",
            Message::Ephemeral { .. } => "ephemeral",
            Message::RemoteSubscriptionChange { .. } => "remote-subscription-change",
            Message::RemoteHeadsChanged { .. } => "remote-heads-changed",
        }
    }

    /// The document a message is about, if any.
    pub fn document_id(&self) -> Option<DocumentId> {
        match self {
            Message::Sync { document_id, .. }
            | Message::Request { document_id, .. }
            | Message::DocUnavailable { document_id, .. }
            | Message::Ephemeral { document_id, .. }
            | Message::RemoteHeadsChanged { document_id, .. } => Some(*document_id),
            _ => None,
        }
    }
}
