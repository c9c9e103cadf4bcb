//! Spliced connections: bytes copied both ways between a client and a backend,
//! for `haproxy_tcp` listeners and upgraded HTTP connections (WebSocket).
//!
//! ```text
//!  client ◀──copy_bidirectional──▶ backend     (half-closes passed on)
//!     └─ progress counter ◀── every read and write on the client side
//!  watchdog: no progress for `idle` ─▶ cut      shutdown ─▶ cut
//! ```
//!
//! `idle` is HAProxy's `timeout tunnel` (PanteraS: 3600 s): inactivity in both
//! directions, not a lifetime, so a busy WebSocket lives as long as it is used
//! and an abandoned one frees its descriptors. The watchdog looks every quarter
//! of `idle`, so a silent splice is cut between `idle` and 1.25 x `idle` after
//! its last byte; no timer is touched per byte.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;

/// How a splice ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpliceEnd {
    /// Both sides closed (or one failed).
    Closed,
    /// Nothing moved either way for the idle timeout.
    Idle,
    /// The lb is shutting down.
    Shutdown,
}

/// Copies between `client` and `backend` until both are done, neither side
/// moves a byte for `idle`, or `shutdown`.
pub async fn splice<C, B>(client: C, mut backend: B, idle: Duration, shutdown: &CancellationToken) -> SpliceEnd
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let progress = AtomicU64::new(0);
    let mut client = Counted {
        inner: client,
        progress: &progress,
    };
    let check = (idle / 4).max(Duration::from_millis(1));
    let watchdog = async {
        let mut seen = progress.load(Ordering::Relaxed);
        let mut quiet = Duration::ZERO;
        loop {
            tokio::time::sleep(check).await;
            let now = progress.load(Ordering::Relaxed);
            if now == seen {
                quiet += check;
                if quiet >= idle {
                    return;
                }
            } else {
                (seen, quiet) = (now, Duration::ZERO);
            }
        }
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut backend) => SpliceEnd::Closed,
        _ = watchdog => SpliceEnd::Idle,
        _ = shutdown.cancelled() => SpliceEnd::Shutdown,
    }
}

/// The client side, counting every read and write that moved bytes (every
/// byte of a splice passes the client side one way or the other).
struct Counted<'p, T> {
    inner: T,
    progress: &'p AtomicU64,
}

impl<T> Counted<'_, T> {
    fn moved(&self) {
        self.progress.fetch_add(1, Ordering::Relaxed);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<'_, T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.moved();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<'_, T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.moved();
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    const IDLE: Duration = Duration::from_secs(60);

    #[tokio::test(start_paused = true)]
    async fn a_busy_splice_outlives_the_idle_timeout_and_a_silent_one_is_cut() {
        let (client, mut client_peer) = duplex(64);
        let (backend, mut backend_peer) = duplex(64);
        let shutdown = CancellationToken::new();
        let started = tokio::time::Instant::now();
        let spliced = tokio::spawn(async move { splice(client, backend, IDLE, &shutdown).await });
        // Three idle periods of traffic, one byte every 20 s, both ways.
        for i in 0..9u8 {
            tokio::time::sleep(Duration::from_secs(20)).await;
            if i % 2 == 0 {
                client_peer.write_all(&[i]).await.unwrap();
                assert_eq!(backend_peer.read_u8().await.unwrap(), i);
            } else {
                backend_peer.write_all(&[i]).await.unwrap();
                assert_eq!(client_peer.read_u8().await.unwrap(), i);
            }
        }
        assert!(!spliced.is_finished(), "cut while in use");
        let last = tokio::time::Instant::now();
        assert_eq!(spliced.await.unwrap(), SpliceEnd::Idle);
        let quiet = last.elapsed();
        assert!(
            quiet >= IDLE && quiet <= IDLE + IDLE / 4 + IDLE / 4,
            "cut after {quiet:?} of silence"
        );
        assert!(started.elapsed() > 3 * IDLE);
    }

    #[tokio::test]
    async fn both_sides_closing_ends_it_and_shutdown_cuts_it() {
        let (client, client_peer) = duplex(64);
        let (backend, backend_peer) = duplex(64);
        drop((client_peer, backend_peer));
        let shutdown = CancellationToken::new();
        assert_eq!(splice(client, backend, IDLE, &shutdown).await, SpliceEnd::Closed);

        let (client, _client_peer) = duplex(64);
        let (backend, _backend_peer) = duplex(64);
        shutdown.cancel();
        assert_eq!(splice(client, backend, IDLE, &shutdown).await, SpliceEnd::Shutdown);
    }
}
