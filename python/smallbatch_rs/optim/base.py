"""``FlatOptimizer``: what every smallbatch_rs optimizer shares with torch.optim.

It owns the flat buffers of each param group (one :class:`~smallbatch_rs._flat.FlatGroup` per
group), the mapping between them and torch's ``state_dict`` layout, half-lives in tokens, and the
checks on parameters and hyperparameters. A concrete optimizer is its argument validation, the
names of its state buffers, and one native call per group in :meth:`_step_group`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, ClassVar, Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .. import halflife
from .._flat import FlatGroup, describe

# torch's current stream on a device as a raw handle. The private getter skips building a
# torch.cuda.Stream object, which on an H100 host was a sixth of a small step's host time; the
# public spelling is the fallback where it is missing.
_RAW_STREAM_GETTER: Optional[Callable[[int], int]] = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _current_raw_stream(ordinal: int) -> int:
    if _RAW_STREAM_GETTER is not None:
        return _RAW_STREAM_GETTER(ordinal)
    return torch.cuda.current_stream(ordinal).cuda_stream

ParamsT = Union[Iterable[Tensor], Iterable[Dict[str, Any]], Iterable[Tuple[str, Tensor]]]

#: Tensor dtypes the native rules step in this build (bf16: update in f32, rounded back).
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)


def as_float(value: Any) -> float:
    """A hyperparameter as a Python float (torch allows 0-dim tensors, e.g. a tensor lr)."""
    if isinstance(value, Tensor):
        return float(value.item())
    return float(value)


class FlatOptimizer(torch.optim.Optimizer):
    """Base class: flat buffers per param group and one native call per group per step."""

    #: Names of the optimizer's per-parameter state tensors, as torch names them.
    state_names: ClassVar[Tuple[str, ...]] = ()
    #: Whether ``state[p]["step"]`` exists (torch's Adam has it, SGD does not).
    exports_step: ClassVar[bool] = True
    #: Whether the rule has CUDA kernels wired up in this release.
    cuda_supported: ClassVar[bool] = False
    #: Whether the rule sees tensors as row-major matrices (Adafactor, Muon).
    row_major: ClassVar[bool] = False
    #: Whether gradients are read where autograd leaves them instead of from a persistent flat
    #: gradient buffer (set by :class:`~smallbatch_rs.optim.backward.StepInBackward`).
    transient_grads: ClassVar[bool] = False
    #: Half-life hyperparameters: name -> (group key, index into a tuple key or None).
    halflife_targets: ClassVar[Mapping[str, Tuple[str, Optional[int]]]] = {}

    def __init__(self, params: ParamsT, defaults: Dict[str, Any]) -> None:
        self._flat: list[FlatGroup] = []
        super().__init__(params, defaults)

    # --- names and checks ------------------------------------------------------------------

    @property
    def _name(self) -> str:
        return f"smallbatch_rs.{type(self).__name__}"

    def _fail(self, group_index: Optional[int], name: str, value: Any, requirement: str) -> ValueError:
        where = f"param group {group_index}; " if group_index is not None else ""
        return ValueError(f"{self._name}: invalid {name}: {value!r} ({where}must be {requirement})")

    def _check_non_negative(self, group_index: Optional[int], name: str, value: Any) -> None:
        try:
            x = as_float(value)
        except (TypeError, ValueError, RuntimeError):
            raise self._fail(group_index, name, value, "a number >= 0") from None
        if not (math.isfinite(x) and x >= 0.0):
            raise self._fail(group_index, name, value, "finite and >= 0")

    def _check_beta(self, group_index: Optional[int], name: str, value: Any) -> None:
        try:
            x = as_float(value)
        except (TypeError, ValueError, RuntimeError):
            raise self._fail(group_index, name, value, "a number in [0, 1)") from None
        if not (0.0 <= x < 1.0):
            raise self._fail(group_index, name, value, "in [0, 1)")

    def _check_hyperparameters(self, group: Dict[str, Any], group_index: Optional[int]) -> None:
        """Raises ValueError naming the first out-of-range hyperparameter of ``group``."""
        raise NotImplementedError

    def _check_params(self, params: Sequence[Tensor], group_index: int, names: Optional[Sequence[str]]) -> None:
        devices = {p.device for p in params}
        if len(devices) > 1:
            listed = ", ".join(sorted(str(d) for d in devices))
            raise RuntimeError(
                f"{self._name}: param group {group_index} has parameters on different devices ({listed}); "
                "put each device's parameters in a group of their own"
            )
        seen: Dict[int, int] = {}
        for i, p in enumerate(params):
            if id(p) in seen:
                raise ValueError(
                    f"{self._name}: {describe(i, group_index, p, names)} appears twice in its group "
                    f"(also at index {seen[id(p)]})"
                )
            seen[id(p)] = i
        for i, p in enumerate(params):
            what = describe(i, group_index, p, names)
            if p.is_sparse or p.layout != torch.strided:
                raise TypeError(f"{self._name} does not support sparse parameters: {what} is {p.layout}")
            if p.is_complex():
                raise TypeError(f"{self._name} does not support complex parameters: {what} is {p.dtype}")
            if p.dtype not in SUPPORTED_DTYPES:
                raise TypeError(f"{self._name} supports float32 and bfloat16 parameters: {what} is {p.dtype}")
            if p.device.type == "cuda" and not self.cuda_supported:
                raise RuntimeError(
                    f"{self._name}: {what} is on {p.device}; this rule has no CUDA kernels in this release"
                )
            if p.device.type not in ("cpu", "cuda"):
                raise RuntimeError(f"{self._name}: {what} is on {p.device}; only CPU and CUDA parameters are supported")
        dtypes = {p.dtype for p in params}
        if len(dtypes) > 1:
            raise TypeError(f"{self._name}: param group {group_index} mixes dtypes {sorted(map(str, dtypes))}")

    # --- half-lives ------------------------------------------------------------------------

    def _apply_halflives(self, group: Dict[str, Any], group_index: Optional[int], explicit: Iterable[str]) -> None:
        """Sets the coefficients that half-lives in tokens determine (see :mod:`smallbatch_rs.halflife`).

        ``explicit`` are the keys the user gave directly at the same level; giving both a
        coefficient and the half-life that would set it is an error.
        """
        explicit = set(explicit)
        tokens_per_step = group.get("tokens_per_step")
        if tokens_per_step is not None:
            try:
                tps = float(tokens_per_step)
            except (TypeError, ValueError):
                raise self._fail(group_index, "tokens_per_step", tokens_per_step, "a number of tokens > 0") from None
            if not (math.isfinite(tps) and tps > 0):
                raise self._fail(group_index, "tokens_per_step", tokens_per_step, "finite and > 0")
        for hl_name, (key, index) in self._halflife_targets(group).items():
            hl = group.get(hl_name)
            if hl is None:
                continue
            if key in explicit:
                raise ValueError(
                    f"{self._name}: give either {key} or the half-life {hl_name}, not both"
                    + (f" (param group {group_index})" if group_index is not None else "")
                )
            try:
                hl_tokens = float(hl)
            except (TypeError, ValueError):
                raise self._fail(group_index, hl_name, hl, "a half-life in tokens > 0") from None
            if not (math.isfinite(hl_tokens) and hl_tokens > 0):
                raise self._fail(group_index, hl_name, hl, "a finite half-life in tokens > 0")
            if tokens_per_step is None:
                raise ValueError(
                    f"{self._name}: {hl_name}={hl!r} is a half-life in tokens and needs tokens_per_step "
                    "(tokens per optimizer step = batch size x sequence length)"
                )
            beta = halflife.beta_from_halflife(hl_tokens, float(tokens_per_step))
            if beta >= 1.0:
                raise self._fail(
                    group_index, hl_name, hl, f"short enough that 0.5 ** (tokens_per_step / {hl_name}) < 1 in float64"
                )
            if index is None:
                group[key] = beta
            else:
                values = list(group[key])
                values[index] = beta
                group[key] = tuple(values)

    def _halflife_targets(self, group: Mapping[str, Any]) -> Mapping[str, Tuple[str, Optional[int]]]:
        """The half-lives ``group`` understands (rules with several kinds of group override this)."""
        return self.halflife_targets

    def _exports_step(self, group: Mapping[str, Any]) -> bool:
        """Whether ``state[p]["step"]`` exists for parameters of ``group``."""
        return self.exports_step

    def _matrices(self, group: Mapping[str, Any], params: Sequence[Tensor]) -> Optional[list]:
        """How the rule sees each tensor as ``[batch, rows, cols]`` (None: over the last two dims)."""
        return None

    def set_tokens_per_step(self, tokens_per_step: float) -> None:
        """Recomputes every coefficient given as a half-life for a new number of tokens per step
        (for example after changing the batch size). Coefficients given directly are kept."""
        for gi, group in enumerate(self.param_groups):
            trial = dict(group, tokens_per_step=tokens_per_step)
            self._apply_halflives(trial, gi, ())
            self._check_hyperparameters(trial, gi)
        for group in self.param_groups:
            group["tokens_per_step"] = tokens_per_step
            self._apply_halflives(group, None, ())

    # --- groups ----------------------------------------------------------------------------

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Adds a group (as torch.optim does) and moves its parameters into flat buffers.

        All checks run before anything changes: a rejected group leaves the optimizer and the
        parameters as they were.
        """
        raw_keys = set(param_group) if isinstance(param_group, dict) else set()
        group_index = len(self.param_groups)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            params: list[Tensor] = group["params"]
            if not params:
                raise ValueError(f"{self._name}: param group {group_index} has no parameters")
            names = group.get("param_names")
            self._check_params(params, group_index, names)
            # Coefficients given in this group win over half-lives inherited from the defaults.
            for hl_name, (key, _) in self._halflife_targets(group).items():
                if key in raw_keys and hl_name not in raw_keys:
                    group[hl_name] = None
            self._apply_halflives(group, group_index, {k for k in raw_keys if k != "params"})
            self._check_hyperparameters(group, group_index)
            matrices = self._matrices(group, params)
            self._flat.append(
                FlatGroup(
                    params, group_index, self._name, names, row_major=self.row_major, matrices=matrices,
                    transient_grads=self.transient_grads,
                )
            )
            self._init_flat_group(group, self._flat[-1])
        except BaseException:
            self.param_groups.pop()
            raise

    def __setstate__(self, state: Dict[str, Any]) -> None:
        """Restores a pickled or deep-copied optimizer: torch's state (``defaults``, ``state``,
        ``param_groups``), then flat buffers built anew around the restored parameters, with the
        restored state copied into them. The copy steps exactly as the original would."""
        super().__setstate__(state)
        for group in self.param_groups:
            for hl_name in self._halflife_targets(group):
                group.setdefault(hl_name, None)
            group.setdefault("tokens_per_step", None)
            group.setdefault("maximize", False)
            group.setdefault("stochastic_rounding", False)
            group.setdefault("seed", 0)
        if "_flat" not in self.__dict__:
            self._rebuild_flat_groups()

    def _rebuild_flat_groups(self) -> None:
        """Flat buffers for ``param_groups`` as they are (already checked when first added) and
        the per-parameter entries of ``state`` moved into them."""
        self._flat = []
        loaded: Dict[Tuple[int, int], Mapping[str, Any]] = {}
        for gi, group in enumerate(self.param_groups):
            params = group["params"]
            fg = FlatGroup(
                params, gi, self._name, group.get("param_names"), row_major=self.row_major,
                matrices=self._matrices(group, params), transient_grads=self.transient_grads,
            )
            self._flat.append(fg)
            self._init_flat_group(group, fg)
            for i, p in enumerate(params):
                if p in self.state:
                    loaded[(gi, i)] = self.state[p]
        self._adopt_loaded_state(loaded)

    # --- gradients and steps ---------------------------------------------------------------

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Resets gradients with one fill of each flat gradient buffer.

        ``.grad`` stays a view into the flat buffer (all zeros) so the next backward accumulates
        in place. With ``set_to_none=True`` (the default) a parameter that receives no gradient
        before the next :meth:`step` is skipped, as torch.optim skips a ``None`` gradient.
        """
        for fg in self._flat:
            fg.zero_grad(set_to_none)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:  # type: ignore[override]
        """Performs one optimization step: one native call per param group.

        Args:
            closure: re-evaluates the model and returns the loss (optional, as in torch.optim).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Everything that can fail is checked for every group before any group is stepped, so an
        # error leaves parameters and state exactly as they were.
        plan = []
        for group_index, (group, fg) in enumerate(zip(self.param_groups, self._flat)):
            stepped = fg.gather()
            if 1 in stepped:
                self._check_hyperparameters(group, group_index)
                plan.append((group, fg, stepped))
        try:
            for group, fg, stepped in plan:
                self._create_state(group, fg, stepped)
                self._step_group(group, fg, bytes(stepped))
        finally:
            for fg in self._flat:
                fg.release_grads()
        return loss

    def _init_flat_group(self, group: Dict[str, Any], fg: FlatGroup) -> None:
        """Hook for rules that fix per-group layout decisions when the group is added."""

    def _active_state_names(self, group: Mapping[str, Any]) -> Tuple[str, ...]:
        """The state tensors this group keeps with its current hyperparameters."""
        return self.state_names

    def _state_views(self, group: Mapping[str, Any], fg: FlatGroup, i: int) -> Dict[str, Tensor]:
        """The state tensors of parameter ``i`` (views into the flat state buffers), by name."""
        return {name: fg.state_view(name, i) for name in self._active_state_names(group)}

    def _create_state(self, group: Mapping[str, Any], fg: FlatGroup, stepped: bytearray) -> None:
        """Creates ``self.state[p]`` (views into the flat state) for parameters stepped for the first time."""
        names = self._active_state_names(group)
        exports_step = self._exports_step(group)
        if (not names and not exports_step) or False not in fg.has_state:
            return
        for i, on in enumerate(stepped):
            if on and not fg.has_state[i]:
                entry: Dict[str, Tensor] = {}
                if exports_step:
                    entry["step"] = fg.steps[i]
                entry.update(self._state_views(group, fg, i))
                self.state[fg.params[i]] = entry
                fg.has_state[i] = True

    def _step_group(self, group: Dict[str, Any], fg: FlatGroup, stepped: bytes) -> None:
        """One native call that steps every parameter of ``group`` marked in ``stepped``."""
        raise NotImplementedError

    @staticmethod
    def _cuda_args(fg: FlatGroup) -> Dict[str, Any]:
        """Where a CUDA group's kernels launch: its device and torch's current stream there (no
        host synchronisation; the step can be captured in a CUDA graph)."""
        from .. import cuda as _cuda

        _cuda.preload_nvrtc()
        ordinal = fg.device.index or 0
        return dict(ordinal=ordinal, cuda_stream=_current_raw_stream(ordinal))

    def _storage_args(self, group: Mapping[str, Any], fg: FlatGroup) -> Dict[str, Any]:
        """How the native call reads and writes the group's parameters: dtype and, for bf16,
        rounding (stochastic with the group's seed; the stream is the group's index, so groups
        draw independent bits)."""
        stochastic = bool(group.get("stochastic_rounding")) and fg.dtype == torch.bfloat16
        return dict(
            param_dtype=fg.dtype_name,
            rounding="stochastic" if stochastic else "nearest",
            seed=int(group.get("seed") or 0) & 0xFFFF_FFFF_FFFF_FFFF,
            stream=fg.group_index,
        )

    # --- state_dict ------------------------------------------------------------------------

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Loads state in torch.optim's layout (from this class or the torch optimizer of the
        same rule) and copies it into the flat buffers. Everything is checked first: on error the
        optimizer is unchanged."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        id_to_param: Dict[Any, Tuple[int, int]] = {}
        for gi, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(group["params"]) != len(saved["params"]):
                raise ValueError(
                    "loaded state dict contains a parameter group that doesn't match the size of optimizer's group"
                )
            for i, saved_id in enumerate(saved["params"]):
                id_to_param[saved_id] = (gi, i)
            if saved.get("amsgrad"):
                raise ValueError(f"{self._name}: param group {gi} of the loaded state uses amsgrad, which is not supported")
        loaded: Dict[Tuple[int, int], Dict[str, Any]] = {}
        for saved_id, entry in state_dict["state"].items():
            if saved_id not in id_to_param:
                continue
            gi, i = id_to_param[saved_id]
            loaded[(gi, i)] = entry
            fg = self._flat[gi]
            p = fg.params[i]
            expected = self._state_views(saved_groups[gi], fg, i)
            for name in self.state_names:
                value = entry.get(name)
                if value is None:
                    continue
                if name not in expected:
                    raise ValueError(
                        f"{self._name}: loaded state {name!r} of {describe(i, gi, p, fg.names)} "
                        "does not fit this optimizer's settings for that parameter"
                    )
                shape = tuple(expected[name].shape)
                if not isinstance(value, Tensor) or tuple(value.shape) != shape:
                    got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                    raise ValueError(
                        f"{self._name}: loaded state {name!r} of {describe(i, gi, p, fg.names)} "
                        f"has shape {got}, expected {shape}"
                    )
            if self._exports_step(saved_groups[gi]) and "step" in entry:
                step = as_float(entry["step"])
                if not (step >= 0 and step == int(step)):
                    raise ValueError(f"{self._name}: loaded step of {describe(i, gi, p, fg.names)} is {step!r}")
        super().load_state_dict(state_dict)
        self._adopt_loaded_state(loaded)

    @torch.no_grad()
    def _adopt_loaded_state(self, loaded: Mapping[Tuple[int, int], Mapping[str, Any]]) -> None:
        """Copies the loaded state into the flat buffers and makes each ``self.state`` entry views
        of them, so state_dict() and the native step share one storage.

        The values are taken from the state dict as given, not as torch's loader left them in
        ``self.state``: torch casts state to the parameter's dtype, and our state is float32 even
        for bf16 weights."""
        for gi, (group, fg) in enumerate(zip(self.param_groups, self._flat)):
            exports_step = self._exports_step(group)
            for i, p in enumerate(fg.params):
                entry = loaded.get((gi, i))
                present = [n for n in self.state_names if entry is not None and entry.get(n) is not None]
                if entry is None or not (present or (exports_step and "step" in entry)):
                    for view in self._state_views(group, fg, i).values():
                        view.zero_()
                    fg.steps[i] = 0.0
                    fg.has_state[i] = False
                    self.state.pop(p, None)
                    continue
                new_entry: Dict[str, Tensor] = {}
                # A state without a step count (torch's SGD and Muon) has taken at least one step
                # if it has buffers: that is all the first-step logic needs.
                fg.steps[i] = as_float(entry["step"]) if "step" in entry else (1.0 if present else 0.0)
                if exports_step:
                    new_entry["step"] = fg.steps[i]
                for name, view in self._state_views(group, fg, i).items():
                    value = entry.get(name)
                    if value is None:
                        view.zero_()
                    else:
                        view.copy_(value)
                    new_entry[name] = view
                self.state[p] = new_entry
                fg.has_state[i] = True
