//! NVRTC compilation of the embedded kernels.
//!
//! NVRTC is loaded dynamically. Compilation asks for machine code (CUBIN) of the exact
//! architecture: PTX produced by an NVRTC newer than the installed driver is rejected by it,
//! while a CUBIN runs under CUDA's minor-version compatibility. `--fmad=false` keeps the GPU from
//! fusing multiplies and adds, which the CPU core never does, so both give the same results.

use crate::kernels::{all_kernels, with_header, SOURCES};
use cudarc::nvrtc::{result, sys};
use std::ffi::{CStr, CString};
use std::fmt;

/// What can go wrong on the CUDA side, with enough words to act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CudaError {
    /// The NVRTC library could not be loaded.
    NvrtcMissing,
    /// An architecture string that is not `sm_XX` / `compute_XX`.
    BadArch(String),
    /// NVRTC rejected a source; the log says why.
    Compile {
        /// The kernel file.
        file: String,
        /// NVRTC's log.
        log: String,
    },
    /// Any other NVRTC failure.
    Nvrtc(String),
    /// A failure of the driver, cuBLAS or the device (the message names the call).
    Device(String),
    /// Arguments a step cannot take (bad hyperparameters, mismatched tables, null pointers),
    /// including every error of the core's own checks.
    Invalid(String),
}

impl CudaError {
    /// An [`CudaError::Invalid`] with this message.
    pub fn invalid(msg: impl Into<String>) -> CudaError {
        CudaError::Invalid(msg.into())
    }
}

impl From<smallbatch_core::Error> for CudaError {
    fn from(e: smallbatch_core::Error) -> CudaError {
        CudaError::Invalid(e.to_string())
    }
}

impl fmt::Display for CudaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CudaError::NvrtcMissing => write!(
                f,
                "NVRTC (libnvrtc) could not be loaded: install torch with CUDA (it brings NVRTC) or the CUDA toolkit"
            ),
            CudaError::BadArch(a) => write!(f, "invalid CUDA architecture {a:?} (expected e.g. \"sm_90\")"),
            CudaError::Compile { file, log } => write!(f, "NVRTC failed to compile {file}:\n{log}"),
            CudaError::Nvrtc(msg) => write!(f, "NVRTC error: {msg}"),
            CudaError::Device(msg) | CudaError::Invalid(msg) => write!(f, "{msg}"),
        }
    }
}

impl std::error::Error for CudaError {}

/// What to ask NVRTC for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompileTarget {
    /// Machine code for exactly this architecture (what a launch uses).
    Cubin,
    /// PTX (portable, but rejected by drivers older than the NVRTC that made it).
    Ptx,
}

fn check_arch(arch: &str) -> Result<u32, CudaError> {
    let digits = arch.strip_prefix("sm_").or_else(|| arch.strip_prefix("compute_"));
    match digits.and_then(|d| d.trim_end_matches(['a', 'f']).parse::<u32>().ok()) {
        Some(n) if (50..=200).contains(&n) => Ok(n),
        _ => Err(CudaError::BadArch(arch.to_string())),
    }
}

/// Whether NVRTC can be loaded in this process.
pub fn nvrtc_available() -> bool {
    // SAFETY: only probes for the library; loading it runs no user code.
    std::panic::catch_unwind(|| unsafe { sys::is_culib_present() }).unwrap_or(false)
}

/// NVRTC's (major, minor) version.
pub fn nvrtc_version() -> Result<(i32, i32), CudaError> {
    if !nvrtc_available() {
        return Err(CudaError::NvrtcMissing);
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: two valid out-pointers.
    let status = unsafe { sys::nvrtcVersion(&mut major, &mut minor) };
    if status != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(CudaError::Nvrtc(format!("nvrtcVersion returned {status:?}")));
    }
    Ok((major, minor))
}

/// Environment variable with extra NVRTC options, separated by whitespace, appended to the fixed
/// ones (e.g. `--maxrregcount=40` to try another register budget without rebuilding). Read when a
/// module is compiled: once per process and architecture.
pub const EXTRA_OPTIONS_VAR: &str = "SMALLBATCH_NVRTC_OPTIONS";

/// The options in the value of [`EXTRA_OPTIONS_VAR`], if set.
pub fn extra_options(value: Option<&str>) -> Vec<String> {
    value.map(|v| v.split_whitespace().map(str::to_string).collect()).unwrap_or_default()
}

/// Compiles one source (header already inlined) for `arch`; returns the CUBIN or PTX bytes.
pub fn compile_source(file: &str, source: &str, arch: &str, target: CompileTarget) -> Result<Vec<u8>, CudaError> {
    check_arch(arch)?;
    if !nvrtc_available() {
        return Err(CudaError::NvrtcMissing);
    }
    let src = CString::new(source).map_err(|_| CudaError::Nvrtc(format!("{file} contains a NUL byte")))?;
    let name = CString::new(file).map_err(|_| CudaError::Nvrtc("bad file name".into()))?;
    let arch_flag = match target {
        // sm_XX gives machine code; compute_XX only PTX.
        CompileTarget::Cubin => format!("--gpu-architecture={}", arch.replacen("compute_", "sm_", 1)),
        CompileTarget::Ptx => format!("--gpu-architecture={}", arch.replacen("sm_", "compute_", 1)),
    };
    let mut options =
        vec![arch_flag, "--fmad=false".to_string(), "--std=c++17".to_string(), "-default-device".to_string()];
    options.extend(extra_options(std::env::var(EXTRA_OPTIONS_VAR).ok().as_deref()));
    let prog = result::create_program(&src, Some(&name)).map_err(|e| CudaError::Nvrtc(format!("{e:?}")))?;
    // SAFETY: `prog` is a live program until destroyed below; NVRTC copies the options.
    let outcome = unsafe {
        match result::compile_program(prog, &options) {
            Ok(()) => match target {
                CompileTarget::Cubin => cubin(prog),
                CompileTarget::Ptx => result::get_ptx(prog)
                    .map(|p| p.into_iter().map(|c| c as u8).collect())
                    .map_err(|e| CudaError::Nvrtc(format!("{e:?}"))),
            },
            Err(_) => {
                let log = result::get_program_log(prog).map(|l| {
                    let bytes: Vec<u8> = l.into_iter().map(|c| c as u8).take_while(|&b| b != 0).collect();
                    String::from_utf8_lossy(&bytes).into_owned()
                });
                Err(CudaError::Compile { file: file.to_string(), log: log.unwrap_or_default() })
            }
        }
    };
    // SAFETY: destroyed once, after its last use.
    let _ = unsafe { result::destroy_program(prog) };
    outcome
}

/// # Safety
/// `prog` must be a successfully compiled, live program.
unsafe fn cubin(prog: sys::nvrtcProgram) -> Result<Vec<u8>, CudaError> {
    let mut size = 0usize;
    if sys::nvrtcGetCUBINSize(prog, &mut size) != sys::nvrtcResult::NVRTC_SUCCESS || size == 0 {
        return Err(CudaError::Nvrtc("no CUBIN produced (was a compute_XX architecture given?)".into()));
    }
    let mut out = vec![0u8; size];
    if sys::nvrtcGetCUBIN(prog, out.as_mut_ptr() as *mut std::ffi::c_char) != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(CudaError::Nvrtc("nvrtcGetCUBIN failed".into()));
    }
    Ok(out)
}

/// Compiles every kernel file for `arch` (e.g. `"sm_90"`) and returns the kernels' names. Needs
/// NVRTC, not a GPU.
pub fn compile_all(arch: &str) -> Result<Vec<String>, CudaError> {
    check_arch(arch)?;
    for (file, source) in SOURCES {
        compile_source(file, &with_header(source), arch, CompileTarget::Cubin)?;
    }
    Ok(all_kernels().into_iter().map(|(_, k)| k).collect())
}

/// A C string's bytes as a Rust string (for NVRTC logs).
#[allow(dead_code)]
fn c_str(bytes: &[std::ffi::c_char]) -> String {
    // SAFETY: NVRTC logs are NUL-terminated.
    unsafe { CStr::from_ptr(bytes.as_ptr()) }.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_options_split_on_whitespace() {
        assert!(extra_options(None).is_empty());
        assert!(extra_options(Some("  ")).is_empty());
        assert_eq!(extra_options(Some(" --maxrregcount=40\t-lineinfo ")), ["--maxrregcount=40", "-lineinfo"]);
    }

    #[test]
    fn architectures_are_checked() {
        assert_eq!(check_arch("sm_90").unwrap(), 90);
        assert_eq!(check_arch("sm_90a").unwrap(), 90);
        assert_eq!(check_arch("compute_80").unwrap(), 80);
        for bad in ["90", "sm90", "sm_", "sm_x", "gfx90a"] {
            assert_eq!(check_arch(bad), Err(CudaError::BadArch(bad.into())));
        }
        assert_eq!(
            compile_all("sm90").unwrap_err().to_string(),
            "invalid CUDA architecture \"sm90\" (expected e.g. \"sm_90\")"
        );
    }

    /// Compiles every kernel when NVRTC is present (point `LD_LIBRARY_PATH` at torch's
    /// nvidia/cu13/lib to run it here; the Python suite runs the same check through the wheel).
    #[test]
    fn every_kernel_compiles_where_nvrtc_is_present() {
        if !nvrtc_available() {
            eprintln!("skipped: NVRTC not loadable in this process");
            return;
        }
        for arch in ["sm_80", "sm_90"] {
            let names = compile_all(arch).unwrap_or_else(|e| panic!("{e}"));
            assert!(!names.is_empty());
        }
    }
}
