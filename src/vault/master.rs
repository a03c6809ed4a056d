//! The master key (M1–M5): AES-256, encrypting every secret tollgate stores, kept in
//! `master-key.json` either sealed under the device key or encrypted by an AES wrapping key on
//! the HSM (generated there, non-extractable; C_Encrypt/C_Decrypt with AES-GCM, a fresh 96-bit
//! IV and associated data naming the key generation). Rotation creates the next wrapping key
//! generation on the HSM and re-encrypts the master key with it; older generations are kept.
//! Every write is one atomic rename, so a crash at any instant leaves a file that opens.
//!
//! The secrets sealed under the master key live in the same file, so changing the master key
//! re-encrypts all of them in the same single rename (M4): there is never a moment when some
//! secrets are sealed under a key the file does not hold.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use zeroize::Zeroizing;

use super::SealingKey;
use crate::hex;
use crate::state::StateDir;

/// The state file.
pub const FILE: &str = "master-key.json";
/// Labels of wrapping keys on the HSM: `PREFIX` + generation.
pub const WRAP_PREFIX: &str = "tollgate-mk-wrap-v";

/// `master-key.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MasterKeyFile {
    pub version: u32,
    /// The master key sealed under the device key (when not HSM-encrypted), hex.
    pub device_sealed: Option<String>,
    /// The master key encrypted on the HSM.
    pub hsm: Option<HsmWrapped>,
    /// The newest wrapping key generation created on the HSM (0: none).
    pub wrapping_key_generation: u32,
    pub lifetime_days: Option<u32>,
    pub reminder_days: Option<u32>,
    /// RFC 3339, when HSM encryption was set up with a lifetime.
    pub expires_at: Option<String>,
    /// Secrets sealed under the master key, by name: hex of `TGS1 ‖ nonce ‖ ciphertext ‖ tag`
    /// with the name in the associated data.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secrets: BTreeMap<String, String>,
}

/// The master key encrypted by wrapping key `generation`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HsmWrapped {
    pub generation: u32,
    /// Hex.
    pub iv: String,
    /// AES-GCM ciphertext and tag, hex.
    pub ciphertext: String,
}

impl HsmWrapped {
    /// The master key encrypted by wrapping key `generation`: what the HSM's encryption gave.
    pub fn new(generation: u32, iv: &[u8; 12], ciphertext: &[u8]) -> Self {
        Self { generation, iv: hex::encode(iv), ciphertext: hex::encode(ciphertext) }
    }

    /// The label of the wrapping key on the HSM.
    pub fn label(&self) -> String {
        wrap_label(self.generation)
    }

    /// The 96-bit IV.
    pub fn iv(&self) -> Result<[u8; 12], String> {
        hex::decode(&self.iv)?.try_into().map_err(|_| "IV is not 12 bytes".into())
    }

    /// The ciphertext and tag.
    pub fn ciphertext(&self) -> Result<Vec<u8>, String> {
        hex::decode(&self.ciphertext)
    }

    /// The associated data binding it to its generation.
    pub fn aad(&self) -> Vec<u8> {
        aad(self.generation)
    }
}

/// Decrypts a master key wrapped on the HSM: the HSM layer's AES-GCM decryption, passed in by
/// the caller, so the vault never knows the HSM.
pub type Unwrap<'a> = &'a dyn Fn(&HsmWrapped) -> Result<Zeroizing<Vec<u8>>, String>;

/// The label of wrapping key `generation` on the HSM.
pub fn wrap_label(generation: u32) -> String {
    format!("{WRAP_PREFIX}{generation}")
}

/// `tollgate master-key status --json`.
#[derive(Clone, Debug, Serialize)]
pub struct MasterKeyStatus {
    /// Whether a master key exists.
    pub configured: bool,
    pub hsm_encrypted: bool,
    pub wrapping_key_generation: u32,
    pub expires_at: Option<String>,
    /// Inside the reminder window (or expired).
    pub reminder: bool,
    pub expired: bool,
    /// Whether the master key opened (unwrapped by the HSM, or unsealed) just now.
    pub opens: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Associated data binding a wrapped master key to its generation.
pub fn aad(generation: u32) -> Vec<u8> {
    format!("tollgate master key|wrap generation {generation}").into_bytes()
}

/// Purpose of the device-sealed master key.
pub const DEVICE_PURPOSE: &str = "tollgate master key";

/// A fresh random master key.
pub fn generate() -> Zeroizing<[u8; 32]> {
    Zeroizing::new(crate::keys::random())
}

/// Whether `now` is inside the reminder window of a key expiring at `expires` (or past it).
pub fn reminder_due(expires: OffsetDateTime, reminder_days: u32, now: OffsetDateTime) -> bool {
    now >= expires - time::Duration::days(i64::from(reminder_days))
}

/// Checks lifetime 1–730 and reminder 1–365 days, reminder below lifetime.
pub fn check_lifetime(lifetime: u32, reminder: u32) -> Result<(), String> {
    if !(1..=730).contains(&lifetime) {
        return Err(format!("--lifetime {lifetime}: must be 1–730 days"));
    }
    if !(1..=365).contains(&reminder) {
        return Err(format!("--reminder {reminder}: must be 1–365 days"));
    }
    if reminder >= lifetime {
        return Err(format!("--reminder {reminder} must be less than --lifetime {lifetime}"));
    }
    Ok(())
}

/// Name of a certificate's software private key among the secrets.
pub fn cert_key_secret(cert: &str) -> String {
    format!("cert-key:{cert}")
}

/// Name of the management API token among the secrets.
pub const API_TOKEN_SECRET: &str = "api-token";

/// Associated data of a secret sealed under the master key.
fn secret_purpose(name: &str) -> String {
    format!("tollgate secret|{name}")
}

/// Reads `master-key.json`; `None` when there is none yet.
pub fn load(state: &StateDir) -> Result<Option<MasterKeyFile>, String> {
    let path = state.path(FILE);
    let Some(bytes) = state.read(FILE).map_err(|e| e.to_string())? else { return Ok(None) };
    serde_json::from_slice(&bytes).map(Some).map_err(|e| format!("{}: {e}", path.display()))
}

/// The master key, opened: unwrapped by the HSM (`unwrap`), or unsealed with the device key.
pub fn open_key(
    state: &StateDir,
    file: &MasterKeyFile,
    unwrap: Option<Unwrap<'_>>,
) -> Result<Zeroizing<[u8; 32]>, String> {
    let bytes = match (&file.hsm, &file.device_sealed) {
        (Some(wrapped), _) => {
            let unwrap = unwrap.ok_or("the master key is HSM-encrypted and no HSM is open")?;
            unwrap(wrapped).map_err(|e| format!("unwrapping with {}: {e}", wrapped.label()))?
        }
        (None, Some(sealed)) => {
            let key = device_key(state).map_err(|e| e.to_string())?;
            key.open(DEVICE_PURPOSE, &hex::decode(sealed)?).ok_or("the device key does not open the master key")?
        }
        (None, None) => return Err("no master key is stored".into()),
    };
    let key: [u8; 32] = bytes.as_slice().try_into().map_err(|_| "the master key is not 32 bytes")?;
    Ok(Zeroizing::new(key))
}

/// The per-installation device key (created on first use).
pub fn device_key(state: &StateDir) -> Result<SealingKey, super::VaultError> {
    SealingKey::load_or_create(&super::device_key_file(state.root()))
}

/// Seals `secret` under `master` as secret `name` (hex, for the file).
pub fn seal_secret(master: &[u8; 32], name: &str, secret: &[u8]) -> String {
    let key = SealingKey::from_bytes(Zeroizing::new(*master));
    hex::encode(&key.seal(&secret_purpose(name), secret))
}

/// Opens secret `name` (hex from the file) with `master`.
pub fn open_secret(master: &[u8; 32], name: &str, sealed: &str) -> Result<Zeroizing<Vec<u8>>, String> {
    let key = SealingKey::from_bytes(Zeroizing::new(*master));
    key.open(&secret_purpose(name), &hex::decode(sealed)?)
        .ok_or_else(|| format!("secret {name:?} does not open with the master key (corrupt or tampered with)"))
}

/// The master key, opened, with the secrets it seals: what the service and the CLI read
/// software keys and the API token from.
pub struct Vault {
    key: Zeroizing<[u8; 32]>,
    secrets: BTreeMap<String, String>,
}

impl Vault {
    /// Opens the master key (through `unwrap` when it is HSM-encrypted). `Ok(None)` when no
    /// master key exists yet.
    pub fn open(state: &StateDir, unwrap: Option<Unwrap<'_>>) -> Result<Option<Self>, String> {
        let Some(file) = load(state)? else { return Ok(None) };
        let key = open_key(state, &file, unwrap).map_err(|e| format!("the master key does not open: {e}"))?;
        Ok(Some(Self { key, secrets: file.secrets }))
    }

    /// Secret `name`, decrypted; `Ok(None)` when there is no such secret.
    pub fn secret(&self, name: &str) -> Result<Option<Zeroizing<Vec<u8>>>, String> {
        self.secrets.get(name).map(|sealed| open_secret(&self.key, name, sealed)).transpose()
    }
}

/// Stops the process at a named step when `TOLLGATE_FAILPOINT` names it: how the crash-safety
/// tests kill a rotation at every step. Compiled only into test builds (the `failpoints`
/// feature, which `deploy/test` enables); in every other build it is nothing.
#[cfg(feature = "failpoints")]
pub fn failpoint(name: &str) {
    if std::env::var("TOLLGATE_FAILPOINT").is_ok_and(|v| v == name) {
        std::process::abort();
    }
}

/// See the `failpoints` build: nothing here.
#[cfg(not(feature = "failpoints"))]
pub fn failpoint(_name: &str) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_bound_to_their_name_and_key() {
        let key = *generate();
        let sealed = seal_secret(&key, "cert-key:a", b"private");
        assert_eq!(open_secret(&key, "cert-key:a", &sealed).unwrap().as_slice(), b"private");
        assert!(open_secret(&key, "cert-key:b", &sealed).is_err(), "sealed for another name");
        assert!(open_secret(&generate(), "cert-key:a", &sealed).is_err(), "another master key");
    }

    #[test]
    fn lifetimes_are_checked() {
        assert!(check_lifetime(365, 30).is_ok());
        assert!(check_lifetime(0, 1).is_err());
        assert!(check_lifetime(731, 1).is_err());
        assert!(check_lifetime(30, 366).is_err());
        assert!(check_lifetime(30, 30).unwrap_err().contains("less than"));
    }

    #[test]
    fn the_reminder_window_opens_before_expiry() {
        let expires = OffsetDateTime::UNIX_EPOCH + time::Duration::days(100);
        assert!(!reminder_due(expires, 10, OffsetDateTime::UNIX_EPOCH + time::Duration::days(89)));
        assert!(reminder_due(expires, 10, OffsetDateTime::UNIX_EPOCH + time::Duration::days(90)));
        assert!(reminder_due(expires, 10, OffsetDateTime::UNIX_EPOCH + time::Duration::days(101)));
    }
}
