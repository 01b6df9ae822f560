//! Bearer-key authentication with an in-memory cache: a hit costs a hash
//! and a constant-time compare; entries expire after a second so a
//! revocation made on any replica takes effect everywhere within a second.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::{header, HeaderMap};
use sluice_proto::keys;
use sluice_store::{KeyRecord, Store};

use crate::error::ApiError;

const TTL: Duration = Duration::from_secs(1);
const MAX_ENTRIES: usize = 100_000;

/// The authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub user_id: String,
    pub key_id: String,
    pub tier: String,
}

pub struct Auth {
    store: Store,
    cache: Mutex<HashMap<String, (Option<KeyRecord>, Instant)>>,
}

impl Auth {
    pub fn new(store: Store) -> Self {
        Auth {
            store,
            cache: Mutex::new(HashMap::new()),
        }
    }

    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<Caller, ApiError> {
        let raw = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| {
                ApiError::InvalidApiKey(
                    "You didn't provide an API key. Send it as `Authorization: Bearer cpk_...`."
                        .into(),
                )
            })?;
        let presented = raw
            .strip_prefix("Bearer ")
            .or_else(|| raw.strip_prefix("bearer "))
            .unwrap_or(raw)
            .trim();
        let bad = || ApiError::InvalidApiKey("Incorrect API key provided.".into());
        let parsed = keys::parse_key(presented).map_err(|_| bad())?;
        let record = self.lookup(parsed.id).await?;
        match record {
            Some(k) if !k.revoked && k.matches(parsed.secret) => Ok(Caller {
                user_id: k.user_id,
                key_id: k.key_id,
                tier: k.tier,
            }),
            _ => Err(bad()),
        }
    }

    async fn lookup(&self, key_id: &str) -> Result<Option<KeyRecord>, ApiError> {
        if let Ok(cache) = self.cache.lock() {
            if let Some((rec, at)) = cache.get(key_id) {
                if at.elapsed() < TTL {
                    return Ok(rec.clone());
                }
            }
        }
        let rec = self
            .store
            .find_key(key_id)
            .await
            .map_err(ApiError::internal)?;
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= MAX_ENTRIES {
                cache.retain(|_, (_, at)| at.elapsed() < TTL);
                if cache.len() >= MAX_ENTRIES {
                    cache.clear();
                }
            }
            cache.insert(key_id.to_string(), (rec.clone(), Instant::now()));
        }
        Ok(rec)
    }
}
