//! The miner-facing endpoints: nonce, registration (proof of key
//! ownership), heartbeats.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use rand::RngCore;
use sluice_proto::miner::{
    heartbeat_message, parse_public, public_hex, register_message, verify_hex, HeartbeatRequest,
    NonceResponse, RegisterRequest, RegisterResponse,
};
use sluice_store::{now_ms, Chute};

use crate::error::ApiError;
use crate::registry::Instance;
use crate::AppState;

const NONCE_TTL_MS: i64 = 60_000;
const MAX_NONCES: usize = 10_000;
pub const HEARTBEAT_INTERVAL_MS: u64 = 2_000;
/// $0.07 per million input tokens, in micro-dollars.
pub const DEFAULT_PRICE_IN_MICROS: i64 = 70_000;
/// $0.30 per million output tokens, in micro-dollars.
pub const DEFAULT_PRICE_OUT_MICROS: i64 = 300_000;

/// Outstanding registration nonces (single use, short-lived, bounded).
#[derive(Default)]
pub struct Nonces {
    issued: Mutex<HashMap<String, i64>>,
}

impl Nonces {
    fn issue(&self) -> Result<String, ApiError> {
        let mut b = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut b);
        let nonce = hex::encode(b);
        let mut map = self
            .issued
            .lock()
            .map_err(|_| ApiError::internal("nonce lock"))?;
        let now = now_ms();
        if map.len() >= MAX_NONCES {
            map.retain(|_, exp| *exp > now);
        }
        if map.len() >= MAX_NONCES {
            return Err(ApiError::NoCapacity {
                model: "registration".into(),
                retry_after_s: 5,
            });
        }
        map.insert(nonce.clone(), now + NONCE_TTL_MS);
        Ok(nonce)
    }

    fn take(&self, nonce: &str) -> bool {
        let Ok(mut map) = self.issued.lock() else {
            return false;
        };
        matches!(map.remove(nonce), Some(exp) if exp > now_ms())
    }
}

pub async fn nonce(State(state): State<AppState>) -> Response {
    match state.nonces.issue() {
        Ok(nonce) => Json(NonceResponse {
            nonce,
            validator_key: public_hex(&state.signing_key),
        })
        .into_response(),
        Err(e) => e.into_response(),
    }
}

pub async fn register(State(state): State<AppState>, body: axum::body::Body) -> Response {
    match register_inner(&state, body).await {
        Ok(r) => Json(r).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn register_inner(
    state: &AppState,
    body: axum::body::Body,
) -> Result<RegisterResponse, ApiError> {
    let bytes = axum::body::to_bytes(body, 64 * 1024)
        .await
        .map_err(|_| ApiError::BodyTooLarge { limit: 64 * 1024 })?;
    let req: RegisterRequest = crate::api::parse_json(&bytes)?;
    let key = parse_public(&req.miner_key)
        .map_err(|e| ApiError::invalid(e.to_string(), Some("miner_key".to_string())))?;
    if !state.nonces.take(&req.nonce) {
        return Err(ApiError::Forbidden("unknown or expired nonce".into()));
    }
    verify_hex(
        &key,
        &register_message(&req.nonce, &req.endpoint, &req.chutes),
        &req.signature,
    )
    .map_err(|e| ApiError::Forbidden(format!("registration signature: {e}")))?;
    // Invocations are plain HTTP (authenticated by their MAC): an https
    // endpoint would register and then fail every request.
    if crate::registry::invoke_url(&req.endpoint).is_none() {
        return Err(ApiError::invalid(
            "endpoint must be an http:// URL (the validator invokes miners over plain HTTP)",
            Some("endpoint".to_string()),
        ));
    }
    // Where invocations and probes will go: the endpoint as offered, or
    // pinned to the public address its host resolved to.
    let endpoint = crate::endpoints::admit(state.config.miner_endpoints, &req.endpoint)
        .await
        .map_err(|e| ApiError::invalid(e, Some("endpoint".to_string())))?;
    if req.chutes.is_empty() {
        return Err(ApiError::invalid(
            "offer at least one chute",
            Some("chutes".to_string()),
        ));
    }
    let known = state.chute_ids();
    let mut instances = Vec::new();
    let mut ids = Vec::new();
    for (n, offered) in req.chutes.iter().enumerate() {
        if !known.contains(&offered.model) {
            if !state.config.allow_miner_chutes {
                return Err(ApiError::ModelNotFound {
                    message: format!("no chute `{}` on this validator", offered.model),
                });
            }
            state
                .store
                .ensure_chute(&Chute {
                    model_id: offered.model.clone(),
                    engine: "gguf".into(),
                    source: "miner".into(),
                    concurrency: offered.capacity as i64,
                    price_in_micros: DEFAULT_PRICE_IN_MICROS,
                    price_out_micros: DEFAULT_PRICE_OUT_MICROS,
                    created_ms: now_ms(),
                })
                .await
                .map_err(ApiError::internal)?;
        }
        let id = format!("{}-{n}", &req.miner_key[..12.min(req.miner_key.len())]);
        ids.push(id.clone());
        instances.push(Arc::new(Instance::new(
            id,
            &req.miner_key,
            &endpoint,
            &offered.model,
            offered.capacity,
            offered.context_length,
        )));
    }
    state
        .store
        .upsert_miner(&req.miner_key, &endpoint, &req.hardware)
        .await
        .map_err(ApiError::internal)?;
    state.refresh_chutes().await;
    state.registry.replace_miner(&req.miner_key, instances);
    tracing::info!(miner = %&req.miner_key[..12.min(req.miner_key.len())], %endpoint, "miner registered");
    Ok(RegisterResponse {
        instance_ids: ids,
        heartbeat_interval_ms: HEARTBEAT_INTERVAL_MS,
    })
}

pub async fn heartbeat(State(state): State<AppState>, body: axum::body::Body) -> Response {
    let result: Result<(), ApiError> = async {
        let bytes = axum::body::to_bytes(body, 64 * 1024)
            .await
            .map_err(|_| ApiError::BodyTooLarge { limit: 64 * 1024 })?;
        let hb: HeartbeatRequest = crate::api::parse_json(&bytes)?;
        let key = parse_public(&hb.miner_key)
            .map_err(|e| ApiError::invalid(e.to_string(), Some("miner_key".to_string())))?;
        let skew = (now_ms() - hb.timestamp_ms as i64).abs();
        if skew > 60_000 {
            return Err(ApiError::Forbidden(
                "heartbeat timestamp too far from now".into(),
            ));
        }
        verify_hex(
            &key,
            &heartbeat_message(&hb.endpoint, hb.timestamp_ms),
            &hb.signature,
        )
        .map_err(|e| ApiError::Forbidden(format!("heartbeat signature: {e}")))?;
        if !state.registry.heartbeat(&hb.miner_key) {
            return Err(ApiError::RouteNotFound);
        }
        Ok(())
    }
    .await;
    match result {
        Ok(()) => axum::http::StatusCode::NO_CONTENT.into_response(),
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use ed25519_dalek::SigningKey;
    use sluice_proto::miner::{
        public_hex, register_message, sign_hex, NonceResponse, OfferedChute, RegisterRequest,
    };
    use tokio_util::sync::CancellationToken;

    use crate::endpoints::MinerEndpoints;
    use crate::ValidatorConfig;

    /// Registers with `endpoint`, signed properly; returns the status and body.
    async fn register(base: &str, endpoint: &str) -> (u16, serde_json::Value) {
        let http = reqwest::Client::new();
        let nonce: NonceResponse = http
            .get(format!("{base}/miner/v1/nonce"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let key = SigningKey::generate(&mut rand::rngs::OsRng);
        let chutes = vec![OfferedChute {
            model: "m".into(),
            capacity: 1,
            context_length: 512,
        }];
        let req = RegisterRequest {
            miner_key: public_hex(&key),
            endpoint: endpoint.into(),
            signature: sign_hex(&key, &register_message(&nonce.nonce, endpoint, &chutes)),
            nonce: nonce.nonce,
            chutes,
            hardware: "test".into(),
        };
        let resp = http
            .post(format!("{base}/miner/v1/register"))
            .json(&req)
            .send()
            .await
            .unwrap();
        (resp.status().as_u16(), resp.json().await.unwrap())
    }

    /// A validator on a free port with `miner_endpoints`, and its base URL.
    async fn started(
        miner_endpoints: MinerEndpoints,
    ) -> (tempfile::TempDir, CancellationToken, crate::Running, String) {
        let dir = tempfile::tempdir().unwrap();
        let stop = CancellationToken::new();
        let cfg = ValidatorConfig {
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            data_dir: dir.path().to_path_buf(),
            miner_endpoints,
            ..Default::default()
        };
        let running = crate::start(cfg, stop.clone()).await.unwrap();
        let base = format!("http://{}", running.addr);
        (dir, stop, running, base)
    }

    /// Registering with `endpoint` is refused: 400, the field named, and a
    /// message that says `why`.
    async fn assert_endpoint_refused(base: &str, endpoint: &str, why: &str) {
        let (status, body) = register(base, endpoint).await;
        assert_eq!(status, 400, "{endpoint}: {body}");
        assert_eq!(body["error"]["param"], "endpoint", "{endpoint}: {body}");
        assert!(
            body["error"]["message"].as_str().unwrap().contains(why),
            "{body}"
        );
    }

    /// Invocations are plain HTTP: an endpoint the validator could not
    /// invoke is refused at registration, with the field named.
    #[tokio::test]
    async fn endpoints_must_be_plain_http_urls() {
        let (_dir, stop, _running, base) = started(MinerEndpoints::Any).await;
        for bad in [
            "https://127.0.0.1:9000",
            "ftp://127.0.0.1:9000",
            "http://",
            "127.0.0.1:9000",
            "http://127.0.0.1:9000/?x=1",
        ] {
            assert_endpoint_refused(&base, bad, "http://").await;
        }
        // What a miner listening on every interface binds is no address
        // to dial (this validator would dial itself).
        for anywhere in [
            "http://0.0.0.0:9000",
            "http://[::]:9000",
            "http://[::ffff:0.0.0.0]:9000",
        ] {
            assert_endpoint_refused(&base, anywhere, "names no machine").await;
        }
        let (status, body) = register(&base, "http://127.0.0.1:9000").await;
        assert_eq!(status, 200, "{body}");
        stop.cancel();
    }

    /// A validator for miners on the internet refuses endpoints on its own
    /// networks, and pins the ones it accepts to the address it checked.
    #[tokio::test]
    async fn public_only_validators_refuse_private_endpoints() {
        let (_dir, stop, running, base) = started(MinerEndpoints::Public).await;
        for private in [
            "http://127.0.0.1:9000",
            "http://localhost:9000",
            "http://169.254.169.254",
        ] {
            assert_endpoint_refused(&base, private, "not a public address").await;
        }
        let (status, body) = register(&base, "http://203.0.114.9:9000").await;
        assert_eq!(status, 200, "{body}");
        let routed = running.state.registry.all();
        let endpoints: Vec<&str> = routed.iter().map(|i| i.endpoint.as_str()).collect();
        assert_eq!(endpoints, ["http://203.0.114.9:9000"]);
        stop.cancel();
    }
}
