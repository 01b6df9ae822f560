//! `sluice bench`: reproducible comparisons on one machine.
//!
//! - `bench gateway`: the added latency, throughput and CPU cost of Sluice
//!   (validator + miner with the upstream engine) against LiteLLM's proxy,
//!   both in front of the same zero-delay mock upstream.
//! - `bench engine`: the embedded llama.cpp engine against llama.cpp's own
//!   `llama-server` on the same GGUF, threads and sampling.
//!
//! Peers are installed on first use under `~/.cache/sluice/bench` (never in
//! the clone). Each command ends with one `bench ...:` line of `key=value`
//! pairs that scripts can parse; `--smoke` runs a tiny version for tests.

mod engine;
mod gateway;
mod peers;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdout, Command};

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Sluice vs LiteLLM in front of a zero-delay mock upstream: added latency, throughput, CPU per request.
    Gateway(gateway::GatewayArgs),
    /// The embedded engine vs llama.cpp's llama-server on the same model: tokens/s and time to first token.
    Engine(engine::EngineArgs),
    /// The mock upstream on its own (used by `bench gateway` as a child process).
    #[command(hide = true)]
    MockUpstream(MockArgs),
    /// A validator and one upstream-engine miner in one process (used by `bench gateway`).
    #[command(hide = true)]
    SluiceGateway(gateway::SluiceGatewayArgs),
}

#[derive(Args, Debug)]
pub struct MockArgs {
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: std::net::SocketAddr,
}

pub async fn run(command: BenchCommand) -> Result<()> {
    match command {
        BenchCommand::Gateway(args) => gateway::run(args).await,
        BenchCommand::Engine(args) => engine::run(args).await,
        BenchCommand::MockUpstream(args) => mock_upstream(args).await,
        BenchCommand::SluiceGateway(args) => gateway::serve_sluice(args).await,
    }
}

async fn mock_upstream(args: MockArgs) -> Result<()> {
    let shutdown = tokio_util::sync::CancellationToken::new();
    let mock = sluice_bench::mock::start(
        args.listen,
        sluice_bench::mock::MockOptions::default(),
        shutdown.clone(),
    )
    .await?;
    println!("listening: {}", mock.base_url());
    crate::shutdown_signal().await;
    shutdown.cancel();
    mock.handle.await.context("mock task")??;
    Ok(())
}

/// Where benchmark peers and their builds are cached: `$SLUICE_BENCH_CACHE`,
/// else `$XDG_CACHE_HOME/sluice/bench`, else `~/.cache/sluice/bench`.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("SLUICE_BENCH_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
                .unwrap_or_else(std::env::temp_dir)
                .join("sluice")
                .join("bench")
        })
}

/// The machine line printed above a benchmark's table: CPU, logical CPUs,
/// hypervisor, idle polling, and the median wake-up round trip between two
/// threads (what latency at concurrency 1 is mostly made of).
pub async fn machine_line(smoke: bool) -> String {
    use sluice_bench::machine::{describe_wake_ups, Machine};
    let (rounds, budget) = if smoke {
        (400, Duration::from_millis(200))
    } else {
        (20_000, Duration::from_secs(1))
    };
    tokio::task::spawn_blocking(move || {
        format!(
            "{}; {}",
            Machine::read().describe(),
            describe_wake_ups(rounds, budget)
        )
    })
    .await
    .unwrap_or_else(|e| format!("na ({e})"))
}

/// A progress line on stderr (stdout carries the report).
pub fn progress(line: &str) {
    eprintln!("[bench] {line}");
}

/// A child process, killed when dropped, with its output in a log file.
pub struct ChildProc {
    pub child: Child,
    pub log: PathBuf,
    stdout: Option<tokio::io::Lines<BufReader<ChildStdout>>>,
}

impl ChildProc {
    /// Starts `program args` with stderr (and stdout unless `read_stdout`)
    /// appended to `log`.
    pub fn spawn(
        program: &Path,
        args: &[String],
        envs: &[(&str, String)],
        log: PathBuf,
        read_stdout: bool,
    ) -> Result<Self> {
        let file =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = file.try_clone()?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stderr(Stdio::from(err))
            .kill_on_drop(true);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        if read_stdout {
            cmd.stdout(Stdio::piped());
        } else {
            cmd.stdout(Stdio::from(file));
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        let stdout = child.stdout.take().map(|s| BufReader::new(s).lines());
        Ok(ChildProc { child, log, stdout })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Waits for a stdout line starting with `prefix`; returns the rest.
    pub async fn wait_line(&mut self, prefix: &str, timeout: Duration) -> Result<String> {
        let Some(lines) = self.stdout.as_mut() else {
            bail!("stdout of this process is not captured");
        };
        let found = tokio::time::timeout(timeout, async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(rest) = line.strip_prefix(prefix) {
                    return Some(rest.trim().to_string());
                }
            }
            None
        })
        .await;
        match found {
            Ok(Some(rest)) => Ok(rest),
            _ => bail!(
                "no `{prefix}` line within {timeout:?}; log tail:\n{}",
                self.log_tail(20)
            ),
        }
    }

    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().rev().take(n).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// Stops the process: SIGTERM-free hard kill, then reap.
    pub async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }
}

/// Polls `url` until it answers 200.
pub async fn wait_http_ok(url: &str, timeout: Duration, child: &mut ChildProc) -> Result<()> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Ok(r) = http.get(url).send().await {
            if r.status().is_success() {
                return Ok(());
            }
        }
        if let Ok(Some(status)) = child.child.try_wait() {
            bail!("exited with {status}; log tail:\n{}", child.log_tail(20));
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "{url} not ready within {timeout:?}; log tail:\n{}",
                child.log_tail(20)
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A free loopback port (bound and released; fine for a benchmark).
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Formats an optional number, `na` when missing.
pub fn num(v: Option<f64>, decimals: usize) -> String {
    match v {
        Some(x) if x.is_finite() => format!("{x:.decimals$}"),
        _ => "na".into(),
    }
}

/// A run's figures on one line: each as `num` gives it, comma-separated.
pub fn per_run(values: impl IntoIterator<Item = f64>, decimals: usize) -> String {
    values
        .into_iter()
        .map(|v| num(Some(v), decimals))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `a / b` when both exist and `b` is positive.
pub fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

/// One of the project's performance targets for a figure of a final line.
#[derive(Clone, Copy)]
pub struct Goal {
    /// The figure's key in the final line.
    pub key: &'static str,
    pub bound: f64,
    /// Whether the figure must stay at or under the bound (else at or over).
    pub at_most: bool,
    /// The decimals the final line prints: the figure is judged as printed.
    pub decimals: usize,
}

/// The line printed above a final line: each figure against its target,
/// `met`, `not met` or `not measured` (the figure is `na`), and how many
/// held, e.g. `targets: rps_ratio 110.62 >= 100 met (1 of 1 met)`.
pub fn targets_line(goals: &[(Goal, Option<f64>)]) -> String {
    let mut met = 0;
    let parts: Vec<String> = goals
        .iter()
        .map(|(g, v)| {
            let shown = num(*v, g.decimals);
            let (op, bound) = (if g.at_most { "<=" } else { ">=" }, g.bound);
            let verdict = match shown.parse::<f64>() {
                Ok(x) if (g.at_most && x <= bound) || (!g.at_most && x >= bound) => {
                    met += 1;
                    "met"
                }
                Ok(_) => "not met",
                Err(_) => "not measured",
            };
            format!("{} {shown} {op} {bound} {verdict}", g.key)
        })
        .collect();
    format!(
        "targets: {} ({met} of {} met)",
        parts.join("; "),
        goals.len()
    )
}

#[cfg(test)]
mod tests {
    use super::{targets_line, Goal};

    fn goal(key: &'static str, bound: f64, at_most: bool, decimals: usize) -> Goal {
        Goal {
            key,
            bound,
            at_most,
            decimals,
        }
    }

    #[test]
    fn targets_are_judged_on_the_printed_figure() {
        let line = targets_line(&[
            (goal("p99_ms", 0.3, true, 3), Some(0.3004)),
            (goal("cpu_us", 100.0, true, 0), Some(139.0)),
            (goal("rps_ratio", 100.0, false, 2), Some(110.624)),
            (goal("ratio8", 1.0, false, 2), None),
        ]);
        assert_eq!(
            line,
            "targets: p99_ms 0.300 <= 0.3 met; cpu_us 139 <= 100 not met; \
             rps_ratio 110.62 >= 100 met; ratio8 na >= 1 not measured (2 of 4 met)"
        );
    }

    #[test]
    fn a_figure_just_past_its_bound_as_printed_is_not_met() {
        let line = targets_line(&[(goal("ratio1", 1.0, false, 2), Some(0.994))]);
        assert_eq!(line, "targets: ratio1 0.99 >= 1 not met (0 of 1 met)");
    }
}
