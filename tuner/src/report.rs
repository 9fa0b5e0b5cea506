//! `tuner report RUN_ID`: draws a finished (or interrupted) search from its journal: the trace
//! of sustainable rate per trial with the best so far, and a heatmap over batch size × wait
//! timeout (the best rate measured at each pair, whatever the other knobs were).

use crate::journal::{Journal, Trial};
use crate::space::Value;
use results::plot::{self, Grid};
use std::path::{Path, PathBuf};

fn numeric(v: &Value) -> f64 {
    match v {
        Value::Int(i) => *i as f64,
        Value::Float(f) => *f,
        Value::Text(t) => profiles::parse_duration(t)
            .map(|d| d.as_secs_f64())
            .unwrap_or(f64::NAN),
    }
}

fn label(v: &Value) -> String {
    match v {
        Value::Int(i) => i.to_string(),
        Value::Float(f) => format!("{f}"),
        Value::Text(t) => t.clone(),
    }
}

/// The heatmap grid of two knobs over a search's trials (best sustainable rate per cell).
pub fn grid_of(trials: &[Trial], x_knob: &str, y_knob: &str) -> Grid {
    let axis = |k: &str| {
        let mut vals: Vec<Value> = Vec::new();
        for t in trials {
            if let Some(v) = t.knobs.get(k) {
                if !vals.contains(v) {
                    vals.push(v.clone());
                }
            }
        }
        vals.sort_by(|a, b| numeric(a).total_cmp(&numeric(b)));
        vals
    };
    let (xs, ys) = (axis(x_knob), axis(y_knob));
    let mut values = vec![vec![None::<f64>; xs.len()]; ys.len()];
    for t in trials {
        let (Some(x), Some(y)) = (t.knobs.get(x_knob), t.knobs.get(y_knob)) else {
            continue;
        };
        let xi = xs.iter().position(|v| v == x).expect("collected above");
        let yi = ys.iter().position(|v| v == y).expect("collected above");
        let cell = &mut values[yi][xi];
        *cell = Some(cell.unwrap_or(0.0).max(t.result.sustainable_rps));
    }
    Grid {
        x_labels: xs.iter().map(label).collect(),
        y_labels: ys.iter().map(label).collect(),
        x_name: x_knob.into(),
        y_name: y_knob.into(),
        values,
    }
}

/// Draws `trace.{svg,png}` and `heatmap.{svg,png}` for search `id` into `out_dir`.
pub fn report(journal_dir: &Path, id: &str, out_dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let (header, trials) = Journal::read(journal_dir, id)?;
    if trials.is_empty() {
        anyhow::bail!("search {id} has no finished trial to draw");
    }
    let targets = header.targets.join(", ");
    let rates: Vec<f64> = trials.iter().map(|t| t.result.sustainable_rps).collect();
    let mut files = plot::search_trace(
        &out_dir.join("trace"),
        &format!("Search {id}: sustainable rate per trial ({targets})"),
        &[(header.strategy.clone(), rates)],
    )
    .map_err(anyhow::Error::msg)?;
    let grid = grid_of(&trials, "max_batch_size", "batch_wait_timeout");
    if !grid.x_labels.is_empty() && !grid.y_labels.is_empty() {
        files.extend(
            plot::heatmap(
                &out_dir.join("heatmap"),
                &format!("Search {id}: best sustainable rate (req/s) per batch size × wait"),
                &grid,
            )
            .map_err(anyhow::Error::msg)?,
        );
    }
    Ok(files)
}
