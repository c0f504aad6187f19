// muon.cu: the elementwise parts of Muon (rust/core/src/rules/muon.rs `step_matrix`) and of its
// Newton-Schulz orthogonalisation (rust/core/src/newton_schulz.rs) around the matrix products,
// which the host runs with cuBLAS sgemm:
//
//   muon_momentum_*      B = lerp(B, sign G, 1 - momentum); U = lerp(sign G, B, momentum) or B
//   muon_sumsq_partial   \  ||U||_F^2 per matrix, in f64, deterministic (two passes, fixed
//   muon_sumsq_final     /  partition; no atomics)
//   muon_normalize       X = U / max(||U||_F, eps)      (as torch: clamp(min=eps), NaN stays NaN)
//   muon_add_diagonal    poly[i, i] += a                (B + a I, so a X + B X is one product)
//   muon_apply_*         W = W * decay + neg_lr * O, rounded to bf16 for bf16 parameters
//
// Matrices of one launch are `count` contiguous row-major matrices of `n` elements each (a tensor's
// batch, as in the segment table); the host launches once per tensor (or per matrix). Parameters
// and gradients are read where their owner keeps them: the host passes the address of the
// launch's first element, whose index in the group's index space is `start`.

#include "common.cuh"

// ------------------------------------------------------------------------------------------------
// Momentum: per index i in [start, end) of the group's index space (part of one tensor):
//   gk = sign * grad[i - start]            sign = -1 when maximizing, else 1; grad points at the
//                                          gradient of index start
//   B[i] = torch_lerp(B[i], gk, lerp_weight)     lerp_weight = (1 - momentum) as f32 (computed in f64)
//   update[i - start] = nesterov ? torch_lerp(gk, B[i], momentum) : B[i]      momentum = momentum as f32
// `update` is the f32 matrix the Newton-Schulz iteration starts from, indexed from the range's
// start (a scratch buffer of end - start floats).
//
// Launch: 1-D, blockDim.x = 256, any gridDim.x >= 1 (thread-per-element grid-stride; no random
// bits here); ceil((end - start) / 256) blocks cover the range once.
// ------------------------------------------------------------------------------------------------

template <typename P>
__device__ __forceinline__ void muon_momentum_run(const P* grad, float* momentum_buffer, float* update, u64 start,
                                                  u64 end, float sign, float lerp_weight, float momentum,
                                                  u32 nesterov) {
    const u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 i = start + (u64)blockIdx.x * blockDim.x + threadIdx.x; i < end; i += stride) {
        const float gk = sign * load_param(grad, i - start);
        const float b = torch_lerp(momentum_buffer[i], gk, lerp_weight);
        momentum_buffer[i] = b;
        update[i - start] = nesterov ? torch_lerp(gk, b, momentum) : b;
    }
}

extern "C" __global__ void muon_momentum_f32(const float* grad, float* momentum_buffer, float* update, u64 start,
                                             u64 end, float sign, float lerp_weight, float momentum, u32 nesterov) {
    muon_momentum_run(grad, momentum_buffer, update, start, end, sign, lerp_weight, momentum, nesterov);
}

extern "C" __global__ void muon_momentum_bf16(const bf16* grad, float* momentum_buffer, float* update, u64 start,
                                              u64 end, float sign, float lerp_weight, float momentum, u32 nesterov) {
    muon_momentum_run(grad, momentum_buffer, update, start, end, sign, lerp_weight, momentum, nesterov);
}

// ------------------------------------------------------------------------------------------------
// Frobenius norm, deterministic. The CPU (newton_schulz.rs `frobenius_norm`) sums x^2 in f64 over
// chunks of 16384 elements and adds the chunks in order, then takes the f64 square root and rounds
// it to f32. Here the same chunking feeds a fixed GPU tree: the f64 sum can differ from the CPU's
// in its last bits (a different order of additions), which survives the rounding of the norm to
// f32 only in rare near-ties. Every launch with the same inputs gives the same bits.
//
// Pass 1, muon_sumsq_partial: block (c, m) sums chunk c (elements [c * 16384, (c+1) * 16384) intersected with
// [0, n)) of matrix m into partials[m * gridDim.x + c]: thread t adds elements t, t + 256, ... of
// the chunk in order, then the block tree adds the 256 thread sums.
//   Launch: blockDim.x = 256 exactly; grid (ceil(n / 16384), count). partials holds
//   count * ceil(n / 16384) doubles.
// Pass 2, muon_sumsq_final: block m adds the `parts` partials of matrix m (thread t adds partials
// t, t + 256, ... in order, then the block tree) into sums[m].
//   Launch: blockDim.x = 256; grid (count). parts = ceil(n / 16384), as in pass 1.
// ------------------------------------------------------------------------------------------------

#define NORM_CHUNK 16384u  // elements per pass-1 block: newton_schulz.rs CHUNK

extern "C" __global__ void muon_sumsq_partial(const float* x, u64 n, double* partials) {
    __shared__ double scratch[32];
    const u64 m = blockIdx.y;
    const float* mat = x + m * n;
    const u64 c0 = (u64)blockIdx.x * NORM_CHUNK;
    const u64 c1 = min_u64(n, c0 + NORM_CHUNK);
    double acc = 0.0;
    for (u64 i = c0 + threadIdx.x; i < c1; i += blockDim.x) {
        const double v = (double)mat[i];
        acc += v * v;  // exact: a 24-bit mantissa squared fits in 53 bits
    }
    const double total = block_sum_f64(acc, scratch);
    if (threadIdx.x == 0) {
        partials[m * gridDim.x + blockIdx.x] = total;
    }
}

extern "C" __global__ void muon_sumsq_final(const double* partials, u64 parts, double* sums) {
    __shared__ double scratch[32];
    const u64 m = blockIdx.x;
    double acc = 0.0;
    for (u64 j = threadIdx.x; j < parts; j += blockDim.x) {
        acc += partials[m * parts + j];
    }
    const double total = block_sum_f64(acc, scratch);
    if (threadIdx.x == 0) {
        sums[m] = total;
    }
}

// dst = src / norm per matrix m, norm = (float)sqrt(sums[m]) clamped below at eps as torch's
// clamp(min=eps) does (`norm < eps ? eps : norm`, so a NaN norm stays NaN, where fmaxf would not).
// Divides, as torch's div_ does (no reciprocal). src and dst may be the same buffer.
//   Launch: blockDim.x = 256, grid (X, count) with any X >= 1 (grid-stride within a matrix);
//   ceil(n / 256) covers a matrix once.
extern "C" __global__ void muon_normalize(const float* src, float* dst, u64 n, const double* sums, float eps) {
    const u64 m = blockIdx.y;
    float norm = (float)sqrt(sums[m]);
    norm = norm < eps ? eps : norm;
    const u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        dst[m * n + i] = src[m * n + i] / norm;
    }
}

// poly[i * dim + i] += a for i < dim, in each of `count` contiguous dim x dim matrices: turns
// B = b A + c A A into B + a I, so that a X + B X is the single product (B + a I) X
// (newton_schulz.rs `step`; rounded once, as there).
//   Launch: blockDim.x = 256, grid (X, count), any X >= 1; ceil(dim / 256) covers a matrix once.
extern "C" __global__ void muon_add_diagonal(float* poly, u64 dim, float a) {
    float* mat = poly + (u64)blockIdx.y * dim * dim;
    const u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < dim; i += stride) {
        mat[i * dim + i] = mat[i * dim + i] + a;
    }
}

// ------------------------------------------------------------------------------------------------
// Apply: for i in [start, end) of the group's index space (part of one tensor; param points at the
// parameter of index start),
//   param[i - start] = param[i - start] * decay + neg_lr * ortho[i - start]
// the element of index i drawing the random bits of index i - start + draw (draw = start unless
// the tensor is a shard of a larger one); the loop walks draw indices.
// decay = (1 - lr * weight_decay) as f32 and neg_lr = (-lr * adjust_lr(rows, cols)) as f32, both
// computed by the host in f64 (the shape factor makes neg_lr per tensor: launch per tensor). The
// product decay * p is taken even when decay == 1, as on the CPU (exact then). muon_apply_bf16
// rounds with ROUND_NEAREST (0) or ROUND_STOCHASTIC (1), drawing element i's bits as
// random_u16(seed, step, stream, i), step = the tensor's step count; muon_apply_f32 ignores seed,
// step, stream and rounding.
//
// Launch: 1-D, blockDim.x = 256 (any multiple of 32), any gridDim.x >= 1 (grid-stride over
// 256-element warp tiles; ceil((end - start) / 2048) + 1 blocks give every warp at most one tile).
// ------------------------------------------------------------------------------------------------

// A counted step's (capturable=True) apply: the learning rate from the device (or the host's
// value) and the tensor's step from counters[tensor] + 1 (the count before this step; the host's
// last launch advances it), decay and neg_lr computed from them as the host does. Layout of
// MuonCountedHyper (Rust: #[repr(C)], rust/cuda muon.rs):
//   offset  0  LrSource lr     (24 bytes)
//   offset 24  f64 weight_decay
//   offset 32  f64 lr_factor   adjust_lr(rows, cols) of the tensor's (whole) matrices
//   size 40, alignment 8
struct MuonCountedHyper {
    LrSource lr;
    double weight_decay;
    double lr_factor;
};
static_assert(sizeof(MuonCountedHyper) == 40 && alignof(MuonCountedHyper) == 8, "MuonCountedHyper layout");

template <typename P>
__device__ __forceinline__ void muon_apply_run(P* param, const float* ortho, u64 start, u64 end, u64 draw,
                                               float decay, float neg_lr, u64 seed, u64 step, u32 stream,
                                               u32 rounding) {
    struct In {
        float p, ortho;
    };
    auto load = [&](u64 d) { return In{load_param(param, d - draw), ortho[d - draw]}; };
    auto apply = [&](u64 d, const In& in, u32 r16) {
        store_param(param, d - draw, in.p * decay + neg_lr * in.ortho, rounding, r16);
    };
    grid_for_range(draw, draw + (end - start), needs_draws(param, rounding), seed, step, stream, load, apply);
}

extern "C" __global__ void muon_apply_f32(float* param, const float* ortho, u64 start, u64 end, u64 draw,
                                          float decay, float neg_lr, u64 seed, u64 step, u32 stream, u32 rounding) {
    muon_apply_run(param, ortho, start, end, draw, decay, neg_lr, seed, step, stream, rounding);
}

extern "C" __global__ void muon_apply_bf16(bf16* param, const float* ortho, u64 start, u64 end, u64 draw,
                                           float decay, float neg_lr, u64 seed, u64 step, u32 stream,
                                           u32 rounding) {
    muon_apply_run(param, ortho, start, end, draw, decay, neg_lr, seed, step, stream, rounding);
}

template <typename P>
__device__ __forceinline__ void muon_apply_counted_run(P* param, const float* ortho, u64 start, u64 end, u64 draw,
                                                       const MuonCountedHyper& h, const double* counters,
                                                       u32 tensor, u64 seed, u32 stream, u32 rounding) {
    const double lr = read_lr(h.lr);
    const float decay = (float)(1.0 - lr * h.weight_decay);
    const float neg_lr = (float)(-lr * h.lr_factor);
    const u64 step = (u64)counters[tensor] + 1u;
    muon_apply_run(param, ortho, start, end, draw, decay, neg_lr, seed, step, stream, rounding);
}

extern "C" __global__ void muon_apply_counted_f32(float* param, const float* ortho, u64 start, u64 end, u64 draw,
                                                  MuonCountedHyper h, const double* counters, u32 tensor, u64 seed,
                                                  u32 stream, u32 rounding) {
    muon_apply_counted_run(param, ortho, start, end, draw, h, counters, tensor, seed, stream, rounding);
}

extern "C" __global__ void muon_apply_counted_bf16(bf16* param, const float* ortho, u64 start, u64 end, u64 draw,
                                                   MuonCountedHyper h, const double* counters, u32 tensor, u64 seed,
                                                   u32 stream, u32 rounding) {
    muon_apply_counted_run(param, ortho, start, end, draw, h, counters, tensor, seed, stream, rounding);
}
