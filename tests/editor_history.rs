//! History: listing changes, reading past versions, diffs, forks.

use automerge::transaction::{CommitOptions, Transactable};
use automerge::{ChangeHash, ObjType, PatchAction, ReadDoc, ROOT};
use serde_json::json;
use sheafdb::repo::{HistoryError, TextIndex};
use sheafdb::{Repo, RepoConfig};

#[tokio::test]
async fn changes_past_versions_diffs_and_forks() {
    let repo = Repo::temporary(RepoConfig::default()).unwrap();
    let h = repo.create().await.unwrap();
    let t = h
        .change(|tx| {
            tx.put(ROOT, "title", "draft")?;
            let t = tx.put_object(ROOT, "body", ObjType::Text)?;
            tx.splice_text(&t, 0, 0, "hello")?;
            Ok(t)
        })
        .unwrap();
    let v1 = h.heads();
    h.change_with(CommitOptions::default().with_message("retitle"), |tx| {
        tx.put(ROOT, "title", "final")
    })
    .unwrap();
    h.splice_text(&t, 5, 0, " world", TextIndex::CodePoints)
        .unwrap();
    let v3 = h.heads();

    // create's empty change + 3
    let log = h.history();
    assert_eq!(log.len(), 4);
    let actor = log[1].actor.clone();
    for (i, c) in log.iter().enumerate().skip(1) {
        assert_eq!(c.actor, actor);
        assert_eq!(c.deps, vec![log[i - 1].hash]);
        assert!(c.ops >= 1, "{c:?}");
    }
    assert_eq!(log[1].seq + 2, log[3].seq);
    assert_eq!(log[3].hash, v3[0]);
    assert_eq!(log[1].ops, 7, "put, make text, one insert per character");
    assert_eq!(h.change_info(&v1[0]).unwrap(), log[1]);
    for c in &log[1..] {
        assert!(
            c.time > 1_600_000_000 && c.time < 100_000_000_000,
            "stamped in seconds: {c:?}"
        );
    }
    // messages: only the change made with one has it
    let messages: Vec<_> = log.iter().map(|c| c.message.as_deref()).collect();
    assert_eq!(messages, [None, None, Some("retitle"), None]);
    // an explicit time is kept; a change that breaks nothing else is made as usual
    h.change_with(
        CommitOptions::default()
            .with_message("backdated")
            .with_time(1_234_567_890),
        |tx| tx.put(ROOT, "done", false),
    )
    .unwrap();
    let last = h.change_info(&h.heads()[0]).unwrap();
    assert_eq!(
        (last.message.as_deref(), last.time),
        (Some("backdated"), 1_234_567_890)
    );
    h.change(|tx| tx.delete(ROOT, "done")).unwrap();

    assert_eq!(
        h.json_at(&v1).unwrap(),
        json!({"title": "draft", "body": "hello"})
    );
    assert_eq!(h.json_at(&v3).unwrap(), h.to_json());
    assert_eq!(h.json_at(&[]).unwrap(), json!({}));

    let patches = h.diff(&v1, &v3).unwrap();
    assert!(patches
        .iter()
        .any(|p| matches!(&p.action, PatchAction::PutMap { key, .. } if key == "title")));
    assert!(patches
        .iter()
        .any(|p| matches!(&p.action, PatchAction::SpliceText { index: 5, value, .. } if value.make_string() == " world")));
    let back = h.diff(&v3, &v1).unwrap();
    assert!(back.iter().any(|p| matches!(
        &p.action,
        PatchAction::DeleteSeq {
            index: 5,
            length: 6
        }
    )));

    let bogus = ChangeHash([7; 32]);
    assert!(matches!(h.json_at(&[bogus]), Err(HistoryError::UnknownHead(x)) if x == bogus));
    assert!(matches!(
        h.diff(&v1, &[bogus]),
        Err(HistoryError::UnknownHead(_))
    ));
    assert!(matches!(
        repo.fork(&h, &[bogus]).await,
        Err(HistoryError::UnknownHead(_))
    ));

    // fork the first version into a new note and edit it independently
    let f = repo.fork(&h, &v1).await.unwrap();
    assert_ne!(f.id(), h.id());
    assert_eq!(f.to_json(), json!({"title": "draft", "body": "hello"}));
    assert_eq!(f.heads(), v1);
    f.change(|tx| tx.put(ROOT, "title", "forked")).unwrap();
    assert_eq!(h.to_json()["title"], "final");
    let fl = f.history();
    assert_eq!(fl.len(), 3);
    assert_ne!(fl[2].actor, actor, "a fork writes with its own actor");
    // it is a real note: findable, and stored
    f.saved().await.unwrap();
    let again = repo.find(f.id()).await.unwrap();
    assert_eq!(again.to_json()["title"], "forked");
    assert!(repo.list().unwrap().contains(&f.id()));
    // the fork still shares history with the original
    let shared = f.with_doc(|d| d.get_change_by_hash(&v1[0]).is_some());
    assert!(shared);
    let _ = h.with_doc(|d| d.length(&t));
}

#[tokio::test]
async fn a_change_with_a_message_is_still_checked_against_the_schema() {
    use sheafdb::schema::{FieldDefault, RequiredField, Schema};
    use sheafdb::RepoError;
    let schema = Schema::new().invariant(
        "task",
        RequiredField::new("title", FieldDefault::Text(String::new())),
    );
    let repo = Repo::temporary(RepoConfig {
        schema,
        ..Default::default()
    })
    .unwrap();
    let h = repo.create().await.unwrap();
    h.change_with(CommitOptions::default().with_message("new task"), |tx| {
        tx.put(ROOT, "kind", "task")?;
        tx.put(ROOT, "title", "write tests")
    })
    .unwrap();
    let heads = h.heads();
    let r = h.change_with(CommitOptions::default().with_message("oops"), |tx| {
        tx.delete(ROOT, "title")
    });
    assert!(matches!(r, Err(RepoError::Invariant(_))), "{r:?}");
    assert_eq!(h.heads(), heads, "rolled back");
    let messages: Vec<_> = h.history().into_iter().map(|c| c.message).collect();
    assert_eq!(messages, [None, Some("new task".to_string())]);
}
