//! The OpenAI-compatible HTTP surface: parsing and validation into a
//! driver [`Job`], and turning driver events into JSON or SSE responses.

use std::convert::Infallible;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::stream;
use serde::de::DeserializeOwned;
use sluice_proto::miner::{GenerationParams, PromptInput, PromptMessage, HDR_REQUEST_ID};
use sluice_proto::openai::{
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
    ChatCompletionResponse, ChunkDelta, CompletionChoice, CompletionRequest, CompletionResponse,
    MessageContent, ModelList, ModelObject, PromptSpec, SamplingFields, Usage,
};
use sluice_proto::sse::{encode_data, DONE};
use sluice_store::{now_ms, RequestRecord};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::forward::{self, DriverEvent, Job, Outcome, Trace};
use crate::AppState;

/// Header a client sets to change how long it will wait for capacity.
pub const HDR_MAX_WAIT: &str = "x-sluice-max-wait";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Completion,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Chat => "chat",
            Kind::Completion => "completion",
        }
    }
}

/// The parts of a request record known before generation starts.
#[derive(Debug, Clone)]
pub struct RecordBase {
    pub id: String,
    pub caller: Caller,
    pub model: String,
    pub kind: Kind,
    pub stream: bool,
    pub created_ms: i64,
    pub arrived: Instant,
    pub admitted: crate::billing::Admitted,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Request ids sort by time (see [`sluice_store::time_ordered_id`]).
pub fn new_request_id() -> String {
    sluice_store::time_ordered_id()
}

/// Header a client sets to correlate its requests with ours; echoed back.
pub const HDR_CLIENT_REQUEST_ID: &str = "x-client-request-id";

/// The client's own id for the request (`x-client-request-id`, or
/// `x-request-id`), when sane. Only echoed and logged: the ledger keys
/// requests by an id Sluice generates, so a reused client id can neither
/// collide with another request nor dodge a charge.
pub fn client_request_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get(HDR_CLIENT_REQUEST_ID)
        .or_else(|| headers.get(HDR_REQUEST_ID))
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 64
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
        .map(str::to_string)
}

async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| ApiError::BodyTooLarge { limit })
}

/// Parses JSON, naming the offending field in the error's `param`.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    // Well-formed objects go straight into `T`. Anything else takes the
    // slow path below, which accepts the same documents (duplicate keys:
    // the last wins) and names the offending field when it refuses one.
    if sluice_proto::starts_as_json_object(bytes) {
        if let Ok(v) = serde_json::from_slice(bytes) {
            return Ok(v);
        }
    }
    let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| {
        ApiError::invalid(
            format!("We could not parse the JSON body of your request: {e}"),
            None,
        )
    })?;
    if !value.is_object() {
        return Err(ApiError::invalid(
            "the request body must be a JSON object",
            None,
        ));
    }
    from_value_with_param::<T>(&value).map_err(|(msg, param)| {
        // Flattened sampling fields lose their path: find the field.
        let param = param.or_else(|| {
            from_value_with_param::<SamplingFields>(&value)
                .err()
                .and_then(|(_, p)| p)
        });
        ApiError::invalid(format!("Invalid request: {msg}"), param)
    })
}

fn from_value_with_param<T: DeserializeOwned>(
    value: &serde_json::Value,
) -> Result<T, (String, Option<String>)> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let msg = e.into_inner().to_string();
        let param = if path == "." || path.is_empty() {
            // serde reports a missing field at its parent; name the field.
            msg.strip_prefix("missing field `")
                .and_then(|rest| rest.split('`').next())
                .map(str::to_string)
        } else {
            Some(path)
        };
        (msg, param)
    })
}

/// Validates the sampling fields shared by both endpoints.
pub fn generation_params(s: &SamplingFields) -> Result<GenerationParams, ApiError> {
    let bad = |p: &str, m: &str| ApiError::invalid(m.to_string(), Some(p.to_string()));
    let max_tokens = s.max_completion_tokens.or(s.max_tokens);
    if max_tokens == Some(0) {
        let p = if s.max_completion_tokens.is_some() {
            "max_completion_tokens"
        } else {
            "max_tokens"
        };
        return Err(bad(p, "must be at least 1"));
    }
    let temperature = s.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(bad("temperature", "temperature must be between 0 and 2"));
    }
    let top_p = s.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(bad("top_p", "top_p must be greater than 0 and at most 1"));
    }
    if let Some(n) = s.n {
        if n != 1 {
            return Err(bad("n", "only n = 1 is supported"));
        }
    }
    for (param, value) in [
        ("presence_penalty", s.presence_penalty),
        ("frequency_penalty", s.frequency_penalty),
    ] {
        if value.is_some_and(|v| !(-2.0..=2.0).contains(&v)) {
            return Err(bad(param, &format!("{param} must be between -2 and 2")));
        }
    }
    // `logprobs: true` (chat), a count above 0 (text completions) or any
    // `top_logprobs` above 0 asks for what no engine here returns.
    let asks = |v: &Option<serde_json::Value>| match v {
        Some(serde_json::Value::Bool(b)) => *b,
        Some(serde_json::Value::Number(n)) => n.as_f64().is_some_and(|x| x > 0.0),
        _ => false,
    };
    for (param, value) in [("logprobs", &s.logprobs), ("top_logprobs", &s.top_logprobs)] {
        if asks(value) {
            return Err(bad(
                param,
                &format!(
                    "{param} is not supported: the engines on this network return no token \
                     probabilities"
                ),
            ));
        }
    }
    let stop = s.stop.clone().map(|st| st.into_vec()).unwrap_or_default();
    if stop.len() > 4 {
        return Err(bad("stop", "at most 4 stop sequences are allowed"));
    }
    Ok(GenerationParams {
        max_tokens,
        temperature,
        top_p,
        seed: s.seed,
        stop,
    })
}

/// Refuses the chat fields whose values promise what no answer here
/// keeps: a required tool call (the models answer in text; `tools` with
/// `tool_choice` absent, `"none"` or `"auto"` are served as text) or a
/// JSON answer.
pub fn unsupported_chat_fields(req: &ChatCompletionRequest) -> Result<(), ApiError> {
    const NO_TOOL_CALLS: &str =
        "models on this network answer in text and make no tool calls; use \"auto\" or \"none\"";
    let bad = |p: &str, m: String| ApiError::invalid(m, Some(p.to_string()));
    match &req.tool_choice {
        None | Some(serde_json::Value::Null) => {}
        Some(serde_json::Value::String(s)) if s == "none" || s == "auto" => {}
        Some(serde_json::Value::String(s)) if s == "required" => {
            return Err(bad(
                "tool_choice",
                format!("tool_choice \"required\" is not supported: {NO_TOOL_CALLS}"),
            ))
        }
        Some(serde_json::Value::Object(_)) => {
            return Err(bad(
                "tool_choice",
                format!("a named tool_choice is not supported: {NO_TOOL_CALLS}"),
            ))
        }
        Some(_) => {
            return Err(bad(
                "tool_choice",
                "tool_choice must be \"none\", \"auto\", \"required\" or an object naming \
                 a function"
                    .into(),
            ))
        }
    }
    if let Some(format) = req.response_format.as_ref().filter(|f| !f.is_null()) {
        match format.get("type").and_then(|t| t.as_str()) {
            Some("text") => {}
            Some(k @ ("json_object" | "json_schema")) => {
                return Err(bad(
                    "response_format",
                    format!(
                        "response_format type \"{k}\" is not supported: the answer is the \
                         model's plain text, which nothing here constrains to JSON; leave \
                         response_format out or set its type to \"text\""
                    ),
                ))
            }
            _ => {
                return Err(bad(
                    "response_format",
                    "response_format must be an object whose type is \"text\", \
                     \"json_object\" or \"json_schema\""
                        .into(),
                ))
            }
        }
    }
    Ok(())
}

/// Chat messages to text-only prompt messages.
pub fn prompt_messages(req: &ChatCompletionRequest) -> Result<Vec<PromptMessage>, ApiError> {
    if req.messages.is_empty() {
        return Err(ApiError::invalid(
            "messages must contain at least one message",
            Some("messages".to_string()),
        ));
    }
    req.messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let role = match m.role.as_str() {
                "system" | "developer" => "system",
                "user" => "user",
                "assistant" => "assistant",
                "tool" => "tool",
                other => {
                    return Err(ApiError::invalid(
                        format!("unsupported role `{other}`"),
                        Some(format!("messages[{i}].role")),
                    ))
                }
            };
            let content = match &m.content {
                None => String::new(),
                Some(MessageContent::Text(t)) => t.clone(),
                Some(MessageContent::Parts(parts)) => {
                    let mut out = String::new();
                    for (j, p) in parts.iter().enumerate() {
                        match (p.kind.as_str(), &p.text) {
                            ("text", Some(t)) => out.push_str(t),
                            _ => {
                                return Err(ApiError::invalid(
                                    format!(
                                    "content parts of type `{}` are not supported by this model",
                                    p.kind
                                ),
                                    Some(format!("messages[{i}].content[{j}]")),
                                ))
                            }
                        }
                    }
                    out
                }
            };
            Ok(PromptMessage {
                role: role.to_string(),
                content,
            })
        })
        .collect()
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Close model names for a 404, best first.
pub fn suggestions(wanted: &str, known: &[String]) -> Vec<String> {
    let w = wanted.to_lowercase();
    let mut scored: Vec<(usize, &String)> = known
        .iter()
        .filter_map(|k| {
            let kl = k.to_lowercase();
            let short = kl.rsplit('/').next().unwrap_or(&kl);
            let d = edit_distance(&w, &kl).min(edit_distance(&w, short));
            let close = d <= (w.len() / 3).max(3) || (!w.is_empty() && kl.contains(&w));
            close.then_some((d, k))
        })
        .collect();
    scored.sort();
    scored.into_iter().take(3).map(|(_, k)| k.clone()).collect()
}

fn resolve_model(state: &AppState, model: &str) -> Result<sluice_store::Chute, ApiError> {
    if let Some(chute) = state.chutes().iter().find(|c| c.model_id == model) {
        return Ok(chute.clone());
    }
    let known = state.chute_ids();
    let close = suggestions(model, &known);
    let hint = if close.is_empty() {
        format!("Available models: {}.", known.join(", "))
    } else {
        format!(
            "Did you mean {}?",
            close
                .iter()
                .map(|c| format!("`{c}`"))
                .collect::<Vec<_>>()
                .join(" or ")
        )
    };
    Err(ApiError::ModelNotFound {
        message: format!("The model `{model}` does not exist. {hint}"),
    })
}

fn max_wait(state: &AppState, headers: &HeaderMap) -> Result<Duration, ApiError> {
    let Some(v) = headers.get(HDR_MAX_WAIT) else {
        return Ok(Duration::from_secs_f64(state.config.default_max_wait_s));
    };
    let secs: f64 = v
        .to_str()
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .filter(|s: &f64| s.is_finite() && *s >= 0.0)
        .ok_or_else(|| {
            ApiError::invalid(
                format!("{HDR_MAX_WAIT} must be a non-negative number of seconds"),
                Some(HDR_MAX_WAIT.to_string()),
            )
        })?;
    Ok(Duration::from_secs_f64(
        secs.min(state.config.max_wait_cap_s),
    ))
}

fn with_request_id(mut resp: Response, id: &str, client_id: Option<&str>) -> Response {
    if let Ok(v) = HeaderValue::from_str(id) {
        resp.headers_mut()
            .insert(HeaderName::from_static(HDR_REQUEST_ID), v);
    }
    if let Some(v) = client_id.and_then(|c| HeaderValue::from_str(c).ok()) {
        resp.headers_mut()
            .insert(HeaderName::from_static(HDR_CLIENT_REQUEST_ID), v);
    }
    resp
}

pub async fn chat_completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    serve(&state, &headers, body, Kind::Chat).await
}

pub async fn completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    serve(&state, &headers, body, Kind::Completion).await
}

/// Runs one completion request; every outcome carries the request id and
/// (once the caller is known) the rate-limit headers.
async fn serve(state: &AppState, headers: &HeaderMap, body: Body, kind: Kind) -> Response {
    let id = new_request_id();
    let client_id = client_request_id(headers);
    if let Some(c) = &client_id {
        tracing::debug!(request_id = %id, client_request_id = %c, "client request id");
    }
    let mut rate = None;
    let mut resp = match handle(state, headers, body, kind, &id, &mut rate).await {
        Ok(r) => r,
        Err(e) => {
            count_error(state, &e);
            e.into_response()
        }
    };
    if let Some(r) = rate {
        r.apply(resp.headers_mut());
    }
    with_request_id(resp, &id, client_id.as_deref())
}

fn count_error(state: &AppState, e: &ApiError) {
    state.metrics.inc(
        "sluice_requests_total",
        &[("model", "-"), ("status", e.code())],
        1,
    );
}

async fn handle(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
    kind: Kind,
    id: &str,
    rate: &mut Option<crate::billing::RateHeaders>,
) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let caller = state.auth.authenticate(headers).await?;
    let bytes = read_body(body, state.config.max_body_bytes).await?;
    let (model, input, sampling) = match kind {
        Kind::Chat => {
            let req: ChatCompletionRequest = parse_json(&bytes)?;
            unsupported_chat_fields(&req)?;
            let messages = prompt_messages(&req)?;
            (req.model, PromptInput::Chat { messages }, req.sampling)
        }
        Kind::Completion => {
            let req: CompletionRequest = parse_json(&bytes)?;
            let prompt = match req.prompt {
                PromptSpec::One(p) => p,
                PromptSpec::Many(mut v) if v.len() == 1 => v.remove(0),
                PromptSpec::Many(_) => {
                    return Err(ApiError::invalid(
                        "prompt must be a string or a list of one string",
                        Some("prompt".to_string()),
                    ))
                }
            };
            (req.model, PromptInput::Text { prompt }, req.sampling)
        }
    };
    let params = generation_params(&sampling)?;
    let chute = resolve_model(state, &model)?;
    let model = chute.model_id.clone();
    let wait = max_wait(state, headers)?;
    let admitted = crate::billing::admit(
        state,
        &caller,
        id,
        &chute,
        bytes.len(),
        params.max_tokens,
        rate,
    )
    .await?;
    let stream = sampling.stream.unwrap_or(false);
    let include_usage = sampling
        .stream_options
        .as_ref()
        .and_then(|o| o.include_usage)
        .unwrap_or(false);
    let overhead = arrived.elapsed();
    state.metrics.observe(
        "sluice_gateway_overhead_seconds",
        &[("model", &model)],
        overhead.as_secs_f64(),
    );
    let job = Job {
        request_id: id.to_string(),
        model: model.clone(),
        input,
        params,
        deadline: arrived + wait,
        priority: u8::from(caller.tier == "paid"),
        stream,
    };
    let record = RecordBase {
        id: id.to_string(),
        caller,
        model: model.clone(),
        kind,
        stream,
        created_ms: now_ms(),
        arrived,
        admitted,
    };
    let mut rx = forward::spawn(state, job, record);
    // Hold the response until the first event: errors before any text
    // still get a proper status code.
    let first = rx
        .recv()
        .await
        .ok_or_else(|| ApiError::internal("driver ended without an event"))?;
    if let DriverEvent::Failed(e) = first {
        return Err(e);
    }
    let out = Output {
        id: match kind {
            Kind::Chat => format!("chatcmpl-{id}"),
            Kind::Completion => format!("cmpl-{id}"),
        },
        created: unix_now(),
        model,
        kind,
    };
    if stream {
        Ok(stream_response(out, first, rx, include_usage))
    } else {
        collect_response(out, first, rx).await
    }
}

/// Shapes one response's chunks and bodies.
struct Output {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
}

impl Output {
    fn text_chunk(&self, text: Option<String>, role: bool, finish: Option<String>) -> String {
        match self.kind {
            Kind::Chat => json(&ChatCompletionChunk {
                id: self.id.clone(),
                object: "chat.completion.chunk".into(),
                created: self.created,
                model: self.model.clone(),
                choices: vec![ChatChunkChoice {
                    index: 0,
                    delta: ChunkDelta {
                        role: role.then(|| "assistant".to_string()),
                        content: text,
                    },
                    finish_reason: finish,
                    logprobs: None,
                }],
                usage: None,
            }),
            Kind::Completion => json(&CompletionResponse {
                id: self.id.clone(),
                object: "text_completion".into(),
                created: self.created,
                model: self.model.clone(),
                choices: vec![CompletionChoice {
                    index: 0,
                    text: text.unwrap_or_default(),
                    finish_reason: finish,
                    logprobs: None,
                }],
                usage: None,
            }),
        }
    }

    fn usage_chunk(&self, usage: Usage) -> String {
        match self.kind {
            Kind::Chat => json(&ChatCompletionChunk {
                id: self.id.clone(),
                object: "chat.completion.chunk".into(),
                created: self.created,
                model: self.model.clone(),
                choices: vec![],
                usage: Some(usage),
            }),
            Kind::Completion => json(&CompletionResponse {
                id: self.id.clone(),
                object: "text_completion".into(),
                created: self.created,
                model: self.model.clone(),
                choices: vec![],
                usage: Some(usage),
            }),
        }
    }

    fn full(&self, text: String, o: &Outcome) -> String {
        let usage = Usage::new(o.prompt_tokens, o.completion_tokens);
        let finish = Some(o.finish_reason.as_str().to_string());
        match self.kind {
            Kind::Chat => json(&ChatCompletionResponse {
                id: self.id.clone(),
                object: "chat.completion".into(),
                created: self.created,
                model: self.model.clone(),
                choices: vec![ChatChoice {
                    index: 0,
                    message: AssistantMessage {
                        role: "assistant".into(),
                        content: text,
                    },
                    finish_reason: finish,
                    logprobs: None,
                }],
                usage,
            }),
            Kind::Completion => json(&CompletionResponse {
                id: self.id.clone(),
                object: "text_completion".into(),
                created: self.created,
                model: self.model.clone(),
                choices: vec![CompletionChoice {
                    index: 0,
                    text,
                    finish_reason: finish,
                    logprobs: None,
                }],
                usage: Some(usage),
            }),
        }
    }
}

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "{}".to_string())
}

async fn collect_response(
    out: Output,
    first: DriverEvent,
    mut rx: mpsc::Receiver<DriverEvent>,
) -> Result<Response, ApiError> {
    let mut text = String::new();
    let mut next = Some(first);
    loop {
        let event = match next.take() {
            Some(ev) => Some(ev),
            None => rx.recv().await,
        };
        match event {
            Some(DriverEvent::Text(t)) => text.push_str(&t),
            Some(DriverEvent::Done(o)) => {
                let body = out.full(text, &o);
                return Ok((
                    StatusCode::OK,
                    [(header::CONTENT_TYPE, "application/json")],
                    body,
                )
                    .into_response());
            }
            Some(DriverEvent::Failed(e)) => return Err(e),
            None => return Err(ApiError::internal("driver ended without finishing")),
        }
    }
}

enum Phase {
    Start(DriverEvent),
    Running,
    Finished,
}

fn stream_response(
    out: Output,
    first: DriverEvent,
    rx: mpsc::Receiver<DriverEvent>,
    include_usage: bool,
) -> Response {
    let frames = stream::unfold(
        (out, rx, Phase::Start(first)),
        move |(out, mut rx, phase)| async move {
            let (frame, next) = match phase {
                Phase::Finished => return None,
                Phase::Start(first) => {
                    let mut frame = encode_data(&out.text_chunk(Some(String::new()), true, None));
                    let (more, next) = sse_for(&out, first, include_usage);
                    frame.push_str(&more);
                    (frame, next)
                }
                Phase::Running => match rx.recv().await {
                    Some(ev) => sse_for(&out, ev, include_usage),
                    None => {
                        let err = ApiError::internal("generation ended unexpectedly");
                        (
                            format!("{}{}", encode_data(&json(&err.body())), encode_data(DONE)),
                            Phase::Finished,
                        )
                    }
                },
            };
            Some((Ok::<_, Infallible>(Bytes::from(frame)), (out, rx, next)))
        },
    );
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .header("x-accel-buffering", "no")
        .body(Body::from_stream(frames))
        .unwrap_or_else(|_| ApiError::internal("response build").into_response())
}

/// SSE frames for one driver event, and the phase after it.
fn sse_for(out: &Output, ev: DriverEvent, include_usage: bool) -> (String, Phase) {
    match ev {
        DriverEvent::Text(t) => (
            encode_data(&out.text_chunk(Some(t), false, None)),
            Phase::Running,
        ),
        DriverEvent::Done(o) => {
            let mut s = encode_data(&out.text_chunk(
                if out.kind == Kind::Completion {
                    Some(String::new())
                } else {
                    None
                },
                false,
                Some(o.finish_reason.as_str().to_string()),
            ));
            if include_usage {
                s.push_str(&encode_data(
                    &out.usage_chunk(Usage::new(o.prompt_tokens, o.completion_tokens)),
                ));
            }
            s.push_str(&encode_data(DONE));
            (s, Phase::Finished)
        }
        DriverEvent::Failed(e) => (
            format!("{}{}", encode_data(&json(&e.body())), encode_data(DONE)),
            Phase::Finished,
        ),
    }
}

/// Writes the request's metadata row and metrics once the driver ends.
pub async fn settle(state: &AppState, base: RecordBase, trace: &Trace) {
    let model = base.model.as_str();
    let m = &state.metrics;
    m.inc(
        "sluice_requests_total",
        &[("model", model), ("status", trace.status)],
        1,
    );
    m.inc(
        "sluice_prompt_tokens_total",
        &[("model", model)],
        trace.prompt_tokens as u64,
    );
    m.inc(
        "sluice_generated_tokens_total",
        &[("model", model)],
        trace.completion_tokens as u64,
    );
    m.observe(
        "sluice_queue_wait_seconds",
        &[("model", model)],
        trace.queue.as_secs_f64(),
    );
    let total = base.arrived.elapsed();
    m.observe(
        "sluice_request_duration_seconds",
        &[("model", model)],
        total.as_secs_f64(),
    );
    if let Some(ttft) = trace.ttft {
        m.observe(
            "sluice_time_to_first_token_seconds",
            &[("model", model)],
            ttft.as_secs_f64(),
        );
        let decode = total.saturating_sub(ttft).as_secs_f64();
        if trace.completion_tokens > 1 && decode > 0.0 {
            m.observe(
                "sluice_decode_tokens_per_second",
                &[("model", model)],
                (trace.completion_tokens - 1) as f64 / decode,
            );
        }
    }
    let (cost, settlement) =
        crate::billing::finish(state, &base.caller, &base.id, &base.admitted, trace).await;
    let http_status = match trace.status {
        "ok" | "cancelled" => 200,
        "no_capacity" => 503,
        "invalid_request" => 400,
        _ => 500,
    };
    let record = RequestRecord {
        id: base.id,
        user_id: base.caller.user_id,
        key_id: base.caller.key_id,
        model: base.model,
        kind: base.kind.as_str().to_string(),
        stream: base.stream,
        miner_key: trace.miner_key.clone(),
        status: trace.status.to_string(),
        http_status,
        prompt_tokens: trace.prompt_tokens as i64,
        completion_tokens: trace.completion_tokens as i64,
        attempts: trace.attempts as i64,
        queue_ms: trace.queue.as_millis() as i64,
        ttft_ms: trace.ttft.map(|t| t.as_millis() as i64),
        latency_ms: total.as_millis() as i64,
        created_ms: base.created_ms,
        cost,
    };
    // Every request is a row in the requests table already: at info level
    // this line would only repeat it (and cost a write per request).
    tracing::debug!(
        status = trace.status,
        prompt_tokens = trace.prompt_tokens,
        completion_tokens = trace.completion_tokens,
        attempts = trace.attempts,
        latency_ms = total.as_millis() as u64,
        "request finished"
    );
    // Nothing here waits for the commit: the store logs the outcome.
    state.store.finish_request(settlement, record).await;
}

pub async fn list_models(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(e) = state.auth.authenticate(&headers).await {
        return e.into_response();
    }
    let chutes = state.chutes();
    let list = ModelList {
        object: "list".into(),
        data: chutes
            .iter()
            .map(|c| ModelObject {
                id: c.model_id.clone(),
                object: "model".into(),
                created: (c.created_ms / 1000) as u64,
                owned_by: "sluice".into(),
            })
            .collect(),
    };
    axum::Json(list).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_proto::openai::StopSpec;

    #[test]
    fn params_validation_names_the_param() {
        let mut s = SamplingFields::default();
        assert!(generation_params(&s).is_ok());
        s.temperature = Some(3.0);
        let e = generation_params(&s).unwrap_err();
        assert_eq!(e.body().error.param.as_deref(), Some("temperature"));
        s.temperature = None;
        s.max_tokens = Some(0);
        assert_eq!(
            generation_params(&s)
                .unwrap_err()
                .body()
                .error
                .param
                .as_deref(),
            Some("max_tokens")
        );
        s.max_tokens = None;
        s.stop = Some(StopSpec::Many(vec!["a".into(); 5]));
        assert_eq!(
            generation_params(&s)
                .unwrap_err()
                .body()
                .error
                .param
                .as_deref(),
            Some("stop")
        );
        s.stop = None;
        s.max_tokens = Some(9);
        s.max_completion_tokens = Some(5);
        assert_eq!(generation_params(&s).unwrap().max_tokens, Some(5));
    }

    #[test]
    fn penalties_outside_openai_range_are_refused() {
        let mut s = SamplingFields {
            presence_penalty: Some(2.0),
            frequency_penalty: Some(-2.0),
            ..Default::default()
        };
        assert!(generation_params(&s).is_ok());
        s.frequency_penalty = Some(100.0);
        let e = generation_params(&s).unwrap_err();
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        assert_eq!(e.body().error.param.as_deref(), Some("frequency_penalty"));
        s.frequency_penalty = None;
        s.presence_penalty = Some(f32::NAN);
        let e = generation_params(&s).unwrap_err();
        assert_eq!(e.body().error.param.as_deref(), Some("presence_penalty"));
    }

    #[test]
    fn token_probabilities_are_refused_not_answered_with_null() {
        let parse = |extra: &str| -> SamplingFields {
            serde_json::from_str(&format!("{{{extra}}}")).unwrap()
        };
        for ok in [
            "",
            r#""logprobs":false"#,
            r#""logprobs":null"#,
            r#""logprobs":0,"top_logprobs":0"#,
        ] {
            assert!(generation_params(&parse(ok)).is_ok(), "{ok}");
        }
        for (refused, param) in [
            (r#""logprobs":true"#, "logprobs"),
            (r#""logprobs":3"#, "logprobs"),
            (r#""top_logprobs":2"#, "top_logprobs"),
        ] {
            let e = generation_params(&parse(refused)).unwrap_err();
            assert_eq!(e.status(), StatusCode::BAD_REQUEST, "{refused}");
            assert_eq!(e.body().error.param.as_deref(), Some(param), "{refused}");
        }
    }

    #[test]
    fn tool_calls_and_json_answers_that_cannot_be_kept_are_refused() {
        let chat = |extra: &str| -> ChatCompletionRequest {
            parse_json(
                format!(r#"{{"model":"m","messages":[{{"role":"user","content":"hi"}}]{extra}}}"#)
                    .as_bytes(),
            )
            .unwrap()
        };
        let tools = r#","tools":[{"type":"function","function":{"name":"f","parameters":{}}}]"#;
        for ok in [
            String::new(),
            tools.to_string(),
            format!(r#"{tools},"tool_choice":"auto""#),
            format!(r#"{tools},"tool_choice":"none""#),
            r#","tool_choice":null,"response_format":null"#.to_string(),
            r#","response_format":{"type":"text"}"#.to_string(),
        ] {
            assert!(unsupported_chat_fields(&chat(&ok)).is_ok(), "{ok}");
        }
        for (refused, param, says) in [
            (
                format!(r#"{tools},"tool_choice":"required""#),
                "tool_choice",
                "\"required\" is not supported",
            ),
            (
                format!(r#"{tools},"tool_choice":{{"type":"function","function":{{"name":"f"}}}}"#),
                "tool_choice",
                "named tool_choice",
            ),
            (r#","tool_choice":7"#.to_string(), "tool_choice", "must be"),
            (
                r#","response_format":{"type":"json_object"}"#.to_string(),
                "response_format",
                "\"json_object\" is not supported",
            ),
            (
                r#","response_format":{"type":"json_schema","json_schema":{"name":"x"}}"#
                    .to_string(),
                "response_format",
                "\"json_schema\" is not supported",
            ),
            (
                r#","response_format":"json""#.to_string(),
                "response_format",
                "must be",
            ),
        ] {
            let e = unsupported_chat_fields(&chat(&refused)).unwrap_err();
            assert_eq!(e.status(), StatusCode::BAD_REQUEST, "{refused}");
            let body = e.body();
            assert_eq!(body.error.param.as_deref(), Some(param), "{refused}");
            assert!(
                body.error.message.contains(says),
                "{refused}: {}",
                body.error.message
            );
        }
    }

    #[test]
    fn json_errors_name_the_field() {
        let e = parse_json::<ChatCompletionRequest>(
            br#"{"model":"m","messages":[],"temperature":"hot"}"#,
        )
        .unwrap_err();
        assert_eq!(e.body().error.param.as_deref(), Some("temperature"));
        let e = parse_json::<ChatCompletionRequest>(br#"{"messages":[]}"#).unwrap_err();
        assert_eq!(e.body().error.param.as_deref(), Some("model"));
        let e = parse_json::<ChatCompletionRequest>(b"{not json").unwrap_err();
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn json_bodies_parse_the_same_on_both_paths() {
        let msgs = r#""messages":[{"role":"user","content":"hi"}]"#;
        let ok: ChatCompletionRequest =
            parse_json(format!(r#" {{"model":"m",{msgs},"max_tokens":5}}"#).as_bytes()).unwrap();
        assert_eq!((ok.model.as_str(), ok.sampling.max_tokens), ("m", Some(5)));
        // A repeated key: the last wins, as before the direct path existed.
        let dup: ChatCompletionRequest =
            parse_json(format!(r#"{{"model":"a","model":"b",{msgs}}}"#).as_bytes()).unwrap();
        assert_eq!(dup.model, "b");
        // Arrays are refused even where serde would read a struct from one.
        let e = parse_json::<ChatCompletionRequest>(br#"["m", []]"#).unwrap_err();
        assert!(e.body().error.message.contains("JSON object"), "{e:?}");
    }

    #[test]
    fn suggests_close_model_names() {
        let known = vec![
            "HuggingFaceTB/SmolLM2-135M-Instruct".to_string(),
            "other/x".to_string(),
        ];
        assert_eq!(
            suggestions("SmolLM2-135M-Instruct", &known),
            vec![known[0].clone()]
        );
        assert_eq!(
            suggestions("huggingfacetb/smollm2-135m-instruc", &known),
            vec![known[0].clone()]
        );
        assert!(suggestions("gpt-4o", &known).is_empty());
    }

    #[test]
    fn non_text_parts_rejected_with_param() {
        let req: ChatCompletionRequest = serde_json::from_str(
            r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url"}]}]}"#,
        )
        .unwrap();
        let e = prompt_messages(&req).unwrap_err();
        assert_eq!(
            e.body().error.param.as_deref(),
            Some("messages[0].content[0]")
        );
    }
}
