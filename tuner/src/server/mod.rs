//! The server under test, behind one seam: batchtune's own runtime ([`runtime`]: hot reload
//! through `PUT /config`, restart for restart-only knobs) or any other HTTP inference server
//! described by an adapter file ([`adapter`], driven by [`external`]: knobs as environment
//! variables or flags, a restart per trial). Both run as [`process`] children that die with the
//! tuner.

pub mod adapter;
pub mod external;
pub mod process;
pub mod runtime;

use crate::space::Knobs;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::time::Duration;

pub use runtime::Target;

/// Errors while controlling the server.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The child could not be started or did not become ready.
    #[error("server: {0}")]
    Spawn(String),
    /// An HTTP call failed or was refused.
    #[error("{0}")]
    Http(String),
    /// The server answered a reconfiguration with a 4xx: it validated the knobs and refused
    /// them (a point of the space it cannot run, such as a prefill budget below the longest
    /// input it accepts). A search records the point as infeasible and moves on.
    #[error("{0}")]
    Rejected(String),
    /// The adapter file is unusable.
    #[error(transparent)]
    Adapter(#[from] adapter::AdapterError),
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// One HTTP call: status and body text.
async fn call(
    client: &HttpClient,
    url: &str,
    method: &str,
    path: &str,
    body: Option<String>,
) -> Result<(u16, String), ControlError> {
    let req = hyper::Request::builder()
        .method(method)
        .uri(format!("{url}{path}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|e| ControlError::Http(e.to_string()))?;
    let resp = client
        .request(req)
        .await
        .map_err(|e| ControlError::Http(format!("{method} {path}: {e}")))?;
    let status = resp.status().as_u16();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| ControlError::Http(e.to_string()))?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
}

/// The knob that caps the load generator's requests in flight: the client-side concurrency of
/// a pipeline (seed 001's `MAX_CONCURRENT_REQUESTS`), searched like a server knob.
pub const CLIENT_CONCURRENCY: &str = "client_concurrency";

/// The server a search measures.
pub enum Server {
    /// batchtune's runtime (spawned or at a URL), or a foreign server at a URL whose knobs the
    /// tuner does not control (client-side search).
    Runtime(Box<Target>),
    /// A server started and restarted from an adapter file.
    External(Box<external::External>),
}

impl Server {
    /// Base URL of the server now running.
    pub fn url(&self) -> &str {
        match self {
            Server::Runtime(t) => &t.url,
            Server::External(e) => &e.url,
        }
    }

    /// True for batchtune's runtime (its `/config` and metrics can be read).
    pub fn is_batchtune(&self) -> bool {
        matches!(self, Server::Runtime(t) if t.is_batchtune)
    }

    /// Whether `knob` is a client-side knob (set on the load generator, not the server).
    pub fn is_client_knob(&self, knob: &str) -> bool {
        match self {
            Server::Runtime(_) => knob == CLIENT_CONCURRENCY,
            Server::External(e) => e.adapter.is_client(knob),
        }
    }

    /// Generation sequences the server runs at once, read from batchtune's `GET /config`
    /// (None for other servers, or when it cannot be read).
    pub async fn running_capacity(&self) -> Option<usize> {
        match self {
            Server::Runtime(t) if t.is_batchtune => {
                let v = t.get("/config").await.ok()?;
                let p: profiles::Profile = serde_json::from_value(v).ok()?;
                Some(p.running_capacity())
            }
            _ => None,
        }
    }

    /// The client's cap on requests in flight under `knobs`, if a client knob sets one.
    pub fn client_concurrency(&self, knobs: &Knobs) -> Option<usize> {
        let is_cap = |k: &str| match self {
            Server::Runtime(_) => k == CLIENT_CONCURRENCY,
            Server::External(e) => e.adapter.is_client_concurrency(k),
        };
        match knobs.iter().find(|(k, _)| is_cap(k))?.1 {
            crate::space::Value::Int(n) => Some((*n).max(1) as usize),
            crate::space::Value::Float(x) => Some(x.round().max(1.0) as usize),
            crate::space::Value::Text(t) => t.parse().ok(),
        }
    }

    /// Applies the server-side knobs of `knobs` (client knobs are the load generator's).
    pub async fn apply(&mut self, knobs: &Knobs) -> Result<(), ControlError> {
        let server: Knobs = knobs
            .iter()
            .filter(|(k, _)| !self.is_client_knob(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        match self {
            Server::Runtime(_) if server.is_empty() => Ok(()),
            Server::Runtime(t) => t.apply(&server).await,
            Server::External(e) => e.apply(&server).await,
        }
    }

    /// Waits until the server has finished the last probe's requests (up to `limit`).
    pub async fn wait_idle(&self, limit: Duration) {
        match self {
            Server::Runtime(t) => t.wait_idle(limit).await,
            Server::External(e) => e.wait_idle().await,
        }
    }

    /// Stops a server the tuner started.
    pub fn stop(&mut self) {
        match self {
            Server::Runtime(t) => t.stop(),
            Server::External(e) => e.stop(),
        }
    }
}
