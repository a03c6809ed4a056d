//! One HSM server: its PKCS#11 library (loaded once per process, re-initialised by generation,
//! finalized at exit), its token and the logged-in anchor session that keeps the login. Signing
//! sessions are opened here but owned by the executor's workers, one per worker and connection.
//! PKCS#11 details (mechanisms, raw ECDSA re-encoded as DER, handle caching) stay in this file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as P11Error, RvError};
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsPssParams};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use parking_lot::Mutex;
use rustls::SignatureScheme;
use secrecy::SecretString;

use super::HsmError;
use super::info::{KeyEntry, LibraryInfo, TokenInfo};
use crate::config::HsmServerConfig;
use crate::keys::KeyAlgorithm;

/// A connected, logged-in token, valid for one generation of its library.
pub(super) struct Connection {
    id: u64,
    pkcs11: Pkcs11,
    module: PathBuf,
    generation: u64,
    slot: Slot,
    pub(super) serial: String,
    /// Keeps the login alive: PKCS#11 login state ends with the application's last session.
    _anchor: Mutex<OwnedSession>,
    handles: Mutex<HashMap<String, ObjectHandle>>,
}

/// A session opened without close-on-drop, closed on drop only while its library generation
/// is current: after a re-initialisation its handle number may name someone else's session.
pub(super) struct OwnedSession {
    session: Option<Session>,
    module: PathBuf,
    generation: u64,
}

impl OwnedSession {
    /// Whether the library it belongs to has not been re-initialised since.
    pub(super) fn is_live(&self) -> bool {
        generation(&self.module) == Some(self.generation)
    }
}

impl std::ops::Deref for OwnedSession {
    type Target = Session;

    fn deref(&self) -> &Session {
        self.session.as_ref().expect("present until drop")
    }
}

impl Drop for OwnedSession {
    fn drop(&mut self) {
        if let Some(session) = self.session.take()
            && self.is_live()
        {
            let _ = session.close();
        }
    }
}

/// What `public_key_from` needs to rebuild a SubjectPublicKeyInfo.
const PUBLIC_KEY_ATTRS: [AttributeType; 5] = [
    AttributeType::KeyType,
    AttributeType::EcParams,
    AttributeType::EcPoint,
    AttributeType::Modulus,
    AttributeType::PublicExponent,
];

/// A public key read from the token.
pub(super) struct PublicKeyInfo {
    pub algorithm: KeyAlgorithm,
    pub spki: Vec<u8>,
}

impl Connection {
    /// Loads the library, finds the token by label and logs in with the partition password.
    pub(super) fn open(config: &HsmServerConfig, pin: &SecretString) -> Result<Self, HsmError> {
        let (pkcs11, generation) = module(&config.module)?;
        let slot = find_slot(&pkcs11, config)?;
        let token = pkcs11.get_token_info(slot).map_err(|e| p11(config, "C_GetTokenInfo", e))?;
        let anchor = pkcs11.open_rw_session_no_drop(slot).map_err(|e| p11(config, "C_OpenSession", e))?;
        let anchor = OwnedSession { session: Some(anchor), module: config.module.clone(), generation };
        match anchor.login(UserType::User, Some(pin)) {
            Ok(()) | Err(P11Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(P11Error::Pkcs11(RvError::PinIncorrect | RvError::PinInvalid | RvError::PinLenRange, _)) => {
                return Err(HsmError::PinIncorrect { server: config.name.clone() });
            }
            Err(P11Error::Pkcs11(RvError::PinLocked, _)) => {
                return Err(HsmError::PinLocked { server: config.name.clone() });
            }
            Err(e) => return Err(p11(config, "C_Login", e)),
        }
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        Ok(Self {
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            pkcs11,
            module: config.module.clone(),
            generation,
            slot,
            serial: token.serial_number().trim().to_string(),
            _anchor: Mutex::new(anchor),
            handles: Mutex::new(HashMap::new()),
        })
    }

    /// Unique per connection (a reconnect is a new connection).
    pub(super) fn id(&self) -> u64 {
        self.id
    }

    /// The library file.
    pub(super) fn module(&self) -> &Path {
        &self.module
    }

    /// A new session (for a worker, or an administrative operation).
    pub(super) fn open_session(&self, server: &str) -> Result<OwnedSession, HsmError> {
        if generation(&self.module) != Some(self.generation) {
            return Err(HsmError::Unavailable(format!("hsm server {server}: its library was re-initialised")));
        }
        let session = self.pkcs11.open_rw_session_no_drop(self.slot).map_err(|e| p11s(server, "C_OpenSession", e))?;
        Ok(OwnedSession { session: Some(session), module: self.module.clone(), generation: self.generation })
    }

    /// Signs `message` with the private key labelled `label`, on a worker's session.
    pub(super) fn sign(
        &self,
        session: &Session,
        server: &str,
        label: &str,
        algorithm: KeyAlgorithm,
        scheme: SignatureScheme,
        message: &[u8],
    ) -> Result<Vec<u8>, HsmError> {
        let (mechanism, data) = mechanism(algorithm, scheme, message)?;
        let handle = self.private_key(server, session, label)?;
        match session.sign(&mechanism, handle, &data) {
            Ok(signature) => match algorithm {
                KeyAlgorithm::EcdsaP256 | KeyAlgorithm::EcdsaP384 => ecdsa_der(&signature),
                KeyAlgorithm::Rsa2048 | KeyAlgorithm::Rsa3072 => Ok(signature),
            },
            Err(e) => {
                // Handles change when the token reloads its objects: find the key again next time.
                if matches!(e, P11Error::Pkcs11(RvError::ObjectHandleInvalid | RvError::KeyHandleInvalid, _)) {
                    self.handles.lock().remove(label);
                }
                Err(p11s(server, "C_Sign", e))
            }
        }
    }

    /// Generates a key pair on the token: private half sensitive and never extractable.
    pub(super) fn generate(
        &self,
        server: &str,
        label: &str,
        id: &[u8],
        algorithm: KeyAlgorithm,
    ) -> Result<(), HsmError> {
        let session = self.open_session(server)?;
        if !find(&session, ObjectClass::PRIVATE_KEY, label).map_err(|e| p11s(server, "C_FindObjects", e))?.is_empty() {
            return Err(HsmError::KeyExists { label: label.into() });
        }
        let common = |private: bool| {
            vec![
                Attribute::Token(true),
                Attribute::Private(private),
                Attribute::Label(label.as_bytes().to_vec()),
                Attribute::Id(id.to_vec()),
            ]
        };
        let mut public = common(false);
        public.push(Attribute::Verify(true));
        let mut private = common(true);
        // Sign only: least privilege, the token default may also allow decrypt/unwrap/derive.
        private.extend([
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(true),
            Attribute::Decrypt(false),
            Attribute::Unwrap(false),
            Attribute::Derive(false),
        ]);
        let mechanism = match (algorithm.curve_oid_der(), algorithm.rsa_bits()) {
            (Some(oid), _) => {
                public.push(Attribute::EcParams(oid.to_vec()));
                Mechanism::EccKeyPairGen
            }
            (None, Some(bits)) => {
                public.push(Attribute::ModulusBits(u64::from(bits).into()));
                public.push(Attribute::PublicExponent(vec![1, 0, 1]));
                Mechanism::RsaPkcsKeyPairGen
            }
            (None, None) => unreachable!("every algorithm is EC or RSA"),
        };
        session.generate_key_pair(&mechanism, &public, &private).map_err(|e| p11s(server, "C_GenerateKeyPair", e))?;
        Ok(())
    }

    /// Reads the public key of the private key labelled `label` (which must exist).
    pub(super) fn public_key(&self, server: &str, label: &str) -> Result<PublicKeyInfo, HsmError> {
        let session = self.open_session(server)?;
        self.private_key(server, &session, label)?;
        let handles = find(&session, ObjectClass::PUBLIC_KEY, label).map_err(|e| p11s(server, "C_FindObjects", e))?;
        let handle = single(handles, label)?;
        let attrs =
            session.get_attributes(handle, &PUBLIC_KEY_ATTRS).map_err(|e| p11s(server, "C_GetAttributeValue", e))?;
        public_key_from(label, &attrs)
    }

    /// Generates an AES-256 key on the token: sensitive, never extractable, encrypt/decrypt
    /// only (the master key's wrapping key).
    pub(super) fn generate_secret(&self, server: &str, label: &str) -> Result<(), HsmError> {
        let session = self.open_session(server)?;
        if !find(&session, ObjectClass::SECRET_KEY, label).map_err(|e| p11s(server, "C_FindObjects", e))?.is_empty() {
            return Err(HsmError::KeyExists { label: label.into() });
        }
        let template = [
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::Wrap(false),
            Attribute::Unwrap(false),
            Attribute::ValueLen(32u64.into()),
            Attribute::Label(label.as_bytes().to_vec()),
        ];
        session.generate_key(&Mechanism::AesKeyGen, &template).map_err(|e| p11s(server, "C_GenerateKey", e))?;
        Ok(())
    }

    /// AES-GCM (128-bit tag) with the secret key labelled `label`, on the token.
    pub(super) fn aes_gcm(
        &self,
        server: &str,
        label: &str,
        encrypt: bool,
        iv: &[u8; 12],
        aad: &[u8],
        data: &[u8],
    ) -> Result<Vec<u8>, HsmError> {
        let session = self.open_session(server)?;
        let handle = single(
            find(&session, ObjectClass::SECRET_KEY, label).map_err(|e| p11s(server, "C_FindObjects", e))?,
            label,
        )?;
        let mut iv = *iv;
        let params = cryptoki::mechanism::aead::GcmParams::new(&mut iv, aad, 128u64.into())
            .map_err(|e| HsmError::Malformed(format!("GCM parameters: {e}")))?;
        let mechanism = Mechanism::AesGcm(params);
        if encrypt {
            session.encrypt(&mechanism, handle, data).map_err(|e| p11s(server, "C_Encrypt", e))
        } else {
            session.decrypt(&mechanism, handle, data).map_err(|e| p11s(server, "C_Decrypt", e))
        }
    }

    /// Library, token, mechanisms and key inventory (never key material).
    pub(super) fn info(&self, server: &str) -> Result<(LibraryInfo, TokenInfo, Vec<String>, Vec<KeyEntry>), HsmError> {
        let lib = self.pkcs11.get_library_info().map_err(|e| p11s(server, "C_GetInfo", e))?;
        let library = LibraryInfo {
            manufacturer: lib.manufacturer_id().trim().to_string(),
            description: lib.library_description().trim().to_string(),
            library_version: lib.library_version().to_string(),
            cryptoki_version: lib.cryptoki_version().to_string(),
        };
        let t = self.pkcs11.get_token_info(self.slot).map_err(|e| p11s(server, "C_GetTokenInfo", e))?;
        let slot = self.pkcs11.get_slot_info(self.slot).map_err(|e| p11s(server, "C_GetSlotInfo", e))?;
        let token = TokenInfo {
            label: t.label().trim().to_string(),
            manufacturer: t.manufacturer_id().trim().to_string(),
            model: t.model().trim().to_string(),
            serial: t.serial_number().trim().to_string(),
            hardware_version: t.hardware_version().to_string(),
            firmware_version: t.firmware_version().to_string(),
            slot_description: slot.slot_description().trim().to_string(),
            sessions: t.session_count(),
            max_sessions: format!("{:?}", t.max_session_count()),
            rw_sessions: t.rw_session_count(),
            free_public_memory: t.free_public_memory(),
            total_public_memory: t.total_public_memory(),
            free_private_memory: t.free_private_memory(),
            total_private_memory: t.total_private_memory(),
            user_pin_locked: t.user_pin_locked(),
            user_pin_count_low: t.user_pin_count_low(),
        };
        let mechanisms = self
            .pkcs11
            .get_mechanism_list(self.slot)
            .map_err(|e| p11s(server, "C_GetMechanismList", e))?
            .iter()
            .map(|m| m.to_string())
            .collect();
        Ok((library, token, mechanisms, self.keys(server)?))
    }

    /// Every key object: label, id, class, type and protection flags.
    pub(super) fn keys(&self, server: &str) -> Result<Vec<KeyEntry>, HsmError> {
        let session = self.open_session(server)?;
        let mut out = Vec::new();
        for (class, name) in [
            (ObjectClass::PRIVATE_KEY, "private"),
            (ObjectClass::PUBLIC_KEY, "public"),
            (ObjectClass::SECRET_KEY, "secret"),
        ] {
            let handles =
                session.find_objects(&[Attribute::Class(class)]).map_err(|e| p11s(server, "C_FindObjects", e))?;
            for handle in handles {
                let mut wanted = vec![AttributeType::Label, AttributeType::Id, AttributeType::KeyType];
                if class != ObjectClass::PUBLIC_KEY {
                    wanted.extend([AttributeType::Sensitive, AttributeType::Extractable]);
                }
                let attrs =
                    session.get_attributes(handle, &wanted).map_err(|e| p11s(server, "C_GetAttributeValue", e))?;
                let mut entry = KeyEntry {
                    label: String::new(),
                    id: String::new(),
                    class: name,
                    key_type: String::new(),
                    sensitive: None,
                    extractable: None,
                };
                for attr in attrs {
                    match attr {
                        Attribute::Label(v) => entry.label = String::from_utf8_lossy(&v).into_owned(),
                        Attribute::Id(v) => entry.id = crate::hex::encode(&v),
                        Attribute::KeyType(t) => entry.key_type = format!("{t}"),
                        Attribute::Sensitive(b) => entry.sensitive = Some(b),
                        Attribute::Extractable(b) => entry.extractable = Some(b),
                        _ => {}
                    }
                }
                out.push(entry);
            }
        }
        Ok(out)
    }

    /// The label of the private key whose public key is `spki` (matched through the public key
    /// object with the same CKA_ID), or whose CKA_ID is `id`.
    pub(super) fn find_key(&self, server: &str, spki: &[u8], id: Option<&[u8]>) -> Result<String, HsmError> {
        let session = self.open_session(server)?;
        let ids: Vec<Vec<u8>> = match id {
            Some(id) => vec![id.to_vec()],
            None => {
                let mut ids = Vec::new();
                let publics = session
                    .find_objects(&[Attribute::Class(ObjectClass::PUBLIC_KEY)])
                    .map_err(|e| p11s(server, "C_FindObjects", e))?;
                for handle in publics {
                    let mut wanted = PUBLIC_KEY_ATTRS.to_vec();
                    wanted.push(AttributeType::Id);
                    let attrs =
                        session.get_attributes(handle, &wanted).map_err(|e| p11s(server, "C_GetAttributeValue", e))?;
                    let matches = public_key_from("(candidate)", &attrs).is_ok_and(|info| info.spki == spki);
                    if matches {
                        ids.extend(
                            attrs.into_iter().filter_map(|a| if let Attribute::Id(v) = a { Some(v) } else { None }),
                        );
                    }
                }
                ids
            }
        };
        for id in ids {
            let privates = session
                .find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY), Attribute::Id(id.clone())])
                .map_err(|e| p11s(server, "C_FindObjects", e))?;
            let Some(handle) = privates.first() else { continue };
            let attrs = session
                .get_attributes(*handle, &[AttributeType::Label])
                .map_err(|e| p11s(server, "C_GetAttributeValue", e))?;
            if let Some(Attribute::Label(label)) = attrs.into_iter().next() {
                return Ok(String::from_utf8_lossy(&label).into_owned());
            }
        }
        Err(HsmError::KeyNotFound { label: format!("(matching the certificate's public key on {server})") })
    }

    fn private_key(&self, server: &str, session: &Session, label: &str) -> Result<ObjectHandle, HsmError> {
        if let Some(handle) = self.handles.lock().get(label) {
            return Ok(*handle);
        }
        let handles = find(session, ObjectClass::PRIVATE_KEY, label).map_err(|e| p11s(server, "C_FindObjects", e))?;
        let handle = single(handles, label)?;
        self.handles.lock().insert(label.to_string(), handle);
        Ok(handle)
    }
}

/// Initialises a token in a free slot with `label`, sets its SO PIN and user PIN. For software
/// tokens (SoftHSM) in development and tests; hardware partitions are initialised with the
/// vendor's tools.
pub(super) fn init_token(
    config: &HsmServerConfig,
    so_pin: &SecretString,
    user_pin: &SecretString,
) -> Result<(), HsmError> {
    let (pkcs11, _) = module(&config.module)?;
    if find_slot(&pkcs11, config).is_ok() {
        return Err(HsmError::TokenExists { server: config.name.clone(), token: config.token.clone() });
    }
    let slots = pkcs11.get_all_slots().map_err(|e| p11(config, "C_GetSlotList", e))?;
    let free = slots
        .into_iter()
        .find(|slot| pkcs11.get_token_info(*slot).is_ok_and(|info| !info.token_initialized()))
        .ok_or_else(|| HsmError::Pkcs11 {
            server: config.name.clone(),
            operation: "C_InitToken",
            reason: "no free slot".into(),
            code: None,
        })?;
    pkcs11.init_token(free, so_pin, &config.token).map_err(|e| p11(config, "C_InitToken", e))?;
    // SoftHSM moves an initialised token to a new slot id: find it again by label.
    let slot = find_slot(&pkcs11, config)?;
    let session = pkcs11.open_rw_session(slot).map_err(|e| p11(config, "C_OpenSession", e))?;
    session.login(UserType::So, Some(so_pin)).map_err(|e| p11(config, "C_Login(SO)", e))?;
    session.init_pin(user_pin).map_err(|e| p11(config, "C_InitPIN", e))?;
    Ok(())
}

/// Checks the administrator password (SO PIN) by logging in as SO and out again.
pub(super) fn check_so_pin(config: &HsmServerConfig, so_pin: &SecretString) -> Result<(), HsmError> {
    let (pkcs11, _) = module(&config.module)?;
    let slot = find_slot(&pkcs11, config)?;
    let session = pkcs11.open_rw_session(slot).map_err(|e| p11(config, "C_OpenSession", e))?;
    match session.login(UserType::So, Some(so_pin)) {
        Ok(()) => {
            let _ = session.logout();
            Ok(())
        }
        Err(P11Error::Pkcs11(RvError::PinIncorrect | RvError::PinInvalid | RvError::PinLenRange, _)) => {
            Err(HsmError::SoPinIncorrect { server: config.name.clone() })
        }
        Err(e) => Err(p11(config, "C_Login(SO)", e)),
    }
}

/// One `Pkcs11` per library file per process (`C_Initialize` may run only once), with the
/// generation it is in: re-initialisation (finalize, initialize) starts a new one, and handles
/// and sessions from before are never used again.
struct Module {
    pkcs11: Pkcs11,
    generation: u64,
}

fn modules() -> &'static Mutex<HashMap<PathBuf, Module>> {
    static MODULES: OnceLock<Mutex<HashMap<PathBuf, Module>>> = OnceLock::new();
    MODULES.get_or_init(Default::default)
}

fn module(path: &Path) -> Result<(Pkcs11, u64), HsmError> {
    let mut modules = modules().lock();
    if let Some(m) = modules.get(path) {
        return Ok((m.pkcs11.clone(), m.generation));
    }
    let pkcs11 = load(path)?;
    modules.insert(path.to_path_buf(), Module { pkcs11: pkcs11.clone(), generation: 1 });
    Ok((pkcs11, 1))
}

fn load(path: &Path) -> Result<Pkcs11, HsmError> {
    let load_err = |reason: String| HsmError::ModuleLoad { module: path.to_path_buf(), reason };
    if !path.exists() {
        return Err(load_err("file not found".into()));
    }
    let pkcs11 = Pkcs11::new(path).map_err(|e| load_err(e.to_string()))?;
    match pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(P11Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => Ok(pkcs11),
        Err(e) => Err(load_err(format!("C_Initialize: {}", rv(&e)))),
    }
}

/// The current generation of a loaded library.
fn generation(path: &Path) -> Option<u64> {
    modules().lock().get(path).map(|m| m.generation)
}

/// Finalizes every loaded library (C_Finalize) as the process ends, once no thread calls into
/// them (see `shutdown`). Their sessions are no longer live afterwards: none is closed again.
pub(super) fn finalize_all() {
    let loaded: Vec<(PathBuf, Module)> = modules().lock().drain().collect();
    for (path, module) in loaded {
        if let Err(e) = module.pkcs11.finalize() {
            tracing::warn!(module = %path.display(), error = %rv(&e), "C_Finalize failed");
        }
    }
}

/// Re-initialises a library (C_Finalize, C_Initialize): what a network HSM's client library
/// needs after its link dropped. Every connection of the old generation is dead after this.
pub(super) fn reinitialise(path: &Path) -> Result<(), HsmError> {
    let mut modules = modules().lock();
    let generation = match modules.remove(path) {
        Some(old) => {
            let _ = old.pkcs11.finalize();
            old.generation + 1
        }
        None => 1,
    };
    let pkcs11 = load(path)?;
    modules.insert(path.to_path_buf(), Module { pkcs11, generation });
    Ok(())
}

fn find_slot(pkcs11: &Pkcs11, config: &HsmServerConfig) -> Result<Slot, HsmError> {
    let slots = pkcs11.get_slots_with_token().map_err(|e| p11(config, "C_GetSlotList", e))?;
    for slot in slots {
        let Ok(info) = pkcs11.get_token_info(slot) else { continue };
        if info.label().trim_end() == config.token {
            return Ok(slot);
        }
    }
    Err(HsmError::TokenNotFound { server: config.name.clone(), token: config.token.clone() })
}

fn find(session: &Session, class: ObjectClass, label: &str) -> cryptoki::error::Result<Vec<ObjectHandle>> {
    session.find_objects(&[Attribute::Class(class), Attribute::Label(label.as_bytes().to_vec())])
}

fn single(handles: Vec<ObjectHandle>, label: &str) -> Result<ObjectHandle, HsmError> {
    match handles.as_slice() {
        [one] => Ok(*one),
        [] => Err(HsmError::KeyNotFound { label: label.into() }),
        _ => Err(HsmError::KeyAmbiguous { label: label.into(), count: handles.len() }),
    }
}

/// PKCS#11 mechanism and input for a scheme. ECDSA is hashed here and signed raw
/// (`CKM_ECDSA`): SoftHSM and many HSMs lack `CKM_ECDSA_SHA*`.
fn mechanism(
    algorithm: KeyAlgorithm,
    scheme: SignatureScheme,
    message: &[u8],
) -> Result<(Mechanism<'static>, Vec<u8>), HsmError> {
    use aws_lc_rs::digest;
    let unsupported = || HsmError::Unsupported { algorithm, scheme };
    Ok(match (algorithm, scheme) {
        (KeyAlgorithm::EcdsaP256, SignatureScheme::ECDSA_NISTP256_SHA256) => {
            (Mechanism::Ecdsa, digest::digest(&digest::SHA256, message).as_ref().to_vec())
        }
        (KeyAlgorithm::EcdsaP384, SignatureScheme::ECDSA_NISTP384_SHA384) => {
            (Mechanism::Ecdsa, digest::digest(&digest::SHA384, message).as_ref().to_vec())
        }
        (KeyAlgorithm::Rsa2048 | KeyAlgorithm::Rsa3072, SignatureScheme::RSA_PKCS1_SHA256) => {
            (Mechanism::Sha256RsaPkcs, message.to_vec())
        }
        (KeyAlgorithm::Rsa2048 | KeyAlgorithm::Rsa3072, SignatureScheme::RSA_PSS_SHA256) => (
            Mechanism::Sha256RsaPkcsPss(PkcsPssParams {
                hash_alg: MechanismType::SHA256,
                mgf: PkcsMgfType::MGF1_SHA256,
                s_len: 32u64.into(),
            }),
            message.to_vec(),
        ),
        _ => return Err(unsupported()),
    })
}

/// Raw `r‖s` (PKCS#11) → DER `ECDSA-Sig-Value` (X.509 and TLS).
fn ecdsa_der(raw: &[u8]) -> Result<Vec<u8>, HsmError> {
    if raw.is_empty() || !raw.len().is_multiple_of(2) {
        return Err(HsmError::Malformed(format!("ECDSA signature of {} bytes", raw.len())));
    }
    let (r, s) = raw.split_at(raw.len() / 2);
    let int = |v: &[u8]| num_bigint_free(v);
    Ok(yasna::construct_der(|w| {
        w.write_sequence(|w| {
            w.next().write_biguint_bytes(&int(r));
            w.next().write_biguint_bytes(&int(s));
        })
    }))
}

/// Strips leading zero bytes (DER INTEGER encoding adds the sign byte back).
fn num_bigint_free(v: &[u8]) -> Vec<u8> {
    let start = v.iter().position(|b| *b != 0).unwrap_or(v.len().saturating_sub(1));
    v[start..].to_vec()
}

trait WriteBigUint {
    fn write_biguint_bytes(self, magnitude: &[u8]);
}

impl WriteBigUint for yasna::DERWriter<'_> {
    fn write_biguint_bytes(self, magnitude: &[u8]) {
        // An unsigned magnitude as a DER INTEGER: prefix 0x00 when the high bit is set.
        let mut bytes = Vec::with_capacity(magnitude.len() + 1);
        if magnitude.first().is_some_and(|b| b & 0x80 != 0) {
            bytes.push(0);
        }
        bytes.extend_from_slice(magnitude);
        if bytes.is_empty() {
            bytes.push(0);
        }
        self.write_der(&der_tlv(0x02, &bytes));
    }
}

fn der_tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len() - 1);
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(content);
    out
}

fn public_key_from(label: &str, attrs: &[Attribute]) -> Result<PublicKeyInfo, HsmError> {
    let malformed = |what: &str| HsmError::Malformed(format!("public key {label}: {what}"));
    let mut key_type = None;
    let (mut params, mut point, mut modulus, mut exponent) = (None, None, None, None);
    for attr in attrs {
        match attr {
            Attribute::KeyType(t) => key_type = Some(*t),
            Attribute::EcParams(v) => params = Some(v.as_slice()),
            Attribute::EcPoint(v) => point = Some(v.as_slice()),
            Attribute::Modulus(v) => modulus = Some(v.as_slice()),
            Attribute::PublicExponent(v) => exponent = Some(v.as_slice()),
            _ => {}
        }
    }
    match key_type {
        Some(KeyType::EC) => {
            let params = params.ok_or_else(|| malformed("no CKA_EC_PARAMS"))?;
            let algorithm = [KeyAlgorithm::EcdsaP256, KeyAlgorithm::EcdsaP384]
                .into_iter()
                .find(|a| a.curve_oid_der() == Some(params))
                .ok_or_else(|| malformed("unsupported curve"))?;
            let point = point.ok_or_else(|| malformed("no CKA_EC_POINT"))?;
            // CKA_EC_POINT is a DER OCTET STRING around the uncompressed point.
            let raw = yasna::parse_der(point, |r| r.read_bytes())
                .map_err(|_| malformed("CKA_EC_POINT is not an OCTET STRING"))?;
            Ok(PublicKeyInfo { algorithm, spki: algorithm.spki_der(&raw) })
        }
        Some(KeyType::RSA) => {
            let modulus = modulus.ok_or_else(|| malformed("no CKA_MODULUS"))?;
            let exponent = exponent.ok_or_else(|| malformed("no CKA_PUBLIC_EXPONENT"))?;
            let algorithm = match num_bigint_free(modulus).len() * 8 {
                2048 => KeyAlgorithm::Rsa2048,
                3072 => KeyAlgorithm::Rsa3072,
                bits => return Err(malformed(&format!("unsupported RSA size {bits}"))),
            };
            let raw = yasna::construct_der(|w| {
                w.write_sequence(|w| {
                    w.next().write_biguint_bytes(&num_bigint_free(modulus));
                    w.next().write_biguint_bytes(&num_bigint_free(exponent));
                })
            });
            Ok(PublicKeyInfo { algorithm, spki: algorithm.spki_der(&raw) })
        }
        _ => Err(malformed("unsupported key type")),
    }
}

/// The PKCS#11 return value only; cryptoki's `Display` prints a paragraph of the spec.
fn rv(e: &P11Error) -> String {
    match e {
        P11Error::Pkcs11(rv, function) => format!("{function:?}: CKR_{}", screaming(&format!("{rv:?}"))),
        other => other.to_string(),
    }
}

fn screaming(camel: &str) -> String {
    let mut out = String::with_capacity(camel.len() + 8);
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

fn p11(config: &HsmServerConfig, operation: &'static str, e: P11Error) -> HsmError {
    p11s(&config.name, operation, e)
}

fn p11s(server: &str, operation: &'static str, e: P11Error) -> HsmError {
    let code = match &e {
        P11Error::Pkcs11(rv, _) => Some(*rv),
        _ => None,
    };
    HsmError::Pkcs11 { server: server.into(), operation, reason: rv(&e), code }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_ecdsa_becomes_der_that_verifies() {
        use aws_lc_rs::rand::SystemRandom;
        use aws_lc_rs::signature::{self, EcdsaKeyPair, KeyPair, UnparsedPublicKey};
        let key = EcdsaKeyPair::generate(&signature::ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
        // Many signatures, so r or s with a high bit set or a leading zero byte occur.
        for i in 0..64u8 {
            let msg = [i; 7];
            let raw = key.sign(&SystemRandom::new(), &msg).unwrap();
            let der = ecdsa_der(raw.as_ref()).unwrap();
            UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_ASN1, key.public_key().as_ref())
                .verify(&msg, &der)
                .unwrap();
        }
        assert!(ecdsa_der(&[1, 2, 3]).is_err());
    }

    #[test]
    fn der_integers_are_minimal_and_positive() {
        let mut raw = vec![0u8; 64];
        raw[0] = 0x80;
        raw[63] = 0x01;
        let der = ecdsa_der(&raw).unwrap();
        // SEQUENCE { INTEGER 00 80 00…(33 bytes), INTEGER 01 }
        assert_eq!(&der[..4], &[0x30, 0x26, 0x02, 0x21]);
        assert_eq!(der[4], 0x00);
        assert_eq!(&der[der.len() - 3..], &[0x02, 0x01, 0x01]);
    }

    #[test]
    fn error_names_are_short() {
        assert_eq!(screaming("PinIncorrect"), "PIN_INCORRECT");
    }
}
