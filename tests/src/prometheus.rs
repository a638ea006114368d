//! A strict reader of the Prometheus text exposition format (0.0.4), for the tests of
//! `GET /metrics`. It is strict on purpose: besides reading the samples it fails on anything
//! a Prometheus server would reject or mis-read (a sample before its TYPE, a bad escape, a
//! duplicate series, buckets that are not cumulative). The `prometheus-parse` crate was
//! considered: it matches lines with regular expressions and ignores those it cannot read (a
//! malformed sample simply disappears), so it could not prove the format, and it would bring
//! chrono and regex for it.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;

use crate::http;

/// `GET /metrics` on the admin endpoint at `addr`: checks the status and content type, then
/// parses the exposition strictly ([`parse_prometheus`]).
pub async fn scrape(addr: SocketAddr) -> BTreeMap<String, f64> {
    let response = http::get(addr, "/metrics").await;
    assert_eq!(response.status, 200, "{}", response.body);
    assert!(
        response
            .headers
            .get("content-type")
            .is_some_and(|t| t.starts_with("text/plain; version=0.0.4")),
        "{:?}",
        response.headers
    );
    parse_prometheus(&response.body)
}

/// Samples by `name{label="value",...}` (labels sorted), after checking the exposition
/// format: HELP/TYPE lines, names, label syntax and escapes, numeric values, every sample
/// belonging to a declared family of the right type, no duplicate series, cumulative
/// histogram buckets ending in `+Inf` equal to `_count`.
pub fn parse_prometheus(text: &str) -> BTreeMap<String, f64> {
    assert!(
        text.ends_with('\n'),
        "the exposition must end with a newline"
    );
    let mut types: HashMap<String, String> = HashMap::new();
    let mut helps: HashMap<String, String> = HashMap::new();
    let mut samples = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let at = format!("line {}: {line:?}", n + 1);
        if let Some(comment) = line.strip_prefix('#') {
            let mut parts = comment.trim_start().splitn(3, ' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("HELP"), Some(name), Some(help)) => {
                    assert!(valid_metric_name(name), "{at}");
                    assert!(
                        helps.insert(name.to_owned(), help.to_owned()).is_none(),
                        "second HELP, {at}"
                    );
                }
                (Some("TYPE"), Some(name), Some(kind)) => {
                    assert!(valid_metric_name(name), "{at}");
                    assert!(
                        ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                        "{at}"
                    );
                    assert!(
                        types.insert(name.to_owned(), kind.to_owned()).is_none(),
                        "second TYPE, {at}"
                    );
                }
                _ => {}
            }
            continue;
        }
        assert!(!line.trim().is_empty(), "blank line, {at}");
        let (series, value) = parse_sample(line).unwrap_or_else(|e| panic!("{e}, {at}"));
        let name = series.split('{').next().unwrap_or_default().to_owned();
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                let base = name.strip_suffix(suffix)?;
                matches!(
                    types.get(base).map(String::as_str),
                    Some("histogram" | "summary")
                )
                .then(|| base.to_owned())
            })
            .unwrap_or_else(|| name.clone());
        assert!(types.contains_key(&family), "sample before its TYPE, {at}");
        if types[&family] == "counter" {
            assert!(value >= 0.0, "negative counter, {at}");
        }
        assert!(
            samples.insert(series, value).is_none(),
            "duplicate series, {at}"
        );
    }
    for (family, kind) in &types {
        if kind != "histogram" {
            continue;
        }
        let mut buckets: Vec<(f64, f64)> = samples
            .iter()
            .filter_map(|(series, v)| {
                let le = series
                    .strip_prefix(&format!("{family}_bucket{{le=\""))?
                    .strip_suffix("\"}")?;
                let bound = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((bound, *v))
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        assert!(
            buckets.windows(2).all(|w| w[0].1 <= w[1].1),
            "{family} buckets not cumulative"
        );
        let last = buckets
            .last()
            .unwrap_or_else(|| panic!("{family} has no buckets"));
        assert!(last.0.is_infinite(), "{family} has no +Inf bucket");
        assert_eq!(
            Some(&last.1),
            samples.get(&format!("{family}_count")),
            "{family} +Inf != count"
        );
        assert!(
            samples.contains_key(&format!("{family}_sum")),
            "{family} has no _sum"
        );
    }
    samples
}

pub fn valid_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// `name{a="x",b="y"} value` → (`name{a="x",b="y"}` with labels sorted, value).
fn parse_sample(line: &str) -> Result<(String, f64), String> {
    let name_end = line.find(['{', ' ']).ok_or("no value")?;
    let name = &line[..name_end];
    if !valid_metric_name(name) {
        return Err(format!("bad metric name {name:?}"));
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices().peekable();
        let mut label = String::new();
        loop {
            let (i, c) = chars.next().ok_or("unterminated labels")?;
            match c {
                '}' if label.is_empty() => {
                    rest = &inner[i + 1..];
                    break;
                }
                '=' => {
                    if !valid_metric_name(&label) || label.contains(':') {
                        return Err(format!("bad label name {label:?}"));
                    }
                    if chars.next().map(|(_, c)| c) != Some('"') {
                        return Err("label value not quoted".into());
                    }
                    let mut value = String::new();
                    loop {
                        match chars.next().ok_or("unterminated label value")?.1 {
                            '"' => break,
                            '\\' => match chars.next().ok_or("dangling escape")?.1 {
                                '\\' => value.push('\\'),
                                '"' => value.push('"'),
                                'n' => value.push('\n'),
                                other => return Err(format!("bad escape \\{other}")),
                            },
                            '\n' => return Err("newline in label value".into()),
                            other => value.push(other),
                        }
                    }
                    labels.push((std::mem::take(&mut label), value));
                    match chars.next().ok_or("unterminated labels")? {
                        (_, ',') => {}
                        (j, '}') => {
                            rest = &inner[j + 1..];
                            break;
                        }
                        (_, other) => return Err(format!("unexpected {other:?} after a label")),
                    }
                }
                c => label.push(c),
            }
        }
    }
    let mut fields = rest.split(' ').filter(|f| !f.is_empty());
    let value = fields.next().ok_or("no value")?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse::<f64>().map_err(|_| format!("bad value {v:?}"))?,
    };
    if let Some(timestamp) = fields.next() {
        timestamp
            .parse::<i64>()
            .map_err(|_| format!("bad timestamp {timestamp:?}"))?;
    }
    if fields.next().is_some() {
        return Err("trailing fields".into());
    }
    labels.sort();
    let series = if labels.is_empty() {
        name.to_owned()
    } else {
        let inner: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
        format!("{name}{{{}}}", inner.join(","))
    };
    Ok((series, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prometheus_parser_rejects_malformed_text() {
        let good = "# HELP a_total things\n# TYPE a_total counter\na_total{x=\"1\\\"\"} 3\n";
        assert_eq!(
            parse_prometheus(good).get("a_total{x=\"1\\\"\"}"),
            Some(&3.0)
        );
        for bad in [
            "a 1\n",                                                          // no TYPE
            "# TYPE a gauge\na 1",                                            // no final newline
            "# TYPE a gauge\na{x=1} 1\n",                                     // unquoted label
            "# TYPE a gauge\na one\n",                                        // not a number
            "# TYPE a gauge\na 1\na 2\n",                                     // duplicate series
            "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_count 2\nh_sum 1\n", // no +Inf
        ] {
            let result = std::panic::catch_unwind(|| parse_prometheus(bad));
            assert!(result.is_err(), "accepted {bad:?}");
        }
    }
}
