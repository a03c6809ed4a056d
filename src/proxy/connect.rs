//! The explicit forward proxy (D1): `CONNECT host:port` hands the tunnel to the TLS pipeline;
//! absolute-form `http://` requests are relayed as plain HTTP.

use std::convert::Infallible;
use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;

use super::http::{AccessLog, prepare_request, relay_response_headers};
use super::respond::Refusal;
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
    super::serve_client!(draining, conn, client);
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
        return Ok(connect(proxy, req, ctx));
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

/// Answers 200 and runs the TLS pipeline on the upgraded connection.
fn connect(proxy: Arc<Proxy>, mut req: Request<Incoming>, ctx: ConnCtx) -> Response<Body> {
    let Some(target) = req.uri().authority().and_then(|a| Target::parse(a.as_str(), 443)) else {
        return Refusal::new(StatusCode::BAD_REQUEST, "bad-connect", "CONNECT needs host:port".into()).into_response();
    };
    if let Err(e) = proxy.check_literal(&target) {
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
    let log = AccessLog::start(&req, &ctx, &target.host, "plain-http", blocked_by.clone());
    let action = match blocked_by {
        Some(rule) => crate::policy::HttpAction::Block(rule.to_string()),
        None => proxy.policy.decide_http(&target.host, req.method(), req.uri().path()),
    };
    let response = match action {
        crate::policy::HttpAction::Block(rule) => {
            Refusal::blocked(&rule, req.method(), &target.host, req.uri().path()).into_response()
        }
        crate::policy::HttpAction::Allow => match send_plain(&proxy, req, &target).await {
            Ok(response) => response,
            Err(e) => Refusal::upstream(e).into_response(),
        },
    };
    AccessLog::attach(log, response)
}

async fn send_plain(proxy: &Proxy, req: Request<Incoming>, target: &Target) -> Result<Response<Body>, ProxyError> {
    let stream = proxy.dial(target).await?;
    let http_err = |e: hyper::Error| ProxyError::UpstreamHttp { target: target.to_string(), reason: e.to_string() };
    let (mut sender, connection) = http1::handshake(TokioIo::new(stream)).await.map_err(http_err)?;
    tokio::spawn(connection);
    let req = prepare_request(req, target, false, false);
    let mut response = sender.send_request(req).await.map_err(http_err)?;
    relay_response_headers(response.headers_mut());
    Ok(response.map(BodyExt::boxed_unsync))
}
