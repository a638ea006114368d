//! The SQL that prepares a PostgreSQL server for the guard without making it a superuser
//! (`config/guard-setup.sql`, printed by `lockguard setup-sql`): a login role with
//! `pg_signal_backend` and `pg_read_all_stats`, and a `SECURITY DEFINER` function in a schema
//! of its own that hands that role SCRAM secrets and nothing else.

use std::fmt;

/// The setup script with `{{role}}`, `{{schema}}` (quoted identifiers), `{{role_literal}}`,
/// `{{schema_literal}}` (string constants) and `{{auth_query}}` still to fill in.
pub const SETUP_SQL_TEMPLATE: &str = include_str!("../../config/guard-setup.sql");

/// The role name the README and `lockguard setup-sql` use unless told otherwise.
pub const DEFAULT_ROLE: &str = "lockguard";
/// The schema of the lookup function unless told otherwise; [`lockguard_config::DEFAULT_AUTH_QUERY`]
/// calls the function there.
pub const DEFAULT_SCHEMA: &str = "lockguard";

/// PostgreSQL keeps at most this many bytes of a name (NAMEDATALEN - 1); a longer one would be
/// truncated silently, and the script would create one name and grant to another.
const MAX_NAME_BYTES: usize = 63;

/// A role or schema name the script cannot carry safely.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidName {
    /// `role` or `schema`.
    pub what: &'static str,
    pub name: String,
    pub reason: &'static str,
}

impl fmt::Display for InvalidName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid {} name {:?}: {}",
            self.what, self.name, self.reason
        )
    }
}

impl std::error::Error for InvalidName {}

/// The setup script for the guard role `role` with its lookup function in `schema`. Names are
/// taken literally (case matters: `Lockguard` is not `lockguard`) and quoted, so any name
/// PostgreSQL accepts works; control characters (which would end the script's comments) and
/// names longer than 63 bytes are refused.
pub fn setup_sql(role: &str, schema: &str) -> Result<String, InvalidName> {
    check_name("role", role)?;
    check_name("schema", schema)?;
    Ok(SETUP_SQL_TEMPLATE
        .replace("{{role_literal}}", &quote_literal(role))
        .replace("{{schema_literal}}", &quote_literal(schema))
        .replace("{{auth_query}}", &auth_query(schema))
        .replace("{{role}}", &quote_ident(role))
        .replace("{{schema}}", &quote_ident(schema)))
}

/// The `auth_query` that calls the lookup function the script created in `schema`.
pub fn auth_query(schema: &str) -> String {
    format!(
        "SELECT {}.scram_verifier($1::pg_catalog.text)",
        quote_ident(schema)
    )
}

fn check_name(what: &'static str, name: &str) -> Result<(), InvalidName> {
    let reason = if name.is_empty() {
        "it is empty"
    } else if name.len() > MAX_NAME_BYTES {
        "PostgreSQL names are at most 63 bytes"
    } else if name.chars().any(char::is_control) {
        "it contains a control character"
    } else {
        return Ok(());
    };
    Err(InvalidName {
        what,
        name: name.to_owned(),
        reason,
    })
}

/// `"name"`, with embedded quotes doubled.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `E'text'`: an escape string constant, so the result means the same whatever
/// `standard_conforming_strings` says.
fn quote_literal(text: &str) -> String {
    format!("E'{}'", text.replace('\\', "\\\\").replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_quoted_as_identifiers_and_as_constants() {
        let sql = setup_sql("lock\"guard's", "Guard Schema\\x").unwrap();
        assert!(sql.contains("TO \"lock\"\"guard's\";"), "{sql}");
        assert!(sql.contains("CREATE SCHEMA IF NOT EXISTS \"Guard Schema\\x\";"));
        assert!(
            sql.contains("'lockguard_setup.role', E'lock\"guard''s'"),
            "{sql}"
        );
        assert!(
            sql.contains("'lockguard_setup.schema', E'Guard Schema\\\\x'"),
            "{sql}"
        );
        assert!(!sql.contains("{{"), "every placeholder is filled: {sql}");
    }

    #[test]
    fn the_default_script_names_the_default_role_and_schema() {
        let sql = setup_sql(DEFAULT_ROLE, DEFAULT_SCHEMA).unwrap();
        assert!(sql.contains("GRANT pg_signal_backend, pg_read_all_stats TO \"lockguard\";"));
        assert!(sql.contains("CREATE OR REPLACE FUNCTION \"lockguard\".scram_verifier("));
        assert!(sql.contains("SECURITY DEFINER"));
        assert!(sql.contains("SET search_path = pg_catalog, pg_temp"));
        assert!(sql.contains("REVOKE ALL ON FUNCTION \"lockguard\".scram_verifier"));
        assert_eq!(
            auth_query(DEFAULT_SCHEMA),
            "SELECT \"lockguard\".scram_verifier($1::pg_catalog.text)"
        );
    }

    #[test]
    fn the_default_auth_query_calls_the_function_of_the_default_script() {
        assert_eq!(
            lockguard_config::DEFAULT_AUTH_QUERY.replacen("lockguard.", "\"lockguard\".", 1),
            auth_query(DEFAULT_SCHEMA)
        );
    }

    #[test]
    fn names_the_script_cannot_carry_are_refused() {
        for (role, schema) in [
            ("", "s"),
            ("r", ""),
            ("line\nbreak", "s"),
            ("r", "tab\there"),
            (&"x".repeat(64), "s"),
        ] {
            let err = setup_sql(role, schema).unwrap_err();
            assert!(err.to_string().starts_with("invalid "), "{err}");
        }
        // 63 bytes of a multi-byte name is fine.
        assert!(setup_sql(&"é".repeat(31), "s").is_ok());
    }
}
