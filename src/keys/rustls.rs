//! Adapter: rustls signs TLS handshakes through any `PrivateKey` (an HSM-held server key for
//! inbound inspection). The only file that changes when rustls 0.24 reshapes its signing traits.
//!
//! rustls signs synchronously inside the handshake, on a tokio worker. An HSM signature can
//! take milliseconds (seconds for a network HSM), so a wait past the HSM layer's short inline
//! budget runs under `block_in_place`, which moves the worker's other tasks elsewhere (a local
//! token answering in tens of microseconds is waited for in place: the hand-off costs more).
//! The number of handshakes waiting on the HSM at once is bounded: past the bound a handshake
//! fails at once with a clear log instead of queueing without limit.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use rustls::sign::{Signer, SigningKey};
use rustls::{SignatureAlgorithm, SignatureScheme};

use super::{KeyAlgorithm, PrivateKey};

/// A `rustls::sign::SigningKey` over a `PrivateKey`.
#[derive(Debug, Clone)]
pub struct RustlsKey {
    key: Arc<dyn PrivateKey>,
    waiting: Arc<InFlight>,
}

/// Handshakes waiting on the HSM, and how many may.
#[derive(Debug)]
pub struct InFlight {
    now: AtomicUsize,
    max: usize,
}

impl InFlight {
    /// At most `max` signatures waiting at once.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self { now: AtomicUsize::new(0), max: max.max(1) })
    }
}

impl RustlsKey {
    /// Wraps a key; `waiting` bounds concurrent signatures (share one per listener).
    pub fn new(key: Arc<dyn PrivateKey>, waiting: Arc<InFlight>) -> Self {
        Self { key, waiting }
    }

    /// Wraps an in-memory key (a minted leaf's): it signs on the caller's thread and is never
    /// shed, so it needs no bound of its own.
    pub fn in_memory(key: Arc<dyn PrivateKey>) -> Self {
        debug_assert!(!key.may_block(), "an HSM key must share its listener's bound");
        Self { key, waiting: InFlight::new(1) }
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
        Some(Box::new(KeySigner { key: self.key.clone(), scheme: *scheme, waiting: self.waiting.clone() }))
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
    waiting: Arc<InFlight>,
}

impl Signer for KeySigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        let failed = |e: super::KeyError| {
            tracing::warn!(error = %e, "handshake signature failed");
            rustls::Error::Other(rustls::OtherError(Arc::new(e)))
        };
        if !self.key.may_block() {
            return self.key.sign(self.scheme, message).map_err(failed);
        }
        let waiting = self.waiting.now.fetch_add(1, Ordering::AcqRel);
        let _slot = Slot(&self.waiting);
        if waiting >= self.waiting.max {
            tracing::warn!(waiting, max = self.waiting.max, "handshake shed: too many handshakes waiting for the HSM");
            return Err(rustls::Error::General("HSM busy: handshake shed".into()));
        }
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        let offload = |wait: &mut dyn FnMut()| match multi_thread {
            true => tokio::task::block_in_place(wait),
            false => wait(),
        };
        self.key.sign_on_worker(self.scheme, message, &offload).map_err(failed)
    }

    fn scheme(&self) -> SignatureScheme {
        self.scheme
    }
}

struct Slot<'a>(&'a InFlight);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.now.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::software::SoftwareKey;

    #[test]
    fn rsa_prefers_pss_and_ec_offers_its_curve() {
        let waiting = InFlight::new(4);
        let rsa = RustlsKey::new(Arc::new(SoftwareKey::generate(KeyAlgorithm::Rsa2048).unwrap()), waiting.clone());
        let signer = rsa.choose_scheme(&[SignatureScheme::RSA_PKCS1_SHA256, SignatureScheme::RSA_PSS_SHA256]).unwrap();
        assert_eq!(signer.scheme(), SignatureScheme::RSA_PSS_SHA256);
        let ec = RustlsKey::new(Arc::new(SoftwareKey::generate(KeyAlgorithm::EcdsaP256).unwrap()), waiting);
        assert!(ec.choose_scheme(&[SignatureScheme::ECDSA_NISTP384_SHA384]).is_none());
        assert!(ec.choose_scheme(&[SignatureScheme::ECDSA_NISTP256_SHA256]).unwrap().sign(b"m").is_ok());
    }

    #[test]
    fn signatures_past_the_bound_are_shed() {
        #[derive(Debug)]
        struct Remote(SoftwareKey);
        impl PrivateKey for Remote {
            fn algorithm(&self) -> KeyAlgorithm {
                self.0.algorithm()
            }
            fn public_key(&self) -> &[u8] {
                self.0.public_key()
            }
            fn sign(&self, scheme: SignatureScheme, message: &[u8]) -> Result<Vec<u8>, super::super::KeyError> {
                self.0.sign(scheme, message)
            }
        }
        let waiting = InFlight::new(1);
        waiting.now.store(1, Ordering::SeqCst); // one signature already waiting
        let key =
            RustlsKey::new(Arc::new(Remote(SoftwareKey::generate(KeyAlgorithm::EcdsaP256).unwrap())), waiting.clone());
        let signer = key.choose_scheme(&[SignatureScheme::ECDSA_NISTP256_SHA256]).unwrap();
        assert!(signer.sign(b"m").is_err());
        assert_eq!(waiting.now.load(Ordering::SeqCst), 1, "the slot is released");
    }
}
