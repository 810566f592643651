//! Passing paced changes on before they are applied.
//!
//! # Why
//!
//! An engine paces the applies of an expensive note (see [`super::ApplyPacing`]): on the
//! automerge-paper note an apply costs tens of milliseconds however little it carries, so
//! after one the next waits and the inbox fills. Until now what waited in a paced inbox
//! also waited to be *sent*: an edit reached the other peers only after the relay's pause,
//! its apply and its fsync, and nobody answered the typist either, so its next keystrokes
//! waited too (a sheaf peer holds what is new until its last message is answered).
//! Forwarding needs none of that: the changes are bytes the other peers apply themselves.
//! So a step that leaves a paced inbox passes its changes on at once, in one message per
//! peer, and answers each sender with a message saying we have its changes. A relay
//! forwards to everyone; a peer behind one relay only answers it, which is what lets the
//! relay send the next changes while the peer is still pausing, so that it applies them
//! all in one call when the pause ends.
//!
//! An inbox held only by a write in flight (a few milliseconds) is not forwarded: that is
//! the common case on cheap notes, where forwarding would double the messages.
//!
//! # Who is answered early
//!
//! Only a sender that waits for our answer before it sends its next changes (as a sheaf
//! peer does) is answered early. A sender that sends changes twice without an answer in
//! between (JS automerge-repo sends one message per local change) needs no answer, and
//! every answer would cost it a receive and a reply of its own: it is not answered early
//! again on that connection. Measured on the long-note bench with four JS typists, answering
//! them all slowed their typing (441-561 edits instead of 700) and took p50/p99 from
//! 796-961 / 1,251-1,686 ms to 951-1,215 / 1,565-3,196 ms; without those answers,
//! 651-1,246 / 1,345-2,225 ms (a noisy row: the four node processes fill both cores).
//!
//! # Pacing per peer
//!
//! A peer still awaiting our last message gets nothing new (as for any message with
//! changes, see `EngineConfig::max_hold_ms`). A peer that answers a forward only after
//! applying it, as JS automerge-repo does, shows in its delay what an apply costs it: its
//! next forward waits [`FORWARD_PAUSE_FACTOR`] times as long (at most
//! [`MAX_FORWARD_PAUSE_MS`]), so it spends at most about a third of its time applying what
//! we send it, as a pacing engine does (`ApplyPacing`). Waiting only as long again was
//! enough while the relay applied on its own thread, which paused its forwards too; once a
//! relay applies off it (`offload`), four JS typists on the long note each received more,
//! smaller forwards and fell behind: they typed 429-447 edits instead of 700-870, at p50
//! 1.4 s. With the factor at 2: 699-786 edits, p50 0.64-0.81 s (the same runs without the
//! offload: 531-873 edits, 0.51-1.16 s; four node processes fill both cores, so the row is
//! noisy). A sheaf peer that paces answers at once and is never held this way.
//!
//! JS peers no longer get forwards at all (see the next section). That cost them nothing
//! measurable: four JS typists on the long note, relay binaries with and without forwards
//! to them interleaved, p50/p99 443-591 / 973-1,644 ms (744-966 edits typed) with, and
//! 587-640 / 1,145-1,171 ms (840-882 edits) without (four node processes fill both cores,
//! so the row is noisy). The pause still serves a sheaf peer that answers slowly.
//!
//! # What a forwarded message says
//!
//! It is an ordinary sync message that advertises nothing new:
//!
//! - `heads` are the heads we last sent that peer (`State::last_sent_heads`). Heads that
//!   include a change are only ever advertised once it is durable (the module docs of
//!   [`super`]); a forward puts no new hash in its heads.
//! - `have` is a Bloom filter of our changes since the heads we share with the peer *plus*
//!   the held changes: the peer must not send them back, and a sender must learn that we
//!   got them. Automerge builds the same filter, minus the held changes.
//! - `need` is the peer's heads that we lack, as Automerge would ask.
//! - `changes` are the held changes the peer was not sent yet and did not send us.
//!
//! The sync state is updated as Automerge's `generate_sync_message` would for such a
//! message: the changes join `sent_hashes` (so the message generated after the apply does
//! not repeat them), and the message is in flight.
//!
//! # Checks before passing anything on
//!
//! Only changes that parse as Automerge change chunks (which verifies their hashes), from
//! peers whose changes we apply (not read-only ones), go out, and never to a peer that
//! ignores changes. A document chunk (a first upload) is left to the apply.
//!
//! That is all that is checked before the apply: whether a well-formed change is sound
//! (see `admit`) is only known once it is applied. So held changes go only to peers that
//! said they take unchecked changes (`PeerMetadata::accepts_unchecked`, which sheaf peers
//! send): they check what they apply and, refusing a forgery, keep the connection (see
//! `EngineConfig::refusals_before_close`); the relay closes the forger's connection when
//! it applies the batch. Other peers (JS automerge-repo, whose Automerge can panic on a
//! forged change) get the changes after the relay has admitted them, as from any server;
//! their senders are still answered at once.

use std::collections::{HashMap, HashSet};

use automerge::sync::{BloomFilter, ChunkList, Have, Message as SyncMessage, MessageFlags};
use automerge::ChangeHash;

use crate::id::{DocumentId, PeerId};
use crate::net::ConnId;
use crate::protocol::Message;

use super::basis::has_change;
use super::doc::{DocEntry, DocPhase, StepOutput};
use super::types::{Effect, EngineConfig, Millis};

/// Longest pause between forwards to a peer (see the module docs).
pub(super) const MAX_FORWARD_PAUSE_MS: u64 = 200;

/// A peer that took T to answer a forward gets the next one this many times T later.
pub(super) const FORWARD_PAUSE_FACTOR: u64 = 2;

/// A change waiting in the inbox, as it arrived.
pub(super) struct HeldChange {
    pub from: ConnId,
    pub hash: ChangeHash,
    pub bytes: Vec<u8>,
}

impl DocEntry {
    /// Pass a paced inbox's changes on to every other peer, and tell their senders we have
    /// them (see the module docs). Call after the step's apply.
    pub(super) fn forward_held(
        &mut self,
        now: Millis,
        id: DocumentId,
        config: &EngineConfig,
        peer_ids: &HashMap<ConnId, PeerId>,
        out: &mut StepOutput,
    ) {
        if !config.forward_held
            || self.phase != DocPhase::Ready
            || self.inbox.is_empty()
            || (now >= self.next_apply_at && self.offloaded.is_none())
        {
            return;
        }
        self.collect_held();
        if self.held.is_empty() {
            return;
        }
        let doc = self.doc.lock();
        let mut blooms: HashMap<Vec<ChangeHash>, BloomFilter> = HashMap::new();
        for (conn, p) in self.peers.iter_mut() {
            let Some(target) = peer_ids.get(conn) else {
                continue;
            };
            // Only peers in an ongoing sync: we sent them something and heard from them.
            let Some(their_heads) = p.sync.their_heads.clone() else {
                continue;
            };
            if !p.sync.have_responded || p.sync.is_peer_read_only() {
                continue;
            }
            if let Some(since) = p.awaiting_since {
                if now.saturating_sub(since) < config.max_hold_ms {
                    continue;
                }
            }
            if now < p.forward_after {
                continue;
            }
            p.forward_after = Millis(0);
            let mut hashes = Vec::new();
            let mut changes = Vec::new();
            // Held changes are not checked yet: only to a peer that takes them (the rest
            // get them once applied; the sender is still answered).
            for h in self.held.iter().filter(|_| p.accepts_unchecked) {
                if h.from != *conn && !p.sync.sent_hashes.contains(&h.hash) {
                    hashes.push(h.hash);
                    changes.push(h.bytes.clone());
                }
            }
            if changes.is_empty() && !p.owes_ack {
                continue;
            }
            // Peers mostly share the same heads with us: one filter serves them all.
            let bloom = blooms
                .entry(p.sync.shared_heads.clone())
                .or_insert_with(|| {
                    let mut known: Vec<ChangeHash> = doc
                        .get_changes_meta(&p.sync.shared_heads)
                        .into_iter()
                        .map(|m| m.hash)
                        .collect();
                    known.extend(self.held.iter().map(|h| h.hash));
                    BloomFilter::from_hashes(known.iter())
                })
                .clone();
            // As Automerge asks: the peer's heads we lack (none when we ignore its changes).
            let need = if p.sync.read_only {
                Vec::new()
            } else {
                their_heads
                    .iter()
                    .filter(|h| !has_change(&doc, h))
                    .copied()
                    .collect()
            };
            let mut flags = MessageFlags::new();
            flags.set(MessageFlags::SUPPORTS_SYNC_RESET);
            if p.sync.read_only {
                flags.set(MessageFlags::READ_ONLY);
            }
            let msg = SyncMessage {
                heads: p.sync.last_sent_heads.clone(),
                need,
                have: vec![Have {
                    last_sync: p.sync.shared_heads.clone(),
                    bloom,
                }],
                changes: ChunkList::from(changes),
                flags: Some(flags),
                version: automerge::sync::MessageVersion::V1,
            };
            p.owes_ack = false;
            p.unanswered = false;
            p.sync.sent_hashes.extend(hashes.iter().copied());
            p.sync.in_flight = true;
            if !hashes.is_empty() {
                p.awaiting_since = Some(now);
                p.forwarded_at = Some(now);
            }
            out.effects.push(Effect::Send {
                conn: *conn,
                msg: Message::Sync {
                    sender_id: config.peer_id.clone(),
                    target_id: target.clone(),
                    document_id: id,
                    data: msg.encode(),
                },
            });
        }
    }

    /// Whether held changes wait for `conn`: some it did not send and was not sent.
    pub(super) fn forward_pending(&self, conn: ConnId, p: &super::doc::PeerDoc) -> bool {
        self.held
            .iter()
            .any(|h| h.from != conn && !p.sync.sent_hashes.contains(&h.hash))
    }

    /// Parse the changes of inbox messages not looked at yet into `held`.
    fn collect_held(&mut self) {
        let doc = self.doc.lock();
        let mut seen: HashSet<ChangeHash> = self.held.iter().map(|h| h.hash).collect();
        for m in self.inbox.iter_mut().filter(|m| !m.looked_at) {
            m.looked_at = true;
            let Some(p) = self.peers.get_mut(&m.conn) else {
                continue;
            };
            if p.sync.read_only {
                continue; // its changes are never applied
            }
            let Ok(msg) = SyncMessage::decode(&m.data) else {
                continue; // the apply reports it
            };
            let mut parsed = Vec::new();
            let all_changes = msg
                .changes
                .iter()
                .all(|entry| split_changes(entry, &mut parsed));
            if !all_changes || parsed.is_empty() {
                continue;
            }
            if p.unanswered {
                p.holds = false; // it did not wait for our answer: it needs none
            }
            p.unanswered = true;
            p.owes_ack = p.holds;
            for (hash, bytes) in parsed {
                if has_change(&doc, &hash) || !seen.insert(hash) {
                    continue;
                }
                self.held.push(HeldChange {
                    from: m.conn,
                    hash,
                    bytes,
                });
            }
        }
    }
}

/// Splits a `changes` entry into its change chunks, each parsed (which checks its hash).
/// `false` if the entry holds anything else: a document chunk, or bytes that do not parse.
fn split_changes(entry: &[u8], out: &mut Vec<(ChangeHash, Vec<u8>)>) -> bool {
    let Ok(chunks) = super::doc::storage_chunks(entry) else {
        return false;
    };
    for c in chunks {
        if !matches!(c[8], 1 | 2) {
            return false;
        }
        match super::doc::parse_change(c) {
            Ok(change) => out.push((change.hash(), c.to_vec())),
            Err(_) => return false,
        }
    }
    true
}
