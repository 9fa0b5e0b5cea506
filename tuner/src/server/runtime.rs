//! batchtune's own runtime as the server under test: start `runtime serve` as a child (or target
//! a URL), apply knobs by hot reload (`PUT /config`) or by restart for restart-only knobs, wait
//! until its queue is empty.

use super::process::{Child, Spawn};
use super::{client, ControlError, HttpClient};
use crate::space::Knobs;
use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

/// A batchtune runtime being tuned (or, through [`Target::url`], any server at a URL).
pub struct Target {
    /// Base URL, `http://127.0.0.1:PORT`.
    pub url: String,
    spawn: Option<Vec<String>>,
    child: Option<Child>,
    env: Vec<(String, String)>,
    client: HttpClient,
    /// True when the server exports batchtune metrics (queue depth) so idleness can be checked.
    pub is_batchtune: bool,
}

impl Target {
    /// Targets a running server.
    pub async fn url(url: &str) -> Result<Target, ControlError> {
        let mut t = Target {
            url: url.trim_end_matches('/').to_string(),
            spawn: None,
            child: None,
            env: vec![],
            client: client(),
            is_batchtune: false,
        };
        t.wait_ready(Duration::from_secs(30)).await?;
        t.is_batchtune = t.get("/config").await.is_ok();
        Ok(t)
    }

    /// Starts `command` (e.g. `runtime serve --profile p.toml`) on a free port and waits for it.
    pub async fn spawn(command: Vec<String>) -> Result<Target, ControlError> {
        let mut t = Target {
            url: String::new(),
            spawn: Some(command),
            child: None,
            env: vec![],
            client: client(),
            is_batchtune: true,
        };
        t.start().await?;
        Ok(t)
    }

    async fn start(&mut self) -> Result<(), ControlError> {
        let mut cmd = self.spawn.clone().expect("spawned target");
        if !cmd.iter().any(|a| a == "--addr") {
            cmd.extend(["--addr".into(), "127.0.0.1:0".into()]);
        }
        let mut env = self.env.clone();
        env.push((
            "RUST_LOG".into(),
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        ));
        let mut child = Child::spawn(&Spawn {
            argv: &cmd,
            env: &env,
            workdir: None,
            log: None,
        })?;
        let stdout = child.process.stdout.take().expect("piped");
        let line = tokio::task::spawn_blocking(move || {
            let mut r = BufReader::new(stdout);
            let mut line = String::new();
            let n = r.read_line(&mut line).unwrap_or(0);
            // Keep draining so the child never blocks on a full pipe.
            std::thread::spawn(move || std::io::copy(&mut r, &mut std::io::sink()));
            (n, line)
        })
        .await
        .map_err(|e| ControlError::Spawn(e.to_string()))?;
        let url = line
            .1
            .trim()
            .strip_prefix("listening on ")
            .map(str::to_string);
        let Some(url) = url else {
            let status = child.process.wait().ok();
            return Err(ControlError::Spawn(format!(
                "`{}` exited ({status:?}) before listening",
                cmd.join(" ")
            )));
        };
        self.url = url;
        self.child = Some(child);
        self.wait_ready(Duration::from_secs(120)).await
    }

    async fn wait_ready(&self, limit: Duration) -> Result<(), ControlError> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok((200, _)) = self.call("GET", "/health", None).await {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(ControlError::Spawn(format!(
                    "{} not ready within {limit:?}",
                    self.url
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<String>,
    ) -> Result<(u16, String), ControlError> {
        super::call(&self.client, &self.url, method, path, body).await
    }

    /// GET a JSON document.
    pub async fn get(&self, path: &str) -> Result<serde_json::Value, ControlError> {
        match self.call("GET", path, None).await? {
            (200, body) => serde_json::from_str(&body)
                .map_err(|e| ControlError::Http(format!("GET {path}: {e}"))),
            (s, body) => Err(ControlError::Http(format!("GET {path}: {s} {body}"))),
        }
    }

    /// Applies knobs: hot reload when all are live, restart (spawned servers only) otherwise.
    pub async fn apply(&mut self, knobs: &Knobs) -> Result<(), ControlError> {
        let restart = knobs
            .keys()
            .any(|k| profiles::RESTART_ONLY.contains(&k.as_str()));
        if restart {
            if self.spawn.is_none() {
                return Err(ControlError::Http(format!(
                    "restart-only knobs in the space ({}) need --spawn, not --url",
                    key_list(knobs)
                )));
            }
            for (k, v) in knobs {
                let var = format!("BATCHTUNE_{}", k.to_uppercase());
                self.env.retain(|(n, _)| *n != var);
                self.env.push((var, v.to_string()));
            }
            self.stop();
            return self.start().await;
        }
        let body: serde_json::Map<String, serde_json::Value> = knobs
            .iter()
            .map(|(k, v)| (k.clone(), v.to_json()))
            .collect();
        self.put_config(serde_json::Value::Object(body)).await
    }

    /// `PUT /config` with a JSON object.
    pub async fn put_config(&self, body: serde_json::Value) -> Result<(), ControlError> {
        let (status, text) = self.call("PUT", "/config", Some(body.to_string())).await?;
        let what = format!("PUT /config {body}: {status} {text}");
        match status {
            200 => Ok(()),
            400..=499 => Err(ControlError::Rejected(what)),
            _ => Err(ControlError::Http(what)),
        }
    }

    /// Waits until the server's queue is empty (after an overloaded probe), up to `limit`.
    pub async fn wait_idle(&self, limit: Duration) {
        if !self.is_batchtune {
            tokio::time::sleep(Duration::from_millis(500)).await;
            return;
        }
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok((200, text)) = self.call("GET", "/metrics", None).await {
                let busy = text.lines().any(|l| {
                    (l.starts_with("batchtune_queue_depth_inputs ")
                        || l.starts_with("batchtune_batches_in_flight "))
                        && !l.ends_with(" 0")
                });
                if !busy {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops a spawned server (SIGTERM to its group, then SIGKILL after 10 s).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.stop(Duration::from_secs(10));
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.stop();
    }
}

fn key_list(k: &Knobs) -> String {
    k.keys()
        .filter(|k| profiles::RESTART_ONLY.contains(&k.as_str()))
        .cloned()
        .collect::<Vec<_>>()
        .join(", ")
}
