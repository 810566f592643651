//! The accept loop: route each TCP connection (WebSocket upgrade, `/health`, `/metrics`,
//! 404), cap connections, and shut down gracefully. Shaped after mini-redis's `server::run`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

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

struct Ctx {
    hub: Arc<dyn Hub>,
    config: ServerConfig,
    conn_limit: Arc<Semaphore>,
    shutdown: Shutdown,
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
        reject(ws, ctx.config.socket.close_timeout).await;
        return;
    };

    let (conn, outgoing) = ctx.hub.connect(ConnInfo {
        direction: Direction::Incoming,
        remote_addr: Some(addr),
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

/// Close with 1013 and wait (bounded) for the peer's Close reply.
async fn reject<S>(mut ws: WebSocketStream<S>, wait: Duration)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures::StreamExt;
    let frame = CloseFrame {
        code: CloseCode::Again,
        reason: LIMIT_REASON.into(),
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
        "health" => http::respond(tcp, "200 OK", TEXT, "", "ok").await,
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
