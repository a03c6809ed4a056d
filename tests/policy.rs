//! Decryption policy by who and what, against real clients: rules on client networks, users,
//! listeners, host globs and host list files (first match wins); proxy authentication with
//! curl and Python requests; a host list edited while running; bad policy input refused with
//! the file, the line and the reason.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use support::*;

async fn run(program: &str, args: &[&str]) -> std::process::Output {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args);
    tokio::time::timeout(Duration::from_secs(30), cmd.output()).await.expect("client timed out").unwrap()
}

fn text(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Whose certificate a client through the sni listener sees for `host` from `client`: the
/// origin's (tunnelled), tollgate's (decrypted), or none (refused).
async fn seen(
    proxy: &Proxy,
    client: [u8; 4],
    host: &str,
    pki: &TestPki,
    ca: &rustls::pki_types::CertificateDer<'static>,
) -> &'static str {
    if tls_via_sni_from(client, proxy.sni, host, trusting_client(&pki.root_der(), &["http/1.1"])).await.is_ok() {
        return "origin";
    }
    match tls_via_sni_from(client, proxy.sni, host, trusting_client(ca, &["http/1.1"])).await {
        Ok(_) => "tollgate",
        Err(_) => "refused",
    }
}

struct Policy {
    pki: TestPki,
    _origins: [Origin; 2],
    setup: Setup,
    _files: tempfile::TempDir,
    users_file: std::path::PathBuf,
    list: std::path::PathBuf,
}

const ALICE: &str = "alice-passw0rd";
const BOB: &str = "bob-passw0rd";

impl Policy {
    async fn new() -> Self {
        let pki = TestPki::new();
        let (chain, key) = pki.leaf(&LeafSpec::new(&["*.policy.test", "*.alice.test"]));
        let origin = Origin::start("policy", chain, key, &["http/1.1"]).await;
        let plain = Origin::start_plain("plain").await;
        let files = tempfile::tempdir().unwrap();
        let users_file = files.path().join("users.htpasswd");
        let hash = |pw: &str| bcrypt::hash(pw, 4).unwrap();
        std::fs::write(&users_file, format!("# proxy users\nalice:{}\nbob:{}\n", hash(ALICE), hash(BOB))).unwrap();
        let list = files.path().join("finance.txt");
        std::fs::write(&list, "# finance\nbank.policy.test\n*.broker.test\n").unwrap();
        let rules = format!(
            "\n[auth]\nusers_file = \"{users}\"\n\
             [[decryption.rule]]\nname = \"finance-exempt\"\nhost_lists = [\"{list}\"]\naction = \"no-decrypt\"\n\
             [[decryption.rule]]\nname = \"alice-untouched\"\nusers = [\"alice\"]\nhosts = [\"*.alice.test\"]\naction = \"no-decrypt\"\n\
             [[decryption.rule]]\nname = \"lab-blocked\"\nlisteners = [\"lab\"]\nhosts = [\"blocked.policy.test\"]\naction = \"block\"\n\
             [[decryption.rule]]\nname = \"second-client\"\nsources = [\"127.0.0.2/32\"]\nhosts = [\"src.policy.test\"]\naction = \"no-decrypt\"\n\
             [[decryption.rule]]\nname = \"no-learning\"\nhosts = [\"quiet.policy.test\"]\naction = \"decrypt\"\nlearn_bypass = false\n\
             [decryption]\nlist_poll_secs = 1\n",
            users = users_file.display(),
            list = list.display(),
        );
        let options = ProxyOptions {
            ca_bundles: vec![pki.bundle()],
            resolve: vec![
                ("*.policy.test:443".into(), origin.addr),
                ("*.alice.test:443".into(), origin.addr),
                ("*.policy.test:80".into(), plain.addr),
                ("*.broker.test:443".into(), origin.addr),
            ],
            // The explicit listener authenticates; the sni one is named "lab".
            explicit_listener: "name = \"users\"\nauth = \"basic\"\n".into(),
            sni_listener: "name = \"lab\"\n".into(),
            extra: rules,
            ..Default::default()
        };
        let setup = Setup::new(&options);
        Self { pki, _origins: [origin, plain], setup, _files: files, users_file, list }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_decide_by_network_user_listener_host_and_list() {
    let policy = Policy::new().await;
    let proxy = policy.setup.start();
    let (pki, ca) = (&policy.pki, &policy.setup.trust_ca);
    let local = [127, 0, 0, 1];
    assert_eq!(seen(&proxy, local, "bank.policy.test", pki, ca).await, "origin", "on the finance list");
    assert_eq!(seen(&proxy, local, "a.broker.test", pki, ca).await, "refused", "the origin has no certificate for it");
    assert_eq!(seen(&proxy, local, "blocked.policy.test", pki, ca).await, "refused", "blocked on the lab listener");
    assert_eq!(seen(&proxy, local, "www.policy.test", pki, ca).await, "tollgate", "no rule: decrypted");
    assert_eq!(seen(&proxy, [127, 0, 0, 2], "src.policy.test", pki, ca).await, "origin", "from 127.0.0.2");
    assert_eq!(seen(&proxy, local, "src.policy.test", pki, ca).await, "tollgate", "from elsewhere");
    let tunnel = proxy.wait_log("tunnel", |v| v["action"] == "tunnel" && v["host"] == "bank.policy.test");
    assert_eq!((tunnel["rule"].as_str(), tunnel["listener"].as_str()), (Some("finance-exempt"), Some("lab")));
    // ... and the glob on the list tunnelled it rather than decrypting.
    proxy.wait_log("glob on the list", |v| v["host"] == "a.broker.test" && v["rule"] == "finance-exempt");
    assert!(tunnel["bytes_down"].as_u64() > Some(0), "{tunnel}");
    proxy.wait_log("block", |v| v["error"].as_str().is_some_and(|e| e.contains("\"lab-blocked\"")));

    // Proxy authentication on the explicit listener: 407 without credentials or with wrong ones.
    let explicit = format!("http://{}", proxy.explicit);
    let root = pki.bundle();
    let tollgate_ca = policy.setup.token.path("trust.pem");
    for auth in [None, Some("alice:wrong"), Some("nobody:x")] {
        let mut args = vec!["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--proxy", &explicit];
        if let Some(auth) = auth {
            args.extend(["--proxy-user", auth]);
        }
        args.extend(["--cacert", tollgate_ca.to_str().unwrap(), "https://www.policy.test/"]);
        let out = run("curl", &args).await;
        assert!(text(&out).contains("407"), "{auth:?}: {}", text(&out));
        let out = run("curl", &["-sS", "-i", "--proxy", &explicit, "http://www.policy.test/plain"]).await;
        assert!(
            text(&out).contains("407") && text(&out).to_lowercase().contains("proxy-authenticate: basic"),
            "{}",
            text(&out)
        );
    }
    // Alice's hosts are not decrypted (her client sees the origin); Bob's are.
    let alice = format!("alice:{ALICE}");
    let bob = format!("bob:{BOB}");
    let via = |user: &str, ca: &Path, url: &str| {
        let (user, ca, url, explicit) = (user.to_string(), ca.to_path_buf(), url.to_string(), explicit.clone());
        async move {
            let args = ["-sS", "--proxy", &explicit, "--proxy-user", &user, "--cacert", ca.to_str().unwrap(), &url];
            run("curl", &args).await
        }
    };
    let out = via(&alice, &root, "https://www.alice.test/a").await;
    assert!(out.status.success() && text(&out).contains("path=/a"), "alice tunnelled: {}", text(&out));
    let out = via(&bob, &tollgate_ca, "https://www.alice.test/b").await;
    assert!(out.status.success() && text(&out).contains("path=/b"), "bob decrypted: {}", text(&out));
    let line = proxy.wait_log("bob's request", |v| v["message"] == "request" && v["path"] == "/b");
    assert_eq!((line["user"].as_str(), line["listener"].as_str()), (Some("bob"), Some("users")), "{line}");
    let out = via(&bob, &tollgate_ca, "http://www.policy.test/headers").await;
    assert!(out.status.success() && text(&out).contains("headers="), "{}", text(&out));
    assert!(!text(&out).contains("proxy-authorization"), "the header reached the origin: {}", text(&out));
    proxy.wait_log("plain", |v| v["path"] == "/headers" && v["user"] == "bob");

    // Python requests, the same way.
    let script = format!(
        "import requests\n\
         r = requests.get('https://www.policy.test/py', proxies={{'https': 'http://alice:{ALICE}@{addr}'}}, verify='{ca}')\n\
         print(r.status_code, r.text)\n\
         try:\n    requests.get('https://www.policy.test/py', proxies={{'https': 'http://alice:nope@{addr}'}}, verify='{ca}')\n\
         except requests.exceptions.ProxyError as e:\n    print('refused', '407' in str(e))\n",
        addr = proxy.explicit,
        ca = tollgate_ca.display()
    );
    let out = run("/usr/bin/python3", &["-c", &script]).await;
    let printed = text(&out);
    assert!(printed.contains("200") && printed.contains("path=/py") && printed.contains("refused True"), "{printed}");

    // No password in any log line, and none reached the origin.
    let logs = proxy.logs.lock().join("\n");
    for secret in [ALICE.to_string(), BOB.to_string(), base64(alice.as_bytes()), base64(b"alice:wrong")] {
        assert!(!logs.contains(&secret), "{secret} logged");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_list_edited_while_running_takes_effect_and_a_broken_one_keeps_the_last() {
    let policy = Policy::new().await;
    let proxy = policy.setup.start();
    let (pki, ca) = (&policy.pki, &policy.setup.trust_ca);
    let local = [127, 0, 0, 1];
    assert_eq!(seen(&proxy, local, "payments.policy.test", pki, ca).await, "tollgate");
    std::fs::write(&policy.list, "bank.policy.test\npayments.policy.test\n").unwrap();
    let started = Instant::now();
    while seen(&proxy, local, "payments.policy.test", pki, ca).await != "origin" {
        assert!(started.elapsed() < Duration::from_secs(5), "the edit took no effect within 5 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A broken version: refused loudly, the last good one stays.
    std::fs::write(&policy.list, "bank.policy.test\nnot a host name\n").unwrap();
    let error =
        proxy.wait_log("list error", |v| v["message"].as_str().is_some_and(|m| m.contains("last good version stays")));
    assert!(error["error"].as_str().unwrap().contains("line 2"), "{error}");
    assert_eq!(seen(&proxy, local, "payments.policy.test", pki, ca).await, "origin", "the last good version");
    let list = policy.list.display().to_string();
    let metrics = http_get(proxy.management, "/metrics").await;
    assert!(metrics.contains(&format!("tollgate_host_list_errors_total{{list=\"{list}\"}} 1")), "{metrics}");
    assert!(metrics.contains(&format!("tollgate_host_list_entries{{list=\"{list}\"}} 2")), "{metrics}");

    // A reload naming a list that does not parse is refused with the file, the line and the
    // reason; the running rules stay.
    let bad = policy.setup.token.path("bad-list.txt");
    std::fs::write(&bad, "ok.policy.test\nexample..test\n").unwrap();
    let config = std::fs::read_to_string(&policy.setup.config).unwrap();
    let broken = config.replace(&list, &bad.display().to_string());
    std::fs::write(&policy.setup.config, broken).unwrap();
    proxy.signal("-HUP");
    let refused =
        proxy.wait_log("reload refused", |v| v["message"] == "reload refused; the running configuration stays");
    let reason = refused["error"].as_str().unwrap();
    assert!(reason.contains("bad-list.txt") && reason.contains("line 2"), "{reason}");
    assert_eq!(seen(&proxy, local, "payments.policy.test", pki, ca).await, "origin", "the running rules");
    std::fs::write(&policy.setup.config, config).unwrap();

    // The users file reloads itself too (waited for: attempts before it count as failures,
    // and enough of those lock the address out).
    let loaded = || proxy.log_json().iter().filter(|v| v["message"] == "proxy users loaded").count();
    let before = loaded();
    std::fs::write(&policy.users_file, format!("carol:{}\n", bcrypt::hash("carol-pw", 4).unwrap())).unwrap();
    let started = Instant::now();
    while loaded() == before {
        assert!(started.elapsed() < Duration::from_secs(5), "the users file was not reloaded within 5 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let explicit = format!("http://{}", proxy.explicit);
    let out =
        run("curl", &["-sS", "--proxy", &explicit, "--proxy-user", "carol:carol-pw", "http://www.policy.test/c"]).await;
    assert!(text(&out).contains("path=/c"), "carol admitted: {}", text(&out));
}

#[test]
fn bad_policy_input_names_the_file_the_line_and_the_reason() {
    let token = Token::new();
    let config = token.path("tollgate.toml");
    write_config(&token, &config, &ProxyOptions::default());
    let base = std::fs::read_to_string(&config).unwrap();
    let list = token.path("list.txt");
    std::fs::write(&list, "ok.test\nbad entry\n").unwrap();
    let users = token.path("users.htpasswd");
    std::fs::write(&users, format!("alice:{}\nbob:$apr1$abc$def\n", bcrypt::hash("x", 4).unwrap())).unwrap();
    let cases = [
        ("[[decryption.rule]]\nlisteners = [\"nope\"]\naction = \"block\"\n", "decryption.rule[0].listeners", "nope"),
        (
            "[[decryption.rule]]\nsources = [\"10.0.0.0/33\"]\naction = \"block\"\n",
            "decryption.rule[0].sources",
            "CIDR",
        ),
        ("[[decryption.rule]]\nhost_lists = [\"missing.txt\"]\naction = \"block\"\n", "missing.txt", "No such file"),
        (
            &format!("[[decryption.rule]]\nhost_lists = [\"{}\"]\naction = \"block\"\n", list.display()),
            "line 2",
            "not a host",
        ),
        (&format!("[auth]\nusers_file = \"{}\"\n", users.display()), "line 2", "unsupported hash"),
        ("[[decryption.rule]]\naction = \"tunnel-maybe\"\n", "decryption.rule[0].action", "no-decrypt"),
    ];
    for (extra, where_, why) in cases {
        std::fs::write(&config, format!("{base}\n{extra}")).unwrap();
        let out = token.cmd(tollgate_bin()).args(["run", "--check", "--config"]).arg(&config).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{extra}: {err}");
        assert!(err.contains(where_) && err.contains(why), "{extra}: {err}");
    }
}

/// What the list server answers, and what it was asked.
#[derive(Default)]
struct Served {
    body: String,
    etag: String,
    /// Answer this instead of the list.
    fail: Option<u16>,
    /// `If-None-Match` of each request.
    conditional: Vec<Option<String>>,
    not_modified: usize,
}

/// An https:// server of one host list, honouring `If-None-Match` like a PAN-OS EDL source.
async fn list_server(pki: &TestPki, served: std::sync::Arc<parking_lot::Mutex<Served>>) -> std::net::SocketAddr {
    use hyper::{Response, StatusCode};
    let (chain, key) = pki.leaf(&LeafSpec::new(&["127.0.0.1"]));
    let acceptor = tls_acceptor(chain, key, &[]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (acceptor, served) = (acceptor.clone(), served.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else { return };
                let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let mut s = served.lock();
                    let asked = req.headers().get("if-none-match").map(|v| v.to_str().unwrap().to_string());
                    s.conditional.push(asked.clone());
                    let response = match (s.fail, asked) {
                        (Some(status), _) => Response::builder().status(status).body(String::new()),
                        (None, Some(tag)) if tag == s.etag => {
                            s.not_modified += 1;
                            Response::builder().status(StatusCode::NOT_MODIFIED).body(String::new())
                        }
                        _ => Response::builder()
                            .header("etag", s.etag.clone())
                            .header("last-modified", "Tue, 01 Dec 2026 10:00:00 GMT")
                            .body(s.body.clone()),
                    };
                    std::future::ready(Ok::<_, std::convert::Infallible>(response.unwrap()))
                });
                let io = hyper_util::rt::TokioIo::new(tls);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
            });
        }
    });
    addr
}

/// An https:// host list (a PAN-OS style external dynamic list) is fetched at once, then on
/// its interval with `If-None-Match`; a new version takes effect; a failing fetch keeps the last
/// good version, counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_list_is_fetched_conditionally_and_a_failing_fetch_keeps_the_last() {
    let pki = TestPki::new();
    let (chain, key) = pki.leaf(&LeafSpec::new(&["*.edl.test"]));
    let origin = Origin::start("edl", chain, key, &["http/1.1"]).await;
    let served = std::sync::Arc::new(parking_lot::Mutex::new(Served {
        body: "# finance\nbank.edl.test\n".into(),
        etag: "\"v1\"".into(),
        ..Default::default()
    }));
    let url = format!("https://127.0.0.1:{}/finance.txt", list_server(&pki, served.clone()).await.port());
    let options = ProxyOptions {
        ca_bundles: vec![pki.bundle()],
        resolve: vec![("*.edl.test:443".into(), origin.addr)],
        extra: format!(
            "[[decryption.rule]]\nname = \"edl\"\nhost_lists = [\"{url}\"]\naction = \"no-decrypt\"\n\
             [decryption]\nlist_refresh_secs = 1\nlist_poll_secs = 1\n"
        ),
        ..Default::default()
    };
    let setup = Setup::new(&options);
    let proxy = setup.start();
    let (ca, local) = (&setup.trust_ca, [127, 0, 0, 1]);
    let wait_for = |host: &'static str, want: &'static str| {
        let proxy = &proxy;
        let pki = &pki;
        async move {
            let started = Instant::now();
            loop {
                let seen = seen(proxy, local, host, pki, ca).await;
                if seen == want {
                    return;
                }
                assert!(started.elapsed() < Duration::from_secs(5), "{host}: {seen}, not {want}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    wait_for("bank.edl.test", "origin").await;
    assert_eq!(seen(&proxy, local, "pay.edl.test", &pki, ca).await, "tollgate");
    // Unchanged: answered 304 to the tag it sent.
    let started = Instant::now();
    while served.lock().not_modified == 0 {
        assert!(started.elapsed() < Duration::from_secs(5), "no conditional fetch: {:?}", served.lock().conditional);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(served.lock().conditional.last().cloned().flatten().as_deref(), Some("\"v1\""));
    // A new version.
    {
        let mut s = served.lock();
        (s.body, s.etag) = ("bank.edl.test\npay.edl.test\n".into(), "\"v2\"".into());
    }
    wait_for("pay.edl.test", "origin").await;
    // The source fails: loudly, counted, and the last good version stays.
    served.lock().fail = Some(503);
    let error = proxy.wait_log("fetch error", |v| {
        v["message"].as_str().is_some_and(|m| m.contains("last good version stays")) && v["list"] == url.as_str()
    });
    assert!(error["error"].as_str().unwrap().contains("503"), "{error}");
    assert_eq!(seen(&proxy, local, "pay.edl.test", &pki, ca).await, "origin", "the last good version");
    let metrics = http_get(proxy.management, "/metrics").await;
    assert!(metrics.contains(&format!("tollgate_host_list_entries{{list=\"{url}\"}} 2")), "{metrics}");
    assert!(!metrics.contains(&format!("tollgate_host_list_errors_total{{list=\"{url}\"}} 0")), "{metrics}");
}
