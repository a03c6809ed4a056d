//! The management plane: every operator command (set-up, login, status, info, rotation,
//! import, support file, reset, bypass, API token) is a function here, called by both the
//! command line and the HTTP API, so the two cannot drift apart.
//!
//! Each operation takes a `Context`: the configuration, and the HSM opened at most once for the
//! whole command (lazily, only by operations that need it), so a wrong partition password costs
//! one C_Login per command by construction. Each returns a typed result that `report` renders
//! as a table or JSON; errors are `ManageError`, whose `is_usage` and `status` say what the
//! command line and the API answer.

pub mod api;
pub mod master_key;
pub mod page;
pub mod report;
pub mod servers;
pub mod support;

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use secrecy::SecretString;
use serde::Serialize;

use crate::config::{Config, ConfigError, HsmServerConfig, SecretSource};
use crate::hsm::{Hsm, HsmError, Status};
use crate::keys::KeyAlgorithm;
use crate::pki::{CaRole, CertEntry, CertStore, CertSummary, KeyLocation, PkiError, Roles};
use crate::proxy::bypass;
use crate::state::StateDir;

/// Errors of management operations.
#[derive(Debug, thiserror::Error)]
pub enum ManageError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(transparent)]
    Hsm(#[from] HsmError),
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    #[error(transparent)]
    Vault(#[from] crate::vault::VaultError),
    #[error("master key: {0}")]
    MasterKey(String),
    /// The operator's input is at fault.
    #[error("{0}")]
    Usage(String),
    #[error("management API at {addr}: {reason}")]
    Api { addr: String, reason: String },
    #[error("building the support file: {0}")]
    Bundle(String),
    #[error("no [[hsm.server]] named {0:?} in the configuration")]
    NoServer(String),
    #[error("the service is starting: its HSM is not open yet")]
    Starting,
    #[error("writing {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: crate::state::StateError,
    },
}

impl ManageError {
    /// Whether the operator's input was at fault: exit code 64 on the command line.
    pub fn is_usage(&self) -> bool {
        matches!(self, Self::Usage(_) | Self::Config(_) | Self::NoServer(_) | Self::Pki(PkiError::BadName(_)))
    }

    /// The HTTP status the management API answers this error with.
    pub fn status(&self) -> http::StatusCode {
        use http::StatusCode;
        match self {
            Self::Pki(PkiError::NotFound(_)) | Self::NoServer(_) => StatusCode::NOT_FOUND,
            Self::Starting
            | Self::Hsm(HsmError::NotConfigured | HsmError::Unavailable(_) | HsmError::Timeout { .. })
            | Self::Pki(PkiError::Hsm(HsmError::Unavailable(_) | HsmError::Timeout { .. })) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            error if error.is_usage() => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// What one command (or one API request) works with: the configuration and the HSM, opened at
/// most once.
pub struct Context {
    config: Arc<Config>,
    hsm: OnceLock<Arc<Hsm>>,
}

impl Context {
    /// A command's context; the HSM is opened when an operation first needs it.
    pub fn new(config: Config) -> Self {
        Self { config: Arc::new(config), hsm: OnceLock::new() }
    }

    /// The running service's context: its configuration and its HSM, never opened again.
    pub fn with_hsm(config: Arc<Config>, hsm: Arc<Hsm>) -> Self {
        Self { config, hsm: OnceLock::from(hsm) }
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The HSM servers, connected and logged in to on first use, once.
    pub fn hsm(&self) -> &Arc<Hsm> {
        self.hsm.get_or_init(|| Arc::new(Hsm::open(&self.config.hsm)))
    }

    /// The HSM, or why no server of it can be used.
    pub fn hsm_up(&self) -> Result<&Arc<Hsm>, ManageError> {
        let hsm = self.hsm();
        hsm.require_up()?;
        Ok(hsm)
    }

    /// The HSM when servers are configured.
    fn configured_hsm(&self) -> Option<&Arc<Hsm>> {
        (!self.config.hsm.servers.is_empty()).then(|| self.hsm())
    }

    fn state(&self) -> Result<StateDir, ManageError> {
        Ok(StateDir::open(&self.config.state_dir)?)
    }

    fn server(&self, name: &str) -> Result<&HsmServerConfig, ManageError> {
        self.config.hsm.servers.iter().find(|s| s.name == name).ok_or_else(|| ManageError::NoServer(name.into()))
    }
}

/// Where an operator hands a command a secret: never its command line.
#[derive(Clone, Debug)]
pub enum SecretInput {
    File(PathBuf),
    Env(String),
    /// The first line of standard input.
    Stdin,
}

impl SecretInput {
    /// `--X-file` or `--X-env`, else standard input.
    pub fn from_options(file: Option<PathBuf>, env: Option<String>) -> Self {
        match (file, env) {
            (Some(file), _) => Self::File(file),
            (None, Some(var)) => Self::Env(var),
            (None, None) => Self::Stdin,
        }
    }

    /// Reads the secret (trailing newline removed; never empty).
    fn read(&self, what: &str) -> Result<SecretString, ManageError> {
        let source = match self {
            Self::File(file) => SecretSource::File(file.clone()),
            Self::Env(var) => SecretSource::Env(var.clone()),
            Self::Stdin => {
                let mut line = zeroize::Zeroizing::new(String::new());
                std::io::stdin()
                    .read_line(&mut line)
                    .map_err(|e| ManageError::Usage(format!("reading the {what} from stdin: {e}")))?;
                let secret = line.trim_end_matches(['\r', '\n']);
                if secret.is_empty() {
                    return Err(ManageError::Usage(format!("no {what} on stdin")));
                }
                return Ok(SecretString::from(secret.to_string()));
            }
        };
        crate::vault::load(&source, what).map_err(|e| ManageError::Usage(e.to_string()))
    }
}

/// A command that did what it was asked, and says so.
#[derive(Debug, Serialize)]
pub struct Done {
    pub message: String,
}

impl Done {
    /// A confirmation.
    pub fn new(message: impl Into<String>) -> Self {
        Self { message: message.into() }
    }
}

/// A certificate added to the store.
#[derive(Debug, Serialize)]
pub struct CertAdded {
    pub name: String,
    pub algorithm: String,
    /// `hsm` or `software`.
    pub key: &'static str,
    /// The key's label on the HSM.
    pub label: Option<String>,
    pub forward_trust: bool,
    pub forward_untrust: bool,
    pub inbound: Vec<String>,
}

impl From<CertEntry> for CertAdded {
    fn from(entry: CertEntry) -> Self {
        let (key, label) = match entry.key {
            KeyLocation::Hsm { label } => ("hsm", Some(label)),
            KeyLocation::Software { .. } => ("software", None),
        };
        let CertEntry { name, algorithm, forward_trust, forward_untrust, inbound, .. } = entry;
        Self { name, algorithm, key, label, forward_trust, forward_untrust, inbound }
    }
}

/// What `tollgate hsm login` did with a partition password that authenticated.
#[derive(Debug, Serialize)]
pub struct Login {
    pub server: String,
    /// Where it was sealed for the service; `None` when the server reads its password from its
    /// configured `pin_file`/`pin_env` (`source`) and nothing was stored.
    pub sealed: Option<PathBuf>,
    pub source: String,
}

/// The learned bypass of the running service.
#[derive(Debug, Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct BypassList(pub Vec<bypass::Entry>);

/// How many learned bypass entries a clear removed.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct BypassCleared {
    pub removed: usize,
}

/// The end of every command and of the service: the HSM libraries are left in order (calls in
/// flight finish, workers close their sessions, each library is finalized), so the process can
/// exit normally; a call that never comes back ends it with `abort` instead (see
/// `hsm::shutdown`).
pub fn close_hsm() {
    crate::hsm::shutdown();
}

/// `tollgate hsm status`: every server's state.
pub fn hsm_status(ctx: &Context) -> Status {
    ctx.hsm().status()
}

/// `tollgate hsm info`.
pub fn hsm_info(ctx: &Context) -> crate::hsm::info::Info {
    ctx.hsm().info()
}

/// `tollgate hsm init-token`: a software token (SoftHSM) for a configured server, its SO PIN
/// from `so_pin`, its user PIN from the server's configured source.
pub fn init_token(ctx: &Context, server: &str, so_pin: &SecretInput) -> Result<Done, ManageError> {
    let config = ctx.server(server)?;
    crate::hsm::init_token(config, &so_pin.read("administrator password")?)?;
    Ok(Done::new(format!("initialised token {:?} for hsm server {server}", config.token)))
}

/// `tollgate hsm setup`: checks the administrator password (SO PIN) authenticates.
pub fn hsm_setup(ctx: &Context, server: &str, so_pin: &SecretInput) -> Result<Done, ManageError> {
    crate::hsm::check_so_pin(ctx.server(server)?, &so_pin.read("administrator password")?)?;
    Ok(Done::new(format!("hsm server {server}: administrator password authenticated")))
}

/// `tollgate hsm login`: checks the partition password (user PIN) and, unless the server has
/// pin_file/pin_env, stores it sealed under the device key for the service.
pub fn hsm_login(ctx: &Context, server: &str, pin: &SecretInput) -> Result<Login, ManageError> {
    let config = ctx.server(server)?;
    let pin = pin.read("partition password")?;
    crate::hsm::check_user_pin(config, &pin)?;
    let source = config.pin();
    let sealed = match &source {
        SecretSource::SealedPin { state_dir, server } => {
            let _lock = StateDir::open(state_dir)?.lock()?;
            Some(crate::vault::seal_pin(state_dir, server, &pin)?)
        }
        _ => None,
    };
    Ok(Login { server: server.into(), sealed, source: source.to_string() })
}

/// `tollgate cert list`: every certificate with its key status.
pub fn cert_list(ctx: &Context) -> Result<Vec<CertSummary>, ManageError> {
    let state = ctx.state()?;
    let store = CertStore::load(&state)?;
    Ok(store.summaries(&crate::pki::Keyring::new(&state, ctx.configured_hsm())))
}

/// One certificate with its key status (`GET /api/v1/certs/NAME`).
pub fn cert_status(ctx: &Context, name: &str) -> Result<CertSummary, ManageError> {
    cert_list(ctx)?.into_iter().find(|c| c.name == name).ok_or_else(|| PkiError::NotFound(name.into()).into())
}

/// What `tollgate cert generate-ca` makes.
pub struct NewCa<'a> {
    pub name: &'a str,
    /// `ecdsa-p256`, `ecdsa-p384`, `rsa-2048` or `rsa-3072`.
    pub algorithm: &'a str,
    /// The forward-trust CA, else the forward-untrust one.
    pub forward_trust: bool,
    /// Also write the certificate here as PEM.
    pub out_cert: Option<&'a Path>,
}

/// `tollgate cert generate-ca`: the key pair on the HSM, the certificate in the store.
pub fn generate_ca(ctx: &Context, ca: &NewCa<'_>) -> Result<CertAdded, ManageError> {
    let algorithm: KeyAlgorithm = ca.algorithm.parse().map_err(ManageError::Usage)?;
    let role = if ca.forward_trust { CaRole::ForwardTrust } else { CaRole::ForwardUntrust };
    let state = ctx.state()?;
    let entry = CertStore::generate_ca(&state, ctx.hsm_up()?, ca.name, algorithm, role)?;
    if let Some(path) = ca.out_cert {
        export_pem(&entry, path)?;
    }
    Ok(entry.into())
}

/// Where an imported certificate's private key is.
pub enum ImportKey<'a> {
    /// In this file (PEM or DER: PKCS#8, SEC1 or PKCS#1): sealed under the master key.
    File(&'a Path),
    /// On the HSM: found by the certificate's public key, or by CKA_ID (hex).
    Hsm { id: Option<&'a str> },
}

/// What `tollgate cert import` adds.
pub struct Import<'a> {
    pub name: &'a str,
    /// PEM: the certificate, then its chain.
    pub cert: &'a Path,
    pub key: ImportKey<'a>,
    pub forward_trust: bool,
    pub forward_untrust: bool,
    /// Host names served with it on inbound listeners.
    pub inbound: Vec<String>,
}

/// `tollgate cert import`.
pub fn import_cert(ctx: &Context, import: Import<'_>) -> Result<CertAdded, ManageError> {
    let Import { name, cert, key, forward_trust, forward_untrust, inbound } = import;
    let roles = Roles { forward_trust, forward_untrust, inbound };
    let create = |reason: String| PkiError::Create { name: name.into(), reason };
    let pem = std::fs::read_to_string(cert).map_err(|e| create(format!("reading {}: {e}", cert.display())))?;
    let state = ctx.state()?;
    let entry = match key {
        ImportKey::Hsm { id } => {
            let id = id.map(|id| crate::hex::decode(id.trim_start_matches("0x"))).transpose();
            let id = id.map_err(|e| ManageError::Usage(format!("--key-id: {e}")))?;
            CertStore::import_on_hsm(&state, ctx.hsm_up()?, name, &pem, id.as_deref(), &roles)?
        }
        ImportKey::File(key) => {
            let bytes = zeroize::Zeroizing::new(
                std::fs::read(key).map_err(|e| create(format!("reading {}: {e}", key.display())))?,
            );
            let der = parse_private_key(&bytes).map_err(|reason| create(format!("{}: {reason}", key.display())))?;
            let secret = crate::vault::master::cert_key_secret(name);
            let entry = CertStore::software_entry(name, &pem, &der, secret.clone(), &roles)?;
            if CertStore::load(&state)?.contains(name) {
                return Err(PkiError::Exists(name.into()).into());
            }
            master_key::store_secret(ctx, &secret, der.secret_der())?;
            CertStore::add(&state, entry)?
        }
    };
    Ok(entry.into())
}

/// A private key from PEM (`PRIVATE KEY`, `EC PRIVATE KEY`, `RSA PRIVATE KEY`) or DER, in a
/// buffer zeroized on drop. The error never quotes the input.
pub fn parse_private_key(
    bytes: &[u8],
) -> Result<zeroize::Zeroizing<rustls::pki_types::PrivateKeyDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs1KeyDer, PrivatePkcs8KeyDer, PrivateSec1KeyDer};
    if bytes.starts_with(b"-----") || bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        if bytes.windows(9).any(|w| w == b"ENCRYPTED") {
            return Err("encrypted private keys are not supported: decrypt it first (openssl pkey)".into());
        }
        return PrivateKeyDer::from_pem_slice(bytes)
            .map(zeroize::Zeroizing::new)
            .map_err(|_| "no PRIVATE KEY, EC PRIVATE KEY or RSA PRIVATE KEY block in the PEM".into());
    }
    let candidates = [
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(bytes)),
        PrivateKeyDer::Sec1(PrivateSec1KeyDer::from(bytes)),
        PrivateKeyDer::Pkcs1(PrivatePkcs1KeyDer::from(bytes)),
    ];
    candidates
        .into_iter()
        .find(|der| crate::keys::software::SoftwareKey::from_der(der).is_ok())
        .map(|der| zeroize::Zeroizing::new(der.clone_key()))
        .ok_or_else(|| "neither PEM nor a DER private key (PKCS#8, SEC1 or PKCS#1) tollgate supports".into())
}

/// `tollgate cert delete`: the entry, and a software key's sealed secret with it (a key on the
/// HSM stays: deleting keys is the HSM administrator's decision).
pub fn delete_cert(ctx: &Context, name: &str) -> Result<Done, ManageError> {
    let entry = CertStore::delete(&ctx.state()?, name)?;
    let key = match &entry.key {
        KeyLocation::Software { secret, .. } => {
            master_key::remove_secret(ctx, secret)?;
            "its sealed key removed"
        }
        KeyLocation::Hsm { .. } => "its key stays on the HSM",
    };
    Ok(Done::new(format!("deleted certificate {} ({key})", entry.name)))
}

/// `tollgate cert export`: a certificate as PEM.
pub fn export_cert(ctx: &Context, name: &str, out: &Path) -> Result<Done, ManageError> {
    let store = CertStore::load(&ctx.state()?)?;
    let entry = store.entries().iter().find(|e| e.name == name).ok_or_else(|| PkiError::NotFound(name.into()))?;
    export_pem(entry, out)?;
    Ok(Done::new(format!("wrote certificate {name} to {}", out.display())))
}

fn export_pem(entry: &CertEntry, path: &Path) -> Result<(), ManageError> {
    crate::state::write_atomic(path, entry.cert_pem.as_bytes(), crate::state::Mode::Public)
        .map_err(|source| ManageError::Write { path: path.display().to_string(), source })
}

/// `tollgate api-token set`: the management API's bearer token, sealed under the master key.
pub fn set_api_token(ctx: &Context, input: &SecretInput) -> Result<Done, ManageError> {
    use secrecy::ExposeSecret;
    let token = input.read("API token")?;
    let token = token.expose_secret();
    if token.len() < 16 || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ManageError::Usage("the API token must be at least 16 printable characters, no spaces".into()));
    }
    master_key::store_secret(ctx, crate::vault::master::API_TOKEN_SECRET, token.as_bytes())?;
    Ok(Done::new("API token stored sealed under the master key (a running service picks it up on SIGHUP)"))
}

/// The management API token: from `[management] token_file` when configured, else the one
/// sealed under the master key (the HSM unwraps it when HSM-encrypted); `None` when neither.
pub fn api_token(ctx: &Context) -> Result<Option<SecretString>, ManageError> {
    if let Some(source) = &ctx.config.management_token() {
        let token =
            crate::vault::load(source, "management API token").map_err(|e| ManageError::Usage(e.to_string()))?;
        return Ok(Some(token));
    }
    let state = ctx.state()?;
    match crate::vault::master::load(&state).map_err(ManageError::MasterKey)? {
        Some(file) if file.secrets.contains_key(crate::vault::master::API_TOKEN_SECRET) => {}
        _ => return Ok(None),
    }
    let vault = master_key::vault(ctx)?.ok_or_else(|| ManageError::MasterKey("no master key".into()))?;
    let token = vault.secret(crate::vault::master::API_TOKEN_SECRET).map_err(ManageError::MasterKey)?;
    Ok(token.map(|t| SecretString::from(String::from_utf8_lossy(&t).into_owned())))
}

/// `tollgate bypass list`: the running service's learned bypass.
pub fn bypass_list(ctx: &Context) -> Result<BypassList, ManageError> {
    api_json(ctx, "GET", "/api/v1/bypass")
}

/// `tollgate bypass clear`: one host's entry, or all of them.
pub fn bypass_clear(ctx: &Context, host: Option<&str>) -> Result<BypassCleared, ManageError> {
    let path = match host {
        Some(host) => format!("/api/v1/bypass?host={}", host.to_ascii_lowercase()),
        None => "/api/v1/bypass".to_string(),
    };
    api_json(ctx, "DELETE", &path)
}

/// `tollgate hsm support-bundle`: the running service builds it (it has the recent log
/// lines); when it cannot be reached or refuses, this process builds it without them.
pub fn support_bundle(ctx: &Context, out: &Path) -> Result<Done, ManageError> {
    let logs_missing = match api_request(ctx, "POST", "/api/v1/hsm/support-bundle") {
        Ok((200, bytes)) => {
            support::write(out, &bytes)?;
            return Ok(Done::new(format!(
                "wrote {} (built by the running service, recent log lines included)",
                out.display()
            )));
        }
        Ok((status, body)) => format!("the service answered {status}: {}", String::from_utf8_lossy(&body).trim()),
        Err(e) => e.to_string(),
    };
    let bytes = support::build(ctx, Err(logs_missing.clone()))?;
    support::write(out, &bytes)?;
    Ok(Done::new(format!("wrote {} (built without the service's log lines: {logs_missing})", out.display())))
}

/// A request to the running service's API whose 200 answer is JSON of type `T`.
fn api_json<T: serde::de::DeserializeOwned>(ctx: &Context, method: &str, path: &str) -> Result<T, ManageError> {
    let addr = ctx.config.management.listen.to_string();
    let (status, body) = api_request(ctx, method, path)?;
    let body = String::from_utf8_lossy(&body);
    if status != 200 {
        return Err(ManageError::Api { addr, reason: format!("answered {status}: {}", body.trim()) });
    }
    serde_json::from_str(&body).map_err(|e| ManageError::Api { addr, reason: format!("unexpected answer: {e}") })
}

/// One request to the running service's management API: (status, body). Changing requests
/// carry the configured bearer token.
fn api_request(ctx: &Context, method: &str, path: &str) -> Result<(u16, Vec<u8>), ManageError> {
    use std::io::{Read, Write};
    let addr = ctx.config.management.listen;
    let api_err = |reason: String| ManageError::Api { addr: addr.to_string(), reason };
    let mut auth = zeroize::Zeroizing::new(String::new());
    if method != "GET"
        && let Some(token) = api_token(ctx).map_err(|e| api_err(e.to_string()))?
    {
        use secrecy::ExposeSecret;
        *auth = format!("Authorization: Bearer {}\r\n", token.expose_secret());
    }
    let mut stream = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(5))
        .map_err(|e| api_err(format!("{e} (is `tollgate run` running?)")))?;
    let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(30)));
    write!(stream, "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{}Connection: close\r\n\r\n", auth.as_str())
        .map_err(|e| api_err(e.to_string()))?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).map_err(|e| api_err(e.to_string()))?;
    let split = response.windows(4).position(|w| w == b"\r\n\r\n");
    let head = String::from_utf8_lossy(&response[..split.unwrap_or(response.len())]).into_owned();
    let status =
        head.split(' ').nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| api_err("malformed response".into()))?;
    let body = split.map(|at| response[at + 4..].to_vec()).unwrap_or_default();
    Ok((status, body))
}
