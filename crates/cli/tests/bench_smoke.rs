//! Keeps `sluice bench` from rotting: each benchmark runs in its tiny
//! `--smoke` form (peers only if already installed) and its final line
//! must have the documented shape. Never asserts on the figures.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_sluice")
}

/// Runs `sluice ARGS`, failing the test after `timeout`; returns stdout.
fn run(args: &[&str], timeout: Duration) -> String {
    let mut child = Command::new(bin())
        .args(args)
        .env("SLUICE_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        stdout.read_to_string(&mut s).unwrap();
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        stderr.read_to_string(&mut s).unwrap();
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "sluice {args:?} did not finish within {timeout:?}; stderr:\n{}",
                err.join().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    assert!(
        status.success(),
        "sluice {args:?} failed ({status}):\n{out}\n{err}"
    );
    out
}

/// The `key=value` pairs of the last stdout line, which must start with
/// `prefix` and name exactly `keys`, in order, each a number or `na`.
fn final_line(out: &str, prefix: &str, keys: &[&str]) -> Vec<(String, String)> {
    let last = out.lines().last().unwrap_or_default();
    let rest = last
        .strip_prefix(prefix)
        .unwrap_or_else(|| panic!("last line is not `{prefix}...`:\n{out}"));
    let pairs: Vec<(String, String)> = rest
        .split(' ')
        .map(|kv| {
            let (k, v) = kv
                .split_once('=')
                .unwrap_or_else(|| panic!("`{kv}` in {last}"));
            (k.to_string(), v.to_string())
        })
        .collect();
    let names: Vec<&str> = pairs.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(names, keys, "{last}");
    for (k, v) in &pairs {
        assert!(
            v == "na" || v.parse::<f64>().is_ok_and(f64::is_finite),
            "{k}={v} is neither a number nor na: {last}"
        );
    }
    pairs
}

fn value<'a>(pairs: &'a [(String, String)], key: &str) -> &'a str {
    &pairs.iter().find(|(k, _)| k == key).unwrap().1
}

/// The line above the final one judges the given figures against the
/// project's targets, each `met`, `not met` or `not measured`, and counts
/// the ones met.
fn assert_targets_line(out: &str, keys: &[&str]) {
    let lines: Vec<&str> = out.lines().collect();
    let line = lines
        .len()
        .checked_sub(2)
        .map(|i| lines[i])
        .unwrap_or_default();
    let rest = line
        .strip_prefix("targets: ")
        .unwrap_or_else(|| panic!("no targets line above the final line:\n{out}"));
    let (judged, count) = rest
        .rsplit_once(" (")
        .unwrap_or_else(|| panic!("no count: {line}"));
    let parts: Vec<&str> = judged.split("; ").collect();
    assert_eq!(parts.len(), keys.len(), "{line}");
    let mut met = 0;
    for (part, key) in parts.iter().zip(keys) {
        assert!(part.starts_with(&format!("{key} ")), "{part} in {line}");
        if part.ends_with(" met") && !part.ends_with(" not met") {
            met += 1;
        } else {
            assert!(
                part.ends_with(" not met") || part.ends_with(" not measured"),
                "{part} in {line}"
            );
        }
    }
    assert_eq!(count, format!("{met} of {} met)", keys.len()), "{line}");
}

#[test]
fn bench_gateway_smoke_prints_its_summary_line() {
    let out = run(&["bench", "gateway", "--smoke"], Duration::from_secs(600));
    let pairs = final_line(
        &out,
        "bench gateway: ",
        &[
            "sluice_p99_added_ms",
            "litellm_p99_added_ms",
            "sluice_cpu_us_per_req",
            "litellm_cpu_us_per_req",
            "rps_ratio",
        ],
    );
    // Sluice itself is always measured; LiteLLM only where it is installed.
    assert_ne!(value(&pairs, "sluice_p99_added_ms"), "na", "{out}");
    assert_ne!(value(&pairs, "sluice_cpu_us_per_req"), "na", "{out}");
    assert_targets_line(
        &out,
        &["sluice_p99_added_ms", "sluice_cpu_us_per_req", "rps_ratio"],
    );
    assert!(out.contains("latency c=1 p50 (ms)"), "{out}");
    // The idle row and the two steal rows (c=1, then the high
    // concurrency) hold percentages, or `na`.
    let rows: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("cores idle, c=") || l.starts_with("host steal, c="))
        .collect();
    assert_eq!(rows.len(), 3, "{out}");
    for line in rows {
        // After the four words of the row's name: one value per gateway.
        let values: Vec<&str> = line.split_whitespace().skip(4).collect();
        assert!(!values.is_empty(), "{line}");
        assert!(
            values
                .iter()
                .all(|v| *v == "na" || v.parse::<f64>().is_ok_and(|p| (0.0..=100.0).contains(&p))),
            "{line}"
        );
    }
    // The gateway's CPU by thread (the smoke window is too short for
    // every thread to show a clock tick, so the names are not checked).
    assert!(
        out.lines().any(|l| l.starts_with("sluice threads, c=")),
        "no thread line: {out}"
    );
    // Each gateway's throughput per run, one number a run (the ratio per
    // run shows only where LiteLLM is installed).
    let per_run: Vec<&str> = out
        .lines()
        .filter(|l| l.contains(" throughput c=") && l.contains(" per run (req/s): "))
        .collect();
    assert!(
        per_run.iter().any(|l| l.starts_with("sluice ")),
        "no per-run throughput line for sluice: {out}"
    );
    for line in per_run {
        let (_, values) = line.split_once("(req/s): ").unwrap();
        assert!(
            values
                .split(", ")
                .all(|v| v.parse::<f64>().is_ok_and(f64::is_finite)),
            "{line}"
        );
    }
    assert_machine_line(&out);
}

/// Both benchmarks say what they ran on, with a measured wake-up round trip.
fn assert_machine_line(out: &str) {
    let line = out
        .lines()
        .find(|l| l.starts_with("machine: "))
        .unwrap_or_else(|| panic!("no machine line in:\n{out}"));
    assert!(line.contains("logical CPUs"), "{line}");
    assert!(
        line.contains("wake-up round trip between two threads"),
        "{line}"
    );
    assert!(line.contains(" µs"), "{line}");
}

#[test]
fn bench_engine_smoke_prints_its_summary_line() {
    let out = run(&["bench", "engine", "--smoke"], Duration::from_secs(900));
    let pairs = final_line(
        &out,
        "bench engine: ",
        &[
            "sluice_tok_s",
            "llamacpp_tok_s",
            "ratio1",
            "sluice_agg8_tok_s",
            "llamacpp_agg8_tok_s",
            "ratio8",
        ],
    );
    assert_ne!(value(&pairs, "sluice_tok_s"), "na", "{out}");
    assert_ne!(value(&pairs, "sluice_agg8_tok_s"), "na", "{out}");
    assert_targets_line(&out, &["ratio1", "ratio8"]);
    // The embedded engine's tok/s in each run, at one stream and at eight.
    for prefix in ["sluice 1: tok/s per run: ", "sluice 8: tok/s per run: "] {
        let line = out
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line starting {prefix:?} in:\n{out}"));
        assert!(
            line[prefix.len()..]
                .split(", ")
                .all(|v| v.parse::<f64>().is_ok_and(|x| x > 0.0)),
            "{line}"
        );
    }
    assert_machine_line(&out);
}

#[test]
fn upstream_engine_miner_config_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("miner.toml");
    std::fs::write(
        &path,
        "validator = \"http://127.0.0.1:8000\"\n[engine]\nkind = \"upstream\"\nurl = \"http://127.0.0.1:8080/v1\"\nmodel_id = \"my-model\"\ncapacity = 16\n",
    )
    .unwrap();
    let out = run(
        &[
            "miner",
            "--config",
            path.to_str().unwrap(),
            "--check-config",
        ],
        Duration::from_secs(60),
    );
    assert!(out.contains("configuration ok"), "{out}");
    std::fs::write(
        &path,
        "validator = \"http://127.0.0.1:8000\"\n[engine]\nkind = \"upstream\"\nurl = \"http://127.0.0.1:8080\"\nmodel_id = \"m\"\ncapacity = 1\nbogus = 1\n",
    )
    .unwrap();
    let status = Command::new(bin())
        .args([
            "miner",
            "--config",
            path.to_str().unwrap(),
            "--check-config",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(!status.success(), "unknown keys must be rejected");
}
