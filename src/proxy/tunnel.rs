//! No-decrypt passthrough: the client's bytes, ClientHello included, go to the destination
//! untouched, so the client sees the origin's own certificate.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::{ConnCtx, Proxy, ProxyError, Target};
use crate::telemetry::METRICS;

/// Relays bytes both ways until either side closes.
pub async fn run<IO>(
    proxy: Arc<Proxy>,
    mut client: IO,
    hello: Vec<u8>,
    target: Target,
    ctx: ConnCtx,
) -> Result<(), ProxyError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    METRICS.tunnels_total.fetch_add(1, Relaxed);
    let mut upstream = proxy.dial(&target).await?;
    upstream.write_all(&hello).await?;
    let (up, down) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await.unwrap_or((0, 0));
    tracing::info!(target: "tollgate::access", client = %ctx.client, mode = ctx.mode.as_str(), host = %target.host,
        action = "tunnel", bytes_up = up + hello.len() as u64, bytes_down = down, "tunnel closed");
    Ok(())
}
