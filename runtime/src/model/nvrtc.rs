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
