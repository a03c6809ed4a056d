//! How each operation's result reads: as JSON (its `Serialize`, with the SPEC's field names) or
//! as text for people (`Report::human`). The command line has one renderer over this trait, so
//! every command offers both and maps to exit codes the same way.

use std::fmt::Write as _;

use serde::Serialize;

use super::servers::ResetReport;
use super::{BypassCleared, BypassList, CertAdded, Done, Login};
use crate::hsm::Status;
use crate::hsm::info::Info;
use crate::pki::CertSummary;
use crate::vault::master::MasterKeyStatus;

/// A command's result.
pub trait Report: Serialize {
    /// The result as text for people.
    fn human(&self) -> String;

    /// Whether the command ran but found something wrong (exit code 1): a server down, a
    /// master key that does not open.
    fn failed(&self) -> bool {
        false
    }
}

impl Report for Done {
    fn human(&self) -> String {
        format!("{}\n", self.message)
    }
}

impl Report for Status {
    fn human(&self) -> String {
        let mut out = String::new();
        if self.servers.is_empty() {
            out.push_str("\u{1F534} no HSM server is configured (tollgate hsm add-server)\n");
        }
        let _ = writeln!(out, "{:<12} {:<20} {:<18} {:<4} STATE", "SERVER", "TOKEN", "SERIAL", "UP");
        for s in &self.servers {
            let light = if s.up { "\u{1F7E2}" } else { "\u{1F534}" };
            let serial = s.serial.as_deref().unwrap_or("-");
            let _ = writeln!(out, "{:<12} {:<20} {:<18} {:<4} {light} {}", s.name, s.token, serial, s.up, s.state);
        }
        let _ = writeln!(out, "HA: {}", if self.ha.enabled { "enabled" } else { "disabled (one server)" });
        out
    }

    fn failed(&self) -> bool {
        self.servers.is_empty() || self.servers.iter().any(|s| !s.up)
    }
}

impl Report for Info {
    fn human(&self) -> String {
        let mut out = String::new();
        for s in &self.servers {
            let _ = writeln!(out, "== {} ({}) — {}", s.status.name, s.status.token, s.status.state);
            if let Some(l) = &s.library {
                let _ = writeln!(
                    out,
                    "   library: {} {} (PKCS#11 {})",
                    l.manufacturer, l.library_version, l.cryptoki_version
                );
            }
            if let Some(t) = &s.token {
                let _ = writeln!(
                    out,
                    "   token:   {} {} serial {} firmware {} sessions {:?}/{}",
                    t.manufacturer, t.model, t.serial, t.firmware_version, t.sessions, t.max_sessions
                );
            }
            let _ = writeln!(out, "   mechanisms: {}", s.mechanisms.len());
            for k in &s.keys {
                let _ = writeln!(
                    out,
                    "   key {:<28} {:<7} {:<4} id {} sensitive {:?} extractable {:?}",
                    k.label, k.class, k.key_type, k.id, k.sensitive, k.extractable
                );
            }
            if let Some(e) = &s.error {
                let _ = writeln!(out, "   error: {e}");
            }
        }
        let _ = writeln!(out, "HA: {}", if self.ha.enabled { "enabled" } else { "disabled" });
        out
    }

    fn failed(&self) -> bool {
        self.servers.iter().any(|s| !s.status.up)
    }
}

impl Report for Login {
    fn human(&self) -> String {
        match &self.sealed {
            Some(file) => {
                format!("hsm server {}: logged in; partition password sealed in {}\n", self.server, file.display())
            }
            None => format!(
                "hsm server {}: logged in; the service reads its password from {}, nothing stored\n",
                self.server, self.source
            ),
        }
    }
}

impl Report for Vec<CertSummary> {
    fn human(&self) -> String {
        let mut out = format!("{:<24} {:<8} {:<6} {:<8} SUBJECT\n", "NAME", "KEY", "TRUST", "UNTRUST");
        for r in self {
            let icon = if r.key == "error" { "\u{26A0}" } else { "\u{1F512}" };
            let reason = r.reason.as_ref().map(|e| format!(" ({e})")).unwrap_or_default();
            let _ = writeln!(
                out,
                "{:<24} {icon} {:<6} {:<6} {:<8} {}{reason}",
                r.name, r.key, r.forward_trust, r.forward_untrust, r.subject
            );
        }
        out
    }
}

impl Report for CertAdded {
    fn human(&self) -> String {
        let roles = [(self.forward_trust, "forward-trust CA"), (self.forward_untrust, "forward-untrust CA")];
        let mut roles: Vec<String> = roles.iter().filter(|(on, _)| *on).map(|(_, r)| r.to_string()).collect();
        if !self.inbound.is_empty() {
            roles.push(format!("inbound for {}", self.inbound.join(", ")));
        }
        let roles = if roles.is_empty() { String::new() } else { format!(", {}", roles.join(", ")) };
        match &self.label {
            Some(label) => format!("{} ({}{roles}): key on the HSM as {label:?}\n", self.name, self.algorithm),
            None => format!("{} ({}{roles}): key sealed under the master key\n", self.name, self.algorithm),
        }
    }
}

impl Report for MasterKeyStatus {
    fn human(&self) -> String {
        let state = match (self.configured, self.opens) {
            (false, _) => "not set",
            (true, true) => "opens",
            (true, false) => "does NOT open",
        };
        let window = match (self.expired, self.reminder) {
            (true, _) => " — EXPIRED",
            (false, true) => " — inside the reminder window",
            _ => "",
        };
        let mut out = format!(
            "master key: {state}; HSM-encrypted: {}; wrapping key generation: {}; expires: {}{window}\n",
            self.hsm_encrypted,
            self.wrapping_key_generation,
            self.expires_at.as_deref().unwrap_or("never"),
        );
        if let Some(e) = &self.error {
            let _ = writeln!(out, "error: {e}");
        }
        out
    }

    fn failed(&self) -> bool {
        self.configured && !self.opens
    }
}

impl Report for ResetReport {
    fn human(&self) -> String {
        format!(
            "removed HSM servers [{}] and {} stored partition password(s); add them back with `tollgate hsm \
             add-server` (and `tollgate hsm login`)\n",
            self.servers.join(", "),
            self.sealed_pins.len()
        )
    }
}

impl Report for BypassList {
    fn human(&self) -> String {
        let mut out =
            format!("{:<40} {:<30} {:>7} {:<16} {:<22} EXPIRES\n", "HOST", "REASON", "CLIENTS", "LISTENERS", "SINCE");
        for e in &self.0 {
            let listeners = e.listeners.join(",");
            let _ = writeln!(
                out,
                "{:<40} {:<30} {:>7} {:<16} {:<22} {}",
                e.host, e.reason, e.clients, listeners, e.since, e.expires
            );
        }
        out
    }
}

impl Report for BypassCleared {
    fn human(&self) -> String {
        format!("removed {} bypass entr{}\n", self.removed, if self.removed == 1 { "y" } else { "ies" })
    }
}
