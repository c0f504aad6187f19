//! Counter-based random bits: Philox4x32-10, and the 16-bit draws stochastic rounding consumes.
//!
//! This file owns the generator ([`philox4x32_10`], Random123's Philox with 4 words of counter,
//! 2 words of key and 10 rounds — the function cuRAND's `curand_Philox4x32_10` also computes) and
//! the one definition of which bits element `index` of a stream receives. A counter-based
//! generator has no state: a draw depends only on (seed, step, stream, index), so every SIMD path,
//! every thread count, every chunking and the CUDA kernels produce the same bits.
//!
//! # The draw for element `index` (normative; the CUDA kernels reproduce it bit for bit)
//!
//! ```text
//! b       = index / 8                      Philox block (u64; index < 2^64 so b < 2^61)
//! l       = index % 8                      lane: which 16-bit half of the block's output
//! counter = [b as u32, (b >> 32) as u32, step as u32, stream]    step: its low 32 bits only
//! key     = [seed as u32, (seed >> 32) as u32]
//! out     = philox4x32_10(counter, key)    four u32 words
//! draw    = (out[l / 2] >> (16 * (l % 2))) & 0xFFFF
//! ```
//!
//! So block `b` yields the eight draws of elements `8b .. 8b + 8`, in the order low half of
//! `out[0]`, high half of `out[0]`, low half of `out[1]`, ... — on a little-endian machine, simply
//! the 16 bytes of `out` read as eight `u16`. The step is truncated to 32 bits: two steps that
//! differ by a multiple of 2^32 reuse bits, which no training run reaches. Different `stream`
//! values give independent sequences for buffers rounded at the same step (e.g. parameters and an
//! optimizer state).
//!
//! # Speed
//!
//! Philox costs 20 multiplies (32x32->64 bits), 20 shifts and 40 xors per block of 16 output
//! bytes, so generating one block at a time is compute-bound far below memory bandwidth.
//! [`random_u16`] is the reference and does exactly that, one whole block per draw.
//! [`fill_random_u16`] computes [`BATCH_BLOCKS`] consecutive blocks side by side as a structure
//! of arrays, so the multiplies become vector multiplies (`pmuludq`: 2 lanes on SSE2, 4 on AVX2,
//! 8 on AVX-512), about 6x faster than one block at a time when compiled for AVX-512, which keeps
//! up with the memory traffic of the rounding that consumes the bits.

/// Philox4x32 multiplier applied to counter word 0.
pub const PHILOX_M0: u32 = 0xD251_1F53;
/// Philox4x32 multiplier applied to counter word 2.
pub const PHILOX_M1: u32 = 0xCD9E_8D57;
/// Weyl increment of key word 0 between rounds (the golden ratio, 2^32 / phi).
pub const PHILOX_W0: u32 = 0x9E37_79B9;
/// Weyl increment of key word 1 between rounds (sqrt(3) - 1, times 2^32).
pub const PHILOX_W1: u32 = 0xBB67_AE85;
/// Rounds of Philox4x32-10.
pub const PHILOX_ROUNDS: usize = 10;
/// 16-bit draws per Philox block (four 32-bit output words, two halves each).
pub const DRAWS_PER_BLOCK: u64 = 8;

/// Philox blocks [`fill_random_u16`] computes side by side: 16 `u64` lanes per counter word, i.e.
/// two AVX-512 or four AVX2 registers. Measured on AVX-512 and AVX2, 16 beats 8 (too few
/// independent multiplies to hide their latency) and 32 (AVX2 spills its 16 registers; AVX-512
/// gains little).
pub const BATCH_BLOCKS: usize = 16;

/// Blocks are numbered modulo 2^61 (= 2^64 / 8), so that element indices wrap modulo 2^64.
const BLOCK_MASK: u64 = u64::MAX >> 3;

/// The low 32 bits.
const LO32: u64 = 0xFFFF_FFFF;

/// One Philox round on a single block (see [`philox4x32_10`] for the formula).
#[inline(always)]
fn round(c: [u32; 4], k: [u32; 2]) -> [u32; 4] {
    let p0 = u64::from(PHILOX_M0) * u64::from(c[0]);
    let p1 = u64::from(PHILOX_M1) * u64::from(c[2]);
    [(p1 >> 32) as u32 ^ c[1] ^ k[0], p1 as u32, (p0 >> 32) as u32 ^ c[3] ^ k[1], p0 as u32]
}

/// Philox4x32-10 (Random123's `philox4x32_R(10, ctr, key)`): ten rounds
///
/// ```text
/// (hi0, lo0) = M0 * c[0]        full 64-bit products, split into 32-bit halves
/// (hi1, lo1) = M1 * c[2]
/// c' = [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0]
/// ```
///
/// with the key bumped by the Weyl increments `(W0, W1)` (wrapping) before every round but the
/// first.
///
/// ```
/// use smallbatch_core::philox::philox4x32_10;
/// // Random123's first known-answer vector.
/// assert_eq!(philox4x32_10([0; 4], [0; 2]), [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]);
/// ```
#[inline]
pub fn philox4x32_10(ctr: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut c = round(ctr, key);
    let mut k = key;
    for _ in 1..PHILOX_ROUNDS {
        k = [k[0].wrapping_add(PHILOX_W0), k[1].wrapping_add(PHILOX_W1)];
        c = round(c, k);
    }
    c
}

/// The Philox key for `seed`: its low and high 32-bit words.
#[inline(always)]
fn seed_key(seed: u64) -> [u32; 2] {
    [seed as u32, (seed >> 32) as u32]
}

/// The Philox counter of block `b` at `step` in `stream` (see the [module docs](self)).
#[inline(always)]
fn block_counter(b: u64, step: u64, stream: u32) -> [u32; 4] {
    [b as u32, (b >> 32) as u32, step as u32, stream]
}

/// The eight draws of one block, in element order.
#[inline(always)]
fn block_draws(out: [u32; 4]) -> [u16; 8] {
    let mut d = [0u16; 8];
    for (pair, word) in d.chunks_exact_mut(2).zip(out) {
        pair[0] = word as u16;
        pair[1] = (word >> 16) as u16;
    }
    d
}

/// The 16-bit random draw of element `index` of `stream` at `step` under `seed`, exactly as the
/// [module docs](self) define it. This is the reference; [`fill_random_u16`] produces the same
/// values many at a time.
///
/// ```
/// use smallbatch_core::philox::{philox4x32_10, random_u16};
/// // Element 3 is the high half of word 1 of block 0.
/// let out = philox4x32_10([0, 0, 7, 2], [42, 0]);
/// assert_eq!(random_u16(42, 7, 2, 3), (out[1] >> 16) as u16);
/// ```
pub fn random_u16(seed: u64, step: u64, stream: u32, index: u64) -> u16 {
    let b = index / DRAWS_PER_BLOCK;
    let l = (index % DRAWS_PER_BLOCK) as usize;
    let out = philox4x32_10(block_counter(b, step, stream), seed_key(seed));
    ((out[l / 2] >> (16 * (l % 2))) & 0xFFFF) as u16
}

/// Fills `out[k]` with `random_u16(seed, step, stream, start_index + k)` for every `k` (indices
/// wrap modulo 2^64), for any start and any length.
///
/// Whole batches of [`BATCH_BLOCKS`] blocks are computed side by side with the counter words
/// held in `u64` lanes (each holding a 32-bit value), so each round is a handful of lane-wise
/// multiplies, shifts and xors that LLVM turns into vector instructions; a partial block at
/// either end goes through the reference or a scratch batch.
///
/// `#[inline(always)]` because the vector width is decided where the code is compiled: inlined
/// into a function built with `#[target_feature(enable = "avx512f")]` (as
/// [`crate::rounding::stochastic_round_slice`] does per SIMD path) the lanes become AVX-512
/// registers; called from ordinary code it still vectorizes with SSE2's 2-lane `pmuludq`. A plain
/// `#[inline]` would leave the choice to LLVM's cost model, which declines a body this size (ten
/// unrolled rounds) and calls one out-of-line baseline copy from the AVX-512 code, losing the
/// wide lanes. The price is one copy of the generator per call site, and there are only a few.
#[inline(always)]
pub fn fill_random_u16(seed: u64, step: u64, stream: u32, start_index: u64, out: &mut [u16]) {
    const B: usize = BATCH_BLOCKS;
    let key = seed_key(seed);
    let keys = round_keys(key);
    let mut index = start_index;
    let mut rest = out;

    // Leading partial block: the start is not a multiple of 8.
    let lead = (index % DRAWS_PER_BLOCK) as usize;
    if lead != 0 && !rest.is_empty() {
        let b = index / DRAWS_PER_BLOCK;
        let draws = block_draws(philox4x32_10(block_counter(b, step, stream), key));
        let n = (draws.len() - lead).min(rest.len());
        let (head, tail) = rest.split_at_mut(n);
        head.copy_from_slice(&draws[lead..lead + n]);
        rest = tail;
        index = index.wrapping_add(n as u64);
    }

    // Whole batches of `B` blocks, written straight into `out`.
    let mut block = index / DRAWS_PER_BLOCK;
    let (blocks, partial) = rest.as_chunks_mut::<8>();
    let (batches, leftover) = blocks.as_chunks_mut::<B>();
    for batch in batches {
        philox_batch(block, step, stream, &keys, batch);
        block = block.wrapping_add(B as u64) & BLOCK_MASK;
    }

    // The last whole blocks (fewer than `B`) and a partial last block, via a scratch batch.
    if !leftover.is_empty() || !partial.is_empty() {
        let mut scratch = [[0u16; 8]; B];
        philox_batch(block, step, stream, &keys, &mut scratch);
        let n = leftover.len();
        leftover.copy_from_slice(&scratch[..n]);
        partial.copy_from_slice(&scratch[n][..partial.len()]);
    }
}

/// The round keys of Philox4x32-10 for `key`: round `r` uses `key + r * (W0, W1)` (wrapping),
/// widened to the `u64` lanes [`philox_batch`] computes in. Computed once per call, so the batch
/// loop only broadcasts them.
#[inline(always)]
fn round_keys(key: [u32; 2]) -> [[u64; 2]; PHILOX_ROUNDS] {
    let mut keys = [[0u64; 2]; PHILOX_ROUNDS];
    let mut k = key;
    for rk in keys.iter_mut() {
        *rk = [u64::from(k[0]), u64::from(k[1])];
        k = [k[0].wrapping_add(PHILOX_W0), k[1].wrapping_add(PHILOX_W1)];
    }
    keys
}

/// Draws of the `B` blocks `first_block, first_block + 1, ...` (mod 2^61), written
/// in element order to `dst`.
///
/// The state is four arrays (one per counter word) of `B` lanes, each lane a `u64`
/// whose low 32 bits hold the word. A round then needs no shuffles: `M * x` is one `pmuludq`
/// (it reads only the low 32 bits of `x`), `hi` a shift, and the xors work on whole lanes.
/// The high 32 bits of the `lo` words are left as garbage rather than masked off: every later use
/// of a word is either a multiply (which ignores them), an xor (which keeps them in the high half)
/// or the final narrowing to 32 bits, so they can never reach an output bit. That saves a quarter
/// of the instructions per round.
#[inline(always)]
fn philox_batch<const B: usize>(
    first_block: u64,
    step: u64,
    stream: u32,
    keys: &[[u64; 2]; PHILOX_ROUNDS],
    dst: &mut [[u16; 8]; B],
) {
    let mut c0 = [0u64; B];
    let mut c1 = [0u64; B];
    let mut c2 = [step & LO32; B];
    let mut c3 = [u64::from(stream); B];
    for j in 0..B {
        let b = first_block.wrapping_add(j as u64) & BLOCK_MASK;
        c0[j] = b & LO32;
        c1[j] = b >> 32;
    }
    for &[k0, k1] in keys {
        for j in 0..B {
            // The masks tell LLVM both factors fit in 32 bits, so it emits one pmuludq rather
            // than a 64x64 multiply; they cost nothing, as pmuludq reads only the low halves.
            let p0 = (c0[j] & LO32) * u64::from(PHILOX_M0);
            let p1 = (c2[j] & LO32) * u64::from(PHILOX_M1);
            c0[j] = (p1 >> 32) ^ c1[j] ^ k0;
            c2[j] = (p0 >> 32) ^ c3[j] ^ k1;
            c1[j] = p1; // lo1, with hi1 as harmless garbage above it
            c3[j] = p0; // lo0, likewise
        }
    }
    for (j, draws) in dst.iter_mut().enumerate() {
        let words = [c0[j], c1[j], c2[j], c3[j]];
        for (q, w) in words.into_iter().enumerate() {
            draws[2 * q] = w as u16;
            draws[2 * q + 1] = (w >> 16) as u16;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Random123's known-answer vectors for Philox4x32-10 (kat_vectors).
    #[test]
    fn known_answers() {
        assert_eq!(philox4x32_10([0; 4], [0; 2]), [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]);
        assert_eq!(philox4x32_10([u32::MAX; 4], [u32::MAX; 2]), [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]);
        assert_eq!(
            philox4x32_10([0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344], [0xa4093822, 0x299f31d0]),
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
        );
    }

    /// The draw definition, spelled out against the raw generator.
    #[test]
    fn draw_layout() {
        let (seed, step, stream) = (0x0123_4567_89ab_cdef_u64, 0x1_0000_0005_u64, 9u32);
        let b = 0x3_0000_0002_u64;
        let out = philox4x32_10([2, 3, 5, 9], [0x89ab_cdef, 0x0123_4567]);
        for l in 0..8u64 {
            let want = (out[(l / 2) as usize] >> (16 * (l % 2))) as u16;
            assert_eq!(random_u16(seed, step, stream, 8 * b + l), want, "lane {l}");
        }
    }

    #[test]
    fn batch_matches_reference() {
        let mut got = [[0u16; 8]; BATCH_BLOCKS];
        philox_batch(5, 11, 3, &round_keys(seed_key(77)), &mut got);
        for (k, &g) in got.as_flattened().iter().enumerate() {
            assert_eq!(g, random_u16(77, 11, 3, 40 + k as u64), "draw {k}");
        }
    }

    #[test]
    fn indices_wrap_modulo_2_pow_64() {
        let mut got = [0u16; 40];
        let start = u64::MAX - 20;
        fill_random_u16(1, 2, 3, start, &mut got);
        for (k, &g) in got.iter().enumerate() {
            assert_eq!(g, random_u16(1, 2, 3, start.wrapping_add(k as u64)), "draw {k}");
        }
    }
}
