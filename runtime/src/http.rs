//! The HTTP/1.1 connection layer: accepts connections under a limit, serves each with hyper
//! with a header read timeout, and closes them gracefully on shutdown.
//!
//! Written here rather than `axum::serve` because that offers neither a connection limit nor
//! hyper's header read timeout (it sets no timer): ~20,000 idle connections exhausted the
//! process's file descriptors until `/health` stopped answering, and a client sending its
//! headers a byte a second held a connection forever. The body read timeout and the
//! `Content-Length` check live in the router (`api::limit_body`), where the route is known.

use axum::body::Body;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tower::ServiceExt;

/// Per-connection limits (server options, not profile knobs: they protect the process, not
/// the batching).
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// Connections served at once. Past it a new connection is answered 503 with
    /// `Connection: close` at once, so the process never runs out of file descriptors and a
    /// client sees why (a load balancer retries elsewhere).
    pub max_connections: usize,
    /// A request's headers must arrive within this, and an idle keep-alive connection is
    /// closed after it (hyper's timer starts when it waits for a request head).
    pub header_read_timeout: Duration,
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            max_connections: 10_000,
            header_read_timeout: Duration::from_secs(30),
        }
    }
}

/// The most connections this process can hold: its open-file limit (raised to the hard limit
/// first, as nginx's `worker_rlimit_nofile` does) less a reserve for model files, logs and the
/// listener. `None` when the limit cannot be read.
pub fn fd_capacity() -> Option<usize> {
    #[cfg(unix)]
    {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit/setrlimit only read and write the struct passed.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
                return None;
            }
            if r.rlim_cur < r.rlim_max {
                let raised = libc::rlimit {
                    rlim_cur: r.rlim_max,
                    rlim_max: r.rlim_max,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                    r.rlim_cur = r.rlim_max;
                }
            }
        }
        Some((r.rlim_cur as usize).saturating_sub(256))
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// Serves `app` on `listener` until `close` turns true, then lets every connection finish its
/// current response (hyper's graceful shutdown) and returns when all are closed.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnLimits,
    mut close: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    // Connections are told to close only after the listener has closed and a short linger:
    // a connection accepted just before, whose request is still arriving, gets that request
    // read and answered (503 while draining) instead of being closed under it.
    let (conns_close_tx, conns_close) = watch::channel(false);
    let mut conns = JoinSet::new();
    let mut refused_logged = false;
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = close.wait_for(|c| *c) => break,
        };
        while conns.try_join_next().is_some() {}
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(err) => {
                // EMFILE and the like: back off instead of spinning on the error.
                tracing::warn!("accept failed: {err}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Without TCP_NODELAY a streamed token written while the previous one is
        // unacknowledged waits for the client's delayed ACK (up to 40 ms on Linux).
        if let Err(err) = stream.set_nodelay(true) {
            tracing::debug!("TCP_NODELAY on an accepted connection: {err}");
        }
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            if !refused_logged {
                tracing::warn!(
                    max_connections = limits.max_connections,
                    "connection limit reached: new connections get 503 until some close"
                );
                refused_logged = true;
            }
            conns.spawn(refuse(stream, TOO_MANY));
            continue;
        };
        refused_logged = false;
        let app = app.clone();
        let mut close = conns_close.clone();
        conns.spawn(async move {
            let _slot = slot;
            let svc = TowerToHyperService::new(
                app.map_request(|req: hyper::Request<Incoming>| req.map(Body::new)),
            );
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .keep_alive(true);
            let conn = builder.serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            let closing = tokio::select! {
                _ = conn.as_mut() => false,
                _ = close.wait_for(|c| *c) => true,
            };
            if closing {
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
            }
        });
    }
    // Connections the kernel has completed but we have not accepted would be reset when the
    // listener closes, and their clients could not tell a dropped request from a refused one:
    // answer them 503 first, until none is waiting. Bounded: clients that keep connecting
    // would otherwise keep the listener open forever.
    let until = tokio::time::Instant::now() + BACKLOG_DRAIN;
    while let Ok(Ok((stream, _))) = tokio::time::timeout_at(until, listener.accept()).await {
        conns.spawn(refuse(stream, SHUTTING_DOWN));
    }
    drop(listener);
    tokio::time::sleep(CLOSE_LINGER).await;
    let _ = conns_close_tx.send(true);
    while conns.join_next().await.is_some() {}
}

/// How long the accept queue is answered 503 before the listener closes.
const BACKLOG_DRAIN: Duration = Duration::from_millis(50);

/// Between closing the listener and closing idle connections: long enough for a request
/// already on its way over a just-accepted connection to arrive.
const CLOSE_LINGER: Duration = Duration::from_millis(200);

/// The 503 past `max_connections`.
const TOO_MANY: &str = "too many connections (--max-connections); retry shortly";
/// The 503 to connections still waiting in the accept queue when the server stops.
const SHUTTING_DOWN: &str = "the server is shutting down; retry on another replica";

/// Answers a connection 503 with `message` without reading its request.
async fn refuse(mut stream: TcpStream, message: &str) {
    use tokio::io::AsyncWriteExt;
    let body = serde_json::json!({
        "error": {"message": message, "type": "unavailable", "param": null, "code": 503}
    })
    .to_string();
    let resp = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(resp.as_bytes())).await;
}
