//! The console's statement syntax: keywords in any case, one optional semicolon, and an
//! error that quotes bad input back bounded.

use std::fmt;

use guard_core::SessionId;

use super::error::AdminError;

/// The hint of every syntax error: all commands, as an operator types them.
pub const COMMANDS_HINT: &str = "admin commands: SHOW CLIENTS | SHOW LOCKS | SHOW EVENTS | \
SHOW STATS | SHOW CONFIG | SHOW VERSION | SHOW RULES | KILL <client_id> | KILL PID <backend_pid> | RELOAD | \
SET dry_run = on|off";

/// Longest piece of an unknown command quoted back in the error, in characters.
const MAX_ECHO: usize = 64;

/// One admin command, as parsed from the console (or built by the HTTP endpoint).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    ShowClients,
    ShowLocks,
    ShowEvents,
    ShowStats,
    ShowConfig,
    ShowVersion,
    /// `SHOW RULES`: the guard's rules in match order.
    ShowRules,
    Kill(KillTarget),
    Reload,
    SetDryRun(bool),
}

/// Which session `KILL` means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KillTarget {
    /// `KILL <client_id>`: the `id` column of `SHOW CLIENTS`.
    Client(SessionId),
    /// `KILL PID <backend_pid>`: the PostgreSQL backend serving the session.
    Pid(i32),
}

impl fmt::Display for KillTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KillTarget::Client(id) => write!(f, "client {id}"),
            KillTarget::Pid(pid) => write!(f, "backend pid {pid}"),
        }
    }
}

fn syntax(message: impl Into<String>) -> AdminError {
    AdminError::Syntax(message.into())
}

/// `text` cut to [`MAX_ECHO`] characters, for quoting input back safely.
fn echo(text: &str) -> String {
    let mut out: String = text.chars().take(MAX_ECHO).collect();
    if text.chars().nth(MAX_ECHO).is_some() {
        out.push_str("...");
    }
    out
}

fn is(word: &str, keyword: &str) -> bool {
    word.eq_ignore_ascii_case(keyword)
}

impl Command {
    /// Parses one console statement: keywords in any case, words separated by any
    /// whitespace, one optional trailing semicolon. Never panics, whatever the input.
    pub fn parse(text: &str) -> Result<Command, AdminError> {
        let body = text.trim();
        let body = body.strip_suffix(';').unwrap_or(body);
        // `SET dry_run=on`: the `=` may touch its neighbours.
        let spaced = body.replace('=', " = ");
        let words: Vec<&str> = spaced.split_whitespace().collect();
        match words.as_slice() {
            [] => Err(syntax("empty admin command")),
            [show, what] if is(show, "SHOW") => Self::parse_show(what),
            [show, ..] if is(show, "SHOW") => Err(syntax(format!(
                "SHOW takes one word, not {:?}",
                echo(body)
            ))),
            [kill, id] if is(kill, "KILL") => id
                .parse::<SessionId>()
                .map(|id| Command::Kill(KillTarget::Client(id)))
                .map_err(|_| {
                    syntax(format!(
                        "KILL needs a client id (the id column of SHOW CLIENTS) or PID <backend_pid>, not {:?}",
                        echo(id)
                    ))
                }),
            [kill, pid, number] if is(kill, "KILL") && is(pid, "PID") => number
                .parse::<i32>()
                .ok()
                .filter(|pid| *pid > 0)
                .map(|pid| Command::Kill(KillTarget::Pid(pid)))
                .ok_or_else(|| {
                    syntax(format!(
                        "KILL PID needs a backend pid (a positive number), not {:?}",
                        echo(number)
                    ))
                }),
            [kill, ..] if is(kill, "KILL") => Err(syntax(
                "KILL needs a client id (KILL 7) or a backend pid (KILL PID 12345)",
            )),
            [reload] if is(reload, "RELOAD") => Ok(Command::Reload),
            [set, name, to, value]
                if is(set, "SET") && is(name, "dry_run") && (*to == "=" || is(to, "TO")) =>
            {
                parse_switch(value).map(Command::SetDryRun).ok_or_else(|| {
                    syntax(format!("SET dry_run takes on or off, not {:?}", echo(value)))
                })
            }
            [set, ..] if is(set, "SET") => Err(syntax(
                "the only setting that can be SET is dry_run: SET dry_run = on|off",
            )),
            _ => Err(syntax(format!("unknown admin command {:?}", echo(body)))),
        }
    }

    fn parse_show(what: &str) -> Result<Command, AdminError> {
        let command = match what.to_ascii_uppercase().as_str() {
            "CLIENTS" => Command::ShowClients,
            "LOCKS" => Command::ShowLocks,
            "EVENTS" => Command::ShowEvents,
            "STATS" => Command::ShowStats,
            "CONFIG" => Command::ShowConfig,
            "VERSION" => Command::ShowVersion,
            "RULES" => Command::ShowRules,
            _ => {
                return Err(syntax(format!(
                "unknown SHOW {:?}; SHOW CLIENTS, LOCKS, EVENTS, STATS, CONFIG, VERSION or RULES",
                echo(what)
            )))
            }
        };
        Ok(command)
    }

    /// The command's name, as in messages and the command tag.
    pub fn name(&self) -> &'static str {
        match self {
            Command::ShowClients => "SHOW CLIENTS",
            Command::ShowLocks => "SHOW LOCKS",
            Command::ShowEvents => "SHOW EVENTS",
            Command::ShowStats => "SHOW STATS",
            Command::ShowConfig => "SHOW CONFIG",
            Command::ShowVersion => "SHOW VERSION",
            Command::ShowRules => "SHOW RULES",
            Command::Kill(_) => "KILL",
            Command::Reload => "RELOAD",
            Command::SetDryRun(_) => "SET",
        }
    }

    /// Whether only the `admin` role may run it (everything but SHOW).
    pub fn needs_admin(&self) -> bool {
        matches!(
            self,
            Command::Kill(_) | Command::Reload | Command::SetDryRun(_)
        )
    }

    /// The command tag the console sends (`SHOW`, `KILL`, ...).
    pub fn tag(&self) -> &'static str {
        self.name().split(' ').next().unwrap_or("SHOW")
    }
}

/// `on` / `off` and the other spellings PostgreSQL accepts for a boolean setting.
fn parse_switch(value: &str) -> Option<bool> {
    let value = value
        .strip_prefix('\'')
        .and_then(|v| v.strip_suffix('\''))
        .unwrap_or(value);
    match value.to_ascii_lowercase().as_str() {
        "on" | "true" | "yes" | "1" => Some(true),
        "off" | "false" | "no" | "0" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse_in_any_case_with_an_optional_semicolon() {
        assert_eq!(Command::parse("SHOW CLIENTS"), Ok(Command::ShowClients));
        assert_eq!(
            Command::parse("  show\tclients ;  "),
            Ok(Command::ShowClients)
        );
        assert_eq!(Command::parse("Show Locks;"), Ok(Command::ShowLocks));
        assert_eq!(Command::parse("show events"), Ok(Command::ShowEvents));
        assert_eq!(Command::parse("SHOW STATS"), Ok(Command::ShowStats));
        assert_eq!(Command::parse("show config"), Ok(Command::ShowConfig));
        assert_eq!(Command::parse("SHOW VERSION;"), Ok(Command::ShowVersion));
        assert_eq!(
            Command::parse("kill 42"),
            Ok(Command::Kill(KillTarget::Client(42)))
        );
        assert_eq!(
            Command::parse("KILL pid 1234;"),
            Ok(Command::Kill(KillTarget::Pid(1234)))
        );
        assert_eq!(Command::parse("reload"), Ok(Command::Reload));
        assert_eq!(
            Command::parse("SET dry_run = on"),
            Ok(Command::SetDryRun(true))
        );
        assert_eq!(
            Command::parse("set DRY_RUN=off;"),
            Ok(Command::SetDryRun(false))
        );
        assert_eq!(
            Command::parse("SET dry_run TO 'true'"),
            Ok(Command::SetDryRun(true))
        );
    }

    #[test]
    fn anything_else_is_a_syntax_error_with_the_command_list() {
        for bad in [
            "",
            ";",
            "SELECT 1",
            "SHOW",
            "SHOW POOLS",
            "SHOW CLIENTS EXTRA",
            "KILL",
            "KILL -1",
            "KILL PID 0",
            "KILL PID x",
            "KILL 1 2 3",
            "RELOAD NOW",
            "SET dry_run = maybe",
            "SET statement_timeout = 0",
            "SHOW CLIENTS;;",
        ] {
            let err = Command::parse(bad).expect_err(bad);
            assert_eq!(err.sqlstate(), "42601", "{bad}");
            assert_eq!(err.hint(), Some(COMMANDS_HINT), "{bad}");
        }
    }

    #[test]
    fn unknown_input_is_echoed_bounded_and_never_panics() {
        let long = "é".repeat(1000);
        let AdminError::Syntax(message) = Command::parse(&long).unwrap_err() else {
            panic!("not a syntax error");
        };
        assert!(message.chars().count() < 120, "{message}");
        for weird in [
            "\u{0}",
            "=",
            "= = =",
            "SET =",
            "KILL PID",
            "\u{feff}SHOW CLIENTS",
        ] {
            let _ = Command::parse(weird);
        }
    }

    #[test]
    fn only_show_is_allowed_to_monitors() {
        assert!(!Command::ShowClients.needs_admin());
        assert!(Command::Kill(KillTarget::Pid(1)).needs_admin());
        assert!(Command::Reload.needs_admin());
        assert!(Command::SetDryRun(true).needs_admin());
    }
}
