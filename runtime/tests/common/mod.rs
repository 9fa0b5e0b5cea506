//! Test helpers: start a real server on a free port, talk HTTP to it, read its metrics.
#![allow(dead_code)]

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use profiles::Profile;
use runtime::{ServeOptions, Server};
use serde_json::Value;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

pub type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

pub struct Resp {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Value,
    pub text: String,
}

pub async fn request(
    c: &HttpClient,
    method: &str,
    addr: SocketAddr,
    path: &str,
    body: impl Into<Bytes>,
) -> Resp {
    let req = hyper::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/json")
        .body(Full::new(body.into()))
        .unwrap();
    let resp = c.request(req).await.expect("request failed");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&bytes).to_string();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Resp {
        status,
        headers,
        body,
        text,
    }
}

pub async fn embed(c: &HttpClient, addr: SocketAddr, body: Value) -> Resp {
    request(c, "POST", addr, "/v1/embeddings", body.to_string()).await
}

/// Polls /health until 200, with a deadline (never a fixed sleep).
pub async fn wait_ready(c: &HttpClient, addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let req = hyper::Request::get(format!("http://{addr}/health"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        if let Ok(r) = c.request(req).await {
            if r.status() == 200 {
                return;
            }
        }
        assert!(Instant::now() < deadline, "server not ready within 60s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn start(profile: Profile) -> (Server, HttpClient) {
    start_with(ServeOptions::new(profile, "127.0.0.1:0".parse().unwrap())).await
}

/// [`start`] with every server option given.
pub async fn start_with(o: ServeOptions) -> (Server, HttpClient) {
    let server = Server::start(o).await.unwrap();
    let c = client();
    wait_ready(&c, server.addr).await;
    (server, c)
}

pub async fn stop(server: Server) {
    server.shutdown();
    server.wait().await.unwrap();
}

pub fn tiny(p: Profile) -> Profile {
    Profile {
        model: "synthetic:tiny".into(),
        ..p
    }
}

/// Sum of a metric's samples whose line starts with `prefix` (labels included in the prefix).
pub async fn metric(c: &HttpClient, addr: SocketAddr, prefix: &str) -> f64 {
    let text = request(c, "GET", addr, "/metrics", "").await.text;
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Sends `n` embedding requests at once (`"{prefix} {i}"`); each task yields its status.
pub fn embed_many(
    c: &HttpClient,
    addr: SocketAddr,
    n: usize,
    prefix: &str,
) -> Vec<tokio::task::JoinHandle<u16>> {
    (0..n)
        .map(|i| {
            let (c, text) = (c.clone(), format!("{prefix} {i}"));
            tokio::spawn(async move {
                embed(&c, addr, serde_json::json!({ "input": text }))
                    .await
                    .status
            })
        })
        .collect()
}

/// Polls until at least `n` inputs are queued, failing after `within`.
pub async fn wait_queued(c: &HttpClient, addr: SocketAddr, n: f64, within: Duration) {
    let deadline = Instant::now() + within;
    while metric(c, addr, "batchtune_queue_depth_inputs").await < n {
        assert!(Instant::now() < deadline, "requests never queued");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
