//! Per-document sizes in memory, and the compaction policy that reads them.
//!
//! Sizes are learned lazily: `load` records what it read, the writer keeps known entries up to
//! date and starts an entry for a document it creates. Nothing is scanned at open, so opening a
//! store with 100,000 notes costs nothing here. A document never loaded nor created in this
//! process has no entry and `needs_compaction` answers `false` for it.
//!
//! The figures are a heuristic: a chunk committed while a concurrent `load` is scanning may be
//! missed until the next load or compaction. That can only delay a compaction, never lose data.

use std::collections::HashMap;

use parking_lot::Mutex;

use super::config::StoreConfig;
use crate::id::DocumentId;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct DocSizes {
    pub snapshot_bytes: u64,
    pub incremental_bytes: u64,
    pub incremental_chunks: u64,
}

impl DocSizes {
    pub fn needs_compaction(&self, config: &StoreConfig) -> bool {
        self.incremental_chunks > config.compaction_max_chunks
            || self.incremental_bytes
                > self
                    .snapshot_bytes
                    .saturating_mul(config.compaction_factor)
                    .max(config.compaction_min_bytes)
    }

    /// The lower bar for a note that was just loaded (see
    /// [`StoreConfig::compaction_on_load_min_bytes`]).
    pub fn worth_compacting_after_load(&self, config: &StoreConfig) -> bool {
        self.needs_compaction(config)
            || self.incremental_bytes > self.snapshot_bytes.max(config.compaction_on_load_min_bytes)
    }
}

/// How one batch changed a document's sizes, applied after the batch is durable.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct SizeEffect {
    pub base: Base,
    pub add_bytes: u64,
    pub add_chunks: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) enum Base {
    /// Add to whatever is known (nothing, if the document is not tracked).
    #[default]
    Keep,
    /// Start from a snapshot of this size with no incrementals (compaction, or a new document).
    Reset(u64),
    /// The document was deleted.
    Removed,
}

impl SizeEffect {
    pub fn append(&mut self, bytes: u64, new_chunk: bool) {
        self.add_bytes += bytes;
        self.add_chunks += u64::from(new_chunk);
    }
    pub fn reset(&mut self, snapshot: u64) {
        *self = SizeEffect {
            base: Base::Reset(snapshot),
            ..Default::default()
        };
    }
    pub fn remove(&mut self) {
        *self = SizeEffect {
            base: Base::Removed,
            ..Default::default()
        };
    }
}

#[derive(Debug, Default)]
pub(crate) struct SizeTable(Mutex<HashMap<DocumentId, DocSizes>>);

impl SizeTable {
    pub fn get(&self, doc: &DocumentId) -> Option<DocSizes> {
        self.0.lock().get(doc).copied()
    }

    /// Records sizes seen by a load.
    pub fn set(&self, doc: DocumentId, sizes: DocSizes) {
        self.0.lock().insert(doc, sizes);
    }

    pub fn apply(&self, doc: DocumentId, effect: SizeEffect) {
        let mut map = self.0.lock();
        let entry = match effect.base {
            Base::Removed if effect.add_chunks == 0 => {
                map.remove(&doc);
                return;
            }
            // deleted, then written again in the same batch: a fresh document
            Base::Removed => map.entry(doc).insert_entry(DocSizes::default()).into_mut(),
            Base::Reset(snapshot) => map
                .entry(doc)
                .insert_entry(DocSizes {
                    snapshot_bytes: snapshot,
                    ..Default::default()
                })
                .into_mut(),
            Base::Keep => match map.get_mut(&doc) {
                Some(e) => e,
                None => return,
            },
        };
        entry.incremental_bytes += effect.add_bytes;
        entry.incremental_chunks += effect.add_chunks;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> StoreConfig {
        StoreConfig {
            compaction_min_bytes: 1000,
            compaction_max_chunks: 10,
            compaction_factor: 1,
            ..Default::default()
        }
    }

    #[test]
    fn policy_bytes_exceed_snapshot_with_a_floor() {
        let c = cfg();
        let s = |snap, inc, n| DocSizes {
            snapshot_bytes: snap,
            incremental_bytes: inc,
            incremental_chunks: n,
        };
        assert!(!s(0, 1000, 1).needs_compaction(&c), "floor applies");
        assert!(s(0, 1001, 1).needs_compaction(&c));
        assert!(!s(5000, 5000, 1).needs_compaction(&c));
        assert!(s(5000, 5001, 1).needs_compaction(&c));
        let c8 = StoreConfig {
            compaction_factor: 8,
            ..cfg()
        };
        assert!(!s(5000, 40_000, 1).needs_compaction(&c8), "factor applies");
        assert!(s(5000, 40_001, 1).needs_compaction(&c8));
        assert!(!s(5000, 10, 10).needs_compaction(&c));
        assert!(s(5000, 10, 11).needs_compaction(&c), "too many chunks");
    }

    #[test]
    fn the_bar_after_a_load_is_the_snapshot_with_a_floor() {
        let c = StoreConfig {
            compaction_on_load_min_bytes: 100,
            ..cfg()
        };
        let s = |snap, inc| DocSizes {
            snapshot_bytes: snap,
            incremental_bytes: inc,
            incremental_chunks: 1,
        };
        assert!(!s(0, 100).worth_compacting_after_load(&c), "floor applies");
        assert!(s(0, 101).worth_compacting_after_load(&c));
        assert!(!s(500, 500).worth_compacting_after_load(&c));
        assert!(s(500, 501).worth_compacting_after_load(&c));
        assert!(
            !s(500, 501).needs_compaction(&c),
            "lower than the usual bar"
        );
    }

    #[test]
    fn effects_track_known_docs_and_ignore_unknown_ones() {
        let t = SizeTable::default();
        let a = DocumentId::from_bytes([1; 16]);
        let mut e = SizeEffect::default();
        e.append(10, true);
        t.apply(a, e);
        assert_eq!(t.get(&a), None, "unknown doc stays unknown");
        let mut e = SizeEffect::default();
        e.reset(0);
        e.append(10, true);
        t.apply(a, e);
        let mut e = SizeEffect::default();
        e.append(5, false);
        t.apply(a, e);
        assert_eq!(
            t.get(&a),
            Some(DocSizes {
                snapshot_bytes: 0,
                incremental_bytes: 15,
                incremental_chunks: 1
            })
        );
        let mut e = SizeEffect::default();
        e.remove();
        t.apply(a, e);
        assert_eq!(t.get(&a), None);
    }
}
