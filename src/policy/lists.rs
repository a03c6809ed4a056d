//! Host lists kept outside the configuration (files, `https://` URLs: PAN-OS's external dynamic
//! lists), one host glob per line, `#` comments. They reload themselves: files are looked at
//! every `list_poll_secs`, URLs fetched every `list_refresh_secs` with their `ETag` and
//! `Last-Modified` honoured. A list that fails to load or parse keeps its last good version,
//! with an error log line and `tollgate_host_list_errors_total` — never an empty list silently.
//!
//! Matching costs hash lookups over the host's label suffixes (`*.example.com` entries) and one
//! for the whole host (exact entries): O(length of the host), whatever the list's size. Other
//! globs (rare) go to a `GlobSet`.

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::{Mutex, RwLock};

use crate::config::{Config, ListSource};

/// The largest list fetched from a URL.
const MAX_LIST_BYTES: usize = 32 * 1024 * 1024;

/// How long a URL list's fetch may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a list did not load.
#[derive(Debug, thiserror::Error)]
pub enum ListError {
    #[error("host list {list}: {reason}")]
    Read { list: String, reason: String },
    #[error("host list {list}, line {line}: {reason}")]
    Parse { list: String, line: usize, reason: String },
}

/// Why `entry` (lower-case) is not a host name, IP literal or glob of one: characters outside
/// names and glob syntax, or an empty label.
fn check_entry(entry: &str) -> Result<(), &'static str> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || "-_.:*?[]{},!".contains(c);
    if !entry.chars().all(allowed) {
        return Err("a character no host name has");
    }
    if entry.split('.').any(str::is_empty) {
        return Err("an empty label");
    }
    Ok(())
}

/// One version of a list, compiled for matching.
#[derive(Debug, Default)]
pub struct HostSet {
    exact: HashSet<Box<str>>,
    /// `*.example.com` as `example.com`: any name under it, at any depth.
    suffixes: HashSet<Box<str>>,
    globs: globset::GlobSet,
    len: usize,
}

impl HostSet {
    /// Parses a list's text; `source` names it in errors.
    pub fn parse(text: &str, source: &str) -> Result<Self, ListError> {
        let mut set = Self::default();
        let mut globs = globset::GlobSetBuilder::new();
        let mut other = 0;
        for (i, line) in text.lines().enumerate() {
            let entry = line.split('#').next().unwrap_or_default().trim().to_ascii_lowercase();
            // A fully qualified spelling ("example.com.") is the same host.
            let entry = entry.strip_suffix('.').unwrap_or(&entry).to_string();
            if entry.is_empty() {
                continue;
            }
            let parse_err = |reason: String| ListError::Parse { list: source.into(), line: i + 1, reason };
            if let Err(why) = check_entry(&entry) {
                return Err(parse_err(format!("{entry:?} is not a host or host glob: {why}")));
            }
            match entry.strip_prefix("*.") {
                Some(suffix) if !suffix.contains(['*', '?', '[', '{']) && !suffix.is_empty() => {
                    set.suffixes.insert(suffix.into());
                }
                _ if !entry.contains(['*', '?', '[', '{']) => {
                    set.exact.insert(entry.into());
                }
                _ => {
                    let glob = globset::GlobBuilder::new(&entry)
                        .literal_separator(true)
                        .build()
                        .map_err(|e| parse_err(format!("{entry:?}: {e}")))?;
                    globs.add(glob);
                    other += 1;
                }
            }
            set.len += 1;
        }
        if other > 0 {
            set.globs = globs.build().map_err(|e| ListError::Read { list: source.into(), reason: e.to_string() })?;
        }
        Ok(set)
    }

    /// Whether `host` (lower-case) is on the list.
    pub fn contains(&self, host: &str) -> bool {
        let host = host.strip_suffix('.').unwrap_or(host);
        if self.exact.contains(host) {
            return true;
        }
        let under = host.match_indices('.').any(|(at, _)| self.suffixes.contains(&host[at + 1..]));
        under || (!self.globs.is_empty() && self.globs.is_match(host))
    }

    /// Entries on the list.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the list has no entry.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A list and its current version, swapped as it reloads.
#[derive(Debug)]
pub struct HostList {
    source: ListSource,
    current: RwLock<Arc<HostSet>>,
    seen: Mutex<Seen>,
    entries: prometheus_client::metrics::gauge::Gauge,
    errors: prometheus_client::metrics::counter::Counter,
}

/// What was last seen of a list's source: when to reload it, and what to send with a fetch.
#[derive(Debug, Default)]
struct Seen {
    /// A file's modification time and size.
    file: Option<(SystemTime, u64)>,
    etag: Option<String>,
    last_modified: Option<String>,
    /// Whether a version was ever loaded.
    loaded: bool,
}

impl HostList {
    fn new(source: ListSource) -> Self {
        let (entries, errors) = crate::telemetry::host_list_metrics(&source.to_string());
        Self { source, current: RwLock::default(), seen: Mutex::default(), entries, errors }
    }

    /// Whether `host` is on the current version.
    pub fn contains(&self, host: &str) -> bool {
        self.current.read().contains(host)
    }

    /// The current version.
    pub fn current(&self) -> Arc<HostSet> {
        self.current.read().clone()
    }

    /// Where it comes from.
    pub fn source(&self) -> &ListSource {
        &self.source
    }

    fn install(&self, set: HostSet, seen: &mut Seen) {
        let len = set.len();
        *self.current.write() = Arc::new(set);
        self.entries.set(i64::try_from(len).unwrap_or(i64::MAX));
        seen.loaded = true;
        tracing::info!(list = %self.source, entries = len, "host list loaded");
    }

    fn failed(&self, error: &ListError, seen: &Seen) {
        self.errors.inc();
        match seen.loaded {
            true => {
                tracing::error!(list = %self.source, error = %error, "host list not reloaded; its last good version stays")
            }
            false => {
                tracing::error!(list = %self.source, error = %error, "host list not loaded yet; it matches nothing until it is")
            }
        }
    }

    /// Reads the file again when it changed (or `force`). The error when it cannot be read or
    /// parsed; the current version stays.
    fn reload_file(&self, path: &Path, force: bool) -> Result<bool, ListError> {
        let source = path.display().to_string();
        let read_err = |e: io::Error| ListError::Read { list: source.clone(), reason: e.to_string() };
        let meta = std::fs::metadata(path).map_err(read_err)?;
        let stamp = (meta.modified().map_err(read_err)?, meta.len());
        let mut seen = self.seen.lock();
        if !force && seen.file == Some(stamp) {
            return Ok(false);
        }
        let text = std::fs::read_to_string(path).map_err(read_err)?;
        let set = HostSet::parse(&text, &source)?;
        seen.file = Some(stamp);
        self.install(set, &mut seen);
        Ok(true)
    }

    /// Fetches the URL (conditionally, after the first time), through `via` when given.
    async fn reload_url(
        &self,
        url: &str,
        tls: Arc<rustls::ClientConfig>,
        via: Option<&crate::net::Via>,
    ) -> Result<bool, ListError> {
        let read_err = |reason: String| ListError::Read { list: url.into(), reason };
        let (etag, since) = {
            let seen = self.seen.lock();
            (seen.etag.clone(), seen.last_modified.clone())
        };
        let fetched =
            crate::net::fetch(url, Some(tls), (etag.as_deref(), since.as_deref()), MAX_LIST_BYTES, FETCH_TIMEOUT, via)
                .await
                .map_err(|e| read_err(e.to_string()))?;
        match fetched.status {
            304 => return Ok(false),
            200 => {}
            status => return Err(read_err(format!("answered {status}"))),
        }
        let text = String::from_utf8(fetched.body).map_err(|_| read_err("not UTF-8 text".into()))?;
        let set = HostSet::parse(&text, url)?;
        let mut seen = self.seen.lock();
        (seen.etag, seen.last_modified) = (fetched.etag, fetched.last_modified);
        self.install(set, &mut seen);
        Ok(true)
    }
}

/// Every host list of the process, by source: kept across reloads, so an unchanged list is not
/// loaded again and a changed configuration finds its lists where it left them.
pub struct Lists {
    lists: Mutex<HashMap<ListSource, Arc<HostList>>>,
    /// TLS for URL lists: the upstream roots.
    tls: RwLock<Option<Arc<rustls::ClientConfig>>>,
    /// The parent proxy URL lists are fetched through, and the hosts that go direct.
    egress: RwLock<Option<(crate::net::Via, crate::config::Destinations)>>,
}

impl Lists {
    /// No list yet.
    pub fn new() -> Arc<Self> {
        Arc::new(Self { lists: Mutex::default(), tls: RwLock::default(), egress: RwLock::default() })
    }

    /// The lists `config` names, files loaded now (an unreadable or malformed one is an error
    /// naming the file, the line and why); a list already held keeps its current version. URL
    /// lists are fetched by `refresh`.
    pub fn load(&self, config: &Config) -> Result<HashMap<ListSource, Arc<HostList>>, ListError> {
        let sources: HashSet<&ListSource> = config.decryption.rules.iter().flat_map(|r| &r.host_lists).collect();
        if sources.iter().any(|s| matches!(s, ListSource::Url(_))) {
            // A bundle that does not load is reported by the upstream TLS setup, which reads
            // the same files; URL lists wait for a configuration whose bundles do.
            *self.tls.write() = crate::net::roots(&config.upstream.ca_bundles).ok().map(|roots| {
                let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
                let tls = rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .expect("the default provider supports the default versions")
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                Arc::new(tls)
            });
        }
        let mut loaded = HashMap::new();
        for source in sources {
            let held = self.lists.lock().get(source).cloned();
            let list = match held {
                Some(list) => list,
                None => {
                    let list = Arc::new(HostList::new(source.clone()));
                    if let ListSource::File(path) = source {
                        list.reload_file(path, true)?;
                    }
                    list
                }
            };
            loaded.insert(source.clone(), list);
        }
        let mut lists = self.lists.lock();
        lists.retain(|source, _| loaded.contains_key(source));
        lists.extend(loaded.iter().map(|(s, l)| (s.clone(), l.clone())));
        Ok(loaded)
    }

    /// Sets the parent proxy URL lists are fetched through (`None`: direct).
    pub fn set_egress(&self, egress: Option<(crate::net::Via, crate::config::Destinations)>) {
        *self.egress.write() = egress;
    }

    /// Keeps the lists current until the task is dropped: files looked at every `poll`, URLs
    /// fetched at once and every `refresh`.
    pub async fn refresh(self: Arc<Self>, poll: Duration, refresh: Duration) {
        let mut fetched_at: HashMap<ListSource, tokio::time::Instant> = HashMap::new();
        loop {
            let lists: Vec<Arc<HostList>> = self.lists.lock().values().cloned().collect();
            for list in lists {
                let result = match list.source() {
                    ListSource::File(path) => list.reload_file(path, false),
                    ListSource::Url(url) => {
                        let due = fetched_at.get(list.source()).is_none_or(|at| at.elapsed() >= refresh);
                        let Some(tls) = self.tls.read().clone().filter(|_| due) else { continue };
                        fetched_at.insert(list.source().clone(), tokio::time::Instant::now());
                        let host = url.parse::<http::Uri>().ok().and_then(|u| u.host().map(str::to_ascii_lowercase));
                        let via = self.egress.read().clone().and_then(|(via, direct)| {
                            (!host.is_some_and(|h| direct.contains(&h, None))).then_some(via)
                        });
                        list.reload_url(url, tls, via.as_ref()).await
                    }
                };
                if let Err(e) = result {
                    let seen = list.seen.lock();
                    list.failed(&e, &seen);
                }
            }
            tokio::time::sleep(poll).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_match_exactly_under_a_suffix_or_as_globs() {
        let set = HostSet::parse("# banks\nbank.test\n*.Health.test  # comments too\n\nweb?.shop.test\n", "t").unwrap();
        assert_eq!(set.len(), 3);
        assert!(set.contains("bank.test") && !set.contains("www.bank.test"));
        assert!(set.contains("a.health.test") && set.contains("b.a.health.test") && !set.contains("health.test"));
        assert!(set.contains("web1.shop.test") && !set.contains("web10.shop.test"));
        let err = HostSet::parse("ok.test\nnot a host\n", "lists/x.txt").unwrap_err().to_string();
        assert!(err.contains("lists/x.txt") && err.contains("line 2"), "{err}");
        for bad in ["example..test", ".example.test", "https://example.test/", "ex ample.test", "bäck.test"] {
            assert!(HostSet::parse(bad, "l").is_err(), "{bad}");
        }
        let set = HostSet::parse("fqdn.test.\n2001:db8::1\n10.0.0.1\n", "l").unwrap();
        assert!(set.contains("fqdn.test") && set.contains("fqdn.test.") && set.contains("2001:db8::1"));
        assert!(set.contains("10.0.0.1"));
    }
}
