//! Scale-out: three tollgate replicas behind a real HAProxy (TCP mode, PROXY protocol v2,
//! health checks on `/readyz`), all signing on one network HSM — a SoftHSM token behind
//! `p11-kit server`, which each replica reaches and logs in to itself. h2load through HAProxy
//! spreads over all three; a replica SIGKILLed under load costs only what was in flight on it,
//! and new connections succeed on the others; restarted, it rejoins; SIGTERMed, it turns
//! unready first, HAProxy stops sending, and what it was serving finishes.
//!
//! `throughput_of_one_two_and_three_replicas` (ignored; run by `bench/replicas`) measures
//! h2load through HAProxy with 1, 2 and 3 replicas, each minting for its own new hosts.

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

/// One replica's configuration: its own state directory, listener and management ports (kept
/// across restarts, so HAProxy finds it again), the shared token through p11-kit.
struct Replica {
    config: PathBuf,
    sni: SocketAddr,
    management: SocketAddr,
    proxy: Option<Proxy>,
}

struct Farm {
    remote: RemoteToken,
    replicas: Vec<Replica>,
    haproxy: Child,
    front: SocketAddr,
    _pki: TestPki,
    _origin: Origin,
}

impl Farm {
    async fn new(n: usize, per_host: bool) -> Self {
        require(&["haproxy", "h2load", "p11-kit"]);
        let remote = RemoteToken::new();
        let pki = TestPki::new();
        let origin = match per_host {
            // Every host its own certificate: every new host is a mint on each replica.
            true => Origin::start_per_host("farm", &pki, &["h2", "http/1.1"]).await,
            false => {
                let (chain, key) = pki.leaf(&LeafSpec::new(&["origin.test", "*.farm.test"]));
                Origin::start("farm", chain, key, &["h2", "http/1.1"]).await
            }
        };
        let dir = &remote.token.dir;
        let mut replicas = Vec::new();
        for i in 0..n {
            let (sni, management) =
                (SocketAddr::from(([127, 0, 0, 1], free_port())), SocketAddr::from(([127, 0, 0, 1], free_port())));
            let config = dir.path().join(format!("replica{i}.toml"));
            std::fs::write(
                &config,
                format!(
                    "state_dir = \"{state}\"\n\n[[hsm.server]]\nname = \"hsm\"\nmodule = \"{P11_KIT_CLIENT}\"\n\
                     token = \"{label}\"\npin_file = \"{pin}\"\naddress = \"unix:{sock}\"\n\n\
                     [[listener]]\nmode = \"sni\"\nlisten = \"{sni}\"\nproxy_protocol = true\ntrusted_proxies = [\"127.0.0.1/32\"]\n\n\
                     [management]\nlisten = \"{management}\"\n\n\
                     [limits]\ndrain_delay_secs = 2\nshutdown_grace_secs = 10\nper_client_mints_per_sec = 100000\nper_client_mint_burst = 100000\n\
                     per_client_connections = 100000\n\n[mint]\nshare_leaves = false\n\n\
                     [upstream]\nca_bundles = [\"{bundle}\"]\n\n[resolve]\n\"origin.test:443\" = \"{origin}\"\n\"*.farm.test:443\" = \"{origin}\"\n",
                    state = dir.path().join(format!("state{i}")).display(),
                    label = remote.token.label,
                    pin = remote.token.path("user.pin").display(),
                    sock = remote.socket.display(),
                    bundle = pki.bundle().display(),
                    origin = origin.addr,
                ),
            )
            .unwrap();
            replicas.push(Replica { config, sni, management, proxy: None });
        }
        // One CA key pair on the HSM; every replica's store holds its certificate.
        let ca = dir.path().join("ca.pem");
        let tollgate = |config: &PathBuf, args: &[&str]| {
            let out = Command::new(tollgate_bin())
                .args(args)
                .arg("--config")
                .arg(config)
                .env("SOFTHSM2_CONF", remote.token.conf())
                .env("P11_KIT_SERVER_ADDRESS", format!("unix:path={}", remote.socket.display()))
                .output()
                .unwrap();
            assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        let ca_str = ca.to_str().unwrap();
        tollgate(
            &replicas[0].config,
            &["cert", "generate-ca", "--name", "farm-ca", "--on-hsm", "--forward-trust", "--out-cert", ca_str],
        );
        for replica in &replicas[1..] {
            tollgate(
                &replica.config,
                &["cert", "import", "--name", "farm-ca", "--cert", ca_str, "--key-on-hsm", "--forward-trust"],
            );
        }
        let front = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let servers: String = replicas
            .iter()
            .enumerate()
            .map(|(i, r)| format!("  server r{i} {} check port {}\n", r.sni, r.management.port()))
            .collect();
        let haproxy_cfg = dir.path().join("haproxy.cfg");
        std::fs::write(
            &haproxy_cfg,
            format!(
                "global\n  maxconn 2000\ndefaults\n  mode tcp\n  timeout connect 2s\n  timeout client 30s\n  timeout server 30s\n\
                 retries 3\n  option redispatch\n\
                 frontend tls\n  bind {front}\n  default_backend tollgate\n\
                 backend tollgate\n  balance roundrobin\n  option httpchk GET /readyz\n\
                 default-server send-proxy-v2 inter 500ms fall 2 rise 2\n{servers}"
            ),
        )
        .unwrap();
        let haproxy = spawn_quiet(Command::new("haproxy").args(["-db", "-f"]).arg(&haproxy_cfg));
        let mut farm = Self { remote, replicas, haproxy, front, _pki: pki, _origin: origin };
        for i in 0..n {
            farm.start(i);
        }
        farm.wait_all_up();
        farm
    }

    fn cmd(&self) -> Command {
        let mut cmd = Command::new(tollgate_bin());
        // p11-kit-client.so finds the HSM server through this, as a pod would.
        cmd.env("SOFTHSM2_CONF", self.remote.token.conf())
            .env("P11_KIT_SERVER_ADDRESS", format!("unix:path={}", self.remote.socket.display()));
        cmd
    }

    fn start(&mut self, i: usize) {
        let proxy = Proxy::start_with(self.cmd(), &self.replicas[i].config, 2);
        self.replicas[i].proxy = Some(proxy);
    }

    fn proxy(&self, i: usize) -> &Proxy {
        self.replicas[i].proxy.as_ref().unwrap()
    }

    /// Client TLS sessions replica `i` has served so far.
    fn sessions(&self, i: usize) -> usize {
        self.proxy(i).log_json().iter().filter(|v| v["message"] == "tls session").count()
    }

    /// The warnings and errors every running replica logged (for failure messages).
    fn trouble(&self) -> String {
        let mut out = String::new();
        for (i, replica) in self.replicas.iter().enumerate() {
            let Some(proxy) = &replica.proxy else { continue };
            for line in proxy.log_json().iter().filter(|v| v["level"] != "INFO") {
                out.push_str(&format!("replica {i}: {line}\n"));
            }
        }
        out
    }

    /// Waits until every replica has served a connection through HAProxy (its health checks
    /// passed): fresh connections, round robin, until each has one.
    fn wait_all_up(&self) {
        wait_for("every replica taking connections through HAProxy", Duration::from_secs(30), || {
            let _ = h2load(self.front, &["-n", "30", "-c", "6"], "origin.test");
            (0..self.replicas.len()).all(|i| self.replicas[i].proxy.is_none() || self.sessions(i) > 0)
        });
    }
}

impl Drop for Farm {
    fn drop(&mut self) {
        let _ = self.haproxy.kill();
        let _ = self.haproxy.wait();
    }
}

/// h2load's request counts.
#[derive(Debug, Default)]
struct Counts {
    succeeded: u64,
    failed: u64,
    errored: u64,
    req_per_sec: f64,
}

/// Runs h2load through `front` for `host` (its SNI); the counts it reports.
fn h2load(front: SocketAddr, args: &[&str], host: &str) -> Counts {
    let out = Command::new("h2load")
        .args(args)
        .arg(format!("--connect-to={front}"))
        .arg(format!("https://{host}/"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut counts = Counts::default();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("requests: ") {
            for part in rest.split(", ") {
                let mut words = part.split_whitespace();
                let (Some(n), Some(what)) = (words.next(), words.next()) else { continue };
                let n: u64 = n.parse().unwrap_or(0);
                match what {
                    "succeeded" => counts.succeeded = n,
                    "failed" => counts.failed = n,
                    "errored" => counts.errored = n,
                    _ => {}
                }
            }
        }
        if let Some(rest) = line.strip_prefix("finished in ") {
            counts.req_per_sec = rest
                .split(", ")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .and_then(|r| r.parse().ok())
                .unwrap_or(0.0);
        }
    }
    counts
}

#[test]
fn three_replicas_behind_haproxy_survive_a_kill_rejoin_and_drain() {
    // The origin's tasks run on this runtime; the test thread drives the clients.
    let rt = runtime();
    let mut farm = rt.block_on(Farm::new(3, false));

    // Spread: a run through HAProxy reaches all three, every request served.
    let before: Vec<usize> = (0..3).map(|i| farm.sessions(i)).collect();
    let counts = h2load(farm.front, &["-n", "1200", "-c", "12", "-m", "4"], "origin.test");
    assert_eq!((counts.failed, counts.errored), (0, 0), "{counts:?}\n{}", farm.trouble());
    assert_eq!(counts.succeeded, 1200, "{counts:?}");
    for (i, before) in before.iter().enumerate() {
        assert!(
            farm.sessions(i) > *before,
            "replica {i} got no connection: {:?}",
            (0..3).map(|i| farm.sessions(i)).collect::<Vec<_>>()
        );
    }
    // Each replica logged in to the HSM itself and minted on it.
    for i in 0..3 {
        farm.proxy(i).wait_log("minted", |v| v["message"] == "tls session" && v["leaf"] == "minted");
    }

    // SIGKILL one replica during a 20 s run (12 connections, 4 streams each), while four
    // clients open a new connection per request and note when each failed: only requests in
    // flight on the killed replica may fail, and none once HAProxy's checks (2 × 500 ms) have
    // seen it go (HAProxy also redispatches a connection it could not open).
    let front = farm.front;
    let ca = farm.remote.token.dir.path().join("ca.pem");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (stop, ca) = (stop.clone(), ca.clone());
            std::thread::spawn(move || {
                let mut outcomes = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let out = Command::new("curl")
                        .args(["-sS", "-o", "/dev/null", "--max-time", "10", "--cacert", ca.to_str().unwrap()])
                        .arg("--connect-to")
                        .arg(format!("origin.test:443:{front}"))
                        .arg("https://origin.test/")
                        .output()
                        .unwrap();
                    if !out.status.success() && outcomes.iter().all(|(_, ok)| *ok) {
                        eprintln!("first failure: {}", printed(&out));
                    }
                    outcomes.push((Instant::now(), out.status.success()));
                }
                outcomes
            })
        })
        .collect();
    let load = std::thread::spawn(move || {
        h2load(front, &["-D", "20", "-c", "12", "-m", "4", "--warm-up-time=1"], "origin.test")
    });
    std::thread::sleep(Duration::from_secs(6));
    let killed = farm.replicas[1].proxy.take().unwrap();
    let pid = killed.pid().to_string();
    let killed_at = Instant::now();
    assert!(Command::new("kill").args(["-KILL", &pid]).status().unwrap().success());
    drop(killed);
    let counts = load.join().unwrap();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let outcomes: Vec<(Instant, bool)> = clients.into_iter().flat_map(|c| c.join().unwrap()).collect();
    eprintln!("20 s run with a replica SIGKILLed at 6 s: {counts:?}");
    let settled = killed_at + Duration::from_millis(1500);
    let early_failures = outcomes.iter().filter(|(at, ok)| !ok && *at < settled).count();
    let late: Vec<bool> = outcomes.iter().filter(|(at, _)| *at >= settled).map(|(_, ok)| *ok).collect();
    eprintln!(
        "new-connection clients: {} requests, {early_failures} failed around the kill, {} after {}",
        outcomes.len(),
        late.iter().filter(|ok| !**ok).count(),
        late.len()
    );
    assert!(early_failures <= 4, "more failures than requests in flight on the killed replica: {early_failures}");
    assert!(late.len() > 20 && late.iter().all(|ok| *ok), "failures after HAProxy's check interval");
    assert!(counts.succeeded > 1000, "{counts:?}");
    assert!(
        counts.failed + counts.errored <= 12 * 4,
        "more failed than could have been in flight on the killed replica: {counts:?}"
    );
    // After HAProxy's check interval: nothing fails.
    std::thread::sleep(Duration::from_millis(1500));
    let counts = h2load(farm.front, &["-n", "600", "-c", "12"], "origin.test");
    assert_eq!((counts.succeeded, counts.failed, counts.errored), (600, 0, 0), "{counts:?}");

    // Restarted on the same ports: it rejoins.
    farm.start(1);
    let deadline = Instant::now() + Duration::from_secs(20);
    while farm.sessions(1) == 0 {
        assert!(Instant::now() < deadline, "the restarted replica got no connection");
        let counts = h2load(farm.front, &["-n", "60", "-c", "6"], "origin.test");
        assert_eq!(counts.failed + counts.errored, 0, "{counts:?}");
        std::thread::sleep(Duration::from_millis(200));
    }

    // SIGTERM during a run: readiness 503 first while the listener still takes connections,
    // HAProxy stops sending new ones, a request in flight finishes, and the replica exits
    // cleanly. Streams a client opens on its old h2 connection after the GOAWAY are refused
    // unprocessed (RFC 9113 §8.7: safe to retry; h2load counts them failed), at most a few per
    // connection it had.
    let ca = farm.remote.token.dir.path().join("ca.pem");
    let direct = |path: &str| {
        let sni = farm.replicas[2].sni;
        Command::new("curl")
            .args(["-sS", "--max-time", "20", "--haproxy-protocol", "--cacert", ca.to_str().unwrap(), "--resolve"])
            .arg(format!("origin.test:{}:127.0.0.1", sni.port()))
            .arg(format!("https://origin.test:{}{path}", sni.port()))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let slow = direct("/slow-in-flight");
    let load = std::thread::spawn(move || h2load(front, &["-D", "6", "-c", "12", "-m", "4"], "origin.test"));
    std::thread::sleep(Duration::from_secs(1));
    farm.proxy(2).signal("-TERM");
    let readyz = farm.replicas[2].management;
    let mut saw_503 = false;
    wait_for("/readyz answering 503 after SIGTERM", Duration::from_secs(2), || {
        let out = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
            .arg(format!("http://{readyz}/readyz"))
            .output()
            .unwrap();
        saw_503 = String::from_utf8_lossy(&out.stdout) == "503";
        saw_503
    });
    // Still accepting while the balancer notices (drain_delay_secs).
    let late = direct("/late").wait_with_output().unwrap();
    assert!(late.status.success(), "a connection during the drain delay was refused: {}", printed(&late));
    let slow = slow.wait_with_output().unwrap();
    assert!(slow.status.success(), "the request in flight at SIGTERM did not finish: {}", printed(&slow));
    assert!(String::from_utf8_lossy(&slow.stdout).contains("path=/slow-in-flight"), "{}", printed(&slow));
    let counts = load.join().unwrap();
    eprintln!("6 s run with a replica SIGTERMed at 1 s: {counts:?}");
    assert!(counts.succeeded > 1000, "{counts:?}");
    // HAProxy spreads the 12 connections over 3 replicas: 4 on the drained one, each with at
    // most 4 streams open when the GOAWAY reaches h2load.
    assert!(counts.failed + counts.errored <= 4 * 4, "draining failed more than GOAWAY races: {counts:?}");
    let mut drained = farm.replicas[2].proxy.take().unwrap();
    assert_eq!(drained.wait_exit(Duration::from_secs(20)), Some(0), "{:?}", drained.logs.lock());
    drained.wait_log("drained", |v| v["message"] == "drained; exiting");
    // And nothing fails once HAProxy has seen it go.
    let counts = h2load(front, &["-n", "600", "-c", "12"], "origin.test");
    assert_eq!((counts.succeeded, counts.failed, counts.errored), (600, 0, 0), "{counts:?}");
}

/// Not a test of correctness: figures for `bench/replicas` (through HAProxy with 1, 2 and 3
/// replicas on this machine): h2 keep-alive requests per second, and new hosts per second when
/// every connection names a new host (each one an HSM signature on the shared token).
#[test]
#[ignore]
fn throughput_of_one_two_and_three_replicas() {
    let seconds = std::env::var("TOLLGATE_BENCH_SECS").unwrap_or_else(|_| "10".into());
    let loadgen = std::env::current_exe().unwrap().parent().unwrap().parent().unwrap().join("examples/loadgen");
    assert!(loadgen.exists(), "{} (cargo build --release --example loadgen)", loadgen.display());
    for n in 1..=3 {
        let rt = runtime();
        let farm = rt.block_on(Farm::new(n, true));
        let steady =
            h2load(farm.front, &["-D", &seconds, "-c", "24", "-m", "10", "--warm-up-time=2"], "origin.farm.test");
        let signs =
            |farm: &Farm| -> u64 { (0..n).map(|i| rt.block_on(farm.proxy(i).metric("tollgate_hsm_sign_total"))).sum() };
        let before = signs(&farm);
        let ca = farm.remote.token.dir.path().join("ca.pem");
        let out = Command::new(&loadgen)
            .args(["newconn", "--addr", &farm.front.to_string(), "--ca", ca.to_str().unwrap()])
            .args(["--sni-pattern", &format!("n{n}-{{}}.farm.test"), "-c", "32", "-d", &seconds])
            .output()
            .unwrap();
        let report = String::from_utf8_lossy(&out.stdout);
        let report: serde_json::Value =
            report.lines().rev().find_map(|l| serde_json::from_str(l).ok()).unwrap_or(serde_json::Value::Null);
        let minted = signs(&farm) - before;
        println!(
            "replicas={n} h2_keepalive_req_per_sec={:.0} h2_failed={} new_host_conn_per_sec={} new_host_errors={} hsm_signatures={minted}",
            steady.req_per_sec,
            steady.failed + steady.errored,
            report["rps"],
            report["errors"],
        );
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}
