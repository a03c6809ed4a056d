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

/// Idle HTTP/1.1 connections kept per (host, port, ALPN offer).
const MAX_IDLE_H1: usize = 64;
/// A pooled connection's verdict is recomputed when older than this.
const VERDICT_MAX_AGE: Duration = Duration::from_secs(60);

/// The shared pool.
#[derive(Default)]
pub struct Upstreams {
    idle: Mutex<HashMap<PoolKey, Idle>>,
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
    h1: Vec<(http1::SendRequest<Body>, Arc<Peer>)>,
    h2: Option<(http2::SendRequest<Body>, Arc<Peer>)>,
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
            self.idle.lock().entry(key.clone()).or_default().h2 = Some((sender.clone(), lease.peer.clone()));
        }
        Ok(lease)
    }

    fn pooled(&self, key: &PoolKey, fingerprint: Option<[u8; 32]>) -> Option<Lease> {
        let matches = |peer: &Peer| fingerprint.is_none_or(|f| f == peer.fingerprint);
        let mut idle = self.idle.lock();
        let entry = idle.get_mut(key)?;
        if let Some((sender, peer)) = &entry.h2 {
            if !sender.is_closed() && matches(peer) {
                return Some(Lease { sender: Sender::H2(sender.clone()), peer: peer.clone() });
            }
            if sender.is_closed() {
                entry.h2 = None;
            }
        }
        entry.h1.retain(|(s, _)| !s.is_closed());
        let i = entry.h1.iter().rposition(|(_, peer)| matches(peer))?;
        let (sender, peer) = entry.h1.swap_remove(i);
        Some(Lease { sender: Sender::H1(sender), peer })
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
        let mut idle = self.idle.lock();
        let entry = idle.entry(key.clone()).or_default();
        if entry.h1.len() < MAX_IDLE_H1 {
            entry.h1.push((sender, peer));
        }
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
    let verdict = proxy.upstream_tls.verdict(&name, &chain);
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
