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
    let mut child = setup
        .token
        .cmd(tollgate_bin())
        .args(["master-key", "set", "--stdin", "--json", "--config"])
        .arg(&setup.config)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(format!("{}\n", "ab".repeat(32)).as_bytes()).unwrap();
    assert!(child.wait_with_output().unwrap().status.success());
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
    let refused = runtime.block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = tokio::net::TcpStream::connect(proxy.management).await.unwrap();
        tcp.write_all(b"POST /api/v1/hsm/rotate-wrapping-key HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut response = String::new();
        tcp.read_to_string(&mut response).await.unwrap();
        response
    });
    assert!(refused.starts_with("HTTP/1.1 403"), "no token configured: changes refused: {refused}");
}

fn time_year() -> i32 {
    time::OffsetDateTime::now_utc().year()
}
