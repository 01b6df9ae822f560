//! The generation driver: takes one validated request through admission,
//! instance selection, signed forwarding to a miner, retries before the
//! first token and failover after it, and settles its metadata. It runs as
//! its own tracked task so bookkeeping completes even if the client leaves;
//! the HTTP handler only reads the [`DriverEvent`]s it sends.
//!
//! Retry policy (all of it lives here): an attempt that fails (connect
//! error, non-200, error event, no first event within the first-token
//! timeout, or a gap longer than the stall timeout) marks its instance
//! failed (exponential back-off) and the next attempt goes to an instance
//! this request has not tried, carrying the text produced so far as a
//! continuation, up to `max_attempts`.

use std::time::Duration;

use http::{HeaderName, HeaderValue};
use sluice_proto::miner::{
    pair_key, parse_public, FinishReason, GenerationParams, InvokeEvent, InvokeKey, InvokeRequest,
    PromptInput, HDR_MAC, HDR_REQUEST_ID, HDR_TIMESTAMP, HDR_VALIDATOR,
};
use sluice_proto::sse::SseDecoder;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::Instrument;

use crate::error::ApiError;
use crate::registry::{AcquireError, Lease};
use crate::AppState;

/// Everything the driver needs about one request.
#[derive(Debug, Clone)]
pub struct Job {
    pub request_id: String,
    pub model: String,
    pub input: PromptInput,
    pub params: GenerationParams,
    /// Latest time the request may still be waiting for a slot.
    pub deadline: Instant,
    /// Queue priority (paid before free).
    pub priority: u8,
    /// Whether the client reads the answer as it is produced.
    pub stream: bool,
}

/// Tokens served by one miner for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contribution {
    pub miner_key: String,
    pub completion_tokens: u32,
}

#[derive(Debug, Clone)]
pub struct Outcome {
    pub finish_reason: FinishReason,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub contributions: Vec<Contribution>,
    pub attempts: u32,
}

#[derive(Debug)]
pub enum DriverEvent {
    Text(String),
    Done(Outcome),
    Failed(ApiError),
}

/// What happened to one attempt.
enum Attempt {
    Finished {
        finish_reason: FinishReason,
        completion_tokens: u32,
    },
    /// The instance failed; `tokens` were produced before it did.
    Failed {
        tokens: u32,
        why: String,
    },
    /// The engine refused the input itself: no other instance would accept it.
    Rejected(String),
    ClientGone {
        tokens: u32,
    },
}

/// Facts the driver reports for metrics and the request record.
#[derive(Debug, Default, Clone)]
pub struct Trace {
    pub queue: Duration,
    pub ttft: Option<Duration>,
    pub attempts: u32,
    pub miner_key: Option<String>,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// Tokens produced per miner (several after a failover).
    pub contributions: Vec<Contribution>,
    pub status: &'static str,
}

pub async fn drive(state: AppState, job: Job, tx: mpsc::Sender<DriverEvent>) -> Trace {
    let started = Instant::now();
    let Job {
        request_id,
        model,
        input,
        params,
        deadline: job_deadline,
        priority,
        stream,
    } = job;
    let max_tokens = params.max_tokens;
    // Built once; each attempt updates its budget and continuation.
    let mut invoke = InvokeRequest {
        request_id,
        model,
        input,
        params,
        continuation: String::new(),
        stream,
    };
    let mut trace = Trace {
        status: "ok",
        ..Default::default()
    };
    let mut produced = String::new();
    let mut tried: Vec<String> = Vec::new();
    let mut contributions: Vec<Contribution> = Vec::new();
    let mut prompt_tokens: Option<u32> = None;
    let mut generated: u32 = 0;
    let max_attempts = state.config.max_attempts;
    state.retry_budget.deposit();

    let fail = |trace: &mut Trace, err: ApiError, status: &'static str| {
        trace.status = status;
        err
    };

    let error = loop {
        if trace.attempts >= max_attempts {
            {
                trace.status = "all_targets_failed";
                break ApiError::AllTargetsFailed {
                    attempts: trace.attempts,
                };
            }
        }
        let wait_started = Instant::now();
        // Only the first attempt may wait for the whole deadline; failover
        // after text was produced gets a short bounded wait.
        let deadline = if produced.is_empty() {
            job_deadline
        } else {
            job_deadline.max(Instant::now() + Duration::from_secs(10))
        };
        if trace.attempts > 0 && !state.retry_budget.try_spend() {
            tracing::warn!(request_id = %invoke.request_id, "retry budget exhausted; not retrying");
            trace.status = "all_targets_failed";
            break ApiError::AllTargetsFailed {
                attempts: trace.attempts,
            };
        }
        let mut lease = match state
            .registry
            .acquire(&invoke.model, deadline, &tried, priority)
            .await
        {
            Ok(l) => l,
            Err(AcquireError::NoCapacity { retry_after_s }) => {
                trace.queue += wait_started.elapsed();
                if tried.is_empty() {
                    break fail(
                        &mut trace,
                        ApiError::NoCapacity {
                            model: invoke.model.clone(),
                            retry_after_s,
                        },
                        "no_capacity",
                    );
                }
                {
                    trace.status = "all_targets_failed";
                    break ApiError::AllTargetsFailed {
                        attempts: trace.attempts,
                    };
                }
            }
            Err(AcquireError::Exhausted) => {
                trace.status = "all_targets_failed";
                break ApiError::AllTargetsFailed {
                    attempts: trace.attempts,
                };
            }
        };
        trace.queue += wait_started.elapsed();
        if trace.attempts > 0 {
            state
                .metrics
                .inc("sluice_failovers_total", &[("model", &invoke.model)], 1);
        }
        trace.attempts += 1;
        tried.push(lease.instance.id.clone());
        let miner_key = lease.instance.miner_key.clone();
        trace.miner_key = Some(miner_key.clone());

        invoke.params.max_tokens = max_tokens.map(|max| max.saturating_sub(generated).max(1));
        invoke.continuation.clone_from(&produced);
        let outcome = attempt(
            &state,
            &mut lease,
            &invoke,
            &tx,
            &mut produced,
            &mut prompt_tokens,
            started,
            &mut trace,
        )
        .await;
        match outcome {
            Attempt::Finished {
                finish_reason,
                completion_tokens,
            } => {
                generated += completion_tokens;
                contributions.push(Contribution {
                    miner_key,
                    completion_tokens,
                });
                trace.prompt_tokens = prompt_tokens.unwrap_or(0);
                trace.completion_tokens = generated;
                trace.contributions = contributions.clone();
                let done = Outcome {
                    finish_reason,
                    prompt_tokens: trace.prompt_tokens,
                    completion_tokens: generated,
                    contributions,
                    attempts: trace.attempts,
                };
                let _ = tx.send(DriverEvent::Done(done)).await;
                return trace;
            }
            Attempt::Failed { tokens, why } => {
                tracing::warn!(request_id = %invoke.request_id, instance = %lease.instance.id, %why, tokens, "attempt failed; trying another instance");
                lease.failed();
                generated += tokens;
                if tokens > 0 {
                    contributions.push(Contribution {
                        miner_key,
                        completion_tokens: tokens,
                    });
                }
            }
            Attempt::Rejected(message) => {
                break fail(
                    &mut trace,
                    ApiError::ContextLengthExceeded { message },
                    "invalid_request",
                );
            }
            Attempt::ClientGone { tokens } => {
                generated += tokens;
                if tokens > 0 {
                    contributions.push(Contribution {
                        miner_key,
                        completion_tokens: tokens,
                    });
                }
                trace.contributions = contributions;
                trace.prompt_tokens = prompt_tokens.unwrap_or(0);
                trace.completion_tokens = generated;
                trace.status = "cancelled";
                return trace;
            }
        }
    };
    trace.prompt_tokens = prompt_tokens.unwrap_or(0);
    trace.completion_tokens = generated;
    trace.contributions = contributions;
    let _ = tx.send(DriverEvent::Failed(error)).await;
    trace
}

#[allow(clippy::too_many_arguments)]
async fn attempt(
    state: &AppState,
    lease: &mut Lease,
    invoke: &InvokeRequest,
    tx: &mpsc::Sender<DriverEvent>,
    produced: &mut String,
    prompt_tokens: &mut Option<u32>,
    started: Instant,
    trace: &mut Trace,
) -> Attempt {
    // Debug: nothing inside logs at info, and the caller's warning on a
    // failed attempt names the instance itself.
    let span = tracing::debug_span!("attempt", instance = %lease.instance.id);
    async move {
        let body = match serde_json::to_vec(invoke) {
            Ok(b) => b,
            Err(e) => {
                return Attempt::Failed {
                    tokens: 0,
                    why: e.to_string(),
                }
            }
        };
        let ts = sluice_store::now_ms() as u64;
        let Some(key) = invoke_key(state, &lease.instance.miner_key) else {
            return Attempt::Failed {
                tokens: 0,
                why: "the miner's key gives no shared secret".into(),
            };
        };
        let mac = key.mac_hex(&invoke.request_id, ts, &body);
        let sent = Instant::now();
        let Some(url) = lease.instance.invoke_url.clone() else {
            return Attempt::Failed {
                tokens: 0,
                why: format!("the endpoint {} is not a URL", lease.instance.endpoint),
            };
        };
        let first_timeout = Duration::from_secs_f64(state.config.first_token_timeout_s);
        let stall_timeout = Duration::from_secs_f64(state.config.stall_timeout_s);
        let (request_id, mac) = match (
            HeaderValue::from_str(&invoke.request_id),
            HeaderValue::try_from(mac),
        ) {
            (Ok(id), Ok(mac)) => (never_indexed(id), never_indexed(mac)),
            (Err(e), _) | (_, Err(e)) => {
                return Attempt::Failed {
                    tokens: 0,
                    why: format!("request headers: {e}"),
                }
            }
        };
        // Built in place: `http::request::Builder` moves the whole request
        // through a `Result` for every header.
        let mut request = http::Request::new(bytes::Bytes::from(body));
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = url;
        let headers = request.headers_mut();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(HeaderName::from_static(HDR_REQUEST_ID), request_id);
        headers.insert(
            HeaderName::from_static(HDR_TIMESTAMP),
            never_indexed(HeaderValue::from(ts)),
        );
        headers.insert(
            HeaderName::from_static(HDR_VALIDATOR),
            state.public_key.clone(),
        );
        headers.insert(HeaderName::from_static(HDR_MAC), mac);
        let request = state.invoker.send(request);
        let (status, mut body) = match tokio::time::timeout(first_timeout, request).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                return Attempt::Failed {
                    tokens: 0,
                    why: format!("send: {e}"),
                }
            }
            Err(_) => {
                return Attempt::Failed {
                    tokens: 0,
                    why: "no response headers in time".into(),
                }
            }
        };
        if !status.is_success() {
            return Attempt::Failed {
                tokens: 0,
                why: format!("miner answered {status}"),
            };
        }
        let mut decoder = SseDecoder::new();
        let mut tokens: u32 = 0;
        let mut got_text = false;
        loop {
            let wait = if got_text {
                stall_timeout
            } else {
                first_timeout
            };
            let chunk = match tokio::time::timeout(wait, body.next()).await {
                Err(_) => {
                    return Attempt::Failed {
                        tokens,
                        why: "stalled".into(),
                    }
                }
                Ok(None) => {
                    return Attempt::Failed {
                        tokens,
                        why: "stream ended early".into(),
                    }
                }
                Ok(Some(Err(e))) => {
                    return Attempt::Failed {
                        tokens,
                        why: format!("stream broke: {e}"),
                    }
                }
                Ok(Some(Ok(c))) => c,
            };
            for payload in decoder.feed(&chunk) {
                let event: InvokeEvent = match serde_json::from_str(&payload) {
                    Ok(e) => e,
                    Err(e) => {
                        return Attempt::Failed {
                            tokens,
                            why: format!("bad event: {e}"),
                        }
                    }
                };
                match event {
                    InvokeEvent::Started { prompt_tokens: n } => {
                        if prompt_tokens.is_none() {
                            *prompt_tokens = Some(n);
                        }
                    }
                    InvokeEvent::Text { text, tokens: n } => {
                        if !got_text {
                            got_text = true;
                            lease.succeeded(sent.elapsed());
                            if trace.ttft.is_none() {
                                trace.ttft = Some(started.elapsed());
                            }
                        }
                        tokens += n;
                        if text.is_empty() {
                            continue;
                        }
                        produced.push_str(&text);
                        if tx.send(DriverEvent::Text(text)).await.is_err() {
                            return Attempt::ClientGone { tokens };
                        }
                    }
                    InvokeEvent::Done {
                        finish_reason,
                        completion_tokens,
                        ..
                    } => {
                        if !got_text {
                            lease.succeeded(sent.elapsed());
                            if trace.ttft.is_none() {
                                trace.ttft = Some(started.elapsed());
                            }
                        }
                        return Attempt::Finished {
                            finish_reason,
                            completion_tokens,
                        };
                    }
                    InvokeEvent::Error { message, retryable } => {
                        if retryable {
                            return Attempt::Failed {
                                tokens,
                                why: message,
                            };
                        }
                        return Attempt::Rejected(message);
                    }
                }
            }
        }
    }
    .instrument(span)
    .await
}

/// Spawns the driver on the state's task tracker and records the request
/// when it ends. Returns the receiver of its events.
pub fn spawn(
    state: &AppState,
    job: Job,
    record: crate::api::RecordBase,
) -> mpsc::Receiver<DriverEvent> {
    let (tx, rx) = mpsc::channel(64);
    let st = state.clone();
    // Debug, like the attempt span: recording a span per request costs
    // about 2% of the CPU at info level, and the few warnings and errors
    // logged while serving a request name its id themselves.
    let span = tracing::debug_span!("generation", request_id = %job.request_id, model = %job.model);
    // Boxed: the driver's future is several kilobytes, and the task cell
    // would otherwise copy it on every move into place and once more when
    // it finishes.
    state.tasks.spawn(Box::pin(
        async move {
            let trace = drive(st.clone(), job, tx).await;
            crate::api::settle(&st, record, &trace).await;
        }
        .instrument(span),
    ));
    rx
}

/// Marks a header value that no other request repeats (request id, time,
/// MAC) as never indexed: HPACK then sends it as a literal instead of
/// searching its table for it and inserting it, on both ends of the HTTP/2
/// connection, only to evict it unused.
fn never_indexed(mut v: HeaderValue) -> HeaderValue {
    v.set_sensitive(true);
    v
}

/// The invocation key shared with a miner, computed once per miner.
fn invoke_key(state: &AppState, miner_key: &str) -> Option<InvokeKey> {
    let cached = sluice_proto::sync::read(&state.invoke_keys)
        .get(miner_key)
        .cloned();
    if cached.is_some() {
        return cached;
    }
    let key = InvokeKey::new(&pair_key(
        &state.signing_key,
        &parse_public(miner_key).ok()?,
    )?);
    let mut keys = sluice_proto::sync::write(&state.invoke_keys);
    // Miners come and go: keep the cache bounded.
    if keys.len() >= 100_000 {
        keys.clear();
    }
    keys.insert(miner_key.to_string(), key.clone());
    Some(key)
}
