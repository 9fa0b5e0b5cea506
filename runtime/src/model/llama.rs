//! Decoder-only transformer of the Llama family (Llama, SmolLM2, Qwen2) on candle, with a
//! per-sequence KV cache so that one forward can advance many sequences, each at its own length.
//!
//! Written here rather than taken from candle-transformers for the reasons `bert.rs` gives, and
//! because candle-transformers' Llama keeps one cache for the whole batch (every sequence at the
//! same position), which rules out continuous batching.
//!
//! One [`Llama::step`] takes a list of chunks, one per sequence: a decode step is a chunk of one
//! token, a prefill is a chunk of (part of) the prompt. All tokens of the step go through the
//! projections and the MLP as one `[tokens, hidden]` matrix (where batching pays). Attention
//! runs in groups ([`group_chunks`]), one batched chain of kernels per group and layer: each
//! chunk's keys and values are gathered from the pool into a `[chunks, span, head_dim]` block,
//! its queries padded to the group's widest chunk, and every position a query must not see
//! (later in its own chunk, past its sequence's length, padding) is masked to −∞, so it weighs
//! exactly zero and a sequence's result does not depend on who shares its step. All decodes
//! of a step are one group; prefill chunks of similar size share another, so a step costs a
//! chain of launches per group rather than per sequence. The first version attended every
//! sequence separately: on a GPU that was ~15 small kernels per sequence and layer, ~3 ms per
//! sequence per step, all of it launch overhead (`results/generate-h200/`); the second batched
//! only the decodes, and prefill chunks still attended one at a time. On a GPU the decodes'
//! group (with every one-query lane, whatever its length) is now a single paged kernel a layer
//! (`Attention::Paged`): the gathers it replaced were the largest cost of a decode step
//! (`results/generate-h200/kernels/`, `results/generate-h200/paged/`).
//!
//! KV memory: a pool per replica, per layer one tensor `[2 × kv_heads, rows, head_dim]` (K's
//! heads, then V's, so one `kv_write.rs` launch stores a step's keys and values), handed out in
//! blocks of [`KV_BLOCK`] positions (vLLM's paged layout: `kv_write.rs` writes a
//! step's new rows; on a GPU the width-1 group reads the pool in place through each sequence's
//! block table, `paged_attn.rs`, and other groups gather their rows with `index_select`). A sequence
//! reserves prompt + `max_tokens` positions when it starts, rounded up to whole blocks, and gives
//! them back when its [`SeqCache`] is dropped: `2 × layers × kv_heads × head_dim × dtype size`
//! bytes per position (SmolLM2-135M in f32: 46,080 bytes, 45 KiB; Qwen2.5-0.5B in bf16: 12,288
//! bytes). Reserving the whole capacity up front wastes what early-stopping sequences never use,
//! but the budget can never be exceeded mid-generation, so nothing is preempted. The pool grows
//! (doubling, one copy) when a reservation does not fit and never shrinks: its size is the
//! high-water mark of what the scheduler's `kv_cache_tokens` budget let run at once.

use super::add_norm::add_rms_norm;
use super::kv_write::write_rows;
use super::paged_attn::{self, Lanes};
use super::qkv_rope::{self, qkv_rope, Heads};
use super::swiglu::swiglu;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{embedding, linear_b, linear_no_bias, Embedding, Linear, RmsNorm, VarBuilder};
use serde::Deserialize;
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard};

/// The subset of a Hugging Face `config.json` a Llama/Qwen2 decoder needs.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct LlamaConfig {
    /// Vocabulary size (rows of the embedding table and of the output head).
    pub vocab_size: usize,
    /// Width of every hidden state.
    pub hidden_size: usize,
    /// Width of the SwiGLU feed-forward block.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads per layer.
    pub num_attention_heads: usize,
    /// Key/value heads per layer (grouped-query attention); defaults to the query heads.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// RMSNorm epsilon.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base.
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    /// Longest sequence (prompt + output) the model was trained for.
    #[serde(default = "default_positions")]
    pub max_position_embeddings: usize,
    /// The output head shares the embedding table (SmolLM2, Qwen2.5-0.5B).
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Biases on the q/k/v projections (Qwen2); Llama has none.
    #[serde(default)]
    pub attention_bias: bool,
    /// Token ids that end a generation.
    #[serde(default)]
    pub eos_token_id: Option<EosIds>,
}

/// `eos_token_id` is a number or a list in Hugging Face configs.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum EosIds {
    /// One id.
    One(u32),
    /// Several ids.
    Many(Vec<u32>),
}

fn default_eps() -> f64 {
    1e-5
}
fn default_theta() -> f64 {
    10_000.0
}
fn default_positions() -> usize {
    2048
}

impl LlamaConfig {
    /// SmolLM2-135M(-Instruct)'s shape: 30 layers, hidden 576, 9 heads over 3 KV heads,
    /// intermediate 1536, vocabulary 49152, tied embeddings.
    pub fn smollm2_135m() -> Self {
        LlamaConfig {
            vocab_size: 49152,
            hidden_size: 576,
            intermediate_size: 1536,
            num_hidden_layers: 30,
            num_attention_heads: 9,
            num_key_value_heads: Some(3),
            rms_norm_eps: 1e-5,
            rope_theta: 100_000.0,
            max_position_embeddings: 8192,
            tie_word_embeddings: true,
            attention_bias: false,
            eos_token_id: Some(EosIds::One(2)),
        }
    }

    /// Qwen2.5-0.5B(-Instruct)'s shape: 24 layers, hidden 896, 14 heads over 2 KV heads,
    /// intermediate 4864, vocabulary 151936, q/k/v biases, tied embeddings.
    pub fn qwen2_5_0_5b() -> Self {
        LlamaConfig {
            vocab_size: 151_936,
            hidden_size: 896,
            intermediate_size: 4864,
            num_hidden_layers: 24,
            num_attention_heads: 14,
            num_key_value_heads: Some(2),
            rms_norm_eps: 1e-6,
            rope_theta: 1_000_000.0,
            max_position_embeddings: 32_768,
            tie_word_embeddings: true,
            attention_bias: true,
            eos_token_id: Some(EosIds::One(2)),
        }
    }

    /// A 2-layer, hidden-64 model of SmolLM2's kind for tests of the serving machinery.
    pub fn tiny() -> Self {
        LlamaConfig {
            vocab_size: 4096,
            hidden_size: 64,
            intermediate_size: 128,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: Some(2),
            max_position_embeddings: 2048,
            ..Self::smollm2_135m()
        }
    }

    /// Key/value heads (grouped-query attention).
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// End-of-sequence ids from the config (empty when it names none).
    pub fn eos_ids(&self) -> Vec<u32> {
        match &self.eos_token_id {
            Some(EosIds::One(i)) => vec![*i],
            Some(EosIds::Many(v)) => v.clone(),
            None => Vec::new(),
        }
    }

    /// KV-cache bytes one token of one sequence takes at `dtype`.
    pub fn kv_bytes_per_token(&self, dtype: DType) -> usize {
        2 * self.num_hidden_layers * self.kv_heads() * self.head_dim() * dtype.size_in_bytes()
    }

    /// Checks that the head layout is consistent before any tensor is built.
    pub fn check(&self) -> Result<(), String> {
        let h = self.num_attention_heads;
        if h == 0 || !self.hidden_size.is_multiple_of(h) {
            return Err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {h}",
                self.hidden_size
            ));
        }
        if self.kv_heads() == 0 || !h.is_multiple_of(self.kv_heads()) {
            return Err(format!(
                "num_attention_heads {h} is not a multiple of num_key_value_heads {}",
                self.kv_heads()
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(format!("head dimension {} is odd", self.head_dim()));
        }
        Ok(())
    }

    /// Every weight's name (Hugging Face's) and shape, for synthetic weights and checks.
    pub fn weight_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (h, i, hd) = (self.hidden_size, self.intermediate_size, self.head_dim());
        let (q, kv) = (self.num_attention_heads * hd, self.kv_heads() * hd);
        let mut v = vec![(
            "model.embed_tokens.weight".to_string(),
            vec![self.vocab_size, h],
        )];
        for l in 0..self.num_hidden_layers {
            let p = format!("model.layers.{l}");
            v.push((format!("{p}.input_layernorm.weight"), vec![h]));
            v.push((format!("{p}.self_attn.q_proj.weight"), vec![q, h]));
            v.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, h]));
            v.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, h]));
            if self.attention_bias {
                v.push((format!("{p}.self_attn.q_proj.bias"), vec![q]));
                v.push((format!("{p}.self_attn.k_proj.bias"), vec![kv]));
                v.push((format!("{p}.self_attn.v_proj.bias"), vec![kv]));
            }
            v.push((format!("{p}.self_attn.o_proj.weight"), vec![h, q]));
            v.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
            v.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h]));
            v.push((format!("{p}.mlp.up_proj.weight"), vec![i, h]));
            v.push((format!("{p}.mlp.down_proj.weight"), vec![h, i]));
        }
        v.push(("model.norm.weight".to_string(), vec![h]));
        if !self.tie_word_embeddings {
            v.push(("lm_head.weight".to_string(), vec![self.vocab_size, h]));
        }
        v
    }
}

/// One decoder layer. The query, key and value projections are one matrix (and one bias): a GPU
/// step at a few hundred sequences is bound by the host issuing kernels
/// (results/generate-h200/served-kernels/), and the fusion takes 7 of the layer's ~24 launches
/// away (2 matmuls, 2 bias adds, 2 layout copies, a rope). Gate and up are one matrix too, their
/// output's halves combined by [`swiglu`] in one pass (candle's SiLU and product over the
/// strided halves were slower than the launch saved). The norms are bare weights: each runs
/// fused with the residual add before it ([`add_rms_norm`]).
struct Layer {
    /// RMSNorm weight before attention (its epsilon is the config's).
    attn_norm: Tensor,
    /// `[q; k; v]` rows of the three projections, stacked.
    qkv: Linear,
    o: Linear,
    /// RMSNorm weight before the MLP.
    mlp_norm: Tensor,
    /// `[gate; up]` rows of the two projections, stacked.
    gate_up: Linear,
    down: Linear,
}

/// One linear layer from several stacked by output rows: the same result, column for column,
/// as running each and concatenating.
fn stacked(parts: &[Linear]) -> candle_core::Result<Linear> {
    let w: Vec<&Tensor> = parts.iter().map(|l| l.weight()).collect();
    let b: Option<Vec<&Tensor>> = parts.iter().map(|l| l.bias()).collect();
    let bias = b.map(|b| Tensor::cat(&b, 0)).transpose()?;
    Ok(Linear::new(Tensor::cat(&w, 0)?, bias))
}

/// Positions per KV block: the unit a sequence's reservation is rounded up to. Small enough
/// that rounding wastes little (< 16 positions a sequence), large enough that the free list and
/// block tables stay short.
pub const KV_BLOCK: usize = 16;

/// A loaded decoder replica on one device.
pub struct Llama {
    embed: Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    head: Linear,
    /// RoPE's angles for every position, f32 ([`qkv_rope::table`]).
    rope: Tensor,
    cfg: LlamaConfig,
    /// RoPE on interleaved pairs (GGUF Llama weights, whose q/k rows llama.cpp permuted) rather
    /// than on halves (Hugging Face layout).
    interleaved: bool,
    device: Device,
    dtype: DType,
    pool: Arc<Mutex<KvPool>>,
    /// Padding (query × key cells) a group takes on for free ([`group_chunks`]'s `free`): large
    /// on a GPU, where a launch costs microseconds whatever its size, small on a CPU, where
    /// every padded cell is computed. Set from the device at load.
    free_cells: usize,
    /// A prompt chunk whose query × key cells are at most this attends as one-query lanes
    /// beside the decodes ([`Lane`]): on a GPU, where a step's cost is its launches, this saves
    /// a second chain of attention kernels per layer; 0 on a CPU, where every gathered row is
    /// copied and the padded chunk group is cheaper.
    flat_cells: usize,
    /// Width-1 groups attend through [`paged_attn`] instead of gathered matmuls: on a GPU (one
    /// kernel a layer instead of a gather, mask and matmul chain), when the head layout fits
    /// the kernel.
    paged: bool,
}

/// The replica's KV memory: per layer one `[2 × kv_heads, blocks × KV_BLOCK, head_dim]` tensor,
/// K's heads then V's (so a step's new keys and values are one write), and which blocks are
/// free.
struct KvPool {
    kv: Vec<Tensor>,
    blocks: usize,
    /// Lowest first, so a new sequence's blocks tend to be adjacent.
    free: BTreeSet<u32>,
}

/// Locks the pool; a panic inside a step (caught by the engine) must not make every later
/// step fail, and the pool's tensors are valid whatever a panicking step left in them.
fn lock(pool: &Mutex<KvPool>) -> MutexGuard<'_, KvPool> {
    pool.lock().unwrap_or_else(|p| p.into_inner())
}

/// One sequence's reserved KV blocks and how many positions hold data. Dropping it gives the
/// blocks back to its replica's pool.
pub struct SeqCache {
    blocks: Vec<u32>,
    len: usize,
    capacity: usize,
    pool: Arc<Mutex<KvPool>>,
}

impl SeqCache {
    /// Positions already computed (the next token goes at this position).
    pub fn len(&self) -> usize {
        self.len
    }

    /// True before the first chunk.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions this cache can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Forgets positions from `len` on, so the next token overwrites them. Padding rows
    /// (padded scheduling) decode past their own end; stepping back keeps them inside the
    /// blocks they reserved, at the cost of a context that stops growing.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// The pool row holding position `p`.
    fn row(&self, p: usize) -> u32 {
        self.blocks[p / KV_BLOCK] * KV_BLOCK as u32 + (p % KV_BLOCK) as u32
    }
}

impl Drop for SeqCache {
    fn drop(&mut self) {
        lock(&self.pool).free.extend(self.blocks.drain(..));
    }
}

/// One sequence's part of a step: its next tokens and its cache.
pub struct Chunk<'a> {
    /// Tokens to append: one for a decode, part or all of the prompt for a prefill.
    pub tokens: &'a [u32],
    /// The sequence's cache; its length grows by `tokens.len()`.
    pub cache: &'a mut SeqCache,
    /// Return the logits after the last token (false for a prefill chunk that is not the last).
    pub logits: bool,
}

impl<'a> Chunk<'a> {
    /// One decode chunk per sequence: token `tokens[i]` appended to `caches[i]`, logits asked.
    pub fn decodes(tokens: &'a [[u32; 1]], caches: &'a mut [SeqCache]) -> Vec<Chunk<'a>> {
        tokens
            .iter()
            .zip(caches.iter_mut())
            .map(|(t, cache)| Chunk {
                tokens: t,
                cache,
                logits: true,
            })
            .collect()
    }
}

/// Decode tokens a step reads on the device ([`Llama::forward_with`]).
pub struct DeviceTokens<'a> {
    /// The previous step's drawn ids, `[rows]` u32 on the model's device.
    pub ids: &'a Tensor,
    /// Per chunk of the step, in order: the row of `ids` holding its one token, or `None` to
    /// read the chunk's own `tokens`.
    pub rows: &'a [Option<u32>],
}

/// One batched attention over several chunks of a step: its rows in the step's matrices and
/// how it attends ([`Attention`]).
struct AttnGroup {
    /// First row of the group's tokens in the step's matrices (its rows are contiguous).
    offset: usize,
    /// Real tokens in the group.
    tokens: usize,
    how: Attention,
}

/// How a group attends.
enum Attention {
    /// One-query lanes read in place from the pool (`paged_attn.rs`): a width-1 group (decodes
    /// and short prompts' lanes) on a GPU, one kernel a layer.
    Paged(Lanes),
    /// Each chunk's new tokens padded to `width` query rows and its keys gathered into `span`
    /// rows, then masked matmuls: prefill groups, and every group on the CPU (where the
    /// gathered matmuls use every core and the paged loop one).
    Gathered(Gathered),
}

/// A gathered group's pool rows, mask and padding (see [`Attention::Gathered`]).
struct Gathered {
    seqs: usize,
    width: usize,
    span: usize,
    /// Pool rows `[seqs × span]`; padding reads the chunk's own position 0.
    rows: Tensor,
    /// Additive mask `[1, seqs, 1, width, span]`: 0 where a query may look, −∞ elsewhere
    /// (causal within the chunk, past its length, and on padded keys).
    mask: Tensor,
    /// Only when some chunk is shorter than `width`: the step's rows that fill the padded
    /// `[seqs × width]` query layout, and where the real rows sit in that layout.
    pad: Option<(Tensor, Tensor)>,
}

/// A run of one chunk's queries that attends as a unit: queries `q0 .. q0 + n` of chunk
/// `chunk`, seeing the chunk's cache up to each query's own position. A chunk is one lane
/// (`q0 = 0`, all its tokens), or, when small, one lane per token, so that a short prompt's
/// queries join the decodes' width-1 group instead of forming a padded group of their own:
/// the attention is the same arithmetic (each query sees the same keys, the rest masked to
/// −∞), gathered once per query instead of once per chunk.
#[derive(Debug, Clone, Copy)]
struct Lane {
    chunk: usize,
    q0: usize,
    n: usize,
}

impl Lane {
    /// `(new tokens, cached positions)` as [`group_chunks`] takes them: a lane attends like a
    /// chunk of `n` tokens whose cache already holds `len + q0`.
    fn shape(&self, chunks: &[Chunk<'_>]) -> (usize, usize) {
        (self.n, chunks[self.chunk].cache.len + self.q0)
    }
}

/// Splits a step's chunks, given as `(new tokens, cached positions)`, into attention groups:
/// returns chunk indices per group, in the order their rows are laid out. Chunks are taken
/// longest first and a chunk joins the open group when that adds no more padded cells than
/// twice its own work (or no more than `free`) and the group's padding stays within its real
/// work (or within `free`): batching saves a chain of launches per group, padding costs
/// compute and memory, and a short prompt beside a long one would otherwise cost as much as
/// the long one. `free` is the padding (query × key cells) that costs less than a group's
/// launches: large on a GPU, where a launch costs microseconds whatever its size, small on a
/// CPU, where every padded cell is computed.
///
/// The bound on the group's total padding matters on a GPU: each one-token decode adds only
/// a prefill's width × span cells, under `free` every time, so with a per-join test alone all
/// 250 decodes of a served step joined 4 prompts' group of width 46, padding it to 1.3 M mask
/// cells that the host builds and copies every step (seen as served steps 10 ms slower than
/// the raw decode step, `results/generate-h200/`).
pub(crate) fn group_chunks(shapes: &[(usize, usize)], free: usize) -> Vec<Vec<usize>> {
    let mut idx: Vec<usize> = (0..shapes.len()).collect();
    idx.sort_by_key(|&i| {
        let (n, start) = shapes[i];
        (std::cmp::Reverse(n), std::cmp::Reverse(start + n))
    });
    let mut groups: Vec<Vec<usize>> = Vec::new();
    // The open group's widest chunk, longest span and real (unpadded) cells.
    let (mut width, mut span, mut real) = (0, 0, 0);
    for i in idx {
        let (n, start) = shapes[i];
        let cells = n * (start + n);
        if let Some(g) = groups.last_mut() {
            let (w, s) = (width.max(n), span.max(start + n));
            let padded = (g.len() + 1) * w * s;
            let added = padded - g.len() * width * span;
            let padding = padded - (real + cells);
            if added <= (2 * cells).max(free) && padding <= (real + cells).max(free) {
                g.push(i);
                (width, span, real) = (w, s, real + cells);
                continue;
            }
        }
        groups.push(vec![i]);
        (width, span, real) = (n, start + n, cells);
    }
    groups
}

fn rms(size: usize, eps: f64, vb: VarBuilder) -> candle_core::Result<RmsNorm> {
    Ok(RmsNorm::new(vb.get(size, "weight")?, eps))
}

impl Llama {
    /// Builds the model from Hugging Face-named weights. `interleaved` selects GGUF's RoPE
    /// layout (see the field).
    pub fn load(vb: VarBuilder, cfg: &LlamaConfig, interleaved: bool) -> candle_core::Result<Self> {
        cfg.check().map_err(candle_core::Error::msg)?;
        let (h, hd) = (cfg.hidden_size, cfg.head_dim());
        let (qd, kvd) = (cfg.num_attention_heads * hd, cfg.kv_heads() * hd);
        let m = vb.pp("model");
        let embed = embedding(cfg.vocab_size, h, m.pp("embed_tokens"))?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = m.pp(format!("layers.{l}"));
            let a = p.pp("self_attn");
            let b = cfg.attention_bias;
            layers.push(Layer {
                attn_norm: p.pp("input_layernorm").get(h, "weight")?,
                qkv: stacked(&[
                    linear_b(h, qd, b, a.pp("q_proj"))?,
                    linear_b(h, kvd, b, a.pp("k_proj"))?,
                    linear_b(h, kvd, b, a.pp("v_proj"))?,
                ])?,
                o: linear_no_bias(qd, h, a.pp("o_proj"))?,
                mlp_norm: p.pp("post_attention_layernorm").get(h, "weight")?,
                gate_up: stacked(&[
                    linear_no_bias(h, cfg.intermediate_size, p.pp("mlp.gate_proj"))?,
                    linear_no_bias(h, cfg.intermediate_size, p.pp("mlp.up_proj"))?,
                ])?,
                down: linear_no_bias(cfg.intermediate_size, h, p.pp("mlp.down_proj"))?,
            });
        }
        let norm = rms(h, cfg.rms_norm_eps, m.pp("norm"))?;
        let head = if cfg.tie_word_embeddings || !vb.contains_tensor("lm_head.weight") {
            Linear::new(embed.embeddings().clone(), None)
        } else {
            linear_no_bias(h, cfg.vocab_size, vb.pp("lm_head"))?
        };
        let device = vb.device().clone();
        let dtype = vb.dtype();
        let n = cfg.max_position_embeddings;
        let rope = Tensor::from_vec(qkv_rope::table(n, hd, cfg.rope_theta), (n, hd), &device)?;
        Ok(Llama {
            embed,
            layers,
            norm,
            head,
            rope,
            cfg: cfg.clone(),
            interleaved,
            pool: Arc::new(Mutex::new(KvPool {
                kv: Vec::new(),
                blocks: 0,
                free: BTreeSet::new(),
            })),
            free_cells: if device.is_cpu() { 1 << 10 } else { 1 << 16 },
            flat_cells: if device.is_cpu() { 0 } else { 1 << 16 },
            paged: device.is_cuda()
                && paged_attn::supports(cfg.num_attention_heads, cfg.kv_heads(), hd),
            device,
            dtype,
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// True on a CUDA device.
    pub fn on_gpu(&self) -> bool {
        self.device.is_cuda()
    }

    /// The device this replica runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// An empty cache for a sequence of at most `capacity` positions: reserves its blocks in
    /// the pool now (growing the pool if they do not fit), so the sequence can never run out.
    pub fn new_cache(&self, capacity: usize) -> candle_core::Result<SeqCache> {
        let need = capacity.div_ceil(KV_BLOCK).max(1);
        let mut pool = lock(&self.pool);
        if pool.free.len() < need {
            let missing = need - pool.free.len();
            let blocks = (pool.blocks + missing).max(2 * pool.blocks);
            self.grow(&mut pool, blocks)?;
        }
        let blocks = (0..need)
            .map(|_| pool.free.pop_first().expect("grown to fit"))
            .collect();
        Ok(SeqCache {
            blocks,
            len: 0,
            capacity,
            pool: self.pool.clone(),
        })
    }

    /// Runs the kinds of step a served replica meets (a short prompt, a prompt long enough to
    /// attend as its own group, then a decode of both), so every kernel they use is compiled
    /// and loaded before the replica reports ready. On a fresh GPU machine the driver
    /// JIT-compiles each PTX module on its first use (our NVRTC kernels are compiled too):
    /// without this, the first served steps stalled for seconds each and a first measurement
    /// read 6.5k output tokens/s where the same binary then did 65k (H200, fifteenth session,
    /// `results/generate-h200/stream/`). Returns the decode's logits, two rows, for the caller
    /// to sample the same way.
    pub fn warm_up(&self) -> candle_core::Result<Tensor> {
        let vocab = self.cfg.vocab_size as u32;
        let ids = |n: usize| -> Vec<u32> { (0..n as u32).map(|i| (7 * i + 1) % vocab).collect() };
        // Past `flat_cells` (n² > flat_cells): the gathered-group path on a GPU.
        let long = if self.flat_cells > 0 {
            (self.flat_cells as f64).sqrt() as usize + 2
        } else {
            12
        }
        .min(self.cfg.max_position_embeddings - 1);
        let (short, long) = (ids(8), ids(long));
        let mut caches = [
            self.new_cache(short.len() + 1)?,
            self.new_cache(long.len() + 1)?,
        ];
        {
            let [a, b] = &mut caches;
            let mut prompts = [
                Chunk {
                    tokens: &short,
                    cache: a,
                    logits: true,
                },
                Chunk {
                    tokens: &long,
                    cache: b,
                    logits: true,
                },
            ];
            self.forward(&mut prompts)?;
        }
        let next = [[short[1]], [long[1]]];
        self.forward(&mut Chunk::decodes(&next, &mut caches))?
            .ok_or_else(|| candle_core::Error::Msg("warm-up decode asked for no logits".into()))
    }

    /// KV positions the pool holds now (reserved or free): its memory is this times
    /// [`LlamaConfig::kv_bytes_per_token`].
    pub fn kv_pool_positions(&self) -> usize {
        lock(&self.pool).blocks * KV_BLOCK
    }

    /// Re-allocates every layer's K and V with room for `blocks` blocks, keeping the rows
    /// already there (sequences hold row numbers, so nothing moves).
    fn grow(&self, pool: &mut KvPool, blocks: usize) -> candle_core::Result<()> {
        let shape = (
            2 * self.cfg.kv_heads(),
            blocks * KV_BLOCK,
            self.cfg.head_dim(),
        );
        let bigger = |old: Option<&Tensor>| -> candle_core::Result<Tensor> {
            let t = Tensor::zeros(shape, self.dtype, &self.device)?;
            if let Some(old) = old {
                t.slice_set(old, 1, 0)?;
            }
            Ok(t)
        };
        pool.kv = (0..self.layers.len())
            .map(|l| bigger(pool.kv.get(l)))
            .collect::<candle_core::Result<_>>()?;
        pool.free.extend(pool.blocks as u32..blocks as u32);
        pool.blocks = blocks;
        Ok(())
    }

    /// Runs one step over every chunk; returns, per chunk, the f32 logits after its last token
    /// when it asked for them.
    pub fn step(&self, chunks: &mut [Chunk<'_>]) -> candle_core::Result<Vec<Option<Vec<f32>>>> {
        let mut out = vec![None; chunks.len()];
        let Some(logits) = self.forward(chunks)? else {
            return Ok(out);
        };
        let mut rows = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?.into_iter();
        for (slot, c) in out.iter_mut().zip(chunks.iter()) {
            if c.logits {
                *slot = rows.next();
            }
        }
        Ok(out)
    }

    /// Runs one step over every chunk and leaves the logits on the device: `[k, vocab]` in the
    /// model's dtype, one row per chunk that asked for logits, in chunk order (`None` when none
    /// asked). Not cast to f32: the draw reads any float dtype, and the cast of 512 rows of
    /// Qwen2.5's vocabulary was 0.27 ms of GPU work at the end of every step, after the host's
    /// last launch, so on the step's critical path (`results/generate-h200/stream/call3/`).
    /// Sampling can then run where the logits are ([`greedy`]) instead of copying
    /// `k × vocab` floats to the host every step.
    pub fn forward(&self, chunks: &mut [Chunk<'_>]) -> candle_core::Result<Option<Tensor>> {
        self.forward_with(chunks, None)
    }

    /// [`forward`](Self::forward), some decodes' tokens read on the device from the previous
    /// step's drawn ids ([`DeviceTokens`]) rather than from their chunks: the step can be
    /// issued before the host has those ids, so the device never waits for the host between
    /// steps (the engine's overlap, `generate/engine.rs`).
    pub fn forward_with(
        &self,
        chunks: &mut [Chunk<'_>],
        from_device: Option<DeviceTokens<'_>>,
    ) -> candle_core::Result<Option<Tensor>> {
        for c in chunks.iter() {
            if c.tokens.is_empty() {
                candle_core::bail!("a chunk with no tokens");
            }
        }
        if let Some(d) = &from_device {
            if d.rows.len() != chunks.len() {
                candle_core::bail!(
                    "{} device token rows for {} chunks",
                    d.rows.len(),
                    chunks.len()
                );
            }
            let drawn = d.ids.dim(0)?;
            for (c, r) in chunks.iter().zip(d.rows) {
                match r {
                    Some(r) if *r as usize >= drawn => {
                        candle_core::bail!("device token row {r} of {drawn} drawn ids")
                    }
                    Some(_) if c.tokens.len() != 1 => {
                        candle_core::bail!("a device token in a chunk of {}", c.tokens.len())
                    }
                    _ => {}
                }
            }
        }
        let mut lanes = Vec::new();
        for (i, c) in chunks.iter().enumerate() {
            let n = c.tokens.len();
            if n > 1 && n * (c.cache.len + n) <= self.flat_cells {
                lanes.extend((0..n).map(|q0| Lane { chunk: i, q0, n: 1 }));
            } else {
                lanes.push(Lane { chunk: i, q0: 0, n });
            }
        }
        // Rows are laid out group by group, so each group's tokens are one narrow away.
        let shapes: Vec<(usize, usize)> = lanes.iter().map(|l| l.shape(chunks)).collect();
        let groups = if self.paged {
            // Paged attention reads each lane's own positions, so lanes of different lengths
            // cost nothing to share a launch: every one-token lane is one group. Grouping them
            // by span as below split a served step's decodes from its prompt lanes: a second
            // attention launch and a concatenation a layer, 72 launches a step on the H200
            // (`results/generate-h200/stream/call3/`).
            let (ones, wide): (Vec<usize>, Vec<usize>) =
                (0..lanes.len()).partition(|&i| lanes[i].n == 1);
            let wide_shapes: Vec<(usize, usize)> = wide.iter().map(|&i| shapes[i]).collect();
            let mut g: Vec<Vec<usize>> = group_chunks(&wide_shapes, self.free_cells)
                .into_iter()
                .map(|grp| grp.into_iter().map(|j| wide[j]).collect())
                .collect();
            if !ones.is_empty() {
                g.push(ones);
            }
            g
        } else {
            group_chunks(&shapes, self.free_cells)
        };
        for c in chunks.iter() {
            if !Arc::ptr_eq(&c.cache.pool, &self.pool) {
                candle_core::bail!("a sequence's cache belongs to another replica");
            }
            let start = c.cache.len;
            let end = start + c.tokens.len();
            if end > c.cache.capacity {
                candle_core::bail!(
                    "sequence needs {end} positions; its cache holds {}",
                    c.cache.capacity
                );
            }
            if end > self.cfg.max_position_embeddings {
                candle_core::bail!(
                    "position {end} is past max_position_embeddings {}",
                    self.cfg.max_position_embeddings
                );
            }
        }
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        let mut writes = Vec::new();
        // Row of each chunk's last token in the step's (reordered) matrix.
        let mut last_row = vec![0usize; chunks.len()];
        // (row of the step, row of the drawn ids) for each token read on the device.
        let mut on_device = Vec::new();
        for &li in groups.iter().flatten() {
            let Lane { chunk, q0, n } = lanes[li];
            let c = &chunks[chunk];
            let start = c.cache.len + q0;
            if let Some(r) = from_device.as_ref().and_then(|d| d.rows[chunk]) {
                on_device.push((ids.len(), r));
            }
            ids.extend_from_slice(&c.tokens[q0..q0 + n]);
            positions.extend((start..start + n).map(|p| p as u32));
            writes.extend((start..start + n).map(|p| c.cache.row(p)));
            if q0 + n == c.tokens.len() {
                last_row[chunk] = ids.len() - 1;
            }
        }
        let t = ids.len();
        let mut offset = 0;
        let mut attn = Vec::with_capacity(groups.len());
        for g in &groups {
            let group = self.attn_group(chunks, &lanes, g, offset)?;
            offset += group.tokens;
            attn.push(group);
        }
        let pool = lock(&self.pool);
        // The GPU kernel trusts its rows (an out-of-range one would write outside the pool).
        let pool_rows = pool.blocks * KV_BLOCK;
        if let Some(&r) = writes.iter().find(|&&r| r as usize >= pool_rows) {
            candle_core::bail!("KV row {r} is outside the pool's {pool_rows}");
        }
        let writes = Tensor::from_vec(writes, t, &self.device)?;
        let mut ids = Tensor::from_vec(ids, t, &self.device)?;
        if let (Some(d), false) = (&from_device, on_device.is_empty()) {
            // The step's ids followed by the drawn ones, then one gather: a device token's row
            // picks from the second part.
            let mut pick: Vec<u32> = (0..t as u32).collect();
            for (row, r) in on_device {
                pick[row] = t as u32 + r;
            }
            let pick = Tensor::from_vec(pick, t, &self.device)?;
            ids = Tensor::cat(&[&ids, d.ids], 0)?.index_select(&pick, 0)?;
        }
        let pos = Tensor::from_vec(positions, t, &self.device)?;
        let kvh = self.cfg.kv_heads();
        let heads = Heads {
            heads: self.cfg.num_attention_heads,
            kv_heads: kvh,
            head_dim: self.cfg.head_dim(),
            interleaved: self.interleaved,
        };
        let eps = self.cfg.rms_norm_eps;
        let mut x = self.embed.forward(&ids)?;
        // Each residual add and the RMSNorm after it run as one op (`add_norm.rs`); only the
        // first layer's input norm and the last layer's add stand alone.
        let mut h = match self.layers.first() {
            Some(first) => candle_nn::ops::rms_norm(&x, &first.attn_norm, eps as f32)?,
            None => x.clone(),
        };
        for (l, layer) in self.layers.iter().enumerate() {
            // The projection's bias, layout and RoPE in one op, then K and V into the pool in
            // one write (`qkv_rope.rs`).
            let qkv = h.matmul(&layer.qkv.weight().t()?)?;
            let split = qkv_rope(&qkv, layer.qkv.bias(), &self.rope, &pos, heads)?;
            let q = split.narrow(0, 0, heads.heads)?;
            write_rows(
                &pool.kv[l],
                &split.narrow(0, heads.heads, 2 * kvh)?,
                &writes,
            )?;
            let (k_pool, v_pool) = (
                pool.kv[l].narrow(0, 0, kvh)?,
                pool.kv[l].narrow(0, kvh, kvh)?,
            );
            let mut outs = Vec::with_capacity(attn.len());
            for g in &attn {
                outs.push(self.attend(&q, &k_pool, &v_pool, g)?);
            }
            let att = if outs.len() == 1 {
                outs.pop().expect("one")
            } else {
                Tensor::cat(&outs, 0)?
            };
            let (sum, normed) = add_rms_norm(&x, &layer.o.forward(&att)?, &layer.mlp_norm, eps)?;
            x = sum;
            let mlp = layer
                .down
                .forward(&swiglu(&layer.gate_up.forward(&normed)?)?)?;
            match self.layers.get(l + 1) {
                Some(next) => (x, h) = add_rms_norm(&x, &mlp, &next.attn_norm, eps)?,
                None => x = (x + mlp)?,
            }
        }
        drop(pool);
        let mut rows = Vec::new();
        for (i, c) in chunks.iter_mut().enumerate() {
            c.cache.len += c.tokens.len();
            if c.logits {
                rows.push(last_row[i] as u32);
            }
        }
        if rows.is_empty() {
            return Ok(None);
        }
        let n = rows.len();
        let rows = Tensor::from_vec(rows, n, &self.device)?;
        let last = self.norm.forward(&x.index_select(&rows, 0)?)?;
        Ok(Some(self.head.forward(&last)?))
    }

    /// The pool rows, mask and padding of the chunks `which` (one group of
    /// [`group_chunks`]), whose tokens start at row `offset` of the step.
    fn attn_group(
        &self,
        chunks: &[Chunk<'_>],
        lanes: &[Lane],
        which: &[usize],
        offset: usize,
    ) -> candle_core::Result<AttnGroup> {
        let shape = |i: usize| lanes[i].shape(chunks);
        let width = which.iter().map(|&i| shape(i).0).max().unwrap_or(1);
        let seqs = which.len();
        if self.paged && width == 1 {
            // Each lane's query sees its cache up to its own position.
            let lanes = Lanes::new(
                which.iter().map(|&i| {
                    let c = &chunks[lanes[i].chunk].cache;
                    (shape(i).1 + 1, c.blocks.as_slice())
                }),
                offset,
                KV_BLOCK,
                &self.device,
            )?;
            return Ok(AttnGroup {
                offset,
                tokens: seqs,
                how: Attention::Paged(lanes),
            });
        }
        let span = which
            .iter()
            .map(|&i| shape(i).0 + shape(i).1)
            .max()
            .unwrap_or(1);
        let mut rows = Vec::with_capacity(seqs * span);
        let mut mask = Vec::with_capacity(seqs * width * span);
        let (mut gather, mut real) = (Vec::new(), Vec::new());
        let mut row = offset;
        for (b, &i) in which.iter().enumerate() {
            let (n, start) = shape(i);
            let c = &chunks[lanes[i].chunk].cache;
            rows.extend((0..span).map(|p| c.row(if p < start + n { p } else { 0 })));
            for j in 0..width {
                // Query j sees positions 0 ..= start + j; a padded query (j ≥ n) sees only
                // position 0, so its softmax stays finite; its output is dropped.
                let sees = if j < n { start + j } else { 0 };
                mask.extend((0..span).map(|p| if p <= sees { 0f32 } else { f32::NEG_INFINITY }));
                gather.push((row + j.min(n - 1)) as u32);
                if j < n {
                    real.push((b * width + j) as u32);
                }
            }
            row += n;
        }
        let tokens = row - offset;
        let pad = if tokens == seqs * width {
            None
        } else {
            Some((
                Tensor::from_vec(gather, seqs * width, &self.device)?,
                Tensor::from_vec(real, tokens, &self.device)?,
            ))
        };
        Ok(AttnGroup {
            offset,
            tokens,
            how: Attention::Gathered(Gathered {
                seqs,
                width,
                span,
                rows: Tensor::from_vec(rows, seqs * span, &self.device)?,
                mask: Tensor::from_vec(mask, (1, seqs, 1, width, span), &self.device)?
                    .to_dtype(self.dtype)?,
                pad,
            }),
        })
    }

    /// One group's attention. `q` is the step's `[heads, t, head_dim]`; returns the group's
    /// `[tokens, heads × head_dim]`.
    fn attend(
        &self,
        q: &Tensor,
        k_pool: &Tensor,
        v_pool: &Tensor,
        g: &AttnGroup,
    ) -> candle_core::Result<Tensor> {
        match &g.how {
            Attention::Paged(lanes) => paged_attn::attend(q, k_pool, v_pool, lanes),
            Attention::Gathered(x) => {
                self.attend_gathered(q, k_pool, v_pool, g.offset, g.tokens, x)
            }
        }
    }

    /// A gathered group's attention (see [`attend`](Self::attend)). Query head h reads KV
    /// head h / groups, so the query heads are grouped by their KV head and one batched matmul
    /// per (KV head, sequence) serves them all, without repeating K and V.
    fn attend_gathered(
        &self,
        q: &Tensor,
        k_pool: &Tensor,
        v_pool: &Tensor,
        offset: usize,
        tokens: usize,
        g: &Gathered,
    ) -> candle_core::Result<Tensor> {
        let (kvh, hd) = (self.cfg.kv_heads(), self.cfg.head_dim());
        let groups = self.cfg.num_attention_heads / kvh;
        let (b, w, l) = (g.seqs, g.width, g.span);
        // Gathered from the whole (contiguous) `q`: CUDA's index_select refuses a narrowed view.
        let q = match &g.pad {
            Some((gather, _)) => q.index_select(gather, 1)?,
            None => q.narrow(1, offset, tokens)?,
        };
        let keys = k_pool.index_select(&g.rows, 1)?.reshape((kvh * b, l, hd))?;
        let values = v_pool.index_select(&g.rows, 1)?.reshape((kvh * b, l, hd))?;
        let q = q
            .reshape((kvh, groups, b, w, hd))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((kvh * b, groups * w, hd))?;
        let scale = 1.0 / (hd as f64).sqrt();
        let att = (q.matmul(&keys.t()?)? * scale)?
            .reshape((kvh, b, groups, w, l))?
            .broadcast_add(&g.mask)?;
        let att = candle_nn::ops::softmax_last_dim(&att)?.reshape((kvh * b, groups * w, l))?;
        let out = att
            .matmul(&values)?
            .reshape((kvh, b, groups, w, hd))?
            .permute((1, 3, 0, 2, 4))?
            .reshape((b * w, kvh * groups * hd))?;
        match &g.pad {
            Some((_, real)) => out.index_select(real, 0),
            None => Ok(out),
        }
    }

    /// Sum of the negative log-likelihood of `ids[1..]` given their prefixes, and the count:
    /// `exp(sum / count)` is the perplexity (a check that real weights loaded correctly).
    pub fn nll(&self, ids: &[u32]) -> candle_core::Result<(f64, usize)> {
        let mut cache = self.new_cache(ids.len())?;
        let mut sum = 0.0;
        for (i, w) in ids.windows(2).enumerate() {
            let mut chunk = [Chunk {
                tokens: &ids[i..i + 1],
                cache: &mut cache,
                logits: true,
            }];
            let logits = self
                .step(&mut chunk)?
                .pop()
                .flatten()
                .expect("asked for logits");
            let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let lse = logits
                .iter()
                .map(|l| ((l - max) as f64).exp())
                .sum::<f64>()
                .ln()
                + max as f64;
            sum += lse - logits[w[1] as usize] as f64;
        }
        Ok((sum, ids.len().saturating_sub(1)))
    }
}

/// Largest logit's index (first on ties): greedy decoding.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{random_tensors, SYNTHETIC_SEED};

    fn tiny() -> Llama {
        let c = LlamaConfig::tiny();
        let w = random_tensors(c.weight_shapes(), SYNTHETIC_SEED);
        Llama::load(
            VarBuilder::from_tensors(w, DType::F32, &Device::Cpu),
            &c,
            false,
        )
        .unwrap()
    }

    /// Greedy continuation of `prompt` run alone, prompt in one chunk.
    fn alone(m: &Llama, prompt: &[u32], n: usize) -> Vec<u32> {
        alone_in(m, &mut m.new_cache(prompt.len() + n).unwrap(), prompt, n)
    }

    /// The same in a cache the caller reserved.
    fn alone_in(m: &Llama, cache: &mut SeqCache, prompt: &[u32], n: usize) -> Vec<u32> {
        let mut out = Vec::new();
        let mut next = prompt.to_vec();
        for _ in 0..n {
            let l = m
                .step(&mut [Chunk {
                    tokens: &next,
                    cache,
                    logits: true,
                }])
                .unwrap();
            let t = argmax(l[0].as_ref().unwrap());
            out.push(t);
            next = vec![t];
        }
        out
    }

    #[test]
    fn a_sequence_decodes_the_same_alone_and_among_others() {
        // Prompt chunks attending as their own group (the CPU's way) and as one-query lanes
        // beside the decodes (the GPU's way), the width-1 group gathered (the CPU's way) and
        // paged (the GPU's way), must all give what the sequence gives alone.
        for flat_cells in [0, 1 << 16] {
            for paged in [false, true] {
                let mut m = tiny();
                (m.flat_cells, m.paged) = (flat_cells, paged);
                decodes_the_same_among_others(&tiny(), &m);
            }
        }
    }

    /// Runs 4 sequences joining one per step on `m`, prompts in chunks of 5, and checks each
    /// one's greedy tokens against the same sequence run alone on `reference`.
    fn decodes_the_same_among_others(reference: &Llama, m: &Llama) {
        let prompts: Vec<Vec<u32>> = vec![
            (100..117).collect(),
            vec![7, 8, 9],
            (300..340).step_by(3).collect(),
            vec![42],
        ];
        let n = 12;
        let expect: Vec<Vec<u32>> = prompts.iter().map(|p| alone(reference, p, n)).collect();
        // Together: sequence i joins at step i, prompts prefilled in chunks of 5 tokens, all
        // running sequences advanced in one step.
        let mut caches: Vec<SeqCache> = prompts
            .iter()
            .map(|p| m.new_cache(p.len() + n).unwrap())
            .collect();
        let mut prefilled = vec![0usize; prompts.len()];
        let mut outs: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
        for step in 0..200 {
            let mut tokens: Vec<(usize, Vec<u32>, bool)> = Vec::new();
            for (i, p) in prompts.iter().enumerate() {
                if step < i || outs[i].len() == n {
                    continue;
                }
                if prefilled[i] < p.len() {
                    let end = (prefilled[i] + 5).min(p.len());
                    tokens.push((i, p[prefilled[i]..end].to_vec(), end == p.len()));
                    prefilled[i] = end;
                } else {
                    tokens.push((i, vec![*outs[i].last().unwrap()], true));
                }
            }
            if tokens.is_empty() {
                break;
            }
            let mut chunks: Vec<Chunk<'_>> = Vec::new();
            let mut rest: &mut [SeqCache] = &mut caches;
            let mut taken = 0;
            for (i, t, l) in &tokens {
                let (_, tail) = rest.split_at_mut(i - taken);
                let (c, tail) = tail.split_first_mut().unwrap();
                rest = tail;
                taken = i + 1;
                chunks.push(Chunk {
                    tokens: t,
                    cache: c,
                    logits: *l,
                });
            }
            let logits = m.step(&mut chunks).unwrap();
            for ((i, _, _), l) in tokens.iter().zip(logits) {
                if let Some(l) = l {
                    outs[*i].push(argmax(&l));
                }
            }
        }
        assert_eq!(outs, expect);
    }

    #[test]
    fn chunks_of_similar_shape_share_a_group_and_a_long_prompt_does_not_pad_short_ones() {
        // Decodes at similar lengths: one group, whatever their number.
        let decodes: Vec<(usize, usize)> = (0..64).map(|i| (1, 100 + i)).collect();
        assert_eq!(group_chunks(&decodes, 0).len(), 1);
        // Prompts of 30..40 tokens: one group.
        let prompts = [(30, 0), (35, 0), (40, 0), (33, 0)];
        let g = group_chunks(&prompts, 0);
        assert_eq!(g, vec![vec![2, 1, 3, 0]], "longest first");
        // A 2,000-token prompt beside them and beside decodes: on its own.
        let mixed = [(30, 0), (1, 50), (2000, 0), (35, 0), (1, 60)];
        let g = group_chunks(&mixed, 0);
        assert_eq!(g[0], vec![2]);
        assert!(g.iter().skip(1).all(|g| !g.contains(&2)));
        // Every chunk is in exactly one group.
        let mut all: Vec<usize> = g.concat();
        all.sort();
        assert_eq!(all, vec![0, 1, 2, 3, 4]);
        // With free padding (a GPU) small decodes join a small prefill's group.
        assert_eq!(group_chunks(&[(8, 0), (1, 20), (1, 30)], 1 << 16).len(), 1);
        assert_eq!(group_chunks(&[(8, 0), (1, 20), (1, 30)], 0).len(), 2);
        // A served GPU step: 4 prompts of 46 tokens and 252 decodes at 46..110 cached
        // positions. Decodes may fill the prompts' group only up to `free` padded cells; the
        // rest form their own width-1 group instead of padding it to 1.3 M cells.
        let free = 1 << 16;
        let step: Vec<(usize, usize)> = (0..4)
            .map(|_| (46, 0))
            .chain((0..252).map(|i| (1, 46 + i % 64)))
            .collect();
        let g = group_chunks(&step, free);
        assert_eq!(
            g.len(),
            2,
            "{:?}",
            g.iter().map(Vec::len).collect::<Vec<_>>()
        );
        for group in &g {
            let width = group.iter().map(|&i| step[i].0).max().unwrap();
            let span = group.iter().map(|&i| step[i].0 + step[i].1).max().unwrap();
            let real: usize = group
                .iter()
                .map(|&i| step[i].0 * (step[i].0 + step[i].1))
                .sum();
            assert!(group.len() * width * span - real <= real.max(free));
        }
        assert!(g[1].len() > 200 && g[1].iter().all(|&i| step[i].0 == 1));
    }

    #[test]
    fn freed_blocks_are_reused_and_scattered_blocks_decode_the_same() {
        // Gathered and paged (read through the block table) decodes alike.
        for paged in [false, true] {
            let mut m = tiny();
            m.paged = paged;
            freed_blocks_are_reused_in(&m);
        }
    }

    fn freed_blocks_are_reused_in(m: &Llama) {
        let prompt: Vec<u32> = (50..90).collect();
        let n = 10;
        let expect = alone(&tiny(), &prompt, n);
        // Fragment the pool: three sequences, the middle one freed, so the next reservation
        // takes its blocks first and then blocks past the third one's.
        let a = m.new_cache(2 * KV_BLOCK).unwrap();
        let b = m.new_cache(KV_BLOCK).unwrap();
        let c = m.new_cache(KV_BLOCK).unwrap();
        let before = m.kv_pool_positions();
        drop(b);
        let mut cache = m.new_cache(prompt.len() + n).unwrap();
        assert_eq!(cache.blocks[0], 2, "the freed block is taken first");
        assert!(
            cache.blocks.windows(2).any(|w| w[1] != w[0] + 1),
            "{:?}",
            cache.blocks
        );
        assert!(m.kv_pool_positions() > before, "the pool grew for the rest");
        assert_eq!(alone_in(m, &mut cache, &prompt, n), expect);
        drop((a, c, cache));
        let p = lock(&m.pool);
        assert_eq!(p.free.len(), p.blocks, "every block is back");
    }

    #[test]
    fn greedy_on_the_device_matches_argmax_on_the_host() {
        let m = tiny();
        let mut caches: Vec<SeqCache> = (0..3).map(|_| m.new_cache(8).unwrap()).collect();
        let toks = [[5u32], [6], [7]];
        let mut chunks = Chunk::decodes(&toks, &mut caches);
        let logits = m.forward(&mut chunks).unwrap().unwrap();
        let host: Vec<u32> = logits
            .to_vec2::<f32>()
            .unwrap()
            .iter()
            .map(|r| argmax(r))
            .collect();
        // Greedy ids on the device are the draw with every row at inverse temperature 0.
        let greedy = crate::model::draw::draw(&logits, &[0.0; 3], 0).unwrap();
        assert_eq!(greedy, host);
    }

    #[test]
    fn tokens_read_on_the_device_give_what_the_same_tokens_from_the_host_give() {
        // A prompt chunk, then two decodes whose tokens are rows 2 and 0 of "drawn" ids, in
        // both of the model's attention ways.
        for paged in [false, true] {
            let mut m = tiny();
            m.paged = paged;
            let run = |device: bool| {
                let mut caches: Vec<SeqCache> = (0..3).map(|_| m.new_cache(16).unwrap()).collect();
                // The decoding sequences hold one token each already.
                for (i, c) in caches.iter_mut().enumerate().skip(1) {
                    m.forward(&mut Chunk::decodes(
                        &[[9 + i as u32]],
                        std::slice::from_mut(c),
                    ))
                    .unwrap();
                }
                let drawn = Tensor::new(&[41u32, 99, 17], &Device::Cpu).unwrap();
                let (a, b) = if device {
                    ([0u32], [0u32])
                } else {
                    ([17], [41])
                };
                let prompt = [3u32, 1, 4, 1, 5];
                let (first, rest) = caches.split_at_mut(1);
                let (second, third) = rest.split_at_mut(1);
                let mut chunks = vec![
                    Chunk {
                        tokens: &prompt,
                        cache: &mut first[0],
                        logits: true,
                    },
                    Chunk {
                        tokens: &a,
                        cache: &mut second[0],
                        logits: true,
                    },
                    Chunk {
                        tokens: &b,
                        cache: &mut third[0],
                        logits: true,
                    },
                ];
                let rows = [None, Some(2), Some(0)];
                let from = device.then_some(DeviceTokens {
                    ids: &drawn,
                    rows: &rows,
                });
                m.forward_with(&mut chunks, from)
                    .unwrap()
                    .unwrap()
                    .to_vec2::<f32>()
                    .unwrap()
            };
            assert_eq!(run(true), run(false), "paged {paged}");
        }
        // A row past the drawn ids, or a device token in a longer chunk, is refused.
        let m = tiny();
        let drawn = Tensor::new(&[1u32], &Device::Cpu).unwrap();
        let mut c = m.new_cache(8).unwrap();
        for (tokens, row, want) in [
            (&[0u32][..], 1u32, "row 1 of 1"),
            (&[0, 0][..], 0, "a chunk of 2"),
        ] {
            let e = m
                .forward_with(
                    &mut [Chunk {
                        tokens,
                        cache: &mut c,
                        logits: true,
                    }],
                    Some(DeviceTokens {
                        ids: &drawn,
                        rows: &[Some(row)],
                    }),
                )
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn a_cache_of_another_replica_is_refused() {
        let (m1, m2) = (tiny(), tiny());
        let mut c = m1.new_cache(4).unwrap();
        let e = m2
            .step(&mut [Chunk {
                tokens: &[1],
                cache: &mut c,
                logits: true,
            }])
            .err()
            .unwrap();
        assert!(e.to_string().contains("another replica"), "{e}");
    }

    #[test]
    fn stacked_projections_equal_each_projection_concatenated() {
        use candle_core::Module;
        let d = Device::Cpu;
        let lin = |o: usize, bias: bool, seed: f64| {
            let w = Tensor::arange(0u32, (o * 6) as u32, &d)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .affine(0.01 * seed, -0.1)
                .unwrap()
                .reshape((o, 6))
                .unwrap();
            let b = bias.then(|| Tensor::full(seed as f32, o, &d).unwrap());
            Linear::new(w, b)
        };
        let x = Tensor::arange(0u32, 18, &d)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .reshape((3, 6))
            .unwrap();
        for bias in [false, true] {
            let parts = [lin(4, bias, 1.0), lin(2, bias, 2.0), lin(2, bias, 3.0)];
            let fused = stacked(&parts).unwrap().forward(&x).unwrap();
            let each: Vec<Tensor> = parts.iter().map(|l| l.forward(&x).unwrap()).collect();
            let want = Tensor::cat(&each, 1).unwrap();
            let diff = (fused - want)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 1e-5, "bias {bias}: {diff}");
        }
    }

    #[test]
    fn a_full_cache_is_an_error_not_a_panic() {
        let m = tiny();
        let mut c = m.new_cache(2).unwrap();
        let e = m
            .step(&mut [Chunk {
                tokens: &[1, 2, 3],
                cache: &mut c,
                logits: true,
            }])
            .err()
            .unwrap();
        assert!(e.to_string().contains("cache holds 2"), "{e}");
    }
}
