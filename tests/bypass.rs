//! The learned bypass: clients that pin the origin's certificate reject tollgate's leaf; once
//! three distinct client addresses agree, the host is passed through untouched, shown in status
//! (how many clients, which listener), clearable by CLI and API (with the bearer token). One
//! client alone, however often it rejects, teaches nothing; resets never count.

mod support;

use std::time::Duration;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_pin_get_a_bypass_and_operators_can_clear_it() {
    let pki = TestPki::new();
    let (chain, key) = pki.leaf(&LeafSpec::new(&["pinned.test", "reset.test", "never.test"]));
    let origin = Origin::start("pinned", chain, key, &["http/1.1"]).await;
    let options = ProxyOptions {
        ca_bundles: vec![pki.bundle()],
        resolve: vec![
            ("pinned.test:443".into(), origin.addr),
            ("reset.test:443".into(), origin.addr),
            ("never.test:443".into(), origin.addr),
        ],
        // This rule's hosts are always decrypted: however many clients reject, none is learned.
        extra: "[[decryption.rule]]\nname = \"always\"\nhosts = [\"never.test\"]\naction = \"decrypt\"\n\
                learn_bypass = false\n"
            .into(),
        ..Default::default()
    };
    let setup = Setup::new(&options);
    let token_file = setup.token.path("api.token");
    std::fs::write(&token_file, "s3cret-api-token\n").unwrap();
    let text = std::fs::read_to_string(&setup.config).unwrap().replace(
        "[management]\nlisten = \"127.0.0.1:0\"",
        &format!("[management]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"{}\"", token_file.display()),
    );
    std::fs::write(&setup.config, text).unwrap();
    let proxy = setup.start();

    // A client pinning the origin's CA refuses tollgate's leaf, a hundred times: alone, it
    // teaches nothing.
    let pinning = trusting_client(&pki.root.der().clone(), &["http/1.1"]);
    for _ in 0..100 {
        assert!(tls_via_sni_from([127, 0, 0, 1], proxy.sni, "pinned.test", pinning.clone()).await.is_err());
    }
    let list = http_get(proxy.management, "/api/v1/bypass").await;
    assert_eq!(list.trim(), "[]", "one client taught a bypass: {list}");
    // Two more client addresses agree: now the host is excluded (but not never.test, whose
    // rule turned learning off, though the same three clients reject it).
    for client in [[127, 0, 0, 1], [127, 0, 0, 2], [127, 0, 0, 3]] {
        assert!(tls_via_sni_from(client, proxy.sni, "never.test", pinning.clone()).await.is_err());
    }
    for client in [[127, 0, 0, 2], [127, 0, 0, 3]] {
        assert!(tls_via_sni_from(client, proxy.sni, "pinned.test", pinning.clone()).await.is_err());
    }
    proxy.wait_log("learned", |v| v["message"].as_str().is_some_and(|m| m.contains("excluded from decryption")));
    // …and from then on the host is passed through: the pin holds, the request works.
    let tls = tls_via_sni(proxy.sni, "pinned.test", pinning.clone())
        .await
        .expect("bypassed: the client sees the origin's certificate");
    assert_eq!(request(tls, false, get("pinned.test", "/", false)).await.0, 200);
    assert!(proxy.metric("tollgate_tunnels_total").await >= 1);

    // A reset before our certificate arrives never adds an entry.
    {
        use tokio::io::AsyncWriteExt;
        let mut hello = Vec::new();
        let mut conn = rustls::ClientConnection::new(pinning.clone(), "reset.test".try_into().unwrap()).unwrap();
        conn.write_tls(&mut hello).unwrap();
        let mut tcp = tokio::net::TcpStream::connect(proxy.sni).await.unwrap();
        tcp.write_all(&hello).await.unwrap();
        tcp.set_zero_linger().unwrap();
        drop(tcp);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Status through the API and the CLI.
    let list: serde_json::Value = serde_json::from_str(&http_get(proxy.management, "/api/v1/bypass").await).unwrap();
    let hosts: Vec<&str> = list.as_array().unwrap().iter().map(|e| e["host"].as_str().unwrap()).collect();
    assert_eq!(hosts, ["pinned.test"], "{list}");
    assert_eq!(list[0]["reason"], "UnknownCA");
    assert_eq!((list[0]["clients"].as_u64(), list[0]["listeners"].clone()), (Some(3), serde_json::json!(["sni"])));
    assert!(list[0]["since"].as_str().is_some() && list[0]["expires"].as_str().is_some());
    let mut config_for_cli = std::fs::read_to_string(&setup.config).unwrap();
    config_for_cli = config_for_cli
        .replace("listen = \"127.0.0.1:0\"\ntoken_file", &format!("listen = \"{}\"\ntoken_file", proxy.management));
    let cli_config = setup.token.path("cli.toml");
    std::fs::write(&cli_config, config_for_cli).unwrap();
    let cli =
        |args: &[&str]| setup.token.cmd(tollgate_bin()).args(args).arg("--config").arg(&cli_config).output().unwrap();
    let out = cli(&["bypass", "list", "--json"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("pinned.test"), "{}", String::from_utf8_lossy(&out.stderr));

    // Clearing needs the token: without it the API refuses.
    let mut raw = tokio::net::TcpStream::connect(proxy.management).await.unwrap();
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        raw.write_all(b"DELETE /api/v1/bypass HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
        let mut response = String::new();
        raw.read_to_string(&mut response).await.unwrap();
        assert!(response.starts_with("HTTP/1.1 401"), "{response}");
    }
    let out = cli(&["bypass", "clear", "--host", "pinned.test"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("removed 1 bypass entry"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Intercepted again: the pinning client refuses again.
    assert!(tls_via_sni(proxy.sni, "pinned.test", pinning).await.is_err());
}
