//! Detailed information about HSM servers (H5): library, slot and token facts, mechanisms,
//! sessions, and the key inventory — labels, types, identifiers and protection flags, never
//! key material.

use serde::Serialize;

/// `tollgate hsm info --json`.
#[derive(Debug, Clone, Serialize)]
pub struct Info {
    pub servers: Vec<ServerInfo>,
    pub ha: super::HaStatus,
}

/// One server: its status and, when reachable, what the token says.
#[derive(Debug, Clone, Serialize)]
pub struct ServerInfo {
    #[serde(flatten)]
    pub status: super::ServerStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub library: Option<LibraryInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<TokenInfo>,
    pub mechanisms: Vec<String>,
    pub keys: Vec<KeyEntry>,
    /// Why the details could not be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LibraryInfo {
    pub manufacturer: String,
    pub description: String,
    pub library_version: String,
    pub cryptoki_version: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct TokenInfo {
    pub label: String,
    pub manufacturer: String,
    pub model: String,
    pub serial: String,
    pub hardware_version: String,
    pub firmware_version: String,
    pub slot_description: String,
    pub sessions: Option<u64>,
    pub max_sessions: String,
    pub rw_sessions: Option<u64>,
    pub free_public_memory: Option<usize>,
    pub total_public_memory: Option<usize>,
    pub free_private_memory: Option<usize>,
    pub total_private_memory: Option<usize>,
    pub user_pin_locked: bool,
    pub user_pin_count_low: bool,
}

/// A key object on the token.
#[derive(Debug, Clone, Serialize)]
pub struct KeyEntry {
    pub label: String,
    /// CKA_ID, hex.
    pub id: String,
    /// `private`, `public` or `secret`.
    pub class: &'static str,
    /// `EC`, `RSA`, `AES`, …
    pub key_type: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sensitive: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extractable: Option<bool>,
}
