//! The service's log output: a stuck log reader never stalls the data plane (lines are dropped
//! and counted instead), and a log file rotates by size and is reopened after logrotate.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use support::*;

/// A proxy in front of an in-process origin for `origin.test`, with `log` as its `[log]`.
async fn proxied(log: &str) -> (TestPki, Origin, Setup) {
    let pki = TestPki::new();
    let (chain, key) = pki.leaf(&LeafSpec::new(&["origin.test"]));
    let origin = Origin::start("logged", chain, key, &["http/1.1"]).await;
    let options = ProxyOptions {
        ca_bundles: vec![pki.bundle()],
        resolve: vec![("origin.test:443".into(), origin.addr)],
        extra: format!("\n[log]\n{log}"),
        ..Default::default()
    };
    let setup = Setup::new(&options);
    (pki, origin, setup)
}

/// `count` requests on one client connection through the sni listener, each answered 200.
async fn requests(proxy: &Proxy, setup: &Setup, path: &str, count: usize) {
    let tls = tls_via_sni(proxy.sni, "origin.test", trusting_client(&setup.trust_ca, &["http/1.1"])).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    for i in 0..count {
        sender.ready().await.unwrap();
        let response = sender.send_request(get("origin.test", &format!("{path}{i}"), false)).await.unwrap();
        assert_eq!(response.status(), 200);
        http_body_util::BodyExt::collect(response.into_body()).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_log_reader_costs_lines_never_requests() {
    let (_pki, _origin, setup) = proxied("buffer_lines = 64\n").await;
    let proxy = setup.start();
    proxy.pause_log_reader(true);
    // Some 400 bytes of access line each: the pipe (64 KiB) and the queue (64 lines) fill
    // after a few hundred; every request must still be answered at once.
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(60), requests(&proxy, &setup, "/stuck", 1500))
        .await
        .expect("requests stalled behind a stuck log");
    let dropped = proxy.metric("tollgate_log_lines_dropped_total").await;
    assert!(dropped > 0, "lines were dropped and counted ({:?} for 1500 requests)", started.elapsed());
    // The reader back: once the writer has caught up (lines logged meanwhile may still be
    // dropped), logging goes on.
    proxy.pause_log_reader(false);
    let deadline = Instant::now() + Duration::from_secs(10);
    for attempt in 0.. {
        requests(&proxy, &setup, &format!("/after{attempt}-"), 1).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        if proxy.log_json().iter().any(|v| v["path"].as_str().is_some_and(|p| p.starts_with("/after"))) {
            break;
        }
        assert!(Instant::now() < deadline, "no line logged after the reader came back");
    }
}

fn size(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_file_rotates_by_size_and_is_reopened_after_logrotate() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tollgate.log");
    let log = format!("file = \"{}\"\nmax_file_bytes = 8192\nkeep_files = 2\n", file.display());
    let (_pki, _origin, setup) = proxied(&log).await;
    let proxy = Proxy::start_following(setup.token.cmd(tollgate_bin()), &setup.config, 3, &file);
    requests(&proxy, &setup, "/rotate", 200).await;
    proxy.wait_log("the last request", |v| v["path"] == "/rotate199");
    let numbered = |n: u32| dir.path().join(format!("tollgate.log.{n}"));
    assert!(numbered(1).exists() && numbered(2).exists(), "rotated by size");
    assert!(!numbered(3).exists(), "only keep_files rotated files are kept");
    for path in [file.clone(), numbered(1), numbered(2)] {
        assert!(size(&path) <= 8192, "{} is {} bytes", path.display(), size(&path));
    }
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&file).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o640);

    // logrotate moves the file away, then signals: the next lines go to a new file.
    let moved = dir.path().join("moved.log");
    std::fs::rename(&file, &moved).unwrap();
    proxy.signal("-USR1");
    tokio::time::sleep(Duration::from_millis(100)).await;
    requests(&proxy, &setup, "/reopened", 1).await;
    proxy.wait_log("a line in the new file", |v| v["path"] == "/reopened0");
    assert!(std::fs::read_to_string(&file).unwrap().contains("/reopened0"));
    assert!(!std::fs::read_to_string(&moved).unwrap().contains("/reopened0"));

    // A reload naming a log file that cannot be written is refused; logging goes on.
    let config = std::fs::read_to_string(&setup.config).unwrap();
    std::fs::write(&setup.config, config.replace(&file.display().to_string(), "/nonexistent/dir/tollgate.log"))
        .unwrap();
    proxy.signal("-HUP");
    let refused =
        proxy.wait_log("reload refused", |v| v["message"] == "reload refused; the running configuration stays");
    assert!(refused["error"].as_str().unwrap().contains("log.file"), "{refused}");
}
