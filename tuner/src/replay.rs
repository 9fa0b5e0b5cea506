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
        if !same_grid(&h, &header) {
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

/// Whether two journals measure the same grid: space, targets, budget, probe settings and
/// workload agree (ids, seeds and shards may differ).
fn same_grid(a: &Header, b: &Header) -> bool {
    a.space == b.space
        && a.targets == b.targets
        && a.budget == b.budget
        && a.probe == b.probe
        && a.workload == b.workload
}

/// How well repeated passes over one grid agree: is the grid's ranking signal or noise?
#[derive(Debug, Clone, Serialize)]
pub struct Agreement {
    /// Passes combined.
    pub passes: usize,
    /// Spearman rank correlation of each later pass with the first (1: same order).
    pub rank_correlation: Vec<f64>,
    /// Median over points of each later pass's rate divided by the first's (a host-speed
    /// difference between passes shows here, and the geometric mean is blind to it).
    pub median_ratio: Vec<f64>,
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

    /// One grid from several complete passes over it (each a journal, shards already merged):
    /// every point's rate is the geometric mean of its passes, which halves the variance of a
    /// single measurement at two passes and ignores a constant speed difference between the
    /// passes' hosts. Errors if the passes measure different grids or one is incomplete.
    pub fn from_passes(passes: Vec<(Header, Vec<Trial>)>) -> Result<(Grid, Agreement), String> {
        let mut grids: Vec<Grid> = Vec::new();
        for (h, t) in passes {
            if let Some(first) = grids.first() {
                if !same_grid(&h, &first.header) {
                    return Err(format!(
                        "pass {} does not measure the same grid as {} (space, targets, budget, \
                         probe settings and workload must agree)",
                        h.search_id, first.header.search_id
                    ));
                }
            }
            grids.push(Grid::from_journal(h, &t)?);
        }
        let mut it = grids.into_iter();
        let mut grid = it.next().ok_or("no pass given")?;
        let rest: Vec<Grid> = it.collect();
        let keys: Vec<String> = grid.table.keys().cloned().collect();
        let first: Vec<f64> = keys.iter().map(|k| grid.table[k]).collect();
        let mut agreement = Agreement {
            passes: rest.len() + 1,
            rank_correlation: Vec::new(),
            median_ratio: Vec::new(),
        };
        for g in &rest {
            let other: Vec<f64> = keys.iter().map(|k| g.table[k]).collect();
            agreement.rank_correlation.push(spearman(&first, &other));
            let ratios: Vec<f64> = first
                .iter()
                .zip(&other)
                .filter(|(a, _)| **a > 0.0)
                .map(|(a, b)| b / a)
                .collect();
            agreement.median_ratio.push(median(ratios));
        }
        // One pass is taken as measured: exp(ln(x)) is not always x, and a last-bit change
        // reorders the grid's tied rates, so a strategy would replay differently.
        for k in keys.iter().filter(|_| !rest.is_empty()) {
            let logs: f64 = std::iter::once(&grid)
                .chain(&rest)
                .map(|g| g.table[k].max(1e-9).ln())
                .sum();
            let mean = (logs / agreement.passes as f64).exp();
            grid.table
                .insert(k.clone(), if mean < 1e-6 { 0.0 } else { mean });
        }
        for g in &rest {
            grid.header.search_id = format!("{}; {}", grid.header.search_id, g.header.search_id);
        }
        Ok((grid, agreement))
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
        let median = median(
            trials
                .iter()
                .map(|t| t.map_or(size as f64 + 1.0, |x| x as f64))
                .collect(),
        );
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

/// What a blind draw achieves on a grid: the yardstick a strategy must beat to be worth running.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Baseline {
    /// Grid points at or above the goal.
    pub within_goal: usize,
    /// Median distinct trials to the first such point when grid points are drawn uniformly
    /// without replacement.
    pub median_trials: usize,
    /// Mean of the same, (N + 1) / (g + 1).
    pub mean_trials: f64,
}

/// The uniform-draw [`Baseline`] for reaching `fraction` of the grid's best. On a flat, noisy
/// grid the points that reach the goal are few and scattered by noise, and then no strategy can
/// do much better than this; printing it beside the strategies says how much room there was.
pub fn uniform_baseline(grid: &Grid, fraction: f64) -> Baseline {
    let goal = grid.best() * fraction;
    let g = grid.table.values().filter(|r| **r >= goal).count();
    baseline(grid.size(), g)
}

fn baseline(n: usize, g: usize) -> Baseline {
    // P(no good point in the first t draws) = Π_{i<t} (n − g − i) / (n − i).
    let mut miss = 1.0;
    let mut median = n;
    for t in 0..n {
        miss *= (n - g).saturating_sub(t) as f64 / (n - t) as f64;
        if miss <= 0.5 {
            median = t + 1;
            break;
        }
    }
    Baseline {
        within_goal: g,
        median_trials: median,
        mean_trials: (n + 1) as f64 / (g + 1) as f64,
    }
}

/// The median (mean of the middle two for an even count; NaN when empty).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Spearman's rank correlation (ties get their mean rank).
fn spearman(a: &[f64], b: &[f64]) -> f64 {
    fn ranks(v: &[f64]) -> Vec<f64> {
        let mut idx: Vec<usize> = (0..v.len()).collect();
        idx.sort_by(|i, j| v[*i].total_cmp(&v[*j]));
        let mut r = vec![0.0; v.len()];
        let mut i = 0;
        while i < idx.len() {
            let mut j = i;
            while j + 1 < idx.len() && v[idx[j + 1]] == v[idx[i]] {
                j += 1;
            }
            for k in &idx[i..=j] {
                r[*k] = (i + j) as f64 / 2.0;
            }
            i = j + 1;
        }
        r
    }
    let (ra, rb) = (ranks(a), ranks(b));
    let n = ra.len() as f64;
    let (ma, mb) = (ra.iter().sum::<f64>() / n, rb.iter().sum::<f64>() / n);
    let cov: f64 = ra.iter().zip(&rb).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = ra.iter().map(|x| (x - ma).powi(2)).sum();
    let vb: f64 = rb.iter().map(|y| (y - mb).powi(2)).sum();
    cov / (va * vb).sqrt()
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
    fn uniform_baseline_is_the_first_success_of_draws_without_replacement() {
        // 1 good point in 4: P(first draw) = 1/4, P(by the second) = 1 − 3/4 · 2/3 = 1/2.
        assert_eq!(
            baseline(4, 1),
            Baseline {
                within_goal: 1,
                median_trials: 2,
                mean_trials: 2.5
            }
        );
        assert_eq!(baseline(10, 10).median_trials, 1);
        let b = baseline(243, 11);
        assert!((b.mean_trials - 244.0 / 12.0).abs() < 1e-9);
        assert_eq!(b.median_trials, 15);
    }

    /// An 8 × 8 grid over batch size and wait with one peak (100 req/s at the 3rd batch level
    /// and 6th wait level), every rate multiplied by `scale`.
    fn known_grid(scale: f64) -> (Space, Header, Vec<Trial>) {
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
            time_s: None,
            server: None,
        };
        let trials: Vec<Trial> = grid_points(&space, 8)
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                let k = space.decode(&p);
                let (a, b) = ((p[0] * 7.0).round(), (p[1] * 7.0).round());
                let rate = 100.0 - 10.0 * ((a - 2.0).powi(2) + (b - 5.0).powi(2));
                let probe = Probe {
                    rate: rate.max(1.0) * scale,
                    pass: true,
                    ..Probe::default()
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
        (space, header, trials)
    }

    #[test]
    fn passes_combine_by_geometric_mean_and_report_their_agreement() {
        let (_, h1, t1) = known_grid(1.0);
        let (_, h2, t2) = known_grid(4.0);
        let h2 = Header {
            search_id: "g2".into(),
            ..h2
        };
        let (grid, agree) =
            Grid::from_passes(vec![(h1.clone(), t1.clone()), (h2.clone(), t2)]).unwrap();
        // A host twice as fast in every point: same order, ratio 4, geometric mean ×2.
        assert_eq!(agree.passes, 2);
        assert!((agree.rank_correlation[0] - 1.0).abs() < 1e-9, "{agree:?}");
        assert!((agree.median_ratio[0] - 4.0).abs() < 1e-9, "{agree:?}");
        assert!((grid.best() - 200.0).abs() < 1e-9);
        assert_eq!(grid.header.search_id, "g; g2");
        // The order reversed.
        let rates: Vec<f64> = t1.iter().map(|t| t.result.sustainable_rps).collect();
        let mut sorted = rates.clone();
        sorted.sort_by(f64::total_cmp);
        let mut by_rank = t1.clone();
        let mut order: Vec<usize> = (0..by_rank.len()).collect();
        order.sort_by(|a, b| rates[*a].total_cmp(&rates[*b]));
        for (pos, i) in order.iter().enumerate() {
            by_rank[*i].result.sustainable_rps = sorted[sorted.len() - 1 - pos];
        }
        let (_, agree) =
            Grid::from_passes(vec![(h1.clone(), t1.clone()), (h2.clone(), by_rank)]).unwrap();
        // Not −1: the grid's many tied rates (the clamped corners) are reordered too.
        assert!(agree.rank_correlation[0] < -0.5, "{agree:?}");
        assert!((spearman(&[1.0, 2.0, 3.0, 4.0], &[40.0, 30.0, 20.0, 10.0]) + 1.0).abs() < 1e-12);
        assert!((spearman(&[1.0, 1.0, 2.0], &[5.0, 5.0, 9.0]) - 1.0).abs() < 1e-12);
        // A pass of another grid, or an incomplete one, is refused by name.
        let other = Header {
            targets: vec!["p95<1s".into()],
            ..h2.clone()
        };
        let Err(err) = Grid::from_passes(vec![(h1.clone(), t1.clone()), (other, t1.clone())])
        else {
            panic!("a pass of another grid was combined");
        };
        assert!(err.contains("g2"), "{err}");
        assert!(Grid::from_passes(vec![(h1, t1.clone()), (h2, t1[..5].to_vec())]).is_err());
    }

    #[test]
    fn replay_counts_trials_to_the_goal_on_a_known_grid() {
        let (space, header, trials) = known_grid(1.0);
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
