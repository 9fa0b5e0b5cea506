//! The output stage: one thread per engine that turns the engine's sampled token ids into text
//! and client events, so that the engine's own loop does little more than plan and launch
//! steps.
//!
//! Why a thread of its own: on a GPU the engine's thread is the one that issues every kernel,
//! and the device idles while it does anything else. Decoding each sequence's new token into
//! text, checking stop strings and waking each client's task (a futex call when its worker
//! thread sleeps) cost the H200's engine 0.8 ms of a 8.9 ms step at 512 running sequences
//! (`batchtune_step_phase_seconds{phase="engine"}`, `results/generate-h200/fused-mlp/`).
//! vLLM v1 splits the same way: its engine core returns token ids and the front end detokenizes
//! and checks stop strings, then aborts a stopped request in the core.
//!
//! Order: every event of a started sequence passes through here, in the order the engine
//! queued its notes, so a client always sees `Token`s before its `Done` or `Failed`. Only events
//! of sequences that never started (`Started` itself, an expired deadline, a shutdown while
//! waiting) are sent by the engine directly. A stop string is found here, one or two steps
//! after the engine computed the token; the sequence is answered at once and the engine is told
//! to retire it ([`Stream::stopped`]), and whatever it computes meanwhile is dropped.

use super::engine::{FinishReason, Finished, GenEvent, GenFailure};
use super::sampling::{check_stops, StopCheck};
use super::scheduler::SeqId;
use crate::metrics::{FinishLabel, GenMetrics};
use crate::model::lm_tokenizer::{Detokenizer, LmTokenizer};
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// A started sequence, as the output stage needs it.
pub(super) struct Opened {
    /// The client's channel.
    pub events: mpsc::UnboundedSender<GenEvent>,
    /// Stop strings (the output ends before the first one).
    pub stop: Vec<String>,
    /// Prompt tokens, for the final usage.
    pub prompt_tokens: usize,
    /// Arrival time (TTFT counts from here).
    pub arrived: Instant,
    /// Arrival to start.
    pub queue_time: Duration,
}

/// What the engine tells the output stage, in the order it happened.
pub(super) enum Note {
    /// A sequence started; its events come through here from now on.
    Open(SeqId, Box<Opened>),
    /// A sequence's next output token (EOS is never sent: the engine ends the sequence).
    Token(SeqId, u32),
    /// The engine ended a started sequence.
    End(SeqId, Ending),
}

impl Note {
    /// The sequence the note is about.
    fn seq(&self) -> SeqId {
        match self {
            Note::Open(id, _) | Note::Token(id, _) | Note::End(id, _) => *id,
        }
    }
}

/// How the engine ended a started sequence (the engine has counted it in
/// `batchtune_generations_finished_total`; the output stage counts only the stop strings it
/// finds).
pub(super) enum Ending {
    /// EOS or `max_tokens`: the held-back text is flushed, then `Done`.
    Finished(FinishReason),
    /// Its step failed, or the server stopped.
    Failed(GenFailure),
    /// The client went away: nothing to send.
    Cancelled,
}

/// The engine's handle on its output stage.
pub(super) struct Stream {
    tx: Option<crossbeam_channel::Sender<Vec<Note>>>,
    stopped: crossbeam_channel::Receiver<SeqId>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Stream {
    /// Starts the output stage's thread for the engine labelled `label`.
    pub fn start(
        label: &str,
        tokenizer: Arc<LmTokenizer>,
        metrics: Arc<GenMetrics>,
    ) -> std::io::Result<Self> {
        let (tx, rx) = crossbeam_channel::unbounded::<Vec<Note>>();
        let (stop_tx, stopped) = crossbeam_channel::unbounded();
        let thread = std::thread::Builder::new()
            .name(format!("stream-{label}"))
            .spawn(move || {
                let mut out = Output {
                    tokenizer,
                    metrics,
                    open: HashMap::new(),
                    stopped: stop_tx,
                };
                for notes in rx {
                    for n in notes {
                        let id = n.seq();
                        // A panic (say, in a tokenizer) fails that sequence, not the thread
                        // every other client of this replica is waiting on.
                        if let Err(panic) =
                            std::panic::catch_unwind(AssertUnwindSafe(|| out.take(n)))
                        {
                            out.fail(id, crate::panic_text(&*panic));
                        }
                    }
                }
            })?;
        Ok(Stream {
            tx: Some(tx),
            stopped,
            thread: Some(thread),
        })
    }

    /// Hands one batch of notes over (one channel send, and one wake, per step).
    pub fn send(&self, notes: Vec<Note>) {
        if notes.is_empty() {
            return;
        }
        if let Some(tx) = &self.tx {
            // The thread only exits once this sender is dropped.
            let _ = tx.send(notes);
        }
    }

    /// Sequences the output stage ended since the last call (on a stop string, or failed by a
    /// panic while streaming them): already answered and counted, the engine retires them.
    pub fn stopped(&self) -> impl Iterator<Item = SeqId> + '_ {
        self.stopped.try_iter()
    }

    /// Lets the thread deliver everything sent so far, and waits for it.
    pub fn finish(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.finish();
    }
}

/// A sequence being streamed.
struct Open {
    o: Opened,
    out: Vec<u32>,
    /// The output's text, decoded a few tokens at a time.
    detok: Detokenizer,
    /// Bytes of the output text already sent.
    sent: usize,
    first_token: Option<Instant>,
}

/// The output stage's state (its thread's only data).
struct Output {
    tokenizer: Arc<LmTokenizer>,
    metrics: Arc<GenMetrics>,
    open: HashMap<SeqId, Open>,
    stopped: crossbeam_channel::Sender<SeqId>,
}

impl Output {
    fn take(&mut self, n: Note) {
        match n {
            Note::Open(id, o) => {
                self.open.insert(
                    id,
                    Open {
                        o: *o,
                        out: Vec::new(),
                        detok: Detokenizer::default(),
                        sent: 0,
                        first_token: None,
                    },
                );
            }
            Note::Token(id, t) => self.token(id, t),
            Note::End(id, how) => self.end(id, how),
        }
    }

    /// Appends a token and sends the text it makes final; a stop string ends the sequence.
    fn token(&mut self, id: SeqId, t: u32) {
        // Absent: already answered (a stop string), the engine has not caught up yet.
        let Some(s) = self.open.get_mut(&id) else {
            return;
        };
        let now = Instant::now();
        if s.first_token.is_none() {
            s.first_token = Some(now);
            self.metrics
                .ttft
                .observe(now.duration_since(s.o.arrived).as_secs_f64());
        }
        s.out.push(t);
        self.metrics.output_tokens.inc();
        let text = s.detok.text(&self.tokenizer, &s.out).unwrap_or_default();
        match check_stops(&text, &s.o.stop) {
            StopCheck::Stopped(at) => {
                send_delta(s, &text, at);
                // The engine hears of it before the client can: it retires the sequence
                // without counting it again.
                let _ = self.stopped.send(id);
                count_end(&self.metrics, FinishReason::Stop.as_str());
                self.finish(id, FinishReason::Stop);
            }
            StopCheck::Safe(upto) => send_delta(s, &text, upto),
        }
    }

    fn end(&mut self, id: SeqId, how: Ending) {
        match how {
            Ending::Finished(reason) => {
                if let Some(s) = self.open.get_mut(&id) {
                    // Text held back for a stop string that can no longer come.
                    let text = s.detok.text(&self.tokenizer, &s.out).unwrap_or_default();
                    if text.len() > s.sent {
                        send_delta(s, &text, text.len());
                    }
                }
                self.finish(id, reason);
            }
            Ending::Failed(f) => {
                if let Some(s) = self.open.remove(&id) {
                    let _ = s.o.events.send(GenEvent::Failed(f));
                }
            }
            Ending::Cancelled => {
                self.open.remove(&id);
            }
        }
    }

    /// Fails a sequence whose note panicked here, and has the engine retire it (as after a
    /// stop string: answered and counted here).
    fn fail(&mut self, id: SeqId, panic: String) {
        let msg = format!("output stage panicked: {panic}");
        tracing::error!(seq = id, "{msg}");
        if let Some(s) = self.open.remove(&id) {
            let _ = self.stopped.send(id);
            count_end(&self.metrics, "error");
            let _ = s.o.events.send(GenEvent::Failed(GenFailure::Step(msg)));
        }
    }

    /// Answers a finished sequence and forgets it.
    fn finish(&mut self, id: SeqId, reason: FinishReason) {
        let Some(s) = self.open.remove(&id) else {
            return;
        };
        let now = Instant::now();
        let first = s.first_token.unwrap_or(now);
        if s.out.len() > 1 {
            let per = now.duration_since(first).as_secs_f64() / (s.out.len() - 1) as f64;
            self.metrics.tpot.observe(per);
        }
        let _ = s.o.events.send(GenEvent::Done(Finished {
            reason,
            prompt_tokens: s.o.prompt_tokens,
            completion_tokens: s.out.len(),
            queue_time: s.o.queue_time,
            ttft: first.duration_since(s.o.arrived),
        }));
    }
}

/// Sends the text between what was sent and `upto` (an empty delta still marks a token).
fn send_delta(s: &mut Open, text: &str, upto: usize) {
    let delta = text
        .get(s.sent..upto.max(s.sent))
        .unwrap_or_default()
        .to_string();
    s.sent = s.sent.max(upto);
    let _ = s.o.events.send(GenEvent::Token { delta });
}

/// `batchtune_generate_finished_total`'s reason for a failure.
pub(super) fn failure_reason(f: &GenFailure) -> &'static str {
    match f {
        GenFailure::Expired => "expired",
        GenFailure::Shutdown => "shutdown",
        GenFailure::Step(_) => "error",
    }
}

/// Counts one ended sequence under `reason`.
pub(super) fn count_end(m: &GenMetrics, reason: &str) {
    m.finished
        .get_or_create(&FinishLabel {
            reason: reason.into(),
        })
        .inc();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sequence_failed_here_is_answered_once_and_handed_back_to_the_engine() {
        let metrics = Arc::new(crate::metrics::Metrics::new().generation());
        let (stop_tx, stopped) = crossbeam_channel::unbounded();
        let mut out = Output {
            tokenizer: Arc::new(LmTokenizer::builtin(64)),
            metrics,
            open: HashMap::new(),
            stopped: stop_tx,
        };
        let (events, mut rx) = mpsc::unbounded_channel();
        let opened = Opened {
            events,
            stop: Vec::new(),
            prompt_tokens: 3,
            arrived: Instant::now(),
            queue_time: Duration::ZERO,
        };
        out.take(Note::Open(7, Box::new(opened)));
        out.take(Note::Token(7, 5));
        out.fail(7, "boom".into());
        assert!(matches!(rx.try_recv(), Ok(GenEvent::Token { .. })));
        match rx.try_recv() {
            Ok(GenEvent::Failed(GenFailure::Step(m))) => {
                assert!(m.contains("output stage panicked: boom"), "{m}")
            }
            other => panic!("expected a failure, got {other:?}"),
        }
        assert_eq!(stopped.try_recv().ok(), Some(7));
        // What the engine computed for it meanwhile, and its own ending, are dropped.
        out.take(Note::Token(7, 6));
        out.take(Note::End(7, Ending::Finished(FinishReason::Length)));
        assert!(rx.try_recv().is_err());
        assert!(stopped.try_recv().is_err());
    }
}
