//! `tuner compare`: sweep several profiles over one grid of offered rates against the runtime,
//! record every run in a Parquet store, and draw the curves and a Markdown table.
//!
//! Each profile gets its own freshly started runtime (profiles may differ in restart-only knobs),
//! each rate an open-loop Poisson loadgen run. Every run is appended to the store as soon as it
//! ends, so an interrupted comparison keeps what it measured.

use crate::server::Target as Server;
use loadgen::schedule::{Arrival, Rate};
use loadgen::slo::Target;
use loadgen::workload::Workload;
use loadgen::{Config, Mode};
use results::host::{git_revision, host_cpu, host_gpu};
use results::record::{Context, RunRecord};
use results::stats::{self, Bootstrap};
use results::{plot, store};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// What to compare and how.
pub struct CompareOptions {
    /// Profile files, in legend order.
    pub profiles: Vec<PathBuf>,
    /// Offered rates, ascending.
    pub rates: Vec<f64>,
    /// Output folder (`results/<name>`): `runs.parquet`, plots, `table.md`.
    pub out_dir: PathBuf,
    /// The `runtime` binary.
    pub runtime: PathBuf,
    /// Measured time per run.
    pub duration: Duration,
    /// Warm-up per run.
    pub warmup: Duration,
    /// Runs per rate (≥ 2 gives confidence intervals).
    pub repeat: usize,
    /// Targets that define "sustainable" in the table (error_rate < 1% always applies).
    pub targets: Vec<Target>,
    /// Stop a profile's sweep after two consecutive saturated rates (achieved < 80% of offered or
    /// errors > 20%): the rest of the curve is a wall and costs time to draw.
    pub stop_when_saturated: bool,
    /// Request bodies.
    pub workload: Workload,
    /// Print one line per run.
    pub verbose: bool,
}

/// Parses `FROM:TO:STEP` (inclusive) or a comma list into ascending rates.
pub fn parse_rates(spec: &str) -> Result<Vec<f64>, String> {
    let bad = |why: &str| {
        format!("--rates `{spec}`: {why}; write FROM:TO:STEP (e.g. 10:200:10) or a list (10,20,50)")
    };
    let mut out: Vec<f64> = if spec.contains(':') {
        let p: Vec<f64> = spec
            .split(':')
            .map(|x| x.trim().parse::<f64>())
            .collect::<Result<_, _>>()
            .map_err(|_| bad("not numbers"))?;
        let [from, to, step] = p[..] else {
            return Err(bad("needs three parts"));
        };
        if !(from > 0.0 && to >= from && step > 0.0) {
            return Err(bad("needs 0 < FROM ≤ TO and STEP > 0"));
        }
        let n = ((to - from) / step + 1e-9).floor() as usize + 1;
        if n > 1000 {
            return Err(bad("more than 1000 rates"));
        }
        (0..n).map(|i| from + step * i as f64).collect()
    } else {
        spec.split(',')
            .map(|x| x.trim().parse::<f64>().map_err(|_| bad("not a number")))
            .collect::<Result<_, _>>()?
    };
    if out.is_empty() || out.iter().any(|r| !(r.is_finite() && *r > 0.0)) {
        return Err(bad("rates must be > 0"));
    }
    out.sort_by(f64::total_cmp);
    out.dedup();
    Ok(out)
}

/// Files matching `pattern`: a path whose file name may hold one `*` (no other wildcards), in
/// name order.
fn matching(pattern: &str) -> anyhow::Result<Vec<PathBuf>> {
    let p = Path::new(pattern);
    let dir = p
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = p
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| anyhow::anyhow!("--import `{pattern}`: no file name"))?;
    let Some((pre, post)) = name.split_once('*') else {
        return Ok(vec![p.to_path_buf()]);
    };
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| anyhow::anyhow!("--import `{pattern}`: {}: {e}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.len() >= pre.len() + post.len() && n.starts_with(pre) && n.ends_with(post)
        })
        .map(|e| e.path())
        .collect();
    out.sort();
    Ok(out)
}

/// Imports loadgen JSON reports measured elsewhere (e.g. on a lent GPU machine) into the store of
/// `out_dir`, one `LABEL=PATTERN` per profile (`*` allowed in the file name). The host facts are
/// unknown here, so they read `imported`.
pub fn import(specs: &[String], out_dir: &Path) -> anyhow::Result<usize> {
    let group = out_dir
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "compare".into());
    let mut records = Vec::new();
    for spec in specs {
        let (label, pattern) = spec.split_once('=').ok_or_else(|| {
            anyhow::anyhow!(
                "--import `{spec}`: write LABEL=PATH (a `*` may stand in the file name)"
            )
        })?;
        let files = matching(pattern)?;
        if files.is_empty() {
            anyhow::bail!("--import `{spec}`: no file matches");
        }
        for f in files {
            let text =
                std::fs::read_to_string(&f).map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?;
            let report: loadgen::Report = serde_json::from_str(&text)
                .map_err(|e| anyhow::anyhow!("{}: not a loadgen JSON report: {e}", f.display()))?;
            let cx = Context {
                group: group.clone(),
                label: label.to_string(),
                host_cpu: "imported".into(),
                host_gpu: "imported".into(),
                git_revision: "imported".into(),
                ..Context::default()
            };
            let id = format!(
                "{label}@{}",
                f.file_name().unwrap_or_default().to_string_lossy()
            );
            records.push(report.to_record(id, &cx));
        }
    }
    store::append(&out_dir.join("runs.parquet"), &records)?;
    Ok(records.len())
}

/// Label of a profile in legends and the store: its file stem.
pub fn label_of(p: &Path) -> String {
    p.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

/// Sweeps every profile and writes the store, plots and table. Returns the files written.
pub fn compare(o: &CompareOptions, cancel: Arc<AtomicBool>) -> anyhow::Result<Vec<PathBuf>> {
    let store_path = o.out_dir.join("runs.parquet");
    let group = o
        .out_dir
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "compare".into());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let (cpu, gpu, rev) = (host_cpu(), host_gpu(), git_revision());
    let targets_text = o
        .targets
        .iter()
        .map(|t| t.to_string())
        .collect::<Vec<_>>()
        .join(";");
    for profile in &o.profiles {
        if cancel.load(Ordering::Relaxed) {
            break;
        }
        let label = label_of(profile);
        let mut server = rt.block_on(Server::spawn(vec![
            o.runtime.display().to_string(),
            "serve".into(),
            "--profile".into(),
            profile.display().to_string(),
        ]))?;
        let config: BTreeMap<String, serde_json::Value> =
            serde_json::from_value(rt.block_on(server.get("/config"))?).unwrap_or_default();
        let text = |k: &str| match config.get(k) {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .map(|v| v.as_str().unwrap_or_default().to_string())
                .collect::<Vec<_>>()
                .join(","),
            Some(v) => v.to_string(),
            None => String::new(),
        };
        let cx = Context {
            group: group.clone(),
            label: label.clone(),
            host_cpu: cpu.clone(),
            host_gpu: gpu.clone(),
            git_revision: rev.clone(),
            model: text("model"),
            devices: text("devices"),
            knobs: config.clone(),
            targets: targets_text.clone(),
        };
        let mut saturated_in_a_row = 0;
        'rates: for &rate in &o.rates {
            let mut saturated = 0;
            for rep in 0..o.repeat.max(1) {
                if cancel.load(Ordering::Relaxed) {
                    break 'rates;
                }
                let mut cfg = Config::new(
                    &server.url,
                    Mode::Open {
                        rate: Rate::Fixed(rate),
                        arrival: Arrival::Poisson,
                        max_in_flight: 20_000,
                    },
                    o.workload.clone(),
                );
                cfg.duration = o.duration;
                cfg.warmup = o.warmup;
                cfg.seed = 1 + rep as u64;
                cfg.timeout = Duration::from_secs(60);
                cfg.cancel = Some(cancel.clone());
                let report = rt.block_on(loadgen::run(cfg))?;
                let rec = report.to_record(format!("{label}@{rate}#{rep}"), &cx);
                store::append(&store_path, std::slice::from_ref(&rec))?;
                if o.verbose {
                    eprintln!(
                        "{label:>18} rate {rate:>8.1}  achieved {:>8.1}  p50 {:>9}  p95 {:>9}  p99 {:>9}  errors {:.1}%",
                        rec.achieved_rps,
                        loadgen::slo::format_secs(rec.p50_s),
                        loadgen::slo::format_secs(rec.p95_s),
                        loadgen::slo::format_secs(rec.p99_s),
                        rec.error_rate * 100.0
                    );
                }
                if rec.achieved_rps < 0.8 * rate || rec.error_rate > 0.2 {
                    saturated += 1;
                }
            }
            saturated_in_a_row = if saturated * 2 > o.repeat.max(1) {
                saturated_in_a_row + 1
            } else {
                0
            };
            if o.stop_when_saturated && saturated_in_a_row >= 2 {
                if o.verbose {
                    eprintln!("{label:>18} saturated at two rates in a row: stopping its sweep");
                }
                break;
            }
        }
        server.stop();
    }
    let runs: Vec<RunRecord> = store::read(&store_path)?
        .into_iter()
        .filter(|r| r.group == group)
        .collect();
    let order: Vec<String> = o.profiles.iter().map(|p| label_of(p)).collect();
    draw(&runs, &order, &o.out_dir, &o.targets)
}

/// A decoded latency histogram (microseconds).
type Hist = hdrhistogram::Histogram<u64>;

/// Repeated runs at one rate, seen as one observation: percentiles from the merged histogram.
struct Merged {
    hist: hdrhistogram::Histogram<u64>,
    /// Merged TTFT and TPOT histograms, for token targets (streamed runs only).
    tokens: Option<(Hist, Hist)>,
    achieved: f64,
    errors: f64,
}

/// The merged TTFT and TPOT histograms of repeated streamed runs (`None` unless every run
/// streamed).
fn merged_tokens(runs: &[&RunRecord]) -> Option<(Hist, Hist)> {
    let pairs: Vec<(Hist, Hist)> = runs
        .iter()
        .map(|r| r.token_histograms())
        .collect::<Option<_>>()?;
    let ttft: Vec<&Hist> = pairs.iter().map(|p| &p.0).collect();
    let tpot: Vec<&Hist> = pairs.iter().map(|p| &p.1).collect();
    (!pairs.is_empty()).then(|| (stats::merge(&ttft), stats::merge(&tpot)))
}

impl loadgen::slo::Observed for Merged {
    fn latency_quantile(&self, q: f64) -> f64 {
        self.hist.value_at_quantile(q) as f64 / 1e6
    }
    fn latency_mean(&self) -> f64 {
        self.hist.mean() / 1e6
    }
    fn latency_max(&self) -> f64 {
        self.hist.max() as f64 / 1e6
    }
    fn error_rate(&self) -> f64 {
        self.errors
    }
    fn throughput(&self) -> f64 {
        self.achieved
    }
    fn token_quantile(&self, m: loadgen::slo::TokenMetric, q: f64) -> Option<f64> {
        use loadgen::slo::TokenMetric as T;
        let (ttft, tpot) = self.tokens.as_ref()?;
        let h = match m {
            T::Ttft => ttft,
            T::Tpot => tpot,
            // Per-gap and end-to-end token timings are not stored per run.
            _ => return None,
        };
        Some(h.value_at_quantile(q) as f64 / 1e6)
    }
}

/// A rate passes when errors stay under 1%, every target holds on the merged histogram, and the
/// server kept up: latency did not grow with schedule time (the runs' mean drift, the same test as
/// the tuner's probes, `loadgen::record::DriftFit::queue_growing`). Runs recorded before the drift
/// was measured fall back to "≥ 95% of the scheduled requests completed inside the run", which
/// counts what is normally in flight at the end as a shortfall and so reads low.
fn passes(
    runs: &[&RunRecord],
    merged: Hist,
    tokens: Option<(Hist, Hist)>,
    targets: &[Target],
) -> bool {
    let m = Merged {
        hist: merged,
        tokens,
        achieved: runs.iter().map(|r| r.achieved_rps).sum::<f64>() / runs.len() as f64,
        errors: runs.iter().map(|r| r.error_rate).fold(0.0, f64::max),
    };
    m.errors < 0.01 && keeps_up(runs) && targets.iter().all(|t| t.holds(&m))
}

/// The keeping-up half of [`passes`].
fn keeps_up(runs: &[&RunRecord]) -> bool {
    let fitted: Vec<&&RunRecord> = runs.iter().filter(|r| r.drift_slope.is_finite()).collect();
    if fitted.len() == runs.len() {
        let k = fitted.len() as f64;
        let fit = loadgen::record::DriftFit {
            slope: fitted.iter().map(|r| r.drift_slope).sum::<f64>() / k,
            stderr: fitted
                .iter()
                .map(|r| r.drift_stderr.powi(2))
                .sum::<f64>()
                .sqrt()
                / k,
            n: 0,
        };
        return !fit.queue_growing();
    }
    let mean =
        |f: fn(&RunRecord) -> f64| runs.iter().map(|r| f(r)).sum::<f64>() / runs.len() as f64;
    mean(|r| r.achieved_rps) >= 0.95 * mean(|r| r.scheduled as f64 / r.duration_s.max(1e-9))
}

/// Draws the latency–throughput chart, the percentile spectrum and the table from stored runs.
pub fn draw(
    runs: &[RunRecord],
    order: &[String],
    out_dir: &Path,
    targets: &[Target],
) -> anyhow::Result<Vec<PathBuf>> {
    let mut labels: Vec<String> = order
        .iter()
        .filter(|l| runs.iter().any(|r| &r.label == *l))
        .cloned()
        .collect();
    for l in store::labels(runs) {
        if !labels.contains(&l) {
            labels.push(l);
        }
    }
    let boot = Bootstrap::default();
    // Generation runs carry token histograms: they get TTFT/TPOT columns and charts.
    let generation = runs.iter().any(|r| r.token_histograms().is_some());
    let (mut ttft_curves, mut tpot_curves) = (Vec::new(), Vec::new());
    let mut curves = Vec::new();
    let mut table = String::new();
    let target_text = if targets.is_empty() {
        "errors < 1% and latency not growing over the run".to_string()
    } else {
        format!(
            "{} (and errors < 1%, latency not growing over the run)",
            targets
                .iter()
                .map(|t| t.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    table.push_str(&format!(
        "Sustainable = highest offered rate where {target_text}. Intervals: 95% bootstrap over \
         repeated runs (zero width with one run per rate); percentiles from merged histograms.\n\n\
         | profile | knobs | sustainable (req/s) | achieved there (req/s) | p50 | p95 | p99 |{} runs |\n\
         |---|---|---:|---:|---:|---:|---:|{}---:|\n",
        if generation {
            " TTFT p95 | TPOT p95 | output tokens/s |"
        } else {
            ""
        },
        if generation { "---:|---:|---:|" } else { "" }
    ));
    let mut best_hist: Vec<(String, hdrhistogram::Histogram<u64>, f64)> = Vec::new();
    for label in &labels {
        let mine = store::by_label(runs, label);
        let by_rate = store::by_rate(&mine);
        let mut pts = Vec::new();
        let (mut ttft_pts, mut tpot_pts) = (Vec::new(), Vec::new());
        // Per rate: TTFT p95, TPOT p95 and output tokens/s (the table's token columns).
        let mut token_cols: BTreeMap<u64, String> = BTreeMap::new();
        // Histograms are decoded once per rate and kept for the best rate's intervals.
        let mut best: Option<(f64, &Vec<&RunRecord>, Vec<Hist>)> = None;
        for (rate, rs) in &by_rate {
            let hists: Vec<_> = rs.iter().filter_map(|r| r.histogram().ok()).collect();
            let refs: Vec<_> = hists.iter().collect();
            if refs.is_empty() {
                continue;
            }
            let m = stats::merge(&refs);
            let q = |p: f64| m.value_at_quantile(p) as f64 / 1e6;
            pts.push((*rate, q(0.5), q(0.95), q(0.99)));
            let tokens = merged_tokens(rs);
            if let Some((ttft, tpot)) = &tokens {
                let tokens_per_s =
                    rs.iter().map(|r| r.output_tokens_per_s).sum::<f64>() / rs.len() as f64;
                let qs = |h: &Hist| {
                    let at = |p: f64| h.value_at_quantile(p) as f64 / 1e6;
                    (tokens_per_s, at(0.5), at(0.95), at(0.99))
                };
                ttft_pts.push(qs(ttft));
                tpot_pts.push(qs(tpot));
                token_cols.insert(
                    rate.to_bits(),
                    format!(
                        " {} | {} | {tokens_per_s:.0} |",
                        loadgen::slo::format_secs(qs(ttft).2),
                        loadgen::slo::format_secs(qs(tpot).2)
                    ),
                );
            }
            if passes(rs, m, tokens, targets) {
                best = Some((*rate, rs, hists));
            }
        }
        curves.push(plot::Curve {
            label: label.clone(),
            points: pts,
        });
        if !ttft_pts.is_empty() {
            // Achieved output tokens/s is the x axis: sort by it, not by offered rate.
            ttft_pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            tpot_pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            ttft_curves.push(plot::Curve {
                label: label.clone(),
                points: ttft_pts,
            });
            tpot_curves.push(plot::Curve {
                label: label.clone(),
                points: tpot_pts,
            });
        }
        let tokens_at = |rate: f64| match (generation, token_cols.get(&rate.to_bits())) {
            (false, _) => String::new(),
            (true, Some(c)) => c.clone(),
            (true, None) => " – | – | – |".into(),
        };
        let knobs = mine
            .first()
            .map(|r| short_knobs(&r.knobs_json))
            .unwrap_or_default();
        match best {
            Some((rate, rs, hists)) => {
                let refs: Vec<_> = hists.iter().collect();
                let ach =
                    stats::mean_ci(&rs.iter().map(|r| r.achieved_rps).collect::<Vec<_>>(), boot);
                let fmt = |c: stats::Ci| {
                    if c.n > 1 {
                        format!(
                            "{} [{}, {}]",
                            loadgen::slo::format_secs(c.estimate),
                            loadgen::slo::format_secs(c.lo),
                            loadgen::slo::format_secs(c.hi)
                        )
                    } else {
                        loadgen::slo::format_secs(c.estimate)
                    }
                };
                let ach_text = if ach.n > 1 {
                    format!("{:.1} [{:.1}, {:.1}]", ach.estimate, ach.lo, ach.hi)
                } else {
                    format!("{:.1}", ach.estimate)
                };
                table.push_str(&format!(
                    "| {label} | {knobs} | {rate:.1} | {ach_text} | {} | {} | {} |{} {} |\n",
                    fmt(stats::quantile_ci(&refs, 0.5, boot)),
                    fmt(stats::quantile_ci(&refs, 0.95, boot)),
                    fmt(stats::quantile_ci(&refs, 0.99, boot)),
                    tokens_at(rate),
                    mine.len()
                ));
                best_hist.push((label.clone(), stats::merge(&refs), rate));
            }
            None => table.push_str(&format!(
                "| {label} | {knobs} | none of the rates | – | – | – | – |{} {} |\n",
                if generation { " – | – | – |" } else { "" },
                mine.len()
            )),
        }
    }
    let mut files = Vec::new();
    files.extend(
        plot::latency_throughput(
            &out_dir.join("latency-throughput"),
            "Latency against offered rate (p50 thin, p95 medium, p99 thick)",
            &curves,
        )
        .map_err(anyhow::Error::msg)?,
    );
    for (stem, title, y, cs) in [
        (
            "ttft-throughput",
            "Time to first token against output tokens/s (p50 thin, p95 medium, p99 thick)",
            "time to first token (s)",
            &ttft_curves,
        ),
        (
            "tpot-throughput",
            "Time per output token against output tokens/s (p50 thin, p95 medium, p99 thick)",
            "time per output token (s)",
            &tpot_curves,
        ),
    ] {
        if !cs.is_empty() {
            files.extend(
                plot::latency_against(
                    &out_dir.join(stem),
                    title,
                    ("achieved output tokens/s", y),
                    cs,
                )
                .map_err(anyhow::Error::msg)?,
            );
        }
    }
    if !best_hist.is_empty() {
        let series: Vec<(String, &hdrhistogram::Histogram<u64>)> = best_hist
            .iter()
            .map(|(l, h, r)| (format!("{l} @ {r:.0} req/s"), h))
            .collect();
        files.extend(
            plot::percentile_spectrum(
                &out_dir.join("percentile-spectrum"),
                "Latency percentiles at each profile's sustainable rate",
                &series,
            )
            .map_err(anyhow::Error::msg)?,
        );
    }
    let md = out_dir.join("table.md");
    std::fs::write(&md, table)?;
    files.push(md);
    Ok(files)
}

/// The batching knobs of a stored knob object, compactly, for the table.
fn short_knobs(json: &str) -> String {
    let v: BTreeMap<String, serde_json::Value> = serde_json::from_str(json).unwrap_or_default();
    [
        ("max_batch_size", "batch"),
        ("batch_wait_timeout", "wait"),
        ("max_concurrent_batches", "conc"),
        ("max_queue_size", "queue"),
        ("max_batch_tokens", "prefill"),
        ("kv_cache_tokens", "kv"),
        ("scheduling", "sched"),
    ]
    .iter()
    .filter_map(|(k, short)| {
        v.get(*k).map(|x| {
            format!(
                "{short} {}",
                x.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| x.to_string())
            )
        })
    })
    .collect::<Vec<_>>()
    .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_specs_parse_or_point_at_the_problem() {
        assert_eq!(
            parse_rates("10:50:10").unwrap(),
            vec![10.0, 20.0, 30.0, 40.0, 50.0]
        );
        assert_eq!(parse_rates("5, 1,5").unwrap(), vec![1.0, 5.0]);
        assert_eq!(parse_rates("0.5:1:0.25").unwrap(), vec![0.5, 0.75, 1.0]);
        for bad in ["10:5:1", "10:20", "a,b", "0,5", "1:2000:1", "10:20:0"] {
            let e = parse_rates(bad).unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn import_patterns_match_one_star_in_the_file_name() {
        let dir = tempfile::tempdir().unwrap();
        for n in [
            "cmp-a-10.json",
            "cmp-a-20.json",
            "cmp-ab-10.json",
            "other.json",
        ] {
            std::fs::write(dir.path().join(n), "{}").unwrap();
        }
        let pat = format!("{}/cmp-a-*.json", dir.path().display());
        let names: Vec<String> = matching(&pat)
            .unwrap()
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["cmp-a-10.json", "cmp-a-20.json"]);
        let e = import(
            &[format!("x={}/other.json", dir.path().display())],
            dir.path(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("not a loadgen JSON report"), "{e}");
        assert!(import(&["no-equals".into()], dir.path()).is_err());
    }

    #[test]
    fn knobs_are_shortened_for_the_table() {
        let s = short_knobs(r#"{"max_batch_size":8,"batch_wait_timeout":"5ms","model":"x"}"#);
        assert_eq!(s, "batch 8, wait 5ms");
    }
}
