//! The project's own CUDA kernels (`kv_write.rs`, `paged_attn.rs`) travel as CUDA C source and
//! are compiled by NVRTC on first use, so the CUDA build needs no extra nvcc step and the driver
//! JIT-compiles the PTX for whichever GPU is present.

use std::sync::OnceLock;

/// A kernel source's PTX, compiled once per process into `cell`; `what` names the op in the
/// error a failed compilation gives (NVRTC's log included).
pub(crate) fn ptx(
    cell: &'static OnceLock<Result<String, String>>,
    source: &str,
    what: &str,
) -> candle_core::Result<&'static str> {
    cell.get_or_init(|| {
        candle_core::cuda_backend::cudarc::nvrtc::compile_ptx(source)
            .map(|p| p.to_src())
            .map_err(|e| e.to_string())
    })
    .as_deref()
    .map_err(|e| candle_core::Error::Msg(format!("{what}: NVRTC: {e}")))
}

/// The device memory of a contiguous tensor other than a custom op's own operands (a table the
/// op struct holds), from its `storage_and_layout()`: a view from its first element, borrowed
/// for as long as the guard lives. `what` names it in errors (`"qkv-rope: the bias …"`).
///
/// A view, never a `CudaSlice` clone: cudarc's `Clone` allocates and copies the device memory
/// (an early qkv-rope copied its 8 MB angle table every layer of every step that way).
pub(crate) fn cuda_view<'g, T: candle_core::cuda_backend::CudaDType>(
    guard: &'g candle_core::Storage,
    layout: &candle_core::Layout,
    what: &str,
) -> candle_core::Result<candle_core::cuda_backend::cudarc::driver::CudaView<'g, T>> {
    let candle_core::Storage::Cuda(s) = guard else {
        candle_core::bail!("{what} is not on the GPU");
    };
    let Some((start, _)) = layout.contiguous_offsets() else {
        candle_core::bail!("{what} must be contiguous");
    };
    Ok(s.as_cuda_slice::<T>()?.slice(start..))
}

/// `compiled!(SOURCE, "what")`: [`ptx`] with a cell of its own at the call site, so each
/// kernel source is compiled once per process without every op declaring its cell.
macro_rules! compiled {
    ($source:expr, $what:expr) => {{
        static PTX: std::sync::OnceLock<std::result::Result<String, String>> =
            std::sync::OnceLock::new();
        $crate::model::nvrtc::ptx(&PTX, $source, $what)
    }};
}
pub(crate) use compiled;

/// `dtype_structs!()`: CUDA C structs `Bf16`, `F16` and `F32`, each with the element type `T`,
/// `ld` (to f32) and `st` (from f32, rounding to nearest even), for kernels templated on the
/// element type. bf16 and f16 convert by bit operations and PTX, so NVRTC needs no CUDA
/// headers. A macro rather than a const so that `concat!` can put it in front of a kernel's
/// source at compile time.
macro_rules! dtype_structs {
    () => {
        r#"
struct Bf16 {
  typedef unsigned short T;
  static __device__ __forceinline__ float ld(T x) { return __uint_as_float(((unsigned int)x) << 16); }
  static __device__ __forceinline__ T st(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (T)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (T)(u >> 16);
  }
};
struct F16 {
  typedef unsigned short T;
  static __device__ __forceinline__ float ld(T x) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x)); return f; }
  static __device__ __forceinline__ T st(float f) { T h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }
};
struct F32 {
  typedef float T;
  static __device__ __forceinline__ float ld(T x) { return x; }
  static __device__ __forceinline__ T st(float f) { return f; }
};
"#
    };
}
pub(crate) use dtype_structs;
