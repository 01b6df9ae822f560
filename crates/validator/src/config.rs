//! Validator configuration: TOML file, then `SLUICE_*` environment, then
//! flags (the CLI layers those); unknown keys are rejected.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ValidatorConfig {
    /// Address of the public API.
    pub listen: SocketAddr,
    /// Directory for the SQLite database and the validator key.
    pub data_dir: PathBuf,
    /// `postgres://...` to share state between replicas; SQLite otherwise.
    pub database_url: Option<String>,
    /// How long a request may wait for capacity by default (seconds).
    pub default_max_wait_s: f64,
    /// Upper bound a client may ask for with `x-sluice-max-wait`.
    pub max_wait_cap_s: f64,
    /// Requests allowed to wait per chute before new ones are refused.
    pub max_queue_per_chute: usize,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// Attempts on distinct instances before `all_targets_failed`.
    pub max_attempts: u32,
    /// Time allowed for a miner's first event.
    pub first_token_timeout_s: f64,
    /// Longest pause between events once streaming (then failover).
    pub stall_timeout_s: f64,
    /// Miners are dropped from routing after this long without heartbeat.
    pub heartbeat_timeout_s: f64,
    /// Let miners register models that have no chute yet (dev networks).
    pub allow_miner_chutes: bool,
}

impl Default for ValidatorConfig {
    fn default() -> Self {
        ValidatorConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8000)),
            data_dir: PathBuf::from("."),
            database_url: None,
            default_max_wait_s: 30.0,
            max_wait_cap_s: 300.0,
            max_queue_per_chute: 1024,
            max_body_bytes: 2 * 1024 * 1024,
            max_attempts: 3,
            first_token_timeout_s: 60.0,
            stall_timeout_s: 30.0,
            heartbeat_timeout_s: 6.0,
            allow_miner_chutes: true,
        }
    }
}

impl ValidatorConfig {
    pub fn from_toml(text: &str) -> Result<Self, String> {
        let cfg: ValidatorConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("default_max_wait_s", self.default_max_wait_s),
            ("first_token_timeout_s", self.first_token_timeout_s),
            ("stall_timeout_s", self.stall_timeout_s),
            ("heartbeat_timeout_s", self.heartbeat_timeout_s),
        ];
        for (name, v) in positive {
            if !(v.is_finite() && v > 0.0) {
                return Err(format!("{name} must be a positive number of seconds"));
            }
        }
        if self.max_attempts == 0 {
            return Err("max_attempts must be at least 1".into());
        }
        if self.max_body_bytes < 1024 {
            return Err("max_body_bytes must be at least 1024".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_partial_toml_with_defaults() {
        let c =
            ValidatorConfig::from_toml("listen = \"127.0.0.1:9000\"\nmax_attempts = 5\n").unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.max_attempts, 5);
        assert_eq!(c.default_max_wait_s, 30.0);
    }

    #[test]
    fn rejects_unknown_keys_and_bad_values() {
        let e = ValidatorConfig::from_toml("listn = \"127.0.0.1:9000\"\n").unwrap_err();
        assert!(e.contains("unknown field"), "{e}");
        assert!(ValidatorConfig::from_toml("max_attempts = 0").is_err());
        assert!(ValidatorConfig::from_toml("stall_timeout_s = -1.0").is_err());
    }
}
