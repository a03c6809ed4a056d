//! PKCS#11 through cryptoki: the HSM servers of the configuration, seen by the rest of
//! tollgate as one `Hsm` that finds, generates and signs with keys that never leave it.
//!
//! Owns module loading, token lookup, login, sessions, the worker threads that make every
//! signature (`executor`), how a caller waits for one (`HsmKey`), and the orderly end of all
//! PKCS#11 use (`shutdown`). Does not own which key is used for what (that is `pki`), where
//! PINs are configured (`config`) or how a sealed one is opened (`vault`).

mod executor;
pub mod info;
mod member;
mod shutdown;

pub use shutdown::shutdown;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicU32, AtomicUsize};
use std::time::{Duration, Instant};

use cryptoki::error::RvError;
use parking_lot::RwLock;
use rustls::SignatureScheme;
use serde::Serialize;

use crate::config::{HsmConfig, HsmServerConfig, SecretSource};
use crate::keys::{KeyAlgorithm, KeyError, PrivateKey};
use crate::telemetry::{METRICS, MemberMetrics};
use executor::{Executor, Offload, Op};
use member::Connection;
use shutdown::enter;

/// Work that signs with an HSM key, handed whole to a worker of the member that would sign
/// (`HsmKey::hand_over`).
pub type Work = Box<dyn FnOnce() + Send>;

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
    #[error("hsm server {server}: administrator password (SO PIN) is incorrect; not retrying")]
    SoPinIncorrect { server: String },
    #[error("hsm server {server}: partition password (user PIN) is locked")]
    PinLocked { server: String },
    #[error("hsm server {server}: {reason}")]
    Secret { server: String, reason: String },
    #[error("hsm server {server}: {operation} failed: {reason}")]
    Pkcs11 { server: String, operation: &'static str, reason: String, code: Option<RvError> },
    #[error("hsm server {server}: no answer within {millis} ms")]
    Timeout { server: String, millis: u64 },
    #[error("HSM queue of {library} is full")]
    QueueFull { library: String },
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
    #[error("{waiting} signatures are already waiting for the HSM: shed")]
    Shed { waiting: usize },
}

impl HsmError {
    /// A failure of the device or the link to it: the member is taken out and the operation
    /// retried on another one.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Timeout { .. } | Self::Unavailable(_) => true,
            Self::Pkcs11 { code: Some(code), .. } => matches!(
                code,
                RvError::DeviceError
                    | RvError::DeviceRemoved
                    | RvError::DeviceMemory
                    | RvError::TokenNotPresent
                    | RvError::TokenNotRecognized
                    | RvError::SessionHandleInvalid
                    | RvError::SessionClosed
                    | RvError::SessionCount
                    | RvError::FunctionFailed
                    | RvError::GeneralError
                    | RvError::CryptokiNotInitialized
                    | RvError::UserNotLoggedIn
                    | RvError::ObjectHandleInvalid
                    | RvError::KeyHandleInvalid
                    | RvError::OperationActive
            ),
            Self::Pkcs11 { code: None, .. } => true,
            _ => false,
        }
    }

    /// A wrong or locked PIN: the member is locked, never retried on its own (tokens lock).
    pub fn is_auth(&self) -> bool {
        matches!(self, Self::PinIncorrect { .. } | Self::PinLocked { .. } | Self::Secret { .. })
    }

    /// A short reason for metric labels.
    pub fn reason(&self) -> String {
        match self {
            Self::Pkcs11 { code: Some(code), .. } => format!("{code:?}"),
            Self::Timeout { .. } => "timeout".into(),
            Self::QueueFull { .. } => "queue_full".into(),
            Self::Shed { .. } => "shed".into(),
            Self::Unavailable(_) => "unavailable".into(),
            Self::KeyNotFound { .. } => "key_not_found".into(),
            other if other.is_auth() => "authentication".into(),
            _ => "other".into(),
        }
    }
}

/// The configured HSM servers as one signer: the HA group.
pub struct Hsm {
    members: Arc<[Member]>,
    ha: HaSettings,
    executors: HashMap<PathBuf, Arc<Executor>>,
    call_timeout: Duration,
}

struct HaSettings {
    enabled: bool,
    group: String,
    retry: u32,
    interval: Duration,
}

struct Member {
    config: HsmServerConfig,
    state: RwLock<MemberState>,
    in_flight: AtomicUsize,
    attempts: AtomicU32,
    metrics: Arc<MemberMetrics>,
}

enum MemberState {
    Up(Arc<Connection>),
    /// Taken out; the recovery loop tries it again.
    Down(String),
    /// Wrong or locked PIN: not retried until the operator fixes it.
    Locked(String),
    /// Recovery gave up after `auto_recovery_retry` attempts.
    Exhausted(String),
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
    /// HA member state: `active`, `standby` (HA disabled, not the primary), `down`, `locked`,
    /// `recovery-exhausted`.
    pub ha_state: &'static str,
    pub module: PathBuf,
    pub address: Option<String>,
    pub in_flight: usize,
    pub recovery_attempts: u32,
}

/// HA status.
#[derive(Debug, Clone, Serialize)]
pub struct HaStatus {
    pub enabled: bool,
    pub group: Option<String>,
    pub auto_recovery_retry: u32,
    pub auto_recovery_interval_secs: u64,
}

/// `tollgate hsm status --json`.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub servers: Vec<ServerStatus>,
    pub ha: HaStatus,
}

impl Hsm {
    /// Connects to and logs in to every configured server. A server that fails is kept, marked
    /// down (or locked) with the reason, logged once, so status can show it.
    pub fn open(config: &HsmConfig) -> Self {
        shutdown::note_call_timeout(Duration::from_millis(config.call_timeout_ms));
        let members: Arc<[Member]> = config
            .servers
            .iter()
            .map(|server| {
                let metrics = MemberMetrics::register(&server.name);
                let state = match connect(server) {
                    Ok(conn) => MemberState::Up(Arc::new(conn)),
                    Err(e) => {
                        tracing::error!(server = %server.name, error = %e, "hsm server unavailable");
                        if e.is_auth() { MemberState::Locked(e.to_string()) } else { MemberState::Down(e.to_string()) }
                    }
                };
                metrics.set_up(matches!(state, MemberState::Up(_)));
                Member {
                    config: server.clone(),
                    state: RwLock::new(state),
                    in_flight: AtomicUsize::new(0),
                    attempts: AtomicU32::new(0),
                    metrics,
                }
            })
            .collect();
        // A call made for handed-over work that outlives its deadline takes its member out, as
        // a caller's own deadline does for a queued call (see `Hsm::sign`).
        let overdue: executor::Overdue = {
            let members = members.clone();
            Arc::new(move |conn, server, millis| {
                let e = HsmError::Timeout { server: server.to_string(), millis };
                tracing::error!(server, error = %e, "hsm server failed; taking it out");
                for member in members.iter().filter(|m| m.config.name == server) {
                    member.metrics.observe_error(&e.reason());
                    member.take_out(conn, MemberState::Down(e.to_string()));
                }
            })
        };
        let mut executors = HashMap::new();
        for server in &config.servers {
            executors.entry(server.module.clone()).or_insert_with(|| {
                let library = server.module.display().to_string();
                Executor::start(&library, config.workers, config.queue_depth, overdue.clone())
            });
        }
        let ha = HaSettings {
            enabled: config.servers.len() >= 2 && config.ha.enabled.unwrap_or(true),
            group: config.ha.group.clone(),
            retry: config.ha.auto_recovery_retry,
            interval: Duration::from_secs(config.ha.auto_recovery_interval_secs.max(1)),
        };
        Self { members, ha, executors, call_timeout: Duration::from_millis(config.call_timeout_ms) }
    }

    /// Fails when no server is usable, naming each one's reason as found when it was opened (or
    /// last tried): what a command that needs the HSM reports. Never connects again: a wrong
    /// partition password costs one C_Login per server and per `open`.
    pub fn require_up(&self) -> Result<(), HsmError> {
        if self.members.is_empty() {
            return Err(HsmError::NotConfigured);
        }
        match self.pick(&[]) {
            Some(_) => Ok(()),
            None => Err(HsmError::Unavailable(self.down_reasons())),
        }
    }

    /// Whether any member is up now (no PKCS#11 call: the members' last known state).
    pub fn any_up(&self) -> bool {
        self.members.iter().any(|m| matches!(*m.state.read(), MemberState::Up(_)))
    }

    /// Starts the background recovery of down members (the service calls it; CLI commands
    /// do not).
    pub fn start_recovery(self: &Arc<Self>) {
        let hsm = Arc::downgrade(self);
        let interval = self.ha.interval;
        let _ = shutdown::spawn("hsm-recovery".into(), move || {
            while shutdown::sleep(interval) {
                let Some(hsm) = hsm.upgrade() else { return };
                hsm.recover();
            }
        });
    }

    /// Per-server status.
    pub fn status(&self) -> Status {
        for executor in self.executors.values() {
            executor.report_overdue();
        }
        let servers = self
            .members
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let (serial, state, up, ha_state) = match &*m.state.read() {
                    MemberState::Up(conn) => {
                        let ha_state = if self.ha.enabled || i == 0 { "active" } else { "standby" };
                        (Some(conn.serial.clone()), "authenticated".to_string(), true, ha_state)
                    }
                    MemberState::Down(reason) => (None, reason.clone(), false, "down"),
                    MemberState::Locked(reason) => (None, reason.clone(), false, "locked"),
                    MemberState::Exhausted(reason) => {
                        (None, format!("recovery gave up: {reason}"), false, "recovery-exhausted")
                    }
                };
                ServerStatus {
                    name: m.config.name.clone(),
                    token: m.config.token.clone(),
                    serial,
                    state,
                    up,
                    ha_state,
                    module: m.config.module.clone(),
                    address: m.config.address.clone(),
                    in_flight: m.in_flight.load(Relaxed),
                    recovery_attempts: m.attempts.load(Relaxed),
                }
            })
            .collect();
        Status {
            servers,
            ha: HaStatus {
                enabled: self.ha.enabled,
                group: self.ha.enabled.then(|| self.ha.group.clone()),
                auto_recovery_retry: self.ha.retry,
                auto_recovery_interval_secs: self.ha.interval.as_secs(),
            },
        }
    }

    /// The private key labelled `label`, as a `PrivateKey` whose signatures the HSM makes.
    pub fn key(self: &Arc<Self>, label: &str) -> Result<Arc<HsmKey>, HsmError> {
        let _busy = enter()?;
        let (name, conn) = self.first_up()?;
        let info = conn.public_key(&name, label)?;
        Ok(Arc::new(HsmKey {
            hsm: self.clone(),
            label: label.into(),
            algorithm: info.algorithm,
            spki: info.spki,
            limit: None,
        }))
    }

    /// Generates a key pair on the token (private half sensitive, non-extractable).
    pub fn generate(self: &Arc<Self>, label: &str, algorithm: KeyAlgorithm) -> Result<Arc<HsmKey>, HsmError> {
        {
            let _busy = enter()?;
            let (name, conn) = self.first_up()?;
            let id: [u8; 16] = crate::keys::random();
            conn.generate(&name, label, &id, algorithm)?;
        }
        self.key(label)
    }

    /// Detailed information for every server (H5); never key material.
    pub fn info(&self) -> info::Info {
        let busy = enter();
        let status = self.status();
        let servers = self
            .members
            .iter()
            .zip(status.servers)
            .map(|(m, status)| {
                let conn = match &*m.state.read() {
                    MemberState::Up(conn) => Some(conn.clone()),
                    _ => None,
                };
                let details = conn.filter(|_| busy.is_ok()).map(|c| c.info(&m.config.name));
                let (library, token, mechanisms, keys, error) = match details {
                    Some(Ok((l, t, mech, keys))) => (Some(l), Some(t), mech, keys, None),
                    Some(Err(e)) => (None, None, vec![], vec![], Some(e.to_string())),
                    None => (None, None, vec![], vec![], Some(status.state.clone())),
                };
                info::ServerInfo { status, library, token, mechanisms, keys, error }
            })
            .collect();
        info::Info { servers, ha: status.ha }
    }

    /// The label of the private key matching `spki` (or CKA_ID `id`) on every up member;
    /// an error names the member where it is missing or differs.
    pub fn find_key(&self, spki: &[u8], id: Option<&[u8]>) -> Result<String, HsmError> {
        let _busy = enter()?;
        let mut label: Option<String> = None;
        for m in self.members.iter() {
            let conn = match &*m.state.read() {
                MemberState::Up(conn) => conn.clone(),
                _ => continue,
            };
            let found = conn.find_key(&m.config.name, spki, id)?;
            match &label {
                Some(l) if *l != found => {
                    return Err(HsmError::Malformed(format!(
                        "the key is labelled {l:?} on one member and {found:?} on {}: HA members need the same label",
                        m.config.name
                    )));
                }
                _ => label = Some(found),
            }
        }
        label.ok_or_else(|| HsmError::Unavailable(self.down_reasons()))
    }

    /// Generates an AES-256 wrapping key labelled `label` on the HSM (sensitive, never
    /// extractable).
    pub fn generate_wrapping_key(&self, label: &str) -> Result<(), HsmError> {
        let _busy = enter()?;
        let (name, conn) = self.first_up()?;
        conn.generate_secret(&name, label)
    }

    /// Encrypts with the HSM wrapping key `label` (AES-GCM, fresh 96-bit IV): (iv, ciphertext).
    pub fn wrap(&self, label: &str, aad: &[u8], plaintext: &[u8]) -> Result<([u8; 12], Vec<u8>), HsmError> {
        let _busy = enter()?;
        let (name, conn) = self.first_up()?;
        let iv: [u8; 12] = crate::keys::random();
        Ok((iv, conn.aes_gcm(&name, label, true, &iv, aad, plaintext)?))
    }

    /// Decrypts a master key that `wrap` encrypted: what the vault asks of the HSM.
    pub fn unwrap_master_key(
        &self,
        wrapped: &crate::vault::master::HsmWrapped,
    ) -> Result<zeroize::Zeroizing<Vec<u8>>, String> {
        self.unwrap(&wrapped.label(), &wrapped.iv()?, &wrapped.aad(), &wrapped.ciphertext()?).map_err(|e| e.to_string())
    }

    /// Decrypts what `wrap` made.
    pub fn unwrap(
        &self,
        label: &str,
        iv: &[u8; 12],
        aad: &[u8],
        ciphertext: &[u8],
    ) -> Result<zeroize::Zeroizing<Vec<u8>>, HsmError> {
        let _busy = enter()?;
        let (name, conn) = self.first_up()?;
        Ok(zeroize::Zeroizing::new(conn.aes_gcm(&name, label, false, iv, aad, ciphertext)?))
    }

    /// Signs on the healthy member with the fewest operations in flight; a transient failure is
    /// retried once on another member, and the failed member is taken out for recovery.
    fn sign(
        &self,
        label: &str,
        algorithm: KeyAlgorithm,
        scheme: SignatureScheme,
        message: &[u8],
        offload: Offload,
    ) -> Result<Vec<u8>, HsmError> {
        let mut tried = Vec::with_capacity(2);
        let mut last = None;
        for _ in 0..2 {
            let Some((i, conn)) = self.pick(&tried) else { break };
            tried.push(i);
            let member = &self.members[i];
            let executor = &self.executors[conn.module()];
            let op = Op::Sign { label: label.to_string(), algorithm, scheme, message: message.to_vec() };
            member.in_flight.fetch_add(1, Relaxed);
            let started = Instant::now();
            let result = executor.call(&conn, &member.config.name, op, self.call_timeout, offload);
            member.in_flight.fetch_sub(1, Relaxed);
            match result {
                Ok(signature) => {
                    METRICS.hsm_sign_total.inc();
                    member.metrics.observe_sign(started.elapsed());
                    return Ok(signature);
                }
                Err(e) => {
                    METRICS.hsm_sign_errors_total.inc();
                    member.metrics.observe_error(&e.reason());
                    if e.is_auth() {
                        member.take_out(&conn, MemberState::Locked(e.to_string()));
                        return Err(e);
                    }
                    if !e.is_transient() {
                        return Err(e);
                    }
                    tracing::error!(server = %member.config.name, error = %e, "hsm server failed; taking it out and retrying on another member");
                    member.take_out(&conn, MemberState::Down(e.to_string()));
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| HsmError::Unavailable(self.down_reasons())))
    }

    /// Hands `work` (which signs with this HSM's keys) to a worker of the library of the member
    /// that would sign now; it is dropped unrun if no worker takes it within the call deadline.
    fn hand_over(&self, work: Work) -> Result<Duration, Work> {
        let Some((_, conn)) = self.pick(&[]) else { return Err(work) };
        self.executors[conn.module()].hand_over(work, Instant::now() + self.call_timeout)?;
        Ok(self.call_timeout)
    }

    /// The up member with the fewest operations in flight, not in `exclude`, one on the library
    /// whose worker this is first; with HA off, only the primary (the first configured server).
    fn pick(&self, exclude: &[usize]) -> Option<(usize, Arc<Connection>)> {
        for executor in self.executors.values() {
            executor.report_overdue();
        }
        let candidates = if self.ha.enabled { self.members.len() } else { 1.min(self.members.len()) };
        (0..candidates)
            .filter(|i| !exclude.contains(i))
            .filter_map(|i| match &*self.members[i].state.read() {
                MemberState::Up(conn) => Some((i, conn.clone())),
                _ => None,
            })
            // Handed-over work signs with a member of the library whose worker runs it, right
            // there: a call queued from there to another library's workers could wait on
            // workers that are themselves waiting on this library's.
            .min_by_key(|(i, conn)| {
                (!self.executors[conn.module()].runs_this_thread(), self.members[*i].in_flight.load(Relaxed))
            })
    }

    fn first_up(&self) -> Result<(String, Arc<Connection>), HsmError> {
        if self.members.is_empty() {
            return Err(HsmError::NotConfigured);
        }
        self.pick(&[])
            .map(|(i, conn)| (self.members[i].config.name.clone(), conn))
            .ok_or_else(|| HsmError::Unavailable(self.down_reasons()))
    }

    fn down_reasons(&self) -> String {
        let reasons: Vec<_> = self
            .members
            .iter()
            .filter_map(|m| match &*m.state.read() {
                MemberState::Up(_) => None,
                MemberState::Down(r) | MemberState::Locked(r) | MemberState::Exhausted(r) => {
                    let name = &m.config.name;
                    Some(format!("{name}: {}", r.strip_prefix(&format!("hsm server {name}: ")).unwrap_or(r)))
                }
            })
            .collect();
        reasons.join("; ")
    }

    /// One recovery round: re-initialise libraries whose members are all lost, then try every
    /// down member again (at most `auto_recovery_retry` times; 0 = forever).
    fn recover(&self) {
        let Ok(_busy) = enter() else { return };
        let mut libraries: HashMap<&PathBuf, bool> = HashMap::new();
        for m in self.members.iter() {
            let up = matches!(*m.state.read(), MemberState::Up(_));
            *libraries.entry(&m.config.module).or_insert(false) |= up;
        }
        let down: Vec<&Member> =
            self.members.iter().filter(|m| matches!(*m.state.read(), MemberState::Down(_))).collect();
        if down.is_empty() {
            return;
        }
        for (module, any_up) in libraries {
            if !any_up && down.iter().any(|m| &m.config.module == module) {
                tracing::info!(module = %module.display(), "re-initialising PKCS#11 library: every member on it is down");
                if let Err(e) = member::reinitialise(module) {
                    tracing::warn!(module = %module.display(), error = %e, "re-initialisation failed");
                }
            }
        }
        for m in down {
            let attempt = m.attempts.fetch_add(1, Relaxed) + 1;
            match connect(&m.config) {
                Ok(conn) => {
                    tracing::info!(server = %m.config.name, attempt, "hsm server recovered");
                    *m.state.write() = MemberState::Up(Arc::new(conn));
                    m.attempts.store(0, Relaxed);
                    m.metrics.set_up(true);
                }
                Err(e) if e.is_auth() => {
                    tracing::error!(server = %m.config.name, error = %e, "hsm server locked: fix its PIN, then restart or reload");
                    *m.state.write() = MemberState::Locked(e.to_string());
                }
                Err(e) if self.ha.retry != 0 && attempt >= self.ha.retry => {
                    tracing::error!(server = %m.config.name, attempts = attempt, error = %e, "hsm server recovery gave up");
                    *m.state.write() = MemberState::Exhausted(e.to_string());
                }
                Err(e) => {
                    tracing::warn!(server = %m.config.name, attempt, error = %e, "hsm server still down");
                    *m.state.write() = MemberState::Down(e.to_string());
                }
            }
        }
    }
}

impl Member {
    /// Takes the member out, unless it was already replaced by a newer connection.
    fn take_out(&self, failed: &Arc<Connection>, next: MemberState) {
        let mut state = self.state.write();
        if let MemberState::Up(current) = &*state
            && current.id() == failed.id()
        {
            *state = next;
            self.attempts.store(0, Relaxed);
            self.metrics.set_up(false);
        }
    }
}

impl std::fmt::Debug for Hsm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<_> = self.members.iter().map(|m| m.config.name.as_str()).collect();
        f.debug_struct("Hsm").field("servers", &names).finish()
    }
}

/// A private key on the HSM. Its signatures are made by the HSM workers; how a caller waits for
/// one is decided here: briefly in place while the library answers fast, then, on a tokio
/// multi-threaded runtime's worker, under `block_in_place` (a slow or hung HSM never holds a
/// runtime thread). A key serving handshakes can be bounded (`with_limit`): past the bound a
/// signature fails at once rather than queueing without limit.
pub struct HsmKey {
    hsm: Arc<Hsm>,
    label: String,
    algorithm: KeyAlgorithm,
    spki: Vec<u8>,
    limit: Option<Arc<WaitLimit>>,
}

/// How many signatures may wait for the HSM at once through the keys that share it (the
/// inbound handshakes of the service).
#[derive(Debug)]
pub struct WaitLimit {
    now: AtomicUsize,
    max: usize,
}

impl WaitLimit {
    /// At most `max` signatures waiting at once.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self { now: AtomicUsize::new(0), max: max.max(1) })
    }
}

/// One signature counted against a `WaitLimit`.
struct Waiting<'a>(&'a WaitLimit);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.now.fetch_sub(1, Relaxed);
    }
}

impl HsmKey {
    /// The key's label on the token.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The same key, its signatures counted against `limit`.
    pub fn with_limit(&self, limit: Arc<WaitLimit>) -> Arc<Self> {
        let Self { hsm, label, algorithm, spki, limit: _ } = self;
        Arc::new(Self {
            hsm: hsm.clone(),
            label: label.clone(),
            algorithm: *algorithm,
            spki: spki.clone(),
            limit: Some(limit),
        })
    }

    /// Runs `work`, which signs with this key, on a worker of the member that would sign now,
    /// so its signature is made right there, with no hand-off of its own. Returns how long to
    /// wait for it: work not done by then is stuck behind a hung HSM (its member is taken out,
    /// and the caller stops waiting). Gives the work back when no worker can take it now (no
    /// member up, queue full): the caller runs it itself.
    pub fn hand_over(&self, work: Work) -> Result<Duration, Work> {
        self.hsm.hand_over(work)
    }

    fn shed(&self) -> Result<Option<Waiting<'_>>, HsmError> {
        let Some(limit) = &self.limit else { return Ok(None) };
        let waiting = limit.now.fetch_add(1, Relaxed);
        let slot = Waiting(limit);
        if waiting >= limit.max {
            tracing::warn!(waiting, max = limit.max, "handshake shed: too many signatures waiting for the HSM");
            return Err(HsmError::Shed { waiting });
        }
        Ok(Some(slot))
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
        let failed = |e: HsmError| KeyError::Backend { key: format!("hsm:{}", self.label), source: Box::new(e) };
        let _waiting = self.shed().map_err(failed)?;
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        let offload = |wait: &mut dyn FnMut()| match multi_thread {
            true => tokio::task::block_in_place(wait),
            false => wait(),
        };
        self.hsm.sign(&self.label, self.algorithm, scheme, message, &offload).map_err(failed)
    }
}

impl std::fmt::Debug for HsmKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HsmKey").field("label", &self.label).field("algorithm", &self.algorithm).finish()
    }
}

/// Initialises the server's token (software tokens only) with the administrator password (SO
/// PIN) `so_pin`; the partition password (user PIN) from the server's configured source.
pub fn init_token(config: &HsmServerConfig, so_pin: &secrecy::SecretString) -> Result<(), HsmError> {
    member::init_token(config, so_pin, &secret(config, &config.pin(), "partition password")?)
}

/// Checks the administrator password (SO PIN) of a server.
pub fn check_so_pin(config: &HsmServerConfig, so_pin: &secrecy::SecretString) -> Result<(), HsmError> {
    member::check_so_pin(config, so_pin)
}

/// Checks a partition password (user PIN) by logging in with it.
pub fn check_user_pin(config: &HsmServerConfig, pin: &secrecy::SecretString) -> Result<(), HsmError> {
    Connection::open(config, pin).map(drop)
}

fn connect(config: &HsmServerConfig) -> Result<Connection, HsmError> {
    Connection::open(config, &secret(config, &config.pin(), "partition password")?)
}

fn secret(config: &HsmServerConfig, source: &SecretSource, what: &str) -> Result<secrecy::SecretString, HsmError> {
    crate::vault::load(source, what)
        .map_err(|e| HsmError::Secret { server: config.name.clone(), reason: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_past_the_wait_limit_are_shed_at_once() {
        let hsm = Arc::new(Hsm::open(&HsmConfig::default()));
        let key = HsmKey { hsm, label: "k".into(), algorithm: KeyAlgorithm::EcdsaP256, spki: Vec::new(), limit: None };
        let limit = WaitLimit::new(1);
        limit.now.store(1, Relaxed); // one signature already waiting
        let err = key.with_limit(limit.clone()).sign(SignatureScheme::ECDSA_NISTP256_SHA256, b"m").unwrap_err();
        assert!(err.to_string().contains("shed"), "{err}");
        assert_eq!(limit.now.load(Relaxed), 1, "the shed signature's slot is given back");
        // Without a limit the same key is not shed (it fails for want of a member instead).
        let err = key.sign(SignatureScheme::ECDSA_NISTP256_SHA256, b"m").unwrap_err();
        assert!(!err.to_string().contains("shed"), "{err}");
    }
}
