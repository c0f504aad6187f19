"""One param group as the native step sees it: a table of its tensors, and the optimizer's state.

The user's tensors stay the user's: parameters and gradients live wherever torch (or DDP, FSDP,
accelerate...) put them, and the optimizer never re-points or aliases their storage. Each step
collects every parameter's and gradient's own address (``data_ptr()``) into a table that one
native call steps, as torch's fused optimizers take lists of tensors.

The group's :class:`~smallbatch_rs._core.SegmentTable` gives every tensor a range of one index
space (the tensors back to back). That index space, not the tensors' addresses, indexes the
optimizer's state, which lives in one flat float32 buffer per state name (per-parameter views of
it are what ``state_dict()`` returns), and counts the random bits of stochastic rounding: a step
gives the same bits wherever the tensors happen to be.

Element ``k`` of a parameter's memory is paired with element ``k`` of its gradient's memory and
of its state slot, so a tensor is stepped in place when the three share a layout: its *slot*
layout, fixed when the group is built (the parameter's own dense layout, such as channels_last or
a transposed weight, for elementwise rules; row-major for rules that see matrices). torch gives
gradients the layout of their parameter. A gradient in another layout is copied into the slot
layout for the step; a parameter that is not in its slot layout (say, a non-contiguous view) is
stepped through a copy that is written back.

Parameters are checked again only when their addresses change (``p.data = t``, ``model.to()``,
``load_state_dict(assign=True)`` into the same ``Parameter``...): a conversion that keeps every
parameter usable (float32 <-> bfloat16, another device) is followed, with the state moved along;
one that cannot be stepped raises an error that names the parameter.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _core
from ._sharding import Sharding, is_dtensor, local_tensors

#: Tensor dtypes the native rules step (bf16: update in f32, rounded back).
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)


def dense_strides(t: Tensor) -> Optional[Tuple[int, ...]]:
    """``t``'s strides when they lay its elements out densely, in some order of its dims (each
    element once, no gaps: contiguous, channels_last, a transposed weight); else None."""
    strides = tuple(t.stride())
    if t.is_contiguous():
        return strides
    dims = sorted((d for d in range(t.dim()) if t.size(d) != 1), key=lambda d: strides[d])
    expected = 1
    for d in dims:
        if strides[d] != expected:
            return None
        expected *= t.size(d)
    return strides


def contiguous_strides(shape: Sequence[int]) -> Tuple[int, ...]:
    """Row-major strides of ``shape``."""
    return tuple(torch.empty(tuple(shape), device="meta").stride())


def as_matrices(t: Tensor) -> List[int]:
    """``[batch, rows, cols]``: a tensor as matrices over its last two dims (a vector: one row)."""
    if t.dim() < 2:
        return [1, 1, t.numel()]
    rows, cols = t.shape[-2], t.shape[-1]
    batch = 1
    for n in t.shape[:-2]:
        batch *= n
    return [batch, rows, cols]


def describe(index: int, group_index: int, tensor: Tensor, names: Optional[Sequence[str]]) -> str:
    """How errors name a parameter: its name when the group was built from named parameters."""
    where = f"param group {group_index}, index {index}, shape {tuple(tensor.shape)}"
    if names is not None and index < len(names):
        return f"parameter '{names[index]}' ({where})"
    return f"parameter {index} ({where})"


class StepTable:
    """What one step hands the native call: which tensors take part and where each one's
    parameters and gradients are, plus the temporary copies that must outlive the call and be
    written back after it."""

    __slots__ = ("stepped", "params", "grads", "keep", "write_back")

    def __init__(self, stepped: bytes, params: List[int], grads: List[int]):
        self.stepped = stepped
        self.params = params
        self.grads = grads
        #: Temporaries the addresses point into.
        self.keep: List[Tensor] = []
        #: (parameter, its stepped copy) pairs to copy back after the step.
        self.write_back: List[Tuple[Tensor, Tensor]] = []

    def finish(self) -> None:
        """Writes stepped copies back into their parameters."""
        for p, copy in self.write_back:
            p.copy_(copy)


class TensorGroup:
    """One param group's table of tensors, step counters and state buffers."""

    def __init__(
        self,
        params: Sequence[Tensor],
        group_index: int,
        owner: str,
        names: Optional[Sequence[str]],
        row_major: bool = False,
        matrices: Optional[Sequence[Sequence[int]]] = None,
        cuda_supported: bool = True,
        matrices_of: Optional[Callable[[List[Tensor]], Optional[Sequence[Sequence[int]]]]] = None,
        after_layout: Optional[Callable[["TensorGroup"], None]] = None,
    ):
        self.owner = owner
        self.group_index = group_index
        self.names = list(names) if names is not None else None
        self.params = list(params)
        self.row_major = row_major
        self.cuda_supported = cuda_supported
        # When parameters change shape before any state exists, the table is laid out again:
        # `matrices_of(params)` says how the rule sees them (None: over the last two dims), and
        # `after_layout(self)` redoes the rule's own decisions (Adafactor's factored tensors).
        self.matrices_of = matrices_of
        self.after_layout = after_layout
        # DTensor parameters (FSDP2): the table holds their local shards (see _sharding).
        self.sharding: Optional[Sharding] = None
        if any(is_dtensor(p) for p in self.params):
            plain = next((i for i, p in enumerate(self.params) if not is_dtensor(p)), None)
            if plain is not None:
                sharded = next(i for i, p in enumerate(self.params) if is_dtensor(p))
                raise ValueError(
                    f"{owner}: param group {group_index} mixes DTensor parameters ({self.describe(sharded)}, "
                    f"placements {tuple(self.params[sharded].placements)}) with plain tensors ({self.describe(plain)}); "
                    "put the parameters of a fully_shard'ed module and the others in param groups of their own"
                )
            self.sharding = Sharding(self.params, owner, self.describe)
            # Element k of a shard is element start + k of its tensor only in row-major order.
            self.row_major = True
        first = self.params[0]
        self.dtype, self.device = first.dtype, first.device
        if matrices is None and matrices_of is not None:
            matrices = matrices_of(self.tensors())
        self._layout(matrices)
        n = len(self.params)
        # Per-tensor step counters as float64: torch keeps state["step"] as a float tensor, and
        # float32 stops counting at 2^24 steps, which batch-size-1 runs reach.
        self.steps = torch.zeros(n, dtype=torch.float64)
        # capturable=True keeps them on the parameters' device (see set_counts_on_device).
        self.counts_on_device = False
        self.state_flat: Dict[str, Tensor] = {}
        self.has_state = [False] * n
        self.cuda_workspace: Any = None
        # Set when the state moved to another device with the parameters: the optimizer then
        # hands out views of the moved buffers (NativeOptimizer._refresh_state_views).
        self.state_moved = False
        # The parameters' addresses when they were last checked, and what the check found.
        self._param_ptrs: Optional[List[int]] = None
        self._nbytes: List[int] = []
        self._storages: List[Any] = []
        # The gradients (by id) and their addresses the last fast step checked.
        self._grad_ids: Optional[List[int]] = None
        self._grad_ptrs: Optional[List[int]] = None
        self._direct: List[bool] = []
        self._fast = False
        self._ones = bytes([1]) * n

    def tensors(self) -> List[Tensor]:
        """The tensors the native step updates: the parameters, or their local shards."""
        return self.params if self.sharding is None else local_tensors(self.params)

    def _layout(self, matrices: Optional[Sequence[Sequence[int]]]) -> None:
        """The table and each tensor's slot layout, from the parameters as they are now."""
        tensors = self.tensors()
        if matrices is None:
            matrices = [as_matrices(p) for p in tensors]
        self.matrices = [list(m) for m in matrices]
        self.table = _core.SegmentTable([p.numel() for p in tensors], self.matrices)
        self.offsets = self.table.offsets
        self.shapes = [tuple(p.shape) for p in tensors]
        # Rules that see tensors as matrices need row-major slots; the others keep each
        # parameter's own dense layout.
        self.strides = [
            contiguous_strides(p.shape) if self.row_major else (dense_strides(p) or contiguous_strides(p.shape))
            for p in tensors
        ]
        self._contiguous_slots = all(s == contiguous_strides(shape) for s, shape in zip(self.strides, self.shapes))

    # --- names --------------------------------------------------------------------------------

    def describe(self, i: int) -> str:
        return describe(i, self.group_index, self.params[i], self.names)

    @property
    def dtype_name(self) -> str:
        """The parameters' storage type as the native core names it."""
        return "bfloat16" if self.dtype == torch.bfloat16 else "float32"

    # --- state --------------------------------------------------------------------------------

    def _slot(self, flat: Tensor, i: int) -> Tensor:
        return flat.as_strided(self.shapes[i], self.strides[i], self.offsets[i])

    def state_buffer(self, name: str) -> Tensor:
        """The flat buffer of state ``name`` (float32, one element per element of the table),
        zero-filled on first use."""
        buf = self.state_flat.get(name)
        if buf is None:
            # Optimizer state is float32 whatever the parameters are: bf16 weights keep fp32 state.
            buf = self.state_flat[name] = torch.zeros(self.table.total, dtype=torch.float32, device=self.device)
        return buf

    def state_view(self, name: str, i: int) -> Tensor:
        """Tensor ``i``'s slice of state ``name``, shaped and laid out like its slot."""
        return self._slot(self.state_buffer(name), i)

    def aux_buffer(self, name: str, length: int) -> Tensor:
        """A float32 state buffer of ``length`` elements that is not parameter-sized (for example
        Adafactor's row and column moments), zero-filled on first use."""
        buf = self.state_flat.get(name)
        if buf is None:
            buf = self.state_flat[name] = torch.zeros(length, dtype=torch.float32, device=self.device)
        return buf

    def aux_view(self, name: str, length: int, offset: int, shape: Sequence[int]) -> Tensor:
        """A contiguous view of ``shape`` at ``offset`` into aux buffer ``name``."""
        numel = 1
        for n in shape:
            numel *= n
        return self.aux_buffer(name, length)[offset : offset + numel].view(tuple(shape))

    # --- the per-step table -------------------------------------------------------------------

    def gather(self) -> StepTable:
        """This step's table: the tensors whose gradient is not None, with their addresses.

        The common case costs a few list comprehensions of torch attribute reads: every parameter
        where it was when last checked, every gradient present, laid out like its parameter
        (contiguously) and as large. A parameter whose address did not change is the one
        checked: the group holds the storages it checked, so no other memory can take their
        addresses meanwhile. Gradients are checked (layout, and size in bytes, since
        ``.grad.data = t`` can swap in a smaller or differently typed storage) unless they are
        the very objects at the very addresses checked at the last step (gradients kept by
        ``zero_grad(set_to_none=False)`` or assigned once)."""
        if self.sharding is not None:
            params = local_tensors(self.params)
            grads = self._local_grads()
        else:
            params = self.params
            grads = [p.grad for p in params]
        pptrs = [p.data_ptr() for p in params]
        if pptrs != self._param_ptrs:
            self._check_params(pptrs, params)
        if self._fast:
            try:
                gptrs = [g.data_ptr() for g in grads]  # AttributeError for a None gradient
            except (AttributeError, RuntimeError):  # None, or a tensor without storage (sparse)
                return self._gather_each(grads, pptrs, params)
            ids = list(map(id, grads))
            if ids == self._grad_ids and gptrs == self._grad_ptrs:
                return StepTable(self._ones, pptrs, gptrs)
            if all(map(Tensor.is_contiguous, grads)) and [g.nbytes for g in grads] == self._nbytes:
                self._grad_ids, self._grad_ptrs = ids, gptrs
                return StepTable(self._ones, pptrs, gptrs)
        self._grad_ids = None
        return self._gather_each(grads, pptrs, params)

    def _local_grads(self) -> List[Optional[Tensor]]:
        """The local shards of the DTensor parameters' gradients, which must be sharded as their
        parameters are."""
        grads = [p.grad for p in self.params]
        try:
            return [None if g is None else g._local_tensor for g in grads]
        except AttributeError:
            pass
        sharding = self.sharding
        assert sharding is not None
        for i, g in enumerate(grads):
            if g is not None and not is_dtensor(g):
                raise TypeError(
                    f"{self.owner}: gradient of {self.describe(i)} is a plain tensor but the parameter is a DTensor "
                    f"with placements {sharding.placements[i]}"
                )
        raise AssertionError("unreachable")  # pragma: no cover

    def _check_grad_placements(self, i: int) -> None:
        sharding = self.sharding
        assert sharding is not None
        g = self.params[i].grad
        if g is not None and (tuple(g.placements) != sharding.placements[i] or g.device_mesh != sharding.mesh):
            raise RuntimeError(
                f"{self.owner}: gradient of {self.describe(i)} has placements {tuple(g.placements)}, "
                f"the parameter {sharding.placements[i]}; reduce the gradient first"
            )

    def _gather_each(self, grads: List[Optional[Tensor]], pptrs: List[int], params: List[Tensor]) -> StepTable:
        """The table, tensor by tensor: checks each gradient, copies what is not laid out like
        its slot."""
        n = len(self.params)
        stepped = bytearray(n)
        gptrs = [0] * n
        table = StepTable(b"", pptrs, gptrs)
        for i, g in enumerate(grads):
            if g is None:
                continue
            stepped[i] = 1
            p = params[i]
            if self.sharding is not None:
                self._check_grad_placements(i)
            self._check_grad(i, p, g)
            if not self._direct[i]:
                copy = torch.empty_strided(self.shapes[i], self.strides[i], dtype=p.dtype, device=p.device)
                copy.copy_(p)
                table.keep.append(copy)
                table.write_back.append((p, copy))
                pptrs[i] = copy.data_ptr()
            if tuple(g.stride()) == self.strides[i] or g.numel() <= 1 or (g.is_contiguous() and self._slot_contiguous(i)):
                gptrs[i] = g.data_ptr()
            else:
                copy = torch.empty_strided(self.shapes[i], self.strides[i], dtype=g.dtype, device=g.device)
                copy.copy_(g)
                table.keep.append(copy)
                gptrs[i] = copy.data_ptr()
        table.stepped = bytes(stepped)
        return table

    def _slot_contiguous(self, i: int) -> bool:
        return self.strides[i] == contiguous_strides(self.shapes[i])

    def _check_grad(self, i: int, p: Tensor, g: Tensor) -> None:
        if g.is_sparse or g.layout != torch.strided:
            raise RuntimeError(
                f"{self.owner} does not support sparse gradients: {self.describe(i)} has a {g.layout} gradient "
                "(for an embedding, use sparse=False)"
            )
        if g.is_complex():
            raise TypeError(f"{self.owner} does not support complex gradients: {self.describe(i)} has {g.dtype}")
        if g.dtype != p.dtype:
            raise TypeError(f"{self.owner}: gradient of {self.describe(i)} is {g.dtype} but the parameter is {p.dtype}")
        if g.device != p.device:
            raise RuntimeError(
                f"{self.owner}: gradient of {self.describe(i)} is on {g.device} but the parameter is on {p.device}"
            )
        if tuple(g.shape) != self.shapes[i]:
            raise ValueError(
                f"{self.owner}: gradient of {self.describe(i)} has shape {tuple(g.shape)}, expected {self.shapes[i]}"
            )

    # --- parameters that moved ------------------------------------------------------------------

    def _check_params(self, pptrs: List[int], params: List[Tensor]) -> None:
        """Checks every parameter (their addresses changed since the last check) and follows
        conversions that can be followed: all parameters to float32 or bfloat16, all to one other
        device (the state moves along). Raises naming the first parameter that cannot be stepped;
        nothing is changed then. ``params`` are the tensors stepped (local shards of DTensors)."""
        for i, p in enumerate(params):
            if p.dtype not in SUPPORTED_DTYPES:
                raise TypeError(
                    f"{self.owner} supports float32 and bfloat16 parameters: {self.describe(i)} is now {p.dtype}"
                )
            if p.is_sparse or p.layout != torch.strided:
                raise TypeError(f"{self.owner} does not support sparse parameters: {self.describe(i)} is now {p.layout}")
        dtypes = {p.dtype for p in params}
        if len(dtypes) > 1:
            raise TypeError(
                f"{self.owner}: param group {self.group_index} now mixes dtypes {sorted(map(str, dtypes))}; "
                "convert the whole model, or put the parameters of each dtype in a group of their own"
            )
        devices = {p.device for p in params}
        if len(devices) > 1:
            listed = ", ".join(sorted(str(d) for d in devices))
            raise RuntimeError(
                f"{self.owner}: param group {self.group_index} now has parameters on different devices ({listed}); "
                "move the whole model, or put each device's parameters in a group of their own"
            )
        device = params[0].device
        if device.type not in ("cpu", "cuda") or (device.type == "cuda" and not self.cuda_supported):
            raise RuntimeError(f"{self.owner}: {self.describe(0)} is now on {device}, where this rule cannot run")
        reshaped = [i for i, p in enumerate(params) if tuple(p.shape) != self.shapes[i]]
        if reshaped:
            if any(self.has_state):
                i = reshaped[0]
                raise RuntimeError(
                    f"{self.owner}: {self.describe(i)} changed shape from {self.shapes[i]} to {tuple(params[i].shape)} "
                    "after the optimizer created its state; torch.optim's state would not fit it either: "
                    "create a new optimizer"
                )
            self.state_flat.clear()
            self._layout(self.matrices_of(params) if self.matrices_of is not None else None)
            if self.after_layout is not None:
                self.after_layout(self)
        if device != self.device:
            self._move_state(device)
        self.dtype = params[0].dtype
        self._direct = [tuple(p.stride()) == self.strides[i] or p.numel() <= 1 for i, p in enumerate(params)]
        self._fast = self._contiguous_slots and all(self._direct)
        self._param_ptrs = pptrs
        self._grad_ids = None
        self._nbytes = [p.nbytes for p in params]
        self._storages = [p.untyped_storage() for p in params]

    def set_counts_on_device(self, on: bool) -> None:
        """Keeps the step counters with the parameters (``on``: a capturable step reads them
        there) or in host memory."""
        self.counts_on_device = on
        device = self.device if on else torch.device("cpu")
        if self.steps.device != device:
            self.steps = self.steps.to(device)
            self.state_moved = True

    def _move_state(self, device: torch.device) -> None:
        """Moves the state buffers to ``device`` (the views of them handed out before are
        replaced by the owner: see ``NativeOptimizer._refresh_state_views``)."""
        for name, buf in list(self.state_flat.items()):
            self.state_flat[name] = buf.to(device)
        if self.counts_on_device:
            self.steps = self.steps.to(device)
        self.device = device
        self.cuda_workspace = None
        self.state_moved = True

    # --- memory accounting ------------------------------------------------------------------------

    def state_bytes(self) -> int:
        """Bytes of optimizer state this group holds."""
        return sum(t.numel() * t.element_size() for t in self.state_flat.values())
