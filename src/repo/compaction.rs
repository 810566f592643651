//! Folding a note's stored chunks into one snapshot without stalling its editors.
//!
//! `save()` of a long note takes tens of milliseconds (41 ms for the automerge-paper note), and
//! a handle cannot change the note while its lock is held. So the snapshot is taken from a
//! clone: the lock is held only to clone, the slow `save()` runs outside it, and the lock is
//! taken once more to catch up.
//!
//! Why that is safe: a `Compact` removes every chunk of the note written before it. Chunks
//! queued between the clone and the compaction hold changes the clone may lack. So under the
//! second lock the changes made since the clone (`save_after(clone heads)`) are appended *in the
//! same write request* as the `Compact`, which the store applies atomically, in order: the
//! snapshot plus that delta cover every chunk queued before the request. Chunks extracted after
//! the second lock is released are queued after the request and are kept.

use automerge::ChangeHash;

use crate::engine::SharedDoc;
use crate::id::DocumentId;
use crate::store::{Store, StoreError, WriteOp};

/// Queue the compaction of `doc`; `done` runs once it is durable (or failed).
pub(crate) fn compact(
    store: &Store,
    doc: DocumentId,
    shared: &SharedDoc,
    done: impl FnOnce(Result<(), StoreError>) + Send + 'static,
) {
    let (copy, heads): (automerge::Automerge, Vec<ChangeHash>) = {
        let d = shared.lock();
        (d.clone(), d.get_heads())
    };
    let snapshot = copy.save();
    drop(copy);
    let d = shared.lock();
    let mut ops = vec![WriteOp::Compact { doc, snapshot }];
    if d.get_heads() != heads {
        ops.push(WriteOp::AppendChunk {
            doc,
            bytes: d.save_after(&heads),
        });
    }
    // Queued while the lock is held: no chunk with changes the request lacks can be queued
    // before it.
    store.write(ops, done);
    drop(d);
}
