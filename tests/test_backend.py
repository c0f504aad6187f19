"""The native backend: its report, forced SIMD paths, and thread-count independence."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

import smallbatch_rs as sb


def test_backend_info():
    info = sb.backend_info()
    assert info["version"] == sb.__version__
    assert info["simd"] in info["simd_supported"]
    assert info["simd_supported"][-1] == "scalar"
    assert info["threads"] >= 1
    assert info["thread_pool"] in ("openmp", "own")
    assert info["chunk_elements"] > 0


# Trains a model with every optimizer and prints a digest of the final weights' bits.
_DIGEST = textwrap.dedent(
    """
    import hashlib, torch, smallbatch_rs as sb
    torch.manual_seed(0)
    out = []
    for make, dtype in (
        (lambda p: sb.AdamW(p, lr=1e-2), torch.float32),
        (lambda p: sb.SGD(p, lr=0.05, momentum=0.9, nesterov=True), torch.float32),
        (lambda p: sb.Adafactor(p, min_dim_size_to_factor=8, beta1=0.9), torch.float32),
        (lambda p: sb.Adafactor(p, t2=1e4, tokens_per_step=8), torch.float32),
        (lambda p: sb.AdamW(p, lr=1e-2, stochastic_rounding=True, seed=3), torch.bfloat16),
        (lambda p: sb.SGD(p, lr=0.05, momentum=0.9, stochastic_rounding=True), torch.bfloat16),
        (lambda p: sb.AdafactorSR(p, min_dim_size_to_factor=8, seed=5), torch.bfloat16),
        (lambda p: sb.Muon(p, lr=0.02), torch.float32),
        (lambda p: sb.Muon(p, lr=0.02, stochastic_rounding=True, seed=2), torch.bfloat16),
    ):
        model = torch.nn.Sequential(
            torch.nn.Linear(37, 300), torch.nn.Tanh(), torch.nn.Linear(300, 129), torch.nn.Linear(129, 600)
        ).to(dtype)
        opt = make(model.parameters())
        g = torch.Generator().manual_seed(1)
        for _ in range(5):
            opt.zero_grad()
            model(torch.randn(8, 37, generator=g).to(dtype)).float().square().mean().backward()
            opt.step()
        h = hashlib.sha256()
        for p in model.parameters():
            h.update(p.detach().view(torch.int16 if dtype == torch.bfloat16 else torch.int32).numpy().tobytes())
        out.append(h.hexdigest())
    print(sb.backend_info()["simd"], sb.backend_info()["threads"], *out)
    """
)


def _digest(env_overrides):
    env = dict(os.environ, **env_overrides)
    res = subprocess.run([sys.executable, "-c", _DIGEST], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout.split()


def test_every_simd_path_and_thread_count_gives_identical_weights():
    """Forcing each supported path with SMALLBATCH_SIMD and 1 or 3 threads changes no bit."""
    results = {}
    for path in sb.backend_info()["simd_supported"]:
        for threads in ("1", "3"):
            simd, nthreads, *digests = _digest({"SMALLBATCH_SIMD": path, "SMALLBATCH_NUM_THREADS": threads})
            assert (simd, nthreads) == (path, threads)
            results[(path, threads)] = digests
    assert len({tuple(d) for d in results.values()}) == 1, results


def test_steps_on_torchs_openmp_threads_give_the_same_bits():
    """Where torch runs on libgomp, elementwise steps run on its threads (the default) and give
    the same weights as the core's own pool (SMALLBATCH_THREAD_POOL=own)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("torch's OpenMP runtime is only looked up on Linux")
    code = "import smallbatch_rs as sb; print(sb.backend_info()['thread_pool'])"
    default = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout.strip()
    if default != "openmp":
        pytest.skip("this torch does not run on libgomp")
    own = dict(os.environ, SMALLBATCH_THREAD_POOL="own")
    assert subprocess.run([sys.executable, "-c", code], env=own, capture_output=True, text=True, timeout=60).stdout.strip() == "own"
    assert _digest({"SMALLBATCH_NUM_THREADS": "2"})[2:] == _digest({"SMALLBATCH_NUM_THREADS": "2", "SMALLBATCH_THREAD_POOL": "own"})[2:]


def test_unknown_or_unsupported_simd_path_is_a_clear_error():
    env = dict(os.environ, SMALLBATCH_SIMD="sse9")
    code = "import smallbatch_rs as sb; sb.backend_info()"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
    assert "RuntimeError: SIMD path 'sse9' is unavailable: unknown path (expected one of: scalar, avx2, avx512, neon)" in res.stderr
    unsupported = [p for p in ("avx512", "avx2", "neon") if p not in sb.backend_info()["simd_supported"]]
    if not unsupported:
        pytest.skip("this CPU supports every SIMD path")
    env["SMALLBATCH_SIMD"] = unsupported[0]
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert f"SIMD path '{unsupported[0]}' is unavailable: this CPU or build does not support it" in res.stderr


def test_bad_thread_count_is_a_clear_error():
    env = dict(os.environ, SMALLBATCH_NUM_THREADS="zero")
    code = "import smallbatch_rs as sb; sb.backend_info()"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert "ValueError: invalid SMALLBATCH_NUM_THREADS: zero (must be an integer >= 1)" in res.stderr
