//! SSL inbound inspection (D6): tollgate stands in front of our own servers and terminates TLS
//! with their certificates, whose private keys stay on the HSM — every full handshake's
//! signature is made by the HSM. Resumption (TLS 1.3 tickets with rotating keys, TLS 1.2
//! session IDs) keeps resumed handshakes off the HSM. After the handshake, the same HTTP relay
//! as forward interception carries requests to the origin.

use std::collections::HashMap;
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use rustls::server::{ResolvesServerCert, ServerSessionMemoryCache};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::StartHandshake;

use super::decryption::{Decision, Record, Stage, TlsFacts};
use super::http::Upstream;
use super::tls::{H2, HTTP11, SuiteOrder, certified_key, server_config};
use super::upstream::{Origin, Route, Upstreams};
use super::{ConnCtx, Proxy, ProxyError, Relaying, Side, Target};
use crate::config::{Config, ConfigError, InboundConfig};
use crate::hsm::WaitLimit;
use crate::pki::{CertStore, Keyring};

/// The protected servers, by SNI.
#[derive(Default)]
pub struct InboundSites {
    by_host: HashMap<String, Arc<InboundSite>>,
}

/// One protected server.
pub struct InboundSite {
    pub host: String,
    /// The origin behind it.
    pub origin: Arc<Origin>,
    /// Client-facing configs: tollgate's suite order, then the client's (see `SuiteOrder`).
    servers: [Arc<ServerConfig>; 2],
}

impl InboundSite {
    fn server(&self, order: SuiteOrder) -> Arc<ServerConfig> {
        self.servers[usize::from(order == SuiteOrder::Client)].clone()
    }
}

impl InboundSites {
    /// Builds a site per `[[inbound]]` whose certificate (from the store) has its key on the
    /// HSM. A site whose key cannot be used is left out with an error log; the others serve.
    pub fn new(
        config: &Config,
        store: &CertStore,
        keys: &Keyring<'_>,
        provider: &Arc<CryptoProvider>,
        waiting: &Arc<WaitLimit>,
    ) -> Result<Self, ConfigError> {
        let storage = ServerSessionMemoryCache::new(64 * 1024);
        let ticketer =
            rustls::crypto::aws_lc_rs::Ticketer::new().map_err(|e| invalid(config, "inbound", e.to_string()))?;
        let server_provider = super::tls::server_provider(provider);
        let mut by_host = HashMap::new();
        for (index, site) in config.inbound.iter().enumerate() {
            let origin_tls = match site.origin.tls {
                true => Some(origin_client(config, index, site, provider)?),
                false => None,
            };
            let Some(entry) =
                store.entries().iter().find(|e| e.inbound.iter().any(|h| h.eq_ignore_ascii_case(&site.host)))
            else {
                tracing::error!(host = %site.host, "inbound host has no certificate in the store (tollgate cert import --inbound HOST); not served");
                continue;
            };
            let certified = match certified_key(entry, keys, waiting) {
                Ok(certified) => certified,
                Err(reason) => {
                    tracing::error!(host = %site.host, certificate = %entry.name, error = %reason, "inbound certificate unusable; host not served");
                    continue;
                }
            };
            let certified: Arc<dyn ResolvesServerCert> = Arc::new(super::tls::Fixed(Arc::new(certified)));
            let server = |order| -> Result<Arc<ServerConfig>, ConfigError> {
                let mut server = server_config(&server_provider, certified.clone(), order)
                    .map_err(|e| invalid(config, "inbound", e.to_string()))?;
                server.alpn_protocols = vec![H2.to_vec(), HTTP11.to_vec()];
                server.session_storage = storage.clone();
                server.ticketer = ticketer.clone();
                Ok(Arc::new(server))
            };
            tracing::info!(host = %site.host, certificate = %entry.name, origin = %format!("{}:{}", site.origin.host, site.origin.port), "inbound host served");
            let origin = Origin { index, host: site.origin.host.clone(), port: site.origin.port, tls: origin_tls };
            let site = InboundSite {
                host: site.host.clone(),
                origin: Arc::new(origin),
                servers: [server(SuiteOrder::Server)?, server(SuiteOrder::Client)?],
            };
            by_host.insert(site.host.clone(), Arc::new(site));
        }
        Ok(Self { by_host })
    }

    /// The site serving `sni`.
    pub fn get(&self, sni: &str) -> Option<&Arc<InboundSite>> {
        self.by_host.get(sni)
    }
}

/// Serves one connection of an inbound listener.
pub async fn serve<IO>(proxy: Arc<Proxy>, io: IO, ctx: ConnCtx)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    super::serve_phases(Box::pin(handshake_phase(&proxy, io, ctx.clone())), ctx).await;
}

/// ClientHello, site, client handshake (the site's key signs); then the relay, not yet
/// started. The session's decryption log line says how the client's side went (the origin
/// is reached per request, over the site's own validated connection).
async fn handshake_phase<IO>(proxy: &Arc<Proxy>, io: IO, ctx: ConnCtx) -> Result<Relaying, ProxyError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut record = Record::default();
    let result = terminate(proxy, io, ctx.clone(), &mut record).await;
    if proxy.log_decryption {
        if let Err(e) = &result {
            record.error = Some(e.to_string());
        }
        record.emit(&ctx);
    }
    result
}

async fn terminate<IO>(
    proxy: &Arc<Proxy>,
    mut io: IO,
    ctx: ConnCtx,
    record: &mut Record,
) -> Result<Relaying, ProxyError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (accepted, hello, _) = super::client_hello(proxy, &mut io).await?;
    record.sni.clone_from(&hello.sni);
    record.stage = Stage::ClientHandshake;
    let site = hello.sni.as_deref().and_then(|sni| proxy.inbound.get(sni)).cloned();
    let Some(site) = site else {
        let host = hello.sni.clone().unwrap_or_default();
        return Err(super::respond::refuse_handshake(proxy, accepted, io, ProxyError::NoSite(host)).await);
    };
    let client = tokio::time::timeout(
        proxy.handshake_timeout,
        StartHandshake::from_parts(accepted, io).into_stream(site.server(hello.suite_order)),
    )
    .await
    .map_err(|_| ProxyError::Timeout {
        phase: "client TLS handshake",
        secs: proxy.handshake_timeout.as_secs(),
        side: Side::Client,
    })?
    .map_err(ProxyError::ClientTls)?;
    record.client = TlsFacts::of(client.get_ref().1);
    record.decision = Decision::Decrypt;
    let target = Target { host: site.host.clone(), port: 443, addr: None };
    let key = Upstreams::origin_key(&site.origin);
    let route = Route::Origin { origin: site.origin.clone(), offer: key.offer() };
    let lane = super::upstream::Upstreams::next_lane();
    let upstream =
        Upstream { key, route, lane, first: None, pin: None, label: "inbound".into(), rule: None, scan: true };
    Ok(super::http::relay(proxy.clone(), client, upstream, target, ctx))
}

/// TLS to an inbound origin: the pinned bundle when given, else webpki and system roots; one
/// config offering h2 and http/1.1, one http/1.1 only.
fn origin_client(
    config: &Config,
    index: usize,
    site: &InboundConfig,
    provider: &Arc<CryptoProvider>,
) -> Result<[Arc<rustls::ClientConfig>; 2], ConfigError> {
    let field = format!("inbound[{index}].ca_bundle");
    let mut roots = rustls::RootCertStore::empty();
    match &site.ca_bundle {
        Some(bundle) => {
            let certs = CertificateDer::pem_file_iter(bundle)
                .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
                .map_err(|e| invalid(config, &field, format!("{}: {e}", bundle.display())))?;
            for cert in certs {
                roots.add(cert).map_err(|e| invalid(config, &field, e.to_string()))?;
            }
        }
        None => roots = crate::net::roots(&[]).map_err(|(_, reason)| invalid(config, &field, reason))?,
    }
    let mut client = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(config, &field, e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut h1_only = client.clone();
    h1_only.alpn_protocols = vec![HTTP11.to_vec()];
    client.alpn_protocols = vec![H2.to_vec(), HTTP11.to_vec()];
    Ok([Arc::new(client), Arc::new(h1_only)])
}

fn invalid(config: &Config, field: &str, reason: String) -> ConfigError {
    ConfigError::Invalid { path: config.path.clone(), field: field.into(), reason }
}
