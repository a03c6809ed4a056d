//! HTTP on both legs through hyper: HTTP/1.1 and HTTP/2 to the client and to the upstream (in
//! any combination), upgrades (WebSocket) relayed, the authority of every request bound to the
//! intercepted host, one JSON access-log line per request. What tollgate answers itself comes
//! from `respond`.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
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
use super::upstream::{H2Sender, Lease, Peer, PoolKey, Route, Sender};
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
    let Upstream { route, key, lane, first, pin, label, rule, scan } = upstream;
    let h1_only = !client_h2 && proxy.upstreams.h1_required(&key);
    let relay = Arc::new(Relay {
        first: Mutex::new(first.map(|lease| (lease.sender, lease.peer))),
        h2: Mutex::new(None),
        pinned: Mutex::new(None),
        local: Mutex::new(Vec::new()),
        client_h2,
        h1_only: AtomicBool::new(h1_only),
        proxy,
        route,
        key,
        lane,
        pin,
        line: LineCtx::new(&ctx, target.host.as_str().into(), label.into(), rule),
        target,
        ctx,
        scan,
    });
    let proxy = relay.proxy.clone();
    let service = hyper::service::service_fn(move |req| relay.clone().handle(req));
    let io = TokioIo::new(client);
    if client_h2 {
        let conn = Box::pin(proxy.http2_server().serve_connection(io, service));
        Box::pin(async move {
            super::drain::serve_client(&proxy, conn, peer, |c| c.graceful_shutdown()).await;
            Ok(())
        })
    } else {
        let conn = Box::pin(proxy.http1_server().serve_connection(io, service).with_upgrades());
        Box::pin(async move {
            super::drain::serve_client(&proxy, conn, peer, |c| c.graceful_shutdown()).await;
            Ok(())
        })
    }
}

/// Where a client connection's requests go.
pub struct Upstream {
    pub route: Route,
    pub key: PoolKey,
    /// The lane of the key's shared h2 connections this client's requests take.
    pub lane: usize,
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

/// Requests in flight on a shared h2 upstream connection beyond which an HTTP/1.1 client's
/// next request gets an HTTP/1.1 connection instead: an origin's stream limit (often 100 or
/// 128) must not queue one client's request behind the others'.
const H1_CLIENT_STREAMS: usize = 64;

/// One client connection whose HTTP tollgate relays.
struct Relay {
    proxy: Arc<Proxy>,
    route: Route,
    key: PoolKey,
    /// Its lane among the key's shared h2 connections (`upstream::LANES`).
    lane: usize,
    pin: Option<[u8; 32]>,
    /// The connection the handshake was made on, for the first request.
    first: Mutex<Option<(Sender, Arc<Peer>)>>,
    /// The shared h2 connection this client's requests went over last.
    h2: Mutex<Option<(H2Sender, Arc<Peer>)>>,
    /// An HTTP/1.1 connection bound to this client by connection-based authentication.
    pinned: Mutex<Option<Held>>,
    /// Idle HTTP/1.1 connections this client used last: kept here while it stays, so a
    /// keep-alive client does not go through the shared pool on every request.
    local: Mutex<Vec<Held>>,
    /// Whether the client speaks h2 (else HTTP/1.1).
    client_h2: bool,
    /// An HTTP/1.1 client whose requests stay on HTTP/1.1 upstream from now on: it used
    /// connection-bound authentication, or the origin answered HTTP_1_1_REQUIRED.
    h1_only: AtomicBool,
    target: Target,
    ctx: ConnCtx,
    /// What the access lines of all the connection's requests share.
    line: Arc<LineCtx>,
    scan: bool,
}

impl Relay {
    /// An error resets the client's h2 stream with its reason (an HTTP/1.1 client never gets
    /// one).
    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Result<Response<Body>, h2::Error> {
        let mut log = AccessLog::start(&req, || self.line.clone());
        let mut scans = Scans::default();
        let response = match self.clone().forward(req, &mut scans).await {
            Ok(response) => Ok(response),
            Err(Scanned::Refused(refusal)) => Ok(refusal.into_response()),
            Err(Scanned::Answer(response)) => Ok(response),
            Err(Scanned::Reset(reason)) => Err(reason),
        };
        if let Some(log) = &mut log {
            log.scans = scans;
        }
        match response {
            Ok(response) => Ok(AccessLog::attach(log, response)),
            Err(reason) => {
                if let Some(log) = log {
                    log.emit(None, 0);
                }
                Err(reason.into())
            }
        }
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
        // What h2 cannot carry for an HTTP/1.1 client: an upgrade, and authentication bound to
        // the connection (NTLM, Negotiate), which keeps the client on HTTP/1.1 for good.
        if connection_auth && !self.client_h2 {
            self.h1_only.store(true, Ordering::Relaxed);
        }
        let need_h1 = !self.client_h2 && (upgrade || self.h1_only.load(Ordering::Relaxed));
        // The content scanner sees the request before the upstream does (an upgrade's bytes
        // after it are not HTTP: not scanned).
        let scanner = self.proxy.scanner.as_ref().filter(|_| self.scan && !upgrade);
        let mut asked = None;
        let req = match scanner {
            Some(scanner) => {
                let uri = absolute_uri(&req, &self.target, "https");
                asked = scanner.asked(&req, &uri);
                let asker = Asker { client: self.ctx.client.ip(), user: self.ctx.user.clone() };
                Box::pin(scanner.request(&asker, &uri, req.map(super::boxed), scans)).await.map_err(Scanned::Answer)?
            }
            None => req.map(super::boxed),
        };
        let Exchanged { mut response, connection, peer, h1_key } = self.exchange(req, need_h1, upgrade).await?;
        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(client_upgrade) = client_upgrade {
                let upstream_upgrade = hyper::upgrade::on(&mut response);
                tokio::spawn(splice_upgrade(client_upgrade, upstream_upgrade, self.ctx.ticket.clone()));
            }
            return Ok(response.map(super::boxed));
        }
        relay_response_headers(response.headers_mut());
        let done = match connection {
            // The h2 stream counts as in flight until the response body is done.
            Connection::H2(in_flight) => Done::H2 { _in_flight: in_flight },
            Connection::H1(sender) => {
                // The HTTP/1.1 connection is free again once the response body has been read.
                // One that carries connection-based authentication stays with this client;
                // others are shared.
                let pin = connection_auth || connection_bound_auth(response.headers(), header::WWW_AUTHENTICATE);
                Done::H1 { held: Held { sender, peer, h1_key }, relay: Arc::downgrade(&self), pin }
            }
        };
        let response = response.map(|body| super::boxed(Recycle::new(body, done)));
        Ok(match scanner {
            Some(scanner) => {
                let asker = Asker { client: self.ctx.client.ip(), user: self.ctx.user.clone() };
                Box::pin(scanner.response(&asker, asked, response, scans)).await
            }
            None => response,
        })
    }

    /// Sends a request upstream and waits for the response head. An HTTP/1.1 client's
    /// bodiless request refused over h2 with HTTP_1_1_REQUIRED is sent again over HTTP/1.1,
    /// and the client and the origin stay on HTTP/1.1 from then on. An h2 client's stream is
    /// reset with HTTP_1_1_REQUIRED in turn: the client retries over HTTP/1.1 itself, on a
    /// connection that offers only that (browsers and curl do), as it would have without
    /// tollgate; a 502 would have ended it there.
    async fn exchange(&self, req: Request<Body>, need_h1: bool, upgrade: bool) -> Result<Exchanged, Scanned> {
        let (sender, peer, h1_key) = self.ready_sender(need_h1).await?;
        let replay = match sender {
            Sender::H2(_) if !self.client_h2 && req.body().is_end_stream() => Some(replay_of(&req)),
            _ => None,
        };
        let req = prepare_request(req, &self.target, matches!(sender, Sender::H2(_)), upgrade);
        let sent = send(sender, &peer, req).await;
        if let Err(e) = &sent
            && h1_required(e)
        {
            self.proxy.upstreams.remember_h1_required(&self.key);
            if self.client_h2 {
                return Err(Scanned::Reset(h2::Reason::HTTP_1_1_REQUIRED));
            }
            // A request with a body cannot be sent again; the client's next one goes over
            // HTTP/1.1.
            self.h1_only.store(true, Ordering::Relaxed);
        }
        match (sent, replay) {
            // Boxed: rare, and it would double the size of every request's future.
            (Err(e), Some(replay)) if h1_required(&e) => Ok(Box::pin(self.exchange_h1(replay)).await?),
            (sent, _) => {
                let (response, connection) = sent.map_err(|e| upstream_http(&self.target, e))?;
                Ok(Exchanged { response, connection, peer, h1_key })
            }
        }
    }

    /// Sends a request upstream over HTTP/1.1.
    async fn exchange_h1(&self, req: Request<Body>) -> Result<Exchanged, Refusal> {
        let (sender, peer, h1_key) = self.ready_sender(true).await?;
        let req = prepare_request(req, &self.target, matches!(sender, Sender::H2(_)), false);
        let (response, connection) = send(sender, &peer, req).await.map_err(|e| upstream_http(&self.target, e))?;
        Ok(Exchanged { response, connection, peer, h1_key })
    }

    /// A sender ready for a request, and whether it came from the HTTP/1.1-only pool key: the
    /// pinned connection, this client's last HTTP/1.1 one, the first one, this client's shared
    /// h2 one, or one from the shared pool. With `need_h1`, an HTTP/1.1 connection. A
    /// connection that turns out closed is skipped.
    async fn ready_sender(&self, need_h1: bool) -> Result<(Sender, Arc<Peer>, bool), Refusal> {
        for _ in 0..3 {
            // An HTTP/1.1 client whose h2 connection is busy gets HTTP/1.1 for this request.
            let need_h1 = need_h1 || (!self.client_h2 && self.h2_busy());
            let (sender, peer, h1_key) = match self.held(need_h1) {
                Some(held) => held,
                None => {
                    let h1_only = need_h1 && self.key.offer() != self.key.h1_only().offer();
                    let (route, key) = match h1_only {
                        true => (&self.route.h1_only(), &self.key.h1_only()),
                        false => (&self.route, &self.key),
                    };
                    // Boxed: a dial's state (TCP, TLS, revocation) would otherwise make every
                    // request's future as large as a dial's, and be copied with it.
                    let lease = Box::pin(self.proxy.upstreams.checkout(&self.proxy, route, key, self.pin, self.lane))
                        .await
                        .map_err(Refusal::upstream)?;
                    if let Sender::H2(s) = &lease.sender {
                        *self.h2.lock() = Some((s.clone(), lease.peer.clone()));
                    }
                    (lease.sender, lease.peer, h1_only)
                }
            };
            match sender {
                Sender::H1(mut s) => {
                    if s.ready().await.is_ok() {
                        return Ok((Sender::H1(s), peer, h1_key));
                    }
                }
                // An h2 connection whose origin takes no new stream (it sent GOAWAY, or the
                // connection failed): another is tried.
                Sender::H2(s) if !need_h1 => match s.ready().await {
                    Ok(s) => return Ok((Sender::H2(s), peer, false)),
                    Err(e) => {
                        tracing::debug!(host = %self.target.host, error = %e, "upstream h2 connection takes no new request");
                        peer.set_closed();
                    }
                },
                // An h2 connection where HTTP/1.1 is needed (an origin that chose h2 on the
                // HTTP/1.1-only key, which it must not): kept for later, and another tried.
                Sender::H2(_) => {}
            }
        }
        Err(Refusal::upstream(ProxyError::UpstreamHttp {
            target: self.target.to_string(),
            reason: "no usable upstream connection".into(),
        }))
    }

    /// A connection this client holds: pinned, its last HTTP/1.1 one, the first one, or (unless
    /// `need_h1`) its shared h2 one while open.
    fn held(&self, need_h1: bool) -> Option<(Sender, Arc<Peer>, bool)> {
        if let Some(held) = self.pinned.lock().take().or_else(|| self.local.lock().pop()) {
            return Some((Sender::H1(held.sender), held.peer, held.h1_key));
        }
        match self.first.lock().take() {
            Some((Sender::H2(s), peer)) => {
                *self.h2.lock() = Some((s.clone(), peer.clone()));
                if !need_h1 {
                    return Some((Sender::H2(s), peer, false));
                }
            }
            Some((sender, peer)) => return Some((sender, peer, false)),
            None => {}
        }
        if need_h1 {
            return None;
        }
        let mut h2 = self.h2.lock();
        match &*h2 {
            // Another lane's connection, lent until this lane has its own: the pool is asked.
            Some((_, peer)) if peer.lane() != Some(self.lane) => None,
            Some((s, peer)) if !peer.closed() => Some((Sender::H2(s.clone()), peer.clone(), false)),
            Some(_) => {
                *h2 = None;
                None
            }
            None => None,
        }
    }

    /// Whether this client's shared h2 connection has as many requests in flight as an
    /// HTTP/1.1 client may add to.
    fn h2_busy(&self) -> bool {
        self.h2.lock().as_ref().is_some_and(|(_, peer)| peer.in_flight() >= H1_CLIENT_STREAMS)
    }
}

/// An upstream response head, the connection it came over (from the HTTP/1.1-only pool key
/// or not) and what the response holds of it.
struct Exchanged {
    response: Response<UpstreamBody>,
    connection: Connection,
    peer: Arc<Peer>,
    h1_key: bool,
}

/// What a response holds of its upstream connection.
enum Connection {
    /// The HTTP/1.1 sender, to reuse when the response is done.
    H1(http1::SendRequest<Body>),
    /// Its place among the h2 connection's requests in flight.
    H2(InFlight),
}

/// A request counted in its h2 connection's requests in flight (`Peer::in_flight`) until
/// dropped: when its response ends, or when it is abandoned at any point (a client that goes
/// away mid-request drops the future awaiting the response).
struct InFlight(Arc<Peer>);

impl InFlight {
    fn new(peer: &Arc<Peer>) -> Self {
        peer.request_sent();
        Self(peer.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.request_done();
    }
}

/// Sends a request on an upstream connection and waits for the response head.
async fn send(
    sender: Sender,
    peer: &Arc<Peer>,
    req: Request<Body>,
) -> Result<(Response<UpstreamBody>, Connection), SendError> {
    match sender {
        Sender::H1(mut s) => {
            let response = s.send_request(req).await.map_err(SendError::H1)?;
            Ok((response.map(UpstreamBody::H1), Connection::H1(s)))
        }
        Sender::H2(mut s) => {
            let in_flight = InFlight::new(peer);
            let sent = send_h2(&mut s, req).await;
            if let Err(e) = &sent
                && (e.is_go_away() || e.is_io())
            {
                peer.set_closed();
            }
            Ok((sent.map_err(SendError::H2)?, Connection::H2(in_flight)))
        }
    }
}

/// Sends a request on an h2 connection (ready for it) and waits for the response head; a
/// request body is sent by a task of its own (the origin may answer before it has all of it).
async fn send_h2(sender: &mut H2Sender, req: Request<Body>) -> Result<Response<UpstreamBody>, h2::Error> {
    let (mut parts, body) = req.into_parts();
    // As hyper's h2 client does: a body of known length announces it.
    if let Some(len) = body.size_hint().exact()
        && (len != 0 || !matches!(parts.method, Method::GET | Method::HEAD | Method::DELETE | Method::CONNECT))
        && !parts.headers.contains_key(header::CONTENT_LENGTH)
    {
        parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    let end = body.is_end_stream();
    let (response, stream) = sender.send_request(Request::from_parts(parts, ()), end)?;
    if !end {
        tokio::spawn(pipe_h2(body, stream));
    }
    let response = response.await?;
    let length = response.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    Ok(response.map(|recv| UpstreamBody::H2(H2Body::new(recv, length))))
}

/// Sends a request body on an h2 stream as the origin's flow control allows; stops if the
/// origin resets the stream, and resets it if the body fails.
async fn pipe_h2(mut body: Body, mut stream: h2::SendStream<Bytes>) {
    use http_body_util::BodyExt;
    loop {
        let frame = tokio::select! {
            frame = body.frame() => frame,
            _ = std::future::poll_fn(|cx| stream.poll_reset(cx)) => return,
        };
        let data = match frame {
            None => {
                let _ = stream.send_data(Bytes::new(), true);
                return;
            }
            Some(Err(_)) => {
                stream.send_reset(h2::Reason::INTERNAL_ERROR);
                return;
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => data,
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        let _ = stream.send_trailers(trailers);
                    }
                    return;
                }
            },
        };
        let mut data = data;
        while !data.is_empty() {
            stream.reserve_capacity(data.len());
            match std::future::poll_fn(|cx| stream.poll_capacity(cx)).await {
                Some(Ok(0)) => continue,
                Some(Ok(n)) => {
                    if stream.send_data(data.split_to(n.min(data.len())), false).is_err() {
                        return;
                    }
                }
                Some(Err(_)) | None => return,
            }
        }
    }
}

/// Why a request got no response from the upstream.
#[derive(Debug)]
enum SendError {
    H1(hyper::Error),
    H2(h2::Error),
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::H1(e) => e.fmt(f),
            Self::H2(e) => e.fmt(f),
        }
    }
}

/// An upstream response body: hyper's (HTTP/1.1), or an h2 stream's.
enum UpstreamBody {
    H1(Incoming),
    H2(H2Body),
}

/// An h2 response stream as a body: each chunk's flow-control capacity is released as it is
/// passed on, so the origin sends more as the client takes it.
struct H2Body {
    recv: h2::RecvStream,
    /// What is left of the announced Content-Length, if there was one.
    remaining: Option<u64>,
    data_done: bool,
}

impl H2Body {
    fn new(recv: h2::RecvStream, length: Option<u64>) -> Self {
        let remaining = if recv.is_end_stream() { Some(0) } else { length };
        Self { recv, remaining, data_done: false }
    }
}

impl http_body::Body for H2Body {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = &mut *self;
        if !this.data_done {
            match std::task::ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    this.remaining = this.remaining.map(|n| n.saturating_sub(data.len() as u64));
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => this.data_done = true,
            }
        }
        match std::task::ready!(this.recv.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.remaining.map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}

impl http_body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Self::H1(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            Self::H2(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::H1(body) => body.is_end_stream(),
            Self::H2(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::H1(body) => body.size_hint(),
            Self::H2(body) => body.size_hint(),
        }
    }
}

/// A copy of a bodiless request, to send again.
fn replay_of(req: &Request<Body>) -> Request<Body> {
    let mut copy = Request::new(super::boxed(http_body_util::Empty::<Bytes>::new()));
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    copy
}

/// Whether the upstream refused a request over h2 with HTTP_1_1_REQUIRED (RFC 9113 §7).
fn h1_required(e: &SendError) -> bool {
    matches!(e, SendError::H2(e) if e.reason() == Some(h2::Reason::HTTP_1_1_REQUIRED))
}

impl Drop for Relay {
    fn drop(&mut self) {
        // The client is gone: its idle upstream connections serve other clients. A pinned
        // (authenticated) one closes with it.
        let first = match self.first.get_mut().take() {
            Some((Sender::H1(sender), peer)) => Some(Held { sender, peer, h1_key: false }),
            _ => None,
        };
        for held in first.into_iter().chain(self.local.get_mut().drain(..)) {
            let key = if held.h1_key { self.key.h1_only() } else { self.key.clone() };
            self.proxy.upstreams.checkin(&key, held.sender, held.peer);
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

/// An HTTP/1.1 upstream connection a client connection holds, and whether it came from the
/// HTTP/1.1-only pool key (where it goes back when the client leaves).
struct Held {
    sender: http1::SendRequest<Body>,
    peer: Arc<Peer>,
    h1_key: bool,
}

/// What ends with an upstream response.
enum Done {
    /// An HTTP/1.1 connection, free again: back to its client connection (which hands it to
    /// the shared pool when it ends), or pinned to it.
    H1 { held: Held, relay: std::sync::Weak<Relay>, pin: bool },
    /// A request in flight on an h2 connection (held for its drop).
    H2 { _in_flight: InFlight },
}

/// A response body that releases what the response held when it ends.
struct Recycle {
    inner: UpstreamBody,
    done: Option<Done>,
}

impl Recycle {
    fn new(inner: UpstreamBody, done: Done) -> Self {
        let mut this = Self { inner, done: Some(done) };
        if this.inner.is_end_stream() {
            this.release();
        }
        this
    }

    /// Hands an HTTP/1.1 connection back, or ends an h2 request's time in flight. (A response
    /// dropped before its end drops what it held: an h2 request is no longer in flight, an
    /// HTTP/1.1 connection mid-response is unusable and closes with its sender.)
    fn release(&mut self) {
        if let Some(Done::H1 { held, relay, pin }) = self.done.take()
            && let Some(relay) = relay.upgrade()
        {
            match pin {
                true => *relay.pinned.lock() = Some(held),
                false => relay.local.lock().push(held),
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
    let authority = if target.port == 443 { bracketed(&target.host) } else { target.to_string() };
    if upstream_h2 {
        parts.version = Version::HTTP_2;
        parts.headers.remove(header::HOST);
        // The request's own path and query, kept as parsed (not copied and parsed again).
        let mut uri = std::mem::take(&mut parts.uri).into_parts();
        uri.scheme = Some(http::uri::Scheme::HTTPS);
        uri.authority = authority.parse().ok();
        uri.path_and_query.get_or_insert_with(|| http::uri::PathAndQuery::from_static("/"));
        parts.uri = Uri::from_parts(uri).unwrap_or_else(|_| Uri::from_static("/"));
    } else {
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
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

/// Why a request got tollgate's or the scanner's answer instead of the upstream's, or none.
pub enum Scanned {
    Refused(Refusal),
    /// The content scanner's answer (a block page, or a failure page).
    Answer(Response<Body>),
    /// No answer: the h2 client's stream is reset with this reason.
    Reset(h2::Reason),
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
fn upstream_http(target: &Target, e: SendError) -> Refusal {
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
    // The usual `host` or `host:port`, told without parsing the authority (once per request).
    // Only ever a yes: anything else is decided by the parse below.
    let host = &target.host;
    if !host.contains(':')
        && let Some(rest) = authority.get(host.len()..)
        && authority[..host.len()].eq_ignore_ascii_case(host)
    {
        let port = rest.strip_prefix(':');
        let digits = port.filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
        let same_port = || digits.and_then(|p| p.parse::<u16>().ok()).is_some_and(|p| !check_port || p == target.port);
        if rest.is_empty() || same_port() {
            return true;
        }
    }
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
    // Most messages carry none of them: one pass over the names they do carry instead of a
    // lookup per hop-by-hop name, each parsing the name first (2 % of a keep-alive request's
    // CPU).
    if !upgrade && !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let named: Vec<HeaderName> = connection_tokens(headers)
        .filter(|t| !(upgrade && t.eq_ignore_ascii_case("upgrade")))
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        KEEP_ALIVE,
        PROXY_CONNECTION,
        header::PROXY_AUTHORIZATION,
        header::PROXY_AUTHENTICATE,
        header::TRANSFER_ENCODING,
    ] {
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

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Whether `strip_hop_by_hop` has anything to do about a header of this name (the names
/// `Connection` lists are found through `Connection` itself).
fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authorization"
            | "proxy-authenticate"
            | "transfer-encoding"
            | "te"
            | "upgrade"
    )
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
    line: Arc<LineCtx>,
    method: Method,
    /// The path is `uri.path()`: a `Uri` clone shares the request's bytes.
    uri: http::Uri,
    version: Version,
    /// What the content scanner made of the request and its response.
    pub scans: Scans,
}

/// What the access lines of one client connection's requests share. Built once per
/// connection, so a request takes one reference, on its connection's own thread, instead of
/// one per field (the listener's name is shared by every thread's connections: each clone and
/// drop of it moved a cache line between cores).
pub struct LineCtx {
    client: std::net::SocketAddr,
    mode: &'static str,
    listener: Arc<str>,
    user: Option<Arc<str>>,
    /// The decryption rule that matched, if one did.
    rule: Option<Arc<str>>,
    host: Arc<str>,
    /// The upstream verdict, `inbound` or `plain-http`.
    upstream: Arc<str>,
}

impl LineCtx {
    /// The context of `ctx`'s lines: requests for `host`, relayed as `upstream` (the verdict
    /// label), under the decryption `rule` that matched, if one did.
    pub fn new(ctx: &ConnCtx, host: Arc<str>, upstream: Arc<str>, rule: Option<Arc<str>>) -> Arc<Self> {
        Arc::new(Self {
            client: ctx.client,
            mode: ctx.mode.as_str(),
            listener: ctx.listener().clone(),
            user: ctx.user.clone(),
            rule,
            host,
            upstream,
        })
    }
}

impl AccessLog {
    /// Starts timing a request; `None` when access logging is filtered out (nothing to pay).
    /// `line` gives what the connection's lines share; it is called only when lines are written.
    pub fn start<B>(req: &Request<B>, line: impl FnOnce() -> Arc<LineCtx>) -> Option<Self> {
        METRICS.requests_total.inc();
        if !tracing::enabled!(target: "tollgate::access", tracing::Level::INFO) {
            return None;
        }
        Some(Self {
            started: Instant::now(),
            line: line(),
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            scans: Scans::default(),
        })
    }

    /// Wraps the response so the line is written when its body is done.
    pub fn attach(log: Option<Self>, response: Response<Body>) -> Response<Body> {
        let Some(log) = log else { return response };
        let status = response.status();
        response.map(|inner| super::boxed(Logged { inner, bytes: 0, status, log: Some(log) }))
    }

    /// Writes the line; a request that got no response (its stream reset) has status 0.
    fn emit(self, status: Option<StatusCode>, bytes: u64) {
        // Written straight into the thread's batch, the line `tracing::info!` would make with
        // these fields (`logs::info`): one per request.
        let (scans, ctx) = (&self.scans, &*self.line);
        crate::logs::info("tollgate::access", "request", |line| {
            line.str("client", crate::logs::AddrText::new(ctx.client).as_str());
            line.str("mode", ctx.mode);
            line.str("listener", &ctx.listener);
            line.opt_str("user", ctx.user.as_deref());
            line.opt_str("rule", ctx.rule.as_deref());
            line.str("host", &ctx.host);
            line.str("method", self.method.as_str());
            line.str("path", self.uri.path());
            line.str("version", version_name(self.version));
            line.u64("status", status.map_or(0, |status| status.as_u16().into()));
            line.u64("bytes", bytes);
            // To the microsecond: what the clock can tell apart, in a short number.
            line.f64("duration_ms", self.started.elapsed().as_micros() as f64 / 1000.0);
            line.str("upstream", &ctx.upstream);
            line.opt_str("icap_reqmod", scans.reqmod);
            line.opt_str("icap_respmod", scans.respmod);
            line.opt_str("icap_threat", scans.threat.as_deref());
            line.opt_str("icap_istag", scans.istag.as_deref());
            line.opt_f64("icap_ms", (scans.reqmod.is_some() || scans.respmod.is_some()).then_some(scans.ms));
        });
    }
}

/// A version as its `Debug` writes it (`HTTP/1.1`, `HTTP/2.0`), the access line's `version`.
fn version_name(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/?",
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
                    log.emit(Some(this.status), this.bytes);
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
            log.emit(Some(self.status), self.bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_lines_name_versions_as_their_debug_does() {
        for version in [Version::HTTP_09, Version::HTTP_10, Version::HTTP_11, Version::HTTP_2, Version::HTTP_3] {
            assert_eq!(version_name(version), format!("{version:?}"));
        }
    }

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

        // Each alone (the pass that looks for any of them must know every one), and
        // `TE: trailers`, the one value that stays.
        let alone = [
            ("connection", "close"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("proxy-authorization", "Basic dTpw"),
            ("proxy-authenticate", "Basic"),
            ("transfer-encoding", "chunked"),
            ("te", "gzip"),
            ("upgrade", "websocket"),
        ];
        for (name, value) in alone {
            let mut headers = HeaderMap::new();
            headers.insert("x-kept", HeaderValue::from_static("1"));
            headers.insert(HeaderName::from_static(name), HeaderValue::from_static(value));
            strip_hop_by_hop(&mut headers, false);
            let left: Vec<_> = headers.keys().map(|k| k.as_str()).collect();
            assert_eq!(left, ["x-kept"], "{name}");
        }
        let mut headers = HeaderMap::new();
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        strip_hop_by_hop(&mut headers, false);
        assert_eq!(headers.get(header::TE).unwrap(), "trailers");
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
        for other in ["origin.test.evil.test", "origin.test:443@evil.test", "origin.tes", "xorigin.test"] {
            assert!(!same_host(other, &target, false), "{other}");
        }
        let v6 = Target { host: "::1".into(), port: 443, addr: None };
        assert!(same_host("[::1]:443", &v6, true));
        assert!(!same_host("[::2]:443", &v6, true));
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

        // An absolute-form request (an explicit proxy's client), the default port, an IPv6
        // target; and for an HTTP/1.1 origin, origin-form with a Host header.
        let absolute = |uri: &str| {
            Request::builder().uri(uri).body(crate::proxy::boxed(http_body_util::Full::new(Bytes::new()))).unwrap()
        };
        let default_port = Target { host: "origin.test".into(), port: 443, addr: None };
        let h2 = prepare_request(absolute("http://origin.test/p?q"), &default_port, true, false);
        assert_eq!(h2.uri().to_string(), "https://origin.test/p?q");
        let v6 = Target { host: "2001:db8::1".into(), port: 443, addr: None };
        let h2 = prepare_request(absolute("https://[2001:db8::1]/"), &v6, true, false);
        assert_eq!(h2.uri().to_string(), "https://[2001:db8::1]/");
        let h1 = prepare_request(absolute("http://origin.test:8443/p?q"), &target, false, false);
        assert_eq!((h1.uri().to_string().as_str(), h1.version()), ("/p?q", Version::HTTP_11));
        assert_eq!(h1.headers().get(header::HOST).unwrap(), "origin.test:8443");
    }
}
