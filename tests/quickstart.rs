//! The README's run command (`deploy/run-local`), set-up part: run twice on a fresh state
//! directory, it creates the token and CAs once and reuses them; then the proxy it configured
//! intercepts with the CA it wrote.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use support::*;

fn run_local(home: &std::path::Path) -> std::process::Output {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/run-local");
    Command::new("bash")
        .arg(script)
        .arg("--setup-only")
        .env("TOLLGATE_HOME", home)
        .env("TOLLGATE_BIN", tollgate_bin())
        .env("TOLLGATE_LISTEN", "127.0.0.1:0")
        .env("TOLLGATE_MANAGEMENT", "127.0.0.1:0")
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_local_sets_up_once_and_reuses() {
    require_tools();
    let home = tempfile::tempdir().unwrap();
    let first = run_local(home.path());
    assert!(
        first.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&first.stdout),
        String::from_utf8_lossy(&first.stderr)
    );
    let stdout = String::from_utf8_lossy(&first.stdout);
    let ca_path = home.path().join("ca.pem");
    assert!(
        stdout.contains(&format!("curl --proxy http://127.0.0.1:0 --cacert {} https://HOST/", ca_path.display())),
        "{stdout}"
    );
    let ca = std::fs::read(&ca_path).unwrap();
    let vault_path = home.path().join("tollgate/master-key.json");
    let vault = std::fs::read_to_string(&vault_path).unwrap();
    assert!(vault.contains("\"api-token\""), "an API token is stored sealed: {vault}");

    let second = run_local(home.path());
    assert!(second.status.success(), "{}", String::from_utf8_lossy(&second.stderr));
    assert_eq!(std::fs::read(&ca_path).unwrap(), ca, "the CA is reused");
    assert_eq!(std::fs::read_to_string(&vault_path).unwrap(), vault, "the API token is reused");
    let softhsm_conf = home.path().join("softhsm/softhsm2.conf");
    let slots = Command::new("softhsm2-util").arg("--show-slots").env("SOFTHSM2_CONF", &softhsm_conf).output().unwrap();
    let labels = String::from_utf8_lossy(&slots.stdout).matches("Label:            tollgate ").count();
    assert_eq!(labels, 1, "one token, reused:\n{}", String::from_utf8_lossy(&slots.stdout));

    for secret in ["so.pin", "user.pin"] {
        let mode = std::fs::metadata(home.path().join("secrets").join(secret)).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "{secret} must be private");
    }

    // The configured proxy intercepts with that CA, its key on the token it created.
    let pki = TestPki::new();
    let (chain, key) = pki.leaf(&LeafSpec::new(&["origin.test"]));
    let origin = Origin::start("quick", chain, key, &["http/1.1"]).await;
    let config = home.path().join("tollgate.toml");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "\n[upstream]\nca_bundles = [\"{}\"]\n\n[resolve]\n\"origin.test:443\" = \"{}\"\n",
        pki.bundle().display(),
        origin.addr
    ));
    std::fs::write(&config, text).unwrap();
    let token = Token::new();
    let mut cmd_env = token.cmd(tollgate_bin());
    cmd_env.env("SOFTHSM2_CONF", &softhsm_conf);
    let proxy = Proxy::start_with(cmd_env, &config, 2);
    let tunnel = connect_tunnel(proxy.explicit, "origin.test:443").await;
    use rustls::pki_types::pem::PemObject;
    let ca_der = rustls::pki_types::CertificateDer::from_pem_slice(&ca).unwrap();
    let name = rustls::pki_types::ServerName::try_from("origin.test").unwrap();
    let tls =
        tokio_rustls::TlsConnector::from(trusting_client(&ca_der, &["http/1.1"])).connect(name, tunnel).await.unwrap();
    let (status, _, body) = request(tls, false, get("origin.test", "/", false)).await;
    assert_eq!(status, 200);
    assert!(body.contains("origin=quick"));
}
