//! The error type of this crate, and the code that points an error at a key and a line.

use std::fmt;
use std::ops::Range;
use std::path::PathBuf;

use toml::de::{DeTable, DeValue};
use toml::Spanned;

use crate::secret::{scrub, secret_spans, SecretSpan};

/// Why a configuration could not be loaded. Every variant names where the problem is (file, key,
/// line when known) so `lockguard check-config` can print it as is.
///
/// The `Display` text is self-contained (it already includes the underlying error), so the
/// variants expose no `source()` and `{:#}` does not repeat itself.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {}: {error}", path.display())]
    Read {
        /// The file we tried to read.
        path: PathBuf,
        /// What the OS said.
        error: std::io::Error,
    },

    /// TOML syntax error, unknown key, or a value of the wrong type or format. The detail says
    /// "line N, column M" and, unless that line holds a secret or an unknown key (which may be
    /// a misspelt secret), shows the offending source line; we add the file and the dotted key
    /// path in front.
    #[error("{}{}{detail}", file_prefix(file.as_ref()), key_prefix(key.as_deref()))]
    Parse {
        /// The file, when loaded from one.
        file: Option<PathBuf>,
        /// Dotted key path of the offending entry (e.g. `proxy.startup_timeout`), when the
        /// error points inside a key/value pair.
        key: Option<String>,
        /// 1-based line of the error, when toml reported a position.
        line: Option<usize>,
        /// The parser's description, with the value of any secret masked. The toml crate's
        /// error itself is not kept: it carries the whole file text, secrets included.
        detail: String,
    },

    /// The file parsed but a value breaks a rule (a zero timeout, a bad table pattern, ...).
    #[error("{}{}{key}: {message}", file_prefix(file.as_ref()), line_prefix(*line))]
    Invalid {
        /// The file, when loaded from one.
        file: Option<PathBuf>,
        /// Key path such as `guard.protected_tables[2]`.
        key: String,
        /// 1-based line of the value in the source text, when the value came from the text.
        line: Option<usize>,
        /// What is wrong with it.
        message: String,
    },
}

impl ConfigError {
    /// The dotted key path the error is about, when known; lets callers and tests check which
    /// setting was rejected without parsing the message.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Read { .. } => None,
            ConfigError::Parse { key, .. } => key.as_deref(),
            ConfigError::Invalid { key, .. } => Some(key),
        }
    }

    /// The 1-based line in the config text, when known.
    pub fn line(&self) -> Option<usize> {
        match self {
            ConfigError::Read { .. } => None,
            ConfigError::Parse { line, .. } | ConfigError::Invalid { line, .. } => *line,
        }
    }

    /// Builds a `Parse` error, finding the key path from the error's span.
    /// The toml crate's own text shows the source line of the error; that line is left out
    /// when it holds a secret's value (see [`crate::secret`]) or an unknown key, and quoted
    /// parts of a secret's value are masked in the message.
    pub(crate) fn parse(error: toml::de::Error, text: &str, file: Option<PathBuf>) -> Self {
        let at = error.span().map(|s| s.start.min(text.len()));
        let line = at.map(|at| line_of(text, at));
        let mut key = at.and_then(|at| key_at(text, at));
        let secrets: Vec<SecretSpan> = match at {
            Some(at) => {
                let line_bytes = line_bytes(text, at);
                secret_spans(text)
                    .into_iter()
                    .filter(|s| s.entry.start < line_bytes.end && line_bytes.start < s.entry.end)
                    .collect()
            }
            None => Vec::new(),
        };
        let detail = match (at, secrets.first()) {
            (Some(at), Some(first)) => {
                key.get_or_insert_with(|| first.key.clone());
                let values = secrets.iter().flat_map(|s| s.values.iter());
                let message = values.fold(error.message().to_owned(), |m, value| {
                    scrub(&m, text.get(value.clone()).unwrap_or_default())
                });
                format!(
                    "{}: {message} (the line is not shown: it holds the secret {})",
                    position(text, at),
                    first.key
                )
            }
            (Some(at), None) if error.message().starts_with("unknown field") => {
                format!("{}: {}", position(text, at), error.message())
            }
            // No position: the message stands alone (toml adds no source line then).
            _ => error.to_string().trim_end().to_owned(),
        };
        ConfigError::Parse {
            file,
            key,
            line,
            detail,
        }
    }
}

/// "TOML parse error at line N, column M", as the toml crate words it.
fn position(text: &str, at: usize) -> String {
    let bytes = line_bytes(text, at);
    let column = text
        .get(bytes.start..at)
        .map_or(at - bytes.start, |s| s.chars().count())
        + 1;
    format!(
        "TOML parse error at line {}, column {column}",
        line_of(text, at)
    )
}

/// Byte range of the line holding byte `at`, its newline included.
fn line_bytes(text: &str, at: usize) -> Range<usize> {
    let bytes = text.as_bytes();
    let at = at.min(bytes.len());
    let start = bytes[..at]
        .iter()
        .rposition(|b| *b == b'\n')
        .map_or(0, |i| i + 1);
    let end = bytes[at..]
        .iter()
        .position(|b| *b == b'\n')
        .map_or(bytes.len(), |i| at + i + 1);
    start..end
}

fn file_prefix(file: Option<&PathBuf>) -> String {
    file.map(|f| format!("{}: ", f.display()))
        .unwrap_or_default()
}

fn line_prefix(line: Option<usize>) -> String {
    line.map(|l| format!("line {l}: ")).unwrap_or_default()
}

fn key_prefix(key: Option<&str>) -> String {
    key.map(|k| format!("{k}: ")).unwrap_or_default()
}

/// One step of a key path: a table key or an array index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Seg {
    Key(String),
    Index(usize),
}

impl From<&str> for Seg {
    fn from(k: &str) -> Self {
        Seg::Key(k.to_owned())
    }
}

/// A key path rendered the way operators write it: `guard.protected_tables[2]`.
pub(crate) struct KeyPath<'a>(pub(crate) &'a [Seg]);

impl fmt::Display for KeyPath<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Seg::Key(k) if i == 0 => write!(f, "{k}")?,
                Seg::Key(k) => write!(f, ".{k}")?,
                Seg::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// 1-based line number of a byte offset.
pub(crate) fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// Line of the value at `path` in `text`, if the text parses and sets that key.
pub(crate) fn line_of_path(text: &str, path: &[Seg]) -> Option<usize> {
    let doc = DeTable::parse(text).ok()?;
    let mut span = doc.span();
    let mut value: Option<&DeValue> = None;
    let mut table = Some(doc.get_ref());
    for seg in path {
        let next: &Spanned<DeValue> = match (seg, table, value) {
            (Seg::Key(k), Some(t), _) => t.iter().find(|(key, _)| key.get_ref() == k)?.1,
            (Seg::Index(i), _, Some(DeValue::Array(a))) => a.get(*i)?,
            _ => return None,
        };
        span = next.span();
        value = Some(next.get_ref());
        table = match next.get_ref() {
            DeValue::Table(t) => Some(t),
            _ => None,
        };
    }
    Some(line_of(text, span.start))
}

/// Dotted key path of the deepest entry whose key or value contains byte `pos`.
fn key_at(text: &str, pos: usize) -> Option<String> {
    let doc = DeTable::parse(text).ok()?;
    let mut path = Vec::new();
    if find_in_table(doc.get_ref(), pos, &mut path) {
        Some(KeyPath(&path).to_string())
    } else {
        None
    }
}

fn contains(span: &Range<usize>, pos: usize) -> bool {
    span.start <= pos && pos < span.end.max(span.start + 1)
}

fn find_in_table(table: &DeTable, pos: usize, path: &mut Vec<Seg>) -> bool {
    for (key, value) in table.iter() {
        path.push(Seg::Key(key.get_ref().to_string()));
        // A `[section]` table's span need not cover its entries, so always look inside.
        if find_in_value(value.get_ref(), pos, path)
            || contains(&key.span(), pos)
            || contains(&value.span(), pos)
        {
            return true;
        }
        path.pop();
    }
    false
}

fn find_in_value(value: &DeValue, pos: usize, path: &mut Vec<Seg>) -> bool {
    match value {
        DeValue::Table(t) => find_in_table(t, pos, path),
        DeValue::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                path.push(Seg::Index(i));
                if find_in_value(item.get_ref(), pos, path) || contains(&item.span(), pos) {
                    return true;
                }
                path.pop();
            }
            false
        }
        _ => false,
    }
}
