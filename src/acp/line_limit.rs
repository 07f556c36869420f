//! The agent's stdout as gorp reads it: lines bounded in length, and read no faster than gorp
//! writes what they say.
//!
//! ACP over stdio is one JSON-RPC message per line, and the protocol crate buffers a whole line
//! before it parses it. An agent that writes a line without end (a bug, or 100 MB of output in
//! one message) would make gorp buffer all of it; this reader fails the stream instead once a
//! line passes the limit, and says so through a flag the client reads to explain the failure.
//!
//! The protocol crate also queues parsed messages without bound before its handlers see them,
//! so an agent that floods updates faster than the database takes them would fill gorp's
//! memory. While gorp's own (bounded) event queue is full, this reader stops reading, checking
//! again every [`PAUSE`]; the agent then blocks on its full pipe.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use std::future::Future;
use std::time::Duration;

use tokio::io::{AsyncRead, ReadBuf};

/// How long reading pauses before it checks again whether gorp has caught up.
pub const PAUSE: Duration = Duration::from_millis(2);

/// Tells whether gorp is behind with what it read (reading then pauses).
pub type Backlogged = Arc<dyn Fn() -> bool + Send + Sync>;

pub struct LineLimit<R> {
    inner: R,
    max: usize,
    /// Bytes read since the last newline.
    current: usize,
    tripped: Arc<AtomicBool>,
    backlogged: Option<Backlogged>,
    pause: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Counts the lines read (complete ones).
    lines: Arc<std::sync::atomic::AtomicU64>,
}

impl<R> LineLimit<R> {
    /// Wraps `inner`; `tripped` is set when a line passes `max` bytes.
    pub fn new(inner: R, max: usize, tripped: Arc<AtomicBool>) -> Self {
        LineLimit {
            inner,
            max,
            current: 0,
            tripped,
            backlogged: None,
            pause: None,
            lines: Default::default(),
        }
    }

    /// Counts every complete line read into `lines`.
    pub fn counting_lines(mut self, lines: Arc<std::sync::atomic::AtomicU64>) -> Self {
        self.lines = lines;
        self
    }

    /// Pauses reading while `backlogged` says so.
    pub fn with_backpressure(mut self, backlogged: Backlogged) -> Self {
        self.backlogged = Some(backlogged);
        self
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for LineLimit<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.tripped.load(Ordering::Relaxed) {
            return Poll::Ready(Err(too_long(self.max)));
        }
        let this = &mut *self;
        loop {
            if let Some(pause) = this.pause.as_mut() {
                if pause.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.pause = None;
            }
            match &this.backlogged {
                Some(behind) if behind() => {
                    this.pause = Some(Box::pin(tokio::time::sleep(PAUSE)));
                }
                _ => break,
            }
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                // The first piece continues the current line; every later one starts a line.
                let mut pieces = buf.filled()[before..].split(|&b| b == b'\n');
                let mut run = this.current + pieces.next().map_or(0, <[u8]>::len);
                let mut over = run > this.max;
                let mut ended = 0;
                for piece in pieces {
                    run = piece.len();
                    over |= run > this.max;
                    ended += 1;
                }
                this.current = run;
                this.lines.fetch_add(ended, Ordering::Relaxed);
                if over {
                    // An error must not come with data.
                    buf.set_filled(before);
                    this.tripped.store(true, Ordering::Relaxed);
                    return Poll::Ready(Err(too_long(this.max)));
                }
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

fn too_long(max: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("the agent wrote a line (one ACP message) longer than {max} bytes"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    async fn read_all(input: &[u8], max: usize) -> (io::Result<Vec<u8>>, bool) {
        let flag = Arc::new(AtomicBool::new(false));
        let mut r = LineLimit::new(input, max, flag.clone());
        let mut out = Vec::new();
        let res = r.read_to_end(&mut out).await.map(|_| out);
        (res, flag.load(Ordering::Relaxed))
    }

    #[tokio::test]
    async fn lines_up_to_the_limit_pass() {
        let (r, tripped) = read_all(b"12345\n1234\n12345", 5).await;
        assert_eq!(r.unwrap(), b"12345\n1234\n12345");
        assert!(!tripped);
    }

    #[tokio::test]
    async fn a_longer_line_fails_the_stream_and_sets_the_flag() {
        let (r, tripped) = read_all(b"ok\n123456\nmore\n", 5).await;
        let e = r.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("longer than 5 bytes"), "{e}");
        assert!(tripped);
    }
}

#[cfg(test)]
mod backpressure_tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn reading_waits_while_backlogged() {
        let calls = Arc::new(AtomicUsize::new(0));
        let checks = calls.clone();
        let flag = Arc::new(AtomicBool::new(false));
        // Behind for the first three checks, then caught up.
        let mut r = LineLimit::new(&b"a\nb\n"[..], 10, flag)
            .with_backpressure(Arc::new(move || checks.fetch_add(1, Ordering::Relaxed) < 3));
        let mut out = Vec::new();
        r.read_to_end(&mut out).await.unwrap();
        assert_eq!(out, b"a\nb\n");
        assert!(
            calls.load(Ordering::Relaxed) >= 4,
            "asked until no longer behind"
        );
    }
}
