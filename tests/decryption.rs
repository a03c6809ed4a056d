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
