//! A zero-delay OpenAI-compatible upstream: canned answers for
//! `POST /v1/chat/completions`, `POST /v1/completions` (JSON, or SSE when
//! `stream` is true) and `GET /v1/models`. Every answer is rendered once at
//! start, so a request costs a small JSON probe of its body and a write.
//! It is the fixed point the gateway benchmark measures added latency
//! against, and the upstream the upstream engine's tests talk to.
//!
//! Models whose name starts with `fail-` script failures for tests:
//! `fail-500`, `fail-400` (that status before any event) and `fail-midstream`
//! (two text chunks, then the connection ends without `[DONE]`).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;
use serde_json::json;
use sluice_proto::sse::{encode_data, DONE};
use tokio_util::sync::CancellationToken;

use crate::BenchError;

/// The text every answer carries, split as it is streamed.
pub const PIECES: [&str; 4] = ["Hello", " from", " the", " mock."];
/// Token counts the mock reports in `usage`.
pub const PROMPT_TOKENS: u32 = 12;
pub const COMPLETION_TOKENS: u32 = PIECES.len() as u32;

/// The full answer text.
pub fn answer() -> String {
    PIECES.concat()
}

/// Pre-rendered answers for one endpoint.
struct Canned {
    full: Bytes,
    /// SSE frames up to and including the finish-reason chunk.
    frames: Vec<Bytes>,
    usage: Bytes,
    done: Bytes,
}

struct Shared {
    chat: Canned,
    text: Canned,
    models: Bytes,
    /// The last request body, when recording (tests).
    last: Option<Mutex<Option<Bytes>>>,
}

/// Options of a mock upstream.
#[derive(Debug, Clone, Default)]
pub struct MockOptions {
    /// Keep the last request body for [`MockServer::last_request`].
    pub record: bool,
}

/// A running mock upstream.
pub struct MockServer {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    pub handle: tokio::task::JoinHandle<Result<(), BenchError>>,
}

impl MockServer {
    /// `http://ADDR` (without `/v1`).
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The JSON body of the last request (only with `record`).
    pub fn last_request(&self) -> Option<serde_json::Value> {
        let slot = self.shared.last.as_ref()?;
        let guard = sluice_proto::sync::lock(slot);
        guard.as_ref().and_then(|b| serde_json::from_slice(b).ok())
    }
}

fn chunk_json(object: &str, choice: serde_json::Value) -> serde_json::Value {
    json!({
        "id": "mock-1",
        "object": object,
        "created": 0,
        "model": "mock",
        "choices": [choice],
    })
}

fn usage() -> serde_json::Value {
    json!({
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": COMPLETION_TOKENS,
        "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS,
    })
}

fn frame(v: &serde_json::Value) -> Bytes {
    Bytes::from(encode_data(&v.to_string()))
}

fn canned_chat() -> Canned {
    let full = json!({
        "id": "mock-1",
        "object": "chat.completion",
        "created": 0,
        "model": "mock",
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": answer()},
            "finish_reason": "stop",
        }],
        "usage": usage(),
    });
    let object = "chat.completion.chunk";
    let mut frames = vec![frame(&chunk_json(
        object,
        json!({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}),
    ))];
    for piece in PIECES {
        frames.push(frame(&chunk_json(
            object,
            json!({"index": 0, "delta": {"content": piece}, "finish_reason": null}),
        )));
    }
    frames.push(frame(&chunk_json(
        object,
        json!({"index": 0, "delta": {}, "finish_reason": "stop"}),
    )));
    let usage = json!({
        "id": "mock-1", "object": object, "created": 0, "model": "mock",
        "choices": [], "usage": usage(),
    });
    Canned {
        full: Bytes::from(full.to_string()),
        frames,
        usage: frame(&usage),
        done: Bytes::from(encode_data(DONE)),
    }
}

fn canned_text() -> Canned {
    let full = json!({
        "id": "mock-1",
        "object": "text_completion",
        "created": 0,
        "model": "mock",
        "choices": [{"index": 0, "text": answer(), "finish_reason": "stop"}],
        "usage": usage(),
    });
    let object = "text_completion";
    let mut frames = Vec::new();
    for piece in PIECES {
        frames.push(frame(&chunk_json(
            object,
            json!({"index": 0, "text": piece, "finish_reason": null}),
        )));
    }
    frames.push(frame(&chunk_json(
        object,
        json!({"index": 0, "text": "", "finish_reason": "stop"}),
    )));
    let usage = json!({
        "id": "mock-1", "object": object, "created": 0, "model": "mock",
        "choices": [], "usage": usage(),
    });
    Canned {
        full: Bytes::from(full.to_string()),
        frames,
        usage: frame(&usage),
        done: Bytes::from(encode_data(DONE)),
    }
}

/// The fields of a request the mock looks at.
#[derive(Deserialize, Default)]
struct Probe {
    #[serde(default)]
    model: String,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
}

#[derive(Deserialize, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// Binds `addr` and serves until `shutdown`.
pub async fn start(
    addr: SocketAddr,
    options: MockOptions,
    shutdown: CancellationToken,
) -> Result<MockServer, BenchError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| BenchError::Bind { addr, source })?;
    let addr = listener
        .local_addr()
        .map_err(|e| BenchError::Io(e.to_string()))?;
    let shared = Arc::new(Shared {
        chat: canned_chat(),
        text: canned_text(),
        models: Bytes::from(
            json!({"object": "list", "data": [{"id": "mock-model", "object": "model", "created": 0, "owned_by": "sluice-bench"}]})
                .to_string(),
        ),
        last: options.record.then(|| Mutex::new(None)),
    });
    let app = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(|| async { "ok" }))
        .with_state(shared.clone());
    let handle = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
            .map_err(|e| BenchError::Io(format!("mock server: {e}")))
    });
    Ok(MockServer {
        addr,
        shared,
        handle,
    })
}

async fn chat(State(s): State<Arc<Shared>>, body: Bytes) -> Response {
    answer_with(&s, &s.chat, body)
}

async fn completions(State(s): State<Arc<Shared>>, body: Bytes) -> Response {
    answer_with(&s, &s.text, body)
}

async fn models(State(s): State<Arc<Shared>>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        s.models.clone(),
    )
        .into_response()
}

fn error(status: StatusCode, message: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        json!({"error": {"message": message, "type": "mock_error"}}).to_string(),
    )
        .into_response()
}

fn answer_with(shared: &Shared, canned: &Canned, body: Bytes) -> Response {
    if let Some(slot) = &shared.last {
        if let Ok(mut g) = slot.lock() {
            *g = Some(body.clone());
        }
    }
    let Ok(probe) = serde_json::from_slice::<Probe>(&body) else {
        return error(StatusCode::BAD_REQUEST, "the body is not a JSON object");
    };
    match probe.model.as_str() {
        "fail-500" => return error(StatusCode::INTERNAL_SERVER_ERROR, "scripted failure"),
        "fail-400" => return error(StatusCode::BAD_REQUEST, "scripted rejection"),
        _ => {}
    }
    if !probe.stream {
        return (
            [(header::CONTENT_TYPE, "application/json")],
            canned.full.clone(),
        )
            .into_response();
    }
    let frames: Vec<Bytes> = if probe.model == "fail-midstream" {
        canned.frames.iter().take(2).cloned().collect()
    } else {
        let mut f = canned.frames.clone();
        if probe.stream_options.is_some_and(|o| o.include_usage) {
            f.push(canned.usage.clone());
        }
        f.push(canned.done.clone());
        f
    };
    let stream =
        futures_util::stream::iter(frames.into_iter().map(Ok::<_, std::convert::Infallible>));
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "response"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn serves_json_sse_and_models() {
        let stop = CancellationToken::new();
        let mock = start(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            MockOptions { record: true },
            stop.clone(),
        )
        .await
        .unwrap();
        let base = mock.base_url();
        let http = reqwest::Client::new();
        let v: serde_json::Value = http
            .post(format!("{base}/v1/chat/completions"))
            .json(&json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["choices"][0]["message"]["content"], answer());
        assert_eq!(mock.last_request().unwrap()["model"], "m");

        let body = http
            .post(format!("{base}/v1/chat/completions"))
            .json(&json!({"model": "m", "stream": true, "stream_options": {"include_usage": true}, "messages": []}))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let events = sluice_proto::sse::SseDecoder::new().feed(body.as_bytes());
        assert_eq!(events.last().map(String::as_str), Some(DONE));
        let usage: serde_json::Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
        assert_eq!(usage["usage"]["completion_tokens"], COMPLETION_TOKENS);

        let text = http
            .post(format!("{base}/v1/completions"))
            .json(&json!({"model": "m", "prompt": "x", "stream": true}))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let events = sluice_proto::sse::SseDecoder::new().feed(text.as_bytes());
        assert_eq!(events.len(), PIECES.len() + 2);

        let models: serde_json::Value = http
            .get(format!("{base}/v1/models"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(models["data"][0]["id"], "mock-model");

        let status = http
            .post(format!("{base}/v1/chat/completions"))
            .json(&json!({"model": "fail-500"}))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status.as_u16(), 500);
        stop.cancel();
        mock.handle.await.unwrap().unwrap();
    }
}
