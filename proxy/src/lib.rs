//! lockguard: a PostgreSQL wire-protocol proxy that terminates orphaned, lock-holding sessions.
//!
//! The path of a byte, module by module:
//! - [`listener`] accepts a client (and owns the proxy's lifetime: bind, run, drain);
//! - [`client`] serves that connection: [`startup`] reads its first packets (with [`tls`]
//!   when the client asks), [`upstream`] connects to PostgreSQL, [`auth`] relays the
//!   authentication when the upstream is TLS; [`stream`] names the sockets involved;
//! - [`session`] pumps bytes both ways, with [`frame`] finding message boundaries and
//!   [`protocol`] naming the few messages lockguard reads or writes;
//! - the session's record lives in `guard_core`'s registry, where the guard watches it;
//! - [`admin`] is the operator's port: a psql console and HTTP metrics/health/API.
//!
//! Modules other crates use (the binary, the integration tests, the benches, the fuzz checks)
//! are public; the rest are private. The `testing` feature opens [`session`]'s message
//! tracking to the allocation test.

pub mod admin;
mod auth;
mod client;
pub mod frame;
mod listener;
pub mod log_format;
pub mod net;
pub mod protocol;
mod scram;
mod secret;
#[cfg(feature = "testing")]
pub mod session;
#[cfg(not(feature = "testing"))]
mod session;
mod shared;
pub mod startup;
pub mod stats;
mod stream;
pub mod tls;
mod upstream;

pub use listener::{default_threads, Proxy};
pub use shared::GuardHandle;
pub(crate) use shared::Shared;
