//! Content scanning over ICAP against a real scanner: c-icap's virus_scan service backed by
//! ClamAV's daemon, with a signature database built here (the EICAR test file's hash; the
//! official signatures cannot be downloaded offline). Through tollgate, with curl: the EICAR
//! file downloaded is replaced by the scanner's block page (RESPMOD) and uploaded is stopped
//! before the origin (REQMOD); clean files arrive byte for byte, a 50 MiB one with tollgate's
//! memory bounded; a rule with `icap = false` is not scanned; a scanner killed, frozen or
//! answering nonsense gives block pages (or passes, with `on_error = "allow"`), and when it
//! comes back tollgate uses it again without a restart.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

const EICAR: &[u8] = br"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*";

/// clamd and c-icap with their own configuration in `dir`; killed on drop.
struct Scanner {
    dir: PathBuf,
    port: u16,
    clamd: Child,
    icap: Option<Child>,
}

impl Scanner {
    fn start(dir: &Path) -> Self {
        require(&["clamd", "c-icap", "sigtool"]);
        let dir = dir.join("scanner");
        std::fs::create_dir_all(dir.join("db")).unwrap();
        std::fs::write(dir.join("eicar.com"), EICAR).unwrap();
        let out = Command::new("sigtool").arg("--md5").arg(dir.join("eicar.com")).output().unwrap();
        assert!(out.status.success(), "sigtool: {}", String::from_utf8_lossy(&out.stderr));
        let line = String::from_utf8_lossy(&out.stdout);
        let (hash_size, _) = line.trim().rsplit_once(':').expect("sigtool prints HASH:SIZE:NAME");
        std::fs::write(dir.join("db/test.hdb"), format!("{hash_size}:Test.EICAR\n")).unwrap();
        let d = dir.display();
        std::fs::write(
            dir.join("clamd.conf"),
            format!(
                "DatabaseDirectory {d}/db\nLocalSocket {d}/clamd.sock\nForeground yes\nPidFile {d}/clamd.pid\n\
                 LogFile {d}/clamd.log\nTemporaryDirectory {d}\nUser root\n"
            ),
        )
        .unwrap();
        let clamd = spawn_quiet(Command::new("clamd").arg("-c").arg(dir.join("clamd.conf")));
        let socket = dir.join("clamd.sock");
        wait_for("clamd", Duration::from_secs(60), || socket.exists());
        let port = free_port();
        std::fs::write(
            dir.join("c-icap.conf"),
            format!(
                "Port 127.0.0.1:{port}\nPidFile {d}/c-icap.pid\nCommandsSocket {d}/c-icap.ctl\nTmpDir {d}\n\
                 ServerLog {d}/server.log\nAccessLog {d}/access.log\n\
                 ModulesDir /usr/lib/x86_64-linux-gnu/c_icap\nServicesDir /usr/lib/x86_64-linux-gnu/c_icap\n\
                 TemplateDir /usr/share/c_icap/templates/\nLoadMagicFile /etc/c-icap/c-icap.magic\n\
                 Module common clamd_mod.so\nclamd_mod.ClamdSocket {d}/clamd.sock\n\
                 Service antivirus_module virus_scan.so\n\
                 ServiceAlias avscan virus_scan?allow204=on&sizelimit=off&mode=simple\n\
                 virus_scan.ScanFileTypes TEXT DATA EXECUTABLE ARCHIVE GIF JPEG MSOFFICE\n\
                 virus_scan.DefaultEngine clamd\n"
            ),
        )
        .unwrap();
        let mut scanner = Self { dir, port, clamd, icap: None };
        scanner.start_icap();
        scanner
    }

    fn url(&self) -> String {
        format!("icap://127.0.0.1:{}/avscan", self.port)
    }

    fn start_icap(&mut self) {
        let _ = std::fs::remove_file(self.dir.join("c-icap.ctl"));
        use std::os::unix::process::CommandExt;
        // A process group of its own: c-icap serves from child processes, which must die (or
        // freeze) with it.
        let child = spawn_quiet(
            Command::new("c-icap").args(["-N", "-D", "-f"]).arg(self.dir.join("c-icap.conf")).process_group(0),
        );
        self.icap = Some(child);
        let port = self.port;
        wait_for("c-icap", Duration::from_secs(30), || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    }

    fn kill_icap(&mut self) {
        if let Some(mut child) = self.icap.take() {
            let group = format!("-{}", child.id());
            let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
            let _ = child.wait();
            let port = self.port;
            wait_for("c-icap to be gone", Duration::from_secs(10), || {
                std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
            });
        }
    }

    /// SIGSTOP / SIGCONT to the whole group: a scanner that accepts connections and never
    /// answers.
    fn freeze(&self, frozen: bool) {
        let group = format!("-{}", self.icap.as_ref().unwrap().id());
        let signal = if frozen { "-STOP" } else { "-CONT" };
        assert!(Command::new("kill").args([signal, "--", &group]).status().unwrap().success());
    }
}

impl Drop for Scanner {
    fn drop(&mut self) {
        if self.icap.is_some() {
            self.freeze(false);
        }
        self.kill_icap();
        let _ = self.clamd.kill();
        let _ = self.clamd.wait();
    }
}

/// An HTTPS origin serving `dir` (GET) and counting uploads (POST, logged to `posts.log`).
const ORIGIN: &str = r#"
import http.server, ssl, sys

class Handler(http.server.SimpleHTTPRequestHandler):
    def do_POST(self):
        data = self.rfile.read(int(self.headers.get('Content-Length', 0)))
        with open('posts.log', 'a') as log:
            log.write('%s %d\n' % (self.path, len(data)))
        body = b'received %d bytes\n' % len(data)
        self.send_response(200)
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

server = http.server.ThreadingHTTPServer(('127.0.0.1', int(sys.argv[3])), Handler)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(sys.argv[1], sys.argv[2])
server.socket = context.wrap_socket(server.socket, server_side=True)
server.serve_forever()
"#;

struct Files {
    child: Child,
    dir: PathBuf,
    addr: SocketAddr,
    /// The same files over plain HTTP (Python's http.server).
    plain: Child,
    plain_addr: SocketAddr,
}

impl Files {
    fn start(pki: &TestPki, dir: &Path) -> Self {
        let www = dir.join("www");
        std::fs::create_dir_all(&www).unwrap();
        let (cert, key) = pki.leaf_files(&LeafSpec::new(&["files.test", "video.test"]), dir);
        let port = free_port();
        let child = Command::new("/usr/bin/python3")
            .args(["-c", ORIGIN])
            .arg(&cert)
            .arg(&key)
            .arg(port.to_string())
            .current_dir(&www)
            .stdin(Stdio::null())
            // Its tracebacks when tollgate cuts a refused download short are noise.
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let plain_port = free_port();
        let plain = spawn_quiet(
            Command::new("/usr/bin/python3")
                .args(["-m", "http.server", "--bind", "127.0.0.1", &plain_port.to_string()])
                .current_dir(&www),
        );
        let plain_addr = SocketAddr::from(([127, 0, 0, 1], plain_port));
        wait_for("the origin", Duration::from_secs(10), || {
            std::net::TcpStream::connect(addr).is_ok() && std::net::TcpStream::connect(plain_addr).is_ok()
        });
        Self { child, dir: www, addr, plain, plain_addr }
    }

    fn posts(&self) -> String {
        std::fs::read_to_string(self.dir.join("posts.log")).unwrap_or_default()
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        for child in [&mut self.child, &mut self.plain] {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The client ports of the connections open to c-icap now (from the kernel's socket table).
fn icap_client_ports(scanner: &Scanner) -> Vec<u16> {
    let out = Command::new("ss")
        .args(["-Htn", "state", "established", &format!("( dport = :{} )", scanner.port)])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().nth(2)?.rsplit(':').next()?.parse().ok())
        .collect()
}

/// The peak resident memory of a process so far (VmHWM), in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

struct Rig {
    _work: tempfile::TempDir,
    _pki: TestPki,
    scanner: Scanner,
    files: Files,
    setup: Setup,
    proxy: Proxy,
}

impl Rig {
    fn start(icap: &str) -> Self {
        let work = tempfile::tempdir().unwrap();
        let scanner = Scanner::start(work.path());
        let pki = TestPki::new();
        let files = Files::start(&pki, work.path());
        let options = ProxyOptions {
            ca_bundles: vec![pki.bundle()],
            resolve: vec![
                ("files.test:443".into(), files.addr),
                ("video.test:443".into(), files.addr),
                ("plain.test:80".into(), files.plain_addr),
            ],
            extra: format!(
                "\n[[decryption.rule]]\nname = \"video\"\nhosts = [\"video.test\"]\naction = \"decrypt\"\nicap = false\n\n\
                 [icap]\nreqmod = \"{url}\"\nrespmod = \"{url}\"\ntimeout_secs = 3\n{icap}",
                url = scanner.url()
            ),
            ..Default::default()
        };
        let setup = Setup::new(&options);
        let proxy = setup.start();
        Self { _work: work, _pki: pki, scanner, files, setup, proxy }
    }

    async fn get(&self, url: &str, extra: &[&str]) -> std::process::Output {
        let (explicit, trust) = (format!("http://{}", self.proxy.explicit), self.setup.token.path("trust.pem"));
        let mut args = vec!["--proxy", &explicit, "--cacert", trust.to_str().unwrap()];
        if !extra.contains(&"-o") {
            args.extend(["-i", "--suppress-connect-headers"]);
        }
        args.extend_from_slice(extra);
        args.push(url);
        curl_for(60, &args).await
    }

    fn put_file(&self, name: &str, bytes: &[u8]) {
        std::fs::write(self.files.dir.join(name), bytes).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eicar_is_blocked_both_ways_and_clean_content_streams_through_unchanged() {
    let rig = Rig::start("");
    rig.put_file("eicar.com", EICAR);
    let clean = b"just a clean text file, nothing to see\n".repeat(100);
    rig.put_file("clean.txt", &clean);
    let proxy = &rig.proxy;
    proxy.wait_log("probe", |v| {
        v["message"] == "ICAP service ready" && v["methods"].as_str().is_some_and(|m| m.contains("RESPMOD"))
    });

    // RESPMOD: the download is replaced by the scanner's page, naming what it found.
    let out = rig.get("https://files.test/eicar.com", &[]).await;
    let page = printed(&out);
    assert!(page.starts_with("HTTP/1.1 403") || page.starts_with("HTTP/2 403"), "{page}");
    assert!(page.to_ascii_lowercase().contains("tollgate-error: blocked-by-scanner"), "{page}");
    assert!(page.contains("Test.EICAR"), "the page names the verdict: {page}");
    assert!(!page.contains("EICAR-STANDARD-ANTIVIRUS-TEST-FILE"), "the file itself reached the client");
    let line = proxy.wait_log("blocked download", |v| v["path"] == "/eicar.com" && v["status"] == 403);
    assert_eq!(line["icap_respmod"], "blocked", "{line}");
    assert!(line["icap_threat"].as_str().unwrap().contains("Test.EICAR"), "{line}");
    assert!(line["icap_ms"].as_f64().is_some(), "{line}");
    proxy.wait_log("warning", |v| v["message"] == "content blocked by the scanner");

    // REQMOD: the upload never reaches the origin.
    let eicar_file = rig.scanner.dir.join("eicar.com");
    let upload = format!("@{}", eicar_file.display());
    let out = rig.get("https://files.test/upload", &["--data-binary", &upload]).await;
    let page = printed(&out);
    assert!(page.contains(" 403") && page.contains("Test.EICAR"), "{page}");
    let line = proxy.wait_log("blocked upload", |v| v["path"] == "/upload" && v["status"] == 403);
    assert_eq!(line["icap_reqmod"], "blocked", "{line}");
    // A clean upload goes through, whole.
    let out = rig.get("https://files.test/upload-clean", &["--data-binary", "hello, origin"]).await;
    assert!(printed(&out).contains("received 13 bytes"), "{}", printed(&out));
    assert_eq!(rig.files.posts(), "/upload-clean 13\n", "the origin saw the infected upload");

    // Clean: the origin's bytes, exactly, on the 204 fast path.
    let body = rig.setup.token.path("clean.out");
    let out = rig.get("https://files.test/clean.txt", &["-o", body.to_str().unwrap()]).await;
    assert!(out.status.success(), "{}", printed(&out));
    assert!(std::fs::read(&body).unwrap() == clean, "the clean file changed on its way");
    let line = proxy.wait_log("clean", |v| v["path"] == "/clean.txt");
    assert_eq!((line["icap_respmod"].as_str(), line["status"].as_u64()), (Some("clean"), Some(200)), "{line}");

    // Plain http:// through the explicit listener: scanned the same way.
    let out = rig.get("http://plain.test/eicar.com", &[]).await;
    let page = printed(&out);
    assert!(page.starts_with("HTTP/1.1 403"), "{page}");
    assert!(page.to_ascii_lowercase().contains("tollgate-error: blocked-by-scanner"), "{page}");
    assert!(!page.contains("EICAR-STANDARD-ANTIVIRUS-TEST-FILE"), "the file itself reached the client");
    let line = proxy.wait_log("blocked plain download", |v| v["host"] == "plain.test" && v["path"] == "/eicar.com");
    assert_eq!((line["icap_respmod"].as_str(), line["status"].as_u64()), (Some("blocked"), Some(403)), "{line}");
    let out = rig.get("http://plain.test/clean.txt", &["-o", body.to_str().unwrap()]).await;
    assert!(out.status.success(), "{}", printed(&out));
    assert!(std::fs::read(&body).unwrap() == clean, "the clean file changed on its plain-HTTP way");
    let line = proxy.wait_log("clean plain", |v| v["host"] == "plain.test" && v["path"] == "/clean.txt");
    assert_eq!(line["icap_respmod"], "clean", "{line}");

    // A rule with icap = false: not scanned at all.
    let out = rig.get("https://video.test/eicar.com", &[]).await;
    assert!(printed(&out).contains("EICAR-STANDARD-ANTIVIRUS-TEST-FILE"), "{}", printed(&out));
    let line = proxy.wait_log("unscanned", |v| v["host"] == "video.test" && v["path"] == "/eicar.com");
    assert!(line["icap_respmod"].is_null(), "{line}");

    // The scanner's connections are pooled: a dozen more requests (each scanned twice) go over
    // the same few connections (seen by their client ports) rather than two new ones each.
    let mut ports = std::collections::BTreeSet::new();
    for _ in 0..12 {
        let out = rig.get("https://files.test/clean.txt", &["-o", "/dev/null"]).await;
        assert!(out.status.success(), "{}", printed(&out));
        ports.extend(icap_client_ports(&rig.scanner));
    }
    assert!(!ports.is_empty() && ports.len() <= 4, "ICAP connections used for 24 scans: {ports:?}");

    // 50 MiB, streamed: identical bytes, and tollgate's peak memory nowhere near the file's size.
    let mut big = Vec::with_capacity(50 << 20);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    while big.len() < 50 << 20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        big.extend_from_slice(&x.to_le_bytes());
    }
    rig.put_file("big.bin", &big);
    let before = peak_rss_kib(proxy.pid());
    let body = rig.setup.token.path("big.out");
    let out = rig.get("https://files.test/big.bin", &["-o", body.to_str().unwrap()]).await;
    assert!(out.status.success(), "{}", printed(&out));
    let got = std::fs::read(&body).unwrap();
    assert!(got == big, "50 MiB came back different ({} bytes)", got.len());
    let line = proxy.wait_log("big", |v| v["path"] == "/big.bin");
    assert_eq!(line["icap_respmod"], "modified", "streamed back through the scanner: {line}");
    let grown = peak_rss_kib(proxy.pid()).saturating_sub(before);
    eprintln!("50 MiB through the scanner: tollgate's peak RSS grew by {grown} KiB");
    assert!(grown < 20 * 1024, "tollgate's peak memory grew by {grown} KiB for a 50 MiB body");

    // Above max_body_bytes: not sent to the scanner; refused with oversize = "block", passed
    // (and logged as unscanned) with "allow".
    for (oversize, expect) in [("block", "blocked-oversize"), ("allow", "unscanned-oversize")] {
        let config = std::fs::read_to_string(&rig.setup.config).unwrap();
        let config = match config.split_once("max_body_bytes") {
            Some((before, _)) => before.to_string(),
            None => config,
        };
        std::fs::write(&rig.setup.config, format!("{config}max_body_bytes = 1048576\noversize = \"{oversize}\"\n"))
            .unwrap();
        let reloads = proxy.log_json().iter().filter(|v| v["message"] == "configuration reloaded").count();
        proxy.signal("-HUP");
        proxy.wait_log("reload", |v| {
            v["message"] == "configuration reloaded"
                && proxy.log_json().iter().filter(|l| l["message"] == "configuration reloaded").count() > reloads
        });
        let out = rig.get("https://files.test/big.bin", &["-o", "/dev/null", "-w", "%{http_code}"]).await;
        let status = String::from_utf8_lossy(&out.stdout).to_string();
        assert_eq!(status, if oversize == "block" { "403" } else { "200" }, "{}", printed(&out));
        proxy.wait_log(expect, |v| v["path"] == "/big.bin" && v["icap_respmod"] == expect);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scanner_that_dies_freezes_or_talks_nonsense_blocks_until_it_is_back() {
    let mut rig = Rig::start("");
    rig.put_file("page.txt", b"a page\n");
    let blocked = |out: &std::process::Output| {
        let text = printed(out);
        assert!(text.contains(" 503") && text.to_ascii_lowercase().contains("tollgate-error: scan-failed"), "{text}");
    };
    let out = rig.get("https://files.test/page.txt", &[]).await;
    assert!(printed(&out).contains("a page"), "{}", printed(&out));

    // Killed: block pages, and tollgate keeps serving them.
    rig.scanner.kill_icap();
    for _ in 0..3 {
        blocked(&rig.get("https://files.test/page.txt", &[]).await);
    }
    rig.proxy.wait_log("failure", |v| v["message"] == "content scanner failed; blocked");
    // Back: used again, no restart.
    rig.scanner.start_icap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let out = rig.get("https://files.test/page.txt", &[]).await;
        if printed(&out).contains("a page") {
            break;
        }
        assert!(Instant::now() < deadline, "the scanner came back but tollgate does not use it: {}", printed(&out));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // Frozen (accepts, never answers): blocked after timeout_secs, not hung.
    rig.scanner.freeze(true);
    let started = Instant::now();
    blocked(&rig.get("https://files.test/page.txt", &[]).await);
    assert!(started.elapsed() < Duration::from_secs(15), "waited {:?} on a frozen scanner", started.elapsed());
    rig.scanner.freeze(false);

    // on_error = "allow": with the scanner gone, content passes unscanned (and is logged so).
    rig.scanner.kill_icap();
    let config = std::fs::read_to_string(&rig.setup.config).unwrap();
    std::fs::write(&rig.setup.config, config.replace("timeout_secs = 3\n", "timeout_secs = 3\non_error = \"allow\"\n"))
        .unwrap();
    rig.proxy.signal("-HUP");
    rig.proxy.wait_log("reload", |v| v["message"] == "configuration reloaded");
    let out = rig.get("https://files.test/page.txt", &[]).await;
    assert!(printed(&out).contains("a page"), "{}", printed(&out));
    let line = rig.proxy.wait_log("unscanned", |v| v["path"] == "/page.txt" && v["icap_respmod"] == "error");
    assert_eq!(line["status"], 200, "{line}");

    // Nonsense from the scanner's address: blocked again once on_error is back to block.
    let garbage = std::net::TcpListener::bind(("127.0.0.1", rig.scanner.port)).unwrap();
    std::thread::spawn(move || {
        for stream in garbage.incoming().take(8) {
            use std::io::{Read, Write};
            let Ok(mut stream) = stream else { continue };
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf);
            let _ = stream.write_all(b"HELLO I AM NOT ICAP\r\n\r\n");
        }
    });
    let config = std::fs::read_to_string(&rig.setup.config).unwrap();
    std::fs::write(&rig.setup.config, config.replace("on_error = \"allow\"\n", "")).unwrap();
    rig.proxy.signal("-HUP");
    rig.proxy.wait_log("second reload", |v| {
        v["message"] == "configuration reloaded"
            && rig.proxy.log_json().iter().filter(|l| l["message"] == "configuration reloaded").count() >= 2
    });
    let out = rig.get("https://files.test/page.txt", &[]).await;
    blocked(&out);
    assert!(printed(&out).contains("not an ICAP response"), "{}", printed(&out));
}
