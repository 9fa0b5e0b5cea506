//! A hiccup meter: spins on the clock for a while and reports every gap between two successive
//! reads, so the stalls a host inflicts on a busy thread (the hypervisor taking the virtual CPU,
//! interrupts, other tasks) show apart from anything loadgen does.
//!
//! Why: at 110,000–150,000 req/s on one core of the lent host, loadgen's self-check called 5 s
//! runs at the same rate valid in one sweep (send-lag p99 17 µs) and invalid in the next
//! (3 ms). Run on the same core beside (or instead of) a generator, this tells a stall of the
//! host from a generator that cannot keep up.
//!
//! `cargo run --release -p loadgen --example hiccup -- [seconds]` (pin it with `taskset -c N`).
//! Prints one JSON line: the gap counts over 10 µs, 100 µs, 1 ms and 10 ms, the time lost in
//! gaps over 10 µs, and the longest gap.

use std::time::{Duration, Instant};

fn main() {
    let secs: f64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(5.0);
    let limits = [10u64, 100, 1_000, 10_000];
    let mut over = [0u64; 4];
    let mut lost_us = 0u64;
    let mut max_us = 0u64;
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let mut last = start;
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        let gap = now.duration_since(last).as_micros() as u64;
        last = now;
        if gap > limits[0] {
            lost_us += gap;
        }
        max_us = max_us.max(gap);
        for (n, l) in over.iter_mut().zip(limits) {
            *n += u64::from(gap > l);
        }
    }
    println!(
        "{{\"tool\":\"hiccup\",\"seconds\":{secs},\"over_10us\":{},\"over_100us\":{},\"over_1ms\":{},\"over_10ms\":{},\"lost_ms\":{:.3},\"max_us\":{max_us}}}",
        over[0],
        over[1],
        over[2],
        over[3],
        lost_us as f64 / 1e3
    );
}
