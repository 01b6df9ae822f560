//! The chaos drill itself (real model, a miner killed mid-stream) in a
//! small configuration, so the command cannot rot.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

#[test]
fn chaos_drill_passes_with_the_real_model() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(common::bin())
        .args([
            "drill",
            "chaos",
            "--miners",
            "2",
            "--requests",
            "6",
            "--max-tokens",
            "16",
            "--kill-after-ms",
            "700",
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "drill failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.lines().any(|l| l == "chaos: 12 passed, 0 failed"),
        "{stdout}"
    );
    assert!(
        stdout.contains("with fault") && stdout.contains("p99="),
        "{stdout}"
    );
}
