//! The deployment files under `deploy/`, checked with the tools that consume them: the
//! container image built with podman and its binary run against a real PostgreSQL, the
//! Kubernetes manifests validated against a current release's schemas and against each other,
//! the systemd unit through `systemd-analyze verify`, the alert rules through `promtool`, and
//! every series the alerts and the Grafana dashboard name scraped from a running lockguard.
//!
//! A test whose tool is missing is skipped with a message, except under `CI=true`, where it
//! fails. It lives with the binary because only a package's own tests get its path.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use lockguard_config::Config;
use lockguard_sandbox::{Sandbox, SandboxOptions, TRUST_ALL_HBA};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);

// ---- the tools -------------------------------------------------------------------------

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_path_buf()
}

/// The workspace's target directory, where this test binary's `lockguard` was built.
fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_lockguard"))
        .ancestors()
        .nth(2)
        .expect("target/<profile>/lockguard")
        .to_path_buf()
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// The path of `tool` on PATH.
fn on_path(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|candidate| candidate.is_file())
}

/// `tool`'s path; without it the test is skipped with a message, or fails under `CI=true`.
fn require(tool: &str, install: &str) -> Option<PathBuf> {
    let found = on_path(tool);
    if found.is_none() {
        assert!(!in_ci(), "{tool} is missing and CI=true: {install}");
        eprintln!("SKIPPED: {tool} is not installed ({install})");
    }
    found
}

/// Runs `command`, panicking with its output unless it succeeds.
fn run(command: &mut Command) -> Output {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("could not run {command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn read(path: impl AsRef<Path>) -> String {
    let path = repo().join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn yaml(path: &str) -> Value {
    serde_norway::from_str(&read(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// `value[pointer]`, panicking with the pointer when it is missing.
fn at<'a>(value: &'a Value, pointer: &str) -> &'a Value {
    value
        .pointer(pointer)
        .unwrap_or_else(|| panic!("no {pointer} in {value:#}"))
}

fn text<'a>(value: &'a Value, pointer: &str) -> &'a str {
    at(value, pointer)
        .as_str()
        .unwrap_or_else(|| panic!("{pointer} is not a string"))
}

fn number(value: &Value, pointer: &str) -> u64 {
    at(value, pointer)
        .as_u64()
        .unwrap_or_else(|| panic!("{pointer} is not a number"))
}

// ---- a running lockguard ----------------------------------------------------------------

/// A lockguard process logging JSON lines; killed on drop.
struct Running {
    child: Child,
    logs: Arc<Mutex<Vec<String>>>,
    lines: mpsc::Receiver<Value>,
    /// Events received while waiting for another one.
    events: Mutex<Vec<Value>>,
}

impl Running {
    fn start(mut command: Command) -> Running {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {command:?}: {e}"));
        let stderr = child.stderr.take().expect("piped stderr");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (sender, lines) = mpsc::channel();
        let collected = Arc::clone(&logs);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(event) = serde_json::from_str::<Value>(&line) {
                    let _ = sender.send(event);
                }
                collected.lock().expect("logs").push(line);
            }
        });
        Running {
            child,
            logs,
            lines,
            events: Mutex::new(Vec::new()),
        }
    }

    /// The `listen` address of the log event `message`, logged before or within `WAIT`.
    fn address_of(&self, message: &str) -> SocketAddr {
        let mut events = self.events.lock().expect("events");
        let find = |event: &Value| {
            (event["message"] == message)
                .then(|| event["listen"].as_str().and_then(|a| a.parse().ok()))
                .flatten()
        };
        if let Some(addr) = events.iter().find_map(find) {
            return addr;
        }
        let deadline = Instant::now() + WAIT;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let Ok(event) = self.lines.recv_timeout(left) else {
                break;
            };
            if let Some(addr) = find(&event) {
                return addr;
            }
            events.push(event);
        }
        panic!("no {message:?} in the log:\n{}", self.logs())
    }

    fn logs(&self) -> String {
        self.logs.lock().expect("logs").join("\n")
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `GET path` over HTTP/1.0 (so the body is not chunked): status and body.
fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect_timeout(&addr, WAIT).expect("connect to the HTTP endpoint");
    stream.set_read_timeout(Some(WAIT)).expect("read timeout");
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("send the request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .expect("read the response");
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {response:?}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    (status, body.to_owned())
}

fn start_sandbox(pg_hba: &str, setup_sql: &str) -> Sandbox {
    Sandbox::start(SandboxOptions {
        temp_prefix: "lockguard-deploy-",
        pg_hba,
        settings: &[],
        setup_sql,
    })
    .expect("start a throwaway PostgreSQL")
}

// ---- Prometheus rules and the dashboard --------------------------------------------------

#[test]
fn the_alert_rules_pass_promtool_and_their_unit_tests() {
    let Some(promtool) = require("promtool", "apt-get install prometheus") else {
        return;
    };
    let dir = repo().join("deploy/prometheus");
    let checked = run(Command::new(&promtool)
        .args(["check", "rules", "lockguard-rules.yaml"])
        .current_dir(&dir));
    let checked = String::from_utf8_lossy(&checked.stdout);
    assert!(checked.contains("SUCCESS: 10 rules found"), "{checked}");
    let tested = run(Command::new(&promtool)
        .args(["test", "rules", "lockguard-rules.test.yaml"])
        .current_dir(&dir));
    assert!(
        String::from_utf8_lossy(&tested.stdout).contains("SUCCESS"),
        "{tested:?}"
    );
}

/// Aggregations, functions' keywords and set operators: PromQL words that are not series.
const PROMQL_WORDS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "count",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
];
/// Words followed by a parenthesised list of label names.
const LABEL_LISTS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// The series a PromQL expression names: every identifier that is not a function call, a
/// keyword, a label name (inside `{}` or a `by (...)` list), a string, a number or a duration.
fn series_names(expr: &str) -> BTreeSet<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    // Skips from an opening character to its closing one, over quoted strings.
    let skip_to = |mut i: usize, close: char| {
        while i < chars.len() && chars[i] != close {
            if matches!(chars[i], '"' | '\'' | '`') {
                let quote = chars[i];
                i += 1;
                while i < chars.len() && chars[i] != quote {
                    i += if chars[i] == '\\' { 2 } else { 1 };
                }
            }
            i += 1;
        }
        i + 1
    };
    while i < chars.len() {
        let c = chars[i];
        if matches!(c, '"' | '\'' | '`') {
            i = skip_to(i + 1, c);
        } else if c == '{' {
            i = skip_to(i + 1, '}');
        } else if c == '[' {
            i = skip_to(i + 1, ']');
        } else if c.is_ascii_digit() || c == '$' {
            // Numbers, durations, Grafana variables.
            i += 1;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || "._".contains(chars[i])) {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || "_:".contains(chars[i])) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let next = chars[i..].iter().find(|c| !c.is_whitespace());
            if LABEL_LISTS.contains(&word.as_str()) && next == Some(&'(') {
                let open = i + chars[i..].iter().position(|c| *c == '(').unwrap_or(0);
                i = skip_to(open + 1, ')');
            } else if next != Some(&'(') && !PROMQL_WORDS.contains(&word.as_str()) {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

#[test]
fn series_names_finds_the_series_and_nothing_else() {
    let expr = r#"sum by (le, instance) (rate(a_bucket{job="x", le=~"0.5|b_total"}[$__rate_interval]))
        / on (instance) group_left b_total > 0.9 unless c:d offset 5m and up{job="lockguard"} == bool 1
        or histogram_quantile(0.99, e_seconds_bucket) * 1e3"#;
    let found: Vec<String> = series_names(expr).into_iter().collect();
    assert_eq!(
        found,
        ["a_bucket", "b_total", "c:d", "e_seconds_bucket", "up"]
    );
}

/// Every PromQL expression of the alert rules and the dashboard (panels, nested rows and the
/// templating queries), with where it comes from.
fn expressions_in_rules_and_dashboard() -> Vec<(String, String)> {
    let mut exprs = Vec::new();
    let rules = yaml("deploy/prometheus/lockguard-rules.yaml");
    for group in at(&rules, "/groups").as_array().expect("groups") {
        for rule in at(group, "/rules").as_array().expect("rules") {
            exprs.push((
                format!("alert {}", text(rule, "/alert")),
                text(rule, "/expr").to_owned(),
            ));
        }
    }
    let dashboard: Value =
        serde_json::from_str(&read("deploy/grafana/lockguard-dashboard.json")).expect("JSON");
    fn panels(list: &Value, exprs: &mut Vec<(String, String)>) {
        for panel in list.as_array().into_iter().flatten() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                let expr = target["expr"].as_str().expect("a target's expr");
                exprs.push((format!("panel {}", panel["title"]), expr.to_owned()));
            }
            panels(&panel["panels"], exprs);
        }
    }
    panels(at(&dashboard, "/panels"), &mut exprs);
    for variable in at(&dashboard, "/templating/list").as_array().expect("list") {
        if variable["type"] != "query" {
            continue;
        }
        // label_values(SELECTOR, LABEL): only the selector names a series.
        let query = text(variable, "/query/query");
        let selector = query
            .strip_prefix("label_values(")
            .and_then(|q| q.rsplit_once(','))
            .map_or(query, |(selector, _)| selector);
        exprs.push((
            format!("variable {}", variable["name"]),
            selector.to_owned(),
        ));
    }
    exprs
}

/// The sample names of a Prometheus text exposition.
fn scraped_names(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| line.split(['{', ' ']).next().unwrap_or_default().to_owned())
        .collect()
}

#[test]
fn every_series_the_alerts_and_the_dashboard_use_is_exported() {
    let sandbox = start_sandbox(TRUST_ALL_HBA, "SELECT 1");
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("lockguard.toml");
    std::fs::write(
        &config,
        format!(
            "[proxy]\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:{port}\"\n\
             [log]\nformat = \"json\"\n\
             [guard]\ndsn = \"host=127.0.0.1 port={port} user=postgres dbname=postgres\"\n\
             protected_tables = [\"app.user_sessions\"]\n\
             [admin]\nhttp_listen = \"127.0.0.1:0\"\n",
            port = sandbox.port()
        ),
    )
    .expect("write the config");
    let mut command = Command::new(env!("CARGO_BIN_EXE_lockguard"));
    command.arg("--config").arg(&config);
    let lockguard = Running::start(command);
    let http = lockguard.address_of("admin HTTP endpoint is accepting connections");
    let (status, exposition) = http_get(http, "/metrics");
    assert_eq!(status, 200, "{exposition}");
    let exported = scraped_names(&exposition);
    // The families this test was written against, so a scrape that lost the guard's part
    // cannot pass by naming nothing.
    for family in [
        "lockguard_max_clients",
        "lockguard_guard_up",
        "lockguard_probe_duration_seconds_bucket",
    ] {
        assert!(exported.contains(family), "{family} not in:\n{exposition}");
    }

    let exprs = expressions_in_rules_and_dashboard();
    assert!(exprs.len() > 20, "too few expressions found: {exprs:?}");
    let mut missing = Vec::new();
    for (source, expr) in &exprs {
        let names = series_names(expr);
        assert!(!names.is_empty(), "{source} names no series: {expr}");
        // `up` is Prometheus's own series about the scrape.
        for name in names.iter().filter(|n| *n != "up") {
            if !exported.contains(name) {
                missing.push(format!("{source}: {name}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "series not exported by /metrics:\n{}\nexported: {exported:?}",
        missing.join("\n")
    );
}

// ---- Kubernetes -----------------------------------------------------------------------

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

// ---- systemd --------------------------------------------------------------------------

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() {
    let Some(analyze) = require("systemd-analyze", "apt-get install systemd") else {
        return;
    };
    let unit = read("deploy/systemd/lockguard.service");
    for expected in [
        "ExecReload=/bin/kill -HUP $MAINPID",
        "DynamicUser=yes",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
    ] {
        assert!(unit.contains(expected), "the unit lacks {expected}");
    }
    // Stop waits longer than a graceful shutdown with the default shutdown_timeout, and the
    // open-files limit covers two descriptors per client at the default max_clients.
    let defaults = Config::default();
    let setting = |key: &str| {
        unit.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("no {key}"))
            .to_owned()
    };
    let stop = humantime::parse_duration(&setting("TimeoutStopSec")).expect("TimeoutStopSec");
    assert!(
        stop > defaults.proxy.shutdown_timeout,
        "TimeoutStopSec {stop:?}"
    );
    let files: u64 = setting("LimitNOFILE").parse().expect("LimitNOFILE");
    assert!(
        files >= 2 * defaults.proxy.max_clients as u64 + 1000,
        "{files}"
    );

    // verify wants ExecStart's binary and the Documentation= man page to exist: point the
    // unit at the built binary and MANPATH at the page `lockguard man` writes.
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("lockguard.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/lockguard", env!("CARGO_BIN_EXE_lockguard")),
    )
    .expect("write the unit");
    let man = dir.path().join("man/man1");
    std::fs::create_dir_all(&man).expect("man dir");
    run(Command::new(env!("CARGO_BIN_EXE_lockguard"))
        .arg("man")
        .arg("--dir")
        .arg(&man));
    let verify = |unit: &Path| {
        Command::new(&analyze)
            .arg("verify")
            .arg(unit)
            .env("MANPATH", dir.path().join("man"))
            .output()
            .expect("run systemd-analyze")
    };
    let out = verify(&path);
    let complaints = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && complaints.trim().is_empty(),
        "systemd-analyze verify: {}\n{complaints}",
        out.status
    );

    // verify speaks up about what it should: a misspelt directive.
    let broken = dir.path().join("broken.service");
    std::fs::write(
        &broken,
        read_path(&path).replace("ProtectSystem=", "ProtectSystm="),
    )
    .expect("write the unit");
    let out = verify(&broken);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Unknown key 'ProtectSystm'"),
        "{out:?}"
    );
}

fn read_path(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

// ---- the container image ----------------------------------------------------------------

/// Removes the image and container a test created, also when it fails.
struct PodmanCleanup {
    podman: PathBuf,
    image: String,
    container: Option<String>,
}

impl Drop for PodmanCleanup {
    fn drop(&mut self) {
        if let Some(container) = &self.container {
            let _ = Command::new(&self.podman)
                .args(["rm", "--force", container])
                .output();
        }
        let _ = Command::new(&self.podman)
            .args(["rmi", "--force", &self.image])
            .output();
    }
}

/// Builds the static binary the image takes, with the dev profile (no debug info) into its own
/// target directory: a release build from scratch costs minutes on two cores, and the
/// outer `cargo test` holds the lock on the workspace's target directory anyway.
fn build_static_binary() -> PathBuf {
    let triple = format!("{}-unknown-linux-gnu", std::env::consts::ARCH);
    let target = target_dir().join("container-static");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let started = Instant::now();
    run(Command::new(cargo)
        .args(["build", "-p", "lockguard", "--bin", "lockguard", "--target"])
        .arg(&triple)
        .current_dir(repo())
        .env("CARGO_TARGET_DIR", &target)
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env("CARGO_PROFILE_DEV_DEBUG", "false")
        .env("CARGO_INCREMENTAL", "0")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_MAKEFLAGS")
        .env_remove("MAKEFLAGS")
        .env_remove("MFLAGS"));
    eprintln!("static build: {:.1}s", started.elapsed().as_secs_f64());
    target.join(triple).join("debug/lockguard")
}

/// Whether the ELF file has no program interpreter (PT_INTERP): it needs no dynamic loader.
fn is_static_elf(path: &Path) -> bool {
    let bytes = std::fs::read(path).expect("read the binary");
    let u16_at = |i: usize| u16::from_le_bytes([bytes[i], bytes[i + 1]]);
    let u64_at = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&bytes[i..i + 8]);
        u64::from_le_bytes(b)
    };
    assert_eq!(&bytes[..5], b"\x7fELF\x02", "a 64-bit ELF file");
    let (phoff, phentsize, phnum) = (u64_at(0x20) as usize, u16_at(0x36), u16_at(0x38));
    const PT_INTERP: u32 = 3;
    (0..usize::from(phnum)).all(|i| {
        let header = phoff + i * usize::from(phentsize);
        u32::from_le_bytes(bytes[header..header + 4].try_into().expect("4 bytes")) != PT_INTERP
    })
}

/// Every regular file under `root`, relative to it.
fn files_under(root: &Path) -> BTreeSet<String> {
    let mut files = BTreeSet::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).expect("read dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                pending.push(path);
            } else {
                let relative = path.strip_prefix(root).expect("under root");
                files.insert(relative.to_string_lossy().into_owned());
            }
        }
    }
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_container_image_holds_a_static_binary_that_proxies_queries() {
    let Some(podman) = require("podman", "apt-get install podman") else {
        return;
    };
    let started = Instant::now();
    let binary = tokio::task::block_in_place(build_static_binary);
    assert!(is_static_elf(&binary), "{} is dynamic", binary.display());

    // Build the image exactly as the Containerfile documents it.
    let tag = format!("localhost/lockguard-deploy-test:{}", std::process::id());
    let mut cleanup = PodmanCleanup {
        podman: podman.clone(),
        image: tag.clone(),
        container: None,
    };
    let built = Instant::now();
    let bin_dir = binary.parent().expect("the binary's directory");
    tokio::task::block_in_place(|| {
        run(Command::new(&podman)
            .args(["build", "--quiet", "-f", "deploy/container/Containerfile"])
            .arg("--build-context")
            .arg(format!("bin={}", bin_dir.display()))
            .args(["--build-context", "certs=/etc/ssl/certs", "-t", &tag])
            .arg("deploy/container")
            .current_dir(repo()))
    });
    eprintln!("podman build: {:.1}s", built.elapsed().as_secs_f64());

    // The image: a non-root user, no HEALTHCHECK, the binary as entrypoint reading the
    // mounted configuration.
    let inspect = run(Command::new(&podman).args(["image", "inspect", &tag]));
    let inspect: Value = serde_json::from_slice(&inspect.stdout).expect("inspect JSON");
    let image = at(&inspect, "/0/Config");
    assert_eq!(text(image, "/User"), "65532:65532");
    assert!(image.get("Healthcheck").is_none(), "{image:#}");
    assert_eq!(
        at(image, "/Entrypoint"),
        &serde_json::json!(["/usr/local/bin/lockguard"])
    );
    assert_eq!(
        at(image, "/Cmd"),
        &serde_json::json!(["--config", "/etc/lockguard/lockguard.toml"])
    );

    // Its whole filesystem, taken out without running it (this sandbox refuses to).
    let container = format!("lockguard-deploy-test-{}", std::process::id());
    run(Command::new(&podman).args(["create", "--name", &container, &tag]));
    cleanup.container = Some(container.clone());
    let scratch = tempfile::tempdir().expect("temp dir");
    let rootfs = scratch.path().join("rootfs");
    std::fs::create_dir(&rootfs).expect("rootfs dir");
    let tar = scratch.path().join("rootfs.tar");
    run(Command::new(&podman)
        .args(["export", "-o"])
        .arg(&tar)
        .arg(&container));
    run(Command::new("tar")
        .arg("-xf")
        .arg(&tar)
        .arg("-C")
        .arg(&rootfs));
    drop(cleanup);
    assert_eq!(
        files_under(&rootfs),
        [
            "etc/group",
            "etc/passwd",
            "etc/ssl/certs/ca-certificates.crt",
            "usr/local/bin/lockguard"
        ]
        .into_iter()
        .map(str::to_owned)
        .collect::<BTreeSet<_>>(),
        "the image holds exactly the binary, CA certificates and the user"
    );
    let passwd = read_path(&rootfs.join("etc/passwd"));
    assert!(passwd.contains("lockguard:x:65532:65532:"), "{passwd}");
    assert!(
        read_path(&rootfs.join("etc/ssl/certs/ca-certificates.crt")).contains("BEGIN CERTIFICATE")
    );

    // Run the image's binary inside its own filesystem as its own user, as the container
    // would (chroot needs root; otherwise it runs from the extracted file). What the runtime
    // mounts is written in: /etc/hosts, the configuration. The upstream is named by host
    // name, so the static binary's name lookup is exercised, and the guard's password comes
    // from the environment as the Containerfile documents.
    let chrooted = running_as_root();
    let (root_prefix, mount) = if chrooted {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&rootfs, std::fs::Permissions::from_mode(0o755))
            .expect("chmod rootfs");
        (PathBuf::from("/"), rootfs.clone())
    } else {
        eprintln!("not root: running the image's binary outside a chroot");
        (scratch.path().to_path_buf(), scratch.path().to_path_buf())
    };
    std::fs::write(rootfs.join("etc/hosts"), "127.0.0.1 localhost\n").expect("hosts");
    if chrooted {
        // The devices every OCI runtime provides. The binary needs /dev/urandom: statically
        // linked glibc has no dlsym, so the getrandom crate falls back to reading that file.
        let dev = rootfs.join("dev");
        std::fs::create_dir(&dev).expect("dev dir");
        for (name, minor) in [
            ("null", "3"),
            ("zero", "5"),
            ("random", "8"),
            ("urandom", "9"),
        ] {
            run(Command::new("mknod")
                .args(["-m", "666"])
                .arg(dev.join(name))
                .args(["c", "1", minor]));
        }
    }
    let image_binary = |args: &[&str]| {
        let mut command = if chrooted {
            let mut c = Command::new(on_path("chroot").expect("chroot (coreutils)"));
            c.arg("--userspec=65532:65532")
                .arg(&rootfs)
                .arg("/usr/local/bin/lockguard");
            c
        } else {
            Command::new(rootfs.join("usr/local/bin/lockguard"))
        };
        command.args(args).env_clear();
        command
    };
    let version = run(&mut image_binary(&["--version"]));
    assert_eq!(
        String::from_utf8_lossy(&version.stdout).trim(),
        format!("lockguard {}", env!("CARGO_PKG_VERSION"))
    );

    let sandbox = tokio::task::block_in_place(|| {
        start_sandbox(
            "local all all trust\n\
             host all postgres 127.0.0.1/32 trust\n\
             host all all 127.0.0.1/32 scram-sha-256\n",
            "CREATE ROLE lockguard LOGIN PASSWORD 'guard-secret' \
                 IN ROLE pg_signal_backend, pg_read_all_stats;\n\
             CREATE ROLE app LOGIN PASSWORD 'app-secret';\n\
             CREATE SCHEMA app AUTHORIZATION app;",
        )
    });
    let config_dir = mount.join("etc/lockguard");
    std::fs::create_dir_all(&config_dir).expect("config dir");
    std::fs::write(
        config_dir.join("lockguard.toml"),
        format!(
            "[proxy]\nlisten = \"127.0.0.1:0\"\nupstream = \"localhost:{port}\"\n\
             [log]\nformat = \"json\"\n\
             [guard]\ndsn = \"host=localhost port={port} user=lockguard dbname=postgres\"\n\
             password_env = \"LOCKGUARD_GUARD_PASSWORD\"\n\
             protected_tables = [\"app.user_sessions\"]\n\
             [admin]\nhttp_listen = \"127.0.0.1:0\"\n",
            port = sandbox.port()
        ),
    )
    .expect("write the config");
    let config_path = root_prefix.join("etc/lockguard/lockguard.toml");
    let config_arg = config_path.to_str().expect("UTF-8 path");
    let mut command = image_binary(&["--config", config_arg]);
    command.env("LOCKGUARD_GUARD_PASSWORD", "guard-secret");
    let lockguard = Running::start(command);
    let proxy = lockguard.address_of("lockguard is accepting connections");
    let http = lockguard.address_of("admin HTTP endpoint is accepting connections");

    let (client, connection) = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(proxy.port())
        .user("app")
        .password("app-secret")
        .dbname("postgres")
        .connect_timeout(WAIT)
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "connect through the image's binary: {e}\n{}",
                lockguard.logs()
            )
        });
    tokio::spawn(connection);
    let row = client
        .query_one("SELECT current_user::text, 6 * 7", &[])
        .await
        .expect("a query through the image's binary");
    assert_eq!(row.get::<_, String>(0), "app");
    assert_eq!(row.get::<_, i32>(1), 42);
    // Ready: the upstream answers and the guard logged in with the password from the
    // environment.
    let (status, body) = tokio::task::block_in_place(|| {
        std::panic::catch_unwind(|| http_get(http, "/readyz"))
            .unwrap_or_else(|_| panic!("GET /readyz failed; the log:\n{}", lockguard.logs()))
    });
    assert_eq!(status, 200, "{body}\n{}", lockguard.logs());
    eprintln!(
        "container test: {:.1}s in all",
        started.elapsed().as_secs_f64()
    );
}

fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
