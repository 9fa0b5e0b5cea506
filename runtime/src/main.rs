//! `runtime`: serve a model (embeddings with dynamic batching, generation with continuous
//! batching), benchmark its raw ceiling, or validate profiles.

use anyhow::Context;
use clap::{Parser, Subcommand};
use profiles::Profile;
use runtime::{ServeOptions, Server};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

/// batchtune serving runtime: OpenAI-compatible embeddings (dynamic batching) and text
/// generation (continuous batching, SSE streaming) over candle.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve an encoder (POST /v1/embeddings) or a decoder (POST /v1/completions,
    /// POST /v1/chat/completions), and GET /health, GET|PUT /config, GET /metrics.
    ///
    /// With no flags: the embedded synthetic MiniLM on CPU at 127.0.0.1:8000; for generation,
    /// --profile profiles/llm-default.toml (synthetic SmolLM2-135M) or --model FILE.gguf. Knobs come from the
    /// profile, then from environment overrides (BATCHTUNE_<KNOB>, or the seeds' names such as
    /// MAX_INFERENCE_BATCH_SIZE and BATCH_WAIT_TIMEOUT).
    Serve(ServeArgs),
    /// Raw forward throughput of the model (no HTTP): back-to-back batches at each batch size.
    /// Prints one JSON object per batch size; the ceiling served throughput is compared with.
    /// For a generation model: batched decode steps (output tokens/s at each batch size, every
    /// sequence holding --context-tokens of prompt).
    Bench {
        /// Model spec (synthetic:minilm, a Hugging Face folder, synthetic:smollm2-135m, a .gguf).
        #[arg(long, default_value = profiles::DEFAULT_MODEL)]
        model: String,
        /// Device: cpu or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// f32, f16 or bf16.
        #[arg(long, default_value = "f32")]
        dtype: String,
        /// Batch sizes, comma-separated.
        #[arg(long, default_value = "1,2,4,8,16,32,64", value_delimiter = ',')]
        sizes: Vec<usize>,
        /// Seconds per batch size.
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        /// Words per input with `--texts fixed` (all inputs the same length).
        #[arg(long, default_value_t = 24)]
        words: usize,
        /// Inputs: `fixed` (every input `--words` long) or a FILE with one text per line, e.g.
        /// from `loadgen --dump-texts FILE` (loadgen's embeddings workload, as served benchmarks
        /// send it).
        #[arg(long, default_value = "fixed")]
        texts: String,
        /// Generation: prompt tokens cached in every sequence before the timed decode steps.
        #[arg(long, default_value_t = 128)]
        context_tokens: usize,
        /// Generation: decode steps timed per batch size.
        #[arg(long, default_value_t = 16)]
        steps: usize,
        /// Generation: sampling temperature of every sequence (0 = greedy; above 0 = drawn on
        /// the device as the server does, so the difference is sampling's cost).
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        /// Generation: also prefill this many fresh prompts in every timed step, as a served
        /// step admits newcomers beside its decodes (the raw cost of a mixed step).
        #[arg(long, default_value_t = 0)]
        prefill_chunks: usize,
        /// Generation: tokens per prompt of `--prefill-chunks`.
        #[arg(long, default_value_t = 46)]
        prefill_tokens: usize,
        /// Generation: issue each step before reading the previous step's ids, the decodes
        /// reading their tokens on the device, as `serve --step-overlap` does.
        #[arg(long)]
        overlap: bool,
        /// Also write the texts used, one per line (so another stack can embed the same inputs).
        #[arg(long)]
        dump_texts: Option<PathBuf>,
        /// Generation: instead of decode steps, time what the host spends issuing each kind of
        /// op a step is made of (upload, allocation, candle's kernels, cuBLAS, the runtime's
        /// own), at the first of --sizes rows, this many calls each. One JSON line per op.
        #[arg(long, value_name = "CALLS")]
        host_costs: Option<usize>,
    },
    /// Load and validate profiles: exit 0 when all are valid, 1 with every reason otherwise.
    /// Checks the knobs' rules and, unless --rules-only, that the profile would serve on this
    /// host: its model exists and its devices exist in this build (what `serve` checks first).
    Validate {
        /// Profile files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Check the rules only (a profile written for another host, e.g. a GPU profile checked
        /// on a CPU-only CI machine).
        #[arg(long)]
        rules_only: bool,
    },
}

/// `runtime serve`'s flags.
#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// Profile TOML (see profiles/default.toml); defaults are used when absent.
    #[arg(long, env = "BATCHTUNE_PROFILE")]
    profile: Option<PathBuf>,
    /// Address to listen on; port 0 picks a free port (printed at start).
    #[arg(long, env = "BATCHTUNE_ADDR", default_value = "127.0.0.1:8000")]
    addr: SocketAddr,
    /// Require this key (Authorization: Bearer KEY, or X-API-Key) on /v1/* and PUT /config.
    #[arg(long, env = "BATCHTUNE_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Largest request body accepted, in bytes (larger gets 413).
    #[arg(long, env = "BATCHTUNE_MAX_BODY_BYTES", default_value_t = 8 << 20)]
    max_body_bytes: usize,
    /// Override the model: synthetic:minilm, synthetic:smollm2-135m, synthetic:qwen2.5-0.5b,
    /// a .gguf file (e.g. SmolLM2-135M-Instruct.Q4_1.gguf), or a Hugging Face folder.
    #[arg(long, env = "BATCHTUNE_MODEL_PATH")]
    model: Option<String>,
    /// Connections served at once; past it a new connection gets 503 and is closed. Default:
    /// 10000, or what the open-file limit allows (raised to its hard limit first).
    #[arg(long, env = "BATCHTUNE_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// A request's headers must arrive within this; an idle keep-alive connection is closed
    /// after it.
    #[arg(long, env = "BATCHTUNE_HEADER_READ_TIMEOUT", default_value = "30s")]
    header_read_timeout: String,
    /// A request's body must arrive within this (408 beyond).
    #[arg(long, env = "BATCHTUNE_BODY_READ_TIMEOUT", default_value = "30s")]
    body_read_timeout: String,
    /// Generation on a GPU: open a CUDA profiler's window around engine steps FIRST..FIRST+COUNT
    /// of each replica (`FIRST:COUNT`, e.g. 2000:3), so `ncu --profile-from-start off runtime
    /// serve …` records those served steps' kernels and nothing before them. Does nothing
    /// without a profiler attached.
    #[arg(long, value_name = "FIRST:COUNT", value_parser = parse_profiler_window)]
    cuda_profile_steps: Option<runtime::generate::engine::ProfilerWindow>,
    /// Generation: issue each step before the previous step's tokens reach the host, its
    /// decodes reading their input tokens on the device, so a GPU never waits for the host
    /// between steps. `auto` overlaps on GPU replicas only: on the CPU every op has finished
    /// when it returns, and overlapping would only deliver each token a step later.
    #[arg(long, value_name = "auto|on|off", default_value = "auto")]
    step_overlap: runtime::generate::engine::Overlap,
    /// Test only (feature `test-hooks`): make every forward slower so throughput drops by this
    /// fraction (0.1 = 10%). Used to calibrate the CI performance gate.
    #[cfg(feature = "test-hooks")]
    #[arg(long, default_value_t = 0.0)]
    test_slowdown: f64,
    /// Test only (feature `test-hooks`): WORD=panic|error|oom|slow:DURATION. A forward pass
    /// whose batch holds WORD's tokens panics, fails, reports an exhausted device or is slowed
    /// (repeatable). Used by the reliability tests.
    #[cfg(feature = "test-hooks")]
    #[arg(long)]
    test_fault: Vec<runtime::hooks::FaultRule>,
}

/// Prints one JSON line per benchmark point, or the error.
fn print_points<T: serde::Serialize>(
    points: Result<Vec<T>, runtime::model::ModelError>,
) -> ExitCode {
    match points {
        Ok(points) => {
            for pt in points {
                println!("{}", serde_json::to_string(&pt).expect("points serialize"));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Validate { files, rules_only } => validate(&files, rules_only),
        Cmd::Bench {
            model,
            device,
            dtype,
            sizes,
            seconds,
            words,
            texts,
            dump_texts,
            context_tokens,
            steps,
            temperature,
            prefill_chunks,
            prefill_tokens,
            overlap,
            host_costs,
        } => {
            let mut p = Profile::default();
            if let Err(e) = p.set_knob("dtype", &dtype) {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
            if let Ok(Some(_)) = runtime::model::lm::resolve(&model) {
                if let Some(calls) = host_costs {
                    let rows = sizes.first().copied().unwrap_or(256);
                    return print_points(runtime::bench::host_costs(
                        &model,
                        &device,
                        p.dtype,
                        rows,
                        calls.max(1),
                    ));
                }
                let o = runtime::bench::DecodeOptions {
                    sizes,
                    context_tokens,
                    steps,
                    temperature,
                    prefill: (prefill_chunks > 0).then_some((prefill_chunks, prefill_tokens)),
                    overlap,
                };
                return print_points(runtime::bench::raw_decode(&model, &device, p.dtype, &o));
            }
            let source = if texts == "fixed" {
                runtime::bench::Texts::Fixed(words)
            } else {
                runtime::bench::Texts::File(texts.clone().into())
            };
            let texts = match source.generate() {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("error: --texts {texts}: {e}");
                    return ExitCode::FAILURE;
                }
            };
            if let Some(path) = dump_texts {
                if let Err(e) = std::fs::write(&path, texts.join("\n") + "\n") {
                    eprintln!("error: --dump-texts {}: {e}", path.display());
                    return ExitCode::FAILURE;
                }
            }
            print_points(runtime::bench::raw(
                &model, &device, p.dtype, &sizes, seconds, &texts,
            ))
        }
        Cmd::Serve(args) => match serve(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

fn validate(files: &[PathBuf], rules_only: bool) -> ExitCode {
    let mut ok = true;
    for f in files {
        let checked = Profile::load(f)
            .and_then(|p| p.validate().map(|_| p))
            .map_err(|e| e.to_string())
            .and_then(|p| {
                if rules_only {
                    return Ok(());
                }
                runtime::serves_here(&p).map_err(|e| e.to_string())
            });
        match checked {
            Ok(()) => println!("ok      {}", f.display()),
            Err(e) => {
                ok = false;
                println!("invalid {}: {e}", f.display());
            }
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// `--cuda-profile-steps FIRST:COUNT`, COUNT at least 1.
fn parse_profiler_window(v: &str) -> Result<runtime::generate::engine::ProfilerWindow, String> {
    let (first, count) = v
        .split_once(':')
        .ok_or_else(|| format!("{v:?}: expected FIRST:COUNT, e.g. 2000:3"))?;
    let first = first
        .trim()
        .parse()
        .map_err(|_| format!("{v:?}: FIRST must be a step number (0 or more)"))?;
    let count = count
        .trim()
        .parse()
        .ok()
        .filter(|&c: &u64| c > 0)
        .ok_or_else(|| format!("{v:?}: COUNT must be a number of steps, at least 1"))?;
    Ok(runtime::generate::engine::ProfilerWindow { first, count })
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let ServeArgs {
        profile,
        addr,
        api_key,
        max_body_bytes,
        model,
        max_connections,
        header_read_timeout,
        body_read_timeout,
        cuda_profile_steps,
        step_overlap,
        #[cfg(feature = "test-hooks")]
        test_slowdown,
        #[cfg(feature = "test-hooks")]
        test_fault,
    } = args;
    let flag_duration = |flag: &str, v: &str| {
        profiles::parse_duration(v)
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| anyhow::anyhow!("--{flag} {v:?}: give a positive duration such as 30s"))
    };
    let header_read_timeout = flag_duration("header-read-timeout", &header_read_timeout)?;
    let body_read_timeout = flag_duration("body-read-timeout", &body_read_timeout)?;
    let fds = runtime::http::fd_capacity();
    let max_connections = match max_connections {
        Some(0) => anyhow::bail!("--max-connections must be at least 1"),
        Some(n) => {
            if fds.is_some_and(|f| n > f) {
                tracing::warn!(
                    "--max-connections {n} is above what the open-file limit allows ({}); connections past it will fail to be accepted",
                    fds.unwrap_or_default()
                );
            }
            n
        }
        None => fds.map_or(10_000, |f| f.clamp(1, 10_000)),
    };
    let mut p = match &profile {
        Some(path) => Profile::load(path)?,
        None => Profile::default(),
    };
    for applied in p.apply_env(std::env::vars())? {
        tracing::info!("environment override {applied}");
    }
    if let Some(m) = model {
        p.model = m;
    }
    p.validate()?;
    #[cfg(feature = "test-hooks")]
    let hooks = {
        if !(0.0..1.0).contains(&test_slowdown) {
            anyhow::bail!("--test-slowdown must be in [0, 1), got {test_slowdown}");
        }
        if test_slowdown > 0.0 {
            tracing::warn!("test-only planted slowdown: throughput reduced by {test_slowdown}");
        }
        runtime::hooks::TestHooks {
            slowdown: test_slowdown,
            faults: test_fault,
        }
    };
    if p.cpu_threads > 0 {
        // candle's CPU kernels size their thread pool from this variable; set before any thread
        // exists, which is why it happens here and not in the library.
        std::env::set_var("RAYON_NUM_THREADS", p.cpu_threads.to_string());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let server = Server::start(ServeOptions {
            profile: p.clone(),
            addr,
            api_key,
            max_body_bytes,
            body_read_timeout,
            limits: runtime::http::ConnLimits {
                max_connections,
                header_read_timeout,
            },
            profiler: cuda_profile_steps,
            overlap: step_overlap,
            #[cfg(feature = "test-hooks")]
            hooks,
        })
        .await
        .context("starting the server")?;
        // Scripts (and the tuner) read this line to learn the port when --addr ends in :0.
        println!("listening on http://{}", server.addr);
        tracing::info!(model = %p.model, devices = ?p.devices, "loading model");
        let stopper = server.stopper();
        tokio::spawn(async move {
            shutdown_signal().await;
            tracing::info!("signal received: draining");
            stopper.stop();
        });
        server.wait().await?;
        tracing::info!("stopped");
        Ok(())
    })
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}
