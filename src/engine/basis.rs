//! What a sync message to a peer is built against: two adjustments to the peer's sync state
//! before Automerge's `generate_sync_message` picks the changes to send.
//!
//! # Exact basis instead of the Bloom filter, when the peer's heads are known
//!
//! A peer says what it has with its heads and a Bloom filter of the changes it added since
//! the last sync. Automerge checks every change we have beyond that last sync against the
//! filter, and the filter answers "has it" wrongly for about 1 in 100 changes. A change
//! skipped that way is missing at the peer: the changes built on it are sent and wait in
//! the peer's queue until its next message asks for the missing one, a round trip later.
//! With coalescing, one message carries hundreds of changes to a peer that fell behind, so
//! this hits most such messages. Measured in the fan-out bench at K = 64: 35% of the
//! clients' applies started with changes waiting for a dependency, and each of those had
//! its whole batch rebuilt for storage because the arrived bytes were not all that was new.
//!
//! The heads and the filter describe the same document at the same moment, and a document
//! is exactly its heads and their ancestors. So when we know every head the peer sent, what
//! it has is exactly those ancestors: the basis becomes its heads and an empty filter, and
//! Automerge sends every change that is not an ancestor of them (less what we already sent
//! in this session), with no guessing. A head we do not know leaves the peer's filter as it
//! is: its ancestors may include changes we have, and only the filter can say which.
//!
//! # Changes, not the whole document, to a peer that has the note
//!
//! Automerge answers a peer that lacks more than a third of the changes with the whole
//! document (`save()`), and the peer reconstructs every change from it to find the new ones.
//! Both cost time that grows with the note, not with what is new: on a long note (hundreds
//! of thousands of text ops in a few hundred changes) a typist that fell 2 s behind would
//! be sent the whole note, the worst possible moment for it. A peer whose heads are not
//! empty therefore gets the changes it lacks; a peer with nothing gets the document, as
//! before. (Automerge only sends a whole document to peers that advertise the V2 message
//! capability, so the capability is hidden from it for the one call.)

use automerge::sync::{BloomFilter, Capability, Have, Message as SyncMessage, State, SyncDoc};
use automerge::{Automerge, ChangeHash};

/// `doc.generate_sync_message(state)` with the exact basis and without whole documents to
/// peers that have the note (see the module docs).
pub(super) fn generate(doc: &Automerge, state: &mut State) -> Option<SyncMessage> {
    let has_note = state.their_heads.as_ref().is_some_and(|h| !h.is_empty());
    let caps = if has_note {
        exact_basis(doc, state);
        hide_v2(state)
    } else {
        None
    };
    let msg = doc.generate_sync_message(state);
    if let Some(caps) = caps {
        state.their_capabilities = Some(caps);
    }
    msg
}

/// Replaces the peer's `have` with its heads and an empty filter when we know every one of
/// its heads and it sent a `have` at all (a peer still missing something sends none, and
/// is then only sent what it asks for).
fn exact_basis(doc: &Automerge, state: &mut State) {
    let (Some(heads), Some(have)) = (&state.their_heads, &state.their_have) else {
        return;
    };
    if have.is_empty() || !heads.iter().all(|h| has_change(doc, h)) {
        return;
    }
    let exact = Have {
        last_sync: heads.clone(),
        bloom: BloomFilter::default(),
    };
    state.their_have = Some(vec![exact]);
}

/// Takes the V2 capability out of `state`, returning the capabilities to put back.
fn hide_v2(state: &mut State) -> Option<Vec<Capability>> {
    let caps = state.their_capabilities.as_ref()?;
    if !caps.contains(&Capability::MessageV2) {
        return None;
    }
    let without = caps
        .iter()
        .filter(|c| **c != Capability::MessageV2)
        .cloned()
        .collect();
    state.their_capabilities.replace(without)
}

/// Whether the document has applied the change (`Automerge::has_change` is not public).
pub(super) fn has_change(doc: &Automerge, hash: &ChangeHash) -> bool {
    doc.get_change_meta_by_hash(hash).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::transaction::{CommitOptions, Transactable};
    use automerge::{ActorId, ReadDoc, ROOT};

    fn doc(actor: &str) -> Automerge {
        Automerge::new().with_actor(ActorId::from(actor.as_bytes()))
    }

    /// `n` changes, each its own commit at time 0 (so hashes, and the test, are fixed).
    fn edit(d: &mut Automerge, key: &str, n: usize) {
        for i in 0..n {
            let mut tx = d.transaction();
            tx.put(ROOT, key, i as i64).unwrap();
            tx.commit_with(CommitOptions::default().with_time(0));
        }
    }

    /// Plain Automerge sync both ways until neither side has anything to say.
    fn sync_fully(a: &mut Automerge, sa: &mut State, b: &mut Automerge, sb: &mut State) {
        for _ in 0..20 {
            let ab = a.generate_sync_message(sa);
            let ba = b.generate_sync_message(sb);
            if ab.is_none() && ba.is_none() {
                return;
            }
            if let Some(m) = ab {
                b.receive_sync_message(sb, m).unwrap();
            }
            if let Some(m) = ba {
                a.receive_sync_message(sa, m).unwrap();
            }
        }
        panic!("the sync did not settle");
    }

    /// The change hashes a message carries (each entry may hold several change chunks).
    fn carried(msg: &SyncMessage) -> Vec<ChangeHash> {
        let mut out = Vec::new();
        for entry in msg.changes.iter() {
            for c in crate::engine::doc::storage_chunks(entry).unwrap() {
                out.push(automerge::Change::try_from(c).unwrap().hash());
            }
        }
        out
    }

    fn chunk_types(msg: &SyncMessage) -> Vec<u8> {
        let mut types = Vec::new();
        for entry in msg.changes.iter() {
            for c in crate::engine::doc::storage_chunks(entry).unwrap() {
                types.push(c[8]);
            }
        }
        types
    }

    /// `a` with `base` changes both sides share, then `b_own` (at least one) changes of `b`
    /// that `a` received directly, then `a_own` changes of `a`; returns `a`, `b` and `a`'s
    /// sync state for `b` after receiving `b`'s message (its heads, which `a` knows, and its
    /// Bloom filter).
    fn setup(base: usize, b_own: usize, a_own: usize) -> (Automerge, Automerge, State) {
        let (mut a, mut b) = (doc("aaaa"), doc("bbbb"));
        edit(&mut a, "base", base);
        let (mut sa, mut sb) = (State::new(), State::new());
        sync_fully(&mut a, &mut sa, &mut b, &mut sb);
        let before = b.get_heads();
        edit(&mut b, "b", b_own);
        a.load_incremental(&b.save_after(&before)).unwrap();
        edit(&mut a, "a", a_own);
        // `b` asks: its heads, and a filter of its changes since the last sync.
        let ask = b.generate_sync_message(&mut sb).unwrap();
        assert!(!ask.have.is_empty());
        a.receive_sync_message(&mut sa, ask).unwrap();
        (a, b, sa)
    }

    #[test]
    fn a_peer_whose_heads_we_know_gets_every_change_its_bloom_filter_would_hide() {
        // `b` made 200 changes, which `a` has; then 1,000 writers each made one change on
        // top of that (concurrent, as on a busy relay), which only `a` has.
        let (mut a, mut b, mut sa) = setup(1, 200, 0);
        let start = a.clone();
        for i in 0..1000 {
            let mut w = start
                .fork()
                .with_actor(ActorId::from(format!("w{i}").as_bytes()));
            edit(&mut w, "w", 1);
            a.apply_changes(w.get_last_local_change()).unwrap();
        }
        // (A peer lacking most of the note would get the whole document, see below.)
        sa.their_capabilities = Some(vec![Capability::MessageV1]);
        let mut lacks: Vec<ChangeHash> = a
            .get_changes(&b.get_heads())
            .iter()
            .map(|c| c.hash())
            .collect();
        assert_eq!(lacks.len(), 1000);
        // Automerge alone: the filter's false positives (about 1 in 100) hold back changes
        // whose dependencies `b` has.
        let plain = a.generate_sync_message(&mut sa.clone()).unwrap();
        let plain_sent = carried(&plain);
        let hidden = lacks.iter().filter(|h| !plain_sent.contains(h)).count();
        assert!(hidden > 0, "these fixed hashes include false positives");
        // With the exact basis every one of them goes, and nothing `b` has.
        let ours = generate(&a, &mut sa.clone()).unwrap();
        let mut sent = carried(&ours);
        sent.sort();
        lacks.sort();
        assert_eq!(sent, lacks);
        b.receive_sync_message(&mut State::new(), ours).unwrap();
        assert_eq!(b.get_heads(), a.get_heads());
        assert!(b.get_missing_deps(&[]).is_empty());
    }

    #[test]
    fn a_head_we_do_not_know_leaves_the_bloom_filter_in_charge() {
        let (a, _b, mut sa) = setup(1, 5, 3);
        // A head of `b` that `a` lacks: `b`'s ancestors are unknown, so its filter stays.
        let theirs = sa.their_have.clone();
        sa.their_heads = Some(vec![ChangeHash([7; 32])]);
        exact_basis(&a, &mut sa);
        assert_eq!(
            sa.their_have.as_ref().map(|h| h[0].last_sync.clone()),
            theirs.map(|h| h[0].last_sync.clone())
        );
    }

    #[test]
    fn a_peer_with_the_note_gets_changes_and_an_empty_peer_the_document() {
        // `b` lacks 300 of `a`'s 302 changes: Automerge alone sends the whole document.
        let (a, mut b, sa) = setup(1, 1, 300);
        let plain = a.generate_sync_message(&mut sa.clone()).unwrap();
        assert_eq!(
            chunk_types(&plain),
            vec![0],
            "Automerge sends a document chunk"
        );
        let mut state = sa.clone();
        let ours = generate(&a, &mut state).unwrap();
        let types = chunk_types(&ours);
        assert_eq!(types.len(), 300);
        assert!(types.iter().all(|t| *t == 1 || *t == 2), "{types:?}");
        // The capability is back for the next call.
        assert!(state
            .their_capabilities
            .as_ref()
            .is_some_and(|c| c.contains(&Capability::MessageV2)));
        b.receive_sync_message(&mut State::new(), ours).unwrap();
        assert_eq!(b.get_heads(), a.get_heads());

        // A peer with nothing gets the document in one chunk, as Automerge sends it.
        let mut empty = doc("cccc");
        let (mut sa2, mut sc) = (State::new(), State::new());
        let first = empty.generate_sync_message(&mut sc).unwrap();
        a.clone().receive_sync_message(&mut sa2, first).unwrap();
        let reply = generate(&a, &mut sa2).unwrap();
        assert_eq!(chunk_types(&reply), vec![0]);
        empty.receive_sync_message(&mut sc, reply).unwrap();
        assert_eq!(empty.get_heads(), a.get_heads());
        assert!(empty.get(ROOT, "a").unwrap().is_some());
    }
}
