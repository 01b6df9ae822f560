//! The miner agent: owns an ed25519 identity, hosts one engine instance,
//! registers with a validator (signing its nonce), heartbeats, and serves
//! signed invocations from the validator as SSE streams of engine events.

pub mod config;
mod serve;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use ed25519_dalek::SigningKey;
use futures_util::{FutureExt, StreamExt};
use sluice_engine::{Engine, EngineError};
use sluice_proto::miner::{
    heartbeat_message, pair_key, parse_public, public_hex, register_message, sign_hex,
    HeartbeatRequest, InvokeEvent, InvokeKey, InvokeRequest, NonceResponse, OfferedChute,
    RegisterRequest, RegisterResponse, HDR_MAC, HDR_REQUEST_ID, HDR_TIMESTAMP, HDR_VALIDATOR,
};
use std::sync::RwLock;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub use config::{EngineConfig, MinerConfig};

#[derive(Debug, thiserror::Error)]
pub enum MinerError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("{0}")]
    Io(String),
}

#[derive(Clone)]
struct MinerState {
    engine: Arc<dyn Engine>,
    /// Invocation keys shared with each validator this miner registered
    /// with, by the validator's public key (hex): invocations must carry a
    /// MAC under one of them.
    invoke_keys: Arc<RwLock<std::collections::HashMap<String, InvokeKey>>>,
}

/// A running miner.
pub struct Running {
    pub addr: SocketAddr,
    pub endpoint: String,
    pub handle: tokio::task::JoinHandle<Result<(), MinerError>>,
}

/// Starts serving with `engine` and keeps the miner registered with the
/// validator until `shutdown`.
pub async fn start(
    config: MinerConfig,
    engine: Arc<dyn Engine>,
    shutdown: CancellationToken,
) -> Result<Running, MinerError> {
    config.validate().map_err(MinerError::Config)?;
    config.check_reachable().map_err(MinerError::Config)?;
    let key = sluice_proto::keyfile::load_or_create_key(&config.data_dir.join("miner.key"))
        .map_err(MinerError::Io)?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| MinerError::Bind {
            addr: config.listen,
            source,
        })?;
    let addr = listener
        .local_addr()
        .map_err(|e| MinerError::Io(e.to_string()))?;
    let endpoint = config
        .advertise
        .clone()
        .unwrap_or_else(|| format!("http://{addr}"));
    let state = MinerState {
        engine: engine.clone(),
        invoke_keys: Arc::new(RwLock::new(std::collections::HashMap::new())),
    };
    let app = Router::new()
        .route("/v1/invoke", post(invoke))
        .route("/health", get(health))
        .with_state(state.clone());
    let tasks = TaskTracker::new();
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| MinerError::Io(e.to_string()))?;
    // One agent per validator replica: each must know this miner.
    for validator in config.validators() {
        let agent = Agent {
            http: http.clone(),
            validator,
            endpoint: endpoint.clone(),
            key: key.clone(),
            engine: engine.clone(),
            state: state.clone(),
        };
        let stop = shutdown.clone();
        tasks.spawn(async move { agent.run(stop).await }.instrument(tracing::info_span!("agent")));
    }
    let streams = serve::max_streams(engine.info().capacity);
    let handle = tokio::spawn(async move {
        serve::serve(listener, app, streams, shutdown).await;
        tasks.close();
        tasks.wait().await;
        Ok(())
    });
    tracing::info!(%addr, %endpoint, "miner listening");
    Ok(Running {
        addr,
        endpoint,
        handle,
    })
}

async fn health(State(state): State<MinerState>) -> Response {
    let info = state.engine.info();
    let status = if state.engine.healthy() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        axum::Json(serde_json::json!({
            "model": info.model_id,
            "capacity": info.capacity,
            "in_flight": state.engine.in_flight(),
            "engine": info.description,
        })),
    )
        .into_response()
}

fn reject(status: StatusCode, message: &str) -> Response {
    (
        status,
        axum::Json(serde_json::json!({"error": {"message": message}})),
    )
        .into_response()
}

async fn invoke(State(state): State<MinerState>, headers: HeaderMap, body: Bytes) -> Response {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    };
    let request_id = header(HDR_REQUEST_ID).to_string();
    let key = {
        let keys = sluice_proto::sync::read(&state.invoke_keys);
        if keys.is_empty() {
            return reject(StatusCode::SERVICE_UNAVAILABLE, "not registered yet");
        }
        keys.get(header(HDR_VALIDATOR)).cloned()
    };
    let Some(key) = key else {
        return reject(StatusCode::UNAUTHORIZED, "unknown validator");
    };
    let Ok(ts) = header(HDR_TIMESTAMP).parse::<u64>() else {
        return reject(StatusCode::UNAUTHORIZED, "missing timestamp");
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    if now.abs_diff(ts) > 60_000 {
        return reject(StatusCode::UNAUTHORIZED, "stale invocation");
    }
    if key.verify(&request_id, ts, &body, header(HDR_MAC)).is_err() {
        return reject(StatusCode::UNAUTHORIZED, "bad invocation MAC");
    }
    let req: InvokeRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return reject(StatusCode::BAD_REQUEST, &format!("bad invocation: {e}")),
    };
    if req.model != state.engine.info().model_id {
        return reject(StatusCode::NOT_FOUND, "model not served here");
    }
    // Debug: nothing in it logs at info (engine failures travel back to
    // the validator as error events, which log them with the request id).
    let span = tracing::debug_span!("invoke", request_id = %req.request_id);
    let events = {
        let _enter = span.enter();
        match state.engine.generate(req) {
            Ok(s) => s,
            Err(EngineError::Busy) => {
                return reject(StatusCode::SERVICE_UNAVAILABLE, "at capacity")
            }
            Err(e) => return reject(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
        }
    };
    // Events that are ready together leave in one write, and the headers
    // wait for the first event: a burst from a fast engine is one or two
    // TCP segments, not one per event.
    let mut chunks = events.ready_chunks(64);
    let first = chunks.next().instrument(span.clone()).await;
    // Per request, so debug: a busy miner would write a line per request.
    span.in_scope(|| tracing::debug!("generation started"));
    // A generation that is over as soon as it starts (a whole answer from
    // an upstream, an early error) leaves as one body: HTTP/2 sends the
    // headers and one DATA frame that ends the stream, instead of a
    // streamed body closed by an empty DATA frame of its own.
    let mut ready: Vec<Vec<InvokeEvent>> = first.into_iter().collect();
    let mut ended = ready.is_empty();
    for _ in 0..MAX_READY_CHUNKS {
        if ended {
            break;
        }
        match chunks.next().now_or_never() {
            Some(Some(more)) => ready.push(more),
            Some(None) => ended = true,
            None => break,
        }
    }
    let body = if ended {
        let mut frame = Vec::new();
        for events in &ready {
            sse_frame(&mut frame, events);
        }
        Body::from(frame)
    } else {
        Body::from_stream(futures_util::stream::iter(ready).chain(chunks).map(
            |events: Vec<InvokeEvent>| {
                let mut frame = Vec::new();
                sse_frame(&mut frame, &events);
                Ok::<_, std::convert::Infallible>(Bytes::from(frame))
            },
        ))
    };
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(body)
        .unwrap_or_else(|_| reject(StatusCode::INTERNAL_SERVER_ERROR, "response"))
}

/// Ready batches of events gathered before the answer starts, at most:
/// an engine that is still producing streams the rest.
const MAX_READY_CHUNKS: usize = 16;

/// Appends events as SSE `data:` lines. Each event is serialized straight
/// into the frame: compact JSON has no raw newline, so it is one line as
/// is. Events that are ready together leave in one write.
fn sse_frame(frame: &mut Vec<u8>, events: &[InvokeEvent]) {
    frame.reserve(96 * events.len());
    for ev in events {
        frame.extend_from_slice(b"data: ");
        let start = frame.len();
        if serde_json::to_writer(&mut *frame, ev).is_err() {
            frame.truncate(start);
            frame.extend_from_slice(b"{}");
        }
        frame.extend_from_slice(b"\n\n");
    }
}

/// Registration and heartbeats.
struct Agent {
    http: reqwest::Client,
    validator: String,
    endpoint: String,
    key: SigningKey,
    engine: Arc<dyn Engine>,
    state: MinerState,
}

impl Agent {
    async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(200);
        loop {
            let interval = match self.register().await {
                Ok(resp) => {
                    backoff = Duration::from_millis(200);
                    tracing::info!(validator = %self.validator, instances = ?resp.instance_ids, "registered");
                    Duration::from_millis(resp.heartbeat_interval_ms.max(100))
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "registration failed");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            // Heartbeat until the validator forgets us, then re-register.
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(interval) => {}
                }
                match self.heartbeat().await {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
                }
            }
        }
    }

    async fn register(&self) -> Result<RegisterResponse, String> {
        let nonce: NonceResponse = self
            .http
            .get(format!("{}/miner/v1/nonce", self.validator))
            .send()
            .await
            .map_err(|e| format!("validator unreachable: {e}"))?
            .json()
            .await
            .map_err(|e| format!("bad nonce response: {e}"))?;
        let vkey = parse_public(&nonce.validator_key).map_err(|e| e.to_string())?;
        let invoke_key = pair_key(&self.key, &vkey)
            .map(|k| InvokeKey::new(&k))
            .ok_or_else(|| "the validator's key gives no shared secret".to_string())?;
        sluice_proto::sync::write(&self.state.invoke_keys)
            .insert(nonce.validator_key.clone(), invoke_key);
        let info = self.engine.info();
        let chutes = vec![OfferedChute {
            model: info.model_id.clone(),
            capacity: info.capacity,
            context_length: info.context_length,
        }];
        let signature = sign_hex(
            &self.key,
            &register_message(&nonce.nonce, &self.endpoint, &chutes),
        );
        let req = RegisterRequest {
            miner_key: public_hex(&self.key),
            endpoint: self.endpoint.clone(),
            nonce: nonce.nonce,
            chutes,
            hardware: format!(
                "{} ({} cpus)",
                info.description,
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
            ),
            signature,
        };
        let resp = self
            .http
            .post(format!("{}/miner/v1/register", self.validator))
            .json(&req)
            .send()
            .await
            .map_err(|e| format!("register: {e}"))?;
        if !resp.status().is_success() {
            let status = resp.status();
            let text = resp.text().await.unwrap_or_default();
            return Err(format!("validator refused registration ({status}): {text}"));
        }
        resp.json()
            .await
            .map_err(|e| format!("bad register response: {e}"))
    }

    /// Ok(false) when the validator no longer knows this miner.
    async fn heartbeat(&self) -> Result<bool, String> {
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let hb = HeartbeatRequest {
            miner_key: public_hex(&self.key),
            endpoint: self.endpoint.clone(),
            timestamp_ms: ts,
            load: vec![(self.engine.info().model_id, self.engine.in_flight())],
            signature: sign_hex(&self.key, &heartbeat_message(&self.endpoint, ts)),
        };
        let resp = self
            .http
            .post(format!("{}/miner/v1/heartbeat", self.validator))
            .json(&hb)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        match resp.status() {
            s if s.is_success() => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            s => Err(format!("heartbeat refused: {s}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::HttpBody;
    use sluice_engine::{EngineInfo, EventStream};
    use sluice_proto::miner::{FinishReason, GenerationParams, PromptInput};
    use sluice_proto::sse::SseDecoder;

    /// Produces a fixed list of events; with `gap`, the stream is pending
    /// once after the first event, as a model between two tokens.
    struct Listed {
        events: Vec<InvokeEvent>,
        gap: bool,
    }

    impl Engine for Listed {
        fn info(&self) -> EngineInfo {
            EngineInfo {
                model_id: "m".into(),
                capacity: 1,
                context_length: 2048,
                description: "listed events".into(),
            }
        }

        fn generate(&self, _: InvokeRequest) -> Result<EventStream, EngineError> {
            let mut rest = self.events.clone();
            let first = rest.remove(0);
            let head = futures_util::stream::iter([first]);
            if !self.gap {
                return Ok(Box::pin(head.chain(futures_util::stream::iter(rest))));
            }
            let later = futures_util::stream::once(async {
                tokio::time::sleep(Duration::from_millis(20)).await;
                futures_util::stream::iter(rest)
            })
            .flatten();
            Ok(Box::pin(head.chain(later)))
        }

        fn healthy(&self) -> bool {
            true
        }

        fn in_flight(&self) -> u32 {
            0
        }
    }

    async fn invoke_with(engine: Listed) -> Response {
        let key = InvokeKey::new(&[7; 32]);
        let mut keys = std::collections::HashMap::new();
        keys.insert("v".to_string(), key.clone());
        let state = MinerState {
            engine: Arc::new(engine),
            invoke_keys: Arc::new(RwLock::new(keys)),
        };
        let body = serde_json::to_vec(&InvokeRequest {
            request_id: "r1".into(),
            model: "m".into(),
            input: PromptInput::Text {
                prompt: "hi".into(),
            },
            params: GenerationParams::default(),
            continuation: String::new(),
            stream: true,
        })
        .unwrap();
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let mut headers = HeaderMap::new();
        headers.insert(HDR_REQUEST_ID, "r1".parse().unwrap());
        headers.insert(HDR_VALIDATOR, "v".parse().unwrap());
        headers.insert(HDR_TIMESTAMP, ts.into());
        headers.insert(HDR_MAC, key.mac_hex("r1", ts, &body).parse().unwrap());
        invoke(State(state), headers, Bytes::from(body)).await
    }

    fn decode(body: &[u8]) -> Vec<InvokeEvent> {
        SseDecoder::new()
            .feed(body)
            .iter()
            .map(|e| serde_json::from_str(e).unwrap())
            .collect()
    }

    /// Listening on every interface says nothing about where the validator
    /// can reach the miner: without `advertise` it would register
    /// `http://0.0.0.0:port`, which a validator on another machine dials as
    /// itself. Refused before anything is bound or registered.
    #[tokio::test]
    async fn listening_everywhere_needs_an_advertised_url() {
        let dir = tempfile::tempdir().unwrap();
        let engine = || -> Arc<dyn Engine> {
            Arc::new(Listed {
                events: vec![InvokeEvent::Started { prompt_tokens: 1 }],
                gap: false,
            })
        };
        for any in ["0.0.0.0:0", "[::]:0"] {
            let config = MinerConfig {
                listen: any.parse().unwrap(),
                data_dir: dir.path().to_path_buf(),
                ..Default::default()
            };
            let Err(e) = start(config, engine(), CancellationToken::new()).await else {
                panic!("{any}: a miner without advertise must be refused");
            };
            assert!(matches!(e, MinerError::Config(_)), "{any}: {e}");
            assert!(e.to_string().contains("advertise"), "{any}: {e}");
        }
        // With advertise, the same listen address starts (no validator
        // answers at the discard port: registration retries until stopped).
        let config = MinerConfig {
            validator: "http://127.0.0.1:9".into(),
            listen: "0.0.0.0:0".parse().unwrap(),
            advertise: Some("http://127.0.0.1:9".into()),
            data_dir: dir.path().to_path_buf(),
            ..Default::default()
        };
        let stop = CancellationToken::new();
        let running = start(config, engine(), stop.clone()).await.unwrap();
        assert_eq!(running.endpoint, "http://127.0.0.1:9");
        stop.cancel();
        running.handle.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn an_answer_ready_at_once_is_one_body_and_a_slower_one_streams() {
        let events = vec![
            InvokeEvent::Started { prompt_tokens: 3 },
            InvokeEvent::Text {
                text: "a".into(),
                tokens: 1,
            },
            InvokeEvent::Text {
                text: "b".into(),
                tokens: 1,
            },
            InvokeEvent::Done {
                finish_reason: FinishReason::Stop,
                prompt_tokens: 3,
                completion_tokens: 2,
            },
        ];
        for gap in [false, true] {
            let resp = invoke_with(Listed {
                events: events.clone(),
                gap,
            })
            .await;
            assert_eq!(resp.status(), StatusCode::OK);
            // Ready at once: a body of known length, which HTTP/2 ends with
            // its data. With a gap: a stream.
            assert_eq!(resp.body().size_hint().exact().is_some(), !gap);
            let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
                .await
                .unwrap();
            // The same SSE text either way.
            assert_eq!(decode(&body), events, "gap: {gap}");
        }
    }
}
