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
        .expect("python3 with python3-yaml: run `bash deploy/install-deps`");
    assert!(out.status.success(), "{}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn check_config(token: &Token, name: &str, text: &str) {
    let path = token.path(name);
    std::fs::write(&path, text).unwrap();
    let out = token.cmd(tollgate_bin()).args(["run", "--check", "--config"]).arg(&path).output().unwrap();
    assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
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
