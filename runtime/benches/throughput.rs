//! Raw backend throughput vs served throughput, on this machine.
//!
//! Raw: back-to-back forwards of the model at batch sizes 1..64 (inputs/s, tokens/s). Served: the
//! same model behind the HTTP server with `max_batch_size` = b, driven by loadgen's closed loop
//! with 2·b clients so a full batch is always waiting, each request carrying one input of the
//! same length. The ratio served ÷ raw is the serving overhead (HTTP, JSON, queueing, batching).
//!
//! Run: `cargo bench -p runtime --bench throughput [-- --model synthetic:minilm --seconds 5]`.
//! Writes `results/runtime-throughput.json` and `results/runtime-throughput.md`.

use loadgen::workload::Workload;
use loadgen::{Config, Mode};
use profiles::Profile;
use runtime::{ServeOptions, Server};
use std::time::{Duration, Instant};

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_string())
}

fn main() -> anyhow::Result<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(()); // `cargo test --benches` probes with --list
    }
    let model = arg("--model", "synthetic:minilm");
    let seconds: f64 = arg("--seconds", "5").parse()?;
    let sizes: Vec<usize> = arg("--sizes", "1,2,4,8,16,32,64")
        .split(',')
        .map(|s| s.parse())
        .collect::<Result<_, _>>()?;
    let words: f64 = arg("--words", "24").parse()?;
    let out = arg(
        "--out",
        concat!(env!("CARGO_MANIFEST_DIR"), "/../results/runtime-throughput"),
    );
    let devices: Vec<String> = arg("--devices", "cpu")
        .split(',')
        .map(String::from)
        .collect();
    let dtype = match arg("--dtype", "f32").as_str() {
        "f16" => profiles::Dtype::F16,
        "bf16" => profiles::Dtype::Bf16,
        _ => profiles::Dtype::F32,
    };

    // Every input has the same length, so raw and served compute identical padded batches.
    let corpus = runtime::bench::fixed_texts(256, words as usize);
    let raw_points = runtime::bench::raw(&model, &devices[0], dtype, &sizes, seconds, &corpus)?;
    let tokens = raw_points[0].tokens_per_input;
    eprintln!("model {model} on {devices:?}, {tokens} tokens per input, {seconds}s per point");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut rows = Vec::new();
    for (&b, point) in sizes.iter().zip(&raw_points) {
        let raw = point.inputs_per_s;
        // Served: same batch size through HTTP.
        let p = Profile {
            model: model.clone(),
            devices: devices.clone(),
            dtype,
            max_batch_size: b,
            max_concurrent_batches: devices.len(),
            batch_wait_timeout: Duration::from_millis(50),
            max_queue_size: 4096,
            ..Profile::default()
        };
        let served = rt.block_on(async {
            let server =
                Server::start(ServeOptions::new(p, "127.0.0.1:0".parse().unwrap())).await?;
            let url = format!("http://{}", server.addr);
            wait_ready(&url).await;
            let bodies = corpus
                .iter()
                .map(|t| serde_json::json!({"input": t}).to_string().into())
                .collect();
            let w = Workload {
                name: "embeddings".into(),
                path: "/v1/embeddings".into(),
                bodies,
                stream: false,
            };
            let mut cfg = Config::new(
                url,
                Mode::Closed {
                    concurrency: 2 * b * devices.len(),
                },
                w,
            );
            // Long enough for ≥ 25 batches, so whole-batch completions do not quantise the rate.
            cfg.duration =
                Duration::from_secs_f64(seconds.max(2.0).max(25.0 * point.median_forward_s));
            cfg.warmup = Duration::from_secs(1);
            let r = loadgen::run(cfg).await?;
            server.shutdown();
            server.wait().await?;
            anyhow::Ok(r)
        })?;
        let ratio = served.achieved_rps / raw;
        eprintln!(
            "batch {b:>3}: raw {raw:>8.1} inputs/s ({:>9.0} tokens/s)  served {:>8.1} inputs/s  p50 {:.1}ms  ratio {ratio:.3}",
            raw * tokens as f64,
            served.achieved_rps,
            served.latency.p50 * 1e3
        );
        rows.push(serde_json::json!({
            "batch_size": b, "raw_inputs_per_s": raw, "raw_tokens_per_s": raw * tokens as f64,
            "served_inputs_per_s": served.achieved_rps, "served_p50_s": served.latency.p50,
            "served_p95_s": served.latency.p95, "served_errors": served.errors, "ratio": ratio
        }));
    }
    let best_raw = rows
        .iter()
        .max_by(|a, b| {
            a["raw_inputs_per_s"]
                .as_f64()
                .partial_cmp(&b["raw_inputs_per_s"].as_f64())
                .unwrap()
        })
        .unwrap();
    let summary = serde_json::json!({
        "model": model, "devices": devices, "dtype": format!("{dtype}"), "tokens_per_input": tokens,
        "seconds_per_point": seconds, "host": host(), "rows": rows,
        "best_raw_batch_size": best_raw["batch_size"], "ratio_at_best_raw": best_raw["ratio"],
    });
    std::fs::write(
        format!("{out}.json"),
        serde_json::to_string_pretty(&summary)?,
    )?;
    let mut md = format!(
        "# Runtime throughput: raw forward vs served over HTTP\n\nModel `{model}` on `{devices:?}` ({dtype}), {tokens} tokens per input, {seconds}s per point, host: {}.\n\
         Command: `cargo bench -p runtime --bench throughput`.\n\n| batch | raw inputs/s | raw tokens/s | served inputs/s | served p50 | served ÷ raw |\n|---:|---:|---:|---:|---:|---:|\n",
        host()
    );
    for r in summary["rows"].as_array().unwrap() {
        md += &format!(
            "| {} | {:.1} | {:.0} | {:.1} | {:.1} ms | {:.3} |\n",
            r["batch_size"],
            r["raw_inputs_per_s"].as_f64().unwrap(),
            r["raw_tokens_per_s"].as_f64().unwrap(),
            r["served_inputs_per_s"].as_f64().unwrap(),
            r["served_p50_s"].as_f64().unwrap() * 1e3,
            r["ratio"].as_f64().unwrap()
        );
    }
    md += &format!(
        "\nAt the best raw batch size ({}), served ÷ raw = {:.3} (goal ≥ 0.95).\n",
        summary["best_raw_batch_size"],
        summary["ratio_at_best_raw"].as_f64().unwrap()
    );
    std::fs::write(format!("{out}.md"), md)?;
    eprintln!("wrote {out}.json and {out}.md");
    Ok(())
}

async fn wait_ready(url: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let addr = url.trim_start_matches("http://").to_string();
    while Instant::now() < deadline {
        if let Ok(mut s) = tokio::net::TcpStream::connect(&addr).await {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let _ = s
                .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await;
            let mut buf = vec![0u8; 64];
            if let Ok(n) = s.read(&mut buf).await {
                if String::from_utf8_lossy(&buf[..n]).contains(" 200 ") {
                    return;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("server at {url} not ready");
}

fn host() -> String {
    results::host::host_cpu()
}
