//! What the daemon counts, and its rendering in the Prometheus text format for
//! `GET /metrics`.

use std::fmt::Write as _;
use std::time::Duration;

/// Upper bounds, in seconds, of the duration histograms' buckets.
pub const BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// A histogram of durations over [`BUCKETS`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    /// Observations at or under each bound (not cumulative).
    counts: [u64; BUCKETS.len()],
    /// Observations over the last bound.
    over: u64,
    /// The sum of the observations, in seconds.
    sum: f64,
}

impl Histogram {
    /// Counts one duration.
    pub fn observe(&mut self, duration: Duration) {
        let seconds = duration.as_secs_f64();
        self.sum += seconds;
        match BUCKETS.iter().position(|&bound| seconds <= bound) {
            Some(i) => self.counts[i] += 1,
            None => self.over += 1,
        }
    }

    /// How many durations were counted.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum::<u64>() + self.over
    }
}

/// What one worker counts, since the daemon started.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WorkerMetrics {
    /// Attempts by outcome (`accepted`, `retry`, …).
    pub attempts: std::collections::BTreeMap<&'static str, u64>,
    /// Readings delivered (in accepted batches).
    pub readings_delivered: u64,
    /// Batches delivered.
    pub batches_delivered: u64,
    /// Readings moved to dead letters.
    pub readings_dead_lettered: u64,
    /// How long attempts took, encoding and upload.
    pub attempt_seconds: Histogram,
    /// How long calls into the encoder took.
    pub encoder_seconds: Histogram,
    /// How long calls into the transport took.
    pub transport_seconds: Histogram,
    /// Plugin calls that trapped, by plugin (`encoder`, `transport`).
    pub plugin_traps: std::collections::BTreeMap<&'static str, u64>,
    /// Plugin calls cut off at their deadline, by plugin.
    pub plugin_deadlines: std::collections::BTreeMap<&'static str, u64>,
    /// Heartbeats delivered.
    pub heartbeats: u64,
    /// Heartbeats that failed.
    pub heartbeat_failures: u64,
}

/// Prometheus text being written: one `# HELP`/`# TYPE` per family.
#[derive(Default)]
pub struct Exposition {
    text: String,
    declared: std::collections::BTreeSet<&'static str>,
}

/// Label pairs of a sample.
pub type Labels<'a> = &'a [(&'a str, &'a str)];

impl Exposition {
    fn declare(&mut self, name: &'static str, kind: &str, help: &str) {
        if self.declared.insert(name) {
            let _ = writeln!(self.text, "# HELP {name} {help}");
            let _ = writeln!(self.text, "# TYPE {name} {kind}");
        }
    }

    fn sample(&mut self, name: &str, labels: Labels<'_>, value: f64) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (key, value)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                let _ = write!(self.text, "{key}=\"{}\"", escape(value));
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {value}");
    }

    /// A counter sample.
    pub fn counter(&mut self, name: &'static str, help: &str, labels: Labels<'_>, value: f64) {
        self.declare(name, "counter", help);
        self.sample(name, labels, value);
    }

    /// A gauge sample.
    pub fn gauge(&mut self, name: &'static str, help: &str, labels: Labels<'_>, value: f64) {
        self.declare(name, "gauge", help);
        self.sample(name, labels, value);
    }

    /// A histogram's samples.
    pub fn histogram(
        &mut self,
        name: &'static str,
        help: &str,
        labels: Labels<'_>,
        histogram: &Histogram,
    ) {
        self.declare(name, "histogram", help);
        let mut cumulative = 0;
        for (bound, count) in BUCKETS.iter().zip(histogram.counts) {
            cumulative += count;
            let le = bound.to_string();
            let mut with_le = labels.to_vec();
            with_le.push(("le", &le));
            self.sample(&format!("{name}_bucket"), &with_le, cumulative as f64);
        }
        let mut with_le = labels.to_vec();
        with_le.push(("le", "+Inf"));
        self.sample(
            &format!("{name}_bucket"),
            &with_le,
            histogram.count() as f64,
        );
        self.sample(&format!("{name}_sum"), labels, histogram.sum);
        self.sample(&format!("{name}_count"), labels, histogram.count() as f64);
    }

    /// The text.
    pub fn finish(self) -> String {
        self.text
    }
}

/// A label value escaped for the text format.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_labels_escaped() {
        let mut h = Histogram::default();
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_millis(70));
        h.observe(Duration::from_secs(100));
        let mut out = Exposition::default();
        out.histogram("x_seconds", "X.", &[("cs", "a\"b")], &h);
        let text = out.finish();
        assert!(
            text.contains("x_seconds_bucket{cs=\"a\\\"b\",le=\"0.005\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("x_seconds_bucket{cs=\"a\\\"b\",le=\"0.1\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("x_seconds_bucket{cs=\"a\\\"b\",le=\"+Inf\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("x_seconds_count{cs=\"a\\\"b\"} 3\n"),
            "{text}"
        );
        assert_eq!(text.matches("# TYPE x_seconds histogram").count(), 1);
    }
}
