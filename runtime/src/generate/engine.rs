//! The engine: one OS thread per model replica, looping plan → forward → sample → events.
//!
//! Each loop it takes new sequences from its channel, drops those whose client left, asks the
//! [`Scheduler`] for a plan under the live profile, runs every planned chunk in one
//! [`Llama::step`], samples, hands the new token ids to its output stage ([`super::stream`],
//! which turns them into text and client events on a thread of its own), and tells the
//! scheduler which sequences ended. A failed or panicking step fails only the sequences in it.
//!
//! **Overlapped steps** ([`Overlap`], on for GPU replicas): the engine issues step N+1 before it
//! reads step N's token ids. Step N+1's decodes take their input token from where step N's draw
//! left it on the device ([`DeviceTokens`]), and the host copy of step N's ids waits for that
//! copy only ([`Readback`]), so the GPU runs step N+1 while the host finishes step N's
//! bookkeeping and the device never idles between steps. vLLM's v1 engine calls this async
//! scheduling. Its price: a sequence that ends on step N's token (EOS, a stop string, a client
//! gone) has one more lane computed in step N+1, thrown away; one that ends by `max_tokens` is
//! known in advance and left out. Steps whose rows need the host to sample (seeded or nucleus
//! requests) run without overlap.

use super::sampling::{draw_on_device, sample_on_device, Placement, Sampler, SamplingParams};
use super::scheduler::{Limits, NewSeq, Plan, Scheduler, SeqId};
use super::stream::{count_end, failure_reason, Ending, Note, Opened, Stream};
use crate::admission::QueueSpace;
use crate::metrics::{DeviceLabel, GenMetrics, PhaseLabel};
use crate::model::llama::{Chunk, DeviceTokens, Llama, SeqCache};
use crate::model::readback::Readback;
use candle_core::Tensor;
use profiles::Profile;
use prometheus_client::metrics::histogram::Histogram;
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// A validated, tokenized generation request.
pub struct GenRequest {
    /// Prompt ids (chat template already applied).
    pub prompt: Vec<u32>,
    /// Sampling parameters.
    pub sampling: SamplingParams,
    /// Most output tokens.
    pub max_tokens: usize,
    /// Stop strings (the output ends before the first one).
    pub stop: Vec<String>,
    /// Keep generating past EOS (benchmarks that need exact output lengths).
    pub ignore_eos: bool,
    /// Arrival time (queue time and TTFT count from here).
    pub arrived: Instant,
    /// Not started by then: 504.
    pub deadline: Instant,
}

/// Why a generation ended normally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// EOS or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
}

impl FinishReason {
    /// OpenAI's `finish_reason` string.
    pub fn as_str(&self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// The end of a generation.
#[derive(Debug, Clone, PartialEq)]
pub struct Finished {
    /// How it ended.
    pub reason: FinishReason,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Output tokens generated (EOS not counted).
    pub completion_tokens: usize,
    /// Arrival to start.
    pub queue_time: Duration,
    /// Arrival to the first output token.
    pub ttft: Duration,
}

/// Why a generation failed.
#[derive(Debug, Clone, PartialEq)]
pub enum GenFailure {
    /// Its deadline passed before it started.
    Expired,
    /// Its step failed (the message names the device).
    Step(String),
    /// The server's drain timeout passed before it finished.
    Shutdown,
}

/// What the engine tells a request, in order: `Started`, `Text`…, then `Done` or `Failed`.
#[derive(Debug, Clone, PartialEq)]
pub enum GenEvent {
    /// The sequence started (its KV is reserved).
    Started {
        /// Arrival to start.
        queue_time: Duration,
    },
    /// One output token; `delta` is the text that became final with it (may be empty while a
    /// stop string might be starting).
    Token {
        /// New text.
        delta: String,
    },
    /// The generation ended.
    Done(Finished),
    /// It failed.
    Failed(GenFailure),
}

/// Messages to an engine.
pub enum Msg {
    /// A new sequence (queue space already reserved) and where to report; dropping the
    /// receiver cancels it.
    New(Box<GenRequest>, mpsc::UnboundedSender<GenEvent>),
    /// Finish everything admitted, then exit.
    Shutdown,
    /// The drain timeout passed: fail every sequence still here (503), then exit.
    Abort,
}

/// Engine steps a CUDA profiler records (see [`crate::model::profiler_window`]): steps
/// `first .. first + count` of each replica, counting only steps that ran a forward, so a
/// served step can be profiled kernel by kernel once the load has settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProfilerWindow {
    /// The first step recorded (0 is the replica's first step).
    pub first: u64,
    /// Steps recorded.
    pub count: u64,
}

/// Whether an engine issues step N+1 before reading step N's tokens (the module's doc says how).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overlap {
    /// On for a replica on a GPU, whose kernels run while the host goes on. Off on the CPU,
    /// where an op returns only once computed: overlapping would deliver every token one step
    /// later for nothing.
    #[default]
    Auto,
    /// Always (the CPU tests use it to exercise the overlapped path).
    On,
    /// Never: each step's tokens are read before the next step is planned.
    Off,
}

impl std::str::FromStr for Overlap {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Overlap::Auto),
            "on" => Ok(Overlap::On),
            "off" => Ok(Overlap::Off),
            _ => Err(format!("{s:?}: give auto, on or off")),
        }
    }
}

/// What an engine thread needs.
pub struct EngineCtx {
    /// Replica label for metrics and messages.
    pub label: String,
    /// The model replica.
    pub model: Arc<Llama>,
    /// End-of-sequence ids.
    pub eos: Vec<u32>,
    /// Live knobs.
    pub profile: watch::Receiver<Arc<Profile>>,
    /// Generation series.
    pub metrics: Arc<GenMetrics>,
    /// Queue capacity: released when a sequence leaves the waiting list.
    pub space: Arc<QueueSpace>,
    /// Sequences assigned to this replica and not finished (placement reads it).
    pub load: Arc<AtomicUsize>,
    /// Steps to open a CUDA profiler's window around, if any.
    pub profiler: Option<ProfilerWindow>,
    /// Whether steps overlap.
    pub overlap: Overlap,
    /// Test-only planted faults, checked before every step's forward.
    #[cfg(feature = "test-hooks")]
    pub faults: Arc<crate::hooks::Armed>,
}

struct Seq {
    req: GenRequest,
    /// The client's channel: the engine answers through it only before the sequence starts
    /// (then the output stage does), and reads it to see whether the client left.
    events: mpsc::UnboundedSender<GenEvent>,
    sampler: Sampler,
    cache: Option<SeqCache>,
    /// The last output token (the next decode's input) and how many there are; the text is
    /// the output stage's, which keeps the whole list.
    last: Option<u32>,
    generated: usize,
    /// Started: the output stage answers it from now on.
    streaming: bool,
}

/// One sequence's part of a planned step.
struct Planned {
    id: SeqId,
    /// Its tokens (a placeholder when `drawn_row` is set).
    tokens: Vec<u32>,
    /// Whether the step returns logits for it (a decode, or a prompt's last chunk).
    logits: bool,
    /// Its token's row in the previous step's drawn ids, still on the device.
    drawn_row: Option<u32>,
}

/// A step whose ids are drawn on the device and not yet read by the host.
struct InFlight {
    /// `[rows]` u32 on the device, row i for `rows[i]`.
    ids: Tensor,
    rows: Vec<SeqId>,
}

/// A step's drawn tokens: still on the device, or already on the host.
enum Drawn {
    Device(Tensor),
    Host(Vec<u32>),
}

/// A finished sequence kept as a padding row (padded scheduling): only its cache and a token
/// to feed; what it computes is thrown away.
struct Padding {
    cache: SeqCache,
    token: u32,
}

enum End {
    Finished(FinishReason),
    Failed(GenFailure),
    Cancelled,
    /// The output stage ended it (a stop string, or a panic while streaming it): it answered
    /// and counted the sequence already.
    Stopped,
}

/// The engine loop; returns when shut down (or its channel closed), nothing is left and its
/// output stage has delivered every event.
pub(super) fn run(ctx: EngineCtx, rx: crossbeam_channel::Receiver<Msg>, stream: Stream) {
    // The phase series, looked up once: a step should not build labels and hash them.
    let phases = ["schedule", "forward", "sample", "engine"].map(|phase| {
        ctx.metrics
            .step_phase
            .get_or_create(&PhaseLabel {
                device: ctx.label.clone(),
                phase: phase.into(),
            })
            .clone()
    });
    let overlap = match ctx.overlap {
        Overlap::Auto => ctx.model.on_gpu(),
        Overlap::On => true,
        Overlap::Off => false,
    };
    let mut e = Engine {
        phases,
        overlap,
        padded: false,
        inflight: None,
        readback: Readback::new(),
        ctx,
        sched: Scheduler::default(),
        seqs: HashMap::new(),
        padding: HashMap::new(),
        next_id: 0,
        draining: false,
        published: [0; 3],
        steps: 0,
        stream,
        notes: Vec::new(),
    };
    let mut wake: Option<Instant> = None;
    loop {
        let msg = if e.sched.running_len() > 0 {
            rx.try_recv().ok()
        } else if e.sched.is_empty() {
            if e.draining {
                break;
            }
            match rx.recv() {
                Ok(m) => Some(m),
                Err(_) => break,
            }
        } else {
            // Waiting sequences, none running: sleep until the plan's wake time or a message.
            let until = wake.unwrap_or_else(|| Instant::now() + Duration::from_millis(50));
            match rx.recv_deadline(until) {
                Ok(m) => Some(m),
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => None,
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                    e.draining = true;
                    None
                }
            }
        };
        if let Some(m) = msg {
            e.take(m);
            while let Ok(m) = rx.try_recv() {
                e.take(m);
            }
        }
        e.sweep_cancelled();
        let t0 = Instant::now();
        let plan = e.plan();
        wake = plan.wake_at;
        e.run_step(plan, t0);
        e.flush();
    }
    e.land();
    e.flush();
    e.stream.finish();
    // Leave the shared gauges as if this engine had never run.
    e.publish_gauges();
}

struct Engine {
    ctx: EngineCtx,
    /// `batchtune_step_phase_seconds` for schedule, forward, sample and engine on this
    /// replica. On a GPU, forward is the host issuing the step's kernels and sample mostly
    /// waits for them: a small sample share says the step is bound by the host, not the GPU.
    /// With overlapped steps, sample waits for the *previous* step's ids instead, while this
    /// step's kernels are queued behind them.
    phases: [Histogram; 4],
    sched: Scheduler,
    seqs: HashMap<SeqId, Seq>,
    /// Finished sequences still computed as their group's padding rows.
    padding: HashMap<SeqId, Padding>,
    next_id: SeqId,
    draining: bool,
    /// Running, waiting and KV tokens last added to the shared gauges.
    published: [i64; 3],
    /// Steps that ran a forward so far (the profiler window counts these).
    steps: u64,
    /// The output stage: text and events of started sequences.
    stream: Stream,
    /// Notes for the output stage, sent once per loop ([`Engine::flush`]).
    notes: Vec<Note>,
    /// Whether steps overlap ([`Overlap`], resolved for this replica's device).
    overlap: bool,
    /// Whether the live profile schedules `padded` (read at each plan): its steps never
    /// overlap.
    padded: bool,
    /// The last step, while its ids are on their way to the host.
    inflight: Option<InFlight>,
    readback: Readback,
}

impl Engine {
    fn take(&mut self, m: Msg) {
        match m {
            Msg::Shutdown => self.draining = true,
            Msg::Abort => {
                self.draining = true;
                let all: Vec<SeqId> = self.seqs.keys().copied().collect();
                for id in all {
                    self.end(id, End::Failed(GenFailure::Shutdown));
                }
            }
            Msg::New(req, events) => {
                let id = self.next_id;
                self.next_id += 1;
                self.sched.push(NewSeq {
                    id,
                    prompt_len: req.prompt.len(),
                    max_new: req.max_tokens,
                    arrived: req.arrived,
                    deadline: req.deadline,
                });
                let sampler = Sampler::new(req.sampling.clone());
                self.seqs.insert(
                    id,
                    Seq {
                        req: *req,
                        events,
                        sampler,
                        cache: None,
                        last: None,
                        generated: 0,
                        streaming: false,
                    },
                );
            }
        }
    }

    /// Clients that went away free their slot, queue space and KV before the next step, and
    /// so do sequences the output stage ended on a stop string (already answered there).
    fn sweep_cancelled(&mut self) {
        let stopped: Vec<SeqId> = self.stream.stopped().collect();
        for id in stopped {
            self.end(id, End::Stopped);
        }
        let gone: Vec<SeqId> = self
            .seqs
            .iter()
            .filter(|(_, s)| s.events.is_closed())
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            self.end(id, End::Cancelled);
        }
    }

    /// Hands the notes queued since the last call to the output stage.
    fn flush(&mut self) {
        self.stream.send(std::mem::take(&mut self.notes));
    }

    fn plan(&mut self) -> Plan {
        let p = self.ctx.profile.borrow().clone();
        self.padded = p.scheduling == profiles::Scheduling::Padded;
        let lim = Limits {
            max_running: p.max_batch_size,
            prefill_tokens: p.max_batch_tokens,
            batch_wait: p.batch_wait_timeout,
            kv_tokens: p.kv_cache_tokens,
            scheduling: p.scheduling,
            max_groups: p.max_concurrent_batches,
            draining: self.draining,
        };
        let plan = self.sched.schedule(Instant::now(), &lim);
        for id in &plan.released {
            self.padding.remove(id);
        }
        for &id in &plan.expired {
            self.ctx.space.release(1);
            self.end_removed(id, End::Failed(GenFailure::Expired));
        }
        let now = Instant::now();
        for &id in &plan.started {
            self.ctx.space.release(1);
            let Some(s) = self.seqs.get_mut(&id) else {
                continue;
            };
            let queue_time = now.duration_since(s.req.arrived);
            self.ctx
                .metrics
                .queue_time
                .observe(queue_time.as_secs_f64());
            let _ = s.events.send(GenEvent::Started { queue_time });
            match self
                .ctx
                .model
                .new_cache(s.req.prompt.len() + s.req.max_tokens)
            {
                Ok(c) => {
                    s.cache = Some(c);
                    s.streaming = true;
                    let opened = Opened {
                        events: s.events.clone(),
                        stop: std::mem::take(&mut s.req.stop),
                        prompt_tokens: s.req.prompt.len(),
                        arrived: s.req.arrived,
                        queue_time,
                    };
                    self.notes.push(Note::Open(id, Box::new(opened)));
                }
                Err(err) => {
                    let msg = format!("KV cache on {}: {err}", self.ctx.label);
                    self.end(id, End::Failed(GenFailure::Step(msg)));
                }
            }
        }
        plan
    }

    /// Runs the planned step; `t0` is when planning began (the step's phase times start there).
    /// With overlap, the previous step's tokens are read after this step is issued.
    fn run_step(&mut self, plan: Plan, t0: Instant) {
        self.publish_gauges();
        if plan.is_idle() {
            return self.land();
        }
        let t1 = Instant::now();
        // Decodes whose last token is still on the device, by their row in its ids.
        let drawn_rows: HashMap<SeqId, u32> = self
            .inflight
            .iter()
            .flat_map(|f| f.rows.iter().enumerate().map(|(r, &id)| (id, r as u32)))
            .collect();
        // Take each planned sequence's cache out of the map for the forward.
        let mut order: Vec<Planned> = Vec::new();
        for c in &plan.prefill {
            if let Some(s) = self.seqs.get(&c.id) {
                order.push(Planned {
                    id: c.id,
                    tokens: s.req.prompt[c.start..c.start + c.len].to_vec(),
                    logits: c.last,
                    drawn_row: None,
                });
            }
        }
        for &id in &plan.decode {
            if let Some(s) = self.seqs.get(&id) {
                let decode = |tokens, drawn_row| Planned {
                    id,
                    tokens,
                    logits: true,
                    drawn_row,
                };
                match drawn_rows.get(&id) {
                    // Its token in flight is its last: it ends by length when read.
                    Some(_) if s.generated + 1 >= s.req.max_tokens => {}
                    Some(&r) => order.push(decode(vec![0], Some(r))),
                    None => order.extend(s.last.map(|t| decode(vec![t], None))),
                }
            } else if let Some(p) = self.padding.get_mut(&id) {
                // A padding row must stay inside the blocks it reserved.
                if p.cache.len() >= p.cache.capacity() {
                    p.cache.truncate(p.cache.capacity() - 1);
                }
                order.push(Planned {
                    id,
                    tokens: vec![p.token],
                    logits: true,
                    drawn_row: None,
                });
            }
        }
        let mut caches: Vec<(SeqId, SeqCache)> = order
            .iter()
            .filter_map(|o| match self.seqs.get_mut(&o.id) {
                Some(s) => s.cache.take().map(|c| (o.id, c)),
                None => self.padding.remove(&o.id).map(|p| (o.id, p.cache)),
            })
            .collect();
        order.retain(|o| caches.iter().any(|(c, _)| *c == o.id));
        if order.is_empty() {
            return self.land();
        }
        self.profiler_window();
        let result = {
            let mut chunks: Vec<Chunk<'_>> = order
                .iter()
                .zip(caches.iter_mut())
                .map(|(o, (_, cache))| Chunk {
                    tokens: &o.tokens,
                    cache,
                    logits: o.logits,
                })
                .collect();
            let rows: Vec<Option<u32>> = order.iter().map(|o| o.drawn_row).collect();
            let from_device = self
                .inflight
                .as_ref()
                .filter(|_| rows.iter().any(Option::is_some))
                .map(|f| DeviceTokens {
                    ids: &f.ids,
                    rows: &rows,
                });
            let model = &self.ctx.model;
            #[cfg(feature = "test-hooks")]
            let faults = &self.ctx.faults;
            // Prompt chunks only: a planted word is meant to meet the request that carries
            // it, and a sampled token that happens to be the word's would fail a bystander.
            #[cfg(feature = "test-hooks")]
            let prompts: Vec<&[u32]> = order
                .iter()
                .filter(|o| plan.prefill.iter().any(|c| c.id == o.id))
                .map(|o| o.tokens.as_slice())
                .collect();
            std::panic::catch_unwind(AssertUnwindSafe(|| {
                #[cfg(feature = "test-hooks")]
                faults
                    .check(prompts)
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                model.forward_with(&mut chunks, from_device)
            }))
        };
        let tf = Instant::now();
        let prefill_tokens: usize = plan.prefill.iter().map(|c| c.len).sum();
        let dev = DeviceLabel {
            device: self.ctx.label.clone(),
        };
        self.ctx.metrics.steps.get_or_create(&dev).inc();
        self.ctx
            .metrics
            .step_sequences
            .get_or_create(&dev)
            .observe(order.len() as f64);
        self.ctx
            .metrics
            .prefill_tokens
            .inc_by(prefill_tokens as u64);
        // `order` and `caches` are aligned (the chunks were built by zipping them).
        for (o, (id, cache)) in order.iter().zip(caches) {
            match self.seqs.get_mut(&id) {
                Some(s) => s.cache = Some(cache),
                None => {
                    let token = o.tokens[0];
                    self.padding.insert(id, Padding { cache, token });
                }
            }
        }
        let rows: Vec<SeqId> = order.iter().filter(|o| o.logits).map(|o| o.id).collect();
        let drawn = match result {
            Ok(Ok(logits)) => match logits.map(|l| self.pick(&rows, &l)).transpose() {
                Ok(d) => Ok(d.unwrap_or(Drawn::Host(Vec::new()))),
                Err(err) => Err(format!("sampling on {} failed: {err}", self.ctx.label)),
            },
            Ok(Err(err)) => Err(format!("step on {} failed: {err}", self.ctx.label)),
            Err(panic) => Err(format!(
                "step on {} panicked: {}",
                self.ctx.label,
                crate::panic_text(&*panic)
            )),
        };
        // The previous step's tokens come first, whatever became of this one: a sequence in
        // both gets them in order.
        self.land();
        let drawn = match drawn {
            Ok(d) => d,
            Err(msg) => return self.fail_step(&order, msg),
        };
        match drawn {
            Drawn::Device(ids) => match self.readback.start(&ids) {
                Ok(()) => {
                    self.inflight = Some(InFlight { ids, rows });
                    // Padded scheduling is HF `generate`'s way, which checks every step's
                    // tokens before the next: its rows and steps stay exactly that baseline's.
                    if !self.overlap || self.padded {
                        self.land();
                    }
                }
                Err(err) => {
                    let msg = format!("reading tokens on {} failed: {err}", self.ctx.label);
                    return self.fail_step(&order, msg);
                }
            },
            Drawn::Host(tokens) => {
                for (id, t) in rows.into_iter().zip(tokens) {
                    self.advance(id, t);
                }
            }
        }
        let t2 = Instant::now();
        self.publish_gauges();
        let t3 = Instant::now();
        for (h, d) in self.phases.iter().zip([t1 - t0, tf - t1, t2 - tf, t3 - t2]) {
            h.observe(d.as_secs_f64());
        }
    }

    /// Reads the step in flight, if any, and hands its tokens on; a failed read fails that
    /// step's sequences. Publishes the gauges: the sequences it ends may be the engine's last
    /// before it waits for a request.
    fn land(&mut self) {
        let Some(f) = self.inflight.take() else {
            return;
        };
        match self.readback.take() {
            Ok(tokens) => {
                for (id, t) in f.rows.into_iter().zip(tokens) {
                    self.advance(id, t);
                }
            }
            Err(err) => {
                let msg = format!("reading tokens on {} failed: {err}", self.ctx.label);
                tracing::error!("{msg}");
                for id in f.rows {
                    self.end(id, End::Failed(GenFailure::Step(msg.clone())));
                }
            }
        }
        self.publish_gauges();
    }

    /// Opens the profiler's window before its first step and closes it before the step after
    /// its last, so it holds exactly the steps named.
    fn profiler_window(&mut self) {
        if let Some(w) = self.ctx.profiler {
            if self.steps == w.first {
                tracing::info!(device = %self.ctx.label, steps = w.count, "CUDA profiler window opened");
                crate::model::profiler_window(true);
            } else if self.steps == w.first + w.count {
                crate::model::profiler_window(false);
                tracing::info!(device = %self.ctx.label, "CUDA profiler window closed");
            }
        }
        self.steps += 1;
    }

    fn fail_step(&mut self, order: &[Planned], msg: String) {
        tracing::error!("{msg}");
        for o in order {
            self.end(o.id, End::Failed(GenFailure::Step(msg.clone())));
        }
        // The engine may go idle now (nothing left to step): publish, or the gauges would show
        // the failed sequences as running until the next request arrives.
        self.publish_gauges();
    }

    /// The next token of each of `rows` (in the logits' row order). Greedy and plain
    /// temperature rows are drawn on the device and stay there (the caller reads them, now or
    /// after issuing the next step); a step with seeded or nucleus rows brings those rows to
    /// the host, in one copy, and returns every token on the host.
    fn pick(&mut self, rows: &[SeqId], logits: &Tensor) -> candle_core::Result<Drawn> {
        let placement: Vec<Placement> = rows
            .iter()
            .map(|id| {
                self.seqs
                    .get(id)
                    .map_or(Placement::Greedy, |s| s.sampler.placement())
            })
            .collect();
        let host: Vec<u32> = (0..rows.len() as u32)
            .filter(|&i| placement[i as usize] == Placement::Host)
            .collect();
        if host.is_empty() {
            return Ok(Drawn::Device(draw_on_device(logits, &placement)?));
        }
        let mut tokens = if host.len() < rows.len() {
            sample_on_device(logits, &placement)?
        } else {
            vec![0; rows.len()]
        };
        let n = host.len();
        let idx = Tensor::from_vec(host.clone(), n, logits.device())?;
        let copied = logits
            .index_select(&idx, 0)?
            .to_dtype(candle_core::DType::F32)?
            .to_vec2::<f32>()?;
        for (i, row) in host.into_iter().zip(copied) {
            if let Some(s) = self.seqs.get_mut(&rows[i as usize]) {
                tokens[i as usize] = s.sampler.sample(&row);
            }
        }
        Ok(Drawn::Host(tokens))
    }

    /// Appends a sequence's next token for the output stage, and ends the sequence at EOS or
    /// `max_tokens` (stop strings are the output stage's, which reads the text).
    fn advance(&mut self, id: SeqId, t: u32) {
        let Some(s) = self.seqs.get_mut(&id) else {
            return;
        };
        if !s.req.ignore_eos && self.ctx.eos.contains(&t) {
            return self.end(id, End::Finished(FinishReason::Stop));
        }
        (s.last, s.generated) = (Some(t), s.generated + 1);
        self.notes.push(Note::Token(id, t));
        if s.generated >= s.req.max_tokens {
            self.end(id, End::Finished(FinishReason::Length));
        }
    }

    /// Ends a sequence the scheduler still holds. Under padded scheduling one that finished
    /// or was cancelled may stay computed as a padding row; its client is answered either way.
    fn end(&mut self, id: SeqId, how: End) {
        let waiting = self.sched.waiting_ids().any(|w| w == id);
        let normal = matches!(how, End::Finished(_) | End::Cancelled | End::Stopped);
        if normal && !waiting && self.sched.retire(id) {
            let s = self.seqs.get_mut(&id);
            let kept = s.and_then(|s| {
                let token = s.last.or(s.req.prompt.last().copied())?;
                Some(Padding {
                    cache: s.cache.take()?,
                    token,
                })
            });
            match kept {
                Some(p) => {
                    self.padding.insert(id, p);
                }
                None => {
                    self.sched.finish(id);
                }
            }
        } else {
            if self.sched.finish(id) && waiting {
                self.ctx.space.release(1);
            }
            self.padding.remove(&id);
        }
        self.end_removed(id, how);
    }

    /// Ends a sequence the scheduler already dropped: answers it (through the output stage
    /// once it started) and frees its cache.
    fn end_removed(&mut self, id: SeqId, how: End) {
        let Some(s) = self.seqs.remove(&id) else {
            return;
        };
        self.ctx.load.fetch_sub(1, Ordering::AcqRel);
        // Counted where the ending is decided, so the count is there as soon as the gauges
        // show the sequence gone.
        let m = &self.ctx.metrics;
        let ending = match how {
            End::Stopped => return,
            End::Finished(r) => {
                count_end(m, r.as_str());
                Ending::Finished(r)
            }
            End::Failed(f) => {
                count_end(m, failure_reason(&f));
                Ending::Failed(f)
            }
            End::Cancelled => {
                count_end(m, "cancelled");
                Ending::Cancelled
            }
        };
        if s.streaming {
            self.notes.push(Note::End(id, ending));
            return;
        }
        // Never started, so nothing of it is in the output stage: answer here.
        match ending {
            Ending::Failed(f) => {
                let _ = s.events.send(GenEvent::Failed(f));
            }
            Ending::Cancelled => {}
            Ending::Finished(r) => {
                // Unreachable (a sequence finishes only by running), but answered all the same.
                let _ = s.events.send(GenEvent::Done(Finished {
                    reason: r,
                    prompt_tokens: s.req.prompt.len(),
                    completion_tokens: s.generated,
                    queue_time: Duration::ZERO,
                    ttft: Duration::ZERO,
                }));
            }
        }
    }

    /// Gauges are shared by every replica's engine, so each adds the change in its own counts
    /// rather than setting a value another engine would overwrite.
    fn publish_gauges(&mut self) {
        let now = [
            self.sched.running_len() as i64,
            self.sched.waiting_len() as i64,
            self.sched.kv_used() as i64,
        ];
        let m = &self.ctx.metrics;
        for ((g, new), old) in [&m.running, &m.waiting, &m.kv_tokens_used]
            .into_iter()
            .zip(now)
            .zip(self.published.iter_mut())
        {
            g.inc_by(new - *old);
            *old = new;
        }
    }
}
