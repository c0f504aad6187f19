// adafactor.cu: Adafactor over a param group's tensors, driven by a segment table, mirroring
// the phases of rust/core/src/rules/adafactor.rs `adafactor_step`:
//
//   phase 1   adafactor_phase1_*     per unit: sum of P^2; factored: row sums of G^2; unfactored:
//                                    the second-moment EMA and the sum of U^2
//             adafactor_colsum_*     factored: column sums of G^2 over fixed row tiles
//   phase 2   adafactor_phase2_ema   factored: row and column EMAs
//             adafactor_row_mean     factored: per-matrix mean of the row EMA (clamped)
//             adafactor_col_factor   factored: each column's factor, into the dead col_part scratch
//   phase 3   adafactor_phase3_*     factored: per unit, the sum of U^2
//   phase 4   adafactor_phase4       per tensor: the f64 sums, then the step-size scalars
//   phase 5   adafactor_phase5_*     the update (optional momentum), bf16 rounding
//
// Launch in that order on one stream; nothing needs the host between phases (no read-back).
// Before phase 1, adafactor_set_segments writes what changes from step to step into the table
// (each tensor's parameter and gradient addresses, its step count and beta2 weight), so the host
// uploads the table only when the set of stepped tensors changes, never per step. A counted step
// (capturable=True) launches adafactor_set_segments_counted instead, which takes each count from
// the device, advances it and computes the beta2 weight there, and phase 4 reads the learning
// rate from the device: no launch argument then changes from step to step.
//
// Segments. The host passes a device array of AdafactorSegment, one per tensor stepped this step
// (stepped and non-empty; the CPU skips the others), and launches every kernel with gridDim.z =
// number of segments (at most 65535): block z works on segment z only. Within a segment,
//
//   index   a tensor's elements are indices offset .. offset + numel of the group's index space,
//           which index the flat state (exp_avg, variance) and count the random bits; element
//           index i of the parameters and gradients is at param / grad + (i - offset), where
//           their owner keeps them (each tensor's matrices row-major)
//   unit    the piece one warp reduces: a factored tensor's units are its batch * rows matrix
//           rows (unit u = b * rows + r is indices offset + u * cols .. + cols); an unfactored
//           tensor's units are ADAFACTOR_UNIT consecutive elements (the last one shorter), so it
//           has ceil(numel / ADAFACTOR_UNIT) units.
//   tile    factored column sums: each matrix's rows are cut into row_tiles tiles of
//           ceil(rows / row_tiles) rows (trailing tiles may be empty).
//
// Numerics. Element-wise math is the CPU's, operation for operation, so given the same f32 inputs
// (EMAs, row means, step-size scalars) every parameter, EMA and momentum value is bit-identical.
// Reductions accumulate exact f64 squares like the CPU, but over this fixed GPU partition rather
// than the CPU's: sums may differ in their last f64 bits, and the f32 values derived from them
// (row and column EMAs, row means, the RMS-based scalars) agree except in rare near-ties. Every
// launch with the same inputs and table gives the same bits (no atomics).

#include "common.cuh"

// Elements per unit of an unfactored tensor.
#define ADAFACTOR_UNIT 4096u

// One stepped tensor. Layout (Rust: #[repr(C)], u64 / f32 / u32 fields in this order):
//   offset   0  u64 offset          index of the tensor's element 0 (the segment table's offset)
//   offset   8  u64 numel           batch * rows * cols
//   offset  16  u64 batch           the tensor as `batch` row-major rows x cols matrices
//   offset  24  u64 rows            (segments.rs `matrix(i)`; rows, cols >= 1 when factored)
//   offset  32  u64 cols
//   offset  40  u64 row_offset      factored: first row EMA in row_var (AdafactorLayout
//                                   row_offsets[i]); also indexes the row_sq scratch
//   offset  48  u64 col_offset      factored: first column EMA in col_var (col_offsets[i])
//   offset  56  u64 var_offset      unfactored: first second moment in variance
//                                   (variance_offsets[i])
//   offset  64  u64 unit_offset     first slot of the per-unit scratch param_sq_part and
//                                   update_sq_part (segments' units packed back to back)
//   offset  72  u64 units           factored: batch * rows; unfactored: ceil(numel / 4096)
//   offset  80  u64 colpart_offset  factored: first slot in the col_part scratch, which holds
//                                   batch * row_tiles * cols doubles for this tensor
//   offset  88  u64 row_tiles       factored: >= 1; any value (a function of the shape only, so
//                                   that results do not depend on the device); suggested
//                                   clamp(ceil(rows / 64), 1, 64)
//   offset  96  u64 mean_offset     factored: first slot of the row_mean scratch (batch floats)
//   offset 104  u64 step            the tensor's step count after this step (1 on its first),
//                                   the Philox step of its stochastic rounding
//   offset 112  f32 weight2         (1 - beta2_t) as f32, beta2_t from the host's beta2_at(step)
//   offset 116  u32 factored        0 / 1
//   offset 120  u64 param           address of the parameters' element 0 (written by
//                                   adafactor_set_segments)
//   offset 128  u64 grad            address of the gradients' element 0 (likewise)
//   offset 136  u64 draw            the index the tensor's element 0 draws its random bits at
//                                   (its offset, unless it is a shard of a larger tensor)
//   offset 144  u64 whole_numel     elements of the whole tensor, what its RMS averages over
//                                   (numel, unless the tensor is a shard: see Shards below)
//   offset 152  u64 whole_rows      rows of the whole matrix, what column means and the row
//                                   mean divide by (rows, unless split is SPLIT_ROWS)
//   offset 160  u64 exchange        SPLIT_ELEMENTS / SPLIT_ROWS: first slot of the segment's
//                                   first sums in the exchange vector (see Shards)
//   offset 168  u64 exchange2       SPLIT_ELEMENTS / SPLIT_ROWS: slot of its second sum
//   offset 176  u32 split           SPLIT_WHOLE (0), SPLIT_ELEMENTS (1) or SPLIT_ROWS (2)
//   offset 180  u32 pad             0
//   size 184, alignment 8
struct AdafactorSegment {
    u64 offset;
    u64 numel;
    u64 batch;
    u64 rows;
    u64 cols;
    u64 row_offset;
    u64 col_offset;
    u64 var_offset;
    u64 unit_offset;
    u64 units;
    u64 colpart_offset;
    u64 row_tiles;
    u64 mean_offset;
    u64 step;
    float weight2;
    u32 factored;
    u64 param;
    u64 grad;
    u64 draw;
    u64 whole_numel;
    u64 whole_rows;
    u64 exchange;
    u64 exchange2;
    u32 split;
    u32 pad;
};
static_assert(sizeof(AdafactorSegment) == 184 && alignof(AdafactorSegment) == 8, "AdafactorSegment layout");

// Shards. When a group's tensors are shards of tensors spread over several ranks (FSDP2 shards
// each parameter on dim 0; rust/core/src/rules/adafactor/sharded.rs has the math), a segment
// says how its tensor is spread:
//   SPLIT_WHOLE     every rank holds the whole tensor: nothing is summed
//   SPLIT_ELEMENTS  ranks hold different elements (whole matrices of a batch, or part of an
//                   unfactored tensor): the sums of P^2 and U^2 span ranks
//   SPLIT_ROWS      ranks hold different rows of the one matrix of a factored tensor: the column
//                   sums of G^2 and the sum of the row EMAs span ranks too
// What spans ranks is summed in a device vector of f64, the exchange, in two rounds that the host
// has the ranks sum in place (an all-reduce) between launches:
//   round 1, after adafactor_phase2_ema with part 1 (row EMAs), adafactor_pack_sums stage 1:
//     exchange[exchange]                 sum of P^2 over the shard
//     exchange[exchange + 1]             SPLIT_ROWS: sum of the shard's row EMAs
//     exchange[exchange + 2 + c]         SPLIT_ROWS: sum of G^2 over the shard's column c
//   then adafactor_phase2_ema with part 2 (column EMAs), adafactor_row_mean and phase 4 read the
//   sums; round 2, after phase 3, adafactor_pack_sums stage 2:
//     exchange[exchange2]                sum of U^2 over the shard
// Every rank packs the same segments (also those holding no elements of their tensor, which add
// zeros and, with SPLIT_ROWS, still update their copy of the column EMAs), so the vectors line up.
#define SPLIT_WHOLE 0u
#define SPLIT_ELEMENTS 1u
#define SPLIT_ROWS 2u

// A segment's parameters and gradients as element pointers, and the element of index i.
template <typename P>
__device__ __forceinline__ P* seg_param(const AdafactorSegment& s, u64 i) {
    return element_at<P>(s.param, s.offset, i);
}

template <typename P>
__device__ __forceinline__ const P* seg_grad(const AdafactorSegment& s, u64 i) {
    return element_at<const P>(s.grad, s.offset, i);
}

// The hyperparameters phase 4 needs, in f64 as the CPU computes phase 4. Passed BY VALUE.
// Layout (Rust: #[repr(C)]):
//   offset  0  LrSource lr                   (common.cuh: the value, or a tensor on the device)
//   offset 24  f64 eps2
//   offset 32  f64 clip_threshold
//   offset 40  f64 weight_decay
//   offset 48  u32 relative_step             0 / 1
//   offset 52  u32 cap_lr_at_inv_sqrt_step   0 / 1
//   offset 56  u32 momentum                  0 / 1: beta1 != 0 (tested in f64 by the host)
//   offset 60  u32 pad                       0
//   size 64, alignment 8
struct AdafactorHyper {
    LrSource lr;
    double eps2;
    double clip_threshold;
    double weight_decay;
    u32 relative_step;
    u32 cap_lr_at_inv_sqrt_step;
    u32 momentum;
    u32 pad;
};
static_assert(sizeof(AdafactorHyper) == 64 && alignof(AdafactorHyper) == 8, "AdafactorHyper layout");

// Per-segment results of phase 4 (the CPU's TensorPlan scalars), read by phase 5; the f64 sums
// are kept for diagnostics. A device array with one entry per segment, written only by phase 4.
//   offset  0  f32 scale       -alpha / clip, or with momentum 1 / clip
//   offset  4  f32 neg_alpha   -alpha (momentum), else 0
//   offset  8  f32 decay       1 - lr * weight_decay
//   offset 12  u32 pad
//   offset 16  f64 param_sq    sum of P^2 over the tensor
//   offset 24  f64 update_sq   sum of U^2 over the tensor (before clipping)
//   size 32, alignment 8
struct AdafactorScalars {
    float scale;
    float neg_alpha;
    float decay;
    u32 pad;
    double param_sq;
    double update_sq;
};
static_assert(sizeof(AdafactorScalars) == 32 && alignof(AdafactorScalars) == 8, "AdafactorScalars layout");

// ------------------------------------------------------------------------------------------------
// Per step, before phase 1: segments [first, first + count) of the table get this step's values,
// computed by the host:
//   segs[first + j].param = param[j], .grad = grad[j], .step = step[j], .weight2 = weight2[j]
// The table stays on the device between steps; kernel arguments carry what changes (a torch step
// may hand new gradient tensors every time), so a step needs no host-to-device copy and its
// launches can be captured in a CUDA graph. Layout (Rust: #[repr(C)]):
//   offset    0  u64 param[96]
//   offset  768  u64 grad[96]
//   offset 1536  u64 step[96]
//   offset 2304  f32 weight2[96]
//   offset 2688  u32 first
//   offset 2692  u32 count         1..96
//   size 2696, alignment 8
// Launch: 1-D, blockDim.x = 256 (at least count threads), gridDim.x = 1.
// ------------------------------------------------------------------------------------------------

#define UPDATE_SEGMENTS 96u

struct SegmentUpdate {
    u64 param[UPDATE_SEGMENTS];
    u64 grad[UPDATE_SEGMENTS];
    u64 step[UPDATE_SEGMENTS];
    float weight2[UPDATE_SEGMENTS];
    u32 first;
    u32 count;
};
static_assert(sizeof(SegmentUpdate) == 2696 && alignof(SegmentUpdate) == 8, "SegmentUpdate layout");

extern "C" __global__ void adafactor_set_segments(AdafactorSegment* segs, const __grid_constant__ SegmentUpdate up) {
    for (u32 j = threadIdx.x; j < up.count; j += blockDim.x) {
        AdafactorSegment& s = segs[up.first + j];
        s.param = up.param[j];
        s.grad = up.grad[j];
        s.step = up.step[j];
        s.weight2 = up.weight2[j];
    }
}

// ------------------------------------------------------------------------------------------------
// A counted step's (capturable=True) adafactor_set_segments: segment first + j is tensor
// tensor[j] of the group, whose count (f64, before this step) is counters[tensor[j]]:
//   t = counters[tensor[j]] + 1;  counters[tensor[j]] = t
//   segs[first + j].param = param[j], .grad = grad[j], .step = t,
//   .weight2 = (f32)(1 - beta2_t),  beta2_t = decay ? 1 - t^value : value
// (adafactor.rs `beta2_at` in f64, the host's pow). Later phases read the step from the segment,
// so the count is advanced here. Layout of SegmentCountedUpdate (Rust: #[repr(C)]):
//   offset    0  u64 param[96]
//   offset  768  u64 grad[96]
//   offset 1536  u32 tensor[96]
//   offset 1920  u32 first
//   offset 1924  u32 count         1..96
//   size 1928, alignment 8
// and of Beta2Schedule:
//   offset 0  f64 value     the constant beta2, or the decay exponent (<= 0)
//   offset 8  u32 decay     0: constant, 1: torch's schedule 1 - t^value
//   offset 12 u32 pad
//   size 16, alignment 8
// Launch: 1-D, blockDim.x = 256 (at least count threads), gridDim.x = 1.
// ------------------------------------------------------------------------------------------------

struct SegmentCountedUpdate {
    u64 param[UPDATE_SEGMENTS];
    u64 grad[UPDATE_SEGMENTS];
    u32 tensor[UPDATE_SEGMENTS];
    u32 first;
    u32 count;
};
static_assert(sizeof(SegmentCountedUpdate) == 1928 && alignof(SegmentCountedUpdate) == 8,
              "SegmentCountedUpdate layout");

struct Beta2Schedule {
    double value;
    u32 decay;
    u32 pad;
};
static_assert(sizeof(Beta2Schedule) == 16 && alignof(Beta2Schedule) == 8, "Beta2Schedule layout");

extern "C" __global__ void adafactor_set_segments_counted(AdafactorSegment* segs, double* counters,
                                                          const __grid_constant__ SegmentCountedUpdate up,
                                                          Beta2Schedule beta2) {
    for (u32 j = threadIdx.x; j < up.count; j += blockDim.x) {
        AdafactorSegment& s = segs[up.first + j];
        const double t = counters[up.tensor[j]] + 1.0;
        counters[up.tensor[j]] = t;
        const double beta2_t = beta2.decay ? 1.0 - pow(t, beta2.value) : beta2.value;
        s.param = up.param[j];
        s.grad = up.grad[j];
        s.step = (u64)t;
        s.weight2 = (float)(1.0 - beta2_t);
    }
}

// The warp of the calling thread among the warps of its segment's blocks (blockIdx.x), and their
// number: units are dealt to warps round-robin.
__device__ __forceinline__ u64 seg_warp_id() {
    return ((u64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
}

__device__ __forceinline__ u64 seg_warp_count() {
    return ((u64)gridDim.x * blockDim.x) >> 5;
}

// The elements [first, last) of unit u of segment s.
__device__ __forceinline__ void unit_range(const AdafactorSegment& s, u64 u, u64& first, u64& last) {
    if (s.factored) {
        first = s.offset + u * s.cols;
        last = first + s.cols;
    } else {
        first = s.offset + u * ADAFACTOR_UNIT;
        last = min_u64(first + ADAFACTOR_UNIT, s.offset + s.numel);
    }
}

// Calls body(i, load(i)) for i = first + lane, first + lane + 32, ... < last, in that order (the
// order of each lane's f64 sums), issuing the loads of LANE_BATCH consecutive iterations before the
// first of their bodies: one iteration's loads at a time keep too few bytes in flight per warp.
#define LANE_BATCH 8u
template <class Load, class Body>
__device__ __forceinline__ void lane_strided(u64 first, u64 last, u32 lane, Load load, Body body) {
    for (u64 i0 = first + lane; i0 < last; i0 += 32u * LANE_BATCH) {
        decltype(load(i0)) in[LANE_BATCH];
#pragma unroll
        for (u32 k = 0; k < LANE_BATCH; ++k) {
            if (i0 + 32u * k < last) {
                in[k] = load(i0 + 32u * k);
            }
        }
#pragma unroll
        for (u32 k = 0; k < LANE_BATCH; ++k) {
            if (i0 + 32u * k < last) {
                body(i0 + 32u * k, in[k]);
            }
        }
    }
}

// 1 / sqrt(max(v, clamp_eps^2)): the unfactored update's scale (adafactor.rs phase1/phase5).
// clamp_eps^2 is computed in f32, as there (f32::EPSILON^2 = 2^-46 is exact). f32::max and
// fmaxf both return the other operand when one is NaN.
__device__ __forceinline__ float inv_root(float v, float clamp_eps) {
    return 1.0f / sqrtf(fmaxf(v, clamp_eps * clamp_eps));
}

// 1 / sqrt(x / denom), correctly rounded operation by operation (adafactor.rs `inv_root_ratio`):
// the row factor a = inv_root_ratio(r, 1) and the column factor b = inv_root_ratio(c, row_mean).
__device__ __forceinline__ float inv_root_ratio(float x, float denom) {
    return 1.0f / sqrtf(x / denom);
}

// The factored update U = min(a b, 1 / clamp_eps) * (sign g) (adafactor.rs `factored_update`),
// equal to (1 / sqrt(max(r c / row_mean, eps^2))) * (sign g) up to rounding. The CPU computes a
// and b once per row and column; here they are recomputed with the same operations, so the bits
// agree. 1 / clamp_eps is exact (2^23) or, without the clamp, +inf; fminf, like f32::min, returns
// the non-NaN operand.
__device__ __forceinline__ float factored_update(float g, float row_factor, float col_factor, float sign,
                                                 float clamp_eps) {
    const float ceiling = clamp_eps > 0.0f ? 1.0f / clamp_eps : __int_as_float(0x7f800000);
    return fminf(row_factor * col_factor, ceiling) * (sign * g);
}

// ------------------------------------------------------------------------------------------------
// Phase 1. One warp per unit (lane k adds elements k, k + 32, ... in order, then the warp
// butterfly):
//   param_sq_part[unit_offset + u] = sum of P^2 over the unit (0 when sum_param is 0: the host
//                                    passes 0 without relative_step, which alone uses it)
//   factored:   row_sq[row_offset + u] = sum of G^2 over the row (f64; the row EMA's input)
//   unfactored: variance = torch_lerp(variance, gk^2 + add_eps, weight2) with gk = sign * g, and
//               update_sq_part[unit_offset + u] = sum of (gk / sqrt(max(variance, eps^2)))^2
// sign: -1 when maximizing, else 1. add_eps: eps1 as f32, or 0 when eps1 is None. clamp_eps:
// f32::EPSILON (1.1920929e-7) when eps1 is None, else 0.
// Launch: blockDim.x = 256 (any multiple of 32), grid (X, 1, segments), any X >= 1 (the grid's
// warps stride over each segment's units; X = ceil(max units / 8) gives each warp one unit).
// Scratch: row_sq has row_total doubles (row_var's layout), param_sq_part and update_sq_part one
// double per unit of all segments.
// ------------------------------------------------------------------------------------------------

template <typename P>
__device__ __forceinline__ void phase1_run(u32 sum_param, float* variance, const AdafactorSegment* segs,
                                           double* row_sq, double* param_sq_part, double* update_sq_part, float sign,
                                           float add_eps, float clamp_eps) {
    const AdafactorSegment s = segs[blockIdx.z];
    const u32 lane = threadIdx.x & 31u;
    for (u64 u = seg_warp_id(); u < s.units; u += seg_warp_count()) {
        u64 first, last;
        unit_range(s, u, first, last);
        double psq = 0.0;
        double xsq = 0.0;  // factored: sum of G^2; unfactored: sum of U^2
        struct In {
            float p, g;
        };
        auto load = [&](u64 i) {
            return In{sum_param ? load_param(seg_param<P>(s, i), 0) : 0.0f, load_param(seg_grad<P>(s, i), 0)};
        };
        if (s.factored) {
            lane_strided(first, last, lane, load, [&](u64, const In& in) {
                psq += (double)in.p * (double)in.p;  // exact products, as (x as f64) * (x as f64)
                xsq += (double)in.g * (double)in.g;
            });
        } else {
            lane_strided(first, last, lane, load, [&](u64 i, const In& in) {
                psq += (double)in.p * (double)in.p;
                const float gk = sign * in.g;
                const u64 vi = s.var_offset + (i - s.offset);
                const float v = torch_lerp(variance[vi], gk * gk + add_eps, s.weight2);
                variance[vi] = v;
                const float upd = gk * inv_root(v, clamp_eps);
                xsq += (double)upd * (double)upd;
            });
        }
        psq = warp_sum_f64(psq);
        xsq = warp_sum_f64(xsq);
        if (lane == 0) {
            param_sq_part[s.unit_offset + u] = psq;
            if (s.factored) {
                row_sq[s.row_offset + u] = xsq;
            } else {
                update_sq_part[s.unit_offset + u] = xsq;
            }
        }
    }
}

extern "C" __global__ void adafactor_phase1_f32(u32 sum_param, float* variance, const AdafactorSegment* segs,
                                                double* row_sq, double* param_sq_part, double* update_sq_part,
                                                float sign, float add_eps, float clamp_eps) {
    phase1_run<float>(sum_param, variance, segs, row_sq, param_sq_part, update_sq_part, sign, add_eps, clamp_eps);
}

extern "C" __global__ void adafactor_phase1_bf16(u32 sum_param, float* variance, const AdafactorSegment* segs,
                                                 double* row_sq, double* param_sq_part, double* update_sq_part,
                                                 float sign, float add_eps, float clamp_eps) {
    phase1_run<bf16>(sum_param, variance, segs, row_sq, param_sq_part, update_sq_part, sign, add_eps, clamp_eps);
}

// ------------------------------------------------------------------------------------------------
// Phase 1, column sums (factored segments; others return at once). For matrix b and row tile t
// (bt = b * row_tiles + t), thread column c adds G^2 over the tile's rows in order:
//   col_part[colpart_offset + bt * cols + c] = sum over rows r of tile t of G[b, r, c]^2   (f64)
// Empty tiles write 0. The sign is irrelevant to squares, as on the CPU.
// Launch: blockDim.x = 256, grid (X, Y, segments), any X, Y >= 1: blocks stride over columns with
// blockIdx.x (threads of a block take consecutive columns: coalesced) and over the
// batch * row_tiles tiles with blockIdx.y. X = ceil(max cols / 256), Y = max batch * row_tiles
// (capped, e.g. at 65535) cover everything once.
// ------------------------------------------------------------------------------------------------

template <typename P>
__device__ __forceinline__ void colsum_run(const AdafactorSegment* segs, double* col_part) {
    const AdafactorSegment s = segs[blockIdx.z];
    if (!s.factored) {
        return;
    }
    const u64 tiles = s.batch * s.row_tiles;
    const u64 tile_rows = (s.rows + s.row_tiles - 1) / s.row_tiles;
    const u64 col_stride = (u64)gridDim.x * blockDim.x;
    for (u64 bt = blockIdx.y; bt < tiles; bt += gridDim.y) {
        const u64 b = bt / s.row_tiles;
        const u64 t = bt - b * s.row_tiles;
        const u64 r0 = min_u64(s.rows, t * tile_rows);
        const u64 r1 = min_u64(s.rows, r0 + tile_rows);
        const u64 matrix = s.offset + b * s.rows * s.cols;
        for (u64 c = (u64)blockIdx.x * blockDim.x + threadIdx.x; c < s.cols; c += col_stride) {
            double acc = 0.0;
            for (u64 r = r0; r < r1; ++r) {
                const double g = (double)load_param(seg_grad<P>(s, matrix + r * s.cols + c), 0);
                acc += g * g;
            }
            col_part[s.colpart_offset + bt * s.cols + c] = acc;
        }
    }
}

extern "C" __global__ void adafactor_colsum_f32(const AdafactorSegment* segs, double* col_part) {
    colsum_run<float>(segs, col_part);
}

extern "C" __global__ void adafactor_colsum_bf16(const AdafactorSegment* segs, double* col_part) {
    colsum_run<bf16>(segs, col_part);
}

// ------------------------------------------------------------------------------------------------
// Phase 2, EMAs (factored segments). For each of the batch * rows row EMAs and batch * cols column
// EMAs of the segment (adafactor.rs phase 2):
//   row_var[row_offset + j] = torch_lerp(row_var, (float)row_sq[row_offset + j] / (float)cols + add_eps,
//                                  weight2)
//   col_var[col_offset + b * cols + c] = torch_lerp(col_var, (float)S / (float)rows + add_eps, weight2)
//     with S = the f64 sum of the row_tiles partials col_part[colpart_offset + (b * row_tiles + t)
//     * cols + c], t = 0, 1, ... in order, starting from 0 (SPLIT_ROWS: S = exchange[exchange + 2
//     + c], summed across ranks, and rows = whole_rows)
// (the f64 sums rounded to f32 first, then divided in f32 by the f32 count, as the CPU does).
// part: EMA_ROWS (1), EMA_COLS (2) or both (3): a sharded step updates the row EMAs before the
// first round of its exchange and the column EMAs after it.
// Launch: blockDim.x = 256, grid (X, 1, segments), any X >= 1 (grid-stride over the segment's
// batch * (rows + cols) EMAs; X = ceil(max batch * (rows + cols) / 256) covers them once).
// ------------------------------------------------------------------------------------------------

#define EMA_ROWS 1u
#define EMA_COLS 2u

extern "C" __global__ void adafactor_phase2_ema(float* row_var, float* col_var, const AdafactorSegment* segs,
                                                const double* row_sq, const double* col_part, const double* exchange,
                                                u32 part, float add_eps) {
    const AdafactorSegment s = segs[blockIdx.z];
    if (!s.factored) {
        return;
    }
    const u64 n_rows = s.batch * s.rows;
    const u64 n_cols = s.batch * s.cols;
    const u64 stride = (u64)gridDim.x * blockDim.x;
    const u64 first = (part & EMA_ROWS) ? 0 : n_rows;
    const u64 last = (part & EMA_COLS) ? n_rows + n_cols : n_rows;
    for (u64 j = first + (u64)blockIdx.x * blockDim.x + threadIdx.x; j < last; j += stride) {
        if (j < n_rows) {
            const u64 ri = s.row_offset + j;
            const float mean_sq = (float)row_sq[ri] / (float)s.cols + add_eps;
            row_var[ri] = torch_lerp(row_var[ri], mean_sq, s.weight2);
        } else {
            const u64 k = j - n_rows;
            const u64 b = k / s.cols;
            const u64 c = k - b * s.cols;
            double acc = 0.0;
            if (s.split == SPLIT_ROWS) {
                acc = exchange[s.exchange + 2 + c];  // one matrix (b == 0), summed across ranks
            } else {
                const double* tiles = col_part + s.colpart_offset + b * s.row_tiles * s.cols + c;
                for (u64 t = 0; t < s.row_tiles; ++t) {
                    acc += tiles[t * s.cols];
                }
            }
            const u64 ci = s.col_offset + k;
            const float mean_sq = (float)acc / (float)s.whole_rows + add_eps;
            col_var[ci] = torch_lerp(col_var[ci], mean_sq, s.weight2);
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Phase 2, row means (factored segments), after adafactor_phase2_ema. One warp per matrix b:
//   row_mean[mean_offset + b] = max((float)(sum_r (double)row_var[row_offset + b * rows + r]
//                                           / (double)rows), clamp_eps)
// (the CPU adds the rows in order, here lane-strided then the butterfly: see Numerics above);
// SPLIT_ROWS: the sum is exchange[exchange + 1], summed across ranks, and rows = whole_rows.
// Launch: blockDim.x = 256 (any multiple of 32), grid (X, 1, segments), any X >= 1 (warps stride
// over the segment's matrices; X = ceil(max batch / 8) gives each warp one matrix).
// ------------------------------------------------------------------------------------------------

extern "C" __global__ void adafactor_row_mean(const float* row_var, const AdafactorSegment* segs,
                                              const double* exchange, float* row_mean, float clamp_eps) {
    const AdafactorSegment s = segs[blockIdx.z];
    if (!s.factored) {
        return;
    }
    const u32 lane = threadIdx.x & 31u;
    for (u64 b = seg_warp_id(); b < s.batch; b += seg_warp_count()) {
        const float* rv = row_var + s.row_offset + b * s.rows;
        double acc = 0.0;
        for (u64 r = lane; r < s.rows; r += 32) {
            acc += (double)rv[r];
        }
        acc = warp_sum_f64(acc);
        if (s.split == SPLIT_ROWS) {
            acc = exchange[s.exchange + 1];
        }
        if (lane == 0) {
            const float mean = (float)(acc / (double)s.whole_rows);
            row_mean[s.mean_offset + b] = fmaxf(mean, clamp_eps);
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Phase 2, column factors (factored segments), after adafactor_row_mean. For matrix b, column c:
//   col_factor(s)[b * cols + c] = inv_root_ratio(col_var[col_offset + b * cols + c], row_mean[mean_offset + b])
// where col_factor(s) = (float*)(col_part + colpart_offset): the segment's column partials are dead
// once adafactor_phase2_ema has summed them, and their batch * row_tiles * cols doubles hold the
// batch * cols floats. Computed once here, the factor (a division and a square root) is read by
// phases 3 and 5 instead of being recomputed for every element, with the same bits.
// Launch: blockDim.x = 256, grid (X, 1, segments), any X >= 1 (grid-stride over the segment's
// batch * cols columns; X = ceil(max batch * cols / 256) covers them once).
// ------------------------------------------------------------------------------------------------

__device__ __forceinline__ float* col_factors(double* col_part, const AdafactorSegment& s) {
    return reinterpret_cast<float*>(col_part + s.colpart_offset);
}

__device__ __forceinline__ const float* col_factors(const double* col_part, const AdafactorSegment& s) {
    return reinterpret_cast<const float*>(col_part + s.colpart_offset);
}

extern "C" __global__ void adafactor_col_factor(const float* col_var, const float* row_mean,
                                                const AdafactorSegment* segs, double* col_part) {
    const AdafactorSegment s = segs[blockIdx.z];
    if (!s.factored) {
        return;
    }
    float* factor = col_factors(col_part, s);
    const u64 n = s.batch * s.cols;
    const u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 k = (u64)blockIdx.x * blockDim.x + threadIdx.x; k < n; k += stride) {
        factor[k] = inv_root_ratio(col_var[s.col_offset + k], row_mean[s.mean_offset + k / s.cols]);
    }
}

// ------------------------------------------------------------------------------------------------
// Phase 3 (factored segments). One warp per unit (row u = b * rows + r; rows whose row_sq is 0
// add 0 and are skipped):
//   update_sq_part[unit_offset + u] = sum over the row of factored_update(G, a, b_c, sign,
//       clamp_eps)^2, a = inv_root_ratio(row_var[row_offset + u], 1) and b_c the column factor
//       col_factor(s)[b * cols + c] of adafactor_col_factor
// Launch: blockDim.x = 256 (any multiple of 32), grid (X, 1, segments), any X >= 1, as phase 1.
// ------------------------------------------------------------------------------------------------

template <typename P>
__device__ __forceinline__ void phase3_run(const float* row_var, const double* col_part, const double* row_sq,
                                           const AdafactorSegment* segs, double* update_sq_part, float sign,
                                           float clamp_eps) {
    const AdafactorSegment s = segs[blockIdx.z];
    if (!s.factored) {
        return;
    }
    const u32 lane = threadIdx.x & 31u;
    for (u64 u = seg_warp_id(); u < s.units; u += seg_warp_count()) {
        const u64 b = u / s.rows;
        const float a = inv_root_ratio(row_var[s.row_offset + u], 1.0f);
        const float* cf = col_factors(col_part, s) + b * s.cols;
        const u64 first = s.offset + u * s.cols;
        double acc = 0.0;
        // A row of zero gradients adds nothing (its updates are zero): skipped, as on the CPU.
        const u64 cols = row_sq[s.row_offset + u] == 0.0 ? 0 : s.cols;
        struct In {
            float g, bc;
        };
        lane_strided(
            0, cols, lane, [&](u64 c) { return In{load_param(seg_grad<P>(s, first + c), 0), cf[c]}; },
            [&](u64, const In& in) {
                const float upd = factored_update(in.g, a, in.bc, sign, clamp_eps);
                acc += (double)upd * (double)upd;
            });
        acc = warp_sum_f64(acc);
        if (lane == 0) {
            update_sq_part[s.unit_offset + u] = acc;
        }
    }
}

extern "C" __global__ void adafactor_phase3_f32(const float* row_var, const double* col_part, const double* row_sq,
                                                const AdafactorSegment* segs, double* update_sq_part, float sign,
                                                float clamp_eps) {
    phase3_run<float>(row_var, col_part, row_sq, segs, update_sq_part, sign, clamp_eps);
}

extern "C" __global__ void adafactor_phase3_bf16(const float* row_var, const double* col_part, const double* row_sq,
                                                 const AdafactorSegment* segs, double* update_sq_part, float sign,
                                                 float clamp_eps) {
    phase3_run<bf16>(row_var, col_part, row_sq, segs, update_sq_part, sign, clamp_eps);
}

// ------------------------------------------------------------------------------------------------
// Phase 4. One block per segment: the segment's param_sq and update_sq (sums of its units'
// partials: thread t adds units t, t + blockDim, ... in order, then the block tree), then, by
// thread 0, adafactor.rs phase 4 in f64 (the same correctly rounded f64 operations; fmin / fmax
// return the non-NaN operand like Rust's f64::min / max); a shard (split != SPLIT_WHOLE) takes
// param_sq and update_sq from the exchange, summed across ranks:
//   n = whole_numel; rho = cap ? min(lr, 1 / sqrt(step)) : lr
//   param_rms = (double)(float)sqrt(param_sq / n)
//   alpha = relative_step ? max(eps2, param_rms) * rho : rho
//   update_rms = (double)(float)sqrt(update_sq / n); clip = max(1, update_rms / clip_threshold)
//   momentum: scale = (float)(1 / clip), neg_alpha = (float)(-alpha)
//   else:     scale = (float)(-alpha / clip), neg_alpha = 0
//   decay = (float)(1 - lr * weight_decay)
// Launch: blockDim.x = 256 (any multiple of 32 up to 1024), grid (1, 1, segments).
// ------------------------------------------------------------------------------------------------

extern "C" __global__ void adafactor_phase4(const AdafactorSegment* segs, const double* param_sq_part,
                                            const double* update_sq_part, const double* exchange,
                                            AdafactorHyper hp, AdafactorScalars* scalars) {
    __shared__ double scratch_p[32];
    __shared__ double scratch_u[32];
    const AdafactorSegment s = segs[blockIdx.z];
    double psq = 0.0;
    double usq = 0.0;
    for (u64 j = threadIdx.x; j < s.units; j += blockDim.x) {
        psq += param_sq_part[s.unit_offset + j];
        usq += update_sq_part[s.unit_offset + j];
    }
    psq = block_sum_f64(psq, scratch_p);
    usq = block_sum_f64(usq, scratch_u);
    if (threadIdx.x != 0) {
        return;
    }
    if (s.split != SPLIT_WHOLE) {
        psq = exchange[s.exchange];
        usq = exchange[s.exchange2];
    }
    const double n = (double)s.whole_numel;
    const double lr = read_lr(hp.lr);
    const double rho = hp.cap_lr_at_inv_sqrt_step ? fmin(lr, 1.0 / sqrt((double)s.step)) : lr;
    const double param_rms = (double)(float)sqrt(psq / n);
    const double alpha = hp.relative_step ? fmax(hp.eps2, param_rms) * rho : rho;
    const double update_rms = (double)(float)sqrt(usq / n);
    const double clip = fmax(1.0, update_rms / hp.clip_threshold);
    AdafactorScalars out;
    if (hp.momentum) {
        out.scale = (float)(1.0 / clip);
        out.neg_alpha = (float)(-alpha);
    } else {
        out.scale = (float)(-alpha / clip);
        out.neg_alpha = 0.0f;
    }
    out.decay = (float)(1.0 - lr * hp.weight_decay);
    out.pad = 0;
    out.param_sq = psq;
    out.update_sq = usq;
    scalars[blockIdx.z] = out;
}

// ------------------------------------------------------------------------------------------------
// Packing the sums that span ranks (see Shards above). One block per segment; SPLIT_WHOLE
// segments return at once. Stage 1 (after adafactor_phase2_ema with part EMA_ROWS):
//   exchange[exchange]          = sum of param_sq_part over the segment's units
//   SPLIT_ROWS: exchange[exchange + 1]     = sum of (double)row_var over the shard's rows
//               exchange[exchange + 2 + c] = sum of the row_tiles partials of column c (in order)
// Stage 2 (after phase 3):
//   exchange[exchange2]         = sum of update_sq_part over the segment's units
// (units and rows are added as phase 4 and adafactor_row_mean add them: thread t takes t,
// t + blockDim, ..., then the block tree.)
// Launch: blockDim.x = 256 (any multiple of 32 up to 1024), grid (1, 1, segments).
// ------------------------------------------------------------------------------------------------

extern "C" __global__ void adafactor_pack_sums(const AdafactorSegment* segs, const double* param_sq_part,
                                               const double* update_sq_part, const float* row_var,
                                               const double* col_part, double* exchange, u32 stage) {
    __shared__ double scratch_a[32];
    __shared__ double scratch_b[32];
    const AdafactorSegment s = segs[blockIdx.z];
    if (s.split == SPLIT_WHOLE) {
        return;
    }
    const double* parts = stage == 1u ? param_sq_part : update_sq_part;
    double units = 0.0;
    for (u64 j = threadIdx.x; j < s.units; j += blockDim.x) {
        units += parts[s.unit_offset + j];
    }
    units = block_sum_f64(units, scratch_a);
    if (stage != 1u) {
        if (threadIdx.x == 0) {
            exchange[s.exchange2] = units;
        }
        return;
    }
    if (threadIdx.x == 0) {
        exchange[s.exchange] = units;
    }
    if (s.split != SPLIT_ROWS || !s.factored) {
        return;
    }
    double rows = 0.0;
    for (u64 r = threadIdx.x; r < s.rows; r += blockDim.x) {
        rows += (double)row_var[s.row_offset + r];
    }
    rows = block_sum_f64(rows, scratch_b);
    if (threadIdx.x == 0) {
        exchange[s.exchange + 1] = rows;
    }
    for (u64 c = threadIdx.x; c < s.cols; c += blockDim.x) {
        double acc = 0.0;
        for (u64 t = 0; t < s.row_tiles; ++t) {
            acc += col_part[s.colpart_offset + t * s.cols + c];
        }
        exchange[s.exchange + 2 + c] = acc;
    }
}

// ------------------------------------------------------------------------------------------------
// Phase 5: the update, one warp per unit (coalesced; random bits shared per Philox block, see
// warp_for_range). For each element, with U the factored update (the row factor of its row and
// column factor of its column, as in phase 3) or the unfactored (1 / sqrt(max(V, eps^2))) * (sign G):
//   decayed = decay != 1 ? P * decay : P
//   no momentum:  P = decayed + scale * U
//   momentum:     M = torch_lerp(M, U * scale, 1 - beta1); P = decayed + neg_alpha * M
// (1 - beta1 in f32; beta1 = hp.beta1 as f32; momentum = beta1 != 0 tested in f64 by the host;
// exp_avg may be null without momentum.) bf16 parameters are rounded with ROUND_NEAREST (0) or
// ROUND_STOCHASTIC (1), the element of index i drawing random_u16(seed, segment.step, stream,
// i - offset + draw) (the loop walks draw indices, so that warp tiles hold whole Philox blocks);
// adafactor_phase5_f32 ignores seed, stream and rounding. Without decay (decay == 1)
// and momentum, the rows of factored segments whose row_sq is 0 are skipped (their U is zero).
// Launch: blockDim.x = 256 (any multiple of 32), grid (X, 1, segments), any X >= 1, as phase 1.
// ------------------------------------------------------------------------------------------------

template <typename P>
__device__ __forceinline__ void phase5_run(const float* variance, const float* row_var, const double* col_part,
                                           const double* row_sq, float* exp_avg,
                                           const AdafactorSegment* segs, const AdafactorScalars* scalars,
                                           float sign, float clamp_eps, u32 momentum, float beta1, u64 seed,
                                           u32 stream, u32 rounding) {
    const AdafactorSegment s = segs[blockIdx.z];
    const AdafactorScalars k = scalars[blockIdx.z];
    const bool draw = needs_draws(static_cast<const P*>(nullptr), rounding);
    const float momentum_weight = 1.0f - beta1;
    const bool skip_zero_rows = k.decay == 1.0f && !momentum;
    // Loops walk draw indices d; the element's index is d - shift (wrapping arithmetic).
    const u64 shift = s.draw - s.offset;
    // An element's inputs: aux is its column's factor (factored) or its variance (unfactored).
    struct In {
        float p, g, aux, m;
    };
    auto load_with = [&](const float* aux, u64 aux_base) {
        return [=](u64 d) {
            const u64 i = d - shift;
            return In{load_param(seg_param<P>(s, i), 0), load_param(seg_grad<P>(s, i), 0), aux[i - aux_base],
                      momentum ? exp_avg[i] : 0.0f};
        };
    };
    // The CPU's `apply` closure: decay, then the plain or momentum update.
    auto finish = [&](u64 d, const In& in, float upd, u32 r16) {
        const u64 i = d - shift;
        const float decayed = k.decay != 1.0f ? in.p * k.decay : in.p;
        float out;
        if (momentum) {
            const float m = torch_lerp(in.m, upd * k.scale, momentum_weight);
            exp_avg[i] = m;
            out = decayed + k.neg_alpha * m;
        } else {
            out = decayed + k.scale * upd;
        }
        store_param(seg_param<P>(s, i), 0, out, rounding, r16);
    };
    for (u64 u = seg_warp_id(); u < s.units; u += seg_warp_count()) {
        u64 first, last;
        unit_range(s, u, first, last);
        if (s.factored) {
            // A row of zero gradients has zero updates: without decay or momentum its parameters
            // stay as they are, and it is skipped, as on the CPU.
            if (skip_zero_rows && row_sq[s.row_offset + u] == 0.0) {
                continue;
            }
            const u64 b = u / s.rows;
            const float a = inv_root_ratio(row_var[s.row_offset + u], 1.0f);
            const float* cf = col_factors(col_part, s) + b * s.cols;
            warp_for_range(first + shift, last + shift, draw, seed, s.step, stream, load_with(cf, first),
                           [&](u64 i, const In& in, u32 r16) {
                               finish(i, in, factored_update(in.g, a, in.aux, sign, clamp_eps), r16);
                           });
        } else {
            const float* var = variance + s.var_offset;
            warp_for_range(first + shift, last + shift, draw, seed, s.step, stream, load_with(var, s.offset),
                           [&](u64 i, const In& in, u32 r16) {
                               finish(i, in, inv_root(in.aux, clamp_eps) * (sign * in.g), r16);
                           });
        }
    }
}

extern "C" __global__ void adafactor_phase5_f32(const float* variance, const float* row_var, const double* col_part,
                                                const double* row_sq, float* exp_avg, const AdafactorSegment* segs,
                                                const AdafactorScalars* scalars, float sign, float clamp_eps,
                                                u32 momentum, float beta1, u64 seed, u32 stream, u32 rounding) {
    phase5_run<float>(variance, row_var, col_part, row_sq, exp_avg, segs, scalars, sign, clamp_eps, momentum, beta1,
                      seed, stream, rounding);
}

extern "C" __global__ void adafactor_phase5_bf16(const float* variance, const float* row_var, const double* col_part,
                                                 const double* row_sq, float* exp_avg, const AdafactorSegment* segs,
                                                 const AdafactorScalars* scalars, float sign, float clamp_eps,
                                                 u32 momentum, float beta1, u64 seed, u32 stream, u32 rounding) {
    phase5_run<bf16>(variance, row_var, col_part, row_sq, exp_avg, segs, scalars, sign, clamp_eps, momentum, beta1,
                     seed, stream, rounding);
}
