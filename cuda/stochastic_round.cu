// stochastic_round.cu: f32 -> bf16 over whole buffers, as rust/core/src/rounding.rs
// `stochastic_round_slice` and `round_nearest_slice`: element i of src (i counted from 0, the
// start of src) becomes element i of dst. The stochastic variant draws element i's bits as
// random_u16(seed, step, stream, i), so its output equals the CPU's for the same arguments,
// whatever the grid. Use a different stream for each buffer rounded at the same step and seed.

#include "common.cuh"

// Launch (both): 1-D, blockDim.x = 256 (any multiple of 32), any gridDim.x >= 1 (grid-stride over
// 256-element warp tiles; ceil(n / 2048) blocks give every warp one tile). src and dst must not
// overlap.
extern "C" __global__ void stochastic_round_f32_to_bf16(const float* src, bf16* dst, u64 n, u64 seed, u64 step,
                                                        u32 stream) {
    grid_for_range(
        0, n, true, seed, step, stream, [&](u64 i) { return src[i]; },
        [&](u64 i, float x, u32 r16) { dst[i] = round_bf16_stochastic(x, r16); });
}

extern "C" __global__ void round_nearest_f32_to_bf16(const float* src, bf16* dst, u64 n) {
    grid_for_range(
        0, n, false, 0, 0, 0, [&](u64 i) { return src[i]; }, [&](u64 i, float x, u32) { dst[i] = round_bf16_nearest(x); });
}
