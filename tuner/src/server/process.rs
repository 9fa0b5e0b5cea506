//! Child server processes: each in its own process group, killed with the tuner however the
//! tuner dies, its output kept in a log file, stopped as a whole group (a uvicorn master and its
//! workers, a shell and what it started).

use super::ControlError;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What to start.
pub struct Spawn<'a> {
    /// Program and arguments.
    pub argv: &'a [String],
    /// Extra environment variables.
    pub env: &'a [(String, String)],
    /// Working directory (the tuner's when `None`).
    pub workdir: Option<&'a Path>,
    /// Where stdout and stderr go; `None` pipes stdout to the caller and inherits stderr.
    pub log: Option<&'a Path>,
}

/// A running child server.
pub struct Child {
    /// The process (its pid is also its process group id).
    pub process: std::process::Child,
    /// Its log file, when it has one.
    pub log: Option<PathBuf>,
    /// The command line, for messages.
    pub what: String,
}

impl Child {
    /// Starts `s` in its own process group, tied to the tuner's life.
    pub fn spawn(s: &Spawn<'_>) -> Result<Child, ControlError> {
        let what = s.argv.join(" ");
        let (program, args) = s
            .argv
            .split_first()
            .ok_or_else(|| ControlError::Spawn("empty command".into()))?;
        let mut c = Command::new(program);
        c.args(args);
        c.envs(s.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        if let Some(d) = s.workdir {
            c.current_dir(d);
        }
        match s.log {
            Some(path) => {
                let f = std::fs::File::create(path).map_err(|e| {
                    ControlError::Spawn(format!("cannot create log {}: {e}", path.display()))
                })?;
                let g = f
                    .try_clone()
                    .map_err(|e| ControlError::Spawn(e.to_string()))?;
                c.stdin(Stdio::null()).stdout(f).stderr(g);
            }
            None => {
                c.stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::inherit());
            }
        }
        die_with_this_process(&mut c);
        let process = c
            .spawn()
            .map_err(|e| ControlError::Spawn(format!("cannot start `{what}`: {e}")))?;
        Ok(Child {
            process,
            log: s.log.map(Path::to_path_buf),
            what,
        })
    }

    /// The exit status, if it has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.process.try_wait().ok().flatten()
    }

    /// The last `n` lines of its log (empty without one), for error messages.
    pub fn log_tail(&self, n: usize) -> String {
        let Some(text) = self
            .log
            .as_ref()
            .and_then(|p| std::fs::read(p).ok())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
        else {
            return String::new();
        };
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// SIGTERM to the whole group, then SIGKILL after `grace`; waits for the leader.
    pub fn stop(&mut self, grace: Duration) {
        let pgid = self.process.id() as i32;
        if self.exited().is_none() {
            signal_group(pgid, libc::SIGTERM);
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline {
                if self.exited().is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // Whatever the leader left behind in its group goes too.
        signal_group(pgid, libc::SIGKILL);
        let _ = self.process.wait();
    }
}

fn signal_group(pgid: i32, sig: i32) {
    // SAFETY: kill(2) with a negative pid signals that process group; no memory is touched.
    unsafe {
        libc::kill(-pgid, sig);
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

/// A TCP port that was free a moment ago on 127.0.0.1, for servers that must be told their port
/// (`{port}`); a server that loses the race fails to start and says so in its log.
pub fn free_port() -> Result<u16, ControlError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| ControlError::Spawn(format!("no free port: {e}")))
}
