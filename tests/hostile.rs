//! Hostile servers: upstream certificates that must never be trusted, and upstreams that stall.
//! Each bad certificate comes out as a forward-untrust leaf (or a refused connection), never a
//! leaf a client trusting the forward-trust CA accepts; with `untrusted = "block"` no leaf at
//! all. Stalls are cut by the connect and read deadlines.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use support::*;

/// A root the proxy trusts (its PEM in `bundle`), able to issue chains of any shape.
struct Root {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    key_pem: String,
}

impl Root {
    fn new() -> Self {
        let key = KeyPair::generate().unwrap();
        let params = ca_params("hostile test root");
        let cert_pem = params.self_signed(&key).unwrap().pem();
        let key_pem = key.serialize_pem();
        Self { issuer: Issuer::new(params, key), cert_pem, key_pem }
    }

    /// A leaf for `sans` issued through `depth` intermediates: (chain leaf first, key).
    fn chain(&self, sans: Vec<SanType>, depth: usize) -> (Vec<CertificateDer<'static>>, KeyPair) {
        let mut issuers: Vec<Issuer<'static, KeyPair>> = Vec::new();
        let mut certs = Vec::new();
        for i in 0..depth {
            let key = KeyPair::generate().unwrap();
            let params = ca_params(&format!("intermediate {i}"));
            let cert = params.signed_by(&key, issuers.last().unwrap_or(&self.issuer)).unwrap();
            certs.push(cert.der().clone());
            issuers.push(Issuer::new(params, key));
        }
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, "hostile leaf");
        params.subject_alt_names = sans;
        let key = KeyPair::generate().unwrap();
        let leaf = params.signed_by(&key, issuers.last().unwrap_or(&self.issuer)).unwrap();
        certs.insert(0, leaf.der().clone());
        certs[1..].reverse();
        (certs, key)
    }
}

fn ca_params(cn: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

fn dns(name: &str) -> Vec<SanType> {
    vec![SanType::DnsName(name.try_into().unwrap())]
}

/// A leaf made by openssl and signed by the root: `key_args` make the key, `digest` signs.
fn openssl_leaf(root: &Root, dir: &Path, name: &str, key_args: &[&str], digest: &str) -> (String, String) {
    std::fs::write(dir.join("root.pem"), &root.cert_pem).unwrap();
    std::fs::write(dir.join("root.key"), &root.key_pem).unwrap();
    let key = format!("{name}.key");
    let mut args = key_args.to_vec();
    args.extend(["-out", &key]);
    openssl(dir, &args);
    let csr = format!("{name}.csr");
    let subj = format!("/CN={name}");
    openssl(dir, &["req", "-new", "-key", &key, "-subj", &subj, "-out", &csr]);
    std::fs::write(dir.join(format!("{name}.ext")), format!("subjectAltName=DNS:{name}\n")).unwrap();
    let cert = format!("{name}.pem");
    let ext = format!("{name}.ext");
    let sign = [
        "x509", "-req", "-in", &csr, "-CA", "root.pem", "-CAkey", "root.key", "-days", "30", digest, "-extfile", &ext,
        "-out", &cert,
    ];
    openssl(dir, &sign);
    (dir.join(cert).display().to_string(), dir.join(key).display().to_string())
}

/// `openssl s_server` serving `cert`/`key` (for keys rustls refuses to serve, like RSA-1024).
struct SServer {
    child: std::process::Child,
    addr: SocketAddr,
}

impl SServer {
    fn start(cert: &str, key: &str) -> Self {
        Self::start_with(cert, key, &["-cipher", "DEFAULT@SECLEVEL=0"])
    }

    /// With `args` for s_server (protocol versions, ciphers, client authentication).
    fn start_with(cert: &str, key: &str, args: &[&str]) -> Self {
        let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let child = std::process::Command::new("openssl")
            .args(["s_server", "-quiet", "-www", "-accept", &addr.to_string(), "-cert", cert, "-key", key])
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "s_server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child, addr }
    }
}

impl Drop for SServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How a stalling upstream misbehaves.
#[derive(Clone, Copy)]
enum Stall {
    /// Accepts TCP and never answers the ClientHello.
    Handshake,
    /// Completes TLS, reads the request, never answers.
    Headers,
    /// Sends headers promising 1000 bytes, 10 of them, then nothing.
    Body,
}

/// A stalling upstream; `tls` serves the TLS leaf for the other two kinds.
async fn stalling(kind: Stall, tls: tokio_rustls::TlsAcceptor) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { continue };
            let tls = tls.clone();
            tokio::spawn(async move {
                if let Stall::Handshake = kind {
                    tokio::time::sleep(Duration::from_secs(120)).await;
                    drop(tcp);
                    return;
                }
                let Ok(mut stream) = tls.accept(tcp).await else { return };
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if stream.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                if let Stall::Body = kind {
                    let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789").await;
                    let _ = stream.flush().await;
                }
                tokio::time::sleep(Duration::from_secs(120)).await;
            });
        }
    });
    (addr, task)
}

fn acceptor(chain: Vec<CertificateDer<'static>>, key: &KeyPair) -> tokio_rustls::TlsAcceptor {
    let key = PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).unwrap();
    tls_acceptor(chain, key, &[])
}

/// Every bad upstream, by host name, and what keeps them running.
struct BadUpstreams {
    hosts: Vec<(&'static str, SocketAddr)>,
    bundle: std::path::PathBuf,
    _origins: Vec<Origin>,
    _sserver: SServer,
    _dir: tempfile::TempDir,
}

async fn bad_upstreams() -> BadUpstreams {
    require(&["openssl"]);
    let dir = tempfile::tempdir().unwrap();
    let root = Root::new();
    let bundle = dir.path().join("bundle.pem");
    std::fs::write(&bundle, &root.cert_pem).unwrap();
    let mut hosts = Vec::new();
    let mut origins = Vec::new();
    let rustls_origin = |chain: Vec<CertificateDer<'static>>, key: KeyPair| async move {
        let key = PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).unwrap();
        Origin::start("bad", chain, key, &["http/1.1"]).await
    };

    // Not yet valid.
    let mut params = CertificateParams::default();
    params.subject_alt_names = dns("notyet.test");
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now + time::Duration::days(1);
    params.not_after = now + time::Duration::days(30);
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &root.issuer).unwrap();
    origins.push(rustls_origin(vec![cert.der().clone()], key).await);
    hosts.push(("notyet.test", origins.last().unwrap().addr));

    // Incomplete chain: issued by an intermediate the server does not send.
    let (chain, key) = root.chain(dns("incomplete.test"), 1);
    origins.push(rustls_origin(vec![chain[0].clone()], key).await);
    hosts.push(("incomplete.test", origins.last().unwrap().addr));

    // An overlong chain: eight intermediates, all sent.
    let (chain, key) = root.chain(dns("deep.test"), 8);
    origins.push(rustls_origin(chain, key).await);
    hosts.push(("deep.test", origins.last().unwrap().addr));

    // Only an IP SAN: not a certificate for the name asked for.
    let (chain, key) = root.chain(vec![SanType::IpAddress("127.0.0.1".parse().unwrap())], 0);
    origins.push(rustls_origin(chain, key).await);
    hosts.push(("ipsan.test", origins.last().unwrap().addr));

    // Signed with SHA-1 (ECDSA key, so rustls can still serve it).
    let (cert, key) =
        openssl_leaf(&root, dir.path(), "sha1.test", &["ecparam", "-name", "prime256v1", "-genkey", "-noout"], "-sha1");
    let chain = vec![pem_cert(Path::new(&cert))];
    let key = PrivateKeyDer::from_pem_file(&key).unwrap();
    origins.push(Origin::start("sha1", chain, key, &["http/1.1"]).await);
    hosts.push(("sha1.test", origins.last().unwrap().addr));

    // RSA-1024: served by openssl, since rustls will not sign with such a key.
    let (cert, key) = openssl_leaf(
        &root,
        dir.path(),
        "weakkey.test",
        &["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:1024"],
        "-sha256",
    );
    let sserver = SServer::start(&cert, &key);
    hosts.push(("weakkey.test", sserver.addr));

    BadUpstreams { hosts, bundle, _origins: origins, _sserver: sserver, _dir: dir }
}

/// A proxy with policy `untrusted` in front of `bad`, with short deadlines.
fn proxy_for(bad: &BadUpstreams, untrusted: &'static str, more: &[(&str, SocketAddr)]) -> (Setup, Proxy) {
    proxy_with(bad, untrusted, more, "")
}

/// `proxy_for` with more configuration (`[upstream.on_error]`).
fn proxy_with(bad: &BadUpstreams, untrusted: &'static str, more: &[(&str, SocketAddr)], extra: &str) -> (Setup, Proxy) {
    proxy_upstream(bad, untrusted, more, extra, "")
}

/// `proxy_with`, and `upstream` lines in `[upstream]`.
fn proxy_upstream(
    bad: &BadUpstreams,
    untrusted: &'static str,
    more: &[(&str, SocketAddr)],
    extra: &str,
    upstream: &str,
) -> (Setup, Proxy) {
    let mut resolve: Vec<_> = bad.hosts.iter().map(|(h, a)| (format!("{h}:443"), *a)).collect();
    resolve.extend(more.iter().map(|(h, a)| (format!("{h}:443"), *a)));
    let setup = Setup::new(&ProxyOptions {
        untrusted,
        ca_bundles: vec![bad.bundle.clone()],
        resolve,
        extra: format!("\n[limits]\nconnect_timeout_secs = 2\nupstream_read_timeout_secs = 2\n{extra}"),
        upstream: upstream.into(),
        ..Default::default()
    });
    let proxy = setup.start();
    (setup, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_upstream_certificates_are_never_trusted() {
    let bad = bad_upstreams().await;
    let (setup, proxy) = proxy_for(&bad, "forward-untrust", &[]);
    let untrust = parse(&setup.untrust_ca);
    let mut outcomes = Vec::new();
    for (host, _) in &bad.hosts {
        let strict = trusting_client(&setup.trust_ca, &["http/1.1"]);
        assert!(tls_via_sni(proxy.sni, host, strict).await.is_err(), "{host}: a client trusting the CA must refuse it");
        let (config, seen) = capturing_client(&["http/1.1"]);
        match tls_via_sni(proxy.sni, host, config).await {
            Ok(_) => {
                let leaf = seen.lock()[0].clone();
                assert_eq!(parse(&leaf).issuer(), untrust.subject(), "{host}: only ever the forward-untrust CA");
                outcomes.push(format!("{host}: forward-untrust"));
            }
            Err(e) => {
                assert!(seen.lock().is_empty(), "{host}: refused before any certificate");
                outcomes.push(format!("{host}: refused ({e})"));
            }
        }
    }
    // Clients refusing forward-untrust leaves is the point of them: no bypass is learned, or
    // the next connection would get the bad upstream's own certificate passed through.
    let learned = http_get(proxy.management, "/api/v1/bypass").await;
    assert_eq!(learned.trim(), "[]", "no host excluded from decryption: {learned}");
    // The certificate problems rustls can see and still finish the handshake: untrust leaves.
    for host in ["notyet.test", "incomplete.test", "deep.test", "ipsan.test", "sha1.test"] {
        assert!(outcomes.contains(&format!("{host}: forward-untrust")), "{outcomes:#?}");
    }
    assert!(outcomes.iter().any(|o| o.starts_with("weakkey.test: refused")), "{outcomes:#?}");
    proxy.wait_log("the weak key's error", |v| v["error"].as_str().is_some_and(|e| e.contains("weakkey.test")));

    // With the block policy, none of them gets a certificate at all.
    let (_setup, proxy) = proxy_for(&bad, "block", &[]);
    for (host, _) in &bad.hosts {
        let (config, seen) = capturing_client(&["http/1.1"]);
        assert!(tls_via_sni(proxy.sni, host, config).await.is_err(), "{host}: blocked");
        assert!(seen.lock().is_empty(), "{host}: no certificate presented");
    }
}

/// What a client that trusts nothing sees for `host`: `untrust` (a forward-untrust leaf) or
/// `refused` (no certificate at all).
async fn outcome(proxy: &Proxy, setup: &Setup, host: &str) -> &'static str {
    let (config, seen) = capturing_client(&["http/1.1"]);
    match tls_via_sni(proxy.sni, host, config).await {
        Ok(_) => {
            assert_eq!(parse(&seen.lock()[0]).issuer(), parse(&setup.untrust_ca).subject(), "{host}");
            "untrust"
        }
        Err(_) => {
            assert!(seen.lock().is_empty(), "{host}: refused before any certificate");
            "refused"
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_kind_of_failure_takes_its_own_action() {
    let bad = bad_upstreams().await;
    let on_error = "\n[upstream.on_error]\nnot_yet_valid = \"block\"\nweak = \"block\"\n";
    let (setup, proxy) = proxy_with(&bad, "forward-untrust", &[], on_error);
    for (host, want, code) in [
        ("notyet.test", "refused", "not_yet_valid"),
        ("sha1.test", "refused", "weak"),
        ("ipsan.test", "untrust", "name_mismatch"),
        ("incomplete.test", "untrust", "untrusted_issuer"),
    ] {
        assert_eq!(outcome(&proxy, &setup, host).await, want, "{host}");
        if want == "refused" {
            let line = proxy.wait_log(host, |v| v["error"].as_str().is_some_and(|e| e.contains(host)));
            assert!(line["error"].as_str().unwrap().contains(&format!("untrusted: {code} (")), "{line}");
        }
    }
    // The other way round: everything blocked but a name mismatch.
    let on_error = "\n[upstream.on_error]\nname_mismatch = \"untrust\"\n";
    let (setup, proxy) = proxy_with(&bad, "block", &[], on_error);
    for (host, want) in [("ipsan.test", "untrust"), ("notyet.test", "refused"), ("incomplete.test", "refused")] {
        assert_eq!(outcome(&proxy, &setup, host).await, want, "{host}");
    }
}

/// `openssl s_client` through the sni listener to `host` with `args`: its output, whether the
/// handshake completed or not.
async fn s_client(proxy: &Proxy, host: &str, args: &[&str]) -> String {
    let connect = proxy.sni.to_string();
    let mut base = vec!["s_client", "-connect", connect.as_str(), "-servername", host, "-ign_eof"];
    base.extend(args);
    let mut child = tokio::process::Command::new("openssl")
        .args(&base)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    drop(stdin);
    let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output()).await.unwrap().unwrap();
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstreams_that_cannot_be_intercepted_are_tunnelled_and_remembered_or_blocked() {
    let mut bad = bad_upstreams().await;
    let dir = bad._dir.path().to_path_buf();
    let root = Root::new();
    std::fs::write(&bad.bundle, &root.cert_pem).unwrap();
    let ec = ["ecparam", "-name", "prime256v1", "-genkey", "-noout"];
    let rsa = ["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"];
    let (cert, key) = openssl_leaf(&root, &dir, "clientauth.test", &ec, "-sha256");
    let clientauth = SServer::start_with(&cert, &key, &["-Verify", "1"]);
    let (cert, key) = openssl_leaf(&root, &dir, "old.test", &ec, "-sha256");
    let old = SServer::start_with(&cert, &key, &["-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"]);
    let (cert, key) = openssl_leaf(&root, &dir, "nocipher.test", &rsa, "-sha256");
    let nocipher = SServer::start_with(&cert, &key, &["-tls1_2", "-cipher", "AES128-SHA"]);
    bad.hosts = vec![("clientauth.test", clientauth.addr), ("old.test", old.addr), ("nocipher.test", nocipher.addr)];

    let (_setup, proxy) = proxy_for(&bad, "forward-untrust", &[]);
    // Tunnelled: each client reaches the server itself, with what it can speak.
    let out = s_client(&proxy, "old.test", &["-cipher", "DEFAULT@SECLEVEL=0"]).await;
    assert!(
        out.contains("TLSv1.1") && out.contains("i:CN = hostile test root"),
        "{out}{}",
        proxy.logs.lock().join("\n")
    );
    let out = s_client(&proxy, "nocipher.test", &["-tls1_2", "-cipher", "AES128-SHA"]).await;
    assert!(out.contains("AES128-SHA") && out.contains("i:CN = hostile test root"), "{out}");
    let out = s_client(&proxy, "clientauth.test", &[]).await;
    assert!(out.contains("i:CN = hostile test root"), "the server's own certificate: {out}");
    for (host, why) in [
        ("old.test", "older than 1.2"),
        ("nocipher.test", "no cipher suite"),
        ("clientauth.test", "client certificate"),
    ] {
        let line = proxy.wait_log(host, |v| v["target"] == "tollgate::decryption" && v["sni"] == host);
        assert_eq!(
            (line["decision"].as_str(), line["chain_status"].as_str()),
            (Some("tunnel-learned"), Some("unsupported"))
        );
        assert!(line["chain_detail"].as_str().unwrap().contains(why), "{line}");
    }
    // Remembered, with the reason and an expiry: the next connection skips the attempt.
    let learned: serde_json::Value = serde_json::from_str(&http_get(proxy.management, "/api/v1/bypass").await).unwrap();
    let old_entry = learned.as_array().unwrap().iter().find(|e| e["host"] == "old.test").expect("old.test remembered");
    assert!(old_entry["reason"].as_str().unwrap().starts_with("unsupported: "), "{old_entry}");
    assert!(old_entry["expires"].as_str().is_some_and(|e| !e.is_empty()));
    s_client(&proxy, "old.test", &["-cipher", "DEFAULT@SECLEVEL=0"]).await;
    proxy.wait_log("the remembered host", |v| v["sni"] == "old.test" && v["rule"] == "learned bypass");

    // Blocked: an alert, no tunnel, the reason in the log.
    let (_setup, proxy) = proxy_upstream(&bad, "forward-untrust", &[], "", "unsupported = \"block\"\n");
    let out = s_client(&proxy, "old.test", &["-cipher", "DEFAULT@SECLEVEL=0"]).await;
    assert!(!out.contains("i:CN = hostile test root"), "{out}");
    let line = proxy.wait_log("blocked", |v| v["target"] == "tollgate::decryption" && v["sni"] == "old.test");
    assert_eq!((line["decision"].as_str(), line["stage"].as_str()), (Some("block"), Some("upstream_handshake")));
    assert!(http_get(proxy.management, "/api/v1/bypass").await.trim() == "[]", "nothing remembered when blocking");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalling_upstreams_are_timed_out_and_the_proxy_keeps_serving() {
    let bad = bad_upstreams().await;
    // Stalling upstreams need certificates the proxy trusts, so only the stall is at fault.
    let root = Root::new();
    let bundle = bad._dir.path().join("bundle.pem");
    let mut pem = std::fs::read_to_string(&bundle).unwrap();
    pem.push_str(&root.cert_pem);
    std::fs::write(&bundle, pem).unwrap();
    let mut stalls = Vec::new();
    let mut more = Vec::new();
    for (host, kind) in [
        ("stall-handshake.test", Stall::Handshake),
        ("stall-headers.test", Stall::Headers),
        ("stall-body.test", Stall::Body),
    ] {
        let (chain, key) = root.chain(dns(host), 0);
        let (addr, task) = stalling(kind, acceptor(chain, &key)).await;
        stalls.push(task);
        more.push((host, addr));
    }
    let (good_chain, good_key) = root.chain(dns("good.test"), 0);
    let good = Origin::start(
        "good",
        good_chain,
        PrivateKeyDer::from_pem_slice(good_key.serialize_pem().as_bytes()).unwrap(),
        &["http/1.1"],
    )
    .await;
    more.push(("good.test", good.addr));
    let (setup, proxy) = proxy_for(&bad, "forward-untrust", &more);
    let client = || trusting_client(&setup.trust_ca, &["http/1.1"]);

    // Mid-handshake: the connect deadline (2 s) answers the client with an alert.
    let started = Instant::now();
    assert!(tls_via_sni(proxy.sni, "stall-handshake.test", client()).await.is_err());
    let took = started.elapsed();
    assert!(took >= Duration::from_secs(2) && took < Duration::from_secs(6), "handshake stall cut after {took:?}");

    // Before the response headers: 502 once the read deadline (2 s) passes.
    let started = Instant::now();
    let tls = tls_via_sni(proxy.sni, "stall-headers.test", client()).await.unwrap();
    let (status, headers, _) = request(tls, false, get("stall-headers.test", "/", false)).await;
    let took = started.elapsed();
    assert_eq!(status, 502);
    assert!(headers.get("tollgate-error").is_some());
    assert!(took >= Duration::from_secs(2) && took < Duration::from_secs(6), "header stall cut after {took:?}");

    // Mid-body: the response is aborted, never completed with made-up bytes.
    let started = Instant::now();
    let mut tls = tls_via_sni(proxy.sni, "stall-body.test", client()).await.unwrap();
    tls.write_all(b"GET / HTTP/1.1\r\nHost: stall-body.test\r\n\r\n").await.unwrap();
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut got)).await;
    let took = started.elapsed();
    assert!(read.is_ok(), "the client is not left hanging");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200") && text.ends_with("0123456789"), "{text}");
    assert!(took >= Duration::from_secs(2) && took < Duration::from_secs(6), "body stall cut after {took:?}");
    proxy.wait_log("read deadline", |v| v.to_string().contains("sent nothing for 2 s"));

    // And the proxy still serves.
    let tls = tls_via_sni(proxy.sni, "good.test", client()).await.unwrap();
    let (status, _, _) = request(tls, false, get("good.test", "/", false)).await;
    assert_eq!(status, 200);
    for task in stalls {
        task.abort();
    }
}

/// A malformed h2 request: POST?, extra headers, body.
type Attempt<'a> = (bool, Vec<(&'a str, &'a str)>, Option<&'a [u8]>);

// ---- Hostile clients -------------------------------------------------------------------------

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// An HPACK block: `:method` (static GET or POST), `:scheme https`, `:path /`, `:authority
/// host`, then literal headers, none indexed. Lengths under 127.
fn request_block(post: bool, host: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    let mut block = vec![if post { 0x83 } else { 0x82 }, 0x87, 0x84, 0x01, host.len() as u8];
    block.extend_from_slice(host.as_bytes());
    for (name, value) in extra {
        block.extend([0x00, name.len() as u8]);
        block.extend_from_slice(name.as_bytes());
        block.push(value.len() as u8);
        block.extend_from_slice(value.as_bytes());
    }
    block
}

/// Frames the server sent: (type, flags, stream, payload).
type Seen = std::sync::Arc<parking_lot::Mutex<Vec<(u8, u8, u32, Vec<u8>)>>>;

/// An h2 connection through the sni listener, spoken frame by frame; a task records what the
/// server sends until it closes.
async fn raw_h2(
    proxy: SocketAddr,
    host: &str,
    ca: &CertificateDer<'static>,
) -> (tokio::io::WriteHalf<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>, Seen, tokio::task::JoinHandle<()>) {
    let tls = tls_via_sni(proxy, host, trusting_client(ca, &["h2"])).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut rd, mut wr) = tokio::io::split(tls);
    wr.write_all(PREFACE).await.unwrap();
    wr.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
    wr.write_all(&frame(SETTINGS, 1, 0, &[])).await.unwrap();
    let seen: Seen = Default::default();
    let sink = seen.clone();
    let reader = tokio::spawn(async move {
        loop {
            let mut head = [0u8; 9];
            if rd.read_exact(&mut head).await.is_err() {
                return;
            }
            let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
            let mut payload = vec![0u8; len];
            if rd.read_exact(&mut payload).await.is_err() {
                return;
            }
            let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            sink.lock().push((head[3], head[4], stream, payload));
        }
    });
    (wr, seen, reader)
}

/// A proxy with short client and upstream deadlines in front of a good origin.
async fn client_setup() -> (Origin, Setup, Proxy) {
    let root = Root::new();
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle.pem");
    std::fs::write(&bundle, &root.cert_pem).unwrap();
    let (chain, key) = root.chain(dns("good.test"), 0);
    let key = PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).unwrap();
    let origin = Origin::start("good", chain, key, &["h2", "http/1.1"]).await;
    let setup = Setup::new(&ProxyOptions {
        ca_bundles: vec![bundle],
        resolve: vec![("good.test:443".into(), origin.addr)],
        extra: "\n[limits]\nclient_send_timeout_secs = 2\nupstream_read_timeout_secs = 5\n".into(),
        ..Default::default()
    });
    // The bundle is read at start; the directory may go.
    let proxy = setup.start();
    drop(dir);
    (origin, setup, proxy)
}

async fn still_serves(proxy: &Proxy, setup: &Setup) {
    for h2 in [false, true] {
        let alpn: &[&str] = if h2 { &["h2"] } else { &["http/1.1"] };
        let tls = tls_via_sni(proxy.sni, "good.test", trusting_client(&setup.trust_ca, alpn)).await.unwrap();
        let (status, _, body) = request(tls, h2, get("good.test", "/after", h2)).await;
        assert_eq!(status, 200, "{body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_rapid_reset_and_continuation_floods_are_cut_with_memory_bounded() {
    let (origin, setup, proxy) = client_setup().await;
    still_serves(&proxy, &setup).await;
    let baseline = proxy.rss_kib();

    // Rapid reset (CVE-2023-44487): open a stream and cancel it at once, 20,000 times.
    let (mut wr, seen, reader) = raw_h2(proxy.sni, "good.test", &setup.trust_ca).await;
    let started = Instant::now();
    let mut sent = 0u32;
    'flood: for batch in 0..200u32 {
        let mut bytes = Vec::new();
        for i in 0..100u32 {
            let stream = 2 * (batch * 100 + i) + 1;
            bytes.extend(frame(HEADERS, END_HEADERS | END_STREAM, stream, &request_block(false, "good.test", &[])));
            bytes.extend(frame(RST_STREAM, 0, stream, &8u32.to_be_bytes()));
        }
        if wr.write_all(&bytes).await.is_err() {
            break 'flood;
        }
        sent += 100;
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), reader).await;
    let goaway = seen.lock().iter().any(|f| f.0 == GOAWAY);
    let reset_rss = proxy.rss_kib();
    let upstream_requests = origin.requests.load(std::sync::atomic::Ordering::SeqCst);
    eprintln!(
        "rapid reset: {sent} streams opened and cancelled in {:?}; GOAWAY: {goaway}; origin saw {upstream_requests} requests; RSS {baseline} -> {reset_rss} KiB",
        started.elapsed()
    );
    assert!(goaway, "the flooding connection is told to go away");
    assert!(upstream_requests < 2_000, "cancelled streams do not all become upstream requests: {upstream_requests}");
    assert!(reset_rss < baseline + 32 * 1024, "RSS {baseline} -> {reset_rss} KiB");

    // CONTINUATION flood (2024): a header block that never ends, 16 KiB at a time.
    let (mut wr, seen, reader) = raw_h2(proxy.sni, "good.test", &setup.trust_ca).await;
    let mut pad = Vec::new();
    while pad.len() + 128 <= 16 * 1024 {
        pad.extend([0x00, 0x05]);
        pad.extend_from_slice(b"x-pad");
        pad.push(120);
        pad.extend(std::iter::repeat_n(b'a', 120));
    }
    wr.write_all(&frame(HEADERS, END_STREAM, 1, &request_block(false, "good.test", &[]))).await.unwrap();
    let mut continuation_bytes = 0usize;
    for _ in 0..4096 {
        if wr.write_all(&frame(CONTINUATION, 0, 1, &pad)).await.is_err() {
            break;
        }
        continuation_bytes += pad.len();
    }
    let _ = wr.shutdown().await;
    let closed = tokio::time::timeout(Duration::from_secs(10), reader).await.is_ok();
    let flood_rss = proxy.rss_kib();
    eprintln!(
        "CONTINUATION flood: {} KiB written before the proxy stopped reading; closed: {closed}; frames back: {:?}; RSS {baseline} -> {flood_rss} KiB",
        continuation_bytes / 1024,
        seen.lock().iter().map(|f| f.0).collect::<Vec<_>>()
    );
    assert!(closed, "the connection is closed");
    assert!(continuation_bytes < 64 << 20, "the proxy stops reading long before 64 MiB of headers");
    assert!(flood_rss < baseline + 32 * 1024, "RSS {baseline} -> {flood_rss} KiB");
    still_serves(&proxy, &setup).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_attempts_across_h2_to_h1_translation_are_refused() {
    let (origin, setup, proxy) = client_setup().await;
    let requests = || origin.requests.load(std::sync::atomic::Ordering::SeqCst);
    // Each attempt on its own connection: the stream reset or the connection refused
    // (GOAWAY, PROTOCOL_ERROR), never a response, never an upstream request.
    let attempts: [Attempt; 5] = [
        (true, vec![("content-length", "5")], Some(b"0123456789")), // body longer than declared
        (true, vec![("transfer-encoding", "chunked")], Some(b"0\r\n\r\n")), // h1 framing in h2
        (false, vec![("x-a", "b\r\nx-injected: 1")], None),         // CRLF in a value
        (false, vec![("X-Upper", "1")], None),                      // upper-case name
        (false, vec![("connection", "keep-alive")], None),          // connection-specific
    ];
    for (post, headers, body) in &attempts {
        let before = requests();
        let (mut wr, seen, reader) = raw_h2(proxy.sni, "good.test", &setup.trust_ca).await;
        let flags = if body.is_some() { END_HEADERS } else { END_HEADERS | END_STREAM };
        wr.write_all(&frame(HEADERS, flags, 1, &request_block(*post, "good.test", headers))).await.unwrap();
        if let Some(body) = body {
            wr.write_all(&frame(0x0, END_STREAM, 1, body)).await.unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let refused = |f: &(u8, u8, u32, Vec<u8>)| (f.0 == RST_STREAM && f.2 == 1) || f.0 == GOAWAY;
        while !seen.lock().iter().any(refused) {
            assert!(Instant::now() < deadline, "{headers:?}: neither reset nor refused: {:?}", seen.lock());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let frames = seen.lock().clone();
        assert!(!frames.iter().any(|f| f.0 == HEADERS && f.2 == 1), "{headers:?}: answered: {frames:?}");
        assert_eq!(requests(), before, "{headers:?}: a whole request reached the origin");
        drop(wr);
        reader.abort();
    }

    // HTTP/1.1 framing tricks on an intercepted connection: refused, or — for Content-Length
    // with Transfer-Encoding — read as chunked (RFC 9112 §6.1), re-framed by tollgate for the
    // origin, and the connection closed, so the bytes after the chunked body never become a
    // request. Never a smuggled request at the origin.
    let cases: [(&str, &str); 4] = [
        (
            "POST / HTTP/1.1\r\nHost: good.test\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: good.test\r\n\r\n",
            "Content-Length with Transfer-Encoding",
        ),
        (
            "POST / HTTP/1.1\r\nHost: good.test\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
            "two Content-Lengths",
        ),
        ("GET / HTTP/1.1\r\nHost: good.test\r\nX-A: b\r\n x-injected: 1\r\n\r\n", "obs-fold"),
        ("GET http://other.test/ HTTP/1.1\r\nHost: good.test\r\n\r\n", "absolute-form naming another host"),
    ];
    for (raw, what) in cases {
        let before = requests();
        let mut tls =
            tls_via_sni(proxy.sni, "good.test", trusting_client(&setup.trust_ca, &["http/1.1"])).await.unwrap();
        tls.write_all(raw.as_bytes()).await.unwrap();
        let mut response = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut response)).await;
        let response = String::from_utf8_lossy(&response);
        let status: u16 = response.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        let reached = requests() - before;
        assert!(!response.contains("path=/smuggled"), "{what}: a smuggled request reached the origin: {response}");
        let refused = (400..500).contains(&status) && reached == 0;
        let te_wins = what.starts_with("Content-Length with")
            && status == 200
            && reached == 1
            && response.contains("body=0")
            && response.to_ascii_lowercase().contains("connection: close")
            && read.is_ok();
        assert!(refused || te_wins, "{what}: got {status} with {reached} upstream requests: {response}");
    }
    still_serves(&proxy, &setup).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_readers_are_cut_and_do_not_make_the_proxy_buffer() {
    let (_origin, setup, proxy) = client_setup().await;
    still_serves(&proxy, &setup).await;
    let baseline = proxy.rss_kib();
    // Ask for 64 MiB, then read nothing.
    let mut tls = tls_via_sni(proxy.sni, "good.test", trusting_client(&setup.trust_ca, &["http/1.1"])).await.unwrap();
    tls.write_all(b"GET /big HTTP/1.1\r\nHost: good.test\r\n\r\n").await.unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let stalled_rss = proxy.rss_kib();
    // What the proxy had sent before giving up is all there is: the connection is closed.
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut got)).await;
    eprintln!(
        "slow read: {} KiB of 65536 delivered before the cut; RSS {baseline} -> {stalled_rss} KiB while stalled",
        got.len() / 1024
    );
    assert!(read.is_ok(), "the proxy closed the stalled connection");
    assert!(got.len() < 32 << 20, "the response was cut, not delivered");
    assert!(stalled_rss < baseline + 16 * 1024, "RSS {baseline} -> {stalled_rss} KiB: the proxy buffered the response");
    proxy.wait_log("send deadline", |v| v.to_string().contains("accepted no bytes"));
    still_serves(&proxy, &setup).await;
}
