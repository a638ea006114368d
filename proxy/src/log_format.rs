//! How the text log format writes field values: with control characters escaped.
//!
//! Logged values come from clients (user, database, application_name, statements) and from
//! operators (console user names). A newline in one of them would otherwise start a new line
//! that looks exactly like a real log or audit line to anyone reading or parsing the log. The
//! JSON format escapes by itself; this does the same for the text format, field by field, so
//! one event is always one line.

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::FormatFields;

/// Formats event and span fields as `message name=value ...`, like the default formatter, with
/// every control character (and the Unicode line and paragraph separators) in a value written
/// as an escape (`\n`, `\r`, `\t`, `\u{1b}`).
#[derive(Debug, Default, Clone, Copy)]
pub struct EscapedFields;

impl<'writer> FormatFields<'writer> for EscapedFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'writer>, fields: R) -> fmt::Result {
        let mut visitor = EscapingVisitor {
            writer,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct EscapingVisitor<'writer> {
    writer: Writer<'writer>,
    first: bool,
    result: fmt::Result,
}

impl Visit for EscapingVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        // As the default formatter does: the message bare, other strings quoted.
        if field.name() == "message" {
            self.record_debug(field, &format_args!("{value}"));
        } else {
            self.record_debug(field, &value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.result.is_err() || field.name().starts_with("log.") {
            return;
        }
        self.result = (|| {
            if !self.first {
                self.writer.write_char(' ')?;
            }
            self.first = false;
            if field.name() != "message" {
                self.writer.write_str(field.name())?;
                self.writer.write_char('=')?;
            }
            write!(Escaping(&mut self.writer), "{value:?}")
        })();
    }
}

/// Passes text through, writing control characters as escapes.
struct Escaping<'a, W: fmt::Write>(&'a mut W);

impl<W: fmt::Write> fmt::Write for Escaping<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        // The common case, printable ASCII (addresses, numbers, names), passes in one write.
        if s.bytes().all(|b| (b' '..=b'~').contains(&b)) {
            return self.0.write_str(s);
        }
        let mut rest = s;
        while let Some(at) = rest.find(needs_escape) {
            self.0.write_str(&rest[..at])?;
            let c = rest[at..].chars().next().unwrap_or_default();
            match c {
                '\n' => self.0.write_str("\\n")?,
                '\r' => self.0.write_str("\\r")?,
                '\t' => self.0.write_str("\\t")?,
                other => write!(self.0, "\\u{{{:x}}}", u32::from(other))?,
            }
            rest = &rest[at + c.len_utf8()..];
        }
        self.0.write_str(rest)
    }
}

fn needs_escape(c: char) -> bool {
    c.is_control() || c == '\u{2028}' || c == '\u{2029}'
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::fmt::MakeWriter;

    use super::*;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("capture lock").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Captured {
            self.clone()
        }
    }

    fn log_text(emit: impl FnOnce()) -> String {
        let captured = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .fmt_fields(EscapedFields)
            .with_ansi(false)
            .with_writer(captured.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, emit);
        let bytes = captured.0.lock().expect("capture lock").clone();
        String::from_utf8(bytes).expect("utf-8 log")
    }

    #[test]
    fn a_newline_in_a_value_cannot_start_a_forged_line() {
        let user = "alice\n2026-01-01T00:00:00Z  WARN lockguard: forged audit line";
        let text = log_text(|| {
            let span = tracing::info_span!("session", client = %"10.0.0.1:5\r\n");
            let _entered = span.enter();
            tracing::warn!(user = %user, application = "app\u{1b}[2J", "client said {}", "hi\nthere");
        });
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.contains(r"user=alice\n2026-01-01"), "{text}");
        assert!(text.contains(r#"application="app\u{1b}[2J""#), "{text}");
        assert!(text.contains(r"client said hi\nthere"), "{text}");
        assert!(text.contains(r"client=10.0.0.1:5\r\n"), "{text}");
    }

    #[test]
    fn ordinary_values_read_as_the_default_format() {
        let text = log_text(|| tracing::info!(pid = 42, db = %"app", name = "x y", "started"));
        assert!(
            text.contains(r#"started pid=42 db=app name="x y""#),
            "{text}"
        );
    }
}
