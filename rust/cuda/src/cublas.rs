//! cuBLAS for Muon's Newton-Schulz products, loaded dynamically like the driver and NVRTC.
//!
//! torch's CUDA wheels bring `libcublas` next to NVRTC (the Python layer preloads it). Every
//! product is one strided-batched `cublasGemmStridedBatchedEx` in column-major terms
//! ([`Gemm`]), with f32 accumulation (`CUBLAS_COMPUTE_32F`, never TF32) and f32 output; the
//! inputs are f32, or bf16 when the iteration runs in bf16. Each handle gets its own workspace
//! (`cublasSetWorkspace`), so cuBLAS allocates nothing during a step and the step can be captured
//! in a CUDA graph.

use crate::compile::CudaError;
use crate::dispatch::ensure_context;
use crate::memory::DeviceMemory;
use cudarc::cublas::sys;
use std::ffi::{c_int, c_longlong, c_void};

/// Bytes of the workspace given to each handle (what cuBLAS recommends for Hopper; enough for
/// every earlier architecture).
pub const WORKSPACE_BYTES: usize = 32 << 20;

/// The cuBLAS entry points used here: checked at load time, so a cuBLAS too old to have one
/// gives an error instead of a panic at the first call.
pub const SYMBOLS: &[&str] = &[
    "cublasCreate_v2",
    "cublasDestroy_v2",
    "cublasSetStream_v2",
    "cublasSetWorkspace_v2",
    "cublasSetMathMode",
    "cublasGemmStridedBatchedEx",
];

/// Whether cuBLAS can be loaded, and the first of [`SYMBOLS`] it lacks.
pub fn probe() -> Result<(), CudaError> {
    // SAFETY: only probes for the library and looks symbols up; nothing is called.
    let found = std::panic::catch_unwind(|| unsafe {
        if !sys::is_culib_present() {
            return Err(None);
        }
        let lib = sys::culib();
        for name in SYMBOLS {
            let cname = format!("{name}\0");
            if lib.get::<unsafe extern "C" fn()>(cname.as_bytes()).is_err() {
                return Err(Some(*name));
            }
        }
        Ok(())
    });
    match found {
        Ok(Ok(())) => Ok(()),
        Ok(Err(Some(name))) => Err(CudaError::Device(format!("cuBLAS was loaded but lacks {name} (too old)"))),
        Ok(Err(None)) | Err(_) => Err(CudaError::Device(
            "cuBLAS (libcublas) could not be loaded: Muon on CUDA needs it; install torch with CUDA (it brings \
             cuBLAS) or the CUDA toolkit"
                .into(),
        )),
    }
}

/// Element type of a product's inputs (the output and accumulation are always f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inputs {
    /// f32 inputs.
    F32,
    /// bf16 inputs (raw bits), f32 accumulation.
    Bf16,
}

/// `C = alpha op(A) op(B) + beta C` for `batch` column-major matrices at fixed strides (in
/// elements): `op(A)` is `m x k`, `op(B)` is `k x n`, `C` is `m x n`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gemm {
    /// `op(A) = A^T`.
    pub transa: bool,
    /// `op(B) = B^T`.
    pub transb: bool,
    /// Rows of `op(A)` and `C`.
    pub m: usize,
    /// Columns of `op(B)` and `C`.
    pub n: usize,
    /// Columns of `op(A)`, rows of `op(B)`.
    pub k: usize,
    /// Leading dimension of `A` as stored.
    pub lda: usize,
    /// Leading dimension of `B` as stored.
    pub ldb: usize,
    /// Leading dimension of `C`.
    pub ldc: usize,
    /// Elements between consecutive matrices of `A`.
    pub stride_a: usize,
    /// Elements between consecutive matrices of `B`.
    pub stride_b: usize,
    /// Elements between consecutive matrices of `C`.
    pub stride_c: usize,
    /// Number of matrices.
    pub batch: usize,
    /// Scale of the product.
    pub alpha: f32,
    /// Scale of `C`'s previous contents (0: `C` is not read).
    pub beta: f32,
}

impl Gemm {
    /// The same product with other scales.
    pub fn scaled(self, alpha: f32, beta: f32) -> Gemm {
        Gemm { alpha, beta, ..self }
    }

    /// Reference implementation on the host (what cuBLAS computes, up to rounding, with f32
    /// inputs), for tests of the operand conventions and for emulated devices.
    pub fn run_host(&self, a: &[f32], b: &[f32], c: &mut [f32]) {
        for t in 0..self.batch {
            let (a, b) = (&a[t * self.stride_a..], &b[t * self.stride_b..]);
            let c = &mut c[t * self.stride_c..];
            for j in 0..self.n {
                for i in 0..self.m {
                    let mut acc = 0.0f64;
                    for l in 0..self.k {
                        let x = if self.transa { a[l + i * self.lda] } else { a[i + l * self.lda] };
                        let y = if self.transb { b[j + l * self.ldb] } else { b[l + j * self.ldb] };
                        acc += x as f64 * y as f64;
                    }
                    let prev = if self.beta == 0.0 { 0.0 } else { self.beta * c[i + j * self.ldc] };
                    c[i + j * self.ldc] = self.alpha * acc as f32 + prev;
                }
            }
        }
    }
}

fn status(what: &str, s: sys::cublasStatus_t) -> Result<(), CudaError> {
    if s == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(CudaError::Device(format!("cuBLAS: {what} failed: {s:?}")))
    }
}

fn as_int(what: &str, x: usize) -> Result<c_int, CudaError> {
    c_int::try_from(x).map_err(|_| CudaError::Device(format!("cuBLAS: {what} = {x} exceeds its 32-bit limit")))
}

/// A cuBLAS handle of one device with its own workspace.
#[derive(Debug)]
pub struct Cublas {
    handle: sys::cublasHandle_t,
    workspace: DeviceMemory,
    bound_stream: Option<usize>,
}

// SAFETY: the handle is used by one thread at a time (its owner is behind a lock).
unsafe impl Send for Cublas {}

impl Cublas {
    /// Creates a handle on device `ordinal` (its context made current) with default math: no
    /// TF32, so f32 products are f32.
    pub fn new(ordinal: i32, stream: usize) -> Result<Cublas, CudaError> {
        probe()?;
        ensure_context(ordinal)?;
        crate::memory::check_not_capturing(stream, "creating the cuBLAS handle")?;
        let mut handle: sys::cublasHandle_t = std::ptr::null_mut();
        // SAFETY: a valid out-pointer; the library and its symbols were checked by probe().
        status("cublasCreate", unsafe { sys::cublasCreate_v2(&mut handle) })?;
        let mut out = Cublas { handle, workspace: DeviceMemory::new(ordinal), bound_stream: None };
        // SAFETY: a live handle.
        status("cublasSetMathMode", unsafe { sys::cublasSetMathMode(handle, sys::cublasMath_t::CUBLAS_DEFAULT_MATH) })?;
        let ws = out.workspace.ensure(stream, WORKSPACE_BYTES)?;
        // SAFETY: the workspace is a live allocation of WORKSPACE_BYTES owned by `out`.
        status("cublasSetWorkspace", unsafe {
            sys::cublasSetWorkspace_v2(handle, ws as *mut c_void, WORKSPACE_BYTES)
        })?;
        Ok(out)
    }

    /// Runs `g` on `stream` with operands at device addresses `a`, `b` (of type `inputs`) and `c`
    /// (f32).
    ///
    /// # Safety
    /// The addresses must be live device memory of this handle's device holding every element the
    /// product reads and writes.
    pub unsafe fn gemm(
        &mut self,
        stream: usize,
        g: &Gemm,
        inputs: Inputs,
        a: u64,
        b: u64,
        c: u64,
    ) -> Result<(), CudaError> {
        if g.m == 0 || g.n == 0 || g.batch == 0 {
            return Ok(());
        }
        if self.bound_stream != Some(stream) {
            // The workspace must be set again after a stream change: cuBLAS resets it then.
            status("cublasSetStream", sys::cublasSetStream_v2(self.handle, stream as sys::cudaStream_t))?;
            let ws = self.workspace.ensure(stream, WORKSPACE_BYTES)?;
            status("cublasSetWorkspace", sys::cublasSetWorkspace_v2(self.handle, ws as *mut c_void, WORKSPACE_BYTES))?;
            self.bound_stream = Some(stream);
        }
        let op = |t: bool| if t { sys::cublasOperation_t::CUBLAS_OP_T } else { sys::cublasOperation_t::CUBLAS_OP_N };
        let in_type = match inputs {
            Inputs::F32 => sys::cudaDataType::CUDA_R_32F,
            Inputs::Bf16 => sys::cudaDataType::CUDA_R_16BF,
        };
        let stride = |what: &str, s: usize| {
            c_longlong::try_from(s).map_err(|_| CudaError::Device(format!("cuBLAS: {what} = {s} overflows")))
        };
        status(
            "cublasGemmStridedBatchedEx",
            sys::cublasGemmStridedBatchedEx(
                self.handle,
                op(g.transa),
                op(g.transb),
                as_int("m", g.m)?,
                as_int("n", g.n)?,
                as_int("k", g.k)?,
                &g.alpha as *const f32 as *const c_void,
                a as *const c_void,
                in_type,
                as_int("lda", g.lda)?,
                stride("stride_a", g.stride_a)?,
                b as *const c_void,
                in_type,
                as_int("ldb", g.ldb)?,
                stride("stride_b", g.stride_b)?,
                &g.beta as *const f32 as *const c_void,
                c as *mut c_void,
                sys::cudaDataType::CUDA_R_32F,
                as_int("ldc", g.ldc)?,
                stride("stride_c", g.stride_c)?,
                as_int("batch", g.batch)?,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            ),
        )
    }
}

impl Drop for Cublas {
    fn drop(&mut self) {
        // cublasDestroy waits for the handle's work; the workspace is freed after it.
        // SAFETY: created by new(), destroyed once.
        let _ = unsafe { sys::cublasDestroy_v2(self.handle) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where cuBLAS is loadable (point `LD_LIBRARY_PATH` at torch's nvidia/cu13/lib), every entry
    /// point used is there: the calls cannot panic on a missing symbol.
    #[test]
    fn every_symbol_is_present_where_cublas_loads() {
        // SAFETY: only probes for the library.
        if !std::panic::catch_unwind(|| unsafe { sys::is_culib_present() }).unwrap_or(false) {
            eprintln!("skipped: cuBLAS not loadable in this process");
            return;
        }
        probe().unwrap_or_else(|e| panic!("{e}"));
    }

    #[test]
    fn host_reference_follows_blas_conventions() {
        // A = [[1, 2], [3, 4]] column-major: [1, 3, 2, 4]. A^T A = [[10, 14], [14, 20]].
        let a = [1.0f32, 3.0, 2.0, 4.0];
        let g = Gemm {
            transa: true,
            transb: false,
            m: 2,
            n: 2,
            k: 2,
            lda: 2,
            ldb: 2,
            ldc: 2,
            stride_a: 4,
            stride_b: 4,
            stride_c: 4,
            batch: 1,
            alpha: 1.0,
            beta: 0.0,
        };
        let mut c = [0.0f32; 4];
        g.run_host(&a, &a, &mut c);
        assert_eq!(c, [10.0, 14.0, 14.0, 20.0]);
        // A A^T = [[5, 11], [11, 25]]; with beta = 1 on top of the previous result.
        let g2 = Gemm { transa: false, transb: true, ..g }.scaled(1.0, 1.0);
        g2.run_host(&a, &a, &mut c);
        assert_eq!(c, [15.0, 25.0, 25.0, 45.0]);
    }
}
