//! Store round trips, corruption handling, locking and group commit.

use std::sync::mpsc;

use automerge::{transaction::Transactable, AutoCommit, ReadDoc, ROOT};
use sheafdb::store::{CorruptReason, Store, StoreConfig, StoreError, WriteOp};
use sheafdb::{DocumentId, StorageId};

fn append(doc: DocumentId, bytes: Vec<u8>) -> WriteOp {
    WriteOp::AppendChunk { doc, bytes }
}

/// Makes `n` edits, returning one incremental chunk per edit.
fn edits(d: &mut AutoCommit, from: usize, n: usize) -> Vec<Vec<u8>> {
    (from..from + n)
        .map(|i| {
            d.put(ROOT, format!("k{i}"), i as i64).unwrap();
            d.save_incremental()
        })
        .collect()
}

fn write_sync(store: &Store, ops: Vec<WriteOp>) -> Result<(), StoreError> {
    let (tx, rx) = mpsc::channel();
    store.write(ops, move |r| tx.send(r).unwrap());
    rx.recv().unwrap()
}

#[test]
fn append_load_compact_delete_round_trip() {
    let store = Store::open_temporary().unwrap();
    let id = DocumentId::random();
    let mut d = AutoCommit::new();
    for chunk in edits(&mut d, 0, 20) {
        write_sync(&store, vec![append(id, chunk)]).unwrap();
    }
    let loaded = store.load(&id).unwrap().unwrap();
    assert_eq!(loaded.chunks, 20);
    assert!(loaded.corrupt.is_empty());
    assert_eq!(loaded.doc.get_heads(), d.get_heads());
    assert_eq!(
        loaded.doc.get(ROOT, "k19").unwrap().unwrap().0,
        automerge::Value::from(19i64)
    );

    // compaction: one snapshot replaces the twenty chunks; the doc is the same
    write_sync(
        &store,
        vec![WriteOp::Compact {
            doc: id,
            snapshot: d.save(),
        }],
    )
    .unwrap();
    let loaded = store.load(&id).unwrap().unwrap();
    assert_eq!(loaded.chunks, 1);
    assert_eq!(loaded.doc.get_heads(), d.get_heads());
    assert_eq!(loaded.doc.keys(ROOT).count(), 20);

    // more edits after the snapshot load on top of it
    for chunk in edits(&mut d, 20, 3) {
        write_sync(&store, vec![append(id, chunk)]).unwrap();
    }
    let loaded = store.load(&id).unwrap().unwrap();
    assert_eq!(loaded.chunks, 4);
    assert_eq!(loaded.doc.get_heads(), d.get_heads());

    assert_eq!(store.list_documents().unwrap(), vec![id]);
    assert!(store.contains(&id).unwrap());
    write_sync(&store, vec![WriteOp::DeleteDoc { doc: id }]).unwrap();
    assert!(!store.contains(&id).unwrap());
    assert!(store.list_documents().unwrap().is_empty());
    assert!(store.load(&id).unwrap().is_none());
}

#[test]
fn appends_in_one_write_are_coalesced_and_compact_covers_earlier_ops_in_the_same_batch() {
    let store = Store::open_temporary().unwrap();
    let id = DocumentId::random();
    let mut d = AutoCommit::new();
    let ops: Vec<WriteOp> = edits(&mut d, 0, 10)
        .into_iter()
        .map(|c| append(id, c))
        .collect();
    write_sync(&store, ops).unwrap();
    let s = store.stats();
    assert_eq!(s.ops_written, 10);
    assert_eq!(s.chunks_written, 1);
    let loaded = store.load(&id).unwrap().unwrap();
    assert_eq!(loaded.chunks, 1);
    assert_eq!(loaded.doc.get_heads(), d.get_heads());

    let mut ops: Vec<WriteOp> = edits(&mut d, 10, 2)
        .into_iter()
        .map(|c| append(id, c))
        .collect();
    ops.push(WriteOp::Compact {
        doc: id,
        snapshot: d.save(),
    });
    ops.extend(edits(&mut d, 12, 1).into_iter().map(|c| append(id, c)));
    write_sync(&store, ops).unwrap();
    let loaded = store.load(&id).unwrap().unwrap();
    assert_eq!(loaded.chunks, 2, "snapshot plus the append after it");
    assert_eq!(loaded.doc.get_heads(), d.get_heads());
}

#[test]
fn list_documents_and_unknown_ids() {
    let store = Store::open_temporary().unwrap();
    let mut ids: Vec<DocumentId> = (0..50).map(|_| DocumentId::random()).collect();
    let ops = ids
        .iter()
        .map(|id| {
            let mut d = AutoCommit::new();
            append(*id, edits(&mut d, 0, 1).remove(0))
        })
        .collect();
    write_sync(&store, ops).unwrap();
    let mut listed = store.list_documents().unwrap();
    listed.sort();
    ids.sort();
    assert_eq!(listed, ids);
    let unknown = DocumentId::random();
    assert!(store.load(&unknown).unwrap().is_none());
    assert!(!store.contains(&unknown).unwrap());
    assert!(!store.needs_compaction(&unknown));
}

#[test]
fn sync_states_round_trip_and_are_deleted_with_the_doc() {
    let store = Store::open_temporary().unwrap();
    let id = DocumentId::random();
    let (a, b) = (StorageId::new("peer-a"), StorageId::new("peer-b"));
    let mut d = AutoCommit::new();
    let mut ops = vec![append(id, edits(&mut d, 0, 1).remove(0))];
    for (sid, bytes) in [(&a, b"one"), (&b, b"two"), (&a, b"new")] {
        ops.push(WriteOp::PutSyncState {
            doc: id,
            storage_id: sid.clone(),
            bytes: bytes.to_vec(),
        });
    }
    write_sync(&store, ops).unwrap();
    let loaded = store.load(&id).unwrap().unwrap();
    assert_eq!(loaded.sync_states.len(), 2);
    assert_eq!(loaded.sync_states[&a], b"new");
    assert_eq!(loaded.sync_states[&b], b"two");
    write_sync(&store, vec![WriteOp::DeleteDoc { doc: id }]).unwrap();
    assert!(store.load(&id).unwrap().is_none());
}

#[test]
fn needs_compaction_follows_the_policy() {
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig {
        compaction_min_bytes: 2_000,
        compaction_factor: 1,
        compaction_max_chunks: 1_000,
        ..Default::default()
    };
    let id = DocumentId::random();
    let mut d = AutoCommit::new();
    {
        let store = Store::open(dir.path(), config.clone()).unwrap();
        // a document created here is tracked from its first write
        let mut written = 0;
        while written <= 2_000 {
            assert!(!store.needs_compaction(&id), "at {written} bytes");
            let chunk = edits(&mut d, written, 1).remove(0);
            written += chunk.len();
            write_sync(&store, vec![append(id, chunk)]).unwrap();
        }
        assert!(store.needs_compaction(&id));
        write_sync(
            &store,
            vec![WriteOp::Compact {
                doc: id,
                snapshot: d.save(),
            }],
        )
        .unwrap();
        assert!(!store.needs_compaction(&id));
    }
    // after a reopen, sizes are unknown until the doc is loaded, then exact
    let store = Store::open(dir.path(), config).unwrap();
    for chunk in edits(&mut d, 10_000, 200) {
        write_sync(&store, vec![append(id, chunk)]).unwrap();
    }
    assert!(!store.needs_compaction(&id), "unknown until loaded");
    store.load(&id).unwrap().unwrap();
    assert!(store.needs_compaction(&id));

    // the chunk-count rule
    let other = DocumentId::random();
    let mut d2 = AutoCommit::new();
    let dir2 = tempfile::tempdir().unwrap();
    let store2 = Store::open(
        dir2.path(),
        StoreConfig {
            compaction_max_chunks: 5,
            compaction_min_bytes: 1 << 30,
            ..Default::default()
        },
    )
    .unwrap();
    for (i, chunk) in edits(&mut d2, 0, 6).into_iter().enumerate() {
        assert!(!store2.needs_compaction(&other), "after {i} chunks");
        write_sync(&store2, vec![append(other, chunk)]).unwrap();
    }
    assert!(store2.needs_compaction(&other));
}

#[test]
fn garbage_with_a_valid_checksum_is_reported_not_loaded() {
    let store = Store::open_temporary().unwrap();
    let id = DocumentId::random();
    let mut d = AutoCommit::new();
    write_sync(&store, vec![append(id, edits(&mut d, 0, 1).remove(0))]).unwrap();
    write_sync(&store, vec![append(id, b"this is not automerge".to_vec())]).unwrap();
    write_sync(&store, vec![append(id, edits(&mut d, 1, 1).remove(0))]).unwrap();
    let loaded = store.load(&id).unwrap().unwrap();
    assert_eq!(loaded.corrupt.len(), 1);
    assert_eq!(loaded.corrupt[0].doc, id);
    assert!(matches!(
        loaded.corrupt[0].reason,
        CorruptReason::NotAutomerge(_)
    ));
    assert_eq!(loaded.chunks, 2);
    assert_eq!(loaded.doc.get_heads(), d.get_heads());
    assert_eq!(store.stats().corrupt_chunks, 1);
    // quarantined: the next load is clean
    let again = store.load(&id).unwrap().unwrap();
    assert!(again.corrupt.is_empty());
    assert_eq!(again.doc.get_heads(), d.get_heads());
}

#[test]
fn a_flipped_byte_on_disk_is_named_quarantined_and_the_rest_loads() {
    let dir = tempfile::tempdir().unwrap();
    let (good, bad) = (
        DocumentId::from_bytes([1; 16]),
        DocumentId::from_bytes([2; 16]),
    );
    let (mut dg, mut db) = (AutoCommit::new(), AutoCommit::new());
    {
        let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
        for id in [good, bad] {
            let d = if id == good { &mut dg } else { &mut db };
            for chunk in edits(d, 0, 3) {
                write_sync(&store, vec![append(id, chunk)]).unwrap();
            }
        }
    }
    // flip one byte of the bad doc's last chunk, straight through sled
    let damaged_key = {
        let raw = sled::open(dir.path()).unwrap();
        let data = raw.open_tree("data").unwrap();
        let (k, v) = data.scan_prefix(bad.as_bytes()).last().unwrap().unwrap();
        let mut v = v.to_vec();
        let last = v.len() - 1;
        v[last] ^= 0x55;
        data.insert(&k, v).unwrap();
        raw.flush().unwrap();
        k.to_vec()
    };
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let l = store.load(&good).unwrap().unwrap();
    assert!(l.corrupt.is_empty());
    assert_eq!(l.doc.get_heads(), dg.get_heads());

    let l = store.load(&bad).unwrap().unwrap();
    assert_eq!(l.corrupt.len(), 1);
    assert_eq!(l.corrupt[0].doc, bad);
    assert_eq!(l.corrupt[0].key, damaged_key);
    assert_eq!(l.corrupt[0].reason, CorruptReason::ChecksumMismatch);
    assert_eq!(l.chunks, 2);
    assert_eq!(l.doc.keys(ROOT).collect::<Vec<_>>(), vec!["k0", "k1"]);

    let again = store.load(&bad).unwrap().unwrap();
    assert!(again.corrupt.is_empty());
    assert_eq!(again.chunks, 2);
    store.flush_blocking().unwrap();
    drop(store);
    // kept, not deleted
    let raw = sled::open(dir.path()).unwrap();
    let q = raw.open_tree("quarantine").unwrap();
    assert!(q.contains_key(&damaged_key).unwrap());
}

#[test]
fn a_second_open_of_the_same_dir_is_locked() {
    // sled locks with flock, which is per open file: a second open in the same process is
    // refused exactly like one from another process would be.
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    match Store::open(dir.path(), StoreConfig::default()) {
        Err(StoreError::Locked { path, .. }) => assert_eq!(path, dir.path()),
        Err(e) => panic!("expected Locked, got {e}"),
        Ok(_) => panic!("second open succeeded"),
    }
    drop(store);
    // and the lock is released when the store is dropped
    Store::open(dir.path(), StoreConfig::default()).unwrap();
}

#[test]
fn concurrent_writers_share_fsyncs() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    const THREADS: usize = 16;
    const WRITES: usize = 25;
    std::thread::scope(|s| {
        for _ in 0..THREADS {
            let store = store.clone();
            s.spawn(move || {
                let id = DocumentId::random();
                let mut d = AutoCommit::new();
                for chunk in edits(&mut d, 0, WRITES) {
                    write_sync(&store, vec![append(id, chunk)]).unwrap();
                }
            });
        }
    });
    let stats = store.stats();
    let writes = (THREADS * WRITES) as u64;
    assert_eq!(stats.requests, writes);
    assert!(stats.fsyncs > 0);
    assert!(
        stats.fsyncs < writes,
        "group commit should share fsyncs: {stats:?}"
    );
    eprintln!(
        "{writes} durable writes, {} fsyncs, {} batches",
        stats.fsyncs, stats.batches
    );
    assert_eq!(store.list_documents().unwrap().len(), THREADS);
}

#[tokio::test]
async fn write_durable_awaits_the_callback() {
    let store = Store::open_temporary().unwrap();
    let id = DocumentId::random();
    let mut d = AutoCommit::new();
    store
        .write_durable(vec![append(id, edits(&mut d, 0, 1).remove(0))])
        .await
        .unwrap();
    assert!(store.contains(&id).unwrap());
}

#[test]
fn large_values_go_to_sled_blobs_and_are_fsynced() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let id = DocumentId::random();
    let mut d = AutoCommit::new();
    // random bytes do not compress, so the snapshot stays above sled's ~128 KiB blob threshold
    let big: Vec<u8> = (0..300_000).map(|_| rand::random::<u8>()).collect();
    d.put(ROOT, "b", automerge::ScalarValue::Bytes(big))
        .unwrap();
    let snapshot = d.save();
    assert!(snapshot.len() > 200_000, "{}", snapshot.len());
    write_sync(&store, vec![WriteOp::Compact { doc: id, snapshot }]).unwrap();
    assert!(
        std::fs::read_dir(dir.path().join("blobs")).unwrap().count() > 0,
        "expected sled to write a blob file"
    );
    assert!(store.stats().blob_fsyncs >= 2, "{:?}", store.stats());
    drop(store);
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let l = store.load(&id).unwrap().unwrap();
    assert_eq!(l.doc.get_heads(), d.get_heads());
}

/// Stored incrementals are applied in one call; when Automerge refuses that call (here: two
/// different changes claiming the same actor and sequence number), the load starts over chunk
/// by chunk and names the chunk it refuses.
#[test]
fn a_refused_batched_load_falls_back_to_chunk_by_chunk() {
    let store = Store::open_temporary().unwrap();
    let id = DocumentId::random();
    let actor = automerge::ActorId::random();
    let mut a = AutoCommit::new().with_actor(actor.clone());
    let mut b = AutoCommit::new().with_actor(actor);
    let first = edits(&mut a, 0, 1).remove(0);
    let forged = edits(&mut b, 100, 1).remove(0);
    let second = edits(&mut a, 1, 1).remove(0);
    for c in [first, forged, second] {
        write_sync(&store, vec![append(id, c)]).unwrap();
    }
    let loaded = store.load(&id).unwrap().unwrap();
    assert_eq!(loaded.doc.get_heads(), a.get_heads());
    assert_eq!(loaded.chunks, 2);
    assert_eq!(loaded.corrupt.len(), 1);
    assert!(matches!(
        loaded.corrupt[0].reason,
        CorruptReason::NotAutomerge(_)
    ));
}

/// A commit log smaller than what is written: batches that do not fit take a checkpoint and
/// the log starts over; everything is there after a reopen, and a clean close leaves nothing
/// to replay and gives the log's space back.
#[test]
fn a_full_commit_log_takes_a_checkpoint_and_starts_over() {
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig {
        commit_log_bytes: 2048,
        ..StoreConfig::default()
    };
    let store = Store::open(dir.path(), config.clone()).unwrap();
    let id = DocumentId::random();
    let mut d = AutoCommit::new();
    for chunk in edits(&mut d, 0, 60) {
        write_sync(&store, vec![append(id, chunk)]).unwrap();
    }
    let st = store.stats();
    assert_eq!(st.batches, 60);
    assert!(st.log_records > 0 && st.checkpoints > 0, "{st:?}");
    assert_eq!(st.log_records + st.checkpoints, 60, "{st:?}");
    drop(store);
    let log = dir.path().join("sheaf-commit-log");
    assert_eq!(std::fs::metadata(&log).unwrap().len(), 4096);
    let store = Store::open(dir.path(), config).unwrap();
    assert_eq!(store.stats().replayed_records, 0);
    let l = store.load(&id).unwrap().unwrap();
    assert_eq!(l.doc.get_heads(), d.get_heads());
}

/// A load that runs while the note is being written and compacted (the commit log applies a
/// batch key by key) sees at least every edit acknowledged before it started.
#[test]
fn a_load_during_writes_and_compactions_sees_every_acknowledged_edit() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let id = DocumentId::random();
    let acked = AtomicUsize::new(0);
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        let reader = s.spawn(|| {
            let mut loads = 0;
            while !done.load(Ordering::Acquire) {
                let want = acked.load(Ordering::Acquire);
                let Some(l) = store.load(&id).unwrap() else {
                    assert_eq!(want, 0);
                    continue;
                };
                assert!(l.corrupt.is_empty(), "{:?}", l.corrupt);
                let have = l.doc.keys(ROOT).count();
                assert!(
                    have >= want,
                    "a load saw {have} edits, {want} were acknowledged"
                );
                loads += 1;
            }
            loads
        });
        let mut d = AutoCommit::new();
        for i in 0..400 {
            let mut ops = vec![append(id, edits(&mut d, i, 1).remove(0))];
            if i % 4 == 3 {
                ops.push(WriteOp::Compact {
                    doc: id,
                    snapshot: d.save(),
                });
            }
            write_sync(&store, ops).unwrap();
            acked.store(i + 1, Ordering::Release);
        }
        done.store(true, Ordering::Release);
        let loads = reader.join().unwrap();
        assert!(loads > 10, "the reader ran {loads} loads only");
    });
    assert!(store.stats().log_records >= 400);
}
