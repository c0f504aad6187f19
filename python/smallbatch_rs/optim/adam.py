"""Adam and AdamW, one native call per param group, with betas from half-lives in tokens."""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

from torch import Tensor

from .. import _core
from .._tables import StepTable, TensorGroup
from .base import NativeOptimizer, ParamsT, as_float, check_torch_flags

_DEFAULT_BETAS = (0.9, 0.999)


class Adam(NativeOptimizer):
    r"""Adam with torch.optim.Adam's semantics, one native call per param group.

    For each parameter :math:`p` with gradient :math:`g` and its own step count :math:`t`:

    .. math::

        g &= g + \lambda p \qquad (\text{L2 penalty; AdamW instead decays } p \leftarrow p(1 - \eta\lambda)) \\
        m &= \beta_1 m + (1 - \beta_1) g \\
        v &= \beta_2 v + (1 - \beta_2) g^2, \qquad \hat v = \max(\hat v, v) \text{ with amsgrad, else } v \\
        p &= p - \frac{\eta}{1 - \beta_1^t} \cdot \frac{m}{\sqrt{\hat v / (1 - \beta_2^t)} + \epsilon}

    Betas can be given as half-lives in tokens, the rule under which small batches train well
    (Marek et al., 2025): ``beta = 0.5 ** (tokens_per_step / t)``. With a fixed ``t2`` (10M tokens
    in the paper) beta2 moves towards 1 as the batch size falls.

    Args:
        params: parameters or param groups, as for any torch optimizer.
        lr: learning rate.
        betas: (beta1, beta2); default (0.9, 0.999). Not together with ``t1``/``t2``.
        eps: added to the denominator, outside the square root.
        weight_decay: L2 penalty (Adam) or decoupled decay (AdamW).
        t1: half-life in tokens of the first moment (sets beta1).
        t2: half-life in tokens of the second moment (sets beta2).
        tokens_per_step: tokens per optimizer step (batch size x sequence length), needed with
            ``t1``/``t2``; change it later with :meth:`set_tokens_per_step`.
        maximize: maximize the objective instead of minimizing it.
        decoupled_weight_decay: AdamW's decoupled weight decay.
        amsgrad: divide by the running maximum of the second moment (state ``max_exp_avg_sq``).
        stochastic_rounding: for bf16 parameters, round each update back to bf16 stochastically
            instead of to nearest; state stays float32.
        seed: seed of the stochastic rounding's random bits.
        foreach, fused: accepted for torch.optim compatibility (the native step always takes the
            whole group at once); torch's rules for them hold (a tensor ``lr`` or ``betas`` with
            ``foreach=True``, or both True, is a ValueError).
        capturable: keep step counts on the parameters' device and read a tensor ``lr`` there;
            on CUDA the kernels compute the bias corrections from them, so that a CUDA graph can
            capture the step and replay it (torch's meaning; see the README, "CUDA graphs").
            Identical results to a plain step.
        differentiable: must be False.
    """

    state_names = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    exports_step = True
    cuda_supported = True
    halflife_targets = {"t1": ("betas", 0), "t2": ("betas", 1)}
    _decoupled_default = False

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: Optional[Tuple[float, float]] = None,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        t1: Optional[float] = None,
        t2: Optional[float] = None,
        tokens_per_step: Optional[float] = None,
        maximize: bool = False,
        decoupled_weight_decay: Optional[bool] = None,
        stochastic_rounding: bool = False,
        seed: int = 0,
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
        capturable: bool = False,
        differentiable: bool = False,
    ) -> None:
        name = f"smallbatch_rs.{type(self).__name__}"
        check_torch_flags(name, foreach=foreach, fused=fused, differentiable=differentiable)
        if betas is not None and (t1 is not None or t2 is not None):
            raise ValueError(f"{name}: give either betas or the half-lives t1/t2, not both")
        if decoupled_weight_decay is None:
            decoupled_weight_decay = self._decoupled_default
        defaults = dict(
            lr=lr,
            betas=_DEFAULT_BETAS if betas is None else tuple(betas) if isinstance(betas, (tuple, list)) else betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            decoupled_weight_decay=decoupled_weight_decay,
            t1=t1,
            t2=t2,
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
            group.setdefault("amsgrad", False)
            group.setdefault("decoupled_weight_decay", self._decoupled_default)

    def _check_hyperparameters(self, group: Dict[str, Any], group_index: Optional[int]) -> None:
        check_adam_hyperparameters(self, group, group_index)

    def _active_state_names(self, group: Mapping[str, Any]) -> Tuple[str, ...]:
        return self.state_names if group.get("amsgrad") else self.state_names[:2]

    def _step_group(self, group: Dict[str, Any], tg: TensorGroup, table: StepTable) -> None:
        adam_group_step(self, group, tg, table, decoupled_weight_decay=bool(group["decoupled_weight_decay"]))


def check_adam_hyperparameters(opt: NativeOptimizer, group: Dict[str, Any], group_index: Optional[int]) -> None:
    """lr, betas, eps and weight decay of an Adam(W) group (also Muon's AdamW groups), with
    torch's rules for tensors."""
    foreach = group.get("foreach")
    opt._check_tensor_option(group_index, "lr", group["lr"], foreach)
    opt._check_non_negative(group_index, "lr", group["lr"])
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise opt._fail(group_index, "betas", betas, "a pair (beta1, beta2)")
    if isinstance(betas[0], Tensor) != isinstance(betas[1], Tensor):
        raise opt._fail(group_index, "betas", betas, "both floats or both tensors, as torch.optim requires")
    for k in range(2):
        opt._check_tensor_option(group_index, f"betas[{k}]", betas[k], foreach)
    opt._check_beta(group_index, "beta1", betas[0])
    opt._check_beta(group_index, "beta2", betas[1])
    opt._check_non_negative(group_index, "eps", group["eps"])
    opt._check_non_negative(group_index, "weight_decay", group["weight_decay"])


def adam_group_step(
    opt: NativeOptimizer, group: Dict[str, Any], tg: TensorGroup, table: StepTable, *, decoupled_weight_decay: bool
) -> None:
    """The one native Adam(W) call of a group, on the CPU or the group's CUDA device (also used
    by Muon's AdamW groups)."""
    beta1, beta2 = group["betas"]
    amsgrad = bool(group.get("amsgrad", False))
    _core.adam_step(
        tg.table, table.stepped, tg.steps.data_ptr(), table.params, table.grads,
        tg.state_buffer("exp_avg").data_ptr(),
        tg.state_buffer("exp_avg_sq").data_ptr(),
        tg.state_buffer("max_exp_avg_sq").data_ptr() if amsgrad else 0,
        **opt._lr_args(group, tg),
        beta1=as_float(beta1),
        beta2=as_float(beta2),
        eps=as_float(group["eps"]),
        weight_decay=as_float(group["weight_decay"]),
        decoupled_weight_decay=decoupled_weight_decay,
        maximize=bool(group.get("maximize", False)),
        amsgrad=amsgrad,
        **opt._storage_args(group, tg),
        **opt._device_args(tg),
    )


class AdamW(Adam):
    r"""Adam with decoupled weight decay (torch.optim.AdamW's semantics): each step first decays
    the parameters, :math:`p \leftarrow p (1 - \eta \lambda)`, then applies the Adam update.
    Default ``weight_decay=1e-2``, as in torch. See :class:`Adam` for the arguments."""

    _decoupled_default = True

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: Optional[Tuple[float, float]] = None,
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        t1: Optional[float] = None,
        t2: Optional[float] = None,
        tokens_per_step: Optional[float] = None,
        maximize: bool = False,
        stochastic_rounding: bool = False,
        seed: int = 0,
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
        capturable: bool = False,
        differentiable: bool = False,
    ) -> None:
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            t1=t1,
            t2=t2,
            tokens_per_step=tokens_per_step,
            maximize=maximize,
            decoupled_weight_decay=True,
            stochastic_rounding=stochastic_rounding,
            seed=seed,
            foreach=foreach,
            fused=fused,
            capturable=capturable,
            differentiable=differentiable,
        )
