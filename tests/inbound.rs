//! SSL inbound inspection end to end: our servers' certificates with private keys on a SoftHSM2
//! token, every full handshake signed by the HSM, resumed ones by nobody; real clients (curl,
//! openssl s_client, h2load, rustls) and origins over validated TLS (pinned CA) or plain HTTP.

mod support;

use std::process::Command;
use std::time::Duration;

use support::*;

struct Site {
    host: &'static str,
    label: &'static str,
    rsa: bool,
}

struct Inbound {
    setup_token: Token,
    config: std::path::PathBuf,
    pki: TestPki,
    _origins: Vec<Origin>,
}

impl Inbound {
    /// A token holding a key per site, certificates from the test PKI imported with
    /// `--key-on-hsm --inbound`, an https origin (pinned CA) for ECDSA sites and a plain one
    /// for RSA sites.
    async fn new(sites: &[Site], extra: &str) -> Self {
        let token = Token::new();
        let pki = TestPki::new();
        let (chain, key) = pki.leaf(&LeafSpec::new(&["origin.internal"]));
        let tls_origin = Origin::start("tls-origin", chain, key, &["h2", "http/1.1"]).await;
        let plain_origin = Origin::start_plain("plain-origin").await;
        let mut inbound_sections = String::new();
        for site in sites {
            let origin = if site.rsa {
                format!("upstream = \"http://{}\"", plain_origin.addr)
            } else {
                format!(
                    "upstream = \"https://origin.internal:{}\"\nca_bundle = \"{}\"",
                    tls_origin.addr.port(),
                    pki.bundle().display()
                )
            };
            inbound_sections.push_str(&format!("\n[[inbound]]\nhost = \"{}\"\n{origin}\n", site.host));
        }
        let config = token.path("tollgate.toml");
        std::fs::write(
            &config,
            format!(
                "state_dir = \"{}\"\n\n[[hsm.server]]\nname = \"hsm-a\"\nmodule = \"{SOFTHSM_MODULE}\"\ntoken = \"{}\"\npin_file = \"{}\"\n\n\
                 [[listener]]\nmode = \"inbound\"\nlisten = \"127.0.0.1:0\"\n\n[management]\nlisten = \"127.0.0.1:0\"\n\n\
                 [resolve]\n\"origin.internal:{}\" = \"{}\"\n{extra}\n{inbound_sections}",
                token.path("state").display(),
                token.label,
                token.path("user.pin").display(),
                tls_origin.addr.port(),
                tls_origin.addr,
            ),
        )
        .unwrap();
        let this = Self { setup_token: token, config, pki, _origins: vec![tls_origin, plain_origin] };
        for site in sites {
            this.add_site(site);
        }
        this
    }

    /// Puts a key pair on the token (as a vendor tool would), certifies it, imports it.
    fn add_site(&self, site: &Site) {
        let key = if site.rsa {
            rcgen::KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048).unwrap()
        } else {
            rcgen::KeyPair::generate().unwrap()
        };
        let token = &self.setup_token;
        let id = format!("{:02x}", site.label.len() + if site.rsa { 0x40 } else { 0x10 });
        import_key(&[token], &key, site.label, &id);
        let pem = self.pki.certify(&key, &[site.host]);
        let cert = token.path(&format!("{}.pem", site.label));
        std::fs::write(&cert, pem).unwrap();
        let out = self.tollgate(&[
            "cert",
            "import",
            "--name",
            site.label,
            "--cert",
            cert.to_str().unwrap(),
            "--key-on-hsm",
            "--inbound",
            site.host,
        ]);
        assert!(out.status.success(), "import {}: {}", site.label, String::from_utf8_lossy(&out.stderr));
    }

    fn tollgate(&self, args: &[&str]) -> std::process::Output {
        self.setup_token.cmd(tollgate_bin()).args(args).arg("--config").arg(&self.config).output().unwrap()
    }

    fn start(&self) -> Proxy {
        Proxy::start_with(self.setup_token.cmd(tollgate_bin()), &self.config, 2)
    }
}

trait InboundAddr {
    fn inbound(&self) -> std::net::SocketAddr;
}

impl InboundAddr for Proxy {
    fn inbound(&self) -> std::net::SocketAddr {
        self.listener("inbound")
    }
}

async fn openssl_reconnect(
    addr: std::net::SocketAddr,
    host: &str,
    ca: &std::path::Path,
    version: &str,
    extra: Option<&str>,
) -> String {
    let out = tokio::process::Command::new("openssl")
        .args(["s_client", "-connect", &addr.to_string(), "-servername", host, "-reconnect", version])
        .args(["-CAfile", ca.to_str().unwrap()])
        .args(extra)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One TLS 1.3 connection with a request (so the ticket is read), with extra s_client options.
async fn openssl_session(addr: std::net::SocketAddr, ca: &std::path::Path, extra: &[&str]) -> String {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new("openssl")
        .args(["s_client", "-connect", &addr.to_string(), "-servername", "www.inbound.test", "-tls1_3", "-ign_eof"])
        .args(["-CAfile", ca.to_str().unwrap()])
        .args(extra)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"GET / HTTP/1.1\r\nHost: www.inbound.test\r\nConnection: close\r\n\r\n").await.unwrap();
    drop(stdin);
    let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output()).await.unwrap().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_handshakes_sign_on_the_hsm_and_resumed_ones_do_not() {
    let site = Site { host: "www.inbound.test", label: "www", rsa: false };
    let rule = "[[policy.rule]]\nname = \"no admin\"\npath_prefix = \"/admin\"\naction = \"block\"\n";
    let inbound = Inbound::new(&[site], rule).await;
    let proxy = inbound.start();
    let addr = proxy.inbound();
    let ca = inbound.pki.bundle();
    assert_eq!(proxy.metric("tollgate_hsm_sign_total").await, 0);

    // curl, HTTP/2 to tollgate, through to the pinned-CA TLS origin.
    let out = tokio::process::Command::new("curl")
        .args([
            "-sS",
            "--http2",
            "--cacert",
            ca.to_str().unwrap(),
            "--resolve",
            &format!("www.inbound.test:{}:127.0.0.1", addr.port()),
        ])
        .arg(format!("https://www.inbound.test:{}/hello", addr.port()))
        .output()
        .await
        .unwrap();
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        body.contains("origin=tls-origin path=/hello host=www.inbound.test"),
        "{body} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(proxy.metric("tollgate_hsm_sign_total").await, 1, "one full handshake, one HSM signature");

    // The client leg's suite: tollgate's order (AES-128 first) unless the client puts ChaCha20 first.
    assert_eq!(negotiated_cipher(addr, "www.inbound.test", &[]).await, "TLS_AES_128_GCM_SHA256");
    let chacha_first = ["-ciphersuites", "TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256"];
    assert_eq!(negotiated_cipher(addr, "www.inbound.test", &chacha_first).await, "TLS_CHACHA20_POLY1305_SHA256");

    // TLS 1.2, openssl -reconnect: one full handshake, five resumed, with tickets and with
    // session IDs alone (-no_ticket).
    for extra in [None, Some("-no_ticket")] {
        let before = proxy.metric("tollgate_hsm_sign_total").await;
        let text = openssl_reconnect(addr, "www.inbound.test", &ca, "-tls1_2", extra).await;
        assert_eq!(text.matches("Reused,").count(), 5, "{extra:?}: five resumed TLS 1.2 handshakes\n{text}");
        assert!(text.contains("Verify return code: 0 (ok)"));
        assert_eq!(
            proxy.metric("tollgate_hsm_sign_total").await - before,
            1,
            "{extra:?}: resumption makes no HSM operation"
        );
    }

    // TLS 1.3 tickets with openssl: a session saved after a request, then resumed 5 times
    // (-reconnect cannot: it drops the connection before reading the NewSessionTicket).
    let before = proxy.metric("tollgate_hsm_sign_total").await;
    let session = inbound.setup_token.path("tls13.session");
    let first = openssl_session(addr, &ca, &["-sess_out", session.to_str().unwrap()]).await;
    assert!(first.contains("New, TLSv1.3"), "{first}");
    for _ in 0..5 {
        let again = openssl_session(addr, &ca, &["-sess_in", session.to_str().unwrap()]).await;
        assert!(again.contains("Reused, TLSv1.3"), "{again}");
    }
    assert_eq!(proxy.metric("tollgate_hsm_sign_total").await - before, 1, "TLS 1.3 resumption makes no HSM operation");

    // A rustls client resuming: 10 connections, one signature.
    let before = proxy.metric("tollgate_hsm_sign_total").await;
    let config = trusting_client(&inbound.pki.root.der().clone(), &["http/1.1"]);
    for _ in 0..10 {
        let tls = tls_via_sni(addr, "www.inbound.test", config.clone()).await.unwrap();
        let (status, _, _) = request(tls, false, get("www.inbound.test", "/", false)).await;
        assert_eq!(status, 200);
    }
    assert_eq!(proxy.metric("tollgate_hsm_sign_total").await - before, 1);
    let line = proxy.wait_log("inbound access log", |v| v["message"] == "request" && v["mode"] == "inbound");
    assert_eq!(line["upstream"], "inbound");
    // Each session has its decryption log line: the client's side of it.
    let session =
        proxy.wait_log("inbound session", |v| v["target"] == "tollgate::decryption" && v["mode"] == "inbound");
    assert_eq!((session["decision"].as_str(), session["sni"].as_str()), (Some("decrypt"), Some("www.inbound.test")));
    assert!(session["client_tls_version"].as_str().is_some_and(|v| v.starts_with("TLSv1_")), "{session}");

    // Inspection rules apply on the inbound path too: the same relay.
    let tls = tls_via_sni(addr, "www.inbound.test", config.clone()).await.unwrap();
    let (status, headers, _) = request(tls, false, get("www.inbound.test", "/admin/panel", false)).await;
    assert_eq!((status, headers["tollgate-error"].to_str().unwrap()), (403, "blocked-by-policy"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsa_and_ecdsa_keys_serve_and_a_missing_key_only_takes_its_host_out() {
    let sites = [
        Site { host: "ec.inbound.test", label: "ec-site", rsa: false },
        Site { host: "rsa.inbound.test", label: "rsa-site", rsa: true },
        Site { host: "gone.inbound.test", label: "gone-site", rsa: false },
    ];
    let inbound = Inbound::new(&sites, "").await;
    // The key of one site disappears from the token.
    let out = inbound.setup_token.pkcs11_tool(&["--delete-object", "--type", "privkey", "--label", "gone-site"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let list: serde_json::Value =
        serde_json::from_slice(&inbound.tollgate(&["cert", "list", "--json"]).stdout).unwrap();
    let gone = list.as_array().unwrap().iter().find(|c| c["name"] == "gone-site").unwrap();
    assert_eq!(gone["key"], "error");
    assert!(gone["reason"].as_str().unwrap().contains("no private key"), "{gone}");
    for name in ["ec-site", "rsa-site"] {
        assert_eq!(list.as_array().unwrap().iter().find(|c| c["name"] == name).unwrap()["key"], "hsm");
    }

    let proxy = inbound.start();
    let addr = proxy.inbound();
    let ca = inbound.pki.root.der().clone();
    for (host, origin) in [("ec.inbound.test", "tls-origin"), ("rsa.inbound.test", "plain-origin")] {
        for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
            let mut config = rustls::ClientConfig::builder_with_protocol_versions(&[version])
                .with_root_certificates({
                    let mut roots = rustls::RootCertStore::empty();
                    roots.add(ca.clone()).unwrap();
                    roots
                })
                .with_no_client_auth();
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            let tls = tls_via_sni(addr, host, std::sync::Arc::new(config))
                .await
                .unwrap_or_else(|e| panic!("{host} {version:?}: {e}"));
            let (status, _, body) = request(tls, false, get(host, "/", false)).await;
            assert_eq!(status, 200);
            assert!(body.contains(&format!("origin={origin}")), "{body}");
        }
    }
    let err = tls_via_sni(addr, "gone.inbound.test", trusting_client(&ca, &[])).await.expect_err("its key is gone");
    let logs: Vec<_> = proxy.logs.lock().iter().filter(|l| l.contains("gone")).cloned().collect();
    assert!(err.to_string().to_lowercase().contains("alert"), "{err}: {logs:#?}");

    // No TLS 1.2 RSA key exchange, ever.
    let out = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &addr.to_string(),
            "-servername",
            "rsa.inbound.test",
            "-tls1_2",
            "-cipher",
            "AES128-GCM-SHA256",
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("Cipher is AES128-GCM-SHA256"),
        "RSA key exchange must be refused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2load_works_and_overload_sheds_without_deadlock() {
    let site = Site { host: "localhost", label: "local", rsa: false };
    let inbound = Inbound::new(&[site], "[limits]\nhsm_handshakes_max = 2\n").await;
    let proxy = inbound.start();
    let addr = proxy.inbound();
    let out = tokio::process::Command::new("h2load")
        .args(["-n", "200", "-c", "2", "-m", "4", &format!("https://localhost:{}/", addr.port())])
        .output()
        .await
        .expect("h2load (package nghttp2-client)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("200 succeeded, 0 failed"), "{text}");

    // 100 simultaneous full handshakes against a bound of 2 waiting on the HSM: some are shed,
    // none hangs, and the listener serves normally afterwards.
    let ca = inbound.pki.root.der().clone();
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let mut config = (*trusting_client(&ca, &["http/1.1"])).clone();
        config.resumption = rustls::client::Resumption::disabled();
        let config = std::sync::Arc::new(config);
        tasks.push(tokio::spawn(async move { tls_via_sni(addr, "localhost", config).await.is_ok() }));
    }
    let mut ok = 0;
    for task in tasks {
        if tokio::time::timeout(Duration::from_secs(20), task).await.expect("no handshake hangs").unwrap() {
            ok += 1;
        }
    }
    assert!(ok > 0, "some handshakes complete under overload");
    if ok < 100 {
        proxy.wait_log("shed log", |v| v["message"].as_str().is_some_and(|m| m.contains("handshake shed")));
    }
    let tls = tls_via_sni(addr, "localhost", trusting_client(&ca, &["http/1.1"])).await.unwrap();
    let (status, _, _) = request(tls, false, get("localhost", "/", false)).await;
    assert_eq!(status, 200, "serving normally after the burst");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http11_clients_reach_an_h2_origin_and_upgrade_over_http11() {
    let inbound = Inbound::new(&[Site { host: "ws.inbound.test", label: "ws-site", rsa: false }], "").await;
    let proxy = inbound.start();
    let ca = inbound.pki.root.der().clone();
    let connect = || tls_via_sni(proxy.inbound(), "ws.inbound.test", trusting_client(&ca, &["http/1.1"]));

    // Plain requests share the origin's h2 connection.
    let (status, _, body) = request(connect().await.unwrap(), false, get("ws.inbound.test", "/", false)).await;
    assert_eq!(status, 200);
    assert!(body.contains("version=HTTP/2.0"), "{body}");

    // An upgrade cannot ride h2: it gets an HTTP/1.1 connection of its own.
    let mut tls = connect().await.unwrap();
    websocket_echo(&mut tls, "ws.inbound.test", b"over the upgraded connection").await;
}
