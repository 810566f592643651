//! Networking: the seam between sockets and the sync engine.
//!
//! The WebSocket acceptor (relay) and dialer (client) only move frames. Everything the
//! protocol means (handshake, routing, sync) happens in the engine, reached through the
//! [`Hub`] trait that the runtime (`Repo`) implements. A socket task decodes each frame and
//! hands the [`Message`] to [`Hub::receive`]; it drains the bounded [`Outgoing`] receiver it
//! got from [`Hub::connect`] and writes what comes out.
//!
//! - [`client`]: the dialer ([`client::dial`], [`client::spawn_reconnecting`] with backoff).
//! - [`shutdown`]: the stop signal socket tasks watch.
//! - The acceptor and the per-socket loop live in [`crate::relay`].

pub mod client;
pub mod shutdown;

use std::net::SocketAddr;

use tokio::sync::mpsc;

use crate::auth::Access;
use crate::protocol::Message;

/// A connection's id, unique within one process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// Which side opened the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// We accepted it (we are the server side: we wait for `join`).
    Incoming,
    /// We dialed it (we send `join`).
    Outgoing,
}

/// What a socket task knows about its connection when it opens.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub direction: Direction,
    pub remote_addr: Option<SocketAddr>,
    /// What the peer may do (from its token and the server's limits); `None` = anything.
    pub access: Option<Access>,
}

/// What the engine asks a socket task to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Outgoing {
    /// Encode and send as one binary frame.
    Send(Message),
    /// Close the socket with this reason (after sending everything queued before it), with
    /// WebSocket close code 1000. Reasons longer than 123 bytes are truncated.
    Close(String),
}

/// The engine as seen from a socket. Implemented by the runtime; tests may mock it.
pub trait Hub: Send + Sync + 'static {
    /// Register a new connection. The receiver is bounded: when a slow socket lets it fill,
    /// the hub closes that connection rather than buffering without bound.
    fn connect(&self, info: ConnInfo) -> (ConnId, mpsc::Receiver<Outgoing>);
    /// A decoded message arrived on `conn`.
    fn receive(&self, conn: ConnId, msg: Message);
    /// The socket is gone (closed by either side, or failed).
    fn disconnect(&self, conn: ConnId);
    /// Whether the hub can serve: `Err(why)` once its engine is gone (the server's
    /// `GET /health` answers 503 with it).
    fn health(&self) -> Result<(), String> {
        Ok(())
    }
}
