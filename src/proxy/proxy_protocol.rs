//! The PROXY protocol (HAProxy's; v1 text and v2 binary) on listeners behind a load balancer
//! (`proxy_protocol = true`): every connection starts with a header carrying the client's
//! address, which is then what decryption rules, logs and per-client limits see. Only peers in
//! `trusted_proxies` may send one — anyone else could claim any address — and on such a
//! listener a connection without a valid header is refused.
//!
//! The header is taken off the socket exactly: a v2 header states its length in its first
//! 16 bytes, a v1 header ends at its CRLF (seen by peeking), so nothing after it is consumed
//! and the connection goes on as if it had started there. Parsing is the `ppp` crate's.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// The v2 header's first 12 bytes.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// The v2 header's fixed part: signature, version and command, family, length.
const V2_FIXED: usize = 16;
/// The longest v1 header the protocol allows, CRLF included.
const V1_MAX: usize = 107;

/// What a header said about the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Carried {
    /// The client the load balancer accepted.
    pub client: SocketAddr,
    /// The address that client connected to.
    pub destination: SocketAddr,
}

/// Why a connection was refused before its first byte of TLS or HTTP.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("{peer} is not in trusted_proxies: PROXY protocol headers are accepted only from them")]
    Untrusted { peer: IpAddr },
    #[error("no PROXY protocol header (the listener requires one)")]
    Missing,
    #[error("malformed PROXY protocol header: {0}")]
    Malformed(String),
    #[error("no complete PROXY protocol header within {0} s")]
    Timeout(u64),
    #[error("reading the PROXY protocol header: {0}")]
    Io(#[from] std::io::Error),
}

/// Takes the PROXY header off `stream` from `peer`, within `deadline`. `None` for a header that
/// carries no client (a `LOCAL` command: the load balancer's own health check; `UNKNOWN`
/// family): the connection is the peer's own.
pub async fn accept(
    stream: &mut TcpStream,
    peer: SocketAddr,
    trusted: &[ipnet::IpNet],
    deadline: Duration,
) -> Result<Option<Carried>, HeaderError> {
    let ip = peer.ip().to_canonical();
    if !trusted.iter().any(|net| net.contains(&ip)) {
        return Err(HeaderError::Untrusted { peer: ip });
    }
    tokio::time::timeout(deadline, read(stream)).await.map_err(|_| HeaderError::Timeout(deadline.as_secs()))?
}

async fn read(stream: &mut TcpStream) -> Result<Option<Carried>, HeaderError> {
    let mut head = [0u8; V1_MAX];
    loop {
        let n = stream.peek(&mut head).await?;
        if n == 0 {
            return Err(HeaderError::Missing);
        }
        let seen = &head[..n];
        if is_prefix(seen, V2_SIGNATURE) {
            if n >= V2_FIXED {
                let len = usize::from(u16::from_be_bytes([seen[14], seen[15]]));
                let mut header = vec![0u8; V2_FIXED + len];
                stream.read_exact(&mut header).await?;
                return v2(&header);
            }
        } else if is_prefix(seen, b"PROXY ") {
            if let Some(end) = seen.windows(2).position(|w| w == b"\r\n") {
                let mut line = vec![0u8; end + 2];
                stream.read_exact(&mut line).await?;
                return v1(&line);
            }
            if n == V1_MAX {
                return Err(HeaderError::Malformed(format!("a v1 header longer than {V1_MAX} bytes")));
            }
        } else {
            return Err(HeaderError::Missing);
        }
        // Part of a header: load balancers send it in one segment, so the rest is a moment away
        // (peeking again at once would only spin).
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Whether `seen` and `signature` agree over the shorter of the two.
fn is_prefix(seen: &[u8], signature: &[u8]) -> bool {
    let n = seen.len().min(signature.len());
    seen[..n] == signature[..n]
}

fn v1(line: &[u8]) -> Result<Option<Carried>, HeaderError> {
    let text = std::str::from_utf8(line).map_err(|_| HeaderError::Malformed("a v1 header that is not text".into()))?;
    let header = ppp::v1::Header::try_from(text).map_err(|e| HeaderError::Malformed(e.to_string()))?;
    Ok(match header.addresses {
        ppp::v1::Addresses::Tcp4(a) => Some(Carried {
            client: SocketAddr::from((a.source_address, a.source_port)),
            destination: SocketAddr::from((a.destination_address, a.destination_port)),
        }),
        ppp::v1::Addresses::Tcp6(a) => Some(Carried {
            client: SocketAddr::from((a.source_address, a.source_port)),
            destination: SocketAddr::from((a.destination_address, a.destination_port)),
        }),
        ppp::v1::Addresses::Unknown => None,
    })
}

fn v2(bytes: &[u8]) -> Result<Option<Carried>, HeaderError> {
    let header = ppp::v2::Header::try_from(bytes).map_err(|e| HeaderError::Malformed(e.to_string()))?;
    if header.command == ppp::v2::Command::Local {
        return Ok(None);
    }
    Ok(match header.addresses {
        ppp::v2::Addresses::IPv4(a) => Some(Carried {
            client: SocketAddr::from((a.source_address, a.source_port)),
            destination: SocketAddr::from((a.destination_address, a.destination_port)),
        }),
        ppp::v2::Addresses::IPv6(a) => Some(Carried {
            client: SocketAddr::from((a.source_address, a.source_port)),
            destination: SocketAddr::from((a.destination_address, a.destination_port)),
        }),
        ppp::v2::Addresses::Unspecified | ppp::v2::Addresses::Unix(_) => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// Sends `bytes` (in pieces of `chunk` bytes, a moment apart), then "rest"; what `accept`
    /// made of it, and what the connection read next.
    async fn through(bytes: Vec<u8>, chunk: usize) -> (Result<Option<Carried>, HeaderError>, Vec<u8>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let sender = tokio::spawn(async move {
            let mut client = TcpStream::connect(addr).await.unwrap();
            for piece in bytes.chunks(chunk.max(1)) {
                client.write_all(piece).await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            client.write_all(b"rest").await.unwrap();
            client.shutdown().await.unwrap();
            client
        });
        let (mut stream, peer) = listener.accept().await.unwrap();
        let trusted = ["127.0.0.0/8".parse().unwrap()];
        let carried = accept(&mut stream, peer, &trusted, Duration::from_secs(5)).await;
        let mut rest = Vec::new();
        if carried.is_ok() {
            stream.read_to_end(&mut rest).await.unwrap();
        }
        drop(sender.await);
        (carried, rest)
    }

    fn v2_header(command: u8, family: u8, addresses: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.extend([0x20 | command, family]);
        h.extend(u16::try_from(addresses.len()).unwrap().to_be_bytes());
        h.extend(addresses);
        h
    }

    #[tokio::test]
    async fn both_versions_carry_the_client_and_nothing_after_the_header_is_consumed() {
        let line = b"PROXY TCP4 10.9.1.2 192.0.2.1 40000 443\r\n".to_vec();
        for chunk in [line.len(), 7] {
            let (carried, rest) = through(line.clone(), chunk).await;
            let carried = carried.unwrap().unwrap();
            assert_eq!(carried.client, "10.9.1.2:40000".parse().unwrap());
            assert_eq!(carried.destination, "192.0.2.1:443".parse().unwrap());
            assert_eq!(rest, b"rest");
        }
        let (carried, _) = through(b"PROXY TCP6 2001:db8::7 2001:db8::1 5000 443\r\n".to_vec(), 64).await;
        assert_eq!(carried.unwrap().unwrap().client, "[2001:db8::7]:5000".parse().unwrap());

        // v2, IPv4 with a TLV after the addresses (skipped with them), sent in small pieces.
        let mut addresses = vec![10, 9, 3, 4, 192, 0, 2, 1, 0x9c, 0x40, 0x01, 0xbb];
        addresses.extend([0x04, 0x00, 0x01, 0x00]);
        for chunk in [64, 5] {
            let (carried, rest) = through(v2_header(1, 0x11, &addresses), chunk).await;
            assert_eq!(carried.unwrap().unwrap().client, "10.9.3.4:40000".parse().unwrap());
            assert_eq!(rest, b"rest", "the TLV was taken off with the header");
        }
        // LOCAL: the balancer's own health check.
        let (carried, rest) = through(v2_header(0, 0x00, &[]), 64).await;
        assert_eq!((carried.unwrap(), rest.as_slice()), (None, &b"rest"[..]));
        let (carried, _) = through(b"PROXY UNKNOWN\r\n".to_vec(), 64).await;
        assert_eq!(carried.unwrap(), None);
    }

    #[tokio::test]
    async fn a_missing_malformed_or_untrusted_header_is_refused() {
        let (carried, _) = through(b"\x16\x03\x01\x02\x00".to_vec(), 64).await;
        assert!(matches!(carried, Err(HeaderError::Missing)), "{carried:?}");
        let (carried, _) = through(b"GET / HTTP/1.1\r\n".to_vec(), 64).await;
        assert!(matches!(carried, Err(HeaderError::Missing)), "{carried:?}");
        let (carried, _) = through(b"PROXY TCP4 10.9.1.999 192.0.2.1 1 2\r\n".to_vec(), 64).await;
        assert!(matches!(carried, Err(HeaderError::Malformed(_))), "{carried:?}");
        let (carried, _) = through([b"PROXY TCP4 ".as_slice(), &[b'1'; 120]].concat(), 200).await;
        assert!(matches!(carried, Err(HeaderError::Malformed(_))), "{carried:?}");

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (mut stream, peer) = listener.accept().await.unwrap();
        let trusted = ["10.0.0.0/24".parse().unwrap()];
        let refused = accept(&mut stream, peer, &trusted, Duration::from_secs(5)).await.unwrap_err();
        assert!(refused.to_string().contains("127.0.0.1 is not in trusted_proxies"), "{refused}");
        let silent = accept(&mut stream, peer, &["127.0.0.0/8".parse().unwrap()], Duration::from_millis(50)).await;
        assert!(matches!(silent, Err(HeaderError::Timeout(_))), "{silent:?}");
    }
}
