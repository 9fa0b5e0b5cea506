//! One trial: the highest offered rate a configuration sustains while meeting every target,
//! found by bracketing (doubling/halving) then bisecting on the rate. Each probe is an open-loop
//! loadgen run that stops early once a target is clearly missed.

use loadgen::schedule::{Arrival, Rate};
use loadgen::slo::{Metric, Observed, Target};
use loadgen::workload::Workload;
use loadgen::{Config, Mode, Report};
use serde::{Deserialize, Serialize};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

/// How probes are run and judged.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ProbeSettings {
    /// Measured time per probe.
    pub duration: Duration,
    /// Warm-up per probe.
    pub warmup: Duration,
    /// Stability tolerance (throughput over the last 3 windows), percent.
    pub stability_percent: f64,
    /// Lowest rate worth probing; below it the configuration sustains "nothing".
    pub min_rate: f64,
    /// Highest rate probed.
    pub max_rate: f64,
    /// Stop bisecting when hi/lo is below 1 + this.
    pub tolerance: f64,
    /// Most probes per trial.
    pub max_probes: usize,
    /// Arrival process.
    pub arrival: String,
}

impl Default for ProbeSettings {
    fn default() -> Self {
        ProbeSettings {
            duration: Duration::from_secs(4),
            warmup: Duration::from_secs(1),
            stability_percent: 15.0,
            min_rate: 0.5,
            max_rate: 100_000.0,
            tolerance: 0.1,
            max_probes: 7,
            arrival: "poisson".into(),
        }
    }
}

/// One probe's verdict.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Probe {
    /// Offered rate.
    pub rate: f64,
    /// All conditions held.
    pub pass: bool,
    /// Why it failed (empty when it passed).
    pub reason: String,
    /// Successes per second.
    pub achieved_rps: f64,
    /// Corrected latency percentiles, seconds.
    pub p50: f64,
    /// p95.
    pub p95: f64,
    /// p99.
    pub p99: f64,
    /// Errors ÷ scheduled.
    pub error_rate: f64,
}

/// A finished trial.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RateResult {
    /// Highest rate that passed (0 when none did).
    pub sustainable_rps: f64,
    /// Lowest rate that failed above it (the bracket's upper end; None if none failed).
    pub failed_rps: Option<f64>,
    /// Every probe, in order.
    pub probes: Vec<Probe>,
}

/// Every target, plus the implicit ones: error_rate < 1% unless an error target is given.
pub fn effective_targets(targets: &[Target]) -> Vec<Target> {
    let mut t = targets.to_vec();
    if !t.iter().any(|x| x.metric == Metric::ErrorRate) {
        t.push(Target::parse("error_rate<1%").expect("static target"));
    }
    t
}

/// The generator's lag is acceptable up to 5% of the tightest latency bound (at least 1 ms): on a
/// machine shared with the server, sub-millisecond pacing is not what decides a 4 s target.
pub fn lag_allowance(targets: &[Target]) -> Duration {
    let tightest = targets
        .iter()
        .filter(|t| {
            matches!(t.metric, Metric::Percentile(_) | Metric::Mean | Metric::Max)
                && t.is_upper_bound()
        })
        .map(|t| t.value)
        .fold(f64::INFINITY, f64::min);
    let secs = if tightest.is_finite() {
        (tightest * 0.05).max(1e-3)
    } else {
        1e-3
    };
    Duration::from_secs_f64(secs)
}

/// Judges a finished probe.
pub fn judge(r: &Report, targets: &[Target], settings: &ProbeSettings) -> (bool, String) {
    let mut why = Vec::new();
    if let Some(s) = &r.stopped_early {
        why.push(format!("stopped early: {s}"));
    }
    for t in targets {
        if !t.holds(r) {
            why.push(format!("{t} missed ({})", t.format_value(t.observe(r))));
        }
    }
    if r.achieved_rps < 0.95 * r.offered_rps {
        why.push(format!(
            "achieved {:.1}/s < 95% of offered {:.1}/s",
            r.achieved_rps, r.offered_rps
        ));
    }
    if !r.valid {
        why.extend(r.invalid_reasons.iter().cloned());
    }
    if let Some(msg) = unstable(&r.windows, settings.stability_percent) {
        why.push(msg);
    }
    (why.is_empty(), why.join("; "))
}

/// Throughput over the last 3 windows must agree within `pct`, widened to three standard
/// deviations of Poisson counting noise: at 16 requests per 1 s window, ±25% is chance, not
/// instability, and treating it as instability rejects every low-rate configuration.
pub fn unstable(w: &[loadgen::record::Window], pct: f64) -> Option<String> {
    if w.len() < 3 {
        return None;
    }
    let last = &w[w.len() - 3..];
    let len = if w.len() >= 2 {
        (w[1].start_s - w[0].start_s).max(1e-3)
    } else {
        1.0
    };
    let m = last.iter().map(|x| x.rps).sum::<f64>() / 3.0;
    if m <= 0.0 {
        return Some("no successful responses in the last windows".into());
    }
    let count = m * len;
    let tol = (pct / 100.0).max(3.0 / count.sqrt());
    let worst = last
        .iter()
        .map(|x| (x.rps - m).abs() / m)
        .fold(0.0, f64::max);
    (worst > tol).then(|| {
        format!(
            "throughput unstable over the last 3 windows (±{:.0}% > ±{:.0}%)",
            worst * 100.0,
            tol * 100.0
        )
    })
}

/// Stops a probe once an upper-bound target is missed by 50% with enough samples, or errors pile up.
pub fn early_stop(targets: Vec<Target>) -> loadgen::EarlyStop {
    Arc::new(move |p: &loadgen::record::Progress<'_>| {
        if p.ok() + p.errors() < 20 {
            return None;
        }
        for t in &targets {
            if !t.is_upper_bound() {
                continue;
            }
            let v = t.observe(p);
            let clearly = match t.metric {
                Metric::ErrorRate => v > (t.value * 3.0).max(0.05),
                _ => v > t.value * 1.5,
            };
            if clearly {
                return Some(format!("{t} clearly missed ({})", t.format_value(v)));
            }
        }
        None
    })
}

/// Runs probes against `url` to find the sustainable rate, starting near `hint`.
pub struct RateSearch<'a> {
    /// Server base URL.
    pub url: &'a str,
    /// Workload bodies.
    pub workload: &'a Workload,
    /// Targets (effective).
    pub targets: &'a [Target],
    /// Probe settings.
    pub settings: &'a ProbeSettings,
    /// Cancel flag (Ctrl-C, time budget).
    pub cancel: Arc<AtomicBool>,
    /// Headers for every request.
    pub headers: Vec<(String, String)>,
}

impl RateSearch<'_> {
    /// One probe at `rate`.
    pub async fn probe(
        &self,
        rate: f64,
        seed: u64,
    ) -> Result<(Probe, Report), loadgen::LoadgenError> {
        let arrival = Arrival::parse(&self.settings.arrival).unwrap_or(Arrival::Poisson);
        let mut cfg = Config::new(
            self.url,
            Mode::Open {
                rate: Rate::Fixed(rate),
                arrival,
                max_in_flight: 20_000,
            },
            self.workload.clone(),
        );
        cfg.duration = self.settings.duration;
        cfg.warmup = self.settings.warmup;
        cfg.window = Some(Duration::from_secs_f64(
            (self.settings.duration.as_secs_f64() / 4.0).max(0.25),
        ));
        cfg.stability_percent = self.settings.stability_percent;
        cfg.max_lag_p99 = lag_allowance(self.targets);
        let latency_bound = self
            .targets
            .iter()
            .filter(|t| t.is_upper_bound() && !matches!(t.metric, Metric::ErrorRate))
            .map(|t| t.value)
            .fold(0.0, f64::max);
        cfg.timeout = Duration::from_secs_f64((latency_bound * 3.0).clamp(2.0, 60.0));
        cfg.headers = self.headers.clone();
        cfg.seed = seed;
        cfg.early_stop = Some(early_stop(self.targets.to_vec()));
        cfg.cancel = Some(self.cancel.clone());
        let r = loadgen::run(cfg).await?;
        let (pass, reason) = judge(&r, self.targets, self.settings);
        let probe = Probe {
            rate,
            pass,
            reason,
            achieved_rps: r.achieved_rps,
            p50: r.latency_quantile(0.5),
            p95: r.latency_quantile(0.95),
            p99: r.latency_quantile(0.99),
            error_rate: r.error_rate,
        };
        Ok((probe, r))
    }
}

/// The bracket-then-bisect rule, separated from I/O so it is unit-tested: given the probes so far,
/// the next rate to try, or `None` when done.
pub fn next_rate(probes: &[Probe], start: f64, s: &ProbeSettings) -> Option<f64> {
    if probes.len() >= s.max_probes {
        return None;
    }
    let Some(first) = probes.first() else {
        return Some(start.clamp(s.min_rate, s.max_rate));
    };
    let lo = probes
        .iter()
        .filter(|p| p.pass)
        .map(|p| p.rate)
        .fold(None, |a: Option<f64>, r| Some(a.map_or(r, |a| a.max(r))));
    let hi = probes
        .iter()
        .filter(|p| !p.pass)
        .map(|p| p.rate)
        .fold(None, |a: Option<f64>, r| Some(a.map_or(r, |a| a.min(r))));
    match (lo, hi) {
        (Some(lo), None) => (lo * 2.0 <= s.max_rate).then_some(lo * 2.0),
        (None, Some(hi)) => {
            let _ = first;
            (hi / 2.0 >= s.min_rate).then_some(hi / 2.0)
        }
        (Some(lo), Some(hi)) if hi > lo * (1.0 + s.tolerance) => Some((lo * hi).sqrt()),
        _ => None,
    }
}

/// The result implied by a list of probes.
pub fn result_of(probes: Vec<Probe>) -> RateResult {
    let sustainable = probes
        .iter()
        .filter(|p| p.pass)
        .map(|p| p.rate)
        .fold(0.0, f64::max);
    let failed = probes
        .iter()
        .filter(|p| !p.pass && p.rate > sustainable)
        .map(|p| p.rate)
        .fold(None, |a: Option<f64>, r| Some(a.map_or(r, |a| a.min(r))));
    RateResult {
        sustainable_rps: sustainable,
        failed_rps: failed,
        probes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(rate: f64, pass: bool) -> Probe {
        Probe {
            rate,
            pass,
            reason: String::new(),
            achieved_rps: rate,
            p50: 0.0,
            p95: 0.0,
            p99: 0.0,
            error_rate: 0.0,
        }
    }

    /// Simulates a server that sustains exactly `cap` requests/s.
    fn search(cap: f64, start: f64) -> RateResult {
        let s = ProbeSettings::default();
        let mut probes = Vec::new();
        while let Some(r) = next_rate(&probes, start, &s) {
            probes.push(p(r, r <= cap));
        }
        result_of(probes)
    }

    #[test]
    fn brackets_then_bisects_to_within_tolerance() {
        for (cap, start) in [(100.0, 10.0), (100.0, 1000.0), (37.0, 37.0), (5.0, 64.0)] {
            let r = search(cap, start);
            assert!(r.sustainable_rps <= cap, "{cap}: {r:?}");
            assert!(
                r.sustainable_rps >= cap / 1.2,
                "{cap} from {start}: found {}",
                r.sustainable_rps
            );
            assert!(r.probes.len() <= 7);
        }
        assert_eq!(search(0.1, 8.0).sustainable_rps, 0.0);
    }

    #[test]
    fn stability_allows_counting_noise_but_not_a_collapse() {
        let w = |r: &[f64]| -> Vec<loadgen::record::Window> {
            r.iter()
                .enumerate()
                .map(|(i, x)| loadgen::record::Window {
                    start_s: i as f64,
                    rps: *x,
                    p95: 0.1,
                    errors: 0,
                })
                .collect()
        };
        assert!(
            unstable(&w(&[16.0, 12.0, 19.0, 14.0]), 15.0).is_none(),
            "Poisson noise at 16/s"
        );
        assert!(unstable(&w(&[400.0, 410.0, 395.0, 405.0]), 15.0).is_none());
        assert!(unstable(&w(&[400.0, 400.0, 200.0, 400.0]), 15.0).is_some());
        assert!(unstable(&w(&[50.0, 50.0, 0.0, 0.0]), 15.0).is_some());
    }

    #[test]
    fn implicit_error_target_and_lag_allowance() {
        let t = effective_targets(&[Target::parse("p95<4s").unwrap()]);
        assert_eq!(t.len(), 2);
        assert_eq!(lag_allowance(&t), Duration::from_millis(200));
        assert_eq!(
            lag_allowance(&[Target::parse("p99<10ms").unwrap()]),
            Duration::from_millis(1)
        );
        assert_eq!(
            effective_targets(&[Target::parse("error_rate<0.1%").unwrap()]).len(),
            1
        );
    }
}
