//! A closed-loop load generator: `concurrency` workers each send one
//! request, wait for the whole answer, and send the next, until a request
//! count or a time limit is reached. Records the latency of every
//! successful request and, for streams, the time to the first SSE event
//! that carries generated text.
//!
//! Each worker owns one keep-alive connection and drives it in its own
//! task (hyper's low-level HTTP/1 client): no pool to check out of and no
//! connection task to hand each request to. The generator shares the cores
//! with what it measures, so every microsecond it spends is one a gateway
//! cannot.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyDataStream, BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use sluice_proto::sse::{SseDecoder, DONE};
use tokio::net::TcpStream;

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

/// Longest wait for one whole answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A [`Target`] ready to send: address, path and headers parsed once.
struct Prepared {
    /// `host:port` to connect to.
    addr: String,
    /// The request target in origin form (`/v1/...`).
    path: http::Uri,
    host: http::HeaderValue,
    authorization: Option<http::HeaderValue>,
    body: Bytes,
    stream: bool,
}

impl Prepared {
    fn new(target: &Target) -> Result<Prepared, String> {
        let bad = |why: &str| format!("url {}: {why}", target.url);
        let uri: http::Uri = target.url.parse().map_err(|e| bad(&format!("{e}")))?;
        if uri.scheme_str() != Some("http") {
            return Err(bad("only http:// is supported"));
        }
        let authority = uri.authority().ok_or_else(|| bad("no host"))?;
        let addr = format!(
            "{}:{}",
            authority.host(),
            authority.port_u16().unwrap_or(80)
        );
        let path = uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .parse()
            .map_err(|e| bad(&format!("{e}")))?;
        let host = http::HeaderValue::from_str(authority.as_str()).map_err(|_| bad("bad host"))?;
        let authorization = match &target.bearer {
            Some(key) => Some(
                http::HeaderValue::try_from(format!("Bearer {key}"))
                    .map_err(|_| "the key is not a valid header value".to_string())?,
            ),
            None => None,
        };
        Ok(Prepared {
            addr,
            path,
            host,
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

/// One worker's connection, driven by the worker itself.
struct Conn {
    sender: http1::SendRequest<Full<Bytes>>,
    conn: Pin<Box<http1::Connection<TokioIo<TcpStream>, Full<Bytes>>>>,
}

impl Conn {
    async fn open(target: &Prepared) -> Result<Conn, String> {
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&target.addr))
            .await
            .map_err(|_| format!("connect {}: timed out", target.addr))?
            .map_err(|e| format!("connect {}: {e}", target.addr))?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {}", sluice_proto::error_chain(&e)))?;
        Ok(Conn {
            sender,
            conn: Box::pin(conn),
        })
    }

    /// One request and its whole answer, while driving the connection.
    /// An error leaves the connection unusable: the caller drops it.
    async fn one(&mut self, target: &Prepared) -> Outcome {
        let Conn { sender, conn } = self;
        let exchange = async {
            let start = Instant::now();
            if let Err(e) = sender.ready().await {
                return Outcome::Err(format!("send: {}", sluice_proto::error_chain(&e)));
            }
            let mut req = http::Request::post(target.path.clone())
                .header(http::header::HOST, target.host.clone())
                .header(http::header::CONTENT_TYPE, "application/json");
            if let Some(auth) = &target.authorization {
                req = req.header(http::header::AUTHORIZATION, auth.clone());
            }
            let req = match req.body(Full::new(target.body.clone())) {
                Ok(r) => r,
                Err(e) => return Outcome::Err(format!("request: {e}")),
            };
            match sender.send_request(req).await {
                Ok(resp) => answer(resp, start, target.stream).await,
                Err(e) => Outcome::Err(format!("send: {}", sluice_proto::error_chain(&e))),
            }
        };
        tokio::select! {
            biased;
            out = exchange => out,
            done = conn.as_mut() => Outcome::Err(match done {
                Ok(()) => "the server closed the connection".to_string(),
                Err(e) => format!("connection: {}", sluice_proto::error_chain(&e)),
            }),
        }
    }
}

/// The worker's connection, opened when it has none.
async fn connected<'a>(
    conn: &'a mut Option<Conn>,
    target: &Prepared,
) -> Result<&'a mut Conn, String> {
    if conn.is_none() {
        *conn = Some(Conn::open(target).await?);
    }
    conn.as_mut().ok_or_else(|| "no connection".to_string())
}

/// Reads a whole answer: its status, and for streams the first text event.
async fn answer(resp: http::Response<Incoming>, start: Instant, stream: bool) -> Outcome {
    let status = resp.status();
    if !status.is_success() {
        let body = match resp.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => Bytes::new(),
        };
        let short: String = String::from_utf8_lossy(&body).chars().take(200).collect();
        return Outcome::Err(format!("status {status}: {short}"));
    }
    if !stream {
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
pub async fn run(target: &Target, spec: LoadSpec) -> LoadResult {
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
        let target = target.clone();
        let issued = issued.clone();
        workers.spawn(async move {
            let mut part = LoadResult::default();
            let mut conn: Option<Conn> = None;
            while Instant::now() < deadline
                && issued.fetch_add(1, Ordering::Relaxed) < spec.requests
            {
                let outcome = match connected(&mut conn, &target).await {
                    Ok(c) => tokio::time::timeout(REQUEST_TIMEOUT, c.one(&target))
                        .await
                        .unwrap_or_else(|_| {
                            Outcome::Err(format!("no whole answer within {REQUEST_TIMEOUT:?}"))
                        }),
                    Err(e) => Outcome::Err(e),
                };
                if matches!(outcome, Outcome::Err(_)) {
                    conn = None;
                }
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
