//! Compiled rules: what to do with a TLS connection once its ClientHello is read.

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

use crate::config::{Config, ConfigError, UntrustedAction};

/// What to do with a TLS connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsAction {
    /// Terminate, mint, inspect.
    Intercept,
    /// Pass the bytes through untouched.
    Tunnel,
}

/// The rules of the running configuration.
#[derive(Debug)]
pub struct Policy {
    no_decrypt: GlobSet,
    /// What to do with upstreams whose certificate does not validate.
    pub untrusted: UntrustedAction,
}

impl Policy {
    /// Compiles the rules.
    pub fn new(config: &Config) -> Result<Self, ConfigError> {
        let mut builder = GlobSetBuilder::new();
        for (i, glob) in config.policy.no_decrypt.iter().enumerate() {
            let glob = GlobBuilder::new(&glob.to_ascii_lowercase()).literal_separator(true).build().map_err(|e| {
                ConfigError::Invalid {
                    path: config.path.clone(),
                    field: format!("policy.no_decrypt[{i}]"),
                    reason: e.to_string(),
                }
            })?;
            builder.add(glob);
        }
        let no_decrypt = builder.build().map_err(|e| ConfigError::Invalid {
            path: config.path.clone(),
            field: "policy.no_decrypt".into(),
            reason: e.to_string(),
        })?;
        Ok(Self { no_decrypt, untrusted: config.upstream.untrusted })
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
        let policy = Policy::new(&config).unwrap();
        assert_eq!(policy.decide_tls("www.bank.test"), TlsAction::Tunnel);
        assert_eq!(policy.decide_tls("pinned.test"), TlsAction::Tunnel);
        assert_eq!(policy.decide_tls("bank.test"), TlsAction::Intercept);
    }
}
