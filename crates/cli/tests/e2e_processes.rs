//! End to end with separate processes: `sluice validator` plus
//! `sluice miner`s registering over HTTP, the real model behind them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

fn start_validator(dir: &std::path::Path) -> (Proc, String) {
    let data = dir.join("validator");
    let (p, ready) = Proc::start(
        &[
            "validator",
            "--data-dir",
            data.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
        dir,
        "validator",
        "ready: ",
        Duration::from_secs(60),
    );
    (p, base_from_ready(&ready))
}

fn start_miner(dir: &std::path::Path, base: &str, name: &str, model: &std::path::Path) -> Proc {
    let data = dir.join(name);
    Proc::start(
        &[
            "miner",
            "--validator",
            base,
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().unwrap(),
            "--model",
            model.to_str().unwrap(),
            "--model-id",
            MODEL,
            "--threads",
            "1",
        ],
        dir,
        name,
        "miner serving on ",
        Duration::from_secs(120),
    )
    .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validator_and_two_miner_processes_serve_requests() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_in(&dir.path().join("m"));
    let (_validator, base) = start_validator(dir.path());
    let key = run(&[
        "keys",
        "create",
        "--data-dir",
        dir.path().join("validator").to_str().unwrap(),
        "--name",
        "t",
    ])
    .trim()
    .to_string();
    assert!(key.starts_with("cpk_"));
    let _m1 = start_miner(dir.path(), &base, "miner1", &model);
    let _m2 = start_miner(dir.path(), &base, "miner2", &model);
    wait_routable(&base, 2).await;

    // Concurrent requests spread over both miners and all succeed.
    let mut tasks = Vec::new();
    for i in 0..6 {
        let base = base.clone();
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            let stream = i % 2 == 0;
            post(
                &base,
                "/v1/chat/completions",
                Some(&key),
                json!({"model": MODEL, "messages": [{"role": "user", "content": "Count to three."}],
                       "max_tokens": 8, "stream": stream}),
            )
            .await
        }));
    }
    for t in tasks {
        let (status, _, body) = t.await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("assistant"));
    }
    let metrics = client()
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(&format!(
            "sluice_requests_total{{model=\"{MODEL}\",status=\"ok\"}} 6"
        )),
        "{metrics}"
    );
    // The embedded store's writer threads report their hand-overs.
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("sluice_ledger_handovers_total ")),
        "{metrics}"
    );
    // Nothing was turned away for the ledger, and the counter says so.
    assert!(
        metrics
            .lines()
            .any(|l| l == "sluice_ledger_refusals_total 0"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_miner_means_503_with_retry_after_and_a_late_miner_serves_waiters() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_in(&dir.path().join("m"));
    let (_validator, base) = start_validator(dir.path());
    let key = run(&[
        "keys",
        "create",
        "--data-dir",
        dir.path().join("validator").to_str().unwrap(),
    ])
    .trim()
    .to_string();
    let body =
        json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4});

    // Nobody serves the model and the client will wait one second only.
    let resp = client()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(&key)
        .header("x-sluice-max-wait", "1")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "no_capacity");

    // A bad header value is a 400 naming it.
    let resp = client()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(&key)
        .header("x-sluice-max-wait", "soon")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);

    // Requests wait (default deadline) while a miner starts, then succeed.
    let mut waiting = Vec::new();
    for _ in 0..3 {
        let (base, key, body) = (base.clone(), key.clone(), body.clone());
        waiting.push(tokio::spawn(async move {
            post(&base, "/v1/chat/completions", Some(&key), body).await
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _miner = start_miner(dir.path(), &base, "late-miner", &model);
    for w in waiting {
        let (status, _, body) = w.await.unwrap();
        assert_eq!(status, 200, "{body}");
    }
}

#[test]
fn refuses_to_start_on_bad_config() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("v.toml");
    std::fs::write(&cfg, "listen = \"127.0.0.1:0\"\nmax_atempts = 3\n").unwrap();
    let out = std::process::Command::new(bin())
        .args([
            "validator",
            "--config",
            cfg.to_str().unwrap(),
            "--check-config",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown field"));
    std::fs::write(&cfg, "listen = \"127.0.0.1:0\"\nmax_attempts = 3\n").unwrap();
    let out = std::process::Command::new(bin())
        .args([
            "validator",
            "--config",
            cfg.to_str().unwrap(),
            "--check-config",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    // A port already taken is a clear error, not a panic.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = std::process::Command::new(bin())
        .args([
            "validator",
            "--data-dir",
            dir.path().to_str().unwrap(),
            "--listen",
            &addr,
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot listen"));
    // A miner listening on every interface must say where it can be
    // reached; the flag may come after a config file that leaves it out.
    let miner = |extra: &[&str]| {
        std::process::Command::new(bin())
            .args(["miner", "--listen", "0.0.0.0:9000", "--check-config"])
            .args(extra)
            .output()
            .unwrap()
    };
    let out = miner(&[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("set advertise"), "{stderr}");
    let out = miner(&["--advertise", "http://192.0.2.10:9000"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
