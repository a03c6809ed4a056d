//! The policy: who and what is decrypted, tunnelled or blocked (decryption rules, host lists,
//! `[policy] no_decrypt`), what a decrypted request may do (inspection rules), and who may use
//! the proxy at all (`auth`). It reads the configuration, never the data plane.
//!
//! The order of a TLS decision, first match wins: the `[[decryption.rule]]`s in their order;
//! then `[policy] no_decrypt`; then no match, which decrypts. The learned bypass (the data
//! plane's) applies to what would be decrypted, unless the rule that matched turned learning
//! off for its hosts.

pub mod auth;
pub mod lists;
pub mod trust;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use crate::config::{Config, DecryptAction, HostGlobs, ListSource, RuleAction, RuleConfig};
use auth::{Users, UsersError};
use lists::{HostList, ListError, Lists};

/// Why a policy could not be compiled: a host list or the users file.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error(transparent)]
    List(#[from] ListError),
    #[error(transparent)]
    Users(#[from] UsersError),
}

/// What policies are compiled from besides the configuration, kept across reloads: the host
/// lists and the users file, which reload themselves (`refresh`).
pub struct Sources {
    lists: Arc<Lists>,
    users: parking_lot::Mutex<Option<Arc<Users>>>,
}

impl Sources {
    /// Nothing loaded yet.
    pub fn new() -> Arc<Self> {
        Arc::new(Self { lists: Lists::new(), users: parking_lot::Mutex::new(None) })
    }

    /// The policy of `config`: its host lists (files read when new; one held already keeps
    /// its current version) and its users file (read when new or moved).
    pub fn policy(&self, config: &Config) -> Result<Policy, PolicyError> {
        let lists = self.lists.load(config)?;
        let users = match &config.auth.users_file {
            None => None,
            Some(file) => {
                let mut held = self.users.lock();
                match held.as_ref().filter(|u| u.file() == file.as_path()) {
                    Some(users) => Some(users.clone()),
                    None => {
                        let users = Users::load(file)?;
                        *held = Some(users.clone());
                        Some(users)
                    }
                }
            }
        };
        Ok(Policy::new(config, &lists, users)?)
    }

    /// Sets the parent proxy URL host lists are fetched through (`None`: direct).
    pub fn set_egress(&self, egress: Option<(crate::net::Via, crate::config::Destinations)>) {
        self.lists.set_egress(egress);
    }

    /// Keeps the host lists and the users file current until the task is dropped; a source
    /// that fails to reload keeps its last good version, loudly.
    pub async fn refresh(self: Arc<Self>, poll: std::time::Duration, refresh: std::time::Duration) {
        let users = self.clone();
        let watch_users = async move {
            loop {
                tokio::time::sleep(poll).await;
                let held = users.users.lock().clone();
                if let Some(Err(e)) = held.map(|u| u.reload(false)) {
                    tracing::error!(error = %e, "users file not reloaded; the previous users stay");
                }
            }
        };
        tokio::join!(self.lists.clone().refresh(poll, refresh), watch_users);
    }
}

/// What to do with a TLS connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsAction {
    /// Terminate, mint, inspect.
    Intercept,
    /// Pass the bytes through untouched.
    Tunnel,
    /// Refuse with a TLS alert.
    Block,
}

/// A TLS decision and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsDecision {
    pub action: TlsAction,
    /// The rule that matched (`policy.no_decrypt` for those globs); `None` when none did.
    pub rule: Option<Arc<str>>,
    /// Whether clients rejecting our certificate may teach the learned bypass for this host.
    pub learn: bool,
    /// Whether the decrypted traffic goes to the content scanner (`icap` of the rule).
    pub scan: bool,
}

/// Who a connection is, as the rules see it.
#[derive(Clone, Copy, Debug)]
pub struct Who<'a> {
    /// The client's address (the PROXY protocol's, behind a load balancer).
    pub client: IpAddr,
    /// The authenticated user, on a listener with proxy authentication.
    pub user: Option<&'a str>,
    /// The listener's name.
    pub listener: &'a str,
}

/// What to do with an HTTP request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HttpAction {
    Allow,
    /// Blocked by the named rule.
    Block(String),
}

/// The rules of the running configuration, compiled when the configuration was read.
#[derive(Debug)]
pub struct Policy {
    /// Proxy authentication, when a listener asks for it.
    pub users: Option<Arc<Users>>,
    decryption: Vec<Rule>,
    no_decrypt: HostGlobs,
    rules: Vec<RuleConfig>,
    /// What each kind of upstream certificate failure gets.
    pub on_error: trust::OnError,
    /// What upstreams that cannot be intercepted get.
    pub unsupported: crate::config::UnsupportedAction,
}

/// A decryption rule, its host lists resolved.
#[derive(Debug)]
struct Rule {
    name: Arc<str>,
    sources: Vec<ipnet::IpNet>,
    users: Vec<String>,
    listeners: Vec<String>,
    hosts: HostGlobs,
    lists: Vec<Arc<HostList>>,
    action: DecryptAction,
    learn: bool,
    scan: bool,
}

/// The name decisions by `[policy] no_decrypt` carry.
const NO_DECRYPT: &str = "policy.no_decrypt";

impl Policy {
    /// The rules of `config`, with the host lists loaded for it (`Sources::policy`).
    pub fn new(
        config: &Config,
        lists: &HashMap<ListSource, Arc<HostList>>,
        users: Option<Arc<Users>>,
    ) -> Result<Self, ListError> {
        let decryption = config
            .decryption
            .rules
            .iter()
            .map(|r| {
                let lists = r
                    .host_lists
                    .iter()
                    .map(|source| {
                        lists
                            .get(source)
                            .cloned()
                            .ok_or_else(|| ListError::Read { list: source.to_string(), reason: "not loaded".into() })
                    })
                    .collect::<Result<_, _>>()?;
                Ok(Rule {
                    name: r.name.as_str().into(),
                    sources: r.sources.clone(),
                    users: r.users.clone(),
                    listeners: r.listeners.clone(),
                    hosts: r.hosts.clone(),
                    lists,
                    action: r.action,
                    learn: r.learn_bypass,
                    scan: r.icap,
                })
            })
            .collect::<Result<_, ListError>>()?;
        Ok(Self {
            users,
            decryption,
            no_decrypt: config.policy.no_decrypt.clone(),
            rules: config.policy.rules.clone(),
            on_error: trust::OnError::new(&config.upstream),
            unsupported: config.upstream.unsupported,
        })
    }

    /// Decides on a TLS connection from `who` to `host` (lower-case).
    pub fn decide_tls(&self, who: &Who<'_>, host: &str) -> TlsDecision {
        if let Some(rule) = self.decryption.iter().find(|r| r.matches(who, host)) {
            let action = match rule.action {
                DecryptAction::Decrypt => TlsAction::Intercept,
                DecryptAction::NoDecrypt => TlsAction::Tunnel,
                DecryptAction::Block => TlsAction::Block,
            };
            return TlsDecision { action, rule: Some(rule.name.clone()), learn: rule.learn, scan: rule.scan };
        }
        if self.no_decrypt.is_match(host) {
            return TlsDecision { action: TlsAction::Tunnel, rule: Some(NO_DECRYPT.into()), learn: true, scan: true };
        }
        TlsDecision { action: TlsAction::Intercept, rule: None, learn: true, scan: true }
    }

    /// The decryption rule that blocks plain HTTP from `who` to `host`, if one matches first
    /// and blocks (`no-decrypt` means nothing for plain HTTP: it is relayed).
    pub fn blocks_plain(&self, who: &Who<'_>, host: &str) -> Option<Arc<str>> {
        let rule = self.decryption.iter().find(|r| r.matches(who, host))?;
        (rule.action == DecryptAction::Block).then(|| rule.name.clone())
    }

    /// Whether plain HTTP from `who` to `host` goes to the content scanner: the first matching
    /// decryption rule's `icap`, yes when none matches.
    pub fn scans_plain(&self, who: &Who<'_>, host: &str) -> bool {
        self.decryption.iter().find(|r| r.matches(who, host)).is_none_or(|rule| rule.scan)
    }

    /// Decides on a request: the first matching inspection rule, allow when none matches.
    pub fn decide_http(&self, host: &str, method: &http::Method, path: &str) -> HttpAction {
        let hit = self.rules.iter().find(|r| {
            r.host.as_ref().is_none_or(|g| g.is_match(host))
                && r.path_prefix.as_ref().is_none_or(|p| path.starts_with(p.as_str()))
                && (r.methods.is_empty() || r.methods.contains(method))
        });
        match hit {
            Some(rule) if rule.action == RuleAction::Block => HttpAction::Block(rule.name.clone()),
            _ => HttpAction::Allow,
        }
    }
}

impl Rule {
    /// Every criterion given matches (an empty one matches anything; hosts and host lists are
    /// one criterion: either matches).
    fn matches(&self, who: &Who<'_>, host: &str) -> bool {
        let source = self.sources.is_empty() || self.sources.iter().any(|net| net.contains(&who.client.to_canonical()));
        let user = self.users.is_empty() || who.user.is_some_and(|u| self.users.iter().any(|name| name == u));
        let listener = self.listeners.is_empty() || self.listeners.iter().any(|l| l == who.listener);
        let any_host = self.hosts.globs().is_empty() && self.lists.is_empty();
        source
            && user
            && listener
            && (any_host || self.hosts.is_match(host) || self.lists.iter().any(|list| list.contains(host)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn globs_match_hosts_case_insensitively() {
        let config = Config::from_toml(
            "state_dir = \"s\"\n[policy]\nno_decrypt = [\"*.Bank.test\", \"pinned.test\"]\n",
            Path::new("t.toml"),
        )
        .unwrap();
        let policy = Policy::new(&config, &Default::default(), None).unwrap();
        let who = Who { client: "10.0.0.1".parse().unwrap(), user: None, listener: "sni" };
        assert_eq!(policy.decide_tls(&who, "www.bank.test").action, TlsAction::Tunnel);
        assert_eq!(policy.decide_tls(&who, "pinned.test").rule.as_deref(), Some("policy.no_decrypt"));
        assert_eq!(policy.decide_tls(&who, "bank.test").action, TlsAction::Intercept);
    }

    #[test]
    fn decryption_rules_first_match_wins_before_the_no_decrypt_globs() {
        let config = Config::from_toml(
            r#"
            state_dir = "s"
            [[listener]]
            mode = "explicit"
            listen = "127.0.0.1:0"
            name = "staff"
            [policy]
            no_decrypt = ["*.bank.test"]
            [[decryption.rule]]
            name = "lab"
            sources = ["10.9.0.0/16"]
            action = "decrypt"
            learn_bypass = false
            [[decryption.rule]]
            name = "carol"
            users = ["carol"]
            listeners = ["staff"]
            hosts = ["*.test"]
            action = "block"
            "#,
            Path::new("t.toml"),
        )
        .unwrap();
        let policy = Policy::new(&config, &Default::default(), None).unwrap();
        let who =
            |client: &str, user: Option<&'static str>| Who { client: client.parse().unwrap(), user, listener: "staff" };
        let lab = policy.decide_tls(&who("10.9.3.4", Some("carol")), "www.bank.test");
        assert_eq!((lab.action, lab.rule.as_deref(), lab.learn), (TlsAction::Intercept, Some("lab"), false));
        let mapped = policy.decide_tls(&who("::ffff:10.9.3.4", None), "x.test");
        assert_eq!(mapped.rule.as_deref(), Some("lab"), "an IPv4-mapped address is its IPv4 one");
        let carol = policy.decide_tls(&who("10.1.0.1", Some("carol")), "www.bank.test");
        assert_eq!((carol.action, carol.rule.as_deref()), (TlsAction::Block, Some("carol")));
        assert_eq!(policy.blocks_plain(&who("10.1.0.1", Some("carol")), "a.test").as_deref(), Some("carol"));
        let others = policy.decide_tls(&who("10.1.0.1", Some("dave")), "www.bank.test");
        assert_eq!((others.action, others.rule.as_deref()), (TlsAction::Tunnel, Some("policy.no_decrypt")));
        let none = policy.decide_tls(&who("10.1.0.1", None), "www.other.test");
        assert_eq!((none.action, none.rule, none.learn), (TlsAction::Intercept, None, true));
    }

    #[test]
    fn http_rules_first_match_wins() {
        let config = Config::from_toml(
            r#"
            state_dir = "s"
            [[policy.rule]]
            name = "admins may"
            host = "intranet.test"
            path_prefix = "/admin"
            action = "allow"
            [[policy.rule]]
            name = "no admin"
            path_prefix = "/admin"
            action = "block"
            [[policy.rule]]
            name = "no uploads"
            host = "*.test"
            methods = ["post", "PUT"]
            action = "block"
            "#,
            Path::new("t.toml"),
        )
        .unwrap();
        let policy = Policy::new(&config, &Default::default(), None).unwrap();
        let get = http::Method::GET;
        assert_eq!(policy.decide_http("intranet.test", &get, "/admin/x"), HttpAction::Allow);
        assert_eq!(policy.decide_http("www.test", &get, "/admin/x"), HttpAction::Block("no admin".into()));
        assert_eq!(policy.decide_http("www.test", &http::Method::POST, "/x"), HttpAction::Block("no uploads".into()));
        assert_eq!(policy.decide_http("www.test", &get, "/x"), HttpAction::Allow);
        assert_eq!(policy.decide_http("www.other", &http::Method::POST, "/x"), HttpAction::Allow);
        let err = Config::from_toml(
            "state_dir = \"s\"\n[[policy.rule]]\nmethods = [\"GE T\"]\naction = \"block\"\n",
            Path::new("t.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("policy.rule[0].methods"), "{err}");
    }
}
