//! The per-socket loop, shared by the server and the dialer.
//!
//! A reader loop (in the caller's task) decodes binary frames and hands them to
//! [`Hub::receive`]; a writer task drains the hub's bounded [`Outgoing`] receiver, sends
//! pings, and sends every Close frame. The reader asks the writer to close through a small
//! control channel; the writer tells the reader it is closing through a `watch`. Every wait
//! is bounded: by the idle timeout while open, by the close timeout once closing.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::sync::{mpsc, watch};

use tokio::time::{sleep_until, timeout, Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError, ProtocolError};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::WebSocketStream;
use tracing::{debug, info, warn};

use super::config::{RateLimit, SocketConfig};
use super::metrics::Metrics;
use crate::net::shutdown::Shutdown;
use crate::net::{ConnId, Direction, Hub, Outgoing};
use crate::protocol::{self, Message};

/// Why a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseKind {
    /// The peer sent Close (or ended the stream cleanly).
    PeerClosed,
    /// The engine asked to close ([`Outgoing::Close`]).
    HubClosed,
    /// The engine dropped the connection's sender.
    HubGone,
    /// The peer sent a text frame (the protocol is binary CBOR).
    TextFrame,
    /// A binary frame that `protocol::decode` rejected.
    DecodeError,
    /// A frame or message over `max_frame_bytes`.
    TooLarge,
    /// A WebSocket-level protocol violation (bad framing, invalid UTF-8, ...).
    WsProtocol,
    /// No frame at all for `idle_timeout`.
    IdleTimeout,
    /// The server or client is shutting down.
    Shutdown,
    /// The socket failed (reset, broken pipe, ...).
    Io,
}

/// How a connection ended: why, the Close frame the peer sent, if it sent one with a code
/// (a server's reason for refusing a client, e.g. `unauthorized: ...` with 1008), and the
/// first protocol `error` message it sent (what a peer's sync engine says before it closes
/// a connection it will not serve: an unsupported protocol version, a newer connection
/// with the same peer id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    pub kind: CloseKind,
    pub peer_close: Option<PeerClose>,
    pub peer_error: Option<String>,
}

/// The longest `error` text kept in [`Ended::peer_error`] (the rest is cut).
const MAX_PEER_ERROR: usize = 1024;

/// A Close frame received from the peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerClose {
    /// The WebSocket close code (1000 normal, 1001 going away, 1008 policy, ...).
    pub code: u16,
    pub reason: String,
}

impl CloseKind {
    /// The `reason` label in `sheaf_closes_total`.
    pub fn label(self) -> &'static str {
        match self {
            CloseKind::PeerClosed => "peer_closed",
            CloseKind::HubClosed => "hub_closed",
            CloseKind::HubGone => "hub_gone",
            CloseKind::TextFrame => "text_frame",
            CloseKind::DecodeError => "decode_error",
            CloseKind::TooLarge => "too_large",
            CloseKind::WsProtocol => "ws_protocol",
            CloseKind::IdleTimeout => "idle_timeout",
            CloseKind::Shutdown => "shutdown",
            CloseKind::Io => "io",
        }
    }
}

/// The reader's request to the writer: optionally send `error`, then Close.
struct CloseRequest {
    code: CloseCode,
    reason: String,
    kind: CloseKind,
    error: Option<Message>,
}

/// Calls `hub.disconnect` and fixes the gauge however the connection ends (even if aborted).
struct ConnGuard {
    hub: Arc<dyn Hub>,
    conn: ConnId,
    metrics: Arc<Metrics>,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.metrics
            .connections_open
            .fetch_sub(1, Ordering::Relaxed);
        self.hub.disconnect(self.conn);
    }
}

/// Serve one WebSocket until it closes, for a connection already registered with
/// [`Hub::connect`] (`conn`, `outgoing`). Calls [`Hub::disconnect`] exactly once when it ends
/// (also if this future is dropped). `direction` only picks the shutdown close reason.
#[allow(clippy::too_many_arguments)] // each is a distinct piece the caller owns
pub async fn serve_connection<S>(
    ws: WebSocketStream<S>,
    hub: Arc<dyn Hub>,
    conn: ConnId,
    outgoing: mpsc::Receiver<Outgoing>,
    direction: Direction,
    config: &SocketConfig,
    metrics: Arc<Metrics>,
    shutdown: Shutdown,
) -> Ended
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    metrics.connections_open.fetch_add(1, Ordering::Relaxed);
    metrics.connections_total.fetch_add(1, Ordering::Relaxed);
    let _guard = ConnGuard {
        hub: hub.clone(),
        conn,
        metrics: metrics.clone(),
    };

    let (sink, mut stream) = ws.split();
    let (ctrl_tx, ctrl_rx) = mpsc::channel(2);
    let (closing_tx, closing_rx) = watch::channel(None);
    let shutdown_reason = match direction {
        Direction::Incoming => "server shutting down",
        Direction::Outgoing => "client shutting down",
    };
    // Aborted if this future is dropped (e.g. the server aborts connections that outlive
    // its shutdown timeout), so a writer stuck on a peer that never reads cannot leak.
    let mut writer = AbortOnDrop(tokio::spawn(write_loop(WriterCtx {
        sink,
        outgoing,
        ctrl: ctrl_rx,
        shutdown: shutdown.clone(),
        shutdown_reason,
        ping_interval: config.ping_interval,
        metrics: metrics.clone(),
        conn,
        closing: closing_tx,
    })));

    let mut peer_close = None;
    let mut peer_error = None;
    let (kind, drain) = read_loop(
        &mut stream,
        &*hub,
        conn,
        config,
        &metrics,
        &ctrl_tx,
        closing_rx,
        shutdown,
        (&mut peer_close, &mut peer_error),
    )
    .await;
    // The writer has every request the reader made; without a sender it finishes.
    drop(ctrl_tx);
    let sink = match timeout(config.close_timeout, &mut writer.0).await {
        Ok(Ok(sink)) => Some(sink),
        Ok(Err(e)) => {
            warn!(conn = conn.0, error = %e, "socket writer task failed");
            None
        }
        Err(_) => {
            debug!(
                conn = conn.0,
                "socket writer did not finish in time; aborting it"
            );
            writer.0.abort();
            None
        }
    };
    if drain {
        // The read side stopped on an error with bytes possibly left unread. Closing the TCP
        // socket now could reset it before the peer reads our Close frame, so read and
        // discard what is left for a bounded time first.
        if let Some(sink) = sink {
            if let Ok(mut ws) = sink.reunite(stream) {
                drain_raw(ws.get_mut(), config.close_timeout).await;
            }
        }
    }
    metrics.closes.inc(kind.label());
    info!(conn = conn.0, reason = kind.label(), "connection closed");
    Ended {
        kind,
        peer_close,
        peer_error,
    }
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn drain_raw<S: AsyncRead + Unpin>(s: &mut S, limit: std::time::Duration) {
    let mut buf = vec![0u8; 16 * 1024];
    let _ = timeout(limit, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
}

/// Returns why the connection ended and whether unread bytes may remain on the socket.
#[allow(clippy::too_many_arguments)]
async fn read_loop<S>(
    stream: &mut SplitStream<WebSocketStream<S>>,
    hub: &dyn Hub,
    conn: ConnId,
    config: &SocketConfig,
    metrics: &Metrics,
    ctrl: &mpsc::Sender<CloseRequest>,
    mut closing_rx: watch::Receiver<Option<CloseKind>>,
    mut shutdown: Shutdown,
    (peer_close, peer_error): (&mut Option<PeerClose>, &mut Option<String>),
) -> (CloseKind, bool)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut deadline = Instant::now() + config.idle_timeout;
    // Set once either side decided to close; then we only wait for the stream to end.
    let mut closing: Option<CloseKind> = None;
    let mut limiter = config.rate_limit.map(Limiter::new);
    // Over the rate limit: don't read until then (TCP backpressure slows the peer).
    let mut throttled: Option<Instant> = None;

    // Ask the writer to close; never blocks (the channel holds every request we make).
    let request_close =
        |closing: &mut Option<CloseKind>, deadline: &mut Instant, req: CloseRequest| {
            *closing = Some(req.kind);
            *deadline = Instant::now() + config.close_timeout;
            if ctrl.try_send(req).is_err() {
                debug!(conn = conn.0, "writer already gone; not sending Close");
            }
        };

    loop {
        tokio::select! {
            item = stream.next(), if throttled.is_none() || closing.is_some() => {
                let msg = match item {
                    None => return (closing.unwrap_or(CloseKind::PeerClosed), false),
                    Some(Ok(msg)) => msg,
                    Some(Err(e)) => {
                        if let Some(kind) = closing {
                            return (kind, false);
                        }
                        let (kind, code, reason) = match &e {
                            WsError::Capacity(CapacityError::MessageTooLong { size, max_size }) => (
                                CloseKind::TooLarge,
                                CloseCode::Size,
                                format!("message too large: {size} bytes, limit {max_size}"),
                            ),
                            WsError::Capacity(_) => (
                                CloseKind::TooLarge,
                                CloseCode::Size,
                                "message too large".to_owned(),
                            ),
                            WsError::Utf8 => (
                                CloseKind::WsProtocol,
                                CloseCode::Invalid,
                                "invalid UTF-8 in text frame".to_owned(),
                            ),
                            WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake)
                            | WsError::Io(_)
                            | WsError::ConnectionClosed
                            | WsError::AlreadyClosed => {
                                debug!(conn = conn.0, error = %e, "socket ended without Close");
                                return (CloseKind::Io, false);
                            }
                            WsError::Protocol(p) => (
                                CloseKind::WsProtocol,
                                CloseCode::Protocol,
                                format!("websocket protocol error: {p}"),
                            ),
                            other => {
                                debug!(conn = conn.0, error = %other, "socket read failed");
                                return (CloseKind::Io, false);
                            }
                        };
                        info!(conn = conn.0, %reason, "closing connection");
                        request_close(&mut closing, &mut deadline, CloseRequest {
                            code, reason, kind, error: None,
                        });
                        return (kind, true);
                    }
                };
                metrics.frame_in(msg.len());
                if let (Some(l), None) = (limiter.as_mut(), closing) {
                    let now = Instant::now();
                    if let Some((wait, kind)) = l.charge(now, msg.len()) {
                        metrics.rate_limited.inc(kind);
                        debug!(conn = conn.0, ?wait, kind, "over rate limit; pausing reads");
                        throttled = Some(now + wait);
                    }
                }
                if closing.is_none() {
                    deadline = Instant::now() + config.idle_timeout;
                    if let Some(until) = throttled {
                        // Time we spend not reading is not the peer's silence.
                        deadline = deadline.max(until + config.idle_timeout);
                    }
                } else if !matches!(msg, WsMessage::Close(_)) {
                    // Closing: ignore data until the peer's Close arrives or we time out.
                    continue;
                }
                match msg {
                    WsMessage::Binary(bytes) => match protocol::decode(&bytes) {
                        Ok(m) => {
                            if let (Message::Error { message, .. }, None) = (&m, &peer_error) {
                                let mut text = message.clone();
                                if text.len() > MAX_PEER_ERROR {
                                    let mut cut = MAX_PEER_ERROR;
                                    while !text.is_char_boundary(cut) {
                                        cut -= 1;
                                    }
                                    text.truncate(cut);
                                }
                                *peer_error = Some(text);
                            }
                            hub.receive(conn, m)
                        }
                        Err(e) => {
                            metrics.decode_error(&e);
                            let reason = format!("undecodable message: {e}");
                            info!(conn = conn.0, %reason, len = bytes.len(), "closing connection");
                            let error = Message::Error {
                                sender_id: None,
                                target_id: None,
                                message: reason.clone(),
                            };
                            request_close(&mut closing, &mut deadline, CloseRequest {
                                code: CloseCode::Invalid,
                                reason,
                                kind: CloseKind::DecodeError,
                                error: Some(error),
                            });
                        }
                    },
                    WsMessage::Text(_) => {
                        info!(conn = conn.0, "text frame; closing connection");
                        request_close(&mut closing, &mut deadline, CloseRequest {
                            code: CloseCode::Unsupported,
                            reason: "text frames are not supported: send binary CBOR frames"
                                .to_owned(),
                            kind: CloseKind::TextFrame,
                            error: None,
                        });
                    }
                    WsMessage::Close(frame) => {
                        debug!(conn = conn.0, ?frame, "peer sent Close");
                        if peer_close.is_none() {
                            *peer_close = frame.map(|f| PeerClose {
                                code: f.code.into(),
                                reason: f.reason.to_string(),
                            });
                        }
                        // tungstenite queues the Close reply; the stream ends after it.
                        if closing.is_none() {
                            closing = Some(CloseKind::PeerClosed);
                            deadline = Instant::now() + config.close_timeout;
                        }
                    }
                    WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_) => {}
                }
            }
            _ = sleep_until(throttled.unwrap_or(deadline)), if throttled.is_some() => {
                throttled = None;
            }
            _ = sleep_until(deadline) => {
                if let Some(kind) = closing {
                    debug!(conn = conn.0, "no Close reply in time");
                    return (kind, false);
                }
                info!(conn = conn.0, idle = ?config.idle_timeout, "peer idle; closing connection");
                request_close(&mut closing, &mut deadline, CloseRequest {
                    code: CloseCode::Away,
                    reason: format!("idle timeout: no frame for {} s", config.idle_timeout.as_secs_f64()),
                    kind: CloseKind::IdleTimeout,
                    error: None,
                });
            }
            changed = closing_rx.changed(), if closing.is_none() => {
                let kind = if changed.is_ok() { *closing_rx.borrow_and_update() } else { Some(CloseKind::Io) };
                if let Some(kind) = kind {
                    closing = Some(kind);
                    deadline = Instant::now() + config.close_timeout;
                }
            }
            _ = shutdown.recv(), if closing.is_none() => {
                // The writer sends the Close frame; we wait for the reply, bounded.
                closing = Some(CloseKind::Shutdown);
                deadline = Instant::now() + config.close_timeout;
            }
        }
    }
}

/// Token buckets for one connection (see [`RateLimit`]).
struct Limiter {
    messages: Bucket,
    bytes: Bucket,
    last: Instant,
}

struct Bucket {
    rate: f64,
    burst: f64,
    level: f64,
}

impl Bucket {
    fn new(rate: f64, burst: f64) -> Self {
        let burst = burst.max(1.0);
        Self {
            rate: rate.max(f64::MIN_POSITIVE),
            burst,
            level: burst,
        }
    }

    /// Refill for `elapsed` seconds, take `cost`; how long until the level is back at 0.
    fn charge(&mut self, elapsed: f64, cost: f64) -> Option<Duration> {
        self.level = (self.level + elapsed * self.rate).min(self.burst) - cost;
        (self.level < 0.0).then(|| Duration::from_secs_f64((-self.level / self.rate).min(3600.0)))
    }
}

impl Limiter {
    fn new(r: RateLimit) -> Self {
        Self {
            messages: Bucket::new(r.messages_per_sec, r.message_burst),
            bytes: Bucket::new(r.bytes_per_sec, r.byte_burst),
            last: Instant::now(),
        }
    }

    /// Charge one frame of `len` bytes at `now`; if a bucket is overdrawn, how long to
    /// pause and which bucket.
    fn charge(&mut self, now: Instant, len: usize) -> Option<(Duration, &'static str)> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        let m = self.messages.charge(elapsed, 1.0);
        let b = self.bytes.charge(elapsed, len as f64);
        match (m, b) {
            (Some(m), Some(b)) if b > m => Some((b, "bytes")),
            (Some(m), _) => Some((m, "messages")),
            (None, Some(b)) => Some((b, "bytes")),
            (None, None) => None,
        }
    }
}

#[cfg(test)]
mod limiter_tests {
    use super::*;

    #[test]
    fn buckets_allow_a_burst_then_pace() {
        let mut l = Limiter::new(RateLimit {
            messages_per_sec: 10.0,
            message_burst: 3.0,
            bytes_per_sec: 1000.0,
            byte_burst: 1000.0,
        });
        let t0 = l.last;
        for _ in 0..3 {
            assert_eq!(l.charge(t0, 1), None);
        }
        let (wait, kind) = l.charge(t0, 1).unwrap();
        assert_eq!(kind, "messages");
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-6, "{wait:?}");
        // After a second the bucket is full again (capped at the burst).
        let t1 = t0 + Duration::from_secs(1);
        for _ in 0..3 {
            assert_eq!(l.charge(t1, 1), None);
        }
        // A frame bigger than the byte burst is charged in full: a long pause.
        let t2 = t1 + Duration::from_secs(10);
        let (wait, kind) = l.charge(t2, 3000).unwrap();
        assert_eq!(kind, "bytes");
        assert!((wait.as_secs_f64() - 2.0).abs() < 1e-3, "{wait:?}");
    }
}

struct WriterCtx<S> {
    sink: SplitSink<WebSocketStream<S>, WsMessage>,
    outgoing: mpsc::Receiver<Outgoing>,
    ctrl: mpsc::Receiver<CloseRequest>,
    shutdown: Shutdown,
    shutdown_reason: &'static str,
    ping_interval: std::time::Duration,
    metrics: Arc<Metrics>,
    conn: ConnId,
    closing: watch::Sender<Option<CloseKind>>,
}

/// Returns the sink so the caller can reunite the halves (to drain the socket).
async fn write_loop<S>(mut w: WriterCtx<S>) -> SplitSink<WebSocketStream<S>, WsMessage>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let start = Instant::now() + w.ping_interval;
    let mut ping = tokio::time::interval_at(start, w.ping_interval);
    ping.set_missed_tick_behavior(MissedTickBehavior::Delay);

    let req = loop {
        let out = tokio::select! {
            biased;
            req = w.ctrl.recv() => match req {
                Some(req) => break req,
                // The reader is done (peer closed or socket failed): nothing left to say.
                None => return w.sink,
            },
            _ = w.shutdown.recv() => break CloseRequest {
                code: CloseCode::Away,
                reason: w.shutdown_reason.to_owned(),
                kind: CloseKind::Shutdown,
                error: None,
            },
            out = w.outgoing.recv() => out,
            _ = ping.tick() => {
                if let Err(e) = w.sink.send(WsMessage::Ping(Vec::new())).await {
                    debug!(conn = w.conn.0, error = %e, "ping failed");
                    w.closing.send_replace(Some(CloseKind::Io));
                    return w.sink;
                }
                w.metrics.frame_out(0);
                continue;
            }
        };
        match out {
            Some(Outgoing::Send(msg)) => {
                let bytes = protocol::encode(&msg);
                let len = bytes.len();
                if let Err(e) = w.sink.send(WsMessage::Binary(bytes)).await {
                    debug!(conn = w.conn.0, error = %e, "send failed");
                    w.closing.send_replace(Some(CloseKind::Io));
                    return w.sink;
                }
                w.metrics.frame_out(len);
            }
            Some(Outgoing::Close(reason)) => {
                break CloseRequest {
                    code: CloseCode::Normal,
                    reason,
                    kind: CloseKind::HubClosed,
                    error: None,
                }
            }
            None => {
                break CloseRequest {
                    code: CloseCode::Away,
                    reason: "connection dropped by the engine".to_owned(),
                    kind: CloseKind::HubGone,
                    error: None,
                }
            }
        }
    };

    w.closing.send_replace(Some(req.kind));
    if let Some(err) = req.error {
        let bytes = protocol::encode(&err);
        let len = bytes.len();
        if w.sink.send(WsMessage::Binary(bytes)).await.is_ok() {
            w.metrics.frame_out(len);
        }
    }
    let frame = CloseFrame {
        code: req.code,
        reason: truncate_reason(&req.reason).to_owned().into(),
    };
    match w.sink.send(WsMessage::Close(Some(frame))).await {
        Ok(()) => w.metrics.frame_out(0),
        Err(e) => debug!(conn = w.conn.0, error = %e, "sending Close failed"),
    }
    w.sink
}

/// A Close frame's payload is at most 125 bytes: 2 for the code, 123 for the reason.
pub(crate) fn truncate_reason(reason: &str) -> &str {
    const MAX: usize = 123;
    if reason.len() <= MAX {
        return reason;
    }
    let mut end = MAX;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_fit_a_close_frame() {
        assert_eq!(truncate_reason("short"), "short");
        let long = "é".repeat(100);
        let t = truncate_reason(&long);
        assert!(t.len() <= 123 && t.chars().all(|c| c == 'é'));
    }
}
