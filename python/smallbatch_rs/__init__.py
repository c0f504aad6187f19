"""smallbatch_rs: native optimizer steps for training language models at small batch sizes.

Drop-in ``torch.optim`` optimizers (:class:`SGD`, :class:`Adam`, :class:`AdamW`, :class:`Adafactor`,
:class:`AdafactorSR`, :class:`Muon`) whose param groups live in flat buffers and are stepped by one
native call each (or, with :class:`StepInBackward`, inside backward with no gradient buffer), bf16 weights with stochastic rounding (:func:`stochastic_round`), and half-life
math (:mod:`smallbatch_rs.halflife`) to set betas in tokens.
"""

from __future__ import annotations

from typing import Any, Dict

from . import _core, cuda, halflife
from .optim import SGD, Adafactor, AdafactorSR, Adam, AdamW, Muon, StepInBackward
from .rounding import round_to_nearest_bf16, stochastic_round

__version__: str = _core.__version__

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
    ``SMALLBATCH_NUM_THREADS``) and ``chunk_elements`` (the fixed work split)."""
    return dict(_core.backend_info())
