"""Stepping each parameter inside backward, so that no full gradient buffer ever exists.

A training loop keeps every parameter's gradient until ``step()``, as much memory as the
parameters. At batch size 1 there is nothing to accumulate, so the paper (Marek et al., 2025)
fuses the optimizer step into the backward pass: as soon as autograd has accumulated a
parameter's gradient, that parameter is stepped and its gradient freed. Peak memory then holds
only the gradients still in flight, not all of them.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Optional, Type, Union

import torch
from torch import Tensor

from .base import NativeOptimizer


class StepInBackward:
    """Steps every parameter with its own ``optimizer_class`` instance from inside backward.

    Use it instead of an optimizer: there is no ``step()`` to call after ``loss.backward()``, and
    no ``zero_grad()``: each gradient is freed as soon as its parameter has been stepped.

    Args:
        params: parameters, ``(name, parameter)`` pairs, or param groups (dicts with ``params``
            and per-group options), as for any optimizer.
        optimizer_class: a smallbatch_rs optimizer class, e.g. ``smallbatch_rs.AdamW``.
        **kwargs: its arguments (``lr``, ``t2``, ``tokens_per_step``, ...).

    Each parameter's stochastic rounding draws from its own seed (``seed + index``), so the bits
    differ from those of one optimizer over the whole group; everything else is the same update.
    Gradient accumulation over micro-batches is impossible by construction (the gradient is gone
    after each backward), and so is DistributedDataParallel, which averages gradients after they
    are accumulated.

    Example::

        stepper = StepInBackward(model.parameters(), smallbatch_rs.AdamW, lr=1e-3)
        for x, y in data:
            loss_fn(model(x), y).backward()   # parameters are updated here
    """

    def __init__(self, params: Union[Iterable[Tensor], Iterable[Dict[str, Any]], Iterable[Any]], optimizer_class: Type[NativeOptimizer], **kwargs: Any):
        if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, NativeOptimizer)):
            raise TypeError(f"StepInBackward needs a smallbatch_rs optimizer class, got {optimizer_class!r}")
        cls = optimizer_class
        groups = _as_groups(params)
        seed = int(kwargs.pop("seed", 0))
        self.optimizers: List[NativeOptimizer] = []
        self.params: List[Tensor] = []
        self._handles: List[Any] = []
        for group in groups:
            options = {k: v for k, v in group.items() if k not in ("params", "param_names")}
            names = group.get("param_names")
            for j, p in enumerate(group["params"]):
                if not p.requires_grad:
                    continue
                one: Dict[str, Any] = dict(options, params=[p])
                if names is not None:
                    one["param_names"] = [names[j]]
                opt = cls([one], seed=seed + len(self.optimizers), **kwargs)  # type: ignore[call-arg]
                self.optimizers.append(opt)
                self.params.append(p)
        if not self.optimizers:
            raise ValueError("StepInBackward: no parameter requires a gradient")
        for opt, p in zip(self.optimizers, self.params):
            self._handles.append(p.register_post_accumulate_grad_hook(self._hook(opt)))
        #: Seconds spent inside the optimizer hooks since the last :meth:`reset_timer` (host time).
        self.step_seconds = 0.0

    def _hook(self, opt: NativeOptimizer) -> Callable[[Tensor], None]:
        import time

        def hook(p: Tensor) -> None:
            start = time.perf_counter()
            opt.step()
            p.grad = None
            self.step_seconds += time.perf_counter() - start

        return hook

    def reset_timer(self) -> None:
        self.step_seconds = 0.0

    @property
    def param_groups(self) -> List[Dict[str, Any]]:
        """Every per-parameter optimizer's group, in parameter order (set ``lr`` here to schedule it)."""
        return [g for opt in self.optimizers for g in opt.param_groups]

    def set_tokens_per_step(self, tokens_per_step: float) -> None:
        for opt in self.optimizers:
            opt.set_tokens_per_step(tokens_per_step)

    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """Runs ``closure`` (which calls backward, where the steps happen) and returns its loss."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to do: gradients are freed inside backward. Frees any left by other code."""
        for p in self.params:
            p.grad = None

    def state_dict(self) -> Dict[str, Any]:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        saved = state_dict.get("optimizers")
        if not isinstance(saved, list) or len(saved) != len(self.optimizers):
            got = len(saved) if isinstance(saved, list) else type(saved).__name__
            raise ValueError(f"StepInBackward: the state has {got} optimizers, this one has {len(self.optimizers)}")
        for opt, sd in zip(self.optimizers, saved):
            opt.load_state_dict(sd)

    def remove(self) -> None:
        """Removes the hooks: backward no longer steps anything."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _as_groups(params: Iterable[Any]) -> List[Dict[str, Any]]:
    items = list(params)
    if not items:
        raise ValueError("StepInBackward: got an empty parameter list")
    if all(isinstance(x, dict) for x in items):
        return [dict(g, params=list(g["params"])) for g in items]
    if all(isinstance(x, tuple) and len(x) == 2 for x in items):
        return [{"params": [p for _, p in items], "param_names": [n for n, _ in items]}]
    return [{"params": items}]
