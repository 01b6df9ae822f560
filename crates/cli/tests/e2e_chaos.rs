//! Resilient routing with real processes: miners running the scripted
//! fake engine (deterministic text " t0 t1 t2 ...", so any splice or
//! repeat after a failover is visible), killed, stalled and overloaded.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

fn validator(dir: &Path, extra: &str) -> (Proc, String, String) {
    let data = dir.join("validator");
    let cfg = dir.join("validator.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n{extra}",
            data.display()
        ),
    )
    .unwrap();
    let (p, ready) = Proc::start(
        &["validator", "--config", cfg.to_str().unwrap()],
        dir,
        "validator",
        "ready: ",
        Duration::from_secs(60),
    );
    let key = run(&[
        "keys",
        "create",
        "--data-dir",
        data.to_str().unwrap(),
        "--tier",
        "paid",
    ])
    .trim()
    .to_string();
    let key_id = &key[4..20];
    run(&[
        "balance",
        "add",
        "--key-id",
        key_id,
        "--usd",
        "100",
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    (p, base_from_ready(&ready), key)
}

/// The exact text the fake engine produces for `n` tokens.
fn expected_text(n: u32) -> String {
    (0..n).map(sluice_engine::fake::fake_token).collect()
}

/// Streams one chat completion; returns (content, usage) or panics with why.
async fn stream_chat(base: &str, key: &str, max_tokens: u32) -> Result<(String, Value), String> {
    let resp = client()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(key)
        .json(&json!({"model": MODEL, "messages": [{"role": "user", "content": "go"}],
                      "max_tokens": max_tokens, "stream": true, "stream_options": {"include_usage": true}}))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if resp.status() != 200 {
        return Err(format!("status {}", resp.status()));
    }
    let body = resp.text().await.map_err(|e| e.to_string())?;
    let payloads = sse_payloads(&body);
    if payloads.last().map(String::as_str) != Some("[DONE]") {
        return Err(format!("no [DONE]: {body}"));
    }
    let mut text = String::new();
    let mut usage = Value::Null;
    let mut ids = std::collections::HashSet::new();
    for p in &payloads[..payloads.len() - 1] {
        let v: Value = serde_json::from_str(p).map_err(|e| e.to_string())?;
        if v.get("error").is_some() {
            return Err(format!("error event: {p}"));
        }
        ids.insert(v["id"].as_str().unwrap_or("").to_string());
        if let Some(c) = v["choices"][0]["delta"]["content"].as_str() {
            text.push_str(c);
        }
        if !v["usage"].is_null() {
            usage = v["usage"].clone();
        }
    }
    if ids.len() != 1 {
        return Err(format!("{} different ids in one stream", ids.len()));
    }
    Ok((text, usage))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_miner_mid_stream_loses_no_request() {
    let dir = tempfile::tempdir().unwrap();
    let (_v, base, key) = validator(dir.path(), "");
    let script = "capacity = 16\ntoken_delay_ms = 25\n";
    let mut miners: Vec<Proc> = (0..3)
        .map(|i| fake_miner(dir.path(), &base, &format!("m{i}"), script))
        .collect();
    wait_routable(&base, 3).await;

    let tokens = 60;
    let mut tasks = Vec::new();
    for _ in 0..30 {
        let (base, key) = (base.clone(), key.clone());
        tasks.push(tokio::spawn(async move {
            stream_chat(&base, &key, tokens).await
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    miners[1].kill9();
    let mut failures = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok((text, usage)) => {
                // Continued, not spliced: exactly one uninterrupted sequence.
                assert_eq!(text, expected_text(tokens));
                assert_eq!(usage["completion_tokens"], tokens);
            }
            Err(e) => failures.push(e),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of 30 failed: {failures:?}",
        failures.len()
    );
    let metrics = client()
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let failovers: u64 = metrics
        .lines()
        .find(|l| l.starts_with("sluice_failovers_total{"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(failovers > 0, "no failover happened: {metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_miner_is_failed_over_within_the_stall_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let (_v, base, key) = validator(dir.path(), "stall_timeout_s = 1.0\n");
    let _stalls = fake_miner(
        dir.path(),
        &base,
        "staller",
        "capacity = 8\nstall_after = 5\n",
    );
    wait_routable(&base, 1).await;
    // Only the staller is up: the first request starts there.
    let first = {
        let (base, key) = (base.clone(), key.clone());
        tokio::spawn(async move { stream_chat(&base, &key, 20).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _healthy = fake_miner(dir.path(), &base, "healthy", "capacity = 8\n");
    wait_routable(&base, 2).await;
    let started = Instant::now();
    let (text, usage) = first.await.unwrap().unwrap();
    assert_eq!(text, expected_text(20));
    assert_eq!(usage["completion_tokens"], 20);
    assert!(started.elapsed() < Duration::from_secs(10));
    // Non-streamed requests fail over the same way.
    for _ in 0..4 {
        let (status, _, body) = post(
            &base,
            "/v1/chat/completions",
            Some(&key),
            json!({"model": MODEL, "messages": [{"role": "user", "content": "go"}], "max_tokens": 12}),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["choices"][0]["message"]["content"], expected_text(12));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_miners_give_all_targets_failed_and_errors_after_streaming_are_sse() {
    let dir = tempfile::tempdir().unwrap();
    let (_v, base, key) = validator(dir.path(), "");
    let _bad = fake_miner(dir.path(), &base, "bad", "fail_before_first = true\n");
    wait_routable(&base, 1).await;
    let (status, _, body) = post(
        &base,
        "/v1/chat/completions",
        Some(&key),
        json!({"model": MODEL, "messages": [{"role": "user", "content": "go"}], "max_tokens": 4}),
    )
    .await;
    assert_eq!(status, 500, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["code"], "all_targets_failed");

    // A miner that dies mid-stream with no other instance: the client gets
    // an SSE error event and [DONE], never a bare JSON body.
    let dir2 = tempfile::tempdir().unwrap();
    let (_v2, base2, key2) = validator(dir2.path(), "");
    let _dies = fake_miner(dir2.path(), &base2, "dies", "die_after = 3\n");
    wait_routable(&base2, 1).await;
    let resp = client()
        .post(format!("{base2}/v1/chat/completions"))
        .bearer_auth(&key2)
        .header("x-sluice-max-wait", "1")
        .json(&json!({"model": MODEL, "messages": [{"role": "user", "content": "go"}], "max_tokens": 10, "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let payloads = sse_payloads(&resp.text().await.unwrap());
    assert_eq!(payloads.last().unwrap(), "[DONE]");
    let err: Value = serde_json::from_str(&payloads[payloads.len() - 2]).unwrap();
    assert!(err["error"]["code"].is_string(), "{payloads:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_queues_instead_of_rejecting() {
    let dir = tempfile::tempdir().unwrap();
    let (_v, base, key) = validator(dir.path(), "paid_rpm = 100000\n");
    // Two miners, 2 slots each, 250 ms per request: about 16 requests/s.
    let script = "capacity = 2\ntoken_delay_ms = 50\n";
    let _m1 = fake_miner(dir.path(), &base, "m1", script);
    let _m2 = fake_miner(dir.path(), &base, "m2", script);
    wait_routable(&base, 2).await;

    // Offer three times that (48/s) for 20 s; half the clients wait up to
    // 2 s, half up to 8 s.
    let start = Instant::now();
    let mut tasks = Vec::new();
    let mut i = 0u32;
    while start.elapsed() < Duration::from_secs(20) {
        let (base, key) = (base.clone(), key.clone());
        let wait = if i.is_multiple_of(2) { 2.0 } else { 8.0 };
        tasks.push(tokio::spawn(async move {
            let t0 = Instant::now();
            let resp = client()
                .post(format!("{base}/v1/chat/completions"))
                .bearer_auth(&key)
                .header("x-sluice-max-wait", wait.to_string())
                .json(&json!({"model": MODEL, "messages": [{"role": "user", "content": "go"}], "max_tokens": 6}))
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            let retry_after = resp.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
            let _ = resp.text().await;
            (status, t0.elapsed().as_secs_f64(), wait, retry_after)
        }));
        i += 1;
        tokio::time::sleep(Duration::from_micros(20_833)).await;
    }
    let (mut ok, mut refused) = (0, 0);
    for t in tasks {
        let (status, elapsed, wait, retry_after) = t.await.unwrap();
        match status {
            200 => ok += 1,
            503 => {
                refused += 1;
                // Refused only once its own deadline had really passed.
                assert!(
                    elapsed >= wait - 0.05,
                    "503 after {elapsed:.2}s with a {wait}s deadline"
                );
                let secs: u64 = retry_after
                    .expect("503 without Retry-After")
                    .parse()
                    .unwrap();
                assert!(secs >= 1);
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert!(ok > 200, "only {ok} served");
    assert!(
        refused > 0,
        "3x overload for 20 s must refuse some short-deadline requests"
    );
}

/// Miners serve only invocations a registered validator authenticated:
/// no MAC, a forged MAC, a MAC under a key computed by a third party from
/// the public keys, or a stale time are all refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn miners_refuse_invocations_without_a_valid_mac() {
    use sluice_proto::miner::{
        invoke_mac_hex, pair_key, parse_public, NonceResponse, HDR_MAC, HDR_REQUEST_ID,
        HDR_TIMESTAMP, HDR_VALIDATOR,
    };
    let dir = tempfile::tempdir().unwrap();
    let (_v, base, key) = validator(dir.path(), "");
    let (_m, endpoint) = fake_miner_at(dir.path(), &base, "m", "capacity = 2\n");
    wait_routable(&base, 1).await;
    let http = client();
    let nonce: NonceResponse = http
        .get(format!("{base}/miner/v1/nonce"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let body = serde_json::to_vec(&json!({
        "request_id": "forged", "model": MODEL,
        "input": {"kind": "text", "prompt": "hi"}, "params": {}, "continuation": ""
    }))
    .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    // An attacker knows the public keys only: its own key with the
    // validator's gives a secret the miner does not share.
    let attacker = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
    let forged_key = pair_key(&attacker, &parse_public(&nonce.validator_key).unwrap()).unwrap();
    let cases = [
        ("no MAC", None, now),
        ("garbage MAC", Some("00".repeat(32)), now),
        (
            "MAC under a third party's key",
            Some(invoke_mac_hex(&forged_key, "forged", now, &body)),
            now,
        ),
        (
            "stale time",
            Some(invoke_mac_hex(&forged_key, "forged", now - 120_000, &body)),
            now - 120_000,
        ),
    ];
    for (what, mac, ts) in cases {
        let mut req = http
            .post(format!("{endpoint}/v1/invoke"))
            .header("content-type", "application/json")
            .header(HDR_REQUEST_ID, "forged")
            .header(HDR_TIMESTAMP, ts.to_string())
            .header(HDR_VALIDATOR, &nonce.validator_key)
            .body(body.clone());
        if let Some(mac) = mac {
            req = req.header(HDR_MAC, mac);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 401, "{what} was accepted");
    }
    // The validator's own invocations still go through.
    let (status, _, body) = post(
        &base,
        "/v1/chat/completions",
        Some(&key),
        json!({"model": MODEL, "messages": [{"role": "user", "content": "go"}], "max_tokens": 3}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
}

/// Sends `body` to `base` + `path` over HTTP/2 with prior knowledge (no
/// upgrade, as gRPC-style clients and proxies speak it) and reads the
/// whole answer: status, content type and body.
async fn post_h2(base: &str, path: &str, key: Option<&str>, body: Value) -> (u16, String, String) {
    let authority = base.trim_start_matches("http://");
    let tcp = tokio::net::TcpStream::connect(authority).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut client = client.ready().await.unwrap();
    let mut req =
        http::Request::post(format!("{base}{path}")).header("content-type", "application/json");
    if let Some(k) = key {
        req = req.header("authorization", format!("Bearer {k}"));
    }
    let (answer, mut send) = client.send_request(req.body(()).unwrap(), false).unwrap();
    send.send_data(serde_json::to_vec(&body).unwrap().into(), true)
        .unwrap();
    let resp = answer.await.unwrap();
    let status = resp.status().as_u16();
    let content_type = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let mut body = resp.into_body();
    let mut text = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
        text.extend_from_slice(&chunk);
    }
    (status, content_type, String::from_utf8(text).unwrap())
}

/// The public API also speaks HTTP/2 without upgrade: answers, streams and
/// errors are the same as over HTTP/1.1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_public_api_answers_http2_with_prior_knowledge() {
    let dir = tempfile::tempdir().unwrap();
    let (_v, base, key) = validator(dir.path(), "");
    let _m = fake_miner(dir.path(), &base, "m1", "capacity = 4\n");
    wait_routable(&base, 1).await;
    let chat = |stream: bool| json!({"model": MODEL, "messages": [{"role": "user", "content": "go"}], "max_tokens": 5, "stream": stream});

    let (status, _, body) = post_h2(&base, "/v1/chat/completions", Some(&key), chat(false)).await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], expected_text(5));
    assert_eq!(v["usage"]["completion_tokens"], 5);

    let (status, content_type, body) =
        post_h2(&base, "/v1/chat/completions", Some(&key), chat(true)).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        content_type.starts_with("text/event-stream"),
        "{content_type}"
    );
    let payloads = sse_payloads(&body);
    assert_eq!(payloads.last().unwrap(), "[DONE]");
    let text: String = payloads[..payloads.len() - 1]
        .iter()
        .filter_map(|p| serde_json::from_str::<Value>(p).ok())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(text, expected_text(5));

    let (status, _, body) = post_h2(&base, "/v1/chat/completions", None, chat(false)).await;
    assert_eq!(status, 401, "{body}");
    let err: Value = serde_json::from_str(&body).unwrap();
    assert!(err["error"]["message"].is_string(), "{body}");
    assert!(err["error"]["type"].is_string(), "{body}");
}
