//! tests

pub mod cluster;
pub mod guard_support;
pub mod proxy;
pub mod raw;
pub mod certs;
