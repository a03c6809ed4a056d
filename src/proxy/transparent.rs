//! Inline transparent mode (D2): traffic the kernel redirected to us. With nftables/iptables
//! REDIRECT the original destination comes from SO_ORIGINAL_DST (IPv4) or IP6T_SO_ORIGINAL_DST
//! (IPv6); with TPROXY the listening socket is IP_TRANSPARENT and the accepted socket's local
//! address is the original destination. Either way the connection then goes through the one
//! pipeline, connecting upstream to the address the client chose.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use nix::sys::socket::{getsockopt, setsockopt, sockopt};
use tokio::net::{TcpSocket, TcpStream};

use super::{ConnCtx, Target};
use crate::config::{ListenerConfig, ListenerMode};

/// Where a redirected connection was going: the original destination, or, behind a load
/// balancer speaking the PROXY protocol, the one its header carried. `None` (logged) for a
/// connection the kernel did not redirect. The connection then goes through
/// `intercept::serve` like an sni one.
pub fn target(stream: &super::Client, ctx: &ConnCtx, tproxy: bool) -> Option<Target> {
    let found = ctx.carried_destination().map(Ok).unwrap_or_else(|| original_destination(stream.get_ref(), tproxy));
    match found {
        Ok(dst) => Some(Target { host: dst.ip().to_string(), port: dst.port(), addr: Some(dst) }),
        Err(e) => {
            tracing::warn!(client = %ctx.client, error = %e, "transparent connection without an original destination (not redirected by the kernel?)");
            None
        }
    }
}

/// Binds a listener socket on `addr` (SO_REUSEPORT, so every data-plane thread can bind its
/// own on the same address and the kernel spreads connections over them); a TPROXY listener
/// gets IP_TRANSPARENT before binding. Returned as a std socket: the thread that serves it
/// registers it with its own runtime.
pub fn bind(config: &ListenerConfig, addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    if config.mode == ListenerMode::Transparent && config.tproxy {
        setsockopt(&socket, sockopt::IpTransparent, &true).map_err(io::Error::from)?;
    }
    socket.bind(addr)?;
    socket.listen(1024)?.into_std()
}

/// The destination the client dialled before the kernel sent the connection to us.
pub fn original_destination(stream: &TcpStream, tproxy: bool) -> io::Result<SocketAddr> {
    let local = stream.local_addr()?;
    if tproxy {
        return Ok(unmapped(local));
    }
    // A dual-stack [::] listener sees IPv4 clients as v4-mapped addresses: their original
    // destination is an IPv4 one, asked for at the IPv4 level.
    let v4 = match local {
        SocketAddr::V4(_) => true,
        SocketAddr::V6(v6) => v6.ip().to_ipv4_mapped().is_some(),
    };
    Ok(match local {
        _ if v4 => {
            let sa = getsockopt(stream, sockopt::OriginalDst).map_err(io::Error::from)?;
            SocketAddr::from((Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)), u16::from_be(sa.sin_port)))
        }
        _ => {
            let sa = getsockopt(stream, sockopt::Ip6tOriginalDst).map_err(io::Error::from)?;
            SocketAddr::from((Ipv6Addr::from(sa.sin6_addr.s6_addr), u16::from_be(sa.sin6_port)))
        }
    })
}

/// An IPv4 address as itself, not as a v4-mapped IPv6 one (dual-stack sockets report those).
fn unmapped(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::from((v4, v6.port())),
            None => addr,
        },
        v4 => v4,
    }
}
