//! Fuzzes `lockguard::admin::Command::parse`, which reads whatever an operator (or anyone who
//! reaches the admin port) types. Besides "no panic, whatever the text":
//! - a parsed command parses again from its canonical spelling to the same command;
//! - keywords are case-insensitive and surrounding whitespace does not matter;
//! - a refusal is always a syntax error, and its message stays short however long the input
//!   (it quotes at most a bounded piece of it).

use lockguard::admin::{AdminError, Command, KillTarget};

/// Longest syntax error message: fixed text plus at most 64 quoted characters, each escaped
/// to at most 10 bytes (`\u{10ffff}`).
const MAX_ERROR_LEN: usize = 1024;

/// How an operator would type `command`.
fn canonical(command: &Command) -> String {
    match command {
        Command::ShowClients => "SHOW CLIENTS".into(),
        Command::ShowLocks => "SHOW LOCKS".into(),
        Command::ShowEvents => "SHOW EVENTS".into(),
        Command::ShowStats => "SHOW STATS".into(),
        Command::ShowConfig => "SHOW CONFIG".into(),
        Command::ShowVersion => "SHOW VERSION".into(),
        Command::ShowRules => "SHOW RULES".into(),
        Command::Kill(KillTarget::Client(id)) => format!("KILL {id}"),
        Command::Kill(KillTarget::Pid(pid)) => format!("KILL PID {pid}"),
        Command::Reload => "RELOAD".into(),
        Command::SetDryRun(on) => format!("SET dry_run = {}", if *on { "on" } else { "off" }),
    }
}

/// The checks for one fuzz input.
pub fn check(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    match Command::parse(&text) {
        Ok(command) => {
            assert_eq!(Command::parse(&canonical(&command)), Ok(command.clone()));
            assert_eq!(
                Command::parse(&text.to_ascii_lowercase()),
                Ok(command.clone()),
                "lower case"
            );
            assert_eq!(
                Command::parse(&text.to_ascii_uppercase()),
                Ok(command.clone()),
                "upper case"
            );
            assert_eq!(
                Command::parse(&format!(" \t{text}\n ")),
                Ok(command),
                "surrounding whitespace"
            );
        }
        Err(AdminError::Syntax(message)) => {
            assert!(
                message.len() <= MAX_ERROR_LEN,
                "a {}-byte error for {} bytes of input",
                message.len(),
                text.len()
            );
        }
        Err(other) => panic!("the parser returned a non-syntax error: {other:?}"),
    }
}
