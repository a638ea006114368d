//! The systemd unit under `deploy/systemd`, through `systemd-analyze verify`.
//!
//! Skipped with a message when systemd-analyze is missing, except under `CI=true`, where it
//! fails.

mod deploy_support;

use std::path::Path;
use std::process::Command;

use lockguard_config::Config;

use deploy_support::*;

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
