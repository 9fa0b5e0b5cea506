//! The batcher: an actor task that owns the queue [`state::State`], applies the batching rule with
//! the live knobs, and hands batches to the device workers while at most `max_concurrent_batches`
//! are in flight. The workers report finished batches on a channel they own
//! ([`Workers::new`] returns its receiver), so the workers never see the batcher.

use super::job::{Failure, Item};
use super::state::{Decision, Entry, Limits, State};
use super::workers::{Job, Workers};
use crate::admission::QueueSpace;
use crate::metrics::Metrics;
use profiles::Profile;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{mpsc, watch};

/// Messages to the batcher actor.
pub enum Msg {
    /// New inputs (already admitted: queue space is reserved for them).
    Enqueue(Vec<Entry<Item>>),
    /// Stop taking work; compute what is queued; exit when nothing is in flight.
    Shutdown,
    /// The drain timeout passed: refuse what is still queued (503), finish the batches on the
    /// devices, exit.
    Abort,
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
        workers: (Workers, mpsc::UnboundedReceiver<usize>),
        space: Arc<QueueSpace>,
        metrics: Arc<Metrics>,
    ) -> (Batcher, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let (workers, done) = workers;
        let handle = tokio::spawn(run(rx, done, profile, workers, space, metrics));
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

    /// Refuses everything still queued and stops once the devices' batches are done.
    pub fn abort(&self) {
        let _ = self.tx.send(Msg::Abort);
    }
}

async fn run(
    mut rx: mpsc::UnboundedReceiver<Msg>,
    mut done: mpsc::UnboundedReceiver<usize>,
    mut profile: watch::Receiver<Arc<Profile>>,
    mut workers: Workers,
    space: Arc<QueueSpace>,
    metrics: Arc<Metrics>,
) {
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
            Some(d) = done.recv() => {
                in_flight -= 1;
                workers.finished(d);
                while let Ok(d) = done.try_recv() {
                    in_flight -= 1;
                    workers.finished(d);
                }
                None
            }
            _ = sleep_until(wake), if wake.is_some() => None,
            changed = profile.changed() => changed.is_err().then_some(Msg::Shutdown),
        };
        if let Some(msg) = first {
            let mut apply = |m: Msg| match m {
                Msg::Enqueue(entries) => entries.into_iter().for_each(|e| state.push(e)),
                Msg::Shutdown => draining = true,
                Msg::Abort => {
                    draining = true;
                    let refused = state.take_all();
                    space.release(refused.len());
                    for e in refused {
                        e.payload.slot.fail(Failure::Shutdown);
                    }
                }
            };
            apply(msg);
            // Take everything else that already arrived, so a burst forms one batch, not many.
            while let Ok(m) = rx.try_recv() {
                apply(m);
            }
        }
    }
}

async fn sleep_until(t: Option<Instant>) {
    if let Some(t) = t {
        tokio::time::sleep_until(tokio::time::Instant::from_std(t)).await;
    }
}
