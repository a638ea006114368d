//! Why an admin command was refused or failed.

use super::parse::COMMANDS_HINT;

/// Why an admin command was refused or failed. Each maps to a SQLSTATE for the console and an
/// HTTP status for the endpoint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdminError {
    /// Not a command, or a malformed one.
    #[error("{0}")]
    Syntax(String),
    /// The command needs the `admin` role.
    #[error("permission denied: {command} needs role admin; user {user:?} has role {role}")]
    PermissionDenied {
        command: &'static str,
        user: String,
        role: &'static str,
    },
    /// The command cannot run in this setup (no guard, no config file to re-read).
    #[error("{0}")]
    Unavailable(String),
    /// RELOAD found a problem; nothing was changed.
    #[error("RELOAD failed, the running configuration is unchanged: {0}")]
    Reload(String),
}

impl AdminError {
    /// The SQLSTATE the console reports.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            AdminError::Syntax(_) => "42601",
            AdminError::PermissionDenied { .. } => "42501",
            AdminError::Unavailable(_) => "55000",
            AdminError::Reload(_) => "F0000",
        }
    }

    /// A hint for the operator, where one helps.
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            AdminError::Syntax(_) => Some(COMMANDS_HINT),
            _ => None,
        }
    }
}
