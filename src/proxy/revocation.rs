//! Revocation of upstream certificates (`[upstream] revocation = "crl"`). Interception takes
//! the client's own revocation check away, so tollgate does it: the end entity's CRL
//! distribution points (http://) are fetched within `revocation_timeout_ms` and at most
//! `revocation_max_crl_bytes`, kept until their nextUpdate (at most a day), and the chain is
//! checked against them by webpki (rustls' CRL support: the CRL's signature, its issuer, its
//! freshness). Concurrent fetches of one CRL are one fetch; a failed fetch is remembered for
//! half a minute, so a dead CRL server costs one deadline, not one per handshake, and never
//! holds up hosts whose CRLs are elsewhere.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, SignatureVerificationAlgorithm, UnixTime};
use webpki::{CertRevocationList, OwnedCertRevocationList};

use crate::config::{RevocationMode, UpstreamConfig};

/// A failed fetch is tried again after this.
const RETRY_FAILED: Duration = Duration::from_secs(30);
/// A CRL is fetched again after this at the latest, whatever its nextUpdate says.
const MAX_KEEP: Duration = Duration::from_secs(24 * 3600);
/// A CRL already past its nextUpdate is fetched again after this.
const STALE_KEEP: Duration = Duration::from_secs(60);

/// What was found out about a certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Status {
    /// Checks are off.
    Off,
    /// The certificate names no CRL to check (nothing to go on; no action follows).
    NotPublished,
    Good,
    Revoked(String),
    /// A CRL was to be checked and could not be: `revocation_unknown` decides.
    Unknown(String),
}

impl Status {
    /// The decryption log's `revocation`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::NotPublished | Self::Unknown(_) => "unknown",
            Self::Good => "good",
            Self::Revoked(_) => "revoked",
        }
    }

    /// Where the answer came from (the decryption log's `revocation_source`).
    pub fn source(&self) -> Option<&'static str> {
        match self {
            Self::Off => None,
            Self::NotPublished => Some("none"),
            _ => Some("crl"),
        }
    }
}

/// One CRL as fetched, or why it could not be.
enum Fetched {
    Crl { crl: Box<CertRevocationList<'static>>, keep: Duration },
    Failed(String),
}

/// The CRL cache and what checking against it needs.
pub struct Revocation {
    mode: RevocationMode,
    timeout: Duration,
    max_bytes: usize,
    roots: Arc<RootCertStore>,
    algorithms: &'static [&'static dyn SignatureVerificationAlgorithm],
    crls: moka::future::Cache<String, Arc<Fetched>>,
}

struct KeepFor;

impl moka::Expiry<String, Arc<Fetched>> for KeepFor {
    fn expire_after_create(&self, _url: &String, fetched: &Arc<Fetched>, _at: std::time::Instant) -> Option<Duration> {
        Some(match &**fetched {
            Fetched::Crl { keep, .. } => *keep,
            Fetched::Failed(_) => RETRY_FAILED,
        })
    }
}

impl Revocation {
    pub fn new(config: &UpstreamConfig, roots: Arc<RootCertStore>, provider: &rustls::crypto::CryptoProvider) -> Self {
        Self {
            mode: config.revocation,
            timeout: Duration::from_millis(config.revocation_timeout_ms),
            max_bytes: config.revocation_max_crl_bytes,
            roots,
            algorithms: provider.signature_verification_algorithms.all,
            crls: moka::future::Cache::builder().max_capacity(1024).expire_after(KeepFor).build(),
        }
    }

    /// Checks a chain (end entity first) that validated: by the CRLs its end entity names.
    pub async fn check(&self, chain: &[CertificateDer<'static>]) -> Status {
        if self.mode == RevocationMode::Off {
            return Status::Off;
        }
        let Some(end_entity) = chain.first() else { return Status::NotPublished };
        let urls = distribution_points(end_entity);
        if urls.is_empty() {
            return Status::NotPublished;
        }
        let started = Instant::now();
        let mut failures = Vec::new();
        for url in urls {
            let Some(left) = self.timeout.checked_sub(started.elapsed()) else { break };
            let fetch = self.crls.get_with(url.clone(), self.fetch(url.clone()));
            let fetched = match tokio::time::timeout(left, fetch).await {
                Ok(fetched) => fetched,
                Err(_) => {
                    failures.push(format!("{url}: no answer within {} ms", self.timeout.as_millis()));
                    break;
                }
            };
            match &*fetched {
                Fetched::Crl { crl, .. } => return self.against(chain, crl),
                Fetched::Failed(why) => failures.push(format!("{url}: {why}")),
            }
        }
        Status::Unknown(format!("no CRL could be fetched ({})", failures.join("; ")))
    }

    /// The chain checked against one CRL.
    fn against(&self, chain: &[CertificateDer<'static>], crl: &CertRevocationList<'static>) -> Status {
        let Ok(end_entity) = webpki::EndEntityCert::try_from(&chain[0]) else {
            return Status::Unknown("the certificate could not be parsed".into());
        };
        let crls = [crl];
        let Ok(options) = webpki::RevocationOptionsBuilder::new(&crls) else {
            return Status::Unknown("no CRL".into());
        };
        let options = options
            .with_depth(webpki::RevocationCheckDepth::EndEntity)
            .with_status_policy(webpki::UnknownStatusPolicy::Deny)
            .with_expiration_policy(webpki::ExpirationPolicy::Enforce)
            .build();
        let verified = end_entity.verify_for_usage(
            self.algorithms,
            &self.roots.roots,
            &chain[1..],
            UnixTime::now(),
            webpki::KeyUsage::server_auth(),
            Some(options),
            None,
        );
        match verified {
            Ok(_) => Status::Good,
            Err(webpki::Error::CertRevoked) => Status::Revoked("listed in its issuer's CRL".into()),
            Err(webpki::Error::UnknownRevocationStatus) => {
                Status::Unknown("the CRL fetched is not its issuer's (or not for it)".into())
            }
            Err(webpki::Error::CrlExpired { .. }) => Status::Unknown("the CRL is past its nextUpdate".into()),
            Err(e) => Status::Unknown(format!("the CRL could not be used: {e:?}")),
        }
    }

    /// Fetches and parses one CRL (DER, or PEM).
    async fn fetch(&self, url: String) -> Arc<Fetched> {
        let fetched = crate::net::fetch(&url, None, (None, None), self.max_bytes, self.timeout).await;
        let result = match fetched {
            Ok(f) if f.status == 200 => parse(&f.body),
            Ok(f) => Err(format!("HTTP {}", f.status)),
            Err(e) => Err(e.to_string()),
        };
        Arc::new(match result {
            Ok(fetched) => fetched,
            Err(why) => {
                tracing::warn!(url = %url, error = %why, "CRL not fetched: revocation status unknown");
                Fetched::Failed(why)
            }
        })
    }
}

fn parse(body: &[u8]) -> Result<Fetched, String> {
    use rustls::pki_types::pem::PemObject;
    let der = match body.starts_with(b"-----BEGIN") {
        true => rustls::pki_types::CertificateRevocationListDer::from_pem_slice(body)
            .map_err(|e| format!("not a PEM CRL: {e}"))?
            .as_ref()
            .to_vec(),
        false => body.to_vec(),
    };
    let next_update = x509_parser::parse_x509_crl(&der)
        .map_err(|e| format!("not a CRL: {e}"))?
        .1
        .next_update()
        .map(|t| t.timestamp());
    let crl = OwnedCertRevocationList::from_der(&der).map_err(|e| format!("not a usable CRL: {e:?}"))?;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let keep = match next_update {
        Some(at) if at > now => Duration::from_secs((at - now) as u64).min(MAX_KEEP),
        Some(_) => STALE_KEEP,
        None => MAX_KEEP,
    };
    Ok(Fetched::Crl { crl: Box::new(CertRevocationList::from(crl)), keep })
}

/// The http:// URLs of a certificate's CRL distribution points.
fn distribution_points(cert: &[u8]) -> Vec<String> {
    use x509_parser::extensions::{DistributionPointName, GeneralName, ParsedExtension};
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(cert) else { return Vec::new() };
    let mut urls = Vec::new();
    for ext in cert.extensions() {
        let ParsedExtension::CRLDistributionPoints(points) = ext.parsed_extension() else { continue };
        for point in points.iter() {
            let Some(DistributionPointName::FullName(names)) = &point.distribution_point else { continue };
            for name in names {
                if let GeneralName::URI(uri) = name
                    && uri.starts_with("http://")
                {
                    urls.push(uri.to_string());
                }
            }
        }
    }
    urls
}
