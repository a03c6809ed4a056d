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
/// everything within `timeout`.
pub async fn fetch(
    url: &str,
    tls: Option<Arc<rustls::ClientConfig>>,
    last: (Option<&str>, Option<&str>),
    max_bytes: usize,
    timeout: Duration,
) -> io::Result<Fetched> {
    tokio::time::timeout(timeout, get(url, tls, last, max_bytes))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("no answer within {} ms", timeout.as_millis())))?
}

async fn get(
    url: &str,
    tls: Option<Arc<rustls::ClientConfig>>,
    last: (Option<&str>, Option<&str>),
    max_bytes: usize,
) -> io::Result<Fetched> {
    let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidInput, what);
    let uri: http::Uri = url.parse().map_err(|e| invalid(format!("{e}")))?;
    let (scheme, default_port) = if tls.is_some() { ("https", 443) } else { ("http", 80) };
    if uri.scheme_str() != Some(scheme) {
        return Err(invalid(format!("only {scheme}:// is fetched here")));
    }
    let host = uri.host().ok_or_else(|| invalid("no host".into()))?.trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(default_port);
    let addrs: Vec<SocketAddr> = interleave(tokio::net::lookup_host((host, port)).await?.collect());
    let tcp = happy_eyeballs(&addrs, ATTEMPT_DELAY).await?;
    match tls {
        Some(tls) => {
            let name = rustls::pki_types::ServerName::try_from(host.to_string()).map_err(|e| invalid(e.to_string()))?;
            let stream = tokio_rustls::TlsConnector::from(tls).connect(name, tcp).await?;
            exchange(stream, &uri, host, last, max_bytes).await
        }
        None => exchange(tcp, &uri, host, last, max_bytes).await,
    }
}

/// One GET over an open connection.
async fn exchange<IO>(
    io: IO,
    uri: &http::Uri,
    host: &str,
    (etag, last_modified): (Option<&str>, Option<&str>),
    max_bytes: usize,
) -> io::Result<Fetched>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use http_body_util::BodyExt;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io)).await.map_err(io::Error::other)?;
    tokio::spawn(connection);
    let mut request = http::Request::get(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header(http::header::HOST, uri.authority().map_or(host, |a| a.as_str()))
        .header(http::header::USER_AGENT, concat!("tollgate/", env!("CARGO_PKG_VERSION")));
    if let Some(etag) = etag {
        request = request.header(http::header::IF_NONE_MATCH, etag);
    }
    if let Some(since) = last_modified {
        request = request.header(http::header::IF_MODIFIED_SINCE, since);
    }
    let request = request.body(http_body_util::Empty::<bytes::Bytes>::new()).map_err(io::Error::other)?;
    let response = sender.send_request(request).await.map_err(io::Error::other)?;
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

    #[tokio::test(flavor = "current_thread")]
    async fn names_resolve_once_within_the_cache_lifetime() {
        let resolver = Resolver::new();
        let first = resolver.lookup("localhost", 80).await.unwrap();
        let second = resolver.lookup("localhost", 80).await.unwrap();
        assert!(std::sync::Arc::ptr_eq(&first, &second), "served from the cache");
        assert!(resolver.lookup("no-such-host.invalid", 80).await.is_err());
    }
}
