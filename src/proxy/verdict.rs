//! What an upstream certificate was found to be: a `ChainStatus` (the policy's stable codes)
//! and the detail of what failed.

use crate::policy::trust::ChainStatus;

/// The upstream verdict: the status and, for a failure, what exactly failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub status: ChainStatus,
    /// Empty when trusted.
    pub detail: String,
}

impl Verdict {
    pub const TRUSTED: Self = Self { status: ChainStatus::Trusted, detail: String::new() };

    /// A failure with its detail.
    pub fn failed(status: ChainStatus, detail: impl Into<String>) -> Self {
        Self { status, detail: detail.into() }
    }

    /// The verdict for a verifier's result.
    pub fn of(result: &Result<(), rustls::Error>) -> Self {
        match result {
            Ok(()) => Self::TRUSTED,
            Err(e) => {
                let detail = match e {
                    rustls::Error::InvalidCertificate(c) => format!("{c:?}"),
                    other => other.to_string(),
                };
                Self::failed(ChainStatus::of(e), detail)
            }
        }
    }

    /// Whether the certificate validated.
    pub fn is_trusted(&self) -> bool {
        self.status == ChainStatus::Trusted
    }

    /// For logs: `trusted`, or `untrusted: CODE (DETAIL)`.
    pub fn describe(&self) -> String {
        match self.status {
            ChainStatus::Trusted => "trusted".into(),
            status => format!("untrusted: {} ({})", status.as_str(), self.detail),
        }
    }
}

/// Why a validated end-entity certificate is still below policy, if it is: an RSA key under
/// 2048 bits (the verifier checks signatures made by a chain's keys, not the size of the key
/// the leaf certifies).
pub fn weak_key(end_entity: &[u8]) -> Option<String> {
    use x509_parser::public_key::PublicKey;
    let (_, cert) = x509_parser::parse_x509_certificate(end_entity).ok()?;
    match cert.public_key().parsed().ok()? {
        PublicKey::RSA(rsa) if rsa.key_size() < 2048 => Some(format!("RSA key of {} bits", rsa.key_size())),
        _ => None,
    }
}
