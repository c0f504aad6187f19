//! Device memory owned by the host side: Adafactor's segment table and scratch, Muon's
//! Newton-Schulz workspace and cuBLAS's workspace.
//!
//! Memory is allocated at a group's first step (or when a step needs more than any before it)
//! and kept: a step in a training loop allocates nothing, copies nothing from the host and waits
//! for nothing, so it can be captured in a CUDA graph once a step has run outside the capture.
//! A buffer that became too small is retired, not freed: kernels already queued may still read
//! it, and freeing it safely would need a host synchronisation inside the step. Everything is
//! freed when the owner is dropped, after the device has finished with it.

use crate::backend::backend;
use crate::compile::CudaError;

/// Alignment of the sub-buffers carved out of one allocation (cuBLAS and the kernels' f64 loads
/// need 8; 256 keeps every sub-buffer on its own memory transaction).
pub const SUB_ALIGN: usize = 256;

/// `bytes` rounded up to [`SUB_ALIGN`].
pub fn aligned(bytes: usize) -> usize {
    bytes.div_ceil(SUB_ALIGN) * SUB_ALIGN
}

/// Fails with a clear message when `stream` is being captured into a CUDA graph: allocations
/// and host-to-device copies cannot be captured, so `what` must happen in a step run before the
/// capture (torch's own warm-up advice).
pub(crate) fn check_not_capturing(stream: usize, what: &str) -> Result<(), CudaError> {
    if backend().is_capturing(stream)? {
        return Err(CudaError::Device(format!(
            "smallbatch_rs: {what} while the stream is captured into a CUDA graph; run one optimizer step \
             outside the capture first (with the same parameters receiving gradients), then capture"
        )));
    }
    Ok(())
}

/// One growable device allocation of a device.
#[derive(Debug)]
pub struct DeviceMemory {
    ordinal: i32,
    current: Option<(u64, usize)>,
    retired: Vec<u64>,
}

// SAFETY: device addresses are plain integers, valid from any thread of the process.
unsafe impl Send for DeviceMemory {}

impl DeviceMemory {
    /// No memory yet, on device `ordinal`.
    pub fn new(ordinal: i32) -> Self {
        DeviceMemory { ordinal, current: None, retired: Vec::new() }
    }

    /// Bytes currently held (0 before the first [`ensure`](Self::ensure)).
    pub fn capacity(&self) -> usize {
        self.current.map_or(0, |(_, b)| b)
    }

    /// The device address of at least `bytes` bytes (contents unspecified), allocating only when
    /// the current allocation is smaller. `stream` is the stream the step runs on: allocating
    /// while it is captured is refused with a clear error.
    pub fn ensure(&mut self, stream: usize, bytes: usize) -> Result<u64, CudaError> {
        if let Some((ptr, have)) = self.current {
            if have >= bytes {
                return Ok(ptr);
            }
        }
        check_not_capturing(stream, "allocating workspace memory")?;
        let ptr = backend().alloc(self.ordinal, bytes)?;
        if let Some((old, _)) = self.current.replace((ptr, bytes)) {
            self.retired.push(old);
        }
        Ok(ptr)
    }
}

impl Drop for DeviceMemory {
    fn drop(&mut self) {
        let all: Vec<u64> = self.current.take().map(|(p, _)| p).into_iter().chain(self.retired.drain(..)).collect();
        if !all.is_empty() {
            // SAFETY: allocated by `ensure` on this device, freed once; queued kernels may still
            // use the memory, which the backend waits for (or leaks it).
            unsafe { backend().free_when_idle(self.ordinal, &all) };
        }
    }
}

/// Copies `src` to device address `dst`, ordered on `stream` after the work already queued there
/// (which may still read the old contents). The driver stages pageable host memory before
/// returning, so `src` may be dropped afterwards. Refused while `stream` is captured.
///
/// # Safety
/// `dst` must hold at least `size_of_val(src)` bytes.
pub(crate) unsafe fn upload<T: Copy>(stream: usize, dst: u64, src: &[T], what: &str) -> Result<(), CudaError> {
    if src.is_empty() {
        return Ok(());
    }
    check_not_capturing(stream, what)?;
    let bytes = std::slice::from_raw_parts(src.as_ptr() as *const u8, std::mem::size_of_val(src));
    backend().upload(stream, dst, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sub_buffers_are_aligned() {
        assert_eq!(aligned(0), 0);
        assert_eq!(aligned(1), 256);
        assert_eq!(aligned(256), 256);
        assert_eq!(aligned(257), 512);
    }

    #[test]
    fn empty_memory_holds_nothing_and_drops_without_a_device() {
        let m = DeviceMemory::new(0);
        assert_eq!(m.capacity(), 0);
        drop(m);
    }
}
