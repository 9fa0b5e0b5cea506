//! HTTP API: routes, request validation, and the request path from JSON to the batcher and back.

pub mod error;
pub mod generate;

use crate::embed::EmbedService;
use crate::metrics::Metrics;
use crate::model::tokenize::{encode_within, Encoded, Tokenize};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use error::ApiError;
use profiles::{Profile, ProfileError};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;
use tokio::sync::watch;

/// What exists once the model is loaded.
pub struct Engine {
    /// Model name for responses.
    pub model: String,
    /// Replica labels, for /health.
    pub devices: Vec<String>,
    /// The service of the model's request family.
    pub family: Family,
}

/// A server serves one model, so one request family: the other family's routes answer 400.
pub enum Family {
    /// An encoder: `POST /v1/embeddings`.
    Embed(EmbedEngine),
    /// A decoder: `POST /v1/completions`, `POST /v1/chat/completions`.
    Generate(generate::GenEngine),
}

/// The embeddings side of a loaded encoder.
pub struct EmbedEngine {
    /// Shared tokenizer.
    pub tokenizer: Arc<dyn Tokenize>,
    /// The embeddings service (admission, batcher, workers).
    pub service: EmbedService,
    /// Longest input the position table allows.
    pub max_positions: usize,
    /// Embedding width (the only `dimensions` a request may ask for).
    pub dim: usize,
}

/// Shared state of one server.
pub struct AppState {
    /// Live profile; the batcher watches it.
    pub profile: watch::Sender<Arc<Profile>>,
    /// Set once the model is loaded; requests before that get 503.
    pub engine: OnceLock<Engine>,
    /// Metrics registry.
    pub metrics: Arc<Metrics>,
    /// Guards `/v1/*` and `PUT /config` when set.
    pub api_key: Option<String>,
    /// Set when shutdown starts: new requests get 503 while queued ones finish.
    pub draining: AtomicBool,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// A body must arrive within this.
    pub body_read_timeout: std::time::Duration,
}

/// Every route, for the 404 and 405 answers.
const ROUTES: &str = "POST /v1/embeddings, POST /v1/completions, POST /v1/chat/completions, GET /health, GET|PUT /config, GET /metrics";

/// The router with every route, the API key check and the body limit.
pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.max_body_bytes;
    Router::new()
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/completions", post(generate::completions))
        .route("/v1/chat/completions", post(generate::chat))
        .route("/health", get(health))
        .route("/config", get(get_config).put(put_config))
        .route("/metrics", get(metrics))
        // OpenAI and TEI answer an unknown route 404 and a wrong method 405, with a JSON body.
        .fallback(|| async { ApiError::NotFound(format!("no such route; routes are {ROUTES}")) })
        .method_not_allowed_fallback(|| async {
            ApiError::MethodNotAllowed(format!("method not allowed; routes are {ROUTES}"))
        })
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            limit_body,
        ))
        // Outermost: the key is checked before any body is read, so an unauthenticated client
        // cannot make the server read (up to the body limit of) its upload.
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_key,
        ))
        .with_state(state)
}

/// Reads the body under the limits before any handler runs: a `Content-Length` over
/// `max_body_bytes` is refused (413) before a byte is read, and a body that does not arrive
/// within `body_read_timeout` gets 408, so a client sending a byte a second cannot hold a
/// connection and a buffer indefinitely.
async fn limit_body(
    State(state): State<Arc<AppState>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let too_large = || {
        ApiError::TooLarge(format!(
            "request body is larger than {} bytes (--max-body-bytes)",
            state.max_body_bytes
        ))
        .into_response()
    };
    let declared = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > state.max_body_bytes as u64) {
        return too_large();
    }
    let (parts, body) = req.into_parts();
    let read = axum::body::to_bytes(body, state.max_body_bytes);
    let bytes = match tokio::time::timeout(state.body_read_timeout, read).await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) if e.to_string().contains("length limit") => return too_large(),
        Ok(Err(e)) => {
            return ApiError::BadRequest {
                message: format!("cannot read body: {e}"),
                param: None,
            }
            .into_response()
        }
        Err(_) => {
            return ApiError::BodyTimeout(format!(
                "the request body did not arrive within {} (--body-read-timeout)",
                profiles::format_duration(state.body_read_timeout)
            ))
            .into_response()
        }
    };
    next.run(axum::extract::Request::from_parts(
        parts,
        axum::body::Body::from(bytes),
    ))
    .await
}

/// Refuses a request to a guarded route (`/v1/*`, `PUT /config`) without the key, before its
/// body is read.
async fn require_key(
    State(state): State<Arc<AppState>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let guarded = req.uri().path().starts_with("/v1/")
        || (req.uri().path() == "/config" && req.method() == axum::http::Method::PUT);
    if guarded {
        if let Err(e) = check_key(&state, req.headers()) {
            return closing(&state, e.into_response());
        }
    }
    closing(&state, next.run(req).await)
}

/// While draining, every response asks the client to close its connection, so its next
/// request opens a new one (answered 503 while the listener is open, refused after) instead of
/// racing the connection's close on shutdown.
fn closing(state: &AppState, mut resp: Response) -> Response {
    if state.draining.load(Ordering::Acquire) {
        resp.headers_mut().insert(
            axum::http::header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
    }
    resp
}

/// The key from `Authorization: Bearer <key>` (the scheme in any case, as RFC 9110 says) or
/// `X-API-Key: <key>`, compared in constant time.
fn check_key(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &state.api_key else {
        return Ok(());
    };
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, k)| k.trim());
    let plain = headers.get("x-api-key").and_then(|v| v.to_str().ok());
    let matches = |given: Option<&str>| given.is_some_and(|g| same_secret(g, key));
    if matches(bearer) | matches(plain) {
        Ok(())
    } else {
        Err(ApiError::Unauthorized)
    }
}

/// Equality whose time does not depend on where the first differing byte is (only on the
/// lengths), so the key cannot be guessed a byte at a time from response times.
fn same_secret(given: &str, key: &str) -> bool {
    let (a, b) = (given.as_bytes(), key.as_bytes());
    let diff = a
        .iter()
        .zip(b.iter().cycle())
        .fold((a.len() != b.len()) as u8, |d, (x, y)| d | (x ^ y));
    std::hint::black_box(diff) == 0 && !b.is_empty()
}

pub(crate) fn read_body(
    state: &AppState,
    body: Result<Bytes, BytesRejection>,
) -> Result<Value, ApiError> {
    let bytes = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge(format!(
                "request body is larger than {} bytes (--max-body-bytes)",
                state.max_body_bytes
            ))
        } else {
            ApiError::BadRequest {
                message: format!("cannot read body: {e}"),
                param: None,
            }
        }
    })?;
    serde_json::from_slice(&bytes).map_err(|e| ApiError::BadRequest {
        message: format!("malformed JSON: {e}"),
        param: None,
    })
}

/// How an embeddings response carries its vectors (OpenAI's `encoding_format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncodingFormat {
    /// A JSON array of numbers.
    Float,
    /// A base64 string of the little-endian f32 bytes: the official `openai` Python client
    /// asks for it unless told otherwise (then decodes it), and it is ~4× smaller than JSON.
    Base64,
}

impl EncodingFormat {
    /// The `embedding` field for one vector.
    pub fn encode(self, v: Vec<f32>) -> Value {
        match self {
            EncodingFormat::Float => json!(v),
            EncodingFormat::Base64 => {
                use base64::Engine as _;
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
            }
        }
    }
}

/// `encoding_format` and `dimensions` of an embeddings request. `dimensions` is accepted only
/// when it is the model's width: the OpenAI API refuses it for models that were not trained to
/// be truncated, and cutting a MiniLM vector would not be a valid embedding.
pub fn parse_format(body: &Value, dim: usize) -> Result<EncodingFormat, ApiError> {
    if let Some(d) = body.get("dimensions").filter(|d| !d.is_null()) {
        if d.as_u64() != Some(dim as u64) {
            return Err(ApiError::bad(
                "dimensions",
                format!("dimensions {d} is not supported: this model's embeddings have {dim} dimensions and cannot be shortened"),
            ));
        }
    }
    match body.get("encoding_format") {
        None | Some(Value::Null) => Ok(EncodingFormat::Float),
        Some(f) if f == "float" => Ok(EncodingFormat::Float),
        Some(f) if f == "base64" => Ok(EncodingFormat::Base64),
        Some(f) => Err(ApiError::bad(
            "encoding_format",
            format!("encoding_format {f} is not supported; use \"float\" or \"base64\""),
        )),
    }
}

/// Pulls the list of texts out of an embeddings request, naming the first problem precisely.
pub fn parse_inputs(body: &Value, p: &Profile) -> Result<Vec<String>, ApiError> {
    let obj = body.as_object().ok_or_else(|| ApiError::BadRequest {
        message: "body must be a JSON object".into(),
        param: None,
    })?;
    let input = obj.get("input").ok_or_else(|| {
        ApiError::bad(
            "input",
            "missing field `input` (a string or an array of strings)",
        )
    })?;
    let texts: Vec<String> = match input {
        Value::String(s) => vec![s.clone()],
        Value::Array(items) => {
            if items.is_empty() {
                return Err(ApiError::bad(
                    "input",
                    "input is an empty array; send at least one string",
                ));
            }
            if items.len() > p.max_inputs_per_request {
                return Err(ApiError::bad(
                    "input",
                    format!(
                        "input has {} items; max_inputs_per_request is {}",
                        items.len(),
                        p.max_inputs_per_request
                    ),
                ));
            }
            items
                .iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::String(s) => Ok(s.clone()),
                    other => Err(ApiError::bad(
                        "input",
                        format!("input[{i}] must be a string, got {}", type_name(other)),
                    )),
                })
                .collect::<Result<_, _>>()?
        }
        other => {
            return Err(ApiError::bad(
                "input",
                format!(
                    "input must be a string or an array of strings, got {}",
                    type_name(other)
                ),
            ))
        }
    };
    if let Some(i) = texts.iter().position(|t| t.trim().is_empty()) {
        return Err(ApiError::bad("input", format!("input[{i}] is empty")));
    }
    Ok(texts)
}

pub(crate) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

async fn embeddings(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let arrived = Instant::now();
    let resp = match embed_request(&state, body, arrived).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    state.metrics.count_status(resp.status().as_u16());
    state
        .metrics
        .request_duration
        .observe(arrived.elapsed().as_secs_f64());
    resp
}

async fn embed_request(
    state: &AppState,
    body: Result<Bytes, BytesRejection>,
    arrived: Instant,
) -> Result<Response, ApiError> {
    let engine = ready_engine(state)?;
    let Family::Embed(emb) = &engine.family else {
        return Err(ApiError::bad(
            "model",
            format!(
                "{} is a generation model; use POST /v1/completions or POST /v1/chat/completions",
                engine.model
            ),
        ));
    };
    let p = state.profile.borrow().clone();
    let body = read_body(state, body)?;
    let texts = parse_inputs(&body, &p)?;
    let format = parse_format(&body, emb.dim)?;

    // Tokenization is CPU work: keep it off the async workers that serve sockets.
    let tok = emb.tokenizer.clone();
    let limit = p.max_input_tokens.min(emb.max_positions);
    let encoded: Vec<Encoded> = tokio::task::spawn_blocking(move || {
        texts
            .iter()
            .map(|t| encode_within(|x| tok.encode(x), t, limit))
            .collect::<Result<Vec<_>, _>>()
    })
    .await
    .map_err(|e| ApiError::Internal(format!("tokenizer task failed: {e}")))?
    .map_err(|e| ApiError::bad("input", e.to_string()))?;
    let why = if p.max_input_tokens <= emb.max_positions {
        format!("max_input_tokens is {}", p.max_input_tokens)
    } else {
        format!(
            "the model accepts at most {} (its max_seq_length or max_position_embeddings)",
            emb.max_positions
        )
    };
    let mut ids = Vec::with_capacity(encoded.len());
    for (i, e) in encoded.into_iter().enumerate() {
        match e {
            Encoded::Ids(t) if t.len() <= limit => ids.push(t),
            Encoded::Ids(t) => {
                return Err(ApiError::bad(
                    "input",
                    format!("input[{i}] has {} tokens; {why}", t.len()),
                ))
            }
            Encoded::AtLeast(n) => {
                return Err(ApiError::bad(
                    "input",
                    format!("input[{i}] has more than {n} tokens; {why}"),
                ))
            }
        }
    }
    let prompt_tokens: usize = ids.iter().map(|t| t.len()).sum();
    let outcome = emb.service.embed(ids, &p, arrived).await?;
    let data: Vec<Value> = outcome
        .embeddings
        .into_iter()
        .enumerate()
        .map(|(i, v)| json!({"object": "embedding", "index": i, "embedding": format.encode(v)}))
        .collect();
    let body = json!({
        "object": "list",
        "data": data,
        "model": engine.model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    });
    let mut resp = Json(body).into_response();
    let h = resp.headers_mut();
    h.insert("x-queue-time", secs_header(outcome.queue_time));
    h.insert("x-inference-time", secs_header(outcome.inference_time));
    Ok(resp)
}

/// The loaded engine, after the drain check every model route makes (the key was checked
/// before the body was read: [`require_key`]).
fn ready_engine(state: &AppState) -> Result<&Engine, ApiError> {
    if state.draining.load(Ordering::Acquire) {
        return Err(ApiError::Unavailable("server is shutting down".into()));
    }
    state
        .engine
        .get()
        .ok_or_else(|| ApiError::Unavailable("model is loading".into()))
}

/// Seconds with microsecond resolution, e.g. `0.004213`.
pub(crate) fn secs_header(d: std::time::Duration) -> HeaderValue {
    HeaderValue::from_str(&format!("{:.6}", d.as_secs_f64())).expect("digits are a valid header")
}

async fn health(State(state): State<Arc<AppState>>) -> Response {
    if state.draining.load(Ordering::Acquire) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "draining"})),
        )
            .into_response();
    }
    match state.engine.get() {
        Some(e) => {
            Json(json!({"status": "ready", "model": e.model, "devices": e.devices})).into_response()
        }
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "loading"})),
        )
            .into_response(),
    }
}

async fn get_config(State(state): State<Arc<AppState>>) -> Response {
    let p = state.profile.borrow().clone();
    Json(serde_json::to_value(&*p).expect("a Profile serializes")).into_response()
}

async fn put_config(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let r = (|| {
        let patch = read_body(&state, body)?;
        let current = state.profile.borrow().clone();
        let next = current.patched(&patch).map_err(|e| match e {
            ProfileError::RestartRequired(_) => ApiError::Conflict(e.to_string()),
            ProfileError::Invalid(_) => ApiError::InvalidConfig(e.to_string()),
            other => ApiError::BadRequest {
                message: other.to_string(),
                param: None,
            },
        })?;
        tracing::info!(patch = %patch, "profile reloaded");
        state.profile.send_replace(Arc::new(next.clone()));
        Ok::<_, ApiError>(
            Json(serde_json::to_value(&next).expect("a Profile serializes")).into_response(),
        )
    })();
    r.unwrap_or_else(|e| e.into_response())
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_validation_names_the_problem() {
        let p = Profile {
            max_inputs_per_request: 2,
            ..Profile::default()
        };
        let msg = |v: Value| parse_inputs(&v, &p).unwrap_err().to_string();
        assert_eq!(
            parse_inputs(&json!({"input": "hi"}), &p).unwrap(),
            vec!["hi"]
        );
        assert!(msg(json!({})).contains("missing field `input`"));
        assert!(msg(json!({"input": 3})).contains("got a number"));
        assert!(msg(json!({"input": []})).contains("empty array"));
        assert!(msg(json!({"input": ["a", 1]})).contains("input[1] must be a string"));
        assert!(msg(json!({"input": ["a", "b", "c"]}))
            .contains("input has 3 items; max_inputs_per_request is 2"));
        assert!(msg(json!({"input": ["a", " "]})).contains("input[1] is empty"));
        assert!(msg(json!([1])).contains("JSON object"));
    }

    #[test]
    fn base64_is_little_endian_f32_and_odd_formats_are_named() {
        let f = |v: Value| parse_format(&v, 3);
        assert_eq!(f(json!({})).unwrap(), EncodingFormat::Float);
        assert_eq!(
            f(json!({"encoding_format": "base64", "dimensions": 3})).unwrap(),
            EncodingFormat::Base64
        );
        let e = f(json!({"encoding_format": "hex"}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("encoding_format \"hex\""), "{e}");
        let e = f(json!({"dimensions": 2})).unwrap_err().to_string();
        assert!(
            e.contains("dimensions 2") && e.contains("3 dimensions"),
            "{e}"
        );
        // 1.0 = 0x3f800000, -2.0 = 0xc0000000, little-endian: 00 00 80 3f 00 00 00 c0.
        let b = EncodingFormat::Base64.encode(vec![1.0, -2.0]);
        assert_eq!(b, json!("AACAPwAAAMA="));
    }
}
