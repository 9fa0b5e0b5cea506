//! The attention projection's output split into heads in one pass: the `[t, (heads + 2 kv_heads)
//! × head_dim]` product of the stacked q/k/v matmul, plus its bias, becomes `[heads + 2 kv_heads,
//! t, head_dim]` with RoPE applied to the query and key heads at each row's position.
//!
//! Why: before this op the same work was a bias add, a layout copy, two gathers of the cos and
//! sin rows and a rope kernel, and each K and V write its own launch: on the H200 a step at a
//! few hundred sequences is bound by the host issuing kernels (about 14 µs each, forward 4.5 ms
//! for 321 launches at 512 sequences; `results/generate-h200/stream/`), and those were 5 of a
//! layer's 13. Now it is this op and one KV write (K and V are one tensor per layer, so one
//! write covers both; see `llama.rs`). The arithmetic is f32 with one rounding at the end. The
//! CPU path is a plain loop; the unit tests compare it with candle's ops, and [`self_check`]
//! does the same for the GPU kernel where it runs.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, WithDType};

/// RoPE's angle table for positions `0..positions`: `[positions, head_dim]` f32, each row the
/// cosines of its `head_dim / 2` angles and then their sines (θ as in the model config).
pub fn table(positions: usize, head_dim: usize, theta: f64) -> Vec<f32> {
    let half = head_dim / 2;
    let mut t = Vec::with_capacity(positions * head_dim);
    for p in 0..positions {
        let angle = |i: usize| p as f64 / theta.powf(2.0 * i as f64 / head_dim as f64);
        t.extend((0..half).map(|i| angle(i).cos() as f32));
        t.extend((0..half).map(|i| angle(i).sin() as f32));
    }
    t
}

/// The head layout and RoPE variant of one model.
#[derive(Clone, Copy, Debug)]
pub struct Heads {
    /// Query heads.
    pub heads: usize,
    /// Key (and value) heads.
    pub kv_heads: usize,
    /// Elements per head (even).
    pub head_dim: usize,
    /// RoPE rotates adjacent pairs (GGUF's layout) rather than the two halves of a head.
    pub interleaved: bool,
}

/// Splits `qkv` (`[t, (heads + 2 kv_heads) × head_dim]`, contiguous) into `[heads + 2 kv_heads,
/// t, head_dim]`: `bias` (`[(heads + 2 kv_heads) × head_dim]`, same dtype) added, and the first
/// `heads + kv_heads` heads rotated by RoPE at `positions` (`[t]` u32) using `table`
/// ([`table`], f32 on the same device). f32, f16 or bf16.
pub fn qkv_rope(
    qkv: &Tensor,
    bias: Option<&Tensor>,
    table: &Tensor,
    positions: &Tensor,
    h: Heads,
) -> Result<Tensor> {
    qkv.apply_op1_no_bwd(&QkvRope {
        bias,
        table,
        positions,
        h,
    })
}

struct QkvRope<'a> {
    bias: Option<&'a Tensor>,
    table: &'a Tensor,
    positions: &'a Tensor,
    h: Heads,
}

/// Sizes of one call, checked against each other.
struct Dims {
    t: usize,
    /// Heads of all three kinds.
    all: usize,
    /// Rows of the angle table.
    positions: usize,
    /// Element offset of `qkv`.
    offset: usize,
}

fn dims(op: &QkvRope<'_>, l: &Layout) -> Result<Dims> {
    let Some((offset, _)) = l.contiguous_offsets() else {
        candle_core::bail!("qkv-rope: the projection must be contiguous");
    };
    let h = op.h;
    let all = h.heads + 2 * h.kv_heads;
    let (t, width) = l.shape().dims2()?;
    if !h.head_dim.is_multiple_of(2) || width != all * h.head_dim {
        candle_core::bail!(
            "qkv-rope: {width} columns are not {all} heads of an even head_dim {}",
            h.head_dim
        );
    }
    let (positions, cols) = op.table.dims2()?;
    if cols != h.head_dim || op.table.dtype() != DType::F32 {
        candle_core::bail!("qkv-rope: the angle table must be f32 [positions, head_dim]");
    }
    if op.positions.dims1()? != t || op.positions.dtype() != DType::U32 {
        candle_core::bail!("qkv-rope: positions must be u32 [{t}]");
    }
    if let Some(b) = op.bias {
        if b.dims1()? != width {
            candle_core::bail!("qkv-rope: the bias must be [{width}]");
        }
    }
    Ok(Dims {
        t,
        all,
        positions,
        offset,
    })
}

/// Element `(head, j)` pair that RoPE rotates together: `(j, j + half)` or `(2j, 2j + 1)`.
fn pair(interleaved: bool, j: usize, half: usize) -> (usize, usize) {
    if interleaved {
        (2 * j, 2 * j + 1)
    } else {
        (j, j + half)
    }
}

/// Below this many outputs the rows run on the calling thread.
const PARALLEL_FROM: usize = 1 << 15;

/// The CPU version; `bias` and `table` already sliced to their elements, `pos` to `t`.
fn cpu<T: WithDType>(
    x: &[T],
    bias: Option<&[T]>,
    table: &[f32],
    pos: &[u32],
    h: Heads,
    d: &Dims,
) -> Result<Vec<T>> {
    use rayon::prelude::*;
    let (hd, half, width) = (h.head_dim, h.head_dim / 2, d.all * h.head_dim);
    if let Some(&p) = pos.iter().find(|&&p| p as usize >= d.positions) {
        candle_core::bail!(
            "qkv-rope: position {p} is past the angle table's {}",
            d.positions
        );
    }
    let rotated = h.heads + h.kv_heads;
    let f = |v: T| v.to_f64() as f32;
    // One head's output row (`[head_dim]`, at (head, r)) from row r of the projection.
    let head = |(i, out): (usize, &mut [T])| {
        let (hh, r) = (i / d.t, i % d.t);
        let src = &x[r * width + hh * hd..][..hd];
        let b = |k: usize| bias.map_or(0.0, |b| f(b[hh * hd + k]));
        let angles = &table[pos[r] as usize * hd..][..hd];
        for j in 0..half {
            let (a, c) = pair(h.interleaved, j, half);
            let (xa, xc) = (f(src[a]) + b(a), f(src[c]) + b(c));
            let (ya, yc) = if hh < rotated {
                let (cos, sin) = (angles[j], angles[half + j]);
                (xa * cos - xc * sin, xa * sin + xc * cos)
            } else {
                (xa, xc)
            };
            out[a] = T::from_f64(ya as f64);
            out[c] = T::from_f64(yc as f64);
        }
    };
    let mut out = vec![T::zero(); d.all * d.t * hd];
    if hd == 0 {
        return Ok(out);
    }
    if out.len() < PARALLEL_FROM {
        out.chunks_mut(hd).enumerate().for_each(head);
    } else {
        out.par_chunks_mut(hd).enumerate().for_each(head);
    }
    Ok(out)
}

/// A CPU tensor's elements, borrowed from its storage (`guard`, `layout`: its
/// `storage_and_layout`); it must be contiguous and of dtype `T`.
fn borrowed<'g, T: WithDType>(
    guard: &'g candle_core::Storage,
    layout: &Layout,
    what: &str,
) -> Result<&'g [T]> {
    let candle_core::Storage::Cpu(s) = guard else {
        candle_core::bail!("qkv-rope: the {what} is not on the CPU");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("qkv-rope: the {what} must be contiguous");
    };
    Ok(&T::cpu_storage_as_slice(s)?[start..end])
}

/// [`cpu`] with the operands other than the projection borrowed from their tensors.
fn cpu_op<T: WithDType>(op: &QkvRope<'_>, x: &[T], d: &Dims) -> Result<Vec<T>> {
    let (tg, tl) = op.table.storage_and_layout();
    let (pg, pl) = op.positions.storage_and_layout();
    let bias = op.bias.map(|b| b.storage_and_layout());
    let bias = match &bias {
        Some((g, l)) => Some(borrowed::<T>(g, l, "bias")?),
        None => None,
    };
    let table = borrowed::<f32>(&tg, tl, "angle table")?;
    let pos = borrowed::<u32>(&pg, pl, "positions")?;
    cpu(&x[d.offset..], bias, table, pos, op.h, d)
}

impl CustomOp1 for QkvRope<'_> {
    fn name(&self) -> &'static str {
        "qkv-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = dims(self, l)?;
        let out = match s {
            CpuStorage::F32(x) => CpuStorage::F32(cpu_op(self, x, &d)?),
            CpuStorage::BF16(x) => CpuStorage::BF16(cpu_op(self, x, &d)?),
            CpuStorage::F16(x) => CpuStorage::F16(cpu_op(self, x, &d)?),
            _ => candle_core::bail!("qkv-rope: the projection must be f32, f16 or bf16"),
        };
        Ok((out, Shape::from((d.all, d.t, self.h.head_dim))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let d = dims(self, l)?;
        let out = cuda::launch(self, s, &d)?;
        Ok((out, Shape::from((d.all, d.t, self.h.head_dim))))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::{Dims, QkvRope};
    use crate::model::nvrtc::cuda_view;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaDType, CudaStorageSlice, WrapErr};
    use candle_core::{CudaDevice, CudaStorage, Result};

    /// One block per row of the projection; its threads take the rotation pairs of every head
    /// in turn, so consecutive threads read and write consecutive elements. Positions past the
    /// table are clamped to its last row (the host checks them before every step).
    const SOURCE: &str = concat!(
        crate::model::nvrtc::dtype_structs!(),
        r#"
template <class C>
__device__ void qkv_rope(const typename C::T* x, const typename C::T* bias, const float* table,
    const unsigned int* pos, typename C::T* out, unsigned int t, unsigned int all,
    unsigned int rotated, unsigned int hd, unsigned int positions, unsigned int interleaved) {
  const unsigned int r = blockIdx.x, half = hd / 2, width = all * hd;
  const unsigned int p = min(pos[r], positions - 1);
  const float* angles = table + (size_t)p * hd;
  const typename C::T* src = x + (size_t)r * width;
  for (unsigned int i = threadIdx.x; i < all * half; i += blockDim.x) {
    const unsigned int h = i / half, j = i % half;
    const unsigned int a = interleaved ? 2 * j : j, c = interleaved ? 2 * j + 1 : j + half;
    float xa = C::ld(src[h * hd + a]), xc = C::ld(src[h * hd + c]);
    if (bias) { xa += C::ld(bias[h * hd + a]); xc += C::ld(bias[h * hd + c]); }
    float ya = xa, yc = xc;
    if (h < rotated) {
      const float cs = angles[j], sn = angles[half + j];
      ya = xa * cs - xc * sn;
      yc = xa * sn + xc * cs;
    }
    typename C::T* o = out + ((size_t)h * t + r) * hd;
    o[a] = C::st(ya);
    o[c] = C::st(yc);
  }
}
#define QKV_ROPE(NAME, C) \
extern "C" __global__ void NAME(const C::T* x, const C::T* bias, const float* table, \
    const unsigned int* pos, C::T* out, unsigned int t, unsigned int all, unsigned int rotated, \
    unsigned int hd, unsigned int positions, unsigned int interleaved) { \
  qkv_rope<C>(x, bias, table, pos, out, t, all, rotated, hd, positions, interleaved); \
}
QKV_ROPE(qkv_rope_bf16, Bf16)
QKV_ROPE(qkv_rope_f16, F16)
QKV_ROPE(qkv_rope_f32, F32)
"#
    );

    pub(super) fn launch(op: &QkvRope<'_>, x: &CudaStorage, d: &Dims) -> Result<CudaStorage> {
        let dev = x.device.clone();
        match &x.slice {
            CudaStorageSlice::BF16(s) => run(&dev, "qkv_rope_bf16", s, op, d),
            CudaStorageSlice::F16(s) => run(&dev, "qkv_rope_f16", s, op, d),
            CudaStorageSlice::F32(s) => run(&dev, "qkv_rope_f32", s, op, d),
            _ => candle_core::bail!("qkv-rope: the projection must be f32, f16 or bf16"),
        }
    }

    fn run<T: DeviceRepr + CudaDType>(
        dev: &CudaDevice,
        name: &str,
        x: &CudaSlice<T>,
        op: &QkvRope<'_>,
        d: &Dims,
    ) -> Result<CudaStorage> {
        let hd = op.h.head_dim;
        let n = d.all * d.t * hd;
        // SAFETY: every (head, row, element) of the output is written: each row's block covers
        // all heads' pairs, and the pairs of a head cover its elements.
        let mut out = unsafe { dev.alloc::<T>(n) }?;
        if n > 0 {
            let func = dev.get_or_load_custom_func(
                name,
                "batchtune_qkv_rope",
                crate::model::nvrtc::compiled!(SOURCE, "qkv-rope")?,
            )?;
            let (tg, tl) = op.table.storage_and_layout();
            let (pg, pl) = op.positions.storage_and_layout();
            let bias = op.bias.map(|b| b.storage_and_layout());
            let table = cuda_view::<f32>(&tg, tl, "qkv-rope: the angle table")?;
            let pos = cuda_view::<u32>(&pg, pl, "qkv-rope: the positions")?;
            let bias_view = match &bias {
                Some((g, l)) => Some(cuda_view::<T>(g, l, "qkv-rope: the bias")?),
                None => None,
            };
            let x = x.slice(d.offset..);
            let u = |v: usize| v as u32;
            let args = [
                u(d.t),
                u(d.all),
                u(op.h.heads + op.h.kv_heads),
                u(hd),
                u(d.positions),
                u(op.h.interleaved as usize),
            ];
            let mut b = func.builder();
            b.arg(&x);
            // A null pointer says "no bias" to the kernel.
            let none = 0u64;
            match &bias_view {
                Some(v) => b.arg(v),
                None => b.arg(&none),
            };
            b.arg(&table);
            b.arg(&pos);
            b.arg(&mut out);
            for a in &args {
                b.arg(a);
            }
            let cfg = LaunchConfig {
                grid_dim: (d.t as u32, 1, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: reads stay inside the projection (t rows of `all × hd`), the bias (`all ×
            // hd`), the table (positions clamped to its rows) and `pos` (t entries); writes stay
            // inside `out`.
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
}

/// Compares [`qkv_rope`] on `device` in `dtype` with candle's ops (bias add, layout copy, rope
/// or rope_i, in f32 on the CPU) for Qwen2.5-0.5B's head layout with a bias and SmolLM2's
/// interleaved GGUF layout without; returns the largest difference relative to the value's
/// size. `runtime bench` calls this before timing a decoder on a GPU; CI has none.
pub fn self_check(device: &candle_core::Device, dtype: DType) -> Result<f32> {
    use candle_core::Device;
    let mut worst = 0f32;
    for (h, with_bias) in [
        (
            Heads {
                heads: 14,
                kv_heads: 2,
                head_dim: 64,
                interleaved: false,
            },
            true,
        ),
        (
            Heads {
                heads: 9,
                kv_heads: 3,
                head_dim: 64,
                interleaved: true,
            },
            false,
        ),
    ] {
        let (t, positions) = (37, 300);
        let all = h.heads + 2 * h.kv_heads;
        let x = Tensor::randn(0f32, 1.0, (t, all * h.head_dim), device)?.to_dtype(dtype)?;
        let bias = if with_bias {
            Some(Tensor::randn(0f32, 1.0, all * h.head_dim, device)?.to_dtype(dtype)?)
        } else {
            None
        };
        let tab = Tensor::from_vec(
            table(positions, h.head_dim, 10_000.0),
            (positions, h.head_dim),
            device,
        )?;
        let pos: Vec<u32> = (0..t as u32)
            .map(|i| (i * 37 + 5) % positions as u32)
            .collect();
        let pos_t = Tensor::from_vec(pos.clone(), t, device)?;
        let got = qkv_rope(&x, bias.as_ref(), &tab, &pos_t, h)?
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?;
        // The same with candle's ops, in f32 on the CPU.
        let cpu = |v: &Tensor| v.to_device(&Device::Cpu)?.to_dtype(DType::F32);
        let mut y = cpu(&x)?;
        if let Some(b) = &bias {
            y = y.broadcast_add(&cpu(b)?)?;
        }
        let y = y
            .reshape((t, all, h.head_dim))?
            .transpose(0, 1)?
            .contiguous()?;
        let idx = Tensor::from_vec(pos, t, &Device::Cpu)?;
        let tab = tab.to_device(&Device::Cpu)?.index_select(&idx, 0)?;
        let half = h.head_dim / 2;
        let (cos, sin) = (
            tab.narrow(1, 0, half)?.contiguous()?,
            tab.narrow(1, half, half)?.contiguous()?,
        );
        let rot = h.heads + h.kv_heads;
        let qk = y.narrow(0, 0, rot)?.unsqueeze(0)?.contiguous()?;
        let qk = if h.interleaved {
            candle_nn::rotary_emb::rope_i(&qk, &cos, &sin)?
        } else {
            candle_nn::rotary_emb::rope(&qk, &cos, &sin)?
        }
        .squeeze(0)?;
        let want = Tensor::cat(&[qk, y.narrow(0, rot, h.kv_heads)?], 0)?;
        worst = worst.max(super::rel_err(&got, &want)?);
    }
    super::judge_self_check(
        "qkv-rope",
        "candle's ops",
        device,
        dtype,
        worst,
        super::ELEMENTWISE_LIMITS,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn equals_bias_add_layout_copy_and_rope_in_every_dtype() {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            self_check(&Device::Cpu, dtype).unwrap();
        }
    }

    #[test]
    fn a_position_past_the_table_and_a_ragged_width_are_refused() {
        let d = Device::Cpu;
        let h = Heads {
            heads: 2,
            kv_heads: 1,
            head_dim: 4,
            interleaved: false,
        };
        let tab = Tensor::from_vec(table(8, 4, 10_000.0), (8, 4), &d).unwrap();
        let x = Tensor::zeros((2, 16), DType::F32, &d).unwrap();
        let pos = Tensor::from_vec(vec![3u32, 8], 2, &d).unwrap();
        let err = qkv_rope(&x, None, &tab, &pos, h).unwrap_err().to_string();
        assert!(err.contains("position 8 is past"), "{err}");
        let x = Tensor::zeros((2, 15), DType::F32, &d).unwrap();
        let pos = Tensor::from_vec(vec![3u32, 4], 2, &d).unwrap();
        let err = qkv_rope(&x, None, &tab, &pos, h).unwrap_err().to_string();
        assert!(err.contains("15 columns are not 4 heads"), "{err}");
    }
}
