//! Reaching an upstream: name resolution with a small cache, and connection attempts raced
//! across the resolved addresses (Happy Eyeballs, RFC 8305), so a host whose IPv6 address
//! silently drops packets is reached over IPv4 after a quarter of a second rather than after
//! the whole connect timeout. What may be dialled (the deny list, tollgate's own sockets) is the
//! caller's decision: it filters the addresses before they are tried. Also the roots TLS peers
//! are validated against, and a small HTTPS GET for what tollgate fetches itself (host lists).

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// How long an attempt has before the next address is tried too (RFC 8305 §5 recommends 250 ms).
pub const ATTEMPT_DELAY: Duration = Duration::from_millis(250);

/// How long a resolved name is reused. The system resolver (getaddrinfo) tells no TTL; a short
/// fixed one keeps a busy proxy from asking for the same name on every connection while a
/// changed record is seen within seconds.
const CACHE_TTL: Duration = Duration::from_secs(30);

/// Names resolved recently.
const CACHE_CAPACITY: u64 = 4096;

/// Resolves names through the system resolver (getaddrinfo: /etc/hosts, nsswitch and DNS as
/// the host is configured), off the async workers, with a small cache; concurrent lookups of one
/// name wait on one resolution.
#[derive(Clone)]
pub struct Resolver {
    cache: moka::future::Cache<(String, u16), std::sync::Arc<[SocketAddr]>>,
}

impl Resolver {
    /// An empty cache.
    pub fn new() -> Self {
        Self { cache: moka::future::Cache::builder().max_capacity(CACHE_CAPACITY).time_to_live(CACHE_TTL).build() }
    }

    /// The addresses of `host:port`, in Happy Eyeballs order (`interleave`). Failures are not
    /// cached.
    pub async fn lookup(&self, host: &str, port: u16) -> io::Result<std::sync::Arc<[SocketAddr]>> {
        let resolved = self.cache.try_get_with((host.to_string(), port), async {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port)).await?.collect();
            match addrs.is_empty() {
                true => Err(io::Error::new(io::ErrorKind::NotFound, "the name has no address")),
                false => Ok(interleave(addrs).into()),
            }
        });
        resolved.await.map_err(|e: std::sync::Arc<io::Error>| io::Error::new(e.kind(), e.to_string()))
    }
}

impl Default for Resolver {
    fn default() -> Self {
        Self::new()
    }
}

/// The order to try addresses in (RFC 8305 §4): IPv6 first, then alternating families, each
/// family's addresses in the resolver's order.
pub fn interleave(addrs: Vec<SocketAddr>) -> Vec<SocketAddr> {
    let (v6, v4): (Vec<_>, Vec<_>) = addrs.into_iter().partition(SocketAddr::is_ipv6);
    let (mut v6, mut v4) = (v6.into_iter(), v4.into_iter());
    let mut out = Vec::with_capacity(v6.len() + v4.len());
    loop {
        match (v6.next(), v4.next()) {
            (None, None) => return out,
            (a, b) => out.extend(a.into_iter().chain(b)),
        }
    }
}

/// Connects to the first of `addrs` that answers: an attempt starts every `delay`, or as soon as
/// the previous one fails; the first connection made wins and the others are dropped. The
/// caller bounds the whole with its connect timeout. The last error when every attempt fails.
pub async fn happy_eyeballs(addrs: &[SocketAddr], delay: Duration) -> io::Result<TcpStream> {
    if let [addr] = addrs {
        // Nothing to race (an override, an original destination): no task of its own.
        return TcpStream::connect(addr).await;
    }
    let mut pending = addrs.iter().copied();
    let mut attempts = JoinSet::new();
    let mut last_error = None;
    let mut next_attempt = Instant::now();
    let mut exhausted = false;
    loop {
        if !exhausted && (attempts.is_empty() || Instant::now() >= next_attempt) {
            match pending.next() {
                Some(addr) => {
                    attempts.spawn(async move { (addr, TcpStream::connect(addr).await) });
                    next_attempt = Instant::now() + delay;
                }
                None => exhausted = true,
            }
        }
        if attempts.is_empty() {
            return Err(last_error.unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address to try")));
        }
        tokio::select! {
            done = attempts.join_next() => match done {
                Some(Ok((_, Ok(stream)))) => return Ok(stream),
                Some(Ok((addr, Err(e)))) => {
                    last_error = Some(io::Error::new(e.kind(), format!("{addr}: {e}")));
                    next_attempt = Instant::now();
                }
                Some(Err(e)) => {
                    last_error = Some(io::Error::other(e));
                    next_attempt = Instant::now();
                }
                None => {}
            },
            () = tokio::time::sleep_until(next_attempt), if !exhausted => {}
        }
    }
}

/// The roots TLS peers are validated against: webpki's, the system's, and the PEM `bundles`
/// (each must hold at least one certificate). An error gives the bundle's position and why.
pub fn roots(bundles: &[PathBuf]) -> Result<RootCertStore, (usize, String)> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    for (i, bundle) in bundles.iter().enumerate() {
        let invalid = |reason: String| (i, format!("{}: {reason}", bundle.display()));
        let certs = CertificateDer::pem_file_iter(bundle)
            .map_err(|e| invalid(e.to_string()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid(e.to_string()))?;
        if certs.is_empty() {
            return Err(invalid("no certificates in the bundle".into()));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| invalid(e.to_string()))?;
        }
    }
    Ok(roots)
}

/// What an HTTPS GET brought back.
#[derive(Debug)]
pub struct Fetched {
    pub status: u16,
    pub body: Vec<u8>,
    pub etag: Option<String>,
    pub last_modified: Option<String>,
}

/// GETs `url` — `https://` over a TLS connection validated by `tls`, or, without `tls`,
/// plain `http://` (CRLs: signed data, fetched the way their issuers publish them) — with
/// `If-None-Match` / `If-Modified-Since` from the last answer, at most `max_bytes` of body,
/// everything within `timeout`; through the parent proxy `via` when given (CONNECT for
/// https, an absolute-form request for http).
pub async fn fetch(
    url: &str,
    tls: Option<Arc<rustls::ClientConfig>>,
    last: (Option<&str>, Option<&str>),
    max_bytes: usize,
    timeout: Duration,
    via: Option<&Via>,
) -> io::Result<Fetched> {
    tokio::time::timeout(timeout, get(url, tls, last, max_bytes, via))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("no answer within {} ms", timeout.as_millis())))?
}

async fn get(
    url: &str,
    tls: Option<Arc<rustls::ClientConfig>>,
    last: (Option<&str>, Option<&str>),
    max_bytes: usize,
    via: Option<&Via>,
) -> io::Result<Fetched> {
    let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidInput, what);
    let uri: http::Uri = url.parse().map_err(|e| invalid(format!("{e}")))?;
    let (scheme, default_port) = if tls.is_some() { ("https", 443) } else { ("http", 80) };
    if uri.scheme_str() != Some(scheme) {
        return Err(invalid(format!("only {scheme}:// is fetched here")));
    }
    let host = uri.host().ok_or_else(|| invalid("no host".into()))?.trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(default_port);
    let tcp = match via {
        Some(via) => via.connect().await?,
        None => {
            happy_eyeballs(&interleave(tokio::net::lookup_host((host, port)).await?.collect()), ATTEMPT_DELAY).await?
        }
    };
    match tls {
        Some(tls) => {
            let mut tcp = tcp;
            if let Some(via) = via {
                let authority = if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
                via.tunnel(&mut tcp, &authority).await.map_err(ViaError::into_io)?;
            }
            let name = rustls::pki_types::ServerName::try_from(host.to_string()).map_err(|e| invalid(e.to_string()))?;
            let stream = tokio_rustls::TlsConnector::from(tls).connect(name, tcp).await?;
            exchange(stream, &uri, host, last, max_bytes, None).await
        }
        None => exchange(tcp, &uri, host, last, max_bytes, via).await,
    }
}

/// A parent proxy tollgate's connections go through (`[upstream] parent`), with the
/// `Proxy-Authorization` it takes.
#[derive(Clone, Debug)]
pub struct Via {
    pub host: String,
    pub port: u16,
    /// Marked sensitive: never printed.
    pub authorization: Option<http::HeaderValue>,
}

/// A parent proxy's CONNECT that did not open a tunnel.
#[derive(Debug)]
pub enum ViaError {
    /// It answered, with this status.
    Refused { status: u16, reason: String },
    /// It could not be reached, or did not speak HTTP.
    Io(io::Error),
}

impl ViaError {
    pub fn into_io(self) -> io::Error {
        match self {
            Self::Refused { status, reason } => {
                io::Error::new(io::ErrorKind::ConnectionRefused, format!("the parent proxy refused: {status} {reason}"))
            }
            Self::Io(e) => e,
        }
    }
}

/// The parent's response head may be no longer than this.
const MAX_VIA_HEAD_BYTES: usize = 16 * 1024;

impl Via {
    /// A TCP connection to the parent itself (resolved and raced like any name).
    pub async fn connect(&self) -> io::Result<TcpStream> {
        let addrs = interleave(tokio::net::lookup_host((self.host.as_str(), self.port)).await?.collect());
        let stream = happy_eyeballs(&addrs, ATTEMPT_DELAY)
            .await
            .map_err(|e| io::Error::new(e.kind(), format!("parent proxy {}:{}: {e}", self.host, self.port)))?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    /// Asks the parent, on `stream`, for a tunnel to `authority` (`host:port`). On success the
    /// stream carries the tunnel: not one byte past the parent's answer was read.
    pub async fn tunnel(&self, stream: &mut TcpStream, authority: &str) -> Result<(), ViaError> {
        use tokio::io::AsyncWriteExt;
        let mut request = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n").into_bytes();
        if let Some(authorization) = &self.authorization {
            request.extend_from_slice(b"Proxy-Authorization: ");
            request.extend_from_slice(authorization.as_bytes());
            request.extend_from_slice(b"\r\n");
        }
        request.extend_from_slice(b"\r\n");
        stream.write_all(&request).await.map_err(ViaError::Io)?;
        match read_head(stream).await.map_err(ViaError::Io)? {
            (status, _) if (200..300).contains(&status) => Ok(()),
            (status, reason) => Err(ViaError::Refused { status, reason }),
        }
    }
}

/// Reads an HTTP response head, and not one byte past it (what follows belongs to the tunnel):
/// bytes are peeked, and only those of the head consumed. The status and reason.
async fn read_head(stream: &mut TcpStream) -> io::Result<(u16, String)> {
    use tokio::io::AsyncReadExt;
    let invalid = |why: &str| io::Error::new(io::ErrorKind::InvalidData, why.to_string());
    let mut head = Vec::with_capacity(256);
    let mut peeked = [0u8; 2048];
    loop {
        let n = stream.peek(&mut peeked).await?;
        if n == 0 {
            return Err(invalid("the parent closed the connection without answering"));
        }
        // The head ends at the first blank line: consume up to it, or all that was peeked.
        let searched_from = head.len().saturating_sub(3);
        head.extend_from_slice(&peeked[..n]);
        let end = head[searched_from..].windows(4).position(|w| w == b"\r\n\r\n").map(|i| searched_from + i + 4);
        let take = match end {
            Some(end) => n - (head.len() - end),
            None => n,
        };
        head.truncate(head.len() - (n - take));
        stream.read_exact(&mut peeked[..take]).await?;
        if end.is_some() {
            break;
        }
        if head.len() > MAX_VIA_HEAD_BYTES {
            return Err(invalid("the parent's response head is too long"));
        }
    }
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut headers);
    match response.parse(&head) {
        Ok(httparse::Status::Complete(_)) => {
            let status = response.code.ok_or_else(|| invalid("no status"))?;
            Ok((status, response.reason.unwrap_or_default().to_string()))
        }
        _ => Err(invalid("the parent answered something that is not HTTP")),
    }
}

/// One GET over an open connection; in absolute form, with the parent's credentials, when the
/// connection is to the parent proxy `via`.
async fn exchange<IO>(
    io: IO,
    uri: &http::Uri,
    host: &str,
    (etag, last_modified): (Option<&str>, Option<&str>),
    max_bytes: usize,
    via: Option<&Via>,
) -> io::Result<Fetched>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use http_body_util::BodyExt;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io)).await.map_err(io::Error::other)?;
    tokio::spawn(connection);
    let target = match via {
        Some(_) => uri.to_string(),
        None => uri.path_and_query().map_or("/", |p| p.as_str()).to_string(),
    };
    let mut request = http::Request::get(target)
        .header(http::header::HOST, uri.authority().map_or(host, |a| a.as_str()))
        .header(http::header::USER_AGENT, concat!("tollgate/", env!("CARGO_PKG_VERSION")));
    if let Some(authorization) = via.and_then(|v| v.authorization.as_ref()) {
        request = request.header(http::header::PROXY_AUTHORIZATION, authorization.clone());
    }
    if let Some(etag) = etag {
        request = request.header(http::header::IF_NONE_MATCH, etag);
    }
    if let Some(since) = last_modified {
        request = request.header(http::header::IF_MODIFIED_SINCE, since);
    }
    let request = request.body(http_body_util::Empty::<bytes::Bytes>::new()).map_err(io::Error::other)?;
    let response = sender.send_request(request).await.map_err(io::Error::other)?;
    if via.is_some() && response.status() == http::StatusCode::PROXY_AUTHENTICATION_REQUIRED {
        return Err(ViaError::Refused { status: 407, reason: "Proxy Authentication Required".into() }.into_io());
    }
    let header = |name| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    let (status, etag, last_modified) =
        (response.status().as_u16(), header(http::header::ETAG), header(http::header::LAST_MODIFIED));
    let mut body = response.into_body();
    let mut bytes = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Some(data) = frame.map_err(io::Error::other)?.data_ref() {
            if bytes.len() + data.len() > max_bytes {
                return Err(io::Error::new(io::ErrorKind::InvalidData, format!("larger than {max_bytes} bytes")));
            }
            bytes.extend_from_slice(data);
        }
    }
    Ok(Fetched { status, body: bytes, etag, last_modified })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_first_then_alternating() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        let addrs = vec![a("10.0.0.1:1"), a("10.0.0.2:1"), a("[fd00::1]:1"), a("10.0.0.3:1"), a("[fd00::2]:1")];
        let ordered = interleave(addrs);
        let expected = [a("[fd00::1]:1"), a("10.0.0.1:1"), a("[fd00::2]:1"), a("10.0.0.2:1"), a("10.0.0.3:1")];
        assert_eq!(ordered, expected);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_refused_address_hands_over_to_the_next_at_once() {
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let closed_addr = closed.local_addr().unwrap();
        drop(closed);
        let open = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let started = std::time::Instant::now();
        let stream = happy_eyeballs(&[closed_addr, open.local_addr().unwrap()], Duration::from_secs(5)).await.unwrap();
        assert_eq!(stream.peer_addr().unwrap(), open.local_addr().unwrap());
        assert!(started.elapsed() < Duration::from_secs(1), "not after the attempt delay: {:?}", started.elapsed());
        let err = happy_eyeballs(&[closed_addr, closed_addr], ATTEMPT_DELAY).await.unwrap_err();
        assert!(err.to_string().contains(&closed_addr.to_string()), "{err}");
    }

    #[tokio::test]
    async fn a_parent_s_answer_is_read_without_the_tunnel_bytes_after_it() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            // Split across writes, with the first tunnel bytes in the same segment as the end.
            s.write_all(b"HTTP/1.1 200 Connection established\r\nVia: x").await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            s.write_all(b"\r\n\r\nBANNER").await.unwrap();
            s
        });
        let mut client = TcpStream::connect(addr).await.unwrap();
        let (status, reason) = read_head(&mut client).await.unwrap();
        assert_eq!((status, reason.as_str()), (200, "Connection established"));
        let mut rest = [0u8; 6];
        client.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"BANNER");
        drop(server.await);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn names_resolve_once_within_the_cache_lifetime() {
        let resolver = Resolver::new();
        let first = resolver.lookup("localhost", 80).await.unwrap();
        let second = resolver.lookup("localhost", 80).await.unwrap();
        assert!(std::sync::Arc::ptr_eq(&first, &second), "served from the cache");
        assert!(resolver.lookup("no-such-host.invalid", 80).await.is_err());
    }
}
