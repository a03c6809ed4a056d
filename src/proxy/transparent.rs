//! Inline transparent mode (D2): traffic the kernel redirected to us. With nftables/iptables
//! REDIRECT the original destination comes from SO_ORIGINAL_DST (IPv4) or IP6T_SO_ORIGINAL_DST
//! (IPv6); with TPROXY the listening socket is IP_TRANSPARENT and the accepted socket's local
//! address is the original destination. Either way the connection then goes through the one
//! pipeline, connecting upstream to the address the client chose.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use nix::sys::socket::{getsockopt, setsockopt, sockopt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use super::{ConnCtx, Proxy, Target};
use crate::config::{ListenerConfig, ListenerMode};

/// Serves one redirected connection.
pub async fn serve(proxy: Arc<Proxy>, stream: TcpStream, ctx: ConnCtx, tproxy: bool) {
    let dst = match original_destination(&stream, tproxy) {
        Ok(dst) => dst,
        Err(e) => {
            tracing::warn!(client = %ctx.client, error = %e, "transparent connection without an original destination (not redirected by the kernel?)");
            return;
        }
    };
    let target = Target { host: dst.ip().to_string(), port: dst.port(), addr: Some(dst) };
    super::intercept::serve(proxy, stream, Some(target), ctx).await;
}

/// Binds a listener; a TPROXY listener gets IP_TRANSPARENT before binding.
pub fn bind(config: &ListenerConfig) -> io::Result<TcpListener> {
    let socket = if config.listen.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    if config.mode == ListenerMode::Transparent && config.tproxy {
        setsockopt(&socket, sockopt::IpTransparent, &true).map_err(io::Error::from)?;
    }
    socket.bind(config.listen)?;
    socket.listen(1024)
}

/// The destination the client dialled before the kernel sent the connection to us.
pub fn original_destination(stream: &TcpStream, tproxy: bool) -> io::Result<SocketAddr> {
    let local = stream.local_addr()?;
    if tproxy {
        return Ok(local);
    }
    Ok(match local {
        SocketAddr::V4(_) => {
            let sa = getsockopt(stream, sockopt::OriginalDst).map_err(io::Error::from)?;
            SocketAddr::from((Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)), u16::from_be(sa.sin_port)))
        }
        SocketAddr::V6(_) => {
            let sa = getsockopt(stream, sockopt::Ip6tOriginalDst).map_err(io::Error::from)?;
            SocketAddr::from((Ipv6Addr::from(sa.sin6_addr.s6_addr), u16::from_be(sa.sin6_port)))
        }
    })
}
