//! GGUF files (llama.cpp's format, e.g. `SmolLM2-135M-Instruct.Q4_1.gguf`): hyper-parameters,
//! tokenizer and chat template from the metadata, weights dequantized at load to the profile's
//! dtype (batched matmuls over dequantized weights beat candle's quantized matmul once several
//! sequences share a step; the price is memory: 4 bytes per parameter in f32).

use super::llama::{EosIds, LlamaConfig};
use super::lm_tokenizer::LmTokenizer;
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// Everything a GGUF file provides besides the weights' values.
pub struct GgufModel {
    /// Hyper-parameters, in Hugging Face terms.
    pub config: LlamaConfig,
    /// Tensors under Hugging Face names, dequantized, on the CPU.
    pub weights: HashMap<String, Tensor>,
    /// Byte-level BPE from `tokenizer.ggml.tokens` / `merges`.
    pub tokenizer: LmTokenizer,
    /// `tokenizer.chat_template`, when present.
    pub chat_template: Option<String>,
    /// Text of the BOS and EOS tokens (for templates).
    pub bos_eos: (String, String),
    /// True for Llama weights: llama.cpp permuted their q/k rows for interleaved RoPE.
    pub interleaved_rope: bool,
}

/// Reads a GGUF file. Errors are messages naming the missing key or tensor.
pub fn read(path: &Path, dtype: DType) -> Result<GgufModel, String> {
    let mut f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let content = Content::read(&mut f).map_err(|e| format!("not a GGUF file: {e}"))?;
    let md = &content.metadata;
    let get = |k: &str| md.get(k).ok_or_else(|| format!("metadata has no {k}"));
    let arch = get("general.architecture")?
        .to_string()
        .map_err(|e| e.to_string())?
        .clone();
    if arch != "llama" && arch != "qwen2" {
        return Err(format!(
            "architecture {arch:?} is not supported (llama and qwen2 are)"
        ));
    }
    let num = |k: &str| -> Result<usize, String> {
        let v = get(&format!("{arch}.{k}"))?;
        v.to_u32()
            .map(|x| x as usize)
            .or_else(|_| v.to_u64().map(|x| x as usize))
            .map_err(|e| format!("{arch}.{k}: {e}"))
    };
    let float = |k: &str, default: f64| -> f64 {
        md.get(&format!("{arch}.{k}"))
            .and_then(|v| v.to_f32().ok())
            .map(|x| x as f64)
            .unwrap_or(default)
    };
    let strings = |k: &str| -> Result<Vec<String>, String> {
        get(k)?
            .to_vec()
            .map_err(|e| format!("{k}: {e}"))?
            .iter()
            .map(|v| v.to_string().cloned().map_err(|e| format!("{k}: {e}")))
            .collect()
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let merges = strings("tokenizer.ggml.merges")?;
    let model = md
        .get("tokenizer.ggml.model")
        .and_then(|v| v.to_string().ok().cloned())
        .unwrap_or_default();
    if model != "gpt2" {
        return Err(format!(
            "tokenizer.ggml.model {model:?} is not supported (byte-level BPE, \"gpt2\", is)"
        ));
    }
    let id = |k: &str| md.get(k).and_then(|v| v.to_u32().ok());
    let eos = id("tokenizer.ggml.eos_token_id");
    let bos = id("tokenizer.ggml.bos_token_id");
    let types: Vec<i32> = md
        .get("tokenizer.ggml.token_type")
        .and_then(|v| v.to_vec().ok())
        .map(|v| v.iter().map(|x| x.to_i32().unwrap_or(1)).collect())
        .unwrap_or_default();
    let tokenizer = bpe_tokenizer(&tokens, &merges, &types)?;
    let chat_template = md
        .get("tokenizer.chat_template")
        .and_then(|v| v.to_string().ok().cloned());
    let text_of = |i: Option<u32>| {
        i.and_then(|i| tokens.get(i as usize).cloned())
            .unwrap_or_default()
    };

    let mut weights = HashMap::new();
    let names: Vec<String> = content.tensor_infos.keys().cloned().collect();
    for name in names {
        let Some(hf) = hf_name(&name) else {
            continue;
        };
        let q = content
            .tensor(&mut f, &name, &Device::Cpu)
            .map_err(|e| format!("tensor {name}: {e}"))?;
        let t = q
            .dequantize(&Device::Cpu)
            .and_then(|t| t.to_dtype(dtype))
            .map_err(|e| format!("tensor {name}: {e}"))?;
        weights.insert(hf, t);
    }
    let heads = num("attention.head_count")?;
    let config = LlamaConfig {
        vocab_size: tokens.len(),
        hidden_size: num("embedding_length")?,
        intermediate_size: num("feed_forward_length")?,
        num_hidden_layers: num("block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: Some(num("attention.head_count_kv").unwrap_or(heads)),
        rms_norm_eps: float("attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta: float("rope.freq_base", 10_000.0),
        max_position_embeddings: num("context_length").unwrap_or(2048),
        tie_word_embeddings: !weights.contains_key("lm_head.weight"),
        attention_bias: weights.contains_key("model.layers.0.self_attn.q_proj.bias"),
        eos_token_id: eos.map(EosIds::One),
    };
    Ok(GgufModel {
        config,
        weights,
        tokenizer,
        chat_template,
        bos_eos: (text_of(bos), text_of(eos)),
        interleaved_rope: arch == "llama",
    })
}

/// Whole tensor names, llama.cpp's and Hugging Face's.
const FIXED_NAMES: &[(&str, &str)] = &[
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];

/// Per-layer stems (`blk.N.<gguf>.weight` ↔ `model.layers.N.<hf>.weight`).
const LAYER_NAMES: &[(&str, &str)] = &[
    ("attn_norm", "input_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_norm", "post_attention_layernorm"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

/// Maps a tensor name from one convention to the other: `to_hf` picks the direction. None for
/// tensors the model does not use (llama.cpp's `rope_freqs`, say).
fn rename(name: &str, to_hf: bool) -> Option<String> {
    let pick = |(g, h): &(&'static str, &'static str)| if to_hf { (*g, *h) } else { (*h, *g) };
    if let Some((_, to)) = FIXED_NAMES.iter().map(pick).find(|(from, _)| *from == name) {
        return Some(to.to_string());
    }
    let (from_prefix, to_prefix) = if to_hf {
        ("blk.", "model.layers.")
    } else {
        ("model.layers.", "blk.")
    };
    let (layer, part) = name.strip_prefix(from_prefix)?.split_once('.')?;
    let (stem, kind) = part.rsplit_once('.')?;
    let (_, to) = LAYER_NAMES
        .iter()
        .map(pick)
        .find(|(from, _)| *from == stem)?;
    Some(format!("{to_prefix}{layer}.{to}.{kind}"))
}

/// llama.cpp's tensor name → Hugging Face's.
fn hf_name(gguf: &str) -> Option<String> {
    rename(gguf, true)
}

/// Hugging Face's tensor name → llama.cpp's.
fn gguf_name(hf: &str) -> Option<String> {
    rename(hf, false)
}

/// GPT-2-style byte-level BPE, as `tokenizer.json` would describe it: digits split one by one
/// (SmolLM2's and Qwen2's pre-tokenizers do this), byte-level pre-tokenization without a prefix
/// space, byte-level decoding; control tokens (type 3) are special, so `<|im_start|>` in a
/// rendered template is one id.
pub fn bpe_tokenizer(
    tokens: &[String],
    merges: &[String],
    types: &[i32],
) -> Result<LmTokenizer, String> {
    use tokenizers::models::bpe::BPE;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::pre_tokenizers::digits::Digits;
    use tokenizers::pre_tokenizers::sequence::Sequence;
    use tokenizers::{AddedToken, PreTokenizerWrapper, Tokenizer};
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let merges: Vec<(String, String)> = merges
        .iter()
        .filter_map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
        })
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| format!("BPE from GGUF metadata: {e}"))?;
    let mut t = Tokenizer::new(bpe);
    let pre = Sequence::new(vec![
        PreTokenizerWrapper::Digits(Digits::new(true)),
        PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
    ]);
    t.with_pre_tokenizer(Some(pre));
    t.with_decoder(Some(ByteLevel::default()));
    let specials: Vec<AddedToken> = tokens
        .iter()
        .zip(types)
        .filter(|(_, &ty)| ty == 3)
        .map(|(s, _)| AddedToken::from(s.clone(), true))
        .collect();
    t.add_special_tokens(&specials);
    Ok(LmTokenizer::hf(t))
}

/// Writes a GGUF file with the given f32 tensors (Hugging Face names mapped back to llama.cpp's)
/// and metadata: how tests build a small real GGUF without a download.
pub fn write_f32(
    path: &Path,
    metadata: &[(&str, Value)],
    tensors: &HashMap<String, Tensor>,
) -> Result<(), String> {
    use candle_core::quantized::{GgmlDType, QTensor};
    let mut by_gguf: Vec<(String, QTensor)> = Vec::new();
    for (hf, t) in tensors {
        let name = gguf_name(hf).ok_or_else(|| format!("no GGUF name for {hf}"))?;
        let q = QTensor::quantize(t, GgmlDType::F32).map_err(|e| e.to_string())?;
        by_gguf.push((name, q));
    }
    let tensors: Vec<(&str, &QTensor)> = by_gguf.iter().map(|(n, q)| (n.as_str(), q)).collect();
    let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let mut f = std::fs::File::create(path).map_err(|e| e.to_string())?;
    candle_core::quantized::gguf_file::write(&mut f, &metadata, &tensors).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for hf in [
            "model.embed_tokens.weight",
            "model.layers.7.self_attn.k_proj.bias",
            "model.layers.0.mlp.down_proj.weight",
            "model.norm.weight",
            "lm_head.weight",
        ] {
            assert_eq!(hf_name(&gguf_name(hf).unwrap()).as_deref(), Some(hf));
        }
        assert_eq!(hf_name("rope_freqs.weight"), None);
    }
}
