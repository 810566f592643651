//! The runtime as apps use it: create, change, save, reopen, find, list, delete, subscribe,
//! and two peers syncing through a relay over real WebSockets on loopback.

mod common;

use std::time::Duration;

use automerge::transaction::Transactable;
use automerge::{ObjType, ReadDoc, ROOT};
use sheafdb::repo::SaveState;
use sheafdb::{DocumentId, Repo, RepoConfig, RepoError};

fn text_of(h: &sheafdb::DocHandle) -> String {
    h.with_doc(|d| {
        let (_, t) = d.get(ROOT, "text").unwrap().unwrap();
        d.text(&t).unwrap()
    })
}

#[tokio::test]
async fn notes_survive_a_reopen_and_are_listed_without_loading() {
    let dir = tempfile::tempdir().unwrap();
    let id = {
        let repo = Repo::open(dir.path()).unwrap();
        let h = repo.create().await.unwrap();
        h.change(|tx| {
            let t = tx.put_object(ROOT, "text", ObjType::Text)?;
            tx.splice_text(&t, 0, 0, "hello")
        })
        .unwrap();
        assert_eq!(*h.save_state().borrow(), SaveState::Unsaved);
        h.saved().await.unwrap();
        // A task woken by saved() already sees Saved.
        assert_eq!(*h.save_state().borrow(), SaveState::Saved);
        let id = h.id();
        drop(h);
        repo.shutdown().unwrap();
        id
    };
    let repo = Repo::open(dir.path()).unwrap();
    assert_eq!(repo.list().unwrap(), vec![id]);
    assert_eq!(repo.loaded_documents().await, 0);
    let h = repo.find(id).await.unwrap();
    assert_eq!(text_of(&h), "hello");
    // by URL too
    let h2 = repo.find(h.url()).await.unwrap();
    assert_eq!(h2.heads(), h.heads());
}

#[tokio::test]
async fn a_second_open_of_the_same_directory_is_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    let _repo = Repo::open(dir.path()).unwrap();
    match Repo::open(dir.path()) {
        Err(RepoError::Store(sheafdb::store::StoreError::Locked { .. })) => {}
        other => panic!("expected Locked, got {:?}", other.err()),
    }
}

#[tokio::test]
async fn unknown_ids_garbage_imports_and_deletes() {
    let dir = tempfile::tempdir().unwrap();
    let config = RepoConfig {
        find_timeout: Duration::from_millis(300),
        ..RepoConfig::default()
    };
    let repo = Repo::open_with(dir.path(), config).unwrap();
    match repo.find(DocumentId::random()).await {
        Err(RepoError::FindTimeout { .. }) => {}
        other => panic!("expected a find timeout, got {other:?}"),
    }
    assert!(matches!(
        repo.import(b"not automerge at all").await,
        Err(RepoError::Import(_))
    ));

    let h = repo.create().await.unwrap();
    h.change(|tx| tx.put(ROOT, "k", 1)).unwrap();
    let bytes = h.export();
    let copy = repo.import(&bytes).await.unwrap();
    assert_ne!(copy.id(), h.id());
    assert_eq!(copy.to_json(), h.to_json());
    repo.flush().await.unwrap();
    let mut listed = repo.list().unwrap();
    listed.sort();
    let mut want = vec![h.id(), copy.id()];
    want.sort();
    assert_eq!(listed, want);

    repo.delete(h.id()).await.unwrap();
    assert_eq!(repo.list().unwrap(), vec![copy.id()]);
}

#[tokio::test]
async fn a_failed_change_is_rolled_back() {
    let repo = Repo::temporary(RepoConfig::default()).unwrap();
    let h = repo.create().await.unwrap();
    let before = h.heads();
    let r = h.change(|tx| {
        tx.put(ROOT, "half", 1)?;
        Err::<(), _>(automerge::AutomergeError::Fail)
    });
    assert!(matches!(r, Err(RepoError::Change(_))));
    assert_eq!(h.heads(), before);
    assert!(h.with_doc(|d| d.get(ROOT, "half").unwrap().is_none()));
}

#[tokio::test]
async fn subscribers_get_patches_for_local_changes() {
    let repo = Repo::temporary(RepoConfig::default()).unwrap();
    let h = repo.create().await.unwrap();
    let mut changes = h.changes();
    h.change(|tx| tx.put(ROOT, "title", "hi")).unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(5), changes.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ev.heads, h.heads());
    assert_eq!(ev.patches.len(), 1, "{:?}", ev.patches);
}

#[tokio::test]
async fn the_heads_watch_follows_local_changes() {
    let repo = Repo::temporary(RepoConfig::default()).unwrap();
    let h = repo.create().await.unwrap();
    let mut heads = h.heads_watch();
    assert_eq!(*heads.borrow_and_update(), h.heads());
    h.change(|tx| tx.put(ROOT, "title", "hi")).unwrap();
    tokio::time::timeout(Duration::from_secs(5), heads.changed())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(*heads.borrow(), h.heads());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_peers_sync_through_a_relay_and_see_each_others_changes() {
    let (url, _relay, _stop) = common::in_process_relay().await;
    let a = Repo::temporary(RepoConfig::default()).unwrap();
    let b = Repo::temporary(RepoConfig::default()).unwrap();
    a.connect(&url).unwrap();
    b.connect(&url).unwrap();

    let ha = a.create().await.unwrap();
    ha.change(|tx| {
        let t = tx.put_object(ROOT, "text", ObjType::Text)?;
        tx.splice_text(&t, 0, 0, "from a")
    })
    .unwrap();

    // b finds it right away (the relay may still be receiving it: it must wait, not fail).
    let hb = tokio::time::timeout(Duration::from_secs(10), b.find(ha.id()))
        .await
        .unwrap()
        .unwrap();
    let mut changes = hb.changes();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while hb.with_doc(|d| d.get(ROOT, "text").unwrap().is_none()) {
        tokio::time::timeout_at(deadline, changes.next())
            .await
            .expect("b gets a's text");
    }
    assert_eq!(text_of(&hb), "from a");

    // and back (a's heads watch sees b's edit arrive as well)
    let mut a_heads = ha.heads_watch();
    let mut a_changes = ha.changes();
    hb.change(|tx| {
        let (_, t) = tx.get(ROOT, "text")?.unwrap();
        tx.splice_text(&t, 6, 0, " and b")
    })
    .unwrap();
    while text_of(&ha) != "from a and b" {
        tokio::time::timeout_at(deadline, a_changes.next())
            .await
            .expect("a gets b's edit");
    }
    tokio::time::timeout_at(deadline, a_heads.wait_for(|h| *h == hb.heads()))
        .await
        .expect("a's heads watch reaches b's heads")
        .unwrap();
    // both report synced with the relay
    let mut st = ha.sync_status();
    tokio::time::timeout_at(
        deadline,
        st.wait_for(|m| {
            m.values()
                .all(|s| *s == sheafdb::engine::PeerSyncStatus::Synced)
                && !m.is_empty()
        }),
    )
    .await
    .expect("a synced")
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opening_a_store_with_100k_notes_loads_none_of_them() {
    let n = if cfg!(debug_assertions) {
        10_000
    } else {
        100_000
    };
    let dir = tempfile::tempdir().unwrap();
    let mut one = automerge::Automerge::new();
    let mut tx = one.transaction();
    tx.put(ROOT, "n", 1).unwrap();
    tx.commit();
    let bytes = one.save();
    let mut ids = Vec::with_capacity(n);
    {
        let store = sheafdb::store::Store::open(dir.path(), Default::default()).unwrap();
        for chunk in 0..n / 10_000 {
            let ops = (0..10_000)
                .map(|_| {
                    let doc = DocumentId::random();
                    ids.push(doc);
                    sheafdb::store::WriteOp::AppendChunk {
                        doc,
                        bytes: bytes.clone(),
                    }
                })
                .collect();
            store
                .write_durable(ops)
                .await
                .unwrap_or_else(|e| panic!("batch {chunk}: {e}"));
        }
    }
    let repo = Repo::open(dir.path()).unwrap();
    assert_eq!(repo.list().unwrap().len(), n);
    assert_eq!(
        repo.loaded_documents().await,
        0,
        "opening and listing must not load notes"
    );
    let h = repo.find(ids[n / 2]).await.unwrap();
    assert_eq!(
        h.with_doc(|d| d.get(ROOT, "n").unwrap().unwrap().0.to_string()),
        "1"
    );
    assert_eq!(repo.loaded_documents().await, 1);
}
