//! The explicit forward proxy (D1): `CONNECT host:port` hands the tunnel to the TLS pipeline;
//! absolute-form `http://` requests are relayed as plain HTTP.

use std::convert::Infallible;
use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;

use super::http::{AccessLog, LineCtx, absolute_uri, prepare_request, relay_response_headers};
use super::respond::Refusal;
use super::scan::{Asker, Scanner, Scans};
use super::{Body, ConnCtx, Proxy, ProxyError, Target};
use crate::policy::Who;

/// Serves one client connection of the explicit listener; with `auth`, every request must carry
/// proxy credentials.
pub async fn serve(proxy: Arc<Proxy>, stream: super::Client, ctx: ConnCtx, auth: bool) {
    let server = proxy.http1_server();
    let draining = proxy.clone();
    let client = ctx.client;
    let service = hyper::service::service_fn(move |req| {
        let (proxy, ctx) = (proxy.clone(), ctx.clone());
        async move {
            let ctx = match auth {
                true => match authenticate(&proxy, &req, ctx).await {
                    Ok(ctx) => ctx,
                    Err(refusal) => return Ok(refusal),
                },
                false => ctx,
            };
            handle(proxy, req, ctx).await
        }
    });
    let conn = Box::pin(server.serve_connection(TokioIo::new(stream), service).with_upgrades());
    super::drain::serve_client(&draining, conn, client, |c| c.graceful_shutdown()).await;
}

/// Checks the request's proxy credentials: the context with its user, or the 407 to send.
async fn authenticate(proxy: &Proxy, req: &Request<Incoming>, mut ctx: ConnCtx) -> Result<ConnCtx, Response<Body>> {
    let Some(users) = &proxy.policy.users else { return Err(Refusal::proxy_auth().into_response()) };
    match users.check(ctx.client.ip(), req.headers().get(http::header::PROXY_AUTHORIZATION)).await {
        Ok(user) => {
            ctx.user = Some(user);
            Ok(ctx)
        }
        Err(refused) => {
            tracing::info!(client = %ctx.client, listener = %ctx.listener(), reason = refused.as_str(), "proxy authentication refused");
            Err(Refusal::proxy_auth().into_response())
        }
    }
}

async fn handle(proxy: Arc<Proxy>, req: Request<Incoming>, ctx: ConnCtx) -> Result<Response<Body>, Infallible> {
    if req.method() == Method::CONNECT {
        return Ok(connect(proxy, req, ctx).await);
    }
    if req.uri().scheme_str() == Some("http") {
        return Ok(plain(proxy, req, ctx).await);
    }
    let refusal = Refusal::new(
        StatusCode::BAD_REQUEST,
        "bad-proxy-request",
        "expected CONNECT or an absolute-form http:// request".into(),
    );
    Ok(refusal.into_response())
}

/// Answers 200 and runs the TLS pipeline on the upgraded connection. Through a parent proxy,
/// only once the parent has opened the tunnel: its refusal is the answer otherwise.
async fn connect(proxy: Arc<Proxy>, mut req: Request<Incoming>, ctx: ConnCtx) -> Response<Body> {
    let Some(target) = req.uri().authority().and_then(|a| Target::parse(a.as_str(), 443)) else {
        return Refusal::new(StatusCode::BAD_REQUEST, "bad-connect", "CONNECT needs host:port".into()).into_response();
    };
    if let Err(e) = proxy.check_literal(&target) {
        return Refusal::upstream(e).into_response();
    }
    if let Some(parent) = proxy.parent_for(&target)
        && let Err(e) = parent.prepare(&proxy, &target).await
    {
        return Refusal::upstream(e).into_response();
    }
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => super::intercept::serve(proxy, TokioIo::new(upgraded), Some(target), ctx).await,
            Err(e) => tracing::info!(client = %ctx.client, error = %e, "CONNECT upgrade failed"),
        }
    });
    Response::new(Empty::new().map_err(|never: Infallible| match never {}).boxed_unsync())
}

/// Relays one plain-HTTP request to its origin.
async fn plain(proxy: Arc<Proxy>, req: Request<Incoming>, ctx: ConnCtx) -> Response<Body> {
    let Some(target) = req.uri().authority().and_then(|a| Target::parse(a.as_str(), 80)) else {
        return Refusal::new(StatusCode::BAD_REQUEST, "bad-proxy-request", "request URI has no host".into())
            .into_response();
    };
    let who = Who { client: ctx.client.ip(), user: ctx.user.as_deref(), listener: ctx.listener() };
    let blocked_by = proxy.policy.blocks_plain(&who, &target.host);
    let line = || LineCtx::new(&ctx, target.host.as_str().into(), "plain-http".into(), blocked_by.clone());
    let mut log = AccessLog::start(&req, line);
    let action = match blocked_by {
        Some(rule) => crate::policy::HttpAction::Block(rule.to_string()),
        None => proxy.policy.decide_http(&target.host, req.method(), req.uri().path()),
    };
    let mut scans = Scans::default();
    let response = match action {
        crate::policy::HttpAction::Block(rule) => {
            Refusal::blocked(&rule, req.method(), &target.host, req.uri().path()).into_response()
        }
        crate::policy::HttpAction::Allow => {
            let scanner = proxy.scanner.clone().filter(|_| proxy.policy.scans_plain(&who, &target.host));
            scanned_plain(&proxy, scanner.as_deref(), req, &target, &ctx, &mut scans).await
        }
    };
    if let Some(log) = &mut log {
        log.scans = scans;
    }
    AccessLog::attach(log, response)
}

/// Sends a plain-HTTP request on, through the content scanner when there is one.
async fn scanned_plain(
    proxy: &Proxy,
    scanner: Option<&Scanner>,
    req: Request<Incoming>,
    target: &Target,
    ctx: &ConnCtx,
    scans: &mut Scans,
) -> Response<Body> {
    let Some(scanner) = scanner else {
        return send_plain(proxy, req.map(super::boxed), target)
            .await
            .unwrap_or_else(|e| Refusal::upstream(e).into_response());
    };
    let uri = absolute_uri(&req, target, "http");
    let asked = scanner.asked(&req, &uri);
    let asker = Asker { client: ctx.client.ip(), user: ctx.user.clone() };
    let req = match scanner.request(&asker, &uri, req.map(super::boxed), scans).await {
        Ok(req) => req,
        Err(answer) => return answer,
    };
    match send_plain(proxy, req, target).await {
        Ok(response) => scanner.response(&asker, asked, response, scans).await,
        Err(e) => Refusal::upstream(e).into_response(),
    }
}

/// Sends a plain-HTTP request to its origin, or in absolute form to the parent proxy.
async fn send_plain(proxy: &Proxy, req: Request<Body>, target: &Target) -> Result<Response<Body>, ProxyError> {
    let parent = proxy.parent_for(target);
    let stream = match parent {
        Some(parent) => {
            proxy.check_literal(target)?;
            parent.connect(proxy).await?
        }
        None => proxy.dial(target).await?,
    };
    let http_err = |e: hyper::Error| ProxyError::UpstreamHttp { target: target.to_string(), reason: e.to_string() };
    let (mut sender, connection) = http1::handshake(TokioIo::new(stream)).await.map_err(http_err)?;
    tokio::spawn(connection);
    let mut req = prepare_request(req, target, false, false);
    if let Some(parent) = parent {
        let absolute = format!("http://{target}{}", req.uri().path_and_query().map_or("/", |p| p.as_str()));
        *req.uri_mut() = absolute.parse().map_err(|_| ProxyError::UpstreamHttp {
            target: target.to_string(),
            reason: "the request cannot be written in absolute form".into(),
        })?;
        if let Some(authorization) = parent.authorization() {
            req.headers_mut().insert(http::header::PROXY_AUTHORIZATION, authorization.clone());
        }
    }
    let mut response = sender.send_request(req).await.map_err(http_err)?;
    if let Some(parent) = parent
        && response.status() == StatusCode::PROXY_AUTHENTICATION_REQUIRED
    {
        // Always the parent's (an origin has no business asking for proxy credentials): never
        // relayed, or the client would be asked for the parent's password.
        let reason = response.status().canonical_reason().unwrap_or_default().to_string();
        return Err(parent.refused(target, 407, reason));
    }
    relay_response_headers(response.headers_mut());
    Ok(response.map(super::boxed))
}
