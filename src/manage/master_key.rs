//! Master key operations (SPEC M1–M5), one implementation for the CLI and the API. Every change
//! happens under the state directory's lock and lands with one atomic rename of
//! `master-key.json`, so concurrent commands cannot interleave and a crash leaves a file that
//! opens.

use time::OffsetDateTime;
use zeroize::Zeroizing;

use super::{Context, ManageError, SecretInput};
use crate::hex;
use crate::hsm::Hsm;
use crate::state::{Mode, StateDir};
use crate::vault::master::{self, HsmWrapped, MasterKeyFile, MasterKeyStatus};

/// `tollgate master-key status`: what the file says, and whether the key opens now.
pub fn status(ctx: &Context) -> Result<MasterKeyStatus, ManageError> {
    let state = ctx.state()?;
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
    let hsm = file.hsm.is_some().then(|| ctx.hsm());
    let opened = open(&state, &file, hsm.map(|h| &**h));
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
/// current one is (HSM-encrypted with the current generation, or device-sealed), with every
/// secret re-encrypted under it in the same atomic write (M4). Refused, with nothing changed,
/// when stored secrets exist and the current master key does not open.
pub fn set(ctx: &Context, new: Option<&SecretInput>) -> Result<MasterKeyStatus, ManageError> {
    let state = ctx.state()?;
    {
        let _lock = state.lock()?;
        let key = match new {
            Some(input) => parse_master_key(input)?,
            None => master::generate(),
        };
        let mut file = load(&state)?.unwrap_or_else(empty);
        let hsm = file.hsm.is_some().then(|| ctx.hsm_up()).transpose()?;
        if !file.secrets.is_empty() {
            let old = open(&state, &file, hsm.map(|h| &**h)).map_err(|e| {
                ManageError::MasterKey(format!(
                    "{} stored secrets cannot be re-encrypted because the current master key does not open ({e}); nothing changed",
                    file.secrets.len()
                ))
            })?;
            for (name, sealed) in file.secrets.iter_mut() {
                let secret = master::open_secret(&old, name, sealed).map_err(ManageError::MasterKey)?;
                *sealed = master::seal_secret(&key, name, &secret);
            }
        }
        match (hsm, file.hsm.as_ref().map(|w| w.generation)) {
            (Some(hsm), Some(generation)) => file.hsm = Some(wrap(hsm, generation, &key)?),
            _ => {
                file.device_sealed =
                    Some(hex::encode(&device_key(&state)?.seal(master::DEVICE_PURPOSE, key.as_slice())))
            }
        }
        master::failpoint("set:before-write");
        save(&state, &file)?;
    }
    status(ctx)
}

/// A master key given as 64 hex digits.
fn parse_master_key(input: &SecretInput) -> Result<Zeroizing<[u8; 32]>, ManageError> {
    use secrecy::ExposeSecret;
    let text = input.read("master key")?;
    let bytes =
        Zeroizing::new(hex::decode(text.expose_secret().trim().trim_start_matches("0x")).map_err(ManageError::Usage)?);
    let key: [u8; 32] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| ManageError::Usage("the master key must be 64 hex digits (32 bytes)".into()))?;
    Ok(Zeroizing::new(key))
}

/// Stores `secret` as `name`, sealed under the master key (one is created, device-sealed,
/// when none exists yet). Under the state lock, one atomic write.
pub fn store_secret(ctx: &Context, name: &str, secret: &[u8]) -> Result<(), ManageError> {
    let state = ctx.state()?;
    let _lock = state.lock()?;
    let mut file = load(&state)?.unwrap_or_else(empty);
    let hsm = file.hsm.is_some().then(|| ctx.hsm_up()).transpose()?;
    let key = if file.hsm.is_none() && file.device_sealed.is_none() {
        let key = master::generate();
        file.device_sealed = Some(hex::encode(&device_key(&state)?.seal(master::DEVICE_PURPOSE, key.as_slice())));
        key
    } else {
        open(&state, &file, hsm.map(|h| &**h)).map_err(ManageError::MasterKey)?
    };
    file.secrets.insert(name.to_string(), master::seal_secret(&key, name, secret));
    save(&state, &file)
}

/// Removes secret `name`; whether it existed.
pub fn remove_secret(ctx: &Context, name: &str) -> Result<bool, ManageError> {
    let state = ctx.state()?;
    let _lock = state.lock()?;
    let Some(mut file) = load(&state)? else { return Ok(false) };
    if file.secrets.remove(name).is_none() {
        return Ok(false);
    }
    save(&state, &file)?;
    Ok(true)
}

/// Opens the vault (the master key and its secrets) for reading; `None` without a master key.
pub fn vault(ctx: &Context) -> Result<Option<master::Vault>, ManageError> {
    let state = ctx.state()?;
    let hsm = ctx.configured_hsm();
    match hsm {
        Some(hsm) => master::Vault::open(&state, Some(&|w| hsm.unwrap_master_key(w))),
        None => master::Vault::open(&state, None),
    }
    .map_err(ManageError::MasterKey)
}

/// The master key, opened (the HSM unwraps it when it is HSM-encrypted).
fn open(state: &StateDir, file: &MasterKeyFile, hsm: Option<&Hsm>) -> Result<Zeroizing<[u8; 32]>, String> {
    match hsm {
        Some(hsm) => master::open_key(state, file, Some(&|w| hsm.unwrap_master_key(w))),
        None => master::open_key(state, file, None),
    }
}

/// `tollgate master-key encrypt-with-hsm`: the master key encrypted by the newest wrapping key
/// generation on the HSM (created when there is none), with a lifetime and reminder.
pub fn encrypt_with_hsm(ctx: &Context, lifetime: u32, reminder: u32) -> Result<MasterKeyStatus, ManageError> {
    master::check_lifetime(lifetime, reminder).map_err(ManageError::Usage)?;
    let state = ctx.state()?;
    {
        let _lock = state.lock()?;
        let hsm = ctx.hsm_up()?;
        let mut file = load(&state)?.unwrap_or_else(empty);
        let key = match open(&state, &file, Some(hsm)) {
            Ok(key) => key,
            Err(_) if file.device_sealed.is_none() && file.hsm.is_none() => master::generate(),
            Err(e) => return Err(ManageError::MasterKey(e)),
        };
        if file.wrapping_key_generation == 0 {
            file.wrapping_key_generation = 1;
            create_wrapping_key(hsm, 1)?;
        }
        file.hsm = Some(wrap(hsm, file.wrapping_key_generation, &key)?);
        file.device_sealed = None;
        file.lifetime_days = Some(lifetime);
        file.reminder_days = Some(reminder);
        let expires = OffsetDateTime::now_utc() + time::Duration::days(i64::from(lifetime));
        file.expires_at = expires.format(&time::format_description::well_known::Rfc3339).ok();
        save(&state, &file)?;
    }
    status(ctx)
}

/// `tollgate hsm rotate-wrapping-key`: a new wrapping key generation on the HSM and, when the
/// master key is HSM-encrypted, the master key re-encrypted under it. Old generations stay.
/// Killed at any step, the file still names a generation that decrypts it.
pub fn rotate_wrapping_key(ctx: &Context) -> Result<MasterKeyStatus, ManageError> {
    let state = ctx.state()?;
    {
        let _lock = state.lock()?;
        let hsm = ctx.hsm_up()?;
        let mut file = load(&state)?.unwrap_or_else(empty);
        let next = file.wrapping_key_generation + 1;
        create_wrapping_key(hsm, next)?;
        master::failpoint("rotate:after-generate");
        if file.hsm.is_some() {
            let key = open(&state, &file, Some(hsm)).map_err(ManageError::MasterKey)?;
            master::failpoint("rotate:after-unwrap");
            file.hsm = Some(wrap(hsm, next, &key)?);
            master::failpoint("rotate:after-wrap");
        }
        file.wrapping_key_generation = next;
        save(&state, &file)?;
        master::failpoint("rotate:after-write");
    }
    status(ctx)
}

fn wrap(hsm: &Hsm, generation: u32, key: &[u8; 32]) -> Result<HsmWrapped, ManageError> {
    let (iv, ciphertext) = hsm.wrap(&master::wrap_label(generation), &master::aad(generation), key)?;
    Ok(HsmWrapped::new(generation, &iv, &ciphertext))
}

/// Creates wrapping key `generation`; one left by an interrupted rotation is reused.
fn create_wrapping_key(hsm: &Hsm, generation: u32) -> Result<(), ManageError> {
    match hsm.generate_wrapping_key(&master::wrap_label(generation)) {
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
        secrets: Default::default(),
    }
}

fn device_key(state: &StateDir) -> Result<crate::vault::SealingKey, ManageError> {
    Ok(master::device_key(state)?)
}

fn load(state: &StateDir) -> Result<Option<MasterKeyFile>, ManageError> {
    master::load(state).map_err(ManageError::MasterKey)
}

fn save(state: &StateDir, file: &MasterKeyFile) -> Result<(), ManageError> {
    let json = serde_json::to_vec_pretty(file).expect("the master key file serialises");
    state.write_atomic(master::FILE, &json, Mode::Secret)?;
    Ok(())
}
