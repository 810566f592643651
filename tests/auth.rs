//! Access control and abuse limits of the relay, end to end over loopback WebSockets:
//! tokens refused at the door (forged, expired, unknown key, missing), valid tokens syncing,
//! documents outside a token answered with `doc-unavailable`, read-only peers whose changes
//! never land, rate limits that throttle and recover, the per-address cap, and the
//! per-connection document cap.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use automerge::sync::SyncDoc;
use automerge::transaction::Transactable;
use automerge::{ReadDoc, ROOT};
use futures::{SinkExt, StreamExt};
use sheafdb::auth::{Claims, DocScope, Key, Keyring};
use sheafdb::protocol::{self, Message, PeerMetadata, PROTOCOL_VERSION};
use sheafdb::relay::{Metrics, RateLimit, ServerConfig, IP_LIMIT_REASON};
use sheafdb::{ConnectOptions, ConnectionState, DocumentId, PeerId, Repo, RepoConfig, RepoError};
use tokio::time::{timeout, Instant};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message as Ws;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

const WAIT: Duration = Duration::from_secs(10);

fn keyring() -> Keyring {
    let mut k = Keyring::new();
    k.insert("old", Key::from_bytes([1; 32]));
    k.insert("new", Key::from_bytes([2; 32]));
    k
}

fn token(kid: &str, docs: DocScope, write: bool) -> String {
    keyring()
        .mint(&Claims::new(kid, docs, write, 3600))
        .unwrap()
}

fn only(doc: DocumentId) -> DocScope {
    DocScope::Docs(BTreeSet::from([doc]))
}

struct Relay {
    url: String,
    repo: Repo,
    metrics: Arc<Metrics>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn start_relay(config: ServerConfig) -> Relay {
    let repo = Repo::temporary(RepoConfig::relay()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let metrics = config.metrics.clone();
    let hub = repo.hub();
    tokio::spawn(async move {
        let _ = sheafdb::relay::run(listener, hub, config, async {
            let _ = stopped.await;
        })
        .await;
    });
    Relay {
        url,
        repo,
        metrics,
        _stop: stop,
    }
}

fn with_auth() -> ServerConfig {
    ServerConfig {
        auth: Some(Arc::new(keyring())),
        ..ServerConfig::default()
    }
}

async fn raw(url: &str) -> Socket {
    tokio_tungstenite::connect_async(url).await.unwrap().0
}

/// The next protocol message (skipping pings); panics on close or timeout.
async fn next_msg(ws: &mut Socket) -> Message {
    loop {
        match timeout(WAIT, ws.next()).await.expect("a message in time") {
            Some(Ok(Ws::Binary(b))) => return protocol::decode(&b).unwrap(),
            Some(Ok(Ws::Ping(_) | Ws::Pong(_))) => continue,
            other => panic!("expected a message, got {other:?}"),
        }
    }
}

/// The Close frame the server sends first.
async fn close_frame(ws: &mut Socket) -> (CloseCode, String) {
    loop {
        match timeout(WAIT, ws.next()).await.expect("a close in time") {
            Some(Ok(Ws::Close(Some(f)))) => return (f.code, f.reason.to_string()),
            Some(Ok(Ws::Ping(_) | Ws::Pong(_))) => continue,
            other => panic!("expected a Close frame, got {other:?}"),
        }
    }
}

async fn send(ws: &mut Socket, msg: &Message) {
    ws.send(Ws::Binary(protocol::encode(msg))).await.unwrap();
}

async fn join(ws: &mut Socket, name: &str) -> PeerId {
    send(
        ws,
        &Message::Join {
            sender_id: PeerId::new(name),
            peer_metadata: PeerMetadata {
                storage_id: None,
                is_ephemeral: true,
                accepts_unchecked: false,
            },
            supported_protocol_versions: vec![PROTOCOL_VERSION.to_string()],
        },
    )
    .await;
    match next_msg(ws).await {
        Message::Peer { sender_id, .. } => sender_id,
        other => panic!("expected peer, got {other:?}"),
    }
}

fn request(me: &str, relay: &PeerId, doc: DocumentId) -> Message {
    let data = automerge::Automerge::new()
        .generate_sync_message(&mut automerge::sync::State::new())
        .unwrap()
        .encode();
    Message::Request {
        sender_id: PeerId::new(me),
        target_id: relay.clone(),
        document_id: doc,
        data,
    }
}

/// A note on `relay` with some content.
/// A repo connected to `relay` with a token for `docs` (`write` or read-only).
fn client(relay: &Relay, docs: DocScope, write: bool) -> Repo {
    let repo = Repo::temporary(RepoConfig::default()).unwrap();
    repo.connect_with(&relay.url, ConnectOptions::token(token("new", docs, write)))
        .unwrap();
    repo
}

async fn note(repo: &Repo, text: &str) -> sheafdb::DocHandle {
    let h = repo.create().await.unwrap();
    h.change(|tx| tx.put(ROOT, "title", text)).unwrap();
    h.saved().await.unwrap();
    h
}

#[tokio::test]
async fn bad_tokens_are_refused_with_1008_and_a_reason() {
    let relay = start_relay(with_auth()).await;
    let doc = DocumentId::random();
    let mut forger = Keyring::new();
    forger.insert("new", Key::from_bytes([9; 32]));
    let forged = forger
        .mint(&Claims::new("new", DocScope::All, true, 3600))
        .unwrap();
    let mut stranger = Keyring::new();
    stranger.insert("gone", Key::from_bytes([1; 32]));
    let unknown = stranger
        .mint(&Claims::new("gone", DocScope::All, true, 3600))
        .unwrap();
    let mut expired = Claims::new("old", only(doc), true, 10);
    expired.exp = 1_000;
    let expired = keyring().mint(&expired).unwrap();

    let cases = [
        (String::new(), "no token", "auth_missing"),
        ("?token=garbage".to_owned(), "malformed", "auth_malformed"),
        (
            format!("?token={forged}"),
            "does not verify",
            "auth_bad_mac",
        ),
        (
            format!("?token={unknown}"),
            "unknown key id",
            "auth_unknown_key",
        ),
        (format!("?token={expired}"), "expired", "auth_expired"),
    ];
    for (query, reason, label) in cases {
        let mut ws = raw(&format!("{}/{query}", relay.url)).await;
        let (code, got) = close_frame(&mut ws).await;
        assert_eq!(code, CloseCode::Policy, "{query}");
        assert!(got.starts_with("unauthorized: "), "{got}");
        assert!(got.contains(reason), "{query}: {got}");
        assert_eq!(relay.metrics.connections_rejected.get(label), 1, "{label}");
    }
    assert_eq!(
        relay
            .metrics
            .connections_open
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );

    // Valid tokens, from either key of the ring, in the query or in a header.
    let mut ws = raw(&format!(
        "{}/?token={}",
        relay.url,
        token("old", only(doc), false)
    ))
    .await;
    join(&mut ws, "q").await;
    let mut req = relay.url.as_str().into_client_request().unwrap();
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", token("new", DocScope::All, true))
            .parse()
            .unwrap(),
    );
    let mut ws = tokio_tungstenite::connect_async(req).await.unwrap().0;
    join(&mut ws, "h").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_tokens_sync_and_uncovered_documents_are_unavailable() {
    let relay = start_relay(with_auth()).await;
    let writer = client(&relay, DocScope::All, true);
    let x = note(&writer, "x").await;
    let y = note(&writer, "y").await;
    // Wait until the relay stores both.
    for h in [&x, &y] {
        let mut st = h.sync_status();
        timeout(
            WAIT,
            st.wait_for(|m| {
                m.values()
                    .any(|s| *s == sheafdb::engine::PeerSyncStatus::Synced)
            }),
        )
        .await
        .unwrap()
        .unwrap();
    }

    // A token for x: x is served, y (which the relay has) looks like nobody has it.
    let mut ws = raw(&format!(
        "{}/?token={}",
        relay.url,
        token("old", only(x.id()), false)
    ))
    .await;
    let rp = join(&mut ws, "raw").await;
    send(&mut ws, &request("raw", &rp, y.id())).await;
    let started = Instant::now();
    match next_msg(&mut ws).await {
        Message::DocUnavailable { document_id, .. } => assert_eq!(document_id, y.id()),
        other => panic!("expected doc-unavailable for y, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "answered at once"
    );
    send(&mut ws, &request("raw", &rp, x.id())).await;
    match next_msg(&mut ws).await {
        Message::Sync { document_id, .. } => assert_eq!(document_id, x.id()),
        other => panic!("expected sync for x, got {other:?}"),
    }
    // Ephemeral messages for y are neither accepted nor forwarded.
    let mut eph = y.ephemeral();
    send(
        &mut ws,
        &Message::Ephemeral {
            sender_id: PeerId::new("raw"),
            target_id: rp.clone(),
            document_id: y.id(),
            session_id: "s".into(),
            count: 1,
            data: vec![0xa0],
        },
    )
    .await;
    match next_msg(&mut ws).await {
        Message::DocUnavailable { document_id, .. } => assert_eq!(document_id, y.id()),
        other => panic!("expected doc-unavailable for y, got {other:?}"),
    }
    assert!(timeout(Duration::from_millis(500), eph.recv())
        .await
        .is_err());
    assert!(
        relay
            .repo
            .stats()
            .docs_denied
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 2
    );

    // Through the client library: a reader with a token for x finds x, not y.
    let reader = Repo::temporary(RepoConfig {
        find_timeout: Duration::from_secs(5),
        ..RepoConfig::default()
    })
    .unwrap();
    let t = token("old", only(x.id()), false);
    reader
        .connect_with(
            &relay.url,
            ConnectOptions::token_fn(move || Some(t.clone())),
        )
        .unwrap();
    let rx = timeout(WAIT, reader.find(x.id())).await.unwrap().unwrap();
    let mut changes = rx.changes();
    while rx.with_doc(|d| d.get(ROOT, "title").unwrap().is_none()) {
        timeout(WAIT, changes.next()).await.expect("x's content");
    }
    match timeout(WAIT, reader.find(y.id())).await.unwrap() {
        Err(RepoError::NotFound(_)) => {}
        other => panic!(
            "expected y to be unavailable, got {:?}",
            other.map(|h| h.id())
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_note_the_token_does_not_cover_says_declined_and_is_not_sent_again() {
    let relay = start_relay(with_auth()).await;
    let writer = Repo::temporary(RepoConfig::default()).unwrap();
    // Made offline; the token then covers x only.
    let x = note(&writer, "x").await;
    let z = note(&writer, "z").await;
    writer
        .connect_with(
            &relay.url,
            ConnectOptions::token(token("new", only(x.id()), true)),
        )
        .unwrap();
    let mut xs = x.status();
    timeout(WAIT, xs.wait_for(|s| s == sheafdb::NoteStatus::Synced))
        .await
        .expect("x syncs")
        .unwrap();
    let mut zs = z.status();
    timeout(WAIT, zs.wait_for(|s| s == sheafdb::NoteStatus::Declined))
        .await
        .expect("z is declined, not syncing forever")
        .unwrap();
    assert!(z
        .sync_status()
        .borrow()
        .values()
        .all(|s| *s == sheafdb::engine::PeerSyncStatus::Declined));
    assert!(!relay.repo.contains(&z.id()).unwrap());

    // Edits to z stay here: nothing is offered to a relay that declined it (each offer
    // would be refused again), and z still says so once each edit is saved.
    let denied = || {
        relay
            .repo
            .stats()
            .docs_denied
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let before = denied();
    for i in 0..5 {
        z.change(|tx| tx.put(ROOT, "title", format!("z{i}")))
            .unwrap();
        z.saved().await.unwrap();
    }
    // Nor its ephemeral messages (presence would send one every heartbeat).
    z.broadcast(vec![0xa0]).unwrap();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(
        denied(),
        before,
        "z or its ephemeral messages were sent again"
    );
    assert_eq!(z.status().get(), sheafdb::NoteStatus::Declined);
    // x goes on syncing.
    x.change(|tx| tx.put(ROOT, "title", "x2")).unwrap();
    timeout(WAIT, xs.wait_for(|s| s == sheafdb::NoteStatus::Synced))
        .await
        .expect("x syncs again")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_peers_changes_never_land() {
    let relay = start_relay(with_auth()).await;
    let writer = client(&relay, DocScope::All, true);
    let w = note(&writer, "original").await;
    let reader = client(&relay, only(w.id()), false);
    let r = timeout(WAIT, reader.find(w.id())).await.unwrap().unwrap();
    let mut changes = r.changes();
    while r.with_doc(|d| d.get(ROOT, "title").unwrap().is_none()) {
        timeout(WAIT, changes.next())
            .await
            .expect("the reader gets the note");
    }

    r.change(|tx| tx.put(ROOT, "title", "vandalized")).unwrap();
    let evil = r.heads()[0];
    // The reader still receives the writer's later changes...
    w.change(|tx| tx.put(ROOT, "body", "more")).unwrap();
    let deadline = Instant::now() + WAIT;
    while r.with_doc(|d| d.get(ROOT, "body").unwrap().is_none()) {
        tokio::time::timeout_at(deadline, changes.next())
            .await
            .expect("the reader gets the writer's change");
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    // ...but its own change reached neither the relay (memory or disk) nor the writer.
    let at_relay = relay.repo.find(w.id()).await.unwrap();
    assert!(at_relay.with_doc(|d| d.get_change_by_hash(&evil).is_none()));
    relay.repo.flush().await.unwrap();
    let stored = relay.repo.store().load(&w.id()).unwrap().unwrap();
    assert!(stored.doc.get_change_by_hash(&evil).is_none());
    assert!(w.with_doc(|d| d.get_change_by_hash(&evil).is_none()));
    let title = w.with_doc(|d| d.get(ROOT, "title").unwrap().unwrap().0.to_string());
    assert!(title.contains("original"), "{title}");
}

#[tokio::test]
async fn a_refused_repo_connection_says_why_and_a_refreshed_token_gets_in() {
    let relay = start_relay(with_auth()).await;
    let mut expired = Claims::new("new", DocScope::All, true, 10);
    expired.exp = 1_000;
    let expired = keyring().mint(&expired).unwrap();
    // The app's token source: the expired token until the app refreshes it.
    let current = Arc::new(std::sync::Mutex::new(expired));
    let source = current.clone();
    let repo = Repo::temporary(RepoConfig::default()).unwrap();
    let mut options = ConnectOptions::token_fn(move || Some(source.lock().unwrap().clone()));
    options.backoff.base = Duration::from_millis(50);
    options.backoff.cap = Duration::from_millis(200);
    let mut state = repo.connect_with(&relay.url, options).unwrap();
    let refused = timeout(
        WAIT,
        state.wait_for(|s| matches!(s, ConnectionState::Refused { .. })),
    )
    .await
    .expect("the refusal is reported, not a plain offline")
    .unwrap()
    .clone();
    let ConnectionState::Refused { code, reason, .. } = refused else {
        unreachable!()
    };
    assert_eq!(code, 1008);
    assert!(
        reason.starts_with("unauthorized: ") && reason.contains("expired"),
        "{reason}"
    );
    assert_eq!(repo.peers().borrow().len(), 0);

    // A fresh token from the source gets in on the next attempt.
    *current.lock().unwrap() = token("new", DocScope::All, true);
    timeout(WAIT, repo.peers().wait_for(|p| !p.is_empty()))
        .await
        .expect("connected with the refreshed token")
        .unwrap();
    assert_eq!(*state.borrow(), ConnectionState::Connected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_peers_own_edits_say_read_only_instead_of_syncing_forever() {
    use sheafdb::NoteStatus::{ReadOnly, Synced};
    let relay = start_relay(with_auth()).await;
    let writer = client(&relay, DocScope::All, true);
    let w = note(&writer, "original").await;
    let mut ws = w.status();
    timeout(WAIT, ws.wait_for(|s| s == Synced))
        .await
        .expect("the writer's note syncs")
        .unwrap();
    let reader = client(&relay, only(w.id()), false);
    let r = timeout(WAIT, reader.find(w.id())).await.unwrap().unwrap();
    // Reading alone: the reader has what the relay has.
    let mut rs = r.status();
    timeout(WAIT, rs.wait_for(|s| s == Synced))
        .await
        .expect("a reader that has not edited is synced")
        .unwrap();

    // Its own edit will never be taken: it says so instead of syncing forever.
    r.change(|tx| tx.put(ROOT, "title", "mine")).unwrap();
    timeout(WAIT, rs.wait_for(|s| s == ReadOnly))
        .await
        .expect("the reader's edited note says read-only")
        .unwrap();
    assert!(r
        .sync_status()
        .borrow()
        .values()
        .all(|s| *s == sheafdb::engine::PeerSyncStatus::ReadOnly));

    // The writer's next edit still reaches it, and then it is read-only again (it has
    // everything the relay has, and the relay still lacks its edit).
    w.change(|tx| tx.put(ROOT, "body", "more")).unwrap();
    let mut changes = r.changes();
    let deadline = Instant::now() + WAIT;
    while r.with_doc(|d| d.get(ROOT, "body").unwrap().is_none()) {
        tokio::time::timeout_at(deadline, changes.next())
            .await
            .expect("the reader gets the writer's change");
    }
    timeout(WAIT, rs.wait_for(|s| s == ReadOnly))
        .await
        .expect("read-only again after taking in the writer's edit")
        .unwrap();
    // The writer never sees the reader's edit, and is synced.
    timeout(WAIT, ws.wait_for(|s| s == Synced))
        .await
        .expect("the writer is synced")
        .unwrap();
    assert_eq!(
        w.with_doc(|d| d.get(ROOT, "title").unwrap().unwrap().0.to_string()),
        "\"original\""
    );
}

#[tokio::test]
async fn rate_limits_throttle_then_recover() {
    let mut config = ServerConfig::default();
    config.socket.rate_limit = Some(RateLimit {
        messages_per_sec: 20.0,
        message_burst: 5.0,
        ..RateLimit::default()
    });
    let relay = start_relay(config).await;
    let mut ws = raw(&relay.url).await;
    // 25 frames at once: 5 pass, the other 20 are paced at 20/s (about a second).
    let started = Instant::now();
    for _ in 0..24 {
        ws.send(Ws::Ping(Vec::new())).await.unwrap();
    }
    join(&mut ws, "flood").await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(800),
        "not throttled: {took:?}"
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(relay.metrics.rate_limited.get("messages") >= 1);
    // Others never noticed, and after a pause the same connection is fast again.
    let mut other = raw(&relay.url).await;
    let t = Instant::now();
    join(&mut other, "other").await;
    assert!(t.elapsed() < Duration::from_millis(500));
    tokio::time::sleep(Duration::from_millis(400)).await;
    let t = Instant::now();
    ws.send(Ws::Ping(b"p".to_vec())).await.unwrap();
    loop {
        match timeout(WAIT, ws.next()).await.unwrap() {
            Some(Ok(Ws::Pong(p))) if p == b"p" => break,
            Some(Ok(_)) => continue,
            other => panic!("{other:?}"),
        }
    }
    assert!(
        t.elapsed() < Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );
}

#[tokio::test]
async fn connections_per_address_are_capped() {
    let relay = start_relay(ServerConfig {
        max_connections_per_ip: 2,
        ..ServerConfig::default()
    })
    .await;
    let mut a = raw(&relay.url).await;
    join(&mut a, "a").await;
    let mut b = raw(&relay.url).await;
    join(&mut b, "b").await;
    let mut c = raw(&relay.url).await;
    let (code, reason) = close_frame(&mut c).await;
    assert_eq!(code, CloseCode::Policy);
    assert_eq!(reason, IP_LIMIT_REASON);
    assert_eq!(relay.metrics.connections_rejected.get("ip_limit"), 1);
    // A slot frees when a connection ends.
    a.close(None).await.unwrap();
    while let Some(Ok(_)) = timeout(WAIT, a.next()).await.unwrap() {}
    let deadline = Instant::now() + WAIT;
    loop {
        let mut d = raw(&relay.url).await;
        send(
            &mut d,
            &Message::Join {
                sender_id: PeerId::new("d"),
                peer_metadata: PeerMetadata {
                    storage_id: None,
                    is_ephemeral: true,
                    accepts_unchecked: false,
                },
                supported_protocol_versions: vec![PROTOCOL_VERSION.to_string()],
            },
        )
        .await;
        match timeout(WAIT, d.next()).await.unwrap() {
            Some(Ok(Ws::Binary(_))) => break,
            _ if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => panic!("no slot freed: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documents_per_connection_are_capped() {
    let relay = start_relay(ServerConfig {
        max_docs_per_connection: Some(2),
        ..ServerConfig::default()
    })
    .await;
    let mut docs = Vec::new();
    for t in ["a", "b", "c"] {
        docs.push(note(&relay.repo, t).await.id());
    }
    let mut ws = raw(&relay.url).await;
    let rp = join(&mut ws, "greedy").await;
    for d in &docs {
        send(&mut ws, &request("greedy", &rp, *d)).await;
    }
    let mut synced = BTreeSet::new();
    let mut unavailable = BTreeSet::new();
    while synced.len() < 2 || unavailable.is_empty() {
        match next_msg(&mut ws).await {
            Message::Sync { document_id, .. } => {
                synced.insert(document_id);
            }
            Message::DocUnavailable { document_id, .. } => {
                unavailable.insert(document_id);
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(synced, BTreeSet::from([docs[0], docs[1]]));
    assert_eq!(unavailable, BTreeSet::from([docs[2]]));
    // The refusal is counted by the relay's driver right after it queues the answer: the
    // client may read the answer first, so wait (bounded) for the count.
    let hits = || {
        relay
            .repo
            .stats()
            .doc_limit_hits
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while hits() < 1 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert_eq!(hits(), 1);
    // The connection stays up for the documents it has.
    send(&mut ws, &request("greedy", &rp, docs[0])).await;
    assert!(matches!(
        next_msg(&mut ws).await,
        Message::Sync { .. } | Message::DocUnavailable { .. }
    ));
}
