//! A server driven by an [`Adapter`]: started with a trial's knobs as environment variables,
//! flags or placeholders, restarted whenever a server knob changes (such servers read their
//! knobs at start), its output captured in one log per start (shown when it fails to start).

use super::adapter::Adapter;
use super::process::{free_port, Child, Spawn};
use super::{call, client, ControlError, HttpClient};
use crate::space::Knobs;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// An adapter-driven server.
pub struct External {
    /// The adapter.
    pub adapter: Adapter,
    /// Base URL of the running instance (empty before the first start).
    pub url: String,
    child: Option<Child>,
    /// Server knobs the running instance was started with.
    running: Option<Knobs>,
    /// Folder of the per-start logs.
    logs: PathBuf,
    starts: usize,
    client: HttpClient,
}

impl External {
    /// A server to be started on the first [`External::apply`]; logs go under `logs`.
    pub fn new(adapter: Adapter, logs: PathBuf) -> External {
        External {
            adapter,
            url: String::new(),
            child: None,
            running: None,
            logs,
            starts: 0,
            client: client(),
        }
    }

    /// Runs the server with these server knobs: nothing to do when it already does, a restart
    /// otherwise.
    pub async fn apply(&mut self, knobs: &Knobs) -> Result<(), ControlError> {
        if self.child.is_some() && self.running.as_ref() == Some(knobs) {
            return Ok(());
        }
        self.stop();
        // A port taken between the check and the server's bind fails the start: one retry.
        let mut last = None;
        for _ in 0..2 {
            match self.start(knobs).await {
                Ok(()) => {
                    self.running = Some(knobs.clone());
                    return Ok(());
                }
                Err(e) => {
                    self.stop();
                    last = Some(e);
                }
            }
        }
        Err(last.expect("tried"))
    }

    async fn start(&mut self, knobs: &Knobs) -> Result<(), ControlError> {
        let port = free_port()?;
        let (argv, env) = self.adapter.render(knobs, port);
        std::fs::create_dir_all(&self.logs).map_err(|e| {
            ControlError::Spawn(format!("cannot create {}: {e}", self.logs.display()))
        })?;
        self.starts += 1;
        let log = self.logs.join(format!("start-{:03}.log", self.starts));
        let workdir = self.adapter.workdir();
        let child = Child::spawn(&Spawn {
            argv: &argv,
            env: &env,
            workdir: Some(&workdir),
            log: Some(&log),
        })?;
        self.url = format!("http://127.0.0.1:{port}");
        self.child = Some(child);
        let limit = Adapter::duration(&self.adapter.ready.timeout);
        let deadline = Instant::now() + limit;
        loop {
            if self.ready().await {
                return Ok(());
            }
            let child = self.child.as_mut().expect("started");
            let failed = match child.exited() {
                Some(status) => Some(format!("exited ({status}) before it was ready")),
                None if Instant::now() > deadline => {
                    Some(format!("not ready within {}", self.adapter.ready.timeout))
                }
                None => None,
            };
            if let Some(why) = failed {
                return Err(ControlError::Spawn(format!(
                    "{} `{}` {why}; last lines of {}:\n{}",
                    self.adapter.name,
                    child.what,
                    log.display(),
                    child.log_tail(20)
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn ready(&self) -> bool {
        if let Some(h) = &self.adapter.ready.health {
            return matches!(
                call(&self.client, &self.url, "GET", h, None).await,
                Ok((200, _))
            );
        }
        let (Some(line), Some(log)) = (
            &self.adapter.ready.log_line,
            self.child.as_ref().and_then(|c| c.log.as_ref()),
        ) else {
            return false;
        };
        std::fs::read(log)
            .map(|b| String::from_utf8_lossy(&b).contains(line.as_str()))
            .unwrap_or(false)
    }

    /// A foreign server cannot report its queue: pause `ready.settle` so the last probe's
    /// requests finish before the next probe starts.
    pub async fn wait_idle(&self) {
        tokio::time::sleep(Adapter::duration(&self.adapter.ready.settle)).await;
    }

    /// Stops the running instance (its whole process group).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.stop(Adapter::duration(&self.adapter.start.stop_timeout));
        }
        self.running = None;
    }
}

impl Drop for External {
    fn drop(&mut self) {
        self.stop();
    }
}
