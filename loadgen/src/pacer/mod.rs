//! The open loop's senders: N pacer threads, each with its own single-threaded async runtime,
//! its own connections and its own share of the schedule.
//!
//! Every pacer draws the *whole* schedule from the same seed and sends arrivals k, k + N,
//! k + 2N…, so the union of the shares is exactly the one schedule asked for (Poisson, gamma or
//! constant), whatever N is. A pacer waits for its next send on a `timerfd` registered with its
//! runtime's reactor (absolute CLOCK_MONOTONIC deadline, microsecond precision): between sends
//! the thread sleeps in `epoll` and serves responses, instead of spinning the last few hundred
//! microseconds before each send (which used a whole core above ~2,500 req/s and clumped sends).
//! A pacer that falls behind sends its overdue arrivals back to back: past saturation it holds
//! the highest rate its core can send, and the lag it records says so. Each pacer records into
//! its own [`Collector`] (locked only by its own thread, and by the run's loop to merge once
//! per progress tick), so no sample crosses threads on the hot path.

use crate::record::{self, Collector, Outcome, Sample};
use crate::schedule::{Arrival, Rate, Schedule};
use bytes::Bytes;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

#[cfg(target_os = "linux")]
pub(crate) mod direct;

/// Sends one request and reports it; built per pacer (each has its own connections).
pub(crate) type SendFn = Arc<
    dyn Fn(Bytes) -> std::pin::Pin<Box<dyn std::future::Future<Output = Sent> + Send>>
        + Send
        + Sync,
>;

/// What a send returns: when its bytes were written (the send lag is measured there), when it
/// finished, and how.
pub(crate) struct Sent {
    /// When it had a connection slot (after waiting for a capped pool, which is latency the
    /// user sees, not generator lag).
    pub acquired: Instant,
    /// When the request's bytes were handed to the socket: the write call began (or the
    /// attempt failed).
    pub written: Instant,
    /// When the response (or the failure) was complete.
    pub done: Instant,
    /// Its outcome.
    pub outcome: Outcome,
}

/// One pacer's share and what it shares with the others.
pub(crate) struct Share {
    /// This pacer's index and the number of pacers.
    pub k: usize,
    /// Pacers in all.
    pub n: usize,
    /// Schedule origin.
    pub start: Instant,
    /// No send is scheduled at or after this.
    pub end: Instant,
    /// Offered rate and arrival process.
    pub rate: Rate,
    /// Inter-arrival distribution.
    pub arrival: Arrival,
    /// Schedule seed (the same for every pacer).
    pub seed: u64,
    /// Safety cap on requests in flight, over all pacers.
    pub cap: usize,
    /// Requests in flight, over all pacers.
    pub in_flight: Arc<AtomicUsize>,
    /// Set to stop sending.
    pub stop: Arc<AtomicBool>,
    /// Pre-built requests, cycled.
    pub bodies: Arc<Vec<Bytes>>,
    /// This pacer's own collector.
    pub col: Arc<Mutex<Collector>>,
    /// Held until the pacer is done: the run ends when every holder has dropped its sender.
    pub alive: mpsc::Sender<()>,
    /// How this pacer sends: through its async runtime, or from its own epoll loop.
    pub how: How,
}

impl Share {
    /// This pacer's next arrival of the schedule `sched`, drawn from arrival `i` on (which
    /// it advances past the one returned), or `None` once the schedule reaches the end.
    /// Every pacer walks the whole schedule through here: to send, and to count what it
    /// left unsent.
    pub(crate) fn next_mine(&self, sched: &mut Schedule, i: &mut usize) -> Option<Instant> {
        loop {
            let intended = self.start + sched.next_offset();
            let k = *i;
            *i += 1;
            if intended >= self.end {
                return None;
            }
            if is_mine(k, self.k, self.n) {
                return Some(intended);
            }
        }
    }
}

/// The two ways a pacer can send.
pub(crate) enum How {
    /// A task per request on the pacer's single-threaded tokio runtime, through
    /// [`crate::http1::Client`]: every workload, streaming included.
    Async(SendFn),
    /// The pacer's own epoll loop over its sockets ([`direct`]): requests whose response is
    /// read whole (no token timings), with fewer syscalls, clock reads and event-loop turns a
    /// request.
    #[cfg(target_os = "linux")]
    Direct(direct::Target),
}

/// Starts pacer `share.k` on its own thread, detached: it ends once its share is sent and
/// answered, having added its event loop's wake-up delays to its collector (µs; see
/// [`crate::record::Histos::wake`]) and dropped `alive`, which is how the run knows.
pub(crate) fn spawn(share: Share) -> std::io::Result<()> {
    let name = format!("loadgen-pacer-{}", share.k);
    #[cfg(target_os = "linux")]
    if let How::Direct(target) = &share.how {
        // The poll set and timer are made here, so a failure is the caller's error.
        let looped = direct::Loop::new(target.clone())?;
        return std::thread::Builder::new()
            .name(name)
            .spawn(move || looped.run(share))
            .map(drop);
    }
    std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            // Sockets and timers only: with the signal and process drivers on as well
            // (`enable_all`), every park of the loop also checked for orphaned child processes
            // (1.7% of a pacer's CPU at 90,000 req/s on one core under perf).
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .enable_time()
                .build()
                .expect("a pacer's runtime");
            rt.block_on(pace(share))
        })
        .map(drop)
}

/// Whether arrival `i` of the whole schedule is pacer `k`'s of `n`.
pub(crate) fn is_mine(i: usize, k: usize, n: usize) -> bool {
    i % n == k
}

async fn pace(s: Share) {
    let send = match &s.how {
        How::Async(send) => send.clone(),
        #[cfg(target_os = "linux")]
        How::Direct(_) => unreachable!("spawn runs a direct share on its own loop"),
    };
    let timer = Timer::new();
    let mut sched = Schedule::new(s.arrival, s.rate, s.seed);
    let mut tasks = tokio::task::JoinSet::new();
    let mut i = 0usize;
    while let Some(intended) = s.next_mine(&mut sched, &mut i) {
        if s.stop.load(Ordering::Relaxed) {
            break;
        }
        // Past the end, overdue arrivals are not sent: a saturated generator stops on time
        // (its lag has already made the run invalid) and counts what it left unsent.
        if Instant::now() >= s.end {
            record_unsent(&s, Some(intended), &mut sched, i);
            break;
        }
        timer.sleep_until(intended).await;
        // Reap what finished, so the set does not grow with the run.
        while tasks.try_join_next().is_some() {}
        if s.in_flight.load(Ordering::Relaxed) >= s.cap {
            record::lock(&s.col).record(&dropped(intended, Instant::now()));
            continue;
        }
        s.in_flight.fetch_add(1, Ordering::Relaxed);
        let body = s.bodies[(i - 1) % s.bodies.len()].clone();
        let (col, send, in_flight) = (s.col.clone(), send.clone(), s.in_flight.clone());
        tasks.spawn(async move {
            let started = Instant::now();
            let r = send(body).await;
            in_flight.fetch_sub(1, Ordering::Relaxed);
            record::lock(&col).record(&sample(intended, started, r));
        });
    }
    while tasks.join_next().await.is_some() {}
    let _ = record::lock(&s.col)
        .histos
        .wake
        .add(&timer.wake.borrow().seen);
    drop(s.alive);
}

/// The sample of a request the pacer got to at `dispatched` and that went as `r` says. The
/// generator's lag is measured where the request leaves, at the socket write, less any wait
/// for a capped connection pool (the server's slowness, not ours). Both send loops record
/// through this, so they measure the same thing.
pub(crate) fn sample(intended: Instant, dispatched: Instant, r: Sent) -> Sample {
    let own = r.written.saturating_duration_since(r.acquired);
    Sample {
        intended,
        started: dispatched + own,
        sent: r.acquired,
        done: r.done,
        outcome: r.outcome,
    }
}

/// The sample of a request not sent at `now` because the in-flight safety cap was reached.
pub(crate) fn dropped(intended: Instant, now: Instant) -> Sample {
    let r = Sent {
        acquired: now,
        written: now,
        done: now,
        outcome: Outcome::Dropped,
    };
    sample(intended, now, r)
}

/// Records, when the run's end (not a stop) finds pacer `s` still behind its schedule, every
/// arrival of its share due before the end as [`Outcome::Unsent`], its lag at least the end
/// minus when it was due: `first` (already drawn, when it is this pacer's), then the rest of
/// `sched` from arrival `i`.
///
/// Why: a pacer asked far more than its core can send stops at the end with its backlog
/// unsent. Left uncounted, a backlog that reached back into the warm-up meant nothing
/// scheduled in the measured phase was ever recorded: the report read offered 0 req/s, empty
/// percentiles and a zero send lag, and blamed only a timer wake (seen asking 200,000 req/s of
/// one pacer on the 2-core VM, which sent 28,000).
pub(crate) fn record_unsent(s: &Share, first: Option<Instant>, sched: &mut Schedule, mut i: usize) {
    if s.stop.load(Ordering::Relaxed) {
        return;
    }
    let rest = std::iter::from_fn(|| s.next_mine(sched, &mut i));
    record::lock(&s.col).record_unsent(first.into_iter().chain(rest), s.end);
}

/// A precise async sleep: a timerfd armed with an absolute deadline, awaited through the
/// runtime's reactor. Falls back to tokio's timer (1 ms granularity) where timerfd is missing.
struct Timer {
    #[cfg(target_os = "linux")]
    fd: Option<(
        tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>,
        Instant,
        Duration,
    )>,
    /// How late the reactor wakes after the timer fires: the timer is armed that much early
    /// and the rest is spun, so sends leave on time without spinning whole gaps.
    wake: std::cell::RefCell<WakeEstimate>,
}

/// The longest early wake-up (and so the longest spin before a send).
const MAX_EARLY: Duration = Duration::from_micros(150);

/// A pacer's estimate of how late its thread wakes after its timer fires (µs, smoothed).
///
/// The estimate only moves when the pacer sleeps, and a pacer sleeps only when its next gap is
/// longer than the estimate. So one burst of late wakes (a descheduled thread on a busy host)
/// used to raise it above the gap for good: the pacer then spun every gap to the end of the
/// run, a whole core at 10,000 req/s on the 2-core VM (estimate 107 µs, its wakes 7–18 µs at
/// 2,000–5,000 req/s). Now a single wake moves it at most to twice its value, and every send
/// spun for without sleeping lets it decay, so the pacer tries sleeping again and measures.
#[derive(Debug, Clone)]
pub(crate) struct WakeEstimate {
    us: f64,
    /// Every wake-up delay seen (µs): the receive side's lag bound, added to the pacer's
    /// collector at the end.
    pub(crate) seen: hdrhistogram::Histogram<u64>,
}

impl WakeEstimate {
    /// Starts at 20 µs, a typical wake-up on the hosts measured.
    pub(crate) fn new() -> WakeEstimate {
        WakeEstimate {
            us: 20.0,
            seen: crate::record::new_hist(),
        }
    }

    /// How early to arm the timer before a send.
    pub(crate) fn early(&self) -> Duration {
        Duration::from_secs_f64(self.us * 1e-6).min(MAX_EARLY)
    }

    /// A wake `late_us` after the timer fired: recorded, and learned slowly, one outlier
    /// bounded.
    pub(crate) fn saw(&mut self, late_us: f64) {
        self.seen.saturating_record(late_us as u64);
        let late = late_us.min(2.0 * self.us + 10.0);
        self.us = 0.9 * self.us + 0.1 * late;
    }

    /// A send whose whole gap was spun (shorter than the estimate): the estimate decays.
    pub(crate) fn spun(&mut self) {
        self.us *= 0.99;
    }
}

impl Timer {
    fn new() -> Timer {
        #[cfg(target_os = "linux")]
        {
            Timer {
                fd: linux::timerfd(),
                wake: std::cell::RefCell::new(WakeEstimate::new()),
            }
        }
        #[cfg(not(target_os = "linux"))]
        {
            Timer {
                wake: std::cell::RefCell::new(WakeEstimate::new()),
            }
        }
    }

    async fn sleep_until(&self, t: Instant) {
        // Due now or overdue: send at once, but let this runtime's tasks run first (a pacer
        // that is behind must not starve its own writes and reads).
        if t <= Instant::now() {
            tokio::task::yield_now().await;
            return;
        }
        let wake_at = t - self.wake.borrow().early();
        if wake_at > Instant::now() {
            self.sleep_exactly(wake_at).await;
            let late = Instant::now()
                .saturating_duration_since(wake_at)
                .as_secs_f64()
                * 1e6;
            self.wake.borrow_mut().saw(late);
        } else {
            self.wake.borrow_mut().spun();
        }
        // The rest is spun, letting this runtime's other tasks (writes, responses) run.
        while Instant::now() < t {
            tokio::task::yield_now().await;
        }
    }

    async fn sleep_exactly(&self, t: Instant) {
        #[cfg(target_os = "linux")]
        if let Some((fd, base, base_mono)) = &self.fd {
            if linux::arm(fd, *base_mono + (t - *base)) {
                loop {
                    let Ok(mut g) = fd.readable().await else {
                        break;
                    };
                    if linux::drain(fd) {
                        break;
                    }
                    g.clear_ready();
                }
                return;
            }
        }
        tokio::time::sleep_until(tokio::time::Instant::from_std(t)).await;
    }
}

#[cfg(target_os = "linux")]
mod linux {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::time::{Duration, Instant};
    use tokio::io::unix::AsyncFd;

    /// The time of clock `id` (CLOCK_MONOTONIC, a CPU-time clock…).
    pub(super) fn clock(id: libc::clockid_t) -> Duration {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes one timespec we own.
        unsafe { libc::clock_gettime(id, &mut ts) };
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    }

    /// A non-blocking timerfd on CLOCK_MONOTONIC (the clock `Instant` reads on Linux), with an
    /// (Instant, monotonic time) pair read back to back to map one onto the other.
    pub(super) fn timerfd() -> Option<(AsyncFd<OwnedFd>, Instant, Duration)> {
        let (fd, base, mono) = raw_timerfd()?;
        // SAFETY: the OwnedFd is moved into the AsyncFd, which keeps it open and unchanged
        // for its whole life.
        let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) };
        Some((fd.ok()?, base, mono))
    }

    /// A non-blocking timerfd on CLOCK_MONOTONIC, not registered anywhere, with the
    /// (Instant, monotonic time) pair that maps one clock onto the other.
    pub(super) fn raw_timerfd() -> Option<(OwnedFd, Instant, Duration)> {
        // SAFETY: timerfd_create returns a new descriptor or -1; we own it from here.
        let raw = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if raw < 0 {
            return None;
        }
        // SAFETY: `raw` is a valid descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let base = Instant::now();
        let mono = clock(libc::CLOCK_MONOTONIC);
        Some((fd, base, mono))
    }

    /// Arms the timer to fire once at monotonic time `at`.
    pub(super) fn arm(fd: &impl AsRawFd, at: Duration) -> bool {
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: at.as_secs() as libc::time_t,
                tv_nsec: at.subsec_nanos() as libc::c_long,
            },
        };
        // SAFETY: the descriptor is open; `spec` lives across the call; no old value asked.
        unsafe {
            libc::timerfd_settime(
                fd.as_raw_fd(),
                libc::TFD_TIMER_ABSTIME,
                &spec,
                std::ptr::null_mut(),
            ) == 0
        }
    }

    /// Reads the expiration count; true when the timer has fired.
    pub(super) fn drain(fd: &impl AsRawFd) -> bool {
        let mut n = 0u64;
        // SAFETY: reads 8 bytes into `n`, which we own.
        let r = unsafe {
            libc::read(
                fd.as_raw_fd(),
                (&mut n as *mut u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
        r == 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_timer_wakes_close_to_its_deadline_without_spinning() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let t = Timer::new();
            let cpu0 = cpu_time();
            let wall0 = Instant::now();
            let mut late = Vec::new();
            for k in 1..=50u64 {
                let at = wall0 + Duration::from_micros(2_000 * k);
                t.sleep_until(at).await;
                late.push(Instant::now().saturating_duration_since(at));
            }
            let wall = wall0.elapsed();
            late.sort();
            // Never early; and the thread slept: far less CPU than wall time.
            assert!(
                late.iter().all(|l| *l < Duration::from_millis(50)),
                "{late:?}"
            );
            let cpu = cpu_time() - cpu0;
            assert!(
                cpu < wall / 2,
                "cpu {cpu:?} over wall {wall:?}: the timer spins"
            );
        });
    }

    #[test]
    fn a_burst_of_late_wakes_does_not_make_a_pacer_spin_for_good() {
        let mut w = WakeEstimate::new();
        for _ in 0..20 {
            w.saw(5.0);
        }
        let settled = w.early();
        assert!(settled < Duration::from_micros(10), "{settled:?}");
        // One wake a millisecond late (a descheduled thread) moves it little.
        w.saw(1_000.0);
        assert!(w.early() < Duration::from_micros(20), "{:?}", w.early());
        // A sustained run of late wakes is learned.
        for _ in 0..40 {
            w.saw(1_000.0);
        }
        let raised = w.early();
        assert!(raised >= Duration::from_micros(100), "{raised:?}");
        // At 10,000 req/s (100 µs gaps) it now spins; within a few hundred sends the
        // estimate is back under the gap, so the pacer sleeps and measures again.
        let mut spun = 0;
        while w.early() >= Duration::from_micros(100) {
            w.spun();
            spun += 1;
        }
        assert!(spun < 300, "{spun} sends spun");
    }

    fn cpu_time() -> Duration {
        super::linux::clock(libc::CLOCK_THREAD_CPUTIME_ID)
    }
}
