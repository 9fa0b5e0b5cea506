//! The queue's pure state and the batching decision. No clocks, channels or threads: the caller
//! passes `now`, so every rule (size, token budget, wait timeout, expiry) is unit-tested exactly.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Something queued that may be abandoned by its client before it is computed.
pub trait Pending {
    /// True when nobody waits for the answer any more (the client went away).
    fn is_cancelled(&self) -> bool;
}

/// One queued input.
#[derive(Debug)]
pub struct Entry<T> {
    /// Tokens in this input, special tokens included.
    pub tokens: usize,
    /// When it entered the queue (queue time and the wait timeout count from here).
    pub enqueued: Instant,
    /// When its request stops being worth answering; past it the entry gets 504, never computed.
    pub deadline: Instant,
    /// What the worker needs (token ids, reply slot).
    pub payload: T,
}

/// The knobs the decision reads; taken from the live profile at each decision.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Most inputs in a batch.
    pub max_batch_size: usize,
    /// Most padded tokens (inputs × longest) in a batch.
    pub max_batch_tokens: usize,
    /// Longest the oldest entry waits for a batch to fill.
    pub batch_wait_timeout: Duration,
}

/// Why a batch was released; exported as a metric label so users see which knob binds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// `max_batch_size` reached.
    Size,
    /// The next entry would break `max_batch_tokens`.
    Tokens,
    /// The oldest entry waited `batch_wait_timeout`.
    Timeout,
    /// Shutting down: release at once.
    Drain,
}

impl Trigger {
    /// Label value for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Size => "size",
            Trigger::Tokens => "tokens",
            Trigger::Timeout => "timeout",
            Trigger::Drain => "drain",
        }
    }
}

/// What the batcher should do now.
#[derive(Debug)]
pub enum Decision<T> {
    /// Compute these entries as one batch.
    Dispatch(Vec<Entry<T>>, Trigger),
    /// Nothing is ready; decide again at this instant (or sooner if something arrives).
    WaitUntil(Instant),
    /// The queue is empty.
    Idle,
}

/// Entries removed by a sweep, each needing its own answer.
#[derive(Debug)]
pub struct Swept<T> {
    /// Past their deadline: answer 504.
    pub expired: Vec<Entry<T>>,
    /// Abandoned by their client: drop.
    pub cancelled: Vec<Entry<T>>,
}

/// FIFO of queued inputs. Order is arrival order: batches never reorder by length, so no input
/// starves behind a stream of shorter ones.
#[derive(Debug)]
pub struct State<T> {
    entries: VecDeque<Entry<T>>,
}

impl<T> Default for State<T> {
    fn default() -> Self {
        State {
            entries: VecDeque::new(),
        }
    }
}

impl<T: Pending> State<T> {
    /// Appends an input.
    pub fn push(&mut self, e: Entry<T>) {
        self.entries.push_back(e);
    }

    /// Inputs waiting.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Removes entries past their deadline and entries whose client left. Run before each decision
    /// so that neither is ever computed.
    pub fn sweep(&mut self, now: Instant) -> Swept<T> {
        let mut swept = Swept {
            expired: Vec::new(),
            cancelled: Vec::new(),
        };
        if self
            .entries
            .iter()
            .all(|e| e.deadline > now && !e.payload.is_cancelled())
        {
            return swept;
        }
        let mut keep = VecDeque::with_capacity(self.entries.len());
        for e in self.entries.drain(..) {
            if e.deadline <= now {
                swept.expired.push(e);
            } else if e.payload.is_cancelled() {
                swept.cancelled.push(e);
            } else {
                keep.push_back(e);
            }
        }
        self.entries = keep;
        swept
    }

    /// Removes every queued entry (the drain timeout passed: each gets an explicit refusal).
    pub fn take_all(&mut self) -> Vec<Entry<T>> {
        self.entries.drain(..).collect()
    }

    /// The earliest deadline among queued entries, so the batcher wakes to answer 504 on time even
    /// when every device is busy.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.entries.iter().map(|e| e.deadline).min()
    }

    /// The batching rule. Takes the longest FIFO prefix that respects `max_batch_size` and
    /// `max_batch_tokens`; releases it when a limit is reached, when the oldest entry has waited
    /// `batch_wait_timeout`, or when draining. An entry that alone exceeds the token budget (the
    /// budget was lowered live after it was admitted) goes alone rather than waiting forever.
    pub fn decide(&mut self, now: Instant, limits: &Limits, draining: bool) -> Decision<T> {
        let Some(oldest) = self.entries.front() else {
            return Decision::Idle;
        };
        let max_size = limits.max_batch_size.max(1);
        let mut count = 0usize;
        let mut longest = 0usize;
        let mut full = None;
        for e in &self.entries {
            if count == max_size {
                full = Some(Trigger::Size);
                break;
            }
            let l = longest.max(e.tokens);
            if count > 0 && (count + 1) * l > limits.max_batch_tokens {
                full = Some(Trigger::Tokens);
                break;
            }
            longest = l;
            count += 1;
        }
        if full.is_none() && count == max_size {
            full = Some(Trigger::Size);
        }
        if full.is_none() && count == 1 && longest >= limits.max_batch_tokens {
            full = Some(Trigger::Tokens);
        }
        let due = oldest.enqueued + limits.batch_wait_timeout;
        let trigger = match full {
            Some(t) => t,
            None if draining => Trigger::Drain,
            None if now >= due => Trigger::Timeout,
            None => return Decision::WaitUntil(due),
        };
        let batch: Vec<Entry<T>> = self.entries.drain(..count).collect();
        Decision::Dispatch(batch, trigger)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[derive(Debug)]
    struct P {
        id: usize,
        gone: Cell<bool>,
    }
    impl Pending for P {
        fn is_cancelled(&self) -> bool {
            self.gone.get()
        }
    }

    fn limits(size: usize, tokens: usize, wait_ms: u64) -> Limits {
        Limits {
            max_batch_size: size,
            max_batch_tokens: tokens,
            batch_wait_timeout: Duration::from_millis(wait_ms),
        }
    }

    fn entry(id: usize, tokens: usize, at: Instant) -> Entry<P> {
        Entry {
            tokens,
            enqueued: at,
            deadline: at + Duration::from_secs(10),
            payload: P {
                id,
                gone: Cell::new(false),
            },
        }
    }

    fn ids(d: Decision<P>) -> (Vec<usize>, Trigger) {
        match d {
            Decision::Dispatch(b, t) => (b.iter().map(|e| e.payload.id).collect(), t),
            other => panic!("expected a batch, got {other:?}"),
        }
    }

    #[test]
    fn empty_queue_is_idle() {
        let mut s: State<P> = State::default();
        assert!(matches!(
            s.decide(Instant::now(), &limits(4, 100, 5), false),
            Decision::Idle
        ));
    }

    #[test]
    fn size_reached_dispatches_at_once_in_fifo_order() {
        let t0 = Instant::now();
        let mut s = State::default();
        for i in 0..6 {
            s.push(entry(i, 10, t0));
        }
        let (b, t) = ids(s.decide(t0, &limits(4, 1000, 50), false));
        assert_eq!((b, t), (vec![0, 1, 2, 3], Trigger::Size));
        // The remaining two wait for the timeout.
        assert!(
            matches!(s.decide(t0, &limits(4, 1000, 50), false), Decision::WaitUntil(d) if d == t0 + Duration::from_millis(50))
        );
        let (b, t) = ids(s.decide(t0 + Duration::from_millis(50), &limits(4, 1000, 50), false));
        assert_eq!((b, t), (vec![4, 5], Trigger::Timeout));
    }

    #[test]
    fn exactly_full_batch_goes_without_waiting() {
        let t0 = Instant::now();
        let mut s = State::default();
        for i in 0..4 {
            s.push(entry(i, 10, t0));
        }
        assert_eq!(
            ids(s.decide(t0, &limits(4, 1000, 50), false)).1,
            Trigger::Size
        );
    }

    #[test]
    fn token_budget_counts_padded_size() {
        let t0 = Instant::now();
        let mut s = State::default();
        s.push(entry(0, 10, t0));
        s.push(entry(1, 10, t0));
        s.push(entry(2, 40, t0)); // 3 × 40 = 120 > 100: the third breaks the budget
        s.push(entry(3, 10, t0));
        let (b, t) = ids(s.decide(t0, &limits(64, 100, 50), false));
        assert_eq!((b, t), (vec![0, 1], Trigger::Tokens));
        // 40 + 10 padded to 2 × 40 = 80 fits; waits for more.
        assert!(matches!(
            s.decide(t0, &limits(64, 100, 50), false),
            Decision::WaitUntil(_)
        ));
    }

    #[test]
    fn oversized_single_entry_is_not_starved() {
        let t0 = Instant::now();
        let mut s = State::default();
        s.push(entry(0, 500, t0));
        s.push(entry(1, 5, t0));
        let (b, t) = ids(s.decide(t0, &limits(64, 100, 50), false));
        assert_eq!((b, t), (vec![0], Trigger::Tokens));
    }

    #[test]
    fn wait_timeout_counts_from_the_oldest() {
        let t0 = Instant::now();
        let mut s = State::default();
        s.push(entry(0, 10, t0));
        s.push(entry(1, 10, t0 + Duration::from_millis(4)));
        let l = limits(8, 1000, 5);
        assert!(
            matches!(s.decide(t0 + Duration::from_millis(4), &l, false), Decision::WaitUntil(d) if d == t0 + Duration::from_millis(5))
        );
        let (b, t) = ids(s.decide(t0 + Duration::from_millis(5), &l, false));
        assert_eq!((b, t), (vec![0, 1], Trigger::Timeout));
        assert!(s.is_empty());
    }

    #[test]
    fn draining_releases_partial_batches() {
        let t0 = Instant::now();
        let mut s = State::default();
        s.push(entry(0, 10, t0));
        assert_eq!(
            ids(s.decide(t0, &limits(8, 1000, 5000), true)).1,
            Trigger::Drain
        );
    }

    #[test]
    fn expired_and_cancelled_entries_are_swept_not_batched() {
        let t0 = Instant::now();
        let mut s = State::default();
        let mut old = entry(0, 10, t0);
        old.deadline = t0 + Duration::from_millis(3);
        s.push(old);
        s.push(entry(1, 10, t0));
        let gone = entry(2, 10, t0);
        gone.payload.gone.set(true);
        s.push(gone);
        s.push(entry(3, 10, t0));
        assert_eq!(s.next_deadline(), Some(t0 + Duration::from_millis(3)));
        let now = t0 + Duration::from_millis(3);
        let swept = s.sweep(now);
        assert_eq!(
            swept
                .expired
                .iter()
                .map(|e| e.payload.id)
                .collect::<Vec<_>>(),
            vec![0]
        );
        assert_eq!(
            swept
                .cancelled
                .iter()
                .map(|e| e.payload.id)
                .collect::<Vec<_>>(),
            vec![2]
        );
        let (b, _) = ids(s.decide(now + Duration::from_secs(1), &limits(8, 1000, 5), false));
        assert_eq!(b, vec![1, 3]);
    }
}
