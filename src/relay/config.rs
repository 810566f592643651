//! Limits and timers for sockets and the server.

use std::sync::Arc;
use std::time::Duration;

use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use super::metrics::Metrics;

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
}

impl Default for SocketConfig {
    fn default() -> Self {
        Self {
            max_frame_bytes: 64 << 20,
            ping_interval: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(60),
            close_timeout: Duration::from_secs(2),
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
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            socket: SocketConfig::default(),
            max_connections: 4096,
            max_pending_handshakes: 512,
            handshake_timeout: Duration::from_secs(10),
            max_request_head_bytes: 16 * 1024,
            shutdown_timeout: Duration::from_secs(5),
            metrics: Arc::new(Metrics::new()),
        }
    }
}
