//! Socket options of client and upstream TCP connections.

use std::io;
use std::time::Duration;

use lockguard_config::ProxyConfig;
use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

/// How quickly a silently vanished peer is noticed.
#[derive(Debug, Clone, Copy)]
pub struct Liveness {
    pub keepalive_idle: Duration,
    pub keepalive_interval: Duration,
    pub keepalive_count: u32,
    /// Zero leaves the kernel default.
    pub user_timeout: Duration,
}

impl Liveness {
    /// For client sockets, from `[proxy]`: a client host that vanished (power loss, network
    /// cut) sends no FIN, and keepalive is how its session is noticed as lost — which is what
    /// lets the guard release the locks it held.
    pub fn for_clients(config: &ProxyConfig) -> Self {
        Liveness {
            keepalive_idle: config.client_keepalive_idle,
            keepalive_interval: config.client_keepalive_interval,
            keepalive_count: config.client_keepalive_count,
            user_timeout: config.client_user_timeout,
        }
    }

    /// For the upstream: PostgreSQL is expected to be near and reliable; these only stop a
    /// session from hanging forever on a dead server host.
    pub const UPSTREAM: Liveness = Liveness {
        keepalive_idle: Duration::from_secs(30),
        keepalive_interval: Duration::from_secs(10),
        keepalive_count: 3,
        user_timeout: Duration::from_secs(60),
    };
}

/// TCP_NODELAY (protocol messages are small and latency-bound), keepalive and user timeout.
pub fn tune_tcp(stream: &TcpStream, liveness: &Liveness) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let socket = SockRef::from(stream);
    let keepalive = TcpKeepalive::new()
        .with_time(liveness.keepalive_idle)
        .with_interval(liveness.keepalive_interval)
        .with_retries(liveness.keepalive_count);
    socket.set_tcp_keepalive(&keepalive)?;
    #[cfg(target_os = "linux")]
    if !liveness.user_timeout.is_zero() {
        socket.set_tcp_user_timeout(Some(liveness.user_timeout))?;
    }
    Ok(())
}

/// Descriptors a session holds: its client socket and its upstream socket.
const DESCRIPTORS_PER_SESSION: u64 = 2;
/// Descriptors beside the sessions: listeners, admin connections, guard connections, files.
const DESCRIPTORS_SPARE: u64 = 1024;

/// What [`raise_open_files_limit`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFilesLimit {
    pub before: u64,
    pub now: u64,
    /// Descriptors `max_clients` sessions need at most (plus a spare amount).
    pub needed: u64,
}

/// Raises the soft open-files limit to the hard limit. Every session holds two descriptors,
/// and the usual soft default (1024, also what container runtimes give) would refuse
/// connections long before `max_clients`; the hard limit is what the operator allowed, so
/// taking it needs no privilege (as PostgreSQL and most servers do).
pub fn raise_open_files_limit(max_clients: usize) -> io::Result<OpenFilesLimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let before = limit.rlim_cur;
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    let sessions = u64::try_from(max_clients).unwrap_or(u64::MAX);
    Ok(OpenFilesLimit {
        before,
        now: limit.rlim_cur,
        needed: sessions
            .saturating_mul(DESCRIPTORS_PER_SESSION)
            .saturating_add(DESCRIPTORS_SPARE),
    })
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;

    use super::*;

    /// A connected loopback pair: (the connecting end, the accepted end).
    async fn loopback_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (connected, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (connected.unwrap(), accepted.unwrap().0)
    }

    /// Values no kernel default has, so reading them back proves they were set.
    const LIVENESS: Liveness = Liveness {
        keepalive_idle: Duration::from_secs(17),
        keepalive_interval: Duration::from_secs(7),
        keepalive_count: 5,
        user_timeout: Duration::from_millis(23_000),
    };

    #[tokio::test]
    async fn tune_tcp_sets_nodelay_keepalive_and_user_timeout() {
        let (connected, accepted) = loopback_pair().await;
        for stream in [&connected, &accepted] {
            let socket = SockRef::from(stream);
            assert!(!socket.nodelay().unwrap(), "Nagle is on by default");
            assert!(!socket.keepalive().unwrap(), "keepalive is off by default");

            tune_tcp(stream, &LIVENESS).unwrap();

            assert!(socket.nodelay().unwrap());
            assert!(socket.keepalive().unwrap());
            assert_eq!(socket.keepalive_time().unwrap(), LIVENESS.keepalive_idle);
            assert_eq!(
                socket.keepalive_interval().unwrap(),
                LIVENESS.keepalive_interval
            );
            assert_eq!(
                socket.keepalive_retries().unwrap(),
                LIVENESS.keepalive_count
            );
            #[cfg(target_os = "linux")]
            assert_eq!(
                socket.tcp_user_timeout().unwrap(),
                Some(LIVENESS.user_timeout)
            );
        }
    }

    #[tokio::test]
    async fn a_zero_user_timeout_leaves_the_kernel_default() {
        let (stream, _peer) = loopback_pair().await;
        let liveness = Liveness {
            user_timeout: Duration::ZERO,
            ..LIVENESS
        };
        tune_tcp(&stream, &liveness).unwrap();
        let socket = SockRef::from(&stream);
        assert!(socket.nodelay().unwrap());
        #[cfg(target_os = "linux")]
        assert_eq!(socket.tcp_user_timeout().unwrap(), None);
    }
}
