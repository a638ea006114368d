//! A test helper: the guard's SQL runs inside databases whose owners may plant look-alike
//! functions and operators, so every name in it must be qualified. Each module that owns
//! guard SQL checks its statements with [`assert_schema_qualified`].

/// Panics unless every name in `sql` is qualified: a function call is `pg_catalog.f(`, an
/// operator is `OPERATOR(pg_catalog.op)`, a cast names `pg_catalog.type`. Keywords of the SQL
/// grammar (not looked up in any schema) may stand alone.
pub(crate) fn assert_schema_qualified(sql: &str) {
    const GRAMMAR: [&str; 12] = [
        "COALESCE",
        "ANY",
        "MATERIALIZED",
        "AS",
        "LATERAL",
        "AND",
        "OR",
        "NOT",
        "WHERE",
        "FROM",
        "SELECT",
        "ON",
    ];
    let code = strip_string_literals(sql);
    let bytes = code.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        // Operators: any operator character outside OPERATOR(...) and casts.
        if b"=<>!~+-*/%^&|#@".contains(&b) {
            let before = &code[..i];
            let open = before.rfind("OPERATOR(pg_catalog.");
            let close = before.rfind(')');
            assert!(
                open.is_some_and(|o| close.is_none_or(|c| c < o)),
                "unqualified operator at byte {i}: {}",
                &code[i.saturating_sub(40)..(i + 10).min(code.len())]
            );
        }
        // Function calls: a word right before '(' must be qualified or grammar.
        if b == b'(' {
            let word: String = code[..i]
                .trim_end()
                .chars()
                .rev()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == '.')
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            assert!(
                word.is_empty()
                    || word.starts_with("pg_catalog.")
                    || word == "OPERATOR"
                    || GRAMMAR.contains(&word.as_str()),
                "unqualified call {word}( in {sql}"
            );
        }
        // Casts: `::` followed by a qualified type.
        if code[i..].starts_with("::") {
            assert!(
                code[i + 2..].starts_with("pg_catalog."),
                "unqualified cast at byte {i}: {}",
                &code[i..(i + 20).min(code.len())]
            );
        }
    }
}

/// `sql` with the contents of '...' literals blanked out.
fn strip_string_literals(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut inside = false;
    for c in sql.chars() {
        if c == '\'' {
            inside = !inside;
            out.push(c);
        } else {
            out.push(if inside { ' ' } else { c });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[should_panic(expected = "unqualified call array_agg(")]
    fn an_unqualified_function_is_caught() {
        assert_schema_qualified("SELECT array_agg(x) FROM t");
    }

    #[test]
    #[should_panic(expected = "unqualified operator")]
    fn an_unqualified_operator_is_caught() {
        assert_schema_qualified("SELECT 1 FROM t WHERE a = $1::pg_catalog.int4");
    }

    #[test]
    #[should_panic(expected = "unqualified cast")]
    fn an_unqualified_cast_is_caught() {
        assert_schema_qualified("SELECT $1::int4");
    }

    #[test]
    fn a_literal_may_hold_anything() {
        assert_schema_qualified("SELECT pg_catalog.length('a = b(c)::d')");
    }
}
