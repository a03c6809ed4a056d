//! Upstream connections: TLS to the origin with the client's SNI and ALPN offer (always
//! validated), HTTP senders over them, and a pool shared by every client connection. A new
//! client connection reuses an idle upstream connection to the same host instead of paying TCP
//! and TLS again (what nginx's upstream keepalive does); the certificate verdict of a pooled
//! connection is rechecked from its chain before reuse, at most a minute old.
//!
//! Connections that carried connection-bound authentication (NTLM, Negotiate) are never
//! returned to the shared pool: they stay pinned to their client connection (see `http.rs`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use parking_lot::Mutex;
use rustls::pki_types::{CertificateDer, ServerName};

use super::http::Body;
use super::tls::{H2, UpstreamTls, Verdict};
use super::{Proxy, ProxyError, Side, Target};
use crate::telemetry::METRICS;
use std::sync::atomic::Ordering::Relaxed;

/// Idle HTTP/1.1 connections kept per (host, port, ALPN offer).
const MAX_IDLE_H1: usize = 64;
/// A pooled connection's verdict is recomputed when older than this.
const VERDICT_MAX_AGE: Duration = Duration::from_secs(60);

/// The shared pool.
pub struct Upstreams {
    idle: Mutex<Pool>,
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
    /// Index of the ALPN offer class (none, http/1.1, h2+http/1.1).
    offer: usize,
}

#[derive(Default)]
struct Idle {
    /// Oldest first.
    h1: Vec<IdleH1>,
    h2: Option<SharedH2>,
}

struct SharedH2 {
    sender: http2::SendRequest<Body>,
    peer: Arc<Peer>,
    last_used: Instant,
}

struct IdleH1 {
    sender: http1::SendRequest<Body>,
    peer: Arc<Peer>,
    since: Instant,
}

/// What we know about the server at the other end of an upstream connection.
pub struct Peer {
    name: ServerName<'static>,
    chain: Vec<CertificateDer<'static>>,
    /// SHA-256 of the end-entity certificate.
    pub fingerprint: [u8; 32],
    /// The ALPN protocol the upstream chose.
    pub alpn: Option<Vec<u8>>,
    verdict: Mutex<(Verdict, Instant)>,
}

/// A request sender on an upstream connection.
pub enum Sender {
    H1(http1::SendRequest<Body>),
    H2(http2::SendRequest<Body>),
}

/// A sender checked out of the pool (or freshly dialled), with its peer.
pub struct Lease {
    pub sender: Sender,
    pub peer: Arc<Peer>,
}

impl Upstreams {
    /// An empty pool holding at most `max` connections, each for at most `idle_timeout`.
    pub fn new(max: usize, idle_timeout: Duration) -> Self {
        Self { idle: Mutex::new(Pool { max, idle_timeout, ..Pool::default() }) }
    }

    /// The pool key for a target and a client's ALPN offer.
    pub fn key(target: &Target, client_alpn: &[Vec<u8>]) -> PoolKey {
        PoolKey { host: target.host.clone(), port: target.port, offer: UpstreamTls::offer_class(client_alpn) }
    }

    /// A sender to `key`'s upstream: a pooled one when available (matching `fingerprint` when
    /// given), else a new connection.
    pub async fn checkout(
        &self,
        proxy: &Proxy,
        target: &Target,
        key: &PoolKey,
        client_alpn: &[Vec<u8>],
        fingerprint: Option<[u8; 32]>,
    ) -> Result<Lease, ProxyError> {
        if let Some(lease) = self.pooled(key, fingerprint) {
            return Ok(lease);
        }
        let lease = dial(proxy, target, client_alpn).await?;
        if let Some(expected) = fingerprint
            && lease.peer.fingerprint != expected
        {
            return Err(ProxyError::UpstreamHttp {
                target: target.to_string(),
                reason: "upstream certificate changed within the connection".into(),
            });
        }
        if let Sender::H2(sender) = &lease.sender {
            let mut pool = self.idle.lock();
            pool.make_room(Instant::now());
            let shared = SharedH2 { sender: sender.clone(), peer: lease.peer.clone(), last_used: Instant::now() };
            if pool.keys.entry(key.clone()).or_default().h2.replace(shared).is_none() {
                pool.total += 1;
            }
            pool.publish();
        }
        Ok(lease)
    }

    fn pooled(&self, key: &PoolKey, fingerprint: Option<[u8; 32]>) -> Option<Lease> {
        let matches = |peer: &Peer| fingerprint.is_none_or(|f| f == peer.fingerprint);
        let mut pool = self.idle.lock();
        let pool = &mut *pool;
        let entry = pool.keys.get_mut(key)?;
        if let Some(shared) = &mut entry.h2 {
            if !shared.sender.is_closed() && matches(&shared.peer) {
                shared.last_used = Instant::now();
                return Some(Lease { sender: Sender::H2(shared.sender.clone()), peer: shared.peer.clone() });
            }
            if shared.sender.is_closed() {
                entry.h2 = None;
                pool.total -= 1;
            }
        }
        // Newest first: the most recently used connection is the least likely to be closing.
        let i = entry.h1.iter().rposition(|idle| !idle.sender.is_closed() && matches(&idle.peer))?;
        let idle = entry.h1.remove(i);
        pool.total -= 1;
        pool.publish();
        Some(Lease { sender: Sender::H1(idle.sender), peer: idle.peer })
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
        METRICS.upstream_pooled.store(self.total as i64, Relaxed);
    }

    /// Sweeps, then evicts the longest-idle connection when the pool is full.
    fn make_room(&mut self, now: Instant) {
        self.sweep(now);
        while self.total >= self.max.max(1) && self.evict_oldest() {}
    }

    /// Drops closed connections and those idle past the timeout; at most once a second.
    fn sweep(&mut self, now: Instant) {
        if self.last_sweep.is_some_and(|t| now.duration_since(t) < Duration::from_secs(1)) {
            return;
        }
        self.last_sweep = Some(now);
        let timeout = self.idle_timeout;
        self.keys.retain(|_, idle| {
            idle.h1.retain(|c| !c.sender.is_closed() && now.duration_since(c.since) < timeout);
            if idle.h2.as_ref().is_some_and(|h2| h2.sender.is_closed() || now.duration_since(h2.last_used) >= timeout) {
                idle.h2 = None;
            }
            !idle.h1.is_empty() || idle.h2.is_some()
        });
        self.total = self.keys.values().map(|idle| idle.h1.len() + usize::from(idle.h2.is_some())).sum();
    }

    /// Drops the longest-unused pooled connection (an h2 connection still serving client
    /// connections that hold its sender stays open for them; it only leaves the pool).
    fn evict_oldest(&mut self) -> bool {
        let oldest = self
            .keys
            .iter()
            .flat_map(|(key, idle)| {
                let h1 = idle.h1.first().map(|c| (c.since, key, false));
                let h2 = idle.h2.as_ref().map(|c| (c.last_used, key, true));
                h1.into_iter().chain(h2)
            })
            .min_by_key(|(since, _, _)| *since)
            .map(|(_, key, h2)| (key.clone(), h2));
        let Some((key, h2)) = oldest else { return false };
        let Some(idle) = self.keys.get_mut(&key) else { return false };
        if h2 {
            idle.h2 = None;
        } else {
            idle.h1.remove(0);
        }
        self.total -= 1;
        if idle.h1.is_empty() && idle.h2.is_none() {
            self.keys.remove(&key);
        }
        true
    }
}

impl Peer {
    /// The verdict, recomputed from the chain when older than a minute (a pooled connection's
    /// certificate may have expired, or the roots changed).
    pub fn verdict(&self, tls: &UpstreamTls) -> Verdict {
        let mut cached = self.verdict.lock();
        if cached.1.elapsed() > VERDICT_MAX_AGE {
            *cached = (tls.verdict(&self.name, &self.chain), Instant::now());
        }
        cached.0.clone()
    }

    /// The end-entity certificate.
    pub fn leaf(&self) -> &[u8] {
        self.chain.first().map(|c| c.as_ref()).unwrap_or_default()
    }
}

/// Connects and handshakes upstream (TLS with the client's SNI and ALPN offer, then HTTP).
async fn dial(proxy: &Proxy, target: &Target, client_alpn: &[Vec<u8>]) -> Result<Lease, ProxyError> {
    let tcp = proxy.dial(target).await?;
    let name = ServerName::try_from(target.host.clone()).map_err(|e| ProxyError::UpstreamTls {
        target: target.to_string(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
    })?;
    let connector = tokio_rustls::TlsConnector::from(proxy.upstream_tls.config_for(client_alpn));
    let secs = proxy.connect_timeout.as_secs();
    let stream = tokio::time::timeout(proxy.connect_timeout, connector.connect(name.clone(), tcp))
        .await
        .map_err(|_| ProxyError::Timeout { phase: "upstream TLS handshake", secs, side: Side::Upstream })?
        .map_err(|source| ProxyError::UpstreamTls { target: target.to_string(), source })?;
    let conn = stream.get_ref().1;
    let chain: Vec<CertificateDer<'static>> =
        conn.peer_certificates().unwrap_or_default().iter().map(|c| c.clone().into_owned()).collect();
    let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
    let resumed = conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    let verdict = proxy.upstream_tls.handshake_verdict(&name, &chain, resumed);
    let fingerprint = super::intercept::sha256(chain.first().map(|c| c.as_ref()).unwrap_or_default());
    let peer = Arc::new(Peer { name, chain, fingerprint, alpn, verdict: Mutex::new((verdict, Instant::now())) });

    let http_err = |e: hyper::Error| ProxyError::UpstreamHttp { target: target.to_string(), reason: e.to_string() };
    let io = TokioIo::new(stream);
    let sender = if peer.alpn.as_deref() == Some(H2) {
        let (sender, connection) = http2::handshake(TokioExecutor::new(), io).await.map_err(http_err)?;
        tokio::spawn(connection);
        Sender::H2(sender)
    } else {
        let (sender, connection) = http1::handshake(io).await.map_err(http_err)?;
        tokio::spawn(connection.with_upgrades());
        Sender::H1(sender)
    };
    Ok(Lease { sender, peer })
}
