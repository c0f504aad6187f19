# The two commands of the README's quick start, and what they build on.
#   make demo   set everything up, then run the main job on its embedded default
#   make test   set everything up, then cargo test, pytest and the install check
# A second run reuses the virtual environment, cargo's target/ and the installed extension.

PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
export VIRTUAL_ENV := $(abspath $(VENV))

.PHONY: demo test venv build cargo-test pytest stubtest install-check bench clean

$(VENV)/.installed: requirements-dev.txt
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	scripts/retry.sh $(VPY) -m pip install --quiet --upgrade pip
	scripts/retry.sh $(VPY) -m pip install --quiet --retries 10 --resume-retries 20 -r requirements-dev.txt
	touch $@

venv: $(VENV)/.installed

# Release build of the extension, installed into the venv in editable mode (Python sources are
# used in place; cargo rebuilds only what changed).
build: venv
	$(VENV)/bin/maturin develop --release --quiet

# The main job: the paper's transformer (tiny preset) trained at batch size 1 on the embedded
# corpus; metrics.jsonl, loss.png, summary.json and a checkpoint land in runs/demo.
demo: build
	$(VPY) -m smallbatch_rs train --preset tiny --out runs/demo

# torch's wheels bring NVRTC and cuBLAS; pointing the loader at them lets the CUDA crate's compile
# tests run. The path is absolute because cargo runs each test binary from its crate's folder.
cargo-test: venv
	LD_LIBRARY_PATH="$$(ls -d $(abspath $(VENV))/lib/python3*/site-packages/nvidia/cu*/lib 2>/dev/null | head -n 1)" \
		cargo test --workspace --release
	cargo run --release --quiet --example logistic_regression
	RUSTDOCFLAGS="-D warnings" cargo doc --quiet --no-deps -p smallbatch-core -p smallbatch-cuda -p smallbatch-step -p smallbatch-capi
	cargo build --release --quiet -p smallbatch-capi
	mkdir -p target/c
	$(CC) -std=c11 -O2 -Wall -Wextra -Werror -Irust/capi/include -o target/c/logistic_regression \
		examples/c/logistic_regression.c target/release/libsmallbatch_capi.a -lpthread -ldl -lm
	target/c/logistic_regression

stubtest: build
	$(VPY) -m mypy.stubtest smallbatch_rs._core

pytest: build
	$(VPY) -m pytest -q tests

# Installing as users do: the abi3 wheel and `pip install .`, each into a fresh virtual environment
# that borrows the dev venv's torch (scripts/install-check.sh).
install-check: venv
	scripts/install-check.sh

test: build cargo-test stubtest pytest install-check

clean:
	cargo clean
	rm -rf $(VENV) dist

# Side-by-side optimizer-step benchmark against torch.optim (not part of `make test`).
bench: build
	$(VPY) -m smallbatch_rs.bench --json bench.json
