//! The run store: [`RunRecord`]s in a Parquet file, written and read with polars.
//!
//! Appending rewrites the file through a temporary sibling and a rename, so a crash mid-write
//! leaves the previous file intact: nothing that was recorded is lost.

use crate::record::RunRecord;
use polars::prelude::*;
use std::path::{Path, PathBuf};

/// Errors of the run store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Reading or writing the file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// polars refused the data or the file.
    #[error("{path}: {source}")]
    Polars {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: PolarsError,
    },
    /// The file is Parquet but not a run store (a column is missing or has another type).
    #[error("{path}: not a batchtune run store: {reason}")]
    Schema {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// Declares every column once: how it is built from records and read back into them.
macro_rules! columns {
    ($( $field:ident : $kind:ident ),* $(,)?) => {
        fn to_frame(runs: &[RunRecord]) -> PolarsResult<DataFrame> {
            DataFrame::new(vec![
                $( Column::new(stringify!($field).into(),
                    runs.iter().map(|r| columns!(@put $kind, &r.$field)).collect::<Vec<_>>()), )*
            ])
        }

        fn from_frame(df: &DataFrame) -> Result<Vec<RunRecord>, String> {
            let n = df.height();
            $( let $field = columns!(@get $kind, df, stringify!($field), n); )*
            Ok((0..n)
                .map(|i| RunRecord { $( $field: $field[i].clone(), )* })
                .collect())
        }
    };
    (@put text, $v:expr) => { $v.as_str() };
    (@put float, $v:expr) => { *$v };
    (@put later_float, $v:expr) => { *$v };
    (@put later_text, $v:expr) => { $v.as_str() };
    (@put count, $v:expr) => { *$v };
    (@put small, $v:expr) => { *$v };
    (@put flag, $v:expr) => { *$v };
    (@get text, $df:expr, $name:expr, $n:expr) => {
        column($df, $name)?.str().map_err(|e| format!("{}: {e}", $name))?
            .into_iter().map(|v| v.unwrap_or_default().to_string()).collect::<Vec<String>>()
    };
    (@get float, $df:expr, $name:expr, $n:expr) => {
        column($df, $name)?.f64().map_err(|e| format!("{}: {e}", $name))?
            .into_iter().map(|v| v.unwrap_or(f64::NAN)).collect::<Vec<f64>>()
    };
    // A column added after the first stores were written: absent reads as unknown (NaN).
    (@get later_float, $df:expr, $name:expr, $n:expr) => {
        match $df.column($name) {
            Ok(c) => c.f64().map_err(|e| format!("{}: {e}", $name))?
                .into_iter().map(|v| v.unwrap_or(f64::NAN)).collect::<Vec<f64>>(),
            Err(_) => vec![f64::NAN; $n],
        }
    };
    // Likewise for text: absent reads as empty.
    (@get later_text, $df:expr, $name:expr, $n:expr) => {
        match $df.column($name) {
            Ok(c) => c.str().map_err(|e| format!("{}: {e}", $name))?
                .into_iter().map(|v| v.unwrap_or_default().to_string()).collect::<Vec<String>>(),
            Err(_) => vec![String::new(); $n],
        }
    };
    (@get count, $df:expr, $name:expr, $n:expr) => {
        column($df, $name)?.u64().map_err(|e| format!("{}: {e}", $name))?
            .into_iter().map(|v| v.unwrap_or(0)).collect::<Vec<u64>>()
    };
    (@get small, $df:expr, $name:expr, $n:expr) => {
        column($df, $name)?.u32().map_err(|e| format!("{}: {e}", $name))?
            .into_iter().map(|v| v.unwrap_or(0)).collect::<Vec<u32>>()
    };
    (@get flag, $df:expr, $name:expr, $n:expr) => {
        column($df, $name)?.bool().map_err(|e| format!("{}: {e}", $name))?
            .into_iter().map(|v| v.unwrap_or(false)).collect::<Vec<bool>>()
    };
}

fn column<'a>(df: &'a DataFrame, name: &str) -> Result<&'a Column, String> {
    df.column(name)
        .map_err(|_| format!("column `{name}` is missing"))
}

columns! {
    run_id: text, group: text, label: text, started_unix_s: float, host_cpu: text,
    host_gpu: text, git_revision: text, model: text, devices: text, knobs_json: text,
    workload: text, targets: text, mode: text, offered_rps: float, concurrency: small,
    duration_s: float, scheduled: count, ok: count, errors: count, error_rate: float,
    achieved_rps: float, mean_s: float, p50_s: float, p90_s: float, p95_s: float, p99_s: float,
    p999_s: float, max_s: float, valid: flag, latency_histogram: text,
    drift_slope: later_float, drift_stderr: later_float, ttft_histogram: later_text,
    tpot_histogram: later_text, output_tokens_per_s: later_float,
}

/// Reads every record of a store; a missing file is an empty store.
pub fn read(path: &Path) -> Result<Vec<RunRecord>, StoreError> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let file = std::fs::File::open(path).map_err(|source| StoreError::Io {
        path: path.into(),
        source,
    })?;
    let df = ParquetReader::new(file)
        .finish()
        .map_err(|source| StoreError::Polars {
            path: path.into(),
            source,
        })?;
    from_frame(&df).map_err(|reason| StoreError::Schema {
        path: path.into(),
        reason,
    })
}

/// Writes `runs` as the whole store (temporary file, then rename).
pub fn write(path: &Path, runs: &[RunRecord]) -> Result<(), StoreError> {
    let io = |source| StoreError::Io {
        path: path.into(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let mut df = to_frame(runs).map_err(|source| StoreError::Polars {
        path: path.into(),
        source,
    })?;
    let tmp = path.with_extension("parquet.tmp");
    let mut file = std::fs::File::create(&tmp).map_err(io)?;
    ParquetWriter::new(&mut file)
        .finish(&mut df)
        .map_err(|source| StoreError::Polars {
            path: path.into(),
            source,
        })?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// Appends records to a store (creating it), replacing earlier records with the same `run_id`.
pub fn append(path: &Path, new: &[RunRecord]) -> Result<(), StoreError> {
    let mut runs = read(path)?;
    runs.retain(|r| !new.iter().any(|n| n.run_id == r.run_id));
    runs.extend_from_slice(new);
    write(path, &runs)
}

/// Records of one label, in store order.
pub fn by_label<'a>(runs: &'a [RunRecord], label: &str) -> Vec<&'a RunRecord> {
    runs.iter().filter(|r| r.label == label).collect()
}

/// Labels in order of first appearance (the order profiles were given on the command line).
pub fn labels(runs: &[RunRecord]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for r in runs {
        if !out.contains(&r.label) {
            out.push(r.label.clone());
        }
    }
    out
}

/// Records of one label grouped by offered rate (ascending), for repeated runs at each rate.
pub fn by_rate<'a>(runs: &[&'a RunRecord]) -> Vec<(f64, Vec<&'a RunRecord>)> {
    let mut out: Vec<(f64, Vec<&RunRecord>)> = Vec::new();
    for r in runs {
        match out
            .iter_mut()
            .find(|(rate, _)| (rate - r.offered_rps).abs() < 1e-9 * rate.max(1.0))
        {
            Some((_, v)) => v.push(r),
            None => out.push((r.offered_rps, vec![r])),
        }
    }
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(i: u32) -> RunRecord {
        RunRecord {
            run_id: format!("p@{i}#0"),
            group: "g".into(),
            label: if i.is_multiple_of(2) { "even" } else { "odd" }.into(),
            started_unix_s: 1.7e9 + i as f64,
            host_cpu: "cpu".into(),
            host_gpu: "none".into(),
            git_revision: "abc".into(),
            model: "synthetic:tiny".into(),
            devices: "cpu".into(),
            knobs_json: r#"{"max_batch_size":8}"#.into(),
            workload: "embeddings".into(),
            targets: "p95<4s".into(),
            mode: "open".into(),
            offered_rps: 10.0 * i as f64,
            concurrency: i,
            duration_s: 5.0,
            scheduled: 50 * i as u64,
            ok: 49 * i as u64,
            errors: i as u64,
            error_rate: 0.02,
            achieved_rps: 9.8 * i as f64,
            mean_s: 0.01,
            p50_s: 0.009,
            p90_s: 0.015,
            p95_s: 0.02,
            p99_s: 0.03,
            p999_s: 0.04,
            max_s: 0.05,
            drift_slope: 0.01,
            drift_stderr: 0.002,
            valid: i != 3,
            latency_histogram: "HISTEwAAAAMAAAAAAAAAAwAAAAAAAAAB".into(),
            ttft_histogram: "HISTEwAAAAMAAAAAAAAAAwAAAAAAAAAC".into(),
            tpot_histogram: String::new(),
            output_tokens_per_s: 12.5 * i as f64,
        }
    }

    #[test]
    fn parquet_round_trip_keeps_every_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/runs.parquet");
        let runs: Vec<RunRecord> = (1..=4).map(record).collect();
        write(&path, &runs).unwrap();
        assert_eq!(read(&path).unwrap(), runs);
    }

    #[test]
    fn append_adds_and_replaces_by_run_id() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("runs.parquet");
        append(&path, &[record(1), record(2)]).unwrap();
        let mut again = record(2);
        again.achieved_rps = 123.0;
        append(&path, &[again.clone(), record(3)]).unwrap();
        let back = read(&path).unwrap();
        assert_eq!(back.len(), 3);
        assert_eq!(back.iter().find(|r| r.run_id == again.run_id), Some(&again));
        assert_eq!(labels(&back), vec!["odd".to_string(), "even".to_string()]);
        assert!(!path.with_extension("parquet.tmp").exists());
    }

    #[test]
    fn a_foreign_parquet_file_is_refused_with_the_missing_column() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("other.parquet");
        let mut df = DataFrame::new(vec![Column::new("x".into(), vec![1.0f64])]).unwrap();
        ParquetWriter::new(std::fs::File::create(&path).unwrap())
            .finish(&mut df)
            .unwrap();
        let e = read(&path).unwrap_err().to_string();
        assert!(
            e.contains("not a batchtune run store") && e.contains("run_id"),
            "{e}"
        );
    }

    #[test]
    fn a_store_from_before_the_drift_and_token_columns_reads_them_as_unknown() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.parquet");
        let mut df = to_frame(&[record(1)]).unwrap().drop_many([
            "drift_slope",
            "drift_stderr",
            "ttft_histogram",
            "tpot_histogram",
            "output_tokens_per_s",
        ]);
        ParquetWriter::new(std::fs::File::create(&path).unwrap())
            .finish(&mut df)
            .unwrap();
        let back = read(&path).unwrap();
        assert!(back[0].drift_slope.is_nan() && back[0].drift_stderr.is_nan());
        assert!(back[0].output_tokens_per_s.is_nan());
        assert!(back[0].ttft_histogram.is_empty() && back[0].tpot_histogram.is_empty());
        assert_eq!(back[0].p95_s, record(1).p95_s);
    }

    #[test]
    fn records_group_by_rate() {
        let mut a = record(2);
        let mut b = record(2);
        b.run_id = "p@20#1".into();
        a.offered_rps = 20.0;
        b.offered_rps = 20.0;
        let c = record(1);
        let refs = vec![&a, &c, &b];
        let g = by_rate(&refs);
        assert_eq!(g.len(), 2);
        assert_eq!((g[0].0, g[0].1.len()), (10.0, 1));
        assert_eq!((g[1].0, g[1].1.len()), (20.0, 2));
    }
}
