//! Raw forward throughput: back-to-back batches on one replica, no HTTP, no queue. The ceiling
//! the served throughput is compared with (`runtime bench`, and the `throughput` cargo bench).

use crate::model::{self, ModelError};
use profiles::Dtype;
use serde::Serialize;
use std::time::Instant;

/// One batch size's result.
#[derive(Debug, Clone, Serialize)]
pub struct RawPoint {
    /// Inputs per forward.
    pub batch_size: usize,
    /// Tokens per input (all inputs have the same length).
    pub tokens_per_input: usize,
    /// Forwards timed.
    pub forwards: usize,
    /// Inputs per second.
    pub inputs_per_s: f64,
    /// Tokens per second.
    pub tokens_per_s: f64,
    /// Median time of one forward, seconds.
    pub median_forward_s: f64,
}

/// Texts of `words` words each (a fixed word cycle, so every input has the same token count).
pub fn fixed_texts(n: usize, words: usize) -> Vec<String> {
    const W: &[&str] = &[
        "the", "model", "serves", "requests", "with", "dynamic", "batching", "under", "load",
        "quickly",
    ];
    (0..n)
        .map(|i| {
            (0..words)
                .map(|j| W[(i + j * 7) % W.len()])
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

/// Times back-to-back forwards at each batch size for about `seconds` (at least 3 forwards, after
/// 2 warm-up forwards that absorb kernel compilation and allocation).
pub fn raw(
    spec: &str,
    device: &str,
    dtype: Dtype,
    sizes: &[usize],
    seconds: f64,
    words: usize,
) -> Result<Vec<RawPoint>, ModelError> {
    let m = model::load(spec, &[device.to_string()], dtype)?;
    let texts = fixed_texts(256, words);
    let ids: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| m.tokenizer.encode(t))
        .collect::<Result<_, _>>()
        .map_err(|reason| ModelError::Load {
            model: spec.into(),
            reason,
        })?;
    let backend = &m.replicas[0].1;
    let mut out = Vec::new();
    for &b in sizes {
        let batch: Vec<&[u32]> = (0..b).map(|i| ids[i % ids.len()].as_slice()).collect();
        let err = |reason: String| ModelError::Load {
            model: spec.into(),
            reason,
        };
        for _ in 0..2 {
            backend.embed(&batch).map_err(err)?;
        }
        let mut times = Vec::new();
        let t0 = Instant::now();
        while t0.elapsed().as_secs_f64() < seconds || times.len() < 3 {
            let t = Instant::now();
            // embed returns host vectors, so each call includes the device synchronisation.
            backend.embed(&batch).map_err(err)?;
            times.push(t.elapsed().as_secs_f64());
        }
        let total = t0.elapsed().as_secs_f64();
        times.sort_by(f64::total_cmp);
        let tokens = ids[0].len();
        out.push(RawPoint {
            batch_size: b,
            tokens_per_input: tokens,
            forwards: times.len(),
            inputs_per_s: (times.len() * b) as f64 / total,
            tokens_per_s: (times.len() * b * tokens) as f64 / total,
            median_forward_s: times[times.len() / 2],
        });
    }
    Ok(out)
}
