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
    // A forged change (contents altered, checksum right) behind a real note: Automerge alone
    // panics on it (an actor it never saw begins at seq 2).
    let mut note = automerge::Automerge::new();
    note.transact::<_, _, automerge::AutomergeError>(|tx| tx.put(ROOT, "k", 1).map(|_| ()))
        .unwrap();
    let mut other = note.fork();
    other
        .transact::<_, _, automerge::AutomergeError>(|tx| tx.put(ROOT, "k", 2).map(|_| ()))
        .unwrap();
    let mut forged = other.get_last_local_change().unwrap().decode();
    forged.hash = None;
    forged.seq = 2;
    let mut bytes = note.save();
    bytes.extend_from_slice(automerge::Change::from(forged).raw_bytes());
    assert!(matches!(
        repo.import(&bytes).await,
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

/// A `find` that timed out is forgotten: an app that looks up many ids nobody has (offline,
/// or stale links) must not keep one entry per id in memory forever. A second find of the
/// same id still waits while the first has given up, and may still succeed.
#[tokio::test]
async fn timed_out_finds_leave_nothing_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let config = RepoConfig {
        find_timeout: Duration::from_millis(100),
        ..RepoConfig::default()
    };
    let repo = Repo::open_with(dir.path(), config).unwrap();
    for _ in 0..20 {
        assert!(matches!(
            repo.find(DocumentId::random()).await,
            Err(RepoError::FindTimeout { .. })
        ));
    }
    // A cancellation that arrives while storage is still looking waits for its answer.
    settle_loaded(&repo).await;
    assert_eq!(
        repo.loaded_documents().await,
        0,
        "timed-out finds stay in memory"
    );

    // Two finds of one id, the second started later: the first timing out must not drop the
    // document the second still waits for. (Here nobody has it either, so it times out too.)
    let dir = tempfile::tempdir().unwrap();
    let config = RepoConfig {
        find_timeout: Duration::from_millis(400),
        ..RepoConfig::default()
    };
    let repo = Repo::open_with(dir.path(), config).unwrap();
    let id = DocumentId::random();
    let (first, second) = tokio::join!(repo.find(id), async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let r = repo.find(id);
        tokio::pin!(r);
        // At 500 ms the first has timed out (at 400) and the second still waits (until 600).
        tokio::select! {
            biased;
            _ = tokio::time::sleep(Duration::from_millis(300)) => {}
            r = &mut r => panic!("the second find ended with the first: {:?}", r.map(|h| h.id())),
        }
        assert_eq!(
            repo.loaded_documents().await,
            1,
            "dropped while a find waits"
        );
        r.await
    });
    assert!(matches!(first, Err(RepoError::FindTimeout { .. })));
    assert!(matches!(second, Err(RepoError::FindTimeout { .. })));
    settle_loaded(&repo).await;
    assert_eq!(repo.loaded_documents().await, 0);
}

/// Wait (at most 10 s) until no document is loaded.
async fn settle_loaded(repo: &Repo) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while repo.loaded_documents().await > 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
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
async fn the_save_state_never_says_saved_before_the_latest_edit_is_written() {
    let repo = Repo::temporary(RepoConfig::default()).unwrap();
    let h = repo.create().await.unwrap();
    let state = h.save_state();
    let mut saved_seen = 0;
    for i in 0..3_000_i64 {
        h.change(|tx| tx.put(ROOT, "n", i)).unwrap();
        if *state.borrow() == SaveState::Saved {
            // Only if this very edit is already in the store (the thread was held up).
            let stored = repo.store().load(&h.id()).unwrap().unwrap();
            assert_eq!(
                stored.doc.get_heads(),
                h.heads(),
                "edit {i}: the save state says Saved, but the edit is not written"
            );
            saved_seen += 1;
        }
        if i % 100 == 0 {
            // Let writes complete now and then, so that Saved is published between edits.
            h.saved().await.unwrap();
        }
    }
    assert!(saved_seen < 3_000);
}

#[tokio::test]
async fn a_new_heads_watch_starts_from_the_latest_local_change() {
    let repo = Repo::temporary(RepoConfig::default()).unwrap();
    let h = repo.create().await.unwrap();
    // No one watches while these edits are made (an edit then skips publishing its heads):
    // a watch taken right after must still start from the latest, not from what the
    // engine last published.
    for i in 0..100 {
        h.change(|tx| tx.put(ROOT, "n", i as i64)).unwrap();
        assert_eq!(*h.heads_watch().borrow(), h.heads(), "after edit {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_note_status_says_saved_synced_offline_and_synced_again() {
    use sheafdb::{NoteStatus, NoteStatusWatch};
    async fn reach(w: &mut NoteStatusWatch, want: NoteStatus) {
        let waited = tokio::time::timeout(Duration::from_secs(20), w.wait_for(|s| s == want));
        let Ok(reached) = waited.await else {
            panic!("status {want:?} within 20 s; it is {:?}", w.get());
        };
        reached.unwrap();
    }
    let a = Repo::temporary(RepoConfig::default()).unwrap();
    let h = a.create().await.unwrap();
    let mut status = h.status();
    // A repo that syncs with no one: on disk is all there is.
    reach(&mut status, NoteStatus::Saved).await;
    h.change(|tx| tx.put(ROOT, "title", "draft")).unwrap();
    h.saved().await.unwrap();
    assert_eq!(status.get(), NoteStatus::Saved);

    let relay = Repo::temporary(RepoConfig::relay()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, task) = common::serve(&relay, listener);
    let backoff = sheafdb::net::client::Backoff {
        base: Duration::from_millis(50),
        cap: Duration::from_millis(200),
        ..Default::default()
    };
    a.connect_with(
        &format!("ws://{addr}"),
        sheafdb::ConnectOptions {
            backoff,
            ..Default::default()
        },
    )
    .unwrap();
    reach(&mut status, NoteStatus::Synced).await;

    // The relay goes away: offline. An edit made now is saved here and stays offline.
    let _ = stop.send(());
    task.await.unwrap();
    reach(&mut status, NoteStatus::Offline).await;
    h.change(|tx| tx.put(ROOT, "title", "written offline"))
        .unwrap();
    h.saved().await.unwrap();
    assert_eq!(status.get(), NoteStatus::Offline);

    // Back on the same address: synced again, and the relay has the offline edit.
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let (_stop, _task) = common::serve(&relay, listener);
    reach(&mut status, NoteStatus::Synced).await;
    let on_relay = relay.find(h.id()).await.unwrap();
    assert_eq!(on_relay.heads(), h.heads());
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

// ---- invariants --------------------------------------------------------------------------

use sheafdb::schema::{FieldDefault, Rejected, RepairEvent, RequiredField, Schema, UniqueList};

fn task_schema() -> Schema {
    Schema::new()
        .invariant("task", UniqueList::new("tags"))
        .invariant(
            "task",
            RequiredField::new("title", FieldDefault::Text(String::new())),
        )
}

fn with_schema() -> RepoConfig {
    RepoConfig {
        schema: task_schema(),
        ..RepoConfig::default()
    }
}

/// A task note: kind, title, and the given tags.
fn new_task(h: &sheafdb::DocHandle, tags: &[&str]) {
    h.change(|tx| {
        tx.put(ROOT, "kind", "task")?;
        let t = tx.put_object(ROOT, "title", ObjType::Text)?;
        tx.splice_text(&t, 0, 0, "buy milk")?;
        let l = tx.put_object(ROOT, "tags", ObjType::List)?;
        for (i, tag) in tags.iter().enumerate() {
            tx.insert(&l, i, *tag)?;
        }
        Ok(())
    })
    .unwrap();
}

/// (Boxed: `RepoError` is large, and clippy says so for functions returning it.)
fn add_tag(h: &sheafdb::DocHandle, tag: &str) -> Result<(), Box<RepoError>> {
    h.change(|tx| {
        let (_, l) = tx.get(ROOT, "tags")?.unwrap();
        let end = tx.length(&l);
        tx.insert(&l, end, tag)
    })
    .map_err(Box::new)
}

#[tokio::test]
async fn a_local_change_that_breaks_an_invariant_is_rejected_and_never_persisted() {
    let dir = tempfile::tempdir().unwrap();
    let (id, heads, json) = {
        let repo = Repo::open_with(dir.path(), with_schema()).unwrap();
        let h = repo.create().await.unwrap();
        new_task(&h, &["home"]);
        add_tag(&h, "urgent").unwrap();
        h.saved().await.unwrap();
        let (heads, json) = (h.heads(), h.to_json());
        let mut changes = h.changes();

        // A duplicate tag: refused, typed, with what and why.
        match add_tag(&h, "home").map_err(|e| *e) {
            Err(RepoError::Invariant(r)) => {
                let Rejected {
                    kind,
                    invariant,
                    violation,
                } = *r;
                assert_eq!((kind.as_str(), invariant.as_str()), ("task", "unique tags"));
                assert!(
                    violation.message.contains("\"home\" 2 times"),
                    "{violation}"
                );
            }
            other => panic!("expected an invariant error, got {other:?}"),
        }
        // Deleting the required title: refused too.
        let err = h.change(|tx| tx.delete(ROOT, "title")).unwrap_err();
        assert!(matches!(&err, RepoError::Invariant(r) if r.invariant == "required title"));
        assert!(
            err.to_string().contains("required field title is missing"),
            "{err}"
        );
        // Turning a plain note into a task that lacks a title: the new kind's rules apply.
        let plain = repo.create().await.unwrap();
        let err = plain.change(|tx| tx.put(ROOT, "kind", "task")).unwrap_err();
        assert!(matches!(err, RepoError::Invariant(_)));
        assert!(plain.with_doc(|d| d.get(ROOT, "kind").unwrap().is_none()));

        // Nothing changed, nothing to save, nobody notified.
        assert_eq!(h.heads(), heads);
        assert_eq!(h.to_json(), json);
        assert_eq!(*h.save_state().borrow(), SaveState::Saved);
        assert!(
            tokio::time::timeout(Duration::from_millis(100), changes.next())
                .await
                .is_err()
        );
        let id = h.id();
        drop(h);
        drop(plain);
        repo.shutdown().unwrap();
        (id, heads, json)
    };
    // On disk: exactly what was there before the rejected changes.
    let repo = Repo::open_with(dir.path(), with_schema()).unwrap();
    let h = repo.find(id).await.unwrap();
    assert_eq!(h.heads(), heads);
    assert_eq!(h.to_json(), json);
    // A valid change still goes through.
    add_tag(&h, "later").unwrap();
    assert_eq!(
        h.to_json()["tags"],
        serde_json::json!(["home", "urgent", "later"])
    );
}

#[tokio::test]
async fn a_note_written_before_the_schema_is_repaired_when_loaded() {
    // Written without the schema (an older app version), opened with it.
    let dir = tempfile::tempdir().unwrap();
    let id = {
        let repo = Repo::open(dir.path()).unwrap();
        let h = repo.create().await.unwrap();
        new_task(&h, &["a", "a"]);
        h.saved().await.unwrap();
        let id = h.id();
        drop(h);
        repo.shutdown().unwrap();
        id
    };
    let repo = Repo::open_with(dir.path(), with_schema()).unwrap();
    let mut repairs = repo.repairs();
    let h = repo.find(id).await.unwrap();
    // Loading it repairs it (a local change of this peer, reported like any repair)...
    let ev = tokio::time::timeout(Duration::from_secs(5), repairs.next())
        .await
        .expect("a repair event")
        .unwrap();
    assert_eq!((ev.doc, ev.invariant.as_str()), (id, "unique tags"));
    assert!(ev.repaired(), "{ev:?}");
    assert_eq!(h.to_json()["tags"], serde_json::json!(["a"]));
    assert!(repo
        .schema()
        .violations_of(&mut automerge::Automerge::new())
        .is_empty());
    // ... and the repair is in its history.
    let change = h
        .with_doc(|d| d.get_change_by_hash(&ev.outcome.clone().unwrap()))
        .unwrap();
    assert_eq!(change.message(), Some("repair: unique tags"));

    // An imported note is checked as it arrives too.
    let mut raw = automerge::Automerge::new();
    let mut tx = raw.transaction();
    tx.put(ROOT, "kind", "task").unwrap();
    let l = tx.put_object(ROOT, "tags", ObjType::List).unwrap();
    tx.insert(&l, 0, "b").unwrap();
    tx.insert(&l, 1, "b").unwrap();
    tx.commit();
    let imported = repo.import(&raw.save()).await.unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(5), repairs.next())
        .await
        .expect("a repair event")
        .unwrap();
    assert_eq!(ev.doc, imported.id());
    // Both broken invariants were repaired, each with its own change.
    let second = tokio::time::timeout(Duration::from_secs(5), repairs.next())
        .await
        .expect("the title repair")
        .unwrap();
    assert_eq!(
        (ev.invariant.as_str(), second.invariant.as_str()),
        ("unique tags", "required title")
    );
    assert_eq!(
        imported.to_json(),
        serde_json::json!({"kind": "task", "tags": ["b"], "title": ""})
    );
}

/// An app-defined invariant whose repair cannot be automatic: a person must fix it.
struct NonEmptyTitle;

impl sheafdb::schema::Invariant for NonEmptyTitle {
    fn name(&self) -> &str {
        "non-empty title"
    }
    fn check(
        &self,
        doc: &automerge::transaction::Transaction<'_>,
    ) -> Result<(), sheafdb::schema::Violation> {
        let empty = match doc.get(ROOT, "title") {
            Ok(Some((_, t))) => doc.text(&t).map_or(true, |s| s.is_empty()),
            _ => false, // the RequiredField's business
        };
        if empty {
            Err(sheafdb::schema::Violation::new("the title is empty"))
        } else {
            Ok(())
        }
    }
    fn repair(
        &self,
        _: &mut automerge::transaction::Transaction<'_>,
        _: &sheafdb::schema::Violation,
    ) -> Result<(), automerge::AutomergeError> {
        Err(automerge::AutomergeError::Fail)
    }
}

#[tokio::test]
async fn a_note_that_cannot_be_repaired_is_reported_and_still_takes_edits_that_do_not_add_to_it() {
    let dir = tempfile::tempdir().unwrap();
    let id = {
        let repo = Repo::open(dir.path()).unwrap();
        let h = repo.create().await.unwrap();
        new_task(&h, &["a"]);
        h.change(|tx| {
            let (_, t) = tx.get(ROOT, "title")?.unwrap();
            tx.splice_text(&t, 0, 8, "")
        })
        .unwrap();
        h.saved().await.unwrap();
        let id = h.id();
        drop(h);
        repo.shutdown().unwrap();
        id
    };
    let config = RepoConfig {
        schema: task_schema().invariant("task", NonEmptyTitle),
        ..RepoConfig::default()
    };
    let repo = Repo::open_with(dir.path(), config).unwrap();
    let mut repairs = repo.repairs();
    let h = repo.find(id).await.unwrap();
    let heads = h.heads();
    let ev = tokio::time::timeout(Duration::from_secs(5), repairs.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ev.invariant, "non-empty title");
    assert!(matches!(
        ev.outcome,
        Err(sheafdb::schema::RepairError::Failed(_))
    ));
    assert_eq!(h.heads(), heads, "the failed repair was rolled back");
    // The note is editable: a change that leaves the title empty but breaks nothing new is
    // taken; one that adds a duplicate tag is not; one that fixes the title is.
    add_tag(&h, "b").unwrap();
    assert!(matches!(
        add_tag(&h, "a").map_err(|e| *e),
        Err(RepoError::Invariant(_))
    ));
    h.change(|tx| {
        let (_, t) = tx.get(ROOT, "title")?.unwrap();
        tx.splice_text(&t, 0, 0, "fixed by hand")
    })
    .unwrap();
    assert!(repo
        .schema()
        .violations_of(&mut automerge::Automerge::load(&h.export()).unwrap())
        .is_empty());
}

/// Wait until both handles have the same heads and `done` holds on a's note.
async fn converge(
    a: &sheafdb::DocHandle,
    b: &sheafdb::DocHandle,
    done: impl Fn(&serde_json::Value) -> bool,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut ca = a.changes();
    let mut cb = b.changes();
    while a.heads() != b.heads() || !done(&a.to_json()) {
        let wait = async {
            tokio::select! {
                _ = ca.next() => {}
                _ = cb.next() => {}
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        };
        tokio::time::timeout_at(deadline, wait)
            .await
            .unwrap_or_else(|_| panic!("no convergence: a {} b {}", a.to_json(), b.to_json()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_adding_the_same_tag_offline_are_repaired_and_report_it() {
    let (url, _relay, _stop) = common::in_process_relay().await;
    let a = Repo::temporary(with_schema()).unwrap();
    let b = Repo::temporary(with_schema()).unwrap();
    let conn_a = a.connection(&url).unwrap();
    let conn_b = b.connection(&url).unwrap();
    let ha = a.create().await.unwrap();
    new_task(&ha, &["home"]);
    let hb = tokio::time::timeout(Duration::from_secs(10), b.find(ha.id()))
        .await
        .unwrap()
        .unwrap();
    converge(&ha, &hb, |j| j["tags"] == serde_json::json!(["home"])).await;

    // Both go offline and tag the task "urgent" (each change is valid on its own).
    conn_a.disconnect().await;
    conn_b.disconnect().await;
    add_tag(&ha, "urgent").unwrap();
    add_tag(&hb, "urgent").unwrap();
    hb.change(|tx| {
        let (_, t) = tx.get(ROOT, "title")?.unwrap();
        tx.splice_text(&t, 0, 0, "b: ")
    })
    .unwrap();
    let mut repairs_a = ha.repairs();
    let mut repairs_b = hb.repairs();
    let mut all_b = b.repairs();

    // Back online: the merge duplicates "urgent"; one or both repair it.
    let _conn_a = a.connection(&url).unwrap();
    let _conn_b = b.connection(&url).unwrap();
    converge(&ha, &hb, |j| {
        j["tags"]
            .as_array()
            .is_some_and(|t| t.iter().filter(|v| *v == "urgent").count() == 1)
    })
    .await;
    let json = ha.to_json();
    assert_eq!(json["tags"], serde_json::json!(["home", "urgent"]));
    assert_eq!(json["title"], "b: buy milk");
    assert_eq!(hb.to_json(), json);

    // The events are published right after the step that made the repairs: they can trail
    // the converged state by a moment.
    let first = tokio::time::timeout(Duration::from_secs(5), async {
        tokio::select! {
            e = repairs_a.next() => (true, e),
            e = repairs_b.next() => (false, e),
        }
    })
    .await
    .expect("a repair was reported");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut from_a: Vec<RepairEvent> = Vec::new();
    let mut from_b: Vec<RepairEvent> = Vec::new();
    match first {
        (true, Some(e)) => from_a.push(e),
        (false, Some(e)) => from_b.push(e),
        (_, None) => panic!("repo gone"),
    }
    from_a.extend(std::iter::from_fn(|| repairs_a.try_next()));
    from_b.extend(std::iter::from_fn(|| repairs_b.try_next()));
    assert!(
        !(from_a.is_empty() && from_b.is_empty()),
        "a repair was reported"
    );
    for (ev, actor) in from_a
        .iter()
        .map(|e| (e, ha.with_doc(|d| d.get_actor().clone())))
        .chain(
            from_b
                .iter()
                .map(|e| (e, hb.with_doc(|d| d.get_actor().clone()))),
        )
    {
        assert_eq!(ev.doc, ha.id());
        assert_eq!(
            (ev.kind.as_str(), ev.invariant.as_str()),
            ("task", "unique tags")
        );
        assert!(
            ev.violation.message.contains("\"urgent\" 2 times"),
            "{ev:?}"
        );
        // The repair is a change of the device that reported it, and reached both.
        let hash = ev.outcome.clone().unwrap();
        let change = ha.with_doc(|d| d.get_change_by_hash(&hash)).unwrap();
        assert_eq!(change.actor_id(), &actor);
        assert!(hb.with_doc(|d| d.get_change_by_hash(&hash).is_some()));
    }
    // The repo-wide stream of b saw the same repairs as b's handle.
    let all: Vec<RepairEvent> = std::iter::from_fn(|| all_b.try_next()).collect();
    assert_eq!(all, from_b);
}

/// Compaction snapshots a clone outside the note's lock and appends what changed meanwhile
/// in the same atomic request: editors typing during compactions lose nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compactions_while_editing_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = RepoConfig {
        store: sheafdb::store::StoreConfig {
            compaction_min_bytes: 2_000,
            compaction_factor: 1,
            compaction_max_chunks: 20,
            ..Default::default()
        },
        ..Default::default()
    };
    let repo = Repo::open_with(dir.path(), config.clone()).unwrap();
    let h = repo.create().await.unwrap();
    let text = h
        .change(|tx| tx.put_object(ROOT, "text", ObjType::Text))
        .unwrap();
    // Ballast, so that each snapshot takes a while and edits land while it is made.
    h.change(|tx| {
        let list = tx.put_object(ROOT, "ballast", ObjType::List)?;
        for i in 0..100_000 {
            tx.insert(&list, i, i as i64)?;
        }
        Ok(())
    })
    .unwrap();
    let compactions = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let writers: Vec<_> = (0..3)
        .map(|w| {
            let h = h.clone();
            let text = text.clone();
            let done = compactions.clone();
            std::thread::spawn(move || {
                // At least 600 edits each, and on until three explicit compactions ran
                // (bounded: a slow machine ends the edits after 20 s).
                let started = std::time::Instant::now();
                let mut i: i64 = 0;
                while i < 600
                    || (done.load(std::sync::atomic::Ordering::Relaxed) < 3
                        && started.elapsed().as_secs() < 20)
                {
                    h.change(|tx| {
                        let len = tx.length(&text);
                        tx.splice_text(&text, len, 0, &format!("{w}"))?;
                        tx.put(ROOT, format!("w{w}"), i)
                    })
                    .unwrap();
                    i += 1;
                    if i % 20 == 0 {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                }
                i
            })
        })
        .collect();
    while writers.iter().any(|w| !w.is_finished()) {
        h.compact().await.unwrap();
        compactions.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    let edits: Vec<i64> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    h.saved().await.unwrap();
    let heads = h.heads();
    let json = h.to_json();
    assert!(
        compactions.load(std::sync::atomic::Ordering::Relaxed) >= 3,
        "compacted while the writers ran"
    );
    drop(h);
    repo.shutdown().unwrap();
    drop(repo);

    let store = sheafdb::store::Store::open(dir.path(), config.store.clone()).unwrap();
    let id = store.list_documents().unwrap()[0];
    let loaded = store.load(&id).unwrap().unwrap();
    assert!(loaded.corrupt.is_empty());
    assert_eq!(
        loaded.doc.get_heads(),
        heads,
        "every acknowledged change is stored"
    );
    let text_len = {
        let (_, t) = loaded.doc.get(ROOT, "text").unwrap().unwrap();
        loaded.doc.text(&t).unwrap().chars().count() as i64
    };
    assert_eq!(text_len, edits.iter().sum::<i64>());
    for (w, n) in edits.iter().enumerate() {
        assert_eq!(json[format!("w{w}")], n - 1);
    }
    // Far fewer chunks than the changes: compaction folded them.
    assert!(loaded.chunks < 200, "{} chunks", loaded.chunks);
}

/// A note found with more stored changes than snapshot is compacted right after the load, so
/// its next load (after an eviction, say, on a relay) reads a snapshot. A note with few stored
/// changes is left as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_note_loaded_with_many_stored_changes_is_compacted_once_loaded() {
    use sheafdb::store::{Store, WriteOp};
    let dir = tempfile::tempdir().unwrap();
    let (big, small) = (DocumentId::random(), DocumentId::random());
    let mut big_doc = automerge::AutoCommit::new();
    let mut small_doc = automerge::AutoCommit::new();
    {
        let store = Store::open(dir.path(), Default::default()).unwrap();
        let text = big_doc.put_object(ROOT, "text", ObjType::Text).unwrap();
        // 40 chunks, about 100 KB of changes, no snapshot.
        for i in 0..40 {
            big_doc
                .splice_text(&text, 0, 0, &format!("{i:>2500}"))
                .unwrap();
            let bytes = big_doc.save_incremental();
            store
                .write_durable(vec![WriteOp::AppendChunk { doc: big, bytes }])
                .await
                .unwrap();
        }
        for i in 0..5 {
            small_doc.put(ROOT, format!("k{i}"), i).unwrap();
            let bytes = small_doc.save_incremental();
            store
                .write_durable(vec![WriteOp::AppendChunk { doc: small, bytes }])
                .await
                .unwrap();
        }
    }
    let repo = Repo::open(dir.path()).unwrap();
    for (id, doc) in [(big, &mut big_doc), (small, &mut small_doc)] {
        let h = repo.find(id).await.unwrap();
        assert_eq!(h.heads(), doc.get_heads());
    }
    // Shutdown waits for compactions under way.
    repo.shutdown().unwrap();
    drop(repo);
    let store = Store::open(dir.path(), Default::default()).unwrap();
    let l = store.load(&big).unwrap().unwrap();
    assert_eq!((l.chunks, l.doc.get_heads()), (1, big_doc.get_heads()));
    let l = store.load(&small).unwrap().unwrap();
    assert_eq!((l.chunks, l.doc.get_heads()), (5, small_doc.get_heads()));
}

/// A raw automerge-repo client over a real WebSocket (what a JS peer or a forger sends).
mod raw {
    use std::time::Duration;

    use automerge::sync::{Message as SyncMessage, State, SyncDoc};
    use automerge::Automerge;
    use futures::{SinkExt, StreamExt};
    use sheafdb::protocol::{self, Message, PeerMetadata, PROTOCOL_VERSION};
    use sheafdb::{DocumentId, PeerId};
    use tokio_tungstenite::tungstenite::Message as Ws;

    type Socket = tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >;

    pub struct Client {
        ws: Socket,
        them: PeerId,
    }

    impl Client {
        /// Connect and join as `me` (no storage, no sheaf extensions).
        pub async fn join(url: &str, me: &str) -> Self {
            let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
            let join = Message::Join {
                sender_id: PeerId::new(me),
                peer_metadata: PeerMetadata {
                    storage_id: None,
                    is_ephemeral: true,
                    accepts_unchecked: false,
                },
                supported_protocol_versions: vec![PROTOCOL_VERSION.to_string()],
            };
            ws.send(Ws::Binary(protocol::encode(&join))).await.unwrap();
            let mut c = Self {
                ws,
                them: PeerId::new(""),
            };
            match c.next().await {
                Some(Message::Peer { sender_id, .. }) => c.them = sender_id,
                other => panic!("expected peer, got {other:?}"),
            }
            c
        }

        /// The next protocol message, or `None` once the server closed the socket (or said
        /// nothing for 2 s).
        pub async fn next(&mut self) -> Option<Message> {
            loop {
                match tokio::time::timeout(Duration::from_secs(2), self.ws.next()).await {
                    Ok(Some(Ok(Ws::Binary(b)))) => return Some(protocol::decode(&b).unwrap()),
                    Ok(Some(Ok(Ws::Ping(_) | Ws::Pong(_)))) => continue,
                    _ => return None,
                }
            }
        }

        /// Whether the server closes the socket within 10 s (messages before are skipped).
        pub async fn closed(&mut self) -> bool {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            loop {
                match tokio::time::timeout_at(deadline, self.ws.next()).await {
                    Ok(Some(Ok(Ws::Close(_))) | None | Some(Err(_))) => return true,
                    Ok(Some(Ok(_))) => continue,
                    Err(_) => return false,
                }
            }
        }

        pub async fn sync(&mut self, doc: DocumentId, msg: SyncMessage) {
            let m = Message::Sync {
                sender_id: PeerId::new("raw"),
                target_id: self.them.clone(),
                document_id: doc,
                data: msg.encode(),
            };
            self.ws
                .send(Ws::Binary(protocol::encode(&m)))
                .await
                .unwrap();
        }

        /// Sync `mine` with the server's copy of `doc` until `done(mine)`.
        pub async fn sync_until(
            &mut self,
            doc: DocumentId,
            mine: &mut Automerge,
            state: &mut State,
            done: impl Fn(&Automerge) -> bool,
        ) {
            for _ in 0..50 {
                if let Some(m) = mine.generate_sync_message(state) {
                    self.sync(doc, m).await;
                }
                if done(mine) {
                    return;
                }
                match self.next().await {
                    Some(Message::Sync { data, .. }) => {
                        let m = SyncMessage::decode(&data).unwrap();
                        mine.receive_sync_message(state, m).unwrap();
                    }
                    Some(_) => {}
                    None => panic!("the server closed the socket or went quiet"),
                }
            }
            panic!("did not sync");
        }
    }
}

/// Two devices can sync directly: a peer serving others takes its changes as a relay does,
/// but refusing a forged one it keeps the connection (on a peer, a connection's changes may
/// be someone else's, passed on by a relay before it checked them), counts the refusal and
/// goes on syncing with it. A relay closes the forger's connection.
#[tokio::test]
async fn a_peer_refuses_a_forged_change_and_keeps_the_connection_a_relay_closes_it() {
    use automerge::sync::{Message as SyncMessage, State};
    use automerge::ActorId;
    use std::sync::atomic::Ordering;

    for (config, keeps) in [(RepoConfig::default(), true), (RepoConfig::relay(), false)] {
        let repo = Repo::temporary(config).unwrap();
        let h = repo.create().await.unwrap();
        h.change(|tx| tx.put(ROOT, "k", 1)).unwrap();
        repo.flush().await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}", listener.local_addr().unwrap());
        let (stop, _task) = common::serve(&repo, listener);
        let mut c = raw::Client::join(&url, "raw").await;
        let mut mine = automerge::Automerge::new().with_actor(ActorId::from(vec![7; 16]));
        let mut state = State::new();
        let heads = h.heads();
        c.sync_until(h.id(), &mut mine, &mut state, |m| m.get_heads() == heads)
            .await;
        // A forged change: a seq-2 change by an actor the note lacks.
        let mut evil = mine.fork().with_actor(ActorId::from(vec![9; 16]));
        evil.transact::<_, _, automerge::AutomergeError>(|tx| tx.put(ROOT, "k", 666).map(|_| ()))
            .unwrap();
        let mut forged = evil.get_last_local_change().unwrap().decode();
        forged.hash = None;
        forged.seq = 2;
        let forged = automerge::Change::from(forged);
        let msg = SyncMessage {
            heads: vec![forged.hash()],
            need: Vec::new(),
            have: Vec::new(),
            changes: vec![forged.raw_bytes().to_vec()].into(),
            flags: None,
            version: automerge::sync::MessageVersion::V1,
        };
        c.sync(h.id(), msg).await;
        if !keeps {
            // The relay answers with an error, then closes.
            assert!(c.closed().await, "the relay closes the forger's connection");
            assert_eq!(repo.stats().changes_refused.load(Ordering::Relaxed), 0);
            let _ = stop.send(());
            continue;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while repo.stats().changes_refused.load(Ordering::Relaxed) != 1 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the refusal is counted"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Still connected: an honest change goes through, and the forgery never did.
        mine.transact::<_, _, automerge::AutomergeError>(|tx| tx.put(ROOT, "k", 2).map(|_| ()))
            .unwrap();
        let want = mine.get_heads();
        let mut state = State::new();
        // (Panics if the peer closes the connection.)
        c.sync_until(h.id(), &mut mine, &mut state, |_| h.heads() == want)
            .await;
        assert_eq!(h.to_json()["k"], serde_json::json!(2));
        let _ = stop.send(());
    }
}

/// A URL with heads names a version of a note: `find` gives a read-only view of it (as JS
/// `repo.find` of such a URL does), also on another device once those heads arrive there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_url_with_heads_finds_that_version_read_only() {
    let (url, _relay, _stop) = common::in_process_relay().await;
    let repo = Repo::temporary(RepoConfig::default()).unwrap();
    let h = repo.create().await.unwrap();
    h.change(|tx| tx.put(ROOT, "v", 1_i64)).unwrap();
    let v1 = h.heads();
    h.change(|tx| tx.put(ROOT, "v", 2_i64)).unwrap();

    let versioned = sheafdb::AutomergeUrl {
        id: h.id(),
        heads: Some(v1.clone()),
    };
    let text = versioned.to_string();
    assert!(text.contains('#'), "{text}");
    let view = repo
        .find(text.parse::<sheafdb::AutomergeUrl>().unwrap())
        .await
        .unwrap();
    assert_eq!(view.to_json(), serde_json::json!({"v": 1}));
    assert_eq!(view.heads(), v1);
    assert_eq!(view.fixed_heads(), Some(v1.as_slice()));
    assert_eq!(view.url().to_string(), text, "its URL names its version");
    assert!(matches!(
        view.change(|tx| tx.put(ROOT, "v", 3_i64)),
        Err(RepoError::FixedHeads(id)) if id == h.id()
    ));
    // The note itself moves on; the view does not.
    h.change(|tx| tx.put(ROOT, "v", 4_i64)).unwrap();
    assert_eq!(view.to_json(), serde_json::json!({"v": 1}));
    assert_eq!(h.to_json(), serde_json::json!({"v": 4}));
    let mut changes = view.changes();
    assert!(
        changes.next().await.is_none(),
        "a view has no changes to report"
    );

    // Heads the note does not have: a typed error naming them, after the find timeout.
    let mut other = automerge::Automerge::new();
    other.empty_commit(Default::default());
    let quick = Repo::temporary(RepoConfig {
        find_timeout: std::time::Duration::from_millis(300),
        ..RepoConfig::default()
    })
    .unwrap();
    let copy = quick.import(&h.export()).await.unwrap();
    let bogus = sheafdb::AutomergeUrl {
        id: copy.id(),
        heads: Some(other.get_heads()),
    };
    match quick.find(bogus).await {
        Err(RepoError::UnknownHeads { missing, .. }) => assert_eq!(missing, other.get_heads()),
        other => panic!("expected UnknownHeads, got {other:?}"),
    }

    // On another device the version is found once the note syncs there.
    repo.connect(&url).unwrap();
    h.saved().await.unwrap();
    let phone = Repo::temporary(RepoConfig {
        find_timeout: common::WAIT,
        ..RepoConfig::default()
    })
    .unwrap();
    phone.connect(&url).unwrap();
    let there = tokio::time::timeout(common::WAIT, phone.find(versioned))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(there.to_json(), serde_json::json!({"v": 1}));
}
