//! The app of act 2 as a process of its own, so that killing it is a real crash.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use anyhow::{anyhow, bail, Context};

use crate::sessions::{connect, hold_row_lock};
use crate::APP;

/// The app of act 2: this binary run as `lockguard demo-app`, so that killing it is a real
/// process crash.
pub(crate) struct AppProcess {
    child: Child,
    pub(crate) backend_pid: i32,
}

impl AppProcess {
    pub(crate) fn spawn(proxy: SocketAddr, user_id: i32) -> anyhow::Result<AppProcess> {
        let exe = std::env::current_exe().context("finding the lockguard executable")?;
        let child = Command::new(exe)
            .args(["demo-app", "--addr", &proxy.to_string()])
            .args(["--user-id", &user_id.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the demo app process")?;
        // From here on, dropping `app` kills the child.
        let mut app = AppProcess {
            child,
            backend_pid: 0,
        };
        let mut line = String::new();
        if let Some(stdout) = app.child.stdout.take() {
            BufReader::new(stdout)
                .read_line(&mut line)
                .context("reading from the demo app process")?;
        }
        app.backend_pid = line
            .trim()
            .strip_prefix("holding ")
            .and_then(|pid| pid.parse().ok())
            .ok_or_else(|| anyhow!("the demo app process did not take its lock ({line:?})"))?;
        Ok(app)
    }

    pub(crate) fn os_pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for AppProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `lockguard demo-app`: connect to `addr`, take the row lock of `user_id` in an open
/// transaction, say `holding <backend pid>` on stdout, and wait to be killed.
pub async fn app_process(addr: SocketAddr, user_id: i32) -> anyhow::Result<()> {
    let (client, connection) = connect(addr, APP).await?;
    let pid = hold_row_lock(&client, user_id).await?;
    let mut stdout = std::io::stdout();
    writeln!(stdout, "holding {pid}")?;
    stdout.flush()?;
    let _ = connection.await;
    bail!("the connection ended before the process was killed")
}
