//! The command line and configuration: clear errors with exit code 64 for bad input, `--check`,
//! a PKCS#11 library that will not load, a wrong partition password (no retry loop).

mod support;

use std::time::Duration;

use support::*;

fn tollgate(token: &Token, args: &[&str]) -> std::process::Output {
    token.cmd(tollgate_bin()).args(args).output().unwrap()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn malformed_config_names_file_and_field_with_exit_64() {
    let token = Token::new();
    let config = token.path("bad.toml");
    let cases = [
        ("state_dir = \"s\"\nlisten_everywhere = true\n", "listen_everywhere"),
        ("state_dir = \"s\"\n[[listener]]\nmode = \"explicit\"\nlisten = \"localhost\"\n", "listener[0].listen"),
        ("state_dir = \"s\"\n[[listener]]\nmode = \"sideways\"\nlisten = \"127.0.0.1:1\"\n", "sideways"),
        (
            "state_dir = \"s\"\n[[hsm.server]]\nname = \"this-name-is-far-too-long-for-an-hsm\"\ntoken = \"t\"\n",
            "hsm.server[0].name",
        ),
        ("state_dir = \"s\"\n[upstream]\nca_bundles = [\"missing.pem\"]\n", "upstream.ca_bundles[0]"),
        ("state_dir = ", "bad.toml"),
        (
            "state_dir = \"s\"\n[[upstream.client_cert]]\nhosts = [\"a.test\"]\ncert = \"not-in-store\"\n",
            "upstream.client_cert[0].cert",
        ),
    ];
    for (text, field) in cases {
        std::fs::write(&config, text).unwrap();
        let out = tollgate(&token, &["run", "--check", "--config", config.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(64), "{text:?}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains("bad.toml") && err.contains(field), "{text:?}: {err}");
    }
    let out = tollgate(&token, &["run", "--config", token.path("nope.toml").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64));
    assert!(stderr(&out).contains("nope.toml"));
    let out = tollgate(&token, &["run", "--bogus-flag"]);
    assert_eq!(out.status.code(), Some(64));
}

#[test]
fn check_accepts_a_good_config() {
    // A client certificate entry naming a certificate the store holds.
    let options = ProxyOptions {
        extra: "\n[[upstream.client_cert]]\nhosts = [\"a.test\"]\ncert = \"fwd-trust\"\n".into(),
        ..Default::default()
    };
    let setup = Setup::new(&options);
    let out = setup.tollgate(&["run", "--check"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("is valid"));
}

#[test]
fn status_and_cert_list_report_in_json() {
    let setup = Setup::new(&ProxyOptions::default());
    let out = setup.tollgate(&["hsm", "status", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let server = &status["servers"][0];
    assert_eq!(server["name"], "hsm-a");
    assert_eq!(server["token"], "tollgate-test");
    assert_eq!(server["state"], "authenticated");
    assert_eq!(server["up"], true);
    assert!(server["serial"].as_str().is_some_and(|s| !s.is_empty()));
    assert_eq!(status["ha"]["enabled"], false);
    assert!(status["ha"].get("group").is_some());

    let out = setup.tollgate(&["cert", "list", "--json"]);
    let certs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = certs.as_array().unwrap();
    assert_eq!(rows.len(), 2);
    let trust = rows.iter().find(|r| r["name"] == "fwd-trust").unwrap();
    assert_eq!(
        (trust["key"].as_str(), trust["forward_trust"].as_bool(), trust["forward_untrust"].as_bool()),
        (Some("hsm"), Some(true), Some(false))
    );
    assert!(trust["subject"].as_str().unwrap().contains("Forward Trust"));
    let untrust = rows.iter().find(|r| r["name"] == "fwd-untrust").unwrap();
    assert_eq!((untrust["key"].as_str(), untrust["forward_untrust"].as_bool()), (Some("hsm"), Some(true)));

    // Delete removes one entry and only that one.
    let out = setup.tollgate(&["cert", "delete", "fwd-untrust"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = setup.tollgate(&["cert", "list", "--json"]);
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 1);
    assert_eq!(rows[0]["name"], "fwd-trust");
    let out = setup.tollgate(&["cert", "delete", "fwd-untrust"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("no certificate named"));
    let out = setup.tollgate(&["cert", "generate-ca", "--name", "fwd-untrust2", "--on-hsm", "--forward-untrust"]);
    assert!(out.status.success());

    // The same name twice is refused; nothing is lost.
    let out = setup.tollgate(&["cert", "generate-ca", "--name", "fwd-trust", "--on-hsm", "--forward-trust"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("already exists"), "{}", stderr(&out));
    let out = setup.tollgate(&["cert", "list", "--json"]);
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap().as_array().unwrap().len(), 2);
}

#[test]
fn every_key_algorithm_can_be_generated_on_the_token() {
    let setup = Setup::new(&ProxyOptions { trust_algorithm: "ecdsa-p384", ..Default::default() });
    for (name, algorithm) in [("ca-rsa2048", "rsa-2048"), ("ca-rsa3072", "rsa-3072")] {
        let out = setup.tollgate(&[
            "cert",
            "generate-ca",
            "--name",
            name,
            "--on-hsm",
            "--forward-trust",
            "--algorithm",
            algorithm,
        ]);
        assert!(out.status.success(), "{algorithm}: {}", stderr(&out));
    }
    let out = setup.tollgate(&["cert", "list", "--json"]);
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for row in rows.as_array().unwrap() {
        assert_eq!(row["key"], "hsm", "{row}: test signature verifies");
    }
    let algorithms: Vec<_> =
        rows.as_array().unwrap().iter().map(|r| r["algorithm"].as_str().unwrap().to_string()).collect();
    assert!(algorithms.contains(&"ecdsa-p384".to_string()) && algorithms.contains(&"rsa-3072".to_string()));
    // Only the newest forward-trust CA holds the role.
    let trusted: Vec<_> = rows.as_array().unwrap().iter().filter(|r| r["forward_trust"] == true).collect();
    assert_eq!(trusted.len(), 1);
    assert_eq!(trusted[0]["name"], "ca-rsa3072");
    let out = setup.tollgate(&[
        "cert",
        "generate-ca",
        "--name",
        "x",
        "--on-hsm",
        "--forward-trust",
        "--algorithm",
        "dsa-1024",
    ]);
    assert_eq!(out.status.code(), Some(64));
    assert!(stderr(&out).contains("unknown key algorithm"));
}

#[test]
fn a_library_that_will_not_load_is_reported_clearly() {
    let token = Token::new();
    let config = token.path("tollgate.toml");
    write_config(&token, &config, &ProxyOptions::default());
    let text = std::fs::read_to_string(&config).unwrap().replace(SOFTHSM_MODULE, "/nonexistent/libvendor.so");
    std::fs::write(&config, text).unwrap();
    let out = tollgate(&token, &["hsm", "status", "--json", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["servers"][0]["up"], false);
    let state = status["servers"][0]["state"].as_str().unwrap();
    assert!(state.contains("/nonexistent/libvendor.so") && state.contains("could not be loaded"), "{state}");

    let out = tollgate(
        &token,
        &["cert", "generate-ca", "--name", "ca", "--on-hsm", "--forward-trust", "--config", config.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("could not be loaded"), "{}", stderr(&out));

    // A file that exists but is no PKCS#11 library.
    let fake = token.path("fake.so");
    std::fs::write(&fake, b"not a library").unwrap();
    let text = std::fs::read_to_string(&config).unwrap().replace("/nonexistent/libvendor.so", fake.to_str().unwrap());
    std::fs::write(&config, text).unwrap();
    let out = tollgate(&token, &["hsm", "status", "--json", "--config", config.to_str().unwrap()]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(status["servers"][0]["state"].as_str().unwrap().contains("could not be loaded"));
}

#[test]
fn a_wrong_pin_is_reported_once_and_never_retried() {
    let setup = Setup::new(&ProxyOptions::default());
    let wrong = setup.token.path("wrong.pin");
    std::fs::write(&wrong, "0000-wrong\n").unwrap();
    let config = setup.token.path("wrong.toml");
    write_config(&setup.token, &config, &ProxyOptions { pin_file: Some(wrong), ..Default::default() });
    let out = tollgate(&setup.token, &["hsm", "status", "--json", "--config", config.to_str().unwrap()]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let state = status["servers"][0]["state"].as_str().unwrap();
    assert!(state.contains("incorrect") && state.contains("not retrying"), "{state}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("0000-wrong") && !stderr(&out).contains("0000-wrong"));

    // The service starts, says so once, and does not try again on its own.
    let proxy = Proxy::start(&setup.token, &config);
    std::thread::sleep(Duration::from_millis(1500));
    let logs = proxy.logs.lock().clone();
    let attempts = logs.iter().filter(|l| l.contains("hsm server unavailable")).count();
    assert_eq!(attempts, 1, "{logs:#?}");
    assert!(logs.iter().all(|l| !l.contains("0000-wrong") && !l.contains(USER_PIN)), "no PIN in any log line");

    // The good PIN still works: the token was not locked by retries.
    let out = setup.tollgate(&["hsm", "status", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn missing_pin_source_is_a_clear_error() {
    let token = Token::new();
    let config = token.path("tollgate.toml");
    write_config(&token, &config, &ProxyOptions { pin_file: Some(token.path("absent.pin")), ..Default::default() });
    let out = tollgate(&token, &["hsm", "status", "--json", "--config", config.to_str().unwrap()]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let state = status["servers"][0]["state"].as_str().unwrap();
    assert!(state.contains("absent.pin"), "{state}");
}

#[test]
fn setup_checks_the_so_pin_and_login_seals_the_partition_password() {
    let token = Token::new();
    let config = token.path("tollgate.toml");
    write_config(&token, &config, &ProxyOptions::default());
    // No pin_file: the service uses a PIN sealed by `hsm login`.
    let text = std::fs::read_to_string(&config).unwrap();
    let text: String = text.lines().filter(|l| !l.starts_with("pin_file")).map(|l| format!("{l}\n")).collect();
    std::fs::write(&config, text).unwrap();
    let cfg = config.to_str().unwrap();

    let status = tollgate(&token, &["hsm", "status", "--json", "--config", cfg]);
    let json: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert!(json["servers"][0]["state"].as_str().unwrap().contains("tollgate hsm login"), "{json}");

    let so_ok = token.path("so.pin");
    std::fs::write(&so_ok, SO_PIN).unwrap();
    let so_bad = token.path("so-bad.pin");
    std::fs::write(&so_bad, "not-the-so-pin").unwrap();
    let out = tollgate(
        &token,
        &["hsm", "setup", "--server", "hsm-a", "--so-pin-file", so_ok.to_str().unwrap(), "--config", cfg],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = tollgate(
        &token,
        &["hsm", "setup", "--server", "hsm-a", "--so-pin-file", so_bad.to_str().unwrap(), "--config", cfg],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("administrator password (SO PIN) is incorrect"), "{}", stderr(&out));

    // A wrong partition password is refused and nothing is stored.
    let login = |pin: &str| {
        use std::io::Write;
        let mut child = token
            .cmd(tollgate_bin())
            .args(["hsm", "login", "--server", "hsm-a", "--config", cfg])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(format!("{pin}\n").as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    };
    let out = login("wrong-user-pin");
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("incorrect"));
    let sealed = token.path("state/hsm/hsm-a.pin.sealed");
    assert!(!sealed.exists());

    let out = login(USER_PIN);
    assert!(out.status.success(), "{}", stderr(&out));
    let bytes = std::fs::read(&sealed).unwrap();
    assert!(!bytes.windows(USER_PIN.len()).any(|w| w == USER_PIN.as_bytes()), "sealed, not in the clear");
    use std::os::unix::fs::PermissionsExt;
    for file in [&sealed, &token.path("state/device.key")] {
        assert_eq!(std::fs::metadata(file).unwrap().permissions().mode() & 0o777, 0o600, "{}", file.display());
    }
    let status = tollgate(&token, &["hsm", "status", "--json", "--config", cfg]);
    let json: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(json["servers"][0]["state"], "authenticated", "the sealed PIN logs in");
    let all = format!("{}{}", String::from_utf8_lossy(&status.stdout), String::from_utf8_lossy(&status.stderr));
    assert!(!all.contains(USER_PIN) && !all.contains(SO_PIN));
}

/// Exiting while the HSM workers run must not tear the PKCS#11 library down under them:
/// `exit` ran SoftHSM2's and OpenSSL's teardown while workers were still opening sessions, and
/// about 1 in 400 short commands died in a double free or a segfault (more workers, more
/// often). Probabilistic: 1,200 runs catch that rate 19 times in 20.
#[test]
fn commands_that_open_the_hsm_always_exit_cleanly() {
    let setup = Setup::new(&ProxyOptions { extra: "\n[hsm]\nworkers = 8\n".into(), ..ProxyOptions::default() });
    let run = || {
        (0..600)
            .map(|_| setup.tollgate(&["cert", "list"]))
            .filter(|out| !out.status.success())
            .map(|out| format!("{:?}: {}", out.status, stderr(&out)))
            .collect::<Vec<_>>()
    };
    let failures: Vec<String> = std::thread::scope(|scope| {
        let runs = [scope.spawn(run), scope.spawn(run)];
        runs.into_iter().flat_map(|r| r.join().unwrap()).collect()
    });
    assert!(failures.is_empty(), "{} of 1200 runs failed, first: {}", failures.len(), failures[0]);
}

const PKCS11_SPY: &str = "/usr/lib/x86_64-linux-gnu/pkcs11/pkcs11-spy.so";

/// Every command that opens the HSM logs in once per server, wrong partition password or
/// right: counted with OpenSC's pkcs11-spy between tollgate and SoftHSM2 (tokens lock after a
/// few failed logins, so a retry is a fault).
#[test]
fn every_command_logs_in_once_and_the_service_once() {
    assert!(std::path::Path::new(PKCS11_SPY).exists(), "{PKCS11_SPY}: run `bash deploy/install-test-deps` (opensc)");
    let setup = Setup::new(&ProxyOptions::default());
    // The master key HSM-encrypted, so the commands that read stored secrets open the HSM too.
    let out = setup.tollgate(&["master-key", "encrypt-with-hsm", "--lifetime", "90", "--reminder", "10"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let pki = TestPki::new();
    let (leaf, key) = pki.leaf_files(&LeafSpec::new(&["soft.test"]), setup.token.dir.path());
    let ca = setup.token.path("trust.pem");
    let spied = |pin: &std::path::Path, name: &str| {
        let config = setup.token.path(&format!("{name}.toml"));
        let text = std::fs::read_to_string(&setup.config).unwrap();
        let text = text.replace(SOFTHSM_MODULE, PKCS11_SPY).replace(
            &format!("pin_file = \"{}\"", setup.token.path("user.pin").display()),
            &format!("pin_file = \"{}\"", pin.display()),
        );
        std::fs::write(&config, text).unwrap();
        config
    };
    let wrong = setup.token.path("wrong.pin");
    std::fs::write(&wrong, "0000-wrong\n").unwrap();
    let log = setup.token.path("spy.log");
    let logins = |config: &std::path::Path, args: &[&str], stdin: &str| {
        let _ = std::fs::remove_file(&log);
        let mut child = setup
            .token
            .cmd(tollgate_bin())
            .args(args)
            .arg("--config")
            .arg(config)
            .env("PKCS11SPY", SOFTHSM_MODULE)
            .env("PKCS11SPY_OUTPUT", &log)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        let spy = std::fs::read_to_string(&log).unwrap_or_default();
        (spy.lines().filter(|l| l.trim_end().ends_with(": C_Login")).count(), out)
    };
    let bundle = setup.token.path("bundle.tar.gz");
    let commands: Vec<(Vec<&str>, &str)> = vec![
        (vec!["hsm", "status"], ""),
        (vec!["hsm", "info"], ""),
        (vec!["cert", "list"], ""),
        (vec!["cert", "generate-ca", "--name", "spied", "--on-hsm", "--forward-untrust"], ""),
        (vec!["cert", "import", "--name", "spied-import", "--cert", ca.to_str().unwrap(), "--key-on-hsm"], ""),
        (
            vec![
                "cert",
                "import",
                "--name",
                "spied-soft",
                "--cert",
                leaf.to_str().unwrap(),
                "--key",
                key.to_str().unwrap(),
            ],
            "",
        ),
        (vec!["master-key", "status"], ""),
        (vec!["master-key", "set"], ""),
        (vec!["master-key", "encrypt-with-hsm", "--lifetime", "90", "--reminder", "10"], ""),
        (vec!["hsm", "rotate-wrapping-key"], ""),
        (vec!["hsm", "support-bundle", "--out", bundle.to_str().unwrap()], ""),
        (vec!["api-token", "set"], "a-token-of-sixteen-chars-or-more\n"),
    ];
    let wrong_config = spied(&wrong, "wrong");
    for (args, stdin) in &commands {
        let (count, out) = logins(&wrong_config, args, stdin);
        assert_eq!(count, 1, "{args:?} with a wrong PIN logged in {count} times: {}", stderr(&out));
        // Reports (the certificate list, the support file) are made with the HSM down too.
        let reports = args == &["cert", "list"] || args.contains(&"support-bundle");
        assert!(reports || !out.status.success(), "{args:?} fails with a wrong PIN");
    }
    let (count, out) =
        logins(&wrong_config, &["hsm", "login", "--server", "hsm-a", "--pin-file", wrong.to_str().unwrap()], "");
    assert_eq!((count, out.status.code()), (1, Some(1)), "hsm login: {}", stderr(&out));

    // With the right PIN, every command still logs in once (status after a change included).
    let right_config = spied(&setup.token.path("user.pin"), "right");
    for (args, stdin) in commands.iter().filter(|(args, _)| !args.contains(&"generate-ca") && !args.contains(&"import"))
    {
        let (count, out) = logins(&right_config, args, stdin);
        assert_eq!(count, 1, "{args:?} with the right PIN logged in {count} times: {}", stderr(&out));
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    }

    // The service: one login at start, none after in 4 s of running with the wrong PIN.
    let _ = std::fs::remove_file(&log);
    let mut cmd = setup.token.cmd(tollgate_bin());
    cmd.env("PKCS11SPY", SOFTHSM_MODULE).env("PKCS11SPY_OUTPUT", &log);
    let proxy = Proxy::start_with(cmd, &wrong_config, 3);
    std::thread::sleep(Duration::from_secs(4));
    drop(proxy);
    let spy = std::fs::read_to_string(&log).unwrap();
    assert_eq!(spy.lines().filter(|l| l.trim_end().ends_with(": C_Login")).count(), 1, "the service logs in once");
}

/// `/metrics` read by a real parser (Python's prometheus_client, Debian's package) with two HSM
/// servers whose names hold a quote and a backslash, the second one's library at a path with a
/// space: every family is declared once with its series together, and labels round-trip.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_with_a_real_parser_whatever_the_server_names() {
    let setup = Setup::new(&ProxyOptions::default());
    let spaced = setup.token.path("vendor lib");
    std::fs::create_dir(&spaced).unwrap();
    let module = spaced.join("libsofthsm2.so");
    std::fs::copy(SOFTHSM_MODULE, &module).unwrap();
    let text = std::fs::read_to_string(&setup.config).unwrap().replace("name = \"hsm-a\"", "name = 'we\"ird'");
    let second = format!(
        "\n[[hsm.server]]\nname = 'back\\slash'\nmodule = \"{}\"\ntoken = \"{}\"\npin_file = \"{}\"\n",
        module.display(),
        setup.token.label,
        setup.token.path("user.pin").display()
    );
    std::fs::write(&setup.config, format!("{text}{second}")).unwrap();
    let proxy = setup.start();
    let metrics = http_get(proxy.management, "/metrics").await;
    let script = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
families = [(f.name, f.type, [(s.name, s.labels, s.value) for s in f.samples])
            for f in text_string_to_metric_families(sys.stdin.read())]
print(json.dumps(families))
"#;
    // Debian's interpreter, where python3-prometheus-client is installed (not a pyenv's).
    let mut python = std::process::Command::new("/usr/bin/python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    use std::io::Write;
    python.stdin.take().unwrap().write_all(metrics.as_bytes()).unwrap();
    let out = python.wait_with_output().unwrap();
    assert!(out.status.success(), "the parser refused /metrics: {}\n{metrics}", stderr(&out));
    type Sample = (String, serde_json::Value, f64);
    let families: Vec<(String, String, Vec<Sample>)> = serde_json::from_slice(&out.stdout).unwrap();
    let mut names: Vec<&str> = families.iter().map(|(name, _, _)| name.as_str()).collect();
    let count = names.len();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), count, "a family split in two:\n{metrics}");
    let family =
        |name: &str| families.iter().find(|(n, _, _)| n == name).unwrap_or_else(|| panic!("{name}:\n{metrics}"));
    let up: Vec<(String, f64)> =
        family("tollgate_hsm_member_up").2.iter().map(|(_, l, v)| (l["server"].as_str().unwrap().into(), *v)).collect();
    assert!(up.contains(&("we\"ird".into(), 1.0)) && up.contains(&("back\\slash".into(), 1.0)), "{up:?}");
    let queues: Vec<&str> =
        family("tollgate_hsm_queue_depth").2.iter().map(|(_, l, _)| l["library"].as_str().unwrap()).collect();
    assert!(queues.contains(&module.to_str().unwrap()), "{queues:?}");
    assert_eq!(family("tollgate_hsm_sign_duration_seconds").1, "histogram");
    for process in
        ["process_cpu_seconds", "process_resident_memory_bytes", "process_open_fds", "process_start_time_seconds"]
    {
        family(process);
    }
    for spec in
        ["tollgate_hsm_sign", "tollgate_cert_cache_hits", "tollgate_cert_cache_misses", "tollgate_connections_active"]
    {
        family(spec);
    }
}

/// What the management API answers when it cannot do what it is asked: a status that says why
/// (404, 405, 401, 503) and a JSON body, from one place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_errors_say_what_went_wrong() {
    let setup = Setup::new(&ProxyOptions::default());
    let token_file = setup.token.path("api.token");
    std::fs::write(&token_file, "s3cret-api-token\n").unwrap();
    let text = std::fs::read_to_string(&setup.config).unwrap().replace(
        "[management]\nlisten = \"127.0.0.1:0\"",
        &format!("[management]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"{}\"", token_file.display()),
    );
    std::fs::write(&setup.config, &text).unwrap();
    let proxy = setup.start();
    let (status, body) = http_status(proxy.management, "/api/v1/certs/fwd-trust").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&body).unwrap()["key"], "hsm");
    let (status, body) = http_status(proxy.management, "/api/v1/certs/no-such-cert").await;
    assert_eq!(status, 404, "{body}");
    let error: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(error["code"], "not-found");
    assert!(error["error"].as_str().unwrap().contains("no-such-cert"), "{error}");
    assert_eq!(http_status(proxy.management, "/no/such/route").await.0, 404);
    assert!(bearer_post(proxy.management, "/api/v1/certs", None).await.starts_with("HTTP/1.1 405"));
    assert!(bearer_post(proxy.management, "/api/v1/hsm/rotate-wrapping-key", None).await.starts_with("HTTP/1.1 401"));
    drop(proxy);

    // The HSM down (a wrong partition password): what needs it answers 503, with the reason.
    let wrong = setup.token.path("wrong.pin");
    std::fs::write(&wrong, "0000-wrong\n").unwrap();
    let pin = format!("pin_file = \"{}\"", setup.token.path("user.pin").display());
    std::fs::write(&setup.config, text.replace(&pin, &format!("pin_file = \"{}\"", wrong.display()))).unwrap();
    let proxy = setup.start();
    let answer = bearer_post(proxy.management, "/api/v1/hsm/rotate-wrapping-key", Some("s3cret-api-token")).await;
    assert!(answer.starts_with("HTTP/1.1 503") && answer.contains("tollgate-error: unavailable"), "{answer}");
}
