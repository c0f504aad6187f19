"""Flat buffers of one param group: the parameters, their gradients and the optimizer state.

Every parameter of a group becomes a view into one flat buffer (``p.data`` is re-pointed, so the
``Parameter`` object, its name and ``model.state_dict()`` are untouched), and its ``.grad`` an
alias into one flat gradient buffer that backward accumulates into in place. One native call then
steps the whole group.

Which parameters take part in a step follows torch.optim exactly: those whose gradient is not
``None``. Because ``.grad`` stays attached to the flat buffer even after
``zero_grad(set_to_none=True)`` (so backward writes straight into it), "logically None" is tracked
separately: a hook on each parameter records that backward delivered a gradient (and rejects
sparse gradients, which the dense flat buffer cannot hold). In-place edits of ``.grad`` such as
``clip_grad_norm_`` therefore do not make a parameter count as having a gradient.

Anything the user does behind our back is detected and repaired at the next step: a gradient
replaced by another tensor (``model.zero_grad()``, ``p.grad = g``, ``create_graph=True``) is
copied into the flat buffer and the alias re-attached; a parameter whose data was replaced with a
tensor of the same shape, dtype and device (``p.data = t``, or module swaps under
``torch.__future__.set_swap_module_params_on_conversion``) is copied back in.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from . import _core


def _or_flags(a: bytearray, b: bytearray) -> bytearray:
    """Element-wise OR of two 0/1 byte arrays of equal length, at C speed."""
    n = len(a)
    return bytearray((int.from_bytes(a, "little") | int.from_bytes(b, "little")).to_bytes(n, "little"))


def _gradient_hook(received: bytearray, index: int, fail: Callable[[int, Tensor], Exception]) -> Callable[[Tensor], None]:
    """The hook that records backward delivering a gradient for tensor ``index``."""

    def hook(grad: Tensor) -> None:
        if grad.layout != torch.strided:
            raise fail(index, grad)
        received[index] = 1

    return hook


def _layout_strides(t: Tensor) -> tuple[int, ...]:
    """The strides to give ``t``'s slot: its own when they describe a dense permutation of its
    shape (contiguous, channels_last, a transposed weight), else contiguous ones."""
    if t.is_contiguous():
        return tuple(t.stride())
    dims = sorted((d for d in range(t.dim()) if t.size(d) != 1), key=lambda d: t.stride(d))
    expected = 1
    for d in dims:
        if t.stride(d) != expected:
            return tuple(torch.empty(t.shape, device="meta").stride())
        expected *= t.size(d)
    return tuple(t.stride())


def _as_matrices(t: Tensor) -> list[int]:
    """``[batch, rows, cols]``: a tensor as matrices over its last two dims (a vector: one row)."""
    if t.dim() < 2:
        return [1, 1, t.numel()]
    rows, cols = t.shape[-2], t.shape[-1]
    batch = 1
    for n in t.shape[:-2]:
        batch *= n
    return [batch, rows, cols]


def describe(index: int, group_index: int, tensor: Tensor, names: Sequence[str] | None) -> str:
    """How errors name a parameter: its name when the group was built from named parameters."""
    where = f"param group {group_index}, index {index}, shape {tuple(tensor.shape)}"
    if names is not None and index < len(names):
        return f"parameter '{names[index]}' ({where})"
    return f"parameter {index} ({where})"


class FlatGroup:
    """One param group's parameters, gradients, step counters and state as flat buffers."""

    def __init__(
        self,
        params: Sequence[Tensor],
        group_index: int,
        owner: str,
        names: Sequence[str] | None,
        row_major: bool = False,
        matrices: Sequence[Sequence[int]] | None = None,
        transient_grads: bool = False,
    ):
        self.owner = owner
        # Transient gradients (stepping inside backward): no flat gradient buffer exists; each
        # step reads the gradients autograd made, which the caller frees afterwards.
        self.transient = transient_grads
        self.group_index = group_index
        self.names = list(names) if names is not None else None
        self.params = list(params)
        first = self.params[0]
        self.dtype, self.device = first.dtype, first.device
        if matrices is None:
            matrices = [_as_matrices(p) for p in self.params]
        self.table = _core.SegmentTable([p.numel() for p in self.params], [list(m) for m in matrices])
        self.offsets = self.table.offsets
        # Rules that see tensors as matrices (Adafactor, Muon) need row-major slots; the others
        # keep each parameter's own dense layout (channels_last, a transposed weight).
        self.strides = [
            tuple(torch.empty(p.shape, device="meta").stride()) if row_major else _layout_strides(p) for p in self.params
        ]
        total = self.table.total

        for i, p in enumerate(self.params):
            if p.grad is not None:
                self._check_grad(i, p.grad)

        n = len(self.params)
        # received[i]: backward delivered a gradient since the last zero_grad().
        # always[i]: the gradient is non-None whatever backward does (a zero gradient kept by
        # zero_grad(set_to_none=False), or a gradient that existed or was assigned).
        self.received = bytearray(n)
        self.always = bytearray(n)
        with torch.no_grad():
            self.param_flat = torch.empty(total, dtype=self.dtype, device=self.device)
            for i, p in enumerate(self.params):
                view = self._slot(self.param_flat, i)
                view.copy_(p.detach())
                p.data = view
            self.param_ptrs = [p.data_ptr() for p in self.params]

        self.hooks: list[Any] = [None] * n
        # Per-tensor step counters as float64: torch keeps state["step"] as a float tensor, and
        # float32 stops counting at 2^24 steps, which batch-size-1 runs reach.
        self.steps = torch.zeros(len(self.params), dtype=torch.float64)
        self.state_flat: dict[str, Tensor] = {}
        self.has_state = [False] * len(self.params)
        if self.transient:
            self.grad_flat: Tensor | None = None
            return

        with torch.no_grad():
            self.grad_flat = torch.zeros(total, dtype=self.dtype, device=self.device)
            self.grad_aliases = [self._grad_alias(i) for i in range(n)]
            self.grad_ptrs = [a.data_ptr() for a in self.grad_aliases]
            for i, p in enumerate(self.params):
                g = p.grad
                if g is not None:
                    self.grad_aliases[i].copy_(g)
                    p.grad = self.grad_aliases[i]
                    self.always[i] = 1
                elif p.requires_grad:
                    p.grad = self.grad_aliases[i]

        for i, p in enumerate(self.params):
            if p.requires_grad:
                self._install_hook(i)
        # The hooks go when this group does, so optimizers created in a loop do not pile them up.
        weakref.finalize(self, _remove_hooks, self.hooks)

    # --- slots -----------------------------------------------------------------------------

    def _slot(self, flat: Tensor, i: int) -> Tensor:
        p = self.params[i]
        return flat.as_strided(p.shape, self.strides[i], self.offsets[i])

    def _grad_alias(self, i: int) -> Tensor:
        """An alias of tensor ``i``'s gradient slot with a version counter of its own."""
        p = self.params[i]
        alias = torch.empty(0, dtype=self.dtype, device=self.device)
        return alias.set_(self.grad_flat.untyped_storage(), self.offsets[i], p.shape, self.strides[i])

    def state_buffer(self, name: str) -> Tensor:
        """The flat buffer of state ``name``, zero-filled on first use."""
        buf = self.state_flat.get(name)
        if buf is None:
            # Optimizer state is float32 whatever the parameters are: bf16 weights keep fp32 state.
            buf = self.state_flat[name] = torch.zeros(self.table.total, dtype=torch.float32, device=self.device)
        return buf

    @property
    def dtype_name(self) -> str:
        """The parameters' storage type as the native core names it."""
        return "bfloat16" if self.dtype == torch.bfloat16 else "float32"

    def state_view(self, name: str, i: int) -> Tensor:
        """Tensor ``i``'s slice of state ``name``, shaped and laid out like the parameter (float32)."""
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

    # --- gradients -------------------------------------------------------------------------

    def _install_hook(self, i: int) -> None:
        p = self.params[i]
        handle = self.hooks[i]
        hooks = p._backward_hooks
        if handle is not None and hooks is not None and handle.id in hooks:
            # Re-assigning the dict re-installs the C++ hook that calls it: a tensor swap
            # (torch.utils.swap_tensors) keeps the Python dict but not that hook.
            p._backward_hooks = hooks
            return
        self.hooks[i] = p.register_hook(_gradient_hook(self.received, i, self._sparse_error))

    def _sparse_error(self, i: int, grad: Tensor) -> Exception:
        return RuntimeError(
            f"{self.owner} does not support sparse gradients: {self._describe(i)} received a {grad.layout} "
            "gradient (for an embedding, use sparse=False)"
        )

    def _describe(self, i: int) -> str:
        return describe(i, self.group_index, self.params[i], self.names)

    def _check_grad(self, i: int, g: Tensor) -> None:
        p = self.params[i]
        if g.is_sparse or g.layout != torch.strided:
            raise RuntimeError(
                f"{self.owner} does not support sparse gradients: {self._describe(i)} has a {g.layout} gradient"
            )
        if g.is_complex():
            raise TypeError(f"{self.owner} does not support complex gradients: {self._describe(i)} has {g.dtype}")
        if g.dtype != p.dtype:
            raise TypeError(f"{self.owner}: gradient of {self._describe(i)} is {g.dtype} but the parameter is {p.dtype}")
        if g.device != p.device:
            raise RuntimeError(
                f"{self.owner}: gradient of {self._describe(i)} is on {g.device} but the parameter is on {p.device}"
            )
        if g.shape != p.shape:
            raise ValueError(
                f"{self.owner}: gradient of {self._describe(i)} has shape {tuple(g.shape)}, expected {tuple(p.shape)}"
            )

    def _adopt_grad(self, i: int, g: Tensor) -> None:
        """Copies a gradient that lives elsewhere into the flat buffer and re-attaches the alias."""
        self._check_grad(i, g)
        alias = self.grad_aliases[i]
        if alias.data_ptr() != self.grad_ptrs[i]:  # someone re-pointed our alias (alias.data = ...)
            alias = self.grad_aliases[i] = self._grad_alias(i)
        alias.copy_(g)
        self.params[i].grad = alias
        self.always[i] = 1

    def _reattach_param(self, i: int) -> None:
        """A parameter's data was replaced: take its values back into the flat buffer."""
        p = self.params[i]
        if p.dtype != self.dtype or p.device != self.device or p.shape != self._slot(self.param_flat, i).shape:
            raise RuntimeError(
                f"{self.owner}: {self._describe(i)} was moved or converted after the optimizer was created "
                f"(now {p.dtype} on {p.device}, shape {tuple(p.shape)}; was {self.dtype} on {self.device}); "
                "create the optimizer after model.to(...)"
            )
        view = self._slot(self.param_flat, i)
        with torch.no_grad():
            view.copy_(p.detach())
        p.data = view
        self.param_ptrs[i] = p.data_ptr()
        if p.requires_grad and not self.transient:
            self._install_hook(i)

    def gather(self) -> bytearray:
        """Which tensors take part in this step: those whose gradient is not (logically) None.

        Repairs anything that left the flat buffers (see the module docstring) on the way.
        """
        if self.transient:
            return self._gather_transient()
        aliases, grad_ptrs, param_ptrs = self.grad_aliases, self.grad_ptrs, self.param_ptrs
        for i, p in enumerate(self.params):
            if p.data_ptr() != param_ptrs[i]:
                self._reattach_param(i)
            g = p.grad
            if g is aliases[i] and g.data_ptr() == grad_ptrs[i]:
                continue
            if g is None:
                self.always[i] = self.received[i] = 0
            else:
                self._adopt_grad(i, g)
        return _or_flags(self.always, self.received)

    def _gather_transient(self) -> bytearray:
        """Transient mode: the tensors with a gradient take part, read from where autograd left
        them (no copy for a single dense tensor laid out like its slot)."""
        stepped = bytearray(len(self.params))
        grads: list[Tensor | None] = [None] * len(self.params)
        for i, p in enumerate(self.params):
            if p.data_ptr() != self.param_ptrs[i]:
                self._reattach_param(i)
            g = p.grad
            if g is not None:
                self._check_grad(i, g)
                stepped[i] = 1
                grads[i] = g
        g0 = grads[0]
        if len(self.params) == 1 and g0 is not None and tuple(g0.stride()) == self.strides[0]:
            self.grad_flat = g0
        else:
            flat = torch.zeros(self.table.total, dtype=self.dtype, device=self.device)
            for i, g in enumerate(grads):
                if g is not None:
                    self._slot(flat, i).copy_(g)
            self.grad_flat = flat
        return stepped

    def release_grads(self) -> None:
        """After a step in transient mode: drop the reference to this step's gradients."""
        if self.transient:
            self.grad_flat = None

    def zero_grad(self, set_to_none: bool) -> None:
        """Zeroes the flat gradient buffer with one fill and re-attaches every alias.

        With ``set_to_none`` each gradient becomes logically ``None`` (skipped by ``step()``
        unless backward delivers one); otherwise gradients that exist become zero gradients, as
        in torch, and those that were None stay None.
        """
        if self.transient:
            for p in self.params:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()
            return
        present = _or_flags(self.always, self.received)
        self.grad_flat.zero_()
        for i, p in enumerate(self.params):
            if p.data_ptr() != self.param_ptrs[i]:
                self._reattach_param(i)
            g = p.grad
            alias = self.grad_aliases[i]
            ours = g is alias and g.data_ptr() == self.grad_ptrs[i]
            if not ours:
                present[i] = g is not None
            if not p.requires_grad:
                if g is not None and set_to_none:
                    p.grad = None
                    present[i] = 0
                elif g is not None and not ours:
                    g.zero_()
                continue
            if not ours:
                if alias.data_ptr() != self.grad_ptrs[i]:  # someone re-pointed our alias (alias.data = ...)
                    alias = self.grad_aliases[i] = self._grad_alias(i)
                p.grad = alias
            if self.hooks[i] is None:  # frozen when the optimizer was built, trainable now
                self._install_hook(i)
        self.always[:] = bytes(len(self.params)) if set_to_none else present
        self.received[:] = bytes(len(self.params))


def _remove_hooks(handles: list[Any]) -> None:
    for handle in handles:
        if handle is not None:
            handle.remove()
