//! External servers through adapter files: every shipped adapter parses; the example server
//! (seed 001's llm_model design, `examples/llm_server/server.py`) is tuned end to end and its
//! tuned `.env` beats seed 001's "medium" values under the same target; a killed tuner leaves
//! no server behind.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use tuner::server::adapter::Adapter;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn example() -> PathBuf {
    repo().join("adapters/seed001-llm-example.toml")
}

#[test]
fn every_shipped_adapter_parses_renders_and_builds_its_workload() {
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(repo().join("adapters")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let a = Adapter::load(&path).unwrap_or_else(|e| panic!("{e}"));
        let space = a.space();
        assert!(space.check_shape().is_ok(), "{}", path.display());
        let knobs = space.decode(&space.encode(&a.defaults()));
        let (argv, env) = a.render(&knobs, 18_000);
        let all = format!("{argv:?} {env:?}");
        assert!(
            all.contains("18000"),
            "{}: port not passed: {all}",
            path.display()
        );
        assert!(
            !all.contains('{'),
            "{}: placeholder left: {all}",
            path.display()
        );
        let w = a
            .workload(&loadgen::workload::TextOptions::default())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(!w.bodies.is_empty() && w.path.starts_with('/'));
        seen.push(path.file_stem().unwrap().to_string_lossy().into_owned());
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            "seed001-llm-example",
            "seed004-siglip",
            "tei",
            "tgi",
            "vllm"
        ]
    );
}

/// Runs `tuner search --server ADAPTER` over `space` into `dir/NAME.*`; returns the
/// provenance's confirmed sustainable rate and the `.env` text.
fn tune(dir: &Path, name: &str, space: &str, budget: usize) -> (f64, String) {
    let space_file = dir.join(format!("{name}-space.toml"));
    std::fs::write(&space_file, space).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tuner"))
        .args(["search", "--server"])
        .arg(example())
        .args(["--target", "p95<500ms", "--strategy", "auto"])
        .args(["--budget", &budget.to_string(), "--time", "120s"])
        .args([
            "--probe",
            "1s",
            "--probe-warmup",
            "500ms",
            "--max-probes",
            "5",
        ])
        .args(["--leaders", "2", "--quiet"])
        .arg("--space")
        .arg(&space_file)
        .arg("--out")
        .arg(dir.join(format!("{name}.toml")))
        .arg("--journal-dir")
        .arg(dir.join("searches"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{name}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let prov: toml::Table =
        toml::from_str(&std::fs::read_to_string(dir.join(format!("{name}.toml"))).unwrap())
            .unwrap();
    let rate = prov["provenance"]["sustainable_rps"].as_float().unwrap();
    let env = std::fs::read_to_string(dir.join(format!("{name}.env"))).unwrap();
    (rate, env)
}

/// A space of one point: each knob pinned (min = max) to the value in a `.env` text.
fn pinned(env: &str) -> String {
    let a = Adapter::load(&example()).unwrap();
    let mut s = String::new();
    for line in env
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains('='))
    {
        let (k, v) = line.split_once('=').unwrap();
        let spec = &a.knobs[k];
        s.push_str(&format!("[{k}]\ntype = \"{}\"\n", spec.kind));
        if spec.kind == "duration" {
            // The app reads seconds.
            let us = (v.parse::<f64>().unwrap() * 1e6).round();
            s.push_str(&format!("min = \"{us}us\"\nmax = \"{us}us\"\n"));
        } else {
            s.push_str(&format!("min = {v}\nmax = {v}\n"));
        }
    }
    s
}

#[test]
fn the_tuned_env_beats_seed_001_medium_under_the_same_target() {
    let dir = tempfile::tempdir().unwrap();
    // The knobs that matter most on this host (the batch and its wait); the others keep the
    // app's defaults.
    let space = "[MAX_INFERENCE_BATCH_SIZE]\ntype = \"int\"\nmin = 1\nmax = 64\n\
                 [BATCH_WAIT_TIMEOUT]\ntype = \"duration\"\nmin = \"1ms\"\nmax = \"200ms\"\n";
    let (_, env) = tune(dir.path(), "tuned", space, 5);
    for var in ["MAX_INFERENCE_BATCH_SIZE=", "BATCH_WAIT_TIMEOUT=0."] {
        assert!(env.contains(var), "{env}");
    }
    // Both measured the same way: a one-point search of the tuned .env and of seed 001's
    // "medium" llm_model/.env, same target, same probes.
    let medium = "MAX_CONCURRENT_GENERATIONS=6\nMAX_INFERENCE_QUEUE_SIZE=1000\n\
                  MAX_INFERENCE_BATCH_SIZE=4\nBATCH_WAIT_TIMEOUT=0.08\n";
    let measure = |name: &str, env: &str| tune(dir.path(), name, &pinned(env), 1).0;
    let mut medium_rps = measure("medium", medium);
    let mut tuned_rps = measure("retuned", &env);
    eprintln!("seed 001 medium {medium_rps:.1} req/s, tuned {tuned_rps:.1} req/s\n{env}");
    if tuned_rps <= medium_rps {
        // One short search each is one sample: on a shared 2-core CI host a stall of a second
        // fails a 1 s probe far below capacity (seen once: the tuned env measured 29 req/s
        // where its repeats here read 128-256). A second look at both, best of two each, as
        // the tuner's own race re-measures before it decides; a worse env still loses.
        medium_rps = medium_rps.max(measure("medium-2", medium));
        tuned_rps = tuned_rps.max(measure("retuned-2", &env));
        eprintln!("second look: medium {medium_rps:.1} req/s, tuned {tuned_rps:.1} req/s");
    }
    assert!(
        tuned_rps > medium_rps,
        "tuned {tuned_rps:.1} req/s does not beat medium {medium_rps:.1} req/s:\n{env}"
    );
}

/// The example server's processes: python3 running its script.
fn example_servers() -> Vec<u32> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.contains(") Z "))
            .unwrap_or(true);
        if !zombie && String::from_utf8_lossy(&cmd).contains("llm_server/server.py") {
            found.push(pid);
        }
    }
    found
}

#[test]
fn a_killed_tuner_leaves_no_external_server_behind() {
    let dir = tempfile::tempdir().unwrap();
    let before = example_servers();
    let mut tuner = Command::new(env!("CARGO_BIN_EXE_tuner"))
        .args(["search", "--server"])
        .arg(example())
        .args(["--target", "p95<500ms", "--time", "120s", "--quiet"])
        .arg("--out")
        .arg(dir.path().join("t.toml"))
        .arg("--journal-dir")
        .arg(dir.path().join("searches"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let server = loop {
        let now: Vec<u32> = example_servers()
            .into_iter()
            .filter(|p| !before.contains(p))
            .collect();
        if let Some(&p) = now.first() {
            break p;
        }
        assert!(
            Instant::now() < deadline,
            "the tuner never started the server"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    // Let a trial begin, then kill the tuner outright (no chance to clean up).
    std::thread::sleep(Duration::from_secs(2));
    tuner.kill().unwrap();
    tuner.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while example_servers().contains(&server) {
        assert!(
            Instant::now() < deadline,
            "example server {server} outlived its killed tuner"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
