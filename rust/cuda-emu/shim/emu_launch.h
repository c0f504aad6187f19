// emu_launch.h: how kernels compiled against cuda_shim.h become launchable by name. It owns the
// per-kernel record (name, thread body, parameter sizes), the trampoline that unpacks a
// cuLaunchKernel-style argument array into a typed kernel call, and the declarations shared by the
// generated kernel tables (build.rs) and the runtime (emu_runtime.cpp).

#pragma once

#include <cstddef>
#include <cstring>
#include <type_traits>
#include <utility>

namespace smallbatch_emu {

// What every emulated thread of a launch runs: the kernel, called with the launch's arguments.
using ThreadBody = void (*)(void* const* args);

struct KernelInfo {
    const char* name;
    ThreadBody body;
    std::size_t param_count;
    // sizeof of each parameter, so that a launch can reject arguments of the wrong width.
    const std::size_t* param_sizes;
};

// The kernels of one source file; build.rs generates one table per file and a list of the tables.
struct KernelTable {
    const KernelInfo* kernels;
    std::size_t count;
};

extern const KernelTable all_kernel_tables[];
extern const std::size_t all_kernel_table_count;

// args[i] points at the value of parameter i, as for cuLaunchKernel. The slot need not be aligned
// for the parameter's type (memcpy), but must hold sizeof(T) bytes.
template <class T>
inline T load_arg(const void* slot) {
    static_assert(std::is_trivially_copyable<T>::value, "kernel parameters are copied bytewise, as by CUDA");
    T value;
    std::memcpy(&value, slot, sizeof(T));
    return value;
}

template <class... Params, std::size_t... I>
inline void call_with_args(void (*kernel)(Params...), void* const* args, std::index_sequence<I...>) {
    kernel(load_arg<Params>(args[I])...);
}

template <class Fn>
struct ParamList;

template <class... Params>
struct ParamList<void (*)(Params...)> {
    static constexpr std::size_t count = sizeof...(Params);
    // One spare element: a kernel without parameters still gets a well-formed array.
    static constexpr std::size_t sizes[sizeof...(Params) + 1] = {sizeof(Params)..., 0};
};

template <auto Kernel>
void thread_body(void* const* args) {
    call_with_args(Kernel, args, std::make_index_sequence<ParamList<decltype(Kernel)>::count>{});
}

template <auto Kernel>
constexpr KernelInfo kernel_info(const char* name) {
    using Params = ParamList<decltype(Kernel)>;
    return KernelInfo{name, &thread_body<Kernel>, Params::count, Params::sizes};
}

}  // namespace smallbatch_emu
