//! Raw forward throughput: back-to-back batches on one replica, no HTTP, no queue. The ceiling
//! the served throughput is compared with (`runtime bench`, and the `throughput` cargo bench).
//! For a decoder, [`raw_decode`] times batched decode steps instead.

use crate::model::{self, ModelError};
use profiles::Dtype;
use serde::Serialize;
use std::time::Instant;

/// One batch size's result.
#[derive(Debug, Clone, Serialize)]
pub struct RawPoint {
    /// Inputs per forward.
    pub batch_size: usize,
    /// Mean tokens per input over the timed forwards (fixed texts: every input has this length).
    pub tokens_per_input: f64,
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

/// The inputs of a raw benchmark.
pub enum Texts {
    /// `fixed_texts(256, words)`: every input the same length.
    Fixed(usize),
    /// One text per line of a file, e.g. the one `loadgen --dump-texts FILE` writes, so raw and
    /// served throughput are measured on the same length mix (the runtime does not link loadgen).
    File(std::path::PathBuf),
}

impl Texts {
    /// The texts themselves; a file's empty lines are skipped.
    pub fn generate(&self) -> std::io::Result<Vec<String>> {
        match self {
            Texts::Fixed(words) => Ok(fixed_texts(256, *words)),
            Texts::File(path) => {
                let texts: Vec<String> = std::fs::read_to_string(path)?
                    .lines()
                    .filter(|l| !l.trim().is_empty())
                    .map(String::from)
                    .collect();
                if texts.is_empty() {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("{} holds no text lines", path.display()),
                    ));
                }
                Ok(texts)
            }
        }
    }
}

/// Times back-to-back forwards at each batch size for about `seconds` (at least 3 forwards, after
/// 2 warm-up forwards that absorb kernel compilation and allocation). Successive forwards take
/// successive windows of the texts, so mixed lengths vary from batch to batch as served ones do.
pub fn raw(
    spec: &str,
    device: &str,
    dtype: Dtype,
    sizes: &[usize],
    seconds: f64,
    texts: &[String],
) -> Result<Vec<RawPoint>, ModelError> {
    let m = model::load(spec, &[device.to_string()], dtype)?;
    let ids: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| m.tokenizer.encode(t))
        .collect::<Result<_, _>>()
        .map_err(|e| ModelError::Load {
            model: spec.into(),
            reason: e.to_string(),
        })?;
    let backend = &m.replicas[0].1;
    let mut out = Vec::new();
    let mut next = 0usize;
    let mut take = |b: usize| -> Vec<&[u32]> {
        let batch = (0..b)
            .map(|i| ids[(next + i) % ids.len()].as_slice())
            .collect();
        next = (next + b) % ids.len();
        batch
    };
    for &b in sizes {
        let err = |e: crate::model::BackendError| ModelError::Load {
            model: spec.into(),
            reason: e.to_string(),
        };
        for _ in 0..2 {
            backend.embed(&take(b)).map_err(err)?;
        }
        let mut times = Vec::new();
        let mut tokens = 0usize;
        // A pipelined replica (GPU) is driven as the server drives it: the next batch is
        // launched before the current one is read back, so this is the device's ceiling, not
        // one batch's round trip. Times are then launch-to-results, overlapping the next launch.
        let mut pending: Option<(Instant, Box<dyn crate::model::Pending>)> = None;
        let t0 = Instant::now();
        while t0.elapsed().as_secs_f64() < seconds || times.len() < 3 {
            let batch = take(b);
            tokens += batch.iter().map(|s| s.len()).sum::<usize>();
            let t = Instant::now();
            if backend.pipelined() {
                let launched = backend.launch(&batch);
                if let Some((started, p)) = pending.replace((t, launched)) {
                    p.finish().map_err(err)?;
                    times.push(started.elapsed().as_secs_f64());
                }
            } else {
                // embed returns host vectors, so each call includes the device synchronisation.
                backend.embed(&batch).map_err(err)?;
                times.push(t.elapsed().as_secs_f64());
            }
        }
        if let Some((started, p)) = pending.take() {
            p.finish().map_err(err)?;
            times.push(started.elapsed().as_secs_f64());
        }
        let total = t0.elapsed().as_secs_f64();
        times.sort_by(f64::total_cmp);
        out.push(RawPoint {
            batch_size: b,
            tokens_per_input: tokens as f64 / (times.len() * b) as f64,
            forwards: times.len(),
            inputs_per_s: (times.len() * b) as f64 / total,
            tokens_per_s: tokens as f64 / total,
            median_forward_s: times[times.len() / 2],
        });
    }
    Ok(out)
}

/// One batch size's raw decode result (a decoder's own ceiling: no HTTP, no scheduler).
#[derive(Debug, Clone, Serialize)]
pub struct DecodePoint {
    /// Sequences advanced per step.
    pub batch_size: usize,
    /// Prompt tokens each sequence had cached before the timed steps.
    pub context_tokens: usize,
    /// Decode steps timed.
    pub steps: usize,
    /// Output tokens per second (batch_size × steps ÷ time).
    pub tokens_per_s: f64,
    /// Median time of one step, seconds.
    pub median_step_s: f64,
    /// Median time of a step's forward call, seconds: on a GPU, the host issuing the kernels
    /// (the engine's `forward` phase).
    pub median_forward_s: f64,
    /// Median time from the forward's return to the ids on the host, seconds: the draw, and on
    /// a GPU the wait for the step (the engine's `sample` phase).
    pub median_sample_s: f64,
    /// Fresh prompts prefilled in every timed step beside the decodes (0: decode only).
    pub prefill_chunks: usize,
    /// Tokens per such prompt.
    pub prefill_tokens: usize,
    /// Whether steps overlapped ([`DecodeOptions::overlap`]).
    pub overlap: bool,
}

/// What [`raw_decode`] measures.
#[derive(Debug, Clone)]
pub struct DecodeOptions {
    /// Batch sizes (sequences per step).
    pub sizes: Vec<usize>,
    /// Prompt tokens prefilled (untimed) into every sequence first.
    pub context_tokens: usize,
    /// Decode steps timed per batch size (after 2 untimed ones).
    pub steps: usize,
    /// Sampling temperature of every sequence: 0 is greedy; above 0 samples on the device
    /// as the engine does for plain temperature requests, so the difference is sampling's cost.
    pub temperature: f32,
    /// `(chunks, tokens)`: every timed step also prefills this many fresh prompts of this
    /// length, as a served step admits newcomers, so a mixed step's cost can be compared with
    /// a pure decode step's. Their first tokens are not counted in `tokens_per_s`.
    pub prefill: Option<(usize, usize)>,
    /// Issue each step before reading the previous step's ids, the decodes reading their
    /// tokens on the device (the engine's overlap, `generate/engine.rs`). A step's time is
    /// then one loop: issuing it and reading the step before.
    pub overlap: bool,
}

/// Times decode steps of `b` sequences at once, each with `context_tokens` already cached, for
/// each batch size: the engine's ceiling in output tokens per second, which served throughput
/// is compared with.
pub fn raw_decode(
    spec: &str,
    device: &str,
    dtype: Dtype,
    o: &DecodeOptions,
) -> Result<Vec<DecodePoint>, ModelError> {
    use crate::generate::sampling::{draw_on_device, Placement};
    use crate::model::llama::{argmax, Chunk, DeviceTokens};
    use crate::model::readback::Readback;
    let m = model::lm::load(spec, &[device.to_string()], dtype)?;
    let model = &m.replicas[0].1;
    let err = |e: candle_core::Error| ModelError::Load {
        model: spec.into(),
        reason: e.to_string(),
    };
    if model.on_gpu() {
        // The KV write, the paged attention, the qkv-rope, the SwiGLU, the add-norm and the
        // draw are the project's own GPU kernels: check them where they run (the replica's own
        // device and dtype), before timing.
        crate::model::kv_write::self_check(model.device(), model::candle_dtype(dtype))
            .map_err(err)?;
        eprintln!("kv-write self-check on {device}: equal to scatter_set");
        // The model's head layout, then others, so a kernel change is checked beyond the
        // model timed: SmolLM2's 3 groups, multi-head with head_dim 16 and 8 groups with
        // head_dim 256 (the vector kernel's extremes), then 16 groups and head_dim 96 (the
        // generic kernel).
        let c = model.config();
        let mut worst = 0f32;
        for (h, kvh, hd) in [
            (c.num_attention_heads, c.kv_heads(), c.head_dim()),
            (9, 3, 64),
            (4, 4, 16),
            (8, 1, 256),
            (16, 1, 128),
            (12, 2, 96),
        ] {
            let w = crate::model::paged_attn::self_check(
                model.device(),
                model::candle_dtype(dtype),
                h,
                kvh,
                hd,
            )
            .map_err(err)?;
            worst = worst.max(w);
        }
        eprintln!("paged-attention self-check on {device}: within {worst:.2e} of matmul attention");
        type Check = fn(&candle_core::Device, candle_core::DType) -> candle_core::Result<f32>;
        let checks: [(&str, Check, &str); 3] = [
            (
                "qkv-rope",
                crate::model::qkv_rope::self_check,
                "bias, copy and rope",
            ),
            (
                "swiglu",
                crate::model::swiglu::self_check,
                "silu(gate) * up",
            ),
            (
                "add-rms-norm",
                crate::model::add_norm::self_check,
                "add then rms_norm",
            ),
        ];
        for (name, check, against) in checks {
            let worst = check(model.device(), model::candle_dtype(dtype)).map_err(err)?;
            eprintln!("{name} self-check on {device}: within {worst:.2e} of {against}");
        }
        crate::model::draw::self_check(model.device()).map_err(err)?;
        eprintln!("draw self-check on {device}: the same tokens as its CPU twin");
    }
    let vocab = model.config().vocab_size as u32;
    let mut out = Vec::new();
    for &b in &o.sizes {
        let mut caches = (0..b)
            .map(|_| model.new_cache(o.context_tokens + o.steps + 3))
            .collect::<Result<Vec<_>, _>>()
            .map_err(err)?;
        let mut last = Vec::with_capacity(b);
        for (i, c) in caches.iter_mut().enumerate() {
            let prompt: Vec<u32> = (0..o.context_tokens as u32)
                .map(|j| 16 + (i as u32 * 7919 + j * 104_729) % (vocab - 16))
                .collect();
            let l = model
                .step(&mut [Chunk {
                    tokens: &prompt,
                    cache: c,
                    logits: true,
                }])
                .map_err(err)?;
            last.push(argmax(l[0].as_ref().expect("asked for logits")));
        }
        // Newcomers (fresh caches each step, freed after it) come first, as the engine lays
        // out a step.
        let (np, lp) = o.prefill.unwrap_or((0, 0));
        let placement = vec![
            if o.temperature > 0.0 {
                Placement::Device {
                    temperature: o.temperature,
                }
            } else {
                Placement::Greedy
            };
            np + b
        ];
        let (mut times, mut forwards, mut samples) = (Vec::new(), Vec::new(), Vec::new());
        // Overlapped: decode i reads its token from row np + i of the previous step's ids.
        let rows: Vec<Option<u32>> = (0..np)
            .map(|_| None)
            .chain((0..b).map(|i| Some((np + i) as u32)))
            .collect();
        let (mut readback, mut drawn) = (Readback::new(), None);
        for step in 0..o.steps + 2 {
            if step == 2 {
                times.clear();
                forwards.clear();
                samples.clear();
                crate::model::profiler_window(true);
            }
            let tokens: Vec<[u32; 1]> = last.iter().map(|&t| [t]).collect();
            let prompt: Vec<u32> = (0..lp as u32)
                .map(|j| 16 + (step as u32 * 31 + j * 104_729) % (vocab - 16))
                .collect();
            let mut fresh = (0..np)
                .map(|_| model.new_cache(lp + 1))
                .collect::<Result<Vec<_>, _>>()
                .map_err(err)?;
            let mut chunks: Vec<Chunk<'_>> = fresh
                .iter_mut()
                .map(|cache| Chunk {
                    tokens: &prompt,
                    cache,
                    logits: true,
                })
                .collect();
            chunks.extend(Chunk::decodes(&tokens, &mut caches));
            // Timed as the engine runs a step: forward, then the ids drawn on the device.
            let t = Instant::now();
            let from_device = drawn.as_ref().map(|ids| DeviceTokens { ids, rows: &rows });
            let logits = model.forward_with(&mut chunks, from_device).map_err(err)?;
            let tf = Instant::now();
            let ids =
                draw_on_device(&logits.expect("asked for logits"), &placement).map_err(err)?;
            if readback.is_pending() {
                last = readback.take().map_err(err)?[np..].to_vec();
            }
            readback.start(&ids).map_err(err)?;
            if o.overlap {
                drawn = Some(ids);
            } else {
                last = readback.take().map_err(err)?[np..].to_vec();
            }
            forwards.push((tf - t).as_secs_f64());
            samples.push(tf.elapsed().as_secs_f64());
            times.push(t.elapsed().as_secs_f64());
        }
        if readback.is_pending() {
            // The last overlapped step's wait belongs to its time.
            let t = Instant::now();
            readback.take().map_err(err)?;
            if let Some(x) = times.last_mut() {
                *x += t.elapsed().as_secs_f64();
            }
        }
        crate::model::profiler_window(false);
        let total: f64 = times.iter().sum();
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        out.push(DecodePoint {
            batch_size: b,
            context_tokens: o.context_tokens,
            steps: times.len(),
            tokens_per_s: (b * times.len()) as f64 / total,
            median_step_s: median(&mut times),
            median_forward_s: median(&mut forwards),
            median_sample_s: median(&mut samples),
            prefill_chunks: np,
            prefill_tokens: lp,
            overlap: o.overlap,
        });
    }
    Ok(out)
}

/// What one kind of op costs the host to issue, and the wall time per op once the device has
/// run them all ([`host_costs`]).
#[derive(Debug, Clone, Serialize)]
pub struct HostCost {
    /// The op (see [`host_costs`]).
    pub op: &'static str,
    /// Rows of its operands (the batch's tokens).
    pub rows: usize,
    /// Calls timed.
    pub calls: usize,
    /// Host time to issue one call, µs (on a GPU: until the launch returns).
    pub host_us: f64,
    /// Wall time per call including the wait for the device at the end, µs.
    pub wall_us: f64,
}

/// Times the host side of the ops a decoder step is made of, at `rows` rows and the model's
/// own widths: each op called `calls` times back to back without waiting, then once for the
/// device.
///
/// Why: on a GPU a served step at a few hundred sequences is bound by the host issuing its
/// ~250 kernels, 12–20 µs each on the H200's host (`results/generate-h200/stream/`), several
/// times what a bare kernel launch costs. This says which part of an op's cost is the launch
/// and which is candle's bookkeeping (an allocation per output, a function lookup per launch,
/// cuBLAS's set-up), so the next change to the step is chosen from numbers.
pub fn host_costs(
    spec: &str,
    device: &str,
    dtype: Dtype,
    rows: usize,
    calls: usize,
) -> Result<Vec<HostCost>, ModelError> {
    use crate::model::add_norm::add_rms_norm;
    use crate::model::qkv_rope::{qkv_rope, table, Heads};
    use crate::model::swiglu::swiglu;
    use candle_core::{DType, Tensor};
    let m = model::lm::load(spec, &[device.to_string()], dtype)?;
    let model = &m.replicas[0].1;
    let err = |e: candle_core::Error| ModelError::Load {
        model: spec.into(),
        reason: format!("host-cost probe: {e}"),
    };
    let c = model.config().clone();
    let dev = model.device().clone();
    let dt = model::candle_dtype(dtype);
    let (h, inter) = (c.hidden_size, c.intermediate_size);
    let heads = Heads {
        heads: c.num_attention_heads,
        kv_heads: c.kv_heads(),
        head_dim: c.head_dim(),
        interleaved: false,
    };
    let qkv_w = (heads.heads + 2 * heads.kv_heads) * heads.head_dim;
    let random = |cols: usize| {
        Tensor::randn(0f32, 1.0, (rows, cols), &dev)
            .and_then(|t| t.to_dtype(dt))
            .map_err(err)
    };
    let (x, y, gate_up, qkv) = (random(h)?, random(h)?, random(2 * inter)?, random(qkv_w)?);
    let w = (Tensor::randn(0f32, 0.05, (h, h), &dev).and_then(|t| t.to_dtype(dt))).map_err(err)?;
    let norm = Tensor::ones(h, dt, &dev).map_err(err)?;
    let positions = 2048;
    let tab = table(positions, heads.head_dim, 10_000.0);
    let tab = Tensor::from_vec(tab, (positions, heads.head_dim), &dev).map_err(err)?;
    let pos: Vec<u32> = (0..rows as u32).map(|p| p % positions as u32).collect();
    let pos = Tensor::from_vec(pos, rows, &dev).map_err(err)?;
    let ids: Vec<u32> = (0..rows as u32).collect();
    type Op<'a> = Box<dyn Fn() -> candle_core::Result<()> + 'a>;
    let ops: Vec<(&'static str, Op<'_>)> = vec![
        // A step's small host arrays (token ids, positions, KV rows, block tables).
        (
            "upload_u32",
            Box::new(|| Tensor::from_slice(&ids, rows, &dev).map(drop)),
        ),
        // An allocation and a driver memset, no kernel.
        (
            "zeros",
            Box::new(|| Tensor::zeros((rows, h), dt, &dev).map(drop)),
        ),
        // candle's own elementwise kernel (allocation, function lookup, launch).
        ("candle_add", Box::new(|| (&x + &y).map(drop))),
        // cuBLAS through candle.
        ("matmul", Box::new(|| x.matmul(&w.t()?).map(drop))),
        // The runtime's own kernels.
        (
            "add_rms_norm",
            Box::new(|| add_rms_norm(&x, &y, &norm, 1e-6).map(drop)),
        ),
        ("swiglu", Box::new(|| swiglu(&gate_up).map(drop))),
        (
            "qkv_rope",
            Box::new(|| qkv_rope(&qkv, None, &tab, &pos, heads).map(drop)),
        ),
        // A view and a copy: what a layout change costs.
        ("transpose_copy", Box::new(|| x.t()?.contiguous().map(drop))),
        ("to_f32", Box::new(|| x.to_dtype(DType::F32).map(drop))),
    ];
    let mut out = Vec::new();
    for (name, op) in &ops {
        let run = |n: usize| -> candle_core::Result<(f64, f64)> {
            dev.synchronize()?;
            let t0 = Instant::now();
            for _ in 0..n {
                op()?;
            }
            let issued = t0.elapsed().as_secs_f64();
            dev.synchronize()?;
            Ok((issued, t0.elapsed().as_secs_f64()))
        };
        run(5).map_err(err)?;
        let (issued, wall) = run(calls).map_err(err)?;
        out.push(HostCost {
            op: name,
            rows,
            calls,
            host_us: issued * 1e6 / calls as f64,
            wall_us: wall * 1e6 / calls as f64,
        });
    }
    Ok(out)
}
