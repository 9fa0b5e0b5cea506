//! loadgen against small servers started inside the tests.

use axum::routing::post;
use axum::Router;
use loadgen::schedule::{Arrival, Rate};
use loadgen::workload::{TextOptions, Workload};
use loadgen::{Config, Mode, Report, SendLoop};
use serde_json::Value;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Default)]
struct Seen {
    n: AtomicU64,
    arrivals: Mutex<Vec<Instant>>,
}

/// Serves `handler` on a free port; returns its address.
async fn serve(app: Router) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    addr
}

/// A server that answers every request after `delay`; returns its address.
async fn serve_slow(delay: Duration) -> SocketAddr {
    serve(Router::new().route(
        "/v1/embeddings",
        post(move || async move {
            tokio::time::sleep(delay).await;
            "ok"
        }),
    ))
    .await
}

/// Both open-loop send loops, for the behaviours they must share.
const BOTH: [SendLoop; 2] = [SendLoop::Epoll, SendLoop::Tokio];

fn workload() -> Workload {
    Workload::from_spec("embeddings", &TextOptions::default()).unwrap()
}

fn open(addr: SocketAddr, rps: f64, secs: f64) -> Config {
    let mut c = Config::new(
        format!("http://{addr}"),
        Mode::Open {
            rate: Rate::Fixed(rps),
            arrival: Arrival::Constant,
            max_in_flight: 10_000,
        },
        workload(),
    );
    c.duration = Duration::from_secs_f64(secs);
    c.warmup = Duration::from_millis(500);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn constant_rate_is_achieved_within_one_percent() {
    for how in BOTH {
        constant_rate_with(how).await;
    }
}

async fn constant_rate_with(how: SendLoop) {
    let (addr, seen) = recording().await;
    let mut cfg = open(addr, 400.0, 4.0);
    cfg.send_loop = how;
    let r = loadgen::run(cfg).await.unwrap();
    assert!(
        (r.offered_rps - 400.0).abs() / 400.0 < 0.01,
        "offered {}",
        r.offered_rps
    );
    assert!(
        (r.achieved_rps - 400.0).abs() / 400.0 < 0.01,
        "achieved {}",
        r.achieved_rps
    );
    assert_eq!(r.ok, 1600);
    // The server saw them arrive at that rate too (first to last arrival, warm-up included).
    let a = seen.arrivals.lock().unwrap();
    let span = (*a.last().unwrap() - a[0]).as_secs_f64();
    let server_rate = (a.len() - 1) as f64 / span;
    assert!(
        (server_rate - 400.0).abs() / 400.0 < 0.01,
        "{how:?}: server saw {server_rate:.1}/s"
    );
    assert!(r.send_lag.p50 < 1e-3, "{how:?}: lag p50 {}", r.send_lag.p50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generator_asked_more_than_it_can_send_counts_what_it_left_unsent() {
    for how in BOTH {
        unsent_with(how).await;
    }
}

/// Five million a second from one pacer: 0.2 µs an arrival, where any send costs a system call
/// or more, so the pacer is behind from the start, and its backlog at the end reaches back
/// past the measured phase's start (before, nothing in the phase was counted at all).
async fn unsent_with(how: SendLoop) {
    let addr = serve_slow(Duration::ZERO).await;
    let asked = 5_000_000.0;
    let mut cfg = open(addr, asked, 0.3);
    cfg.mode = Mode::Open {
        rate: Rate::Fixed(asked),
        arrival: Arrival::Constant,
        // High enough that nothing is dropped: dropping costs the pacer next to nothing.
        max_in_flight: 100_000_000,
    };
    cfg.warmup = Duration::from_millis(100);
    cfg.pacers = 1;
    cfg.send_loop = how;
    let r = loadgen::run(cfg).await.unwrap();
    let unsent = r.errors.get("unsent").copied().unwrap_or(0);
    assert!(unsent > 0, "{how:?}: {:?}", r.errors);
    assert!(!r.valid);
    assert!(
        r.invalid_reasons.iter().any(|w| w.contains("never sent")),
        "{how:?}: {:?}",
        r.invalid_reasons
    );
    // Every arrival due in the phase is counted once, sent or not: offered is what was asked.
    assert!(
        (r.offered_rps - asked).abs() / asked < 0.01,
        "{how:?}: offered {}",
        r.offered_rps
    );
    assert!(r.achieved_rps < asked / 10.0, "{how:?}: {}", r.achieved_rps);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_second_stall_shows_in_corrected_latency_not_in_service_time() {
    for how in BOTH {
        stall_with(how).await;
    }
}

async fn stall_with(how: SendLoop) {
    let n = Arc::new(AtomicU64::new(0));
    let addr = serve(Router::new().route(
        "/v1/embeddings",
        post(move || {
            let n = n.clone();
            async move {
                if n.fetch_add(1, Ordering::Relaxed) == 1000 {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                "ok"
            }
        }),
    ))
    .await;
    // One connection: while the server stalls, later requests wait for it at the client, as
    // behind any connection pool. That wait is latency the user sees.
    let mut cfg = open(addr, 400.0, 6.0);
    cfg.connections = Some(1);
    cfg.send_loop = how;
    let r = loadgen::run(cfg).await.unwrap();
    assert_eq!(r.errors.len(), 0, "{how:?}: {:?}", r.errors);
    assert!(
        r.latency.max >= 0.99,
        "{how:?}: corrected max {}",
        r.latency.max
    );
    assert!(r.latency.p999 > 0.5, "corrected p99.9 {}", r.latency.p999);
    assert!(
        r.service.p999 < 0.1,
        "service p99.9 {} hides nothing",
        r.service.p999
    );
    assert!(r.service.p99 < 0.05);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_loop_throughput_is_clients_over_service_time() {
    let addr = serve_slow(Duration::from_millis(20)).await;
    let mut cfg = Config::new(
        format!("http://{addr}"),
        Mode::Closed { concurrency: 8 },
        workload(),
    );
    cfg.duration = Duration::from_secs(3);
    cfg.warmup = Duration::from_millis(300);
    let r = loadgen::run(cfg).await.unwrap();
    let expect = 8.0 / r.service.mean;
    assert!(
        (r.achieved_rps - expect).abs() / expect < 0.05,
        "achieved {} vs N/service {expect}",
        r.achieved_rps
    );
    assert!(r.service.mean >= 0.02);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_counted_by_kind_and_kept_out_of_latency() {
    for how in BOTH {
        errors_with(how).await;
    }
}

async fn errors_with(how: SendLoop) {
    let n = Arc::new(AtomicU64::new(0));
    let addr = serve(Router::new().route(
        "/v1/embeddings",
        post(move || {
            let n = n.clone();
            async move {
                let i = n.fetch_add(1, Ordering::Relaxed);
                if i % 5 == 1 {
                    tokio::time::sleep(Duration::from_secs(3)).await; // past the timeout
                }
                if i % 5 == 2 {
                    return (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "boom");
                }
                (axum::http::StatusCode::OK, "ok")
            }
        }),
    ))
    .await;
    let mut cfg = open(addr, 100.0, 2.0);
    cfg.warmup = Duration::ZERO;
    cfg.timeout = Duration::from_millis(300);
    cfg.send_loop = how;
    let r = loadgen::run(cfg).await.unwrap();
    assert_eq!(
        r.errors.get("status_500"),
        Some(&40),
        "{how:?}: {:?}",
        r.errors
    );
    assert_eq!(
        r.errors.get("timeout"),
        Some(&40),
        "{how:?}: {:?}",
        r.errors
    );
    assert_eq!(r.ok, 120, "{how:?}");
    assert_eq!(r.latency.count, 120, "errors leaked into latency");
    assert!(
        r.latency.max < 0.3,
        "a timed-out request's time leaked into latency: {}",
        r.latency.max
    );
    assert!((r.error_rate - 0.4).abs() < 1e-9);

    // Nobody listens on this port: every request is a connect error.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed = l.local_addr().unwrap();
    drop(l);
    let mut cfg = open(closed, 50.0, 1.0);
    cfg.warmup = Duration::ZERO;
    cfg.send_loop = how;
    let r = loadgen::run(cfg).await.unwrap();
    assert_eq!(
        r.errors.get("connect"),
        Some(&50),
        "{how:?}: {:?}",
        r.errors
    );
    assert_eq!((r.ok, r.latency.count), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_stop_hook_ends_the_run() {
    let addr = serve_slow(Duration::from_millis(50)).await;
    let mut cfg = open(addr, 100.0, 20.0);
    cfg.window = Some(Duration::from_millis(500));
    let target = loadgen::slo::Target::parse("p95<10ms").unwrap();
    cfg.early_stop = Some(Arc::new(move |p| {
        (!target.holds(p)).then(|| format!("{target} missed"))
    }));
    let t0 = Instant::now();
    let r = loadgen::run(cfg).await.unwrap();
    assert!(t0.elapsed() < Duration::from_secs(5), "did not stop early");
    assert!(r.stopped_early.as_deref().unwrap().contains("missed"));
    assert!(r.duration_s < 5.0);
}

/// Checks `v` against the subset of JSON Schema the committed schema uses (type, required,
/// properties, items, additionalProperties, enum, $ref, oneOf).
fn check(schema: &Value, root: &Value, v: &Value, path: &str) -> Result<(), String> {
    if let Some(r) = schema.get("$ref").and_then(|r| r.as_str()) {
        let name = r.trim_start_matches("#/$defs/");
        return check(&root["$defs"][name], root, v, path);
    }
    if let Some(alts) = schema.get("oneOf").and_then(|a| a.as_array()) {
        return if alts
            .iter()
            .filter(|s| check(s, root, v, path).is_ok())
            .count()
            == 1
        {
            Ok(())
        } else {
            Err(format!("{path}: matches no single alternative"))
        };
    }
    if let Some(t) = schema.get("type") {
        let types: Vec<&str> = match t {
            Value::String(s) => vec![s.as_str()],
            Value::Array(a) => a.iter().filter_map(|x| x.as_str()).collect(),
            _ => vec![],
        };
        let ok = types.iter().any(|t| match *t {
            "object" => v.is_object(),
            "array" => v.is_array(),
            "string" => v.is_string(),
            "number" => v.is_number(),
            "integer" => v.is_u64() || v.is_i64(),
            "boolean" => v.is_boolean(),
            "null" => v.is_null(),
            _ => false,
        });
        if !ok {
            return Err(format!("{path}: {v} is not {types:?}"));
        }
    }
    if let Some(e) = schema.get("enum").and_then(|e| e.as_array()) {
        if !e.contains(v) {
            return Err(format!("{path}: {v} not in {e:?}"));
        }
    }
    if let Some(req) = schema.get("required").and_then(|r| r.as_array()) {
        for k in req {
            let k = k.as_str().unwrap();
            if v.get(k).is_none() {
                return Err(format!("{path}: missing `{k}`"));
            }
        }
    }
    if let (Some(props), Some(obj)) = (
        schema.get("properties").and_then(|p| p.as_object()),
        v.as_object(),
    ) {
        for (k, val) in obj {
            match props.get(k) {
                Some(s) => check(s, root, val, &format!("{path}.{k}"))?,
                None if schema.get("additionalProperties").is_none() => {
                    return Err(format!("{path}: `{k}` is not in the schema"))
                }
                None => {}
            }
        }
    }
    if let (Some(ap), Some(obj)) = (schema.get("additionalProperties"), v.as_object()) {
        if ap.is_object() {
            for (k, val) in obj {
                check(ap, root, val, &format!("{path}.{k}"))?;
            }
        }
    }
    if let (Some(items), Some(arr)) = (schema.get("items"), v.as_array()) {
        for (i, x) in arr.iter().enumerate() {
            check(items, root, x, &format!("{path}[{i}]"))?;
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_report_validates_against_the_committed_schema_and_round_trips() {
    let addr = serve(Router::new().route("/v1/embeddings", post(|| async { "ok" }))).await;
    let r = loadgen::run(open(addr, 100.0, 1.0)).await.unwrap();
    let v = serde_json::to_value(&r).unwrap();
    let schema: Value = serde_json::from_str(include_str!("../report.schema.json")).unwrap();
    check(&schema, &schema, &v, "report").unwrap();
    // The check itself can fail: a report without `ok` must be rejected.
    let mut broken = v.clone();
    broken.as_object_mut().unwrap().remove("ok");
    assert!(check(&schema, &schema, &broken, "report").is_err());
    let back: Report = serde_json::from_value(v).unwrap();
    let h = back.latency_hist();
    assert_eq!(h.len(), r.ok);
    assert!(back.hgrm().contains("#[Max"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_responses_record_time_to_first_token_and_gaps() {
    use axum::body::Body;
    // Five chunks 30 ms apart after a 50 ms "prefill": TTFT ≈ 50 ms, gaps ≈ 30 ms.
    let addr = serve(Router::new().route(
        "/v1/completions",
        post(|| async {
            let s = futures_stream();
            axum::response::Response::builder()
                .header("content-type", "text/event-stream")
                .body(Body::from_stream(s))
                .unwrap()
        }),
    ))
    .await;
    let w = Workload::from_spec("completions", &TextOptions::default()).unwrap();
    assert!(w.stream);
    let mut cfg = Config::new(
        format!("http://{addr}"),
        Mode::Open {
            rate: Rate::Fixed(20.0),
            arrival: Arrival::Constant,
            max_in_flight: 1000,
        },
        w,
    );
    cfg.duration = Duration::from_secs(2);
    cfg.warmup = Duration::from_millis(200);
    // The epoll send loop reads responses whole: asked for by name, a stream is refused, and
    // `auto` takes the async one.
    let mut forced = cfg.clone();
    forced.send_loop = SendLoop::Epoll;
    let e = loadgen::run(forced).await.unwrap_err().to_string();
    assert!(e.contains("--send-loop tokio"), "{e}");
    let r = loadgen::run(cfg).await.unwrap();
    assert_eq!(r.errors.len(), 0, "{:?}", r.errors);
    let ttft = r.ttft.expect("streaming stats");
    let itl = r.inter_token.expect("streaming stats");
    assert!(ttft.p50 > 0.045 && ttft.p50 < 0.09, "ttft p50 {}", ttft.p50);
    assert!(itl.p50 > 0.025 && itl.p50 < 0.06, "gap p50 {}", itl.p50);
    assert_eq!(itl.count, 4 * r.ok, "4 gaps per 5-token stream");
    // TPOT = (end - first token) / 4 ≈ 30 ms; output tokens from the usage chunk.
    let tpot = r.tpot.expect("streaming stats");
    assert!(tpot.p50 > 0.025 && tpot.p50 < 0.06, "tpot p50 {}", tpot.p50);
    let per_request = r.output_tokens_per_s.unwrap() / r.achieved_rps;
    assert!(
        (per_request - 5.0).abs() < 1e-9,
        "{per_request} tokens per request"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_ends_in_an_error_event_is_an_error_not_a_success() {
    use axum::body::Body;
    // Every other stream fails after one token, as a generation server reports a failed step
    // once its 200 is sent: an error event, then [DONE].
    let n = Arc::new(AtomicU64::new(0));
    let addr = serve(Router::new().route(
        "/v1/completions",
        post(move || {
            let fail = n.fetch_add(1, Ordering::Relaxed) % 2 == 1;
            async move {
                let mut body =
                    String::from("data: {\"choices\": [{\"index\": 0, \"text\": \" a\"}]}\n\n");
                if fail {
                    body += "data: {\"error\": {\"message\": \"step failed\", \"code\": 500}}\n\n";
                }
                body += "data: [DONE]\n\n";
                axum::response::Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(Body::from(body))
                    .unwrap()
            }
        }),
    ))
    .await;
    let w = Workload::from_spec("completions", &TextOptions::default()).unwrap();
    let mut cfg = open(addr, 50.0, 1.0);
    cfg.workload = w;
    cfg.warmup = Duration::ZERO;
    let r = loadgen::run(cfg).await.unwrap();
    assert_eq!(r.errors.get("stream_error"), Some(&25), "{:?}", r.errors);
    assert_eq!(r.ok, 25);
}

fn futures_stream() -> impl futures_core::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send
{
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        for i in 0..5 {
            if i > 0 {
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
            if tx
                .send(Ok(bytes::Bytes::from(format!(
                    "data: {{\"choices\": [{{\"index\": 0, \"text\": \" t{i}\"}}]}}\n\n"
                ))))
                .await
                .is_err()
            {
                return;
            }
        }
        // The usage chunk and [DONE] carry no text: no token, no gap.
        let tail =
            "data: {\"choices\": [], \"usage\": {\"completion_tokens\": 5}}\n\ndata: [DONE]\n\n";
        let _ = tx.send(Ok(bytes::Bytes::from(tail))).await;
    });
    ReceiverStream(rx)
}

struct ReceiverStream(tokio::sync::mpsc::Receiver<Result<bytes::Bytes, std::io::Error>>);

impl futures_core::Stream for ReceiverStream {
    type Item = Result<bytes::Bytes, std::io::Error>;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.0.poll_recv(cx)
    }
}

/// A server that reads every request but answers only every other one on each connection,
/// closing the connection instead: the dropped request is an `io` error, never resent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_dropped_after_it_was_sent_is_an_io_error_and_never_resent() {
    for how in BOTH {
        dropped_with(how).await;
    }
}

async fn dropped_with(how: SendLoop) {
    let (addr, received) = one_answer_per_connection(None).await;
    let mut cfg = open(addr, 20.0, 1.0);
    cfg.warmup = Duration::ZERO;
    cfg.send_loop = how;
    let r = loadgen::run(cfg).await.unwrap();
    let sent = r.ok + r.errors.values().sum::<u64>();
    assert_eq!(sent, 20, "{how:?}: {:?}", r.errors);
    assert_eq!(
        received.load(Ordering::SeqCst),
        20,
        "{how:?}: the server received a request twice: {:?}",
        r.errors
    );
    assert!(
        r.errors.get("io").copied().unwrap_or(0) > 0,
        "{:?}",
        r.errors
    );
    assert_eq!(r.errors.get("connect"), None, "{:?}", r.errors);
}

/// A server that closes a kept-alive connection soon after answering (an idle timeout, without
/// `Connection: close`): the client must notice the closed idle connection before reusing it,
/// so every request succeeds on a fresh one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_the_server_closed_is_replaced_not_used() {
    for how in BOTH {
        idle_closed_with(how).await;
    }
}

async fn idle_closed_with(how: SendLoop) {
    let (addr, received) = one_answer_per_connection(Some(Duration::from_millis(5))).await;
    let mut cfg = open(addr, 20.0, 1.0);
    cfg.warmup = Duration::ZERO;
    cfg.send_loop = how;
    let r = loadgen::run(cfg).await.unwrap();
    assert_eq!(r.ok, 20, "{how:?}: {:?}", r.errors);
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(received.load(Ordering::SeqCst), 20);
}

/// A server that closes each connection at once after its answer (again without saying so):
/// the close often comes with the answer itself, which the epoll loop reads only up to the
/// answer's end. The connection must not be reused: every request succeeds on a fresh one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_closed_right_after_its_answer_is_not_reused() {
    for how in BOTH {
        let (addr, received) = one_answer_per_connection(Some(Duration::ZERO)).await;
        let mut cfg = open(addr, 100.0, 1.0);
        cfg.warmup = Duration::ZERO;
        cfg.send_loop = how;
        let r = loadgen::run(cfg).await.unwrap();
        assert_eq!(r.ok, 100, "{how:?}: {:?}", r.errors);
        assert!(r.errors.is_empty(), "{how:?}: {:?}", r.errors);
        assert_eq!(received.load(Ordering::SeqCst), 100);
    }
}

/// A raw server that answers the first request on each connection (keep-alive, no
/// `Connection: close`), then either closes the connection `close_after` later, or (`None`)
/// reads the next request and closes without answering it. Returns its address and the count
/// of whole requests it received.
async fn one_answer_per_connection(close_after: Option<Duration>) -> (SocketAddr, Arc<AtomicU64>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let received = Arc::new(AtomicU64::new(0));
    let seen = received.clone();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut answered = false;
                loop {
                    let mut chunk = [0u8; 4096];
                    let n = match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    buf.extend_from_slice(&chunk[..n]);
                    // One whole request: head plus its Content-Length body.
                    let Some(h) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..h]).to_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    if buf.len() < h + 4 + len {
                        continue;
                    }
                    buf.drain(..h + 4 + len);
                    seen.fetch_add(1, Ordering::SeqCst);
                    if answered {
                        return; // accepted, then dropped: close without a byte
                    }
                    answered = true;
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                        .await;
                    if let Some(d) = close_after {
                        // Zero: the close follows the answer at once, without a yield between.
                        if !d.is_zero() {
                            tokio::time::sleep(d).await;
                        }
                        return;
                    }
                }
            });
        }
    });
    (addr, received)
}

/// A server that records when each request arrived.
async fn recording() -> (SocketAddr, Arc<Seen>) {
    let seen = Arc::new(Seen::default());
    let s = seen.clone();
    let addr = serve(Router::new().route(
        "/v1/embeddings",
        post(move || {
            let s = s.clone();
            async move {
                s.n.fetch_add(1, Ordering::Relaxed);
                s.arrivals.lock().unwrap().push(Instant::now());
                "ok"
            }
        }),
    ))
    .await;
    (addr, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_pacers_send_one_poisson_schedule_between_them() {
    let (addr, seen) = recording().await;
    // 300/s: gaps of 3.3 ms, so the server's own scheduling jitter on a test host busy with
    // other tests (a millisecond at times) does not read as clumping (at 1,000/s it once gave
    // a CV of 1.31 in CI-like runs); 1,200 gaps keep the CV's error near ±0.05.
    let mut cfg = open(addr, 300.0, 4.0);
    cfg.mode = Mode::Open {
        rate: Rate::Fixed(300.0),
        arrival: Arrival::Poisson,
        max_in_flight: 10_000,
    };
    cfg.pacers = 3;
    let r = loadgen::run(cfg).await.unwrap();
    assert_eq!(r.errors.len(), 0, "{:?}", r.errors);
    // Every scheduled request arrived once, and the arrivals the server saw are one Poisson
    // stream (inter-arrival CV ≈ 1), not three clumped ones.
    let mut a = seen.arrivals.lock().unwrap().clone();
    assert!(
        a.len() as u64 >= r.scheduled && r.ok == r.scheduled,
        "{} arrivals",
        a.len()
    );
    a.sort();
    let gaps: Vec<f64> = a.windows(2).map(|w| (w[1] - w[0]).as_secs_f64()).collect();
    let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
    let sd = (gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / gaps.len() as f64).sqrt();
    let rate = 1.0 / mean;
    assert!((rate - 300.0).abs() < 18.0, "server saw {rate:.0}/s");
    assert!(
        (0.85..1.15).contains(&(sd / mean)),
        "inter-arrival CV {}",
        sd / mean
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_self_check_is_relative_to_the_latency_it_measures() {
    let (addr, _) = recording().await;
    // A floor of 1 µs: only the relative part (5% of a sub-millisecond p50) applies, and no
    // generator sends within microseconds of its schedule every time.
    let mut cfg = open(addr, 200.0, 1.0);
    cfg.max_lag_p99 = Duration::from_micros(1);
    cfg.lag_fraction = 0.0;
    let r = loadgen::run(cfg.clone()).await.unwrap();
    assert!(!r.valid, "lag p99 {} passed a 1 µs limit", r.send_lag.p99);
    assert!(
        r.invalid_reasons[0].contains("of the latency p50"),
        "{:?}",
        r.invalid_reasons
    );
    // The receive side is checked too: no event loop wakes within 1 µs of its timer, and a
    // response is timestamped by the same loop.
    let recv = r
        .receive_lag
        .as_ref()
        .expect("an open loop reports its receive lag");
    assert!(recv.p99 > 1e-6 && recv.p99 < 0.05, "{recv:?}");
    assert!(
        r.invalid_reasons.iter().any(|x| x.contains("receive lag")),
        "{:?}",
        r.invalid_reasons
    );
    // Allowed as much lag as the latency itself, and no floor: valid against a server that
    // takes 50 ms (a loaded test host's scheduling hiccups stay well inside that).
    let slow = serve_slow(Duration::from_millis(50)).await;
    let mut cfg = open(slow, 200.0, 1.0);
    cfg.max_lag_p99 = Duration::from_micros(1);
    cfg.lag_fraction = 1.0;
    let r = loadgen::run(cfg).await.unwrap();
    assert!(r.valid, "{:?}", r.invalid_reasons);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn started_unix_s_is_the_schedules_origin() {
    let (addr, seen) = recording().await;
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let t0 = Instant::now();
    let mut cfg = open(addr, 2.0, 1.0);
    cfg.warmup = Duration::ZERO;
    let r = loadgen::run(cfg).await.unwrap();
    // A schedule's first send is at its origin (offset 0): the server saw it then, up to the
    // network's microseconds; not one gap later, nor at the report's time.
    let first = seen.arrivals.lock().unwrap()[0];
    let origin_from_server = before + (first - t0).as_secs_f64();
    assert!(
        (r.started_unix_s - origin_from_server).abs() < 0.005,
        "started_unix_s {} vs origin {}",
        r.started_unix_s,
        origin_from_server
    );
}
