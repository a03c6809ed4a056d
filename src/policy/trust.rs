//! Upstream trust as policy: each way an upstream certificate can fail has a stable code
//! (the decryption log's `chain_status`, the keys of `[upstream.on_error]`) and an action —
//! a forward-untrust leaf, so the client sees the problem, or a refusal.

use rustls::CertificateError;

use crate::config::{ErrorAction, UpstreamConfig};

/// A chain's status, one stable snake_case code each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ChainStatus {
    Trusted,
    Expired,
    NotYetValid,
    /// No path to a trusted root (unknown or self-signed issuer, bad signature, wrong key
    /// usage, unparsable certificate).
    UntrustedIssuer,
    NameMismatch,
    /// A key or signature below policy: RSA keys under 2048 bits, SHA-1 or MD5 signatures,
    /// algorithms the verifier does not accept.
    Weak,
    Revoked,
    /// Revocation was to be checked and could not be (fetch failed, timed out, stale).
    RevocationUnknown,
}

impl ChainStatus {
    /// The code in logs and in `[upstream.on_error]`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Trusted => "trusted",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::UntrustedIssuer => "untrusted_issuer",
            Self::NameMismatch => "name_mismatch",
            Self::Weak => "weak",
            Self::Revoked => "revoked",
            Self::RevocationUnknown => "revocation_unknown",
        }
    }

    /// The status a verifier error stands for.
    #[allow(deprecated)] // rustls still returns the context-free variants in places
    pub fn of(error: &rustls::Error) -> Self {
        use CertificateError::*;
        let rustls::Error::InvalidCertificate(e) = error else { return Self::UntrustedIssuer };
        match e {
            Expired | ExpiredContext { .. } => Self::Expired,
            NotValidYet | NotValidYetContext { .. } => Self::NotYetValid,
            NotValidForName | NotValidForNameContext { .. } => Self::NameMismatch,
            UnsupportedSignatureAlgorithm
            | UnsupportedSignatureAlgorithmContext { .. }
            | UnsupportedSignatureAlgorithmForPublicKeyContext { .. } => Self::Weak,
            Revoked => Self::Revoked,
            UnknownRevocationStatus | ExpiredRevocationList | ExpiredRevocationListContext { .. } => {
                Self::RevocationUnknown
            }
            _ => Self::UntrustedIssuer,
        }
    }
}

/// What each failure gets, from `[upstream.on_error]`: a key left out follows `untrusted`,
/// except `revoked`, which blocks unless told otherwise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OnError {
    actions: [ErrorAction; 8],
}

impl OnError {
    pub fn new(config: &UpstreamConfig) -> Self {
        let default = config.untrusted.into();
        let set = &config.on_error;
        let mut actions = [default; 8];
        for (status, chosen) in [
            (ChainStatus::Expired, set.expired),
            (ChainStatus::NotYetValid, set.not_yet_valid),
            (ChainStatus::UntrustedIssuer, set.untrusted_issuer),
            (ChainStatus::NameMismatch, set.name_mismatch),
            (ChainStatus::Weak, set.weak),
            (ChainStatus::Revoked, Some(set.revoked.unwrap_or(ErrorAction::Block))),
            (ChainStatus::RevocationUnknown, set.revocation_unknown),
        ] {
            actions[status as usize] = chosen.unwrap_or(default);
        }
        Self { actions }
    }

    /// The action for a failed chain (`Trusted` is never refused).
    pub fn action(&self, status: ChainStatus) -> ErrorAction {
        match status {
            ChainStatus::Trusted => ErrorAction::Untrust,
            failed => self.actions[failed as usize],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UntrustedAction;

    #[test]
    #[allow(deprecated)]
    fn verifier_errors_map_to_stable_codes() {
        let of = |e: CertificateError| ChainStatus::of(&rustls::Error::InvalidCertificate(e)).as_str();
        assert_eq!(of(CertificateError::Expired), "expired");
        assert_eq!(of(CertificateError::NotValidYet), "not_yet_valid");
        assert_eq!(of(CertificateError::UnknownIssuer), "untrusted_issuer");
        assert_eq!(of(CertificateError::BadSignature), "untrusted_issuer");
        assert_eq!(of(CertificateError::NotValidForName), "name_mismatch");
        assert_eq!(of(CertificateError::UnsupportedSignatureAlgorithm), "weak");
        assert_eq!(of(CertificateError::Revoked), "revoked");
        assert_eq!(of(CertificateError::UnknownRevocationStatus), "revocation_unknown");
        assert_eq!(ChainStatus::of(&rustls::Error::DecryptError), ChainStatus::UntrustedIssuer);
    }

    #[test]
    fn unset_failures_follow_untrusted_and_revoked_blocks() {
        let mut config = UpstreamConfig::default();
        let lenient = OnError::new(&config);
        assert_eq!(lenient.action(ChainStatus::Expired), ErrorAction::Untrust);
        assert_eq!(lenient.action(ChainStatus::Revoked), ErrorAction::Block);
        config.untrusted = UntrustedAction::Block;
        config.on_error.name_mismatch = Some(ErrorAction::Untrust);
        let strict = OnError::new(&config);
        assert_eq!(strict.action(ChainStatus::Expired), ErrorAction::Block);
        assert_eq!(strict.action(ChainStatus::NameMismatch), ErrorAction::Untrust);
        assert_eq!(strict.action(ChainStatus::Trusted), ErrorAction::Untrust);
    }
}
