//! The upstream engine: serves a chute by forwarding to any
//! OpenAI-compatible server (vLLM, SGLang, llama.cpp's `llama-server`,
//! Ollama, or the benchmark mock). Chat prompts go to
//! `/v1/chat/completions`, text prompts to `/v1/completions`. A streamed
//! request is streamed upstream with `stream_options.include_usage` and the
//! SSE chunks are mapped to [`InvokeEvent`]s; a request whose client waits
//! for the whole answer asks for one JSON answer (one body to read and
//! parse instead of a chunk per token) and maps it to the same events.
//!
//! Token counts come from the upstream's final usage chunk: the prompt
//! length is only known then, so `Started` is sent just before `Done` (the
//! validator accepts it in any position). Without a usage chunk, every text
//! chunk counts as one token and the prompt as zero.
//!
//! Mid-stream failover: a text prompt is simply extended by the
//! continuation. A chat prompt gets a final assistant message holding the
//! continuation plus `"continue_final_message": true,
//! "add_generation_prompt": false`, which vLLM and SGLang honour; llama.cpp's
//! server and Ollama continue a trailing assistant message by default.
//! Servers that do neither start a fresh assistant turn after it.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sluice_proto::miner::{FinishReason, InvokeEvent, InvokeRequest, PromptInput};
use sluice_proto::sse::{SseDecoder, DONE};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::h1pool::{H1Pool, Pooled, SendError};
use crate::{Engine, EngineError, EngineInfo, EventStream};

/// Context window reported when the upstream does not say (it enforces
/// its own limit and answers 400 beyond it).
pub const DEFAULT_CONTEXT_LENGTH: u32 = 4096;

/// Where the upstream is and how much of it this miner may use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamConfig {
    /// Base URL, with or without a trailing `/v1`.
    pub url: String,
    /// The model name, both as the chute id and as sent upstream.
    pub model_id: String,
    /// Concurrent requests allowed upstream; more are refused as busy.
    pub capacity: u32,
    /// Sent as `Authorization: Bearer`.
    pub api_key: Option<String>,
    pub context_length: u32,
}

impl UpstreamConfig {
    pub fn new(url: impl Into<String>, model_id: impl Into<String>, capacity: u32) -> Self {
        UpstreamConfig {
            url: url.into(),
            model_id: model_id.into(),
            capacity,
            api_key: None,
            context_length: DEFAULT_CONTEXT_LENGTH,
        }
    }
}

/// The upstream engine.
pub struct UpstreamEngine {
    config: UpstreamConfig,
    base: String,
    /// The two endpoints' paths (origin form, as sent on a connection),
    /// parsed once.
    chat_url: http::Uri,
    completions_url: http::Uri,
    /// `Bearer <api key>`, when there is a key.
    authorization: Option<http::HeaderValue>,
    /// The `Host` header, made once (hyper's client would format it from
    /// the URL for every request).
    host: http::HeaderValue,
    /// Keep-alive HTTP/1.1 connections to the upstream: every request of
    /// the miner takes this path, and reqwest's layers (redirect policy,
    /// URL re-parsing, a client clone per request), then hyper-util's
    /// pooled client (a hashed pool key at checkout and return, futures in
    /// futures), cost more per request than the connection itself.
    http: H1Pool,
    slots: Arc<Semaphore>,
    healthy: Arc<AtomicBool>,
}

impl UpstreamEngine {
    pub fn new(config: UpstreamConfig) -> Result<Self, EngineError> {
        if config.capacity == 0 {
            return Err(EngineError::Invalid(
                "upstream capacity must be at least 1".into(),
            ));
        }
        let trimmed = config.url.trim_end_matches('/');
        if !(trimmed.starts_with("http://") || trimmed.starts_with("https://")) {
            return Err(EngineError::Invalid(format!(
                "upstream url must be http(s), not `{}`",
                config.url
            )));
        }
        let base = trimmed.strip_suffix("/v1").unwrap_or(trimmed).to_string();
        if base.starts_with("https://") {
            return Err(EngineError::Invalid(format!(
                "upstream url `{}`: https is not supported; reach the upstream over http on a trusted network",
                config.url
            )));
        }
        let url = |path: &str| -> Result<http::Uri, EngineError> {
            let invalid =
                |e: String| EngineError::Invalid(format!("upstream url `{}`: {e}", config.url));
            let parsed = reqwest::Url::parse(&format!("{base}{path}"))
                .map_err(|e| invalid(e.to_string()))?;
            parsed
                .as_str()
                .parse()
                .map_err(|e: http::uri::InvalidUri| invalid(e.to_string()))
        };
        let chat = url("/v1/chat/completions")?;
        let completions = url("/v1/completions")?;
        let no_host = || EngineError::Invalid(format!("upstream url `{}` has no host", config.url));
        let authority = chat.authority().ok_or_else(no_host)?;
        let host = http::HeaderValue::from_str(authority.as_str()).map_err(|_| no_host())?;
        // Where to connect: the host with its port, 80 when the URL has none.
        let connect_to = format!(
            "{}:{}",
            authority.host(),
            authority.port_u16().unwrap_or(80)
        );
        let origin_form = |u: &http::Uri| -> Result<http::Uri, EngineError> {
            u.path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/")
                .parse()
                .map_err(|e: http::uri::InvalidUri| {
                    EngineError::Invalid(format!("upstream url `{}`: {e}", config.url))
                })
        };
        let chat_url = origin_form(&chat)?;
        let completions_url = origin_form(&completions)?;
        let authorization = match &config.api_key {
            Some(key) => Some(
                http::HeaderValue::try_from(format!("Bearer {key}")).map_err(|_| {
                    EngineError::Invalid("the upstream API key is not a valid header value".into())
                })?,
            ),
            None => None,
        };
        let http = H1Pool::new(connect_to, config.capacity as usize, Duration::from_secs(5));
        Ok(UpstreamEngine {
            authorization,
            host,
            slots: Arc::new(Semaphore::new(config.capacity as usize)),
            config,
            base,
            chat_url,
            completions_url,
            http,
            healthy: Arc::new(AtomicBool::new(true)),
        })
    }

    /// The JSON body and endpoint for one request.
    fn body<'a>(&'a self, request: &'a InvokeRequest) -> (UpstreamBody<'a>, &'a http::Uri, Kind) {
        let p = &request.params;
        let continues = !request.continuation.is_empty();
        let mut body = UpstreamBody {
            model: &self.config.model_id,
            messages: None,
            prompt: None,
            continue_final_message: None,
            add_generation_prompt: None,
            stream: request.stream,
            stream_options: request.stream.then_some(StreamOptions {
                include_usage: true,
            }),
            temperature: p.temperature,
            top_p: p.top_p,
            max_tokens: p.max_tokens,
            seed: p.seed,
            stop: &p.stop,
        };
        match &request.input {
            PromptInput::Chat { messages } => {
                let mut msgs: Vec<Message<'a>> = messages
                    .iter()
                    .map(|m| Message {
                        role: &m.role,
                        content: &m.content,
                    })
                    .collect();
                if continues {
                    msgs.push(Message {
                        role: "assistant",
                        content: &request.continuation,
                    });
                    body.continue_final_message = Some(true);
                    body.add_generation_prompt = Some(false);
                }
                body.messages = Some(msgs);
                (body, &self.chat_url, Kind::Chat)
            }
            PromptInput::Text { prompt } => {
                body.prompt = Some(if continues {
                    format!("{prompt}{}", request.continuation).into()
                } else {
                    prompt.as_str().into()
                });
                (body, &self.completions_url, Kind::Text)
            }
        }
    }
}

/// The body of an OpenAI request sent upstream.
#[derive(Serialize)]
struct UpstreamBody<'a> {
    model: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    messages: Option<Vec<Message<'a>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt: Option<std::borrow::Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    continue_final_message: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    add_generation_prompt: Option<bool>,
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_options: Option<StreamOptions>,
    temperature: f32,
    top_p: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<u64>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop: &'a [String],
}

#[derive(Serialize)]
struct Message<'a> {
    role: &'a str,
    content: &'a str,
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Text,
}

/// What one upstream answer (or stream chunk) says, however it was read.
struct Said {
    /// The `error` member's message, when there is one.
    error: Option<String>,
    /// Prompt and completion tokens, when `usage` gives both.
    usage: Option<(u32, u32)>,
    /// The first choice's text (`message.content`, `delta.content` or
    /// `text`) and finish reason; `None` when there are no choices.
    first: Option<(Option<String>, Option<FinishReason>)>,
}

fn tokens(n: u64) -> u32 {
    n.min(u32::MAX as u64) as u32
}

fn finish(reason: &str) -> FinishReason {
    if reason == "length" {
        FinishReason::Length
    } else {
        FinishReason::Stop
    }
}

impl Said {
    /// Reads the few members the engine needs straight into [`Fast`]; an
    /// answer that does not fit it (an error, a member of an unexpected
    /// type, a repeated key) is read through a `Value`, which tolerates
    /// anything that is JSON. `None`: not JSON.
    fn read(bytes: &[u8], kind: Kind, whole: bool) -> Option<Said> {
        if sluice_proto::starts_as_json_object(bytes) {
            if let Ok(f) = serde_json::from_slice::<Fast>(bytes) {
                if !f.error {
                    return Some(f.said(kind, whole));
                }
            }
        }
        serde_json::from_slice::<Value>(bytes)
            .ok()
            .map(|v| Said::from_value(&v, kind, whole))
    }

    fn from_value(v: &Value, kind: Kind, whole: bool) -> Said {
        let error = v.get("error").map(|err| {
            err["message"]
                .as_str()
                .or_else(|| err.as_str())
                .unwrap_or("upstream error")
                .to_string()
        });
        let usage = v.get("usage").filter(|u| u.is_object()).and_then(|u| {
            let n = |k: &str| u[k].as_u64().map(tokens);
            Some((n("prompt_tokens")?, n("completion_tokens")?))
        });
        let first = v["choices"].get(0).map(|c| {
            let text = match (kind, whole) {
                (Kind::Chat, true) => &c["message"]["content"],
                (Kind::Chat, false) => &c["delta"]["content"],
                (Kind::Text, _) => &c["text"],
            };
            (
                text.as_str().map(str::to_string),
                c["finish_reason"].as_str().map(finish),
            )
        });
        Said {
            error,
            usage,
            first,
        }
    }
}

/// The members of an OpenAI-style answer or chunk the engine reads, typed:
/// no tree is built for the rest. Strict on purpose (see [`Said::read`]).
#[derive(Deserialize)]
struct Fast<'a> {
    /// Whether there is an `error` member at all (even `null`).
    #[serde(default, deserialize_with = "present")]
    error: bool,
    #[serde(default)]
    usage: Option<FastUsage>,
    #[serde(default, borrow)]
    choices: Option<Vec<FastChoice<'a>>>,
}

#[derive(Deserialize)]
struct FastUsage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct FastChoice<'a> {
    #[serde(default)]
    message: Option<FastContent>,
    #[serde(default)]
    delta: Option<FastContent>,
    #[serde(default)]
    text: Option<String>,
    #[serde(default, borrow)]
    finish_reason: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct FastContent {
    #[serde(default)]
    content: Option<String>,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    serde::de::IgnoredAny::deserialize(d).map(|_| true)
}

impl Fast<'_> {
    fn said(self, kind: Kind, whole: bool) -> Said {
        let usage = self
            .usage
            .and_then(|u| Some((tokens(u.prompt_tokens?), tokens(u.completion_tokens?))));
        let first = self.choices.and_then(|c| c.into_iter().next()).map(|c| {
            let text = match (kind, whole) {
                (Kind::Chat, true) => c.message.and_then(|m| m.content),
                (Kind::Chat, false) => c.delta.and_then(|m| m.content),
                (Kind::Text, _) => c.text,
            };
            (text, c.finish_reason.as_deref().map(finish))
        });
        Said {
            error: None,
            usage,
            first,
        }
    }
}

type Sending = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<http::Response<Pooled>, SendError>> + Send>,
>;

enum Phase {
    Send(Sending),
    Streaming(Pooled),
    /// A non-streamed answer: one JSON body.
    Whole(Pooled),
    Finished,
}

/// One generation in flight; owns its upstream slot until dropped.
struct Run {
    phase: Phase,
    kind: Kind,
    stream: bool,
    pending: VecDeque<InvokeEvent>,
    decoder: SseDecoder,
    chunks: u32,
    finish: Option<FinishReason>,
    usage: Option<(u32, u32)>,
    healthy: Arc<AtomicBool>,
    _slot: OwnedSemaphorePermit,
}

fn retryable_status(status: http::StatusCode) -> bool {
    status.is_server_error() || status.as_u16() == 429 || status.as_u16() == 408
}

impl Run {
    fn fail(&mut self, message: String, retryable: bool) {
        self.pending
            .push_back(InvokeEvent::Error { message, retryable });
        self.phase = Phase::Finished;
    }

    fn done(&mut self) {
        let (prompt_tokens, completion_tokens) = self.usage.unwrap_or((0, self.chunks));
        self.pending
            .push_back(InvokeEvent::Started { prompt_tokens });
        self.pending.push_back(InvokeEvent::Done {
            finish_reason: self.finish.unwrap_or(FinishReason::Stop),
            prompt_tokens,
            completion_tokens,
        });
        // The answer is complete: what is left of a streamed body is its
        // end, read in the background so that the connection serves again.
        if let Phase::Streaming(body) = std::mem::replace(&mut self.phase, Phase::Finished) {
            body.finish();
        }
    }

    /// Takes the error and the usage out of what one upstream answer or
    /// chunk said; false when it was an error (the run has failed).
    fn usage_or_error(&mut self, said: &mut Said) -> bool {
        if let Some(message) = said.error.take() {
            self.fail(format!("upstream: {message}"), true);
            return false;
        }
        if said.usage.is_some() {
            self.usage = said.usage;
        }
        true
    }

    fn finish_reason(&mut self, reason: Option<FinishReason>) {
        if reason.is_some() {
            self.finish = reason;
        }
    }

    /// Handles a whole non-streamed answer.
    fn whole(&mut self, body: &[u8]) {
        let Some(mut said) = Said::read(body, self.kind, true) else {
            self.fail("upstream sent a malformed answer".into(), true);
            return;
        };
        if !self.usage_or_error(&mut said) {
            return;
        }
        let Some((text, reason)) = said.first else {
            self.fail("upstream answer has no choices".into(), true);
            return;
        };
        if let Some(text) = text.filter(|t| !t.is_empty()) {
            let tokens = self.usage.map_or(1, |(_, c)| c.max(1));
            self.chunks = tokens;
            self.pending.push_back(InvokeEvent::Text { text, tokens });
        }
        self.finish_reason(reason);
        self.done();
    }

    /// Handles one SSE payload.
    fn payload(&mut self, payload: &str) {
        if payload == DONE {
            self.done();
            return;
        }
        let Some(mut said) = Said::read(payload.as_bytes(), self.kind, false) else {
            self.fail("upstream sent a malformed stream chunk".into(), true);
            return;
        };
        if !self.usage_or_error(&mut said) {
            return;
        }
        let Some((text, reason)) = said.first else {
            return;
        };
        if let Some(text) = text.filter(|t| !t.is_empty()) {
            self.chunks += 1;
            self.pending
                .push_back(InvokeEvent::Text { text, tokens: 1 });
        }
        self.finish_reason(reason);
    }

    /// Advances until an event is ready or the run is over.
    async fn next(&mut self) -> Option<InvokeEvent> {
        loop {
            if let Some(ev) = self.pending.pop_front() {
                return Some(ev);
            }
            match std::mem::replace(&mut self.phase, Phase::Finished) {
                Phase::Finished => return None,
                Phase::Send(pending) => match pending.await {
                    Err(e) => {
                        if e.is_connect() {
                            self.healthy.store(false, Ordering::Relaxed);
                        }
                        self.fail(
                            format!("upstream unreachable: {}", sluice_proto::error_chain(&e)),
                            true,
                        );
                    }
                    Ok(resp) if !resp.status().is_success() => {
                        self.healthy.store(true, Ordering::Relaxed);
                        let status = resp.status();
                        let body = match resp.into_body().collect().await {
                            Ok(b) => b.to_bytes(),
                            Err(_) => Bytes::new(),
                        };
                        let detail: String =
                            String::from_utf8_lossy(&body).chars().take(200).collect();
                        self.fail(
                            format!("upstream answered {status}: {detail}"),
                            retryable_status(status),
                        );
                    }
                    Ok(resp) => {
                        self.healthy.store(true, Ordering::Relaxed);
                        self.phase = if self.stream {
                            Phase::Streaming(resp.into_body())
                        } else {
                            Phase::Whole(resp.into_body())
                        };
                    }
                },
                Phase::Whole(body) => match body.collect().await {
                    Ok(body) => self.whole(&body.to_bytes()),
                    Err(e) => self.fail(format!("upstream answer broke: {e}"), true),
                },
                Phase::Streaming(mut body) => match body.frame().await.transpose() {
                    Ok(Some(frame)) => {
                        self.phase = Phase::Streaming(body);
                        // Trailers carry no events.
                        let Ok(bytes) = frame.into_data() else {
                            continue;
                        };
                        for payload in self.decoder.feed(&bytes) {
                            self.payload(&payload);
                            if matches!(self.phase, Phase::Finished) {
                                break;
                            }
                        }
                    }
                    // Some servers close without `[DONE]` after the finish reason.
                    Ok(None) if self.finish.is_some() => self.done(),
                    Ok(None) => self.fail("upstream stream ended early".into(), true),
                    Err(e) => self.fail(format!("upstream stream broke: {e}"), true),
                },
            }
        }
    }
}

impl Engine for UpstreamEngine {
    fn info(&self) -> EngineInfo {
        EngineInfo {
            model_id: self.config.model_id.clone(),
            capacity: self.config.capacity,
            context_length: self.config.context_length,
            description: format!(
                "upstream OpenAI-compatible server at {}, {} slots",
                self.base, self.config.capacity
            ),
        }
    }

    fn generate(&self, request: InvokeRequest) -> Result<EventStream, EngineError> {
        let slot = self
            .slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| EngineError::Busy)?;
        let (body, url, kind) = self.body(&request);
        let body = serde_json::to_vec(&body)
            .map_err(|e| EngineError::Invalid(format!("request body: {e}")))?;
        let accept = if request.stream {
            "text/event-stream"
        } else {
            "application/json"
        };
        // Built in place: `http::request::Builder` moves the whole request
        // through a `Result` for every header.
        let mut req = http::Request::new(Full::new(Bytes::from(body)));
        *req.method_mut() = http::Method::POST;
        *req.uri_mut() = url.clone();
        let headers = req.headers_mut();
        headers.insert(http::header::HOST, self.host.clone());
        headers.insert(http::header::ACCEPT, http::HeaderValue::from_static(accept));
        headers.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        if let Some(auth) = &self.authorization {
            headers.insert(http::header::AUTHORIZATION, auth.clone());
        }
        let run = Run {
            phase: Phase::Send(Box::pin(self.http.send(req))),
            kind,
            stream: request.stream,
            pending: VecDeque::new(),
            decoder: SseDecoder::new(),
            chunks: 0,
            finish: None,
            usage: None,
            healthy: self.healthy.clone(),
            _slot: slot,
        };
        // Dropping the stream drops the response, which closes the upstream request.
        Ok(Box::pin(futures_util::stream::unfold(
            run,
            |mut run| async move { run.next().await.map(|ev| (ev, run)) },
        )))
    }

    fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    fn in_flight(&self) -> u32 {
        self.config.capacity - self.slots.available_permits() as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both ways of reading an answer agree, and what the typed one
    /// refuses still reads as it did through `Value`.
    #[test]
    fn answers_read_the_same_typed_or_as_values() {
        let cases: &[(&str, Kind, bool)] = &[
            (
                r#"{"choices":[{"message":{"content":"hi"},"finish_reason":"length"}],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}"#,
                Kind::Chat,
                true,
            ),
            (
                r#"{"choices":[{"delta":{"content":"h\u00e9"},"finish_reason":null}]}"#,
                Kind::Chat,
                false,
            ),
            (
                r#"{"choices":[{"text":"x","finish_reason":"stop"}],"usage":{"prompt_tokens":1}}"#,
                Kind::Text,
                true,
            ),
            (r#"{"choices":[],"usage":null}"#, Kind::Chat, true),
            (
                r#"{"choices":[{"message":{"content":null}}]}"#,
                Kind::Chat,
                true,
            ),
            (r#"{"id":"x","object":"chat.completion"}"#, Kind::Chat, true),
        ];
        for (body, kind, whole) in cases {
            let fast: Fast = serde_json::from_slice(body.as_bytes()).unwrap();
            let a = fast.said(*kind, *whole);
            let v: Value = serde_json::from_str(body).unwrap();
            let b = Said::from_value(&v, *kind, *whole);
            assert_eq!(
                (a.error, a.usage, a.first),
                (b.error, b.usage, b.first),
                "{body}"
            );
        }
        // Refused by the typed reader, read through Value.
        // (answer, error message, usage)
        type Odd<'a> = (&'a str, Option<&'a str>, Option<(u32, u32)>);
        let odd: &[Odd] = &[
            (r#"{"error":{"message":"boom"}}"#, Some("boom"), None),
            (r#"{"error":"plain"}"#, Some("plain"), None),
            (r#"{"error":null}"#, Some("upstream error"), None),
            (
                r#"{"usage":{"prompt_tokens":1.5,"completion_tokens":2}}"#,
                None,
                None,
            ),
            (
                r#"{"usage":{"prompt_tokens":1,"completion_tokens":2},"usage":{"prompt_tokens":4,"completion_tokens":5}}"#,
                None,
                Some((4, 5)),
            ),
        ];
        for (body, error, usage) in odd {
            let said = Said::read(body.as_bytes(), Kind::Chat, true).unwrap();
            assert_eq!(said.error.as_deref(), *error, "{body}");
            assert_eq!(said.usage, *usage, "{body}");
        }
        let said = Said::read(
            br#"{"choices":[{"message":{"content":7}}]}"#,
            Kind::Chat,
            true,
        )
        .unwrap();
        assert_eq!(said.first, Some((None, None)));
        assert!(Said::read(b"not json", Kind::Chat, true).is_none());
        // An array is no answer, even one serde could read a struct from.
        let said = Said::read(br#"[false, null, [{"text":"x"}]]"#, Kind::Text, true).unwrap();
        assert!(said.first.is_none());
    }
    use futures_util::StreamExt;
    use sluice_bench::mock::{self, MockOptions, MockServer, COMPLETION_TOKENS, PROMPT_TOKENS};
    use sluice_proto::miner::{GenerationParams, PromptMessage};
    use tokio_util::sync::CancellationToken;

    async fn mock() -> (MockServer, CancellationToken) {
        let stop = CancellationToken::new();
        let m = mock::start(
            std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            MockOptions { record: true },
            stop.clone(),
        )
        .await
        .unwrap();
        (m, stop)
    }

    fn chat(model: &str, continuation: &str) -> InvokeRequest {
        InvokeRequest {
            request_id: "r1".into(),
            model: model.into(),
            input: PromptInput::Chat {
                messages: vec![PromptMessage {
                    role: "user".into(),
                    content: "hi".into(),
                }],
            },
            params: GenerationParams {
                max_tokens: Some(8),
                temperature: 0.0,
                seed: Some(7),
                stop: vec!["\n\n".into()],
                ..Default::default()
            },
            continuation: continuation.into(),
            stream: true,
        }
    }

    fn engine(m: &MockServer, model: &str, capacity: u32) -> UpstreamEngine {
        let mut cfg = UpstreamConfig::new(format!("{}/v1/", m.base_url()), model, capacity);
        cfg.api_key = Some("sk-test".into());
        UpstreamEngine::new(cfg).unwrap()
    }

    fn text_of(events: &[InvokeEvent]) -> String {
        events
            .iter()
            .filter_map(|e| match e {
                InvokeEvent::Text { text, .. } => Some(text.as_str()),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn chat_stream_maps_to_events_with_upstream_usage() {
        let (m, stop) = mock().await;
        let e = engine(&m, "mock-model", 2);
        let events: Vec<_> = e.generate(chat("mock-model", "")).unwrap().collect().await;
        assert_eq!(text_of(&events), mock::answer());
        let n = events.len();
        assert_eq!(
            events[n - 2],
            InvokeEvent::Started {
                prompt_tokens: PROMPT_TOKENS
            }
        );
        assert_eq!(
            events[n - 1],
            InvokeEvent::Done {
                finish_reason: FinishReason::Stop,
                prompt_tokens: PROMPT_TOKENS,
                completion_tokens: COMPLETION_TOKENS,
            }
        );
        let sent = m.last_request().unwrap();
        assert_eq!(sent["model"], "mock-model");
        assert_eq!(sent["stream"], true);
        assert_eq!(sent["stream_options"]["include_usage"], true);
        assert_eq!(sent["max_tokens"], 8);
        assert_eq!(sent["seed"], 7);
        assert_eq!(sent["stop"][0], "\n\n");
        assert!(sent.get("continue_final_message").is_none());
        assert_eq!(e.in_flight(), 0);
        stop.cancel();
    }

    #[tokio::test]
    async fn unstreamed_requests_get_one_answer_as_one_text_event() {
        let (m, stop) = mock().await;
        let e = engine(&m, "mock-model", 2);
        let mut req = chat("mock-model", "");
        req.stream = false;
        let events: Vec<_> = e.generate(req.clone()).unwrap().collect().await;
        assert_eq!(
            events,
            vec![
                InvokeEvent::Text {
                    text: mock::answer(),
                    tokens: COMPLETION_TOKENS,
                },
                InvokeEvent::Started {
                    prompt_tokens: PROMPT_TOKENS
                },
                InvokeEvent::Done {
                    finish_reason: FinishReason::Stop,
                    prompt_tokens: PROMPT_TOKENS,
                    completion_tokens: COMPLETION_TOKENS,
                },
            ]
        );
        let sent = m.last_request().unwrap();
        assert_eq!(sent["stream"], false);
        assert!(sent.get("stream_options").is_none());
        // Text prompts take the same way through /v1/completions.
        req.input = PromptInput::Text {
            prompt: "Once".into(),
        };
        let events: Vec<_> = e.generate(req).unwrap().collect().await;
        assert_eq!(text_of(&events), mock::answer());
        assert_eq!(m.last_request().unwrap()["prompt"], "Once");
        // Upstream failures are the same error events as when streaming.
        for (model, retryable) in [("fail-500", true), ("fail-400", false)] {
            let e = engine(&m, model, 1);
            let mut req = chat(model, "");
            req.stream = false;
            let events: Vec<_> = e.generate(req).unwrap().collect().await;
            match events.as_slice() {
                [InvokeEvent::Error { retryable: r, .. }] => assert_eq!(*r, retryable, "{model}"),
                other => panic!("{model}: {other:?}"),
            }
        }
        assert_eq!(e.in_flight(), 0);
        stop.cancel();
    }

    #[tokio::test]
    async fn text_prompts_use_completions_and_append_the_continuation() {
        let (m, stop) = mock().await;
        let e = engine(&m, "mock-model", 2);
        let mut req = chat("mock-model", " already said");
        req.input = PromptInput::Text {
            prompt: "Once".into(),
        };
        let events: Vec<_> = e.generate(req).unwrap().collect().await;
        assert_eq!(text_of(&events), mock::answer());
        assert!(matches!(events.last(), Some(InvokeEvent::Done { .. })));
        assert_eq!(m.last_request().unwrap()["prompt"], "Once already said");
        stop.cancel();
    }

    #[tokio::test]
    async fn chat_continuation_becomes_a_final_assistant_message() {
        let (m, stop) = mock().await;
        let e = engine(&m, "mock-model", 2);
        let _: Vec<_> = e
            .generate(chat("mock-model", "Hello fr"))
            .unwrap()
            .collect()
            .await;
        let sent = m.last_request().unwrap();
        let msgs = sent["messages"].as_array().unwrap();
        assert_eq!(msgs.len(), 2);
        assert_eq!(msgs[1]["role"], "assistant");
        assert_eq!(msgs[1]["content"], "Hello fr");
        assert_eq!(sent["continue_final_message"], true);
        assert_eq!(sent["add_generation_prompt"], false);
        stop.cancel();
    }

    #[tokio::test]
    async fn upstream_failures_become_error_events() {
        let (m, stop) = mock().await;
        for (model, retryable) in [("fail-500", true), ("fail-400", false)] {
            let e = engine(&m, model, 1);
            let events: Vec<_> = e.generate(chat(model, "")).unwrap().collect().await;
            match events.as_slice() {
                [InvokeEvent::Error { retryable: r, .. }] => assert_eq!(*r, retryable, "{model}"),
                other => panic!("{model}: {other:?}"),
            }
        }
        let e = engine(&m, "fail-midstream", 1);
        let events: Vec<_> = e
            .generate(chat("fail-midstream", ""))
            .unwrap()
            .collect()
            .await;
        assert!(matches!(
            events.last(),
            Some(InvokeEvent::Error {
                retryable: true,
                ..
            })
        ));
        assert!(matches!(events[0], InvokeEvent::Text { .. }), "{events:?}");
        stop.cancel();
    }

    #[tokio::test]
    async fn refuses_beyond_capacity_and_frees_slots_on_drop() {
        let (m, stop) = mock().await;
        let e = engine(&m, "mock-model", 1);
        let first = e.generate(chat("mock-model", "")).unwrap();
        assert_eq!(e.in_flight(), 1);
        assert!(matches!(
            e.generate(chat("mock-model", "")),
            Err(EngineError::Busy)
        ));
        drop(first);
        assert_eq!(e.in_flight(), 0);
        assert!(e.generate(chat("mock-model", "")).is_ok());
        stop.cancel();
    }

    #[tokio::test]
    async fn unreachable_upstream_is_retryable_and_unhealthy() {
        // Bind then drop: nothing listens on that port any more.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let e = UpstreamEngine::new(UpstreamConfig::new(
            format!("http://127.0.0.1:{port}"),
            "m",
            1,
        ))
        .unwrap();
        let events: Vec<_> = e.generate(chat("m", "")).unwrap().collect().await;
        assert!(matches!(
            events.as_slice(),
            [InvokeEvent::Error {
                retryable: true,
                ..
            }]
        ));
        assert!(!e.healthy());
    }

    #[test]
    fn rejects_bad_config() {
        assert!(UpstreamEngine::new(UpstreamConfig::new("ftp://127.0.0.1", "m", 1)).is_err());
        assert!(UpstreamEngine::new(UpstreamConfig::new("http://127.0.0.1:9", "m", 0)).is_err());
        let Err(e) = UpstreamEngine::new(UpstreamConfig::new("https://127.0.0.1:9/v1", "m", 1))
        else {
            panic!("an https upstream must be refused");
        };
        assert!(e.to_string().contains("https is not supported"), "{e}");
        let Err(e) = UpstreamEngine::new(UpstreamConfig {
            api_key: Some("bad\nkey".into()),
            ..UpstreamConfig::new("http://127.0.0.1:9", "m", 1)
        }) else {
            panic!("a key that is not a header value must be refused");
        };
        assert!(e.to_string().contains("API key"), "{e}");
    }
}
