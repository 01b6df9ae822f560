//! A validator whose SQLite ledger writer has fallen behind turns new
//! requests away (503 `overloaded`, `Retry-After`) instead of letting
//! finished requests pile up waiting to settle, and takes them again once
//! the writer has caught up.

use std::time::{Duration, Instant};

use sluice_validator::ValidatorConfig;
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn a_validator_behind_on_its_ledger_turns_requests_away_until_it_catches_up() {
    let dir = tempfile::tempdir().unwrap();
    let config = ValidatorConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().to_path_buf(),
        // No miner serves here: once admitted, a request gives up at once.
        default_max_wait_s: 0.2,
        ..Default::default()
    };
    let shutdown = CancellationToken::new();
    let validator = sluice_validator::start(config, shutdown.clone())
        .await
        .unwrap();
    let store = validator.state.store.clone();
    let user = store.create_user("backlog", "paid").await.unwrap();
    let (_, key) = store.create_key(&user, "backlog").await.unwrap();
    store.add_funds(&user, 1_000_000_000_000).await.unwrap();
    let url = format!("http://{}/v1/chat/completions", validator.addr);
    let http = reqwest::Client::new();
    let ask = || {
        http.post(&url)
            .bearer_auth(&key)
            .json(&serde_json::json!({
                "model": sluice_proto::DEFAULT_MODEL_ID,
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 4,
            }))
            .send()
    };
    let code = |body: &serde_json::Value| body["error"]["code"].as_str().unwrap_or("").to_string();

    // Another connection holds the write lock: the writer's next commit
    // waits for it, and what callers queue meanwhile stays queued.
    let db = rusqlite::Connection::open(dir.path().join("sluice.db")).unwrap();
    db.execute_batch("BEGIN IMMEDIATE").unwrap();
    let mut waiting = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !store.ledger_backlogged() {
        assert!(
            Instant::now() < deadline,
            "not backlogged after {} releases",
            waiting.len()
        );
        let s = store.clone();
        let id = format!("never-reserved-{}", waiting.len());
        waiting.push(tokio::spawn(async move { s.release(&id).await }));
        tokio::task::yield_now().await;
    }

    // Turned away at once: admitted, it would wait for the writer too.
    let resp = tokio::time::timeout(Duration::from_secs(5), ask())
        .await
        .expect("the request waited for the ledger writer instead of being turned away")
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "1");
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(code(&body), "overloaded", "{body}");
    assert_eq!(body["error"]["type"], "service_unavailable", "{body}");
    // Counted for the operator.
    let metrics = http
        .get(format!("http://{}/metrics", validator.addr))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l == "sluice_ledger_refusals_total 1"),
        "{metrics}"
    );

    // The lock goes: the writer commits everything queued, and the API
    // admits requests again (this one then finds no miner).
    db.execute_batch("ROLLBACK").unwrap();
    for release in waiting {
        release.await.unwrap().unwrap();
    }
    assert!(!store.ledger_backlogged());
    let resp = ask().await.unwrap();
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(code(&body), "no_capacity", "{body}");
    shutdown.cancel();
}
