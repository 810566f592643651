//! Applying an expensive note's remote changes off the engine's thread.
//!
//! # Why
//!
//! One engine serves every document of a process from one thread, and an apply into a long
//! text costs time proportional to the whole text (`../shared/NOTES.md` section 2): 42-60 ms
//! for one keystroke into the automerge-paper note on the reference machine when it is
//! quiet. On the long-note bench (K = 4) the relay applied 8-19 messages per call every
//! 330-360 ms, and each call held its thread for 130-160 ms. Meanwhile nothing else moved:
//! not the changes that kept arriving for the same note, which the `forward` module passes
//! on to the other peers without applying them, and not the sync of every other note on
//! the relay.
//!
//! # How
//!
//! When a document's last apply was expensive (it is paced: [`super::ApplyPacing`]) and
//! [`super::EngineConfig::offload_applies`] is on, the step that would apply its inbox
//! instead takes the inbox aside, parses its changes and emits [`super::Effect::Apply`] with
//! an [`ApplyJob`]: a copy of the note (cheap for a note of few, large changes; see
//! `admit`'s cost notes), the changes and what `admit` needs to check them. The runtime runs
//! the job elsewhere (`ApplyJob::run`, on a worker thread) and feeds back its result as
//! [`super::Input::Applied`]. Meanwhile the document is treated as paced: what arrives
//! waits in the inbox and is forwarded, and other documents go on as usual.
//!
//! When the result comes back, the taken messages go through the ordinary apply path (the
//! bookkeeping, rejections, storage and sending are the same code), which uses the job's
//! note instead of applying again, but only if nothing moved meanwhile: the note's heads
//! are still those the copy was made at (no local edit, repair or other apply) and the
//! changes that path gathers from the messages are exactly the job's (no sender
//! disconnected). Otherwise the result is dropped and the batch is applied there and then,
//! as without offloading. So the outcome is always what an inline apply would have given;
//! a note edited here while its batch is out pays its apply twice, which is why peers, whose
//! users type, leave this off and relays turn it on.

use std::panic::{catch_unwind, AssertUnwindSafe};

use automerge::{Automerge, Change, ChangeHash, PatchLog};

use super::admit::{self, AdmitError};
use super::doc::Inbound;
use super::lineage::Lineage;
use super::types::{CostClock, Input};
use crate::id::DocumentId;

/// Remote changes to apply to a copy of a note, off the engine's thread (see the module
/// docs). Carry it out with [`ApplyJob::run`] and hand the result back as an input.
pub struct ApplyJob {
    pub(super) doc: DocumentId,
    pub(super) note: Automerge,
    pub(super) lineage: Lineage,
    pub(super) changes: Vec<Change>,
    pub(super) log: Option<PatchLog>,
    pub(super) clock: Option<CostClock>,
}

impl std::fmt::Debug for ApplyJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApplyJob")
            .field("doc", &self.doc)
            .field("changes", &self.changes.len())
            .finish_non_exhaustive()
    }
}

impl ApplyJob {
    /// The document the job is for.
    pub fn doc(&self) -> DocumentId {
        self.doc
    }

    /// Apply and check the changes (this is the slow part), giving the input that reports
    /// the result: [`Input::Applied`]. Never panics; a panic in Automerge is a rejection.
    pub fn run(self) -> Input {
        let doc = self.doc;
        let outcome = catch_unwind(AssertUnwindSafe(move || {
            let ApplyJob {
                note,
                mut lineage,
                changes,
                mut log,
                clock,
                ..
            } = self;
            let started = clock.as_ref().map(|c| (c.0)());
            let result = admit::apply_owned(note, &mut lineage, changes, log.as_mut());
            let cost_us = match (&clock, started) {
                (Some(c), Some(s)) => (c.0)().saturating_sub(s),
                _ => 0,
            };
            Applied {
                result: result.map(|note| Trial { note, lineage, log }),
                cost_us,
            }
        }))
        .unwrap_or_else(|p| Applied {
            result: Err(AdmitError::Panicked(admit::panic_message(p.as_ref()))),
            cost_us: 0,
        });
        Input::Applied {
            doc,
            outcome: Box::new(outcome),
        }
    }
}

/// The result of an [`ApplyJob`], for [`Input::Applied`].
pub struct Applied {
    pub(super) result: Result<Trial, AdmitError>,
    pub(super) cost_us: u64,
}

impl std::fmt::Debug for Applied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Applied")
            .field("ok", &self.result.is_ok())
            .field("cost_us", &self.cost_us)
            .finish()
    }
}

/// A note with a batch applied and checked, and what `admit` learnt doing it.
pub(super) struct Trial {
    pub note: Automerge,
    pub lineage: Lineage,
    pub log: Option<PatchLog>,
}

/// A document's batch while its job is out, then its result.
pub(super) enum Offloaded {
    Running(Taken),
    Done(Taken, Box<Applied>),
}

/// What a job was made from: the messages taken from the inbox, the note's heads then and
/// the hashes of the changes sent out.
pub(super) struct Taken {
    pub inbound: Vec<Inbound>,
    pub heads: Vec<ChangeHash>,
    pub hashes: Vec<ChangeHash>,
}

/// A job's result, as the apply path takes it: used only if the note and the batch are
/// still those it was made from.
pub(super) struct Precomputed {
    pub heads: Vec<ChangeHash>,
    pub hashes: Vec<ChangeHash>,
    pub outcome: Box<Applied>,
}
