//! One run as a flat record: what ran, where, and what happened. Flat on purpose: every field is
//! a Parquet column, so a run store can be filtered and joined by any tool that reads Parquet.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One measured run (one loadgen run against one server configuration).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// Unique within a store: `<label>@<rate>#<repeat>` for comparisons.
    pub run_id: String,
    /// The collection the run belongs to (comparison name, search id, gate run).
    pub group: String,
    /// What was measured, for legends: a profile name, `baseline`, `candidate`…
    pub label: String,
    /// Start of the measured phase, seconds since the Unix epoch.
    pub started_unix_s: f64,
    /// Host CPU model and core count.
    pub host_cpu: String,
    /// GPU names, or `none`.
    pub host_gpu: String,
    /// `git describe`-style revision of the code that ran.
    pub git_revision: String,
    /// Model spec served.
    pub model: String,
    /// Devices, comma-separated.
    pub devices: String,
    /// Server knobs as a JSON object (every knob the server reported).
    pub knobs_json: String,
    /// Workload description (loadgen's).
    pub workload: String,
    /// Targets in force, `;`-separated (empty when none).
    pub targets: String,
    /// `open` or `closed`.
    pub mode: String,
    /// Offered rate as asked (open loop: the nominal rate, e.g. 70 for `--rps 70`), requests/s;
    /// `scheduled ÷ duration_s` is what the random schedule actually offered. Closed loop: the
    /// achieved rate.
    pub offered_rps: f64,
    /// Clients of a closed loop (0 for open loop).
    pub concurrency: u32,
    /// Measured seconds.
    pub duration_s: f64,
    /// Requests scheduled in the measured phase.
    pub scheduled: u64,
    /// Successful responses.
    pub ok: u64,
    /// Failed requests (any status ≠ 2xx, timeouts, connection errors).
    pub errors: u64,
    /// errors ÷ (ok + errors).
    pub error_rate: f64,
    /// Completions per second in the measured phase.
    pub achieved_rps: f64,
    /// Latency statistics, seconds (coordinated-omission corrected).
    pub mean_s: f64,
    /// Median latency, seconds.
    pub p50_s: f64,
    /// 90th percentile, seconds.
    pub p90_s: f64,
    /// 95th percentile, seconds.
    pub p95_s: f64,
    /// 99th percentile, seconds.
    pub p99_s: f64,
    /// 99.9th percentile, seconds.
    pub p999_s: f64,
    /// Largest latency, seconds.
    pub max_s: f64,
    /// loadgen judged the run valid (the schedule was kept).
    pub valid: bool,
    /// The full latency histogram (HdrHistogram V2, base64, microseconds): percentiles across
    /// runs are computed from merged histograms, never by averaging percentiles.
    pub latency_histogram: String,
    /// Latency gained per second of schedule (least squares over the run's requests; see
    /// `loadgen::record::Drift`): ≈ 0 when the server kept up. NaN when not measured.
    pub drift_slope: f64,
    /// Standard error of [`RunRecord::drift_slope`]; NaN when not measured.
    pub drift_stderr: f64,
    /// Streaming generation: time-to-first-token histogram (same encoding as
    /// [`RunRecord::latency_histogram`]); empty for runs that did not stream.
    pub ttft_histogram: String,
    /// Streaming generation: time-per-output-token histogram (one value per request); empty
    /// for runs that did not stream.
    pub tpot_histogram: String,
    /// Streaming generation: output tokens of the phase's successes per second; NaN when the
    /// run did not stream.
    pub output_tokens_per_s: f64,
}

/// Where a run happened and under which configuration: the part a loadgen report does not know.
#[derive(Debug, Clone, Default)]
pub struct Context {
    /// See [`RunRecord::group`].
    pub group: String,
    /// See [`RunRecord::label`].
    pub label: String,
    /// See [`RunRecord::host_cpu`].
    pub host_cpu: String,
    /// See [`RunRecord::host_gpu`].
    pub host_gpu: String,
    /// See [`RunRecord::git_revision`].
    pub git_revision: String,
    /// See [`RunRecord::model`].
    pub model: String,
    /// See [`RunRecord::devices`].
    pub devices: String,
    /// Server knobs (name → value as the server reports it).
    pub knobs: BTreeMap<String, serde_json::Value>,
    /// See [`RunRecord::targets`].
    pub targets: String,
}

impl RunRecord {
    /// The run's latency histogram (microseconds).
    pub fn histogram(&self) -> Result<hdrhistogram::Histogram<u64>, String> {
        crate::hist::decode_hist(&self.latency_histogram)
    }

    /// The run's time-to-first-token and time-per-output-token histograms (microseconds);
    /// `None` for a run that did not stream.
    pub fn token_histograms(
        &self,
    ) -> Option<(hdrhistogram::Histogram<u64>, hdrhistogram::Histogram<u64>)> {
        if self.ttft_histogram.is_empty() || self.tpot_histogram.is_empty() {
            return None;
        }
        let ttft = crate::hist::decode_hist(&self.ttft_histogram).ok()?;
        let tpot = crate::hist::decode_hist(&self.tpot_histogram).ok()?;
        Some((ttft, tpot))
    }
}
