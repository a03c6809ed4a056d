//! The management plane: operator operations shared by the CLI and the HTTP API, so the two
//! cannot drift apart.

pub mod api;

use std::sync::Arc;

use crate::config::Config;
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
    #[error("writing {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: crate::state::StateError,
    },
}

/// `tollgate hsm status`: connects to every server and reports.
pub fn hsm_status(config: &Config) -> Status {
    Hsm::open(&config.hsm.servers).status()
}

/// `tollgate cert list`.
pub fn cert_list(config: &Config) -> Result<Vec<CertSummary>, ManageError> {
    let state = StateDir::open(&config.state_dir)?;
    let store = CertStore::load(&state)?;
    let hsm = (!config.hsm.servers.is_empty()).then(|| Arc::new(Hsm::open(&config.hsm.servers)));
    Ok(store.summaries(hsm.as_ref()))
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
    let hsm = Arc::new(Hsm::open_strict(&config.hsm.servers)?);
    let entry = CertStore::generate_ca(&state, &hsm, name, algorithm, role)?;
    if let Some(path) = out_cert {
        export_pem(&entry, path)?;
    }
    Ok(entry)
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
