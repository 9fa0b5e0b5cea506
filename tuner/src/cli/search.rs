//! `tuner search`: flags, the defaults they imply (generation or embeddings, which server), and
//! the printed outcome.

use super::{ctrl_c_flag, find_runtime, TextArgs};
use loadgen::slo::Target;
use std::path::PathBuf;
use tuner::search::{search, SearchError, SearchOptions, SearchOutcome, ServerSpec};
use tuner::space::Space;
use tuner::strategy::Strategy;
use tuner::trial::ProbeSettings;

#[derive(clap::Args)]
pub(crate) struct SearchArgs {
    /// A target that must hold, e.g. 'p95<4s', 'p99<250ms', 'error_rate<0.1%', 'throughput>50'.
    /// Repeat for several (all must hold). Without an error_rate target, error_rate<1% applies.
    #[arg(
        long = "target",
        env = "TUNER_TARGETS",
        value_delimiter = ',',
        required_unless_present = "resume"
    )]
    targets: Vec<String>,
    /// Search space TOML (a table per knob: type, min, max, scale, or choices). Default: the five
    /// batching knobs (see README).
    #[arg(long, env = "TUNER_SPACE")]
    space: Option<PathBuf>,
    /// Most trials (configurations measured).
    #[arg(long, env = "TUNER_BUDGET", default_value_t = 12)]
    budget: usize,
    /// Wall-clock budget for the trials, e.g. 8m; re-measuring the winner comes on top.
    #[arg(long, env = "TUNER_TIME", default_value = "7m")]
    time: String,
    /// Command that starts the server; `--addr 127.0.0.1:0` is added unless present.
    /// Default: the `runtime` binary next to this one, `serve`.
    #[arg(long, env = "TUNER_SPAWN", conflicts_with = "url")]
    spawn: Option<String>,
    /// Tune a server that is already running: batchtune's runtime by hot reload; any other
    /// server client-side only (the client's concurrency and rate, written as a .client.env).
    #[arg(long, env = "TUNER_URL")]
    url: Option<String>,
    /// Tune another HTTP server (a FastAPI app, vLLM, TGI, TEI) described by an adapter file:
    /// how to start it, its knobs (environment variables or flags), its workload. The tuner
    /// restarts it per trial and writes the tuned .env / .flags under its own names. See
    /// adapters/ and the README.
    #[arg(long, env = "TUNER_SERVER", conflicts_with_all = ["url", "spawn"])]
    server: Option<PathBuf>,
    /// Workload: embeddings, completions or chat (streamed generation: the generation space and
    /// model, token targets such as ttft_p95<2s), or a FILE.jsonl of request bodies [default:
    /// embeddings; with --server, the adapter's [workload]].
    #[arg(long, env = "TUNER_WORKLOAD")]
    workload: Option<String>,
    /// Strategy: auto (Nelder–Mead via argmin), grid, random, hill.
    #[arg(long, env = "TUNER_STRATEGY", default_value = "auto")]
    strategy: String,
    /// Where to write the tuned profile [default: profiles/tuned.toml; with --server
    /// profiles/tuned-ADAPTER.{env,flags,client.env,toml}; for a foreign --url
    /// profiles/tuned-client.{client.env,toml}].
    #[arg(long, env = "TUNER_OUT")]
    out: Option<PathBuf>,
    /// Continue the search with this id (its journal decides targets, space and strategy).
    #[arg(long, env = "TUNER_RESUME")]
    resume: Option<String>,
    /// Folder of search journals.
    #[arg(long, env = "TUNER_JOURNAL_DIR", default_value = "results/searches")]
    journal_dir: PathBuf,
    /// Measured seconds per rate probe.
    #[arg(long, env = "TUNER_PROBE", default_value = "4s")]
    probe: String,
    /// Warm-up per probe.
    #[arg(long, env = "TUNER_PROBE_WARMUP", default_value = "1s")]
    probe_warmup: String,
    /// Most probes per trial (repeated verdicts included).
    #[arg(long, env = "TUNER_MAX_PROBES", default_value_t = 10)]
    max_probes: usize,
    /// Highest rate a probe offers (requests/s); the search reports this when everything passes.
    #[arg(long, env = "TUNER_MAX_RATE", default_value_t = 100_000.0)]
    max_rate: f64,
    /// rate_limit in the output = this fraction of the sustainable rate (overload is shed as 429).
    #[arg(long, env = "TUNER_RATE_LIMIT_FRACTION", default_value_t = 0.9)]
    rate_limit_fraction: f64,
    /// Most probes behind one rate's verdict. A probe whose verdict is within the noise of a
    /// bound (latency drift near the 5%/s limit, a percentile within ~10% of its target) is
    /// repeated and the evidence pooled, up to this many; 1 lets every probe decide alone.
    #[arg(long, env = "TUNER_REPEATS", default_value_t = 3)]
    repeats: usize,
    /// Leaders raced after the search: the trials within the bisection tolerance of the best
    /// are probed afresh at the best rate (stepping down while none holds), the winner's rate
    /// is refined to one lattice step (2.2%) below a failure, and the profile gets its rate
    /// with an interval.
    #[arg(long, env = "TUNER_LEADERS", default_value_t = 3)]
    leaders: usize,
    /// Strategy seed.
    #[arg(long, env = "TUNER_SEED", default_value_t = 1)]
    seed: u64,
    #[command(flatten)]
    texts: TextArgs,
    /// Sends `Authorization: Bearer KEY`.
    #[arg(long, env = "TUNER_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// No progress output.
    #[arg(long, short, env = "TUNER_QUIET")]
    quiet: bool,
    /// K/N: measure only the grid points whose index is K mod N (with --strategy grid), so one
    /// grid can be split over several machines or core sets; `tuner replay ID1,ID2,…` merges the
    /// shards. A shard writes no profile.
    #[arg(long, env = "TUNER_SHARD")]
    shard: Option<String>,
}

/// `K/N` with N ≥ 1 and K < N.
fn parse_shard(s: &str) -> anyhow::Result<(usize, usize)> {
    let bad = || anyhow::anyhow!("--shard {s:?}: expected K/N with 0 ≤ K < N, e.g. 0/8");
    let (k, n) = s.split_once('/').ok_or_else(bad)?;
    let (k, n): (usize, usize) = (
        k.trim().parse().map_err(|_| bad())?,
        n.trim().parse().map_err(|_| bad())?,
    );
    if n == 0 || k >= n {
        return Err(bad());
    }
    Ok((k, n))
}

/// The model a generation search spawns when no --spawn or --url is given: the embedded
/// synthetic SmolLM2-135M (no download, no GPU).
const GENERATION_MODEL: &str = "synthetic:smollm2-135m";

/// Runs `tuner search`.
pub(crate) fn run(a: SearchArgs) -> anyhow::Result<()> {
    let dur = |flag: &str, v: &str| {
        profiles::parse_duration(v).map_err(|e| anyhow::anyhow!("--{flag}: {e}"))
    };
    for t in &a.targets {
        Target::parse(t).map_err(|e| anyhow::anyhow!("--target: {e}"))?;
    }
    let adapter = a
        .server
        .as_deref()
        .map(tuner::server::adapter::Adapter::load)
        .transpose()?;
    let space_text = a
        .space
        .as_ref()
        .map(|p| {
            std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("--space {}: {e}", p.display()))
        })
        .transpose()?;
    let space = match (&space_text, &adapter) {
        (Some(text), Some(ad)) => {
            // A narrower space over the adapter's own knobs.
            let s: Space = Space {
                knobs: toml::from_str(text).map_err(|e| anyhow::anyhow!("--space: {e}"))?,
            };
            s.check_shape()?;
            if let Some(k) = s.knobs.keys().find(|k| !ad.knobs.contains_key(*k)) {
                anyhow::bail!(
                    "--space: `{k}` is not a knob of {} (its knobs: {})",
                    ad.name,
                    ad.knobs.keys().cloned().collect::<Vec<_>>().join(", ")
                );
            }
            s
        }
        (Some(text), None) => Space::from_toml(text)?,
        (None, Some(ad)) => ad.space(),
        (None, None) => Space::default_space(),
    };
    let strategy = Strategy::parse(&a.strategy).map_err(anyhow::Error::msg)?;
    if !(a.rate_limit_fraction > 0.0 && a.rate_limit_fraction <= 1.0) {
        anyhow::bail!("--rate-limit-fraction must be in (0, 1]");
    }
    if a.budget == 0 {
        anyhow::bail!("--budget 0: a search needs at least 1 trial");
    }
    let shard = a.shard.as_deref().map(parse_shard).transpose()?;
    if shard.is_some() && strategy != Strategy::Grid {
        anyhow::bail!("--shard splits a grid: it needs --strategy grid");
    }
    let (workload, workload_spec) = match (&adapter, &a.workload) {
        (Some(_), Some(_)) => {
            anyhow::bail!("--workload and --server: the adapter's [workload] table decides")
        }
        (Some(ad), None) => (
            ad.workload(&a.texts.options()?)
                .map_err(|e| anyhow::anyhow!("{}: workload: {e}", ad.name))?,
            format!(
                "adapter {}",
                a.server
                    .as_deref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            ),
        ),
        (None, w) => {
            let spec = w.clone().unwrap_or_else(|| "embeddings".into());
            (a.texts.workload(&spec)?, spec)
        }
    };
    // Generation: requests take seconds, so the defaults change with the workload: the
    // generation space, the embedded generation model, probes long enough for several requests
    // per latency bound, and rates well below 1 request/s worth probing.
    let generation = workload.path.ends_with("/completions");
    let space = match (&a.space, generation, &adapter) {
        (None, true, None) => Space::generation_space(),
        _ => space,
    };
    let server = match (&adapter, &a.url, &a.spawn) {
        (Some(ad), _, _) => ServerSpec::External(Box::new(ad.clone())),
        (None, Some(u), _) => ServerSpec::Url(u.clone()),
        (None, None, Some(cmd)) => {
            ServerSpec::Spawn(cmd.split_whitespace().map(String::from).collect())
        }
        (None, None, None) => {
            let mut cmd = vec![find_runtime()?.display().to_string(), "serve".into()];
            if generation {
                cmd.extend(["--model".into(), GENERATION_MODEL.into()]);
            }
            ServerSpec::Spawn(cmd)
        }
    };
    let out = a.out.clone().unwrap_or_else(|| match &a.server {
        Some(f) => PathBuf::from(format!(
            "profiles/tuned-{}.toml",
            f.file_stem().unwrap_or_default().to_string_lossy()
        )),
        None => PathBuf::from("profiles/tuned.toml"),
    });
    let mut probe = ProbeSettings {
        duration: dur("probe", &a.probe)?,
        warmup: dur("probe-warmup", &a.probe_warmup)?,
        max_probes: a.max_probes.max(1),
        max_rate: a.max_rate,
        repeats: a.repeats.max(1),
        ..ProbeSettings::default()
    };
    if generation {
        let bound = a
            .targets
            .iter()
            .filter_map(|t| Target::parse(t).ok())
            .filter(|t| t.is_upper_bound() && t.metric != loadgen::slo::Metric::ErrorRate)
            .map(|t| t.value)
            .fold(0.0, f64::max);
        probe.duration = probe
            .duration
            .max(std::time::Duration::from_secs_f64((3.0 * bound).min(60.0)));
        probe.min_rate = 0.02;
        // Few enough clients that each request finishes inside the estimating run, unless the
        // server says how many sequences it batches (then that many fill it).
        probe.saturation_clients = 8;
        probe.saturation_fill = true;
        probe.saturation_secs = probe.duration.as_secs_f64();
    }
    let mut headers = Vec::new();
    if let Some(k) = &a.api_key {
        headers.push(("authorization".to_string(), format!("Bearer {k}")));
    }
    // First Ctrl-C: finish the current probe quickly and leave the journal consistent.
    let cancel = ctrl_c_flag();
    let out = search(
        SearchOptions {
            targets: a.targets.clone(),
            space,
            budget: a.budget,
            time: dur("time", &a.time)?,
            strategy,
            seed: a.seed,
            probe,
            workload_spec,
            workload,
            server,
            space_given: a.space.is_some(),
            out,
            journal_dir: a.journal_dir.clone(),
            resume: a.resume.clone(),
            rate_limit_fraction: a.rate_limit_fraction,
            leaders: a.leaders,
            quiet: a.quiet,
            headers,
            shard,
        },
        cancel,
    );
    match out {
        Ok(SearchOutcome {
            written,
            search_id,
            trials,
            ..
        }) if written.is_empty() => {
            println!(
                "search {search_id}: grid shard done, {} trials",
                trials.len()
            );
            Ok(())
        }
        Ok(SearchOutcome {
            profile,
            search_id,
            trials,
            best,
            best_rps,
            written,
            ..
        }) => {
            println!("search {search_id}: {} trials", trials.len());
            println!(
                "best: {}",
                best.iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
            let rate_limit = profile.as_ref().map(|p| p.rate_limit);
            let prov = profile.and_then(|p| p.provenance).unwrap_or_default();
            for line in outcome_lines(&prov, best_rps, rate_limit) {
                println!("{line}");
            }
            for w in written {
                println!("wrote {}", w.display());
            }
            Ok(())
        }
        Err(e @ SearchError::Interrupted { .. }) => {
            eprintln!("{e}");
            std::process::exit(130);
        }
        Err(e) => Err(e.into()),
    }
}

/// The closing lines of a search: the sustainable rate and how it was confirmed, from the
/// profile's provenance. An unconfirmed rate is the step below the last one that failed, never
/// measured: saying "sustained" or "confirmed by 0/0 probes" there would be a number nobody saw.
fn outcome_lines(
    prov: &std::collections::BTreeMap<String, toml::Value>,
    best_rps: f64,
    rate_limit: Option<f64>,
) -> Vec<String> {
    let confirmed = !matches!(
        prov.get("sustainable_rps_confirmed"),
        Some(toml::Value::Boolean(false))
    );
    let show = |v: Option<&toml::Value>| match v {
        Some(toml::Value::Float(x)) => format!("{x:.1}"),
        Some(other) => other.to_string().trim_matches('"').to_string(),
        None => "?".into(),
    };
    // The upper end is a rate where the winner failed, or a string ("not reached") when the
    // confirmation's climb ended on a pass: then no failure bounds the rate from above.
    let interval = match prov.get("sustainable_rps_interval") {
        Some(toml::Value::Array(i)) => Some((
            show(i.first()),
            matches!(i.get(1), Some(toml::Value::Float(_))).then(|| show(i.get(1))),
        )),
        _ => None,
    };
    let limit = rate_limit
        .map(|l| format!("; rate_limit set to {l:.1} req/s"))
        .unwrap_or_default();
    let mut out = Vec::new();
    if confirmed {
        out.push(format!("sustainable rate {best_rps:.1} req/s{limit}"));
        if let (Some(p95), Some(passed), Some(runs)) = (
            prov.get("p95_s"),
            prov.get("remeasured_passed"),
            prov.get("remeasured_runs"),
        ) {
            out.push(format!(
                "confirmed by {passed}/{runs} probes at that rate; median p95 {p95}s"
            ));
        }
        match interval {
            Some((lo, Some(hi))) => out.push(format!(
                "interval: sustained at {lo} req/s, not at {hi} req/s"
            )),
            Some((lo, None)) => out.push(format!(
                "interval: sustained at {lo} req/s; no rate above it failed (the confirmation \
                 climbs one tolerance above the race and stops there), so the limit may be higher"
            )),
            None => {}
        }
    } else {
        out.push(format!(
            "sustainable rate NOT confirmed: the winner missed the targets at every rate \
             re-measured, down to {}; {best_rps:.1} req/s, the next step below, was not \
             measured{limit}",
            interval
                .and_then(|(_, hi)| hi)
                .map_or_else(|| "?".to_string(), |hi| format!("{hi} req/s"))
        ));
        out.push(
            "the host may have slowed since the trials (compare the trial rates with the \
             re-measurements above); run the search again, or measure the profile at rates of \
             your choosing with `tuner compare --profiles FILE --rates ...`"
                .into(),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::outcome_lines;

    #[test]
    fn an_unconfirmed_rate_is_not_called_sustained_or_confirmed() {
        let prov: std::collections::BTreeMap<String, toml::Value> = toml::from_str(
            "sustainable_rps_confirmed = false\nsustainable_rps_interval = [66.8, 68.3]\n\
             remeasured_runs = 0\nremeasured_passed = 0\np95_s = 0.0\n",
        )
        .unwrap();
        let lines = outcome_lines(&prov, 66.8, Some(60.2)).join("\n");
        assert!(lines.contains("NOT confirmed"), "{lines}");
        assert!(lines.contains("down to 68.3 req/s"), "{lines}");
        assert!(!lines.contains("confirmed by 0/0"), "{lines}");
        assert!(!lines.contains("sustained at"), "{lines}");

        let prov: std::collections::BTreeMap<String, toml::Value> = toml::from_str(
            "sustainable_rps_confirmed = true\nsustainable_rps_interval = [79.5, 81.2]\n\
             remeasured_runs = 3\nremeasured_passed = 3\np95_s = 1.2\n",
        )
        .unwrap();
        let lines = outcome_lines(&prov, 79.5, Some(71.6)).join("\n");
        assert!(
            lines.contains("sustainable rate 79.5 req/s; rate_limit set to 71.6"),
            "{lines}"
        );
        assert!(lines.contains("confirmed by 3/3 probes"), "{lines}");
        assert!(
            lines.contains("interval: sustained at 79.5 req/s, not at 81.2 req/s"),
            "{lines}"
        );
    }

    #[test]
    fn a_rate_no_failure_bounds_is_not_given_a_made_up_upper_end() {
        // README command 1 on a fresh clone printed "not at not reached req/s" here.
        let prov: std::collections::BTreeMap<String, toml::Value> = toml::from_str(
            "sustainable_rps_confirmed = true
sustainable_rps_interval = [62.6, \"not reached\"]
\
             remeasured_runs = 1
remeasured_passed = 1
p95_s = 0.9656
",
        )
        .unwrap();
        let lines = outcome_lines(&prov, 62.6, Some(56.4)).join("\n");
        assert!(
            lines.contains("sustained at 62.6 req/s; no rate above it failed"),
            "{lines}"
        );
        assert!(!lines.contains("not at"), "{lines}");
    }
}
