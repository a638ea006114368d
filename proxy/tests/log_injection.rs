//! Values a client chooses cannot forge log lines: the real binary, text format, logs a
//! startup whose user name holds a newline and a fake log line as one escaped line.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use lockguard::protocol::frontend::startup_message;
use lockguard::protocol::startup_code::PROTOCOL_3_0;

const FORGED: &str = "2026-01-01T00:00:00.000000Z  WARN lockguard: FORGED audit line";

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn startup_packet(user: &str) -> Vec<u8> {
    startup_message(PROTOCOL_3_0, &[("user", user), ("database", "app")])
}

/// The line without ANSI colour sequences (`ESC [ ... m`), which a terminal-less stderr may
/// still get.
fn without_colours(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[test]
fn a_newline_in_a_user_name_is_escaped_in_the_text_log() {
    // The upstream refuses, so the proxy logs the client's user name in its warning.
    let child = Command::new(env!("CARGO_BIN_EXE_lockguard"))
        .args(["--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1"])
        .args(["--log-format", "text"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start lockguard");
    let mut child = Running(child);
    let stderr = child.0.stderr.take().expect("piped stderr");
    let (send, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if send.send(without_colours(&line)).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let mut next_line = |what: &str| -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match lines.recv_timeout(left) {
                Ok(line) => {
                    seen.push(line.clone());
                    if line.contains(what) {
                        return line;
                    }
                }
                Err(_) => break,
            }
        }
        panic!("no log line with {what:?}; saw:\n{}", seen.join("\n"));
    };
    let accepting = next_line("lockguard is accepting connections");
    let addr = accepting
        .split_whitespace()
        .find_map(|field| field.strip_prefix("listen="))
        .expect("listen address in the log line")
        .to_owned();

    let mut client = TcpStream::connect(&addr).expect("connect to lockguard");
    client
        .write_all(&startup_packet(&format!("evil\n{FORGED}")))
        .expect("send startup");
    let mut answer = Vec::new();
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    client.read_to_end(&mut answer).expect("lockguard's answer");
    assert_eq!(answer.first(), Some(&b'E'), "an ErrorResponse: {answer:?}");

    // The warning about the refused upstream carries the user name, escaped, on its own line.
    let warning = next_line("user=evil");
    assert!(
        warning.contains(&format!(r"user=evil\n{FORGED}")),
        "{warning}"
    );
    drop(child);
    let rest: Vec<String> = lines.try_iter().collect();
    assert!(
        !seen.iter().chain(&rest).any(|l| l.starts_with(FORGED)),
        "a forged line appeared:\n{}",
        seen.join("\n")
    );
}
