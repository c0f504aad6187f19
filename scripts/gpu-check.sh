#!/usr/bin/env bash
# The checks that need an NVIDIA GPU, in one go, on a machine that has torch with CUDA and pytest
# but need not have Rust: build the wheel elsewhere (`maturin build --release -o dist`), copy the
# repository with dist/, and run this from its root. Results land in ${OUT:-gpu-check}/.
#   1. the CUDA test suite (every rule against the CPU core, fused AdamW, CUDA graphs, streams)
#   2. the side-by-side benchmark on the GPU (JSON and its printed table)
#   3. a short training run and the batch-size advisor on the GPU
set -euo pipefail
out=${OUT:-gpu-check}
mkdir -p "$out"
site=$(mktemp -d)
python3 -m pip install --quiet --no-deps --target "$site" dist/*.whl
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible to torch'; print(torch.cuda.get_device_name())" | tee "$out/device.txt"

status=0
python3 -m pytest -q -m cuda tests -p no:cacheprovider 2>&1 | tee "$out/pytest-cuda.txt" || status=1
python3 -m smallbatch_rs.bench --device cuda --repeats 5 --json "$out/bench-cuda.json" 2>&1 | tee "$out/bench-cuda.txt" || status=1
SMALLBATCH_CACHE="$out/cache" python3 -m smallbatch_rs train --preset tiny --device cuda --tokens 200k \
    --no-progress --out "$out/train-tiny" 2>&1 | tee "$out/train.txt" || status=1
python3 -m smallbatch_rs suggest-batch-size --preset lm30m --device cuda --max-batch-size 64 \
    --no-progress --json "$out/suggest-lm30m.json" 2>&1 | tee "$out/suggest.txt" || status=1
exit $status
