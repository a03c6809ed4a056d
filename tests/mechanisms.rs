//! Every signing mechanism through tollgate's HSM executor, on a real SoftHSM2 token in this
//! process, each signature checked by an independent verifier (openssl): ECDSA P-256 and P-384
//! (software hash, raw CKM_ECDSA, DER re-encoding), RSA PKCS#1 v1.5 and RSA-PSS.

mod support;

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, OnceLock};

use rustls::SignatureScheme;
use support::*;
use tollgate::hsm::Hsm;
use tollgate::keys::{KeyAlgorithm, PrivateKey};

/// The token of this test process, at the SOFTHSM2_CONF that .cargo/config.toml sets.
fn hsm() -> &'static (Arc<Hsm>, PathBuf) {
    static HSM: OnceLock<(Arc<Hsm>, PathBuf)> = OnceLock::new();
    HSM.get_or_init(|| {
        require_tools();
        let conf = PathBuf::from(std::env::var("SOFTHSM2_CONF").expect("set by .cargo/config.toml"));
        let dir = conf.parent().unwrap().to_path_buf();
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("tokens")).unwrap();
        std::fs::write(&conf, format!("directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n", dir.join("tokens").display())).unwrap();
        let out = Command::new("softhsm2-util")
            .args(["--init-token", "--free", "--label", "mechanisms", "--so-pin", SO_PIN, "--pin", USER_PIN])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        std::fs::write(dir.join("user.pin"), USER_PIN).unwrap();
        let text = format!(
            "state_dir = \"{}\"\n[hsm]\nworkers = 2\n[[hsm.server]]\nname = \"local\"\nmodule = \"{SOFTHSM_MODULE}\"\ntoken = \"mechanisms\"\npin_file = \"{}\"\n",
            dir.join("state").display(),
            dir.join("user.pin").display()
        );
        let config = tollgate::config::Config::from_toml(&text, &dir.join("t.toml")).unwrap();
        let hsm = Arc::new(Hsm::open(&config.hsm));
        hsm.require_up().unwrap();
        for (label, algorithm) in [("p256", KeyAlgorithm::EcdsaP256), ("p384", KeyAlgorithm::EcdsaP384), ("rsa2048", KeyAlgorithm::Rsa2048)] {
            hsm.generate(label, algorithm).unwrap();
        }
        (hsm, dir)
    })
}

/// Verifies `sig` over `msg` with openssl, from the public key the token holds.
fn openssl_verifies(key: &dyn PrivateKey, scheme: SignatureScheme, msg: &[u8], sig: &[u8], tag: &str) -> bool {
    let dir = &hsm().1;
    let (pub_der, msg_file, sig_file) =
        (dir.join(format!("{tag}.pub.der")), dir.join(format!("{tag}.msg")), dir.join(format!("{tag}.sig")));
    std::fs::write(&pub_der, key.public_key()).unwrap();
    std::fs::write(&msg_file, msg).unwrap();
    std::fs::write(&sig_file, sig).unwrap();
    let digest = if scheme == SignatureScheme::ECDSA_NISTP384_SHA384 { "-sha384" } else { "-sha256" };
    let mut cmd = Command::new("openssl");
    cmd.args(["dgst", digest, "-keyform", "DER", "-verify"]).arg(&pub_der).arg("-signature").arg(&sig_file);
    if scheme == SignatureScheme::RSA_PSS_SHA256 {
        cmd.args(["-sigopt", "rsa_padding_mode:pss", "-sigopt", "rsa_pss_saltlen:32"]);
    }
    let out = cmd.arg(&msg_file).output().unwrap();
    out.status.success() && String::from_utf8_lossy(&out.stdout).contains("Verified OK")
}

#[test]
fn every_mechanism_verifies_with_openssl() {
    let (hsm, _) = hsm();
    let cases = [
        ("p256", SignatureScheme::ECDSA_NISTP256_SHA256),
        ("p384", SignatureScheme::ECDSA_NISTP384_SHA384),
        ("rsa2048", SignatureScheme::RSA_PKCS1_SHA256),
        ("rsa2048", SignatureScheme::RSA_PSS_SHA256),
    ];
    for (label, scheme) in cases {
        let key = hsm.key(label).unwrap();
        for i in 0..4u8 {
            let msg: Vec<u8> = (0..200).map(|b: u8| b ^ i).collect();
            let sig = key.sign(scheme, &msg).unwrap();
            let tag = format!("{label}-{scheme:?}-{i}");
            assert!(
                openssl_verifies(key.as_ref(), scheme, &msg, &sig, &tag),
                "{label} {scheme:?}: openssl rejects the signature"
            );
            let mut tampered = msg.clone();
            tampered[0] ^= 1;
            assert!(
                !openssl_verifies(key.as_ref(), scheme, &tampered, &sig, &format!("{tag}-x")),
                "a tampered message must not verify"
            );
        }
    }
    let key = hsm.key("p256").unwrap();
    assert!(key.sign(SignatureScheme::RSA_PKCS1_SHA256, b"x").is_err(), "an EC key refuses RSA schemes");
}

#[test]
fn concurrent_signing_through_the_executor_is_correct() {
    let (hsm, _) = hsm();
    let key = hsm.key("p256").unwrap();
    let raw = tollgate::keys::spki_raw(key.public_key()).unwrap();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let (key, raw) = (key.clone(), raw.clone());
            std::thread::spawn(move || {
                for i in 0..100u32 {
                    let msg = format!("thread {t} message {i}");
                    let sig = key.sign(SignatureScheme::ECDSA_NISTP256_SHA256, msg.as_bytes()).unwrap();
                    assert!(tollgate::pki::verify(KeyAlgorithm::EcdsaP256, &raw, msg.as_bytes(), &sig));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let metrics = tollgate::telemetry::render_metrics();
    assert!(metrics.contains("tollgate_hsm_sign_duration_seconds_count{server=\"local\"}"), "{metrics}");
    assert!(metrics.contains("tollgate_hsm_member_up{server=\"local\"} 1"));
    assert!(metrics.contains("tollgate_hsm_queue_depth{library="));
}
