//! No-decrypt passthrough: the client's bytes, ClientHello included, go to the destination
//! untouched, so the client sees the origin's own certificate. A tunnel with no byte in either
//! direction for `tunnel_idle_timeout_secs` is closed.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;

use super::{ConnCtx, Proxy, ProxyError, Target};
use crate::telemetry::METRICS;

/// Relays bytes both ways until either side closes, or neither sends anything for the idle
/// timeout.
pub async fn run<IO>(
    proxy: Arc<Proxy>,
    client: IO,
    hello: Vec<u8>,
    target: Target,
    ctx: ConnCtx,
    rule: Option<Arc<str>>,
) -> Result<(), ProxyError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    METRICS.tunnels_total.inc();
    let mut upstream = proxy.dial(&target).await?;
    upstream.write_all(&hello).await?;
    let (up, down, idle) = relay(client, upstream, proxy.tunnel_idle_timeout).await;
    tracing::info!(target: "tollgate::access", client = %ctx.client, mode = ctx.mode.as_str(), listener = %ctx.listener(),
        user = ctx.user.as_deref(), host = %target.host, action = "tunnel", rule = rule.as_deref(),
        bytes_up = up + hello.len() as u64, bytes_down = down, idle_timeout = idle, "tunnel closed");
    Ok(())
}

/// Copies both ways; (bytes up, bytes down, whether it ended for being idle). The counts
/// hold what was relayed even when a side ends with a reset rather than a close.
async fn relay<A, B>(a: A, b: B, idle: Duration) -> (u64, u64, bool)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let start = Instant::now();
    // Milliseconds since `start` when either side last sent something: every byte written was
    // read from the other side first, so reads are all that need stamping.
    let last = AtomicU64::new(0);
    let (from_a, from_b) = (AtomicU64::new(0), AtomicU64::new(0));
    let mut a = Stamped { inner: a, last: &last, read: &from_a, start };
    let mut b = Stamped { inner: b, last: &last, read: &from_b, start };
    let copy = tokio::io::copy_bidirectional(&mut a, &mut b);
    tokio::pin!(copy);
    let mut check = start + idle;
    let idle = loop {
        tokio::select! {
            _ = &mut copy => break false,
            () = tokio::time::sleep_until(check) => {
                let deadline = start + Duration::from_millis(last.load(Relaxed)) + idle;
                if Instant::now() >= deadline {
                    break true;
                }
                check = deadline;
            }
        }
    };
    (from_a.load(Relaxed), from_b.load(Relaxed), idle)
}

/// A stream that counts what it reads and stamps the time of each read that brought bytes.
struct Stamped<'a, T> {
    inner: T,
    last: &'a AtomicU64,
    read: &'a AtomicU64,
    start: Instant,
}

impl<T: AsyncRead + Unpin> AsyncRead for Stamped<'_, T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if read > 0 {
            self.read.fetch_add(read as u64, Relaxed);
            self.last.store(self.start.elapsed().as_millis() as u64, Relaxed);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Stamped<'_, T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
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
    use tokio::io::AsyncReadExt;

    #[tokio::test(start_paused = true)]
    async fn a_tunnel_is_closed_only_after_both_directions_have_been_idle() {
        let (client, mut client_end) = tokio::io::duplex(64);
        let (upstream, mut upstream_end) = tokio::io::duplex(64);
        let relay = tokio::spawn(relay(client, upstream, Duration::from_secs(10)));
        // A download: only the upstream talks, every 6 s, for 30 s. Never idle for 10 s.
        let mut buf = [0u8; 8];
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_secs(6)).await;
            upstream_end.write_all(b"x").await.unwrap();
            assert_eq!(client_end.read(&mut buf).await.unwrap(), 1);
        }
        assert!(!relay.is_finished(), "a one-way transfer is not idle");
        let started = Instant::now();
        let (up, down, idle) = relay.await.unwrap();
        assert!(idle, "closed for being idle");
        assert_eq!((up, down), (0, 5), "what was relayed is counted even when idle ends it");
        assert_eq!(started.elapsed(), Duration::from_secs(10), "10 s after the last byte");
    }
}
