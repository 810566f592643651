//! Faults around the relay: kill -9 right after acknowledged changes, clients dropping and
//! reconnecting while editing, and bad input from raw WebSocket clients against the real
//! `sheaf-relay` binary. Every wait is bounded; every loop is bounded in count.

mod common;

use std::time::Duration;

use automerge::transaction::Transactable;
use automerge::{ObjType, ReadDoc, ROOT};
use common::{RelayProc, WAIT};
use futures::{SinkExt, StreamExt};
use rand::{Rng, SeedableRng};
use serde_json::Value;
use sheafdb::engine::PeerSyncStatus;
use sheafdb::protocol::{self, Message, PeerMetadata};
use sheafdb::{DocHandle, DocumentId, PeerId, Repo, RepoConfig};
use tokio::net::TcpStream;
use tokio::time::{sleep, timeout, Instant};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

fn peer_repo() -> Repo {
    Repo::temporary(RepoConfig {
        find_timeout: WAIT,
        ..RepoConfig::default()
    })
    .unwrap()
}

/// Wait until the relay (our only peer) says it has every change we have: `Synced` means
/// it advertised heads equal to ours, and the relay persists before it advertises.
async fn acknowledged(h: &DocHandle) {
    let mut st = h.sync_status();
    let r = timeout(
        WAIT,
        st.wait_for(|m| !m.is_empty() && m.values().all(|s| *s == PeerSyncStatus::Synced)),
    )
    .await;
    if r.is_err() {
        panic!(
            "relay did not acknowledge {} in {WAIT:?}: status {:?}",
            h.id(),
            *h.sync_status().borrow()
        );
    }
}

/// Wait until the handle's JSON equals `want`.
async fn wait_json(h: &DocHandle, want: &Value) {
    let mut changes = h.changes();
    let deadline = Instant::now() + WAIT;
    while h.to_json() != *want {
        if tokio::time::timeout_at(deadline, changes.next())
            .await
            .is_err()
        {
            panic!("never got\n {want}\nhave\n {}", h.to_json());
        }
    }
}

fn append(h: &DocHandle, s: &str) {
    h.change(|tx| {
        let t = match tx.get(ROOT, "text")? {
            Some((_, t)) => t,
            None => tx.put_object(ROOT, "text", ObjType::Text)?,
        };
        let len = tx.length(&t);
        tx.splice_text(&t, len, 0, s)
    })
    .unwrap();
}

// ---------------------------------------------------------------------------------------
// kill -9

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_after_acknowledgement_loses_no_acknowledged_change() {
    let data = tempfile::tempdir().unwrap();
    let mut relay = RelayProc::start(data.path(), 0, &[]).await;
    let mut docs: Vec<(DocumentId, Value)> = Vec::new();
    for cycle in 0..4 {
        // A writer edits every known note and creates one more, then waits for the acks.
        let writer = peer_repo();
        writer.connect(&relay.url()).unwrap();
        let mut handles = Vec::new();
        for (id, want) in &docs {
            let h = timeout(WAIT, writer.find(*id)).await.unwrap().unwrap();
            wait_json(&h, want).await;
            handles.push(h);
        }
        handles.push(writer.create().await.unwrap());
        for h in &handles {
            for i in 0..15 {
                append(h, &format!("c{cycle}e{i} "));
                h.change(|tx| tx.put(ROOT, format!("c{cycle}"), i as i64))
                    .unwrap();
            }
        }
        for h in &handles {
            acknowledged(h).await;
        }
        docs = handles.iter().map(|h| (h.id(), h.to_json())).collect();
        // No graceful anything: SIGKILL right after the acknowledgement.
        relay.kill9().await;
        drop(handles);
        writer.shutdown().unwrap();

        relay = RelayProc::start(data.path(), 0, &[]).await;
        // What the relay acknowledged since its last open was in its commit log, and the
        // restart replayed it (an operator sees that in /metrics).
        let (_, _, metrics) = common::http(relay.addr, "GET", "/metrics").await;
        let replayed: f64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix("sheaf_storage_replayed_records_total "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no replayed-records series in\n{metrics}"));
        assert!(
            replayed > 0.0,
            "cycle {cycle}: nothing replayed after kill -9"
        );
        let reader = peer_repo();
        reader.connect(&relay.url()).unwrap();
        for (id, want) in &docs {
            let h = timeout(WAIT, reader.find(*id))
                .await
                .unwrap()
                .unwrap_or_else(|e| panic!("cycle {cycle}: {id} lost after kill -9: {e}"));
            wait_json(&h, want).await;
        }
        reader.shutdown().unwrap();
    }
    relay.terminate().await;
}

// ---------------------------------------------------------------------------------------
// flapping clients

/// At the default log level the relay logs as it starts. Logs go to stderr, so the first line
/// on stdout is still the address a supervisor or script reads (`RelayProc` fails to start the
/// relay otherwise).
#[tokio::test]
async fn logs_go_to_stderr_and_stdout_starts_with_the_address() {
    let data = tempfile::tempdir().unwrap();
    let relay = RelayProc::start_with_log(data.path(), "info").await;
    let (status, _, body) = common::http(relay.addr, "GET", "/health").await;
    assert_eq!((status, body.as_str()), (200, "ok"));
    relay.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_drop_and_reconnect_while_editing_converge() {
    const CLIENTS: usize = 3;
    const EDITS: usize = 30;
    let (url, _relay, _stop) = common::in_process_relay().await;
    let repos: Vec<Repo> = (0..CLIENTS).map(|_| peer_repo()).collect();
    let first = repos[0].create().await.unwrap();
    append(&first, "start ");
    let id = first.id();
    let c0 = repos[0].connection(&url).unwrap();
    acknowledged(&first).await;
    drop(c0);

    let mut tasks = Vec::new();
    for (n, repo) in repos.iter().cloned().enumerate() {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(7 + n as u64);
            let mut conn = Some(repo.connection(&url).unwrap());
            let h = timeout(WAIT, repo.find(id)).await.unwrap().unwrap();
            let mut disconnects = 0;
            let mut inserted = 0;
            for i in 0..EDITS {
                if rng.gen_bool(0.5) {
                    let s = format!("{n}.{i} ");
                    inserted += s.len();
                    append(&h, &s);
                } else {
                    let s = format!("<{n}.{i}>");
                    inserted += s.len();
                    h.change(|tx| {
                        let (_, t) = tx.get(ROOT, "text")?.unwrap();
                        let at = rng.gen_range(0..=tx.length(&t));
                        tx.splice_text(&t, at, 0, &s)
                    })
                    .unwrap();
                }
                h.change(|tx| tx.put(ROOT, format!("k{n}_{i}"), i as i64))
                    .unwrap();
                match (&conn, rng.gen_range(0..10)) {
                    (Some(_), 0..=1) => {
                        conn.take().unwrap().disconnect().await;
                        disconnects += 1;
                    }
                    (None, 0..=3) => conn = Some(repo.connection(&url).unwrap()),
                    _ => {}
                }
                sleep(Duration::from_millis(rng.gen_range(0..30))).await;
            }
            if conn.is_none() {
                conn = Some(repo.connection(&url).unwrap());
            }
            (h, conn, disconnects, inserted)
        }));
    }
    let mut handles = Vec::new();
    let mut conns = Vec::new();
    let mut total_disconnects = 0;
    let mut total_len = "start ".len();
    for t in tasks {
        let (h, c, d, len) = timeout(Duration::from_secs(30), t).await.unwrap().unwrap();
        handles.push(h);
        conns.push(c);
        total_disconnects += d;
        total_len += len;
    }
    assert!(total_disconnects > 0, "the test should disconnect someone");

    // Converge: same heads everywhere, every edit present.
    let deadline = Instant::now() + WAIT;
    loop {
        let heads: Vec<_> = handles
            .iter()
            .map(|h| {
                let mut v = h.heads();
                v.sort();
                v
            })
            .collect();
        if heads.iter().all(|x| *x == heads[0]) {
            break;
        }
        assert!(Instant::now() < deadline, "clients did not converge");
        sleep(Duration::from_millis(50)).await;
    }
    let json = handles[0].to_json();
    for h in &handles[1..] {
        assert_eq!(h.to_json(), json);
    }
    for n in 0..CLIENTS {
        for i in 0..EDITS {
            assert_eq!(json[format!("k{n}_{i}")], i as i64, "{json}");
        }
    }
    // Every character typed anywhere is in the text (random inserts interleave, so count).
    assert_eq!(json["text"].as_str().unwrap().len(), total_len, "{json}");
    eprintln!("{total_disconnects} disconnects");
}

// ---------------------------------------------------------------------------------------
// bad input from raw clients against the real binary

async fn raw(url: &str) -> Ws {
    let (ws, _) = timeout(WAIT, tokio_tungstenite::connect_async(url))
        .await
        .expect("connect in time")
        .expect("connect");
    ws
}

async fn send(ws: &mut Ws, msg: &Message) {
    ws.send(WsMessage::Binary(protocol::encode(msg)))
        .await
        .unwrap();
}

/// Join as `peer` and wait for the relay's `peer` answer.
async fn join(url: &str, peer: &str) -> Ws {
    let mut ws = raw(url).await;
    send(
        &mut ws,
        &Message::Join {
            sender_id: PeerId::new(peer),
            peer_metadata: PeerMetadata::default(),
            supported_protocol_versions: vec!["1".into()],
        },
    )
    .await;
    let deadline = Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(WsMessage::Binary(b)))) => {
                if let Ok(Message::Peer { .. }) = protocol::decode(&b) {
                    return ws;
                }
            }
            Ok(Some(Ok(_))) => {}
            other => panic!("no `peer` answer to join: {other:?}"),
        }
    }
}

/// Read until the relay closes: its close code and reason, and any `error` message text.
async fn closed_with(ws: &mut Ws) -> (Option<CloseCode>, String, Vec<String>) {
    let mut errors = Vec::new();
    let deadline = Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(WsMessage::Binary(b)))) => {
                if let Ok(Message::Error { message, .. }) = protocol::decode(&b) {
                    errors.push(message);
                }
            }
            Ok(Some(Ok(WsMessage::Close(frame)))) => {
                return match frame {
                    Some(f) => (Some(f.code), f.reason.to_string(), errors),
                    None => (None, String::new(), errors),
                };
            }
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(e))) => return (None, format!("error: {e}"), errors),
            Ok(None) => return (None, "stream ended".into(), errors),
            Err(_) => panic!("relay did not close the offending connection in time"),
        }
    }
}

/// A well-behaved sheaf pair still syncs through the relay: returns the new note's id and
/// content.
async fn still_works(url: &str, tag: &str) -> (DocumentId, Value) {
    let a = peer_repo();
    let b = peer_repo();
    a.connect(url).unwrap();
    b.connect(url).unwrap();
    let h = a.create().await.unwrap();
    append(&h, tag);
    acknowledged(&h).await;
    let hb = timeout(WAIT, b.find(h.id()))
        .await
        .expect("find in time")
        .expect("found after bad input");
    let want = h.to_json();
    wait_json(&hb, &want).await;
    (h.id(), want)
}

/// A sync message for a fresh document whose change bytes are corrupted: a real message
/// from a real doc, with bytes in the middle of the change flipped.
fn corrupt_sync_message() -> Vec<u8> {
    use automerge::sync::{State, SyncDoc};
    let mut doc = automerge::AutoCommit::new();
    let t = doc.put_object(ROOT, "text", ObjType::Text).unwrap();
    doc.splice_text(&t, 0, 0, &"x".repeat(200)).unwrap();
    let mut ours = State::new();
    let mut theirs = State::new();
    let mut empty = automerge::AutoCommit::new();
    // Let the empty side speak first so the answer carries the changes.
    let first = empty.sync().generate_sync_message(&mut theirs).unwrap();
    doc.sync().receive_sync_message(&mut ours, first).unwrap();
    let msg = doc.sync().generate_sync_message(&mut ours).unwrap();
    assert!(!msg.changes.is_empty());
    let mut bytes = msg.encode();
    let n = bytes.len();
    for b in &mut bytes[n / 2..n / 2 + 16] {
        *b ^= 0x5a;
    }
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_closes_only_the_offender_and_damages_nothing() {
    let data = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(data.path(), 0, &["--max-frame-bytes", "65536"]).await;
    let url = relay.url();
    let mut good: Vec<(DocumentId, Value)> = vec![still_works(&url, "before").await];

    // A bystander that stays connected through all of it.
    let bystander = peer_repo();
    bystander.connect(&url).unwrap();
    let bh = bystander.create().await.unwrap();
    append(&bh, "bystander ");
    acknowledged(&bh).await;

    // 1. malformed CBOR
    let mut ws = join(&url, "bad-cbor").await;
    ws.send(WsMessage::Binary(vec![0xff, 0x00, 0x13, 0x37]))
        .await
        .unwrap();
    let (code, reason, errors) = closed_with(&mut ws).await;
    assert_eq!(code, Some(CloseCode::Invalid), "{reason}");
    assert!(reason.contains("undecodable"), "{reason}");
    assert!(!errors.is_empty(), "an `error` message names the problem");

    // 2. well-formed CBOR that is not a message (no `type`), before any join
    let mut ws = raw(&url).await;
    let mut buf = Vec::new();
    minicbor::Encoder::new(&mut buf)
        .map(1)
        .unwrap()
        .str("hello")
        .unwrap()
        .u8(1)
        .unwrap();
    ws.send(WsMessage::Binary(buf)).await.unwrap();
    let (code, reason, _) = closed_with(&mut ws).await;
    assert_eq!(code, Some(CloseCode::Invalid), "{reason}");

    // 3. a text frame
    let mut ws = join(&url, "texter").await;
    ws.send(WsMessage::Text(r#"{"type":"join"}"#.into()))
        .await
        .unwrap();
    let (code, reason, _) = closed_with(&mut ws).await;
    assert_eq!(code, Some(CloseCode::Unsupported), "{reason}");
    assert!(reason.contains("text frames"), "{reason}");

    // 4. a sync message with corrupt change bytes, after a proper join
    let mut ws = join(&url, "corrupter").await;
    let bad_doc = DocumentId::random();
    send(
        &mut ws,
        &Message::Sync {
            sender_id: PeerId::new("corrupter"),
            target_id: PeerId::new("relay"),
            document_id: bad_doc,
            data: corrupt_sync_message(),
        },
    )
    .await;
    let (code, reason, errors) = closed_with(&mut ws).await;
    assert!(code.is_some(), "closed with a code: {reason}");
    assert!(
        errors
            .iter()
            .any(|e| e.contains("sync") || e.contains("change")),
        "error names the bad sync message: {errors:?} / {reason}"
    );

    // 5. a frame over --max-frame-bytes
    let mut ws = join(&url, "big").await;
    let _ = ws.send(WsMessage::Binary(vec![0u8; 200_000])).await;
    let (code, reason, _) = closed_with(&mut ws).await;
    assert_eq!(code, Some(CloseCode::Size), "{reason}");

    // 6. a message for a document before `join`
    let mut ws = raw(&url).await;
    send(
        &mut ws,
        &Message::Request {
            sender_id: PeerId::new("eager"),
            target_id: PeerId::new("relay"),
            document_id: good[0].0,
            data: vec![0x42],
        },
    )
    .await;
    let (code, reason, errors) = closed_with(&mut ws).await;
    assert!(
        errors.iter().any(|e| e.contains("before the handshake")),
        "{errors:?} / {code:?} {reason}"
    );

    good.push(still_works(&url, "after bad frames").await);

    // 7. a flood of connections (bounded): 200 sockets at once, half of them joined
    let mut flood = Vec::new();
    for i in 0..200 {
        let url = url.clone();
        flood.push(tokio::spawn(async move {
            if i % 2 == 0 {
                join(&url, &format!("flood-{i}")).await
            } else {
                raw(&url).await
            }
        }));
    }
    let mut sockets = Vec::new();
    for f in flood {
        sockets.push(timeout(WAIT, f).await.unwrap().unwrap());
    }
    good.push(still_works(&url, "during the flood").await);
    drop(sockets);
    good.push(still_works(&url, "after the flood").await);

    // The bystander was never disturbed.
    append(&bh, "still here");
    acknowledged(&bh).await;
    good.push((bh.id(), bh.to_json()));

    // Nothing stored is damaged: restart (gracefully) and load everything.
    relay.terminate().await;
    let relay = RelayProc::start(data.path(), 0, &[]).await;
    let reader = peer_repo();
    reader.connect(&relay.url()).unwrap();
    for (id, want) in &good {
        let h = timeout(WAIT, reader.find(*id)).await.unwrap().unwrap();
        wait_json(&h, want).await;
    }
    relay.terminate().await;
}

// ---------------------------------------------------------------------------------------
// sync status follows the relay

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_status_shows_the_relay_leaving_and_coming_back() {
    let data = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(data.path(), 0, &[]).await;
    let port = relay.addr.port();
    let a = peer_repo();
    let b = peer_repo();
    a.connect(&relay.url()).unwrap();
    b.connect(&relay.url()).unwrap();
    let ha = a.create().await.unwrap();
    append(&ha, "hello");
    acknowledged(&ha).await;
    // A handle found after the sync round finished still shows it (no further edit needed).
    let hb = timeout(WAIT, b.find(ha.id())).await.unwrap().unwrap();
    wait_json(&hb, &ha.to_json()).await;
    acknowledged(&hb).await;

    // The relay dies: the peer leaves the status map (no stale "Synced").
    relay.kill9().await;
    let mut st = ha.sync_status();
    timeout(WAIT, st.wait_for(|m| m.is_empty()))
        .await
        .expect("status map empties when the relay goes away")
        .unwrap();

    // It comes back: Synced again, with edits made meanwhile.
    append(&ha, " again");
    let relay = RelayProc::start(data.path(), port, &[]).await;
    acknowledged(&ha).await;
    wait_json(&hb, &ha.to_json()).await;
    relay.terminate().await;
}

// ---------------------------------------------------------------------------------------
// A bug in the engine

/// A panic in the relay's engine (a bug; injected here through the engine's clock, which it
/// reads when it applies remote changes) stops the repo instead of leaving a relay that
/// accepts sockets only to drop them: `engine_stopped` says why, `/health` answers 503,
/// calls fail with `EngineFailed`, and every change the relay acknowledged is on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_panic_stops_the_repo_fails_health_and_loses_nothing_acknowledged() {
    use sheafdb::engine::{CostClock, EngineConfig};
    use sheafdb::{EngineStop, RepoError};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let dir = tempfile::tempdir().unwrap();
    let armed = Arc::new(AtomicBool::new(false));
    let trip = armed.clone();
    let mut engine = EngineConfig::relay(PeerId::random(), None);
    engine.cost_clock = Some(CostClock(Arc::new(move || {
        assert!(!trip.load(Ordering::SeqCst), "injected engine bug");
        0
    })));
    let relay = Repo::open_with(
        dir.path(),
        RepoConfig {
            engine: Some(engine),
            ..RepoConfig::relay()
        },
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(sheafdb::relay::run(
        listener,
        relay.hub(),
        Default::default(),
        async {
            let _ = stopped.await;
        },
    ));
    let (status, _, body) = common::http(addr, "GET", "/health").await;
    assert_eq!((status, body.as_str()), (200, "ok"));

    let peer = peer_repo();
    peer.connect(&format!("ws://{addr}")).unwrap();
    let h = peer.create().await.unwrap();
    append(&h, "kept");
    acknowledged(&h).await;
    assert_eq!(relay.engine_stop(), None);

    armed.store(true, Ordering::SeqCst);
    append(&h, " and more");
    let stop_reason = timeout(WAIT, relay.engine_stopped())
        .await
        .expect("the engine stops");
    match &stop_reason {
        EngineStop::Panicked(why) => assert!(why.contains("injected engine bug"), "{why}"),
        other => panic!("stopped for another reason: {other:?}"),
    }
    let (status, _, body) = common::http(addr, "GET", "/health").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("injected engine bug"), "{body}");
    match relay.find(h.id()).await {
        Err(RepoError::EngineFailed(why)) => assert!(why.contains("injected engine bug")),
        Err(e) => panic!("another error: {e}"),
        Ok(_) => panic!("a dead engine answered a find"),
    }

    let _ = stop.send(());
    timeout(WAIT, server).await.unwrap().unwrap().unwrap();
    let id = h.id();
    drop(h);
    drop(peer);
    relay.shutdown().unwrap();
    drop(relay);
    // What the relay acknowledged survived it; what it panicked on was never applied.
    let reopened = Repo::open(dir.path()).unwrap();
    let note = reopened.find(id).await.unwrap();
    assert_eq!(note.to_json()["text"], "kept");
}

/// A peer whose engine panicked stops dialing the relay (its dead engine would drop every
/// socket at once, in a reconnect loop) and says so in its connection state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_whose_engine_panicked_stops_reconnecting() {
    use sheafdb::engine::{CostClock, EngineConfig};
    use sheafdb::net::client::ConnectionState;
    use sheafdb::EngineStop;
    use std::sync::Arc;

    let (url, _relay, _stop) = common::in_process_relay().await;
    let writer = peer_repo();
    writer.connect(&url).unwrap();
    let h = writer.create().await.unwrap();
    append(&h, "x");
    acknowledged(&h).await;

    // The engine reads this clock when it applies remote changes: the first copy of the note.
    let mut engine = EngineConfig::peer(PeerId::random(), None);
    engine.cost_clock = Some(CostClock(Arc::new(|| panic!("injected engine bug"))));
    let victim = Repo::temporary(RepoConfig {
        engine: Some(engine),
        find_timeout: WAIT,
        ..RepoConfig::default()
    })
    .unwrap();
    let mut state = victim.connect(&url).unwrap();
    timeout(WAIT, state.wait_for(|s| *s == ConnectionState::Connected))
        .await
        .unwrap()
        .unwrap();
    // The find that made it panic is answered with the reason.
    match victim.find(h.id()).await {
        Err(sheafdb::RepoError::EngineFailed(why)) => assert!(why.contains("injected")),
        Err(e) => panic!("another error: {e}"),
        Ok(_) => panic!("a dead engine found the note"),
    }
    let stop = timeout(WAIT, victim.engine_stopped()).await.unwrap();
    assert!(matches!(stop, EngineStop::Panicked(_)), "{stop:?}");
    timeout(WAIT, state.wait_for(|s| *s == ConnectionState::Stopped))
        .await
        .expect("the connection stops")
        .unwrap();
    // And stays stopped: no more dialing (the first retry would come within 100 ms).
    sleep(Duration::from_millis(500)).await;
    assert_eq!(*state.borrow(), ConnectionState::Stopped);
}

// ---------------------------------------------------------------------------------------
// A disk that fails

/// When the relay's storage fails (here a write over the file-size limit, as a full disk
/// fails), the relay neither hangs nor limps on acknowledging nothing: it exits with an
/// error, and what it acknowledged before is intact when it is started again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_whose_storage_fails_exits_and_keeps_what_it_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    // 512 KiB (or 1 MiB where sh is bash): the small note fits, the big one does not.
    let relay = RelayProc::start_with_file_limit(dir.path(), 1024).await;
    let writer = peer_repo();
    writer.connect(&relay.url()).unwrap();
    let small = writer.create().await.unwrap();
    append(&small, "kept");
    acknowledged(&small).await;

    // About 1.5 MB that does not compress: stored as one value over the limit.
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let alphabet: Vec<char> = ('0'..='9').chain('a'..='z').chain('A'..='Z').collect();
    let noise: String = (0..2_000_000)
        .map(|_| alphabet[rng.gen_range(0..alphabet.len())])
        .collect();
    let big = writer.create().await.unwrap();
    acknowledged(&big).await;
    append(&big, &noise);
    // From here on `Synced` would mean the relay acknowledged the noise it cannot store.
    let mut status = big.sync_status();
    let acked = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = acked.clone();
    let watcher = tokio::spawn(async move {
        while status.changed().await.is_ok() {
            if status
                .borrow()
                .values()
                .any(|s| *s == PeerSyncStatus::Synced)
            {
                flag.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
    });

    let mut relay = relay;
    let exit = timeout(Duration::from_secs(60), relay.child.wait())
        .await
        .expect("the relay exits once its storage fails (it must not hang)")
        .unwrap();
    assert!(
        !exit.success(),
        "a relay that cannot store exits with an error: {exit}"
    );
    watcher.abort();
    assert!(
        !acked.load(std::sync::atomic::Ordering::SeqCst),
        "the relay acknowledged a change it could not store"
    );

    let relay = RelayProc::start(dir.path(), 0, &[]).await;
    let reader = peer_repo();
    reader.connect(&relay.url()).unwrap();
    let h = reader.find(small.id()).await.unwrap();
    wait_json(&h, &serde_json::json!({ "text": "kept" })).await;
    relay.terminate().await;
}
