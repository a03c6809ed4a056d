//! Adapter: rcgen signs certificates through any `PrivateKey` (the HSM-held CA key in
//! particular), so rcgen never sees key material.

use std::sync::Arc;

use super::{KeyAlgorithm, KeyError, PrivateKey};

/// An `rcgen::SigningKey` over a `PrivateKey`.
#[derive(Debug, Clone)]
pub struct RcgenKey {
    key: Arc<dyn PrivateKey>,
    raw_public: Vec<u8>,
}

impl RcgenKey {
    /// Wraps a key; reads its public key once.
    pub fn new(key: Arc<dyn PrivateKey>) -> Result<Self, KeyError> {
        let raw_public = super::spki_raw(key.public_key())?;
        Ok(Self { key, raw_public })
    }

    /// The wrapped key.
    pub fn key(&self) -> &Arc<dyn PrivateKey> {
        &self.key
    }
}

impl rcgen::SigningKey for RcgenKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        let scheme = self.key.algorithm().certificate_scheme();
        self.key.sign(scheme, msg).map_err(|e| {
            LAST_ERROR.with(|last| *last.borrow_mut() = Some(e.to_string()));
            rcgen::Error::RemoteKeyError
        })
    }
}

thread_local! {
    /// Why the last signature on this thread failed: rcgen's `RemoteKeyError` carries no
    /// reason, and signing is synchronous on the caller's thread, so this is exact.
    static LAST_ERROR: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// The reason of the last failed signature on this thread (see `LAST_ERROR`).
pub fn take_last_error() -> Option<String> {
    LAST_ERROR.with(|last| last.borrow_mut().take())
}

impl rcgen::PublicKeyData for RcgenKey {
    fn der_bytes(&self) -> &[u8] {
        &self.raw_public
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        match self.key.algorithm() {
            KeyAlgorithm::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            KeyAlgorithm::EcdsaP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            KeyAlgorithm::Rsa2048 | KeyAlgorithm::Rsa3072 => &rcgen::PKCS_RSA_SHA256,
        }
    }
}
