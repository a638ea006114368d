//! Small statistics and the tables the runner prints.
//!
//! Tables are printed as Markdown with padded columns: readable in a terminal and pasted into
//! the README unchanged.

use std::time::Duration;

/// The median of `values` (mean of the middle two for an even count); NaN when empty.
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => sorted[n / 2],
        _ => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// Nearest-rank percentile (`p` in 0..=100) of already sorted values; NaN when empty.
pub fn percentile_sorted(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// p50 / p95 / p99 / max of a set of durations, in milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct Spread {
    pub count: usize,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

impl Spread {
    pub fn of(samples: &[Duration]) -> Spread {
        let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        ms.sort_by(f64::total_cmp);
        Spread {
            count: ms.len(),
            p50: percentile_sorted(&ms, 50.0),
            p95: percentile_sorted(&ms, 95.0),
            p99: percentile_sorted(&ms, 99.0),
            max: ms.last().copied().unwrap_or(f64::NAN),
        }
    }
}

/// A table with a header row; cells are strings, numbers are right-aligned.
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new<S: Into<String>>(header: impl IntoIterator<Item = S>) -> Table {
        Table {
            header: header.into_iter().map(Into::into).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row<S: Into<String>>(&mut self, cells: impl IntoIterator<Item = S>) {
        self.rows.push(cells.into_iter().map(Into::into).collect());
    }

    /// Renders the table as padded Markdown.
    pub fn render(&self) -> String {
        let columns = self.header.len();
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate().take(columns) {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let numeric: Vec<bool> = (0..columns)
            .map(|i| {
                !self.rows.is_empty()
                    && self.rows.iter().all(|r| {
                        r.get(i).is_none_or(|c| {
                            c.starts_with(|ch: char| ch.is_ascii_digit() || ch == '-' || ch == '—')
                        })
                    })
            })
            .collect();
        let line = |cells: &[String], out: &mut String| {
            out.push('|');
            for i in 0..columns {
                let cell = cells.get(i).map(String::as_str).unwrap_or("");
                let pad = widths[i] - cell.chars().count();
                out.push(' ');
                if numeric[i] {
                    out.push_str(&" ".repeat(pad));
                    out.push_str(cell);
                } else {
                    out.push_str(cell);
                    out.push_str(&" ".repeat(pad));
                }
                out.push_str(" |");
            }
            out.push('\n');
        };
        let mut out = String::new();
        line(&self.header, &mut out);
        out.push('|');
        for i in 0..columns {
            let dashes = "-".repeat(widths[i].max(3));
            if numeric[i] {
                out.push_str(&format!(" {}: |", &dashes[1..]));
            } else {
                out.push_str(&format!(" {dashes} |"));
            }
        }
        out.push('\n');
        for row in &self.rows {
            line(row, &mut out);
        }
        out
    }
}

/// A number with a sensible count of decimals for a table cell.
pub fn num(value: f64) -> String {
    if value.is_nan() {
        "—".to_owned()
    } else if value.abs() >= 100.0 {
        format!("{value:.0}")
    } else if value.abs() >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_percentiles() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
        let sorted: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile_sorted(&sorted, 99.0), 99.0);
        assert_eq!(percentile_sorted(&sorted, 50.0), 50.0);
        assert_eq!(percentile_sorted(&sorted, 100.0), 100.0);
        assert_eq!(percentile_sorted(&[5.0], 99.0), 5.0);
    }

    #[test]
    fn tables_align_numbers_right() {
        let mut t = Table::new(["mode", "tps"]);
        t.row(["-S", "12345"]);
        t.row(["tpcb-like", "9"]);
        let text = t.render();
        assert!(text.contains("| -S        | 12345 |"), "{text}");
        assert!(text.contains("| tpcb-like |     9 |"), "{text}");
        assert!(text.contains("| --------- | ----: |"), "{text}");
    }
}
