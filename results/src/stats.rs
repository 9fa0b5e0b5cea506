//! Statistics across repeated runs: bootstrap confidence intervals for throughput and latency
//! percentiles, and an A/B ratio with its interval.
//!
//! Percentiles of several runs come from their *merged* histograms (resampled run by run), never
//! from averaging per-run percentiles: the average of two p99s is not the p99 of anything.

use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A point estimate with a two-sided confidence interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ci {
    /// The estimate on the data as observed.
    pub estimate: f64,
    /// Lower bound.
    pub lo: f64,
    /// Upper bound.
    pub hi: f64,
    /// Runs behind it (1: the interval is only the run itself, zero width).
    pub n: usize,
}

impl Ci {
    /// Too few runs to resample: the interval is the estimate itself.
    fn single(estimate: f64, n: usize) -> Ci {
        Ci {
            estimate,
            lo: estimate,
            hi: estimate,
            n,
        }
    }

    /// Half the interval's width relative to the estimate (0 when the estimate is 0).
    pub fn relative_half_width(&self) -> f64 {
        if self.estimate == 0.0 {
            0.0
        } else {
            (self.hi - self.lo) / 2.0 / self.estimate.abs()
        }
    }
}

/// Bootstrap settings. 2,000 resamples put the 95% bounds' own Monte-Carlo error well under the
/// run-to-run noise of any real server.
#[derive(Debug, Clone, Copy)]
pub struct Bootstrap {
    /// Resamples.
    pub iterations: usize,
    /// Confidence level, e.g. 0.95.
    pub level: f64,
    /// Seed: the same data and seed give the same interval.
    pub seed: u64,
}

impl Default for Bootstrap {
    fn default() -> Self {
        Bootstrap {
            iterations: 2000,
            level: 0.95,
            seed: 1,
        }
    }
}

/// Merges histograms (same units) into one.
pub fn merge(hists: &[&Histogram<u64>]) -> Histogram<u64> {
    let mut out = crate::hist::new_hist();
    for h in hists {
        out.add(*h).expect("histograms share the loadgen range");
    }
    out
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// The `q` quantile of sorted values (linear interpolation).
fn quantile_sorted(v: &[f64], q: f64) -> f64 {
    let pos = q.clamp(0.0, 1.0) * (v.len() - 1) as f64;
    let (i, frac) = (pos.floor() as usize, pos.fract());
    if i + 1 < v.len() {
        v[i] * (1.0 - frac) + v[i + 1] * frac
    } else {
        v[i]
    }
}

/// Percentile bootstrap of `stat` over resamples (with replacement) of `n` items.
fn bootstrap(n: usize, b: Bootstrap, estimate: f64, mut stat: impl FnMut(&[usize]) -> f64) -> Ci {
    if n < 2 {
        return Ci::single(estimate, n);
    }
    let mut rng = StdRng::seed_from_u64(b.seed);
    let mut idx = vec![0usize; n];
    let stats: Vec<f64> = (0..b.iterations.max(1))
        .map(|_| {
            idx.iter_mut().for_each(|i| *i = rng.random_range(0..n));
            stat(&idx)
        })
        .collect();
    percentile_interval(stats, estimate, n, b.level)
}

/// The percentile interval of bootstrap statistics at `level`.
fn percentile_interval(mut stats: Vec<f64>, estimate: f64, n: usize, level: f64) -> Ci {
    stats.sort_by(f64::total_cmp);
    let tail = (1.0 - level) / 2.0;
    Ci {
        estimate,
        lo: quantile_sorted(&stats, tail),
        hi: quantile_sorted(&stats, 1.0 - tail),
        n,
    }
}

/// Mean of per-run values (e.g. achieved throughput) with its bootstrap interval.
pub fn mean_ci(values: &[f64], b: Bootstrap) -> Ci {
    assert!(!values.is_empty(), "mean_ci needs at least one run");
    bootstrap(values.len(), b, mean(values), |idx| {
        idx.iter().map(|&i| values[i]).sum::<f64>() / idx.len() as f64
    })
}

/// Latency quantile `q` (0..1) of the merged histograms of several runs, in seconds
/// (histograms in microseconds, as loadgen records them), with a bootstrap interval that
/// resamples whole runs: run-to-run variation is what the interval must show.
pub fn quantile_ci(hists: &[&Histogram<u64>], q: f64, b: Bootstrap) -> Ci {
    assert!(!hists.is_empty(), "quantile_ci needs at least one run");
    let at = |h: &Histogram<u64>| h.value_at_quantile(q) as f64 / 1e6;
    let estimate = at(&merge(hists));
    bootstrap(hists.len(), b, estimate, |idx| {
        let pick: Vec<&Histogram<u64>> = idx.iter().map(|&i| hists[i]).collect();
        at(&merge(&pick))
    })
}

/// Ratio mean(b) ÷ mean(a) (candidate over baseline) with a bootstrap interval that resamples
/// the two sets independently.
pub fn ratio_ci(a: &[f64], b: &[f64], boot: Bootstrap) -> Ci {
    assert!(
        !a.is_empty() && !b.is_empty(),
        "ratio_ci needs runs on both sides"
    );
    let estimate = mean(b) / mean(a);
    let n = a.len().min(b.len());
    if n < 2 {
        return Ci::single(estimate, n);
    }
    let mut rng = StdRng::seed_from_u64(boot.seed);
    let mut draw = |v: &[f64]| {
        (0..v.len())
            .map(|_| v[rng.random_range(0..v.len())])
            .sum::<f64>()
            / v.len() as f64
    };
    let stats: Vec<f64> = (0..boot.iterations.max(1))
        .map(|_| {
            let ma = draw(a);
            draw(b) / ma
        })
        .collect();
    percentile_interval(stats, estimate, n, boot.level)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hist(values_us: impl IntoIterator<Item = u64>) -> Histogram<u64> {
        let mut h = crate::hist::new_hist();
        for v in values_us {
            h.record(v).unwrap();
        }
        h
    }

    #[test]
    fn constant_data_gives_a_zero_width_interval() {
        let ci = mean_ci(&[42.0; 8], Bootstrap::default());
        assert_eq!((ci.estimate, ci.lo, ci.hi, ci.n), (42.0, 42.0, 42.0, 8));
        let r = ratio_ci(&[10.0; 5], &[11.0; 5], Bootstrap::default());
        assert!(
            (r.estimate - 1.1).abs() < 1e-12
                && (r.lo - 1.1).abs() < 1e-12
                && (r.hi - 1.1).abs() < 1e-12
        );
    }

    #[test]
    fn merged_percentiles_are_not_averaged_percentiles() {
        // Run A: 1..=1000 µs; run B: 1001..=2000 µs. Together: 1..=2000, so p99 = 1980 µs,
        // while the average of the two runs' p99s would be (990 + 1990) / 2 = 1490 µs.
        let a = hist(1..=1000);
        let b = hist(1001..=2000);
        let p99 = quantile_ci(&[&a, &b], 0.99, Bootstrap::default()).estimate;
        assert!((p99 - 1980e-6).abs() < 2e-6, "{p99}");
        let p50 = quantile_ci(&[&a, &b], 0.50, Bootstrap::default()).estimate;
        assert!((p50 - 1000e-6).abs() < 2e-6, "{p50}");
    }

    #[test]
    fn the_mean_interval_covers_the_true_mean_about_95_percent_of_the_time() {
        // 400 experiments of 30 draws from a uniform on [0, 20] (true mean 10). A percentile
        // bootstrap at n = 30 covers a little under its nominal 95%.
        let mut rng = StdRng::seed_from_u64(7);
        let mut covered = 0;
        for e in 0..400u64 {
            let v: Vec<f64> = (0..30).map(|_| rng.random_range(0.0..20.0)).collect();
            let ci = mean_ci(
                &v,
                Bootstrap {
                    iterations: 500,
                    seed: e,
                    ..Default::default()
                },
            );
            if ci.lo <= 10.0 && 10.0 <= ci.hi {
                covered += 1;
            }
        }
        let rate = covered as f64 / 400.0;
        assert!((0.89..=0.985).contains(&rate), "coverage {rate}");
    }

    #[test]
    fn a_ten_percent_slowdown_is_resolved_from_noisy_runs() {
        // Baseline ≈ 100 ± 3, candidate ≈ 90 ± 3 (uniform noise): the ratio interval must sit
        // around 0.9 and exclude 1.
        let mut rng = StdRng::seed_from_u64(3);
        let a: Vec<f64> = (0..20)
            .map(|_| 100.0 + rng.random_range(-3.0..3.0))
            .collect();
        let b: Vec<f64> = (0..20)
            .map(|_| 90.0 + rng.random_range(-3.0..3.0))
            .collect();
        let r = ratio_ci(&a, &b, Bootstrap::default());
        assert!(
            r.hi < 1.0 && r.lo > 0.85 && (r.estimate - 0.9).abs() < 0.02,
            "{r:?}"
        );
    }

    #[test]
    fn run_to_run_spread_widens_the_percentile_interval() {
        let tight = [hist(1000..=1100), hist(1000..=1100), hist(1000..=1100)];
        let loose = [hist(500..=600), hist(1000..=1100), hist(2000..=2100)];
        let t = quantile_ci(
            &tight.iter().collect::<Vec<_>>(),
            0.95,
            Bootstrap::default(),
        );
        let l = quantile_ci(
            &loose.iter().collect::<Vec<_>>(),
            0.95,
            Bootstrap::default(),
        );
        assert!(t.hi - t.lo < 5e-6, "{t:?}");
        assert!(l.hi - l.lo > 1e-3, "{l:?}");
    }
}
