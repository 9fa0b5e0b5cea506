//! Tests of the `runtime` binary itself: signals, profiles on disk.

mod common;

use common::*;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn validate_accepts_shipped_profiles_and_explains_bad_ones() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../profiles");
    let files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "toml") && p.file_name().unwrap() != "Cargo.toml"
        })
        .collect();
    assert!(files.len() >= 9);
    // Shipped profiles include GPU ones and ones naming a model folder: their rules hold
    // everywhere, whether they serve on this host is another question.
    let out = Command::new(env!("CARGO_BIN_EXE_runtime"))
        .args(["validate", "--rules-only"])
        .args(&files)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Without --rules-only: a missing model folder and (on a CPU build) a CUDA device are
    // refused, each naming the problem.
    let here = tempfile::tempdir().unwrap();
    let missing = here.path().join("missing.toml");
    std::fs::write(&missing, "model = \"/nonexistent/model-folder\"\n").unwrap();
    let gpu = here.path().join("gpu.toml");
    std::fs::write(&gpu, "devices = [\"cuda:0\"]\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_runtime"))
        .arg("validate")
        .args([&missing, &gpu])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("/nonexistent/model-folder"), "{text}");
    if !cfg!(feature = "cuda") {
        assert!(text.contains("cuda:0"), "{text}");
    }

    let bad = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        bad.path(),
        "max_batch_size = 0\nbatch_wait_timeout = \"20s\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_runtime"))
        .arg("validate")
        .arg(bad.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("max_batch_size = 0: must be between 1 and 4096"),
        "{text}"
    );
    assert!(
        text.contains("batch_wait_timeout = 20s: must be at most 10s"),
        "{text}"
    );
}

#[test]
fn cuda_device_is_refused_clearly_on_a_cpu_build() {
    let out = Command::new(env!("CARGO_BIN_EXE_runtime"))
        .args(["serve", "--addr", "127.0.0.1:0"])
        .env("BATCHTUNE_DEVICES", "cuda:0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cuda:0") && err.contains("--features cuda"),
        "{err}"
    );
}

#[test]
fn a_bad_profiler_window_is_refused_naming_what_is_wrong() {
    for (value, says) in [
        ("2000", "expected FIRST:COUNT"),
        ("x:3", "FIRST must be a step number"),
        ("10:0", "COUNT must be a number of steps, at least 1"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_runtime"))
            .args([
                "serve",
                "--addr",
                "127.0.0.1:0",
                "--cuda-profile-steps",
                value,
            ])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{value}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("--cuda-profile-steps") && err.contains(says),
            "{value}: {err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_with_requests_in_flight_loses_none() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_runtime"))
        .args(["serve", "--addr", "127.0.0.1:0"])
        .env("BATCHTUNE_MODEL", "synthetic:tiny")
        // Requests sit in the queue for 500ms, so SIGTERM lands while they are pending.
        .env("BATCH_WAIT_TIME_MS", "500")
        .env("BATCHTUNE_MAX_BATCH_SIZE", "64")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr: std::net::SocketAddr = line
        .trim()
        .trim_start_matches("listening on http://")
        .parse()
        .unwrap();
    let c = client();
    wait_ready(&c, addr).await;
    let tasks = embed_many(&c, addr, 20, "in flight");
    wait_queued(&c, addr, 20.0, Duration::from_secs(5)).await;
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    for t in tasks {
        assert_eq!(
            t.await.unwrap(),
            200,
            "a queued request was lost on SIGTERM"
        );
    }
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "exit status {status}");
}

/// Runs the runtime binary with `args`, asserts it succeeded (its stderr as the message) and
/// returns its stdout.
fn runtime_ok(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_runtime"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn bench_host_costs_times_every_op_of_a_decoder_step() {
    let rows: Vec<serde_json::Value> = runtime_ok(&[
        "bench",
        "--model",
        "synthetic:llama-tiny",
        "--device",
        "cpu",
        "--sizes",
        "6",
        "--host-costs",
        "3",
    ])
    .lines()
    .map(|l| serde_json::from_str(l).unwrap())
    .collect();
    let ops: Vec<&str> = rows.iter().map(|r| r["op"].as_str().unwrap()).collect();
    for want in ["upload_u32", "candle_add", "matmul", "swiglu", "qkv_rope"] {
        assert!(ops.contains(&want), "{want} missing from {ops:?}");
    }
    for r in &rows {
        assert_eq!(r["rows"], 6);
        assert_eq!(r["calls"], 3);
        let (host, wall) = (
            r["host_us"].as_f64().unwrap(),
            r["wall_us"].as_f64().unwrap(),
        );
        assert!(host > 0.0 && wall >= host, "{r}");
    }
}

#[test]
fn bench_times_overlapped_decode_steps_beside_prompts() {
    for overlap in [false, true] {
        let mut args = vec![
            "bench",
            "--model",
            "synthetic:llama-tiny",
            "--device",
            "cpu",
            "--sizes",
            "3",
            "--steps",
            "4",
            "--context-tokens",
            "8",
            "--prefill-chunks",
            "2",
            "--prefill-tokens",
            "5",
        ];
        if overlap {
            args.push("--overlap");
        }
        let p: serde_json::Value = serde_json::from_str(runtime_ok(&args).trim()).unwrap();
        assert_eq!(p["overlap"], overlap, "{p}");
        assert_eq!(
            (p["batch_size"].clone(), p["steps"].clone()),
            (3.into(), 4.into())
        );
        assert!(p["tokens_per_s"].as_f64().unwrap() > 0.0, "{p}");
    }
}
