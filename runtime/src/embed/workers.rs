//! Device workers: OS threads that run the [`Backend`] on batches. Batches go to the least-loaded
//! replica. A CPU replica grows a thread whenever it has more batches in flight than threads, so
//! `max_concurrent_batches` (a live knob) really is the number of forwards running at once. A GPU
//! replica ([`Backend::pipelined`]) has exactly one thread, which launches the next batch before
//! waiting for the current one: there `max_concurrent_batches` is the pipeline depth.

use super::job::{Failure, Item};
use super::state::{Entry, Trigger};
use crate::metrics::{BatchLabel, DeviceLabel, Metrics};
use crate::model::{Backend, Pending};
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
    done: mpsc::UnboundedSender<usize>,
}

impl Workers {
    /// One pool per replica; threads start on first use. The receiver gets a replica's index
    /// each time one of its batches is finished (answered), exactly once per dispatched job.
    pub fn new(
        replicas: Vec<(String, Arc<dyn Backend>)>,
        metrics: Arc<Metrics>,
    ) -> (Self, mpsc::UnboundedReceiver<usize>) {
        let (done, done_rx) = mpsc::unbounded_channel();
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
        (
            Workers {
                devices,
                metrics,
                done,
            },
            done_rx,
        )
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
        // A pipelined replica (GPU) never gets a second thread.
        if dev.in_flight > dev.threads && !(dev.threads > 0 && dev.backend.pipelined()) {
            dev.threads += 1;
            let rx = dev.rx.clone();
            let backend = dev.backend.clone();
            let label = dev.label.clone();
            let metrics = self.metrics.clone();
            let done = self.done.clone();
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
    done: mpsc::UnboundedSender<usize>,
    metrics: Arc<Metrics>,
) {
    let dev_label = DeviceLabel {
        device: label.clone(),
    };
    let ctx = Ctx {
        label: &label,
        dev_label: &dev_label,
        backend: backend.as_ref(),
        metrics: &metrics,
    };
    let pipelined = backend.pipelined();
    // Every job taken is reported done exactly once, when its results are out.
    let report = || done.send(idx).is_ok();
    // The batch launched but not finished yet (pipelined replicas only).
    let mut pending: Option<Started> = None;
    loop {
        // With a batch on the device, take the next one only if it is already waiting, and
        // launch it before finishing the current one; otherwise finish first, then block. (A
        // closed channel reads as "nothing waiting": the pending batch is finished first, then
        // the blocking receive ends the loop.)
        let job = match pending {
            Some(_) => rx.try_recv().ok(),
            None => match rx.recv() {
                Ok(job) => Some(job),
                Err(_) => break,
            },
        };
        let (finish, taken) = match job.map(|j| ctx.start(j)) {
            Some(Some(s)) if pipelined => (pending.replace(s), false),
            Some(Some(s)) => (Some(s), false),
            // Every client of the batch left: nothing to compute, done at once.
            Some(None) => (None, true),
            None => (pending.take(), false),
        };
        let done_now = finish.is_some() || taken;
        if let Some(p) = finish {
            ctx.finish(p);
        }
        if done_now && !report() {
            break;
        }
    }
}

/// What a worker needs to run batches on its replica.
struct Ctx<'a> {
    label: &'a str,
    dev_label: &'a DeviceLabel,
    backend: &'a dyn Backend,
    metrics: &'a Metrics,
}

/// A batch launched on the replica.
struct Started {
    entries: Vec<Entry<Item>>,
    start: Instant,
    pending: Result<Box<dyn Pending>, String>,
}

impl Ctx<'_> {
    /// Drops inputs whose clients left, records the batch, launches it. `None` when nothing is
    /// left to compute.
    fn start(&self, job: Job) -> Option<Started> {
        let (metrics, dev_label) = (self.metrics, self.dev_label);
        let start = Instant::now();
        // Clients that left while the batch waited for a thread are not computed.
        let entries: Vec<Entry<Item>> = job
            .entries
            .into_iter()
            .filter(|e| {
                let gone = super::state::Pending::is_cancelled(&e.payload);
                if gone {
                    metrics.cancelled.inc();
                }
                !gone
            })
            .collect();
        if entries.is_empty() {
            return None;
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
                device: self.label.to_string(),
                trigger: job.trigger.as_str().into(),
            })
            .inc();
        let seqs: Vec<&[u32]> = entries.iter().map(|e| e.payload.ids.as_slice()).collect();
        let pending = std::panic::catch_unwind(AssertUnwindSafe(|| self.backend.launch(&seqs)))
            .map_err(|p| self.panic_message(p));
        Some(Started {
            entries,
            start,
            pending,
        })
    }

    /// Waits for a launched batch and answers its inputs.
    fn finish(&self, s: Started) {
        let (label, metrics) = (self.label, self.metrics);
        let result = s.pending.and_then(|p| {
            std::panic::catch_unwind(AssertUnwindSafe(|| p.finish()))
                .map_err(|p| self.panic_message(p))
        });
        // Launch to results: on a pipelined replica this includes waiting behind the batch
        // launched before it.
        let took = s.start.elapsed();
        metrics
            .inference_time
            .get_or_create(self.dev_label)
            .observe(took.as_secs_f64());
        let failure = match result {
            Ok(Ok((vectors, forwards))) if vectors.len() == s.entries.len() => {
                metrics
                    .forwards
                    .get_or_create(self.dev_label)
                    .inc_by(forwards as u64);
                for (e, v) in s.entries.iter().zip(vectors) {
                    let queued = s.start.duration_since(e.enqueued);
                    e.payload.slot.complete(e.payload.index, v, queued, took);
                }
                return;
            }
            Ok(Ok((vectors, _))) => format!(
                "batch on {label} failed: backend returned {} vectors for {} inputs",
                vectors.len(),
                s.entries.len()
            ),
            Ok(Err(msg)) => format!("batch on {label} failed: {msg}"),
            Err(panic) => panic,
        };
        tracing::error!("{failure}");
        for e in &s.entries {
            e.payload.slot.fail(Failure::Batch(failure.clone()));
        }
    }

    fn panic_message(&self, panic: Box<dyn std::any::Any + Send>) -> String {
        let msg = crate::panic_text(&*panic);
        format!("batch on {} panicked: {msg}", self.label)
    }
}
