//! Calibration of the gate on this machine: how often does it cry wolf, how often does it catch a
//! real 10% slowdown, and how long does it take?
//!
//! Measures `n` A/A pairs (the candidate against itself) and `n` A/B pairs against the same binary
//! with the test-only planted slowdown, then judges quick gates built from those pairs: every
//! disjoint block of `quick_pairs` consecutive pairs (real gates, as CI would run them) and 2,000
//! gates drawn at random without replacement from each pool (more gates, same data; they assume
//! pairs are exchangeable, which the interleaving is there to make true).

use crate::gate::{self, decide, GateConfig, Pair, Side, Verdict};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Serialize;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

/// Verdict counts over a set of gates.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Tally {
    /// Gates judged.
    pub gates: usize,
    /// Pass verdicts.
    pub pass: usize,
    /// Regression verdicts.
    pub regression: usize,
    /// Inconclusive verdicts.
    pub inconclusive: usize,
}

impl Tally {
    fn add(&mut self, v: Verdict) {
        self.gates += 1;
        match v {
            Verdict::Pass => self.pass += 1,
            Verdict::Regression => self.regression += 1,
            Verdict::Inconclusive => self.inconclusive += 1,
        }
    }

    /// Share of gates with a regression verdict.
    pub fn regression_rate(&self) -> f64 {
        self.regression as f64 / self.gates.max(1) as f64
    }
}

/// Judges every disjoint block of `k` pairs.
pub fn blocks(pairs: &[Pair], k: usize, c: &GateConfig) -> Tally {
    let mut t = Tally::default();
    for (i, chunk) in pairs.chunks_exact(k).enumerate() {
        t.add(decide(chunk, c, i as u64 + 1).verdict);
    }
    t
}

/// Judges `gates` random subsets of `k` distinct pairs.
pub fn drawn(pairs: &[Pair], k: usize, gates: usize, c: &GateConfig, seed: u64) -> Tally {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut t = Tally::default();
    let mut idx: Vec<usize> = (0..pairs.len()).collect();
    for g in 0..gates {
        idx.shuffle(&mut rng);
        let pick: Vec<Pair> = idx[..k].iter().map(|&i| pairs[i]).collect();
        t.add(decide(&pick, c, g as u64 + 1).verdict);
    }
    t
}

/// Runs the calibration and writes `<stem>.json` and `<stem>.md`.
pub fn calibrate(
    c: &GateConfig,
    binary: &Side,
    n: usize,
    slowdown: f64,
    stem: &str,
    cancel: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let k = c.quick_pairs;
    anyhow::ensure!(
        n >= 2 * k,
        "--calibrate {n}: need at least 2 × quick_pairs = {}",
        2 * k
    );
    let same = Side {
        name: format!("{} (A/A)", binary.name),
        ..binary.clone()
    };
    let slowed = Side {
        name: format!("{} with --test-slowdown={slowdown}", binary.name),
        args: [
            binary.args.clone(),
            vec![format!("--test-slowdown={slowdown}")],
        ]
        .concat(),
        ..binary.clone()
    };
    let line = |tag: &'static str| {
        move |i: usize, p: &Pair| {
            eprintln!(
                "  {tag} pair {:>3}: {:>7.1} vs {:>7.1} req/s (ratio {:.3})",
                i + 1,
                p.a.throughput,
                p.b.throughput,
                p.b.throughput / p.a.throughput
            )
        }
    };
    let t0 = Instant::now();
    let aa = gate::measure(c, binary, &same, n, cancel.clone(), &mut line("A/A"))?;
    let aa_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let ab = gate::measure(c, binary, &slowed, n, cancel, &mut line("A/B"))?;
    let ab_s = t1.elapsed().as_secs_f64();
    let per_pair = (aa_s + ab_s) / (aa.len() + ab.len()).max(1) as f64;
    let aa_blocks = blocks(&aa, k, c);
    let ab_blocks = blocks(&ab, k, c);
    let aa_drawn = drawn(&aa, k, 2000, c, 11);
    let ab_drawn = drawn(&ab, k, 2000, c, 12);
    let ratios = |v: &[Pair]| {
        v.iter()
            .map(|p| p.b.throughput / p.a.throughput)
            .collect::<Vec<_>>()
    };
    let spread = |v: &[f64]| {
        let m = v.iter().sum::<f64>() / v.len() as f64;
        (
            m,
            (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1).max(1) as f64).sqrt(),
        )
    };
    let (aa_m, aa_sd) = spread(&ratios(&aa));
    let (ab_m, ab_sd) = spread(&ratios(&ab));
    let json = serde_json::json!({
        "config": c, "pairs_per_pool": n, "slowdown": slowdown, "quick_pairs": k,
        "seconds_per_pair": per_pair,
        "aa": {"pairs": aa, "blocks": aa_blocks, "drawn": aa_drawn, "ratio_mean": aa_m, "ratio_sd": aa_sd},
        "ab": {"pairs": ab, "blocks": ab_blocks, "drawn": ab_drawn, "ratio_mean": ab_m, "ratio_sd": ab_sd},
        "host_cpu": results::host::host_cpu(), "git_revision": results::host::git_revision(),
    });
    std::fs::write(format!("{stem}.json"), serde_json::to_string_pretty(&json)?)?;
    let md = format!(
        "# Gate calibration\n\n`tuner gate --calibrate {n} --slowdown {slowdown}` on {} (revision {}): {n} A/A pairs \
         (the runtime against itself) and {n} A/B pairs (against itself with the test-only `--test-slowdown={slowdown}`), \
         closed loop of {} clients, {} per run after {} warm-up; quick gates of {k} pairs.\n\n\
         | | A/A (same code) | A/B ({:.0}% slower) |\n|---|---:|---:|\n\
         | throughput ratio per pair, mean ± sd | {:.3} ± {:.3} | {:.3} ± {:.3} |\n\
         | disjoint quick gates | {} | {} |\n\
         | … regression verdicts | {} ({:.1}%) | {} ({:.1}%) |\n\
         | … inconclusive | {} | {} |\n\
         | 2,000 quick gates drawn from the pairs: regression | {:.2}% | {:.1}% |\n\
         | … inconclusive | {:.2}% | {:.1}% |\n\n\
         False-alarm rate (A/A regression verdicts): {:.2}% of drawn gates, {} of {} disjoint gates. \
         Detection rate of a {:.0}% slowdown: {:.1}% of drawn gates, {} of {} disjoint gates. \
         Measurement time per quick gate: {:.0} s ({:.1} s per pair, both servers already built and started).\n",
        results::host::host_cpu(),
        results::host::git_revision(),
        c.concurrency,
        c.duration,
        c.warmup,
        slowdown * 100.0,
        aa_m, aa_sd, ab_m, ab_sd,
        aa_blocks.gates, ab_blocks.gates,
        aa_blocks.regression, aa_blocks.regression_rate() * 100.0,
        ab_blocks.regression, ab_blocks.regression_rate() * 100.0,
        aa_blocks.inconclusive, ab_blocks.inconclusive,
        aa_drawn.regression_rate() * 100.0, ab_drawn.regression_rate() * 100.0,
        aa_drawn.inconclusive as f64 / 20.0, ab_drawn.inconclusive as f64 / 20.0,
        aa_drawn.regression_rate() * 100.0, aa_blocks.regression, aa_blocks.gates,
        slowdown * 100.0, ab_drawn.regression_rate() * 100.0, ab_blocks.regression, ab_blocks.gates,
        per_pair * k as f64, per_pair,
    );
    std::fs::write(format!("{stem}.md"), &md)?;
    print!("{md}");
    Ok(())
}
