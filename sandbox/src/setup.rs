//! Setting a sandbox up: its temp dir, `initdb`, a free port and `postgresql.conf`.

use std::fs;
use std::io;
use std::net::{Ipv4Addr, TcpListener};
use std::path::PathBuf;

use crate::account::RunAs;
use crate::{ctx, Sandbox, SUPERUSER};

/// How many fresh ports to try when the one picked gets taken before the server binds it.
pub(crate) const PORT_ATTEMPTS: usize = 5;

/// Unix socket paths are limited to 107 bytes; leave room for `/.s.PGSQL.65535`.
const MAX_SOCKET_DIR_LEN: usize = 90;

/// Creates `<tmp>/<prefix>*`, owned by the server's account, and returns its canonical path
/// (the watchdog compares it with `/proc/<pid>/cwd`).
pub(crate) fn make_temp_dir(prefix: &str, run_as: Option<&RunAs>) -> io::Result<PathBuf> {
    let tmp = std::env::temp_dir();
    let root = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(&tmp)
        .map_err(|e| ctx(e, format!("creating a {prefix}* dir in {}", tmp.display())))?
        .keep();
    let checked = (|| {
        let root = fs::canonicalize(&root)
            .map_err(|e| ctx(e, format!("canonicalizing {}", root.display())))?;
        if root.as_os_str().len() > MAX_SOCKET_DIR_LEN {
            return Err(io::Error::other(format!(
                "temp dir {} is too long for a Unix socket path; set TMPDIR to a shorter directory",
                root.display()
            )));
        }
        if let Some(run_as) = run_as {
            std::os::unix::fs::chown(&root, Some(run_as.uid), Some(run_as.gid))
                .map_err(|e| ctx(e, format!("chown {} to the postgres user", root.display())))?;
        }
        Ok(root)
    })();
    if checked.is_err() {
        let _ = fs::remove_dir_all(&root);
    }
    checked
}

/// A port that was free a moment ago. Racy by nature; callers retry on `AddrInUse`.
pub(crate) fn free_port() -> io::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(|e| ctx(e, "binding 127.0.0.1:0".to_owned()))?;
    Ok(listener.local_addr()?.port())
}

impl Sandbox {
    pub(crate) fn initdb(&self) -> io::Result<()> {
        let mut cmd = self.command("initdb");
        cmd.arg("-D").arg(&self.data).args([
            "-U",
            SUPERUSER,
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-locale",
            "--no-sync",
        ]);
        let output = cmd
            .output()
            .map_err(|e| ctx(e, format!("running {:?}", cmd)))?;
        if output.status.success() {
            return Ok(());
        }
        let hint = if self.run_as.is_some() {
            format!(
                " (the `postgres` user must be able to traverse every parent of {})",
                self.root.display()
            )
        } else {
            String::new()
        };
        Err(io::Error::other(format!(
            "initdb failed ({}){hint}:\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )))
    }

    /// Rewrites `postgresql.conf` as initdb left it plus our settings (later lines win).
    pub(crate) fn write_conf(
        &self,
        base_conf: &str,
        port: u16,
        settings: &[(&str, &str)],
    ) -> io::Result<()> {
        let socket_dir = self.root.to_str().ok_or_else(|| {
            io::Error::other(format!("temp dir {} is not UTF-8", self.root.display()))
        })?;
        let mut conf = format!(
            "{base_conf}\n# --- lockguard sandbox ---\n\
             listen_addresses = '127.0.0.1'\n\
             port = {port}\n\
             unix_socket_directories = {}\n\
             fsync = off\n\
             synchronous_commit = off\n\
             full_page_writes = off\n\
             max_connections = 300\n\
             shared_buffers = '32MB'\n\
             logging_collector = off\n\
             log_destination = 'stderr'\n\
             log_line_prefix = '%m [%p] %q%u@%d '\n\
             password_encryption = 'scram-sha-256'\n",
            conf_quote(socket_dir)
        );
        for (name, value) in settings {
            conf.push_str(&format!("{name} = {}\n", conf_quote(value)));
        }
        let path = self.data.join("postgresql.conf");
        fs::write(&path, conf).map_err(|e| ctx(e, format!("writing {}", path.display())))
    }
}

/// A quoted `postgresql.conf` value (quotes doubled, backslashes escaped).
fn conf_quote(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conf_values_are_quoted() {
        assert_eq!(conf_quote(r"it's a\b"), r"'it''s a\\b'");
    }
}
