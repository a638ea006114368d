//! The account the server binaries run as: they refuse root, so a root owner runs them as
//! `postgres`.

use std::fs;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::{ctx, Sandbox};

/// The account the server binaries run as when this process is root (they refuse root).
#[derive(Debug, Clone)]
pub(crate) struct RunAs {
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) home: PathBuf,
}

/// When we are root, the `postgres` account from `/etc/passwd`, since initdb/postgres refuse
/// to run as root; `None` otherwise (they run as the current user).
pub(crate) fn lookup_run_as() -> io::Result<Option<RunAs>> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let passwd =
        fs::read_to_string("/etc/passwd").map_err(|e| ctx(e, "reading /etc/passwd".to_owned()))?;
    for line in passwd.lines() {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() >= 6 && fields[0] == "postgres" {
            let parse = |s: &str| {
                s.parse::<u32>().map_err(|e| {
                    io::Error::other(format!("bad id in /etc/passwd line {line:?}: {e}"))
                })
            };
            return Ok(Some(RunAs {
                uid: parse(fields[2])?,
                gid: parse(fields[3])?,
                home: PathBuf::from(fields[5]),
            }));
        }
    }
    Err(io::Error::other(
        "running as root, but /etc/passwd has no `postgres` user to run initdb/postgres as (they \
         refuse root): install the server with `apt-get install -y postgresql`, which creates it, \
         or run as an unprivileged user",
    ))
}

impl Sandbox {
    /// A command for one of the server binaries, run as `postgres` when we are root.
    pub(crate) fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(program));
        cmd.current_dir(&self.root)
            .stdin(Stdio::null())
            .env_remove("PGDATA");
        if let Some(run_as) = &self.run_as {
            // With `uid` set (and no explicit groups), std also calls `setgroups(0, NULL)` in
            // the child before `setuid`, so root's supplementary groups are dropped.
            cmd.uid(run_as.uid)
                .gid(run_as.gid)
                .env("HOME", &run_as.home);
        }
        cmd
    }
}
