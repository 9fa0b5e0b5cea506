//! `tuner`: SLO-constrained search over serving knobs.
//!
//! This file parses the command line and hands each subcommand to its module under `cli/`
//! (the binary's own code: what the flags mean and what is printed); the search, the gate and
//! the rest live in the library.

mod cli;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// batchtune tuner: measure, don't guess, the serving knobs.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Search batch size, wait timeout, concurrency, queue size and token budget for the highest
    /// request rate that meets every --target, and write a tuned profile.
    ///
    /// With only --target it starts the runtime (found next to this binary) with the embedded
    /// model on CPU and searches the default space. Each trial applies knobs by hot reload, then
    /// finds the sustainable rate by bracketing and bisection with open-loop loadgen probes.
    /// Every finished trial is journaled under --journal-dir; --resume continues a killed search.
    Search(Box<cli::search::SearchArgs>),
    /// Search-efficiency benchmark: replay every strategy on a stored exhaustive grid (a finished
    /// `tuner search --strategy grid` whose budget covers the grid) and report the trials each
    /// needs to reach 95% of the grid's best, median over seeds.
    Replay(cli::replay::ReplayArgs),
    /// Sweep several profiles over one grid of offered rates (open-loop Poisson loadgen runs
    /// against a fresh runtime per profile), record every run in results/<name>/runs.parquet, and
    /// draw latency–throughput curves, the percentile spectrum and a Markdown table.
    Compare(cli::compare::CompareArgs),
    /// Draw a search from its journal: sustainable rate per trial with the best so far, and a
    /// heatmap over batch size × wait timeout.
    Report(cli::report::ReportArgs),
    /// Performance-regression gate: serve one fixed profile with the baseline and the candidate
    /// runtime, measure them interleaved (A B, B A, ...) and decide pass / regression /
    /// inconclusive from confidence intervals on the ratios. Exit 0 pass, 1 regression,
    /// 3 inconclusive, 2 error. See ci/README.md.
    Gate(cli::gate::GateArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Replay(a) => cli::or_fail(cli::replay::run(a)),
        Cmd::Compare(a) => cli::print_files(cli::compare::run(a)),
        Cmd::Report(a) => cli::print_files(cli::report::run(a)),
        Cmd::Gate(a) => match cli::gate::run(a) {
            Ok(code) => ExitCode::from(code),
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::from(2)
            }
        },
        Cmd::Search(a) => cli::or_fail(cli::search::run(*a)),
    }
}
