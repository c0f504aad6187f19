"""Checkpoints, written atomically so that an interrupted write never leaves a broken one, and
restored bit for bit, so a resumed run continues exactly as the uninterrupted run would have.

One process, or DistributedDataParallel (every rank holds everything): one safetensors file,
``checkpoint.safetensors``, written by the main rank to a temporary name and renamed over the old
one. Tensors are stored under ``model/...``, ``optim/...`` and ``rng/...``; everything else (the
step, the run's settings, the optimizer's hyperparameters with the nesting of its ``state_dict``)
is JSON in the file's metadata.

FSDP (``--fsdp``, every rank holds shards): a ``torch.distributed.checkpoint`` (DCP) folder,
``checkpoint/``: each rank writes its shards of the model (``get_model_state_dict``) and of the
optimizer state (``get_optimizer_state_dict``, state as DTensors) with ``dcp.save``, beside the
main rank's RNG state; ``trainer.json`` holds the step, the settings and the time totals. The
ranks write into ``.checkpoint.tmp/``, and after a barrier the main rank renames it to
``checkpoint/`` (the previous one is moved to ``.checkpoint.old/`` for the moment between the two
renames, and read from there if a crash falls into it). Resumed on another number of ranks, DCP
redistributes the shards (the run then sums its gradients in another order: not bit for bit).

The data position is the step: batch ``k`` is the same sequences in every run of one seed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from ._files import atomic_path
from .config import TrainConfig

FORMAT = "smallbatch-rs-checkpoint-1"
#: Settings that may change between a run and its resumption (where and how it reports, and
#: when it stops); every other setting must match the checkpoint's.
RESUMABLE_CHANGES = {
    "out", "resume", "stop_after", "progress", "log_every", "eval_every", "checkpoint_every", "device", "compile",
    "cuda_graphs",
}


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


# --- sharded (FSDP) checkpoints ---------------------------------------------------------------

SHARDED_FORMAT = "smallbatch-rs-sharded-checkpoint-1"
#: The folder of a sharded checkpoint inside the run's output folder, and the trainer's file in it.
SHARDED_DIR = "checkpoint"
TRAINER_FILE = "trainer.json"


def _optimizers(optimizer: Any) -> Any:
    """What torch's state-dict helpers take: the optimizer, or StepInBackward's per-parameter list."""
    inner = getattr(optimizer, "optimizers", None)
    return list(inner) if inner is not None else optimizer


def _rng_state(device: torch.device) -> Dict[str, torch.Tensor]:
    rng = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def _sharded_state(model: torch.nn.Module, optimizer: Any, device: torch.device) -> Dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {
        "model": get_model_state_dict(model),
        "optim": get_optimizer_state_dict(model, _optimizers(optimizer)),
        "rng": _rng_state(device),
    }


def sharded_dir(out: Path) -> Optional[Path]:
    """The run's sharded checkpoint folder, or None: ``checkpoint/``, else ``.checkpoint.old/``
    (a crash between the two renames of :func:`write_sharded` leaves only that one)."""
    for path in (out / SHARDED_DIR, out / f".{SHARDED_DIR}.old"):
        if (path / TRAINER_FILE).is_file():
            return path
    return None


def write_sharded(out: Path, model: torch.nn.Module, optimizer: Any, step: int, cfg: TrainConfig,
                  totals: Dict[str, float], device: torch.device, main: bool) -> Path:
    """Every rank calls it: each writes its shards, the main rank the rest, then renames."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    final = out / SHARDED_DIR
    tmp, old = out / f".{SHARDED_DIR}.tmp", out / f".{SHARDED_DIR}.old"
    if main:
        shutil.rmtree(tmp, ignore_errors=True)  # a write that died half-way
    dist.barrier()
    dcp.save(_sharded_state(model, optimizer, device), checkpoint_id=str(tmp))
    dist.barrier()  # every rank's shards are on disk
    if main:
        meta = {"format": SHARDED_FORMAT, "step": step, "config": dataclasses.asdict(cfg), "totals": totals,
                "world_size": dist.get_world_size()}
        (tmp / TRAINER_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        if final.exists():  # else a crash left the last checkpoint in .old: it stays until tmp is in place
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()  # no rank starts the next write before this one is in place
    return final


@dataclasses.dataclass
class ShardedCheckpoint:
    path: Path
    step: int
    config: Dict[str, Any]
    totals: Dict[str, float]
    world_size: int


def read_sharded(path: Path) -> ShardedCheckpoint:
    """The trainer's part of a sharded checkpoint (the shards are read by :func:`restore_sharded`)."""
    file = path / TRAINER_FILE
    try:
        meta = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"--resume: cannot read checkpoint {file}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != SHARDED_FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else None
        raise ValueError(f"--resume: {file} is not a {SHARDED_FORMAT} checkpoint (format {got!r})")
    return ShardedCheckpoint(path, int(meta["step"]), meta["config"], meta.get("totals", {}), int(meta.get("world_size", 0)))


def restore_sharded(state: ShardedCheckpoint, model: torch.nn.Module, optimizer: Any, device: torch.device) -> None:
    """Every rank calls it: loads its shards (DCP reshards if the number of ranks changed)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    # The state dicts of this model and optimizer (torch's helper creates the optimizer's state
    # with one step of zero gradients at learning rate 0), filled in place from the files.
    target = _sharded_state(model, optimizer, device)
    try:
        saved = dcp.FileSystemReader(str(state.path)).read_metadata().state_dict_metadata
        if "rng.cuda" not in saved:  # written on the CPU, resumed on a GPU
            target["rng"].pop("cuda", None)
        dcp.load(target, checkpoint_id=str(state.path))
    except Exception as e:  # noqa: BLE001 - a damaged or foreign checkpoint: say which, in one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"--resume: cannot load the shards of {state.path}: {first}") from None
    set_model_state_dict(model, target["model"])
    set_optimizer_state_dict(model, _optimizers(optimizer), target["optim"])
    torch.set_rng_state(target["rng"]["cpu"])
    if "cuda" in target["rng"] and device.type == "cuda":
        torch.cuda.set_rng_state(target["rng"]["cuda"], device)

