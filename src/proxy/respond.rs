//! The one place where tollgate answers a peer itself instead of relaying: HTTP refusals (a
//! status, a `tollgate-error` code and a text or HTML page), TLS handshake refusals (an alert,
//! always within the handshake deadline) and the management API's error replies (a status and a
//! JSON body). Callers say what went wrong; the status, the code, the page and the alert are
//! chosen here, so a 403 is a 403 wherever it comes from.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use rustls::server::{Accepted, AcceptedAlert};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_rustls::StartHandshake;

use super::{Body, Proxy, ProxyError};

/// The header naming why tollgate answered instead of the upstream.
pub const ERROR_HEADER: &str = "tollgate-error";

/// A response tollgate makes itself on the data plane.
#[derive(Debug)]
pub struct Refusal {
    status: StatusCode,
    code: &'static str,
    message: String,
    /// An HTML page with this title instead of plain text.
    page: Option<&'static str>,
    /// Ask for proxy credentials (`Proxy-Authenticate`).
    challenge: bool,
}

impl Refusal {
    /// A refusal with a status, a short machine code (the header) and a human message.
    pub fn new(status: StatusCode, code: &'static str, message: String) -> Self {
        Self { status, code, message, page: None, challenge: false }
    }

    /// 407: proxy credentials are required (`Proxy-Authenticate: Basic`).
    pub fn proxy_auth() -> Self {
        let message = "this proxy needs a user name and password (Proxy-Authorization: Basic)".to_string();
        Self { challenge: true, ..Self::new(StatusCode::PROXY_AUTHENTICATION_REQUIRED, "proxy-auth-required", message) }
    }

    /// A block page: which rule blocked what (all of it escaped: it is client input).
    pub fn blocked(rule: &str, method: &Method, host: &str, path: &str) -> Self {
        tracing::info!(rule, method = %method, host, path, "request blocked by policy");
        let message = format!("{method} {host}{path} is blocked by the rule \"{rule}\".");
        Self { page: Some("Blocked by policy"), ..Self::new(StatusCode::FORBIDDEN, "blocked-by-policy", message) }
    }

    /// The content scanner could not judge a message and `[icap] on_error` blocks it.
    pub fn scan_failed(scanner: &str, error: &str) -> Self {
        let message = format!(
            "The content scanner ({scanner}) could not check this content, so it is blocked ([icap] on_error = block): {error}"
        );
        Self {
            page: Some("Content scanner unavailable"),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "scan-failed", message)
        }
    }

    /// A body larger than the scanner takes, refused (`[icap] oversize = "block"`).
    pub fn scan_oversize(uri: &str, length: u64, max: u64) -> Self {
        let message =
            format!("{uri}: {length} bytes is more than the content scanner takes ({max}, [icap] max_body_bytes).");
        Self { page: Some("Too large to scan"), ..Self::new(StatusCode::FORBIDDEN, "scan-oversize", message) }
    }

    /// The upstream could not be reached, or policy forbids the destination.
    pub fn upstream(e: ProxyError) -> Self {
        let (status, code) = match e {
            ProxyError::Timeout { .. } => (StatusCode::GATEWAY_TIMEOUT, "upstream-unreachable"),
            ProxyError::Forbidden(_) | ProxyError::Denied { .. } => (StatusCode::FORBIDDEN, "destination-denied"),
            ProxyError::ParentRefused { status: 407, .. } => (StatusCode::BAD_GATEWAY, "parent-auth-failed"),
            ProxyError::ParentRefused { .. } => (StatusCode::BAD_GATEWAY, "parent-refused"),
            _ => (StatusCode::BAD_GATEWAY, "upstream-unreachable"),
        };
        match status {
            // The client asked for something policy forbids: its doing, not an upstream failure.
            StatusCode::FORBIDDEN => tracing::info!(error = %e, "destination refused"),
            _ => tracing::warn!(side = ?e.side(), error = %e, "upstream request failed"),
        }
        Self::new(status, code, e.to_string())
    }

    /// The response.
    pub fn into_response(self) -> Response<Body> {
        let (text, content_type) = match self.page {
            Some(title) => (
                format!(
                    "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title></head>\n<body><h1>{title}</h1>\n<p>{}</p>\n<p><small>tollgate</small></p></body></html>\n",
                    escape_html(&self.message)
                ),
                "text/html; charset=utf-8",
            ),
            None => (format!("tollgate: {}\n", self.message), "text/plain; charset=utf-8"),
        };
        let mut response = reply(self.status, self.code, content_type, Bytes::from(text))
            .map(|body| body.map_err(|never: Infallible| match never {}).boxed_unsync());
        if self.challenge {
            let realm = HeaderValue::from_static("Basic realm=\"tollgate\", charset=\"UTF-8\"");
            response.headers_mut().insert(header::PROXY_AUTHENTICATE, realm);
        }
        response
    }
}

/// A management API error reply: `{"error": message}` with `status` and its `tollgate-error`
/// code.
pub fn api_error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    let code = match status {
        StatusCode::BAD_REQUEST => "bad-request",
        StatusCode::UNAUTHORIZED => "unauthorized",
        StatusCode::FORBIDDEN => "forbidden",
        StatusCode::NOT_FOUND => "not-found",
        StatusCode::METHOD_NOT_ALLOWED => "method-not-allowed",
        StatusCode::SERVICE_UNAVAILABLE => "unavailable",
        _ => "internal",
    };
    let body = serde_json::json!({ "error": message, "code": code });
    reply(status, code, "application/json", Bytes::from(body.to_string()))
}

fn reply(status: StatusCode, code: &'static str, content_type: &'static str, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(ERROR_HEADER, HeaderValue::from_static(code));
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// Ends a client handshake whose ClientHello was read with an `access_denied` alert, within
/// the handshake deadline, and returns `reason` for the caller to report.
pub async fn refuse_handshake<IO>(proxy: &Proxy, accepted: Accepted, io: IO, reason: ProxyError) -> ProxyError
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let refusal = StartHandshake::from_parts(accepted, io).into_stream(proxy.server_tls.refuse());
    let _ = tokio::time::timeout(proxy.handshake_timeout, refusal).await;
    reason
}

/// Sends the alert rustls chose for a ClientHello it could not accept, within `deadline`.
pub async fn send_alert<IO>(io: &mut IO, mut alert: AcceptedAlert, deadline: Duration)
where
    IO: AsyncWrite + Unpin,
{
    let mut out = Vec::new();
    let _ = alert.write_all(&mut out);
    let _ = tokio::time::timeout(deadline, io.write_all(&out)).await;
}

/// Text made safe to put in HTML, attribute values included.
pub fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_pages_escape_what_the_client_sent() {
        let response = Refusal::blocked("no <admin>", &Method::GET, "a.test", "/<script>").into_response();
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        assert_eq!(response.headers()[ERROR_HEADER], "blocked-by-policy");
        assert_eq!(response.headers()[header::CONTENT_TYPE], "text/html; charset=utf-8");
    }

    #[test]
    fn api_errors_carry_their_status_and_code() {
        for (status, code) in [
            (StatusCode::NOT_FOUND, "not-found"),
            (StatusCode::BAD_REQUEST, "bad-request"),
            (StatusCode::UNAUTHORIZED, "unauthorized"),
            (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        ] {
            let response = api_error(status, "why");
            assert_eq!(
                (response.status(), &response.headers()[ERROR_HEADER]),
                (status, &HeaderValue::from_static(code))
            );
        }
    }
}
