// sgd.cu: SGD with momentum, dampening, Nesterov momentum and L2 weight decay (torch.optim.SGD),
// elementwise over a list of a param group's tensors (common.cuh `TensorList`). Mirrors
// rust/core/src/rules/sgd.rs `SgdConsts::apply` operation for operation:
//
//   d = g                       negated (sign bit flipped) when maximizing
//   d = d + p * weight_decay    when weight_decay != 0
//   momentum on:
//     b = d                                          first step of the tensor
//     b = b * momentum + d * one_minus_dampening     afterwards
//     d = d + b * momentum   if nesterov   else   b
//   p = p + d * neg_lr
//
// In a plain step the tensors of a list share a step count, and the host computes the list's
// constants; in a counted step (capturable=True) each tensor's count and the learning rate are read
// on the device (common.cuh `CountedScalars`). The host launches once per list of at most 84 tensors.

#include "common.cuh"

// SgdConsts: the constants of one list, computed by the host in f64 and rounded once to f32, exactly
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

// One element's update: sgd.rs `SgdConsts::apply`, returning the weight before rounding and the
// new momentum buffer (in.b when momentum is off).
struct SgdIn {
    float p, g, b;
};

struct SgdOut {
    float p, b;
};

__device__ __forceinline__ SgdOut sgd_update(const SgdConsts& k, const SgdIn& in) {
    float d = in.g;
    if (k.maximize) {
        d = neg_bits(d);
    }
    if (k.weight_decay != 0.0f) {
        d = d + in.p * k.weight_decay;
    }
    float b = in.b;
    if (k.use_momentum) {
        if (k.first_step) {
            b = d;
        } else {
            b = in.b * k.momentum + d * k.one_minus_dampening;
        }
        d = k.nesterov ? d + b * k.momentum : b;
    }
    return SgdOut{in.p + d * k.neg_lr, b};
}

// SgdHyper of a counted step (capturable=True): the core's SgdHyper with the learning rate's
// source; sgd_consts() below is `SgdConsts::new` operation for operation. Layout (Rust:
// #[repr(C)], rust/cuda dispatch.rs `SgdCountedHyper`):
//   offset  0  LrSource lr          (24 bytes)
//   offset 24  f64 momentum
//   offset 32  f64 dampening
//   offset 40  f64 weight_decay
//   offset 48  u32 nesterov
//   offset 52  u32 maximize
//   size 56, alignment 8
struct SgdCountedHyper {
    LrSource lr;
    double momentum;
    double dampening;
    double weight_decay;
    u32 nesterov;
    u32 maximize;
};
static_assert(sizeof(SgdCountedHyper) == 56 && alignof(SgdCountedHyper) == 8, "SgdCountedHyper layout");

__device__ __forceinline__ SgdConsts sgd_consts(const SgdCountedHyper& h, double lr, u64 step) {
    SgdConsts k;
    k.neg_lr = (float)(-lr);
    k.weight_decay = (float)h.weight_decay;
    k.momentum = (float)h.momentum;
    k.one_minus_dampening = (float)(1.0 - h.dampening);
    k.use_momentum = h.momentum != 0.0 ? 1u : 0u;
    k.first_step = step == 1 ? 1u : 0u;
    k.nesterov = h.nesterov;
    k.maximize = h.maximize;
    return k;
}

template <typename P, class Scalars>
__device__ __forceinline__ void sgd_list(const TensorList& list, float* momentum_buffer, Scalars& sc, u64 seed,
                                         u32 stream, u32 rounding) {
    auto load = [&](u32 j, u64 i) {
        const SgdConsts& k = sc.consts(j);
        return SgdIn{load_param(element_at<P>(list.param[j], list.start[j], i), 0),
                     load_param(element_at<P>(list.grad[j], list.start[j], i), 0),
                     k.use_momentum && !k.first_step ? momentum_buffer[list_state(list, j, i)] : 0.0f};
    };
    auto apply = [&](u32 j, u64 i, const SgdIn& in, u32 r16) {
        const SgdConsts& k = sc.consts(j);
        const SgdOut out = sgd_update(k, in);
        if (k.use_momentum) {
            momentum_buffer[list_state(list, j, i)] = out.b;
        }
        store_param(element_at<P>(list.param[j], list.start[j], i), 0, out.p, rounding, r16);
    };
    grid_for_list(list, needs_draws(static_cast<const P*>(nullptr), rounding), seed, sc, stream, load, apply);
}

// bf16 weights, whole 256-element tiles: lane j takes the tile's elements 8j .. 8j+7, whose draws
// are all in its own Philox block (no shuffles), with 16-byte loads and stores. In the
// warp-interleaved loop a bf16 element costs about the instructions of an f32 one for half the
// bytes: SGD with stochastic rounding was bound by instruction issue there (H100: 81% of copy
// bandwidth, the schedulers issuing on 71% of cycles). `param` and `grad` are the addresses of the
// tensor's element 0, whose draw index is `start` and state index `state`; 16-byte accesses of
// whole tiles must be aligned in all three.
__device__ __forceinline__ void sgd_bf16_tile(u64 param, u64 grad, u64 start, u64 state, float* momentum_buffer,
                                              u64 tile, const SgdConsts& k, u64 seed, u64 step, u32 stream,
                                              u32 rounding) {
    const u64 i0 = (tile << TILE_SHIFT) + 8u * (threadIdx.x & 31u);
    Words4* pw = reinterpret_cast<Words4*>(element_at<bf16>(param, start, i0));
    const Words4 p = *pw;
    const Words4 g = *reinterpret_cast<const Words4*>(element_at<bf16>(grad, start, i0));
    float* buf = momentum_buffer + (state + (i0 - start));
    Floats4 b[2] = {};
    if (k.use_momentum && !k.first_step) {
        b[0] = *reinterpret_cast<const Floats4*>(buf);
        b[1] = *reinterpret_cast<const Floats4*>(buf + 4);
    }
    const bool stochastic = rounding == ROUND_STOCHASTIC;
    const Philox4 o = stochastic ? philox_block(seed, step, stream, i0 >> 3) : Philox4{0u, 0u, 0u, 0u};
    Words4 out_p = {};
#pragma unroll
    for (u32 e = 0; e < 8; ++e) {
        const SgdIn in{bf16_to_f32(bf16_of(p, e)), bf16_to_f32(bf16_of(g, e)), b[e >> 2].f[e & 3u]};
        const SgdOut out = sgd_update(k, in);
        b[e >> 2].f[e & 3u] = out.b;
        const u16 bits = stochastic ? round_bf16_stochastic(out.p, block_draw(o, e)) : round_bf16_nearest(out.p);
        out_p.w[e >> 1] |= (u32)bits << (16u * (e & 1u));
    }
    *pw = out_p;
    if (k.use_momentum) {
        *reinterpret_cast<Floats4*>(buf) = b[0];
        *reinterpret_cast<Floats4*>(buf + 4) = b[1];
    }
}

// bf16 lists: tiles that lie wholly inside a tensor whose 16-byte accesses are aligned go through
// sgd_bf16_tile (flat-buffer offsets that are multiples of 8, as a model's matrices have, keep
// them aligned), the others through the generic loop: the same bits either way.
template <class Scalars>
__device__ __forceinline__ void sgd_bf16_list(const TensorList& list, float* momentum_buffer, Scalars& sc, u64 seed,
                                              u32 stream, u32 rounding) {
    const u64 tiles = list.count > 0 ? list.tile_end[list.count - 1] : 0;
    const u64 warps = grid_warp_count();
    const bool state_aligned = ((u64)momentum_buffer & 15u) == 0;
    const bool draw = rounding == ROUND_STOCHASTIC;
    u32 j = 0;
    for (u64 t = grid_warp_id(); t < tiles; t += warps) {
        while (list.tile_end[j] <= t) {
            ++j;
        }
        const SgdConsts& k = sc.consts(j);
        const u64 step = sc.step(j);
        const bool reads_buffer = k.use_momentum && !k.first_step;
        const u64 start = list.start[j];
        const u64 end = start + list.numel[j];
        const u64 tile = (start >> TILE_SHIFT) + (t - (j > 0 ? list.tile_end[j - 1] : 0));
        const u64 base = tile << TILE_SHIFT;
        const u64 param = list.param[j];
        const u64 grad = list.grad[j];
        const u64 state = list.state[j];
        const bool whole = base >= start && base + TILE_ELEMS <= end;
        const bool aligned = state_aligned && ((param - 2u * start) & 15u) == 0 &&
                             ((grad - 2u * start) & 15u) == 0 && ((state - start) & 3u) == 0;
        if (whole && aligned) {
            sgd_bf16_tile(param, grad, start, state, momentum_buffer, tile, k, seed, step, stream, rounding);
            continue;
        }
        warp_for_range(
            max_u64(start, base), min_u64(end, base + TILE_ELEMS), draw, seed, step, stream,
            [&](u64 i) {
                return SgdIn{load_param(element_at<bf16>(param, start, i), 0),
                             load_param(element_at<bf16>(grad, start, i), 0), reads_buffer ? momentum_buffer[list_state(list, j, i)] : 0.0f};
            },
            [&](u64 i, const SgdIn& in, u32 r16) {
                const SgdOut out = sgd_update(k, in);
                if (k.use_momentum) {
                    momentum_buffer[list_state(list, j, i)] = out.b;
                }
                store_param(element_at<bf16>(param, start, i), 0, out.p, rounding, r16);
            });
    }
}

// Launch: 1-D, blockDim.x = 256 (any multiple of 32), any gridDim.x >= 1 (the grid's warps stride
// over the list's warp tiles; ceil(tiles / 8) blocks give every warp one tile, tiles =
// list.tile_end[list.count - 1]). State is flat: momentum_buffer[list_state(list, j, i)] for the
// element of draw index i of tensor j; momentum_buffer may be null when k.use_momentum == 0.
// seed / step / stream / rounding are ignored by sgd_f32; sgd_bf16 rounds with ROUND_NEAREST (0)
// or ROUND_STOCHASTIC (1), the draw of element i being random_u16(seed, step, stream, i), step =
// the step count every tensor of the list shares.
extern "C" __global__ void sgd_f32(const __grid_constant__ TensorList list, float* momentum_buffer, SgdConsts k,
                                   u64 seed, u64 step, u32 stream, u32 rounding) {
    SharedScalars<SgdConsts> sc{k, step};
    sgd_list<float>(list, momentum_buffer, sc, seed, stream, rounding);
}

extern "C" __global__ void sgd_bf16(const __grid_constant__ TensorList list, float* momentum_buffer, SgdConsts k,
                                    u64 seed, u64 step, u32 stream, u32 rounding) {
    SharedScalars<SgdConsts> sc{k, step};
    sgd_bf16_list(list, momentum_buffer, sc, seed, stream, rounding);
}

// Counted steps (capturable=True): as sgd_f32 / sgd_bf16, but tensor j takes step
// counters[where.base + where.delta[j]] + 1 with the constants sgd_consts(h, lr, step) (the
// counts are not changed here: advance_step_counters follows). The tensors of a list may be at
// different counts.
extern "C" __global__ void sgd_counted_f32(const __grid_constant__ TensorList list, float* momentum_buffer,
                                           SgdCountedHyper h, const double* counters,
                                           const __grid_constant__ ListCounters where, u64 seed, u32 stream,
                                           u32 rounding) {
    const double lr = read_lr(h.lr);
    auto sc = counted_scalars<SgdConsts>(counters, where, [&](u64 step) { return sgd_consts(h, lr, step); });
    sgd_list<float>(list, momentum_buffer, sc, seed, stream, rounding);
}

extern "C" __global__ void sgd_counted_bf16(const __grid_constant__ TensorList list, float* momentum_buffer,
                                            SgdCountedHyper h, const double* counters,
                                            const __grid_constant__ ListCounters where, u64 seed, u32 stream,
                                            u32 rounding) {
    const double lr = read_lr(h.lr);
    auto sc = counted_scalars<SgdConsts>(counters, where, [&](u64 step) { return sgd_consts(h, lr, step); });
    sgd_bf16_list(list, momentum_buffer, sc, seed, stream, rounding);
}
