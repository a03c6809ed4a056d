//! Master key operations (SPEC M1–M5), one implementation for the CLI and the API. Every change
//! happens under the state directory's lock and lands with one atomic rename of
//! `master-key.json`, so concurrent commands cannot interleave and a crash leaves a file that
//! opens.

use std::sync::Arc;

use time::OffsetDateTime;
use zeroize::Zeroizing;

use super::ManageError;
use crate::config::Config;
use crate::hsm::Hsm;
use crate::state::{Mode, StateDir};
use crate::vault::DeviceKey;
use crate::vault::master::{self, HsmWrapped, MasterKeyFile, MasterKeyStatus};

/// `tollgate master-key status`: what the file says, and whether the key opens now.
pub fn status(config: &Config) -> Result<MasterKeyStatus, ManageError> {
    let state = StateDir::open(&config.state_dir)?;
    let Some(file) = load(&state)? else {
        return Ok(MasterKeyStatus {
            configured: false,
            hsm_encrypted: false,
            wrapping_key_generation: 0,
            expires_at: None,
            reminder: false,
            expired: false,
            opens: false,
            error: None,
        });
    };
    let hsm = file.hsm.is_some().then(|| Arc::new(Hsm::open(&config.hsm)));
    let opened = open(&state, &file, hsm.as_deref());
    let now = OffsetDateTime::now_utc();
    let expires = file
        .expires_at
        .as_deref()
        .and_then(|e| OffsetDateTime::parse(e, &time::format_description::well_known::Rfc3339).ok());
    Ok(MasterKeyStatus {
        configured: true,
        hsm_encrypted: file.hsm.is_some(),
        wrapping_key_generation: file.wrapping_key_generation,
        reminder: expires.is_some_and(|e| master::reminder_due(e, file.reminder_days.unwrap_or(0), now)),
        expired: expires.is_some_and(|e| now >= e),
        expires_at: file.expires_at.clone(),
        opens: opened.is_ok(),
        error: opened.err(),
    })
}

/// `tollgate master-key set`: a new master key (given, or generated), stored the way the
/// current one is (HSM-encrypted with the current generation, or device-sealed).
pub fn set(config: &Config, new: Option<Zeroizing<[u8; 32]>>) -> Result<MasterKeyStatus, ManageError> {
    let state = StateDir::open(&config.state_dir)?;
    {
        let _lock = state.lock()?;
        let key = new.unwrap_or_else(master::generate);
        let mut file = load(&state)?.unwrap_or_else(empty);
        match file.hsm.as_ref().map(|w| w.generation) {
            Some(generation) => {
                let hsm = Hsm::open_strict(&config.hsm)?;
                file.hsm = Some(wrap(&hsm, generation, &key)?);
            }
            None => file.device_sealed = Some(hex(&device_key(&state)?.seal(master::DEVICE_PURPOSE, key.as_slice()))),
        }
        // NOTE: secrets sealed under the master key are re-encrypted here, in the same atomic
        // write, as they are added (software keys and API tokens arrive with them).
        save(&state, &file)?;
    }
    status(config)
}

/// `tollgate master-key encrypt-with-hsm`: the master key encrypted by the newest wrapping key
/// generation on the HSM (created when there is none), with a lifetime and reminder.
pub fn encrypt_with_hsm(config: &Config, lifetime: u32, reminder: u32) -> Result<MasterKeyStatus, ManageError> {
    master::check_lifetime(lifetime, reminder).map_err(ManageError::Usage)?;
    let state = StateDir::open(&config.state_dir)?;
    {
        let _lock = state.lock()?;
        let hsm = Hsm::open_strict(&config.hsm)?;
        let mut file = load(&state)?.unwrap_or_else(empty);
        let key = match open(&state, &file, Some(&hsm)) {
            Ok(key) => key,
            Err(_) if file.device_sealed.is_none() && file.hsm.is_none() => master::generate(),
            Err(e) => return Err(ManageError::MasterKey(e)),
        };
        if file.wrapping_key_generation == 0 {
            file.wrapping_key_generation = 1;
            create_wrapping_key(&hsm, 1)?;
        }
        file.hsm = Some(wrap(&hsm, file.wrapping_key_generation, &key)?);
        file.device_sealed = None;
        file.lifetime_days = Some(lifetime);
        file.reminder_days = Some(reminder);
        let expires = OffsetDateTime::now_utc() + time::Duration::days(i64::from(lifetime));
        file.expires_at = expires.format(&time::format_description::well_known::Rfc3339).ok();
        save(&state, &file)?;
    }
    status(config)
}

/// `tollgate hsm rotate-wrapping-key`: a new wrapping key generation on the HSM and, when the
/// master key is HSM-encrypted, the master key re-encrypted under it. Old generations stay.
/// Killed at any step, the file still names a generation that decrypts it.
pub fn rotate_wrapping_key(config: &Config) -> Result<MasterKeyStatus, ManageError> {
    let state = StateDir::open(&config.state_dir)?;
    {
        let _lock = state.lock()?;
        let hsm = Hsm::open_strict(&config.hsm)?;
        let mut file = load(&state)?.unwrap_or_else(empty);
        let next = file.wrapping_key_generation + 1;
        create_wrapping_key(&hsm, next)?;
        master::failpoint("rotate:after-generate");
        if file.hsm.is_some() {
            let key = open(&state, &file, Some(&hsm)).map_err(ManageError::MasterKey)?;
            master::failpoint("rotate:after-unwrap");
            file.hsm = Some(wrap(&hsm, next, &key)?);
            master::failpoint("rotate:after-wrap");
        }
        file.wrapping_key_generation = next;
        save(&state, &file)?;
        master::failpoint("rotate:after-write");
    }
    status(config)
}

/// The master key, opened: unwrapped by the HSM, or unsealed with the device key.
fn open(state: &StateDir, file: &MasterKeyFile, hsm: Option<&Hsm>) -> Result<Zeroizing<[u8; 32]>, String> {
    let bytes = match (&file.hsm, &file.device_sealed) {
        (Some(wrapped), _) => {
            let hsm = hsm.ok_or("the master key is HSM-encrypted and no HSM is open")?;
            let iv: [u8; 12] = unhex(&wrapped.iv)?.try_into().map_err(|_| "IV is not 12 bytes")?;
            let label = format!("{}{}", master::WRAP_PREFIX, wrapped.generation);
            hsm.unwrap(&label, &iv, &master::aad(wrapped.generation), &unhex(&wrapped.ciphertext)?)
                .map_err(|e| format!("unwrapping with {label}: {e}"))?
        }
        (None, Some(sealed)) => {
            let key = device_key(state).map_err(|e| e.to_string())?;
            key.open(master::DEVICE_PURPOSE, &unhex(sealed)?).ok_or("the device key does not open the master key")?
        }
        (None, None) => return Err("no master key is stored".into()),
    };
    let key: [u8; 32] = bytes.as_slice().try_into().map_err(|_| "the master key is not 32 bytes")?;
    Ok(Zeroizing::new(key))
}

fn wrap(hsm: &Hsm, generation: u32, key: &[u8; 32]) -> Result<HsmWrapped, ManageError> {
    let label = format!("{}{generation}", master::WRAP_PREFIX);
    let (iv, ciphertext) = hsm.wrap(&label, &master::aad(generation), key)?;
    Ok(HsmWrapped { generation, iv: hex(&iv), ciphertext: hex(&ciphertext) })
}

/// Creates wrapping key `generation`; one left by an interrupted rotation is reused.
fn create_wrapping_key(hsm: &Hsm, generation: u32) -> Result<(), ManageError> {
    match hsm.generate_wrapping_key(&format!("{}{generation}", master::WRAP_PREFIX)) {
        Ok(()) | Err(crate::hsm::HsmError::KeyExists { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn empty() -> MasterKeyFile {
    MasterKeyFile {
        version: 1,
        device_sealed: None,
        hsm: None,
        wrapping_key_generation: 0,
        lifetime_days: None,
        reminder_days: None,
        expires_at: None,
    }
}

fn device_key(state: &StateDir) -> Result<DeviceKey, ManageError> {
    DeviceKey::load_or_create(&state.path("device.key")).map_err(ManageError::Vault)
}

fn load(state: &StateDir) -> Result<Option<MasterKeyFile>, ManageError> {
    let Some(bytes) = state.read(master::FILE)? else { return Ok(None) };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| ManageError::MasterKey(format!("{}: {e}", state.path(master::FILE).display())))
}

fn save(state: &StateDir, file: &MasterKeyFile) -> Result<(), ManageError> {
    let json = serde_json::to_vec_pretty(file).expect("the master key file serialises");
    state.write_atomic(master::FILE, &json, Mode::Secret)?;
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Result<Vec<u8>, String> {
    if !text.len().is_multiple_of(2) {
        return Err("odd number of hex digits".into());
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(&text[i..i + 2], 16).map_err(|e| e.to_string())).collect()
}
