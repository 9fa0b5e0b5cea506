//! `tuner gate`: is the candidate runtime slower than the baseline, beyond this machine's noise?
//!
//! Both runtimes serve the same fixed profile side by side; the benchmark (a closed loop at fixed
//! concurrency) alternates between them A B, B A, A B… so drift in the machine (thermal, other
//! tenants) hits both equally. Each pair gives a ratio candidate ÷ baseline for throughput and
//! p95; the verdict comes from a bootstrap confidence interval on the mean ratio:
//!
//! - **regression**: throughput ratio's upper bound < 1 and its estimate < 1 − tolerance, or p95
//!   ratio's lower bound > 1 and its estimate > 1 + latency tolerance;
//! - **inconclusive**: no regression shown, but an interval is wider than `max_ci_width` (the
//!   machine was too noisy to clear the candidate);
//! - **pass** otherwise.

use crate::server::Target as Server;
use loadgen::slo::Observed;
use loadgen::workload::{TextOptions, Workload};
use loadgen::{Config, Mode};
use results::stats::{self, Bootstrap, Ci};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// `ci/gate.toml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GateConfig {
    /// Profile both runtimes serve (the embedded default model unless it names another).
    pub profile: PathBuf,
    /// Closed-loop clients.
    pub concurrency: usize,
    /// Measured time per run.
    pub duration: String,
    /// Warm-up per run.
    pub warmup: String,
    /// Pairs (one baseline run + one candidate run each) in a full gate.
    pub pairs: usize,
    /// Pairs in `--quick` mode (CI).
    pub quick_pairs: usize,
    /// Throughput loss that still passes (0.05: up to 5% slower is accepted).
    pub tolerance: f64,
    /// p95 growth that still passes.
    pub latency_tolerance: f64,
    /// Widest acceptable interval (hi − lo, as a ratio) before a non-regression is inconclusive.
    pub max_ci_width: f64,
    /// Confidence level of the intervals.
    pub level: f64,
}

impl GateConfig {
    /// Reads and checks a gate configuration.
    pub fn load(path: &Path) -> anyhow::Result<GateConfig> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let c: GateConfig =
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let bad = |why: String| anyhow::anyhow!("{}: {why}", path.display());
        if c.concurrency == 0 || c.pairs < 2 || c.quick_pairs < 2 {
            return Err(bad(
                "concurrency ≥ 1, pairs ≥ 2 and quick_pairs ≥ 2 are required".into(),
            ));
        }
        for (name, v) in [
            ("tolerance", c.tolerance),
            ("latency_tolerance", c.latency_tolerance),
            ("max_ci_width", c.max_ci_width),
        ] {
            if !(v > 0.0 && v < 1.0) {
                return Err(bad(format!("{name} = {v}: must be in (0, 1)")));
            }
        }
        if !(c.level > 0.5 && c.level < 1.0) {
            return Err(bad(format!("level = {}: must be in (0.5, 1)", c.level)));
        }
        profiles::parse_duration(&c.duration).map_err(|e| bad(format!("duration: {e}")))?;
        profiles::parse_duration(&c.warmup).map_err(|e| bad(format!("warmup: {e}")))?;
        Ok(c)
    }
}

/// One side of the comparison: a runtime binary and extra `serve` arguments.
#[derive(Debug, Clone, Serialize)]
pub struct Side {
    /// What the user named: a revision, a file, or `current build`.
    pub name: String,
    /// The binary.
    pub binary: PathBuf,
    /// Extra arguments to `runtime serve` (e.g. the test-only `--test-slowdown 0.1`).
    pub args: Vec<String>,
}

/// One measured run.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Sample {
    /// Requests per second: clients ÷ mean response time (Little's law for a closed loop).
    pub throughput: f64,
    /// p95 latency, seconds.
    pub p95: f64,
}

/// One A/B pair.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Pair {
    /// Baseline run.
    pub a: Sample,
    /// Candidate run.
    pub b: Sample,
    /// True when the candidate ran first.
    pub b_first: bool,
}

/// The verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// No slowdown beyond the tolerance, with a tight enough interval.
    Pass,
    /// A slowdown beyond the tolerance, with confidence.
    Regression,
    /// Too noisy to tell.
    Inconclusive,
}

impl Verdict {
    /// Process exit code: 0 pass, 1 regression, 3 inconclusive (2 is a usage or set-up error).
    pub fn exit_code(self) -> u8 {
        match self {
            Verdict::Pass => 0,
            Verdict::Regression => 1,
            Verdict::Inconclusive => 3,
        }
    }
}

/// Intervals and verdict of a set of pairs.
#[derive(Debug, Clone, Serialize)]
pub struct Decision {
    /// Verdict.
    pub verdict: Verdict,
    /// Candidate ÷ baseline throughput (mean of paired ratios) and its interval.
    pub throughput_ratio: (f64, f64, f64),
    /// Candidate ÷ baseline p95 and its interval.
    pub p95_ratio: (f64, f64, f64),
    /// Why, in one sentence.
    pub reason: String,
}

fn triple(c: Ci) -> (f64, f64, f64) {
    (c.estimate, c.lo, c.hi)
}

/// The decision rule (pure, so it is tested on synthetic pairs and replayed for calibration).
pub fn decide(pairs: &[Pair], c: &GateConfig, seed: u64) -> Decision {
    let boot = Bootstrap {
        iterations: 2000,
        level: c.level,
        seed,
    };
    let tr: Vec<f64> = pairs
        .iter()
        .map(|p| p.b.throughput / p.a.throughput.max(1e-9))
        .collect();
    let lr: Vec<f64> = pairs.iter().map(|p| p.b.p95 / p.a.p95.max(1e-9)).collect();
    let t = stats::mean_ci(&tr, boot);
    let l = stats::mean_ci(&lr, boot);
    let (verdict, reason) = if t.hi < 1.0 && t.estimate < 1.0 - c.tolerance {
        (
            Verdict::Regression,
            format!(
                "throughput {:.1}% lower (interval {:.1}% to {:.1}%), beyond the {:.0}% tolerance",
                (1.0 - t.estimate) * 100.0,
                (1.0 - t.hi) * 100.0,
                (1.0 - t.lo) * 100.0,
                c.tolerance * 100.0
            ),
        )
    } else if l.lo > 1.0 && l.estimate > 1.0 + c.latency_tolerance {
        (
            Verdict::Regression,
            format!(
                "p95 {:.1}% higher (interval {:.1}% to {:.1}%), beyond the {:.0}% tolerance",
                (l.estimate - 1.0) * 100.0,
                (l.lo - 1.0) * 100.0,
                (l.hi - 1.0) * 100.0,
                c.latency_tolerance * 100.0
            ),
        )
    } else if t.hi - t.lo > c.max_ci_width || l.hi - l.lo > c.max_ci_width {
        (
            Verdict::Inconclusive,
            format!(
                "no regression shown, but the intervals (throughput {:.3}, p95 {:.3} wide) exceed {:.3}: \
                 the machine was too noisy to clear the candidate",
                t.hi - t.lo,
                l.hi - l.lo,
                c.max_ci_width
            ),
        )
    } else {
        (
            Verdict::Pass,
            format!(
                "throughput ratio {:.3} [{:.3}, {:.3}], p95 ratio {:.3} [{:.3}, {:.3}]: within tolerance",
                t.estimate, t.lo, t.hi, l.estimate, l.lo, l.hi
            ),
        )
    };
    Decision {
        verdict,
        throughput_ratio: triple(t),
        p95_ratio: triple(l),
        reason,
    }
}

/// Builds the runtime at `rev` in a worktree under `work` and returns the binary's path (copied
/// out, so later builds do not overwrite it). Dependencies compile once into `work/target` and
/// are reused by every later revision. `features` are the runtime's cargo features (the
/// calibration needs `test-hooks` for `--test-slowdown`).
pub fn build_revision(
    repo: &Path,
    rev: &str,
    work: &Path,
    features: &[&str],
) -> anyhow::Result<PathBuf> {
    let run = |c: &mut Command| -> anyhow::Result<String> {
        let out = c.output()?;
        if !out.status.success() {
            anyhow::bail!(
                "{:?} failed: {}",
                c,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let sha = run(Command::new("git").current_dir(repo).args([
        "rev-parse",
        "--verify",
        &format!("{rev}^{{commit}}"),
    ]))
    .map_err(|e| anyhow::anyhow!("revision `{rev}`: {e}"))?;
    let short = &sha[..12.min(sha.len())];
    std::fs::create_dir_all(work)?;
    // Absolute: cargo runs inside the worktree and would resolve a relative target dir there.
    let work = &std::fs::canonicalize(work)?;
    let tag: String = features.iter().map(|f| format!("-{f}")).collect();
    let out = work.join(format!("runtime-{short}{tag}"));
    if out.is_file() {
        return Ok(out);
    }
    let tree = work.join(format!("src-{short}"));
    if !tree.exists() {
        run(Command::new("git")
            .current_dir(repo)
            .args(["worktree", "add", "--detach", "--force"])
            .arg(&tree)
            .arg(&sha))?;
    }
    eprintln!("gate: building the runtime at {rev} ({short})…");
    let status = Command::new("cargo")
        .current_dir(&tree)
        .args(["build", "--release", "-p", "runtime", "--quiet"])
        .args(features.iter().flat_map(|f| ["--features", f]))
        .env("CARGO_TARGET_DIR", work.join("target"))
        .status()?;
    if !status.success() {
        anyhow::bail!("building the runtime at {rev} failed");
    }
    let built = work.join("target/release/runtime");
    std::fs::copy(&built, &out)
        .map_err(|e| anyhow::anyhow!("copying {} to {}: {e}", built.display(), out.display()))?;
    let _ = Command::new("git")
        .current_dir(repo)
        .args(["worktree", "remove", "--force"])
        .arg(&tree)
        .status();
    Ok(out)
}

/// Measures `n` interleaved pairs. `progress` gets one line per pair.
pub fn measure(
    c: &GateConfig,
    baseline: &Side,
    candidate: &Side,
    n: usize,
    cancel: Arc<AtomicBool>,
    progress: &mut dyn FnMut(usize, &Pair),
) -> anyhow::Result<Vec<Pair>> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let start = |s: &Side| {
        let mut cmd = vec![
            s.binary.display().to_string(),
            "serve".into(),
            "--profile".into(),
            c.profile.display().to_string(),
        ];
        cmd.extend(s.args.iter().cloned());
        rt.block_on(Server::spawn(cmd))
    };
    let mut a = start(baseline)?;
    let mut b = start(candidate)?;
    let workload =
        Workload::from_spec("embeddings", &TextOptions::default()).map_err(anyhow::Error::msg)?;
    let duration = profiles::parse_duration(&c.duration).map_err(anyhow::Error::msg)?;
    let warmup = profiles::parse_duration(&c.warmup).map_err(anyhow::Error::msg)?;
    let run = |url: &str, seed: u64| -> anyhow::Result<Sample> {
        let mut cfg = Config::new(
            url,
            Mode::Closed {
                concurrency: c.concurrency,
            },
            workload.clone(),
        );
        cfg.duration = duration;
        cfg.warmup = warmup;
        cfg.seed = seed;
        cfg.timeout = Duration::from_secs(60);
        cfg.cancel = Some(cancel.clone());
        let r = rt.block_on(loadgen::run(cfg))?;
        if r.ok == 0 {
            anyhow::bail!("{url}: no successful request in a gate run");
        }
        // Closed loop: throughput = clients ÷ mean response time (Little's law). Counting
        // completions instead is quantised by the batch: 8 clients answered 8 at a time give
        // only multiples of 8 ÷ duration, a 4% step at 3 s, coarser than the effect sought.
        Ok(Sample {
            throughput: c.concurrency as f64 / r.latency.mean.max(1e-9),
            p95: r.latency_quantile(0.95),
        })
    };
    let mut pairs = Vec::with_capacity(n);
    for i in 0..n {
        if cancel.load(Ordering::Relaxed) {
            break;
        }
        let b_first = i % 2 == 1;
        let (sa, sb) = if b_first {
            let sb = run(&b.url, i as u64)?;
            (run(&a.url, i as u64)?, sb)
        } else {
            let sa = run(&a.url, i as u64)?;
            (sa, run(&b.url, i as u64)?)
        };
        let p = Pair {
            a: sa,
            b: sb,
            b_first,
        };
        progress(i, &p);
        pairs.push(p);
    }
    a.stop();
    b.stop();
    Ok(pairs)
}

/// Markdown summary for a pull-request comment.
pub fn summary(
    d: &Decision,
    c: &GateConfig,
    baseline: &Side,
    candidate: &Side,
    pairs: &[Pair],
    secs: f64,
) -> String {
    let icon = match d.verdict {
        Verdict::Pass => "✅ pass",
        Verdict::Regression => "❌ regression",
        Verdict::Inconclusive => "⚠️ inconclusive",
    };
    let mut s = format!(
        "### Performance gate: {icon}\n\n{}\n\n| | estimate | {:.0}% interval |\n|---|---:|---:|\n\
         | throughput, candidate ÷ baseline | {:.3} | [{:.3}, {:.3}] |\n| p95, candidate ÷ baseline | {:.3} | [{:.3}, {:.3}] |\n\n\
         Baseline `{}`, candidate `{}`{}; profile `{}`, closed loop with {} clients, {} per run after {} warm-up; \
         {} interleaved pairs; tolerance {:.0}% throughput / {:.0}% p95; {:.0} s.\n",
        d.reason,
        c.level * 100.0,
        d.throughput_ratio.0,
        d.throughput_ratio.1,
        d.throughput_ratio.2,
        d.p95_ratio.0,
        d.p95_ratio.1,
        d.p95_ratio.2,
        baseline.name,
        candidate.name,
        if candidate.args.is_empty() {
            String::new()
        } else {
            format!(" (with `{}`)", candidate.args.join(" "))
        },
        c.profile.display(),
        c.concurrency,
        c.duration,
        c.warmup,
        pairs.len(),
        c.tolerance * 100.0,
        c.latency_tolerance * 100.0,
        secs
    );
    s.push_str("\n<details><summary>pairs</summary>\n\n| # | order | baseline req/s | candidate req/s | baseline p95 | candidate p95 |\n|---:|---|---:|---:|---:|---:|\n");
    for (i, p) in pairs.iter().enumerate() {
        s.push_str(&format!(
            "| {} | {} | {:.1} | {:.1} | {} | {} |\n",
            i + 1,
            if p.b_first { "B A" } else { "A B" },
            p.a.throughput,
            p.b.throughput,
            loadgen::slo::format_secs(p.a.p95),
            loadgen::slo::format_secs(p.b.p95)
        ));
    }
    s.push_str("\n</details>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn config() -> GateConfig {
        GateConfig {
            profile: "profiles/default.toml".into(),
            concurrency: 8,
            duration: "3s".into(),
            warmup: "1s".into(),
            pairs: 8,
            quick_pairs: 6,
            tolerance: 0.05,
            latency_tolerance: 0.10,
            max_ci_width: 0.15,
            level: 0.95,
        }
    }

    /// Pairs whose candidate is `slow` slower, with ±`noise` uniform noise on every run.
    fn pairs(n: usize, slow: f64, noise: f64, seed: u64) -> Vec<Pair> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut s = |base: f64| base * (1.0 + rng.random_range(-noise..noise));
        (0..n)
            .map(|i| Pair {
                a: Sample {
                    throughput: s(100.0),
                    p95: s(0.2),
                },
                b: Sample {
                    throughput: s(100.0 * (1.0 - slow)),
                    p95: s(0.2 / (1.0 - slow)),
                },
                b_first: i % 2 == 1,
            })
            .collect()
    }

    #[test]
    fn same_code_passes_and_a_ten_percent_slowdown_is_a_regression() {
        let c = config();
        assert_eq!(
            decide(&pairs(6, 0.0, 0.03, 1), &c, 1).verdict,
            Verdict::Pass
        );
        let d = decide(&pairs(6, 0.10, 0.03, 2), &c, 1);
        assert_eq!(d.verdict, Verdict::Regression, "{}", d.reason);
        assert!((d.throughput_ratio.0 - 0.9).abs() < 0.03);
    }

    #[test]
    fn a_noisy_machine_is_inconclusive_not_a_regression() {
        let d = decide(&pairs(4, 0.0, 0.30, 3), &config(), 1);
        assert_eq!(d.verdict, Verdict::Inconclusive, "{}", d.reason);
    }

    #[test]
    fn a_slowdown_inside_the_tolerance_passes() {
        let d = decide(&pairs(8, 0.02, 0.01, 4), &config(), 1);
        assert_eq!(d.verdict, Verdict::Pass, "{}", d.reason);
    }

    #[test]
    fn the_shipped_config_loads_and_bad_values_are_named() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        GateConfig::load(&root.join("ci/gate.toml")).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("g.toml");
        let text = std::fs::read_to_string(root.join("ci/gate.toml"))
            .unwrap()
            .replace("tolerance = 0.05", "tolerance = 1.5");
        std::fs::write(&p, text).unwrap();
        let e = GateConfig::load(&p).unwrap_err().to_string();
        assert!(e.contains("tolerance = 1.5"), "{e}");
    }
}
