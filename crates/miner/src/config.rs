//! Miner configuration (TOML + env + flags, unknown keys rejected) and the
//! engine it runs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;
use sluice_engine::fake::{FakeEngine, FakeScript};
use sluice_engine::llama::{LlamaConfig, LlamaEngine};
use sluice_engine::upstream::{UpstreamConfig, UpstreamEngine};
use sluice_engine::{Engine, EngineError};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MinerConfig {
    /// Base URL of the validator to register with (comma-separated for
    /// several replicas).
    pub validator: String,
    pub listen: SocketAddr,
    /// URL the validator should use to reach this miner (default: http://listen).
    pub advertise: Option<String>,
    pub data_dir: PathBuf,
    pub engine: EngineConfig,
}

impl Default for MinerConfig {
    fn default() -> Self {
        MinerConfig {
            validator: "http://127.0.0.1:8000".into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            advertise: None,
            data_dir: PathBuf::from("."),
            engine: EngineConfig::default(),
        }
    }
}

impl MinerConfig {
    pub fn from_toml(text: &str) -> Result<Self, String> {
        let c: MinerConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        c.validate()?;
        Ok(c)
    }

    /// Validator base URLs (a comma-separated list registers the miner
    /// with every replica).
    pub fn validators(&self) -> Vec<String> {
        self.validator
            .split(',')
            .map(|v| v.trim().trim_end_matches('/').to_string())
            .filter(|v| !v.is_empty())
            .collect()
    }

    pub fn validate(&self) -> Result<(), String> {
        let validators = self.validators();
        if validators.is_empty() {
            return Err("validator must name at least one URL".into());
        }
        for v in &validators {
            // The HTTP client is built without TLS: say so here rather
            // than fail every registration attempt.
            if !v.starts_with("http://") {
                return Err(format!(
                    "validator must be an http:// URL (no TLS in this build), not `{v}`"
                ));
            }
        }
        if let Some(a) = &self.advertise {
            // The validator invokes miners over plain HTTP.
            if !a.starts_with("http://") || a.len() <= "http://".len() {
                return Err(format!(
                    "advertise must be an http:// URL the validator can reach, not `{a}`"
                ));
            }
        }
        if let EngineConfig::Llama { slots, .. } = &self.engine {
            if *slots == 0 {
                return Err("engine.slots must be at least 1".into());
            }
        }
        Ok(())
    }

    /// Whether the validator will be told an address it can dial: listening
    /// on every interface (`0.0.0.0`, `[::]`) names no machine, so it needs
    /// `advertise`; without, the miner would register `http://0.0.0.0:port`,
    /// which a validator on another machine dials as itself. Not part of
    /// [`MinerConfig::validate`], which also runs on a config file before
    /// flags and the environment may supply `advertise`.
    pub fn check_reachable(&self) -> Result<(), String> {
        if self.advertise.is_none() && self.listen.ip().is_unspecified() {
            return Err(format!(
                "listen = {} accepts on every interface, so it is no address to reach this miner at: \
                 set advertise (--advertise, SLUICE_ADVERTISE) to the http:// URL the validator can dial, \
                 such as http://<this machine's address>:{}",
                self.listen,
                self.listen.port()
            ));
        }
        Ok(())
    }
}

/// Which engine a miner runs.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum EngineConfig {
    /// Embedded llama.cpp serving a GGUF. Without `model`, the default
    /// model is fetched into the data dir.
    Llama {
        #[serde(default)]
        model: Option<PathBuf>,
        #[serde(default)]
        model_id: Option<String>,
        #[serde(default = "default_slots")]
        slots: u32,
        #[serde(default)]
        threads: Option<u32>,
        #[serde(default = "default_context")]
        context_per_slot: u32,
    },
    /// Scripted fake engine (tests and drills only).
    Fake(FakeScript),
    /// Forwards to an OpenAI-compatible server (vLLM, SGLang, llama.cpp
    /// server, Ollama); `model_id` is both the chute id and the upstream's
    /// model name, `capacity` the concurrent requests sent to it.
    Upstream {
        url: String,
        model_id: String,
        capacity: u32,
        #[serde(default)]
        api_key: Option<String>,
    },
}

fn default_slots() -> u32 {
    4
}

fn default_context() -> u32 {
    2048
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig::Llama {
            model: None,
            model_id: None,
            slots: default_slots(),
            threads: None,
            context_per_slot: default_context(),
        }
    }
}

/// Builds the configured engine (blocking: loads the model).
pub fn build_engine(
    engine: &EngineConfig,
    model_path: Option<PathBuf>,
) -> Result<Arc<dyn Engine>, EngineError> {
    match engine {
        EngineConfig::Fake(script) => Ok(Arc::new(FakeEngine::new(script.clone()))),
        EngineConfig::Upstream {
            url,
            model_id,
            capacity,
            api_key,
        } => {
            let mut cfg = UpstreamConfig::new(url.clone(), model_id.clone(), *capacity);
            cfg.api_key = api_key.clone();
            Ok(Arc::new(UpstreamEngine::new(cfg)?))
        }
        EngineConfig::Llama {
            model,
            model_id,
            slots,
            threads,
            context_per_slot,
        } => {
            let path = model
                .clone()
                .or(model_path)
                .ok_or_else(|| EngineError::Load("no model path".into()))?;
            let id = match (model_id, model) {
                (Some(id), _) => id.clone(),
                (None, Some(p)) => sluice_engine::model_fetch::model_id_for_path(p),
                (None, None) => sluice_proto::DEFAULT_MODEL_ID.to_string(),
            };
            let mut cfg = LlamaConfig::new(path, id);
            cfg.slots = *slots;
            cfg.context_per_slot = *context_per_slot;
            if let Some(t) = threads {
                cfg.threads = *t;
            }
            Ok(Arc::new(LlamaEngine::start(cfg)?))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fake_engine_config() {
        let c = MinerConfig::from_toml(
            "validator = \"http://127.0.0.1:9\"\n[engine]\nkind = \"fake\"\ndie_after = 3\n",
        )
        .unwrap();
        match c.engine {
            EngineConfig::Fake(s) => assert_eq!(s.die_after, Some(3)),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn listening_everywhere_needs_advertise_but_a_file_may_leave_it_to_flags() {
        // The file alone parses: `advertise` may still come from a flag.
        let c = MinerConfig::from_toml(
            "validator = \"http://127.0.0.1:8000\"\nlisten = \"0.0.0.0:9000\"\n",
        )
        .unwrap();
        let e = c.check_reachable().unwrap_err();
        assert!(e.contains("advertise") && e.contains("0.0.0.0:9000"), "{e}");
        let with = MinerConfig {
            advertise: Some("http://192.0.2.10:9000".into()),
            ..c.clone()
        };
        assert_eq!(with.check_reachable(), Ok(()));
        let local = MinerConfig {
            listen: "127.0.0.1:9000".parse().unwrap(),
            ..c
        };
        assert_eq!(local.check_reachable(), Ok(()));
    }

    #[test]
    fn rejects_unknown_keys() {
        assert!(MinerConfig::from_toml("validatr = \"http://x\"").is_err());
        assert!(MinerConfig::from_toml("[engine]\nkind = \"fake\"\nbogus = 1\n").is_err());
        assert!(MinerConfig::from_toml("validator = \"ftp://x\"").is_err());
        let Err(e) = MinerConfig::from_toml("validator = \"https://127.0.0.1:8000\"") else {
            panic!("an https validator must be refused");
        };
        assert!(e.to_string().contains("no TLS"), "{e}");
        let Err(e) = MinerConfig::from_toml(
            "validator = \"http://127.0.0.1:8000\"\nadvertise = \"https://127.0.0.1:9000\"",
        ) else {
            panic!("an https advertise URL must be refused");
        };
        assert!(e.to_string().contains("advertise"), "{e}");
    }
}
