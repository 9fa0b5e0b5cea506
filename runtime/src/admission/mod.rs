//! Admission: the rate limiter (token bucket) and queue capacity, applied before anything is queued
//! so that overload is shed with a cheap 429 instead of growing the queue past every deadline.
//!
//! Shared by every request family: embeddings count queued inputs, generation counts waiting
//! sequences. Its errors are its own ([`AdmissionError`]); `api::error` maps them to statuses.

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use profiles::{format_duration, Overflow, Profile};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

/// Why admission refused a request.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AdmissionError {
    /// The token bucket is empty.
    #[error("rate limit of {rate} requests/s exceeded; retry after {retry_after_s}s")]
    RateLimited {
        /// The configured rate.
        rate: f64,
        /// Whole seconds until a request would be admitted.
        retry_after_s: u64,
    },
    /// The queue is full (and stayed full for `queue_timeout` under `overflow = "wait"`).
    #[error("{0}")]
    QueueFull(String),
    /// The request alone is larger than the whole queue: it can never be admitted.
    #[error("request has {n} inputs; max_queue_size is {max}, so it can never be queued")]
    NeverFits {
        /// Units the request needs.
        n: usize,
        /// The queue's capacity.
        max: usize,
    },
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
                d.checked_add(n).filter(|&after| after <= max)
            })
            .is_ok()
    }

    /// Returns room for `n` inputs and wakes the longest-waiting request. One, not all: with
    /// thousands waiting, waking every one at each release made each release cost thousands of
    /// failed retries. A waiter that gets in passes the wake-up on while room is left.
    pub fn release(&self, n: usize) {
        if n > 0 {
            self.depth.fetch_sub(n, Ordering::AcqRel);
            self.freed.notify_one();
        }
    }
}

/// Rate limiter plus queue space; rebuilt lazily when `rate_limit`/`rate_burst` change live.
pub struct Admission {
    limiter: Mutex<Option<(f64, u32, Arc<DefaultDirectRateLimiter>)>>,
    clock: DefaultClock,
    /// Queue capacity shared with the batcher.
    pub space: Arc<QueueSpace>,
}

impl Admission {
    /// Admission over `space`.
    pub fn new(space: Arc<QueueSpace>) -> Self {
        Admission {
            limiter: Mutex::new(None),
            clock: DefaultClock::default(),
            space,
        }
    }

    fn limiter(&self, p: &Profile) -> Option<Arc<DefaultDirectRateLimiter>> {
        if p.rate_limit <= 0.0 {
            return None;
        }
        let burst = p.effective_burst();
        let mut g = self.limiter.lock().unwrap_or_else(|e| e.into_inner());
        match &*g {
            Some((r, b, l)) if *r == p.rate_limit && *b == burst => Some(l.clone()),
            _ => {
                let quota = Quota::with_period(Duration::from_secs_f64(1.0 / p.rate_limit))
                    .expect("rate_limit > 0 gives a non-zero period")
                    .allow_burst(NonZeroU32::new(burst).expect("burst ≥ 1"));
                let l = Arc::new(RateLimiter::direct(quota));
                *g = Some((p.rate_limit, burst, l.clone()));
                Some(l)
            }
        }
    }

    /// Token-bucket check; 429 with the whole seconds until the next token.
    pub fn check_rate(&self, p: &Profile) -> Result<(), AdmissionError> {
        let Some(l) = self.limiter(p) else {
            return Ok(());
        };
        l.check().map_err(|not_until| {
            let wait = not_until.wait_time_from(self.clock.now());
            AdmissionError::RateLimited {
                rate: p.rate_limit,
                retry_after_s: wait.as_secs_f64().ceil().max(1.0) as u64,
            }
        })
    }

    /// Reserves queue space for `n` inputs, or refuses/waits as `overflow` says.
    pub async fn reserve(&self, n: usize, p: &Profile) -> Result<(), AdmissionError> {
        if n > p.max_queue_size {
            return Err(AdmissionError::NeverFits {
                n,
                max: p.max_queue_size,
            });
        }
        if self.space.try_reserve(n, p.max_queue_size) {
            return Ok(());
        }
        if p.overflow == Overflow::Reject {
            return Err(AdmissionError::QueueFull(format!(
                "queue is full (max_queue_size = {} inputs, overflow = \"reject\")",
                p.max_queue_size
            )));
        }
        // Waiting longer than the request's own deadline only turns a 429 into a 504.
        let wait = p.queue_timeout.min(p.request_timeout);
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let freed = self.space.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if self.space.try_reserve(n, p.max_queue_size) {
                if self.space.depth.load(Ordering::Acquire) < p.max_queue_size {
                    self.space.freed.notify_one();
                }
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                return Err(AdmissionError::QueueFull(format!(
                    "queue stayed full for {} (the smaller of queue_timeout and request_timeout; max_queue_size = {} inputs, overflow = \"wait\")",
                    format_duration(wait),
                    p.max_queue_size
                )));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiting(max: usize, queue_timeout: Duration, request_timeout: Duration) -> Profile {
        Profile {
            max_queue_size: max,
            overflow: Overflow::Wait,
            queue_timeout,
            request_timeout,
            ..Profile::default()
        }
    }

    /// A queue of `max` filled, and `n` requests of one input waiting for room.
    async fn full_with_waiters(
        max: usize,
        n: usize,
    ) -> (
        Arc<QueueSpace>,
        Vec<tokio::task::JoinHandle<Result<(), AdmissionError>>>,
    ) {
        let space = Arc::new(QueueSpace::default());
        let a = Arc::new(Admission::new(space.clone()));
        let p = waiting(max, Duration::from_secs(30), Duration::from_secs(30));
        a.reserve(max, &p).await.unwrap();
        let tasks = (0..n)
            .map(|_| {
                let (a, p) = (a.clone(), p.clone());
                tokio::spawn(async move { a.reserve(1, &p).await })
            })
            .collect();
        (space, tasks)
    }

    #[tokio::test]
    async fn a_waiting_request_gives_up_at_its_own_deadline_not_the_queue_timeout() {
        let a = Admission::new(Arc::new(QueueSpace::default()));
        let p = waiting(1, Duration::from_secs(30), Duration::from_millis(200));
        a.reserve(1, &p).await.unwrap();
        // Bounded well below the 30 s queue_timeout it used to wait.
        let e = tokio::time::timeout(Duration::from_secs(10), a.reserve(1, &p))
            .await
            .expect("gave up at request_timeout")
            .unwrap_err();
        assert!(e.to_string().contains("stayed full for 200ms"), "{e}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_waiter_gets_in_as_room_is_released_one_at_a_time() {
        let (space, tasks) = full_with_waiters(1, 50).await;
        // Each release lets exactly one more in; all 50 get in after 50 releases. The next
        // release waits until a waiter has taken the room (a release with nothing reserved
        // would be a bug of the caller, and a busy host can be slower than a fixed sleep).
        for _ in 0..50 {
            let t0 = std::time::Instant::now();
            while space.depth.load(Ordering::Acquire) < 1 {
                assert!(
                    t0.elapsed() < Duration::from_secs(10),
                    "no waiter took the room"
                );
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
            space.release(1);
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(space.depth.load(Ordering::Acquire), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_large_release_admits_several_waiters() {
        let (space, tasks) = full_with_waiters(4, 4).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        // One release of 4: the woken waiter passes the wake-up on while room is left.
        space.release(4);
        for t in tasks {
            tokio::time::timeout(Duration::from_secs(10), t)
                .await
                .expect("every waiter admitted")
                .unwrap()
                .unwrap();
        }
    }
}
