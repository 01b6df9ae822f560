//! `sluice drill chaos`: the kill-a-miner drill against a fresh local
//! network with the real model. A validator runs in this process; miners
//! run as child processes so one can be killed with SIGKILL mid-stream.
//! The same streamed load runs twice, without and with the fault, and the
//! drill reports every request's fate and latency percentiles.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use futures_util::StreamExt;
use sluice_engine::model_fetch;
use sluice_proto::sse::SseDecoder;
use sluice_proto::DEFAULT_MODEL_ID;
use sluice_validator::ValidatorConfig;
use tokio_util::sync::CancellationToken;

#[derive(Subcommand, Debug)]
pub enum DrillCommand {
    /// Kill one miner with SIGKILL while streamed requests run; every
    /// request must still complete.
    Chaos(ChaosArgs),
}

#[derive(Args, Debug)]
pub struct ChaosArgs {
    /// Working directory (default: a fresh temporary one, removed after).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    #[arg(long, default_value_t = 3)]
    pub miners: u32,
    /// Concurrent streamed requests per phase.
    #[arg(long, default_value_t = 30)]
    pub requests: u32,
    #[arg(long, default_value_t = 32)]
    pub max_tokens: u32,
    /// When to kill a miner, after the fault phase starts.
    #[arg(long, default_value_t = 1500)]
    pub kill_after_ms: u64,
}

struct Outcome {
    ok: bool,
    ttft: Option<Duration>,
    total: Duration,
    why: String,
}

struct Children(Vec<Child>);
impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub async fn run(cmd: DrillCommand) -> Result<()> {
    match cmd {
        DrillCommand::Chaos(args) => chaos(args).await,
    }
}

async fn chaos(args: ChaosArgs) -> Result<()> {
    if args.miners < 2 {
        bail!("the drill needs at least 2 miners (one is killed)");
    }
    let temp = args.data_dir.is_none();
    let dir = args.data_dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("sluice-drill-{}", std::process::id()))
    });
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = chaos_in(&args, &dir).await;
    if temp {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

async fn chaos_in(args: &ChaosArgs, dir: &Path) -> Result<()> {
    let d = dir.to_path_buf();
    let model = tokio::task::spawn_blocking(move || {
        model_fetch::ensure_default_model(&d, &mut |line| eprintln!("{line}"))
    })
    .await??;
    let shutdown = CancellationToken::new();
    let validator = sluice_validator::start(
        ValidatorConfig {
            listen: ([127, 0, 0, 1], 0).into(),
            data_dir: dir.join("validator"),
            ..Default::default()
        },
        shutdown.clone(),
    )
    .await?;
    let base = format!("http://{}", validator.addr);
    let store = &validator.state.store;
    let user = store.create_user("drill", "paid").await?;
    store
        .add_funds(&user, sluice_store::ledger::PICO_PER_USD)
        .await?;
    let (_, key) = store.create_key(&user, "drill").await?;

    let exe = std::env::current_exe().context("locating the sluice binary")?;
    let mut children = Children(Vec::new());
    for i in 0..args.miners {
        let child = Command::new(&exe)
            .args([
                "miner",
                "--validator",
                &base,
                "--listen",
                "127.0.0.1:0",
                "--threads",
                "1",
                "--slots",
                "4",
            ])
            .arg("--data-dir")
            .arg(dir.join(format!("miner-{i}")))
            .arg("--model")
            .arg(&model)
            .args(["--model-id", DEFAULT_MODEL_ID])
            .env("SLUICE_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting a miner")?;
        children.0.push(child);
    }
    eprintln!("waiting for {} miners to register", args.miners);
    if !validator
        .state
        .registry
        .wait_routable(args.miners as usize, Duration::from_secs(120))
        .await
    {
        bail!("not all {} miners registered within 120 s", args.miners);
    }

    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()?;
    eprintln!("phase 1: {} streamed requests, no fault", args.requests);
    let baseline = phase(&client, &base, &key, args, None).await;
    eprintln!(
        "phase 2: {} streamed requests, SIGKILL one miner after {} ms",
        args.requests, args.kill_after_ms
    );
    let victim = children.0.remove(0);
    let fault = phase(
        &client,
        &base,
        &key,
        args,
        Some((victim, Duration::from_millis(args.kill_after_ms))),
    )
    .await;

    report("without fault", &baseline);
    report("with fault   ", &fault);
    for o in baseline.iter().chain(&fault).filter(|o| !o.ok) {
        eprintln!("failed: {}", o.why);
    }
    let passed = baseline.iter().chain(&fault).filter(|o| o.ok).count();
    let failed = baseline.len() + fault.len() - passed;
    println!("chaos: {passed} passed, {failed} failed");
    shutdown.cancel();
    drop(children);
    let _ = validator.finish().await;
    if failed > 0 {
        bail!("{failed} requests failed");
    }
    Ok(())
}

async fn phase(
    client: &reqwest::Client,
    base: &str,
    key: &str,
    args: &ChaosArgs,
    fault: Option<(Child, Duration)>,
) -> Vec<Outcome> {
    let mut tasks = Vec::new();
    for i in 0..args.requests {
        let (client, base, key) = (client.clone(), base.to_string(), key.to_string());
        let max_tokens = args.max_tokens;
        tasks.push(tokio::spawn(async move {
            one(&client, &base, &key, max_tokens, i).await
        }));
    }
    if let Some((mut victim, after)) = fault {
        tokio::time::sleep(after).await;
        let _ = victim.kill();
        let _ = victim.wait();
        eprintln!("killed a miner");
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap_or_else(|e| Outcome {
            ok: false,
            ttft: None,
            total: Duration::ZERO,
            why: format!("task: {e}"),
        }));
    }
    out
}

async fn one(client: &reqwest::Client, base: &str, key: &str, max_tokens: u32, i: u32) -> Outcome {
    let started = Instant::now();
    let fail = |why: String| Outcome {
        ok: false,
        ttft: None,
        total: started.elapsed(),
        why,
    };
    let body = serde_json::json!({
        "model": DEFAULT_MODEL_ID,
        "messages": [{"role": "user", "content": format!("Tell me fact number {i} about rivers.")}],
        "max_tokens": max_tokens,
        "stream": true,
    });
    let resp = match client
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
    {
        Ok(r) => r,
        Err(e) => return fail(e.to_string()),
    };
    if !resp.status().is_success() {
        return fail(format!("HTTP {}", resp.status()));
    }
    let mut stream = resp.bytes_stream();
    let mut dec = SseDecoder::new();
    let mut ttft = None;
    let mut content = String::new();
    let mut done = false;
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => return fail(format!("stream broke: {e}")),
        };
        for payload in dec.feed(&chunk) {
            if payload == "[DONE]" {
                done = true;
                continue;
            }
            let v: serde_json::Value = match serde_json::from_str(&payload) {
                Ok(v) => v,
                Err(e) => return fail(format!("bad chunk: {e}")),
            };
            if v.get("error").is_some() {
                return fail(format!("error event: {payload}"));
            }
            if let Some(c) = v["choices"][0]["delta"]["content"].as_str() {
                if !c.is_empty() && ttft.is_none() {
                    ttft = Some(started.elapsed());
                }
                content.push_str(c);
            }
        }
    }
    if !done {
        return fail("stream ended without [DONE]".into());
    }
    if content.is_empty() {
        return fail("empty answer".into());
    }
    Outcome {
        ok: true,
        ttft,
        total: started.elapsed(),
        why: String::new(),
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn report(label: &str, outcomes: &[Outcome]) {
    let mut total: Vec<f64> = outcomes
        .iter()
        .filter(|o| o.ok)
        .map(|o| o.total.as_secs_f64() * 1000.0)
        .collect();
    let mut ttft: Vec<f64> = outcomes
        .iter()
        .filter_map(|o| o.ttft)
        .map(|t| t.as_secs_f64() * 1000.0)
        .collect();
    total.sort_by(f64::total_cmp);
    ttft.sort_by(f64::total_cmp);
    let ok = outcomes.iter().filter(|o| o.ok).count();
    println!(
        "{label}: {ok}/{} ok  latency ms p50={:.0} p95={:.0} p99={:.0}  ttft ms p50={:.0} p95={:.0} p99={:.0}",
        outcomes.len(),
        percentile(&total, 0.5),
        percentile(&total, 0.95),
        percentile(&total, 0.99),
        percentile(&ttft, 0.5),
        percentile(&ttft, 0.95),
        percentile(&ttft, 0.99),
    );
}
