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

/// Fixed cost of one forward, in padded-token equivalents, until [`Bert::calibrate`] measures it.
/// A CPU-like guess: splitting is cheap, padding is not.
const DEFAULT_OVERHEAD_TOKENS: f64 = 32.0;

/// Splits inputs sorted by length into consecutive groups, one forward each, minimising the
/// modelled cost Σ (overhead + rows × longest) in padded tokens: a forward costs a fixed amount
/// (kernel launches, dispatch; large on a GPU, small on a CPU) plus work proportional to the padded
/// tokens it computes. Returns each group's end index (exclusive). Exact dynamic programme,
/// O(n²) in the batch size, microseconds next to a forward.
pub fn split_by_padding_cost(sorted_lens: &[usize], overhead_tokens: f64) -> Vec<usize> {
    let n = sorted_lens.len();
    let mut best = vec![0.0f64; n + 1];
    let mut from = vec![0usize; n + 1];
    for j in 1..=n {
        let longest = sorted_lens[j - 1].max(1) as f64;
        let (mut b, mut f) = (f64::INFINITY, 0);
        for (i, &before) in best[..j].iter().enumerate() {
            let c = before + overhead_tokens + (j - i) as f64 * longest;
            if c < b {
                (b, f) = (c, i);
            }
        }
        best[j] = b;
        from[j] = f;
    }
    let mut ends = Vec::new();
    let mut j = n;
    while j > 0 {
        ends.push(j);
        j = from[j];
    }
    ends.reverse();
    ends
}

/// A batch whose forwards are queued on the device (see [`Bert::launch`]).
pub struct Launched {
    /// Each forward's output and the batch positions of its rows.
    parts: Vec<(Tensor, Vec<usize>)>,
    /// Inputs in the batch.
    n: usize,
}

impl Launched {
    /// Waits for the forwards and reads the vectors back in input order, with the forward count.
    pub fn finish(self) -> candle_core::Result<(Vec<Vec<f32>>, usize)> {
        let forwards = self.parts.len();
        let mut out = vec![Vec::new(); self.n];
        for (t, rows) in self.parts {
            for (v, i) in t.to_vec2::<f32>()?.into_iter().zip(rows) {
                out[i] = v;
            }
        }
        Ok((out, forwards))
    }
}

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
    /// Fixed cost of one forward in padded tokens (see [`split_by_padding_cost`]).
    overhead_tokens: f64,
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
            overhead_tokens: DEFAULT_OVERHEAD_TOKENS,
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    /// One unit-norm embedding per input, in order. Inputs are sorted by length and split into
    /// the groups [`split_by_padding_cost`] picks for this replica's measured costs, so a few long
    /// inputs do not make every short one pay for their padding.
    pub fn embed(&self, batch: &[&[u32]]) -> candle_core::Result<Vec<Vec<f32>>> {
        self.launch(batch)?.finish().map(|(v, _)| v)
    }

    /// Queues every forward of a batch and returns without reading the results back. On a GPU
    /// that means kernels launched and nothing waited for, so the thread can launch the next
    /// batch while this one computes ([`Launched::finish`] waits); on a CPU the work is done here.
    pub fn launch(&self, batch: &[&[u32]]) -> candle_core::Result<Launched> {
        let n = batch.len();
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by_key(|&i| batch[i].len());
        let lens: Vec<usize> = order.iter().map(|&i| batch[i].len()).collect();
        let ends = split_by_padding_cost(&lens, self.overhead_tokens);
        let mut parts = Vec::with_capacity(ends.len());
        let mut start = 0;
        for end in ends {
            let rows = order[start..end].to_vec();
            let sub: Vec<&[u32]> = rows.iter().map(|&i| batch[i]).collect();
            parts.push((self.forward_padded(&sub)?, rows));
            start = end;
        }
        Ok(Launched { parts, n })
    }

    /// The replica lives on a GPU (its forwards are queued, not computed, by [`Bert::launch`]).
    pub fn on_gpu(&self) -> bool {
        !self.device.is_cpu()
    }

    /// Fixed cost of one forward, in padded tokens, as measured by [`Bert::calibrate`].
    pub fn overhead_tokens(&self) -> f64 {
        self.overhead_tokens
    }

    /// Replaces the measured split cost (the `BATCHTUNE_SPLIT_OVERHEAD_TOKENS` diagnostic: a
    /// very large value turns splitting off, 0 gives every length its own forward).
    pub fn set_overhead_tokens(&mut self, tokens: f64) {
        self.overhead_tokens = tokens.max(0.0);
    }

    /// Warms the replica up (kernel compilation, library handles, allocator pools: none of it
    /// should land on the first requests) and fits forward time ≈ a + b × padded tokens from
    /// timed forwards of growing size, keeping a / b as the split cost. Takes a few hundred
    /// milliseconds at most on a CPU and a few tens on a GPU.
    pub fn calibrate(&mut self) -> candle_core::Result<()> {
        let vocab = self.config.vocab_size as u32;
        let seqs: Vec<Vec<u32>> = (0..512u32)
            .map(|r| {
                (0..32u32)
                    .map(|t| (1000 + r * 7 + t * 13) % vocab)
                    .collect()
            })
            .collect();
        let time = |n: usize, len: usize| -> candle_core::Result<f64> {
            let batch: Vec<&[u32]> = seqs[..n].iter().map(|s| &s[..len]).collect();
            self.embed_padded(&batch)?;
            // The fastest of five: the cost without interference (a stalled first run on the
            // H100 once read the overhead as 68,000 tokens instead of ≈ 4,000).
            let mut best = f64::INFINITY;
            for _ in 0..5 {
                let s = std::time::Instant::now();
                self.embed_padded(&batch)?;
                best = best.min(s.elapsed().as_secs_f64());
            }
            Ok(best)
        };
        let t1 = time(1, 16)?;
        let mut n = 2;
        let mut tn = time(n, 32)?;
        while tn < 4.0 * t1 && n < 512 {
            n *= 2;
            tn = time(n, 32)?;
        }
        let per_token = (tn - t1) / (n * 32 - 16) as f64;
        self.overhead_tokens = if per_token > 0.0 {
            ((t1 - 16.0 * per_token).max(0.0) / per_token).min(1e6)
        } else {
            1e6
        };
        Ok(())
    }

    /// One forward over the batch padded to its longest input, read back.
    fn embed_padded(&self, batch: &[&[u32]]) -> candle_core::Result<Vec<Vec<f32>>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        self.forward_padded(batch)?.to_vec2::<f32>()
    }

    /// One forward over the batch padded to its longest input, left on the device: (rows,
    /// hidden) f32 unit vectors. The mask keeps padding out of attention and out of the mean, so
    /// each row equals what the input gives alone. Callers pass at least one input.
    fn forward_padded(&self, batch: &[&[u32]]) -> candle_core::Result<Tensor> {
        let n = batch.len();
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
        mean.broadcast_div(&norm)
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

#[cfg(test)]
mod tests {
    use super::split_by_padding_cost;

    /// Total modelled cost of a split, to compare against hand-computed optima.
    fn cost(lens: &[usize], ends: &[usize], overhead: f64) -> f64 {
        let mut start = 0;
        let mut c = 0.0;
        for &e in ends {
            c += overhead + ((e - start) * lens[e - 1]) as f64;
            start = e;
        }
        c
    }

    #[test]
    fn a_long_outlier_gets_its_own_forward() {
        // One group: 50 + 5 × 200 = 1050; split off the outlier: 50 + 4 × 5 + 50 + 200 = 320.
        let lens = [5, 5, 5, 5, 200];
        let ends = split_by_padding_cost(&lens, 50.0);
        assert_eq!(ends, vec![4, 5]);
        assert_eq!(cost(&lens, &ends, 50.0), 320.0);
    }

    #[test]
    fn a_costly_forward_keeps_the_batch_whole() {
        let lens = [5, 5, 5, 5, 200];
        assert_eq!(split_by_padding_cost(&lens, 5000.0), vec![5]);
    }

    #[test]
    fn the_split_is_optimal_against_brute_force() {
        let lens = [3, 4, 9, 10, 11, 30, 31, 64, 70, 128];
        for overhead in [0.0, 8.0, 40.0, 300.0] {
            let ends = split_by_padding_cost(&lens, overhead);
            assert_eq!(*ends.last().unwrap(), lens.len());
            // Every split is a subset of the 9 cut points: try all 512.
            let best = (0u32..512)
                .map(|mask| {
                    let mut e: Vec<usize> = (1..lens.len())
                        .filter(|i| mask & (1 << (i - 1)) != 0)
                        .collect();
                    e.push(lens.len());
                    cost(&lens, &e, overhead)
                })
                .fold(f64::INFINITY, f64::min);
            assert_eq!(cost(&lens, &ends, overhead), best, "overhead {overhead}");
        }
    }

    #[test]
    fn empty_and_single_inputs() {
        assert!(split_by_padding_cost(&[], 10.0).is_empty());
        assert_eq!(split_by_padding_cost(&[7], 10.0), vec![1]);
    }
}
