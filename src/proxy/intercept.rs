//! The one pipeline after a listener: ClientHello → destination binding → policy → tunnel, or
//! upstream handshake → verdict → mint (cached, single-flight) → client handshake → HTTP relay.

use std::sync::Arc;

use rustls::server::Accepted;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::StartHandshake;

use super::bypass::Learned;
use super::decryption::{Decision, Record, Stage, TlsFacts};
use super::respond::refuse_handshake as refuse;
use super::revocation::Status;
use super::tls::{ClientHelloInfo, Offer};
use super::upstream::{Peer, Route, Upstreams};
use super::verdict::Verdict;
use super::{ConnCtx, Proxy, ProxyError, Relaying, Side, Target};
use crate::config::{ErrorAction, ListenerMode, UnsupportedAction};
use crate::pki::CaRole;
use crate::pki::cache::LeafKey;
use crate::pki::mint::{MintError, Minted};
use crate::policy::trust::ChainStatus;
use crate::policy::{TlsAction, TlsDecision, Who};
use crate::telemetry::{METRICS, Refused, refused};

/// Serves one client TLS connection; `hint` is the destination when the listener knows it
/// (CONNECT authority, original destination).
pub async fn serve<IO>(proxy: Arc<Proxy>, io: IO, hint: Option<Target>, ctx: ConnCtx)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    super::serve_phases(Box::pin(handshake_phase(&proxy, io, hint, ctx.clone())), ctx).await;
}

/// The handshake phase: ClientHello, policy, then a tunnel, or upstream, mint and client
/// handshake; it returns the relay, not yet started. The session's decryption log line is
/// written when the phase ends, whichever way.
async fn handshake_phase<IO>(
    proxy: &Arc<Proxy>,
    io: IO,
    hint: Option<Target>,
    ctx: ConnCtx,
) -> Result<Relaying, ProxyError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut record = Record::default();
    let result = decide(proxy, io, hint, &ctx, &mut record).await;
    if proxy.log_decryption {
        if let Err(e) = &result {
            record.decision = if record.decision == Decision::Block { Decision::Block } else { Decision::Error };
            record.error = Some(e.to_string());
        }
        record.emit(&ctx);
    }
    result
}

async fn decide<IO>(
    proxy: &Arc<Proxy>,
    mut io: IO,
    hint: Option<Target>,
    ctx: &ConnCtx,
    record: &mut Record,
) -> Result<Relaying, ProxyError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (accepted, hello, raw) = super::client_hello(proxy, &mut io).await?;
    record.sni.clone_from(&hello.sni);
    let target = match bind_target(hint, &hello, ctx) {
        Ok(target) => target,
        Err(e) => return Err(refuse(proxy, accepted, io, e).await),
    };
    let who = Who { client: ctx.client.ip(), user: ctx.user.as_deref(), listener: ctx.listener() };
    let mut decision = proxy.policy.decide_tls(&who, &target.host);
    if decision.action == TlsAction::Intercept && decision.learn && proxy.bypass.contains(&target.host) {
        decision = TlsDecision { action: TlsAction::Tunnel, rule: Some(LEARNED.into()), learn: true, scan: true };
    }
    record.rule.clone_from(&decision.rule);
    let ctx = ctx.clone();
    match decision.action {
        TlsAction::Tunnel => {
            let learned = decision.rule.as_deref() == Some(LEARNED);
            record.decision = if learned { Decision::TunnelLearned } else { Decision::NoDecrypt };
            Ok(Box::pin(super::tunnel::run(proxy.clone(), io, raw, target, ctx, decision.rule)))
        }
        TlsAction::Block => {
            record.decision = Decision::Block;
            let rule = decision.rule.unwrap_or_default().to_string();
            Err(refuse(proxy, accepted, io, ProxyError::Blocked { host: target.host, rule }).await)
        }
        TlsAction::Intercept => {
            let learn = decision.learn;
            match intercept(proxy, io, accepted, hello, target, ctx, decision, record).await {
                Err(Unsupported(held)) => unsupported(proxy, *held, raw, learn, record).await,
                Err(Failed(e)) => Err(e),
                Ok(relay) => Ok(relay),
            }
        }
    }
}

/// How an interception attempt ended when it did not become a relay.
enum NotIntercepted<IO> {
    /// The upstream cannot be intercepted: the client's connection is still untouched (its
    /// ClientHello unanswered), to be tunnelled or refused.
    Unsupported(Box<Held<IO>>),
    Failed(ProxyError),
}

/// A client connection held back from an upstream that cannot be intercepted.
struct Held<IO> {
    target: Target,
    reason: String,
    accepted: Accepted,
    io: IO,
    ctx: ConnCtx,
}
use NotIntercepted::{Failed, Unsupported};

impl<IO> From<ProxyError> for NotIntercepted<IO> {
    fn from(e: ProxyError) -> Self {
        Failed(e)
    }
}

/// An upstream that cannot be intercepted (`[upstream] unsupported`): the client's connection
/// is passed through untouched, its ClientHello replayed, and the host remembered so that the
/// next connections skip the attempt (unless the rule turned learning off); or refused.
async fn unsupported<IO>(
    proxy: &Arc<Proxy>,
    held: Held<IO>,
    raw: Vec<u8>,
    learn: bool,
    record: &mut Record,
) -> Result<Relaying, ProxyError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Held { target, reason, accepted, io, ctx } = held;
    record.verdict = None;
    record.unsupported = Some(reason.clone());
    record.stage = Stage::UpstreamHandshake;
    if proxy.policy.unsupported == UnsupportedAction::Block {
        record.decision = Decision::Block;
        let e = ProxyError::Unsupported { target: target.to_string(), reason };
        return Err(refuse(proxy, accepted, io, e).await);
    }
    tracing::info!(host = %target.host, reason = %reason, client = %ctx.client, "upstream cannot be intercepted: tunnelled");
    if learn {
        proxy.bypass.remember_unsupported(&target.host, ctx.listener(), &reason);
    }
    record.decision = Decision::TunnelLearned;
    drop(accepted);
    Ok(Box::pin(super::tunnel::run(proxy.clone(), io, raw, target, ctx, Some(UNSUPPORTED.into()))))
}

/// The rule name a learned bypass decision carries.
const LEARNED: &str = "learned bypass";
/// The rule name a tunnel for an upstream that cannot be intercepted carries.
const UNSUPPORTED: &str = "unsupported upstream";

/// The destination: the listener's hint and the SNI must name the same host. In transparent
/// mode the hint is the original destination address: the SNI names the host (validated and
/// minted for) while the connection still goes to the address the client chose.
fn bind_target(hint: Option<Target>, hello: &ClientHelloInfo, ctx: &ConnCtx) -> Result<Target, ProxyError> {
    if ctx.mode == ListenerMode::Transparent
        && let (Some(dst), Some(sni)) = (&hint, &hello.sni)
    {
        return Ok(Target { host: sni.clone(), port: dst.port, addr: dst.addr });
    }
    match (hint, &hello.sni) {
        (Some(target), Some(sni)) if *sni != target.host => {
            Err(ProxyError::NameMismatch { sni: sni.clone(), host: target.host })
        }
        (Some(target), _) => Ok(target),
        (None, Some(sni)) => Ok(Target { host: sni.clone(), port: ctx.upstream_port, addr: None }),
        (None, None) => Err(ProxyError::NoSni),
    }
}

#[allow(clippy::too_many_arguments)]
async fn intercept<IO>(
    proxy: &Arc<Proxy>,
    io: IO,
    accepted: Accepted,
    hello: ClientHelloInfo,
    target: Target,
    ctx: ConnCtx,
    decision: TlsDecision,
    record: &mut Record,
) -> Result<Relaying, NotIntercepted<IO>>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let offer = Offer::for_client(&hello.alpn);
    let key = Upstreams::key(&target, offer);
    let lane = Upstreams::next_lane();
    let route = Route::Forward { target: target.clone(), offer };
    record.stage = Stage::UpstreamConnect;
    let lease = match proxy.upstreams.checkout(proxy, &route, &key, None, lane).await {
        Ok(lease) => lease,
        Err(ProxyError::Unsupported { reason, .. }) => {
            return Err(Unsupported(Box::new(Held { target, reason, accepted, io, ctx })));
        }
        Err(e) => {
            record.stage = e.stage();
            return Err(refuse(proxy, accepted, io, e).await.into());
        }
    };
    record.upstream = lease.peer.tls.clone();
    record.cert = lease.peer.cert_facts();
    let mut verdict = lease.peer.verdict(&proxy.upstream_tls);
    if verdict.is_trusted() {
        record.stage = Stage::Validation;
        let status = lease.peer.revocation(&proxy.revocation).await;
        (record.revocation, record.revocation_source) = (status.as_str(), status.source());
        match status {
            Status::Revoked(_, why) => verdict = Verdict::failed(ChainStatus::Revoked, why),
            Status::Unknown(_, why) => verdict = Verdict::failed(ChainStatus::RevocationUnknown, why),
            Status::Off | Status::NotPublished | Status::Good(_) => {}
        }
    }
    record.verdict = Some(verdict.clone());
    record.stage = Stage::Validation;
    if !verdict.is_trusted() {
        METRICS.untrusted_upstreams_total.inc();
        if proxy.policy.on_error.action(verdict.status) == ErrorAction::Block {
            record.decision = Decision::Block;
            let e = ProxyError::UpstreamUntrusted { target: target.to_string(), reason: verdict.describe() };
            return Err(refuse(proxy, accepted, io, e).await.into());
        }
    }
    record.stage = Stage::Mint;
    let minted = match mint(proxy, &target, &lease.peer, verdict.is_trusted(), &ctx).await {
        Ok((minted, cached)) => {
            (record.leaf, record.hsm_sign_ms) =
                if cached { ("cached", None) } else { ("minted", Some(minted.sign_ms)) };
            minted
        }
        Err(e) => {
            proxy.upstreams.give_back(&key, lease);
            return Err(refuse(proxy, accepted, io, e).await.into());
        }
    };
    record.stage = Stage::ClientHandshake;
    let alpn = super::tls::client_alpn(&hello.alpn, lease.peer.alpn.as_deref());
    let config = proxy.server_tls.config(&minted, verdict.is_trusted(), alpn, hello.suite_order);
    let secs = proxy.handshake_timeout.as_secs();
    let handshake =
        tokio::time::timeout(proxy.handshake_timeout, StartHandshake::from_parts(accepted, io).into_stream(config));
    let client = match handshake.await {
        Ok(Ok(client)) => client,
        Ok(Err(e)) => {
            proxy.upstreams.give_back(&key, lease);
            // A client refusing a forward-untrust leaf does exactly what that leaf is for: it
            // must never teach a bypass, or the bad upstream would be passed through.
            if verdict.is_trusted() && decision.learn {
                learn(proxy, &target, &ctx, &e);
            }
            return Err(ProxyError::ClientTls(e).into());
        }
        Err(_) => {
            proxy.upstreams.give_back(&key, lease);
            return Err(ProxyError::Timeout { phase: "client TLS handshake", secs, side: Side::Client }.into());
        }
    };
    record.client = TlsFacts::of(client.get_ref().1);
    record.decision = Decision::Decrypt;
    let pin = Some(lease.peer.fingerprint);
    let label = verdict.describe();
    let upstream = super::http::Upstream {
        route,
        key,
        lane,
        first: Some(lease),
        pin,
        label,
        rule: decision.rule,
        scan: decision.scan,
    };
    Ok(super::http::relay(proxy.clone(), client, upstream, target, ctx))
}

/// A client rejected our certificate: one more client for the learned bypass to agree on.
fn learn(proxy: &Proxy, target: &Target, ctx: &ConnCtx, e: &std::io::Error) {
    match proxy.bypass.learn(&target.host, ctx.client.ip(), ctx.listener(), e) {
        Some(Learned::Excluded { reason, clients }) => tracing::warn!(
            host = %target.host, reason, clients, client = %ctx.client,
            "clients rejected our certificate (pinning?): host excluded from decryption"
        ),
        Some(Learned::Counted { clients, needed }) => tracing::info!(
            host = %target.host, clients, needed, client = %ctx.client,
            "client rejected our certificate; not excluded until enough distinct clients agree"
        ),
        None => {}
    }
}

/// The leaf for `target`, and whether it came from the cache: cached, or minted if the client
/// may cause one more mint now. A leaf that mirrors the upstream certificate's names serves
/// every host that certificate does (one signature for a wildcard's subdomains), so it is
/// cached without the host.
async fn mint(
    proxy: &Proxy,
    target: &Target,
    peer: &Peer,
    trusted: bool,
    ctx: &ConnCtx,
) -> Result<(Arc<Minted>, bool), ProxyError> {
    let host = (!(proxy.share_leaves && peer.names_cover_host)).then(|| target.host.clone());
    let key = LeafKey { host, upstream: peer.fingerprint, trusted };
    if let Some(minted) = proxy.cache.get(&key).await {
        METRICS.cache_hits_total.inc();
        return Ok((minted, true));
    }
    let mint_err = |source: Arc<MintError>| ProxyError::Mint { host: target.host.clone(), source };
    let ca = if trusted { proxy.cas.trust.clone() } else { proxy.cas.untrust.clone() };
    let timeout = proxy.mint_timeout;
    // The client is charged for a mint it causes, not for joining one under way.
    let attempt = proxy.cache.get_or_mint_charged(
        key,
        || proxy.fairness.may_mint(ctx.client.ip()),
        || {
            let (ca, host, leaf) = (ca.clone(), target.host.clone(), peer.leaf().to_vec());
            async move {
                let role = if trusted { CaRole::ForwardTrust } else { CaRole::ForwardUntrust };
                let ca = ca.ok_or(MintError::NoCa(role.as_str()))?;
                match tokio::time::timeout(timeout, ca.mint_off_runtime(&host, &leaf)).await {
                    Ok(minted) => minted.map(Arc::new),
                    Err(_) => Err(MintError::Timeout(timeout.as_secs())),
                }
            }
        },
    );
    match attempt.await {
        Ok(Some(minted)) => Ok((minted, false)),
        Ok(None) => {
            refused(Refused::PerClientMints).inc();
            Err(ProxyError::MintLimited { host: target.host.clone(), client: ctx.client.ip() })
        }
        Err(e) => {
            METRICS.mint_errors_total.inc();
            Err(mint_err(e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(mode: ListenerMode) -> ConnCtx {
        let semaphore = std::sync::Arc::new(tokio::sync::Semaphore::new(1));
        let fairness = crate::proxy::fairness::Fairness::new(&Default::default());
        let client: std::net::SocketAddr = "127.0.0.1:1".parse().unwrap();
        let ticket = std::sync::Arc::new(crate::proxy::Admission::new(
            mode.as_str().into(),
            semaphore.try_acquire_owned().unwrap(),
            fairness.admit(client.ip()).unwrap(),
        ));
        ConnCtx { client, mode, upstream_port: 8443, ticket, user: None }
    }

    fn hello(sni: Option<&str>) -> ClientHelloInfo {
        ClientHelloInfo {
            sni: sni.map(str::to_string),
            alpn: vec![],
            suite_order: crate::proxy::tls::SuiteOrder::Server,
        }
    }

    #[test]
    fn sni_and_connect_host_must_agree() {
        let target = Target { host: "a.test".into(), port: 443, addr: None };
        let explicit = ctx(ListenerMode::Explicit);
        assert!(matches!(
            bind_target(Some(target.clone()), &hello(Some("b.test")), &explicit),
            Err(ProxyError::NameMismatch { .. })
        ));
        assert_eq!(bind_target(Some(target.clone()), &hello(Some("a.test")), &explicit).unwrap(), target);
        assert_eq!(bind_target(Some(target.clone()), &hello(None), &explicit).unwrap(), target);
        let sni = ctx(ListenerMode::Sni);
        assert_eq!(bind_target(None, &hello(Some("a.test")), &sni).unwrap().port, 8443);
        assert!(matches!(bind_target(None, &hello(None), &sni), Err(ProxyError::NoSni)));
    }
}
