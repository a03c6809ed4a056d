//! Upstream connections: TLS to the origin with the client's SNI and ALPN offer (always
//! validated), HTTP senders over them, and a pool shared by every client connection. A new
//! client connection reuses an idle upstream connection to the same host instead of paying TCP
//! and TLS again (what nginx's upstream keepalive does); the certificate verdict of a pooled
//! connection is rechecked from its chain before reuse, at most a minute old.
//!
//! Every client that speaks HTTP is offered h2 upstream, HTTP/1.1 clients too: where the origin
//! speaks h2, a few connections per data-plane thread (`LANES`) carry all their requests. What
//! h2 cannot carry for an HTTP/1.1 client (an upgrade, connection-bound authentication, an
//! origin that answers HTTP_1_1_REQUIRED) goes over connections offered HTTP/1.1 only, pooled
//! under a key of their own (`PoolKey::h1_only`).
//!
//! Connections that carried connection-bound authentication (NTLM, Negotiate) are never
//! returned to the shared pool: they stay pinned to their client connection (see `http.rs`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use rustls::pki_types::{CertificateDer, ServerName};

use super::decryption::{CertFacts, TlsFacts};
use super::idle::Deadlines;
use super::revocation::{Revocation, Status};
use super::tls::{H2, Offer, UpstreamTls};
use super::verdict::Verdict;
use super::{Body, Proxy, ProxyError, Side, Target};
use crate::keys::sha256;
use crate::telemetry::METRICS;

/// Idle HTTP/1.1 connections kept per (host, port, ALPN offer).
const MAX_IDLE_H1: usize = 64;
/// A pooled connection's verdict is recomputed when older than this.
const VERDICT_MAX_AGE: Duration = Duration::from_secs(60);
/// How long an origin that answered HTTP_1_1_REQUIRED gets HTTP/1.1 from HTTP/1.1 clients
/// without being asked over h2 first.
const H1_REQUIRED_TTL: Duration = Duration::from_secs(3600);
/// Shared h2 connections per pool key (one data-plane thread's, to one upstream): each client
/// connection is given a lane, whose connection carries its requests. An origin like nginx
/// serves a connection from one worker process, so one connection per proxy thread would hold
/// it to at most as many of its processes (fewer when they land on the same one, as they do
/// when opened together). A lane past the first gets its own connection only when another
/// lane's is busy (requests in flight): an origin whose busy worker is not waiting to accept
/// hands it to another, and an upstream with little traffic keeps one connection. Until then
/// the lane's clients share another lane's connection.
pub const LANES: usize = 2;
/// A lane whose connection could not be opened waits this long before the next try (its
/// clients share another lane's connection meanwhile).
const LANE_RETRY: Duration = Duration::from_secs(10);

/// Why a server that asks for a client certificate (and is named by no
/// `[[upstream.client_cert]]`) cannot be intercepted.
pub const ASKS_CLIENT_CERT: &str = "the server asks for a client certificate";

/// The shared pool.
pub struct Upstreams {
    idle: Mutex<Pool>,
    /// Origins (host, port) that refused a request over h2 with HTTP_1_1_REQUIRED (IIS does
    /// for Windows authentication).
    h1_required: moka::sync::Cache<(String, u16), ()>,
}

#[derive(Default)]
struct Pool {
    /// Pooled connections kept in all (a crawl over many hosts must not pile them up).
    max: usize,
    /// A pooled connection unused for this long is closed.
    idle_timeout: Duration,
    keys: HashMap<PoolKey, Idle>,
    /// Pooled connections (idle HTTP/1.1 and shared h2) across all keys.
    total: usize,
    last_sweep: Option<Instant>,
}

/// What makes upstream connections interchangeable.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct PoolKey {
    host: String,
    port: u16,
    /// The address chosen by the client (transparent mode), when it did.
    addr: Option<std::net::SocketAddr>,
    /// What was offered in ALPN.
    offer: Offer,
    /// Configured origins: the origin's index (its own TLS settings).
    site: Option<usize>,
    /// Forward: the data-plane thread asking. Each thread keeps its own upstream connections
    /// (their tasks run on its runtime), so a request never wakes another thread. Inbound
    /// runs on the multi-threaded runtime, where tasks move between workers: `None`.
    home: Option<std::thread::ThreadId>,
}

/// How to reach an upstream.
#[derive(Clone)]
pub enum Route {
    /// Forward interception: TLS to the target with an ALPN offer derived from the client's,
    /// always validated; the verdict picks the CA.
    Forward { target: Target, offer: Offer },
    /// Inbound inspection: an origin the operator configured, over TLS validated with its own
    /// roots (system or a pinned CA), or plain HTTP. `Offer::Http11` when h2 must not be offered.
    Origin { origin: Arc<Origin>, offer: Offer },
}

impl Route {
    /// The same upstream, offered HTTP/1.1 only.
    pub fn h1_only(&self) -> Self {
        match self {
            Self::Forward { target, offer } => Self::Forward { target: target.clone(), offer: offer.h1_only() },
            Self::Origin { origin, offer } => Self::Origin { origin: origin.clone(), offer: offer.h1_only() },
        }
    }
}

impl PoolKey {
    /// What its connections were offered in ALPN.
    pub fn offer(&self) -> Offer {
        self.offer
    }

    /// The key of the same upstream's connections offered HTTP/1.1 only.
    pub fn h1_only(&self) -> Self {
        Self { offer: self.offer.h1_only(), ..self.clone() }
    }
}

/// An origin the operator configured (an `[[inbound]]` site's), as the pool knows it.
pub struct Origin {
    /// Its position in the configuration: its pool key, since its TLS settings are its own.
    pub index: usize,
    pub host: String,
    pub port: u16,
    /// TLS to it, validated with its own roots, offering h2 and http/1.1 and then http/1.1
    /// only; `None` for plain HTTP.
    pub tls: Option<[Arc<rustls::ClientConfig>; 2]>,
}

#[derive(Default)]
struct Idle {
    /// Oldest first.
    h1: Vec<IdleH1>,
    /// By lane.
    h2: [Option<SharedH2>; LANES],
    /// Lanes whose connection is being opened in the background.
    opening: [bool; LANES],
    /// Lanes whose connection failed to open, and when they may try again.
    retry_at: [Option<Instant>; LANES],
}

struct SharedH2 {
    sender: H2Sender,
    peer: Arc<Peer>,
    /// When a client connection last took it from the pool or, seen at the last sweep, sent a
    /// request on it.
    last_used: Instant,
    /// `Peer::requests` at the last sweep.
    seen: u64,
}

impl SharedH2 {
    /// Client connections send on the sender they took without coming back to the pool: the
    /// connection counts as used now if requests went over it since the last look, so one
    /// busy with long-lived clients is not swept as idle (new clients would then dial
    /// connections of their own beside it).
    fn refresh(&mut self, now: Instant) {
        let requests = self.peer.requests.load(std::sync::atomic::Ordering::Relaxed);
        if requests != self.seen {
            self.seen = requests;
            self.last_used = now;
        }
    }
}

struct IdleH1 {
    sender: http1::SendRequest<Body>,
    peer: Arc<Peer>,
    since: Instant,
}

/// What we know about the server at the other end of an upstream connection.
pub struct Peer {
    /// For forward peers: the name validated; `None` for inbound origins (validated strictly by
    /// their own config at connect time, nothing to pick from).
    name: Option<ServerName<'static>>,
    chain: Vec<CertificateDer<'static>>,
    /// SHA-256 of the end-entity certificate.
    pub fingerprint: [u8; 32],
    /// The ALPN protocol the upstream chose.
    pub alpn: Option<Vec<u8>>,
    /// Whether a leaf minted for this certificate mirrors its names, whatever host it is
    /// minted for (`pki::mint::mirrors_names`).
    pub names_cover_host: bool,
    verdict: Mutex<(Verdict, Instant)>,
    /// What the upstream handshake settled on (the decryption log).
    pub tls: TlsFacts,
    /// The end entity's public fields, parsed on first use (the decryption log).
    cert: std::sync::OnceLock<Option<Arc<CertFacts>>>,
    /// The last revocation check, and when.
    revocation: Mutex<Option<(Status, Instant)>>,
    /// The OCSP response the upstream stapled in the handshake.
    staple: Option<Arc<[u8]>>,
    /// h2: requests in flight on the connection.
    streams: std::sync::atomic::AtomicUsize,
    /// h2: requests sent on the connection so far.
    requests: std::sync::atomic::AtomicU64,
    /// h2: the connection has ended (its task set this as it ended).
    closed: std::sync::atomic::AtomicBool,
    /// h2: the lane whose shared connection this is (`NO_LANE` until pooled).
    lane: std::sync::atomic::AtomicUsize,
}

const NO_LANE: usize = usize::MAX;

/// A request sender on an upstream connection.
pub enum Sender {
    H1(http1::SendRequest<Body>),
    H2(H2Sender),
}

/// Requests over an upstream h2 connection. The h2 crate's own sender: a client task sends its
/// request and awaits the response itself, where hyper's h2 client spawns a task per request
/// and hands the response over through a channel (about 5 % of the proxy's CPU per request
/// under HTTP/1.1 load, measured against nginx-proxy in alternating rounds).
pub type H2Sender = h2::client::SendRequest<Bytes>;

/// A sender checked out of the pool (or freshly dialled), with its peer.
pub struct Lease {
    pub sender: Sender,
    pub peer: Arc<Peer>,
}

impl Upstreams {
    /// An empty pool holding at most `max` connections, each for at most `idle_timeout`.
    pub fn new(max: usize, idle_timeout: Duration) -> Self {
        let h1_required = moka::sync::Cache::builder().max_capacity(10_000).time_to_live(H1_REQUIRED_TTL).build();
        Self { idle: Mutex::new(Pool { max, idle_timeout, ..Pool::default() }), h1_required }
    }

    /// The pool key for a target and an ALPN offer.
    pub fn key(target: &Target, offer: Offer) -> PoolKey {
        let home = Some(std::thread::current().id());
        PoolKey { host: target.host.clone(), port: target.port, addr: target.addr, offer, site: None, home }
    }

    /// The lane of a new client connection: this thread's client connections take turns.
    pub fn next_lane() -> usize {
        thread_local! { static NEXT: std::cell::Cell<usize> = const { std::cell::Cell::new(0) }; }
        NEXT.with(|next| {
            let lane = next.get();
            next.set((lane + 1) % LANES);
            lane
        })
    }

    /// The pool key of a configured origin.
    pub fn origin_key(origin: &Origin) -> PoolKey {
        let (host, port) = (origin.host.clone(), origin.port);
        let offer = if origin.tls.is_some() { Offer::H2 } else { Offer::None };
        PoolKey { host, port, addr: None, offer, site: Some(origin.index), home: None }
    }

    /// Whether `key`'s origin refused h2 for HTTP/1.1 clients lately (HTTP_1_1_REQUIRED).
    pub fn h1_required(&self, key: &PoolKey) -> bool {
        key.offer == Offer::H2 && self.h1_required.contains_key(&(key.host.clone(), key.port))
    }

    /// Remembers that `key`'s origin answered HTTP_1_1_REQUIRED.
    pub fn remember_h1_required(&self, key: &PoolKey) {
        tracing::info!(host = %key.host, port = key.port, "origin requires HTTP/1.1 (HTTP_1_1_REQUIRED): its HTTP/1.1 clients stay on HTTP/1.1");
        self.h1_required.insert((key.host.clone(), key.port), ());
    }

    /// A sender to `key`'s upstream for a client connection in `lane`: a pooled one when
    /// available (matching `fingerprint` when given), else a new connection. A lane without a
    /// connection of its own is given another lane's, and its own is opened in the background
    /// when that one is busy.
    pub async fn checkout(
        &self,
        proxy: &Arc<Proxy>,
        route: &Route,
        key: &PoolKey,
        fingerprint: Option<[u8; 32]>,
        lane: usize,
    ) -> Result<Lease, ProxyError> {
        if let Some((lease, open_lane)) = self.pooled(key, fingerprint, lane) {
            if open_lane {
                open_in_background(proxy.clone(), route.clone(), key.clone(), fingerprint, lane);
            }
            return Ok(lease);
        }
        let lease = Self::dial(proxy, route, key, fingerprint).await?;
        self.share(key, &lease, lane);
        Ok(lease)
    }

    /// A new connection to `key`'s upstream, which must present `fingerprint` when given.
    async fn dial(
        proxy: &Proxy,
        route: &Route,
        key: &PoolKey,
        fingerprint: Option<[u8; 32]>,
    ) -> Result<Lease, ProxyError> {
        let lease = match route {
            Route::Forward { target, offer } => dial_forward(proxy, target, *offer).await?,
            Route::Origin { origin, offer } => dial_origin(proxy, origin, *offer).await?,
        };
        if let Some(expected) = fingerprint
            && lease.peer.fingerprint != expected
        {
            return Err(ProxyError::UpstreamHttp {
                target: key.host.clone(),
                reason: "upstream certificate changed within the connection".into(),
            });
        }
        Ok(lease)
    }

    /// Shares a new h2 connection as `lane`'s (in place of the one it had).
    fn share(&self, key: &PoolKey, lease: &Lease, lane: usize) {
        let Sender::H2(sender) = &lease.sender else { return };
        let now = Instant::now();
        let mut pool = self.idle.lock();
        pool.make_room(now);
        lease.peer.lane.store(lane, std::sync::atomic::Ordering::Relaxed);
        let seen = lease.peer.requests.load(std::sync::atomic::Ordering::Relaxed);
        let shared = SharedH2 { sender: sender.clone(), peer: lease.peer.clone(), last_used: now, seen };
        if pool.keys.entry(key.clone()).or_default().h2[lane].replace(shared).is_none() {
            pool.total += 1;
        }
        pool.publish();
    }

    /// A pooled connection for a client connection in `lane`, and whether that lane's own
    /// connection is to be opened (the one given is another lane's, and busy).
    fn pooled(&self, key: &PoolKey, fingerprint: Option<[u8; 32]>, lane: usize) -> Option<(Lease, bool)> {
        let matches = |peer: &Peer| fingerprint.is_none_or(|f| f == peer.fingerprint);
        let now = Instant::now();
        let mut pool = self.idle.lock();
        let pool = &mut *pool;
        let entry = pool.keys.get_mut(key)?;
        for slot in &mut entry.h2 {
            if slot.as_ref().is_some_and(|shared| shared.peer.closed()) {
                *slot = None;
                pool.total -= 1;
            }
        }
        let own = entry.h2[lane].as_ref().is_some_and(|shared| matches(&shared.peer));
        let shared = match own {
            true => entry.h2[lane].as_mut(),
            false => entry.h2.iter_mut().flatten().find(|shared| matches(&shared.peer)),
        };
        if let Some(shared) = shared {
            shared.last_used = now;
            let busy = shared.peer.in_flight() > 0;
            let lease = Lease { sender: Sender::H2(shared.sender.clone()), peer: shared.peer.clone() };
            let open = !own && busy && !entry.opening[lane] && entry.retry_at[lane].is_none_or(|at| now >= at);
            entry.opening[lane] |= open;
            return Some((lease, open));
        }
        // Newest first: the most recently used connection is the least likely to be closing.
        let i = entry.h1.iter().rposition(|idle| !idle.sender.is_closed() && matches(&idle.peer))?;
        let idle = entry.h1.remove(i);
        pool.total -= 1;
        pool.publish();
        Some((Lease { sender: Sender::H1(idle.sender), peer: idle.peer }, false))
    }

    /// `lane` of `key` is no longer being opened; if it failed, it waits `LANE_RETRY`.
    fn opened(&self, key: &PoolKey, lane: usize, failed: bool) {
        let mut pool = self.idle.lock();
        let entry = pool.keys.entry(key.clone()).or_default();
        entry.opening[lane] = false;
        entry.retry_at[lane] = failed.then(|| Instant::now() + LANE_RETRY);
    }

    /// Returns an unused lease (the client went away before its first request).
    pub fn give_back(&self, key: &PoolKey, lease: Lease) {
        if let Sender::H1(sender) = lease.sender {
            self.checkin(key, sender, lease.peer);
        }
    }

    /// Returns an HTTP/1.1 sender whose exchange is complete.
    pub fn checkin(&self, key: &PoolKey, sender: http1::SendRequest<Body>, peer: Arc<Peer>) {
        if sender.is_closed() {
            return;
        }
        let now = Instant::now();
        let mut pool = self.idle.lock();
        pool.make_room(now);
        let entry = pool.keys.entry(key.clone()).or_default();
        if entry.h1.len() >= MAX_IDLE_H1 {
            return;
        }
        entry.h1.push(IdleH1 { sender, peer, since: now });
        pool.total += 1;
        pool.publish();
    }

    /// Connections pooled now.
    pub fn pooled_count(&self) -> usize {
        self.idle.lock().total
    }
}

impl Pool {
    fn publish(&self) {
        METRICS.upstream_pooled.set(self.total as i64);
    }

    /// Sweeps, then, when the pool is full, evicts the longest-unused connections: an eighth of
    /// the pool at a time, so a crawl over many hosts pays one pass over the pool per eighth of
    /// it rather than one per request (a pool of 100k would otherwise be scanned on every
    /// checkin).
    fn make_room(&mut self, now: Instant) {
        self.sweep(now);
        let max = self.max.max(1);
        if self.total >= max {
            self.evict_oldest(self.total + 1 - max + max / 8);
        }
    }

    /// Drops closed connections and those idle past the timeout; at most once a second.
    fn sweep(&mut self, now: Instant) {
        if self.last_sweep.is_some_and(|t| now.duration_since(t) < Duration::from_secs(1)) {
            return;
        }
        self.last_sweep = Some(now);
        let timeout = self.idle_timeout;
        self.retain(
            |c| !c.sender.is_closed() && now.duration_since(c.since) < timeout,
            |c| {
                c.refresh(now);
                !c.peer.closed() && now.duration_since(c.last_used) < timeout
            },
        );
    }

    /// Drops the `n` longest-unused pooled connections (ties with the n-th may go too). An h2
    /// connection still serving client connections that hold its sender stays open for them;
    /// it only leaves the pool.
    fn evict_oldest(&mut self, n: usize) {
        let mut ages: Vec<Instant> = self
            .keys
            .values()
            .flat_map(|idle| idle.h1.iter().map(|c| c.since).chain(idle.h2.iter().flatten().map(|c| c.last_used)))
            .collect();
        if n == 0 || ages.is_empty() {
            return;
        }
        let last = n.min(ages.len()) - 1;
        let cutoff = *ages.select_nth_unstable(last).1;
        self.retain(|c| c.since > cutoff, |c| c.last_used > cutoff);
    }

    /// Keeps the pooled connections both predicates accept, drops emptied keys, recounts.
    fn retain(&mut self, mut keep_h1: impl FnMut(&IdleH1) -> bool, mut keep_h2: impl FnMut(&mut SharedH2) -> bool) {
        self.keys.retain(|_, idle| {
            idle.h1.retain(&mut keep_h1);
            for slot in &mut idle.h2 {
                if slot.as_mut().is_some_and(|c| !keep_h2(c)) {
                    *slot = None;
                }
            }
            !idle.h1.is_empty() || idle.h2.iter().any(Option::is_some) || idle.opening.contains(&true)
        });
        self.total = self.keys.values().map(|idle| idle.h1.len() + idle.h2.iter().flatten().count()).sum();
    }
}

impl Peer {
    /// A peer with what its handshake showed; what is learned later (certificate facts,
    /// revocation, the h2 connection's state) starts empty. A leaf minted for a forward peer
    /// may mirror its certificate's names; an inbound origin (`name` none) is never minted for.
    fn new(
        name: Option<ServerName<'static>>,
        chain: Vec<CertificateDer<'static>>,
        alpn: Option<Vec<u8>>,
        (verdict, staple): (Verdict, Option<Arc<[u8]>>),
        tls: TlsFacts,
    ) -> Arc<Self> {
        let leaf = chain.first().map(|c| c.as_ref());
        let fingerprint = leaf.map_or([0; 32], sha256);
        let names_cover_host = name.is_some() && leaf.is_some_and(crate::pki::mint::mirrors_names);
        let verdict = Mutex::new((verdict, Instant::now()));
        let (cert, revocation, streams, requests, closed) = Default::default();
        let lane = std::sync::atomic::AtomicUsize::new(NO_LANE);
        Arc::new(Peer {
            name,
            chain,
            fingerprint,
            alpn,
            names_cover_host,
            verdict,
            tls,
            cert,
            revocation,
            staple,
            streams,
            requests,
            closed,
            lane,
        })
    }

    /// An inbound origin, trusted by the site's own config (its TLS validated by the site's
    /// roots, or plain HTTP): never a verdict of its own.
    fn inbound(chain: Vec<CertificateDer<'static>>, alpn: Option<Vec<u8>>) -> Arc<Self> {
        Self::new(None, chain, alpn, (Verdict::TRUSTED, None), TlsFacts::default())
    }

    /// An inbound origin reached over plain HTTP.
    fn plain() -> Arc<Self> {
        Self::inbound(Vec::new(), None)
    }

    /// The verdict, recomputed from the chain when older than a minute (a pooled connection's
    /// certificate may have expired, or the roots changed).
    pub fn verdict(&self, tls: &UpstreamTls) -> Verdict {
        let mut cached = self.verdict.lock();
        if let Some(name) = &self.name
            && cached.1.elapsed() > VERDICT_MAX_AGE
        {
            *cached = (tls.verdict(name, &self.chain), Instant::now());
        }
        cached.0.clone()
    }

    /// The certificate's revocation status: checked again when older than a minute, like the
    /// verdict (a pooled connection outlives a CRL update).
    pub async fn revocation(&self, revocation: &Revocation) -> Status {
        if let Some((status, at)) = &*self.revocation.lock()
            && at.elapsed() < VERDICT_MAX_AGE
        {
            return status.clone();
        }
        let status = revocation.check(&self.chain, self.staple.as_deref()).await;
        *self.revocation.lock() = Some((status.clone(), Instant::now()));
        status
    }

    /// The end entity's subject, issuer, serial, fingerprint and validity.
    pub fn cert_facts(&self) -> Option<Arc<CertFacts>> {
        self.cert.get_or_init(|| super::decryption::cert_facts(&self.chain)).clone()
    }

    /// h2: requests in flight on the connection.
    pub fn in_flight(&self) -> usize {
        self.streams.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// h2: a request is sent on the connection (`in_flight` until `request_done`).
    pub fn request_sent(&self) {
        self.streams.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.requests.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// h2: a request's exchange is over (answered, failed or abandoned).
    pub fn request_done(&self) {
        self.streams.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether the (h2) connection has ended.
    pub fn closed(&self) -> bool {
        self.closed.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The lane whose shared h2 connection this is, if it is one.
    pub fn lane(&self) -> Option<usize> {
        Some(self.lane.load(std::sync::atomic::Ordering::Relaxed)).filter(|&lane| lane != NO_LANE)
    }

    /// Marks the connection ended (an h2 sender refused a new request).
    pub fn set_closed(&self) {
        self.closed.store(true, std::sync::atomic::Ordering::Release);
    }

    /// The end-entity certificate.
    pub fn leaf(&self) -> &[u8] {
        self.chain.first().map(|c| c.as_ref()).unwrap_or_default()
    }
}

/// An upstream TCP connection, with its read deadline.
type Tcp = Deadlines<tokio::net::TcpStream>;

/// Connects and handshakes upstream for forward interception: TLS with the client's SNI and
/// ALPN offer, the verdict from the verifier, then HTTP.
async fn dial_forward(proxy: &Proxy, target: &Target, offer: Offer) -> Result<Lease, ProxyError> {
    let tcp = Deadlines::new(proxy.dial(target).await?).read_deadline(proxy.read_timeout);
    let name = server_name(target)?;
    // A config of this connection's own, to see whether the server asks for a client
    // certificate (an exchange tollgate cannot take part in for the client), and to present
    // tollgate's own where `[[upstream.client_cert]]` names the host.
    let probe = Arc::new(ClientAuthProbe { asked: Default::default(), cert: proxy.client_certs.find(&target.host) });
    let asked = || probe.asked.load(std::sync::atomic::Ordering::Acquire);
    let mut config = (*proxy.upstream_tls.config_for(offer)).clone();
    config.client_auth_cert_resolver = probe.clone();
    let connected = tls_connect(proxy, target, Arc::new(config), name.clone(), tcp).await;
    let unsupported = |reason: &str| ProxyError::Unsupported { target: target.to_string(), reason: reason.into() };
    if asked() && probe.cert.is_none() {
        return Err(unsupported(ASKS_CLIENT_CERT));
    }
    let stream = match connected {
        Ok(stream) => stream,
        Err(e) => return Err(incompatible(&e).map_or(e, unsupported)),
    };
    let conn = stream.get_ref().1;
    let chain: Vec<CertificateDer<'static>> =
        conn.peer_certificates().unwrap_or_default().iter().map(|c| c.clone().into_owned()).collect();
    let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
    let resumed = conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    let seen = proxy.upstream_tls.handshake_verdict(&name, &chain, resumed);
    let mut tls = TlsFacts::of(conn);
    tls.client_cert = probe.cert.as_ref().filter(|_| asked()).map(|cert| cert.name.clone());
    let peer = Peer::new(Some(name), chain, alpn, seen, tls);
    let sender = http_handshake(target, stream, &peer).await?;
    Ok(Lease { sender, peer })
}

/// Connects to a configured origin: TLS validated by its own config (a failure is an error,
/// never a verdict), or plain HTTP.
async fn dial_origin(proxy: &Proxy, origin: &Origin, offer: Offer) -> Result<Lease, ProxyError> {
    let target = Target { host: origin.host.clone(), port: origin.port, addr: None };
    let tcp = Deadlines::new(proxy.dial_origin(&target).await?).read_deadline(proxy.read_timeout);
    let Some([h2, h1_only]) = &origin.tls else {
        let peer = Peer::plain();
        let sender = http_handshake(&target, tcp, &peer).await?;
        return Ok(Lease { sender, peer });
    };
    let config = if offer == Offer::Http11 { h1_only } else { h2 };
    let stream = tls_connect(proxy, &target, config.clone(), server_name(&target)?, tcp).await?;
    let conn = stream.get_ref().1;
    let chain: Vec<CertificateDer<'static>> =
        conn.peer_certificates().unwrap_or_default().iter().map(|c| c.clone().into_owned()).collect();
    let peer = Peer::inbound(chain, conn.alpn_protocol().map(<[u8]>::to_vec));
    let sender = http_handshake(&target, stream, &peer).await?;
    Ok(Lease { sender, peer })
}

/// Records whether the server asked for a client certificate; presents the host's
/// `[[upstream.client_cert]]`, if it has one.
#[derive(Debug)]
struct ClientAuthProbe {
    asked: std::sync::atomic::AtomicBool,
    cert: Option<ClientCert>,
}

impl rustls::client::ResolvesClientCert for ClientAuthProbe {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.asked.store(true, std::sync::atomic::Ordering::Release);
        self.cert.as_ref().map(|cert| cert.key.clone())
    }

    fn has_certs(&self) -> bool {
        self.cert.is_some()
    }
}

/// `[[upstream.client_cert]]`: tollgate's own client certificates, by upstream host glob.
#[derive(Debug, Default)]
pub struct ClientCerts {
    entries: Vec<(crate::config::HostGlobs, ClientCert)>,
}

/// One of tollgate's client certificates: its name in the store (the decryption log's
/// `upstream_client_cert`) and the certificate with its signing key.
#[derive(Clone, Debug)]
pub struct ClientCert {
    pub name: Arc<str>,
    key: Arc<rustls::sign::CertifiedKey>,
}

impl ClientCerts {
    /// Loads each entry's certificate from the store, its key from the HSM or the vault. A
    /// name not in the store is a configuration error; a key that cannot be used now (the
    /// HSM away, the key missing) is logged, and its hosts are treated as before: tunnelled
    /// or blocked when they ask for a certificate.
    pub fn new(
        config: &crate::config::Config,
        store: &crate::pki::CertStore,
        keys: &crate::pki::Keyring<'_>,
        waiting: &Arc<crate::hsm::WaitLimit>,
    ) -> Result<Self, crate::config::ConfigError> {
        let mut entries = Vec::new();
        for (entry, stored) in config.upstream.client_cert.iter().zip(Self::stored(config, store)?) {
            match super::tls::certified_key(stored, keys, waiting) {
                Ok(certified) => {
                    tracing::info!(certificate = %entry.cert, hosts = ?entry.hosts.globs(), "upstream client certificate loaded");
                    entries.push((
                        entry.hosts.clone(),
                        ClientCert { name: entry.cert.as_str().into(), key: Arc::new(certified) },
                    ));
                }
                Err(reason) => {
                    tracing::error!(certificate = %entry.cert, error = %reason, "upstream client certificate unusable; its hosts get none");
                }
            }
        }
        Ok(Self { entries })
    }

    /// Whether no certificate is loaded.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Checks that every entry names a certificate in `store` (`run --check`).
    pub fn check(
        config: &crate::config::Config,
        store: &crate::pki::CertStore,
    ) -> Result<(), crate::config::ConfigError> {
        Self::stored(config, store).map(drop)
    }

    /// The store entry of each `[[upstream.client_cert]]`; a name not in the store is a
    /// configuration error naming the entry.
    fn stored<'s>(
        config: &crate::config::Config,
        store: &'s crate::pki::CertStore,
    ) -> Result<Vec<&'s crate::pki::CertEntry>, crate::config::ConfigError> {
        let entries = config.upstream.client_cert.iter().enumerate();
        entries
            .map(|(i, entry)| {
                store.entries().iter().find(|e| e.name == entry.cert).ok_or_else(|| {
                    crate::config::ConfigError::Invalid {
                        path: config.path.clone(),
                        field: format!("upstream.client_cert[{i}].cert"),
                        reason: format!(
                            "no certificate named {:?} in the store (tollgate cert import --name)",
                            entry.cert
                        ),
                    }
                })
            })
            .collect()
    }

    /// The certificate to present to `host`: the first entry naming it.
    pub fn find(&self, host: &str) -> Option<ClientCert> {
        self.entries.iter().find(|(hosts, _)| hosts.is_match(host)).map(|(_, cert)| cert.clone())
    }
}

/// Why an upstream handshake failure means the server and tollgate have no TLS in common
/// (rather than a fault of the moment), if it does.
fn incompatible(e: &ProxyError) -> Option<&'static str> {
    use rustls::AlertDescription::{HandshakeFailure, InsufficientSecurity, ProtocolVersion};
    let ProxyError::UpstreamTls { source, .. } = e else { return None };
    match source.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::AlertReceived(ProtocolVersion) => Some("the server speaks only TLS versions older than 1.2"),
        rustls::Error::AlertReceived(HandshakeFailure | InsufficientSecurity) => {
            Some("the server shares no cipher suite or group with tollgate")
        }
        rustls::Error::PeerIncompatible(_) => Some("the server shares no TLS version or cipher suite with tollgate"),
        _ => None,
    }
}

fn server_name(target: &Target) -> Result<ServerName<'static>, ProxyError> {
    ServerName::try_from(target.host.clone()).map_err(|e| ProxyError::UpstreamTls {
        target: target.to_string(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
    })
}

async fn tls_connect(
    proxy: &Proxy,
    target: &Target,
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
    tcp: Tcp,
) -> Result<tokio_rustls::client::TlsStream<Tcp>, ProxyError> {
    let secs = proxy.connect_timeout.as_secs();
    tokio::time::timeout(proxy.connect_timeout, tokio_rustls::TlsConnector::from(config).connect(name, tcp))
        .await
        .map_err(|_| ProxyError::Timeout { phase: "upstream TLS handshake", secs, side: Side::Upstream })?
        .map_err(|source| ProxyError::UpstreamTls { target: target.to_string(), source })
}

/// Opens `lane`'s own connection to `key`'s upstream without holding up a request (another
/// lane's connection serves its clients meanwhile), on the runtime of the thread asking, which
/// runs the connection's task.
fn open_in_background(proxy: Arc<Proxy>, route: Route, key: PoolKey, fingerprint: Option<[u8; 32]>, lane: usize) {
    tokio::spawn(async move {
        let upstreams = &proxy.upstreams;
        let dialed = Box::pin(Upstreams::dial(&proxy, &route, &key, fingerprint)).await;
        upstreams.opened(&key, lane, dialed.is_err());
        match dialed {
            Ok(lease) => match lease.sender {
                Sender::H2(_) => upstreams.share(&key, &lease, lane),
                Sender::H1(sender) => upstreams.checkin(&key, sender, lease.peer),
            },
            Err(e) => {
                tracing::debug!(host = %key.host, lane, error = %e, "another upstream connection could not be opened")
            }
        }
    });
}

/// HTTP/1.1 or h2 (as the peer chose in ALPN) over an established upstream connection.
async fn http_handshake<IO>(target: &Target, io: IO, peer: &Arc<Peer>) -> Result<Sender, ProxyError>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let http_err = |reason: String| ProxyError::UpstreamHttp { target: target.to_string(), reason };
    if peer.alpn.as_deref() == Some(H2) {
        // hyper's h2 client settings.
        let (sender, connection) = h2::client::Builder::new()
            .initial_max_send_streams(100)
            .initial_window_size(2 << 20)
            .initial_connection_window_size(5 << 20)
            .max_frame_size(16 << 10)
            .max_header_list_size(16 << 10)
            .max_send_buffer_size(1 << 20)
            .max_local_error_reset_streams(Some(1024))
            .enable_push(false)
            .handshake::<_, Bytes>(io)
            .await
            .map_err(|e| http_err(e.to_string()))?;
        let peer = peer.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "upstream h2 connection ended with an error");
            }
            peer.set_closed();
        });
        Ok(Sender::H2(sender))
    } else {
        let (sender, connection) = http1::handshake(TokioIo::new(io)).await.map_err(|e| http_err(e.to_string()))?;
        tokio::spawn(connection.with_upgrades());
        Ok(Sender::H1(sender))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: usize) -> PoolKey {
        PoolKey { host: format!("site{i}.test"), port: 443, addr: None, offer: Offer::H2, site: None, home: None }
    }

    #[tokio::test]
    async fn a_full_pool_evicts_the_longest_unused_an_eighth_at_a_time() {
        let upstreams = Upstreams::new(16, Duration::from_secs(60));
        let mut connections = Vec::new(); // held open: a sender whose connection is gone is never pooled
        let mut counts = Vec::new();
        for i in 0..40 {
            let (io, server_end) = tokio::io::duplex(64);
            let (sender, connection) =
                http1::handshake::<_, Body>(hyper_util::rt::TokioIo::new(io)).await.expect("handshake");
            connections.push((connection, server_end));
            upstreams.checkin(&key(i), sender, Peer::plain());
            counts.push(upstreams.pooled_count());
        }
        // Fills to the bound, then each pass evicts three (the slot needed plus 16 / 8) and the
        // pool refills: one pass per three checkins, not one per checkin.
        let expected: Vec<usize> = (1..=16).chain([14, 15, 16].into_iter().cycle().take(24)).collect();
        assert_eq!(counts, expected);
        let pool = upstreams.idle.lock();
        let mut hosts: Vec<&str> = pool.keys.keys().map(|k| k.host.as_str()).collect();
        hosts.sort_by_key(|h| h.trim_start_matches("site").trim_end_matches(".test").parse::<usize>().unwrap());
        let newest: Vec<String> = (40 - hosts.len()..40).map(|i| format!("site{i}.test")).collect();
        assert_eq!(hosts, newest, "the most recently used connections stay");
    }

    /// An h2 sender over an in-memory pipe to a server that only accepts the connection.
    async fn h2_lease() -> Lease {
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            if let Ok(mut server) = h2::server::handshake(theirs).await {
                while server.accept().await.is_some() {}
            }
        });
        let (sender, connection) = h2::client::handshake(ours).await.expect("h2 handshake");
        tokio::spawn(connection);
        Lease { sender: Sender::H2(sender), peer: Peer::plain() }
    }

    /// Client connections send on a shared connection's sender without coming back to the
    /// pool: what they send keeps the connection from being swept as idle, and only that.
    #[tokio::test]
    async fn a_shared_connection_in_use_is_not_swept_as_idle() {
        let upstreams = Upstreams::new(16, Duration::from_millis(50));
        let (busy, quiet) = (key(0), key(1));
        let (held, unused) = (h2_lease().await, h2_lease().await);
        upstreams.share(&busy, &held, 0);
        upstreams.share(&quiet, &unused, 0);
        let start = Instant::now();
        let sweep_at = |at: Duration| {
            let mut pool = upstreams.idle.lock();
            pool.last_sweep = None;
            pool.sweep(start + at);
            let mut left: Vec<String> = pool.keys.keys().map(|k| k.host.clone()).collect();
            left.sort();
            left
        };
        held.peer.request_sent();
        held.peer.request_done();
        assert_eq!(sweep_at(Duration::from_millis(100)), ["site0.test"], "the one requests went over stays");
        assert_eq!(sweep_at(Duration::from_millis(200)), Vec::<String>::new(), "until it too is idle for the timeout");
    }

    /// A second lane borrows the first lane's connection, asks for its own only while that one
    /// is busy, asks once while it is being opened, and waits after a failed open.
    #[tokio::test]
    async fn a_second_lane_opens_its_connection_only_when_the_first_is_busy() {
        let upstreams = Upstreams::new(16, Duration::from_secs(60));
        let key = key(0);
        let first = h2_lease().await;
        upstreams.share(&key, &first, 0);
        assert_eq!(first.peer.lane(), Some(0));

        let (lent, open) = upstreams.pooled(&key, None, 1).expect("the first lane's connection is lent");
        assert!(Arc::ptr_eq(&lent.peer, &first.peer));
        assert!(!open, "an idle connection is enough for both lanes");

        first.peer.request_sent();
        let (_, open) = upstreams.pooled(&key, None, 1).unwrap();
        assert!(open, "a busy one: the second lane opens its own");
        let (_, open) = upstreams.pooled(&key, None, 1).unwrap();
        assert!(!open, "once, while it is being opened");

        upstreams.opened(&key, 1, true);
        let (_, open) = upstreams.pooled(&key, None, 1).unwrap();
        assert!(!open, "a failed open waits before the next try");
        upstreams.idle.lock().keys.get_mut(&key).unwrap().retry_at[1] = Some(Instant::now());
        let (_, open) = upstreams.pooled(&key, None, 1).unwrap();
        assert!(open, "and tries again after the wait");

        let second = h2_lease().await;
        upstreams.opened(&key, 1, false);
        upstreams.share(&key, &second, 1);
        let (own, open) = upstreams.pooled(&key, None, 1).unwrap();
        assert!(Arc::ptr_eq(&own.peer, &second.peer) && !open, "the second lane has its own now");
        let (own, _) = upstreams.pooled(&key, None, 0).unwrap();
        assert!(Arc::ptr_eq(&own.peer, &first.peer), "and the first keeps its");
        assert_eq!(upstreams.pooled_count(), 2);
    }
}
