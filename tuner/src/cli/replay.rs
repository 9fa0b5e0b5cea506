//! `tuner replay`: search strategies replayed offline on a stored exhaustive grid.

use std::path::PathBuf;

#[derive(clap::Args)]
pub(crate) struct ReplayArgs {
    /// The grid search's id; several ids, comma-separated, for a grid measured in shards
    /// (`tuner search --shard K/N`). Several arguments: repeated passes over the same grid,
    /// combined point by point (geometric mean), with how well the passes agree reported.
    #[arg(required = true)]
    passes: Vec<String>,
    /// Folder of search journals.
    #[arg(long, default_value = "results/searches")]
    journal_dir: PathBuf,
    /// Seeds per strategy.
    #[arg(long, default_value_t = 10)]
    seeds: u64,
    /// Goal as a fraction of the grid's best sustainable rate.
    #[arg(long, default_value_t = 0.95)]
    fraction: f64,
    /// Output stem: writes STEM.json and STEM.md.
    #[arg(long, default_value = "results/search-efficiency")]
    out: String,
}

/// Runs `tuner replay`.
pub(crate) fn run(a: ReplayArgs) -> anyhow::Result<()> {
    use tuner::replay::{efficiency, uniform_baseline, Grid};
    let mut passes = Vec::new();
    for pass in &a.passes {
        let mut parts = Vec::new();
        for id in pass.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (_, header, trials) = tuner::journal::Journal::resume(&a.journal_dir, id)?;
            parts.push((header, trials));
        }
        passes.push(tuner::replay::merge_shards(parts).map_err(anyhow::Error::msg)?);
    }
    let (grid, agreement) = Grid::from_passes(passes).map_err(anyhow::Error::msg)?;
    let start = grid
        .header
        .space
        .from_profile(&profiles::Profile::default());
    let eff = efficiency(&grid, &start, a.fraction, a.seeds);
    let blind = uniform_baseline(&grid, a.fraction);
    // A sharded grid's id list is long; titles name the first shard and the count (the full
    // list stays in the JSON and in the replay command).
    let name = a
        .passes
        .iter()
        .map(|p| match p.split(',').count() {
            1 => p.clone(),
            n => format!("{} (+{} shards)", p.split(',').next().unwrap_or(""), n - 1),
        })
        .collect::<Vec<_>>()
        .join(" and ");
    let command = format!("tuner replay {}", a.passes.join(" "));
    let summary = serde_json::json!({
        "grid_search_id": a.passes.join(" "), "grid_size": grid.size(), "grid_best_rps": grid.best(),
        "goal_fraction": a.fraction, "seeds": a.seeds, "targets": grid.header.targets,
        "space": grid.header.space, "strategies": eff, "uniform_baseline": blind,
        "passes": agreement,
    });
    std::fs::write(
        format!("{}.json", a.out),
        serde_json::to_string_pretty(&summary)?,
    )?;
    // Repeated passes: say how far they agree, so a reader can tell signal from noise.
    let passes_line = if agreement.passes > 1 {
        let fmt = |v: &[f64]| {
            v.iter()
                .map(|x| format!("{x:.2}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!(
            " Each point's rate is the geometric mean of {} passes; later passes against the \
             first: rank correlation {}, median rate ratio {}.",
            agreement.passes,
            fmt(&agreement.rank_correlation),
            fmt(&agreement.median_ratio)
        )
    } else {
        String::new()
    };
    let mut md = format!(
        "# Search efficiency: trials to reach {:.0}% of the grid's best\n\nGrid {} ({} points, best {:.1} req/s, targets {}), \
         replayed offline with `{}`; median over {} seeds (Nelder-Mead and hill climbing start from the default \
         profile for seed 0 and from random grid points otherwise).\n\n{} of the {} points reach the goal; drawing grid points \
         uniformly without replacement needs {} trials (median; mean {:.1}), the yardstick below.{}\n\n\
         | strategy | median trials | share of grid | per seed |\n|---|---:|---:|---|\n",
        a.fraction * 100.0, name, grid.size(), grid.best(), grid.header.targets.join(" "), command, a.seeds,
        blind.within_goal, grid.size(), blind.median_trials, blind.mean_trials, passes_line
    );
    for e in &eff {
        let per: Vec<String> = e
            .trials
            .iter()
            .map(|t| t.map_or("never".into(), |n| n.to_string()))
            .collect();
        md += &format!(
            "| {} | {:.1} | {:.1}% | {} |\n",
            e.strategy,
            e.median_trials,
            e.median_fraction_of_grid * 100.0,
            per.join(" ")
        );
    }
    md += &format!(
        "| uniform draw (computed) | {} | {:.1}% | |\n",
        blind.median_trials,
        100.0 * blind.median_trials as f64 / grid.size() as f64
    );
    std::fs::write(format!("{}.md", a.out), &md)?;
    let traces: Vec<(String, Vec<f64>)> = eff
        .iter()
        .map(|e| (e.strategy.clone(), e.trace_seed0.clone()))
        .collect();
    results::plot::search_trace(
        &PathBuf::from(format!("{}-trace", a.out)),
        &format!(
            "Replay on grid {}: sustainable rate per trial until {:.0}% of the best (seed 0)",
            name,
            a.fraction * 100.0
        ),
        &traces,
    )
    .map_err(anyhow::Error::msg)?;
    print!("{md}");
    Ok(())
}
