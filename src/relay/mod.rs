//! The WebSocket relay server: `run(listener, hub, config, shutdown)`.
//!
//! - [`server`]: the accept loop; HTTP routing on the same port (`/health`, `/metrics`,
//!   WebSocket upgrades, 404); the connection cap (1013 over it); graceful shutdown (1001).
//! - [`connection`]: the per-socket reader loop and writer task, also used by the dialer
//!   ([`crate::net::client`]): frames in to [`Hub::receive`](crate::net::Hub::receive),
//!   [`Outgoing`](crate::net::Outgoing) out, size limit (1009), keepalive, close codes.
//! - [`metrics`]: counters rendered as Prometheus text, extensible by the engine.
//! - [`config`]: limits and timers.
//! - [`http`]: the bounded request-head reader behind the routing.

pub mod config;
pub mod connection;
pub mod http;
pub mod metrics;
pub mod server;

pub use config::{RateLimit, ServerConfig, SocketConfig};
pub use connection::{serve_connection, CloseKind, Ended, PeerClose};
pub use metrics::{MetricType, Metrics};
pub use server::{run, ServerError, IP_LIMIT_REASON, LIMIT_REASON};
