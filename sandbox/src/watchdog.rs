//! The watchdog that cleans up after an owner that died without running any code (see the
//! crate docs, "Cleanup").

use std::io::{self, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use crate::ctx;

/// The watchdog's script. `$1` is the data dir, `$2` the temp dir to remove.
const WATCHDOG_SCRIPT: &str = r#"trap '' INT HUP QUIT
IFS= read -r cmd
if [ "$cmd" = disarm ]; then exit 0; fi
alive() { [ "$(readlink "/proc/$1/cwd" 2>/dev/null)" = "$2" ]; }
pid=$(head -n 1 "$1/postmaster.pid" 2>/dev/null)
case "$pid" in ''|*[!0-9]*) pid= ;; esac
if [ -n "$pid" ] && alive "$pid" "$1"; then
  kill -INT "$pid" 2>/dev/null
  i=0
  while [ "$i" -lt 100 ] && alive "$pid" "$1"; do sleep 0.1; i=$((i + 1)); done
  if alive "$pid" "$1"; then kill -KILL "$pid" 2>/dev/null; sleep 0.2; fi
fi
rm -rf "$2"
"#;

/// Starts the watchdog for the cluster in `data` under the temp dir `root`.
pub(crate) fn spawn(data: &Path, root: &Path) -> io::Result<Child> {
    Command::new("/bin/sh")
        .arg("-c")
        .arg(WATCHDOG_SCRIPT)
        .arg("lockguard-sandbox-watchdog")
        .arg(data)
        .arg(root)
        .current_dir("/")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|e| ctx(e, "spawning the cleanup watchdog /bin/sh".to_owned()))
}

/// Tells the watchdog that teardown was orderly, and reaps it.
pub(crate) fn disarm(watchdog: &mut Child) {
    if let Some(mut stdin) = watchdog.stdin.take() {
        // If the watchdog is already gone the write fails with EPIPE; nothing left to do then.
        let _ = stdin.write_all(b"disarm\n");
    }
    let _ = watchdog.wait();
}
