//! batchtune results: the run store, statistics and plots (issue 5, not built yet).
//!
//! Today runs are kept as loadgen JSON reports (`loadgen --json`, schema in
//! `loadgen/report.schema.json`, histograms embedded as HdrHistogram V2 base64) and tuner journals
//! under `results/searches/`; the Parquet store (polars), bootstrap statistics and plotters charts
//! land here next. The crate exists now so the workspace layout matches the design.
#![warn(missing_docs)]
