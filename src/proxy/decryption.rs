//! The decryption log (`[log] decryption`): one JSON line per client TLS session, target
//! `tollgate::decryption`, whatever became of it — decrypted, tunnelled, blocked or failed —
//! with both legs' TLS, the upstream certificate, its chain status, where the leaf came from
//! and, for a failure, the stage that failed and why. What an operator needs to answer "why
//! did this site break?" without a packet capture. Never a key, PIN or secret: only what the
//! handshakes showed in the clear, and the certificate's public fields.

use std::sync::Arc;

use rustls::CommonState;

use super::ConnCtx;
use super::verdict::Verdict;

/// What became of a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Decrypt,
    NoDecrypt,
    Block,
    /// Tunnelled because clients refused our certificate for the host (the learned bypass), or
    /// because the upstream cannot be intercepted (`unsupported = "tunnel"`).
    TunnelLearned,
    Error,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Decrypt => "decrypt",
            Self::NoDecrypt => "no-decrypt",
            Self::Block => "block",
            Self::TunnelLearned => "tunnel-learned",
            Self::Error => "error",
        }
    }
}

/// Where a session failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    ClientHello,
    UpstreamConnect,
    UpstreamHandshake,
    Validation,
    Mint,
    ClientHandshake,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClientHello => "client_hello",
            Self::UpstreamConnect => "upstream_connect",
            Self::UpstreamHandshake => "upstream_handshake",
            Self::Validation => "validation",
            Self::Mint => "mint",
            Self::ClientHandshake => "client_handshake",
        }
    }
}

/// What one side's handshake settled on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsFacts {
    pub version: Option<&'static str>,
    pub cipher: Option<&'static str>,
    pub group: Option<&'static str>,
    pub alpn: Option<String>,
    /// The name of the `[[upstream.client_cert]]` certificate tollgate presented when the
    /// server asked for one (the upstream leg only).
    pub client_cert: Option<Arc<str>>,
}

impl TlsFacts {
    /// From a completed handshake.
    pub fn of(conn: &CommonState) -> Self {
        Self {
            version: conn.protocol_version().and_then(|v| v.as_str()),
            cipher: conn.negotiated_cipher_suite().and_then(|s| s.suite().as_str()),
            group: conn.negotiated_key_exchange_group().and_then(|g| g.name().as_str()),
            alpn: conn.alpn_protocol().map(|p| String::from_utf8_lossy(p).into_owned()),
            client_cert: None,
        }
    }
}

/// The upstream end-entity certificate's public fields.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CertFacts {
    pub subject: String,
    pub issuer: String,
    /// The trust anchor's name: the issuer of the last certificate the upstream sent (its
    /// own subject when that certificate is self-signed).
    pub root: String,
    pub serial: String,
    pub sha256: String,
    pub not_before: String,
    pub not_after: String,
}

impl CertFacts {
    /// From the chain as sent, end entity first; `None` without a parsable end entity.
    pub fn of(chain: &[impl AsRef<[u8]>]) -> Option<Self> {
        let (_, leaf) = x509_parser::parse_x509_certificate(chain.first()?.as_ref()).ok()?;
        let last = chain.last().and_then(|c| x509_parser::parse_x509_certificate(c.as_ref()).ok()).map(|(_, c)| c);
        let root = last.as_ref().unwrap_or(&leaf).issuer().to_string();
        let time = |t: x509_parser::time::ASN1Time| {
            t.to_datetime().format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
        };
        Some(Self {
            subject: leaf.subject().to_string(),
            issuer: leaf.issuer().to_string(),
            root,
            serial: leaf.raw_serial_as_string().replace(':', ""),
            sha256: crate::hex::encode(&crate::keys::sha256(chain[0].as_ref())),
            not_before: time(leaf.validity().not_before),
            not_after: time(leaf.validity().not_after),
        })
    }
}

/// The line of one session, filled in as the session goes.
#[derive(Debug)]
pub struct Record {
    pub sni: Option<String>,
    pub rule: Option<Arc<str>>,
    pub decision: Decision,
    pub client: TlsFacts,
    pub upstream: TlsFacts,
    pub cert: Option<Arc<CertFacts>>,
    pub verdict: Option<Verdict>,
    /// `good`, `revoked`, `unknown` or `off`, and where the answer came from.
    pub revocation: &'static str,
    pub revocation_source: Option<&'static str>,
    /// `cached`, `minted` or `none`.
    pub leaf: &'static str,
    pub hsm_sign_ms: Option<f64>,
    /// The stage under way; what failed when the session ends in an error.
    pub stage: Stage,
    pub error: Option<String>,
    /// Why the upstream could not be intercepted (the session was tunnelled or blocked).
    pub unsupported: Option<String>,
}

impl Default for Record {
    fn default() -> Self {
        Self {
            sni: None,
            rule: None,
            decision: Decision::Error,
            client: TlsFacts::default(),
            upstream: TlsFacts::default(),
            cert: None,
            verdict: None,
            revocation: "off",
            revocation_source: None,
            leaf: "none",
            hsm_sign_ms: None,
            stage: Stage::ClientHello,
            error: None,
            unsupported: None,
        }
    }
}

impl Record {
    /// Writes the line for `ctx`'s session. A session that ended in an error has its stage
    /// and error; one that did not has neither.
    pub fn emit(&self, ctx: &ConnCtx) {
        let failed = self.error.is_some();
        let stage = failed.then(|| self.stage.as_str());
        let cert = self.cert.as_deref();
        let status = match &self.unsupported {
            Some(_) => Some("unsupported"),
            None => self.verdict.as_ref().map(|v| v.status.as_str()),
        };
        let detail = self.unsupported.as_deref().or(self
            .verdict
            .as_ref()
            .filter(|v| !v.is_trusted())
            .map(|v| v.detail.as_str()));
        tracing::info!(
            target: "tollgate::decryption",
            client = %ctx.client,
            user = ctx.user.as_deref(),
            listener = %ctx.listener(),
            mode = ctx.mode.as_str(),
            sni = self.sni.as_deref(),
            rule = self.rule.as_deref(),
            decision = self.decision.as_str(),
            client_tls_version = self.client.version,
            client_cipher = self.client.cipher,
            client_group = self.client.group,
            client_alpn = self.client.alpn.as_deref(),
            upstream_tls_version = self.upstream.version,
            upstream_cipher = self.upstream.cipher,
            upstream_group = self.upstream.group,
            upstream_alpn = self.upstream.alpn.as_deref(),
            upstream_client_cert = self.upstream.client_cert.as_deref(),
            upstream_subject = cert.map(|c| c.subject.as_str()),
            upstream_issuer = cert.map(|c| c.issuer.as_str()),
            upstream_root = cert.map(|c| c.root.as_str()),
            upstream_serial = cert.map(|c| c.serial.as_str()),
            upstream_sha256 = cert.map(|c| c.sha256.as_str()),
            upstream_not_before = cert.map(|c| c.not_before.as_str()),
            upstream_not_after = cert.map(|c| c.not_after.as_str()),
            chain_status = status,
            chain_detail = detail,
            revocation = self.revocation,
            revocation_source = self.revocation_source,
            leaf = self.leaf,
            hsm_sign_ms = self.hsm_sign_ms,
            stage,
            error = self.error.as_deref(),
            "tls session"
        );
    }
}

/// Parses the serial and names once per upstream certificate (the peer keeps the result).
pub fn cert_facts(chain: &[impl AsRef<[u8]>]) -> Option<Arc<CertFacts>> {
    CertFacts::of(chain).map(Arc::new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cert_facts_name_the_leaf_its_issuer_and_the_root() {
        let root_key = rcgen::KeyPair::generate().unwrap();
        let mut root_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        root_params.distinguished_name.push(rcgen::DnType::CommonName, "Facts Root");
        root_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        root_params.self_signed(&root_key).unwrap();
        let issuer = rcgen::Issuer::new(root_params, root_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["facts.test".to_string()]).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, "facts.test");
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&[0x0a, 0xbc]));
        let leaf = params.signed_by(&key, &issuer).unwrap();
        let facts = CertFacts::of(&[leaf.der().to_vec()]).unwrap();
        assert_eq!(facts.subject, "CN=facts.test");
        assert_eq!((facts.issuer.as_str(), facts.root.as_str()), ("CN=Facts Root", "CN=Facts Root"));
        assert_eq!(facts.serial, "0abc");
        assert_eq!(facts.sha256.len(), 64);
        assert!(facts.not_before.ends_with('Z') && facts.not_after.ends_with('Z'), "{facts:?}");
        assert!(CertFacts::of(&[b"not a certificate".to_vec()]).is_none());
    }
}
