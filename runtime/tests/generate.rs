//! Generation over real HTTP: a real server on a free port, the tiny synthetic decoder (or the
//! real SmolLM2 GGUF when `models/` has it), OpenAI-style requests.

mod common;

use common::*;
use profiles::{Profile, Scheduling};
use runtime::generate::engine::Overlap;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

fn llm(p: Profile) -> Profile {
    Profile {
        model: "synthetic:llama-tiny".into(),
        ..p
    }
}

/// A server whose engine overlaps steps as `overlap` says. On the CPU `auto` means off, so the
/// tests that matter run both ways: `on` is the GPU's path (decodes reading their tokens on
/// the device, tokens read a step late).
async fn start_overlap(p: Profile, overlap: Overlap) -> (runtime::Server, HttpClient) {
    let mut o = runtime::ServeOptions::new(p, "127.0.0.1:0".parse().unwrap());
    o.overlap = overlap;
    start_with(o).await
}

async fn complete(c: &HttpClient, a: std::net::SocketAddr, body: Value) -> Resp {
    request(c, "POST", a, "/v1/completions", body.to_string()).await
}

fn text(r: &Resp) -> String {
    r.body["choices"][0]["text"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn greedy_output_is_the_same_alone_and_under_continuous_batching() {
    let off = greedy_alone_and_together(Overlap::Off).await;
    let on = greedy_alone_and_together(Overlap::On).await;
    assert_eq!(on, off, "overlapped steps changed a greedy output");
}

/// The probe's greedy text, checked equal alone and among others joining and leaving.
async fn greedy_alone_and_together(overlap: Overlap) -> String {
    let (server, c) = start_overlap(
        llm(Profile {
            max_batch_size: 8,
            batch_wait_timeout: Duration::ZERO,
            ..Profile::default()
        }),
        overlap,
    )
    .await;
    let a = server.addr;
    let probe =
        json!({"prompt": "the quick brown fox jumps over", "max_tokens": 24, "temperature": 0});
    let alone = complete(&c, a, probe.clone()).await;
    assert_eq!(alone.status, 200, "{}", alone.text);
    assert_eq!(alone.body["usage"]["completion_tokens"], 24);
    // The same request among others that join and leave at different steps.
    let mut others = Vec::new();
    for i in 0..6usize {
        let c = c.clone();
        let words = "lorem ipsum dolor sit amet ".repeat(i + 1);
        others.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(3 * i as u64)).await;
            // Seeded rows are sampled on the host, and a step holding one does not overlap:
            // only the first is seeded, so most steps draw every row on the device.
            let body = match i {
                0 => json!({"prompt": words, "max_tokens": 4, "temperature": 0.8, "seed": 1}),
                _ => json!({"prompt": words, "max_tokens": 4 + 7 * i, "temperature": 0.8}),
            };
            complete(&c, a, body).await.status
        }));
    }
    let together = complete(&c, a, probe).await;
    for o in others {
        assert_eq!(o.await.unwrap(), 200);
    }
    assert_eq!(text(&together), text(&alone));
    // Several sequences shared steps (otherwise this test proves nothing).
    let steps = metric(&c, a, "batchtune_step_sequences_count").await;
    let seqs = metric(&c, a, "batchtune_step_sequences_sum").await;
    assert!(
        seqs / steps > 1.5,
        "{overlap:?}: mean sequences per step {}",
        seqs / steps
    );
    stop(server).await;
    text(&alone)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stop_strings_and_max_tokens_end_exactly() {
    for overlap in [Overlap::Off, Overlap::On] {
        stop_strings_and_max_tokens(overlap).await;
    }
}

async fn stop_strings_and_max_tokens(overlap: Overlap) {
    let (server, c) = start_overlap(llm(Profile::default()), overlap).await;
    let a = server.addr;
    let full = complete(
        &c,
        a,
        json!({"prompt": "one two three", "max_tokens": 20, "temperature": 0}),
    )
    .await;
    let full_text = text(&full);
    assert_eq!(full.body["choices"][0]["finish_reason"], "length");
    assert_eq!(full.body["usage"]["completion_tokens"], 20);
    // Stop at the sixth word: the output is exactly what came before it.
    let words: Vec<&str> = full_text.split_inclusive(' ').collect();
    let cut: usize = words[..6].iter().map(|w| w.len()).sum();
    let stop_word = full_text[cut..].split(' ').find(|w| !w.is_empty()).unwrap();
    let at = full_text.find(stop_word).unwrap();
    let stopped = complete(
        &c,
        a,
        json!({"prompt": "one two three", "max_tokens": 20, "temperature": 0, "stop": [stop_word]}),
    )
    .await;
    assert_eq!(text(&stopped), full_text[..at]);
    assert_eq!(stopped.body["choices"][0]["finish_reason"], "stop");
    // The stop string is found by the engine's output stage, which answers at once and has the
    // engine retire the sequence: nothing stays running, and it is counted once, as a stop.
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&c, a, "batchtune_running_sequences").await > 0.0 {
        assert!(Instant::now() < deadline, "the stopped sequence still runs");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ended = |reason: &'static str| {
        let c = c.clone();
        async move {
            let key = format!("batchtune_generations_finished_total{{reason=\"{reason}\"}}");
            metric(&c, a, &key).await
        }
    };
    assert_eq!(ended("stop").await, 1.0);
    assert_eq!(ended("length").await, 1.0);
    assert_eq!(ended("cancelled").await, 0.0);
    let short = complete(
        &c,
        a,
        json!({"prompt": "one two three", "max_tokens": 7, "temperature": 0}),
    )
    .await;
    assert_eq!(short.body["usage"]["completion_tokens"], 7);
    assert!(full_text.starts_with(&text(&short)));
    // The stream carries the same text, then [DONE].
    let streamed = request(
        &c,
        "POST",
        a,
        "/v1/completions",
        json!({"prompt": "one two three", "max_tokens": 20, "temperature": 0, "stream": true,
               "stream_options": {"include_usage": true}})
        .to_string(),
    )
    .await;
    assert_eq!(streamed.status, 200);
    let mut joined = String::new();
    let mut usage = Value::Null;
    let events: Vec<&str> = streamed
        .text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"));
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).unwrap();
        if let Some(t) = v["choices"][0]["text"].as_str() {
            joined.push_str(t);
        }
        if !v["usage"].is_null() {
            usage = v["usage"].clone();
        }
    }
    assert_eq!(joined, full_text);
    assert_eq!(usage["completion_tokens"], 20);
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_disconnects_frees_its_sequence_and_kv() {
    for overlap in [Overlap::Off, Overlap::On] {
        disconnect_frees(overlap).await;
    }
}

async fn disconnect_frees(overlap: Overlap) {
    let (server, c) = start_overlap(
        llm(Profile {
            max_new_tokens: 2000,
            ..Profile::default()
        }),
        overlap,
    )
    .await;
    let a = server.addr;
    {
        use http_body_util::BodyExt;
        let req = hyper::Request::post(format!("http://{a}/v1/completions"))
            .body(http_body_util::Full::new(bytes::Bytes::from(
                json!({"prompt": "go on forever", "max_tokens": 2000, "stream": true, "ignore_eos": true})
                    .to_string(),
            )))
            .unwrap();
        let mut resp = c.request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        // Read one chunk, then drop the response (and its connection).
        let _ = resp.body_mut().frame().await;
        assert!(metric(&c, a, "batchtune_kv_cache_tokens_used").await > 0.0);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let kv = metric(&c, a, "batchtune_kv_cache_tokens_used").await;
        let running = metric(&c, a, "batchtune_running_sequences").await;
        if kv == 0.0 && running == 0.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{overlap:?}: KV still held: {kv} tokens, {running} running"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cancelled = metric(
        &c,
        a,
        "batchtune_generations_finished_total{reason=\"cancelled\"}",
    )
    .await;
    assert_eq!(cancelled, 1.0);
    let out = metric(&c, a, "batchtune_output_tokens_total").await;
    assert!(out < 2000.0, "the sequence ran to the end ({out} tokens)");
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_never_exceeds_the_kv_budget_and_loses_nothing() {
    for overlap in [Overlap::Off, Overlap::On] {
        burst_within_kv(overlap).await;
    }
}

async fn burst_within_kv(overlap: Overlap) {
    // Each request reserves prompt + 40 ≤ 50 tokens: a 200-token budget runs at most 4 at once
    // (the running cap, 16, would allow more).
    let (server, c) = start_overlap(
        llm(Profile {
            max_batch_size: 16,
            kv_cache_tokens: 200,
            batch_wait_timeout: Duration::ZERO,
            ..Profile::default()
        }),
        overlap,
    )
    .await;
    let a = server.addr;
    let mut all = Vec::new();
    for i in 0..20 {
        let c = c.clone();
        all.push(tokio::spawn(async move {
            let body = json!({"prompt": format!("request number {i} says"), "max_tokens": 40, "ignore_eos": true});
            complete(&c, a, body).await
        }));
    }
    for r in all {
        let r = r.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.body["usage"]["completion_tokens"], 40);
    }
    let steps = metric(&c, a, "batchtune_step_sequences_count").await;
    let at_most_4 = metric(&c, a, "batchtune_step_sequences_bucket{le=\"4.0\",").await;
    assert!(steps > 0.0);
    assert_eq!(
        at_most_4, steps,
        "{overlap:?}: a step ran more than 4 sequences"
    );
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn static_scheduling_serves_whole_batches() {
    let (server, c) = start(llm(Profile {
        max_batch_size: 4,
        scheduling: Scheduling::Static,
        batch_wait_timeout: Duration::from_millis(20),
        ..Profile::default()
    }))
    .await;
    let a = server.addr;
    let mut all = Vec::new();
    for i in 0..8 {
        let c = c.clone();
        all.push(tokio::spawn(async move {
            complete(
                &c,
                a,
                json!({"prompt": format!("static {i}"), "max_tokens": 3 + i, "ignore_eos": true}),
            )
            .await
            .status
        }));
    }
    for r in all {
        assert_eq!(r.await.unwrap(), 200);
    }
    stop(server).await;
}

/// Padded scheduling computes what HF `generate` computes: a group's finished sequences stay
/// as padding rows until its longest ends; static drops them at once. The rows each mode ran
/// are counted exactly (one group of 4 gathered by the batch wait, one prefill step, then
/// decodes), and the padding rows change no live sequence's tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn padded_scheduling_computes_finished_rows_until_the_group_ends() {
    let mut texts = Vec::new();
    for (mode, rows, overlap) in [
        (Scheduling::Static, 4 + 1 + 1 + 1 + 11, Overlap::Off),
        (Scheduling::Padded, 4 + 4 * 11, Overlap::Off),
        // Overlapped, a sequence ending by length is known a step ahead and not computed
        // again; padded scheduling never overlaps (HF `generate` reads each step's tokens).
        (Scheduling::Static, 4 + 1 + 1 + 1 + 11, Overlap::On),
        (Scheduling::Padded, 4 + 4 * 11, Overlap::On),
    ] {
        let (server, c) = start_overlap(
            llm(Profile {
                max_batch_size: 4,
                scheduling: mode,
                batch_wait_timeout: Duration::from_secs(5),
                ..Profile::default()
            }),
            overlap,
        )
        .await;
        let a = server.addr;
        let mut all = Vec::new();
        for (i, n) in [2, 2, 2, 12].into_iter().enumerate() {
            let c = c.clone();
            all.push(tokio::spawn(async move {
                let body = json!({"prompt": format!("padded {i}"), "max_tokens": n, "temperature": 0, "ignore_eos": true});
                complete(&c, a, body).await
            }));
        }
        let mut got = Vec::new();
        for r in all {
            let r = r.await.unwrap();
            assert_eq!(r.status, 200, "{}", r.text);
            got.push(text(&r));
        }
        texts.push(got);
        let ran = metric(&c, a, "batchtune_step_sequences_sum").await;
        assert_eq!(ran, rows as f64, "{mode:?}, {overlap:?}: rows computed");
        stop(server).await;
    }
    for t in &texts[1..] {
        assert_eq!(*t, texts[0]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_generation_requests_get_400s_naming_the_field() {
    let (server, c) = start(llm(Profile {
        max_input_tokens: 16,
        max_new_tokens: 64,
        kv_cache_tokens: 40,
        ..Profile::default()
    }))
    .await;
    let a = server.addr;
    let chat = |body: Value| {
        let c = c.clone();
        async move { request(&c, "POST", a, "/v1/chat/completions", body.to_string()).await }
    };
    let cases: Vec<(Resp, &str, &str)> = vec![
        (
            chat(json!({"messages": []})).await,
            "messages",
            "messages is empty",
        ),
        (
            chat(json!({"messages": [{"role": "tool", "content": "x"}]})).await,
            "messages",
            "role \"tool\" is not supported",
        ),
        (
            chat(json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0})).await,
            "max_tokens",
            "max_tokens is 0",
        ),
        (
            chat(json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 65})).await,
            "max_tokens",
            "max_new_tokens (64)",
        ),
        (
            complete(&c, a, json!({"prompt": "word ".repeat(40)})).await,
            "prompt",
            "prompt has 40 tokens; max_input_tokens is 16",
        ),
        (
            complete(&c, a, json!({"prompt": "a b c", "max_tokens": 60})).await,
            "max_tokens",
            "kv_cache_tokens is 40",
        ),
        (
            complete(&c, a, json!({"prompt": ["a", "b"]})).await,
            "prompt",
            "one prompt per request",
        ),
        (
            complete(&c, a, json!({"prompt": "a", "temperature": "hot"})).await,
            "temperature",
            "must be a number",
        ),
        (
            request(
                &c,
                "POST",
                a,
                "/v1/embeddings",
                json!({"input": "x"}).to_string(),
            )
            .await,
            "model",
            "is a generation model",
        ),
    ];
    for (r, param, msg) in cases {
        assert_eq!(r.status, 400, "{}", r.text);
        assert_eq!(r.body["error"]["param"], param, "{}", r.text);
        let m = r.body["error"]["message"].as_str().unwrap();
        assert!(m.contains(msg), "{m:?} lacks {msg:?}");
    }
    // A malformed body is a 400 too, and the server still serves afterwards.
    let r = request(&c, "POST", a, "/v1/completions", "{not json").await;
    assert_eq!(r.status, 400);
    let ok = complete(&c, a, json!({"prompt": "still here", "max_tokens": 2})).await;
    assert_eq!(ok.status, 200);
    stop(server).await;
}

/// The real SmolLM2-135M-Instruct GGUF, when `scripts/fetch-smollm2.sh` has put it in `models/`.
fn smollm2() -> Option<String> {
    let p = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../models/SmolLM2-135M-Instruct.Q4_1.gguf"
    );
    if std::path::Path::new(p).is_file() {
        Some(p.to_string())
    } else {
        eprintln!("skipped: {p} is absent (scripts/fetch-smollm2.sh fetches it)");
        None
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn real_smollm2_knows_paris_and_chats() {
    let Some(path) = smollm2() else {
        return;
    };
    let (server, c) = start(Profile {
        model: path,
        ..Profile::default()
    })
    .await;
    let a = server.addr;
    let r = complete(
        &c,
        a,
        json!({"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}),
    )
    .await;
    assert!(text(&r).starts_with(" Paris"), "{}", r.text);
    let r = request(
        &c,
        "POST",
        a,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "What is the capital of France?"}],
               "max_tokens": 30, "temperature": 0})
        .to_string(),
    )
    .await;
    let answer = r.body["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(answer.contains("Paris"), "{answer}");
    // The chat template's end-of-turn token ends the answer before max_tokens.
    assert_eq!(r.body["choices"][0]["finish_reason"], "stop", "{}", r.text);
    stop(server).await;
}

#[test]
fn real_smollm2_perplexity_is_tens_not_thousands() {
    let Some(path) = smollm2() else {
        return;
    };
    let m = runtime::model::lm::load(&path, &["cpu".into()], profiles::Dtype::F32).unwrap();
    let text = "The city of Paris is the capital of France. It is known for the Eiffel Tower, \
                its museums, and its cafes. Every year, millions of tourists visit the city to \
                see its famous landmarks and enjoy French food.";
    let ids = m.tokenizer.encode(text).unwrap();
    let (nll, n) = m.replicas[0].1.nll(&ids).unwrap();
    let ppl = (nll / n as f64).exp();
    eprintln!("SmolLM2-135M-Instruct Q4_1 perplexity {ppl:.1} over {n} tokens");
    assert!(ppl > 1.0 && ppl < 100.0, "perplexity {ppl}");
    // Random weights, same shape: thousands.
    let s = runtime::model::lm::load(
        "synthetic:smollm2-135m",
        &["cpu".into()],
        profiles::Dtype::F32,
    )
    .unwrap();
    let (nll, n) = s.replicas[0].1.nll(&ids).unwrap();
    let random = (nll / n as f64).exp();
    assert!(random > 1000.0, "random-weight perplexity {random}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn loadgen_measures_tokens_from_the_sse_stream() {
    use loadgen::slo::{GoodputLimits, Target};
    use loadgen::workload::{Lengths, TextOptions, Workload};
    use loadgen::{Config, Mode};
    let (server, _c) = start(llm(Profile {
        max_batch_size: 4,
        ..Profile::default()
    }))
    .await;
    let o = TextOptions {
        output_tokens: Lengths::Uniform(8, 16),
        ignore_eos: true,
        ..TextOptions::default()
    };
    let w = Workload::from_spec("chat", &o).unwrap();
    assert!(w.stream);
    let mut cfg = Config::new(
        format!("http://{}", server.addr),
        Mode::Closed { concurrency: 4 },
        w,
    );
    cfg.duration = Duration::from_secs(3);
    cfg.warmup = Duration::from_millis(500);
    let targets = [
        Target::parse("ttft_p95<10s").unwrap(),
        Target::parse("p95<60s").unwrap(),
    ];
    cfg.goodput = GoodputLimits::from_targets(&targets);
    let r = loadgen::run(cfg).await.unwrap();
    assert!(r.ok > 0 && r.errors.is_empty(), "{}", r.summary());
    let (ttft, tpot, itl) = (
        r.ttft.clone().unwrap(),
        r.tpot.clone().unwrap(),
        r.inter_token.clone().unwrap(),
    );
    // Token timings are real and ordered: the first token comes before the end, and a token
    // gap is shorter than a whole request.
    assert!(
        ttft.p50 > 0.0 && ttft.p50 < r.latency.p50,
        "{}",
        r.summary()
    );
    assert!(tpot.p50 > 0.0 && itl.p50 > 0.0 && itl.p50 < r.latency.p50);
    // Output tokens/s counts the server's usage: 8..16 tokens per request.
    let per_request = r.output_tokens_per_s.unwrap() / r.achieved_rps;
    assert!(
        (8.0..=16.0).contains(&per_request),
        "{per_request} tokens per request"
    );
    assert!(r.goodput_rps.unwrap() <= r.achieved_rps + 1e-9);
    assert!(Target::parse("ttft_p95<10s").unwrap().holds(&r));
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_cpu_replicas_share_the_sequences() {
    let (server, c) = start(llm(Profile {
        devices: vec!["cpu".into(), "cpu".into()],
        max_batch_size: 4,
        ..Profile::default()
    }))
    .await;
    let a = server.addr;
    let mut all = Vec::new();
    for i in 0..8 {
        let c = c.clone();
        all.push(tokio::spawn(async move {
            complete(
                &c,
                a,
                json!({"prompt": format!("replica {i}"), "max_tokens": 12, "ignore_eos": true}),
            )
            .await
            .status
        }));
    }
    for r in all {
        assert_eq!(r.await.unwrap(), 200);
    }
    // Sequences go to the replica with fewer: both ran steps.
    for d in ["cpu:0", "cpu:1"] {
        let steps = metric(
            &c,
            a,
            &format!("batchtune_engine_steps_total{{device=\"{d}\"}}"),
        )
        .await;
        assert!(steps > 0.0, "{d} ran no step");
    }
    stop(server).await;
}

/// The shutdown contract for generation: sequences still running or waiting when the drain
/// timeout passes are answered 503 (a stream ends with an error event saying so, then
/// [DONE]); none is closed silently; a request after the shutdown began gets 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_answers_running_and_waiting_generations_with_503() {
    for overlap in [Overlap::Off, Overlap::On] {
        shutdown_answers(overlap).await;
    }
}

async fn shutdown_answers(overlap: Overlap) {
    let (server, c) = start_overlap(
        llm(Profile {
            max_new_tokens: 2000,
            max_batch_size: 1,
            drain_timeout: Duration::from_millis(300),
            ..Profile::default()
        }),
        overlap,
    )
    .await;
    let a = server.addr;
    let long = json!({"prompt": "go on forever", "max_tokens": 2000, "ignore_eos": true});
    let mut streamed = long.clone();
    streamed["stream"] = json!(true);
    let stream = {
        let c = c.clone();
        tokio::spawn(async move {
            request(&c, "POST", a, "/v1/completions", streamed.to_string()).await
        })
    };
    let mut waiting = Vec::new();
    for _ in 0..8 {
        let (c, body) = (c.clone(), long.clone());
        waiting.push(tokio::spawn(async move { complete(&c, a, body).await }));
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(&c, a, "batchtune_waiting_sequences").await < 8.0 {
        assert!(Instant::now() < deadline, "requests never queued");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.shutdown();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let late = complete(&c, a, json!({"prompt": "late", "max_tokens": 2})).await;
    assert_eq!(late.status, 503, "{}", late.text);
    server.wait().await.unwrap();
    let mut refused = 0;
    for w in waiting {
        let r = w.await.unwrap();
        assert!(
            r.status == 200 || r.status == 503,
            "{}: {}",
            r.status,
            r.text
        );
        if r.status == 503 {
            assert!(r.text.contains("shutting down"), "{}", r.text);
            refused += 1;
        }
    }
    assert!(refused >= 4, "{refused} of 8 waiting requests refused");
    // The stream either started (200, then cut with an error event) or was still waiting (503
    // before any byte, as a queued request is answered).
    let s = stream.await.unwrap();
    assert!(s.status == 200 || s.status == 503, "{}", s.status);
    if s.status == 200 {
        assert!(s.text.trim_end().ends_with("data: [DONE]"), "{}", s.text);
    }
    if s.status == 503 || s.text.contains("\"error\"") {
        assert!(
            s.text.contains("shutting down") && s.text.contains("503"),
            "{}",
            s.text
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_faulty_step_fails_only_its_own_sequences_and_the_engine_goes_on() {
    for overlap in [Overlap::Off, Overlap::On] {
        faulty_steps(overlap).await;
    }
}

async fn faulty_steps(overlap: Overlap) {
    // One sequence per step, so a planted fault meets only the request that carries its word.
    let p = llm(Profile {
        max_batch_size: 1,
        ..Profile::default()
    });
    let mut o = runtime::ServeOptions::new(p, "127.0.0.1:0".parse().unwrap());
    o.overlap = overlap;
    o.hooks.faults = ["boom=panic", "fail=error", "oom=oom", "slow=slow:300ms"]
        .iter()
        .map(|r| r.parse().unwrap())
        .collect();
    let server = runtime::Server::start(o).await.unwrap();
    let c = client();
    wait_ready(&c, server.addr).await;
    let a = server.addr;
    let mut tasks = Vec::new();
    for prompt in ["fine", "boom", "also fine", "fail", "oom", "slow", "more"] {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let body = json!({"prompt": prompt, "max_tokens": 4});
            (prompt, complete(&c, a, body).await)
        }));
    }
    for t in tasks {
        let (prompt, r) = t.await.unwrap();
        let msg = r.body["error"]["message"].as_str().unwrap_or("");
        match prompt {
            "boom" => assert!(r.status == 500 && msg.contains("panicked"), "{}", r.text),
            "fail" => assert!(r.status == 500 && msg.contains("injected"), "{}", r.text),
            "oom" => assert!(
                r.status == 500 && msg.contains("out of memory"),
                "{}",
                r.text
            ),
            _ => assert_eq!(r.status, 200, "{overlap:?}, {prompt}: {}", r.text),
        }
    }
    // Nothing leaked: no sequence left running or waiting (the gauges are published by the
    // engine's next pass, so poll), and the engine still serves.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = metric(&c, a, "batchtune_running_sequences").await
            + metric(&c, a, "batchtune_waiting_sequences").await;
        if left == 0.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{left} sequences left after the faults"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = complete(&c, a, json!({"prompt": "after", "max_tokens": 2})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    stop(server).await;
}
