//! The `tuner` binary's subcommands: each module holds one subcommand's flags and the code
//! that turns them into a library call and prints the outcome. Not part of the library.

pub(crate) mod compare;
pub(crate) mod gate;
pub(crate) mod replay;
pub(crate) mod report;
pub(crate) mod search;

use loadgen::workload::{TextOptions, Workload};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// How request bodies are drawn: shared by `search` and `compare`, so both measure the same
/// workload from the same flags.
#[derive(clap::Args)]
struct TextArgs {
    /// Generation workloads (completions, chat): max_tokens per request, N, fixed:N,
    /// uniform:A:B or lognormal:MEDIAN:SIGMA.
    #[arg(long, env = "TUNER_OUTPUT_TOKENS", default_value = "64")]
    output_tokens: String,
    /// Generation workloads: let the model stop at EOS instead of forcing every request to its
    /// max_tokens (forced lengths make trials comparable; the default forces them).
    #[arg(long, env = "TUNER_ALLOW_EOS")]
    allow_eos: bool,
    /// Generation workloads: send this `temperature` with every request (0 = greedy); by
    /// default none is sent and the server's default applies.
    #[arg(long, env = "TUNER_TEMPERATURE", value_parser = loadgen::workload::parse_temperature)]
    temperature: Option<f64>,
    /// Inputs per embeddings request.
    #[arg(long, env = "TUNER_INPUTS_PER_REQUEST", default_value_t = 1)]
    inputs_per_request: usize,
}

impl TextArgs {
    /// The text and length options these flags give.
    fn options(&self) -> anyhow::Result<TextOptions> {
        Ok(TextOptions {
            inputs_per_request: self.inputs_per_request.max(1),
            output_tokens: loadgen::workload::Lengths::parse(&self.output_tokens)
                .map_err(|e| anyhow::anyhow!("--output-tokens: {e}"))?,
            ignore_eos: !self.allow_eos,
            temperature: self.temperature,
            ..TextOptions::default()
        })
    }

    /// The workload named by `spec` with these bodies.
    fn workload(&self, spec: &str) -> anyhow::Result<Workload> {
        Workload::from_spec(spec, &self.options()?).map_err(|e| anyhow::anyhow!("--workload: {e}"))
    }
}

/// The `runtime` binary: `BATCHTUNE_RUNTIME`, or the one next to this binary.
fn find_runtime() -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var("BATCHTUNE_RUNTIME") {
        return Ok(PathBuf::from(p));
    }
    let me = std::env::current_exe()?;
    let sibling = me.with_file_name(format!("runtime{}", std::env::consts::EXE_SUFFIX));
    if sibling.is_file() {
        return Ok(sibling);
    }
    anyhow::bail!(
        "cannot find the `runtime` binary next to {} ; build it with `cargo build --release -p runtime`, \
         set BATCHTUNE_RUNTIME, or pass --spawn/--url",
        me.display()
    )
}

/// Exit 0, or print the error and exit 1.
pub(crate) fn or_fail(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Prints the files a command wrote, one per line (for scripts), or the error.
pub(crate) fn print_files(r: anyhow::Result<Vec<PathBuf>>) -> ExitCode {
    match r {
        Ok(files) => {
            for f in files {
                println!("{}", f.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A flag set by the first Ctrl-C, so a long measurement stops cleanly with what it has.
fn ctrl_c_flag() -> Arc<AtomicBool> {
    let cancel = Arc::new(AtomicBool::new(false));
    let c = cancel.clone();
    let _ = std::thread::Builder::new()
        .name("ctrl-c".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("signal runtime");
            rt.block_on(async {
                let _ = tokio::signal::ctrl_c().await;
            });
            eprintln!("\ninterrupted: stopping the current run; what finished is kept (journal or run store)");
            c.store(true, Ordering::Relaxed);
        });
    cancel
}
