//! Composition root of `tollgate run`: config → HSM → CAs → proxy → listeners, then wait for a
//! signal. The order matters: everything that can fail on bad input fails before any socket
//! is bound.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

use crate::config::{Config, ConfigError, ListenerMode};
use crate::hsm::Hsm;
use crate::manage::api::{self, ApiState};
use crate::pki::{CaRole, CertStore, Keyring, PkiError};
use crate::policy::{Policy, PolicyError, Sources};
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
    #[error("binding {what} on {addr}: {source}")]
    Bind {
        what: String,
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("installing signal handlers: {0}")]
    Signal(#[source] std::io::Error),
    #[error("starting the data-plane threads: {0}")]
    Threads(#[source] std::io::Error),
    #[error("opening the HSM: {0}")]
    Task(#[source] tokio::task::JoinError),
}

impl AppError {
    /// Whether the operator's input was at fault (exit code 64).
    pub fn is_usage(&self) -> bool {
        matches!(self, Self::Config(_))
    }
}

/// Checks what `run` would check before binding sockets, without touching the HSM.
pub fn check(config: &Config) -> Result<(), ConfigError> {
    check_with(config, &Sources::new())
}

/// [`check`], its host lists and users file read through (and kept in) `sources`.
fn check_with(config: &Config, sources: &Sources) -> Result<(), ConfigError> {
    Proxy::new(config, Cas::default(), Default::default(), policy(config, sources)?)?;
    check_client_certs(config)?;
    check_log(config)
}

/// Whether every `[[upstream.client_cert]]` names a certificate in the store (read as it is:
/// the check creates nothing).
fn check_client_certs(config: &Config) -> Result<(), ConfigError> {
    if config.upstream.client_cert.is_empty() {
        return Ok(());
    }
    let store = CertStore::load(&StateDir::existing(&config.state_dir)).map_err(|e| ConfigError::Invalid {
        path: config.path.clone(),
        field: "state_dir".into(),
        reason: e.to_string(),
    })?;
    crate::proxy::upstream::ClientCerts::check(config, &store)
}

/// Whether `[log] file` can be written.
fn check_log(config: &Config) -> Result<(), ConfigError> {
    crate::logs::check(&config.log).map_err(|e| ConfigError::Invalid {
        path: config.path.clone(),
        field: "log.file".into(),
        reason: e.to_string(),
    })
}

/// The policy of `config`, its host lists and users file read through `sources`; what the
/// configuration alone cannot say is checked here.
fn policy(config: &Config, sources: &Sources) -> Result<Policy, ConfigError> {
    if config.listener(ListenerMode::Inbound).is_some() && config.inbound.is_empty() {
        return Err(ConfigError::Invalid {
            path: config.path.clone(),
            field: "inbound".into(),
            reason: "an inbound listener needs at least one [[inbound]] host".into(),
        });
    }
    sources.policy(config).map_err(|e| {
        let field = match e {
            PolicyError::List(_) => "decryption.rule.host_lists",
            PolicyError::Users(_) => "auth.users_file",
        };
        ConfigError::Invalid { path: config.path.clone(), field: field.into(), reason: e.to_string() }
    })
}

/// Runs the proxy until SIGTERM or SIGINT (then drains); SIGHUP reloads the configuration.
///
/// The management API comes up first, so `/readyz` answers (503) while the HSM is opened and
/// the listeners bound; it answers 200 once all of them are, and 503 again while draining.
pub async fn run(config: Config) -> Result<(), AppError> {
    let sources = Sources::new();
    check_with(&config, &sources)?;
    if let Some(source) = &config.management_token() {
        // A configured token that cannot be read is bad input (secrets are not read by --check,
        // which runs where they may not exist).
        crate::vault::load(source, "management API token").map_err(|e| ConfigError::Invalid {
            path: config.path.clone(),
            field: "management.token_file".into(),
            reason: e.to_string(),
        })?;
    }
    let config = Arc::new(config);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let management = TcpListener::bind(config.management.listen).await.map_err(|source| AppError::Bind {
        what: "management listener".into(),
        addr: config.management.listen,
        source,
    })?;
    let management_addr = management.local_addr().unwrap_or(config.management.listen);
    let bypass = Arc::new(crate::proxy::bypass::Bypass::from_config(&config));
    let api = Arc::new(ApiState::new(config.clone(), bypass.clone()));
    // Published before the management API serves, so the first scrape already sees it.
    watch_master_key_expiry(&config.state_dir);
    tokio::spawn(api::serve(management, api.clone()));
    tracing::info!(mode = "management", addr = %management_addr, "listening");

    // Logging in to a network HSM can take a while: the API keeps answering meanwhile.
    let hsm = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || Arc::new(Hsm::open(&config.hsm))).await.map_err(AppError::Task)?
    };
    hsm.start_recovery();
    api.set_hsm(hsm.clone());

    let (busy_poll, quota) = crate::busy_poll::max_window(config.limits.busy_poll_us);
    match quota {
        Some(quota) => {
            tracing::info!(%quota, "busy-polling is off under a CPU quota ([limits] busy_poll_us turns it on)")
        }
        None if busy_poll.is_zero() => tracing::info!("busy-polling is off ([limits] busy_poll_us = 0)"),
        None => tracing::info!(up_to_us = busy_poll.as_micros() as u64, "busy-polling with an adaptive window"),
    }
    let io = IoThreads::start(config.limits.io_threads, busy_poll)?;
    let mut listeners = Listeners::default();
    let mut proxy = build_proxy(&config, &hsm, &sources, &shutdown_rx)?;
    let (poll, refresh) = (config.decryption.list_poll_secs, config.decryption.list_refresh_secs);
    tokio::spawn(sources.clone().refresh(Duration::from_secs(poll.max(1)), Duration::from_secs(refresh.max(1))));
    proxy.set_bypass(bypass.clone());
    let bound = listeners.bind(&config, io.handles.len()).map_err(|(_, e)| e)?;
    listeners.own_addresses(&mut proxy, &bound, management_addr);
    api.readiness.set_forward_trust_ca(proxy.forward_ca_ready());
    let (proxies, _) = watch::channel(Arc::new(proxy));
    let state_dir = config.state_dir.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(24 * 3600)).await;
            watch_master_key_expiry(&state_dir);
        }
    });
    listeners.start(bound, &proxies, &io);
    api.readiness.set_listeners_bound(true);
    let mut current = config;
    let mut term = signal(SignalKind::terminate()).map_err(AppError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(AppError::Signal)?;
    let mut hup = signal(SignalKind::hangup()).map_err(AppError::Signal)?;
    let mut usr1 = signal(SignalKind::user_defined1()).map_err(AppError::Signal)?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = usr1.recv() => crate::logs::reopen(),
            _ = hup.recv() => match reload(&current, &hsm, &sources, &shutdown_rx) {
                Ok((next, proxy)) => {
                    crate::logs::configure(&next.log);
                    if next.hsm.servers.iter().map(|s| &s.name).ne(current.hsm.servers.iter().map(|s| &s.name)) {
                        tracing::warn!("[hsm] servers changed: they take effect at the next restart");
                    }
                    let threads = |c: &Config| (c.limits.io_threads, c.limits.busy_poll_us);
                    if threads(&next) != threads(&current) {
                        tracing::warn!("[limits] io_threads and busy_poll_us take effect at the next restart");
                    }
                    // New connections get the new state; established ones keep theirs.
                    let mut proxy = proxy;
                    proxy.set_bypass(bypass.clone());
                    let bound = match listeners.bind(&next, io.handles.len()) {
                        Ok(bound) => {
                            api.readiness.set_listeners_bound(true);
                            bound
                        }
                        Err((bound, e)) => {
                            tracing::error!(error = %e, "reload: a listener could not be bound; the others run");
                            api.readiness.set_listeners_bound(false);
                            bound
                        }
                    };
                    listeners.own_addresses(&mut proxy, &bound, management_addr);
                    api.readiness.set_forward_trust_ca(proxy.forward_ca_ready());
                    let _ = proxies.send(Arc::new(proxy));
                    listeners.start(bound, &proxies, &io);
                    let next = Arc::new(next);
                    api.reload(next.clone());
                    current = next;
                    tracing::info!(config = %current.path.display(), "configuration reloaded");
                }
                Err(e) => {
                    crate::logs::reopen();
                    tracing::error!(error = %e, "reload refused; the running configuration stays");
                }
            },
        }
    }
    api.readiness.set_draining();
    let delay = current.limits.drain_delay_secs;
    if delay > 0 {
        // Load balancers see 503 and stop sending new connections while the listeners still
        // take what is already on its way; a second SIGTERM or SIGINT cuts the wait short.
        tracing::info!(delay_secs = delay, "shutting down: readiness 503, listeners open while load balancers notice");
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(delay)) => {}
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }
    drain(listeners, &shutdown_tx, Duration::from_secs(current.limits.shutdown_grace_secs)).await;
    Ok(())
}

/// Ends the service's runtime: tasks still running are dropped, and blocking work (an API
/// request waiting on the HSM) gets a few seconds to return before the runtime lets it go.
pub fn stop_runtime(runtime: tokio::runtime::Runtime) {
    runtime.shutdown_timeout(Duration::from_secs(5));
}

/// Publishes the master key's remaining lifetime and warns inside its reminder window (at
/// start, then daily). An expired master key keeps working — refusing to start would take the
/// whole proxy down for a date — but is logged as an error every day until it is replaced.
fn watch_master_key_expiry(state_dir: &std::path::Path) {
    use crate::vault::master::{FILE, MasterKeyFile, reminder_due};
    let Ok(bytes) = std::fs::read(state_dir.join(FILE)) else { return };
    let Ok(file) = serde_json::from_slice::<MasterKeyFile>(&bytes) else { return };
    let Some(expires) = file
        .expires_at
        .as_deref()
        .and_then(|e| time::OffsetDateTime::parse(e, &time::format_description::well_known::Rfc3339).ok())
    else {
        return;
    };
    let now = time::OffsetDateTime::now_utc();
    let left = (expires - now).whole_seconds();
    crate::telemetry::METRICS.master_key_expiry_seconds.set(left);
    let expires_at = file.expires_at.as_deref().unwrap_or_default();
    if left <= 0 {
        tracing::error!(expires_at, "the master key has expired: set a new one (tollgate master-key set)");
    } else if reminder_due(expires, file.reminder_days.unwrap_or(0), now) {
        tracing::warn!(
            expires_at,
            days_left = left / 86_400,
            "the master key expires soon: set a new one (tollgate master-key set)"
        );
    }
}

/// The configuration and proxy state a SIGHUP would switch to, fully validated.
fn reload(
    current: &Config,
    hsm: &Arc<Hsm>,
    sources: &Sources,
    shutdown: &watch::Receiver<bool>,
) -> Result<(Config, Proxy), AppError> {
    let next = Config::load(&current.path)?;
    // What --check adds to building the state: the log file.
    check_log(&next)?;
    let proxy = build_proxy(&next, hsm, sources, shutdown)?;
    Ok((next, proxy))
}

fn build_proxy(
    config: &Config,
    hsm: &Arc<Hsm>,
    sources: &Sources,
    shutdown: &watch::Receiver<bool>,
) -> Result<Proxy, AppError> {
    let policy = policy(config, sources)?;
    let state = StateDir::open(&config.state_dir)?;
    let store = CertStore::load(&state)?;
    let keys = Keyring::new(&state, Some(hsm));
    let cas = Cas {
        trust: load_ca(&store, CaRole::ForwardTrust, &keys),
        untrust: load_ca(&store, CaRole::ForwardUntrust, &keys),
    };
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    // Inbound handshakes and upstream client certificates sign with HSM keys too: one budget
    // of `hsm_handshakes_max` waiting signatures for both.
    let waiting = crate::hsm::WaitLimit::new(config.limits.hsm_handshakes_max);
    let inbound = crate::proxy::inbound::InboundSites::new(config, &store, &keys, &provider, &waiting)?;
    let client_certs = crate::proxy::upstream::ClientCerts::new(config, &store, &keys, &waiting)?;
    let mut proxy = Proxy::new(config, cas, inbound, policy)?;
    proxy.client_certs = client_certs;
    proxy.set_shutdown(shutdown.clone());
    sources.set_egress(proxy.parent.as_ref().map(|parent| parent.egress()));
    if let Some(scanner) = proxy.scanner.clone() {
        // What the scanner offers, logged once (or why it cannot be used): the proxy serves
        // either way, and messages follow [icap] on_error while it is away.
        tokio::spawn(async move { scanner.icap.probe().await });
    }
    Ok(proxy)
}

/// Stops accepting, lets in-flight requests finish (connections close after their current
/// request), and gives up after `grace`.
async fn drain(listeners: Listeners, shutdown: &watch::Sender<bool>, grace: Duration) {
    listeners.stop();
    let _ = shutdown.send(true);
    let active = || crate::telemetry::METRICS.connections_active.get();
    tracing::info!(connections = active(), grace_secs = grace.as_secs(), "shutting down: draining");
    let deadline = tokio::time::Instant::now() + grace;
    while active() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    match active() {
        0 => tracing::info!("drained; exiting"),
        left => tracing::warn!(connections = left, "grace period over; cutting the remaining connections"),
    }
}

/// The data-plane threads: one single-threaded runtime each. Every forward listener (explicit,
/// sni, transparent) is bound once per thread with SO_REUSEPORT, so the kernel spreads
/// connections over the threads and a connection lives on one thread from accept to close —
/// no work stealing, no cross-thread wake-ups on the hot path (like nginx's worker processes).
/// Inbound listeners stay on the multi-threaded runtime: a slow HSM's signature waits under
/// `block_in_place`, which needs it.
struct IoThreads {
    handles: Vec<tokio::runtime::Handle>,
}

impl IoThreads {
    /// Starts `count` threads (0: one per CPU).
    fn start(count: usize, busy_poll: Duration) -> Result<Self, AppError> {
        let count = match count {
            0 => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            n => n,
        };
        let mut handles = Vec::with_capacity(count);
        for i in 0..count {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::Builder::new()
                .name(format!("tollgate-io-{i}"))
                .spawn(move || {
                    // Log lines gather in this thread's batch, handed to the writer when the
                    // thread goes idle, and at least every `BATCH_INTERVAL` when it does not.
                    crate::logs::batch_this_thread();
                    let runtime = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .on_thread_park(crate::logs::hand_over)
                        .on_thread_unpark(crate::busy_poll::unparked)
                        .build()
                    {
                        Ok(runtime) => runtime,
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = tx.send(Ok(runtime.handle().clone()));
                    if !busy_poll.is_zero() {
                        runtime.spawn(crate::busy_poll::run(busy_poll));
                    }
                    runtime.block_on(async {
                        let mut tick = tokio::time::interval(crate::logs::BATCH_INTERVAL);
                        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                        loop {
                            tick.tick().await;
                            crate::logs::hand_over();
                        }
                    });
                })
                .map_err(AppError::Threads)?;
            let handle = rx.recv().map_err(|e| AppError::Threads(std::io::Error::other(e)))?;
            handles.push(handle.map_err(AppError::Threads)?);
        }
        Ok(Self { handles })
    }
}

/// The running listeners, by what defines them: the bound address and one accept task per
/// socket.
#[derive(Default)]
struct Listeners {
    running: HashMap<ListenerKey, (SocketAddr, Vec<tokio::task::JoinHandle<()>>)>,
}

/// What defines a listener: mode, configured address, upstream port.
type ListenerKey = (ListenerMode, SocketAddr, u16);

/// A listener's sockets, bound and not yet accepting: one per data-plane thread (one for
/// inbound).
type Bound = Vec<(ListenerKey, Vec<std::net::TcpListener>, crate::config::ListenerConfig, SocketAddr)>;

impl Listeners {
    /// Stops the listeners `config` no longer has and binds those it adds (`threads` sockets
    /// each). On a bind error the others are still returned, with the first error.
    fn bind(&mut self, config: &Config, threads: usize) -> Result<Bound, (Bound, AppError)> {
        let wanted: Vec<_> =
            config.listeners.iter().map(|l| ((l.mode, l.listen, l.upstream_port), l.clone())).collect();
        self.running.retain(|key, (addr, tasks)| {
            let keep = wanted.iter().any(|(k, _)| k == key);
            if !keep {
                tracing::info!(mode = key.0.as_str(), addr = %addr, "listener stopped");
                tasks.iter().for_each(tokio::task::JoinHandle::abort);
            }
            keep
        });
        let mut bound = Vec::new();
        let mut first_error = None;
        for (key, l) in wanted {
            if self.running.contains_key(&key) {
                continue;
            }
            let sockets = if l.mode == ListenerMode::Inbound { 1 } else { threads };
            match bind_sockets(&l, sockets) {
                Ok((listeners, local)) => bound.push((key, listeners, l, local)),
                Err(source) => {
                    let what = format!("{} listener", l.mode.as_str());
                    first_error.get_or_insert(AppError::Bind { what, addr: l.listen, source });
                }
            }
        }
        match first_error {
            Some(e) => Err((bound, e)),
            None => Ok(bound),
        }
    }

    /// Tells the proxy state every socket of ours (it never connects to them).
    fn own_addresses(&self, proxy: &mut Proxy, bound: &Bound, management: SocketAddr) {
        let running = self.running.values().map(|(addr, _)| *addr);
        for addr in running.chain(bound.iter().map(|b| b.3)).chain([management]) {
            proxy.add_own(addr);
        }
    }

    /// Starts accepting on newly bound sockets: forward listeners on the data-plane threads,
    /// inbound ones on this runtime.
    fn start(&mut self, bound: Bound, proxies: &watch::Sender<Arc<Proxy>>, io: &IoThreads) {
        for (key, sockets, l, local) in bound {
            tracing::info!(mode = l.mode.as_str(), addr = %local, sockets = sockets.len(), "listening");
            let tasks = sockets
                .into_iter()
                .zip(io.handles.iter().cycle())
                .map(|(socket, handle)| {
                    let serve = proxy::serve_listener(proxies.subscribe(), socket, l.clone());
                    match l.mode {
                        ListenerMode::Inbound => tokio::spawn(serve),
                        _ => handle.spawn(serve),
                    }
                })
                .collect();
            self.running.insert(key, (local, tasks));
        }
    }

    fn stop(self) {
        for (_, (_, tasks)) in self.running {
            tasks.iter().for_each(tokio::task::JoinHandle::abort);
        }
    }
}

/// `count` sockets on the listener's address (the first fixes the port when it asks for 0).
fn bind_sockets(
    l: &crate::config::ListenerConfig,
    count: usize,
) -> std::io::Result<(Vec<std::net::TcpListener>, SocketAddr)> {
    let first = crate::proxy::transparent::bind(l, l.listen)?;
    let local = first.local_addr()?;
    let mut sockets = vec![first];
    for _ in 1..count {
        sockets.push(crate::proxy::transparent::bind(l, local)?);
    }
    Ok((sockets, local))
}

fn load_ca(store: &CertStore, role: CaRole, keys: &Keyring<'_>) -> Option<Arc<crate::pki::mint::Ca>> {
    let what = role.as_str();
    match store.ca(role, keys) {
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
