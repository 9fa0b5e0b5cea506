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
    /// 2xx; streaming timings when the workload streams.
    Ok {
        /// Time from the actual send to the first body chunk.
        ttft: Option<Duration>,
        /// Gaps between later body chunks.
        gaps: Vec<Duration>,
    },
    /// Non-2xx status.
    Status(u16),
    /// No response within `--timeout`.
    Timeout,
    /// Could not connect.
    Connect,
    /// Any other transport failure.
    Io,
    /// Not sent: the in-flight safety cap was reached (the generator, not the server, gave up).
    Dropped,
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
            Outcome::Dropped => Some("dropped".into()),
        }
    }
}

/// One finished (or dropped) request.
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
    /// Streaming: time to first token.
    pub ttft: Histogram<u64>,
    /// Streaming: gaps between tokens.
    pub itl: Histogram<u64>,
}

impl Default for Histos {
    fn default() -> Self {
        Histos {
            latency: new_hist(),
            service: new_hist(),
            lag: new_hist(),
            ttft: new_hist(),
            itl: new_hist(),
        }
    }
}

/// Accumulates samples during a run.
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
    /// Successful responses that completed inside the measurement phase (throughput).
    pub ok_in_phase: u64,
    /// Errors by kind in the measurement phase.
    pub errors: BTreeMap<String, u64>,
    /// Requests scheduled in the measurement phase (sent or dropped).
    pub scheduled: u64,
    /// Requests scheduled during warm-up (excluded from every statistic).
    pub warmup: u64,
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
            errors: BTreeMap::new(),
            scheduled: 0,
            warmup: 0,
        }
    }

    /// Records one sample.
    pub fn record(&mut self, s: &Sample) {
        if s.intended < self.measure_start {
            self.warmup += 1;
            return;
        }
        self.scheduled += 1;
        self.histos
            .lag
            .saturating_record(us(s.started.saturating_duration_since(s.intended)));
        let w = (s
            .done
            .saturating_duration_since(self.measure_start)
            .as_secs_f64()
            / self.window.as_secs_f64()) as usize;
        // Completions after the measured phase still count for latency (they were offered in
        // it) but not for throughput, which is completions inside the phase ÷ its length.
        let in_phase = s.done < self.measure_end;
        let w = w.min(self.windows.len() - 1);
        match &s.outcome {
            Outcome::Ok { ttft, gaps } => {
                self.ok += 1;
                let lat = us(s.done.saturating_duration_since(s.intended));
                self.histos.latency.saturating_record(lat);
                self.histos
                    .service
                    .saturating_record(us(s.done.saturating_duration_since(s.sent)));
                if let Some(t) = ttft {
                    self.histos.ttft.saturating_record(us(*t));
                }
                for g in gaps {
                    self.histos.itl.saturating_record(us(*g));
                }
                if in_phase {
                    self.windows[w].0.saturating_record(lat);
                    self.windows[w].1 += 1;
                    self.ok_in_phase += 1;
                }
            }
            other => {
                let kind = other.error_kind().expect("not ok");
                *self.errors.entry(kind).or_default() += 1;
                self.windows[w].2 += 1;
            }
        }
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
