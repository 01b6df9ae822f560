//! End to end: `sluice up` with the real model, driven over HTTP like any
//! OpenAI client would, then shut down with SIGTERM.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const CANARY: &str = "zebra-canary-7731";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_serves_the_openai_api_with_the_real_model() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let model = model_in(&data);
    let (mut up, ready) = Proc::start(
        &[
            "up",
            "--data-dir",
            data.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--miners",
            "2",
        ],
        dir.path(),
        "up",
        "ready: ",
        Duration::from_secs(300),
    );
    let base = base_from_ready(&ready);
    let key = std::fs::read_to_string(data.join("api-key"))
        .unwrap()
        .trim()
        .to_string();
    assert!(key.starts_with("cpk_"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(data.join("api-key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    // Non-streamed chat, greedy: usage from the engine's tokenizer.
    let question = format!("Repeat this word: {CANARY}");
    let chat = json!({"model": MODEL, "messages": [{"role": "user", "content": question}],
                      "max_tokens": 12, "temperature": 0});
    let (status, headers, body) =
        post(&base, "/v1/chat/completions", Some(&key), chat.clone()).await;
    assert_eq!(status, 200, "{body}");
    let request_id = headers["x-request-id"].to_str().unwrap().to_string();
    let v: Value = serde_json::from_str(&body).unwrap();
    let text = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(!text.is_empty());
    let expected_prompt: u64 = run(&[
        "models",
        "tokenize",
        "--model",
        model.to_str().unwrap(),
        "--chat",
        &question,
    ])
    .trim()
    .parse()
    .unwrap();
    assert_eq!(v["usage"]["prompt_tokens"], expected_prompt, "{body}");
    let completion = v["usage"]["completion_tokens"].as_u64().unwrap();
    assert!((1..=12).contains(&completion));
    if v["choices"][0]["finish_reason"] == "length" {
        assert_eq!(completion, 12);
    }
    assert_eq!(
        v["usage"]["total_tokens"].as_u64().unwrap(),
        expected_prompt + completion
    );

    // The same request streamed: same text, same usage, one id, [DONE] last.
    let mut streamed = chat.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let (status, headers, body) = post(&base, "/v1/chat/completions", Some(&key), streamed).await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "text/event-stream");
    let payloads = sse_payloads(&body);
    assert_eq!(payloads.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = payloads[..payloads.len() - 1]
        .iter()
        .map(|p| serde_json::from_str(p).unwrap())
        .collect();
    let id = chunks[0]["id"].as_str().unwrap();
    assert!(chunks
        .iter()
        .all(|c| c["id"] == id && c["object"] == "chat.completion.chunk"));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed_text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed_text, text);
    let usage_chunk = chunks.last().unwrap();
    assert_eq!(usage_chunk["choices"].as_array().unwrap().len(), 0);
    assert_eq!(usage_chunk["usage"], v["usage"]);
    assert_eq!(
        chunks[chunks.len() - 2]["choices"][0]["finish_reason"],
        v["choices"][0]["finish_reason"]
    );

    // Text completions, raw prompt: prompt tokens match the tokenizer.
    let prompt = "The capital of France is";
    let (status, _, body) = post(
        &base,
        "/v1/completions",
        Some(&key),
        json!({"model": MODEL, "prompt": prompt, "max_tokens": 5, "temperature": 0}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["object"], "text_completion");
    let expected: u64 = run(&[
        "models",
        "tokenize",
        "--model",
        model.to_str().unwrap(),
        prompt,
    ])
    .trim()
    .parse()
    .unwrap();
    assert_eq!(v["usage"]["prompt_tokens"], expected);
    assert_eq!(v["usage"]["completion_tokens"], 5);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    let (status, _, body) = post(
        &base,
        "/v1/completions",
        Some(&key),
        json!({"model": MODEL, "prompt": prompt, "max_tokens": 5, "temperature": 0, "stream": true}),
    )
    .await;
    assert_eq!(status, 200);
    let payloads = sse_payloads(&body);
    assert_eq!(payloads.last().unwrap(), "[DONE]");
    let streamed: String = payloads[..payloads.len() - 1]
        .iter()
        .map(|p| {
            serde_json::from_str::<Value>(p).unwrap()["choices"][0]["text"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    assert_eq!(streamed, v["choices"][0]["text"].as_str().unwrap());

    // Stop sequences end the text before the stop string.
    let (status, _, body) = post(
        &base,
        "/v1/completions",
        Some(&key),
        json!({"model": MODEL, "prompt": "1, 2, 3, 4,", "max_tokens": 30, "temperature": 0, "stop": ["7"]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert!(
        !v["choices"][0]["text"].as_str().unwrap().contains('7'),
        "{body}"
    );

    // Models list.
    let resp = client()
        .get(format!("{base}/v1/models"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert!(v["data"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["id"] == MODEL));

    // Errors, OpenAI-shaped.
    let (status, _, body) = post(&base, "/v1/chat/completions", None, chat.clone()).await;
    assert_eq!(status, 401);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["code"], "invalid_api_key");
    assert_eq!(v["error"]["type"], "authentication_error");
    let bad_key = format!("cpk_0000000000000000.{}", "0".repeat(64));
    let (status, _, _) = post(&base, "/v1/chat/completions", Some(&bad_key), chat.clone()).await;
    assert_eq!(status, 401);
    let (status, _, body) = post(
        &base,
        "/v1/chat/completions",
        Some(&key),
        json!({"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(status, 404);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["code"], "model_not_found");
    assert!(
        v["error"]["message"].as_str().unwrap().contains(MODEL),
        "{body}"
    );
    let resp = client()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(&key)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");
    let (status, _, body) = post(
        &base,
        "/v1/chat/completions",
        Some(&key),
        json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_p": 7}),
    )
    .await;
    assert_eq!(status, 400);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["param"], "top_p");
    // Tools are served as text while the model may choose to answer in
    // text; a required tool call, a JSON answer or token probabilities
    // are refused, not faked.
    let tools = json!([{"type": "function", "function": {"name": "now", "parameters": {}}}]);
    let (status, _, body) = post(
        &base,
        "/v1/chat/completions",
        Some(&key),
        json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
               "tools": tools, "tool_choice": "auto", "max_tokens": 4}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    for (field, value) in [
        ("tool_choice", json!("required")),
        ("response_format", json!({"type": "json_object"})),
        ("logprobs", json!(true)),
    ] {
        let mut req = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                             "tools": tools});
        req[field] = value;
        let (status, _, body) = post(&base, "/v1/chat/completions", Some(&key), req).await;
        assert_eq!(status, 400, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"]["param"], field, "{body}");
        assert_eq!(v["error"]["type"], "invalid_request_error", "{body}");
    }

    // Observability.
    let health: Value = client()
        .get(format!("{base}/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["routable_instances"], 2);
    let metrics = client()
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains(&format!(
        "sluice_requests_total{{model=\"{MODEL}\",status=\"ok\"}}"
    )));
    assert!(metrics.contains("sluice_time_to_first_token_seconds_count"));
    assert!(metrics.contains("sluice_generated_tokens_total"));
    let status = client().get(format!("{base}/status")).send().await.unwrap();
    assert_eq!(status.headers()["content-type"], "text/html; charset=utf-8");
    let page = status.text().await.unwrap();
    assert!(
        page.contains(&format!("<td>{MODEL}</td><td>2 / 2</td>")),
        "{page}"
    );

    // The official openai SDK, when available.
    openai_sdk(&base, &key).await;

    // Clean shutdown on SIGTERM.
    let status = up.terminate(Duration::from_secs(30));
    assert!(status.success(), "exit status {status:?}");
    // The ledger's connection closed before the exit: the database file
    // alone is left, without its write-ahead log.
    assert!(data.join("sluice.db").exists());
    assert!(
        !data.join("sluice.db-wal").exists(),
        "a -wal file was left after a clean shutdown"
    );

    // No prompt or completion text anywhere on disk or in the logs; the
    // request id reached the miner that served it.
    let logs = up.stderr();
    assert!(
        logs.lines()
            .any(|l| l.contains(&request_id) && l.contains("generation started")),
        "request id {request_id} not in the miner's logs"
    );
    assert!(!logs.contains(CANARY), "prompt text leaked into logs");
    for entry in walk(&data) {
        let bytes = std::fs::read(&entry).unwrap();
        let hay = String::from_utf8_lossy(&bytes);
        assert!(
            !hay.contains(CANARY),
            "prompt text found in {}",
            entry.display()
        );
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else if p.extension().is_none_or(|x| x != "gguf") {
            out.push(p);
        }
    }
    out
}

async fn openai_sdk(base: &str, key: &str) {
    let Ok(python) = std::env::var("SLUICE_TEST_PYTHON") else {
        eprintln!(
            "skipped the openai SDK check: SLUICE_TEST_PYTHON is not set (scripts/test.sh sets it)"
        );
        return;
    };
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openai_sdk.py");
    let out = tokio::process::Command::new(python)
        .arg(script)
        .arg(format!("{base}/v1"))
        .arg(key)
        .arg(MODEL)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "openai SDK check failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("openai sdk: ok"), "{stdout}");
}
