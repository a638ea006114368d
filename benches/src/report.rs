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

/// The one-sided p-value of a rank-sum (Mann–Whitney) test that `xs` tend to lie below `ys`:
/// the share of all the ways to deal the pooled values into groups of these sizes that put at
/// least as many (x, y) pairs in the order x < y as observed. Exact when no x equals a y,
/// unlike the normal approximation, which is wrong for the handful of repetitions a benchmark
/// has; a tie counts a half in the observed count but the ways are counted as if there were
/// none, so with ties p is approximate (ratios of measured TPS practically never tie). The
/// smallest possible p is [`rank_sum_smallest_p`]. NaN when either side is empty.
pub fn rank_sum_p_below(xs: &[f64], ys: &[f64]) -> f64 {
    let (n, m) = (xs.len(), ys.len());
    if n == 0 || m == 0 {
        return f64::NAN;
    }
    let observed: f64 = xs
        .iter()
        .flat_map(|x| ys.iter().map(move |y| (x, y)))
        .map(|(x, y)| match x.total_cmp(y) {
            std::cmp::Ordering::Less => 1.0,
            std::cmp::Ordering::Equal => 0.5,
            std::cmp::Ordering::Greater => 0.0,
        })
        .sum();
    // ways[i][j][u]: orderings of i xs and j ys with u pairs x < y. The largest of them is
    // either an x (below no y) or a y (above all i xs).
    let mut ways = vec![vec![Vec::<f64>::new(); m + 1]; n + 1];
    for i in 0..=n {
        for j in 0..=m {
            ways[i][j] = if i == 0 || j == 0 {
                vec![1.0]
            } else {
                (0..=i * j)
                    .map(|u| {
                        let top_x = ways[i - 1][j].get(u).copied().unwrap_or(0.0);
                        let top_y = u
                            .checked_sub(i)
                            .and_then(|rest| ways[i][j - 1].get(rest))
                            .copied()
                            .unwrap_or(0.0);
                        top_x + top_y
                    })
                    .collect()
            };
        }
    }
    let all = &ways[n][m];
    let total: f64 = all.iter().sum();
    let at_least: f64 = all
        .iter()
        .enumerate()
        // An observed count with a tie's half (u + ½) takes in the ways with u pairs.
        .filter(|(u, _)| *u as f64 + 0.5 >= observed - 1e-9)
        .map(|(_, w)| w)
        .sum();
    at_least / total
}

/// The smallest p [`rank_sum_p_below`] can give for groups of `n` and `m` values (every x below
/// every y): one way out of C(n + m, n). With 3 and 3 it is 1 / 20; with 2 and 2, 1 / 6.
pub fn rank_sum_smallest_p(n: usize, m: usize) -> f64 {
    // 1 / C(n + m, n) as a product of ratios; floats, as C overflows integers for large groups.
    (1..=n).map(|k| k as f64 / (m + k) as f64).product()
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
    fn rank_sum_p_is_exact_for_small_samples() {
        // Every x below every y: one ordering of C(6, 3) = 20, and of C(10, 5) = 252.
        let p = rank_sum_p_below(&[0.90, 0.91, 0.92], &[0.95, 0.99, 1.01]);
        assert!((p - 1.0 / 20.0).abs() < 1e-12, "{p}");
        let xs = [0.90, 0.91, 0.92, 0.93, 0.94];
        let ys = [0.95, 0.96, 0.97, 0.98, 0.99];
        assert!((rank_sum_p_below(&xs, &ys) - 1.0 / 252.0).abs() < 1e-12);
        // Every x above every y: all orderings have at least zero pairs.
        assert_eq!(rank_sum_p_below(&ys, &xs), 1.0);
        // One pair out of place: U = 8 of 9, reached by 2 of the 20 orderings (U = 8, 9).
        let p = rank_sum_p_below(&[0.90, 0.91, 0.96], &[0.95, 0.99, 1.01]);
        assert!((p - 2.0 / 20.0).abs() < 1e-12, "{p}");
        // Interleaved: no evidence either way.
        let p = rank_sum_p_below(&[0.90, 0.95, 1.00], &[0.92, 0.97, 1.02]);
        assert!(p > 0.2 && p < 0.5, "{p}");
        assert!(rank_sum_p_below(&[], &[1.0]).is_nan());
        // Groups of different sizes: every x below every y is 1 of C(6, 2) = 15 orderings.
        let p = rank_sum_p_below(&[0.90, 0.91], &[0.95, 0.96, 0.97, 0.98]);
        assert!((p - 1.0 / 15.0).abs() < 1e-12, "{p}");
        assert!((p - rank_sum_smallest_p(2, 4)).abs() < 1e-12);
        // One tie: U = 8.5 of 9 takes in the orderings with 8 and 9 pairs.
        let p = rank_sum_p_below(&[0.90, 0.95, 1.00], &[1.00, 1.10, 1.20]);
        assert!((p - 2.0 / 20.0).abs() < 1e-12, "{p}");
    }

    #[test]
    fn smallest_rank_sum_p() {
        assert!((rank_sum_smallest_p(3, 3) - 1.0 / 20.0).abs() < 1e-12);
        assert!((rank_sum_smallest_p(5, 5) - 1.0 / 252.0).abs() < 1e-12);
        assert!((rank_sum_smallest_p(2, 2) - 1.0 / 6.0).abs() < 1e-12);
    }

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
