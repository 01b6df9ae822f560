//! Accounts, limits and the ledger end to end: real validator processes
//! (SQLite, and PostgreSQL + Redis replicas when configured) in front of
//! scripted-engine miners.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const ADMIN: &str = "adm_test_0123456789abcdef";
/// Default chute prices: pico-dollars per token.
const PRICE_IN: i64 = 70_000;
const PRICE_OUT: i64 = 300_000;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_validator(dir: &Path, name: &str, port: u16, extra: &str) -> (Proc, String) {
    let data = dir.join(name);
    let cfg = dir.join(format!("{name}.toml"));
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\nadmin_key = \"{ADMIN}\"\n{extra}",
            data.display()
        ),
    )
    .unwrap();
    let (p, ready) = Proc::start(
        &["validator", "--config", cfg.to_str().unwrap()],
        dir,
        name,
        "ready: ",
        Duration::from_secs(60),
    );
    (p, base_from_ready(&ready))
}

async fn admin(base: &str, method: &str, path: &str, body: Option<Value>) -> Value {
    let c = client();
    let req = match method {
        "POST" => c
            .post(format!("{base}{path}"))
            .json(&body.unwrap_or(json!({}))),
        "DELETE" => c.delete(format!("{base}{path}")),
        _ => c.get(format!("{base}{path}")),
    };
    let resp = req.bearer_auth(ADMIN).send().await.unwrap();
    let status = resp.status();
    let v: Value = resp.json().await.unwrap();
    assert!(status.is_success(), "{method} {path}: {status} {v}");
    v
}

async fn new_key(base: &str, tier: &str, usd: Option<&str>) -> (String, String) {
    let v = admin(
        base,
        "POST",
        "/admin/v1/keys",
        Some(json!({"name": "t", "tier": tier})),
    )
    .await;
    let user = v["user_id"].as_str().unwrap().to_string();
    if let Some(usd) = usd {
        admin(
            base,
            "POST",
            "/admin/v1/balance",
            Some(json!({"user_id": user, "usd": usd})),
        )
        .await;
    }
    (v["key"].as_str().unwrap().to_string(), user)
}

fn chat(max_tokens: u32, stream: bool) -> Value {
    json!({"model": MODEL, "messages": [{"role": "user", "content": "one two three"}],
           "max_tokens": max_tokens, "stream": stream, "stream_options": {"include_usage": true}})
}

async fn usage_of(base: &str, key: &str) -> Value {
    client()
        .get(format!("{base}/v1/usage"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn free_quota_paid_pricing_limits_and_admin_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let (_v, base) = start_validator(
        dir.path(),
        "v",
        free_port(),
        "free_rpm = 100000\npaid_rpm = 3\n",
    );
    let _m = fake_miner(dir.path(), &base, "m", "capacity = 16\n");
    wait_routable(&base, 1).await;

    // Free tier: 200 requests per UTC day, then 429 quota_exceeded.
    let (free, _) = new_key(&base, "free", None).await;
    let mut last_remaining = u64::MAX;
    for i in 0..200 {
        let (status, headers, body) =
            post(&base, "/v1/chat/completions", Some(&free), chat(1, false)).await;
        assert_eq!(status, 200, "request {i}: {body}");
        assert_eq!(headers["x-ratelimit-limit-requests"], "200");
        let remaining: u64 = headers["x-ratelimit-remaining-requests"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(remaining < last_remaining);
        last_remaining = remaining;
        for h in [
            "x-ratelimit-reset-requests",
            "x-ratelimit-limit-tokens",
            "x-ratelimit-remaining-tokens",
            "x-ratelimit-reset-tokens",
        ] {
            assert!(headers.contains_key(h), "missing {h}");
        }
    }
    assert_eq!(last_remaining, 0);
    let (status, headers, body) =
        post(&base, "/v1/chat/completions", Some(&free), chat(1, false)).await;
    assert_eq!(status, 429, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["code"], "quota_exceeded");
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=86_400).contains(&retry));
    assert_eq!(headers["x-ratelimit-remaining-requests"], "0");
    // Free usage is paid by the network, not the user. (Records are
    // written just after each response.)
    tokio::time::sleep(Duration::from_millis(300)).await;
    let u = usage_of(&base, &free).await;
    assert_eq!(u["data"][0]["requests"], 200);

    // Paid tier: no balance, no service.
    let (broke, _) = new_key(&base, "paid", None).await;
    let (status, _, body) = post(&base, "/v1/chat/completions", Some(&broke), chat(4, false)).await;
    assert_eq!(status, 402, "{body}");
    assert!(body.contains("insufficient_balance"));

    // Paid tier: the charge is usage x price, exactly, streamed or not.
    // Both requests reuse one client request id: it is echoed, never a
    // ledger key, so both are charged.
    let (paid, user) = new_key(&base, "paid", Some("1")).await;
    let dup = [("x-request-id", "client-dup-1")];
    let (status, h1, body) = post_with(
        &base,
        "/v1/chat/completions",
        Some(&paid),
        chat(7, false),
        &dup,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(h1["x-client-request-id"], "client-dup-1");
    let v: Value = serde_json::from_str(&body).unwrap();
    let (p1, c1) = (
        v["usage"]["prompt_tokens"].as_i64().unwrap(),
        v["usage"]["completion_tokens"].as_i64().unwrap(),
    );
    let (status, h2, body) = post_with(
        &base,
        "/v1/chat/completions",
        Some(&paid),
        chat(5, true),
        &dup,
    )
    .await;
    assert_eq!(status, 200);
    assert_ne!(h1["x-request-id"], h2["x-request-id"]);
    let payloads = sse_payloads(&body);
    let usage: Value = serde_json::from_str(&payloads[payloads.len() - 2]).unwrap();
    let (p2, c2) = (
        usage["usage"]["prompt_tokens"].as_i64().unwrap(),
        usage["usage"]["completion_tokens"].as_i64().unwrap(),
    );
    let expected = (p1 + p2) * PRICE_IN + (c1 + c2) * PRICE_OUT;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let u = usage_of(&base, &paid).await;
    assert_eq!(
        u["data"][0]["cost_pico_usd"].as_i64().unwrap(),
        expected,
        "{u}"
    );
    assert_eq!(u["data"][0]["requests"], 2);
    let ledger = admin(&base, "GET", "/admin/v1/ledger", None).await;
    assert_eq!(ledger["balanced"], true, "{ledger}");
    assert_eq!(ledger["open_reservations"], 0);
    let bal = run(&[
        "balance",
        "show",
        "--user",
        &user,
        "--data-dir",
        dir.path().join("v").to_str().unwrap(),
    ]);
    let left = 1_000_000_000_000 - expected;
    assert!(
        bal.contains(&sluice_store::ledger::format_usd(left)),
        "{bal} vs {left}"
    );

    // Paid tier: 3 requests per minute, then 429 rate_limited.
    let (status, headers, body) =
        post(&base, "/v1/chat/completions", Some(&paid), chat(1, false)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["x-ratelimit-remaining-requests"], "0");
    let (status, headers, body) =
        post(&base, "/v1/chat/completions", Some(&paid), chat(1, false)).await;
    assert_eq!(status, 429);
    assert!(body.contains("rate_limited"));
    assert!(headers.contains_key("retry-after"));

    // Revocation through the admin API takes effect within a second.
    let keys = admin(&base, "GET", "/admin/v1/keys", None).await;
    let free_id = &free[4..20];
    assert!(keys["data"]
        .as_array()
        .unwrap()
        .iter()
        .any(|k| k["key_id"] == free_id));
    admin(&base, "DELETE", &format!("/admin/v1/keys/{free_id}"), None).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, _, _) = post(&base, "/v1/chat/completions", Some(&free), chat(1, false)).await;
    assert_eq!(status, 401);
    // Without the admin key: refused.
    let resp = client()
        .get(format!("{base}/admin/v1/keys"))
        .bearer_auth(&paid)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_validator_mid_stream_charges_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let (mut v, base) = start_validator(dir.path(), "v", port, "");
    let _m = fake_miner(
        dir.path(),
        &base,
        "m",
        "capacity = 8\ntoken_delay_ms = 50\n",
    );
    wait_routable(&base, 1).await;
    let (paid, user) = new_key(&base, "paid", Some("1")).await;
    let data = dir.path().join("v");

    // A long stream, cut by SIGKILL of the validator.
    let stream = {
        let (base, paid) = (base.clone(), paid.clone());
        tokio::spawn(async move {
            if let Ok(r) = client()
                .post(format!("{base}/v1/chat/completions"))
                .bearer_auth(&paid)
                .json(&chat(100, true))
                .send()
                .await
            {
                let _ = r.text().await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(800)).await;
    v.kill9();
    let _ = stream.await;

    // Restart on the same data dir: the orphaned reservation is released,
    // nothing was charged, the ledger balances.
    let (_v2, base) = start_validator(dir.path(), "v", port, "");
    let out = run(&["ledger", "--data-dir", data.to_str().unwrap()]);
    assert!(out.contains("ledger: balanced"), "{out}");
    assert!(out.contains("open reservations: 0"), "{out}");
    assert!(out.contains("settled requests:  0"), "{out}");
    let bal = run(&[
        "balance",
        "show",
        "--user",
        &user,
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    assert!(
        bal.contains("balance $1.00 (reserved $0.00, available $1.00)"),
        "{bal}"
    );

    // The miner re-registers; the next request is charged exactly once.
    wait_routable(&base, 1).await;
    let (status, _, body) = post(&base, "/v1/chat/completions", Some(&paid), chat(3, false)).await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let cost = v["usage"]["prompt_tokens"].as_i64().unwrap() * PRICE_IN
        + v["usage"]["completion_tokens"].as_i64().unwrap() * PRICE_OUT;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let out = run(&["ledger", "--data-dir", data.to_str().unwrap()]);
    assert!(
        out.contains("ledger: balanced") && out.contains("settled requests:  1"),
        "{out}"
    );
    let bal = run(&[
        "balance",
        "show",
        "--user",
        &user,
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    assert!(
        bal.contains(&format!(
            "balance {}",
            sluice_store::ledger::format_usd(1_000_000_000_000 - cost)
        )),
        "{bal}"
    );
}

/// Sends `n` one-token chats alternately to `bases`; returns how many were
/// served. Every refusal must be a 429 with `refusal_code`.
async fn alternate(bases: &[String], key: &str, n: usize, refusal_code: &str) -> usize {
    let mut ok = 0;
    for i in 0..n {
        let (status, _, body) = post(
            &bases[i % bases.len()],
            "/v1/chat/completions",
            Some(key),
            chat(1, false),
        )
        .await;
        match status {
            200 => ok += 1,
            429 => assert!(body.contains(refusal_code), "{body}"),
            s => panic!("unexpected {s}: {body}"),
        }
    }
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_on_postgres_and_redis_hold_limits_exactly() {
    let (Ok(db), Ok(redis)) = (
        std::env::var("SLUICE_TEST_DATABASE_URL"),
        std::env::var("SLUICE_TEST_REDIS_URL"),
    ) else {
        eprintln!("skipped: SLUICE_TEST_DATABASE_URL and SLUICE_TEST_REDIS_URL are not both set");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let extra = format!("database_url = \"{db}\"\nredis_url = \"{redis}\"\nfree_daily_requests = 10\nfree_rpm = 100000\npaid_rpm = 6\n");
    let (_a, base_a) = start_validator(dir.path(), "a", free_port(), &extra);
    let (_b, base_b) = start_validator(dir.path(), "b", free_port(), &extra);
    // One miner known to both replicas.
    let _m = fake_miner(
        dir.path(),
        &format!("{base_a},{base_b}"),
        "m",
        "capacity = 16\n",
    );
    wait_routable(&base_a, 1).await;
    wait_routable(&base_b, 1).await;
    let bases = [base_a.clone(), base_b.clone()];

    // The free daily quota (database counter) holds exactly across replicas.
    let (free, _) = new_key(&base_a, "free", None).await;
    assert_eq!(alternate(&bases, &free, 14, "quota_exceeded").await, 10);

    // The per-minute window (Redis) holds exactly across replicas.
    let (paid, _) = new_key(&base_b, "paid", Some("5")).await;
    assert_eq!(alternate(&bases, &paid, 10, "rate_limited").await, 6);

    // Revoking on one replica takes effect on the other within a second.
    let (key, _) = new_key(&base_a, "free", None).await;
    let (status, _, _) = post(&base_b, "/v1/chat/completions", Some(&key), chat(1, false)).await;
    assert_eq!(status, 200);
    admin(
        &base_a,
        "DELETE",
        &format!("/admin/v1/keys/{}", &key[4..20]),
        None,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, _, _) = post(&base_b, "/v1/chat/completions", Some(&key), chat(1, false)).await;
    assert_eq!(status, 401);
    let ledger = admin(&base_b, "GET", "/admin/v1/ledger", None).await;
    assert_eq!(ledger["total"], 0);
    assert_eq!(ledger["unbalanced_txns"], 0);
}
