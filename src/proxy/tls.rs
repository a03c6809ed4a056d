//! TLS on both legs: reading the ClientHello before any decision, the upstream client configs
//! (an ALPN offer derived from the client's, certificates always validated) and the server
//! configs that present minted leaves.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::{Accepted, Acceptor, ClientHello, ResolvesServerCert, ServerSessionMemoryCache};
use rustls::sign::CertifiedKey;
use rustls::{CipherSuite, ClientConfig, DigitallySignedStruct, ServerConfig, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

use super::verdict::Verdict;
use crate::config::{ConfigError, UpstreamConfig};
use crate::hsm::WaitLimit;
use crate::keys::rustls::RustlsKey;
use crate::keys::sha256;
use crate::pki::mint::Minted;
use crate::pki::{CertEntry, KeyHandle, Keyring};
use crate::policy::trust::ChainStatus;

/// The largest ClientHello we wait for.
const MAX_CLIENT_HELLO: usize = 64 * 1024;

/// The ALPN protocols tollgate can relay.
pub const H2: &[u8] = b"h2";
pub const HTTP11: &[u8] = b"http/1.1";

/// What the ClientHello said, owned.
#[derive(Clone, Debug)]
pub struct ClientHelloInfo {
    /// Lower-cased SNI.
    pub sni: Option<String>,
    /// The client's ALPN offer, in its order.
    pub alpn: Vec<Vec<u8>>,
    /// Whose cipher-suite order the handshake follows.
    pub suite_order: SuiteOrder,
}

/// Whose cipher-suite order picks the suite on a client-facing handshake.
///
/// tollgate's order is AES-128-GCM, AES-256-GCM, ChaCha20-Poly1305: every one is an AEAD at or
/// above 128-bit security, and AES-128 with its SHA-256 key schedule is the cheapest for both
/// ends of a handshake on hardware with AES and SHA instructions (clients prefer AES-256 by
/// habit, not need). A client that lists ChaCha20-Poly1305 before any AES-GCM suite is saying
/// it lacks AES hardware, and gets its own order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SuiteOrder {
    Server,
    Client,
}

impl SuiteOrder {
    /// Decides from the client's offer: the first AEAD family it names wins.
    pub fn of(offered: &[CipherSuite]) -> Self {
        use CipherSuite::*;
        for suite in offered {
            match suite {
                TLS13_CHACHA20_POLY1305_SHA256
                | TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
                | TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256 => return Self::Client,
                TLS13_AES_128_GCM_SHA256
                | TLS13_AES_256_GCM_SHA384
                | TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
                | TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
                | TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
                | TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => return Self::Server,
                _ => {}
            }
        }
        Self::Server
    }
}

/// `provider` with tollgate's server-side suite order (see `SuiteOrder`): AES-128-GCM first,
/// the rest as the provider lists them.
pub fn server_provider(provider: &CryptoProvider) -> Arc<CryptoProvider> {
    use CipherSuite::*;
    let mut ordered = provider.clone();
    ordered.cipher_suites.sort_by_key(|s| {
        !matches!(
            s.suite(),
            TLS13_AES_128_GCM_SHA256 | TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 | TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
        )
    });
    Arc::new(ordered)
}

/// A client-facing server config presenting `certs`; `provider` comes from `server_provider`.
pub fn server_config(
    provider: &Arc<CryptoProvider>,
    certs: Arc<dyn ResolvesServerCert>,
    order: SuiteOrder,
) -> Result<ServerConfig, rustls::Error> {
    let mut config = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(certs);
    config.ignore_client_order = order == SuiteOrder::Server;
    Ok(config)
}

/// Why a ClientHello could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HelloError {
    #[error("client sent non-TLS bytes on a TLS port")]
    NotTls,
    #[error("client closed the connection before its ClientHello")]
    Closed,
    #[error("ClientHello larger than {MAX_CLIENT_HELLO} bytes")]
    TooLarge,
    #[error("malformed ClientHello: {0}")]
    Malformed(rustls::Error),
    #[error("reading ClientHello: {0}")]
    Io(#[from] io::Error),
}

impl ClientHelloInfo {
    fn new(hello: &ClientHello<'_>) -> Self {
        Self {
            sni: hello.server_name().map(|s| s.to_ascii_lowercase()),
            alpn: hello.alpn().map(|protos| protos.map(<[u8]>::to_vec).collect()).unwrap_or_default(),
            suite_order: SuiteOrder::of(hello.cipher_suites()),
        }
    }
}

/// Reads the ClientHello. Returns rustls' accepted state (which holds every byte read, for
/// the handshake) and a copy of those bytes (for a passthrough tunnel). A malformed one is
/// answered with the alert rustls chose, within `deadline`.
pub async fn read_client_hello<IO>(
    io: &mut IO,
    deadline: std::time::Duration,
) -> Result<(Accepted, ClientHelloInfo, Vec<u8>), HelloError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let mut acceptor = Acceptor::default();
    let mut seen = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let n = io.read(&mut chunk).await?;
        if n == 0 {
            return Err(HelloError::Closed);
        }
        if seen.is_empty() && chunk[0] != 0x16 {
            return Err(HelloError::NotTls);
        }
        seen.extend_from_slice(&chunk[..n]);
        if seen.len() > MAX_CLIENT_HELLO {
            return Err(HelloError::TooLarge);
        }
        let mut rd = &chunk[..n];
        while !rd.is_empty() {
            acceptor.read_tls(&mut rd)?;
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                let info = ClientHelloInfo::new(&accepted.client_hello());
                return Ok((accepted, info, seen));
            }
            Ok(None) => continue,
            Err((e, alert)) => {
                super::respond::send_alert(io, alert, deadline).await;
                return Err(HelloError::Malformed(e));
            }
        }
    }
}

/// What tollgate offers an upstream in ALPN.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Offer {
    /// Nothing: the client offered no HTTP protocol (it may not speak HTTP at all).
    None = 0,
    /// http/1.1 only: for what h2 cannot carry (upgrades, connection-bound authentication,
    /// an origin that answers HTTP_1_1_REQUIRED).
    Http11 = 1,
    /// h2 and http/1.1.
    H2 = 2,
}

impl Offer {
    /// The offer for a client's: h2 and http/1.1 whenever the client speaks HTTP. An HTTP/1.1
    /// client's requests then share one h2 connection per thread with every other client of
    /// that origin, where the origin speaks h2, so both ends read and write many requests at a
    /// time; HTTP/1.1 upstream would need a connection, and a read and a write on each end, per
    /// request in flight. An h2 client reaches an HTTP/1.1-only origin too (tollgate translates).
    pub fn for_client(client_alpn: &[Vec<u8>]) -> Self {
        if client_alpn.iter().any(|p| p == H2 || p == HTTP11) { Self::H2 } else { Self::None }
    }

    /// The same upstream with HTTP/1.1 only (no change when h2 was not offered).
    pub fn h1_only(self) -> Self {
        match self {
            Self::H2 => Self::Http11,
            other => other,
        }
    }
}

/// Upstream TLS: one client config per ALPN offer, sharing roots, verifier and the session
/// cache (so a new client connection resumes the upstream session instead of paying a full
/// upstream handshake).
pub struct UpstreamTls {
    configs: [Arc<ClientConfig>; 3],
    verifier: Arc<RecordingVerifier>,
    roots: Arc<rustls::RootCertStore>,
}

impl UpstreamTls {
    /// Builds the configs: webpki roots, the system roots and the configured bundles.
    pub fn new(
        config: &UpstreamConfig,
        config_path: &std::path::Path,
        provider: &Arc<CryptoProvider>,
    ) -> Result<Self, ConfigError> {
        let roots = crate::net::roots(&config.ca_bundles).map_err(|(i, reason)| ConfigError::Invalid {
            path: config_path.to_path_buf(),
            field: format!("upstream.ca_bundles[{i}]"),
            reason,
        })?;
        let roots = Arc::new(roots);
        let webpki =
            WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone()).build().map_err(|e| {
                ConfigError::Invalid {
                    path: config_path.to_path_buf(),
                    field: "upstream.ca_bundles".into(),
                    reason: e.to_string(),
                }
            })?;
        let verifier = Arc::new(RecordingVerifier {
            inner: webpki,
            recent: moka::sync::Cache::builder().max_capacity(4096).time_to_live(Duration::from_secs(10)).build(),
        });
        let resumption = rustls::client::Resumption::in_memory_sessions(4096);
        let build = |alpn: Vec<Vec<u8>>| {
            let mut c = ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .expect("the aws-lc-rs provider supports the default versions")
                .dangerous()
                .with_custom_certificate_verifier(verifier.clone())
                .with_no_client_auth();
            c.alpn_protocols = alpn;
            c.resumption = resumption.clone();
            Arc::new(c)
        };
        Ok(Self {
            configs: [build(vec![]), build(vec![HTTP11.to_vec()]), build(vec![H2.to_vec(), HTTP11.to_vec()])],
            verifier,
            roots,
        })
    }

    /// The roots upstream certificates are validated against.
    pub fn roots(&self) -> Arc<rustls::RootCertStore> {
        self.roots.clone()
    }

    /// The client config for an offer class (`Offer`).
    pub fn config_for(&self, offer: Offer) -> Arc<ClientConfig> {
        self.configs[offer as usize].clone()
    }

    /// The verdict for a completed upstream handshake, and the OCSP response the upstream
    /// stapled. After a full handshake the verdict is what the verifier just found for that
    /// name and certificate; a resumed session (the verifier did not run, nothing stapled)
    /// carries its chain, and the verdict is recomputed from it, never assumed.
    pub fn handshake_verdict(&self, name: &ServerName<'static>, chain: &[CertificateDer<'_>], resumed: bool) -> Seen {
        if !resumed
            && let Some(end_entity) = chain.first()
            && let Some(seen) = self.verifier.recent.get(&(name.clone(), sha256(end_entity)))
        {
            return seen;
        }
        (self.verdict(name, chain), None)
    }

    /// The verdict for a chain presented for `name`, computed now.
    pub fn verdict(&self, name: &ServerName<'_>, chain: &[CertificateDer<'_>]) -> Verdict {
        let Some((end_entity, intermediates)) = chain.split_first() else {
            return Verdict::failed(ChainStatus::UntrustedIssuer, "upstream sent no certificate");
        };
        let result = self.verifier.inner.verify_server_cert(end_entity, intermediates, name, &[], UnixTime::now());
        judge(end_entity, result.map(drop))
    }
}

/// What the verifier saw of a handshake: its verdict and the OCSP response stapled.
type Seen = (Verdict, Option<Arc<[u8]>>);

/// Validates upstream certificates with webpki. A failed validation lets the handshake finish
/// (the handshake signature is still checked): the verdict, recorded here, then decides by
/// `[upstream.on_error]` between a forward-untrust leaf and a refusal, and the decryption log
/// can say what the certificate was.
struct RecordingVerifier {
    inner: Arc<WebPkiServerVerifier>,
    /// Verdicts of the last seconds by (name, certificate hash), read right after the handshake.
    recent: moka::sync::Cache<(ServerName<'static>, [u8; 32]), Seen>,
}

impl std::fmt::Debug for RecordingVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordingVerifier").finish_non_exhaustive()
    }
}

impl ServerCertVerifier for RecordingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let result = self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now);
        let verdict = judge(end_entity, result.as_ref().map(drop).map_err(Clone::clone));
        let staple = (!ocsp_response.is_empty()).then(|| Arc::from(ocsp_response));
        self.recent.insert((server_name.to_owned(), sha256(end_entity)), (verdict, staple));
        match result {
            Ok(verified) => Ok(verified),
            Err(rustls::Error::InvalidCertificate(_)) => Ok(ServerCertVerified::assertion()),
            Err(e) => Err(e),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The verdict on a chain webpki has checked: its failure, or, for a chain it accepted, a
/// key below policy.
fn judge(end_entity: &[u8], result: Result<(), rustls::Error>) -> Verdict {
    match result {
        Ok(()) => match super::verdict::weak_key(end_entity) {
            Some(weak) => Verdict::failed(ChainStatus::Weak, weak),
            None => Verdict::TRUSTED,
        },
        Err(e) => Verdict::of(&Err(e)),
    }
}

/// The protocol to present to the client: the upstream's choice when the client offered it
/// (mirroring), else h2 or else http/1.1 when the client offered it (tollgate translates),
/// else none.
pub fn client_alpn<'a>(client_offer: &[Vec<u8>], upstream_choice: Option<&'a [u8]>) -> Option<&'a [u8]> {
    match upstream_choice {
        Some(choice) if client_offer.iter().any(|p| p == choice) => Some(choice),
        Some(_) if client_offer.iter().any(|p| p == H2) => Some(H2),
        Some(_) if client_offer.iter().any(|p| p == HTTP11) => Some(HTTP11),
        _ => None,
    }
}

/// Server configs that present minted leaves. Trusted and untrusted leaves use separate
/// session caches and ticket keys, so a session resumed from a trusted leaf can never skip
/// showing the client an untrust leaf.
pub struct ServerTls {
    provider: Arc<CryptoProvider>,
    trusted: SessionState,
    untrusted: SessionState,
    refuse: Arc<ServerConfig>,
}

struct SessionState {
    storage: Arc<dyn rustls::server::StoresServerSessions>,
    ticketer: Arc<dyn rustls::server::ProducesTickets>,
}

impl ServerTls {
    /// Fresh session caches and ticket keys.
    pub fn new(provider: &CryptoProvider) -> Result<Self, rustls::Error> {
        let provider = server_provider(provider);
        let state = || -> Result<SessionState, rustls::Error> {
            Ok(SessionState {
                storage: ServerSessionMemoryCache::new(16 * 1024),
                ticketer: rustls::crypto::aws_lc_rs::Ticketer::new()?,
            })
        };
        let refuse = Arc::new(server_config(&provider, Arc::new(Refuse), SuiteOrder::Server)?);
        Ok(Self { trusted: state()?, untrusted: state()?, refuse, provider })
    }

    /// The config presenting `minted` with the ALPN the upstream chose (built once per leaf,
    /// protocol and suite order).
    pub fn config(&self, minted: &Minted, trusted: bool, alpn: Option<&[u8]>, order: SuiteOrder) -> Arc<ServerConfig> {
        let index = match alpn {
            Some(p) if p == H2 => 2,
            Some(p) if p == HTTP11 => 1,
            _ => 0,
        } + if order == SuiteOrder::Client { 3 } else { 0 };
        minted.configs[index]
            .get_or_init(|| {
                let mut config = server_config(&self.provider, Arc::new(Fixed(minted.certified.clone())), order)
                    .expect("the aws-lc-rs provider supports the default versions");
                config.alpn_protocols = alpn.map(|p| vec![p.to_vec()]).unwrap_or_default();
                let state = if trusted { &self.trusted } else { &self.untrusted };
                config.session_storage = state.storage.clone();
                config.ticketer = state.ticketer.clone();
                Arc::new(config)
            })
            .clone()
    }

    /// A config that fails every handshake with an `access_denied` alert: how a refused
    /// connection is told so.
    pub fn refuse(&self) -> Arc<ServerConfig> {
        self.refuse.clone()
    }
}

/// Always presents one certified key.
#[derive(Debug)]
pub(crate) struct Fixed(pub(crate) Arc<CertifiedKey>);

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

#[derive(Debug)]
struct Refuse;

impl ResolvesServerCert for Refuse {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        None
    }
}

/// The chain and its signing key (on the HSM, or a software key from the vault), checked
/// against each other.
pub fn certified_key(entry: &CertEntry, keys: &Keyring<'_>, waiting: &Arc<WaitLimit>) -> Result<CertifiedKey, String> {
    // Every full handshake signs on the HSM: at most `hsm_handshakes_max` wait at once.
    let key: Arc<dyn crate::keys::PrivateKey> = match keys.key(entry).map_err(|e| e.to_string())? {
        KeyHandle::Hsm(key) => key.with_limit(waiting.clone()),
        KeyHandle::Software(key) => key,
    };
    let chain = CertificateDer::pem_slice_iter(entry.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("certificate PEM: {e}"))?;
    let signing = Arc::new(RustlsKey::new(key));
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|e| format!("certificate and key do not match: {e}"))?;
    Ok(certified)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_clients_are_offered_h2_upstream_and_others_nothing() {
        let offer = |protos: &[&[u8]]| Offer::for_client(&protos.iter().map(|p| p.to_vec()).collect::<Vec<_>>());
        assert_eq!(offer(&[HTTP11]), Offer::H2);
        assert_eq!(offer(&[H2]), Offer::H2);
        assert_eq!(offer(&[b"imap"]), Offer::None);
        assert_eq!(offer(&[]), Offer::None);
        assert_eq!(Offer::H2.h1_only(), Offer::Http11);
        assert_eq!(Offer::None.h1_only(), Offer::None);
    }

    #[test]
    fn client_alpn_mirrors_or_translates() {
        let both = vec![H2.to_vec(), HTTP11.to_vec()];
        let h2_only = vec![H2.to_vec()];
        let h1_only = vec![HTTP11.to_vec()];
        assert_eq!(client_alpn(&both, Some(HTTP11)), Some(HTTP11));
        assert_eq!(client_alpn(&both, Some(H2)), Some(H2));
        assert_eq!(client_alpn(&h2_only, Some(HTTP11)), Some(H2));
        assert_eq!(client_alpn(&h1_only, Some(HTTP11)), Some(HTTP11));
        assert_eq!(client_alpn(&h1_only, Some(H2)), Some(HTTP11), "an HTTP/1.1 client over an h2 upstream");
        assert_eq!(client_alpn(&both, None), None);
    }

    #[test]
    fn the_first_aead_family_a_client_names_decides_whose_order_wins() {
        use CipherSuite::*;
        let of = SuiteOrder::of;
        assert_eq!(of(&[TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256]), SuiteOrder::Server);
        assert_eq!(of(&[TLS13_CHACHA20_POLY1305_SHA256, TLS13_AES_128_GCM_SHA256]), SuiteOrder::Client);
        // Signalling values and suites tollgate does not offer do not count.
        let scsv = TLS_EMPTY_RENEGOTIATION_INFO_SCSV;
        assert_eq!(
            of(&[scsv, TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256, TLS13_AES_128_GCM_SHA256]),
            SuiteOrder::Client
        );
        assert_eq!(of(&[scsv]), SuiteOrder::Server);
    }

    #[test]
    fn the_server_order_puts_aes128_first_and_keeps_the_rest() {
        let base = rustls::crypto::aws_lc_rs::default_provider();
        let ordered: Vec<_> = server_provider(&base).cipher_suites.iter().map(|s| s.suite()).collect();
        assert_eq!(ordered[0], CipherSuite::TLS13_AES_128_GCM_SHA256);
        let tls13: Vec<_> = ordered.iter().filter(|s| format!("{s:?}").starts_with("TLS13_")).copied().collect();
        assert_eq!(
            tls13,
            [
                CipherSuite::TLS13_AES_128_GCM_SHA256,
                CipherSuite::TLS13_AES_256_GCM_SHA384,
                CipherSuite::TLS13_CHACHA20_POLY1305_SHA256
            ]
        );
        let mut same = ordered.clone();
        let mut all: Vec<_> = base.cipher_suites.iter().map(|s| s.suite()).collect();
        same.sort_by_key(|s| u16::from(*s));
        all.sort_by_key(|s| u16::from(*s));
        assert_eq!(same, all, "only the order changes");
    }
}
