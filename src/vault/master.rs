//! The master key (M1–M5): AES-256, encrypting every secret tollgate stores, kept in
//! `master-key.json` either sealed under the device key or encrypted by an AES wrapping key on
//! the HSM (generated there, non-extractable; C_Encrypt/C_Decrypt with AES-GCM, a fresh 96-bit
//! IV and associated data naming the key generation). Rotation creates the next wrapping key
//! generation on the HSM and re-encrypts the master key with it; older generations are kept.
//! Every write is one atomic rename, so a crash at any instant leaves a file that opens.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use zeroize::Zeroizing;

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
    Zeroizing::new(rand::random())
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

/// Stops the process at a named step when `TOLLGATE_FAILPOINT` names it: how the crash-safety
/// tests kill a rotation at every step.
pub fn failpoint(name: &str) {
    if std::env::var("TOLLGATE_FAILPOINT").is_ok_and(|v| v == name) {
        std::process::abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
