// adam.cu: Adam and AdamW (torch.optim.Adam / AdamW, with or without amsgrad), elementwise over a
// list of a param group's tensors (common.cuh `TensorList`). Mirrors rust/core/src/rules/adam.rs
// `AdamConsts::apply` operation for operation:
//
//   g = g                         negated (sign bit flipped) when maximizing
//   g = g + p * l2                when l2 != 0            (Adam's L2 penalty)
//   p = p * decay                 when decay != 1         (AdamW's decoupled decay)
//   m = m + lerp_weight * (g - m)           when lerp_weight < 0.5     (torch's lerp)
//     = g - (g - m) * lerp_complement       otherwise
//   v = v * beta2 + (one_minus_beta2 * g) * g
//   v_max = max(v, v_max)                  when amsgrad (the running maximum, kept as state)
//   denom = sqrt(v) / bias_correction2_sqrt + eps          (sqrt(v_max) with amsgrad)
//   p = p + (neg_step_size * m) / denom
//
// lerp_complement is the host's f32 `1 - lerp_weight`, passed rather than recomputed, as the CPU
// kernel does. In a plain step the tensors of a list share a step count (so one set of bias
// corrections, computed by the host); in a counted step (capturable=True) each tensor's count and
// the learning rate are read on the device and adam_consts() below computes the bias corrections
// there (common.cuh `CountedScalars`). The host launches once per list of at most 84 tensors.

#include "common.cuh"

// AdamConsts: the constants of one list, computed by the host exactly as `AdamConsts::new` does
// (scalars in f64, each rounded once to f32). Passed BY VALUE. Layout (Rust: #[repr(C)], the
// flag as u32):
//   offset  0  f32 lerp_weight            (1 - beta1) as f32
//   offset  4  f32 lerp_complement        1.0f32 - lerp_weight
//   offset  8  f32 beta2
//   offset 12  f32 one_minus_beta2        (1 - beta2) as f32
//   offset 16  f32 neg_step_size          -(lr / (1 - beta1^t)) as f32
//   offset 20  f32 bias_correction2_sqrt  sqrt(1 - beta2^t) as f32
//   offset 24  f32 eps
//   offset 28  f32 l2                     weight_decay (Adam) or 0 (AdamW)
//   offset 32  f32 decay                  (1 - lr * weight_decay) as f32 (AdamW) or 1
//   offset 36  u32 maximize               0 / 1
//   offset 40  u32 amsgrad                0 / 1
//   size 44, alignment 4
struct AdamConsts {
    float lerp_weight;
    float lerp_complement;
    float beta2;
    float one_minus_beta2;
    float neg_step_size;
    float bias_correction2_sqrt;
    float eps;
    float l2;
    float decay;
    u32 maximize;
    u32 amsgrad;
};
static_assert(sizeof(AdamConsts) == 44 && alignof(AdamConsts) == 4, "AdamConsts layout");

// AdamHyper of a counted step (capturable=True): the core's AdamHyper with the learning rate's
// source; adam_consts() is `AdamConsts::new` operation for operation (f64, each constant rounded
// once to f32). Layout (Rust: #[repr(C)], rust/cuda dispatch.rs `AdamCountedHyper`):
//   offset  0  LrSource lr          (24 bytes)
//   offset 24  f64 beta1
//   offset 32  f64 beta2
//   offset 40  f64 eps
//   offset 48  f64 weight_decay
//   offset 56  u32 decoupled_weight_decay
//   offset 60  u32 maximize
//   offset 64  u32 amsgrad
//   offset 68  u32 pad
//   size 72, alignment 8
struct AdamCountedHyper {
    LrSource lr;
    double beta1;
    double beta2;
    double eps;
    double weight_decay;
    u32 decoupled_weight_decay;
    u32 maximize;
    u32 amsgrad;
    u32 pad;
};
static_assert(sizeof(AdamCountedHyper) == 72 && alignof(AdamCountedHyper) == 8, "AdamCountedHyper layout");

__device__ __forceinline__ AdamConsts adam_consts(const AdamCountedHyper& h, double lr, u64 step) {
    const double t = (double)step;
    const double bias_correction1 = 1.0 - pow(h.beta1, t);
    const double bias_correction2 = 1.0 - pow(h.beta2, t);
    AdamConsts k;
    k.lerp_weight = (float)(1.0 - h.beta1);
    k.lerp_complement = 1.0f - k.lerp_weight;
    k.beta2 = (float)h.beta2;
    k.one_minus_beta2 = (float)(1.0 - h.beta2);
    k.neg_step_size = (float)(-(lr / bias_correction1));
    k.bias_correction2_sqrt = (float)sqrt(bias_correction2);
    k.eps = (float)h.eps;
    k.l2 = h.decoupled_weight_decay ? 0.0f : (float)h.weight_decay;
    k.decay = h.decoupled_weight_decay ? (float)(1.0 - lr * h.weight_decay) : 1.0f;
    k.maximize = h.maximize;
    k.amsgrad = h.amsgrad;
    return k;
}

template <typename P, class Scalars>
__device__ __forceinline__ void adam_list(const TensorList& list, float* exp_avg, float* exp_avg_sq,
                                          float* max_exp_avg_sq, Scalars& sc, u64 seed, u32 stream, u32 rounding) {
    struct In {
        float p, g, m, v;
    };
    auto load = [&](u32 j, u64 i) {
        return In{load_param(element_at<P>(list.param[j], list.start[j], i), 0),
                  load_param(element_at<P>(list.grad[j], list.start[j], i), 0), exp_avg[list_state(list, j, i)],
                  exp_avg_sq[list_state(list, j, i)]};
    };
    auto apply = [&](u32 j, u64 i, const In& in, u32 r16) {
        const AdamConsts& k = sc.consts(j);
        float p = in.p;
        float g = in.g;
        float m = in.m;
        float v = in.v;
        if (k.maximize) {
            g = neg_bits(g);
        }
        if (k.l2 != 0.0f) {
            g = g + p * k.l2;
        }
        if (k.decay != 1.0f) {
            p = p * k.decay;
        }
        // torch's lerp, with the host's complement (not torch_lerp(), which recomputes 1 - w).
        if (k.lerp_weight < 0.5f) {
            m = m + k.lerp_weight * (g - m);
        } else {
            m = g - (g - m) * k.lerp_complement;
        }
        v = v * k.beta2 + k.one_minus_beta2 * g * g;  // (one_minus_beta2 * g) * g, left to right
        const u64 si = list_state(list, j, i);
        float v_denom = v;
        if (k.amsgrad) {
            v_denom = fmaxf(v, max_exp_avg_sq[si]);  // f32::max: a NaN v gives the running maximum
            max_exp_avg_sq[si] = v_denom;
        }
        const float denom = sqrtf(v_denom) / k.bias_correction2_sqrt + k.eps;
        p = p + k.neg_step_size * m / denom;  // (neg_step_size * m) / denom
        exp_avg[si] = m;
        exp_avg_sq[si] = v;
        store_param(element_at<P>(list.param[j], list.start[j], i), 0, p, rounding, r16);
    };
    grid_for_list(list, needs_draws(static_cast<const P*>(nullptr), rounding), seed, sc, stream, load, apply);
}

// Launch: 1-D, blockDim.x = 256 (any multiple of 32), any gridDim.x >= 1 (the grid's warps stride
// over the list's warp tiles; ceil(tiles / 8) blocks give every warp one tile, tiles =
// list.tile_end[list.count - 1]). State is flat: exp_avg[si], exp_avg_sq[si] and, with k.amsgrad,
// max_exp_avg_sq[si] (null otherwise), si = list_state(list, j, i) for the element of draw index i
// of tensor j. seed / step / stream / rounding are ignored by adam_f32; adam_bf16 rounds with
// ROUND_NEAREST (0) or ROUND_STOCHASTIC (1), the draw of element i being random_u16(seed, step,
// stream, i), step = the step count every tensor of the list shares.
extern "C" __global__ void adam_f32(const __grid_constant__ TensorList list, float* exp_avg, float* exp_avg_sq,
                                    float* max_exp_avg_sq, AdamConsts k, u64 seed, u64 step, u32 stream,
                                    u32 rounding) {
    SharedScalars<AdamConsts> sc{k, step};
    adam_list<float>(list, exp_avg, exp_avg_sq, max_exp_avg_sq, sc, seed, stream, rounding);
}

extern "C" __global__ void adam_bf16(const __grid_constant__ TensorList list, float* exp_avg, float* exp_avg_sq,
                                     float* max_exp_avg_sq, AdamConsts k, u64 seed, u64 step, u32 stream,
                                     u32 rounding) {
    SharedScalars<AdamConsts> sc{k, step};
    adam_list<bf16>(list, exp_avg, exp_avg_sq, max_exp_avg_sq, sc, seed, stream, rounding);
}

// Counted steps (capturable=True): as adam_f32 / adam_bf16, but tensor j takes step
// counters[where.base + where.delta[j]] + 1 with the constants adam_consts(h, lr, step) (the counts
// are not changed here: advance_step_counters follows). The tensors of a list may be at different
// counts.
extern "C" __global__ void adam_counted_f32(const __grid_constant__ TensorList list, float* exp_avg, float* exp_avg_sq,
                                            float* max_exp_avg_sq, AdamCountedHyper h, const double* counters,
                                            const __grid_constant__ ListCounters where, u64 seed, u32 stream,
                                            u32 rounding) {
    const double lr = read_lr(h.lr);
    auto sc = counted_scalars<AdamConsts>(counters, where, [&](u64 step) { return adam_consts(h, lr, step); });
    adam_list<float>(list, exp_avg, exp_avg_sq, max_exp_avg_sq, sc, seed, stream, rounding);
}

extern "C" __global__ void adam_counted_bf16(const __grid_constant__ TensorList list, float* exp_avg,
                                             float* exp_avg_sq, float* max_exp_avg_sq, AdamCountedHyper h,
                                             const double* counters, const __grid_constant__ ListCounters where,
                                             u64 seed, u32 stream, u32 rounding) {
    const double lr = read_lr(h.lr);
    auto sc = counted_scalars<AdamConsts>(counters, where, [&](u64 step) { return adam_consts(h, lr, step); });
    adam_list<bf16>(list, exp_avg, exp_avg_sq, max_exp_avg_sq, sc, seed, stream, rounding);
}
