//! Integration tests on a real server bound to a free port.

mod common;

use common::*;
use profiles::Profile;
use runtime::model::{self, Backend, LoadedModel, Pending};
use runtime::{ServeOptions, Server};
use serde_json::json;
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

fn vec_of(r: &Resp, i: usize) -> Vec<f32> {
    r.body["data"][i]["embedding"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn minilm_vectors_are_unit_norm_and_padding_invariant() {
    let (server, c) = start(Profile::default()).await;
    let short = "the quick brown fox";
    let long = "a much longer sentence that pads the batch well beyond the short one, with commas, and more words";
    let alone = embed(&c, server.addr, json!({"input": short})).await;
    assert_eq!(alone.status, 200, "{}", alone.text);
    let v = vec_of(&alone, 0);
    assert_eq!(v.len(), 384);
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-4, "norm {norm}");
    assert!(alone.body["usage"]["prompt_tokens"].as_u64().unwrap() > 2);
    assert!(
        alone.headers.contains_key("x-queue-time")
            && alone.headers.contains_key("x-inference-time")
    );

    // One request = one batch here (32 ≥ 3 inputs, all queued together).
    let batch = embed(&c, server.addr, json!({"input": [long, short, long]})).await;
    assert_eq!(batch.status, 200);
    assert_eq!(batch.body["data"][1]["index"], 1);
    let diff = max_abs_diff(&v, &vec_of(&batch, 1));
    assert!(diff < 1e-4, "padded batch changed the vector by {diff}");
    assert!(metric(&c, server.addr, "batchtune_batch_size_inputs_sum").await >= 4.0);

    // What the official openai client asks for by default: base64 of the little-endian f32
    // bytes, the same vector as the float form.
    let b64 = embed(
        &c,
        server.addr,
        json!({"input": short, "encoding_format": "base64", "dimensions": 384}),
    )
    .await;
    assert_eq!(b64.status, 200, "{}", b64.text);
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64.body["data"][0]["embedding"].as_str().unwrap())
        .unwrap();
    let decoded: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert_eq!(decoded.len(), 384);
    let diff = max_abs_diff(&v, &decoded);
    assert!(diff < 1e-4, "base64 vector differs by {diff}");
    let r = embed(&c, server.addr, json!({"input": short, "dimensions": 128})).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.body["error"]["param"], "dimensions");
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_clients_form_batches_larger_than_one() {
    let p = tiny(Profile {
        max_concurrent_batches: 1,
        batch_wait_timeout: Duration::from_millis(20),
        ..Profile::default()
    });
    let (server, c) = start(p).await;
    let mut tasks = Vec::new();
    for i in 0..64 {
        let c = c.clone();
        let addr = server.addr;
        tasks.push(tokio::spawn(async move {
            embed(&c, addr, json!({"input": format!("client {i} says hello")}))
                .await
                .status
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    let inputs = metric(&c, server.addr, "batchtune_batch_size_inputs_sum").await;
    let batches = metric(&c, server.addr, "batchtune_batch_size_inputs_count").await;
    assert_eq!(inputs, 64.0);
    assert!(
        batches < 64.0,
        "64 inputs took {batches} batches: no batching happened"
    );
    assert_eq!(
        metric(&c, server.addr, "batchtune_requests_total{status=\"200\"}").await,
        64.0
    );
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queue_overflow_is_429_and_expiry_is_504() {
    // The first request waits 2s for its batch; the queue (1 input) is then full.
    let p = tiny(Profile {
        max_queue_size: 1,
        batch_wait_timeout: Duration::from_secs(2),
        ..Profile::default()
    });
    let (server, c) = start(p).await;
    let addr = server.addr;
    let c2 = c.clone();
    let first = tokio::spawn(async move { embed(&c2, addr, json!({"input": "first"})).await });
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while metric(&c, addr, "batchtune_queue_depth_inputs").await < 1.0 {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let second = embed(&c, addr, json!({"input": "second"})).await;
    assert_eq!(second.status, 429, "{}", second.text);
    assert!(second.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("max_queue_size = 1"));
    assert_eq!(first.await.unwrap().status, 200);
    stop(server).await;

    // Deadline 50ms, batch wait 1s: the input expires in the queue and is never computed.
    let p = tiny(Profile {
        request_timeout: Duration::from_millis(50),
        batch_wait_timeout: Duration::from_secs(1),
        ..Profile::default()
    });
    let (server, c) = start(p).await;
    let r = embed(&c, server.addr, json!({"input": "too slow"})).await;
    assert_eq!(r.status, 504, "{}", r.text);
    assert!(r.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("request_timeout (50ms)"));
    assert_eq!(
        metric(&c, server.addr, "batchtune_expired_inputs_total").await,
        1.0
    );
    assert_eq!(
        metric(&c, server.addr, "batchtune_batch_size_inputs_count").await,
        0.0,
        "expired input was computed"
    );
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_requests_get_4xx_json_naming_the_problem() {
    let p = tiny(Profile {
        max_inputs_per_request: 4,
        max_input_tokens: 16,
        max_batch_tokens: 64,
        ..Profile::default()
    });
    let server = Server::start(ServeOptions {
        max_body_bytes: 4096,
        ..ServeOptions::new(p, "127.0.0.1:0".parse().unwrap())
    })
    .await
    .unwrap();
    let c = client();
    wait_ready(&c, server.addr).await;
    let a = server.addr;
    let cases: Vec<(String, u16, &str)> = vec![
        ("{\"input\": [".into(), 400, "malformed JSON"),
        (json!({"input": ""}).to_string(), 400, "input[0] is empty"),
        (json!({"input": []}).to_string(), 400, "empty array"),
        (json!({"input": {"a": 1}}).to_string(), 400, "got an object"),
        (
            json!({"input": ["ok", false]}).to_string(),
            400,
            "input[1] must be a string",
        ),
        (
            json!({"input": ["a", "b", "c", "d", "e"]}).to_string(),
            400,
            "input has 5 items; max_inputs_per_request is 4",
        ),
        (
            json!({"input": ["fine", "word ".repeat(40)]}).to_string(),
            400,
            "input[1] has 42 tokens; max_input_tokens is 16",
        ),
        (
            json!({"input": "x".repeat(5000)}).to_string(),
            413,
            "larger than 4096 bytes",
        ),
        (
            json!({"text": "hi"}).to_string(),
            400,
            "missing field `input`",
        ),
    ];
    for (body, status, needle) in cases {
        let r = request(&c, "POST", a, "/v1/embeddings", body.clone()).await;
        assert_eq!(r.status, status, "{body}: {}", r.text);
        let msg = r.body["error"]["message"]
            .as_str()
            .unwrap_or_else(|| panic!("no JSON error for {body}: {}", r.text));
        assert!(msg.contains(needle), "{body}: {msg}");
    }
    let r = request(&c, "GET", a, "/nope", "").await;
    assert_eq!(r.status, 404);
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hot_reload_changes_batch_size_live_and_invalid_reload_keeps_profile() {
    let p = tiny(Profile {
        batch_wait_timeout: Duration::from_millis(30),
        max_concurrent_batches: 1,
        ..Profile::default()
    });
    let (server, c) = start(p).await;
    let a = server.addr;
    let r = request(
        &c,
        "PUT",
        a,
        "/config",
        json!({"max_batch_size": 1}).to_string(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["max_batch_size"], 1);
    let mut tasks = Vec::new();
    for i in 0..8 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            embed(&c, a, json!({"input": format!("text {i}")}))
                .await
                .status
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(
        metric(&c, a, "batchtune_batch_size_inputs_count").await,
        8.0,
        "max_batch_size=1 must give 8 batches"
    );

    let bad = request(
        &c,
        "PUT",
        a,
        "/config",
        json!({"max_batch_size": 0, "batch_wait_timeout": "1ms"}).to_string(),
    )
    .await;
    assert_eq!(bad.status, 422);
    assert!(bad.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("max_batch_size = 0"));
    let restart = request(
        &c,
        "PUT",
        a,
        "/config",
        json!({"model": "synthetic:minilm"}).to_string(),
    )
    .await;
    assert_eq!(restart.status, 409);
    let wrong = request(
        &c,
        "PUT",
        a,
        "/config",
        json!({"max_batch_size": -1}).to_string(),
    )
    .await;
    assert_eq!(wrong.status, 422, "{}", wrong.text);
    assert!(wrong.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("max_batch_size = -1"));
    assert!(restart.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("model"));
    let cfg = request(&c, "GET", a, "/config", "").await;
    assert_eq!(cfg.body["max_batch_size"], 1);
    assert_eq!(cfg.body["batch_wait_timeout"], "30ms");
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api_key_guards_embeddings_and_config() {
    let opts = ServeOptions {
        api_key: Some("s3cret".into()),
        ..ServeOptions::new(tiny(Profile::default()), "127.0.0.1:0".parse().unwrap())
    };
    let server = Server::start(opts).await.unwrap();
    let c = client();
    wait_ready(&c, server.addr).await;
    let r = embed(&c, server.addr, json!({"input": "hi"})).await;
    assert_eq!(r.status, 401);
    let r = request(
        &c,
        "PUT",
        server.addr,
        "/config",
        json!({"max_batch_size": 2}).to_string(),
    )
    .await;
    assert_eq!(r.status, 401);
    let req = hyper::Request::post(format!("http://{}/v1/embeddings", server.addr))
        .header("authorization", "Bearer s3cret")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            json!({"input": "hi"}).to_string(),
        )))
        .unwrap();
    assert_eq!(c.request(req).await.unwrap().status(), 200);
    let with = |name: &str, value: &str, body: bytes::Bytes| {
        hyper::Request::post(format!("http://{}/v1/embeddings", server.addr))
            .header(name, value)
            .body(http_body_util::Full::new(body))
            .unwrap()
    };
    let hi = bytes::Bytes::from(json!({"input": "hi"}).to_string());
    // The scheme is case-insensitive (RFC 9110); X-API-Key works too; a prefix of the key or
    // the key with a byte more does not.
    for (name, value, want) in [
        ("authorization", "bearer s3cret", 200),
        ("authorization", "BEARER s3cret", 200),
        ("x-api-key", "s3cret", 200),
        ("x-api-key", "s3cre", 401),
        ("x-api-key", "s3cret!", 401),
        ("authorization", "Basic s3cret", 401),
        ("x-api-key", "", 401),
    ] {
        let r = c.request(with(name, value, hi.clone())).await.unwrap();
        assert_eq!(r.status(), want, "{name}: {value}");
    }
    // Refused before the body is read: headers announcing 50 MB and no body sent get their
    // 401 at once (a server that read the body first would wait for it).
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        let head = format!(
            "POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nX-API-Key: wrong\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            50 << 20
        );
        s.write_all(head.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; 512];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("401 before the body")
            .unwrap();
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(text.starts_with("HTTP/1.1 401"), "{text}");
    }
    // GET /config and /health stay open; unknown routes are 404, wrong methods 405, both JSON.
    assert_eq!(
        request(&c, "GET", server.addr, "/config", "").await.status,
        200
    );
    let r = request(&c, "GET", server.addr, "/v2/nothing", "").await;
    assert_eq!(r.status, 404, "{}", r.text);
    assert!(r.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("no such route"));
    let r = request(&c, "DELETE", server.addr, "/config", "").await;
    assert_eq!(r.status, 405, "{}", r.text);
    assert!(r.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("not allowed"));
    stop(server).await;

    // An empty key is refused at start.
    let opts = ServeOptions {
        api_key: Some(String::new()),
        ..ServeOptions::new(tiny(Profile::default()), "127.0.0.1:0".parse().unwrap())
    };
    let e = Server::start(opts)
        .await
        .err()
        .expect("an empty key is refused");
    assert!(e.to_string().contains("API key is empty"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_cpu_replicas_share_the_batches() {
    let p = tiny(Profile {
        devices: vec!["cpu".into(), "cpu".into()],
        max_batch_size: 1,
        max_concurrent_batches: 2,
        batch_wait_timeout: Duration::ZERO,
        ..Profile::default()
    });
    let (server, c) = start(p).await;
    let a = server.addr;
    let mut tasks = Vec::new();
    for i in 0..64 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            embed(&c, a, json!({"input": format!("spread me {i}")}))
                .await
                .status
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    let d0 = metric(&c, a, "batchtune_batch_size_inputs_count{device=\"cpu:0\"}").await;
    let d1 = metric(&c, a, "batchtune_batch_size_inputs_count{device=\"cpu:1\"}").await;
    assert_eq!(d0 + d1, 64.0);
    assert!(
        d0 > 0.0 && d1 > 0.0,
        "batches were not spread: cpu:0={d0} cpu:1={d1}"
    );
    stop(server).await;
}

/// A GPU-like replica on the CPU: asks for one pipelined thread, and its launch only records the
/// batch, computing it at `finish` (as a GPU computes after the launch returns). Counts batches
/// launched but not finished, and the threads that drove it.
struct LaunchLater {
    inner: Arc<dyn Backend>,
    outstanding: Arc<AtomicUsize>,
    most_outstanding: Arc<AtomicUsize>,
    threads: Arc<Mutex<HashSet<std::thread::ThreadId>>>,
}

struct Later {
    inner: Arc<dyn Backend>,
    batch: Vec<Vec<u32>>,
    outstanding: Arc<AtomicUsize>,
}

impl Pending for Later {
    fn finish(self: Box<Self>) -> Result<(Vec<Vec<f32>>, usize), runtime::model::BackendError> {
        let refs: Vec<&[u32]> = self.batch.iter().map(|b| b.as_slice()).collect();
        let out = self.inner.launch(&refs).finish();
        self.outstanding.fetch_sub(1, Ordering::SeqCst);
        out
    }
}

impl Backend for LaunchLater {
    fn embed(&self, batch: &[&[u32]]) -> Result<Vec<Vec<f32>>, runtime::model::BackendError> {
        self.inner.embed(batch)
    }

    fn launch(&self, batch: &[&[u32]]) -> Box<dyn Pending> {
        self.threads
            .lock()
            .unwrap()
            .insert(std::thread::current().id());
        let now = self.outstanding.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_outstanding.fetch_max(now, Ordering::SeqCst);
        Box::new(Later {
            inner: self.inner.clone(),
            batch: batch.iter().map(|b| b.to_vec()).collect(),
            outstanding: self.outstanding.clone(),
        })
    }

    fn pipelined(&self) -> bool {
        true
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pipelined_replica_runs_on_one_thread_two_batches_deep() {
    let mut m: LoadedModel =
        model::load("synthetic:tiny", &["cpu".into()], profiles::Dtype::F32).unwrap();
    let inner = m.replicas[0].1.clone();
    let reference = inner.clone();
    let tok = m.tokenizer.clone();
    let (outstanding, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let threads = Arc::new(Mutex::new(HashSet::new()));
    m.replicas[0].1 = Arc::new(LaunchLater {
        inner,
        outstanding: outstanding.clone(),
        most_outstanding: most.clone(),
        threads: threads.clone(),
    });
    let p = tiny(Profile {
        max_batch_size: 4,
        max_concurrent_batches: 4,
        ..Profile::default()
    });
    let (server, c) = start_with(p, m).await;
    let a = server.addr;
    let mut tasks = Vec::new();
    for i in 0..64 {
        let c = c.clone();
        let text = format!("input number {i} {}", "word ".repeat(i % 7));
        tasks.push(tokio::spawn(async move {
            (text.clone(), embed(&c, a, json!({ "input": text })).await)
        }));
    }
    for t in tasks {
        let (text, r) = t.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text);
        // Each answer is its own input's vector, whatever batch carried it.
        let ids = tok.encode(&text).unwrap();
        let want = &reference.embed(&[&ids]).unwrap()[0];
        let got = vec_of(&r, 0);
        let diff = got
            .iter()
            .zip(want)
            .map(|(g, w)| (g - w).abs())
            .fold(0.0f32, f32::max);
        assert!(diff < 1e-4, "{text}: differs by {diff}");
    }
    assert_eq!(
        threads.lock().unwrap().len(),
        1,
        "one thread drives the replica"
    );
    assert_eq!(
        most.load(Ordering::SeqCst),
        2,
        "the next batch is launched before the current one is finished, and no deeper"
    );
    assert_eq!(outstanding.load(Ordering::SeqCst), 0);
    stop(server).await;
}

/// Serves `m` (a model with replicas swapped for test doubles) under `p`, ready for requests.
async fn start_with(p: Profile, m: LoadedModel) -> (Server, HttpClient) {
    let server = Server::start_with_model(ServeOptions::new(p, "127.0.0.1:0".parse().unwrap()), m)
        .await
        .unwrap();
    let c = client();
    wait_ready(&c, server.addr).await;
    (server, c)
}

/// Faults planted in the forward pass through the test hooks (feature `test-hooks`), by a word
/// in the batch: "boom" panics, "fail" returns an error, "oom" returns the error an exhausted
/// device gives, "slow" holds the batch 400 ms; otherwise the real tiny model.
fn planted_faults() -> runtime::hooks::TestHooks {
    runtime::hooks::TestHooks {
        slowdown: 0.0,
        faults: ["boom=panic", "fail=error", "oom=oom", "slow=slow:400ms"]
            .iter()
            .map(|r| r.parse().unwrap())
            .collect(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_faulty_batch_fails_only_its_own_requests() {
    let p = tiny(Profile {
        max_batch_size: 1,
        max_concurrent_batches: 2,
        ..Profile::default()
    });
    let mut o = ServeOptions::new(p, "127.0.0.1:0".parse().unwrap());
    o.hooks = planted_faults();
    let server = Server::start(o).await.unwrap();
    let c = client();
    wait_ready(&c, server.addr).await;
    let a = server.addr;
    let mut tasks = Vec::new();
    for word in [
        "fine",
        "boom",
        "also fine",
        "fail",
        "oom",
        "slow",
        "still fine",
        "more",
    ] {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            (word, embed(&c, a, json!({"input": word})).await)
        }));
    }
    for t in tasks {
        let (word, r) = t.await.unwrap();
        let msg = r.body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .to_string();
        match word {
            "boom" => {
                assert_eq!(r.status, 500);
                assert!(msg.contains("panicked: injected fault"), "{}", r.text);
            }
            "fail" => {
                assert_eq!(r.status, 500);
                assert!(msg.contains("injected error"), "{}", r.text);
            }
            "oom" => {
                assert_eq!(r.status, 500);
                assert!(msg.contains("out of memory"), "{}", r.text);
            }
            _ => assert_eq!(r.status, 200, "{word}: {}", r.text),
        }
    }
    // The worker survives every fault.
    assert_eq!(embed(&c, a, json!({"input": "after"})).await.status, 200);
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hugging_face_folder_loads_and_serves() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_hf_folder(dir.path());
    let p = Profile {
        model: dir.path().display().to_string(),
        ..Profile::default()
    };
    let (server, c) = start(p).await;
    let r = embed(
        &c,
        server.addr,
        json!({"input": ["hello world", "unknownword"]}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(vec_of(&r, 0).len(), 32);
    // [CLS] hello world [SEP] + [CLS] [UNK] [SEP]
    assert_eq!(r.body["usage"]["prompt_tokens"], 7);
    stop(server).await;

    // The folder's sentence-transformers max_seq_length (6 here) is the limit served, below
    // the position table's: 7 tokens are refused, naming the limit, 6 are embedded.
    std::fs::write(
        dir.path().join("sentence_bert_config.json"),
        r#"{"max_seq_length": 6, "do_lower_case": false}"#,
    )
    .unwrap();
    let p = Profile {
        model: dir.path().display().to_string(),
        ..Profile::default()
    };
    let (server, c) = start(p).await;
    let r = embed(
        &c,
        server.addr,
        json!({"input": "hello world hello world hello"}),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert!(
        r.text.contains("has 7 tokens") && r.text.contains("at most 6"),
        "{}",
        r.text
    );
    let r = embed(&c, server.addr, json!({"input": "hello world hello world"})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    stop(server).await;
}

/// A tiny BERT folder: random weights saved with a `bert.` prefix (as BertModel checkpoints from
/// transformers are), a config, and a WordPiece tokenizer.json with a 12-word vocabulary.
fn write_tiny_hf_folder(dir: &std::path::Path) {
    let cfg = json!({
        "vocab_size": 12, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 64, "max_position_embeddings": 64, "type_vocab_size": 2,
        "layer_norm_eps": 1e-12, "hidden_act": "gelu", "model_type": "bert"
    });
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let bc: model::bert::BertConfig = serde_json::from_value(cfg).unwrap();
    let w: std::collections::HashMap<String, candle_core::Tensor> =
        model::synthetic_weights(&bc, 7)
            .into_iter()
            .map(|(k, v)| (format!("bert.{k}"), v))
            .collect();
    candle_core::safetensors::save(&w, dir.join("model.safetensors")).unwrap();
    let vocab = json!({"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "hello": 4, "world": 5, "the": 6, "a": 7, "##s": 8, "fox": 9, ",": 10, ".": 11});
    let tok = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": {"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true, "strip_accents": null, "lowercase": true},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {"type": "BertProcessing", "sep": ["[SEP]", 3], "cls": ["[CLS]", 2]},
        "decoder": null,
        "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##", "max_input_chars_per_word": 100, "vocab": vocab}
    });
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
}

/// The real tiny model, each batch held for `ms` first: a device slower than the drain timeout.
struct Slow {
    inner: Arc<dyn Backend>,
    ms: u64,
}

impl Backend for Slow {
    fn embed(&self, batch: &[&[u32]]) -> Result<Vec<Vec<f32>>, runtime::model::BackendError> {
        std::thread::sleep(Duration::from_millis(self.ms));
        self.inner.embed(batch)
    }
}

/// The shutdown contract: after `shutdown`, new requests get 503 (not a refused connection),
/// every accepted request gets an answer (200 if computed by the drain timeout, else 503; none
/// is closed silently), and the server stops within drain_timeout + 4 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_answers_every_accepted_request_and_refuses_new_ones_with_503() {
    let mut m: LoadedModel =
        model::load("synthetic:tiny", &["cpu".into()], profiles::Dtype::F32).unwrap();
    let inner = m.replicas[0].1.clone();
    m.replicas[0].1 = Arc::new(Slow { inner, ms: 150 });
    let p = tiny(Profile {
        max_batch_size: 1,
        max_concurrent_batches: 1,
        drain_timeout: Duration::from_secs(1),
        ..Profile::default()
    });
    let (server, c) = start_with(p, m).await;
    let a = server.addr;
    // 30 requests of 150 ms each, one at a time: 4.5 s of work against a 1 s drain, all
    // admitted before the shutdown starts.
    let tasks = embed_many(&c, a, 30, "text");
    wait_queued(&c, a, 25.0, Duration::from_secs(10)).await;
    let t0 = std::time::Instant::now();
    server.shutdown();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let late = embed(&c, a, json!({"input": "late"})).await;
    assert_eq!(late.status, 503, "{}", late.text);
    assert!(late.text.contains("shutting down"), "{}", late.text);
    server.wait().await.unwrap();
    let took = t0.elapsed();
    let mut by_status = std::collections::BTreeMap::new();
    for t in tasks {
        *by_status.entry(t.await.unwrap()).or_insert(0) += 1;
    }
    let ok = by_status.get(&200).copied().unwrap_or(0);
    let refused = by_status.get(&503).copied().unwrap_or(0);
    assert_eq!(
        ok + refused,
        30,
        "every accepted request answered: {by_status:?}"
    );
    assert!(ok >= 3 && refused >= 10, "{by_status:?}");
    assert!(took < Duration::from_secs(5), "stopping took {took:?}");
}

/// Connection and read limits: past `max_connections` a new connection gets 503 at once (and
/// the server still serves once one closes); headers that do not arrive in time, and idle
/// keep-alive connections, are closed; a slow body gets 408; a declared body over the limit
/// gets 413 before it is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connection_and_read_limits_hold() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    let opts = ServeOptions {
        max_body_bytes: 1 << 20,
        body_read_timeout: Duration::from_millis(300),
        limits: runtime::http::ConnLimits {
            max_connections: 3,
            header_read_timeout: Duration::from_secs(1),
        },
        ..ServeOptions::new(tiny(Profile::default()), "127.0.0.1:0".parse().unwrap())
    };
    let server = Server::start(opts).await.unwrap();
    let c = client();
    wait_ready(&c, server.addr).await;
    let a = server.addr;
    // Reads what the server sends until it closes (or 5 s pass).
    async fn until_closed(s: &mut TcpStream) -> String {
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).to_string()
    }

    // Three idle connections take every slot (the test client's pooled one is closed by the
    // header read timeout first); the fourth is refused with a 503, not left hanging.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(TcpStream::connect(a).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut fourth = TcpStream::connect(a).await.unwrap();
    let text = until_closed(&mut fourth).await;
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    assert!(text.contains("too many connections"), "{text}");
    // The idle ones are closed by the header read timeout, freeing their slots.
    for s in &mut idle {
        assert_eq!(until_closed(s).await, "", "an idle connection was answered");
    }
    let r = embed(&c, a, json!({"input": "after"})).await;
    assert_eq!(r.status, 200, "{}", r.text);

    // Headers sent a byte at a time, too slowly: closed without a request being served.
    let mut slow = TcpStream::connect(a).await.unwrap();
    for b in b"POST /v1/embeddings HTTP/1.1\r\nHost: x" {
        if slow.write_all(&[*b]).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    let text = until_closed(&mut slow).await;
    assert!(!text.contains("200 OK"), "{text}");

    // A body that stalls: 408 once the body read timeout passes.
    let mut stall = TcpStream::connect(a).await.unwrap();
    stall
        .write_all(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"input\"")
        .await
        .unwrap();
    let text = until_closed(&mut stall).await;
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("body-read-timeout"), "{text}");

    // A declared body over the limit: 413 before any of it is sent.
    let mut big = TcpStream::connect(a).await.unwrap();
    big.write_all(
        format!(
            "POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            2 << 20
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(5), big.read(&mut buf))
        .await
        .expect("413 before the body")
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    stop(server).await;
}
