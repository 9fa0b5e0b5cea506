//! `tuner report`: a search drawn from its journal.

use std::path::PathBuf;

#[derive(clap::Args)]
pub(crate) struct ReportArgs {
    /// The search's id (a folder under --journal-dir).
    search_id: String,
    /// Folder of search journals.
    #[arg(long, default_value = "results/searches")]
    journal_dir: PathBuf,
    /// Output folder (default: the search's own folder).
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Runs `tuner report`; the files it wrote.
pub(crate) fn run(a: ReportArgs) -> anyhow::Result<Vec<PathBuf>> {
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| a.journal_dir.join(&a.search_id));
    tuner::report::report(&a.journal_dir, &a.search_id, &out)
}
