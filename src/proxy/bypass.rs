//! The learned bypass (local exclusion cache): clients that pin certificates reject our minted
//! leaf. When a client aborts the handshake with an alert that means "I do not trust this CA"
//! (unknown_ca, bad_certificate, certificate_unknown) or closes right after our certificate,
//! that counts as one rejection of the host by that client address. The host is excluded from
//! decryption only once `min_clients` distinct client addresses rejected it within the window:
//! one client alone — a misconfigured machine, or anyone who wants a host undecrypted for
//! everybody — can close after our certificate as often as it likes and teaches nothing.
//! Transient failures (timeouts, resets) never count.

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::net::IpAddr;
use std::time::{Duration, Instant, SystemTime};

use moka::sync::Cache;
use parking_lot::Mutex;
use rustls::AlertDescription;
use serde::{Deserialize, Serialize};

/// The exclusion cache, shared by every proxy state across reloads.
pub struct Bypass {
    entries: Cache<String, Entry>,
    /// Per host, the client addresses that rejected it within the window, and when last.
    rejections: Mutex<HashMap<String, Rejections>>,
    ttl: Duration,
    min_clients: usize,
    window: Duration,
}

#[derive(Default)]
struct Rejections {
    clients: HashMap<IpAddr, Instant>,
    listeners: BTreeSet<String>,
}

/// One excluded host, as status shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Entry {
    pub host: String,
    /// Why: the alert the last client sent, or `closed after our certificate`.
    pub reason: String,
    /// How many distinct client addresses rejected our certificate for it.
    pub clients: usize,
    /// The listeners those clients came through.
    pub listeners: Vec<String>,
    /// RFC 3339.
    pub since: String,
    pub expires: String,
}

/// What a rejection taught.
#[derive(Debug, PartialEq, Eq)]
pub enum Learned {
    /// Counted; `clients` of `needed` distinct addresses so far.
    Counted { clients: usize, needed: usize },
    /// The host is now excluded.
    Excluded { reason: String, clients: usize },
}

/// Hosts remembered with rejections at most: a crawl over many hosts must not pile them up.
const MAX_HOSTS: usize = 100_000;

impl Bypass {
    /// A cache whose entries last `ttl` (`Duration::ZERO` disables learning), learning a host
    /// once `min_clients` distinct addresses rejected it within `window`.
    pub fn new(ttl: Duration, min_clients: usize, window: Duration) -> Self {
        let builder = Cache::builder().max_capacity(100_000);
        let entries = if ttl.is_zero() { builder.build() } else { builder.time_to_live(ttl).build() };
        Self { entries, rejections: Mutex::default(), ttl, min_clients: min_clients.max(1), window }
    }

    /// The learned bypass `config` describes: entries last `[policy] learn_bypass_secs`, and
    /// need `[bypass] min_clients` within `window_secs`.
    pub fn from_config(config: &crate::config::Config) -> Self {
        Self::new(
            Duration::from_secs(config.policy.learn_bypass_secs),
            config.bypass.min_clients,
            Duration::from_secs(config.bypass.window_secs),
        )
    }

    /// Whether `host` is excluded now.
    pub fn contains(&self, host: &str) -> bool {
        self.entries.contains_key(host)
    }

    /// Learns from a failed client handshake over a minted leaf: `None` when it was no
    /// rejection of our certificate.
    pub fn learn(&self, host: &str, client: IpAddr, listener: &str, error: &io::Error) -> Option<Learned> {
        if self.ttl.is_zero() {
            return None;
        }
        let reason = rejection(error)?;
        let now = Instant::now();
        let (clients, listeners) = {
            let mut rejections = self.rejections.lock();
            if rejections.len() >= MAX_HOSTS {
                let window = self.window;
                rejections.retain(|_, r| r.clients.values().any(|at| now.duration_since(*at) < window));
            }
            let seen = rejections.entry(host.to_string()).or_default();
            seen.clients.retain(|_, at| now.duration_since(*at) < self.window);
            seen.clients.insert(client, now);
            seen.listeners.insert(listener.to_string());
            if seen.clients.len() < self.min_clients {
                return Some(Learned::Counted { clients: seen.clients.len(), needed: self.min_clients });
            }
            let seen = rejections.remove(host).unwrap_or_default();
            (seen.clients.len(), seen.listeners.into_iter().collect())
        };
        let at = SystemTime::now();
        let entry = Entry {
            host: host.to_string(),
            reason: reason.clone(),
            clients,
            listeners,
            since: rfc3339(at),
            expires: rfc3339(at + self.ttl),
        };
        self.entries.insert(host.to_string(), entry);
        Some(Learned::Excluded { reason, clients })
    }

    /// Remembers `host` as one that cannot be intercepted (`reason`): later connections are
    /// tunnelled without a failed attempt first, until the entry expires. Nothing is
    /// remembered with learning off (`learn_bypass_secs = 0`).
    pub fn remember_unsupported(&self, host: &str, listener: &str, reason: &str) {
        if self.ttl.is_zero() {
            return;
        }
        let at = SystemTime::now();
        let entry = Entry {
            host: host.to_string(),
            reason: format!("unsupported: {reason}"),
            clients: 1,
            listeners: vec![listener.to_string()],
            since: rfc3339(at),
            expires: rfc3339(at + self.ttl),
        };
        self.entries.insert(host.to_string(), entry);
    }

    /// Forgets the hosts remembered as unsupported for `reason` that `now_supported` says
    /// can be intercepted now; the hosts forgotten.
    pub fn forget_unsupported(&self, reason: &str, now_supported: impl Fn(&str) -> bool) -> Vec<String> {
        let reason = format!("unsupported: {reason}");
        let mut forgotten: Vec<String> = self
            .entries
            .iter()
            .filter(|(host, entry)| entry.reason == reason && now_supported(host))
            .map(|(host, _)| host.as_str().to_owned())
            .collect();
        forgotten.sort();
        for host in &forgotten {
            self.entries.remove(host);
        }
        forgotten
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

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn only_rejections_of_our_certificate_count() {
        let bypass = Bypass::new(Duration::from_secs(60), 1, Duration::from_secs(60));
        let learned = bypass.learn("a.test", ip(1), "users", &alert(AlertDescription::UnknownCA));
        assert_eq!(learned, Some(Learned::Excluded { reason: "UnknownCA".into(), clients: 1 }));
        let eof = io::Error::new(io::ErrorKind::UnexpectedEof, "tls handshake eof");
        assert!(bypass.learn("b.test", ip(1), "users", &eof).is_some());
        let reset = io::Error::new(io::ErrorKind::ConnectionReset, "reset");
        assert!(bypass.learn("c.test", ip(1), "users", &reset).is_none());
        let timeout = io::Error::new(io::ErrorKind::TimedOut, "timeout");
        assert!(bypass.learn("d.test", ip(1), "users", &timeout).is_none());
        assert!(bypass.learn("e.test", ip(1), "users", &alert(AlertDescription::HandshakeFailure)).is_none());
        assert!(bypass.contains("a.test") && bypass.contains("b.test") && !bypass.contains("c.test"));
        assert_eq!(bypass.list().len(), 2);
        assert_eq!(bypass.clear(Some("a.test")), 1);
        assert_eq!(bypass.clear(None), 1);
        assert!(bypass.list().is_empty());
        let off = Bypass::new(Duration::ZERO, 1, Duration::from_secs(60));
        assert!(off.learn("a.test", ip(1), "users", &alert(AlertDescription::UnknownCA)).is_none());
    }

    #[test]
    fn only_the_named_reason_and_hosts_are_forgotten() {
        let bypass = Bypass::new(Duration::from_secs(60), 1, Duration::from_secs(60));
        bypass.remember_unsupported("mtls.test", "users", "asks");
        bypass.remember_unsupported("other.test", "users", "asks");
        bypass.remember_unsupported("old-tls.test", "users", "old");
        bypass.learn("pinned.test", ip(1), "users", &alert(AlertDescription::UnknownCA));
        let forgotten = bypass.forget_unsupported("asks", |host| host != "other.test");
        assert_eq!(forgotten, ["mtls.test"]);
        let left: Vec<String> = bypass.list().into_iter().map(|e| e.host).collect();
        assert_eq!(left, ["old-tls.test", "other.test", "pinned.test"]);
    }

    #[test]
    fn one_client_alone_teaches_nothing_however_often() {
        let bypass = Bypass::new(Duration::from_secs(60), 3, Duration::from_secs(60));
        let rejected = || alert(AlertDescription::UnknownCA);
        for _ in 0..100 {
            let learned = bypass.learn("pinned.test", ip(1), "users", &rejected());
            assert_eq!(learned, Some(Learned::Counted { clients: 1, needed: 3 }));
        }
        assert!(!bypass.contains("pinned.test"));
        assert!(matches!(
            bypass.learn("pinned.test", ip(2), "lab", &rejected()),
            Some(Learned::Counted { clients: 2, .. })
        ));
        assert!(matches!(
            bypass.learn("pinned.test", ip(3), "users", &rejected()),
            Some(Learned::Excluded { clients: 3, .. })
        ));
        let entry = &bypass.list()[0];
        assert_eq!((entry.clients, entry.listeners.clone()), (3, vec!["lab".to_string(), "users".to_string()]));
    }
}
