//! The miner's HTTP server: axum's `serve`, but with the number of
//! concurrent HTTP/2 streams per connection set from the engine's
//! capacity.
//!
//! Each validator replica sends all its invocations of this miner over one
//! multiplexed HTTP/2 connection. hyper's server allows 200 streams on a
//! connection unless told otherwise, and `axum::serve` does not tell it:
//! behind a miner with more slots than that, the validator's invocations
//! past the 200th waited in its HTTP/2 client, out of sight of its
//! queueing and deadlines, while the engine had slots free.

use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// hyper's own default, kept as the least a miner allows.
const MIN_STREAMS: u32 = 200;
/// Streams beyond the engine's slots: health checks, and invocations the
/// engine will refuse at once as over capacity rather than leave waiting.
const SPARE_STREAMS: u32 = 32;

/// The concurrent HTTP/2 streams a connection may open to a miner whose
/// engine has `capacity` slots.
pub(crate) fn max_streams(capacity: u32) -> u32 {
    capacity.saturating_add(SPARE_STREAMS).max(MIN_STREAMS)
}

/// Serves `app` on `listener` until `shutdown`; then stops accepting,
/// asks every open connection to finish what it has in flight and waits
/// for them.
pub(crate) async fn serve(
    listener: TcpListener,
    app: Router,
    max_streams: u32,
    shutdown: CancellationToken,
) {
    let mut builder = Builder::new(TokioExecutor::new());
    builder.http2().max_concurrent_streams(max_streams);
    // Dropped at shutdown: every connection starts its graceful close.
    let (closing, _) = watch::channel(());
    // Every connection holds a receiver: all closed when none is left.
    let (done, _) = watch::channel(());
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, say: wait rather than spin.
                tracing::warn!(error = %e, "could not accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::trace!(error = %e, "could not set TCP_NODELAY");
        }
        let service = TowerToHyperService::new(app.clone());
        let builder = builder.clone();
        let mut close = closing.subscribe();
        let held = done.subscribe();
        tokio::spawn(async move {
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                result = conn.as_mut() => finished(result),
                _ = close.changed() => {
                    conn.as_mut().graceful_shutdown();
                    finished(conn.await);
                }
            }
            drop(held);
        });
    }
    drop(listener);
    drop(closing);
    done.closed().await;
}

fn finished(result: Result<(), Box<dyn std::error::Error + Send + Sync>>) {
    if let Err(e) = result {
        tracing::trace!(error = %e, "connection ended");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;

    async fn started(
        app: Router,
        streams: u32,
    ) -> (
        std::net::SocketAddr,
        CancellationToken,
        tokio::task::JoinHandle<()>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(listener, app, streams, stop.clone()));
        (addr, stop, server)
    }

    #[test]
    fn streams_follow_the_engine_capacity() {
        assert_eq!(max_streams(1), 200);
        assert_eq!(max_streams(512), 544);
        assert_eq!(max_streams(u32::MAX), u32::MAX);
    }

    #[tokio::test]
    async fn http2_clients_may_open_as_many_streams_as_the_engine_has_slots() {
        let app = Router::new().route("/health", get(|| async { "ok" }));
        let (addr, stop, server) = started(app, max_streams(512)).await;
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut client, conn) = h2::client::handshake(tcp).await.unwrap();
        let mut conn = std::pin::pin!(conn);
        let request = axum::http::Request::get(format!("http://{addr}/health"))
            .body(())
            .unwrap();
        let (answer, _) = client.send_request(request, true).unwrap();
        let mut answer = std::pin::pin!(answer);
        // Drive the connection until the answer (and the server's
        // settings, which come first) are in.
        let response = tokio::select! {
            r = &mut answer => r.unwrap(),
            r = &mut conn => panic!("connection ended: {r:?}"),
        };
        assert_eq!(response.status(), axum::http::StatusCode::OK);
        assert_eq!(conn.max_concurrent_send_streams(), 544);
        stop.cancel();
        drop(client);
        drop(response);
        let _ = tokio::time::timeout(Duration::from_secs(1), &mut conn).await;
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("the server stops")
            .unwrap();
    }

    #[tokio::test]
    async fn shutdown_lets_requests_in_flight_finish_and_refuses_new_ones() {
        let app = Router::new().route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(300)).await;
                "done"
            }),
        );
        let (addr, stop, server) = started(app, max_streams(1)).await;
        let http = reqwest::Client::new();
        let url = format!("http://{addr}/slow");
        let in_flight = tokio::spawn(http.get(&url).send());
        tokio::time::sleep(Duration::from_millis(100)).await;
        stop.cancel();
        let answer = in_flight.await.unwrap().expect("answered");
        assert_eq!(answer.text().await.unwrap(), "done");
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("the server stops once its connections are done")
            .unwrap();
        assert!(
            tokio::net::TcpStream::connect(addr).await.is_err(),
            "no longer listening"
        );
    }
}
