// emu_runtime.cpp: runs a launch of a kernel compiled against cuda_shim.h on the calling OS thread.
// It owns the fibers (one stack per emulated thread of a block, kept per OS thread and reused by
// every block and launch), the deterministic scheduler, barrier and warp-exchange bookkeeping,
// deadlock diagnosis, and the C entry points the Rust crate calls.
//
// Schedule: blocks run one after another (x fastest, then y, then z). In a block, threads are
// resumed in the order they became runnable, starting with 0..n-1; each runs until it exits or
// waits at a barrier or warp exchange, and then switches straight to the next runnable thread
// (one switch per hand-off, not two through the scheduler). A barrier releases all threads of the
// block (in index order) when the last one arrives, an exchange the 32 lanes of its warp. When
// nothing is runnable, control returns to the scheduler; if some thread has not exited then, the
// block can never finish, and the launch fails with a description of who waits where instead of
// hanging.

#include <sys/mman.h>
#include <unistd.h>

#include <cstdarg>
#include <cstdio>
#include <exception>
#include <memory>
#include <string>
#include <vector>

#if !defined(__x86_64__) || defined(SMALLBATCH_EMU_UCONTEXT)
#include <ucontext.h>
#define SMALLBATCH_EMU_USE_UCONTEXT 1
#endif

// After the system headers: the shim's macros (__device__, __shared__, ...) are not theirs to see.
#include "cuda_shim.h"
#include "emu_launch.h"

// ------------------------------------------------------------------------------------------------
// Context switching. glibc's swapcontext saves and restores the signal mask with a system call on
// every switch (about 0.4 us); a kernel's warp-tile loop switches a few times per element, so on
// x86-64 a switch saves only what the ABI says a callee preserves: rbx, rbp, r12-r15, the MXCSR
// and the x87 control word. Other targets use ucontext.
// ------------------------------------------------------------------------------------------------

#ifndef SMALLBATCH_EMU_USE_UCONTEXT
// Pushes the callee-saved state on the current stack, stores the stack pointer in *save_sp, then
// pops the state that `load_sp` points at and returns into whatever that stack was doing.
extern "C" void smallbatch_emu_switch_stacks(void** save_sp, void* load_sp);

asm(R"(
    .pushsection .text
    .p2align 4
    .globl smallbatch_emu_switch_stacks
    .hidden smallbatch_emu_switch_stacks
    .type smallbatch_emu_switch_stacks, @function
smallbatch_emu_switch_stacks:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size smallbatch_emu_switch_stacks, .-smallbatch_emu_switch_stacks
    .popsection
)");
#endif

namespace smallbatch_emu {

__thread ThreadIndices current_indices{};

namespace {

// Kernel frames are small (no recursion, a few arrays); a guard page below catches the rest.
constexpr std::size_t kStackBytes = 128 * 1024;
constexpr unsigned kMaxBlockThreads = 1024;
constexpr unsigned kWarpLanes = 32;

#ifndef SMALLBATCH_EMU_USE_UCONTEXT
struct Context {
    void* sp = nullptr;
};

// Builds the frame smallbatch_emu_switch_stacks pops, so that the first switch to this context
// "returns" into `entry` with the stack aligned as if `entry` had just been called.
void context_start(Context& context, void* stack, std::size_t size, void (*entry)()) {
    auto top = reinterpret_cast<std::uintptr_t>(stack) + size;
    auto* slot = reinterpret_cast<std::uint64_t*>(top & ~std::uintptr_t{15});
    std::uint32_t mxcsr = 0;
    std::uint16_t fpu_control = 0;
    asm volatile("stmxcsr %0" : "=m"(mxcsr));
    asm volatile("fnstcw %0" : "=m"(fpu_control));
    slot[-1] = 0;  // entry's return address: entry never returns, and unwinders stop here
    slot[-2] = reinterpret_cast<std::uint64_t>(entry);
    for (int reg = 3; reg <= 8; ++reg) {
        slot[-reg] = 0;  // rbp, rbx, r12..r15
    }
    slot[-9] = mxcsr | (std::uint64_t{fpu_control} << 32);
    context.sp = &slot[-9];
}

inline void context_switch(Context& from, Context& to) {
    smallbatch_emu_switch_stacks(&from.sp, to.sp);
}
#else
struct Context {
    ucontext_t uc;
};

void context_start(Context& context, void* stack, std::size_t size, void (*entry)()) {
    getcontext(&context.uc);
    context.uc.uc_stack.ss_sp = stack;
    context.uc.uc_stack.ss_size = size;
    context.uc.uc_link = nullptr;
    makecontext(&context.uc, entry, 0);
}

inline void context_switch(Context& from, Context& to) {
    swapcontext(&from.uc, &to.uc);
}
#endif

std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

std::string format(const char* fmt, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    std::vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    return buf;
}

enum class Wait : unsigned char { Runnable, Barrier, Warp, Exited };

// Where a thread waits: the intrinsic and its call site.
struct Site {
    const char* op = "";
    const char* file = "";
    int line = 0;
};

// Names of one call site are usually the same literal, so pointers are compared first.
bool same_text(const char* a, const char* b) {
    return a == b || std::strcmp(a, b) == 0;
}

bool same_site(const Site& a, const Site& b) {
    return a.line == b.line && same_text(a.op, b.op) && same_text(a.file, b.file);
}

// The file name without its directories: messages stay short and free of build paths.
const char* base_name(const char* path) {
    const char* slash = std::strrchr(path, '/');
    return slash != nullptr ? slash + 1 : path;
}

// One emulated thread slot: the fiber (kept across blocks and launches) and the state of the thread
// it currently runs.
struct EmuThread {
    Context context;
    void* mapping = nullptr;  // guard page + stack
    uint3 thread_idx{};       // of the launch's block shape
    Wait wait = Wait::Runnable;
    Site site;
};

struct WarpState {
    unsigned arrived = 0;
    unsigned first_lane = 0;
    // Exchanges alternate between two value sets: lanes resumed early may deposit for the next
    // exchange while later lanes still read this one. A third is never needed, because the next
    // exchange completes only after every lane has read this one.
    unsigned generation = 0;
    Site site;
    std::uint64_t values[2][kWarpLanes];
};

class Runtime {
  public:
    Runtime() = default;
    Runtime(const Runtime&) = delete;
    Runtime& operator=(const Runtime&) = delete;

    ~Runtime() {
        for (auto& t : threads_) {
            munmap(t->mapping, page_bytes() + kStackBytes);
        }
    }

    // Runs `body` in every thread of the grid; on failure returns false with the message in error_.
    bool run_grid(const char* kernel, dim3 grid, dim3 block, ThreadBody body, void* const* args);

    const std::string& error() const { return error_; }

    // Called on fibers, from the shim's intrinsics and from fiber_main.
    void barrier(const char* file, int line);
    WarpExchange exchange(std::uint64_t value, unsigned mask, const char* op, const char* file, int line);
    [[noreturn]] void fiber_main();

  private:
    static std::size_t page_bytes() { return (std::size_t)sysconf(_SC_PAGESIZE); }

    bool ensure_threads(unsigned n);
    bool run_block();
    void restart_fibers();
    void push_runnable(unsigned t) {
        threads_[t]->wait = Wait::Runnable;
        queue_[queue_tail_] = t;
        queue_tail_ = queue_tail_ + 1 == nthreads_ ? 0 : queue_tail_ + 1;
        ++queued_;
    }
    // Passes control to the next runnable thread, or back to the scheduler when there is none;
    // returns when this thread is resumed.
    void suspend() {
        Context& self = threads_[current_]->context;
        if (queued_ == 0) {
            context_switch(self, scheduler_);
        } else {
            context_switch(self, threads_[pop_runnable()]->context);
        }
    }
    // Dequeues the next thread to run and makes it the current one.
    unsigned pop_runnable() {
        const unsigned t = queue_[queue_head_];
        queue_head_ = queue_head_ + 1 == nthreads_ ? 0 : queue_head_ + 1;
        --queued_;
        current_ = t;
        current_indices.thread_idx = threads_[t]->thread_idx;
        return t;
    }
    [[noreturn]] void fail(std::string message);
    std::string thread_name(unsigned t) const;
    std::string diagnose_deadlock() const;

    std::vector<std::unique_ptr<EmuThread>> threads_;
    Context scheduler_;

    ThreadBody body_ = nullptr;
    void* const* args_ = nullptr;
    unsigned nthreads_ = 0;
    unsigned current_ = 0;
    unsigned exited_ = 0;

    unsigned barrier_arrived_ = 0;
    unsigned barrier_first_ = 0;
    Site barrier_site_;

    std::vector<WarpState> warps_;

    // Runnable threads in resumption order: a ring, since each thread is queued at most once.
    std::vector<unsigned> queue_;
    unsigned queue_head_ = 0, queue_tail_ = 0, queued_ = 0;

    std::string error_;
};

// The runtime of this OS thread's launch in progress: how code running on a fiber finds it.
__thread Runtime* active_runtime = nullptr;

Runtime& thread_runtime() {
    static thread_local std::unique_ptr<Runtime> runtime;
    if (!runtime) {
        runtime = std::make_unique<Runtime>();
    }
    return *runtime;
}

[[noreturn]] void fiber_entry() {
    active_runtime->fiber_main();
}

void Runtime::fiber_main() {
    for (;;) {
        body_(args_);
        threads_[current_]->wait = Wait::Exited;
        ++exited_;
        // Resumed only when the scheduler gives this fiber the same thread of the next block.
        suspend();
    }
}

bool Runtime::ensure_threads(unsigned n) {
    const std::size_t guard = page_bytes();
    while (threads_.size() < n) {
        void* mapping =
            mmap(nullptr, guard + kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (mapping == MAP_FAILED) {
            error_ = format("cannot map a stack for emulated thread %zu", threads_.size());
            return false;
        }
        if (mprotect(mapping, guard, PROT_NONE) != 0) {
            munmap(mapping, guard + kStackBytes);
            error_ = "cannot protect an emulated thread's stack guard page";
            return false;
        }
        auto thread = std::make_unique<EmuThread>();
        thread->mapping = mapping;
        context_start(thread->context, static_cast<char*>(mapping) + guard, kStackBytes, fiber_entry);
        threads_.push_back(std::move(thread));
    }
    return true;
}

// A failed block leaves fibers suspended mid-kernel; their frames are abandoned by starting them
// afresh (kernels own no resources that would need unwinding).
void Runtime::restart_fibers() {
    const std::size_t guard = page_bytes();
    for (unsigned t = 0; t < nthreads_; ++t) {
        context_start(threads_[t]->context, static_cast<char*>(threads_[t]->mapping) + guard, kStackBytes,
                      fiber_entry);
    }
}

std::string Runtime::thread_name(unsigned t) const {
    const uint3 i = threads_[t]->thread_idx;
    return format("thread (%u,%u,%u)", i.x, i.y, i.z);
}

// Callers build the message in a statement of its own: this frame and the caller's are abandoned,
// so temporaries still alive here would never be destroyed (a moved-from string owns nothing).
void Runtime::fail(std::string message) {
    error_ = std::move(message);
    // Never resumed: the scheduler sees the error and abandons the block.
    context_switch(threads_[current_]->context, scheduler_);
    __builtin_trap();
}

bool Runtime::run_grid(const char* kernel, dim3 grid, dim3 block, ThreadBody body, void* const* args) {
    error_.clear();
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || block.x == 0 || block.y == 0 || block.z == 0) {
        error_ = format("kernel `%s`: empty launch, grid (%u,%u,%u), block (%u,%u,%u)", kernel, grid.x, grid.y,
                        grid.z, block.x, block.y, block.z);
        return false;
    }
    const unsigned long long n = (unsigned long long)block.x * block.y * block.z;
    if (block.x > 1024 || block.y > 1024 || block.z > 64 || n > kMaxBlockThreads || grid.x > 0x7FFFFFFFu ||
        grid.y > 65535 || grid.z > 65535) {
        error_ = format("kernel `%s`: invalid launch configuration, grid (%u,%u,%u), block (%u,%u,%u) (CUDA's limits: "
                        "block x, y <= 1024, z <= 64, at most 1024 threads; grid y, z <= 65535)",
                        kernel, grid.x, grid.y, grid.z, block.x, block.y, block.z);
        return false;
    }
    nthreads_ = (unsigned)n;
    if (!ensure_threads(nthreads_)) {
        return false;
    }
    body_ = body;
    args_ = args;
    for (unsigned t = 0; t < nthreads_; ++t) {
        threads_[t]->thread_idx = uint3{t % block.x, t / block.x % block.y, t / (block.x * block.y)};
    }
    queue_.assign(nthreads_, 0);
    warps_.assign((nthreads_ + kWarpLanes - 1) / kWarpLanes, WarpState());
    active_runtime = this;
    current_indices.grid_dim = grid;
    current_indices.block_dim = block;

    bool ok = true;
    for (unsigned z = 0; ok && z < grid.z; ++z) {
        for (unsigned y = 0; ok && y < grid.y; ++y) {
            for (unsigned x = 0; ok && x < grid.x; ++x) {
                current_indices.block_idx = uint3{x, y, z};
                if (!run_block()) {
                    error_ = format("kernel `%s`, block (%u,%u,%u) of grid (%u,%u,%u), block shape (%u,%u,%u): ", kernel,
                                    x, y, z, grid.x, grid.y, grid.z, block.x, block.y, block.z) +
                             error_;
                    restart_fibers();
                    ok = false;
                }
            }
        }
    }
    return ok;
}

bool Runtime::run_block() {
    exited_ = 0;
    barrier_arrived_ = 0;
    for (auto& w : warps_) {
        w.arrived = 0;
    }
    queue_head_ = queue_tail_ = queued_ = 0;
    for (unsigned t = 0; t < nthreads_; ++t) {
        push_runnable(t);
    }
    // Returns when no thread is runnable, or when one failed.
    context_switch(scheduler_, threads_[pop_runnable()]->context);
    if (!error_.empty()) {
        return false;
    }
    if (exited_ != nthreads_) {
        error_ = diagnose_deadlock();
        return false;
    }
    return true;
}

void Runtime::barrier(const char* file, int line) {
    const Site site{"__syncthreads()", file, line};
    if (barrier_arrived_ == 0) {
        barrier_site_ = site;
        barrier_first_ = current_;
    } else if (!same_site(site, barrier_site_)) {
        std::string message =
            format("%s waits at __syncthreads() at %s:%d while %s waits at __syncthreads() at %s:%d",
                   thread_name(current_).c_str(), base_name(file), line, thread_name(barrier_first_).c_str(),
                   base_name(barrier_site_.file), barrier_site_.line);
        fail(std::move(message));
    }
    EmuThread& self = *threads_[current_];
    self.wait = Wait::Barrier;
    self.site = site;
    if (++barrier_arrived_ == nthreads_) {
        barrier_arrived_ = 0;
        for (unsigned t = 0; t < nthreads_; ++t) {
            push_runnable(t);
        }
    }
    suspend();
}

WarpExchange Runtime::exchange(std::uint64_t value, unsigned mask, const char* op, const char* file, int line) {
    if (mask != 0xFFFFFFFFu) {
        std::string message = format("%s at %s:%d in %s: mask 0x%08x, but only whole-warp masks are emulated", op,
                                     base_name(file), line, thread_name(current_).c_str(), mask);
        fail(std::move(message));
    }
    if (nthreads_ % kWarpLanes != 0) {
        std::string message =
            format("%s at %s:%d needs whole warps, but the block has %u threads", op, base_name(file), line, nthreads_);
        fail(std::move(message));
    }
    const unsigned lane = current_ % kWarpLanes;
    WarpState& warp = warps_[current_ / kWarpLanes];
    const Site site{op, file, line};
    if (warp.arrived == 0) {
        warp.site = site;
        warp.first_lane = lane;
    } else if (!same_site(site, warp.site)) {
        std::string message =
            format("lane %u of warp %u (%s) reached %s at %s:%d while lane %u waits at %s at %s:%d", lane,
                   current_ / kWarpLanes, thread_name(current_).c_str(), op, base_name(file), line, warp.first_lane,
                   warp.site.op, base_name(warp.site.file), warp.site.line);
        fail(std::move(message));
    }
    std::uint64_t* values = warp.values[warp.generation & 1];
    values[lane] = value;
    EmuThread& self = *threads_[current_];
    self.wait = Wait::Warp;
    self.site = site;
    if (++warp.arrived == kWarpLanes) {
        warp.arrived = 0;
        ++warp.generation;
        const unsigned first = current_ - lane;
        for (unsigned l = 0; l < kWarpLanes; ++l) {
            push_runnable(first + l);
        }
    }
    suspend();
    return WarpExchange{values, lane};
}

std::string Runtime::diagnose_deadlock() const {
    for (std::size_t w = 0; w < warps_.size(); ++w) {
        const WarpState& warp = warps_[w];
        if (warp.arrived == 0) {
            continue;
        }
        for (unsigned l = 0; l < kWarpLanes; ++l) {
            const unsigned t = (unsigned)w * kWarpLanes + l;
            const EmuThread& other = *threads_[t];
            const std::string waiting =
                format("%u lanes of warp %zu wait at %s at %s:%d, but lane %u (%s)", warp.arrived, w, warp.site.op,
                       base_name(warp.site.file), warp.site.line, l, thread_name(t).c_str());
            if (other.wait == Wait::Exited) {
                return waiting + " has exited";
            }
            if (other.wait == Wait::Barrier) {
                return waiting + format(" waits at __syncthreads() at %s:%d", base_name(other.site.file),
                                        other.site.line);
            }
        }
    }
    if (barrier_arrived_ != 0) {
        for (unsigned t = 0; t < nthreads_; ++t) {
            if (threads_[t]->wait == Wait::Exited) {
                return format("%u of %u threads wait at __syncthreads() at %s:%d, but %u threads have exited without "
                              "reaching it (the first: %s)",
                              barrier_arrived_, nthreads_, base_name(barrier_site_.file), barrier_site_.line, exited_,
                              thread_name(t).c_str());
            }
        }
    }
    return format("the block deadlocked: %u of %u threads exited, the others wait forever", exited_, nthreads_);
}

}  // namespace

void block_barrier(const char* file, int line) {
    active_runtime->barrier(file, line);
}

WarpExchange warp_exchange(std::uint64_t value, unsigned int mask, const char* op, const char* file, int line) {
    return active_runtime->exchange(value, mask, op, file, line);
}

}  // namespace smallbatch_emu

namespace {

void write_error(const std::string& message, char* err, std::size_t err_len) {
    if (err != nullptr && err_len != 0) {
        std::snprintf(err, err_len, "%s", message.c_str());
    }
}

const smallbatch_emu::KernelInfo* find_kernel(const char* name) {
    using namespace smallbatch_emu;
    for (std::size_t f = 0; f < all_kernel_table_count; ++f) {
        for (std::size_t k = 0; k < all_kernel_tables[f].count; ++k) {
            if (std::strcmp(all_kernel_tables[f].kernels[k].name, name) == 0) {
                return &all_kernel_tables[f].kernels[k];
            }
        }
    }
    return nullptr;
}

}  // namespace

extern "C" {

// Launches `kernel` over the grid and returns 0, or returns 1 with a message in `err`.
// args[i] points at the value of parameter i (cuLaunchKernel's convention); `arg_sizes`, when not
// null, holds the byte size of each value, checked against the kernel's parameters.
int smallbatch_emu_launch(const char* kernel, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                          unsigned bz, void* const* args, std::size_t arg_count, const std::size_t* arg_sizes,
                          char* err, std::size_t err_len) {
    using smallbatch_emu::format;
    try {
        const smallbatch_emu::KernelInfo* info = find_kernel(kernel);
        if (info == nullptr) {
            write_error(format("no emulated kernel named `%s`", kernel), err, err_len);
            return 1;
        }
        if (arg_count != info->param_count) {
            write_error(format("kernel `%s` takes %zu arguments, got %zu", kernel, info->param_count, arg_count), err,
                        err_len);
            return 1;
        }
        for (std::size_t i = 0; arg_sizes != nullptr && i < arg_count; ++i) {
            if (arg_sizes[i] != info->param_sizes[i]) {
                write_error(format("kernel `%s`: argument %zu is %zu bytes, but the parameter is %zu bytes", kernel, i,
                                   arg_sizes[i], info->param_sizes[i]),
                            err, err_len);
                return 1;
            }
        }
        smallbatch_emu::Runtime& runtime = smallbatch_emu::thread_runtime();
        if (!runtime.run_grid(kernel, dim3(gx, gy, gz), dim3(bx, by, bz), info->body, args)) {
            write_error(runtime.error(), err, err_len);
            return 1;
        }
        return 0;
    } catch (const std::exception& e) {
        write_error(format("kernel `%s`: %s", kernel, e.what()), err, err_len);
        return 1;
    }
}

std::size_t smallbatch_emu_kernel_count(void) {
    std::size_t n = 0;
    for (std::size_t f = 0; f < smallbatch_emu::all_kernel_table_count; ++f) {
        n += smallbatch_emu::all_kernel_tables[f].count;
    }
    return n;
}

// Name of kernel `index` (0 <= index < smallbatch_emu_kernel_count()), or null.
const char* smallbatch_emu_kernel_name(std::size_t index) {
    for (std::size_t f = 0; f < smallbatch_emu::all_kernel_table_count; ++f) {
        if (index < smallbatch_emu::all_kernel_tables[f].count) {
            return smallbatch_emu::all_kernel_tables[f].kernels[index].name;
        }
        index -= smallbatch_emu::all_kernel_tables[f].count;
    }
    return nullptr;
}

}  // extern "C"
