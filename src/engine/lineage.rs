//! Each actor's latest change in a note: what a remote change by that actor must come after.
//!
//! # Why
//!
//! An actor's changes form a chain: its change with seq n is made on a note holding its change
//! n - 1, so n - 1 is one of n's ancestors. Automerge 0.12 does not check this on apply, and
//! its save relies on it: a forged change n that does not descend from n - 1 (its
//! dependencies dropped, say) applies, rebuilds fine on its own, and leaves a note whose
//! saved bytes do not load (`MissingOps`), found by the `forged_changes` fuzz target within
//! its seeds. `admit` asks [`Lineage::check`] for every change a batch added.
//!
//! # Cost
//!
//! The map is built once per note from the change metadata and then kept up with the heads
//! (local changes made through handles are picked up from the heads that moved). The
//! ancestry walk starts at the change's dependencies and only descends into changes whose
//! ops start after the predecessor's last op (an ancestor of anything descending from it
//! cannot), so it stays among the few changes made since the predecessor; past
//! [`WALK_BUDGET`] the caller checks the note whole instead.

use std::collections::{HashMap, HashSet};

use automerge::{ActorId, Automerge, ChangeHash, ChangeMetadata};

/// Changes visited looking for a predecessor before giving up on the walk.
pub(crate) const WALK_BUDGET: usize = 4096;

/// The latest change of one actor.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Latest {
    seq: u64,
    hash: ChangeHash,
    max_op: u64,
}

/// Each actor's latest change in a note, as of `heads`.
#[derive(Debug, Default)]
pub(crate) struct Lineage {
    built: bool,
    heads: Vec<ChangeHash>,
    latest: HashMap<ActorId, Latest>,
}

/// Why a batch's lineage was not accepted.
pub(crate) enum Verdict {
    Broken(&'static str),
    /// The walk ran past its budget: check the note whole.
    Undecided,
}

/// What a batch adds to a [`Lineage`] once it is admitted.
pub(crate) struct Update {
    latest: Vec<(ActorId, Latest)>,
    heads: Vec<ChangeHash>,
}

impl Lineage {
    /// Bring the map up to `doc` (changes made since it last saw the note, or all of them).
    pub(crate) fn catch_up(&mut self, doc: &Automerge) {
        let heads = doc.get_heads();
        if self.built && heads == self.heads {
            return;
        }
        let known = self.built
            && self
                .heads
                .iter()
                .all(|h| doc.get_change_meta_by_hash(h).is_some());
        if !known {
            self.latest.clear();
        }
        let since: &[ChangeHash] = if known { &self.heads } else { &[] };
        for m in doc.get_changes_meta(since) {
            let newer = self
                .latest
                .get(m.actor.as_ref())
                .is_none_or(|l| l.seq < m.seq);
            if newer {
                let latest = latest_of(&m);
                self.latest.insert(m.actor.into_owned(), latest);
            }
        }
        self.built = true;
        self.heads = heads;
    }

    /// Checks that each of `new` (the changes a batch added to `doc`, as of a [`Self::catch_up`]
    /// on the note before it) follows its actor's previous change: the next seq, and a
    /// descendant of it.
    pub(crate) fn check(
        &self,
        doc: &Automerge,
        new: &[ChangeMetadata<'_>],
    ) -> Result<Update, Verdict> {
        let mut by_actor: HashMap<&ActorId, Vec<&ChangeMetadata<'_>>> = HashMap::new();
        for m in new {
            by_actor.entry(m.actor.as_ref()).or_default().push(m);
        }
        let mut update = Vec::with_capacity(by_actor.len());
        for (actor, mut changes) in by_actor {
            changes.sort_unstable_by_key(|m| m.seq);
            let mut previous = self.latest.get(actor).copied();
            for m in changes {
                match previous {
                    None if m.seq == 1 => {}
                    None => {
                        return Err(Verdict::Broken(
                            "a change by an actor whose earlier changes the note lacks",
                        ))
                    }
                    Some(p) if p.seq + 1 != m.seq => {
                        return Err(Verdict::Broken(
                            "a change that does not follow its actor's previous one",
                        ))
                    }
                    Some(p) => match descends_from(doc, &m.deps, &p) {
                        Some(true) => {}
                        Some(false) => {
                            return Err(Verdict::Broken(
                                "a change that does not descend from its actor's previous one",
                            ))
                        }
                        None => return Err(Verdict::Undecided),
                    },
                }
                previous = Some(latest_of(m));
            }
            if let Some(p) = previous {
                update.push((actor.clone(), p));
            }
        }
        Ok(Update {
            latest: update,
            heads: doc.get_heads(),
        })
    }

    /// Record an admitted batch (see [`Self::check`]).
    pub(crate) fn apply(&mut self, update: Update) {
        self.latest.extend(update.latest);
        self.heads = update.heads;
        self.built = true;
    }

    /// Forget everything (the note was replaced).
    pub(crate) fn reset(&mut self) {
        *self = Self::default();
    }
}

fn latest_of(m: &ChangeMetadata<'_>) -> Latest {
    Latest {
        seq: m.seq,
        hash: m.hash,
        max_op: m.max_op,
    }
}

/// Whether `p` is `deps` or one of their ancestors; `None` past [`WALK_BUDGET`] changes.
fn descends_from(doc: &Automerge, deps: &[ChangeHash], p: &Latest) -> Option<bool> {
    let mut stack: Vec<ChangeHash> = deps.to_vec();
    let mut seen: HashSet<ChangeHash> = HashSet::new();
    while let Some(h) = stack.pop() {
        if h == p.hash {
            return Some(true);
        }
        if !seen.insert(h) {
            continue;
        }
        if seen.len() > WALK_BUDGET {
            return None;
        }
        let Some(m) = doc.get_change_meta_by_hash(&h) else {
            continue;
        };
        // A descendant of `p` starts after `p`'s last op (see `admit`, check 3).
        if m.start_op <= p.max_op {
            continue;
        }
        stack.extend(m.deps.iter().copied());
    }
    Some(false)
}
