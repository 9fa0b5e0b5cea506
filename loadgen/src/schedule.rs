//! Schedules of intended send times: the arrival process (constant, Poisson, gamma) and the rate
//! over time (fixed, or a ramp of steps). Latency is measured from these intended times.

use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, Exp, Gamma};
use std::time::Duration;

/// The highest rate (req/s) an open loop may ask for. It is ~21× the most loadgen has sent
/// (479,945 req/s over 8 cores of the 16-core host, near the 8-core server's ceiling), so no real run is
/// refused; it bounds the work that grows with the asked rate whatever is sent: every pacer
/// draws every arrival of the schedule, and a backlog left unsent at the end is counted one
/// arrival at a time (~0.25 s a second of run at this rate, on the 2-core VM).
pub const MAX_RATE: f64 = 10_000_000.0;

/// Inter-arrival distribution.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arrival {
    /// Exactly 1/rate apart.
    Constant,
    /// Exponential gaps (coefficient of variation 1).
    Poisson,
    /// Gamma gaps with squared coefficient of variation `burstiness` (1 = Poisson, >1 = burstier,
    /// <1 = smoother), mean 1/rate.
    Gamma(f64),
}

impl Arrival {
    /// Parses `constant`, `poisson`, `gamma:<burstiness>`.
    pub fn parse(s: &str) -> Result<Arrival, String> {
        match s.trim() {
            "constant" => Ok(Arrival::Constant),
            "poisson" => Ok(Arrival::Poisson),
            g if g.starts_with("gamma:") => {
                let b: f64 = g[6..]
                    .parse()
                    .map_err(|_| format!("`{g}`: burstiness must be a number, e.g. gamma:2"))?;
                if !(b > 0.0 && b <= 100.0) {
                    return Err(format!("`{g}`: burstiness must be in (0, 100]"));
                }
                Ok(Arrival::Gamma(b))
            }
            other => Err(format!(
                "unknown arrival `{other}`; use constant, poisson or gamma:<burstiness>"
            )),
        }
    }
}

/// Offered rate over time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rate {
    /// One rate throughout.
    Fixed(f64),
    /// `start:end:step/every`: starts at `start`, moves by `step` every `every`, stops at `end`.
    Ramp {
        /// First rate.
        start: f64,
        /// Last rate (held once reached).
        end: f64,
        /// Change per step (sign follows end − start).
        step: f64,
        /// Length of each step.
        every: Duration,
    },
}

impl Rate {
    /// Parses a ramp `100:800:100/10s`.
    pub fn parse_ramp(s: &str) -> Result<Rate, String> {
        let err =
            || format!("`{s}` is not a ramp; write start:end:step/every, e.g. 100:800:100/10s");
        let (nums, every) = s.split_once('/').ok_or_else(err)?;
        let v: Vec<f64> = nums
            .split(':')
            .map(|x| x.trim().parse::<f64>())
            .collect::<Result<_, _>>()
            .map_err(|_| err())?;
        if v.len() != 3 || v.iter().any(|x| !x.is_finite() || *x <= 0.0) {
            return Err(err());
        }
        let every = crate::slo::parse_latency(every).map_err(|e| format!("`{s}`: {e}"))?;
        if every.is_zero() {
            return Err(err());
        }
        Ok(Rate::Ramp {
            start: v[0],
            end: v[1],
            step: v[2],
            every,
        })
    }

    /// The highest rate it asks for (a ramp's start or end).
    pub fn peak(&self) -> f64 {
        match *self {
            Rate::Fixed(r) => r,
            Rate::Ramp { start, end, .. } => start.max(end),
        }
    }

    /// Refuses a rate whose peak is above [`MAX_RATE`], saying what was asked.
    pub fn within_limit(&self) -> Result<(), String> {
        if self.peak() > MAX_RATE {
            return Err(format!(
                "an open loop may ask at most {MAX_RATE} req/s (this asks {}): far above what one host sends over HTTP/1.1",
                self.peak()
            ));
        }
        Ok(())
    }

    /// The rate at `t` since the start.
    pub fn at(&self, t: Duration) -> f64 {
        match *self {
            Rate::Fixed(r) => r,
            Rate::Ramp {
                start,
                end,
                step,
                every,
            } => {
                let k = (t.as_secs_f64() / every.as_secs_f64()).floor();
                if end >= start {
                    (start + k * step).min(end)
                } else {
                    (start - k * step).max(end)
                }
            }
        }
    }
}

/// A seeded generator of intended send offsets from the start of the run.
pub struct Schedule {
    arrival: Arrival,
    rate: Rate,
    rng: StdRng,
    t: f64,
}

impl Schedule {
    /// A schedule; the same seed gives the same times.
    pub fn new(arrival: Arrival, rate: Rate, seed: u64) -> Self {
        Schedule {
            arrival,
            rate,
            rng: StdRng::seed_from_u64(seed),
            t: 0.0,
        }
    }

    /// The next intended offset.
    pub fn next_offset(&mut self) -> Duration {
        let r = self.rate.at(Duration::from_secs_f64(self.t)).max(1e-9);
        let gap = match self.arrival {
            Arrival::Constant => 1.0 / r,
            Arrival::Poisson => Exp::new(r).expect("rate > 0").sample(&mut self.rng),
            Arrival::Gamma(b) => Gamma::new(1.0 / b, b / r)
                .expect("shape, scale > 0")
                .sample(&mut self.rng),
        };
        let at = self.t;
        self.t += gap;
        Duration::from_secs_f64(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gaps(arrival: Arrival, n: usize) -> (f64, f64) {
        let mut s = Schedule::new(arrival, Rate::Fixed(1000.0), 42);
        let mut last = s.next_offset().as_secs_f64();
        let g: Vec<f64> = (0..n)
            .map(|_| {
                let t = s.next_offset().as_secs_f64();
                let d = t - last;
                last = t;
                d
            })
            .collect();
        let mean = g.iter().sum::<f64>() / n as f64;
        let var = g.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
        (mean, var.sqrt() / mean)
    }

    #[test]
    fn poisson_and_gamma_have_the_right_mean_and_cv_over_10k_arrivals() {
        for (arrival, cv) in [
            (Arrival::Poisson, 1.0),
            (Arrival::Gamma(4.0), 2.0),
            (Arrival::Gamma(0.25), 0.5),
        ] {
            let (mean, got) = gaps(arrival, 10_000);
            assert!(
                (mean - 1e-3).abs() / 1e-3 < 0.05,
                "{arrival:?}: mean {mean}"
            );
            assert!(
                (got - cv).abs() / cv < 0.05,
                "{arrival:?}: cv {got}, want {cv}"
            );
        }
        let (mean, cv) = gaps(Arrival::Constant, 1000);
        assert!((mean - 1e-3).abs() < 1e-9 && cv < 1e-6);
    }

    #[test]
    fn ramps_step_and_hold() {
        let r = Rate::parse_ramp("100:800:100/10s").unwrap();
        assert_eq!(r.at(Duration::from_secs(0)), 100.0);
        assert_eq!(r.at(Duration::from_secs(25)), 300.0);
        assert_eq!(r.at(Duration::from_secs(500)), 800.0);
        let down = Rate::parse_ramp("50:10:20/1s").unwrap();
        assert_eq!(down.at(Duration::from_secs(5)), 10.0);
        assert!(Rate::parse_ramp("100:800/10s").is_err());
        assert!(Arrival::parse("gamma:x")
            .unwrap_err()
            .contains("burstiness"));
        assert_eq!(Arrival::parse("gamma:2").unwrap(), Arrival::Gamma(2.0));
    }
}
