//! After the search: the winner among the leaders that noise cannot separate, and its
//! sustainable rate with an interval.
//!
//! A search's best rate is the maximum of noisy measurements, so it is biased upwards, and two
//! trials one lattice step apart are not distinguishable by one probe each (results/noise-cpu/:
//! near capacity a single 4 s probe's verdict is a coin toss). So the leaders (every trial within
//! the bisection tolerance of the best, up to a few) are **raced**: each is probed afresh at the
//! best rate, with the same pooled, sequentially extended verdicts as the trials; those that pass
//! stay, the one with most headroom (lowest mean margin to the targets) wins; when none passes the
//! rate steps down one lattice point and they race again. The winner is then **refined** by
//! bisecting the gap between its highest pass and the lowest failure above it (race or trial),
//! down to one lattice step. The reported rate is the highest lattice
//! point whose pooled verdict passed, and the interval runs from it to the lowest point above
//! whose verdict failed: each end established by repeated probes.
//!
//! [`Race`] is the decision logic alone (no I/O, tested without a server); the search drives it.

use crate::journal::Trial;
use crate::trial::{
    decided, lattice_index, lattice_rate, tolerance_steps, verdict, verdicts, Probe, Verdict,
};

/// The search's winner: the highest sustainable rate; among trials at the same lattice point
/// (common, since every probe sits on the lattice), the one whose passing probes at that rate
/// had the lowest p95, which leaves the most room under the target for production.
pub fn winner(trials: &[Trial]) -> Option<&Trial> {
    let top = trials
        .iter()
        .filter(|t| t.result.sustainable_rps > 0.0)
        .map(|t| lattice_index(t.result.sustainable_rps))
        .max();
    let Some(top) = top else {
        return trials.first();
    };
    trials
        .iter()
        .filter(|t| {
            t.result.sustainable_rps > 0.0 && lattice_index(t.result.sustainable_rps) == top
        })
        .min_by(|a, b| p95_at_sustainable(a).total_cmp(&p95_at_sustainable(b)))
}

/// p95 of the trial's passing probes at its sustainable rate (infinite when none passed).
fn p95_at_sustainable(t: &Trial) -> f64 {
    let at = lattice_index(t.result.sustainable_rps);
    t.result
        .probes
        .iter()
        .filter(|p| p.pass && lattice_index(p.rate) == at)
        .map(|p| p.p95)
        .fold(f64::INFINITY, f64::min)
}

/// Settings of a race.
#[derive(Debug, Clone, Copy)]
pub struct RaceSettings {
    /// Most leaders raced.
    pub leaders: usize,
    /// Most probes behind one verdict.
    pub repeats: usize,
    /// Probe length, seconds (scales the drift noise).
    pub probe_secs: f64,
    /// The trials' bisection tolerance: trials within it of the best are leaders.
    pub tolerance: f64,
    /// Lattice steps the race may go down before it gives up confirming.
    pub max_down: i64,
    /// Lattice steps the winner may climb above where the race started while no failure above
    /// it is known (a known failure bounds the bisection by itself).
    pub max_up: i64,
}

/// One leader in the race.
#[derive(Debug, Clone)]
struct Runner {
    /// Index of its trial in the search's trials.
    trial: usize,
    /// Race probes (each rate a lattice point).
    probes: Vec<Probe>,
    /// Lowest lattice point its trial failed above its sustainable rate.
    trial_failed: Option<i64>,
    /// Out of the race (failed at a level another leader passed).
    out: bool,
}

impl Runner {
    /// Its race probes at lattice point `level`.
    fn at(&self, level: i64) -> Vec<&Probe> {
        self.probes
            .iter()
            .filter(|p| lattice_index(p.rate) == level)
            .collect()
    }
}

/// What the race is doing.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    /// Every runner still in is measured at `level`.
    Racing,
    /// The winner (a runner index) is measured one step above the highest level it passed.
    Refining(usize),
    /// Finished.
    Done,
}

/// The race's state: which leader to probe at which rate next, and its outcome.
#[derive(Debug, Clone)]
pub struct Race {
    s: RaceSettings,
    runners: Vec<Runner>,
    /// Current lattice point.
    level: i64,
    /// Where the race started (the best trial's rate).
    top: i64,
    phase: Phase,
    /// Highest level the winner passed, once there is a winner.
    passed: Option<i64>,
}

/// One verdict of the race, for the provenance.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// Index of the trial (leader) measured.
    pub trial: usize,
    /// Rate, requests/s.
    pub rate: f64,
    /// Probes behind the verdict.
    pub probes: usize,
    /// Probes that passed on their own.
    pub passed: usize,
    /// The pooled verdict.
    pub verdict: Verdict,
}

/// The race's outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// Index of the winning trial.
    pub trial: usize,
    /// The winner's sustainable rate: the highest lattice point whose pooled verdict passed (or,
    /// when none did within `max_down` steps, the point below the last tried, unconfirmed).
    pub rate: f64,
    /// Lowest rate above it whose verdict failed (race or trial), if any.
    pub failed_above: Option<f64>,
    /// A pooled verdict passed at `rate`.
    pub confirmed: bool,
    /// Every verdict, in order.
    pub steps: Vec<Step>,
    /// The winner's probes at `rate` (empty when unconfirmed).
    pub probes: Vec<Probe>,
}

impl Race {
    /// A race among the leaders of `trials` (empty when no trial sustained anything).
    pub fn new(trials: &[Trial], s: RaceSettings) -> Option<Race> {
        let best = winner(trials)?;
        if best.result.sustainable_rps <= 0.0 {
            return None;
        }
        let top = lattice_index(best.result.sustainable_rps);
        let tied = tolerance_steps(s.tolerance);
        let mut leaders: Vec<&Trial> = trials
            .iter()
            .filter(|t| {
                t.result.sustainable_rps > 0.0
                    && lattice_index(t.result.sustainable_rps) >= top - tied
            })
            .collect();
        // The search's own winner first, then by rate and headroom.
        leaders.sort_by(|a, b| {
            (b.index == best.index)
                .cmp(&(a.index == best.index))
                .then(
                    b.result
                        .sustainable_rps
                        .total_cmp(&a.result.sustainable_rps),
                )
                .then(p95_at_sustainable(a).total_cmp(&p95_at_sustainable(b)))
        });
        leaders.truncate(s.leaders.max(1));
        let runners = leaders
            .iter()
            .map(|t| Runner {
                trial: trials.iter().position(|x| x.index == t.index).unwrap_or(0),
                probes: Vec::new(),
                trial_failed: t.result.failed_rps.map(lattice_index),
                out: false,
            })
            .collect();
        Some(Race {
            s,
            runners,
            level: top,
            top,
            phase: Phase::Racing,
            passed: None,
        })
    }

    /// The trials (indices into the search's trials) in the race.
    pub fn leaders(&self) -> Vec<usize> {
        self.runners.iter().map(|r| r.trial).collect()
    }

    /// Runner `runner`'s pooled verdict at `level` (uncertain while it has no probe there).
    fn verdict_of(&self, runner: usize, level: i64) -> Verdict {
        verdict(
            &self.runners[runner].at(level),
            self.s.repeats,
            self.s.probe_secs,
        )
    }

    /// The next measurement: (trial index, rate), or `None` when the race is over.
    pub fn next_probe(&mut self) -> Option<(usize, f64)> {
        loop {
            match self.phase {
                Phase::Done => return None,
                Phase::Racing => {
                    let live: Vec<usize> = (0..self.runners.len())
                        .filter(|&i| !self.runners[i].out)
                        .collect();
                    // Finish one runner's verdict before the next (fewer reconfigurations).
                    if let Some(&i) = live
                        .iter()
                        .find(|&&i| self.verdict_of(i, self.level) == Verdict::Uncertain)
                    {
                        return Some((self.runners[i].trial, lattice_rate(self.level)));
                    }
                    let passers: Vec<usize> = live
                        .iter()
                        .copied()
                        .filter(|&i| self.verdict_of(i, self.level) == Verdict::Pass)
                        .collect();
                    if passers.is_empty() {
                        if self.top - self.level >= self.s.max_down {
                            self.phase = Phase::Done;
                        }
                        self.level -= 1;
                        continue;
                    }
                    let headroom = |i: usize| {
                        let ps: Vec<f64> = self.runners[i]
                            .at(self.level)
                            .iter()
                            .filter_map(|p| p.margin)
                            .collect();
                        ps.iter().sum::<f64>() / ps.len().max(1) as f64
                    };
                    let w = passers
                        .iter()
                        .copied()
                        .min_by(|&a, &b| headroom(a).total_cmp(&headroom(b)))
                        .unwrap_or(passers[0]);
                    for (i, r) in self.runners.iter_mut().enumerate() {
                        r.out = i != w;
                    }
                    self.passed = Some(self.level);
                    self.phase = Phase::Refining(w);
                }
                Phase::Refining(w) => {
                    let passed = self.passed.unwrap_or(self.level);
                    // Bisect the gap between the highest pass and the lowest fail above it,
                    // however wide: a trial whose probe budget ran out mid-ladder (passed 64,
                    // failed 256) would otherwise be reported at a quarter of its rate. With
                    // no fail above, one bisection tolerance up, at most `max_up` steps above
                    // where the race started (nothing bounds that climb but the cap). Each
                    // verdict halves what is unknown, so the reported rate ends one lattice
                    // step (2.2%) below the failure.
                    let up = match self.failed_above(w, passed) {
                        Some(f) if f - passed <= 1 => None,
                        Some(f) => Some(passed + (f - passed) / 2),
                        None => Some(passed + tolerance_steps(self.s.tolerance))
                            .filter(|&u| u - self.top <= self.s.max_up),
                    };
                    let Some(up) = up else {
                        self.phase = Phase::Done;
                        continue;
                    };
                    match self.verdict_of(w, up) {
                        Verdict::Uncertain => {
                            return Some((self.runners[w].trial, lattice_rate(up)));
                        }
                        Verdict::Pass => self.passed = Some(up),
                        // Recorded: `failed_above` now finds it.
                        Verdict::Fail => {}
                    }
                }
            }
        }
    }

    /// Lowest lattice point above `level` where runner `w` failed (race or trial).
    fn failed_above(&self, w: usize, level: i64) -> Option<i64> {
        let r = &self.runners[w];
        verdicts(&r.probes, self.s.repeats, self.s.probe_secs)
            .into_iter()
            .filter(|&(l, v)| l > level && v == Verdict::Fail)
            .map(|(l, _)| l)
            .chain(r.trial_failed.filter(|&l| l > level))
            .min()
    }

    /// Records the probe measured for `next`'s (trial, rate).
    pub fn record(&mut self, trial: usize, probe: Probe) {
        if let Some(r) = self.runners.iter_mut().find(|r| r.trial == trial) {
            r.probes.push(probe);
        }
    }

    /// The outcome once [`Race::next_probe`] returned `None`.
    pub fn outcome(&self) -> Outcome {
        let mut steps = Vec::new();
        for r in &self.runners {
            for (l, v) in decided(&r.probes) {
                let at = r.at(l);
                steps.push(Step {
                    trial: r.trial,
                    rate: lattice_rate(l),
                    probes: at.len(),
                    passed: at.iter().filter(|p| p.pass).count(),
                    verdict: v,
                });
            }
        }
        let w = match self.phase {
            Phase::Refining(w) => w,
            _ => self.runners.iter().position(|r| !r.out).unwrap_or(0),
        };
        let (rate_level, confirmed) = match self.passed {
            Some(l) => (l, true),
            None => (self.level, false),
        };
        let probes = if confirmed {
            self.runners[w]
                .at(rate_level)
                .into_iter()
                .cloned()
                .collect()
        } else {
            Vec::new()
        };
        Outcome {
            trial: self.runners[w].trial,
            rate: lattice_rate(rate_level),
            failed_above: if confirmed {
                self.failed_above(w, rate_level).map(lattice_rate)
            } else {
                Some(lattice_rate(rate_level + 1))
            },
            confirmed,
            steps,
            probes,
        }
    }
}

impl Verdict {
    /// Lower-case name, as the provenance writes it.
    pub fn name(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Fail => "fail",
            Verdict::Uncertain => "uncertain",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::space::Knobs;
    use crate::trial::result_of;

    fn probe(rate: f64, drift: f64) -> Probe {
        Probe {
            rate,
            pass: drift <= 0.05,
            drift: Some([drift, 0.004]),
            margin: Some(0.2),
            p95: 0.3,
            ..Probe::default()
        }
    }

    fn trial(index: usize, pass: i64, fail: i64) -> Trial {
        Trial {
            index,
            key: format!("t{index}"),
            knobs: Knobs::new(),
            result: result_of(vec![
                probe(lattice_rate(pass), 0.0),
                probe(lattice_rate(fail), 0.3),
            ]),
            elapsed_s: 0.0,
        }
    }

    fn settings() -> RaceSettings {
        RaceSettings {
            leaders: 3,
            repeats: 3,
            probe_secs: 4.0,
            tolerance: 0.1,
            max_down: 8,
            max_up: 4,
        }
    }

    /// Runs a race where trial `t` truly sustains up to lattice point `cap[t]`, answering each
    /// probe with a clear verdict except at `fuzzy` points (a drift near the limit).
    fn run(trials: &[Trial], cap: &[i64], fuzzy: &[f64]) -> (Outcome, usize) {
        let mut race = Race::new(trials, settings()).unwrap();
        let mut n = 0;
        while let Some((t, rate)) = race.next_probe() {
            n += 1;
            assert!(n < 60, "race does not end");
            let l = lattice_index(rate);
            let drift = if l <= cap[t] { 0.0 } else { 0.3 };
            let drift = if fuzzy.contains(&rate) && n % 2 == 1 {
                0.06
            } else {
                drift
            };
            race.record(t, probe(rate, drift));
        }
        (race.outcome(), n)
    }

    fn passing(index: usize, passes: &[(f64, f64)]) -> Trial {
        let probes = passes
            .iter()
            .map(|&(rate, p95)| Probe {
                p95,
                ..probe(rate, 0.0)
            })
            .collect();
        Trial {
            index,
            key: format!("t{index}"),
            knobs: Knobs::new(),
            result: result_of(probes),
            elapsed_s: 0.0,
        }
    }

    #[test]
    fn the_winner_is_the_fastest_and_among_ties_the_one_with_most_latency_headroom() {
        assert!(winner(&[]).is_none());
        // A higher rate wins whatever its latency.
        let t = [passing(0, &[(100.0, 0.1)]), passing(1, &[(110.0, 3.9)])];
        assert_eq!(winner(&t).unwrap().index, 1);
        // Tied at one lattice point (up to the last bits): the lower p95 at that rate wins,
        // and a lower p95 at a lower probe rate of the same trial does not count.
        let r = lattice_rate(214);
        let t = [
            passing(0, &[(50.0, 0.01), (r, 2.5)]),
            passing(1, &[(r * (1.0 + 1e-12), 0.9)]),
            passing(2, &[(r, 1.8)]),
            passing(3, &[(95.0, 0.2)]),
        ];
        assert_eq!(winner(&t).unwrap().index, 1);
    }

    #[test]
    fn the_leader_that_holds_the_best_rate_wins_and_is_refined_up() {
        // Trial 0 read highest by luck (cap 100), trial 1 truly sustains 102 of the lattice;
        // trial 2 is far behind and not a leader.
        let trials = [trial(0, 106, 108), trial(1, 104, 106), trial(2, 90, 92)];
        let (o, _) = run(&trials, &[100, 102, 90], &[]);
        assert_eq!(o.trial, 1);
        assert!(o.confirmed);
        assert_eq!(lattice_index(o.rate), 102);
        assert_eq!(o.failed_above.map(lattice_index), Some(103));
        // Trial 2 was never measured.
        assert!(o.steps.iter().all(|s| s.trial != 2));
    }

    #[test]
    fn an_uncertain_verdict_is_repeated_before_the_race_moves_on() {
        let trials = [trial(0, 104, 106)];
        let fuzzy = [lattice_rate(104)];
        let (o, n) = run(&trials, &[104], &fuzzy);
        assert!(o.confirmed);
        assert_eq!(lattice_index(o.rate), 104);
        let at = o.steps.iter().find(|s| s.rate == fuzzy[0]).unwrap();
        assert!(at.probes >= 2, "{:?}", o.steps);
        // 104 repeated, then 105 tried (untested: the trial failed at 106).
        assert!(n >= 3);
        assert_eq!(o.failed_above.map(lattice_index), Some(105));
    }

    #[test]
    fn the_winner_is_refined_by_bisection_to_one_step_below_a_failure() {
        // The trial's bracket is the 10% tolerance wide (200 passed, 204 failed); the server
        // truly holds up to 202. The race confirms 200, then bisects: 202 passes, 203 fails.
        let trials = [trial(0, 200, 204)];
        let (o, n) = run(&trials, &[202], &[]);
        assert!(o.confirmed);
        assert_eq!(lattice_index(o.rate), 202);
        assert_eq!(o.failed_above.map(lattice_index), Some(203));
        assert_eq!(n, 3);
        // With no failure above, it bisects up from one tolerance above the start.
        let mut race = Race::new(&[passing(0, &[(lattice_rate(200), 0.3)])], settings()).unwrap();
        let mut rates = Vec::new();
        while let Some((t, rate)) = race.next_probe() {
            rates.push(lattice_index(rate));
            let drift = if lattice_index(rate) <= 201 { 0.0 } else { 0.3 };
            race.record(t, probe(rate, drift));
        }
        assert_eq!(rates, vec![200, 204, 202, 201]);
        assert_eq!(lattice_index(race.outcome().rate), 201);
    }

    #[test]
    fn a_trial_cut_short_mid_ladder_is_bisected_up_to_its_failure() {
        // The trial's probe budget ran out after 64 req/s passed and 256 failed (lattice 192
        // and 256); the server truly holds up to 250. The race confirms 192, then bisects the
        // whole gap rather than stopping `max_up` (4) steps above it.
        let trials = [trial(0, 192, 256)];
        let (o, n) = run(&trials, &[250], &[]);
        assert!(o.confirmed);
        assert_eq!(lattice_index(o.rate), 250);
        assert_eq!(o.failed_above.map(lattice_index), Some(251));
        // 192, then 224 240 248 252 250 251: one verdict per halving.
        assert_eq!(n, 7);
    }

    #[test]
    fn a_leader_that_never_passes_is_reported_unconfirmed_below_the_last_try() {
        let trials = [trial(0, 104, 106)];
        let (o, n) = run(&trials, &[0], &[]);
        assert!(!o.confirmed);
        // 104 down to 96 (max_down 8), then reported one below.
        assert_eq!(n, 9);
        assert_eq!(lattice_index(o.rate), 95);
        assert!(o.probes.is_empty());
    }
}
