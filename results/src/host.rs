//! Where a run happened: host CPU, GPUs and the code's revision, for records and provenance.

fn command_output(cmd: &str, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new(cmd).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
}

/// `git rev-parse HEAD` (+`-dirty`), or `unknown` outside a checkout.
pub fn git_revision() -> String {
    match command_output("git", &["rev-parse", "--short=12", "HEAD"]) {
        Some(rev) => {
            let dirty =
                command_output("git", &["status", "--porcelain", "--untracked-files=no"]).is_some();
            if dirty {
                format!("{rev}-dirty")
            } else {
                rev
            }
        }
        None => "unknown".into(),
    }
}

/// CPU model and core count of this host.
pub fn host_cpu() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!(
        "{cpu} ({} cores)",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    )
}

/// GPU names from nvidia-smi, or `none`.
pub fn host_gpu() -> String {
    command_output("nvidia-smi", &["--query-gpu=name", "--format=csv,noheader"])
        .map(|s| s.lines().collect::<Vec<_>>().join(", "))
        .unwrap_or_else(|| "none".into())
}
