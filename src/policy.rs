//! The rules: what to do with a TLS connection once its ClientHello is read, and with a
//! decrypted request.

use crate::config::{Config, HostGlobs, RuleAction, RuleConfig, UntrustedAction};

/// What to do with a TLS connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsAction {
    /// Terminate, mint, inspect.
    Intercept,
    /// Pass the bytes through untouched.
    Tunnel,
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
    no_decrypt: HostGlobs,
    rules: Vec<RuleConfig>,
    /// What to do with upstreams whose certificate does not validate.
    pub untrusted: UntrustedAction,
}

impl Policy {
    /// The rules of `config`.
    pub fn new(config: &Config) -> Self {
        Self {
            no_decrypt: config.policy.no_decrypt.clone(),
            rules: config.policy.rules.clone(),
            untrusted: config.upstream.untrusted,
        }
    }

    /// Decides on a request: the first matching rule, allow when none matches.
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

    /// Decides on a connection to `host` (lower-case).
    pub fn decide_tls(&self, host: &str) -> TlsAction {
        if self.no_decrypt.is_match(host) { TlsAction::Tunnel } else { TlsAction::Intercept }
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
        let policy = Policy::new(&config);
        assert_eq!(policy.decide_tls("www.bank.test"), TlsAction::Tunnel);
        assert_eq!(policy.decide_tls("pinned.test"), TlsAction::Tunnel);
        assert_eq!(policy.decide_tls("bank.test"), TlsAction::Intercept);
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
        let policy = Policy::new(&config);
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
