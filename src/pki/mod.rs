//! Certificates and the keys behind them: the certificate store (forward-trust CA,
//! forward-untrust CA, inbound server certificates), CA generation on the HSM, key status, and
//! leaf minting with its cache.
//!
//! Owns the inventory file `certs.json` in the state directory. Does not own where keys live:
//! a `Keyring` asks `hsm` for an `HsmKey` by label, or the vault for a software key sealed under
//! the master key, and both are used through the `keys` seam.

pub mod cache;
pub mod mint;

use std::cell::OnceCell;
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyUsagePurpose};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};

use crate::hsm::{Hsm, HsmError, HsmKey};
use crate::keys::rcgen::RcgenKey;
use crate::keys::software::SoftwareKey;
use crate::keys::{KeyAlgorithm, PrivateKey};
use crate::state::{Mode, StateDir, StateError};
use crate::vault::master::Vault;
use mint::{Ca, MintError};

const STORE_FILE: &str = "certs.json";
const STORE_VERSION: u32 = 1;

/// Errors of the certificate store.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Hsm(#[from] HsmError),
    #[error(transparent)]
    Mint(#[from] MintError),
    #[error("certificate store {path}: {reason}")]
    Store { path: String, reason: String },
    #[error("a certificate named {0:?} already exists")]
    Exists(String),
    #[error("no certificate named {0:?}")]
    NotFound(String),
    #[error("certificate name {0:?} must be 1–63 characters of letters, digits, '.', '_' or '-'")]
    BadName(String),
    #[error("creating certificate {name}: {reason}")]
    Create { name: String, reason: String },
    #[error("key of certificate {name}: {reason}")]
    Key { name: String, reason: String },
}

/// The role a CA plays in forward interception.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CaRole {
    /// Signs leaves for upstreams that validated; trusted by clients.
    ForwardTrust,
    /// Signs leaves for upstreams that failed validation; deliberately not trusted.
    ForwardUntrust,
}

impl CaRole {
    /// The role's name in the configuration, the command line, reports and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ForwardTrust => "forward-trust",
            Self::ForwardUntrust => "forward-untrust",
        }
    }
}

/// One certificate in the store.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertEntry {
    pub name: String,
    pub cert_pem: String,
    pub key: KeyLocation,
    pub algorithm: String,
    #[serde(default)]
    pub forward_trust: bool,
    #[serde(default)]
    pub forward_untrust: bool,
    #[serde(default)]
    pub inbound: Vec<String>,
}

/// Where a certificate's private key lives.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "location", rename_all = "lowercase", deny_unknown_fields)]
pub enum KeyLocation {
    /// On the HSM, found by label.
    Hsm { label: String },
    /// In software: DER (`pkcs8`, `sec1` or `pkcs1`) sealed under the master key as the
    /// vault secret `secret`. Never stored in the clear.
    Software { secret: String, format: String },
}

/// A certificate's private key, where it lives.
#[derive(Clone, Debug)]
pub enum KeyHandle {
    Hsm(Arc<HsmKey>),
    Software(Arc<SoftwareKey>),
}

impl KeyHandle {
    /// The key, to sign with.
    pub fn private_key(&self) -> Arc<dyn PrivateKey> {
        match self {
            Self::Hsm(key) => key.clone(),
            Self::Software(key) => key.clone(),
        }
    }
}

/// Where certificate keys are found: on the HSM, or in the vault (software keys), which is
/// opened on first need — asking the HSM when the master key is HSM-encrypted.
pub struct Keyring<'a> {
    state: &'a StateDir,
    hsm: Option<&'a Arc<Hsm>>,
    vault: OnceCell<Result<Option<Vault>, String>>,
}

impl<'a> Keyring<'a> {
    /// Keys of the store in `state`; `hsm` is `None` when no HSM server is configured.
    pub fn new(state: &'a StateDir, hsm: Option<&'a Arc<Hsm>>) -> Self {
        Self { state, hsm, vault: OnceCell::new() }
    }

    /// The private key behind `entry`.
    pub fn key(&self, entry: &CertEntry) -> Result<KeyHandle, PkiError> {
        let err = |reason: String| PkiError::Key { name: entry.name.clone(), reason };
        match &entry.key {
            KeyLocation::Hsm { label } => {
                let hsm = self.hsm.ok_or_else(|| err("no HSM server is configured".into()))?;
                Ok(KeyHandle::Hsm(hsm.key(label)?))
            }
            KeyLocation::Software { secret, format } => {
                let vault = self.vault.get_or_init(|| match self.hsm {
                    Some(hsm) => Vault::open(self.state, Some(&|w| hsm.unwrap_master_key(w))),
                    None => Vault::open(self.state, None),
                });
                let vault = vault.as_ref().map_err(|e| err(e.clone()))?;
                let vault = vault.as_ref().ok_or_else(|| err("no master key is stored".into()))?;
                let der = vault.secret(secret).map_err(err)?.ok_or_else(|| err("its sealed key is missing".into()))?;
                let der = key_der(format, &der).ok_or_else(|| err(format!("unknown key format {format:?}")))?;
                Ok(KeyHandle::Software(Arc::new(SoftwareKey::from_der(&der).map_err(|e| err(e.to_string()))?)))
            }
        }
    }
}

/// `der` as the `PrivateKeyDer` variant named by `format` (borrowed: the caller's buffer is
/// the one zeroized).
fn key_der<'d>(format: &str, der: &'d [u8]) -> Option<rustls::pki_types::PrivateKeyDer<'d>> {
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs1KeyDer, PrivatePkcs8KeyDer, PrivateSec1KeyDer};
    match format {
        "pkcs8" => Some(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(der))),
        "sec1" => Some(PrivateKeyDer::Sec1(PrivateSec1KeyDer::from(der))),
        "pkcs1" => Some(PrivateKeyDer::Pkcs1(PrivatePkcs1KeyDer::from(der))),
        _ => None,
    }
}

/// The name `key_der` understands for a key's DER format.
pub fn key_format(key: &rustls::pki_types::PrivateKeyDer<'_>) -> &'static str {
    use rustls::pki_types::PrivateKeyDer;
    match key {
        PrivateKeyDer::Pkcs1(_) => "pkcs1",
        PrivateKeyDer::Sec1(_) => "sec1",
        _ => "pkcs8",
    }
}

/// What a certificate is used for.
#[derive(Clone, Debug, Default)]
pub struct Roles {
    pub forward_trust: bool,
    pub forward_untrust: bool,
    /// Host names it serves on inbound listeners.
    pub inbound: Vec<String>,
}

/// `tollgate cert list --json` rows.
#[derive(Clone, Debug, Serialize)]
pub struct CertSummary {
    pub name: String,
    /// `hsm`, `software` or `error`.
    pub key: &'static str,
    /// Why `key` is `error`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub forward_trust: bool,
    pub forward_untrust: bool,
    pub inbound: Vec<String>,
    pub subject: String,
    pub not_after: String,
    pub algorithm: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoreFile {
    version: u32,
    certs: Vec<CertEntry>,
}

/// The certificate inventory.
#[derive(Debug)]
pub struct CertStore {
    state: StateDir,
    entries: Vec<CertEntry>,
}

impl CertStore {
    /// Loads the store (empty when the file does not exist yet).
    pub fn load(state: &StateDir) -> Result<Self, PkiError> {
        let path = state.path(STORE_FILE).display().to_string();
        let entries = match state.read(STORE_FILE)? {
            None => Vec::new(),
            Some(bytes) => Self::parse(&bytes).map_err(|reason| PkiError::Store { path, reason })?,
        };
        Ok(Self { state: state.clone(), entries })
    }

    /// Parses the inventory file's bytes.
    pub fn parse(bytes: &[u8]) -> Result<Vec<CertEntry>, String> {
        let file: StoreFile = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if file.version != STORE_VERSION {
            return Err(format!("unsupported version {}", file.version));
        }
        Ok(file.certs)
    }

    /// Every entry.
    pub fn entries(&self) -> &[CertEntry] {
        &self.entries
    }

    /// The entry holding a role.
    pub fn with_role(&self, role: CaRole) -> Option<&CertEntry> {
        self.entries.iter().find(|e| match role {
            CaRole::ForwardTrust => e.forward_trust,
            CaRole::ForwardUntrust => e.forward_untrust,
        })
    }

    /// Generates a CA key pair on the HSM and its self-signed certificate, and gives it `role`
    /// (taking the role from any other certificate). Holds the state lock throughout.
    pub fn generate_ca(
        state: &StateDir,
        hsm: &Arc<Hsm>,
        name: &str,
        algorithm: KeyAlgorithm,
        role: CaRole,
    ) -> Result<CertEntry, PkiError> {
        check_name(name)?;
        let _lock = state.lock()?;
        let mut store = Self::load(state)?;
        if store.entries.iter().any(|e| e.name == name) {
            return Err(PkiError::Exists(name.into()));
        }
        let key = hsm.generate(name, algorithm)?;
        let signer = RcgenKey::new(key).map_err(|e| PkiError::Create { name: name.into(), reason: e.to_string() })?;
        let cert = ca_params(name, role)
            .self_signed(&signer)
            .map_err(|e| PkiError::Create { name: name.into(), reason: e.to_string() })?;
        let entry = CertEntry {
            name: name.into(),
            cert_pem: cert.pem(),
            key: KeyLocation::Hsm { label: name.into() },
            algorithm: algorithm.as_str().into(),
            forward_trust: role == CaRole::ForwardTrust,
            forward_untrust: role == CaRole::ForwardUntrust,
            inbound: Vec::new(),
        };
        for other in &mut store.entries {
            match role {
                CaRole::ForwardTrust => other.forward_trust = false,
                CaRole::ForwardUntrust => other.forward_untrust = false,
            }
        }
        store.entries.push(entry.clone());
        store.save()?;
        Ok(entry)
    }

    /// Imports a certificate (PEM, leaf first) whose private key already resides on the HSM,
    /// found on every member by the certificate's public key (or by CKA_ID `id`), and gives it
    /// `roles`. Holds the state lock throughout.
    pub fn import_on_hsm(
        state: &StateDir,
        hsm: &Arc<Hsm>,
        name: &str,
        cert_pem: &str,
        id: Option<&[u8]>,
        roles: &Roles,
    ) -> Result<CertEntry, PkiError> {
        check_name(name)?;
        let chain = parse_chain(name, cert_pem)?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&chain[0])
            .map_err(|e| PkiError::Create { name: name.into(), reason: format!("certificate: {e}") })?;
        let label = hsm.find_key(parsed.public_key().raw, id)?;
        let key = hsm.key(&label)?;
        let entry = CertEntry {
            name: name.into(),
            cert_pem: cert_pem.to_string(),
            key: KeyLocation::Hsm { label },
            algorithm: key.algorithm().as_str().into(),
            forward_trust: roles.forward_trust,
            forward_untrust: roles.forward_untrust,
            inbound: roles.inbound.clone(),
        };
        check_key(&entry, key.as_ref()).map_err(|reason| PkiError::Create { name: name.into(), reason })?;
        Self::add(state, entry)
    }

    /// A store entry for a certificate (PEM, leaf first) and its software private key, checked
    /// against each other. The key itself is not in the entry: the caller seals it in the vault
    /// as `key_secret` before adding the entry.
    pub fn software_entry(
        name: &str,
        cert_pem: &str,
        key: &rustls::pki_types::PrivateKeyDer<'_>,
        key_secret: String,
        roles: &Roles,
    ) -> Result<CertEntry, PkiError> {
        check_name(name)?;
        let create = |reason: String| PkiError::Create { name: name.into(), reason };
        parse_chain(name, cert_pem)?;
        let software = SoftwareKey::from_der(key).map_err(|e| create(format!("private key: {e}")))?;
        let entry = CertEntry {
            name: name.into(),
            cert_pem: cert_pem.to_string(),
            key: KeyLocation::Software { secret: key_secret, format: key_format(key).into() },
            algorithm: software.algorithm().as_str().into(),
            forward_trust: roles.forward_trust,
            forward_untrust: roles.forward_untrust,
            inbound: roles.inbound.clone(),
        };
        check_key(&entry, &software).map_err(create)?;
        Ok(entry)
    }

    /// Whether a certificate named `name` exists.
    pub fn contains(&self, name: &str) -> bool {
        self.entries.iter().any(|e| e.name == name)
    }

    /// Adds a checked entry, taking its roles from any other certificate. Holds the state lock.
    pub fn add(state: &StateDir, entry: CertEntry) -> Result<CertEntry, PkiError> {
        let _lock = state.lock()?;
        let mut store = Self::load(state)?;
        if store.contains(&entry.name) {
            return Err(PkiError::Exists(entry.name));
        }
        for other in &mut store.entries {
            other.forward_trust &= !entry.forward_trust;
            other.forward_untrust &= !entry.forward_untrust;
        }
        store.entries.push(entry.clone());
        store.save()?;
        Ok(entry)
    }

    /// Removes a certificate from the store (its key stays on the HSM: deleting keys is the
    /// HSM administrator's decision). Holds the state lock.
    pub fn delete(state: &StateDir, name: &str) -> Result<CertEntry, PkiError> {
        let _lock = state.lock()?;
        let mut store = Self::load(state)?;
        let i = store.entries.iter().position(|e| e.name == name).ok_or_else(|| PkiError::NotFound(name.into()))?;
        let entry = store.entries.remove(i);
        store.save()?;
        Ok(entry)
    }

    /// Loads the CA holding `role`, its key checked against its certificate.
    pub fn ca(&self, role: CaRole, keys: &Keyring<'_>) -> Result<Option<Ca>, PkiError> {
        let Some(entry) = self.with_role(role) else { return Ok(None) };
        Ok(Some(Ca::new(&entry.name, entry.cert_der()?, keys.key(entry)?)?))
    }

    /// Every certificate with its key status: `hsm` only when the key is on the token and a
    /// test signature verifies under the certificate's public key; `software` when the sealed
    /// key opens and its test signature verifies; otherwise `error` with the reason.
    pub fn summaries(&self, keys: &Keyring<'_>) -> Vec<CertSummary> {
        self.entries.iter().map(|e| e.summary(keys)).collect()
    }

    fn save(&self) -> Result<(), PkiError> {
        let file = StoreFile { version: STORE_VERSION, certs: self.entries.clone() };
        let json = serde_json::to_vec_pretty(&file).expect("the store serialises: plain strings and bools");
        self.state.write_atomic(STORE_FILE, &json, Mode::Public)?;
        Ok(())
    }
}

impl CertEntry {
    /// The certificate in DER.
    pub fn cert_der(&self) -> Result<CertificateDer<'static>, PkiError> {
        CertificateDer::from_pem_slice(self.cert_pem.as_bytes())
            .map_err(|e| PkiError::Store { path: STORE_FILE.into(), reason: format!("certificate {}: {e}", self.name) })
    }

    fn summary(&self, keys: &Keyring<'_>) -> CertSummary {
        let (subject, not_after) = self
            .cert_der()
            .ok()
            .and_then(|der| {
                let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
                let not_after = cert.validity().not_after.to_datetime();
                let not_after = not_after.format(&time::format_description::well_known::Rfc3339).ok()?;
                Some((cert.subject().to_string(), not_after))
            })
            .unwrap_or_default();
        let status = match keys.key(self) {
            Ok(key) => check_key(self, key.private_key().as_ref()),
            Err(e) => Err(match e {
                PkiError::Key { reason, .. } => reason,
                other => other.to_string(),
            }),
        };
        let location = match self.key {
            KeyLocation::Hsm { .. } => "hsm",
            KeyLocation::Software { .. } => "software",
        };
        CertSummary {
            name: self.name.clone(),
            key: if status.is_ok() { location } else { "error" },
            reason: status.err(),
            forward_trust: self.forward_trust,
            forward_untrust: self.forward_untrust,
            inbound: self.inbound.clone(),
            subject,
            not_after,
            algorithm: self.algorithm.clone(),
        }
    }
}

/// A PEM chain (leaf first) for certificate `name`: at least one certificate, each one valid
/// X.509 DER. Errors name the certificate and the position in the chain.
pub fn parse_chain(name: &str, pem: &str) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let create = |reason: String| PkiError::Create { name: name.into(), reason };
    let chain = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| create(format!("certificate PEM: {e}")))?;
    if chain.is_empty() {
        return Err(create("no certificate in the PEM".into()));
    }
    for (i, cert) in chain.iter().enumerate() {
        x509_parser::parse_x509_certificate(cert)
            .map_err(|e| create(format!("certificate {} of the chain: {e}", i + 1)))?;
    }
    Ok(chain)
}

/// Whether `key` is the key of `entry`'s certificate: same public key, and a test signature
/// verifies under the certificate.
fn check_key(entry: &CertEntry, key: &dyn PrivateKey) -> Result<(), String> {
    let der = entry.cert_der().map_err(|e| e.to_string())?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).map_err(|e| e.to_string())?;
    if cert.public_key().raw != key.public_key() {
        return Err(match entry.key {
            KeyLocation::Hsm { .. } => "the key on the HSM does not match the certificate".into(),
            KeyLocation::Software { .. } => "the private key does not match the certificate".into(),
        });
    }
    let message = b"tollgate key check";
    let sig = key.sign(key.algorithm().certificate_scheme(), message).map_err(|e| e.to_string())?;
    if verify(key.algorithm(), &cert.public_key().subject_public_key.data, message, &sig) {
        Ok(())
    } else {
        Err("test signature does not verify under the certificate".to_string())
    }
}

/// Whether `sig` is a valid signature over `message` with `algorithm`'s certificate scheme.
pub fn verify(algorithm: KeyAlgorithm, raw_public: &[u8], message: &[u8], sig: &[u8]) -> bool {
    use aws_lc_rs::signature;
    let alg: &dyn signature::VerificationAlgorithm = match algorithm {
        KeyAlgorithm::EcdsaP256 => &signature::ECDSA_P256_SHA256_ASN1,
        KeyAlgorithm::EcdsaP384 => &signature::ECDSA_P384_SHA384_ASN1,
        KeyAlgorithm::Rsa2048 | KeyAlgorithm::Rsa3072 => &signature::RSA_PKCS1_2048_8192_SHA256,
    };
    signature::UnparsedPublicKey::new(alg, raw_public).verify(message, sig).is_ok()
}

fn ca_params(name: &str, role: CaRole) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    let role_name = match role {
        CaRole::ForwardTrust => "Forward Trust",
        CaRole::ForwardUntrust => "Forward Untrust",
    };
    dn.push(DnType::CommonName, format!("tollgate {role_name} CA ({name})"));
    dn.push(DnType::OrganizationName, "tollgate");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(3650);
    let mut serial: [u8; 16] = crate::keys::random();
    serial[0] &= 0x7f;
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    params
}

fn check_name(name: &str) -> Result<(), PkiError> {
    let ok = (1..=63).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok { Ok(()) } else { Err(PkiError::BadName(name.into())) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::software::SoftwareKey;

    fn software_ca(role: CaRole) -> Ca {
        let key = Arc::new(SoftwareKey::generate(KeyAlgorithm::EcdsaP256).unwrap());
        let signer = RcgenKey::new(key.clone()).unwrap();
        let cert = ca_params("test", role).self_signed(&signer).unwrap();
        Ca::new("test", cert.der().clone(), KeyHandle::Software(key)).unwrap()
    }

    fn upstream_cert(sans: Vec<rcgen::SanType>, days: (i64, i64)) -> Vec<u8> {
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        params.distinguished_name.push(DnType::CommonName, "origin.test");
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now + time::Duration::days(days.0);
        params.not_after = now + time::Duration::days(days.1);
        // Extensions a proxy cannot honour: must-staple (TLS feature), SCT list, CRL DP, AIA.
        params.custom_extensions = vec![
            rcgen::CustomExtension::from_oid_content(&[1, 3, 6, 1, 5, 5, 7, 1, 24], vec![0x30, 0x03, 0x02, 0x01, 0x05]),
            rcgen::CustomExtension::from_oid_content(&[1, 3, 6, 1, 4, 1, 11129, 2, 4, 2], vec![0x04, 0x00]),
            rcgen::CustomExtension::from_oid_content(&[1, 3, 6, 1, 5, 5, 7, 1, 1], vec![0x30, 0x00]),
        ];
        params.crl_distribution_points =
            vec![rcgen::CrlDistributionPoint { uris: vec!["http://crl.test/x.crl".into()] }];
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn leaf_mirrors_names_and_drops_unsatisfiable_extensions() {
        let ca = software_ca(CaRole::ForwardTrust);
        let up = upstream_cert(
            vec![
                rcgen::SanType::DnsName("origin.test".try_into().unwrap()),
                rcgen::SanType::DnsName("*.origin.test".try_into().unwrap()),
                rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap()),
            ],
            (-10, 30),
        );
        let minted = ca.mint("origin.test", &up).unwrap();
        let leaf_der = &minted.certified.cert[0];
        let (_, leaf) = x509_parser::parse_x509_certificate(leaf_der).unwrap();
        let (_, upc) = x509_parser::parse_x509_certificate(&up).unwrap();
        let (_, cac) = x509_parser::parse_x509_certificate(ca.cert()).unwrap();

        let sans = leaf.subject_alternative_name().unwrap().unwrap().value.general_names.clone();
        let rendered: Vec<String> = sans.iter().map(|n| format!("{n:?}")).collect();
        assert_eq!(rendered, ["DNSName(\"origin.test\")", "DNSName(\"*.origin.test\")", "IPAddress([127, 0, 0, 1])"]);

        assert!(leaf.validity().not_before >= upc.validity().not_before);
        assert!(leaf.validity().not_before >= cac.validity().not_before);
        assert!(leaf.validity().not_after <= upc.validity().not_after);
        assert!(leaf.validity().not_after <= cac.validity().not_after);

        for ext in leaf.extensions() {
            let oid = ext.oid.to_id_string();
            assert!(
                !["1.3.6.1.5.5.7.1.24", "1.3.6.1.4.1.11129.2.4.2", "1.3.6.1.5.5.7.1.1", "2.5.29.31"]
                    .contains(&oid.as_str()),
                "unsatisfiable extension {oid} copied"
            );
        }
        assert_ne!(leaf.public_key().raw, cac.public_key().raw, "leaf key must never be the CA key");
        // The key rustls signs handshakes with is the one the leaf certifies, and it signs.
        minted.certified.keys_match().expect("served key matches the leaf");
        let signer = minted.certified.key.choose_scheme(&[rustls::SignatureScheme::ECDSA_NISTP256_SHA256]).unwrap();
        let signature = signer.sign(b"handshake transcript").unwrap();
        assert!(verify(
            KeyAlgorithm::EcdsaP256,
            &leaf.public_key().subject_public_key.data,
            b"handshake transcript",
            &signature
        ));
        assert_eq!(leaf.issuer(), cac.subject());
        let raw = &cac.public_key().subject_public_key.data;
        assert!(verify(KeyAlgorithm::EcdsaP256, raw, leaf.tbs_certificate.as_ref(), &leaf.signature_value.data));

        let again = ca.mint("origin.test", &up).unwrap();
        assert_ne!(again.certified.cert[0], *leaf_der, "every mint has a fresh key and serial");
    }

    #[test]
    fn leaf_without_sans_names_the_host() {
        let ca = software_ca(CaRole::ForwardUntrust);
        let up = upstream_cert(vec![], (-1, 1));
        let minted = ca.mint("10.1.2.3", &up).unwrap();
        let (_, leaf) = x509_parser::parse_x509_certificate(&minted.certified.cert[0]).unwrap();
        let sans = &leaf.subject_alternative_name().unwrap().unwrap().value.general_names;
        assert_eq!(format!("{:?}", sans[0]), "IPAddress([10, 1, 2, 3])");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn cached_leaves_never_outlive_their_certificate() {
        let ca = Arc::new(software_ca(CaRole::ForwardUntrust));
        let cache = cache::LeafCache::new(100);
        let mint_for = |up: Vec<u8>| {
            let ca = ca.clone();
            async move { ca.mint("origin.test", &up).map(Arc::new) }
        };
        let key = |b: u8| cache::LeafKey { host: Some("origin.test".into()), upstream: [b; 32], trusted: false };

        // A leaf valid for days is cached: the second lookup does not mint.
        let valid = upstream_cert(vec![], (-1, 10));
        let first = cache.get_or_mint(key(1), mint_for(valid.clone())).await.unwrap();
        let again = cache.get_or_mint(key(1), async { panic!("must be served from the cache") }).await.unwrap();
        assert!(Arc::ptr_eq(&first, &again));

        // A leaf that is already expired (expired upstream) is never kept.
        let expired = upstream_cert(vec![], (-10, -1));
        let leaf = cache.get_or_mint(key(2), mint_for(expired)).await.unwrap();
        assert!(leaf.not_after < time::OffsetDateTime::now_utc());
        cache.inner_sync().await;
        assert!(cache.get(&key(2)).await.is_none(), "an expired leaf must not be served from the cache");
    }

    /// Concurrent misses for one leaf charge one caller, however many wait; a caller refused
    /// by its charge gets `None`, and one that joined a refused attempt tries on its own.
    #[tokio::test(flavor = "current_thread")]
    async fn a_crowd_missing_one_leaf_is_charged_once() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let ca = Arc::new(software_ca(CaRole::ForwardUntrust));
        let up = upstream_cert(vec![], (-1, 10));
        let cache = cache::LeafCache::new(100);
        let key = |b: u8| cache::LeafKey { host: Some("origin.test".into()), upstream: [b; 32], trusted: false };
        let slow_mint = move || {
            let (ca, up) = (ca.clone(), up.clone());
            async move {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                ca.mint("origin.test", &up).map(Arc::new)
            }
        };
        // One token for the whole crowd: all twenty are served by one mint.
        let charges = Arc::new(AtomicUsize::new(0));
        let mut crowd = tokio::task::JoinSet::new();
        for _ in 0..20 {
            let (cache, charges, slow_mint) = (cache.clone(), charges.clone(), slow_mint.clone());
            crowd.spawn(async move {
                let charge = || charges.fetch_add(1, Ordering::Relaxed) < 1;
                cache.get_or_mint_charged(key(1), charge, slow_mint).await
            });
        }
        while let Some(served) = crowd.join_next().await {
            assert!(matches!(served, Ok(Ok(Some(_)))), "every caller of the crowd is served");
        }
        assert_eq!(charges.load(Ordering::Relaxed), 1, "the crowd was charged once");

        // A caller with nothing left is refused; one that joined its attempt is served on its own.
        let spent = || false;
        let (refused, joined) = tokio::join!(
            cache.get_or_mint_charged(key(2), spent, slow_mint.clone()),
            cache.get_or_mint_charged(key(2), || true, slow_mint),
        );
        assert!(matches!(refused, Ok(None)), "the caller whose charge failed is refused");
        assert!(matches!(joined, Ok(Some(_))), "the caller that joined a refused attempt mints on its own");
    }

    #[test]
    fn software_keys_must_match_their_certificate() {
        use rustls::pki_types::PrivateKeyDer;
        use rustls::pki_types::pem::PemObject;
        let pair = rcgen::KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["a.test".into()]).unwrap().self_signed(&pair).unwrap();
        let der = PrivateKeyDer::from_pem_slice(pair.serialize_pem().as_bytes()).unwrap();
        let entry = CertStore::software_entry("a", &cert.pem(), &der, "cert-key:a".into(), &Roles::default()).unwrap();
        assert_eq!(entry.key, KeyLocation::Software { secret: "cert-key:a".into(), format: "pkcs8".into() });
        let other = rcgen::KeyPair::generate().unwrap();
        let other = PrivateKeyDer::from_pem_slice(other.serialize_pem().as_bytes()).unwrap();
        let err = CertStore::software_entry("a", &cert.pem(), &other, "x".into(), &Roles::default()).unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("forward-trust.v2").is_ok());
        assert!(check_name("bad name").is_err());
        assert!(check_name("").is_err());
    }
}
