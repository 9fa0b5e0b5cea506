//! Models: the `Backend` a device worker drives, and loading one replica per device.
//!
//! `synthetic:minilm` is BERT with all-MiniLM-L6-v2's exact shape and deterministic random weights
//! (no download), so every timing on it is the timing of the real architecture. `synthetic:tiny`
//! (2 layers, hidden 32) exists for tests of the serving machinery, where model speed is noise.
//! Anything else is a path to a Hugging Face BERT folder.

pub mod add_norm;
pub mod bert;
pub mod chat;
pub mod draw;
pub mod gguf;
pub mod kv_write;
pub mod llama;
pub mod lm;
pub mod lm_tokenizer;
#[cfg(feature = "cuda")]
pub(crate) mod nvrtc;
pub mod paged_attn;
pub mod qkv_rope;
pub mod readback;
pub mod swiglu;
pub mod tokenize;

use bert::{Bert, BertConfig};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use profiles::{parse_device, DeviceSpec, Dtype};
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokenize::{BuiltinTokenizer, HfTokenizer, Tokenize};

/// Errors while resolving devices or loading a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A device the build or the machine cannot provide.
    #[error("device {device:?}: {reason}")]
    Device {
        /// Device string from the profile.
        device: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// The model spec or files are unusable.
    #[error("model {model:?}: {reason}")]
    Load {
        /// Model spec from the profile.
        model: String,
        /// What is wrong.
        reason: String,
    },
}

/// Why a backend could not compute a batch.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// A tensor operation failed (shape, device, out of memory).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The backend refused the batch (a test double's injected fault, an input it cannot take).
    #[error("{0}")]
    Refused(String),
}

/// One model replica, driven by one device's worker threads. Synchronous on purpose: it runs on
/// dedicated OS threads, never on the async executor.
pub trait Backend: Send + Sync {
    /// One unit-norm embedding per input, in order.
    fn embed(&self, batch: &[&[u32]]) -> Result<Vec<Vec<f32>>, BackendError>;

    /// Starts a batch; [`Pending::finish`] (on the same thread) gives its vectors and the
    /// forwards it took. A backend that computes asynchronously returns as soon as the work is
    /// queued; the default computes here, in one forward.
    fn launch(&self, batch: &[&[u32]]) -> Box<dyn Pending> {
        Box::new(Ready(self.embed(batch).map(|v| (v, 1))))
    }

    /// One thread should drive this replica, launching the next batch before finishing the
    /// current one. True for GPUs: threads sharing one CUDA stream contend (measured on an H100:
    /// a 4-input forward took 2.7 ms from one thread, 28 ms from each of four), while queueing
    /// batch k+1 behind batch k keeps the device busy during the host work between them.
    fn pipelined(&self) -> bool {
        false
    }
}

/// A batch started by [`Backend::launch`].
pub trait Pending {
    /// Waits for the batch: one vector per input, in order, and the forwards it took.
    fn finish(self: Box<Self>) -> Result<(Vec<Vec<f32>>, usize), BackendError>;
}

/// A batch computed when it was launched.
pub(crate) struct Ready(pub(crate) Result<(Vec<Vec<f32>>, usize), BackendError>);

impl Pending for Ready {
    fn finish(self: Box<Self>) -> Result<(Vec<Vec<f32>>, usize), BackendError> {
        self.0
    }
}

impl Pending for bert::Launched {
    fn finish(self: Box<Self>) -> Result<(Vec<Vec<f32>>, usize), BackendError> {
        Ok(bert::Launched::finish(*self)?)
    }
}

impl Backend for Bert {
    fn embed(&self, batch: &[&[u32]]) -> Result<Vec<Vec<f32>>, BackendError> {
        Ok(Bert::embed(self, batch)?)
    }

    fn launch(&self, batch: &[&[u32]]) -> Box<dyn Pending> {
        match Bert::launch(self, batch) {
            Ok(l) => Box::new(l),
            Err(e) => Box::new(Ready(Err(e.into()))),
        }
    }

    fn pipelined(&self) -> bool {
        self.on_gpu()
    }
}

/// A model loaded on every device of a profile.
pub struct LoadedModel {
    /// Shared tokenizer (tokenization runs before batching, off the async workers).
    pub tokenizer: Arc<dyn Tokenize>,
    /// One replica per device, with its label (`cpu:0`, `cuda:1`…) for metrics.
    pub replicas: Vec<(String, Arc<dyn Backend>)>,
    /// Embedding width.
    pub dim: usize,
    /// Longest input, in tokens: the position table's size, or the folder's sentence-transformers
    /// `max_seq_length` when that is smaller.
    pub max_positions: usize,
    /// Model name reported in responses.
    pub name: String,
}

/// Checks the device list against this build before anything is bound or loaded, so a CPU-only
/// binary refuses `cuda:0` with a message rather than failing deep inside candle.
pub fn resolve_devices(devices: &[String]) -> Result<Vec<Device>, ModelError> {
    let mut out = Vec::new();
    for d in devices {
        match parse_device(d) {
            Some(DeviceSpec::Cpu) => out.push(Device::Cpu),
            Some(DeviceSpec::Cuda(n)) => {
                if !cfg!(feature = "cuda") {
                    return Err(ModelError::Device {
                        device: d.clone(),
                        reason: "this runtime was built without CUDA; rebuild with \
                                 `--features cuda` (see README, GPUs) or use \"cpu\""
                            .into(),
                    });
                }
                let dev = Device::new_cuda(n).map_err(|e| ModelError::Device {
                    device: d.clone(),
                    reason: e.to_string(),
                })?;
                #[cfg(feature = "cuda")]
                keep_pool_memory(&dev).map_err(|reason| ModelError::Device {
                    device: d.clone(),
                    reason,
                })?;
                out.push(dev);
            }
            None => {
                return Err(ModelError::Device {
                    device: d.clone(),
                    reason: "expected \"cpu\" or \"cuda:N\"".into(),
                })
            }
        }
    }
    Ok(out)
}

/// Lets the device's memory pool keep what a step frees instead of handing it back to the
/// driver at every synchronisation.
///
/// Why: candle allocates every op's output with `cuMemAllocAsync` from the device's default
/// pool, whose release threshold is 0, so each step's token copy (a stream synchronisation)
/// returned the step's memory and the next step mapped it again, a few hundred MB a step at
/// 512 sequences (the logits alone are 466 MB). PyTorch's allocator sets the same threshold
/// in its async mode. The pool then holds the high-water mark of one step's allocations.
#[cfg(feature = "cuda")]
fn keep_pool_memory(device: &Device) -> Result<(), String> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let Device::Cuda(d) = device else {
        return Ok(());
    };
    let cu = d.cuda_stream().context().cu_device();
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut threshold = u64::MAX;
    // SAFETY: plain driver calls on a device the context above opened; `pool` and `threshold`
    // outlive them, and the attribute takes a u64.
    unsafe {
        sys::cuDeviceGetDefaultMemPool(&mut pool, cu)
            .result()
            .map_err(|e| format!("reading the default memory pool: {e}"))?;
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
        .result()
        .map_err(|e| format!("setting the memory pool's release threshold: {e}"))?;
    }
    Ok(())
}

/// Opens (`true`) or closes the window that a CUDA profiler started with collection off records
/// (`ncu --profile-from-start off`), so only chosen steps are profiled: `runtime bench` opens it
/// around its timed decode steps, the generation engine around the steps `serve
/// --cuda-profile-steps` names. Under ncu every kernel is serialized and timed (~11 ms each on
/// an H200), so profiling everything before them (one prompt's prefill is ~850 kernels) outlasted
/// a 200 s run before a single chosen step (results/generate-h200/tuned/). Without a profiler
/// attached, or on the CPU build, it does nothing; its errors are ignored because no figure
/// depends on it.
pub fn profiler_window(open: bool) {
    #[cfg(feature = "cuda")]
    {
        use candle_core::cuda_backend::cudarc::driver::{profiler_start, profiler_stop};
        let _ = if open {
            profiler_start()
        } else {
            profiler_stop()
        };
    }
    #[cfg(not(feature = "cuda"))]
    let _ = open;
}

/// The self-checks' limits on [`rel_err`] for the elementwise kernels: in f32, and in f16/bf16
/// (8 bits of mantissa: an input's rounding alone moves an output by up to ~2⁻⁷ of itself).
pub(crate) const ELEMENTWISE_LIMITS: [f32; 2] = [1e-5, 2e-2];

/// Largest `|got − want| / (|want| + 1)` over every element, both f32 tensors of one shape:
/// relative to an output's size, except near zero where it is absolute.
pub(crate) fn rel_err(got: &Tensor, want: &Tensor) -> candle_core::Result<f32> {
    ((got - want)?.abs()? / (want.abs()? + 1.0)?)?
        .max_all()?
        .to_scalar::<f32>()
}

/// A kernel self-check's verdict: `worst` itself when within `limits` (`[f32, half]`, by
/// `dtype`), else an error naming the op, where it ran, its reference and both numbers. NaN
/// never passes.
pub(crate) fn judge_self_check(
    op: &str,
    against: &str,
    device: &Device,
    dtype: DType,
    worst: f32,
    limits: [f32; 2],
) -> candle_core::Result<f32> {
    let limit = if dtype == DType::F32 {
        limits[0]
    } else {
        limits[1]
    };
    if worst.is_nan() || worst > limit {
        candle_core::bail!(
            "{op} on {device:?} in {dtype:?} differs from {against} by {worst} (limit {limit})"
        );
    }
    Ok(worst)
}

pub(crate) fn candle_dtype(d: Dtype) -> DType {
    match d {
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::Bf16 => DType::BF16,
    }
}

/// Where a model's files are, or which synthetic shape it is.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    /// Built-in shape with random weights.
    Synthetic(BertConfig),
    /// A Hugging Face folder.
    Folder(PathBuf),
    /// A decoder for generation (see [`lm`]).
    Lm(lm::LmSource),
}

/// Parses a model spec; checks that a folder holds the three files it needs.
pub fn resolve_model(spec: &str) -> Result<ModelSource, ModelError> {
    let err = |reason: String| ModelError::Load {
        model: spec.to_string(),
        reason,
    };
    if let Some(lm) = lm::resolve(spec).map_err(err)? {
        return Ok(ModelSource::Lm(lm));
    }
    if let Some(shape) = spec.strip_prefix("synthetic:") {
        return match shape {
            "minilm" => Ok(ModelSource::Synthetic(BertConfig::minilm_l6())),
            "tiny" => Ok(ModelSource::Synthetic(BertConfig {
                hidden_size: 32,
                num_hidden_layers: 2,
                num_attention_heads: 4,
                intermediate_size: 64,
                ..BertConfig::minilm_l6()
            })),
            other => Err(err(format!(
                "unknown synthetic shape {other:?}; embeddings: synthetic:minilm, synthetic:tiny; \
                 generation: {}",
                lm::SYNTHETIC.join(", ")
            ))),
        };
    }
    let dir = Path::new(spec);
    if !dir.is_dir() {
        return Err(err("is neither synthetic:<shape> nor a folder".into()));
    }
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        if !dir.join(f).is_file() {
            return Err(err(format!("folder has no {f} (a Hugging Face BERT folder needs config.json, model.safetensors and tokenizer.json)")));
        }
    }
    Ok(ModelSource::Folder(dir.to_path_buf()))
}

/// Deterministic random weights with BERT's init scale (std 0.02, LayerNorm = identity), seeded
/// per tensor name so that every replica and every run computes the same function.
pub fn synthetic_weights(c: &BertConfig, seed: u64) -> HashMap<String, Tensor> {
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        (
            "embeddings.word_embeddings.weight".into(),
            vec![c.vocab_size, c.hidden_size],
        ),
        (
            "embeddings.position_embeddings.weight".into(),
            vec![c.max_position_embeddings, c.hidden_size],
        ),
        (
            "embeddings.token_type_embeddings.weight".into(),
            vec![c.type_vocab_size, c.hidden_size],
        ),
    ];
    let norm = |p: &str, v: &mut Vec<(String, Vec<usize>)>| {
        v.push((format!("{p}.LayerNorm.weight"), vec![c.hidden_size]));
        v.push((format!("{p}.LayerNorm.bias"), vec![c.hidden_size]));
    };
    norm("embeddings", &mut shapes);
    let lin = |p: String, i: usize, o: usize, v: &mut Vec<(String, Vec<usize>)>| {
        v.push((format!("{p}.weight"), vec![o, i]));
        v.push((format!("{p}.bias"), vec![o]));
    };
    let h = c.hidden_size;
    for l in 0..c.num_hidden_layers {
        let p = format!("encoder.layer.{l}");
        for n in ["query", "key", "value"] {
            lin(format!("{p}.attention.self.{n}"), h, h, &mut shapes);
        }
        lin(format!("{p}.attention.output.dense"), h, h, &mut shapes);
        norm(&format!("{p}.attention.output"), &mut shapes);
        lin(
            format!("{p}.intermediate.dense"),
            h,
            c.intermediate_size,
            &mut shapes,
        );
        lin(
            format!("{p}.output.dense"),
            c.intermediate_size,
            h,
            &mut shapes,
        );
        norm(&format!("{p}.output"), &mut shapes);
    }
    random_tensors(shapes, seed)
}

/// Uniform weights with std 0.02 (BERT's and Llama's init scale), seeded per tensor name so that
/// every replica and every run computes the same function; norm weights 1, biases 0.
pub(crate) fn random_tensors(
    shapes: Vec<(String, Vec<usize>)>,
    seed: u64,
) -> HashMap<String, Tensor> {
    let bound = 0.02 * 3f32.sqrt(); // uniform(-b, b) has std 0.02
    shapes
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let is_norm = name.ends_with("LayerNorm.weight") || name.ends_with("norm.weight");
            let data: Vec<f32> = if is_norm {
                vec![1.0; n]
            } else if name.ends_with(".bias") {
                vec![0.0; n]
            } else {
                let mut h = seed;
                for b in name.bytes() {
                    h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
                }
                let mut rng = rand::rngs::StdRng::seed_from_u64(h);
                (0..n).map(|_| rng.random_range(-bound..bound)).collect()
            };
            let t = Tensor::from_vec(data, shape, &Device::Cpu).expect("shape matches data");
            (name, t)
        })
        .collect()
}

/// A replica's metrics label: `cuda:N` as configured; CPU replicas numbered `cpu:0`, `cpu:1`…
/// in order (`counts` holds how many CPU replicas were labelled so far).
pub fn replica_label(dev: &Device, name: &str, cpus: &mut usize) -> String {
    if dev.is_cuda() {
        name.to_string()
    } else {
        *cpus += 1;
        format!("cpu:{}", *cpus - 1)
    }
}

/// Seed of the synthetic weights; fixed so results are comparable across runs and machines.
pub const SYNTHETIC_SEED: u64 = 0x5eed_ba7c;

/// Loads the model once per device. Synthetic weights are generated once and copied to each device.
pub fn load(spec: &str, devices: &[String], dtype: Dtype) -> Result<LoadedModel, ModelError> {
    let source = resolve_model(spec)?;
    let devs = resolve_devices(devices)?;
    let dt = candle_dtype(dtype);
    let lerr = |reason: String| ModelError::Load {
        model: spec.to_string(),
        reason,
    };
    // sentence-transformers cuts inputs at the folder's `max_seq_length` (256 for
    // all-MiniLM-L6-v2, whose position table holds 512): past it the runtime would embed text
    // the reference never saw and answer a different vector, so that is the limit served.
    let mut seq_limit = None;
    let (config, tokenizer, weights): (
        BertConfig,
        Arc<dyn Tokenize>,
        Option<HashMap<String, Tensor>>,
    ) = match &source {
        ModelSource::Synthetic(c) => (
            c.clone(),
            Arc::new(BuiltinTokenizer::new(c.vocab_size)),
            Some(synthetic_weights(c, SYNTHETIC_SEED)),
        ),
        ModelSource::Lm(_) => {
            return Err(lerr(
                "is a generation model; it serves /v1/completions and /v1/chat/completions".into(),
            ))
        }
        ModelSource::Folder(dir) => {
            let text = std::fs::read_to_string(dir.join("config.json"))
                .map_err(|e| lerr(format!("config.json: {e}")))?;
            let c: BertConfig =
                serde_json::from_str(&text).map_err(|e| lerr(format!("config.json: {e}")))?;
            let tok =
                HfTokenizer::load(&dir.join("tokenizer.json")).map_err(|e| lerr(e.to_string()))?;
            seq_limit = sentence_max_seq_length(dir).map_err(lerr)?;
            (c, Arc::new(tok), None)
        }
    };
    let mut replicas: Vec<(String, Arc<dyn Backend>)> = Vec::new();
    let mut counts = 0usize;
    for (dev, name) in devs.iter().zip(devices) {
        let vb = match (&source, &weights) {
            (ModelSource::Synthetic(_), Some(w)) => {
                let moved = w
                    .iter()
                    .map(|(k, t)| Ok((k.clone(), t.to_device(dev)?)))
                    .collect::<candle_core::Result<HashMap<_, _>>>()
                    .map_err(|e| lerr(e.to_string()))?;
                VarBuilder::from_tensors(moved, dt, dev)
            }
            (ModelSource::Folder(dir), _) => {
                let file = dir.join("model.safetensors");
                // SAFETY: the file is memory-mapped read-only; like every safetensors loader we
                // rely on nobody truncating it while the runtime runs.
                let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&file], dt, dev) }
                    .map_err(|e| lerr(format!("model.safetensors: {e}")))?;
                if vb.contains_tensor("bert.embeddings.word_embeddings.weight") {
                    vb.pp("bert")
                } else {
                    vb
                }
            }
            _ => unreachable!("synthetic sources always carry weights"),
        };
        let mut bert = Bert::load(vb, &config).map_err(|e| lerr(e.to_string()))?;
        // Diagnostics for the GPU investigation (results/gpu-h100.md): skip the warm-up, or
        // override the split cost it measures. Unset in normal use.
        if std::env::var_os("BATCHTUNE_SKIP_WARMUP").is_none() {
            bert.calibrate()
                .map_err(|e| lerr(format!("warm-up forward on {name}: {e}")))?;
        }
        if let Some(t) = std::env::var("BATCHTUNE_SPLIT_OVERHEAD_TOKENS")
            .ok()
            .and_then(|v| v.parse::<f64>().ok())
        {
            bert.set_overhead_tokens(t);
        }
        tracing::info!(
            device = %name,
            overhead_tokens = bert.overhead_tokens().round(),
            "replica warmed up; batches split by length where padding costs more than a forward"
        );
        replicas.push((replica_label(dev, name, &mut counts), Arc::new(bert)));
    }
    Ok(LoadedModel {
        tokenizer,
        replicas,
        dim: config.hidden_size,
        max_positions: seq_limit.map_or(config.max_position_embeddings, |l: usize| {
            l.min(config.max_position_embeddings)
        }),
        name: spec.to_string(),
    })
}

/// `max_seq_length` from a folder's `sentence_bert_config.json`, when it has one.
fn sentence_max_seq_length(dir: &std::path::Path) -> Result<Option<usize>, String> {
    let path = dir.join("sentence_bert_config.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(None);
    };
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("sentence_bert_config.json: {e}"))?;
    match v.get("max_seq_length") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(n) => n
            .as_u64()
            .filter(|&n| n > 0)
            .map(|n| Some(n as usize))
            .ok_or_else(|| {
                format!(
                    "sentence_bert_config.json: max_seq_length must be a positive integer, got {n}"
                )
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuda_refused_without_feature() {
        if cfg!(feature = "cuda") {
            return;
        }
        let e = resolve_devices(&["cuda:0".into()])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("cuda:0") && e.contains("--features cuda"), "{e}");
    }

    #[test]
    fn unknown_model_specs_are_explained() {
        let e = resolve_model("synthetic:huge").unwrap_err().to_string();
        assert!(e.contains("unknown synthetic shape"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let e = resolve_model(dir.path().to_str().unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("config.json"), "{e}");
    }

    #[test]
    fn padded_batch_matches_single_input() {
        let m = load("synthetic:tiny", &["cpu".into()], Dtype::F32).unwrap();
        let tok = &m.tokenizer;
        let short = tok.encode("short text").unwrap();
        let long = tok
            .encode("a considerably longer input with many more words in it than the other")
            .unwrap();
        let backend = &m.replicas[0].1;
        let alone = backend.embed(&[&short]).unwrap();
        let batched = backend.embed(&[&long, &short, &long]).unwrap();
        let diff: f32 = alone[0]
            .iter()
            .zip(&batched[1])
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(diff < 1e-5, "max diff {diff}");
        let norm: f32 = batched[0].iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4);
        assert_ne!(batched[0], batched[1]);
        // Mixed lengths are split into sub-batches on CPU; the order must survive.
        let texts = [
            "one",
            "two words here",
            "a much longer input that will be padded a lot more than the others",
            "four",
        ];
        let ids: Vec<Vec<u32>> = texts.iter().map(|t| tok.encode(t).unwrap()).collect();
        let refs: Vec<&[u32]> = ids.iter().map(|v| v.as_slice()).collect();
        let together = backend.embed(&refs).unwrap();
        for (i, r) in refs.iter().enumerate() {
            let alone = backend.embed(&[r]).unwrap();
            let d = alone[0]
                .iter()
                .zip(&together[i])
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(d < 1e-5, "input {i} moved by {d}");
        }
    }
}
