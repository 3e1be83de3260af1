//! Byte-exact response framing for the mock provider: the response body type that
//! paces, splits and aborts, and the socket wrapper that makes an abort a real TCP reset.
//!
//! hyper turns every data frame of a body of unknown length into one HTTP chunk, but it
//! coalesces whatever frames are ready into a single socket write. Fault injection needs
//! more control than that, so the body cooperates with the socket wrapper through a small
//! per-connection [`ConnState`]:
//!
//! - `x-mock-split`: after each frame the body waits until the socket has been flushed
//!   (hyper always flushes once a body returns `Pending`), so every frame leaves in its
//!   own write and mid-line / mid-character splits really reach the peer separately.
//! - `x-mock-reset-after`: the body waits for a flush of everything before the cut, then
//!   marks the connection aborted and fails; hyper drops the connection without a
//!   terminating chunk and [`MockIo`]'s `Drop` sets `SO_LINGER` to zero so the close is
//!   an RST, not a FIN.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;

/// State shared by one connection's socket wrapper and the bodies written on it.
///
/// hyper polls the body and the socket from the same task, so the atomics are only
/// there to satisfy `Send`; `Relaxed` is enough.
#[derive(Debug, Default)]
pub(super) struct ConnState {
    /// Completed socket flushes so far.
    flushes: AtomicU64,
    /// A body is waiting for the next flush and must be woken by it.
    flush_waiter: AtomicBool,
    /// The connection must end with an RST.
    abort: AtomicBool,
}

/// How a body is cut into frames and paced.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Framing {
    /// Frames of exactly this many bytes (the last may be shorter) instead of one
    /// frame per event.
    pub split: Option<usize>,
    /// Sleep between frames.
    pub delay: Duration,
    /// Abort the connection once this many bytes have been written.
    pub reset_at: Option<usize>,
}

/// A response body: pre-rendered bytes emitted frame by frame.
pub(super) struct MockBody {
    data: Bytes,
    /// End offsets of the natural frames (SSE events; one for a JSON body).
    bounds: Vec<usize>,
    /// Report the exact length so hyper sends `Content-Length` instead of chunking.
    exact: bool,
    framing: Framing,
    conn: Option<Arc<ConnState>>,
    /// Bytes already emitted.
    pos: usize,
    /// Index into `bounds` of the next natural frame end.
    next_bound: usize,
    /// Where emission stops: the reset point, or the end of `data`.
    stop: usize,
    sleep: Option<Pin<Box<Sleep>>>,
    /// Waiting for `ConnState::flushes` to exceed this value.
    wait_flush: Option<u64>,
    /// The pre-abort flush has been requested.
    abort_flushed: bool,
    done: bool,
}

impl MockBody {
    /// A body with a known length (sent with `Content-Length`), emitted as one frame
    /// unless `framing` says otherwise.
    pub(super) fn full(data: Bytes, framing: Framing, conn: Option<Arc<ConnState>>) -> Self {
        let len = data.len();
        Self::new(data, vec![len], true, framing, conn)
    }

    /// A chunked body emitted one event (`bounds` are event end offsets) per frame.
    pub(super) fn chunked(
        data: Bytes,
        bounds: Vec<usize>,
        framing: Framing,
        conn: Option<Arc<ConnState>>,
    ) -> Self {
        Self::new(data, bounds, false, framing, conn)
    }

    fn new(
        data: Bytes,
        bounds: Vec<usize>,
        exact: bool,
        framing: Framing,
        conn: Option<Arc<ConnState>>,
    ) -> Self {
        // An abort needs the connection state; without it the body just ends normally.
        let framing = Framing {
            reset_at: framing.reset_at.filter(|_| conn.is_some()),
            split: framing.split.filter(|&n| n > 0),
            ..framing
        };
        let stop = framing.reset_at.map_or(data.len(), |at| at.min(data.len()));
        Self {
            data,
            bounds,
            exact,
            framing,
            conn,
            pos: 0,
            next_bound: 0,
            stop,
            sleep: None,
            wait_flush: None,
            abort_flushed: false,
            done: false,
        }
    }

    /// Remember the current flush count; the next frame waits until it has moved on.
    fn arm_flush_wait(&mut self) {
        if let Some(conn) = &self.conn {
            self.wait_flush = Some(conn.flushes.load(Ordering::Relaxed));
        }
    }

    /// End offset of the next frame.
    fn next_end(&mut self) -> usize {
        if let Some(n) = self.framing.split {
            return self.pos.saturating_add(n).min(self.stop);
        }
        while let Some(&end) = self.bounds.get(self.next_bound) {
            if end > self.pos {
                return end.min(self.stop);
            }
            self.next_bound += 1;
        }
        self.stop
    }
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            if let (Some(seen), Some(conn)) = (this.wait_flush, &this.conn) {
                if conn.flushes.load(Ordering::Relaxed) <= seen {
                    // hyper flushes right after we return Pending; MockIo wakes us then.
                    conn.flush_waiter.store(true, Ordering::Relaxed);
                    return Poll::Pending;
                }
                this.wait_flush = None;
            }
            if let Some(sleep) = this.sleep.as_mut() {
                ready!(sleep.as_mut().poll(cx));
                this.sleep = None;
            }
            if this.pos >= this.stop {
                if this.framing.reset_at.is_none() {
                    this.done = true;
                    return Poll::Ready(None);
                }
                if !this.abort_flushed {
                    // Everything before the cut must be on the wire before the RST,
                    // which would otherwise discard it.
                    this.abort_flushed = true;
                    this.arm_flush_wait();
                    continue;
                }
                this.done = true;
                if let Some(conn) = &this.conn {
                    conn.abort.store(true, Ordering::Relaxed);
                }
                return Poll::Ready(Some(Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "x-mock-reset-after: aborting the connection",
                ))));
            }
            let end = this.next_end();
            let frame = this.data.slice(this.pos..end);
            this.pos = end;
            if this.pos < this.stop {
                if !this.framing.delay.is_zero() {
                    this.sleep = Some(Box::pin(tokio::time::sleep(this.framing.delay)));
                } else if this.framing.split.is_some() {
                    this.arm_flush_wait();
                }
            }
            return Poll::Ready(Some(Ok(Frame::data(frame))));
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || (self.data.is_empty() && self.framing.reset_at.is_none())
    }

    fn size_hint(&self) -> SizeHint {
        if self.exact {
            SizeHint::with_exact(self.data.len() as u64)
        } else {
            SizeHint::default()
        }
    }
}

/// The accepted socket, wrapped to count flushes and to turn an abort into an RST.
pub(super) struct MockIo {
    stream: TcpStream,
    conn: Arc<ConnState>,
}

impl MockIo {
    pub(super) fn new(stream: TcpStream, conn: Arc<ConnState>) -> Self {
        Self { stream, conn }
    }
}

impl Drop for MockIo {
    fn drop(&mut self) {
        if self.conn.abort.load(Ordering::Relaxed) {
            // Zero linger makes close() send RST and discard nothing we still care about
            // (everything before the cut was flushed first).
            let _ = self.stream.set_zero_linger();
        }
    }
}

impl AsyncRead for MockIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for MockIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(Pin::new(&mut this.stream).poll_flush(cx))?;
        this.conn.flushes.fetch_add(1, Ordering::Relaxed);
        if this.conn.flush_waiter.swap(false, Ordering::Relaxed) {
            // Same task as the waiting body; make sure it is polled again.
            cx.waker().wake_by_ref();
        }
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.conn.abort.load(Ordering::Relaxed) {
            // A FIN first would make the abort look like a clean close; leave it to Drop.
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.stream).poll_shutdown(cx)
    }
}
