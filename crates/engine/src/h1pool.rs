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
//!   been read to the end; a body dropped before its end takes the
//!   connection with it (the server may still be writing on it).
//! - A connection the server has closed while it sat idle is skipped, and a
//!   request that hyper hands back unsent (the connection closed as it was
//!   taken) is sent again, on the next idle connection or a new one. A new
//!   connection that fails fails the request.
//! - At most `max_idle` connections are kept idle.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

type Sender = SendRequest<Full<Bytes>>;

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
    idle: Mutex<Vec<Sender>>,
    max_idle: usize,
    connect_timeout: Duration,
}

impl Inner {
    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<Sender>> {
        match self.idle.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }
}

impl H1Pool {
    pub fn new(authority: String, max_idle: usize, connect_timeout: Duration) -> H1Pool {
        H1Pool {
            inner: Arc::new(Inner {
                authority,
                idle: Mutex::new(Vec::new()),
                max_idle,
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
            let mut sender = self.inner.idle().pop()?;
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

impl Pooled {
    fn release(&mut self) {
        if let Some((sender, inner)) = self.back.take() {
            if sender.is_closed() {
                return;
            }
            let mut idle = inner.idle();
            if idle.len() < inner.max_idle {
                idle.push(sender);
            }
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
    use http_body_util::BodyExt;
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
        // A body dropped before its end takes its connection along.
        let dropped = pool.send(post(addr)).await.unwrap();
        drop(dropped);
        assert_eq!(pool.inner.idle().len(), 1);
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
