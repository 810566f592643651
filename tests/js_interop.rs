//! Interop with the real automerge-repo 2.5.6 JS packages (Node scripts in `tests/js/`):
//! JS and sheaf clients through the `sheaf-relay` binary, a sheaf client against the JS
//! reference sync server, ephemeral messages both ways, the JS upload race, and a JS client
//! told "unavailable" that gets the note once its owner comes online.
//!
//! Needs `node` and `npm ci --prefix tests/js`; without them these tests FAIL with that
//! instruction (they never skip). Every wait is bounded.

mod common;

use std::time::Duration;

use automerge::transaction::Transactable;
use automerge::{ObjType, ReadDoc, ROOT};
use common::{JsProc, RelayProc, WAIT};
use serde_json::{json, Value};
use sheafdb::{DocHandle, Repo, RepoConfig};
use tokio::time::{sleep, timeout, Instant};

fn peer_repo() -> Repo {
    Repo::temporary(RepoConfig {
        find_timeout: WAIT,
        ..RepoConfig::default()
    })
    .unwrap()
}

/// Ask the JS client for its copy until it equals the sheaf handle's JSON (both sides may
/// still be moving), within `WAIT`. Returns the converged JSON.
async fn converge(js: &mut JsProc, url: &str, h: &DocHandle) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let js_doc = js.call(json!({"cmd": "doc", "url": url})).await["doc"].clone();
        let ours = h.to_json();
        if js_doc == ours {
            return ours;
        }
        assert!(
            Instant::now() < deadline,
            "no convergence within {WAIT:?}:\n js    {js_doc}\n sheaf {ours}"
        );
        sleep(Duration::from_millis(50)).await;
    }
}

/// Wait until some peer (the relay or server) reports `Synced` for the handle's note.
async fn wait_synced(h: &DocHandle) {
    let mut st = h.sync_status();
    timeout(
        WAIT,
        st.wait_for(|m| {
            m.values()
                .any(|s| *s == sheafdb::engine::PeerSyncStatus::Synced)
        }),
    )
    .await
    .expect("synced with the server in time")
    .unwrap();
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

fn splice(h: &DocHandle, key: &str, at: usize, text: &str) {
    h.change(|tx| {
        let t = match tx.get(ROOT, key)? {
            Some((_, t)) => t,
            None => tx.put_object(ROOT, key, ObjType::Text)?,
        };
        tx.splice_text(&t, at, 0, text)
    })
    .unwrap();
}

fn text_len(h: &DocHandle, key: &str) -> usize {
    h.with_doc(|d| {
        let (_, t) = d.get(ROOT, key).unwrap().unwrap();
        d.length(&t)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_and_sheaf_edit_one_note_through_sheaf_relay_online_and_offline() {
    common::js_dir(); // fails first, with what to run, if node or node_modules is missing
    let t0 = std::time::Instant::now();
    let data = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(data.path(), 0, &[]).await;
    let url = relay.url();
    let port = relay.addr.port();

    let sheaf = peer_repo();
    let conn = sheaf.connection(&url).unwrap();
    let mut js = JsProc::spawn("client.mjs", &[&url, "js-editor", "90000"]).await;
    js.expect(WAIT, |v| v["event"] == "ready").await;

    // sheaf creates -> JS finds and edits -> sheaf sees it.
    let h = sheaf.create().await.unwrap();
    splice(&h, "text", 0, "hello from sheaf");
    h.change(|tx| tx.put(ROOT, "n", 1_i64)).unwrap();
    let doc_url = h.url().to_string();
    let found = js.call(json!({"cmd": "find", "url": doc_url})).await;
    assert_eq!(found["doc"], h.to_json(), "JS sees sheaf's note");
    js.call(
        json!({"cmd": "splice", "url": doc_url, "key": "text", "index": 16, "text": " and js"}),
    )
    .await;
    wait_json(&h, "the JS splice", |v| {
        v["text"] == "hello from sheaf and js"
    })
    .await;
    converge(&mut js, &doc_url, &h).await;

    // JS creates -> sheaf finds and edits -> JS sees it.
    let created = js
        .call(json!({"cmd": "create", "init": {"title": "from js", "items": [1, 2, 3]}}))
        .await;
    let js_url = created["url"].as_str().unwrap().to_string();
    let id: sheafdb::AutomergeUrl = js_url.parse().unwrap();
    let h2 = timeout(WAIT, sheaf.find(id))
        .await
        .expect("find in time")
        .unwrap();
    assert_eq!(h2.to_json(), created["doc"]);
    h2.change(|tx| {
        let (_, items) = tx.get(ROOT, "items")?.unwrap();
        tx.insert(&items, 3, 4_i64)
    })
    .unwrap();
    js.call(json!({"cmd": "waitDoc", "url": js_url,
        "doc": {"title": "from js", "items": [1, 2, 3, 4]}}))
        .await;

    // Offline: the relay goes away; both sides edit concurrently, then it comes back on the
    // same port and data directory.
    relay.terminate().await;
    let mut peers = sheaf.peers();
    timeout(WAIT, peers.wait_for(|p| p.is_empty()))
        .await
        .unwrap()
        .unwrap();
    splice(&h, "text", 0, "[S] ");
    h.change(|tx| tx.put(ROOT, "sheaf_offline", true)).unwrap();
    js.call(json!({"cmd": "splice", "url": doc_url, "key": "text", "index": 23, "text": " [J]"}))
        .await;
    js.call(json!({"cmd": "put", "url": doc_url, "key": "js_offline", "value": true}))
        .await;
    let relay = RelayProc::start(data.path(), port, &[]).await;
    let doc = converge(&mut js, &doc_url, &h).await;
    assert_eq!(doc["text"], "[S] hello from sheaf and js [J]");
    assert_eq!(doc["sheaf_offline"], true);
    assert_eq!(doc["js_offline"], true);
    assert_eq!(doc["n"], 1);
    assert_eq!(text_len(&h, "text"), 31);

    // Offline on the sheaf side only: its connection goes away while the relay stays up.
    conn.disconnect().await;
    timeout(WAIT, peers.wait_for(|p| p.is_empty()))
        .await
        .unwrap()
        .unwrap();
    splice(&h, "text", 31, " (s2)");
    js.call(json!({"cmd": "splice", "url": doc_url, "key": "text", "index": 0, "text": "(j2) "}))
        .await;
    js.call(json!({"cmd": "put", "url": doc_url, "key": "n", "value": 2}))
        .await;
    let _conn = sheaf.connection(&relay.url()).unwrap();
    let doc = converge(&mut js, &doc_url, &h).await;
    assert_eq!(doc["text"], "(j2) [S] hello from sheaf and js [J] (s2)");
    assert_eq!(doc["n"], 2);

    // The relay kept the JS note through the restart: a fresh sheaf peer finds it there.
    let fresh = peer_repo();
    fresh.connect(&relay.url()).unwrap();
    let h3 = timeout(WAIT, fresh.find(h2.id())).await.unwrap().unwrap();
    wait_json(&h3, "the JS note", |v| v["items"] == json!([1, 2, 3, 4])).await;

    assert!(js.finish().await.is_some());
    relay.terminate().await;
    eprintln!("took {:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sheaf_syncs_with_the_js_reference_sync_server_both_ways() {
    common::js_dir(); // fails first, with what to run, if node or node_modules is missing
    let mut server = JsProc::spawn("sync-server.mjs", &["60000"]).await;
    let listening = server.expect(WAIT, |v| v["event"] == "listening").await;
    let url = listening["url"].as_str().unwrap().to_string();

    let sheaf = peer_repo();
    sheaf.connect(&url).unwrap();
    let mut js = JsProc::spawn("client.mjs", &[&url, "js-client", "60000"]).await;
    js.expect(WAIT, |v| v["event"] == "ready").await;

    // sheaf creates -> the server stores it -> a JS client finds it.
    let h = sheaf.create().await.unwrap();
    splice(&h, "text", 0, "made by sheaf");
    let doc_url = h.url().to_string();
    // The JS server's own `find` does not ask its peers (sharePolicy false): look once the
    // upload is done, i.e. the server advertised heads equal to ours.
    wait_synced(&h).await;
    let on_server = server.call(json!({"cmd": "find", "url": doc_url})).await;
    let found = js.call(json!({"cmd": "find", "url": doc_url})).await;
    assert_eq!(found["doc"]["text"], "made by sheaf", "{found}");
    assert!(on_server["doc"].is_object());
    // and later edits flow too
    splice(&h, "text", 13, "!");
    js.call(json!({"cmd": "waitDoc", "url": doc_url, "doc": {"text": "made by sheaf!"}}))
        .await;

    // JS creates -> sheaf finds it through the server.
    let created = js
        .call(json!({"cmd": "create", "init": {"title": "made by js", "tags": ["a", "b"]}}))
        .await;
    let js_url = created["url"].as_str().unwrap().to_string();
    // The JS server answers `doc-unavailable` to a request for a note a client has not begun
    // to upload (it asks nobody): hand the URL over once the server has the note.
    let deadline = Instant::now() + WAIT;
    loop {
        let r = server
            .try_call(&mut json!({"cmd": "find", "url": js_url, "timeoutMs": 500}))
            .await;
        if r["ok"] == true && r["doc"] == created["doc"] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the JS server never got the JS note: {r}"
        );
        sleep(Duration::from_millis(100)).await;
    }
    let id: sheafdb::AutomergeUrl = js_url.parse().unwrap();
    let h2 = timeout(WAIT, sheaf.find(id))
        .await
        .expect("find in time")
        .unwrap();
    assert_eq!(h2.to_json(), created["doc"]);
    h2.change(|tx| tx.put(ROOT, "seen_by", "sheaf")).unwrap();
    converge(&mut js, &js_url, &h2).await;

    js.finish().await;
    server.finish().await;
}

/// `{"from": "sheaf", "n": 42}` in CBOR, as cbor-x would decode it.
fn sheaf_payload() -> Vec<u8> {
    let mut buf = Vec::new();
    let mut e = minicbor::Encoder::new(&mut buf);
    e.map(2).unwrap();
    e.str("from").unwrap().str("sheaf").unwrap();
    e.str("n").unwrap().u32(42).unwrap();
    buf
}

/// Decode a flat CBOR map of text keys to text or integer values (what the JS side sends).
fn decode_flat_map(bytes: &[u8]) -> Value {
    let mut d = minicbor::Decoder::new(bytes);
    let n = d.map().unwrap().expect("definite map");
    let mut out = serde_json::Map::new();
    for _ in 0..n {
        let k = d.str().unwrap().to_string();
        let v = match d.datatype().unwrap() {
            minicbor::data::Type::String => json!(d.str().unwrap()),
            _ => json!(d.i64().unwrap()),
        };
        out.insert(k, v);
    }
    Value::Object(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ephemeral_messages_cross_between_js_and_sheaf_both_ways() {
    common::js_dir(); // fails first, with what to run, if node or node_modules is missing
    let data = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(data.path(), 0, &[]).await;
    let url = relay.url();
    let sheaf = peer_repo();
    sheaf.connect(&url).unwrap();
    let mut js = JsProc::spawn("client.mjs", &[&url, "js-presence", "60000"]).await;
    js.expect(WAIT, |v| v["event"] == "ready").await;

    let h = sheaf.create().await.unwrap();
    splice(&h, "text", 0, "presence");
    let doc_url = h.url().to_string();
    js.call(json!({"cmd": "find", "url": doc_url})).await;
    let mut eph = h.ephemeral();

    // JS -> sheaf (repeat: the relay may not have both peers attached on the first try).
    let deadline = Instant::now() + WAIT;
    let (from, payload) = loop {
        js.call(json!({"cmd": "broadcast", "url": doc_url,
            "message": {"cursor": 7, "who": "js-presence"}}))
            .await;
        match timeout(Duration::from_millis(300), eph.recv()).await {
            Ok(Ok(m)) => break m,
            _ => assert!(Instant::now() < deadline, "sheaf got no ephemeral message"),
        }
    };
    assert_eq!(from.as_str(), "js-presence");
    assert_eq!(
        decode_flat_map(&payload),
        json!({"cursor": 7, "who": "js-presence"})
    );

    // sheaf -> JS
    let deadline = Instant::now() + WAIT;
    let got = loop {
        h.broadcast(sheaf_payload()).unwrap();
        sleep(Duration::from_millis(300)).await;
        if let Some(v) = take_ephemeral(&mut js).await {
            break v;
        }
        assert!(Instant::now() < deadline, "JS got no ephemeral message");
    };
    assert_eq!(got["message"], json!({"from": "sheaf", "n": 42}));
    assert_eq!(got["senderId"], json!(sheaf.peer_id().as_str()));
    assert_eq!(got["url"], json!(doc_url));

    js.finish().await;
    relay.terminate().await;
}

/// An ephemeral event the JS client already printed, if any (never waits long).
async fn take_ephemeral(js: &mut JsProc) -> Option<Value> {
    // A round trip guarantees every event printed before it has been read.
    let _ = js.try_call(&mut json!({"cmd": "noop"})).await;
    js.take(|v| v["event"] == "ephemeral")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_js_note_handed_to_a_second_js_client_at_once_is_found_through_sheaf_relay() {
    common::js_dir(); // fails first, with what to run, if node or node_modules is missing
    let data = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(data.path(), 0, &[]).await;
    let race = JsProc::spawn("upload-race.mjs", &[&relay.url(), "6", "60000"]).await;
    let (status, lines) = race.wait_output(Duration::from_secs(70)).await;
    let failed: Vec<&Value> = lines.iter().filter(|v| v["ok"] == false).collect();
    assert!(failed.is_empty(), "rounds failed: {failed:?}");
    assert_eq!(
        lines.iter().filter(|v| v["ok"] == true).count(),
        6,
        "{lines:?}"
    );
    assert_eq!(status, Some(0), "{lines:?}");
    relay.terminate().await;
}

/// A shared link opened before its owner is online: the relay says "unavailable" (it has
/// nothing), then the owner connects and announces the note. The relay must take it and serve
/// the JS client's open request: its handle goes from unavailable to ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_js_client_told_unavailable_gets_the_note_once_its_owner_comes_online() {
    common::js_dir(); // fails first, with what to run, if node or node_modules is missing
    let data = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(data.path(), 0, &[]).await;
    let url = relay.url();

    // The owner wrote the note offline.
    let owner = peer_repo();
    let h = owner.create().await.unwrap();
    h.change(|tx| tx.put(ROOT, "title", "written offline"))
        .unwrap();
    let doc_url = h.url().to_string();

    let mut js = JsProc::spawn("client.mjs", &[&url, "js-friend", "90000"]).await;
    js.expect(WAIT, |v| v["event"] == "ready").await;
    let first = js
        .try_call(&mut json!({"cmd": "find", "url": doc_url, "timeoutMs": 20000}))
        .await;
    assert_eq!(first["ok"], json!(false), "nobody has it yet: {first}");
    assert!(
        first["error"]
            .as_str()
            .unwrap_or("")
            .contains("unavailable"),
        "{first}"
    );

    let _online = owner.connection(&url).unwrap();
    // JS answers `find` on its unavailable handle at once; it turns ready when the relay
    // passes the note on.
    let deadline = Instant::now() + WAIT;
    let found = loop {
        let v = js
            .try_call(&mut json!({"cmd": "find", "url": doc_url, "timeoutMs": 2000}))
            .await;
        if v["ok"] == json!(true) {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "the JS client never got the note: {v}"
        );
        sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(found["doc"], h.to_json());
    js.finish().await;
    relay.terminate().await;
}

/// Ask `js` for its handle's sync info about `storage` until it names `heads`, within `WAIT`
/// (a report may arrive before the handle is returned to the script, so not as an event).
async fn wait_sync_info(js: &mut JsProc, url: &str, storage: &str, heads: &Value) {
    let deadline = Instant::now() + WAIT;
    loop {
        let info = js
            .call(json!({"cmd": "syncInfo", "url": url, "storageId": storage}))
            .await;
        if info["heads"] == *heads {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{storage}'s heads never reached {url}'s sync info: {info} instead of {heads}"
        );
        sleep(Duration::from_millis(50)).await;
    }
}

/// JS apps with `enableRemoteHeadsGossiping` (automerge-repo's "what does my other device
/// have?") through sheaf-relay: a phone subscribed to a laptop's storage id hears the
/// laptop's heads for the note it has open, as they move, and a sheaf client's too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_remote_heads_gossip_reaches_a_subscriber_through_sheaf_relay() {
    common::js_dir(); // fails first, with what to run, if node or node_modules is missing
    let data = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(data.path(), 0, &[]).await;
    let url = relay.url();
    let gossip = [("SHEAF_JS_GOSSIP", "1")];
    let mut laptop = JsProc::spawn_env("client.mjs", &[&url, "js-laptop", "60000"], &gossip).await;
    let mut phone = JsProc::spawn_env("client.mjs", &[&url, "js-phone", "60000"], &gossip).await;
    laptop.expect(WAIT, |v| v["event"] == "ready").await;
    phone.expect(WAIT, |v| v["event"] == "ready").await;

    let laptop_storage = laptop.call(json!({"cmd": "storageId"})).await["storageId"].clone();
    let laptop_storage = laptop_storage
        .as_str()
        .expect("the laptop has a storage id")
        .to_string();
    let created = laptop
        .call(json!({"cmd": "create", "init": {"n": 1}}))
        .await;
    let doc_url = created["url"].as_str().unwrap().to_string();
    let heads = laptop.call(json!({"cmd": "doc", "url": doc_url})).await["heads"].clone();

    phone
        .call(json!({"cmd": "subscribeRemotes", "storageIds": [laptop_storage]}))
        .await;
    phone.call(json!({"cmd": "find", "url": doc_url})).await;
    wait_sync_info(&mut phone, &doc_url, &laptop_storage, &heads).await;

    // The laptop edits: the phone's handle hears its new heads (a `remote-heads` event).
    laptop
        .call(json!({"cmd": "put", "url": doc_url, "key": "n", "value": 2}))
        .await;
    let heads = laptop.call(json!({"cmd": "doc", "url": doc_url})).await["heads"].clone();
    phone
        .expect(WAIT, |v| {
            v["event"] == "remote-heads"
                && v["url"] == doc_url.as_str()
                && v["storageId"] == laptop_storage.as_str()
                && v["heads"] == heads
        })
        .await;

    // A sheaf client (a storage of its own) edits the note: a phone subscribed to it hears.
    let sheaf = peer_repo();
    sheaf.connect(&url).unwrap();
    let id: sheafdb::AutomergeUrl = doc_url.parse().unwrap();
    let h = timeout(WAIT, sheaf.find(id)).await.unwrap().unwrap();
    h.change(|tx| tx.put(ROOT, "n", 3_i64)).unwrap();
    wait_synced(&h).await;
    let sheaf_storage = sheaf.storage_id().as_str().to_string();
    phone
        .call(json!({"cmd": "subscribeRemotes", "storageIds": [sheaf_storage]}))
        .await;
    let sheaf_heads: Vec<String> = h.heads().iter().map(sheafdb::id::encode_head).collect();
    wait_sync_info(&mut phone, &doc_url, &sheaf_storage, &json!(sheaf_heads)).await;

    laptop.finish().await;
    phone.finish().await;
    relay.terminate().await;
}

/// The sheaf side of remote-heads gossip against the JS reference server (gossip on): a
/// sheaf repo subscribed to a JS laptop's storage id hears the laptop's heads of a note it
/// has open, as the laptop edits, through a hub that is not sheaf.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sheaf_repo_hears_a_js_devices_heads_through_the_js_sync_server() {
    common::js_dir(); // fails first, with what to run, if node or node_modules is missing
    let gossip = [("SHEAF_JS_GOSSIP", "1")];
    let mut server = JsProc::spawn_env("sync-server.mjs", &["60000"], &gossip).await;
    let listening = server.expect(WAIT, |v| v["event"] == "listening").await;
    let url = listening["url"].as_str().unwrap().to_string();
    let mut laptop = JsProc::spawn_env("client.mjs", &[&url, "js-laptop", "60000"], &gossip).await;
    laptop.expect(WAIT, |v| v["event"] == "ready").await;
    let laptop_storage = laptop.call(json!({"cmd": "storageId"})).await["storageId"]
        .as_str()
        .expect("the laptop has a storage id")
        .to_string();
    let laptop_storage = sheafdb::StorageId::new(laptop_storage);

    let phone = peer_repo();
    phone
        .subscribe_remote_heads([laptop_storage.clone()])
        .unwrap();
    phone.connect(&url).unwrap();

    let created = laptop
        .call(json!({"cmd": "create", "init": {"n": 1}}))
        .await;
    let doc_url = created["url"].as_str().unwrap().to_string();
    // The JS server asks nobody for a note it lacks: find it once the server has it.
    let deadline = Instant::now() + WAIT;
    while server
        .try_call(&mut json!({"cmd": "find", "url": doc_url, "timeoutMs": 500}))
        .await["ok"]
        != true
    {
        assert!(
            Instant::now() < deadline,
            "the JS server never got the note"
        );
        sleep(Duration::from_millis(100)).await;
    }
    let id: sheafdb::AutomergeUrl = doc_url.parse().unwrap();
    let h = timeout(WAIT, phone.find(id)).await.unwrap().unwrap();

    for n in 2..4 {
        laptop
            .call(json!({"cmd": "put", "url": doc_url, "key": "n", "value": n}))
            .await;
        let hex = laptop.call(json!({"cmd": "doc", "url": doc_url})).await["hexHeads"].clone();
        let want: Vec<String> = serde_json::from_value(hex).unwrap();
        let mut w = h.remote_heads();
        let heard = timeout(WAIT, async {
            loop {
                let got: Option<Vec<String>> = w
                    .borrow_and_update()
                    .get(&laptop_storage)
                    .map(|r| r.heads.iter().map(|h| h.to_string()).collect());
                if got.as_ref() == Some(&want) {
                    return;
                }
                w.changed().await.unwrap();
            }
        })
        .await;
        assert!(
            heard.is_ok(),
            "the laptop's heads {want:?} never reached the sheaf handle: {:?}",
            h.remote_heads().borrow().get(&laptop_storage)
        );
    }

    laptop.finish().await;
    server.finish().await;
}

/// Versioned URLs (`automerge:<id>#<head>|...`) name the same version on both sides: a JS
/// view's URL finds that version in sheaf, and a sheaf view's URL in JS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_versioned_url_names_the_same_version_in_js_and_sheaf() {
    common::js_dir(); // fails first, with what to run, if node or node_modules is missing
    let data = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(data.path(), 0, &[]).await;
    let url = relay.url();
    let mut js = JsProc::spawn("client.mjs", &[&url, "js-versions", "60000"]).await;
    js.expect(WAIT, |v| v["event"] == "ready").await;
    let sheaf = peer_repo();
    sheaf.connect(&url).unwrap();

    let created = js.call(json!({"cmd": "create", "init": {"v": 1}})).await;
    let doc_url = created["url"].as_str().unwrap().to_string();
    let v1_url = js.call(json!({"cmd": "viewUrl", "url": doc_url})).await["url"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(v1_url.starts_with(&format!("{doc_url}#")), "{v1_url}");
    js.call(json!({"cmd": "put", "url": doc_url, "key": "v", "value": 2}))
        .await;

    let v1: sheafdb::AutomergeUrl = v1_url.parse().unwrap();
    let view = timeout(WAIT, sheaf.find(v1)).await.unwrap().unwrap();
    assert_eq!(view.to_json(), json!({"v": 1}));
    assert_eq!(
        view.url().to_string(),
        v1_url,
        "the same URL for the same version"
    );

    let id: sheafdb::AutomergeUrl = doc_url.parse().unwrap();
    let h = timeout(WAIT, sheaf.find(id)).await.unwrap().unwrap();
    wait_json(&h, "v = 2", |j| j["v"] == 2).await;
    h.change(|tx| tx.put(ROOT, "v", 3_i64)).unwrap();
    let v3_url = h.view(&h.heads()).unwrap().url().to_string();
    h.change(|tx| tx.put(ROOT, "v", 4_i64)).unwrap();
    js.call(json!({"cmd": "waitDoc", "url": doc_url, "doc": {"v": 4}}))
        .await;
    let found = js.call(json!({"cmd": "find", "url": v3_url})).await;
    assert_eq!(found["doc"], json!({"v": 3}), "{found}");

    js.finish().await;
    relay.terminate().await;
}
