//! batchtune loadgen: an open/closed-loop HTTP load generator whose latency is measured from the
//! *intended* send time (coordinated-omission corrected), with the generator's own lag recorded
//! so that a run where the generator was the bottleneck is marked invalid rather than believed.
//!
//! Library entry point: [`run`] with a [`Config`]; the tuner calls it in-process, with an
//! early-stop hook and a cancel flag.
#![warn(missing_docs)]

pub mod http1;
mod pacer;
pub mod record;
pub mod report;
pub mod schedule;
pub mod slo;
pub mod sse;
pub mod workload;

use bytes::Bytes;
use hyper::Uri;
use indicatif::{ProgressBar, ProgressStyle};
use record::{Collector, Outcome, Progress, Sample};
pub use report::Report;
use schedule::{Arrival, Rate};
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Semaphore};
use workload::Workload;

/// Errors that prevent a run.
#[derive(Debug, thiserror::Error)]
pub enum LoadgenError {
    /// The URL cannot be used.
    #[error("--url {url}: {reason}")]
    Url {
        /// As given.
        url: String,
        /// Why not.
        reason: String,
    },
    /// Inconsistent options.
    #[error("{0}")]
    Config(String),
}

/// Open loop (a schedule of intended send times) or closed loop (N clients back to back).
#[derive(Debug, Clone)]
pub enum Mode {
    /// Requests leave on schedule whatever the server does.
    Open {
        /// Offered rate over time.
        rate: Rate,
        /// Inter-arrival distribution.
        arrival: Arrival,
        /// Safety cap on requests in flight; what it drops is counted and invalidates the run.
        max_in_flight: usize,
    },
    /// `concurrency` virtual clients, each sending its next request when the last returns.
    Closed {
        /// Virtual clients.
        concurrency: usize,
    },
}

/// How an open loop's pacers send and read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SendLoop {
    /// `epoll` where it can be (Linux, responses read whole), else `tokio`.
    #[default]
    Auto,
    /// Each pacer's own epoll loop over its sockets: fewer syscalls, clock reads and event-loop
    /// turns a request, so one core sends more (Linux; not for streaming workloads).
    Epoll,
    /// A task per request on each pacer's single-threaded tokio runtime: every workload,
    /// streaming included (token timings per event).
    Tokio,
}

/// Decides part-way through whether a run should stop now (returns the reason).
pub type EarlyStop = Arc<dyn Fn(&Progress<'_>) -> Option<String> + Send + Sync>;

/// Everything a run needs.
#[derive(Clone)]
pub struct Config {
    /// Server base URL (`http://127.0.0.1:8000`); a path in it overrides the workload's path.
    pub url: String,
    /// Open or closed loop.
    pub mode: Mode,
    /// Measured phase.
    pub duration: Duration,
    /// Sent but excluded from statistics.
    pub warmup: Duration,
    /// Per-request timeout; counted as an error of kind `timeout`.
    pub timeout: Duration,
    /// Bodies and path.
    pub workload: Workload,
    /// Extra headers (e.g. Authorization).
    pub headers: Vec<(String, String)>,
    /// Measurement window for stability and interval logs; `None` = duration / 5 in [1s, 10s].
    pub window: Option<Duration>,
    /// Stability tolerance in percent across the last 3 windows.
    pub stability_percent: f64,
    /// Cap on open connections (requests wait for one, which corrected latency shows and
    /// service time does not); `None` = a new connection whenever all are busy.
    pub connections: Option<usize>,
    /// Generator lag p99 above which the run is invalid.
    pub max_lag_p99: Duration,
    /// Schedule seed.
    pub seed: u64,
    /// Draw a progress bar on stderr when it is a terminal.
    pub progress: bool,
    /// Stop early when this says so (checked at each window end).
    pub early_stop: Option<EarlyStop>,
    /// Set to stop the run from outside (Ctrl-C, the tuner's time budget).
    pub cancel: Option<Arc<AtomicBool>>,
    /// Per-request limits for goodput (requests/s meeting all of them); none set: not reported.
    pub goodput: slo::GoodputLimits,
    /// Open loop: pacer threads, each with its own connections and share of the schedule;
    /// 0 = one per 2,000 req/s of the peak rate, at most one per core.
    pub pacers: usize,
    /// The send lag's p99 may also reach this fraction of the latency's p50 (the run stays
    /// valid when lag p99 ≤ max(`max_lag_p99`, this × p50)): generator overhead is judged
    /// against what is measured, so a sub-millisecond run needs a sub-millisecond generator.
    pub lag_fraction: f64,
    /// Open loop: how the pacers send.
    pub send_loop: SendLoop,
}

impl Config {
    /// A config with defaults: 10s measured, 2s warm-up, 30s timeout, 10% stability, send lag
    /// p99 within max(50 µs, 5% of the latency p50).
    pub fn new(url: impl Into<String>, mode: Mode, workload: Workload) -> Self {
        Config {
            url: url.into(),
            mode,
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(2),
            timeout: Duration::from_secs(30),
            workload,
            headers: Vec::new(),
            window: None,
            stability_percent: 10.0,
            connections: None,
            max_lag_p99: Duration::from_micros(50),
            seed: 1,
            progress: false,
            early_stop: None,
            cancel: None,
            goodput: slo::GoodputLimits::default(),
            pacers: 0,
            lag_fraction: 0.05,
            send_loop: SendLoop::Auto,
        }
    }

    /// Pacer threads for an open loop at `rate`: `pacers`, or enough that each has at most
    /// 2,000 req/s of the peak rate and at most 40,000 streamed events/s
    /// ([`Workload::events_per_request`]), at most one per core.
    /// - 2,000 req/s: one pacer on one core sends ~20,000 req/s with a low lag, and headroom
    ///   keeps the send lag within the sub-millisecond limit of a fast server.
    /// - 40,000 events/s: on the 16-core H200 host one pacer reading streamed completions
    ///   (72 tokens each) saturated at ~1,840 req/s, ~136,000 events/s, with a send-lag p99 of
    ///   444 ms, so the generator, not the server, set the rate (results/generate-2xh200).
    ///
    /// Pacers record their own samples, so no core is left for a collector (one had been,
    /// when samples crossed to one thread: 8 pacers sharing 8 cores with it had a send-lag p99
    /// of 4.7 ms at 240,000 req/s).
    pub fn pacers_for(&self, rate: &Rate) -> usize {
        if self.pacers > 0 {
            return self.pacers;
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        pacers_needed(rate, self.workload.events_per_request(), cores)
    }

    /// The measurement window in effect: `window`, or duration / 5 clamped to [1s, 10s].
    pub fn effective_window(&self) -> Duration {
        self.window.unwrap_or_else(|| {
            Duration::from_secs_f64((self.duration.as_secs_f64() / 5.0).clamp(1.0, 10.0))
                .min(self.duration)
        })
    }
}

/// Requests a second one pacer is given at most (see [`Config::pacers_for`]).
const PACER_RPS: f64 = 2_000.0;
/// Streamed response events a second one pacer is given at most (see [`Config::pacers_for`]).
const PACER_EVENTS: f64 = 40_000.0;

/// [`Config::pacers_for`] without the machine: pacers for `rate` at `events` response events a
/// request, on `cores` cores.
fn pacers_needed(rate: &Rate, events: f64, cores: usize) -> usize {
    let peak = rate.peak();
    // A response read whole is one event, which the request bound already covers.
    let needed = (peak / PACER_RPS).max(peak * events / PACER_EVENTS);
    (needed.ceil() as usize).clamp(1, cores.max(1))
}

fn target_uri(cfg: &Config) -> Result<Uri, LoadgenError> {
    let bad = |reason: &str| LoadgenError::Url {
        url: cfg.url.clone(),
        reason: reason.into(),
    };
    let uri: Uri = cfg
        .url
        .parse()
        .map_err(|e: hyper::http::uri::InvalidUri| bad(&e.to_string()))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => return Err(bad("https is not supported; loadgen speaks plain HTTP/1.1")),
        _ => return Err(bad("must start with http://")),
    }
    let authority = uri.authority().ok_or_else(|| bad("has no host"))?.clone();
    let path = match uri.path() {
        "" | "/" => cfg.workload.path.clone(),
        p => p.to_string(),
    };
    Uri::builder()
        .scheme("http")
        .authority(authority)
        .path_and_query(path)
        .build()
        .map_err(|e| bad(&e.to_string()))
}

struct Sender {
    client: http1::Client,
    timeout: Duration,
    stream: bool,
    conns: Option<Arc<Semaphore>>,
}

impl Sender {
    /// Sends one pre-built request; returns (sent, done, outcome).
    async fn send(&self, req: Bytes) -> (Instant, Instant, Outcome) {
        let s = self.send_timed(req).await;
        (s.acquired, s.done, s.outcome)
    }

    /// Sends one pre-built request, timing the socket write.
    async fn send_timed(&self, req: Bytes) -> pacer::Sent {
        let _permit = match &self.conns {
            Some(s) => Some(
                s.clone()
                    .acquire_owned()
                    .await
                    .expect("semaphore never closes"),
            ),
            None => None,
        };
        let sent = Instant::now();
        let mut written = sent;
        let outcome =
            match tokio::time::timeout(self.timeout, self.client.exchange(&req, sent, self.stream))
                .await
            {
                Err(_) => Outcome::Timeout,
                Ok(Err(http1::ExchangeError::Connect)) => Outcome::Connect,
                Ok(Err(http1::ExchangeError::Io)) => Outcome::Io,
                Ok(Ok(x)) if x.stream_error => {
                    written = x.written.unwrap_or(sent);
                    Outcome::StreamError
                }
                Ok(Ok(x)) => {
                    written = x.written.unwrap_or(sent);
                    if (200..300).contains(&x.status) {
                        Outcome::Ok {
                            tokens: self.stream.then(|| record::Tokens {
                                output: x.usage_tokens.unwrap_or(x.token_times.len() as u64),
                                times: x.token_times,
                            }),
                        }
                    } else {
                        Outcome::Status(x.status)
                    }
                }
            };
        pacer::Sent {
            acquired: sent,
            written,
            done: Instant::now(),
            outcome,
        }
    }
}

/// Whether the open loop's pacers run their own epoll loops (see [`SendLoop`]).
fn direct_send(cfg: &Config) -> Result<bool, LoadgenError> {
    let linux = cfg!(target_os = "linux");
    match cfg.send_loop {
        SendLoop::Auto => Ok(linux && !cfg.workload.stream),
        SendLoop::Tokio => Ok(false),
        SendLoop::Epoll if !linux => Err(LoadgenError::Config(
            "--send-loop epoll needs Linux; use --send-loop tokio".into(),
        )),
        SendLoop::Epoll if cfg.workload.stream => Err(LoadgenError::Config(
            "--send-loop epoll reads responses whole and cannot time a stream's tokens; use \
             --send-loop tokio (or auto) for a streaming workload"
                .into(),
        )),
        SendLoop::Epoll => Ok(true),
    }
}

/// A pacer's own epoll loop to `addr` (Linux).
#[cfg(target_os = "linux")]
fn pacer_direct(addr: std::net::SocketAddr, timeout: Duration, conns: Option<usize>) -> pacer::How {
    pacer::How::Direct(pacer::direct::Target {
        addr,
        timeout,
        conns,
    })
}

/// Never called off Linux: [`direct_send`] refuses `epoll` there.
#[cfg(not(target_os = "linux"))]
fn pacer_direct(_: std::net::SocketAddr, _: Duration, _: Option<usize>) -> pacer::How {
    unreachable!("direct_send refuses epoll off Linux")
}

/// Gathers into `snap` (a collector of the run's phase, kept for the run) what
/// [`Collector::progress`] reads of all of `cols` so far: each pacer's lock is held only to add
/// its counters and four histograms ([`Collector::merge_progress`]).
fn progress_of<'a>(snap: &'a mut Collector, cols: &[Arc<Mutex<Collector>>]) -> &'a Collector {
    snap.clear_progress();
    for c in cols {
        snap.merge_progress(&record::lock(c));
    }
    snap
}

/// One collector holding what all of `cols` recorded so far (the report's, once the pacers are
/// done: it clones a whole collector under a lock).
fn merged(cols: &[Arc<Mutex<Collector>>]) -> Collector {
    let mut all = record::lock(&cols[0]).clone();
    for c in &cols[1..] {
        all.merge(&record::lock(c));
    }
    all
}

/// Runs the load and returns the report. Must be called inside a multi-threaded tokio runtime.
pub async fn run(cfg: Config) -> Result<Report, LoadgenError> {
    let uri = target_uri(&cfg)?;
    if cfg.workload.bodies.is_empty() {
        return Err(LoadgenError::Config("the workload has no bodies".into()));
    }
    if cfg.duration.is_zero() {
        return Err(LoadgenError::Config("--duration must be > 0".into()));
    }
    if let Mode::Open { rate, .. } = &cfg.mode {
        rate.within_limit().map_err(LoadgenError::Config)?;
    }
    for (k, v) in &cfg.headers {
        if k.is_empty() || k.contains([':', '\r', '\n', ' ']) {
            return Err(LoadgenError::Config(format!(
                "header name `{k}` is not valid"
            )));
        }
        if v.contains(['\r', '\n']) {
            return Err(LoadgenError::Config(format!(
                "header `{k}` has an invalid value"
            )));
        }
    }
    let authority = uri.authority().expect("checked in target_uri").to_string();
    let addr = tokio::net::lookup_host(&authority)
        .await
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| LoadgenError::Url {
            url: cfg.url.clone(),
            reason: format!("cannot resolve {authority}"),
        })?;
    let path = uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    // Every request's bytes are built now, so nothing is formatted on the send path.
    let requests: Vec<Bytes> = cfg
        .workload
        .bodies
        .iter()
        .map(|b| http1::request_bytes(&path, &authority, &cfg.headers, b))
        .collect();
    let sender = Arc::new(Sender {
        client: http1::Client::new(addr),
        timeout: cfg.timeout,
        stream: cfg.workload.stream,
        conns: cfg.connections.map(|n| Arc::new(Semaphore::new(n.max(1)))),
    });

    let window = cfg.effective_window();
    let start = Instant::now() + Duration::from_millis(20);
    // The origin's wall-clock time, read next to the Instant it is derived from.
    let origin_unix_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64() + 0.020)
        .unwrap_or(0.0);
    let measure_start = start + cfg.warmup;
    let measure_end = measure_start + cfg.duration;
    let stop = Arc::new(AtomicBool::new(false));
    // Producers hold a sender each and never send: the run is over when all have dropped theirs.
    let (alive, mut done) = mpsc::channel::<()>(1);
    let bodies = Arc::new(requests);
    let mut template = Collector::new(measure_start, measure_end, window);
    template.goodput = cfg.goodput;
    let new_col = || Arc::new(Mutex::new(template.clone()));
    let mut cols = Vec::new();
    // Sized once: the default reads every body (streamed events), and the report says it.
    let pacers = match &cfg.mode {
        Mode::Open { rate, .. } => Some(cfg.pacers_for(rate)),
        Mode::Closed { .. } => None,
    };

    match &cfg.mode {
        Mode::Open {
            rate,
            arrival,
            max_in_flight,
        } => {
            let n = pacers.unwrap_or(1);
            let direct = direct_send(&cfg)?;
            let in_flight = Arc::new(AtomicUsize::new(0));
            for k in 0..n {
                // Each pacer has its own connections (and its share of a connection cap).
                let conns = cfg
                    .connections
                    .map(|c| (c / n + usize::from(k < c % n)).max(1));
                let how = if direct {
                    pacer_direct(addr, cfg.timeout, conns)
                } else {
                    let own = Arc::new(Sender {
                        client: http1::Client::new(addr),
                        timeout: cfg.timeout,
                        stream: cfg.workload.stream,
                        conns: conns.map(|c| Arc::new(Semaphore::new(c))),
                    });
                    pacer::How::Async(Arc::new(move |body| {
                        let own = own.clone();
                        Box::pin(async move { own.send_timed(body).await })
                    }))
                };
                pacer::spawn(pacer::Share {
                    k,
                    n,
                    start,
                    end: measure_end,
                    rate: *rate,
                    arrival: *arrival,
                    seed: cfg.seed,
                    cap: *max_in_flight,
                    in_flight: in_flight.clone(),
                    stop: stop.clone(),
                    bodies: bodies.clone(),
                    col: {
                        let col = new_col();
                        cols.push(col.clone());
                        col
                    },
                    alive: alive.clone(),
                    how,
                })
                .map_err(|e| LoadgenError::Config(format!("cannot start a pacer thread: {e}")))?;
            }
        }
        Mode::Closed { concurrency } => {
            if *concurrency == 0 {
                return Err(LoadgenError::Config("--concurrency must be ≥ 1".into()));
            }
            // One collector for all clients: they share the run's worker threads, and a
            // closed loop's rate is bounded by its clients' round trips, not by recording.
            cols.push(new_col());
            for k in 0..*concurrency {
                let (stop, alive, sender, bodies) =
                    (stop.clone(), alive.clone(), sender.clone(), bodies.clone());
                let col = cols[0].clone();
                let n = *concurrency;
                tokio::spawn(async move {
                    tokio::time::sleep_until(tokio::time::Instant::from_std(start)).await;
                    let mut i = k;
                    while Instant::now() < measure_end && !stop.load(Ordering::Relaxed) {
                        let intended = Instant::now();
                        let (sent, done, outcome) =
                            sender.send(bodies[i % bodies.len()].clone()).await;
                        i += n;
                        record::lock(&col).record(&Sample {
                            intended,
                            started: intended,
                            sent,
                            done,
                            outcome,
                        });
                    }
                    drop(alive);
                });
            }
        }
    }
    drop(alive);

    let bar = (cfg.progress && std::io::stderr().is_terminal()).then(|| {
        let total = (cfg.warmup + cfg.duration).as_millis() as u64;
        let b = ProgressBar::new(total);
        b.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {percent:>3}% {msg}",
            )
            .expect("static template"),
        );
        b
    });
    let mut snap = template.clone();
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut next_check = measure_start + window;
    let mut stopped_early: Option<String> = None;
    let hard_deadline = measure_end + cfg.timeout + Duration::from_secs(2);
    let mut last_ok = (Instant::now(), 0u64);
    loop {
        tokio::select! {
            // Never sent to: `None` once every producer has finished.
            _ = done.recv() => break,
            _ = tick.tick() => {
                let now = Instant::now();
                if let Some(b) = &bar {
                    let col = progress_of(&mut snap, &cols);
                    let rate = (col.ok - last_ok.1) as f64 / now.duration_since(last_ok.0).as_secs_f64().max(1e-3);
                    last_ok = (now, col.ok);
                    let p95 = col.histos.latency.value_at_quantile(0.95) as f64 / 1e6;
                    let phase = if now < measure_start { "warm-up " } else { "" };
                    b.set_position(now.saturating_duration_since(start).as_millis() as u64);
                    b.set_message(format!("{phase}{rate:.0} ok/s  p95 {}  errors {}", slo::format_secs(p95), col.error_count()));
                }
                if cfg.cancel.as_ref().is_some_and(|c| c.load(Ordering::Relaxed)) && stopped_early.is_none() {
                    stopped_early = Some("cancelled".into());
                    stop.store(true, Ordering::Relaxed);
                }
                if now >= next_check && now <= measure_end && stopped_early.is_none() {
                    next_check += window;
                    if let Some(hook) = &cfg.early_stop {
                        if let Some(reason) = hook(&progress_of(&mut snap, &cols).progress(now)) {
                            stopped_early = Some(reason);
                            stop.store(true, Ordering::Relaxed);
                        }
                    }
                }
                if now > hard_deadline {
                    break;
                }
            }
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    // Every producer is done (or one still holds a request past the hard deadline: what it
    // recorded so far is taken, and it is left to finish on its own).
    let col = merged(&cols);
    let ended = if stopped_early.is_some() {
        Instant::now()
            .min(measure_end)
            .max(measure_start + Duration::from_millis(1))
    } else {
        measure_end
    };
    let mut report = Report::build(&cfg, &uri, col, ended, stopped_early, origin_unix_s);
    report.pacers = pacers;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streamed_generation_gets_pacers_for_its_events_not_only_its_requests() {
        // One-shot: one pacer per 2,000 req/s, the peak of a ramp, at most one per core.
        assert_eq!(pacers_needed(&Rate::Fixed(800.0), 1.0, 16), 1);
        assert_eq!(pacers_needed(&Rate::Fixed(20_000.0), 1.0, 16), 10);
        assert_eq!(pacers_needed(&Rate::Fixed(1e6), 1.0, 16), 16);
        let ramp = Rate::Ramp {
            start: 100.0,
            end: 6_000.0,
            step: 100.0,
            every: Duration::from_secs(1),
        };
        assert_eq!(pacers_needed(&ramp, 1.0, 16), 3);
        // The rate one pacer could not hold on the H200 host (1,919 req/s of 72-token streams,
        // 74 events each) now gets four; a handful of streams still gets one.
        assert_eq!(pacers_needed(&Rate::Fixed(1_919.0), 74.0, 16), 4);
        assert_eq!(pacers_needed(&Rate::Fixed(10.0), 74.0, 16), 1);
        assert_eq!(pacers_needed(&Rate::Fixed(1_919.0), 74.0, 2), 2);
    }
}
