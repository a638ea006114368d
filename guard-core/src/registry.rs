//! All live proxied sessions, for the guard's sweep and the admin port.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use dashmap::DashMap;

use crate::session::{ClientInfo, SessionId, SessionRecord, UpstreamIdentity};

/// The set of live sessions. Sessions add themselves after connecting upstream and are removed
/// when their [`Registration`] is dropped, however the session ends.
#[derive(Debug, Default)]
pub struct Registry {
    sessions: DashMap<SessionId, Arc<SessionRecord>>,
    next_id: AtomicU64,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a session and returns the handle that keeps it registered.
    pub fn register(
        self: &Arc<Self>,
        client: ClientInfo,
        upstream: UpstreamIdentity,
    ) -> Registration {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let record = Arc::new(SessionRecord::new(id, client, upstream));
        self.sessions.insert(id, Arc::clone(&record));
        Registration {
            registry: Arc::clone(self),
            record,
        }
    }

    /// The session with this id, if it is still live.
    pub fn get(&self, id: SessionId) -> Option<Arc<SessionRecord>> {
        self.sessions.get(&id).map(|r| Arc::clone(r.value()))
    }

    /// The live session served by this backend pid, if any.
    ///
    /// A linear scan: it serves the admin port and rare lookups, and keeps the hot path free of
    /// a second index to maintain.
    pub fn find_by_pid(&self, pid: i32) -> Option<Arc<SessionRecord>> {
        self.sessions
            .iter()
            .find(|r| r.value().backend_pid() == Some(pid))
            .map(|r| Arc::clone(r.value()))
    }

    /// A snapshot of all live sessions, ordered by id.
    pub fn snapshot(&self) -> Vec<Arc<SessionRecord>> {
        let mut all: Vec<_> = self
            .sessions
            .iter()
            .map(|r| Arc::clone(r.value()))
            .collect();
        all.sort_by_key(|r| r.id);
        all
    }

    /// Number of live sessions.
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }
}

/// Keeps a session in the registry; dropping it removes the session.
#[derive(Debug)]
pub struct Registration {
    registry: Arc<Registry>,
    record: Arc<SessionRecord>,
}

impl Registration {
    pub fn record(&self) -> &Arc<SessionRecord> {
        &self.record
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.sessions.remove(&self.record.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registration_lives_as_long_as_its_handle() {
        let registry = Arc::new(Registry::new());
        let client = ClientInfo {
            addr: "127.0.0.1:1".parse().unwrap(),
            user: "u".into(),
            database: "d".into(),
            application_name: String::new(),
        };
        let a = registry.register(client.clone(), UpstreamIdentity::Unix);
        let b = registry.register(client, UpstreamIdentity::Unix);
        assert_ne!(a.record().id, b.record().id);
        b.record().set_backend_key(77, &[0; 4]);
        assert_eq!(registry.find_by_pid(77).map(|r| r.id), Some(b.record().id));
        assert_eq!(registry.len(), 2);
        drop(a);
        assert_eq!(registry.len(), 1);
        drop(b);
        assert!(registry.is_empty());
    }
}
