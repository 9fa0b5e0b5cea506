//! The `loadgen` binary: summary, files and exit codes.

use axum::routing::post;
use axum::Router;
use std::process::Command;

fn loadgen() -> Command {
    Command::new(env!("CARGO_BIN_EXE_loadgen"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_files_and_uses_documented_exit_codes() {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let app = Router::new().route(
            "/v1/embeddings",
            post(|| async {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                "ok"
            }),
        );
        axum::serve(l, app).await.unwrap()
    });
    let dir = tempfile::tempdir().unwrap();
    let (json, hgrm, hlog) = (
        dir.path().join("r.json"),
        dir.path().join("r.hgrm"),
        dir.path().join("r.hlog"),
    );
    let url = format!("http://{addr}");
    let out = tokio::task::spawn_blocking({
        let (url, json, hgrm, hlog) = (url.clone(), json.clone(), hgrm.clone(), hlog.clone());
        move || {
            loadgen()
                .args([
                    "--url",
                    &url,
                    "--rps",
                    "100",
                    "--duration",
                    "2s",
                    "--warmup",
                    "200ms",
                    "--quiet",
                ])
                .args([
                    "--json",
                    json.to_str().unwrap(),
                    "--hgrm",
                    hgrm.to_str().unwrap(),
                    "--hlog",
                    hlog.to_str().unwrap(),
                ])
                .args(["--fail-on", "p95>1ms"])
                // This test is about exit 4; a busy CI host can delay sends past the default
                // 1 ms self-check, which would (rightly) make the run invalid, exit 3, first.
                .args(["--max-send-lag", "100ms"])
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("achieved") && stdout.contains("latency (intended)"),
        "{stdout}"
    );
    assert_eq!(
        out.status.code(),
        Some(4),
        "fail-on p95>1ms must trip on a 5ms server: {stdout}"
    );
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(report["ok"], 200);
    assert!(std::fs::read_to_string(&hgrm)
        .unwrap()
        .contains("Percentile"));
    assert!(std::fs::read_to_string(&hlog)
        .unwrap()
        .contains("Tag=latency"));

    let out = loadgen()
        .args(["--url", &url, "--rps", "10", "--concurrency", "3"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = loadgen()
        .args(["--url", &url, "--rps", "10", "--fail-on", "p95<<1ms"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--fail-on"));
    let out = loadgen()
        .args(["--url", "https://x", "--rps", "10"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("https is not supported"));
}
