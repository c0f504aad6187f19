"""Param groups of DTensor parameters (FSDP2's ``fully_shard``): each rank steps its local shards.

FSDP2 shards every parameter on dim 0 (``Shard(0)``; ``torch.chunk``'s split, so the last ranks
may hold fewer rows or none), and keeps the local rows as an ordinary dense tensor (the
DTensor's local tensor), with the gradient sharded the same way. An elementwise rule updates
each element from its own parameter, gradient and state, so stepping the local rows is the
unsharded step restricted to them; the state lives with them, shard for shard.

Two things still see the whole tensor:

- the random bits of stochastic rounding: element ``k`` of the unsharded group draws the bits
  of index ``k``. A shard passes each local tensor's *draw offset* (the index of its first
  element in the unsharded group) so that a sharded bf16 run rounds exactly as the unsharded
  one (:attr:`Sharding.draws`);
- ``state_dict()``: DCP (``torch.distributed.checkpoint``) saves, loads and reshards state that
  is a DTensor with the parameter's placements, so each state tensor is exported as one
  (:meth:`Sharding.export`); loading accepts DTensors, full tensors and local shards.

Rules that reduce over a whole tensor (Adafactor's row and column statistics and RMS, Muon's
Newton-Schulz iteration) combine the shards with collectives over :attr:`Sharding.group`.

Supported placements are ``Shard(0)`` and ``Replicate()`` on any mesh (FSDP2, HSDP); other
placements (tensor parallelism's ``Shard(1)``, ``_StridedShard``, ``Partial``) are refused by
name before anything is modified.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

try:  # torch.distributed may be missing from a build (and is on some platforms)
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
except ImportError:  # pragma: no cover - torch without distributed
    DTensor = None  # type: ignore[assignment,misc]


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a DTensor (a parameter of a ``fully_shard``ed module is one)."""
    return DTensor is not None and isinstance(t, DTensor)


def _placement_ok(placement: Any, ndim: int) -> bool:
    if type(placement) is Replicate:
        return True
    return type(placement) is Shard and ndim > 0 and placement.dim in (0, -ndim)


def describe_placements(placements: Sequence[Any]) -> str:
    return "(" + ", ".join(str(p) for p in placements) + ")"


def _row_size(shape: Sequence[int]) -> int:
    n = 1
    for s in shape[1:]:
        n *= s
    return n


class Sharding:
    """How one param group's DTensor parameters are split over ranks.

    Built from the user's parameters (all DTensors on one mesh); checks their placements and
    raises naming the first parameter that cannot be stepped shard by shard."""

    def __init__(self, params: Sequence[Tensor], owner: str, describe: Callable[[int], str]):
        first = params[0]
        self.mesh = first.device_mesh
        self.placements: List[Tuple[Any, ...]] = []
        self.global_shapes: List[Tuple[int, ...]] = []
        #: Index of each tensor's first local element in the whole tensor (row start x row size).
        self.local_starts: List[int] = []
        #: Rows of each tensor in the whole tensor and on this rank (dim 0; 1 for a scalar).
        self.global_rows: List[int] = []
        self.local_rows: List[int] = []
        for i, p in enumerate(params):
            if p.device_mesh != self.mesh:
                raise ValueError(
                    f"{owner}: {describe(i)} is on device mesh {p.device_mesh}, {describe(0)} on {self.mesh}; "
                    "put parameters of different meshes in param groups of their own"
                )
            placements = tuple(p.placements)
            bad = [pl for pl in placements if not _placement_ok(pl, p.dim())]
            if bad:
                raise ValueError(
                    f"{owner}: {describe(i)} has placements {describe_placements(placements)}; "
                    f"{bad[0]} is not supported: parameters must be sharded on dim 0 (Shard(0), as fully_shard "
                    "does) or replicated (Replicate()), not split by tensor parallelism"
                )
            shape = tuple(p.shape)
            local_shape, offset = compute_local_shape_and_global_offset(shape, self.mesh, placements)
            self.placements.append(placements)
            self.global_shapes.append(shape)
            rows = shape[0] if shape else 1
            self.global_rows.append(rows)
            self.local_rows.append(local_shape[0] if local_shape else 1)
            self.local_starts.append((offset[0] if shape and local_shape[0] > 0 else 0) * _row_size(shape))
        numels = [_numel(s) for s in self.global_shapes]
        starts = [0]
        for n in numels[:-1]:
            starts.append(starts[-1] + n)
        #: Where each local tensor's element 0 draws its random bits: its index in the unsharded group.
        self.draws = [s + local for s, local in zip(starts, self.local_starts)]
        self.global_numels = numels
        #: Whether each tensor is split over ranks (a Shard(0) on a mesh dim of size > 1).
        self.split = [
            any(type(pl) is Shard and self.mesh.size(d) > 1 for d, pl in enumerate(pls)) for pls in self.placements
        ]

    @property
    def group(self) -> Any:
        """The process group over which the shards of a tensor are spread (the mesh dim that
        shards dim 0), or None when every tensor is replicated."""
        dims = sorted({d for pls in self.placements for d, pl in enumerate(pls) if type(pl) is Shard})
        if not dims:
            return None
        if len(dims) > 1:
            raise ValueError(
                f"parameters sharded on dim 0 over several mesh dims {dims} need a collective over all of them, "
                "which this rule does not do yet: shard over one mesh dim (FSDP2 or HSDP)"
            )
        return self.mesh.get_group(dims[0])

    # --- exporting and importing state ---------------------------------------------------------

    def export(self, i: int, local: Tensor, global_shape: Sequence[int], placements: Optional[Tuple[Any, ...]] = None) -> Tensor:
        """``local`` (this rank's part of a state tensor of tensor ``i``) as a DTensor of
        ``global_shape`` with the parameter's placements (or ``placements``); shares memory
        with ``local``."""
        pls = self.placements[i] if placements is None else placements
        shape = torch.Size(global_shape)
        return DTensor.from_local(
            local, self.mesh, pls, run_check=False, shape=shape, stride=torch.empty(shape, device="meta").stride()
        )

    def local_part(self, i: int, value: Tensor, local_shape: Sequence[int], global_shape: Sequence[int],
                   placements: Optional[Tuple[Any, ...]] = None) -> Tensor:
        """This rank's part of a loaded state tensor of tensor ``i``: a DTensor (redistributed to
        the parameter's placements if needed), a tensor of the whole shape (its local rows), or
        one of the local shape as is. Raises ValueError when it is none of these."""
        pls = self.placements[i] if placements is None else placements
        local_shape, global_shape = tuple(local_shape), tuple(global_shape)
        if is_dtensor(value):
            if tuple(value.shape) != global_shape:
                raise ValueError(f"has shape {tuple(value.shape)}, expected {global_shape}")
            if tuple(value.placements) != pls or value.device_mesh != self.mesh:
                value = value.redistribute(self.mesh, pls)
            return value.to_local()
        if tuple(value.shape) == global_shape and global_shape != local_shape:
            _, offset = compute_local_shape_and_global_offset(global_shape, self.mesh, pls)
            start = offset[0] if global_shape else 0
            return value.narrow(0, start, local_shape[0])
        if tuple(value.shape) == local_shape:
            return value
        raise ValueError(f"has shape {tuple(value.shape)}, expected {global_shape} (or this rank's {local_shape})")


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def local_tensors(params: Sequence[Tensor]) -> List[Tensor]:
    """The local tensors of DTensor parameters (FSDP2's sharded parameter data)."""
    return [p._local_tensor for p in params]
