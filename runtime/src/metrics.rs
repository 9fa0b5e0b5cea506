//! Prometheus metrics, one registry per server (not a global recorder), so that tests running
//! several servers in one process each see only their own numbers.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::Mutex;

/// Label set for per-status request counts.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    /// HTTP status code.
    pub status: String,
}

/// Label set for per-device series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeviceLabel {
    /// Replica label, e.g. `cpu:0`, `cuda:1`.
    pub device: String,
}

/// Label set for batches by device and release trigger.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BatchLabel {
    /// Replica label.
    pub device: String,
    /// Which rule released the batch: size, tokens, timeout, drain.
    pub trigger: String,
}

/// Label set for generations by how they ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FinishLabel {
    /// `stop` (EOS or a stop string), `length` (`max_tokens`), `cancelled` (client left),
    /// `error`, `expired`.
    pub reason: String,
}

/// Label set for the parts of an engine step.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    /// Replica label.
    pub device: String,
    /// `schedule` (plan, KV reservations), `forward` (on a GPU: the host issuing the step's
    /// kernels), `sample` (drawing the tokens until their ids are on the host: on a GPU the
    /// only point where the host waits for the device), or `engine` (appending the tokens and
    /// ending sequences; text, stop strings and client events are the output stage's, on a
    /// thread of its own).
    pub phase: String,
}

/// Generation series (registered only when a decoder is served).
pub struct GenMetrics {
    /// Arrival to first output token.
    pub ttft: Histogram,
    /// Per request: (end − first token) / (output tokens − 1).
    pub tpot: Histogram,
    /// Arrival to the sequence starting (its KV reserved).
    pub queue_time: Histogram,
    /// Sequences decoding or prefilling.
    pub running: Gauge,
    /// Sequences waiting to start.
    pub waiting: Gauge,
    /// KV-cache tokens reserved, all replicas.
    pub kv_tokens_used: Gauge,
    /// Prompt tokens computed (prefill).
    pub prefill_tokens: Counter,
    /// Output tokens computed (decode steps and first tokens).
    pub output_tokens: Counter,
    /// Engine steps (forwards), by device.
    pub steps: Family<DeviceLabel, Counter>,
    /// Sequences per step, by device.
    pub step_sequences: Family<DeviceLabel, Histogram>,
    /// Generations ended, by reason.
    pub finished: Family<FinishLabel, Counter>,
    /// Time per step by phase: where a served step's time goes beyond the model's own.
    pub step_phase: Family<PhaseLabel, Histogram>,
}

fn time_hist() -> Histogram {
    // 50us .. ~52s, doubling: covers CPU micro-batches and multi-second GPU generations alike.
    Histogram::new(exponential_buckets(50e-6, 2.0, 21))
}

fn size_hist() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 13))
}

/// Every series the runtime exports. Names follow `batchtune_<thing>_<unit>`.
pub struct Metrics {
    registry: Mutex<Registry>,
    /// Requests answered, by status.
    pub requests: Family<StatusLabel, Counter>,
    /// Inputs waiting in the queue.
    pub queue_depth: Gauge,
    /// Batches being computed.
    pub batches_in_flight: Gauge,
    /// Inputs per batch, by device.
    pub batch_size: Family<DeviceLabel, Histogram>,
    /// Batches by device and trigger.
    pub batches: Family<BatchLabel, Counter>,
    /// Time each input spent queued before its batch started.
    pub queue_time: Histogram,
    /// Forward-pass time per batch, by device.
    pub inference_time: Family<DeviceLabel, Histogram>,
    /// Model forwards run, by device: more than the batches when batches are split by length.
    pub forwards: Family<DeviceLabel, Counter>,
    /// Arrival to response, per request.
    pub request_duration: Histogram,
    /// Queued inputs dropped because their deadline passed (answered 504, never computed).
    pub expired: Counter,
    /// Queued inputs dropped because their client left.
    pub cancelled: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every series.
    pub fn new() -> Self {
        let mut r = Registry::default();
        let requests = Family::<StatusLabel, Counter>::default();
        let queue_depth = Gauge::default();
        let batches_in_flight = Gauge::default();
        let batch_size =
            Family::<DeviceLabel, Histogram>::new_with_constructor(size_hist as fn() -> Histogram);
        let batches = Family::<BatchLabel, Counter>::default();
        let queue_time = time_hist();
        let inference_time =
            Family::<DeviceLabel, Histogram>::new_with_constructor(time_hist as fn() -> Histogram);
        let forwards = Family::<DeviceLabel, Counter>::default();
        let request_duration = time_hist();
        let expired = Counter::default();
        let cancelled = Counter::default();
        r.register(
            "batchtune_requests",
            "HTTP requests answered, by status",
            requests.clone(),
        );
        r.register(
            "batchtune_queue_depth_inputs",
            "Inputs waiting in the queue",
            queue_depth.clone(),
        );
        r.register(
            "batchtune_batches_in_flight",
            "Batches being computed",
            batches_in_flight.clone(),
        );
        r.register(
            "batchtune_batch_size_inputs",
            "Inputs per batch",
            batch_size.clone(),
        );
        r.register(
            "batchtune_batches",
            "Batches computed, by release trigger",
            batches.clone(),
        );
        r.register(
            "batchtune_queue_time_seconds",
            "Time an input waited before its batch started",
            queue_time.clone(),
        );
        r.register(
            "batchtune_inference_time_seconds",
            "Forward-pass time per batch",
            inference_time.clone(),
        );
        r.register(
            "batchtune_forwards",
            "Model forwards run (a batch split by length runs several)",
            forwards.clone(),
        );
        r.register(
            "batchtune_request_duration_seconds",
            "Arrival to response, per request",
            request_duration.clone(),
        );
        r.register(
            "batchtune_expired_inputs",
            "Queued inputs past their deadline (504, never computed)",
            expired.clone(),
        );
        r.register(
            "batchtune_cancelled_inputs",
            "Queued inputs whose client went away",
            cancelled.clone(),
        );
        Metrics {
            registry: Mutex::new(r),
            requests,
            queue_depth,
            batches_in_flight,
            batch_size,
            batches,
            queue_time,
            inference_time,
            forwards,
            request_duration,
            expired,
            cancelled,
        }
    }

    /// Registers and returns the generation series.
    pub fn generation(&self) -> GenMetrics {
        let g = GenMetrics {
            ttft: time_hist(),
            tpot: time_hist(),
            queue_time: time_hist(),
            running: Gauge::default(),
            waiting: Gauge::default(),
            kv_tokens_used: Gauge::default(),
            prefill_tokens: Counter::default(),
            output_tokens: Counter::default(),
            steps: Family::default(),
            step_sequences: Family::new_with_constructor(size_hist as fn() -> Histogram),
            finished: Family::default(),
            step_phase: Family::new_with_constructor(time_hist as fn() -> Histogram),
        };
        let mut r = self.registry.lock().expect("metrics registry poisoned");
        r.register(
            "batchtune_time_to_first_token_seconds",
            "Arrival to the first output token",
            g.ttft.clone(),
        );
        r.register(
            "batchtune_time_per_output_token_seconds",
            "Per request, time after the first token divided by the tokens after it",
            g.tpot.clone(),
        );
        r.register(
            "batchtune_generation_queue_time_seconds",
            "Arrival to the sequence starting (KV reserved)",
            g.queue_time.clone(),
        );
        r.register(
            "batchtune_running_sequences",
            "Sequences prefilling or decoding",
            g.running.clone(),
        );
        r.register(
            "batchtune_waiting_sequences",
            "Sequences waiting to start",
            g.waiting.clone(),
        );
        r.register(
            "batchtune_kv_cache_tokens_used",
            "KV-cache tokens reserved by running sequences",
            g.kv_tokens_used.clone(),
        );
        r.register(
            "batchtune_prefill_tokens",
            "Prompt tokens computed",
            g.prefill_tokens.clone(),
        );
        r.register(
            "batchtune_output_tokens",
            "Output tokens generated",
            g.output_tokens.clone(),
        );
        r.register(
            "batchtune_engine_steps",
            "Engine steps (one forward each)",
            g.steps.clone(),
        );
        r.register(
            "batchtune_step_sequences",
            "Sequences advanced per step",
            g.step_sequences.clone(),
        );
        r.register(
            "batchtune_step_phase_seconds",
            "Engine step time by phase: schedule, forward (on a GPU: issuing the kernels), sample (the draw; on a GPU: waiting for the step, or for the previous one when steps overlap), engine (tokens to requests)",
            g.step_phase.clone(),
        );
        r.register(
            "batchtune_generations_finished",
            "Generations ended, by reason",
            g.finished.clone(),
        );
        g
    }

    /// Counts one answered request.
    pub fn count_status(&self, status: u16) {
        self.requests
            .get_or_create(&StatusLabel {
                status: status.to_string(),
            })
            .inc();
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let r = self.registry.lock().expect("metrics registry poisoned");
        prometheus_client::encoding::text::encode(&mut out, &r)
            .expect("writing to a String cannot fail");
        out
    }
}
