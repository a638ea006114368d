//! Which keys hold secrets, and where in a config text their values are, so that nothing
//! that shows configuration (SHOW CONFIG, RELOAD's report, parse errors in the log, RELOAD's
//! error and `check-config`) ever shows a secret's value.

use std::ops::Range;

use toml_parser::decoder::Encoding;
use toml_parser::parser::{EventReceiver, RecursionGuard};
use toml_parser::{ErrorSink, Source, Span};

/// Keys whose value is a secret, as dotted paths without array indices
/// (`admin.users[2].password` is `admin.users.password`). `guard.dsn` may carry the guard's
/// password inside a connection string: shown values mask only that password, parse errors
/// hide the whole value.
pub const SECRET_KEYS: &[&str] = &["admin.api_token", "admin.users.password", "guard.dsn"];

/// Whether the value at `path` (e.g. `admin.users[0].password`) is a secret.
pub fn is_secret_key(path: &str) -> bool {
    let path = without_indices(path);
    SECRET_KEYS.contains(&path.as_str())
}

/// Whether the value at `path` is a secret or may contain one: an inline table or array
/// such as `admin.users = [{ name = "a", password = "..." }]`.
fn may_hold_secret(path: &str) -> bool {
    SECRET_KEYS.iter().any(|secret| {
        *secret == path
            || secret
                .strip_prefix(path)
                .is_some_and(|rest| rest.starts_with('.'))
    })
}

/// `admin.users[0].password` → `admin.users.password`.
fn without_indices(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut depth = 0usize;
    for c in path.chars() {
        match c {
            '[' => depth += 1,
            ']' => depth = depth.saturating_sub(1),
            c if depth == 0 => out.push(c),
            _ => {}
        }
    }
    out
}

/// A stretch of config text that holds a secret's value: from its key to the end of its
/// value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SecretSpan {
    /// The key, as a dotted path (what an error may name).
    pub key: String,
    /// Bytes of the whole entry, key included.
    pub entry: Range<usize>,
    /// Bytes of the values in it: the scalars (and what the parser could not read) after
    /// `=`, not the keys of an inline table.
    pub values: Vec<Range<usize>>,
}

/// Every place in `text` where a secret's value is, or may be. Works on text that does not
/// parse (that is when an error is shown): it follows the TOML parser's own recovering event
/// stream, and adds every line that looks like `password = ...`, `api_token = ...` or
/// `dsn = ...` whatever table it seems to be in, in case broken syntax hides the table.
pub(crate) fn secret_spans(text: &str) -> Vec<SecretSpan> {
    let source = Source::new(text);
    let tokens = source.lex().into_vec();
    let mut finder = Finder {
        text,
        ..Finder::default()
    };
    {
        // The same nesting bound as the toml crate's own parser.
        let mut guarded = RecursionGuard::new(&mut finder, 80);
        toml_parser::parser::parse_document(&tokens, &mut guarded, &mut ());
    }
    finder.finish_entry();
    let mut spans = finder.spans;
    let backstop: Vec<SecretSpan> = lines_naming_a_secret(text)
        .into_iter()
        .filter(|line| {
            !spans
                .iter()
                .any(|s| s.entry.start < line.entry.end && line.entry.start < s.entry.end)
        })
        .collect();
    spans.extend(backstop);
    spans
}

/// `text` with every quoted part (`` `...` `` or `"..."`) whose content occurs in `value`,
/// and `value` itself, replaced by `********`: what a parser's message about a secret's value
/// may quote of it.
pub(crate) fn scrub(message: &str, value: &str) -> String {
    const MASK: &str = "********";
    let value = value.trim();
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(open) = rest.find(['`', '"']) {
        let quote = rest[open..].chars().next().unwrap_or('"');
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        match after.find(quote) {
            Some(close) => {
                let inner = &after[..close];
                if !inner.is_empty() && value.contains(inner) {
                    out.push(quote);
                    out.push_str(MASK);
                    out.push(quote);
                } else {
                    out.push(quote);
                    out.push_str(inner);
                    out.push(quote);
                }
                rest = &after[close + 1..];
            }
            None => {
                // An unpaired quote: the rest may be part of the value.
                out.push(quote);
                out.push_str(after);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    if !value.is_empty() {
        out = out.replace(value, MASK);
    }
    out
}

/// Follows the parser's events to find each top-level `key = value` entry and the table it
/// belongs to.
#[derive(Default)]
struct Finder<'t> {
    text: &'t str,
    /// The current `[table]` / `[[array.table]]` path.
    table: Vec<String>,
    /// Between a table header's brackets.
    in_header: bool,
    /// The entry being read: its key path so far, where it starts, where its value starts.
    entry: Option<Entry>,
    /// Nesting of arrays and inline tables inside the entry's value.
    depth: usize,
    spans: Vec<SecretSpan>,
}

struct Entry {
    keys: Vec<String>,
    start: usize,
    value_start: Option<usize>,
    values: Vec<Range<usize>>,
    end: usize,
}

impl Finder<'_> {
    fn key_text(&self, span: Span, encoding: Option<Encoding>) -> String {
        let raw = self.text.get(span.start()..span.end()).unwrap_or_default();
        match encoding {
            Some(_) => raw.trim_matches(|c| c == '"' || c == '\'').to_owned(),
            None => raw.trim().to_owned(),
        }
    }

    fn extend(&mut self, span: Span) {
        if let Some(entry) = &mut self.entry {
            entry.end = entry.end.max(span.end());
        }
    }

    /// A scalar, or bytes the parser could not read, inside the entry's value.
    fn value(&mut self, span: Span) {
        if let Some(entry) = &mut self.entry {
            entry.end = entry.end.max(span.end());
            if entry.value_start.is_some() {
                entry.values.push(span.start()..span.end());
            }
        }
    }

    fn finish_entry(&mut self) {
        let Some(entry) = self.entry.take() else {
            return;
        };
        self.depth = 0;
        let mut path = self.table.clone();
        path.extend(entry.keys);
        let key = path.join(".");
        if may_hold_secret(&key) {
            self.spans.push(SecretSpan {
                key,
                entry: entry.start..entry.end,
                values: entry.values,
            });
        }
    }

    fn open_header(&mut self) {
        self.finish_entry();
        self.table.clear();
        self.in_header = true;
    }
}

impl EventReceiver for Finder<'_> {
    fn std_table_open(&mut self, _span: Span, _error: &mut dyn ErrorSink) {
        self.open_header();
    }
    fn std_table_close(&mut self, _span: Span, _error: &mut dyn ErrorSink) {
        self.in_header = false;
    }
    fn array_table_open(&mut self, _span: Span, _error: &mut dyn ErrorSink) {
        self.open_header();
    }
    fn array_table_close(&mut self, _span: Span, _error: &mut dyn ErrorSink) {
        self.in_header = false;
    }
    fn inline_table_open(&mut self, span: Span, _error: &mut dyn ErrorSink) -> bool {
        self.depth += 1;
        self.extend(span);
        true
    }
    fn inline_table_close(&mut self, span: Span, _error: &mut dyn ErrorSink) {
        self.depth = self.depth.saturating_sub(1);
        self.extend(span);
    }
    fn array_open(&mut self, span: Span, _error: &mut dyn ErrorSink) -> bool {
        self.depth += 1;
        self.extend(span);
        true
    }
    fn array_close(&mut self, span: Span, _error: &mut dyn ErrorSink) {
        self.depth = self.depth.saturating_sub(1);
        self.extend(span);
    }
    fn simple_key(&mut self, span: Span, encoding: Option<Encoding>, _error: &mut dyn ErrorSink) {
        let key = self.key_text(span, encoding);
        if self.in_header {
            self.table.push(key);
            return;
        }
        match &mut self.entry {
            // Keys inside an inline table's value belong to the entry.
            Some(entry) if entry.value_start.is_some() => entry.end = entry.end.max(span.end()),
            Some(entry) => {
                entry.keys.push(key);
                entry.end = entry.end.max(span.end());
            }
            None => {
                self.entry = Some(Entry {
                    keys: vec![key],
                    start: span.start(),
                    value_start: None,
                    values: Vec::new(),
                    end: span.end(),
                })
            }
        }
    }
    fn key_sep(&mut self, span: Span, _error: &mut dyn ErrorSink) {
        self.extend(span);
    }
    fn key_val_sep(&mut self, span: Span, _error: &mut dyn ErrorSink) {
        if let Some(entry) = &mut self.entry {
            if entry.value_start.is_none() {
                entry.value_start = Some(span.end());
            }
            entry.end = entry.end.max(span.end());
        }
    }
    fn scalar(&mut self, span: Span, _encoding: Option<Encoding>, _error: &mut dyn ErrorSink) {
        self.value(span);
    }
    fn value_sep(&mut self, span: Span, _error: &mut dyn ErrorSink) {
        self.extend(span);
    }
    fn comment(&mut self, span: Span, _error: &mut dyn ErrorSink) {
        if self.depth > 0 {
            self.extend(span);
        }
    }
    fn newline(&mut self, span: Span, _error: &mut dyn ErrorSink) {
        if self.depth > 0 {
            self.extend(span);
        } else {
            self.finish_entry();
        }
    }
    fn error(&mut self, span: Span, _error: &mut dyn ErrorSink) {
        self.value(span);
    }
}

/// Lines that assign to a key named like a secret (`password`, `api_token`, `dsn`), in any
/// table, quoted or not: a backstop for text so broken that the table is unclear.
fn lines_naming_a_secret(text: &str) -> Vec<SecretSpan> {
    let leaves: Vec<&str> = SECRET_KEYS
        .iter()
        .filter_map(|k| k.rsplit('.').next())
        .collect();
    let mut spans = Vec::new();
    let mut start = 0;
    for line in text.split_inclusive('\n') {
        let end = start + line.len();
        for leaf in &leaves {
            if let Some(value_at) = assignment_to(line, leaf) {
                spans.push(SecretSpan {
                    key: (*leaf).to_owned(),
                    entry: start..end,
                    values: std::iter::once(start + value_at..end).collect(),
                });
            }
        }
        start = end;
    }
    spans
}

/// Where the value starts if `line` assigns to a key whose last part is `leaf`
/// (`leaf =`, `"leaf" =`, `x.leaf=`, `{ leaf = ...`).
fn assignment_to(line: &str, leaf: &str) -> Option<usize> {
    let bytes = line.as_bytes();
    let mut from = 0;
    while let Some(found) = line[from..].find(leaf) {
        let at = from + found;
        from = at + leaf.len();
        let before = at.checked_sub(1).map(|i| bytes[i]);
        if before.is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
            continue;
        }
        let mut i = at + leaf.len();
        if matches!(bytes.get(i), Some(b'"' | b'\'')) {
            i += 1;
        }
        while matches!(bytes.get(i), Some(b' ' | b'\t')) {
            i += 1;
        }
        if bytes.get(i) == Some(&b'=') {
            return Some(i + 1);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret_text(text: &str) -> Vec<(String, String)> {
        secret_spans(text)
            .into_iter()
            .flat_map(|s| {
                s.values
                    .into_iter()
                    .map(move |v| (s.key.clone(), text[v].trim().to_owned()))
            })
            .collect()
    }

    #[test]
    fn secret_keys_are_recognised_with_or_without_indices() {
        assert!(is_secret_key("admin.api_token"));
        assert!(is_secret_key("admin.users[3].password"));
        assert!(is_secret_key("guard.dsn"));
        assert!(!is_secret_key("admin.api_token_env"));
        assert!(!is_secret_key("admin.users[0].password_env"));
        assert!(!is_secret_key("admin.users[0].name"));
        assert!(may_hold_secret("admin.users"));
        assert!(may_hold_secret("admin"));
        assert!(!may_hold_secret("admin.user"));
        assert!(!may_hold_secret("proxy"));
    }

    #[test]
    fn values_of_secrets_are_found_in_valid_and_broken_text() {
        let found = secret_text(
            "[admin]\napi_token = \"tok\"\nlisten = \"127.0.0.1:1\"\n\
             [[admin.users]]\nname = \"a\"\npassword = 'pw'\npassword_env = \"X\"\n",
        );
        assert!(
            found.contains(&("admin.api_token".into(), "\"tok\"".into())),
            "{found:?}"
        );
        assert!(
            found.contains(&("admin.users.password".into(), "'pw'".into())),
            "{found:?}"
        );
        assert!(!found
            .iter()
            .any(|(_, v)| v.contains("127.0.0.1") || v.contains('X')));
        // An unterminated string, a value of the wrong type, an inline table.
        for text in [
            "[admin]\napi_token = \"s3cr\n",
            "[admin]\napi_token = 12345\n",
            "admin = { api_token = \"s3cr\" }\n",
            "[admin]\nusers = [\n  { name = \"a\", password = \"s3cr\" },\n]\n",
            "[guard]\ndsn = \"\"\"\nhost=x\npassword=s3cr\n\"\"\"\n",
            "[guard\ndsn = \"password=s3cr\"\n",
        ] {
            let spans = secret_spans(text);
            let covered = |needle: &str| {
                let at = text.find(needle).expect("needle");
                spans
                    .iter()
                    .any(|s| s.values.iter().any(|v| v.contains(&at)))
            };
            let needle = if text.contains("s3cr") {
                "s3cr"
            } else {
                "12345"
            };
            assert!(covered(needle), "{text:?}: {spans:?}");
        }
    }

    #[test]
    fn scrubbing_removes_quoted_parts_of_the_value() {
        assert_eq!(
            scrub("invalid type: integer `12345`, expected a string", " 12345"),
            "invalid type: integer `********`, expected a string"
        );
        assert_eq!(
            scrub("invalid type: string \"ab\", expected x", "\"abc\""),
            "invalid type: string \"********\", expected x"
        );
        assert_eq!(
            scrub("unknown field `pasword`, expected `name`", "\"pw\""),
            "unknown field `pasword`, expected `name`"
        );
    }
}
