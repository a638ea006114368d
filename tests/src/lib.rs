//! The integration-test harness: a throwaway PostgreSQL, an in-process proxy, and helpers.

pub mod admin;
pub mod app;
pub mod certs;
pub mod cluster;
pub mod direct_guard;
pub mod guard_support;
pub mod http;
pub mod logs;
pub mod pgbouncer;
pub mod prometheus;
pub mod proxy;
pub mod psql;
pub mod query;
pub mod raw;
pub mod resources;
pub mod tls;
