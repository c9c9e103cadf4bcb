//! The Prometheus text exposition format (0.0.4), written by hand.
//!
//! Why not the `prometheus-client` crate: Wayfinder's counters are plain
//! atomics that the components keep on their hot paths anyway (sharded per
//! worker thread in the dns), read only when a scraper asks. The crate wants
//! its own metric types registered up front (a second copy of every counter,
//! or a custom collector per component that ends up as long as this writer).
//! The format itself is a few lines per family; labels are escaped here once.
//!
//! Conventions (checked by the tests of each component's series): every name
//! starts with `wayfinder_`; counters end in `_total`; times are in seconds and
//! sizes in bytes; label names follow HAProxy's and CoreDNS's exporters where
//! they mean the same (`code`, `rcode`, `type`, `proxy`, `server`).

use std::fmt::Write as _;

/// A metrics page being written: families of samples, in order.
#[derive(Debug, Default)]
pub struct Writer {
    text: String,
}

/// The kind of a metric family (`# TYPE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (name ends in `_total`).
    Counter,
    /// Goes up and down.
    Gauge,
    /// Cumulative buckets, a sum and a count.
    Histogram,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

impl Writer {
    /// An empty page with room for `capacity` bytes.
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            text: String::with_capacity(capacity),
        }
    }

    /// Starts a family: its `# HELP` and `# TYPE` lines.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {help}\n# TYPE {name} {}", kind.name());
    }

    /// One sample of the current family.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                let _ = write!(self.text, "{k}=\"");
                escape_label_into(&mut self.text, v);
                self.text.push('"');
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {value}");
    }

    /// A family with a single unlabelled sample.
    pub fn single(&mut self, name: &str, kind: Kind, help: &str, value: impl std::fmt::Display) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }

    /// A histogram's samples from a [`super::histogram::Snapshot`]: cumulative
    /// `_bucket`s with `le` in seconds (the last `+Inf`), `_sum` in seconds, `_count`.
    pub fn histogram(&mut self, name: &str, labels: &[(&str, &str)], snapshot: &super::histogram::Snapshot) {
        let mut cumulative = 0;
        let bucket = format!("{name}_bucket");
        for (i, count) in snapshot.latency_buckets.iter().enumerate() {
            cumulative += count;
            let le = snapshot
                .bounds_us
                .get(i)
                .map_or_else(|| "+Inf".to_string(), |b| format!("{}", *b as f64 / 1e6));
            let mut l = labels.to_vec();
            l.push(("le", &le));
            self.sample(&bucket, &l, cumulative);
        }
        self.sample(&format!("{name}_sum"), labels, snapshot.latency_sum_us as f64 / 1e6);
        self.sample(&format!("{name}_count"), labels, cumulative);
    }

    /// The page.
    pub fn finish(self) -> String {
        self.text
    }
}

/// A label value with `\`, `"` and newlines escaped.
fn escape_label_into(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::histogram::Snapshot;
    use super::*;

    #[test]
    fn histogram_is_cumulative_with_inf_sum_and_count() {
        let mut out = Writer::default();
        let mut latency_buckets = [0; 11];
        latency_buckets[..3].copy_from_slice(&[1, 2, 3]);
        let snapshot = Snapshot {
            bounds_us: &[1000, 2000, 3000, 4000, 5000, 6000, 7000, 8000, 9000, 10_000],
            latency_buckets,
            latency_sum_us: 2_500_000,
        };
        out.histogram("x_seconds", &[("route", "a\"b")], &snapshot);
        let text = out.finish();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "x_seconds_bucket{route=\"a\\\"b\",le=\"0.001\"} 1");
        assert_eq!(lines[1], "x_seconds_bucket{route=\"a\\\"b\",le=\"0.002\"} 3");
        assert_eq!(lines[10], "x_seconds_bucket{route=\"a\\\"b\",le=\"+Inf\"} 6");
        assert_eq!(lines[lines.len() - 2], "x_seconds_sum{route=\"a\\\"b\"} 2.5");
        assert_eq!(lines[lines.len() - 1], "x_seconds_count{route=\"a\\\"b\"} 6");
    }

    #[test]
    fn families_and_labels_are_escaped_once() {
        let mut out = Writer::default();
        out.family("wayfinder_x_total", Kind::Counter, "Things.");
        out.sample("wayfinder_x_total", &[("a", "back\\slash\nnew")], 3);
        assert_eq!(
            out.finish(),
            "# HELP wayfinder_x_total Things.\n# TYPE wayfinder_x_total counter\n\
             wayfinder_x_total{a=\"back\\\\slash\\nnew\"} 3\n"
        );
    }
}
