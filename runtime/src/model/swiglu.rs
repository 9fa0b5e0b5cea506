//! The MLP's gated activation in one pass: `out[r, j] = silu(x[r, j]) · x[r, I + j]` for a
//! `[rows, 2I]` input holding the gate projection's `I` columns and then the up projection's.
//!
//! Why: the decoder runs the gate and up projections as one stacked matmul (one launch instead
//! of two), and its output's two halves are then strided views. candle's SiLU and product over
//! strided views are slower than over contiguous ones (on the 2-core CPU the stacked build with
//! candle's ops was 8–12% slower at 32 sequences; `results/generate-h200/served-kernels/`), and
//! even contiguous they are two passes and two launches over the widest activation of the
//! layer. This op reads each half once and writes the product once, computing in f32 and
//! rounding once. The CPU path is a plain loop; the unit tests compare it with candle's ops,
//! and [`self_check`] does the same for the GPU kernel where it runs.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, WithDType};

/// `silu(gate) · up` of a `[rows, 2I]` tensor whose first `I` columns are the gate and last
/// `I` the up projection; returns `[rows, I]`. f32, f16 or bf16; a non-contiguous input is
/// made contiguous first.
pub fn swiglu(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&SwiGlu)
}

struct SwiGlu;

/// `(rows, I, element offset)` of a contiguous `[rows, 2I]` input.
fn dims(l: &Layout) -> Result<(usize, usize, usize)> {
    let Some((start, _)) = l.contiguous_offsets() else {
        candle_core::bail!("swiglu: the input must be contiguous");
    };
    let (rows, cols) = l.shape().dims2()?;
    if cols % 2 != 0 {
        candle_core::bail!("swiglu: {cols} columns do not split into gate and up halves");
    }
    Ok((rows, cols / 2, start))
}

/// Below this many outputs the rows run on the calling thread: a decode step's few rows cost
/// less than handing them to the pool.
const PARALLEL_FROM: usize = 1 << 15;

fn cpu<T: WithDType>(x: &[T], rows: usize, half: usize) -> Vec<T> {
    use rayon::prelude::*;
    let mut out = vec![T::zero(); rows * half];
    if half == 0 {
        return out;
    }
    let row = |(o, r): (&mut [T], &[T])| {
        let (gate, up) = r.split_at(half);
        for ((o, &g), &u) in o.iter_mut().zip(gate).zip(up) {
            let g = g.to_f64() as f32;
            *o = T::from_f64((g / (1.0 + (-g).exp()) * u.to_f64() as f32) as f64);
        }
    };
    let x = &x[..rows * 2 * half];
    if rows * half < PARALLEL_FROM {
        out.chunks_mut(half)
            .zip(x.chunks_exact(2 * half))
            .for_each(row);
    } else {
        out.par_chunks_mut(half)
            .zip(x.par_chunks_exact(2 * half))
            .for_each(row);
    }
    out
}

impl CustomOp1 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, half, o) = dims(l)?;
        let out = match s {
            CpuStorage::F32(x) => CpuStorage::F32(cpu(&x[o..], rows, half)),
            CpuStorage::BF16(x) => CpuStorage::BF16(cpu(&x[o..], rows, half)),
            CpuStorage::F16(x) => CpuStorage::F16(cpu(&x[o..], rows, half)),
            _ => candle_core::bail!("swiglu: the input must be f32, f16 or bf16"),
        };
        Ok((out, Shape::from((rows, half))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (rows, half, o) = dims(l)?;
        Ok((cuda::launch(s, rows, half, o)?, Shape::from((rows, half))))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
    use candle_core::{CudaDevice, CudaStorage, Result};

    /// One thread per output element (grid-stride), f32 arithmetic; bf16 and f16 converted by
    /// bit operations and PTX so that NVRTC needs no CUDA headers.
    const SOURCE: &str = concat!(
        crate::model::nvrtc::dtype_structs!(),
        r#"
template <class C>
__device__ void swiglu(const typename C::T* x, typename C::T* out, unsigned int rows, unsigned int half) {
  const unsigned int n = rows * half;
  for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
    const unsigned int r = i / half, j = i % half;
    const typename C::T* row = x + (size_t)r * 2 * half;
    const float g = C::ld(row[j]);
    out[i] = C::st(g / (1.f + __expf(-g)) * C::ld(row[half + j]));
  }
}
#define SWIGLU(NAME, C) \
extern "C" __global__ void NAME(const C::T* x, C::T* out, unsigned int rows, unsigned int half) { \
  swiglu<C>(x, out, rows, half); \
}
SWIGLU(swiglu_bf16, Bf16)
SWIGLU(swiglu_f16, F16)
SWIGLU(swiglu_f32, F32)
"#
    );

    pub(super) fn launch(
        x: &CudaStorage,
        rows: usize,
        half: usize,
        offset: usize,
    ) -> Result<CudaStorage> {
        let dev = x.device.clone();
        match &x.slice {
            CudaStorageSlice::BF16(s) => run(&dev, "swiglu_bf16", s, rows, half, offset),
            CudaStorageSlice::F16(s) => run(&dev, "swiglu_f16", s, rows, half, offset),
            CudaStorageSlice::F32(s) => run(&dev, "swiglu_f32", s, rows, half, offset),
            _ => candle_core::bail!("swiglu: the input must be f32, f16 or bf16"),
        }
    }

    fn run<T: DeviceRepr + candle_core::cuda_backend::CudaDType>(
        dev: &CudaDevice,
        name: &str,
        x: &CudaSlice<T>,
        rows: usize,
        half: usize,
        offset: usize,
    ) -> Result<CudaStorage> {
        let n = rows * half;
        // SAFETY: the kernel writes all `n` outputs (grid-stride over every index) before any
        // is read.
        let mut out = unsafe { dev.alloc::<T>(n) }?;
        if n > 0 {
            let func = dev.get_or_load_custom_func(
                name,
                "batchtune_swiglu",
                crate::model::nvrtc::compiled!(SOURCE, "swiglu")?,
            )?;
            let x = x.slice(offset..);
            let (r, h) = (rows as u32, half as u32);
            let mut b = func.builder();
            b.arg(&x);
            b.arg(&mut out);
            b.arg(&r);
            b.arg(&h);
            // SAFETY: reads stay inside the `rows × 2·half` input from `offset` (its contiguous
            // layout was checked), writes inside `out`.
            unsafe { b.launch(LaunchConfig::for_num_elems(n as u32)) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
}

/// Compares [`swiglu`] on `device` in `dtype` with candle's `silu(gate) * up` (in f32 on the
/// CPU) on random input: the GPU kernel is checked where it runs (`runtime bench` calls this
/// before timing a decoder on a GPU; CI has none). Returns the largest difference relative to
/// `1 + |output|`.
pub fn self_check(device: &candle_core::Device, dtype: candle_core::DType) -> Result<f32> {
    use candle_core::{DType, Device};
    let (rows, half) = (37, 300);
    let x = (Tensor::randn(0f32, 3.0, (rows, 2 * half), device)?).to_dtype(dtype)?;
    let got = swiglu(&x)?.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let x = x.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let want = (candle_nn::ops::silu(&x.narrow(1, 0, half)?)? * x.narrow(1, half, half)?)?;
    // Relative to the output's size (plus one, for outputs near zero): bf16 keeps 8 bits of
    // mantissa, so the input's rounding alone moves an output by up to ~2⁻⁷ of itself.
    let worst = super::rel_err(&got, &want)?;
    super::judge_self_check(
        "swiglu",
        "silu(gate) * up",
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
    fn equals_silu_of_the_gate_times_the_up_half_in_every_dtype() {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            self_check(&Device::Cpu, dtype).unwrap();
        }
    }

    #[test]
    fn rows_split_over_threads_give_the_same_output() {
        let d = Device::Cpu;
        let (rows, half) = (PARALLEL_FROM / 64 + 3, 64);
        let x = Tensor::randn(0f32, 2.0, (rows, 2 * half), &d).unwrap();
        let want = (candle_nn::ops::silu(&x.narrow(1, 0, half).unwrap()).unwrap()
            * x.narrow(1, half, half).unwrap())
        .unwrap();
        let diff = (swiglu(&x).unwrap() - want).unwrap().abs().unwrap();
        assert!(diff.max_all().unwrap().to_scalar::<f32>().unwrap() < 1e-4);
    }

    #[test]
    fn a_strided_input_is_taken_and_an_odd_width_refused() {
        let d = Device::Cpu;
        let x = Tensor::arange(0f32, 24.0, &d)
            .unwrap()
            .reshape((4, 6))
            .unwrap();
        let got = swiglu(&x.t().unwrap()).unwrap();
        let xt = x.t().unwrap().contiguous().unwrap();
        let want = (candle_nn::ops::silu(&xt.narrow(1, 0, 2).unwrap()).unwrap()
            * xt.narrow(1, 2, 2).unwrap())
        .unwrap();
        let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-4);
        let err = swiglu(&Tensor::zeros((2, 3), DType::F32, &d).unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("3 columns do not split"), "{err}");
    }
}
