//! `tuner`: SLO-constrained search over serving knobs.

use clap::{Parser, Subcommand};
use loadgen::slo::Target;
use loadgen::workload::{TextOptions, Workload};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tuner::search::{search, SearchError, SearchOptions, SearchOutcome, ServerSpec};
use tuner::space::Space;
use tuner::strategy::Strategy;
use tuner::trial::ProbeSettings;

/// batchtune tuner: measure, don't guess, the serving knobs.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Search batch size, wait timeout, concurrency, queue size and token budget for the highest
    /// request rate that meets every --target, and write a tuned profile.
    ///
    /// With only --target it starts the runtime (found next to this binary) with the embedded
    /// model on CPU and searches the default space. Each trial applies knobs by hot reload, then
    /// finds the sustainable rate by bracketing and bisection with open-loop loadgen probes.
    /// Every finished trial is journaled under --journal-dir; --resume continues a killed search.
    Search(Box<SearchArgs>),
    /// Search-efficiency benchmark: replay every strategy on a stored exhaustive grid (a finished
    /// `tuner search --strategy grid` whose budget covers the grid) and report the trials each
    /// needs to reach 95% of the grid's best, median over seeds.
    Replay(ReplayArgs),
    /// Sweep several profiles over one grid of offered rates (open-loop Poisson loadgen runs
    /// against a fresh runtime per profile), record every run in results/<name>/runs.parquet, and
    /// draw latency–throughput curves, the percentile spectrum and a Markdown table.
    Compare(CompareArgs),
    /// Draw a search from its journal: sustainable rate per trial with the best so far, and a
    /// heatmap over batch size × wait timeout.
    Report(ReportArgs),
    /// Performance-regression gate: serve one fixed profile with the baseline and the candidate
    /// runtime, measure them interleaved (A B, B A, ...) and decide pass / regression /
    /// inconclusive from confidence intervals on the ratios. Exit 0 pass, 1 regression,
    /// 3 inconclusive, 2 error. See ci/README.md.
    Gate(GateArgs),
}

#[derive(clap::Args)]
struct GateArgs {
    /// Gate configuration (benchmark, pairs, tolerances).
    #[arg(long, env = "TUNER_GATE_CONFIG", default_value = "ci/gate.toml")]
    config: PathBuf,
    /// Baseline runtime: a git revision (built in --work-dir) or a binary's path.
    #[arg(long, env = "TUNER_GATE_BASELINE", default_value = "HEAD~1")]
    baseline: String,
    /// Candidate runtime: a git revision or a binary's path. Default: the runtime next to this
    /// binary (the current build).
    #[arg(long, env = "TUNER_GATE_CANDIDATE")]
    candidate: Option<String>,
    /// Extra `runtime serve` argument for the baseline (repeatable).
    #[arg(long, allow_hyphen_values = true)]
    baseline_arg: Vec<String>,
    /// Extra `runtime serve` argument for the candidate (repeatable), e.g. the test-only
    /// `--test-slowdown=0.1` used for calibration.
    #[arg(long, allow_hyphen_values = true)]
    candidate_arg: Vec<String>,
    /// Use the configuration's quick_pairs (CI) instead of pairs.
    #[arg(long)]
    quick: bool,
    /// Override the number of pairs.
    #[arg(long)]
    pairs: Option<usize>,
    /// Where revisions are checked out and built (their dependencies build once).
    #[arg(long, default_value = "target/gate")]
    work_dir: PathBuf,
    /// Folder for summary.md and gate.json.
    #[arg(long, default_value = "target/gate/last")]
    out: PathBuf,
    /// Calibrate instead of gating: measure N A/A pairs (candidate against itself) and N pairs
    /// against the candidate with --slowdown planted, then replay quick gates drawn from them.
    #[arg(long)]
    calibrate: Option<usize>,
    /// Planted slowdown for --calibrate (fraction of throughput).
    #[arg(long, default_value_t = 0.10)]
    slowdown: f64,
    /// Calibration report stem (writes STEM.json and STEM.md).
    #[arg(long, default_value = "results/gate-calibration")]
    calibration_out: String,
}

#[derive(clap::Args)]
struct CompareArgs {
    /// Profile files, comma-separated (legend order).
    #[arg(long, value_delimiter = ',', required_unless_present = "import")]
    profiles: Vec<PathBuf>,
    /// Instead of measuring, import loadgen JSON reports measured elsewhere: LABEL=PATH, where
    /// the file name may hold one `*` (repeatable; legend order). Then draws as usual.
    #[arg(long)]
    import: Vec<String>,
    /// Offered rates: FROM:TO:STEP (inclusive) or a comma list, requests/s.
    #[arg(long, default_value = "10:200:10")]
    rates: String,
    /// Name of the comparison: output goes to <results-dir>/<name>/.
    #[arg(long, default_value = "compare")]
    name: String,
    /// Folder holding comparisons.
    #[arg(long, default_value = "results")]
    results_dir: PathBuf,
    /// Measured time per run.
    #[arg(long, default_value = "5s")]
    duration: String,
    /// Warm-up per run.
    #[arg(long, default_value = "1s")]
    warmup: String,
    /// Runs per rate (2 or more give confidence intervals in the table).
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Targets that define the table's sustainable rate, e.g. 'p95<4s' (repeatable).
    #[arg(long = "target")]
    targets: Vec<String>,
    /// Sweep every rate even after a profile saturated twice in a row.
    #[arg(long)]
    full: bool,
    /// Only redraw plots and table from the stored runs (no measuring).
    #[arg(long)]
    redraw: bool,
    /// Workload: embeddings, completions or chat (streamed generation: the generation space and
    /// model, token targets such as ttft_p95<2s), or a FILE.jsonl of request bodies.
    #[arg(long, default_value = "embeddings")]
    workload: String,
    #[command(flatten)]
    texts: TextArgs,
    /// No per-run lines.
    #[arg(short, long)]
    quiet: bool,
}

#[derive(clap::Args)]
struct ReportArgs {
    /// The search's id (a folder under --journal-dir).
    search_id: String,
    /// Folder of search journals.
    #[arg(long, default_value = "results/searches")]
    journal_dir: PathBuf,
    /// Output folder (default: the search's own folder).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(clap::Args)]
struct ReplayArgs {
    /// The grid search's id; several ids, comma-separated, for a grid measured in shards
    /// (`tuner search --shard K/N`). Several arguments: repeated passes over the same grid,
    /// combined point by point (geometric mean), with how well the passes agree reported.
    #[arg(required = true)]
    passes: Vec<String>,
    /// Folder of search journals.
    #[arg(long, default_value = "results/searches")]
    journal_dir: PathBuf,
    /// Seeds per strategy.
    #[arg(long, default_value_t = 10)]
    seeds: u64,
    /// Goal as a fraction of the grid's best sustainable rate.
    #[arg(long, default_value_t = 0.95)]
    fraction: f64,
    /// Output stem: writes STEM.json and STEM.md.
    #[arg(long, default_value = "results/search-efficiency")]
    out: String,
}

/// How request bodies are drawn: shared by `search` and `compare`, so both measure the same
/// workload from the same flags.
#[derive(clap::Args)]
struct TextArgs {
    /// Generation workloads (completions, chat): max_tokens per request, N, fixed:N,
    /// uniform:A:B or lognormal:MEDIAN:SIGMA.
    #[arg(long, env = "TUNER_OUTPUT_TOKENS", default_value = "64")]
    output_tokens: String,
    /// Generation workloads: let the model stop at EOS instead of forcing every request to its
    /// max_tokens (forced lengths make trials comparable; the default forces them).
    #[arg(long, env = "TUNER_ALLOW_EOS")]
    allow_eos: bool,
    /// Generation workloads: send this `temperature` with every request (0 = greedy); by
    /// default none is sent and the server's default applies.
    #[arg(long, env = "TUNER_TEMPERATURE", value_parser = loadgen::workload::parse_temperature)]
    temperature: Option<f64>,
    /// Inputs per embeddings request.
    #[arg(long, env = "TUNER_INPUTS_PER_REQUEST", default_value_t = 1)]
    inputs_per_request: usize,
}

impl TextArgs {
    /// The text and length options these flags give.
    fn options(&self) -> anyhow::Result<TextOptions> {
        Ok(TextOptions {
            inputs_per_request: self.inputs_per_request.max(1),
            output_tokens: loadgen::workload::Lengths::parse(&self.output_tokens)
                .map_err(|e| anyhow::anyhow!("--output-tokens: {e}"))?,
            ignore_eos: !self.allow_eos,
            temperature: self.temperature,
            ..TextOptions::default()
        })
    }

    /// The workload named by `spec` with these bodies.
    fn workload(&self, spec: &str) -> anyhow::Result<Workload> {
        Workload::from_spec(spec, &self.options()?).map_err(|e| anyhow::anyhow!("--workload: {e}"))
    }
}

#[derive(clap::Args)]
struct SearchArgs {
    /// A target that must hold, e.g. 'p95<4s', 'p99<250ms', 'error_rate<0.1%', 'throughput>50'.
    /// Repeat for several (all must hold). Without an error_rate target, error_rate<1% applies.
    #[arg(
        long = "target",
        env = "TUNER_TARGETS",
        value_delimiter = ',',
        required_unless_present = "resume"
    )]
    targets: Vec<String>,
    /// Search space TOML (a table per knob: type, min, max, scale, or choices). Default: the five
    /// batching knobs (see README).
    #[arg(long, env = "TUNER_SPACE")]
    space: Option<PathBuf>,
    /// Most trials (configurations measured).
    #[arg(long, env = "TUNER_BUDGET", default_value_t = 12)]
    budget: usize,
    /// Wall-clock budget for the trials, e.g. 8m; re-measuring the winner comes on top.
    #[arg(long, env = "TUNER_TIME", default_value = "7m")]
    time: String,
    /// Command that starts the server; `--addr 127.0.0.1:0` is added unless present.
    /// Default: the `runtime` binary next to this one, `serve`.
    #[arg(long, env = "TUNER_SPAWN", conflicts_with = "url")]
    spawn: Option<String>,
    /// Tune a server that is already running: batchtune's runtime by hot reload; any other
    /// server client-side only (the client's concurrency and rate, written as a .client.env).
    #[arg(long, env = "TUNER_URL")]
    url: Option<String>,
    /// Tune another HTTP server (a FastAPI app, vLLM, TGI, TEI) described by an adapter file:
    /// how to start it, its knobs (environment variables or flags), its workload. The tuner
    /// restarts it per trial and writes the tuned .env / .flags under its own names. See
    /// adapters/ and the README.
    #[arg(long, env = "TUNER_SERVER", conflicts_with_all = ["url", "spawn"])]
    server: Option<PathBuf>,
    /// Workload: embeddings, completions or chat (streamed generation: the generation space and
    /// model, token targets such as ttft_p95<2s), or a FILE.jsonl of request bodies [default:
    /// embeddings; with --server, the adapter's [workload]].
    #[arg(long, env = "TUNER_WORKLOAD")]
    workload: Option<String>,
    /// Strategy: auto (Nelder–Mead via argmin), grid, random, hill.
    #[arg(long, env = "TUNER_STRATEGY", default_value = "auto")]
    strategy: String,
    /// Where to write the tuned profile [default: profiles/tuned.toml; with --server
    /// profiles/tuned-ADAPTER.{env,flags,client.env,toml}; for a foreign --url
    /// profiles/tuned-client.{client.env,toml}].
    #[arg(long, env = "TUNER_OUT")]
    out: Option<PathBuf>,
    /// Continue the search with this id (its journal decides targets, space and strategy).
    #[arg(long, env = "TUNER_RESUME")]
    resume: Option<String>,
    /// Folder of search journals.
    #[arg(long, env = "TUNER_JOURNAL_DIR", default_value = "results/searches")]
    journal_dir: PathBuf,
    /// Measured seconds per rate probe.
    #[arg(long, env = "TUNER_PROBE", default_value = "4s")]
    probe: String,
    /// Warm-up per probe.
    #[arg(long, env = "TUNER_PROBE_WARMUP", default_value = "1s")]
    probe_warmup: String,
    /// Most probes per trial (repeated verdicts included).
    #[arg(long, env = "TUNER_MAX_PROBES", default_value_t = 10)]
    max_probes: usize,
    /// Highest rate a probe offers (requests/s); the search reports this when everything passes.
    #[arg(long, env = "TUNER_MAX_RATE", default_value_t = 100_000.0)]
    max_rate: f64,
    /// rate_limit in the output = this fraction of the sustainable rate (overload is shed as 429).
    #[arg(long, env = "TUNER_RATE_LIMIT_FRACTION", default_value_t = 0.9)]
    rate_limit_fraction: f64,
    /// Most probes behind one rate's verdict. A probe whose verdict is within the noise of a
    /// bound (latency drift near the 5%/s limit, a percentile within ~10% of its target) is
    /// repeated and the evidence pooled, up to this many; 1 lets every probe decide alone.
    #[arg(long, env = "TUNER_REPEATS", default_value_t = 3)]
    repeats: usize,
    /// Leaders raced after the search: the trials within the bisection tolerance of the best
    /// are probed afresh at the best rate (stepping down while none holds), the winner's rate
    /// is refined to one lattice step (2.2%) below a failure, and the profile gets its rate
    /// with an interval.
    #[arg(long, env = "TUNER_LEADERS", default_value_t = 3)]
    leaders: usize,
    /// Strategy seed.
    #[arg(long, env = "TUNER_SEED", default_value_t = 1)]
    seed: u64,
    #[command(flatten)]
    texts: TextArgs,
    /// Sends `Authorization: Bearer KEY`.
    #[arg(long, env = "TUNER_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// No progress output.
    #[arg(long, short, env = "TUNER_QUIET")]
    quiet: bool,
    /// K/N: measure only the grid points whose index is K mod N (with --strategy grid), so one
    /// grid can be split over several machines or core sets; `tuner replay ID1,ID2,…` merges the
    /// shards. A shard writes no profile.
    #[arg(long, env = "TUNER_SHARD")]
    shard: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Replay(a) => match run_replay(a) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
        Cmd::Compare(a) => print_files(run_compare(a)),
        Cmd::Report(a) => {
            let out = a
                .out
                .clone()
                .unwrap_or_else(|| a.journal_dir.join(&a.search_id));
            print_files(tuner::report::report(&a.journal_dir, &a.search_id, &out))
        }
        Cmd::Gate(a) => match run_gate(a) {
            Ok(code) => ExitCode::from(code),
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::from(2)
            }
        },
        Cmd::Search(a) => match run_search(*a) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

/// `K/N` with N ≥ 1 and K < N.
fn parse_shard(s: &str) -> anyhow::Result<(usize, usize)> {
    let bad = || anyhow::anyhow!("--shard {s:?}: expected K/N with 0 ≤ K < N, e.g. 0/8");
    let (k, n) = s.split_once('/').ok_or_else(bad)?;
    let (k, n): (usize, usize) = (
        k.trim().parse().map_err(|_| bad())?,
        n.trim().parse().map_err(|_| bad())?,
    );
    if n == 0 || k >= n {
        return Err(bad());
    }
    Ok((k, n))
}

/// The model a generation search spawns when no --spawn or --url is given: the embedded
/// synthetic SmolLM2-135M (no download, no GPU).
const GENERATION_MODEL: &str = "synthetic:smollm2-135m";

fn find_runtime() -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var("BATCHTUNE_RUNTIME") {
        return Ok(PathBuf::from(p));
    }
    let me = std::env::current_exe()?;
    let sibling = me.with_file_name(format!("runtime{}", std::env::consts::EXE_SUFFIX));
    if sibling.is_file() {
        return Ok(sibling);
    }
    anyhow::bail!(
        "cannot find the `runtime` binary next to {} ; build it with `cargo build --release -p runtime`, \
         set BATCHTUNE_RUNTIME, or pass --spawn/--url",
        me.display()
    )
}

fn run_compare(a: CompareArgs) -> anyhow::Result<Vec<PathBuf>> {
    let dur = |flag: &str, v: &str| {
        profiles::parse_duration(v).map_err(|e| anyhow::anyhow!("--{flag}: {e}"))
    };
    let targets = a
        .targets
        .iter()
        .map(|t| Target::parse(t).map_err(|e| anyhow::anyhow!("--target: {e}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let out_dir = a.results_dir.join(&a.name);
    if !a.import.is_empty() {
        let n = tuner::compare::import(&a.import, &out_dir)?;
        eprintln!(
            "imported {n} runs into {}",
            out_dir.join("runs.parquet").display()
        );
        let runs = results::store::read(&out_dir.join("runs.parquet"))?;
        let order: Vec<String> = a
            .import
            .iter()
            .filter_map(|s| s.split_once('=').map(|(l, _)| l.to_string()))
            .collect();
        return tuner::compare::draw(&runs, &order, &out_dir, &targets);
    }
    if a.redraw {
        let runs = results::store::read(&out_dir.join("runs.parquet"))?;
        if runs.is_empty() {
            anyhow::bail!("{}: no stored runs to redraw", out_dir.display());
        }
        let order: Vec<String> = a
            .profiles
            .iter()
            .map(|p| tuner::compare::label_of(p))
            .collect();
        return tuner::compare::draw(&runs, &order, &out_dir, &targets);
    }
    for p in &a.profiles {
        profiles::Profile::load(p)
            .map_err(|e| anyhow::anyhow!("--profiles {}: {e}", p.display()))?;
    }
    let workload = a.texts.workload(&a.workload)?;
    let opts = tuner::compare::CompareOptions {
        profiles: a.profiles.clone(),
        rates: tuner::compare::parse_rates(&a.rates).map_err(anyhow::Error::msg)?,
        out_dir,
        runtime: find_runtime()?,
        duration: dur("duration", &a.duration)?,
        warmup: dur("warmup", &a.warmup)?,
        repeat: a.repeat.max(1),
        targets,
        stop_when_saturated: !a.full,
        workload,
        verbose: !a.quiet,
    };
    tuner::compare::compare(&opts, ctrl_c_flag())
}

/// Prints the files a command wrote, one per line (for scripts), or the error.
fn print_files(r: anyhow::Result<Vec<PathBuf>>) -> ExitCode {
    match r {
        Ok(files) => {
            for f in files {
                println!("{}", f.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn gate_side(
    spec: &str,
    args: &[String],
    work: &std::path::Path,
    features: &[&str],
) -> anyhow::Result<tuner::gate::Side> {
    let path = PathBuf::from(spec);
    let binary = if path.is_file() {
        path
    } else {
        tuner::gate::build_revision(std::path::Path::new("."), spec, work, features)?
    };
    Ok(tuner::gate::Side {
        name: spec.to_string(),
        binary,
        args: args.to_vec(),
    })
}

fn run_gate(a: GateArgs) -> anyhow::Result<u8> {
    use tuner::gate;
    let c = gate::GateConfig::load(&a.config)?;
    let started = std::time::Instant::now();
    let candidate = match &a.candidate {
        // Calibration plants `--test-slowdown`, which exists only with the test hooks.
        Some(spec) if a.calibrate.is_some() => {
            gate_side(spec, &a.candidate_arg, &a.work_dir, &["test-hooks"])?
        }
        Some(spec) => gate_side(spec, &a.candidate_arg, &a.work_dir, &[])?,
        None => gate::Side {
            name: "current build".into(),
            binary: find_runtime()?,
            args: a.candidate_arg.clone(),
        },
    };
    let cancel = ctrl_c_flag();
    if let Some(n) = a.calibrate {
        return tuner::gate_calibration::calibrate(
            &c,
            &candidate,
            n,
            a.slowdown,
            &a.calibration_out,
            cancel,
        )
        .map(|_| 0);
    }
    let baseline = gate_side(&a.baseline, &a.baseline_arg, &a.work_dir, &[])?;
    let n = a
        .pairs
        .unwrap_or(if a.quick { c.quick_pairs } else { c.pairs })
        .max(2);
    eprintln!(
        "gate: baseline {} vs candidate {}, {n} interleaved pairs",
        baseline.binary.display(),
        candidate.binary.display()
    );
    let pairs = gate::measure(&c, &baseline, &candidate, n, cancel, &mut |i, p| {
        eprintln!(
            "  pair {:>2}: baseline {:>7.1} req/s p95 {:>9}  candidate {:>7.1} req/s p95 {:>9}",
            i + 1,
            p.a.throughput,
            loadgen::slo::format_secs(p.a.p95),
            p.b.throughput,
            loadgen::slo::format_secs(p.b.p95)
        )
    })?;
    if pairs.len() < 2 {
        anyhow::bail!("interrupted before two pairs were measured");
    }
    let d = gate::decide(&pairs, &c, 1);
    let md = gate::summary(
        &d,
        &c,
        &baseline,
        &candidate,
        &pairs,
        started.elapsed().as_secs_f64(),
    );
    std::fs::create_dir_all(&a.out)?;
    std::fs::write(a.out.join("summary.md"), &md)?;
    std::fs::write(
        a.out.join("gate.json"),
        serde_json::to_string_pretty(&serde_json::json!({
            "decision": d, "pairs": pairs, "baseline": baseline, "candidate": candidate,
            "seconds": started.elapsed().as_secs_f64(),
        }))?,
    )?;
    print!("{md}");
    Ok(d.verdict.exit_code())
}

/// A flag set by the first Ctrl-C, so a long measurement stops cleanly with what it has.
fn ctrl_c_flag() -> Arc<AtomicBool> {
    let cancel = Arc::new(AtomicBool::new(false));
    let c = cancel.clone();
    let _ = std::thread::Builder::new()
        .name("ctrl-c".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("signal runtime");
            rt.block_on(async {
                let _ = tokio::signal::ctrl_c().await;
            });
            eprintln!("\ninterrupted: stopping the current run; what finished is kept (journal or run store)");
            c.store(true, Ordering::Relaxed);
        });
    cancel
}

fn run_search(a: SearchArgs) -> anyhow::Result<()> {
    let dur = |flag: &str, v: &str| {
        profiles::parse_duration(v).map_err(|e| anyhow::anyhow!("--{flag}: {e}"))
    };
    for t in &a.targets {
        Target::parse(t).map_err(|e| anyhow::anyhow!("--target: {e}"))?;
    }
    let adapter = a
        .server
        .as_deref()
        .map(tuner::server::adapter::Adapter::load)
        .transpose()?;
    let space_text = a
        .space
        .as_ref()
        .map(|p| {
            std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("--space {}: {e}", p.display()))
        })
        .transpose()?;
    let space = match (&space_text, &adapter) {
        (Some(text), Some(ad)) => {
            // A narrower space over the adapter's own knobs.
            let s: Space = Space {
                knobs: toml::from_str(text).map_err(|e| anyhow::anyhow!("--space: {e}"))?,
            };
            s.check_shape()?;
            if let Some(k) = s.knobs.keys().find(|k| !ad.knobs.contains_key(*k)) {
                anyhow::bail!(
                    "--space: `{k}` is not a knob of {} (its knobs: {})",
                    ad.name,
                    ad.knobs.keys().cloned().collect::<Vec<_>>().join(", ")
                );
            }
            s
        }
        (Some(text), None) => Space::from_toml(text)?,
        (None, Some(ad)) => ad.space(),
        (None, None) => Space::default_space(),
    };
    let strategy = Strategy::parse(&a.strategy).map_err(anyhow::Error::msg)?;
    if !(a.rate_limit_fraction > 0.0 && a.rate_limit_fraction <= 1.0) {
        anyhow::bail!("--rate-limit-fraction must be in (0, 1]");
    }
    if a.budget == 0 {
        anyhow::bail!("--budget 0: a search needs at least 1 trial");
    }
    let shard = a.shard.as_deref().map(parse_shard).transpose()?;
    if shard.is_some() && strategy != Strategy::Grid {
        anyhow::bail!("--shard splits a grid: it needs --strategy grid");
    }
    let (workload, workload_spec) = match (&adapter, &a.workload) {
        (Some(_), Some(_)) => {
            anyhow::bail!("--workload and --server: the adapter's [workload] table decides")
        }
        (Some(ad), None) => (
            ad.workload(&a.texts.options()?)
                .map_err(|e| anyhow::anyhow!("{}: workload: {e}", ad.name))?,
            format!(
                "adapter {}",
                a.server
                    .as_deref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            ),
        ),
        (None, w) => {
            let spec = w.clone().unwrap_or_else(|| "embeddings".into());
            (a.texts.workload(&spec)?, spec)
        }
    };
    // Generation: requests take seconds, so the defaults change with the workload: the
    // generation space, the embedded generation model, probes long enough for several requests
    // per latency bound, and rates well below 1 request/s worth probing.
    let generation = workload.path.ends_with("/completions");
    let space = match (&a.space, generation, &adapter) {
        (None, true, None) => Space::generation_space(),
        _ => space,
    };
    let server = match (&adapter, &a.url, &a.spawn) {
        (Some(ad), _, _) => ServerSpec::External(Box::new(ad.clone())),
        (None, Some(u), _) => ServerSpec::Url(u.clone()),
        (None, None, Some(cmd)) => {
            ServerSpec::Spawn(cmd.split_whitespace().map(String::from).collect())
        }
        (None, None, None) => {
            let mut cmd = vec![find_runtime()?.display().to_string(), "serve".into()];
            if generation {
                cmd.extend(["--model".into(), GENERATION_MODEL.into()]);
            }
            ServerSpec::Spawn(cmd)
        }
    };
    let out = a.out.clone().unwrap_or_else(|| match &a.server {
        Some(f) => PathBuf::from(format!(
            "profiles/tuned-{}.toml",
            f.file_stem().unwrap_or_default().to_string_lossy()
        )),
        None => PathBuf::from("profiles/tuned.toml"),
    });
    let mut probe = ProbeSettings {
        duration: dur("probe", &a.probe)?,
        warmup: dur("probe-warmup", &a.probe_warmup)?,
        max_probes: a.max_probes.max(1),
        max_rate: a.max_rate,
        repeats: a.repeats.max(1),
        ..ProbeSettings::default()
    };
    if generation {
        let bound = a
            .targets
            .iter()
            .filter_map(|t| Target::parse(t).ok())
            .filter(|t| t.is_upper_bound() && t.metric != loadgen::slo::Metric::ErrorRate)
            .map(|t| t.value)
            .fold(0.0, f64::max);
        probe.duration = probe
            .duration
            .max(std::time::Duration::from_secs_f64((3.0 * bound).min(60.0)));
        probe.min_rate = 0.02;
        // Few enough clients that each request finishes inside the estimating run, unless the
        // server says how many sequences it batches (then that many fill it).
        probe.saturation_clients = 8;
        probe.saturation_fill = true;
        probe.saturation_secs = probe.duration.as_secs_f64();
    }
    let mut headers = Vec::new();
    if let Some(k) = &a.api_key {
        headers.push(("authorization".to_string(), format!("Bearer {k}")));
    }
    // First Ctrl-C: finish the current probe quickly and leave the journal consistent.
    let cancel = ctrl_c_flag();
    let out = search(
        SearchOptions {
            targets: a.targets.clone(),
            space,
            budget: a.budget,
            time: dur("time", &a.time)?,
            strategy,
            seed: a.seed,
            probe,
            workload_spec,
            workload,
            server,
            space_given: a.space.is_some(),
            out,
            journal_dir: a.journal_dir.clone(),
            resume: a.resume.clone(),
            rate_limit_fraction: a.rate_limit_fraction,
            leaders: a.leaders,
            quiet: a.quiet,
            headers,
            shard,
        },
        cancel,
    );
    match out {
        Ok(SearchOutcome {
            written,
            search_id,
            trials,
            ..
        }) if written.is_empty() => {
            println!(
                "search {search_id}: grid shard done, {} trials",
                trials.len()
            );
            Ok(())
        }
        Ok(SearchOutcome {
            profile,
            search_id,
            trials,
            best,
            best_rps,
            written,
            ..
        }) => {
            println!("search {search_id}: {} trials", trials.len());
            println!(
                "best: {}",
                best.iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
            match &profile {
                Some(p) => println!(
                    "sustainable rate {:.1} req/s; rate_limit set to {:.1} req/s",
                    best_rps, p.rate_limit
                ),
                None => println!("sustainable rate {best_rps:.1} req/s"),
            }
            let prov = profile.and_then(|p| p.provenance).unwrap_or_default();
            if let (Some(p95), Some(passed), Some(runs)) = (
                prov.get("p95_s"),
                prov.get("remeasured_passed"),
                prov.get("remeasured_runs"),
            ) {
                println!("confirmed by {passed}/{runs} probes at that rate; median p95 {p95}s");
            }
            if let Some(toml::Value::Array(i)) = prov.get("sustainable_rps_interval") {
                let show = |v: Option<&toml::Value>| match v {
                    Some(toml::Value::Float(x)) => format!("{x:.1}"),
                    Some(other) => other.to_string().trim_matches('"').to_string(),
                    None => "?".into(),
                };
                println!(
                    "interval: sustained at {} req/s, not at {} req/s",
                    show(i.first()),
                    show(i.get(1))
                );
            }
            for w in written {
                println!("wrote {}", w.display());
            }
            Ok(())
        }
        Err(e @ SearchError::Interrupted { .. }) => {
            eprintln!("{e}");
            std::process::exit(130);
        }
        Err(e) => Err(e.into()),
    }
}

fn run_replay(a: ReplayArgs) -> anyhow::Result<()> {
    use tuner::replay::{efficiency, uniform_baseline, Grid};
    let mut passes = Vec::new();
    for pass in &a.passes {
        let mut parts = Vec::new();
        for id in pass.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (_, header, trials) = tuner::journal::Journal::resume(&a.journal_dir, id)?;
            parts.push((header, trials));
        }
        passes.push(tuner::replay::merge_shards(parts).map_err(anyhow::Error::msg)?);
    }
    let (grid, agreement) = Grid::from_passes(passes).map_err(anyhow::Error::msg)?;
    let start = grid
        .header
        .space
        .from_profile(&profiles::Profile::default());
    let eff = efficiency(&grid, &start, a.fraction, a.seeds);
    let blind = uniform_baseline(&grid, a.fraction);
    // A sharded grid's id list is long; titles name the first shard and the count (the full
    // list stays in the JSON and in the replay command).
    let name = a
        .passes
        .iter()
        .map(|p| match p.split(',').count() {
            1 => p.clone(),
            n => format!("{} (+{} shards)", p.split(',').next().unwrap_or(""), n - 1),
        })
        .collect::<Vec<_>>()
        .join(" and ");
    let command = format!("tuner replay {}", a.passes.join(" "));
    let summary = serde_json::json!({
        "grid_search_id": a.passes.join(" "), "grid_size": grid.size(), "grid_best_rps": grid.best(),
        "goal_fraction": a.fraction, "seeds": a.seeds, "targets": grid.header.targets,
        "space": grid.header.space, "strategies": eff, "uniform_baseline": blind,
        "passes": agreement,
    });
    std::fs::write(
        format!("{}.json", a.out),
        serde_json::to_string_pretty(&summary)?,
    )?;
    // Repeated passes: say how far they agree, so a reader can tell signal from noise.
    let passes_line = if agreement.passes > 1 {
        let fmt = |v: &[f64]| {
            v.iter()
                .map(|x| format!("{x:.2}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!(
            " Each point's rate is the geometric mean of {} passes; later passes against the \
             first: rank correlation {}, median rate ratio {}.",
            agreement.passes,
            fmt(&agreement.rank_correlation),
            fmt(&agreement.median_ratio)
        )
    } else {
        String::new()
    };
    let mut md = format!(
        "# Search efficiency: trials to reach {:.0}% of the grid's best\n\nGrid {} ({} points, best {:.1} req/s, targets {}), \
         replayed offline with `{}`; median over {} seeds (Nelder-Mead and hill climbing start from the default \
         profile for seed 0 and from random grid points otherwise).\n\n{} of the {} points reach the goal; drawing grid points \
         uniformly without replacement needs {} trials (median; mean {:.1}), the yardstick below.{}\n\n\
         | strategy | median trials | share of grid | per seed |\n|---|---:|---:|---|\n",
        a.fraction * 100.0, name, grid.size(), grid.best(), grid.header.targets.join(" "), command, a.seeds,
        blind.within_goal, grid.size(), blind.median_trials, blind.mean_trials, passes_line
    );
    for e in &eff {
        let per: Vec<String> = e
            .trials
            .iter()
            .map(|t| t.map_or("never".into(), |n| n.to_string()))
            .collect();
        md += &format!(
            "| {} | {:.1} | {:.1}% | {} |\n",
            e.strategy,
            e.median_trials,
            e.median_fraction_of_grid * 100.0,
            per.join(" ")
        );
    }
    md += &format!(
        "| uniform draw (computed) | {} | {:.1}% | |\n",
        blind.median_trials,
        100.0 * blind.median_trials as f64 / grid.size() as f64
    );
    std::fs::write(format!("{}.md", a.out), &md)?;
    let traces: Vec<(String, Vec<f64>)> = eff
        .iter()
        .map(|e| (e.strategy.clone(), e.trace_seed0.clone()))
        .collect();
    results::plot::search_trace(
        &PathBuf::from(format!("{}-trace", a.out)),
        &format!(
            "Replay on grid {}: sustainable rate per trial until {:.0}% of the best (seed 0)",
            name,
            a.fraction * 100.0
        ),
        &traces,
    )
    .map_err(anyhow::Error::msg)?;
    print!("{md}");
    Ok(())
}
