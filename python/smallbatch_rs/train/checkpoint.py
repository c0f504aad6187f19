"""Checkpoints as one safetensors file: the model, the optimizer state, the RNG and the data
position, written atomically (a temporary file renamed over the old one), so an interrupted write
never leaves a broken checkpoint.

Tensors are stored under ``model/...``, ``optim/...`` and ``rng/...``; everything else (the step,
the run's settings, the optimizer's hyperparameters with the nesting of its ``state_dict``) is JSON
in the file's metadata. Resuming restores every bit, so a resumed run continues exactly as the
uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Dict, Tuple

import torch

from ._files import atomic_path
from .config import TrainConfig

FORMAT = "smallbatch-rs-checkpoint-1"
#: Settings that may change between a run and its resumption (where and how it reports, and
#: when it stops); every other setting must match the checkpoint's.
RESUMABLE_CHANGES = {"out", "resume", "stop_after", "progress", "log_every", "eval_every", "checkpoint_every", "device"}


def _flatten(obj: Any, prefix: str, tensors: Dict[str, torch.Tensor]) -> Any:
    """A JSON skeleton of ``obj`` whose tensors are moved into ``tensors`` under unique names."""
    if torch.is_tensor(obj):
        name = f"{prefix}"
        tensors[name] = obj.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": name}
    if isinstance(obj, dict):
        return {"__dict__": [[k, _flatten(v, f"{prefix}/{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_flatten(v, f"{prefix}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_flatten(v, f"{prefix}/{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {prefix} in a checkpoint")


def _unflatten(skeleton: Any, tensors: Dict[str, torch.Tensor]) -> Any:
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__dict__" in skeleton:
            return {k: _unflatten(v, tensors) for k, v in skeleton["__dict__"]}
        if "__tuple__" in skeleton:
            return tuple(_unflatten(v, tensors) for v in skeleton["__tuple__"])
    if isinstance(skeleton, list):
        return [_unflatten(v, tensors) for v in skeleton]
    return skeleton


def write(path: Path, model: torch.nn.Module, optimizer: Any, step: int, cfg: TrainConfig, totals: Dict[str, float]) -> None:
    from safetensors.torch import save_file

    tensors: Dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        # On the host, each tensor with a storage of its own: safetensors refuses tensors that
        # share one (tied weights).
        tensors[f"model/{name}"] = t.detach().to("cpu", copy=True).contiguous()
    optim_skeleton = _flatten(optimizer.state_dict(), "optim", tensors)
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state()
    for k, v in rng.items():
        tensors[f"rng/{k}"] = v
    metadata = {
        "format": FORMAT,
        "step": str(step),
        "config": json.dumps(dataclasses.asdict(cfg)),
        "optimizer": json.dumps(optim_skeleton),
        "totals": json.dumps(totals),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


@dataclasses.dataclass
class Checkpoint:
    step: int
    config: Dict[str, Any]
    totals: Dict[str, float]
    tensors: Dict[str, torch.Tensor]
    optimizer_skeleton: Any


def read(path: Path) -> Checkpoint:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - a damaged file: say which, in one line
        raise ValueError(f"--resume: cannot read checkpoint {path}: {e}") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"--resume: {path} is not a {FORMAT} checkpoint (format {meta.get('format')!r})")
    return Checkpoint(
        step=int(meta["step"]),
        config=json.loads(meta["config"]),
        totals=json.loads(meta.get("totals", "{}")),
        tensors=tensors,
        optimizer_skeleton=json.loads(meta["optimizer"]),
    )


def check_config(saved: Dict[str, Any], cfg: TrainConfig) -> None:
    """Refuses to resume with settings that would make a different run."""
    current = dataclasses.asdict(cfg)
    for key, value in current.items():
        if key in RESUMABLE_CHANGES or key not in saved:
            continue
        if saved[key] != value:
            flag = "--" + key.replace("_", "-")
            raise ValueError(f"--resume: the checkpoint was written with {flag} {saved[key]!r}, this run has {value!r}")


def _retuple(loaded: Any, current: Any) -> Any:
    """Hyperparameters come back as they were saved; make tuples where the optimizer has them."""
    if isinstance(current, tuple) and isinstance(loaded, list):
        return tuple(loaded)
    return loaded


def restore(state: Checkpoint, model: torch.nn.Module, optimizer: Any, device: torch.device) -> Tuple[int, Dict[str, float]]:
    model_state = {k[len("model/"):]: v for k, v in state.tensors.items() if k.startswith("model/")}
    missing, unexpected = model.load_state_dict(model_state, strict=False)
    if missing or unexpected:
        raise ValueError(f"--resume: the checkpoint's model does not match (missing {missing[:3]}, unexpected {unexpected[:3]})")
    optim_state = _unflatten(state.optimizer_skeleton, state.tensors)
    if "optimizers" in optim_state:  # StepInBackward: one optimizer per parameter
        pairs = list(zip(optim_state["optimizers"], optimizer.optimizers))
    else:
        pairs = [(optim_state, optimizer)]
    for saved_sd, opt in pairs:
        for saved, current in zip(saved_sd["param_groups"], opt.param_groups):
            for key in saved:
                if key in current:
                    saved[key] = _retuple(saved[key], current[key])
    optimizer.load_state_dict(optim_state)
    torch.set_rng_state(state.tensors["rng/cpu"])
    if "rng/cuda" in state.tensors and device.type == "cuda":
        torch.cuda.set_rng_state(state.tensors["rng/cuda"], device)
    return state.step, state.totals
