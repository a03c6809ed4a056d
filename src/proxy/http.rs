//! HTTP on both legs through hyper: HTTP/1.1 and HTTP/2 to the client and to the upstream (in
//! any combination), upgrades (WebSocket) relayed, the authority of every request bound to the
//! intercepted host, one JSON access-log line per request. This is the only place errors turn
//! into HTTP responses; synthetic responses carry a `tollgate-error` header.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite};

use super::intercept::{UpstreamConn, connect_upstream};
use super::tls::{ClientHelloInfo, H2};
use super::{ConnCtx, Proxy, ProxyError, Target};
use crate::config::ListenerMode;
use crate::telemetry::METRICS;

/// Body type of everything tollgate sends.
pub type Body = UnsyncBoxBody<Bytes, hyper::Error>;

/// The header naming why tollgate answered instead of the upstream.
pub const ERROR_HEADER: &str = "tollgate-error";

/// Idle HTTP/1.1 upstream connections kept per client connection.
const MAX_IDLE_H1: usize = 16;

/// Relays HTTP between an intercepted client connection and its upstream.
pub async fn relay<IO>(
    proxy: Arc<Proxy>,
    client: tokio_rustls::server::TlsStream<IO>,
    upstream: UpstreamConn,
    target: Target,
    ctx: ConnCtx,
) -> Result<(), ProxyError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let client_h2 = client.get_ref().1.alpn_protocol() == Some(H2);
    let verdict = upstream.verdict.as_str().to_string();
    let pool = Arc::new(UpstreamPool::new(proxy, target.clone(), upstream).await?);
    let relay = Arc::new(Relay { pool, target, ctx, verdict });
    let service = hyper::service::service_fn(move |req| relay.clone().handle(req));
    let io = TokioIo::new(client);
    let result = if client_h2 {
        hyper::server::conn::http2::Builder::new(TokioExecutor::new()).serve_connection(io, service).await
    } else {
        hyper::server::conn::http1::Builder::new().serve_connection(io, service).with_upgrades().await
    };
    if let Err(e) = result {
        tracing::debug!(client = %ctx.client, error = %e, "client connection ended with an error");
    }
    Ok(())
}

struct Relay {
    pool: Arc<UpstreamPool>,
    target: Target,
    ctx: ConnCtx,
    verdict: String,
}

impl Relay {
    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
        let log = AccessLog::new(&req, self.ctx, &self.target.host, &self.verdict);
        let response = match self.forward(req).await {
            Ok(response) => response,
            Err(refusal) => refusal.into_response(),
        };
        Ok(log.attach(response))
    }

    async fn forward(&self, mut req: Request<Incoming>) -> Result<Response<Body>, Refusal> {
        match request_host(&req) {
            // In sni mode the client's port is the listener's, not the upstream's.
            Some(host) if same_host(host, &self.target, self.ctx.mode != ListenerMode::Sni) => {}
            Some(host) => {
                return Err(Refusal::new(
                    StatusCode::MISDIRECTED_REQUEST,
                    "authority-mismatch",
                    format!("request for {host} on a connection intercepted for {}", self.target.host),
                ));
            }
            None if req.version() == Version::HTTP_11 => {
                return Err(Refusal::new(StatusCode::BAD_REQUEST, "missing-host", "request has no Host header".into()));
            }
            None => {}
        }
        let upgrade = is_upgrade(&req);
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let sender = self.pool.sender().await.map_err(Refusal::upstream)?;
        let req = prepare_request(req, &self.target, sender.is_h2(), upgrade);
        let (response, recycle) = match sender {
            Sender::H1(mut s) => {
                s.ready().await.map_err(|e| Refusal::upstream_http(&self.target, e))?;
                let response = s.send_request(req).await;
                // The connection is free again once the response body has been read; an
                // upgraded connection is never reused.
                (response, (!upgrade).then_some(s))
            }
            Sender::H2(mut s) => (s.send_request(req).await, None),
        };
        let mut response = response.map_err(|e| Refusal::upstream_http(&self.target, e))?;
        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(client_upgrade) = client_upgrade {
                let upstream_upgrade = hyper::upgrade::on(&mut response);
                tokio::spawn(splice_upgrade(client_upgrade, upstream_upgrade));
            }
        } else {
            strip_hop_by_hop(response.headers_mut(), false);
        }
        let pool = Arc::downgrade(&self.pool);
        Ok(response.map(|body| match recycle {
            Some(sender) => Recycle::new(body.boxed_unsync(), sender, pool).boxed_unsync(),
            None => body.boxed_unsync(),
        }))
    }
}

/// A response body that returns its HTTP/1.1 connection to the pool when it ends.
struct Recycle {
    inner: Body,
    sender: Option<http1::SendRequest<Body>>,
    pool: std::sync::Weak<UpstreamPool>,
}

impl Recycle {
    fn new(inner: Body, sender: http1::SendRequest<Body>, pool: std::sync::Weak<UpstreamPool>) -> Self {
        let mut this = Self { inner, sender: Some(sender), pool };
        if this.inner.is_end_stream() {
            this.release();
        }
        this
    }

    fn release(&mut self) {
        if let (Some(sender), Some(pool)) = (self.sender.take(), self.pool.upgrade()) {
            pool.release(sender);
        }
    }
}

impl http_body::Body for Recycle {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) || self.inner.is_end_stream() {
            self.release();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

async fn splice_upgrade(client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    let (client, upstream) = tokio::join!(client, upstream);
    if let (Ok(client), Ok(upstream)) = (client, upstream) {
        let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(client), &mut TokioIo::new(upstream)).await;
    }
}

/// A request sender on an upstream connection.
enum Sender {
    H1(http1::SendRequest<Body>),
    H2(http2::SendRequest<Body>),
}

impl Sender {
    fn is_h2(&self) -> bool {
        matches!(self, Self::H2(_))
    }
}

/// Upstream connections of one client connection. The first is the one whose certificate
/// the minted leaf mirrors; further HTTP/1.1 connections (an h2 client multiplexing to an
/// h1-only origin) must present the same certificate.
struct UpstreamPool {
    proxy: Arc<Proxy>,
    target: Target,
    offer: Vec<Vec<u8>>,
    fingerprint: [u8; 32],
    h2: Mutex<Option<http2::SendRequest<Body>>>,
    idle: Mutex<Vec<http1::SendRequest<Body>>>,
}

impl UpstreamPool {
    async fn new(proxy: Arc<Proxy>, target: Target, first: UpstreamConn) -> Result<Self, ProxyError> {
        let pool = Self {
            proxy,
            target,
            offer: first.offer.clone(),
            fingerprint: first.fingerprint,
            h2: Mutex::new(None),
            idle: Mutex::new(Vec::new()),
        };
        let sender = pool.handshake(first).await?;
        pool.keep(sender);
        Ok(pool)
    }

    async fn sender(&self) -> Result<Sender, ProxyError> {
        if let Some(h2) = self.h2.lock().as_ref().filter(|s| !s.is_closed()) {
            return Ok(Sender::H2(h2.clone()));
        }
        // Every idle sender has finished its previous exchange.
        while let Some(sender) = self.idle.lock().pop() {
            if !sender.is_closed() {
                return Ok(Sender::H1(sender));
            }
        }
        let hello = ClientHelloInfo { sni: None, alpn: self.offer.clone() };
        let conn = connect_upstream(&self.proxy, &self.target, &hello).await?;
        if conn.fingerprint != self.fingerprint {
            return Err(ProxyError::UpstreamHttp {
                target: self.target.to_string(),
                reason: "upstream certificate changed within the connection".into(),
            });
        }
        let sender = self.handshake(conn).await?;
        if let Sender::H2(s) = &sender {
            *self.h2.lock() = Some(s.clone());
        }
        Ok(sender)
    }

    async fn handshake(&self, conn: UpstreamConn) -> Result<Sender, ProxyError> {
        let h2 = conn.stream.get_ref().1.alpn_protocol() == Some(H2);
        let io = TokioIo::new(conn.stream);
        let http_err =
            |e: hyper::Error| ProxyError::UpstreamHttp { target: self.target.to_string(), reason: e.to_string() };
        if h2 {
            let (sender, connection) = http2::handshake(TokioExecutor::new(), io).await.map_err(http_err)?;
            tokio::spawn(connection);
            Ok(Sender::H2(sender))
        } else {
            let (sender, connection) = http1::handshake(io).await.map_err(http_err)?;
            tokio::spawn(connection.with_upgrades());
            Ok(Sender::H1(sender))
        }
    }

    fn keep(&self, sender: Sender) {
        match sender {
            Sender::H1(s) => self.release(s),
            Sender::H2(s) => *self.h2.lock() = Some(s),
        }
    }

    fn release(&self, sender: http1::SendRequest<Body>) {
        let mut idle = self.idle.lock();
        if idle.len() < MAX_IDLE_H1 {
            idle.push(sender);
        }
    }
}

/// Rewrites a client request for the upstream leg: hop-by-hop headers removed, URI and
/// `Host`/`:authority` in the form the upstream protocol wants.
pub fn prepare_request<B>(req: Request<B>, target: &Target, upstream_h2: bool, upgrade: bool) -> Request<Body>
where
    B: http_body::Body<Data = Bytes, Error = hyper::Error> + Send + 'static,
{
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers, upgrade);
    let path = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/").to_string();
    let authority = if target.port == 443 { bracketed(&target.host) } else { target.to_string() };
    if upstream_h2 {
        parts.version = Version::HTTP_2;
        parts.headers.remove(header::HOST);
        parts.uri = Uri::builder()
            .scheme("https")
            .authority(authority.as_str())
            .path_and_query(path.as_str())
            .build()
            .unwrap_or_else(|_| Uri::from_static("/"));
    } else {
        parts.version = Version::HTTP_11;
        if !parts.headers.contains_key(header::HOST)
            && let Ok(value) = HeaderValue::from_str(&authority)
        {
            parts.headers.insert(header::HOST, value);
        }
        parts.uri = path.parse().unwrap_or_else(|_| Uri::from_static("/"));
    }
    Request::from_parts(parts, body.boxed_unsync())
}

fn bracketed(host: &str) -> String {
    if host.contains(':') { format!("[{host}]") } else { host.to_string() }
}

/// The host a request names: `:authority`/absolute URI first, then `Host`.
fn request_host<B>(req: &Request<B>) -> Option<&str> {
    req.uri().authority().map(|a| a.as_str()).or_else(|| req.headers().get(header::HOST)?.to_str().ok())
}

/// Whether `authority` (`host[:port]`) names the intercepted target.
fn same_host(authority: &str, target: &Target, check_port: bool) -> bool {
    match Target::parse(authority, target.port) {
        Some(t) => t.host == target.host && (!check_port || t.port == target.port),
        None => false,
    }
}

fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && connection_tokens(req.headers()).any(|t| t.eq_ignore_ascii_case("upgrade"))
}

fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers.get_all(header::CONNECTION).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')).map(str::trim)
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1), keeping `Connection: upgrade` and `Upgrade`
/// for an upgrade.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let named: Vec<HeaderName> = connection_tokens(headers)
        .filter(|t| !(upgrade && t.eq_ignore_ascii_case("upgrade")))
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in ["keep-alive", "proxy-connection", "proxy-authorization", "proxy-authenticate", "transfer-encoding"] {
        headers.remove(name);
    }
    if headers.get(header::TE).is_some_and(|v| v != "trailers") {
        headers.remove(header::TE);
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    }
}

/// A response tollgate makes itself.
#[derive(Debug)]
pub struct Refusal {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl Refusal {
    /// A refusal with a status, a short machine code (the header) and a human message.
    pub fn new(status: StatusCode, code: &'static str, message: String) -> Self {
        Self { status, code, message }
    }

    /// The upstream could not be reached.
    pub fn upstream(e: ProxyError) -> Self {
        let status = match e {
            ProxyError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Forbidden(_) => StatusCode::FORBIDDEN,
            _ => StatusCode::BAD_GATEWAY,
        };
        tracing::warn!(side = ?e.side(), error = %e, "upstream request failed");
        Self::new(status, "upstream-unreachable", e.to_string())
    }

    fn upstream_http(target: &Target, e: hyper::Error) -> Self {
        Self::upstream(ProxyError::UpstreamHttp { target: target.to_string(), reason: e.to_string() })
    }

    /// The response.
    pub fn into_response(self) -> Response<Body> {
        let body = Full::new(Bytes::from(format!("tollgate: {}\n", self.message)))
            .map_err(|never: Infallible| match never {})
            .boxed_unsync();
        let mut response = Response::new(body);
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        headers.insert(ERROR_HEADER, HeaderValue::from_static(self.code));
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
        response
    }
}

/// The facts of one request, logged as one JSON line when its response body ends.
pub struct AccessLog {
    started: Instant,
    client: std::net::SocketAddr,
    mode: &'static str,
    host: String,
    method: Method,
    path: String,
    version: Version,
    upstream: String,
}

impl AccessLog {
    /// Starts timing a request.
    pub fn new<B>(req: &Request<B>, ctx: ConnCtx, host: &str, upstream: &str) -> Self {
        METRICS.requests_total.fetch_add(1, Relaxed);
        Self {
            started: Instant::now(),
            client: ctx.client,
            mode: ctx.mode.as_str(),
            host: host.to_string(),
            method: req.method().clone(),
            path: req.uri().path().to_string(),
            version: req.version(),
            upstream: upstream.to_string(),
        }
    }

    /// Wraps the response so the line is written when its body is done.
    pub fn attach(self, response: Response<Body>) -> Response<Body> {
        let status = response.status();
        response.map(|inner| Logged { inner, bytes: 0, status, log: Some(self) }.boxed_unsync())
    }

    fn emit(self, status: StatusCode, bytes: u64) {
        tracing::info!(
            target: "tollgate::access",
            client = %self.client,
            mode = self.mode,
            host = %self.host,
            method = %self.method,
            path = %self.path,
            version = ?self.version,
            status = status.as_u16(),
            bytes,
            duration_ms = self.started.elapsed().as_secs_f64() * 1000.0,
            upstream = %self.upstream,
            "request"
        );
    }
}

struct Logged {
    inner: Body,
    bytes: u64,
    status: StatusCode,
    log: Option<AccessLog>,
}

impl http_body::Body for Logged {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.bytes += data.len() as u64;
                }
            }
            Poll::Ready(None) => {
                if let Some(log) = this.log.take() {
                    log.emit(this.status, this.bytes);
                }
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        if let Some(log) = self.log.take() {
            log.emit(self.status, self.bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-secret"));
        headers.insert("x-secret", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        headers.insert(header::TE, HeaderValue::from_static("gzip"));
        headers.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut headers, false);
        let left: Vec<_> = headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-kept"]);
    }

    #[test]
    fn authority_must_name_the_target() {
        let target = Target { host: "origin.test".into(), port: 443 };
        assert!(same_host("origin.test", &target, true));
        assert!(same_host("ORIGIN.test:443", &target, true));
        assert!(!same_host("origin.test:8443", &target, true));
        assert!(same_host("origin.test:8443", &target, false));
        assert!(!same_host("evil.test", &target, false));
    }

    #[test]
    fn requests_take_the_upstream_form() {
        let target = Target { host: "origin.test".into(), port: 8443 };
        let req = Request::builder()
            .uri("/a?b=1")
            .header(header::HOST, "origin.test:8443")
            .body(Full::new(Bytes::new()).map_err(|never: Infallible| match never {}).boxed_unsync())
            .unwrap();
        let h2 = prepare_request(req, &target, true, false);
        assert_eq!(h2.uri().to_string(), "https://origin.test:8443/a?b=1");
        assert!(h2.headers().get(header::HOST).is_none());
        assert_eq!(h2.version(), Version::HTTP_2);
    }
}
