//! Recording: HDR histograms (1 µs .. 1 h, 3 significant digits) of latency from the intended
//! send time, service time from the actual send, and the generator's own lag; per-window
//! histograms for stability and `.hlog`; errors by kind, never mixed into latency.

use crate::slo::Observed;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

pub use results::hist::{decode_hist, encode_hist, new_hist, MAX_US};

fn us(d: Duration) -> u64 {
    (d.as_micros() as u64).clamp(1, MAX_US)
}

/// How one scheduled request ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// 2xx; token timings when the workload streams.
    Ok {
        /// Streaming generation: when each text-carrying event arrived, and the output tokens.
        tokens: Option<Tokens>,
    },
    /// Non-2xx status.
    Status(u16),
    /// No response within `--timeout`.
    Timeout,
    /// Could not connect.
    Connect,
    /// Any other transport failure.
    Io,
    /// A 2xx stream that carried an error event (the generation failed after its headers
    /// were sent; OpenAI-style servers report it in the stream, not in the status).
    StreamError,
    /// Not sent: the in-flight safety cap was reached (the generator, not the server, gave up).
    Dropped,
    /// Not sent: due before the run's end, but the generator was still that far behind its
    /// schedule when the run ended (it could not send as fast as asked).
    Unsent,
}

impl Outcome {
    /// Error kind label, or `None` for success.
    pub fn error_kind(&self) -> Option<String> {
        match self {
            Outcome::Ok { .. } => None,
            Outcome::Status(s) => Some(format!("status_{s}")),
            Outcome::Timeout => Some("timeout".into()),
            Outcome::Connect => Some("connect".into()),
            Outcome::Io => Some("io".into()),
            Outcome::StreamError => Some("stream_error".into()),
            Outcome::Dropped => Some("dropped".into()),
            Outcome::Unsent => Some("unsent".into()),
        }
    }
}

/// A streamed generation's token timings.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tokens {
    /// Time from the actual send to each SSE event that carried output text.
    pub times: Vec<Duration>,
    /// Output tokens: the final `usage.completion_tokens`, or the text events counted.
    pub output: u64,
}

/// One finished (or dropped, or unsent) request.
#[derive(Debug, Clone)]
pub struct Sample {
    /// When the schedule wanted it sent.
    pub intended: Instant,
    /// When the generator got to it (lag = started − intended).
    pub started: Instant,
    /// When it went on the wire (after any connection wait).
    pub sent: Instant,
    /// When the response was complete.
    pub done: Instant,
    /// How it ended.
    pub outcome: Outcome,
}

/// Percentiles of one histogram, in seconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct LatencyStats {
    /// Samples.
    pub count: u64,
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest.
    pub max: f64,
}

impl LatencyStats {
    /// Summarises a microsecond histogram.
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return LatencyStats::default();
        }
        let q = |x: f64| h.value_at_quantile(x) as f64 / 1e6;
        LatencyStats {
            count: h.len(),
            mean: h.mean() / 1e6,
            p50: q(0.5),
            p90: q(0.9),
            p95: q(0.95),
            p99: q(0.99),
            p999: q(0.999),
            max: h.max() as f64 / 1e6,
        }
    }
}

/// One measurement window.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Window {
    /// Start, seconds after the measurement began.
    pub start_s: f64,
    /// Successful responses per second completed in the window.
    pub rps: f64,
    /// Latency p95 of responses completed in the window, seconds.
    pub p95: f64,
    /// Errors in the window.
    pub errors: u64,
}

/// Histograms of a run (microseconds).
#[derive(Debug, Clone)]
pub struct Histos {
    /// From intended send to response (coordinated-omission corrected).
    pub latency: Histogram<u64>,
    /// From actual send to response.
    pub service: Histogram<u64>,
    /// Generator lag: started − intended.
    pub lag: Histogram<u64>,
    /// Streaming: time to first token, from the intended send (coordinated-omission corrected).
    pub ttft: Histogram<u64>,
    /// Streaming: gaps between text-carrying events (inter-token latency).
    pub itl: Histogram<u64>,
    /// Streaming: per request, (end − first token) ÷ (output tokens − 1).
    pub tpot: Histogram<u64>,
    /// Open loop: how late each pacer's event loop woke after its timer fired (µs). A
    /// response's completion is timestamped by the same loop, so this bounds the receive side's
    /// lag the way `lag` measures the send side's. Merged from the pacers at the end.
    pub wake: Histogram<u64>,
}

impl Default for Histos {
    fn default() -> Self {
        Histos {
            latency: new_hist(),
            service: new_hist(),
            lag: new_hist(),
            ttft: new_hist(),
            itl: new_hist(),
            tpot: new_hist(),
            wake: new_hist(),
        }
    }
}

/// Least-squares line of latency against schedule time, kept as running sums so a run of any
/// length costs five numbers. Its slope is the queue-growth test: a server that keeps up has
/// latencies that do not depend on when a request was scheduled (slope ≈ 0); one offered λ while
/// serving μ < λ adds (λ − μ)/μ seconds of wait per second of schedule. Unlike completion counts it
/// needs no allowance for what is still in flight and no steady-state ramp of the in-flight count.
#[derive(Debug, Clone, Default)]
pub struct Drift {
    n: f64,
    sx: f64,
    sy: f64,
    sxx: f64,
    sxy: f64,
    syy: f64,
}

/// Fitted latency trend of a run.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct DriftFit {
    /// Seconds of latency gained per second of schedule.
    pub slope: f64,
    /// Standard error of the slope.
    pub stderr: f64,
    /// Requests fitted.
    pub n: u64,
}

/// Latency may grow by at most this many seconds per second of schedule before a run counts as
/// overloaded: 5% over capacity, finer than the tuner's bisection steps (10%) can resolve.
pub const MAX_DRIFT: f64 = 0.05;

impl DriftFit {
    /// The queue grew: the slope is over [`MAX_DRIFT`] and clearly positive (two standard errors),
    /// so a few slow requests on a noisy server do not fail a rate it sustains.
    pub fn queue_growing(&self) -> bool {
        self.slope > MAX_DRIFT && self.slope > 2.0 * self.stderr
    }
}

impl Drift {
    /// Adds another run's sums (the fit of the union of both sets of points).
    pub fn merge(&mut self, o: &Drift) {
        self.n += o.n;
        self.sx += o.sx;
        self.sy += o.sy;
        self.sxx += o.sxx;
        self.sxy += o.sxy;
        self.syy += o.syy;
    }

    /// Adds one request: `x` seconds into the phase it was scheduled, `y` seconds of latency.
    pub fn add(&mut self, x: f64, y: f64) {
        self.n += 1.0;
        self.sx += x;
        self.sy += y;
        self.sxx += x * x;
        self.sxy += x * y;
        self.syy += y * y;
    }

    /// The fit, or `None` with fewer than 10 requests or no spread in schedule time.
    pub fn fit(&self) -> Option<DriftFit> {
        if self.n < 10.0 {
            return None;
        }
        let sxx = self.sxx - self.sx * self.sx / self.n;
        if sxx <= 1e-12 {
            return None;
        }
        let sxy = self.sxy - self.sx * self.sy / self.n;
        let syy = self.syy - self.sy * self.sy / self.n;
        let slope = sxy / sxx;
        let resid = (syy - slope * sxy).max(0.0) / (self.n - 2.0);
        Some(DriftFit {
            slope,
            stderr: (resid / sxx).sqrt(),
            n: self.n as u64,
        })
    }
}

/// A collector, even if a thread panicked while holding it (its counts are still the best
/// record of the run).
pub(crate) fn lock(c: &std::sync::Mutex<Collector>) -> std::sync::MutexGuard<'_, Collector> {
    c.lock().unwrap_or_else(|p| p.into_inner())
}

/// Accumulates samples during a run. Each producer (an open loop's pacer thread, a closed
/// loop's clients) records into its own collector, and the run merges them: a sample never
/// crosses threads, which at 60,000 req/s on one core had cost two futex calls and a thread
/// switch per request, a third of that core.
#[derive(Clone)]
pub struct Collector {
    measure_start: Instant,
    measure_end: Instant,
    window: Duration,
    /// Whole-run histograms (measurement phase only).
    pub histos: Histos,
    /// Per-window latency histograms (by completion time), for stability and `.hlog`.
    pub windows: Vec<(Histogram<u64>, u64, u64)>,
    /// Successful responses to requests scheduled in the measurement phase.
    pub ok: u64,
    /// Successful responses that completed inside the measurement phase, warm-up requests
    /// included (throughput).
    pub ok_in_phase: u64,
    /// Streaming: output tokens of the successes completed inside the measured phase.
    pub output_tokens: u64,
    /// Per-request limits of goodput.
    pub goodput: crate::slo::GoodputLimits,
    /// Successes completed inside the phase that met every goodput limit.
    pub good_in_phase: u64,
    /// Errors by kind in the measurement phase.
    pub errors: BTreeMap<String, u64>,
    /// Requests scheduled in the measurement phase (sent, dropped or unsent).
    pub scheduled: u64,
    /// Requests scheduled during warm-up (excluded from every statistic).
    pub warmup: u64,
    /// Latency against schedule time, successful requests of the phase.
    pub drift: Drift,
}

impl Collector {
    /// A collector for a measurement phase `[start, end)` cut into windows of `window`.
    pub fn new(measure_start: Instant, measure_end: Instant, window: Duration) -> Self {
        let n = ((measure_end - measure_start).as_secs_f64() / window.as_secs_f64())
            .ceil()
            .max(1.0) as usize;
        Collector {
            measure_start,
            measure_end,
            window,
            histos: Histos::default(),
            windows: (0..n).map(|_| (new_hist(), 0, 0)).collect(),
            ok: 0,
            ok_in_phase: 0,
            output_tokens: 0,
            goodput: Default::default(),
            good_in_phase: 0,
            errors: BTreeMap::new(),
            scheduled: 0,
            warmup: 0,
            drift: Drift::default(),
        }
    }

    /// Adds everything `other` recorded (a collector with the same phase and windows).
    pub fn merge(&mut self, other: &Collector) {
        self.merge_progress(other);
        let h = &mut self.histos;
        let o = &other.histos;
        for (a, b) in [
            (&mut h.service, &o.service),
            (&mut h.lag, &o.lag),
            (&mut h.wake, &o.wake),
        ] {
            // Same bounds on both sides, so adding cannot fail.
            let _ = a.add(b);
        }
        for (w, x) in self.windows.iter_mut().zip(&other.windows) {
            let _ = w.0.add(&x.0);
            w.1 += x.1;
            w.2 += x.2;
        }
        self.drift.merge(&other.drift);
    }

    /// Empties what [`Collector::merge_progress`] adds, so one collector serves every progress
    /// check of a run: a fresh one each check (a 2 MB clone) cost the run's main thread 0.1 ms,
    /// 2.5 ms when its pages were new, on the core the pacers may share.
    pub fn clear_progress(&mut self) {
        let h = &mut self.histos;
        for x in [&mut h.latency, &mut h.ttft, &mut h.itl, &mut h.tpot] {
            if !x.is_empty() {
                x.reset();
            }
        }
        self.errors.clear();
        self.ok = 0;
        self.ok_in_phase = 0;
        self.output_tokens = 0;
        self.good_in_phase = 0;
        self.scheduled = 0;
        self.warmup = 0;
    }

    /// Adds what [`Collector::progress`] reads of `other`: the counters and the latency and
    /// token histograms, not the windows or the lag, service and drift records.
    ///
    /// Why: a progress check (the progress bar every 200 ms, the tuner's early stop every
    /// window) reads the pacers' collectors while they run, under each one's lock. Cloning a
    /// whole collector there (about 2 MB: a histogram of 1 µs to an hour at three digits holds
    /// 23,552 counters, and a collector holds one per window besides seven others) took
    /// 0.1–0.4 ms, up to 2.5 ms, on the 2-core VM, and the pacer waited that long to record.
    /// Adding the four histograms and the counters of a 100,000-request collector took ~10 µs.
    pub fn merge_progress(&mut self, other: &Collector) {
        let h = &mut self.histos;
        let o = &other.histos;
        for (a, b) in [
            (&mut h.latency, &o.latency),
            (&mut h.ttft, &o.ttft),
            (&mut h.itl, &o.itl),
            (&mut h.tpot, &o.tpot),
        ] {
            // Same bounds on both sides, so adding cannot fail; an empty one (no streaming)
            // costs nothing to skip.
            if !b.is_empty() {
                let _ = a.add(b);
            }
        }
        for (k, n) in &other.errors {
            *self.errors.entry(k.clone()).or_default() += n;
        }
        self.ok += other.ok;
        self.ok_in_phase += other.ok_in_phase;
        self.output_tokens += other.output_tokens;
        self.good_in_phase += other.good_in_phase;
        self.scheduled += other.scheduled;
        self.warmup += other.warmup;
    }

    /// The window a completion at `done` falls in (the last for anything later).
    fn window_of(&self, done: Instant) -> usize {
        let w = (done
            .saturating_duration_since(self.measure_start)
            .as_secs_f64()
            / self.window.as_secs_f64()) as usize;
        w.min(self.windows.len() - 1)
    }

    /// One success completed inside the phase: phase and window throughput.
    fn count_throughput(&mut self, done: Instant) {
        let w = self.window_of(done);
        self.windows[w].1 += 1;
        self.ok_in_phase += 1;
    }

    /// Records one sample.
    pub fn record(&mut self, s: &Sample) {
        let in_phase = s.done >= self.measure_start && s.done < self.measure_end;
        if s.intended < self.measure_start {
            self.warmup += 1;
            // Throughput is completions inside the phase ÷ its length, whenever the request was
            // scheduled. Leaving out the warm-up requests still in flight when the phase starts,
            // while the phase's own requests still in flight at its end are left out too, would
            // undercount by about latency ÷ duration (10% of a 4 s probe at 0.4 s latency) and
            // make the first window look slow.
            if let (true, Outcome::Ok { tokens }) = (in_phase, &s.outcome) {
                self.count_throughput(s.done);
                // Output tokens/s counts the same completions as the request rate.
                self.output_tokens += tokens.as_ref().map_or(0, |t| t.output);
            }
            return;
        }
        self.scheduled += 1;
        self.histos
            .lag
            .saturating_record(us(s.started.saturating_duration_since(s.intended)));
        // Completions after the measured phase still count for latency (they were offered in
        // it) but not for throughput, which is completions inside the phase ÷ its length.
        let w = self.window_of(s.done);
        match &s.outcome {
            Outcome::Ok { tokens } => {
                self.ok += 1;
                let lat = us(s.done.saturating_duration_since(s.intended));
                self.histos.latency.saturating_record(lat);
                if s.intended < self.measure_end {
                    self.drift.add(
                        (s.intended - self.measure_start).as_secs_f64(),
                        lat as f64 / 1e6,
                    );
                }
                self.histos
                    .service
                    .saturating_record(us(s.done.saturating_duration_since(s.sent)));
                let good = match tokens {
                    Some(t) => self.record_tokens(s, t, in_phase),
                    None => (None, None),
                };
                if in_phase && self.meets_goodput(lat, good) {
                    self.good_in_phase += 1;
                }
                if in_phase {
                    self.windows[w].0.saturating_record(lat);
                    self.count_throughput(s.done);
                }
            }
            other => {
                let kind = other.error_kind().expect("not ok");
                *self.errors.entry(kind).or_default() += 1;
                self.windows[w].2 += 1;
            }
        }
    }

    /// Records the arrivals due at `intended` that were never sent, the run having ended at
    /// `at`, exactly as [`Collector::record`] records an [`Outcome::Unsent`] sample for each,
    /// but counted in bulk: a pacer asked ten million a second leaves tens of millions, and
    /// one sample each (an error label allocated, a map updated) took ~80 ns apiece.
    pub fn record_unsent(&mut self, intended: impl IntoIterator<Item = Instant>, at: Instant) {
        let mut n = 0;
        for t in intended {
            if t < self.measure_start {
                self.warmup += 1;
                continue;
            }
            self.scheduled += 1;
            self.histos
                .lag
                .saturating_record(us(at.saturating_duration_since(t)));
            n += 1;
        }
        if n > 0 {
            *self
                .errors
                .entry(Outcome::Unsent.error_kind().expect("an error"))
                .or_default() += n;
            let w = self.window_of(at);
            self.windows[w].2 += n;
        }
    }

    /// TTFT from the intended send, inter-token gaps, TPOT, and output tokens for throughput.
    /// Returns the request's TTFT and TPOT (µs) for the goodput check.
    fn record_tokens(
        &mut self,
        s: &Sample,
        t: &Tokens,
        in_phase: bool,
    ) -> (Option<u64>, Option<u64>) {
        if in_phase {
            self.output_tokens += t.output;
        }
        let Some(first) = t.times.first() else {
            return (None, None);
        };
        let offset = s.sent.saturating_duration_since(s.intended);
        let ttft = us(offset + *first);
        self.histos.ttft.saturating_record(ttft);
        for w in t.times.windows(2) {
            self.histos
                .itl
                .saturating_record(us(w[1].saturating_sub(w[0])));
        }
        let mut tpot = None;
        if t.output > 1 {
            let after_first = s.done.saturating_duration_since(s.sent + *first);
            let per = us(after_first / (t.output - 1).min(u32::MAX as u64) as u32);
            self.histos.tpot.saturating_record(per);
            tpot = Some(per);
        }
        (Some(ttft), tpot)
    }

    /// True when a success met every goodput limit (a limit on a timing the request lacks,
    /// TTFT of a request with no tokens say, is not met).
    fn meets_goodput(&self, e2e_us: u64, (ttft, tpot): (Option<u64>, Option<u64>)) -> bool {
        let g = &self.goodput;
        let within = |limit: Option<std::time::Duration>, v: Option<u64>| {
            limit.is_none_or(|l| v.is_some_and(|v| v as u128 <= l.as_micros()))
        };
        within(g.e2e, Some(e2e_us)) && within(g.ttft, ttft) && within(g.tpot, tpot.or(Some(0)))
    }

    /// Ends the measured phase early (a stopped run measures only what it ran).
    pub fn truncate(&mut self, end: Instant) {
        self.measure_end = end.clamp(self.measure_start, self.measure_end);
    }

    /// Errors in total.
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Measurement length.
    pub fn duration(&self) -> Duration {
        self.measure_end - self.measure_start
    }

    /// Finished windows as stats (the last, partial, window is included only when complete).
    pub fn window_stats(&self, now: Instant) -> Vec<Window> {
        let done = ((now.saturating_duration_since(self.measure_start)).as_secs_f64()
            / self.window.as_secs_f64()) as usize;
        self.windows
            .iter()
            .take(done.min(self.windows.len()))
            .enumerate()
            .map(|(i, (h, ok, err))| Window {
                start_s: i as f64 * self.window.as_secs_f64(),
                rps: *ok as f64 / self.window.as_secs_f64(),
                p95: if h.is_empty() {
                    0.0
                } else {
                    h.value_at_quantile(0.95) as f64 / 1e6
                },
                errors: *err,
            })
            .collect()
    }

    /// A view for early-stop hooks and targets, at time `now`.
    pub fn progress(&self, now: Instant) -> Progress<'_> {
        Progress {
            c: self,
            elapsed: now
                .saturating_duration_since(self.measure_start)
                .min(self.duration()),
        }
    }
}

/// Cumulative statistics part-way through a run, for early-stop decisions.
pub struct Progress<'a> {
    c: &'a Collector,
    /// Time measured so far.
    pub elapsed: Duration,
}

impl Progress<'_> {
    /// Successful responses so far.
    pub fn ok(&self) -> u64 {
        self.c.ok
    }
    /// Errors so far.
    pub fn errors(&self) -> u64 {
        self.c.error_count()
    }
}

impl Observed for Progress<'_> {
    fn latency_quantile(&self, q: f64) -> f64 {
        self.c.histos.latency.value_at_quantile(q) as f64 / 1e6
    }
    fn latency_mean(&self) -> f64 {
        self.c.histos.latency.mean() / 1e6
    }
    fn latency_max(&self) -> f64 {
        self.c.histos.latency.max() as f64 / 1e6
    }
    fn error_rate(&self) -> f64 {
        let all = self.c.ok + self.c.error_count();
        if all == 0 {
            0.0
        } else {
            self.c.error_count() as f64 / all as f64
        }
    }
    fn throughput(&self) -> f64 {
        self.c.ok_in_phase as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
    fn token_quantile(&self, m: crate::slo::TokenMetric, q: f64) -> Option<f64> {
        self.c.histos.token_quantile(m, q)
    }
    fn goodput(&self) -> Option<f64> {
        Some(self.c.good_in_phase as f64 / self.elapsed.as_secs_f64().max(1e-9))
    }
}

impl Histos {
    /// A token timing at quantile `q`, seconds; `None` with no samples (a run that did not
    /// stream).
    pub fn token_quantile(&self, m: crate::slo::TokenMetric, q: f64) -> Option<f64> {
        use crate::slo::TokenMetric as T;
        let h = match m {
            T::Ttft => &self.ttft,
            T::Tpot => &self.tpot,
            T::Itl => &self.itl,
        };
        (!h.is_empty()).then(|| h.value_at_quantile(q) as f64 / 1e6)
    }
}

/// Stable when the last 3 windows' throughput and p95 each lie within `pct` % of their mean.
pub fn is_stable(windows: &[Window], pct: f64) -> bool {
    if windows.len() < 3 {
        return false;
    }
    let last = &windows[windows.len() - 3..];
    let within = |xs: [f64; 3]| {
        let m = xs.iter().sum::<f64>() / 3.0;
        m > 0.0 && xs.iter().all(|x| (x - m).abs() / m * 100.0 <= pct)
    };
    within([last[0].rps, last[1].rps, last[2].rps])
        && within([last[0].p95, last[1].p95, last[2].p95])
}

/// The classic `.hgrm` percentile distribution (values in milliseconds).
pub fn hgrm(h: &Histogram<u64>) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>12} {:>14} {:>10} {:>14}\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    let mut total = 0u64;
    for v in h.iter_quantiles(5) {
        total += v.count_since_last_iteration();
        let q = v.quantile_iterated_to();
        let inv = if q < 1.0 {
            format!("{:>14.2}", 1.0 / (1.0 - q))
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "{:>12.3} {:>14.12} {:>10} {}",
            v.value_iterated_to() as f64 / 1000.0,
            q,
            total,
            inv
        );
    }
    let _ = writeln!(
        out,
        "#[Mean    = {:>12.3}, StdDeviation   = {:>12.3}]",
        h.mean() / 1000.0,
        h.stdev() / 1000.0
    );
    let _ = writeln!(
        out,
        "#[Max     = {:>12.3}, Total count    = {:>12}]",
        h.max() as f64 / 1000.0,
        h.len()
    );
    let _ = writeln!(
        out,
        "#[Buckets = {:>12}, SubBuckets     = {:>12}]",
        h.buckets(),
        2 * h.distinct_values() / (h.buckets() as usize + 1)
    );
    out
}

#[cfg(test)]
mod tests {
    use super::{Collector, Drift, Outcome, Sample, MAX_DRIFT};
    use crate::slo::Observed;
    use std::time::{Duration, Instant};

    #[test]
    fn a_progress_merge_reads_as_the_whole_merge_does() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let fresh = || Collector::new(t0, t0 + ms(4_000), ms(1_000));
        let record = |c: &mut Collector, at: u64, took: u64, outcome: Outcome| {
            let intended = t0 + ms(at);
            c.record(&Sample {
                intended,
                started: intended,
                sent: intended,
                done: intended + ms(took),
                outcome,
            });
        };
        let (mut a, mut b) = (fresh(), fresh());
        for i in 0..200 {
            record(&mut a, 10 * i, 5 + i % 50, Outcome::Ok { tokens: None });
            record(&mut b, 10 * i + 5, 80 + i % 7, Outcome::Ok { tokens: None });
        }
        record(&mut b, 100, 1, Outcome::Timeout);
        let mut whole = fresh();
        let mut part = fresh();
        for c in [&a, &b] {
            whole.merge(c);
            part.merge_progress(c);
        }
        let at = t0 + ms(2_500);
        let (w, p) = (whole.progress(at), part.progress(at));
        for q in [0.5, 0.95, 0.99] {
            assert_eq!(w.latency_quantile(q), p.latency_quantile(q));
        }
        assert_eq!(w.latency_max(), p.latency_max());
        assert_eq!((w.ok(), w.errors()), (p.ok(), p.errors()));
        assert_eq!((w.ok(), w.errors()), (400, 1));
        assert_eq!(w.throughput(), p.throughput());
        // Cleared and merged again, it reads the same (one collector serves every check).
        part.clear_progress();
        part.merge_progress(&a);
        part.merge_progress(&b);
        let p = part.progress(at);
        assert_eq!((p.ok(), p.errors()), (400, 1));
        assert_eq!(w.latency_quantile(0.95), p.latency_quantile(0.95));
        // What it leaves out is left out.
        assert!(part.histos.lag.is_empty() && !whole.histos.lag.is_empty());
    }

    /// Uniform noise in [-1, 1) from a fixed-seed xorshift, so the tests are repeatable.
    fn noise(state: &mut u64) -> f64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        (*state >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }

    fn fit(n: usize, span: f64, mut latency: impl FnMut(f64) -> f64) -> super::DriftFit {
        let mut d = Drift::default();
        for i in 0..n {
            let x = span * i as f64 / n as f64;
            d.add(x, latency(x));
        }
        d.fit().expect("enough requests")
    }

    #[test]
    fn a_server_that_keeps_up_shows_no_drift() {
        let mut s = 7;
        let f = fit(340, 4.0, |_| 0.4 + 0.2 * noise(&mut s));
        assert!(f.slope.abs() < MAX_DRIFT, "{f:?}");
        assert!(!f.queue_growing());
    }

    #[test]
    fn fifteen_percent_overload_is_a_growing_queue() {
        // Offered 15% over capacity: every second of schedule adds 0.15 s of wait.
        let mut s = 11;
        let f = fit(390, 4.0, |x| 0.2 + 0.15 * x + 0.1 * noise(&mut s));
        assert!((f.slope - 0.15).abs() < 0.03, "{f:?}");
        assert!(f.queue_growing());
    }

    #[test]
    fn long_noisy_latencies_do_not_fail_a_rate_by_chance() {
        // 40 requests of 1–5 s (generation-like) with no trend: the slope estimate is loose, and
        // the two-standard-error rule keeps false alarms rare.
        let alarms = (1..=200u64)
            .filter(|seed| {
                let mut s = seed * 0x9e37_79b9 + 1;
                fit(40, 4.0, |_| 3.0 + 2.0 * noise(&mut s)).queue_growing()
            })
            .count();
        assert!(alarms <= 10, "{alarms} of 200");
    }

    #[test]
    fn throughput_counts_completions_inside_the_phase_whenever_they_were_scheduled() {
        use super::{Collector, Outcome, Sample};
        use std::time::{Duration, Instant};
        let t0 = Instant::now() + Duration::from_secs(10);
        let at = |ms: i64| {
            if ms >= 0 {
                t0 + Duration::from_millis(ms as u64)
            } else {
                t0 - Duration::from_millis((-ms) as u64)
            }
        };
        let ok = || Outcome::Ok { tokens: None };
        let sample = |intended: i64, done: i64, outcome: Outcome| Sample {
            intended: at(intended),
            started: at(intended),
            sent: at(intended),
            done: at(done),
            outcome,
        };
        // Phase [0 s, 4 s) in 1 s windows.
        let mut c = Collector::new(t0, at(4000), Duration::from_secs(1));
        c.record(&sample(-500, 200, ok())); // warm-up, done in window 0: throughput
        c.record(&sample(-900, -100, ok())); // warm-up, done before the phase: nothing
        c.record(&sample(-300, 300, Outcome::Status(503))); // warm-up error: nothing
        c.record(&sample(1000, 1500, ok())); // phase, done in window 1
        c.record(&sample(3800, 4300, ok())); // phase, done after it: latency only
        assert_eq!((c.warmup, c.scheduled, c.ok), (3, 2, 2));
        assert_eq!(c.ok_in_phase, 2);
        let per_window: Vec<u64> = c.windows.iter().map(|w| w.1).collect();
        assert_eq!(per_window, vec![1, 1, 0, 0]);
        assert!(c.errors.is_empty(), "warm-up errors are not the phase's");
        assert_eq!(
            c.histos.latency.len(),
            2,
            "latency only of the phase's requests"
        );
    }

    #[test]
    fn unsent_arrivals_counted_in_bulk_read_as_one_sample_each() {
        use super::{Collector, Outcome, Sample};
        use std::time::{Duration, Instant};
        let t0 = Instant::now() + Duration::from_secs(10);
        let end = t0 + Duration::from_secs(4);
        // Due every 7 ms from 0.5 s before the phase to its end: warm-up ones and phase ones.
        let due: Vec<Instant> = (0..643u64)
            .map(|k| t0 - Duration::from_millis(500) + Duration::from_millis(7 * k))
            .filter(|t| *t < end)
            .collect();
        let mut one_each = Collector::new(t0, end, Duration::from_secs(1));
        for &t in &due {
            one_each.record(&Sample {
                intended: t,
                started: end,
                sent: end,
                done: end,
                outcome: Outcome::Unsent,
            });
        }
        let mut bulk = Collector::new(t0, end, Duration::from_secs(1));
        bulk.record_unsent(due.iter().copied(), end);
        assert_eq!(
            (bulk.warmup, bulk.scheduled, &bulk.errors),
            (one_each.warmup, one_each.scheduled, &one_each.errors)
        );
        assert_eq!((bulk.warmup, bulk.scheduled), (72, 571));
        assert_eq!(bulk.histos.lag, one_each.histos.lag);
        let errs = |c: &Collector| c.windows.iter().map(|w| w.2).collect::<Vec<_>>();
        assert_eq!(errs(&bulk), errs(&one_each));
        assert_eq!(bulk.ok + bulk.ok_in_phase, 0);
    }

    #[test]
    fn too_few_requests_or_no_spread_give_no_fit() {
        let mut d = Drift::default();
        for _ in 0..9 {
            d.add(1.0, 0.1);
        }
        assert!(d.fit().is_none());
        d.add(1.0, 0.2);
        assert!(d.fit().is_none(), "all at one schedule time: no slope");
    }
}
