//! The emulator as smallbatch-cuda's backend: installation, memory, copies, products, launch
//! errors, and `dispatch::round_to_bf16` (through the backend) against the core bit for bit.

mod common;

use common::Rng;
use smallbatch_core::rounding::{round_nearest_slice, stochastic_round_slice};
use smallbatch_core::Executor;
use smallbatch_cuda::backend::{backend, Backend};
use smallbatch_cuda::cublas::{Gemm, Inputs};
use smallbatch_cuda::dispatch::round_to_bf16;
use smallbatch_cuda::CudaError;
use smallbatch_cuda_emu::backend::{ALLOC_ALIGN, DEFAULT_SM_COUNT};
use smallbatch_cuda_emu::install;

#[test]
fn install_is_idempotent_and_replaces_the_driver() {
    let emu = install();
    assert!(std::ptr::eq(emu, install()));
    let installed = backend() as *const dyn Backend as *const u8;
    assert_eq!(installed, emu as *const _ as *const u8);
    // A second backend cannot replace it.
    assert!(!smallbatch_cuda::backend::install(Box::leak(Box::new(smallbatch_cuda_emu::Emulator::new()))));
    let default = std::env::var("SMALLBATCH_EMU_SMS").ok().and_then(|v| v.parse().ok()).unwrap_or(DEFAULT_SM_COUNT);
    assert_eq!(emu.sm_count(401).unwrap(), default);
    emu.set_sm_count(402, 5);
    assert_eq!(emu.sm_count(402).unwrap(), 5);
    assert!(!emu.is_capturing(401).unwrap());
    emu.set_capturing(401, true);
    assert!(emu.is_capturing(401).unwrap() && !emu.is_capturing(402).unwrap());
    emu.set_capturing(401, false);
    assert!(!emu.is_capturing(401).unwrap());
}

#[test]
fn allocations_are_aligned_nan_filled_tracked_and_freed() {
    const ORD: i32 = 403;
    let emu = install();
    let sizes = [0usize, 1, 3, 256, 1000, 4096 + 4];
    let ptrs: Vec<u64> = sizes.iter().map(|&n| emu.alloc(ORD, n).unwrap()).collect();
    for (&p, &n) in ptrs.iter().zip(&sizes) {
        assert_eq!(p % ALLOC_ALIGN as u64, 0);
        // SAFETY: a live allocation of at least max(n, 1) bytes.
        let bytes = unsafe { std::slice::from_raw_parts(p as *const u8, n) };
        assert!(bytes.iter().all(|&b| b == 0xFF));
        if n >= 8 {
            // SAFETY: as above; 256-byte aligned.
            unsafe {
                assert!((*(p as *const f32)).is_nan() && (*(p as *const f64)).is_nan());
            }
        }
    }
    assert_eq!(emu.live_allocations(ORD), (6, 1 + 1 + 3 + 256 + 1000 + 4100));
    let bad_before = emu.bad_frees();
    // SAFETY: each address was allocated above and is freed once; 8 was never allocated.
    unsafe {
        emu.free_when_idle(ORD, &ptrs[..3]);
        emu.free_when_idle(ORD, &[8]);
        emu.free_when_idle(499, &ptrs[3..4]); // the wrong device: refused, still live
    }
    assert_eq!(emu.bad_frees() - bad_before, 2);
    assert_eq!(emu.live_allocations(ORD).0, 3);
    // SAFETY: as above.
    unsafe { emu.free_when_idle(ORD, &ptrs[3..]) };
    assert_eq!(emu.live_allocations(ORD), (0, 0));
    let stats = emu.stats(ORD, 0);
    assert_eq!((stats.allocs, stats.frees), (6, 6));
}

#[test]
fn copies_stay_inside_their_allocations() {
    const ORD: i32 = 404;
    const STREAM: usize = 404;
    let emu = install();
    let a = emu.alloc(ORD, 64).unwrap();
    let b = emu.alloc(ORD, 64).unwrap();
    let data: Vec<u8> = (0..64).collect();
    // SAFETY: a and b hold 64 bytes each; the failing calls are refused before copying.
    unsafe {
        emu.upload(STREAM, a, &data).unwrap();
        emu.copy(STREAM, b + 8, a, 32).unwrap();
        assert_eq!(std::slice::from_raw_parts((b + 8) as *const u8, 32), &data[..32]);
        assert_eq!(*(b as *const u8), 0xFF);
        let err = emu.upload(STREAM, a + 1, &data).unwrap_err();
        assert!(err.to_string().contains("runs past the end of the allocation"), "{err}");
        assert!(emu.copy(STREAM, b, a + 16, 64).is_err());
        assert!(emu.copy(STREAM, a + 8, a, 16).unwrap_err().to_string().contains("overlapping"));
        emu.free_when_idle(ORD, &[a, b]);
    }
    let s = emu.stats(ORD, STREAM);
    assert_eq!((s.uploads, s.upload_bytes, s.copies), (1, 64, 1));
}

/// `C = alpha op(A) op(B) + beta C` by definition, in f64.
fn naive(g: &Gemm, a: &[f32], b: &[f32], c: &[f32]) -> Vec<f64> {
    let mut out: Vec<f64> = c.iter().map(|&x| x as f64).collect();
    for t in 0..g.batch {
        for i in 0..g.m {
            for j in 0..g.n {
                let mut acc = 0f64;
                for l in 0..g.k {
                    let x =
                        if g.transa { a[t * g.stride_a + l + i * g.lda] } else { a[t * g.stride_a + i + l * g.lda] };
                    let y =
                        if g.transb { b[t * g.stride_b + j + l * g.ldb] } else { b[t * g.stride_b + l + j * g.ldb] };
                    acc += x as f64 * y as f64;
                }
                let at = t * g.stride_c + i + j * g.ldc;
                out[at] = g.alpha as f64 * acc + if g.beta == 0.0 { 0.0 } else { g.beta as f64 * c[at] as f64 };
            }
        }
    }
    out
}

#[test]
fn products_follow_blas_conventions_for_f32_and_bf16_inputs() {
    const ORD: i32 = 405;
    const STREAM: usize = 405;
    let emu = install();
    let mut rng = Rng::new(405);
    for case in 0..24 {
        let (m, n, k) = (1 + rng.below(9) as usize, 1 + rng.below(9) as usize, 1 + rng.below(9) as usize);
        let (transa, transb) = (case & 1 == 1, case & 2 == 2);
        let (ar, ac) = if transa { (k, m) } else { (m, k) };
        let (br, bc) = if transb { (n, k) } else { (k, n) };
        let (lda, ldb, ldc) = (ar + rng.below(3) as usize, br + rng.below(3) as usize, m + rng.below(3) as usize);
        let batch = 1 + rng.below(3) as usize;
        let (sa, sb, sc) = (lda * ac + rng.below(5) as usize, ldb * bc, ldc * n + 3);
        let beta = if case % 3 == 0 { 0.0 } else { 0.5 };
        let g = Gemm {
            transa,
            transb,
            m,
            n,
            k,
            lda,
            ldb,
            ldc,
            stride_a: sa,
            stride_b: sb,
            stride_c: sc,
            batch,
            alpha: 1.5,
            beta,
        };
        let inputs = if case % 4 < 2 { Inputs::F32 } else { Inputs::Bf16 };
        // Operands that bf16 holds exactly, so both input types give the same product.
        let mut vals = |len: usize| -> Vec<f32> {
            (0..len).map(|_| f32::from_bits(rng.uniform(-2.0, 2.0).to_bits() & 0xFFFF_0000)).collect()
        };
        let (a, b) = (vals(sa * batch), vals(sb * batch));
        let c0 = vals(sc * batch);
        let put = |v: &[f32]| -> u64 {
            let bytes: Vec<u8> = match inputs {
                Inputs::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                Inputs::Bf16 => v.iter().flat_map(|x| ((x.to_bits() >> 16) as u16).to_le_bytes()).collect(),
            };
            let p = emu.alloc(ORD, bytes.len()).unwrap();
            // SAFETY: p holds bytes.len() bytes.
            unsafe { emu.upload(STREAM, p, &bytes).unwrap() };
            p
        };
        let (pa, pb) = (put(&a), put(&b));
        let pc = emu.alloc(ORD, c0.len() * 4).unwrap();
        let c0_bytes: Vec<u8> = c0.iter().flat_map(|x| x.to_le_bytes()).collect();
        // SAFETY: all operands were allocated for the strides and batch of g.
        unsafe {
            emu.upload(STREAM, pc, &c0_bytes).unwrap();
            backend().gemm(ORD, STREAM, &mut None, &g, inputs, pa, pb, pc).unwrap();
        }
        // SAFETY: pc holds c0.len() floats.
        let got = unsafe { std::slice::from_raw_parts(pc as *const f32, c0.len()) }.to_vec();
        let want = naive(&g, &a, &b, &c0);
        for (i, (&x, &y)) in got.iter().zip(&want).enumerate() {
            assert!((x as f64 - y).abs() <= 1e-6 * (1.0 + y.abs()), "case {case} {inputs:?} element {i}: {x} vs {y}");
        }
        // SAFETY: allocated above, freed once.
        unsafe { emu.free_when_idle(ORD, &[pa, pb, pc]) };
    }
    assert_eq!(emu.stats(ORD, STREAM).gemms, 24);
    assert_eq!(emu.live_allocations(ORD), (0, 0));
}

#[test]
fn launch_errors_are_device_errors() {
    install();
    let mut args: Vec<*mut std::ffi::c_void> = Vec::new();
    // SAFETY: the kernel does not exist; nothing runs.
    let err = unsafe { backend().launch(406, 406, "sgd.cu", "no_such_kernel", (1, 1, 1), 256, &mut args) }.unwrap_err();
    assert!(
        matches!(&err, CudaError::Device(m) if m.starts_with("emulator: ") && m.contains("no_such_kernel")),
        "{err}"
    );
}

/// `dispatch::round_to_bf16`, launched by smallbatch-cuda with its own grid on a 1-SM device
/// (grid-stride loops), equals the core's slice rounding bit for bit.
#[test]
fn round_to_bf16_equals_the_core() {
    const ORD: i32 = 407;
    const STREAM: usize = 407;
    let emu = install();
    emu.set_sm_count(ORD, 1);
    let exec = Executor::global().unwrap();
    let mut rng = Rng::new(407);
    for n in [0usize, 1, 7, 255, 257, 2049, 20_001, 70_001] {
        let src: Vec<f32> = (0..n)
            .map(|_| match rng.below(6) {
                0 => f32::from_bits(rng.next_u32()),
                1 => [f32::NAN, f32::INFINITY, -0.0, f32::from_bits(0x3F80_8000), f32::MIN_POSITIVE]
                    [rng.below(5) as usize],
                _ => rng.uniform(-100.0, 100.0),
            })
            .collect();
        for (seed, step, sid) in [(0u64, 1u64, 0u32), (0xDEAD_BEEF_0123_4567, (1 << 32) + 9, 7)] {
            let mut got = vec![0xABCDu16; n + 8];
            round_to_bf16(ORD, STREAM, src.as_ptr() as u64, got.as_mut_ptr() as u64, n as u64, Some((seed, step, sid)))
                .unwrap();
            let mut want = vec![0u16; n];
            stochastic_round_slice(exec, &src, &mut want, seed, step, sid).unwrap();
            assert_eq!(&got[..n], &want[..], "stochastic, n {n}");
            assert!(got[n..].iter().all(|&x| x == 0xABCD), "written past the end, n {n}");
        }
        let mut got = vec![0xABCDu16; n + 8];
        round_to_bf16(ORD, STREAM, src.as_ptr() as u64, got.as_mut_ptr() as u64, n as u64, None).unwrap();
        let mut want = vec![0u16; n];
        round_nearest_slice(exec, &src, &mut want).unwrap();
        assert_eq!(&got[..n], &want[..], "nearest, n {n}");
        assert!(got[n..].iter().all(|&x| x == 0xABCD), "written past the end, n {n}");
    }
    let s = emu.stats(ORD, STREAM);
    // n = 0 launches nothing.
    assert_eq!(s.launches_of("stochastic_round_f32_to_bf16"), 14);
    assert_eq!(s.launches_of("round_nearest_f32_to_bf16"), 7);
}
