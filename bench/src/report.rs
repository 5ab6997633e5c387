//! One line per workload, in WORKLOAD.md's format.

use std::fmt::Write;
use std::time::Duration;

/// Per-operation latencies, summarised as percentiles.
#[derive(Debug, Default)]
pub(crate) struct Latencies {
    samples_us: Vec<u64>,
}

impl Latencies {
    pub(crate) fn with_capacity(n: usize) -> Self {
        Self {
            samples_us: Vec::with_capacity(n),
        }
    }

    pub(crate) fn record(&mut self, took: Duration) {
        self.samples_us
            .push(u64::try_from(took.as_micros()).unwrap_or(u64::MAX));
    }

    pub(crate) fn extend(&mut self, other: Latencies) {
        self.samples_us.extend(other.samples_us);
    }

    /// The `p`-th percentile in milliseconds (nearest rank), or `None` when empty.
    pub(crate) fn percentile_ms(&mut self, p: f64) -> Option<f64> {
        if self.samples_us.is_empty() {
            return None;
        }
        self.samples_us.sort_unstable();
        let rank = ((p / 100.0) * self.samples_us.len() as f64).ceil() as usize;
        let index = rank.clamp(1, self.samples_us.len()) - 1;
        Some(self.samples_us[index] as f64 / 1_000.0)
    }
}

/// One result line: `<label> <workload> jobs_per_s=.. p50_ms=.. p99_ms=.. [k=v ...]`.
#[derive(Debug)]
pub(crate) struct Line {
    pub(crate) label: String,
    pub(crate) workload: &'static str,
    pub(crate) jobs_per_s: Option<f64>,
    pub(crate) latencies: Latencies,
    pub(crate) extra: Vec<(String, String)>,
    pub(crate) failed: Vec<String>,
}

impl Line {
    pub(crate) fn new(label: &str, workload: &'static str) -> Self {
        Self {
            label: label.to_owned(),
            workload,
            jobs_per_s: None,
            latencies: Latencies::default(),
            extra: Vec::new(),
            failed: Vec::new(),
        }
    }

    pub(crate) fn rate(mut self, jobs: usize, took: Duration) -> Self {
        self.jobs_per_s = Some(jobs as f64 / took.as_secs_f64());
        self
    }

    pub(crate) fn with(mut self, key: &str, value: impl ToString) -> Self {
        self.extra.push((key.to_owned(), value.to_string()));
        self
    }

    /// Records a failed check; the line then says CHECK_FAILED.
    pub(crate) fn check(mut self, ok: bool, what: impl Into<String>) -> Self {
        if !ok {
            self.failed.push(what.into());
        }
        self
    }

    pub(crate) fn passed(&self) -> bool {
        self.failed.is_empty()
    }

    pub(crate) fn render(&mut self) -> String {
        let fmt = |v: Option<f64>, digits: usize| {
            v.map_or_else(|| "NA".to_owned(), |v| format!("{v:.digits$}"))
        };
        let mut out = format!(
            "{} {} jobs_per_s={} p50_ms={} p99_ms={}",
            self.label,
            self.workload,
            fmt(self.jobs_per_s, 0),
            fmt(self.latencies.percentile_ms(50.0), 3),
            fmt(self.latencies.percentile_ms(99.0), 3),
        );
        for (k, v) in &self.extra {
            let _ = write!(out, " {k}={v}");
        }
        if !self.failed.is_empty() {
            let _ = write!(
                out,
                " CHECK_FAILED={}",
                self.failed.join(";").replace(' ', "_")
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let mut l = Latencies::default();
        for ms in 1..=100 {
            l.record(Duration::from_millis(ms));
        }
        assert_eq!(l.percentile_ms(50.0), Some(50.0));
        assert_eq!(l.percentile_ms(99.0), Some(99.0));
        assert_eq!(Latencies::default().percentile_ms(50.0), None);
    }

    #[test]
    fn failed_checks_are_marked() {
        let mut line = Line::new("x", "process").check(false, "duplicates 3");
        assert!(line.render().ends_with("CHECK_FAILED=duplicates_3"));
    }
}
