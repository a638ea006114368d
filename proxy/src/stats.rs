//! Proxy-wide counters for the admin port and metrics. Updated once per connection event, never
//! per message: per-session byte counts live in the session record and are added here when the
//! session ends.

use std::sync::atomic::{AtomicU64, Ordering};

use guard_core::Registry;
use serde::Serialize;

/// Why an upstream connect failed: the `reason` label of
/// `lockguard_upstream_connect_errors_total`, so an alert can tell a server that is down from
/// a certificate problem.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnectFailure {
    /// Nothing listens there (or the socket file is missing).
    Refused,
    /// No answer within `connect_timeout`.
    Timeout,
    /// The SSLRequest or the TLS handshake failed, or the server refused TLS.
    Tls,
    /// The upstream host name did not resolve.
    Dns,
    #[default]
    Other,
}

impl ConnectFailure {
    /// Every reason, so the metric shows zeros too.
    pub const ALL: [ConnectFailure; 5] = [
        ConnectFailure::Refused,
        ConnectFailure::Timeout,
        ConnectFailure::Tls,
        ConnectFailure::Dns,
        ConnectFailure::Other,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectFailure::Refused => "refused",
            ConnectFailure::Timeout => "timeout",
            ConnectFailure::Tls => "tls",
            ConnectFailure::Dns => "dns",
            ConnectFailure::Other => "other",
        }
    }
}

#[derive(Debug, Default)]
pub struct ProxyStats {
    clients_accepted: AtomicU64,
    clients_refused: AtomicU64,
    startup_rejected: AtomicU64,
    startup_timeouts: AtomicU64,
    upstream_connect_errors: [AtomicU64; ConnectFailure::ALL.len()],
    cancel_requests: AtomicU64,
    sessions_started: AtomicU64,
    sessions_ended: AtomicU64,
    ended_bytes_from_client: AtomicU64,
    ended_bytes_from_server: AtomicU64,
    /// Sessions a forwarding thread carries now (a gauge: up when one is taken, down when it
    /// is given back).
    on_forwarding_threads: AtomicU64,
}

/// A consistent-enough copy of the counters (each read atomically, not all at one instant).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct StatsSnapshot {
    /// TCP connections accepted by the listener.
    pub clients_accepted: u64,
    /// Connections refused because `max_clients` was reached.
    pub clients_refused: u64,
    /// Connections whose startup packet was invalid.
    pub startup_rejected: u64,
    /// Connections that did not finish startup within `startup_timeout`.
    pub startup_timeouts: u64,
    /// Failed attempts to open an upstream connection.
    pub upstream_connect_errors: u64,
    /// The same, by why they failed (every reason, in [`ConnectFailure::ALL`] order).
    pub upstream_connect_errors_by_reason: [(ConnectFailure, u64); ConnectFailure::ALL.len()],
    /// CancelRequests forwarded.
    pub cancel_requests: u64,
    /// Sessions that reached the upstream.
    pub sessions_started: u64,
    pub sessions_ended: u64,
    /// Bytes read from clients / servers, ended and live sessions together.
    pub bytes_from_clients: u64,
    pub bytes_from_servers: u64,
    /// Sessions the forwarding threads carry now (the rest are forwarded by the runtime).
    pub sessions_on_forwarding_threads: u64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl ProxyStats {
    pub fn client_accepted(&self) {
        bump(&self.clients_accepted);
    }
    pub fn client_refused(&self) {
        bump(&self.clients_refused);
    }
    pub fn startup_rejected(&self) {
        bump(&self.startup_rejected);
    }
    pub fn startup_timed_out(&self) {
        bump(&self.startup_timeouts);
    }
    /// Counts a failed upstream connect under the reason its error names.
    pub fn upstream_connect_failed(&self, reason: ConnectFailure) {
        bump(&self.upstream_connect_errors[reason as usize]);
    }
    pub fn cancel_forwarded(&self) {
        bump(&self.cancel_requests);
    }
    pub fn session_started(&self) {
        bump(&self.sessions_started);
    }

    /// A forwarding thread took a session.
    pub fn session_carried(&self) {
        bump(&self.on_forwarding_threads);
    }

    /// A forwarding thread gave a session back to its task.
    pub fn session_given_back(&self) {
        self.on_forwarding_threads.fetch_sub(1, Ordering::Relaxed);
    }

    /// Folds an ended session's byte counts into the totals.
    pub fn session_ended(&self, bytes_from_client: u64, bytes_from_server: u64) {
        bump(&self.sessions_ended);
        self.ended_bytes_from_client
            .fetch_add(bytes_from_client, Ordering::Relaxed);
        self.ended_bytes_from_server
            .fetch_add(bytes_from_server, Ordering::Relaxed);
    }

    /// The counters now; live sessions' bytes are read from the registry.
    pub fn snapshot(&self, registry: &Registry) -> StatsSnapshot {
        let live = registry.snapshot();
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            clients_accepted: load(&self.clients_accepted),
            clients_refused: load(&self.clients_refused),
            startup_rejected: load(&self.startup_rejected),
            startup_timeouts: load(&self.startup_timeouts),
            upstream_connect_errors: self.upstream_connect_errors.iter().map(load).sum(),
            upstream_connect_errors_by_reason: ConnectFailure::ALL
                .map(|reason| (reason, load(&self.upstream_connect_errors[reason as usize]))),
            cancel_requests: load(&self.cancel_requests),
            sessions_started: load(&self.sessions_started),
            sessions_ended: load(&self.sessions_ended),
            bytes_from_clients: load(&self.ended_bytes_from_client)
                + live.iter().map(|s| s.bytes_from_client()).sum::<u64>(),
            bytes_from_servers: load(&self.ended_bytes_from_server)
                + live.iter().map(|s| s.bytes_from_server()).sum::<u64>(),
            sessions_on_forwarding_threads: load(&self.on_forwarding_threads),
        }
    }
}
