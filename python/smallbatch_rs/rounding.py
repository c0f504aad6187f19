"""fp32 -> bf16 rounding by the native core: stochastic (unbiased) and to nearest.

Stochastic rounding adds a uniform random 16-bit integer to the fp32 bit pattern and keeps the
top 16 bits, so ``E[round(x)] = x``. The random bits for element ``i`` come from Philox4x32-10
keyed by ``seed``, with counter ``(i // 8, step, stream)``: they depend on nothing else, so the
result is identical on every SIMD path, thread count and on CUDA. NaN stays NaN and
+-Inf stays +-Inf.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _core

__all__ = ["stochastic_round", "round_to_nearest_bf16"]


def _prepare(x: Tensor, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"smallbatch_rs.{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.float32:
        raise TypeError(f"smallbatch_rs.{name}: expected a float32 tensor, got {x.dtype}")
    if x.device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"smallbatch_rs.{name}: tensor is on {x.device}; only CPU and CUDA tensors are supported")
    return x.detach().contiguous()


def _round(src: Tensor, stochastic: bool, seed: int = 0, step: int = 0, stream: int = 0) -> Tensor:
    out = torch.empty(src.shape, dtype=torch.bfloat16, device=src.device)
    device = None
    if src.device.type == "cuda":
        from . import cuda as _cuda

        _cuda.preload_nvrtc()
        ordinal = src.device.index if src.device.index is not None else torch.cuda.current_device()
        device = (ordinal, torch.cuda.current_stream(src.device).cuda_stream)
    _core.round_to_bf16(
        src.data_ptr(), out.data_ptr(), src.numel(), stochastic=stochastic, seed=seed, step=step, stream=stream,
        device=device,
    )
    return out


def stochastic_round(x: Tensor, seed: int, step: int = 0, stream: int = 0) -> Tensor:
    """Rounds a float32 tensor to bfloat16 stochastically (unbiased), deterministically in
    ``(seed, step, stream)`` and each element's index.

    >>> import torch
    >>> x = torch.full((100_000,), 1.0 + 2**-10)   # between two bf16 neighbours
    >>> y = stochastic_round(x, seed=0).float()
    >>> bool(abs(y.mean() - x[0]) < 1e-4)
    True
    """
    src = _prepare(x, "stochastic_round")
    if not (0 <= int(seed) < 2**64) or not (0 <= int(step) < 2**64) or not (0 <= int(stream) < 2**32):
        raise ValueError(
            f"smallbatch_rs.stochastic_round: seed and step must be in [0, 2**64) and stream in [0, 2**32); "
            f"got seed={seed}, step={step}, stream={stream}"
        )
    return _round(src, True, int(seed), int(step), int(stream))


def round_to_nearest_bf16(x: Tensor) -> Tensor:
    """Rounds a float32 tensor to bfloat16, to nearest with ties to even (what ``x.bfloat16()`` does)."""
    src = _prepare(x, "round_to_nearest_bf16")
    return _round(src, False)
