//! Admission: the rate limiter (token bucket) and queue capacity, applied before anything is queued
//! so that overload is shed with a cheap 429 instead of growing the queue past every deadline.

use crate::api::error::ApiError;
use crate::batcher::QueueSpace;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use profiles::{format_duration, Overflow, Profile};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
    pub fn check_rate(&self, p: &Profile) -> Result<(), ApiError> {
        let Some(l) = self.limiter(p) else {
            return Ok(());
        };
        l.check().map_err(|not_until| {
            let wait = not_until.wait_time_from(self.clock.now());
            ApiError::RateLimited {
                rate: p.rate_limit,
                retry_after_s: wait.as_secs_f64().ceil().max(1.0) as u64,
            }
        })
    }

    /// Reserves queue space for `n` inputs, or refuses/waits as `overflow` says.
    pub async fn reserve(&self, n: usize, p: &Profile) -> Result<(), ApiError> {
        if n > p.max_queue_size {
            return Err(ApiError::bad(
                "input",
                format!(
                    "request has {n} inputs; max_queue_size is {}, so it can never be queued",
                    p.max_queue_size
                ),
            ));
        }
        if self.space.try_reserve(n, p.max_queue_size) {
            return Ok(());
        }
        if p.overflow == Overflow::Reject {
            return Err(ApiError::QueueFull(format!(
                "queue is full (max_queue_size = {} inputs, overflow = \"reject\")",
                p.max_queue_size
            )));
        }
        let deadline = tokio::time::Instant::now() + p.queue_timeout;
        loop {
            let freed = self.space.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if self.space.try_reserve(n, p.max_queue_size) {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                return Err(ApiError::QueueFull(format!(
                    "queue stayed full for queue_timeout = {} (max_queue_size = {} inputs, overflow = \"wait\")",
                    format_duration(p.queue_timeout),
                    p.max_queue_size
                )));
            }
        }
    }
}
