//! The generation scheduler: a pure decision struct (no threads, tensors or sockets), in the
//! style of `embed::state` and of vLLM v1's `schedule() -> plan`.
//!
//! Each engine step, [`Scheduler::schedule`] decides which waiting sequences start (their KV is
//! reserved), which running ones get a prefill chunk under the step's prompt-token budget, and
//! which decode one token. The engine runs the plan and reports back with
//! [`Scheduler::finish`] when a sequence ends (EOS, stop string, `max_tokens`, a client gone, a
//! failed step).
//!
//! Policies, and why:
//! - **FCFS without overtaking**: a waiting sequence that does not fit (running cap or KV)
//!   blocks the ones behind it, so a long prompt is never starved by a stream of short ones.
//! - **KV reserved at start** (prompt + `max_tokens`), freed at the end: the budget can never
//!   be exceeded mid-generation, so nothing is ever preempted. The cost is over-reservation for
//!   sequences that stop early; the `kv_cache_tokens` knob is what the tuner trades against it.
//! - **Batch wait only when idle**: with nothing running, a lone newcomer waits up to
//!   `batch_wait_timeout` for company (the seeds' knob); with sequences running it joins the
//!   next step at once, since that step runs anyway.
//! - **Static scheduling** (the seeds' whole-request batching, the baseline): a group of up to
//!   `max_batch_size` starts together and takes no newcomers until all its sequences end; up to
//!   `max_groups` groups run at once.
//! - **Padded scheduling** (static as HF transformers' `generate` runs it): a group's finished
//!   sequences stay in it as padding rows, decoded every step and holding their KV, until the
//!   group's last live sequence ends ([`Scheduler::retire`]); then [`Plan::released`] lists
//!   them for the engine to drop.

use profiles::Scheduling;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// A sequence's id, unique within one engine.
pub type SeqId = u64;

/// A sequence waiting to start.
#[derive(Debug, Clone, PartialEq)]
pub struct NewSeq {
    /// Its id.
    pub id: SeqId,
    /// Prompt tokens.
    pub prompt_len: usize,
    /// Output tokens it may generate.
    pub max_new: usize,
    /// When it arrived (batch wait counts from here).
    pub arrived: Instant,
    /// Past this it is not started (504).
    pub deadline: Instant,
}

impl NewSeq {
    /// KV tokens it reserves while it runs.
    pub fn reservation(&self) -> usize {
        self.prompt_len + self.max_new
    }
}

/// The live knobs a step is planned under.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Most running sequences (`max_batch_size`); in static mode, the size of one group.
    pub max_running: usize,
    /// Most prompt tokens prefilled in one step (`max_batch_tokens`).
    pub prefill_tokens: usize,
    /// How long a newcomer waits for company when nothing runs (`batch_wait_timeout`).
    pub batch_wait: Duration,
    /// KV budget in tokens (`kv_cache_tokens`).
    pub kv_tokens: usize,
    /// Continuous or static.
    pub scheduling: Scheduling,
    /// Static mode: groups at once (`max_concurrent_batches`).
    pub max_groups: usize,
    /// Shutting down: start what waits without waiting for company.
    pub draining: bool,
}

/// One prefill chunk of a plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefill {
    /// The sequence.
    pub id: SeqId,
    /// First prompt position of the chunk.
    pub start: usize,
    /// Prompt tokens in the chunk.
    pub len: usize,
    /// The chunk ends the prompt: its logits give the first output token.
    pub last: bool,
}

/// What one step does.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// Sequences that start now (the engine allocates their caches).
    pub started: Vec<SeqId>,
    /// Prompt chunks to compute.
    pub prefill: Vec<Prefill>,
    /// Sequences that decode one token (their last output token goes in).
    pub decode: Vec<SeqId>,
    /// Waiting sequences past their deadline, removed (answer 504).
    pub expired: Vec<SeqId>,
    /// Padding rows whose group has ended, removed (the engine drops their caches).
    pub released: Vec<SeqId>,
    /// With nothing to compute: the earliest time something could change without a new
    /// arrival (the batch wait ending, a deadline passing).
    pub wake_at: Option<Instant>,
}

impl Plan {
    /// True when the step computes nothing.
    pub fn is_idle(&self) -> bool {
        self.prefill.is_empty() && self.decode.is_empty()
    }
}

#[derive(Debug, Clone)]
struct Running {
    id: SeqId,
    prompt_len: usize,
    prefilled: usize,
    /// Prefill complete in an earlier step: decodes from now on.
    decoding: bool,
    reserved: usize,
    group: u64,
    /// Its group keeps finished sequences as padding (padded scheduling).
    pads: bool,
    /// Finished, kept as a padding row until its group ends.
    padding: bool,
}

/// Waiting and running sequences and the KV they hold.
#[derive(Debug, Default)]
pub struct Scheduler {
    waiting: VecDeque<NewSeq>,
    running: Vec<Running>,
    kv_used: usize,
    next_group: u64,
}

impl Scheduler {
    /// Queues a sequence (admission has already counted it).
    pub fn push(&mut self, s: NewSeq) {
        self.waiting.push_back(s);
    }

    /// Sequences waiting to start.
    pub fn waiting_len(&self) -> usize {
        self.waiting.len()
    }

    /// Sequences running.
    pub fn running_len(&self) -> usize {
        self.running.len()
    }

    /// KV tokens reserved by running sequences.
    pub fn kv_used(&self) -> usize {
        self.kv_used
    }

    /// True with nothing waiting or running.
    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    /// Ids of the waiting sequences, oldest first.
    pub fn waiting_ids(&self) -> impl Iterator<Item = SeqId> + '_ {
        self.waiting.iter().map(|w| w.id)
    }

    /// Ids of the running sequences.
    pub fn running_ids(&self) -> impl Iterator<Item = SeqId> + '_ {
        self.running.iter().map(|r| r.id)
    }

    /// Removes a sequence wherever it is (ended, cancelled, failed) and frees its KV. Returns
    /// false when it was unknown.
    pub fn finish(&mut self, id: SeqId) -> bool {
        if let Some(i) = self.running.iter().position(|r| r.id == id) {
            let r = self.running.remove(i);
            self.kv_used -= r.reserved;
            return true;
        }
        if let Some(i) = self.waiting.iter().position(|w| w.id == id) {
            self.waiting.remove(i);
            return true;
        }
        false
    }

    /// A sequence that ended normally: under padded scheduling, while other sequences of its
    /// group still run, it stays as a padding row (still decoded, KV still held) and this
    /// returns true; otherwise it is removed as by [`Scheduler::finish`] and this returns
    /// false.
    pub fn retire(&mut self, id: SeqId) -> bool {
        let Some(i) = self.running.iter().position(|r| r.id == id) else {
            self.finish(id);
            return false;
        };
        let r = &self.running[i];
        let (group, keep) = (r.group, r.pads && r.decoding && !r.padding);
        let others_live = self
            .running
            .iter()
            .any(|o| o.group == group && o.id != id && !o.padding);
        if keep && others_live {
            self.running[i].padding = true;
            return true;
        }
        self.finish(id);
        false
    }

    /// Plans one step at `now`.
    pub fn schedule(&mut self, now: Instant, lim: &Limits) -> Plan {
        let mut plan = Plan::default();
        // Groups left with only padding rows have ended (nothing to look for without padding,
        // which is every step outside padded scheduling).
        if self.running.iter().any(|r| r.padding) {
            self.release_ended_groups(&mut plan);
        }
        // Expired waiting sequences leave first: they must not hold up the rest.
        self.waiting.retain(|w| {
            let keep = w.deadline > now;
            if !keep {
                plan.expired.push(w.id);
            }
            keep
        });
        let mut wake = self.admit(now, lim, &mut plan);

        // Decode: every sequence whose prompt was complete before this step.
        for r in &self.running {
            if r.decoding {
                plan.decode.push(r.id);
            }
        }
        // Prefill: the oldest running sequences' prompt chunks, under the token budget.
        let mut budget = lim.prefill_tokens;
        for r in self.running.iter_mut().filter(|r| !r.decoding) {
            if budget == 0 {
                break;
            }
            let len = (r.prompt_len - r.prefilled).min(budget);
            let last = r.prefilled + len == r.prompt_len;
            plan.prefill.push(Prefill {
                id: r.id,
                start: r.prefilled,
                len,
                last,
            });
            r.prefilled += len;
            budget -= len;
            r.decoding = last;
        }
        if let Some(d) = self.waiting.iter().map(|w| w.deadline).min() {
            wake = Some(wake.map_or(d, |w: Instant| w.min(d)));
        }
        if plan.is_idle() {
            plan.wake_at = wake;
        }
        plan
    }

    /// Removes the padding rows of groups with no live sequence left, into `plan.released`.
    fn release_ended_groups(&mut self, plan: &mut Plan) {
        let live: Vec<u64> = self
            .running
            .iter()
            .filter(|r| !r.padding)
            .map(|r| r.group)
            .collect();
        let mut freed = 0;
        self.running.retain(|r| {
            let keep = !r.padding || live.contains(&r.group);
            if !keep {
                plan.released.push(r.id);
                freed += r.reserved;
            }
            keep
        });
        self.kv_used -= freed;
    }

    /// Moves waiting sequences to running as the mode, the caps and the KV budget allow.
    /// Returns when the batch wait would end, if it held someone back.
    fn admit(&mut self, now: Instant, lim: &Limits, plan: &mut Plan) -> Option<Instant> {
        let oldest = self.waiting.front()?.arrived;
        let gathered = self.waiting.len() >= lim.max_running
            || self.waiting.iter().map(|w| w.prompt_len).sum::<usize>() >= lim.prefill_tokens;
        let waited = now >= oldest + lim.batch_wait;
        let ready = lim.draining || gathered || waited;
        match lim.scheduling {
            Scheduling::Continuous => {
                if self.running.is_empty() && !ready {
                    return Some(oldest + lim.batch_wait);
                }
                while self.running.len() < lim.max_running && self.start_front(lim, 0, plan) {}
                None
            }
            Scheduling::Static | Scheduling::Padded => {
                let mut groups: Vec<u64> = self.running.iter().map(|r| r.group).collect();
                groups.dedup();
                let mut open = groups.len();
                if !ready {
                    return (open < lim.max_groups).then_some(oldest + lim.batch_wait);
                }
                while open < lim.max_groups && !self.waiting.is_empty() {
                    let group = self.next_group;
                    let mut n = 0;
                    while n < lim.max_running && self.start_front(lim, group, plan) {
                        n += 1;
                    }
                    if n == 0 {
                        break;
                    }
                    self.next_group += 1;
                    open += 1;
                    // The next group forms only from a full set or after its own wait.
                    let Some(front) = self.waiting.front() else {
                        break;
                    };
                    if self.waiting.len() < lim.max_running && now < front.arrived + lim.batch_wait
                    {
                        return (open < lim.max_groups).then_some(front.arrived + lim.batch_wait);
                    }
                }
                None
            }
        }
    }

    /// Starts the oldest waiting sequence if its reservation fits.
    fn start_front(&mut self, lim: &Limits, group: u64, plan: &mut Plan) -> bool {
        let Some(front) = self.waiting.front() else {
            return false;
        };
        if self.kv_used + front.reservation() > lim.kv_tokens {
            return false;
        }
        let s = self.waiting.pop_front().expect("front exists");
        self.kv_used += s.reservation();
        plan.started.push(s.id);
        self.running.push(Running {
            id: s.id,
            prompt_len: s.prompt_len,
            prefilled: 0,
            decoding: false,
            reserved: s.reservation(),
            group,
            pads: lim.scheduling == Scheduling::Padded,
            padding: false,
        });
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lim() -> Limits {
        Limits {
            max_running: 4,
            prefill_tokens: 100,
            batch_wait: Duration::from_millis(10),
            kv_tokens: 10_000,
            scheduling: Scheduling::Continuous,
            max_groups: 1,
            draining: false,
        }
    }

    fn seq(id: SeqId, prompt: usize, max_new: usize, at: Instant) -> NewSeq {
        NewSeq {
            id,
            prompt_len: prompt,
            max_new,
            arrived: at,
            deadline: at + Duration::from_secs(30),
        }
    }

    #[test]
    fn a_lone_newcomer_waits_for_company_only_while_idle() {
        let t0 = Instant::now();
        let mut s = Scheduler::default();
        s.push(seq(1, 5, 3, t0));
        let p = s.schedule(t0, &lim());
        assert!(p.is_idle() && p.started.is_empty());
        assert_eq!(p.wake_at, Some(t0 + Duration::from_millis(10)));
        let p = s.schedule(t0 + Duration::from_millis(10), &lim());
        assert_eq!(p.started, vec![1]);
        assert_eq!(
            p.prefill,
            vec![Prefill {
                id: 1,
                start: 0,
                len: 5,
                last: true
            }]
        );
        // With a sequence running, a newcomer joins the very next step.
        s.push(seq(2, 4, 3, t0 + Duration::from_millis(11)));
        let p = s.schedule(t0 + Duration::from_millis(11), &lim());
        assert_eq!(p.started, vec![2]);
        assert_eq!(p.decode, vec![1]);
        assert_eq!(p.prefill.len(), 1);
    }

    #[test]
    fn a_full_set_starts_without_waiting_and_the_cap_holds() {
        let t0 = Instant::now();
        let mut s = Scheduler::default();
        for id in 0..6 {
            s.push(seq(id, 3, 3, t0));
        }
        let p = s.schedule(t0, &lim());
        assert_eq!(p.started, vec![0, 1, 2, 3]);
        assert_eq!(s.running_len(), 4);
        assert_eq!(s.waiting_len(), 2);
        let p = s.schedule(t0, &lim());
        assert!(p.started.is_empty());
        assert_eq!(p.decode, vec![0, 1, 2, 3]);
        s.finish(2);
        let p = s.schedule(t0, &lim());
        assert_eq!(p.started, vec![4]);
    }

    #[test]
    fn prompts_are_chunked_under_the_token_budget() {
        let t0 = Instant::now();
        let mut s = Scheduler::default();
        s.push(seq(1, 10, 3, t0));
        s.push(seq(2, 3, 3, t0));
        let l = Limits {
            prefill_tokens: 4,
            batch_wait: Duration::ZERO,
            ..lim()
        };
        let chunks = |p: &Plan| {
            p.prefill
                .iter()
                .map(|c| (c.id, c.start, c.len, c.last))
                .collect::<Vec<_>>()
        };
        let p = s.schedule(t0, &l);
        assert_eq!(chunks(&p), vec![(1, 0, 4, false)]);
        let p = s.schedule(t0, &l);
        assert_eq!(chunks(&p), vec![(1, 4, 4, false)]);
        let p = s.schedule(t0, &l);
        assert_eq!(chunks(&p), vec![(1, 8, 2, true), (2, 0, 2, false)]);
        assert!(p.decode.is_empty());
        let p = s.schedule(t0, &l);
        assert_eq!(p.decode, vec![1]);
        assert_eq!(chunks(&p), vec![(2, 2, 1, true)]);
        let p = s.schedule(t0, &l);
        assert_eq!(p.decode, vec![1, 2]);
    }

    #[test]
    fn the_kv_budget_is_never_exceeded_and_the_head_is_not_overtaken() {
        let t0 = Instant::now();
        let mut s = Scheduler::default();
        let l = Limits {
            kv_tokens: 20,
            batch_wait: Duration::ZERO,
            ..lim()
        };
        s.push(seq(1, 5, 5, t0)); // 10
        s.push(seq(2, 8, 4, t0)); // 12: does not fit beside 1
        s.push(seq(3, 1, 1, t0)); // 2: would fit, but must not overtake 2
        let p = s.schedule(t0, &l);
        assert_eq!(p.started, vec![1]);
        assert_eq!(s.kv_used(), 10);
        s.schedule(t0, &l);
        assert!(s.kv_used() <= 20);
        s.finish(1);
        assert_eq!(s.kv_used(), 0);
        let p = s.schedule(t0, &l);
        assert_eq!(p.started, vec![2, 3]);
        assert_eq!(s.kv_used(), 14);
    }

    #[test]
    fn static_groups_take_no_newcomers_until_they_end() {
        let t0 = Instant::now();
        let mut s = Scheduler::default();
        let l = Limits {
            max_running: 2,
            scheduling: Scheduling::Static,
            ..lim()
        };
        for id in 0..3 {
            s.push(seq(id, 2, 2, t0));
        }
        let p = s.schedule(t0, &l);
        assert_eq!(p.started, vec![0, 1]);
        s.finish(0);
        // One slot is free but the group is still running: 2 waits.
        let p = s.schedule(t0 + Duration::from_secs(1), &l);
        assert!(p.started.is_empty());
        s.finish(1);
        let p = s.schedule(t0 + Duration::from_secs(1), &l);
        assert_eq!(p.started, vec![2]);
        // Two groups at once when allowed.
        let mut s = Scheduler::default();
        for id in 0..4 {
            s.push(seq(id, 2, 2, t0));
        }
        let p = s.schedule(t0, &Limits { max_groups: 2, ..l });
        assert_eq!(p.started, vec![0, 1, 2, 3]);
    }

    #[test]
    fn padded_groups_keep_finished_rows_until_their_last_sequence_ends() {
        let t0 = Instant::now();
        let mut s = Scheduler::default();
        let l = Limits {
            max_running: 3,
            scheduling: Scheduling::Padded,
            ..lim()
        };
        for id in 0..4 {
            s.push(seq(id, 2, 4, t0));
        }
        let p = s.schedule(t0, &l);
        assert_eq!(p.started, vec![0, 1, 2]);
        let p = s.schedule(t0, &l);
        assert_eq!(p.decode, vec![0, 1, 2]);
        // 0 ends: it stays as a padding row, decoded and holding its KV.
        assert!(s.retire(0));
        let p = s.schedule(t0 + Duration::from_secs(1), &l);
        assert_eq!(p.decode, vec![0, 1, 2]);
        assert!(p.released.is_empty() && p.started.is_empty());
        assert_eq!(s.kv_used(), 18);
        assert!(s.retire(1));
        // The last live sequence ends: it is removed, and the next plan releases the padding
        // rows and starts the next group.
        assert!(!s.retire(2));
        let p = s.schedule(t0 + Duration::from_secs(1), &l);
        assert_eq!(p.released, vec![0, 1]);
        assert_eq!(p.started, vec![3]);
        assert_eq!(s.kv_used(), 6);
        // Static and continuous never pad.
        let mut s = Scheduler::default();
        s.push(seq(7, 2, 4, t0));
        s.push(seq(8, 2, 4, t0));
        let st = Limits {
            scheduling: Scheduling::Static,
            ..l
        };
        let later = t0 + Duration::from_secs(1);
        assert_eq!(s.schedule(later, &st).started, vec![7, 8]);
        s.schedule(later, &st);
        assert!(!s.retire(7));
        assert_eq!(s.schedule(later, &st).decode, vec![8]);
    }

    #[test]
    fn waiting_sequences_past_their_deadline_expire() {
        let t0 = Instant::now();
        let mut s = Scheduler::default();
        let mut a = seq(1, 2, 2, t0);
        a.deadline = t0 + Duration::from_millis(5);
        s.push(a);
        s.push(seq(2, 2, 2, t0));
        let p = s.schedule(t0 + Duration::from_millis(6), &lim());
        assert_eq!(p.expired, vec![1]);
        assert_eq!(s.waiting_len(), 1);
    }
}
