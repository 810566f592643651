//! Remote-heads gossip: telling a peer which heads another peer's storage holds.
//!
//! # Why
//!
//! automerge-repo 2.x (with `enableRemoteHeadsGossiping`) lets an app ask "what does my
//! laptop have of this note?": `repo.subscribeToRemotes([laptopStorageId])`, then
//! `handle.on("remote-heads", ...)` / `handle.getSyncInfo(storageId)`. The phone is not
//! connected to the laptop, the relay between them is: the phone sends the relay a
//! `remote-subscription-change` naming the storage ids it wants to hear about, and the relay
//! answers with `remote-heads-changed` whenever a peer with one of those storage ids sends it
//! new heads for a document the phone has open. Without this a JS app's "saved on your other
//! devices" indicator stays blank behind `sheaf-relay`.
//!
//! # What is sent, to whom
//!
//! - A connection's subscriptions are the storage ids it added and has not removed; they end
//!   with the connection.
//! - When a peer with a storage id (and not ephemeral) names new heads for a document in a
//!   sync message, those heads are remembered with the wall-clock time (ms) and sent to every
//!   other connection subscribed to that storage id that has the document open.
//! - A `remote-heads-changed` from a peer (a hub further along) is taken for storage ids
//!   somebody here subscribes to, if its timestamp is newer than what we know (or as new,
//!   with other heads: the later message wins), and passed on the same way (never back to
//!   its sender). Heads seen here are stamped at least 1 ms after the ones they replace, so
//!   that two sightings within a millisecond still reach a receiver that drops reports no
//!   newer than what it has (as JS does).
//! - A connection that subscribes, or that opens a document, is sent what is already known
//!   for its subscriptions and its open documents at once. (The JS hub sends that only for
//!   storage ids someone subscribed to before; a late subscriber here does not have to wait
//!   for the next edit.)
//!
//! - The engine's own app may subscribe too ([`super::Input::SubscribeRemoteHeads`]): every
//!   peer is sent the subscription (now, and when it connects), and what is learnt of those
//!   storages, from their sync messages or from peers' reports, comes out as
//!   [`super::Event::RemoteHeads`].
//!
//! Only documents a connection has open are reported to it, so a token that does not cover a
//! document learns nothing about it, and gossip about a document a connection may not sync is
//! not taken from it.
//!
//! # Bounds
//!
//! Everything here comes from peers, so it is capped: [`MAX_SUBSCRIPTIONS`] storage ids per
//! connection, [`MAX_HEADS`] heads per report, and [`MAX_KNOWN`] remembered (document,
//! storage) pairs (about 110 bytes each), the older half forgotten when they are over. It is held in memory only, as
//! the JS hub holds it: after a restart the next sync from each device fills it again.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use automerge::ChangeHash;

use crate::id::{decode_head, encode_head, DocumentId, PeerId, StorageId};
use crate::net::ConnId;
use crate::protocol::{HeadsAt, Message};

use super::types::Millis;
use super::Engine;

/// Storage ids one connection may subscribe to; more are ignored.
pub(crate) const MAX_SUBSCRIPTIONS: usize = 1024;
/// Heads in one report; a report with more is ignored (a note has a handful).
pub(crate) const MAX_HEADS: usize = 1024;
/// (document, storage) pairs remembered.
pub(crate) const MAX_KNOWN: usize = 65_536;

/// A storage id as a key of `Gossip::known`: 16 bytes of its blake3 hash. The ids are
/// strings peers choose (a UUID from JS, any length from others); keyed by them, each
/// remembered pair held its own copy on the heap, and the relay's RSS bench (10,000 notes,
/// each uploaded and fetched by a client with a storage of its own) grew 11 MB more than
/// without gossip. Nothing needs the id back: reports go to subscribers, who named it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct StorageKey([u8; 16]);

impl StorageKey {
    fn of(storage: &StorageId) -> Self {
        let hash = blake3::hash(storage.as_str().as_bytes());
        let mut key = [0u8; 16];
        key.copy_from_slice(&hash.as_bytes()[..16]);
        Self(key)
    }
}

struct Known {
    heads: Box<[ChangeHash]>,
    /// When they were seen (ms since the epoch), by us or by the hub that told us.
    timestamp: f64,
}

/// Subscriptions and remembered heads. See the module docs.
#[derive(Default)]
pub(super) struct Gossip {
    /// Storage ids this engine's app subscribes to.
    ours: BTreeSet<StorageId>,
    by_conn: HashMap<ConnId, BTreeSet<StorageId>>,
    by_storage: HashMap<StorageId, BTreeSet<ConnId>>,
    known: HashMap<(DocumentId, StorageKey), Known>,
}

impl Gossip {
    /// Apply a subscription change from `conn`; returns the storage ids it newly added.
    fn subscribe(
        &mut self,
        conn: ConnId,
        add: Vec<StorageId>,
        remove: Vec<StorageId>,
    ) -> Vec<StorageId> {
        for s in remove {
            if let Some(set) = self.by_conn.get_mut(&conn) {
                set.remove(&s);
            }
            if let Some(conns) = self.by_storage.get_mut(&s) {
                conns.remove(&conn);
                if conns.is_empty() {
                    self.by_storage.remove(&s);
                }
            }
        }
        let mut added = Vec::new();
        for s in add {
            let set = self.by_conn.entry(conn).or_default();
            if set.contains(&s) {
                continue;
            }
            if set.len() >= MAX_SUBSCRIPTIONS {
                tracing::debug!(?conn, "remote-heads subscriptions over the cap; ignored");
                break;
            }
            set.insert(s.clone());
            self.by_storage.entry(s.clone()).or_default().insert(conn);
            added.push(s);
        }
        if self.by_conn.get(&conn).is_some_and(|s| s.is_empty()) {
            self.by_conn.remove(&conn);
        }
        added
    }

    pub(super) fn conn_closed(&mut self, conn: ConnId) {
        let Some(subs) = self.by_conn.remove(&conn) else {
            return;
        };
        for s in subs {
            if let Some(conns) = self.by_storage.get_mut(&s) {
                conns.remove(&conn);
                if conns.is_empty() {
                    self.by_storage.remove(&s);
                }
            }
        }
    }

    fn subscribers(&self, storage: &StorageId) -> Vec<ConnId> {
        self.by_storage
            .get(storage)
            .map(|c| c.iter().copied().collect())
            .unwrap_or_default()
    }

    fn subscriptions(&self, conn: ConnId) -> Vec<StorageId> {
        self.by_conn
            .get(&conn)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Remember `heads` for (doc, storage); false if that says nothing new: the same heads
    /// again from a sync message (`seen_here`), or a report older than what is known (or as
    /// old, with the same heads).
    ///
    /// Heads seen here are stamped after the ones they replace, at least 1 ms later: two
    /// sightings within one millisecond would otherwise carry the same time, and a receiver
    /// (JS or sheaf) drops a report no newer than what it has, keeping the older heads.
    fn record(
        &mut self,
        doc: DocumentId,
        storage: &StorageId,
        heads: Vec<ChangeHash>,
        mut timestamp: f64,
        seen_here: bool,
    ) -> bool {
        let key = (doc, StorageKey::of(storage));
        if let Some(k) = self.known.get(&key) {
            let same = *k.heads == *heads;
            let stale = match seen_here {
                true => same,
                false => timestamp < k.timestamp || (timestamp == k.timestamp && same),
            };
            if stale {
                return false;
            }
            if seen_here {
                timestamp = timestamp.max(k.timestamp + 1.0);
            }
        }
        let heads = heads.into_boxed_slice();
        self.known.insert(key, Known { heads, timestamp });
        if self.known.len() > MAX_KNOWN {
            self.forget_older_half();
        }
        true
    }

    /// Over [`MAX_KNOWN`]: forget the pairs seen longest ago, about half of them (one pass
    /// per `MAX_KNOWN / 2` new pairs, instead of an index kept in order on every update).
    fn forget_older_half(&mut self) {
        let mut times: Vec<f64> = self.known.values().map(|k| k.timestamp).collect();
        let mid = times.len() / 2;
        let (_, median, _) = times.select_nth_unstable_by(mid, f64::total_cmp);
        let median = *median;
        self.known.retain(|_, k| k.timestamp > median);
    }

    fn known(&self, doc: DocumentId, storage: &StorageId) -> Option<HeadsAt> {
        self.known
            .get(&(doc, StorageKey::of(storage)))
            .map(|k| HeadsAt {
                heads: k.heads.iter().map(encode_head).collect(),
                timestamp: k.timestamp,
            })
    }

    /// The documents whose heads are known for `storage`.
    fn known_docs(&self, storage: &StorageId) -> Vec<DocumentId> {
        let key = StorageKey::of(storage);
        self.known
            .keys()
            .filter(|(_, s)| *s == key)
            .map(|(d, _)| *d)
            .collect()
    }

    /// The heads known for (doc, storage) are `heads`.
    fn unchanged(&self, doc: DocumentId, storage: &StorageId, heads: &[ChangeHash]) -> bool {
        self.known
            .get(&(doc, StorageKey::of(storage)))
            .is_some_and(|k| *k.heads == *heads)
    }
}

impl Engine {
    fn wall_ms(&self, now: Millis) -> f64 {
        (self.config.clock_offset_ms as f64) + now.0 as f64
    }

    /// Send `conn`'s peer `msg(us, them)` (nothing before its handshake).
    fn send_to_peer(&mut self, conn: ConnId, msg: impl FnOnce(PeerId, PeerId) -> Message) {
        let Some(target) = self.conns.get(&conn).and_then(|c| c.peer_id()).cloned() else {
            return;
        };
        let msg = msg(self.config.peer_id.clone(), target);
        self.effects.push(super::Effect::Send { conn, msg });
    }

    /// Send `conn` what is known of (doc, storage).
    fn tell(&mut self, conn: ConnId, doc: DocumentId, storage: StorageId, at: HeadsAt) {
        self.send_to_peer(conn, |sender_id, target_id| Message::RemoteHeadsChanged {
            sender_id,
            target_id,
            document_id: doc,
            new_heads: BTreeMap::from([(storage, at)]),
        });
    }

    /// Tell every subscriber of `storage` with `doc` open (but `except`) its heads, and our
    /// app if it subscribes.
    fn spread(&mut self, doc: DocumentId, storage: &StorageId, except: ConnId) {
        let Some(at) = self.gossip.known(doc, storage) else {
            return;
        };
        if self.gossip.ours.contains(storage) {
            self.report(doc, storage.clone());
        }
        for c in self.gossip.subscribers(storage) {
            let open = self.conns.get(&c).is_some_and(|c| c.docs.contains(&doc));
            if c != except && open {
                self.tell(c, doc, storage.clone(), at.clone());
            }
        }
    }

    /// Tell our app what is known of (doc, storage).
    fn report(&mut self, doc: DocumentId, storage: StorageId) {
        if let Some(k) = self.gossip.known.get(&(doc, StorageKey::of(&storage))) {
            let event = super::Event::RemoteHeads {
                doc,
                storage,
                heads: k.heads.to_vec(),
                timestamp: k.timestamp,
            };
            self.effects.push(super::Effect::Event(event));
        }
    }

    /// Our app's subscription changed: tell every peer, and report what is known already.
    pub(super) fn subscribe_remote_heads(&mut self, add: Vec<StorageId>, remove: Vec<StorageId>) {
        let remove: Vec<StorageId> = remove
            .into_iter()
            .filter(|s| self.gossip.ours.remove(s))
            .collect();
        let add: Vec<StorageId> = add
            .into_iter()
            .filter(|s| {
                self.gossip.ours.len() < MAX_SUBSCRIPTIONS && self.gossip.ours.insert(s.clone())
            })
            .collect();
        if add.is_empty() && remove.is_empty() {
            return;
        }
        let ready: Vec<ConnId> = self.ready_conns();
        for conn in ready {
            self.send_subscription(conn, add.clone(), remove.clone());
        }
        for s in add {
            for doc in self.gossip.known_docs(&s) {
                self.report(doc, s.clone());
            }
        }
    }

    fn send_subscription(&mut self, conn: ConnId, add: Vec<StorageId>, remove: Vec<StorageId>) {
        self.send_to_peer(conn, |sender_id, target_id| {
            Message::RemoteSubscriptionChange {
                sender_id,
                target_id,
                add,
                remove,
            }
        });
    }

    /// A peer completed the handshake: it learns what our app subscribes to.
    pub(super) fn gossip_peer_ready(&mut self, conn: ConnId) {
        if !self.gossip.ours.is_empty() {
            let ours = self.gossip.ours.iter().cloned().collect();
            self.send_subscription(conn, ours, Vec::new());
        }
    }

    /// A `remote-subscription-change` from `conn`.
    pub(super) fn remote_subscription_change(
        &mut self,
        conn: ConnId,
        add: Vec<StorageId>,
        remove: Vec<StorageId>,
    ) {
        let added = self.gossip.subscribe(conn, add, remove);
        let docs: Vec<DocumentId> = match self.conns.get(&conn) {
            Some(c) if !added.is_empty() => c.docs.iter().copied().collect(),
            _ => return,
        };
        for doc in docs {
            for s in &added {
                if let Some(at) = self.gossip.known(doc, s) {
                    self.tell(conn, doc, s.clone(), at);
                }
            }
        }
    }

    /// `conn` just opened `doc`: what is known of it for the storages it subscribes to.
    pub(super) fn gossip_opened(&mut self, conn: ConnId, doc: DocumentId) {
        for s in self.gossip.subscriptions(conn) {
            if let Some(at) = self.gossip.known(doc, &s) {
                self.tell(conn, doc, s, at);
            }
        }
    }

    /// A `remote-heads-changed` from `conn` (a hub further along).
    pub(super) fn remote_heads_changed(
        &mut self,
        conn: ConnId,
        doc: DocumentId,
        new_heads: BTreeMap<StorageId, HeadsAt>,
    ) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        if c.denied(&doc).is_some() {
            return;
        }
        for (storage, at) in new_heads {
            let wanted = self.gossip.ours.contains(&storage)
                || !self.gossip.subscribers(&storage).is_empty();
            let about_us = self.config.storage_id.as_ref() == Some(&storage);
            if !wanted || about_us || at.heads.len() > MAX_HEADS || !at.timestamp.is_finite() {
                continue;
            }
            let Ok(heads) = at.heads.iter().map(|h| decode_head(h)).collect() else {
                tracing::debug!(?conn, %doc, "remote heads that are not change hashes; ignored");
                continue;
            };
            if self
                .gossip
                .record(doc, &storage, heads, at.timestamp, false)
            {
                self.spread(doc, &storage, conn);
            }
        }
    }

    /// After `doc` stepped: the heads its peers with a storage id named, if they moved.
    pub(super) fn gossip_heads(&mut self, now: Millis, doc: DocumentId) {
        let Some(d) = self.docs.get(&doc) else {
            return;
        };
        let mut moved = Vec::new();
        for (conn, p) in &d.peers {
            let Some(heads) = p.sync.their_heads.as_ref() else {
                continue;
            };
            let Some(storage) = self.conns.get(conn).and_then(|c| c.storage_id()) else {
                continue;
            };
            if heads.len() <= MAX_HEADS && !self.gossip.unchanged(doc, storage, heads) {
                moved.push((*conn, storage.clone(), heads.clone()));
            }
        }
        let at = self.wall_ms(now);
        for (conn, storage, heads) in moved {
            if self.gossip.record(doc, &storage, heads, at, true) {
                self.spread(doc, &storage, conn);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn past_the_cap_the_pairs_seen_longest_ago_are_forgotten() {
        let mut g = Gossip::default();
        let storage = StorageId::new("laptop-storage");
        let docs: Vec<DocumentId> = (0..=MAX_KNOWN).map(|_| DocumentId::random()).collect();
        for (i, doc) in docs.iter().enumerate() {
            let heads = vec![ChangeHash([i as u8; 32])];
            assert!(g.record(*doc, &storage, heads, i as f64, true));
        }
        assert!(g.known.len() <= MAX_KNOWN / 2 + 1, "{}", g.known.len());
        assert!(g.known.len() >= MAX_KNOWN / 2 - 1, "{}", g.known.len());
        assert!(
            g.known(docs[MAX_KNOWN], &storage).is_some(),
            "the newest stays"
        );
        assert!(g.known(docs[0], &storage).is_none(), "the oldest goes");
        // The same heads again from a sync message say nothing new; other heads do.
        let last = docs[MAX_KNOWN];
        let same = vec![ChangeHash([MAX_KNOWN as u8; 32])];
        assert!(!g.record(last, &storage, same, 1e12, true));
        assert!(g.record(last, &storage, vec![], 1e12, true));
        assert!(g.unchanged(last, &storage, &[]));
    }
}
