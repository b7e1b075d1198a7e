//! Percentiles and the Markdown tables the benchmark prints.

use std::time::Duration;

/// Percentiles of a sample.
#[derive(Debug, Clone, Copy)]
pub struct Stats {
    /// 10th percentile.
    pub p10: f64,
    /// Median.
    pub median: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
}

/// Nearest-rank percentiles of `v` (which must not be empty).
pub fn stats(mut v: Vec<f64>) -> Stats {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let at = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    Stats {
        p10: at(0.1),
        median: at(0.5),
        p90: at(0.9),
        p99: at(0.99),
    }
}

/// Milliseconds.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl Stats {
    /// "p10 / median / p90" with `prec` decimals.
    pub fn cell(&self, prec: usize) -> String {
        format!(
            "{:.prec$} / {:.prec$} / {:.prec$}",
            self.p10, self.median, self.p90
        )
    }
}

/// A Markdown table.
pub struct Table {
    out: String,
}

impl Table {
    /// A table with these column headers.
    pub fn new(headers: &[&str]) -> Self {
        let mut out = format!("| {} |\n", headers.join(" | "));
        out.push_str(&format!("|{}\n", "---|".repeat(headers.len())));
        Self { out }
    }

    /// Adds a row.
    pub fn row(&mut self, cells: &[String]) {
        self.out.push_str(&format!("| {} |\n", cells.join(" | ")));
    }

    /// The table text.
    pub fn finish(self) -> String {
        self.out
    }
}

/// `a / b` as a ratio cell.
pub fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}x", a / b)
    } else {
        "-".into()
    }
}
