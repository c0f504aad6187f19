//! The emulator's semantics, pinned down with the test kernels of shim/test_kernels.cu: barriers
//! and shared memory, warp shuffles, index variables and launch order, divergence reports, launch
//! validation and argument passing.

mod common;

use common::{launch_ok, Rng};
use smallbatch_cuda_emu::{kernel_names, launch, Args};

fn launch_err(kernel: &str, grid: (u32, u32, u32), block: (u32, u32, u32), mut args: Args) -> String {
    // SAFETY: the callers pass buffers large enough for every thread of the launch.
    match unsafe { args.launch(kernel, grid, block) } {
        Ok(()) => panic!("launching {kernel} over grid {grid:?}, block {block:?} succeeded, expected an error"),
        Err(e) => e,
    }
}

fn assert_mentions(message: &str, parts: &[&str]) {
    for part in parts {
        assert!(message.contains(part), "error {message:?} does not mention {part:?}");
    }
}

#[test]
fn block_sum_through_shared_memory_and_barriers() {
    let mut rng = Rng::new(1);
    for block in [32u32, 64, 256, 1024] {
        let grid = 3u32;
        let input: Vec<u32> = (0..grid * block).map(|_| rng.below(1 << 20)).collect();
        let mut out = vec![0u64; grid as usize];
        let args = Args::new().ptr(input.as_ptr()).ptr(out.as_mut_ptr());
        // SAFETY: grid * block inputs and grid outputs.
        unsafe { launch_ok("emu_test_block_sum", (grid, 1, 1), (block, 1, 1), args) };
        let expected: Vec<u64> = input.chunks(block as usize).map(|c| c.iter().map(|&v| v as u64).sum()).collect();
        assert_eq!(out, expected, "block {block}");
    }
}

/// emu_test_shuffles' per-thread record.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug, PartialEq)]
struct ShuffleResults {
    broadcast: u32,
    rotated: u32,
    rotated_back: i32,
    broadcast_float: f32,
    butterfly_sum: f64,
    rotated_u64: u64,
    up3: u32,
    down3: u32,
    ballot_odd: u32,
    segment_broadcast: u32,
    segment_xor8: u32,
    any_all: u32,
}

#[test]
fn shuffles_exchange_within_each_warp() {
    let mut rng = Rng::new(2);
    // Lanes are consecutive linear thread indices, also in 2-D and 3-D blocks.
    let shapes = [((2, 1, 1), (64, 1, 1)), ((1, 2, 1), (32, 2, 1)), ((1, 1, 1), (8, 4, 2)), ((1, 1, 1), (1024, 1, 1))];
    for (grid, block) in shapes {
        for src_lane in [0u32, 7, 31, 39] {
            let threads = (grid.0 * grid.1 * grid.2 * block.0 * block.1 * block.2) as usize;
            let input: Vec<u32> = (0..threads).map(|_| rng.below(2000)).collect();
            let mut results = vec![ShuffleResults::default(); threads];
            let args = Args::new().ptr(input.as_ptr()).ptr(results.as_mut_ptr()).push(src_lane);
            // SAFETY: one input and one result per thread.
            unsafe { launch_ok("emu_test_shuffles", grid, block, args) };
            for (t, r) in results.iter().enumerate() {
                let (lane, warp) = (t % 32, t - t % 32);
                let v = |l: usize| input[warp + l];
                let odd = (0..32).fold(0u32, |bits, l| bits | ((v(l) & 1) << l));
                let any = (0..32).any(|l| v(l) > 1000) as u32;
                let partner8 = lane ^ 8;
                let expected = ShuffleResults {
                    broadcast: v(src_lane as usize % 32),
                    rotated: v((lane + 1) % 32),
                    rotated_back: v((lane + 31) % 32) as i32,
                    broadcast_float: v(src_lane as usize % 32) as f32,
                    butterfly_sum: (0..32).map(|l| v(l) as f64).sum(),
                    rotated_u64: ((v((lane + 5) % 32) as u64) << 32) | 0xABCD,
                    up3: if lane >= 3 { v(lane - 3) } else { v(lane) },
                    down3: if lane + 3 < 32 { v(lane + 3) } else { v(lane) },
                    ballot_odd: odd,
                    segment_broadcast: v((lane & !7) + 2),
                    // Earlier segments are within reach, later ones are not.
                    segment_xor8: if partner8 < lane { v(partner8) } else { v(lane) },
                    any_all: any | 2,
                };
                assert_eq!(*r, expected, "thread {t}, grid {grid:?}, block {block:?}, src_lane {src_lane}");
            }
        }
    }
}

#[test]
fn index_variables_and_launch_order() {
    let shapes = [
        ((1, 1, 1), (1, 1, 1)),
        ((3, 2, 2), (4, 2, 3)),
        ((2, 3, 1), (32, 2, 1)),
        ((1, 1, 5), (5, 1, 1)),
        ((4, 1, 1), (1, 1, 64)),
    ];
    for (grid, block) in shapes {
        let per_block = block.0 * block.1 * block.2;
        let threads = (grid.0 * grid.1 * grid.2 * per_block) as usize;
        let mut out = vec![u32::MAX; threads * 16];
        let mut counter = 0u32;
        let args = Args::new().ptr(out.as_mut_ptr()).ptr(&mut counter as *mut u32);
        // SAFETY: 16 words per thread and one counter.
        unsafe { launch_ok("emu_test_indices", grid, block, args) };
        assert_eq!(counter as usize, threads);
        let mut g = 0;
        // Blocks x fastest, then y, then z; threads likewise inside a block; without barriers
        // every thread runs to its end in that order.
        for bz in 0..grid.2 {
            for by in 0..grid.1 {
                for bx in 0..grid.0 {
                    for tz in 0..block.2 {
                        for ty in 0..block.1 {
                            for tx in 0..block.0 {
                                let expected =
                                    [tx, ty, tz, bx, by, bz, block.0, block.1, block.2, grid.0, grid.1, grid.2, g];
                                assert_eq!(out[16 * g as usize..16 * g as usize + 13], expected, "{grid:?} {block:?}");
                                g += 1;
                            }
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn threads_exiting_before_a_barrier_fail_the_launch_naming_the_block() {
    let (grid, block) = ((3, 2, 1), (64, 1, 1));
    let mut out = [0u32; 6];
    // Linear block 4 is block (1,1,0).
    let e = launch_err("emu_test_exit_before_barrier", grid, block, Args::new().push(4u32).ptr(out.as_mut_ptr()));
    assert_mentions(
        &e,
        &["emu_test_exit_before_barrier", "block (1,1,0)", "__syncthreads()", "test_kernels.cu:", "32 of 64", "exited"],
    );
    // The blocks before it ran; the fibers left waiting are usable again at once.
    assert_eq!(out, [1, 1, 1, 1, 0, 0]);
    let mut out = [0u32; 6];
    // SAFETY: one word per block.
    unsafe { launch_ok("emu_test_exit_before_barrier", grid, block, Args::new().push(99u32).ptr(out.as_mut_ptr())) };
    assert_eq!(out, [1; 6]);
}

#[test]
fn threads_at_different_barriers_fail_the_launch() {
    let mut out = [0u32; 64];
    let e = launch_err("emu_test_split_barriers", (1, 1, 1), (64, 1, 1), Args::new().ptr(out.as_mut_ptr()));
    assert_mentions(&e, &["emu_test_split_barriers", "block (0,0,0)", "thread (1,0,0)", "thread (0,0,0)"]);
    assert_eq!(e.matches("test_kernels.cu:").count(), 2, "{e}");
}

#[test]
fn lanes_exiting_before_a_shuffle_fail_the_launch() {
    let mut out = [0u32; 64];
    let e = launch_err("emu_test_exit_before_shuffle", (1, 1, 1), (64, 1, 1), Args::new().ptr(out.as_mut_ptr()));
    assert_mentions(&e, &["emu_test_exit_before_shuffle", "16 lanes of warp 0", "__shfl_sync", "lane 16", "exited"]);
}

#[test]
fn a_warp_split_between_a_barrier_and_a_shuffle_fails_the_launch() {
    let mut out = [0u32; 64];
    let e = launch_err("emu_test_barrier_against_shuffle", (1, 1, 1), (64, 1, 1), Args::new().ptr(out.as_mut_ptr()));
    assert_mentions(&e, &["__shfl_sync", "waits at __syncthreads()", "warp 0"]);
}

#[test]
fn unsupported_shuffles_fail_the_launch() {
    let mut out = [0u32; 64];
    let e = launch_err("emu_test_partial_mask", (1, 1, 1), (32, 1, 1), Args::new().ptr(out.as_mut_ptr()));
    assert_mentions(&e, &["mask 0x0000ffff", "whole-warp"]);
    let e = launch_err("emu_test_shuffle_only", (1, 1, 1), (48, 1, 1), Args::new().ptr(out.as_mut_ptr()));
    assert_mentions(&e, &["whole warps", "48 threads"]);
    // SAFETY: one word per thread.
    unsafe { launch_ok("emu_test_shuffle_only", (1, 1, 1), (64, 1, 1), Args::new().ptr(out.as_mut_ptr())) };
    assert_eq!(out[..32], [0; 32]);
    assert_eq!(out[32..], [32; 32]);
}

#[test]
fn invalid_launches_are_rejected() {
    let mut out = [0u32; 4];
    let p = out.as_mut_ptr();
    for (grid, block) in [
        ((1, 1, 1), (0, 1, 1)),
        ((0, 1, 1), (32, 1, 1)),
        ((1, 1, 1), (1025, 1, 1)),
        ((1, 1, 1), (32, 32, 2)),
        ((1, 1, 1), (1, 1, 65)),
        ((1, 65536, 1), (32, 1, 1)),
    ] {
        let e = launch_err("emu_test_shuffle_only", grid, block, Args::new().ptr(p));
        assert_mentions(&e, &["emu_test_shuffle_only"]);
    }
    let e = launch_err("no_such_kernel", (1, 1, 1), (32, 1, 1), Args::new());
    assert_mentions(&e, &["no emulated kernel named `no_such_kernel`"]);
    let e = launch_err("emu_test_shuffle_only", (1, 1, 1), (32, 1, 1), Args::new().ptr(p).push(1u32));
    assert_mentions(&e, &["takes 1 arguments, got 2"]);
    let e = launch_err("emu_test_exit_before_barrier", (1, 1, 1), (32, 1, 1), Args::new().push(0u64).ptr(p));
    assert_mentions(&e, &["argument 0 is 8 bytes, but the parameter is 4 bytes"]);
    // The raw entry point checks the count; it cannot know the sizes.
    let mut pointers = Args::new().ptr(p).pointers();
    pointers.push(std::ptr::null_mut());
    // SAFETY: rejected before anything runs.
    let e = unsafe { launch("emu_test_shuffle_only", (1, 1, 1), (32, 1, 1), &mut pointers) }.unwrap_err();
    assert_mentions(&e, &["takes 1 arguments, got 2"]);
}

/// test_kernels.cu's PackedArgs.
#[repr(C)]
#[derive(Clone, Copy)]
struct PackedArgs {
    scale: f64,
    count: u32,
    offset: f32,
}

#[test]
fn structs_and_empty_argument_lists_pass_by_value() {
    let mut out = [0f32; 5];
    let packed = PackedArgs { scale: 0.1, count: 4, offset: -2.5 };
    let mut args = Args::new().ptr(out.as_mut_ptr()).push(packed);
    assert_eq!(args.len(), 2);
    let mut pointers = args.pointers();
    // SAFETY: five outputs, of which the kernel writes `count`; the raw path takes the same slots.
    unsafe { launch("emu_test_struct_arg", (2, 1, 1), (32, 1, 1), &mut pointers) }.unwrap();
    let expected: Vec<f32> = (0..4).map(|i| (i as f64 * 0.1) as f32 + -2.5).collect();
    assert_eq!(out[..4], expected[..]);
    assert_eq!(out[4], 0.0);
    // SAFETY: no arguments, no memory.
    unsafe { launch_ok("emu_test_no_params", (2, 2, 2), (3, 3, 3), Args::new()) };
    assert!(Args::new().is_empty());
}

#[test]
fn every_kernel_of_the_sources_is_registered() {
    let names = kernel_names();
    let cuda = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../cuda");
    let mut files: Vec<_> = std::fs::read_dir(&cuda).unwrap().map(|e| e.unwrap().path()).collect();
    files.retain(|p| p.extension().is_some_and(|x| x == "cu"));
    files.push(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("shim/test_kernels.cu"));
    let mut found = 0;
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for piece in text.split("__global__ void").skip(1) {
            let name: String =
                piece.trim_start().chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            assert!(names.contains(&name), "{name} of {} is not registered: {names:?}", file.display());
            found += 1;
        }
    }
    assert_eq!(found, names.len(), "{names:?}");
    for name in ["stochastic_round_f32_to_bf16", "round_nearest_f32_to_bf16", "muon_sumsq_partial", "emu_test_shuffles"]
    {
        assert!(names.iter().any(|n| n == name), "{name} missing from {names:?}");
    }
}

#[test]
fn os_threads_launch_concurrently() {
    std::thread::scope(|scope| {
        for seed in 0..4u64 {
            scope.spawn(move || {
                let mut rng = Rng::new(100 + seed);
                for _ in 0..20 {
                    let input: Vec<u32> = (0..4 * 256).map(|_| rng.below(1 << 16)).collect();
                    let mut out = [0u64; 4];
                    let args = Args::new().ptr(input.as_ptr()).ptr(out.as_mut_ptr());
                    // SAFETY: four blocks of 256 inputs, four outputs.
                    unsafe { launch_ok("emu_test_block_sum", (4, 1, 1), (256, 1, 1), args) };
                    let expected: Vec<u64> = input.chunks(256).map(|c| c.iter().map(|&v| v as u64).sum()).collect();
                    assert_eq!(out[..], expected[..]);
                }
            });
        }
    });
}

#[test]
fn bit_casts_and_integer_intrinsics() {
    let mut rng = Rng::new(3);
    let mut a: Vec<u64> = vec![0, 1, u64::MAX, 0x8000_0000_0000_0000, 0x7FC0_0001, 0xFF80_0000];
    let mut b: Vec<u64> = vec![0, u64::MAX, 1, 3, 0xFFFF_FFFF, 0x7F80_0001];
    for _ in 0..50 {
        a.push(rng.next_u64() >> rng.below(64));
        b.push(rng.next_u64());
    }
    let mut out = vec![u64::MAX; 16 * a.len()];
    let args = Args::new().ptr(a.as_ptr()).ptr(b.as_ptr()).push(a.len() as u64).ptr(out.as_mut_ptr());
    // SAFETY: n inputs of each, 16 n outputs.
    unsafe { launch_ok("emu_test_intrinsics", (1, 1, 1), (32, 1, 1), args) };
    for (i, (&a, &b)) in a.iter().zip(&b).enumerate() {
        let (a32, b32) = (a as u32, b as u32);
        let expected = [
            (a32 as u64 * b32 as u64) >> 32,
            ((a as u128 * b as u128) >> 64) as u64,
            a32 as u64,
            b32 as u64,
            (f32::from_bits(a32) + 1.0).to_bits() as u64,
            (f64::from_bits(a) * 2.0).to_bits(),
            a32.count_ones() as u64,
            a.count_ones() as u64,
            a32.leading_zeros() as u64,
            a.leading_zeros() as u64,
            if a32 == 0 { 0 } else { a32.trailing_zeros() as u64 + 1 },
            if a == 0 { 0 } else { a.trailing_zeros() as u64 + 1 },
            b,
            0,
            0,
            0,
        ];
        let got = &out[16 * i..16 * i + 16];
        // NaN arithmetic may pick another payload on either side; compare NaN-ness only.
        for (k, (&g, &e)) in got.iter().zip(&expected).enumerate() {
            let both_nan = match k {
                4 => f32::from_bits(g as u32).is_nan() && f32::from_bits(e as u32).is_nan(),
                5 => f64::from_bits(g).is_nan() && f64::from_bits(e).is_nan(),
                _ => false,
            };
            assert!(g == e || both_nan, "inputs {a:#x}, {b:#x}: result {k} is {g:#x}, expected {e:#x}");
        }
    }
}
