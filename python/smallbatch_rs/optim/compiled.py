"""The optimizer step as a torch custom operator, for ``torch.compile``.

Under ``torch.compile`` (``torch.compile(lambda: opt.step())``, as torch's optimizer tutorial
does, or a compiled training step that calls ``opt.step()``) the step cannot be traced: it reads
data pointers and calls native code. :meth:`NativeOptimizer.step` then issues one opaque operator,
``torch.ops.smallbatch_rs.step``, whose schema declares what the step mutates: every parameter
and every state buffer (the flat buffers of each group and its step counters). The compiler
orders the operator after whatever produced the gradients and before whatever reads the
parameters, never traces into it, and has nothing to recompile when a learning-rate schedule
moves ``lr``: the operator reads each group's hyperparameters when it runs, as the eager step does.

When it runs, the operator performs the eager step of the optimizer it names (the same native
call per param group, the same checks, the same bits). If the compiler handed it copies of the
mutated tensors instead of the tensors themselves (functionalization that could not work in
place), the results are copied into them, so that the compiled program writes back the stepped
values. State created by the first step (buffers allocated lazily) is new to the compiler: the
step after it compiles once more, then the program is stable.
"""

from __future__ import annotations

import itertools
import weakref
from typing import TYPE_CHECKING, List, Optional, Tuple

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .base import NativeOptimizer

#: Optimizers by handle: the operator's schema takes tensors and integers, not Python objects.
_OPTIMIZERS: "weakref.WeakValueDictionary[int, NativeOptimizer]" = weakref.WeakValueDictionary()
_HANDLES = itertools.count(1)


def register(opt: "NativeOptimizer") -> int:
    """A new handle naming ``opt`` to the operator (each optimizer object, copies included, has its own)."""
    handle = next(_HANDLES)
    _OPTIMIZERS[handle] = opt
    return handle


def mutated_tensors(opt: "NativeOptimizer") -> Tuple[List[Tensor], List[Optional[Tensor]], List[Tensor]]:
    """Parameters, their gradients, and the state the step mutates: each group's step counters
    and flat state buffers."""
    params: List[Tensor] = []
    grads: List[Optional[Tensor]] = []
    state: List[Tensor] = []
    for group, tg in zip(opt.param_groups, opt._tables):
        for p in group["params"]:
            params.append(p)
            grads.append(p.grad)
        state.append(tg.steps)
        state.extend(tg.state_flat.values())
    return params, grads, state


@torch.library.custom_op("smallbatch_rs::step", mutates_args=("params", "state"))
def step(handle: int, params: List[Tensor], grads: List[Optional[Tensor]], state: List[Tensor]) -> None:
    """One step of the optimizer ``handle`` names (see the module docs)."""
    opt = _OPTIMIZERS.get(handle)
    if opt is None:
        raise RuntimeError(f"smallbatch_rs::step: no optimizer has handle {handle} (it was freed)")
    own_params, _, own_state = mutated_tensors(opt)
    given = list(params) + list(state)
    own = own_params + own_state
    copies = [(g, o) for g, o in zip(given, own) if g is not o and g.data_ptr() != o.data_ptr()]
    if copies and len(given) != len(own):
        raise RuntimeError(
            f"smallbatch_rs::step: given {len(given)} tensors, the optimizer has {len(own)}: the compiled "
            "program is older than the optimizer's param groups (recompile after add_param_group)"
        )
    opt._eager_step()
    for g, o in copies:
        g.copy_(o)


@step.register_fake
def _(handle: int, params: List[Tensor], grads: List[Optional[Tensor]], state: List[Tensor]) -> None:
    return None
