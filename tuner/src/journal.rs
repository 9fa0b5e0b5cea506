//! The search journal: one JSON line per event, appended and flushed to disk as each trial
//! finishes, so a killed search loses at most the trial in progress and `--resume` repeats none
//! of the finished ones.

use crate::space::{Knobs, Space};
use crate::trial::{ProbeSettings, RateResult};
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// What a search was asked to do; written first, reused verbatim on resume.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Header {
    /// Search id (also the folder name).
    pub search_id: String,
    /// Targets as written.
    pub targets: Vec<String>,
    /// The space searched.
    pub space: Space,
    /// Strategy name.
    pub strategy: String,
    /// Most trials.
    pub budget: usize,
    /// Strategy seed.
    pub seed: u64,
    /// Probe settings.
    pub probe: ProbeSettings,
    /// Workload spec.
    pub workload: String,
    /// Unix time the search began.
    pub started_unix_s: f64,
    /// The search's time budget (`--time`), seconds: a resumed search gets what its finished
    /// trials left of it. Absent in journals written before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_s: Option<f64>,
    /// `[k, n]`: this search measures the grid points whose index is k mod n (a grid split over
    /// several machines' cores; `tuner replay` merges the shards).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<[usize; 2]>,
    /// The server's adapter (name and file) when it is not batchtune's runtime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
}

/// One finished trial.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Trial {
    /// 0-based order of measurement.
    pub index: usize,
    /// Canonical knob string (cache key).
    pub key: String,
    /// The knob values.
    pub knobs: Knobs,
    /// What the rate search found.
    pub result: RateResult,
    /// Wall time of the trial, seconds.
    pub elapsed_s: f64,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum Line {
    Header(Box<Header>),
    Trial(Trial),
}

/// Appends to `journal.jsonl` in a search folder.
pub struct Journal {
    file: File,
    /// The journal's path.
    pub path: PathBuf,
}

/// Errors reading or writing a journal.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// File system error.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The journal has no header (not a search journal).
    #[error("{0} is not a search journal (no header line)")]
    NoHeader(String),
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> JournalError + '_ {
    move |source| JournalError::Io {
        path: path.display().to_string(),
        source,
    }
}

impl Journal {
    /// Starts a new journal in `dir/<search_id>/journal.jsonl` with its header.
    pub fn create(dir: &Path, header: &Header) -> Result<Journal, JournalError> {
        let folder = dir.join(&header.search_id);
        std::fs::create_dir_all(&folder).map_err(io(&folder))?;
        let path = folder.join("journal.jsonl");
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .map_err(io(&path))?;
        let mut j = Journal { file, path };
        j.write(&Line::Header(Box::new(header.clone())))?;
        Ok(j)
    }

    /// Reads a journal without touching it: its header and finished trials (a torn last line,
    /// from a process killed mid-write, is ignored).
    pub fn read(dir: &Path, search_id: &str) -> Result<(Header, Vec<Trial>), JournalError> {
        let path = dir.join(search_id).join("journal.jsonl");
        let text = std::fs::read_to_string(&path).map_err(io(&path))?;
        let (header, trials, _) = parse(&text);
        let header = header.ok_or_else(|| JournalError::NoHeader(path.display().to_string()))?;
        Ok((header, trials))
    }

    /// Reopens a journal for appending; returns its header and finished trials. A torn last line
    /// (the process was killed mid-write) is ignored.
    pub fn resume(
        dir: &Path,
        search_id: &str,
    ) -> Result<(Journal, Header, Vec<Trial>), JournalError> {
        let path = dir.join(search_id).join("journal.jsonl");
        let text = std::fs::read_to_string(&path).map_err(io(&path))?;
        let (header, trials, good_len) = parse(&text);
        let header = header.ok_or_else(|| JournalError::NoHeader(path.display().to_string()))?;
        // Cut any torn tail so the next append starts on a clean line.
        let f = OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(io(&path))?;
        f.set_len(good_len as u64).map_err(io(&path))?;
        drop(f);
        let file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(io(&path))?;
        Ok((Journal { file, path }, header, trials))
    }

    /// Appends a finished trial and syncs it to disk before returning.
    pub fn append(&mut self, t: &Trial) -> Result<(), JournalError> {
        self.write(&Line::Trial(t.clone()))
    }

    fn write(&mut self, line: &Line) -> Result<(), JournalError> {
        let mut s = serde_json::to_string(line).expect("journal lines serialize");
        s.push('\n');
        // One write call per line: a kill leaves either the whole line or a torn tail that
        // `resume` drops.
        self.file.write_all(s.as_bytes()).map_err(io(&self.path))?;
        self.file.sync_data().map_err(io(&self.path))
    }
}

/// Header, finished trials and the length of the clean prefix of a journal's text.
fn parse(text: &str) -> (Option<Header>, Vec<Trial>, usize) {
    let mut header = None;
    let mut trials = Vec::new();
    let mut good_len = 0;
    for line in text.split_inclusive('\n') {
        if !line.ends_with('\n') {
            break;
        }
        match serde_json::from_str::<Line>(line.trim()) {
            Ok(Line::Header(h)) => header = Some(*h),
            Ok(Line::Trial(t)) => trials.push(t),
            Err(_) => break,
        }
        good_len += line.len();
    }
    (header, trials, good_len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trial::result_of;

    fn header(id: &str) -> Header {
        Header {
            shard: None,
            search_id: id.into(),
            targets: vec!["p95<4s".into()],
            space: Space::default_space(),
            strategy: "random".into(),
            budget: 5,
            seed: 1,
            probe: ProbeSettings::default(),
            workload: "embeddings".into(),
            started_unix_s: 0.0,
            time_s: None,
            server: None,
        }
    }

    #[test]
    fn resume_returns_finished_trials_and_drops_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::create(dir.path(), &header("s1")).unwrap();
        let k = Space::default_space().decode(&[0.5; 5]);
        let t = Trial {
            index: 0,
            key: crate::space::key(&k),
            knobs: k,
            result: result_of(vec![]),
            elapsed_s: 1.0,
        };
        j.append(&t).unwrap();
        drop(j);
        // A kill mid-write leaves half a line.
        let path = dir.path().join("s1/journal.jsonl");
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"type\":\"trial\",\"index\":1,\"ke")
            .unwrap();
        drop(f);
        let (mut j, h, trials) = Journal::resume(dir.path(), "s1").unwrap();
        assert_eq!(h, header("s1"));
        assert_eq!(trials, vec![t.clone()]);
        j.append(&Trial { index: 1, ..t }).unwrap();
        let (_, _, trials) = Journal::resume(dir.path(), "s1").unwrap();
        assert_eq!(trials.len(), 2);
        assert!(
            Journal::create(dir.path(), &header("s1")).is_err(),
            "a search id is never overwritten"
        );
    }
}
