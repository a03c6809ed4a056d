//! Forward interception end to end: real SoftHSM token, the real `tollgate` binary, real
//! clients (curl, openssl s_client, rustls/hyper) and in-process HTTPS origins.

mod support;

use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn run(program: &str, args: &[String], env: &[(&str, &std::path::Path)]) -> std::process::Output {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    tokio::time::timeout(Duration::from_secs(30), cmd.output()).await.expect("client timed out").unwrap()
}

fn s(v: &str) -> String {
    v.to_string()
}

/// One origin for `origin.test` behind a fresh proxy.
async fn basic() -> (TestPki, Origin, Setup, Proxy) {
    one_origin("a", &["origin.test", "127.0.0.1"], &["h2", "http/1.1"], "").await
}

/// An origin named `name` serving `names` (the first is resolved to it, port 443) behind a fresh
/// proxy with `extra` config.
async fn one_origin(name: &str, names: &[&str], alpn: &[&str], extra: &str) -> (TestPki, Origin, Setup, Proxy) {
    let pki = TestPki::new();
    let (chain, key) = pki.leaf(&LeafSpec::new(names));
    let origin = Origin::start(name, chain, key, alpn).await;
    let options = ProxyOptions {
        ca_bundles: vec![pki.bundle()],
        resolve: vec![(format!("{}:443", names[0]), origin.addr)],
        extra: extra.to_string(),
        ..Default::default()
    };
    let setup = Setup::new(&options);
    let proxy = setup.start();
    (pki, origin, setup, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_through_both_listeners_mints_once_and_logs() {
    let (_pki, _origin, setup, proxy) = basic().await;
    let ca = setup.token.path("trust.pem");
    let ca = ca.to_str().unwrap();
    assert_eq!(proxy.metric("tollgate_hsm_sign_total").await, 0);

    let explicit = format!("http://{}", proxy.explicit);
    let out = run(
        "curl",
        &[s("-sS"), s("--proxy"), explicit.clone(), s("--cacert"), s(ca), s("https://origin.test/hello")],
        &[],
    )
    .await;
    assert!(out.status.success(), "curl: {}", String::from_utf8_lossy(&out.stderr));
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(body.contains("origin=a path=/hello host=origin.test"), "{body}");
    assert_eq!(proxy.metric("tollgate_hsm_sign_total").await, 1, "first connection mints with one HSM signature");
    assert_eq!(proxy.metric("tollgate_cert_cache_misses_total").await, 1);

    // Second connection, and HTTP/2 on both legs: served from the cache, no HSM call.
    let out = run(
        "curl",
        &[s("-sS"), s("--http2"), s("--proxy"), explicit, s("--cacert"), s(ca), s("https://origin.test/two")],
        &[],
    )
    .await;
    assert!(out.status.success(), "curl: {}", String::from_utf8_lossy(&out.stderr));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("version=HTTP/2.0"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // The sni listener: destination from the SNI.
    let port = proxy.sni.port();
    let url = format!("https://origin.test:{port}/sni");
    let resolve = format!("origin.test:{port}:127.0.0.1");
    let out = run("curl", &[s("-sS"), s("--cacert"), s(ca), s("--resolve"), resolve, url], &[]).await;
    assert!(out.status.success(), "curl: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("path=/sni"));

    assert_eq!(proxy.metric("tollgate_hsm_sign_total").await, 1, "later connections make no HSM call");
    assert!(proxy.metric("tollgate_cert_cache_hits_total").await >= 2);
    let active = proxy.wait_metric("tollgate_connections_active", 0, Duration::from_secs(5)).await;
    assert_eq!(active, 0, "every connection closed once its client exited");

    let line = proxy.wait_log("access log of /hello", |v| v["message"] == "request" && v["path"] == "/hello");
    assert_eq!(line["host"], "origin.test");
    assert_eq!(line["method"], "GET");
    assert_eq!(line["status"], 200);
    assert_eq!(line["upstream"], "trusted");
    assert!(line["bytes"].as_u64().unwrap() > 0);
    assert!(line["duration_ms"].as_f64().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_sees_leaf_signed_on_the_token_by_a_non_extractable_key() {
    let (pki, _origin, setup, proxy) = basic().await;
    let ca_path = setup.token.path("trust.pem");
    let args = [
        s("s_client"),
        s("-proxy"),
        proxy.explicit.to_string(),
        s("-connect"),
        s("origin.test:443"),
        s("-servername"),
        s("origin.test"),
        s("-CAfile"),
        ca_path.display().to_string(),
        s("-showcerts"),
    ];
    let mut child = tokio::process::Command::new("openssl")
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut out = String::new();
    child.stdout.take().unwrap().read_to_string(&mut out).await.unwrap();
    let _ = child.wait().await;
    assert!(out.contains("Verify return code: 0 (ok)"), "{out}");
    let pem = &out[out.find("-----BEGIN CERTIFICATE-----").unwrap()..];
    let pem = &pem[..pem.find("-----END CERTIFICATE-----").unwrap() + 25];
    use rustls::pki_types::pem::PemObject;
    let leaf_der = rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
    let leaf = parse(&leaf_der);
    let ca = parse(&setup.trust_ca);
    let (up_chain, _) = pki.leaf(&LeafSpec::new(&["origin.test", "127.0.0.1"]));
    let upstream = parse(&up_chain[0]);

    assert_eq!(leaf.issuer(), ca.subject());
    let sans: Vec<String> = leaf
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .map(|n| format!("{n:?}"))
        .collect();
    assert_eq!(
        sans,
        ["DNSName(\"origin.test\")", "IPAddress([127, 0, 0, 1])"],
        "DNS and IP SANs each as their own type"
    );
    assert!(leaf.validity().not_before >= ca.validity().not_before);
    assert!(leaf.validity().not_after <= ca.validity().not_after);
    assert!(leaf.validity().not_after <= upstream.validity().not_after);
    assert_ne!(leaf.public_key().raw, ca.public_key().raw, "the leaf key is never the CA key");

    // The CA private key object: sensitive, never extractable, sign only; its value unreadable.
    let objects = setup.token.pkcs11_tool(&["--list-objects", "--type", "privkey", "--label", "fwd-trust"]);
    let listing = String::from_utf8_lossy(&objects.stdout);
    assert!(listing.contains("sensitive") && listing.contains("never extractable"), "{listing}");
    assert!(listing.contains("Usage:      sign"), "{listing}");
    let read = setup.token.pkcs11_tool(&["--read-object", "--type", "privkey", "--label", "fwd-trust"]);
    assert!(!read.status.success() || read.stdout.is_empty(), "private key value must not be readable");

    // The leaf's signature verifies under the public key read from the token itself.
    let pub_path = setup.token.path("ca-pub.der");
    let export = setup.token.pkcs11_tool(&[
        "--read-object",
        "--type",
        "pubkey",
        "--label",
        "fwd-trust",
        "-o",
        pub_path.to_str().unwrap(),
    ]);
    assert!(export.status.success(), "{}", String::from_utf8_lossy(&export.stderr));
    let spki = std::fs::read(&pub_path).unwrap();
    let raw = tollgate::keys::spki_raw(&spki).unwrap();
    assert!(
        tollgate::pki::verify(
            tollgate::keys::KeyAlgorithm::EcdsaP256,
            &raw,
            leaf.tbs_certificate.as_ref(),
            &leaf.signature_value.data,
        ),
        "leaf signature verifies under the token's public key"
    );
    drop(proxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_concurrent_first_connections_cost_one_signature() {
    // A burst of one: the client is charged for the one mint it causes, not for each
    // connection that waits for it.
    let extra = "[limits]\nper_client_mint_burst = 1\nper_client_mints_per_sec = 1\n";
    let (_pki, _origin, setup, proxy) =
        one_origin("a", &["origin.test", "127.0.0.1"], &["h2", "http/1.1"], extra).await;
    let config = trusting_client(&setup.trust_ca, &["http/1.1"]);
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let config = config.clone();
        let addr = proxy.sni;
        tasks.push(tokio::spawn(async move { tls_via_sni(addr, "origin.test", config).await.map(drop) }));
    }
    for task in tasks {
        task.await.unwrap().expect("every concurrent handshake succeeds");
    }
    assert_eq!(proxy.metric("tollgate_hsm_sign_total").await, 1, "single-flight: one HSM signature");
    assert_eq!(proxy.metric("tollgate_mint_fallbacks_total").await, 0, "minted on an HSM worker");
    assert_eq!(proxy.metric("tollgate_cert_cache_misses_total").await, 1);
    assert_eq!(proxy.metric("tollgate_cert_cache_hits_total").await, 99);
}

/// A mint is handed to an HSM worker and its CA signature made on that worker: with a single
/// worker there is no other to queue it for, and the mint does not fall back to the blocking pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mint_signs_on_the_hsm_worker_it_was_handed_to() {
    let extra = "\n[hsm]\nworkers = 1\n";
    let (_pki, _origin, setup, proxy) = one_origin("a", &["origin.test"], &["http/1.1"], extra).await;
    let config = trusting_client(&setup.trust_ca, &["http/1.1"]);
    tls_via_sni(proxy.sni, "origin.test", config).await.expect("handshake with a minted leaf");
    assert_eq!(proxy.metric("tollgate_hsm_sign_total").await, 1);
    assert_eq!(proxy.metric("tollgate_mint_fallbacks_total").await, 0, "minted on the HSM worker");
}

/// Upstreams whose certificates fail validation, each behind its own name.
async fn bad_origins(pki: &TestPki) -> Vec<(&'static str, Origin)> {
    let mut origins = Vec::new();
    let cases: [(&str, LeafSpec<'_>); 4] = [
        ("expired.test", LeafSpec { valid_days: (-30, -1), ..LeafSpec::new(&["expired.test"]) }),
        ("wrongname.test", LeafSpec::new(&["other.test"])),
        ("selfsigned.test", LeafSpec { self_signed: true, ..LeafSpec::new(&["selfsigned.test"]) }),
        ("unknownroot.test", LeafSpec { unknown_root: true, ..LeafSpec::new(&["unknownroot.test"]) }),
    ];
    for (host, spec) in cases {
        let (chain, key) = pki.leaf(&spec);
        origins.push((host, Origin::start(host, chain, key, &["http/1.1"]).await));
    }
    origins
}

/// The four bad upstreams and a good one behind a proxy with the `untrusted` policy.
async fn untrusted_and_good(untrusted: &'static str) -> (TestPki, Vec<(&'static str, Origin)>, Origin, Setup, Proxy) {
    let pki = TestPki::new();
    let bad = bad_origins(&pki).await;
    let (chain, key) = pki.leaf(&LeafSpec::new(&["good.test"]));
    let good = Origin::start("good", chain, key, &["http/1.1"]).await;
    let mut resolve: Vec<_> = bad.iter().map(|(h, o)| (format!("{h}:443"), o.addr)).collect();
    resolve.push((s("good.test:443"), good.addr));
    let setup = Setup::new(&ProxyOptions { untrusted, ca_bundles: vec![pki.bundle()], resolve, ..Default::default() });
    let proxy = setup.start();
    (pki, bad, good, setup, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_upstreams_get_a_forward_untrust_leaf() {
    let (_pki, bad, _good, setup, proxy) = untrusted_and_good("forward-untrust").await;
    let trust = parse(&setup.trust_ca);
    let untrust = parse(&setup.untrust_ca);

    for (host, _) in &bad {
        let (config, seen) = capturing_client(&["http/1.1"]);
        let mut tls = tls_via_sni(proxy.sni, host, config).await.unwrap_or_else(|e| panic!("{host}: {e}"));
        let leaf_der = seen.lock()[0].clone();
        let leaf = parse(&leaf_der);
        assert_eq!(leaf.issuer(), untrust.subject(), "{host}: minted by the forward-untrust CA");
        assert_ne!(leaf.issuer(), trust.subject(), "{host}: never by the trusted CA");
        let raw = &untrust.public_key().subject_public_key.data;
        assert!(
            tollgate::pki::verify(
                tollgate::keys::KeyAlgorithm::EcdsaP256,
                raw,
                leaf.tbs_certificate.as_ref(),
                &leaf.signature_value.data
            ),
            "{host}: signature by the untrust CA"
        );
        tls.write_all(format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
        let mut response = String::new();
        let _ = tls.read_to_string(&mut response).await;
        assert!(
            response.starts_with("HTTP/1.1 200"),
            "{host}: the operator chose forward-untrust, traffic flows: {response}"
        );

        // A client that trusts only the forward-trust CA refuses the connection.
        let strict = trusting_client(&setup.trust_ca, &["http/1.1"]);
        assert!(tls_via_sni(proxy.sni, host, strict).await.is_err(), "{host}: a real client must reject it");
    }
    let strict = trusting_client(&setup.trust_ca, &["http/1.1"]);
    tls_via_sni(proxy.sni, "good.test", strict).await.expect("a valid upstream gets a trusted leaf");
    assert_eq!(proxy.metric("tollgate_upstream_untrusted_total").await, 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_policy_refuses_untrusted_upstreams() {
    let (_pki, bad, _good, setup, proxy) = untrusted_and_good("block").await;
    for (host, _) in &bad {
        let (config, seen) = capturing_client(&["http/1.1"]);
        let err = tls_via_sni(proxy.sni, host, config).await.expect_err(host);
        assert!(
            err.to_string().contains("alert") || err.to_string().contains("Alert"),
            "{host}: refused with a TLS alert: {err}"
        );
        assert!(seen.lock().is_empty(), "{host}: no certificate presented at all");
    }
    let strict = trusting_client(&setup.trust_ca, &["http/1.1"]);
    tls_via_sni(proxy.sni, "good.test", strict).await.expect("valid upstreams still work");
    proxy.wait_log("block log line", |v| {
        v["error"].as_str().is_some_and(|e| e.contains("rejected by policy") || e.contains("TLS to upstream"))
    });
    assert_eq!(proxy.metric("tollgate_hsm_sign_total").await, 1, "only the good host was minted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_decrypt_hosts_are_tunnelled_untouched() {
    let pki = TestPki::new();
    let (chain, key) = pki.leaf(&LeafSpec::new(&["www.pinned.test"]));
    let origin_cert = chain[0].clone();
    let origin = Origin::start("pinned", chain, key, &["http/1.1"]).await;
    let options = ProxyOptions {
        ca_bundles: vec![pki.bundle()],
        resolve: vec![(s("www.pinned.test:443"), origin.addr)],
        no_decrypt: vec![s("*.pinned.test")],
        ..Default::default()
    };
    let setup = Setup::new(&options);
    let proxy = setup.start();
    let tunnel = connect_tunnel(proxy.explicit, "www.pinned.test:443").await;
    let (config, seen) = capturing_client(&["http/1.1"]);
    let name = rustls::pki_types::ServerName::try_from("www.pinned.test").unwrap();
    let tls = tokio_rustls::TlsConnector::from(config).connect(name, tunnel).await.unwrap();
    assert_eq!(seen.lock()[0], origin_cert, "the client sees the origin's own certificate");
    let (status, _, body) = request(tls, false, get("www.pinned.test", "/p", false)).await;
    assert_eq!((status, body.contains("origin=pinned")), (200, true));
    assert_eq!(proxy.metric("tollgate_tunnels_total").await, 1);
    assert_eq!(proxy.metric("tollgate_hsm_sign_total").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_connect_host_and_authority_must_agree() {
    let (_pki, _origin, setup, proxy) = basic().await;
    // CONNECT to one host, SNI for another: refused.
    let tunnel = connect_tunnel(proxy.explicit, "origin.test:443").await;
    let name = rustls::pki_types::ServerName::try_from("evil.test").unwrap();
    let config = trusting_client(&setup.trust_ca, &["http/1.1"]);
    assert!(tokio_rustls::TlsConnector::from(config.clone()).connect(name, tunnel).await.is_err());
    proxy.wait_log("mismatch", |v| v["error"].as_str().is_some_and(|e| e.contains("does not match")));

    // A request whose Host names another host on an intercepted connection: 421.
    for h2 in [false, true] {
        let alpn = if h2 { "h2" } else { "http/1.1" };
        let tls = tls_via_sni(proxy.sni, "origin.test", trusting_client(&setup.trust_ca, &[alpn])).await.unwrap();
        let (status, headers, _) = request(tls, h2, get("evil.test", "/", h2)).await;
        assert_eq!(status, 421, "h2={h2}");
        assert_eq!(headers["tollgate-error"], "authority-mismatch");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_is_mirrored_and_h2_clients_reach_h1_origins() {
    let pki = TestPki::new();
    let (chain, key) = pki.leaf(&LeafSpec::new(&["h1only.test"]));
    let h1 = Origin::start("h1", chain, key, &["http/1.1"]).await;
    let (chain, key) = pki.leaf(&LeafSpec::new(&["h2.test"]));
    let h2 = Origin::start("h2", chain, key, &["h2", "http/1.1"]).await;
    let options = ProxyOptions {
        ca_bundles: vec![pki.bundle()],
        resolve: vec![(s("h1only.test:443"), h1.addr), (s("h2.test:443"), h2.addr)],
        ..Default::default()
    };
    let setup = Setup::new(&options);
    let proxy = setup.start();

    let tls =
        tls_via_sni(proxy.sni, "h1only.test", trusting_client(&setup.trust_ca, &["h2", "http/1.1"])).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]), "mirrors the origin's choice");
    drop(tls);
    let tls = tls_via_sni(proxy.sni, "h2.test", trusting_client(&setup.trust_ca, &["h2", "http/1.1"])).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (status, _, body) = request(tls, true, get("h2.test", "/x", true)).await;
    assert_eq!(status, 200);
    assert!(body.contains("version=HTTP/2.0"), "{body}");

    // An h2-only client to an h1-only origin: h2 to tollgate, HTTP/1.1 upstream, with two
    // concurrent streams (two upstream connections).
    let tls = tls_via_sni(proxy.sni, "h1only.test", trusting_client(&setup.trust_ca, &["h2"])).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let (a, b) = tokio::join!(
        sender.clone().send_request(get("h1only.test", "/a", true)),
        sender.send_request(get("h1only.test", "/b", true))
    );
    for response in [a.unwrap(), b.unwrap()] {
        assert_eq!(response.status(), 200);
        let body = http_body_util::BodyExt::collect(response.into_body()).await.unwrap().to_bytes();
        assert!(String::from_utf8_lossy(&body).contains("version=HTTP/1.1"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrades_are_relayed() {
    let (_pki, _origin, setup, proxy) = basic().await;
    let tunnel = connect_tunnel(proxy.explicit, "origin.test:443").await;
    let name = rustls::pki_types::ServerName::try_from("origin.test").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(trusting_client(&setup.trust_ca, &["http/1.1"]))
        .connect(name, tunnel)
        .await
        .unwrap();
    websocket_echo(&mut tls, "origin.test", b"ping over the upgraded connection").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_absolute_form_is_relayed() {
    let origin = Origin::start_plain("plain").await;
    let options = ProxyOptions { resolve: vec![(s("plain.test:80"), origin.addr)], ..Default::default() };
    let setup = Setup::new(&options);
    let proxy = setup.start();
    let out =
        run("curl", &[s("-sS"), s("--proxy"), format!("http://{}", proxy.explicit), s("http://plain.test/p?q=1")], &[])
            .await;
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("origin=plain path=/p host=plain.test"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let line = proxy.wait_log("the access line", |v| v["target"] == "tollgate::access" && v["path"] == "/p");
    let fields = ["mode", "listener", "host", "upstream", "method", "version"].map(|f| line[f].as_str());
    let expected = ["explicit", "explicit", "plain.test", "plain-http", "GET", "HTTP/1.1"].map(Some);
    assert_eq!(fields, expected, "{line}");
    assert_eq!(line["status"], 200, "{line}");
    drop(setup);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_the_proxy_keeps_serving() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let extra = format!("\"closed.test:443\" = \"{closed}\"\n");
    let (_pki, _origin, setup, mut proxy) =
        one_origin("a", &["origin.test", "127.0.0.1"], &["h2", "http/1.1"], &extra).await;

    // Non-TLS bytes on a TLS port: closed.
    let mut tcp = tokio::net::TcpStream::connect(proxy.sni).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf)).await.unwrap().unwrap_or(0);
    assert_eq!(n, 0, "connection closed without a response");
    proxy.wait_log("non-TLS", |v| v["error"].as_str().is_some_and(|e| e.contains("non-TLS")));

    // A ClientHello without SNI on the sni listener: a TLS alert.
    let tcp = tokio::net::TcpStream::connect(proxy.sni).await.unwrap();
    let ip = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let err = tokio_rustls::TlsConnector::from(trusting_client(&setup.trust_ca, &[]))
        .connect(ip.clone(), tcp)
        .await
        .unwrap_err();
    assert!(err.to_string().to_lowercase().contains("alert"), "{err}");
    proxy.wait_log("no SNI", |v| v["error"].as_str().is_some_and(|e| e.contains("no SNI")));

    // An unreachable upstream through CONNECT: a TLS alert; plain HTTP: 502 with the header.
    let tunnel = connect_tunnel(proxy.explicit, "closed.test:443").await;
    let name = rustls::pki_types::ServerName::try_from("closed.test").unwrap();
    assert!(
        tokio_rustls::TlsConnector::from(trusting_client(&setup.trust_ca, &[])).connect(name, tunnel).await.is_err()
    );
    let curl = |url: String| async move {
        let out = run("curl", &[s("-sS"), s("-i"), s("--proxy"), format!("http://{}", proxy.explicit), url], &[]).await;
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let text = curl("http://closed.test:443/".into()).await;
    assert!(text.starts_with("HTTP/1.1 502") && text.contains("tollgate-error: upstream-unreachable"), "{text}");

    // Destinations the policy denies by default (the proxy host, link-local metadata services)
    // and the management listener: 403 before any byte reaches them.
    for authority in [format!("127.0.0.1:{}", closed.port()), "169.254.169.254:80".into(), "[::1]:22".into()] {
        let head = connect_head(proxy.explicit, &authority).await;
        assert!(head.starts_with("HTTP/1.1 403") && head.contains("destination-denied"), "{authority}: {head}");
    }
    let head = connect_head(proxy.explicit, &proxy.management.to_string()).await;
    assert!(head.starts_with("HTTP/1.1 403"), "management: {head}");
    proxy.wait_log("management refused", |v| v["error"].as_str().is_some_and(|e| e.contains("own listener")));
    let text = curl(format!("http://127.0.0.1:{}/", closed.port())).await;
    assert!(text.starts_with("HTTP/1.1 403") && text.contains("deny_destinations"), "{text}");
    // A name resolving into a denied network is refused once resolved.
    let tunnel = connect_tunnel(proxy.explicit, &format!("localhost:{}", closed.port())).await;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    assert!(
        tokio_rustls::TlsConnector::from(trusting_client(&setup.trust_ca, &[])).connect(name, tunnel).await.is_err()
    );
    proxy.wait_log("localhost denied", |v| {
        v["error"].as_str().is_some_and(|e| e.contains("localhost") && e.contains("deny_destinations"))
    });

    // Still serving.
    let tls = tls_via_sni(proxy.sni, "origin.test", trusting_client(&setup.trust_ca, &["http/1.1"])).await.unwrap();
    let (status, _, _) = request(tls, false, get("origin.test", "/", false)).await;
    assert_eq!(status, 200);
    assert!(proxy.alive());
}

/// `CONNECT authority` on the explicit listener: the response head.
async fn connect_head(proxy: std::net::SocketAddr, authority: &str) -> String {
    let mut tcp = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let request = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut head)).await;
    String::from_utf8_lossy(&head).into_owned()
}

/// The `conn=` the origin reports: which upstream connection served the request.
fn conn_of(body: &str) -> String {
    body.split_whitespace()
        .find_map(|w| w.strip_prefix("conn="))
        .unwrap_or_else(|| panic!("no conn= in {body}"))
        .to_string()
}

async fn h1_client(
    proxy: &Proxy,
    setup: &Setup,
    host: &str,
) -> hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>> {
    let tls = tls_via_sni(proxy.sni, host, trusting_client(&setup.trust_ca, &["http/1.1"])).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    sender
}

async fn send(
    sender: &mut hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>,
    req: hyper::Request<http_body_util::Full<bytes::Bytes>>,
) -> (u16, String) {
    sender.ready().await.unwrap();
    let response = sender.send_request(req).await.unwrap();
    let status = response.status().as_u16();
    let body = http_body_util::BodyExt::collect(response.into_body()).await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_reused_across_client_connections() {
    // One data-plane thread: each thread keeps its own upstream connections (their tasks run
    // on its runtime), so with one thread every successive client must reuse the same one.
    let extra = "\n[limits]\nio_threads = 1\n";
    let (_pki, origin, setup, proxy) = one_origin("reuse", &["reuse.test"], &["http/1.1"], extra).await;
    let mut conns = Vec::new();
    for i in 0..5 {
        let mut client = h1_client(&proxy, &setup, "reuse.test").await;
        let (status, body) = send(&mut client, get("reuse.test", &format!("/{i}"), false)).await;
        assert_eq!(status, 200);
        conns.push(conn_of(&body));
        drop(client);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(conns.iter().all(|c| *c == conns[0]), "one upstream connection serves successive clients: {conns:?}");
    assert_eq!(
        origin.accepted.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "no new upstream TCP+TLS per client connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_polling_threads_serve_clients_and_rest_when_idle() {
    // A 5 ms window: a keep-alive client's next request comes within it, so the threads poll
    // through the whole exchange.
    let extra = "\n[limits]\nio_threads = 2\nbusy_poll_us = 5000\n";
    let (_pki, _origin, setup, proxy) = one_origin("spin", &["spin.test"], &["h2", "http/1.1"], extra).await;
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(h1_client(&proxy, &setup, "spin.test").await);
    }
    for round in 0..25 {
        for client in &mut clients {
            let (status, body) = send(client, get("spin.test", &format!("/{round}"), false)).await;
            assert_eq!(status, 200, "{body}");
        }
    }
    // At rest the threads park again: polling for a second would cost up to two seconds of
    // CPU on two threads.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = proxy.cpu_time();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let spent = proxy.cpu_time() - before;
    assert!(spent <= Duration::from_millis(150), "{spent:?} of CPU in a second without clients");
    // And they still serve.
    let (status, _) = send(&mut clients[0], get("spin.test", "/after", false)).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_bound_authentication_is_never_shared() {
    let (_pki, _origin, setup, proxy) = one_origin("ntlm", &["intranet.test"], &["http/1.1"], "").await;

    // Client A starts an NTLM exchange: its upstream connection is pinned to it.
    let mut a = h1_client(&proxy, &setup, "intranet.test").await;
    let (status, first) = send(&mut a, get("intranet.test", "/ntlm", false)).await;
    assert_eq!(status, 401);
    let mut req = get("intranet.test", "/after", false);
    req.headers_mut().insert("authorization", "NTLM TlRMTVNTUAABAAAA".parse().unwrap());
    let (_, second) = send(&mut a, req).await;
    assert_eq!(conn_of(&first), conn_of(&second), "the NTLM handshake stays on one upstream connection");

    // Client B, while A is open and after it closed: never A's authenticated connection.
    let mut b = h1_client(&proxy, &setup, "intranet.test").await;
    let (_, other) = send(&mut b, get("intranet.test", "/b", false)).await;
    assert_ne!(conn_of(&other), conn_of(&first));
    drop(a);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut c = h1_client(&proxy, &setup, "intranet.test").await;
    let (_, third) = send(&mut c, get("intranet.test", "/c", false)).await;
    assert_ne!(conn_of(&third), conn_of(&first), "an authenticated connection is never handed to another client");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http11_clients_share_their_thread_s_h2_upstream_connections() {
    // One data-plane thread: its client connections take turns between its two lanes.
    let extra = "\n[limits]\nio_threads = 1\n";
    let (_pki, origin, setup, proxy) = one_origin("shared", &["shared.test"], &["h2", "http/1.1"], extra).await;
    let accepted = || origin.accepted.load(std::sync::atomic::Ordering::SeqCst);
    let mut clients = Vec::new();
    for _ in 0..3 {
        let tls = tls_via_sni(proxy.sni, "shared.test", trusting_client(&setup.trust_ca, &["http/1.1"])).await.unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]), "the client keeps its protocol");
        let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await.unwrap();
        tokio::spawn(conn);
        clients.push(sender);
    }
    // Without load, one h2 connection carries every client's requests: the second lane
    // shares the first's.
    let mut conns = Vec::new();
    for round in 0..2 {
        for client in &mut clients {
            let (status, body) = send(client, get("shared.test", &format!("/{round}"), false)).await;
            assert_eq!(status, 200);
            assert!(body.contains("version=HTTP/2.0"), "{body}");
            conns.push(conn_of(&body));
        }
    }
    assert!(conns.iter().all(|c| *c == conns[0]), "one h2 connection while idle: {conns:?}");
    assert_eq!(accepted(), 1);

    // Under load (a request in flight on it), the second lane (the second client's) gets a
    // connection of its own, opened without holding up the request that found it busy.
    let (mut busy, mut lane1, mut lane0) = (clients.remove(0), clients.remove(0), clients.remove(0));
    let slow = tokio::spawn(async move { send(&mut busy, get("shared.test", "/slow", false)).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, body) = send(&mut lane1, get("shared.test", "/while-busy", false)).await;
    assert_eq!((status, conn_of(&body)), (200, conns[0].clone()), "served at once, on the busy lane's connection");
    let deadline = Instant::now() + Duration::from_secs(5);
    while accepted() < 2 {
        assert!(Instant::now() < deadline, "the second lane's connection was not opened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, body) = send(&mut lane1, get("shared.test", "/own", false)).await;
    let second = conn_of(&body);
    assert_ne!(second, conns[0], "the second lane moved to its own connection");
    for _ in 0..3 {
        let (_, body) = send(&mut lane0, get("shared.test", "/lane0", false)).await;
        assert_eq!(conn_of(&body), conns[0], "the first lane stays on the first connection");
        let (_, body) = send(&mut lane1, get("shared.test", "/lane1", false)).await;
        assert_eq!(conn_of(&body), second);
    }
    assert_eq!(slow.await.unwrap().0, 200);
    assert_eq!(accepted(), 2, "no more connections than lanes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_h2_connection_busy_with_kept_clients_is_not_swept_as_idle() {
    let pki = TestPki::new();
    let (chain, key) = pki.leaf(&LeafSpec::new(&["busy.test", "other.test"]));
    let origin = Origin::start("kept", chain, key, &["h2", "http/1.1"]).await;
    let options = ProxyOptions {
        ca_bundles: vec![pki.bundle()],
        resolve: vec![(s("busy.test:443"), origin.addr), (s("other.test:443"), origin.addr)],
        extra: "\n[limits]\nio_threads = 1\nupstream_idle_timeout_secs = 1\n".into(),
        ..Default::default()
    };
    let setup = Setup::new(&options);
    let proxy = setup.start();
    // A kept-alive client sends on its connection's h2 sender, never coming back to the pool,
    // for longer than the pool's idle timeout.
    let mut kept = h1_client(&proxy, &setup, "busy.test").await;
    let (_, body) = send(&mut kept, get("busy.test", "/0", false)).await;
    let shared = conn_of(&body);
    for i in 1..12 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (_, body) = send(&mut kept, get("busy.test", &format!("/{i}"), false)).await;
        assert_eq!(conn_of(&body), shared);
    }
    // Another host's new connection sweeps the pool; then a new client of the busy host is
    // given the busy connection, not a new one.
    let mut other = h1_client(&proxy, &setup, "other.test").await;
    assert_eq!(send(&mut other, get("other.test", "/", false)).await.0, 200);
    let mut newcomer = h1_client(&proxy, &setup, "busy.test").await;
    let (_, body) = send(&mut newcomer, get("busy.test", "/new", false)).await;
    assert_eq!(conn_of(&body), shared, "the busy connection stayed pooled");
    assert_eq!(origin.accepted.load(std::sync::atomic::Ordering::SeqCst), 2, "one connection per host");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_requests_free_their_place_on_the_shared_h2_connection() {
    let extra = "\n[limits]\nio_threads = 1\n";
    let (_pki, _origin, setup, proxy) = one_origin("abandon", &["abandon.test"], &["h2", "http/1.1"], extra).await;
    // An h2 client starts 80 slow requests (the origin waits 3 s) and goes away before any
    // is answered: more than an HTTP/1.1 client lets share the connection with (64).
    let tls = tls_via_sni(proxy.sni, "abandon.test", trusting_client(&setup.trust_ca, &["h2"])).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    let requests: Vec<_> = (0..80)
        .map(|i| {
            let mut sender = sender.clone();
            tokio::spawn(async move { sender.send_request(get("abandon.test", &format!("/slow-{i}"), true)).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    conn.abort();
    for request in requests {
        request.abort();
    }
    drop(sender);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Their places are free again: an HTTP/1.1 client's request shares the h2 connection.
    let mut client = h1_client(&proxy, &setup, "abandon.test").await;
    for path in ["/after", "/again"] {
        let (status, body) = send(&mut client, get("abandon.test", path, false)).await;
        assert_eq!(status, 200);
        assert!(body.contains("version=HTTP/2.0"), "abandoned requests still count as in flight: {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_cross_the_shared_h2_upstream_both_ways() {
    let (_pki, _origin, setup, proxy) = basic().await;
    // Larger than any flow-control window on the way: sent as the origin grants capacity.
    let upload = bytes::Bytes::from(vec![b'u'; 3 << 20]);
    for h2 in [false, true] {
        let alpn = if h2 { "h2" } else { "http/1.1" };
        let tls = tls_via_sni(proxy.sni, "origin.test", trusting_client(&setup.trust_ca, &[alpn])).await.unwrap();
        let mut post = get("origin.test", "/upload", h2);
        *post.method_mut() = hyper::Method::POST;
        *post.body_mut() = http_body_util::Full::new(upload.clone());
        let (status, _, body) = request(tls, h2, post).await;
        assert_eq!(status, 200);
        assert!(body.contains("version=HTTP/2.0") && body.contains(&format!("body={}", 3 << 20)), "h2={h2}: {body}");
    }
    // A chunked upload from an HTTP/1.1 client (no length known in advance).
    let mut tls = tls_via_sni(proxy.sni, "origin.test", trusting_client(&setup.trust_ca, &["http/1.1"])).await.unwrap();
    let mut raw =
        b"POST /chunked HTTP/1.1\r\nHost: origin.test\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            .to_vec();
    for chunk in [&b"hello "[..], b"chunked ", b"world"] {
        raw.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        raw.extend_from_slice(chunk);
        raw.extend_from_slice(b"\r\n");
    }
    raw.extend_from_slice(b"0\r\n\r\n");
    tls.write_all(&raw).await.unwrap();
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut response)).await;
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains("version=HTTP/2.0") && response.contains("body=19"), "{response}");
    // A 64 MiB download: the h2 stream's window is released as the client reads.
    let tls = tls_via_sni(proxy.sni, "origin.test", trusting_client(&setup.trust_ca, &["http/1.1"])).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    let mut sender = sender;
    let response = sender.send_request(get("origin.test", "/big", false)).await.unwrap();
    assert_eq!(response.headers()["content-length"], (64u64 << 20).to_string().as_str());
    let body = tokio::time::timeout(Duration::from_secs(30), http_body_util::BodyExt::collect(response.into_body()))
        .await
        .expect("the download finishes")
        .unwrap()
        .to_bytes();
    assert_eq!(body.len(), 64 << 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_bound_authentication_keeps_an_http11_client_on_its_own_connection() {
    // The origin speaks h2 too: the anonymous request may go over h2, but from the first
    // NTLM token on, the client's requests stay on one HTTP/1.1 connection of its own.
    let extra = "\n[limits]\nio_threads = 1\n";
    let (_pki, _origin, setup, proxy) = one_origin("ntlm2", &["iis.test"], &["h2", "http/1.1"], extra).await;
    let mut a = h1_client(&proxy, &setup, "iis.test").await;
    let (status, anonymous) = send(&mut a, get("iis.test", "/ntlm", false)).await;
    assert_eq!(status, 401);
    assert!(anonymous.contains("version=HTTP/2.0"), "{anonymous}");
    let with_token = |token: &str| {
        let mut req = get("iis.test", "/ntlm", false);
        req.headers_mut().insert("authorization", format!("NTLM {token}").parse().unwrap());
        req
    };
    let (_, negotiate) = send(&mut a, with_token("TlRMTVNTUAABAAAA")).await;
    let (_, authenticate) = send(&mut a, with_token("TlRMTVNTUAADAAAA")).await;
    let (_, after) = send(&mut a, get("iis.test", "/after", false)).await;
    for body in [&negotiate, &authenticate, &after] {
        assert!(body.contains("version=HTTP/1.1"), "{body}");
        assert_eq!(conn_of(body), conn_of(&negotiate), "the NTLM exchange and what follows share one connection");
    }
    let mut b = h1_client(&proxy, &setup, "iis.test").await;
    let (_, other) = send(&mut b, get("iis.test", "/b", false)).await;
    assert!(other.contains("version=HTTP/2.0"), "another client is not moved: {other}");
    drop(a);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut c = h1_client(&proxy, &setup, "iis.test").await;
    for path in ["/c", "/d"] {
        let (_, body) = send(&mut c, get("iis.test", path, false)).await;
        assert_ne!(conn_of(&body), conn_of(&negotiate), "an authenticated connection is never handed on: {body}");
    }
}

/// An origin that speaks h2 and HTTP/1.1 but refuses every h2 request with HTTP_1_1_REQUIRED
/// (as IIS does for Windows authentication); `h2_streams` counts the refusals.
async fn h1_required_origin(
    pki: &TestPki,
    host: &str,
) -> (std::net::SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let (chain, key) = pki.leaf(&LeafSpec::new(&[host]));
    let acceptor = tls_acceptor(chain, key, &["h2", "http/1.1"]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let h2_streams = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let refused = h2_streams.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, refused) = (acceptor.clone(), refused.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
                    let Ok(mut conn) = h2::server::handshake(tls).await else { return };
                    while let Some(Ok((_, mut respond))) = conn.accept().await {
                        refused.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        respond.send_reset(h2::Reason::HTTP_1_1_REQUIRED);
                    }
                    return;
                }
                let service = hyper::service::service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                    let text = format!("version={:?} path={}", req.version(), req.uri().path());
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(
                        bytes::Bytes::from(text),
                    )))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (addr, h2_streams)
}

/// tollgate in front of `h1_required_origin` serving `host`.
async fn proxy_to_h1_required_origin(
    host: &str,
) -> (TestPki, std::sync::Arc<std::sync::atomic::AtomicUsize>, Setup, Proxy) {
    let pki = TestPki::new();
    let (addr, h2_streams) = h1_required_origin(&pki, host).await;
    let options = ProxyOptions {
        ca_bundles: vec![pki.bundle()],
        resolve: vec![(format!("{host}:443"), addr)],
        ..Default::default()
    };
    let setup = Setup::new(&options);
    let proxy = setup.start();
    (pki, h2_streams, setup, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_requiring_http11_gets_it_from_http11_clients() {
    let (_pki, h2_streams, setup, proxy) = proxy_to_h1_required_origin("legacy.test").await;
    // The first request is refused over h2 and sent again over HTTP/1.1; the origin is
    // remembered, so later clients go straight to HTTP/1.1.
    for (i, path) in ["/first", "/second", "/third"].into_iter().enumerate() {
        let mut client = h1_client(&proxy, &setup, "legacy.test").await;
        let (status, body) = send(&mut client, get("legacy.test", path, false)).await;
        assert_eq!((status, body.as_str()), (200, format!("version=HTTP/1.1 path={path}").as_str()), "request {i}");
    }
    assert_eq!(h2_streams.load(std::sync::atomic::Ordering::SeqCst), 1, "h2 asked once, then remembered");
    proxy.wait_log("the origin remembered", |v| {
        v["message"].as_str().is_some_and(|m| m.contains("HTTP_1_1_REQUIRED")) && v["host"] == "legacy.test"
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_requiring_http11_has_h2_clients_retry_over_it() {
    let (_pki, h2_streams, setup, proxy) = proxy_to_h1_required_origin("legacy2.test").await;

    // An h2 client's stream is reset with the origin's reason, not answered 502.
    let tls =
        tls_via_sni(proxy.sni, "legacy2.test", trusting_client(&setup.trust_ca, &["h2", "http/1.1"])).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (sender, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(conn);
    let mut sender = sender.ready().await.unwrap();
    let req = hyper::Request::get("https://legacy2.test/h2").body(()).unwrap();
    let (response, _) = sender.send_request(req, true).unwrap();
    let error = response.await.expect_err("the stream is reset");
    assert_eq!(error.reason(), Some(h2::Reason::HTTP_1_1_REQUIRED), "{error}");
    let line =
        proxy.wait_log("the reset request's access line", |v| v["target"] == "tollgate::access" && v["path"] == "/h2");
    assert_eq!((line["status"].as_u64(), line["version"].as_str()), (Some(0), Some("HTTP/2.0")), "{line}");

    // curl, a real h2 client, takes the reset as browsers do: it asks again over HTTP/1.1 and
    // gets the origin's answer.
    let trust = setup.token.path("trust.pem");
    let explicit = format!("http://{}", proxy.explicit);
    let out = curl_for(
        20,
        &["--http2", "--proxy", &explicit, "--cacert", trust.to_str().unwrap(), "https://legacy2.test/curl"],
    )
    .await;
    assert_eq!(printed(&out), "version=HTTP/1.1 path=/curl", "{}", proxy.logs.lock().join("\n"));
    assert_eq!(h2_streams.load(std::sync::atomic::Ordering::SeqCst), 2, "each h2 request was asked over h2 once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_pool_is_bounded_across_hosts() {
    let (_pki, _origin, setup, proxy) =
        one_origin("crawl", &["*.crawl.test"], &["http/1.1"], "\n[limits]\nupstream_pool_max = 4\n").await;
    for i in 0..12 {
        let host = format!("site{i}.crawl.test");
        let mut client = h1_client(&proxy, &setup, &host).await;
        let (status, body) = send(&mut client, get(&host, "/", false)).await;
        assert_eq!(status, 200, "{body}");
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let pooled = proxy.metric("tollgate_upstream_pooled_connections").await;
    assert!((1..=4).contains(&pooled), "pool holds at most upstream_pool_max connections: {pooled}");
    // The origin's wildcard covers every host: one leaf, keyed by the upstream certificate,
    // serves them all for one signature (random subdomains cannot drive the HSM).
    assert_eq!(proxy.metric("tollgate_hsm_sign_total").await, 1, "one mint for the whole wildcard");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_share_leaves_off_every_host_gets_its_own_leaf() {
    let extra = "\n[mint]\nshare_leaves = false\n";
    let (_pki, _origin, setup, proxy) = one_origin("own", &["*.own.test"], &["http/1.1"], extra).await;
    for i in 0..3 {
        let host = format!("site{i}.own.test");
        let mut client = h1_client(&proxy, &setup, &host).await;
        assert_eq!(send(&mut client, get(&host, "/", false)).await.0, 200);
    }
    assert_eq!(proxy.metric("tollgate_hsm_sign_total").await, 3, "one mint per host name");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspection_rules_block_with_a_clear_page() {
    let rules = "\n[[policy.rule]]\nname = \"no admin\"\npath_prefix = \"/admin\"\naction = \"block\"\n\n\
                 [[policy.rule]]\nname = \"no uploads\"\nhost = \"*.test\"\nmethods = [\"POST\"]\naction = \"block\"\n";
    let (_pki, _origin, setup, proxy) = one_origin("rules", &["origin.test"], &["h2", "http/1.1"], rules).await;
    for h2 in [false, true] {
        let alpn = if h2 { "h2" } else { "http/1.1" };
        let tls = tls_via_sni(proxy.sni, "origin.test", trusting_client(&setup.trust_ca, &[alpn])).await.unwrap();
        let (status, headers, body) = request(tls, h2, get("origin.test", "/admin/a&b'c", h2)).await;
        assert_eq!(status, 403, "h2={h2}");
        assert_eq!(headers["tollgate-error"], "blocked-by-policy");
        assert!(headers["content-type"].to_str().unwrap().starts_with("text/html"));
        assert!(
            body.contains("no admin") && body.contains("a&amp;b&#39;c") && !body.contains("a&b'c"),
            "escaped: {body}"
        );
        let tls = tls_via_sni(proxy.sni, "origin.test", trusting_client(&setup.trust_ca, &[alpn])).await.unwrap();
        let (status, _, _) = request(tls, h2, get("origin.test", "/public", h2)).await;
        assert_eq!(status, 200);
    }
    let tls = tls_via_sni(proxy.sni, "origin.test", trusting_client(&setup.trust_ca, &["http/1.1"])).await.unwrap();
    let mut post = get("origin.test", "/upload", false);
    *post.method_mut() = hyper::Method::POST;
    let (status, _, body) = request(tls, false, post).await;
    assert_eq!(status, 403);
    assert!(body.contains("no uploads"));
    let line = proxy.wait_log("blocked access log", |v| v["message"] == "request" && v["status"] == 403);
    assert_eq!(line["host"], "origin.test");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_legs_prefer_aes128_unless_the_client_puts_chacha_first() {
    let (_pki, _origin, _setup, proxy) = basic().await;
    let chacha_first = "TLS_CHACHA20_POLY1305_SHA256:TLS_AES_256_GCM_SHA384:TLS_AES_128_GCM_SHA256";
    let cases: [(&[&str], &str); 5] = [
        // openssl lists AES-256 first out of habit; tollgate's order decides.
        (&[], "TLS_AES_128_GCM_SHA256"),
        // ChaCha20 first: a client without AES hardware; its order decides.
        (&["-ciphersuites", chacha_first], "TLS_CHACHA20_POLY1305_SHA256"),
        (&["-ciphersuites", "TLS_AES_256_GCM_SHA384"], "TLS_AES_256_GCM_SHA384"),
        (&["-tls1_2"], "ECDHE-ECDSA-AES128-GCM-SHA256"),
        (
            &["-tls1_2", "-cipher", "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-ECDSA-AES256-GCM-SHA384"],
            "ECDHE-ECDSA-CHACHA20-POLY1305",
        ),
    ];
    for (extra, want) in cases {
        assert_eq!(negotiated_cipher(proxy.sni, "origin.test", extra).await, want, "{extra:?}");
    }
}
