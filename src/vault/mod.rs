//! Secrets at rest, sealed with AES-256-GCM under one of two keys:
//! - the device key (`device.key`, 0600), which seals HSM partition passwords (user PINs) and,
//!   until it is HSM-encrypted, the master key. Deliberately not the master key for PINs: the
//!   HSM must unwrap the master key, so the PIN that opens the HSM cannot depend on it.
//! - the master key (`master.rs`), which seals every other secret: software private keys and
//!   the management API token.
//!
//! Sealed blobs are `TGS1 ‖ nonce (12) ‖ AES-256-GCM(ciphertext ‖ tag)`, with associated data
//! naming what the secret is for, so one sealed secret cannot be passed off as another.

//!
//! It also opens the secrets the configuration points at (`config::SecretSource`): a file, an
//! environment variable, or a partition password sealed here. It knows nothing of the HSM: a
//! master key wrapped on the HSM is unwrapped by a function the caller passes in.

use std::path::{Path, PathBuf};

pub mod master;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use secrecy::SecretString;
use zeroize::Zeroizing;

use crate::config::SecretSource;
use crate::state::{Mode, write_atomic};

const MAGIC: &[u8; 4] = b"TGS1";

/// Errors sealing or opening secrets.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
    #[error("{path}: cannot be opened with this device key (corrupt, or sealed for something else)")]
    Open { path: String },
    #[error("{what} ({from}): {reason}")]
    Secret { what: String, from: String, reason: String },
}

/// Reads the secret `source` points at; `what` names it in errors. Trailing newlines of files
/// are not part of it; an empty secret is an error.
pub fn load(source: &SecretSource, what: &str) -> Result<SecretString, VaultError> {
    let err = |reason: String| VaultError::Secret { what: what.to_string(), from: source.to_string(), reason };
    let mut value = Zeroizing::new(match source {
        SecretSource::File(path) => std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?,
        SecretSource::Env(var) => std::env::var(var).map_err(|_| err("not set".into()))?,
        SecretSource::SealedPin { state_dir, server } => {
            let file = sealed_pin_file(state_dir, server);
            if !file.exists() {
                return Err(err(format!(
                    "none stored ({} missing): set pin_file or pin_env, or run `tollgate hsm login`",
                    file.display()
                )));
            }
            let key = SealingKey::load(&device_key_file(state_dir)).map_err(|e| err(e.to_string()))?;
            let bytes = key.open_from(&file, &pin_purpose(server)).map_err(|e| err(e.to_string()))?;
            String::from_utf8(bytes.to_vec()).map_err(|_| err("sealed value is not UTF-8".into()))?
        }
    });
    let trimmed_len = value.trim_end_matches(['\r', '\n']).len();
    value.truncate(trimmed_len);
    if value.is_empty() {
        return Err(err("empty".into()));
    }
    Ok(SecretString::from(value.to_string()))
}

/// Seals an HSM server's partition password in the state directory (under the device key,
/// created when missing); where it went.
pub fn seal_pin(state_dir: &Path, server: &str, pin: &SecretString) -> Result<PathBuf, VaultError> {
    use secrecy::ExposeSecret;
    let key = SealingKey::load_or_create(&device_key_file(state_dir))?;
    let file = sealed_pin_file(state_dir, server);
    key.seal_to(&file, &pin_purpose(server), pin.expose_secret().as_bytes())?;
    Ok(file)
}

/// Removes a sealed partition password; whether there was one.
pub fn remove_sealed_pin(state_dir: &Path, server: &str) -> Result<bool, VaultError> {
    let file = sealed_pin_file(state_dir, server);
    match std::fs::remove_file(&file) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(file_err(&file, e)),
    }
}

/// Where `tollgate hsm login` seals a server's partition password.
pub fn sealed_pin_file(state_dir: &Path, server: &str) -> PathBuf {
    state_dir.join("hsm").join(format!("{server}.pin.sealed"))
}

/// The per-installation device key.
pub fn device_key_file(state_dir: &Path) -> PathBuf {
    state_dir.join("device.key")
}

/// Associated data of a sealed partition password: it opens for this server only.
fn pin_purpose(server: &str) -> String {
    format!("tollgate hsm partition password:{server}")
}

/// An AES-256-GCM key that seals secrets: the device key or the master key.
pub struct SealingKey {
    key: Zeroizing<[u8; 32]>,
}

impl SealingKey {
    /// A key from its 32 bytes.
    pub fn from_bytes(key: Zeroizing<[u8; 32]>) -> Self {
        Self { key }
    }

    /// Reads the device key, creating it (random, 0600) when absent.
    pub fn load_or_create(path: &Path) -> Result<Self, VaultError> {
        if !path.exists() {
            let key: Zeroizing<[u8; 32]> = Zeroizing::new(crate::keys::random());
            write_atomic(path, key.as_slice(), Mode::Secret).map_err(|e| file_err(path, e))?;
        }
        Self::load(path)
    }

    /// Reads the device key.
    pub fn load(path: &Path) -> Result<Self, VaultError> {
        let bytes = Zeroizing::new(std::fs::read(path).map_err(|e| file_err(path, e))?);
        let key: [u8; 32] = bytes.as_slice().try_into().map_err(|_| file_err(path, "device key must be 32 bytes"))?;
        Ok(Self { key: Zeroizing::new(key) })
    }

    /// Seals `secret` for `purpose`: `TGS1 ‖ nonce ‖ ciphertext ‖ tag`.
    pub fn seal(&self, purpose: &str, secret: &[u8]) -> Vec<u8> {
        let nonce: [u8; NONCE_LEN] = crate::keys::random();
        let mut buf = Zeroizing::new(secret.to_vec());
        self.cipher()
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(purpose.as_bytes()), &mut *buf)
            .expect("AES-GCM sealing of an in-memory buffer cannot fail");
        let mut out = Vec::with_capacity(4 + NONCE_LEN + buf.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&buf);
        out
    }

    /// Opens what `seal` made for `purpose`; `None` when it was not (or was tampered with).
    pub fn open(&self, purpose: &str, sealed: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
        if sealed.len() < 4 + NONCE_LEN || &sealed[..4] != MAGIC {
            return None;
        }
        let nonce: [u8; NONCE_LEN] = sealed[4..4 + NONCE_LEN].try_into().ok()?;
        let mut buf = Zeroizing::new(sealed[4 + NONCE_LEN..].to_vec());
        let len = self
            .cipher()
            .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(purpose.as_bytes()), &mut buf)
            .ok()?
            .len();
        buf.truncate(len);
        Some(buf)
    }

    /// Seals `secret` for `purpose` into `path` (0600, atomic; the directory is created 0700).
    pub fn seal_to(&self, path: &Path, purpose: &str, secret: &[u8]) -> Result<(), VaultError> {
        if let Some(dir) = path.parent() {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(|e| file_err(dir, e))?;
        }
        write_atomic(path, &self.seal(purpose, secret), Mode::Secret).map_err(|e| file_err(path, e))
    }

    /// Opens what `seal_to` wrote for `purpose`.
    pub fn open_from(&self, path: &Path, purpose: &str) -> Result<Zeroizing<Vec<u8>>, VaultError> {
        let sealed = std::fs::read(path).map_err(|e| file_err(path, e))?;
        self.open(purpose, &sealed).ok_or_else(|| VaultError::Open { path: path.display().to_string() })
    }

    fn cipher(&self) -> LessSafeKey {
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, self.key.as_slice()).expect("32-byte AES-256 key"))
    }
}

fn file_err(path: &Path, reason: impl std::fmt::Display) -> VaultError {
    VaultError::File { path: path.display().to_string(), reason: reason.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_secrets_round_trip_and_are_bound_to_their_purpose() {
        let dir = tempfile::tempdir().unwrap();
        let key = SealingKey::load_or_create(&dir.path().join("device.key")).unwrap();
        let file = dir.path().join("a.sealed");
        key.seal_to(&file, "pin:a", b"1234-secret").unwrap();
        assert_eq!(key.open_from(&file, "pin:a").unwrap().as_slice(), b"1234-secret");
        assert!(key.open_from(&file, "pin:b").is_err(), "sealed for another purpose");
        let raw = std::fs::read(&file).unwrap();
        assert!(!raw.windows(11).any(|w| w == b"1234-secret"), "never stored in the clear");
        use std::os::unix::fs::PermissionsExt;
        for f in ["device.key", "a.sealed"] {
            let mode = std::fs::metadata(dir.path().join(f)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{f}");
        }
        let other = SealingKey::load_or_create(&dir.path().join("other.key")).unwrap();
        assert!(other.open_from(&file, "pin:a").is_err(), "another device key cannot open it");
    }
}
