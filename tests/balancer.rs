//! Behind a load balancer: a real HAProxy sends the PROXY protocol (v2, and v1) to tollgate's
//! sni listener, in a network namespace this test creates, where clients connect from
//! 10.9.0.5 and 10.20.0.5. A rule exempting 10.9.0.0/16 from decryption must see those
//! addresses, not HAProxy's: clients from that network get the origin's certificate, others
//! tollgate's. A peer outside `trusted_proxies` and a trusted one without a header are refused.
//! Per-client limits count the address the header carries.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A namespace with the two client addresses on its loopback; removed with its processes.
struct Namespace {
    name: String,
    processes: Vec<Child>,
}

impl Namespace {
    fn new() -> Self {
        require(&["ip", "haproxy", "curl"]);
        let name = format!("tgpp{}", std::process::id() % 100_000);
        sh(&["ip", "netns", "add", &name]);
        let ns = Self { name, processes: Vec::new() };
        sh(&["ip", "-n", &ns.name, "link", "set", "lo", "up"]);
        for client in ["10.9.0.5/32", "10.20.0.5/32"] {
            sh(&["ip", "-n", &ns.name, "addr", "add", client, "dev", "lo"]);
        }
        ns
    }

    fn exec(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    fn spawn(&mut self, mut cmd: Command) {
        let child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        self.processes.push(child);
    }

    /// curl from `source` (retried while HAProxy comes up): the body, or curl's error.
    fn curl(&self, source: &str, url: &str, ca: &Path) -> Result<String, String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = self
                .exec("curl")
                .args(["-sS", "--max-time", "5", "--interface", source, "--cacert"])
                .arg(ca)
                .args(["--resolve", "origin.test:443:127.0.0.1", "--resolve", "origin.test:8443:127.0.0.1", url])
                .output()
                .unwrap();
            let result = match out.status.success() {
                true => Ok(String::from_utf8_lossy(&out.stdout).into_owned()),
                false => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
            };
            // Exit 7, connection refused: HAProxy is not listening yet.
            if out.status.code() != Some(7) || Instant::now() > deadline {
                return result;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        for p in &mut self.processes {
            let _ = p.kill();
            let _ = p.wait();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

fn haproxy_config(dir: &Path, tollgate: SocketAddr) -> PathBuf {
    let config = dir.join("haproxy.cfg");
    std::fs::write(
        &config,
        format!(
            "global\n  maxconn 200\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
             frontend v2\n  bind 127.0.0.1:443\n  default_backend tollgate-v2\n\
             backend tollgate-v2\n  server tg {tollgate} send-proxy-v2\n\
             frontend v1\n  bind 127.0.0.1:8443\n  default_backend tollgate-v1\n\
             backend tollgate-v1\n  server tg {tollgate} send-proxy\n"
        ),
    )
    .unwrap();
    config
}

/// An HTTPS file server on 127.0.0.1:4443 serving the working directory, a thread per
/// connection; certificate and key files as arguments.
const THREADED_HTTPS: &str = "import http.server, ssl, sys\n\
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 4443), http.server.SimpleHTTPRequestHandler)\n\
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)\n\
    context.load_cert_chain(sys.argv[1], sys.argv[2])\n\
    server.socket = context.wrap_socket(server.socket, server_side=True)\n\
    server.serve_forever()\n";

#[test]
fn behind_haproxy_rules_and_logs_see_the_real_client() {
    let mut ns = Namespace::new();
    let pki = TestPki::new();
    let options = ProxyOptions {
        ca_bundles: vec![pki.bundle()],
        resolve: vec![("origin.test:443".into(), "127.0.0.1:4443".parse().unwrap())],
        sni_listener: "proxy_protocol = true\ntrusted_proxies = [\"127.0.0.1/32\"]\n".into(),
        extra: "[[decryption.rule]]\nname = \"lab-exempt\"\nsources = [\"10.9.0.0/16\"]\naction = \"no-decrypt\"\n"
            .into(),
        ..Default::default()
    };
    let setup = Setup::new(&options);
    let www = setup.token.path("www");
    std::fs::create_dir(&www).unwrap();
    std::fs::write(www.join("index.html"), "hello from the origin\n").unwrap();
    let (cert, key) = pki.leaf_files(&LeafSpec::new(&["origin.test"]), setup.token.dir.path());
    // A threaded origin: tollgate may keep an idle upstream connection open (pooled), which
    // would hold a one-connection-at-a-time server such as `openssl s_server -WWW`.
    let mut origin = ns.exec("/usr/bin/python3");
    origin.args(["-c", THREADED_HTTPS]).arg(&cert).arg(&key);
    origin.current_dir(&www);
    ns.spawn(origin);
    let mut run = ns.exec(tollgate_bin());
    run.env("SOFTHSM2_CONF", setup.token.conf());
    let proxy = Proxy::start_with(run, &setup.config, 3);
    let mut haproxy = ns.exec("haproxy");
    haproxy.args(["-db", "-f"]).arg(haproxy_config(setup.token.dir.path(), proxy.sni));
    ns.spawn(haproxy);

    let (root, tollgate_ca) = (pki.bundle(), setup.token.path("trust.pem"));
    // From the exempt network: the origin's own certificate, through HAProxy (v2 and v1).
    for url in ["https://origin.test/index.html", "https://origin.test:8443/index.html"] {
        let body =
            ns.curl("10.9.0.5", url, &root).unwrap_or_else(|e| panic!("{url}: {e}\n{}", proxy.logs.lock().join("\n")));
        assert_eq!(body, "hello from the origin\n");
    }
    // From elsewhere: decrypted, tollgate's certificate.
    for url in ["https://origin.test/index.html", "https://origin.test:8443/index.html"] {
        let body = ns
            .curl("10.20.0.5", url, &tollgate_ca)
            .unwrap_or_else(|e| panic!("{url}: {e}\n{}", proxy.logs.lock().join("\n")));
        assert_eq!(body, "hello from the origin\n");
        assert!(ns.curl("10.20.0.5", url, &root).is_err(), "{url}: not the origin's certificate");
    }
    let tunnel = proxy.wait_log("tunnel", |v| v["action"] == "tunnel" && v["rule"] == "lab-exempt");
    assert!(tunnel["client"].as_str().unwrap().starts_with("10.9.0.5:"), "{tunnel}");
    let request = proxy.wait_log("request", |v| v["message"] == "request" && v["path"] == "/index.html");
    assert!(request["client"].as_str().unwrap().starts_with("10.20.0.5:"), "{request}");
    assert!(
        !proxy.log_json().iter().any(|v| v["client"].as_str().is_some_and(|c| c.starts_with("127.0.0.1:"))),
        "HAProxy's own address never stands for a client"
    );

    // Straight to tollgate: from outside trusted_proxies, or trusted but without a header.
    let direct = format!("https://origin.test:{}/index.html", proxy.sni.port());
    let direct = direct.as_str();
    let out = ns
        .exec("curl")
        .args(["-sS", "--max-time", "5", "--interface", "10.20.0.5", "--cacert"])
        .arg(&tollgate_ca)
        .args(["--resolve", &format!("origin.test:{}:127.0.0.1", proxy.sni.port()), direct])
        .output()
        .unwrap();
    assert!(!out.status.success(), "an untrusted peer was served");
    proxy.wait_log("untrusted", |v| {
        v["message"] == "connection refused"
            && v["error"].as_str().is_some_and(|e| e.contains("not in trusted_proxies"))
    });
    let out = ns
        .exec("curl")
        .args(["-sS", "--max-time", "5", "--cacert"])
        .arg(&tollgate_ca)
        .args(["--resolve", &format!("origin.test:{}:127.0.0.1", proxy.sni.port()), direct])
        .output()
        .unwrap();
    assert!(!out.status.success(), "a connection without a header was served");
    proxy.wait_log("headerless", |v| {
        v["message"] == "connection refused"
            && v["error"].as_str().is_some_and(|e| e.contains("no PROXY protocol header"))
    });
}

/// A PROXY v2 header for a TCP/IPv4 client.
fn v2_header(client: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let (SocketAddr::V4(c), SocketAddr::V4(d)) = (client, destination) else { panic!("IPv4 only") };
    let mut header = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    header.extend([0x21, 0x11, 0, 12]);
    header.extend(c.ip().octets());
    header.extend(d.ip().octets());
    header.extend(c.port().to_be_bytes());
    header.extend(d.port().to_be_bytes());
    header
}

/// Whether the proxy closes a connection that sent `header` within a second (refused) or keeps
/// it open (admitted, waiting for its ClientHello).
async fn refused_after(proxy: SocketAddr, header: &[u8]) -> (bool, tokio::net::TcpStream) {
    let mut stream = tokio::net::TcpStream::connect(proxy).await.unwrap();
    stream.write_all(header).await.unwrap();
    let mut buf = [0u8; 16];
    let refused =
        matches!(tokio::time::timeout(Duration::from_secs(1), stream.read(&mut buf)).await, Ok(Ok(0) | Err(_)));
    (refused, stream)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_client_limits_count_the_address_the_header_carries() {
    let pki = TestPki::new();
    let (chain, key) = pki.leaf(&LeafSpec::new(&["origin.test"]));
    let origin = Origin::start("balanced", chain, key, &["http/1.1"]).await;
    let options = ProxyOptions {
        ca_bundles: vec![pki.bundle()],
        resolve: vec![("origin.test:443".into(), origin.addr)],
        sni_listener: "proxy_protocol = true\ntrusted_proxies = [\"127.0.0.0/8\"]\n".into(),
        extra: "[limits]\nper_client_connections = 3\nhandshake_timeout_secs = 30\n".into(),
        ..Default::default()
    };
    let setup = Setup::new(&options);
    let proxy = setup.start();
    let to = "192.0.2.1:443".parse().unwrap();
    let (a, b): (SocketAddr, SocketAddr) = ("10.30.0.1:5000".parse().unwrap(), "10.30.0.2:5000".parse().unwrap());
    // Three connections "from" 10.30.0.1, all from one balancer address: the fourth is refused.
    let mut held = Vec::new();
    for _ in 0..3 {
        let (refused, stream) = refused_after(proxy.sni, &v2_header(a, to)).await;
        assert!(!refused, "within the client's share");
        held.push(stream);
    }
    let (refused, _) = refused_after(proxy.sni, &v2_header(a, to)).await;
    assert!(refused, "a fourth connection from 10.30.0.1");
    proxy.wait_log("limit", |v| {
        v["message"] == "connection refused: per_client_connections reached" && v["client"] == "10.30.0.1:5000"
    });
    // Another client behind the same balancer is served end to end.
    let mut stream = tokio::net::TcpStream::connect(proxy.sni).await.unwrap();
    stream.write_all(&v2_header(b, to)).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(trusting_client(&setup.trust_ca, &["http/1.1"]));
    let tls = tls.connect("origin.test".try_into().unwrap(), stream).await.expect("10.30.0.2 is served");
    let (status, _, body) = request(tls, false, get("origin.test", "/balanced", false)).await;
    assert_eq!((status, body.contains("path=/balanced")), (200, true), "{body}");
    proxy.wait_log("access", |v| v["message"] == "request" && v["client"] == "10.30.0.2:5000");
    // A freed place is free again.
    drop(held.pop());
    let started = Instant::now();
    while refused_after(proxy.sni, &v2_header(a, to)).await.0 {
        assert!(started.elapsed() < Duration::from_secs(5), "the freed place was not given back");
    }
    let metrics = http_get(proxy.management, "/metrics").await;
    assert!(metrics.contains("tollgate_connections_refused_total{reason=\"per_client_connections\"}"), "{metrics}");
}
