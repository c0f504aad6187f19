"""Half-life math: EMA coefficients expressed as half-lives in tokens.

An EMA with coefficient ``beta`` forgets half of a gradient after ``n`` steps where
``beta ** n = 1/2``. With ``tokens_per_step = B * T`` tokens per step (batch size times sequence
length) that is a half-life of ``t_half = B*T * ln(1/2) / ln(beta)`` tokens. Marek et al. (2025)
show that keeping ``t_half`` fixed while the batch size changes (for Adam's beta2, 10M tokens at
their scale) lets batch size 1 train as well as large batches.

>>> round(beta_from_halflife(10e6, 1 * 512), 6)
0.999965
>>> round(beta_from_halflife(10e6, 64 * 512), 6)
0.997731

All three functions raise ValueError naming the argument that is out of range.
"""

from __future__ import annotations

from . import _core

__all__ = ["beta_from_halflife", "halflife_from_beta", "scale_beta"]


def beta_from_halflife(halflife_tokens: float, tokens_per_step: float) -> float:
    """``0.5 ** (tokens_per_step / halflife_tokens)``: the coefficient with this half-life.

    Both arguments must be finite and > 0.
    """
    return _core.beta_from_halflife(float(halflife_tokens), float(tokens_per_step))


def halflife_from_beta(beta: float, tokens_per_step: float) -> float:
    """``tokens_per_step * ln(0.5) / ln(beta)``: the half-life in tokens of coefficient ``beta``.

    ``beta`` must lie in (0, 1); ``tokens_per_step`` must be finite and > 0.
    """
    return _core.halflife_from_beta(float(beta), float(tokens_per_step))


def scale_beta(beta: float, from_tokens_per_step: float, to_tokens_per_step: float) -> float:
    """``beta ** (to_tokens_per_step / from_tokens_per_step)``: the coefficient that keeps the same
    half-life in tokens when the tokens per step change (e.g. the batch size).

    >>> round(scale_beta(0.999965, 512, 64 * 512), 4)
    0.9978
    """
    return _core.scale_beta(float(beta), float(from_tokens_per_step), float(to_tokens_per_step))
