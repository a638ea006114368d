//! The admin commands: the parser (a pure function, also run by a fuzz target), the result
//! tables with their stable column names, and the execution against the proxy's state. The
//! console sends every statement here; the HTTP endpoint runs the same commands and renders
//! the same tables as JSON.
//!
//! - [`parse`]: statement text → [`Command`];
//! - [`error`]: why a command was refused, as SQLSTATE and HTTP status;
//! - [`schema`]: each command's columns and the [`Table`] it answers with;
//! - [`execute`]: [`Admin::execute`](super::Admin::execute) and the actions behind it.

mod error;
mod execute;
mod parse;
mod schema;

pub use error::AdminError;
pub use execute::{version, ConfigChange, KillReport, KillResult, Readiness, READINESS_REUSE};
pub use parse::{Command, KillTarget, COMMANDS_HINT};
pub use schema::{
    Column, ColumnType, Table, Value, CLIENTS, CONFIG, EVENTS, KILL, LOCKS, RELOAD, SET, STATS,
    VERSION,
};
