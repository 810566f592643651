//! Admitting remote changes: apply them to a copy of the note, check what the copy became,
//! and only then make it the note.
//!
//! # Why
//!
//! Automerge 0.12 trusts the changes it applies. A change whose checksum is right but whose
//! contents were forged (a field of a decoded change altered and the change encoded again,
//! which any peer can do) may panic inside the apply (an actor the note lacks, an object or
//! an operation that is not there: `unwrap`s and assertions in the op set and the change
//! graph), or apply and leave a note that panics when it is saved or sent, or whose saved
//! bytes no longer load. A panic in an engine takes every note of the process down with
//! it; a note that does not reload is lost. Of 20,000 random forgeries of valid changes
//! (probe: decoded changes with their seq, actor, start op, dependencies or an op's object,
//! key, predecessors or action altered), 44% panicked in the apply; of those that applied,
//! 28% then panicked in `save` or `get_changes` and 16% saved bytes that do not load.
//!
//! # What is checked
//!
//! 1. The apply runs on a clone of the note, under `catch_unwind`.
//! 2. The changes the apply added are rebuilt from the op set (`get_changes`) and must hash
//!    to what the change graph holds for them (`get_changes_meta`): a change whose ops the
//!    op set did not keep as they came fails here (or panics, see 1).
//! 3. Each added change must be causally sound: its first op counter above the last of
//!    every dependency, and every op it refers to (object, list element, predecessor)
//!    within its dependencies' counters or earlier in the change itself. Honest changes are
//!    so by construction (a change's ops start after every op of the note it was made on,
//!    and it can only refer to ops it has seen).
//! 4. Each op's key fits its object: a map key in a map, an element in a list or a text,
//!    an insert only into a sequence, and only an insert at its head.
//! 5. Each added change follows its actor's previous change: the next seq, and a
//!    descendant of it (see `lineage`).
//! 6. A change that does not start right after its dependencies' last op (made on a fuller
//!    note than its dependencies describe: `transaction_at`, JS `changeAt`; or forged), or
//!    a lineage too long to walk, has the note checked whole: its save must load to the
//!    same heads.
//!
//! A forgery that fails 3-6 applies without a word in Automerge and leaves a note whose
//! save does not load. With 1-2 only, 3% of a probe's random forgeries did that; 1-3 still
//! let through some that 4-6 now catch (the `forged_changes` fuzz target found them); with
//! all six, none of 30,000 random inputs of that target did. The copy becomes the note only
//! when all pass, so a rejected batch leaves it as it was.
//!
//! A first copy that arrives as a document chunk (what Automerge sends a peer that has
//! nothing) is loaded with Automerge's verification, which rebuilds every change and
//! compares the heads: 2-6 are skipped for it.
//!
//! # Cost
//!
//! On the automerge-paper note (1,000 edits per change) the clone takes 0.1-0.2 ms and the
//! rebuild about 7 us per change, against 74 ms to apply 20 remote keystrokes; the decode
//! for 3 is 2-3 us per change. A note of one change per keystroke (260,000 changes) clones
//! in about 34 ms (its change graph), against 78 ms for the same apply: in the engine bench
//! (b, T1 K = 16) the holder's one apply went from 0.98-1.25x a bare `load_incremental` to
//! 2.6x. Recovering a failed apply from storage instead of a copy would remove that; not
//! done yet. The checks need unwinding: a build with `panic = "abort"` loses 1 (a repo built so
//! warns when it starts).

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};

use automerge::legacy::{ElementId, Key, ObjectId, OpId};
use automerge::{ObjId as ExId, ObjType, ReadDoc};

use super::lineage::{Lineage, Update, Verdict};
use automerge::{
    Automerge, Change, ChangeHash, LoadOptions, OnPartialLoad, PatchLog, VerificationMode,
};

/// Why remote changes (or imported bytes) were not admitted. The note is as it was before.
#[derive(Debug, thiserror::Error)]
pub enum AdmitError {
    #[error("{0}")]
    Rejected(#[from] automerge::AutomergeError),
    #[error("no changes in it")]
    Empty,
    #[error("changes that make Automerge panic ({0})")]
    Panicked(String),
    #[error("changes the note cannot keep: {0}")]
    Unsound(&'static str),
}

thread_local! {
    /// Batches checked by a whole save and load on this thread (tests assert honest
    /// traffic never needs one).
    pub(crate) static FULL_CHECKS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Remote changes to admit.
pub(crate) enum Batch<'a> {
    /// Parsed change chunks (their checksums checked).
    Changes(Vec<Change>),
    /// Storage chunks as they arrived: changes, bundles, document chunks.
    Bytes(&'a [u8]),
}

/// Applies `batch` to `doc` if it passes the checks in the module docs, logging patches to
/// `log` when given; on `Err` the note is unchanged.
pub(crate) fn apply(
    doc: &mut Automerge,
    lineage: &mut Lineage,
    batch: Batch<'_>,
    log: Option<&mut PatchLog>,
) -> Result<(), AdmitError> {
    let before = doc.get_heads();
    let attempt = catch_unwind(AssertUnwindSafe(
        || -> Result<(Automerge, Option<Update>), AdmitError> {
            lineage.catch_up(doc);
            let (trial, verified) = apply_to_copy(doc, batch, log)?;
            let update = match verified {
                true => None,
                false => check(&trial, &before, lineage)?,
            };
            Ok((trial, update))
        },
    ));
    match attempt {
        Ok(Ok((trial, update))) => {
            *doc = trial;
            match update {
                Some(update) => lineage.apply(update),
                None => lineage.reset(),
            }
            Ok(())
        }
        Ok(Err(e)) => Err(e),
        Err(payload) => Err(AdmitError::Panicked(panic_message(payload.as_ref()))),
    }
}

/// [`apply`] of parsed changes to a note the caller owns (a copy made for a worker, see
/// `offload`): applied in place, without a second copy. On `Err` the note is dropped, and
/// `lineage` must be dropped with it. The caller catches panics, as [`apply`] does.
pub(crate) fn apply_owned(
    mut doc: Automerge,
    lineage: &mut Lineage,
    changes: Vec<Change>,
    log: Option<&mut PatchLog>,
) -> Result<Automerge, AdmitError> {
    let before = doc.get_heads();
    lineage.catch_up(&doc);
    match log {
        Some(log) => doc.apply_changes_log_patches(changes, log)?,
        None => doc.apply_changes(changes)?,
    }
    match check(&doc, &before, lineage)? {
        Some(update) => lineage.apply(update),
        None => lineage.reset(),
    }
    Ok(doc)
}

/// A new note from untrusted bytes (`save()` output or changes), as admitted by [`apply`].
pub(crate) fn load(bytes: &[u8]) -> Result<Automerge, AdmitError> {
    let mut doc = Automerge::new();
    apply(&mut doc, &mut Lineage::default(), Batch::Bytes(bytes), None)?;
    if doc.get_heads().is_empty() {
        return Err(AdmitError::Empty);
    }
    // Unlike a first copy from a peer, whose rest may come next, an import is all there is.
    if !doc.get_missing_deps(&[]).is_empty() {
        return Err(automerge::AutomergeError::MissingDeps.into());
    }
    Ok(doc)
}

/// The note with `batch` applied, and whether Automerge verified the result itself.
fn apply_to_copy(
    doc: &Automerge,
    batch: Batch<'_>,
    log: Option<&mut PatchLog>,
) -> Result<(Automerge, bool), AdmitError> {
    let mut log = log;
    match batch {
        Batch::Changes(changes) => {
            let mut trial = doc.clone();
            match log {
                Some(log) => trial.apply_changes_log_patches(changes, log)?,
                None => trial.apply_changes(changes)?,
            }
            Ok((trial, false))
        }
        Batch::Bytes(bytes) if doc.is_empty() => {
            // A first copy. `load_incremental` would load it leniently (a damaged chunk
            // skipped without a word): every chunk must load. Changes waiting for a
            // dependency are fine (the rest of it may come in the next message).
            let only_documents = super::doc::storage_chunks(bytes)
                .is_ok_and(|chunks| chunks.iter().all(|c| c[8] == 0));
            let options = |partial| {
                LoadOptions::new()
                    .text_encoding(doc.text_encoding())
                    .on_partial_load(partial)
                    .verification_mode(VerificationMode::Check)
            };
            let mut load = |partial| match log.as_deref_mut() {
                Some(log) => Automerge::load_with_options(bytes, options(partial).patch_log(log)),
                None => Automerge::load_with_options(bytes, options(partial)),
            };
            let loaded = match load(OnPartialLoad::Error) {
                // Every chunk parsed and applied; some wait for a dependency.
                Err(automerge::AutomergeError::MissingDeps) => load(OnPartialLoad::Ignore)?,
                other => other?,
            };
            Ok((loaded.with_actor(doc.get_actor().clone()), only_documents))
        }
        Batch::Bytes(bytes) => {
            let mut trial = doc.clone();
            match log {
                Some(log) => trial.load_incremental_log_patches(bytes, log)?,
                None => trial.load_incremental(bytes)?,
            };
            Ok((trial, false))
        }
    }
}

/// Checks 2 and 3 of the module docs on the changes `doc` gained since `before`; what they
/// add to `lineage` (`None`: it must be built again).
fn check(
    doc: &Automerge,
    before: &[ChangeHash],
    lineage: &mut Lineage,
) -> Result<Option<Update>, AdmitError> {
    let meta = doc.get_changes_meta(before);
    if meta.is_empty() {
        return Ok(None);
    }
    let rebuilt = doc.get_changes(before);
    let mut want: Vec<ChangeHash> = meta.iter().map(|m| m.hash).collect();
    let mut got: Vec<ChangeHash> = rebuilt.iter().map(Change::hash).collect();
    want.sort_unstable();
    got.sort_unstable();
    if want != got {
        return Err(AdmitError::Unsound(
            "a change that the note does not rebuild as it came",
        ));
    }
    // The last op of each added change and, as they are looked up, of the older changes
    // they depend on (many added changes share a dependency: with many peers typing, every
    // change of a batch may name the same few heads of the others).
    let mut max_ops: HashMap<ChangeHash, u64> = meta.iter().map(|m| (m.hash, m.max_op)).collect();
    let mut unusual = false;
    for change in &rebuilt {
        let mut deps_max = 0;
        for dep in change.deps() {
            let max = match max_ops.get(dep) {
                Some(m) => *m,
                None => match doc.get_change_meta_by_hash(dep) {
                    Some(m) => {
                        max_ops.insert(*dep, m.max_op);
                        m.max_op
                    }
                    None => {
                        return Err(AdmitError::Unsound(
                            "a change applied without its dependency",
                        ))
                    }
                },
            };
            deps_max = deps_max.max(max);
        }
        if change.start_op().get() <= deps_max {
            return Err(AdmitError::Unsound(
                "a change whose ops do not come after its dependencies' ops",
            ));
        }
        // A change made on the note its dependencies describe (a commit) starts right
        // after their last op; one that starts later was made on a fuller note (Automerge's
        // `transaction_at`, JS `changeAt`). Rare, and what a forger would send: whether
        // the note still loads is then checked whole.
        unusual |= change.start_op().get() != deps_max + 1;
        ops_are_sound(doc, change, deps_max)?;
    }
    let update = match lineage.check(doc, before, &meta) {
        Ok(update) => Some(update),
        Err(Verdict::Broken(why)) => return Err(AdmitError::Unsound(why)),
        // The walk gave up.
        Err(Verdict::Undecided) => None,
    };
    if unusual || update.is_none() {
        FULL_CHECKS.with(|n| n.set(n.get() + 1));
        tracing::debug!(unusual, "checking that the note still loads, whole");
        let reloaded = Automerge::load(&doc.save())?;
        if reloaded.get_heads() != doc.get_heads() {
            return Err(AdmitError::Unsound(
                "a note that does not reload to its heads",
            ));
        }
    }
    Ok(update)
}

/// Every op of `change` (applied to `doc`) is well formed: it refers only to ops it can
/// have seen (its dependencies', counter at most `deps_max`, or earlier ones of its own), and
/// its key fits its object (a map key in a map, an element in a list or text) and whether it
/// inserts (only into a sequence; only an insert goes at the head).
fn ops_are_sound(doc: &Automerge, change: &Change, deps_max: u64) -> Result<(), AdmitError> {
    let expanded = change.decode();
    let start = expanded.start_op.get();
    let mut last_obj: Option<(&ObjectId, bool)> = None;
    for (i, op) in expanded.operations.iter().enumerate() {
        let seen = |id: &OpId| {
            id.0 <= deps_max
                || (id.1 == expanded.actor_id && id.0 >= start && id.0 - start < i as u64)
        };
        let obj_ok = match &op.obj {
            ObjectId::Root => true,
            ObjectId::Id(id) => seen(id),
        };
        let key_ok = match &op.key {
            Key::Seq(ElementId::Id(id)) => seen(id),
            Key::Seq(ElementId::Head) | Key::Map(_) => true,
        };
        if !obj_ok || !key_ok || !op.pred.iter().all(seen) {
            return Err(AdmitError::Unsound(
                "a change that refers to an op it cannot have seen",
            ));
        }
        let is_sequence = match last_obj {
            Some((obj, seq)) if obj == &op.obj => seq,
            _ => {
                let seq = match &op.obj {
                    ObjectId::Root => false,
                    ObjectId::Id(OpId(ctr, actor)) => {
                        let id = ExId::Id(*ctr, actor.clone(), usize::MAX);
                        match doc.object_type(&id) {
                            Ok(t) => matches!(t, ObjType::List | ObjType::Text),
                            Err(_) => {
                                return Err(AdmitError::Unsound(
                                    "an op on something that is not an object",
                                ))
                            }
                        }
                    }
                };
                last_obj = Some((&op.obj, seq));
                seq
            }
        };
        let fits = match &op.key {
            Key::Map(_) => !is_sequence && !op.insert,
            Key::Seq(ElementId::Head) => is_sequence && op.insert,
            Key::Seq(ElementId::Id(_)) => is_sequence,
        };
        if !fits {
            return Err(AdmitError::Unsound(
                "an op whose key does not fit its object",
            ));
        }
    }
    Ok(())
}

/// The note without the changes Automerge holds for missing dependencies: the way out when
/// a batch fails only because it makes such a change ready (one forged and queued earlier).
/// Costs a save and a load; peers send what was dropped again when asked for it.
pub(super) fn without_queue(doc: &Automerge) -> Result<Automerge, AdmitError> {
    catch_unwind(AssertUnwindSafe(|| -> Result<Automerge, AdmitError> {
        let options = LoadOptions::new().text_encoding(doc.text_encoding());
        let fresh = Automerge::load_with_options(&doc.save(), options)?;
        Ok(fresh.with_actor(doc.get_actor().clone()))
    }))
    .unwrap_or_else(|p| Err(AdmitError::Panicked(panic_message(p.as_ref()))))
}

/// The message a panic was raised with.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::transaction::Transactable;
    use automerge::{ActorId, ExpandedChange, ObjType, ReadDoc, ScalarValue, ROOT};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// A note with a text, a list, a map key and a counter; and a peer's three changes to
    /// all of them, made on top of it.
    fn note_and_remote_changes() -> (Automerge, Vec<Change>) {
        let mut note = Automerge::new().with_actor(ActorId::from([1u8; 16]));
        let mut tx = note.transaction();
        let text = tx.put_object(&ROOT, "text", ObjType::Text).unwrap();
        tx.splice_text(&text, 0, 0, "hello world").unwrap();
        let list = tx.put_object(&ROOT, "list", ObjType::List).unwrap();
        tx.insert(&list, 0, 1).unwrap();
        tx.insert(&list, 1, 2).unwrap();
        tx.put(&ROOT, "c", ScalarValue::counter(1)).unwrap();
        tx.commit();
        let before = note.get_heads();
        let mut peer = note.fork().with_actor(ActorId::from([2u8; 16]));
        for i in 0..3 {
            let mut tx = peer.transaction();
            tx.splice_text(&text, i, 1, "X").unwrap();
            tx.insert(&list, 0, i as i64).unwrap();
            tx.put(&ROOT, "k", i as i64).unwrap();
            tx.increment(&ROOT, "c", 1).unwrap();
            tx.delete(&list, 1).unwrap();
            tx.commit();
        }
        (note, peer.get_changes(&before))
    }

    /// `change` with `edit` applied to its decoded form, encoded again (checksum and hash
    /// consistent with the new bytes, as a forger would send it).
    fn forge(change: &Change, edit: impl FnOnce(&mut ExpandedChange)) -> Change {
        let mut e = change.decode();
        e.hash = None;
        edit(&mut e);
        Change::from(e)
    }

    /// Automerge alone, given `batch`, panics or keeps a note whose save does not load (what
    /// makes the forgery worth a test).
    fn assert_automerge_alone_breaks(note: &Automerge, batch: &[Change]) {
        let raw = catch_unwind(AssertUnwindSafe(|| {
            let mut raw = note.clone();
            raw.apply_changes(batch.to_vec()).unwrap();
            Automerge::load(&raw.save()).is_ok()
        }));
        assert!(
            !matches!(raw, Ok(true)),
            "automerge alone keeps this note sound"
        );
    }

    /// `apply` of `batch` with no lineage known yet.
    fn admit(note: &mut Automerge, batch: Batch<'_>) -> Result<(), AdmitError> {
        apply(note, &mut Lineage::default(), batch, None)
    }

    /// The note still works: its save loads to the same heads, and an honest change applies.
    fn assert_intact(note: &mut Automerge, heads: &[ChangeHash], honest: &Change) {
        assert_eq!(note.get_heads(), heads);
        let reloaded = Automerge::load(&note.save()).unwrap();
        assert_eq!(reloaded.get_heads(), heads);
        admit(note, Batch::Changes(vec![honest.clone()])).unwrap();
        assert_eq!(note.get_heads(), vec![honest.hash()]);
    }

    #[test]
    fn a_forged_seq_by_an_actor_the_note_lacks_is_rejected_not_a_panic() {
        let (mut note, changes) = note_and_remote_changes();
        let heads = note.get_heads();
        // The peer's first change claiming to be its second: Automerge 0.12 registers an
        // actor only from a seq-1 change, then unwraps its lookup.
        let forged = forge(&changes[0], |e| e.seq = 2);
        let err = admit(&mut note, Batch::Changes(vec![forged])).unwrap_err();
        assert!(matches!(err, AdmitError::Panicked(_)), "{err}");
        assert_intact(&mut note, &heads, &changes[0]);
    }

    #[test]
    fn a_forged_change_that_applies_but_would_not_reload_is_rejected() {
        let (note, changes) = note_and_remote_changes();
        let heads = note.get_heads();
        // Its ops numbered from 1, the counters of the note's own first ops.
        let forged = forge(&changes[0], |e| e.start_op = std::num::NonZeroU64::MIN);
        // What Automerge alone makes of it: no error, and a note whose save does not load
        // (or a panic on the way).
        assert_automerge_alone_breaks(&note, std::slice::from_ref(&forged));
        let mut admitted = note.clone();
        // Caught by the rebuild (which panics on it, inside the trial).
        let err = admit(&mut admitted, Batch::Changes(vec![forged])).unwrap_err();
        assert!(
            matches!(err, AdmitError::Unsound(_) | AdmitError::Panicked(_)),
            "{err}"
        );
        assert_intact(&mut admitted, &heads, &changes[0]);
    }

    #[test]
    fn a_change_that_hides_what_it_saw_is_rejected() {
        let (note, changes) = note_and_remote_changes();
        let heads = note.get_heads();
        // The peer's second change claiming to depend on the note alone, not on its first
        // change, whose ops it edits.
        let forged = forge(&changes[1], |e| e.deps = heads.clone());
        let batch = vec![changes[0].clone(), forged];
        assert_automerge_alone_breaks(&note, &batch);
        let mut admitted = note.clone();
        let err = admit(&mut admitted, Batch::Changes(batch)).unwrap_err();
        assert!(matches!(err, AdmitError::Unsound(_)), "{err}");
        assert_intact(&mut admitted, &heads, &changes[0]);
    }

    #[test]
    fn forged_bytes_to_an_empty_note_are_rejected_not_a_panic() {
        let (note, changes) = note_and_remote_changes();
        let mut bytes = note.save();
        bytes.extend_from_slice(forge(&changes[0], |e| e.seq = 2).raw_bytes());
        let mut empty = Automerge::new();
        assert!(admit(&mut empty, Batch::Bytes(&bytes)).is_err());
        assert!(empty.get_heads().is_empty());
        // The same copy without the forgery is a first copy like any other.
        admit(&mut empty, Batch::Bytes(&note.save())).unwrap();
        assert_eq!(empty.get_heads(), note.get_heads());
    }

    #[test]
    fn a_first_copy_with_a_damaged_chunk_is_rejected() {
        let (note, changes) = note_and_remote_changes();
        let mut bytes = note.save();
        let mut damaged = changes[0].raw_bytes().to_vec();
        let last = damaged.len() - 1;
        damaged[last] ^= 0x55;
        bytes.extend_from_slice(&damaged);
        let mut empty = Automerge::new();
        assert!(admit(&mut empty, Batch::Bytes(&bytes)).is_err());
        assert!(empty.get_heads().is_empty());
    }

    /// A change made at older heads (Automerge's `transaction_at`, JS `changeAt`) starts
    /// after every op of the fuller note it was made on: admitted, after a whole check.
    #[test]
    fn a_change_made_at_older_heads_is_admitted() {
        let (note, changes) = note_and_remote_changes();
        let mut peer = note.clone();
        peer.apply_changes(changes.clone()).unwrap();
        let text = peer.get(&ROOT, "text").unwrap().unwrap().1;
        let mut tx = peer
            .transaction_at(PatchLog::inactive(), &note.get_heads())
            .unwrap();
        tx.splice_text(&text, 0, 0, "then ").unwrap();
        tx.commit();
        let at = peer.get_last_local_change().unwrap();
        assert!(
            at.start_op().get() > changes[0].start_op().get(),
            "made on the fuller note"
        );
        let mut admitted = note.clone();
        let mut lineage = Lineage::default();
        let before = FULL_CHECKS.with(|n| n.get());
        apply(
            &mut admitted,
            &mut lineage,
            Batch::Changes(vec![at.clone()]),
            None,
        )
        .unwrap();
        assert_eq!(FULL_CHECKS.with(|n| n.get()), before + 1);
        apply(&mut admitted, &mut lineage, Batch::Changes(changes), None).unwrap();
        let mut heads = admitted.get_heads();
        let mut want = peer.get_heads();
        heads.sort();
        want.sort();
        assert_eq!(heads, want);
    }

    /// Random concurrent edits by several peers, delivered to one note in random batches
    /// (some ahead of their dependencies): every batch is admitted, and the note ends where
    /// Automerge alone takes it.
    #[test]
    fn honest_changes_in_any_batches_are_admitted() {
        for seed in 0..24u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut base = Automerge::new().with_actor(ActorId::from([9u8; 16]));
            let mut tx = base.transaction();
            let text = tx.put_object(&ROOT, "text", ObjType::Text).unwrap();
            let list = tx.put_object(&ROOT, "list", ObjType::List).unwrap();
            tx.commit();
            let mut peers: Vec<Automerge> = (0..3u8)
                .map(|i| base.fork().with_actor(ActorId::from([i; 16])))
                .collect();
            for _ in 0..40 {
                let i = rng.gen_range(0..peers.len());
                if rng.gen_bool(0.2) {
                    let j = rng.gen_range(0..peers.len());
                    let other = peers[j].clone();
                    peers[i].merge(&mut other.clone()).unwrap();
                }
                let p = &mut peers[i];
                let mut tx = p.transaction();
                for _ in 0..rng.gen_range(0..4) {
                    let len = tx.length(&text);
                    match rng.gen_range(0..5) {
                        0 if len > 0 => tx.delete(&text, rng.gen_range(0..len)).unwrap(),
                        1 => {
                            let n = tx.length(&list);
                            tx.insert(&list, rng.gen_range(0..=n), rng.gen::<i64>())
                                .unwrap()
                        }
                        2 => tx.put(&ROOT, "k", rng.gen::<u8>() as i64).unwrap(),
                        3 => {
                            let m = tx.put_object(&ROOT, "m", ObjType::Map).unwrap();
                            tx.put(&m, "x", "y").unwrap();
                        }
                        _ => tx
                            .splice_text(&text, rng.gen_range(0..=len), 0, "ab")
                            .unwrap(),
                    }
                }
                tx.commit();
            }
            let mut all: Vec<Change> = Vec::new();
            for p in &peers {
                all.extend(p.get_changes(&base.get_heads()));
            }
            let mut expected = base.clone();
            expected.apply_changes(all.clone()).unwrap();
            let mut note = base.clone();
            let mut lineage = Lineage::default();
            while !all.is_empty() {
                let n = rng.gen_range(1..=all.len().min(12));
                let batch: Vec<Change> = (0..n)
                    .map(|_| all.swap_remove(rng.gen_range(0..all.len())))
                    .collect();
                apply(&mut note, &mut lineage, Batch::Changes(batch), None)
                    .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
            }
            assert_eq!(
                FULL_CHECKS.with(|n| n.get()),
                0,
                "seed {seed}: a whole check"
            );
            let mut heads = note.get_heads();
            let mut want = expected.get_heads();
            heads.sort();
            want.sort();
            assert_eq!(heads, want, "seed {seed}");
            assert_eq!(note.hydrate(None), expected.hydrate(None), "seed {seed}");
            assert_eq!(
                Automerge::load(&note.save()).unwrap().get_heads(),
                note.get_heads()
            );
        }
    }
}
