//! Receiving a sync message whose changes the engine already applied, without walking the
//! note's whole history.
//!
//! # Why
//!
//! The engine applies the changes of every message in a batch itself, in one call (see
//! `DocEntry::apply_inbox`), and then hands each message to Automerge without its changes so
//! that the peer's sync state learns its heads, needs and Bloom filter. automerge 0.12's
//! `receive_sync_message` then trims the hashes it has sent the peer down to those the
//! peer's heads do not cover (`filter_changes`), by visiting every ancestor of those heads:
//! the whole change graph, on every message, even when nothing was sent. On the fan-out
//! bench (K = 16, a few thousand changes) that walk was 24-27% of each client engine's
//! time, and it grows with the note's history: a note of one change per keystroke pays it
//! over hundreds of thousands of changes for every message of every peer.
//!
//! # What differs
//!
//! [`receive_applied`] does what `receive_sync_message` does for a message without changes,
//! field by field, except the trim. Hashes the trim would drop are ancestors of the peer's
//! heads: the peer has them, they are never in what Automerge sends it next (neither in the
//! changes its Bloom filter misses nor in what it needs), so keeping them changes no
//! message. What remains is memory, so above [`TRIM_SENT_AT`] hashes the message goes
//! through Automerge's own path, which trims. So does any message this does not cover the
//! same way: one that resets (empty heads, or the sync-reset flag), or one received while
//! Automerge holds changes waiting for a dependency (the cheap test for which heads we have
//! needs an empty queue).

use automerge::sync::{Capability, Message, MessageFlags, State, SyncDoc};
use automerge::{Automerge, AutomergeError, ChangeHash, ReadDoc};

/// Most hashes sent to a peer kept untrimmed; above this a message takes Automerge's path.
const TRIM_SENT_AT: usize = 1024;

/// Receive `msg`, whose changes are already applied to `doc` (or were none), into `state`.
pub(crate) fn receive_applied(
    doc: &mut Automerge,
    state: &mut State,
    mut msg: Message,
) -> Result<(), AutomergeError> {
    // Automerge 0.12 builds its next message from the peer's `need` as it came. A `need`
    // naming one of our changes twice (found by the `sync_message` fuzz target:
    // `fuzz/regressions/sync_message/need-naming-a-change-twice`) made it panic building
    // that message (`ChangeCollector::finish`, from `generate_sync_message`), which would
    // take the engine down. Honest peers never repeat a hash. Heads likewise, for good
    // measure.
    #[cfg(test)]
    tests::maybe_panic();
    dedup_keeping_order(&mut msg.need);
    dedup_keeping_order(&mut msg.heads);
    let resets = msg.heads.is_empty()
        || msg
            .flags
            .is_some_and(|f| f.contains(MessageFlags::SYNC_RESET));
    if !msg.changes.is_empty() || resets || state.sent_hashes.len() > TRIM_SENT_AT {
        return doc.receive_sync_message(state, msg);
    }
    // With nothing queued, the missing dependencies of the peer's heads are exactly the heads
    // we lack (Automerge's `missing_deps_from` only looks further through queued changes).
    if !doc.get_missing_deps(&[]).is_empty() {
        return doc.receive_sync_message(state, msg);
    }
    #[cfg(test)]
    tests::CHEAP.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let missing = doc.get_missing_deps(&msg.heads);
    let before_heads = doc.get_heads();
    let Message {
        heads,
        need,
        have,
        flags,
        ..
    } = msg;

    state.in_flight = false;
    if let Some(flags) = flags {
        // A peer that sends flags supports V2 messages (as in Automerge).
        let mut caps = vec![Capability::MessageV2];
        if flags.contains(MessageFlags::SUPPORTS_SYNC_RESET) {
            caps.push(Capability::SyncReset);
        }
        state.their_capabilities = Some(caps);
        state.peer_read_only = flags.contains(MessageFlags::READ_ONLY);
    }
    if heads == before_heads {
        state.last_sent_heads.clone_from(&heads);
    }
    if missing.is_empty() {
        state.shared_heads.clone_from(&heads);
    } else {
        // Automerge keeps the shared heads it had plus the peer's heads we have, sorted.
        let known = heads.iter().filter(|h| !missing.contains(h));
        let shared: std::collections::BTreeSet<_> =
            state.shared_heads.iter().chain(known).copied().collect();
        state.shared_heads = shared.into_iter().collect();
    }
    state.their_have = Some(have);
    state.their_heads = Some(heads);
    state.their_need = Some(need);
    Ok(())
}

/// Drops the repeats in `hashes`, keeping each hash where it first appears.
fn dedup_keeping_order(hashes: &mut Vec<ChangeHash>) {
    let mut seen = std::collections::HashSet::with_capacity(hashes.len());
    hashes.retain(|h| seen.insert(*h));
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::transaction::Transactable;
    use automerge::{ActorId, ChangeHash, ROOT};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Messages [`receive_applied`] took without Automerge's path.
    pub(super) static CHEAP: AtomicUsize = AtomicUsize::new(0);

    thread_local! {
        /// Receives on this thread left to panic (a stand-in for an Automerge panic on some
        /// field of a message that no known input triggers).
        static PANICS_LEFT: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    pub(super) fn maybe_panic() {
        if PANICS_LEFT.with(|n| n.replace(n.get().saturating_sub(1))) > 0 {
            panic!("injected: taking in a sync message panicked");
        }
    }

    /// The engine catches a panic while taking in a message: that peer syncs from scratch,
    /// the engine lives on, and the replicas converge.
    #[test]
    fn a_panic_taking_in_a_sync_message_costs_the_peer_its_sync_state_not_the_engine() {
        use crate::sim::{Sim, SimConfig};
        let config = SimConfig {
            peers: 2,
            docs: 1,
            steps: 0,
            faults: false,
            ..SimConfig::default()
        };
        let mut sim = Sim::new(11, config);
        sim.heal_and_settle().unwrap();
        let doc = sim.docs[0];
        PANICS_LEFT.with(|n| n.set(3));
        let editors: Vec<usize> = (0..sim.nodes.len())
            .filter(|n| sim.nodes[*n].handles.contains_key(&doc))
            .collect();
        assert!(editors.len() >= 2, "{editors:?}");
        let keys = |sim: &Sim, node: usize| sim.nodes[node].handles[&doc].lock().keys(ROOT).count();
        let before = keys(&sim, editors[0]);
        for i in 0..6 {
            let node = editors[i % editors.len()];
            assert!(sim.edit_with(node, doc, |tx| tx.put(ROOT, format!("k{i}"), i as i64)));
            sim.pump(50);
        }
        assert_eq!(
            PANICS_LEFT.with(|n| n.get()),
            0,
            "the panics were not reached"
        );
        sim.heal_and_settle().unwrap();
        sim.check_converged().unwrap();
        for node in editors {
            assert_eq!(keys(&sim, node), before + 6, "node {node}");
        }
    }

    fn edit(doc: &mut Automerge, rng: &mut StdRng) {
        let mut tx = doc.transaction();
        let key = format!("k{}", rng.gen_range(0..8));
        tx.put(ROOT, key, rng.gen::<i64>()).unwrap();
        tx.commit();
    }

    /// Receive `msg` both ways from the same state; the states must agree but for hashes the
    /// trim drops, which must all be changes the peer's heads cover.
    fn both(doc: &mut Automerge, state: &mut State, mut msg: Message) {
        let changes = std::mem::replace(&mut msg.changes, Vec::<Vec<u8>>::new().into());
        for c in changes.iter() {
            doc.load_incremental(c).unwrap();
        }
        let mut real = state.clone();
        doc.receive_sync_message(&mut real, msg.clone()).unwrap();
        receive_applied(doc, state, msg.clone()).unwrap();
        let mut ours = state.clone();
        assert!(real.sent_hashes.is_subset(&ours.sent_hashes));
        let extra: Vec<ChangeHash> = ours
            .sent_hashes
            .difference(&real.sent_hashes)
            .copied()
            .collect();
        if !extra.is_empty() {
            // Every extra hash is an ancestor of (or one of) the peer's heads.
            let after_heads = doc.get_changes_meta(&msg.heads);
            for h in &extra {
                assert!(
                    !after_heads.iter().any(|m| m.hash == *h),
                    "{h} is not covered"
                );
            }
        }
        ours.sent_hashes = real.sent_hashes.clone();
        assert_eq!(ours, real);
    }

    /// Two peers edit and sync over a lossy, reordering channel; every receive goes both
    /// ways and must agree. Some seeds drop messages, so queued changes and resets occur.
    #[test]
    fn agrees_with_automerge_on_random_syncs() {
        for seed in 0..40u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut a = Automerge::new();
            a.set_actor(ActorId::from(vec![1; 16]));
            let mut b = Automerge::new();
            b.set_actor(ActorId::from(vec![2; 16]));
            let (mut sa, mut sb) = (State::new(), State::new());
            let mut to_a: Vec<Message> = Vec::new();
            let mut to_b: Vec<Message> = Vec::new();
            for _ in 0..200 {
                match rng.gen_range(0..6) {
                    0 => edit(&mut a, &mut rng),
                    1 => edit(&mut b, &mut rng),
                    2 => to_b.extend(a.generate_sync_message(&mut sa)),
                    3 => to_a.extend(b.generate_sync_message(&mut sb)),
                    4 if !to_a.is_empty() => {
                        let m = to_a.remove(rng.gen_range(0..to_a.len()));
                        if rng.gen_bool(0.9) {
                            both(&mut a, &mut sa, m);
                        }
                    }
                    5 if !to_b.is_empty() => {
                        let m = to_b.remove(rng.gen_range(0..to_b.len()));
                        if rng.gen_bool(0.9) {
                            both(&mut b, &mut sb, m);
                        }
                    }
                    _ => {}
                }
            }
            // Reconnect (fresh states, as the engine does) and settle without loss.
            sa = State::new();
            sb = State::new();
            for _ in 0..50 {
                let ma = a.generate_sync_message(&mut sa);
                let mb = b.generate_sync_message(&mut sb);
                if ma.is_none() && mb.is_none() {
                    break;
                }
                if let Some(m) = ma {
                    both(&mut b, &mut sb, m);
                }
                if let Some(m) = mb {
                    both(&mut a, &mut sa, m);
                }
            }
            assert_eq!(a.get_heads(), b.get_heads(), "seed {seed} converges");
        }
        // Most messages take the cheap path (the rest: resets, queued changes).
        let cheap = CHEAP.load(Ordering::Relaxed);
        assert!(cheap > 500, "only {cheap} messages took the cheap path");
    }
}
