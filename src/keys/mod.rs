//! The key seam: what a private key can do, wherever it lives.
//!
//! Owns the `PrivateKey` trait, the algorithms tollgate supports and the SubjectPublicKeyInfo
//! encoding. It knows nothing of PKCS#11 (that stays in `hsm`), of rustls configs or of rcgen
//! parameters; `rcgen.rs` is the thin adapter that lets rcgen sign through any `PrivateKey`.

pub mod rcgen;
pub mod rustls;
pub mod software;

use std::fmt;

use ::rustls::SignatureScheme;

/// Key types tollgate can create and use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KeyAlgorithm {
    EcdsaP256,
    EcdsaP384,
    Rsa2048,
    Rsa3072,
}

/// Errors from signing or loading a key.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{algorithm} key cannot sign with {scheme:?}")]
    Unsupported { algorithm: KeyAlgorithm, scheme: SignatureScheme },
    #[error("key {key}: {source}")]
    Backend {
        key: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("invalid key material: {0}")]
    Invalid(String),
}

/// A private key that can sign but never reveals its material.
pub trait PrivateKey: fmt::Debug + Send + Sync {
    /// The key's type.
    fn algorithm(&self) -> KeyAlgorithm;
    /// DER SubjectPublicKeyInfo.
    fn public_key(&self) -> &[u8];
    /// Signs `message` (not pre-hashed) with `scheme`. Blocking: rcgen and rustls call it
    /// synchronously. How a key that lives elsewhere waits (an HSM's) is that key's business.
    fn sign(&self, scheme: SignatureScheme, message: &[u8]) -> Result<Vec<u8>, KeyError>;
}

impl KeyAlgorithm {
    /// Every algorithm, for help texts.
    pub const ALL: [Self; 4] = [Self::EcdsaP256, Self::EcdsaP384, Self::Rsa2048, Self::Rsa3072];

    /// The scheme used when this key signs certificates.
    pub fn certificate_scheme(self) -> SignatureScheme {
        match self {
            Self::EcdsaP256 => SignatureScheme::ECDSA_NISTP256_SHA256,
            Self::EcdsaP384 => SignatureScheme::ECDSA_NISTP384_SHA384,
            Self::Rsa2048 | Self::Rsa3072 => SignatureScheme::RSA_PKCS1_SHA256,
        }
    }

    /// The stable name used in config, CLI and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EcdsaP256 => "ecdsa-p256",
            Self::EcdsaP384 => "ecdsa-p384",
            Self::Rsa2048 => "rsa-2048",
            Self::Rsa3072 => "rsa-3072",
        }
    }

    /// RSA modulus size, `None` for EC keys.
    pub fn rsa_bits(self) -> Option<u32> {
        match self {
            Self::Rsa2048 => Some(2048),
            Self::Rsa3072 => Some(3072),
            Self::EcdsaP256 | Self::EcdsaP384 => None,
        }
    }

    /// DER of the named-curve OID, `None` for RSA.
    pub fn curve_oid_der(self) -> Option<&'static [u8]> {
        match self {
            Self::EcdsaP256 => Some(&[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07]),
            Self::EcdsaP384 => Some(&[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22]),
            Self::Rsa2048 | Self::Rsa3072 => None,
        }
    }

    /// Encodes a SubjectPublicKeyInfo from the raw public key: the uncompressed EC point, or
    /// the PKCS#1 `RSAPublicKey` DER.
    pub fn spki_der(self, raw: &[u8]) -> Vec<u8> {
        const EC_PUBLIC_KEY: &[u64] = &[1, 2, 840, 10045, 2, 1];
        const RSA_ENCRYPTION: &[u64] = &[1, 2, 840, 113549, 1, 1, 1];
        yasna::construct_der(|w| {
            w.write_sequence(|w| {
                w.next().write_sequence(|w| match self {
                    Self::EcdsaP256 | Self::EcdsaP384 => {
                        w.next().write_oid(&yasna::models::ObjectIdentifier::from_slice(EC_PUBLIC_KEY));
                        let curve: &[u64] = match self {
                            Self::EcdsaP256 => &[1, 2, 840, 10045, 3, 1, 7],
                            _ => &[1, 3, 132, 0, 34],
                        };
                        w.next().write_oid(&yasna::models::ObjectIdentifier::from_slice(curve));
                    }
                    Self::Rsa2048 | Self::Rsa3072 => {
                        w.next().write_oid(&yasna::models::ObjectIdentifier::from_slice(RSA_ENCRYPTION));
                        w.next().write_null();
                    }
                });
                w.next().write_bitvec_bytes(raw, raw.len() * 8);
            })
        })
    }
}

impl std::str::FromStr for KeyAlgorithm {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|a| a.as_str() == s).ok_or_else(|| {
            let names: Vec<_> = Self::ALL.iter().map(|a| a.as_str()).collect();
            format!("unknown key algorithm {s:?} (expected one of {})", names.join(", "))
        })
    }
}

impl fmt::Display for KeyAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// SHA-256 of `bytes` (certificate fingerprints).
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
    digest.as_ref().try_into().expect("SHA-256 is 32 bytes")
}

/// `N` bytes from the system's cryptographic generator (aws-lc-rs): the one source of
/// randomness for keys, nonces, IVs and serial numbers.
pub fn random<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    aws_lc_rs::rand::fill(&mut bytes).expect("the system random generator never fails once initialised");
    bytes
}

/// Extracts the subjectPublicKey bits from a SubjectPublicKeyInfo.
pub fn spki_raw(spki: &[u8]) -> Result<Vec<u8>, KeyError> {
    use x509_parser::prelude::FromDer;
    let (_, info) = x509_parser::x509::SubjectPublicKeyInfo::from_der(spki)
        .map_err(|e| KeyError::Invalid(format!("SubjectPublicKeyInfo: {e}")))?;
    Ok(info.subject_public_key.data.to_vec())
}
