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

#[derive(Default)]
struct Inner {
    /// Series by metric name, then by rendered label set
    /// (`model="m",status="ok"`): a sample for a series that exists
    /// allocates nothing.
    counters: BTreeMap<&'static str, BTreeMap<String, u64>>,
    histograms: BTreeMap<&'static str, BTreeMap<String, Histogram>>,
    gauges: BTreeMap<&'static str, BTreeMap<String, f64>>,
    /// Where a sample's label set is rendered for the lookup.
    scratch: String,
}

/// Applies `f` to the series of `name` with the label set `key`, created
/// on first use.
fn update<V: Default>(
    map: &mut BTreeMap<&'static str, BTreeMap<String, V>>,
    name: &'static str,
    key: &str,
    f: impl FnOnce(&mut V),
) {
    let by_labels = map.entry(name).or_default();
    match by_labels.get_mut(key) {
        Some(v) => f(v),
        None => f(by_labels.entry(key.to_string()).or_default()),
    }
}

/// Renders label pairs as Prometheus writes them inside the braces.
fn render_labels(out: &mut String, pairs: &[(&'static str, &str)]) {
    out.clear();
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(k);
        out.push_str("=\"");
        // Label values almost never need escaping: copy them whole.
        if !v.bytes().any(|b| matches!(b, b'\\' | b'"' | b'\n')) {
            out.push_str(v);
            out.push('"');
            continue;
        }
        for c in v.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '"' => out.push_str("\\\""),
                '\n' => out.push_str("\\n"),
                c => out.push(c),
            }
        }
        out.push('"');
    }
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
    (
        "sluice_ledger_handovers_total",
        "counter",
        "Times the embedded store's ledger writer handed its connection between its quiet and catch-up threads (rises while other work keeps the cores busy).",
    ),
    (
        "sluice_ledger_refusals_total",
        "counter",
        "Requests turned away (503 overloaded) because the embedded store's ledger writer was behind: its queue full, or one commit held for 2 s.",
    ),
];

#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Metrics {
    pub fn inc(&self, name: &'static str, pairs: &[(&'static str, &str)], by: u64) {
        if let Ok(mut g) = self.inner.lock() {
            let Inner {
                counters, scratch, ..
            } = &mut *g;
            render_labels(scratch, pairs);
            update(counters, name, scratch, |c| *c += by);
        }
    }

    pub fn observe(&self, name: &'static str, pairs: &[(&'static str, &str)], v: f64) {
        if let Ok(mut g) = self.inner.lock() {
            let Inner {
                histograms,
                scratch,
                ..
            } = &mut *g;
            render_labels(scratch, pairs);
            update(histograms, name, scratch, |h| h.observe(v));
        }
    }

    pub fn set(&self, name: &'static str, pairs: &[(&'static str, &str)], v: f64) {
        if let Ok(mut g) = self.inner.lock() {
            let Inner {
                gauges, scratch, ..
            } = &mut *g;
            render_labels(scratch, pairs);
            update(gauges, name, scratch, |g| *g = v);
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let Ok(g) = self.inner.lock() else {
            return out;
        };
        let braces = |l: &str| {
            if l.is_empty() {
                String::new()
            } else {
                format!("{{{l}}}")
            }
        };
        let sep = |l: &str| if l.is_empty() { "" } else { "," };
        for (name, kind, help) in HELP {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (l, v) in g.counters.get(name).into_iter().flatten() {
                let _ = writeln!(out, "{name}{} {v}", braces(l));
            }
            for (l, v) in g.gauges.get(name).into_iter().flatten() {
                let _ = writeln!(out, "{name}{} {v}", braces(l));
            }
            for (l, h) in g.histograms.get(name).into_iter().flatten() {
                for (i, b) in BUCKETS.iter().enumerate() {
                    let c = h.counts.get(i).copied().unwrap_or(0);
                    let _ = writeln!(out, "{name}_bucket{{{l}{}le=\"{b}\"}} {c}", sep(l));
                }
                let _ = writeln!(out, "{name}_bucket{{{l}{}le=\"+Inf\"}} {}", sep(l), h.count);
                let _ = writeln!(out, "{name}_sum{} {}", braces(l), h.sum);
                let _ = writeln!(out, "{name}_count{} {}", braces(l), h.count);
            }
        }
        out
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
