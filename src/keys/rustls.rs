//! Adapter: rustls signs TLS handshakes through any `PrivateKey` (a minted leaf's software key,
//! or an HSM-held server key for inbound inspection). The only file that changes when rustls
//! 0.24 reshapes its signing traits. How an HSM key waits for its signature (and sheds when too
//! many wait) is the HSM key's business, not this adapter's.

use std::sync::Arc;

use rustls::sign::{Signer, SigningKey};
use rustls::{SignatureAlgorithm, SignatureScheme};

use super::{KeyAlgorithm, PrivateKey};

/// A `rustls::sign::SigningKey` over a `PrivateKey`.
#[derive(Debug, Clone)]
pub struct RustlsKey {
    key: Arc<dyn PrivateKey>,
}

impl RustlsKey {
    /// Wraps a key.
    pub fn new(key: Arc<dyn PrivateKey>) -> Self {
        Self { key }
    }

    /// The schemes this key can sign, best first: PSS before PKCS#1 v1.5 for RSA (TLS 1.3
    /// allows only PSS).
    fn schemes(&self) -> &'static [SignatureScheme] {
        match self.key.algorithm() {
            KeyAlgorithm::EcdsaP256 => &[SignatureScheme::ECDSA_NISTP256_SHA256],
            KeyAlgorithm::EcdsaP384 => &[SignatureScheme::ECDSA_NISTP384_SHA384],
            KeyAlgorithm::Rsa2048 | KeyAlgorithm::Rsa3072 => {
                &[SignatureScheme::RSA_PSS_SHA256, SignatureScheme::RSA_PKCS1_SHA256]
            }
        }
    }
}

impl SigningKey for RustlsKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        let scheme = self.schemes().iter().find(|s| offered.contains(s))?;
        Some(Box::new(KeySigner { key: self.key.clone(), scheme: *scheme }))
    }

    fn public_key(&self) -> Option<rustls::pki_types::SubjectPublicKeyInfoDer<'_>> {
        Some(rustls::pki_types::SubjectPublicKeyInfoDer::from(self.key.public_key()))
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        match self.key.algorithm() {
            KeyAlgorithm::EcdsaP256 | KeyAlgorithm::EcdsaP384 => SignatureAlgorithm::ECDSA,
            KeyAlgorithm::Rsa2048 | KeyAlgorithm::Rsa3072 => SignatureAlgorithm::RSA,
        }
    }
}

#[derive(Debug)]
struct KeySigner {
    key: Arc<dyn PrivateKey>,
    scheme: SignatureScheme,
}

impl Signer for KeySigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        self.key.sign(self.scheme, message).map_err(|e| {
            tracing::warn!(error = %e, "handshake signature failed");
            rustls::Error::Other(rustls::OtherError(Arc::new(e)))
        })
    }

    fn scheme(&self) -> SignatureScheme {
        self.scheme
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::software::SoftwareKey;

    #[test]
    fn rsa_prefers_pss_and_ec_offers_its_curve() {
        let rsa = RustlsKey::new(Arc::new(SoftwareKey::generate(KeyAlgorithm::Rsa2048).unwrap()));
        let signer = rsa.choose_scheme(&[SignatureScheme::RSA_PKCS1_SHA256, SignatureScheme::RSA_PSS_SHA256]).unwrap();
        assert_eq!(signer.scheme(), SignatureScheme::RSA_PSS_SHA256);
        let ec = RustlsKey::new(Arc::new(SoftwareKey::generate(KeyAlgorithm::EcdsaP256).unwrap()));
        assert!(ec.choose_scheme(&[SignatureScheme::ECDSA_NISTP384_SHA384]).is_none());
        assert!(ec.choose_scheme(&[SignatureScheme::ECDSA_NISTP256_SHA256]).unwrap().sign(b"m").is_ok());
    }
}
