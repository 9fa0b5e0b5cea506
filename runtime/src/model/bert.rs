//! BERT encoder with mean pooling and L2 normalisation (sentence-transformers' recipe), on candle.
//!
//! Written here rather than taken from candle-transformers for two reasons: the padding mask must
//! be exact (an input alone and inside a padded batch must give the same vector), and
//! candle-transformers compiles dozens of unrelated models, which CI pays for on every clean build.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{embedding, layer_norm, linear, Embedding, LayerNorm, Linear, VarBuilder};
use serde::Deserialize;

/// The subset of a Hugging Face `config.json` a BERT encoder needs.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct BertConfig {
    /// Vocabulary size (rows of the word embedding table).
    pub vocab_size: usize,
    /// Width of every hidden state.
    pub hidden_size: usize,
    /// Encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer; `hidden_size` must divide evenly.
    pub num_attention_heads: usize,
    /// Width of the feed-forward block.
    pub intermediate_size: usize,
    /// Length of the position table: the longest input the model accepts.
    pub max_position_embeddings: usize,
    /// Rows of the token-type table (2 for BERT).
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    /// LayerNorm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// Activation of the feed-forward block; only GELU variants are supported.
    #[serde(default = "default_act")]
    pub hidden_act: String,
}

fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_act() -> String {
    "gelu".into()
}

impl BertConfig {
    /// all-MiniLM-L6-v2's shape: 6 layers, hidden 384, 12 heads, intermediate 1536, vocab 30522.
    pub fn minilm_l6() -> Self {
        BertConfig {
            vocab_size: 30522,
            hidden_size: 384,
            num_hidden_layers: 6,
            num_attention_heads: 12,
            intermediate_size: 1536,
            max_position_embeddings: 512,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            hidden_act: "gelu".into(),
        }
    }
}

/// Largest padded ÷ real token ratio a CPU sub-batch may have.
const PAD_WASTE: f64 = 1.25;

struct Layer {
    q: Linear,
    k: Linear,
    v: Linear,
    attn_out: Linear,
    attn_norm: LayerNorm,
    inter: Linear,
    out: Linear,
    out_norm: LayerNorm,
}

/// A loaded encoder: embeddings, layers, and the device/dtype it runs on.
pub struct Bert {
    word: Embedding,
    position: Embedding,
    token_type: Embedding,
    emb_norm: LayerNorm,
    layers: Vec<Layer>,
    heads: usize,
    head_dim: usize,
    config: BertConfig,
    device: Device,
    dtype: DType,
}

impl Bert {
    /// Builds the encoder from a VarBuilder rooted at the BERT module (HF names, no `bert.` prefix).
    pub fn load(vb: VarBuilder, config: &BertConfig) -> candle_core::Result<Self> {
        if !config
            .hidden_size
            .is_multiple_of(config.num_attention_heads)
        {
            candle_core::bail!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                config.hidden_size,
                config.num_attention_heads
            );
        }
        if !config.hidden_act.starts_with("gelu") {
            candle_core::bail!(
                "hidden_act {:?} is not supported (gelu only)",
                config.hidden_act
            );
        }
        let h = config.hidden_size;
        let e = vb.pp("embeddings");
        let word = embedding(config.vocab_size, h, e.pp("word_embeddings"))?;
        let position = embedding(
            config.max_position_embeddings,
            h,
            e.pp("position_embeddings"),
        )?;
        let token_type = embedding(config.type_vocab_size, h, e.pp("token_type_embeddings"))?;
        let emb_norm = layer_norm(h, config.layer_norm_eps, e.pp("LayerNorm"))?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let l = vb.pp(format!("encoder.layer.{i}"));
            let a = l.pp("attention");
            layers.push(Layer {
                q: linear(h, h, a.pp("self.query"))?,
                k: linear(h, h, a.pp("self.key"))?,
                v: linear(h, h, a.pp("self.value"))?,
                attn_out: linear(h, h, a.pp("output.dense"))?,
                attn_norm: layer_norm(h, config.layer_norm_eps, a.pp("output.LayerNorm"))?,
                inter: linear(h, config.intermediate_size, l.pp("intermediate.dense"))?,
                out: linear(config.intermediate_size, h, l.pp("output.dense"))?,
                out_norm: layer_norm(h, config.layer_norm_eps, l.pp("output.LayerNorm"))?,
            });
        }
        Ok(Bert {
            word,
            position,
            token_type,
            emb_norm,
            layers,
            heads: config.num_attention_heads,
            head_dim: h / config.num_attention_heads,
            config: config.clone(),
            device: vb.device().clone(),
            dtype: vb.dtype(),
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    /// Embeds a batch of token-id sequences (each already has its special tokens), one unit-norm
    /// vector per input, in input order.
    ///
    /// On CPU the cost is proportional to the padded size (inputs × longest), so a batch whose
    /// lengths vary is run as length-sorted sub-batches, each padding at most 25% over its real
    /// tokens: with log-normal text lengths a 32-input batch otherwise computes ~2.5× the tokens
    /// it needs. GPUs keep the one large batch, where width is nearly free.
    pub fn embed(&self, batch: &[&[u32]]) -> candle_core::Result<Vec<Vec<f32>>> {
        if !self.device.is_cpu() || batch.len() <= 1 {
            return self.embed_padded(batch);
        }
        let mut order: Vec<usize> = (0..batch.len()).collect();
        order.sort_by_key(|&i| batch[i].len());
        let mut out = vec![Vec::new(); batch.len()];
        let mut start = 0;
        while start < order.len() {
            let mut real = batch[order[start]].len();
            let mut end = start + 1;
            while end < order.len() {
                let l = batch[order[end]].len();
                if ((end - start + 1) * l) as f64 > PAD_WASTE * (real + l) as f64 {
                    break;
                }
                real += l;
                end += 1;
            }
            let sub: Vec<&[u32]> = order[start..end].iter().map(|&i| batch[i]).collect();
            for (v, &i) in self.embed_padded(&sub)?.into_iter().zip(&order[start..end]) {
                out[i] = v;
            }
            start = end;
        }
        Ok(out)
    }

    /// One forward over the batch padded to its longest input. The mask keeps padding out of
    /// attention and out of the mean, so each row equals what the input gives alone.
    fn embed_padded(&self, batch: &[&[u32]]) -> candle_core::Result<Vec<Vec<f32>>> {
        let n = batch.len();
        if n == 0 {
            return Ok(Vec::new());
        }
        let len = batch.iter().map(|s| s.len()).max().unwrap_or(0).max(1);
        let mut ids = vec![0u32; n * len];
        let mut mask = vec![0f32; n * len];
        for (r, seq) in batch.iter().enumerate() {
            ids[r * len..r * len + seq.len()].copy_from_slice(seq);
            mask[r * len..r * len + seq.len()]
                .iter_mut()
                .for_each(|m| *m = 1.0);
        }
        let ids = Tensor::from_vec(ids, (n, len), &self.device)?;
        let mask = Tensor::from_vec(mask, (n, len), &self.device)?;
        let positions = Tensor::arange(0u32, len as u32, &self.device)?.unsqueeze(0)?;
        let types = ids.zeros_like()?;

        let x = self
            .word
            .forward(&ids)?
            .broadcast_add(&self.position.forward(&positions)?)?
            .add(&self.token_type.forward(&types)?)?;
        let mut x = self.emb_norm.forward(&x)?;

        // Additive key mask, (n, 1, 1, len): 0 where real, a large negative where padding, so
        // softmax gives padding exactly zero weight. -1e4 is safe in f16 as well as f32.
        let bias = ((mask.clone() - 1.0)? * 1e4)?
            .to_dtype(self.dtype)?
            .reshape((n, 1, 1, len))?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        for layer in &self.layers {
            x = self.layer_forward(layer, &x, &bias, scale, n, len)?;
        }

        // Mean over real tokens only, then L2 normalisation (computed in f32 for every dtype).
        let x = x.to_dtype(DType::F32)?;
        let m = mask.unsqueeze(2)?;
        let summed = x.broadcast_mul(&m)?.sum(1)?;
        let counts = m.sum(1)?;
        let mean = summed.broadcast_div(&counts)?;
        let norm = mean.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
        mean.broadcast_div(&norm)?.to_vec2::<f32>()
    }

    fn layer_forward(
        &self,
        l: &Layer,
        x: &Tensor,
        bias: &Tensor,
        scale: f64,
        n: usize,
        len: usize,
    ) -> candle_core::Result<Tensor> {
        let split = |t: Tensor| -> candle_core::Result<Tensor> {
            t.reshape((n, len, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split(l.q.forward(x)?)?;
        let k = split(l.k.forward(x)?)?;
        let v = split(l.v.forward(x)?)?;
        let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(bias)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let ctx =
            probs
                .matmul(&v)?
                .transpose(1, 2)?
                .reshape((n, len, self.heads * self.head_dim))?;
        let a = l.attn_norm.forward(&(l.attn_out.forward(&ctx)? + x)?)?;
        let h = l.inter.forward(&a)?.gelu_erf()?;
        l.out_norm.forward(&(l.out.forward(&h)? + a)?)
    }
}
