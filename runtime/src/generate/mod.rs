//! The generation service: what `POST /v1/completions` and `POST /v1/chat/completions` call
//! once a request is parsed and its prompt tokenized. It admits the request
//! ([`crate::admission`]), places the sequence on the least-loaded replica, and returns the
//! stream of [`engine::GenEvent`]s that replica's [`engine`] thread produces; the
//! [`scheduler`] inside each engine decides every step.

pub mod engine;
pub mod sampling;
pub mod scheduler;
mod stream;

use crate::admission::{Admission, AdmissionError, QueueSpace};
use crate::metrics::GenMetrics;
use crate::model::llama::Llama;
use crate::model::lm_tokenizer::LmTokenizer;
use engine::{EngineCtx, GenEvent, GenRequest, Msg};
use profiles::Profile;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, watch};

/// Runs one warm-up step on every replica of `lm` (blocking: call it where the model loads), its
/// logits drawn on the device greedily and at a temperature as served steps draw them, so that
/// none of a served step's kernels is compiled while requests wait
/// ([`Llama::warm_up`](crate::model::llama::Llama::warm_up)).
pub fn warm_up(lm: &crate::model::lm::LoadedLm) -> Result<(), crate::model::ModelError> {
    use sampling::{sample_on_device, Placement};
    for (label, model) in &lm.replicas {
        let t = std::time::Instant::now();
        let draws = [Placement::Greedy, Placement::Device { temperature: 1.0 }];
        let step = model
            .warm_up()
            .and_then(|logits| sample_on_device(&logits, &draws));
        step.map_err(|e| crate::model::ModelError::Load {
            model: lm.name.clone(),
            reason: format!("warm-up step on {label}: {e}"),
        })?;
        tracing::info!(device = %label, took_ms = t.elapsed().as_millis() as u64, "replica warmed up");
    }
    Ok(())
}

/// Why a generation request was not queued.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// Refused by admission (rate limit, queue full).
    #[error(transparent)]
    Admission(#[from] AdmissionError),
    /// The server is stopping.
    #[error("server is shutting down")]
    Stopped,
}

struct Replica {
    tx: crossbeam_channel::Sender<Msg>,
    load: Arc<AtomicUsize>,
}

/// Request-level generation over one engine per replica.
pub struct GenerateService {
    replicas: Vec<Replica>,
    admission: Arc<Admission>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

/// What the service needs to start its engines.
pub struct GenerateOptions {
    /// One model per device, with its label.
    pub replicas: Vec<(String, Arc<Llama>)>,
    /// Shared tokenizer (outputs are decoded in each engine's output stage).
    pub tokenizer: Arc<LmTokenizer>,
    /// End-of-sequence ids.
    pub eos: Vec<u32>,
    /// Live knobs.
    pub profile: watch::Receiver<Arc<Profile>>,
    /// Generation series.
    pub metrics: Arc<GenMetrics>,
    /// Admission shared with the server.
    pub admission: Arc<Admission>,
    /// Queue capacity (waiting sequences).
    pub space: Arc<QueueSpace>,
    /// Steps a CUDA profiler records, if any.
    pub profiler: Option<engine::ProfilerWindow>,
    /// Whether each engine overlaps its steps.
    pub overlap: engine::Overlap,
    /// Test-only planted faults, checked before every step's forward.
    #[cfg(feature = "test-hooks")]
    pub faults: Arc<crate::hooks::Armed>,
}

impl GenerateService {
    /// Starts one engine thread per replica.
    pub fn start(o: GenerateOptions) -> std::io::Result<Self> {
        let mut replicas = Vec::new();
        let mut threads = Vec::new();
        for (label, model) in o.replicas {
            let (tx, rx) = crossbeam_channel::unbounded();
            let load = Arc::new(AtomicUsize::new(0));
            let ctx = EngineCtx {
                label: label.clone(),
                model,
                eos: o.eos.clone(),
                profile: o.profile.clone(),
                metrics: o.metrics.clone(),
                space: o.space.clone(),
                load: load.clone(),
                profiler: o.profiler,
                overlap: o.overlap,
                #[cfg(feature = "test-hooks")]
                faults: o.faults.clone(),
            };
            let stream = stream::Stream::start(&label, o.tokenizer.clone(), o.metrics.clone())?;
            threads.push(
                std::thread::Builder::new()
                    .name(format!("engine-{label}"))
                    .spawn(move || engine::run(ctx, rx, stream))?,
            );
            replicas.push(Replica { tx, load });
        }
        Ok(GenerateService {
            replicas,
            admission: o.admission,
            threads: Mutex::new(threads),
        })
    }

    /// Admits `req` under the live profile `p` and queues it on the least-loaded replica; the
    /// receiver gets its events. Dropping the receiver cancels it at the engine's next step.
    pub async fn submit(
        &self,
        req: GenRequest,
        p: &Profile,
    ) -> Result<mpsc::UnboundedReceiver<GenEvent>, GenerateError> {
        self.admission.check_rate(p)?;
        self.admission.reserve(1, p).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        let r = self
            .replicas
            .iter()
            .min_by_key(|r| r.load.load(Ordering::Acquire))
            .expect("at least one replica");
        r.load.fetch_add(1, Ordering::AcqRel);
        if r.tx.send(Msg::New(Box::new(req), tx)).is_err() {
            r.load.fetch_sub(1, Ordering::AcqRel);
            self.admission.space.release(1);
            return Err(GenerateError::Stopped);
        }
        Ok(rx)
    }

    /// Asks every engine to finish what it admitted and stop.
    pub fn shutdown(&self) {
        for r in &self.replicas {
            let _ = r.tx.send(Msg::Shutdown);
        }
    }

    /// Fails every sequence still running or waiting (503) and stops the engines: the drain
    /// timeout passed.
    pub fn abort(&self) {
        for r in &self.replicas {
            let _ = r.tx.send(Msg::Abort);
        }
    }

    /// Waits for the engines to stop (blocking; call from a blocking thread).
    pub fn join(&self) {
        let threads: Vec<_> = self
            .threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .collect();
        for t in threads {
            let _ = t.join();
        }
    }
}
