//! Talking to the server under test over HTTP: start `runtime serve` as a child (or target a URL),
//! apply knobs by hot reload (`PUT /config`) or by restart for restart-only knobs, wait until idle.

use crate::space::Knobs;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Errors while controlling the server.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The child could not be started or did not become ready.
    #[error("runtime: {0}")]
    Spawn(String),
    /// An HTTP call failed or was refused.
    #[error("{0}")]
    Http(String),
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

/// The server being tuned.
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
        let cmd = self.spawn.clone().expect("spawned target");
        let mut c = Command::new(&cmd[0]);
        c.args(&cmd[1..]);
        if !cmd.iter().any(|a| a == "--addr") {
            c.args(["--addr", "127.0.0.1:0"]);
        }
        c.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        c.env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        );
        c.stdout(Stdio::piped()).stderr(Stdio::inherit());
        die_with_this_process(&mut c);
        let mut child = c
            .spawn()
            .map_err(|e| ControlError::Spawn(format!("cannot start `{}`: {e}", cmd.join(" "))))?;
        let stdout = child.stdout.take().expect("piped");
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
            let status = child.wait().ok();
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
        let req = hyper::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.url))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ControlError::Http(e.to_string()))?;
        let resp = self
            .client
            .request(req)
            .await
            .map_err(|e| ControlError::Http(format!("{method} {path}: {e}")))?;
        let status = resp.status().as_u16();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| ControlError::Http(e.to_string()))?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
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
        match self.call("PUT", "/config", Some(body.to_string())).await? {
            (200, _) => Ok(()),
            (s, text) => Err(ControlError::Http(format!(
                "PUT /config {body}: {s} {text}"
            ))),
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

    /// Stops a spawned server (SIGTERM, then kill after 10s).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Puts the child in its own process group and, on Linux, has the kernel send it SIGTERM when
/// the tuner dies, however it dies: Drop stops children on a normal exit, but not on SIGKILL
/// or an unhandled SIGTERM, which left a server listening with an unfinished trial's knobs.
/// The signal follows the thread that spawned the child; spawns run on the async runtime's
/// worker threads, which live as long as the tuner.
fn die_with_this_process(c: &mut Command) {
    use std::os::unix::process::CommandExt;
    c.process_group(0);
    #[cfg(target_os = "linux")]
    {
        let parent = std::process::id();
        // SAFETY: between fork and exec only async-signal-safe calls are made (prctl, getppid).
        unsafe {
            c.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The tuner may have died before the prctl: then nobody would signal us.
                if libc::getppid() as u32 != parent {
                    return Err(std::io::Error::other("the tuner exited"));
                }
                Ok(())
            });
        }
    }
}

fn key_list(k: &Knobs) -> String {
    k.keys()
        .filter(|k| profiles::RESTART_ONLY.contains(&k.as_str()))
        .cloned()
        .collect::<Vec<_>>()
        .join(", ")
}

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}
