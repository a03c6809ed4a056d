//! Shared fixtures for the integration tests: a real SoftHSM2 token per test, the real
//! `tollgate` binary, a test PKI made with rcgen, in-process hyper origins, real clients.
//! Nothing here is mocked; a missing tool is a failure (install it with `deploy/install-test-deps`).

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub const SO_PIN: &str = "so-pin-123456";
pub const USER_PIN: &str = "user-pin-654321";
pub const SOFTHSM_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// Fails (never skips) when one of `tools` is missing.
pub fn require(tools: &[&str]) {
    for tool in tools {
        let found = Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().map(|o| o.status.success());
        assert!(
            found.unwrap_or(false),
            "{tool} is missing: run `bash deploy/install-test-deps` (the README's test command does)"
        );
    }
}

/// Fails (never skips) when a tool the tests drive is missing.
pub fn require_tools() {
    require(&["softhsm2-util", "curl", "openssl", "pkcs11-tool"]);
    assert!(Path::new(SOFTHSM_MODULE).exists(), "{SOFTHSM_MODULE} missing: run `bash deploy/install-test-deps`");
}

/// A private SoftHSM2 token directory with one initialised token.
pub struct Token {
    pub dir: tempfile::TempDir,
    pub label: String,
}

impl Token {
    pub fn new() -> Self {
        require_tools();
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("tokens")).unwrap();
        std::fs::write(
            dir.path().join("softhsm2.conf"),
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                dir.path().join("tokens").display()
            ),
        )
        .unwrap();
        std::fs::write(dir.path().join("user.pin"), format!("{USER_PIN}\n")).unwrap();
        let label = "tollgate-test".to_string();
        let token = Self { dir, label };
        let out = token
            .cmd("softhsm2-util")
            .args(["--init-token", "--free", "--label", &token.label, "--so-pin", SO_PIN, "--pin", USER_PIN])
            .output()
            .unwrap();
        assert!(out.status.success(), "softhsm2-util: {}", String::from_utf8_lossy(&out.stderr));
        token
    }

    pub fn conf(&self) -> PathBuf {
        self.dir.path().join("softhsm2.conf")
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A command with this token's SOFTHSM2_CONF.
    pub fn cmd(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("SOFTHSM2_CONF", self.conf());
        cmd
    }

    /// `pkcs11-tool` logged in to this token.
    pub fn pkcs11_tool(&self, args: &[&str]) -> std::process::Output {
        self.cmd("pkcs11-tool")
            .args(["--module", SOFTHSM_MODULE, "--token-label", &self.label, "--login", "--pin", USER_PIN])
            .args(args)
            .output()
            .unwrap()
    }
}

/// Imports `key` into each of `tokens` as an operator's vendor tool would: private and public
/// objects with the same label and CKA_ID. The DER files it goes through live in a private
/// temporary directory, removed on return.
pub fn import_key(tokens: &[&Token], key: &KeyPair, label: &str, id: &str) {
    let dir = tempfile::tempdir().unwrap();
    let private_der = dir.path().join("key.der");
    let public_der = dir.path().join("pub.der");
    std::fs::write(&private_der, key.serialize_der()).unwrap();
    std::fs::write(&public_der, rcgen::PublicKeyData::subject_public_key_info(key)).unwrap();
    for token in tokens {
        for (file, kind) in [(&private_der, "privkey"), (&public_der, "pubkey")] {
            let out = token.pkcs11_tool(&[
                "--write-object",
                file.to_str().unwrap(),
                "--type",
                kind,
                "--id",
                id,
                "--label",
                label,
            ]);
            assert!(out.status.success(), "import {kind}: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
}

/// The `tollgate` binary under test.
pub fn tollgate_bin() -> &'static str {
    env!("CARGO_BIN_EXE_tollgate")
}

/// Settings of a test proxy.
#[derive(Clone)]
pub struct ProxyOptions {
    pub untrusted: &'static str,
    pub no_decrypt: Vec<String>,
    pub resolve: Vec<(String, SocketAddr)>,
    pub ca_bundles: Vec<PathBuf>,
    pub pin_file: Option<PathBuf>,
    pub trust_algorithm: &'static str,
    /// Lines added to the explicit and to the sni `[[listener]]`.
    pub explicit_listener: String,
    pub sni_listener: String,
    /// Lines added to `[upstream]`.
    pub upstream: String,
    pub extra: String,
}

impl Default for ProxyOptions {
    fn default() -> Self {
        Self {
            untrusted: "forward-untrust",
            no_decrypt: vec![],
            resolve: vec![],
            ca_bundles: vec![],
            pin_file: None,
            trust_algorithm: "ecdsa-p256",
            explicit_listener: String::new(),
            sni_listener: String::new(),
            upstream: String::new(),
            extra: String::new(),
        }
    }
}

/// A token with both CAs generated on it and a config file.
pub struct Setup {
    pub token: Token,
    pub config: PathBuf,
    pub trust_ca: CertificateDer<'static>,
    pub untrust_ca: CertificateDer<'static>,
}

impl Setup {
    pub fn new(options: &ProxyOptions) -> Self {
        let token = Token::new();
        let config = token.path("tollgate.toml");
        write_config(&token, &config, options);
        let trust = token.path("trust.pem");
        let untrust = token.path("untrust.pem");
        let gen_ca = |name: &str, role: &str, algorithm: &str, out: &Path| {
            let out_str = out.to_str().unwrap();
            let args = [
                "cert",
                "generate-ca",
                "--config",
                config.to_str().unwrap(),
                "--name",
                name,
                "--on-hsm",
                role,
                "--algorithm",
                algorithm,
                "--out-cert",
                out_str,
            ];
            let output = token.cmd(tollgate_bin()).args(args).output().unwrap();
            assert!(output.status.success(), "generate-ca: {}", String::from_utf8_lossy(&output.stderr));
        };
        gen_ca("fwd-trust", "--forward-trust", options.trust_algorithm, &trust);
        gen_ca("fwd-untrust", "--forward-untrust", "ecdsa-p256", &untrust);
        Self { trust_ca: pem_cert(&trust), untrust_ca: pem_cert(&untrust), token, config }
    }

    /// Starts `tollgate run` on this setup.
    pub fn start(&self) -> Proxy {
        Proxy::start(&self.token, &self.config)
    }

    /// Runs `tollgate ARGS --config CONFIG`.
    pub fn tollgate(&self, args: &[&str]) -> std::process::Output {
        self.token.cmd(tollgate_bin()).args(args).arg("--config").arg(&self.config).output().unwrap()
    }

    /// Runs `tollgate ARGS --config CONFIG` with `line` and a newline on stdin.
    pub fn tollgate_stdin(&self, args: &[&str], line: &str) -> std::process::Output {
        use std::io::Write;
        let mut child = self
            .token
            .cmd(tollgate_bin())
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(format!("{line}\n").as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    }
}

/// Config text adding an inbound listener and one `[[inbound]]` site served from `origin`
/// (plain HTTP), for `ProxyOptions::extra`.
pub fn inbound_site(host: &str, origin: SocketAddr) -> String {
    format!(
        "\n[[listener]]\nmode = \"inbound\"\nlisten = \"127.0.0.1:0\"\n\n[[inbound]]\nhost = \"{host}\"\nupstream = \"http://{origin}\"\n"
    )
}

/// A copy of `config` at `out` whose management address is the running service's, for CLI
/// commands that call its API.
pub fn config_for_cli(config: &Path, management: SocketAddr, out: &Path) {
    let text = std::fs::read_to_string(config).unwrap();
    let listen = "[management]\nlisten = \"127.0.0.1:0\"";
    assert!(text.contains(listen), "{}: no [management] listen on port 0", config.display());
    std::fs::write(out, text.replace(listen, &format!("[management]\nlisten = \"{management}\""))).unwrap();
}

pub fn write_config(token: &Token, path: &Path, options: &ProxyOptions) {
    let pin = options.pin_file.clone().unwrap_or_else(|| token.path("user.pin"));
    let mut text = format!(
        "state_dir = \"{}\"\n\n[[hsm.server]]\nname = \"hsm-a\"\nmodule = \"{SOFTHSM_MODULE}\"\ntoken = \"{}\"\npin_file = \"{}\"\n\n\
         [[listener]]\nmode = \"explicit\"\nlisten = \"127.0.0.1:0\"\n{}\n[[listener]]\nmode = \"sni\"\nlisten = \"127.0.0.1:0\"\n{}\n\
         [management]\nlisten = \"127.0.0.1:0\"\n\n[upstream]\nuntrusted = \"{}\"\nca_bundles = [{}]\n{}\n[policy]\nno_decrypt = [{}]\n\n[resolve]\n",
        token.path("state").display(),
        token.label,
        pin.display(),
        options.explicit_listener,
        options.sni_listener,
        options.untrusted,
        options.ca_bundles.iter().map(|p| format!("\"{}\"", p.display())).collect::<Vec<_>>().join(", "),
        options.upstream,
        options.no_decrypt.iter().map(|g| format!("\"{g}\"")).collect::<Vec<_>>().join(", "),
    );
    for (host, addr) in &options.resolve {
        text.push_str(&format!("\"{host}\" = \"{addr}\"\n"));
    }
    text.push_str(&options.extra);
    std::fs::write(path, text).unwrap();
}

pub fn pem_cert(path: &Path) -> CertificateDer<'static> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_file(path).unwrap()
}

/// A running `tollgate run`, killed on drop; its stdout log lines are kept.
pub struct Proxy {
    child: Child,
    pub logs: Arc<Mutex<Vec<String>>>,
    paused: Arc<std::sync::atomic::AtomicBool>,
    pub explicit: SocketAddr,
    pub sni: SocketAddr,
    pub management: SocketAddr,
    addrs: HashMap<String, SocketAddr>,
}

impl Proxy {
    pub fn start(token: &Token, config: &Path) -> Self {
        Self::start_with(token.cmd(tollgate_bin()), config, 3)
    }

    /// Starts `cmd run --config CONFIG`, waiting for `listeners` "listening" lines
    /// (management included).
    pub fn start_with(mut cmd: Command, config: &Path, listeners: usize) -> Self {
        Self::start_reading(cmd.stdout(Stdio::piped()), config, listeners, None)
    }

    /// Like `start_with`, for a service logging to `file` (`[log] file`): the file is
    /// followed, across rotations, instead of standard output.
    pub fn start_following(mut cmd: Command, config: &Path, listeners: usize, file: &Path) -> Self {
        Self::start_reading(cmd.stdout(Stdio::null()), config, listeners, Some(file.to_path_buf()))
    }

    fn start_reading(cmd: &mut Command, config: &Path, listeners: usize, file: Option<PathBuf>) -> Self {
        let mut child = cmd
            .args(["run", "--config"])
            .arg(config)
            .env("TOLLGATE_LOG", "info")
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let lines: Box<dyn Iterator<Item = String> + Send> = match file {
            Some(path) => Box::new(Follow { path, reader: None, inode: 0, partial: String::new() }),
            None => Box::new(BufReader::new(child.stdout.take().unwrap()).lines().map_while(Result::ok)),
        };
        let logs = Arc::new(Mutex::new(Vec::new()));
        let paused = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let (sink, pause) = (logs.clone(), paused.clone());
        std::thread::spawn(move || {
            for line in lines {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                    && v["message"] == "listening"
                {
                    let _ = tx.send((
                        v["mode"].as_str().unwrap_or("").to_string(),
                        v["addr"].as_str().unwrap_or("").parse::<SocketAddr>().unwrap(),
                    ));
                }
                sink.lock().push(line);
                while pause.load(std::sync::atomic::Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        });
        let mut addrs = HashMap::new();
        while addrs.len() < listeners {
            match rx.recv_timeout(Duration::from_secs(20)) {
                Ok((mode, addr)) => {
                    addrs.insert(mode, addr);
                }
                Err(_) => panic!("tollgate did not start; logs: {:?}", logs.lock()),
            }
        }
        let none = SocketAddr::from(([0, 0, 0, 0], 0));
        let addr = |mode: &str| addrs.get(mode).copied().unwrap_or(none);
        let (explicit, sni, management) = (addr("explicit"), addr("sni"), addr("management"));
        Self { child, logs, paused, explicit, sni, management, addrs }
    }

    /// Stops (`true`) or resumes reading the service's log: a stopped reader leaves its
    /// standard output pipe full, as a stuck log collector would.
    pub fn pause_log_reader(&self, paused: bool) {
        self.paused.store(paused, std::sync::atomic::Ordering::SeqCst);
    }

    /// The address of the listener of `mode`.
    pub fn listener(&self, mode: &str) -> SocketAddr {
        self.addrs[mode]
    }

    /// Log lines parsed as JSON.
    pub fn log_json(&self) -> Vec<serde_json::Value> {
        self.logs.lock().iter().filter_map(|l| serde_json::from_str(l).ok()).collect()
    }

    /// Waits until a log line satisfies `pred`.
    pub fn wait_log(&self, what: &str, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(v) = self.log_json().into_iter().find(|v| pred(v)) {
                return v;
            }
            assert!(Instant::now() < deadline, "no log line for {what}; logs: {:#?}", self.logs.lock());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A metric value from GET /metrics.
    pub async fn metric(&self, name: &str) -> u64 {
        let text = http_get(self.management, "/metrics").await;
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} not in /metrics:\n{text}"))
            .trim()
            .parse()
            .unwrap()
    }

    /// Polls a metric until it reads `want` or `within` has passed; the last value read. For
    /// gauges that follow a client's close: the proxy sees the close a moment after the client
    /// process has exited.
    pub async fn wait_metric(&self, name: &str, want: u64, within: Duration) -> u64 {
        let deadline = Instant::now() + within;
        loop {
            let value = self.metric(name).await;
            if value == want || Instant::now() >= deadline {
                return value;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A labelled metric value (`name{server="label",…}`), summed over its lines.
    pub async fn metric_labeled(&self, name: &str, server: &str) -> u64 {
        let text = http_get(self.management, "/metrics").await;
        let prefix = format!("{name}{{server=\"{server}\"");
        text.lines()
            .filter(|l| l.starts_with(&prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    }

    /// Sends a signal to the process (`-TERM`, `-HUP`).
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill").args([signal, &self.child.id().to_string()]).status().unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit; its exit code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        self.wait_status(within).code()
    }

    /// Waits for the process to exit; how it ended.
    pub fn wait_status(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "tollgate did not exit within {within:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process's resident memory, KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    /// CPU time the process has used (user and system, at the kernel's clock-tick grain).
    pub fn cpu_time(&self) -> Duration {
        let stat = procfs::process::Process::new(self.child.id() as i32).and_then(|p| p.stat()).unwrap();
        Duration::from_secs_f64((stat.utime + stat.stime) as f64 / procfs::ticks_per_second() as f64)
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain HTTP/1.1 GET: (status, body).
/// The lines of a log file as it is written, following it to a new file at the same path
/// when it is rotated.
struct Follow {
    path: PathBuf,
    reader: Option<BufReader<std::fs::File>>,
    inode: u64,
    partial: String,
}

impl Iterator for Follow {
    type Item = String;

    fn next(&mut self) -> Option<String> {
        use std::os::unix::fs::MetadataExt;
        loop {
            let inode = std::fs::metadata(&self.path).map(|m| m.ino()).unwrap_or(0);
            if let Some(reader) = &mut self.reader {
                match reader.read_line(&mut self.partial) {
                    Ok(n) if n > 0 && self.partial.ends_with('\n') => {
                        let line = std::mem::take(&mut self.partial);
                        return Some(line.trim_end().to_string());
                    }
                    Ok(_) if inode != self.inode => self.reader = None,
                    Ok(_) => std::thread::sleep(Duration::from_millis(20)),
                    Err(_) => return None,
                }
            } else if let Ok(file) = std::fs::File::open(&self.path) {
                self.inode = file.metadata().map(|m| m.ino()).unwrap_or(0);
                self.reader = Some(BufReader::new(file));
            } else {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

pub async fn http_status(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    stream.read_to_string(&mut out).await.unwrap();
    let status = out.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
}

/// A plain HTTP/1.1 GET, returning the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> String {
    http_status(addr, path).await.1
}

/// A test PKI: a root CA that issues origin certificates.
pub struct TestPki {
    pub root: rcgen::Certificate,
    issuer: Arc<Issuer<'static, KeyPair>>,
    pub dir: tempfile::TempDir,
}

/// How an origin certificate is made.
pub struct LeafSpec<'a> {
    pub names: &'a [&'a str],
    pub valid_days: (i64, i64),
    /// Self-signed instead of issued by the root.
    pub self_signed: bool,
    /// Issued by a root nobody trusts.
    pub unknown_root: bool,
}

impl<'a> LeafSpec<'a> {
    pub fn new(names: &'a [&'a str]) -> Self {
        Self { names, valid_days: (-1, 30), self_signed: false, unknown_root: false }
    }
}

impl TestPki {
    pub fn new() -> Self {
        let (root, issuer) = make_root("tollgate test root");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("root.pem"), root.pem()).unwrap();
        Self { root, issuer: Arc::new(issuer), dir }
    }

    /// The root certificate.
    pub fn root_der(&self) -> CertificateDer<'static> {
        self.root.der().clone()
    }

    /// The root as a PEM bundle file (for `[upstream] ca_bundles`).
    pub fn bundle(&self) -> PathBuf {
        self.dir.path().join("root.pem")
    }

    /// A server certificate for `key` and `names`, issued by the root, as PEM.
    pub fn certify(&self, key: &KeyPair, names: &[&str]) -> String {
        let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(DnType::CommonName, names[0]);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let now = time::OffsetDateTime::now_utc();
        (params.not_before, params.not_after) = (now - time::Duration::days(1), now + time::Duration::days(365));
        params.signed_by(key, &*self.issuer).unwrap().pem()
    }

    /// A client certificate (clientAuth) for `key`, issued by the root, as PEM.
    pub fn certify_client(&self, key: &KeyPair, name: &str) -> String {
        let mut params = CertificateParams::new(vec![name.to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let now = time::OffsetDateTime::now_utc();
        (params.not_before, params.not_after) = (now - time::Duration::days(1), now + time::Duration::days(365));
        params.signed_by(key, &*self.issuer).unwrap().pem()
    }

    /// A leaf as PEM files in `dir`: (certificate, private key).
    pub fn leaf_files(&self, spec: &LeafSpec<'_>, dir: &Path) -> (PathBuf, PathBuf) {
        let (cert, key) = self.make_leaf(spec);
        let (cert_path, key_path) = (dir.join("leaf.pem"), dir.join("leaf.key"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path)
    }

    fn make_leaf(&self, spec: &LeafSpec<'_>) -> (rcgen::Certificate, KeyPair) {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, spec.names[0]);
        params.subject_alt_names = spec
            .names
            .iter()
            .map(|n| match n.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName((*n).try_into().unwrap()),
            })
            .collect();
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now + time::Duration::days(spec.valid_days.0);
        params.not_after = now + time::Duration::days(spec.valid_days.1);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().unwrap();
        let cert = if spec.self_signed {
            params.self_signed(&key).unwrap()
        } else if spec.unknown_root {
            let (_, other) = make_root("unknown root");
            params.signed_by(&key, &other).unwrap()
        } else {
            params.signed_by(&key, &*self.issuer).unwrap()
        };
        (cert, key)
    }

    pub fn leaf(&self, spec: &LeafSpec<'_>) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let (cert, key) = self.make_leaf(spec);
        (vec![cert.der().clone()], PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())))
    }
}

fn make_root(cn: &str) -> (rcgen::Certificate, Issuer<'static, KeyPair>) {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert, Issuer::new(params, key))
}

/// Issues a certificate for each SNI on first sight.
struct PerHost {
    issuer: Arc<Issuer<'static, KeyPair>>,
    certs: Mutex<HashMap<String, Arc<rustls::sign::CertifiedKey>>>,
}

impl std::fmt::Debug for PerHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PerHost").finish_non_exhaustive()
    }
}

impl rustls::server::ResolvesServerCert for PerHost {
    fn resolve(&self, hello: rustls::server::ClientHello<'_>) -> Option<Arc<rustls::sign::CertifiedKey>> {
        let name = hello.server_name()?.to_string();
        let mut certs = self.certs.lock();
        let certified = certs.entry(name.clone()).or_insert_with(|| {
            let mut params = CertificateParams::new(vec![name.clone()]).unwrap();
            params.distinguished_name.push(DnType::CommonName, name.as_str());
            let key = KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, &*self.issuer).unwrap();
            let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
            let signer = rustls::crypto::aws_lc_rs::sign::any_supported_type(&key_der).unwrap();
            Arc::new(rustls::sign::CertifiedKey::new(vec![cert.der().clone()], signer))
        });
        Some(certified.clone())
    }
}

/// An in-process HTTPS origin. Answers `origin=NAME method path host version`, and echoes
/// bytes after a WebSocket upgrade.
pub struct Origin {
    pub addr: SocketAddr,
    /// Connections the origin accepted.
    pub accepted: Arc<std::sync::atomic::AtomicUsize>,
    /// Requests the origin received.
    pub requests: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Origin {
    /// `alpn`: what the origin accepts, e.g. `&["h2", "http/1.1"]` or `&["http/1.1"]`.
    pub async fn start(
        name: &str,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        alpn: &[&str],
    ) -> Self {
        Self::listen(name, Some(tls_acceptor(chain, key, alpn))).await
    }

    /// An origin with a certificate of its own for every name it is asked for (issued by
    /// `pki`'s root on first use): each host costs the proxy a mint of its own, where one
    /// wildcard certificate would be mirrored once for all.
    pub async fn start_per_host(name: &str, pki: &TestPki, alpn: &[&str]) -> Self {
        let resolver = PerHost { issuer: pki.issuer.clone(), certs: Mutex::new(HashMap::new()) };
        let mut config =
            rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_cert_resolver(Arc::new(resolver));
        config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        Self::listen(name, Some(tokio_rustls::TlsAcceptor::from(Arc::new(config)))).await
    }

    /// A plain-HTTP origin.
    pub async fn start_plain(name: &str) -> Self {
        Self::listen(name, None).await
    }

    async fn listen(name: &str, tls: Option<tokio_rustls::TlsAcceptor>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let name = name.to_string();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let requests = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (counter, seen) = (accepted.clone(), requests.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, peer)) = listener.accept().await else { continue };
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let (tls, name, seen) = (tls.clone(), name.clone(), seen.clone());
                tokio::spawn(async move {
                    let Some(acceptor) = tls else {
                        return serve_origin(TokioIo::new(stream), false, name, peer.port(), seen).await;
                    };
                    let Ok(tls) = acceptor.accept(stream).await else { return };
                    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                    serve_origin(TokioIo::new(tls), h2, name, peer.port(), seen).await;
                });
            }
        });
        Self { addr, accepted, requests, task }
    }
}

async fn serve_origin<IO>(
    io: TokioIo<IO>,
    h2: bool,
    name: String,
    conn: u16,
    requests: Arc<std::sync::atomic::AtomicUsize>,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| origin_response(req, name.clone(), conn, requests.clone()));
    if h2 {
        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new()).serve_connection(io, service).await;
    } else {
        let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).with_upgrades().await;
    }
}

/// Answers a request; `requests` counts those that arrived whole (head and complete body).
async fn origin_response(
    mut req: hyper::Request<Incoming>,
    name: String,
    conn: u16,
    requests: Arc<std::sync::atomic::AtomicUsize>,
) -> Result<hyper::Response<Full<Bytes>>, std::convert::Infallible> {
    if req.uri().path().starts_with("/slow") {
        // A request still in flight a while (drain tests).
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    if req.headers().get("upgrade").is_some_and(|v| v == "websocket") {
        requests.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let on_upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(upgraded) = on_upgrade.await {
                let mut io = TokioIo::new(upgraded);
                let mut buf = [0u8; 1024];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        });
        let response = hyper::Response::builder()
            .status(101)
            .header("upgrade", "websocket")
            .header("connection", "upgrade")
            .body(Full::new(Bytes::new()))
            .unwrap();
        return Ok(response);
    }
    let host = req
        .uri()
        .authority()
        .map(|a| a.to_string())
        .or_else(|| req.headers().get("host").map(|h| h.to_str().unwrap_or("").to_string()));
    let version = req.version();
    let path = req.uri().path().to_string();
    // `/headers` lists the request's header names, to show what a proxy forwarded.
    let names: Vec<String> = req.headers().keys().map(|k| k.to_string()).collect();
    if path == "/big" {
        requests.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        // 64 MiB: more than any buffer between origin and client may hold.
        return Ok(hyper::Response::new(Full::new(Bytes::from(vec![b'x'; 64 << 20]))));
    }
    if path == "/slow" {
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    let body = match req.into_body().collect().await {
        Ok(body) => body.to_bytes().len(),
        Err(_) => return Ok(hyper::Response::new(Full::new(Bytes::from_static(b"incomplete body\n")))),
    };
    requests.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let mut text = format!(
        "origin={name} path={path} host={} version={version:?} body={body} conn={conn}\n",
        host.unwrap_or_default()
    );
    if path == "/headers" {
        text.push_str(&format!("headers={}\n", names.join(",")));
    }
    let mut response = hyper::Response::new(Full::new(Bytes::from(text)));
    if path == "/ntlm" {
        *response.status_mut() = hyper::StatusCode::UNAUTHORIZED;
        response.headers_mut().insert("www-authenticate", hyper::header::HeaderValue::from_static("NTLM"));
    }
    Ok(response)
}

/// A TLS server presenting `chain` and offering `alpn` (none: no ALPN).
pub fn tls_acceptor(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    alpn: &[&str],
) -> tokio_rustls::TlsAcceptor {
    let mut config =
        rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

/// A TLS client config that records the server's chain instead of verifying it, so tests can
/// inspect what the proxy presented. Test-only.
pub fn capturing_client(alpn: &[&str]) -> (Arc<rustls::ClientConfig>, Arc<Mutex<Vec<CertificateDer<'static>>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let verifier = Arc::new(Capture(seen.clone()));
    let mut config =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    (Arc::new(config), seen)
}

/// A client config trusting only `ca`.
pub fn trusting_client(ca: &CertificateDer<'static>, alpn: &[&str]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let mut config =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Arc::new(config)
}

#[derive(Debug)]
struct Capture(Arc<Mutex<Vec<CertificateDer<'static>>>>);

impl rustls::client::danger::ServerCertVerifier for Capture {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let mut seen = self.0.lock();
        seen.clear();
        seen.push(end_entity.clone().into_owned());
        seen.extend(intermediates.iter().map(|c| c.clone().into_owned()));
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms.supported_schemes()
    }
}

/// TLS through the sni listener to `host`.
pub async fn tls_via_sni(
    proxy: SocketAddr,
    host: &str,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(proxy).await?;
    tokio_rustls::TlsConnector::from(config).connect(ServerName::try_from(host.to_string()).unwrap(), tcp).await
}

/// TLS through the sni listener to `host`, from the local address `client` (127.0.0.0/8 is
/// all local: distinct clients without a network of their own).
pub async fn tls_via_sni_from(
    client: [u8; 4],
    proxy: SocketAddr,
    host: &str,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind((std::net::Ipv4Addr::from(client), 0).into())?;
    let tcp = socket.connect(proxy).await?;
    tokio_rustls::TlsConnector::from(config).connect(ServerName::try_from(host.to_string()).unwrap(), tcp).await
}

/// `CONNECT authority` on the explicit listener; returns the tunnel after a 200.
/// Upgrades an HTTP/1.1 connection to `host` to WebSocket (the test origin echoes what the
/// upgraded connection carries), then checks `message` comes back.
pub async fn websocket_echo<IO>(io: &mut IO, host: &str, message: &[u8])
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let upgrade = format!(
        "GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    io.write_all(upgrade.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        io.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    assert!(String::from_utf8_lossy(&head).starts_with("HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    io.write_all(message).await.unwrap();
    let mut echo = vec![0u8; message.len()];
    tokio::time::timeout(Duration::from_secs(5), io.read_exact(&mut echo)).await.unwrap().unwrap();
    assert_eq!(echo, message);
}

pub async fn connect_tunnel(proxy: SocketAddr, authority: &str) -> TcpStream {
    let mut tcp = TcpStream::connect(proxy).await.unwrap();
    tcp.write_all(format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tcp.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "CONNECT answered {head}");
    tcp
}

/// One HTTP request over an established TLS stream (h1 or h2 per ALPN); (status, headers, body).
pub async fn request<IO>(io: IO, h2: bool, req: hyper::Request<Full<Bytes>>) -> (u16, hyper::HeaderMap, String)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(io);
    let response = if h2 {
        let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await.unwrap();
        tokio::spawn(conn);
        sender.send_request(req).await.unwrap()
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        sender.send_request(req).await.unwrap()
    };
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

/// A GET for `host` in the form the protocol wants.
pub fn get(host: &str, path: &str, h2: bool) -> hyper::Request<Full<Bytes>> {
    let builder = hyper::Request::builder();
    let builder = if h2 {
        builder.uri(format!("https://{host}{path}")).version(hyper::Version::HTTP_2)
    } else {
        builder.uri(path).header("host", host)
    };
    builder.body(Full::new(Bytes::new())).unwrap()
}

/// Parses a DER certificate.
pub fn parse(der: &[u8]) -> x509_parser::certificate::X509Certificate<'_> {
    x509_parser::parse_x509_certificate(der).unwrap().1
}

// ---- Searching for secrets ----

/// The files of a support file, by name.
pub fn unpack(archive: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(archive).unwrap().permissions().mode() & 0o777, 0o600);
    let dir = tempfile::tempdir().unwrap();
    let status = std::process::Command::new("tar").arg("-xzf").arg(archive).arg("-C").arg(dir.path()).status().unwrap();
    assert!(status.success());
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir.path().join("tollgate-support")).unwrap() {
        let entry = entry.unwrap();
        files.push((entry.file_name().to_string_lossy().into_owned(), std::fs::read(entry.path()).unwrap()));
    }
    files
}

pub fn assert_no_secret(archive: &std::path::Path, files: &[(String, Vec<u8>)], secrets: &[Vec<u8>]) {
    let raw = std::fs::read(archive).unwrap();
    for secret in secrets {
        let found = |hay: &[u8]| hay.windows(secret.len()).any(|w| w == secret.as_slice());
        assert!(!found(&raw), "a secret is in the compressed support file");
        for (name, bytes) in files {
            assert!(!found(bytes), "a secret ({} bytes) is in {name}", secret.len());
        }
    }
}

pub fn base64(bytes: &[u8]) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new("base64")
        .arg("-w0")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(bytes).unwrap();
    String::from_utf8(child.wait_with_output().unwrap().stdout).unwrap()
}

/// Every spelling of a private key that must never be found at rest: its DER, the DER in
/// base64, and each line of its PEM body.
pub fn key_spellings(der: &[u8], pem: &str) -> Vec<Vec<u8>> {
    let mut out = vec![der.to_vec(), base64(der).into_bytes()];
    out.extend(pem.lines().filter(|l| !l.starts_with("-----") && l.len() >= 32).map(|l| l.as_bytes().to_vec()));
    out
}

/// Files under `dir`, recursively, with their bytes.
pub fn files_under(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push((path.display().to_string(), std::fs::read(&path).unwrap()));
        }
    }
    out
}

/// Runs `openssl ARGS` in `dir`, asserting success.
pub fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = std::process::Command::new("openssl").args(args).current_dir(dir).output().unwrap();
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A POST with an optional bearer token; the status line and headers.
pub async fn bearer_post(addr: std::net::SocketAddr, path: &str, token: Option<&str>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(format!("POST {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = Vec::new();
    tcp.read_to_end(&mut response).await.unwrap();
    String::from_utf8_lossy(&response[..response.len().min(200)]).into_owned()
}

/// The cipher suite `openssl s_client` negotiates with `addr` for `sni`, given extra options
/// (`-tls1_2`, `-ciphersuites ...`); openssl's own name for it.
pub async fn negotiated_cipher(addr: SocketAddr, sni: &str, extra: &[&str]) -> String {
    let out = tokio::process::Command::new("openssl")
        .args(["s_client", "-connect", &addr.to_string(), "-servername", sni])
        .args(extra)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output();
    let out = tokio::time::timeout(std::time::Duration::from_secs(10), out).await.expect("s_client timed out").unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("New, "))
        .unwrap_or_else(|| panic!("{sni} {extra:?}: no handshake\n{text}"));
    line.rsplit(' ').next().unwrap().to_string()
}

pub const P11_KIT_CLIENT: &str = "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so";

/// A token behind `p11-kit server`: stop it to cut the HSM off, start it to bring it back.
pub struct RemoteToken {
    pub token: Token,
    pub socket: PathBuf,
    server: Option<Child>,
}

impl RemoteToken {
    pub fn new() -> Self {
        let token = Token::new();
        let socket = token.path("p11kit.sock");
        let mut remote = Self { token, socket, server: None };
        remote.start();
        remote
    }

    pub fn start(&mut self) {
        use std::os::unix::process::CommandExt;
        let _ = std::fs::remove_file(&self.socket);
        let child = self
            .token
            .cmd("p11-kit")
            .args(["server", "-f", "-n"])
            .arg(&self.socket)
            .args(["--provider", SOFTHSM_MODULE, &format!("pkcs11:token={}", self.token.label)])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .process_group(0)
            .spawn()
            .expect("p11-kit server (package p11-kit)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.socket.exists() {
            assert!(Instant::now() < deadline, "p11-kit server did not create its socket");
            std::thread::sleep(Duration::from_millis(20));
        }
        self.server = Some(child);
    }

    /// Freezes (SIGSTOP) or thaws (SIGCONT) the server and its per-client processes: a network
    /// HSM that stops answering without closing anything.
    pub fn signal(&self, signal: &str) {
        let pgid = self.server.as_ref().expect("running").id().to_string();
        let status = Command::new("pkill").args([signal, "-g", &pgid]).status().unwrap();
        assert!(status.success(), "pkill {signal} -g {pgid}");
    }

    /// Kills the listener and every per-client `p11-kit-remote` it forked (one process group).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.server.take() {
            // The group id is the listener's pid (process_group(0)). Not `kill -KILL -PGID`:
            // procps kill reads that as pid -1 and kills every process.
            let _ = Command::new("pkill").args(["-KILL", "-g", &child.id().to_string()]).status();
            let _ = child.wait();
        }
    }
}

impl Drop for RemoteToken {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts `cmd` with no standard input and its output thrown away (servers whose chatter
/// would only bury the test's own output).
pub fn spawn_quiet(cmd: &mut std::process::Command) -> std::process::Child {
    use std::process::Stdio;
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap()
}

/// A loopback port free at the moment (for servers that must be told their port up front).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Polls `ready` every 100 ms until it holds; fails naming `what` after `within`.
pub fn wait_for(what: &str, within: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !ready() {
        assert!(Instant::now() < deadline, "{what} did not happen within {within:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs curl (`-sS`, at most `max_secs`) with `args`.
pub async fn curl_for(max_secs: u64, args: &[&str]) -> std::process::Output {
    let mut cmd = tokio::process::Command::new("curl");
    cmd.args(["-sS", "--max-time", &max_secs.to_string()]).args(args);
    tokio::time::timeout(Duration::from_secs(max_secs + 30), cmd.output()).await.expect("curl timed out").unwrap()
}

/// What a process printed, standard output then standard error.
pub fn printed(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Serves `body` as the answer to any request, counting requests; with `None`, accepts and
/// never answers.
pub async fn crl_server(body: Option<Vec<u8>>) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = served.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { continue };
            let Some(body) = body.clone() else {
                held.push(stream);
                continue;
            };
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
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

/// A root CA that signs CRLs: its issuer, and its certificate as PEM.
pub fn revoking_ca(name: &str) -> (Issuer<'static, KeyPair>, String) {
    let mut ca = CertificateParams::default();
    ca.distinguished_name.push(DnType::CommonName, name);
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let key = KeyPair::generate().unwrap();
    let pem = ca.self_signed(&key).unwrap().pem();
    (Issuer::new(ca, key), pem)
}

/// A CRL (DER) from `issuer` revoking `serials`, issued an hour ago, next update in a day.
pub fn crl_der(issuer: &Issuer<'static, KeyPair>, serials: &[u8]) -> Vec<u8> {
    let now = time::OffsetDateTime::now_utc();
    rcgen::CertificateRevocationListParams {
        this_update: now - time::Duration::hours(1),
        next_update: now + time::Duration::days(1),
        crl_number: rcgen::SerialNumber::from_slice(&[1]),
        issuing_distribution_point: None,
        revoked_certs: serials
            .iter()
            .map(|serial| rcgen::RevokedCertParams {
                serial_number: rcgen::SerialNumber::from_slice(&[*serial]),
                revocation_time: now - time::Duration::hours(1),
                reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    }
    .signed_by(issuer)
    .unwrap()
    .der()
    .to_vec()
}

/// A leaf for `name` with serial `serial`, signed by `issuer`, naming `crl` as its CRL
/// distribution point.
pub fn leaf_with_crl(
    issuer: &Issuer<'static, KeyPair>,
    name: &str,
    serial: u8,
    crl: Option<String>,
) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let mut params = CertificateParams::new(vec![name.to_string()]).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&[serial]));
    params.crl_distribution_points =
        crl.into_iter().map(|uri| rcgen::CrlDistributionPoint { uris: vec![uri] }).collect();
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, issuer).unwrap();
    (vec![cert.der().clone()], PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())))
}
