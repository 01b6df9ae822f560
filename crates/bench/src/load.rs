//! A closed-loop load generator: `concurrency` workers each send one
//! request, wait for the whole answer, and send the next, until a request
//! count or a time limit is reached. Records the latency of every
//! successful request and, for streams, the time to the first SSE event
//! that carries generated text.
//!
//! Each worker owns one keep-alive connection and drives it in its own
//! task with a plain HTTP/1.1 client: the request's bytes are built once
//! and written whole, and the answer is read as it comes (content-length,
//! chunked or close-delimited). The generator shares the cores with what
//! it measures, so every microsecond it spends is one a gateway cannot.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use sluice_proto::sse::{SseDecoder, DONE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
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

    /// Adds a later run against the same target, as if one run had
    /// covered both: its samples and errors join, its time adds up.
    pub fn merge(&mut self, later: LoadResult) {
        self.latencies_us.extend(later.latencies_us);
        self.ttft_us.extend(later.ttft_us);
        self.errors += later.errors;
        if self.first_error.is_none() {
            self.first_error = later.first_error;
        }
        self.elapsed += later.elapsed;
    }
}

/// Longest wait for one whole answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A [`Target`] ready to send: the address, and the whole request (head
/// and body) as the bytes every request writes.
struct Prepared {
    /// `host:port` to connect to.
    addr: String,
    request: Bytes,
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
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let mut head = format!(
            "POST {path} HTTP/1.1\r\nhost: {authority}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
            target.body.len()
        );
        if let Some(key) = &target.bearer {
            if key.bytes().any(|b| b < 0x20 || b == 0x7f) {
                return Err("the key is not a valid header value".into());
            }
            head.push_str(&format!("authorization: Bearer {key}\r\n"));
        }
        head.push_str("\r\n");
        let mut request = Vec::with_capacity(head.len() + target.body.len());
        request.extend_from_slice(head.as_bytes());
        request.extend_from_slice(&target.body);
        Ok(Prepared {
            addr,
            request: request.into(),
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

/// How the end of an answer's body is found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(usize),
    Chunked,
    /// Until the server closes the connection.
    Close,
}

/// An answer's status line and headers, as far as the generator needs them.
#[derive(Debug, PartialEq, Eq)]
struct Head {
    /// Bytes the head takes, blank line included.
    len: usize,
    status: u16,
    framing: Framing,
    /// Whether the connection serves another request afterwards.
    keep_alive: bool,
}

/// Parses an HTTP/1.x answer's head from the start of `buf`: `Ok(None)`
/// until the blank line that ends it has arrived.
fn parse_head(buf: &[u8]) -> Result<Option<Head>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 48];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("bad answer head: {e}")),
    };
    let status = resp.code.unwrap_or(0);
    let mut keep_alive = resp.version == Some(1);
    let mut length = None;
    let mut chunked = false;
    for h in resp.headers.iter() {
        let value = std::str::from_utf8(h.value).unwrap_or("").trim();
        if h.name.eq_ignore_ascii_case("content-length") {
            length = Some(
                value
                    .parse::<usize>()
                    .map_err(|_| format!("bad content-length {value:?}"))?,
            );
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value
                .rsplit(',')
                .next()
                .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
        } else if h.name.eq_ignore_ascii_case("connection") {
            if value.eq_ignore_ascii_case("close") {
                keep_alive = false;
            } else if value.eq_ignore_ascii_case("keep-alive") {
                keep_alive = true;
            }
        }
    }
    // No body: 1xx, 204 and 304 (the generator only POSTs, never HEAD).
    let framing = if matches!(status, 100..=199 | 204 | 304) {
        Framing::Length(0)
    } else if chunked {
        Framing::Chunked
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        keep_alive = false;
        Framing::Close
    };
    Ok(Some(Head {
        len,
        status,
        framing,
        keep_alive,
    }))
}

/// Position of the first CRLF in `buf`.
fn crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

/// The size on a chunk-size line (`1a;ext=x`).
fn chunk_size(line: &[u8]) -> Result<usize, String> {
    let hex = line.split(|&b| b == b';').next().unwrap_or(line);
    let hex = std::str::from_utf8(hex).unwrap_or("").trim();
    usize::from_str_radix(hex, 16).map_err(|_| format!("bad chunk size {hex:?}"))
}

/// What a worker does with each piece of an answer's body.
struct BodySink<'a> {
    /// Text events of a stream are looked for until the first one.
    sse: Option<&'a mut SseDecoder>,
    ttft: Option<Duration>,
    start: Instant,
    /// The start of an error answer, for the report.
    error_body: Option<Vec<u8>>,
}

impl BodySink<'_> {
    fn data(&mut self, data: &[u8]) {
        if let Some(keep) = &mut self.error_body {
            let room = 200usize.saturating_sub(keep.len());
            keep.extend_from_slice(&data[..data.len().min(room)]);
            return;
        }
        if self.ttft.is_none() {
            if let Some(decoder) = self.sse.as_deref_mut() {
                if decoder.feed(data).iter().any(|p| has_text(p)) {
                    self.ttft = Some(self.start.elapsed());
                }
            }
        }
    }
}

/// One worker's keep-alive connection: a plain HTTP/1.1 client over a
/// TCP stream, one write per request and the answer read as it arrives
/// (lighter than a general client: this process shares the cores with
/// the gateways it measures).
struct Conn {
    stream: TcpStream,
    /// Bytes read and not consumed yet.
    buf: BytesMut,
    /// False once an answer said the connection ends with it.
    reusable: bool,
}

impl Conn {
    async fn open(target: &Prepared) -> Result<Conn, String> {
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&target.addr))
            .await
            .map_err(|_| format!("connect {}: timed out", target.addr))?
            .map_err(|e| format!("connect {}: {e}", target.addr))?;
        let _ = stream.set_nodelay(true);
        Ok(Conn {
            stream,
            buf: BytesMut::with_capacity(16 * 1024),
            reusable: true,
        })
    }

    /// Reads more of the answer; the connection ending is an error.
    async fn fill(&mut self) -> Result<(), String> {
        if self.buf.capacity() - self.buf.len() < 4096 {
            self.buf.reserve(16 * 1024);
        }
        match self.stream.read_buf(&mut self.buf).await {
            Ok(0) => Err("the server closed the connection".into()),
            Ok(_) => Ok(()),
            Err(e) => Err(format!("read: {e}")),
        }
    }

    /// Waits until a CRLF-terminated line has arrived; its length.
    async fn line(&mut self) -> Result<usize, String> {
        loop {
            if let Some(pos) = crlf(&self.buf) {
                return Ok(pos);
            }
            self.fill().await?;
        }
    }

    /// One request and its whole answer. An error leaves the connection
    /// unusable: the caller drops it.
    async fn one(&mut self, target: &Prepared) -> Outcome {
        self.exchange(target).await.unwrap_or_else(Outcome::Err)
    }

    async fn exchange(&mut self, target: &Prepared) -> Result<Outcome, String> {
        let start = Instant::now();
        self.buf.clear();
        self.stream
            .write_all(&target.request)
            .await
            .map_err(|e| format!("send: {e}"))?;
        let head = loop {
            if let Some(head) = parse_head(&self.buf)? {
                break head;
            }
            self.fill().await?;
        };
        self.buf.advance(head.len);
        self.reusable = head.keep_alive;
        let ok = (200..300).contains(&head.status);
        let mut decoder = SseDecoder::new();
        let mut sink = BodySink {
            sse: (ok && target.stream).then_some(&mut decoder),
            ttft: None,
            start,
            error_body: (!ok).then(Vec::new),
        };
        self.body(head.framing, &mut sink).await?;
        if let Some(body) = sink.error_body {
            let short: String = String::from_utf8_lossy(&body).chars().take(200).collect();
            return Ok(Outcome::Err(format!("status {}: {short}", head.status)));
        }
        let latency = start.elapsed();
        if target.stream && sink.ttft.is_none() {
            return Ok(Outcome::Err("stream carried no text".into()));
        }
        Ok(Outcome::Ok {
            latency,
            ttft: sink.ttft,
        })
    }

    /// Reads the body to its end, handing each piece to `sink`.
    async fn body(&mut self, framing: Framing, sink: &mut BodySink<'_>) -> Result<(), String> {
        match framing {
            Framing::Length(n) => {
                let mut left = n;
                while left > 0 {
                    if self.buf.is_empty() {
                        self.fill().await?;
                    }
                    let take = left.min(self.buf.len());
                    sink.data(&self.buf[..take]);
                    self.buf.advance(take);
                    left -= take;
                }
            }
            Framing::Close => loop {
                sink.data(&self.buf);
                self.buf.clear();
                match self.fill().await {
                    Ok(()) => {}
                    Err(_) => return Ok(()),
                }
            },
            Framing::Chunked => loop {
                let line = self.line().await?;
                let size = chunk_size(&self.buf[..line])?;
                if size == 0 {
                    self.buf.advance(line + 2);
                    // Trailers, if any, then the blank line.
                    loop {
                        let pos = self.line().await?;
                        self.buf.advance(pos + 2);
                        if pos == 0 {
                            return Ok(());
                        }
                    }
                }
                while self.buf.len() < line + 2 + size + 2 {
                    self.fill().await?;
                }
                sink.data(&self.buf[line + 2..line + 2 + size]);
                if &self.buf[line + 2 + size..line + 4 + size] != b"\r\n" {
                    return Err("a chunk does not end with CRLF".into());
                }
                self.buf.advance(line + 4 + size);
            },
        }
        Ok(())
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
                if matches!(outcome, Outcome::Err(_)) || conn.as_ref().is_some_and(|c| !c.reusable)
                {
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
    fn merged_runs_read_as_one() {
        let mut a = LoadResult {
            latencies_us: vec![10, 20],
            ttft_us: vec![5],
            errors: 1,
            first_error: None,
            elapsed: Duration::from_secs(1),
        };
        a.merge(LoadResult {
            latencies_us: vec![30, 40],
            ttft_us: vec![],
            errors: 2,
            first_error: Some("refused".into()),
            elapsed: Duration::from_secs(3),
        });
        assert_eq!(a.latencies_us, [10, 20, 30, 40]);
        assert_eq!(a.ttft_us, [5]);
        assert_eq!(a.errors, 3);
        assert_eq!(a.first_error.as_deref(), Some("refused"));
        assert_eq!(a.elapsed, Duration::from_secs(4));
        assert_eq!(a.rps(), 1.0);
        // The first error seen stays the first.
        a.merge(LoadResult {
            first_error: Some("later".into()),
            ..LoadResult::default()
        });
        assert_eq!(a.first_error.as_deref(), Some("refused"));
    }

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

    #[test]
    fn parses_answer_heads() {
        let head = |raw: &str| parse_head(raw.as_bytes()).unwrap().unwrap();
        let h = head("HTTP/1.1 200 OK\r\ncontent-length: 12\r\n\r\nbody");
        assert_eq!(
            (h.len, h.status, h.framing, h.keep_alive),
            (39, 200, Framing::Length(12), true)
        );
        let h = head("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n");
        assert_eq!((h.framing, h.keep_alive), (Framing::Chunked, false));
        // Neither length nor chunked: the body ends with the connection.
        let h = head("HTTP/1.0 500 Internal Server Error\r\n\r\n");
        assert_eq!(
            (h.status, h.framing, h.keep_alive),
            (500, Framing::Close, false)
        );
        let h = head("HTTP/1.1 204 No Content\r\n\r\n");
        assert_eq!(h.framing, Framing::Length(0));
        assert_eq!(parse_head(b"HTTP/1.1 200 OK\r\ncontent-le").unwrap(), None);
        assert!(parse_head(b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n").is_err());
        assert!(parse_head(b"\x00garbage\r\n\r\n").is_err());
        assert_eq!(chunk_size(b"1a;name=value").unwrap(), 26);
        assert!(chunk_size(b"zz").is_err());
    }

    /// Serves each canned answer on one connection, in order, whatever
    /// the request, writing it in small pieces so that heads, chunk-size
    /// lines and bodies arrive split.
    async fn canned(answers: Vec<&'static str>) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            for answer in answers {
                // One request: the head and its (short) body arrive in one write.
                let _ = sock.read(&mut buf).await.unwrap();
                for piece in answer.as_bytes().chunks(7) {
                    sock.write_all(piece).await.unwrap();
                    sock.flush().await.unwrap();
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        });
        format!("http://{addr}/v1/chat/completions")
    }

    #[tokio::test]
    async fn reads_lengths_chunks_trailers_and_errors_over_one_connection() {
        let text = r#"{"choices":[{"delta":{"content":"hi"}}]}"#;
        let sse: &'static str = Box::leak(
            format!(
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n{:x};ext=1\r\ndata: {text}\n\n\r\n{:x}\r\ndata: [DONE]\n\n\r\n0\r\nx-trailer: 1\r\n\r\n",
                text.len() + 8,
                "data: [DONE]\n\n".len()
            )
            .into_boxed_str(),
        );
        let url = canned(vec![
            "HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\nhello world",
            sse,
            "HTTP/1.1 429 Too Many Requests\r\ncontent-length: 9\r\n\r\nslow down",
            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
        ])
        .await;
        let target = |stream| {
            Prepared::new(&Target {
                url: url.clone(),
                bearer: Some("k".into()),
                body: Bytes::from_static(b"{}"),
                stream,
            })
            .unwrap()
        };
        let mut conn = Conn::open(&target(false)).await.unwrap();
        assert!(matches!(
            conn.one(&target(false)).await,
            Outcome::Ok { ttft: None, .. }
        ));
        assert!(conn.reusable);
        assert!(matches!(
            conn.one(&target(true)).await,
            Outcome::Ok { ttft: Some(_), .. }
        ));
        match conn.one(&target(false)).await {
            Outcome::Err(e) => assert_eq!(e, "status 429: slow down"),
            Outcome::Ok { .. } => panic!("a 429 counted as a success"),
        }
        assert!(matches!(conn.one(&target(false)).await, Outcome::Ok { .. }));
        assert!(!conn.reusable, "connection: close was not heeded");
        // The server is gone: the next request fails instead of hanging.
        assert!(matches!(conn.one(&target(false)).await, Outcome::Err(_)));
    }

    #[test]
    fn refuses_keys_that_cannot_be_a_header() {
        let t = Target {
            url: "http://127.0.0.1:1/x".into(),
            bearer: Some("a\r\nb".into()),
            body: Bytes::new(),
            stream: false,
        };
        assert!(Prepared::new(&t).is_err());
        let t = Target {
            url: "https://127.0.0.1:1/x".into(),
            bearer: None,
            body: Bytes::new(),
            stream: false,
        };
        assert!(Prepared::new(&t).is_err());
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
