//! Offline replay of strategies on a stored exhaustive grid: the search-efficiency benchmark.
//!
//! A grid search journal (`tuner search --strategy grid` with a budget that covers the whole grid)
//! is the stored data. Each strategy is then run against a lookup table instead of the server:
//! its points are snapped to the nearest grid point, and we count the distinct points it measures
//! before one reaches ≥ `fraction` of the grid's best sustainable rate. Identical data for every
//! strategy and seed, so the comparison is about the strategies, not the machine's noise.

use crate::journal::{Header, Trial};
use crate::space::{key, Knobs};
use crate::strategy::{self, grid_points, levels_for, Evaluator, Strategy};
use serde::Serialize;
use std::collections::{HashMap, HashSet};

/// Joins the journals of one grid measured in shards (`tuner search --shard K/N`) into one
/// header and trial list. The shards must agree on everything that defines the grid (space,
/// targets, budget, probe settings, workload); a point measured twice keeps its first result.
pub fn merge_shards(parts: Vec<(Header, Vec<Trial>)>) -> Result<(Header, Vec<Trial>), String> {
    let mut it = parts.into_iter();
    let (mut header, mut trials) = it.next().ok_or("no journal given")?;
    let mut seen: HashSet<String> = trials.iter().map(|t| t.key.clone()).collect();
    for (h, t) in it {
        let same = h.space == header.space
            && h.targets == header.targets
            && h.budget == header.budget
            && h.probe == header.probe
            && h.workload == header.workload;
        if !same {
            return Err(format!(
                "search {} does not measure the same grid as {} (space, targets, budget, probe \
                 settings and workload must agree)",
                h.search_id, header.search_id
            ));
        }
        header.search_id = format!("{}+{}", header.search_id, h.search_id);
        for tr in t {
            if seen.insert(tr.key.clone()) {
                trials.push(tr);
            }
        }
    }
    header.shard = None;
    Ok((header, trials))
}

/// A stored grid: every point's sustainable rate.
pub struct Grid {
    /// The search header (space, budget → levels).
    pub header: Header,
    levels: Vec<Vec<f64>>,
    table: HashMap<String, f64>,
}

impl Grid {
    /// Builds the lookup from a grid search's journal; errors if points are missing.
    pub fn from_journal(header: Header, trials: &[Trial]) -> Result<Grid, String> {
        // Levels of the stored grid: the distinct values its trials took on the first axis
        // (a grid strategy visits every level of every axis), never more than the budget allows.
        let first = header
            .space
            .knobs
            .keys()
            .next()
            .cloned()
            .unwrap_or_default();
        let distinct: HashSet<String> = trials
            .iter()
            .filter_map(|t| t.knobs.get(&first).map(|v| v.to_string()))
            .collect();
        let n = distinct
            .len()
            .clamp(2, levels_for(header.budget, header.space.dims()));
        let levels = header.space.grid_levels(n);
        let table: HashMap<String, f64> = trials
            .iter()
            .map(|t| (t.key.clone(), t.result.sustainable_rps))
            .collect();
        let want = grid_points(&header.space, n);
        let missing = want
            .iter()
            .filter(|p| !table.contains_key(&key(&header.space.decode(p))))
            .count();
        if missing > 0 {
            return Err(format!(
                "the journal covers {} of the grid's {} points; finish it with --resume",
                want.len() - missing,
                want.len()
            ));
        }
        Ok(Grid {
            header,
            levels,
            table,
        })
    }

    /// Points in the grid.
    pub fn size(&self) -> usize {
        self.levels.iter().map(|l| l.len()).product()
    }

    /// The best rate in the grid.
    pub fn best(&self) -> f64 {
        self.table.values().cloned().fold(0.0, f64::max)
    }

    fn snap(&self, k: &Knobs) -> Knobs {
        let u = self.header.space.encode(k);
        let snapped: Vec<f64> = u
            .iter()
            .zip(&self.levels)
            .map(|(x, lv)| {
                *lv.iter()
                    .min_by(|a, b| (*a - x).abs().total_cmp(&(*b - x).abs()))
                    .expect("levels are non-empty")
            })
            .collect();
        self.header.space.decode(&snapped)
    }
}

struct Offline<'a> {
    grid: &'a Grid,
    goal: f64,
    seen: HashSet<String>,
    reached: Option<usize>,
    /// Rate of each distinct configuration, in the order first measured.
    trace: Vec<f64>,
}

impl Evaluator for Offline<'_> {
    fn eval(&mut self, knobs: &Knobs) -> Option<f64> {
        if self.reached.is_some() || self.seen.len() >= self.grid.size() {
            return None;
        }
        let k = key(&self.grid.snap(knobs));
        let rate = self.grid.table.get(&k).copied().unwrap_or(0.0);
        if self.seen.insert(k) {
            self.trace.push(rate);
            if rate >= self.goal {
                self.reached = Some(self.seen.len());
            }
        }
        Some(rate)
    }
}

/// One strategy's efficiency over several seeds.
#[derive(Debug, Clone, Serialize)]
pub struct Efficiency {
    /// Strategy name.
    pub strategy: String,
    /// Distinct trials to reach the goal, per seed (`None`: never reached).
    pub trials: Vec<Option<usize>>,
    /// Median over seeds (a seed that never reached counts as the grid size + 1).
    pub median_trials: f64,
    /// Median as a share of the grid size.
    pub median_fraction_of_grid: f64,
    /// Seed 0's sustainable rate per distinct trial until the goal (for the trace plot).
    pub trace_seed0: Vec<f64>,
}

/// Runs every strategy `seeds` times against the grid from the starting knobs `start`.
pub fn efficiency(grid: &Grid, start: &Knobs, fraction: f64, seeds: u64) -> Vec<Efficiency> {
    let goal = grid.best() * fraction;
    let size = grid.size();
    [
        Strategy::NelderMead,
        Strategy::Random,
        Strategy::Hill,
        Strategy::Grid,
    ]
    .into_iter()
    .map(|s| {
        let mut trace_seed0 = Vec::new();
        let trials: Vec<Option<usize>> = (0..seeds)
            .map(|seed| {
                let mut ev = Offline {
                    grid,
                    goal,
                    seen: HashSet::new(),
                    reached: None,
                    trace: Vec::new(),
                };
                // Nelder–Mead and hill climbing start from a random point for seeds > 0, so
                // the median is over starting points, not one lucky start.
                let from = if seed == 0 || matches!(s, Strategy::Random | Strategy::Grid) {
                    start.clone()
                } else {
                    random_start(grid, seed)
                };
                strategy::run(s, &grid.header.space, &from, size, seed, &mut ev);
                if seed == 0 {
                    trace_seed0 = std::mem::take(&mut ev.trace);
                }
                ev.reached
            })
            .collect();
        let mut v: Vec<f64> = trials
            .iter()
            .map(|t| t.map_or(size as f64 + 1.0, |x| x as f64))
            .collect();
        v.sort_by(f64::total_cmp);
        let median = if v.len() % 2 == 1 {
            v[v.len() / 2]
        } else {
            (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
        };
        Efficiency {
            strategy: format!("{s:?}"),
            trials,
            median_trials: median,
            median_fraction_of_grid: median / size as f64,
            trace_seed0,
        }
    })
    .collect()
}

fn random_start(grid: &Grid, seed: u64) -> Knobs {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5157);
    let u: Vec<f64> = (0..grid.header.space.dims())
        .map(|_| rng.random::<f64>())
        .collect();
    grid.snap(&grid.header.space.decode(&u))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::space::Space;
    use crate::trial::{result_of, Probe, ProbeSettings};

    #[test]
    fn replay_counts_trials_to_the_goal_on_a_known_grid() {
        let mut space = Space::default_space();
        space
            .knobs
            .retain(|k, _| k == "max_batch_size" || k == "batch_wait_timeout");
        let header = Header {
            shard: None,
            search_id: "g".into(),
            targets: vec![],
            space: space.clone(),
            strategy: "Grid".into(),
            budget: 64,
            seed: 0,
            probe: ProbeSettings::default(),
            workload: "embeddings".into(),
            started_unix_s: 0.0,
        };
        // One peak at the 6th batch level and 3rd wait level of an 8 × 8 grid.
        let trials: Vec<Trial> = grid_points(&space, 8)
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                let k = space.decode(&p);
                let (a, b) = ((p[0] * 7.0).round(), (p[1] * 7.0).round());
                let rate = 100.0 - 10.0 * ((a - 2.0).powi(2) + (b - 5.0).powi(2));
                let probe = Probe {
                    rate: rate.max(1.0),
                    pass: true,
                    reason: String::new(),
                    achieved_rps: 0.0,
                    p50: 0.0,
                    p95: 0.0,
                    p99: 0.0,
                    error_rate: 0.0,
                };
                Trial {
                    index: i,
                    key: key(&k),
                    knobs: k,
                    result: result_of(vec![probe]),
                    elapsed_s: 0.0,
                }
            })
            .collect();
        let grid = Grid::from_journal(header.clone(), &trials).unwrap();
        assert_eq!(grid.size(), 64);
        assert_eq!(grid.best(), 100.0);
        let start = space.from_profile(&profiles::Profile::default());
        let eff = efficiency(&grid, &start, 0.95, 5);
        assert_eq!(eff.len(), 4);
        for e in &eff {
            assert!(e.trials.iter().all(|t| t.is_some_and(|n| n <= 64)), "{e:?}");
        }
        let hill = eff.iter().find(|e| e.strategy == "Hill").unwrap();
        assert!(hill.median_trials < 40.0, "{hill:?}");
        assert!(Grid::from_journal(header.clone(), &trials[..10]).is_err());

        // The same grid measured in three shards: disjoint, together complete, merged back into
        // the same lookup; a shard of another grid is refused.
        struct Record(Vec<String>);
        impl Evaluator for Record {
            fn eval(&mut self, k: &Knobs) -> Option<f64> {
                self.0.push(key(k));
                Some(1.0)
            }
        }
        let mut parts = Vec::new();
        let mut all = HashSet::new();
        for k in 0..3 {
            let mut rec = Record(Vec::new());
            strategy::run_shard(
                Strategy::Grid,
                &space,
                &start,
                64,
                7,
                Some((k, 3)),
                &mut rec,
            );
            for p in &rec.0 {
                assert!(all.insert(p.clone()), "{p} measured by two shards");
            }
            let mine: Vec<Trial> = trials
                .iter()
                .filter(|t| rec.0.contains(&t.key))
                .cloned()
                .collect();
            let h = Header {
                search_id: format!("s{k}"),
                shard: Some([k, 3]),
                ..header.clone()
            };
            parts.push((h, mine));
        }
        assert_eq!(all.len(), 64);
        let (h, merged) = merge_shards(parts.clone()).unwrap();
        assert_eq!(h.search_id, "s0+s1+s2");
        let back = Grid::from_journal(h, &merged).unwrap();
        assert_eq!((back.size(), back.best()), (64, 100.0));
        parts[2].0.targets = vec!["p95<1s".into()];
        assert!(merge_shards(parts).unwrap_err().contains("s2"));
    }
}
