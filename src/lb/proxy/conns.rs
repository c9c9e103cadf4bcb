//! Backend connections of the own HTTP/1.1 path ([`super::http1`]): plain TCP
//! streams to instances, each with the bytes read past its last response, kept
//! per instance address for the next request.
//!
//! ```text
//!  ConnPool::take(addr) ─▶ an idle connection the backend has not closed
//!       └─ none ─▶ BackendConn::connect (connect_timeout, TCP_NODELAY)
//!  exchange done, backend keeps it open, nothing unread ─▶ ConnPool::put
//!  table change / POOL_SWEEP ─▶ ConnPool::prune (addresses no table has, closed ones)
//! ```
//!
//! HTTP/2 clients' requests use the same connections: their answer's body is
//! an [`AnswerBody`], read from the connection as the client asks for it, and
//! the connection goes back to the pool when the body ended cleanly.
//!
//! A pooled connection is looked at once when taken: the runtime already
//! knows (from epoll, without a syscall) whether the socket became readable
//! while idle; only then is it read to tell a close from stray bytes, and
//! either way it is dropped. The pool belongs to one proxy thread (one
//! runtime), so connections never hop between reactors.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use hyper::body::{Body, Frame, SizeHint};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::TcpStream;

use super::{MAX_IDLE_PER_INSTANCE, OwnedRelease};
use crate::lb::body::BoxError;
use crate::lb::h1::{Framing, chunked};
use crate::lb::table::Carryover;

/// Read buffer made for a new backend connection (it grows for large heads).
const READ_BUFFER: usize = 16 * 1024;

/// A connection to an instance and what was read on it past the last response.
pub(super) struct BackendConn {
    pub stream: TcpStream,
    pub buf: BytesMut,
    /// Taken from the pool: if it fails before any byte of an answer, the
    /// backend closed it while idle, and the request goes on a new one.
    pub reused: bool,
}

impl BackendConn {
    /// A new connection to `addr`, within `timeout`.
    pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<Self, ConnectError> {
        let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| ConnectError::Timeout(timeout))?
            .map_err(ConnectError::Io)?;
        let _ = stream.set_nodelay(true);
        Ok(Self {
            stream,
            buf: BytesMut::with_capacity(READ_BUFFER),
            reused: false,
        })
    }

    /// Whether an idle connection is still usable: nothing came on it since
    /// its last response (a close, or bytes nobody asked for, end it).
    fn still_open(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match self.stream.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => {
                // Readable since it went idle, or readiness left over from the
                // last read: one read tells (WouldBlock: still open).
                let mut byte = [0u8; 1];
                matches!(self.stream.try_read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
            }
        }
    }
}

/// An answer's body read from its backend connection as the client asks for
/// it (HTTP/2 clients); the connection goes back to the pool when the body
/// ended cleanly and the backend keeps it open, and the instance's slot is
/// given back when the body is done or dropped.
pub(super) struct AnswerBody {
    conn: Option<BackendConn>,
    framing: Framing,
    /// Content-Length: bytes still to come.
    left: u64,
    decoder: chunked::Decoder,
    /// The backend keeps the connection open after this answer.
    keep: bool,
    addr: SocketAddr,
    pool: Arc<ConnPool>,
    _release: OwnedRelease,
}

impl AnswerBody {
    /// The body of the answer whose head was just taken from `conn.buf`.
    pub fn new(
        conn: BackendConn,
        framing: Framing,
        keep: bool,
        addr: SocketAddr,
        pool: Arc<ConnPool>,
        release: OwnedRelease,
    ) -> Self {
        let mut body = Self {
            conn: Some(conn),
            framing,
            left: match framing {
                Framing::Length(n) => n,
                _ => 0,
            },
            decoder: chunked::Decoder::new(),
            keep,
            addr,
            pool,
            _release: release,
        };
        if framing == Framing::Empty || framing == Framing::Length(0) {
            body.finish(true);
        }
        body
    }

    /// The body is over: the connection goes back to the pool when it `clean`ly
    /// ended, the backend keeps it, and nothing unread is on it.
    fn finish(&mut self, clean: bool) {
        if let Some(conn) = self.conn.take()
            && clean
            && self.keep
            && conn.buf.is_empty()
        {
            self.pool.put(self.addr, conn);
        }
    }

    /// The next piece of body data in the connection's buffer, if there is one.
    fn buffered(&mut self) -> Result<Option<Bytes>, BoxError> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(None);
        };
        match self.framing {
            Framing::Empty => Ok(None),
            Framing::Length(_) => {
                if conn.buf.is_empty() {
                    return Ok(None);
                }
                let take = self.left.min(conn.buf.len() as u64) as usize;
                let data = conn.buf.split_to(take).freeze();
                self.left -= take as u64;
                if self.left == 0 {
                    self.finish(true);
                }
                Ok(Some(data))
            }
            Framing::Chunked => {
                while !conn.buf.is_empty() {
                    let step = self.decoder.step(&conn.buf)?;
                    if let Some(range) = step.data {
                        conn.buf.advance(range.start);
                        let data = conn.buf.split_to(range.len()).freeze();
                        conn.buf.advance(step.consumed - range.end);
                        return Ok(Some(data));
                    }
                    conn.buf.advance(step.consumed);
                    if step.done {
                        self.finish(true);
                        return Ok(None);
                    }
                }
                Ok(None)
            }
            Framing::UntilClose => Ok((!conn.buf.is_empty()).then(|| conn.buf.split().freeze())),
        }
    }
}

impl Body for AnswerBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            match this.buffered() {
                Ok(Some(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                Ok(None) => {}
                Err(e) => {
                    this.finish(false);
                    return Poll::Ready(Some(Err(e)));
                }
            }
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            conn.buf.reserve(READ_BUFFER);
            let dst = conn.buf.spare_capacity_mut();
            let mut read = ReadBuf::uninit(dst);
            let polled = ready!(Pin::new(&mut conn.stream).poll_read(cx, &mut read));
            let n = read.filled().len();
            match polled {
                Ok(()) if n > 0 => {
                    // SAFETY: `poll_read` initialised the first `n` bytes of the spare capacity.
                    unsafe { conn.buf.set_len(conn.buf.len() + n) };
                }
                Ok(()) if this.framing == Framing::UntilClose => {
                    this.finish(false);
                    return Poll::Ready(None);
                }
                Ok(()) => {
                    this.finish(false);
                    return Poll::Ready(Some(Err("the service's answer broke off".into())));
                }
                Err(e) => {
                    this.finish(false);
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.conn.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match (self.framing, &self.conn) {
            (_, None) => SizeHint::with_exact(0),
            (Framing::Length(_), Some(_)) => SizeHint::with_exact(self.left),
            _ => SizeHint::default(),
        }
    }
}

/// Why no connection to an instance could be made (the instance is then ejected).
#[derive(Debug, thiserror::Error)]
pub(super) enum ConnectError {
    /// No connection within the connect timeout.
    #[error("connect timed out after {0:?}")]
    Timeout(Duration),
    /// The connection was refused or failed.
    #[error("{0}")]
    Io(std::io::Error),
}

/// Idle backend connections by instance address.
#[derive(Default)]
pub(super) struct ConnPool {
    idle: Mutex<HashMap<SocketAddr, Vec<BackendConn>>>,
}

impl ConnPool {
    /// An idle connection to `addr` that is still open, if there is one.
    pub fn take(&self, addr: SocketAddr) -> Option<BackendConn> {
        let mut idle = self.idle.lock();
        let list = idle.get_mut(&addr)?;
        while let Some(mut conn) = list.pop() {
            if conn.still_open() {
                conn.reused = true;
                return Some(conn);
            }
        }
        idle.remove(&addr);
        None
    }

    /// Keeps `conn` for the next request to `addr` (up to
    /// [`MAX_IDLE_PER_INSTANCE`] per address; beyond, it is closed).
    pub fn put(&self, addr: SocketAddr, conn: BackendConn) {
        let mut idle = self.idle.lock();
        let list = idle.entry(addr).or_default();
        if list.len() < MAX_IDLE_PER_INSTANCE {
            list.push(conn);
        }
    }

    /// Drops the connections of addresses in no table any more and those
    /// the backend closed.
    pub fn prune(&self, health: &Carryover) {
        let mut idle = self.idle.lock();
        for list in idle.values_mut() {
            list.retain_mut(BackendConn::still_open);
        }
        idle.retain(|_, list| !list.is_empty());
        health.retain_live(&mut idle);
    }

    /// Closes every idle connection.
    pub fn clear(&self) {
        self.idle.lock().clear();
    }

    /// Addresses with idle connections (for the tests).
    #[cfg(test)]
    pub fn addresses(&self) -> usize {
        self.idle.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// Connections of addresses that left every table are dropped, and so is
    /// one the backend closed while it sat idle (without a request sent on it).
    #[tokio::test]
    async fn the_pool_forgets_left_addresses_and_closed_connections() {
        let health = Carryover::new();
        let pool = ConnPool::default();
        let (mut addrs, mut accepted) = (Vec::new(), Vec::new());
        for _ in 0..3 {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let _ = health.get(addr);
            let conn = BackendConn::connect(addr, Duration::from_secs(5)).await.unwrap();
            accepted.push(listener.accept().await.unwrap().0);
            pool.put(addr, conn);
            addrs.push(addr);
        }
        pool.prune(&health);
        assert_eq!(pool.addresses(), 3, "all three are live and open");
        health.retain(&addrs[..2].iter().copied().collect());
        pool.prune(&health);
        assert_eq!(pool.addresses(), 2, "the one that left the table is gone");

        // The backend closes the second connection; the runtime sees it readable.
        drop(accepted.remove(1));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(pool.take(addrs[1]).is_none(), "a closed connection is not handed out");
        let open = pool.take(addrs[0]).expect("the open one is");
        assert!(open.reused);
        assert_eq!(pool.addresses(), 1, "the closed one's address is forgotten");
    }
}
