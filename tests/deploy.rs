//! The deployment artifacts: Kubernetes manifests and the compose file parse and say what
//! matters (probes on the management API, non-root, PINs from a Secret, HPA, PDB, each replica
//! logging in to the HSMs itself), every shipped tollgate config passes `run --check`, and the
//! systemd unit passes `systemd-analyze verify`.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::*;

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy").join(path)
}

/// Every YAML document of a file, as JSON (Debian's python3-yaml parses).
fn yaml(path: &Path) -> Vec<serde_json::Value> {
    let out = Command::new("/usr/bin/python3")
        .args(["-c", "import sys, yaml, json; print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))"])
        .arg(path)
        .output()
        .expect("python3 with python3-yaml: run `bash deploy/install-test-deps`");
    assert!(out.status.success(), "{}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn check_config(token: &Token, name: &str, text: &str) {
    let path = token.path(name);
    std::fs::write(&path, text).unwrap();
    let out = token.cmd(tollgate_bin()).args(["run", "--check", "--config"]).arg(&path).output().unwrap();
    assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
}

/// What install-test-deps puts kubernetes-validate (with the Kubernetes OpenAPI schemas) in.
const KUBERNETES_VALIDATE: &str = "/opt/tollgate-test/kubernetes-validate/bin/kubernetes-validate";

/// Runs kubernetes-validate, strict (unknown fields are errors), on `files`.
fn kubernetes_validate(files: &[PathBuf]) -> std::process::Output {
    Command::new(KUBERNETES_VALIDATE)
        .args(["--strict", "--kubernetes-version", "1.30.0"])
        .args(files)
        .output()
        .expect("kubernetes-validate: run `bash deploy/install-test-deps`")
}

/// Every manifest in deploy/k8s passes the Kubernetes 1.30 OpenAPI schemas, strictly; a broken
/// copy of the Deployment does not (the check can fail).
#[test]
fn kubernetes_manifests_pass_the_openapi_schemas() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy("k8s"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 7, "{files:?}");
    let out = kubernetes_validate(&files);
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{said}");
    for file in &files {
        assert!(said.contains(&format!("{} passed", file.display())), "{file:?} not validated: {said}");
    }
    let work = tempfile::tempdir().unwrap();
    let broken = work.path().join("deployment.yaml");
    let text = std::fs::read_to_string(deploy("k8s/deployment.yaml")).unwrap();
    std::fs::write(
        &broken,
        text.replace("replicas: 3", "replicas: three")
            .replace("runAsNonRoot: true", "runAsNonRoot: true\n        runAsRoot: false"),
    )
    .unwrap();
    let out = kubernetes_validate(&[broken]);
    let said = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && said.contains("spec.replicas"), "{said}");
}

#[test]
fn kubernetes_manifests_scale_out_replicas_safely() {
    let kinds: Vec<(String, serde_json::Value)> = ["configmap", "secret", "deployment", "service", "hpa", "pdb"]
        .iter()
        .flat_map(|f| yaml(&deploy(&format!("k8s/{f}.yaml"))))
        .map(|doc| (doc["kind"].as_str().unwrap().to_string(), doc))
        .collect();
    let get = |kind: &str| &kinds.iter().find(|(k, _)| k == kind).unwrap_or_else(|| panic!("no {kind}")).1;

    let deployment = get("Deployment");
    assert!(deployment["spec"]["replicas"].as_u64().unwrap() >= 2);
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let container = &pod["containers"][0];
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/livez");
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(container["securityContext"]["allowPrivilegeEscalation"], false);
    let volumes = pod["volumes"].as_array().unwrap();
    assert!(volumes.iter().any(|v| v["secret"]["secretName"] == "tollgate"), "PINs come from a Secret");
    assert!(pod["terminationGracePeriodSeconds"].as_u64().unwrap() > 30, "longer than the drain grace");

    assert_eq!(get("HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]["name"], "tollgate");
    assert!(get("PodDisruptionBudget")["spec"]["maxUnavailable"].as_u64().is_some());
    assert_eq!(get("Service")["spec"]["selector"]["app.kubernetes.io/name"], "tollgate");
    assert_eq!(get("Secret")["stringData"]["hsm-pin"], "REPLACE-ME", "no real secret is committed");
    // The HSM traffic's own path: only the HSM network's port, and upstreams never there.
    let policy = &yaml(&deploy("k8s/networkpolicy.yaml"))[0];
    assert_eq!(policy["kind"], "NetworkPolicy");
    let egress = policy["spec"]["egress"].as_array().unwrap();
    let hsm = &egress[0];
    assert_eq!(hsm["ports"][0]["port"], 1792);
    let hsm_net = hsm["to"][0]["ipBlock"]["cidr"].as_str().unwrap();
    let internet = egress.iter().find(|e| e["to"][0]["ipBlock"]["cidr"] == "0.0.0.0/0").unwrap();
    let except: Vec<&str> =
        internet["to"][0]["ipBlock"]["except"].as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
    let hsm_ip: std::net::Ipv4Addr = hsm_net.split('/').next().unwrap().parse().unwrap();
    assert!(
        except.iter().any(|c| c.parse::<ipnet::Ipv4Net>().unwrap().contains(&hsm_ip)),
        "upstream traffic may reach the HSM network: {except:?}"
    );

    // The replicas' config: valid, two HSM servers (HA), PIN from the mounted Secret.
    let token = Token::new();
    let toml = get("ConfigMap")["data"]["tollgate.toml"].as_str().unwrap();
    check_config(&token, "k8s.toml", toml);
    assert_eq!(toml.matches("[[hsm.server]]").count(), 2);
    assert!(toml.contains("pin_file = \"/run/secrets/tollgate/hsm-pin\""));
    let certs: serde_json::Value =
        serde_json::from_str(get("ConfigMap")["data"]["certs.json"].as_str().unwrap()).unwrap();
    assert_eq!(certs["version"], 1);
}

#[test]
fn compose_and_shipped_configs_are_valid() {
    let compose = &yaml(&deploy("compose.yaml"))[0];
    for service in ["init", "tollgate", "origin"] {
        assert!(compose["services"][service].is_object(), "compose service {service}");
    }
    assert!(compose["volumes"]["tollgate-state"].is_object(), "a token/state volume");
    let token = Token::new();
    for (name, file) in [("compose.toml", "compose-tollgate.toml"), ("example.toml", "tollgate.example.toml")] {
        check_config(&token, name, &std::fs::read_to_string(deploy(file)).unwrap());
    }
}

#[test]
fn the_systemd_unit_verifies() {
    let token = Token::new();
    let unit = std::fs::read_to_string(deploy("tollgate.service")).unwrap();
    for hardening in
        ["NoNewPrivileges=yes", "ProtectSystem=strict", "ExecReload=/bin/kill -HUP $MAINPID", "KillSignal=SIGTERM"]
    {
        assert!(unit.contains(hardening), "{hardening}");
    }
    let path = token.path("tollgate.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/tollgate", tollgate_bin())).unwrap();
    let out =
        Command::new("systemd-analyze").arg("verify").arg(&path).output().expect("systemd-analyze (package systemd)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !stderr.contains("tollgate.service:"), "{stderr}");
}

/// Every program a test or the image build starts, and the PKCS#11 modules they load: what a
/// bare Debian must have once `deploy/install-test-deps` has run.
const PROGRAMS: [&str; 34] = [
    "base64",
    "bash",
    "chown",
    "chroot",
    "c-icap",
    "chromium",
    "clamd",
    "curl",
    "debootstrap",
    "h2load",
    "haproxy",
    "ip",
    "iptables",
    "kill",
    "nft",
    "openssl",
    "p11-kit",
    "pkcs11-tool",
    "pkill",
    "podman",
    "python3",
    "runc",
    "sh",
    "sigtool",
    "ss",
    "softhsm2-util",
    "squid",
    "systemd-analyze",
    "tar",
    "testssl",
    "g++",
    "make",
    "mount",
    "umount",
];
const FILES: [&str; 10] = [
    KUBERNETES_VALIDATE,
    "/usr/lib/x86_64-linux-gnu/c_icap/virus_scan.so",
    "/usr/lib/x86_64-linux-gnu/c_icap/clamd_mod.so",
    "/etc/c-icap/c-icap.magic",
    "/usr/lib/squid/basic_ncsa_auth",
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so",
    "/usr/lib/x86_64-linux-gnu/pkcs11/pkcs11-spy.so",
    "/usr/lib/podman/netavark",
    "/usr/lib/podman/aardvark-dns",
];

/// The programs the test sources start (`Command::new("x")`, `require(&["x", …])`,
/// `.cmd("x")`, `exec(…, "x")`), read from the sources themselves.
fn programs_started_by_tests() -> Vec<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let mut sources: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    sources.push(dir.join("support/mod.rs"));
    let mut found = Vec::new();
    for source in sources.iter().filter(|p| p.extension().is_some_and(|e| e == "rs")) {
        let text: String = std::fs::read_to_string(source)
            .unwrap()
            .lines()
            .filter(|line| !line.trim_start().starts_with("//"))
            .map(|line| format!("{line}\n"))
            .collect();
        for (marker, multiple) in
            [("Command::new(\"", false), ("require(&[", true), (".cmd(\"", false), ("exec(", false)]
        {
            for (at, _) in text.match_indices(marker) {
                let rest = &text[at + marker.len()..];
                let call = &rest[..rest.find(')').unwrap_or(rest.len())];
                let names: Vec<&str> = match (multiple, marker) {
                    (true, _) => {
                        call.split(',').filter_map(|s| s.trim().trim_end_matches(']').strip_prefix('"')).collect()
                    }
                    (false, "exec(") => {
                        call.rsplit(',').next().and_then(|s| s.trim().strip_prefix('"')).into_iter().collect()
                    }
                    _ => vec![call],
                };
                found.extend(names.into_iter().map(|n| n.trim_end_matches('"').to_string()));
            }
        }
    }
    found.retain(|p| !p.is_empty() && !p.contains('{') && !p.starts_with("/usr/local/"));
    found.sort();
    found.dedup();
    found
}

/// A bare Debian (debootstrap minbase: the machine CI starts from) gets, from the project's own
/// install scripts and nothing else, every program the tests and the image build start. It was
/// a machine that still had an earlier session's iptables that hid the image build's need for
/// it. The list above is checked against the test sources, so a new tool cannot be missed.
#[test]
fn the_install_scripts_give_a_bare_debian_every_program_the_tests_start() {
    for program in programs_started_by_tests() {
        let name = program.rsplit('/').next().unwrap();
        assert!(PROGRAMS.contains(&name), "{program} is started by a test but not checked here: add it to PROGRAMS");
    }
    require(&["debootstrap", "chroot", "mount", "umount"]);
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("root");
    let out = Command::new("debootstrap").args(["--variant=minbase", "bookworm"]).arg(&root).output().unwrap();
    assert!(out.status.success(), "debootstrap: {}", String::from_utf8_lossy(&out.stderr));
    // /proc for the packages' scripts; unmounted before the tree is removed.
    struct Proc(PathBuf);
    impl Drop for Proc {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let proc = root.join("proc");
    assert!(Command::new("mount").args(["-t", "proc", "proc"]).arg(&proc).status().unwrap().success());
    let _proc = Proc(proc);
    let scripts = root.join("opt/tollgate/deploy");
    std::fs::create_dir_all(&scripts).unwrap();
    for script in ["install-deps", "install-test-deps", "apt-install"] {
        std::fs::copy(deploy(script), scripts.join(script)).unwrap();
    }
    // The machine's network setup, as a fresh machine of this kind has it: its resolver and
    // the CAs its network requires (apt's ca-certificates adds them to the system store).
    std::fs::copy("/etc/resolv.conf", root.join("etc/resolv.conf")).unwrap();
    let local_cas = root.join("usr/local/share/ca-certificates");
    std::fs::create_dir_all(&local_cas).unwrap();
    for ca in std::fs::read_dir("/usr/local/share/ca-certificates").into_iter().flatten().flatten() {
        std::fs::copy(ca.path(), local_cas.join(ca.file_name())).unwrap();
    }
    let chroot = |command: &str| Command::new("chroot").arg(&root).args(["sh", "-c", command]).output().unwrap();
    let out = chroot("bash /opt/tollgate/deploy/install-test-deps");
    assert!(out.status.success(), "install-test-deps: {}", String::from_utf8_lossy(&out.stderr));
    let missing: Vec<&str> = PROGRAMS
        .iter()
        .filter(|program| !chroot(&format!("command -v {program}")).status.success())
        .chain(FILES.iter().filter(|file| !root.join(file.trim_start_matches('/')).exists()))
        .copied()
        .collect();
    assert!(missing.is_empty(), "a fresh Debian lacks {missing:?} after the install scripts");
    let out = chroot("/usr/bin/python3 -c 'import yaml, prometheus_client, requests'");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
