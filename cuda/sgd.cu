// sgd.cu: SGD with momentum, dampening, Nesterov momentum and L2 weight decay (torch.optim.SGD),
// elementwise over one run [start, end) of a param group's flat buffers. Mirrors
// rust/core/src/rules/sgd.rs `SgdKernel::apply` operation for operation:
//
//   d = g                       negated (sign bit flipped) when maximizing
//   d = d + p * weight_decay    when weight_decay != 0
//   momentum on:
//     b = d                                          first step of the tensor
//     b = b * momentum + d * one_minus_dampening     afterwards
//     d = d + b * momentum   if nesterov   else   b
//   p = p + d * neg_lr
//
// A run holds tensors that share a step count (segments.rs `Run`); the host launches once per run.

#include "common.cuh"

// SgdKernel's constants for one run, computed by the host in f64 and rounded once to f32, exactly
// as sgd.rs does (neg_lr = -lr as f32, one_minus_dampening = (1 - dampening) as f32, ...).
// Passed BY VALUE. Layout (Rust: #[repr(C)] with the same fields, flags as u32):
//   offset  0  f32 neg_lr
//   offset  4  f32 weight_decay
//   offset  8  f32 momentum
//   offset 12  f32 one_minus_dampening
//   offset 16  u32 use_momentum   (0 / 1: momentum != 0)
//   offset 20  u32 first_step     (0 / 1: run.step == 1)
//   offset 24  u32 nesterov       (0 / 1)
//   offset 28  u32 maximize       (0 / 1)
//   size 32, alignment 4
struct SgdConsts {
    float neg_lr;
    float weight_decay;
    float momentum;
    float one_minus_dampening;
    u32 use_momentum;
    u32 first_step;
    u32 nesterov;
    u32 maximize;
};
static_assert(sizeof(SgdConsts) == 32 && alignof(SgdConsts) == 4, "SgdConsts layout");

template <typename P>
__device__ __forceinline__ void sgd_run(P* param, const P* grad, float* momentum_buffer, u64 start, u64 end,
                                        const SgdConsts& k, u64 seed, u64 step, u32 stream, u32 rounding) {
    struct In {
        float p, g, b;
    };
    const bool reads_buffer = k.use_momentum && !k.first_step;
    auto load = [&](u64 i) {
        return In{load_param(param, i), load_param(grad, i), reads_buffer ? momentum_buffer[i] : 0.0f};
    };
    auto apply = [&](u64 i, const In& in, u32 r16) {
        float d = in.g;
        if (k.maximize) {
            d = neg_bits(d);
        }
        if (k.weight_decay != 0.0f) {
            d = d + in.p * k.weight_decay;
        }
        if (k.use_momentum) {
            float b;
            if (k.first_step) {
                b = d;
            } else {
                b = in.b * k.momentum + d * k.one_minus_dampening;
            }
            momentum_buffer[i] = b;
            d = k.nesterov ? d + b * k.momentum : b;
        }
        store_param(param, i, in.p + d * k.neg_lr, rounding, r16);
    };
    grid_for_range(start, end, needs_draws(param, rounding), seed, step, stream, load, apply);
}

extern "C" __global__ void sgd_f32(float* param, const float* grad, float* momentum_buffer, u64 start, u64 end,
                                   SgdConsts k, u64 seed, u64 step, u32 stream, u32 rounding) {
    sgd_run(param, grad, momentum_buffer, start, end, k, seed, step, stream, rounding);
}

extern "C" __global__ void sgd_bf16(bf16* param, const bf16* grad, float* momentum_buffer, u64 start, u64 end,
                                    SgdConsts k, u64 seed, u64 step, u32 stream, u32 rounding) {
    sgd_run(param, grad, momentum_buffer, start, end, k, seed, step, stream, rounding);
}
