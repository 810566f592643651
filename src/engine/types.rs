//! The engine's vocabulary: inputs, effects, events, configuration and time.

use std::collections::HashMap;
use std::sync::Arc;

use automerge::{ActorId, Automerge, ChangeHash};

use crate::auth::Access;
use crate::id::{DocumentId, PeerId, StorageId};
use crate::net::{ConnId, Direction};
use crate::protocol::{Message, PeerMetadata};
use crate::schema::{RepairEvent, Schema};

use super::doc::PeerSyncStatus;

/// A document shared between the engine and the handles that read and change it.
/// Locks are per document: reading one note never waits for another.
pub type SharedDoc = Arc<parking_lot::Mutex<super::journal::DocCell>>;

/// Milliseconds on the runtime's monotonic clock (the simulator uses virtual time).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Millis(pub u64);

impl Millis {
    pub fn saturating_sub(self, other: Millis) -> u64 {
        self.0.saturating_sub(other.0)
    }
    pub fn plus(self, ms: u64) -> Millis {
        Millis(self.0.saturating_add(ms))
    }
}

/// How this engine behaves.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub peer_id: PeerId,
    /// Our durable storage's id, told to peers so they can persist sync state for us.
    pub storage_id: Option<StorageId>,
    pub is_ephemeral: bool,
    /// Peers announce their loaded documents to new connections; a relay does not (it
    /// serves what is asked for by id).
    pub announce: bool,
    /// The session id on ephemeral messages we originate.
    pub session_id: String,
    /// A peer that has not answered our last message carrying changes gets nothing new
    /// until it answers or this much time passes; then it gets one message with
    /// everything new.
    pub max_hold_ms: u64,
    /// How long a `request` for a document nobody has waits before `doc-unavailable`
    /// (another peer may be uploading it right now).
    pub request_grace_ms: u64,
    /// A document with no live handle, no peer and nothing unsaved is evicted from memory
    /// after this much idle time.
    pub evict_idle_ms: u64,
    /// Persist remote changes before advertising heads that include them.
    pub durable_before_send: bool,
    /// Above this many documents in memory, the least recently active evictable ones are
    /// evicted at once (without waiting for `evict_idle_ms`).
    pub max_loaded_docs: usize,
    /// Invariants per kind of note: after remote changes are applied (and when a note is
    /// loaded or created), broken ones are repaired with a local change of this peer and
    /// reported as [`Event::Repair`]. Empty by default (nothing is checked).
    pub schema: Schema,
    /// The actor repair changes are made as; `None`: the document's own actor (the one its
    /// handles commit as). The simulator fixes one per incarnation so runs replay exactly.
    pub repair_actor: Option<ActorId>,
    /// Milliseconds since the Unix epoch at `Millis(0)`: repair changes are stamped
    /// `(clock_offset_ms + now) / 1000` seconds, as handles stamp theirs. The runtime sets
    /// it when it starts; 0 in the simulator.
    pub clock_offset_ms: i64,
    /// Measures how long applying remote changes takes, for [`EngineConfig::apply_pacing`].
    /// `None` (the simulator's default): no pacing. The runtime passes a monotonic clock.
    pub cost_clock: Option<CostClock>,
    /// How a document whose remote applies are expensive is kept from taking a core.
    pub apply_pacing: ApplyPacing,
    /// Changes waiting in a paced inbox ([`ApplyPacing`]) are passed on to the other peers
    /// at once, and their senders told we have them (see `engine::forward`). On by
    /// default; for a peer with one relay that is only the answer that lets the relay send
    /// what arrives next.
    pub forward_held: bool,
    /// An expensive note's remote changes are applied off the engine's thread
    /// ([`Effect::Apply`], see `engine::offload`). On for relays; off for peers, where a
    /// user's edit during the apply makes it run again.
    pub offload_applies: bool,
    /// Remote changes that fail the checks (`admit`) are refused, never applied. A relay
    /// closes their sender's connection at once: its peers are the authors of what they
    /// send. The connection of a peer behind a relay also carries other peers' changes,
    /// which the relay may pass on before it has checked them (`forward`): closing it would
    /// cut this peer off (every note of it) over someone else's forgery. So a peer keeps
    /// the connection, reports [`Event::ChangesRefused`] and restarts the sync of that
    /// document with it (a sync reset: the sender sends again what we lack, so the honest
    /// changes refused with a forgery come back). The connection is closed only at this
    /// many refusals within [`REFUSALS_WINDOW_MS`]: a peer that keeps sending what we
    /// refuse, or a resync that keeps bringing it back. 1: close at the first (relays).
    pub refusals_before_close: u32,
}

/// The window in which [`EngineConfig::refusals_before_close`] refusals close a connection.
pub const REFUSALS_WINDOW_MS: u64 = 60_000;

/// A monotonic clock in microseconds, used only to measure what an apply cost (time is
/// otherwise passed in as `now`, so a simulator can fake this one too).
#[derive(Clone)]
pub struct CostClock(pub Arc<dyn Fn() -> u64 + Send + Sync>);

impl std::fmt::Debug for CostClock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CostClock")
    }
}

impl CostClock {
    /// Microseconds since this clock was made, from `std::time::Instant`.
    pub fn monotonic() -> Self {
        let start = std::time::Instant::now();
        Self(Arc::new(move || start.elapsed().as_micros() as u64))
    }
}

/// Apply pacing. Automerge 0.12 applies a batch of remote changes to a long text in time
/// proportional to the text, however few changes the batch holds (about 25-45 ms on the
/// 260k-op automerge-paper note; `../shared/NOTES.md` section 2). A document's inbox is
/// applied in one call per step, but when messages keep arriving one at a time, every one
/// would still cost a whole apply. So after an apply that took `cost`, the document's next
/// apply waits until `factor * cost` more has passed (capped at `max_ms`): the inbox fills
/// meanwhile and is applied in one call, and a document whose applies cost less than
/// `min_cost_us` is never held at all.
///
/// What waits in a paced inbox is not held from anyone (see
/// [`EngineConfig::forward_held`]): a relay passes it on to the other peers at once, and
/// every engine tells the sender it has it, so the pause is not on the path from a typist
/// to a reader. So peers pace too: their applies are what a reader waits for, and a peer
/// that applies less often leaves more of the machine to the others.
///
/// Measured on the long-note bench (K = 4 typists, this machine, runs interleaved with the
/// previous build), p50/p99: 395-464 / 851-994 ms with only relays pacing and nothing
/// forwarded; 307-415 / 653-814 ms with forwarding and peers pacing. The threshold is
/// 20 ms (it was 3 ms while only relays paced): the fan-out bench's applies (a map, a few
/// to 20 ms at K = 64) are better left unpaced, and its figures stayed within their
/// run-to-run spread (K = 64 p50 1.9-3.5 s before, 2.0-3.7 s after).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApplyPacing {
    pub factor: u64,
    pub max_ms: u64,
    pub min_cost_us: u64,
}

impl Default for ApplyPacing {
    fn default() -> Self {
        Self {
            factor: 2,
            max_ms: 200,
            min_cost_us: 20_000,
        }
    }
}

impl ApplyPacing {
    /// Never hold an apply.
    pub fn off() -> Self {
        Self {
            factor: 0,
            ..Self::default()
        }
    }

    /// How long to wait after an apply that took `cost_us` before the next one.
    pub fn pause_ms(&self, cost_us: u64) -> u64 {
        if cost_us < self.min_cost_us {
            return 0;
        }
        (cost_us.saturating_mul(self.factor) / 1000).min(self.max_ms)
    }
}

impl EngineConfig {
    /// Defaults for an app's peer (announces its documents).
    pub fn peer(peer_id: PeerId, storage_id: Option<StorageId>) -> Self {
        Self {
            session_id: format!("{}-session", peer_id.as_str()),
            peer_id,
            storage_id,
            is_ephemeral: false,
            announce: true,
            max_hold_ms: 1_000,
            request_grace_ms: 5_000,
            evict_idle_ms: 30_000,
            durable_before_send: true,
            max_loaded_docs: 1_000,
            schema: Schema::default(),
            repair_actor: None,
            clock_offset_ms: 0,
            cost_clock: None,
            apply_pacing: ApplyPacing::default(),
            forward_held: true,
            offload_applies: false,
            refusals_before_close: 8,
        }
    }

    /// Defaults for a relay (never announces).
    pub fn relay(peer_id: PeerId, storage_id: Option<StorageId>) -> Self {
        Self {
            announce: false,
            offload_applies: true,
            refusals_before_close: 1,
            ..Self::peer(peer_id, storage_id)
        }
    }
}

/// A document as storage returns it.
#[derive(Debug)]
pub struct Loaded {
    pub doc: Automerge,
    /// Persisted sync state per peer storage id (`sync::State::encode`).
    pub sync_states: HashMap<StorageId, Vec<u8>>,
}

/// What the outside world tells the engine.
#[derive(Debug)]
pub enum Input {
    ConnOpened {
        conn: ConnId,
        direction: Direction,
        /// What the peer may do; `None` = anything (see [`Access`]).
        access: Option<Access>,
    },
    ConnClosed {
        conn: ConnId,
    },
    Received {
        conn: ConnId,
        msg: Message,
    },
    /// A handle committed changes to the shared document.
    LocalChange {
        doc: DocumentId,
    },
    /// A new document (created or imported locally); the engine persists all of it.
    Create {
        doc: DocumentId,
        automerge: Automerge,
    },
    /// A handle wants this document: load it, or ask peers for it.
    Find {
        doc: DocumentId,
    },
    /// Every local `find` of this document gave up (timed out): nobody here waits for it
    /// any more. A document that never arrived is dropped from memory at once (a peer
    /// that sends it later still gets it stored); one that did arrive is left to eviction.
    CancelFind {
        doc: DocumentId,
    },
    /// The answer to [`Effect::Load`]; `None` = not in storage.
    Loaded {
        doc: DocumentId,
        loaded: Option<Loaded>,
    },
    /// The answer to [`Effect::Persist`].
    Persisted {
        doc: DocumentId,
        seq: u64,
        ok: bool,
    },
    /// Send an ephemeral payload (CBOR) to the document's peers.
    Broadcast {
        doc: DocumentId,
        data: Vec<u8>,
    },
    /// Drop a document from memory (it was deleted).
    Forget {
        doc: DocumentId,
    },
    /// The answer to [`Effect::Apply`].
    Applied {
        doc: DocumentId,
        outcome: Box<super::offload::Applied>,
    },
    /// Hear the heads these storages hold of our documents ([`Event::RemoteHeads`]): the
    /// subscription is sent to every peer (automerge-repo's remote-heads gossip).
    SubscribeRemoteHeads {
        add: Vec<StorageId>,
        remove: Vec<StorageId>,
    },
    /// Time passed; do what is due (see [`super::Engine::next_deadline`]).
    Tick,
}

/// What the engine asks the outside world to do.
#[derive(Debug)]
pub enum Effect {
    Send {
        conn: ConnId,
        msg: Message,
    },
    Close {
        conn: ConnId,
        reason: String,
    },
    /// Load the document from storage and answer with [`Input::Loaded`].
    Load {
        doc: DocumentId,
    },
    /// Make `chunk` durable, then answer with [`Input::Persisted`]. Chunks of one document
    /// must be written in the order they are emitted. `heads` are the document's heads once
    /// this chunk is applied; `snapshot` says the chunk is a whole document (`save()`).
    Persist {
        doc: DocumentId,
        seq: u64,
        chunk: Vec<u8>,
        heads: Vec<ChangeHash>,
        snapshot: bool,
    },
    /// Run the job (it takes a while: off the engine's thread if there is one to spare)
    /// and answer with the input [`super::ApplyJob::run`] gives (see `engine::offload`).
    Apply(Box<super::offload::ApplyJob>),
    /// Store sync state for a peer's storage (no answer needed).
    SaveSyncState {
        doc: DocumentId,
        storage_id: StorageId,
        state: Vec<u8>,
    },
    Event(Event),
}

/// Things handles and apps may want to know.
#[derive(Debug, Clone)]
pub enum Event {
    PeerConnected {
        conn: ConnId,
        peer: PeerId,
        metadata: PeerMetadata,
    },
    PeerDisconnected {
        conn: ConnId,
        peer: PeerId,
    },
    DocReady {
        doc: DocumentId,
    },
    DocUnavailable {
        doc: DocumentId,
    },
    /// The document's heads changed through remote changes (local changes are known to the
    /// handle that made them, but are reported here too once persisted as a chunk).
    DocChanged {
        doc: DocumentId,
        heads: Vec<ChangeHash>,
        remote: bool,
    },
    SyncStatus {
        doc: DocumentId,
        peer: PeerId,
        status: PeerSyncStatus,
    },
    Ephemeral {
        doc: DocumentId,
        sender: PeerId,
        data: Vec<u8>,
    },
    /// A storage we subscribe to ([`Input::SubscribeRemoteHeads`]) holds `heads` of `doc`,
    /// as of `timestamp` (ms since the epoch): seen in its own sync messages, or reported
    /// by a peer.
    RemoteHeads {
        doc: DocumentId,
        storage: StorageId,
        heads: Vec<ChangeHash>,
        timestamp: f64,
    },
    /// The peer sent something we refused, and its connection is closed for it.
    PeerError {
        conn: ConnId,
        error: EngineError,
    },
    /// Changes that arrived on `conn` were refused (they fail the checks, see
    /// [`EngineConfig::refusals_before_close`]); the connection stays open and the
    /// document's sync with it restarts.
    ChangesRefused {
        conn: ConnId,
        error: EngineError,
    },
    Evicted {
        doc: DocumentId,
    },
    /// A peer asked for, synced or sent an ephemeral message for a document it may not
    /// touch; it was told `doc-unavailable` and nothing was applied or forwarded.
    AccessDenied {
        conn: ConnId,
        doc: DocumentId,
        reason: Denied,
    },
    /// Merged changes broke an invariant of the note's kind and this peer repaired it (or
    /// tried to: see [`RepairEvent::outcome`]). The repair change is persisted and synced
    /// like a local change.
    Repair(RepairEvent),
}

/// Why a peer was refused a document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// Its token does not cover the document.
    NotCovered,
    /// It already syncs as many documents as the connection may.
    DocLimit,
}

/// Problems the engine reports (never panics for them).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    #[error("peer sent a sync message that does not decode for {doc}: {reason}")]
    BadSyncMessage { doc: DocumentId, reason: String },
    #[error("peer sent changes that do not apply to {doc}: {reason}")]
    BadChanges { doc: DocumentId, reason: String },
    #[error("peer reported an error: {0}")]
    RemoteError(String),
}
