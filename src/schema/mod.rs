//! Schema-level invariants: a check and a deterministic repair, registered per kind of note.
//!
//! Automerge merges any two concurrent changes without conflict, but a merge can still break
//! a rule the app relies on: two devices each add the same tag to a list that should hold it
//! once, or one deletes a field the app requires while the other edits it. sheaf lets an app
//! register [`Invariant`]s for each *kind* of note (found from the document by a classifier,
//! by default the root string field `"kind"`), and enforces them in two places:
//!
//! - **Local changes** ([`crate::DocHandle::change`]): a change that leaves the note breaking
//!   an invariant it satisfied before is rolled back and returned as
//!   [`crate::RepoError::Invariant`] ([`Rejected`]). Nothing is persisted or sent. A note that
//!   already broke an invariant (say its repair failed) still takes edits that do not make
//!   things worse than they were, so it can always be fixed by hand.
//! - **Merges** (in the sans-IO engine, right after a batch of remote changes is applied,
//!   and when a note is loaded from storage or created): each broken invariant is repaired
//!   in its own transaction, committed as a local change of this peer, persisted and synced
//!   like any other, and reported as an [`crate::engine::Event::Repair`] (a
//!   [`RepairEvent`]), which [`crate::Repo::repairs`] and [`crate::DocHandle::repairs`]
//!   hand to apps.
//!
//! # Why repairs must be deterministic
//!
//! Every peer that merges the same concurrent changes sees the same broken state, and every
//! one of them repairs it, at about the same time, without talking to the others. Their
//! repair changes are themselves concurrent and get merged. For the result to be one valid
//! state, a repair must be a function of the document state alone (never of the peer, a
//! clock or a random number), and repairs of overlapping states must merge to a valid state:
//!
//! - [`UniqueList`] keeps the first occurrence of each value in list order and deletes the
//!   later ones. List order of existing elements is the same on every replica, so peers
//!   that repair the same state delete exactly the same elements, and deleting an element
//!   twice concurrently is the same as deleting it once: their repairs merge to the state
//!   each of them made. Peers that repair *different* states (one has seen a third
//!   duplicate, the other not yet) each keep the first occurrence they see; duplicates that
//!   survive the merge of their repairs are found and repaired by the next peer that merges
//!   them. Repairs only delete, so this ends. (If a user concurrently deletes the
//!   occurrence a repair kept, the value can end up gone: the user removed it.)
//! - [`RequiredField`] recreates a missing field with its default. Two peers recreating it
//!   at once conflict on the key; Automerge picks the same winner everywhere, and either
//!   value is valid. The repair restores the *default*, not what was there: when one side
//!   deletes an object field (a text, a list, a map) while the other edits inside it, the
//!   delete wins in Automerge (the edits went into the deleted object), so the field comes
//!   back empty or as the default and the other side's concurrent edits are lost from the
//!   note. They stay in its history ([`crate::DocHandle::json_at`] or
//!   [`crate::Repo::fork`] at the editor's old heads recovers them). A concurrent
//!   *overwrite* of the field itself (a new value put at the key) survives the delete, and
//!   nothing is repaired.
//!
//! An app-defined invariant must keep the same two properties. A repair that fails, panics
//! or does not restore its invariant is rolled back and reported
//! ([`RepairError`]); the note is left as merged, and the failure is reported again each
//! time the note is checked (after each batch of remote changes, on each load) until an edit
//! fixes it. A check or classifier that panics in the engine is caught the same way (in
//! [`crate::DocHandle::change`] it unwinds into the caller, like a panic in the change).
//!
//! Local changes are *not* checked by the engine (only merges): a change through a handle
//! was already checked, and a peer without the schema (an older app, a JS client) may write
//! anything; its changes are repaired when they reach a peer with the schema.

mod builtin;

pub use builtin::{FieldDefault, FieldPath, RequiredField, UniqueList};

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use automerge::transaction::{CommitOptions, Transaction};
use automerge::{ActorId, Automerge, AutomergeError, ChangeHash, ReadDoc, ROOT};

use crate::id::DocumentId;

/// A rule notes of one kind must keep, with a deterministic repair for when a merge breaks it.
///
/// Both methods see the note through an Automerge [`Transaction`] (read it with
/// [`ReadDoc`]): for a local change it is the note as the change would leave it; after a
/// merge it is the merged note. See the [module docs](self) for what a repair must
/// guarantee so that peers repairing at once converge.
pub trait Invariant: Send + Sync + 'static {
    /// A name, unique among the invariants of a kind; shown in errors and events.
    fn name(&self) -> &str;

    /// `Err` describes how the note breaks the rule. Runs twice per local change of a note
    /// of its kind (before and after, see [`Schema::guard`]) and once per batch of merged
    /// changes: keep it proportional to what it looks at, not to the whole note.
    fn check(&self, doc: &Transaction<'_>) -> Result<(), Violation>;

    /// Make the note satisfy the rule again, as a function of the note's state only.
    /// `violation` is what [`check`](Self::check) just returned for this state.
    fn repair(&self, tx: &mut Transaction<'_>, violation: &Violation)
        -> Result<(), AutomergeError>;
}

/// How a note breaks an invariant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Violation {
    pub message: String,
}

impl Violation {
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
        }
    }
}

/// A local change refused because it breaks an invariant (it was rolled back).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the change breaks invariant `{invariant}` of `{kind}` notes: {violation}")]
pub struct Rejected {
    pub kind: String,
    pub invariant: String,
    pub violation: Violation,
}

/// Why a repair did not happen (the note is left as it was before the repair).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RepairError {
    #[error("the repair failed and was rolled back: {0}")]
    Failed(String),
    #[error("the repair panicked and was rolled back")]
    Panicked,
    #[error("the repair did not restore the invariant and was rolled back: {0}")]
    StillViolated(Violation),
    #[error("checking the invariant panicked")]
    CheckPanicked,
}

/// One repair attempt after a merge: what was broken, and the change that fixed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepairEvent {
    pub doc: DocumentId,
    pub kind: String,
    pub invariant: String,
    /// What the check found in the merged note.
    pub violation: Violation,
    /// The repair change (a local change of this peer), or why there is none.
    pub outcome: Result<ChangeHash, RepairError>,
}

impl RepairEvent {
    pub fn repaired(&self) -> bool {
        self.outcome.is_ok()
    }
}

/// Finds a note's kind. Sees the note as [`Invariant::check`] does.
pub type Classifier = Arc<dyn Fn(&Transaction<'_>) -> Option<String> + Send + Sync>;

/// The invariants of each kind of note, and how to tell a note's kind. Cheap to clone.
///
/// ```
/// use sheafdb::schema::{FieldDefault, RequiredField, Schema, UniqueList};
/// let schema = Schema::new() // a note's kind is its root string field "kind"
///     .invariant("task", UniqueList::new("tags"))
///     .invariant("task", RequiredField::new("title", FieldDefault::Text(String::new())));
/// ```
#[derive(Clone)]
pub struct Schema {
    inner: Arc<SchemaInner>,
}

#[derive(Clone)]
struct SchemaInner {
    classifier: Classifier,
    /// What the classifier is, for `Debug`.
    classifier_desc: String,
    kinds: BTreeMap<String, Vec<Arc<dyn Invariant>>>,
}

impl Default for Schema {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Schema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kinds: BTreeMap<&str, Vec<&str>> = self
            .inner
            .kinds
            .iter()
            .map(|(k, v)| (k.as_str(), v.iter().map(|i| i.name()).collect()))
            .collect();
        f.debug_struct("Schema")
            .field("kind", &self.inner.classifier_desc)
            .field("invariants", &kinds)
            .finish()
    }
}

/// The root string field `key` of a note, if it is a string (or a text object).
fn root_string(doc: &Transaction<'_>, key: &str) -> Option<String> {
    match doc.get(ROOT, key).ok()?? {
        (automerge::Value::Scalar(s), _) => s.as_str().map(str::to_owned),
        (automerge::Value::Object(automerge::ObjType::Text), id) => doc.text(&id).ok(),
        _ => None,
    }
}

impl Schema {
    /// No invariants; a note's kind is its root string field `"kind"`.
    pub fn new() -> Self {
        Self {
            inner: Arc::new(SchemaInner {
                classifier: Arc::new(|doc| root_string(doc, "kind")),
                classifier_desc: "root field \"kind\"".into(),
                kinds: BTreeMap::new(),
            }),
        }
    }

    /// A note's kind is its root string field `key` (e.g. `"@type"`).
    pub fn kind_key(mut self, key: &str) -> Self {
        let owned = key.to_string();
        let inner = Arc::make_mut(&mut self.inner);
        inner.classifier = Arc::new(move |doc| root_string(doc, &owned));
        inner.classifier_desc = format!("root field {key:?}");
        self
    }

    /// A note's kind is what `f` says (`None`: no invariants apply). `f` must depend on the
    /// note's state only, like a repair.
    pub fn classify_with(
        mut self,
        f: impl Fn(&Transaction<'_>) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        let inner = Arc::make_mut(&mut self.inner);
        inner.classifier = Arc::new(f);
        inner.classifier_desc = "an app classifier".into();
        self
    }

    /// Register `invariant` for notes of `kind`. One with the same name is replaced.
    /// Invariants are checked and repaired in the order they were registered.
    pub fn invariant(mut self, kind: impl Into<String>, invariant: impl Invariant) -> Self {
        let inner = Arc::make_mut(&mut self.inner);
        let list = inner.kinds.entry(kind.into()).or_default();
        let invariant: Arc<dyn Invariant> = Arc::new(invariant);
        match list.iter_mut().find(|i| i.name() == invariant.name()) {
            Some(slot) => *slot = invariant,
            None => list.push(invariant),
        }
        self
    }

    /// No invariant is registered (nothing is ever checked).
    pub fn is_empty(&self) -> bool {
        self.inner.kinds.values().all(Vec::is_empty)
    }

    /// The note's kind, as the classifier finds it.
    pub fn kind_of(&self, doc: &Transaction<'_>) -> Option<String> {
        (self.inner.classifier)(doc)
    }

    /// The invariants registered for `kind`, in order.
    pub fn invariants(&self, kind: &str) -> &[Arc<dyn Invariant>] {
        self.inner.kinds.get(kind).map_or(&[], Vec::as_slice)
    }

    /// The note's kind and its invariants, if any apply.
    fn applicable(&self, doc: &Transaction<'_>) -> Option<(String, &[Arc<dyn Invariant>])> {
        if self.is_empty() {
            return None;
        }
        let kind = self.kind_of(doc)?;
        let invs = self.invariants(&kind);
        (!invs.is_empty()).then_some((kind, invs))
    }

    /// Every invariant the note breaks, with the note's kind.
    pub fn violations(&self, doc: &Transaction<'_>) -> Vec<Rejected> {
        let Some((kind, invs)) = self.applicable(doc) else {
            return Vec::new();
        };
        invs.iter()
            .filter_map(|inv| {
                inv.check(doc).err().map(|violation| Rejected {
                    kind: kind.clone(),
                    invariant: inv.name().to_string(),
                    violation,
                })
            })
            .collect()
    }

    /// Every invariant broken in `doc` as it is now (see [`Schema::violations`]); cheap when
    /// the schema is empty or no invariant applies to the note's kind.
    pub fn violations_of(&self, doc: &mut Automerge) -> Vec<Rejected> {
        if self.is_empty() {
            return Vec::new();
        }
        let tx = doc.transaction();
        let v = self.violations(&tx);
        tx.rollback();
        v
    }

    /// A guard for a local change: take it with the transaction before the change is made,
    /// then ask [`ChangeGuard::verdict`] with the transaction after it.
    pub fn guard(&self, before: &Transaction<'_>) -> ChangeGuard {
        let broken = self
            .violations(before)
            .into_iter()
            .map(|r| (r.kind, r.invariant))
            .collect();
        ChangeGuard { broken }
    }
}

/// What was already broken before a local change (see [`Schema::guard`]).
#[derive(Debug)]
pub struct ChangeGuard {
    broken: Vec<(String, String)>,
}

impl ChangeGuard {
    /// `Err` if the change leaves the note breaking an invariant it kept before.
    pub fn verdict(&self, schema: &Schema, after: &Transaction<'_>) -> Result<(), Rejected> {
        match schema
            .violations(after)
            .into_iter()
            .find(|r| !self.broken.contains(&(r.kind.clone(), r.invariant.clone())))
        {
            Some(r) => Err(r),
            None => Ok(()),
        }
    }
}

/// How the engine makes its repair changes.
pub(crate) struct RepairContext<'a> {
    pub doc: DocumentId,
    /// The actor repair changes are made as; `None`: the document's own actor.
    pub actor: Option<&'a ActorId>,
    /// Change timestamp (seconds since the Unix epoch, as handles stamp theirs).
    pub time: i64,
}

/// Check every invariant of the note's kind and repair the broken ones, each in its own
/// change. Returns one event per repair attempt.
pub(crate) fn enforce(
    schema: &Schema,
    doc: &mut Automerge,
    cx: &RepairContext<'_>,
) -> Vec<RepairEvent> {
    if schema.is_empty() || doc.get_heads().is_empty() {
        return Vec::new();
    }
    // Find what is broken first (one read-only pass), so a note that keeps its rules costs
    // one check per invariant and no change.
    let (kind, broken) = {
        let tx = doc.transaction();
        let found = catch_unwind(AssertUnwindSafe(|| {
            let (kind, invs) = schema.applicable(&tx)?;
            let broken: Vec<(Arc<dyn Invariant>, Result<Violation, RepairError>)> = invs
                .iter()
                .filter_map(
                    |inv| match catch_unwind(AssertUnwindSafe(|| inv.check(&tx))) {
                        Ok(Ok(())) => None,
                        Ok(Err(v)) => Some((inv.clone(), Ok(v))),
                        Err(_) => Some((inv.clone(), Err(RepairError::CheckPanicked))),
                    },
                )
                .collect();
            Some((kind, broken))
        }));
        tx.rollback();
        match found {
            Ok(Some(f)) => f,
            // No kind, no invariants, or the classifier panicked: nothing to enforce.
            Ok(None) | Err(_) => return Vec::new(),
        }
    };
    let mut events = Vec::new();
    for (inv, first) in broken {
        let event = |violation: Violation, outcome| RepairEvent {
            doc: cx.doc,
            kind: kind.clone(),
            invariant: inv.name().to_string(),
            violation,
            outcome,
        };
        if let Err(e) = first {
            events.push(event(Violation::new("the check could not run"), Err(e)));
            continue;
        }
        if let Some(actor) = cx.actor {
            if doc.get_actor() != actor {
                doc.set_actor(actor.clone());
            }
        }
        let mut tx = doc.transaction();
        // An earlier repair of this pass may have fixed this one too.
        let violation = match catch_unwind(AssertUnwindSafe(|| inv.check(&tx))) {
            Ok(Ok(())) => {
                tx.rollback();
                continue;
            }
            Ok(Err(v)) => v,
            Err(_) => {
                tx.rollback();
                events.push(event(
                    Violation::new("the check could not run"),
                    Err(RepairError::CheckPanicked),
                ));
                continue;
            }
        };
        let repaired = catch_unwind(AssertUnwindSafe(|| inv.repair(&mut tx, &violation)));
        let after = match repaired {
            Ok(Ok(())) => catch_unwind(AssertUnwindSafe(|| inv.check(&tx))),
            Ok(Err(e)) => {
                tx.rollback();
                events.push(event(violation, Err(RepairError::Failed(e.to_string()))));
                continue;
            }
            Err(_) => {
                tx.rollback();
                events.push(event(violation, Err(RepairError::Panicked)));
                continue;
            }
        };
        match after {
            Ok(Ok(())) => {}
            Ok(Err(still)) => {
                tx.rollback();
                events.push(event(violation, Err(RepairError::StillViolated(still))));
                continue;
            }
            Err(_) => {
                tx.rollback();
                events.push(event(violation, Err(RepairError::CheckPanicked)));
                continue;
            }
        }
        let options = CommitOptions::default()
            .with_time(cx.time)
            .with_message(format!("repair: {}", inv.name()));
        match tx.commit_with(options).0 {
            Some(hash) => events.push(event(violation, Ok(hash))),
            // The repair made no operation yet the check now passes: the check depends on
            // something other than the note. Nothing was changed; say so.
            None => events.push(event(
                violation.clone(),
                Err(RepairError::StillViolated(violation)),
            )),
        }
    }
    events
}

#[cfg(test)]
mod tests;
