//! `loadgen`: open/closed-loop HTTP load with coordinated-omission-corrected latency.
//!
//! Exit codes: 0 success; 1 the run could not be made (bad URL, unreadable file); 2 usage error;
//! 3 invalid run (the generator was the bottleneck: send lag p99 over the larger of
//! `--max-send-lag` and `--lag-fraction` × the latency p50, requests dropped by the safety cap,
//! or requests still unsent at the end); 4 a `--fail-on` threshold was crossed.

use clap::Parser;
use loadgen::schedule::{Arrival, Rate};
use loadgen::slo::{parse_latency, Target};
use loadgen::workload::{TextOptions, Workload};
use loadgen::{Config, Mode};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

/// Exit code: the run was invalid (the generator was the bottleneck).
const EXIT_INVALID: u8 = 3;
/// Exit code: a --fail-on threshold was crossed.
const EXIT_FAIL_ON: u8 = 4;

/// Load generator for HTTP inference servers. Open loop (--rps or --ramp) sends on a schedule of
/// intended times whatever the server does, and measures latency from those times; closed loop
/// (--concurrency) runs N clients back to back.
///
/// Exit codes: 0 ok, 1 could not run, 2 usage error, 3 invalid run (send lag p99 over the larger
/// of --max-send-lag and --lag-fraction × the latency p50, requests dropped by the safety cap,
/// or requests still unsent at the end), 4 a --fail-on threshold crossed.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Cli {
    /// Server URL; a path in it (http://host:8000/v1/embeddings) overrides the workload's path.
    #[arg(long, env = "LOADGEN_URL", default_value = "http://127.0.0.1:8000")]
    url: String,
    /// Open loop: requests per second.
    #[arg(long, env = "LOADGEN_RPS", conflicts_with_all = ["concurrency", "ramp"])]
    rps: Option<f64>,
    /// Open loop: a ramp start:end:step/every, e.g. 100:800:100/10s.
    #[arg(long, env = "LOADGEN_RAMP", conflicts_with = "concurrency")]
    ramp: Option<String>,
    /// Closed loop: this many clients, each sending when its last request returns.
    #[arg(long, env = "LOADGEN_CONCURRENCY")]
    concurrency: Option<usize>,
    /// Arrival process for the open loop: constant, poisson, or gamma:<burstiness> (squared
    /// coefficient of variation; 1 = Poisson).
    #[arg(long, env = "LOADGEN_ARRIVAL", default_value = "constant")]
    arrival: String,
    /// Measured phase, e.g. 30s.
    #[arg(long, env = "LOADGEN_DURATION", default_value = "30s")]
    duration: String,
    /// Warm-up before measuring (sent, not counted).
    #[arg(long, env = "LOADGEN_WARMUP", default_value = "5s")]
    warmup: String,
    /// Workload: embeddings, completions, chat, or a FILE.jsonl of request bodies.
    #[arg(long, env = "LOADGEN_WORKLOAD", default_value = "embeddings")]
    workload: String,
    /// A raw body template with a {{text}} placeholder (other servers); needs --path or a URL path.
    #[arg(long, env = "LOADGEN_BODY_TEMPLATE")]
    body_template: Option<PathBuf>,
    /// Inputs per embeddings request.
    #[arg(long, env = "LOADGEN_INPUTS_PER_REQUEST", default_value_t = 1)]
    inputs_per_request: usize,
    /// Median words per generated text (prompts of completions/chat too; log-normal lengths).
    #[arg(long, env = "LOADGEN_MEDIAN_WORDS", default_value_t = 24.0)]
    median_words: f64,
    /// Generation workloads: `max_tokens` per request, drawn from N, fixed:N, uniform:A:B or
    /// lognormal:MEDIAN:SIGMA[:MAX] (long-tailed, as chat outputs are; MAX caps the draws at the
    /// server's `max_new_tokens`, which refuses a larger `max_tokens` with a 400).
    #[arg(long, env = "LOADGEN_OUTPUT_TOKENS", default_value = "64")]
    output_tokens: String,
    /// Generation workloads: ask the server to ignore EOS so every request generates exactly
    /// its max_tokens (vLLM's and batchtune's `ignore_eos`).
    #[arg(long, env = "LOADGEN_IGNORE_EOS")]
    ignore_eos: bool,
    /// Generation workloads: send this `temperature` with every request (0 = greedy); by
    /// default none is sent and the server's default applies (1 under OpenAI's API).
    #[arg(long, env = "LOADGEN_TEMPERATURE", value_parser = loadgen::workload::parse_temperature)]
    temperature: Option<f64>,
    /// Generation workloads: whole responses instead of SSE streams (no TTFT/ITL/TPOT then).
    #[arg(long, env = "LOADGEN_NO_STREAM")]
    no_stream: bool,
    /// Per-request timeout (counted as errors of kind `timeout`).
    #[arg(long, env = "LOADGEN_TIMEOUT", default_value = "30s")]
    timeout: String,
    /// Extra header, `Name: value` (repeatable).
    #[arg(long = "header", env = "LOADGEN_HEADERS", value_delimiter = '\n')]
    headers: Vec<String>,
    /// Sends `Authorization: Bearer KEY`.
    #[arg(long, env = "LOADGEN_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Cap on open connections (requests then wait for one, like a pooled client). Default: none,
    /// so the open loop is never silently turned into a closed one.
    #[arg(long, env = "LOADGEN_CONNECTIONS")]
    connections: Option<usize>,
    /// Safety cap on requests in flight in the open loop; drops are counted and invalidate the run.
    #[arg(long, env = "LOADGEN_MAX_IN_FLIGHT", default_value_t = 20_000)]
    max_in_flight: usize,
    /// Measurement window for stability and the interval log (default: duration/5 within 1s..10s).
    #[arg(long, env = "LOADGEN_WINDOW")]
    window: Option<String>,
    /// The self-check: a run whose send lag p99 (how late requests reached the socket against
    /// their intended times) exceeds the larger of this and --lag-fraction × the latency p50 is
    /// INVALID (exit 3). The floor; raise it on a shared, noisy host.
    #[arg(long, env = "LOADGEN_MAX_SEND_LAG", default_value = "50us")]
    max_send_lag: String,
    /// The self-check's relative part: send lag p99 may reach this fraction of the latency p50
    /// (5%: a generator that is late by a twentieth of what it measures).
    #[arg(long, env = "LOADGEN_LAG_FRACTION", default_value_t = 0.05)]
    lag_fraction: f64,
    /// Stable when the last 3 windows' throughput and p95 lie within this percentage.
    #[arg(long, env = "LOADGEN_STABILITY_PERCENT", default_value_t = 10.0)]
    stability_percent: f64,
    /// Fail (exit 4) when this holds, e.g. 'p95>200ms' or 'error_rate>1%' (repeatable).
    #[arg(long, env = "LOADGEN_FAIL_ON")]
    fail_on: Vec<String>,
    /// Per-request limits for goodput, e.g. 'ttft_p95<500ms,tpot_p95<50ms,e2e_p95<4s': a request
    /// counts when its own TTFT, TPOT and end-to-end latency are within the bounds (the
    /// percentile names only say which metric). Reported as goodput_rps.
    #[arg(long, env = "LOADGEN_GOODPUT", value_delimiter = ',')]
    goodput: Vec<String>,
    /// Schedule and text seed.
    #[arg(long, env = "LOADGEN_SEED", default_value_t = 1)]
    seed: u64,
    /// Write the JSON report here.
    #[arg(long, env = "LOADGEN_JSON")]
    json: Option<PathBuf>,
    /// Append the run as a record to this Parquet run store (created if missing; see the
    /// `results` crate): knobs, host, revision, rates, percentiles and the full histogram.
    #[arg(long, env = "LOADGEN_PARQUET")]
    parquet: Option<PathBuf>,
    /// Label of the run in the store (legend name in plots), e.g. the profile's name.
    #[arg(long, env = "LOADGEN_LABEL", default_value = "loadgen")]
    label: String,
    /// Group of the run in the store (a comparison's or experiment's name).
    #[arg(long, env = "LOADGEN_GROUP", default_value = "adhoc")]
    group: String,
    /// Write the corrected latency distribution (.hgrm, milliseconds) here.
    #[arg(long, env = "LOADGEN_HGRM")]
    hgrm: Option<PathBuf>,
    /// Write an HdrHistogram interval log (.hlog) of per-window latency here.
    #[arg(long, env = "LOADGEN_HLOG")]
    hlog: Option<PathBuf>,
    /// No progress bar.
    #[arg(long, short, env = "LOADGEN_QUIET")]
    quiet: bool,
    /// Write 1024 texts of the embeddings workload (one per line; `--median-words`, `--seed`)
    /// to this file and exit without sending anything: `runtime bench --texts FILE` then
    /// measures the model's raw ceiling on the same length mix the served runs send.
    #[arg(long)]
    dump_texts: Option<PathBuf>,
    /// Generator threads. Open loop: pacers, each with its own connections and an equal share
    /// of the one schedule, recording its own samples (default: one per 2,000 req/s of the
    /// peak rate, or for a streamed workload one per 40,000 token events/s if that is more,
    /// at most one per core).
    /// Closed loop: the async runtime's workers (default: all cores).
    #[arg(long, env = "LOADGEN_THREADS")]
    threads: Option<usize>,
    /// Open loop: how each pacer sends. `epoll`: its own epoll loop over its sockets, a batch
    /// of due sends and ready responses a turn (fewer syscalls and clock reads a request, so
    /// more requests a core; Linux, responses read whole). `tokio`: a task per request on its
    /// own async runtime (any workload, streaming included). `auto`: `epoll` where it can be.
    #[arg(long, env = "LOADGEN_SEND_LOOP", value_enum, default_value_t = loadgen::SendLoop::Auto)]
    send_loop: loadgen::SendLoop,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn usage(msg: String) -> ! {
    eprintln!("error: {msg}");
    std::process::exit(2);
}

fn dur(flag: &str, v: &str) -> Duration {
    parse_latency(v).unwrap_or_else(|e| usage(format!("--{flag}: {e}")))
}

fn real_main(cli: Cli) -> anyhow::Result<ExitCode> {
    if let Some(path) = &cli.dump_texts {
        let opts = TextOptions {
            median_words: cli.median_words,
            seed: cli.seed,
            ..TextOptions::default()
        };
        let texts = loadgen::workload::texts(1024, &opts);
        std::fs::write(path, texts.join("\n") + "\n")
            .map_err(|e| anyhow::anyhow!("--dump-texts {}: {e}", path.display()))?;
        eprintln!("wrote {} texts to {}", texts.len(), path.display());
        return Ok(ExitCode::SUCCESS);
    }
    let arrival = Arrival::parse(&cli.arrival).unwrap_or_else(|e| usage(format!("--arrival: {e}")));
    let mode = match (cli.rps, &cli.ramp, cli.concurrency) {
        (Some(r), None, None) if r > 0.0 && r.is_finite() => Mode::Open {
            rate: Rate::Fixed(r),
            arrival,
            max_in_flight: cli.max_in_flight,
        },
        (Some(r), _, _) if !(r > 0.0 && r.is_finite()) => usage(format!("--rps {r}: must be > 0")),
        (None, Some(ramp), None) => {
            let rate = Rate::parse_ramp(ramp).unwrap_or_else(|e| usage(format!("--ramp: {e}")));
            Mode::Open {
                rate,
                arrival,
                max_in_flight: cli.max_in_flight,
            }
        }
        (None, None, Some(c)) if c > 0 => Mode::Closed { concurrency: c },
        (None, None, Some(_)) => usage("--concurrency must be ≥ 1".into()),
        _ => usage("give exactly one of --rps, --ramp or --concurrency".into()),
    };
    if let Mode::Open { rate, .. } = &mode {
        rate.within_limit().unwrap_or_else(|e| usage(e));
    }
    let open = matches!(mode, Mode::Open { .. });
    let output_tokens = loadgen::workload::Lengths::parse(&cli.output_tokens)
        .unwrap_or_else(|e| usage(format!("--output-tokens: {e}")));
    let opts = TextOptions {
        inputs_per_request: cli.inputs_per_request.max(1),
        median_words: cli.median_words,
        seed: cli.seed,
        output_tokens,
        ignore_eos: cli.ignore_eos,
        stream: !cli.no_stream,
        temperature: cli.temperature,
        ..TextOptions::default()
    };
    let workload = match &cli.body_template {
        Some(path) => {
            let t = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("--body-template {}: {e}", path.display()))?;
            Workload::from_template(&t, "/", &opts).map_err(anyhow::Error::msg)?
        }
        None => Workload::from_spec(&cli.workload, &opts)
            .map_err(|e| anyhow::anyhow!("--workload: {e}"))?,
    };
    let targets: Vec<Target> = cli
        .fail_on
        .iter()
        .map(|t| Target::parse(t).unwrap_or_else(|e| usage(format!("--fail-on: {e}"))))
        .collect();
    let goodput: Vec<Target> = cli
        .goodput
        .iter()
        .filter(|t| !t.trim().is_empty())
        .map(|t| Target::parse(t).unwrap_or_else(|e| usage(format!("--goodput: {e}"))))
        .collect();
    let mut headers = Vec::new();
    for h in cli.headers.iter().filter(|h| !h.trim().is_empty()) {
        let (k, v) = h
            .split_once(':')
            .unwrap_or_else(|| usage(format!("--header `{h}`: write `Name: value`")));
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    if let Some(k) = &cli.api_key {
        headers.push(("authorization".into(), format!("Bearer {k}")));
    }
    let cancel = Arc::new(AtomicBool::new(false));
    let cfg = Config {
        duration: dur("duration", &cli.duration),
        warmup: dur("warmup", &cli.warmup),
        timeout: dur("timeout", &cli.timeout),
        headers,
        window: cli.window.as_deref().map(|w| dur("window", w)),
        stability_percent: cli.stability_percent,
        max_lag_p99: dur("max-send-lag", &cli.max_send_lag),
        lag_fraction: if (0.0..=1.0).contains(&cli.lag_fraction) {
            cli.lag_fraction
        } else {
            usage(format!(
                "--lag-fraction {}: give a fraction in [0, 1]",
                cli.lag_fraction
            ))
        },
        pacers: if open { cli.threads.unwrap_or(0) } else { 0 },
        send_loop: cli.send_loop,
        connections: cli.connections,
        seed: cli.seed,
        progress: !cli.quiet,
        cancel: Some(cancel.clone()),
        goodput: loadgen::slo::GoodputLimits::from_targets(if goodput.is_empty() {
            &targets
        } else {
            &goodput
        }),
        ..Config::new(cli.url.clone(), mode, workload)
    };
    let window = cfg.effective_window();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    match (open, cli.threads) {
        // The open loop's pacers run their own runtimes; this one only collects samples.
        (true, _) => {
            rt.worker_threads(2);
        }
        (false, Some(t)) => {
            rt.worker_threads(t.max(1));
        }
        (false, None) => {}
    }
    let rt = rt.enable_all().build()?;
    let report = rt.block_on(async move {
        let c = cancel.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("interrupted: finishing in-flight requests and reporting");
                c.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        });
        loadgen::run(cfg).await
    })?;
    print!("{}", report.summary());
    if let Some(p) = &cli.json {
        std::fs::write(p, serde_json::to_string_pretty(&report)?)
            .map_err(|e| anyhow::anyhow!("--json {}: {e}", p.display()))?;
    }
    if let Some(p) = &cli.parquet {
        append_record(p, &cli, &report)?;
    }
    if let Some(p) = &cli.hgrm {
        std::fs::write(p, report.hgrm())
            .map_err(|e| anyhow::anyhow!("--hgrm {}: {e}", p.display()))?;
    }
    if let Some(p) = &cli.hlog {
        std::fs::write(p, report.hlog(window)?)
            .map_err(|e| anyhow::anyhow!("--hlog {}: {e}", p.display()))?;
    }
    if !report.valid {
        return Ok(ExitCode::from(EXIT_INVALID));
    }
    let crossed: Vec<String> = targets
        .iter()
        .filter(|t| t.holds(&report))
        .map(|t| format!("{t} (observed {})", t.format_value(t.observe(&report))))
        .collect();
    if !crossed.is_empty() {
        eprintln!("fail-on crossed: {}", crossed.join(", "));
        return Ok(ExitCode::from(EXIT_FAIL_ON));
    }
    Ok(ExitCode::SUCCESS)
}

/// Appends the run to a Parquet store. The server's knobs come from its `GET /config` when it is
/// a batchtune runtime (other servers: none recorded).
fn append_record(
    path: &std::path::Path,
    cli: &Cli,
    report: &loadgen::Report,
) -> anyhow::Result<()> {
    let knobs: std::collections::BTreeMap<String, serde_json::Value> =
        fetch_config(&cli.url).unwrap_or_default();
    let text = |k: &str| {
        knobs
            .get(k)
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| v.to_string())
            })
            .unwrap_or_default()
    };
    let cx = results::record::Context {
        group: cli.group.clone(),
        label: cli.label.clone(),
        host_cpu: results::host::host_cpu(),
        host_gpu: results::host::host_gpu(),
        git_revision: results::host::git_revision(),
        model: text("model"),
        devices: text("devices"),
        targets: cli.fail_on.join(";"),
        knobs: knobs.clone(),
    };
    let id = format!("{}@{:.0}", cli.label, report.started_unix_s * 1000.0);
    results::store::append(path, &[report.to_record(id, &cx)])
        .map_err(|e| anyhow::anyhow!("--parquet {}: {e}", path.display()))
}

/// `GET <url>/config` with a plain blocking socket (the run is over; no client pool needed).
fn fetch_config(url: &str) -> Option<std::collections::BTreeMap<String, serde_json::Value>> {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://")?;
    let host = rest.split('/').next()?;
    let mut s = std::net::TcpStream::connect(host).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .ok()?;
    write!(
        s,
        "GET /config HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let (head, body) = buf.split_once("\r\n\r\n")?;
    if !head.starts_with("HTTP/1.1 200")
        || head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
    {
        return None;
    }
    serde_json::from_str(body).ok()
}
