//! Bearer-key authentication with an in-memory cache: entries expire after
//! a second, so a revocation made on any replica takes effect everywhere
//! within a second. A key's first request after its entry is fetched pays
//! the SHA-256 of its secret and a constant-time compare with the stored
//! hash; the entry then remembers the secret that matched as a keyed tag,
//! and the key's next requests within the second compare tags instead.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher, RandomState};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{header, HeaderMap};
use sluice_proto::keys;
use sluice_proto::sync::lock;
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

/// A secret as the cache remembers it: 128 bits of the standard library's
/// keyed hash (SipHash) under keys drawn at random when the validator
/// starts, which no client sees. Two secrets share a tag with a chance of
/// about 2^-128, so a presented secret whose tag equals a verified one is
/// that secret, and a memory dump shows tags, not secrets.
type Tag = (u64, u64);

fn tag_under(keys: &RandomState, secret: &str) -> Tag {
    let half = |domain: u8| {
        let mut h = keys.build_hasher();
        h.write_u8(domain);
        h.write(secret.as_bytes());
        h.finish()
    };
    (half(0), half(1))
}

struct Entry {
    record: Option<Arc<KeyRecord>>,
    fetched: Instant,
    /// The tag of a secret that matched `record`'s hash.
    verified: Option<Tag>,
}

pub struct Auth {
    store: Store,
    cache: Mutex<HashMap<String, Entry>>,
    tags: RandomState,
}

impl Auth {
    pub fn new(store: Store) -> Self {
        Auth {
            store,
            cache: Mutex::new(HashMap::new()),
            tags: RandomState::new(),
        }
    }

    fn tag(&self, secret: &str) -> Tag {
        tag_under(&self.tags, secret)
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
        let tag = self.tag(parsed.secret);
        let (record, verified) = self.lookup(parsed.id, tag).await?;
        let Some(k) = record.filter(|k| !k.revoked) else {
            return Err(bad());
        };
        if !verified {
            if !k.matches(parsed.secret) {
                return Err(bad());
            }
            self.remember(parsed.id, &k, tag);
        }
        Ok(Caller {
            user_id: k.user_id.clone(),
            key_id: k.key_id.clone(),
            tier: k.tier.clone(),
        })
    }

    /// The key's record (fresh within [`TTL`]) and whether `tag` is the
    /// tag of a secret already checked against it.
    async fn lookup(
        &self,
        key_id: &str,
        tag: Tag,
    ) -> Result<(Option<Arc<KeyRecord>>, bool), ApiError> {
        {
            let cache = lock(&self.cache);
            if let Some(e) = cache.get(key_id) {
                if e.fetched.elapsed() < TTL {
                    return Ok((e.record.clone(), e.verified == Some(tag)));
                }
            }
        }
        let record = self
            .store
            .find_key(key_id)
            .await
            .map_err(ApiError::internal)?
            .map(Arc::new);
        let mut cache = lock(&self.cache);
        if cache.len() >= MAX_ENTRIES {
            cache.retain(|_, e| e.fetched.elapsed() < TTL);
            if cache.len() >= MAX_ENTRIES {
                cache.clear();
            }
        }
        cache.insert(
            key_id.to_string(),
            Entry {
                record: record.clone(),
                fetched: Instant::now(),
                verified: None,
            },
        );
        Ok((record, false))
    }

    /// Notes that the secret of `tag` matched `record`, if the cache still
    /// holds that same fetch of the key.
    fn remember(&self, key_id: &str, record: &Arc<KeyRecord>, tag: Tag) {
        let mut cache = lock(&self.cache);
        if let Some(e) = cache.get_mut(key_id) {
            if e.record.as_ref().is_some_and(|r| Arc::ptr_eq(r, record)) {
                e.verified = Some(tag);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn bearer(key: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        let value = HeaderValue::from_str(&format!("Bearer {key}")).unwrap();
        h.insert(header::AUTHORIZATION, value);
        h
    }

    fn remembered(auth: &Auth, key_id: &str) -> Option<Tag> {
        lock(&auth.cache).get(key_id).and_then(|e| e.verified)
    }

    #[tokio::test]
    async fn a_matched_secret_is_remembered_and_no_other_secret_passes_on_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_data_dir(dir.path()).await.unwrap();
        let user = store.create_user("alice", "paid").await.unwrap();
        let (key_id, key) = store.create_key(&user, "k").await.unwrap();
        let auth = Auth::new(store.clone());

        let caller = auth.authenticate(&bearer(&key)).await.unwrap();
        assert_eq!(
            caller,
            Caller {
                user_id: user.clone(),
                key_id: key_id.clone(),
                tier: "paid".into(),
            }
        );
        let secret = keys::parse_key(&key).unwrap().secret;
        assert_eq!(remembered(&auth, &key_id), Some(auth.tag(secret)));

        // The same key id with another secret: refused, and the secret
        // that matched stays remembered.
        let mut wrong = key.clone();
        let last = wrong.pop().unwrap();
        wrong.push(if last == '0' { '1' } else { '0' });
        assert!(matches!(
            auth.authenticate(&bearer(&wrong)).await,
            Err(ApiError::InvalidApiKey(_))
        ));
        assert_eq!(remembered(&auth, &key_id), Some(auth.tag(secret)));
        assert_eq!(auth.authenticate(&bearer(&key)).await.unwrap(), caller);

        // A revocation shows once the entry expires, remembered or not.
        store.revoke_key(&key_id).await.unwrap();
        tokio::time::sleep(TTL + Duration::from_millis(50)).await;
        assert!(matches!(
            auth.authenticate(&bearer(&key)).await,
            Err(ApiError::InvalidApiKey(_))
        ));
        assert_eq!(remembered(&auth, &key_id), None);
    }

    #[test]
    fn tags_differ_between_secrets_and_between_processes() {
        let a = RandomState::new();
        assert_eq!(tag_under(&a, "s1"), tag_under(&a, "s1"));
        assert_ne!(tag_under(&a, "s1"), tag_under(&a, "s2"));
        assert_ne!(tag_under(&a, "s1"), tag_under(&RandomState::new(), "s1"));
    }
}
