//! A TLS scanner on the client-facing listeners: testssl.sh (Debian's package) against the `sni`
//! listener (leaves minted by the CA on the HSM) and the `inbound` listener (server key on the
//! HSM). Nothing may be flagged, and only TLS 1.2/1.3 with forward-secret AEAD suites offered.

mod support;

use std::path::Path;

use support::*;

/// Runs testssl.sh against `host:port` on 127.0.0.1, trusting `cas`; its JSON findings.
fn testssl(host: &str, port: u16, cas: &Path, out: &Path) -> Vec<serde_json::Value> {
    let status = std::process::Command::new("testssl")
        .args(["--quiet", "--color", "0", "--warnings", "off", "--sneaky", "--ip", "127.0.0.1"])
        .args(["--protocols", "--each-cipher", "--fs", "--vulnerable", "--server-defaults"])
        .arg("--add-ca")
        .arg(cas)
        .arg("--jsonfile")
        .arg(out)
        .arg(format!("{host}:{port}"))
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    // testssl's exit code counts findings of some kinds; the JSON says what they were.
    let _ = status;
    let text = std::fs::read_to_string(out).unwrap_or_else(|e| panic!("testssl wrote no {}: {e}", out.display()));
    serde_json::from_str(&text).unwrap()
}

/// Findings allowed above INFO, and why.
const EXPECTED: [(&str, &str); 2] = [
    // Minted leaves carry no CRL/OCSP URL on purpose: the proxy cannot answer for them (the
    // upstream's own revocation is checked by tollgate instead). Inbound: the test PKI has none.
    ("cert_revocation", "Neither CRL nor OCSP URI provided"),
    // No DNS on the test machine.
    ("DNS_CAArecord", "--"),
];

/// What a listener must look like to a scanner.
fn assert_clean(listener: &str, findings: &[serde_json::Value]) {
    let field = |f: &serde_json::Value, k: &str| f[k].as_str().unwrap_or_default().to_string();
    let by_id =
        |id: &str| findings.iter().find(|f| field(f, "id") == id).map(|f| (field(f, "severity"), field(f, "finding")));
    for old in ["SSLv2", "SSLv3", "TLS1", "TLS1_1"] {
        let (_, finding) = by_id(old).unwrap_or_else(|| panic!("{listener}: no {old} result"));
        assert_eq!(finding, "not offered", "{listener}: {old}");
    }
    for current in ["TLS1_2", "TLS1_3"] {
        let (_, finding) = by_id(current).unwrap_or_else(|| panic!("{listener}: no {current} result"));
        assert!(finding.starts_with("offered"), "{listener}: {current}: {finding}");
    }
    // Every cipher offered: ephemeral (EC)DH key exchange and an AEAD.
    let ciphers: Vec<String> =
        findings.iter().filter(|f| field(f, "id").starts_with("cipher_x")).map(|f| field(f, "finding")).collect();
    assert!(ciphers.len() >= 3, "{listener}: testssl listed {ciphers:?}");
    for cipher in &ciphers {
        let columns: Vec<&str> = cipher.split_whitespace().collect();
        let (kx, enc) = (columns[2], columns[4]);
        assert!(matches!(kx, "ECDH" | "DH") && matches!(enc, "AESGCM" | "ChaCha20"), "{listener}: offers {cipher}");
    }
    // The certificate chains to the CA we gave it.
    let (severity, finding) = by_id("cert_chain_of_trust").expect("chain of trust checked");
    assert_eq!((severity.as_str(), finding.as_str()), ("OK", "passed."), "{listener}: chain of trust");
    // Every vulnerability check clean. rustls never renegotiates at all, so testssl's openssl
    // probe for secure renegotiation fails its handshake: a WARN about the probe, not a finding.
    for vuln in [
        "heartbleed",
        "CCS",
        "ticketbleed",
        "ROBOT",
        "secure_client_renego",
        "CRIME_TLS",
        "BREACH",
        "POODLE_SSL",
        "fallback_SCSV",
        "SWEET32",
        "FREAK",
        "DROWN",
        "LOGJAM",
        "BEAST",
        "LUCKY13",
        "RC4",
    ] {
        let (severity, finding) = by_id(vuln).unwrap_or_else(|| panic!("{listener}: {vuln} not checked"));
        assert!(matches!(severity.as_str(), "OK" | "INFO"), "{listener}: {vuln} [{severity}]: {finding}");
    }
    let (severity, finding) = by_id("secure_renego").expect("renegotiation checked");
    assert!(
        severity == "OK" || finding.contains("handshake didn't succeed"),
        "{listener}: secure_renego [{severity}]: {finding}"
    );
    // Nothing else flagged above INFO.
    let flagged: Vec<String> = findings
        .iter()
        .filter(|f| matches!(field(f, "severity").as_str(), "LOW" | "MEDIUM" | "HIGH" | "CRITICAL"))
        .filter(|f| !EXPECTED.contains(&(field(f, "id").as_str(), field(f, "finding").as_str())))
        .map(|f| format!("{} [{}]: {}", field(f, "id"), field(f, "severity"), field(f, "finding")))
        .collect();
    assert!(flagged.is_empty(), "{listener}: testssl flagged:\n{}", flagged.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn testssl_finds_nothing_on_the_sni_and_inbound_listeners() {
    require(&["testssl", "openssl"]);
    let pki = TestPki::new();
    // Valid for a year: minted leaves mirror the upstream's validity, and testssl flags < 60 days.
    let (chain, key) = pki.leaf(&LeafSpec { valid_days: (-1, 365), ..LeafSpec::new(&["origin.test"]) });
    let origin = Origin::start("origin", chain, key, &["h2", "http/1.1"]).await;
    let plain = Origin::start_plain("plain").await;
    let setup = Setup::new(&ProxyOptions {
        resolve: vec![("origin.test:443".into(), origin.addr)],
        ca_bundles: vec![pki.bundle()],
        extra: inbound_site("www.inbound.test", plain.addr),
        ..Default::default()
    });
    // The inbound server key on the HSM, its certificate from the test PKI.
    let key = rcgen::KeyPair::generate().unwrap();
    import_key(&[&setup.token], &key, "inbound-key", "a1");
    let cert = setup.token.path("inbound.pem");
    std::fs::write(&cert, pki.certify(&key, &["www.inbound.test"])).unwrap();
    let out = setup.tollgate(&[
        "cert",
        "import",
        "--name",
        "inbound",
        "--cert",
        cert.to_str().unwrap(),
        "--key-on-hsm",
        "--inbound",
        "www.inbound.test",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let proxy = Proxy::start_with(setup.token.cmd(tollgate_bin()), &setup.config, 4);

    let dir = setup.token.path("testssl");
    std::fs::create_dir_all(&dir).unwrap();
    let (sni_port, inbound_port) = (proxy.sni.port(), proxy.listener("inbound").port());
    let (sni_json, inbound_json) = (dir.join("sni.json"), dir.join("inbound.json"));
    let trust_ca = setup.token.path("trust.pem");
    let test_root = pki.bundle();
    let scans = tokio::task::spawn_blocking(move || {
        std::thread::scope(|s| {
            let sni = s.spawn(|| testssl("origin.test", sni_port, &trust_ca, &sni_json));
            let inbound = s.spawn(|| testssl("www.inbound.test", inbound_port, &test_root, &inbound_json));
            (sni.join().unwrap(), inbound.join().unwrap())
        })
    })
    .await
    .unwrap();
    assert_clean("sni", &scans.0);
    assert_clean("inbound", &scans.1);
    assert!(proxy.log_json().iter().all(|v| v["level"] != "ERROR"), "no errors logged under the scan");
}
