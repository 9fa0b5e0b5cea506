//! Writes a step's new keys and values into the KV pool: `pool[h, rows[j], :] = src[h, j, :]`.
//!
//! candle's `scatter_set` computes the same thing, but its CUDA kernel gives one thread to each
//! (head, dim) pair and walks the written rows one after another: for Qwen2.5's 2 KV heads × 64
//! dims that is 128 threads looping over every token of the step, twice per layer, so a step's
//! KV writes took time in proportion to its tokens (on the H200 a decode step of 256 sequences
//! took 13.7 ms against 7.1 ms for 64, and 4 prompts of 46 tokens prefilled beside them added
//! 7.8 ms more: `results/generate-h200/kv-write/`). Copying rows is parallel by nature, so this
//! op gives every element its own thread. The CPU path does the same copy in a loop; tests of
//! the decoder run it, so the index arithmetic shared by both paths is checked without a GPU.

use candle_core::{CpuStorage, InplaceOp3, Layout, Result, Tensor};

/// Copies `src` (`[heads, t, head_dim]`) into the rows `rows` (`[t]`, u32) of `pool`
/// (`[heads, pool_rows, head_dim]`), in place. All three must be contiguous; pool and `src`
/// share one dtype (f32, f16 or bf16).
pub fn write_rows(pool: &Tensor, src: &Tensor, rows: &Tensor) -> Result<()> {
    pool.inplace_op3(src, rows, &KvWrite)
}

struct KvWrite;

/// `(heads, pool_rows, t, head_dim)` and the element offsets of the three operands, after
/// checking the shapes agree and every operand is contiguous.
struct Dims {
    heads: usize,
    pool_rows: usize,
    t: usize,
    hd: usize,
    offsets: [usize; 3],
}

fn dims(pool: &Layout, src: &Layout, rows: &Layout) -> Result<Dims> {
    let offset = |l: &Layout, what: &str| -> Result<usize> {
        match l.contiguous_offsets() {
            Some((start, _)) => Ok(start),
            None => candle_core::bail!("kv-write: the {what} must be contiguous"),
        }
    };
    let offsets = [
        offset(pool, "pool")?,
        offset(src, "values")?,
        offset(rows, "rows")?,
    ];
    let (heads, pool_rows, hd) = pool.shape().dims3()?;
    let (h2, t, d2) = src.shape().dims3()?;
    let t2 = rows.shape().dims1()?;
    if (h2, d2, t2) != (heads, hd, t) {
        candle_core::bail!(
            "kv-write: values {:?} and rows {:?} do not fit a pool of {:?}",
            src.shape(),
            rows.shape(),
            pool.shape()
        );
    }
    Ok(Dims {
        heads,
        pool_rows,
        t,
        hd,
        offsets,
    })
}

fn copy_rows<T: Copy>(pool: &mut [T], src: &[T], rows: &[u32], d: &Dims) -> Result<()> {
    if let Some(&r) = rows.iter().find(|&&r| r as usize >= d.pool_rows) {
        candle_core::bail!("kv-write: row {r} is outside a pool of {}", d.pool_rows);
    }
    for h in 0..d.heads {
        for (j, &r) in rows.iter().enumerate() {
            let from = (h * d.t + j) * d.hd;
            let to = (h * d.pool_rows + r as usize) * d.hd;
            pool[to..to + d.hd].copy_from_slice(&src[from..from + d.hd]);
        }
    }
    Ok(())
}

impl InplaceOp3 for KvWrite {
    fn name(&self) -> &'static str {
        "kv-write"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let d = dims(l1, l2, l3)?;
        let [o1, o2, o3] = d.offsets;
        let CpuStorage::U32(rows) = s3 else {
            candle_core::bail!("kv-write: rows must be u32");
        };
        let rows = &rows[o3..o3 + d.t];
        match (s1, s2) {
            (CpuStorage::F32(p), CpuStorage::F32(s)) => copy_rows(&mut p[o1..], &s[o2..], rows, &d),
            (CpuStorage::BF16(p), CpuStorage::BF16(s)) => {
                copy_rows(&mut p[o1..], &s[o2..], rows, &d)
            }
            (CpuStorage::F16(p), CpuStorage::F16(s)) => copy_rows(&mut p[o1..], &s[o2..], rows, &d),
            _ => candle_core::bail!(
                "kv-write: pool and values must share a dtype of f32, f16 or bf16"
            ),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<()> {
        cuda::launch(s1, s2, s3, &dims(l1, l2, l3)?)
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::Dims;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
    use candle_core::{CudaDevice, CudaStorage, Result};

    /// One thread per element; 16- and 32-bit elements (the copy does not look at values).
    const SOURCE: &str = r#"
#define KV_WRITE(NAME, T) \
extern "C" __global__ void NAME(T* pool, const T* src, const unsigned int* rows, \
    unsigned int heads, unsigned int t, unsigned int pool_rows, unsigned int hd) { \
  unsigned int n = heads * t * hd; \
  for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) { \
    unsigned int d = i % hd; \
    unsigned int j = (i / hd) % t; \
    unsigned int h = i / (hd * t); \
    pool[((size_t)h * pool_rows + rows[j]) * hd + d] = src[i]; \
  } \
}
KV_WRITE(kv_write_u16, unsigned short)
KV_WRITE(kv_write_u32, unsigned int)
"#;

    pub(super) fn launch(
        pool: &mut CudaStorage,
        src: &CudaStorage,
        rows: &CudaStorage,
        d: &Dims,
    ) -> Result<()> {
        let dev = pool.device.clone();
        let rows = rows.as_cuda_slice::<u32>()?;
        match (&mut pool.slice, &src.slice) {
            (CudaStorageSlice::F32(p), CudaStorageSlice::F32(s)) => {
                run(&dev, "kv_write_u32", p, s, rows, d)
            }
            (CudaStorageSlice::BF16(p), CudaStorageSlice::BF16(s)) => {
                run(&dev, "kv_write_u16", p, s, rows, d)
            }
            (CudaStorageSlice::F16(p), CudaStorageSlice::F16(s)) => {
                run(&dev, "kv_write_u16", p, s, rows, d)
            }
            _ => candle_core::bail!(
                "kv-write: pool and values must share a dtype of f32, f16 or bf16"
            ),
        }
    }

    fn run<T: DeviceRepr>(
        dev: &CudaDevice,
        name: &str,
        pool: &mut CudaSlice<T>,
        src: &CudaSlice<T>,
        rows: &CudaSlice<u32>,
        d: &Dims,
    ) -> Result<()> {
        let [o1, o2, o3] = d.offsets;
        let n = (d.heads * d.t * d.hd) as u32;
        if n == 0 {
            return Ok(());
        }
        let func = dev.get_or_load_custom_func(
            name,
            "batchtune_kv_write",
            crate::model::nvrtc::compiled!(SOURCE, "kv-write")?,
        )?;
        let mut pool = pool.slice_mut(o1..);
        let src = src.slice(o2..);
        let rows = rows.slice(o3..);
        let (heads, t, pool_rows, hd) =
            (d.heads as u32, d.t as u32, d.pool_rows as u32, d.hd as u32);
        let mut b = func.builder();
        b.arg(&mut pool);
        b.arg(&src);
        b.arg(&rows);
        b.arg(&heads);
        b.arg(&t);
        b.arg(&pool_rows);
        b.arg(&hd);
        // SAFETY: the kernel reads `n` elements of `src` and `t` rows, and writes inside the
        // pool: every row was checked against `pool_rows` by the caller's reservations (the
        // CPU path checks it explicitly; a row past the pool here would be a bug in SeqCache).
        unsafe { b.launch(LaunchConfig::for_num_elems(n)) }.w()?;
        Ok(())
    }
}

/// Compares this op with candle's `scatter_set` on random values and rows on `device`, bit for
/// bit, in `dtype`: the GPU kernel is checked where it runs (`runtime bench` calls this before
/// timing a decoder on a GPU; CI has none).
pub fn self_check(device: &candle_core::Device, dtype: candle_core::DType) -> Result<()> {
    let (heads, pool_rows, t, hd) = (2, 97, 23, 64);
    let pool = Tensor::randn(0f32, 1.0, (heads, pool_rows, hd), device)?.to_dtype(dtype)?;
    let expect = pool.copy()?;
    let src = Tensor::randn(0f32, 1.0, (heads, t, hd), device)?.to_dtype(dtype)?;
    // Distinct rows in a scrambled order (a step's rows are distinct).
    let rows: Vec<u32> = (0..t as u32)
        .map(|j| (j * 37 + 11) % pool_rows as u32)
        .collect();
    let index = Tensor::from_vec(rows.clone(), (1, t, 1), device)?
        .broadcast_as((heads, t, hd))?
        .contiguous()?;
    expect.scatter_set(&index, &src, 1)?;
    write_rows(&pool, &src, &Tensor::from_vec(rows, t, device)?)?;
    let diff = (pool.to_dtype(candle_core::DType::F32)?
        - expect.to_dtype(candle_core::DType::F32)?)?
    .abs()?
    .sum_all()?
    .to_scalar::<f32>()?;
    if diff != 0.0 {
        candle_core::bail!("kv-write differs from scatter_set on {device:?} (sum |diff| = {diff})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn writes_the_rows_scatter_set_writes_in_every_dtype() {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            self_check(&Device::Cpu, dtype).unwrap();
        }
    }

    #[test]
    fn a_row_outside_the_pool_or_a_shape_mismatch_is_an_error() {
        let pool = Tensor::zeros((2, 8, 4), DType::F32, &Device::Cpu).unwrap();
        let src = Tensor::ones((2, 3, 4), DType::F32, &Device::Cpu).unwrap();
        let rows = Tensor::new(&[1u32, 8, 2], &Device::Cpu).unwrap();
        let err = write_rows(&pool, &src, &rows).unwrap_err().to_string();
        assert!(err.contains("row 8 is outside a pool of 8"), "{err}");
        let rows = Tensor::new(&[1u32, 2], &Device::Cpu).unwrap();
        assert!(write_rows(&pool, &src, &rows).is_err());
    }
}
