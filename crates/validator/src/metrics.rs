//! Prometheus metrics named for LLM serving, rendered in the text format.
//! A small hand-rolled registry: few series, no extra dependency.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

#[derive(Default, Clone)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, v: f64) {
        if self.counts.is_empty() {
            self.counts = vec![0; BUCKETS.len()];
        }
        for (i, b) in BUCKETS.iter().enumerate() {
            if v <= *b {
                self.counts[i] += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }
}

type Labels = Vec<(&'static str, String)>;

#[derive(Default)]
struct Inner {
    counters: BTreeMap<(&'static str, Labels), u64>,
    histograms: BTreeMap<(&'static str, Labels), Histogram>,
    gauges: BTreeMap<(&'static str, Labels), f64>,
}

/// Help text of every metric, in render order.
const HELP: &[(&str, &str, &str)] = &[
    (
        "sluice_requests_total",
        "counter",
        "API requests by model and outcome.",
    ),
    (
        "sluice_prompt_tokens_total",
        "counter",
        "Prompt tokens processed, from engine counts.",
    ),
    (
        "sluice_generated_tokens_total",
        "counter",
        "Completion tokens generated, from engine counts.",
    ),
    (
        "sluice_failovers_total",
        "counter",
        "Retries and mid-stream failovers to another instance.",
    ),
    (
        "sluice_queue_wait_seconds",
        "histogram",
        "Time a request waited for a free instance slot.",
    ),
    (
        "sluice_time_to_first_token_seconds",
        "histogram",
        "Time from request arrival to the first generated text.",
    ),
    (
        "sluice_request_duration_seconds",
        "histogram",
        "Time from request arrival to the end of the response.",
    ),
    (
        "sluice_gateway_overhead_seconds",
        "histogram",
        "Validator time before forwarding, excluding queue wait and upstream time.",
    ),
    (
        "sluice_decode_tokens_per_second",
        "histogram",
        "Per-request generation speed after the first token.",
    ),
    ("sluice_instances", "gauge", "Routable instances per model."),
    (
        "sluice_queue_depth",
        "gauge",
        "Requests waiting for capacity per model.",
    ),
];

#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

fn labels(pairs: &[(&'static str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (*k, (*v).to_string())).collect()
}

impl Metrics {
    pub fn inc(&self, name: &'static str, pairs: &[(&'static str, &str)], by: u64) {
        if let Ok(mut g) = self.inner.lock() {
            *g.counters.entry((name, labels(pairs))).or_default() += by;
        }
    }

    pub fn observe(&self, name: &'static str, pairs: &[(&'static str, &str)], v: f64) {
        if let Ok(mut g) = self.inner.lock() {
            g.histograms
                .entry((name, labels(pairs)))
                .or_default()
                .observe(v);
        }
    }

    pub fn set(&self, name: &'static str, pairs: &[(&'static str, &str)], v: f64) {
        if let Ok(mut g) = self.inner.lock() {
            g.gauges.insert((name, labels(pairs)), v);
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let Ok(g) = self.inner.lock() else {
            return out;
        };
        for (name, kind, help) in HELP {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for ((n, l), v) in g.counters.iter().filter(|((n, _), _)| n == name) {
                let _ = writeln!(out, "{n}{} {v}", fmt_labels(l, None));
            }
            for ((n, l), v) in g.gauges.iter().filter(|((n, _), _)| n == name) {
                let _ = writeln!(out, "{n}{} {v}", fmt_labels(l, None));
            }
            for ((n, l), h) in g.histograms.iter().filter(|((n, _), _)| n == name) {
                for (i, b) in BUCKETS.iter().enumerate() {
                    let c = h.counts.get(i).copied().unwrap_or(0);
                    let _ = writeln!(out, "{n}_bucket{} {c}", fmt_labels(l, Some(&b.to_string())));
                }
                let _ = writeln!(out, "{n}_bucket{} {}", fmt_labels(l, Some("+Inf")), h.count);
                let _ = writeln!(out, "{n}_sum{} {}", fmt_labels(l, None), h.sum);
                let _ = writeln!(out, "{n}_count{} {}", fmt_labels(l, None), h.count);
            }
        }
        out
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn fmt_labels(l: &Labels, le: Option<&str>) -> String {
    let mut parts: Vec<String> = l
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    if let Some(le) = le {
        parts.push(format!("le=\"{le}\""));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", parts.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.inc(
            "sluice_requests_total",
            &[("model", "a\"b"), ("status", "ok")],
            2,
        );
        m.observe("sluice_time_to_first_token_seconds", &[("model", "m")], 0.3);
        let text = m.render();
        assert!(text.contains("sluice_requests_total{model=\"a\\\"b\",status=\"ok\"} 2"));
        assert!(
            text.contains("sluice_time_to_first_token_seconds_bucket{model=\"m\",le=\"0.5\"} 1")
        );
        assert!(
            text.contains("sluice_time_to_first_token_seconds_bucket{model=\"m\",le=\"0.25\"} 0")
        );
        assert!(text.contains("sluice_time_to_first_token_seconds_count{model=\"m\"} 1"));
        assert!(text.contains("# TYPE sluice_queue_depth gauge"));
    }
}
