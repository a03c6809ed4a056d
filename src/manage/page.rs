//! The status page for people: `GET /` on the management listener. Plain server-rendered HTML
//! with inline style and no external assets (the management network is often air-gapped), built
//! from the same data as the JSON routes.

use std::fmt::Write as _;

use crate::hsm::Status;
use crate::pki::CertSummary;
use crate::proxy::respond::escape_html as escape;
use crate::vault::master::MasterKeyStatus;

/// What the page shows; an `Err` is shown in place of its section.
pub struct PageData<'a> {
    pub hsm: &'a Status,
    pub certs: Result<Vec<CertSummary>, String>,
    pub master_key: Result<MasterKeyStatus, String>,
}

const STYLE: &str = "body{font:15px system-ui,sans-serif;margin:2em;color:#222}\
table{border-collapse:collapse;margin-bottom:2em}th,td{border:1px solid #ccc;padding:.3em .7em;text-align:left}\
th{background:#f3f3f3}.up{color:#08752b}.down{color:#b3141b}.dot{font-size:1.2em}";

pub fn render(data: &PageData<'_>) -> String {
    let mut html = String::with_capacity(4096);
    html.push_str("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>tollgate status</title>");
    let _ = write!(html, "<style>{STYLE}</style></head><body><h1>tollgate {}</h1>", env!("CARGO_PKG_VERSION"));
    hsm_section(&mut html, data.hsm);
    certs_section(&mut html, &data.certs);
    master_key_section(&mut html, &data.master_key);
    html.push_str("</body></html>\n");
    html
}

fn hsm_section(html: &mut String, status: &Status) {
    html.push_str("<h2>HSM servers</h2>");
    if let Some(group) = &status.ha.group {
        let _ = write!(
            html,
            "<p>HA group <b>{}</b>{}</p>",
            escape(group),
            if status.ha.enabled { "" } else { " (HA disabled)" }
        );
    }
    html.push_str("<table id=\"hsm\"><tr><th></th><th>Server</th><th>Partition</th><th>Serial</th><th>Module state</th><th>Member</th></tr>");
    for s in &status.servers {
        let (class, word) = if s.up { ("up", "up") } else { ("down", "down") };
        let _ = write!(
            html,
            "<tr class=\"{class}\" data-server=\"{}\"><td><span class=\"dot {class}\">&#x25CF;</span> {word}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&s.name),
            escape(&s.name),
            escape(&s.token),
            escape(s.serial.as_deref().unwrap_or("—")),
            escape(&s.state),
            escape(s.ha_state),
        );
    }
    html.push_str("</table>");
}

fn certs_section(html: &mut String, certs: &Result<Vec<CertSummary>, String>) {
    html.push_str("<h2>Certificates</h2>");
    let certs = match certs {
        Ok(certs) => certs,
        Err(e) => {
            let _ = write!(html, "<p class=\"down\">the certificate store could not be read: {}</p>", escape(e));
            return;
        }
    };
    html.push_str(
        "<table id=\"certs\"><tr><th></th><th>Name</th><th>Key</th><th>Roles</th><th>Subject</th><th>Expires</th></tr>",
    );
    for c in certs {
        let (icon, class, key) = match c.key {
            "error" => ("&#x26A0;", "down", format!("error: {}", c.reason.as_deref().unwrap_or("unknown"))),
            "software" => ("&#x1F511;", "up", "software (sealed under the master key)".to_string()),
            other => ("&#x1F512;", "up", other.to_string()),
        };
        let mut roles: Vec<String> = Vec::new();
        if c.forward_trust {
            roles.push("forward-trust".into());
        }
        if c.forward_untrust {
            roles.push("forward-untrust".into());
        }
        if !c.inbound.is_empty() {
            roles.push(format!("inbound: {}", c.inbound.join(", ")));
        }
        let _ = write!(
            html,
            "<tr class=\"{class}\" data-cert=\"{}\"><td>{icon}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&c.name),
            escape(&c.name),
            escape(&key),
            escape(&roles.join("; ")),
            escape(&c.subject),
            escape(&c.not_after),
        );
    }
    html.push_str("</table>");
}

fn master_key_section(html: &mut String, status: &Result<MasterKeyStatus, String>) {
    html.push_str("<h2>Master key</h2><p id=\"master-key\">");
    match status {
        Err(e) => {
            let _ = write!(html, "<span class=\"down\">status unavailable: {}</span>", escape(e));
        }
        Ok(s) if !s.configured => html.push_str("not set"),
        Ok(s) => {
            let (class, state) = if s.opens { ("up", "opens") } else { ("down", "does NOT open") };
            let _ = write!(
                html,
                "<span class=\"{class}\">{state}</span>; {}; expires: <b>{}</b>{}",
                if s.hsm_encrypted {
                    format!("encrypted on the HSM (wrapping key generation {})", s.wrapping_key_generation)
                } else {
                    "sealed under the device key".into()
                },
                escape(s.expires_at.as_deref().unwrap_or("never")),
                if s.expired {
                    " <span class=\"down\">EXPIRED</span>"
                } else if s.reminder {
                    " <span class=\"down\">inside the reminder window</span>"
                } else {
                    ""
                },
            );
        }
    }
    html.push_str("</p>");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markup_in_names_is_escaped() {
        let status = Status {
            servers: vec![],
            ha: crate::hsm::HaStatus {
                enabled: true,
                group: Some("<script>".into()),
                auto_recovery_retry: 0,
                auto_recovery_interval_secs: 60,
            },
        };
        let html = render(&PageData { hsm: &status, certs: Err("<i>x</i>".into()), master_key: Err("\"x\"".into()) });
        assert!(!html.contains("<script>") && !html.contains("<i>"), "{html}");
        assert!(html.contains("&lt;script&gt;") && html.contains("&quot;x&quot;"), "{html}");
    }
}
