#!/usr/bin/env bash
# The checks that need an NVIDIA GPU, in one go, on a machine that has torch with CUDA and pytest
# but need not have Rust: build the wheel elsewhere (`maturin build --release -o dist`), copy the
# repository with dist/, and run this from its root. Results land in ${OUT:-gpu-check}/, at most
# eight files:
#   1. the CUDA test suite (every rule against the CPU core, fused AdamW, CUDA graphs, streams)
#   2. the side-by-side benchmark on the GPU (JSON, its printed table, and docs/benchmarks.md with
#      the GPU table replaced)
#   3. short training runs (eager, and --cuda-graphs) and the batch-size advisor on the GPU
#   4. with SANITIZE=1, the CUDA tests under compute-sanitizer's memcheck, and the reductions
#      (Adafactor, Muon) under its racecheck
# TRAIN=0 leaves out stage 3.
# Each stage has its own time limit, so that one hang still leaves the others' results.
set -uo pipefail
out=${OUT:-gpu-check}
mkdir -p "$out"
work=$(mktemp -d)
python3 -m pip install --quiet --no-deps --target "$work/site" dist/*.whl || exit 1
export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible to torch'; print(torch.cuda.get_device_name(), torch.__version__, torch.version.cuda)" \
    | tee "$out/device.txt" || exit 1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv >>"$out/device.txt" 2>&1

status=0
stage() {  # stage SECONDS LOG COMMAND...: runs COMMAND with a time limit, appending to LOG
    local limit=$1 log=$2
    shift 2
    echo "\$ $*" >>"$log"
    timeout "$limit" "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || { echo "stage failed (status $rc): $*" | tee -a "$log"; status=1; }
}

stage 240 "$out/pytest-cuda.txt" python3 -m pytest -q -rfEs -m cuda tests -p no:cacheprovider
cp docs/benchmarks.md "$out/benchmarks.md"
stage 240 "$out/bench-cuda.txt" python3 -m smallbatch_rs.bench --device cuda --repeats 5 \
    --json "$out/bench-cuda.json" --markdown "$out/benchmarks.md"
if [ "${TRAIN:-1}" = 1 ]; then
    stage 90 "$out/train.txt" env SMALLBATCH_CACHE="$work/cache" python3 -m smallbatch_rs train --preset tiny \
        --device cuda --tokens 200k --no-progress --out "$work/train-tiny"
    stage 90 "$out/train.txt" env SMALLBATCH_CACHE="$work/cache" python3 -m smallbatch_rs train --preset tiny \
        --device cuda --cuda-graphs --tokens 200k --no-progress --out "$work/train-tiny-graphs"
    stage 90 "$out/train.txt" env SMALLBATCH_CACHE="$work/cache" python3 -m smallbatch_rs suggest-batch-size \
        --preset lm30m --device cuda --max-batch-size 64 --no-progress --json "$out/suggest-lm30m.json"
fi
if [ "${SANITIZE:-0}" = 1 ]; then
    stage 200 "$out/sanitizer.txt" compute-sanitizer --tool memcheck --error-exitcode 7 \
        python3 -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider
    stage 100 "$out/sanitizer.txt" compute-sanitizer --tool racecheck --error-exitcode 7 \
        python3 -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider -k "adafactor_cuda_equals_cpu_fp32 or muon_cuda_matches"
fi
exit $status
