//! Helpers for end-to-end tests: real `sluice` processes on random ports.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub const MODEL: &str = "HuggingFaceTB/SmolLM2-135M-Instruct";

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_sluice")
}

/// A child process killed on drop, with its stderr captured to a file.
pub struct Proc {
    pub child: Child,
    pub stderr_path: PathBuf,
    pub lines: mpsc::Receiver<String>,
}

impl Proc {
    /// Starts `sluice ARGS` and waits for a stdout line starting with `prefix`.
    pub fn start(
        args: &[&str],
        log_dir: &Path,
        name: &str,
        prefix: &str,
        timeout: Duration,
    ) -> (Proc, String) {
        let stderr_path = log_dir.join(format!("{name}.stderr"));
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let mut child = Command::new(bin())
            .args(args)
            .env(
                "SLUICE_LOG",
                "info,sluice_validator=debug,sluice_miner=debug",
            )
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut proc = Proc {
            child,
            stderr_path,
            lines: rx,
        };
        let line = proc.wait_line(prefix, timeout);
        (proc, line)
    }

    pub fn wait_line(&mut self, prefix: &str, timeout: Duration) -> String {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return line,
                Ok(_) => continue,
                Err(_) => {
                    let log = std::fs::read_to_string(&self.stderr_path).unwrap_or_default();
                    let tail: Vec<&str> = log.lines().rev().take(30).collect();
                    panic!(
                        "no `{prefix}` line within {timeout:?}; stderr tail:\n{}",
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    );
                }
            }
        }
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for a clean exit.
    pub fn terminate(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("process did not exit within {timeout:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `ready: http://ADDR/v1` -> `http://ADDR`
pub fn base_from_ready(line: &str) -> String {
    line.trim_start_matches("ready: ")
        .trim_end_matches("/v1")
        .to_string()
}

/// Runs `sluice ARGS` to completion and returns stdout.
pub fn run(args: &[&str]) -> String {
    let out = Command::new(bin()).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "sluice {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The default model, placed in `data_dir/models` (fetched into the user
/// cache on first use).
pub fn model_in(data_dir: &Path) -> PathBuf {
    let out = run(&["models", "pull", "--data-dir", data_dir.to_str().unwrap()]);
    PathBuf::from(out.trim())
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

/// Parses an SSE body into its `data:` payloads.
pub fn sse_payloads(body: &str) -> Vec<String> {
    let mut d = sluice_proto::sse::SseDecoder::new();
    d.feed(body.as_bytes())
}

pub async fn post(
    base: &str,
    path: &str,
    key: Option<&str>,
    body: serde_json::Value,
) -> (u16, reqwest::header::HeaderMap, String) {
    post_with(base, path, key, body, &[]).await
}

/// [`post`] with extra request headers.
pub async fn post_with(
    base: &str,
    path: &str,
    key: Option<&str>,
    body: serde_json::Value,
    headers: &[(&str, &str)],
) -> (u16, reqwest::header::HeaderMap, String) {
    let mut req = client().post(format!("{base}{path}")).json(&body);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, headers, resp.text().await.unwrap())
}

/// Polls `/health` until `n` instances are routable (30 s at most).
pub async fn wait_routable(base: &str, n: u64) {
    for _ in 0..300 {
        if let Ok(r) = client().get(format!("{base}/health")).send().await {
            let v: serde_json::Value = r.json().await.unwrap();
            if v["routable_instances"].as_u64().unwrap_or(0) >= n {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{base}: fewer than {n} routable instances after 30 s");
}

/// Starts a miner running the scripted fake engine, registered with
/// `validators` (comma-separated). `script` is TOML for `[engine]`.
pub fn fake_miner(dir: &Path, validators: &str, name: &str, script: &str) -> Proc {
    fake_miner_at(dir, validators, name, script).0
}

/// A fake-engine miner and its endpoint URL.
pub fn fake_miner_at(dir: &Path, validators: &str, name: &str, script: &str) -> (Proc, String) {
    let cfg = dir.join(format!("{name}.toml"));
    std::fs::write(
        &cfg,
        format!("[engine]\nkind = \"fake\"\nmodel_id = \"{MODEL}\"\n{script}"),
    )
    .unwrap();
    let data = dir.join(name);
    let proc = Proc::start(
        &[
            "miner",
            "--config",
            cfg.to_str().unwrap(),
            "--validator",
            validators,
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().unwrap(),
        ],
        dir,
        name,
        "miner serving on ",
        Duration::from_secs(30),
    );
    let endpoint = proc
        .1
        .trim_start_matches("miner serving on ")
        .trim()
        .to_string();
    (proc.0, endpoint)
}
