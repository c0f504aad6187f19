// step_counters.cu: the last launch of a counted step (capturable=True). The rule's kernels read
// each tensor's step count on the device (common.cuh `CountedScalars`) without changing it; this
// adds 1 to the counts of the tensors the step took, in stream order after them, so that every
// reader of a count saw the value before the step. Stepped tensors without elements count too, as
// in the core's `SegmentTable::plan_step`.

#include "common.cuh"

// Launch: 1-D, any blockDim.x * gridDim.x >= where.count. Thread k adds 1 to
// counters[where.base + where.delta[k]] for k < where.count (indices distinct).
extern "C" __global__ void advance_step_counters(double* counters, const __grid_constant__ ListCounters where) {
    const u64 k = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (k < where.count) {
        counters[where.base + where.delta[k]] += 1.0;
    }
}
