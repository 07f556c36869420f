//! The listener gorp serves on: a TCP listener whose connections give hyper's automatic error
//! responses a JSON body.
//!
//! hyper answers a request it cannot parse (a request target over 64 KiB: 414; a header
//! section over its buffer: 431; a malformed request line or header: 400) by itself, before any
//! request reaches the router, with no body. [`JsonParseErrors`] recognises such a response as
//! hyper writes it (one of those statuses, `content-length: 0` and no `content-type`, which no
//! response of the router has: [`super::error::json_errors`] gives each error a JSON body) and
//! sends the same head with the JSON body of [`super::error::ErrorBody`] instead.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// A [`TcpListener`] whose connections are wrapped in [`JsonParseErrors`].
pub struct JsonErrorListener(pub TcpListener);

impl axum::serve::Listener for JsonErrorListener {
    type Io = JsonParseErrors<TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (io, addr) = axum::serve::Listener::accept(&mut self.0).await;
        (JsonParseErrors::new(io), addr)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.0.local_addr()
    }
}

/// A connection that rewrites hyper's bodiless parse-error responses (see the module docs).
pub struct JsonParseErrors<T> {
    inner: T,
    /// The rewritten response, still to be written before anything else.
    pending: Vec<u8>,
    written: usize,
}

impl<T> JsonParseErrors<T> {
    pub fn new(inner: T) -> Self {
        JsonParseErrors {
            inner,
            pending: Vec::new(),
            written: 0,
        }
    }
}

/// The JSON version of `buf` when it is exactly one of hyper's automatic error responses.
fn rewrite(buf: &[u8]) -> Option<Vec<u8>> {
    let (status, message) = if buf.starts_with(b"HTTP/1.1 400 ") {
        (
            axum::http::StatusCode::BAD_REQUEST,
            "the request could not be parsed as HTTP/1.1",
        )
    } else if buf.starts_with(b"HTTP/1.1 414 ") {
        (
            axum::http::StatusCode::URI_TOO_LONG,
            "the request target is longer than the server accepts",
        )
    } else if buf.starts_with(b"HTTP/1.1 431 ") {
        (
            axum::http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "the request's header section is larger than the server accepts",
        )
    } else {
        return None;
    };
    let head = std::str::from_utf8(buf).ok()?.strip_suffix("\r\n\r\n")?;
    let mut lines: Vec<&str> = head.split("\r\n").collect();
    let lower = |l: &str| l.to_ascii_lowercase();
    if head.contains("\r\n\r\n")
        || lines.iter().any(|l| lower(l).starts_with("content-type:"))
        || !lines
            .iter()
            .any(|l| lower(l).replace(' ', "") == "content-length:0")
    {
        return None;
    }
    lines.retain(|l| !lower(l).starts_with("content-length:"));
    let body = serde_json::to_vec(&super::error::ErrorBody {
        error: super::error::error_code(status),
        message: message.into(),
    })
    .ok()?;
    let mut out = lines.join("\r\n").into_bytes();
    out.extend_from_slice(
        format!(
            "\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    out.extend_from_slice(&body);
    Some(out)
}

impl<T: AsyncWrite + Unpin> JsonParseErrors<T> {
    /// Writes what is pending of a rewritten response.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.pending.len() {
            let n =
                ready!(Pin::new(&mut self.inner).poll_write(cx, &self.pending[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.pending.clear();
        self.written = 0;
        Poll::Ready(Ok(()))
    }

    /// Takes `buf` as written when it is one of hyper's error responses, queuing its rewrite.
    fn take_error_response(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Option<usize> {
        let out = rewrite(buf)?;
        self.pending = out;
        self.written = 0;
        // Start writing now; what is left is written by the next write, flush or shutdown
        // (hyper flushes and shuts down after an error response).
        if let Poll::Ready(Err(e)) = self.poll_drain(cx) {
            tracing::debug!(error = %e, "writing a parse-error response failed");
        }
        Some(buf.len())
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for JsonParseErrors<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for JsonParseErrors<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        ready!(this.poll_drain(cx))?;
        if let Some(n) = this.take_error_response(cx, buf) {
            return Poll::Ready(Ok(n));
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        ready!(this.poll_drain(cx))?;
        let mut parts = bufs.iter().filter(|b| !b.is_empty());
        if let (Some(only), None) = (parts.next(), parts.next()) {
            if let Some(n) = this.take_error_response(cx, only) {
                return Poll::Ready(Ok(n));
            }
        }
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::rewrite;

    #[test]
    fn only_hypers_bodiless_error_responses_are_rewritten() {
        let hyper = b"HTTP/1.1 414 URI Too Long\r\ncontent-length: 0\r\ndate: Mon, 01 Jan 2024 00:00:00 GMT\r\n\r\n";
        let out = String::from_utf8(rewrite(hyper).expect("rewritten")).unwrap();
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 414 URI Too Long\r\n"), "{head}");
        assert!(head.contains("date: Mon"), "{head}");
        assert!(head.contains("content-type: application/json"), "{head}");
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{head}"
        );
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"], "uri_too_long");
        for kept in [
            // A JSON error of the router.
            &b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n"[..],
            // Other statuses, and a head followed by body bytes.
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\nxx",
        ] {
            assert!(rewrite(kept).is_none(), "{}", String::from_utf8_lossy(kept));
        }
    }
}
