//! Just enough HTTP/1.1 to share the port: read a request head (bounded), route it, answer
//! plain requests, and replay the head to tungstenite for WebSocket upgrades.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// Why no request head could be read.
#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    #[error("connection closed before a full request head")]
    Eof,
    #[error("request head larger than {0} bytes")]
    TooLarge(usize),
    #[error("malformed request: {0}")]
    Malformed(String),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// What routing needs from a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    /// The path without the query string.
    pub path: String,
    /// `Upgrade: websocket` was present.
    pub is_websocket: bool,
    /// A capability token: the `token` query parameter, else `Authorization: Bearer`.
    pub token: Option<String>,
}

/// Read until the end of the request head (`\r\n\r\n`), at most `max` bytes. Returns every
/// byte read (the head and anything after it), to be replayed to the WebSocket handshake.
pub async fn read_head<S: AsyncRead + Unpin>(s: &mut S, max: usize) -> Result<Vec<u8>, HeadError> {
    let mut buf = Vec::with_capacity(1024.min(max));
    let mut chunk = [0u8; 1024];
    loop {
        if buf.len() >= max {
            return Err(HeadError::TooLarge(max));
        }
        let want = chunk.len().min(max - buf.len());
        let n = s.read(&mut chunk[..want]).await?;
        if n == 0 {
            return Err(HeadError::Eof);
        }
        let from = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        if buf[from..].windows(4).any(|w| w == b"\r\n\r\n") {
            return Ok(buf);
        }
    }
}

/// Parse a complete request head.
pub fn parse_head(bytes: &[u8]) -> Result<RequestHead, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(bytes) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(HeadError::Malformed("incomplete".into())),
        Err(e) => return Err(HeadError::Malformed(e.to_string())),
    }
    let method = req.method.unwrap_or_default().to_owned();
    let target = req.path.unwrap_or_default();
    let path = target
        .split(['?', '#'])
        .next()
        .unwrap_or_default()
        .to_owned();
    let is_websocket = req.headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("upgrade")
            && std::str::from_utf8(h.value)
                .map(|v| {
                    v.split(',')
                        .any(|t| t.trim().eq_ignore_ascii_case("websocket"))
                })
                .unwrap_or(false)
    });
    let query_token = target
        .split('#')
        .next()
        .and_then(|t| t.split_once('?'))
        .and_then(|(_, q)| {
            q.split('&')
                .find_map(|kv| kv.strip_prefix("token="))
                .map(str::to_owned)
        });
    let bearer = || {
        req.headers.iter().find_map(|h| {
            if !h.name.eq_ignore_ascii_case("authorization") {
                return None;
            }
            let v = std::str::from_utf8(h.value).ok()?.trim();
            let (scheme, rest) = v.split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| rest.trim().to_owned())
        })
    };
    let token = query_token.or_else(bearer).filter(|t| !t.is_empty());
    Ok(RequestHead {
        method,
        path,
        is_websocket,
        token,
    })
}

/// Write a complete `Connection: close` response and shut the write side.
pub async fn respond<S: AsyncWrite + Unpin>(
    s: &mut S,
    status: &str,
    content_type: &str,
    extra_headers: &str,
    body: &str,
) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nConnection: close\r\n{extra_headers}\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await?;
    s.write_all(body.as_bytes()).await?;
    s.flush().await?;
    s.shutdown().await
}

/// A stream that first yields bytes already read from `inner`, then reads `inner`.
#[derive(Debug)]
pub struct Prefixed<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(prefix: Vec<u8>, inner: S) -> Self {
        Self {
            prefix,
            pos: 0,
            inner,
        }
    }

    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos < this.prefix.len() {
            let rest = &this.prefix[this.pos..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.pos += n;
            if this.pos == this.prefix.len() {
                this.prefix = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_and_parses_a_head() {
        let raw = b"GET /health?x=1 HTTP/1.1\r\nHost: a\r\nUpgrade: WebSocket\r\n\r\nrest";
        let mut r: &[u8] = raw;
        let got = read_head(&mut r, 1024).await.unwrap();
        assert!(got.starts_with(b"GET /health"));
        let head = parse_head(&got).unwrap();
        assert_eq!(head.method, "GET");
        assert_eq!(head.path, "/health");
        assert!(head.is_websocket);
        assert_eq!(head.token, None);
    }

    #[test]
    fn finds_tokens_in_query_or_header() {
        let h = parse_head(b"GET /?a=1&token=abc.def HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
        assert_eq!(h.path, "/");
        assert_eq!(h.token.as_deref(), Some("abc.def"));
        let h = parse_head(b"GET / HTTP/1.1\r\nAuthorization: Bearer  x.y \r\n\r\n").unwrap();
        assert_eq!(h.token.as_deref(), Some("x.y"));
        let h = parse_head(b"GET / HTTP/1.1\r\nAuthorization: Basic x\r\n\r\n").unwrap();
        assert_eq!(h.token, None);
    }

    #[tokio::test]
    async fn head_limits_hold() {
        let raw = vec![b'a'; 5000];
        let mut r: &[u8] = &raw;
        assert!(matches!(
            read_head(&mut r, 4096).await,
            Err(HeadError::TooLarge(4096))
        ));
        let mut r: &[u8] = b"GET / HTTP/1.1\r\n";
        assert!(matches!(read_head(&mut r, 4096).await, Err(HeadError::Eof)));
        assert!(parse_head(b"\x00\x01 nonsense\r\n\r\n").is_err());
    }

    #[tokio::test]
    async fn prefixed_replays_then_reads() {
        let inner: &[u8] = b" world";
        let mut p = Prefixed::new(b"hello".to_vec(), inner);
        let mut s = String::new();
        p.read_to_string(&mut s).await.unwrap();
        assert_eq!(s, "hello world");
    }
}
