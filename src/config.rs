//! The operator's TOML configuration, deserialized straight into typed values.
//!
//! tollgate only reads this file; everything tollgate writes lives in the state directory
//! (`state.rs`). Each section is one struct whose defaults stand in its `Default` impl right
//! below it; values that must have a shape (addresses, networks, host globs, methods, names)
//! are parsed into it where they are read, so a glob is compiled and a network parsed once.
//! Unknown keys are errors, every error names the file, the field and the reason, and relative
//! paths are resolved against the directory holding the config file.
//!
//! This module describes where secrets live (`SecretSource`); it opens none of them (`vault`
//! does).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer};

/// The default PKCS#11 library: SoftHSM2 as packaged by Debian.
pub const DEFAULT_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// Errors loading the configuration. All of them are usage errors (exit code 64).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path}: field `{field}`: {reason}")]
    Invalid { path: PathBuf, field: String, reason: String },
}

/// The whole configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the config was read from (for error messages and relative paths); not a key.
    #[serde(skip)]
    pub path: PathBuf,
    /// Program-owned state: certificate store, sealed secrets.
    pub state_dir: PathBuf,
    /// `[hsm]` and its `[[hsm.server]]`s.
    #[serde(default)]
    pub hsm: HsmConfig,
    /// `[[listener]]`s.
    #[serde(default, rename = "listener")]
    pub listeners: Vec<ListenerConfig>,
    /// `[upstream]`.
    #[serde(default)]
    pub upstream: UpstreamConfig,
    /// `[resolve]`: static `host:port → address` overrides, like curl's `--resolve`.
    #[serde(default)]
    pub resolve: Resolve,
    /// `[policy]`.
    #[serde(default)]
    pub policy: PolicyConfig,
    /// `[management]`.
    #[serde(default)]
    pub management: ManagementConfig,
    /// `[limits]`.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// `[mint]`.
    #[serde(default)]
    pub mint: MintConfig,
    /// `[[inbound]]`: our own servers, terminated by inbound listeners.
    #[serde(default)]
    pub inbound: Vec<InboundConfig>,
    /// `[auth]`: proxy authentication.
    #[serde(default)]
    pub auth: AuthConfig,
    /// `[decryption]`: who and what is decrypted.
    #[serde(default)]
    pub decryption: DecryptionConfig,
    /// `[bypass]`: the learned bypass for pinning clients.
    #[serde(default)]
    pub bypass: BypassConfig,
    /// `[log]`: where the service's JSON lines go, and which.
    #[serde(default)]
    pub log: LogConfig,
    /// `[icap]`: content scanning of decrypted traffic.
    #[serde(default)]
    pub icap: IcapConfig,
}

/// `[icap]`: decrypted requests (REQMOD) and responses (RESPMOD) handed to a scanner.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IcapConfig {
    /// The service requests go to, e.g. `icap://127.0.0.1:1344/avscan`.
    pub reqmod: Option<IcapUrl>,
    /// The service responses go to.
    pub respmod: Option<IcapUrl>,
    /// When the scanner is down, too slow or answers nonsense: `block` (a 503 page) or `allow`
    /// (the message passes unscanned).
    pub on_error: IcapFallback,
    /// Connecting, and each wait for the scanner's answer or its next bytes.
    pub timeout_secs: u64,
    /// A body declared larger than this is not scanned; `oversize` says whether it passes.
    pub max_body_bytes: u64,
    pub oversize: IcapFallback,
    /// A body declared no larger than this is kept while it is scanned, so the scanner may
    /// answer `204` after the whole of it; larger ones are streamed through the scanner.
    pub buffer_bytes: usize,
    /// Connections to each service at most (the service's `Max-Connections` may lower it).
    pub max_connections: usize,
}

impl Default for IcapConfig {
    fn default() -> Self {
        Self {
            reqmod: None,
            respmod: None,
            on_error: IcapFallback::Block,
            timeout_secs: 10,
            max_body_bytes: 100 << 20,
            oversize: IcapFallback::Allow,
            buffer_bytes: 1 << 20,
            max_connections: 32,
        }
    }
}

/// What a message the scanner cannot judge gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IcapFallback {
    Block,
    Allow,
}

/// An ICAP service: `icap://host[:port]/service`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IcapUrl {
    pub host: String,
    pub port: u16,
    /// As written (ICAP requests carry it).
    pub url: String,
}

impl<'de> Deserialize<'de> for IcapUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let bad = |why: &str| serde::de::Error::custom(format!("{text:?}: {why}"));
        let rest = text.strip_prefix("icap://").ok_or_else(|| bad("expected icap://host[:port]/service"))?;
        let (authority, path) = rest.split_once('/').ok_or_else(|| bad("no service path"))?;
        if path.is_empty() || authority.is_empty() || text.contains(char::is_whitespace) {
            return Err(bad("expected icap://host[:port]/service"));
        }
        let authority: http::uri::Authority = authority.parse().map_err(|_| bad("bad host or port"))?;
        let host = authority.host().trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
        Ok(Self { host, port: authority.port_u16().unwrap_or(1344), url: text })
    }
}

/// `[log]`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// One line per client TLS session (target `tollgate::decryption`).
    pub decryption: bool,
    /// A file to write to instead of standard output; rotated by size, reopened on SIGHUP
    /// and SIGUSR1 (for logrotate).
    pub file: Option<PathBuf>,
    /// The file is rotated when it would grow past this.
    pub max_file_bytes: u64,
    /// Rotated files kept (`FILE.1` the newest).
    pub keep_files: usize,
    /// Lines waiting for the writer; beyond this, lines are dropped and counted
    /// (`tollgate_log_lines_dropped_total`): the data plane never waits on its log.
    pub buffer_lines: usize,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { decryption: true, file: None, max_file_bytes: 100 << 20, keep_files: 5, buffer_lines: 64 * 1024 }
    }
}

/// `[auth]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// htpasswd file of bcrypt (`$2y$`, `$2b$`, `$2a$`) or argon2 (`$argon2id$`…) hashes, one
    /// `user:hash` per line; it reloads itself when it changes.
    pub users_file: Option<PathBuf>,
}

/// `[decryption]`: rules deciding what is decrypted, first match wins.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DecryptionConfig {
    /// `[[decryption.rule]]`s, first match wins; when none matches, `[policy] no_decrypt`,
    /// then the learned bypass, decide; otherwise the connection is decrypted.
    #[serde(rename = "rule")]
    pub rules: Vec<DecryptionRule>,
    /// How often `https://` host lists are fetched again (their `ETag`/`Last-Modified`
    /// honoured).
    pub list_refresh_secs: u64,
    /// How often host list files are looked at for changes.
    pub list_poll_secs: u64,
}

impl Default for DecryptionConfig {
    fn default() -> Self {
        Self { rules: Vec::new(), list_refresh_secs: 300, list_poll_secs: 2 }
    }
}

/// One `[[decryption.rule]]`: it matches when every criterion given matches (an empty one
/// matches anything).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecryptionRule {
    /// Named in logs (default: `decryption rule N`).
    #[serde(default)]
    pub name: String,
    /// Client networks (after the PROXY protocol, when the listener uses it).
    #[serde(default, deserialize_with = "networks")]
    pub sources: Vec<ipnet::IpNet>,
    /// Authenticated user names (proxy authentication).
    #[serde(default)]
    pub users: Vec<String>,
    /// Listener names.
    #[serde(default)]
    pub listeners: Vec<String>,
    /// Host globs.
    #[serde(default)]
    pub hosts: HostGlobs,
    /// Host list files (one glob per line, `#` comments) or `https://` URLs.
    #[serde(default)]
    pub host_lists: Vec<ListSource>,
    pub action: DecryptAction,
    /// Whether clients rejecting our certificate may teach the learned bypass for the hosts
    /// this rule decrypts.
    #[serde(default = "yes")]
    pub learn_bypass: bool,
    /// Whether decrypted traffic this rule matches is handed to the `[icap]` scanner.
    #[serde(default = "yes")]
    pub icap: bool,
}

fn yes() -> bool {
    true
}

/// What a decryption rule does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DecryptAction {
    /// Terminate, mint, inspect.
    Decrypt,
    /// Pass the bytes through untouched.
    NoDecrypt,
    /// Refuse: a TLS alert (403 for plain HTTP).
    Block,
}

/// Where a host list comes from.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ListSource {
    File(PathBuf),
    Url(String),
}

impl std::fmt::Display for ListSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File(path) => write!(f, "{}", path.display()),
            Self::Url(url) => f.write_str(url),
        }
    }
}

impl<'de> Deserialize<'de> for ListSource {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        if text.starts_with("https://") {
            return text
                .parse::<http::Uri>()
                .map(|_| Self::Url(text.clone()))
                .map_err(|e| serde::de::Error::custom(format!("{text:?}: {e}")));
        }
        if text.contains("://") {
            return Err(serde::de::Error::custom(format!("{text:?}: host lists are files or https:// URLs")));
        }
        Ok(Self::File(PathBuf::from(text)))
    }
}

/// `[bypass]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BypassConfig {
    /// A host is excluded from decryption only after this many distinct client addresses
    /// rejected our certificate for it within `window_secs`.
    pub min_clients: usize,
    /// How far back rejections count.
    pub window_secs: u64,
}

impl Default for BypassConfig {
    fn default() -> Self {
        Self { min_clients: 3, window_secs: 3600 }
    }
}

/// `[hsm]`: the HSM servers (two or more form the HA group) and how they are driven.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HsmConfig {
    /// `[[hsm.server]]`s.
    #[serde(rename = "server")]
    pub servers: Vec<HsmServerConfig>,
    /// `[hsm.ha]`.
    pub ha: HaConfig,
    /// Worker threads per PKCS#11 library.
    pub workers: usize,
    /// Jobs waiting per library before new ones are refused.
    pub queue_depth: usize,
    /// Deadline of one HSM operation, queueing included.
    pub call_timeout_ms: u64,
}

impl Default for HsmConfig {
    fn default() -> Self {
        Self { servers: Vec::new(), ha: HaConfig::default(), workers: 2, queue_depth: 1024, call_timeout_ms: 2000 }
    }
}

/// `[hsm.ha]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HaConfig {
    /// HA is on with two or more servers unless this is false.
    pub enabled: Option<bool>,
    /// The HA group's name, shown in status.
    pub group: String,
    /// Recovery attempts for a down member; 0 = forever.
    pub auto_recovery_retry: u32,
    /// Seconds between recovery attempts.
    pub auto_recovery_interval_secs: u64,
}

impl Default for HaConfig {
    fn default() -> Self {
        Self { enabled: None, group: "default".into(), auto_recovery_retry: 0, auto_recovery_interval_secs: 60 }
    }
}

/// One `[[hsm.server]]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HsmServerConfig {
    /// ASCII, 1–31 printable characters.
    #[serde(deserialize_with = "server_name")]
    pub name: String,
    /// The PKCS#11 library to load.
    #[serde(default = "default_module")]
    pub module: PathBuf,
    /// Token (partition) label, 1–32 characters.
    #[serde(deserialize_with = "token_label")]
    pub token: String,
    /// The partition password (user PIN) is in this file.
    pub pin_file: Option<PathBuf>,
    /// ... or in this environment variable. With neither, it is the one `tollgate hsm login`
    /// sealed in the state directory.
    pub pin_env: Option<String>,
    /// Informational network address of the HSM.
    pub address: Option<String>,
    /// The state directory, where a sealed partition password lives (set from `state_dir`).
    #[serde(skip)]
    state_dir: PathBuf,
}

fn default_module() -> PathBuf {
    PathBuf::from(DEFAULT_MODULE)
}

impl HsmServerConfig {
    /// Where the partition password (user PIN) comes from.
    pub fn pin(&self) -> SecretSource {
        match (&self.pin_file, &self.pin_env) {
            (Some(file), _) => SecretSource::File(file.clone()),
            (None, Some(var)) => SecretSource::Env(var.clone()),
            (None, None) => SecretSource::SealedPin { state_dir: self.state_dir.clone(), server: self.name.clone() },
        }
    }
}

/// Where a secret comes from: a description only; `vault` opens it. `Debug` shows where it
/// lives, never the secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecretSource {
    File(PathBuf),
    Env(String),
    /// An HSM server's partition password, sealed in the state directory by
    /// `tollgate hsm login` under the device key.
    SealedPin {
        state_dir: PathBuf,
        server: String,
    },
}

impl std::fmt::Display for SecretSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File(path) => write!(f, "file {}", path.display()),
            Self::Env(var) => write!(f, "environment variable {var}"),
            Self::SealedPin { server, .. } => write!(f, "the partition password sealed for {server}"),
        }
    }
}

/// A `[[listener]]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub mode: ListenerMode,
    /// `IP:PORT` to listen on.
    pub listen: SocketAddr,
    /// `sni` mode: the upstream port.
    #[serde(default = "https_port")]
    pub upstream_port: u16,
    /// `transparent` mode: TPROXY (IP_TRANSPARENT; the original destination is the socket's
    /// local address) instead of REDIRECT (SO_ORIGINAL_DST).
    #[serde(default)]
    pub tproxy: bool,
    /// What decryption rules' `listeners` match and logs show (default: the mode's name).
    #[serde(default)]
    pub name: Option<String>,
    /// `basic`: clients authenticate with `Proxy-Authorization: Basic` against `[auth]
    /// users_file` (explicit listeners only).
    #[serde(default)]
    pub auth: Option<AuthMode>,
    /// Every connection starts with a PROXY protocol header (v1 or v2) carrying the client's
    /// address; accepted only from `trusted_proxies`, other peers are refused.
    #[serde(default)]
    pub proxy_protocol: bool,
    /// The load balancers allowed to send PROXY headers.
    #[serde(default, deserialize_with = "networks")]
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

impl ListenerConfig {
    /// The name rules and logs use: `name`, or the mode's.
    pub fn name(&self) -> &str {
        self.name.as_deref().unwrap_or(self.mode.as_str())
    }
}

/// How clients of an explicit listener authenticate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// `Proxy-Authorization: Basic`, checked against an htpasswd file.
    Basic,
}

fn https_port() -> u16 {
    443
}

/// What a listener takes its destination from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerMode {
    /// HTTP CONNECT and absolute-form plain HTTP.
    Explicit,
    /// The ClientHello's SNI.
    Sni,
    /// The socket's original destination (kernel redirect).
    Transparent,
    /// Our own servers, certificates from the store.
    Inbound,
}

impl ListenerMode {
    /// The name used in the configuration and in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Explicit => "explicit",
            Self::Sni => "sni",
            Self::Transparent => "transparent",
            Self::Inbound => "inbound",
        }
    }

    /// Whether the listener intercepts outbound traffic (and so needs the forward-trust CA).
    pub fn is_forward(self) -> bool {
        self != Self::Inbound
    }
}

/// `[upstream]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConfig {
    /// PEM bundles trusted in addition to the system and webpki roots.
    pub ca_bundles: Vec<PathBuf>,
    /// What to do when an upstream certificate fails validation: the default of every
    /// `on_error` key left out (but `revoked`).
    pub untrusted: UntrustedAction,
    /// `[upstream.on_error]`: the action for each kind of failure.
    pub on_error: OnErrorConfig,
    /// Upstreams that cannot be intercepted (they ask for a client certificate, speak only
    /// TLS 1.1 or older, share no cipher suite with us).
    pub unsupported: UnsupportedAction,
    /// Revocation checks of upstream certificates.
    pub revocation: RevocationMode,
    /// A CRL not fetched within this is unknown status (`revocation_unknown`).
    pub revocation_timeout_ms: u64,
    /// A larger CRL is refused (unknown status).
    pub revocation_max_crl_bytes: usize,
    /// A parent proxy every upstream connection goes through (`http://host:port`): CONNECT
    /// for TLS and tunnels, absolute-form requests for plain HTTP.
    pub parent: Option<ParentUrl>,
    /// `user:password` for the parent (Basic), one line, 0600.
    pub parent_auth_file: Option<PathBuf>,
    /// Destinations that go direct: host globs, and networks (CIDRs) matched against
    /// address literals and transparent mode's original destinations.
    pub no_parent: Destinations,
    /// `[[upstream.client_cert]]`: the client certificate tollgate presents itself to servers
    /// that ask for one, by host, instead of tunnelling them.
    pub client_cert: Vec<ClientCertConfig>,
}

/// A client certificate from the store (its key on the HSM or sealed in the vault), presented
/// to the upstream hosts it names when they ask for one.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientCertConfig {
    /// Host globs (`api.example.com`, `*.partner.example`).
    pub hosts: HostGlobs,
    /// The certificate's name in the store (`tollgate cert import --name`).
    pub cert: String,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            ca_bundles: Vec::new(),
            untrusted: UntrustedAction::ForwardUntrust,
            on_error: OnErrorConfig::default(),
            unsupported: UnsupportedAction::Tunnel,
            revocation: RevocationMode::Crl,
            revocation_timeout_ms: 2000,
            revocation_max_crl_bytes: 10 << 20,
            parent: None,
            parent_auth_file: None,
            no_parent: Destinations::default(),
            client_cert: Vec::new(),
        }
    }
}

/// `[upstream] parent`: where the parent proxy listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParentUrl {
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for ParentUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.host.contains(':') {
            true => write!(f, "http://[{}]:{}", self.host, self.port),
            false => write!(f, "http://{}:{}", self.host, self.port),
        }
    }
}

impl<'de> Deserialize<'de> for ParentUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let bad = |why: &str| serde::de::Error::custom(format!("{text:?}: {why}"));
        let uri: http::Uri = text.parse().map_err(|_| bad("not a URL such as http://proxy.corp:3128"))?;
        if uri.scheme_str() != Some("http") {
            return Err(bad("only http:// parents are supported (tollgate speaks plain HTTP to its parent)"));
        }
        if uri.path_and_query().is_some_and(|p| p.as_str() != "/") || text.contains('@') {
            return Err(bad("give only scheme, host and port; credentials go in parent_auth_file"));
        }
        let host = uri.host().ok_or_else(|| bad("no host"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
        Ok(Self { host, port: uri.port_u16().unwrap_or(3128) })
    }
}

/// Destinations named by host glob or by network, in one list (`no_parent`).
#[derive(Clone, Debug, Default)]
pub struct Destinations {
    pub hosts: HostGlobs,
    pub networks: Vec<ipnet::IpNet>,
}

impl Destinations {
    /// Whether `host` (lower-case; an address literal is matched against the networks) or the
    /// address the connection goes to is listed.
    pub fn contains(&self, host: &str, addr: Option<std::net::IpAddr>) -> bool {
        let literal = host.parse::<std::net::IpAddr>().ok();
        self.hosts.is_match(host)
            || [literal, addr]
                .into_iter()
                .flatten()
                .any(|ip| self.networks.iter().any(|n| n.contains(&ip.to_canonical())))
    }
}

impl<'de> Deserialize<'de> for Destinations {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut globs = Vec::new();
        let mut networks = Vec::new();
        for entry in Vec::<String>::deserialize(d)? {
            match entry.parse::<ipnet::IpNet>().or_else(|_| entry.parse::<std::net::IpAddr>().map(ipnet::IpNet::from)) {
                Ok(net) => networks.push(net),
                Err(_) if entry.contains('/') => {
                    return Err(serde::de::Error::custom(format!("{entry:?} is neither a host glob nor a CIDR")));
                }
                Err(_) => globs.push(entry),
            }
        }
        let hosts = HostGlobs::deserialize(serde::de::value::SeqDeserializer::<_, D::Error>::new(globs.into_iter()))?;
        Ok(Self { hosts, networks })
    }
}

/// `[upstream] revocation`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RevocationMode {
    Off,
    /// CRLs from the end entity's distribution points (http://), cached until their
    /// nextUpdate; a stapled OCSP response is honoured.
    Crl,
    /// As `crl`, and an OCSP query to the end entity's responder when neither a staple nor
    /// a CRL settles it.
    #[serde(rename = "crl+ocsp")]
    CrlOcsp,
}

/// What an upstream that cannot be intercepted gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UnsupportedAction {
    /// The client's connection is passed through untouched, and the host remembered (the
    /// learned bypass) so later connections skip the failed attempt.
    Tunnel,
    /// A TLS alert.
    Block,
}

/// `[upstream.on_error]`: `untrust` or `block` per failure; a key left out follows
/// `[upstream] untrusted`, except `revoked`, which blocks.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OnErrorConfig {
    pub expired: Option<ErrorAction>,
    pub not_yet_valid: Option<ErrorAction>,
    pub untrusted_issuer: Option<ErrorAction>,
    pub name_mismatch: Option<ErrorAction>,
    /// RSA keys under 2048 bits, SHA-1 or MD5 signatures.
    pub weak: Option<ErrorAction>,
    pub revoked: Option<ErrorAction>,
    /// Revocation could not be checked (fetch failed or timed out).
    pub revocation_unknown: Option<ErrorAction>,
}

/// What a failed upstream certificate gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorAction {
    /// A leaf from the forward-untrust CA: the client sees the problem.
    Untrust,
    /// A TLS alert (a 502 with `tollgate-error` inside a decrypted session).
    Block,
}

impl From<UntrustedAction> for ErrorAction {
    fn from(action: UntrustedAction) -> Self {
        match action {
            UntrustedAction::ForwardUntrust => Self::Untrust,
            UntrustedAction::Block => Self::Block,
        }
    }
}

/// The policy for upstreams whose certificate fails validation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UntrustedAction {
    /// Mint from the forward-untrust CA so the client sees the problem.
    ForwardUntrust,
    /// Refuse the connection with a TLS alert.
    Block,
}

/// `[resolve]`: `"host:port" = "ip:port"`. A host `*.example` matches one label in front of
/// `example` (load tests with a distinct name per connection).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(try_from = "BTreeMap<String, String>")]
pub struct Resolve(BTreeMap<(String, u16), SocketAddr>);

impl Resolve {
    /// The override for `host:port` (`host` lower-case): exact host first, then `*.parent`.
    pub fn get(&self, host: &str, port: u16) -> Option<SocketAddr> {
        if let Some(addr) = self.0.get(&(host.to_string(), port)) {
            return Some(*addr);
        }
        let (_, parent) = host.split_once('.')?;
        self.0.get(&(format!("*.{parent}"), port)).copied()
    }

    /// Whether there is an entry for exactly `host:port` (a wildcard is written `*.parent`).
    pub fn contains(&self, host: &str, port: u16) -> bool {
        self.0.contains_key(&(host.to_string(), port))
    }
}

impl TryFrom<BTreeMap<String, String>> for Resolve {
    type Error = String;

    fn try_from(raw: BTreeMap<String, String>) -> Result<Self, String> {
        let mut map = BTreeMap::new();
        for (key, value) in raw {
            let (host, port) = key
                .rsplit_once(':')
                .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
                .filter(|(h, _)| !h.is_empty())
                .ok_or_else(|| format!("key {key:?} must be HOST:PORT"))?;
            if host.contains('*') && !(host.starts_with("*.") && !host[2..].contains('*') && host.len() > 2) {
                return Err(format!("key {key:?}: a wildcard host must look like *.example.com"));
            }
            let addr = value.parse().map_err(|e| format!("{key:?} = {value:?}: not IP:PORT: {e}"))?;
            map.insert((host.to_ascii_lowercase(), port), addr);
        }
        Ok(Self(map))
    }
}

/// `[policy]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyConfig {
    /// Host globs whose TLS is passed through untouched.
    pub no_decrypt: HostGlobs,
    /// `[[policy.rule]]`: HTTP inspection rules, first match wins; no match allows.
    #[serde(rename = "rule")]
    pub rules: Vec<RuleConfig>,
    /// How long a host whose clients reject our certificate (pinning) is passed through;
    /// 0 disables learning.
    pub learn_bypass_secs: u64,
    /// Networks clients may not reach through the proxy (checked on every address tried, so a
    /// name resolving to loopback is refused too). `[resolve]` overrides and `[[inbound]]`
    /// origins are the operator's own choice and exempt.
    #[serde(deserialize_with = "networks")]
    pub deny_destinations: Vec<ipnet::IpNet>,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            no_decrypt: HostGlobs::default(),
            rules: Vec::new(),
            learn_bypass_secs: 12 * 3600,
            // The proxy host itself (loopback, unspecified) and link-local networks (cloud
            // metadata services at 169.254.169.254).
            deny_destinations: ["127.0.0.0/8", "::1/128", "0.0.0.0/8", "::/128", "169.254.0.0/16", "fe80::/10"]
                .iter()
                .map(|n| n.parse().expect("the default networks are valid CIDRs"))
                .collect(),
        }
    }
}

/// One `[[policy.rule]]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Named in block pages and logs (default: `rule N`).
    #[serde(default)]
    pub name: String,
    /// Host glob (any when absent).
    pub host: Option<HostGlob>,
    /// Path prefix, starting with `/` (any when absent).
    #[serde(default, deserialize_with = "path_prefix")]
    pub path_prefix: Option<String>,
    /// Methods (any when empty).
    #[serde(default, deserialize_with = "methods")]
    pub methods: Vec<http::Method>,
    pub action: RuleAction,
}

/// What a matching rule does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleAction {
    Allow,
    Block,
}

/// A host glob, case-insensitive, compiled where it is read.
#[derive(Clone, Debug)]
pub struct HostGlob {
    glob: globset::Glob,
    matcher: globset::GlobMatcher,
}

impl HostGlob {
    /// Whether `host` (lower-case) matches.
    pub fn is_match(&self, host: &str) -> bool {
        self.matcher.is_match(host)
    }

    /// The glob as written (lower-cased).
    pub fn as_str(&self) -> &str {
        self.glob.glob()
    }
}

impl std::str::FromStr for HostGlob {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let glob = globset::GlobBuilder::new(&text.to_ascii_lowercase())
            .literal_separator(true)
            .build()
            .map_err(|e| format!("{text:?} is not a host glob: {e}"))?;
        Ok(Self { matcher: glob.compile_matcher(), glob })
    }
}

impl<'de> Deserialize<'de> for HostGlob {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// A list of host globs matched at once.
#[derive(Clone, Debug, Default)]
pub struct HostGlobs {
    globs: Vec<HostGlob>,
    set: globset::GlobSet,
}

impl HostGlobs {
    /// Whether `host` (lower-case) matches any glob.
    pub fn is_match(&self, host: &str) -> bool {
        self.set.is_match(host)
    }

    /// The globs, as written.
    pub fn globs(&self) -> &[HostGlob] {
        &self.globs
    }
}

impl<'de> Deserialize<'de> for HostGlobs {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let globs = Vec::<HostGlob>::deserialize(d)?;
        let mut builder = globset::GlobSetBuilder::new();
        for glob in &globs {
            builder.add(glob.glob.clone());
        }
        let set = builder.build().map_err(serde::de::Error::custom)?;
        Ok(Self { globs, set })
    }
}

/// `[management]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ManagementConfig {
    /// The management API's address (loopback by default).
    pub listen: SocketAddr,
    /// Bearer token for changing routes, from this file; without it, the one sealed under the
    /// master key (`tollgate api-token set`); with neither they are refused.
    pub token_file: Option<PathBuf>,
}

impl Default for ManagementConfig {
    fn default() -> Self {
        Self { listen: SocketAddr::from(([127, 0, 0, 1], 9090)), token_file: None }
    }
}

/// `[limits]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Client connections open at once, whatever became of them (CONNECT tunnels, WebSockets
    /// and passthrough tunnels included); more are closed at accept.
    pub max_connections: usize,
    /// ClientHello and client TLS handshake.
    pub handshake_timeout_secs: u64,
    /// Upstream TCP connect (all addresses, Happy Eyeballs) and TLS handshake.
    pub connect_timeout_secs: u64,
    /// Longest an HSM signature for a mint may take before the mint fails.
    pub mint_timeout_secs: u64,
    /// Upstream connections kept for reuse, across all hosts.
    pub upstream_pool_max: usize,
    /// A pooled upstream connection unused this long is closed.
    pub upstream_idle_timeout_secs: u64,
    /// An upstream that sends nothing this long while we wait on it (handshake, response
    /// headers, body) is cut: 502 before headers, an aborted response after.
    pub upstream_read_timeout_secs: u64,
    /// A client that accepts none of our bytes this long (slow read) is cut.
    pub client_send_timeout_secs: u64,
    /// A passthrough tunnel with no byte in either direction for this long is closed.
    pub tunnel_idle_timeout_secs: u64,
    /// Data-plane threads, each serving its own share of connections (0: one per CPU).
    pub io_threads: usize,
    /// Longest busy-polling window, µs: a data-plane thread that ran client work within its
    /// window polls for more without sleeping, the window adapting between 0 and this (0: off;
    /// unset: `busy_poll::DEFAULT_MAX` unless the process runs under a CPU quota).
    pub busy_poll_us: Option<u64>,
    /// Inbound handshakes that may wait for an HSM signature at once; more are shed.
    pub hsm_handshakes_max: usize,
    /// A client must send a request's headers within this (HTTP/1.1; slowloris guard).
    pub header_timeout_secs: u64,
    /// Largest request header block accepted.
    pub max_header_bytes: usize,
    /// On SIGTERM, in-flight requests and open connections get this long to finish.
    pub shutdown_grace_secs: u64,
    /// On SIGTERM, readiness turns 503 and the listeners keep accepting this long before they
    /// close, so a load balancer checking `/readyz` stops sending first (a few of its check
    /// intervals; 0 closes them at once).
    pub drain_delay_secs: u64,
    /// Connections one client address may hold at once (after the PROXY protocol).
    pub per_client_connections: usize,
    /// New leaves (HSM signatures) one client address may cause per second, on average…
    pub per_client_mints_per_sec: u32,
    /// …and in a burst.
    pub per_client_mint_burst: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            handshake_timeout_secs: 10,
            connect_timeout_secs: 10,
            mint_timeout_secs: 5,
            upstream_pool_max: 1024,
            upstream_idle_timeout_secs: 30,
            upstream_read_timeout_secs: 60,
            client_send_timeout_secs: 60,
            tunnel_idle_timeout_secs: 600,
            io_threads: 0,
            busy_poll_us: None,
            hsm_handshakes_max: 256,
            header_timeout_secs: 30,
            max_header_bytes: 64 * 1024,
            shutdown_grace_secs: 30,
            drain_delay_secs: 0,
            per_client_connections: 256,
            per_client_mints_per_sec: 20,
            per_client_mint_burst: 40,
        }
    }
}

/// `[mint]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MintConfig {
    /// Leaves kept in the cache.
    pub cache_capacity: u64,
    /// A leaf that mirrors an upstream certificate's names serves every host those names
    /// cover (one signature for a wildcard's subdomains); `false` mints one per host name.
    pub share_leaves: bool,
}

impl Default for MintConfig {
    fn default() -> Self {
        Self { cache_capacity: 10_000, share_leaves: true }
    }
}

/// One `[[inbound]]`: a protected server.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InboundConfig {
    /// The SNI served (lower-case); its certificate comes from the store (`--inbound HOST`).
    #[serde(deserialize_with = "host_name")]
    pub host: String,
    /// The origin behind it: `https://host[:port]` (validated) or `http://host[:port]`.
    #[serde(rename = "upstream")]
    pub origin: Origin,
    /// Trust only this PEM bundle for the origin (a pinned CA) instead of the system roots.
    pub ca_bundle: Option<PathBuf>,
}

/// Where an inbound host's traffic goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    /// `https` (validated) or `http`.
    pub tls: bool,
    pub host: String,
    pub port: u16,
}

impl<'de> Deserialize<'de> for Origin {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        origin(&text).map_err(|reason| serde::de::Error::custom(format!("{text:?}: {reason}")))
    }
}

fn origin(text: &str) -> Result<Origin, String> {
    let uri: http::Uri = text.parse().map_err(|e| format!("{e}"))?;
    let tls = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err("must start with https:// or http://".into()),
    };
    let host = uri.host().filter(|h| !h.is_empty()).ok_or("no host")?;
    let host = host.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
    if uri.path() != "/" && !uri.path().is_empty() {
        return Err("give only scheme://host[:port]; paths are not rewritten".into());
    }
    Ok(Origin { tls, host, port: uri.port_u16().unwrap_or(if tls { 443 } else { 80 }) })
}

impl Config {
    /// Reads and parses a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        Self::from_toml(&text, path)
    }

    /// Parses config text; `path` names it in errors and anchors relative paths.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let mut config: Config =
            serde_path_to_error::deserialize(toml::Deserializer::new(text)).map_err(|e| parse_error(text, path, e))?;
        config.path = path.to_path_buf();
        config.resolve_paths(path.parent().unwrap_or(Path::new(".")));
        config.check()?;
        Ok(config)
    }

    /// The listener of a mode, if any.
    pub fn listener(&self, mode: ListenerMode) -> Option<&ListenerConfig> {
        self.listeners.iter().find(|l| l.mode == mode)
    }

    /// Where the management API token comes from, when a file is configured.
    pub fn management_token(&self) -> Option<SecretSource> {
        self.management.token_file.clone().map(SecretSource::File)
    }

    /// Relative paths are relative to the config file's directory.
    fn resolve_paths(&mut self, base: &Path) {
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        resolve(&mut self.state_dir);
        for server in &mut self.hsm.servers {
            resolve(&mut server.module);
            server.pin_file.iter_mut().for_each(resolve);
            server.state_dir = self.state_dir.clone();
        }
        self.upstream.ca_bundles.iter_mut().for_each(resolve);
        self.upstream.parent_auth_file.iter_mut().for_each(resolve);
        self.inbound.iter_mut().flat_map(|site| site.ca_bundle.as_mut()).for_each(resolve);
        self.management.token_file.iter_mut().for_each(resolve);
        self.auth.users_file.iter_mut().for_each(resolve);
        self.log.file.iter_mut().for_each(resolve);
        for rule in &mut self.decryption.rules {
            for list in &mut rule.host_lists {
                if let ListSource::File(path) = list {
                    resolve(path);
                }
            }
        }
    }

    /// What one field alone cannot say: duplicates, combinations, ranges.
    fn check(&mut self) -> Result<(), ConfigError> {
        let invalid = |field: String, reason: &str| ConfigError::Invalid {
            path: self.path.clone(),
            field,
            reason: reason.to_string(),
        };
        for (i, server) in self.hsm.servers.iter().enumerate() {
            if self.hsm.servers[..i].iter().any(|other| other.name == server.name) {
                return Err(invalid(
                    format!("hsm.server[{i}].name"),
                    &format!("duplicate server name {:?}", server.name),
                ));
            }
            if server.pin_file.is_some() && server.pin_env.is_some() {
                return Err(invalid(format!("hsm.server[{i}].pin_file"), "set pin_file or pin_env, not both"));
            }
        }
        for (i, listener) in self.listeners.iter().enumerate() {
            if listener.upstream_port == 0 {
                return Err(invalid(format!("listener[{i}].upstream_port"), "must not be 0"));
            }
            if listener.tproxy && listener.mode != ListenerMode::Transparent {
                return Err(invalid(format!("listener[{i}].tproxy"), "only a transparent listener can use TPROXY"));
            }
            if listener.auth.is_some() && listener.mode != ListenerMode::Explicit {
                return Err(invalid(
                    format!("listener[{i}].auth"),
                    "only an explicit listener can authenticate clients",
                ));
            }
            if listener.auth.is_some() && self.auth.users_file.is_none() {
                return Err(invalid(format!("listener[{i}].auth"), "needs [auth] users_file"));
            }
            if listener.proxy_protocol && listener.trusted_proxies.is_empty() {
                return Err(invalid(
                    format!("listener[{i}].trusted_proxies"),
                    "proxy_protocol needs the networks of the load balancers allowed to send it",
                ));
            }
            if let Some(name) = &listener.name
                && (name.is_empty() || self.listeners[..i].iter().any(|l| l.name() == name))
            {
                return Err(invalid(format!("listener[{i}].name"), &format!("{name:?} is empty or already used")));
            }
        }
        let names: Vec<&str> = self.listeners.iter().map(ListenerConfig::name).collect();
        for (i, rule) in self.decryption.rules.iter_mut().enumerate() {
            if let Some(unknown) = rule.listeners.iter().find(|l| !names.contains(&l.as_str())) {
                return Err(ConfigError::Invalid {
                    path: self.path.clone(),
                    field: format!("decryption.rule[{i}].listeners"),
                    reason: format!("no listener is named {unknown:?} (listeners: {})", names.join(", ")),
                });
            }
            if rule.name.is_empty() {
                rule.name = format!("decryption rule {i}");
            }
        }
        if self.upstream.parent_auth_file.is_some() && self.upstream.parent.is_none() {
            return Err(invalid("upstream.parent_auth_file".into(), "credentials for no parent: set upstream.parent"));
        }
        if self.icap.timeout_secs == 0 || self.icap.max_connections == 0 {
            return Err(invalid("icap".into(), "timeout_secs and max_connections must be at least 1"));
        }
        if self.bypass.min_clients == 0 {
            return Err(invalid("bypass.min_clients".into(), "must be at least 1"));
        }
        let limits = &self.limits;
        let at_least_one = [
            ("max_connections", limits.max_connections as u64),
            ("upstream_read_timeout_secs", limits.upstream_read_timeout_secs),
            ("client_send_timeout_secs", limits.client_send_timeout_secs),
            ("tunnel_idle_timeout_secs", limits.tunnel_idle_timeout_secs),
            ("header_timeout_secs", limits.header_timeout_secs),
            ("per_client_connections", limits.per_client_connections as u64),
            ("per_client_mints_per_sec", u64::from(limits.per_client_mints_per_sec)),
            ("per_client_mint_burst", u64::from(limits.per_client_mint_burst)),
        ];
        if let Some((field, _)) = at_least_one.iter().find(|(_, value)| *value == 0) {
            return Err(invalid(format!("limits.{field}"), "must be at least 1"));
        }
        if limits.busy_poll_us.is_some_and(|us| us > 10_000) {
            return Err(invalid(
                "limits.busy_poll_us".into(),
                "must be at most 10000 (10 ms; 0 turns busy-polling off)",
            ));
        }
        if !(8192..=16 * 1024 * 1024).contains(&limits.max_header_bytes) {
            return Err(invalid("limits.max_header_bytes".into(), "must be between 8192 and 16777216"));
        }
        if !(100..=30_000).contains(&self.upstream.revocation_timeout_ms) {
            return Err(invalid("upstream.revocation_timeout_ms".into(), "must be between 100 and 30000"));
        }
        if self.log.max_file_bytes < 4096 {
            return Err(invalid("log.max_file_bytes".into(), "must be at least 4096"));
        }
        if self.log.keep_files == 0 || self.log.buffer_lines == 0 {
            let field = if self.log.keep_files == 0 { "log.keep_files" } else { "log.buffer_lines" };
            return Err(invalid(field.into(), "must be at least 1"));
        }
        for (i, entry) in self.upstream.client_cert.iter().enumerate() {
            if entry.hosts.globs().is_empty() || entry.cert.is_empty() {
                let field = if entry.cert.is_empty() { "cert" } else { "hosts" };
                return Err(invalid(format!("upstream.client_cert[{i}].{field}"), "must not be empty"));
            }
        }
        for (i, rule) in self.policy.rules.iter_mut().enumerate() {
            if rule.name.is_empty() {
                rule.name = format!("rule {i}");
            }
        }
        Ok(())
    }
}

/// A parse error with the field's path (`listener[0].listen`) and the line it is on.
fn parse_error(text: &str, path: &Path, e: serde_path_to_error::Error<toml::de::Error>) -> ConfigError {
    let field = e.path().to_string();
    let inner = e.into_inner();
    let at = inner.span().map(|span| {
        let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
        let source = text.lines().nth(line - 1).unwrap_or_default().trim();
        format!(" (line {line}: {source})")
    });
    let message = match inner.message().trim() {
        "" => "malformed TOML".to_string(),
        message => message.to_string(),
    };
    let reason = format!("{}{}", message.trim_end().replace('\n', " "), at.unwrap_or_default());
    match field.as_str() {
        "." | "" => ConfigError::Parse { path: path.to_path_buf(), message: reason },
        _ => ConfigError::Invalid { path: path.to_path_buf(), field, reason },
    }
}

fn server_name<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let name = String::deserialize(d)?;
    match (1..=31).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_graphic()) {
        true => Ok(name),
        false => Err(serde::de::Error::custom(format!("{name:?} must be 1–31 printable ASCII characters"))),
    }
}

fn token_label<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let label = String::deserialize(d)?;
    match (1..=32).contains(&label.len()) {
        true => Ok(label),
        false => Err(serde::de::Error::custom("token label must be 1–32 characters")),
    }
}

fn host_name<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let host = String::deserialize(d)?;
    match host.is_empty() || host.contains(['/', ':', ' ']) {
        true => Err(serde::de::Error::custom(format!("{host:?} is not a host name"))),
        false => Ok(host.to_ascii_lowercase()),
    }
}

fn networks<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<ipnet::IpNet>, D::Error> {
    Vec::<String>::deserialize(d)?
        .iter()
        .enumerate()
        .map(|(i, net)| {
            net.parse::<ipnet::IpNet>().or_else(|_| net.parse::<std::net::IpAddr>().map(ipnet::IpNet::from)).map_err(
                |_| {
                    serde::de::Error::custom(format!(
                        "[{i}]: {net:?} is not a network (CIDR such as 10.0.0.0/8) or an address"
                    ))
                },
            )
        })
        .collect()
}

fn path_prefix<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let prefix = String::deserialize(d)?;
    match prefix.starts_with('/') {
        true => Ok(Some(prefix)),
        false => Err(serde::de::Error::custom(format!("{prefix:?} must start with /"))),
    }
}

fn methods<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<http::Method>, D::Error> {
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|m| {
            http::Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                .map_err(|_| serde::de::Error::custom(format!("{m:?} is not an HTTP method")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, Path::new("/etc/tollgate/tollgate.toml"))
    }

    #[test]
    fn spec_example_parses() {
        let config = parse(
            r#"
            state_dir = "var/tollgate"
            [[hsm.server]]
            name = "hsm-a"
            module = "/usr/lib/softhsm/libsofthsm2.so"
            token = "tollgate-a"
            pin_file = "/run/secrets/hsm-a.pin"
            [[listener]]
            mode = "explicit"
            listen = "127.0.0.1:8080"
            [upstream]
            ca_bundles = ["extra-roots.pem"]
            [resolve]
            "origin.test:443" = "127.0.0.1:9443"
            [[inbound]]
            host = "www.example.com"
            upstream = "https://10.0.0.10:443"
            [management]
            listen = "127.0.0.1:9090"
            "#,
        )
        .unwrap();
        assert_eq!(config.state_dir, Path::new("/etc/tollgate/var/tollgate"));
        assert_eq!(config.upstream.ca_bundles[0], Path::new("/etc/tollgate/extra-roots.pem"));
        assert_eq!(config.hsm.servers[0].pin(), SecretSource::File("/run/secrets/hsm-a.pin".into()));
        assert_eq!(config.resolve.get("origin.test", 443), Some("127.0.0.1:9443".parse().unwrap()));
        assert_eq!(config.upstream.untrusted, UntrustedAction::ForwardUntrust);
        assert_eq!(config.inbound[0].origin, Origin { tls: true, host: "10.0.0.10".into(), port: 443 });
        assert_eq!(config.limits.client_send_timeout_secs, 60);
    }

    #[test]
    fn a_server_without_pin_file_or_env_uses_the_sealed_one() {
        let config = parse("state_dir = \"s\"\n[[hsm.server]]\nname = \"a\"\ntoken = \"t\"\n").unwrap();
        let pin = config.hsm.servers[0].pin();
        assert_eq!(pin, SecretSource::SealedPin { state_dir: "/etc/tollgate/s".into(), server: "a".into() });
        let both =
            "state_dir = \"s\"\n[[hsm.server]]\nname = \"a\"\ntoken = \"t\"\npin_file = \"f\"\npin_env = \"V\"\n";
        let err = parse(both).unwrap_err().to_string();
        assert!(err.contains("hsm.server[0].pin_file") && err.contains("not both"), "{err}");
    }

    #[test]
    fn client_certificate_entries_need_hosts_and_a_name() {
        let base = "state_dir = \"x\"\n[[upstream.client_cert]]\n";
        let config = parse(&format!("{base}hosts = [\"*.partner.test\"]\ncert = \"gw\"\n")).unwrap();
        let entry = &config.upstream.client_cert[0];
        assert!(entry.hosts.is_match("api.partner.test") && !entry.hosts.is_match("partner.test.evil"));
        assert_eq!(entry.cert, "gw");
        let err = parse(&format!("{base}hosts = []\ncert = \"gw\"\n")).unwrap_err().to_string();
        assert!(err.contains("upstream.client_cert[0].hosts") && err.contains("must not be empty"), "{err}");
        let err = parse(&format!("{base}hosts = [\"a.test\"]\ncert = \"\"\n")).unwrap_err().to_string();
        assert!(err.contains("upstream.client_cert[0].cert"), "{err}");
        let err = parse(&format!("{base}hosts = [\"a.test\"]\n")).unwrap_err().to_string();
        assert!(err.contains("cert"), "{err}");
    }

    #[test]
    fn errors_name_file_and_field() {
        let err = parse("state_dir = \"x\"\nbogus = 1\n").unwrap_err().to_string();
        assert!(err.contains("/etc/tollgate/tollgate.toml") && err.contains("bogus"), "{err}");

        let err = parse("state_dir = \"x\"\n[[hsm.server]]\nname = \"\"\ntoken = \"t\"\n").unwrap_err().to_string();
        assert!(err.contains("hsm.server[0].name"), "{err}");

        let err =
            parse("state_dir = \"x\"\n[[listener]]\nmode = \"explicit\"\nlisten = \"nope\"\n").unwrap_err().to_string();
        assert!(err.contains("listener[0].listen") && err.contains("nope"), "{err}");

        let err = parse("state_dir = \"x\"\n[resolve]\n\"a.test\" = \"127.0.0.1:1\"\n").unwrap_err().to_string();
        assert!(err.contains("HOST:PORT"), "{err}");
        let err = parse("state_dir = \"x\"\n[resolve]\n\"a.*.test:1\" = \"127.0.0.1:1\"\n").unwrap_err().to_string();
        assert!(err.contains("wildcard"), "{err}");
        let config = parse("state_dir = \"x\"\n[resolve]\n\"*.mint.test:443\" = \"127.0.0.1:1\"\n").unwrap();
        assert_eq!(config.resolve.get("a.mint.test", 443), Some("127.0.0.1:1".parse().unwrap()));
        assert_eq!(config.resolve.get("a.b.mint.test", 443), None);

        let err = parse("state_dir = \"x\"\n[policy]\nno_decrypt = [\"ok.test\", \"a[\"]\n").unwrap_err().to_string();
        assert!(err.contains("policy.no_decrypt[1]"), "{err}");
        let err = parse("state_dir = \"x\"\n[[policy.rule]]\nmethods = [\"GE T\"]\naction = \"block\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("policy.rule[0].methods"), "{err}");
        let err = parse("state_dir = \"x\"\n[limits]\nmax_connections = 0\n").unwrap_err().to_string();
        assert!(err.contains("limits.max_connections"), "{err}");
        let err = parse("state_dir = \"x\"\n[limits]\nbusy_poll_us = 20000\n").unwrap_err().to_string();
        assert!(err.contains("limits.busy_poll_us") && err.contains("10000"), "{err}");
        assert_eq!(parse("state_dir = \"x\"\n[limits]\nbusy_poll_us = 200\n").unwrap().limits.busy_poll_us, Some(200));
        assert_eq!(parse("state_dir = \"x\"\n").unwrap().limits.busy_poll_us, None);
        let err = parse("state_dir = \"x\"\n[[inbound]]\nhost = \"a.test\"\nupstream = \"ftp://x\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("inbound[0].upstream") && err.contains("https://"), "{err}");
    }

    #[test]
    fn destination_policy_defaults_to_the_host_and_link_local_and_names_bad_entries() {
        let config = parse("state_dir = \"x\"\n").unwrap();
        let denied = |ip: &str| {
            config.policy.deny_destinations.iter().any(|n| n.contains(&ip.parse::<std::net::IpAddr>().unwrap()))
        };
        assert!(denied("127.0.0.1") && denied("::1") && denied("169.254.169.254") && denied("fe80::1"));
        assert!(!denied("10.0.0.1") && !denied("2001:db8::1"));
        let open = parse("state_dir = \"x\"\n[policy]\ndeny_destinations = []\n").unwrap();
        assert!(open.policy.deny_destinations.is_empty());
        let one = parse("state_dir = \"x\"\n[policy]\ndeny_destinations = [\"10.1.2.3\"]\n").unwrap();
        assert_eq!(one.policy.deny_destinations[0].to_string(), "10.1.2.3/32");
        let err =
            parse("state_dir = \"x\"\n[policy]\ndeny_destinations = [\"10.0.0.0/33\"]\n").unwrap_err().to_string();
        assert!(err.contains("policy.deny_destinations") && err.contains("[0]") && err.contains("CIDR"), "{err}");
    }

    #[test]
    fn globs_are_compiled_once_and_match_case_insensitively() {
        let config = parse("state_dir = \"s\"\n[policy]\nno_decrypt = [\"*.Bank.test\", \"pinned.test\"]\n").unwrap();
        let globs = &config.policy.no_decrypt;
        assert!(globs.is_match("www.bank.test") && globs.is_match("pinned.test") && !globs.is_match("bank.test"));
        assert_eq!(globs.globs()[0].as_str(), "*.bank.test");
    }

    #[test]
    fn secret_sources_show_where_they_live_only() {
        assert_eq!(format!("{:?}", SecretSource::Env("HSM_PIN".into())), "Env(\"HSM_PIN\")");
        assert_eq!(SecretSource::Env("HSM_PIN".into()).to_string(), "environment variable HSM_PIN");
    }

    #[test]
    fn a_parent_is_an_http_url_and_no_parent_mixes_globs_and_networks() {
        let config = parse(
            "state_dir = \"x\"\n[upstream]\nparent = \"http://proxy.corp:8080\"\nno_parent = [\"*.corp\", \"10.0.0.0/8\", \"192.0.2.7\"]\n",
        )
        .unwrap();
        assert_eq!(config.upstream.parent.as_ref().unwrap().to_string(), "http://proxy.corp:8080");
        let direct = &config.upstream.no_parent;
        assert!(direct.contains("intranet.corp", None) && direct.contains("10.1.2.3", None));
        assert!(direct.contains("www.example", Some("192.0.2.7".parse().unwrap())));
        assert!(!direct.contains("www.example", Some("192.0.2.8".parse().unwrap())));
        for (value, says) in [
            ("https://proxy.corp:8080", "only http://"),
            ("http://user:pw@proxy.corp:8080", "parent_auth_file"),
            ("proxy corp", "not a URL"),
        ] {
            let err = parse(&format!("state_dir = \"x\"\n[upstream]\nparent = \"{value}\"\n")).unwrap_err().to_string();
            assert!(err.contains("upstream.parent") && err.contains(says), "{value}: {err}");
        }
        let err = parse("state_dir = \"x\"\n[upstream]\nparent_auth_file = \"p\"\n").unwrap_err().to_string();
        assert!(err.contains("upstream.parent_auth_file"), "{err}");
        let err = parse("state_dir = \"x\"\n[upstream]\nno_parent = [\"10.0.0.0/33\"]\n").unwrap_err().to_string();
        assert!(err.contains("upstream.no_parent") && err.contains("CIDR"), "{err}");
    }
}
