//! The Kubernetes manifests under `deploy/kubernetes`, validated against a current release's
//! schemas and against each other and the configuration they carry.
//!
//! A test whose tool is missing is skipped with a message, except under `CI=true`, where it
//! fails.

mod deploy_support;

use std::path::PathBuf;
use std::process::Command;

use lockguard_config::Config;
use serde_json::Value;

use deploy_support::*;

/// The Kubernetes release the manifests are validated against, and the kubernetes-validate
/// release that carries its schemas.
const KUBERNETES_VERSION: &str = "1.37.0";
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.*";

/// `kubernetes-validate` from a virtualenv under target/, created when missing.
fn kubernetes_validate() -> Option<PathBuf> {
    let venv = target_dir().join("deploy-venv");
    let tool = venv.join("bin/kubernetes-validate");
    if tool.is_file() {
        return Some(tool);
    }
    let python = require(
        "python3",
        "apt-get install python3 python3-venv; the test then installs kubernetes-validate",
    )?;
    eprintln!(
        "creating {} with {KUBERNETES_VALIDATE} (first run only)",
        venv.display()
    );
    let created = Command::new(&python)
        .args(["-m", "venv"])
        .arg(&venv)
        .output()
        .expect("run python3 -m venv");
    if !created.status.success() {
        let why = String::from_utf8_lossy(&created.stderr);
        let _ = std::fs::remove_dir_all(&venv);
        assert!(!in_ci(), "python3 -m venv failed and CI=true: {why}");
        eprintln!("SKIPPED: python3 -m venv failed (apt-get install python3-venv): {why}");
        return None;
    }
    run(Command::new(venv.join("bin/pip")).args([
        "install",
        "--quiet",
        "--disable-pip-version-check",
        KUBERNETES_VALIDATE,
    ]));
    Some(tool)
}

#[test]
fn the_kubernetes_manifests_validate_against_a_current_release() {
    let Some(validate) = kubernetes_validate() else {
        return;
    };
    let dir = repo().join("deploy/kubernetes");
    let out = run(Command::new(&validate)
        .args(["--strict", "-k", KUBERNETES_VERSION])
        .args(["configmap.yaml", "deployment.yaml", "service.yaml"])
        .current_dir(&dir));
    let report = String::from_utf8_lossy(&out.stdout);
    for (file, resource) in [
        ("configmap.yaml", "configmap/lockguard-config"),
        ("deployment.yaml", "deployment/lockguard"),
        ("service.yaml", "service/lockguard"),
    ] {
        assert!(
            report.contains(&format!("INFO {file} passed for resource {resource}")),
            "{report}"
        );
    }

    // The validator rejects what it should: a misspelt field in strict mode.
    let broken = tempfile::tempdir().expect("temp dir");
    let deployment = read("deploy/kubernetes/deployment.yaml").replace(
        "terminationGracePeriodSeconds:",
        "terminationGracePeriodSecond:",
    );
    std::fs::write(broken.path().join("deployment.yaml"), deployment).expect("write");
    let out = Command::new(&validate)
        .args(["--strict", "-k", KUBERNETES_VERSION, "deployment.yaml"])
        .current_dir(broken.path())
        .output()
        .expect("run kubernetes-validate");
    assert!(
        !out.status.success(),
        "a misspelt field passed:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // kubernetes-validate has no schema for the Prometheus Operator's CRDs; the PodMonitor is
    // checked structurally in the_kubernetes_manifests_agree_with_each_other_and_the_config.
    let out = run(Command::new(&validate)
        .args(["-k", KUBERNETES_VERSION, "monitoring/podmonitor.yaml"])
        .current_dir(&dir));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Couldn't find schema for kind PodMonitor"),
        "kubernetes-validate now knows PodMonitor: validate it here. {out:?}"
    );
}

/// The configuration embedded in the ConfigMap.
fn configmap_config() -> String {
    let configmap = yaml("deploy/kubernetes/configmap.yaml");
    text(&configmap, "/data/lockguard.toml").to_owned()
}

/// The environment variables the configuration reads secrets from.
fn secret_variables(config: &Config) -> Vec<String> {
    let mut variables: Vec<String> = config
        .guard
        .password_env
        .iter()
        .chain(&config.admin.api_token_env)
        .cloned()
        .collect();
    variables.extend(
        config
            .admin
            .users
            .iter()
            .filter_map(|u| u.password_env.clone()),
    );
    variables
}

#[test]
fn the_configmaps_config_passes_check_config() {
    let text = configmap_config();
    let config = Config::from_toml_str(&text).expect("the ConfigMap's config parses");
    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), &text).expect("write the config");
    let mut command = Command::new(env!("CARGO_BIN_EXE_lockguard"));
    command.arg("check-config").arg(file.path());
    for variable in secret_variables(&config) {
        command.env(variable, "not-a-real-secret");
    }
    let out = run(&mut command);
    let effective = String::from_utf8_lossy(&out.stdout);
    assert!(
        effective.contains("listen = \"0.0.0.0:6432\""),
        "{effective}"
    );
}

/// Cross-checks that no schema can make: probes, ports and secrets against the configuration,
/// the grace period against shutdown_timeout, selectors against labels, the pod's user against
/// the image's, and the PodMonitor (which has no offline schema) field by field.
// Long because it is a list of independent cross-checks over the same parsed manifests.
#[test]
fn the_kubernetes_manifests_agree_with_each_other_and_the_config() {
    let config = Config::from_toml_str(&configmap_config()).expect("the ConfigMap's config");
    let deployment = yaml("deploy/kubernetes/deployment.yaml");
    let service = yaml("deploy/kubernetes/service.yaml");
    let monitor = yaml("deploy/kubernetes/monitoring/podmonitor.yaml");
    let pod = at(&deployment, "/spec/template");
    let spec = at(pod, "/spec");
    let containers = at(spec, "/containers").as_array().expect("containers");
    assert_eq!(containers.len(), 1);
    let container = &containers[0];

    // The configuration file the container reads is the one the ConfigMap holds.
    let args: Vec<&str> = at(container, "/args")
        .as_array()
        .expect("args")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(args, ["--config", "/etc/lockguard/lockguard.toml"]);
    let mount = at(container, "/volumeMounts")
        .as_array()
        .expect("mounts")
        .iter()
        .find(|m| m["name"] == "config")
        .expect("the config volume is mounted");
    assert_eq!(text(mount, "/mountPath"), "/etc/lockguard");
    let volume = at(spec, "/volumes")
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == "config")
        .expect("the config volume");
    assert_eq!(text(volume, "/configMap/name"), "lockguard-config");
    assert_eq!(text(volume, "/configMap/items/0/path"), "lockguard.toml");
    assert!(text(volume, "/configMap/items/0/key") == "lockguard.toml");

    // Ports: the container's named ports are the ones the configuration listens on, on every
    // interface of the pod.
    let port = |name: &str| -> u64 {
        let ports = at(container, "/ports").as_array().expect("ports");
        let port = ports
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("no container port {name}"));
        number(port, "/containerPort")
    };
    for (name, addr) in [
        ("postgres", config.proxy.listen),
        ("http", config.admin.http_listen),
    ] {
        assert_eq!(port(name), u64::from(addr.port()), "port {name}");
        assert!(addr.ip().is_unspecified(), "{name} listens on {addr}");
    }
    // The console stays on the pod's loopback (kubectl port-forward reaches it), so it is no
    // container port: a console on the pod network would need admin.require_tls.
    assert!(
        config.admin.listen.ip().is_loopback(),
        "console listens on {}",
        config.admin.listen
    );
    let ports = at(container, "/ports").as_array().expect("ports");
    assert!(!ports.iter().any(|p| p["name"] == "console"), "{ports:?}");
    assert_eq!(text(container, "/livenessProbe/httpGet/path"), "/healthz");
    assert_eq!(text(container, "/livenessProbe/httpGet/port"), "http");
    assert_eq!(text(container, "/readinessProbe/httpGet/path"), "/readyz");
    assert_eq!(text(container, "/readinessProbe/httpGet/port"), "http");

    // The grace period covers the preStop pause and the whole shutdown_timeout.
    let grace = number(spec, "/terminationGracePeriodSeconds");
    let pause = number(container, "/lifecycle/preStop/sleep/seconds");
    assert!(
        grace > pause + config.proxy.shutdown_timeout.as_secs(),
        "terminationGracePeriodSeconds {grace} <= preStop {pause}s + shutdown_timeout {:?}",
        config.proxy.shutdown_timeout
    );

    // Non-root (the image's own user), read-only, nothing to escalate to.
    let passwd = read("deploy/container/passwd");
    let image_uid = passwd
        .lines()
        .find(|l| l.starts_with("lockguard:"))
        .and_then(|l| l.split(':').nth(2))
        .and_then(|uid| uid.parse::<u64>().ok())
        .expect("the lockguard user in deploy/container/passwd");
    assert!(read("deploy/container/Containerfile").contains(&format!("USER {image_uid}:")));
    assert_eq!(number(spec, "/securityContext/runAsUser"), image_uid);
    assert_eq!(at(spec, "/securityContext/runAsNonRoot"), true);
    let security = at(container, "/securityContext");
    assert_eq!(at(security, "/readOnlyRootFilesystem"), true);
    assert_eq!(at(security, "/allowPrivilegeEscalation"), false);
    assert_eq!(at(security, "/capabilities/drop/0"), "ALL");
    // A Service named lockguard would inject LOCKGUARD_* variables otherwise.
    assert_eq!(at(spec, "/enableServiceLinks"), false);
    for resource in [
        "/resources/requests/cpu",
        "/resources/requests/memory",
        "/resources/limits/memory",
    ] {
        text(container, resource);
    }

    // Every secret the configuration reads from the environment comes from the Secret.
    let env = at(container, "/env").as_array().expect("env");
    for variable in secret_variables(&config) {
        let entry = env
            .iter()
            .find(|e| e["name"] == variable.as_str())
            .unwrap_or_else(|| panic!("{variable} is not set in the container"));
        assert_eq!(text(entry, "/valueFrom/secretKeyRef/name"), "lockguard");
    }
    assert!(secret_variables(&config).len() >= 2);

    // The Service and the PodMonitor find the pods and name their ports.
    let labels = at(pod, "/metadata/labels").as_object().expect("labels");
    let selects_pods = |selector: &Value| {
        let selector = selector.as_object().expect("a label selector");
        assert!(!selector.is_empty());
        for (key, value) in selector {
            assert_eq!(labels.get(key), Some(value), "selector {key}={value}");
        }
    };
    selects_pods(at(&deployment, "/spec/selector/matchLabels"));
    selects_pods(at(&service, "/spec/selector"));
    let service_port = at(&service, "/spec/ports/0");
    port(text(service_port, "/targetPort"));

    assert_eq!(text(&monitor, "/apiVersion"), "monitoring.coreos.com/v1");
    assert_eq!(text(&monitor, "/kind"), "PodMonitor");
    selects_pods(at(&monitor, "/spec/selector/matchLabels"));
    let endpoint = at(&monitor, "/spec/podMetricsEndpoints/0");
    assert_eq!(text(endpoint, "/port"), "http");
    assert_eq!(text(endpoint, "/path"), "/metrics");
    // The job label the alert rules select on.
    let job_label = text(&monitor, "/spec/jobLabel");
    assert_eq!(labels.get(job_label), Some(&Value::from("lockguard")));
    assert!(read("deploy/prometheus/lockguard-rules.yaml").contains("up{job=\"lockguard\"}"));
}
