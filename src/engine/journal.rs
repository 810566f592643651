//! A document in memory with the patches of its recent changes, so that subscribers to
//! changes do not have to diff the note.
//!
//! # Why
//!
//! `Automerge::diff(before, after)` walks every op of every object it compares: on the
//! automerge-paper note (a text of ~260k ops) it costs 45-70 ms even when one character
//! changed, and it runs under the note's lock. An editor subscribed to
//! [`crate::DocHandle::changes`] paid that for every keystroke, its own included: ~60% of a
//! core at 10 keystrokes/s, with local edits and the sync engine waiting on the lock.
//! Automerge can instead log patches while it changes the document (`PatchLog`): a local
//! transaction knows where it edits, and a remote apply walks the text anyway, so the patches
//! come almost free (measured: local edit 0.06 ms with its patch against 57-68 ms for the edit
//! plus a diff; remote apply 57-86 ms with patches against 49-89 ms plus 44-68 ms of diff).
//!
//! # How
//!
//! While at least one subscriber exists, every local transaction and every batch of remote
//! changes the engine applies records an [`Entry`]: the heads before, the heads after, and
//! the patches between. A subscriber whose last heads are some entry's `before` follows the
//! chain of entries to the heads it was told about and concatenates their patches (applied
//! in order they lead from one state to the next, which is what a diff's patches do). Any
//! change that was not recorded (a repair, a load, an apply that had to be retried, entries
//! dropped by the bound) leaves a gap in the chain, and the subscriber falls back to `diff`:
//! the journal can make an event cheaper, never different.

use std::collections::VecDeque;
use std::ops::{Deref, DerefMut};

use automerge::{Automerge, ChangeHash, Patch, PatchAction, PatchLog};

/// Most entries kept, and most patch weight (patches plus spliced text bytes): a subscriber
/// that lags further behind than this diffs instead.
const MAX_ENTRIES: usize = 256;
const MAX_WEIGHT: usize = 1 << 20;

#[derive(Debug)]
struct Entry {
    before: Vec<ChangeHash>,
    after: Vec<ChangeHash>,
    patches: Vec<Patch>,
    weight: usize,
}

/// Recent changes' patches, kept while someone subscribes.
#[derive(Debug, Default)]
pub(crate) struct Journal {
    subscribers: usize,
    entries: VecDeque<Entry>,
    weight: usize,
}

impl Journal {
    fn push(&mut self, before: Vec<ChangeHash>, after: Vec<ChangeHash>, patches: Vec<Patch>) {
        if before == after {
            return;
        }
        let weight = patches.len()
            + patches
                .iter()
                .map(|p| match &p.action {
                    PatchAction::SpliceText { value, .. } => value.make_string().len(),
                    _ => 0,
                })
                .sum::<usize>();
        self.weight += weight;
        self.entries.push_back(Entry {
            before,
            after,
            patches,
            weight,
        });
        while self.entries.len() > MAX_ENTRIES
            || (self.weight > MAX_WEIGHT && self.entries.len() > 1)
        {
            if let Some(old) = self.entries.pop_front() {
                self.weight -= old.weight;
            }
        }
    }

    /// The patches from `from` to `to` by following recorded entries, if they form a chain.
    fn between(&self, from: &[ChangeHash], to: &[ChangeHash]) -> Option<Vec<Patch>> {
        let start = self.entries.iter().rposition(|e| e.before == from)?;
        let mut out = Vec::new();
        let mut at = from;
        for e in self.entries.range(start..) {
            if e.before != at {
                return None;
            }
            out.extend(e.patches.iter().cloned());
            at = &e.after;
            if at == to {
                return Some(out);
            }
        }
        None
    }
}

/// An Automerge document shared by the engine and the handles (behind one lock per note),
/// with its journal of recent patches. Derefs to the document.
#[derive(Debug, Default)]
pub struct DocCell {
    doc: Automerge,
    journal: Journal,
}

impl DocCell {
    pub fn new(doc: Automerge) -> Self {
        Self {
            doc,
            journal: Journal::default(),
        }
    }

    /// Replace the document (a load finished). The journal's entries no longer apply.
    pub fn replace(&mut self, doc: Automerge) {
        self.doc = doc;
        self.journal.entries.clear();
        self.journal.weight = 0;
    }

    /// A patch log for the next change while someone subscribes (then pass it back to
    /// [`DocCell::record`] under the same lock), else `None`.
    pub fn patch_log(&self) -> Option<PatchLog> {
        (self.journal.subscribers > 0).then(PatchLog::active)
    }

    /// Record what `log` (from [`DocCell::patch_log`]) saw since `before`.
    pub fn record(&mut self, before: Vec<ChangeHash>, mut log: PatchLog) {
        let patches = self.doc.make_patches(&mut log);
        let after = self.doc.get_heads();
        self.journal.push(before, after, patches);
    }

    /// The patches from `from` to `to`: from the journal when it has them, else a diff.
    /// The flag says whether it took a diff.
    pub fn patches_between(&self, from: &[ChangeHash], to: &[ChangeHash]) -> (Vec<Patch>, bool) {
        match self.journal.between(from, to) {
            Some(p) => (p, false),
            None => (self.doc.diff(from, to), true),
        }
    }

    pub(crate) fn subscribe(&mut self) {
        self.journal.subscribers += 1;
    }

    pub(crate) fn unsubscribe(&mut self) {
        self.journal.subscribers = self.journal.subscribers.saturating_sub(1);
        if self.journal.subscribers == 0 {
            self.journal.entries.clear();
            self.journal.weight = 0;
        }
    }
}

impl Deref for DocCell {
    type Target = Automerge;
    fn deref(&self) -> &Automerge {
        &self.doc
    }
}

impl DerefMut for DocCell {
    fn deref_mut(&mut self) -> &mut Automerge {
        &mut self.doc
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::transaction::Transactable;
    use automerge::{ObjType, ReadDoc, ROOT};

    fn edit(cell: &mut DocCell, text: &automerge::ObjId, at: usize, s: &str) {
        splice(cell, text, at, 0, s);
    }

    fn splice(cell: &mut DocCell, text: &automerge::ObjId, at: usize, del: isize, s: &str) {
        let before = cell.get_heads();
        match cell.patch_log() {
            Some(log) => {
                let mut tx = cell.transaction_log_patches(log).unwrap();
                tx.splice_text(text, at, del, s).unwrap();
                let (_, log) = tx.commit();
                cell.record(before, log);
            }
            None => {
                let mut tx = cell.transaction();
                tx.splice_text(text, at, del, s).unwrap();
                tx.commit();
            }
        }
    }

    /// Apply text patches in order to `text` (code points), as an editor would.
    fn apply(text: &str, patches: &[Patch]) -> String {
        let mut chars: Vec<char> = text.chars().collect();
        for p in patches {
            match &p.action {
                PatchAction::SpliceText { index, value, .. } => {
                    let at = (*index).min(chars.len());
                    chars.splice(at..at, value.make_string().chars());
                }
                PatchAction::DeleteSeq { index, length } => {
                    let end = (index + length).min(chars.len());
                    chars.drain(*index..end);
                }
                other => panic!("unexpected patch {other:?}"),
            }
        }
        chars.into_iter().collect()
    }

    #[test]
    fn chained_entries_lead_where_a_diff_does_and_gaps_fall_back_to_it() {
        let mut cell = DocCell::new(Automerge::new());
        let text = {
            let mut tx = cell.transaction();
            let t = tx.put_object(ROOT, "text", ObjType::Text).unwrap();
            tx.commit();
            t
        };
        let text_at = |cell: &DocCell, h: &[ChangeHash]| cell.text_at(&text, h).unwrap();
        // Nothing is recorded without a subscriber.
        edit(&mut cell, &text, 0, "a");
        assert!(cell.journal.entries.is_empty());
        cell.subscribe();
        let h0 = cell.get_heads();
        edit(&mut cell, &text, 1, "bc");
        edit(&mut cell, &text, 0, "d");
        splice(&mut cell, &text, 1, 2, ""); // a delete, recorded too
        let h3 = cell.get_heads();
        let (p, diffed) = cell.patches_between(&h0, &h3);
        assert!(!diffed, "the chain covers it");
        assert_eq!(apply(&text_at(&cell, &h0), &p), text_at(&cell, &h3));
        assert_eq!(text_at(&cell, &h3), "dc");
        // An unrecorded change leaves a gap: the diff is used, and still right.
        {
            let mut tx = cell.transaction();
            tx.splice_text(&text, 0, 0, "x").unwrap();
            tx.commit();
        }
        edit(&mut cell, &text, 0, "y");
        let h5 = cell.get_heads();
        let (p, diffed) = cell.patches_between(&h0, &h5);
        assert!(diffed);
        assert_eq!(apply(&text_at(&cell, &h0), &p), text_at(&cell, &h5));
        // The last subscriber leaving clears the journal.
        cell.unsubscribe();
        assert!(cell.journal.entries.is_empty());
    }
}
