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
    /// Stability tolerance passed to loadgen's own report (informational; the pass rule uses
    /// the latency drift, see [`judge`]).
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
    /// Clients of the closed-loop run that estimates the first trial's order of magnitude.
    #[serde(default = "default_saturation_clients")]
    pub saturation_clients: usize,
    /// Generation: run that estimate with as many clients as the server runs sequences at
    /// once (its running cap, from batchtune's `GET /config`) instead of
    /// `saturation_clients`. A few clients against a server batching hundreds estimate a
    /// fraction of its rate (8 of 256 on an H200: 1/32, five doublings of bracketing).
    #[serde(default)]
    pub saturation_fill: bool,
    /// Length of that run, seconds (generation needs several request lengths).
    #[serde(default = "default_saturation_secs")]
    pub saturation_secs: f64,
    /// Most probes behind one rate's verdict: a probe whose verdict is uncertain (its latency
    /// drift or a target's margin within the noise of the bound) is repeated and the evidence
    /// pooled, up to this many. Journals from before it read 1 (every probe decides alone).
    #[serde(default = "one")]
    pub repeats: usize,
}

fn one() -> usize {
    1
}

fn default_saturation_clients() -> usize {
    64
}

fn default_saturation_secs() -> f64 {
    2.0
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
            max_probes: 10,
            arrival: "poisson".into(),
            saturation_clients: default_saturation_clients(),
            saturation_fill: false,
            saturation_secs: default_saturation_secs(),
            repeats: 3,
        }
    }
}

/// One probe's verdict.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
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
    /// Streamed generation: token-level figures (absent for embeddings and old journals).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<TokenFigures>,
    /// Latency drift: seconds of latency gained per second of schedule, and its standard error
    /// (absent when too few requests completed, and in old journals).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drift: Option<[f64; 2]>,
    /// The tightest target's margin: observed ÷ bound for upper bounds, bound ÷ observed for
    /// lower ones, so above 1 misses (absent in old journals).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub margin: Option<f64>,
    /// Failed for a reason repeating cannot overturn: stopped early (a target clearly missed),
    /// errors over their limit, or an invalid run.
    #[serde(default)]
    pub hard: bool,
    /// Requests past the percentile that sets the margin (e.g. 1% of the completed requests
    /// for a p99 target); absent when the margin is not a percentile's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tail: Option<f64>,
}

/// A generation probe's token-level figures, seconds and tokens/s.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct TokenFigures {
    /// Time to first token, p50 (from the intended send).
    pub ttft_p50: f64,
    /// Time to first token, p95.
    pub ttft_p95: f64,
    /// Time per output token, p50.
    pub tpot_p50: f64,
    /// Time per output token, p95.
    pub tpot_p95: f64,
    /// Output tokens per second.
    pub output_tokens_per_s: f64,
    /// Requests per second meeting every per-request limit.
    pub goodput_rps: Option<f64>,
}

impl TokenFigures {
    /// The figures of a streamed run; `None` when it did not stream.
    pub fn of(r: &Report) -> Option<TokenFigures> {
        use loadgen::slo::{Observed, TokenMetric as T};
        Some(TokenFigures {
            ttft_p50: r.token_quantile(T::Ttft, 0.5)?,
            ttft_p95: r.token_quantile(T::Ttft, 0.95)?,
            tpot_p50: r.token_quantile(T::Tpot, 0.5).unwrap_or(0.0),
            tpot_p95: r.token_quantile(T::Tpot, 0.95).unwrap_or(0.0),
            output_tokens_per_s: r.output_tokens_per_s?,
            goodput_rps: r.goodput_rps,
        })
    }
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
    /// Why the server refused these knobs without a probe (its 4xx answer to the
    /// reconfiguration): an infeasible point of the space, not a failed search.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected: Option<String>,
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
            matches!(
                t.metric,
                Metric::Percentile(_) | Metric::Mean | Metric::Max | Metric::Token(..)
            ) && t.is_upper_bound()
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

/// A finished probe's verdict on its own.
#[derive(Debug, Clone, PartialEq)]
pub struct Judgement {
    /// Every condition held.
    pub pass: bool,
    /// Why not (empty when it passed).
    pub reason: String,
    /// The tightest target's margin (see [`Probe::margin`]).
    pub margin: f64,
    /// Failed for a reason repeating cannot overturn (see [`Probe::hard`]).
    pub hard: bool,
    /// Requests past the margin's percentile (see [`Probe::tail`]).
    pub tail: Option<f64>,
}

/// Judges a finished probe.
pub fn judge(r: &Report, targets: &[Target]) -> Judgement {
    let mut why = Vec::new();
    let mut hard = false;
    if let Some(s) = &r.stopped_early {
        why.push(format!("stopped early: {s}"));
        hard = true;
    }
    let mut margin: f64 = 0.0;
    let mut tail = None;
    for t in targets {
        let v = t.observe(r);
        if !t.holds(r) {
            why.push(format!("{t} missed ({})", t.format_value(v)));
            // Errors are not a sampling question: a server that drops requests at a rate is
            // not given a second chance at it.
            hard |= t.metric == Metric::ErrorRate;
        }
        if t.metric != Metric::ErrorRate && t.value > 0.0 {
            let m = if t.is_upper_bound() {
                v / t.value
            } else if v > 0.0 {
                t.value / v
            } else {
                f64::INFINITY
            };
            if m >= margin {
                margin = m;
                tail = match t.metric {
                    Metric::Percentile(q) | Metric::Token(_, q) => {
                        Some(r.ok as f64 * (1.0 - q / 100.0))
                    }
                    _ => None,
                };
            }
        }
    }
    // Keeping up: latency must not grow with schedule time. Completion counts cannot say it
    // within seconds: what is still in flight at the end is normal (Little's law) for a healthy
    // server and is the backlog for an overloaded one, and any allowance for the first excuses
    // the second (before: a 4 s probe "sustained" 98 req/s on a server that completes 85).
    match &r.latency_drift {
        Some(d) if d.queue_growing() => why.push(format!(
            "queue growing: latency rose {:.0} ms per second of schedule (± {:.0} ms), \
             the server completes less than it is offered",
            d.slope * 1e3,
            d.stderr * 1e3
        )),
        _ => {}
    }
    if !r.valid {
        why.extend(r.invalid_reasons.iter().cloned());
        hard = true;
    }
    Judgement {
        pass: why.is_empty(),
        reason: why.join("; "),
        margin,
        hard,
        tail,
    }
}

/// One rate's verdict from every probe there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Sustained.
    Pass,
    /// Not sustained.
    Fail,
    /// Too close to call with this evidence: probe again.
    Uncertain,
}

/// Spread of one 4 s probe's latency drift near capacity, seconds per second. Measured on the
/// CPU runtime (results/cpu-ground-truth.md: eight probes per rate had standard deviations of
/// 0.027 at 100 req/s, 0.045 at 108 and 0.040 at 116): several times the least-squares standard
/// error each probe reports, because a queue near capacity wanders, so successive latencies are
/// far from independent. Assumed to shrink with the square root of the probe's length.
pub const DRIFT_NOISE_4S: f64 = 0.03;

/// Relative spread of a latency percentile between probes at one rate near capacity (the
/// noise table in results/noise-cpu/: p95 at one rate varied by about ±20% between 4 s probes
/// near capacity, ±10% below it), for a percentile with [`TAIL_REF`] requests past it.
pub const MARGIN_NOISE: f64 = 0.1;

/// Requests past the percentile at which [`MARGIN_NOISE`] was seen: a p95 of ~400 requests
/// (4 s near 100 req/s). A percentile with fewer past it is looser in proportion to 1/√tail,
/// so its verdict needs more probes before it is clear (a p99 of 400 requests rests on 4).
pub const TAIL_REF: f64 = 20.0;

/// The verdict at one rate from the probes there (`at`, all at that rate), when at most
/// `repeats` probes may stand behind it. Evidence is pooled: the mean drift against
/// [`MAX_DRIFT`](loadgen::record::MAX_DRIFT) and the mean margin against 1, each with a band of
/// its noise ÷ √n. Outside the band the verdict is clear; inside it the rate is probed again,
/// and once `repeats` probes are in, the pooled means decide. A hard failure decides at once.
/// Probes without statistics (old journals) decide by majority.
pub fn verdict(at: &[&Probe], repeats: usize, probe_secs: f64) -> Verdict {
    use loadgen::record::MAX_DRIFT;
    if at.is_empty() {
        return Verdict::Uncertain;
    }
    if at.iter().any(|p| p.hard) {
        return Verdict::Fail;
    }
    let n = at.len() as f64;
    let done = at.len() >= repeats.max(1);
    let Some(margins) = at.iter().map(|p| p.margin).collect::<Option<Vec<f64>>>() else {
        let passed = at.iter().filter(|p| p.pass).count() as f64;
        return if passed * 2.0 > n {
            Verdict::Pass
        } else {
            Verdict::Fail
        };
    };
    let margin = margins.iter().sum::<f64>() / n;
    let looseness = at
        .iter()
        .map(|p| {
            p.tail
                .map_or(1.0, |t| (TAIL_REF / t.max(1.0)).sqrt().max(1.0))
        })
        .sum::<f64>()
        / n;
    let band_m = MARGIN_NOISE * looseness / n.sqrt();
    let drifts: Vec<[f64; 2]> = at.iter().filter_map(|p| p.drift).collect();
    let (drift, band_d, se) = if drifts.is_empty() {
        (0.0, 0.0, 0.0)
    } else {
        let k = drifts.len() as f64;
        let mean = drifts.iter().map(|d| d[0]).sum::<f64>() / k;
        let se = drifts.iter().map(|d| d[1] * d[1]).sum::<f64>().sqrt() / k;
        let noise = DRIFT_NOISE_4S * (4.0 / probe_secs.max(0.5)).sqrt() / k.sqrt();
        (mean, noise.max(2.0 * se), se)
    };
    if margin > 1.0 + band_m || drift > MAX_DRIFT + band_d {
        return Verdict::Fail;
    }
    if margin <= 1.0 - band_m && drift <= MAX_DRIFT - band_d {
        return Verdict::Pass;
    }
    if !done {
        return Verdict::Uncertain;
    }
    // The last word: the pooled means, with the single probe's rule for the drift (over the
    // limit and clearly positive).
    let growing = drift > MAX_DRIFT && drift > 2.0 * se;
    if margin <= 1.0 && !growing {
        Verdict::Pass
    } else {
        Verdict::Fail
    }
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
    /// The client's cap on requests in flight (a searched client concurrency), or none: an
    /// open loop then sends on schedule however many are outstanding.
    pub max_in_flight: Option<usize>,
}

impl RateSearch<'_> {
    /// One probe at `rate`. `settle` is the p99 latency of the least-loaded probe so far on this
    /// configuration (seconds), if any: the warm-up lasts at least that long (up to the latency
    /// bound), so a server whose latencies are seconds long reaches its steady state before
    /// measuring starts and its ramp is not mistaken for a growing queue.
    pub async fn probe(
        &self,
        rate: f64,
        seed: u64,
        settle: Option<f64>,
    ) -> Result<(Probe, Report), loadgen::LoadgenError> {
        let arrival = Arrival::parse(&self.settings.arrival).unwrap_or(Arrival::Poisson);
        let mut cfg = Config::new(
            self.url,
            Mode::Open {
                rate: Rate::Fixed(rate),
                arrival,
                max_in_flight: self.max_in_flight.unwrap_or(20_000),
            },
            self.workload.clone(),
        );
        let bound = self
            .targets
            .iter()
            .filter(|t| t.is_upper_bound() && !matches!(t.metric, Metric::ErrorRate))
            .map(|t| t.value)
            .fold(0.0, f64::max);
        cfg.warmup = self.settings.warmup.max(Duration::from_secs_f64(
            settle.unwrap_or(0.0).clamp(0.0, bound.min(60.0)),
        ));
        // Measured for several of the server's own latencies (up to three latency bounds), so
        // a probe of a slow server holds more than a handful of completed requests.
        cfg.duration = self.settings.duration.max(Duration::from_secs_f64(
            (3.0 * settle.unwrap_or(0.0)).clamp(0.0, (3.0 * bound).min(60.0)),
        ));
        cfg.window = Some(Duration::from_secs_f64(
            (cfg.duration.as_secs_f64() / 4.0).max(0.25),
        ));
        cfg.stability_percent = self.settings.stability_percent;
        cfg.max_lag_p99 = lag_allowance(self.targets);
        cfg.timeout = Duration::from_secs_f64((bound * 3.0).clamp(2.0, 60.0));
        cfg.headers = self.headers.clone();
        cfg.seed = seed;
        cfg.early_stop = Some(early_stop(self.targets.to_vec()));
        cfg.goodput = loadgen::slo::GoodputLimits::from_targets(self.targets);
        cfg.cancel = Some(self.cancel.clone());
        let r = loadgen::run(cfg).await?;
        let j = judge(&r, self.targets);
        let probe = Probe {
            rate,
            pass: j.pass,
            reason: j.reason,
            drift: r.latency_drift.map(|d| [d.slope, d.stderr]),
            margin: Some(j.margin),
            hard: j.hard,
            tail: j.tail,
            achieved_rps: r.achieved_rps,
            p50: r.latency_quantile(0.5),
            p95: r.latency_quantile(0.95),
            p99: r.latency_quantile(0.99),
            error_rate: r.error_rate,
            tokens: TokenFigures::of(&r),
        };
        Ok((probe, r))
    }
}

impl RateSearch<'_> {
    /// Completions per second of the settings' closed-loop clients over their run (after
    /// 0.5 s of warm-up): roughly what the configuration can do, to start the rate search near
    /// it. When requests outlast the window (generation) so that few complete inside it,
    /// Little's law (clients ÷ mean latency) estimates the rate instead.
    /// `clients` overrides the settings' count.
    pub async fn saturation(&self, clients: Option<usize>) -> Option<f64> {
        let clients = clients
            .unwrap_or(self.settings.saturation_clients)
            .min(self.max_in_flight.unwrap_or(usize::MAX))
            .max(1);
        let mut cfg = Config::new(
            self.url,
            Mode::Closed {
                concurrency: clients,
            },
            self.workload.clone(),
        );
        cfg.duration = Duration::from_secs_f64(self.settings.saturation_secs.max(0.5));
        cfg.warmup = Duration::from_millis(500);
        let run_secs = (cfg.duration + cfg.warmup).as_secs_f64();
        cfg.headers = self.headers.clone();
        cfg.cancel = Some(self.cancel.clone());
        let r = loadgen::run(cfg).await.ok()?;
        if r.error_rate >= 0.5 {
            return None;
        }
        if r.ok == 0 {
            // Nothing finished inside the run: every client's request outlasted it, so the
            // rate is below clients ÷ (warm-up + window), an upper bound that the start halves.
            // (Reading it as 0 started a CPU chat search at 16 req/s where 0.4 was the most.)
            return Some(clients as f64 / run_secs);
        }
        if r.achieved_rps > 0.0 {
            return Some(r.achieved_rps);
        }
        Some(clients as f64 / r.latency.mean.max(1e-9))
    }
}

/// Points per doubling of the rate lattice every probe sits on: 32, so neighbours are 2.2%
/// apart. The lattice is anchored at 1 req/s and does not depend on where a search starts, so
/// two searches of one server probe the same rates and their answers agree or differ by whole
/// steps (before it, runs that started from different saturation estimates ended on three
/// different lattices: results/noise-cpu/). It was 16 (4.4% apart) until the reproducibility
/// series of results/repro-cpu-8/: five runs spread over three neighbouring points, so one
/// step was almost the whole ±5% a user may expect between two runs. Bisection tolerances,
/// climbs and the race's limits are relative (in octaves or percent), so a finer lattice only
/// changes where the last, deciding probes fall.
pub const LATTICE: f64 = 32.0;

/// The lattice point nearest `rate`.
pub fn lattice_index(rate: f64) -> i64 {
    (rate.max(1e-9).log2() * LATTICE).round() as i64
}

/// The rate of lattice point `i`.
pub fn lattice_rate(i: i64) -> f64 {
    (i as f64 / LATTICE).exp2()
}

/// Lattice steps that fit inside a relative tolerance (at least one).
pub fn tolerance_steps(tolerance: f64) -> i64 {
    (((1.0 + tolerance).log2() * LATTICE) + 1e-9)
        .floor()
        .max(1.0) as i64
}

/// Where a search with no better hint starts: the power of two at or below half a saturation
/// estimate. Powers of two, not the estimate itself, so that runs whose estimates differ by
/// noise take the same path through the lattice.
pub fn start_from_estimate(estimate: f64) -> f64 {
    lattice_rate(lattice_index(estimate * 0.5).div_euclid(LATTICE as i64) * LATTICE as i64)
}

/// The lattice points probed, in the order first probed.
fn points(probes: &[Probe]) -> Vec<i64> {
    let mut order: Vec<i64> = Vec::new();
    for p in probes {
        let i = lattice_index(p.rate);
        if !order.contains(&i) {
            order.push(i);
        }
    }
    order
}

/// The p99 of the least-loaded probe so far on a configuration (seconds): about the server's
/// own latency, not an overloaded probe's backlog, so the next probe warms up at least that long.
pub fn settle(probes: &[Probe]) -> Option<f64> {
    probes.iter().map(|p| p.p99).min_by(f64::total_cmp)
}

/// Each probed lattice point's verdict from the probes there (in the order first probed).
pub(crate) fn verdicts(probes: &[Probe], repeats: usize, probe_secs: f64) -> Vec<(i64, Verdict)> {
    points(probes)
        .into_iter()
        .map(|i| {
            let at: Vec<&Probe> = probes
                .iter()
                .filter(|p| lattice_index(p.rate) == i)
                .collect();
            (i, verdict(&at, repeats, probe_secs))
        })
        .collect()
}

/// Each probed lattice point's final verdict, whatever the evidence there: with one probe
/// allowed nothing is uncertain, and the probe length (which only widens the bands of a verdict
/// still open) cannot change a final one, so none is passed.
pub(crate) fn decided(probes: &[Probe]) -> Vec<(i64, Verdict)> {
    verdicts(probes, 1, 4.0)
}

/// The bracket-then-bisect rule on the lattice, separated from I/O so it is unit-tested: given
/// the probes so far, the next rate to try (the same rate again while its verdict is
/// uncertain), or `None` when done.
pub fn next_rate(probes: &[Probe], start: f64, s: &ProbeSettings) -> Option<f64> {
    if probes.len() >= s.max_probes {
        return None;
    }
    let (min_i, max_i) = (
        (s.min_rate.max(1e-9).log2() * LATTICE).ceil() as i64,
        (s.max_rate.max(1e-9).log2() * LATTICE).floor() as i64,
    );
    let Some(last) = probes.last() else {
        return Some(lattice_rate(lattice_index(start).clamp(min_i, max_i)));
    };
    let secs = s.duration.as_secs_f64();
    let all = verdicts(probes, s.repeats, secs);
    if all
        .iter()
        .any(|&(i, v)| i == lattice_index(last.rate) && v == Verdict::Uncertain)
    {
        return Some(last.rate);
    }
    let fin = decided(probes);
    let lo = fin
        .iter()
        .filter(|(_, v)| *v == Verdict::Pass)
        .map(|(i, _)| *i)
        .max();
    let hi = fin
        .iter()
        .filter(|(_, v)| *v == Verdict::Fail)
        .map(|(i, _)| *i)
        .min();
    let aim = hi.and_then(|h| aim_below(probes, h));
    match (lo, hi) {
        (Some(lo), None) => {
            let up = (lo + climb_steps(probes)).min(max_i);
            (up > lo).then(|| lattice_rate(up))
        }
        (None, Some(hi)) => {
            let down = match aim {
                Some(a) if a < hi => a,
                _ => hi - LATTICE as i64,
            };
            (hi > min_i).then(|| lattice_rate(down.max(min_i)))
        }
        (Some(lo), Some(hi)) if hi - lo > tolerance_steps(s.tolerance) => {
            let next = match aim {
                Some(a) if a > lo && a < hi => a,
                // The estimate says the boundary is at or just above a rate that passed: one
                // tolerance up settles it (done if that fails).
                Some(a) if a <= lo => lo + tolerance_steps(s.tolerance),
                _ => lo + (hi - lo) / 2,
            };
            Some(lattice_rate(next))
        }
        _ => None,
    }
}

/// Whether a trial may stop before its bracket is tight because it cannot win: a rate at or
/// below `best` (the best trial's sustainable rate) has failed for good and a lower rate has
/// passed for good. The winner is the trial with the highest sustainable rate, so this one only
/// needs its place among the losers, which its passing rate gives (a lower bound, as every
/// sustainable rate is); bisecting the rest of its bracket would cost most of a trial's probes
/// for nothing the search uses (on an H200 at a 4 s target a trial was ~150 s, so an 8-minute
/// search measured 3 points).
pub fn cannot_win(probes: &[Probe], best: f64, s: &ProbeSettings) -> bool {
    let all = verdicts(probes, s.repeats, s.duration.as_secs_f64());
    let top = lattice_index(best);
    let failed_below_best = all.iter().any(|&(i, v)| v == Verdict::Fail && i <= top);
    let passed = all.iter().any(|&(_, v)| v == Verdict::Pass);
    failed_below_best && passed
}

/// Where the lowest failed rate's drift puts the capacity, as a lattice point (rounded down).
/// A server offered λ while completing μ gains (λ − μ)/μ seconds of latency per second of
/// schedule, so μ ≈ λ ÷ (1 + drift): one overloaded probe aims the next one, where bisection
/// would need several (seen here: probes at 1.2–3.5× capacity put it within 10%). `None` when
/// that rate failed without a clear drift (a latency or error target, or no fit).
fn aim_below(probes: &[Probe], hi: i64) -> Option<i64> {
    use loadgen::record::MAX_DRIFT;
    let drifts: Vec<f64> = probes
        .iter()
        .filter(|p| lattice_index(p.rate) == hi)
        .filter_map(|p| p.drift.map(|d| d[0]))
        .collect();
    if drifts.is_empty() {
        return None;
    }
    let d = drifts.iter().sum::<f64>() / drifts.len() as f64;
    if d <= MAX_DRIFT {
        return None;
    }
    let mu = lattice_rate(hi) / (1.0 + d);
    Some((mu.log2() * LATTICE).floor() as i64)
}

/// How far to climb while no probe has failed, in lattice steps: ×4 while the latest pass's p95
/// is within twice the first probe's (latency still flat, so the server is far from saturation:
/// a GPU that sustains 10,000 req/s is reached from 16 in 6 probes instead of 10), ×2 once it
/// has grown.
fn climb_steps(probes: &[Probe]) -> i64 {
    let first = probes.first().map_or(0.0, |p| p.p95);
    let last = probes.iter().rev().find(|p| p.pass).map_or(0.0, |p| p.p95);
    let distinct = points(probes).len();
    if distinct >= 2 && last <= 2.0 * first || distinct == 1 {
        2 * LATTICE as i64
    } else {
        LATTICE as i64
    }
}

/// The result implied by a list of probes: each rate's pooled verdict, taken as final.
pub fn result_of(probes: Vec<Probe>) -> RateResult {
    let fin = decided(&probes);
    let sustainable = fin
        .iter()
        .filter(|(_, v)| *v == Verdict::Pass)
        .map(|(i, _)| *i)
        .max();
    let failed = fin
        .iter()
        .filter(|(i, v)| *v == Verdict::Fail && sustainable.is_none_or(|s| *i > s))
        .map(|(i, _)| *i)
        .min();
    // The probes' own rates (lattice points up to rounding), not recomputed ones.
    let rate_of = |i: i64| {
        probes
            .iter()
            .find(|p| lattice_index(p.rate) == i)
            .map_or(lattice_rate(i), |p| p.rate)
    };
    RateResult {
        sustainable_rps: sustainable.map_or(0.0, rate_of),
        failed_rps: failed.map(rate_of),
        probes,
        rejected: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(rate: f64, pass: bool) -> Probe {
        Probe {
            rate,
            pass,
            achieved_rps: rate,
            ..Probe::default()
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
            // Within the tolerance: the bracket ends on neighbouring lattice points ≤ 9% apart.
            assert!(
                r.sustainable_rps >= cap / 1.1,
                "{cap} from {start}: found {}",
                r.sustainable_rps
            );
            // Clear verdicts: one probe each; a decade of bracketing costs at most 4 of them.
            assert!(
                r.probes.len() <= 8,
                "{cap} from {start}: {}",
                r.probes.len()
            );
        }
        assert_eq!(search(0.1, 8.0).sustainable_rps, 0.0);
    }

    #[test]
    fn a_closed_loop_in_which_nothing_finishes_bounds_the_rate_from_above() {
        // A real socket whose server reads requests and never answers: every request outlasts
        // the estimating run, as 64-token chats did on a slow CPU.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}", listener.local_addr().unwrap());
            tokio::spawn(async move {
                let mut held = Vec::new();
                while let Ok((sock, _)) = listener.accept().await {
                    held.push(sock);
                }
            });
            let workload = loadgen::workload::Workload {
                name: "silent".into(),
                path: "/v1/completions".into(),
                bodies: vec![bytes::Bytes::from_static(b"{}")],
                stream: false,
            };
            let settings = ProbeSettings {
                saturation_secs: 1.5,
                ..ProbeSettings::default()
            };
            let search = RateSearch {
                url: &url,
                workload: &workload,
                targets: &[],
                settings: &settings,
                cancel: Arc::new(AtomicBool::new(false)),
                headers: Vec::new(),
                max_in_flight: None,
            };
            // 4 clients, none done after 0.5 s of warm-up and 1.5 s: under 4 ÷ 2 s.
            let est = search.saturation(Some(4)).await;
            assert_eq!(est, Some(2.0));
            // A search starts from half of it, on the power of two at or below.
            assert_eq!(start_from_estimate(est.unwrap()), 1.0);
        });
    }

    #[test]
    fn a_trial_that_failed_at_the_best_rate_stops_once_a_lower_rate_passed() {
        let s = ProbeSettings::default();
        // Failed at the best trial's rate, nothing passed yet: keep going (no place to give).
        assert!(!cannot_win(&[p(128.0, false)], 128.0, &s));
        // ... then passed lower: it cannot win, whatever lies between 64 and 128.
        assert!(cannot_win(&[p(128.0, false), p(64.0, true)], 128.0, &s));
        // Failed only above the best rate: it may still beat it, so the bracket is refined.
        assert!(!cannot_win(&[p(64.0, true), p(256.0, false)], 128.0, &s));
        // Just over the bound is uncertain (probed again), not a failure yet; once the repeats
        // are in and still over, it is.
        let near = || stat(128.0, 0.0, 1.05);
        assert!(!cannot_win(&[near(), p(64.0, true)], 128.0, &s));
        let repeated: Vec<Probe> = (0..s.repeats).map(|_| near()).collect();
        assert!(cannot_win(
            &[repeated, vec![p(64.0, true)]].concat(),
            128.0,
            &s
        ));
    }

    #[test]
    fn climbs_by_four_while_latency_is_flat_and_by_two_once_it_grows() {
        let s = ProbeSettings::default();
        let with_p95 = |rate: f64, p95: f64| Probe {
            p95,
            ..p(rate, true)
        };
        let flat = [with_p95(16.0, 0.010), with_p95(64.0, 0.012)];
        assert_eq!(next_rate(&flat, 16.0, &s), Some(256.0));
        let grown = [with_p95(16.0, 0.010), with_p95(64.0, 0.030)];
        assert_eq!(next_rate(&grown, 16.0, &s), Some(128.0));
        // Never past the ceiling (its lattice point at or below it), and done once that passed.
        let top = lattice_rate((s.max_rate.log2() * LATTICE).floor() as i64);
        assert!(top <= s.max_rate && top * 1.05 > s.max_rate);
        let near = [with_p95(60_000.0, 0.01)];
        assert_eq!(next_rate(&near, 60_000.0, &s), Some(top));
        assert_eq!(next_rate(&[with_p95(top, 0.01)], top, &s), None);
    }

    #[test]
    fn an_overloaded_probes_drift_aims_the_next_one() {
        let s = ProbeSettings::default();
        let drifting = |rate: f64, d: f64| Probe {
            drift: Some([d, 0.01]),
            margin: Some(0.5),
            ..p(rate, false)
        };
        // 256 offered, latency growing 1.5 s/s: capacity ≈ 256 / 2.5 = 102.4 → the lattice
        // point at or below it (101.0).
        let probes = vec![p(64.0, true), drifting(256.0, 1.5)];
        let aimed = next_rate(&probes, 64.0, &s).unwrap();
        assert_eq!(lattice_index(aimed), 213);
        assert!(aimed <= 102.4 && aimed * 1.023 > 102.4, "{aimed}");
        // It passed: the boundary is at or just above it; one tolerance up settles it.
        let mut probes = probes;
        probes.push(p(aimed, true));
        assert_eq!(
            next_rate(&probes, 64.0, &s).map(lattice_index),
            Some(213 + tolerance_steps(s.tolerance))
        );
        // Without a lower pass the aim replaces halving, and a failure without drift (a latency
        // target) falls back to bisection. (200 is probed at its lattice point, 201.7; half of
        // that is lattice point 213, 100.9.)
        assert_eq!(
            next_rate(&[drifting(200.0, 1.0)], 200.0, &s).map(lattice_index),
            Some(213)
        );
        let latency_miss = Probe {
            margin: Some(1.5),
            ..p(256.0, false)
        };
        assert_eq!(
            next_rate(&[p(64.0, true), latency_miss], 64.0, &s).map(lattice_index),
            Some(lattice_index(128.0))
        );
    }

    #[test]
    fn every_probe_sits_on_one_lattice_whatever_the_start() {
        // Two searches of one server starting from different estimates end on the same point.
        let ends: Vec<f64> = [70.0, 96.0, 112.0, 130.0, 250.0]
            .iter()
            .map(|&est| search(100.0, start_from_estimate(est)).sustainable_rps)
            .collect();
        assert!(ends.windows(2).all(|w| w[0] == w[1]), "{ends:?}");
        assert!(ends[0] <= 100.0 && ends[0] > 100.0 / 1.1, "{ends:?}");
        let s = ProbeSettings::default();
        for r in search(100.0, 37.0).probes.iter().map(|p| p.rate) {
            assert!((lattice_rate(lattice_index(r)) - r).abs() < 1e-9 * r, "{r}");
        }
        // The 10% tolerance is four 2.2% steps.
        assert_eq!(tolerance_steps(s.tolerance), 4);
        assert_eq!(tolerance_steps(0.0), 1);
    }

    /// A probe with statistics: drift slope (s/s) and the target margin.
    fn stat(rate: f64, drift: f64, margin: f64) -> Probe {
        Probe {
            drift: Some([drift, 0.005]),
            margin: Some(margin),
            pass: drift <= 0.05 && margin <= 1.0,
            ..p(rate, false)
        }
    }

    #[test]
    fn uncertain_verdicts_are_repeated_and_pooled() {
        let v = |ps: &[Probe]| verdict(&ps.iter().collect::<Vec<_>>(), 3, 4.0);
        // Far from the bound: one probe decides either way.
        assert_eq!(v(&[stat(90.0, 0.00, 0.1)]), Verdict::Pass);
        assert_eq!(v(&[stat(130.0, 0.20, 0.4)]), Verdict::Fail);
        assert_eq!(v(&[stat(130.0, 0.00, 1.3)]), Verdict::Fail);
        // Near it: asked again; then the pooled mean decides.
        assert_eq!(v(&[stat(100.0, 0.055, 0.2)]), Verdict::Uncertain);
        assert_eq!(
            v(&[stat(100.0, 0.055, 0.2), stat(100.0, 0.02, 0.2)]),
            Verdict::Uncertain
        );
        let three = |rate: f64, drifts: [f64; 3]| v(&drifts.map(|d| stat(rate, d, 0.2)));
        assert_eq!(three(100.0, [0.055, 0.02, 0.0]), Verdict::Pass);
        assert_eq!(three(108.0, [0.047, 0.083, 0.071]), Verdict::Fail);
        // A latency percentile just under its bound is asked again too, and a percentile with
        // few requests past it (a p99 of 400 requests) is looser than one with many.
        assert_eq!(v(&[stat(100.0, 0.0, 0.95)]), Verdict::Uncertain);
        let tail = |t: f64| Probe {
            tail: Some(t),
            ..stat(100.0, 0.0, 0.8)
        };
        assert_eq!(v(&[tail(20.0)]), Verdict::Pass);
        assert_eq!(v(&[tail(4.0)]), Verdict::Uncertain);
        // A hard failure is final, and old journals' probes (no statistics) vote.
        let hard = Probe {
            hard: true,
            ..stat(100.0, 0.0, 0.2)
        };
        assert_eq!(v(&[stat(100.0, 0.055, 0.2), hard]), Verdict::Fail);
        assert_eq!(v(&[p(100.0, true)]), Verdict::Pass);
        // next_rate repeats the uncertain rate, then moves on.
        let s = ProbeSettings::default();
        let probes = [stat(64.0, 0.0, 0.1), stat(128.0, 0.06, 0.5)];
        assert_eq!(next_rate(&probes, 64.0, &s), Some(128.0));
        let probes = [
            stat(64.0, 0.0, 0.1),
            stat(128.0, 0.06, 0.5),
            stat(128.0, 0.09, 0.5),
            stat(128.0, 0.08, 0.5),
        ];
        // Failed with a pooled drift of 0.077: aimed at 128 ÷ 1.077 ≈ 118.9 → lattice 117.4.
        assert_eq!(next_rate(&probes, 64.0, &s), Some(lattice_rate(220)));
        let r = result_of(probes.to_vec());
        assert_eq!((r.sustainable_rps, r.failed_rps), (64.0, Some(128.0)));
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
