//! The next token of every row of a step's logits in one pass where the logits are: the
//! argmax of `logits × (1/T) + G`, with `G` standard Gumbel noise (the Gumbel-max trick: a
//! draw from `softmax(logits / T)`), or of the plain logits for a greedy row.
//!
//! Why: the same draw written with candle's tensor ops (uniforms from the device's generator,
//! clamp, log, neg, log, subtract, argmax) made six passes over `rows × vocab` floats and
//! allocated a buffer for each. For 256 sequences of Qwen2.5's 151,936-token vocabulary that is
//! 156 MB a pass, and it cost about 2.2 ms of a decode step on the H200
//! (`results/generate-h200/prefill/`), a third of the step once attention was paged
//! (`results/generate-h200/paged/`). Here every logit is read once and nothing is allocated
//! but the ids.
//!
//! The noise is a counter-based hash (SplitMix64's mixer) of `(seed, row × vocab + column)`,
//! so the draw is a pure function of the logits and one seed per step: the CPU twin gives the
//! same ids as the GPU kernel, which is how [`self_check`] tests the kernel where it runs, and
//! the unit tests check the CPU twin's draws against the softmax.

use candle_core::{CpuStorage, CustomOp2, DType, Device, Layout, Result, Shape, Tensor, WithDType};

/// The token of each row of `[rows, vocab]` `logits` (f32, f16 or bf16, read as f32):
/// greedy where `inv_temp[r]` is 0, otherwise a draw at temperature `1 / inv_temp[r]`, its
/// noise keyed by `seed`.
pub fn draw(logits: &Tensor, inv_temp: &[f32], seed: u64) -> Result<Vec<u32>> {
    draw_ids(logits, inv_temp, seed)?.to_vec1::<u32>()
}

/// [`draw`], its ids left where the logits are (`[rows]` u32): the next step can read them
/// there, and the host copies them without waiting for that step ([`super::readback`]).
pub fn draw_ids(logits: &Tensor, inv_temp: &[f32], seed: u64) -> Result<Tensor> {
    let rows = logits.dim(0)?;
    if inv_temp.len() != rows {
        candle_core::bail!("draw: {} temperatures for {rows} rows", inv_temp.len());
    }
    if rows == 0 {
        return Tensor::from_vec(Vec::<u32>::new(), 0, logits.device());
    }
    let inv = Tensor::from_slice(inv_temp, rows, logits.device())?;
    logits.contiguous()?.apply_op2_no_bwd(&inv, &Draw { seed })
}

/// SplitMix64's output function applied to the `index`-th counter after `seed`: a uniform
/// 64-bit value per (seed, index), independent across neighbouring indices.
fn mix(seed: u64, index: u64) -> u64 {
    let mut z = seed.wrapping_add(index.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Standard Gumbel noise from a hash: the top 23 bits as a uniform strictly inside (0, 1)
/// (`(k + 0.5) / 2^23`, exact in f32: with 24 bits `k + 0.5` rounds up and the top value
/// becomes 1, an infinite draw), so both logs stay finite: the noise lies in about
/// [−2.8, 16.6].
fn gumbel(h: u64) -> f32 {
    let u = ((h >> 41) as f32 + 0.5) * (1.0 / 8_388_608.0);
    -(-u.ln()).ln()
}

struct Draw {
    seed: u64,
}

fn shape(logits: &Layout, inv: &Layout) -> Result<(usize, usize, usize, usize)> {
    let (rows, vocab) = logits.shape().dims2()?;
    if inv.shape().dims1()? != rows {
        candle_core::bail!("draw: temperatures {:?} for {rows} rows", inv.shape());
    }
    match (logits.contiguous_offsets(), inv.contiguous_offsets()) {
        (Some((a, _)), Some((b, _))) => Ok((rows, vocab, a, b)),
        _ => candle_core::bail!("draw: logits and temperatures must be contiguous"),
    }
}

/// The value a draw compares for logit `l` at flat index `index` (row × vocab + column) under
/// inverse temperature `s`: the logit itself for a greedy row (`s` = 0), else scaled and noised.
fn scored(l: f32, s: f32, seed: u64, index: usize) -> f32 {
    if s > 0.0 {
        l * s + gumbel(mix(seed, index as u64))
    } else {
        l
    }
}

/// The CPU twin of the kernel: the same values, compared the same way (first index on ties).
fn draw_cpu<T: WithDType>(logits: &[T], inv: &[f32], vocab: usize, seed: u64) -> Vec<u32> {
    inv.iter()
        .enumerate()
        .map(|(r, &s)| {
            let row = &logits[r * vocab..(r + 1) * vocab];
            let (mut best, mut at) = (f32::NEG_INFINITY, 0u32);
            for (c, &l) in row.iter().enumerate() {
                let v = scored(l.to_f64() as f32, s, seed, r * vocab + c);
                if v > best {
                    (best, at) = (v, c as u32);
                }
            }
            at
        })
        .collect()
}

impl CustomOp2 for Draw {
    fn name(&self) -> &'static str {
        "draw"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, vocab, o1, o2) = shape(l1, l2)?;
        let CpuStorage::F32(inv) = s2 else {
            candle_core::bail!("draw: the temperatures must be f32");
        };
        let (inv, n) = (&inv[o2..o2 + rows], rows * vocab);
        let ids = match s1 {
            CpuStorage::F32(l) => draw_cpu(&l[o1..o1 + n], inv, vocab, self.seed),
            CpuStorage::BF16(l) => draw_cpu(&l[o1..o1 + n], inv, vocab, self.seed),
            CpuStorage::F16(l) => draw_cpu(&l[o1..o1 + n], inv, vocab, self.seed),
            _ => candle_core::bail!("draw: the logits must be f32, f16 or bf16"),
        };
        Ok((CpuStorage::U32(ids), Shape::from(rows)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let dims = shape(l1, l2)?;
        Ok((cuda::launch(s1, s2, dims, self.seed)?, Shape::from(dims.0)))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaDType, CudaStorageSlice, WrapErr};
    use candle_core::{CudaDevice, CudaStorage, Result};

    /// Threads per row (`THREADS` in the source).
    const THREADS: u32 = 1024;

    /// One block per row; each thread strides over the row keeping its best (value, index),
    /// then warp shuffles and one shared-memory round pick the block's (lowest index on ties).
    /// `logf` rather than `__logf`, so the values match the CPU twin's to an ulp.
    const SOURCE: &str = concat!(
        crate::model::nvrtc::dtype_structs!(),
        r#"
#define THREADS 1024
__device__ __forceinline__ unsigned long long mix(unsigned long long seed, unsigned long long i) {
  unsigned long long z = seed + (i + 1ull) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
__device__ __forceinline__ bool better(float v, unsigned int i, float bv, unsigned int bi) {
  return v > bv || (v == bv && i < bi);
}
template <class C>
__device__ void draw(const typename C::T* logits, const float* inv, unsigned int* out,
    unsigned int vocab, unsigned long long seed) {
  __shared__ float sv[THREADS / 32];
  __shared__ unsigned int si[THREADS / 32];
  const unsigned int r = blockIdx.x, tid = threadIdx.x;
  const float s = inv[r];
  const typename C::T* row = logits + (size_t)r * vocab;
  float bv = __int_as_float(0xff800000u);
  unsigned int bi = 0xffffffffu;
  for (unsigned int c = tid; c < vocab; c += THREADS) {
    float v = C::ld(row[c]);
    if (s > 0.f) {
      unsigned long long h = mix(seed, (unsigned long long)r * vocab + c);
      float u = ((float)(unsigned int)(h >> 41) + 0.5f) * (1.0f / 8388608.0f);
      v = v * s - logf(-logf(u));
    }
    if (better(v, c, bv, bi)) { bv = v; bi = c; }
  }
  for (int o = 16; o > 0; o >>= 1) {
    float ov = __shfl_xor_sync(0xffffffffu, bv, o);
    unsigned int oi = __shfl_xor_sync(0xffffffffu, bi, o);
    if (better(ov, oi, bv, bi)) { bv = ov; bi = oi; }
  }
  if (tid % 32 == 0) { sv[tid / 32] = bv; si[tid / 32] = bi; }
  __syncthreads();
  if (tid < 32) {
    bv = sv[tid]; bi = si[tid];
    for (int o = 16; o > 0; o >>= 1) {
      float ov = __shfl_xor_sync(0xffffffffu, bv, o);
      unsigned int oi = __shfl_xor_sync(0xffffffffu, bi, o);
      if (better(ov, oi, bv, bi)) { bv = ov; bi = oi; }
    }
    if (tid == 0) out[r] = bi == 0xffffffffu ? 0u : bi;
  }
}
#define DRAW(NAME, C) \
extern "C" __global__ void NAME(const C::T* logits, const float* inv, unsigned int* out, \
    unsigned int vocab, unsigned long long seed) { \
  draw<C>(logits, inv, out, vocab, seed); \
}
DRAW(draw_f32, F32)
DRAW(draw_bf16, Bf16)
DRAW(draw_f16, F16)
"#
    );

    pub(super) fn launch(
        logits: &CudaStorage,
        inv: &CudaStorage,
        dims: (usize, usize, usize, usize),
        seed: u64,
    ) -> Result<CudaStorage> {
        let dev = logits.device.clone();
        match &logits.slice {
            CudaStorageSlice::F32(l) => run(&dev, "draw_f32", l, inv, dims, seed),
            CudaStorageSlice::BF16(l) => run(&dev, "draw_bf16", l, inv, dims, seed),
            CudaStorageSlice::F16(l) => run(&dev, "draw_f16", l, inv, dims, seed),
            _ => candle_core::bail!("draw: the logits must be f32, f16 or bf16"),
        }
    }

    fn run<T: DeviceRepr + CudaDType>(
        dev: &CudaDevice,
        name: &str,
        logits: &CudaSlice<T>,
        inv: &CudaStorage,
        (rows, vocab, o1, o2): (usize, usize, usize, usize),
        seed: u64,
    ) -> Result<CudaStorage> {
        // SAFETY: the kernel's thread 0 of block r writes out[r] for every r < rows (`draw`
        // never launches for 0 rows).
        let mut out = unsafe { dev.alloc::<u32>(rows) }?;
        let func = dev.get_or_load_custom_func(
            name,
            "batchtune_draw",
            crate::model::nvrtc::compiled!(SOURCE, "draw")?,
        )?;
        let l = logits.slice(o1..);
        let inv = inv.as_cuda_slice::<f32>()?.slice(o2..);
        let vocab = vocab as u32;
        let mut b = func.builder();
        b.arg(&l);
        b.arg(&inv);
        b.arg(&mut out);
        b.arg(&vocab);
        b.arg(&seed);
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: block r reads row r of `rows × vocab` logits and inv[r], writes out[r].
        unsafe { b.launch(cfg) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
}

/// Runs [`draw`] on `device` and its CPU twin on the same random logits (rows greedy and at
/// temperatures 0.5, 1 and 2, over a 50,000-token vocabulary) and checks they pick the same
/// tokens: the GPU kernel is checked where it runs (`runtime bench` calls this before timing a
/// decoder on a GPU; CI has none). A different pick counts as equal only when its value is
/// within 1e-4 of the CPU's best (the two `logf`s may differ in the last bit).
pub fn self_check(device: &Device) -> Result<()> {
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        check_dtype(device, dtype)?;
    }
    Ok(())
}

/// [`self_check`] for logits of one dtype: the CPU twin reads the same rounded values.
fn check_dtype(device: &Device, dtype: DType) -> Result<()> {
    let (rows, vocab, seed) = (16usize, 50_000usize, 0x5eed_u64);
    let logits = Tensor::randn(0f32, 3.0, (rows, vocab), &Device::Cpu)?.to_dtype(dtype)?;
    let inv: Vec<f32> = (0..rows).map(|r| [0.0, 2.0, 1.0, 0.5][r % 4]).collect();
    let got = draw(&logits.to_device(device)?, &inv, seed)?;
    let host = logits
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let want = draw_cpu(&host, &inv, vocab, seed);
    let value = |r: usize, c: u32| {
        let i = r * vocab + c as usize;
        scored(host[i], inv[r], seed, i)
    };
    for (r, (&g, &w)) in got.iter().zip(&want).enumerate() {
        if g != w && (g as usize >= vocab || (value(r, w) - value(r, g)).abs() > 1e-4) {
            candle_core::bail!(
                "draw on {device:?} of {dtype:?} logits picked token {g} in row {r} where the CPU picks {w} (inverse temperature {})",
                inv[r]
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_noise_is_finite_at_both_ends_of_the_hash_range() {
        let ends = [
            gumbel(0),
            gumbel(u64::MAX),
            gumbel(1 << 41),
            gumbel(u64::MAX >> 24),
        ];
        assert!(ends.iter().all(|g| g.is_finite()), "{ends:?}");
        assert!(ends[0] < -2.5 && ends[1] > 16.0, "{ends:?}");
    }

    #[test]
    fn the_hash_noise_is_standard_gumbel() {
        // Mean γ ≈ 0.5772 and variance π²/6 ≈ 1.645 over 200,000 consecutive counters.
        let n = 200_000;
        let g: Vec<f64> = (0..n).map(|i| gumbel(mix(42, i)) as f64).collect();
        let mean = g.iter().sum::<f64>() / n as f64;
        let var = g.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        // σ of the mean ≈ √(1.645 / 200,000) ≈ 0.003.
        assert!((mean - 0.5772).abs() < 0.02, "mean {mean}");
        assert!((var - 1.645).abs() < 0.05, "variance {var}");
    }

    #[test]
    fn draws_follow_the_softmax_of_a_wide_row() {
        // 2,000 rows over 8 tokens with probabilities ∝ 1..=8 at temperature 1: each token's
        // share within 5σ of k / 36; greedy rows pick the last token; one seed repeats.
        let (rows, vocab) = (2000, 8);
        let row: Vec<f32> = (1..=vocab).map(|k| (k as f32).ln()).collect();
        let logits: Vec<f32> = (0..rows).flat_map(|_| row.clone()).collect();
        let mut inv = vec![1.0f32; rows];
        inv[0] = 0.0;
        let ids = draw_cpu(&logits, &inv, vocab, 7);
        assert_eq!(ids[0], 7);
        for k in 0..vocab {
            let share = ids[1..].iter().filter(|&&i| i as usize == k).count() as f64 / 1999.0;
            let p = (k + 1) as f64 / 36.0;
            let sigma = (p * (1.0 - p) / 1999.0).sqrt();
            assert!(
                (share - p).abs() < 5.0 * sigma,
                "token {k}: {share} against {p}"
            );
        }
        assert_eq!(draw_cpu(&logits, &inv, vocab, 7), ids);
        assert_ne!(draw_cpu(&logits, &inv, vocab, 8), ids);
    }

    #[test]
    fn the_cpu_device_passes_its_own_self_check_and_bad_shapes_are_errors() {
        self_check(&Device::Cpu).unwrap();
        let l = Tensor::zeros((3, 5), DType::F32, &Device::Cpu).unwrap();
        let err = draw(&l, &[1.0, 1.0], 1).unwrap_err().to_string();
        assert!(err.contains("2 temperatures for 3 rows"), "{err}");
    }
}
