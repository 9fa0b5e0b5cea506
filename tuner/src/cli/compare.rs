//! `tuner compare`: profiles swept over one grid of rates, or stored runs imported or redrawn.

use super::{ctrl_c_flag, find_runtime, TextArgs};
use loadgen::slo::Target;
use std::path::PathBuf;

#[derive(clap::Args)]
pub(crate) struct CompareArgs {
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

/// Runs `tuner compare`; the files it wrote.
pub(crate) fn run(a: CompareArgs) -> anyhow::Result<Vec<PathBuf>> {
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
