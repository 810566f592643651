//! One document's sync state and its step: apply the inbox in one call, persist the new
//! changes as one chunk, then give each peer at most one message with everything new.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use automerge::sync::{ChunkList, Message as SyncMessage, State as SyncState};
use automerge::{Automerge, ChangeHash, ReadDoc};

use crate::id::{DocumentId, PeerId, StorageId};
use crate::net::ConnId;
use crate::protocol::Message;
use crate::schema::{enforce, RepairContext};

use super::admit::{self, Batch};
use super::basis::has_change;
use super::offload::{Applied, ApplyJob, Offloaded, Precomputed, Taken};
use super::types::{Effect, EngineConfig, EngineError, Event, Millis, SharedDoc};

/// Where a document is in its life in this engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DocPhase {
    /// Waiting for storage.
    Loading,
    /// We have it (possibly empty, if a peer is uploading it right now).
    Ready,
    /// Not in storage; asking peers (or waiting for one to connect or to upload it).
    Requesting,
    /// Every peer that could have it said no. A later sync still makes it ready.
    Unavailable,
}

/// How a document stands with one peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerSyncStatus {
    Offline,
    /// Messages are in flight or the peer's heads differ from ours.
    Syncing,
    /// Both sides have each other's heads.
    Synced,
    /// The peer answered our offer of the document with `doc-unavailable`: it will not take
    /// it (a relay whose token for this connection does not cover the note, or that holds
    /// its limit of documents for one connection). Nothing goes to it until it sends a sync
    /// message for the document (a new connection starts over).
    Declined,
    /// We have everything the peer has, and it lacks changes of ours that it will not take:
    /// it said it is read-only for us (Automerge's `READ_ONLY` sync flag; sheaf-relay says so
    /// to a connection whose token does not allow writing). Our edits stay here.
    ReadOnly,
}

/// A sync or request message waiting in a document's inbox.
pub(super) struct Inbound {
    pub conn: ConnId,
    pub data: Vec<u8>,
    pub request: bool,
    /// Its changes were collected for forwarding (see `forward`).
    pub looked_at: bool,
}

pub(super) struct PeerDoc {
    pub sync: SyncState,
    /// We sent changes and wait for the answer (see `EngineConfig::max_hold_ms`).
    pub awaiting_since: Option<Millis>,
    /// The peer sent `request`: it has no copy and asked us for one.
    pub they_requested: bool,
    /// The peer said `doc-unavailable`.
    pub they_unavailable: bool,
    /// We asked this peer for the document.
    pub asked: bool,
    /// We told the peer `doc-unavailable` (once).
    pub told_unavailable: bool,
    /// The peer said `doc-unavailable` while we had the document: it was offered the
    /// document, not asked for it, and declined (see [`PeerSyncStatus::Declined`]).
    pub declined: bool,
    pub status: PeerSyncStatus,
    /// Changes of this peer wait in the inbox and it was not told we have them yet (see
    /// `forward`).
    pub owes_ack: bool,
    /// The peer holds what it has new until we answer its last changes, as sheaf peers do:
    /// only such a peer is answered early (see `forward`). Cleared when it sends changes
    /// twice without an answer in between.
    pub holds: bool,
    /// It sent changes and we have not sent it anything since.
    pub unanswered: bool,
    /// When we last forwarded this peer changes, until it answers (see `forward`).
    pub forwarded_at: Option<Millis>,
    /// No forward to this peer before this (see `forward`); `Millis(0)`: none pending.
    pub forward_after: Millis,
    /// The peer said it takes changes we have not checked yet (`sheafAcceptsUnchecked`):
    /// only such a peer is forwarded changes before we apply them (see `forward`).
    pub accepts_unchecked: bool,
    storage: Option<StorageId>,
    saved_shared_heads: Vec<ChangeHash>,
}

impl PeerDoc {
    /// The peer's last sync message named heads: it has the document and offers it (unless
    /// its changes are not taken: a read-only connection).
    fn offers(&self) -> bool {
        !self.sync.read_only
            && self
                .sync
                .their_heads
                .as_ref()
                .is_some_and(|h| !h.is_empty())
    }

    /// Sync this document with the peer from scratch, and have the peer do the same (a sync
    /// reset in the next message: it sends again whatever we lack, whatever it sent
    /// before). What it was sent and what it answered no longer count.
    fn restart_sync(&mut self) {
        let their_capabilities = self.sync.their_capabilities.take();
        let read_only = self.sync.read_only;
        self.sync = SyncState::new();
        self.sync.their_capabilities = their_capabilities;
        self.sync.read_only = read_only;
        self.sync.needs_reset = true;
        self.awaiting_since = None;
        self.owes_ack = false;
        self.unanswered = false;
        self.forwarded_at = None;
        self.forward_after = Millis(0);
    }

    /// Runs `f`, Automerge work on this peer's sync state (taking in its message, building
    /// the next one). A panic in it costs the peer its sync state, not the engine: logged,
    /// and the sync starts over with the next message (`None`).
    fn guarded<R>(
        &mut self,
        id: DocumentId,
        what: &str,
        f: impl FnOnce(&mut SyncState) -> R,
    ) -> Option<R> {
        let sync = &mut self.sync;
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(sync))) {
            Ok(r) => Some(r),
            Err(payload) => {
                tracing::warn!(
                    %id,
                    why = %admit::panic_message(payload.as_ref()),
                    "{what} panicked; syncing with the peer from scratch"
                );
                self.restart_sync();
                None
            }
        }
    }

    fn new(sync: SyncState, storage: Option<StorageId>) -> Self {
        let saved = sync.shared_heads.clone();
        Self {
            sync,
            awaiting_since: None,
            they_requested: false,
            they_unavailable: false,
            asked: false,
            told_unavailable: false,
            declined: false,
            status: PeerSyncStatus::Syncing,
            owes_ack: false,
            holds: true,
            unanswered: false,
            forwarded_at: None,
            forward_after: Millis(0),
            accepts_unchecked: false,
            storage,
            saved_shared_heads: saved,
        }
    }
}

pub(super) struct DocEntry {
    pub phase: DocPhase,
    pub doc: SharedDoc,
    pub peers: BTreeMap<ConnId, PeerDoc>,
    pub inbox: Vec<Inbound>,
    /// The inbox's changes, parsed for forwarding before they are applied (see `forward`).
    pub held: Vec<super::forward::HeldChange>,
    /// A local handle asked for this document.
    pub local_want: bool,
    pub requesting_since: Millis,
    pub last_activity: Millis,
    /// Heads covered by the chunks emitted so far.
    persist_heads: Vec<ChangeHash>,
    /// Heads known durable.
    durable_heads: Vec<ChangeHash>,
    next_seq: u64,
    /// Chunks on their way to disk: seq -> heads once applied.
    in_flight: BTreeMap<u64, Vec<ChangeHash>>,
    /// Remote changes as they arrived, with the heads they lead to, when they are exactly
    /// what the next chunk must hold: persisted as they are (see [`Arrived`]).
    arrived: Option<Arrived>,
    /// Persisted sync state per peer storage, to seed peers that connect.
    sync_states: HashMap<StorageId, Vec<u8>>,
    /// The document changed other than through its handles (remote changes applied, loaded,
    /// created): check the schema's invariants in this step.
    needs_check: bool,
    /// The inbox is not applied before this (see [`super::ApplyPacing`]).
    pub(super) next_apply_at: Millis,
    /// Each actor's latest change, for admitting remote ones (see `admit`).
    lineage: super::lineage::Lineage,
    /// What the last apply of remote changes cost (µs; 0 until one is measured).
    last_cost_us: u64,
    /// A batch being applied off the engine's thread, or its result (see `offload`).
    pub(super) offloaded: Option<Offloaded>,
}

/// Remote changes persisted as the bytes they arrived in.
///
/// # Why
///
/// Automerge 0.12 keeps no change bytes: `save_after` rebuilds every change it returns from
/// the op set (`ChangeCollector`), which also works out which changes the heads exclude from
/// the change graph. A peer receiving a steady stream of small changes paid that per batch:
/// 21% of the client engines' time in the fan-out bench (K = 64), more than their sync
/// messages. The bytes that just arrived are those very changes, already validated.
///
/// # When they are exactly the new changes
///
/// The chunk holds what changed since the last chunk: the changes made here and not yet
/// persisted (a handle's edits, repairs; saved just before the apply, while they are all
/// that is new: only the apply adds changes that are not ours) followed by the batch. That
/// needs Automerge's queue of changes waiting for a dependency to be empty before and after
/// the apply (a queued change applied by this batch would be new but not in its bytes; one
/// left queued would be in the bytes but not in the heads). The heads the batch led to are
/// kept with it: what a handle or a repair changes before the chunk is written is saved
/// after those heads and appended. A batch may repeat changes the note already had (a peer
/// that reconnected); they are harmless when loaded, and [`MAX_ARRIVED_CHUNK`] bounds what
/// they can waste until the next compaction.
///
/// Before the local edits went in front, a peer that edits while it receives (every typist
/// in the fan-out bench) mostly had an unpersisted edit when a batch arrived, and rebuilt
/// the whole batch with it: a third of its engine's time at K = 64.
#[derive(Debug)]
struct Arrived {
    heads: Vec<ChangeHash>,
    bytes: Vec<u8>,
}

/// Largest batch of remote changes persisted as it arrived (a fresh copy always is).
const MAX_ARRIVED_CHUNK: usize = 1 << 20;

/// What a step produced, for the engine to carry out.
#[derive(Default)]
pub(super) struct StepOutput {
    pub effects: Vec<Effect>,
    pub close: Vec<(ConnId, String)>,
    /// Connections whose changes were refused but that stay open, unless the engine counts
    /// too many refusals (see `EngineConfig::refusals_before_close`).
    pub refused: Vec<(ConnId, EngineError)>,
    pub evict: bool,
}

impl StepOutput {
    /// Close `conn` for what it sent, and tell the app why.
    fn reject(&mut self, conn: ConnId, error: EngineError) {
        self.close.push((conn, error.to_string()));
        self.effects
            .push(Effect::Event(Event::PeerError { conn, error }));
    }
}

fn blank(now: Millis, phase: DocPhase, doc: Automerge) -> DocEntry {
    DocEntry {
        phase,
        doc: super::shared(doc),
        peers: BTreeMap::new(),
        inbox: Vec::new(),
        held: Vec::new(),
        next_apply_at: Millis(0),
        last_cost_us: 0,
        offloaded: None,
        lineage: Default::default(),
        local_want: false,
        requesting_since: now,
        last_activity: now,
        persist_heads: Vec::new(),
        durable_heads: Vec::new(),
        next_seq: 1,
        in_flight: BTreeMap::new(),
        arrived: None,
        sync_states: HashMap::new(),
        needs_check: false,
    }
}

impl DocEntry {
    pub fn loading(now: Millis) -> Self {
        blank(now, DocPhase::Loading, Automerge::new())
    }

    /// A document whose chunks up to `durable_heads` are already stored.
    pub fn ready(
        now: Millis,
        doc: Automerge,
        durable_heads: Vec<ChangeHash>,
        sync_states: HashMap<StorageId, Vec<u8>>,
    ) -> Self {
        let mut d = blank(now, DocPhase::Ready, Automerge::new());
        d.become_ready(doc, durable_heads, sync_states);
        d
    }

    pub fn become_ready(
        &mut self,
        doc: Automerge,
        durable_heads: Vec<ChangeHash>,
        sync_states: HashMap<StorageId, Vec<u8>>,
    ) {
        self.doc.lock().replace(doc);
        self.persist_heads = durable_heads.clone();
        self.durable_heads = durable_heads;
        self.sync_states = sync_states;
        self.phase = DocPhase::Ready;
        self.needs_check = true;
    }

    pub fn has_content(&self) -> bool {
        !self.doc.lock().get_heads().is_empty()
    }

    /// Sync state for a new peer; a `read_only` peer's changes are never applied, and only
    /// a peer that `accepts_unchecked` is forwarded changes before we apply them.
    pub fn add_peer(
        &mut self,
        conn: ConnId,
        storage: Option<&StorageId>,
        read_only: bool,
        accepts_unchecked: bool,
    ) {
        let mut sync = self.seed_state(storage);
        sync.set_read_only(read_only);
        let mut p = PeerDoc::new(sync, storage.cloned());
        p.accepts_unchecked = accepts_unchecked;
        self.peers.insert(conn, p);
    }

    /// After a load, replace a peer's fresh state with what we persisted for its storage.
    pub fn reseed_peer(&mut self, conn: ConnId, storage: Option<&StorageId>) {
        let sync = self.seed_state(storage);
        if let Some(p) = self.peers.get_mut(&conn) {
            if p.sync.shared_heads.is_empty() && !sync.shared_heads.is_empty() {
                let read_only = p.sync.read_only;
                p.saved_shared_heads = sync.shared_heads.clone();
                p.sync = sync;
                p.sync.set_read_only(read_only);
            }
        }
    }

    /// Sync state for a connecting peer: only the shared heads survive a reconnect
    /// (`State::encode` keeps nothing else), so whatever was lost in flight is re-sent.
    fn seed_state(&self, storage: Option<&StorageId>) -> SyncState {
        storage
            .and_then(|s| self.sync_states.get(s))
            .and_then(|b| SyncState::decode(b).ok())
            .unwrap_or_default()
    }

    /// Record a storage answer; true when the document should be stepped.
    pub fn persisted(&mut self, seq: u64, ok: bool) -> bool {
        let Some(heads) = self.in_flight.remove(&seq) else {
            return false;
        };
        if ok {
            if self.in_flight.keys().all(|s| *s > seq) {
                self.durable_heads = heads;
            }
        } else {
            // Write everything from the last durable point again on the next step.
            self.in_flight.clear();
            self.persist_heads = self.durable_heads.clone();
        }
        true
    }

    fn gated(&self, config: &EngineConfig) -> bool {
        config.durable_before_send && !self.in_flight.is_empty()
    }

    pub fn next_deadline(&self, config: &EngineConfig) -> Option<Millis> {
        let mut t: Option<Millis> = None;
        let mut at = |m: Millis| t = Some(t.map_or(m, |x| x.min(m)));
        if self.phase == DocPhase::Requesting
            && self.peers.values().any(|p| p.they_requested)
            && !self.offered()
        {
            at(self.requesting_since.plus(config.request_grace_ms));
        }
        for p in self.peers.values() {
            if let Some(s) = p.awaiting_since {
                at(s.plus(config.max_hold_ms));
            }
        }
        // Held changes for a peer whose forwards are paced (see `forward`).
        for (conn, p) in &self.peers {
            if p.forward_after.0 > 0 && p.awaiting_since.is_none() && self.forward_pending(*conn, p)
            {
                at(p.forward_after);
            }
        }
        // A paced inbox. (While a chunk is in flight, `Persisted` steps the document.)
        if !self.inbox.is_empty()
            && self.phase != DocPhase::Loading
            && !self.gated(config)
            && self.offloaded.is_none()
        {
            at(self.next_apply_at);
        }
        if self.idle() {
            at(self.last_activity.plus(config.evict_idle_ms));
        }
        t
    }

    pub fn step(
        &mut self,
        now: Millis,
        id: DocumentId,
        config: &EngineConfig,
        peer_ids: &HashMap<ConnId, PeerId>,
        out: &mut StepOutput,
    ) {
        if self.phase == DocPhase::Loading {
            return;
        }
        if !self.gated(config) {
            match self.offloaded.take() {
                Some(Offloaded::Done(taken, outcome)) => {
                    let pre = Precomputed {
                        heads: taken.heads,
                        hashes: taken.hashes,
                        outcome,
                    };
                    self.apply_inbox(now, id, config, out, taken.inbound, Some(pre));
                }
                running @ Some(Offloaded::Running(_)) => self.offloaded = running,
                None if now >= self.next_apply_at => self.apply_due(now, id, config, out),
                None => {}
            }
        }
        if std::mem::take(&mut self.needs_check) {
            self.enforce(now, id, config, out);
        }
        // Local changes are written even while a chunk is on its way: waiting would only
        // delay `saved()`; the store writes a document's chunks in order.
        self.persist(id, out);
        if self.phase != DocPhase::Ready && self.has_content() {
            self.phase = DocPhase::Ready;
            out.effects.push(Effect::Event(Event::DocReady { doc: id }));
        }
        if self.phase == DocPhase::Unavailable && self.offered() {
            // A peer has it after all (one that connected after the others said no, or
            // whose announcement came with the end of the grace period): answer it, so
            // that its changes come, and go on to whoever asked.
            self.phase = DocPhase::Requesting;
            self.requesting_since = now;
        }
        if self.phase == DocPhase::Requesting {
            self.check_unavailable(now, id, config, peer_ids, out);
        }
        if !self.gated(config) {
            self.send(now, id, config, peer_ids, out);
        }
        // What a paced inbox holds goes to the other peers now (see `forward`).
        self.forward_held(now, id, config, peer_ids, out);
        self.report(id, peer_ids, out);
        self.check_evict(now, config, out);
    }

    /// The inbox is due: hand it out (see `offload`) or apply it here.
    fn apply_due(
        &mut self,
        now: Millis,
        id: DocumentId,
        config: &EngineConfig,
        out: &mut StepOutput,
    ) {
        if !self.offload(id, config, out) {
            let inbox = std::mem::take(&mut self.inbox);
            self.apply_inbox(now, id, config, out, inbox, None);
        }
    }

    /// Hand an expensive note's inbox to a job off the engine's thread (see `offload`);
    /// `false` if it is not for one (the caller applies it here).
    fn offload(&mut self, id: DocumentId, config: &EngineConfig, out: &mut StepOutput) -> bool {
        if !config.offload_applies
            || config.apply_pacing.pause_ms(self.last_cost_us) == 0
            || self.phase != DocPhase::Ready
            || self.inbox.is_empty()
        {
            return false;
        }
        let doc = self.doc.lock();
        // A first copy, or changes waiting for a dependency (their apply is not only this
        // batch's): the ordinary path.
        if doc.is_empty() || !doc.get_missing_deps(&[]).is_empty() {
            return false;
        }
        // The changes `apply_inbox` will gather from these messages; anything it would
        // reject or leave to the loader is left to it.
        let mut changes = Vec::new();
        for m in &self.inbox {
            let Some(p) = self.peers.get(&m.conn) else {
                continue;
            };
            let Ok(msg) = SyncMessage::decode(&m.data) else {
                return false;
            };
            if bad_bloom(&msg).is_some() {
                return false;
            }
            if p.sync.read_only {
                continue;
            }
            for entry in msg.changes.iter() {
                if !matches!(parse_entry(entry, &mut changes), Ok(true)) {
                    return false;
                }
            }
        }
        if changes.is_empty() {
            return false;
        }
        let hashes = changes.iter().map(automerge::Change::hash).collect();
        let job = ApplyJob {
            doc: id,
            note: (**doc).clone(),
            lineage: self.lineage.clone(),
            changes,
            log: doc.patch_log(),
            clock: config.cost_clock.clone(),
        };
        let heads = doc.get_heads();
        drop(doc);
        self.offloaded = Some(Offloaded::Running(Taken {
            inbound: std::mem::take(&mut self.inbox),
            heads,
            hashes,
        }));
        out.effects.push(Effect::Apply(Box::new(job)));
        true
    }

    /// An offloaded batch's result is in: `true` if this document was waiting for it.
    pub(super) fn applied(&mut self, outcome: Box<Applied>) -> bool {
        match self.offloaded.take() {
            Some(Offloaded::Running(taken)) => {
                self.offloaded = Some(Offloaded::Done(taken, outcome));
                true
            }
            other => {
                self.offloaded = other;
                false
            }
        }
    }

    /// Apply the changes of `inbox` (messages taken from the inbox) in one call, then run
    /// each message's bookkeeping without its changes. `pre` is an offloaded apply of
    /// them, used if it still fits (see `offload`).
    fn apply_inbox(
        &mut self,
        now: Millis,
        id: DocumentId,
        config: &EngineConfig,
        out: &mut StepOutput,
        inbox: Vec<Inbound>,
        pre: Option<Precomputed>,
    ) {
        if inbox.is_empty() {
            return;
        }
        // Applied now: what was forwarded is acknowledged by the heads sent after this
        // (what is still in the inbox, come while an offloaded apply ran, stays held).
        for (conn, p) in self.peers.iter_mut() {
            if !self.inbox.iter().any(|m| m.conn == *conn) {
                p.owes_ack = false;
            }
        }
        let mut decoded: Vec<(ConnId, SyncMessage)> = Vec::with_capacity(inbox.len());
        for m in inbox {
            if !self.peers.contains_key(&m.conn) {
                continue;
            }
            match SyncMessage::decode(&m.data)
                .map_err(|e| e.to_string())
                .and_then(|msg| match bad_bloom(&msg) {
                    Some(why) => Err(why),
                    None => Ok(msg),
                }) {
                Ok(msg) => decoded.push((m.conn, msg)),
                Err(e) => {
                    out.reject(m.conn, EngineError::BadSyncMessage { doc: id, reason: e });
                }
            }
        }
        let mut all = Vec::new();
        let mut ranges: Vec<(ConnId, std::ops::Range<usize>)> = Vec::new();
        let mut rejected: Vec<ConnId> = Vec::new();
        let had_changes: Vec<bool> = decoded.iter().map(|(_, m)| !m.changes.is_empty()).collect();
        let mut parsed: Vec<automerge::Change> = Vec::new();
        let mut all_parsed = true;
        for (conn, msg) in decoded.iter_mut() {
            if msg.changes.is_empty() {
                continue;
            }
            let changes = std::mem::replace(&mut msg.changes, ChunkList::empty());
            if self.peers.get(conn).is_some_and(|p| p.sync.read_only) {
                continue;
            }
            // Every change is checked before anything is applied (see `parse_entry`).
            let start = parsed.len();
            let damaged = changes
                .iter()
                .find_map(|entry| match parse_entry(entry, &mut parsed) {
                    Ok(all) => {
                        all_parsed &= all;
                        None
                    }
                    Err(why) => Some(why),
                });
            if let Some(reason) = damaged {
                parsed.truncate(start);
                out.reject(*conn, EngineError::BadChanges { doc: id, reason });
                rejected.push(*conn);
                continue;
            }
            let start = all.len();
            for c in changes.iter() {
                all.extend_from_slice(c);
            }
            ranges.push((*conn, start..all.len()));
        }
        let mut doc = self.doc.lock();
        let mut bad: Vec<ConnId> = rejected;
        let heads_before = doc.get_heads();
        let was_empty = heads_before.is_empty();
        // Nothing waits for a dependency (cheap to ask when nothing does).
        let queue_was_empty = doc.get_missing_deps(&[]).is_empty();
        // Changes made here since the last chunk (local edits not yet stepped, repairs):
        // saved now, while they are all that is new, so that the batch can be stored as it
        // arrived behind them (see `Arrived`) instead of being rebuilt with them.
        let storable = !was_empty
            && queue_was_empty
            && !self.persist_heads.is_empty()
            && all.len() <= MAX_ARRIVED_CHUNK;
        let prefix = (storable && heads_before != self.persist_heads)
            .then(|| doc.save_after(&self.persist_heads));
        let started = config.cost_clock.as_ref().map(|c| (c.0)());
        // Subscribers to changes get this batch's patches from the apply itself (see
        // `journal`): a diff afterwards would walk the whole note again.
        let mut log = doc.patch_log();
        // The changes as parsed above, unless a chunk is left to the loader or this is a
        // first copy (`load_incremental` loads that as a document).
        let parsed = (all_parsed && !was_empty).then_some(parsed);
        // An offloaded apply fits if the note has not moved since its copy was made and
        // these are its changes (no sender gone meanwhile).
        let pre = pre.filter(|p| {
            p.heads == heads_before
                && parsed.as_ref().is_some_and(|c| {
                    c.len() == p.hashes.len()
                        && c.iter().zip(&p.hashes).all(|(c, h)| c.hash() == *h)
                })
        });
        let mut offloaded_cost = None;
        // Admitted only if Automerge neither panics on it nor is left with a note it
        // cannot keep (see `admit`).
        let admitted = match pre {
            _ if all.is_empty() => None,
            Some(pre) => {
                offloaded_cost = Some(pre.outcome.cost_us);
                Some(pre.outcome.result.map(|trial| {
                    **doc = trial.note;
                    self.lineage = trial.lineage;
                    log = trial.log;
                }))
            }
            None => {
                let batch = match parsed {
                    Some(p) => Batch::Changes(p),
                    None => Batch::Bytes(&all),
                };
                Some(admit::apply(
                    &mut doc,
                    &mut self.lineage,
                    batch,
                    log.as_mut(),
                ))
            }
        };
        let applied = match admitted {
            None => false,
            Some(Ok(())) => true,
            Some(Err(e)) => {
                tracing::debug!(doc = %id, error = %e, "a batch of remote changes was not admitted; trying each sender's alone");
                false
            }
        };
        // What was held for forwarding and is now applied (or refused) is held no more.
        let remaining = &self.inbox;
        self.held
            .retain(|h| remaining.iter().any(|m| m.conn == h.from) && !has_change(&doc, &h.hash));
        if let (true, Some(log)) = (applied, log) {
            doc.record(heads_before.clone(), log);
        }
        if let (Some(clock), Some(started)) = (&config.cost_clock, started) {
            // A first copy is a load, not an edit: it says nothing about the next apply.
            if !all.is_empty() && !was_empty {
                // `now` is when this step began; an apply here ended about `cost` later.
                let (cost, here) = match offloaded_cost {
                    Some(cost) => (cost, 0),
                    None => {
                        let cost = (clock.0)().saturating_sub(started);
                        (cost, cost)
                    }
                };
                self.last_cost_us = cost;
                self.next_apply_at = match config.apply_pacing.pause_ms(cost) {
                    0 => now,
                    pause => now.plus(here / 1000 + pause),
                };
            }
        }
        // Store the bytes as they came instead of saving the document again when they are
        // a fresh copy that arrived whole (a second full encode of a big note), or exactly
        // what is new since the last chunk (see `Arrived`).
        let fresh_copy = was_empty && bad.is_empty();
        self.arrived = None;
        if applied {
            // Bytes left to `load_incremental` (a bundle, a document chunk) may hold a part
            // it skipped: stored as they came they would be quarantined on the next load.
            if fresh_copy || (storable && all_parsed && doc.get_missing_deps(&[]).is_empty()) {
                let bytes = match prefix {
                    Some(mut p) => {
                        p.extend_from_slice(&all);
                        p
                    }
                    None => std::mem::take(&mut all),
                };
                self.arrived = Some(Arrived {
                    heads: doc.get_heads(),
                    bytes,
                });
            }
        } else if !all.is_empty() {
            // Find the culprit(s); whatever is valid is applied (changes are idempotent).
            let mut failed = Vec::new();
            for (conn, r) in &ranges {
                if let Err(e) = admit::apply(
                    &mut doc,
                    &mut self.lineage,
                    Batch::Bytes(&all[r.clone()]),
                    None,
                ) {
                    failed.push((*conn, r.clone(), e));
                }
            }
            // Every sender failing while changes waited for a dependency may be one of
            // those (forged and queued earlier) failing each time it becomes ready: try
            // again without them.
            if !failed.is_empty() && failed.len() == ranges.len() && !queue_was_empty {
                if let Ok(fresh) = admit::without_queue(&doc) {
                    tracing::warn!(doc = %id, "dropped the changes waiting for a dependency: every sender's changes failed with them");
                    **doc = fresh;
                    failed.retain(|(_, r, _)| {
                        admit::apply(
                            &mut doc,
                            &mut self.lineage,
                            Batch::Bytes(&all[r.clone()]),
                            None,
                        )
                        .is_err()
                    });
                }
            }
            for (conn, _, e) in failed {
                if !bad.contains(&conn) {
                    bad.push(conn);
                    tracing::warn!(doc = %id, conn = ?conn, error = %e, "rejected a peer's changes");
                    let error = EngineError::BadChanges {
                        doc: id,
                        reason: e.to_string(),
                    };
                    if config.refusals_before_close > 1 {
                        // Kept open (see `EngineConfig::refusals_before_close`): start
                        // this document's sync with it again.
                        if let Some(p) = self.peers.get_mut(&conn) {
                            p.restart_sync();
                        }
                        out.refused.push((conn, error));
                    } else {
                        out.reject(conn, error);
                    }
                }
            }
        }
        let moved = doc.get_heads() != heads_before;
        for ((conn, msg), had_changes) in decoded.into_iter().zip(had_changes) {
            if bad.contains(&conn) {
                continue;
            }
            let Some(p) = self.peers.get_mut(&conn) else {
                continue;
            };
            // The changes were applied above, so the receive (`receive_applied`, which does
            // what automerge's `receive_sync_message` does) sees a message without changes
            // whose heads equal ours, and records that we already told the
            // peer those heads (`last_sent_heads`): we would then never acknowledge the
            // changes, and the sender would hold everything new for `max_hold_ms`. Keep
            // `last_sent_heads` as automerge does for a message that carries changes.
            // The same goes for a message without changes when this batch moved our heads:
            // its heads may equal ours only because of changes another message of the batch
            // brought (a peer's heads-only message followed by its changes, both waiting
            // while a write was in flight), and automerge would then take it that the peer
            // knows our new heads, which nobody told it.
            let last_sent = (had_changes || moved).then(|| p.sync.last_sent_heads.clone());
            // The message's changes are gone (applied above), so the receive only reads the
            // note and writes the peer's sync state. Should Automerge panic on some field
            // of the message (as it did building a message from a repeated `need`, see
            // `receive`), that costs this peer its sync state, not the engine.
            let Some(result) = p.guarded(id, "taking in a sync message", |sync| {
                super::receive::receive_applied(&mut doc, sync, msg)
            }) else {
                continue;
            };
            if let Some(last_sent) = last_sent {
                p.sync.last_sent_heads = last_sent;
            }
            if let Err(e) = result {
                let reason = e.to_string();
                out.reject(conn, EngineError::BadSyncMessage { doc: id, reason });
            }
        }
        if doc.get_heads() != heads_before {
            self.needs_check = true;
        }
    }

    /// Check the schema's invariants and repair what a merge broke: each repair is a local
    /// change of this peer (persisted and sent by the rest of this step).
    fn enforce(
        &mut self,
        now: Millis,
        id: DocumentId,
        config: &EngineConfig,
        out: &mut StepOutput,
    ) {
        if config.schema.is_empty() {
            return;
        }
        let cx = RepairContext {
            doc: id,
            actor: config.repair_actor.as_ref(),
            time: config.clock_offset_ms.saturating_add_unsigned(now.0) / 1000,
        };
        let events = enforce(&config.schema, &mut self.doc.lock(), &cx);
        for e in events {
            out.effects.push(Effect::Event(Event::Repair(e)));
        }
    }

    /// Emit the changes not yet on their way to disk as one chunk.
    fn persist(&mut self, id: DocumentId, out: &mut StepOutput) {
        let doc = self.doc.lock();
        let heads = doc.get_heads();
        if heads == self.persist_heads || heads.is_empty() {
            return;
        }
        let snapshot = self.persist_heads.is_empty();
        let chunk = match self.arrived.take() {
            Some(a) if a.heads == heads => a.bytes,
            // Edited since the apply (a handle, a repair): those changes follow the batch.
            Some(mut a) if !snapshot => {
                a.bytes.extend(doc.save_after(&a.heads));
                a.bytes
            }
            _ if snapshot => doc.save(),
            _ => doc.save_after(&self.persist_heads),
        };
        drop(doc);
        let seq = self.next_seq;
        self.next_seq += 1;
        self.in_flight.insert(seq, heads.clone());
        self.persist_heads = heads.clone();
        out.effects.push(Effect::Persist {
            doc: id,
            seq,
            chunk,
            heads: heads.clone(),
            snapshot,
        });
        out.effects.push(Effect::Event(Event::DocChanged {
            doc: id,
            heads,
            remote: true,
        }));
    }

    /// Some peer offers the document (see [`PeerDoc::offers`]).
    fn offered(&self) -> bool {
        self.peers.values().any(PeerDoc::offers)
    }

    fn check_unavailable(
        &mut self,
        now: Millis,
        id: DocumentId,
        config: &EngineConfig,
        peer_ids: &HashMap<ConnId, PeerId>,
        out: &mut StepOutput,
    ) {
        if self.offered() {
            return;
        }
        let asked: Vec<&PeerDoc> = self.peers.values().filter(|p| p.asked).collect();
        let all_said_no = !asked.is_empty() && asked.iter().all(|p| p.they_unavailable);
        let requesters = self.peers.values().any(|p| p.they_requested);
        let grace_over = asked.is_empty()
            && requesters
            && now.saturating_sub(self.requesting_since) >= config.request_grace_ms;
        if !(all_said_no || grace_over) {
            return;
        }
        self.phase = DocPhase::Unavailable;
        out.effects
            .push(Effect::Event(Event::DocUnavailable { doc: id }));
        for (conn, p) in self.peers.iter_mut() {
            if p.they_requested && !p.told_unavailable {
                p.told_unavailable = true;
                if let Some(target) = peer_ids.get(conn) {
                    out.effects.push(Effect::Send {
                        conn: *conn,
                        msg: Message::DocUnavailable {
                            sender_id: config.peer_id.clone(),
                            target_id: target.clone(),
                            document_id: id,
                        },
                    });
                }
            }
        }
    }

    fn send(
        &mut self,
        now: Millis,
        id: DocumentId,
        config: &EngineConfig,
        peer_ids: &HashMap<ConnId, PeerId>,
        out: &mut StepOutput,
    ) {
        if self.phase == DocPhase::Unavailable || self.phase == DocPhase::Loading {
            return;
        }
        let doc = self.doc.lock();
        let empty = doc.get_heads().is_empty();
        for (conn, p) in self.peers.iter_mut() {
            let Some(target) = peer_ids.get(conn) else {
                continue;
            };
            if empty && !p.asked && !p.offers() {
                // We have nothing to give: talk only to peers we ask, or that offer it.
                continue;
            }
            if p.declined {
                // It would only decline again (see `PeerSyncStatus::Declined`).
                continue;
            }
            if let Some(since) = p.awaiting_since {
                if now.saturating_sub(since) < config.max_hold_ms {
                    continue;
                }
                p.awaiting_since = None;
            }
            // Automerge builds the message from what the peer told us (its heads, needs,
            // Bloom filter), and some such fields made it panic (see `receive`). Any other
            // that does must cost this peer its sync state, not the engine: it syncs from
            // scratch with the next message.
            let Some(Some(msg)) = p.guarded(id, "building a sync message", |sync| {
                super::basis::generate(&doc, sync)
            }) else {
                continue;
            };
            if !msg.changes.is_empty() {
                p.awaiting_since = Some(now);
            }
            p.unanswered = false;
            let data = msg.encode();
            let msg = if empty {
                Message::Request {
                    sender_id: config.peer_id.clone(),
                    target_id: target.clone(),
                    document_id: id,
                    data,
                }
            } else {
                Message::Sync {
                    sender_id: config.peer_id.clone(),
                    target_id: target.clone(),
                    document_id: id,
                    data,
                }
            };
            out.effects.push(Effect::Send { conn: *conn, msg });
        }
    }

    /// Sync status events and sync state worth persisting.
    fn report(&mut self, id: DocumentId, peer_ids: &HashMap<ConnId, PeerId>, out: &mut StepOutput) {
        let heads = self.doc.lock().get_heads();
        let busy = !self.inbox.is_empty() || !self.in_flight.is_empty();
        for (conn, p) in self.peers.iter_mut() {
            let Some(peer) = peer_ids.get(conn) else {
                continue;
            };
            let settled = !busy && p.awaiting_since.is_none();
            let status = if p.declined {
                PeerSyncStatus::Declined
            } else if settled && p.sync.their_heads.as_ref() == Some(&heads) {
                PeerSyncStatus::Synced
            } else if settled
                && p.sync.is_peer_read_only()
                && p.sync.their_heads.as_ref().is_some_and(|theirs| {
                    let doc = self.doc.lock();
                    theirs
                        .iter()
                        .all(|h| doc.get_change_meta_by_hash(h).is_some())
                })
            {
                // We have all it has; what it lacks is ours, and it will not take it.
                PeerSyncStatus::ReadOnly
            } else {
                PeerSyncStatus::Syncing
            };
            if status != p.status {
                p.status = status;
                out.effects.push(Effect::Event(Event::SyncStatus {
                    doc: id,
                    peer: peer.clone(),
                    status,
                }));
            }
            if let Some(storage) = &p.storage {
                if p.sync.shared_heads != p.saved_shared_heads && !p.sync.shared_heads.is_empty() {
                    p.saved_shared_heads = p.sync.shared_heads.clone();
                    let state = p.sync.encode();
                    self.sync_states.insert(storage.clone(), state.clone());
                    out.effects.push(Effect::SaveSyncState {
                        doc: id,
                        storage_id: storage.clone(),
                        state,
                    });
                }
            }
        }
    }

    /// Nothing keeps the document in memory but (maybe) a handle: no peer, no queued message,
    /// no write in flight, not loading, and no local `find` waiting for a peer to supply it
    /// (evicting that one would forget the request: the app would never hear back).
    fn idle(&self) -> bool {
        self.peers.is_empty()
            && self.inbox.is_empty()
            && self.offloaded.is_none()
            && self.in_flight.is_empty()
            && self.phase != DocPhase::Loading
            && !(self.local_want && self.phase == DocPhase::Requesting)
    }

    fn check_evict(&mut self, now: Millis, config: &EngineConfig, out: &mut StepOutput) {
        if !self.idle() || now.saturating_sub(self.last_activity) < config.evict_idle_ms {
            return;
        }
        if Arc::strong_count(&self.doc) > 1 {
            // A handle is alive: look again after another idle period.
            self.last_activity = now;
            return;
        }
        out.evict = self.evictable();
    }

    /// Can be dropped from memory without losing anything: quiet, every change on disk, and
    /// no handle holds it.
    pub fn evictable(&self) -> bool {
        self.idle()
            && Arc::strong_count(&self.doc) == 1
            && self.persist_heads == self.doc.lock().get_heads()
    }
}

/// Most probes a peer's Bloom filter may ask for (Automerge uses 7): each lookup costs one
/// step per probe, so a filter that asks for billions is a way to stall us.
const MAX_BLOOM_PROBES: u64 = 64;

/// Why a sync message's Bloom filters would make Automerge panic or stall when we next
/// answer the peer, if they would. `SyncMessage::decode` accepts a filter that claims
/// entries but has no bits (zero bits per entry): looking a hash up in it divides by zero
/// (automerge 0.12 `BloomFilter::get_probes`), which a peer could use to crash a relay. The
/// fields are private, so this reads them back from the filter's encoding: three LEB128
/// numbers (entries, bits per entry, probes) and the bits; empty for an empty filter.
fn bad_bloom(msg: &SyncMessage) -> Option<String> {
    for have in &msg.have {
        let bytes = have.bloom.to_bytes();
        if bytes.is_empty() {
            continue; // an empty filter (no entries) encodes as nothing
        }
        let mut fields = [0u64; 3];
        let mut rest = &bytes[..];
        for field in fields.iter_mut() {
            match leb128::read::unsigned(&mut rest) {
                Ok(v) => *field = v,
                Err(_) => return Some("an unreadable Bloom filter".into()),
            }
        }
        let [entries, bits_per_entry, probes] = fields;
        if entries == 0 {
            continue;
        }
        if rest.is_empty() || bits_per_entry == 0 {
            return Some(format!(
                "a Bloom filter of {entries} entries without bits ({bits_per_entry} bits per entry)"
            ));
        }
        if probes > MAX_BLOOM_PROBES {
            return Some(format!(
                "a Bloom filter asking for {probes} probes per lookup (at most {MAX_BLOOM_PROBES})"
            ));
        }
    }
    None
}

/// Parses the change chunks of an entry of a sync message's `changes` into `out`, which
/// checks each one's checksum and columns. `Err` says why the entry is damaged (and leaves
/// `out` as it was). `Ok(false)`: the entry also holds a chunk left to the loader: a
/// document chunk (sent once to a fresh peer) or a bundle.
///
/// # Why parse here
///
/// `load_incremental` silently skips a chunk that does not parse (a partial load is not an
/// error in automerge 0.12), so a damaged change would vanish without a word while the
/// connection carries on: each change is checked before the apply. Parsing is also most of
/// what `load_incremental` does before applying (a fifth of a client's engine time in the
/// fan-out bench), so the apply takes the changes parsed here instead of the bytes.
fn parse_entry(entry: &[u8], out: &mut Vec<automerge::Change>) -> Result<bool, String> {
    let chunks = storage_chunks(entry)?;
    let start = out.len();
    let mut all_changes = true;
    for c in chunks {
        match c[8] {
            0 | 3 => all_changes = false,
            _ => match parse_change(c) {
                Ok(change) => out.push(change),
                Err(e) => {
                    out.truncate(start);
                    return Err(e);
                }
            },
        }
    }
    Ok(all_changes)
}

/// Parses one change chunk (plain or compressed), checksum included: the header's checksum
/// is the first 4 bytes of the change's hash, which `Change::try_from` does not compare
/// (`load_incremental` does, and skips a chunk that fails). A change with a wrong checksum
/// must not reach `apply_changes`, nor another peer: the fuzzer found one (a byte changed
/// in a valid change) that names an actor the note lacks, and Automerge panics on that.
pub(super) fn parse_change(chunk: &[u8]) -> Result<automerge::Change, String> {
    let change = automerge::Change::try_from(chunk).map_err(|e| e.to_string())?;
    if chunk.get(4..8) != Some(&change.hash().0[..4]) {
        return Err("a change whose checksum does not match its bytes".into());
    }
    Ok(change)
}

/// Splits an entry of a sync message's `changes` into its storage chunks, headers included.
/// An entry is one or more chunks back to back; each starts with the magic bytes, a 4-byte
/// checksum, the chunk type (0 = document, 1 = change, 2 = compressed change; byte 8 of
/// each returned slice) and the body length (LEB128). Checks the framing only.
pub(super) fn storage_chunks(entry: &[u8]) -> Result<Vec<&[u8]>, &'static str> {
    const MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];
    let mut chunks = Vec::new();
    let mut rest = entry;
    while !rest.is_empty() {
        if rest.len() < 10 || rest[..4] != MAGIC {
            return Err("a chunk without the automerge magic bytes");
        }
        let (mut len, mut shift, mut i) = (0u64, 0u32, 9usize);
        loop {
            let Some(b) = rest.get(i) else {
                return Err("a truncated chunk header");
            };
            if shift > 56 {
                return Err("a chunk length out of range");
            }
            len |= u64::from(b & 0x7f) << shift;
            shift += 7;
            i += 1;
            if b & 0x80 == 0 {
                break;
            }
        }
        let end = match usize::try_from(len).ok().and_then(|l| l.checked_add(i)) {
            Some(end) if end <= rest.len() => end,
            _ => return Err("a truncated chunk"),
        };
        chunks.push(&rest[..end]);
        rest = &rest[end..];
    }
    Ok(chunks)
}
