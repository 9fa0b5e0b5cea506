//! Bringing a step's drawn token ids to the host without waiting for the work queued after them.
//!
//! Why: an engine that overlaps steps issues step N+1's kernels (its decodes reading step N's
//! ids where the draw left them) before it reads step N's ids for the clients. candle's
//! `to_vec1` copies on the device's stream into pageable memory, which waits for everything
//! queued on the stream, step N+1's whole forward included, and so undoes the overlap. Here
//! the copy goes into page-locked memory, is queued right behind the draw (before step N+1's
//! first kernel), and the host later waits on that copy's own event only. On the CPU, where
//! every op has finished when it returns, the ids are read at once.

use candle_core::{Result, Tensor};

/// One reusable host buffer for a replica's drawn ids, and the copy in flight into it.
#[derive(Default)]
pub struct Readback {
    /// Page-locked buffer, grown to the largest step seen (allocating page-locked memory takes
    /// the driver far longer than a copy, so it is kept).
    #[cfg(feature = "cuda")]
    pinned: Option<candle_core::cuda_backend::cudarc::driver::PinnedHostSlice<u32>>,
    pending: Option<Pending>,
}

enum Pending {
    /// Already on the host (a CPU tensor).
    Ready(Vec<u32>),
    /// Queued into the page-locked buffer: this many ids, complete once the event has.
    #[cfg(feature = "cuda")]
    Copying(usize, candle_core::cuda_backend::cudarc::driver::CudaEvent),
}

impl Readback {
    /// An empty reader with no buffer yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether a copy was started and not taken yet.
    pub fn is_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// Starts bringing `ids` (`[n]` u32) to the host; [`take`](Self::take) returns them. A
    /// copy started before and not taken is an error: its ids would be overwritten.
    pub fn start(&mut self, ids: &Tensor) -> Result<()> {
        if self.pending.is_some() {
            candle_core::bail!("readback: the previous step's ids were not taken");
        }
        #[cfg(feature = "cuda")]
        if let candle_core::Device::Cuda(dev) = ids.device() {
            let n = ids.dim(0)?;
            let done = self.copy_cuda(dev, ids, n)?;
            self.pending = Some(Pending::Copying(n, done));
            return Ok(());
        }
        self.pending = Some(Pending::Ready(ids.to_vec1::<u32>()?));
        Ok(())
    }

    /// The ids of the last [`start`](Self::start), waiting for their copy only; an error if
    /// none was started.
    pub fn take(&mut self) -> Result<Vec<u32>> {
        match self.pending.take() {
            None => candle_core::bail!("readback: no copy was started"),
            Some(Pending::Ready(ids)) => Ok(ids),
            #[cfg(feature = "cuda")]
            Some(Pending::Copying(n, done)) => {
                use candle_core::cuda_backend::WrapErr;
                done.synchronize().w()?;
                match &self.pinned {
                    Some(buf) if n > 0 => {
                        // Safety: the copy of these n ids has completed (the event above), and
                        // nothing else writes the buffer until the next `start`.
                        Ok(unsafe { std::slice::from_raw_parts(buf.as_ptr().w()?, n) }.to_vec())
                    }
                    _ => Ok(Vec::new()),
                }
            }
        }
    }

    /// Queues the copy of `ids`' first `n` values into the page-locked buffer and returns the
    /// event recorded right after it.
    ///
    /// The copy is issued by hand: cudarc's `memcpy_dtoh` copies the whole destination's
    /// length, and the buffer is kept larger than any one step's ids (a step's row count
    /// changes every step, and a page-locked allocation per step would cost more than the
    /// copy).
    #[cfg(feature = "cuda")]
    fn copy_cuda(
        &mut self,
        dev: &candle_core::CudaDevice,
        ids: &Tensor,
        n: usize,
    ) -> Result<candle_core::cuda_backend::cudarc::driver::CudaEvent> {
        use candle_core::cuda_backend::cudarc::driver::{result, DevicePtr};
        use candle_core::cuda_backend::WrapErr;
        let stream = dev.cuda_stream();
        if n > 0 {
            if self.pinned.as_ref().is_none_or(|b| b.len() < n) {
                // Safety: the buffer is read only after a copy into it has completed.
                let buf = unsafe {
                    stream
                        .context()
                        .alloc_pinned::<u32>(n.next_power_of_two().max(1024))
                };
                self.pinned = Some(buf.w()?);
            }
            let buf = self.pinned.as_mut().expect("allocated above");
            let dst = buf.as_mut_ptr().w()?;
            let (guard, layout) = ids.storage_and_layout();
            let view = super::nvrtc::cuda_view::<u32>(&guard, layout, "readback: the drawn ids")?;
            let view = view.slice(..n);
            let (src, read) = view.device_ptr(&stream);
            // Safety: `dst` is page-locked and holds at least n u32s; `src` is n u32s of device
            // memory kept alive by `guard`; the host reads `dst` only after the event below.
            unsafe {
                result::memcpy_dtoh_async(
                    std::slice::from_raw_parts_mut(dst, n),
                    src,
                    stream.cu_stream(),
                )
            }
            .w()?;
            drop(read);
        }
        stream.record_event(None).w()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn ids_come_back_in_order_once() {
        let mut r = Readback::new();
        assert!(r.take().is_err(), "nothing started");
        let ids = Tensor::new(&[7u32, 3, 9], &Device::Cpu).unwrap();
        r.start(&ids).unwrap();
        assert!(r.is_pending());
        let again = r.start(&ids).unwrap_err().to_string();
        assert!(again.contains("not taken"), "{again}");
        assert_eq!(r.take().unwrap(), vec![7, 3, 9]);
        assert!(!r.is_pending());
        assert!(r.take().is_err(), "taken once");
    }
}
