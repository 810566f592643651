//! The sans-IO sync engine: `handle(now, inputs) -> effects`.
//!
//! The engine holds every loaded document, every connection's handshake state and the
//! Automerge sync state of each (peer, document) pair. It never touches a socket, sled or a
//! clock (but for measuring apply costs, below): the runtime (or the deterministic
//! simulator, or the fuzz harness) feeds it [`Input`]s with the current time and carries out
//! the [`Effect`]s it returns, feeding the answers (a document loaded, a chunk durable) back
//! in as inputs.
//!
//! # Why batches
//!
//! In automerge 0.12 an apply call that touches a long text costs time proportional to the
//! whole text, however few changes it carries (`shared/NOTES.md` section 2). So
//! [`Engine::handle_batch`] first only *routes* every input (sync messages are queued in
//! their document's inbox), then runs one step per touched document: all queued changes
//! are applied in one call (`apply_changes`, with the changes as parsed by the check that
//! rejects damaged ones, on a copy of the note that replaces it only once the `admit` module
//! has checked the result: Automerge 0.12 panics on some forged changes and keeps a note it
//! cannot reload after others), each message's sync-state bookkeeping runs
//! without its changes, the new changes become one storage chunk, and each peer gets at
//! most one message with everything new. A runtime that drains its whole input queue into
//! one batch gets coalescing for free, and under load the batches grow.
//!
//! Batches alone only coalesce what arrives *while* the engine is busy. On a relay, where
//! each typist's keystrokes arrive as their own messages, a long note would still cost a
//! whole apply per message, and one core per hot note. So engines pace expensive applies
//! ([`ApplyPacing`]): after an apply that took T (measured with [`EngineConfig::cost_clock`],
//! the one clock the engine reads, injected so the simulator can fake it), the document's
//! inbox waits 2 x T (at most 200 ms) before the next, and a deadline brings it back. What
//! waits is passed on to the other peers at once and its senders are answered (the
//! `forward` module), so the pause is not on the path from a typist to a reader.
//!
//! Pacing bounds how often a hot note is applied, not how long each apply holds the
//! engine's one thread. A relay (`EngineConfig::offload_applies`) hands the apply of such a
//! note to the runtime as [`Effect::Apply`], to run on another thread while the engine goes
//! on serving every note; the result comes back as [`Input::Applied`] and is used only if
//! the note did not move meanwhile (the `offload` module).
//!
//! # Per message, nothing that grows with the history
//!
//! Two more automerge 0.12 costs grow with the note's whole history rather than with what a
//! message carries, and the engine steps around both: `receive_sync_message` walks every
//! ancestor of the peer's heads (the `receive` module does the bookkeeping without that
//! walk), and `save_after` rebuilds the changes it returns from the op set (a batch of remote
//! changes is stored as the bytes it arrived in, behind whatever local edits came before it;
//! see `Arrived` in `doc`).
//!
//! # What goes to a peer
//!
//! Automerge picks the changes for a peer with the peer's Bloom filter, which hides about 1
//! change in 100 that the peer lacks, and sends a peer that lacks a third of the note the
//! whole document, which the peer then takes apart again. When we know every head the
//! peer sent, the `basis` module sends exactly what those heads lack instead, and a peer
//! that has the note always gets changes (see there for the numbers).
//!
//! # Durability before advertising
//!
//! Remote changes are persisted before any sync message advertises heads that include
//! them: while a document has a chunk on its way to disk, its inbox waits and nothing is
//! sent for it; when [`Input::Persisted`] arrives the peers are served and the inbox that
//! accumulated meanwhile is applied in one call. This paces a hot document by the group
//! commit instead of starving it.
//!
//! # Patches for subscribers
//!
//! Documents are shared with their handles as a [`DocCell`]: the Automerge document plus a
//! journal of the patches of its recent changes, filled while an app subscribes to changes.
//! The apply above logs its patches into it, so a subscriber does not diff the note (tens
//! of milliseconds on a long text) to learn what the batch changed.
//!
//! # Remote heads
//!
//! A peer may subscribe to other peers' storage ids (`remote-subscription-change`) and is
//! then told the heads those storages hold of the documents it has open
//! (`remote-heads-changed`): automerge-repo's remote-heads gossip, in the `gossip` module.
//!
//! # Invariants
//!
//! With a [`crate::schema::Schema`] in [`EngineConfig::schema`], a document whose step
//! applied remote changes (or that was just loaded or created) is checked right after the
//! apply, and each broken invariant is repaired in its own transaction: a local change made
//! as [`EngineConfig::repair_actor`] (or the document's actor), stamped from `now`, that goes
//! into the same storage chunk as the remote changes and out to peers like any local change.
//! Each attempt is reported as [`Event::Repair`].

pub(crate) mod admit;
mod basis;
mod conn;
mod dedup;
mod doc;
mod forward;
mod gossip;
mod journal;
mod lineage;
mod offload;
mod receive;
mod types;

pub use admit::AdmitError;
pub use doc::{DocPhase, PeerSyncStatus};
pub use journal::DocCell;
pub use offload::{Applied, ApplyJob};
pub use types::{
    ApplyPacing, CostClock, Denied, Effect, EngineConfig, EngineError, Event, Input, Loaded,
    Millis, SharedDoc, REFUSALS_WINDOW_MS,
};

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use automerge::Automerge;

use crate::auth::Access;
use crate::id::{DocumentId, PeerId};
use crate::net::{ConnId, Direction};
use crate::protocol::{Message, PeerMetadata, PROTOCOL_VERSION};

use conn::{Conn, ConnPhase};
use dedup::Dedup;
use doc::DocEntry;

/// The sync engine. See the module docs.
pub struct Engine {
    config: EngineConfig,
    conns: BTreeMap<ConnId, Conn>,
    docs: BTreeMap<DocumentId, DocEntry>,
    /// Documents to step at the end of the current batch (ordered: deterministic output).
    touched: BTreeSet<DocumentId>,
    ephemeral_seen: Dedup,
    ephemeral_count: u64,
    /// Remote-heads subscriptions and what is known (see `gossip`).
    gossip: gossip::Gossip,
    effects: Vec<Effect>,
}

impl Engine {
    pub fn new(config: EngineConfig) -> Self {
        Self {
            config,
            conns: BTreeMap::new(),
            docs: BTreeMap::new(),
            touched: BTreeSet::new(),
            ephemeral_seen: Dedup::new(4096),
            ephemeral_count: 0,
            gossip: Default::default(),
            effects: Vec::new(),
        }
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    pub fn peer_id(&self) -> &PeerId {
        &self.config.peer_id
    }

    /// Handle one input. Equivalent to a batch of one.
    pub fn handle(&mut self, now: Millis, input: Input) -> Vec<Effect> {
        self.handle_batch(now, std::iter::once(input))
    }

    /// Handle every input, then step each touched document once (coalescing).
    pub fn handle_batch(
        &mut self,
        now: Millis,
        inputs: impl IntoIterator<Item = Input>,
    ) -> Vec<Effect> {
        for input in inputs {
            self.route(now, input);
        }
        self.step_touched(now);
        std::mem::take(&mut self.effects)
    }

    /// The shared document, if it is loaded and ready (not loading, requesting or unavailable).
    pub fn document(&self, id: &DocumentId) -> Option<SharedDoc> {
        self.docs
            .get(id)
            .filter(|d| d.phase == DocPhase::Ready)
            .map(|d| d.doc.clone())
    }

    /// Ids of documents held in memory.
    pub fn loaded_documents(&self) -> impl Iterator<Item = &DocumentId> {
        self.docs.keys()
    }

    pub fn phase(&self, id: &DocumentId) -> Option<DocPhase> {
        self.docs.get(id).map(|d| d.phase)
    }

    /// Number of documents held in memory.
    pub fn loaded_count(&self) -> usize {
        self.docs.len()
    }

    /// Peers that completed the handshake.
    pub fn connected_peers(&self) -> impl Iterator<Item = (ConnId, &PeerId)> {
        self.conns
            .iter()
            .filter_map(|(c, conn)| conn.peer_id().map(|p| (*c, p)))
    }

    /// The earliest time at which a [`Input::Tick`] has work to do (held messages, request
    /// grace periods, eviction), if any.
    pub fn next_deadline(&self) -> Option<Millis> {
        self.docs
            .values()
            .filter_map(|d| d.next_deadline(&self.config))
            .min()
    }

    /// Per-peer sync status of a document.
    pub fn sync_status(&self, id: &DocumentId) -> Vec<(PeerId, PeerSyncStatus)> {
        let Some(d) = self.docs.get(id) else {
            return Vec::new();
        };
        d.peers
            .iter()
            .filter_map(|(c, p)| {
                let peer = self.conns.get(c)?.peer_id()?.clone();
                Some((peer, p.status))
            })
            .collect()
    }

    // ---- routing ------------------------------------------------------------------------

    fn route(&mut self, now: Millis, input: Input) {
        match input {
            Input::ConnOpened {
                conn,
                direction,
                access,
            } => self.conn_opened(conn, direction, access),
            Input::ConnClosed { conn } => self.conn_closed(conn),
            Input::Received { conn, msg } => self.received(now, conn, msg),
            Input::LocalChange { doc } => {
                if let Some(d) = self.docs.get_mut(&doc) {
                    d.last_activity = now;
                    self.touched.insert(doc);
                }
            }
            Input::Create { doc, automerge } => self.create(now, doc, automerge),
            Input::Find { doc } => self.find(now, doc),
            Input::CancelFind { doc } => self.cancel_find(doc),
            Input::Loaded { doc, loaded } => self.loaded(now, doc, loaded),
            Input::Persisted { doc, seq, ok } => {
                if let Some(d) = self.docs.get_mut(&doc) {
                    if d.persisted(seq, ok) {
                        self.touched.insert(doc);
                    }
                }
            }
            Input::Broadcast { doc, data } => self.broadcast(doc, data),
            Input::Forget { doc } => {
                if let Some(d) = self.docs.remove(&doc) {
                    for c in d.peers.keys() {
                        if let Some(conn) = self.conns.get_mut(c) {
                            conn.docs.remove(&doc);
                        }
                    }
                }
                self.touched.remove(&doc);
            }
            Input::Applied { doc, outcome } => {
                if let Some(d) = self.docs.get_mut(&doc) {
                    if d.applied(outcome) {
                        self.touched.insert(doc);
                    }
                }
            }
            Input::SubscribeRemoteHeads { add, remove } => self.subscribe_remote_heads(add, remove),
            Input::Tick => {
                let due: Vec<DocumentId> = self
                    .docs
                    .iter()
                    .filter(|(_, d)| d.next_deadline(&self.config).is_some_and(|t| t <= now))
                    .map(|(id, _)| *id)
                    .collect();
                self.touched.extend(due);
            }
        }
    }

    fn conn_opened(&mut self, conn: ConnId, direction: Direction, access: Option<Access>) {
        let phase = match direction {
            Direction::Incoming => ConnPhase::AwaitingJoin,
            Direction::Outgoing => {
                self.effects.push(Effect::Send {
                    conn,
                    msg: Message::Join {
                        sender_id: self.config.peer_id.clone(),
                        peer_metadata: self.our_metadata(),
                        supported_protocol_versions: vec![PROTOCOL_VERSION.to_string()],
                    },
                });
                ConnPhase::AwaitingPeer
            }
        };
        self.conns.insert(conn, Conn::new(phase, access));
    }

    fn our_metadata(&self) -> PeerMetadata {
        PeerMetadata {
            storage_id: self.config.storage_id.clone(),
            is_ephemeral: self.config.is_ephemeral,
            // We keep a connection whose changes we refuse only if we tolerate refusals.
            accepts_unchecked: self.config.refusals_before_close > 1,
        }
    }

    fn conn_closed(&mut self, conn: ConnId) {
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        self.gossip.conn_closed(conn);
        let peer_id = c.peer_id().cloned();
        if let Some(peer) = peer_id.clone() {
            self.effects
                .push(Effect::Event(Event::PeerDisconnected { conn, peer }));
        }
        for doc in c.docs {
            if let Some(d) = self.docs.get_mut(&doc) {
                if let Some(p) = d.peers.remove(&conn) {
                    if let Some(peer) = peer_id.clone() {
                        if p.status != PeerSyncStatus::Offline {
                            self.effects.push(Effect::Event(Event::SyncStatus {
                                doc,
                                peer,
                                status: PeerSyncStatus::Offline,
                            }));
                        }
                    }
                }
                d.inbox.retain(|m| m.conn != conn);
                d.held.retain(|h| h.from != conn);
                self.touched.insert(doc);
            }
        }
    }

    fn close(&mut self, conn: ConnId, reason: String) {
        if let Some(c) = self.conns.get(&conn) {
            self.effects.push(Effect::Send {
                conn,
                msg: Message::Error {
                    sender_id: Some(self.config.peer_id.clone()),
                    target_id: c.peer_id().cloned(),
                    message: reason.clone(),
                },
            });
        }
        self.effects.push(Effect::Close { conn, reason });
        self.conn_closed(conn);
    }

    fn received(&mut self, now: Millis, conn: ConnId, msg: Message) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        if let (ConnPhase::Ready { peer, .. }, Some(doc)) = (&c.phase, msg.document_id()) {
            let gated = matches!(
                msg,
                Message::Sync { .. } | Message::Request { .. } | Message::Ephemeral { .. }
            );
            if let Some(reason) = c.denied(&doc).filter(|_| gated) {
                // Answer as for a document nobody has: existence is not leaked, and
                // nothing is loaded, applied or forwarded.
                let target = peer.clone();
                self.effects.push(Effect::Send {
                    conn,
                    msg: Message::DocUnavailable {
                        sender_id: self.config.peer_id.clone(),
                        target_id: target,
                        document_id: doc,
                    },
                });
                self.effects
                    .push(Effect::Event(Event::AccessDenied { conn, doc, reason }));
                return;
            }
        }
        match (&c.phase, msg) {
            (
                ConnPhase::AwaitingJoin,
                Message::Join {
                    sender_id,
                    peer_metadata,
                    supported_protocol_versions,
                },
            ) => {
                let ok = supported_protocol_versions.is_empty()
                    || supported_protocol_versions
                        .iter()
                        .any(|v| v == PROTOCOL_VERSION);
                if !ok {
                    let reason = format!(
                        "unsupported protocol versions {supported_protocol_versions:?}; this peer speaks \"{PROTOCOL_VERSION}\""
                    );
                    self.close(conn, reason);
                    return;
                }
                // A second join from the same peer replaces its old socket.
                let stale: Vec<ConnId> = self
                    .conns
                    .iter()
                    .filter(|(id, other)| **id != conn && other.peer_id() == Some(&sender_id))
                    .map(|(id, _)| *id)
                    .collect();
                for old in stale {
                    // Said in an `error` too: two live repos sharing a peer id take turns
                    // replacing each other, and each should learn why it keeps dropping.
                    self.close(
                        old,
                        "replaced by a newer connection from the same peer".into(),
                    );
                }
                self.effects.push(Effect::Send {
                    conn,
                    msg: Message::Peer {
                        sender_id: self.config.peer_id.clone(),
                        target_id: sender_id.clone(),
                        peer_metadata: self.our_metadata(),
                        selected_protocol_version: PROTOCOL_VERSION.to_string(),
                    },
                });
                self.peer_ready(now, conn, sender_id, peer_metadata);
            }
            (
                ConnPhase::AwaitingPeer,
                Message::Peer {
                    sender_id,
                    peer_metadata,
                    ..
                },
            ) => {
                self.peer_ready(now, conn, sender_id, peer_metadata);
            }
            (_, Message::Error { message, .. }) => {
                self.effects.push(Effect::Event(Event::PeerError {
                    conn,
                    error: EngineError::RemoteError(message),
                }));
                self.effects.push(Effect::Close {
                    conn,
                    reason: "peer reported an error".into(),
                });
                self.conn_closed(conn);
            }
            (ConnPhase::AwaitingJoin, other) | (ConnPhase::AwaitingPeer, other) => {
                let reason = format!(
                    "protocol error: `{}` before the handshake completed",
                    other.type_name()
                );
                self.close(conn, reason);
            }
            (ConnPhase::Ready { .. }, Message::Join { .. })
            | (ConnPhase::Ready { .. }, Message::Peer { .. }) => {
                // A repeated handshake on an open socket: harmless, ignore it.
            }
            (
                ConnPhase::Ready { .. },
                Message::Sync {
                    document_id, data, ..
                },
            ) => self.enqueue_sync(now, conn, document_id, data, false),
            (
                ConnPhase::Ready { .. },
                Message::Request {
                    document_id, data, ..
                },
            ) => self.enqueue_sync(now, conn, document_id, data, true),
            (ConnPhase::Ready { .. }, Message::DocUnavailable { document_id, .. }) => {
                if let Some(d) = self.docs.get_mut(&document_id) {
                    let have = d.phase == DocPhase::Ready;
                    if let Some(p) = d.peers.get_mut(&conn) {
                        p.they_unavailable = true;
                        // We had it: they were offered it, not asked for it.
                        p.declined |= have;
                        self.touched.insert(document_id);
                    }
                }
            }
            (
                ConnPhase::Ready { .. },
                Message::Ephemeral {
                    sender_id,
                    document_id,
                    session_id,
                    count,
                    data,
                    ..
                },
            ) => self.ephemeral(conn, sender_id, document_id, session_id, count, data),
            (ConnPhase::Ready { .. }, Message::RemoteSubscriptionChange { add, remove, .. }) => {
                self.remote_subscription_change(conn, add, remove)
            }
            (
                ConnPhase::Ready { .. },
                Message::RemoteHeadsChanged {
                    document_id,
                    new_heads,
                    ..
                },
            ) => self.remote_heads_changed(conn, document_id, new_heads),
        }
    }

    fn peer_ready(&mut self, now: Millis, conn: ConnId, peer: PeerId, meta: PeerMetadata) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.phase = ConnPhase::Ready {
                peer: peer.clone(),
                meta: meta.clone(),
            };
        }
        self.effects.push(Effect::Event(Event::PeerConnected {
            conn,
            peer,
            metadata: meta,
        }));
        self.gossip_peer_ready(conn);
        // Ask the new peer for documents we are looking for; announce ours if we share.
        let ids: Vec<DocumentId> = self.docs.keys().copied().collect();
        for id in ids {
            let d = &self.docs[&id];
            let wanted =
                matches!(d.phase, DocPhase::Requesting | DocPhase::Unavailable) && d.local_want;
            let announce = self.config.announce && d.phase == DocPhase::Ready && d.has_content();
            if wanted || announce {
                self.attach_peer(id, conn);
                if wanted {
                    if let Some(p) = self.docs.get_mut(&id).and_then(|d| d.peers.get_mut(&conn)) {
                        p.asked = true;
                    }
                    if let Some(d) = self.docs.get_mut(&id) {
                        if d.phase == DocPhase::Unavailable {
                            d.phase = DocPhase::Requesting;
                            d.requesting_since = now;
                        }
                    }
                }
                self.touched.insert(id);
            }
        }
    }

    /// Make sure (doc, conn) has sync state; seeds it from persisted state for that peer's storage.
    fn attach_peer(&mut self, id: DocumentId, conn: ConnId) -> bool {
        let Some(c) = self.conns.get_mut(&conn) else {
            return false;
        };
        let storage = c.storage_id().cloned();
        let Some(d) = self.docs.get_mut(&id) else {
            return false;
        };
        if !d.peers.contains_key(&conn) {
            // Nothing is announced or forwarded to a peer for a document it may not see.
            if c.denied(&id).is_some() {
                return false;
            }
            d.add_peer(conn, storage.as_ref(), c.read_only(), c.accepts_unchecked());
            c.docs.insert(id);
            self.gossip_opened(conn, id);
        }
        true
    }

    fn enqueue_sync(
        &mut self,
        now: Millis,
        conn: ConnId,
        id: DocumentId,
        data: Vec<u8>,
        request: bool,
    ) {
        if let std::collections::btree_map::Entry::Vacant(e) = self.docs.entry(id) {
            // Not in memory: look in storage first; the message waits in the inbox.
            e.insert(DocEntry::loading(now));
            self.effects.push(Effect::Load { doc: id });
        }
        self.attach_peer(id, conn);
        let d = self.docs.get_mut(&id).expect("inserted above");
        d.last_activity = now;
        if let Some(p) = d.peers.get_mut(&conn) {
            if request {
                p.they_requested = true;
            }
            // A peer that syncs the document no longer declines it.
            p.declined = false;
            p.awaiting_since = None;
            if let Some(at) = p.forwarded_at.take() {
                // A peer that took long to answer was busy applying: give it a pause in
                // proportion (see `forward`'s "Pacing per peer").
                let took = now
                    .saturating_sub(at)
                    .saturating_mul(forward::FORWARD_PAUSE_FACTOR);
                p.forward_after = now.plus(took.min(forward::MAX_FORWARD_PAUSE_MS));
            }
        }
        d.inbox.push(doc::Inbound {
            conn,
            data,
            request,
            looked_at: false,
        });
        self.touched.insert(id);
    }

    fn ephemeral(
        &mut self,
        conn: ConnId,
        sender: PeerId,
        id: DocumentId,
        session: String,
        count: u64,
        data: Vec<u8>,
    ) {
        if !self.ephemeral_seen.insert(&sender, &session, count, &data) {
            return;
        }
        self.effects.push(Effect::Event(Event::Ephemeral {
            doc: id,
            sender: sender.clone(),
            data: data.clone(),
        }));
        let Some(d) = self.docs.get(&id) else { return };
        for (c, target) in self.ephemeral_targets(d, Some(conn)) {
            self.effects.push(Effect::Send {
                conn: c,
                msg: Message::Ephemeral {
                    sender_id: sender.clone(),
                    target_id: target,
                    document_id: id,
                    session_id: session.clone(),
                    count,
                    data: data.clone(),
                },
            });
        }
    }

    /// Where an ephemeral message for `d` goes: every joined peer of the document but
    /// `except` (its sender) and those that declined the document (each would answer with
    /// `doc-unavailable`).
    fn ephemeral_targets(&self, d: &DocEntry, except: Option<ConnId>) -> Vec<(ConnId, PeerId)> {
        d.peers
            .iter()
            .filter(|(c, p)| Some(**c) != except && !p.declined)
            .filter_map(|(c, _)| Some((*c, self.conns.get(c)?.peer_id()?.clone())))
            .collect()
    }

    fn broadcast(&mut self, id: DocumentId, data: Vec<u8>) {
        let Some(d) = self.docs.get(&id) else { return };
        let targets = self.ephemeral_targets(d, None);
        self.ephemeral_count += 1;
        let count = self.ephemeral_count;
        for (c, target) in targets {
            self.effects.push(Effect::Send {
                conn: c,
                msg: Message::Ephemeral {
                    sender_id: self.config.peer_id.clone(),
                    target_id: target,
                    document_id: id,
                    session_id: self.config.session_id.clone(),
                    count,
                    data: data.clone(),
                },
            });
        }
    }

    fn create(&mut self, now: Millis, id: DocumentId, automerge: Automerge) {
        let entry = DocEntry::ready(now, automerge, Vec::new(), HashMap::new());
        self.docs.insert(id, entry);
        self.effects
            .push(Effect::Event(Event::DocReady { doc: id }));
        if self.config.announce {
            let conns: Vec<ConnId> = self.ready_conns();
            for c in conns {
                self.attach_peer(id, c);
            }
        }
        self.touched.insert(id);
    }

    fn ready_conns(&self) -> Vec<ConnId> {
        let mut v: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| c.peer_id().is_some())
            .map(|(id, _)| *id)
            .collect();
        v.sort();
        v
    }

    fn find(&mut self, now: Millis, id: DocumentId) {
        match self.docs.get_mut(&id) {
            Some(d) => {
                d.local_want = true;
                d.last_activity = now;
                match d.phase {
                    DocPhase::Ready => self
                        .effects
                        .push(Effect::Event(Event::DocReady { doc: id })),
                    DocPhase::Loading | DocPhase::Requesting => {}
                    DocPhase::Unavailable => {
                        // Ask again: peers may have it by now.
                        self.start_requesting(now, id);
                    }
                }
            }
            None => {
                let mut d = DocEntry::loading(now);
                d.local_want = true;
                self.docs.insert(id, d);
                self.effects.push(Effect::Load { doc: id });
            }
        }
    }

    fn cancel_find(&mut self, id: DocumentId) {
        let Some(d) = self.docs.get_mut(&id) else {
            return;
        };
        d.local_want = false;
        let never_arrived = matches!(d.phase, DocPhase::Requesting | DocPhase::Unavailable)
            && !d.has_content()
            && d.inbox.is_empty()
            && Arc::strong_count(&d.doc) == 1;
        if never_arrived {
            self.forget(id);
        } else {
            // Loading, or here after all: eviction takes it when it goes quiet.
            self.touched.insert(id);
        }
    }

    /// Drop a document that has nothing worth keeping from memory.
    fn forget(&mut self, id: DocumentId) {
        self.docs.remove(&id);
        for c in self.conns.values_mut() {
            c.docs.remove(&id);
        }
        self.touched.remove(&id);
        self.effects.push(Effect::Event(Event::Evicted { doc: id }));
    }

    fn loaded(&mut self, now: Millis, id: DocumentId, loaded: Option<Loaded>) {
        let Some(d) = self.docs.get_mut(&id) else {
            return;
        };
        if d.phase != DocPhase::Loading {
            return;
        }
        // Loading took time: the idle clock starts now, or a document whose load finished
        // after `evict_idle_ms` would be evicted in this very step, before the app that asked
        // for it can take a handle.
        d.last_activity = now;
        match loaded {
            Some(l) => {
                let heads = l.doc.get_heads();
                d.become_ready(l.doc, heads, l.sync_states);
                self.effects
                    .push(Effect::Event(Event::DocReady { doc: id }));
                // Peers attached while loading get their persisted sync state now.
                let conns: Vec<ConnId> = d.peers.keys().copied().collect();
                for c in conns {
                    let storage = self.conns.get(&c).and_then(|c| c.storage_id().cloned());
                    if let Some(d) = self.docs.get_mut(&id) {
                        d.reseed_peer(c, storage.as_ref());
                    }
                }
                if self.config.announce {
                    for c in self.ready_conns() {
                        self.attach_peer(id, c);
                    }
                }
            }
            None => {
                // Only a peer that may write can bring a document into existence.
                let has_sync = d
                    .inbox
                    .iter()
                    .any(|m| !m.request && !d.peers.get(&m.conn).is_some_and(|p| p.sync.read_only));
                if has_sync {
                    // A peer is offering a document we did not have: take it.
                    d.become_ready(Automerge::new(), Vec::new(), HashMap::new());
                    self.effects
                        .push(Effect::Event(Event::DocReady { doc: id }));
                } else if !d.local_want && d.inbox.is_empty() {
                    // The find that asked for it was cancelled while it loaded: nobody
                    // wants it any more.
                    self.forget(id);
                } else {
                    self.start_requesting(now, id);
                }
            }
        }
        self.touched.insert(id);
    }

    fn start_requesting(&mut self, now: Millis, id: DocumentId) {
        let ask = self.config.announce || self.docs.get(&id).is_some_and(|d| d.local_want);
        let conns = if ask { self.ready_conns() } else { Vec::new() };
        let Some(d) = self.docs.get_mut(&id) else {
            return;
        };
        d.phase = DocPhase::Requesting;
        d.requesting_since = now;
        for p in d.peers.values_mut() {
            p.they_unavailable = false;
        }
        // Don't ask a peer that is itself asking us.
        let askable: Vec<ConnId> = conns
            .into_iter()
            .filter(|c| !d.peers.get(c).is_some_and(|p| p.they_requested))
            .collect();
        for c in askable {
            self.attach_peer(id, c);
            if let Some(p) = self.docs.get_mut(&id).and_then(|d| d.peers.get_mut(&c)) {
                p.asked = true;
            }
        }
        self.touched.insert(id);
    }

    // ---- the per-document step -----------------------------------------------------------

    fn step_touched(&mut self, now: Millis) {
        while let Some(id) = self.touched.pop_first() {
            self.step_doc(now, id);
        }
        if self.docs.len() > self.config.max_loaded_docs {
            self.evict_least_recent();
        }
    }

    /// Keep memory bounded however many documents are touched: evict the least recently
    /// active documents that can go (see `DocEntry::evictable`).
    fn evict_least_recent(&mut self) {
        let excess = self.docs.len() - self.config.max_loaded_docs;
        let mut candidates: Vec<(Millis, DocumentId)> = self
            .docs
            .iter()
            .filter(|(_, d)| d.evictable())
            .map(|(id, d)| (d.last_activity, *id))
            .collect();
        candidates.sort();
        for (_, id) in candidates.into_iter().take(excess) {
            self.docs.remove(&id);
            for c in self.conns.values_mut() {
                c.docs.remove(&id);
            }
            self.effects.push(Effect::Event(Event::Evicted { doc: id }));
        }
    }

    fn step_doc(&mut self, now: Millis, id: DocumentId) {
        let Some(d) = self.docs.get_mut(&id) else {
            return;
        };
        let peer_ids: HashMap<ConnId, PeerId> = d
            .peers
            .keys()
            .filter_map(|c| Some((*c, self.conns.get(c)?.peer_id()?.clone())))
            .collect();
        let mut out = doc::StepOutput::default();
        d.step(now, id, &self.config, &peer_ids, &mut out);
        for (conn, reason) in out.close {
            self.close(conn, reason);
        }
        for (conn, error) in out.refused {
            let Some(c) = self.conns.get_mut(&conn) else {
                continue;
            };
            if c.refused(now, REFUSALS_WINDOW_MS) >= self.config.refusals_before_close {
                let reason = format!("{error} (and too many refused before)");
                self.effects
                    .push(Effect::Event(Event::PeerError { conn, error }));
                self.close(conn, reason);
            } else {
                self.effects
                    .push(Effect::Event(Event::ChangesRefused { conn, error }));
            }
        }
        self.effects.append(&mut out.effects);
        if out.evict {
            self.docs.remove(&id);
            self.effects.push(Effect::Event(Event::Evicted { doc: id }));
            for c in self.conns.values_mut() {
                c.docs.remove(&id);
            }
        } else {
            self.gossip_heads(now, id);
        }
    }
}

/// Make a fresh shared document handle.
pub fn shared(doc: Automerge) -> SharedDoc {
    Arc::new(parking_lot::Mutex::new(DocCell::new(doc)))
}
