//! The management HTTP API, on loopback by default: liveness, readiness, Prometheus metrics,
//! HSM status and info, certificates, master key, learned bypass, and (with the bearer token)
//! the changing routes. A plain `match` on method and path, no framework; every route calls the
//! same operation the command line does, with the service's own HSM (never opened again), and
//! every error reply comes from `proxy::respond`.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use parking_lot::RwLock;
use serde::Serialize;
use tokio::net::TcpListener;

use super::{Context, ManageError};
use crate::config::Config;
use crate::hsm::Hsm;
use crate::proxy::bypass::Bypass;
use crate::proxy::respond::api_error;

/// What the API reads: the service's configuration (replaced on reload), its HSM, its learned
/// bypass, the bearer token and the readiness conditions.
pub struct ApiState {
    config: RwLock<Arc<Config>>,
    /// Set once the service has opened it.
    hsm: std::sync::OnceLock<Arc<Hsm>>,
    bypass: Arc<Bypass>,
    /// Bearer token for changing routes; `None` refuses them. Replaced on SIGHUP.
    token: RwLock<Option<secrecy::SecretString>>,
    /// What `/readyz` reports.
    pub readiness: Readiness,
}

/// The conditions `/readyz` checks: ready only when every listener is bound, the forward-trust
/// CA is loaded (when a forward listener needs it), at least one HSM member is up (when HSM
/// servers are configured), and the service is not draining.
#[derive(Debug, Default)]
pub struct Readiness {
    listeners_bound: AtomicBool,
    forward_trust_ca: AtomicBool,
    draining: AtomicBool,
}

impl Readiness {
    /// Every configured listener is bound (or not, after a reload that failed to bind one).
    pub fn set_listeners_bound(&self, bound: bool) {
        self.listeners_bound.store(bound, Ordering::Release);
    }

    /// The forward-trust CA the forward listeners mint with is loaded (true with no forward
    /// listener).
    pub fn set_forward_trust_ca(&self, loaded: bool) {
        self.forward_trust_ca.store(loaded, Ordering::Release);
    }

    /// SIGTERM: the service drains; load balancers must stop sending.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }
}

/// `GET /readyz`'s body.
#[derive(Debug, Serialize)]
struct ReadyReport {
    ready: bool,
    /// The conditions that fail, in words.
    failing: Vec<&'static str>,
    listeners_bound: bool,
    forward_trust_ca: bool,
    hsm_member_up: bool,
    draining: bool,
}

impl ApiState {
    /// The API of a service starting with `config`; until `set_hsm`, routes that need the HSM
    /// answer 503.
    pub fn new(config: Arc<Config>, bypass: Arc<Bypass>) -> Self {
        Self {
            config: RwLock::new(config),
            hsm: std::sync::OnceLock::new(),
            bypass,
            token: RwLock::new(None),
            readiness: Readiness::default(),
        }
    }

    /// The service has opened its HSM: the routes that need it serve, and the bearer token
    /// (perhaps sealed under an HSM-encrypted master key) is read.
    pub fn set_hsm(&self, hsm: Arc<Hsm>) {
        let _ = self.hsm.set(hsm);
        if let Some(ctx) = self.context() {
            *self.token.write() = load_token(&ctx);
        }
    }

    /// After a reload: the new configuration, and the token it names.
    pub fn reload(&self, config: Arc<Config>) {
        *self.config.write() = config;
        if let Some(ctx) = self.context() {
            *self.token.write() = load_token(&ctx);
        }
    }

    /// A context for one request: the current configuration and the service's HSM, once open.
    fn context(&self) -> Option<Context> {
        Some(Context::with_hsm(self.config.read().clone(), self.hsm.get()?.clone()))
    }

    fn ready(&self) -> ReadyReport {
        let r = &self.readiness;
        let listeners_bound = r.listeners_bound.load(Ordering::Acquire);
        let forward_trust_ca = r.forward_trust_ca.load(Ordering::Acquire);
        let draining = r.draining.load(Ordering::Acquire);
        let hsm_member_up = self.config.read().hsm.servers.is_empty() || self.hsm.get().is_some_and(|hsm| hsm.any_up());
        let failing = [
            (!listeners_bound, "listeners not bound"),
            (!forward_trust_ca, "no forward-trust CA loaded"),
            (!hsm_member_up, "no HSM member up"),
            (draining, "draining"),
        ]
        .into_iter()
        .filter_map(|(fails, what)| fails.then_some(what))
        .collect::<Vec<_>>();
        ReadyReport { ready: failing.is_empty(), failing, listeners_bound, forward_trust_ca, hsm_member_up, draining }
    }
}

/// The management API token of `ctx` (configured file, or sealed under the master key). One
/// that cannot be read now (HSM down) leaves changes refused until the next SIGHUP; the data
/// plane does not wait for it.
fn load_token(ctx: &Context) -> Option<secrecy::SecretString> {
    match super::api_token(ctx) {
        Ok(token) => token,
        Err(e) => {
            tracing::error!(error = %e, "management API token unavailable: changing routes are refused until reload");
            None
        }
    }
}

/// Serves the API until the task is dropped.
pub async fn serve(listener: TcpListener, state: Arc<ApiState>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let state = state.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(state, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

async fn route(state: Arc<ApiState>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    match (method, path.as_str()) {
        (Method::GET, "/livez") => text(StatusCode::OK, "text/plain", "ok\n"),
        (Method::GET, "/readyz") => {
            let report = state.ready();
            let status = if report.ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
            let mut response = json(&report);
            *response.status_mut() = status;
            response
        }
        (Method::GET, "/metrics") => {
            text(StatusCode::OK, crate::telemetry::METRICS_CONTENT_TYPE, crate::telemetry::render_metrics())
        }
        (Method::GET, "/") => reply(blocking(&state, |ctx| Ok(status_page(ctx))).await, |html| {
            text(StatusCode::OK, "text/html; charset=utf-8", html)
        }),
        (Method::GET, "/api/v1/hsm/status") => {
            reply(blocking(&state, |ctx| Ok(super::hsm_status(ctx))).await, |v| json(&v))
        }
        (Method::GET, "/api/v1/hsm/info") => {
            reply(blocking(&state, |ctx| Ok(super::hsm_info(ctx))).await, |v| json(&v))
        }
        (Method::GET, "/api/v1/certs") => reply(blocking(&state, super::cert_list).await, |v| json(&v)),
        (Method::GET, cert) if cert.starts_with("/api/v1/certs/") => {
            let name = cert["/api/v1/certs/".len()..].to_string();
            reply(blocking(&state, move |ctx| super::cert_status(ctx, &name)).await, |v| json(&v))
        }
        (Method::GET, "/api/v1/master-key") => reply(blocking(&state, super::master_key::status).await, |v| json(&v)),
        (Method::GET, "/api/v1/bypass") => json(&super::BypassList(state.bypass.list())),
        (Method::DELETE, "/api/v1/bypass") => authorized(&state, &req).unwrap_or_else(|| {
            let host = req.uri().query().and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("host=")));
            let removed = state.bypass.clear(host);
            tracing::info!(host = host.unwrap_or("*"), removed, "bypass entries cleared");
            json(&super::BypassCleared { removed })
        }),
        (Method::POST, "/api/v1/hsm/rotate-wrapping-key") => match authorized(&state, &req) {
            Some(refusal) => refusal,
            None => reply(blocking(&state, super::master_key::rotate_wrapping_key).await, |v| json(&v)),
        },
        (Method::POST, "/api/v1/hsm/support-bundle") => match authorized(&state, &req) {
            Some(refusal) => refusal,
            None => {
                let logs = Ok(crate::logs::recent());
                reply(blocking(&state, move |ctx| super::support::build(ctx, logs)).await, |bytes| {
                    tracing::info!(bytes = bytes.len(), "support file built");
                    text(StatusCode::OK, "application/gzip", bytes)
                })
            }
        },
        (_, path) if ROUTES.contains(&path) || path.starts_with("/api/v1/certs/") => {
            api_error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        }
        _ => api_error(StatusCode::NOT_FOUND, &format!("no route {path}")),
    }
}

/// Every path the API serves.
const ROUTES: [&str; 11] = [
    "/",
    "/livez",
    "/readyz",
    "/metrics",
    "/api/v1/hsm/status",
    "/api/v1/hsm/info",
    "/api/v1/certs",
    "/api/v1/master-key",
    "/api/v1/bypass",
    "/api/v1/hsm/rotate-wrapping-key",
    "/api/v1/hsm/support-bundle",
];

/// Runs an operation off the runtime (it may wait on the HSM) with the service's context.
async fn blocking<T, F>(state: &Arc<ApiState>, operation: F) -> Result<T, ManageError>
where
    T: Send + 'static,
    F: FnOnce(&Context) -> Result<T, ManageError> + Send + 'static,
{
    let Some(ctx) = state.context() else { return Err(ManageError::Starting) };
    tokio::task::spawn_blocking(move || operation(&ctx))
        .await
        .unwrap_or_else(|e| Err(ManageError::Bundle(format!("the operation failed: {e}"))))
}

/// An operation's result as a reply: `ok` renders success, errors get their status.
fn reply<T>(result: Result<T, ManageError>, ok: impl FnOnce(T) -> Response<Full<Bytes>>) -> Response<Full<Bytes>> {
    match result {
        Ok(value) => ok(value),
        Err(e) => {
            let status = e.status();
            if status.is_server_error() {
                tracing::warn!(error = %e, status = status.as_u16(), "management request failed");
            }
            api_error(status, &e.to_string())
        }
    }
}

/// The status page: HSM members, certificates, master key.
fn status_page(ctx: &Context) -> String {
    let hsm = super::hsm_status(ctx);
    let certs = super::cert_list(ctx).map_err(|e| e.to_string());
    let master_key = super::master_key::status(ctx).map_err(|e| e.to_string());
    super::page::render(&super::page::PageData { hsm: &hsm, certs, master_key })
}

/// Changing routes need `Authorization: Bearer <token>`; with no token configured they are
/// refused outright. The refusal to send, if any.
fn authorized<B>(state: &ApiState, req: &Request<B>) -> Option<Response<Full<Bytes>>> {
    use secrecy::ExposeSecret;
    let token = state.token.read();
    let Some(token) = token.as_ref() else {
        return Some(api_error(
            StatusCode::FORBIDDEN,
            "changes are disabled: store a token (tollgate api-token set) or set [management] token_file",
        ));
    };
    let given =
        req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    let digest = |s: &str| crate::keys::sha256(s.as_bytes());
    match given {
        Some(given) if digest(given) == digest(token.expose_secret()) => None,
        _ => Some(api_error(StatusCode::UNAUTHORIZED, "a valid bearer token is required")),
    }
}

fn text(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
    response
}

fn json<T: Serialize>(value: &T) -> Response<Full<Bytes>> {
    match serde_json::to_vec_pretty(value) {
        Ok(body) => text(StatusCode::OK, "application/json", body),
        Err(e) => api_error(StatusCode::INTERNAL_SERVER_ERROR, &format!("serialising the answer: {e}")),
    }
}
