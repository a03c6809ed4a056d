//! A read deadline for upstream connections: an upstream that sends nothing for
//! `upstream_read_timeout_secs` while tollgate waits on it — mid-handshake, before its response
//! headers, or mid-body — fails with `TimedOut`, which hyper turns into a 502 before headers or
//! an aborted response after them. Like nginx's `proxy_read_timeout`, it also closes idle
//! upgraded (WebSocket) connections and idle pooled connections.
//!
//! Reads only record the time of progress; the timer is re-armed lazily when it fires, so the
//! hot path never touches the timer wheel.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// An IO stream whose reads fail after `timeout` without progress.
pub struct ReadDeadline<T> {
    inner: T,
    timeout: Duration,
    /// Last read or write progress.
    last: Instant,
    sleep: Pin<Box<Sleep>>,
}

impl<T> ReadDeadline<T> {
    pub fn new(inner: T, timeout: Duration) -> Self {
        let now = Instant::now();
        Self { inner, timeout, last: now, sleep: Box::pin(tokio::time::sleep_until(now + timeout)) }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// Pending read: fails once `timeout` has passed since the last progress.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        loop {
            let deadline = self.last + self.timeout;
            if self.sleep.deadline() != deadline {
                self.sleep.as_mut().reset(deadline);
            }
            if self.sleep.as_mut().poll(cx).is_pending() {
                return false;
            }
            if Instant::now() >= self.last + self.timeout {
                return true;
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ReadDeadline<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(result) => {
                self.last = Instant::now();
                Poll::Ready(result)
            }
            Poll::Pending if self.expired(cx) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("upstream sent nothing for {} s", self.timeout.as_secs()),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ReadDeadline<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = polled
            && n > 0
        {
            // A new request starts the wait for its answer afresh.
            self.last = Instant::now();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = polled
            && n > 0
        {
            self.last = Instant::now();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn a_silent_peer_times_out_and_a_talking_one_does_not() {
        let (ours, mut theirs) = tokio::io::duplex(64);
        let mut ours = ReadDeadline::new(ours, Duration::from_secs(10));
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
}
