//! Composition root of `tollgate run`: config → HSM → CAs → proxy → listeners, then wait for a
//! signal. The order matters: everything that can fail on bad input fails before any socket
//! is bound.

use std::sync::Arc;

use tokio::net::TcpListener;

use crate::config::{Config, ConfigError, ListenerMode};
use crate::hsm::Hsm;
use crate::manage::api::{self, ApiState};
use crate::pki::{CaRole, CertStore, PkiError};
use crate::proxy::{self, Cas, Proxy};
use crate::state::{StateDir, StateError};

/// Errors that stop `tollgate run`.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("listener {mode} on {addr}: mode not supported by this build")]
    Unsupported { mode: &'static str, addr: std::net::SocketAddr },
    #[error("binding {what} on {addr}: {source}")]
    Bind {
        what: String,
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("installing signal handlers: {0}")]
    Signal(#[source] std::io::Error),
}

impl AppError {
    /// Whether the operator's input was at fault (exit code 64).
    pub fn is_usage(&self) -> bool {
        matches!(self, Self::Config(_) | Self::Unsupported { .. })
    }
}

/// Checks what `run` would check before binding sockets, without touching the HSM.
pub fn check(config: &Config) -> Result<(), AppError> {
    for l in &config.listeners {
        if l.mode == ListenerMode::Transparent {
            return Err(AppError::Unsupported { mode: l.mode.as_str(), addr: l.listen });
        }
    }
    if config.listener(ListenerMode::Inbound).is_some() && config.inbound.is_empty() {
        return Err(AppError::Config(ConfigError::Invalid {
            path: config.path.clone(),
            field: "inbound".into(),
            reason: "an inbound listener needs at least one [[inbound]] host".into(),
        }));
    }
    Proxy::new(config, Cas::default(), Default::default())?;
    Ok(())
}

/// Runs the proxy until SIGTERM or SIGINT.
pub async fn run(config: Config) -> Result<(), AppError> {
    check(&config)?;
    let state = StateDir::open(&config.state_dir)?;
    let store = CertStore::load(&state)?;
    let hsm = Arc::new(Hsm::open(&config.hsm));
    hsm.start_recovery();
    let cas = Cas {
        trust: load_ca(&store, CaRole::ForwardTrust, &hsm),
        untrust: load_ca(&store, CaRole::ForwardUntrust, &hsm),
    };
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let inbound = crate::proxy::inbound::InboundSites::new(&config, &store, &hsm, &provider)?;
    let mut proxy = Proxy::new(&config, cas, inbound)?;

    let mut bound = Vec::new();
    for l in &config.listeners {
        let listener = TcpListener::bind(l.listen).await.map_err(|source| AppError::Bind {
            what: format!("{} listener", l.mode.as_str()),
            addr: l.listen,
            source,
        })?;
        let local = listener.local_addr().map_err(|source| AppError::Bind {
            what: "listener".into(),
            addr: l.listen,
            source,
        })?;
        proxy.add_own(local);
        bound.push((listener, l.clone(), local));
    }
    let management = TcpListener::bind(config.management.listen).await.map_err(|source| AppError::Bind {
        what: "management listener".into(),
        addr: config.management.listen,
        source,
    })?;
    let management_addr = management.local_addr().unwrap_or(config.management.listen);
    proxy.add_own(management_addr);

    let proxy = Arc::new(proxy);
    for (listener, l, local) in bound {
        tracing::info!(mode = l.mode.as_str(), addr = %local, "listening");
        tokio::spawn(proxy::serve_listener(proxy.clone(), listener, l));
    }
    tracing::info!(mode = "management", addr = %management_addr, "listening");
    tokio::spawn(api::serve(management, Arc::new(ApiState { hsm, state_dir: config.state_dir.clone() })));

    wait_for_signal().await?;
    tracing::info!("shutting down");
    Ok(())
}

fn load_ca(store: &CertStore, role: CaRole, hsm: &Arc<Hsm>) -> Option<Arc<crate::pki::mint::Ca>> {
    let what = match role {
        CaRole::ForwardTrust => "forward-trust",
        CaRole::ForwardUntrust => "forward-untrust",
    };
    match store.ca(role, hsm) {
        Ok(Some(ca)) => {
            tracing::info!(role = what, name = %ca.name, "CA loaded");
            Some(Arc::new(ca))
        }
        Ok(None) => {
            tracing::warn!(role = what, "no CA configured: connections needing it are refused");
            None
        }
        Err(e) => {
            tracing::error!(role = what, error = %e, "CA unusable: connections needing it are refused");
            None
        }
    }
}

async fn wait_for_signal() -> Result<(), AppError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(AppError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(AppError::Signal)?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
