"""Flat buffers of one param group: the parameters, their gradients and the optimizer state.

Every parameter of a group becomes a view into one flat buffer (``p.data`` is re-pointed, so the
``Parameter`` object, its name and ``model.state_dict()`` are untouched), and its ``.grad`` an
alias into one flat gradient buffer that backward accumulates into in place. One native call then
steps the whole group.

Gradient aliases are made with ``Tensor.set_`` on the flat gradient storage rather than as views,
so each has its own version counter: backward bumps it when it accumulates into the alias. That is
how a step knows which parameters received a gradient since the last ``zero_grad()`` without
giving up the flat buffer: after ``zero_grad(set_to_none=True)`` a parameter's ``.grad`` stays an
(all-zero) alias, and unless something writes to it before ``step()`` the parameter is skipped,
exactly as torch.optim skips a parameter whose ``.grad`` is ``None``.

Anything the user does behind our back is detected and repaired at the next step: a gradient
replaced by another tensor (``model.zero_grad()``, ``p.grad = g``, ``create_graph=True``) is
copied into the flat buffer and the alias re-attached; a parameter whose data was replaced with a
tensor of the same shape, dtype and device (``load_state_dict(assign=True)``) is copied back in.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from . import _core

#: Marks a gradient alias that counts as present whatever its version (``zero_grad(set_to_none=False)``
#: or a gradient copied in), as a zero-filled torch gradient would.
_ALWAYS = -1


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


def describe(index: int, group_index: int, tensor: Tensor, names: Sequence[str] | None) -> str:
    """How errors name a parameter: its name when the group was built from named parameters."""
    where = f"param group {group_index}, index {index}, shape {tuple(tensor.shape)}"
    if names is not None and index < len(names):
        return f"parameter '{names[index]}' ({where})"
    return f"parameter {index} ({where})"


class FlatGroup:
    """One param group's parameters, gradients, step counters and state as flat buffers."""

    def __init__(self, params: Sequence[Tensor], group_index: int, owner: str, names: Sequence[str] | None):
        self.owner = owner
        self.group_index = group_index
        self.names = list(names) if names is not None else None
        self.params = list(params)
        first = self.params[0]
        self.dtype, self.device = first.dtype, first.device
        self.table = _core.SegmentTable([p.numel() for p in self.params])
        self.offsets = self.table.offsets
        self.strides = [_layout_strides(p) for p in self.params]
        total = self.table.total

        with torch.no_grad():
            self.param_flat = torch.empty(total, dtype=self.dtype, device=self.device)
            for i, p in enumerate(self.params):
                view = self._slot(self.param_flat, i)
                view.copy_(p.detach())
                p.data = view
            self.param_ptrs = [p.data_ptr() for p in self.params]

            self.grad_flat = torch.zeros(total, dtype=self.dtype, device=self.device)
            self.grad_aliases = [self._grad_alias(i) for i in range(len(self.params))]
            self.grad_ptrs = [a.data_ptr() for a in self.grad_aliases]
            self.grad_versions = [_ALWAYS] * len(self.params)
            for i, p in enumerate(self.params):
                g = p.grad
                if g is not None:
                    self._check_grad(i, g)
                    self.grad_aliases[i].copy_(g)
                    p.grad = self.grad_aliases[i]
                elif p.requires_grad:
                    p.grad = self.grad_aliases[i]
                    self.grad_versions[i] = self.grad_aliases[i]._version

        # Per-tensor step counters as float64: torch keeps state["step"] as a float tensor, and
        # float32 stops counting at 2^24 steps, which batch-size-1 runs reach.
        self.steps = torch.zeros(len(self.params), dtype=torch.float64)
        self.state_flat: dict[str, Tensor] = {}
        self.has_state = [False] * len(self.params)

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
            buf = self.state_flat[name] = torch.zeros(self.table.total, dtype=self.dtype, device=self.device)
        return buf

    def state_view(self, name: str, i: int) -> Tensor:
        """Tensor ``i``'s slice of state ``name``, shaped and laid out like the parameter."""
        return self._slot(self.state_buffer(name), i)

    # --- gradients -------------------------------------------------------------------------

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
        self.grad_versions[i] = _ALWAYS

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
        view.copy_(p.detach())
        p.data = view
        self.param_ptrs[i] = p.data_ptr()

    def gather(self) -> bytearray:
        """Which tensors take part in this step: those with a gradient, as torch.optim decides.

        Repairs anything that left the flat buffers (see the module docstring) on the way.
        """
        flags = bytearray(len(self.params))
        aliases, versions, grad_ptrs, param_ptrs = self.grad_aliases, self.grad_versions, self.grad_ptrs, self.param_ptrs
        for i, p in enumerate(self.params):
            if p.data_ptr() != param_ptrs[i]:
                self._reattach_param(i)
            g = p.grad
            if g is None:
                continue
            if g is aliases[i] and g.data_ptr() == grad_ptrs[i]:
                v = versions[i]
                if v == _ALWAYS or g._version != v:
                    flags[i] = 1
            else:
                self._adopt_grad(i, g)
                flags[i] = 1
        return flags

    def zero_grad(self, set_to_none: bool) -> None:
        """Zeroes the flat gradient buffer with one fill and re-attaches every alias.

        With ``set_to_none`` each gradient becomes logically ``None`` (skipped by ``step()``
        unless backward writes to it); otherwise it counts as a zero gradient, as in torch.
        """
        self.grad_flat.zero_()
        for i, p in enumerate(self.params):
            g = p.grad
            alias = self.grad_aliases[i]
            ours = g is alias and g.data_ptr() == self.grad_ptrs[i]
            if not ours and not p.requires_grad:
                if g is not None and set_to_none:
                    p.grad = None
                elif g is not None:
                    g.zero_()
                continue
            if not ours:
                if alias.data_ptr() != self.grad_ptrs[i]:
                    alias = self.grad_aliases[i] = self._grad_alias(i)
                p.grad = alias
            counts_as_zero = g is not None and not set_to_none
            self.grad_versions[i] = _ALWAYS if counts_as_zero else alias._version
