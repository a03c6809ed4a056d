//! The management HTTP API, on loopback by default: liveness, readiness, Prometheus metrics,
//! HSM status and the certificate list. A plain `match` on the path, no framework.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::hsm::Hsm;
use crate::telemetry::METRICS;

/// What the API reads.
pub struct ApiState {
    pub hsm: Arc<Hsm>,
    pub state_dir: PathBuf,
    pub bypass: Arc<crate::proxy::bypass::Bypass>,
    /// The configuration file, re-read by operations the CLI shares (master key).
    pub config_path: PathBuf,
    /// Bearer token for changing routes; `None` refuses them. Replaced on SIGHUP.
    pub token: std::sync::RwLock<Option<secrecy::SecretString>>,
}

/// Serves the API until the task is dropped.
pub async fn serve(listener: TcpListener, state: Arc<ApiState>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let state = state.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| route(state.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

async fn route(state: Arc<ApiState>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.method() == Method::DELETE && req.uri().path() == "/api/v1/bypass" {
        if let Some(refusal) = refuse_unauthorized(&state, &req) {
            return Ok(refusal);
        }
        let host = req.uri().query().and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("host=")));
        let removed = state.bypass.clear(host);
        tracing::info!(host = host.unwrap_or("*"), removed, "bypass entries cleared");
        return Ok(json(&serde_json::json!({ "removed": removed })));
    }
    if req.method() == Method::POST && req.uri().path() == "/api/v1/hsm/rotate-wrapping-key" {
        if let Some(refusal) = refuse_unauthorized(&state, &req) {
            return Ok(refusal);
        }
        return Ok(master_key(&state, true).await);
    }
    if req.method() == Method::POST && req.uri().path() == "/api/v1/hsm/support-bundle" {
        if let Some(refusal) = refuse_unauthorized(&state, &req) {
            return Ok(refusal);
        }
        return Ok(support_bundle(&state).await);
    }
    if req.method() != Method::GET {
        return Ok(text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n".into()));
    }
    Ok(match req.uri().path() {
        "/livez" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => text(StatusCode::OK, "ready\n".into()),
        "/metrics" => {
            let mut response = text(StatusCode::OK, METRICS.render());
            response
                .headers_mut()
                .insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; version=0.0.4"));
            response
        }
        "/api/v1/hsm/status" => json(&state.hsm.status()),
        "/api/v1/bypass" => json(&state.bypass.list()),
        "/api/v1/master-key" => master_key(&state, false).await,
        "/api/v1/hsm/info" => {
            let hsm = state.hsm.clone();
            match tokio::task::spawn_blocking(move || hsm.info()).await {
                Ok(info) => json(&info),
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
            }
        }
        "/api/v1/certs" => {
            let state = state.clone();
            match tokio::task::spawn_blocking(move || cert_rows(&state)).await {
                Ok(Ok(rows)) => json(&rows),
                Ok(Err(e)) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
            }
        }
        "/" => {
            let state = state.clone();
            let page = tokio::task::spawn_blocking(move || {
                let hsm = state.hsm.status();
                let master_key = crate::config::Config::load(&state.config_path)
                    .map_err(|e| e.to_string())
                    .and_then(|config| crate::manage::master_key::status(&config).map_err(|e| e.to_string()));
                let data = crate::manage::page::PageData { hsm: &hsm, certs: cert_rows(&state), master_key };
                crate::manage::page::render(&data)
            })
            .await;
            match page {
                Ok(html) => {
                    let mut response = text(StatusCode::OK, html);
                    response
                        .headers_mut()
                        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/html; charset=utf-8"));
                    response
                }
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    })
}

/// The certificate list with key status (test signatures on the HSM: blocking).
fn cert_rows(state: &ApiState) -> Result<Vec<crate::pki::CertSummary>, String> {
    super::cert_rows(&state.state_dir, Some(&state.hsm)).map_err(|e| e.to_string())
}

/// Changing routes need `Authorization: Bearer <token>`; with no token configured they are
/// refused outright. The refusal to send, if any.
fn refuse_unauthorized<B>(state: &ApiState, req: &Request<B>) -> Option<Response<Full<Bytes>>> {
    use secrecy::ExposeSecret;
    let token = state.token.read().unwrap_or_else(|e| e.into_inner());
    let Some(token) = token.as_ref() else {
        return Some(text(
            StatusCode::FORBIDDEN,
            "changes are disabled: store a token (tollgate api-token set) or set [management] token_file\n".into(),
        ));
    };
    let given =
        req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    let digest = |s: &str| aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, s.as_bytes());
    match given {
        Some(given) if digest(given).as_ref() == digest(token.expose_secret()).as_ref() => None,
        _ => Some(text(StatusCode::UNAUTHORIZED, "a valid bearer token is required\n".into())),
    }
}

/// Master key status, or a wrapping key rotation: the same functions as the CLI.
async fn master_key(state: &ApiState, rotate: bool) -> Response<Full<Bytes>> {
    let path = state.config_path.clone();
    let result = tokio::task::spawn_blocking(move || {
        let config = crate::config::Config::load(&path).map_err(|e| e.to_string())?;
        let outcome = match rotate {
            true => crate::manage::master_key::rotate_wrapping_key(&config),
            false => crate::manage::master_key::status(&config),
        };
        outcome.map_err(|e| e.to_string())
    })
    .await;
    match result {
        Ok(Ok(status)) => json(&status),
        Ok(Err(e)) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    }
}

/// The support file, with this process's recent log lines.
async fn support_bundle(state: &Arc<ApiState>) -> Response<Full<Bytes>> {
    let state = state.clone();
    let result = tokio::task::spawn_blocking(move || {
        let config = crate::config::Config::load(&state.config_path).map_err(|e| e.to_string())?;
        let logs = Ok(crate::telemetry::recent_logs());
        let sources = crate::manage::support::Sources { config: &config, hsm: &state.hsm, logs };
        crate::manage::support::build(&sources).map_err(|e| e.to_string())
    })
    .await;
    match result {
        Ok(Ok(bytes)) => {
            tracing::info!(bytes = bytes.len(), "support file built");
            let mut response = Response::new(Full::new(Bytes::from(bytes)));
            response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/gzip"));
            response
        }
        Ok(Err(e)) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}

fn json<T: serde::Serialize>(value: &T) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec_pretty(value).expect("status types serialise");
    let mut response = Response::new(Full::new(Bytes::from(body)));
    response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    response
}
