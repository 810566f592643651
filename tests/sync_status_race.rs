//! Every note created and changed right after connecting reports `Synced` for the relay.
//!
//! Found by the relay bench (`benches/relay.rs`, scenario rss): about 1 note in 150 stayed
//! `Syncing` forever although the relay had every change. The client's heads-only message
//! and its message with changes reached the relay in one batch; the coalesced apply made the
//! first look as if the client already knew the relay's new heads, so the relay never
//! acknowledged them (fixed in `engine::doc`, unit-level test in `tests/engine.rs`). This is
//! the end-to-end check: 400 notes, 8 clients at a time, through an in-process relay.

mod common;

use std::time::Duration;

use automerge::transaction::Transactable;
use automerge::{ObjType, ROOT};
use sheafdb::engine::PeerSyncStatus;
use sheafdb::net::client::ConnectionState;
use sheafdb::{Repo, RepoConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_note_created_and_changed_at_once_reports_synced() {
    let (url, _relay, _stop) = common::in_process_relay().await;
    let mut tasks = Vec::new();
    for w in 0..8 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let mut stuck = Vec::new();
            for _ in 0..50 {
                let c = Repo::temporary(RepoConfig::default()).unwrap();
                let mut st = c.connect(&url).unwrap();
                st.wait_for(|s| matches!(s, ConnectionState::Connected))
                    .await
                    .unwrap();
                c.peers().wait_for(|p| !p.is_empty()).await.unwrap();
                let h = c.create().await.unwrap();
                h.change(|tx| {
                    let t = tx.put_object(ROOT, "text", ObjType::Text)?;
                    tx.splice_text(&t, 0, 0, &format!("hello {w}"))
                })
                .unwrap();
                let mut s = h.sync_status();
                let synced = s.wait_for(|m| m.values().any(|s| *s == PeerSyncStatus::Synced));
                if tokio::time::timeout(Duration::from_secs(5), synced)
                    .await
                    .is_err()
                {
                    // The relay has it all: another client fetches it whole.
                    let other = Repo::temporary(RepoConfig::default()).unwrap();
                    other.connect(&url).unwrap();
                    let got = other.find(h.id()).await.unwrap();
                    let whole = got.heads() == h.heads();
                    stuck.push(format!(
                        "{}: status {:?}, relay has it all: {whole}",
                        h.id(),
                        *s.borrow()
                    ));
                    drop(got);
                    tokio::task::spawn_blocking(move || drop(other))
                        .await
                        .unwrap();
                }
                drop(h);
                tokio::task::spawn_blocking(move || drop(c)).await.unwrap();
            }
            stuck
        }));
    }
    let mut stuck = Vec::new();
    for t in tasks {
        stuck.extend(t.await.unwrap());
    }
    assert!(
        stuck.is_empty(),
        "{} of 400 notes never reported synced:\n{}",
        stuck.len(),
        stuck.join("\n")
    );
}
