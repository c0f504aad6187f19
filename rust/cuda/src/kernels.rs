//! The kernel sources, embedded at build time from the repository's `cuda/` directory.

/// The header every kernel file includes: Philox4x32-10, bf16 rounding, torch's lerp.
pub const COMMON_HEADER: &str = include_str!("../../../cuda/common.cuh");

/// Each kernel file by name, with its source.
pub const SOURCES: &[(&str, &str)] = &[
    ("sgd.cu", include_str!("../../../cuda/sgd.cu")),
    ("adam.cu", include_str!("../../../cuda/adam.cu")),
    ("adafactor.cu", include_str!("../../../cuda/adafactor.cu")),
    ("muon.cu", include_str!("../../../cuda/muon.cu")),
    ("stochastic_round.cu", include_str!("../../../cuda/stochastic_round.cu")),
    ("step_counters.cu", include_str!("../../../cuda/step_counters.cu")),
];

/// The source of `file` with `#include "common.cuh"` replaced by the header itself, so NVRTC
/// needs no include path (and no file system).
pub fn with_header(source: &str) -> String {
    source.replace("#include \"common.cuh\"", COMMON_HEADER)
}

/// The `extern "C" __global__` kernels a source defines, in order of appearance.
pub fn kernel_names(source: &str) -> Vec<String> {
    let mut names = Vec::new();
    for piece in source.split("__global__").skip(1) {
        // The declaration up to its parameter list, without launch bounds.
        let decl = piece.split(['{', ';']).next().unwrap_or("");
        let decl = match decl.find("__launch_bounds__") {
            Some(at) => {
                let after = &decl[at..];
                let close = after.find(')').map(|c| at + c + 1).unwrap_or(decl.len());
                format!("{}{}", &decl[..at], &decl[close..])
            }
            None => decl.to_string(),
        };
        let Some(paren) = decl.find('(') else { continue };
        if let Some(name) = decl[..paren].split_whitespace().last() {
            if !name.is_empty() && name != "void" && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                names.push(name.to_string());
            }
        }
    }
    names
}

/// Every kernel of every file, as (file, kernel).
pub fn all_kernels() -> Vec<(&'static str, String)> {
    SOURCES.iter().flat_map(|(file, src)| kernel_names(src).into_iter().map(move |k| (*file, k))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_kernel_names() {
        let src = "extern \"C\" __global__ void sgd_f32(float* p) {}\n\
                   extern \"C\" __global__ void __launch_bounds__(256)\n  adam_bf16(unsigned short* p) {}\n\
                   __device__ float helper(float x) { return x; }";
        assert_eq!(kernel_names(src), ["sgd_f32", "adam_bf16"]);
    }

    #[test]
    fn every_file_defines_kernels_and_includes_the_header() {
        for (file, src) in SOURCES {
            assert!(!kernel_names(src).is_empty(), "{file} defines no kernel");
            assert!(src.contains("#include \"common.cuh\""), "{file} does not include common.cuh");
            assert!(!with_header(src).contains("#include \"common.cuh\""));
        }
    }
}
