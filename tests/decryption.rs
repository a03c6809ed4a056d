//! The decryption log: one `tollgate::decryption` line per client TLS session — decrypted,
//! tunnelled, blocked or failed — with both legs' TLS, the upstream certificate, the chain
//! status, where the leaf came from, and the stage that failed.

mod support;

use support::*;

fn session(proxy: &Proxy, what: &str, sni: &str, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    proxy.wait_log(what, |v| v["target"] == "tollgate::decryption" && v["sni"] == sni && pred(v))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_session_gets_a_line_saying_what_became_of_it() {
    let pki = TestPki::new();
    let (chain, key) = pki.leaf(&LeafSpec::new(&["origin.test", "exempt.test"]));
    let origin_leaf = chain[0].clone();
    let origin = Origin::start("logged", chain, key, &["h2", "http/1.1"]).await;
    let (chain, key) = pki.leaf(&LeafSpec { unknown_root: true, ..LeafSpec::new(&["stranger.test"]) });
    let stranger = Origin::start("stranger", chain, key, &["http/1.1"]).await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let options = ProxyOptions {
        ca_bundles: vec![pki.bundle()],
        resolve: vec![
            ("origin.test:443".into(), origin.addr),
            ("exempt.test:443".into(), origin.addr),
            ("stranger.test:443".into(), stranger.addr),
            ("gone.test:443".into(), closed),
        ],
        extra: "\n[upstream.on_error]\nuntrusted_issuer = \"block\"\n\n\
                [[decryption.rule]]\nname = \"exempt\"\nhosts = [\"exempt.test\"]\naction = \"no-decrypt\"\n"
            .into(),
        ..Default::default()
    };
    let setup = Setup::new(&options);
    let proxy = setup.start();

    // Decrypted, twice: the first session mints, the second finds the leaf cached.
    for _ in 0..2 {
        let tls = tls_via_sni(proxy.sni, "origin.test", trusting_client(&setup.trust_ca, &["h2"])).await.unwrap();
        let (status, _, _) = request(tls, true, get("origin.test", "/", true)).await;
        assert_eq!(status, 200);
    }
    let first = session(&proxy, "decrypted", "origin.test", |v| v["leaf"] == "minted");
    for (field, want) in [
        ("decision", "decrypt"),
        ("listener", "sni"),
        ("client_tls_version", "TLSv1_3"),
        ("client_alpn", "h2"),
        ("upstream_tls_version", "TLSv1_3"),
        ("upstream_alpn", "h2"),
        ("upstream_subject", "CN=origin.test"),
        ("upstream_issuer", "CN=tollgate test root"),
        ("upstream_root", "CN=tollgate test root"),
        ("chain_status", "trusted"),
        ("revocation", "unknown"),
        ("revocation_source", "none"),
    ] {
        assert_eq!(first[field], want, "{field}: {first}");
    }
    for field in ["client_cipher", "client_group", "upstream_cipher", "upstream_group", "upstream_serial"] {
        assert!(first[field].as_str().is_some_and(|v| !v.is_empty()), "{field}: {first}");
    }
    let sha256: String = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &origin_leaf)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(first["upstream_sha256"], sha256.as_str());
    assert!(first["upstream_not_before"].as_str().unwrap().ends_with('Z'), "{first}");
    assert!(first["hsm_sign_ms"].as_f64().is_some_and(|ms| ms > 0.0), "{first}");
    assert!(first.get("stage").is_none() && first.get("error").is_none(), "no failure: {first}");
    let second = session(&proxy, "cached", "origin.test", |v| v["leaf"] == "cached");
    assert!(second.get("hsm_sign_ms").is_none(), "{second}");

    // Tunnelled by a rule: the rule and the decision, no leaf.
    let root = pki.root_der();
    tls_via_sni(proxy.sni, "exempt.test", trusting_client(&root, &["http/1.1"])).await.unwrap();
    let tunnel = session(&proxy, "tunnelled", "exempt.test", |_| true);
    assert_eq!((tunnel["decision"].as_str(), tunnel["rule"].as_str()), (Some("no-decrypt"), Some("exempt")));
    assert_eq!(tunnel["leaf"], "none");

    // Blocked by [upstream.on_error]: the status, the stage, the certificate seen.
    assert!(tls_via_sni(proxy.sni, "stranger.test", trusting_client(&setup.trust_ca, &["http/1.1"])).await.is_err());
    let blocked = session(&proxy, "blocked", "stranger.test", |_| true);
    assert_eq!(blocked["decision"], "block", "{blocked}");
    assert_eq!(blocked["chain_status"], "untrusted_issuer", "{blocked}");
    assert_eq!(blocked["stage"], "validation", "{blocked}");
    assert_eq!(blocked["upstream_subject"], "CN=stranger.test", "{blocked}");
    assert_eq!(blocked["upstream_root"], "CN=unknown root", "{blocked}");

    // The upstream refuses the connection: an error at upstream_connect.
    assert!(tls_via_sni(proxy.sni, "gone.test", trusting_client(&setup.trust_ca, &["http/1.1"])).await.is_err());
    let gone = session(&proxy, "refused upstream", "gone.test", |_| true);
    assert_eq!((gone["decision"].as_str(), gone["stage"].as_str()), (Some("error"), Some("upstream_connect")));
    assert!(gone["error"].as_str().unwrap().contains("gone.test"), "{gone}");

    // The client refuses our certificate: an error at client_handshake, with the upstream's
    // side complete.
    assert!(tls_via_sni(proxy.sni, "origin.test", trusting_client(&root, &["http/1.1"])).await.is_err());
    let refused = session(&proxy, "client refusal", "origin.test", |v| v["decision"] == "error");
    assert_eq!(refused["stage"], "client_handshake", "{refused}");
    assert_eq!(refused["chain_status"], "trusted", "{refused}");
    assert!(refused["error"].as_str().unwrap().contains("alert"), "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_decryption_log_can_be_turned_off() {
    let pki = TestPki::new();
    let (chain, key) = pki.leaf(&LeafSpec::new(&["origin.test"]));
    let origin = Origin::start("quiet", chain, key, &["http/1.1"]).await;
    let options = ProxyOptions {
        ca_bundles: vec![pki.bundle()],
        resolve: vec![("origin.test:443".into(), origin.addr)],
        extra: "\n[log]\ndecryption = false\n".into(),
        ..Default::default()
    };
    let setup = Setup::new(&options);
    let proxy = setup.start();
    let tls = tls_via_sni(proxy.sni, "origin.test", trusting_client(&setup.trust_ca, &["http/1.1"])).await.unwrap();
    let (status, _, _) = request(tls, false, get("origin.test", "/quiet", false)).await;
    assert_eq!(status, 200);
    proxy.wait_log("the request", |v| v["path"] == "/quiet");
    assert!(!proxy.log_json().iter().any(|v| v["target"] == "tollgate::decryption"));
}

/// The bar, in one run: a revoked upstream, an expired one, one that asks for a client
/// certificate and a good one get, respectively, a TLS alert, a forward-untrust leaf, a tunnel
/// (the server's own certificate, listed by `tollgate bypass list`) and a trusted leaf — and
/// each session exactly one decryption line with its chain status and decision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_expired_client_auth_and_good_upstreams_side_by_side() {
    let dir = tempfile::tempdir().unwrap();
    // Revocation: a CA that revoked serial 2, its CRL served in-process.
    let (issuer, root_pem) = revoking_ca("bar test root");
    std::fs::write(dir.path().join("revoking.pem"), root_pem).unwrap();
    let (crl_addr, _) = crl_server(Some(crl_der(&issuer, &[2]))).await;
    let crl = format!("http://{crl_addr}/root.crl");
    let (chain, key) = leaf_with_crl(&issuer, "good.test", 1, Some(crl.clone()));
    let good = Origin::start("good", chain, key, &["http/1.1"]).await;
    let (chain, key) = leaf_with_crl(&issuer, "revoked.test", 2, Some(crl));
    let revoked = Origin::start("revoked", chain, key, &["http/1.1"]).await;
    // Expired: issued by a trusted root, but its validity ended yesterday.
    let pki = TestPki::new();
    let (chain, key) = pki.leaf(&LeafSpec { valid_days: (-30, -1), ..LeafSpec::new(&["expired.test"]) });
    let expired = Origin::start("expired", chain, key, &["http/1.1"]).await;
    // Client authentication: openssl s_server insisting on a client certificate.
    let (cert, key) = pki.leaf_files(&LeafSpec::new(&["clientauth.test"]), dir.path());
    let port = free_port();
    let mut clientauth = spawn_quiet(
        std::process::Command::new("openssl")
            .args(["s_server", "-www", "-Verify", "1", "-accept", &format!("127.0.0.1:{port}"), "-cert"])
            .arg(&cert)
            .arg("-key")
            .arg(&key),
    );
    let clientauth_addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    wait_for("openssl s_server", std::time::Duration::from_secs(10), || {
        std::net::TcpStream::connect(clientauth_addr).is_ok()
    });

    let options = ProxyOptions {
        ca_bundles: vec![dir.path().join("revoking.pem"), pki.bundle()],
        resolve: vec![
            ("good.test:443".into(), good.addr),
            ("revoked.test:443".into(), revoked.addr),
            ("expired.test:443".into(), expired.addr),
            ("clientauth.test:443".into(), clientauth_addr),
        ],
        ..Default::default()
    };
    let setup = Setup::new(&options);
    let proxy = setup.start();
    let root_subject = |der: &[u8]| parse(der).issuer().to_string();

    // Revoked: a TLS alert before any certificate.
    let (config, seen) = capturing_client(&["http/1.1"]);
    assert!(tls_via_sni(proxy.sni, "revoked.test", config).await.is_err(), "the revoked upstream was served");
    assert!(seen.lock().is_empty(), "a certificate was shown for the revoked upstream");

    // Expired: a leaf from the forward-untrust CA, which the trusting client refuses.
    let (config, seen) = capturing_client(&["http/1.1"]);
    tls_via_sni(proxy.sni, "expired.test", config).await.expect("the expired upstream is served, untrusted");
    assert_eq!(root_subject(&seen.lock()[0]), parse(&setup.untrust_ca).subject().to_string());

    // Client certificate requested: the client reaches the server itself (its own certificate).
    let (config, seen) = capturing_client(&["http/1.1"]);
    let _ = tls_via_sni(proxy.sni, "clientauth.test", config).await;
    let shown = seen.lock().first().cloned().expect("a certificate was shown for clientauth.test");
    assert_eq!(shown, pem_cert(&cert), "the client must see the server's own certificate");

    // Good: a trusted leaf, and the request answered.
    let tls = tls_via_sni(proxy.sni, "good.test", trusting_client(&setup.trust_ca, &["http/1.1"])).await.unwrap();
    let (status, _, _) = request(tls, false, get("good.test", "/", false)).await;
    assert_eq!(status, 200);

    for (sni, decision, chain_status) in [
        ("revoked.test", "block", "revoked"),
        ("expired.test", "decrypt", "expired"),
        ("clientauth.test", "tunnel-learned", "unsupported"),
        ("good.test", "decrypt", "trusted"),
    ] {
        let line = session(&proxy, sni, sni, |_| true);
        assert_eq!(
            (line["decision"].as_str(), line["chain_status"].as_str()),
            (Some(decision), Some(chain_status)),
            "{line}"
        );
        let lines =
            proxy.log_json().into_iter().filter(|v| v["target"] == "tollgate::decryption" && v["sni"] == sni).count();
        assert_eq!(lines, 1, "{sni}: one session, one decryption line");
    }

    // The tunnelled host is in `tollgate bypass list`, with the reason.
    let list = bypass_list(&setup, &proxy);
    let entry = list.iter().find(|e| e["host"] == "clientauth.test").expect("clientauth.test listed");
    assert!(entry["reason"].as_str().unwrap().contains("client certificate"), "{entry}");
    let _ = clientauth.kill();
    let _ = clientauth.wait();
}

/// `tollgate bypass list --json`, through the management API.
fn bypass_list(setup: &Setup, proxy: &Proxy) -> Vec<serde_json::Value> {
    let cli_config = setup.token.path("cli.toml");
    config_for_cli(&setup.config, proxy.management, &cli_config);
    let out = setup
        .token
        .cmd(tollgate_bin())
        .args(["bypass", "list", "--json"])
        .arg("--config")
        .arg(&cli_config)
        .output()
        .unwrap();
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", printed(&out)));
    list.as_array().cloned().unwrap_or_default()
}

/// `[[upstream.client_cert]]`: a server insisting on a client certificate gets tollgate's own
/// (its key on the HSM), and the session is decrypted instead of tunnelled; a host the entry
/// does not name is still tunnelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_client_certificate_is_presented_instead_of_tunnelling() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new();
    let (cert, key) = pki.leaf_files(&LeafSpec::new(&["clientauth.test", "other-clientauth.test"]), dir.path());
    // The server checks the client certificate against the test root, and refuses a bad one.
    let port = free_port();
    let mut server = spawn_quiet(
        std::process::Command::new("openssl")
            .args(["s_server", "-www", "-Verify", "1", "-verify_return_error", "-accept", &format!("127.0.0.1:{port}")])
            .arg("-CAfile")
            .arg(pki.bundle())
            .arg("-cert")
            .arg(&cert)
            .arg("-key")
            .arg(&key),
    );
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    wait_for("openssl s_server", std::time::Duration::from_secs(10), || std::net::TcpStream::connect(addr).is_ok());

    let options = ProxyOptions {
        ca_bundles: vec![pki.bundle()],
        resolve: vec![("clientauth.test:443".into(), addr), ("other-clientauth.test:443".into(), addr)],
        extra: "\n[[upstream.client_cert]]\nhosts = [\"clientauth.test\"]\ncert = \"gateway-client\"\n".into(),
        ..Default::default()
    };
    let setup = Setup::new(&options);
    // The client key is made on the token (as a vendor tool would); only its certificate is
    // imported.
    let client_key = rcgen::KeyPair::generate().unwrap();
    import_key(&[&setup.token], &client_key, "gateway-client", "c1");
    let client_pem = setup.token.path("gateway-client.pem");
    std::fs::write(&client_pem, pki.certify_client(&client_key, "gateway-client.test")).unwrap();
    let out = setup
        .token
        .cmd(tollgate_bin())
        .args(["cert", "import", "--name", "gateway-client", "--key-on-hsm", "--cert"])
        .arg(&client_pem)
        .arg("--config")
        .arg(&setup.config)
        .output()
        .unwrap();
    assert!(out.status.success(), "import: {}", printed(&out));
    let proxy = setup.start();

    // Named by the entry: a trusted leaf, and the server's page shows tollgate's certificate.
    let tls = tls_via_sni(proxy.sni, "clientauth.test", trusting_client(&setup.trust_ca, &["http/1.1"])).await.unwrap();
    let (status, _, body) = request(tls, false, get("clientauth.test", "/", false)).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("Client certificate") && body.contains("gateway-client.test"), "{body}");
    let line = session(&proxy, "clientauth.test", "clientauth.test", |_| true);
    assert_eq!(
        (line["decision"].as_str(), line["chain_status"].as_str(), line["upstream_client_cert"].as_str()),
        (Some("decrypt"), Some("trusted"), Some("gateway-client")),
        "{line}"
    );

    // Not named: tunnelled as before, the client sees the server's own certificate.
    let (config, seen) = capturing_client(&["http/1.1"]);
    let _ = tls_via_sni(proxy.sni, "other-clientauth.test", config).await;
    let shown = seen.lock().first().cloned().expect("a certificate was shown for other-clientauth.test");
    assert_eq!(shown, pem_cert(&cert), "the client must see the server's own certificate");
    assert!(bypass_list(&setup, &proxy).iter().any(|e| e["host"] == "other-clientauth.test"), "learned as a tunnel");

    // An entry naming it from the next reload on: the learned tunnel is forgotten, and the
    // host is decrypted with tollgate's certificate.
    let text = std::fs::read_to_string(&setup.config).unwrap();
    let named = "hosts = [\"clientauth.test\", \"other-clientauth.test\"]";
    std::fs::write(&setup.config, text.replace("hosts = [\"clientauth.test\"]", named)).unwrap();
    proxy.signal("-HUP");
    proxy.wait_log("the reload forgetting the learned tunnel", |v| {
        v["message"].as_str().is_some_and(|m| m.contains("intercepted again"))
            && v["hosts"].as_str().is_some_and(|h| h.contains("other-clientauth.test"))
    });
    assert!(bypass_list(&setup, &proxy).iter().all(|e| e["host"] != "other-clientauth.test"), "forgotten");
    let tls =
        tls_via_sni(proxy.sni, "other-clientauth.test", trusting_client(&setup.trust_ca, &["http/1.1"])).await.unwrap();
    let (status, _, body) = request(tls, false, get("other-clientauth.test", "/", false)).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("gateway-client.test"), "{body}");
    let _ = server.kill();
    let _ = server.wait();
}
