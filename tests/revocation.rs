//! Revocation of upstream certificates by CRL: a test CA revokes one leaf and publishes its
//! CRL from a server this test runs; another leaf points at a CRL server that never answers.
//! The revoked upstream is blocked, the good one decrypted, the unknown one follows
//! `revocation_unknown` within the deadline — without holding up a host whose certificate
//! names no CRL — and the CRL is fetched once for all the certificates that share it.

mod support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, CrlDistributionPoint, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SerialNumber,
};
use rustls::pki_types::pem::PemObject;

use support::*;

fn decryption_line(proxy: &Proxy, sni: &str) -> serde_json::Value {
    proxy.wait_log(sni, |v| v["target"] == "tollgate::decryption" && v["sni"] == sni)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_upstreams_are_blocked_and_a_dead_crl_server_costs_one_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let (issuer, root_pem) = revoking_ca("revocation test root");
    std::fs::write(dir.path().join("root.pem"), root_pem).unwrap();
    // The leaf 0x02, and the intermediate CA 0x09.
    let crl = crl_der(&issuer, &[2, 9]);
    let (crl_addr, fetches) = crl_server(Some(crl)).await;
    let (dead_addr, _) = crl_server(None).await;
    let published = format!("http://{crl_addr}/root.crl");
    let dead = format!("http://{dead_addr}/root.crl");

    let mut resolve = Vec::new();
    let mut origins = Vec::new();
    for (name, serial, crl) in [
        ("good.test", 1, Some(published.clone())),
        ("revoked.test", 2, Some(published)),
        ("deadcrl.test", 3, Some(dead)),
        ("nocrl.test", 4, None),
    ] {
        let (chain, key) = leaf_with_crl(&issuer, name, serial, crl);
        let origin = Origin::start(name, chain, key, &["http/1.1"]).await;
        resolve.push((format!("{name}:443"), origin.addr));
        origins.push(origin);
    }
    // A leaf whose own CRL does not list it, issued by an intermediate the root revoked.
    let mut inter = CertificateParams::default();
    inter.distinguished_name.push(DnType::CommonName, "revoked intermediate");
    inter.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    inter.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    inter.serial_number = Some(SerialNumber::from_slice(&[9]));
    inter.crl_distribution_points = vec![CrlDistributionPoint { uris: vec![format!("http://{crl_addr}/root.crl")] }];
    let inter_key = KeyPair::generate().unwrap();
    let inter_cert = inter.signed_by(&inter_key, &issuer).unwrap();
    let inter_issuer = Issuer::new(inter, inter_key);
    let inter_crl = crl_der(&inter_issuer, &[]);
    let (inter_crl_addr, _) = crl_server(Some(inter_crl)).await;
    let (mut chain, key) =
        leaf_with_crl(&inter_issuer, "badca.test", 5, Some(format!("http://{inter_crl_addr}/inter.crl")));
    chain.push(inter_cert.der().clone());
    let origin = Origin::start("badca.test", chain, key, &["http/1.1"]).await;
    resolve.push(("badca.test:443".into(), origin.addr));
    origins.push(origin);

    let options = ProxyOptions {
        ca_bundles: vec![dir.path().join("root.pem")],
        resolve,
        upstream: "revocation_timeout_ms = 1500\n".into(),
        ..Default::default()
    };
    let setup = Setup::new(&options);
    let proxy = setup.start();
    let trusting = || trusting_client(&setup.trust_ca, &["http/1.1"]);

    // Good: decrypted, checked against the CRL.
    let tls = tls_via_sni(proxy.sni, "good.test", trusting()).await.expect("good.test is decrypted");
    let (status, _, _) = request(tls, false, get("good.test", "/", false)).await;
    assert_eq!(status, 200);
    let good = decryption_line(&proxy, "good.test");
    assert_eq!((good["revocation"].as_str(), good["revocation_source"].as_str()), (Some("good"), Some("crl")));

    // Revoked: blocked by default, with no certificate at all for the client.
    let (config, seen) = capturing_client(&["http/1.1"]);
    assert!(tls_via_sni(proxy.sni, "revoked.test", config).await.is_err());
    assert!(seen.lock().is_empty(), "refused before any certificate");
    let revoked = decryption_line(&proxy, "revoked.test");
    assert_eq!(revoked["decision"], "block", "{revoked}");
    assert_eq!((revoked["chain_status"].as_str(), revoked["revocation"].as_str()), (Some("revoked"), Some("revoked")));
    assert_eq!(fetches.load(Ordering::SeqCst), 1, "one fetch for both certificates that name the CRL");

    // A revoked intermediate revokes the chain, though the leaf's own CRL is clean.
    let (config, seen) = capturing_client(&["http/1.1"]);
    assert!(tls_via_sni(proxy.sni, "badca.test", config).await.is_err());
    assert!(seen.lock().is_empty(), "refused before any certificate");
    let badca = decryption_line(&proxy, "badca.test");
    assert_eq!(badca["chain_status"], "revoked", "{badca}");
    assert!(badca["chain_detail"].as_str().unwrap().contains("intermediate"), "{badca}");

    // A CRL server that never answers: unknown status at the deadline, a forward-untrust leaf
    // (revocation_unknown follows untrusted) — and meanwhile a host without a CRL is served.
    let started = Instant::now();
    let sni = proxy.sni;
    let (config, seen) = capturing_client(&["http/1.1"]);
    let stuck = tokio::spawn(async move { tls_via_sni(sni, "deadcrl.test", config).await.is_ok() });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let tls = tls_via_sni(proxy.sni, "nocrl.test", trusting()).await.expect("nocrl.test is decrypted");
    assert!(!stuck.is_finished(), "served while the dead CRL server's deadline runs");
    let (status, _, _) = request(tls, false, get("nocrl.test", "/", false)).await;
    assert_eq!(status, 200);
    assert!(stuck.await.unwrap(), "the unknown status gets a forward-untrust leaf");
    let waited = started.elapsed();
    eprintln!("a handshake behind a dead CRL server finished after {waited:?} (deadline 1500 ms)");
    assert!(
        waited >= Duration::from_millis(1400) && waited < Duration::from_millis(1500 + 100),
        "bounded by the deadline (revocation_timeout_ms + 100 ms): {waited:?}"
    );
    assert_eq!(parse(&seen.lock()[0]).issuer(), parse(&setup.untrust_ca).subject());
    let unknown = decryption_line(&proxy, "deadcrl.test");
    assert_eq!(unknown["chain_status"], "revocation_unknown", "{unknown}");
    assert!(unknown["chain_detail"].as_str().unwrap().contains("no answer within 1500 ms"), "{unknown}");
    let nocrl = decryption_line(&proxy, "nocrl.test");
    assert_eq!((nocrl["revocation"].as_str(), nocrl["revocation_source"].as_str()), (Some("unknown"), Some("none")));
    assert_eq!(nocrl["chain_status"], "trusted");

    // The failure is remembered: the next connection does not wait the deadline again.
    let started = Instant::now();
    let (config, _) = capturing_client(&["http/1.1"]);
    tls_via_sni(proxy.sni, "deadcrl.test", config).await.unwrap();
    assert!(started.elapsed() < Duration::from_millis(1000), "{:?}", started.elapsed());
    drop(origins);
}

/// A process killed when dropped.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_listening(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listening on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn openssl_in(dir: &std::path::Path, args: &[&str]) -> Running {
    let child = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    Running(child)
}

/// The authorityInfoAccess extension naming `url` as the OCSP responder.
fn ocsp_aia(url: &str) -> rcgen::CustomExtension {
    let oid = [0x06, 0x08, 0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x30, 0x01];
    let mut location = vec![0x86, url.len() as u8];
    location.extend(url.as_bytes());
    let mut description = vec![0x30, (oid.len() + location.len()) as u8];
    description.extend(oid);
    description.extend(location);
    let mut access = vec![0x30, description.len() as u8];
    access.extend(description);
    rcgen::CustomExtension::from_oid_content(&[1, 3, 6, 1, 5, 5, 7, 1, 1], access)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stapled_and_queried_ocsp_answers_are_honoured() {
    require(&["openssl"]);
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name);
    let mut ca = CertificateParams::default();
    ca.distinguished_name.push(DnType::CommonName, "ocsp test root");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca_key = KeyPair::generate().unwrap();
    std::fs::write(path("ca.pem"), ca.self_signed(&ca_key).unwrap().pem()).unwrap();
    std::fs::write(path("ca.key"), ca_key.serialize_pem()).unwrap();
    let issuer = Issuer::new(ca, ca_key);

    // The responder: openssl's, from an index where 0x12 and 0x14 are revoked.
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let mut index = String::new();
    let hosts = [
        ("stapled-good.test", 0x11u8),
        ("stapled-revoked.test", 0x12),
        ("ocsp-good.test", 0x13),
        ("ocsp-revoked.test", 0x14),
    ];
    for (name, serial) in hosts {
        let mut params = CertificateParams::new(vec![name.to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.serial_number = Some(SerialNumber::from_slice(&[serial]));
        if name.starts_with("ocsp-") {
            params.custom_extensions.push(ocsp_aia(&url));
        }
        let key = KeyPair::generate().unwrap();
        std::fs::write(path(&format!("{name}.pem")), params.signed_by(&key, &issuer).unwrap().pem()).unwrap();
        std::fs::write(path(&format!("{name}.key")), key.serialize_pem()).unwrap();
        let revoked = serial % 2 == 0;
        let (state, when) = if revoked { ("R", "260101000000Z") } else { ("V", "") };
        index.push_str(&format!("{state}\t391231000000Z\t{when}\t{serial:02X}\tunknown\t/CN={name}\n"));
    }
    std::fs::write(path("index.txt"), index).unwrap();
    let port_arg = port.to_string();
    let responder = openssl_in(
        dir.path(),
        &[
            "ocsp",
            "-index",
            "index.txt",
            "-port",
            &port_arg,
            "-rsigner",
            "ca.pem",
            "-rkey",
            "ca.key",
            "-CA",
            "ca.pem",
            "-nmin",
            "60",
        ],
    );
    // (Not probed with a bare connect: openssl's responder spins on a connection that closes
    // without a request. The first fetch below is retried until it answers.)

    // Staples fetched from it, served by openssl s_server -status_file.
    let mut servers = Vec::new();
    let mut resolve = Vec::new();
    for name in ["stapled-good.test", "stapled-revoked.test"] {
        let (cert, staple) = (format!("{name}.pem"), format!("{name}.ocsp"));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let fetched = std::process::Command::new("openssl")
                .args(["ocsp", "-issuer", "ca.pem", "-cert", &cert, "-url", &url, "-respout", &staple, "-noverify"])
                .args(["-timeout", "5"])
                .current_dir(dir.path())
                .output()
                .unwrap();
            if fetched.status.success() {
                break;
            }
            assert!(Instant::now() < deadline, "{}", String::from_utf8_lossy(&fetched.stderr));
            std::thread::sleep(Duration::from_millis(100));
        }
        let port = free_port();
        let accept = format!("127.0.0.1:{port}");
        let key = format!("{name}.key");
        let args =
            ["s_server", "-quiet", "-www", "-accept", &accept, "-cert", &cert, "-key", &key, "-status_file", &staple];
        servers.push(openssl_in(dir.path(), &args));
        wait_listening(port);
        resolve.push((format!("{name}:443"), accept.parse().unwrap()));
    }
    // Queried: in-process origins that staple nothing.
    let mut origins = Vec::new();
    for name in ["ocsp-good.test", "ocsp-revoked.test"] {
        let chain = vec![pem_cert(&path(&format!("{name}.pem")))];
        let key = rustls::pki_types::PrivateKeyDer::from_pem_file(path(&format!("{name}.key"))).unwrap();
        let origin = Origin::start(name, chain, key, &["http/1.1"]).await;
        resolve.push((format!("{name}:443"), origin.addr));
        origins.push(origin);
    }
    let options = ProxyOptions {
        ca_bundles: vec![path("ca.pem")],
        resolve,
        upstream: "revocation = \"crl+ocsp\"\nrevocation_timeout_ms = 3000\n".into(),
        ..Default::default()
    };
    let setup = Setup::new(&options);
    let proxy = setup.start();

    for (host, source) in [("stapled-good.test", "ocsp-staple"), ("ocsp-good.test", "ocsp")] {
        tls_via_sni(proxy.sni, host, trusting_client(&setup.trust_ca, &["http/1.1"]))
            .await
            .unwrap_or_else(|e| panic!("{host}: {e}"));
        let line = decryption_line(&proxy, host);
        assert_eq!(
            (line["revocation"].as_str(), line["revocation_source"].as_str()),
            (Some("good"), Some(source)),
            "{line}"
        );
        assert_eq!(line["decision"], "decrypt");
    }
    for (host, source) in [("stapled-revoked.test", "ocsp-staple"), ("ocsp-revoked.test", "ocsp")] {
        let (config, seen) = capturing_client(&["http/1.1"]);
        assert!(tls_via_sni(proxy.sni, host, config).await.is_err(), "{host}: blocked");
        assert!(seen.lock().is_empty());
        let line = decryption_line(&proxy, host);
        assert_eq!(
            (line["chain_status"].as_str(), line["revocation_source"].as_str()),
            (Some("revoked"), Some(source)),
            "{line}"
        );
        assert_eq!(line["decision"], "block");
    }
    drop((responder, servers, origins));
}
