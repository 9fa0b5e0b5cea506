//! The batcher: an actor task that owns the queue [`state::State`], applies the batching rule with
//! the live knobs, and hands batches to the device workers while at most `max_concurrent_batches`
//! are in flight.

pub mod state;

use crate::metrics::Metrics;
use crate::workers::{Job, Workers};
use profiles::Profile;
use state::{Decision, Entry, Limits, Pending, State};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch, Notify};

/// A computed request: one vector per input, and the slowest input's queue and compute times.
#[derive(Debug)]
pub struct Outcome {
    /// Unit-norm embeddings in input order.
    pub embeddings: Vec<Vec<f32>>,
    /// Longest time any of its inputs waited in the queue.
    pub queue_time: Duration,
    /// Longest forward pass any of its inputs took part in.
    pub inference_time: Duration,
}

/// Why a request got no vectors.
#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    /// Its deadline passed while it was queued; it was never computed.
    Expired,
    /// Its batch failed or panicked.
    Batch(String),
    /// The server stopped before computing it (only after the drain timeout).
    Shutdown,
}

struct SlotInner {
    results: Vec<Option<Vec<f32>>>,
    remaining: usize,
    queue_time: Duration,
    inference_time: Duration,
    tx: Option<oneshot::Sender<Result<Outcome, Failure>>>,
}

/// Where a request's inputs report back. Inputs of one request may land in different batches
/// (even on different devices); the reply goes out when the last one is done, or at the first
/// failure.
pub struct Slot {
    inner: Mutex<SlotInner>,
}

impl Slot {
    /// A slot for `n` inputs and the receiver the HTTP handler awaits.
    pub fn new(n: usize) -> (Arc<Slot>, oneshot::Receiver<Result<Outcome, Failure>>) {
        let (tx, rx) = oneshot::channel();
        let slot = Slot {
            inner: Mutex::new(SlotInner {
                results: vec![None; n],
                remaining: n,
                queue_time: Duration::ZERO,
                inference_time: Duration::ZERO,
                tx: Some(tx),
            }),
        };
        (Arc::new(slot), rx)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SlotInner> {
        // A worker that panicked mid-update leaves plain data behind; keep serving it.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records input `index`'s vector; sends the reply when it was the last.
    pub fn complete(&self, index: usize, v: Vec<f32>, queue: Duration, inference: Duration) {
        let mut s = self.lock();
        if s.tx.is_none() || s.results[index].is_some() {
            return;
        }
        s.results[index] = Some(v);
        s.remaining -= 1;
        s.queue_time = s.queue_time.max(queue);
        s.inference_time = s.inference_time.max(inference);
        if s.remaining == 0 {
            let out = Outcome {
                embeddings: s
                    .results
                    .iter_mut()
                    .map(|r| r.take().unwrap_or_default())
                    .collect(),
                queue_time: s.queue_time,
                inference_time: s.inference_time,
            };
            if let Some(tx) = s.tx.take() {
                let _ = tx.send(Ok(out));
            }
        }
    }

    /// Fails the whole request (first failure wins); its other queued inputs are then swept.
    pub fn fail(&self, f: Failure) {
        if let Some(tx) = self.lock().tx.take() {
            let _ = tx.send(Err(f));
        }
    }

    fn is_closed(&self) -> bool {
        self.lock().tx.as_ref().is_none_or(|tx| tx.is_closed())
    }
}

/// One queued input: its token ids and where to put its vector.
pub struct Item {
    /// Token ids, special tokens included.
    pub ids: Vec<u32>,
    /// Index of this input in its request.
    pub index: usize,
    /// The request's reply slot.
    pub slot: Arc<Slot>,
}

impl std::fmt::Debug for Item {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Item({} tokens, #{})", self.ids.len(), self.index)
    }
}

impl Pending for Item {
    fn is_cancelled(&self) -> bool {
        self.slot.is_closed()
    }
}

/// Messages to the batcher actor.
pub enum Msg {
    /// New inputs (already admitted: queue space is reserved for them).
    Enqueue(Vec<Entry<Item>>),
    /// A device finished a batch.
    Done(usize),
    /// Stop taking work; compute what is queued; exit when nothing is in flight.
    Shutdown,
}

/// Queue capacity shared by admission (which reserves) and the batcher (which releases).
#[derive(Default)]
pub struct QueueSpace {
    /// Inputs reserved or queued, not yet dispatched.
    pub depth: AtomicUsize,
    /// Signalled whenever space is released, for `overflow = "wait"`.
    pub freed: Notify,
}

impl QueueSpace {
    /// Reserves room for `n` inputs if the queue holds at most `max` afterwards.
    pub fn try_reserve(&self, n: usize, max: usize) -> bool {
        self.depth
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| {
                (d + n <= max).then_some(d + n)
            })
            .is_ok()
    }

    /// Returns room for `n` inputs and wakes waiting requests.
    pub fn release(&self, n: usize) {
        if n > 0 {
            self.depth.fetch_sub(n, Ordering::AcqRel);
            self.freed.notify_waiters();
        }
    }
}

/// Handle to the running batcher.
#[derive(Clone)]
pub struct Batcher {
    tx: mpsc::UnboundedSender<Msg>,
}

impl Batcher {
    /// Starts the actor. It runs until [`Batcher::shutdown`] and returns when queue and devices are empty.
    pub fn spawn(
        profile: watch::Receiver<Arc<Profile>>,
        workers: Workers,
        space: Arc<QueueSpace>,
        metrics: Arc<Metrics>,
    ) -> (Batcher, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let done_tx = tx.clone();
        let handle = tokio::spawn(run(rx, done_tx, profile, workers, space, metrics));
        (Batcher { tx }, handle)
    }

    /// Queues admitted inputs. Fails only when the batcher has already stopped.
    pub fn enqueue(&self, entries: Vec<Entry<Item>>) -> Result<(), Vec<Entry<Item>>> {
        self.tx.send(Msg::Enqueue(entries)).map_err(|e| match e.0 {
            Msg::Enqueue(v) => v,
            _ => unreachable!(),
        })
    }

    /// Asks the batcher to finish queued work and stop.
    pub fn shutdown(&self) {
        let _ = self.tx.send(Msg::Shutdown);
    }
}

async fn run(
    mut rx: mpsc::UnboundedReceiver<Msg>,
    done_tx: mpsc::UnboundedSender<Msg>,
    mut profile: watch::Receiver<Arc<Profile>>,
    mut workers: Workers,
    space: Arc<QueueSpace>,
    metrics: Arc<Metrics>,
) {
    workers.set_done_channel(done_tx);
    let mut state: State<Item> = State::default();
    let mut in_flight = 0usize;
    let mut draining = false;
    loop {
        let p = profile.borrow_and_update().clone();
        let limits = Limits {
            max_batch_size: p.max_batch_size,
            max_batch_tokens: p.max_batch_tokens,
            batch_wait_timeout: p.batch_wait_timeout,
        };
        let now = Instant::now();
        let swept = state.sweep(now);
        let dropped = swept.expired.len() + swept.cancelled.len();
        for e in swept.expired {
            metrics.expired.inc();
            e.payload.slot.fail(Failure::Expired);
        }
        metrics.cancelled.inc_by(swept.cancelled.len() as u64);
        space.release(dropped);

        let mut wake = None;
        while in_flight < p.max_concurrent_batches {
            match state.decide(now, &limits, draining) {
                Decision::Dispatch(batch, trigger) => {
                    space.release(batch.len());
                    in_flight += 1;
                    workers.dispatch(Job {
                        entries: batch,
                        trigger,
                    });
                }
                Decision::WaitUntil(t) => {
                    wake = Some(t);
                    break;
                }
                Decision::Idle => break,
            }
        }
        metrics.queue_depth.set(state.len() as i64);
        metrics.batches_in_flight.set(in_flight as i64);
        if draining && state.is_empty() && in_flight == 0 {
            break;
        }
        let wake = match (wake, state.next_deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let first = tokio::select! {
            msg = rx.recv() => Some(msg.unwrap_or(Msg::Shutdown)),
            _ = sleep_until(wake), if wake.is_some() => None,
            changed = profile.changed() => changed.is_err().then_some(Msg::Shutdown),
        };
        if let Some(msg) = first {
            let mut ctx = Ctx {
                state: &mut state,
                in_flight: &mut in_flight,
                draining: &mut draining,
                workers: &mut workers,
            };
            ctx.apply(msg);
            // Take everything else that already arrived, so a burst forms one batch, not many.
            while let Ok(m) = rx.try_recv() {
                ctx.apply(m);
            }
        }
    }
}

struct Ctx<'a> {
    state: &'a mut State<Item>,
    in_flight: &'a mut usize,
    draining: &'a mut bool,
    workers: &'a mut Workers,
}

impl Ctx<'_> {
    fn apply(&mut self, msg: Msg) {
        match msg {
            Msg::Enqueue(entries) => entries.into_iter().for_each(|e| self.state.push(e)),
            Msg::Done(d) => {
                *self.in_flight -= 1;
                self.workers.finished(d);
            }
            Msg::Shutdown => *self.draining = true,
        }
    }
}

async fn sleep_until(t: Option<Instant>) {
    if let Some(t) = t {
        tokio::time::sleep_until(tokio::time::Instant::from_std(t)).await;
    }
}
