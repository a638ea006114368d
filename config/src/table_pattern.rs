//! What an entry of `guard.protected_tables` means: which tables the guard watches.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// One side (schema or table) of a [`TablePattern`]: a wildcard or an exact, case-exact name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NamePattern {
    /// `*`: any name.
    Any,
    /// Exactly this name, as stored in `pg_catalog` (already case-folded or quoted).
    Exact(String),
}

impl NamePattern {
    /// Whether `name` (as stored in `pg_catalog`) is selected.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            NamePattern::Any => true,
            NamePattern::Exact(n) => n == name,
        }
    }

    /// The exact name, or `None` for the wildcard; handy for building catalog queries.
    pub fn as_exact(&self) -> Option<&str> {
        match self {
            NamePattern::Any => None,
            NamePattern::Exact(n) => Some(n),
        }
    }
}

/// A protected-table entry, parsed the way PostgreSQL reads a qualified name:
///
/// - `schema.table`, `schema.*`, `*.table`, `*` (every table), or an unqualified `table`
///   (that table in any schema);
/// - unquoted parts are folded to lower case; `"Quoted"."Parts"` keep their case and may
///   contain dots, spaces, or `""` for a literal quote; a quoted `"*"` is a table named `*`.
///
/// `Display` writes the canonical two-part form (`public.users`, `*.users`, `*.*`), quoting
/// where needed, and parses back to the same pattern.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TablePattern {
    /// Which schemas.
    pub schema: NamePattern,
    /// Which tables.
    pub table: NamePattern,
}

impl TablePattern {
    /// Whether the table `schema.table` (names as stored in `pg_catalog`, i.e. case-exact) is
    /// covered by this pattern.
    pub fn matches(&self, schema: &str, table: &str) -> bool {
        self.schema.matches(schema) && self.table.matches(table)
    }
}

/// Why a table pattern was rejected; the message quotes the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid table pattern {input:?}: {reason}")]
pub struct TablePatternError {
    input: String,
    reason: String,
}

/// One dot-separated part as written: quoted parts are never wildcards.
enum Part {
    Quoted(String),
    Bare(String),
}

fn split_parts(s: &str) -> Result<Vec<Part>, String> {
    let mut parts = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next_if_eq(&'"').is_some() {
            let mut name = String::new();
            loop {
                match chars.next() {
                    None => return Err("unterminated quoted identifier".into()),
                    Some('"') if chars.next_if_eq(&'"').is_some() => name.push('"'),
                    Some('"') => break,
                    Some(c) => name.push(c),
                }
            }
            if name.is_empty() {
                return Err("empty quoted identifier \"\"".into());
            }
            while chars.next_if(|c| c.is_whitespace()).is_some() {}
            parts.push(Part::Quoted(name));
        } else {
            let mut name = String::new();
            while let Some(c) = chars.next_if(|c| *c != '.') {
                name.push(c);
            }
            let name = name.trim();
            if name.is_empty() {
                return Err("empty name part".into());
            }
            if name.contains('"') {
                return Err(format!("stray quote in {name:?}; quote a whole part"));
            }
            parts.push(Part::Bare(name.to_owned()));
        }
        match chars.next() {
            None => return Ok(parts),
            Some('.') => {}
            Some(c) => return Err(format!("unexpected {c:?} after a quoted identifier")),
        }
    }
}

fn bare_to_pattern(name: &str) -> Result<NamePattern, String> {
    if name == "*" {
        return Ok(NamePattern::Any);
    }
    if name.contains('*') {
        return Err(format!(
            "{name:?}: `*` must be a whole part (partial wildcards are not supported)"
        ));
    }
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_alphabetic() || c == '_');
    let rest_ok = chars.all(|c| c.is_alphanumeric() || c == '_' || c == '$');
    if !(first_ok && rest_ok) {
        return Err(format!(
            "{name:?} is not a plain identifier; put it in double quotes"
        ));
    }
    // PostgreSQL folds unquoted identifiers with ASCII rules in UTF-8 databases.
    Ok(NamePattern::Exact(name.to_ascii_lowercase()))
}

impl FromStr for TablePattern {
    type Err = TablePatternError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let err = |reason: String| TablePatternError {
            input: input.to_owned(),
            reason,
        };
        if input.trim().is_empty() {
            return Err(err(
                "empty; expected \"schema.table\", \"table\" or \"*\"".into()
            ));
        }
        let parts = split_parts(input).map_err(err)?;
        let mut names = Vec::with_capacity(parts.len());
        for part in parts {
            names.push(match part {
                Part::Quoted(n) => NamePattern::Exact(n),
                Part::Bare(n) => bare_to_pattern(&n).map_err(err)?,
            });
        }
        let mut names = names.into_iter();
        match (names.next(), names.next(), names.next()) {
            (Some(NamePattern::Any), None, None) => Ok(TablePattern {
                schema: NamePattern::Any,
                table: NamePattern::Any,
            }),
            (Some(table), None, None) => Ok(TablePattern {
                schema: NamePattern::Any,
                table,
            }),
            (Some(schema), Some(table), None) => Ok(TablePattern { schema, table }),
            _ => Err(err(
                "too many dots; expected at most \"schema.table\" (quote names containing dots)"
                    .into(),
            )),
        }
    }
}

/// Writes a name so that parsing it gives it back: bare when PostgreSQL would not fold it,
/// quoted otherwise.
fn write_name(f: &mut fmt::Formatter<'_>, name: &NamePattern) -> fmt::Result {
    let n = match name {
        NamePattern::Any => return f.write_str("*"),
        NamePattern::Exact(n) => n,
    };
    let mut chars = n.chars();
    let plain = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '$');
    if plain {
        f.write_str(n)
    } else {
        write!(f, "\"{}\"", n.replace('"', "\"\""))
    }
}

impl fmt::Display for TablePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_name(f, &self.schema)?;
        f.write_str(".")?;
        write_name(f, &self.table)
    }
}

impl TryFrom<String> for TablePattern {
    type Error = TablePatternError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<TablePattern> for String {
    fn from(p: TablePattern) -> Self {
        p.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pat(s: &str) -> TablePattern {
        s.parse()
            .unwrap_or_else(|e| panic!("{s:?} should parse: {e}"))
    }

    fn exact(n: &str) -> NamePattern {
        NamePattern::Exact(n.to_owned())
    }

    #[test]
    fn every_form_parses_to_the_expected_parts() {
        use NamePattern::Any;
        for (text, schema, table, canonical) in [
            (
                "public.users",
                exact("public"),
                exact("users"),
                "public.users",
            ),
            ("billing.*", exact("billing"), Any, "billing.*"),
            ("*.sessions", Any, exact("sessions"), "*.sessions"),
            ("sessions", Any, exact("sessions"), "*.sessions"),
            ("*", Any, Any, "*.*"),
            ("*.*", Any, Any, "*.*"),
            (
                "Public.Users",
                exact("public"),
                exact("users"),
                "public.users",
            ),
            (
                " public . users ",
                exact("public"),
                exact("users"),
                "public.users",
            ),
            (
                r#""My Schema"."Odd.Name""#,
                exact("My Schema"),
                exact("Odd.Name"),
                r#""My Schema"."Odd.Name""#,
            ),
            (r#""Users""#, Any, exact("Users"), r#"*."Users""#),
            (r#"app."*""#, exact("app"), exact("*"), r#"app."*""#),
            (
                r#""say ""hi""".t"#,
                exact(r#"say "hi""#),
                exact("t"),
                r#""say ""hi""".t"#,
            ),
            ("s$1._x", exact("s$1"), exact("_x"), "s$1._x"),
        ] {
            let p = pat(text);
            assert_eq!(
                (p.schema.clone(), p.table.clone()),
                (schema, table),
                "{text}"
            );
            assert_eq!(p.to_string(), canonical, "{text}");
            assert_eq!(pat(canonical), p, "canonical form of {text} parses back");
        }
    }

    #[test]
    fn matching_uses_catalog_names_case_exactly() {
        let p = pat("public.Users");
        assert!(p.matches("public", "users"));
        assert!(!p.matches("public", "Users"));
        assert!(!p.matches("other", "users"));

        let q = pat(r#""Public"."Users""#);
        assert!(q.matches("Public", "Users"));
        assert!(!q.matches("public", "users"));

        let unqualified = pat("sessions");
        assert!(unqualified.matches("public", "sessions"));
        assert!(unqualified.matches("app", "sessions"));
        assert!(!unqualified.matches("app", "sessions_old"));

        let schema_wide = pat("billing.*");
        assert!(schema_wide.matches("billing", "invoices"));
        assert!(!schema_wide.matches("public", "invoices"));

        assert!(pat("*").matches("any", "thing"));
        assert!(pat("*.locks").matches("x", "locks"));

        let dotted = pat(r#""My Schema"."Odd.Name""#);
        assert!(dotted.matches("My Schema", "Odd.Name"));
        assert!(!dotted.matches("My Schema", "Odd"));

        let star_table = pat(r#"app."*""#);
        assert!(star_table.matches("app", "*"));
        assert!(!star_table.matches("app", "users"));
    }

    #[test]
    fn malformed_patterns_are_rejected_with_a_reason() {
        for (text, reason) in [
            ("", "empty"),
            ("   ", "empty"),
            (".users", "empty name part"),
            ("public.", "empty name part"),
            ("public..users", "empty name part"),
            ("a.b.c", "too many dots"),
            ("*.*.*", "too many dots"),
            (r#""a"."b"."c""#, "too many dots"),
            (r#""public.users"#, "unterminated"),
            (r#"pub"lic.users"#, "stray quote"),
            (r#"public.users""#, "stray quote"),
            (r#""a"b.c"#, "unexpected"),
            (r#""".users"#, "empty quoted"),
            ("user*", "whole part"),
            ("public.my table", "not a plain identifier"),
            ("public.my-table", "not a plain identifier"),
            ("1abc", "not a plain identifier"),
        ] {
            let e = text.parse::<TablePattern>().unwrap_err().to_string();
            assert!(e.contains(reason), "{text:?}: {e}");
            assert!(e.starts_with("invalid table pattern"), "{e}");
        }
    }

    #[test]
    fn serde_uses_the_string_form() {
        #[derive(Deserialize, Serialize)]
        struct T {
            p: TablePattern,
        }
        let t: T = toml::from_str(r#"p = 'Public."Users"'"#).unwrap();
        assert_eq!(t.p, pat(r#"public."Users""#));
        let back = toml::to_string(&t).unwrap();
        assert!(back.contains(r#"public."Users""#), "{back}");
    }
}
