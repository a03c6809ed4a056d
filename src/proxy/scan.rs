//! Content scanning of what tollgate sees in the clear (decrypted HTTPS, plain HTTP): requests
//! go to the `[icap] reqmod` service before they reach the upstream, responses to the `respmod`
//! service before they reach the client. A decryption rule with `icap = false` exempts its
//! traffic. What the scanner returns is relayed as it returned it; when the scanner cannot
//! judge a message (down, slow, nonsense), `on_error` decides: a 503 page (`block`, the
//! default) or the message unscanned (`allow`). Bodies declared larger than `max_body_bytes` are
//! passed or refused per `oversize` without being sent.

use std::net::IpAddr;
use std::sync::Arc;

use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body::Body as _;

use super::Body;
use super::respond::Refusal;
use crate::config::{IcapConfig, IcapFallback};
use crate::icap::{Failed, Icap, Message, Scanned, Service, wire};

/// The scanner and what to do when it cannot judge.
pub struct Scanner {
    pub icap: Icap,
    on_error: IcapFallback,
    oversize: IcapFallback,
    max_body_bytes: u64,
}

/// Who asked, for the scanner's `X-Client-IP` / `X-Client-Username`.
pub struct Asker {
    pub client: IpAddr,
    pub user: Option<Arc<str>>,
}

/// The request a response answers, as RESPMOD encapsulates it.
pub struct Asked {
    method: Method,
    uri: String,
    headers: HeaderMap,
}

/// What the access log says of a request's scans.
#[derive(Debug, Default)]
pub struct Scans {
    pub reqmod: Option<&'static str>,
    pub respmod: Option<&'static str>,
    pub threat: Option<String>,
    pub istag: Option<String>,
    /// Time spent waiting on the scanner before the message could go on.
    pub ms: f64,
}

/// Headers never shown to the scanner: the client's proxy credentials and hop-by-hop ones.
const WITHHELD: [&str; 6] =
    ["proxy-authorization", "proxy-connection", "connection", "keep-alive", "transfer-encoding", "upgrade"];

impl Scanner {
    /// The scanner `[icap]` configures; `None` when it names no service.
    pub fn from_config(config: &IcapConfig) -> Option<Self> {
        Some(Self {
            icap: Icap::from_config(config)?,
            on_error: config.on_error,
            oversize: config.oversize,
            max_body_bytes: config.max_body_bytes,
        })
    }

    /// The copy of a request RESPMOD needs, when responses are scanned.
    pub fn asked<B>(&self, req: &Request<B>, uri: &str) -> Option<Asked> {
        self.icap.respmod.as_ref()?;
        Some(Asked { method: req.method().clone(), uri: uri.to_string(), headers: req.headers().clone() })
    }

    /// REQMOD: the request to send on (possibly the scanner's), or the response to answer with.
    pub async fn request(
        &self,
        asker: &Asker,
        uri: &str,
        req: Request<Body>,
        scans: &mut Scans,
    ) -> Result<Request<Body>, Response<Body>> {
        let Some(service) = &self.icap.reqmod else { return Ok(req) };
        let (parts, body) = req.into_parts();
        let length = body.size_hint().exact();
        if let Some(refusal) = self.oversized(length, uri, &mut scans.reqmod) {
            return Err(refusal.into_response());
        }
        if scans.reqmod.is_some() {
            return Ok(Request::from_parts(parts, body));
        }
        let message = Message {
            request_head: wire::http_request_head(&parts.method, uri, &shown(&parts.headers)),
            response_head: None,
            body: (!body.is_end_stream()).then_some(body),
            length,
            extension: extension(uri),
            client: asker.client,
            user: asker.user.clone(),
        };
        match self.timed(service, message, scans).await {
            Ok((Scanned::Unmodified { body }, facts)) => {
                note(scans, &facts, true);
                Ok(Request::from_parts(parts, body.unwrap_or_else(empty)))
            }
            Ok((Scanned::Modified { response: Some(response), body, .. }, facts)) => {
                note(scans, &facts, true);
                Err(self.answer(service, uri, *response, body, &facts))
            }
            Ok((Scanned::Modified { request: Some(request), body, .. }, facts)) => {
                note(scans, &facts, true);
                let mut request = *request;
                // The scanner's body is streamed: its length is what arrives.
                request.headers.remove(http::header::CONTENT_LENGTH);
                Ok(Request::from_parts(request, body.unwrap_or_else(empty)))
            }
            Ok((Scanned::Modified { .. }, _)) => unreachable!("icap returns a request or a response"),
            Err(failed) => {
                scans.reqmod = Some("error");
                match self.fallback(service, uri, failed) {
                    Ok(body) => Ok(Request::from_parts(parts, body)),
                    Err(refusal) => Err(refusal.into_response()),
                }
            }
        }
    }

    /// RESPMOD: the response for the client (the scanner's, when it changed or blocked it).
    /// Responses without a body pass unscanned.
    pub async fn response(
        &self,
        asker: &Asker,
        asked: Option<Asked>,
        response: Response<Body>,
        scans: &mut Scans,
    ) -> Response<Body> {
        let (Some(service), Some(asked)) = (&self.icap.respmod, asked) else { return response };
        if response.body().is_end_stream() || response.status() == StatusCode::SWITCHING_PROTOCOLS {
            return response;
        }
        let (parts, body) = response.into_parts();
        let length = body.size_hint().exact();
        if let Some(refusal) = self.oversized(length, &asked.uri, &mut scans.respmod) {
            return refusal.into_response();
        }
        if scans.respmod.is_some() {
            return Response::from_parts(parts, body);
        }
        let message = Message {
            request_head: wire::http_request_head(&asked.method, &asked.uri, &shown(&asked.headers)),
            response_head: Some(wire::http_response_head(parts.status, &shown(&parts.headers))),
            body: Some(body),
            length,
            extension: extension(&asked.uri),
            client: asker.client,
            user: asker.user.clone(),
        };
        match self.timed(service, message, scans).await {
            Ok((Scanned::Unmodified { body }, facts)) => {
                note(scans, &facts, false);
                Response::from_parts(parts, body.unwrap_or_else(empty))
            }
            Ok((Scanned::Modified { response: Some(response), body, .. }, facts)) => {
                note(scans, &facts, false);
                self.answer(service, &asked.uri, *response, body, &facts)
            }
            Ok((Scanned::Modified { .. }, _)) => unreachable!("RESPMOD answers with a response"),
            Err(failed) => {
                scans.respmod = Some("error");
                match self.fallback(service, &asked.uri, failed) {
                    Ok(body) => Response::from_parts(parts, body),
                    Err(refusal) => refusal.into_response(),
                }
            }
        }
    }

    /// Scans `message`, adding the wait to the request's scan time.
    async fn timed(
        &self,
        service: &Arc<Service>,
        message: Message,
        scans: &mut Scans,
    ) -> Result<(Scanned, crate::icap::Facts), Failed> {
        let started = std::time::Instant::now();
        let scanned = self.icap.scan(service, message).await;
        scans.ms += started.elapsed().as_secs_f64() * 1000.0;
        scanned
    }

    /// A body declared larger than `max_body_bytes`: the refusal when `oversize` blocks; the
    /// verdict is noted either way.
    fn oversized(&self, length: Option<u64>, uri: &str, verdict: &mut Option<&'static str>) -> Option<Refusal> {
        let length = length.filter(|l| *l > self.max_body_bytes)?;
        tracing::info!(uri, length, max_body_bytes = self.max_body_bytes, oversize = ?self.oversize, "body too large to scan");
        match self.oversize {
            IcapFallback::Allow => {
                *verdict = Some("unscanned-oversize");
                None
            }
            IcapFallback::Block => {
                *verdict = Some("blocked-oversize");
                Some(Refusal::scan_oversize(uri, length, self.max_body_bytes))
            }
        }
    }

    /// The scanner's own response, as it returned it; a found threat is named in a header and
    /// a log line.
    fn answer(
        &self,
        service: &Service,
        uri: &str,
        mut parts: http::response::Parts,
        body: Option<Body>,
        facts: &crate::icap::Facts,
    ) -> Response<Body> {
        for name in [http::header::CONTENT_LENGTH, http::header::TRANSFER_ENCODING, http::header::CONNECTION] {
            parts.headers.remove(name);
        }
        if facts.verdict == "blocked" {
            tracing::warn!(
                uri,
                scanner = service.url(),
                threat = facts.threat.as_deref(),
                istag = facts.istag.as_deref(),
                "content blocked by the scanner"
            );
            parts.headers.insert(super::respond::ERROR_HEADER, http::HeaderValue::from_static("blocked-by-scanner"));
        }
        Response::from_parts(parts, body.unwrap_or_else(empty))
    }

    /// A scan that failed: the message's body to pass it unscanned (`on_error = "allow"` and
    /// nothing of it lost), or the page to answer with.
    fn fallback(&self, service: &Service, uri: &str, failed: Failed) -> Result<Body, Refusal> {
        let Failed { error, body } = failed;
        match (self.on_error, body) {
            (IcapFallback::Allow, Some(body)) => {
                tracing::warn!(uri, scanner = service.url(), error = %error, "content scanner failed; passed unscanned (on_error = allow)");
                Ok(body.unwrap_or_else(empty))
            }
            (on_error, _) => {
                tracing::warn!(uri, scanner = service.url(), error = %error, ?on_error, "content scanner failed; blocked");
                Err(Refusal::scan_failed(service.url(), &error.to_string()))
            }
        }
    }
}

fn note(scans: &mut Scans, facts: &crate::icap::Facts, request: bool) {
    match request {
        true => scans.reqmod = Some(facts.verdict),
        false => scans.respmod = Some(facts.verdict),
    }
    if facts.threat.is_some() {
        scans.threat.clone_from(&facts.threat);
    }
    scans.istag.clone_from(&facts.istag);
}

fn shown(headers: &HeaderMap) -> HeaderMap {
    let mut shown = headers.clone();
    for name in WITHHELD {
        shown.remove(name);
    }
    shown
}

fn empty() -> Body {
    super::boxed(http_body_util::Empty::new())
}

/// The extension of the URI's last path segment, lower-case (`Transfer-*` lists).
fn extension(uri: &str) -> Option<String> {
    let path = uri.split(['?', '#']).next().unwrap_or(uri);
    let segment = path.rsplit('/').next()?;
    let (_, ext) = segment.rsplit_once('.')?;
    (!ext.is_empty() && ext.len() <= 16).then(|| ext.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extensions_come_from_the_last_segment() {
        assert_eq!(extension("https://a.test/dir/file.EXE?x=1.zip").as_deref(), Some("exe"));
        assert_eq!(extension("https://a.test/v1.2/download").as_deref(), None);
        assert_eq!(extension("https://a.test/").as_deref(), None);
    }
}
