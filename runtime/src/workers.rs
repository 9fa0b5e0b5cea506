//! Device workers: OS threads that run the synchronous [`Backend`] on batches, one pool per
//! model replica. Batches go to the least-loaded replica; a replica grows a thread whenever it has
//! more batches in flight than threads, so `max_concurrent_batches` (a live knob) really is the
//! number of forwards running at once.

use crate::batcher::state::{Entry, Trigger};
use crate::batcher::{Failure, Item, Msg};
use crate::metrics::{BatchLabel, DeviceLabel, Metrics};
use crate::model::Backend;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;

/// A batch on its way to a device.
pub struct Job {
    /// The inputs, in queue order.
    pub entries: Vec<Entry<Item>>,
    /// The rule that released it.
    pub trigger: Trigger,
}

struct Device {
    label: String,
    backend: Arc<dyn Backend>,
    tx: crossbeam_channel::Sender<Job>,
    rx: crossbeam_channel::Receiver<Job>,
    threads: usize,
    in_flight: usize,
}

/// All replicas and their thread pools.
pub struct Workers {
    devices: Vec<Device>,
    metrics: Arc<Metrics>,
    done: Option<mpsc::UnboundedSender<Msg>>,
}

impl Workers {
    /// One pool per replica; threads start on first use.
    pub fn new(replicas: Vec<(String, Arc<dyn Backend>)>, metrics: Arc<Metrics>) -> Self {
        let devices = replicas
            .into_iter()
            .map(|(label, backend)| {
                let (tx, rx) = crossbeam_channel::unbounded();
                Device {
                    label,
                    backend,
                    tx,
                    rx,
                    threads: 0,
                    in_flight: 0,
                }
            })
            .collect();
        Workers {
            devices,
            metrics,
            done: None,
        }
    }

    pub(crate) fn set_done_channel(&mut self, done: mpsc::UnboundedSender<Msg>) {
        self.done = Some(done);
    }

    /// Sends a batch to the replica with the fewest batches in flight (ties: the first).
    pub fn dispatch(&mut self, job: Job) {
        let (idx, dev) = self
            .devices
            .iter_mut()
            .enumerate()
            .min_by_key(|(_, d)| d.in_flight)
            .expect("at least one device");
        dev.in_flight += 1;
        if dev.in_flight > dev.threads {
            dev.threads += 1;
            let rx = dev.rx.clone();
            let backend = dev.backend.clone();
            let label = dev.label.clone();
            let metrics = self.metrics.clone();
            let done = self.done.clone().expect("batcher set the done channel");
            std::thread::Builder::new()
                .name(format!("worker-{label}-{}", dev.threads))
                .spawn(move || worker_loop(idx, label, backend, rx, done, metrics))
                .expect("spawning a worker thread");
        }
        dev.tx
            .send(job)
            .expect("worker channel open while the batcher runs");
    }

    /// Marks one batch of replica `idx` finished.
    pub fn finished(&mut self, idx: usize) {
        if let Some(d) = self.devices.get_mut(idx) {
            d.in_flight = d.in_flight.saturating_sub(1);
        }
    }
}

fn worker_loop(
    idx: usize,
    label: String,
    backend: Arc<dyn Backend>,
    rx: crossbeam_channel::Receiver<Job>,
    done: mpsc::UnboundedSender<Msg>,
    metrics: Arc<Metrics>,
) {
    let dev_label = DeviceLabel {
        device: label.clone(),
    };
    while let Ok(job) = rx.recv() {
        run_job(&label, &dev_label, backend.as_ref(), job, &metrics);
        if done.send(Msg::Done(idx)).is_err() {
            break;
        }
    }
}

fn run_job(
    label: &str,
    dev_label: &DeviceLabel,
    backend: &dyn Backend,
    job: Job,
    metrics: &Metrics,
) {
    let start = Instant::now();
    // Clients that left while the batch waited for a thread are not computed.
    let entries: Vec<Entry<Item>> = job
        .entries
        .into_iter()
        .filter(|e| {
            let gone = crate::batcher::state::Pending::is_cancelled(&e.payload);
            if gone {
                metrics.cancelled.inc();
            }
            !gone
        })
        .collect();
    if entries.is_empty() {
        return;
    }
    for e in &entries {
        metrics
            .queue_time
            .observe(start.duration_since(e.enqueued).as_secs_f64());
    }
    metrics
        .batch_size
        .get_or_create(dev_label)
        .observe(entries.len() as f64);
    metrics
        .batches
        .get_or_create(&BatchLabel {
            device: label.to_string(),
            trigger: job.trigger.as_str().into(),
        })
        .inc();
    let seqs: Vec<&[u32]> = entries.iter().map(|e| e.payload.ids.as_slice()).collect();
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| backend.embed(&seqs)));
    let took = start.elapsed();
    metrics
        .inference_time
        .get_or_create(dev_label)
        .observe(took.as_secs_f64());
    let failure = match result {
        Ok(Ok(vectors)) if vectors.len() == entries.len() => {
            for (e, v) in entries.iter().zip(vectors) {
                let queued = start.duration_since(e.enqueued);
                e.payload.slot.complete(e.payload.index, v, queued, took);
            }
            return;
        }
        Ok(Ok(vectors)) => format!(
            "batch on {label} failed: backend returned {} vectors for {} inputs",
            vectors.len(),
            entries.len()
        ),
        Ok(Err(msg)) => format!("batch on {label} failed: {msg}"),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            format!("batch on {label} panicked: {msg}")
        }
    };
    tracing::error!("{failure}");
    for e in &entries {
        e.payload.slot.fail(Failure::Batch(failure.clone()));
    }
}
