//! HTTP on both legs through hyper: HTTP/1.1 and HTTP/2 to the client and to the upstream (in
//! any combination), upgrades (WebSocket) relayed, the authority of every request bound to the
//! intercepted host, one JSON access-log line per request. What tollgate answers itself comes
//! from `respond`.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body as _, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite};

use super::respond::Refusal;
use super::scan::{Asker, Scans};
use super::tls::H2;
use super::upstream::{Lease, Peer, PoolKey, Route, Sender};
use super::{Body, BoxError, ConnCtx, Proxy, ProxyError, Target};
use crate::config::ListenerMode;
use crate::policy::HttpAction;
use crate::telemetry::METRICS;

/// Relays HTTP between an intercepted client connection and its upstream; `first` is the
/// upstream connection whose certificate the minted leaf mirrors. The relay is returned, not yet
/// started: what runs for the connection's life is the hyper connection in its own box and a
/// few pointers.
pub fn relay<IO>(
    proxy: Arc<Proxy>,
    client: tokio_rustls::server::TlsStream<IO>,
    upstream: Upstream,
    target: Target,
    ctx: ConnCtx,
) -> super::Relaying
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let client_h2 = client.get_ref().1.alpn_protocol() == Some(H2);
    let peer = ctx.client;
    let Upstream { route, key, first, pin, label, rule, scan } = upstream;
    let relay = Arc::new(Relay {
        first: Mutex::new(first.map(|lease| (lease.sender, lease.peer))),
        pinned: Mutex::new(None),
        local: Mutex::new(Vec::new()),
        proxy,
        route,
        key,
        pin,
        target,
        ctx,
        label,
        rule,
        scan,
    });
    let proxy = relay.proxy.clone();
    let service = hyper::service::service_fn(move |req| relay.clone().handle(req));
    let io = TokioIo::new(client);
    if client_h2 {
        let conn = Box::pin(proxy.http2_server().serve_connection(io, service));
        Box::pin(async move {
            super::serve_client!(proxy, conn, peer);
            Ok(())
        })
    } else {
        let conn = Box::pin(proxy.http1_server().serve_connection(io, service).with_upgrades());
        Box::pin(async move {
            super::serve_client!(proxy, conn, peer);
            Ok(())
        })
    }
}

/// Where a client connection's requests go.
pub struct Upstream {
    pub route: Route,
    pub key: PoolKey,
    /// The connection made before the client handshake (forward: its certificate was mirrored).
    pub first: Option<Lease>,
    /// Forward: the upstream certificate every upstream connection must present.
    pub pin: Option<[u8; 32]>,
    /// For the access log: the upstream verdict, or `inbound`.
    pub label: String,
    /// For the access log: the decryption rule that matched, if one did.
    pub rule: Option<Arc<str>>,
    /// Whether requests and responses go to the content scanner (`[icap]`).
    pub scan: bool,
}

/// One client connection whose HTTP tollgate relays.
struct Relay {
    proxy: Arc<Proxy>,
    route: Route,
    key: PoolKey,
    pin: Option<[u8; 32]>,
    /// The connection the handshake was made on, for the first request.
    first: Mutex<Option<(Sender, Arc<Peer>)>>,
    /// An HTTP/1.1 connection bound to this client by connection-based authentication.
    pinned: Mutex<Option<(http1::SendRequest<Body>, Arc<Peer>)>>,
    /// Idle HTTP/1.1 connections this client used last: kept here while it stays, so a
    /// keep-alive client does not go through the shared pool on every request.
    local: Mutex<Vec<(http1::SendRequest<Body>, Arc<Peer>)>>,
    target: Target,
    ctx: ConnCtx,
    label: String,
    rule: Option<Arc<str>>,
    scan: bool,
}

impl Relay {
    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
        let mut log = AccessLog::start(&req, &self.ctx, &self.target.host, &self.label, self.rule.clone());
        let mut scans = Scans::default();
        let response = match self.clone().forward(req, &mut scans).await {
            Ok(response) => response,
            Err(Scanned::Refused(refusal)) => refusal.into_response(),
            Err(Scanned::Answer(response)) => response,
        };
        if let Some(log) = &mut log {
            log.scans = scans;
        }
        Ok(AccessLog::attach(log, response))
    }

    async fn forward(
        self: Arc<Self>,
        mut req: Request<Incoming>,
        scans: &mut Scans,
    ) -> Result<Response<Body>, Scanned> {
        match request_host(&req) {
            // Only a CONNECT names the upstream port; elsewhere the client's port is the listener's.
            Some(host) if same_host(host, &self.target, self.ctx.mode == ListenerMode::Explicit) => {}
            Some(host) => {
                return Err(Refusal::new(
                    StatusCode::MISDIRECTED_REQUEST,
                    "authority-mismatch",
                    format!("request for {host} on a connection intercepted for {}", self.target.host),
                )
                .into());
            }
            None if req.version() == Version::HTTP_11 => {
                return Err(
                    Refusal::new(StatusCode::BAD_REQUEST, "missing-host", "request has no Host header".into()).into()
                );
            }
            None => {}
        }
        if let HttpAction::Block(rule) =
            self.proxy.policy.decide_http(&self.target.host, req.method(), req.uri().path())
        {
            return Err(Refusal::blocked(&rule, req.method(), &self.target.host, req.uri().path()).into());
        }
        let upgrade = is_upgrade(&req);
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let connection_auth = connection_bound_auth(req.headers(), header::AUTHORIZATION);
        // The content scanner sees the request before the upstream does (an upgrade's bytes
        // after it are not HTTP: not scanned).
        let scanner = self.proxy.scanner.as_ref().filter(|_| self.scan && !upgrade);
        let mut asked = None;
        let req = match scanner {
            Some(scanner) => {
                let uri = absolute_uri(&req, &self.target, "https");
                asked = scanner.asked(&req, &uri);
                let asker = Asker { client: self.ctx.client.ip(), user: self.ctx.user.clone() };
                scanner.request(&asker, &uri, req.map(super::boxed), scans).await.map_err(Scanned::Answer)?
            }
            None => req.map(super::boxed),
        };
        let (sender, peer) = self.ready_sender().await?;
        let req = prepare_request(req, &self.target, matches!(sender, Sender::H2(_)), upgrade);
        let (response, h1) = match sender {
            Sender::H1(mut s) => (s.send_request(req).await, Some(s)),
            Sender::H2(mut s) => (s.send_request(req).await, None),
        };
        let mut response = response.map_err(|e| upstream_http(&self.target, e))?;
        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(client_upgrade) = client_upgrade {
                let upstream_upgrade = hyper::upgrade::on(&mut response);
                tokio::spawn(splice_upgrade(client_upgrade, upstream_upgrade, self.ctx.ticket.clone()));
            }
            return Ok(response.map(super::boxed));
        }
        relay_response_headers(response.headers_mut());
        let response = match h1 {
            None => response.map(super::boxed),
            Some(sender) => {
                // The HTTP/1.1 connection is free again once the response body has been read.
                // One that carries connection-based authentication stays with this client;
                // others are shared.
                let pin = connection_auth || connection_bound_auth(response.headers(), header::WWW_AUTHENTICATE);
                let home = if pin { Home::Pinned(Arc::downgrade(&self)) } else { Home::Local(Arc::downgrade(&self)) };
                response.map(|body| super::boxed(Recycle::new(super::boxed(body), sender, peer, home)))
            }
        };
        Ok(match scanner {
            Some(scanner) => {
                let asker = Asker { client: self.ctx.client.ip(), user: self.ctx.user.clone() };
                scanner.response(&asker, asked, response, scans).await
            }
            None => response,
        })
    }

    /// A sender ready for a request: the pinned connection, the first one, this client's
    /// last one, or one from the shared pool; a connection that turns out closed is skipped.
    async fn ready_sender(&self) -> Result<(Sender, Arc<Peer>), Refusal> {
        for _ in 0..3 {
            let local = || {
                let held = self.pinned.lock().take().or_else(|| self.local.lock().pop());
                held.map(|(s, peer)| (Sender::H1(s), peer))
            };
            let (sender, peer) = match local().or_else(|| self.first.lock().take()) {
                Some(held) => held,
                None => {
                    let lease = self
                        .proxy
                        .upstreams
                        .checkout(&self.proxy, &self.route, &self.key, self.pin)
                        .await
                        .map_err(Refusal::upstream)?;
                    (lease.sender, lease.peer)
                }
            };
            match sender {
                Sender::H1(mut s) => {
                    if s.ready().await.is_ok() {
                        return Ok((Sender::H1(s), peer));
                    }
                }
                Sender::H2(s) => return Ok((Sender::H2(s), peer)),
            }
        }
        Err(Refusal::upstream(ProxyError::UpstreamHttp {
            target: self.target.to_string(),
            reason: "no usable upstream connection".into(),
        }))
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        // The client is gone: its idle upstream connections serve other clients. A pinned
        // (authenticated) one closes with it.
        let first = match self.first.get_mut().take() {
            Some((Sender::H1(sender), peer)) => Some((sender, peer)),
            _ => None,
        };
        for (sender, peer) in first.into_iter().chain(self.local.get_mut().drain(..)) {
            self.proxy.upstreams.checkin(&self.key, sender, peer);
        }
    }
}

/// Whether a header carries connection-based authentication (NTLM, Negotiate), which must
/// never be shared between clients.
fn connection_bound_auth(headers: &HeaderMap, name: HeaderName) -> bool {
    headers.get_all(name).iter().filter_map(|v| v.to_str().ok()).any(|v| {
        let scheme = v.trim_start().split(' ').next().unwrap_or("");
        scheme.eq_ignore_ascii_case("ntlm") || scheme.eq_ignore_ascii_case("negotiate")
    })
}

/// Where an HTTP/1.1 connection goes when its response is done: back to its client
/// connection (which hands it to the shared pool when it ends), or pinned to it.
enum Home {
    Local(std::sync::Weak<Relay>),
    Pinned(std::sync::Weak<Relay>),
}

/// A response body that returns its HTTP/1.1 connection when it ends.
struct Recycle {
    inner: Body,
    sender: Option<(http1::SendRequest<Body>, Arc<Peer>)>,
    home: Option<Home>,
}

impl Recycle {
    fn new(inner: Body, sender: http1::SendRequest<Body>, peer: Arc<Peer>, home: Home) -> Self {
        let mut this = Self { inner, sender: Some((sender, peer)), home: Some(home) };
        if this.inner.is_end_stream() {
            this.release();
        }
        this
    }

    fn release(&mut self) {
        let (Some(sender), Some(home)) = (self.sender.take(), self.home.take()) else { return };
        match home {
            Home::Local(relay) => {
                if let Some(relay) = relay.upgrade() {
                    relay.local.lock().push(sender);
                }
            }
            Home::Pinned(relay) => {
                if let Some(relay) = relay.upgrade() {
                    *relay.pinned.lock() = Some(sender);
                }
            }
        }
    }
}

impl http_body::Body for Recycle {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
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

/// Relays an upgraded connection (WebSocket) both ways; it holds the client connection's
/// ticket, so it counts against `max_connections` until it ends.
async fn splice_upgrade(
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    _ticket: super::Ticket,
) {
    let (client, upstream) = tokio::join!(client, upstream);
    if let (Ok(client), Ok(upstream)) = (client, upstream) {
        let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(client), &mut TokioIo::new(upstream)).await;
    }
}

/// Rewrites a client request for the upstream leg: hop-by-hop headers removed, URI and
/// `Host`/`:authority` in the form the upstream protocol wants.
pub fn prepare_request<B>(req: Request<B>, target: &Target, upstream_h2: bool, upgrade: bool) -> Request<Body>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers, upgrade);
    if !upstream_h2 && parts.uri.scheme().is_none() && parts.headers.contains_key(header::HOST) {
        // Already what an HTTP/1.1 origin wants: origin-form with a Host header.
        parts.version = Version::HTTP_11;
        return Request::from_parts(parts, super::boxed(body));
    }
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
    Request::from_parts(parts, super::boxed(body))
}

/// Why a request got tollgate's or the scanner's answer instead of the upstream's.
pub enum Scanned {
    Refused(Refusal),
    /// The content scanner's answer (a block page, or a failure page).
    Answer(Response<Body>),
}

impl From<Refusal> for Scanned {
    fn from(refusal: Refusal) -> Self {
        Self::Refused(refusal)
    }
}

/// The absolute URI of a request on a connection to `target` (what a scanner is shown).
pub fn absolute_uri<B>(req: &Request<B>, target: &Target, scheme: &str) -> String {
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let default_port = if scheme == "https" { 443 } else { 80 };
    let authority = if target.port == default_port { bracketed(&target.host) } else { target.to_string() };
    format!("{scheme}://{authority}{path}")
}

/// An HTTP failure on the upstream leg, as the client is told it.
fn upstream_http(target: &Target, e: hyper::Error) -> Refusal {
    Refusal::upstream(ProxyError::UpstreamHttp { target: target.to_string(), reason: e.to_string() })
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
    let Ok(authority) = authority.parse::<http::uri::Authority>() else { return false };
    let host = authority.host().trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case(&target.host)
        && (!check_port || authority.port_u16().unwrap_or(target.port) == target.port)
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

/// Prepares an upstream response's headers for the client: hop-by-hop headers removed, and
/// HTTP/3 dropped from `Alt-Svc` — a client told of h3 would go around us over QUIC.
pub fn relay_response_headers(headers: &mut HeaderMap) {
    strip_hop_by_hop(headers, false);
    if headers.contains_key(header::ALT_SVC) {
        strip_quic_alternatives(headers);
    }
}

/// Removes the `h3`, `h3-*` (drafts) and `quic` (Google QUIC) alternatives from `Alt-Svc`
/// (RFC 7838), and the header when none is left. `clear` and TCP alternatives stay.
fn strip_quic_alternatives(headers: &mut HeaderMap) {
    let is_quic = |entry: &str| {
        let id = entry.split('=').next().unwrap_or("").trim().to_ascii_lowercase();
        id == "h3" || id.starts_with("h3-") || id == "quic"
    };
    let kept: Vec<String> = headers
        .get_all(header::ALT_SVC)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(alt_svc_entries)
        .filter(|entry| !is_quic(entry))
        .map(str::to_string)
        .collect();
    headers.remove(header::ALT_SVC);
    if let Ok(value) = HeaderValue::from_str(&kept.join(", "))
        && !kept.is_empty()
    {
        headers.insert(header::ALT_SVC, value);
    }
}

/// The comma-separated entries of an `Alt-Svc` value, commas inside quoted strings kept.
fn alt_svc_entries(value: &str) -> Vec<&str> {
    let (mut entries, mut start, mut quoted, mut escaped) = (Vec::new(), 0, false, false);
    for (i, c) in value.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                entries.push(value[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    entries.push(value[start..].trim());
    entries.retain(|e| !e.is_empty());
    entries
}

/// The facts of one request, logged as one JSON line when its response body ends.
pub struct AccessLog {
    started: Instant,
    client: std::net::SocketAddr,
    mode: &'static str,
    listener: Arc<str>,
    user: Option<Arc<str>>,
    rule: Option<Arc<str>>,
    host: String,
    method: Method,
    path: String,
    version: Version,
    upstream: String,
    /// What the content scanner made of the request and its response.
    pub scans: Scans,
}

impl AccessLog {
    /// Starts timing a request; `None` when access logging is filtered out (nothing to pay).
    pub fn start<B>(
        req: &Request<B>,
        ctx: &ConnCtx,
        host: &str,
        upstream: &str,
        rule: Option<Arc<str>>,
    ) -> Option<Self> {
        METRICS.requests_total.inc();
        if !tracing::enabled!(target: "tollgate::access", tracing::Level::INFO) {
            return None;
        }
        Some(Self {
            started: Instant::now(),
            client: ctx.client,
            mode: ctx.mode.as_str(),
            listener: ctx.listener().clone(),
            user: ctx.user.clone(),
            rule,
            host: host.to_string(),
            method: req.method().clone(),
            path: req.uri().path().to_string(),
            version: req.version(),
            upstream: upstream.to_string(),
            scans: Scans::default(),
        })
    }

    /// Wraps the response so the line is written when its body is done.
    pub fn attach(log: Option<Self>, response: Response<Body>) -> Response<Body> {
        let Some(log) = log else { return response };
        let status = response.status();
        response.map(|inner| super::boxed(Logged { inner, bytes: 0, status, log: Some(log) }))
    }

    fn emit(self, status: StatusCode, bytes: u64) {
        tracing::info!(
            target: "tollgate::access",
            client = %self.client,
            mode = self.mode,
            listener = %self.listener,
            user = self.user.as_deref(),
            rule = self.rule.as_deref(),
            host = %self.host,
            method = %self.method,
            path = %self.path,
            version = ?self.version,
            status = status.as_u16(),
            bytes,
            duration_ms = self.started.elapsed().as_secs_f64() * 1000.0,
            upstream = %self.upstream,
            icap_reqmod = self.scans.reqmod,
            icap_respmod = self.scans.respmod,
            icap_threat = self.scans.threat.as_deref(),
            icap_istag = self.scans.istag.as_deref(),
            icap_ms = (self.scans.reqmod.is_some() || self.scans.respmod.is_some()).then_some(self.scans.ms),
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
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
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
    fn http3_is_dropped_from_alt_svc() {
        let relayed = |values: &[&str]| {
            let mut headers = HeaderMap::new();
            for v in values {
                headers.append(header::ALT_SVC, HeaderValue::from_str(v).unwrap());
            }
            relay_response_headers(&mut headers);
            headers.get_all(header::ALT_SVC).iter().map(|v| v.to_str().unwrap().to_string()).collect::<Vec<_>>()
        };
        assert_eq!(relayed(&["h3=\":443\"; ma=86400, h3-29=\":443\"; ma=86400"]), Vec::<String>::new());
        assert_eq!(
            relayed(&["h3=\":443\"; ma=86400, h2=\"alt.example:443\"; ma=60", "quic=\":443\", H3-Q050=\":443\""]),
            ["h2=\"alt.example:443\"; ma=60"]
        );
        assert_eq!(relayed(&["clear"]), ["clear"]);
        assert_eq!(relayed(&["h2=\"a,b.example:443\", h3=\":443\""]), ["h2=\"a,b.example:443\""]);
    }

    #[test]
    fn authority_must_name_the_target() {
        let target = Target { host: "origin.test".into(), port: 443, addr: None };
        assert!(same_host("origin.test", &target, true));
        assert!(same_host("ORIGIN.test:443", &target, true));
        assert!(!same_host("origin.test:8443", &target, true));
        assert!(same_host("origin.test:8443", &target, false));
        assert!(!same_host("evil.test", &target, false));
    }

    #[test]
    fn requests_take_the_upstream_form() {
        let target = Target { host: "origin.test".into(), port: 8443, addr: None };
        let req = Request::builder()
            .uri("/a?b=1")
            .header(header::HOST, "origin.test:8443")
            .body(crate::proxy::boxed(http_body_util::Full::new(Bytes::new())))
            .unwrap();
        let h2 = prepare_request(req, &target, true, false);
        assert_eq!(h2.uri().to_string(), "https://origin.test:8443/a?b=1");
        assert!(h2.headers().get(header::HOST).is_none());
        assert_eq!(h2.version(), Version::HTTP_2);
    }
}
