// test_kernels.cu: small kernels that pin down the emulator's semantics (barriers, shuffles,
// index variables, launch order, divergence reports, argument passing). Compiled exactly like the
// kernels of cuda/, and launched only by this crate's tests.

typedef unsigned int u32;
typedef unsigned long long u64;

#define FULL_MASK 0xFFFFFFFFu

// The linear index of the calling thread in its block, and of its block in the grid (x fastest).
__device__ __forceinline__ u32 thread_linear() {
    return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
}

__device__ __forceinline__ u32 block_linear() {
    return blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
}

// out[b] = sum of in[b * blockDim.x + t] over the block's threads t, by a tree in shared memory
// with a barrier between levels (blockDim.x a power of two, 1-D blocks).
extern "C" __global__ void emu_test_block_sum(const u32* in, u64* out) {
    __shared__ u64 partial[1024];
    const u32 t = threadIdx.x;
    partial[t] = in[(u64)blockIdx.x * blockDim.x + t];
    __syncthreads();
    for (u32 half = blockDim.x / 2; half > 0; half /= 2) {
        if (t < half) {
            partial[t] += partial[t + half];
        }
        __syncthreads();
    }
    if (t == 0) {
        out[blockIdx.x] = partial[0];
    }
}

// What each thread of emu_test_shuffles saw (the Rust test mirrors this layout).
struct ShuffleResults {
    u32 broadcast;          // lane src_lane's value
    u32 rotated;            // lane (lane + 1) % 32's value
    int rotated_back;       // as int, from lane (lane + 31) % 32
    float broadcast_float;  // lane src_lane's value as float
    double butterfly_sum;   // sum over the warp by an xor butterfly, as double
    u64 rotated_u64;        // as u64 (with high bits set), from lane (lane + 5) % 32
    u32 up3;                // __shfl_up_sync by 3 (lanes 0..2 keep their own)
    u32 down3;              // __shfl_down_sync by 3 (lanes 29..31 keep their own)
    u32 ballot_odd;         // ballot of "value is odd"
    u32 segment_broadcast;  // lane 2 of the lane's 8-lane segment
    u32 segment_xor8;       // xor 8 at width 8: out of reach, the lane's own value
    u32 any_all;            // bit 0: any value > 1000; bit 1: all values < 2^31
};

// Thread g (linear over the grid) shuffles in[g]; results[g] gets what it received.
extern "C" __global__ void emu_test_shuffles(const u32* in, ShuffleResults* results, u32 src_lane) {
    const u64 g = (u64)block_linear() * (blockDim.x * blockDim.y * blockDim.z) + thread_linear();
    const u32 lane = thread_linear() & 31u;
    const u32 v = in[g];
    ShuffleResults r;
    r.broadcast = __shfl_sync(FULL_MASK, v, (int)src_lane);
    r.rotated = __shfl_sync(FULL_MASK, v, (int)((lane + 1) & 31u));
    r.rotated_back = __shfl_sync(FULL_MASK, (int)v, (int)((lane + 31) & 31u));
    r.broadcast_float = __shfl_sync(FULL_MASK, (float)v, (int)src_lane);
    double s = (double)v;
    for (int k = 16; k > 0; k >>= 1) {
        s += __shfl_xor_sync(FULL_MASK, s, k);
    }
    r.butterfly_sum = s;
    r.rotated_u64 = __shfl_sync(FULL_MASK, ((u64)v << 32) | 0xABCDu, (int)((lane + 5) & 31u));
    r.up3 = __shfl_up_sync(FULL_MASK, v, 3);
    r.down3 = __shfl_down_sync(FULL_MASK, v, 3);
    r.ballot_odd = __ballot_sync(FULL_MASK, v & 1u);
    r.segment_broadcast = __shfl_sync(FULL_MASK, v, 2, 8);
    r.segment_xor8 = __shfl_xor_sync(FULL_MASK, v, 8, 8);
    r.any_all = (__any_sync(FULL_MASK, v > 1000u) ? 1u : 0u) | (__all_sync(FULL_MASK, v < 0x80000000u) ? 2u : 0u);
    __syncwarp();
    results[g] = r;
}

// Thread g (linear over the grid) writes its index variables to out[16 g ..], and in
// out[16 g + 12] its position in the order in which the emulator ran the threads (*counter counts
// them: only the emulator's strictly sequential schedule makes this unsynchronised increment exact).
extern "C" __global__ void emu_test_indices(u32* out, u32* counter) {
    const u64 g = (u64)block_linear() * (blockDim.x * blockDim.y * blockDim.z) + thread_linear();
    u32* o = out + 16 * g;
    o[0] = threadIdx.x;
    o[1] = threadIdx.y;
    o[2] = threadIdx.z;
    o[3] = blockIdx.x;
    o[4] = blockIdx.y;
    o[5] = blockIdx.z;
    o[6] = blockDim.x;
    o[7] = blockDim.y;
    o[8] = blockDim.z;
    o[9] = gridDim.x;
    o[10] = gridDim.y;
    o[11] = gridDim.z;
    o[12] = (*counter)++;
}

// In block `bad_block` (linear), the first half of the threads return before a barrier that the
// other half waits at; every other block passes the barrier and sets out[block] = 1.
extern "C" __global__ void emu_test_exit_before_barrier(u32 bad_block, u32* out) {
    if (block_linear() == bad_block && thread_linear() < blockDim.x / 2) {
        return;
    }
    __syncthreads();
    if (thread_linear() == 0) {
        out[block_linear()] = 1;
    }
}

// Odd and even threads wait at different barriers.
extern "C" __global__ void emu_test_split_barriers(u32* out) {
    if (threadIdx.x & 1u) {
        __syncthreads();
    } else {
        __syncthreads();
    }
    out[threadIdx.x] = 1;
}

// The upper half of each warp returns before a shuffle the lower half waits at.
extern "C" __global__ void emu_test_exit_before_shuffle(u32* out) {
    const u32 lane = threadIdx.x & 31u;
    if (lane >= 16) {
        return;
    }
    out[threadIdx.x] = __shfl_sync(FULL_MASK, lane, 0);
}

// Lanes 0..15 of warp 0 wait at a barrier while their warp-mates wait at a shuffle.
extern "C" __global__ void emu_test_barrier_against_shuffle(u32* out) {
    if (threadIdx.x < 16) {
        __syncthreads();
    } else {
        out[threadIdx.x] = __shfl_sync(FULL_MASK, threadIdx.x, 0);
    }
}

// A shuffle over half a warp, which the emulator does not model.
extern "C" __global__ void emu_test_partial_mask(u32* out) {
    out[threadIdx.x] = __shfl_sync(0x0000FFFFu, threadIdx.x, 0);
}

// A shuffle, for blocks that are not whole warps.
extern "C" __global__ void emu_test_shuffle_only(u32* out) {
    out[threadIdx.x] = __shfl_sync(FULL_MASK, threadIdx.x, 0);
}

// A struct passed by value, as the optimizer kernels take their constants.
struct PackedArgs {
    double scale;
    u32 count;
    float offset;
};

// out[i] = (float)(i * scale) + offset for i < count, by one thread.
extern "C" __global__ void emu_test_struct_arg(float* out, PackedArgs args) {
    if (threadIdx.x != 0 || blockIdx.x != 0) {
        return;
    }
    for (u32 i = 0; i < args.count; ++i) {
        out[i] = (float)(i * args.scale) + args.offset;
    }
}

// The bit-cast and integer intrinsics, by thread 0, for inputs a[i], b[i] (i < n): 13 results per
// input pair in out[16 i ..].
extern "C" __global__ void emu_test_intrinsics(const u64* a, const u64* b, u64 n, u64* out) {
    if (threadIdx.x != 0) {
        return;
    }
    for (u64 i = 0; i < n; ++i) {
        const u32 a32 = (u32)a[i], b32 = (u32)b[i];
        u64* o = out + 16 * i;
        o[0] = __umulhi(a32, b32);
        o[1] = __umul64hi(a[i], b[i]);
        o[2] = __float_as_uint(__uint_as_float(a32));
        o[3] = (u32)__float_as_int(__int_as_float((int)b32));
        o[4] = __float_as_uint(__uint_as_float(a32) + 1.0f);
        o[5] = (u64)__double_as_longlong(__longlong_as_double((long long)a[i]) * 2.0);
        o[6] = (u64)__popc(a32);
        o[7] = (u64)__popcll(a[i]);
        o[8] = (u64)__clz((int)a32);
        o[9] = (u64)__clzll((long long)a[i]);
        o[10] = (u64)__ffs((int)a32);
        o[11] = (u64)__ffsll((long long)a[i]);
        o[12] = __ldg(&b[i]);
        o[13] = o[14] = o[15] = 0;
    }
}

// A kernel without parameters: the launch path must handle an empty argument list.
extern "C" __global__ void emu_test_no_params() {
}
