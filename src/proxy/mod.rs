//! The data plane. Each listener's only job is to produce a client stream and, when it knows
//! one, a `Target`; after that there is one pipeline (`intercept::serve`): read the ClientHello,
//! decide, then tunnel or intercept and relay HTTP.

pub mod bypass;
pub mod connect;
pub mod decryption;
pub mod drain;
pub mod fairness;
pub mod http;
pub mod idle;
pub mod inbound;
pub mod intercept;
pub mod ocsp;
pub mod parent;
pub mod proxy_protocol;
pub mod respond;
pub mod revocation;
pub mod scan;
pub mod tls;
pub mod transparent;
pub mod tunnel;
pub mod upstream;
pub mod verdict;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::config::{Config, ListenerConfig, ListenerMode, Resolve};
use crate::net::ATTEMPT_DELAY;
use crate::pki::cache::LeafCache;
use crate::pki::mint::{Ca, MintError};
use crate::policy::Policy;
use crate::telemetry::{ConnectionGuard, Refused, refused};
use tls::{HelloError, ServerTls, UpstreamTls};

pub use crate::body::{Body, BoxError, boxed};

/// Which side of a connection an error came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Client,
    Upstream,
    Hsm,
    Internal,
}

/// Errors of the data plane, each tagged with its side.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(transparent)]
    Hello(#[from] HelloError),
    #[error("ClientHello has no SNI and the listener needs it to find the destination")]
    NoSni,
    #[error("no inbound host is served for SNI {0:?}")]
    NoSite(String),
    #[error("{host} is blocked by the decryption rule {rule:?}")]
    Blocked { host: String, rule: String },
    #[error("SNI {sni:?} does not match the requested host {host:?}")]
    NameMismatch { sni: String, host: String },
    #[error("destination {0} is not allowed (tollgate's own listener)")]
    Forbidden(SocketAddr),
    #[error("destination {target} ({addr}) is not allowed: {net} is in [policy] deny_destinations")]
    Denied { target: String, addr: SocketAddr, net: ipnet::IpNet },
    #[error("{phase} timed out after {secs} s")]
    Timeout { phase: &'static str, secs: u64, side: Side },
    #[error("connecting to {target}: {source}")]
    Connect {
        target: String,
        #[source]
        source: io::Error,
    },
    #[error("the parent proxy {parent} refused {target}: {}", parent_answer(*status, reason))]
    ParentRefused { parent: String, target: String, status: u16, reason: String },
    #[error("TLS to upstream {target}: {source}")]
    UpstreamTls {
        target: String,
        #[source]
        source: io::Error,
    },
    #[error("upstream {target} certificate rejected by policy: {reason}")]
    UpstreamUntrusted { target: String, reason: String },
    #[error("upstream {target} cannot be intercepted: {reason}")]
    Unsupported { target: String, reason: String },
    #[error("minting a leaf for {host}: {source}")]
    Mint {
        host: String,
        #[source]
        source: Arc<MintError>,
    },
    #[error("client {client} may cause no new certificate for {host} now (per_client_mints_per_sec)")]
    MintLimited { host: String, client: std::net::IpAddr },
    #[error("TLS handshake with the client: {0}")]
    ClientTls(#[source] io::Error),
    #[error("HTTP to upstream {target}: {reason}")]
    UpstreamHttp { target: String, reason: String },
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl ProxyError {
    /// The stage of a session an upstream checkout failed in (the decryption log).
    pub fn stage(&self) -> decryption::Stage {
        match self {
            Self::UpstreamTls { .. } | Self::UpstreamHttp { .. } | Self::Unsupported { .. } => {
                decryption::Stage::UpstreamHandshake
            }
            Self::Timeout { phase, .. } if phase.contains("TLS") => decryption::Stage::UpstreamHandshake,
            _ => decryption::Stage::UpstreamConnect,
        }
    }

    /// Who failed.
    pub fn side(&self) -> Side {
        match self {
            Self::Hello(_)
            | Self::NoSni
            | Self::NoSite(_)
            | Self::Blocked { .. }
            | Self::NameMismatch { .. }
            | Self::Forbidden(_)
            | Self::Denied { .. }
            | Self::MintLimited { .. }
            | Self::ClientTls(_) => Side::Client,
            Self::Timeout { side, .. } => *side,
            Self::Connect { .. }
            | Self::UpstreamTls { .. }
            | Self::UpstreamUntrusted { .. }
            | Self::Unsupported { .. }
            | Self::ParentRefused { .. }
            | Self::UpstreamHttp { .. } => Side::Upstream,
            Self::Mint { source, .. } => match **source {
                MintError::Key(_) | MintError::Sign(_) | MintError::Timeout(_) => Side::Hsm,
                _ => Side::Internal,
            },
            Self::Io(_) => Side::Internal,
        }
    }
}

/// What a parent's refusal says, with a hint where one helps.
fn parent_answer(status: u16, reason: &str) -> String {
    match status {
        0 => reason.to_string(),
        407 => format!("{status} {reason} (check [upstream] parent_auth_file)"),
        _ => format!("{status} {reason}"),
    }
}

/// Where a connection goes.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Target {
    /// Lower-case host name or IP literal (no brackets): the name validated and minted for.
    pub host: String,
    pub port: u16,
    /// The address to connect to, when the client already chose it (transparent mode: the
    /// original destination); otherwise `[resolve]` or DNS decides.
    pub addr: Option<SocketAddr>,
}

impl Target {
    /// Parses `host:port` / `[v6]:port` (CONNECT authority); `default_port` when none. The
    /// host must be a DNS name or an IP literal (IPv6 bracketed) and the port a number 1–65535:
    /// `http`'s authority parser alone lets through hosts such as `1[:1` (found by fuzzing).
    pub fn parse(authority: &str, default_port: u16) -> Option<Self> {
        let authority: ::http::uri::Authority = authority.parse().ok()?;
        if authority.as_str().contains('@') {
            return None;
        }
        let raw = authority.host();
        let host = match raw.strip_prefix('[') {
            Some(v6) => {
                let v6 = v6.strip_suffix(']')?;
                v6.parse::<std::net::Ipv6Addr>().ok()?;
                v6
            }
            None => {
                if raw.contains([':', '[', ']']) {
                    return None;
                }
                rustls::pki_types::ServerName::try_from(raw).ok()?;
                raw
            }
        };
        // `port()` is `None` for a port that does not parse: read what follows the host.
        let port = match authority.as_str()[raw.len()..].strip_prefix(':') {
            Some(port) => port.parse::<u16>().ok().filter(|p| *p != 0)?,
            None if authority.as_str().len() == raw.len() => default_port,
            None => return None,
        };
        Some(Self { host: host.to_ascii_lowercase(), port, addr: None })
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// The CAs that sign minted leaves.
#[derive(Default)]
pub struct Cas {
    pub trust: Option<Arc<Ca>>,
    pub untrust: Option<Arc<Ca>>,
}

/// Everything the data plane shares across connections.
pub struct Proxy {
    pub policy: Policy,
    pub cas: Cas,
    pub cache: LeafCache,
    pub upstream_tls: UpstreamTls,
    /// Upstream certificates' revocation (CRLs), with its cache.
    pub revocation: revocation::Revocation,
    pub server_tls: ServerTls,
    pub upstreams: upstream::Upstreams,
    pub inbound: inbound::InboundSites,
    resolve: Resolve,
    /// Names resolved recently.
    resolver: crate::net::Resolver,
    /// Our own sockets: never a destination (no loops, no reaching management via the proxy).
    own: Vec<SocketAddr>,
    /// The content scanner decrypted traffic is handed to (`[icap]`), if any.
    pub scanner: Option<Arc<scan::Scanner>>,
    /// The parent proxy upstream connections go through, if any.
    pub parent: Option<Arc<parent::Parent>>,
    /// Client certificates tollgate presents to upstreams asking for one
    /// (`[[upstream.client_cert]]`); set once the store is read.
    pub client_certs: upstream::ClientCerts,
    /// Networks clients may not reach (`[policy] deny_destinations`).
    deny: Vec<ipnet::IpNet>,
    limit: Arc<Semaphore>,
    pub handshake_timeout: Duration,
    pub connect_timeout: Duration,
    /// An upstream silent this long while we wait on it fails (`proxy::idle`).
    pub read_timeout: Duration,
    /// A client accepting none of our bytes this long is cut (`proxy::idle`).
    pub send_timeout: Duration,
    pub mint_timeout: Duration,
    /// `[mint] share_leaves`: whether a leaf mirroring its upstream's names is cached for all
    /// the hosts they cover.
    pub share_leaves: bool,
    /// `[log] decryption`: a line per client TLS session.
    pub log_decryption: bool,
    /// A passthrough tunnel silent both ways this long is closed.
    pub tunnel_idle_timeout: Duration,
    header_timeout: Duration,
    max_header_bytes: usize,
    /// Becomes true on SIGTERM: connections finish their requests and close.
    shutdown: tokio::sync::watch::Receiver<bool>,
    /// Hosts learned to be pinned by their clients; shared across reloads.
    pub bypass: Arc<bypass::Bypass>,
    /// Per-client connection and mint limits.
    pub fairness: Arc<fairness::Fairness>,
    /// Whether a forward listener (explicit, sni, transparent) is configured: it mints with the
    /// forward-trust CA.
    forward: bool,
}

impl Proxy {
    /// Builds the shared state from the configuration, the loaded CAs and the inbound sites.
    pub fn new(
        config: &Config,
        cas: Cas,
        inbound: inbound::InboundSites,
        policy: Policy,
    ) -> Result<Self, crate::config::ConfigError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let server_tls = ServerTls::new(&provider).map_err(|e| crate::config::ConfigError::Invalid {
            path: config.path.clone(),
            field: "tls".into(),
            reason: e.to_string(),
        })?;
        let upstream_tls = UpstreamTls::new(&config.upstream, &config.path, &provider)?;
        let mut own: Vec<SocketAddr> = config.listeners.iter().map(|l| l.listen).collect();
        own.push(config.management.listen);
        let parent = parent::Parent::from_config(&config.upstream, &config.path)?.map(Arc::new);
        Ok(Self {
            policy,
            cas,
            cache: LeafCache::new(config.mint.cache_capacity),
            revocation: revocation::Revocation::new(&config.upstream, upstream_tls.roots(), &provider, parent.clone()),
            upstream_tls,
            server_tls,
            inbound,
            upstreams: upstream::Upstreams::new(
                config.limits.upstream_pool_max,
                Duration::from_secs(config.limits.upstream_idle_timeout_secs),
            ),
            resolve: config.resolve.clone(),
            resolver: crate::net::Resolver::new(),
            own,
            parent,
            client_certs: Default::default(),
            scanner: scan::Scanner::from_config(&config.icap).map(Arc::new),
            deny: config.policy.deny_destinations.clone(),
            limit: Arc::new(Semaphore::new(config.limits.max_connections)),
            handshake_timeout: Duration::from_secs(config.limits.handshake_timeout_secs),
            connect_timeout: Duration::from_secs(config.limits.connect_timeout_secs),
            read_timeout: Duration::from_secs(config.limits.upstream_read_timeout_secs),
            send_timeout: Duration::from_secs(config.limits.client_send_timeout_secs),
            mint_timeout: Duration::from_secs(config.limits.mint_timeout_secs),
            share_leaves: config.mint.share_leaves,
            log_decryption: config.log.decryption,
            tunnel_idle_timeout: Duration::from_secs(config.limits.tunnel_idle_timeout_secs),
            header_timeout: Duration::from_secs(config.limits.header_timeout_secs),
            max_header_bytes: config.limits.max_header_bytes,
            shutdown: tokio::sync::watch::channel(false).1,
            bypass: Arc::new(bypass::Bypass::from_config(config)),
            fairness: fairness::Fairness::new(&config.limits),
            forward: config.listeners.iter().any(|l| l.mode.is_forward()),
        })
    }

    /// Whether the forward listeners can mint: the forward-trust CA is loaded, or there are none.
    pub fn forward_ca_ready(&self) -> bool {
        !self.forward || self.cas.trust.is_some()
    }

    /// Shares the process's exclusion cache (it outlives reloads). Hosts it learned as asking
    /// for a client certificate that an `[[upstream.client_cert]]` of this state now names are
    /// forgotten: their next connection presents the certificate instead of being tunnelled.
    pub fn set_bypass(&mut self, bypass: Arc<bypass::Bypass>) {
        // Only a state with client certificates can take a learned tunnel back (a reload
        // otherwise walks no bypass entries).
        let forgotten = match self.client_certs.is_empty() {
            true => Vec::new(),
            false => {
                bypass.forget_unsupported(upstream::ASKS_CLIENT_CERT, |host| self.client_certs.find(host).is_some())
            }
        };
        if !forgotten.is_empty() {
            tracing::info!(hosts = ?forgotten, "learned bypass: hosts now given a client certificate are intercepted again");
        }
        self.bypass = bypass;
    }

    /// Connections watch `shutdown` to drain when it turns true.
    pub fn set_shutdown(&mut self, shutdown: tokio::sync::watch::Receiver<bool>) {
        self.shutdown = shutdown;
    }

    /// Resolves when the process is shutting down (never, if nobody will say so).
    pub async fn shutting_down(&self) {
        let mut shutdown = self.shutdown.clone();
        loop {
            if *shutdown.borrow_and_update() {
                return;
            }
            if shutdown.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// The HTTP/1.1 server settings every client-facing connection uses.
    pub fn http1_server(&self) -> hyper::server::conn::http1::Builder {
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(self.header_timeout)
            .max_buf_size(self.max_header_bytes);
        builder
    }

    /// The HTTP/2 server settings every client-facing connection uses.
    pub fn http2_server(&self) -> hyper::server::conn::http2::Builder<hyper_util::rt::TokioExecutor> {
        let mut builder = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
        builder
            .timer(hyper_util::rt::TokioTimer::new())
            .max_header_list_size(u32::try_from(self.max_header_bytes).unwrap_or(u32::MAX))
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .keep_alive_timeout(Duration::from_secs(20));
        builder
    }

    /// Records the address a listener actually bound (port 0 in tests).
    pub fn add_own(&mut self, addr: SocketAddr) {
        self.own.push(addr);
    }

    /// Opens a TCP connection to a destination a client asked for, honouring `[resolve]` and
    /// never dialling our own sockets or `[policy] deny_destinations` (checked on every resolved
    /// address: a name that resolves only into denied networks is refused; `[resolve]` overrides
    /// are exempt).
    /// Through the parent proxy unless `no_parent` lists the target (then only address
    /// literals and original destinations are checked: the parent resolves names).
    pub async fn dial(&self, target: &Target) -> Result<TcpStream, ProxyError> {
        match self.parent_for(target) {
            Some(parent) => {
                self.check_literal(target)?;
                if let Some(refused) = target.addr.and_then(|addr| self.refused(target, addr, true)) {
                    return Err(refused);
                }
                let stream = parent.tunnel(self, target).await?;
                let _ = stream.set_nodelay(true);
                Ok(stream)
            }
            None => self.dial_checked(target, true).await,
        }
    }

    /// The parent proxy a connection to `target` goes through, if any.
    pub fn parent_for(&self, target: &Target) -> Option<&parent::Parent> {
        self.parent.as_deref().filter(|parent| parent.routes(target))
    }

    /// Opens a TCP connection to an origin the operator configured (`[[inbound]]`): only our
    /// own sockets are refused.
    pub async fn dial_origin(&self, target: &Target) -> Result<TcpStream, ProxyError> {
        self.dial_checked(target, false).await
    }

    /// Resolves (unless the address is known), drops the addresses that may not be dialled
    /// (each one checked), and races connections over the rest (Happy Eyeballs) within the
    /// connect timeout.
    async fn dial_checked(&self, target: &Target, client_chosen: bool) -> Result<TcpStream, ProxyError> {
        let connect_err = |source| ProxyError::Connect { target: target.to_string(), source };
        let overridden = self.resolve_override(target);
        let resolved = match target.addr.or(overridden) {
            Some(addr) => std::sync::Arc::from([addr]),
            None => self.resolver.lookup(&target.host, target.port).await.map_err(connect_err)?,
        };
        let policy = client_chosen && overridden.is_none();
        let mut refused = None;
        let allowed: Vec<SocketAddr> = resolved
            .iter()
            .copied()
            .filter(|addr| match self.refused(target, *addr, policy) {
                Some(why) => {
                    refused.get_or_insert(why);
                    false
                }
                None => true,
            })
            .collect();
        if let (true, Some(refused)) = (allowed.is_empty(), refused) {
            return Err(refused);
        }
        let secs = self.connect_timeout.as_secs();
        let stream = tokio::time::timeout(self.connect_timeout, crate::net::happy_eyeballs(&allowed, ATTEMPT_DELAY))
            .await
            .map_err(|_| ProxyError::Timeout { phase: "upstream connect", secs, side: Side::Upstream })?
            .map_err(connect_err)?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    /// Refuses, before CONNECT is answered, a destination given as an address that `dial`
    /// would refuse; names are checked once resolved, in `dial`.
    pub fn check_literal(&self, target: &Target) -> Result<(), ProxyError> {
        let Ok(ip) = target.host.parse::<std::net::IpAddr>() else { return Ok(()) };
        let policy = self.resolve_override(target).is_none();
        match self.refused(target, SocketAddr::new(ip, target.port), policy) {
            Some(refused) => Err(refused),
            None => Ok(()),
        }
    }

    fn refused(&self, target: &Target, addr: SocketAddr, policy: bool) -> Option<ProxyError> {
        if self.is_own(addr) {
            return Some(ProxyError::Forbidden(addr));
        }
        let net = self.deny.iter().find(|net| policy && net.contains(&addr.ip().to_canonical()))?;
        Some(ProxyError::Denied { target: target.to_string(), addr, net: *net })
    }

    /// The `[resolve]` override for a target: exact host first, then `*.parent`.
    fn resolve_override(&self, target: &Target) -> Option<SocketAddr> {
        self.resolve.get(&target.host, target.port)
    }

    fn is_own(&self, addr: SocketAddr) -> bool {
        self.own.iter().any(|own| {
            own.port() == addr.port()
                && (own.ip() == addr.ip()
                    || (own.ip().is_unspecified() && (addr.ip().is_loopback() || addr.ip().is_unspecified())))
        })
    }
}

/// Accepts connections on one listener until the task is aborted. Each connection uses the
/// proxy state current when it was accepted, for as long as it lives (a reload never drops it).
pub async fn serve_listener(
    proxies: tokio::sync::watch::Receiver<Arc<Proxy>>,
    listener: std::net::TcpListener,
    config: ListenerConfig,
) {
    let name: Arc<str> = config.name().into();
    let listener = match TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(e) => {
            tracing::error!(mode = config.mode.as_str(), error = %e, "listener could not be registered");
            return;
        }
    };
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let proxy = proxies.borrow().clone();
        let Ok(permit) = proxy.limit.clone().try_acquire_owned() else {
            refused(Refused::MaxConnections).inc();
            tracing::warn!(client = %peer, "connection refused: max_connections reached");
            continue;
        };
        let (name, config) = (name.clone(), config.clone());
        tokio::spawn(async move {
            let Some((stream, ctx)) = admit(&proxy, stream, peer, &config, name, permit).await else { return };
            let stream = idle::Deadlines::new(stream).write_deadline(proxy.send_timeout);
            match config.mode {
                ListenerMode::Explicit => connect::serve(proxy, stream, ctx, config.auth.is_some()).await,
                ListenerMode::Sni => intercept::serve(proxy, stream, None, ctx).await,
                ListenerMode::Inbound => inbound::serve(proxy, stream, ctx).await,
                ListenerMode::Transparent => {
                    if let Some(target) = transparent::target(&stream, &ctx, config.tproxy) {
                        intercept::serve(proxy, stream, Some(target), ctx).await
                    }
                }
            }
        });
    }
}

/// Admits a connection from `peer`: its PROXY header taken off (on a listener that requires
/// one), then its place among the client's connections. `None`, logged, when it is refused.
async fn admit(
    proxy: &Proxy,
    mut stream: TcpStream,
    peer: SocketAddr,
    config: &ListenerConfig,
    listener: Arc<str>,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> Option<(TcpStream, ConnCtx)> {
    let _ = stream.set_nodelay(true);
    let carried = match config.proxy_protocol {
        false => None,
        true => {
            let header = proxy_protocol::accept(&mut stream, peer, &config.trusted_proxies, proxy.handshake_timeout);
            match header.await {
                Ok(carried) => carried,
                Err(e) => {
                    refused(Refused::ProxyProtocol).inc();
                    tracing::info!(peer = %peer, listener = %listener, error = %e, "connection refused");
                    return None;
                }
            }
        }
    };
    let client = carried.map_or(peer, |c| c.client);
    let Some(slot) = proxy.fairness.admit(client.ip()) else {
        refused(Refused::PerClientConnections).inc();
        tracing::warn!(client = %client, listener = %listener, "connection refused: per_client_connections reached");
        return None;
    };
    let mut admission = Admission::new(listener, permit, slot);
    admission.destination = carried.map(|c| c.destination);
    let ticket = Arc::new(admission);
    let ctx = ConnCtx { client, mode: config.mode, upstream_port: config.upstream_port, ticket, user: None };
    Some((stream, ctx))
}

/// A client connection: its writes fail when the client accepts nothing for
/// `client_send_timeout_secs` (slow readers cannot pin a response for ever).
pub type Client = idle::Deadlines<TcpStream>;

/// A connection's relay (HTTP, or a passthrough tunnel), made by its handshake phase and run
/// after that phase's own future is gone.
pub type Relaying = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), ProxyError>> + Send>>;

/// Runs a TLS connection's two phases: `handshake`, boxed by the caller so that it is freed
/// before the relay it returns runs (a connection idling for hours then holds only what
/// relaying needs; passed unboxed, the phase would live on in this future), then that relay.
/// How the connection ended is logged: a client's fault at info, ours or the upstream's at warn.
pub async fn serve_phases<F>(handshake: std::pin::Pin<Box<F>>, ctx: ConnCtx)
where
    F: std::future::Future<Output = Result<Relaying, ProxyError>>,
{
    let result = match handshake.await {
        Ok(relay) => relay.await,
        Err(e) => Err(e),
    };
    let Err(e) = result else { return };
    let (mode, side) = (ctx.mode.as_str(), e.side());
    match side {
        Side::Client => tracing::info!(client = %ctx.client, mode, side = ?side, error = %e, "connection refused"),
        _ => tracing::warn!(client = %ctx.client, mode, side = ?side, error = %e, "connection failed"),
    }
}

/// Reads the ClientHello, within the handshake timeout.
async fn client_hello<IO>(
    proxy: &Proxy,
    io: &mut IO,
) -> Result<(rustls::server::Accepted, tls::ClientHelloInfo, Vec<u8>), ProxyError>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let secs = proxy.handshake_timeout.as_secs();
    tokio::time::timeout(proxy.handshake_timeout, tls::read_client_hello(io, proxy.handshake_timeout))
        .await
        .map_err(|_| ProxyError::Timeout { phase: "ClientHello", secs, side: Side::Client })?
        .map_err(ProxyError::from)
}

/// Per-connection facts for logs and decisions, and the connection's admission.
#[derive(Clone, Debug)]
pub struct ConnCtx {
    pub client: SocketAddr,
    pub mode: ListenerMode,
    /// `sni` mode: the port to connect upstream.
    pub upstream_port: u16,
    /// Held by everything serving the connection: the accept task and any task an upgrade
    /// hands the connection to.
    pub ticket: Ticket,
    /// The user who authenticated (proxy authentication), once known.
    pub user: Option<Arc<str>>,
}

impl ConnCtx {
    /// The listener's name (what decryption rules' `listeners` match).
    pub fn listener(&self) -> &Arc<str> {
        &self.ticket.listener
    }

    /// The destination the client connected to, as a PROXY protocol header gave it (what a
    /// transparent listener behind a load balancer intercepts for).
    pub fn carried_destination(&self) -> Option<SocketAddr> {
        self.ticket.destination
    }
}

/// A client connection's admission: its place under `max_connections` and in
/// `tollgate_connections_active`, for as long as anything serves it — the accept task, and the
/// tasks an upgrade hands the connection to (a CONNECT tunnel's pipeline, a WebSocket splice),
/// which outlive hyper's own connection task. The drain on SIGTERM waits for them too.
pub type Ticket = Arc<Admission>;

/// See `Ticket`.
#[derive(Debug)]
pub struct Admission {
    /// The listener the connection came through, by name.
    listener: Arc<str>,
    /// The destination a PROXY protocol header carried.
    destination: Option<SocketAddr>,
    _permit: tokio::sync::OwnedSemaphorePermit,
    _slot: fairness::Slot,
    _counted: ConnectionGuard,
}

impl Admission {
    /// A connection to `listener` admitted under `permit` and in the client's `slot`, counted
    /// from now.
    pub fn new(listener: Arc<str>, permit: tokio::sync::OwnedSemaphorePermit, slot: fairness::Slot) -> Self {
        Self { listener, destination: None, _permit: permit, _slot: slot, _counted: ConnectionGuard::new() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        assert_eq!(
            Target::parse("Example.COM:8443", 443),
            Some(Target { host: "example.com".into(), port: 8443, addr: None })
        );
        assert_eq!(Target::parse("[::1]:443", 443).unwrap().to_string(), "[::1]:443");
        assert_eq!(Target::parse("host", 443).unwrap().port, 443);
        assert_eq!(Target::parse("", 443), None);
        assert_eq!(Target::parse("10.0.0.1", 80).unwrap().port, 80);
        // Found by fuzzing: accepted by `http`'s authority parser, not hosts at all.
        for bad in
            ["1[:1]:C", "a[b]:1", "host:0", "host:99999", "host:x", "user@host:443", "[::1", "[not-v6]:1", "a b:1"]
        {
            assert_eq!(Target::parse(bad, 443), None, "{bad}");
        }
    }

    /// The size of the future an async fn of three arguments returns, without calling it.
    fn future3<A, B, C, F: std::future::Future>(_: fn(A, B, C) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// The same, for four arguments.
    fn future4<A, B, C, D, F: std::future::Future>(_: fn(A, B, C, D) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    #[test]
    fn a_connection_keeps_no_handshake_state_while_it_relays() {
        // The handshake phase (ClientHello buffer, rustls acceptor, upstream dial, client
        // handshake) and the relay each run in an allocation of their own. What a connection
        // holds for its whole life is its hyper connection and a few pointers, so the task of
        // every mode is small (each is under 800 bytes). When the phases were one future it was
        // 15.6 KiB (sni) or 8.7 KiB (inbound) before any buffer, and every task was sized for
        // the largest mode: 50 KiB of RSS per idle intercepted h2 connection in all, against
        // 33 KiB with the split.
        type Io = Client;
        let sni = future4(intercept::serve::<Io>);
        let inbound = future3(inbound::serve::<Io>);
        let explicit = future4(connect::serve);
        // Transparent connections run `intercept::serve` too, once their destination is known.
        for (mode, size) in [("sni and transparent", sni), ("inbound", inbound), ("explicit", explicit)] {
            assert!(size <= 1024, "{mode}: a connection's outer future is {size} bytes");
        }
    }
}
