//! The container image, built with podman from a local debootstrap base (no registry is
//! reachable here; see shared CONTAINERS.md) using deploy/Dockerfile's `prebuilt` stage, then
//! the real flow inside it, as the non-root user: token initialised, CA generated on it, proxy
//! running; curl on the host goes through it; `podman stop` drains and exits 0.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use support::*;

const BASE: &str = "localhost/debian:bookworm-min";

fn podman(conf: &Path, args: &[&str]) -> std::process::Output {
    Command::new("podman")
        .env("CONTAINERS_CONF", conf)
        .args(args)
        .output()
        .expect("podman: run `bash deploy/install-test-deps`")
}

fn ok(out: std::process::Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The base image, made once with debootstrap and kept (about 25 s the first time).
fn base_image(conf: &Path) {
    if podman(conf, &["image", "exists", BASE]).status.success() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let rootfs = root.path().join("rootfs");
    let out = Command::new("debootstrap").args(["--variant=minbase", "bookworm"]).arg(&rootfs).output().unwrap();
    assert!(out.status.success(), "debootstrap: {}", String::from_utf8_lossy(&out.stderr));
    let mut tar = Command::new("tar")
        .arg("-C")
        .arg(&rootfs)
        .args(["-c", "."])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let import = Command::new("podman")
        .env("CONTAINERS_CONF", conf)
        .args(["import", "-", BASE])
        .stdin(tar.stdout.take().unwrap())
        .output()
        .unwrap();
    assert!(tar.wait().unwrap().success(), "tar of the rootfs");
    assert!(import.status.success(), "podman import: {}", String::from_utf8_lossy(&import.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_runs_tollgate_as_non_root_with_a_softhsm_token() {
    let work = tempfile::tempdir().unwrap();
    let conf = work.path().join("containers.conf");
    std::fs::write(
        &conf,
        "[containers]\ndefault_ulimits = []\n[engine]\ncgroup_manager = \"cgroupfs\"\nruntime = \"runc\"\n",
    )
    .unwrap();
    base_image(&conf);

    // Build context: the Dockerfile and the binary under test as target/release/tollgate.
    let ctx = work.path().join("ctx");
    std::fs::create_dir_all(ctx.join("target/release")).unwrap();
    std::fs::copy(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/Dockerfile"), ctx.join("Dockerfile")).unwrap();
    std::fs::copy(tollgate_bin(), ctx.join("target/release/tollgate")).unwrap();
    let tag = format!("localhost/tollgate:test-{}", std::process::id());
    ok(
        podman(
            &conf,
            &[
                "build",
                "--build-arg",
                &format!("BASE={BASE}"),
                "--target",
                "prebuilt",
                "-t",
                &tag,
                ctx.to_str().unwrap(),
            ],
        ),
        "podman build",
    );
    let id = ok(podman(&conf, &["run", "--rm", "--entrypoint", "id", &tag]), "id");
    assert!(id.starts_with("uid=10001(tollgate)"), "non-root: {id}");

    // State volume owned by the container user; config with the host's origin.
    let pki = TestPki::new();
    let (chain, key) = pki.leaf(&LeafSpec::new(&["origin.test"]));
    let origin = Origin::start("in-container", chain, key, &["http/1.1"]).await;
    let state = work.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::write(
        state.join("softhsm2.conf"),
        "directories.tokendir = /var/lib/tollgate/tokens\nobjectstore.backend = file\n",
    )
    .unwrap();
    std::fs::create_dir(state.join("tokens")).unwrap();
    std::fs::write(state.join("so.pin"), "container-so-pin").unwrap();
    std::fs::write(state.join("user.pin"), "container-user-pin").unwrap();
    std::fs::copy(pki.bundle(), state.join("roots.pem")).unwrap();
    let proxy_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mgmt_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    std::fs::write(
        state.join("tollgate.toml"),
        format!(
            "state_dir = \"/var/lib/tollgate/state\"\n[[hsm.server]]\nname = \"softhsm\"\ntoken = \"tollgate\"\npin_file = \"/var/lib/tollgate/user.pin\"\n\
             [[listener]]\nmode = \"explicit\"\nlisten = \"127.0.0.1:{proxy_port}\"\n[management]\nlisten = \"127.0.0.1:{mgmt_port}\"\n\
             [upstream]\nca_bundles = [\"/var/lib/tollgate/roots.pem\"]\n[resolve]\n\"origin.test:443\" = \"{}\"\n",
            origin.addr
        ),
    )
    .unwrap();
    Command::new("chown").args(["-R", "10001:10001"]).arg(&state).status().unwrap();
    let volume = format!("{}:/var/lib/tollgate", state.display());
    let run = |args: &[&str]| {
        let mut all = vec!["run", "--rm", "--network", "host", "-v", &volume, &tag];
        all.extend_from_slice(args);
        podman(&conf, &all)
    };
    let cfg = "/var/lib/tollgate/tollgate.toml";
    ok(
        run(&[
            "hsm",
            "init-token",
            "--config",
            cfg,
            "--server",
            "softhsm",
            "--so-pin-file",
            "/var/lib/tollgate/so.pin",
        ]),
        "init-token",
    );
    ok(
        run(&[
            "cert",
            "generate-ca",
            "--config",
            cfg,
            "--name",
            "ca",
            "--on-hsm",
            "--forward-trust",
            "--out-cert",
            "/var/lib/tollgate/ca.pem",
        ]),
        "generate-ca",
    );

    let name = format!("tollgate-test-{}", std::process::id());
    ok(
        podman(
            &conf,
            &["run", "-d", "--name", &name, "--network", "host", "-v", &volume, &tag, "run", "--config", cfg],
        ),
        "run -d",
    );
    let ca = state.join("ca.pem");
    let deadline = Instant::now() + Duration::from_secs(20);
    let body = loop {
        let out = tokio::process::Command::new("curl")
            .args([
                "-sS",
                "--max-time",
                "5",
                "--proxy",
                &format!("http://127.0.0.1:{proxy_port}"),
                "--cacert",
                ca.to_str().unwrap(),
            ])
            .arg("https://origin.test/hello")
            .output()
            .await
            .unwrap();
        if out.status.success() {
            break String::from_utf8_lossy(&out.stdout).into_owned();
        }
        if Instant::now() > deadline {
            let logs = podman(&conf, &["logs", &name]);
            panic!("curl: {}\nlogs: {}", String::from_utf8_lossy(&out.stderr), String::from_utf8_lossy(&logs.stdout));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(body.contains("origin=in-container path=/hello"), "{body}");

    ok(podman(&conf, &["stop", "-t", "20", &name]), "stop");
    let code = ok(podman(&conf, &["inspect", "--format", "{{.State.ExitCode}}", &name]), "inspect");
    assert_eq!(code.trim(), "0", "SIGTERM drains and exits 0");
    let _ = podman(&conf, &["rm", "-f", &name]);
    let _ = podman(&conf, &["rmi", "-f", &tag]);
}
