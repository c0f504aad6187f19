//! cuda/stochastic_round.cu against the Rust core (rounding.rs, philox.rs): bit for bit, for
//! lengths around the 256-element warp tiles and 2048-element blocks, over grids of several shapes.

mod common;

use common::{launch_ok, Rng};
use smallbatch_core::philox::random_u16;
use smallbatch_core::rounding::{
    round_bf16_nearest, round_bf16_stochastic, round_nearest_slice, stochastic_round_slice,
};
use smallbatch_core::Executor;
use smallbatch_cuda_emu::Args;

const LENGTHS: [usize; 9] = [0, 1, 7, 255, 256, 257, 2049, 10000, 1 << 20];

/// Written past the end of the output: the kernels must leave it alone.
const SENTINEL: u16 = 0xDEAD;

/// Random f32 bit patterns (NaNs with every payload, infinities, subnormals included), finite
/// values of ordinary magnitude, and values that are edge cases of the rounding.
fn inputs(n: usize, rng: &mut Rng) -> Vec<f32> {
    const SPECIAL: [u32; 14] = [
        0x7FC0_0000, // quiet NaN
        0x7F80_0001, // signalling NaN, payload in the discarded half
        0xFFFF_FFFF, // negative NaN, all payload bits
        0x7FBF_FFFF, // largest signalling NaN payload
        0x7F80_0000, // +inf
        0xFF80_0000, // -inf
        0x0000_0000, // +0
        0x8000_0000, // -0
        0x0000_0001, // smallest subnormal
        0x7F7F_FFFF, // largest finite: rounds to inf to nearest
        0x3F80_8000, // tie between two bf16 values, even below
        0x3F81_8000, // tie, odd below
        0x3F80_7FFF, // just below a tie
        0xC2F6_E979, // -123.456
    ];
    (0..n)
        .map(|_| match rng.below(8) {
            0 => f32::from_bits(SPECIAL[rng.below(SPECIAL.len() as u32) as usize]),
            1..=3 => f32::from_bits(rng.next_u32()),
            _ => rng.uniform(-10.0, 10.0),
        })
        .collect()
}

/// Grid shapes the kernels' launch comment allows (1-D, blockDim.x a multiple of 32, any grid):
/// one block, a few, exactly one tile per warp, more blocks than tiles, and other block sizes.
fn shapes(n: usize) -> Vec<(u32, u32)> {
    let one_tile_per_warp = n.div_ceil(2048).max(1) as u32;
    let mut shapes =
        vec![(1, 256), (3, 256), (one_tile_per_warp, 256), (one_tile_per_warp + 5, 256), (2, 32), (1, 1024)];
    if n >= 1 << 20 {
        shapes = vec![(one_tile_per_warp, 256), (40, 512)];
    }
    shapes
}

fn rounded_by_kernel(kernel: &str, src: &[f32], grid: u32, block: u32, draw: Option<(u64, u64, u32)>) -> Vec<u16> {
    let mut dst = vec![SENTINEL; src.len() + 16];
    let mut args = Args::new().ptr(src.as_ptr()).ptr(dst.as_mut_ptr()).push(src.len() as u64);
    if let Some((seed, step, stream)) = draw {
        args = args.push(seed).push(step).push(stream);
    }
    // SAFETY: src has n elements, dst n + 16, the kernel touches the first n of each.
    unsafe { launch_ok(kernel, (grid, 1, 1), (block, 1, 1), args) };
    assert!(dst[src.len()..].iter().all(|&b| b == SENTINEL), "{kernel} wrote past element {}", src.len());
    dst.truncate(src.len());
    dst
}

#[test]
fn stochastic_rounding_equals_the_core() {
    let exec = Executor::global().unwrap();
    let mut rng = Rng::new(7);
    // The step is truncated to 32 bits on both sides; streams and seeds use all their bits.
    let draws = [(0u64, 0u64, 0u32), (0x0123_4567_89AB_CDEF, 5, 3), (u64::MAX, (1 << 33) + 7, u32::MAX)];
    for n in LENGTHS {
        let src = inputs(n, &mut rng);
        for (d, &(seed, step, stream)) in draws.iter().enumerate() {
            if n >= 1 << 20 && d > 0 {
                continue; // one large case is enough to time the scheduler
            }
            let mut expected = vec![0u16; n];
            stochastic_round_slice(exec, &src, &mut expected, seed, step, stream).unwrap();
            // The slice function itself equals the per-element definition (spot-checked).
            for i in (0..n).step_by(97) {
                assert_eq!(expected[i], round_bf16_stochastic(src[i], random_u16(seed, step, stream, i as u64)));
            }
            for (grid, block) in shapes(n) {
                let got =
                    rounded_by_kernel("stochastic_round_f32_to_bf16", &src, grid, block, Some((seed, step, stream)));
                if let Some(i) = (0..n).find(|&i| got[i] != expected[i]) {
                    panic!(
                        "n {n}, grid {grid} x {block}, draw {d}: element {i} ({:#010x}) -> {:#06x}, core {:#06x}",
                        src[i].to_bits(),
                        got[i],
                        expected[i]
                    );
                }
            }
        }
    }
}

#[test]
fn nearest_rounding_equals_the_core() {
    let exec = Executor::global().unwrap();
    let mut rng = Rng::new(8);
    for n in LENGTHS {
        let src = inputs(n, &mut rng);
        let mut expected = vec![0u16; n];
        round_nearest_slice(exec, &src, &mut expected).unwrap();
        for i in (0..n).step_by(97) {
            assert_eq!(expected[i], round_bf16_nearest(src[i]));
        }
        for (grid, block) in shapes(n) {
            let got = rounded_by_kernel("round_nearest_f32_to_bf16", &src, grid, block, None);
            if let Some(i) = (0..n).find(|&i| got[i] != expected[i]) {
                panic!(
                    "n {n}, grid {grid} x {block}: element {i} ({:#010x}) -> {:#06x}, core {:#06x}",
                    src[i].to_bits(),
                    got[i],
                    expected[i]
                );
            }
        }
    }
}
