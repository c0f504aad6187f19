"""Muon: orthogonalised momentum for weight matrices, with a built-in AdamW for everything else."""

from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import _core
from .._tables import StepTable, TensorGroup, describe
from .adam import adam_group_step, check_adam_hyperparameters
from .base import NativeOptimizer, ParamsT, as_float

_MUON_TARGETS = {"t1": ("momentum", None)}
_ADAMW_TARGETS = {"t1": ("betas", 0), "t2": ("betas", 1)}
_ADJUST_LR = (None, "original", "match_rms_adamw", "none")
_NS_PRECISIONS = ("float32", "bfloat16")


class Muon(NativeOptimizer):
    r"""Muon (torch.optim.Muon's semantics, with Newton-Schulz in float32 in the native core or in
    cuBLAS on a CUDA device), and a built-in AdamW for the parameters Muon should not step.

    For each weight matrix :math:`W` with gradient :math:`G` and momentum buffer :math:`B`:

    .. math::

        B &\leftarrow \mu B + (1-\mu) G, \qquad U = G + \mu (B - G) \text{ (Nesterov) or } B \\
        O &= \mathrm{NS}_5(U): \; X \leftarrow U / \|U\|_F;\; 5\times\; A = X X^\top,\;
             X \leftarrow a X + (b A + c A^2) X \quad (a, b, c) = (3.4445, -4.7750, 2.0315) \\
        W &\leftarrow W (1 - \eta\lambda) - \eta\, s\, O, \qquad
             s = \sqrt{\max(1, \text{rows}/\text{cols})} \text{ or } 0.2\sqrt{\max(\text{rows}, \text{cols})}

    (tall matrices are orthogonalised through their transpose). Tensors with more than two dims
    are a batch of matrices over their last two dims (per-head orthogonalisation), or, with
    ``flatten=True``, one matrix ``(shape[0], rest)``.

    **Groups.** A param group with ``use_muon=False`` is stepped by AdamW: its ``lr``, ``betas``,
    ``eps``, ``weight_decay`` (and ``t1``/``t2``) are AdamW's, defaulting to the ``adamw_*``
    arguments. Put embeddings and output heads there, as Muon users do. A group that does not say
    (``use_muon`` unset) is split when added: its matrices become a Muon group and its other
    tensors (biases, norms) an AdamW group, so ``param_groups`` can hold more groups than were
    passed; each says which it is in ``use_muon``.

    Args:
        params: parameters or param groups.
        lr: Muon's learning rate.
        weight_decay: Muon's decoupled weight decay.
        momentum: momentum EMA coefficient (default 0.95); or ``t1``, its half-life in tokens.
        nesterov: Nesterov momentum.
        ns_coefficients, ns_steps, eps: the Newton-Schulz iteration.
        adjust_lr_fn: ``None``/``"original"`` (:math:`\sqrt{\max(1, r/c)}`), ``"match_rms_adamw"``
            (:math:`0.2\sqrt{\max(r, c)}`, so AdamW learning rates carry over) or ``"none"``.
        t1: momentum as a half-life in tokens; needs ``tokens_per_step``.
        tokens_per_step: tokens per optimizer step (batch size x sequence length).
        flatten: orthogonalise tensors with more than two dims as one matrix each.
        maximize: maximize the objective.
        adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay, adamw_t1, adamw_t2: the AdamW groups' defaults.
        ns_precision: ``"float32"`` (default) or ``"bfloat16"``: the input precision of the
            Newton-Schulz products on CUDA (bf16 operands, float32 accumulation and results, as
            torch's Muon computes in bf16). CUDA only: the CPU core always runs float32.
        stochastic_rounding, seed: for bf16 parameters, stochastic rounding of every update.
        capturable: keep step counts on the parameters' device and read a tensor ``lr`` there;
            on CUDA the apply kernels read both (AdamW groups: as :class:`AdamW`), so that a
            CUDA graph can capture the step and replay it (torch's name; see the README, "CUDA
            graphs"). Identical results to a plain step. Not with matrices spread over several
            ranks (FSDP2).

    **On CUDA** momentum, normalisation and the update run in the kernels of ``cuda/muon.cu``
    and the products in cuBLAS, same-shape matrices batched together; AdamW groups run the CUDA
    Adam kernels. cuBLAS does not add in the CPU's order, so results agree with the CPU to
    rounding, not bit for bit.
    """

    state_names = ("momentum_buffer", "exp_avg", "exp_avg_sq")
    cuda_supported = True
    capturable_sharded = False
    row_major = True

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: Optional[float] = None,
        nesterov: bool = True,
        ns_coefficients: Tuple[float, float, float] = (3.4445, -4.775, 2.0315),
        eps: float = 1e-7,
        ns_steps: int = 5,
        adjust_lr_fn: Optional[str] = None,
        *,
        t1: Optional[float] = None,
        tokens_per_step: Optional[float] = None,
        flatten: bool = False,
        maximize: bool = False,
        adamw_lr: float = 3e-4,
        adamw_betas: Optional[Tuple[float, float]] = None,
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float = 0.0,
        adamw_t1: Optional[float] = None,
        adamw_t2: Optional[float] = None,
        ns_precision: str = "float32",
        stochastic_rounding: bool = False,
        seed: int = 0,
        capturable: bool = False,
    ) -> None:
        name = f"smallbatch_rs.{type(self).__name__}"
        if momentum is not None and t1 is not None:
            raise ValueError(f"{name}: give either momentum or the half-life t1, not both")
        if adamw_betas is not None and (adamw_t1 is not None or adamw_t2 is not None):
            raise ValueError(f"{name}: give either adamw_betas or the half-lives adamw_t1/adamw_t2, not both")
        self._adamw_defaults = dict(
            lr=adamw_lr,
            betas=tuple(adamw_betas) if adamw_betas is not None else (0.9, 0.95),
            eps=adamw_eps,
            weight_decay=adamw_weight_decay,
            t1=adamw_t1,
            t2=adamw_t2,
        )
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=0.95 if momentum is None else momentum,
            nesterov=nesterov,
            ns_coefficients=tuple(ns_coefficients),
            eps=eps,
            ns_steps=ns_steps,
            adjust_lr_fn=adjust_lr_fn,
            t1=t1,
            tokens_per_step=tokens_per_step,
            flatten=flatten,
            maximize=maximize,
            ns_precision=ns_precision,
            stochastic_rounding=stochastic_rounding,
            seed=seed,
            capturable=capturable,
            use_muon=True,
            # read by AdamW groups only (Muon groups have no betas)
            betas=self._adamw_defaults["betas"],
        )
        super().__init__(params, defaults)

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("ns_precision", "float32")

    # --- groups ----------------------------------------------------------------------------

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Adds a Muon group, an AdamW group (``use_muon=False``), or, when ``use_muon`` is unset,
        both: the group's matrices go to Muon and its other tensors to AdamW."""
        group = dict(param_group)
        params = group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        use = group.get("use_muon")
        if use is False:
            super().add_param_group(self._as_adamw_group(group, params))
            return
        if use is True:
            super().add_param_group(dict(group, params=params))
            return
        tensors = [p[1] if isinstance(p, tuple) else p for p in params]
        matrices = [p for p, t in zip(params, tensors) if t.dim() >= 2]
        others = [p for p, t in zip(params, tensors) if t.dim() < 2]
        group.pop("use_muon", None)
        if matrices:
            super().add_param_group(dict(group, params=matrices, use_muon=True))
        if others:
            super().add_param_group(self._as_adamw_group(group, others))

    def _as_adamw_group(self, group: Dict[str, Any], params: List[Any]) -> Dict[str, Any]:
        """An AdamW group: Muon-only keys dropped, AdamW's keys from ``adamw_*`` where not given."""
        out: Dict[str, Any] = {"params": params, "use_muon": False}
        explicit_adamw = group.get("use_muon") is False
        for key in ("lr", "betas", "eps", "weight_decay", "t1", "t2"):
            if explicit_adamw and key in group:
                out[key] = group[key]
            elif f"adamw_{key}" in group:
                out[key] = group[f"adamw_{key}"]
        for key, value in self._adamw_defaults.items():
            # Default betas come through the optimizer's defaults instead: given here they would
            # count as explicit and clash with half-lives given for this group.
            if key != "betas":
                out.setdefault(key, value)
        for key in ("tokens_per_step", "maximize", "stochastic_rounding", "seed", "param_names"):
            if key in group:
                out[key] = group[key]
        return out

    def _halflife_targets(self, group: Mapping[str, Any]) -> Mapping[str, Tuple[str, Optional[int]]]:
        return _MUON_TARGETS if group.get("use_muon", True) else _ADAMW_TARGETS

    def _exports_step(self, group: Mapping[str, Any]) -> bool:
        # AdamW groups keep torch's "step"; Muon groups (like torch's Muon) only with stochastic
        # rounding, whose random bits the step count seeds.
        return not group.get("use_muon", True) or bool(group.get("stochastic_rounding"))

    def _matrices(self, group: Mapping[str, Any], params: Sequence[Tensor]) -> Optional[list]:
        if group.get("use_muon", True) and group.get("flatten"):
            return [[1, p.shape[0], p.numel() // p.shape[0] if p.shape[0] else 0] for p in params]
        return None

    def _check_params(self, params: Sequence[Tensor], group_index: int, names: Optional[Sequence[str]]) -> None:
        super()._check_params(params, group_index, names)
        group = self.param_groups[group_index] if group_index < len(self.param_groups) else {}
        if group.get("use_muon", True):
            for i, p in enumerate(params):
                if p.dim() < 2:
                    raise ValueError(
                        f"{self._name}: {describe(i, group_index, p, names)} is not a matrix; "
                        "put it in a param group with use_muon=False (stepped by AdamW)"
                    )

    def _check_hyperparameters(self, group: Dict[str, Any], group_index: Optional[int]) -> None:
        if group.get("use_muon", True):
            self._check_non_negative(group_index, "lr", group["lr"])
            self._check_non_negative(group_index, "weight_decay", group["weight_decay"])
            self._check_beta(group_index, "momentum", group["momentum"])
            coeffs = group["ns_coefficients"]
            if not isinstance(coeffs, tuple) or len(coeffs) != 3 or not all(math.isfinite(float(c)) for c in coeffs):
                raise self._fail(group_index, "ns_coefficients", coeffs, "three finite numbers (a, b, c)")
            steps = group["ns_steps"]
            if not isinstance(steps, int) or isinstance(steps, bool) or not 0 <= steps < 100:
                raise self._fail(group_index, "ns_steps", steps, "an integer in [0, 100)")
            eps = group["eps"]
            if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
                raise self._fail(group_index, "eps", eps, "finite and > 0")
            if group["adjust_lr_fn"] not in _ADJUST_LR:
                raise self._fail(group_index, "adjust_lr_fn", group["adjust_lr_fn"], "None, 'original', 'match_rms_adamw' or 'none'")
            precision = group.get("ns_precision", "float32")
            if precision not in _NS_PRECISIONS:
                raise self._fail(group_index, "ns_precision", precision, "'float32' or 'bfloat16'")
            on_cpu = any(p.device.type != "cuda" for p in group.get("params", ()))
            if precision == "bfloat16" and on_cpu:
                raise self._fail(
                    group_index, "ns_precision", precision, "'float32' for CPU parameters (bf16 products run on CUDA only)"
                )
        else:
            check_adam_hyperparameters(self, group, group_index)

    def _active_state_names(self, group: Mapping[str, Any]) -> Tuple[str, ...]:
        return ("momentum_buffer",) if group.get("use_muon", True) else ("exp_avg", "exp_avg_sq")

    # --- step ------------------------------------------------------------------------------

    def _step_group(self, group: Dict[str, Any], tg: TensorGroup, table: StepTable) -> None:
        if not group.get("use_muon", True):
            adam_group_step(self, group, tg, table, decoupled_weight_decay=True)
            return
        a, b, c = group["ns_coefficients"]
        device = self._device_args(tg)
        if device["device"] is not None:
            from .. import cuda as _cuda

            _cuda.preload_cublas()
            device["workspace"] = _cuda.group_workspace(tg)
        if tg.sharding is not None and any(tg.sharding.split):
            device.update(_sharded_muon_args(group, tg, table, device))
        _core.muon_step(
            tg.table, table.stepped, tg.steps.data_ptr(), table.params, table.grads,
            tg.state_buffer("momentum_buffer").data_ptr(),
            **self._lr_args(group, tg),
            momentum=as_float(group["momentum"]),
            nesterov=bool(group["nesterov"]),
            weight_decay=as_float(group["weight_decay"]),
            ns_coefficients=(float(a), float(b), float(c)),
            ns_steps=int(group["ns_steps"]),
            eps=float(group["eps"]),
            adjust_lr_fn=group["adjust_lr_fn"],
            maximize=bool(group.get("maximize", False)),
            ns_precision=group.get("ns_precision", "float32"),
            **self._storage_args(group, tg),
            **device,
        )


def _sharded_muon_args(group: Mapping[str, Any], tg: TensorGroup, table: StepTable,
                       device: Mapping[str, Any]) -> Dict[str, Any]:
    """The whole matrices of a sharded Muon group and the exchange that orthogonalises them.

    The native step updates the momentum of this rank's elements, hands their ``U`` to
    ``orthogonalize`` and applies what it leaves there. Matrices that are whole on this rank
    (replicated tensors, and the matrices of a batch whose batch dim is sharded) are
    orthogonalised here. A matrix whose rows are spread over the ranks is gathered to one rank,
    its *owner*, orthogonalised there, and its rows scattered back: each rank orthogonalises
    some of the matrices (the largest first, each to the least loaded rank), as distributed
    Muon implementations do, instead of every rank gathering every matrix. One gather and one
    scatter per owning rank per step, each of all the matrices that rank owns.

    On the CPU the native step hands ``U`` over as a buffer. On CUDA its kernels write ``U`` to a
    float32 vector on the device, ``updates``, and the exchange works there in stream order
    (collectives of device tensors, Newton-Schulz in cuBLAS): nothing goes through the host.
    """
    import torch.distributed as dist

    sharding = tg.sharding
    assert sharding is not None
    flatten = bool(group.get("flatten"))
    whole: List[Tuple[int, int]] = []
    for shape in sharding.global_shapes:
        if flatten:
            whole.append((shape[0], math.prod(shape[1:])))
        else:
            whole.append((shape[-2], shape[-1]))
    a, b, c = group["ns_coefficients"]
    ns: Dict[str, Any] = dict(
        ns_coefficients=(float(a), float(b), float(c)), ns_steps=int(group["ns_steps"]), eps=float(group["eps"])
    )
    on_device = device.get("device") is not None
    if on_device:
        ns.update(device=device["device"], workspace=device["workspace"],
                  ns_precision=group.get("ns_precision", "float32"))
    stepped = [i for i, on in enumerate(table.stepped) if on]
    spread = [i for i in stepped if sharding.split[i] and (flatten or len(sharding.global_shapes[i]) == 2)]
    local = [i for i in stepped if i not in set(spread)]
    pg = sharding.group
    world = dist.get_world_size(pg)
    me = dist.get_rank(pg)
    owners = _owners(spread, whole, world)
    numel = [m[0] * m[1] * m[2] for m in tg.matrices]

    def orthogonalize_in(u: Tensor) -> None:
        views: Dict[int, Tensor] = {}
        offset = 0
        for i in stepped:
            views[i] = u[offset : offset + numel[i]]
            offset += numel[i]
        # Matrices whole on this rank.
        mats = [i for i in local if numel[i]]
        if mats:
            src = torch.cat([views[i] for i in mats])
            dst = torch.empty_like(src)
            shapes = [(tg.matrices[i][1], tg.matrices[i][2]) for i in mats for _ in range(tg.matrices[i][0])]
            _core.orthogonalize(src.data_ptr(), dst.data_ptr(), shapes, **ns)
            at = 0
            for i in mats:
                views[i].copy_(dst[at : at + numel[i]])
                at += numel[i]
        # Matrices whose rows are spread: to their owner and back.
        for owner in range(world):
            mine = [i for i in spread if owners[i] == owner]
            if mine:
                _exchange(mine, views, whole, owner, me, world, pg, ns)

    if on_device:
        updates = torch.empty(sum(numel[i] for i in stepped), dtype=torch.float32, device=tg.params[0].device)
        return dict(whole=whole, orthogonalize=lambda: orthogonalize_in(updates),
                    updates=(updates.data_ptr(), updates.numel()))

    def orthogonalize(buf: bytearray) -> None:
        orthogonalize_in(torch.frombuffer(buf, dtype=torch.float32))

    return dict(whole=whole, orthogonalize=orthogonalize)


def _owners(spread: List[int], whole: List[Tuple[int, int]], world: int) -> Dict[int, int]:
    """Which rank orthogonalises each spread matrix: the costliest first, each to the rank with
    the least work so far (the same answer on every rank)."""
    load = [0] * world
    owners: Dict[int, int] = {}
    cost = {i: whole[i][0] * whole[i][1] * min(whole[i]) for i in spread}
    for i in sorted(spread, key=lambda i: (-cost[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owners[i] = r
        load[r] += cost[i]
    return owners


def _exchange(mine: List[int], views: Dict[int, Tensor], whole: List[Tuple[int, int]], owner: int, me: int,
              world: int, pg: Any, ns: Dict[str, Any]) -> None:
    """Gathers the rows of the matrices ``mine`` to ``owner`` (torch.chunk's split of the rows,
    as FSDP2 shards them), orthogonalises them there and scatters their rows back into ``views``."""
    import torch.distributed as dist

    def rows_of(i: int, k: int) -> Tuple[int, int]:
        chunk = -(-whole[i][0] // world)
        return min(k * chunk, whole[i][0]), min((k + 1) * chunk, whole[i][0])

    for i in mine:
        r0, r1 = rows_of(i, me)
        if views[i].numel() != (r1 - r0) * whole[i][1]:
            raise RuntimeError(
                f"smallbatch_rs.Muon: rank {me} holds {views[i].numel()} elements of a {whole[i][0]}x{whole[i][1]} "
                f"matrix, not rows {r0}..{r1} (torch.chunk's split over {world} ranks, as fully_shard makes)"
            )
    padded = {i: -(-whole[i][0] // world) * whole[i][1] for i in mine}
    send = torch.zeros(sum(padded.values()), dtype=torch.float32, device=views[mine[0]].device)
    at = 0
    for i in mine:
        send[at : at + views[i].numel()].copy_(views[i])
        at += padded[i]
    dst = dist.get_global_rank(pg, owner) if pg is not None else owner
    parts = [torch.empty_like(send) for _ in range(world)] if me == owner else None
    dist.gather(send, parts, dst=dst, group=pg)
    pieces = None
    if me == owner:
        assert parts is not None
        full = []
        at = 0
        for i in mine:
            for k in range(world):
                r0, r1 = rows_of(i, k)
                full.append(parts[k][at : at + (r1 - r0) * whole[i][1]])
            at += padded[i]
        src = torch.cat(full)
        out = torch.empty_like(src)
        _core.orthogonalize(src.data_ptr(), out.data_ptr(), [whole[i] for i in mine], **ns)
        pieces = [torch.zeros_like(send) for _ in range(world)]
        start = 0
        at = 0
        for i in mine:
            for k in range(world):
                r0, r1 = rows_of(i, k)
                n = (r1 - r0) * whole[i][1]
                pieces[k][at : at + n].copy_(out[start + r0 * whole[i][1] : start + r1 * whole[i][1]])
            start += whole[i][0] * whole[i][1]
            at += padded[i]
    recv = torch.empty_like(send)
    dist.scatter(recv, pieces, src=dst, group=pg)
    at = 0
    for i in mine:
        views[i].copy_(recv[at : at + views[i].numel()])
        at += padded[i]
