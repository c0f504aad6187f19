// cuda_shim.h: the CUDA built-ins the kernels in cuda/ use, for compiling those kernels as plain
// C++17 for the CPU (g++ -x c++ -std=c++17 -ffp-contract=off -include cuda_shim.h file.cu).
// It owns the qualifier macros, the index variables, barriers, warp shuffles and the bit-cast and
// integer intrinsics; emu_runtime.cpp owns the fibers and the scheduler that run the threads.
//
// Emulated threads are fibers of the launching OS thread (see emu_runtime.cpp), so:
// - every thread of the launch shares the OS thread's thread-local storage: the index variables
//   are one thread-local record that the scheduler rewrites before it resumes a fiber, and
//   shared memory is thread-local storage too (one block runs at a time on an OS thread, and
//   different OS threads may run launches concurrently);
// - a barrier or a shuffle is an opaque call into the runtime that may switch fibers, so the
//   compiler must keep memory consistent around it, as the hardware's barrier does.
//
// Float results must equal the Rust core's bit for bit: compile without -ffast-math and with
// -ffp-contract=off (the core never fuses a multiply and an add; NVRTC runs with --fmad=false).

#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
// libstdc++'s <math.h> puts the float overloads of <cmath> (sqrt(float), ...) into the global
// namespace, where CUDA's math API has them; <cmath> alone leaves only the C double functions there.
#include <math.h>
#include <type_traits>

// ------------------------------------------------------------------------------------------------
// Qualifiers. Every kernel file is compiled in its own translation unit, so device functions need
// no linkage tricks: `__forceinline__` already makes the header's functions inline, and kernels
// keep their external C names.
// ------------------------------------------------------------------------------------------------

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __align__(n) alignas(n)
#define __launch_bounds__(...)
// Kernel parameters are copied for every emulated thread, so a by-value parameter is never shared.
#define __grid_constant__
// One block runs at a time on an OS thread, so a block's shared memory can be a static of that
// OS thread. Its contents carry over from the previous block, which CUDA leaves undefined anyway.
#define __shared__ static thread_local

struct uint3 {
    unsigned int x, y, z;
};

struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
    constexpr dim3() = default;
    constexpr dim3(unsigned int vx, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
};

constexpr int warpSize = 32;

namespace smallbatch_emu {

// What the running emulated thread sees as its built-in index variables.
struct ThreadIndices {
    uint3 thread_idx;
    uint3 block_idx;
    dim3 block_dim;
    dim3 grid_dim;
};

// __thread rather than thread_local: a trivial type with no dynamic initialiser, so every access
// is a direct TLS load without C++'s initialisation wrapper call.
extern __thread ThreadIndices current_indices;

// This lane's view of one warp exchange: the 32 values the lanes deposited, and its lane number.
struct WarpExchange {
    const std::uint64_t* values;
    unsigned int lane;
};

// Waits for every thread of the block at this barrier (defined in emu_runtime.cpp). Never
// returns if the barrier cannot complete: the launch then fails with a message naming `file:line`.
void block_barrier(const char* file, int line);

// Deposits `value` for this lane and waits until all 32 lanes of its warp have deposited at the
// same call site (`op` names the intrinsic for error messages). The returned values stay valid
// until this lane's next exchange.
WarpExchange warp_exchange(std::uint64_t value, unsigned int mask, const char* op, const char* file, int line);

template <class T>
inline std::uint64_t to_lane_bits(T v) {
    static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "shuffles move at most 8 bytes");
    std::uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    return bits;
}

template <class T>
inline T from_lane_bits(std::uint64_t bits) {
    T v;
    std::memcpy(&v, &bits, sizeof(T));
    return v;
}

// First lane of the `width`-lane segment that holds `lane` (width a power of two up to 32).
inline unsigned int segment_start(unsigned int lane, int width) {
    return lane & ~(unsigned int)(width - 1);
}

// The warp's predicates as a bit mask, bit l from lane l (the ballot, any and all votes).
inline unsigned int ballot(unsigned int mask, int predicate, const char* op, const char* file, int line) {
    const WarpExchange ex = warp_exchange(predicate != 0 ? 1u : 0u, mask, op, file, line);
    unsigned int bits = 0;
    for (unsigned int l = 0; l < 32; ++l) {
        bits |= (unsigned int)ex.values[l] << l;
    }
    return bits;
}

}  // namespace smallbatch_emu

// The index variables read the running fiber's record; the parentheses make `threadIdx.x` parse.
#define threadIdx (::smallbatch_emu::current_indices.thread_idx)
#define blockIdx (::smallbatch_emu::current_indices.block_idx)
#define blockDim (::smallbatch_emu::current_indices.block_dim)
#define gridDim (::smallbatch_emu::current_indices.grid_dim)

// Barriers and warp intrinsics record their call site (GCC's __builtin_FILE/LINE as default
// arguments evaluate at the caller): threads waiting at different call sites can never meet, and
// the launch error names both places. `width` defaults to the whole warp, as in CUDA.

inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    ::smallbatch_emu::block_barrier(file, line);
}

inline void __syncwarp(unsigned int mask = 0xFFFFFFFFu, const char* file = __builtin_FILE(),
                       int line = __builtin_LINE()) {
    (void)::smallbatch_emu::warp_exchange(0, mask, "__syncwarp", file, line);
}

template <class T>
inline T __shfl_sync(unsigned int mask, T v, int src_lane, int width = warpSize, const char* file = __builtin_FILE(),
                     int line = __builtin_LINE()) {
    using namespace ::smallbatch_emu;
    const WarpExchange ex = warp_exchange(to_lane_bits(v), mask, "__shfl_sync", file, line);
    const unsigned int src = segment_start(ex.lane, width) + ((unsigned int)src_lane & (unsigned int)(width - 1));
    return from_lane_bits<T>(ex.values[src]);
}

template <class T>
inline T __shfl_xor_sync(unsigned int mask, T v, int lane_mask, int width = warpSize,
                         const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    using namespace ::smallbatch_emu;
    const WarpExchange ex = warp_exchange(to_lane_bits(v), mask, "__shfl_xor_sync", file, line);
    const unsigned int src = ex.lane ^ (unsigned int)lane_mask;
    // A partner in a later segment is out of reach: the lane keeps its own value, as on the GPU.
    const bool in_reach = src < segment_start(ex.lane, width) + (unsigned int)width && src < 32u;
    return from_lane_bits<T>(ex.values[in_reach ? src : ex.lane]);
}

template <class T>
inline T __shfl_up_sync(unsigned int mask, T v, unsigned int delta, int width = warpSize,
                        const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    using namespace ::smallbatch_emu;
    const WarpExchange ex = warp_exchange(to_lane_bits(v), mask, "__shfl_up_sync", file, line);
    const bool in_reach = ex.lane >= segment_start(ex.lane, width) + delta;
    return from_lane_bits<T>(ex.values[in_reach ? ex.lane - delta : ex.lane]);
}

template <class T>
inline T __shfl_down_sync(unsigned int mask, T v, unsigned int delta, int width = warpSize,
                          const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    using namespace ::smallbatch_emu;
    const WarpExchange ex = warp_exchange(to_lane_bits(v), mask, "__shfl_down_sync", file, line);
    const bool in_reach = ex.lane + delta < segment_start(ex.lane, width) + (unsigned int)width;
    return from_lane_bits<T>(ex.values[in_reach ? ex.lane + delta : ex.lane]);
}

inline unsigned int __ballot_sync(unsigned int mask, int predicate, const char* file = __builtin_FILE(),
                                  int line = __builtin_LINE()) {
    return ::smallbatch_emu::ballot(mask, predicate, "__ballot_sync", file, line);
}

inline int __any_sync(unsigned int mask, int predicate, const char* file = __builtin_FILE(),
                      int line = __builtin_LINE()) {
    return ::smallbatch_emu::ballot(mask, predicate, "__any_sync", file, line) != 0u;
}

inline int __all_sync(unsigned int mask, int predicate, const char* file = __builtin_FILE(),
                      int line = __builtin_LINE()) {
    return ::smallbatch_emu::ballot(mask, predicate, "__all_sync", file, line) == 0xFFFFFFFFu;
}

// ------------------------------------------------------------------------------------------------
// Bit casts and integer intrinsics.
// ------------------------------------------------------------------------------------------------

inline unsigned int __float_as_uint(float x) {
    return ::smallbatch_emu::from_lane_bits<unsigned int>(::smallbatch_emu::to_lane_bits(x));
}

inline float __uint_as_float(unsigned int x) {
    return ::smallbatch_emu::from_lane_bits<float>(::smallbatch_emu::to_lane_bits(x));
}

inline int __float_as_int(float x) {
    return ::smallbatch_emu::from_lane_bits<int>(::smallbatch_emu::to_lane_bits(x));
}

inline float __int_as_float(int x) {
    return ::smallbatch_emu::from_lane_bits<float>(::smallbatch_emu::to_lane_bits(x));
}

inline long long __double_as_longlong(double x) {
    return ::smallbatch_emu::from_lane_bits<long long>(::smallbatch_emu::to_lane_bits(x));
}

inline double __longlong_as_double(long long x) {
    return ::smallbatch_emu::from_lane_bits<double>(::smallbatch_emu::to_lane_bits(x));
}

inline unsigned int __umulhi(unsigned int a, unsigned int b) {
    return (unsigned int)(((unsigned long long)a * b) >> 32);
}

inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
    __extension__ typedef unsigned __int128 u128;  // a GCC extension, not ISO C++
    return (unsigned long long)(((u128)a * b) >> 64);
}

inline int __popc(unsigned int x) {
    return __builtin_popcount(x);
}

inline int __popcll(unsigned long long x) {
    return __builtin_popcountll(x);
}

// CUDA defines the leading-zero count of 0 as the width, where the GCC builtin is undefined.
inline int __clz(int x) {
    return x == 0 ? 32 : __builtin_clz((unsigned int)x);
}

inline int __clzll(long long x) {
    return x == 0 ? 64 : __builtin_clzll((unsigned long long)x);
}

inline int __ffs(int x) {
    return __builtin_ffs(x);
}

inline int __ffsll(long long x) {
    return __builtin_ffsll(x);
}

// Read-only cache loads are plain loads on the CPU.
template <class T>
inline T __ldg(const T* p) {
    return *p;
}
