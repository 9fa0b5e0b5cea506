//! The residual add and the RMSNorm after it in one op: `s = x + y`, `n = s / rms(s) · w`,
//! both returned.
//!
//! Why: a decoder layer adds a residual and normalises the sum twice (before the MLP, and
//! before the next layer's attention). candle runs each as its own kernel, so a Qwen2.5-0.5B
//! step of 24 layers issued 48 adds and 49 RMSNorms; on the H200 at 256 sequences the step is
//! bound by the host issuing kernels (`results/generate-h200/fused-mlp/`), and candle's RMSNorm
//! took 0.93 ms of a 4.84 ms step's GPU time. This op is one launch for both, reads `x` and `y`
//! once, and writes the sum (the next residual) and the normalised rows side by side in one
//! `[2, rows, hidden]` buffer whose halves are returned as views.
//!
//! Arithmetic matches the separate ops: the sum is rounded to the dtype first (as candle's add
//! stores it), and the norm is computed in f32 over the rounded sum. The CPU path is a plain
//! loop; the unit tests compare it with candle's ops, and [`self_check`] does the same for the
//! GPU kernel where it runs.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, WithDType};

/// `(x + y, rmsnorm(x + y) · w)` for `[rows, hidden]` inputs `x`, `y` and `[hidden]` weight
/// `w`, all of one dtype (f32, f16 or bf16); non-contiguous inputs are made contiguous first.
pub fn add_rms_norm(x: &Tensor, y: &Tensor, w: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    let both = x.contiguous()?.apply_op3_no_bwd(
        &y.contiguous()?,
        &w.contiguous()?,
        &AddRmsNorm { eps: eps as f32 },
    )?;
    Ok((both.get(0)?, both.get(1)?))
}

struct AddRmsNorm {
    eps: f32,
}

/// Shapes of one call: `rows`, `hidden`, and the element offsets of `x`, `y`, `w`.
struct Dims {
    rows: usize,
    hidden: usize,
    offsets: [usize; 3],
}

fn dims(x: &Layout, y: &Layout, w: &Layout) -> Result<Dims> {
    let offset = |l: &Layout, what: &str| match l.contiguous_offsets() {
        Some((start, _)) => Ok(start),
        None => candle_core::bail!("add-rms-norm: {what} must be contiguous"),
    };
    let offsets = [offset(x, "x")?, offset(y, "y")?, offset(w, "the weight")?];
    let (rows, hidden) = x.shape().dims2()?;
    if y.shape() != x.shape() || w.shape().dims1()? != hidden {
        candle_core::bail!(
            "add-rms-norm: x {:?}, y {:?} and weight {:?} do not agree",
            x.shape(),
            y.shape(),
            w.shape()
        );
    }
    Ok(Dims {
        rows,
        hidden,
        offsets,
    })
}

/// Below this many elements the rows run on the calling thread: a decode step's few rows cost
/// less than handing them to the pool.
const PARALLEL_FROM: usize = 1 << 15;

fn cpu<T: WithDType>(x: &[T], y: &[T], w: &[T], d: &Dims, eps: f32) -> Vec<T> {
    use rayon::prelude::*;
    let (n, h) = (d.rows * d.hidden, d.hidden);
    let mut out = vec![T::zero(); 2 * n];
    if h == 0 {
        return out;
    }
    let f = |v: T| v.to_f64() as f32;
    let row = |s: &mut [T], o: &mut [T], x: &[T], y: &[T]| {
        let mut sq = 0f32;
        for ((s, &a), &b) in s.iter_mut().zip(x).zip(y) {
            *s = T::from_f64((f(a) + f(b)) as f64);
            sq += f(*s) * f(*s);
        }
        let inv = 1.0 / (sq / h as f32 + eps).sqrt();
        for ((o, &s), &w) in o.iter_mut().zip(s.iter()).zip(w) {
            *o = T::from_f64((f(s) * inv * f(w)) as f64);
        }
    };
    let (sums, normed) = out.split_at_mut(n);
    let (x, y) = (&x[..n], &y[..n]);
    if n < PARALLEL_FROM {
        sums.chunks_mut(h)
            .zip(normed.chunks_mut(h))
            .zip(x.chunks(h).zip(y.chunks(h)))
            .for_each(|((s, o), (x, y))| row(s, o, x, y));
    } else {
        sums.par_chunks_mut(h)
            .zip(normed.par_chunks_mut(h))
            .zip(x.par_chunks(h).zip(y.par_chunks(h)))
            .for_each(|((s, o), (x, y))| row(s, o, x, y));
    }
    out
}

impl CustomOp3 for AddRmsNorm {
    fn name(&self) -> &'static str {
        "add-rms-norm"
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
        let d = dims(l1, l2, l3)?;
        let [o1, o2, o3] = d.offsets;
        let e = self.eps;
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(y), CpuStorage::F32(w)) => {
                CpuStorage::F32(cpu(&x[o1..], &y[o2..], &w[o3..], &d, e))
            }
            (CpuStorage::BF16(x), CpuStorage::BF16(y), CpuStorage::BF16(w)) => {
                CpuStorage::BF16(cpu(&x[o1..], &y[o2..], &w[o3..], &d, e))
            }
            (CpuStorage::F16(x), CpuStorage::F16(y), CpuStorage::F16(w)) => {
                CpuStorage::F16(cpu(&x[o1..], &y[o2..], &w[o3..], &d, e))
            }
            _ => candle_core::bail!("add-rms-norm: x, y and weight must share f32, f16 or bf16"),
        };
        Ok((out, Shape::from((2, d.rows, d.hidden))))
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
        let d = dims(l1, l2, l3)?;
        let out = cuda::launch(s1, s2, s3, &d, self.eps)?;
        Ok((out, Shape::from((2, d.rows, d.hidden))))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::Dims;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaDType, CudaStorageSlice, WrapErr};
    use candle_core::{CudaDevice, CudaStorage, Result};

    /// Threads per block; one block per row.
    const THREADS: u32 = 256;

    /// One block per row: each thread adds its columns (rounding the sum to the dtype and
    /// storing it), the block sums the squares (warp shuffles, then one value per warp in
    /// shared memory), and each thread writes its columns normalised.
    const SOURCE: &str = concat!(
        crate::model::nvrtc::dtype_structs!(),
        r#"
#define THREADS 256
template <class C>
__device__ void add_rms(const typename C::T* x, const typename C::T* y, const typename C::T* w,
    typename C::T* out, unsigned int rows, unsigned int h, float eps) {
  __shared__ float part[THREADS / 32];
  const unsigned int r = blockIdx.x, tid = threadIdx.x;
  const size_t base = (size_t)r * h;
  typename C::T* s = out + base;
  typename C::T* o = out + (size_t)rows * h + base;
  float sq = 0.f;
  for (unsigned int i = tid; i < h; i += THREADS) {
    const typename C::T v = C::st(C::ld(x[base + i]) + C::ld(y[base + i]));
    s[i] = v;
    const float f = C::ld(v);
    sq += f * f;
  }
  for (int k = 16; k > 0; k >>= 1) sq += __shfl_xor_sync(0xffffffffu, sq, k);
  if (tid % 32 == 0) part[tid / 32] = sq;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int k = 0; k < THREADS / 32; k++) total += part[k];
  const float inv = rsqrtf(total / (float)h + eps);
  for (unsigned int i = tid; i < h; i += THREADS) o[i] = C::st(C::ld(s[i]) * inv * C::ld(w[i]));
}
#define ADD_RMS(NAME, C) \
extern "C" __global__ void NAME(const C::T* x, const C::T* y, const C::T* w, C::T* out, \
    unsigned int rows, unsigned int h, float eps) { \
  add_rms<C>(x, y, w, out, rows, h, eps); \
}
ADD_RMS(add_rms_bf16, Bf16)
ADD_RMS(add_rms_f16, F16)
ADD_RMS(add_rms_f32, F32)
"#
    );

    pub(super) fn launch(
        x: &CudaStorage,
        y: &CudaStorage,
        w: &CudaStorage,
        d: &Dims,
        eps: f32,
    ) -> Result<CudaStorage> {
        let dev = x.device.clone();
        match (&x.slice, &y.slice, &w.slice) {
            (CudaStorageSlice::BF16(x), CudaStorageSlice::BF16(y), CudaStorageSlice::BF16(w)) => {
                run(&dev, "add_rms_bf16", [x, y, w], d, eps)
            }
            (CudaStorageSlice::F16(x), CudaStorageSlice::F16(y), CudaStorageSlice::F16(w)) => {
                run(&dev, "add_rms_f16", [x, y, w], d, eps)
            }
            (CudaStorageSlice::F32(x), CudaStorageSlice::F32(y), CudaStorageSlice::F32(w)) => {
                run(&dev, "add_rms_f32", [x, y, w], d, eps)
            }
            _ => candle_core::bail!("add-rms-norm: x, y and weight must share f32, f16 or bf16"),
        }
    }

    fn run<T: DeviceRepr + CudaDType>(
        dev: &CudaDevice,
        name: &str,
        [x, y, w]: [&CudaSlice<T>; 3],
        d: &Dims,
        eps: f32,
    ) -> Result<CudaStorage> {
        let n = 2 * d.rows * d.hidden;
        // SAFETY: block r writes row r of both halves, every column of it, before any is read.
        let mut out = unsafe { dev.alloc::<T>(n) }?;
        if d.rows > 0 && d.hidden > 0 {
            let func = dev.get_or_load_custom_func(
                name,
                "batchtune_add_rms",
                crate::model::nvrtc::compiled!(SOURCE, "add-rms-norm")?,
            )?;
            let [o1, o2, o3] = d.offsets;
            let (x, y, w) = (x.slice(o1..), y.slice(o2..), w.slice(o3..));
            let (rows, h) = (d.rows as u32, d.hidden as u32);
            let cfg = LaunchConfig {
                grid_dim: (rows, 1, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut b = func.builder();
            b.arg(&x);
            b.arg(&y);
            b.arg(&w);
            b.arg(&mut out);
            b.arg(&rows);
            b.arg(&h);
            b.arg(&eps);
            // SAFETY: reads stay inside the `rows × hidden` inputs and the `hidden` weight
            // (shapes checked in `dims`), writes inside `out`.
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
}

/// Compares [`add_rms_norm`] on `device` in `dtype` with candle's add followed by its RMSNorm
/// (in f32 on the CPU, over the sum rounded to `dtype` as the add stores it) on random input:
/// the GPU kernel is checked where it runs (`runtime bench` calls this before timing a decoder
/// on a GPU; CI has none). Returns the largest difference of either output, relative to
/// `1 + |value|`.
pub fn self_check(device: &candle_core::Device, dtype: candle_core::DType) -> Result<f32> {
    use candle_core::{DType, Device};
    let (rows, hidden) = (37, 896);
    let x = Tensor::randn(0f32, 2.0, (rows, hidden), device)?.to_dtype(dtype)?;
    let y = Tensor::randn(0f32, 2.0, (rows, hidden), device)?.to_dtype(dtype)?;
    let w = Tensor::randn(1f32, 0.3, hidden, device)?.to_dtype(dtype)?;
    let (sum, normed) = add_rms_norm(&x, &y, &w, 1e-6)?;
    let cpu = |t: &Tensor| t.to_device(&Device::Cpu)?.to_dtype(DType::F32);
    let want_sum = (x + y)?;
    let want = candle_nn::ops::rms_norm(&cpu(&want_sum)?, &cpu(&w)?, 1e-6)?;
    use super::rel_err;
    let worst = rel_err(&cpu(&sum)?, &cpu(&want_sum)?)?.max(rel_err(&cpu(&normed)?, &want)?);
    super::judge_self_check(
        "add-rms-norm",
        "add then rms_norm",
        device,
        dtype,
        worst,
        super::ELEMENTWISE_LIMITS,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn equals_an_add_then_candles_rms_norm_in_every_dtype() {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            self_check(&Device::Cpu, dtype).unwrap();
        }
    }

    #[test]
    fn rows_split_over_threads_give_the_same_output() {
        let d = Device::Cpu;
        let (rows, hidden) = (PARALLEL_FROM / 64 + 5, 64);
        let x = Tensor::randn(0f32, 1.0, (rows, hidden), &d).unwrap();
        let y = Tensor::randn(0f32, 1.0, (rows, hidden), &d).unwrap();
        let w = Tensor::randn(1f32, 0.3, hidden, &d).unwrap();
        let (s, n) = add_rms_norm(&x, &y, &w, 1e-5).unwrap();
        let want_s = (&x + &y).unwrap();
        let want_n = candle_nn::ops::rms_norm(&want_s, &w, 1e-5).unwrap();
        for (got, want) in [(s, want_s), (n, want_n)] {
            let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap();
            assert!(diff.to_scalar::<f32>().unwrap() < 1e-4);
        }
    }

    #[test]
    fn mismatched_shapes_are_refused() {
        let d = Device::Cpu;
        let x = Tensor::zeros((2, 4), DType::F32, &d).unwrap();
        let y = Tensor::zeros((2, 3), DType::F32, &d).unwrap();
        let w = Tensor::ones(4, DType::F32, &d).unwrap();
        let err = add_rms_norm(&x, &y, &w, 1e-5).unwrap_err().to_string();
        assert!(err.contains("do not agree"), "{err}");
        let w3 = Tensor::ones(3, DType::F32, &d).unwrap();
        assert!(add_rms_norm(&x, &x, &w3, 1e-5).is_err());
    }
}
