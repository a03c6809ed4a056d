//! The operator's TOML configuration, parsed once into typed values.
//!
//! tollgate only reads this file; everything tollgate writes lives in the state directory
//! (`state.rs`). Unknown keys are errors, every error names the file, the field and the reason,
//! and relative paths are resolved against the directory holding the config file.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use secrecy::SecretString;
use serde::Deserialize;

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
    #[error("secret for {what}: {reason}")]
    Secret { what: String, reason: String },
}

/// The whole configuration.
#[derive(Debug)]
pub struct Config {
    /// Where the config was read from (for error messages and relative paths).
    pub path: PathBuf,
    /// Program-owned state: certificate store, sealed secrets.
    pub state_dir: PathBuf,
    pub hsm: HsmConfig,
    pub listeners: Vec<ListenerConfig>,
    pub upstream: UpstreamConfig,
    /// Static `host:port → address` overrides, like curl's `--resolve`. A host `*.example`
    /// matches one label in front of `example` (load tests with a distinct name per connection).
    pub resolve: BTreeMap<(String, u16), SocketAddr>,
    pub policy: PolicyConfig,
    pub management: ManagementConfig,
    pub limits: LimitsConfig,
    pub mint: MintConfig,
    /// `[[inbound]]`: our own servers, terminated by inbound listeners.
    pub inbound: Vec<InboundConfig>,
}

/// One protected server.
#[derive(Clone, Debug)]
pub struct InboundConfig {
    /// The SNI served (lower-case); its certificate comes from the store (`--inbound HOST`).
    pub host: String,
    /// The origin behind it.
    pub origin: OriginConfig,
}

/// Where an inbound host's traffic goes.
#[derive(Clone, Debug)]
pub struct OriginConfig {
    /// `https` (validated) or `http`.
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Trust only this PEM bundle for the origin (a pinned CA) instead of the system roots.
    pub ca_bundle: Option<PathBuf>,
}

/// `[hsm]`: the HSM servers (two or more form the HA group) and how they are driven.
#[derive(Clone, Debug, Default)]
pub struct HsmConfig {
    pub servers: Vec<HsmServerConfig>,
    pub ha: HaConfig,
    /// Worker threads per PKCS#11 library.
    pub workers: usize,
    /// Jobs waiting per library before new ones are refused.
    pub queue_depth: usize,
    /// Deadline of one HSM operation, queueing included.
    pub call_timeout_ms: u64,
}

/// `[hsm.ha]`.
#[derive(Clone, Debug, Default)]
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

/// One `[[hsm.server]]`.
#[derive(Clone, Debug)]
pub struct HsmServerConfig {
    /// ASCII, 1–31 characters.
    pub name: String,
    /// The PKCS#11 library to load.
    pub module: PathBuf,
    /// Token (partition) label.
    pub token: String,
    /// Where the partition password (user PIN) comes from.
    pub pin: Option<SecretSource>,
    /// Informational network address of the HSM.
    pub address: Option<String>,
}

/// Where a secret comes from. `Debug` never shows the secret, only where it lives.
#[derive(Clone, PartialEq, Eq)]
pub enum SecretSource {
    File(PathBuf),
    Env(String),
    /// Sealed in the state directory by `tollgate hsm login`, under the device key.
    Sealed {
        file: PathBuf,
        device_key: PathBuf,
        purpose: String,
    },
}

/// Where `tollgate hsm login` seals a server's partition password.
pub fn sealed_pin(state_dir: &Path, server: &str) -> SecretSource {
    SecretSource::Sealed {
        file: state_dir.join("hsm").join(format!("{server}.pin.sealed")),
        device_key: state_dir.join("device.key"),
        purpose: format!("tollgate hsm partition password:{server}"),
    }
}

/// A `[[listener]]`.
#[derive(Clone, Debug)]
pub struct ListenerConfig {
    pub mode: ListenerMode,
    pub listen: SocketAddr,
    /// `sni` mode: the upstream port (default 443).
    pub upstream_port: u16,
    /// `transparent` mode: TPROXY (IP_TRANSPARENT; the original destination is the socket's
    /// local address) instead of REDIRECT (SO_ORIGINAL_DST).
    pub tproxy: bool,
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

/// `[upstream]`.
#[derive(Clone, Debug)]
pub struct UpstreamConfig {
    /// PEM bundles trusted in addition to the system and webpki roots.
    pub ca_bundles: Vec<PathBuf>,
    /// What to do when an upstream certificate fails validation.
    pub untrusted: UntrustedAction,
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

/// `[policy]`.
#[derive(Clone, Debug, Default)]
pub struct PolicyConfig {
    /// Host globs whose TLS is passed through untouched.
    pub no_decrypt: Vec<String>,
    /// HTTP inspection rules, first match wins; no match allows.
    pub rules: Vec<RuleConfig>,
    /// How long a host whose clients reject our certificate (pinning) is passed through;
    /// 0 disables learning.
    pub learn_bypass_secs: u64,
    /// Networks clients may not reach through the proxy (checked after DNS resolution, so a
    /// name resolving to loopback is refused too). `[resolve]` overrides and `[[inbound]]`
    /// origins are the operator's own choice and exempt.
    pub deny_destinations: Vec<ipnet::IpNet>,
}

/// Destinations refused by default: the proxy host itself (loopback, unspecified) and
/// link-local networks (cloud metadata services at 169.254.169.254).
pub const DEFAULT_DENY_DESTINATIONS: [&str; 6] =
    ["127.0.0.0/8", "::1/128", "0.0.0.0/8", "::/128", "169.254.0.0/16", "fe80::/10"];

/// One `[[policy.rule]]`.
#[derive(Clone, Debug)]
pub struct RuleConfig {
    pub name: String,
    /// Host glob (any when absent).
    pub host: Option<String>,
    /// Path prefix (any when absent).
    pub path_prefix: Option<String>,
    /// Upper-case methods (any when empty).
    pub methods: Vec<String>,
    pub action: RuleAction,
}

/// What a matching rule does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleAction {
    Allow,
    Block,
}

/// `[management]`.
#[derive(Clone, Debug)]
pub struct ManagementConfig {
    pub listen: SocketAddr,
    /// Bearer token for changing routes; without one they are refused.
    pub token: Option<SecretSource>,
}

/// `[limits]`.
#[derive(Clone, Debug)]
pub struct LimitsConfig {
    pub max_connections: usize,
    pub handshake_timeout_secs: u64,
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
    /// Data-plane threads, each serving its own share of connections (0: one per CPU).
    pub io_threads: usize,
    /// Inbound handshakes that may wait for an HSM signature at once; more are shed.
    pub hsm_handshakes_max: usize,
    /// A client must send a request's headers within this (HTTP/1.1; slowloris guard).
    pub header_timeout_secs: u64,
    /// Largest request header block accepted.
    pub max_header_bytes: usize,
    /// On SIGTERM, in-flight requests get this long to finish.
    pub shutdown_grace_secs: u64,
}

/// `[mint]`.
#[derive(Clone, Debug)]
pub struct MintConfig {
    /// Leaves kept in the cache.
    pub cache_capacity: u64,
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
        let raw: raw::Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().replace('\n', " "),
        })?;
        Typer { path, base: path.parent().unwrap_or(Path::new(".")) }.config(raw)
    }

    /// The listener of a mode, if any.
    pub fn listener(&self, mode: ListenerMode) -> Option<&ListenerConfig> {
        self.listeners.iter().find(|l| l.mode == mode)
    }
}

impl SecretSource {
    /// Reads the secret. Trailing newlines of files are not part of it.
    pub fn load(&self, what: &str) -> Result<SecretString, ConfigError> {
        let err = |reason: String| ConfigError::Secret { what: what.to_string(), reason };
        let mut value = match self {
            Self::File(path) => {
                std::fs::read_to_string(path).map_err(|e| err(format!("reading {}: {e}", path.display())))?
            }
            Self::Env(var) => std::env::var(var).map_err(|_| err(format!("environment variable {var} is not set")))?,
            Self::Sealed { file, device_key, purpose } => {
                if !file.exists() {
                    return Err(err(format!(
                        "none stored ({} missing): set pin_file or pin_env, or run `tollgate hsm login`",
                        file.display()
                    )));
                }
                let key = crate::vault::SealingKey::load(device_key).map_err(|e| err(e.to_string()))?;
                let bytes = key.open_from(file, purpose).map_err(|e| err(e.to_string()))?;
                String::from_utf8(bytes.to_vec()).map_err(|_| err("sealed value is not UTF-8".into()))?
            }
        };
        let trimmed_len = value.trim_end_matches(['\r', '\n']).len();
        value.truncate(trimmed_len);
        if value.is_empty() {
            return Err(err(format!("{self:?} is empty")));
        }
        Ok(SecretString::from(value))
    }
}

impl fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File(path) => write!(f, "file {}", path.display()),
            Self::Env(var) => write!(f, "env {var}"),
            Self::Sealed { file, .. } => write!(f, "sealed {}", file.display()),
        }
    }
}

/// Turns the raw serde tree into typed values, naming the field of every error.
struct Typer<'a> {
    path: &'a Path,
    base: &'a Path,
}

impl Typer<'_> {
    fn config(&self, raw: raw::Config) -> Result<Config, ConfigError> {
        let raw::Config { state_dir, hsm, listener, upstream, resolve, policy, inbound, management, limits, mint } =
            raw;
        let state_dir_path = self.resolve_path(&state_dir);
        let servers = hsm
            .server
            .into_iter()
            .enumerate()
            .map(|(i, s)| self.hsm_server(i, s, &state_dir_path))
            .collect::<Result<Vec<_>, _>>()?;
        for (i, a) in servers.iter().enumerate() {
            if servers[..i].iter().any(|b| b.name == a.name) {
                return Err(
                    self.invalid(format!("hsm.server[{i}].name"), format!("duplicate server name {:?}", a.name))
                );
            }
        }
        let listeners =
            listener.into_iter().enumerate().map(|(i, l)| self.listener(i, l)).collect::<Result<Vec<_>, _>>()?;
        let resolve =
            resolve.into_iter().map(|(k, v)| self.resolve_entry(k, v)).collect::<Result<BTreeMap<_, _>, _>>()?;
        for (i, glob) in policy.no_decrypt.iter().enumerate() {
            globset::Glob::new(glob).map_err(|e| self.invalid(format!("policy.no_decrypt[{i}]"), e.to_string()))?;
        }
        if limits.max_connections == 0 {
            return Err(self.invalid("limits.max_connections", "must be at least 1"));
        }
        if !(8192..=16 * 1024 * 1024).contains(&limits.max_header_bytes) {
            return Err(self.invalid("limits.max_header_bytes", "must be between 8192 and 16777216"));
        }
        if limits.upstream_read_timeout_secs == 0 {
            return Err(self.invalid("limits.upstream_read_timeout_secs", "must be at least 1"));
        }
        if limits.client_send_timeout_secs == 0 {
            return Err(self.invalid("limits.client_send_timeout_secs", "must be at least 1"));
        }
        if limits.header_timeout_secs == 0 {
            return Err(self.invalid("limits.header_timeout_secs", "must be at least 1"));
        }
        Ok(Config {
            path: self.path.to_path_buf(),
            state_dir: state_dir_path.clone(),
            hsm: HsmConfig {
                servers,
                ha: HaConfig {
                    enabled: hsm.ha.enabled,
                    group: hsm.ha.group,
                    auto_recovery_retry: hsm.ha.auto_recovery_retry,
                    auto_recovery_interval_secs: hsm.ha.auto_recovery_interval_secs,
                },
                workers: hsm.workers,
                queue_depth: hsm.queue_depth,
                call_timeout_ms: hsm.call_timeout_ms,
            },
            listeners,
            upstream: UpstreamConfig {
                ca_bundles: upstream.ca_bundles.iter().map(|p| self.resolve_path(p)).collect(),
                untrusted: upstream.untrusted,
            },
            resolve,
            policy: PolicyConfig {
                deny_destinations: policy
                    .deny_destinations
                    .unwrap_or_else(|| DEFAULT_DENY_DESTINATIONS.iter().map(|s| s.to_string()).collect())
                    .iter()
                    .enumerate()
                    .map(|(i, net)| {
                        net.parse::<ipnet::IpNet>()
                            .or_else(|_| net.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                            .map_err(|_| {
                                self.invalid(
                                    format!("policy.deny_destinations[{i}]"),
                                    format!("{net:?} is not a network (CIDR such as 10.0.0.0/8) or an address"),
                                )
                            })
                    })
                    .collect::<Result<_, _>>()?,
                learn_bypass_secs: policy.learn_bypass_secs,
                no_decrypt: policy.no_decrypt,
                rules: policy.rule.into_iter().enumerate().map(|(i, r)| self.rule(i, r)).collect::<Result<_, _>>()?,
            },
            management: ManagementConfig {
                listen: management.listen,
                token: management.token_file.map(|p| SecretSource::File(self.resolve_path(&p))),
            },
            limits: LimitsConfig {
                max_connections: limits.max_connections,
                handshake_timeout_secs: limits.handshake_timeout_secs,
                connect_timeout_secs: limits.connect_timeout_secs,
                mint_timeout_secs: limits.mint_timeout_secs,
                upstream_pool_max: limits.upstream_pool_max,
                upstream_idle_timeout_secs: limits.upstream_idle_timeout_secs,
                upstream_read_timeout_secs: limits.upstream_read_timeout_secs,
                client_send_timeout_secs: limits.client_send_timeout_secs,
                io_threads: limits.io_threads,
                hsm_handshakes_max: limits.hsm_handshakes_max,
                header_timeout_secs: limits.header_timeout_secs,
                max_header_bytes: limits.max_header_bytes,
                shutdown_grace_secs: limits.shutdown_grace_secs,
            },
            mint: MintConfig { cache_capacity: mint.cache_capacity },
            inbound: inbound.into_iter().enumerate().map(|(i, raw)| self.inbound(i, raw)).collect::<Result<_, _>>()?,
        })
    }

    fn hsm_server(&self, i: usize, raw: raw::HsmServer, state_dir: &Path) -> Result<HsmServerConfig, ConfigError> {
        let field = |f: &str| format!("hsm.server[{i}].{f}");
        let name_ok = (1..=31).contains(&raw.name.len()) && raw.name.bytes().all(|b| b.is_ascii_graphic());
        if !name_ok {
            return Err(self.invalid(field("name"), format!("{:?} must be 1–31 printable ASCII characters", raw.name)));
        }
        if raw.token.is_empty() || raw.token.len() > 32 {
            return Err(self.invalid(field("token"), "token label must be 1–32 characters"));
        }
        let pin = match (raw.pin_file, raw.pin_env) {
            (Some(_), Some(_)) => {
                return Err(self.invalid(field("pin_file"), "set pin_file or pin_env, not both"));
            }
            (Some(file), None) => Some(SecretSource::File(self.resolve_path(&file))),
            (None, Some(var)) => Some(SecretSource::Env(var)),
            (None, None) => Some(sealed_pin(state_dir, &raw.name)),
        };
        Ok(HsmServerConfig {
            name: raw.name,
            module: self.resolve_path(&raw.module),
            token: raw.token,
            pin,
            address: raw.address,
        })
    }

    fn listener(&self, i: usize, raw: raw::Listener) -> Result<ListenerConfig, ConfigError> {
        let listen: SocketAddr = raw
            .listen
            .parse()
            .map_err(|e| self.invalid(format!("listener[{i}].listen"), format!("{:?}: {e}", raw.listen)))?;
        if raw.upstream_port == 0 {
            return Err(self.invalid(format!("listener[{i}].upstream_port"), "must not be 0"));
        }
        if raw.tproxy && raw.mode != ListenerMode::Transparent {
            return Err(self.invalid(format!("listener[{i}].tproxy"), "only a transparent listener can use TPROXY"));
        }
        Ok(ListenerConfig { mode: raw.mode, listen, upstream_port: raw.upstream_port, tproxy: raw.tproxy })
    }

    fn rule(&self, i: usize, raw: raw::Rule) -> Result<RuleConfig, ConfigError> {
        let field = |f: &str| format!("policy.rule[{i}].{f}");
        if let Some(glob) = &raw.host {
            globset::Glob::new(glob).map_err(|e| self.invalid(field("host"), e.to_string()))?;
        }
        if let Some(prefix) = &raw.path_prefix
            && !prefix.starts_with('/')
        {
            return Err(self.invalid(field("path_prefix"), format!("{prefix:?} must start with /")));
        }
        let methods = raw.methods.iter().map(|m| m.to_ascii_uppercase()).collect::<Vec<_>>();
        if let Some(bad) = methods.iter().find(|m| http::Method::from_bytes(m.as_bytes()).is_err()) {
            return Err(self.invalid(field("methods"), format!("{bad:?} is not an HTTP method")));
        }
        Ok(RuleConfig {
            name: raw.name.unwrap_or_else(|| format!("rule {i}")),
            host: raw.host,
            path_prefix: raw.path_prefix,
            methods,
            action: raw.action,
        })
    }

    fn inbound(&self, i: usize, raw: raw::Inbound) -> Result<InboundConfig, ConfigError> {
        let field = |f: &str| format!("inbound[{i}].{f}");
        if raw.host.is_empty() || raw.host.contains(['/', ':', ' ']) {
            return Err(self.invalid(field("host"), format!("{:?} is not a host name", raw.host)));
        }
        let uri: http::Uri =
            raw.upstream.parse().map_err(|e| self.invalid(field("upstream"), format!("{:?}: {e}", raw.upstream)))?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => {
                return Err(
                    self.invalid(field("upstream"), format!("{:?} must start with https:// or http://", raw.upstream))
                );
            }
        };
        let host = uri.host().filter(|h| !h.is_empty()).ok_or_else(|| self.invalid(field("upstream"), "no host"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        if uri.path() != "/" && !uri.path().is_empty() {
            return Err(self.invalid(field("upstream"), "give only scheme://host[:port]; paths are not rewritten"));
        }
        Ok(InboundConfig {
            host: raw.host.to_ascii_lowercase(),
            origin: OriginConfig { tls, host, port, ca_bundle: raw.ca_bundle.map(|p| self.resolve_path(&p)) },
        })
    }

    fn resolve_entry(&self, key: String, value: String) -> Result<((String, u16), SocketAddr), ConfigError> {
        let field = format!("resolve.{key:?}");
        let (host, port) = key
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
            .filter(|(h, _)| !h.is_empty())
            .ok_or_else(|| self.invalid(&field, "key must be HOST:PORT"))?;
        if host.contains('*') && !(host.starts_with("*.") && !host[2..].contains('*') && host.len() > 2) {
            return Err(self.invalid(&field, "a wildcard host must look like *.example.com"));
        }
        let addr = value.parse().map_err(|e| self.invalid(&field, format!("{value:?} is not IP:PORT: {e}")))?;
        Ok(((host.to_ascii_lowercase(), port), addr))
    }

    fn resolve_path(&self, p: &Path) -> PathBuf {
        if p.is_absolute() { p.to_path_buf() } else { self.base.join(p) }
    }

    fn invalid(&self, field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
        ConfigError::Invalid { path: self.path.to_path_buf(), field: field.into(), reason: reason.into() }
    }
}

/// The file format, exactly as written by operators.
mod raw {
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    use serde::Deserialize;

    use super::{ListenerMode, UntrustedAction};

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct Config {
        pub state_dir: PathBuf,
        #[serde(default)]
        pub hsm: Hsm,
        #[serde(default)]
        pub listener: Vec<Listener>,
        #[serde(default)]
        pub upstream: Upstream,
        #[serde(default)]
        pub resolve: BTreeMap<String, String>,
        #[serde(default)]
        pub policy: Policy,
        #[serde(default)]
        pub inbound: Vec<Inbound>,
        #[serde(default)]
        pub management: Management,
        #[serde(default)]
        pub limits: Limits,
        #[serde(default)]
        pub mint: Mint,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct Hsm {
        #[serde(default)]
        pub server: Vec<HsmServer>,
        #[serde(default)]
        pub ha: HsmHa,
        #[serde(default = "default_hsm_workers")]
        pub workers: usize,
        #[serde(default = "default_queue_depth")]
        pub queue_depth: usize,
        #[serde(default = "default_call_timeout_ms")]
        pub call_timeout_ms: u64,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct HsmHa {
        pub enabled: Option<bool>,
        #[serde(default = "default_group")]
        pub group: String,
        #[serde(default)]
        pub auto_recovery_retry: u32,
        #[serde(default = "default_recovery_interval")]
        pub auto_recovery_interval_secs: u64,
    }

    impl Default for Hsm {
        fn default() -> Self {
            Self {
                server: Vec::new(),
                ha: HsmHa::default(),
                workers: default_hsm_workers(),
                queue_depth: default_queue_depth(),
                call_timeout_ms: default_call_timeout_ms(),
            }
        }
    }

    impl Default for HsmHa {
        fn default() -> Self {
            Self {
                enabled: None,
                group: default_group(),
                auto_recovery_retry: 0,
                auto_recovery_interval_secs: default_recovery_interval(),
            }
        }
    }

    fn default_hsm_workers() -> usize {
        2
    }
    fn default_queue_depth() -> usize {
        1024
    }
    fn default_call_timeout_ms() -> u64 {
        2000
    }
    fn default_group() -> String {
        "default".into()
    }
    fn default_recovery_interval() -> u64 {
        60
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct HsmServer {
        pub name: String,
        #[serde(default = "default_module")]
        pub module: PathBuf,
        pub token: String,
        pub pin_file: Option<PathBuf>,
        pub pin_env: Option<String>,
        pub address: Option<String>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct Listener {
        pub mode: ListenerMode,
        pub listen: String,
        #[serde(default = "default_upstream_port")]
        pub upstream_port: u16,
        #[serde(default)]
        pub tproxy: bool,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct Upstream {
        #[serde(default)]
        pub ca_bundles: Vec<PathBuf>,
        #[serde(default = "default_untrusted")]
        pub untrusted: UntrustedAction,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct Policy {
        #[serde(default)]
        pub no_decrypt: Vec<String>,
        #[serde(default)]
        pub rule: Vec<Rule>,
        #[serde(default = "default_learn_bypass")]
        pub learn_bypass_secs: u64,
        pub deny_destinations: Option<Vec<String>>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct Rule {
        pub name: Option<String>,
        pub host: Option<String>,
        pub path_prefix: Option<String>,
        #[serde(default)]
        pub methods: Vec<String>,
        pub action: super::RuleAction,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct Inbound {
        pub host: String,
        pub upstream: String,
        pub ca_bundle: Option<PathBuf>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct Management {
        #[serde(default = "default_management")]
        pub listen: std::net::SocketAddr,
        pub token_file: Option<PathBuf>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct Limits {
        #[serde(default = "default_max_connections")]
        pub max_connections: usize,
        #[serde(default = "default_timeout")]
        pub handshake_timeout_secs: u64,
        #[serde(default = "default_timeout")]
        pub connect_timeout_secs: u64,
        #[serde(default = "default_mint_timeout")]
        pub mint_timeout_secs: u64,
        #[serde(default = "default_upstream_pool_max")]
        pub upstream_pool_max: usize,
        #[serde(default = "default_upstream_idle_timeout")]
        pub upstream_idle_timeout_secs: u64,
        #[serde(default = "default_upstream_read_timeout")]
        pub upstream_read_timeout_secs: u64,
        #[serde(default = "default_upstream_read_timeout")]
        pub client_send_timeout_secs: u64,
        #[serde(default)]
        pub io_threads: usize,
        #[serde(default = "default_hsm_handshakes_max")]
        pub hsm_handshakes_max: usize,
        #[serde(default = "default_header_timeout")]
        pub header_timeout_secs: u64,
        #[serde(default = "default_max_header_bytes")]
        pub max_header_bytes: usize,
        #[serde(default = "default_shutdown_grace")]
        pub shutdown_grace_secs: u64,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct Mint {
        #[serde(default = "default_cache_capacity")]
        pub cache_capacity: u64,
    }

    impl Default for Upstream {
        fn default() -> Self {
            Self { ca_bundles: Vec::new(), untrusted: default_untrusted() }
        }
    }

    impl Default for Management {
        fn default() -> Self {
            Self { listen: default_management(), token_file: None }
        }
    }

    impl Default for Limits {
        fn default() -> Self {
            Self {
                max_connections: default_max_connections(),
                handshake_timeout_secs: default_timeout(),
                connect_timeout_secs: default_timeout(),
                mint_timeout_secs: default_mint_timeout(),
                upstream_pool_max: default_upstream_pool_max(),
                upstream_idle_timeout_secs: default_upstream_idle_timeout(),
                upstream_read_timeout_secs: default_upstream_read_timeout(),
                client_send_timeout_secs: default_upstream_read_timeout(),
                io_threads: 0,
                hsm_handshakes_max: default_hsm_handshakes_max(),
                header_timeout_secs: default_header_timeout(),
                max_header_bytes: default_max_header_bytes(),
                shutdown_grace_secs: default_shutdown_grace(),
            }
        }
    }

    impl Default for Mint {
        fn default() -> Self {
            Self { cache_capacity: default_cache_capacity() }
        }
    }

    fn default_module() -> PathBuf {
        PathBuf::from(super::DEFAULT_MODULE)
    }
    fn default_upstream_port() -> u16 {
        443
    }
    fn default_untrusted() -> UntrustedAction {
        UntrustedAction::ForwardUntrust
    }
    fn default_management() -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], 9090))
    }
    fn default_max_connections() -> usize {
        10_000
    }
    fn default_timeout() -> u64 {
        10
    }
    fn default_mint_timeout() -> u64 {
        5
    }
    fn default_upstream_pool_max() -> usize {
        1024
    }
    fn default_upstream_idle_timeout() -> u64 {
        30
    }
    fn default_upstream_read_timeout() -> u64 {
        60
    }
    impl Default for Policy {
        fn default() -> Self {
            Self {
                no_decrypt: Vec::new(),
                rule: Vec::new(),
                learn_bypass_secs: default_learn_bypass(),
                deny_destinations: None,
            }
        }
    }

    fn default_learn_bypass() -> u64 {
        12 * 3600
    }
    fn default_header_timeout() -> u64 {
        30
    }
    fn default_max_header_bytes() -> usize {
        64 * 1024
    }
    fn default_shutdown_grace() -> u64 {
        30
    }
    fn default_hsm_handshakes_max() -> usize {
        256
    }
    fn default_cache_capacity() -> u64 {
        10_000
    }
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
        assert_eq!(config.hsm.servers[0].pin, Some(SecretSource::File("/run/secrets/hsm-a.pin".into())));
        assert_eq!(config.resolve[&("origin.test".to_string(), 443)], "127.0.0.1:9443".parse().unwrap());
        assert_eq!(config.upstream.untrusted, UntrustedAction::ForwardUntrust);
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
        assert!(config.resolve.contains_key(&("*.mint.test".to_string(), 443)));
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
        assert!(err.contains("policy.deny_destinations[0]") && err.contains("CIDR"), "{err}");
    }

    #[test]
    fn secret_debug_shows_location_only() {
        let source = SecretSource::Env("HSM_PIN".into());
        assert_eq!(format!("{source:?}"), "env HSM_PIN");
    }
}
