//! The accept loop: route each TCP connection (WebSocket upgrade, `/health`, `/metrics`,
//! 404), cap connections, and shut down gracefully. Shaped after mini-redis's `server::run`.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::{sleep, timeout, timeout_at, Instant};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::WebSocketStream;
use tracing::{debug, error, info, warn};

use super::config::ServerConfig;
use super::connection::serve_connection;
use super::http::{self, HeadError, Prefixed};
use crate::auth::{Access, AuthError};
use crate::net::shutdown::{shutdown_channel, Shutdown};
use crate::net::{ConnInfo, Direction, Hub};

/// What can stop [`run`] before its shutdown signal.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("listener failed: {0}")]
    Listener(#[from] std::io::Error),
}

/// Close reason sent to the connection over the cap.
pub const LIMIT_REASON: &str = "server at connection limit";
/// Close reason (code 1008) sent to a connection over the per-address cap.
pub const IP_LIMIT_REASON: &str = "too many connections from your address";

struct Ctx {
    hub: Arc<dyn Hub>,
    config: ServerConfig,
    conn_limit: Arc<Semaphore>,
    shutdown: Shutdown,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

/// One served connection counted against its address; uncounted on drop.
struct IpSlot<'a> {
    ctx: &'a Ctx,
    ip: IpAddr,
}

impl Ctx {
    fn take_ip_slot(&self, ip: IpAddr) -> Option<IpSlot<'_>> {
        let mut map = self.per_ip.lock();
        let n = map.entry(ip).or_insert(0);
        if *n >= self.config.max_connections_per_ip {
            return None;
        }
        *n += 1;
        Some(IpSlot { ctx: self, ip })
    }
}

impl Drop for IpSlot<'_> {
    fn drop(&mut self) {
        let mut map = self.ctx.per_ip.lock();
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// Accept connections on `listener` until `shutdown` resolves, then close every socket
/// with 1001 "server shutting down", wait (at most `config.shutdown_timeout`) for the
/// connection tasks, and return. The caller flushes storage afterwards.
pub async fn run(
    listener: TcpListener,
    hub: Arc<dyn Hub>,
    config: ServerConfig,
    shutdown: impl Future,
) -> Result<(), ServerError> {
    let (trigger, shutdown_rx) = shutdown_channel();
    let handshake_limit = Arc::new(Semaphore::new(config.max_pending_handshakes));
    let shutdown_timeout = config.shutdown_timeout;
    let ctx = Arc::new(Ctx {
        hub,
        conn_limit: Arc::new(Semaphore::new(config.max_connections)),
        config,
        shutdown: shutdown_rx,
        per_ip: Mutex::new(HashMap::new()),
    });
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "relay listening");
    }

    let mut tasks = JoinSet::new();
    let mut accept_backoff = Duration::from_millis(10);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                if let Err(e) = done {
                    if e.is_panic() {
                        error!(error = %e, "connection task panicked");
                    }
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((tcp, addr)) => {
                    accept_backoff = Duration::from_millis(10);
                    let Ok(permit) = handshake_limit.clone().try_acquire_owned() else {
                        ctx.config.metrics.connections_rejected.inc("handshake_limit");
                        debug!(%addr, "too many pending handshakes; dropping connection");
                        continue;
                    };
                    tasks.spawn(handle_tcp(tcp, addr, ctx.clone(), permit));
                }
                Err(e) => {
                    // Usually out of file descriptors: wait a little and retry, as mini-redis does.
                    warn!(error = %e, "accept failed");
                    tokio::select! {
                        _ = &mut shutdown => break,
                        _ = sleep(accept_backoff) => {}
                    }
                    accept_backoff = (accept_backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    info!(open = tasks.len(), "relay shutting down");
    drop(listener);
    trigger.trigger();
    let drained = timeout(shutdown_timeout, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!(
            left = tasks.len(),
            "connections did not close in time; aborting them"
        );
        tasks.shutdown().await;
    }
    Ok(())
}

async fn handle_tcp(
    mut tcp: TcpStream,
    addr: SocketAddr,
    ctx: Arc<Ctx>,
    handshake_permit: OwnedSemaphorePermit,
) {
    let _ = tcp.set_nodelay(true);
    let metrics = &ctx.config.metrics;
    let deadline = Instant::now() + ctx.config.handshake_timeout;
    let head_bytes = match timeout_at(
        deadline,
        http::read_head(&mut tcp, ctx.config.max_request_head_bytes),
    )
    .await
    {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(HeadError::TooLarge(_))) => {
            metrics.handshake_failures.inc("head_too_large");
            let _ = timeout_at(
                deadline,
                http::respond(
                    &mut tcp,
                    "431 Request Header Fields Too Large",
                    "text/plain; charset=utf-8",
                    "",
                    "request head too large\n",
                ),
            )
            .await;
            return;
        }
        Ok(Err(e)) => {
            metrics.handshake_failures.inc("bad_request");
            debug!(%addr, error = %e, "no request head");
            return;
        }
        Err(_) => {
            metrics.handshake_failures.inc("timeout");
            debug!(%addr, "handshake timed out");
            return;
        }
    };
    let head = match http::parse_head(&head_bytes) {
        Ok(head) => head,
        Err(e) => {
            metrics.handshake_failures.inc("bad_request");
            debug!(%addr, error = %e, "bad request");
            let _ = timeout_at(
                deadline,
                http::respond(
                    &mut tcp,
                    "400 Bad Request",
                    "text/plain; charset=utf-8",
                    "",
                    "bad request\n",
                ),
            )
            .await;
            return;
        }
    };

    if !head.is_websocket {
        let _ = timeout_at(deadline, answer_http(&mut tcp, &head, &ctx)).await;
        return;
    }

    // Checked before the upgrade, answered after it: a browser WebSocket cannot read an
    // HTTP error body, but it sees a close code and reason.
    let access = authorize(&head, &ctx.config);
    let conn_permit = ctx.conn_limit.clone().try_acquire_owned().ok();
    let ws_config = ctx.config.socket.websocket_config();
    let stream = Prefixed::new(head_bytes, tcp);
    let ws = match timeout_at(
        deadline,
        tokio_tungstenite::accept_async_with_config(stream, Some(ws_config)),
    )
    .await
    {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => {
            metrics.handshake_failures.inc("websocket");
            debug!(%addr, error = %e, "websocket handshake failed");
            return;
        }
        Err(_) => {
            metrics.handshake_failures.inc("timeout");
            debug!(%addr, "websocket handshake timed out");
            return;
        }
    };
    drop(handshake_permit);

    let Some(_conn_permit) = conn_permit else {
        metrics.connections_rejected.inc("connection_limit");
        info!(%addr, "at connection limit; rejecting");
        reject(
            ws,
            CloseCode::Again,
            LIMIT_REASON,
            ctx.config.socket.close_timeout,
        )
        .await;
        return;
    };
    let access = match access {
        Ok(access) => access,
        Err(e) => {
            metrics.connections_rejected.inc(e.label());
            info!(%addr, error = %e, "refusing connection: no valid token");
            let reason = format!("unauthorized: {e}");
            reject(
                ws,
                CloseCode::Policy,
                &reason,
                ctx.config.socket.close_timeout,
            )
            .await;
            return;
        }
    };
    let Some(_ip_slot) = ctx.take_ip_slot(addr.ip()) else {
        metrics.connections_rejected.inc("ip_limit");
        info!(%addr, "at per-address connection limit; rejecting");
        reject(
            ws,
            CloseCode::Policy,
            IP_LIMIT_REASON,
            ctx.config.socket.close_timeout,
        )
        .await;
        return;
    };

    let (conn, outgoing) = ctx.hub.connect(ConnInfo {
        direction: Direction::Incoming,
        remote_addr: Some(addr),
        access,
    });
    info!(%addr, conn = conn.0, "connection open");
    serve_connection(
        ws,
        ctx.hub.clone(),
        conn,
        outgoing,
        Direction::Incoming,
        &ctx.config.socket,
        ctx.config.metrics.clone(),
        ctx.shutdown.clone(),
    )
    .await;
}

/// What a WebSocket request may do: from its token when auth is on (an error if it has no
/// valid one), plus the per-connection document cap.
fn authorize(head: &http::RequestHead, config: &ServerConfig) -> Result<Option<Access>, AuthError> {
    let max_docs = config.max_docs_per_connection;
    match &config.auth {
        None => Ok(max_docs.map(|m| Access::all(Some(m)))),
        Some(keys) => {
            let token = head.token.as_deref().ok_or(AuthError::Missing)?;
            let claims = keys.verify(token)?;
            let mut access = claims.access();
            access.max_docs = max_docs;
            Ok(Some(access))
        }
    }
}

/// Close with `code` and `reason`, and wait (bounded) for the peer's Close reply.
async fn reject<S>(mut ws: WebSocketStream<S>, code: CloseCode, reason: &str, wait: Duration)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures::StreamExt;
    let frame = CloseFrame {
        code,
        reason: super::connection::truncate_reason(reason).to_owned().into(),
    };
    if ws.close(Some(frame)).await.is_err() {
        return;
    }
    let _ = timeout(wait, async { while let Some(Ok(_)) = ws.next().await {} }).await;
}

async fn answer_http(
    tcp: &mut TcpStream,
    head: &http::RequestHead,
    ctx: &Ctx,
) -> std::io::Result<()> {
    const TEXT: &str = "text/plain; charset=utf-8";
    let metrics = &ctx.config.metrics;
    let route = match head.path.as_str() {
        "/health" => "health",
        "/metrics" => "metrics",
        _ => {
            metrics.http_requests.inc("not_found");
            return http::respond(tcp, "404 Not Found", TEXT, "", "not found\n").await;
        }
    };
    if head.method != "GET" {
        metrics.http_requests.inc("method_not_allowed");
        return http::respond(
            tcp,
            "405 Method Not Allowed",
            TEXT,
            "Allow: GET\r\n",
            "method not allowed\n",
        )
        .await;
    }
    metrics.http_requests.inc(route);
    match route {
        "health" => match ctx.hub.health() {
            Ok(()) => http::respond(tcp, "200 OK", TEXT, "", "ok").await,
            Err(why) => {
                http::respond(
                    tcp,
                    "503 Service Unavailable",
                    TEXT,
                    "",
                    &format!("{why}\n"),
                )
                .await
            }
        },
        _ => {
            let body = metrics.render();
            http::respond(
                tcp,
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                "",
                &body,
            )
            .await
        }
    }
}
