"""SGD: stochastic gradient descent with optional momentum, one native call per param group."""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

from .. import _core
from .._tables import StepTable, TensorGroup
from .base import NativeOptimizer, ParamsT, as_float, check_torch_flags


class SGD(NativeOptimizer):
    r"""SGD with torch.optim.SGD's semantics, one native call per param group.

    For each parameter :math:`p` with gradient :math:`g` (negated when ``maximize``):

    .. math::

        d &= g + \lambda p \\
        b &= d \text{ on the first step, else } \mu b + (1 - \tau) d \qquad (\text{if } \mu \ne 0) \\
        d &= d + \mu b \text{ (Nesterov) or } b \\
        p &= p - \eta d

    with learning rate :math:`\eta` (``lr``), momentum :math:`\mu`, dampening :math:`\tau` and
    weight decay :math:`\lambda`. Without momentum no state is kept at all, the paper's
    "vanilla SGD" that is competitive at batch size 1.

    Args:
        params: parameters or param groups, as for any torch optimizer.
        lr: learning rate.
        momentum: momentum factor (0 disables it and its buffer).
        dampening: dampening for momentum.
        weight_decay: L2 penalty.
        nesterov: Nesterov momentum (needs momentum > 0 and dampening 0).
        maximize: maximize the objective instead of minimizing it.
        t1: momentum given as a half-life in tokens instead (``momentum = 0.5 ** (tokens_per_step / t1)``).
        tokens_per_step: tokens per optimizer step (batch size x sequence length), needed with ``t1``.
        stochastic_rounding: for bf16 parameters, round each update back to bf16 stochastically
            (unbiased, so updates far below bf16's resolution still move the weights on average);
            otherwise to nearest. The update itself is computed in float32 from float32 state.
        seed: seed of the stochastic rounding's random bits (deterministic for a given seed).
        foreach, fused: accepted for torch.optim compatibility (the native step always takes the
            whole group at once), with torch's rules for them.
        capturable: keep step counts on the parameters' device and read a tensor ``lr`` there,
            so that a CUDA graph can capture the step and replay it (torch's name; see the README,
            "CUDA graphs"). Identical results to a plain step.
        differentiable: must be False.
    """

    state_names = ("momentum_buffer",)
    exports_step = False
    cuda_supported = True
    halflife_targets = {"t1": ("momentum", None)}

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        momentum: Optional[float] = None,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        t1: Optional[float] = None,
        tokens_per_step: Optional[float] = None,
        stochastic_rounding: bool = False,
        seed: int = 0,
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
        capturable: bool = False,
        differentiable: bool = False,
    ) -> None:
        check_torch_flags(
            f"smallbatch_rs.{type(self).__name__}", foreach=foreach, fused=fused, differentiable=differentiable
        )
        if momentum is not None and t1 is not None:
            raise ValueError(f"smallbatch_rs.{type(self).__name__}: give either momentum or the half-life t1, not both")
        defaults = dict(
            lr=lr,
            momentum=0.0 if momentum is None else momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            t1=t1,
            tokens_per_step=tokens_per_step,
            stochastic_rounding=stochastic_rounding,
            seed=seed,
            foreach=foreach,
            fused=fused,
            capturable=capturable,
            differentiable=differentiable,
        )
        super().__init__(params, defaults)

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)

    def _check_hyperparameters(self, group: Dict[str, Any], group_index: Optional[int]) -> None:
        self._check_tensor_option(group_index, "lr", group["lr"], group.get("foreach"))
        for name in ("lr", "momentum", "dampening", "weight_decay"):
            self._check_non_negative(group_index, name, group[name])
        if group["nesterov"] and (as_float(group["momentum"]) <= 0 or as_float(group["dampening"]) != 0):
            raise ValueError(
                f"{self._name}: Nesterov momentum requires a momentum and zero dampening "
                f"(param group {group_index}: momentum={group['momentum']!r}, dampening={group['dampening']!r})"
            )

    def _exports_step(self, group: Mapping[str, Any]) -> bool:
        # torch's SGD keeps no step; with stochastic rounding the step count seeds the random
        # bits, so it is saved to make a resumed run bit-identical.
        return bool(group.get("stochastic_rounding"))

    def _active_state_names(self, group: Mapping[str, Any]) -> Tuple[str, ...]:
        return self.state_names if as_float(group["momentum"]) != 0 else ()

    def _step_group(self, group: Dict[str, Any], tg: TensorGroup, table: StepTable) -> None:
        momentum = as_float(group["momentum"])
        buf = tg.state_buffer("momentum_buffer").data_ptr() if momentum != 0 else 0
        _core.sgd_step(
            tg.table, table.stepped, tg.steps.data_ptr(), table.params, table.grads, buf,
            **self._lr_args(group, tg),
            momentum=momentum,
            dampening=as_float(group["dampening"]),
            weight_decay=as_float(group["weight_decay"]),
            nesterov=bool(group["nesterov"]),
            maximize=bool(group["maximize"]),
            **self._storage_args(group, tg),
            **self._device_args(tg),
        )
