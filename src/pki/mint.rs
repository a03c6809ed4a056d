//! Minting: a leaf that mirrors the upstream certificate's names, with a fresh software key,
//! signed by a CA whose key is behind the key seam (the HSM for the forward-trust CA).
//!
//! Only names (DNS and IP SANs, subject CN) and a validity window are taken from the upstream
//! certificate. Nothing else is copied, so must-staple, SCTs, CRL and AIA pointers — which we
//! could not honour — never reach the client.

use std::net::IpAddr;
use std::sync::{Arc, OnceLock};

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyUsagePurpose, SanType,
    SerialNumber,
};
use rustls::pki_types::CertificateDer;
use rustls::server::ServerConfig;
use rustls::sign::CertifiedKey;
use time::OffsetDateTime;
use x509_parser::extensions::GeneralName;

use super::KeyHandle;
use crate::keys::rcgen::RcgenKey;
use crate::keys::rustls::RustlsKey;
use crate::keys::software::SoftwareKey;
use crate::keys::{KeyAlgorithm, KeyError, PrivateKey};
use crate::telemetry::METRICS;

/// Errors while minting.
#[derive(Debug, thiserror::Error)]
pub enum MintError {
    #[error("no {0} CA is configured")]
    NoCa(&'static str),
    #[error("upstream certificate cannot be parsed: {0}")]
    Upstream(String),
    #[error("CA signature failed: {0}")]
    Sign(String),
    #[error("leaf key: {0}")]
    Key(#[from] KeyError),
    #[error("minting did not finish within {0} s")]
    Timeout(u64),
    #[error("minting task failed: {0}")]
    Task(String),
    /// The caller that would have minted may cause no new certificate now (its per-client
    /// mint rate is spent); callers that joined its attempt may try again on their own.
    #[error("the client that would have minted may cause no new certificate now")]
    Limited,
}

/// A CA that signs minted leaves.
pub struct Ca {
    /// Name in the certificate store.
    pub name: String,
    cert: CertificateDer<'static>,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    issuer: Issuer<'static, RcgenKey>,
    /// The issuer's key: an HSM key's workers are where mints are handed over to.
    key: KeyHandle,
}

/// A minted leaf, ready to serve.
pub struct Minted {
    /// Leaf + CA chain with the leaf's software key.
    pub certified: Arc<CertifiedKey>,
    /// The leaf's notAfter; the cache never keeps it longer.
    pub not_after: OffsetDateTime,
    /// Which CA signed it.
    pub ca: String,
    /// How long the CA signature took (an HSM round trip for a key on the HSM).
    pub sign_ms: f64,
    /// Server configs built for this leaf, one per ALPN choice (none, http/1.1, h2) in
    /// tollgate's suite order, then the same three in the client's.
    pub(crate) configs: [OnceLock<Arc<ServerConfig>>; 6],
}

impl Ca {
    /// A CA from its certificate and a key whose public half must match it.
    pub fn new(name: &str, cert: CertificateDer<'static>, key: KeyHandle) -> Result<Self, MintError> {
        let (_, parsed) = x509_parser::parse_x509_certificate(&cert)
            .map_err(|e| MintError::Upstream(format!("CA certificate {name}: {e}")))?;
        let signer = RcgenKey::new(key.private_key())?;
        if parsed.public_key().raw != signer.key().public_key() {
            return Err(MintError::Sign(format!("CA certificate {name} does not match its key: public keys differ")));
        }
        let not_before = parsed.validity().not_before.to_datetime();
        let not_after = parsed.validity().not_after.to_datetime();
        let issuer = Issuer::from_ca_cert_der(&cert, signer).map_err(|e| MintError::Sign(e.to_string()))?;
        Ok(Self { name: name.into(), cert, not_before, not_after, issuer, key })
    }

    /// The CA certificate.
    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// `mint` off the async runtime. It is handed over to where the CA key signs (an HSM
    /// worker, where the signature needs no further hand-off), else run on the blocking pool.
    /// Handed-over work not back in time is stuck behind a hung member (which the HSM layer
    /// takes out): the mint is made again on the blocking pool, whose signature has its own
    /// deadline and fails over to another member, or fails with the HSM's reason.
    pub async fn mint_off_runtime(self: &Arc<Self>, host: &str, upstream: &[u8]) -> Result<Minted, MintError> {
        let mint = || {
            let (ca, host, upstream) = (self.clone(), host.to_string(), upstream.to_vec());
            move || ca.mint(&host, &upstream)
        };
        let fallback = || METRICS.mint_fallbacks_total.inc();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let first = mint();
        let work: crate::hsm::Work = Box::new(move || drop(tx.send(first())));
        let handed = match &self.key {
            KeyHandle::Hsm(key) => key.hand_over(work),
            KeyHandle::Software(_) => Err(work),
        };
        match handed {
            Ok(patience) => match tokio::time::timeout(patience, rx).await {
                Ok(Ok(minted)) => minted,
                Ok(Err(_)) => {
                    fallback();
                    tracing::warn!(host, "no HSM worker took the mint in time; minting on the blocking pool");
                    on_blocking_pool(mint()).await?
                }
                Err(_) => {
                    fallback();
                    tracing::warn!(host, "mint overdue on its HSM worker; minting again on the blocking pool");
                    on_blocking_pool(mint()).await?
                }
            },
            Err(work) => {
                // A software CA key signs wherever it runs; an HSM key's workers were full or
                // none of its servers is up (the mint then fails with the HSM's reason).
                if matches!(self.key, KeyHandle::Hsm(_)) {
                    fallback();
                }
                on_blocking_pool(work).await?;
                rx.await.map_err(|_| MintError::Task("the mint was dropped unrun".into()))?
            }
        }
    }

    /// Mints a leaf for `host` mirroring `upstream` (the upstream's end-entity certificate).
    /// Blocking: the CA signature may be an HSM round-trip.
    pub fn mint(&self, host: &str, upstream: &[u8]) -> Result<Minted, MintError> {
        let (_, up) = x509_parser::parse_x509_certificate(upstream).map_err(|e| MintError::Upstream(e.to_string()))?;

        let mut params = CertificateParams::default();
        params.subject_alt_names = mirrored_sans(&up, host)?;
        let mut dn = DistinguishedName::new();
        // The upstream's CN, else its first DNS name: the host only when it names none itself
        // (so a leaf with mirrored names is the same whatever host it was minted for).
        let cn = up.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok()).map(str::to_string);
        let first_dns = params.subject_alt_names.iter().find_map(|san| match san {
            SanType::DnsName(name) => Some(name.as_str().to_string()),
            _ => None,
        });
        dn.push(DnType::CommonName, cn.or(first_dns).unwrap_or_else(|| host.to_string()));
        params.distinguished_name = dn;

        // Inside both the CA's and the upstream's validity; an upstream window that does not
        // overlap the CA's (an expired upstream) yields an already-expired leaf, as it should.
        let up_nb = up.validity().not_before.to_datetime();
        let up_na = up.validity().not_after.to_datetime();
        params.not_before = up_nb.max(self.not_before);
        params.not_after = up_na.min(self.not_after).max(params.not_before);

        let mut serial: [u8; 16] = crate::keys::random();
        serial[0] &= 0x7f;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;

        // A fresh software key per leaf: never the CA key. Generated once and handed to rcgen
        // (public half) and rustls (signing) as is: a PKCS#8 round trip through rustls' key
        // loader costs two more point multiplications per mint (it tries RSA first, and each
        // parse re-derives and checks the public key).
        let leaf_key: Arc<dyn PrivateKey> = Arc::new(SoftwareKey::generate(KeyAlgorithm::EcdsaP256)?);
        let signing = std::time::Instant::now();
        let cert = params.signed_by(&RcgenKey::new(leaf_key.clone())?, &self.issuer).map_err(sign_error)?;
        let sign_ms = signing.elapsed().as_secs_f64() * 1000.0;
        let signing_key = Arc::new(RustlsKey::new(leaf_key));
        let chain = vec![cert.der().clone(), self.cert.clone()];
        Ok(Minted {
            certified: Arc::new(CertifiedKey::new(chain, signing_key)),
            not_after: params.not_after,
            ca: self.name.clone(),
            sign_ms,
            configs: Default::default(),
        })
    }
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").field("name", &self.name).finish_non_exhaustive()
    }
}

async fn on_blocking_pool<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Result<T, MintError> {
    tokio::task::spawn_blocking(work).await.map_err(|e| MintError::Task(e.to_string()))
}

/// The signature error, with the key's own reason when rcgen only says "remote key error".
fn sign_error(e: rcgen::Error) -> MintError {
    match (e, crate::keys::rcgen::take_last_error()) {
        (rcgen::Error::RemoteKeyError, Some(reason)) => MintError::Sign(reason),
        (e, _) => MintError::Sign(e.to_string()),
    }
}

/// DNS and IP SANs of the upstream, each as its own type; the host when there are none.
/// Whether a leaf minted for `upstream` (DER) mirrors its names — DNS names or IP addresses in
/// its subjectAltName — and so is the same leaf for every host it is minted for.
pub fn mirrors_names(upstream: &[u8]) -> bool {
    let Ok((_, up)) = x509_parser::parse_x509_certificate(upstream) else { return false };
    let Ok(Some(ext)) = up.subject_alternative_name() else { return false };
    ext.value.general_names.iter().any(|name| match name {
        GeneralName::DNSName(_) => true,
        GeneralName::IPAddress(bytes) => matches!(bytes.len(), 4 | 16),
        _ => false,
    })
}

fn mirrored_sans(up: &x509_parser::certificate::X509Certificate<'_>, host: &str) -> Result<Vec<SanType>, MintError> {
    let mut sans = Vec::new();
    if let Ok(Some(ext)) = up.subject_alternative_name() {
        for name in &ext.value.general_names {
            match name {
                GeneralName::DNSName(dns) => sans.push(dns_san(dns)?),
                GeneralName::IPAddress(bytes) => {
                    let ip = match bytes.len() {
                        4 => IpAddr::from(<[u8; 4]>::try_from(*bytes).expect("length checked")),
                        16 => IpAddr::from(<[u8; 16]>::try_from(*bytes).expect("length checked")),
                        _ => continue,
                    };
                    sans.push(SanType::IpAddress(ip));
                }
                _ => {}
            }
        }
    }
    if sans.is_empty() {
        sans.push(match host.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => dns_san(host)?,
        });
    }
    Ok(sans)
}

fn dns_san(name: &str) -> Result<SanType, MintError> {
    let ia5 = name.try_into().map_err(|_| MintError::Upstream(format!("DNS name {name:?} is not IA5")))?;
    Ok(SanType::DnsName(ia5))
}
