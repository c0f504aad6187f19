"""Adafactor: factored second moments, a few bytes of state per parameter row and column."""

from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from torch import Tensor

from .. import _core
from .._sharding import Replicate
from .._tables import StepTable, TensorGroup
from .base import NativeOptimizer, ParamsT, as_float


class Adafactor(NativeOptimizer):
    r"""Adafactor with the paper's defaults (Marek et al., 2025) and torch.optim.Adafactor's options,
    one native call per param group.

    For a tensor seen as matrices over its last two dims, with gradient :math:`G` and step :math:`t`:

    .. math::

        r &\leftarrow \beta_2 r + (1-\beta_2)\,\mathrm{mean}_\text{cols}(G^2 + \epsilon_1), \quad
        c \leftarrow \beta_2 c + (1-\beta_2)\,\mathrm{mean}_\text{rows}(G^2 + \epsilon_1), \quad
        V = r c^\top / \mathrm{mean}(r) \\
        U &= G / \sqrt{V}, \qquad U \leftarrow U / \max(1, \mathrm{RMS}(U) / d) \\
        P &\leftarrow P (1 - \eta\lambda) - \eta \max(\epsilon_2, \mathrm{RMS}(P))\, U

    Tensors whose smaller last-two dim is below ``min_dim_size_to_factor`` (and vectors) keep a
    full second moment :math:`V \leftarrow \beta_2 V + (1-\beta_2)(G^2+\epsilon_1)` instead. With
    ``beta1`` (or ``t1``) the clipped update goes through a momentum EMA first.

    beta2 comes from, in order of preference: the half-life ``t2`` in tokens with
    ``tokens_per_step`` (a constant EMA, the paper's rule), an explicit constant ``beta2``, or
    torch's schedule ``beta2_t = 1 - t ** beta2_decay``.

    On a CUDA device the same math runs in the kernels of ``cuda/adafactor.cu``: elementwise
    results and stochastic rounding match the CPU core bit for bit given the same sums; the
    sums of squares are added in a different (fixed) order, so they may differ in their last bits.

    To reproduce torch.optim.Adafactor, pass ``eps=(None, 1e-3)`` (torch's clamps instead of
    adding eps1), ``min_dim_size_to_factor=1`` (torch factors every tensor with two or more dims)
    and ``step_size_cap=True`` (torch caps the step size at :math:`1/\sqrt{t}`).

    Args:
        params: parameters or param groups.
        lr: learning rate.
        beta2_decay: exponent of torch's schedule, used when neither ``t2`` nor ``beta2`` is given.
        eps: ``(eps1, eps2)``: eps1 is added to :math:`G^2` (None: torch's clamps at float32's
            epsilon); eps2 floors the parameter RMS in the relative step size.
        d: clipping threshold on the update's RMS (>= 1).
        weight_decay: decoupled weight decay.
        maximize: maximize the objective instead of minimizing it.
        beta1: momentum coefficient (None: no momentum and no momentum state).
        beta2: constant second-moment coefficient.
        t1, t2: the same as half-lives in tokens; need ``tokens_per_step``.
        tokens_per_step: tokens per optimizer step (batch size x sequence length).
        min_dim_size_to_factor: factor a tensor when the smaller of its last two dims is at least this.
        relative_step: scale the step by the parameter RMS (``max(eps2, RMS(P))``).
        step_size_cap: cap the step size at ``1/sqrt(t)``, as torch.optim.Adafactor does.
        stochastic_rounding: for bf16 parameters, round each update back to bf16 stochastically
            instead of to nearest (see :class:`AdafactorSR`).
        seed: seed of the stochastic rounding's random bits.
        capturable: keep step counts on the parameters' device and read a tensor ``lr`` there;
            on CUDA the kernels take the counts, compute the beta2 weights and read the learning
            rate, so that a CUDA graph can capture the step and replay it (torch's name; see the
            README, "CUDA graphs"). Identical results to a plain step. Not with parameters
            spread over several ranks (FSDP2).
    """

    state_names = ("row_var", "col_var", "variance", "exp_avg")
    exports_step = True
    cuda_supported = True
    capturable_sharded = False
    row_major = True
    halflife_targets = {"t1": ("beta1", None), "t2": ("beta2", None)}

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-2,
        beta2_decay: float = -0.8,
        eps: Tuple[Optional[float], float] = (1e-30, 1e-3),
        d: float = 1.0,
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        beta1: Optional[float] = None,
        beta2: Optional[float] = None,
        t1: Optional[float] = None,
        t2: Optional[float] = None,
        tokens_per_step: Optional[float] = None,
        min_dim_size_to_factor: int = 128,
        relative_step: bool = True,
        step_size_cap: bool = False,
        stochastic_rounding: bool = False,
        seed: int = 0,
        capturable: bool = False,
    ) -> None:
        name = f"smallbatch_rs.{type(self).__name__}"
        if beta1 is not None and t1 is not None:
            raise ValueError(f"{name}: give either beta1 or the half-life t1, not both")
        if beta2 is not None and t2 is not None:
            raise ValueError(f"{name}: give either beta2 or the half-life t2, not both")
        defaults = dict(
            lr=lr,
            beta2_decay=beta2_decay,
            eps=tuple(eps) if isinstance(eps, (tuple, list)) else eps,
            d=d,
            weight_decay=weight_decay,
            maximize=maximize,
            beta1=beta1,
            beta2=beta2,
            t1=t1,
            t2=t2,
            tokens_per_step=tokens_per_step,
            min_dim_size_to_factor=min_dim_size_to_factor,
            relative_step=relative_step,
            step_size_cap=step_size_cap,
            stochastic_rounding=stochastic_rounding,
            seed=seed,
            capturable=capturable,
        )
        super().__init__(params, defaults)

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            # A checkpoint of torch.optim.Adafactor: keep torch's semantics.
            if "min_dim_size_to_factor" not in group:
                group.update(beta1=None, beta2=None, min_dim_size_to_factor=1, relative_step=True, step_size_cap=True)

    def _check_hyperparameters(self, group: Dict[str, Any], group_index: Optional[int]) -> None:
        self._check_non_negative(group_index, "lr", group["lr"])
        for key in ("beta1", "beta2"):
            if group.get(key) is not None:
                self._check_beta(group_index, key, group[key])
        decay = group["beta2_decay"]
        if not isinstance(decay, (int, float)) or not (math.isfinite(decay) and decay <= 0):
            raise self._fail(group_index, "beta2_decay", decay, "finite and <= 0 (beta2_t = 1 - t ** beta2_decay)")
        eps = group["eps"]
        if not isinstance(eps, tuple) or len(eps) != 2:
            raise self._fail(group_index, "eps", eps, "a pair (eps1, eps2)")
        if eps[0] is not None:
            self._check_non_negative(group_index, "eps1", eps[0])
        self._check_non_negative(group_index, "eps2", eps[1])
        d = group["d"]
        if not isinstance(d, (int, float)) or not (math.isfinite(d) and d >= 1):
            raise self._fail(group_index, "d", d, "finite and >= 1")
        self._check_non_negative(group_index, "weight_decay", group["weight_decay"])
        m = group["min_dim_size_to_factor"]
        if not isinstance(m, int) or isinstance(m, bool) or m < 0:
            raise self._fail(group_index, "min_dim_size_to_factor", m, "an integer >= 0")

    def _init_tensor_group(self, group: Dict[str, Any], tg: TensorGroup) -> None:
        # Which tensors are factored is fixed when the group is added: it decides the state's shapes.
        threshold = group["min_dim_size_to_factor"]
        factored = [p.dim() >= 2 and p.numel() > 0 and min(p.shape[-2], p.shape[-1]) >= threshold for p in tg.params]
        tg.layout = _core.AdafactorLayout(tg.table, factored)

    def _active_state_names(self, group: Mapping[str, Any]) -> Tuple[str, ...]:
        names: Tuple[str, ...] = ("row_var", "col_var", "variance")
        return names + ("exp_avg",) if group.get("beta1") else names

    def _state_views(self, group: Mapping[str, Any], tg: TensorGroup, i: int) -> Dict[str, Tensor]:
        layout = tg.layout
        shape = tg.shapes[i]
        views: Dict[str, Tensor] = {}
        if layout.factored[i]:
            row_shape = shape[:-1] + (1,)
            col_shape = shape[:-2] + (1, shape[-1])
            views["row_var"] = tg.aux_view("row_var", layout.row_total, layout.row_offsets[i], row_shape)
            views["col_var"] = tg.aux_view("col_var", layout.col_total, layout.col_offsets[i], col_shape)
        else:
            views["variance"] = tg.aux_view("variance", layout.variance_total, layout.variance_offsets[i], shape)
        if group.get("beta1"):
            views["exp_avg"] = tg.state_view("exp_avg", i)
        return views

    def _step_group(self, group: Dict[str, Any], tg: TensorGroup, table: StepTable) -> None:
        """One native call: the CPU core, or on the group's CUDA device the kernels of
        cuda/adafactor.cu (same math; the stochastic rounding draws the same bits)."""
        layout = tg.layout
        beta1 = as_float(group["beta1"]) if group.get("beta1") else 0.0
        eps1, eps2 = group["eps"]
        device = self._device_args(tg)
        if device["device"] is not None:
            from .. import cuda as _cuda

            device["workspace"] = _cuda.group_workspace(tg)
        if tg.sharding is not None and any(tg.sharding.split):
            device.update(self._sharded_args(tg, on_device=device["device"] is not None))
        _core.adafactor_step(
            tg.table, layout, table.stepped, tg.steps.data_ptr(), table.params, table.grads,
            tg.aux_buffer("row_var", layout.row_total).data_ptr(),
            tg.aux_buffer("col_var", layout.col_total).data_ptr(),
            tg.aux_buffer("variance", layout.variance_total).data_ptr(),
            tg.state_buffer("exp_avg").data_ptr() if beta1 else 0,
            **self._lr_args(group, tg),
            beta1=beta1,
            beta2=None if group.get("beta2") is None else as_float(group["beta2"]),
            beta2_decay=float(group["beta2_decay"]),
            eps1=None if eps1 is None else float(eps1),
            eps2=float(eps2),
            clip_threshold=float(group["d"]),
            relative_step=bool(group["relative_step"]),
            cap_lr_at_inv_sqrt_step=bool(group["step_size_cap"]),
            weight_decay=as_float(group["weight_decay"]),
            maximize=bool(group["maximize"]),
            **self._storage_args(group, tg),
            **device,
        )


    def _sharded_args(self, tg: TensorGroup, on_device: bool) -> Dict[str, Any]:
        """How the group's shards make up whole tensors, and the sum across ranks that combines
        their statistics (see ``adafactor_step_sharded`` in the core): per tensor, whether it is
        whole on every rank (0), spread by elements or whole matrices (1: the RMS sums are
        combined) or by the rows of its matrix (2: the column statistics and mean(r) too).

        On the CPU the native step hands the sums over as a buffer. On CUDA its kernels pack them
        into a float64 vector on the device, the *exchange*, and ask for a range of it to be
        summed in place (an all-reduce in stream order: no copy to the host)."""
        sharding = tg.sharding
        assert sharding is not None
        split = []
        for i, p in enumerate(tg.params):
            if not sharding.split[i]:
                split.append(0)
            elif tg.layout.factored[i] and p.dim() == 2:
                split.append(2)
            else:
                split.append(1)
        rows = [s[-2] if len(s) >= 2 else 1 for s in sharding.global_shapes]
        group = sharding.group

        shards = (split, sharding.global_numels, rows)
        if on_device:
            # At most 3 + cols values per tensor (see "Shards" in cuda/adafactor.cu).
            capacity = sum(3 + m[2] for m in tg.matrices)
            exchange = torch.empty(capacity, dtype=torch.float64, device=tg.params[0].device)

            def sum_range(first: int, count: int) -> None:
                torch.distributed.all_reduce(exchange[first : first + count], group=group)

            return dict(shards=shards, sum_across_ranks=sum_range, exchange=(exchange.data_ptr(), capacity))

        def sum_across_ranks(buf: bytearray) -> None:
            if len(buf):
                torch.distributed.all_reduce(torch.frombuffer(buf, dtype=torch.float64), group=group)

        return dict(shards=shards, sum_across_ranks=sum_across_ranks)

    def _state_spec(self, group: Mapping[str, Any], tg: TensorGroup, i: int, name: str) -> Tuple[Tuple[int, ...], Tuple[Any, ...]]:
        # Row EMAs are sharded with their rows; a matrix's column EMAs are whole on every rank
        # (its rows are spread, its columns not), unless whole matrices of a batch are spread.
        sharding = tg.sharding
        assert sharding is not None
        shape, placements = sharding.global_shapes[i], sharding.placements[i]
        if name == "row_var":
            return shape[:-1] + (1,), placements
        if name == "col_var":
            col_shape = shape[:-2] + (1, shape[-1])
            if len(shape) == 2:
                return col_shape, tuple(Replicate() for _ in placements)
            return col_shape, placements
        return shape, placements


class AdafactorSR(Adafactor):
    r"""Adafactor for bf16 weights with stochastic rounding: the paper's full fine-tuning setup
    (Marek et al., 2025), about 2 bytes per parameter of weights plus state.

    The update is computed in float32 from float32 factored state and rounded back to the bf16
    weights stochastically: ``(bits + r) >> 16`` with ``r`` uniform in ``[0, 2^16)``, so the
    rounding is unbiased and updates far below bf16's resolution still move the weights on
    average (round-to-nearest would drop them). The random bits come from Philox4x32-10 keyed by
    ``seed`` and depend only on (seed, step, element, param group): runs are deterministic and
    resume bit for bit. float32 param groups are stepped in float32.

    Same arguments as :class:`Adafactor`, with ``stochastic_rounding=True``.
    """

    def __init__(self, params: ParamsT, *args: Any, seed: int = 0, **kwargs: Any) -> None:
        kwargs.setdefault("stochastic_rounding", True)
        super().__init__(params, *args, seed=seed, **kwargs)
