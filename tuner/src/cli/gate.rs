//! `tuner gate`: the performance-regression gate's flags, its two sides, and its report files.

use super::{ctrl_c_flag, find_runtime};
use std::path::PathBuf;

#[derive(clap::Args)]
pub(crate) struct GateArgs {
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

/// A side of the gate: a runtime binary's path, or a git revision built in `work`.
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

/// Runs `tuner gate`; the verdict's exit code.
pub(crate) fn run(a: GateArgs) -> anyhow::Result<u8> {
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
