//! `tollgate hsm reset` and `tollgate hsm add-server`: the HSM servers of the configuration
//! file, edited in place (comments and layout kept) and written atomically; the rest of the file
//! and the state directory are never touched, except the sealed partition passwords reset
//! removes.

use std::path::Path;

use super::{Context, Done, ManageError};
use crate::config::Config;

/// A server for `add-server`.
pub struct NewServer<'a> {
    pub name: &'a str,
    pub module: &'a Path,
    pub token: &'a str,
    pub pin_file: Option<&'a Path>,
    pub pin_env: Option<&'a str>,
    pub address: Option<&'a str>,
}

/// What `reset` removed.
#[derive(Debug, serde::Serialize)]
pub struct ResetReport {
    pub servers: Vec<String>,
    pub sealed_pins: Vec<String>,
}

/// Removes every `[[hsm.server]]` and every stored partition password. Certificates, the
/// master key and its wrapping keys on the HSM stay, so adding the servers back restores all.
pub fn reset(ctx: &Context, confirmed: bool) -> Result<ResetReport, ManageError> {
    let config = ctx.config();
    if !confirmed {
        return Err(ManageError::Usage(format!(
            "hsm reset removes every [[hsm.server]] from {} and the stored partition passwords; pass --yes to do it",
            config.path.display()
        )));
    }
    let mut doc = read(&config.path)?;
    if let Some(hsm) = doc.get_mut("hsm").and_then(|h| h.as_table_like_mut()) {
        hsm.remove("server");
    }
    write(&config.path, &doc)?;
    let mut sealed_pins = Vec::new();
    for server in &config.hsm.servers {
        if crate::vault::remove_sealed_pin(&config.state_dir, &server.name)? {
            sealed_pins.push(crate::vault::sealed_pin_file(&config.state_dir, &server.name).display().to_string());
        }
    }
    let servers = config.hsm.servers.iter().map(|s| s.name.clone()).collect();
    tracing::warn!(?servers, "HSM servers and their stored credentials removed (hsm reset)");
    Ok(ResetReport { servers, sealed_pins })
}

/// Appends a `[[hsm.server]]`; the resulting file must load, or nothing is written.
pub fn add_server(ctx: &Context, server: &NewServer<'_>) -> Result<Done, ManageError> {
    let config = ctx.config();
    if config.hsm.servers.iter().any(|s| s.name == server.name) {
        return Err(ManageError::Usage(format!(
            "{}: [[hsm.server]] {:?} already exists",
            config.path.display(),
            server.name
        )));
    }
    let mut doc = read(&config.path)?;
    let mut table = toml_edit::Table::new();
    table.insert("name", toml_edit::value(server.name));
    table.insert("module", toml_edit::value(server.module.display().to_string()));
    table.insert("token", toml_edit::value(server.token));
    if let Some(file) = server.pin_file {
        table.insert("pin_file", toml_edit::value(file.display().to_string()));
    }
    if let Some(var) = server.pin_env {
        table.insert("pin_env", toml_edit::value(var));
    }
    if let Some(address) = server.address {
        table.insert("address", toml_edit::value(address));
    }
    let hsm = doc.entry("hsm").or_insert_with(|| {
        let mut t = toml_edit::Table::new();
        t.set_implicit(true);
        toml_edit::Item::Table(t)
    });
    let hsm = hsm
        .as_table_like_mut()
        .ok_or_else(|| ManageError::Usage(format!("{}: `hsm` is not a table", config.path.display())))?;
    let servers = hsm.entry("server").or_insert(toml_edit::Item::ArrayOfTables(Default::default()));
    servers
        .as_array_of_tables_mut()
        .ok_or_else(|| {
            ManageError::Usage(format!("{}: `hsm.server` is not an array of tables", config.path.display()))
        })?
        .push(table);
    Config::from_toml(&doc.to_string(), &config.path)?;
    write(&config.path, &doc)?;
    Ok(Done::new(format!("added [[hsm.server]] {:?} to {}", server.name, config.path.display())))
}

fn read(path: &Path) -> Result<toml_edit::DocumentMut, ManageError> {
    let text =
        std::fs::read_to_string(path).map_err(|e| ManageError::Usage(format!("reading {}: {e}", path.display())))?;
    text.parse().map_err(|e| ManageError::Usage(format!("{}: {e}", path.display())))
}

/// Atomic, keeping the file private if it was.
fn write(path: &Path, doc: &toml_edit::DocumentMut) -> Result<(), ManageError> {
    use std::os::unix::fs::PermissionsExt;
    let private = std::fs::metadata(path).map(|m| m.permissions().mode() & 0o077 == 0).unwrap_or(true);
    let mode = if private { crate::state::Mode::Secret } else { crate::state::Mode::Public };
    crate::state::write_atomic(path, doc.to_string().as_bytes(), mode)
        .map_err(|source| ManageError::Write { path: path.display().to_string(), source })
}
