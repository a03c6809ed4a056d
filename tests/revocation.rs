//! Revocation of upstream certificates by CRL: a test CA revokes one leaf and publishes its
//! CRL from a server this test runs; another leaf points at a CRL server that never answers.
//! The revoked upstream is blocked, the good one decrypted, the unknown one follows
//! `revocation_unknown` within the deadline — without holding up a host whose certificate
//! names no CRL — and the CRL is fetched once for all the certificates that share it.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, CrlDistributionPoint, DnType, IsCa, Issuer,
    KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams, SerialNumber,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use support::*;

/// Serves `body` as the answer to any request, counting requests; with `None`, accepts and
/// never answers.
async fn crl_server(body: Option<Vec<u8>>) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served = Arc::new(AtomicUsize::new(0));
    let count = served.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { continue };
            let Some(body) = body.clone() else {
                held.push(stream);
                continue;
            };
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut request = [0u8; 1024];
                let _ = stream.read(&mut request).await;
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/pkix-crl\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes()).await;
                let _ = stream.write_all(&body).await;
            });
        }
    });
    (addr, served)
}

fn leaf(
    issuer: &Issuer<'static, KeyPair>,
    name: &str,
    serial: u8,
    crl: Option<String>,
) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let mut params = CertificateParams::new(vec![name.to_string()]).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.serial_number = Some(SerialNumber::from_slice(&[serial]));
    params.crl_distribution_points = crl.into_iter().map(|uri| CrlDistributionPoint { uris: vec![uri] }).collect();
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, issuer).unwrap();
    (vec![cert.der().clone()], PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())))
}

fn decryption_line(proxy: &Proxy, sni: &str) -> serde_json::Value {
    proxy.wait_log(sni, |v| v["target"] == "tollgate::decryption" && v["sni"] == sni)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_upstreams_are_blocked_and_a_dead_crl_server_costs_one_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let mut ca = CertificateParams::default();
    ca.distinguished_name.push(DnType::CommonName, "revocation test root");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate().unwrap();
    let root = ca.self_signed(&ca_key).unwrap();
    std::fs::write(dir.path().join("root.pem"), root.pem()).unwrap();
    let issuer = Issuer::new(ca, ca_key);

    let now = time::OffsetDateTime::now_utc();
    let crl = CertificateRevocationListParams {
        this_update: now - time::Duration::hours(1),
        next_update: now + time::Duration::days(1),
        crl_number: SerialNumber::from_slice(&[1]),
        issuing_distribution_point: None,
        revoked_certs: vec![RevokedCertParams {
            serial_number: SerialNumber::from_slice(&[2]),
            revocation_time: now - time::Duration::hours(1),
            reason_code: Some(rcgen::RevocationReason::KeyCompromise),
            invalidity_date: None,
        }],
        key_identifier_method: KeyIdMethod::Sha256,
    }
    .signed_by(&issuer)
    .unwrap();
    let (crl_addr, fetches) = crl_server(Some(crl.der().to_vec())).await;
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
        let (chain, key) = leaf(&issuer, name, serial, crl);
        let origin = Origin::start(name, chain, key, &["http/1.1"]).await;
        resolve.push((format!("{name}:443"), origin.addr));
        origins.push(origin);
    }
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
    assert!(
        waited >= Duration::from_millis(1400) && waited < Duration::from_secs(4),
        "bounded by the deadline: {waited:?}"
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
