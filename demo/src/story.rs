//! The narration.

use std::time::Instant;

/// The narration: a timeline with elapsed time, coloured by who speaks.
pub(crate) struct Story {
    start: Instant,
    color: bool,
}

impl Story {
    pub(crate) fn new(color: bool) -> Story {
        Story {
            start: Instant::now(),
            color,
        }
    }

    fn paint(&self, code: &str, text: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    }

    fn line(&self, code: &str, text: &str) {
        let at = format!("[+{:6.2}s]", self.start.elapsed().as_secs_f64());
        println!("{} {}", self.paint("2", &at), self.paint(code, text));
    }

    pub(crate) fn title(&self, text: &str) {
        println!("{}", self.paint("1", &format!("== {text}")));
    }

    pub(crate) fn act(&self, text: &str) {
        println!();
        println!("{}", self.paint("1;4", text));
    }

    pub(crate) fn note(&self, text: &str) {
        self.line("0", text);
    }

    pub(crate) fn app(&self, text: &str) {
        self.line("33", text);
    }

    pub(crate) fn login(&self, text: &str) {
        self.line("36", text);
    }

    pub(crate) fn guard(&self, text: &str) {
        self.line("32;1", text);
    }

    pub(crate) fn problem(&self, text: &str) {
        self.line("31;1", text);
    }

    pub(crate) fn console(&self, command: &str, row: &[(String, String)]) {
        self.line("35", &format!("admin console> {command}"));
        for (name, value) in row.iter().filter(|(_, v)| !v.is_empty()) {
            println!("{:14}{name:>18} | {value}", "");
        }
    }

    pub(crate) fn result(&self, text: &str) {
        println!("{}", self.paint("1", text));
    }
}
