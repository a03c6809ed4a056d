//! Keys held in process memory (aws-lc-rs): leaf keys, and CA keys the operator chose to keep
//! in software. Sealing them at rest belongs to the vault, not here.

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::KeySize;
use aws_lc_rs::signature::{self, EcdsaKeyPair, KeyPair, RsaKeyPair};
use rustls::SignatureScheme;
use rustls::pki_types::PrivateKeyDer;

use super::{KeyAlgorithm, KeyError, PrivateKey};

/// A private key in memory.
pub struct SoftwareKey {
    algorithm: KeyAlgorithm,
    spki: Vec<u8>,
    inner: Inner,
}

enum Inner {
    Ecdsa(EcdsaKeyPair),
    Rsa(RsaKeyPair),
}

impl SoftwareKey {
    /// Generates a fresh key.
    pub fn generate(algorithm: KeyAlgorithm) -> Result<Self, KeyError> {
        let invalid = |e: aws_lc_rs::error::Unspecified| KeyError::Invalid(e.to_string());
        let inner = match algorithm {
            KeyAlgorithm::EcdsaP256 | KeyAlgorithm::EcdsaP384 => {
                Inner::Ecdsa(EcdsaKeyPair::generate(ecdsa_alg(algorithm)).map_err(invalid)?)
            }
            KeyAlgorithm::Rsa2048 => Inner::Rsa(RsaKeyPair::generate(KeySize::Rsa2048).map_err(invalid)?),
            KeyAlgorithm::Rsa3072 => Inner::Rsa(RsaKeyPair::generate(KeySize::Rsa3072).map_err(invalid)?),
        };
        Ok(Self::from_inner(algorithm, inner))
    }

    /// Loads a key from DER: PKCS#8, SEC1 (EC) or PKCS#1 (RSA). Supported: ECDSA P-256/P-384,
    /// RSA 2048/3072.
    pub fn from_der(key: &PrivateKeyDer<'_>) -> Result<Self, KeyError> {
        let rejected = |e: aws_lc_rs::error::KeyRejected| KeyError::Invalid(e.to_string());
        let ec = |der: &[u8]| {
            [KeyAlgorithm::EcdsaP256, KeyAlgorithm::EcdsaP384]
                .into_iter()
                .find_map(|alg| EcdsaKeyPair::from_private_key_der(ecdsa_alg(alg), der).ok().map(|k| (alg, k)))
        };
        let rsa = |key: RsaKeyPair| {
            let algorithm = match key.public_modulus_len() * 8 {
                2048 => KeyAlgorithm::Rsa2048,
                3072 => KeyAlgorithm::Rsa3072,
                bits => return Err(KeyError::Invalid(format!("RSA-{bits} keys are not supported (2048 or 3072)"))),
            };
            Ok(Self::from_inner(algorithm, Inner::Rsa(key)))
        };
        match key {
            PrivateKeyDer::Pkcs1(der) => rsa(RsaKeyPair::from_der(der.secret_pkcs1_der()).map_err(rejected)?),
            PrivateKeyDer::Sec1(der) => {
                let (alg, key) = ec(der.secret_sec1_der())
                    .ok_or_else(|| KeyError::Invalid("EC key is not on P-256 or P-384".into()))?;
                Ok(Self::from_inner(alg, Inner::Ecdsa(key)))
            }
            PrivateKeyDer::Pkcs8(der) => match ec(der.secret_pkcs8_der()) {
                Some((alg, key)) => Ok(Self::from_inner(alg, Inner::Ecdsa(key))),
                None => rsa(RsaKeyPair::from_pkcs8(der.secret_pkcs8_der())
                    .map_err(|_| KeyError::Invalid("PKCS#8 key is neither ECDSA P-256/P-384 nor RSA".into()))?),
            },
            _ => Err(KeyError::Invalid("unsupported private key format".into())),
        }
    }

    fn from_inner(algorithm: KeyAlgorithm, inner: Inner) -> Self {
        let raw = match &inner {
            Inner::Ecdsa(k) => k.public_key().as_ref().to_vec(),
            Inner::Rsa(k) => k.public_key().as_ref().to_vec(),
        };
        Self { algorithm, spki: algorithm.spki_der(&raw), inner }
    }
}

impl PrivateKey for SoftwareKey {
    fn algorithm(&self) -> KeyAlgorithm {
        self.algorithm
    }

    fn public_key(&self) -> &[u8] {
        &self.spki
    }

    fn sign(&self, scheme: SignatureScheme, message: &[u8]) -> Result<Vec<u8>, KeyError> {
        let unsupported = KeyError::Unsupported { algorithm: self.algorithm, scheme };
        let failed = |e: aws_lc_rs::error::Unspecified| KeyError::Invalid(e.to_string());
        let rng = SystemRandom::new();
        match &self.inner {
            Inner::Ecdsa(key) => {
                if scheme != self.algorithm.certificate_scheme() {
                    return Err(unsupported);
                }
                Ok(key.sign(&rng, message).map_err(failed)?.as_ref().to_vec())
            }
            Inner::Rsa(key) => {
                let padding: &dyn signature::RsaEncoding = match scheme {
                    SignatureScheme::RSA_PKCS1_SHA256 => &signature::RSA_PKCS1_SHA256,
                    SignatureScheme::RSA_PSS_SHA256 => &signature::RSA_PSS_SHA256,
                    _ => return Err(unsupported),
                };
                let mut sig = vec![0; key.public_modulus_len()];
                key.sign(padding, &rng, message, &mut sig).map_err(failed)?;
                Ok(sig)
            }
        }
    }
}

impl std::fmt::Debug for SoftwareKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftwareKey").field("algorithm", &self.algorithm).finish_non_exhaustive()
    }
}

fn ecdsa_alg(algorithm: KeyAlgorithm) -> &'static signature::EcdsaSigningAlgorithm {
    match algorithm {
        KeyAlgorithm::EcdsaP384 => &signature::ECDSA_P384_SHA384_ASN1_SIGNING,
        _ => &signature::ECDSA_P256_SHA256_ASN1_SIGNING,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::signature::UnparsedPublicKey;

    #[test]
    fn signatures_verify_under_the_spki() {
        for (alg, verify) in [
            (KeyAlgorithm::EcdsaP256, &signature::ECDSA_P256_SHA256_ASN1 as &dyn signature::VerificationAlgorithm),
            (KeyAlgorithm::EcdsaP384, &signature::ECDSA_P384_SHA384_ASN1),
            (KeyAlgorithm::Rsa2048, &signature::RSA_PKCS1_2048_8192_SHA256),
        ] {
            let key = SoftwareKey::generate(alg).unwrap();
            let sig = key.sign(alg.certificate_scheme(), b"hello").unwrap();
            let raw = crate::keys::spki_raw(key.public_key()).unwrap();
            UnparsedPublicKey::new(verify, raw).verify(b"hello", &sig).unwrap();
        }
    }

    #[test]
    fn keys_load_from_every_der_format() {
        use rcgen::PublicKeyData;
        use rustls::pki_types::pem::PemObject;
        for alg in [&rcgen::PKCS_ECDSA_P256_SHA256, &rcgen::PKCS_ECDSA_P384_SHA384, &rcgen::PKCS_RSA_SHA256] {
            let pair = rcgen::KeyPair::generate_for(alg).unwrap();
            let der = PrivateKeyDer::from_pem_slice(pair.serialize_pem().as_bytes()).unwrap();
            let key = SoftwareKey::from_der(&der).unwrap();
            assert_eq!(key.public_key(), pair.subject_public_key_info(), "{alg:?}");
        }
        let garbage = PrivateKeyDer::Pkcs8(vec![0x30, 0x03, 0x02, 0x01, 0x00].into());
        assert!(SoftwareKey::from_der(&garbage).is_err());
    }
}
