//! Limits and timers for sockets and the server.

use std::sync::Arc;
use std::time::Duration;

use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use super::metrics::Metrics;
use crate::auth::Keyring;

/// Per-socket settings, shared by the server and the dialer.
#[derive(Debug, Clone)]
pub struct SocketConfig {
    /// Largest WebSocket frame and message accepted; bigger ones close the socket with 1009.
    pub max_frame_bytes: usize,
    /// How often we send a WebSocket Ping.
    pub ping_interval: Duration,
    /// A peer from which no frame at all (data, ping, pong) arrived for this long is dropped.
    /// Generous on purpose: a JS client applying a big change can be deaf for 5-10 s.
    pub idle_timeout: Duration,
    /// How long to wait for the peer's Close reply (and for our writer) once closing.
    pub close_timeout: Duration,
    /// Per-connection read rate limit; `None` = unlimited (the dialer's default). Over it,
    /// the reader pauses (throttles) until the bucket refills; it never closes for it.
    pub rate_limit: Option<RateLimit>,
}

/// Token buckets on what one connection may send us: frames and payload bytes. Each
/// bucket holds up to `*_burst` and refills at `*_per_sec`; a frame that overdraws a bucket
/// is still handled, then reading pauses until the bucket is back at zero. So a peer can
/// burst, its long-run rate is capped, and a single frame bigger than the burst is slowed
/// down rather than refused (`max_frame_bytes` refuses those).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub messages_per_sec: f64,
    pub message_burst: f64,
    pub bytes_per_sec: f64,
    pub byte_burst: f64,
}

impl Default for RateLimit {
    /// Generous for an app syncing many notes at once: 200 frames/s (bursts of 2000) and
    /// 8 MiB/s (bursts of 64 MiB).
    fn default() -> Self {
        Self {
            messages_per_sec: 200.0,
            message_burst: 2000.0,
            bytes_per_sec: 8.0 * 1024.0 * 1024.0,
            byte_burst: 64.0 * 1024.0 * 1024.0,
        }
    }
}

impl Default for SocketConfig {
    fn default() -> Self {
        Self {
            max_frame_bytes: 64 << 20,
            ping_interval: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(60),
            close_timeout: Duration::from_secs(2),
            rate_limit: None,
        }
    }
}

impl SocketConfig {
    /// The tungstenite settings these limits imply.
    pub fn websocket_config(&self) -> WebSocketConfig {
        WebSocketConfig {
            max_message_size: Some(self.max_frame_bytes),
            max_frame_size: Some(self.max_frame_bytes),
            ..WebSocketConfig::default()
        }
    }
}

/// Settings for [`run`](super::run).
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub socket: SocketConfig,
    /// WebSocket connections served at once; the next one is closed with 1013.
    pub max_connections: usize,
    /// Connections still in their HTTP/WebSocket handshake; more are dropped at once.
    pub max_pending_handshakes: usize,
    /// Time allowed from accept to a finished HTTP request or WebSocket upgrade.
    pub handshake_timeout: Duration,
    /// Largest HTTP request head (request line and headers) read before routing.
    pub max_request_head_bytes: usize,
    /// After shutdown, how long connections get to close before they are aborted.
    pub shutdown_timeout: Duration,
    /// Counters, shared with whoever else wants to add to `/metrics`.
    pub metrics: Arc<Metrics>,
    /// Token keys. `Some`: every WebSocket must present a valid token (`?token=` or
    /// `Authorization: Bearer`) and may only touch the documents it covers; without one the
    /// socket is upgraded and closed with 1008 and the reason. `None`: no auth.
    pub auth: Option<Arc<Keyring>>,
    /// WebSocket connections served at once per client IP address; the next one is closed
    /// with 1008.
    pub max_connections_per_ip: usize,
    /// Distinct documents one connection may sync; requests for more get `doc-unavailable`
    /// (the connection stays up for the ones it has). `None` = unlimited.
    pub max_docs_per_connection: Option<usize>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            socket: SocketConfig {
                rate_limit: Some(RateLimit::default()),
                ..SocketConfig::default()
            },
            max_connections: 4096,
            max_pending_handshakes: 512,
            handshake_timeout: Duration::from_secs(10),
            max_request_head_bytes: 16 * 1024,
            shutdown_timeout: Duration::from_secs(5),
            metrics: Arc::new(Metrics::new()),
            auth: None,
            max_connections_per_ip: 256,
            max_docs_per_connection: Some(10_000),
        }
    }
}
