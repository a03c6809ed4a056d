//! HA and outages over a real hop. Member A is a SoftHSM token served by `p11-kit server` on
//! a unix socket (tollgate loads `p11-kit-client.so`: a network HSM the test can cut off);
//! member B is a separate copy of libsofthsm2.so on its own token directory (an independent
//! library instance). Both hold the same CA key, imported into each token.

mod support;

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::*;

struct Group {
    a: RemoteToken,
    b: Token,
    config: PathBuf,
    ca: rustls::pki_types::CertificateDer<'static>,
    pki: TestPki,
    _origin: Origin,
}

impl Group {
    async fn new(extra: &str) -> Self {
        let a = RemoteToken::new();
        let b = Token::new();
        let b_module = b.path("libmemberb.so");
        std::fs::copy(SOFTHSM_MODULE, &b_module).unwrap();

        // One CA key pair, imported into both tokens: an HA group holds the same keys.
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name.push(rcgen::DnType::CommonName, "tollgate HA test CA");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::DigitalSignature];
        let ca_cert = params.self_signed(&key).unwrap();
        import_key(&[&a.token, &b], &key, "ha-ca", "01");
        drop(key);
        let ca_pem = b.path("ha-ca.pem");
        std::fs::write(&ca_pem, ca_cert.pem()).unwrap();

        let pki = TestPki::new();
        // A certificate per host: every new host is a mint, an HSM signature.
        let origin = Origin::start_per_host("ha", &pki, &["http/1.1"]).await;
        let config = b.path("tollgate.toml");
        std::fs::write(
            &config,
            format!(
                "state_dir = \"{state}\"\n\n[hsm]\ncall_timeout_ms = 1000\n\n[hsm.ha]\ngroup = \"ha-test\"\nauto_recovery_interval_secs = 1\n{extra}\n\
                 [[hsm.server]]\nname = \"hsm-a\"\nmodule = \"{P11_KIT_CLIENT}\"\ntoken = \"{label}\"\npin_file = \"{pin}\"\naddress = \"unix:{sock}\"\n\n\
                 [[hsm.server]]\nname = \"hsm-b\"\nmodule = \"{bmod}\"\ntoken = \"{label}\"\npin_file = \"{pin}\"\n\n\
                 [[listener]]\nmode = \"sni\"\nlisten = \"127.0.0.1:0\"\n\n\
                 [limits]\nper_client_mints_per_sec = 10000\nper_client_mint_burst = 10000\n\n[management]\nlisten = \"127.0.0.1:0\"\n\n\
                 [upstream]\nca_bundles = [\"{bundle}\"]\n\n[resolve]\n\"*.ha.test:443\" = \"{origin}\"\n",
                state = b.path("state").display(),
                label = b.label,
                pin = b.path("user.pin").display(),
                sock = a.socket.display(),
                bmod = b_module.display(),
                bundle = pki.bundle().display(),
                origin = origin.addr,
            ),
        )
        .unwrap();
        let group = Self { a, b, config, ca: pem_cert(&ca_pem), pki, _origin: origin };
        let out = group.tollgate(&[
            "cert",
            "import",
            "--name",
            "ha-ca",
            "--cert",
            ca_pem.to_str().unwrap(),
            "--key-on-hsm",
            "--forward-trust",
        ]);
        assert!(out.status.success(), "import: {}", String::from_utf8_lossy(&out.stderr));
        group
    }

    fn cmd(&self) -> Command {
        let mut cmd = Command::new(tollgate_bin());
        cmd.env("SOFTHSM2_CONF", self.b.conf())
            .env("P11_KIT_SERVER_ADDRESS", format!("unix:path={}", self.a.socket.display()));
        cmd
    }

    fn tollgate(&self, args: &[&str]) -> std::process::Output {
        self.cmd().args(args).arg("--config").arg(&self.config).output().unwrap()
    }

    fn start(&self) -> Proxy {
        Proxy::start_with(self.cmd(), &self.config, 2)
    }

    /// Adds an inbound listener serving `host` with a server key on both members, forwarding
    /// to the test origin; `start_inbound` starts the proxy with it.
    fn add_inbound_site(&self, host: &str) {
        let key = rcgen::KeyPair::generate().unwrap();
        import_key(&[&self.a.token, &self.b], &key, "site", "02");
        let cert = self.b.path("site.pem");
        std::fs::write(&cert, self.pki.certify(&key, &[host])).unwrap();
        let mut config = std::fs::read_to_string(&self.config).unwrap();
        config.push_str(&format!(
            "\n[[listener]]\nmode = \"inbound\"\nlisten = \"127.0.0.1:0\"\n\n\
             [[inbound]]\nhost = \"{host}\"\nupstream = \"https://{host}\"\nca_bundle = \"{}\"\n",
            self.pki.bundle().display()
        ));
        std::fs::write(&self.config, config).unwrap();
        let out = self.tollgate(&[
            "cert",
            "import",
            "--name",
            "site",
            "--cert",
            cert.to_str().unwrap(),
            "--key-on-hsm",
            "--inbound",
            host,
        ]);
        assert!(out.status.success(), "import: {}", String::from_utf8_lossy(&out.stderr));
    }

    fn start_inbound(&self) -> Proxy {
        Proxy::start_with(self.cmd(), &self.config, 3)
    }

    /// Cuts member B off: its token directory disappears (the library keeps running).
    fn stop_b(&self) {
        std::fs::rename(self.b.path("tokens"), self.b.path("tokens.away")).unwrap();
    }

    fn start_b(&self) {
        std::fs::rename(self.b.path("tokens.away"), self.b.path("tokens")).unwrap();
    }
}

/// One new TLS connection through the sni listener to `host` with one request.
async fn visit(
    proxy: std::net::SocketAddr,
    ca: &rustls::pki_types::CertificateDer<'static>,
    host: &str,
) -> Result<(), String> {
    let tls = tls_via_sni(proxy, host, trusting_client(ca, &["http/1.1"])).await.map_err(|e| e.to_string())?;
    let (status, _, _) = request(tls, false, get(host, "/", false)).await;
    if status == 200 { Ok(()) } else { Err(format!("status {status}")) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_finds_the_key_on_every_member_and_status_shows_the_group() {
    let group = Group::new("").await;
    let out = group.tollgate(&["hsm", "status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["ha"]["enabled"], true);
    assert_eq!(status["ha"]["group"], "ha-test");
    for server in status["servers"].as_array().unwrap() {
        assert_eq!(server["up"], true, "{server}");
        assert_eq!(server["state"], "authenticated");
    }
    let out = group.tollgate(&["cert", "list", "--json"]);
    let certs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(certs[0]["key"], "hsm", "{certs}");

    let out = group.tollgate(&["hsm", "info", "--json"]);
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for server in info["servers"].as_array().unwrap() {
        assert!(server["mechanisms"].as_array().unwrap().iter().any(|m| m == "CKM_ECDSA"), "{server}");
        let key = server["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["label"] == "ha-ca" && k["class"] == "private")
            .unwrap();
        assert_eq!(key["id"], "01");
        assert!(server["token"]["serial"].as_str().is_some());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("\"value\""), "no key material in hsm info");

    // The service reports the group through the management API too.
    let proxy = group.start();
    tokio::time::timeout(Duration::from_secs(10), visit(proxy.sni, &group.ca, "first.ha.test")).await.unwrap().unwrap();
    let api = http_get(proxy.management, "/api/v1/hsm/status").await;
    let api: serde_json::Value = serde_json::from_str(&api).unwrap();
    assert_eq!(api["servers"].as_array().unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signing_survives_member_loss_and_recovers_after_a_full_outage() {
    let mut group = Group::new("").await;
    let proxy = group.start();
    let ca = Arc::new(group.ca.clone());

    // A bounded load of new-host mints, 8 at a time, for the whole test.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let results = Arc::new(parking_lot::Mutex::new(Vec::<(Instant, Duration, bool)>::new()));
    let counter = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..8 {
        let (stop, results, counter, ca, addr) =
            (stop.clone(), results.clone(), counter.clone(), ca.clone(), proxy.sni);
        workers.push(tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let i = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= 3000 {
                    break;
                }
                let started = Instant::now();
                let host = format!("h{i}.ha.test");
                let ok = tokio::time::timeout(Duration::from_secs(5), visit(addr, &ca, &host))
                    .await
                    .is_ok_and(|r| r.is_ok());
                results.lock().push((started, started.elapsed(), ok));
                if !ok {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }));
    }
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let signs_a = proxy.metric_labeled("tollgate_hsm_sign_duration_seconds_count", "hsm-a").await;
    let signs_b = proxy.metric_labeled("tollgate_hsm_sign_duration_seconds_count", "hsm-b").await;
    assert!(signs_a > 0 && signs_b > 0, "signing is spread over both members: a={signs_a} b={signs_b}");

    // Member A (the network HSM) drops: nothing fails.
    let a_down = Instant::now();
    group.a.stop();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let all_down = Instant::now();
    // Then B too: cached hosts keep working, new hosts fail fast.
    group.stop_b();
    tokio::time::sleep(Duration::from_secs(3)).await;
    for i in 0..5 {
        let host = format!("h{i}.ha.test");
        visit(proxy.sni, &ca, &host).await.unwrap_or_else(|e| panic!("cached host {host} must keep working: {e}"));
    }
    let started = Instant::now();
    let err = visit(proxy.sni, &ca, "brand-new.ha.test").await.expect_err("no HSM: a new host cannot be minted");
    let fail_after = started.elapsed();
    assert!(fail_after < Duration::from_secs(4), "fails within the deadline, no hang: {fail_after:?}");
    assert!(err.to_lowercase().contains("alert"), "refused with a TLS alert: {err}");
    proxy.wait_log("mint failure", |v| {
        v["error"].as_str().is_some_and(|e| e.contains("minting a leaf for brand-new.ha.test"))
    });
    let status: serde_json::Value =
        serde_json::from_str(&http_get(proxy.management, "/api/v1/hsm/status").await).unwrap();
    assert!(status["servers"].as_array().unwrap().iter().all(|s| s["up"] == false), "{status}");

    // Both come back: minting resumes by itself, no restart.
    group.a.start();
    group.start_b();
    let back = Instant::now();
    let recovered = loop {
        if visit(proxy.sni, &ca, &format!("back{}.ha.test", back.elapsed().as_millis())).await.is_ok() {
            break back.elapsed();
        }
        assert!(back.elapsed() < Duration::from_secs(15), "no recovery within 15 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }

    let results = results.lock().clone();
    // A request belongs to a phase when it started and finished inside it.
    let phase = |from: Instant, to: Instant| {
        let window: Vec<_> = results.iter().filter(|(t, d, _)| *t >= from && *t + *d <= to).collect();
        (window.len(), window.iter().filter(|(_, _, ok)| !ok).count())
    };
    let (before, before_failed) = phase(t0, a_down);
    let (one_down, one_down_failed) = phase(a_down, all_down);
    let (none, none_failed) = phase(all_down + Duration::from_millis(500), back);
    let (after, after_failed) = phase(back + recovered + Duration::from_millis(500), Instant::now());
    let slowest_failure = results.iter().filter(|(_, _, ok)| !ok).map(|(_, d, _)| *d).max().unwrap_or_default();
    eprintln!(
        "outage figures: both up {before} mints/{before_failed} failed; hsm-a down {one_down}/{one_down_failed} failed; \
         all down {none} attempts/{none_failed} failed (slowest failure {slowest_failure:?}); recovered {recovered:?} after restart; \
         after recovery {after}/{after_failed} failed"
    );
    for line in proxy.log_json().iter().filter(|v| v["level"] != "INFO").take(12) {
        eprintln!("proxy: {line}");
    }
    assert_eq!(before_failed, 0);
    assert!(one_down > 20, "load continued while a member was down");
    assert_eq!(one_down_failed, 0, "losing one member fails no handshake");
    assert_eq!(none_failed, none, "with no HSM every new host fails");
    assert!(slowest_failure < Duration::from_secs(4), "failures are fast: {slowest_failure:?}");
    assert!(recovered < Duration::from_secs(5), "recovers within the recovery interval: {recovered:?}");
    assert_eq!(after_failed, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_ha_disabled_only_the_primary_signs_and_nothing_fails_over() {
    let mut group = Group::new("enabled = false").await;
    let status: serde_json::Value =
        serde_json::from_slice(&group.tollgate(&["hsm", "status", "--json"]).stdout).unwrap();
    assert_eq!(status["ha"]["enabled"], false);
    assert!(status["ha"]["group"].is_null());
    assert_eq!(status["servers"][0]["ha_state"], "active");
    assert_eq!(status["servers"][1]["ha_state"], "standby");

    let proxy = group.start();
    let ca = group.ca.clone();
    for i in 0..10 {
        visit(proxy.sni, &ca, &format!("p{i}.ha.test")).await.unwrap();
    }
    assert!(proxy.metric_labeled("tollgate_hsm_sign_duration_seconds_count", "hsm-a").await >= 10);
    assert_eq!(
        proxy.metric_labeled("tollgate_hsm_sign_duration_seconds_count", "hsm-b").await,
        0,
        "the standby never signs"
    );
    group.a.stop();
    assert!(visit(proxy.sni, &ca, "after.ha.test").await.is_err(), "HA off: no failover to the standby");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_hsm_fails_at_the_deadline_and_fails_over() {
    let group = Group::new("").await;
    let proxy = group.start();
    let ca = group.ca.clone();
    for i in 0..4 {
        visit(proxy.sni, &ca, &format!("warm{i}.ha.test")).await.unwrap();
    }
    // Member A stops answering (no error, no closed socket): its calls hang.
    group.a.signal("-STOP");
    let started = std::time::Instant::now();
    for i in 0..20 {
        let host = format!("hung{i}.ha.test");
        tokio::time::timeout(Duration::from_secs(4), visit(proxy.sni, &ca, &host))
            .await
            .unwrap_or_else(|_| panic!("{host}: a hung member must not hang the handshake"))
            .unwrap_or_else(|e| panic!("{host}: fails over to hsm-b: {e}"));
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(8), "at most one deadline (1 s) is paid: {took:?}");
    // The mint stuck behind the hung member on its HSM worker was made again off that worker.
    assert!(proxy.metric("tollgate_mint_fallbacks_total").await >= 1);
    let status: serde_json::Value =
        serde_json::from_str(&http_get(proxy.management, "/api/v1/hsm/status").await).unwrap();
    let a = &status["servers"][0];
    assert_eq!(a["up"], false, "{status}");
    assert!(a["state"].as_str().unwrap().contains("no answer within"), "{a}");
    let info: serde_json::Value = serde_json::from_str(&http_get(proxy.management, "/api/v1/hsm/info").await).unwrap();
    assert!(info["servers"][1]["mechanisms"].as_array().is_some_and(|m| !m.is_empty()), "{info}");
    group.a.signal("-CONT");
}

/// Handshakes waiting on a frozen HSM hold no runtime thread: inbound full handshakes (HA off,
/// so no failover) wait out the deadline off the two threads the inbound listener runs on, and
/// a resumed handshake (no HSM operation) with its request is served meanwhile as if nothing
/// were wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_waiting_on_a_frozen_hsm_hold_no_runtime_thread() {
    let group = Group::new("enabled = false").await;
    group.add_inbound_site("app.ha.test");
    let proxy = group.start_inbound();
    let inbound = proxy.listener("inbound");
    let resuming = trusting_client(group.pki.root.der(), &["http/1.1"]);
    let mut full = (*resuming).clone();
    full.resumption = rustls::client::Resumption::disabled();
    let full = Arc::new(full);
    let visit_inbound = |client: Arc<rustls::ClientConfig>| async move {
        let tls = tls_via_sni(inbound, "app.ha.test", client).await?;
        let resumed = tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
        let (status, _, _) = request(tls, false, get("app.ha.test", "/", false)).await;
        Ok::<_, std::io::Error>((status, resumed))
    };
    assert_eq!(visit_inbound(resuming.clone()).await.unwrap(), (200, false), "signed by hsm-a");

    group.a.signal("-STOP");
    let waiting: Vec<_> = (0..6).map(|_| tokio::spawn(tls_via_sni(inbound, "app.ha.test", full.clone()))).collect();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let started = Instant::now();
    let resumed = visit_inbound(resuming).await.expect("a resumed handshake needs no HSM");
    let took = started.elapsed();
    for handshake in waiting {
        let result = tokio::time::timeout(Duration::from_secs(5), handshake).await.expect("no handshake hangs");
        assert!(result.unwrap().is_err(), "HA off: a frozen primary fails the handshake");
    }
    group.a.signal("-CONT");
    assert_eq!(resumed, (200, true));
    // The call deadline is 1 s: a connection stuck behind the waiting handshakes takes most of it.
    assert!(took < Duration::from_millis(400), "served while handshakes wait on the HSM: {took:?}");
}

/// `/readyz` is 503 until the HSM is open and every listener bound (here: the HSM frozen while
/// the service starts), 200 once they are, and 503 again when no HSM member is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_startup_and_the_hsm() {
    let mut group = Group::new("").await;
    group.stop_b();
    group.a.signal("-STOP");
    // Only the management listener comes up while the HSM does not answer.
    let proxy = Proxy::start_with(group.cmd(), &group.config, 1);
    for _ in 0..3 {
        let (status, body) = http_status(proxy.management, "/readyz").await;
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("listeners not bound") && body.contains("no HSM member up"), "{body}");
        assert_eq!(http_status(proxy.management, "/livez").await.0, 200, "alive meanwhile");
        let (status, body) = http_status(proxy.management, "/api/v1/hsm/status").await;
        assert_eq!(status, 503, "{body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    group.a.signal("-CONT");
    let started = Instant::now();
    let body = loop {
        let (status, body) = http_status(proxy.management, "/readyz").await;
        if status == 200 {
            break body;
        }
        assert!(started.elapsed() < Duration::from_secs(15), "never ready: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(report["ready"], true, "{report}");
    let sni = proxy.wait_log("sni listening", |v| v["message"] == "listening" && v["mode"] == "sni");
    let sni: std::net::SocketAddr = sni["addr"].as_str().unwrap().parse().unwrap();
    visit(sni, &group.ca, "ready.ha.test").await.unwrap();

    // The last member lost (found out by a signature that fails): not ready until it is back.
    group.a.stop();
    assert!(visit(sni, &group.ca, "lost.ha.test").await.is_err());
    let (status, body) = http_status(proxy.management, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("no HSM member up") && !body.contains("listeners not bound"), "{body}");
    group.a.start();
    let back = Instant::now();
    while http_status(proxy.management, "/readyz").await.0 != 200 {
        assert!(back.elapsed() < Duration::from_secs(15), "not ready again after the member came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A PKCS#11 call that never returns (a frozen network HSM) cannot hold the process: on
/// SIGTERM, after the drain, the process waits for it up to the call deadline and then ends with
/// abort; with nothing stuck it exits 0 (tests/limits.rs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_never_returns_ends_the_process_with_abort() {
    use std::os::unix::process::ExitStatusExt;
    let group = Group::new("enabled = false").await;
    let mut proxy = group.start();
    visit(proxy.sni, &group.ca, "first.ha.test").await.unwrap();
    group.a.signal("-STOP");
    assert!(visit(proxy.sni, &group.ca, "stuck.ha.test").await.is_err(), "its mint hangs on hsm-a, then fails");
    proxy.signal("-TERM");
    let started = Instant::now();
    let status = tokio::task::spawn_blocking(move || {
        let status = proxy.wait_status(Duration::from_secs(20));
        (status, proxy)
    })
    .await
    .unwrap();
    let (status, proxy) = status;
    group.a.signal("-CONT");
    assert_eq!(status.signal(), Some(6), "ended by abort (SIGABRT): {status:?}");
    assert!(started.elapsed() < Duration::from_secs(10), "within the call deadline after the drain");
    proxy.wait_log("why", |v| v["message"].as_str().is_some_and(|m| m.contains("never came back")));
}
