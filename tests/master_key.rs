//! The master key: set, encrypted by an AES wrapping key generated on the HSM, rotated with the
//! old generation kept, and crash-safe — a rotation killed at every step leaves a master key
//! that opens. Lifetimes are validated; the wrapping keys are sensitive and never extractable.

mod support;

use support::*;

fn status(setup: &Setup) -> serde_json::Value {
    let out = setup.tollgate(&["master-key", "status", "--json"]);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn the_master_key_is_encrypted_by_an_hsm_key_and_rotation_survives_a_crash_at_every_step() {
    let setup = Setup::new(&ProxyOptions::default());
    let s = status(&setup);
    assert_eq!((s["configured"].as_bool(), s["hsm_encrypted"].as_bool()), (Some(false), Some(false)));
    assert!(s["expires_at"].is_null());

    let out = setup.tollgate(&["master-key", "set", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s = status(&setup);
    assert_eq!(
        (s["configured"].as_bool(), s["opens"].as_bool(), s["hsm_encrypted"].as_bool()),
        (Some(true), Some(true), Some(false))
    );

    // Lifetime and reminder are validated, with exit code 64.
    for (lifetime, reminder, words) in
        [("0", "1", "1–730"), ("731", "1", "1–730"), ("30", "400", "1–365"), ("30", "30", "less than")]
    {
        let out = setup.tollgate(&["master-key", "encrypt-with-hsm", "--lifetime", lifetime, "--reminder", reminder]);
        assert_eq!(out.status.code(), Some(64), "{lifetime}/{reminder}");
        assert!(String::from_utf8_lossy(&out.stderr).contains(words), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let out = setup.tollgate(&["master-key", "encrypt-with-hsm", "--lifetime", "365", "--reminder", "30", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s = status(&setup);
    assert_eq!(
        (s["hsm_encrypted"].as_bool(), s["wrapping_key_generation"].as_u64(), s["opens"].as_bool()),
        (Some(true), Some(1), Some(true))
    );
    assert!(
        s["expires_at"]
            .as_str()
            .is_some_and(|e| e.starts_with(&(time_year() + 1).to_string()) || e.starts_with(&time_year().to_string()))
    );
    assert_eq!(s["reminder"], false);

    // The wrapping key lives on the token: sensitive, never extractable.
    let listing = setup.token.pkcs11_tool(&["--list-objects", "--type", "secrkey"]);
    let text = String::from_utf8_lossy(&listing.stdout);
    assert!(
        text.contains("tollgate-mk-wrap-v1") && text.contains("sensitive") && text.contains("never extractable"),
        "{text}"
    );
    let file = std::fs::read_to_string(setup.token.path("state/master-key.json")).unwrap();
    assert!(!file.contains("device_sealed\": \""), "no device-sealed copy once HSM-encrypted: {file}");

    // Rotation: generation 2, the old one kept, the key still opens.
    let out = setup.tollgate(&["hsm", "rotate-wrapping-key", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s = status(&setup);
    assert_eq!((s["wrapping_key_generation"].as_u64(), s["opens"].as_bool()), (Some(2), Some(true)));

    // Killed at every step of a rotation: the master key opens every time.
    let mut generation = 2;
    for step in ["rotate:after-generate", "rotate:after-unwrap", "rotate:after-wrap", "rotate:after-write"] {
        let out = setup
            .token
            .cmd(tollgate_bin())
            .args(["hsm", "rotate-wrapping-key", "--config"])
            .arg(&setup.config)
            .env("TOLLGATE_FAILPOINT", step)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{step}: the failpoint stops the process");
        let s = status(&setup);
        assert_eq!(s["opens"], true, "{step}: {s}");
        let now = s["wrapping_key_generation"].as_u64().unwrap();
        assert!(now == generation || now == generation + 1, "{step}: generation {now} after {generation}");
        generation = now;
    }
    // And a normal rotation after all that.
    let out = setup.tollgate(&["hsm", "rotate-wrapping-key", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s = status(&setup);
    assert_eq!((s["wrapping_key_generation"].as_u64(), s["opens"].as_bool()), (Some(generation + 1), Some(true)));
    let listing = setup.token.pkcs11_tool(&["--list-objects", "--type", "secrkey"]);
    for g in 1..=generation + 1 {
        assert!(
            String::from_utf8_lossy(&listing.stdout).contains(&format!("tollgate-mk-wrap-v{g}")),
            "generation {g} kept"
        );
    }

    // A new master key given on stdin, stored under the current generation.
    set_master_key(&setup, &"ab".repeat(32));
    let s = status(&setup);
    assert_eq!((s["opens"].as_bool(), s["hsm_encrypted"].as_bool()), (Some(true), Some(true)));
    let file = std::fs::read_to_string(setup.token.path("state/master-key.json")).unwrap();
    assert!(!file.contains(&"ab".repeat(32)), "the master key is never stored in the clear");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(setup.token.path("state/master-key.json")).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // The service publishes the remaining lifetime.
    let proxy = setup.start();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let left = runtime.block_on(proxy.metric("tollgate_master_key_expiry_seconds"));
    assert!(left > 364 * 86_400 && left <= 365 * 86_400, "{left}");
    // The management API shows the same status; rotation there needs the API token.
    let api: serde_json::Value =
        serde_json::from_str(&runtime.block_on(http_get(proxy.management, "/api/v1/master-key"))).unwrap();
    assert_eq!((api["hsm_encrypted"].as_bool(), api["opens"].as_bool()), (Some(true), Some(true)), "{api}");
    let refused = runtime.block_on(raw_post(proxy.management, "/api/v1/hsm/rotate-wrapping-key"));
    assert!(refused.starts_with("HTTP/1.1 403"), "no token configured: changes refused: {refused}");
}

#[test]
fn the_support_file_holds_the_diagnostics_and_none_of_the_secrets() {
    let setup = Setup::new(&ProxyOptions::default());
    let api_token = "support-api-token-7f3a";
    let token_file = setup.token.path("api.token");
    std::fs::write(&token_file, format!("{api_token}\n")).unwrap();
    let master_hex = "c0ffee".repeat(10) + "beef";
    // A mistyped master key is refused without being repeated.
    for typo in [&master_hex[..63], &format!("{}x", &master_hex[..63])] {
        let out = master_key_from_stdin(&setup, typo);
        assert_eq!(out.status.code(), Some(64));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("hex digit") && !stderr.contains(&master_hex[..16]), "{stderr}");
    }
    set_master_key(&setup, &master_hex);
    // A certificate with a software key, sealed under the master key.
    let pki = TestPki::new();
    let (leaf_cert, leaf_key) = pki.leaf_files(&LeafSpec::new(&["www.support.test"]), pki.dir.path());
    let out = import_soft(
        &setup,
        "soft",
        leaf_cert.to_str().unwrap(),
        leaf_key.to_str().unwrap(),
        &["--inbound", "www.support.test"],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let leaf_key_pem = std::fs::read_to_string(&leaf_key).unwrap();
    let leaf_key_der = rustls::pki_types::pem::PemObject::from_pem_slice(leaf_key_pem.as_bytes())
        .map(|k: rustls::pki_types::PrivateKeyDer<'static>| k.secret_der().to_vec())
        .unwrap();
    let out = setup.tollgate(&["master-key", "encrypt-with-hsm", "--lifetime", "90", "--reminder", "10"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = setup.tollgate(&[
        "hsm",
        "login",
        "--server",
        "hsm-a",
        "--pin-file",
        setup.token.path("user.pin").to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // Every secret this setup knows, in every spelling it could leak in.
    let master_raw: Vec<u8> =
        (0..master_hex.len()).step_by(2).map(|i| u8::from_str_radix(&master_hex[i..i + 2], 16).unwrap()).collect();
    let mut secrets: Vec<Vec<u8>> = vec![
        SO_PIN.into(),
        USER_PIN.into(),
        api_token.into(),
        master_hex.clone().into(),
        master_hex.to_uppercase().into(),
        base64(&master_raw).into(),
        master_raw.clone(),
    ];
    secrets.extend(key_spellings(&leaf_key_der, &leaf_key_pem));
    for file in ["state/device.key"] {
        if let Ok(bytes) = std::fs::read(setup.token.path(file)) {
            secrets.push(base64(&bytes).into());
            secrets.push(bytes);
        }
    }

    // Without the service: built by the CLI alone, and it says the log lines are missing.
    let alone = setup.token.path("alone.tar.gz");
    let out = setup.tollgate(&["hsm", "support-bundle", "--out", alone.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("without the service's log lines"));
    let files = unpack(&alone);
    for name in
        ["versions.txt", "config.toml", "hsm-status.json", "hsm-info.json", "certs.json", "master-key.json", "logs.txt"]
    {
        assert!(files.iter().any(|(n, _)| n.ends_with(name)), "{name} missing from the support file");
    }
    let text =
        |name: &str| String::from_utf8_lossy(&files.iter().find(|(n, _)| n.ends_with(name)).unwrap().1).into_owned();
    assert!(text("versions.txt").contains(env!("CARGO_PKG_VERSION")));
    assert!(text("hsm-status.json").contains("hsm-a"));
    assert!(
        text("certs.json").contains("fwd-trust")
            && text("certs.json").contains("\"hsm\"")
            && text("certs.json").contains("\"software\""),
        "{}",
        text("certs.json")
    );
    assert!(text("master-key.json").contains("\"hsm_encrypted\": true"));
    assert!(text("config.toml").contains("pin_file"), "references to where secrets live stay: {}", text("config.toml"));
    assert!(text("config.toml").contains(&setup.token.label), "the token label stays: {}", text("config.toml"));
    assert_no_secret(&alone, &files, &secrets);

    // With the service: built there, recent log lines included, the token required.
    let config = std::fs::read_to_string(&setup.config).unwrap().replace(
        "[management]\nlisten = \"127.0.0.1:0\"",
        &format!("[management]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"{}\"", token_file.display()),
    );
    std::fs::write(&setup.config, &config).unwrap();
    let proxy = setup.start();
    let cli_config = setup.token.path("cli.toml");
    config_for_cli(&setup.config, proxy.management, &cli_config);
    let served = setup.token.path("served.tar.gz");
    let out = setup
        .token
        .cmd(tollgate_bin())
        .args(["hsm", "support-bundle", "--out", served.to_str().unwrap(), "--config"])
        .arg(&cli_config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("by the running service"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let files = unpack(&served);
    let logs = String::from_utf8_lossy(&files.iter().find(|(n, _)| n.ends_with("logs.txt")).unwrap().1).into_owned();
    assert!(logs.contains("\"listening\""), "the service's recent log lines: {logs}");
    assert_no_secret(&served, &files, &secrets);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let refused = runtime.block_on(raw_post(proxy.management, "/api/v1/hsm/support-bundle"));
    assert!(refused.starts_with("HTTP/1.1 401"), "no bearer token: refused: {refused}");
}

#[test]
fn the_status_page_shows_hsm_members_certificates_and_master_key_in_chromium() {
    let setup = Setup::new(&ProxyOptions::default());
    let out = setup.tollgate(&["master-key", "set"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = setup.tollgate(&["master-key", "encrypt-with-hsm", "--lifetime", "200", "--reminder", "20"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // A second member whose token does not exist: red on the page.
    let mut config = std::fs::read_to_string(&setup.config).unwrap();
    config.push_str(&format!(
        "\n[[hsm.server]]\nname = \"hsm-b\"\nmodule = \"{SOFTHSM_MODULE}\"\ntoken = \"no-such-token\"\npin_file = \"{}\"\n",
        setup.token.path("user.pin").display()
    ));
    std::fs::write(&setup.config, config).unwrap();
    let proxy = setup.start();

    let profile = tempfile::tempdir().unwrap();
    let out = std::process::Command::new("chromium")
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-dev-shm-usage"])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("--dump-dom")
        .arg(format!("http://{}/", proxy.management))
        .output()
        .expect("chromium (deploy/install-test-deps installs it)");
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(
        dom.contains("<h1>tollgate"),
        "chromium rendered the page: {dom}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let row = |attr: &str, name: &str| {
        let start = dom.find(&format!("{attr}=\"{name}\"")).unwrap_or_else(|| panic!("no row for {name}: {dom}"));
        let tr = dom[..start].rfind("<tr").unwrap();
        dom[tr..start + dom[start..].find("</tr>").unwrap()].to_string()
    };
    let a = row("data-server", "hsm-a");
    assert!(a.contains("class=\"up\"") && a.contains("authenticated") && a.contains(&setup.token.label), "{a}");
    let b = row("data-server", "hsm-b");
    assert!(b.contains("class=\"down\"") && b.contains("no-such-token"), "{b}");
    for name in ["fwd-trust", "fwd-untrust"] {
        let cert = row("data-cert", name);
        assert!(cert.contains('\u{1F512}') && cert.contains(">hsm<"), "{cert}");
    }
    let expires = status(&setup)["expires_at"].as_str().unwrap().to_string();
    let master = &dom[dom.find("id=\"master-key\"").unwrap()..];
    assert!(
        master.contains("opens") && master.contains(&expires) && master.contains("encrypted on the HSM"),
        "{master}"
    );
}

#[test]
fn hsm_reset_removes_only_the_servers_and_their_credentials_and_adding_them_back_restores_all() {
    let setup = Setup::new(&ProxyOptions::default());
    let out = setup.tollgate(&["master-key", "set"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = setup.tollgate(&["master-key", "encrypt-with-hsm", "--lifetime", "30", "--reminder", "5"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let cert_status = |setup: &Setup| -> Vec<(String, String)> {
        let out = setup.tollgate(&["cert", "list", "--json"]);
        let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        rows.as_array()
            .unwrap()
            .iter()
            .map(|r| (r["name"].as_str().unwrap().into(), r["key"].as_str().unwrap().into()))
            .collect()
    };
    assert!(cert_status(&setup).iter().all(|(_, key)| key == "hsm"));
    let state_files =
        ["state/certs.json", "state/master-key.json"].map(|f| std::fs::read(setup.token.path(f)).unwrap());
    let config_before = std::fs::read_to_string(&setup.config).unwrap();

    // Without --yes: refused, nothing changed.
    let out = setup.tollgate(&["hsm", "reset"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--yes"));
    assert_eq!(std::fs::read_to_string(&setup.config).unwrap(), config_before);

    let out = setup.tollgate(&["hsm", "reset", "--yes", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let config_after = std::fs::read_to_string(&setup.config).unwrap();
    assert!(!config_after.contains("[[hsm.server]]") && !config_after.contains("user.pin"), "{config_after}");
    assert!(
        config_after.contains("[[listener]]") && config_after.contains("[upstream]"),
        "the rest stays: {config_after}"
    );
    for (file, before) in ["state/certs.json", "state/master-key.json"].iter().zip(&state_files) {
        assert_eq!(&std::fs::read(setup.token.path(file)).unwrap(), before, "{file} untouched");
    }
    // Red status, HSM-keyed certificates in error, the HSM-encrypted master key closed.
    let out = setup.tollgate(&["hsm", "status", "--json"]);
    assert_eq!(out.status.code(), Some(1), "status is red");
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["servers"].as_array().map(Vec::len), Some(0));
    assert!(cert_status(&setup).iter().all(|(_, key)| key == "error"));
    let out = setup.tollgate(&["master-key", "status", "--json"]);
    let mk: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(mk["opens"], false, "{mk}");

    // Setup again: everything works, the master key included. The partition password goes in
    // sealed this time (no pin_file), so a second reset has a stored credential to remove.
    let module = SOFTHSM_MODULE;
    let pin = setup.token.path("user.pin");
    let set_up_again = || {
        let out = setup.tollgate(&[
            "hsm",
            "add-server",
            "--name",
            "hsm-a",
            "--module",
            module,
            "--token",
            &setup.token.label,
        ]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let out = setup.tollgate(&["hsm", "login", "--server", "hsm-a", "--pin-file", pin.to_str().unwrap()]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    set_up_again();
    let sealed = setup.token.path("state/hsm/hsm-a.pin.sealed");
    assert!(sealed.exists(), "hsm login stored the partition password sealed");
    let out = setup.tollgate(&["hsm", "reset", "--yes", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["sealed_pins"].as_array().map(Vec::len), Some(1), "{report}");
    assert!(!sealed.exists(), "the stored partition password is removed");
    assert_eq!(setup.tollgate(&["hsm", "status", "--json"]).status.code(), Some(1));
    set_up_again();
    let out = setup.tollgate(&["hsm", "add-server", "--name", "hsm-a", "--module", module, "--token", "x"]);
    assert_eq!(out.status.code(), Some(64), "a duplicate name is refused");
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    let out = setup.tollgate(&["hsm", "status", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(cert_status(&setup).iter().all(|(_, key)| key == "hsm"));
    let out = setup.tollgate(&["master-key", "status", "--json"]);
    let mk: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((mk["opens"].as_bool(), mk["hsm_encrypted"].as_bool()), (Some(true), Some(true)), "{mk}");
    let proxy = setup.start();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    assert!(runtime.block_on(http_get(proxy.management, "/api/v1/hsm/status")).contains("authenticated"));
}

/// A POST without credentials; the raw response.
async fn raw_post(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(format!("POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut response = String::new();
    tcp.read_to_string(&mut response).await.unwrap();
    response
}

/// `tollgate master-key set --stdin` with `hex`.
fn set_master_key(setup: &Setup, hex: &str) {
    let out = master_key_from_stdin(setup, hex);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

fn master_key_from_stdin(setup: &Setup, text: &str) -> std::process::Output {
    setup.tollgate_stdin(&["master-key", "set", "--stdin", "--json"], text)
}

fn time_year() -> i32 {
    time::OffsetDateTime::now_utc().year()
}

/// `tollgate cert import --name NAME --cert CERT --key KEY EXTRA…`.
fn import_soft(setup: &Setup, name: &str, cert: &str, key: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["cert", "import", "--name", name, "--cert", cert, "--key", key];
    args.extend_from_slice(extra);
    setup.tollgate(&args)
}

fn cert_keys(setup: &Setup) -> std::collections::HashMap<String, String> {
    let out = setup.tollgate(&["cert", "list", "--json"]);
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    rows.iter()
        .map(|r| {
            let key = r["key"].as_str().unwrap().to_string();
            let reason = r["reason"].as_str().map(|e| format!(" ({e})")).unwrap_or_default();
            (r["name"].as_str().unwrap().to_string(), key + &reason)
        })
        .collect()
}

#[test]
fn software_keys_are_sealed_serve_and_survive_master_key_changes_a_crash_and_a_ca_swap_on_sighup() {
    require(&["openssl"]);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let pki = TestPki::new();
    let (chain, key) = pki.leaf(&LeafSpec::new(&["www.origin.test"]));
    let origin = runtime.block_on(Origin::start("origin", chain, key, &["http/1.1"]));
    let plain = runtime.block_on(Origin::start_plain("plain"));
    let setup = Setup::new(&ProxyOptions {
        resolve: vec![("www.origin.test:443".into(), origin.addr)],
        ca_bundles: vec![pki.bundle()],
        extra: inbound_site("www.soft.test", plain.addr),
        ..ProxyOptions::default()
    });
    let dir = setup.token.path("keys");
    std::fs::create_dir_all(&dir).unwrap();

    // An inbound server certificate with a PKCS#8 PEM key (rcgen), and a forward-trust CA with a
    // SEC1 key given as DER (openssl).
    let (server_cert, server_key) = pki.leaf_files(&LeafSpec::new(&["www.soft.test"]), &dir);
    let server_key_pem = std::fs::read_to_string(&server_key).unwrap();
    let server_key_der = rustls::pki_types::pem::PemObject::from_pem_slice(server_key_pem.as_bytes())
        .map(|k: rustls::pki_types::PrivateKeyDer<'static>| k.secret_der().to_vec())
        .unwrap();
    openssl(&dir, &["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca2.key"]);
    openssl(
        &dir,
        &[
            "req",
            "-new",
            "-x509",
            "-key",
            "ca2.key",
            "-subj",
            "/CN=tollgate software trust CA",
            "-days",
            "30",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-out",
            "ca2.pem",
        ],
    );
    openssl(&dir, &["ec", "-in", "ca2.key", "-outform", "DER", "-out", "ca2.der"]);
    let ca2_pem = std::fs::read_to_string(dir.join("ca2.key")).unwrap();
    let ca2_der = std::fs::read(dir.join("ca2.der")).unwrap();
    let mut secrets = key_spellings(&server_key_der, &server_key_pem);
    secrets.extend(key_spellings(&ca2_der, &ca2_pem));

    // A key that does not match its certificate is refused, naming the problem.
    let out =
        import_soft(&setup, "mismatch", server_cert.to_str().unwrap(), dir.join("ca2.der").to_str().unwrap(), &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not match"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = import_soft(
        &setup,
        "soft-inbound",
        server_cert.to_str().unwrap(),
        server_key.to_str().unwrap(),
        &["--inbound", "www.soft.test", "--json"],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let imported: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(imported["key"], "software");
    assert_eq!(cert_keys(&setup)["soft-inbound"], "software");

    let mut proxy = Proxy::start_with(setup.token.cmd(tollgate_bin()), &setup.config, 4);
    let (sni, inbound) = (proxy.sni, proxy.listener("inbound"));

    runtime.block_on(async {
        // Inbound: served with the software key, relayed to the origin.
        let (client, seen) = capturing_client(&["http/1.1"]);
        let tls = tls_via_sni(inbound, "www.soft.test", client).await.unwrap();
        let (status, _, body) = request(tls, false, get("www.soft.test", "/in", false)).await;
        assert_eq!((status, body.contains("origin=plain")), (200, true), "{body}");
        let served = seen.lock()[0].clone();
        assert_eq!(served, pem_cert(&server_cert), "the imported certificate is served");
    });

    // An established intercepted connection, leaf from the HSM CA.
    let (mut sender, first_leaf) = runtime.block_on(async {
        let tls = tls_via_sni(sni, "www.origin.test", trusting_client(&setup.trust_ca, &["http/1.1"])).await.unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await.unwrap();
        tokio::spawn(conn);
        (sender, setup.trust_ca.clone())
    });
    let ask = |sender: &mut hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>| {
        runtime.block_on(async {
            let response = sender.send_request(get("www.origin.test", "/kept", false)).await.unwrap();
            response.status().as_u16()
        })
    };
    assert_eq!(ask(&mut sender), 200);

    // A software forward-trust CA takes over on SIGHUP: new connections get leaves from it; the
    // established one keeps working.
    let out = import_soft(
        &setup,
        "soft-trust",
        dir.join("ca2.pem").to_str().unwrap(),
        dir.join("ca2.der").to_str().unwrap(),
        &["--forward-trust"],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let keys = cert_keys(&setup);
    assert_eq!((keys["soft-trust"].as_str(), keys["fwd-trust"].as_str()), ("software", "hsm"));
    proxy.signal("-HUP");
    proxy.wait_log("the reload", |v| v["message"] == "configuration reloaded");
    let ca2 = pem_cert(&dir.join("ca2.pem"));
    runtime.block_on(async {
        let tls = tls_via_sni(sni, "www.origin.test", trusting_client(&ca2, &["http/1.1"])).await;
        let tls = tls.expect("a new connection gets a leaf from the new forward-trust CA");
        let (status, _, _) = request(tls, false, get("www.origin.test", "/new", false)).await;
        assert_eq!(status, 200);
        assert!(
            tls_via_sni(sni, "www.origin.test", trusting_client(&first_leaf, &["http/1.1"])).await.is_err(),
            "the old CA no longer signs new leaves"
        );
    });
    assert_eq!(ask(&mut sender), 200, "the connection established before the reload still serves");
    assert!(proxy.alive());
    drop(proxy);

    // No spelling of either key is anywhere in the state directory; the vault file is 0600.
    let state = setup.token.path("state");
    for (name, bytes) in files_under(&state) {
        for secret in &secrets {
            assert!(!bytes.windows(secret.len()).any(|w| w == secret.as_slice()), "a private key is in {name}");
        }
    }
    use std::os::unix::fs::PermissionsExt;
    let vault = state.join("master-key.json");
    assert_eq!(std::fs::metadata(&vault).unwrap().permissions().mode() & 0o777, 0o600);

    // A new master key re-encrypts both keys; HSM encryption keeps them readable.
    set_master_key(&setup, &"5a".repeat(32));
    let keys = cert_keys(&setup);
    assert_eq!((keys["soft-inbound"].as_str(), keys["soft-trust"].as_str()), ("software", "software"));
    let out = setup.tollgate(&["master-key", "encrypt-with-hsm", "--lifetime", "30", "--reminder", "5"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(cert_keys(&setup)["soft-inbound"], "software");

    // Killed just before its write, a master key change loses nothing: the file is untouched
    // and every secret still opens. Completed, everything opens under the new key.
    let before = std::fs::read(&vault).unwrap();
    let out = setup
        .token
        .cmd(tollgate_bin())
        .args(["master-key", "set", "--config"])
        .arg(&setup.config)
        .env("TOLLGATE_FAILPOINT", "set:before-write")
        .output()
        .unwrap();
    assert!(!out.status.success(), "the failpoint stops the process");
    assert_eq!(std::fs::read(&vault).unwrap(), before, "nothing written");
    assert_eq!(cert_keys(&setup)["soft-trust"], "software");
    let out = setup.tollgate(&["master-key", "set", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_ne!(std::fs::read(&vault).unwrap(), before);
    let keys = cert_keys(&setup);
    assert_eq!((keys["soft-inbound"].as_str(), keys["soft-trust"].as_str()), ("software", "software"));
    assert_eq!(status(&setup)["hsm_encrypted"], true, "a new master key stays HSM-encrypted");

    // A tampered sealed key is an error with the reason, not a crash.
    let text = String::from_utf8(std::fs::read(&vault).unwrap()).unwrap();
    let mut file: serde_json::Value = serde_json::from_str(&text).unwrap();
    let sealed = file["secrets"]["cert-key:soft-inbound"].as_str().unwrap().to_string();
    let flipped = format!("{}{}", &sealed[..sealed.len() - 2], if sealed.ends_with("00") { "01" } else { "00" });
    file["secrets"]["cert-key:soft-inbound"] = flipped.into();
    std::fs::write(&vault, serde_json::to_vec(&file).unwrap()).unwrap();
    let keys = cert_keys(&setup);
    assert!(keys["soft-inbound"].starts_with("error (") && keys["soft-inbound"].contains("tampered"), "{keys:?}");
    assert_eq!(keys["soft-trust"], "software");

    // Deleting a certificate removes its sealed key too.
    let out = setup.tollgate(&["cert", "delete", "soft-inbound"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let file: serde_json::Value = serde_json::from_slice(&std::fs::read(&vault).unwrap()).unwrap();
    assert!(file["secrets"].get("cert-key:soft-inbound").is_none(), "{file}");
    assert!(file["secrets"].get("cert-key:soft-trust").is_some());
}

#[test]
fn the_api_token_is_stored_sealed_used_by_the_cli_and_replaced_on_sighup() {
    let setup = Setup::new(&ProxyOptions::default());
    let set_token = |token: &str| setup.tollgate_stdin(&["api-token", "set"], token);
    let out = set_token("short");
    assert_eq!(out.status.code(), Some(64), "a weak token is refused");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("short"), "without repeating it");
    let first = "first-api-token-0123456789abcdef";
    let out = set_token(first);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for (name, bytes) in files_under(&setup.token.path("state")) {
        assert!(!bytes.windows(first.len()).any(|w| w == first.as_bytes()), "the token is in the clear in {name}");
    }

    let proxy = setup.start();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let post =
        |token: Option<&str>| runtime.block_on(bearer_post(proxy.management, "/api/v1/hsm/support-bundle", token));
    assert!(post(Some(first)).starts_with("HTTP/1.1 200"));
    assert!(post(None).starts_with("HTTP/1.1 401"));
    assert!(post(Some("first-api-token-0123456789abcdeX")).starts_with("HTTP/1.1 401"));

    // The CLI finds the sealed token itself.
    let cli_config = setup.token.path("cli.toml");
    config_for_cli(&setup.config, proxy.management, &cli_config);
    let bundle = setup.token.path("b.tar.gz");
    let out = setup
        .token
        .cmd(tollgate_bin())
        .args(["hsm", "support-bundle", "--out", bundle.to_str().unwrap(), "--config"])
        .arg(&cli_config)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("by the running service"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let files = unpack(&bundle);
    assert_no_secret(&bundle, &files, &[first.as_bytes().to_vec()]);

    // A new token replaces the old one at the next SIGHUP.
    let second = "second-api-token-fedcba9876543210";
    assert!(set_token(second).status.success());
    proxy.signal("-HUP");
    proxy.wait_log("the reload", |v| v["message"] == "configuration reloaded");
    assert!(post(Some(second)).starts_with("HTTP/1.1 200"));
    assert!(post(Some(first)).starts_with("HTTP/1.1 401"));
}
