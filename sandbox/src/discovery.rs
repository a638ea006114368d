//! Which PostgreSQL a sandbox runs (see the crate docs): `PG_BIN`, an installed major version,
//! `pg_config`, or the newest Debian server.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// Directory holding `postgres` and `initdb`, overriding discovery.
pub const ENV_PG_BIN: &str = "PG_BIN";

/// Major version to run (e.g. `17`), found among the installed servers (see the module docs).
pub const ENV_PG_MAJOR: &str = "LOCKGUARD_TEST_PG_MAJOR";

/// Where `.ci/install-postgres` puts the builds of other majors (`<root>/<major>/bin`).
pub const ENV_PG_ROOT: &str = "LOCKGUARD_PG_ROOT";

/// Default of [`ENV_PG_ROOT`].
pub const DEFAULT_PG_ROOT: &str = "/opt/lockguard-pg";

fn has_server_binaries(dir: &Path) -> bool {
    ["postgres", "initdb"].iter().all(|b| dir.join(b).is_file())
}

/// The directory of an installed PostgreSQL `major`: Debian's `/usr/lib/postgresql/<major>/bin`,
/// else `<LOCKGUARD_PG_ROOT or /opt/lockguard-pg>/<major>/bin` (`.ci/install-postgres`).
pub fn installed_major(major: u32) -> Option<PathBuf> {
    let root = std::env::var_os(ENV_PG_ROOT)
        .filter(|root| !root.is_empty())
        .map_or_else(|| PathBuf::from(DEFAULT_PG_ROOT), PathBuf::from);
    [
        PathBuf::from(format!("/usr/lib/postgresql/{major}/bin")),
        root.join(major.to_string()).join("bin"),
    ]
    .into_iter()
    .find(|dir| has_server_binaries(dir))
}

/// The directory with `postgres` and `initdb`: `PG_BIN`, else the major named by
/// `LOCKGUARD_TEST_PG_MAJOR`, else `pg_config --bindir`, else the newest
/// `/usr/lib/postgresql/*/bin`. The error says how to install them.
pub fn server_binaries() -> Result<PathBuf, String> {
    static FOUND: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    FOUND.get_or_init(find_server_binaries).clone()
}

fn find_server_binaries() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os(ENV_PG_BIN) {
        let dir = PathBuf::from(dir);
        return if has_server_binaries(&dir) {
            Ok(dir)
        } else {
            Err(format!(
                "{ENV_PG_BIN}={} does not contain postgres and initdb",
                dir.display()
            ))
        };
    }
    if let Some(major) = std::env::var(ENV_PG_MAJOR).ok().filter(|m| !m.is_empty()) {
        let parsed: u32 = major.parse().map_err(|e| {
            format!("{ENV_PG_MAJOR}={major:?} is not a major version number such as 17: {e}")
        })?;
        return installed_major(parsed).ok_or_else(|| {
            format!(
                "{ENV_PG_MAJOR}={parsed}, but PostgreSQL {parsed} is not installed in \
                 /usr/lib/postgresql/{parsed}/bin nor in {}/{parsed}/bin; install it with \
                 `.ci/install-postgres {parsed}` (needs npm) or set PG_BIN to its directory.",
                std::env::var(ENV_PG_ROOT).unwrap_or_else(|_| DEFAULT_PG_ROOT.to_owned())
            )
        });
    }
    if let Ok(output) = Command::new("pg_config")
        .arg("--bindir")
        .stderr(Stdio::null())
        .output()
    {
        if output.status.success() {
            let dir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
            if has_server_binaries(&dir) {
                return Ok(dir);
            }
        }
    }
    let newest = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version: Vec<u32> = entry
                .file_name()
                .to_str()?
                .split('.')
                .map(str::parse)
                .collect::<Result<_, _>>()
                .ok()?;
            let bin = entry.path().join("bin");
            has_server_binaries(&bin).then_some((version, bin))
        })
        .max();
    newest.map(|(_, bin)| bin).ok_or_else(|| {
        "no PostgreSQL server binaries found (postgres, initdb). Install them \
         (Debian/Ubuntu: `sudo apt-get install -y postgresql`; Fedora: `sudo dnf install \
         postgresql-server`; macOS: `brew install postgresql`) or set PG_BIN to their directory."
            .to_owned()
    })
}
