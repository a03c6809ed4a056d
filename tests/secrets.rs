//! No secret leaks, over the whole lifecycle: set-up, login (PIN sealed), CA generation, a
//! software key imported, the master key set and encrypted on the HSM, the wrapping key rotated
//! (once through the API, once killed half-way), an API token, traffic, the support file, a
//! reset and a new set-up. Every PIN, the master key, the software key and the API token are
//! known; afterwards every log line and command output, every file in the state directory, the
//! support file and the processes' arguments are searched for them in hex, base64, PEM, DER and
//! raw form. Files holding secrets are 0600, the state directory 0700, and no process can dump
//! core.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;

use support::*;

/// Everything the processes printed.
#[derive(Default)]
struct Outputs(Vec<(String, Vec<u8>)>);

impl Outputs {
    /// Runs `tollgate ARGS --config CONFIG` with `stdin`, keeps its output; `expect` success.
    fn run(&mut self, token: &Token, config: &Path, args: &[&str], stdin: &str, expect: bool) -> std::process::Output {
        use std::io::Write;
        let mut child = token
            .cmd(tollgate_bin())
            .args(args)
            .arg("--config")
            .arg(config)
            .current_dir(token.dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        let what = args.join(" ");
        assert_eq!(out.status.success(), expect, "{what}: {}", String::from_utf8_lossy(&out.stderr));
        self.0.push((format!("stdout of {what}"), out.stdout.clone()));
        self.0.push((format!("stderr of {what}"), out.stderr.clone()));
        self.0.push((format!("arguments of {what}"), args.join("\0").into_bytes()));
        out
    }
}

fn unhex(hex: &str) -> Vec<u8> {
    (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_is_logged_printed_stored_in_the_clear_or_passed_as_an_argument() {
    require(&["openssl", "tar"]);
    let token = Token::new();
    let so_pin_file = token.path("so.pin");
    std::fs::write(&so_pin_file, format!("{SO_PIN}\n")).unwrap();
    let pki = TestPki::new();
    let (chain, key) = pki.leaf(&LeafSpec::new(&["origin.test"]));
    let origin = Origin::start("origin", chain, key, &["http/1.1"]).await;
    let state = token.path("state");
    let config = token.path("tollgate.toml");
    // No pin_file: the partition password is stored sealed by `hsm login`.
    let config_text = format!(
        "state_dir = \"{}\"\n\n[[hsm.server]]\nname = \"hsm-a\"\nmodule = \"{SOFTHSM_MODULE}\"\ntoken = \"{}\"\n\n\
         [[listener]]\nmode = \"explicit\"\nlisten = \"127.0.0.1:0\"\n\n[[listener]]\nmode = \"sni\"\nlisten = \"127.0.0.1:0\"\n\n\
         [management]\nlisten = \"127.0.0.1:0\"\n\n[upstream]\nca_bundles = [\"{}\"]\n\n[resolve]\n\"origin.test:443\" = \"{}\"\n",
        state.display(),
        token.label,
        pki.bundle().display(),
        origin.addr
    );
    std::fs::write(&config, &config_text).unwrap();

    // The secrets, all known.
    let master_hex = "9e".repeat(16) + &"41".repeat(16);
    let api_token = "lifecycle-api-token-5e1f0c2d";
    let key_dir = tempfile::tempdir().unwrap();
    let (soft_cert, soft_key) = pki.leaf_files(&LeafSpec::new(&["soft.test"]), key_dir.path());
    let soft_pem = std::fs::read_to_string(&soft_key).unwrap();
    let soft_der = rustls::pki_types::pem::PemObject::from_pem_slice(soft_pem.as_bytes())
        .map(|k: rustls::pki_types::PrivateKeyDer<'static>| k.secret_der().to_vec())
        .unwrap();
    let mut secrets: Vec<Vec<u8>> = Vec::new();
    for pin in [SO_PIN, USER_PIN] {
        secrets.push(pin.into());
        secrets.push(base64(pin.as_bytes()).into());
    }
    let master = unhex(&master_hex);
    secrets.extend([
        master_hex.clone().into_bytes(),
        master_hex.to_uppercase().into_bytes(),
        base64(&master).into_bytes(),
        master.clone(),
        api_token.into(),
        base64(api_token.as_bytes()).into(),
    ]);
    secrets.extend(key_spellings(&soft_der, &soft_pem));

    let mut out = Outputs::default();
    let cli = |out: &mut Outputs, args: &[&str], stdin: &str| out.run(&token, &config, args, stdin, true);
    cli(&mut out, &["hsm", "setup", "--server", "hsm-a", "--so-pin-file", so_pin_file.to_str().unwrap()], "");
    cli(&mut out, &["hsm", "login", "--server", "hsm-a"], &format!("{USER_PIN}\n"));
    cli(&mut out, &["cert", "generate-ca", "--name", "trust", "--on-hsm", "--forward-trust"], "");
    cli(&mut out, &["cert", "generate-ca", "--name", "untrust", "--on-hsm", "--forward-untrust"], "");
    cli(&mut out, &["master-key", "set", "--stdin"], &format!("{master_hex}\n"));
    let (cert, key) = (soft_cert.to_str().unwrap(), soft_key.to_str().unwrap());
    cli(&mut out, &["cert", "import", "--name", "soft", "--cert", cert, "--key", key, "--inbound", "soft.test"], "");
    cli(&mut out, &["api-token", "set"], &format!("{api_token}\n"));
    cli(&mut out, &["master-key", "encrypt-with-hsm", "--lifetime", "90", "--reminder", "10"], "");
    cli(&mut out, &["hsm", "rotate-wrapping-key"], "");
    cli(&mut out, &["cert", "list", "--json"], "");
    cli(&mut out, &["hsm", "info", "--json"], "");
    // Killed right after the master key was unwrapped into memory: no core, nothing printed.
    let mut crash = token.cmd(tollgate_bin());
    crash.args(["hsm", "rotate-wrapping-key", "--config"]).arg(&config).current_dir(token.dir.path());
    let crash_out = crash.env("TOLLGATE_FAILPOINT", "rotate:after-unwrap").env("RUST_BACKTRACE", "1").output().unwrap();
    assert!(!crash_out.status.success());
    out.0.push(("stderr of the crashed rotation".into(), crash_out.stderr));
    out.0.push(("stdout of the crashed rotation".into(), crash_out.stdout));

    // The service: traffic, a rotation through the API, the support file it builds.
    let proxy = Proxy::start(&token, &config);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", proxy.pid())).unwrap();
    let core = limits.lines().find(|l| l.starts_with("Max core file size")).unwrap();
    assert!(core.split_whitespace().nth(4) == Some("0"), "core dumps disabled: {core}");
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", proxy.pid())).unwrap();
    out.0.push(("the service's arguments".into(), cmdline));
    let tls = tls_via_sni(proxy.sni, "origin.test", capturing_client(&["http/1.1"]).0).await.expect("intercepted");
    let (status, _, _) = request(tls, false, get("origin.test", "/", false)).await;
    assert_eq!(status, 200);
    let rotated = bearer_post(proxy.management, "/api/v1/hsm/rotate-wrapping-key", Some(api_token)).await;
    assert!(rotated.starts_with("HTTP/1.1 200"), "{rotated}");
    let cli_config = token.path("cli.toml");
    config_for_cli(&config, proxy.management, &cli_config);
    let bundle = token.path("support.tar.gz");
    let built = out.run(&token, &cli_config, &["hsm", "support-bundle", "--out", bundle.to_str().unwrap()], "", true);
    assert!(String::from_utf8_lossy(&built.stdout).contains("by the running service"));
    proxy.signal("-TERM");
    let mut proxy = proxy;
    assert_eq!(proxy.wait_exit(std::time::Duration::from_secs(15)), Some(0));
    for line in proxy.logs.lock().iter() {
        out.0.push(("a service log line".into(), line.clone().into_bytes()));
    }

    // Reset, then set up again: everything opens again.
    cli(&mut out, &["hsm", "reset", "--yes"], "");
    out.run(&token, &config, &["hsm", "status", "--json"], "", false);
    let module = SOFTHSM_MODULE;
    cli(&mut out, &["hsm", "add-server", "--name", "hsm-a", "--module", module, "--token", &token.label], "");
    cli(&mut out, &["hsm", "login", "--server", "hsm-a"], &format!("{USER_PIN}\n"));
    let status = cli(&mut out, &["master-key", "status", "--json"], "");
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!((status["opens"].as_bool(), status["hsm_encrypted"].as_bool()), (Some(true), Some(true)));
    let list = cli(&mut out, &["cert", "list", "--json"], "");
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&list.stdout).unwrap();
    assert!(rows.iter().all(|r| r["key"] != "error"), "{rows:#?}");

    // The search.
    let mut places = out.0;
    places.extend(files_under(&state));
    places.extend(unpack(&bundle));
    for entry in std::fs::read_dir(token.dir.path()).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!name.starts_with("core"), "a core file was written: {name}");
    }
    for (place, bytes) in &places {
        for secret in &secrets {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_slice()),
                "a secret ({} bytes) is in {place}",
                secret.len()
            );
        }
    }
    eprintln!("searched {} places for {} spellings of the secrets: none found", places.len(), secrets.len());

    // Modes: the state directory 0700; every file holding or sealing a secret 0600.
    assert_eq!(std::fs::metadata(&state).unwrap().permissions().mode() & 0o777, 0o700);
    for file in ["device.key", "master-key.json", "hsm/hsm-a.pin.sealed"] {
        let mode = std::fs::metadata(state.join(file)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{file}");
    }
}
