//! What a queued embedding input carries and how its request is answered: [`Item`] (token ids
//! and a reply [`Slot`]), the request's [`Outcome`] or [`Failure`]. Shared by the batcher and the
//! device workers, so neither imports the other for these types.

use super::state::Pending;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;

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
