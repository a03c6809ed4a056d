//! Revocation of upstream certificates (`[upstream] revocation = "crl"` or `"crl+ocsp"`; an
//! OCSP response the upstream staples is honoured in both, see `ocsp`). Interception takes
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
    /// The certificate names no CRL (nor, with `crl+ocsp`, an OCSP responder) and no response
    /// was stapled: nothing to go on, no action follows.
    NotPublished,
    Good(Source),
    Revoked(Source, String),
    /// A check was to be made and could not be: `revocation_unknown` decides.
    Unknown(Source, String),
}

/// Where a revocation answer came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Crl,
    /// A response the upstream stapled (or one stapled earlier, for a resumed session).
    OcspStaple,
    /// A query to the certificate's responder.
    Ocsp,
}

impl Status {
    /// The decryption log's `revocation`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::NotPublished | Self::Unknown(..) => "unknown",
            Self::Good(_) => "good",
            Self::Revoked(..) => "revoked",
        }
    }

    /// Where the answer came from (the decryption log's `revocation_source`).
    pub fn source(&self) -> Option<&'static str> {
        let source = match self {
            Self::Off => return None,
            Self::NotPublished => return Some("none"),
            Self::Good(source) | Self::Revoked(source, _) | Self::Unknown(source, _) => source,
        };
        Some(match source {
            Source::Crl => "crl",
            Source::OcspStaple => "ocsp-staple",
            Source::Ocsp => "ocsp",
        })
    }

    /// Whether the answer settles the question (good or revoked).
    fn settled(&self) -> bool {
        matches!(self, Self::Good(_) | Self::Revoked(..))
    }
}

/// An OCSP answer kept for a certificate, and for how long.
#[derive(Clone)]
struct Kept {
    status: Status,
    keep: Duration,
}

struct KeepAnswer;

impl moka::Expiry<[u8; 32], Kept> for KeepAnswer {
    fn expire_after_create(&self, _key: &[u8; 32], kept: &Kept, _at: std::time::Instant) -> Option<Duration> {
        Some(kept.keep)
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
    crls: moka::future::Cache<String, Arc<Fetched>>,
    /// OCSP answers by end-entity SHA-256: stapled ones (so a resumed session, which carries
    /// no staple, is decided the same way) and queried ones.
    answers: moka::future::Cache<[u8; 32], Kept>,
    /// Also the deadline, the trusted roots and the signature algorithms checks use.
    fetcher: Arc<Fetcher>,
}

/// What fetching a CRL or an OCSP answer needs, shared with the tasks that fetch, so that a
/// fetch outlives the handshake that started it.
struct Fetcher {
    timeout: Duration,
    max_bytes: usize,
    roots: Arc<RootCertStore>,
    algorithms: &'static [&'static dyn SignatureVerificationAlgorithm],
    /// The parent proxy CRLs and OCSP answers are fetched through, when there is one.
    parent: Option<Arc<super::parent::Parent>>,
}

/// `key`'s value in `cache`, made by `init` when it is missing, waited for at most `wait`.
/// The making runs in a task of its own, so a caller that stops waiting never cancels it:
/// what it finds (a CRL, or why there is none) is kept for the next caller, who then does not
/// wait the deadline again. Concurrent callers share one making (moka's `get_with`).
async fn shared<K, V, F>(cache: &moka::future::Cache<K, V>, key: K, init: F, wait: Duration) -> Option<V>
where
    K: std::hash::Hash + Eq + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    F: std::future::Future<Output = V> + Send + 'static,
{
    if let Some(value) = cache.get(&key).await {
        return Some(value);
    }
    let cache = cache.clone();
    let making = tokio::spawn(async move { cache.get_with(key, init).await });
    tokio::time::timeout(wait, making).await.ok()?.ok()
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
    pub fn new(
        config: &UpstreamConfig,
        roots: Arc<RootCertStore>,
        provider: &rustls::crypto::CryptoProvider,
        parent: Option<Arc<super::parent::Parent>>,
    ) -> Self {
        let fetcher = Fetcher {
            timeout: Duration::from_millis(config.revocation_timeout_ms),
            max_bytes: config.revocation_max_crl_bytes,
            roots,
            algorithms: provider.signature_verification_algorithms.all,
            parent,
        };
        Self {
            mode: config.revocation,
            fetcher: Arc::new(fetcher),
            crls: moka::future::Cache::builder().max_capacity(1024).expire_after(KeepFor).build(),
            answers: moka::future::Cache::builder().max_capacity(100_000).expire_after(KeepAnswer).build(),
        }
    }

    /// Checks a chain (end entity first) that validated: by the response the upstream
    /// stapled, else one stapled before, else the CRLs its end entity names, and with
    /// `crl+ocsp` its OCSP responder when the CRLs settle nothing.
    pub async fn check(&self, chain: &[CertificateDer<'static>], staple: Option<&[u8]>) -> Status {
        if self.mode == RevocationMode::Off {
            return Status::Off;
        }
        let Some(end_entity) = chain.first() else { return Status::NotPublished };
        let fingerprint = crate::keys::sha256(end_entity);
        if let Some(staple) = staple {
            match super::ocsp::verify(staple, chain, &self.fetcher.roots, self.fetcher.algorithms) {
                Ok((answer, keep)) => {
                    let status = from_answer(answer, Source::OcspStaple);
                    self.answers.insert(fingerprint, Kept { status: status.clone(), keep }).await;
                    return status;
                }
                Err(why) => tracing::warn!(error = %why, "stapled OCSP response ignored"),
            }
        }
        if let Some(kept) = self.answers.get(&fingerprint).await {
            return kept.status;
        }
        let by_crl = self.by_crl(chain).await;
        if by_crl.settled() || self.mode != RevocationMode::CrlOcsp {
            return by_crl;
        }
        let Some(url) = super::ocsp::responder(end_entity) else { return by_crl };
        let query = self.fetcher.clone().query(url, chain.to_vec());
        match shared(&self.answers, fingerprint, query, self.fetcher.timeout).await {
            Some(kept) if kept.status.settled() || by_crl == Status::NotPublished => kept.status,
            Some(_) => by_crl,
            None => Status::Unknown(
                Source::Ocsp,
                format!("the OCSP responder gave no answer within {} ms", self.fetcher.timeout.as_millis()),
            ),
        }
    }

    /// Checks by CRLs: the end entity's own CRL must cover it, and the intermediates the
    /// upstream sent are checked against the CRLs they name (a revoked intermediate revokes
    /// the chain; one whose CRL cannot be had makes the status unknown).
    async fn by_crl(&self, chain: &[CertificateDer<'static>]) -> Status {
        let started = Instant::now();
        let leaf = self.first_crl(&distribution_points(&chain[0]), started).await;
        let mut above = Vec::new();
        let mut missing = Vec::new();
        for cert in &chain[1..] {
            match self.first_crl(&distribution_points(cert), started).await {
                Some(Ok(crl)) => above.push(crl),
                Some(Err(why)) => missing.push(format!("an intermediate's CRL: {why}")),
                None => {}
            }
        }
        let status = match &leaf {
            None => Status::NotPublished,
            Some(Err(why)) => Status::Unknown(Source::Crl, why.clone()),
            Some(Ok(crl)) => self.against(chain, &[crl], webpki::RevocationCheckDepth::EndEntity),
        };
        if matches!(status, Status::Revoked(..)) {
            return status;
        }
        if !above.is_empty() {
            let mut all: Vec<&Fetched> = above.iter().map(|f| &**f).collect();
            if let Some(Ok(crl)) = &leaf {
                all.push(crl);
            }
            if let Status::Revoked(..) = self.against(chain, &all, webpki::RevocationCheckDepth::Chain) {
                let why = "an intermediate CA of the chain is listed in its issuer's CRL";
                return Status::Revoked(Source::Crl, why.into());
            }
        }
        match status {
            Status::Good(_) | Status::NotPublished if !missing.is_empty() => {
                Status::Unknown(Source::Crl, missing.join("; "))
            }
            status => status,
        }
    }

    /// The first CRL of `urls` that can be had within the deadline (counted from `started`):
    /// `None` when there are no URLs.
    async fn first_crl(&self, urls: &[String], started: Instant) -> Option<Result<Arc<Fetched>, String>> {
        if urls.is_empty() {
            return None;
        }
        let mut failures = Vec::new();
        for url in urls {
            let Some(left) = self.fetcher.timeout.checked_sub(started.elapsed()) else { break };
            let fetch = self.fetcher.clone().fetch(url.clone());
            match shared(&self.crls, url.clone(), fetch, left).await {
                Some(fetched) if matches!(&*fetched, Fetched::Crl { .. }) => return Some(Ok(fetched)),
                Some(fetched) => {
                    if let Fetched::Failed(why) = &*fetched {
                        failures.push(format!("{url}: {why}"));
                    }
                }
                None => {
                    failures.push(format!("{url}: no answer within {} ms", self.fetcher.timeout.as_millis()));
                    break;
                }
            }
        }
        Some(Err(format!("no CRL could be fetched ({})", failures.join("; "))))
    }

    /// The chain checked against `crls` to `depth`: the end entity must be covered by one
    /// of them; above it, a certificate no CRL covers passes.
    fn against(
        &self,
        chain: &[CertificateDer<'static>],
        crls: &[&Fetched],
        depth: webpki::RevocationCheckDepth,
    ) -> Status {
        let Ok(end_entity) = webpki::EndEntityCert::try_from(&chain[0]) else {
            return Status::Unknown(Source::Crl, "the certificate could not be parsed".into());
        };
        let crls: Vec<&CertRevocationList<'static>> = crls
            .iter()
            .filter_map(|f| match f {
                Fetched::Crl { crl, .. } => Some(&**crl),
                Fetched::Failed(_) => None,
            })
            .collect();
        let Ok(options) = webpki::RevocationOptionsBuilder::new(&crls) else {
            return Status::Unknown(Source::Crl, "no CRL".into());
        };
        let policy = match depth {
            webpki::RevocationCheckDepth::EndEntity => webpki::UnknownStatusPolicy::Deny,
            webpki::RevocationCheckDepth::Chain => webpki::UnknownStatusPolicy::Allow,
        };
        let options = options
            .with_depth(depth)
            .with_status_policy(policy)
            .with_expiration_policy(webpki::ExpirationPolicy::Enforce)
            .build();
        let verified = end_entity.verify_for_usage(
            self.fetcher.algorithms,
            &self.fetcher.roots.roots,
            &chain[1..],
            UnixTime::now(),
            webpki::KeyUsage::server_auth(),
            Some(options),
            None,
        );
        let unknown = |why: String| Status::Unknown(Source::Crl, why);
        match verified {
            Ok(_) => Status::Good(Source::Crl),
            Err(webpki::Error::CertRevoked) => Status::Revoked(Source::Crl, "listed in its issuer's CRL".into()),
            Err(webpki::Error::UnknownRevocationStatus) => {
                unknown("the CRL fetched is not its issuer's (or not for it)".into())
            }
            Err(webpki::Error::CrlExpired { .. }) => unknown("the CRL is past its nextUpdate".into()),
            Err(e) => unknown(format!("the CRL could not be used: {e:?}")),
        }
    }
}

impl Fetcher {
    /// Asks the certificate's OCSP responder (a GET, as RFC 6960 allows for small requests).
    async fn query(self: Arc<Self>, url: String, chain: Vec<CertificateDer<'static>>) -> Kept {
        let failed = |why: String| {
            tracing::warn!(url = %url, error = %why, "OCSP query failed: revocation status unknown");
            Kept { status: Status::Unknown(Source::Ocsp, why), keep: RETRY_FAILED }
        };
        let request = match super::ocsp::request(&chain, &self.roots) {
            Ok(request) => request,
            Err(why) => return failed(why),
        };
        use base64::Engine;
        let encoded = base64::engine::general_purpose::STANDARD.encode(request);
        let escaped = encoded.replace('+', "%2B").replace('/', "%2F").replace('=', "%3D");
        let get = format!("{}/{escaped}", url.trim_end_matches('/'));
        let body = match crate::net::fetch(&get, None, (None, None), 64 * 1024, self.timeout, self.via(&get)).await {
            Ok(f) if f.status == 200 => f.body,
            Ok(f) => return failed(format!("HTTP {}", f.status)),
            Err(e) => return failed(e.to_string()),
        };
        match super::ocsp::verify(&body, &chain, &self.roots, self.algorithms) {
            Ok((answer, keep)) => Kept { status: from_answer(answer, Source::Ocsp), keep },
            Err(why) => failed(why),
        }
    }

    /// The parent proxy to fetch `url` through, if any (and `no_parent` does not list its host).
    fn via(&self, url: &str) -> Option<&crate::net::Via> {
        let host =
            url.parse::<http::Uri>().ok()?.host()?.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
        self.parent.as_ref()?.via_for(&host)
    }

    /// Fetches and parses one CRL (DER, or PEM).
    async fn fetch(self: Arc<Self>, url: String) -> Arc<Fetched> {
        let fetched = crate::net::fetch(&url, None, (None, None), self.max_bytes, self.timeout, self.via(&url)).await;
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

fn from_answer(answer: super::ocsp::Answer, source: Source) -> Status {
    match answer {
        super::ocsp::Answer::Good => Status::Good(source),
        super::ocsp::Answer::Revoked => Status::Revoked(source, "revoked, says its issuer's OCSP responder".into()),
        super::ocsp::Answer::Unknown => Status::Unknown(source, "the OCSP responder does not know it".into()),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A handshake that stops waiting for a CRL (its deadline counts from the start of the
    /// whole check, so it can end before the fetch's own) must not cancel the fetch: the
    /// failure is kept, and the next handshake is answered at once instead of waiting again.
    #[tokio::test(flavor = "current_thread")]
    async fn a_fetch_outlives_the_handshake_that_stopped_waiting_for_it() {
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/root.crl", silent.local_addr().unwrap());
        let _accepting = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = silent.accept().await {
                held.push(stream);
            }
        });
        let config = UpstreamConfig { revocation_timeout_ms: 400, ..Default::default() };
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        let revocation = Revocation::new(&config, Arc::new(RootCertStore::empty()), &provider, None);

        // The handshake's check began 300 ms ago: 100 ms of its deadline are left.
        let asked = Instant::now();
        let first = revocation.first_crl(std::slice::from_ref(&url), asked - Duration::from_millis(300)).await;
        assert!(
            matches!(&first, Some(Err(why)) if why.contains("no answer within 400 ms")),
            "{:?}",
            first.map(|f| f.err())
        );
        assert!(asked.elapsed() < Duration::from_millis(300), "waited what was left: {:?}", asked.elapsed());

        // The fetch itself ends at its own timeout (400 ms after it began, 300 ms from now).
        tokio::time::sleep(Duration::from_millis(400)).await;
        let asked = Instant::now();
        let second = revocation.first_crl(std::slice::from_ref(&url), asked).await;
        assert!(asked.elapsed() < Duration::from_millis(100), "the kept failure answers: {:?}", asked.elapsed());
        assert!(
            matches!(&second, Some(Err(why)) if why.contains("no answer within 400 ms")),
            "{:?}",
            second.map(|f| f.err())
        );
    }
}
