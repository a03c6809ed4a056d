//! Inline transparent mode end to end, in network namespaces this test creates: a client
//! namespace routes through a gateway namespace where nftables (the rulesets in deploy/)
//! sends HTTPS to tollgate's transparent listener, on to an origin namespace. The client runs
//! plain `curl https://origin.test/` with only the CA trusted and no proxy settings — over
//! IPv4 and IPv6 with REDIRECT (SO_ORIGINAL_DST, IP6T_SO_ORIGINAL_DST), and over IPv4 with
//! TPROXY (IP_TRANSPARENT).

mod support;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Redirect,
    Tproxy,
}

/// Three namespaces wired client ↔ gateway ↔ origin (IPv4 and IPv6); removed on drop.
struct Net {
    kind: Kind,
    client: String,
    gateway: String,
    origin: String,
    hosts_dir: PathBuf,
    processes: Vec<Child>,
}

impl Net {
    fn new(kind: Kind, port: u16) -> Self {
        require(&["ip", "nft"]);
        let n = (std::process::id() % 10_000) * 10 + kind as u32;
        let (client, gateway, origin) = (format!("tgc{n}"), format!("tgg{n}"), format!("tgo{n}"));
        let net = Self {
            kind,
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
        let addr = |ns: &str, ifname: &str, v4: &str, v6: &str| {
            sh(&["ip", "-n", ns, "addr", "add", v4, "dev", ifname]);
            sh(&["ip", "-n", ns, "addr", "add", v6, "dev", ifname, "nodad"]);
            sh(&["ip", "-n", ns, "link", "set", ifname, "up"]);
        };
        addr(&net.client, &c0, "10.231.1.2/24", "fd31:1::2/64");
        addr(&net.gateway, &c1, "10.231.1.1/24", "fd31:1::1/64");
        addr(&net.gateway, &o1, "10.231.2.1/24", "fd31:2::1/64");
        addr(&net.origin, &o0, "10.231.2.2/24", "fd31:2::2/64");
        for (ns, via4, via6) in [(&net.client, "10.231.1.1", "fd31:1::1"), (&net.origin, "10.231.2.1", "fd31:2::1")] {
            sh(&["ip", "-n", ns, "route", "add", "default", "via", via4]);
            sh(&["ip", "-n", ns, "-6", "route", "add", "default", "via", via6]);
        }
        let (lan, tg_port) = (format!("LAN_IF={c1}"), format!("TOLLGATE_PORT={port}"));
        let defines = ["-D", lan.as_str(), "-D", tg_port.as_str()];
        let ruleset = match kind {
            Kind::Redirect => concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/nftables-transparent.nft"),
            Kind::Tproxy => {
                // Marked packets are delivered locally (the ruleset's header says so).
                sh(&["ip", "-n", &net.gateway, "rule", "add", "fwmark", "0x1", "lookup", "100"]);
                sh(&["ip", "-n", &net.gateway, "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "100"]);
                concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/nftables-tproxy.nft")
            }
        };
        let mut nft = vec!["ip", "netns", "exec", &net.gateway, "nft"];
        nft.extend(defines);
        nft.extend(["-f", ruleset]);
        sh(&nft);
        // The client resolves names through its own /etc/hosts (ip netns exec mounts it).
        std::fs::create_dir_all(&net.hosts_dir).unwrap();
        std::fs::write(
            net.hosts_dir.join("hosts"),
            "127.0.0.1 localhost\n10.231.2.2 origin.test\nfd31:2::2 origin6.test\n",
        )
        .unwrap();
        net
    }

    fn exec(&self, ns: &str, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns, program]);
        cmd
    }

    /// The origin: openssl serving `www` over TLS on port 443, IPv4 and IPv6.
    fn start_origin(&mut self, cert: &std::path::Path, key: &std::path::Path, www: &std::path::Path) {
        for family in ["-4", "-6"] {
            let mut server = self.exec(&self.origin, "openssl");
            server.args(["s_server", "-quiet", "-WWW", family, "-accept", "443", "-cert"]);
            server.arg(cert).arg("-key").arg(key).current_dir(www);
            self.spawn_quiet(server);
        }
    }

    /// Starts `cmd` without its output, stopped when the test ends.
    fn spawn_quiet(&mut self, mut cmd: Command) {
        let child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        self.processes.push(child);
    }

    /// A UDP echo on port 443 in the origin namespace (IPv4 and IPv6), with forwarding on in the
    /// gateway: without the shipped rulesets' reject, QUIC would reach it.
    fn start_udp_origin(&mut self) {
        sh(&["ip", "netns", "exec", &self.gateway, "sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"]);
        sh(&["ip", "netns", "exec", &self.gateway, "sh", "-c", "echo 1 > /proc/sys/net/ipv6/conf/all/forwarding"]);
        // One dual-stack socket: IPv4 clients arrive v4-mapped.
        let echo = "import socket\ns = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n\
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)\ns.bind(('::', 443))\n\
                    while True:\n    data, peer = s.recvfrom(2048)\n    s.sendto(data, peer)\n";
        let mut echo_server = self.exec(&self.origin, "/usr/bin/python3");
        echo_server.args(["-c", echo]);
        self.spawn_quiet(echo_server);
    }

    /// A UDP datagram to port 443 of `addr` from the client namespace: "refused" (ICMP port
    /// unreachable, and how soon), "answered" or "timeout".
    fn udp_443(&self, addr: &str) -> String {
        let probe = format!(
            "import socket, time\n\
             s = socket.socket(socket.AF_INET6 if ':' in '{addr}' else socket.AF_INET, socket.SOCK_DGRAM)\n\
             s.settimeout(3)\ns.connect(('{addr}', 443))\nstart = time.monotonic()\n\
             try:\n    s.send(b'quic?')\n    s.recv(64)\n    print('answered')\n\
             except ConnectionRefusedError:\n    print('refused %.3f' % (time.monotonic() - start))\n\
             except socket.timeout:\n    print('timeout')\n"
        );
        let out = self.exec(&self.client, "/usr/bin/python3").args(["-c", &probe]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Asserts UDP 443 is rejected at once, over IPv4 and IPv6, while the origin would answer.
    fn assert_quic_rejected(&self) {
        for addr in ["10.231.2.2", "fd31:2::2"] {
            // The first datagram on fresh veths can wait out neighbour discovery (IPv6 link-local
            // addresses still in DAD): a gateway in service has its neighbours. Measure the next.
            self.udp_443(addr);
            let seen = self.udp_443(addr);
            let secs: f64 = match seen.strip_prefix("refused ") {
                Some(secs) => secs.parse().unwrap(),
                None => panic!("UDP 443 to {addr} from the client namespace: {seen}"),
            };
            assert!(secs < 1.0, "{addr}: rejected after {secs} s: browsers would wait that long to fall back");
        }
        // Without the reject the datagram would have been answered: the origin listens.
        let gateway = &self.gateway;
        sh(&["ip", "netns", "exec", gateway, "nft", "delete", "chain", "inet", self.table(), "forward"]);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let seen = self.udp_443("10.231.2.2");
            if seen == "answered" {
                break;
            }
            assert!(Instant::now() < deadline, "the origin's UDP echo never answered: {seen}");
        }
    }

    /// Plain curl in the client namespace, retried until the path is up.
    fn curl(&self, url: &str, ca: &std::path::Path, proxy: &Proxy) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = self
                .exec(&self.client, "curl")
                .args(["-sS", "--max-time", "5", "--cacert"])
                .arg(ca)
                .arg(url)
                .output()
                .unwrap();
            if out.status.success() {
                return String::from_utf8_lossy(&out.stdout).into_owned();
            }
            assert!(
                Instant::now() < deadline,
                "curl {url}: {}\nlogs: {:#?}",
                String::from_utf8_lossy(&out.stderr),
                proxy.logs.lock()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Net {
    /// The nftables table the ruleset of this kind makes.
    fn table(&self) -> &'static str {
        match self.kind {
            Kind::Redirect => "tollgate",
            Kind::Tproxy => "tollgate_tproxy",
        }
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

/// Token, CA, origin files and a tollgate in the gateway with one transparent listener.
fn gateway(net: &mut Net, listener: &str) -> (Token, Proxy) {
    let token = Token::new();
    let pki = TestPki::new();
    let www = token.path("www");
    std::fs::create_dir(&www).unwrap();
    std::fs::write(www.join("index.html"), "hello from the origin namespace\n").unwrap();
    let (cert, key) = pki.leaf_files(&LeafSpec::new(&["origin.test", "origin6.test"]), token.dir.path());
    net.start_origin(&cert, &key, &www);
    let config = token.path("tollgate.toml");
    write_config(&token, &config, &ProxyOptions { ca_bundles: vec![pki.bundle()], ..Default::default() });
    let text =
        std::fs::read_to_string(&config).unwrap().replace("mode = \"explicit\"\nlisten = \"127.0.0.1:0\"", listener);
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
    (token, proxy)
}

#[test]
fn redirected_clients_are_intercepted_over_ipv4_and_ipv6() {
    let mut net = Net::new(Kind::Redirect, 8443);
    // One dual-stack listener: IPv4 clients arrive v4-mapped.
    let (token, proxy) = gateway(&mut net, "mode = \"transparent\"\nlisten = \"[::]:8443\"");
    let ca = token.path("ca.pem");
    for url in ["https://origin.test/index.html", "https://origin6.test/index.html"] {
        assert_eq!(net.curl(url, &ca, &proxy), "hello from the origin namespace\n", "{url}");
    }
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
    for host in ["origin.test", "origin6.test"] {
        let line =
            proxy.wait_log(host, |v| v["message"] == "request" && v["mode"] == "transparent" && v["host"] == host);
        assert_eq!(line["status"], 200);
    }
    assert!(
        proxy.log_json().iter().any(|v| v["message"] == "request" && v["host"] == "origin6.test"),
        "the IPv6 request went through tollgate"
    );
    // QUIC has no side door: UDP 443 gets ICMP port-unreachable, TCP 443 (above) is intercepted.
    net.start_udp_origin();
    net.assert_quic_rejected();
}

#[test]
fn tproxy_clients_are_intercepted() {
    let mut net = Net::new(Kind::Tproxy, 8444);
    let (token, proxy) = gateway(&mut net, "mode = \"transparent\"\nlisten = \"0.0.0.0:8444\"\ntproxy = true");
    let body = net.curl("https://origin.test/index.html", &token.path("ca.pem"), &proxy);
    assert_eq!(body, "hello from the origin namespace\n");
    proxy.wait_log("tproxy access log", |v| v["message"] == "request" && v["mode"] == "transparent");
    net.start_udp_origin();
    net.assert_quic_rejected();
}

/// Happy Eyeballs and the deny list, in a namespace of their own: `dual.test` resolves (through
/// the namespace's /etc/hosts) to an IPv6 address whose route goes nowhere — packets silently
/// dropped, the connect never answered — and to the IPv4 origin; `both.test` to a denied address
/// (where a listener accepts and never speaks) and the origin. Each is reached well within the
/// 10 s connect timeout, the denied address never tried; `denied.test` is refused.
#[test]
fn a_silent_ipv6_address_and_a_denied_one_do_not_hold_the_connection() {
    require(&["ip", "openssl", "curl"]);
    let ns = format!("tghe{}", std::process::id() % 100_000);
    let hosts_dir = PathBuf::from(format!("/etc/netns/{ns}"));
    struct Cleanup(String, PathBuf, Vec<Child>);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            for p in &mut self.2 {
                let _ = p.kill();
                let _ = p.wait();
            }
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
            let _ = std::fs::remove_dir_all(&self.1);
        }
    }
    sh(&["ip", "netns", "add", &ns]);
    let mut cleanup = Cleanup(ns.clone(), hosts_dir.clone(), Vec::new());
    let ip = |args: &[&str]| {
        let mut all = vec!["ip", "-n", ns.as_str()];
        all.extend(args);
        sh(&all);
    };
    ip(&["link", "set", "lo", "up"]);
    ip(&["link", "add", "void0", "type", "veth", "peer", "name", "void1"]);
    ip(&["link", "set", "void0", "up"]);
    ip(&["link", "set", "void1", "up"]);
    ip(&["addr", "add", "10.232.0.1/24", "dev", "void0"]);
    ip(&["addr", "add", "10.232.1.1/24", "dev", "void0"]);
    ip(&["-6", "addr", "add", "2001:db8:232::1/64", "dev", "void0", "nodad"]);
    // 2001:db8:232::5 (global scope: the system resolver sorts it before IPv4) is routed, on-link
    // via void0, and everything sent to it vanishes: no answer, no error, as behind an IPv6 path
    // that blackholes.
    let nft =
        "table inet blackhole { chain out { type filter hook output priority 0; ip6 daddr 2001:db8:232::5 drop; }; }";
    sh(&["ip", "netns", "exec", &ns, "nft", nft]);
    std::fs::create_dir_all(&hosts_dir).unwrap();
    std::fs::write(
        hosts_dir.join("hosts"),
        "127.0.0.1 localhost\n2001:db8:232::5 dual.test\n10.232.0.1 dual.test\n10.232.1.1 both.test\n10.232.0.1 both.test\n\
         10.232.1.1 denied.test\n",
    )
    .unwrap();

    let token = Token::new();
    let pki = TestPki::new();
    let www = token.path("www");
    std::fs::create_dir(&www).unwrap();
    std::fs::write(www.join("index.html"), "hello over ipv4\n").unwrap();
    let (cert, key) = pki.leaf_files(&LeafSpec::new(&["dual.test", "both.test", "denied.test"]), token.dir.path());
    let exec = |program: &str| {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns, program]);
        cmd
    };
    let origin = spawn_quiet(
        exec("openssl")
            .args(["s_server", "-quiet", "-WWW", "-4", "-accept", "10.232.0.1:443", "-cert"])
            .arg(&cert)
            .arg("-key")
            .arg(&key)
            .current_dir(&www),
    );
    cleanup.2.push(origin);
    // On the denied address, a listener that accepts and never speaks: dialled, it would hang.
    let mute = exec("python3")
        .args(["-c", "import socket,time; s=socket.socket(); s.bind(('10.232.1.1',443)); s.listen(); time.sleep(600)"])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    cleanup.2.push(mute);

    let config = token.path("tollgate.toml");
    write_config(&token, &config, &ProxyOptions { ca_bundles: vec![pki.bundle()], ..Default::default() });
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("[policy]\n", "[policy]\ndeny_destinations = [\"127.0.0.0/8\", \"10.232.1.0/24\"]\n");
    std::fs::write(&config, format!("{text}\n[limits]\nconnect_timeout_secs = 10\n")).unwrap();
    let out = token
        .cmd(tollgate_bin())
        .args(["cert", "generate-ca", "--config", config.to_str().unwrap(), "--name", "ca", "--on-hsm"])
        .args(["--forward-trust", "--out-cert", token.path("ca.pem").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut run = exec(tollgate_bin());
    run.env("SOFTHSM2_CONF", token.conf());
    let proxy = Proxy::start_with(run, &config, 3);
    let port = proxy.sni.port();

    let curl = |host: &str| {
        let started = Instant::now();
        let out = exec("curl")
            .args(["-sS", "--max-time", "20", "--cacert", token.path("ca.pem").to_str().unwrap()])
            .args(["--resolve", &format!("{host}:{port}:127.0.0.1")])
            .arg(format!("https://{host}:{port}/index.html"))
            .output()
            .unwrap();
        (out, started.elapsed())
    };
    for host in ["dual.test", "both.test"] {
        let (out, took) = curl(host);
        assert!(out.status.success(), "{host}: {}\n{:#?}", String::from_utf8_lossy(&out.stderr), proxy.logs.lock());
        assert_eq!(String::from_utf8_lossy(&out.stdout), "hello over ipv4\n");
        assert!(took < Duration::from_secs(3), "{host}: reached in {took:?}, not after the 10 s connect timeout");
    }
    let (out, took) = curl("denied.test");
    assert!(!out.status.success() && took < Duration::from_secs(3), "denied.test: refused at once ({took:?})");
    proxy.wait_log("refusal", |v| v["error"].as_str().is_some_and(|e| e.contains("deny_destinations")));
}
