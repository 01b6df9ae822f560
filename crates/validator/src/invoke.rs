//! The client that carries invocations to miners.
//!
//! Over HTTP/2 (the default) every miner gets one connection, spoken
//! without upgrade (the miner's server detects it), and all of the
//! validator's invocations of that miner share it: under load the frames of
//! many requests leave in one socket write each way instead of one write
//! per request and direction. The connection is driven with the `h2` crate
//! directly rather than through hyper's client, which sends a request's
//! body only after the connection has flushed its headers (the body waits
//! for flow-control capacity), so every invocation took two writes and
//! woke the miner twice; here headers and body are queued together and
//! leave in one write.
//!
//! Over HTTP/1.1 (`miner_http2 = false`, for miners behind a proxy that
//! only speaks HTTP/1) it is hyper's pooled client with keep-alive.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyDataStream, Full};
use tokio::net::TcpStream;
use tokio::time::Instant;

use sluice_proto::sync::lock;

/// Per-stream receive window: answers the driver has not forwarded yet (a
/// client reading slowly) hold flow-control window, and a small window per
/// stream with a large one per connection keeps a few stalled streams
/// from holding up every other request to the same miner.
const STREAM_WINDOW: u32 = 256 * 1024;
const CONNECTION_WINDOW: u32 = 64 * 1024 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// A miner that vanished without closing the connection (a partition, a
/// frozen host) would otherwise keep it for every later request: a ping
/// this often, answered within `PING_TIMEOUT`, or the connection is closed.
const PING_EVERY: Duration = Duration::from_secs(20);
const PING_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection no invocation used for this long is let go (it closes once
/// its last stream ends).
const IDLE: Duration = Duration::from_secs(90);

type H1Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

pub struct Invoker {
    mode: Mode,
}

enum Mode {
    H2(Mutex<Pool>),
    H1(Box<H1Client>),
}

#[derive(Default)]
struct Pool {
    conns: HashMap<String, Conn>,
    swept: Option<Instant>,
    /// The id of the last connection cached.
    last_id: u64,
}

struct Conn {
    sender: h2::client::SendRequest<Bytes>,
    used: Instant,
    /// Tells this connection from the one that replaces it: a request that
    /// found it dead forgets it, and never the replacement another request
    /// cached meanwhile.
    id: u64,
}

/// An answer's body, read chunk by chunk.
pub enum InvokeBody {
    H2(h2::RecvStream),
    H1(BodyDataStream<hyper::body::Incoming>),
}

impl InvokeBody {
    /// The next chunk; `None` at the end of the answer.
    pub async fn next(&mut self) -> Option<Result<Bytes, String>> {
        match self {
            InvokeBody::H2(body) => match body.data().await? {
                Ok(bytes) => {
                    // Read means forwarded to the driver: the miner may send
                    // this much more.
                    let _ = body.flow_control().release_capacity(bytes.len());
                    Some(Ok(bytes))
                }
                Err(e) => Some(Err(sluice_proto::error_chain(&e))),
            },
            InvokeBody::H1(body) => body
                .next()
                .await
                .map(|r| r.map_err(|e| sluice_proto::error_chain(&e))),
        }
    }
}

impl Invoker {
    pub fn new(http2: bool) -> Self {
        if http2 {
            return Invoker {
                mode: Mode::H2(Mutex::default()),
            };
        }
        let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .pool_timer(hyper_util::rt::TokioTimer::new())
                .build(connector);
        Invoker {
            mode: Mode::H1(Box::new(client)),
        }
    }

    /// Sends `request` (an absolute `http://` URI) and returns the status
    /// and body of the answer once its headers are in.
    pub async fn send(&self, request: Request<Bytes>) -> Result<(StatusCode, InvokeBody), String> {
        match &self.mode {
            Mode::H1(client) => {
                let resp = client
                    .request(request.map(Full::new))
                    .await
                    .map_err(|e| sluice_proto::error_chain(&e))?;
                let status = resp.status();
                Ok((
                    status,
                    InvokeBody::H1(BodyDataStream::new(resp.into_body())),
                ))
            }
            Mode::H2(pool) => {
                let (parts, body) = request.into_parts();
                let authority = parts
                    .uri
                    .authority()
                    .ok_or_else(|| format!("`{}` names no host", parts.uri))?
                    .as_str();
                // A cached connection may have died since its last use:
                // then one new connection, as nothing was sent on the old.
                let mut sender = match cached(pool, authority) {
                    Some((s, id)) => match s.ready().await {
                        Ok(s) => s,
                        Err(_) => {
                            forget(pool, authority, id);
                            connect(pool, &parts.uri, authority).await?
                        }
                    },
                    None => connect(pool, &parts.uri, authority).await?,
                };
                let eos = body.is_empty();
                let (answer, mut stream) = sender
                    .send_request(Request::from_parts(parts, ()), eos)
                    .map_err(|e| sluice_proto::error_chain(&e))?;
                if !eos {
                    // Queued beside the headers: both leave in one write.
                    stream
                        .send_data(body, true)
                        .map_err(|e| sluice_proto::error_chain(&e))?;
                }
                let resp = answer.await.map_err(|e| sluice_proto::error_chain(&e))?;
                let status = resp.status();
                Ok((status, InvokeBody::H2(resp.into_body())))
            }
        }
    }
}

fn cached(pool: &Mutex<Pool>, authority: &str) -> Option<(h2::client::SendRequest<Bytes>, u64)> {
    let mut pool = lock(pool);
    let now = Instant::now();
    // Let go of connections nobody used for a while (checked at most every
    // few seconds, so the common path is one lookup).
    if pool
        .swept
        .is_none_or(|t| now.duration_since(t) > Duration::from_secs(10))
    {
        pool.swept = Some(now);
        pool.conns.retain(|_, c| now.duration_since(c.used) < IDLE);
    }
    let conn = pool.conns.get_mut(authority)?;
    conn.used = now;
    Some((conn.sender.clone(), conn.id))
}

/// Drops the cached connection `id` of `authority`, if still cached.
fn forget(pool: &Mutex<Pool>, authority: &str, id: u64) {
    let mut pool = lock(pool);
    if pool.conns.get(authority).is_some_and(|c| c.id == id) {
        pool.conns.remove(authority);
    }
}

/// Opens an HTTP/2 connection to `uri`'s host, starts driving it and
/// caches it under `authority` (`uri`'s) for the next invocations of the
/// same miner.
async fn connect(
    pool: &Mutex<Pool>,
    uri: &Uri,
    authority: &str,
) -> Result<h2::client::SendRequest<Bytes>, String> {
    let host = uri
        .host()
        .ok_or_else(|| format!("`{uri}` names no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(80);
    let tcp = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((host, port))).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => return Err(format!("connect to {host}:{port}: {e}")),
        Err(_) => return Err(format!("connect to {host}:{port}: timed out")),
    };
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::trace!(error = %e, "could not set TCP_NODELAY");
    }
    let (sender, mut connection) = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .handshake::<_, Bytes>(tcp)
        .await
        .map_err(|e| format!("HTTP/2 handshake with {host}:{port}: {e}"))?;
    let pings = connection.ping_pong();
    let peer = format!("{host}:{port}");
    tokio::spawn(drive(connection, pings, peer));
    let sender = sender
        .ready()
        .await
        .map_err(|e| sluice_proto::error_chain(&e))?;
    let mut pool = lock(pool);
    pool.last_id += 1;
    let id = pool.last_id;
    pool.conns.insert(
        authority.to_string(),
        Conn {
            sender: sender.clone(),
            used: Instant::now(),
            id,
        },
    );
    Ok(sender)
}

/// Drives one connection until it closes (every handle and stream gone,
/// or an error), pinging it when it has been quiet.
async fn drive(
    connection: h2::client::Connection<TcpStream, Bytes>,
    mut pings: Option<h2::PingPong>,
    peer: String,
) {
    let mut connection = std::pin::pin!(connection);
    loop {
        // A ping after a quiet spell; without a ping handle, only the wait.
        let ping = async {
            tokio::time::sleep(PING_EVERY).await;
            match &mut pings {
                Some(p) => tokio::time::timeout(PING_TIMEOUT, p.ping(h2::Ping::opaque())).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            result = &mut connection => {
                if let Err(e) = result {
                    tracing::debug!(%peer, error = %e, "miner connection closed");
                }
                return;
            }
            answer = ping => match answer {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "miner connection closed");
                    return;
                }
                Err(_) => {
                    tracing::warn!(%peer, "miner did not answer a ping in time; closing its connection");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::post;
    use axum::Router;

    /// Posts `body` to `addr`'s `/v1/invoke` and reads the whole answer.
    async fn call(invoker: &Invoker, addr: std::net::SocketAddr, body: String) -> String {
        let req = Request::post(format!("http://{addr}/v1/invoke"))
            .body(Bytes::from(body))
            .unwrap();
        let (status, mut body) = invoker.send(req).await.unwrap();
        assert_eq!(status, StatusCode::OK);
        let mut text = Vec::new();
        while let Some(chunk) = body.next().await {
            text.extend_from_slice(&chunk.unwrap());
        }
        String::from_utf8(text).unwrap()
    }

    /// The HTTP version and body each invocation arrives with at an axum
    /// server (as the miner's), which answers with both.
    async fn seen(http2: bool) -> Vec<String> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route(
            "/v1/invoke",
            post(|req: axum::extract::Request| async move {
                let version = format!("{:?}", req.version());
                let body = axum::body::to_bytes(req.into_body(), 1 << 20)
                    .await
                    .unwrap();
                // Long enough to come in more than one chunk.
                format!(
                    "{version} {}{}",
                    String::from_utf8_lossy(&body),
                    "!".repeat(100_000)
                )
            }),
        );
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        let invoker = Invoker::new(http2);
        let mut seen = Vec::new();
        for i in 0..3 {
            let text = call(&invoker, addr, format!("call {i}")).await;
            seen.push(text.trim_end_matches('!').to_string());
        }
        server.abort();
        seen
    }

    #[tokio::test]
    async fn invocations_speak_http2_to_miners_unless_configured_off() {
        assert_eq!(
            seen(true).await,
            ["HTTP/2.0 call 0", "HTTP/2.0 call 1", "HTTP/2.0 call 2"]
        );
        assert_eq!(
            seen(false).await,
            ["HTTP/1.1 call 0", "HTTP/1.1 call 1", "HTTP/1.1 call 2"]
        );
        assert!(crate::ValidatorConfig::default().miner_http2);
        let off = crate::ValidatorConfig::from_toml("miner_http2 = false").unwrap();
        assert!(!off.miner_http2);
    }

    /// Serves `answer` on `listener` on a runtime of its own, in a thread,
    /// until `stop` fires; the runtime's end closes every connection.
    fn miner_in_thread(
        listener: std::net::TcpListener,
        answer: &'static str,
        stop: tokio::sync::oneshot::Receiver<()>,
    ) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                listener.set_nonblocking(true).unwrap();
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let app = Router::new().route("/v1/invoke", post(move || async move { answer }));
                tokio::select! {
                    _ = async move { axum::serve(listener, app).await } => {}
                    _ = stop => {}
                }
            });
        })
    }

    #[tokio::test]
    async fn a_miner_that_restarted_gets_a_new_connection() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let first = miner_in_thread(listener, "first", stopped);
        let invoker = Invoker::new(true);
        let call = || call(&invoker, addr, "{}".into());
        assert_eq!(call().await, "first");
        assert_eq!(call().await, "first");
        // The miner goes away with its connections and comes back on the
        // same address: the cached connection is dead, and the next
        // invocation opens a new one instead of failing.
        stop.send(()).unwrap();
        first.join().unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let listener = std::net::TcpListener::bind(addr).unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let second = miner_in_thread(listener, "second", stopped);
        assert_eq!(call().await, "second");
        // Another request that found the first connection dead, late to
        // forget it, leaves the new one cached.
        let Mode::H2(pool) = &invoker.mode else {
            panic!("an HTTP/2 invoker")
        };
        let authority = addr.to_string();
        assert_eq!(cached(pool, &authority).map(|(_, id)| id), Some(2));
        forget(pool, &authority, 1);
        assert_eq!(cached(pool, &authority).map(|(_, id)| id), Some(2));
        forget(pool, &authority, 2);
        assert!(cached(pool, &authority).is_none());
        stop.send(()).unwrap();
        second.join().unwrap();
    }
}
