//! The WebSocket dialer: [`dial`] one connection, or keep one up with
//! [`spawn_reconnecting`] (exponential backoff with jitter).
//!
//! A dialed socket runs the same per-socket loop as the server
//! ([`crate::relay::serve_connection`]); the hub sees it as [`Direction::Outgoing`] and
//! sends `join` itself.

use std::sync::Arc;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout, Instant};
use tokio_tungstenite::tungstenite;
use tracing::{info, warn};

use super::shutdown::Shutdown;
use super::{ConnId, ConnInfo, Direction, Hub};
use crate::relay::{serve_connection, Ended, Metrics, SocketConfig};

/// Why a dial failed.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("websocket connect failed: {0}")]
    Connect(#[from] tungstenite::Error),
    #[error("connect timed out after {0:?}")]
    Timeout(Duration),
    #[error("cancelled")]
    Cancelled,
    #[error("the token is not a valid header value")]
    BadToken,
}

/// Where the dialer gets a capability token: called before each (re)connect, so it can
/// hand out a fresh one as old ones expire. `None` = connect without one.
#[derive(Clone)]
pub struct TokenSource(Arc<dyn Fn() -> Option<String> + Send + Sync>);

impl TokenSource {
    /// The same token every time.
    pub fn fixed(token: impl Into<String>) -> Self {
        let token = token.into();
        Self(Arc::new(move || Some(token.clone())))
    }

    /// A callback (e.g. one that asks the app backend for a new token when it nears expiry).
    pub fn from_fn(f: impl Fn() -> Option<String> + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }

    pub fn get(&self) -> Option<String> {
        (self.0)()
    }
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenSource(..)")
    }
}

/// Settings for the dialer.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub socket: SocketConfig,
    /// Time allowed for TCP connect plus the WebSocket handshake.
    pub connect_timeout: Duration,
    pub metrics: Arc<Metrics>,
    /// Sent as `Authorization: Bearer <token>` (kept out of URLs and their logs); the relay
    /// also accepts `?token=` for browsers.
    pub token: Option<TokenSource>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            socket: SocketConfig::default(),
            connect_timeout: Duration::from_secs(10),
            metrics: Arc::new(Metrics::new()),
            token: None,
        }
    }
}

/// A connection [`dial`] opened.
#[derive(Debug)]
pub struct Dialed {
    pub conn: ConnId,
    /// Finishes when the socket closes, with the reason.
    pub task: JoinHandle<Ended>,
}

/// Connect to `url` (`ws://host:port/path`; `wss` needs a TLS feature that is not enabled),
/// register the connection with the hub as [`Direction::Outgoing`] and serve it in a new
/// task until it closes or `shutdown` fires (then it closes with 1001).
pub async fn dial(
    url: &str,
    hub: Arc<dyn Hub>,
    config: &ClientConfig,
    shutdown: Shutdown,
) -> Result<Dialed, DialError> {
    use tungstenite::client::IntoClientRequest;
    let mut cancel = shutdown.clone();
    let mut request = url.into_client_request()?;
    if let Some(token) = config.token.as_ref().and_then(TokenSource::get) {
        let value = tungstenite::http::HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| DialError::BadToken)?;
        request
            .headers_mut()
            .insert(tungstenite::http::header::AUTHORIZATION, value);
    }
    let connect = tokio_tungstenite::connect_async_with_config(
        request,
        Some(config.socket.websocket_config()),
        true, // TCP_NODELAY: frames are small and latency matters
    );
    let (ws, _response) = tokio::select! {
        r = timeout(config.connect_timeout, connect) => match r {
            Ok(r) => r?,
            Err(_) => return Err(DialError::Timeout(config.connect_timeout)),
        },
        _ = cancel.recv() => return Err(DialError::Cancelled),
    };
    let remote_addr = match ws.get_ref() {
        tokio_tungstenite::MaybeTlsStream::Plain(tcp) => tcp.peer_addr().ok(),
        _ => None,
    };
    let (conn, outgoing) = hub.connect(ConnInfo {
        direction: Direction::Outgoing,
        remote_addr,
        access: None,
    });
    info!(url, conn = conn.0, "connected");
    let socket = config.socket.clone();
    let metrics = config.metrics.clone();
    let task = tokio::spawn(async move {
        serve_connection(
            ws,
            hub,
            conn,
            outgoing,
            Direction::Outgoing,
            &socket,
            metrics,
            shutdown,
        )
        .await
    });
    Ok(Dialed { conn, task })
}

/// The reconnecting driver's view of its connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectionState {
    Connecting,
    Connected,
    /// Waiting `retry_in` before the next attempt.
    Offline {
        retry_in: Duration,
    },
    /// The server closed the connection on purpose, with a code other than normal (1000)
    /// or going away (1001), and said why: e.g. 1008 `unauthorized: token expired at ...`
    /// (sheaf-relay with auth), 1013 over a connection cap. Or its sync engine sent a
    /// protocol `error` message before closing (then `reason` is that message): e.g. an
    /// unsupported protocol version, or `replaced by a newer connection from the same peer`
    /// (two repos sharing a peer id take turns). Otherwise as `Offline`: the next
    /// attempt comes in `retry_in` (asking a [`TokenSource`] for a token again, so
    /// a refreshed token gets in). What an app shows instead of a plain "offline", or acts
    /// on (sign the user in again).
    Refused {
        code: u16,
        reason: String,
        retry_in: Duration,
    },
    /// Not connected and not trying again: the connection was ended (the repo shut down,
    /// its `Connection` dropped) or the repo's engine stopped (see `Repo::engine_stopped`).
    Stopped,
}

/// Whether the server ended the connection on purpose and said why: a Close code other
/// than normal or going away, or a protocol `error` message before it closed (its text is
/// the reason, with the Close code it came with; 1006, "abnormal", if none).
fn refusal(end: crate::relay::Ended) -> Option<crate::relay::PeerClose> {
    let code = end.peer_close.as_ref().map(|c| c.code);
    match (end.peer_close, end.peer_error) {
        (Some(c), _) if !matches!(c.code, 1000 | 1001) => Some(c),
        (_, Some(reason)) => Some(crate::relay::PeerClose {
            code: code.unwrap_or(1006),
            reason,
        }),
        _ => None,
    }
}

/// Exponential backoff with jitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Ceiling of the first retry.
    pub base: Duration,
    /// Growth per failed attempt.
    pub factor: u32,
    /// Largest ceiling.
    pub cap: Duration,
    /// A connection that stayed up this long resets the attempt count.
    pub reset_after: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(100),
            factor: 2,
            cap: Duration::from_secs(30),
            reset_after: Duration::from_secs(10),
        }
    }
}

impl Backoff {
    /// `min(cap, base * factor^attempt)`, without overflow (`attempt` counts from 0).
    pub fn ceiling(&self, attempt: u32) -> Duration {
        if self.factor <= 1 || self.base.is_zero() {
            return self.base.min(self.cap);
        }
        let mut d = self.base;
        for _ in 0..attempt {
            if d >= self.cap {
                break;
            }
            d = d.saturating_mul(self.factor);
        }
        d.min(self.cap)
    }

    /// The wait before retry number `attempt`: uniform in `[ceiling/2, ceiling]` ("equal
    /// jitter": never zero, so a flapping server is not hammered, and clients spread out).
    pub fn delay<R: Rng + ?Sized>(&self, attempt: u32, rng: &mut R) -> Duration {
        let ceiling = self.ceiling(attempt);
        let half = ceiling / 2;
        let span = u64::try_from((ceiling - half).as_nanos()).unwrap_or(u64::MAX);
        half.saturating_add(Duration::from_nanos(rng.gen_range(0..=span)))
    }
}

/// Keep a connection to `url` up until `shutdown` fires: dial, serve, and after each
/// failure or close wait `backoff.delay(attempt)` (reported as
/// [`ConnectionState::Offline`]) before dialing again. The attempt count resets after a
/// connection stayed up for `backoff.reset_after`.
pub fn spawn_reconnecting(
    url: String,
    hub: Arc<dyn Hub>,
    config: ClientConfig,
    backoff: Backoff,
    state_tx: watch::Sender<ConnectionState>,
    shutdown: Shutdown,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut rng = rand::rngs::StdRng::from_entropy();
        let mut cancel = shutdown.clone();
        let mut attempt: u32 = 0;
        while !cancel.is_shutdown() {
            // A hub whose engine is gone would drop every socket we hand it.
            if let Err(why) = hub.health() {
                warn!(url, %why, "not reconnecting");
                break;
            }
            state_tx.send_replace(ConnectionState::Connecting);
            // The server's reason, if it closed this attempt's connection on purpose.
            let mut refused = None;
            match dial(&url, hub.clone(), &config, shutdown.clone()).await {
                Ok(dialed) => {
                    state_tx.send_replace(ConnectionState::Connected);
                    let since = Instant::now();
                    // The socket task watches `shutdown` itself and closes with 1001.
                    let end = dialed.task.await.ok();
                    let kind = end.as_ref().map(|e| e.kind.label());
                    refused = end.and_then(refusal);
                    match &refused {
                        Some(c) => {
                            warn!(url, code = c.code, reason = %c.reason, "the server closed the connection")
                        }
                        None => info!(url, reason = ?kind, "disconnected"),
                    }
                    if since.elapsed() >= backoff.reset_after {
                        attempt = 0;
                    }
                }
                Err(DialError::Cancelled) => break,
                Err(e) => warn!(url, error = %e, "dial failed"),
            }
            if cancel.is_shutdown() {
                break;
            }
            let retry_in = backoff.delay(attempt, &mut rng);
            attempt = attempt.saturating_add(1);
            state_tx.send_replace(match refused {
                Some(c) => ConnectionState::Refused {
                    code: c.code,
                    reason: c.reason,
                    retry_in,
                },
                None => ConnectionState::Offline { retry_in },
            });
            tokio::select! {
                _ = sleep(retry_in) => {}
                _ = cancel.recv() => break,
            }
        }
        state_tx.send_replace(ConnectionState::Stopped);
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;

    #[test]
    fn ceiling_grows_and_caps() {
        let b = Backoff::default();
        assert_eq!(b.ceiling(0), Duration::from_millis(100));
        assert_eq!(b.ceiling(1), Duration::from_millis(200));
        assert_eq!(b.ceiling(3), Duration::from_millis(800));
        assert_eq!(b.ceiling(9), Duration::from_millis(51_200).min(b.cap));
        assert_eq!(b.ceiling(20), Duration::from_secs(30));
        assert_eq!(b.ceiling(u32::MAX), Duration::from_secs(30));
    }

    #[test]
    fn degenerate_backoffs_do_not_loop_or_overflow() {
        let b = Backoff {
            base: Duration::ZERO,
            ..Backoff::default()
        };
        assert_eq!(b.ceiling(u32::MAX), Duration::ZERO);
        let b = Backoff {
            factor: 1,
            ..Backoff::default()
        };
        assert_eq!(b.ceiling(u32::MAX), Duration::from_millis(100));
        let b = Backoff {
            base: Duration::MAX,
            cap: Duration::MAX,
            ..Backoff::default()
        };
        assert_eq!(b.ceiling(70), Duration::MAX);
        let mut rng = StdRng::seed_from_u64(1);
        let _ = b.delay(70, &mut rng);
    }

    #[test]
    fn jitter_stays_in_half_to_full_ceiling_and_varies() {
        let b = Backoff::default();
        let mut rng = StdRng::seed_from_u64(7);
        for attempt in [0, 1, 5, 12, 40] {
            let c = b.ceiling(attempt);
            let mut seen = std::collections::BTreeSet::new();
            for _ in 0..50 {
                let d = b.delay(attempt, &mut rng);
                assert!(d >= c / 2 && d <= c, "attempt {attempt}: {d:?} vs {c:?}");
                seen.insert(d);
            }
            assert!(seen.len() > 1, "no jitter at attempt {attempt}");
        }
    }

    #[test]
    fn same_seed_same_delays() {
        let b = Backoff::default();
        let mut a = StdRng::seed_from_u64(3);
        let mut c = StdRng::seed_from_u64(3);
        let x: Vec<_> = (0..10).map(|i| b.delay(i, &mut a)).collect();
        let y: Vec<_> = (0..10).map(|i| b.delay(i, &mut c)).collect();
        assert_eq!(x, y);
    }
}
