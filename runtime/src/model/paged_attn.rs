//! One-query attention read in place from the KV pool: `out[lane, head] = softmax(q·Kᵀ/√d)·V`
//! over the positions the lane's sequence holds, its keys and values found through the
//! sequence's block table instead of copied out first.
//!
//! Why: the batched decode attention in `llama.rs` gathers every decoding sequence's keys and
//! values into a `[sequences, span, head_dim]` block with candle's `index_select` (twice a layer),
//! builds a `[sequences, span]` mask on the host, then runs two batched matmuls, a mask add, a
//! softmax and the layout copies between them. On the H200 that chain was the largest single
//! cost of a decode step: the gathers alone were 1.5 ms of a 7.1 ms step's GPU time for 256
//! sequences, and 2.4 ms once a step also carried 4 prompts as one-query lanes
//! (`results/generate-h200/kernels/`). This op is one kernel a layer, reading each key and value
//! once from where it lies (vLLM's paged attention has the same shape; this one is written for
//! clarity over peak speed: one block per (lane, KV head), positions in tiles with a running
//! softmax, f32 arithmetic throughout).
//!
//! A lane is one query token: a decode, or one token of a short prompt (`Lane` in `llama.rs`).
//! The CPU runs the same arithmetic in plain loops; the unit tests compare it with candle's
//! matmul attention, and [`self_check`] does the same for the GPU kernel where it runs.

use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor, WithDType};

/// Every lane of one attention call: how many positions each sees and where they lie.
pub struct Lanes {
    /// `[lanes, 1 + blocks]` u32: positions the lane sees, then its sequence's block numbers
    /// (unused entries 0).
    meta: Tensor,
    /// Row of lane 0's query in the step's `q`; lane `i`'s is `first + i`.
    first: usize,
    /// Positions per block.
    block: usize,
}

impl Lanes {
    /// Builds the table from `(positions seen, block numbers)` per lane, in lane order; `first`
    /// is lane 0's row in `q`. Each lane must see at least one position and name enough blocks
    /// to hold them.
    pub fn new<'b>(
        lanes: impl ExactSizeIterator<Item = (usize, &'b [u32])>,
        first: usize,
        block: usize,
        device: &Device,
    ) -> Result<Self> {
        let lanes: Vec<(usize, &[u32])> = lanes.collect();
        let need = |len: usize| len.div_ceil(block);
        let width = 1 + lanes.iter().map(|&(len, _)| need(len)).max().unwrap_or(0);
        let mut meta = vec![0u32; lanes.len() * width];
        for (i, &(len, blocks)) in lanes.iter().enumerate() {
            if len == 0 || blocks.len() < need(len) {
                candle_core::bail!(
                    "paged attention: lane {i} sees {len} positions in {} blocks of {block}",
                    blocks.len()
                );
            }
            let row = &mut meta[i * width..(i + 1) * width];
            row[0] = len as u32;
            row[1..1 + need(len)].copy_from_slice(&blocks[..need(len)]);
        }
        Ok(Lanes {
            meta: Tensor::from_vec(meta, (lanes.len(), width), device)?,
            first,
            block,
        })
    }
}

/// Attention of every lane: `q` is the step's `[heads, t, head_dim]`, the pools
/// `[kv_heads, rows, head_dim]`, all contiguous and of one dtype; returns `[lanes, heads ×
/// head_dim]` in that dtype. Query head `h` reads KV head `h / (heads / kv_heads)`.
pub fn attend(q: &Tensor, k_pool: &Tensor, v_pool: &Tensor, lanes: &Lanes) -> Result<Tensor> {
    q.apply_op3_no_bwd(k_pool, v_pool, &PagedAttn(lanes))
}

/// Whether the GPU kernel takes this head layout: its registers hold up to [`MAX_GROUPS`]
/// query heads per KV head and [`MAX_OUTPUTS`] outputs per thread.
pub fn supports(heads: usize, kv_heads: usize, head_dim: usize) -> bool {
    let groups = heads / kv_heads.max(1);
    groups <= MAX_GROUPS && groups * head_dim <= MAX_OUTPUTS * THREADS
}

/// Query heads per KV head the kernel holds in registers (`MAXG` in the source).
const MAX_GROUPS: usize = 16;
/// Outputs per thread the kernel holds in registers (`MAXO`).
const MAX_OUTPUTS: usize = 16;
/// Threads per block (`THREADS`), also the tile of positions scored at once (`TILE`).
const THREADS: usize = 128;

struct PagedAttn<'a>(&'a Lanes);

/// Shapes of one call, checked against each other.
struct Dims {
    /// Lanes (rows of the meta table).
    lanes: usize,
    heads: usize,
    kvh: usize,
    t: usize,
    hd: usize,
    pool_rows: usize,
    /// Entries per lane in the meta table.
    width: usize,
    /// Element offsets of q, K pool, V pool.
    offsets: [usize; 3],
}

fn dims(l: &Lanes, q: &Layout, k: &Layout, v: &Layout) -> Result<Dims> {
    let offset = |x: &Layout, what: &str| match x.contiguous_offsets() {
        Some((start, _)) => Ok(start),
        None => candle_core::bail!("paged attention: {what} must be contiguous"),
    };
    let offsets = [offset(q, "q")?, offset(k, "K pool")?, offset(v, "V pool")?];
    let (heads, t, hd) = q.shape().dims3()?;
    let (kvh, pool_rows, hd2) = k.shape().dims3()?;
    if k.shape() != v.shape() || hd2 != hd || kvh == 0 || !heads.is_multiple_of(kvh) {
        candle_core::bail!(
            "paged attention: q {:?} does not fit pools {:?} and {:?}",
            q.shape(),
            k.shape(),
            v.shape()
        );
    }
    let (lanes, width) = l.meta.dims2()?;
    if l.first + lanes > t {
        candle_core::bail!(
            "paged attention: lanes {}..{} are past the step's {t} rows",
            l.first,
            l.first + lanes
        );
    }
    Ok(Dims {
        lanes,
        heads,
        kvh,
        t,
        hd,
        pool_rows,
        width,
        offsets,
    })
}

/// The CPU version: per lane and query head, every score, a softmax, the weighted values; f32
/// arithmetic as on the GPU.
fn cpu<T: WithDType>(
    q: &[T],
    k: &[T],
    v: &[T],
    meta: &[u32],
    l: &Lanes,
    d: &Dims,
) -> Result<Vec<T>> {
    let groups = d.heads / d.kvh;
    let scale = 1.0 / (d.hd as f32).sqrt();
    let f = |x: T| x.to_f64() as f32;
    let mut out = Vec::with_capacity(d.lanes * d.heads * d.hd);
    let (mut rows, mut scores, mut acc) = (Vec::new(), Vec::new(), vec![0f32; d.hd]);
    for lane in 0..d.lanes {
        let m = &meta[lane * d.width..(lane + 1) * d.width];
        let len = m[0] as usize;
        rows.clear();
        for p in 0..len {
            let row = m[1 + p / l.block] as usize * l.block + p % l.block;
            if row >= d.pool_rows {
                candle_core::bail!(
                    "paged attention: row {row} is outside a pool of {}",
                    d.pool_rows
                );
            }
            rows.push(row);
        }
        for h in 0..d.heads {
            let qr = &q[(h * d.t + l.first + lane) * d.hd..][..d.hd];
            let base = (h / groups) * d.pool_rows;
            scores.clear();
            for &r in &rows {
                let kr = &k[(base + r) * d.hd..][..d.hd];
                scores.push(qr.iter().zip(kr).map(|(&a, &b)| f(a) * f(b)).sum::<f32>() * scale);
            }
            let max = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            acc.fill(0.0);
            for (&r, &w) in rows.iter().zip(&scores) {
                let vr = &v[(base + r) * d.hd..][..d.hd];
                for (a, &x) in acc.iter_mut().zip(vr) {
                    *a += w * f(x);
                }
            }
            out.extend(acc.iter().map(|&a| T::from_f64((a / sum) as f64)));
        }
    }
    Ok(out)
}

impl CustomOp3 for PagedAttn<'_> {
    fn name(&self) -> &'static str {
        "paged-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let l = self.0;
        let d = dims(l, l1, l2, l3)?;
        let meta = l.meta.flatten_all()?.to_vec1::<u32>()?;
        let [o1, o2, o3] = d.offsets;
        let shape = Shape::from((d.lanes, d.heads * d.hd));
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) => {
                CpuStorage::F32(cpu(&q[o1..], &k[o2..], &v[o3..], &meta, l, &d)?)
            }
            (CpuStorage::BF16(q), CpuStorage::BF16(k), CpuStorage::BF16(v)) => {
                CpuStorage::BF16(cpu(&q[o1..], &k[o2..], &v[o3..], &meta, l, &d)?)
            }
            (CpuStorage::F16(q), CpuStorage::F16(k), CpuStorage::F16(v)) => {
                CpuStorage::F16(cpu(&q[o1..], &k[o2..], &v[o3..], &meta, l, &d)?)
            }
            _ => candle_core::bail!("paged attention: q and pools must share f32, f16 or bf16"),
        };
        Ok((out, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let d = dims(self.0, l1, l2, l3)?;
        let out = cuda::launch(self.0, s1, s2, s3, &d)?;
        Ok((out, Shape::from((d.lanes, d.heads * d.hd))))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::{Dims, Lanes, MAX_GROUPS, THREADS};
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaDType, CudaStorageSlice, WrapErr};
    use candle_core::{CudaDevice, CudaStorage, Result};

    /// Two kernels, both one block of `THREADS` threads per (lane, KV head), positions in tiles
    /// of `TILE` with a running softmax (one warp per head takes each tile's max and sum).
    ///
    /// `pagedv` (`paged_attn_{dtype}_v{G}`), for the common layouts: G query heads per KV head
    /// compiled in (1–4, 6–8) and a head_dim that splits into 8-element pieces, a power of two
    /// of them up to 32. Every thread owns 8 of the head_dim (`dc`) at one of `ns` positions
    /// side by side (`ps`); it reads its piece of a key or value row in one 16-byte load (two
    /// for f32). Scores: each position's `nc` threads sum their pieces' dot products by warp
    /// shuffles. Values: each thread accumulates its 8 dims of all G heads over its positions,
    /// so a value row is read once for every head, and the partial sums of the positions side
    /// by side are added at the end (shuffles in a warp, then shared memory across warps).
    ///
    /// `paged` (`paged_attn_{dtype}`), for any other layout (up to `MAXG` heads, `MAXO` outputs a
    /// thread): one thread per position scores it element by element, and each thread
    /// accumulates whole (head, dim) outputs, so every value is read once per head.
    ///
    /// Why two: the first kernel had only the second's shape, and on the H200 it was the
    /// largest kernel of a decode step (1.3 of 4.0 ms of GPU work, 24 launches): ncu showed it
    /// bound by latency, each thread's value loop a chain of ~110 dependent 2-byte loads
    /// (`results/generate-h200/fused-mlp/`). bf16 and f16 are converted by bit operations and
    /// PTX so that NVRTC needs no CUDA headers.
    const SOURCE: &str = concat!(
        crate::model::nvrtc::dtype_structs!(),
        r#"
#define THREADS 128
#define TILE 128
#define MAXG 16
#define MAXO 16
template <class C>
__device__ void paged(const typename C::T* q, const typename C::T* kp, const typename C::T* vp,
    const unsigned int* meta, typename C::T* out, unsigned int heads, unsigned int kvh,
    unsigned int t, unsigned int first, unsigned int pool_rows, unsigned int hd,
    unsigned int width, unsigned int block, float scale) {
  extern __shared__ float sh[];
  const unsigned int groups = heads / kvh, gd = groups * hd;
  const unsigned int lane = blockIdx.x, kh = blockIdx.y, tid = threadIdx.x;
  const unsigned int* m = meta + (size_t)lane * width;
  const unsigned int len = m[0];
  float* qs = sh;
  float* sc = qs + gd;
  float* mx = sc + groups * TILE;
  float* sum = mx + groups;
  float* corr = sum + groups;
  unsigned int* rows = (unsigned int*)(corr + groups);
  for (unsigned int i = tid; i < gd; i += THREADS) {
    unsigned int h = kh * groups + i / hd;
    qs[i] = C::ld(q[((size_t)h * t + first + lane) * hd + i % hd]) * scale;
  }
  for (unsigned int g = tid; g < groups; g += THREADS) { mx[g] = __int_as_float(0xff800000u); sum[g] = 0.f; }
  float acc[MAXO];
#pragma unroll
  for (int j = 0; j < MAXO; j++) acc[j] = 0.f;
  const typename C::T* kb = kp + (size_t)kh * pool_rows * hd;
  const typename C::T* vb = vp + (size_t)kh * pool_rows * hd;
  __syncthreads();
  for (unsigned int p0 = 0; p0 < len; p0 += TILE) {
    const unsigned int n = min((unsigned int)TILE, len - p0);
    for (unsigned int p = tid; p < n; p += THREADS) {
      const unsigned int pos = p0 + p;
      const unsigned int row = m[1 + pos / block] * block + pos % block;
      rows[p] = row;
      const typename C::T* kr = kb + (size_t)row * hd;
      float dot[MAXG];
#pragma unroll
      for (int g = 0; g < MAXG; g++) dot[g] = 0.f;
      for (unsigned int d = 0; d < hd; d++) {
        const float kf = C::ld(kr[d]);
#pragma unroll
        for (int g = 0; g < MAXG; g++) if (g < groups) dot[g] += qs[g * hd + d] * kf;
      }
#pragma unroll
      for (int g = 0; g < MAXG; g++) if (g < groups) sc[g * TILE + p] = dot[g];
    }
    __syncthreads();
    const unsigned int warp = tid / 32, wl = tid % 32;
    for (unsigned int g = warp; g < groups; g += THREADS / 32) {
      float* s = sc + g * TILE;
      float tm = __int_as_float(0xff800000u);
      for (unsigned int p = wl; p < n; p += 32) tm = fmaxf(tm, s[p]);
      for (int o = 16; o > 0; o >>= 1) tm = fmaxf(tm, __shfl_xor_sync(0xffffffffu, tm, o));
      const float old = mx[g];
      const float nm = fmaxf(old, tm);
      float ts = 0.f;
      for (unsigned int p = wl; p < n; p += 32) { const float e = __expf(s[p] - nm); s[p] = e; ts += e; }
      for (int o = 16; o > 0; o >>= 1) ts += __shfl_xor_sync(0xffffffffu, ts, o);
      if (wl == 0) { const float c = __expf(old - nm); corr[g] = c; sum[g] = sum[g] * c + ts; mx[g] = nm; }
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < MAXO; j++) {
      const unsigned int i = tid + j * THREADS;
      if (i < gd) {
        const unsigned int g = i / hd, d = i % hd;
        const float* s = sc + g * TILE;
        float a = acc[j] * corr[g];
        // Unrolled so several positions' value loads are in flight at once.
#pragma unroll 4
        for (unsigned int p = 0; p < n; p++) a += s[p] * C::ld(vb[(size_t)rows[p] * hd + d]);
        acc[j] = a;
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int j = 0; j < MAXO; j++) {
    const unsigned int i = tid + j * THREADS;
    if (i < gd) {
      const unsigned int g = i / hd, d = i % hd;
      out[(size_t)lane * heads * hd + (kh * groups + g) * hd + d] = C::st(acc[j] / sum[g]);
    }
  }
}
#define PAGED(NAME, C) \
extern "C" __global__ void NAME(const C::T* q, const C::T* kp, const C::T* vp, \
    const unsigned int* meta, C::T* out, unsigned int heads, unsigned int kvh, unsigned int t, \
    unsigned int first, unsigned int pool_rows, unsigned int hd, unsigned int width, \
    unsigned int block, float scale) { \
  paged<C>(q, kp, vp, meta, out, heads, kvh, t, first, pool_rows, hd, width, block, scale); \
}
PAGED(paged_attn_bf16, Bf16)
PAGED(paged_attn_f16, F16)
PAGED(paged_attn_f32, F32)
struct alignas(16) U4 { unsigned int a, b, c, d; };
template <class C>
__device__ __forceinline__ void ld8(const typename C::T* p, float* f) {
  constexpr int N = sizeof(typename C::T) * 8 / 16;
  U4 raw[N];
#pragma unroll
  for (int i = 0; i < N; i++) raw[i] = ((const U4*)p)[i];
  const typename C::T* e = (const typename C::T*)raw;
#pragma unroll
  for (int k = 0; k < 8; k++) f[k] = C::ld(e[k]);
}
template <class C, int G>
__device__ void pagedv(const typename C::T* q, const typename C::T* kp, const typename C::T* vp,
    const unsigned int* meta, typename C::T* out, unsigned int heads, unsigned int kvh,
    unsigned int t, unsigned int first, unsigned int pool_rows, unsigned int hd,
    unsigned int width, unsigned int block, float scale) {
  extern __shared__ float sh[];
  const unsigned int gd = G * hd;
  const unsigned int lane = blockIdx.x, kh = blockIdx.y, tid = threadIdx.x;
  const unsigned int* m = meta + (size_t)lane * width;
  const unsigned int len = m[0];
  const unsigned int nc = hd / 8, ns = THREADS / nc, dc = tid % nc, ps = tid / nc;
  float* qs = sh;
  float* sc = qs + gd;
  float* mx = sc + G * TILE;
  float* sum = mx + G;
  float* corr = sum + G;
  float* red = corr + G;
  unsigned int* rows = (unsigned int*)(red + (THREADS / 32) * gd);
  for (unsigned int i = tid; i < gd; i += THREADS) {
    unsigned int h = kh * G + i / hd;
    qs[i] = C::ld(q[((size_t)h * t + first + lane) * hd + i % hd]) * scale;
  }
  if (tid < G) { mx[tid] = __int_as_float(0xff800000u); sum[tid] = 0.f; }
  float acc[G * 8];
#pragma unroll
  for (int j = 0; j < G * 8; j++) acc[j] = 0.f;
  const typename C::T* kb = kp + (size_t)kh * pool_rows * hd + dc * 8;
  const typename C::T* vb = vp + (size_t)kh * pool_rows * hd + dc * 8;
  for (unsigned int p0 = 0; p0 < len; p0 += TILE) {
    const unsigned int n = min((unsigned int)TILE, len - p0);
    for (unsigned int p = tid; p < n; p += THREADS) {
      const unsigned int pos = p0 + p;
      rows[p] = m[1 + pos / block] * block + pos % block;
    }
    __syncthreads();
    for (unsigned int base = 0; base < n; base += ns) {
      const unsigned int p = base + ps;
      float dot[G];
#pragma unroll
      for (int g = 0; g < G; g++) dot[g] = 0.f;
      if (p < n) {
        float kf[8];
        ld8<C>(kb + (size_t)rows[p] * hd, kf);
#pragma unroll
        for (int g = 0; g < G; g++)
#pragma unroll
          for (int k = 0; k < 8; k++) dot[g] += qs[g * hd + dc * 8 + k] * kf[k];
      }
      for (unsigned int o = nc / 2; o > 0; o >>= 1)
#pragma unroll
        for (int g = 0; g < G; g++) dot[g] += __shfl_xor_sync(0xffffffffu, dot[g], o);
      if (dc == 0 && p < n)
#pragma unroll
        for (int g = 0; g < G; g++) sc[g * TILE + p] = dot[g];
    }
    __syncthreads();
    const unsigned int warp = tid / 32, wl = tid % 32;
    for (unsigned int g = warp; g < G; g += THREADS / 32) {
      float* s = sc + g * TILE;
      float tm = __int_as_float(0xff800000u);
      for (unsigned int p = wl; p < n; p += 32) tm = fmaxf(tm, s[p]);
      for (int o = 16; o > 0; o >>= 1) tm = fmaxf(tm, __shfl_xor_sync(0xffffffffu, tm, o));
      const float old = mx[g];
      const float nm = fmaxf(old, tm);
      float ts = 0.f;
      for (unsigned int p = wl; p < n; p += 32) { const float e = __expf(s[p] - nm); s[p] = e; ts += e; }
      for (int o = 16; o > 0; o >>= 1) ts += __shfl_xor_sync(0xffffffffu, ts, o);
      if (wl == 0) { const float c = __expf(old - nm); corr[g] = c; sum[g] = sum[g] * c + ts; mx[g] = nm; }
    }
    __syncthreads();
#pragma unroll
    for (int g = 0; g < G; g++) {
      const float c = corr[g];
#pragma unroll
      for (int k = 0; k < 8; k++) acc[g * 8 + k] *= c;
    }
#pragma unroll 2
    for (unsigned int p = ps; p < n; p += ns) {
      float vf[8];
      ld8<C>(vb + (size_t)rows[p] * hd, vf);
#pragma unroll
      for (int g = 0; g < G; g++) {
        const float w = sc[g * TILE + p];
#pragma unroll
        for (int k = 0; k < 8; k++) acc[g * 8 + k] += w * vf[k];
      }
    }
    __syncthreads();
  }
  for (unsigned int o = nc; o < 32; o <<= 1)
#pragma unroll
    for (int j = 0; j < G * 8; j++) acc[j] += __shfl_xor_sync(0xffffffffu, acc[j], o);
  const unsigned int warp = tid / 32;
  if (tid % 32 < nc)
#pragma unroll
    for (int g = 0; g < G; g++)
#pragma unroll
      for (int k = 0; k < 8; k++) red[warp * gd + g * hd + dc * 8 + k] = acc[g * 8 + k];
  __syncthreads();
  for (unsigned int i = tid; i < gd; i += THREADS) {
    float a = 0.f;
#pragma unroll
    for (int w = 0; w < THREADS / 32; w++) a += red[w * gd + i];
    const unsigned int g = i / hd;
    out[(size_t)lane * heads * hd + (kh * G + g) * hd + i % hd] = C::st(a / sum[g]);
  }
}
#define PAGEDV(NAME, C, G) \
extern "C" __global__ void NAME(const C::T* q, const C::T* kp, const C::T* vp, \
    const unsigned int* meta, C::T* out, unsigned int heads, unsigned int kvh, unsigned int t, \
    unsigned int first, unsigned int pool_rows, unsigned int hd, unsigned int width, \
    unsigned int block, float scale) { \
  pagedv<C, G>(q, kp, vp, meta, out, heads, kvh, t, first, pool_rows, hd, width, block, scale); \
}
#define PAGEDV_ALL(T, C) \
PAGEDV(paged_attn_##T##_v1, C, 1) PAGEDV(paged_attn_##T##_v2, C, 2) PAGEDV(paged_attn_##T##_v3, C, 3) \
PAGEDV(paged_attn_##T##_v4, C, 4) PAGEDV(paged_attn_##T##_v6, C, 6) PAGEDV(paged_attn_##T##_v7, C, 7) \
PAGEDV(paged_attn_##T##_v8, C, 8)
PAGEDV_ALL(bf16, Bf16)
PAGEDV_ALL(f16, F16)
PAGEDV_ALL(f32, F32)
"#
    );

    pub(super) fn launch(
        l: &Lanes,
        q: &CudaStorage,
        k: &CudaStorage,
        v: &CudaStorage,
        d: &Dims,
    ) -> Result<CudaStorage> {
        let (guard, ml) = l.meta.storage_and_layout();
        let meta =
            crate::model::nvrtc::cuda_view::<u32>(&guard, ml, "paged attention: the lane table")?;
        let dev = q.device.clone();
        match (&q.slice, &k.slice, &v.slice) {
            (CudaStorageSlice::BF16(q), CudaStorageSlice::BF16(k), CudaStorageSlice::BF16(v)) => {
                run(&dev, "paged_attn_bf16", [q, k, v], &meta, l, d)
            }
            (CudaStorageSlice::F16(q), CudaStorageSlice::F16(k), CudaStorageSlice::F16(v)) => {
                run(&dev, "paged_attn_f16", [q, k, v], &meta, l, d)
            }
            (CudaStorageSlice::F32(q), CudaStorageSlice::F32(k), CudaStorageSlice::F32(v)) => {
                run(&dev, "paged_attn_f32", [q, k, v], &meta, l, d)
            }
            _ => candle_core::bail!("paged attention: q and pools must share f32, f16 or bf16"),
        }
    }

    fn run<T: DeviceRepr + CudaDType>(
        dev: &CudaDevice,
        name: &str,
        [q, k, v]: [&CudaSlice<T>; 3],
        meta: &CudaView<'_, u32>,
        l: &Lanes,
        d: &Dims,
    ) -> Result<CudaStorage> {
        let n = d.lanes * d.heads * d.hd;
        // SAFETY: the kernel writes every one of the `n` outputs (each (lane, head, dim) is
        // owned by exactly one thread of the block of its lane and KV head) before it is read.
        let mut out = unsafe { dev.alloc::<T>(n) }?;
        if d.lanes > 0 {
            let groups = d.heads / d.kvh;
            let pieces = d.hd / 8;
            let vector = matches!(groups, 1 | 2 | 3 | 4 | 6 | 7 | 8)
                && d.hd.is_multiple_of(8)
                && pieces.is_power_of_two()
                && pieces <= 32
                // 16-byte loads: every row starts on a multiple of 8 elements.
                && d.offsets[1].is_multiple_of(8)
                && d.offsets[2].is_multiple_of(8);
            let gd = groups * d.hd;
            // Floats: q, scores, max/sum/correction, then (pagedv) one partial output per
            // warp; then the tile's pool rows.
            let floats = if vector {
                gd + groups * THREADS + 3 * groups + (THREADS / 32) * gd
            } else {
                gd + groups * THREADS + 3 * groups
            };
            let shared = floats * 4 + THREADS * 4;
            let cfg = LaunchConfig {
                grid_dim: (d.lanes as u32, d.kvh as u32, 1),
                block_dim: (THREADS as u32, 1, 1),
                shared_mem_bytes: shared as u32,
            };
            debug_assert!(groups <= MAX_GROUPS);
            // The group counts here must match the `_vN` instances `PAGEDV_ALL` declares.
            let name = if vector {
                format!("{name}_v{groups}")
            } else {
                name.to_string()
            };
            let func = dev.get_or_load_custom_func(
                &name,
                "batchtune_paged_attn",
                crate::model::nvrtc::compiled!(SOURCE, "paged attention")?,
            )?;
            let [o1, o2, o3] = d.offsets;
            let (q, k, v) = (q.slice(o1..), k.slice(o2..), v.slice(o3..));
            let u = |x: usize| x as u32;
            let dims = [
                u(d.heads),
                u(d.kvh),
                u(d.t),
                u(l.first),
                u(d.pool_rows),
                u(d.hd),
                u(d.width),
                u(l.block),
            ];
            let scale = 1.0f32 / (d.hd as f32).sqrt();
            let mut b = func.builder();
            b.arg(&q);
            b.arg(&k);
            b.arg(&v);
            b.arg(meta);
            b.arg(&mut out);
            for x in &dims {
                b.arg(x);
            }
            b.arg(&scale);
            // SAFETY: reads stay inside q (rows first..first+lanes < t, checked in `dims`) and
            // inside the pools (every block number comes from a sequence's reservation, whose
            // rows the caller checked against the pool); writes stay inside `out`.
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
}

/// Compares [`attend`] on `device` in `dtype` with candle's matmul attention (in f32 on the
/// CPU) on random queries, keys and values in scrambled blocks, for lanes of 1 to 300
/// positions (one and several tiles): the GPU kernel is checked where it runs (`runtime bench`
/// calls this before timing a decoder on a GPU; CI has none). Returns the largest absolute
/// difference.
pub fn self_check(
    device: &Device,
    dtype: DType,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
) -> Result<f32> {
    let block = 16;
    let lens = [1usize, 2, 17, 128, 129, 300];
    let blocks_per: Vec<usize> = lens.iter().map(|l| l.div_ceil(block)).collect();
    let total: usize = blocks_per.iter().sum::<usize>() + 3;
    let pool_rows = total * block;
    let (t, first) = (lens.len() + 3, 2);
    let k = Tensor::randn(0f32, 1.0, (kv_heads, pool_rows, head_dim), device)?.to_dtype(dtype)?;
    let v = Tensor::randn(0f32, 1.0, (kv_heads, pool_rows, head_dim), device)?.to_dtype(dtype)?;
    let q = Tensor::randn(0f32, 1.0, (heads, t, head_dim), device)?.to_dtype(dtype)?;
    // Scrambled, distinct block numbers, handed out lane by lane.
    let mut order: Vec<u32> = (0..total as u32)
        .map(|b| (b * 7 + 3) % total as u32)
        .collect();
    let mut tables = Vec::new();
    for &n in &blocks_per {
        tables.push(order.drain(..n).collect::<Vec<u32>>());
    }
    let lanes = Lanes::new(
        lens.iter().zip(&tables).map(|(&l, b)| (l, b.as_slice())),
        first,
        block,
        device,
    )?;
    let got = attend(&q, &k, &v, &lanes)?
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?;
    let cpu = |x: &Tensor| x.to_device(&Device::Cpu)?.to_dtype(DType::F32);
    let (q, k, v) = (cpu(&q)?, cpu(&k)?, cpu(&v)?);
    let groups = heads / kv_heads;
    let mut worst = 0f32;
    for (i, (&len, table)) in lens.iter().zip(&tables).enumerate() {
        let rows: Vec<u32> = (0..len)
            .map(|p| table[p / block] * block as u32 + (p % block) as u32)
            .collect();
        let rows = Tensor::from_vec(rows, len, &Device::Cpu)?;
        let keys = k.index_select(&rows, 1)?;
        let values = v.index_select(&rows, 1)?;
        let ql = q
            .narrow(1, first + i, 1)?
            .reshape((kv_heads, groups, head_dim))?;
        let att = (ql.matmul(&keys.t()?)? / (head_dim as f64).sqrt())?;
        let want = candle_nn::ops::softmax_last_dim(&att)?
            .matmul(&values)?
            .reshape(heads * head_dim)?;
        let diff = (got.get(i)? - want)?.abs()?.max(0)?.to_scalar::<f32>()?;
        worst = worst.max(diff);
    }
    // Absolute: attention outputs are averages of values of size ~1.
    super::judge_self_check(
        "paged attention",
        "matmul attention",
        device,
        dtype,
        worst,
        [1e-4, 3e-2],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_matmul_attention_in_every_dtype_and_head_layout() {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            // Qwen2.5-0.5B's layout, SmolLM2-135M's, and multi-head attention.
            for (heads, kvh, hd) in [(14, 2, 64), (9, 3, 64), (4, 4, 16)] {
                self_check(&Device::Cpu, dtype, heads, kvh, hd).unwrap();
            }
        }
    }

    #[test]
    fn a_lane_without_positions_or_blocks_is_an_error() {
        let d = Device::Cpu;
        let err = Lanes::new([(0usize, &[1u32][..])].into_iter(), 0, 16, &d)
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains("lane 0 sees 0 positions"), "{err}");
        assert!(Lanes::new([(17usize, &[1u32][..])].into_iter(), 0, 16, &d).is_err());
        let lanes = Lanes::new([(3usize, &[9u32][..])].into_iter(), 0, 16, &d).unwrap();
        let pool = Tensor::zeros((1, 16, 4), DType::F32, &d).unwrap();
        let q = Tensor::zeros((1, 1, 4), DType::F32, &d).unwrap();
        let err = attend(&q, &pool, &pool, &lanes).unwrap_err().to_string();
        assert!(err.contains("outside a pool of 16"), "{err}");
    }
}
