//! Stall deadlines on a connection, like nginx's `proxy_read_timeout` and `send_timeout`:
//! - read: a peer that sends nothing for this long while we wait on it fails with `TimedOut`.
//!   Upstreams get it (mid-handshake, before response headers, mid-body: hyper turns it into a
//!   502 before headers or an aborted response after); it also closes idle pooled and upgraded
//!   (WebSocket) connections.
//! - write: a peer that accepts none of our bytes for this long fails the write. Clients get
//!   it: a slow reader cannot pin a response (and its upstream) for ever.
//!
//! Progress only records a timestamp; a timer is re-armed lazily when it fires, so the hot path
//! never touches the timer wheel.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// An IO stream with optional read and write stall deadlines.
pub struct Deadlines<T> {
    inner: T,
    read: Option<Clock>,
    write: Option<Clock>,
}

/// One deadline: `timeout` after `since` (the last progress, or when the wait began).
struct Clock {
    timeout: Duration,
    since: Instant,
    /// Whether a wait is under way (writes only count while blocked).
    waiting: bool,
    sleep: Pin<Box<Sleep>>,
}

impl Clock {
    fn new(timeout: Duration) -> Self {
        let now = Instant::now();
        Self { timeout, since: now, waiting: false, sleep: Box::pin(tokio::time::sleep_until(now + timeout)) }
    }

    /// Whether the deadline has passed; otherwise the timer wakes `cx` when it might have.
    ///
    /// The timer is never later than the deadline (`since` only moves forward), so it is left
    /// alone while progress pushes the deadline out, and re-armed only when it fires early:
    /// at most once per `timeout`, not once per read.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        loop {
            if self.sleep.as_mut().poll(cx).is_pending() {
                return false;
            }
            let deadline = self.since + self.timeout;
            if Instant::now() >= deadline {
                return true;
            }
            self.sleep.as_mut().reset(deadline);
        }
    }

    fn error(&self, what: &str) -> io::Error {
        io::Error::new(io::ErrorKind::TimedOut, format!("{what} for {} s", self.timeout.as_secs()))
    }
}

impl<T> Deadlines<T> {
    /// No deadlines yet.
    pub fn new(inner: T) -> Self {
        Self { inner, read: None, write: None }
    }

    /// Reads fail after `timeout` without progress.
    pub fn read_deadline(mut self, timeout: Duration) -> Self {
        self.read = Some(Clock::new(timeout));
        self
    }

    /// Writes fail after being blocked `timeout` without progress.
    pub fn write_deadline(mut self, timeout: Duration) -> Self {
        self.write = Some(Clock::new(timeout));
        self
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// Bytes went out: a new exchange starts the wait for its answer afresh, and a blocked
    /// writer made progress.
    fn wrote(&mut self) {
        let now = Instant::now();
        if let Some(read) = &mut self.read {
            read.since = now;
        }
        if let Some(write) = &mut self.write {
            write.waiting = false;
        }
    }

    /// Accounts for a write's outcome: progress, or a blocked write past its deadline.
    fn after_write(&mut self, cx: &mut Context<'_>, polled: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        match polled {
            Poll::Ready(Ok(n)) => {
                self.wrote();
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match self.write_blocked(cx) {
                Some(e) => Poll::Ready(Err(e)),
                None => Poll::Pending,
            },
        }
    }

    fn write_blocked(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        let write = self.write.as_mut()?;
        if !write.waiting {
            write.waiting = true;
            write.since = Instant::now();
        }
        write.expired(cx).then(|| write.error("peer accepted no bytes"))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Deadlines<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if let Some(read) = &mut self.read {
                    read.since = Instant::now();
                }
                Poll::Ready(result)
            }
            Poll::Pending => match &mut self.read {
                Some(read) => match read.expired(cx) {
                    true => Poll::Ready(Err(read.error("peer sent nothing"))),
                    false => Poll::Pending,
                },
                None => Poll::Pending,
            },
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Deadlines<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, data);
        self.after_write(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.after_write(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.inner).poll_flush(cx) {
            Poll::Pending => match self.write_blocked(cx) {
                Some(e) => Poll::Ready(Err(e)),
                None => Poll::Pending,
            },
            ready => ready,
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn a_silent_peer_times_out_and_a_talking_one_does_not() {
        let (ours, mut theirs) = tokio::io::duplex(64);
        let mut ours = Deadlines::new(ours).read_deadline(Duration::from_secs(10));
        let mut buf = [0u8; 8];
        // Bytes every 6 s keep it alive past the 10 s deadline.
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(6)).await;
            theirs.write_all(b"x").await.unwrap();
            assert_eq!(ours.read(&mut buf).await.unwrap(), 1);
        }
        let started = Instant::now();
        let err = ours.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_stops_reading_fails_our_writes() {
        let (ours, mut theirs) = tokio::io::duplex(16);
        let mut ours = Deadlines::new(ours).write_deadline(Duration::from_secs(5));
        // A reader draining slowly but steadily is fine.
        for _ in 0..4 {
            ours.write_all(&[0; 16]).await.unwrap();
            tokio::time::sleep(Duration::from_secs(4)).await;
            let mut buf = [0u8; 16];
            theirs.read_exact(&mut buf).await.unwrap();
        }
        // One that stops reading: the blocked write fails 5 s after it blocked.
        ours.write_all(&[0; 16]).await.unwrap();
        let started = Instant::now();
        let err = ours.write_all(&[0; 16]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(5));
    }
}
