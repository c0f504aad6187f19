"""``NativeOptimizer``: what every smallbatch_rs optimizer shares with torch.optim.

It owns each param group's table of tensors and state (one :class:`~smallbatch_rs._tables.TensorGroup`
per group), the mapping between that state and torch's ``state_dict`` layout, half-lives in
tokens, and the checks on parameters and hyperparameters. A concrete optimizer is its argument
validation, the names of its state buffers, and one native call per group in :meth:`_step_group`.
Parameters and gradients are never moved or aliased: each step reads them where torch keeps them.
"""

from __future__ import annotations

import math
from typing import Any, Callable, ClassVar, Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .. import halflife
from .._sharding import is_dtensor
from .._tables import SUPPORTED_DTYPES, StepTable, TensorGroup, describe

# torch's current stream on a device as a raw handle. The private getter skips building a
# torch.cuda.Stream object, which on an H100 host was a sixth of a small step's host time; the
# public spelling is the fallback where it is missing.
_RAW_STREAM_GETTER: Optional[Callable[[int], int]] = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _current_raw_stream(ordinal: int) -> int:
    if _RAW_STREAM_GETTER is not None:
        return _RAW_STREAM_GETTER(ordinal)
    return torch.cuda.current_stream(ordinal).cuda_stream

ParamsT = Union[Iterable[Tensor], Iterable[Dict[str, Any]], Iterable[Tuple[str, Tensor]]]


def _drop_duplicates(group: Dict[str, Any]) -> None:
    """A parameter listed twice in one group (torch.optim warns, and would step it twice) is
    kept once: one native call steps each tensor of its table once."""
    params = group["params"]
    first: Dict[int, int] = {}
    for i, p in enumerate(params):
        first.setdefault(id(p), i)
    if len(first) == len(params):
        return
    keep = sorted(first.values())
    group["params"] = [params[i] for i in keep]
    if group.get("param_names") is not None:
        group["param_names"] = [group["param_names"][i] for i in keep]


def check_torch_flags(name: str, *, foreach: Any = None, fused: Any = None, differentiable: bool = False) -> None:
    """torch.optim's implementation switches, accepted so that code written for torch runs: the
    native step is always one call over the whole group (what ``foreach`` and ``fused`` ask
    for), so they change nothing; torch's own rule about them still holds. (``capturable`` is a
    real mode: see :meth:`NativeOptimizer._lr_args`.)"""
    if foreach and fused:
        raise RuntimeError(f"{name}: `fused` and `foreach` cannot be `True` together (as in torch.optim)")
    if differentiable:
        raise ValueError(f"{name}: differentiable=True is not supported (the native step is not differentiable)")


def as_float(value: Any) -> float:
    """A hyperparameter as a Python float (torch allows 0-dim tensors, e.g. a tensor lr)."""
    if isinstance(value, Tensor):
        return float(value.item())
    return float(value)


class NativeOptimizer(torch.optim.Optimizer):
    """Base class: a table of tensors per param group and one native call per group per step."""

    #: Names of the optimizer's per-parameter state tensors, as torch names them.
    state_names: ClassVar[Tuple[str, ...]] = ()
    #: Whether ``state[p]["step"]`` exists (torch's Adam has it, SGD does not).
    exports_step: ClassVar[bool] = True
    #: Whether the rule has CUDA kernels wired up in this release.
    cuda_supported: ClassVar[bool] = False
    #: Whether the rule sees tensors as row-major matrices (Adafactor, Muon).
    row_major: ClassVar[bool] = False
    #: Half-life hyperparameters: name -> (group key, index into a tuple key or None).
    halflife_targets: ClassVar[Mapping[str, Tuple[str, Optional[int]]]] = {}
    #: Whether the capturable step works for tensors spread over several ranks (FSDP2).
    capturable_sharded: ClassVar[bool] = True

    def __init__(self, params: ParamsT, defaults: Dict[str, Any]) -> None:
        self._tables: list[TensorGroup] = []
        # As torch's constructors do, the hyperparameters given directly are checked before the
        # parameters are looked at (half-lives need the groups' tokens_per_step: checked per group).
        trial = dict(defaults)
        for hl_name in self._halflife_targets(trial):
            trial[hl_name] = None
        self._check_hyperparameters(trial, 0)
        super().__init__(params, defaults)
        from . import compiled

        self._op_handle = compiled.register(self)

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

    def _check_tensor_option(self, group_index: Optional[int], name: str, value: Any, foreach: Any) -> None:
        """torch's rules for a hyperparameter given as a tensor: one element, and not with
        foreach=True (torch's foreach kernels need a float or a capturable step)."""
        if not isinstance(value, Tensor):
            return
        if foreach:
            raise ValueError(
                f"{self._name}: {name} as a Tensor is not supported with foreach=True"
                + (f" (param group {group_index})" if group_index is not None else "")
                + " (as in torch.optim)"
            )
        if value.numel() != 1:
            raise self._fail(group_index, name, value, "a 1-element tensor or a number")

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
        """Adds a group (as torch.optim does) and builds its table of tensors.

        All checks run before anything changes: a rejected group leaves the optimizer as it was.
        """
        raw_keys = set(param_group) if isinstance(param_group, dict) else set()
        group_index = len(self.param_groups)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            _drop_duplicates(group)
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
            group.setdefault("capturable", False)
            tg = self._new_table(group, group_index, params)
            self._check_capturable(group, group_index, tg)
            self._init_tensor_group(group, tg)
            self._tables.append(tg)
        except BaseException:
            self.param_groups.pop()
            raise

    def __setstate__(self, state: Dict[str, Any]) -> None:
        """Restores a pickled or deep-copied optimizer: torch's state (``defaults``, ``state``,
        ``param_groups``), then tables built anew around the restored parameters, with the
        restored state copied into their buffers. The copy steps exactly as the original would."""
        super().__setstate__(state)
        from . import compiled

        self._op_handle = compiled.register(self)  # a copy is another optimizer to the operator
        for group in self.param_groups:
            for hl_name in self._halflife_targets(group):
                group.setdefault(hl_name, None)
            group.setdefault("tokens_per_step", None)
            group.setdefault("maximize", False)
            group.setdefault("stochastic_rounding", False)
            group.setdefault("seed", 0)
            group.setdefault("capturable", False)
        if "_tables" not in self.__dict__:
            self._rebuild_tables()

    def _new_table(self, group: Dict[str, Any], group_index: int, params: Sequence[Tensor]) -> TensorGroup:
        tg = TensorGroup(
            params, group_index, self._name, group.get("param_names"), row_major=self.row_major,
            cuda_supported=self.cuda_supported,
            matrices_of=lambda ps: self._matrices(group, ps),
            after_layout=lambda tg: self._init_tensor_group(group, tg),
        )
        tg.set_counts_on_device(bool(group.get("capturable")))
        return tg

    # --- capturable steps ----------------------------------------------------------------------

    def _check_capturable(self, group: Mapping[str, Any], group_index: int, tg: TensorGroup) -> None:
        """What ``capturable=True`` needs of a group: a learning rate the step can read without
        the host (a number, or a float32/float64 tensor on the parameters' device), no other
        hyperparameter in device memory (the host reads those at every step), and for
        Adafactor and Muon, whose sharded steps exchange statistics through the host's
        collectives, no tensor spread over several ranks."""
        if not group.get("capturable"):
            return
        if tg.sharding is not None and any(tg.sharding.split) and not self.capturable_sharded:
            raise NotImplementedError(
                f"{self._name}: capturable=True is not supported for tensors spread over several ranks "
                f"(param group {group_index} holds DTensor shards); keep the default capturable=False with FSDP2"
            )
        lr = group["lr"]
        if isinstance(lr, Tensor):
            if lr.device != tg.device:
                raise ValueError(
                    f"{self._name}: with capturable=True a tensor lr must be on the parameters' device "
                    f"(param group {group_index}: lr on {lr.device}, parameters on {tg.device})"
                )
            if lr.dtype not in (torch.float32, torch.float64):
                raise TypeError(
                    f"{self._name}: with capturable=True a tensor lr must be float32 or float64 "
                    f"(param group {group_index}: {lr.dtype})"
                )
        for key, value in group.items():
            values = value if isinstance(value, (tuple, list)) and key != "params" else (value,)
            if key not in ("params", "lr") and any(isinstance(v, Tensor) and v.device.type != "cpu" for v in values):
                raise ValueError(
                    f"{self._name}: with capturable=True only lr may be a tensor on the device "
                    f"(param group {group_index}: {key} is on {next(v for v in values if isinstance(v, Tensor)).device}); "
                    "give it as a number"
                )

    def _lr_args(self, group: Mapping[str, Any], tg: TensorGroup) -> Dict[str, Any]:
        """The learning rate of the native call. A plain step reads it on the host. A capturable
        step (torch's ``capturable=True``) keeps the group's step counts on the parameters'
        device and hands over the address of a tensor lr (which LR schedulers update in place):
        on CUDA the kernels read both and compute the bias corrections themselves, so the host
        reads nothing from the device and a CUDA graph that captured the step replays it with
        the counts and the schedule moving. On the CPU the same mode reads them where they are,
        with results identical to a plain step."""
        lr = group["lr"]
        if not group.get("capturable"):
            return dict(lr=as_float(lr))
        if isinstance(lr, Tensor):
            dtype = "float64" if lr.dtype == torch.float64 else "float32"
            return dict(lr=0.0, capturable=True, lr_tensor=(lr.data_ptr(), dtype))
        return dict(lr=float(lr), capturable=True)

    def _rebuild_tables(self) -> None:
        """Tables for ``param_groups`` as they are (already checked when first added) and the
        per-parameter entries of ``state`` moved into their buffers."""
        self._tables = []
        loaded: Dict[Tuple[int, int], Mapping[str, Any]] = {}
        for gi, group in enumerate(self.param_groups):
            params = group["params"]
            tg = self._new_table(group, gi, params)
            self._init_tensor_group(group, tg)
            self._tables.append(tg)
            for i, p in enumerate(params):
                if p in self.state:
                    loaded[(gi, i)] = self.state[p]
        self._adopt_loaded_state(loaded)

    # --- steps --------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:  # type: ignore[override]
        """Performs one optimization step: one native call per param group.

        Parameters whose ``.grad`` is ``None`` are skipped, as in torch.optim. Under
        ``torch.compile`` the step is one custom operator, ``torch.ops.smallbatch_rs.step``, that
        declares the tensors it mutates and runs this same step (see
        ``smallbatch_rs.optim.compiled``).

        Args:
            closure: re-evaluates the model and returns the loss (optional, as in torch.optim).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if torch.compiler.is_compiling():
            from . import compiled

            handle = self.__dict__.get("_op_handle")
            if handle is None:
                raise RuntimeError(f"{self._name}: no operator handle (an optimizer restored without __setstate__?)")
            params, grads, state = compiled.mutated_tensors(self)
            torch.ops.smallbatch_rs.step(handle, params, grads, state)
            return loss
        self._eager_step()
        return loss

    def _eager_step(self) -> None:
        """The step itself: every group checked, then one native call per group."""
        # Everything that can fail is checked for every group before any group is stepped, so an
        # error leaves parameters and state exactly as they were.
        plan = []
        for group_index, (group, tg) in enumerate(zip(self.param_groups, self._tables)):
            table = tg.gather()
            if tg.state_moved:
                self._refresh_state_views(group, tg)
            if 1 in table.stepped:
                if group.get("capturable"):
                    self._check_capturable(group, group_index, tg)
                    if isinstance(group["lr"], Tensor) and tg.device.type != "cpu":
                        # Reading the tensor would synchronise with the device (and fail under a
                        # capture): it was checked when set, the kernels read it as it is.
                        self._check_hyperparameters(dict(group, lr=0.0), group_index)
                    else:
                        self._check_hyperparameters(group, group_index)
                else:
                    self._check_hyperparameters(group, group_index)
                plan.append((group, tg, table))
        for group, tg, table in plan:
            self._create_state(group, tg, table.stepped)
            self._step_group(group, tg, table)
            table.finish()

    def _init_tensor_group(self, group: Dict[str, Any], tg: TensorGroup) -> None:
        """Hook for rules that fix per-group layout decisions when the group is added."""

    def _active_state_names(self, group: Mapping[str, Any]) -> Tuple[str, ...]:
        """The state tensors this group keeps with its current hyperparameters."""
        return self.state_names

    def _state_views(self, group: Mapping[str, Any], tg: TensorGroup, i: int) -> Dict[str, Tensor]:
        """The state tensors of parameter ``i`` (views into the flat state buffers), by name."""
        return {name: tg.state_view(name, i) for name in self._active_state_names(group)}

    def _state_spec(self, group: Mapping[str, Any], tg: TensorGroup, i: int, name: str) -> Tuple[Tuple[int, ...], Tuple[Any, ...]]:
        """For a sharded group: the shape of state ``name`` of the whole tensor ``i`` and its
        placements (elementwise state is shaped and sharded as its parameter)."""
        sharding = tg.sharding
        assert sharding is not None
        return sharding.global_shapes[i], sharding.placements[i]

    def _exported_state(self, group: Mapping[str, Any], tg: TensorGroup, i: int) -> Dict[str, Tensor]:
        """The state tensors of parameter ``i`` as ``self.state`` holds them: views into the
        flat state buffers, wrapped as DTensors with the parameter's mesh for a sharded group
        (what DCP saves, loads and reshards)."""
        views = self._state_views(group, tg, i)
        sharding = tg.sharding
        if sharding is None:
            return views
        return {name: sharding.export(i, v, *self._state_spec(group, tg, i, name)) for name, v in views.items()}

    def _create_state(self, group: Mapping[str, Any], tg: TensorGroup, stepped: bytes) -> None:
        """Creates ``self.state[p]`` (views into the flat state) for parameters stepped for the first time."""
        names = self._active_state_names(group)
        exports_step = self._exports_step(group)
        if (not names and not exports_step) or False not in tg.has_state:
            return
        for i, on in enumerate(stepped):
            if on and not tg.has_state[i]:
                entry: Dict[str, Tensor] = {}
                if exports_step:
                    entry["step"] = tg.steps[i]
                entry.update(self._exported_state(group, tg, i))
                self.state[tg.params[i]] = entry
                tg.has_state[i] = True

    def _refresh_state_views(self, group: Mapping[str, Any], tg: TensorGroup) -> None:
        """After the group's state moved to another device with its parameters: ``self.state``
        entries become views of the moved buffers."""
        tg.state_moved = False
        for i, p in enumerate(tg.params):
            entry = self.state.get(p)
            if entry is not None and tg.has_state[i]:
                if "step" in entry:
                    entry["step"] = tg.steps[i]
                entry.update(self._exported_state(group, tg, i))

    def _step_group(self, group: Dict[str, Any], tg: TensorGroup, table: StepTable) -> None:
        """One native call that steps every parameter of ``group`` marked in ``table.stepped``."""
        raise NotImplementedError

    @staticmethod
    def _device_args(tg: TensorGroup) -> Dict[str, Any]:
        """Where the native call runs: the CPU (``device=None``), or the group's CUDA device and
        torch's current stream there (no host synchronisation; the step can be captured in a
        CUDA graph)."""
        if tg.device.type != "cuda":
            return dict(device=None)
        from .. import cuda as _cuda

        _cuda.preload_nvrtc()
        ordinal = tg.device.index if tg.device.index is not None else torch.cuda.current_device()
        return dict(device=(ordinal, _current_raw_stream(ordinal)))

    def _storage_args(self, group: Mapping[str, Any], tg: TensorGroup) -> Dict[str, Any]:
        """How the native call reads and writes the group's parameters: dtype and, for bf16,
        rounding (stochastic with the group's seed; the stream is the group's index, so groups
        draw independent bits)."""
        stochastic = bool(group.get("stochastic_rounding")) and tg.dtype == torch.bfloat16
        args = dict(
            param_dtype=tg.dtype_name,
            rounding="stochastic" if stochastic else "nearest",
            seed=int(group.get("seed") or 0) & 0xFFFF_FFFF_FFFF_FFFF,
            stream=tg.group_index,
        )
        if stochastic and tg.sharding is not None:
            # Each shard draws the bits its elements draw in the unsharded group.
            args["draws"] = tg.sharding.draws
        return args

    # --- state_dict ------------------------------------------------------------------------

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Loads state in torch.optim's layout (from this class or the torch optimizer of the
        same rule) and copies it into the state buffers. Everything is checked first: on error
        the optimizer is unchanged."""
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
            self._check_loaded_group(saved, gi)
        loaded: Dict[Tuple[int, int], Dict[str, Any]] = {}
        for saved_id, entry in state_dict["state"].items():
            if saved_id not in id_to_param:
                continue
            gi, i = id_to_param[saved_id]
            entry = loaded[(gi, i)] = dict(entry)
            tg = self._tables[gi]
            p = tg.params[i]
            expected = self._state_views(saved_groups[gi], tg, i)
            for name in self.state_names:
                value = entry.get(name)
                if value is None:
                    continue
                if tg.sharding is not None and name in expected and isinstance(value, Tensor):
                    # This rank's part of a DTensor, of a whole tensor, or a local shard as is.
                    global_shape, placements = self._state_spec(saved_groups[gi], tg, i, name)
                    try:
                        value = entry[name] = tg.sharding.local_part(
                            i, value, expected[name].shape, global_shape, placements
                        )
                    except ValueError as e:
                        raise ValueError(f"{self._name}: loaded state {name!r} of {describe(i, gi, p, tg.names)} {e}") from None
                if name not in expected:
                    raise ValueError(
                        f"{self._name}: loaded state {name!r} of {describe(i, gi, p, tg.names)} "
                        "does not fit this optimizer's settings for that parameter"
                    )
                shape = tuple(expected[name].shape)
                if not isinstance(value, Tensor) or tuple(value.shape) != shape:
                    got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                    raise ValueError(
                        f"{self._name}: loaded state {name!r} of {describe(i, gi, p, tg.names)} "
                        f"has shape {got}, expected {shape}"
                    )
            if self._exports_step(saved_groups[gi]) and "step" in entry:
                step = as_float(entry["step"])
                if not (step >= 0 and step == int(step)):
                    raise ValueError(f"{self._name}: loaded step of {describe(i, gi, p, tg.names)} is {step!r}")
        # What this optimizer was built to be stays: capturable=True (an implementation switch,
        # like foreach) and a tensor lr, which keeps its identity (a captured CUDA graph and the
        # LR scheduler hold it) and takes the loaded value.
        kept = [(bool(group.get("capturable")), group["lr"]) for group in self.param_groups]
        super().load_state_dict(state_dict)
        for group, tg, (capturable, lr) in zip(self.param_groups, self._tables, kept):
            group["capturable"] = capturable
            if isinstance(lr, Tensor):
                loaded_lr = group["lr"]
                with torch.no_grad():
                    lr.fill_(loaded_lr if isinstance(loaded_lr, Tensor) else float(loaded_lr))
                group["lr"] = lr
            tg.set_counts_on_device(capturable)
        self._adopt_loaded_state(loaded)

    def _check_loaded_group(self, saved: Mapping[str, Any], group_index: int) -> None:
        """Hook: refuses a loaded param group whose settings this optimizer cannot continue."""

    @torch.no_grad()
    def _adopt_loaded_state(self, loaded: Mapping[Tuple[int, int], Mapping[str, Any]]) -> None:
        """Copies the loaded state into the state buffers and makes each ``self.state`` entry
        views of them, so state_dict() and the native step share one storage.

        The values are taken from the state dict as given, not as torch's loader left them in
        ``self.state``: torch casts state to the parameter's dtype, and our state is float32 even
        for bf16 weights."""
        for gi, (group, tg) in enumerate(zip(self.param_groups, self._tables)):
            exports_step = self._exports_step(group)
            for i, p in enumerate(tg.params):
                entry = loaded.get((gi, i))
                present = [n for n in self.state_names if entry is not None and entry.get(n) is not None]
                if entry is None or not (present or (exports_step and "step" in entry)):
                    for view in self._state_views(group, tg, i).values():
                        view.zero_()
                    tg.steps[i] = 0.0
                    tg.has_state[i] = False
                    self.state.pop(p, None)
                    continue
                new_entry: Dict[str, Tensor] = {}
                # A state without a step count (torch's SGD and Muon) has taken at least one step
                # if it has buffers: that is all the first-step logic needs.
                tg.steps[i] = as_float(entry["step"]) if "step" in entry else (1.0 if present else 0.0)
                if exports_step:
                    new_entry["step"] = tg.steps[i]
                for name, view in self._state_views(group, tg, i).items():
                    value = entry.get(name)
                    if value is None:
                        view.zero_()
                    else:
                        view.copy_(value.to_local() if is_dtensor(value) else value)
                self.state[p] = new_entry
                new_entry.update(self._exported_state(group, tg, i))
                tg.has_state[i] = True
