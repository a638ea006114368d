//! Half-open clients: a client host that vanishes without a FIN or RST — its
//! network link goes down — while its transaction holds a protected row lock that another
//! session waits for. Only TCP keepalive / TCP_USER_TIMEOUT on the client socket can notice;
//! the guard must then terminate the orphaned backend within the keepalive window + 1 s.
//!
//! The client lives in its own network namespace, joined to the root namespace (where the proxy
//! listens) by a veth pair; setting the client's end of the pair down silences it completely.
//! This needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN) and `ip` (iproute2): without them the test
//! fails in CI (`CI=true`) and is skipped with a message elsewhere.

use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use guard_core::Outcome;
use lockguard_tests::cluster::TestCluster;
use lockguard_tests::guard_support::{self, backend_alive, wait_for, BlockedLogin};
use lockguard_tests::proxy::{config_for, TestProxy};
use lockguard_tests::raw;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const PROTECTED: &str = "app.user_sessions";
/// Prefix of every namespace this test creates; the pid of the creating process follows, so
/// namespaces left by a killed run can be recognised and removed.
const NETNS_PREFIX: &str = "lockguard-test-";

const KEEPALIVE_IDLE: Duration = Duration::from_secs(1);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
const KEEPALIVE_COUNT: u32 = 2;
const USER_TIMEOUT: Duration = Duration::from_secs(3);

/// Runs `ip ARGS`, returning its stderr as the error.
fn ip(args: &[&str]) -> Result<(), String> {
    let output = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running `ip {}`: {e}", args.join(" ")))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// A network namespace joined to the root namespace by a veth pair:
/// `host_addr` (root side, where the proxy listens) ↔ `client_addr` (inside the namespace).
/// Dropping it (also while a failed test unwinds) deletes the pair and the namespace.
struct ClientNetns {
    name: String,
    host_if: String,
    client_if: String,
    host_addr: Ipv4Addr,
}

impl ClientNetns {
    fn create() -> Result<ClientNetns, String> {
        remove_stale_namespaces();
        let pid = std::process::id();
        // A /30 of 10.0.0.0/8 picked from the pid, so concurrent runs do not collide.
        let subnet = 0x0A00_0000 | ((pid & 0x003F_FFFF) << 2);
        let netns = ClientNetns {
            name: format!("{NETNS_PREFIX}{pid}"),
            // Interface names are limited to 15 bytes.
            host_if: format!("lgh{pid}"),
            client_if: format!("lgc{pid}"),
            host_addr: Ipv4Addr::from(subnet | 1),
        };
        let client_cidr = format!("{}/30", Ipv4Addr::from(subnet | 2));
        let host_cidr = format!("{}/30", netns.host_addr);
        // From here on `netns` is dropped on any error, removing what was made.
        ip(&["netns", "add", &netns.name])?;
        ip(&[
            "link",
            "add",
            &netns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &netns.client_if,
        ])?;
        ip(&["link", "set", &netns.client_if, "netns", &netns.name])?;
        ip(&["addr", "add", &host_cidr, "dev", &netns.host_if])?;
        ip(&["link", "set", &netns.host_if, "up"])?;
        netns.exec(&["addr", "add", &client_cidr, "dev", &netns.client_if])?;
        netns.exec(&["link", "set", &netns.client_if, "up"])?;
        netns.exec(&["link", "set", "lo", "up"])?;
        Ok(netns)
    }

    /// `ip ARGS` inside the namespace.
    fn exec(&self, args: &[&str]) -> Result<(), String> {
        let mut all = vec!["netns", "exec", &self.name, "ip"];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// Opens a TCP connection from inside the namespace. A socket belongs to the namespace it
    /// was created in, so only the short-lived thread that makes it needs to enter the
    /// namespace; the socket can then be used from anywhere.
    fn connect(&self, addr: SocketAddr) -> io::Result<std::net::TcpStream> {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let ns = File::open(&path)?;
                    // SAFETY: setns on a valid namespace fd; it changes only this thread's
                    // network namespace, and the thread ends right after connecting.
                    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                })
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("the connecting thread panicked")))
        })
    }

    /// Takes the client's link down: from now on it neither sends nor answers anything — not
    /// even a RST — like a host whose cable was pulled.
    fn cut_client_link(&self) -> Result<(), String> {
        self.exec(&["link", "set", &self.client_if, "down"])
    }
}

impl Drop for ClientNetns {
    fn drop(&mut self) {
        // Deleting one end of a veth pair deletes both; the namespace goes with its name.
        let _ = ip(&["link", "del", &self.host_if]);
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("cleanup: {e}");
        }
    }
}

/// Removes namespaces (and their veth pairs) left behind by runs that were killed before
/// their `Drop` could run: those whose creating process no longer exists.
fn remove_stale_namespaces() {
    let Ok(output) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(pid) = name
            .strip_prefix(NETNS_PREFIX)
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let _ = ip(&["link", "del", &format!("lgh{pid}")]);
        let _ = ip(&["netns", "del", name]);
    }
}

/// The namespace, or `None` (after saying why) when this machine cannot make one outside CI.
fn client_netns_or_skip() -> Option<ClientNetns> {
    match ClientNetns::create() {
        Ok(netns) => Some(netns),
        Err(e) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("CI=true but a network namespace could not be set up (the test needs root and iproute2): {e}")
        }
        Err(e) => {
            eprintln!("skipped: cannot set up a network namespace (needs root and iproute2): {e}");
            None
        }
    }
}

// Long because one namespace and link carry the story: lock, wait, link down, kill, event.
#[tokio::test]
async fn a_client_whose_link_goes_down_is_detected_by_keepalive_and_its_backend_terminated() {
    let Some(netns) = client_netns_or_skip() else {
        return;
    };
    let cluster = TestCluster::shared();
    let db = guard_support::guard_test_database(cluster, "netns").await;
    let admin = guard_support::connect(cluster, &db).await;

    let mut config = config_for(cluster);
    config.proxy.listen = SocketAddr::from((netns.host_addr, 0));
    config.proxy.client_keepalive_idle = KEEPALIVE_IDLE;
    config.proxy.client_keepalive_interval = KEEPALIVE_INTERVAL;
    config.proxy.client_keepalive_count = KEEPALIVE_COUNT;
    config.proxy.client_user_timeout = USER_TIMEOUT;
    config.guard = guard_support::guard_config(cluster, &[PROTECTED]);
    // Only the lost connection may end this session, not the idle rules.
    config.guard.idle_in_transaction_timeout = Duration::ZERO;
    config.guard.failed_transaction_timeout = Duration::ZERO;
    let proxy = TestProxy::start_with(config).await;
    let guard = proxy.guard().expect("guard configured");

    // The application, on its own host: logs in and locks a row of the protected table.
    let std_stream = netns
        .connect(proxy.addr)
        .expect("connect to the proxy from the client namespace");
    std_stream.set_nonblocking(true).expect("non-blocking");
    let mut app = TcpStream::from_std(std_stream).expect("tokio stream");
    let login = raw::login(&mut app, guard_support::app_role(cluster), &db).await;
    let app_pid = raw::backend_pid(&login);
    for sql in [
        "BEGIN",
        "SELECT * FROM app.user_sessions WHERE id = 1 FOR UPDATE",
    ] {
        app.write_all(&raw::query(sql)).await.expect("send");
        loop {
            let m = raw::read_message(&mut app, Duration::from_secs(10))
                .await
                .unwrap_or_else(|| panic!("no reply to {sql}"));
            assert_ne!(m.tag, b'E', "{sql}: {:?}", m.error_fields());
            if m.tag == b'Z' {
                break;
            }
        }
    }

    // A login waits behind the lock.
    let login = BlockedLogin::start(cluster, &db, &admin).await;
    let waiter_pid = login.pid;
    // The guard sees the lock (and has its connection to this database open).
    let facts = guard.probe(&db, &[app_pid]).await.expect("probe");
    assert!(
        facts.get(&app_pid).is_some_and(|f| !f.locks.is_empty()),
        "the guard does not see the protected lock: {facts:?}"
    );

    let cut = Instant::now();
    netns
        .cut_client_link()
        .expect("take the client's link down");
    let window = KEEPALIVE_IDLE + KEEPALIVE_INTERVAL * KEEPALIVE_COUNT;
    let limit = window.max(USER_TIMEOUT) + Duration::from_secs(1);
    // Wait well past the limit so a late kill is measured and reported, not just timed out.
    let proceeded = login.proceeds(limit * 3).await;
    let took = proceeded.duration_since(cut);
    eprintln!("the waiter proceeded {took:?} after the client's link went down (limit {limit:?})");
    assert!(
        took <= limit,
        "the waiter proceeded {took:?} after the link went down; keepalive window + 1 s is {limit:?}"
    );
    wait_for(
        Duration::from_secs(5),
        "the orphaned backend to exit",
        || async { !backend_alive(&admin, app_pid).await },
    )
    .await;

    // The event is recorded once the kill has returned, a moment after the backend exits.
    let event_for_app = || {
        guard
            .audit()
            .recent()
            .into_iter()
            .find(|e| e.backend_pid == app_pid)
    };
    wait_for(
        Duration::from_secs(5),
        "an audit event for the orphaned backend",
        || async { event_for_app().is_some() },
    )
    .await;
    let event = event_for_app().expect("the event just seen");
    assert_eq!(event.outcome, Outcome::Terminated, "{event:?}");
    assert!(
        event.locks.iter().any(|l| l.table == PROTECTED),
        "{event:?}"
    );
    assert!(event.waiter_pids.contains(&waiter_pid), "{event:?}");
    let cause = event.cause.clone().unwrap_or_default();
    assert!(
        cause.contains("client connection failed"),
        "the session should end on the socket error keepalive raises: {event:?}"
    );
    drop(app);
    drop(netns);
}
