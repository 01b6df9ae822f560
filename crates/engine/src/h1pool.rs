//! Keep-alive HTTP/1.1 connections to one upstream server, driven by
//! hyper's connection API.
//!
//! hyper-util's pooled client does the same for any number of hosts and
//! schemes, and pays for that on every request: the pool key is hashed at
//! checkout and again at return, and the request travels through several
//! layers of boxed and mapped futures. An upstream engine talks to one
//! server, so its pool is a list of idle connections.
//!
//! What the pool promises:
//! - A connection goes back to the list only after its response body has
//!   been read to the end ([`Pooled::finish`] reads the rest in the
//!   background for a reader that has what it wanted); a body dropped
//!   before its end takes the connection with it: that is how an upstream
//!   still generating learns to stop.
//! - A connection the server has closed while it sat idle is skipped, and a
//!   request that hyper hands back unsent (the connection closed as it was
//!   taken) is sent again, on the next idle connection or a new one. A new
//!   connection that fails fails the request.
//! - At most `max_idle` connections are kept idle, and none for longer than
//!   [`IDLE_TIMEOUT`]: one idle longer is closed when the pool is next used
//!   rather than reused (a server or a middlebox may have dropped it
//!   without a word, or may be about to).

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

type Sender = SendRequest<Full<Bytes>>;

/// How long a connection may sit idle and still be reused.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// An idle connection and when it went idle.
struct Idle {
    sender: Sender,
    since: Instant,
}

/// Why a request got no response.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SendError {
    /// No connection could be opened.
    #[error("cannot connect to {authority}: {reason}")]
    Connect { authority: String, reason: String },
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

impl SendError {
    pub fn is_connect(&self) -> bool {
        matches!(self, SendError::Connect { .. })
    }
}

#[derive(Clone)]
pub(crate) struct H1Pool {
    inner: Arc<Inner>,
}

struct Inner {
    /// `host:port`, as connected to.
    authority: String,
    /// Oldest first: connections go back at the end and are taken from it.
    idle: Mutex<Vec<Idle>>,
    max_idle: usize,
    idle_timeout: Duration,
    connect_timeout: Duration,
}

impl Inner {
    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        sluice_proto::sync::lock(&self.idle)
    }

    /// Takes out of `idle` the connections idle longer than the timeout
    /// (the oldest ones). The caller drops them, closing them, after
    /// letting go of the lock.
    fn take_expired(&self, idle: &mut Vec<Idle>, now: Instant) -> Vec<Idle> {
        let expired = idle.partition_point(|c| now.duration_since(c.since) > self.idle_timeout);
        idle.drain(..expired).collect()
    }
}

impl H1Pool {
    pub fn new(authority: String, max_idle: usize, connect_timeout: Duration) -> H1Pool {
        Self::with_idle_timeout(authority, max_idle, connect_timeout, IDLE_TIMEOUT)
    }

    fn with_idle_timeout(
        authority: String,
        max_idle: usize,
        connect_timeout: Duration,
        idle_timeout: Duration,
    ) -> H1Pool {
        H1Pool {
            inner: Arc::new(Inner {
                authority,
                idle: Mutex::new(Vec::new()),
                max_idle,
                idle_timeout,
                connect_timeout,
            }),
        }
    }

    /// Sends `req` (its URI in origin form, its `Host` header set) on an
    /// idle connection, or on a new one. The future owns a handle to the
    /// pool.
    pub fn send(
        &self,
        req: Request<Full<Bytes>>,
    ) -> impl std::future::Future<Output = Result<Response<Pooled>, SendError>> + Send + 'static
    {
        let pool = self.clone();
        async move { pool.send_owned(req).await }
    }

    async fn send_owned(
        self,
        mut req: Request<Full<Bytes>>,
    ) -> Result<Response<Pooled>, SendError> {
        // Idle connections first; then, once, a new one.
        loop {
            let reused = self.take_idle().await;
            let fresh = reused.is_none();
            let mut sender = match reused {
                Some(s) => s,
                None => self.connect().await?,
            };
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    let back = Some((sender, self.inner.clone()));
                    return Ok(resp.map(|body| Pooled { body, back }));
                }
                Err(mut e) => match e.take_message() {
                    // Not sent: the connection closed as it was taken.
                    Some(unsent) if !fresh => req = unsent,
                    _ => return Err(e.into_error().into()),
                },
            }
        }
    }

    /// An idle connection that is still open and ready for a request.
    async fn take_idle(&self) -> Option<Sender> {
        loop {
            let mut sender = {
                let mut idle = self.inner.idle();
                let expired = self.inner.take_expired(&mut idle, Instant::now());
                let newest = idle.pop();
                drop(idle);
                drop(expired);
                newest?.sender
            };
            if sender.is_closed() {
                continue;
            }
            // Returned as soon as its response ended: hyper may not have
            // seen the end yet.
            if sender.ready().await.is_ok() {
                return Some(sender);
            }
        }
    }

    async fn connect(&self) -> Result<Sender, SendError> {
        let authority = &self.inner.authority;
        let failed = |reason: String| SendError::Connect {
            authority: authority.clone(),
            reason,
        };
        let stream = tokio::time::timeout(
            self.inner.connect_timeout,
            tokio::net::TcpStream::connect(authority.as_str()),
        )
        .await
        .map_err(|_| failed(format!("no connection in {:?}", self.inner.connect_timeout)))?
        .map_err(|e| failed(e.to_string()))?;
        stream
            .set_nodelay(true)
            .map_err(|e| failed(e.to_string()))?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| failed(e.to_string()))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection ended");
            }
        });
        Ok(sender)
    }
}

/// A response body that gives its connection back to the pool when it has
/// been read to the end.
pub(crate) struct Pooled {
    body: Incoming,
    back: Option<(Sender, Arc<Inner>)>,
}

/// What a finished reader leaves to be read in the background, at most.
const FINISH_FRAMES: usize = 4;
const FINISH_WAIT: Duration = Duration::from_secs(1);

impl Pooled {
    /// For a reader that has all it wanted (a stream's last event came):
    /// reads what is left of the body in the background, when a runtime is
    /// at hand, so that its connection serves again. Usually that is only
    /// the end of a chunked body, which hyper has not read when the last
    /// event arrives. A body that has more than a few frames left, or takes
    /// longer than a second, is dropped, and its connection with it.
    pub fn finish(mut self) {
        if self.body.is_end_stream() {
            return self.release();
        }
        if self.back.is_none() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            let mut body = self;
            let _ = tokio::time::timeout(FINISH_WAIT, async {
                for _ in 0..FINISH_FRAMES {
                    // The connection goes back as the end is read.
                    match body.frame().await {
                        Some(Ok(_)) if body.back.is_some() => {}
                        _ => break,
                    }
                }
            })
            .await;
        });
    }

    fn release(&mut self) {
        if let Some((sender, inner)) = self.back.take() {
            if sender.is_closed() {
                return;
            }
            let now = Instant::now();
            let mut idle = inner.idle();
            // The oldest may have idled too long while this one was busy.
            let expired = inner.take_expired(&mut idle, now);
            if idle.len() < inner.max_idle {
                idle.push(Idle { sender, since: now });
            }
            drop(idle);
            drop(expired);
        }
    }
}

impl Body for Pooled {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.release(),
            Poll::Ready(Some(Ok(_))) if this.body.is_end_stream() => this.release(),
            // A broken body leaves its connection unusable.
            Poll::Ready(Some(Err(_))) => this.back = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_bench::mock::{self, MockOptions};
    use std::net::SocketAddr;
    use tokio_util::sync::CancellationToken;

    async fn mock_on(addr: SocketAddr) -> (SocketAddr, CancellationToken, mock::MockServer) {
        let stop = CancellationToken::new();
        let m = mock::start(addr, MockOptions::default(), stop.clone())
            .await
            .unwrap();
        (m.addr, stop, m)
    }

    fn post(addr: SocketAddr) -> Request<Full<Bytes>> {
        let body = br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":4}"#;
        let mut req = Request::new(Full::new(Bytes::from_static(body)));
        *req.method_mut() = http::Method::POST;
        *req.uri_mut() = http::Uri::from_static("/v1/chat/completions");
        req.headers_mut()
            .insert(http::header::HOST, addr.to_string().parse().unwrap());
        req.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        req
    }

    #[tokio::test]
    async fn a_connection_is_reused_only_after_its_body_ends() {
        let (addr, _stop, _m) = mock_on("127.0.0.1:0".parse().unwrap()).await;
        let pool = H1Pool::new(addr.to_string(), 4, Duration::from_secs(5));
        let first = pool.send(post(addr)).await.unwrap();
        assert!(first.status().is_success());
        // The first body is unread: a second request needs a second
        // connection, and neither is idle yet.
        let second = pool.send(post(addr)).await.unwrap();
        assert_eq!(pool.inner.idle().len(), 0);
        let a = first.into_body().collect().await.unwrap().to_bytes();
        let b = second.into_body().collect().await.unwrap().to_bytes();
        assert!(!a.is_empty() && a == b);
        assert_eq!(pool.inner.idle().len(), 2);
        // Taken again, and back again.
        for _ in 0..3 {
            let r = pool.send(post(addr)).await.unwrap();
            r.into_body().collect().await.unwrap();
        }
        assert_eq!(pool.inner.idle().len(), 2);
        // A body dropped unread takes its connection along.
        let unread = pool.send(post(addr)).await.unwrap();
        drop(unread);
        assert_eq!(pool.inner.idle().len(), 1);
    }

    #[tokio::test]
    async fn a_body_dropped_before_its_end_closes_its_connection() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // A server that starts a chunked answer and never ends it, as an
        // upstream still generating.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let _ = sock.read(&mut buf).await.unwrap();
            sock.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
                .await
                .unwrap();
            // Whatever comes next: the client closing the connection.
            sock.read(&mut buf).await.unwrap()
        });
        let pool = H1Pool::new(addr.to_string(), 4, Duration::from_secs(5));
        let mut body = pool.send(post(addr)).await.unwrap().into_body();
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), Bytes::from_static(b"hello"));
        drop(body);
        assert_eq!(pool.inner.idle().len(), 0);
        // The server reads end of file: the connection is gone.
        let read = tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(read, 0);
    }

    #[tokio::test]
    async fn a_stream_finished_after_its_last_event_keeps_its_connection() {
        let (addr, _stop, _m) = mock_on("127.0.0.1:0".parse().unwrap()).await;
        let pool = H1Pool::new(addr.to_string(), 4, Duration::from_secs(5));
        let mut req = post(addr);
        *req.body_mut() = Full::new(Bytes::from_static(
            br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true}"#,
        ));
        let mut body = pool.send(req).await.unwrap().into_body();
        // Read as the upstream engine does: up to the `[DONE]` event, and no
        // further (the end of the chunked body is still unread).
        let mut seen = Vec::new();
        while !String::from_utf8_lossy(&seen).contains("[DONE]") {
            let frame = body.frame().await.unwrap().unwrap();
            seen.extend_from_slice(&frame.into_data().unwrap());
        }
        body.finish();
        let back = async {
            while pool.inner.idle().is_empty() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), back)
            .await
            .expect("the connection went back");
    }

    #[tokio::test]
    async fn idle_connections_the_server_closed_are_skipped() {
        let (addr, stop, m) = mock_on("127.0.0.1:0".parse().unwrap()).await;
        let pool = H1Pool::new(addr.to_string(), 4, Duration::from_secs(5));
        let r = pool.send(post(addr)).await.unwrap();
        r.into_body().collect().await.unwrap();
        assert_eq!(pool.inner.idle().len(), 1);
        // The server stops (closing its idle connections) and comes back on
        // the same port: the idle connection is dead, the request gets
        // through on a new one.
        stop.cancel();
        m.handle.await.unwrap().unwrap();
        let (_, _stop, _m) = mock_on(addr).await;
        let r = pool.send(post(addr)).await.unwrap();
        assert!(r.status().is_success());
        r.into_body().collect().await.unwrap();
        assert_eq!(pool.inner.idle().len(), 1);
    }

    /// A keep-alive HTTP/1.1 server answering `ok` to every request, and
    /// the number of connections it accepted.
    async fn counting_server() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        // One request: its head, then its content-length body.
                        let complete = |buf: &[u8]| {
                            let head = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
                            let text = String::from_utf8_lossy(&buf[..head]).to_ascii_lowercase();
                            let len = text
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length:"))
                                .map_or(0, |v| v.trim().parse::<usize>().unwrap());
                            (buf.len() >= head + len).then_some(head + len)
                        };
                        while complete(&buf).is_none() {
                            match sock.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        let end = complete(&buf).unwrap();
                        buf.drain(..end);
                        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if sock.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    #[tokio::test]
    async fn a_connection_idle_too_long_is_not_reused() {
        use std::sync::atomic::Ordering;
        let (addr, accepted) = counting_server().await;
        let pool = H1Pool::with_idle_timeout(
            addr.to_string(),
            4,
            Duration::from_secs(5),
            Duration::from_millis(200),
        );
        let get = || async {
            let r = pool.send(post(addr)).await.unwrap();
            r.into_body().collect().await.unwrap().to_bytes()
        };
        assert_eq!(get().await, "ok");
        assert_eq!(get().await, "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "reused while fresh");
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(get().await, "ok");
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            2,
            "idle too long: a new one"
        );
        assert_eq!(pool.inner.idle().len(), 1);
    }

    #[tokio::test]
    async fn an_unreachable_server_is_a_connect_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let pool = H1Pool::new(addr.to_string(), 4, Duration::from_secs(5));
        match pool.send(post(addr)).await {
            Err(e) => assert!(e.is_connect(), "{e}"),
            Ok(r) => panic!("answered {}", r.status()),
        }
    }
}
