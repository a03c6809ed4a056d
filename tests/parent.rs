//! Egress through a parent proxy: a real Squid with `basic_ncsa_auth` in front of the
//! origins. Intercepted, tunnelled and plain-HTTP traffic all go through it with tollgate's
//! credentials; the origin's certificate is still validated end to end through the tunnel; the
//! parent's refusals (a wrong password: 407, an ACL: 403) reach curl as a `tollgate-error`; and
//! `no_parent` destinations go direct.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use support::*;

/// A Squid on a free loopback port; killed on drop.
struct Squid {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Squid {
    /// Squid requiring Basic credentials (`user`, `password`) for everything, denying
    /// `banned.test`, resolving names from its own hosts file.
    fn start(dir: &Path, hosts: &[(&str, &str)], user: &str, password: &str) -> Self {
        require(&["squid", "openssl"]);
        let dir = dir.join("squid");
        std::fs::create_dir_all(&dir).unwrap();
        // Squid drops root for its own user: its files must be readable, its logs writable.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        std::fs::set_permissions(dir.parent().unwrap(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let hash = Command::new("openssl").args(["passwd", "-apr1", password]).output().unwrap();
        assert!(hash.status.success());
        std::fs::write(dir.join("passwd"), format!("{user}:{}", String::from_utf8_lossy(&hash.stdout))).unwrap();
        let hosts: String = hosts.iter().map(|(name, ip)| format!("{ip} {name}\n")).collect();
        std::fs::write(dir.join("hosts"), hosts).unwrap();
        let port = free_port();
        let d = dir.display();
        let config = format!(
            "http_port 127.0.0.1:{port}\nvisible_hostname parent.test\npid_filename {d}/squid.pid\n\
             cache_log {d}/cache.log\naccess_log stdio:{d}/access.log squid\ncache deny all\n\
             hosts_file {d}/hosts\ncoredump_dir {d}\nshutdown_lifetime 0 seconds\npinger_enable off\n\
             auth_param basic program /usr/lib/squid/basic_ncsa_auth {d}/passwd\nauth_param basic realm parent\n\
             acl authed proxy_auth REQUIRED\nacl banned dstdomain banned.test\nacl CONNECT method CONNECT\n\
             http_access deny !authed\nhttp_access deny banned\nhttp_access allow authed\nhttp_access deny all\n"
        );
        std::fs::write(dir.join("squid.conf"), config).unwrap();
        // A service name of its own: two Squids at once must not share memory segments.
        let child = spawn_quiet(
            Command::new("squid").args(["-N", "-n", &format!("tg{port}"), "-f"]).arg(dir.join("squid.conf")),
        );
        let squid = Self { child, addr: SocketAddr::from(([127, 0, 0, 1], port)), dir };
        wait_for("squid listening", Duration::from_secs(30), || std::net::TcpStream::connect(squid.addr).is_ok());
        squid
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("cache.log")).unwrap_or_default()
    }

    /// Squid's access log (written as requests end).
    fn access(&self) -> String {
        std::fs::read_to_string(self.dir.join("access.log")).unwrap_or_default()
    }

    /// Waits for an access log line containing every one of `parts`.
    fn wait_access(&self, parts: &[&str]) -> String {
        let mut found = None;
        wait_for(&format!("a squid access line with {parts:?}"), Duration::from_secs(10), || {
            found = self.access().lines().find(|l| parts.iter().all(|p| l.contains(p))).map(str::to_string);
            found.is_some()
        });
        found.unwrap()
    }
}

impl Drop for Squid {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// tollgate with `parent` and a credentials file holding `credentials`, trusting `pki`.
fn proxy_through(
    pki: &TestPki,
    squid: &Squid,
    credentials: &str,
    extra_upstream: &str,
    resolve: Vec<(String, SocketAddr)>,
) -> (Setup, Proxy) {
    let options = ProxyOptions {
        ca_bundles: vec![pki.bundle()],
        no_decrypt: vec!["tunnel.test".into()],
        resolve,
        upstream: format!("parent = \"http://{}\"\nparent_auth_file = \"PARENT_AUTH\"\n{extra_upstream}", squid.addr),
        ..Default::default()
    };
    let setup = Setup::new(&options);
    let auth_file = setup.token.path("parent.auth");
    std::fs::write(&auth_file, format!("{credentials}\n")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&auth_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let config = std::fs::read_to_string(&setup.config).unwrap().replace("PARENT_AUTH", auth_file.to_str().unwrap());
    std::fs::write(&setup.config, config).unwrap();
    let proxy = setup.start();
    (setup, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_goes_through_an_authenticating_squid_and_its_refusals_are_clear() {
    let work = tempfile::tempdir().unwrap();
    let pki = TestPki::new();
    let (chain, key) = pki.leaf(&LeafSpec::new(&["origin.test", "tunnel.test", "banned.test", "direct.test"]));
    let origin = Origin::start("tls", chain, key, &["h2", "http/1.1"]).await;
    let (chain, key) = pki.leaf(&LeafSpec { self_signed: true, ..LeafSpec::new(&["selfsigned.test"]) });
    let self_signed = Origin::start("self", chain, key, &["http/1.1"]).await;
    let plain = Origin::start_plain("plain").await;
    let hosts = [
        ("origin.test", "127.0.0.1"),
        ("tunnel.test", "127.0.0.1"),
        ("banned.test", "127.0.0.1"),
        ("selfsigned.test", "127.0.0.1"),
        ("plain.test", "127.0.0.1"),
    ];
    let squid = Squid::start(work.path(), &hosts, "tollgate", "right horse battery");
    // direct.test is not in Squid's hosts file: it can only work by going around the parent.
    let direct = vec![(format!("direct.test:{}", origin.addr.port()), origin.addr)];
    let (setup, proxy) = proxy_through(
        &pki,
        &squid,
        "tollgate:right horse battery",
        "no_parent = [\"direct.test\", \"192.0.2.0/24\"]",
        direct,
    );
    let explicit = format!("http://{}", proxy.explicit);
    let trust = setup.token.path("trust.pem");
    let (trust, root) = (trust.to_str().unwrap(), pki.bundle());
    let root = root.to_str().unwrap();
    let port = origin.addr.port();

    // Intercepted through the parent: tollgate's certificate, the origin's answer, and the
    // origin's own certificate validated through the tunnel (trusted verdict).
    let url = format!("https://origin.test:{port}/through");
    let out = curl_for(20, &["--proxy", &explicit, "--cacert", trust, &url]).await;
    assert!(out.status.success(), "{}\n{}\n{}", printed(&out), proxy.logs.lock().join("\n"), squid.log());
    assert!(String::from_utf8_lossy(&out.stdout).contains("path=/through"), "{}", printed(&out));
    let session = proxy.wait_log("decryption", |v| v["sni"] == "origin.test" && v["decision"] == "decrypt");
    assert_eq!(session["chain_status"], "trusted", "{session}");

    // Validation is unchanged through the tunnel: a self-signed origin gets an untrusted leaf.
    let url = format!("https://selfsigned.test:{}/x", self_signed.addr.port());
    let out = curl_for(20, &["--proxy", &explicit, "--cacert", trust, &url]).await;
    assert!(!out.status.success(), "a self-signed origin was vouched for through the parent: {}", printed(&out));
    let session = proxy.wait_log("untrusted", |v| v["sni"] == "selfsigned.test" && v["chain_status"].is_string());
    assert_eq!(session["chain_status"], "untrusted_issuer", "{session}");

    // Tunnelled (no-decrypt) through the parent: the origin's own certificate.
    let url = format!("https://tunnel.test:{port}/tunnelled");
    let out = curl_for(20, &["--proxy", &explicit, "--cacert", root, &url]).await;
    assert!(out.status.success(), "{}", printed(&out));

    // Plain HTTP: an absolute-form request to the parent.
    let url = format!("http://plain.test:{}/plain?q=1", plain.addr.port());
    let out = curl_for(20, &["--proxy", &explicit, &url]).await;
    assert!(String::from_utf8_lossy(&out.stdout).contains("origin=plain path=/plain "), "{}", printed(&out));

    // no_parent: straight to the origin; Squid never hears of it.
    let url = format!("https://direct.test:{port}/direct");
    let out = curl_for(20, &["--proxy", &explicit, "--cacert", trust, &url]).await;
    assert!(out.status.success(), "{}", printed(&out));
    assert!(!squid.access().contains("direct.test"), "{}", squid.access());

    // The parent's ACL refuses: a 502 naming the parent's 403, on the client's CONNECT.
    let url = format!("https://banned.test:{port}/");
    let out = curl_for(20, &["--proxy", &explicit, "--cacert", trust, "-D", "-", &url]).await;
    let said = printed(&out).to_ascii_lowercase();
    assert!(said.contains("502") && said.contains("tollgate-error: parent-refused"), "{said}");
    let url = format!("http://banned.test:{}/", plain.addr.port());
    let out = curl_for(20, &["--proxy", &explicit, "-i", &url]).await;
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(" 403 "),
        "absolute-form: the parent's page: {}",
        printed(&out)
    );

    // Credentials never reach a log.
    let logs = proxy.logs.lock().join("\n");
    assert!(!logs.contains("right horse") && !logs.contains("cmlnaHQgaG9yc2"), "credentials in the log");

    // Squid logs a transaction when it ends: once tollgate has closed its pooled connections,
    // each went through the parent, as the user tollgate authenticated as.
    drop(proxy);
    let line = squid.wait_access(&["CONNECT", &format!("origin.test:{port}"), "tollgate"]);
    assert!(line.contains("/200 "), "{line}");
    squid.wait_access(&["CONNECT", &format!("tunnel.test:{port}"), "tollgate"]);
    squid.wait_access(&["GET", &format!("http://plain.test:{}/plain?", plain.addr.port()), "tollgate"]);
    assert!(!squid.access().contains("direct.test"), "{}", squid.access());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_parent_password_is_a_clear_error_not_a_407_to_the_client() {
    let work = tempfile::tempdir().unwrap();
    let pki = TestPki::new();
    let (chain, key) = pki.leaf(&LeafSpec::new(&["origin.test"]));
    let origin = Origin::start("tls", chain, key, &["http/1.1"]).await;
    let plain = Origin::start_plain("plain").await;
    let hosts = [("origin.test", "127.0.0.1"), ("plain.test", "127.0.0.1")];
    let squid = Squid::start(work.path(), &hosts, "tollgate", "right");
    let (setup, proxy) = proxy_through(&pki, &squid, "tollgate:wrong", "", vec![]);
    let explicit = format!("http://{}", proxy.explicit);
    let trust = setup.token.path("trust.pem");

    let url = format!("https://origin.test:{}/", origin.addr.port());
    let out = curl_for(20, &["--proxy", &explicit, "--cacert", trust.to_str().unwrap(), "-D", "-", &url]).await;
    let said = printed(&out).to_ascii_lowercase();
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("502") && said.contains("tollgate-error: parent-auth-failed"), "{said}");
    let refused = proxy.wait_log("refusal", |v| v["error"].as_str().is_some_and(|e| e.contains("407")));
    assert!(refused["error"].as_str().unwrap().contains("parent_auth_file"), "{refused}");

    let url = format!("http://plain.test:{}/", plain.addr.port());
    let out = curl_for(20, &["--proxy", &explicit, "-i", &url]).await;
    let said = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    assert!(said.starts_with("http/1.1 502") && said.contains("tollgate-error: parent-auth-failed"), "{said}");
    assert!(!said.contains("proxy-authenticate"), "the parent's challenge reached the client: {said}");
    assert_eq!(origin.requests.load(std::sync::atomic::Ordering::SeqCst), 0);

    // A parent that is not there: a clear 502 too, and tollgate keeps serving.
    drop(squid);
    let out = curl_for(20, &["--proxy", &explicit, "-i", &url]).await;
    let said = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    assert!(said.starts_with("http/1.1 502") && said.contains("parent proxy"), "{said}");
}

/// Where the only way out is the parent, tollgate's own fetches go through it too: a CRL whose
/// host only Squid can resolve is fetched through Squid, so a good upstream stays trusted and a
/// revoked one is blocked (rather than both becoming "revocation unknown").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crls_are_fetched_through_the_parent() {
    let work = tempfile::tempdir().unwrap();
    let (issuer, root_pem) = revoking_ca("parent CRL test root");
    let bundle = work.path().join("root.pem");
    std::fs::write(&bundle, root_pem).unwrap();
    let (crl_addr, fetches) = crl_server(Some(crl_der(&issuer, &[2]))).await;
    // crl.test is in Squid's hosts file only: fetched directly, it would not resolve.
    let crl_url = format!("http://crl.test:{}/root.crl", crl_addr.port());
    let leaf = |name: &str, serial: u8| leaf_with_crl(&issuer, name, serial, Some(crl_url.clone()));
    let (chain, key) = leaf("good.test", 1);
    let good = Origin::start("good", chain, key, &["http/1.1"]).await;
    let (chain, key) = leaf("revoked.test", 2);
    let revoked = Origin::start("revoked", chain, key, &["http/1.1"]).await;
    let hosts = [("good.test", "127.0.0.1"), ("revoked.test", "127.0.0.1"), ("crl.test", "127.0.0.1")];
    let squid = Squid::start(work.path(), &hosts, "tollgate", "pw");
    let pki = TestPki::new();
    let (setup, proxy) = proxy_through(&pki, &squid, "tollgate:pw", "", vec![]);
    let config = std::fs::read_to_string(&setup.config).unwrap();
    let bundles = format!("ca_bundles = [\"{}\"]", bundle.display());
    std::fs::write(
        &setup.config,
        config.replacen(&format!("ca_bundles = [\"{}\"]", pki.bundle().display()), &bundles, 1),
    )
    .unwrap();
    drop(proxy);
    let proxy = setup.start();
    let explicit = format!("http://{}", proxy.explicit);
    let trust = setup.token.path("trust.pem");

    let url = format!("https://good.test:{}/", good.addr.port());
    let out = curl_for(20, &["--proxy", &explicit, "--cacert", trust.to_str().unwrap(), &url]).await;
    assert!(out.status.success(), "{}", printed(&out));
    let session = proxy.wait_log("good", |v| v["sni"] == "good.test" && v["revocation"].is_string());
    assert_eq!(
        (session["revocation"].as_str(), session["revocation_source"].as_str()),
        (Some("good"), Some("crl")),
        "{session}"
    );
    let url = format!("https://revoked.test:{}/", revoked.addr.port());
    let out = curl_for(20, &["--proxy", &explicit, "--cacert", trust.to_str().unwrap(), &url]).await;
    assert!(!out.status.success(), "a revoked upstream was served: {}", printed(&out));
    let session = proxy.wait_log("revoked", |v| v["sni"] == "revoked.test" && v["chain_status"].is_string());
    assert_eq!(session["chain_status"], "revoked", "{session}");
    assert_eq!(fetches.load(std::sync::atomic::Ordering::SeqCst), 1, "one fetch, through the parent, for both");
    squid.wait_access(&["GET", &crl_url, "tollgate"]);
}
