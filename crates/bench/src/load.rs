//! A closed-loop load generator: `concurrency` workers each send one
//! request, wait for the whole answer, and send the next, until a request
//! count or a time limit is reached. Records the latency of every
//! successful request and, for streams, the time to the first SSE event
//! that carries generated text.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyDataStream, BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use sluice_proto::sse::{SseDecoder, DONE};

use crate::stats::micros;

/// One endpoint to load: full URL, bearer key and the exact body to POST.
#[derive(Debug, Clone)]
pub struct Target {
    pub url: String,
    pub bearer: Option<String>,
    pub body: Bytes,
    /// Read the answer as SSE and time the first text event.
    pub stream: bool,
}

/// How much load to apply.
#[derive(Debug, Clone, Copy)]
pub struct LoadSpec {
    pub concurrency: usize,
    /// Stop after this many requests...
    pub requests: usize,
    /// ...or once this much time has passed, whichever comes first.
    pub max_duration: Duration,
}

/// What one load run observed.
#[derive(Debug, Clone, Default)]
pub struct LoadResult {
    /// Latency of each successful request, microseconds.
    pub latencies_us: Vec<u64>,
    /// Time to the first text event of each successful stream, microseconds.
    pub ttft_us: Vec<u64>,
    pub errors: u64,
    /// The first error seen, for the report.
    pub first_error: Option<String>,
    pub elapsed: Duration,
}

impl LoadResult {
    pub fn ok(&self) -> usize {
        self.latencies_us.len()
    }

    /// Successful requests per second over the run.
    pub fn rps(&self) -> f64 {
        let s = self.elapsed.as_secs_f64();
        if s <= 0.0 {
            0.0
        } else {
            self.ok() as f64 / s
        }
    }
}

/// The load generator's HTTP client: hyper's pooled HTTP/1 client, the
/// lightest at hand, because the generator shares the cores with what it
/// measures (every microsecond it spends is one a gateway cannot).
pub type Client = hyper_util::client::legacy::Client<HttpConnector, Full<Bytes>>;

/// Longest wait for one whole answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// An HTTP client sized for benchmark concurrency.
pub fn client(max_concurrency: usize) -> Client {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_secs(5)));
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_max_idle_per_host(max_concurrency.max(1) * 2)
        .build(connector)
}

/// A [`Target`] ready to send: URI and header parsed once.
struct Prepared {
    uri: http::Uri,
    authorization: Option<http::HeaderValue>,
    body: Bytes,
    stream: bool,
}

impl Prepared {
    fn new(target: &Target) -> Result<Prepared, String> {
        let uri = target
            .url
            .parse()
            .map_err(|e| format!("url {}: {e}", target.url))?;
        let authorization = match &target.bearer {
            Some(key) => Some(
                http::HeaderValue::try_from(format!("Bearer {key}"))
                    .map_err(|_| "the key is not a valid header value".to_string())?,
            ),
            None => None,
        };
        Ok(Prepared {
            uri,
            authorization,
            body: target.body.clone(),
            stream: target.stream,
        })
    }
}

/// True when an SSE payload of an OpenAI stream carries generated text.
pub fn has_text(payload: &str) -> bool {
    if payload == DONE || !(payload.contains("\"content\"") || payload.contains("\"text\"")) {
        return false;
    }
    let Ok(v) = serde_json::from_str::<serde_json::Value>(payload) else {
        return false;
    };
    let choice = &v["choices"][0];
    let text = choice["delta"]["content"]
        .as_str()
        .or_else(|| choice["text"].as_str());
    text.is_some_and(|t| !t.is_empty())
}

enum Outcome {
    Ok {
        latency: Duration,
        ttft: Option<Duration>,
    },
    Err(String),
}

async fn one(client: &Client, target: &Prepared) -> Outcome {
    let start = Instant::now();
    let mut req = http::Request::post(target.uri.clone())
        .header(http::header::CONTENT_TYPE, "application/json");
    if let Some(auth) = &target.authorization {
        req = req.header(http::header::AUTHORIZATION, auth.clone());
    }
    let req = match req.body(Full::new(target.body.clone())) {
        Ok(r) => r,
        Err(e) => return Outcome::Err(format!("request: {e}")),
    };
    let resp = match client.request(req).await {
        Ok(r) => r,
        Err(e) => return Outcome::Err(format!("send: {}", sluice_proto::error_chain(&e))),
    };
    let status = resp.status();
    if !status.is_success() {
        let body = match resp.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => Bytes::new(),
        };
        let short: String = String::from_utf8_lossy(&body).chars().take(200).collect();
        return Outcome::Err(format!("status {status}: {short}"));
    }
    if !target.stream {
        return match resp.into_body().collect().await {
            Ok(_) => Outcome::Ok {
                latency: start.elapsed(),
                ttft: None,
            },
            Err(e) => Outcome::Err(format!("body: {e}")),
        };
    }
    let mut decoder = SseDecoder::new();
    let mut ttft = None;
    let mut body = BodyDataStream::new(resp.into_body());
    loop {
        match body.next().await.transpose() {
            Ok(Some(chunk)) => {
                if ttft.is_none() {
                    for payload in decoder.feed(&chunk) {
                        if has_text(&payload) {
                            ttft = Some(start.elapsed());
                            break;
                        }
                    }
                }
            }
            Ok(None) => break,
            Err(e) => return Outcome::Err(format!("stream: {e}")),
        }
    }
    match ttft {
        Some(t) => Outcome::Ok {
            latency: start.elapsed(),
            ttft: Some(t),
        },
        None => Outcome::Err("stream carried no text".into()),
    }
}

/// Runs closed-loop load against `target`.
pub async fn run(client: &Client, target: &Target, spec: LoadSpec) -> LoadResult {
    let target = match Prepared::new(target) {
        Ok(t) => Arc::new(t),
        Err(e) => {
            return LoadResult {
                errors: 1,
                first_error: Some(e),
                ..Default::default()
            }
        }
    };
    let issued = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let deadline = started + spec.max_duration;
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..spec.concurrency.max(1) {
        let client = client.clone();
        let target = target.clone();
        let issued = issued.clone();
        workers.spawn(async move {
            let mut part = LoadResult::default();
            while Instant::now() < deadline
                && issued.fetch_add(1, Ordering::Relaxed) < spec.requests
            {
                let outcome = tokio::time::timeout(REQUEST_TIMEOUT, one(&client, &target))
                    .await
                    .unwrap_or_else(|_| {
                        Outcome::Err(format!("no whole answer within {REQUEST_TIMEOUT:?}"))
                    });
                match outcome {
                    Outcome::Ok { latency, ttft } => {
                        part.latencies_us.push(micros(latency));
                        if let Some(t) = ttft {
                            part.ttft_us.push(micros(t));
                        }
                    }
                    Outcome::Err(e) => {
                        part.errors += 1;
                        if part.first_error.is_none() {
                            part.first_error = Some(e);
                        }
                        // Don't spin on a dead target.
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
            part
        });
    }
    let mut total = LoadResult::default();
    while let Some(joined) = workers.join_next().await {
        match joined {
            Ok(part) => {
                total.latencies_us.extend(part.latencies_us);
                total.ttft_us.extend(part.ttft_us);
                total.errors += part.errors;
                if total.first_error.is_none() {
                    total.first_error = part.first_error;
                }
            }
            Err(e) => {
                total.errors += 1;
                total.first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    total.elapsed = started.elapsed();
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mock::{self, MockOptions};
    use tokio_util::sync::CancellationToken;

    #[test]
    fn detects_text_events() {
        assert!(has_text(r#"{"choices":[{"delta":{"content":"a"}}]}"#));
        assert!(has_text(r#"{"choices":[{"text":"a"}]}"#));
        assert!(!has_text(
            r#"{"choices":[{"delta":{"role":"assistant","content":""}}]}"#
        ));
        assert!(!has_text(r#"{"choices":[],"usage":{}}"#));
        assert!(!has_text(DONE));
    }

    #[tokio::test]
    async fn loads_the_mock() {
        let stop = CancellationToken::new();
        let m = mock::start(
            std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            MockOptions::default(),
            stop.clone(),
        )
        .await
        .unwrap();
        let c = client(4);
        for stream in [false, true] {
            let target = Target {
                url: format!("{}/v1/chat/completions", m.base_url()),
                bearer: None,
                body: Bytes::from(
                    serde_json::json!({"model": "m", "stream": stream, "messages": []}).to_string(),
                ),
                stream,
            };
            let r = run(
                &c,
                &target,
                LoadSpec {
                    concurrency: 4,
                    requests: 40,
                    max_duration: Duration::from_secs(10),
                },
            )
            .await;
            assert_eq!((r.ok(), r.errors), (40, 0), "{:?}", r.first_error);
            assert_eq!(r.ttft_us.len(), if stream { 40 } else { 0 });
        }
        stop.cancel();
    }
}
