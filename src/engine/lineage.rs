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
//! A seq-1 change needs nothing. For an actor's first change in a batch, its previous
//! change is looked for walking back from the change's dependencies, stopping at the
//! actor's own changes: nearly always a few steps. Only when that walk ends without it (or
//! passes 256 changes) is the map built, once per note, from all the change metadata, and
//! then kept up with the heads (local changes made through handles are picked up from the
//! heads that moved). With the map, the ancestry walk only descends into changes whose ops
//! start after the predecessor's last op (an ancestor of anything descending from it
//! cannot), so it stays among the few changes made since; past [`WALK_BUDGET`] the caller
//! checks the note whole instead.

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
#[derive(Debug, Default, Clone)]
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
    /// Bring a built map up to `doc` (the changes made since it last saw the note: local
    /// edits through handles). A map not built yet stays so until a walk needs it.
    pub(crate) fn catch_up(&mut self, doc: &Automerge) {
        if !self.built {
            return;
        }
        let heads = doc.get_heads();
        if heads == self.heads {
            return;
        }
        let known = self
            .heads
            .iter()
            .all(|h| doc.get_change_meta_by_hash(h).is_some());
        if !known {
            self.reset();
            return;
        }
        let since = std::mem::take(&mut self.heads);
        self.record(doc, &since, &HashSet::new());
        self.heads = heads;
    }

    /// Build the map of the note at `before`: `doc` without the changes in `skip` (those
    /// being checked, all that `doc` has beyond `before`).
    fn build(&mut self, doc: &Automerge, before: &[ChangeHash], skip: &HashSet<ChangeHash>) {
        self.latest.clear();
        self.record(doc, &[], skip);
        self.built = true;
        self.heads = before.to_vec();
    }

    fn record(&mut self, doc: &Automerge, since: &[ChangeHash], skip: &HashSet<ChangeHash>) {
        for m in doc.get_changes_meta(since) {
            if skip.contains(&m.hash) {
                continue;
            }
            let newer = self
                .latest
                .get(m.actor.as_ref())
                .is_none_or(|l| l.seq < m.seq);
            if newer {
                let latest = latest_of(&m);
                self.latest.insert(m.actor.into_owned(), latest);
            }
        }
    }

    /// Checks that each of `new` (the changes a batch added to `doc`, as of a [`Self::catch_up`]
    /// on the note before it) follows its actor's previous change: the next seq, and a
    /// descendant of it. The previous change of an actor's first new one is looked for by a
    /// short walk back from its dependencies (an actor's previous change is nearly always a
    /// few changes back); only when that fails is the map built, once per note (all the
    /// change metadata: 0.2 s on a note of 260,000 changes).
    pub(crate) fn check(
        &mut self,
        doc: &Automerge,
        before: &[ChangeHash],
        new: &[ChangeMetadata<'_>],
    ) -> Result<Update, Verdict> {
        let mut by_actor: HashMap<&ActorId, Vec<&ChangeMetadata<'_>>> = HashMap::new();
        for m in new {
            by_actor.entry(m.actor.as_ref()).or_default().push(m);
        }
        let mut update = Vec::with_capacity(by_actor.len());
        for (actor, mut changes) in by_actor {
            changes.sort_unstable_by_key(|m| m.seq);
            let first = changes[0];
            // A seq-1 change needs no predecessor (Automerge rejects a second seq 1).
            if first.seq != 1 {
                // The map when it is built; else a short walk, and the map if that fails.
                let known = self
                    .built
                    .then(|| self.latest.get(actor).copied())
                    .flatten();
                let found = match known {
                    Some(p) => follows(doc, &p, first).map(|()| p).map_err(|v| match v {
                        Verdict::Broken(why) => Found::Broken(why),
                        Verdict::Undecided => Found::Unknown,
                    }),
                    None => match find_previous(doc, first, actor) {
                        Found::Yes(p) => Ok(p),
                        other => Err(other),
                    },
                };
                let p = match found.map_or_else(|f| f, Found::Yes) {
                    Found::Yes(p) => p,
                    Found::Broken(why) => return Err(Verdict::Broken(why)),
                    Found::Unknown => {
                        if !self.built {
                            let skip: HashSet<ChangeHash> = new.iter().map(|m| m.hash).collect();
                            self.build(doc, before, &skip);
                        }
                        let Some(p) = self.latest.get(actor).copied() else {
                            return Err(Verdict::Broken(
                                "a change by an actor whose earlier changes the note lacks",
                            ));
                        };
                        follows(doc, &p, first)?;
                        p
                    }
                };
                debug_assert_eq!(p.seq + 1, first.seq);
            }
            let mut previous = latest_of(first);
            for m in &changes[1..] {
                follows(doc, &previous, m)?;
                previous = latest_of(m);
            }
            update.push((actor.clone(), previous));
        }
        Ok(Update {
            latest: update,
            heads: doc.get_heads(),
        })
    }

    /// Record an admitted batch (see [`Self::check`]) in a built map.
    pub(crate) fn apply(&mut self, update: Update) {
        if self.built {
            self.latest.extend(update.latest);
            self.heads = update.heads;
        }
    }

    /// Forget everything (the note was replaced).
    pub(crate) fn reset(&mut self) {
        *self = Self::default();
    }
}

/// `m` is the change after `p` by the same actor: the next seq, and a descendant.
fn follows(doc: &Automerge, p: &Latest, m: &ChangeMetadata<'_>) -> Result<(), Verdict> {
    if p.seq + 1 != m.seq {
        return Err(Verdict::Broken(
            "a change that does not follow its actor's previous one",
        ));
    }
    match descends_from(doc, &m.deps, p) {
        Some(true) => Ok(()),
        Some(false) => Err(Verdict::Broken(
            "a change that does not descend from its actor's previous one",
        )),
        None => Err(Verdict::Undecided),
    }
}

/// Changes visited looking for an actor's previous change before building the map.
const FIND_BUDGET: usize = 64;

enum Found {
    Yes(Latest),
    Broken(&'static str),
    Unknown,
}

/// The previous change of `first`'s actor among its ancestors, found walking back from its
/// dependencies and stopping at each change by that actor.
fn find_previous(doc: &Automerge, first: &ChangeMetadata<'_>, actor: &ActorId) -> Found {
    // Breadth first: the previous change is nearly always a dependency or close to one.
    let mut stack: std::collections::VecDeque<ChangeHash> = first.deps.iter().copied().collect();
    let mut seen: HashSet<ChangeHash> = HashSet::new();
    while let Some(h) = stack.pop_front() {
        if !seen.insert(h) {
            continue;
        }
        if seen.len() > FIND_BUDGET {
            return Found::Unknown;
        }
        let Some(m) = doc.get_change_meta_by_hash(&h) else {
            continue;
        };
        if m.actor.as_ref() == actor {
            if m.seq + 1 == first.seq {
                return Found::Yes(latest_of(&m));
            }
            if m.seq >= first.seq {
                return Found::Broken("a change that comes after a later one of its actor");
            }
            // An older change of the actor: the previous one is not down this path.
            continue;
        }
        stack.extend(m.deps.iter().copied());
    }
    // Every path ended without it (or it is further than the walk went).
    Found::Unknown
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
    if deps.contains(&p.hash) {
        return Some(true);
    }
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
