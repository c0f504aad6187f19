"""smallbatch_rs: native optimizer steps for training language models at small batch sizes.

Drop-in ``torch.optim`` optimizers (:class:`SGD`, :class:`Adam`, :class:`AdamW`, :class:`Adafactor`,
:class:`AdafactorSR`, :class:`Muon`) that step each param group with one native call over its
tensors where torch keeps them (or, with :class:`StepInBackward`, inside backward with no gradient
buffer), bf16 weights with stochastic rounding (:func:`stochastic_round`), and half-life math
(:mod:`smallbatch_rs.halflife`) to set betas in tokens.
"""

from __future__ import annotations

import glob
import os
from typing import Any, Dict

import torch

from . import _core, cuda, halflife
from .optim import SGD, Adafactor, AdafactorSR, Adam, AdamW, Muon, StepInBackward
from .rounding import round_to_nearest_bf16, stochastic_round

__version__: str = _core.__version__


def _step_on_torch_threads() -> None:
    """Runs CPU steps on the OpenMP threads torch has loaded (``SMALLBATCH_THREAD_POOL=own`` keeps
    the core's own pool): torch's workers spin between its kernels, and a step that follows a
    backward pass runs faster on them than on a second pool competing for the same cores."""
    if os.environ.get("SMALLBATCH_THREAD_POOL", "").strip().lower() == "own":
        return
    candidates = sorted(glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp*.so*")))
    try:
        with open("/proc/self/maps") as maps:
            candidates += sorted({line.split()[-1] for line in maps if "libgomp" in line and "/" in line})
    except OSError:  # not Linux
        pass
    for path in candidates:
        if _core.use_openmp_threads(path):
            return


_step_on_torch_threads()

__all__ = [
    "SGD",
    "Adam",
    "AdamW",
    "Adafactor",
    "AdafactorSR",
    "Muon",
    "StepInBackward",
    "stochastic_round",
    "round_to_nearest_bf16",
    "halflife",
    "cuda",
    "backend_info",
    "__version__",
]


def backend_info() -> Dict[str, Any]:
    """What the native core runs with: ``version``, ``simd`` (the path in use, forced with the
    ``SMALLBATCH_SIMD`` environment variable), ``simd_supported``, ``threads`` (set with
    ``SMALLBATCH_NUM_THREADS``), ``thread_pool`` (``"openmp"``: elementwise steps and Adafactor
    run on torch's OpenMP threads; ``"own"``: on the core's pool, or forced with
    ``SMALLBATCH_THREAD_POOL=own``) and ``chunk_elements`` (the fixed work split)."""
    return dict(_core.backend_info())
