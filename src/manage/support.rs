//! The support file: a tar.gz a vendor's support engineer can read without being handed a
//! secret. Versions, the configuration with anything secret-looking redacted, HSM status and
//! info (never key material), the certificate list, the master key's status and the service's
//! recent log lines. Built by the service (`POST /api/v1/hsm/support-bundle`, which has the
//! log lines) or, when the service is not running, by the CLI alone.

use std::path::Path;

use serde::Serialize;

use super::{Context, ManageError};

/// Keys whose values never go into the bundle: the names secrets take in TOML files.
const SECRET_WORDS: [&str; 7] = ["pin", "password", "passphrase", "secret", "token", "key", "master"];

/// Builds the archive in memory; `logs` are the service's recent log lines, or why there are
/// none.
pub fn build(ctx: &Context, logs: Result<Vec<String>, String>) -> Result<Vec<u8>, ManageError> {
    let mut files: Vec<(&str, Vec<u8>)> = vec![
        ("versions.txt", versions().into_bytes()),
        ("config.toml", redacted_config(&ctx.config().path).into_bytes()),
        ("hsm-status.json", pretty(&super::hsm_status(ctx))),
        ("hsm-info.json", pretty(&super::hsm_info(ctx))),
    ];
    files.push(match super::cert_list(ctx) {
        Ok(rows) => ("certs.json", pretty(&rows)),
        Err(e) => ("certs.error.txt", format!("{e}\n").into_bytes()),
    });
    files.push(match super::master_key::status(ctx) {
        Ok(status) => ("master-key.json", pretty(&status)),
        Err(e) => ("master-key.error.txt", format!("{e}\n").into_bytes()),
    });
    files.push(match &logs {
        Ok(lines) => ("logs.txt", lines.concat().into_bytes()),
        Err(why) => ("logs.txt", format!("no log lines: {why}\n").into_bytes()),
    });
    archive(&files).map_err(|e| ManageError::Bundle(e.to_string()))
}

/// Writes a bundle to `out` atomically, readable by its owner only.
pub fn write(out: &Path, bytes: &[u8]) -> Result<(), ManageError> {
    crate::state::write_atomic(out, bytes, crate::state::Mode::Secret)
        .map_err(|source| ManageError::Write { path: out.display().to_string(), source })
}

fn versions() -> String {
    let openssl = std::process::Command::new("openssl")
        .arg("version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|e| format!("unavailable ({e})"));
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "tollgate {}\ntarget {}-{}\nkernel {}\nopenssl (system) {openssl}\n",
        env!("CARGO_PKG_VERSION"),
        std::env::consts::ARCH,
        std::env::consts::OS,
        kernel.trim(),
    )
}

/// The configuration re-serialised (comments dropped: they can hold anything) with the value
/// of every secret-looking key replaced. `*_file` and `*_env` keys name where a secret lives,
/// which support needs, and stay.
fn redacted_config(path: &Path) -> String {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) => return format!("# {} could not be read: {e}\n", path.display()),
    };
    let mut value: toml::Value = match toml::from_str(&text) {
        Ok(value) => value,
        Err(_) => return format!("# {} does not parse as TOML; left out\n", path.display()),
    };
    redact(&mut value);
    toml::to_string_pretty(&value).unwrap_or_default()
}

fn redact(value: &mut toml::Value) {
    match value {
        toml::Value::Table(table) => {
            // In an `[[hsm.server]]` (it has a `module`), `token` is the token's label.
            let hsm_server = table.contains_key("module");
            for (key, value) in table.iter_mut() {
                let key = key.to_ascii_lowercase();
                let reference = key.ends_with("_file") || key.ends_with("_env") || key.ends_with("_files");
                let label = hsm_server && key == "token";
                if !reference
                    && !label
                    && SECRET_WORDS.iter().any(|w| key.contains(w))
                    && !value.is_table()
                    && !value.is_array()
                {
                    *value = toml::Value::String("<redacted>".into());
                } else {
                    redact(value);
                }
            }
        }
        toml::Value::Array(items) => items.iter_mut().for_each(redact),
        _ => {}
    }
}

fn pretty<T: Serialize>(value: &T) -> Vec<u8> {
    let mut bytes = serde_json::to_vec_pretty(value).unwrap_or_default();
    bytes.push(b'\n');
    bytes
}

fn archive(files: &[(&str, Vec<u8>)]) -> std::io::Result<Vec<u8>> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    let mtime = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    for (name, bytes) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o600);
        header.set_mtime(mtime);
        header.set_cksum();
        tar.append_data(&mut header, format!("tollgate-support/{name}"), bytes.as_slice())?;
    }
    tar.into_inner()?.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_values_are_redacted_and_references_kept() {
        let mut value: toml::Value = toml::from_str(
            r#"
            state_dir = "/var/lib/tollgate"
            [management]
            token = "s3cret-token"
            token_file = "/etc/tollgate/token"
            [[hsm.server]]
            name = "a"
            module = "/usr/lib/softhsm/libsofthsm2.so"
            token = "partition-7"
            pin = "1234"
            user_password = "hunter2"
            pin_env = "HSM_PIN"
            "#,
        )
        .unwrap();
        redact(&mut value);
        let text = toml::to_string(&value).unwrap();
        for secret in ["s3cret-token", "1234", "hunter2"] {
            assert!(!text.contains(secret), "{secret} left in:\n{text}");
        }
        for kept in ["/etc/tollgate/token", "HSM_PIN", "/var/lib/tollgate", "partition-7"] {
            assert!(text.contains(kept), "{kept} missing:\n{text}");
        }
    }
}
