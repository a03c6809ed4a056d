//! Limits and signals: slow clients are cut at the header timeout, oversized headers refused,
//! connections over the limit refused while established ones keep working; SIGTERM drains
//! in-flight requests and exits 0; SIGHUP reloads without dropping established connections and
//! refuses a bad new configuration.

mod support;

use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn setup(extra: &str) -> (TestPki, Origin, Setup, Proxy) {
    let pki = TestPki::new();
    let (chain, key) = pki.leaf(&LeafSpec::new(&["origin.test"]));
    let origin = Origin::start("limits", chain, key, &["http/1.1"]).await;
    let options = ProxyOptions {
        ca_bundles: vec![pki.bundle()],
        resolve: vec![("origin.test:443".into(), origin.addr)],
        extra: extra.into(),
        ..Default::default()
    };
    let setup = Setup::new(&options);
    let proxy = setup.start();
    (pki, origin, setup, proxy)
}

/// Reads until the peer closes; how long that took.
async fn closed_after(stream: &mut tokio::net::TcpStream) -> Duration {
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return started.elapsed(),
            Ok(Ok(_)) => continue,
            Err(_) => panic!("connection still open after 10 s"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_oversized_clients_are_cut() {
    let limits = "\n[limits]\nheader_timeout_secs = 1\nhandshake_timeout_secs = 1\nmax_header_bytes = 16384\n";
    let (_pki, _origin, setup, proxy) = setup(limits).await;

    // Slowloris on the proxy port: a request line, then nothing.
    let mut slow = tokio::net::TcpStream::connect(proxy.explicit).await.unwrap();
    slow.write_all(b"CONNECT origin.test:443 HTTP/1.1\r\nHost: origin.test").await.unwrap();
    let took = closed_after(&mut slow).await;
    assert!(took < Duration::from_secs(3), "cut at the header timeout: {took:?}");

    // A TLS port where the client never sends its ClientHello.
    let mut silent = tokio::net::TcpStream::connect(proxy.sni).await.unwrap();
    let took = closed_after(&mut silent).await;
    assert!(took < Duration::from_secs(3), "cut at the handshake timeout: {took:?}");

    // An idle keep-alive connection is closed after the header timeout too.
    let tls = tls_via_sni(proxy.sni, "origin.test", trusting_client(&setup.trust_ca, &["http/1.1"])).await.unwrap();
    let (mut idle, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await.unwrap();
    let closed = tokio::spawn(conn);
    idle.ready().await.unwrap();
    assert_eq!(idle.send_request(get("origin.test", "/", false)).await.unwrap().status(), 200);
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), closed).await.expect("idle connection closed").unwrap().ok();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "closed after about header_timeout_secs: {:?}",
        started.elapsed()
    );

    // Oversized headers: refused, the proxy keeps serving.
    let tls = tls_via_sni(proxy.sni, "origin.test", trusting_client(&setup.trust_ca, &["http/1.1"])).await.unwrap();
    let mut big = get("origin.test", "/", false);
    big.headers_mut().insert("x-filler", "a".repeat(40_000).parse().unwrap());
    let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    let mut sender = sender;
    let refused = match sender.send_request(big).await {
        Ok(response) => response.status() == 431,
        Err(_) => true,
    };
    assert!(refused, "oversized headers are refused");
    let tls = tls_via_sni(proxy.sni, "origin.test", trusting_client(&setup.trust_ca, &["http/1.1"])).await.unwrap();
    assert_eq!(request(tls, false, get("origin.test", "/", false)).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_limit_are_refused_quickly() {
    let (_pki, _origin, setup, proxy) = setup("\n[limits]\nmax_connections = 3\n").await;
    let config = trusting_client(&setup.trust_ca, &["http/1.1"]);
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(tls_via_sni(proxy.sni, "origin.test", config.clone()).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut extra = tokio::net::TcpStream::connect(proxy.sni).await.unwrap();
    let took = closed_after(&mut extra).await;
    assert!(took < Duration::from_millis(500), "refused at once: {took:?}");
    proxy.wait_log("limit log", |v| v["message"].as_str().is_some_and(|m| m.contains("max_connections")));
    // The established ones still work.
    let tls = held.pop().unwrap();
    assert_eq!(request(tls, false, get("origin.test", "/", false)).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_and_exits_zero() {
    let (_pki, _origin, setup, mut proxy) = setup("").await;
    let tls = tls_via_sni(proxy.sni, "origin.test", trusting_client(&setup.trust_ca, &["http/1.1"])).await.unwrap();
    let slow = tokio::spawn(async move { request(tls, false, get("origin.test", "/slow", false)).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.signal("-TERM");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(tokio::net::TcpStream::connect(proxy.sni).await.is_err(), "no new connections while draining");
    let (status, _, body) = slow.await.unwrap();
    assert_eq!(status, 200, "the in-flight request completes");
    assert!(body.contains("path=/slow"));
    let (code, proxy) =
        tokio::task::spawn_blocking(move || (proxy.wait_exit(Duration::from_secs(10)), proxy)).await.unwrap();
    assert_eq!(code, Some(0));
    // Its access line was written before the exit, not lost in its thread's batch.
    proxy.wait_log("the drained request's access line", |v| v["target"] == "tollgate::access" && v["path"] == "/slow");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_without_dropping_connections_and_refuses_bad_config() {
    let (_pki, _origin, setup, proxy) = setup("").await;
    // An established keep-alive connection.
    let tls = tls_via_sni(proxy.sni, "origin.test", trusting_client(&setup.trust_ca, &["http/1.1"])).await.unwrap();
    let (mut kept, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    kept.ready().await.unwrap();
    assert_eq!(kept.send_request(get("origin.test", "/one", false)).await.unwrap().status(), 200);

    // A new policy rule and a new listener, then SIGHUP.
    let original = std::fs::read_to_string(&setup.config).unwrap();
    let rule = "\n[[policy.rule]]\nname = \"reloaded\"\npath_prefix = \"/blocked\"\naction = \"block\"\n";
    let extra_listener = "[[listener]]\nmode = \"sni\"\nlisten = \"127.0.0.2:0\"\n\n[management]";
    let reloaded = format!("{original}{rule}").replacen("[management]", extra_listener, 1);
    std::fs::write(&setup.config, reloaded).unwrap();
    proxy.signal("-HUP");
    proxy.wait_log("reloaded", |v| v["message"] == "configuration reloaded");
    let added = proxy.wait_log("new listener", |v| {
        v["message"] == "listening" && v["addr"].as_str().is_some_and(|a| a.starts_with("127.0.0.2:"))
    });
    let added: std::net::SocketAddr = added["addr"].as_str().unwrap().parse().unwrap();
    let tls = tls_via_sni(added, "origin.test", trusting_client(&setup.trust_ca, &["http/1.1"])).await.unwrap();
    assert_eq!(
        request(tls, false, get("origin.test", "/", false)).await.0,
        200,
        "the listener added by the reload serves"
    );
    let tls = tls_via_sni(proxy.sni, "origin.test", trusting_client(&setup.trust_ca, &["http/1.1"])).await.unwrap();
    assert_eq!(
        request(tls, false, get("origin.test", "/blocked", false)).await.0,
        403,
        "new connections use the new config"
    );
    kept.ready().await.unwrap();
    assert_eq!(
        kept.send_request(get("origin.test", "/two", false)).await.unwrap().status(),
        200,
        "not dropped by the reload"
    );

    // A broken config is refused; the running one stays.
    std::fs::write(&setup.config, format!("{original}\n[limits]\nmax_connections = 0\n")).unwrap();
    proxy.signal("-HUP");
    let refused = proxy.wait_log("refused", |v| v["message"].as_str().is_some_and(|m| m.contains("reload refused")));
    assert!(refused["error"].as_str().unwrap().contains("limits.max_connections"), "{refused}");
    let tls = tls_via_sni(proxy.sni, "origin.test", trusting_client(&setup.trust_ca, &["http/1.1"])).await.unwrap();
    assert_eq!(request(tls, false, get("origin.test", "/blocked", false)).await.0, 403, "still the last good config");
}

/// `CONNECT` on the explicit listener: the stream after a 200, or `None` when the proxy closed
/// the connection instead (refused at accept).
async fn try_connect(proxy: std::net::SocketAddr, authority: &str) -> Option<tokio::net::TcpStream> {
    let mut tcp = tokio::net::TcpStream::connect(proxy).await.ok()?;
    tcp.write_all(format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes()).await.ok()?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut byte)).await {
            Ok(Ok(1)) => head.push(byte[0]),
            _ => return None,
        }
    }
    String::from_utf8_lossy(&head).starts_with("HTTP/1.1 200").then_some(tcp)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_tunnels_count_against_the_limit_for_their_whole_life() {
    let (_pki, _origin, setup, proxy) = setup("\n[limits]\nmax_connections = 5\n").await;
    let config = trusting_client(&setup.trust_ca, &["http/1.1"]);
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..20 {
        let Some(tunnel) = try_connect(proxy.explicit, "origin.test:443").await else {
            refused += 1;
            continue;
        };
        // TLS completed inside the tunnel, and held: hyper's own connection task is over.
        let name = rustls::pki_types::ServerName::try_from("origin.test").unwrap();
        held.push(tokio_rustls::TlsConnector::from(config.clone()).connect(name, tunnel).await.unwrap());
    }
    assert_eq!((held.len(), refused), (5, 15), "the sixth tunnel and every later one are refused");
    assert_eq!(proxy.metric("tollgate_connections_active").await, 5);
    // The held tunnels serve; closing them frees their places.
    let tls = held.pop().unwrap();
    assert_eq!(request(tls, false, get("origin.test", "/", false)).await.0, 200);
    drop(held);
    assert_eq!(proxy.wait_metric("tollgate_connections_active", 0, Duration::from_secs(5)).await, 0);
    assert!(try_connect(proxy.explicit, "origin.test:443").await.is_some(), "room again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_tunnels_close_when_idle_and_sigterm_waits_for_them() {
    let pki = TestPki::new();
    let (chain, key) = pki.leaf(&LeafSpec::new(&["www.pinned.test"]));
    let origin = Origin::start("pinned", chain, key, &["http/1.1"]).await;
    let limits = "\n[limits]\ntunnel_idle_timeout_secs = 1\nshutdown_grace_secs = 20\n";
    let options = ProxyOptions {
        ca_bundles: vec![pki.bundle()],
        resolve: vec![("www.pinned.test:443".into(), origin.addr)],
        no_decrypt: vec!["*.pinned.test".into()],
        extra: limits.into(),
        ..Default::default()
    };
    let setup = Setup::new(&options);
    let mut proxy = setup.start();
    let trusted = trusting_client(&pki.root_der(), &["http/1.1"]);
    let name = || rustls::pki_types::ServerName::try_from("www.pinned.test").unwrap();

    // Idle both ways for the timeout: closed by the proxy.
    let tunnel = connect_tunnel(proxy.explicit, "www.pinned.test:443").await;
    let mut tls = tokio_rustls::TlsConnector::from(trusted.clone()).connect(name(), tunnel).await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(10), tls.read(&mut buf)).await.expect("closed");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(4), "closed after ~1 s idle: {took:?}");
    proxy.wait_log("idle tunnel", |v| v["action"] == "tunnel" && v["idle_timeout"] == true);

    // A tunnel in use keeps the process draining on SIGTERM, not ready meanwhile.
    let tunnel = connect_tunnel(proxy.explicit, "www.pinned.test:443").await;
    let tls = tokio_rustls::TlsConnector::from(trusted).connect(name(), tunnel).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    proxy.signal("-TERM");
    // The signal is handled asynchronously: readiness turns within a moment, not at once.
    let deadline = Instant::now() + Duration::from_secs(3);
    let ready = loop {
        let ready = http_status(proxy.management, "/readyz").await;
        if ready.0 != 200 || Instant::now() > deadline {
            break ready;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(ready.0, 503, "draining is not ready: {}", ready.1);
    assert!(ready.1.contains("draining"), "{}", ready.1);
    // Kept busy past the idle timeout, the tunnel holds the drain.
    for _ in 0..3 {
        sender.ready().await.unwrap();
        assert_eq!(sender.send_request(get("www.pinned.test", "/", false)).await.unwrap().status(), 200);
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    assert!(proxy.alive(), "the drain waits for the open tunnel");
    drop(sender);
    let code = tokio::task::spawn_blocking(move || proxy.wait_exit(Duration::from_secs(10))).await.unwrap();
    assert_eq!(code, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_without_a_forward_trust_ca() {
    let token = Token::new();
    let config = token.path("tollgate.toml");
    write_config(&token, &config, &ProxyOptions::default());
    let proxy = Proxy::start(&token, &config);
    // The listeners say "listening" as they start accepting, just before readiness hears of it.
    let started = Instant::now();
    let (status, report) = loop {
        let (status, body) = http_status(proxy.management, "/readyz").await;
        let report: serde_json::Value = serde_json::from_str(&body).unwrap();
        if report["listeners_bound"] == true || started.elapsed() > Duration::from_secs(5) {
            break (status, report);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status, 503, "{report}");
    assert_eq!(report["failing"], serde_json::json!(["no forward-trust CA loaded"]), "{report}");
    assert_eq!((report["listeners_bound"].as_bool(), report["hsm_member_up"].as_bool()), (Some(true), Some(true)));
}

/// One client cannot mint without limit: random subdomains under a wildcard certificate cost
/// one signature in all (the leaf mirrors the upstream's names, so it serves every one of them),
/// and hosts with certificates of their own stop being minted for a client past its burst while
/// another client is still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wildcard_costs_one_signature_and_one_client_cannot_mint_without_limit() {
    let pki = TestPki::new();
    let (chain, key) = pki.leaf(&LeafSpec::new(&["*.wild.test"]));
    let wild = Origin::start("wild", chain, key, &["http/1.1"]).await;
    let mut resolve = vec![("*.wild.test:443".to_string(), wild.addr)];
    let mut origins = vec![wild];
    for i in 0..6 {
        let name = format!("site{i}.test");
        let (chain, key) = pki.leaf(&LeafSpec::new(&[&name]));
        let origin = Origin::start(&name, chain, key, &["http/1.1"]).await;
        resolve.push((format!("{name}:443"), origin.addr));
        origins.push(origin);
    }
    let options = ProxyOptions {
        ca_bundles: vec![pki.bundle()],
        resolve,
        extra: "[limits]\nper_client_mints_per_sec = 1\nper_client_mint_burst = 3\n".into(),
        ..Default::default()
    };
    let setup = Setup::new(&options);
    let proxy = setup.start();
    let trusting = || trusting_client(&setup.trust_ca, &["http/1.1"]);
    let (one, other) = ([127, 0, 0, 5], [127, 0, 0, 6]);

    let signs = proxy.metric("tollgate_hsm_sign_total").await;
    for i in 0..30 {
        let host = format!("r{i}-{}.wild.test", std::process::id());
        tls_via_sni_from(one, proxy.sni, &host, trusting()).await.unwrap_or_else(|e| panic!("{host}: {e}"));
    }
    assert_eq!(proxy.metric("tollgate_hsm_sign_total").await - signs, 1, "one signature for 30 subdomains");

    // Two tokens left of the burst (and perhaps one refilled): most of the six sites are refused.
    let mut served = 0;
    for i in 0..6 {
        served += usize::from(tls_via_sni_from(one, proxy.sni, &format!("site{i}.test"), trusting()).await.is_ok());
    }
    assert!((2..=3).contains(&served), "{served} of 6 new leaves minted for one client");
    proxy.wait_log("mint limit", |v| {
        v["error"].as_str().is_some_and(|e| e.contains("may cause no new certificate") && e.contains("127.0.0.5"))
    });
    tls_via_sni_from(other, proxy.sni, "site5.test", trusting()).await.expect("another client is served");
    tls_via_sni_from(one, proxy.sni, "site0.test", trusting()).await.expect("a cached leaf costs no mint");
    let metrics = http_get(proxy.management, "/metrics").await;
    assert!(metrics.contains("tollgate_connections_refused_total{reason=\"per_client_mints\"}"), "{metrics}");
}
