// common.cuh: what every kernel file shares. Philox4x32-10 and the stochastic-rounding draws, bf16
// rounding, torch's lerp, parameter load/store for f32 and bf16, and the warp-tile loop that hands
// each element its random bits.
//
// Every function here mirrors a function of the Rust core (rust/core/src/philox.rs, rounding.rs,
// rules/mod.rs) operation for operation, so that the GPU and the CPU produce the same bits:
//
// - Only correctly rounded IEEE operations are used: + - * / on f32 and f64 and sqrtf / sqrt.
//   NVRTC's defaults (-prec-div=true, -prec-sqrt=true, -ftz=false) make these exact, and the
//   kernels are compiled with --fmad=false so that no multiply and add are contracted into an
//   FMA: the CPU core never fuses (its SIMD paths must equal its scalar path), so a fused GPU
//   result would differ in the last bit.
// - Elementwise non-NaN results are therefore bit-identical to the CPU (for reductions see the
//   f64 sums at the end of this file). NaN results may differ in sign and
//   payload (the GPU returns its canonical NaN 0x7FFFFFFF from invalid operations, x86 returns
//   0xFFC00000 or the first NaN operand); both stay NaN through every rule and through bf16
//   rounding.
//
// No toolkit header is included (NVRTC may run without the CUDA headers): bf16 values are their
// raw `unsigned short` bits, as in the Rust core, and the fixed-width types are typedefs below.
//
// Comments in these files never spell out CUDA's kernel qualifier: the host's source scanner
// (rust/cuda/src/kernels.rs `kernel_names`) takes every occurrence of it for a kernel definition.

#pragma once

typedef unsigned int u32;
typedef unsigned long long u64;
typedef unsigned short u16;
typedef u16 bf16;  // raw bf16 bits: the upper half of an f32

static_assert(sizeof(u32) == 4 && sizeof(u64) == 8 && sizeof(u16) == 2, "fixed-width typedefs");

// Rounding modes of bf16 stores, as passed by the host (driver.rs `Rounding`).
#define ROUND_NEAREST 0u     // round to nearest, ties to even
#define ROUND_STOCHASTIC 1u  // stochastic rounding with the Philox draws of the element's index

#define FULL_WARP_MASK 0xFFFFFFFFu

// ------------------------------------------------------------------------------------------------
// Philox4x32-10 (Random123's philox4x32_R(10, ctr, key); cuRAND's curand_Philox4x32_10 computes the
// same function). Constants are philox.rs's PHILOX_M0/M1 (the round multipliers) and
// PHILOX_W0/W1 (the Weyl key increments: 2^32/phi and (sqrt(3) - 1) * 2^32).
// ------------------------------------------------------------------------------------------------

#define PHILOX_M0 0xD2511F53u
#define PHILOX_M1 0xCD9E8D57u
#define PHILOX_W0 0x9E3779B9u
#define PHILOX_W1 0xBB67AE85u

// Four 32-bit words: a Philox counter or output. Named fields rather than an array, so that a
// lane index chosen at run time never forces the words into local memory.
struct Philox4 {
    u32 x, y, z, w;
};

// One round: (hi0, lo0) = M0 * c.x, (hi1, lo1) = M1 * c.z (full 64-bit products),
// c' = [hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0]   (philox.rs `round`).
__device__ __forceinline__ Philox4 philox_round(Philox4 c, u32 k0, u32 k1) {
    const u32 hi0 = __umulhi(PHILOX_M0, c.x);
    const u32 lo0 = PHILOX_M0 * c.x;
    const u32 hi1 = __umulhi(PHILOX_M1, c.z);
    const u32 lo1 = PHILOX_M1 * c.z;
    Philox4 r;
    r.x = hi1 ^ c.y ^ k0;
    r.y = lo1;
    r.z = hi0 ^ c.w ^ k1;
    r.w = lo0;
    return r;
}

// Ten rounds, the key bumped by the Weyl increments (wrapping) before every round but the first.
// Known answer (Random123 kat_vectors): counter 0, key 0 -> 6627e8d5 e169c58d bc57ac4c 9b00dbd8.
__device__ __forceinline__ Philox4 philox4x32_10(Philox4 ctr, u32 k0, u32 k1) {
    Philox4 c = philox_round(ctr, k0, k1);
#pragma unroll
    for (int r = 1; r < 10; ++r) {
        k0 += PHILOX_W0;
        k1 += PHILOX_W1;
        c = philox_round(c, k0, k1);
    }
    return c;
}

// The output of Philox block `b` (element indices 8b .. 8b+8) at `step` in `stream` under `seed`:
// counter [b lo, b hi, step lo32, stream], key [seed lo, seed hi] (philox.rs `block_counter`,
// `seed_key`). The step is truncated to its low 32 bits, as on the CPU.
__device__ __forceinline__ Philox4 philox_block(u64 seed, u64 step, u32 stream, u64 b) {
    Philox4 ctr;
    ctr.x = (u32)b;
    ctr.y = (u32)(b >> 32);
    ctr.z = (u32)step;
    ctr.w = stream;
    return philox4x32_10(ctr, (u32)seed, (u32)(seed >> 32));
}

// Word `q` (0..3) of a Philox output.
__device__ __forceinline__ u32 philox_word(const Philox4& o, u32 q) {
    return q == 0 ? o.x : q == 1 ? o.y : q == 2 ? o.z : o.w;
}

// The 16-bit draw of element `index` (philox.rs `random_u16`, normative):
//   b = index / 8, l = index % 8, out = philox_block(seed, step, stream, b),
//   draw = (out[l / 2] >> (16 * (l % 2))) & 0xFFFF.
// block_draw(out, l) is the draw of position l of a block's output. random_u16 computes a whole
// block per draw; the kernels use `warp_for_range` below (or a lane per block, sgd.cu), which
// compute one block per 8 elements and give every element the same bits as this function.
__device__ __forceinline__ u32 block_draw(const Philox4& out, u32 l) {
    return (philox_word(out, l >> 1) >> (16 * (l & 1))) & 0xFFFFu;
}

__device__ __forceinline__ u32 random_u16(u64 seed, u64 step, u32 stream, u64 index) {
    return block_draw(philox_block(seed, step, stream, index >> 3), (u32)(index & 7));
}

// ------------------------------------------------------------------------------------------------
// bf16 (rounding.rs). bf16 is the upper half of an f32, so widening is a shift and rounding is
// integer arithmetic on the f32's bits.
// ------------------------------------------------------------------------------------------------

// bf16 bits -> the f32 of the same value (exact; NaN payloads kept).
__device__ __forceinline__ float bf16_to_f32(u16 b) {
    return __uint_as_float(((u32)b) << 16);
}

// Whether f32 bits are a NaN: exponent all ones, mantissa non-zero.
__device__ __forceinline__ bool is_nan_bits(u32 bits) {
    return (bits & 0x7FFFFFFFu) > 0x7F800000u;
}

// The quiet bf16 NaN of a NaN's bits: sign and high payload kept, quiet bit (0x0040, the top bit
// of bf16's mantissa) set. Without this a NaN whose payload lies in the low half could carry into
// the exponent and become Inf.
__device__ __forceinline__ u16 bf16_quiet_nan(u32 bits) {
    return (u16)((bits >> 16) | 0x0040u);
}

// Stochastic rounding with a draw r16 in [0, 2^16): (bits + r16) >> 16. The low half f of the bits
// carries into bit 16 exactly when r16 >= 2^16 - f, with probability f / 2^16, so the result is
// unbiased; values that already are bf16 (f == 0, +-0, +-Inf) never change; finite values above
// the largest bf16 may round to Inf. Cannot wrap: the largest non-NaN pattern is -Inf, 0xFF800000.
// r16 is masked to 16 bits so that a careless caller cannot carry twice.
__device__ __forceinline__ u16 round_bf16_stochastic(float x, u32 r16) {
    const u32 bits = __float_as_uint(x);
    if (is_nan_bits(bits)) {
        return bf16_quiet_nan(bits);
    }
    return (u16)((bits + (r16 & 0xFFFFu)) >> 16);
}

// Round to nearest, ties to even (IEEE's default, torch's .to(torch.bfloat16)):
// (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16. Below a tie nothing carries, above it carries, at a
// tie it carries only when the kept half is odd. Finite values past the midpoint between the
// largest bf16 and 2^128 become +-Inf.
__device__ __forceinline__ u16 round_bf16_nearest(float x) {
    const u32 bits = __float_as_uint(x);
    if (is_nan_bits(bits)) {
        return bf16_quiet_nan(bits);
    }
    const u32 odd = (bits >> 16) & 1u;
    return (u16)((bits + 0x7FFFu + odd) >> 16);
}

// ------------------------------------------------------------------------------------------------
// Arithmetic helpers shared by the rules.
// ------------------------------------------------------------------------------------------------

// torch's lerp on f32 (rules/mod.rs `lerp`): the formulation that is exact at its nearer end,
// a + w (b - a) for w < 0.5, else b - (b - a)(1 - w). (1 - w) is computed here, in f32, as there.
// Not named `lerp`: C++20's std::lerp (a different formula) lives in the global namespace of some
// standard libraries, and a future NVRTC built-in header could bring it in too.
__device__ __forceinline__ float torch_lerp(float a, float b, float w) {
    if (w < 0.5f) {
        return a + w * (b - a);
    }
    return b - (b - a) * (1.0f - w);
}

// Negation by flipping the sign bit, as the CPU's `neg` does (also for NaN, where `-x` on the GPU
// need not preserve the payload).
__device__ __forceinline__ float neg_bits(float x) {
    return __uint_as_float(__float_as_uint(x) ^ 0x80000000u);
}

__device__ __forceinline__ u64 min_u64(u64 a, u64 b) {
    return a < b ? a : b;
}

__device__ __forceinline__ u64 max_u64(u64 a, u64 b) {
    return a > b ? a : b;
}

// ------------------------------------------------------------------------------------------------
// Parameter and gradient access in their storage type (driver.rs `ParamIo`): f32, or bf16 raw bits
// widened exactly on load and rounded on store. Optimizer state is always f32.
// ------------------------------------------------------------------------------------------------

__device__ __forceinline__ float load_param(const float* p, u64 i) {
    return p[i];
}

__device__ __forceinline__ float load_param(const bf16* p, u64 i) {
    return bf16_to_f32(p[i]);
}

// Stores x at element i. For f32 the mode and draw are ignored; for bf16, `mode` is ROUND_NEAREST
// or ROUND_STOCHASTIC and `r16` must be random_u16(seed, step, stream, i) for the stochastic mode
// (the element's index in the flat buffer, as the CPU draws it).
__device__ __forceinline__ void store_param(float* p, u64 i, float x, u32 mode, u32 r16) {
    (void)mode;
    (void)r16;
    p[i] = x;
}

__device__ __forceinline__ void store_param(bf16* p, u64 i, float x, u32 mode, u32 r16) {
    p[i] = mode == ROUND_STOCHASTIC ? round_bf16_stochastic(x, r16) : round_bf16_nearest(x);
}

// As store_param, drawing the bits itself (one whole Philox block per element: for occasional
// stores only; loops use warp_for_range, which shares each block among its 8 elements).
__device__ __forceinline__ void store_param_indexed(float* p, u64 i, float x, u32 mode, u64 seed, u64 step,
                                                    u32 stream) {
    (void)mode;
    (void)seed;
    (void)step;
    (void)stream;
    p[i] = x;
}

__device__ __forceinline__ void store_param_indexed(bf16* p, u64 i, float x, u32 mode, u64 seed, u64 step,
                                                    u32 stream) {
    const u32 r16 = mode == ROUND_STOCHASTIC ? random_u16(seed, step, stream, i) : 0u;
    store_param(p, i, x, mode, r16);
}

// Whether stores to P need random draws under `mode`: only bf16 with stochastic rounding.
__device__ __forceinline__ bool needs_draws(const float*, u32) {
    return false;
}

__device__ __forceinline__ bool needs_draws(const bf16*, u32 mode) {
    return mode == ROUND_STOCHASTIC;
}

// ------------------------------------------------------------------------------------------------
// 16-byte accesses: eight bf16 (raw bits, element k in the (k % 2) half of word k / 2, as in
// memory) or four f32. The address must be 16-byte aligned.
// ------------------------------------------------------------------------------------------------

struct __align__(16) Words4 {
    u32 w[4];
};

struct __align__(16) Floats4 {
    float f[4];
};

// Bits of element k (0..7) of eight bf16 loaded as Words4.
__device__ __forceinline__ u16 bf16_of(const Words4& v, u32 k) {
    return (u16)(v.w[k >> 1] >> (16u * (k & 1u)));
}

// ------------------------------------------------------------------------------------------------
// Warp tiles: a warp walks a range of the flat buffer 256 elements (one tile) at a time. Tiles are
// aligned to multiples of 256 of the global element index, so tile T holds the 32 Philox blocks
// 32T .. 32T+32, and lane j computes block 32T + j: one Philox evaluation per 8 elements, instead
// of one per element. Element base + 32s + lane (sub-step s = 0..7) then reads its 16 bits from
// lane 4s + lane/8 with warp shuffles. Loads and stores stay coalesced: in each sub-step the 32
// lanes touch 32 consecutive elements.
//
// All 32 lanes of the warp must call these with the same arguments (the shuffles need the full
// warp): block sizes must be multiples of 32, and the loops that call them warp-uniform.
// ------------------------------------------------------------------------------------------------

#define TILE_ELEMS 256u  // elements per warp tile = 32 lanes x 8 draws per Philox block
#define TILE_SHIFT 8u

// The Philox output lane `lane` holds for the tile starting at element `tile_base` (a multiple
// of 256): block tile_base / 8 + lane.
__device__ __forceinline__ Philox4 tile_philox(u64 seed, u64 step, u32 stream, u64 tile_base, u32 lane) {
    return philox_block(seed, step, stream, (tile_base >> 3) + lane);
}

// The draw of element tile_base + 32 s + lane, from the tile's Philox outputs `o` spread over the
// warp. Its block is tile_base/8 + 4s + lane/8, held by lane 4s + lane/8; its position in the block
// is l = lane % 8 (32s is a multiple of 8), so it is the (l % 2) half of word l / 2. Every lane
// must execute this (it shuffles).
__device__ __forceinline__ u32 tile_draw(const Philox4& o, u32 s, u32 lane) {
    const int src = (int)(4u * s + (lane >> 3));
    const u32 w0 = __shfl_sync(FULL_WARP_MASK, o.x, src);
    const u32 w1 = __shfl_sync(FULL_WARP_MASK, o.y, src);
    const u32 w2 = __shfl_sync(FULL_WARP_MASK, o.z, src);
    const u32 w3 = __shfl_sync(FULL_WARP_MASK, o.w, src);
    const u32 l = lane & 7u;
    const u32 q = l >> 1;
    const u32 word = q == 0 ? w0 : q == 1 ? w1 : q == 2 ? w2 : w3;
    return (word >> (16u * (l & 1u))) & 0xFFFFu;
}

// Calls apply(i, load(i), r16) once for every element i in [a, b), spread over the 32 lanes of the
// calling warp, with r16 = random_u16(seed, step, stream, i) when `draw` (else 0, and no Philox is
// computed). `load` reads an element's inputs and returns them as a value; `apply` computes and
// stores. In a whole tile every lane first issues the loads of all eight of its elements, then
// computes the tile's Philox block, then applies: a load stalls nothing until its value is used, so
// the tile's bytes are in flight together and the Philox arithmetic overlaps their latency. (Loaded
// and applied one element at a time, a warp kept 32 elements' bytes in flight, too few to saturate
// memory: bf16 SGD with stochastic rounding reached 38% of copy bandwidth on an H100, 82% staged.)
// Each element's loads still precede its stores, and elements never share memory, so the results
// are those of one element at a time.
// Warp-cooperative: every lane calls it with the same arguments. Any a <= b works; sub-steps of a
// partial tile that hold no element of the range are skipped (warp-uniformly).
template <class Load, class Apply>
__device__ __forceinline__ void warp_for_range(u64 a, u64 b, bool draw, u64 seed, u64 step, u32 stream, Load load,
                                               Apply apply) {
    constexpr u32 SUB_STEPS = TILE_ELEMS / 32u;
    const u32 lane = threadIdx.x & 31u;
    for (u64 base = a & ~(u64)(TILE_ELEMS - 1); base < b; base += TILE_ELEMS) {
        const u64 lo = max_u64(a, base);
        const u64 hi = min_u64(b, base + TILE_ELEMS);
        Philox4 o = {0u, 0u, 0u, 0u};
        if (lo == base && hi == base + TILE_ELEMS) {
            decltype(load(base)) in[SUB_STEPS];
#pragma unroll
            for (u32 s = 0; s < SUB_STEPS; ++s) {
                in[s] = load(base + 32u * s + lane);
            }
            if (draw) {
                o = tile_philox(seed, step, stream, base, lane);
            }
#pragma unroll
            for (u32 s = 0; s < SUB_STEPS; ++s) {
                apply(base + 32u * s + lane, in[s], draw ? tile_draw(o, s, lane) : 0u);
            }
            continue;
        }
        if (draw) {
            o = tile_philox(seed, step, stream, base, lane);
        }
        const u32 s0 = (u32)((lo - base) >> 5);
        const u32 s1 = (u32)((hi - 1 - base) >> 5);
        for (u32 s = s0; s <= s1; ++s) {
            const u32 r16 = draw ? tile_draw(o, s, lane) : 0u;
            const u64 i = base + 32u * s + lane;
            if (i >= lo && i < hi) {
                apply(i, load(i), r16);
            }
        }
    }
}

// The calling thread's warp among all warps of the grid (1-D grids), and their number.
__device__ __forceinline__ u64 grid_warp_id() {
    return ((u64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
}

__device__ __forceinline__ u64 grid_warp_count() {
    return ((u64)gridDim.x * blockDim.x) >> 5;
}

// Calls apply(i, load(i), r16) for every i in [start, end) (see warp_for_range), the grid's warps
// striding over the 256-element tiles that meet the range (tile T goes to warp T mod warps). The
// elementwise rules' loop: any 1-D grid works; with tiles = (end - 1) / 256 - start / 256 + 1,
// ceil(tiles / 8) blocks of 256 threads give every warp one tile.
template <class Load, class Apply>
__device__ __forceinline__ void grid_for_range(u64 start, u64 end, bool draw, u64 seed, u64 step, u32 stream,
                                               Load load, Apply apply) {
    if (start >= end) {
        return;
    }
    const u64 first = start >> TILE_SHIFT;
    const u64 last = (end - 1) >> TILE_SHIFT;
    const u64 warps = grid_warp_count();
    for (u64 t = first + grid_warp_id(); t <= last; t += warps) {
        const u64 base = t << TILE_SHIFT;
        warp_for_range(max_u64(start, base), min_u64(end, base + TILE_ELEMS), draw, seed, step, stream, load,
                       apply);
    }
}

// ------------------------------------------------------------------------------------------------
// Tensor lists: the elementwise rules step a param group's tensors where their owner (torch) keeps
// them. A launch takes up to LIST_TENSORS tensors BY VALUE, in the kernel's parameter space (as
// torch's multi-tensor apply does): a step needs no host-to-device copy, no launch per tensor, and
// can be captured in a CUDA graph while the addresses stay the same. Tensor j of a list:
//   param[j], grad[j]  device addresses of its element 0, aligned to the element type; element k
//                      of the parameter and of the gradient are the same element of the tensor
//                      (torch's gradient layout contract)
//   start[j]           the index its element 0 draws the random bits of stochastic rounding at:
//                      element k draws index start[j] + k. The kernels walk these indices (warp
//                      tiles are aligned to them, so each lane's Philox block is whole); unless
//                      the tensor is a shard of a larger one (FSDP), it is its state index.
//   state[j]           the index of its element 0 in the optimizer's flat state buffers (the
//                      segment table's offset): element k is state[j] + k
//   numel[j]           its elements, >= 1
//   tile_end[j]        warp tiles of tensors 0..j together: tensor j covers the 256-element tiles
//                      that meet [start[j], start[j] + numel[j]), which are
//                      (start + numel - 1) / 256 - start / 256 + 1
// Tensors do not overlap. Layout (Rust: #[repr(C)]):
//   offset    0  u64 param[84]
//   offset  672  u64 grad[84]
//   offset 1344  u64 start[84]
//   offset 2016  u64 state[84]
//   offset 2688  u64 numel[84]
//   offset 3360  u32 tile_end[84]
//   offset 3696  u32 count          tensors in the list, 1..84
//   offset 3700  u32 pad
//   size 3704, alignment 8 (with the other arguments a kernel stays under 4 KiB of parameters)
// ------------------------------------------------------------------------------------------------

#define LIST_TENSORS 84u

struct TensorList {
    u64 param[LIST_TENSORS];
    u64 grad[LIST_TENSORS];
    u64 start[LIST_TENSORS];
    u64 state[LIST_TENSORS];
    u64 numel[LIST_TENSORS];
    u32 tile_end[LIST_TENSORS];
    u32 count;
    u32 pad;
};
static_assert(sizeof(TensorList) == 3704 && alignof(TensorList) == 8, "TensorList layout");

// The element of index i of a tensor whose element 0 is index `start` and lives at address `addr`.
template <typename P>
__device__ __forceinline__ P* element_at(u64 addr, u64 start, u64 i) {
    return reinterpret_cast<P*>(addr) + (i - start);
}

// The state index of draw index i of tensor j.
__device__ __forceinline__ u64 list_state(const TensorList& list, u32 j, u64 i) {
    return list.state[j] + (i - list.start[j]);
}

// ------------------------------------------------------------------------------------------------
// Where a list's tensors get their constants and step counts. A plain step: the host computed one
// constants struct K and one step count for the whole list (its tensors share a count), passed by
// value (`SharedScalars`). A counted step (torch's capturable=True, for CUDA graphs): each
// tensor's count lives on the device and the learning rate may too; the kernel computes each
// tensor's constants from them with the same f64 arithmetic as the core's `*Consts::new`
// (`CountedScalars`), and a later launch of `advance_step_counters` adds 1 to the counts. Nothing
// that changes from step to step is then a launch argument, so a captured graph replays correctly.
// ------------------------------------------------------------------------------------------------

template <class K>
struct SharedScalars {
    const K& k;
    u64 count;
    __device__ __forceinline__ const K& consts(u32) { return k; }
    __device__ __forceinline__ u64 step(u32) const { return count; }
};

// Where the step counts of a list's tensors are: tensor j's count (f64, before this step) is
// counters[base + delta[j]] (its index in the param group), so a list spans at most 65536 group
// indices. Layout (Rust: #[repr(C)]):
//   offset 0  u32 base
//   offset 4  u32 count         entries in delta (advance_step_counters), <= LIST_TENSORS
//   offset 8  u16 delta[84]
//   size 176, alignment 4
struct ListCounters {
    u32 base;
    u32 count;
    u16 delta[LIST_TENSORS];
};
static_assert(sizeof(ListCounters) == 176 && alignof(ListCounters) == 4, "ListCounters layout");

// Where a counted step's learning rate is: a 0-dim tensor on the device (addr != 0, f32 or f64,
// what an LR scheduler updates in place) or the host's value. Layout (Rust: #[repr(C)]):
//   offset 0  f64 value     used when addr == 0
//   offset 8  u64 addr
//   offset 16 u32 is_f64    0: float32 tensor, 1: float64 tensor
//   offset 20 u32 pad
//   size 24, alignment 8
struct LrSource {
    double value;
    u64 addr;
    u32 is_f64;
    u32 pad;
};
static_assert(sizeof(LrSource) == 24 && alignof(LrSource) == 8, "LrSource layout");

// The learning rate as the core receives it: the f32 tensor's value widened exactly to f64 (what
// float(tensor) gives the host).
__device__ __forceinline__ double read_lr(const LrSource& lr) {
    if (lr.addr == 0) {
        return lr.value;
    }
    return lr.is_f64 ? *reinterpret_cast<const double*>(lr.addr) : (double)*reinterpret_cast<const float*>(lr.addr);
}

// Make(step) -> K: the core's `*Consts::new` for this step count. Constants are recomputed when
// a warp moves to another tensor (lists are walked tensor by tensor, so rarely).
template <class K, class Make>
struct CountedScalars {
    const double* counters;
    const ListCounters& where;
    Make make;
    u32 cached;
    K k;
    __device__ __forceinline__ u64 step(u32 j) const {
        return (u64)counters[where.base + where.delta[j]] + 1u;
    }
    __device__ __forceinline__ const K& consts(u32 j) {
        if (j != cached) {
            k = make(step(j));
            cached = j;
        }
        return k;
    }
};

template <class K, class Make>
__device__ __forceinline__ CountedScalars<K, Make> counted_scalars(const double* counters, const ListCounters& where,
                                                                   Make make) {
    return CountedScalars<K, Make>{counters, where, make, 0xFFFFFFFFu, K{}};
}

// Calls apply(j, i, load(j, i), r16) for every draw index i of every tensor j of the list (see
// warp_for_range for load, apply and r16; element i - start[j] of tensor j, state index
// list_state(list, j, i)), the grid's warps striding over the list's warp tiles: tile t of the
// list is tile t - tile_end[j - 1] of tensor j. Tensor j draws at step scalars.step(j). Any 1-D
// grid works; ceil(tiles / 8) blocks of 256 threads give every warp one tile.
template <class Scalars, class Load, class Apply>
__device__ __forceinline__ void grid_for_list(const TensorList& list, bool draw, u64 seed, Scalars& scalars,
                                              u32 stream, Load load, Apply apply) {
    using In = decltype(load(0u, (u64)0));
    const u64 tiles = list.count > 0 ? list.tile_end[list.count - 1] : 0;
    const u64 warps = grid_warp_count();
    u32 j = 0;
    for (u64 t = grid_warp_id(); t < tiles; t += warps) {
        while (list.tile_end[j] <= t) {  // t only grows, so j only moves forward
            ++j;
        }
        const u64 first_tile = j > 0 ? list.tile_end[j - 1] : 0;
        const u64 start = list.start[j];
        const u64 end = start + list.numel[j];
        const u64 base = ((start >> TILE_SHIFT) + (t - first_tile)) << TILE_SHIFT;
        const u32 tensor = j;
        warp_for_range(
            max_u64(start, base), min_u64(end, base + TILE_ELEMS), draw, seed, scalars.step(j), stream,
            [&](u64 i) { return load(tensor, i); },
            [&](u64 i, const In& in, u32 r16) { apply(tensor, i, in, r16); });
    }
}

// ------------------------------------------------------------------------------------------------
// Deterministic f64 reductions. The CPU sums squares in f64 over a fixed partition (results that
// do not depend on the thread count); these do the same over a fixed GPU partition. The two
// partitions differ, so the f64 sums may differ in their last bits; every use rounds them to f32
// (after a division or a square root), where they agree except in rare near-ties.
// ------------------------------------------------------------------------------------------------

// Sum over the 32 lanes of a warp, in a fixed butterfly order; every lane receives the same
// result (IEEE addition is commutative, so lanes i and i^k compute the same sums).
__device__ __forceinline__ double warp_sum_f64(double v) {
#pragma unroll
    for (int k = 16; k > 0; k >>= 1) {
        v += __shfl_xor_sync(FULL_WARP_MASK, v, k);
    }
    return v;
}

// Sum over the threads of a block (blockDim.x a multiple of 32, at most 1024): warps first, then
// the warp sums by warp 0 in the same butterfly. `scratch` is 32 doubles of shared memory. The
// result is valid in every thread; the block must call it uniformly, and may reuse `scratch`
// only after another __syncthreads().
__device__ __forceinline__ double block_sum_f64(double v, double* scratch) {
    const u32 lane = threadIdx.x & 31u;
    const u32 warp = threadIdx.x >> 5;
    const u32 warps = blockDim.x >> 5;
    v = warp_sum_f64(v);
    if (lane == 0) {
        scratch[warp] = v;
    }
    __syncthreads();
    double t = lane < warps ? scratch[lane] : 0.0;
    t = warp_sum_f64(t);  // every warp computes it: no second barrier or broadcast needed
    return t;
}
