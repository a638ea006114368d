//! Serde helpers for `Duration` fields written as human-readable strings ("10s", "500ms", "1m").
//!
//! We use `humantime` directly rather than `humantime-serde` so a bad value reports *why* it is
//! bad (humantime's reason) instead of serde's generic "expected a duration".

use std::fmt;
use std::time::Duration;

use serde::de::{self, Visitor};
use serde::{Deserializer, Serializer};

const HINT: &str = r#"write it like "10s", "500ms" or "1m""#;

/// Writes the duration back in humantime form ("1m 30s", "0s"), which `deserialize` accepts.
pub(crate) fn serialize<S: Serializer>(value: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_duration(*value))
}

/// Reads a humantime string; a bare integer `0` is also accepted because "0 means off" is how
/// operators think of disabled timeouts. Any other bare number is ambiguous and rejected.
pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    d.deserialize_any(DurationVisitor)
}

struct DurationVisitor;

impl Visitor<'_> for DurationVisitor {
    type Value = Duration;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "a duration string; {HINT}")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
        humantime::parse_duration(v.trim())
            .map_err(|e| E::custom(format!("invalid duration {v:?}: {e}; {HINT}")))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
        if v == 0 {
            Ok(Duration::ZERO)
        } else {
            Err(E::custom(format!(
                "a bare number ({v}) is ambiguous for a duration; add a unit, e.g. \"{v}s\" or \"{v}ms\""
            )))
        }
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
        match i64::try_from(v) {
            Ok(v) => self.visit_i64(v),
            Err(_) => Err(E::custom(format!("invalid duration {v}; {HINT}"))),
        }
    }
}

/// The same format for an optional key (`#[serde(default, with = "crate::duration::option")]`):
/// absent is `None`.
pub(crate) mod option {
    use std::time::Duration;

    use serde::{Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(
        value: &Option<Duration>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            Some(d) => super::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        super::deserialize(d).map(Some)
    }
}
