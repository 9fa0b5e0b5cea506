//! The run report: JSON (schema in `loadgen/report.schema.json`), the human summary, `.hgrm`
//! and `.hlog` files.

use crate::record::{self, is_stable, Collector, Histos, LatencyStats, Window};
use crate::slo::{format_secs, Observed};
use crate::{Config, Mode};
use hdrhistogram::serialization::interval_log::{IntervalLogWriterBuilder, Tag};
use hdrhistogram::serialization::V2DeflateSerializer;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant, UNIX_EPOCH};

/// Version of the JSON layout; bumped on incompatible changes.
pub const SCHEMA_VERSION: u32 = 1;

/// Everything a run measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// JSON layout version.
    pub schema_version: u32,
    /// Full request URL.
    pub url: String,
    /// Workload name.
    pub workload: String,
    /// `open` or `closed`.
    pub mode: String,
    /// Open loop: the rate asked for (e.g. `800/s`, `ramp 100:800:100/10s`).
    pub rate: Option<String>,
    /// Open loop: arrival process.
    pub arrival: Option<String>,
    /// Closed loop: virtual clients.
    pub concurrency: Option<usize>,
    /// Open loop: pacer threads that sent the schedule (`--threads`, or the default from the
    /// rate and the workload's response events), so a reader can tell a generator that was
    /// given one thread from one given many.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pacers: Option<usize>,
    /// Warm-up, seconds (excluded).
    pub warmup_s: f64,
    /// Measured phase actually run, seconds.
    pub duration_s: f64,
    /// Unix time of the schedule's origin (intended send times are offsets from it; the
    /// measured phase begins `warmup_s` later). Read from the wall clock when the origin was
    /// chosen, so runs line up with server logs to the clock's precision.
    pub started_unix_s: f64,
    /// Requests scheduled in the measured phase (sent, dropped or unsent).
    pub scheduled: u64,
    /// 2xx responses.
    pub ok: u64,
    /// Errors by kind (`status_429`, `timeout`, `connect`, `io`, `dropped`, `unsent`).
    pub errors: BTreeMap<String, u64>,
    /// Errors ÷ scheduled.
    pub error_rate: f64,
    /// Scheduled ÷ duration.
    pub offered_rps: f64,
    /// Successful responses completed inside the measured phase ÷ its length.
    pub achieved_rps: f64,
    /// Latency from the intended send time (coordinated-omission corrected).
    pub latency: LatencyStats,
    /// Service time: from the actual send.
    pub service: LatencyStats,
    /// The generator's own lag: when it got to a request minus when it should have.
    pub send_lag: LatencyStats,
    /// Open loop: how late the pacers' event loops woke after a timer fired, which bounds how
    /// late a response was timestamped (the same loop reads it). Absent for a closed loop and
    /// when no pacer ever slept (a saturated pacer, which its send lag already shows).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receive_lag: Option<LatencyStats>,
    /// Streaming only: time to first token (first SSE event carrying text), from the intended
    /// send.
    pub ttft: Option<LatencyStats>,
    /// Streaming only: gaps between text-carrying SSE events (inter-token latency).
    pub inter_token: Option<LatencyStats>,
    /// Streaming only: per request, (end − first token) ÷ (output tokens − 1).
    #[serde(default)]
    pub tpot: Option<LatencyStats>,
    /// Streaming only: output tokens of the successes completed in the phase ÷ its length.
    #[serde(default)]
    pub output_tokens_per_s: Option<f64>,
    /// Successes completed in the phase that met every per-request limit, per second (when
    /// limits were set: `--goodput`, or the tuner's targets).
    #[serde(default)]
    pub goodput_rps: Option<f64>,
    /// Measurement windows.
    pub windows: Vec<Window>,
    /// Latency against schedule time (least squares over every successful request): a slope
    /// near 0 means the server kept up; a clearly positive one, that its queue grew.
    #[serde(default)]
    pub latency_drift: Option<crate::record::DriftFit>,
    /// Last 3 windows agree within `stability_percent`.
    pub stable: bool,
    /// Tolerance used for `stable`.
    pub stability_percent: f64,
    /// False when the generator was the bottleneck (lag, drops): the numbers describe loadgen.
    pub valid: bool,
    /// Why the run is invalid.
    pub invalid_reasons: Vec<String>,
    /// Set when an early-stop hook or a cancel ended the run.
    pub stopped_early: Option<String>,
    /// Latency histogram, HdrHistogram V2-deflate, base64 (microseconds).
    pub latency_histogram: String,
    /// Service-time histogram, same encoding.
    pub service_histogram: String,
    /// Streaming only: time-to-first-token histogram, same encoding.
    #[serde(default)]
    pub ttft_histogram: Option<String>,
    /// Streaming only: time-per-output-token histogram, same encoding.
    #[serde(default)]
    pub tpot_histogram: Option<String>,
    /// In-memory histograms, for `.hgrm`/`.hlog` (not serialized).
    #[serde(skip)]
    pub histos: Option<Histos>,
    /// Per-window latency histograms (not serialized).
    #[serde(skip)]
    pub interval_hists: Vec<Histogram<u64>>,
}

impl Report {
    pub(crate) fn build(
        cfg: &Config,
        uri: &hyper::Uri,
        mut col: Collector,
        ended: Instant,
        stopped_early: Option<String>,
        origin_unix_s: f64,
    ) -> Report {
        col.truncate(ended);
        let dur = col.duration().as_secs_f64().max(1e-9);
        let windows = col.window_stats(ended);
        let stable = is_stable(&windows, cfg.stability_percent);
        let errors = col.errors.clone();
        let err_n: u64 = errors.values().sum();
        let lag = LatencyStats::of(&col.histos.lag);
        let mut invalid = Vec::new();
        // The generator's overhead is judged against what it measures: a lag that is noise
        // next to 40 ms latencies inflates sub-millisecond percentiles by tens of percent.
        let p50 = col.histos.latency.value_at_quantile(0.5) as f64 / 1e6;
        let limit = cfg.max_lag_p99.as_secs_f64().max(cfg.lag_fraction * p50);
        if lag.p99 > limit {
            invalid.push(format!(
                "send lag p99 {} exceeds {} (the larger of {} and {:.0}% of the latency p50 {}): the generator, not the server, was the bottleneck",
                format_secs(lag.p99),
                format_secs(limit),
                format_secs(cfg.max_lag_p99.as_secs_f64()),
                cfg.lag_fraction * 100.0,
                format_secs(p50)
            ));
        }
        let receive_lag = (!col.histos.wake.is_empty()).then(|| LatencyStats::of(&col.histos.wake));
        if let Some(r) = receive_lag.as_ref().filter(|r| r.p99 > limit) {
            invalid.push(format!(
                "receive lag p99 {} exceeds {}: the pacers' event loops woke that late after a timer, so responses were timestamped late and latencies read high",
                format_secs(r.p99),
                format_secs(limit)
            ));
        }
        if let Some(u) = errors.get("unsent") {
            invalid.push(format!(
                "{u} requests due in the measured phase were never sent: the generator was still behind its schedule when the run ended, so the achieved rate is what it could send, not what the server can take (ask a lower rate, or give it more --threads)"
            ));
        }
        if let Some(d) = errors.get("dropped") {
            invalid.push(format!(
                "{d} requests dropped by the in-flight safety cap (--max-in-flight)"
            ));
        }
        let (mode, rate, arrival, concurrency) = match &cfg.mode {
            Mode::Open { rate, arrival, .. } => {
                let r = match rate {
                    crate::schedule::Rate::Fixed(r) => format!("{r}/s"),
                    crate::schedule::Rate::Ramp {
                        start,
                        end,
                        step,
                        every,
                    } => {
                        format!(
                            "ramp {start}:{end}:{step}/{}",
                            format_secs(every.as_secs_f64())
                        )
                    }
                };
                let a = match arrival {
                    crate::schedule::Arrival::Constant => "constant".to_string(),
                    crate::schedule::Arrival::Poisson => "poisson".to_string(),
                    crate::schedule::Arrival::Gamma(b) => format!("gamma:{b}"),
                };
                ("open", Some(r), Some(a), None)
            }
            Mode::Closed { concurrency } => ("closed", None, None, Some(*concurrency)),
        };
        let streamed = cfg.workload.stream;
        Report {
            schema_version: SCHEMA_VERSION,
            url: uri.to_string(),
            workload: cfg.workload.name.clone(),
            mode: mode.into(),
            rate,
            arrival,
            concurrency,
            // Set by the run, which sized the pacers.
            pacers: None,
            warmup_s: cfg.warmup.as_secs_f64(),
            duration_s: dur,
            started_unix_s: origin_unix_s,
            scheduled: col.scheduled,
            ok: col.ok,
            error_rate: if col.scheduled == 0 {
                0.0
            } else {
                err_n as f64 / col.scheduled as f64
            },
            errors,
            offered_rps: col.scheduled as f64 / dur,
            achieved_rps: col.ok_in_phase as f64 / dur,
            latency: LatencyStats::of(&col.histos.latency),
            service: LatencyStats::of(&col.histos.service),
            send_lag: lag,
            receive_lag,
            ttft: streamed.then(|| LatencyStats::of(&col.histos.ttft)),
            inter_token: streamed.then(|| LatencyStats::of(&col.histos.itl)),
            tpot: streamed.then(|| LatencyStats::of(&col.histos.tpot)),
            output_tokens_per_s: streamed.then(|| col.output_tokens as f64 / dur),
            goodput_rps: (!col.goodput.is_empty()).then(|| col.good_in_phase as f64 / dur),
            windows,
            latency_drift: col.drift.fit(),
            stable,
            stability_percent: cfg.stability_percent,
            valid: invalid.is_empty(),
            invalid_reasons: invalid,
            stopped_early,
            latency_histogram: record::encode_hist(&col.histos.latency),
            service_histogram: record::encode_hist(&col.histos.service),
            ttft_histogram: streamed.then(|| record::encode_hist(&col.histos.ttft)),
            tpot_histogram: streamed.then(|| record::encode_hist(&col.histos.tpot)),
            interval_hists: col.windows.iter().map(|w| w.0.clone()).collect(),
            histos: Some(col.histos),
        }
    }

    /// The human summary printed at the end of a run.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let what = match (&self.rate, self.concurrency) {
            (Some(r), _) => format!(
                "open loop, {r} {}{}",
                self.arrival.clone().unwrap_or_default(),
                match self.pacers {
                    Some(1) => ", 1 pacer".to_string(),
                    Some(n) => format!(", {n} pacers"),
                    None => String::new(),
                }
            ),
            (None, Some(c)) => format!("closed loop, {c} clients"),
            _ => String::new(),
        };
        let _ = writeln!(
            s,
            "{} → {} ({what}), {:.1}s measured after {:.1}s warm-up",
            self.workload, self.url, self.duration_s, self.warmup_s
        );
        let _ = writeln!(
            s,
            "  offered  {:>10.1} req/s   achieved {:>10.1} req/s",
            self.offered_rps, self.achieved_rps
        );
        let errs = if self.errors.is_empty() {
            "none".to_string()
        } else {
            self.errors
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let _ = writeln!(
            s,
            "  ok {}   errors {} ({:.3}%): {errs}",
            self.ok,
            self.errors.values().sum::<u64>(),
            self.error_rate * 100.0
        );
        let row = |name: &str, l: &LatencyStats| {
            format!(
                "  {name:<22} p50 {:>9}  p90 {:>9}  p95 {:>9}  p99 {:>9}  p99.9 {:>9}  max {:>9}\n",
                format_secs(l.p50),
                format_secs(l.p90),
                format_secs(l.p95),
                format_secs(l.p99),
                format_secs(l.p999),
                format_secs(l.max)
            )
        };
        if self.latency.count == 0 {
            // Rows of zeros would read as a fast server.
            s +=
                "  latency: none measured (no request scheduled in the measured phase succeeded)\n";
        } else {
            s += &row("latency (intended)", &self.latency);
            s += &row("service (actual send)", &self.service);
        }
        if let Some(t) = &self.ttft {
            s += &row("time to first token", t);
        }
        if let Some(t) = &self.inter_token {
            s += &row("inter-token gap", t);
        }
        if let Some(t) = &self.tpot {
            s += &row("time per output token", t);
        }
        if let Some(t) = self.output_tokens_per_s {
            let _ = writeln!(s, "  output tokens {t:>10.1} /s");
        }
        if let Some(g) = self.goodput_rps {
            let _ = writeln!(
                s,
                "  goodput       {g:>10.2} req/s meeting every per-request limit"
            );
        }
        let _ = writeln!(
            s,
            "  send lag p99 {}  (max {})",
            format_secs(self.send_lag.p99),
            format_secs(self.send_lag.max)
        );
        if let Some(r) = &self.receive_lag {
            let _ = writeln!(
                s,
                "  receive lag p99 {}  (max {}; event-loop wake-up after a timer)",
                format_secs(r.p99),
                format_secs(r.max)
            );
        }
        let _ = writeln!(
            s,
            "  stable: {} (asks the last 3 of {} windows' throughput and p95 to agree within {}%)",
            if self.stable { "yes" } else { "no" },
            self.windows.len(),
            self.stability_percent
        );
        if let Some(d) = &self.latency_drift {
            let _ = writeln!(
                s,
                "  latency drift: {:+.1} ms per s of schedule (± {:.1}, {} requests){}",
                d.slope * 1e3,
                d.stderr * 1e3,
                d.n,
                if d.queue_growing() {
                    ": the queue grew, this rate is not sustainable"
                } else {
                    ""
                }
            );
        }
        if let Some(r) = &self.stopped_early {
            let _ = writeln!(s, "  stopped early: {r}");
        }
        if self.valid {
            let _ = writeln!(s, "  valid: yes");
        } else {
            for r in &self.invalid_reasons {
                let _ = writeln!(s, "  INVALID: {r}");
            }
        }
        s
    }

    /// Latency histogram (decoded from the report when loaded from JSON).
    pub fn latency_hist(&self) -> Histogram<u64> {
        match &self.histos {
            Some(h) => h.latency.clone(),
            None => {
                record::decode_hist(&self.latency_histogram).unwrap_or_else(|_| record::new_hist())
            }
        }
    }

    /// The classic percentile distribution of the corrected latency.
    pub fn hgrm(&self) -> String {
        record::hgrm(&self.latency_hist())
    }

    /// HdrHistogram interval log of the per-window latency histograms.
    pub fn hlog(&self, window: Duration) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut ser = V2DeflateSerializer::new();
        // The interval log starts with the measured phase.
        let base = UNIX_EPOCH + Duration::from_secs_f64(self.started_unix_s + self.warmup_s);
        {
            let mut w = IntervalLogWriterBuilder::new()
                .add_comment("batchtune loadgen: latency from intended send time, microseconds")
                .with_start_time(base)
                .with_base_time(base)
                .with_max_value_divisor(1000.0)
                .begin_log_with(&mut out, &mut ser)?;
            for (i, h) in self.interval_hists.iter().enumerate() {
                w.write_histogram(h, window * i as u32, window, Tag::new("latency"))
                    .map_err(|e| std::io::Error::other(format!("{e:?}")))?;
            }
        }
        Ok(out)
    }
}

impl Observed for Report {
    fn latency_quantile(&self, q: f64) -> f64 {
        match &self.histos {
            Some(h) if !h.latency.is_empty() => h.latency.value_at_quantile(q) as f64 / 1e6,
            _ => {
                let h = self.latency_hist();
                if h.is_empty() {
                    0.0
                } else {
                    h.value_at_quantile(q) as f64 / 1e6
                }
            }
        }
    }
    fn latency_mean(&self) -> f64 {
        self.latency.mean
    }
    fn latency_max(&self) -> f64 {
        self.latency.max
    }
    fn error_rate(&self) -> f64 {
        self.error_rate
    }
    fn throughput(&self) -> f64 {
        self.achieved_rps
    }
    fn token_quantile(&self, m: crate::slo::TokenMetric, q: f64) -> Option<f64> {
        use crate::slo::TokenMetric as T;
        if let Some(h) = &self.histos {
            return h.token_quantile(m, q);
        }
        // A report read back from JSON has the summary statistics only.
        let s = match m {
            T::Ttft => self.ttft.as_ref(),
            T::Tpot => self.tpot.as_ref(),
            T::Itl => self.inter_token.as_ref(),
        }?;
        Some(match q {
            q if q <= 0.5 => s.p50,
            q if q <= 0.9 => s.p90,
            q if q <= 0.95 => s.p95,
            q if q <= 0.99 => s.p99,
            _ => s.p999,
        })
    }
    fn goodput(&self) -> Option<f64> {
        self.goodput_rps
    }
}

impl Report {
    /// This run as a row of the run store, with what the report cannot know (where it ran, the
    /// server's knobs) from `cx`.
    pub fn to_record(
        &self,
        run_id: impl Into<String>,
        cx: &results::record::Context,
    ) -> results::record::RunRecord {
        results::record::RunRecord {
            run_id: run_id.into(),
            group: cx.group.clone(),
            label: cx.label.clone(),
            started_unix_s: self.started_unix_s,
            host_cpu: cx.host_cpu.clone(),
            host_gpu: cx.host_gpu.clone(),
            git_revision: cx.git_revision.clone(),
            model: cx.model.clone(),
            devices: cx.devices.clone(),
            knobs_json: serde_json::to_string(&cx.knobs).expect("knobs serialize"),
            workload: self.workload.clone(),
            targets: cx.targets.clone(),
            mode: self.mode.clone(),
            // The nominal rate groups repeated runs; the schedule's actual rate stays derivable.
            offered_rps: self
                .rate
                .as_deref()
                .and_then(|r| r.strip_suffix("/s")?.parse::<f64>().ok())
                .unwrap_or(self.offered_rps),
            concurrency: self.concurrency.unwrap_or(0) as u32,
            duration_s: self.duration_s,
            scheduled: self.scheduled,
            ok: self.ok,
            errors: self.errors.values().sum(),
            error_rate: self.error_rate,
            achieved_rps: self.achieved_rps,
            mean_s: self.latency.mean,
            p50_s: self.latency.p50,
            p90_s: self.latency.p90,
            p95_s: self.latency.p95,
            p99_s: self.latency.p99,
            p999_s: self.latency.p999,
            max_s: self.latency.max,
            valid: self.valid,
            latency_histogram: self.latency_histogram.clone(),
            drift_slope: self.latency_drift.map_or(f64::NAN, |d| d.slope),
            drift_stderr: self.latency_drift.map_or(f64::NAN, |d| d.stderr),
            ttft_histogram: self.ttft_histogram.clone().unwrap_or_default(),
            tpot_histogram: self.tpot_histogram.clone().unwrap_or_default(),
            output_tokens_per_s: self.output_tokens_per_s.unwrap_or(f64::NAN),
        }
    }
}
