//! Presence end to end: sheaf repos through an in-process relay (peers see each other,
//! updates arrive, late joiners catch up, goodbyes and silent peers are forgotten, other
//! ephemeral messages pass through), and the real automerge-repo 2.5.6 JS `Presence` class
//! through the `sheaf-relay` binary, both ways (needs `node` and `npm ci --prefix tests/js`;
//! fails with that instruction otherwise). Every wait is bounded.

mod common;

use std::time::Duration;

use common::{JsProc, RelayProc, WAIT};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sheafdb::repo::presence::wire;
use sheafdb::repo::{PeerSet, PresenceConfig};
use sheafdb::{DocHandle, PeerId, Repo, RepoConfig};
use tokio::sync::watch;
use tokio::time::{sleep, timeout, Instant};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Me {
    user: String,
    color: String,
    cursor: Option<u32>,
}

fn me(user: &str, color: &str) -> Me {
    Me {
        user: user.into(),
        color: color.into(),
        cursor: None,
    }
}

fn peer_repo() -> Repo {
    Repo::temporary(RepoConfig {
        find_timeout: WAIT,
        ..RepoConfig::default()
    })
    .unwrap()
}

const FAST: PresenceConfig = PresenceConfig {
    heartbeat: Duration::from_millis(300),
    ttl: Duration::from_millis(1_500),
    announce_delay: Duration::from_millis(50),
    max_peers: 16,
};

/// Wait (bounded) until the peer set satisfies `pred`; returns that set.
async fn until<T: Clone + std::fmt::Debug>(
    rx: &mut watch::Receiver<PeerSet<T>>,
    what: &str,
    pred: impl FnMut(&PeerSet<T>) -> bool,
) -> PeerSet<T> {
    let r = match timeout(WAIT, rx.wait_for(pred)).await {
        Ok(Ok(set)) => Some(set.clone()),
        Ok(Err(_)) => panic!("presence ended while waiting for {what}"),
        Err(_) => None,
    };
    r.unwrap_or_else(|| panic!("{what}: not within {WAIT:?}; set is {:?}", *rx.borrow()))
}

fn state_of<'a>(set: &'a PeerSet<Me>, peer: &PeerId) -> Option<&'a Me> {
    set.peers.get(peer).map(|p| &p.state)
}

/// A note created on the first repo and found by the others.
async fn shared_note(repos: &[&Repo]) -> Vec<DocHandle> {
    let first = repos[0].create().await.unwrap();
    let mut handles = vec![first.clone()];
    for r in &repos[1..] {
        handles.push(timeout(WAIT, r.find(first.id())).await.unwrap().unwrap());
    }
    handles
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_see_each_other_updates_arrive_and_a_disconnected_peer_expires() {
    let (url, _relay, _stop) = common::in_process_relay().await;
    let (a, b, c) = (peer_repo(), peer_repo(), peer_repo());
    a.connect(&url).unwrap();
    b.connect(&url).unwrap();
    let c_conn = c.connection(&url).unwrap();
    let notes = shared_note(&[&a, &b, &c]).await;

    let pa = notes[0].presence_with(me("ada", "red"), FAST).unwrap();
    let pb = notes[1].presence_with(me("bob", "blue"), FAST).unwrap();
    let pc = notes[2].presence_with(me("cy", "green"), FAST).unwrap();
    let (ida, idb, idc) = (
        a.peer_id().clone(),
        b.peer_id().clone(),
        c.peer_id().clone(),
    );

    // Everyone sees the two others, with their states; never themselves.
    for (p, others) in [
        (&pa, [(&idb, "bob"), (&idc, "cy")]),
        (&pb, [(&ida, "ada"), (&idc, "cy")]),
        (&pc, [(&ida, "ada"), (&idb, "bob")]),
    ] {
        let mut rx = p.watch();
        let set = until(&mut rx, "both other peers", |s| {
            others
                .iter()
                .all(|(id, user)| state_of(s, id).is_some_and(|m| m.user == *user))
        })
        .await;
        assert_eq!(set.peers.len(), 2);
        assert!(!set.peers.contains_key(&set.me));
        assert_eq!(&set.me, p.peer_id());
    }
    assert_eq!(pa.local(), me("ada", "red"));

    // An update reaches both others.
    pa.modify(|s| s.cursor = Some(42)).unwrap();
    assert_eq!(
        pa.watch().borrow().local.cursor,
        Some(42),
        "own state at once"
    );
    for p in [&pb, &pc] {
        let mut rx = p.watch();
        let set = until(&mut rx, "ada's cursor", |s| {
            state_of(s, &ida).is_some_and(|m| m.cursor == Some(42))
        })
        .await;
        let ada = &set.peers[&ida];
        assert!(ada.last_active <= ada.last_seen);
    }

    // c's network goes away without a goodbye (its presence lives on, unheard): a and b
    // forget it once the TTL has passed since they last heard from it, not before.
    let gone_at = Instant::now();
    c_conn.disconnect().await;
    for p in [&pa, &pb] {
        let mut rx = p.watch();
        until(&mut rx, "c expired", |s| !s.peers.contains_key(&idc)).await;
    }
    let took = gone_at.elapsed();
    assert!(
        took >= FAST.ttl / 2,
        "c vanished after {took:?}: sooner than a TTL could explain"
    );
    // Heartbeats keep a and b alive for each other well past a TTL.
    sleep(FAST.ttl * 2).await;
    assert_eq!(
        state_of(&pa.watch().borrow(), &idb).map(|m| m.user.clone()),
        Some("bob".to_string())
    );
    assert_eq!(
        state_of(&pb.watch().borrow(), &ida).map(|m| m.cursor),
        Some(Some(42))
    );
    drop(pc);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn goodbye_on_leave_and_on_drop_removes_a_peer_at_once() {
    let (url, _relay, _stop) = common::in_process_relay().await;
    let (a, b) = (peer_repo(), peer_repo());
    a.connect(&url).unwrap();
    b.connect(&url).unwrap();
    let notes = shared_note(&[&a, &b]).await;
    // A TTL far longer than the test: only a goodbye can remove a peer this fast.
    let slow = PresenceConfig {
        ttl: Duration::from_secs(60),
        ..FAST
    };
    let pa = notes[0].presence_with(me("ada", "red"), slow).unwrap();
    let mut rx = pa.watch();
    let idb = b.peer_id().clone();

    let pb = notes[1].presence_with(me("bob", "blue"), slow).unwrap();
    until(&mut rx, "bob", |s| s.peers.contains_key(&idb)).await;
    let t = Instant::now();
    pb.leave().await.unwrap();
    until(&mut rx, "bob gone after leave()", |s| s.peers.is_empty()).await;
    assert!(t.elapsed() < Duration::from_secs(10));

    // Back (a new presence for the same peer), then dropped: the drop says goodbye too.
    let pb = notes[1].presence_with(me("bob", "teal"), slow).unwrap();
    until(&mut rx, "bob back", |s| {
        state_of(s, &idb).is_some_and(|m| m.color == "teal")
    })
    .await;
    drop(pb);
    until(&mut rx, "bob gone after drop", |s| s.peers.is_empty()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_joiner_learns_existing_states_without_waiting_for_a_heartbeat() {
    let (url, _relay, _stop) = common::in_process_relay().await;
    let (a, b) = (peer_repo(), peer_repo());
    a.connect(&url).unwrap();
    b.connect(&url).unwrap();
    let notes = shared_note(&[&a, &b]).await;
    // Heartbeats every 30 s: within this test only announcements can carry states.
    let rare = PresenceConfig {
        heartbeat: Duration::from_secs(30),
        ttl: Duration::from_secs(90),
        announce_delay: Duration::from_millis(50),
        ..PresenceConfig::default()
    };
    let pa = notes[0].presence_with(me("ada", "red"), rare).unwrap();
    // a's first snapshot went out before b had a presence: b missed it.
    sleep(Duration::from_millis(300)).await;
    let t = Instant::now();
    let pb = notes[1].presence_with(me("bob", "blue"), rare).unwrap();
    let ida = a.peer_id().clone();
    let idb = b.peer_id().clone();
    let mut rb = pb.watch();
    until(&mut rb, "ada, answered to bob's arrival", |s| {
        state_of(s, &ida).is_some_and(|m| m.user == "ada")
    })
    .await;
    let mut ra = pa.watch();
    until(&mut ra, "bob", |s| s.peers.contains_key(&idb)).await;
    assert!(t.elapsed() < rare.heartbeat / 2, "took {:?}", t.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_ephemeral_messages_pass_through_and_bad_presence_is_ignored() {
    let (url, _relay, _stop) = common::in_process_relay().await;
    let (a, b) = (peer_repo(), peer_repo());
    a.connect(&url).unwrap();
    b.connect(&url).unwrap();
    let notes = shared_note(&[&a, &b]).await;
    let (ha, hb) = (&notes[0], &notes[1]);
    let pa = ha.presence_with(me("ada", "red"), FAST).unwrap();
    let mut raw = ha.ephemeral();
    let mut rx = pa.watch();
    let idb = b.peer_id().clone();

    // b is not a `Presence`, just an app broadcasting by hand: garbage, another app's
    // message, a presence message of an unknown type, and a state that is not a `Me`.
    let cbor = |v: &ciborium::Value| {
        let mut out = Vec::new();
        ciborium::into_writer(v, &mut out).unwrap();
        out
    };
    let t = |s: &str| ciborium::Value::Text(s.into());
    let chat = cbor(&ciborium::Value::Map(vec![(t("chat"), t("hi"))]));
    let bad_type = cbor(&ciborium::Value::Map(vec![(
        t("__presence"),
        ciborium::Value::Map(vec![(t("type"), t("dance"))]),
    )]));
    let not_me = wire::encode(&wire::Wire::Snapshot(
        [("user".to_string(), ciborium::Value::Integer(5.into()))].into(),
    ));
    let payloads = [vec![0xff, 0x00, 0x13], chat.clone(), bad_type, not_me];
    // Repeat until the relay has both peers attached and a's raw channel shows them all.
    let deadline = Instant::now() + WAIT;
    let mut seen = Vec::new();
    while !payloads.iter().all(|p| seen.contains(p)) {
        assert!(Instant::now() < deadline, "a saw only {seen:?}");
        for p in &payloads {
            hb.broadcast(p.clone()).unwrap();
        }
        while let Ok(Ok((from, data))) = timeout(Duration::from_millis(200), raw.recv()).await {
            if from == idb {
                seen.push(data);
            }
        }
    }
    // None of it made b a peer (its one presence state does not decode as `Me`).
    assert!(pa.peers().is_empty(), "{:?}", pa.peers());

    // A good snapshot then makes b appear: the presence task survived all of the above.
    let good = wire::encode(&wire::Wire::Snapshot(
        [
            ("user".to_string(), t("bob")),
            ("color".to_string(), t("blue")),
            ("cursor".to_string(), ciborium::Value::Integer(3.into())),
            ("extra".to_string(), t("ignored by serde")),
        ]
        .into(),
    ));
    let deadline = Instant::now() + WAIT;
    loop {
        hb.broadcast(good.clone()).unwrap();
        if timeout(
            Duration::from_millis(300),
            rx.wait_for(|s| !s.peers.is_empty()),
        )
        .await
        .is_ok()
        {
            break;
        }
        assert!(Instant::now() < deadline, "b never appeared");
    }
    assert_eq!(
        pa.peers()[&idb].state,
        Me {
            user: "bob".into(),
            color: "blue".into(),
            cursor: Some(3)
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_states_must_be_maps_and_timings_sane() {
    let repo = peer_repo();
    let h = repo.create().await.unwrap();
    let e = h.presence(5u32).unwrap_err();
    assert!(e.to_string().contains("map"), "{e}");
    let e = h.presence(vec!["a".to_string()]).unwrap_err();
    assert!(e.to_string().contains("map"), "{e}");
    let bad = PresenceConfig {
        ttl: Duration::from_millis(100),
        ..FAST
    };
    assert!(h.presence_with(me("a", "b"), bad).is_err());
    let p = h.presence(me("a", "b")).unwrap();
    p.set(me("a", "c")).unwrap();
    assert_eq!(p.local().color, "c");
    p.leave().await.unwrap();
}

// ---- the real JS `Presence` class, through sheaf-relay ----------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_presence_and_sheaf_presence_see_each_other_through_sheaf_relay() {
    common::js_dir(); // fails first, with what to run, if node or node_modules is missing
    let data = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(data.path(), 0, &[]).await;
    let url = relay.url();
    let sheaf = peer_repo();
    sheaf.connect(&url).unwrap();
    let h = sheaf.create().await.unwrap();
    let doc_url = h.url().to_string();
    let mut js = JsProc::spawn("presence.mjs", &[&url, "js-ada", "60000"]).await;
    js.expect(WAIT, |v| v["event"] == "ready").await;
    js.call(json!({"cmd": "find", "url": doc_url})).await;

    // A TTL of 8 s on our side: removals within 3 s below are goodbyes, not expiry.
    let config = PresenceConfig {
        heartbeat: Duration::from_millis(300),
        ttl: Duration::from_secs(8),
        announce_delay: Duration::from_millis(50),
        ..PresenceConfig::default()
    };
    let ours = h.presence_with(me("bob", "blue"), config).unwrap();
    let me_id = sheaf.peer_id().as_str().to_string();
    let js_id = PeerId::new("js-ada");
    js.call(
        json!({"cmd": "start", "heartbeatMs": 300, "peerTtlMs": 5000,
        "initialState": {"user": "ada", "color": "red", "cursor": 3}}),
    )
    .await;

    // JS -> sheaf: the snapshot of `start`.
    let mut rx = ours.watch();
    until(&mut rx, "the JS peer", |s| {
        state_of(s, &js_id)
            == Some(&Me {
                user: "ada".into(),
                color: "red".into(),
                cursor: Some(3),
            })
    })
    .await;
    // sheaf -> JS: our state in the JS class's peer states.
    let states = js_states_until(&mut js, |st| st[&me_id]["value"]["user"] == "bob").await;
    assert_eq!(
        states[&me_id]["value"],
        json!({"user": "bob", "color": "blue", "cursor": null})
    );

    // JS `presence.broadcast("cursor", 9)` (an update of one channel) -> sheaf.
    js.call(json!({"cmd": "set", "channel": "cursor", "value": 9}))
        .await;
    until(&mut rx, "the JS cursor update", |s| {
        state_of(s, &js_id).is_some_and(|m| m.cursor == Some(9) && m.user == "ada")
    })
    .await;

    // sheaf cursor change -> a JS "update" event on channel "cursor".
    ours.modify(|s| s.cursor = Some(4)).unwrap();
    let ev = js
        .expect(WAIT, |v| {
            v["event"] == "presence" && v["kind"] == "update" && v["value"] == 4
        })
        .await;
    assert_eq!(ev["peerId"], json!(me_id));
    assert_eq!(ev["channel"], json!("cursor"));
    // ... and the raw `ephemeral-message` a JS app sees is the plain documented map.
    let raw = js
        .expect(WAIT, |v| {
            v["event"] == "ephemeral" && v["message"]["__presence"]["type"] == "update"
        })
        .await;
    assert_eq!(
        raw["message"],
        json!({"__presence": {"type": "update", "channel": "cursor", "value": 4}})
    );
    assert_eq!(raw["senderId"], json!(me_id));
    // Heartbeats (whole snapshots) keep flowing to JS.
    js.expect(WAIT, |v| {
        v["event"] == "presence" && v["kind"] == "snapshot" && v["state"]["cursor"] == 4
    })
    .await;

    // A hand-rolled `handle.broadcast({...})` from JS in the documented shape, another
    // app's message and a malformed presence message: the first counts, the others are
    // left alone (the second still reaches `DocHandle::ephemeral`).
    let mut eph = h.ephemeral();
    js.call(json!({"cmd": "raw", "message": {"chat": "hello"}}))
        .await;
    js.call(json!({"cmd": "raw", "message": {"__presence": {"type": "dance"}}}))
        .await;
    js.call(
        json!({"cmd": "raw", "message": {"__presence": {"type": "snapshot",
        "state": {"user": "ada (by hand)", "color": "green", "cursor": 1}}}}),
    )
    .await;
    until(&mut rx, "the hand-rolled snapshot", |s| {
        state_of(s, &js_id).is_some_and(|m| m.user == "ada (by hand)" && m.cursor == Some(1))
    })
    .await;
    let deadline = Instant::now() + WAIT;
    loop {
        let (from, data) = timeout(deadline - Instant::now(), eph.recv())
            .await
            .expect("the chat message reaches DocHandle::ephemeral")
            .unwrap();
        if from == js_id && wire::decode(&data) == wire::Decoded::NotPresence {
            let v: ciborium::Value = ciborium::from_reader(&data[..]).unwrap();
            assert_eq!(
                v,
                ciborium::Value::Map(vec![(
                    ciborium::Value::Text("chat".into()),
                    ciborium::Value::Text("hello".into())
                )])
            );
            break;
        }
    }

    // sheaf leaves: JS gets the goodbye and forgets us.
    ours.leave().await.unwrap();
    let bye = js
        .expect(WAIT, |v| v["event"] == "presence" && v["kind"] == "goodbye")
        .await;
    assert_eq!(bye["peerId"], json!(me_id));
    js_states_until(&mut js, |st| st.get(&me_id).is_none()).await;

    // sheaf comes back with a new presence: JS, hearing from a peer it does not know,
    // announces its own `Presence` state (the hand-rolled message did not change that), so we
    // learn it without any JS call.
    let ours = h.presence_with(me("bob", "navy"), config).unwrap();
    let mut rx = ours.watch();
    until(&mut rx, "the JS peer again", |s| {
        state_of(s, &js_id)
            == Some(&Me {
                user: "ada".into(),
                color: "red".into(),
                cursor: Some(9),
            })
    })
    .await;
    js_states_until(&mut js, |st| st[&me_id]["value"]["color"] == "navy").await;

    // JS stops: its goodbye removes it from our set at once (well before our 8 s TTL).
    let t = Instant::now();
    js.call(json!({"cmd": "stop"})).await;
    until(&mut rx, "the JS peer gone", |s| s.peers.is_empty()).await;
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "took {:?}",
        t.elapsed()
    );

    js.finish().await;
    relay.terminate().await;
}

/// Ask the JS client for its `getPeerStates()` until `pred` holds (bounded).
async fn js_states_until(
    js: &mut JsProc,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let st = js.call(json!({"cmd": "states"})).await["states"].clone();
        if pred(&st) {
            return st;
        }
        assert!(Instant::now() < deadline, "JS peer states stayed {st}");
        sleep(Duration::from_millis(50)).await;
    }
}
