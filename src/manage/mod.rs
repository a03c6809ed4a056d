//! The management plane: operator operations shared by the CLI and the HTTP API, so the two
//! cannot drift apart.

pub mod api;
pub mod master_key;
pub mod page;
pub mod servers;
pub mod support;

use std::sync::Arc;

use crate::config::{Config, SecretSource};
use crate::hsm::{Hsm, HsmError, Status};
use crate::keys::KeyAlgorithm;
use crate::pki::{CaRole, CertEntry, CertStore, CertSummary, PkiError};
use crate::state::StateDir;

/// Errors of management operations.
#[derive(Debug, thiserror::Error)]
pub enum ManageError {
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(transparent)]
    Hsm(#[from] HsmError),
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    #[error(transparent)]
    Vault(crate::vault::VaultError),
    #[error("master key: {0}")]
    MasterKey(String),
    #[error("{0}")]
    Usage(String),
    #[error("management API at {addr}: {reason}")]
    Api { addr: String, reason: String },
    #[error("building the support file: {0}")]
    Bundle(String),
    #[error("no [[hsm.server]] named {0:?} in the configuration")]
    NoServer(String),
    #[error("writing {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: crate::state::StateError,
    },
}

/// `tollgate hsm status`: connects to every server and reports.
pub fn hsm_status(config: &Config) -> Status {
    Hsm::open(&config.hsm).status()
}

/// `tollgate cert list`.
pub fn cert_list(config: &Config) -> Result<Vec<CertSummary>, ManageError> {
    let hsm = (!config.hsm.servers.is_empty()).then(|| Arc::new(Hsm::open(&config.hsm)));
    cert_rows(&config.state_dir, hsm.as_ref())
}

/// Every certificate with its key status (test signatures: blocking). Shared by the CLI, the
/// API, the status page and the support file.
pub fn cert_rows(state_dir: &std::path::Path, hsm: Option<&Arc<Hsm>>) -> Result<Vec<CertSummary>, ManageError> {
    let state = StateDir::open(state_dir)?;
    let store = CertStore::load(&state)?;
    Ok(store.summaries(&crate::pki::Keyring::new(&state, hsm)))
}

/// `tollgate cert generate-ca`: the key pair on the HSM, the certificate in the store, and
/// optionally the certificate as PEM in `out_cert`.
pub fn generate_ca(
    config: &Config,
    name: &str,
    algorithm: KeyAlgorithm,
    role: CaRole,
    out_cert: Option<&std::path::Path>,
) -> Result<CertEntry, ManageError> {
    let state = StateDir::open(&config.state_dir)?;
    let hsm = Arc::new(Hsm::open_strict(&config.hsm)?);
    let entry = CertStore::generate_ca(&state, &hsm, name, algorithm, role)?;
    if let Some(path) = out_cert {
        export_pem(&entry, path)?;
    }
    Ok(entry)
}

/// `tollgate hsm setup`: checks the administrator password (SO PIN) authenticates.
pub fn hsm_setup(config: &Config, server: &str, so_pin: &SecretSource) -> Result<(), ManageError> {
    crate::hsm::check_so_pin(server_config(config, server)?, so_pin)?;
    Ok(())
}

/// What `tollgate hsm login` did with a partition password that authenticated.
pub enum LoginOutcome {
    /// Sealed in the state directory for the service.
    Stored(std::path::PathBuf),
    /// The server takes its PIN from pin_file/pin_env; nothing stored.
    Configured(String),
}

/// `tollgate hsm login`: checks the partition password (user PIN) and, unless the server has
/// pin_file/pin_env, stores it sealed under the device key for the service.
pub fn hsm_login(config: &Config, server: &str, pin: &secrecy::SecretString) -> Result<LoginOutcome, ManageError> {
    let server_config = server_config(config, server)?;
    crate::hsm::check_user_pin(server_config, pin)?;
    match server_config.pin() {
        SecretSource::SealedPin { state_dir, server } => {
            let _lock = StateDir::open(&state_dir)?.lock()?;
            let file = crate::vault::seal_pin(&state_dir, &server, pin).map_err(ManageError::Vault)?;
            Ok(LoginOutcome::Stored(file))
        }
        other => Ok(LoginOutcome::Configured(other.to_string())),
    }
}

fn server_config<'a>(config: &'a Config, server: &str) -> Result<&'a crate::config::HsmServerConfig, ManageError> {
    config.hsm.servers.iter().find(|s| s.name == server).ok_or_else(|| ManageError::NoServer(server.to_string()))
}

/// One request to the running service's management API: (status, body). Changing requests
/// carry the configured bearer token.
pub fn api_request(config: &Config, method: &str, path: &str) -> Result<(u16, String), ManageError> {
    let (status, body) = api_request_bytes(config, method, path)?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// `api_request` with the body as bytes (the support file is a tar.gz).
pub fn api_request_bytes(config: &Config, method: &str, path: &str) -> Result<(u16, Vec<u8>), ManageError> {
    use std::io::{Read, Write};
    let addr = config.management.listen;
    let api_err = |reason: String| ManageError::Api { addr: addr.to_string(), reason };
    let mut auth = zeroize::Zeroizing::new(String::new());
    if method != "GET"
        && let Some(token) = api_token(config, None).map_err(|e| api_err(e.to_string()))?
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

/// `tollgate hsm support-bundle`: the running service builds it (it has the recent log
/// lines); when it cannot be reached or refuses, this process builds it without them. Says
/// which on the way back.
pub fn support_bundle(config: &Config, out: &std::path::Path) -> Result<String, ManageError> {
    let logs_missing = match api_request_bytes(config, "POST", "/api/v1/hsm/support-bundle") {
        Ok((200, bytes)) => {
            support::write(out, &bytes)?;
            return Ok("built by the running service, recent log lines included".into());
        }
        Ok((status, body)) => format!("the service answered {status}: {}", String::from_utf8_lossy(&body).trim()),
        Err(e) => e.to_string(),
    };
    let hsm = Arc::new(Hsm::open(&config.hsm));
    let bytes = support::build(&support::Sources { config, hsm: &hsm, logs: Err(logs_missing.clone()) })?;
    support::write(out, &bytes)?;
    Ok(format!("built without the service's log lines ({logs_missing})"))
}

/// `tollgate hsm info`.
pub fn hsm_info(config: &Config) -> crate::hsm::info::Info {
    Hsm::open(&config.hsm).info()
}

/// `tollgate cert import --key-on-hsm`.
pub fn import_on_hsm(
    config: &Config,
    name: &str,
    cert: &std::path::Path,
    id: Option<&[u8]>,
    roles: &crate::pki::Roles,
) -> Result<CertEntry, ManageError> {
    let pem = std::fs::read_to_string(cert)
        .map_err(|e| PkiError::Create { name: name.into(), reason: format!("reading {}: {e}", cert.display()) })?;
    let state = StateDir::open(&config.state_dir)?;
    let hsm = Arc::new(Hsm::open_strict(&config.hsm)?);
    Ok(CertStore::import_on_hsm(&state, &hsm, name, &pem, id, roles)?)
}

/// `tollgate cert import --key FILE`: the certificate and a software private key (PEM or DER:
/// PKCS#8, SEC1 or PKCS#1), checked against each other; the key sealed under the master key
/// (one is created when none exists), never stored in the clear.
pub fn import_software(
    config: &Config,
    name: &str,
    cert: &std::path::Path,
    key: &std::path::Path,
    roles: &crate::pki::Roles,
) -> Result<CertEntry, ManageError> {
    let create = |reason: String| PkiError::Create { name: name.into(), reason };
    let pem = std::fs::read_to_string(cert).map_err(|e| create(format!("reading {}: {e}", cert.display())))?;
    let key_bytes =
        zeroize::Zeroizing::new(std::fs::read(key).map_err(|e| create(format!("reading {}: {e}", key.display())))?);
    let der = parse_private_key(&key_bytes).map_err(|reason| create(format!("{}: {reason}", key.display())))?;
    let secret = crate::vault::master::cert_key_secret(name);
    let entry = CertStore::software_entry(name, &pem, &der, secret.clone(), roles)?;
    let state = StateDir::open(&config.state_dir)?;
    if CertStore::load(&state)?.contains(name) {
        return Err(PkiError::Exists(name.into()).into());
    }
    master_key::store_secret(config, &secret, der.secret_der())?;
    Ok(CertStore::add(&state, entry)?)
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

/// `tollgate cert delete`: the entry, and a software key's sealed secret with it.
pub fn delete_cert(config: &Config, name: &str) -> Result<CertEntry, ManageError> {
    let state = StateDir::open(&config.state_dir)?;
    let entry = CertStore::delete(&state, name)?;
    if let crate::pki::KeyLocation::Software { secret, .. } = &entry.key {
        master_key::remove_secret(config, secret)?;
    }
    Ok(entry)
}

/// `tollgate api-token set`: the management API's bearer token, sealed under the master key.
pub fn set_api_token(config: &Config, token: &secrecy::SecretString) -> Result<(), ManageError> {
    use secrecy::ExposeSecret;
    let token = token.expose_secret();
    if token.len() < 16 || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ManageError::Usage("the API token must be at least 16 printable characters, no spaces".into()));
    }
    master_key::store_secret(config, crate::vault::master::API_TOKEN_SECRET, token.as_bytes())
}

/// The management API token: from `[management] token_file` when configured, else the one
/// sealed under the master key (`hsm` unwraps it when HSM-encrypted); `None` when neither.
pub fn api_token(config: &Config, hsm: Option<&Hsm>) -> Result<Option<secrecy::SecretString>, ManageError> {
    if let Some(source) = &config.management_token() {
        return Ok(Some(
            crate::vault::load(source, "management API token").map_err(|e| ManageError::Usage(e.to_string()))?,
        ));
    }
    let state = StateDir::open(&config.state_dir)?;
    match crate::vault::master::load(&state).map_err(ManageError::MasterKey)? {
        Some(file) if file.secrets.contains_key(crate::vault::master::API_TOKEN_SECRET) => {}
        _ => return Ok(None),
    }
    let owned;
    let hsm = match hsm {
        Some(hsm) => Some(hsm),
        None if config.hsm.servers.is_empty() => None,
        None => {
            owned = Hsm::open(&config.hsm);
            Some(&owned)
        }
    };
    let vault = master_key::vault(config, hsm)?.ok_or_else(|| ManageError::MasterKey("no master key".into()))?;
    let token = vault.secret(crate::vault::master::API_TOKEN_SECRET).map_err(ManageError::MasterKey)?;
    let token = token.map(|t| String::from_utf8_lossy(&t).into_owned());
    Ok(token.map(secrecy::SecretString::from))
}

/// `tollgate cert export`: a certificate as PEM.
pub fn export_cert(config: &Config, name: &str, out: &std::path::Path) -> Result<(), ManageError> {
    let state = StateDir::open(&config.state_dir)?;
    let store = CertStore::load(&state)?;
    let entry = store.entries().iter().find(|e| e.name == name).ok_or_else(|| PkiError::Store {
        path: "certs.json".into(),
        reason: format!("no certificate named {name:?}"),
    })?;
    export_pem(entry, out)
}

fn export_pem(entry: &CertEntry, path: &std::path::Path) -> Result<(), ManageError> {
    crate::state::write_atomic(path, entry.cert_pem.as_bytes(), crate::state::Mode::Public)
        .map_err(|source| ManageError::Write { path: path.display().to_string(), source })
}
