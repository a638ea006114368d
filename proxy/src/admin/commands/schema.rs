//! The result tables: each command's documented columns (scripts depend on the names) and
//! the cells the console and the HTTP API render.

use std::time::Duration;

use super::parse::Command;

/// The type of a result column (PostgreSQL's `text`, `int4`, `int8`, `float8`, `bool`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnType {
    Text,
    Int4,
    Int8,
    Float8,
    Bool,
}

/// A result column: its documented name and type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Column {
    pub name: &'static str,
    pub kind: ColumnType,
}

const fn col(name: &'static str, kind: ColumnType) -> Column {
    Column { name, kind }
}

use ColumnType::{Bool, Float8, Int4, Int8, Text};

/// `SHOW CLIENTS` and `GET /api/clients`.
pub const CLIENTS: &[Column] = &[
    col("id", Int8),
    col("client_addr", Text),
    col("client_port", Int4),
    col("user", Text),
    col("database", Text),
    col("application_name", Text),
    col("backend_pid", Int4),
    col("state", Text),
    col("xact_age_s", Float8),
    col("state_age_s", Float8),
    col("protected_locks", Int4),
    col("waiters", Int4),
    col("last_statement", Text),
    // Added last, so that scripts reading the columns by position keep working.
    col("rules", Text),
];

/// `SHOW LOCKS`: one row per protected lock held by a proxied session.
pub const LOCKS: &[Column] = &[
    col("client_id", Int8),
    col("backend_pid", Int4),
    col("table", Text),
    col("mode", Text),
    col("waiters", Int4),
    col("rule", Text),
];

/// `SHOW EVENTS` and `GET /api/events`: the audit ring, newest first.
pub const EVENTS: &[Column] = &[
    col("time", Text),
    col("client_id", Int8),
    col("backend_pid", Int4),
    col("trigger", Text),
    col("cause", Text),
    col("outcome", Text),
    col("locks", Text),
    col("waiters", Int4),
    col("state", Text),
    col("idle_ms", Int8),
    col("xact_ms", Int8),
    col("user", Text),
    col("database", Text),
    col("client_addr", Text),
    col("application_name", Text),
    col("last_statement", Text),
    col("error", Text),
    col("summary", Text),
    col("rules", Text),
];

/// `SHOW RULES` and `GET /api/rules`: every guard rule in match order (the flat `[guard]`
/// keys' `default` last), its settings, the live sessions it selects and those holding a
/// protected lock it governs.
pub const RULES: &[Column] = &[
    col("position", Int4),
    col("name", Text),
    col("tables", Text),
    col("databases", Text),
    col("users", Text),
    col("applications", Text),
    col("exempt_users", Text),
    col("exempt_applications", Text),
    col("idle_in_transaction_timeout", Text),
    col("failed_transaction_timeout", Text),
    col("on_client_loss", Text),
    col("inflight_grace", Text),
    col("require_waiters", Bool),
    col("dry_run", Bool),
    col("max_blocking", Text),
    col("blocking_action", Text),
    col("sessions", Int4),
    col("holding", Int4),
];

/// `SHOW STATS`: one counter per row.
pub const STATS: &[Column] = &[col("name", Text), col("value", Int8)];

/// `SHOW CONFIG`: every setting, secrets masked, and whether RELOAD changes it.
pub const CONFIG: &[Column] = &[col("key", Text), col("value", Text), col("live", Bool)];

/// `SHOW VERSION`.
pub const VERSION: &[Column] = &[col("version", Text)];

/// `KILL`: what happened.
pub const KILL: &[Column] = &[
    col("client_id", Int8),
    col("backend_pid", Int4),
    col("outcome", Text),
    col("detail", Text),
];

/// `RELOAD`: each setting the file changed, and whether it took effect.
pub const RELOAD: &[Column] = &[
    col("key", Text),
    col("old_value", Text),
    col("new_value", Text),
    col("status", Text),
];

/// `SET dry_run`.
pub const SET: &[Column] = &[col("name", Text), col("value", Text), col("previous", Text)];

/// One cell.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Text(String),
    Int(i64),
    Float(f64),
    Bool(bool),
}

impl Value {
    pub(crate) fn text(s: impl Into<String>) -> Value {
        Value::Text(s.into())
    }

    pub(crate) fn opt_text(s: Option<impl Into<String>>) -> Value {
        s.map_or(Value::Null, |s| Value::Text(s.into()))
    }

    pub(crate) fn int(n: impl TryInto<i64>) -> Value {
        n.try_into().map_or(Value::Null, Value::Int)
    }

    pub(crate) fn opt_int(n: Option<impl TryInto<i64>>) -> Value {
        n.map_or(Value::Null, Value::int)
    }

    /// Seconds with millisecond precision.
    pub(crate) fn seconds(d: Duration) -> Value {
        Value::Float(d.as_millis() as f64 / 1000.0)
    }
}

/// A command's answer: a result set with the command's columns.
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    pub tag: &'static str,
    pub columns: &'static [Column],
    pub rows: Vec<Vec<Value>>,
}

impl Table {
    pub(crate) fn new(command: &Command) -> Table {
        Table {
            tag: command.tag(),
            columns: command.columns(),
            rows: Vec::new(),
        }
    }

    pub(crate) fn with_rows(command: &Command, rows: Vec<Vec<Value>>) -> Table {
        Table {
            rows,
            ..Table::new(command)
        }
    }

    /// The rows as JSON objects keyed by column name (the HTTP API's form).
    pub fn to_json(&self) -> serde_json::Value {
        let rows = self
            .rows
            .iter()
            .map(|row| {
                let object = self
                    .columns
                    .iter()
                    .zip(row)
                    .map(|(column, value)| {
                        let json = match value {
                            Value::Null => serde_json::Value::Null,
                            Value::Text(s) => serde_json::Value::from(s.as_str()),
                            Value::Int(n) => serde_json::Value::from(*n),
                            Value::Float(x) => serde_json::Value::from(*x),
                            Value::Bool(b) => serde_json::Value::from(*b),
                        };
                        (column.name.to_owned(), json)
                    })
                    .collect();
                serde_json::Value::Object(object)
            })
            .collect();
        serde_json::Value::Array(rows)
    }
}

impl Command {
    /// The columns of the command's result, known before it runs (the extended protocol
    /// describes a statement before executing it).
    pub fn columns(&self) -> &'static [Column] {
        match self {
            Command::ShowClients => CLIENTS,
            Command::ShowLocks => LOCKS,
            Command::ShowEvents => EVENTS,
            Command::ShowStats => STATS,
            Command::ShowConfig => CONFIG,
            Command::ShowVersion => VERSION,
            Command::ShowRules => RULES,
            Command::Kill(_) => KILL,
            Command::Reload => RELOAD,
            Command::SetDryRun(_) => SET,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::commands::KillTarget;

    #[test]
    fn tables_render_as_json_objects() {
        let table = Table::with_rows(
            &Command::Kill(KillTarget::Client(3)),
            vec![vec![
                Value::Int(3),
                Value::Null,
                Value::text("not_found"),
                Value::text("no live session with client 3"),
            ]],
        );
        assert_eq!(table.tag, "KILL");
        assert_eq!(
            table.to_json(),
            serde_json::json!([{
                "client_id": 3,
                "backend_pid": null,
                "outcome": "not_found",
                "detail": "no live session with client 3",
            }])
        );
    }
}
