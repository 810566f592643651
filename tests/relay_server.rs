//! The relay server and dialer against a mock hub, over real sockets on 127.0.0.1:0.
//! Every wait is bounded in time (see `WAIT`) and every loop in count.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::http;
use futures::{SinkExt, StreamExt};
use parking_lot::Mutex;
use sheafdb::net::client::{
    dial, spawn_reconnecting, Backoff, ClientConfig, ConnectionState, DialError,
};
use sheafdb::net::shutdown::shutdown_channel;
use sheafdb::net::{ConnId, ConnInfo, Direction, Hub, Outgoing};
use sheafdb::protocol::{self, Message};
use sheafdb::relay::{self, Metrics, ServerConfig, SocketConfig, LIMIT_REASON};
use sheafdb::{DocumentId, PeerId};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout, Instant};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Upper bound for anything a test waits for.
const WAIT: Duration = Duration::from_secs(5);

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

// ---------------------------------------------------------------------------------------
// Mock hub

#[derive(Default)]
struct MockHub {
    next: AtomicU64,
    senders: Mutex<HashMap<ConnId, mpsc::Sender<Outgoing>>>,
    infos: Mutex<Vec<(ConnId, ConnInfo)>>,
    received: Mutex<Vec<(ConnId, Message)>>,
    disconnected: Mutex<Vec<ConnId>>,
}

impl Hub for MockHub {
    fn connect(&self, info: ConnInfo) -> (ConnId, mpsc::Receiver<Outgoing>) {
        let id = ConnId(self.next.fetch_add(1, Ordering::SeqCst));
        let (tx, rx) = mpsc::channel(16);
        self.senders.lock().insert(id, tx);
        self.infos.lock().push((id, info));
        (id, rx)
    }

    fn receive(&self, conn: ConnId, msg: Message) {
        self.received.lock().push((conn, msg));
    }

    fn disconnect(&self, conn: ConnId) {
        self.senders.lock().remove(&conn);
        self.disconnected.lock().push(conn);
    }
}

impl MockHub {
    fn connected(&self) -> Vec<ConnId> {
        self.infos.lock().iter().map(|(id, _)| *id).collect()
    }

    fn disconnected(&self) -> Vec<ConnId> {
        self.disconnected.lock().clone()
    }

    async fn push(&self, conn: ConnId, out: Outgoing) {
        let tx = self
            .senders
            .lock()
            .get(&conn)
            .cloned()
            .expect("conn is open");
        tx.send(out).await.expect("socket task is draining");
    }
}

/// Poll `cond` every 10 ms until it holds; panic after `WAIT`.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        sleep(Duration::from_millis(10)).await;
    }
}

// ---------------------------------------------------------------------------------------
// Server and client helpers

struct Server {
    addr: SocketAddr,
    hub: Arc<MockHub>,
    metrics: Arc<Metrics>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), relay::ServerError>>,
}

impl Server {
    async fn start(config: ServerConfig) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hub = Arc::new(MockHub::default());
        let metrics = config.metrics.clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(relay::run(listener, hub.clone(), config, async {
            let _ = stopped.await;
        }));
        Server {
            addr,
            hub,
            metrics,
            stop: Some(stop),
            task,
        }
    }

    fn url(&self) -> String {
        format!("ws://{}/", self.addr)
    }

    async fn connect(&self) -> Ws {
        let (ws, _) = timeout(WAIT, tokio_tungstenite::connect_async(self.url()))
            .await
            .expect("connect in time")
            .expect("websocket handshake");
        ws
    }

    /// Connect and wait until the hub has seen the connection; returns its id.
    async fn connect_registered(&self) -> (Ws, ConnId) {
        let before = self.hub.connected().len();
        let ws = self.connect().await;
        eventually("hub.connect", || self.hub.connected().len() > before).await;
        let id = *self.hub.connected().last().unwrap();
        (ws, id)
    }

    async fn shutdown(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let res = timeout(WAIT + Duration::from_secs(2), self.task)
            .await
            .expect("run returns after shutdown");
        res.expect("run task").expect("run returns Ok");
    }
}

fn fast_config() -> ServerConfig {
    ServerConfig {
        socket: SocketConfig {
            close_timeout: Duration::from_millis(500),
            ..SocketConfig::default()
        },
        shutdown_timeout: Duration::from_secs(2),
        ..ServerConfig::default()
    }
}

/// Read until a Close frame arrives (skipping data frames); bounded.
async fn next_close(ws: &mut Ws) -> CloseFrame<'static> {
    let deadline = Instant::now() + WAIT;
    for _ in 0..1000 {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => panic!("no Close frame within {WAIT:?}"),
            Ok(None) => panic!("stream ended without a Close frame"),
            Ok(Some(Err(e))) => panic!("socket failed before a Close frame: {e}"),
            Ok(Some(Ok(WsMessage::Close(Some(frame))))) => return frame,
            Ok(Some(Ok(WsMessage::Close(None)))) => panic!("Close frame without a code"),
            Ok(Some(Ok(_))) => continue,
        }
    }
    panic!("too many frames before Close");
}

/// A raw HTTP/1.1 request; returns (status code, headers, body).
fn sample_sync() -> Message {
    Message::Sync {
        sender_id: PeerId::new("server-peer"),
        target_id: PeerId::new("client-peer"),
        document_id: DocumentId::from_bytes([7; 16]),
        data: vec![1, 2, 3, 4],
    }
}

// ---------------------------------------------------------------------------------------
// HTTP on the same port

#[tokio::test]
async fn health_and_metrics_endpoints() {
    let server = Server::start(fast_config()).await;
    let (status, _, body) = http(server.addr, "GET", "/health").await;
    assert_eq!((status, body.as_str()), (200, "ok"));

    let (_ws, _) = server.connect_registered().await;
    let (status, head, body) = http(server.addr, "GET", "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        head.contains("text/plain; version=0.0.4"),
        "content type: {head}"
    );
    assert!(body.contains("# TYPE sheaf_connections_open gauge"));
    assert!(body.contains("sheaf_connections_open 1\n"), "{body}");
    assert!(body.contains("sheaf_http_requests_total{route=\"health\"} 1\n"));
    server.shutdown().await;
}

#[tokio::test]
async fn unknown_paths_are_404_and_wrong_methods_405() {
    let server = Server::start(fast_config()).await;
    let (status, _, _) = http(server.addr, "GET", "/nope").await;
    assert_eq!(status, 404);
    let (status, head, _) = http(server.addr, "POST", "/health").await;
    assert_eq!(status, 405);
    assert!(head.contains("Allow: GET"));
    server.shutdown().await;
}

#[tokio::test]
async fn a_silent_tcp_client_is_dropped_after_the_handshake_timeout() {
    let server = Server::start(ServerConfig {
        handshake_timeout: Duration::from_millis(200),
        ..fast_config()
    })
    .await;
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    let mut buf = [0u8; 64];
    let n = timeout(WAIT, tcp.read(&mut buf))
        .await
        .expect("server hangs up in time");
    assert!(matches!(n, Ok(0) | Err(_)));
    assert_eq!(server.metrics.handshake_failures.get("timeout"), 1);
    server.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Protocol errors and limits

#[tokio::test]
async fn text_frame_closes_that_socket_only() {
    let server = Server::start(fast_config()).await;
    let (mut a, a_id) = server.connect_registered().await;
    let (mut b, b_id) = server.connect_registered().await;

    a.send(WsMessage::Text("{\"type\":\"join\"}".into()))
        .await
        .unwrap();
    let frame = next_close(&mut a).await;
    assert_eq!(frame.code, CloseCode::Unsupported);
    assert!(frame.reason.contains("text frames"), "{}", frame.reason);
    eventually("a disconnected", || server.hub.disconnected() == vec![a_id]).await;

    // b still works: a ping gets its pong, and the hub still talks to it.
    b.send(WsMessage::Ping(b"still there".to_vec()))
        .await
        .unwrap();
    let pong = timeout(WAIT, b.next()).await.expect("pong in time");
    assert!(matches!(pong, Some(Ok(WsMessage::Pong(p))) if p == b"still there"));
    server.hub.push(b_id, Outgoing::Close("done".into())).await;
    let frame = next_close(&mut b).await;
    assert_eq!(
        (frame.code, frame.reason.as_ref()),
        (CloseCode::Normal, "done")
    );
    assert_eq!(server.metrics.closes.get("text_frame"), 1);
    server.shutdown().await;
}

#[tokio::test]
async fn oversized_frame_closes_with_1009() {
    let mut config = fast_config();
    config.socket.max_frame_bytes = 1024;
    let server = Server::start(config).await;
    let (mut ws, _) = server.connect_registered().await;
    ws.send(WsMessage::Binary(vec![0xa5; 64 * 1024]))
        .await
        .unwrap();
    let frame = next_close(&mut ws).await;
    assert_eq!(frame.code, CloseCode::Size);
    assert!(frame.reason.contains("too large"), "{}", frame.reason);
    assert!(server.hub.received.lock().is_empty());
    eventually("close counted", || {
        server.metrics.closes.get("too_large") == 1
    })
    .await;
    server.shutdown().await;
}

#[tokio::test]
async fn garbage_binary_frame_closes_with_a_reason() {
    let server = Server::start(fast_config()).await;
    let (mut ws, id) = server.connect_registered().await;
    // Not a CBOR map: an unterminated indefinite-length byte string.
    ws.send(WsMessage::Binary(vec![0x5f, 0x41, 0x00, 0xff, 0x13]))
        .await
        .unwrap();
    let frame = next_close(&mut ws).await;
    assert_eq!(frame.code, CloseCode::Invalid);
    assert!(frame.reason.contains("undecodable"), "{}", frame.reason);
    assert!(server.hub.received.lock().is_empty());
    eventually("disconnect", || server.hub.disconnected() == vec![id]).await;
    assert!(server
        .metrics
        .render()
        .contains("sheaf_decode_errors_total{kind="));
    server.shutdown().await;
}

#[tokio::test]
async fn connection_cap_rejects_the_next_one_with_1013() {
    let server = Server::start(ServerConfig {
        max_connections: 2,
        ..fast_config()
    })
    .await;
    let (_a, _) = server.connect_registered().await;
    let (_b, _) = server.connect_registered().await;
    let mut c = server.connect().await;
    let frame = next_close(&mut c).await;
    assert_eq!(frame.code, CloseCode::Again);
    assert_eq!(frame.reason, LIMIT_REASON);
    assert_eq!(
        server.hub.connected().len(),
        2,
        "the rejected socket never reaches the hub"
    );
    assert_eq!(
        server.metrics.connections_rejected.get("connection_limit"),
        1
    );

    // A slot frees up when a connection closes.
    drop(_a);
    eventually("a slot frees", || server.hub.disconnected().len() == 1).await;
    let (_d, _) = server.connect_registered().await;
    server.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Keepalive

#[tokio::test]
async fn idle_timeout_drops_a_silent_client() {
    let mut config = fast_config();
    config.socket.idle_timeout = Duration::from_millis(300);
    config.socket.ping_interval = Duration::from_secs(60);
    let server = Server::start(config).await;
    let (mut ws, id) = server.connect_registered().await;
    let started = Instant::now();
    let frame = next_close(&mut ws).await;
    assert!(started.elapsed() >= Duration::from_millis(250));
    assert_eq!(frame.code, CloseCode::Away);
    assert!(frame.reason.contains("idle"), "{}", frame.reason);
    eventually("disconnect", || server.hub.disconnected() == vec![id]).await;
    assert_eq!(server.metrics.closes.get("idle_timeout"), 1);
    server.shutdown().await;
}

#[tokio::test]
async fn pings_keep_a_responsive_client_that_was_busy_for_a_while() {
    let mut config = fast_config();
    config.socket.idle_timeout = Duration::from_millis(600);
    config.socket.ping_interval = Duration::from_millis(100);
    let server = Server::start(config).await;
    let (mut ws, _) = server.connect_registered().await;
    // Busy (not reading) for less than the idle timeout, then responsive again.
    sleep(Duration::from_millis(400)).await;
    let until = Instant::now() + Duration::from_millis(1500);
    let mut pings = 0;
    for _ in 0..1000 {
        match tokio::time::timeout_at(until, ws.next()).await {
            Err(_) => break,
            Ok(Some(Ok(WsMessage::Ping(_)))) => pings += 1,
            Ok(other) => panic!("unexpected while idle: {other:?}"),
        }
    }
    assert!(pings >= 5, "only {pings} pings");
    assert!(server.hub.disconnected().is_empty());
    server.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Shutdown

#[tokio::test]
async fn shutdown_closes_clients_with_1001_and_run_returns() {
    let server = Server::start(fast_config()).await;
    let (mut a, _) = server.connect_registered().await;
    let (mut b, _) = server.connect_registered().await;
    let addr = server.addr;
    let hub = server.hub.clone();
    let reader = tokio::spawn(async move {
        let fa = next_close(&mut a).await;
        let fb = next_close(&mut b).await;
        (fa, fb)
    });
    server.shutdown().await;
    let (fa, fb) = timeout(WAIT, reader).await.unwrap().unwrap();
    for f in [fa, fb] {
        assert_eq!(f.code, CloseCode::Away);
        assert_eq!(f.reason, "server shutting down");
    }
    assert_eq!(hub.disconnected().len(), 2);
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "the listener is closed"
    );
}

#[tokio::test]
async fn shutdown_is_bounded_when_a_client_never_answers_close() {
    let server = Server::start(fast_config()).await;
    // A client that never reads: it never answers the Close frame.
    let (_ws, _) = server.connect_registered().await;
    let started = Instant::now();
    server.shutdown().await;
    assert!(started.elapsed() < Duration::from_secs(4));
}

// ---------------------------------------------------------------------------------------
// Frames between the hub and the socket

#[tokio::test]
async fn hub_close_sends_queued_messages_first() {
    let server = Server::start(fast_config()).await;
    let (mut ws, id) = server.connect_registered().await;
    server.hub.push(id, Outgoing::Send(sample_sync())).await;
    server
        .hub
        .push(id, Outgoing::Close("replaced".into()))
        .await;
    let first = timeout(WAIT, ws.next()).await.unwrap().unwrap().unwrap();
    assert!(matches!(first, WsMessage::Binary(_)), "{first:?}");
    let frame = next_close(&mut ws).await;
    assert_eq!(
        (frame.code, frame.reason.as_ref()),
        (CloseCode::Normal, "replaced")
    );
    eventually("disconnect", || server.hub.disconnected() == vec![id]).await;
    server.shutdown().await;
}

#[tokio::test]
async fn messages_flow_both_ways() {
    let msg = sample_sync();
    let server = Server::start(fast_config()).await;
    let (mut ws, id) = server.connect_registered().await;

    server.hub.push(id, Outgoing::Send(msg.clone())).await;
    let got = timeout(WAIT, ws.next()).await.unwrap().unwrap().unwrap();
    let WsMessage::Binary(bytes) = got else {
        panic!("expected a binary frame, got {got:?}")
    };
    assert_eq!(protocol::decode(&bytes).unwrap(), msg);

    ws.send(WsMessage::Binary(protocol::encode(&msg)))
        .await
        .unwrap();
    eventually("hub.receive", || !server.hub.received.lock().is_empty()).await;
    assert_eq!(server.hub.received.lock()[0], (id, msg));
    server.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Dialer

fn fast_client() -> ClientConfig {
    ClientConfig {
        socket: SocketConfig {
            close_timeout: Duration::from_millis(500),
            ..SocketConfig::default()
        },
        connect_timeout: Duration::from_secs(2),
        ..ClientConfig::default()
    }
}

#[tokio::test]
async fn dial_registers_an_outgoing_connection_and_carries_frames() {
    let server = Server::start(fast_config()).await;
    let client_hub = Arc::new(MockHub::default());
    let (_stop, shutdown) = shutdown_channel();
    let dialed = dial(&server.url(), client_hub.clone(), &fast_client(), shutdown)
        .await
        .unwrap();
    let infos = client_hub.infos.lock().clone();
    assert_eq!(infos.len(), 1);
    assert_eq!(infos[0].1.direction, Direction::Outgoing);
    assert_eq!(infos[0].1.remote_addr, Some(server.addr));
    eventually("server sees it", || server.hub.connected().len() == 1).await;
    let server_side = server.hub.connected()[0];

    // The server closes; the client's socket task ends and disconnects from its hub.
    server
        .hub
        .push(server_side, Outgoing::Close("bye".into()))
        .await;
    let ended = timeout(WAIT, dialed.task).await.unwrap().unwrap();
    assert_eq!(ended.kind, relay::CloseKind::PeerClosed);
    assert_eq!(
        ended.peer_close,
        Some(relay::PeerClose {
            code: 1000,
            reason: "bye".into()
        })
    );
    assert_eq!(client_hub.disconnected(), vec![dialed.conn]);
    server.shutdown().await;
}

#[tokio::test]
async fn dial_to_a_closed_port_fails() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let (_stop, shutdown) = shutdown_channel();
    let err = dial(
        &format!("ws://{addr}/"),
        Arc::new(MockHub::default()),
        &fast_client(),
        shutdown,
    )
    .await
    .unwrap_err();
    assert!(matches!(err, DialError::Connect(_)), "{err}");
}

#[tokio::test]
async fn reconnecting_driver_reconnects_and_stops() {
    let server = Server::start(fast_config()).await;
    let client_hub = Arc::new(MockHub::default());
    let (state_tx, mut state_rx) = watch::channel(ConnectionState::Connecting);
    let (stop, shutdown) = shutdown_channel();
    let backoff = Backoff {
        base: Duration::from_millis(300),
        ..Backoff::default()
    };
    let driver = spawn_reconnecting(
        server.url(),
        client_hub.clone(),
        fast_client(),
        backoff,
        state_tx,
        shutdown,
    );
    timeout(
        WAIT,
        state_rx.wait_for(|s| *s == ConnectionState::Connected),
    )
    .await
    .unwrap()
    .unwrap();
    eventually("server sees it", || server.hub.connected().len() == 1).await;

    // The server drops it: the driver goes offline, then connects again.
    let first = server.hub.connected()[0];
    server
        .hub
        .push(first, Outgoing::Close("go away".into()))
        .await;
    timeout(
        WAIT,
        state_rx.wait_for(|s| matches!(s, ConnectionState::Offline { retry_in } if *retry_in <= Duration::from_millis(300))),
    )
    .await
    .unwrap()
    .unwrap();
    eventually("reconnected", || server.hub.connected().len() == 2).await;
    eventually("client hub saw two", || client_hub.connected().len() == 2).await;

    // Stop: the socket closes with 1001 and the driver ends.
    stop.trigger();
    timeout(WAIT, driver).await.unwrap().unwrap();
    eventually("server side closed", || {
        server.hub.disconnected().len() == 2
    })
    .await;
    assert_eq!(client_hub.disconnected().len(), 2);
    server.shutdown().await;
}

#[tokio::test]
async fn reconnecting_driver_backs_off_while_the_server_is_down() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let (state_tx, mut state_rx) = watch::channel(ConnectionState::Connecting);
    let (stop, shutdown) = shutdown_channel();
    let backoff = Backoff {
        base: Duration::from_millis(20),
        cap: Duration::from_millis(200),
        ..Backoff::default()
    };
    let driver = spawn_reconnecting(
        format!("ws://{addr}/"),
        Arc::new(MockHub::default()),
        fast_client(),
        backoff,
        state_tx,
        shutdown,
    );
    // Collect a few Offline delays: they grow (up to jitter) and stay under the cap.
    let mut delays = Vec::new();
    for _ in 0..5 {
        timeout(
            WAIT,
            state_rx.wait_for(|s| matches!(s, ConnectionState::Offline { .. })),
        )
        .await
        .unwrap()
        .unwrap();
        if let ConnectionState::Offline { retry_in } = state_rx.borrow_and_update().clone() {
            delays.push(retry_in);
        }
        timeout(
            WAIT,
            state_rx.wait_for(|s| *s == ConnectionState::Connecting),
        )
        .await
        .unwrap()
        .unwrap();
    }
    assert!(delays.iter().all(|d| *d <= Duration::from_millis(200)));
    assert!(delays[4] >= Duration::from_millis(100), "{delays:?}");
    drop(stop);
    timeout(WAIT, driver).await.unwrap().unwrap();
}

/// Two repos sharing a peer id (a copied config, a restored backup) take turns replacing
/// each other at the relay. The one replaced is told so in a protocol `error` before the
/// close, and its connection state says why instead of a plain "offline".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repo_replaced_by_a_twin_with_its_peer_id_is_told_why() {
    let (url, _relay, _stop) = common::in_process_relay().await;
    let twin = || {
        sheafdb::Repo::temporary(sheafdb::RepoConfig {
            peer_id: Some(PeerId::new("twin")),
            ..sheafdb::RepoConfig::default()
        })
        .unwrap()
    };
    let first = twin();
    let mut options = sheafdb::ConnectOptions::default();
    options.backoff.base = Duration::from_secs(5);
    options.backoff.cap = Duration::from_secs(5);
    let mut state = first.connect_with(&url, options).unwrap();
    timeout(
        common::WAIT,
        state.wait_for(|s| *s == ConnectionState::Connected),
    )
    .await
    .expect("the first twin connects")
    .unwrap();

    let second = twin();
    second.connect(&url).unwrap();
    let refused = timeout(
        common::WAIT,
        state.wait_for(|s| matches!(s, ConnectionState::Refused { .. })),
    )
    .await
    .expect("the replaced twin is told why, not just offline")
    .unwrap()
    .clone();
    let ConnectionState::Refused { reason, .. } = refused else {
        unreachable!()
    };
    assert!(
        reason.contains("replaced by a newer connection from the same peer"),
        "{reason}"
    );
}
