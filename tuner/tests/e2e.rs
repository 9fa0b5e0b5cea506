//! End to end: a short search against the real runtime binary writes a profile that
//! `runtime validate` accepts and that meets its target when loadgen replays it.

use loadgen::schedule::{Arrival, Rate};
use loadgen::slo::Target;
use loadgen::workload::{TextOptions, Workload};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;
use tuner::search::{search, SearchError, SearchOptions, ServerSpec};
use tuner::space::Space;
use tuner::strategy::Strategy;
use tuner::trial::ProbeSettings;

/// `cargo test --workspace` builds the runtime binary beside this test's folder.
fn runtime_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let bin = dir.join("runtime");
    assert!(
        bin.is_file(),
        "{} missing: run `cargo test --workspace` (or `cargo build -p runtime`) first",
        bin.display()
    );
    bin
}

fn options(dir: &std::path::Path, budget: usize) -> SearchOptions {
    let profile = dir.join("start.toml");
    std::fs::write(&profile, "model = \"synthetic:tiny\"\n").unwrap();
    let mut space = Space::default_space();
    space
        .knobs
        .retain(|k, _| k == "max_batch_size" || k == "batch_wait_timeout");
    SearchOptions {
        targets: vec!["p95<500ms".into()],
        space,
        budget,
        time: Duration::from_secs(120),
        strategy: Strategy::NelderMead,
        seed: 1,
        probe: ProbeSettings {
            duration: Duration::from_millis(1200),
            warmup: Duration::from_millis(300),
            // Far below the tiny model's capacity: the test checks the plumbing, not this
            // machine's speed, so it does not flake on a busy CI host.
            max_rate: 100.0,
            max_probes: 4,
            ..ProbeSettings::default()
        },
        workload_spec: "embeddings".into(),
        workload: Workload::from_spec("embeddings", &TextOptions::default()).unwrap(),
        space_given: true,
        server: ServerSpec::Spawn(vec![
            runtime_bin().display().to_string(),
            "serve".into(),
            "--profile".into(),
            profile.display().to_string(),
        ]),
        out: dir.join("tuned.toml"),
        journal_dir: dir.join("searches"),
        resume: None,
        rate_limit_fraction: 0.9,
        leaders: 2,
        quiet: true,
        headers: vec![],
        shard: None,
    }
}

#[test]
fn short_search_writes_a_valid_profile_that_meets_its_target() {
    let dir = tempfile::tempdir().unwrap();
    let out = search(options(dir.path(), 2), Arc::new(AtomicBool::new(false))).unwrap();
    assert_eq!(out.trials.len(), 2);
    assert!(out.best_rps > 0.0);

    let v = Command::new(runtime_bin())
        .arg("validate")
        .arg(&out.out)
        .output()
        .unwrap();
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stdout));
    let text = std::fs::read_to_string(&out.out).unwrap();
    assert!(
        text.contains("[provenance]")
            && text.contains("sustainable_rps")
            && text.contains("git_revision"),
        "{text}"
    );
    let p = profiles::Profile::load(&out.out).unwrap();
    assert!((p.rate_limit - 0.9 * out.best_rps).abs() < 0.1);
    let prov = p.provenance.as_ref().unwrap();
    let rate = prov["sustainable_rps"].as_float().unwrap();

    // Serve the tuned profile and replay the recorded rate. Its rate limit (0.9 × the rate)
    // is lifted for the replay: it exists to shed overload, and would shed the replay itself.
    let mut served_profile = p.clone();
    served_profile.rate_limit = 0.0;
    let served = dir.path().join("served.toml");
    std::fs::write(&served, served_profile.to_toml_string()).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let cmd = vec![
            runtime_bin().display().to_string(),
            "serve".into(),
            "--profile".into(),
            served.display().to_string(),
        ];
        let mut t = tuner::server::Target::spawn(cmd).await.unwrap();
        let mut cfg = loadgen::Config::new(
            t.url.clone(),
            loadgen::Mode::Open {
                rate: Rate::Fixed(rate),
                arrival: Arrival::Poisson,
                max_in_flight: 10_000,
            },
            Workload::from_spec("embeddings", &TextOptions::default()).unwrap(),
        );
        cfg.duration = Duration::from_secs(3);
        cfg.warmup = Duration::from_millis(500);
        let r = loadgen::run(cfg).await.unwrap();
        let target = Target::parse("p95<500ms").unwrap();
        assert!(
            target.holds(&r),
            "replay at {rate}/s: p95 {}",
            r.latency.p95
        );
        assert_eq!(r.errors.len(), 0, "{:?}", r.errors);
        t.stop();
    });
}

#[test]
fn resume_after_an_interruption_repeats_no_finished_trial() {
    let dir = tempfile::tempdir().unwrap();
    // A budget of 1 stands in for a search killed after its first trial: the journal holds one
    // finished trial.
    let first = search(options(dir.path(), 1), Arc::new(AtomicBool::new(false))).unwrap();
    let journal = dir
        .path()
        .join("searches")
        .join(&first.search_id)
        .join("journal.jsonl");
    // Raise the budget in the header, as if the search had been killed at trial 1 of 3.
    let text =
        std::fs::read_to_string(&journal)
            .unwrap()
            .replacen("\"budget\":1", "\"budget\":3", 1);
    std::fs::write(&journal, text).unwrap();
    let mut o = options(dir.path(), 3);
    o.resume = Some(first.search_id.clone());
    let resumed = search(o, Arc::new(AtomicBool::new(false))).unwrap();
    assert_eq!(resumed.trials.len(), 3);
    assert_eq!(
        resumed.trials[0], first.trials[0],
        "the finished trial was not reused as is"
    );
    let keys: std::collections::HashSet<_> = resumed.trials.iter().map(|t| t.key.clone()).collect();
    assert_eq!(keys.len(), 3, "a trial was measured twice");
    let lines = std::fs::read_to_string(&journal)
        .unwrap()
        .lines()
        .filter(|l| l.contains("\"type\":\"trial\""))
        .count();
    assert_eq!(lines, 3);

    // A cancelled search says how to resume and leaves the journal as it was.
    let text =
        std::fs::read_to_string(&journal)
            .unwrap()
            .replacen("\"budget\":3", "\"budget\":5", 1);
    std::fs::write(&journal, text).unwrap();
    let mut o = options(dir.path(), 5);
    o.resume = Some(first.search_id.clone());
    match search(o, Arc::new(AtomicBool::new(true))) {
        Err(e @ SearchError::Interrupted { trials: 3, .. }) => {
            assert!(e.to_string().contains("--resume"))
        }
        other => panic!(
            "expected Interrupted after 3 trials, got {:?}",
            other.map(|o| o.trials.len())
        ),
    }
}

/// `tuner compare` end to end: two profiles of the tiny model, two low rates each, against the
/// real runtime; the store holds one record per run with the server's knobs, and the plots and
/// table name both profiles.
#[test]
fn compare_records_runs_and_draws_both_profiles() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("small.toml");
    let b = dir.path().join("large.toml");
    std::fs::write(&a, "model = \"synthetic:tiny\"\nmax_batch_size = 2\n").unwrap();
    std::fs::write(&b, "model = \"synthetic:tiny\"\nmax_batch_size = 16\n").unwrap();
    let out = dir.path().join("results/cmp");
    let opts = tuner::compare::CompareOptions {
        profiles: vec![a, b],
        rates: vec![10.0, 20.0],
        out_dir: out.clone(),
        runtime: runtime_bin(),
        duration: Duration::from_millis(1500),
        warmup: Duration::from_millis(300),
        repeat: 2,
        targets: vec![Target::parse("p95<2s").unwrap()],
        stop_when_saturated: true,
        workload: Workload::from_spec("embeddings", &TextOptions::default()).unwrap(),
        verbose: false,
    };
    let files = tuner::compare::compare(&opts, Arc::new(AtomicBool::new(false))).unwrap();
    let runs = results::store::read(&out.join("runs.parquet")).unwrap();
    assert_eq!(runs.len(), 2 * 2 * 2, "profiles × rates × repeats");
    let small: Vec<_> = runs.iter().filter(|r| r.label == "small").collect();
    assert_eq!(small.len(), 4);
    assert!(small
        .iter()
        .all(|r| r.knobs_json.contains("\"max_batch_size\":2") && r.ok > 0));
    assert!(runs.iter().all(|r| r.histogram().unwrap().len() >= r.ok));
    for name in [
        "latency-throughput.svg",
        "latency-throughput.png",
        "table.md",
    ] {
        assert!(
            files.iter().any(|f| f.ends_with(name)),
            "{name} not written: {files:?}"
        );
    }
    let table = std::fs::read_to_string(out.join("table.md")).unwrap();
    assert!(
        table.contains("| small |") && table.contains("| large |"),
        "{table}"
    );
    let svg = std::fs::read_to_string(out.join("latency-throughput.svg")).unwrap();
    assert!(svg.contains("small p95") && svg.contains("large p99"));
}

#[test]
fn a_generation_search_tunes_token_targets_and_records_them() {
    let dir = tempfile::tempdir().unwrap();
    // The embeddings options write their own start.toml; this test's goes beside it.
    let base = options(dir.path(), 2);
    let profile = dir.path().join("start-llm.toml");
    std::fs::write(&profile, "model = \"synthetic:llama-tiny\"\n").unwrap();
    let mut space = Space::generation_space();
    space
        .knobs
        .retain(|k, _| k == "max_batch_size" || k == "kv_cache_tokens");
    let o = TextOptions {
        output_tokens: loadgen::workload::Lengths::Fixed(16),
        ignore_eos: true,
        ..TextOptions::default()
    };
    let opts = SearchOptions {
        targets: vec!["ttft_p95<1s".into(), "p95<2s".into()],
        space,
        workload_spec: "chat".into(),
        workload: Workload::from_spec("chat", &o).unwrap(),
        server: ServerSpec::Spawn(vec![
            runtime_bin().display().to_string(),
            "serve".into(),
            "--profile".into(),
            profile.display().to_string(),
        ]),
        ..base
    };
    let out = match search(opts, Arc::new(AtomicBool::new(false))) {
        Ok(o) => o,
        Err(e) => {
            for f in std::fs::read_dir(dir.path().join("searches")).unwrap() {
                let j = f.unwrap().path().join("journal.jsonl");
                eprintln!("{}", std::fs::read_to_string(j).unwrap_or_default());
            }
            panic!("{e}");
        }
    };
    assert!(out.best_rps > 0.0);
    let text = std::fs::read_to_string(dir.path().join("tuned.toml")).unwrap();
    let p: toml::Value = toml::from_str(&text).unwrap();
    let prov = &p["provenance"];
    assert_eq!(p["model"].as_str(), Some("synthetic:llama-tiny"));
    // The profile's provenance speaks in token terms: measured TTFT within its target.
    let ttft = prov["ttft_p95_s"]
        .as_float()
        .expect("ttft in the provenance");
    assert!(ttft > 0.0 && ttft < 1.0, "{text}");
    assert!(prov["tpot_p50_s"].as_float().unwrap() > 0.0);
    assert!(prov["output_tokens_per_s"].as_float().unwrap() > 0.0);
    // Goodput counts requests meeting both per-request bounds: at most the achieved rate.
    assert!(prov["goodput_rps"].as_float().is_some());
}

/// The spawned servers of a tuner that is killed (SIGKILL: no Drop, no handler) die with it.
#[cfg(target_os = "linux")]
#[test]
fn a_killed_tuner_leaves_no_server_behind() {
    let dir = tempfile::tempdir().unwrap();
    let profile = dir.path().join("start.toml");
    std::fs::write(&profile, "model = \"synthetic:tiny\"\n").unwrap();
    let spawn = format!(
        "{} serve --profile {}",
        runtime_bin().display(),
        profile.display()
    );
    let mut tuner = Command::new(env!("CARGO_BIN_EXE_tuner"))
        .args([
            "search",
            "--target",
            "p95<500ms",
            "--time",
            "120s",
            "--spawn",
            &spawn,
        ])
        .arg("--out")
        .arg(dir.path().join("tuned.toml"))
        .arg("--journal-dir")
        .arg(dir.path().join("searches"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The tuner's children, from every one of its threads.
    let children = |pid: u32| -> Vec<u32> {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return vec![];
        };
        tasks
            .flatten()
            .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
            .flat_map(|s| {
                s.split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect::<Vec<u32>>()
            })
            .collect()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let server = loop {
        if let Some(&c) = children(tuner.id()).first() {
            break c;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the tuner never started a server"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    tuner.kill().unwrap();
    tuner.wait().unwrap();
    // Gone (or a zombie about to be reaped by init) within a few seconds.
    let alive = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while alive(server) {
        assert!(
            std::time::Instant::now() < deadline,
            "server {server} outlived its killed tuner"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn knobs_the_server_refuses_count_as_infeasible_and_the_search_goes_on() {
    // A token budget of 64 is below the runtime's max_input_tokens (512): PUT /config answers
    // 422. The grid's other point (8192) is valid; the search must measure it and win with it,
    // journaling the refused point with the server's reason (an H200 search once stopped here).
    let dir = tempfile::tempdir().unwrap();
    let mut o = options(dir.path(), 2);
    o.space =
        Space::from_toml("[max_batch_tokens]\ntype = \"int\"\nmin = 64\nmax = 8192\n").unwrap();
    o.strategy = Strategy::Grid;
    let out = search(o, Arc::new(AtomicBool::new(false))).unwrap();
    assert_eq!(out.trials.len(), 2);
    let refused: Vec<_> = out
        .trials
        .iter()
        .filter(|t| t.result.rejected.is_some())
        .collect();
    assert_eq!(refused.len(), 1, "{:?}", out.trials);
    let why = refused[0].result.rejected.as_deref().unwrap();
    assert!(
        why.contains("422") && why.contains("max_batch_tokens"),
        "{why}"
    );
    assert_eq!(refused[0].result.sustainable_rps, 0.0);
    assert_eq!(out.best["max_batch_tokens"].to_string(), "8192");
    assert!(out.best_rps > 0.0);
    let journal = dir
        .path()
        .join("searches")
        .join(&out.search_id)
        .join("journal.jsonl");
    let journal = std::fs::read_to_string(journal).unwrap();
    assert!(journal.contains("\"rejected\""), "{journal}");
}
