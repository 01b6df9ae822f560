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
    /// `redis://...`: share rate-limit windows between replicas.
    pub redis_url: Option<String>,
    /// Guards `/admin/v1/*`; the admin API is off when unset.
    pub admin_key: Option<String>,
    /// Free tier: requests per UTC day per key.
    pub free_daily_requests: i64,
    pub free_rpm: u64,
    pub free_tpm: u64,
    /// Paid tier: per-key requests and tokens per minute.
    pub paid_rpm: u64,
    pub paid_tpm: u64,
    /// Share of each request's cost kept by the network (the rest goes to miners).
    pub fee_percent: u32,
    /// Invoke miners over one multiplexed HTTP/2 connection each (without
    /// upgrade); `false` for HTTP/1.1, e.g. for miners behind a proxy that
    /// only speaks HTTP/1.
    pub miner_http2: bool,
    /// Which miner endpoints registration accepts: `"any"`, or `"public"`
    /// (globally routable addresses only, a host name pinned to the
    /// address it resolved to) for a validator open to miners on the
    /// internet. See [`crate::endpoints`].
    pub miner_endpoints: crate::endpoints::MinerEndpoints,
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
            redis_url: None,
            admin_key: None,
            free_daily_requests: 200,
            free_rpm: 60,
            free_tpm: 100_000,
            paid_rpm: 600,
            paid_tpm: 2_000_000,
            fee_percent: 5,
            miner_http2: true,
            miner_endpoints: crate::endpoints::MinerEndpoints::Any,
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
        if self.fee_percent > 100 {
            return Err("fee_percent must be between 0 and 100".into());
        }
        if self.free_rpm == 0 || self.free_tpm == 0 || self.paid_rpm == 0 || self.paid_tpm == 0 {
            return Err("rate limits must be at least 1".into());
        }
        if let Some(k) = &self.admin_key {
            if k.len() < 16 {
                return Err("admin_key must be at least 16 characters".into());
            }
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
