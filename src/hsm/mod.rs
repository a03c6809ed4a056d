//! PKCS#11 through cryptoki: the HSM servers of the configuration, seen by the rest of
//! tollgate as one `Hsm` that finds, generates and signs with keys that never leave it.
//!
//! Owns module loading, token lookup, login, sessions and the PKCS#11 mechanism details.
//! Does not own which key is used for what (that is `pki`) or where PINs are stored (`config`).

mod member;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use parking_lot::RwLock;
use rustls::SignatureScheme;
use serde::Serialize;

use crate::config::HsmServerConfig;
use crate::keys::{KeyAlgorithm, KeyError, PrivateKey};
use crate::telemetry::METRICS;
use member::Connection;

/// Errors from the HSM.
#[derive(Debug, thiserror::Error)]
pub enum HsmError {
    #[error("PKCS#11 library {module} could not be loaded: {reason}")]
    ModuleLoad { module: PathBuf, reason: String },
    #[error("hsm server {server}: no token labelled {token:?}")]
    TokenNotFound { server: String, token: String },
    #[error(
        "hsm server {server}: partition password (user PIN) is incorrect; not retrying, tokens lock after repeated failures"
    )]
    PinIncorrect { server: String },
    #[error("hsm server {server}: partition password (user PIN) is locked")]
    PinLocked { server: String },
    #[error("hsm server {server}: no partition password configured (set pin_file or pin_env)")]
    NoPin { server: String },
    #[error("hsm server {server}: {reason}")]
    Secret { server: String, reason: String },
    #[error("hsm server {server}: {operation} failed: {reason}")]
    Pkcs11 { server: String, operation: &'static str, reason: String },
    #[error("hsm server {server}: a token labelled {token:?} already exists")]
    TokenExists { server: String, token: String },
    #[error("no private key labelled {label:?} on the token")]
    KeyNotFound { label: String },
    #[error("{count} keys labelled {label:?} on the token; labels must be unique")]
    KeyAmbiguous { label: String, count: usize },
    #[error("a key labelled {label:?} already exists on the token")]
    KeyExists { label: String },
    #[error("{algorithm} key cannot sign with {scheme:?}")]
    Unsupported { algorithm: KeyAlgorithm, scheme: SignatureScheme },
    #[error("malformed data from the token: {0}")]
    Malformed(String),
    #[error("no HSM server is configured")]
    NotConfigured,
    #[error("no HSM server is available: {0}")]
    Unavailable(String),
}

/// The configured HSM servers, as one signer.
pub struct Hsm {
    members: Vec<Member>,
}

struct Member {
    config: HsmServerConfig,
    state: RwLock<MemberState>,
}

enum MemberState {
    Up(Arc<Connection>),
    Down(String),
}

/// Status of one server, with the field names of `tollgate hsm status --json`.
#[derive(Debug, Clone, Serialize)]
pub struct ServerStatus {
    pub name: String,
    pub token: String,
    pub serial: Option<String>,
    /// `authenticated`, or the reason it is not.
    pub state: String,
    pub up: bool,
    pub module: PathBuf,
    pub address: Option<String>,
}

/// HA status.
#[derive(Debug, Clone, Serialize)]
pub struct HaStatus {
    pub enabled: bool,
    pub group: Option<String>,
}

/// `tollgate hsm status --json`.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub servers: Vec<ServerStatus>,
    pub ha: HaStatus,
}

impl Hsm {
    /// Connects to and logs in to every configured server. A server that fails is kept, marked
    /// down with the reason (logged), so status can show it; signing uses the others.
    pub fn open(servers: &[HsmServerConfig]) -> Self {
        let members = servers
            .iter()
            .map(|config| {
                let state = match connect(config) {
                    Ok(conn) => MemberState::Up(Arc::new(conn)),
                    Err(e) => {
                        tracing::error!(server = %config.name, error = %e, "hsm server unavailable");
                        MemberState::Down(e.to_string())
                    }
                };
                Member { config: config.clone(), state: RwLock::new(state) }
            })
            .collect();
        Self { members }
    }

    /// Like `open`, but fails with the first server's error when none is usable.
    pub fn open_strict(servers: &[HsmServerConfig]) -> Result<Self, HsmError> {
        let mut first_err = None;
        let mut members = Vec::with_capacity(servers.len());
        for config in servers {
            let state = match connect(config) {
                Ok(conn) => MemberState::Up(Arc::new(conn)),
                Err(e) => {
                    let reason = e.to_string();
                    first_err.get_or_insert(e);
                    MemberState::Down(reason)
                }
            };
            members.push(Member { config: config.clone(), state: RwLock::new(state) });
        }
        let hsm = Self { members };
        let any_up = hsm.up_members().next().is_some();
        match (any_up, first_err) {
            (false, Some(e)) => Err(e),
            (false, None) => Err(HsmError::NotConfigured),
            (true, _) => Ok(hsm),
        }
    }

    /// Per-server status.
    pub fn status(&self) -> Status {
        let servers = self
            .members
            .iter()
            .map(|m| {
                let (serial, state, up) = match &*m.state.read() {
                    MemberState::Up(conn) => (Some(conn.serial.clone()), "authenticated".to_string(), true),
                    MemberState::Down(reason) => (None, reason.clone(), false),
                };
                ServerStatus {
                    name: m.config.name.clone(),
                    token: m.config.token.clone(),
                    serial,
                    state,
                    up,
                    module: m.config.module.clone(),
                    address: m.config.address.clone(),
                }
            })
            .collect();
        let enabled = self.members.len() >= 2;
        Status { servers, ha: HaStatus { enabled, group: enabled.then(|| "default".to_string()) } }
    }

    /// The private key labelled `label`, as a `PrivateKey` whose signatures the HSM makes.
    pub fn key(self: &Arc<Self>, label: &str) -> Result<Arc<HsmKey>, HsmError> {
        let (name, conn) = self.first_up()?;
        let info = conn.public_key(&name, label)?;
        Ok(Arc::new(HsmKey { hsm: self.clone(), label: label.into(), algorithm: info.algorithm, spki: info.spki }))
    }

    /// Generates a key pair on the token (private half sensitive, non-extractable).
    pub fn generate(self: &Arc<Self>, label: &str, algorithm: KeyAlgorithm) -> Result<Arc<HsmKey>, HsmError> {
        let (name, conn) = self.first_up()?;
        let id: [u8; 16] = rand::random();
        conn.generate(&name, label, &id, algorithm)?;
        self.key(label)
    }

    fn sign(
        &self,
        label: &str,
        algorithm: KeyAlgorithm,
        scheme: SignatureScheme,
        message: &[u8],
    ) -> Result<Vec<u8>, HsmError> {
        let result = self.first_up().and_then(|(name, conn)| conn.sign(&name, label, algorithm, scheme, message));
        match &result {
            Ok(_) => METRICS.hsm_sign_total.fetch_add(1, Relaxed),
            Err(_) => METRICS.hsm_sign_errors_total.fetch_add(1, Relaxed),
        };
        result
    }

    fn up_members(&self) -> impl Iterator<Item = (String, Arc<Connection>)> + '_ {
        self.members.iter().filter_map(|m| match &*m.state.read() {
            MemberState::Up(conn) => Some((m.config.name.clone(), conn.clone())),
            MemberState::Down(_) => None,
        })
    }

    fn first_up(&self) -> Result<(String, Arc<Connection>), HsmError> {
        if self.members.is_empty() {
            return Err(HsmError::NotConfigured);
        }
        self.up_members().next().ok_or_else(|| {
            let reasons: Vec<_> = self
                .members
                .iter()
                .filter_map(|m| match &*m.state.read() {
                    MemberState::Down(reason) => Some(format!("{}: {reason}", m.config.name)),
                    MemberState::Up(_) => None,
                })
                .collect();
            HsmError::Unavailable(reasons.join("; "))
        })
    }
}

impl std::fmt::Debug for Hsm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<_> = self.members.iter().map(|m| m.config.name.as_str()).collect();
        f.debug_struct("Hsm").field("servers", &names).finish()
    }
}

/// A private key on the HSM.
pub struct HsmKey {
    hsm: Arc<Hsm>,
    label: String,
    algorithm: KeyAlgorithm,
    spki: Vec<u8>,
}

impl HsmKey {
    /// The key's label on the token.
    pub fn label(&self) -> &str {
        &self.label
    }
}

impl PrivateKey for HsmKey {
    fn algorithm(&self) -> KeyAlgorithm {
        self.algorithm
    }

    fn public_key(&self) -> &[u8] {
        &self.spki
    }

    fn sign(&self, scheme: SignatureScheme, message: &[u8]) -> Result<Vec<u8>, KeyError> {
        self.hsm
            .sign(&self.label, self.algorithm, scheme, message)
            .map_err(|e| KeyError::Backend { key: format!("hsm:{}", self.label), source: Box::new(e) })
    }
}

impl std::fmt::Debug for HsmKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HsmKey").field("label", &self.label).field("algorithm", &self.algorithm).finish()
    }
}

/// Initialises the server's token (software tokens only): SO PIN from `so_pin`, user PIN from
/// the server's configured source.
pub fn init_token(config: &HsmServerConfig, so_pin: &crate::config::SecretSource) -> Result<(), HsmError> {
    let secret = |source: &crate::config::SecretSource, what: &str| {
        source.load(what).map_err(|e| HsmError::Secret { server: config.name.clone(), reason: e.to_string() })
    };
    let user = config.pin.as_ref().ok_or_else(|| HsmError::NoPin { server: config.name.clone() })?;
    member::init_token(config, &secret(so_pin, "administrator password")?, &secret(user, "partition password")?)
}

fn connect(config: &HsmServerConfig) -> Result<Connection, HsmError> {
    let source = config.pin.as_ref().ok_or_else(|| HsmError::NoPin { server: config.name.clone() })?;
    let pin = source
        .load("partition password")
        .map_err(|e| HsmError::Secret { server: config.name.clone(), reason: e.to_string() })?;
    Connection::open(config, &pin)
}
