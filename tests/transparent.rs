//! Inline transparent mode end to end, in network namespaces this test creates: a client
//! namespace routes through a gateway namespace where nftables (deploy/nftables-transparent.nft)
//! redirects HTTPS to tollgate's transparent listener, to an origin namespace. The client runs
//! plain `curl https://origin.test/` with only the CA trusted and no proxy settings.

mod support;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Three namespaces wired client ↔ gateway ↔ origin; removed on drop.
struct Net {
    client: String,
    gateway: String,
    origin: String,
    hosts_dir: PathBuf,
    processes: Vec<Child>,
}

impl Net {
    fn new() -> Self {
        for tool in ["ip", "nft"] {
            let found = Command::new("sh").arg("-c").arg(format!("command -v {tool}")).status().map(|s| s.success());
            assert!(found.unwrap_or(false), "{tool} missing: run `bash deploy/install-deps`");
        }
        let n = std::process::id() % 100_000;
        let (client, gateway, origin) = (format!("tgc{n}"), format!("tgg{n}"), format!("tgo{n}"));
        let net = Self {
            hosts_dir: PathBuf::from(format!("/etc/netns/{client}")),
            client,
            gateway,
            origin,
            processes: Vec::new(),
        };
        for ns in [&net.client, &net.gateway, &net.origin] {
            sh(&["ip", "netns", "add", ns]);
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        let (c0, c1, o0, o1) = (format!("tg{n}c0"), format!("tg{n}c1"), format!("tg{n}o0"), format!("tg{n}o1"));
        sh(&[
            "ip",
            "link",
            "add",
            &c0,
            "netns",
            &net.client,
            "type",
            "veth",
            "peer",
            "name",
            &c1,
            "netns",
            &net.gateway,
        ]);
        sh(&[
            "ip",
            "link",
            "add",
            &o0,
            "netns",
            &net.origin,
            "type",
            "veth",
            "peer",
            "name",
            &o1,
            "netns",
            &net.gateway,
        ]);
        let addr = |ns: &str, ifname: &str, cidr: &str| {
            sh(&["ip", "-n", ns, "addr", "add", cidr, "dev", ifname]);
            sh(&["ip", "-n", ns, "link", "set", ifname, "up"]);
        };
        addr(&net.client, &c0, "10.231.1.2/24");
        addr(&net.gateway, &c1, "10.231.1.1/24");
        addr(&net.gateway, &o1, "10.231.2.1/24");
        addr(&net.origin, &o0, "10.231.2.2/24");
        sh(&["ip", "-n", &net.client, "route", "add", "default", "via", "10.231.1.1"]);
        sh(&["ip", "-n", &net.origin, "route", "add", "default", "via", "10.231.2.1"]);
        sh(&["ip", "netns", "exec", &net.gateway, "sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        let ruleset = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/nftables-transparent.nft");
        sh(&[
            "ip",
            "netns",
            "exec",
            &net.gateway,
            "nft",
            "-D",
            &format!("LAN_IF={c1}"),
            "-D",
            "TOLLGATE_PORT=8443",
            "-f",
            ruleset,
        ]);
        // The client resolves origin.test through its own /etc/hosts (ip netns exec mounts it).
        std::fs::create_dir_all(&net.hosts_dir).unwrap();
        std::fs::write(net.hosts_dir.join("hosts"), "127.0.0.1 localhost\n10.231.2.2 origin.test\n").unwrap();
        net
    }

    fn exec(&self, ns: &str, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns, program]);
        cmd
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for p in &mut self.processes {
            let _ = p.kill();
            let _ = p.wait();
        }
        for ns in [&self.client, &self.gateway, &self.origin] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = std::fs::remove_dir_all(&self.hosts_dir);
    }
}

#[test]
fn redirected_clients_are_intercepted_with_an_hsm_minted_leaf() {
    let mut net = Net::new();
    let token = Token::new();
    let pki = TestPki::new();

    // The origin, in its namespace: openssl serving one file over TLS.
    let www = token.path("www");
    std::fs::create_dir(&www).unwrap();
    std::fs::write(www.join("index.html"), "hello from the origin namespace\n").unwrap();
    let (cert_pem, key_pem) = pki.leaf_files(&LeafSpec::new(&["origin.test"]), token.dir.path());
    let origin = net
        .exec(&net.origin, "openssl")
        .args(["s_server", "-quiet", "-WWW", "-accept", "443", "-cert"])
        .arg(&cert_pem)
        .arg("-key")
        .arg(&key_pem)
        .current_dir(&www)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    net.processes.push(origin);

    // tollgate in the gateway namespace, CA on the token.
    let config = token.path("tollgate.toml");
    write_config(&token, &config, &ProxyOptions { ca_bundles: vec![pki.bundle()], ..Default::default() });
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("mode = \"explicit\"\nlisten = \"127.0.0.1:0\"", "mode = \"transparent\"\nlisten = \"0.0.0.0:8443\"");
    std::fs::write(&config, text).unwrap();
    let out = token
        .cmd(tollgate_bin())
        .args([
            "cert",
            "generate-ca",
            "--config",
            config.to_str().unwrap(),
            "--name",
            "ca",
            "--on-hsm",
            "--forward-trust",
        ])
        .args(["--out-cert", token.path("ca.pem").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut run = net.exec(&net.gateway, tollgate_bin());
    run.env("SOFTHSM2_CONF", token.conf());
    let proxy = Proxy::start_with(run, &config, 3);

    // The client: plain curl, only the CA trusted, no proxy settings.
    let ca = token.path("ca.pem");
    let deadline = Instant::now() + Duration::from_secs(10);
    let body = loop {
        let out = net
            .exec(&net.client, "curl")
            .args(["-sS", "--max-time", "5", "--cacert", ca.to_str().unwrap(), "https://origin.test/index.html"])
            .output()
            .unwrap();
        if out.status.success() {
            break String::from_utf8_lossy(&out.stdout).into_owned();
        }
        assert!(
            Instant::now() < deadline,
            "curl: {}\nlogs: {:#?}",
            String::from_utf8_lossy(&out.stderr),
            proxy.logs.lock()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(body, "hello from the origin namespace\n");

    let out = net
        .exec(&net.client, "openssl")
        .args([
            "s_client",
            "-connect",
            "origin.test:443",
            "-servername",
            "origin.test",
            "-CAfile",
            ca.to_str().unwrap(),
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("issuer=CN = tollgate Forward Trust CA (ca)"), "{text}");
    assert!(text.contains("Verify return code: 0 (ok)"), "{text}");
    let line = proxy.wait_log("transparent access log", |v| v["message"] == "request" && v["mode"] == "transparent");
    assert_eq!(line["host"], "origin.test");
}
