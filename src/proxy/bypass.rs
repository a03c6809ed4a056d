//! The learned bypass (local exclusion cache): clients that pin certificates reject our minted
//! leaf. When a client aborts the handshake with an alert that means "I do not trust this CA"
//! (unknown_ca, bad_certificate, certificate_unknown) or closes right after our certificate,
//! the host is excluded from decryption for a while and later connections are passed through
//! untouched. Transient failures (timeouts, resets) never add entries: one flaky client must
//! not switch inspection off for a host.

use std::io;
use std::time::{Duration, SystemTime};

use moka::sync::Cache;
use rustls::AlertDescription;
use serde::Serialize;

/// The exclusion cache, shared by every proxy state across reloads.
pub struct Bypass {
    entries: Cache<String, Entry>,
    ttl: Duration,
}

/// One excluded host, as status shows it.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct Entry {
    pub host: String,
    /// Why: the alert the client sent, or `closed after our certificate`.
    pub reason: String,
    /// RFC 3339.
    pub since: String,
    pub expires: String,
}

impl Bypass {
    /// A cache whose entries last `ttl`; `Duration::ZERO` disables learning.
    pub fn new(ttl: Duration) -> Self {
        let builder = Cache::builder().max_capacity(100_000);
        let entries = if ttl.is_zero() { builder.build() } else { builder.time_to_live(ttl).build() };
        Self { entries, ttl }
    }

    /// Whether `host` is excluded now.
    pub fn contains(&self, host: &str) -> bool {
        self.entries.contains_key(host)
    }

    /// Learns from a failed client handshake over a minted leaf; returns the reason when the
    /// host was added.
    pub fn learn(&self, host: &str, error: &io::Error) -> Option<String> {
        if self.ttl.is_zero() {
            return None;
        }
        let reason = rejection(error)?;
        let now = SystemTime::now();
        let entry = Entry {
            host: host.to_string(),
            reason: reason.clone(),
            since: rfc3339(now),
            expires: rfc3339(now + self.ttl),
        };
        self.entries.insert(host.to_string(), entry);
        Some(reason)
    }

    /// Every entry, sorted by host.
    pub fn list(&self) -> Vec<Entry> {
        let mut entries: Vec<Entry> = self.entries.iter().map(|(_, e)| e).collect();
        entries.sort_by(|a, b| a.host.cmp(&b.host));
        entries
    }

    /// Removes one host (`Some`) or every entry (`None`); how many were removed.
    pub fn clear(&self, host: Option<&str>) -> usize {
        match host {
            Some(host) => usize::from(self.entries.remove(host).is_some()),
            None => {
                let n = self.entries.iter().count();
                self.entries.invalidate_all();
                n
            }
        }
    }
}

/// Whether a handshake error means the client rejected our certificate.
fn rejection(error: &io::Error) -> Option<String> {
    if error.kind() == io::ErrorKind::UnexpectedEof {
        return Some("closed after our certificate".into());
    }
    let tls = error.get_ref()?.downcast_ref::<rustls::Error>()?;
    match tls {
        rustls::Error::AlertReceived(
            alert @ (AlertDescription::UnknownCA
            | AlertDescription::BadCertificate
            | AlertDescription::CertificateUnknown),
        ) => Some(format!("{alert:?}")),
        _ => None,
    }
}

fn rfc3339(t: SystemTime) -> String {
    time::OffsetDateTime::from(t).format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alert(a: AlertDescription) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, rustls::Error::AlertReceived(a))
    }

    #[test]
    fn only_rejections_of_our_certificate_are_learned() {
        let bypass = Bypass::new(Duration::from_secs(60));
        assert_eq!(bypass.learn("a.test", &alert(AlertDescription::UnknownCA)).as_deref(), Some("UnknownCA"));
        assert!(bypass.learn("b.test", &io::Error::new(io::ErrorKind::UnexpectedEof, "tls handshake eof")).is_some());
        assert!(bypass.learn("c.test", &io::Error::new(io::ErrorKind::ConnectionReset, "reset")).is_none());
        assert!(bypass.learn("d.test", &io::Error::new(io::ErrorKind::TimedOut, "timeout")).is_none());
        assert!(bypass.learn("e.test", &alert(AlertDescription::HandshakeFailure)).is_none());
        assert!(bypass.contains("a.test") && bypass.contains("b.test") && !bypass.contains("c.test"));
        assert_eq!(bypass.list().len(), 2);
        assert_eq!(bypass.clear(Some("a.test")), 1);
        assert_eq!(bypass.clear(None), 1);
        assert!(bypass.list().is_empty());
        let off = Bypass::new(Duration::ZERO);
        assert!(off.learn("a.test", &alert(AlertDescription::UnknownCA)).is_none());
    }
}
