//! batchtune results: every run becomes a record, every comparison a picture.
//!
//! - [`record`]: [`record::RunRecord`], one flat row per loadgen run (what ran, where, what
//!   happened, and the merged-able HDR histogram);
//! - [`store`]: append and read records as Parquet (polars), with query helpers;
//! - [`stats`]: bootstrap confidence intervals across repeated runs and A/B ratios;
//! - [`plot`]: latency–throughput curves, percentile spectra, search traces and heatmaps
//!   (plotters, SVG and PNG).
#![warn(missing_docs)]

pub mod hist;
pub mod host;
pub mod plot;
pub mod record;
pub mod stats;
pub mod store;
