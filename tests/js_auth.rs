//! Access control with the real automerge-repo 2.5.6 JS client (`tests/js/client.mjs`)
//! through the real `sheaf-relay` binary started with a keys file: a valid token works from
//! JS as from sheaf, a read-only JS peer receives changes but its own never land (not at the
//! writer, not on the relay's disk), and a JS client without a valid token gets nothing.
//!
//! Needs `node` and `npm ci --prefix tests/js`; without them these tests FAIL with that
//! instruction (they never skip). Every wait is bounded.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use automerge::transaction::Transactable;
use automerge::{ChangeHash, ReadDoc, ROOT};
use common::{JsProc, RelayProc, WAIT};
use serde_json::{json, Value};
use sheafdb::auth::{Claims, DocScope, Key, Keyring};
use sheafdb::{ConnectOptions, DocHandle, DocumentId, Repo, RepoConfig};
use tokio::time::{sleep, timeout, Instant};

const KID: &str = "js-test";

/// A fresh key written as a one-line keys file in `dir`; returns the ring and the file.
fn keys_file(dir: &Path) -> (Keyring, PathBuf) {
    let key = Key::generate();
    let path = dir.join("relay.keys");
    std::fs::write(&path, format!("{KID} {}\n", key.to_hex())).unwrap();
    let ring = Keyring::from_file(&path).unwrap();
    (ring, path)
}

fn mint(ring: &Keyring, docs: DocScope, write: bool) -> String {
    ring.mint(&Claims::new(KID, docs, write, 3600)).unwrap()
}

fn only(doc: DocumentId) -> DocScope {
    DocScope::Docs(BTreeSet::from([doc]))
}

async fn start_relay(data: &Path, port: u16, keys: &Path) -> RelayProc {
    RelayProc::start(data, port, &["--keys-file", keys.to_str().unwrap()]).await
}

fn sheaf_client(url: &str, token: String) -> Repo {
    let repo = Repo::temporary(RepoConfig {
        find_timeout: WAIT,
        ..RepoConfig::default()
    })
    .unwrap();
    repo.connect_with(url, ConnectOptions::token(token))
        .unwrap();
    repo
}

/// A JS client dialing `ws://…/?token=…` (or without a token when `token` is `None`).
async fn js_client(relay_url: &str, token: Option<&str>, name: &str) -> JsProc {
    let url = match token {
        Some(t) => format!("{relay_url}/?token={t}"),
        None => format!("{relay_url}/"),
    };
    let mut js = JsProc::spawn("client.mjs", &[&url, name, "60000"]).await;
    js.expect(WAIT, |v| v["event"] == "ready").await;
    js
}

/// Wait until the sheaf handle's JSON satisfies `pred`.
async fn wait_json(h: &DocHandle, what: &str, pred: impl Fn(&Value) -> bool) {
    let mut changes = h.changes();
    let deadline = Instant::now() + WAIT;
    while !pred(&h.to_json()) {
        if tokio::time::timeout_at(deadline, changes.next())
            .await
            .is_err()
        {
            panic!("sheaf never saw {what}; has {}", h.to_json());
        }
    }
}

fn is_peer_up(v: &Value) -> bool {
    v["event"] == "peer" && v["state"] == "connected"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_client_with_a_valid_token_syncs_both_ways_with_sheaf() {
    common::js_dir();
    let t0 = std::time::Instant::now();
    let data = tempfile::tempdir().unwrap();
    let (ring, keys) = keys_file(data.path());
    let relay = start_relay(&data.path().join("store"), 0, &keys).await;
    let url = relay.url();

    // sheaf creates D; the JS token covers D only, with write.
    let sheaf = sheaf_client(&url, mint(&ring, DocScope::All, true));
    let h = sheaf.create().await.unwrap();
    h.change(|tx| tx.put(ROOT, "title", "from sheaf")).unwrap();
    let doc_url = h.url().to_string();
    let mut js = js_client(&url, Some(&mint(&ring, only(h.id()), true)), "js-writer").await;
    let found = js
        .call(json!({"cmd": "find", "url": doc_url, "timeoutMs": 10000}))
        .await;
    assert_eq!(found["doc"], json!({"title": "from sheaf"}));

    // JS -> sheaf.
    js.call(json!({"cmd": "put", "url": doc_url, "key": "js", "value": "hello from js"}))
        .await;
    wait_json(&h, "the JS edit", |v| v["js"] == "hello from js").await;
    // sheaf -> JS.
    h.change(|tx| tx.put(ROOT, "n", 2_i64)).unwrap();
    js.call(json!({"cmd": "waitDoc", "url": doc_url,
        "doc": {"title": "from sheaf", "js": "hello from js", "n": 2}}))
        .await;

    // A JS client with a `*` write token creates a document; sheaf finds and edits it.
    let mut js2 = js_client(&url, Some(&mint(&ring, DocScope::All, true)), "js-creator").await;
    let created = js2
        .call(json!({"cmd": "create", "init": {"items": [1, 2]}}))
        .await;
    let js_url = created["url"].as_str().unwrap().to_string();
    let id: sheafdb::AutomergeUrl = js_url.parse().unwrap();
    let h2 = timeout(WAIT, sheaf.find(id))
        .await
        .expect("sheaf finds the JS document in time")
        .unwrap();
    assert_eq!(h2.to_json(), json!({"items": [1, 2]}));
    h2.change(|tx| {
        let (_, items) = tx.get(ROOT, "items")?.unwrap();
        tx.insert(&items, 2, 3_i64)
    })
    .unwrap();
    js2.call(json!({"cmd": "waitDoc", "url": js_url, "doc": {"items": [1, 2, 3]}}))
        .await;

    js.finish().await;
    js2.finish().await;
    relay.terminate().await;
    eprintln!("valid-token JS interop took {:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_client_with_a_read_only_token_receives_but_its_edits_never_land() {
    common::js_dir();
    let t0 = std::time::Instant::now();
    let data = tempfile::tempdir().unwrap();
    let (ring, keys) = keys_file(data.path());
    let store = data.path().join("store");
    let relay = start_relay(&store, 0, &keys).await;
    let url = relay.url();
    let port = relay.addr.port();

    let writer = sheaf_client(&url, mint(&ring, DocScope::All, true));
    let w = writer.create().await.unwrap();
    w.change(|tx| tx.put(ROOT, "title", "original")).unwrap();
    let doc_url = w.url().to_string();

    let mut js = js_client(&url, Some(&mint(&ring, only(w.id()), false)), "js-reader").await;
    js.call(json!({"cmd": "find", "url": doc_url, "timeoutMs": 10000}))
        .await;
    js.call(json!({"cmd": "waitDoc", "url": doc_url, "doc": {"title": "original"}}))
        .await;

    // The reader edits locally (automerge-repo has no notion of read-only: it sends it).
    js.call(json!({"cmd": "put", "url": doc_url, "key": "title", "value": "vandalized"}))
        .await;
    let heads = js.call(json!({"cmd": "doc", "url": doc_url})).await["hexHeads"].clone();
    let evil: Vec<ChangeHash> = heads
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h.as_str().unwrap().parse().unwrap())
        .collect();
    assert_eq!(evil.len(), 1, "{heads}");
    let evil = evil[0];

    // The channel works: a later writer edit reaches the reader...
    w.change(|tx| tx.put(ROOT, "body", "more")).unwrap();
    js.call(json!({"cmd": "waitDoc", "url": doc_url,
        "doc": {"title": "vandalized", "body": "more"}}))
        .await;
    // ...but within a generous window the reader's edit never reaches the writer.
    sleep(Duration::from_millis(1500)).await;
    assert!(
        w.with_doc(|d| d.get_change_by_hash(&evil).is_none()),
        "the read-only edit reached the writer: {}",
        w.to_json()
    );
    assert_eq!(w.to_json(), json!({"title": "original", "body": "more"}));

    // Restart the relay on the same data dir and port; the reader reconnects (and offers its
    // change again), still refused.
    while js.take(is_peer_up).is_some() {}
    relay.terminate().await;
    let relay = start_relay(&store, port, &keys).await;
    js.expect(WAIT, is_peer_up).await;
    sleep(Duration::from_millis(700)).await;

    // A fresh sheaf client (empty local store) loads D from the relay's disk: no evil edit.
    let fresh = sheaf_client(&url, mint(&ring, only(w.id()), true));
    let f = timeout(WAIT, fresh.find(w.id()))
        .await
        .expect("fresh client finds D in time")
        .unwrap();
    wait_json(&f, "the writer's body", |v| v["body"] == "more").await;
    assert!(
        f.with_doc(|d| d.get_change_by_hash(&evil).is_none()),
        "the read-only edit is on the relay: {}",
        f.to_json()
    );
    assert_eq!(f.to_json(), json!({"title": "original", "body": "more"}));
    assert!(w.with_doc(|d| d.get_change_by_hash(&evil).is_none()));

    js.finish().await;
    relay.terminate().await;
    eprintln!("read-only JS test took {:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_client_without_a_valid_token_is_refused() {
    common::js_dir();
    let t0 = std::time::Instant::now();
    let data = tempfile::tempdir().unwrap();
    let (ring, keys) = keys_file(data.path());
    let relay = start_relay(&data.path().join("store"), 0, &keys).await;
    let url = relay.url();

    let writer = sheaf_client(&url, mint(&ring, DocScope::All, true));
    let w = writer.create().await.unwrap();
    w.change(|tx| tx.put(ROOT, "secret", "s3cret")).unwrap();
    let doc_url = w.url().to_string();
    // Make sure D is on the relay, so a refusal is about the token, not a missing document.
    let mut probe = js_client(&url, Some(&mint(&ring, only(w.id()), false)), "js-ok").await;
    probe
        .call(json!({"cmd": "waitDoc", "url": doc_url, "doc": {"secret": "s3cret"}}))
        .await;

    // Same kid, different key: a forged signature.
    let mut other = Keyring::new();
    other.insert(KID, Key::generate());
    let forged = mint(&other, only(w.id()), true);
    let mut none = js_client(&url, None, "js-none").await;
    let mut bad = js_client(&url, Some(&forged), "js-forged").await;
    let mut garbage = js_client(&url, Some("not-a-token"), "js-garbage").await;

    for js in [&mut none, &mut bad, &mut garbage] {
        let started = Instant::now();
        let mut cmd = json!({"cmd": "find", "url": doc_url, "timeoutMs": 2000});
        let v = js.try_call(&mut cmd).await;
        assert_eq!(v["ok"], json!(false), "{}: {v}", js.name);
        assert!(started.elapsed() < Duration::from_secs(5), "{}", js.name);
        assert!(
            js.take(is_peer_up).is_none(),
            "{}: the relay accepted the peer",
            js.name
        );
    }

    probe.finish().await;
    none.finish().await;
    bad.finish().await;
    garbage.finish().await;
    relay.terminate().await;
    eprintln!("refused JS test took {:?}", t0.elapsed());
}
