//! OpenAI-compatible generation routes: `POST /v1/completions` and `POST /v1/chat/completions`,
//! whole responses or SSE streams (`data: {…}` chunks, then `data: [DONE]`).
//!
//! The handler validates and tokenizes, then calls [`GenerateService::submit`]; it waits for the
//! sequence to start before answering, so a request refused or expired in the queue gets a real
//! status (429, 504) rather than a stream that fails, and a streamed response's headers carry
//! `X-Queue-Time`. Dropping the response (a client that disconnects) drops the event receiver,
//! which frees the sequence and its KV at the engine's next step.

use super::error::ApiError;
use super::{read_body, ready_engine, secs_header, type_name, AppState, Family};
use crate::generate::engine::{Finished, GenEvent, GenFailure, GenRequest};
use crate::generate::sampling::SamplingParams;
use crate::generate::GenerateService;
use crate::model::chat::{ChatTemplate, Message};
use crate::model::lm_tokenizer::LmTokenizer;
use crate::model::tokenize::{encode_within, Encoded};
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use profiles::{format_duration, Profile};
use serde_json::{json, Map, Value};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

/// The generation side of a loaded decoder.
pub struct GenEngine {
    /// Prompt and output tokenizer.
    pub tokenizer: Arc<LmTokenizer>,
    /// The model's chat template.
    pub chat: Arc<ChatTemplate>,
    /// The engines behind admission.
    pub service: Arc<GenerateService>,
    /// Longest prompt + output the model accepts.
    pub max_positions: usize,
}

/// Which route a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `/v1/completions`: a prompt string.
    Completion,
    /// `/v1/chat/completions`: messages through the chat template.
    Chat,
}

/// A parsed generation request, before tokenization.
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed {
    /// The prompt text, or the messages to render.
    pub input: Input,
    /// `max_tokens` when given (else the profile's `max_new_tokens`, capped by the context).
    pub max_tokens: Option<usize>,
    /// Sampling parameters.
    pub sampling: SamplingParams,
    /// Stop strings.
    pub stop: Vec<String>,
    /// SSE stream.
    pub stream: bool,
    /// A final usage chunk in the stream.
    pub include_usage: bool,
    /// Generate past EOS (vLLM's extension, for exact output lengths).
    pub ignore_eos: bool,
}

/// What the model is asked.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// A raw prompt.
    Prompt(String),
    /// Chat messages.
    Messages(Vec<Message>),
}

/// Most stop strings per request (OpenAI's limit).
const MAX_STOPS: usize = 4;

fn num(obj: &Map<String, Value>, k: &str, lo: f64, hi: f64) -> Result<Option<f64>, ApiError> {
    match obj.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => {
            let x = n.as_f64().unwrap_or(f64::NAN);
            if (lo..=hi).contains(&x) {
                Ok(Some(x))
            } else {
                Err(ApiError::bad(
                    k,
                    format!("{k} is {x}; it must be between {lo} and {hi}"),
                ))
            }
        }
        Some(other) => Err(ApiError::bad(
            k,
            format!("{k} must be a number, got {}", type_name(other)),
        )),
    }
}

fn boolean(obj: &Map<String, Value>, k: &str) -> Result<bool, ApiError> {
    match obj.get(k) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(ApiError::bad(
            k,
            format!("{k} must be a boolean, got {}", type_name(other)),
        )),
    }
}

/// Validates a request body, naming the first problem's field and limit.
pub fn parse(body: &Value, kind: Kind, p: &Profile) -> Result<Parsed, ApiError> {
    let obj = body.as_object().ok_or_else(|| ApiError::BadRequest {
        message: "body must be a JSON object".into(),
        param: None,
    })?;
    for k in ["tools", "tool_choice", "functions", "function_call"] {
        if obj.get(k).is_some_and(|v| !v.is_null()) {
            return Err(ApiError::bad(k, format!("{k} is not supported")));
        }
    }
    match obj.get("logprobs") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => {}
        Some(_) => return Err(ApiError::bad("logprobs", "logprobs are not supported")),
    }
    if let Some(n) = num(obj, "n", 0.0, f64::MAX)? {
        if n != 1.0 {
            return Err(ApiError::bad(
                "n",
                format!("n is {n}; only n = 1 is supported"),
            ));
        }
    }
    for k in ["presence_penalty", "frequency_penalty"] {
        if num(obj, k, -2.0, 2.0)?.is_some_and(|x| x != 0.0) {
            return Err(ApiError::bad(
                k,
                format!("{k} other than 0 is not supported"),
            ));
        }
    }
    let input = match kind {
        Kind::Completion => Input::Prompt(parse_prompt(obj)?),
        Kind::Chat => Input::Messages(parse_messages(obj)?),
    };
    let key = if kind == Kind::Chat && obj.contains_key("max_completion_tokens") {
        "max_completion_tokens"
    } else {
        "max_tokens"
    };
    let max_tokens = match obj.get(key) {
        None | Some(Value::Null) => None,
        Some(v) => {
            let n = v.as_u64().ok_or_else(|| {
                ApiError::bad(key, format!("{key} must be a whole number ≥ 1, got {v}"))
            })?;
            if n == 0 || n > p.max_new_tokens as u64 {
                return Err(ApiError::bad(
                    key,
                    format!(
                        "{key} is {n}; it must be between 1 and max_new_tokens ({})",
                        p.max_new_tokens
                    ),
                ));
            }
            Some(n as usize)
        }
    };
    let seed = match obj.get("seed") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .or_else(|| v.as_i64().map(|i| i as u64))
                .ok_or_else(|| {
                    ApiError::bad("seed", format!("seed must be an integer, got {v}"))
                })?,
        ),
    };
    let sampling = SamplingParams {
        temperature: num(obj, "temperature", 0.0, 2.0)?.unwrap_or(1.0) as f32,
        top_p: num(obj, "top_p", 0.0, 1.0)?.unwrap_or(1.0) as f32,
        seed,
    };
    if sampling.top_p <= 0.0 {
        return Err(ApiError::bad("top_p", "top_p must be greater than 0"));
    }
    let stop = match obj.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s.clone()),
                other => Err(ApiError::bad(
                    "stop",
                    format!("stop[{i}] must be a string, got {}", type_name(other)),
                )),
            })
            .collect::<Result<_, _>>()?,
        Some(other) => {
            return Err(ApiError::bad(
                "stop",
                format!(
                    "stop must be a string or an array of strings, got {}",
                    type_name(other)
                ),
            ))
        }
    };
    if stop.len() > MAX_STOPS {
        return Err(ApiError::bad(
            "stop",
            format!(
                "stop has {} strings; at most {MAX_STOPS} are allowed",
                stop.len()
            ),
        ));
    }
    if stop.iter().any(|s| s.is_empty()) {
        return Err(ApiError::bad("stop", "stop strings must not be empty"));
    }
    let stream = boolean(obj, "stream")?;
    let include_usage = match obj.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(o)) => boolean(o, "include_usage").map_err(|_| {
            ApiError::bad(
                "stream_options",
                "stream_options.include_usage must be a boolean",
            )
        })?,
        Some(other) => {
            return Err(ApiError::bad(
                "stream_options",
                format!("stream_options must be an object, got {}", type_name(other)),
            ))
        }
    };
    Ok(Parsed {
        input,
        max_tokens,
        sampling,
        stop,
        stream,
        include_usage,
        ignore_eos: boolean(obj, "ignore_eos")?,
    })
}

fn parse_prompt(obj: &Map<String, Value>) -> Result<String, ApiError> {
    let prompt = match obj.get("prompt") {
        None => return Err(ApiError::bad("prompt", "missing field `prompt` (a string)")),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
            a[0].as_str().unwrap_or_default().to_string()
        }
        Some(Value::Array(a)) if a.len() > 1 => {
            return Err(ApiError::bad(
                "prompt",
                format!(
                    "prompt has {} strings; send one prompt per request",
                    a.len()
                ),
            ))
        }
        Some(other) => {
            return Err(ApiError::bad(
                "prompt",
                format!("prompt must be a string, got {}", type_name(other)),
            ))
        }
    };
    if prompt.is_empty() {
        return Err(ApiError::bad("prompt", "prompt is empty"));
    }
    Ok(prompt)
}

fn parse_messages(obj: &Map<String, Value>) -> Result<Vec<Message>, ApiError> {
    let Some(v) = obj.get("messages") else {
        return Err(ApiError::bad(
            "messages",
            "missing field `messages` (an array of {role, content})",
        ));
    };
    let Value::Array(items) = v else {
        return Err(ApiError::bad(
            "messages",
            format!("messages must be an array, got {}", type_name(v)),
        ));
    };
    if items.is_empty() {
        return Err(ApiError::bad(
            "messages",
            "messages is empty; send at least one message",
        ));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let bad = |msg: String| ApiError::bad("messages", format!("messages[{i}]: {msg}"));
            let m = m
                .as_object()
                .ok_or_else(|| bad(format!("must be an object, got {}", type_name(m))))?;
            let role = match m.get("role") {
                Some(Value::String(r)) if ["system", "user", "assistant"].contains(&r.as_str()) => {
                    r.clone()
                }
                Some(Value::String(r)) => {
                    return Err(bad(format!(
                        "role {r:?} is not supported; use system, user or assistant"
                    )))
                }
                Some(other) => return Err(bad(format!("role must be a string, got {}", type_name(other)))),
                None => return Err(bad("missing field `role`".into())),
            };
            let content = match m.get("content") {
                Some(Value::String(s)) => s.clone(),
                // The array form: only text parts.
                Some(Value::Array(parts)) => parts
                    .iter()
                    .enumerate()
                    .map(|(j, part)| {
                        match (part.get("type").and_then(Value::as_str), part.get("text")) {
                            (Some("text"), Some(Value::String(t))) => Ok(t.as_str()),
                            _ => Err(bad(format!(
                                "content[{j}] must be {{\"type\": \"text\", \"text\": …}}; other parts are not supported"
                            ))),
                        }
                    })
                    .collect::<Result<Vec<_>, _>>()?
                    .concat(),
                Some(other) => {
                    return Err(bad(format!("content must be a string, got {}", type_name(other))))
                }
                None => return Err(bad("missing field `content`".into())),
            };
            Ok(Message { role, content })
        })
        .collect()
}

/// `POST /v1/completions`.
pub async fn completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    handle(state, body, Kind::Completion).await
}

/// `POST /v1/chat/completions`.
pub async fn chat(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    handle(state, body, Kind::Chat).await
}

async fn handle(state: Arc<AppState>, body: Result<Bytes, BytesRejection>, kind: Kind) -> Response {
    let arrived = Instant::now();
    let resp = match generate(&state, body, kind, arrived).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    state.metrics.count_status(resp.status().as_u16());
    // A stream's duration is recorded when it ends (see `stream`); here only whole answers.
    if resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        != Some("text/event-stream")
    {
        state
            .metrics
            .request_duration
            .observe(arrived.elapsed().as_secs_f64());
    }
    resp
}

async fn generate(
    state: &Arc<AppState>,
    body: Result<Bytes, BytesRejection>,
    kind: Kind,
    arrived: Instant,
) -> Result<Response, ApiError> {
    let engine = ready_engine(state)?;
    let Family::Generate(g) = &engine.family else {
        return Err(ApiError::bad(
            "model",
            format!(
                "{} is an embeddings model; use POST /v1/embeddings",
                engine.model
            ),
        ));
    };
    let p = state.profile.borrow().clone();
    let body = read_body(state, body)?;
    let req = parse(&body, kind, &p)?;

    // Template rendering and tokenization are CPU work: off the async workers.
    let (tok, chat, input) = (g.tokenizer.clone(), g.chat.clone(), req.input.clone());
    let limit = p.max_input_tokens;
    let prompt = tokio::task::spawn_blocking(move || {
        let text = match input {
            Input::Prompt(t) => t,
            Input::Messages(m) => chat
                .render(&m)
                .map_err(|e| ApiError::bad("messages", e.to_string()))?,
        };
        encode_within(|x| tok.encode(x), &text, limit).map_err(|e| {
            ApiError::bad(
                if kind == Kind::Chat {
                    "messages"
                } else {
                    "prompt"
                },
                e.to_string(),
            )
        })
    })
    .await
    .map_err(|e| ApiError::Internal(format!("tokenizer task failed: {e}")))??;
    let field = if kind == Kind::Chat {
        "messages"
    } else {
        "prompt"
    };
    let prompt = match prompt {
        Encoded::Ids(ids) => ids,
        Encoded::AtLeast(n) => {
            return Err(ApiError::bad(
                field,
                format!(
                    "{field} has more than {n} tokens; max_input_tokens is {}",
                    p.max_input_tokens
                ),
            ))
        }
    };
    if prompt.is_empty() {
        return Err(ApiError::bad(field, format!("{field} has no tokens")));
    }
    if prompt.len() > p.max_input_tokens {
        return Err(ApiError::bad(
            field,
            format!(
                "{field} has {} tokens; max_input_tokens is {}",
                prompt.len(),
                p.max_input_tokens
            ),
        ));
    }
    let room = g.max_positions.saturating_sub(prompt.len());
    if room == 0 {
        return Err(ApiError::bad(
            field,
            format!(
                "{field} has {} tokens; the model's context is {} (max_position_embeddings)",
                prompt.len(),
                g.max_positions
            ),
        ));
    }
    let max_tokens = match req.max_tokens {
        Some(n) if n > room => {
            return Err(ApiError::bad(
                "max_tokens",
                format!(
                    "{field} ({} tokens) + max_tokens ({n}) is {}; the model's context is {}",
                    prompt.len(),
                    prompt.len() + n,
                    g.max_positions
                ),
            ))
        }
        Some(n) => n,
        None => p.max_new_tokens.min(room),
    };
    if prompt.len() + max_tokens > p.kv_cache_tokens {
        return Err(ApiError::bad(
            "max_tokens",
            format!(
                "{field} ({} tokens) + max_tokens ({max_tokens}) is {}; kv_cache_tokens is {}, so it can never start",
                prompt.len(),
                prompt.len() + max_tokens,
                p.kv_cache_tokens
            ),
        ));
    }
    let mut rx = g
        .service
        .submit(
            GenRequest {
                prompt,
                sampling: req.sampling.clone(),
                max_tokens,
                stop: req.stop.clone(),
                ignore_eos: req.ignore_eos,
                arrived,
                deadline: arrived + p.request_timeout,
            },
            &p,
        )
        .await
        .map_err(|e| match e {
            crate::generate::GenerateError::Admission(a) => ApiError::from(a),
            e => ApiError::Unavailable(e.to_string()),
        })?;
    // Wait for the start: queue failures become statuses, and the queue time a header.
    let queue_time = match rx.recv().await {
        Some(GenEvent::Started { queue_time }) => queue_time,
        Some(GenEvent::Failed(f)) => return Err(failure(f, &p)),
        _ => {
            return Err(ApiError::Unavailable(
                "server stopped before starting the request".into(),
            ))
        }
    };
    let meta = Meta {
        id: format!(
            "{}-{:x}",
            if kind == Kind::Chat {
                "chatcmpl"
            } else {
                "cmpl"
            },
            rand::random::<u64>()
        ),
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        model: engine.model.clone(),
        kind,
    };
    if req.stream {
        let mut resp = stream(meta, rx, req.include_usage, state.clone(), arrived).into_response();
        resp.headers_mut()
            .insert("x-queue-time", secs_header(queue_time));
        return Ok(resp);
    }
    let mut text = String::new();
    let done = loop {
        match rx.recv().await {
            Some(GenEvent::Token { delta }) => text.push_str(&delta),
            Some(GenEvent::Done(f)) => break f,
            Some(GenEvent::Failed(f)) => return Err(failure(f, &p)),
            Some(GenEvent::Started { .. }) => {}
            None => {
                return Err(ApiError::Unavailable(
                    "server stopped before finishing the request".into(),
                ))
            }
        }
    };
    let choice = match kind {
        Kind::Completion => {
            json!({"index": 0, "text": text, "finish_reason": done.reason.as_str(), "logprobs": null})
        }
        Kind::Chat => {
            json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": done.reason.as_str(), "logprobs": null})
        }
    };
    let object = if kind == Kind::Chat {
        "chat.completion"
    } else {
        "text_completion"
    };
    let mut resp = Json(json!({
        "id": meta.id,
        "object": object,
        "created": meta.created,
        "model": meta.model,
        "choices": [choice],
        "usage": usage(&done),
    }))
    .into_response();
    let h = resp.headers_mut();
    h.insert("x-queue-time", secs_header(done.queue_time));
    h.insert("x-time-to-first-token", secs_header(done.ttft));
    Ok(resp)
}

struct Meta {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
}

fn usage(f: &Finished) -> Value {
    json!({
        "prompt_tokens": f.prompt_tokens,
        "completion_tokens": f.completion_tokens,
        "total_tokens": f.prompt_tokens + f.completion_tokens,
    })
}

fn failure(f: GenFailure, p: &Profile) -> ApiError {
    match f {
        GenFailure::Expired => ApiError::Timeout(format!(
            "request_timeout ({}) passed while the request waited to start; it was not computed",
            format_duration(p.request_timeout)
        )),
        GenFailure::Step(m) => ApiError::Internal(m),
        GenFailure::Shutdown => ApiError::Unavailable(SHUTDOWN_MESSAGE.into()),
    }
}

/// What a generation cut short by the drain timeout is told (503, or the stream's error event).
const SHUTDOWN_MESSAGE: &str =
    "the server is shutting down and its drain_timeout passed before this generation finished; retry on another replica";

impl Meta {
    /// One SSE chunk with this request's envelope.
    fn chunk(&self, delta: Option<&str>, finish: Option<&str>, first: bool) -> Value {
        let choice = match self.kind {
            Kind::Completion => {
                json!({"index": 0, "text": delta.unwrap_or(""), "finish_reason": finish, "logprobs": null})
            }
            Kind::Chat => {
                let mut d = Map::new();
                if first {
                    d.insert("role".into(), "assistant".into());
                }
                if let Some(t) = delta {
                    d.insert("content".into(), t.into());
                }
                json!({"index": 0, "delta": d, "finish_reason": finish, "logprobs": null})
            }
        };
        let object = if self.kind == Kind::Chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        json!({"id": self.id, "object": object, "created": self.created, "model": self.model, "choices": [choice]})
    }
}

fn sse(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

/// The SSE body: a chunk per token that carries text, a final chunk with `finish_reason` (and
/// this server's `timing`), the usage chunk when asked, then `[DONE]`. An error after the start
/// is sent as an `error` object, OpenAI's way, since the status is already 200.
fn stream(
    meta: Meta,
    rx: mpsc::UnboundedReceiver<GenEvent>,
    include_usage: bool,
    state: Arc<AppState>,
    arrived: Instant,
) -> Response {
    struct S {
        meta: Meta,
        rx: mpsc::UnboundedReceiver<GenEvent>,
        include_usage: bool,
        first: bool,
        done: bool,
        state: Arc<AppState>,
        arrived: Instant,
    }
    let s = S {
        meta,
        rx,
        include_usage,
        first: true,
        done: false,
        state,
        arrived,
    };
    let body = futures_util::stream::unfold(s, |mut s| async move {
        if s.done {
            return None;
        }
        loop {
            let out = match s.rx.recv().await {
                Some(GenEvent::Token { delta }) if delta.is_empty() => continue,
                Some(GenEvent::Token { delta }) => {
                    let b = sse(&s.meta.chunk(Some(&delta), None, s.first));
                    s.first = false;
                    b
                }
                Some(GenEvent::Started { .. }) => continue,
                Some(GenEvent::Done(f)) => {
                    let mut last = s.meta.chunk(None, Some(f.reason.as_str()), s.first);
                    last["timing"] = json!({
                        "queue_time_s": f.queue_time.as_secs_f64(),
                        "time_to_first_token_s": f.ttft.as_secs_f64(),
                    });
                    let mut b = sse(&last).to_vec();
                    if s.include_usage {
                        let mut u = s.meta.chunk(None, None, false);
                        u["choices"] = json!([]);
                        u["usage"] = usage(&f);
                        b.extend_from_slice(&sse(&u));
                    }
                    b.extend_from_slice(b"data: [DONE]\n\n");
                    s.done = true;
                    s.state
                        .metrics
                        .request_duration
                        .observe(s.arrived.elapsed().as_secs_f64());
                    Bytes::from(b)
                }
                Some(GenEvent::Failed(f)) => {
                    let (msg, kind, code) = match f {
                        GenFailure::Step(m) => (m, "server_error", 500),
                        GenFailure::Expired => ("expired".into(), "timeout", 504),
                        GenFailure::Shutdown => (SHUTDOWN_MESSAGE.into(), "unavailable", 503),
                    };
                    s.done = true;
                    Bytes::from(format!(
                        "data: {}\n\ndata: [DONE]\n\n",
                        json!({"error": {"message": msg, "type": kind, "code": code}})
                    ))
                }
                None => {
                    s.done = true;
                    Bytes::from_static(b"data: [DONE]\n\n")
                }
            };
            return Some((Ok::<_, std::convert::Infallible>(out), s));
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(body))
        .expect("static headers are valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_generation_requests_name_the_field_and_limit() {
        let p = Profile {
            max_new_tokens: 64,
            ..Profile::default()
        };
        let msg = |v: Value, k: Kind| parse(&v, k, &p).unwrap_err().to_string();
        let c = Kind::Completion;
        assert!(msg(json!({}), c).contains("missing field `prompt`"));
        assert!(msg(json!({"prompt": ""}), c).contains("prompt is empty"));
        assert!(msg(json!({"prompt": 3}), c).contains("got a number"));
        assert!(msg(json!({"prompt": "a", "max_tokens": 0}), c)
            .contains("max_tokens is 0; it must be between 1 and max_new_tokens (64)"));
        assert!(msg(json!({"prompt": "a", "max_tokens": 65}), c).contains("max_new_tokens (64)"));
        assert!(msg(json!({"prompt": "a", "max_tokens": 1.5}), c).contains("whole number"));
        assert!(msg(json!({"prompt": "a", "n": 2}), c).contains("only n = 1"));
        assert!(msg(json!({"prompt": "a", "logprobs": 2}), c).contains("logprobs"));
        assert!(msg(json!({"prompt": "a", "temperature": 3}), c).contains("between 0 and 2"));
        assert!(msg(json!({"prompt": "a", "stop": [1]}), c).contains("stop[0] must be a string"));
        assert!(
            msg(json!({"prompt": "a", "stream": "yes"}), c).contains("stream must be a boolean")
        );
        let ch = Kind::Chat;
        assert!(msg(json!({"messages": []}), ch).contains("messages is empty"));
        assert!(msg(
            json!({"messages": [{"role": "wizard", "content": "x"}]}),
            ch
        )
        .contains("messages[0]: role \"wizard\" is not supported"));
        assert!(
            msg(json!({"messages": [{"role": "user"}]}), ch).contains("missing field `content`")
        );
        assert!(msg(
            json!({"messages": [{"role": "user", "content": "x"}], "tools": []}),
            ch
        )
        .contains("tools is not supported"));
        let ok = parse(
            &json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                    "max_completion_tokens": 8, "temperature": 0, "stop": "\n",
                    "stream": true, "stream_options": {"include_usage": true}}),
            ch,
            &p,
        )
        .unwrap();
        assert_eq!(ok.max_tokens, Some(8));
        assert_eq!(ok.stop, vec!["\n"]);
        assert!(ok.stream && ok.include_usage);
        assert_eq!(ok.sampling.temperature, 0.0);
    }
}
