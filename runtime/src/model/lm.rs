//! Generation models: which specs name a decoder, and loading one replica per device with its
//! tokenizer and chat template.
//!
//! - `synthetic:smollm2-135m` (the default generation model), `synthetic:qwen2.5-0.5b` (for
//!   GPUs), `synthetic:llama-tiny` (tests): the real shapes, deterministic random weights, the
//!   built-in tokenizer and a ChatML template. No download; timings are the architecture's.
//! - `*.gguf`: llama.cpp's format, e.g. SmolLM2-135M-Instruct.Q4_1.gguf (`scripts/fetch-smollm2.sh`).
//! - A Hugging Face folder whose `config.json` names a `…ForCausalLM` architecture (Llama,
//!   Qwen2): `model.safetensors`, `tokenizer.json`, and the template of `tokenizer_config.json`.

use super::chat::{ChatTemplate, CHATML};
use super::gguf;
use super::llama::{Llama, LlamaConfig};
use super::lm_tokenizer::LmTokenizer;
use super::{
    candle_dtype, random_tensors, replica_label, resolve_devices, ModelError, SYNTHETIC_SEED,
};
use candle_core::Tensor;
use candle_nn::VarBuilder;
use profiles::Dtype;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The synthetic decoder shapes.
pub const SYNTHETIC: &[&str] = &[
    "synthetic:smollm2-135m",
    "synthetic:qwen2.5-0.5b",
    "synthetic:llama-tiny",
];

/// Where a decoder comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum LmSource {
    /// Built-in shape, random weights.
    Synthetic(LlamaConfig),
    /// A GGUF file.
    Gguf(PathBuf),
    /// A Hugging Face folder.
    Folder(PathBuf),
}

/// A decoder loaded on every device of a profile.
pub struct LoadedLm {
    /// Prompt and output tokenizer.
    pub tokenizer: Arc<LmTokenizer>,
    /// Chat template (the model's own, or ChatML).
    pub chat: Arc<ChatTemplate>,
    /// One replica per device, with its label.
    pub replicas: Vec<(String, Arc<Llama>)>,
    /// Ids that end a generation.
    pub eos: Vec<u32>,
    /// Longest prompt + output the model accepts.
    pub max_positions: usize,
    /// KV bytes per token (reported at start, for sizing `kv_cache_tokens`).
    pub kv_bytes_per_token: usize,
    /// Model name for responses.
    pub name: String,
}

/// `Some` when `spec` names a decoder; errors for a decoder spec that cannot be used.
pub fn resolve(spec: &str) -> Result<Option<LmSource>, String> {
    let synthetic = match spec {
        "synthetic:smollm2-135m" => Some(LlamaConfig::smollm2_135m()),
        "synthetic:qwen2.5-0.5b" => Some(LlamaConfig::qwen2_5_0_5b()),
        "synthetic:llama-tiny" => Some(LlamaConfig::tiny()),
        _ => None,
    };
    if let Some(c) = synthetic {
        return Ok(Some(LmSource::Synthetic(c)));
    }
    let path = Path::new(spec);
    if spec.ends_with(".gguf") {
        if !path.is_file() {
            return Err(
                "no such GGUF file (for SmolLM2-135M-Instruct run scripts/fetch-smollm2.sh)".into(),
            );
        }
        return Ok(Some(LmSource::Gguf(path.to_path_buf())));
    }
    let config = path.join("config.json");
    let Ok(text) = std::fs::read_to_string(&config) else {
        return Ok(None);
    };
    if !text.contains("ForCausalLM") {
        return Ok(None);
    }
    for f in ["model.safetensors", "tokenizer.json"] {
        if !path.join(f).is_file() {
            return Err(format!(
                "folder has no {f} (a Hugging Face decoder folder needs config.json, model.safetensors and tokenizer.json)"
            ));
        }
    }
    Ok(Some(LmSource::Folder(path.to_path_buf())))
}

/// Loads the decoder once per device.
pub fn load(spec: &str, devices: &[String], dtype: Dtype) -> Result<LoadedLm, ModelError> {
    let lerr = |reason: String| ModelError::Load {
        model: spec.to_string(),
        reason,
    };
    let source = resolve(spec)
        .map_err(lerr)?
        .ok_or_else(|| lerr("is not a generation model".into()))?;
    let devs = resolve_devices(devices)?;
    let dt = candle_dtype(dtype);
    let (config, weights, tokenizer, template, interleaved) = match &source {
        LmSource::Synthetic(c) => (
            c.clone(),
            Weights::Tensors(random_tensors(c.weight_shapes(), SYNTHETIC_SEED)),
            LmTokenizer::builtin(c.vocab_size),
            (CHATML.to_string(), String::new(), "<|im_end|>".to_string()),
            false,
        ),
        LmSource::Gguf(path) => {
            let g = gguf::read(path, dt).map_err(|e| lerr(format!("{}: {e}", path.display())))?;
            let t = g.chat_template.unwrap_or_else(|| CHATML.to_string());
            (
                g.config,
                Weights::Tensors(g.weights),
                g.tokenizer,
                (t, g.bos_eos.0, g.bos_eos.1),
                g.interleaved_rope,
            )
        }
        LmSource::Folder(dir) => {
            let text = std::fs::read_to_string(dir.join("config.json"))
                .map_err(|e| lerr(format!("config.json: {e}")))?;
            let c: LlamaConfig =
                serde_json::from_str(&text).map_err(|e| lerr(format!("config.json: {e}")))?;
            let tok = LmTokenizer::from_file(&dir.join("tokenizer.json"))
                .map_err(|e| lerr(e.to_string()))?;
            let (t, bos, eos) = folder_template(dir);
            (
                c,
                Weights::File(dir.join("model.safetensors")),
                tok,
                (t, bos, eos),
                false,
            )
        }
    };
    config.check().map_err(lerr)?;
    let chat = ChatTemplate::new(&template.0, &template.1, &template.2)
        .map_err(|e| lerr(e.to_string()))?;
    let mut eos = config.eos_ids();
    // Chat models end a turn with the template's end token even when config.json names
    // another EOS (SmolLM2: <|endoftext|> in the config, <|im_end|> in the template).
    for t in ["<|im_end|>", "<|endoftext|>", "<|eot_id|>"] {
        if let Some(id) = tokenizer.token_id(t) {
            if !eos.contains(&id) {
                eos.push(id);
            }
        }
    }
    let mut replicas = Vec::new();
    let mut cpus = 0;
    for (dev, name) in devs.iter().zip(devices) {
        let vb = match &weights {
            Weights::Tensors(w) => {
                let moved = w
                    .iter()
                    .map(|(k, t)| Ok((k.clone(), t.to_device(dev)?)))
                    .collect::<candle_core::Result<HashMap<String, Tensor>>>()
                    .map_err(|e| lerr(e.to_string()))?;
                VarBuilder::from_tensors(moved, dt, dev)
            }
            // SAFETY: memory-mapped read-only, as in the BERT loader.
            Weights::File(f) => unsafe { VarBuilder::from_mmaped_safetensors(&[f], dt, dev) }
                .map_err(|e| lerr(format!("model.safetensors: {e}")))?,
        };
        let m = Llama::load(vb, &config, interleaved).map_err(|e| lerr(e.to_string()))?;
        replicas.push((replica_label(dev, name, &mut cpus), Arc::new(m)));
    }
    Ok(LoadedLm {
        tokenizer: Arc::new(tokenizer),
        chat: Arc::new(chat),
        replicas,
        eos,
        max_positions: config.max_position_embeddings,
        kv_bytes_per_token: config.kv_bytes_per_token(dt),
        name: spec.to_string(),
    })
}

enum Weights {
    Tensors(HashMap<String, Tensor>),
    File(PathBuf),
}

/// The chat template and BOS/EOS texts of `tokenizer_config.json`, ChatML when absent.
fn folder_template(dir: &Path) -> (String, String, String) {
    let cfg: Option<serde_json::Value> = std::fs::read_to_string(dir.join("tokenizer_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    let text = |k: &str| {
        cfg.as_ref()
            .and_then(|c| c.get(k))
            .and_then(|v| {
                v.as_str()
                    .or_else(|| v.get("content").and_then(|c| c.as_str()))
            })
            .map(String::from)
    };
    (
        text("chat_template").unwrap_or_else(|| CHATML.to_string()),
        text("bos_token").unwrap_or_default(),
        text("eos_token").unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::llama::Chunk;
    use candle_core::quantized::gguf_file::Value;
    use candle_core::{DType, Device};

    /// A byte-level vocabulary (256 symbols, a few merges, ChatML specials) as GGUF stores it.
    fn vocab() -> (Vec<String>, Vec<String>, Vec<i32>) {
        let mut alphabet: Vec<char> = tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet()
            .into_iter()
            .collect();
        alphabet.sort();
        let mut tokens: Vec<String> = alphabet.iter().map(|c| c.to_string()).collect();
        let merges = vec!["h e".to_string(), "l l".to_string(), "he ll".to_string()];
        tokens.extend(["he", "ll", "hell"].map(String::from));
        let mut types = vec![1; tokens.len()];
        for s in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] {
            tokens.push(s.into());
            types.push(3);
        }
        (tokens, merges, types)
    }

    fn logits(m: &Llama, ids: &[u32]) -> Vec<f32> {
        let mut cache = m.new_cache(ids.len()).unwrap();
        m.step(&mut [Chunk {
            tokens: ids,
            cache: &mut cache,
            logits: true,
        }])
        .unwrap()
        .pop()
        .flatten()
        .unwrap()
    }

    #[test]
    fn a_gguf_file_loads_with_its_tokenizer_template_and_weights() {
        let (tokens, merges, types) = vocab();
        let c = LlamaConfig {
            vocab_size: tokens.len(),
            attention_bias: true,
            ..LlamaConfig::tiny()
        };
        let weights = random_tensors(c.weight_shapes(), 7);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        let u = |x: usize| Value::U32(x as u32);
        let strs =
            |v: &[String]| Value::Array(v.iter().map(|s| Value::String(s.clone())).collect());
        let eos = (tokens.len() - 1) as u32;
        let md = vec![
            ("general.architecture", Value::String("qwen2".into())),
            ("qwen2.block_count", u(c.num_hidden_layers)),
            ("qwen2.embedding_length", u(c.hidden_size)),
            ("qwen2.feed_forward_length", u(c.intermediate_size)),
            ("qwen2.attention.head_count", u(c.num_attention_heads)),
            ("qwen2.attention.head_count_kv", u(c.kv_heads())),
            (
                "qwen2.attention.layer_norm_rms_epsilon",
                Value::F32(c.rms_norm_eps as f32),
            ),
            ("qwen2.rope.freq_base", Value::F32(c.rope_theta as f32)),
            ("qwen2.context_length", u(c.max_position_embeddings)),
            ("tokenizer.ggml.model", Value::String("gpt2".into())),
            ("tokenizer.ggml.tokens", strs(&tokens)),
            ("tokenizer.ggml.merges", strs(&merges)),
            (
                "tokenizer.ggml.token_type",
                Value::Array(types.iter().map(|t| Value::I32(*t)).collect()),
            ),
            ("tokenizer.ggml.eos_token_id", Value::U32(eos)),
            (
                "tokenizer.chat_template",
                Value::String(
                    "{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}"
                        .into(),
                ),
            ),
        ];
        gguf::write_f32(&path, &md, &weights).unwrap();
        let m = load(path.to_str().unwrap(), &["cpu".into()], Dtype::F32).unwrap();
        assert_eq!(m.eos, vec![eos, eos - 2]);
        // Byte-level BPE from the metadata: the merges apply, digits split, text round-trips.
        let ids = m.tokenizer.encode("hello 42").unwrap();
        assert_eq!(ids[0], 256 + 2, "'hell' is one merged token: {ids:?}");
        assert_eq!(m.tokenizer.decode(&ids).unwrap(), "hello 42");
        let prompt = m
            .chat
            .render(&[crate::model::chat::Message {
                role: "user".into(),
                content: "hello".into(),
            }])
            .unwrap();
        let ids = m.tokenizer.encode(&prompt).unwrap();
        assert_eq!(
            ids.first(),
            Some(&(eos - 1)),
            "<|im_start|> is one special id"
        );
        // The same weights built directly compute the same logits.
        let direct = Llama::load(
            VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu),
            &c,
            false,
        )
        .unwrap();
        let (a, b) = (logits(&m.replicas[0].1, &ids), logits(&direct, &ids));
        let diff = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        assert!(diff < 1e-5, "max logit difference {diff}");
    }

    #[test]
    fn a_hugging_face_folder_loads() {
        let dir = tempfile::tempdir().unwrap();
        let c = LlamaConfig {
            vocab_size: 8,
            ..LlamaConfig::tiny()
        };
        let config = serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "vocab_size": 8, "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_hidden_layers,
            "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.kv_heads(),
            "max_position_embeddings": 64, "tie_word_embeddings": true, "eos_token_id": 1,
            "rope_theta": c.rope_theta, "rms_norm_eps": c.rms_norm_eps,
        });
        std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
        let weights = random_tensors(c.weight_shapes(), 3);
        candle_core::safetensors::save(&weights, dir.path().join("model.safetensors")).unwrap();
        let tokenizer = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [{"id": 1, "content": "</s>", "single_word": false, "lstrip": false,
                              "rstrip": false, "normalized": false, "special": true}],
            "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
            "decoder": null,
            "model": {"type": "WordLevel", "unk_token": "<unk>",
                      "vocab": {"<unk>": 0, "</s>": 1, "the": 2, "cat": 3, "sat": 4, "on": 5, "a": 6, "mat": 7}},
        });
        std::fs::write(dir.path().join("tokenizer.json"), tokenizer.to_string()).unwrap();
        let spec = dir.path().to_str().unwrap();
        assert!(matches!(resolve(spec), Ok(Some(LmSource::Folder(_)))));
        let m = load(spec, &["cpu".into()], Dtype::F32).unwrap();
        assert_eq!(m.tokenizer.encode("the cat sat").unwrap(), vec![2, 3, 4]);
        assert_eq!(m.eos, vec![1]);
        assert_eq!(m.max_positions, 64);
        let direct = Llama::load(
            VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu),
            &c,
            false,
        )
        .unwrap();
        assert_eq!(
            logits(&m.replicas[0].1, &[2, 3, 4]),
            logits(&direct, &[2, 3, 4])
        );
        // A folder missing its weights is refused with the file's name.
        std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
        assert!(resolve(spec).unwrap_err().contains("model.safetensors"));
    }
}
