"""The training loop: the paper's model at batch size 1 (or any), with this package's optimizers.

One call, :func:`train`, does a whole run: data, model, optimizer with coefficients from
half-lives in tokens, warmup-then-cosine learning rate, periodic validation, metrics, a loss plot,
atomic checkpoints and a bit-exact ``--resume``. Under ``torchrun`` it runs DistributedDataParallel
(gloo on CPU, NCCL on GPU), each replica stepping its optimizer natively; or, with ``fsdp``,
FSDP2 (``fully_shard`` per transformer block, then the root), each rank stepping the local shards
of its parameters and checkpointing its shards with ``torch.distributed.checkpoint``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import torch

from .. import halflife
from .._timing import sync as sync_device
from .._timing import timed
from ..optim.backward import StepInBackward
from . import checkpoint as ckpt
from ._files import atomic_path
from .config import DEFAULT_LR, TrainConfig
from .model import PRESETS, Transformer
from .schedule import BatchSchedule, parse_schedule

# The data pipeline (numpy, tokenizers) is imported by train() alone: the benchmark builds its
# optimizers with this module, and must run without the trainer's extras.
if TYPE_CHECKING:
    from .data import ChunkedTokens

EVAL_BATCH = 16


class TrainError(ValueError):
    """A run cannot start or continue as configured (the CLI prints it as one line)."""


def _say(message: str) -> None:
    print(f"smallbatch-rs train: {message}", file=sys.stderr)


# --- setup ----------------------------------------------------------------------------------


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    if spec == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainError(f"--device {spec}: torch sees no CUDA device (driver missing, or a CPU-only torch)")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


@dataclasses.dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    #: A process group this module started for FSDP in one process (ended when the run ends).
    own_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_spec: str, fsdp: bool = False) -> Distributed:
    """Several processes when launched by torchrun (WORLD_SIZE > 1), else one. With ``fsdp`` in
    one process, a process group of one rank (FSDP and its checkpoints run on collectives)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not fsdp:
        return Distributed()
    import torch.distributed as dist

    if not dist.is_available():
        raise TrainError("--fsdp needs torch.distributed, which this build of torch lacks")
    use_cuda = device_spec.startswith("cuda") or (device_spec == "auto" and torch.cuda.is_available())
    backend = "nccl" if use_cuda else "gloo"
    if world <= 1:
        if dist.is_initialized():
            return Distributed(dist.get_rank(), dist.get_world_size())
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
        return Distributed(own_group=True)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return Distributed(rank, world, local_rank)


def shard_model(model: Transformer, device: torch.device) -> None:
    """FSDP2 in place: ``fully_shard`` each transformer block, then the root (the embeddings and
    the output layer), over all ranks. Each parameter becomes a DTensor split on dim 0."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _coefficients(cfg: TrainConfig, tokens_per_step: float) -> Tuple[Optional[float], float]:
    """(beta1 or None for "the rule's default", beta2) for this run's tokens per step."""
    beta1 = halflife.beta_from_halflife(cfg.t1, tokens_per_step) if cfg.t1 is not None else None
    if cfg.beta2 is not None:  # a fixed coefficient, whatever the batch size (the baseline the paper argues against)
        return beta1, cfg.beta2
    beta2 = halflife.beta_from_halflife(cfg.t2, tokens_per_step)
    if beta2 >= 1.0:
        raise TrainError(f"--t2 {cfg.t2:g} tokens is so long that beta2 rounds to 1 at {tokens_per_step:g} tokens per step")
    return beta1, beta2


def coefficient_keys(cfg: TrainConfig, tokens_per_step: float, use_muon: bool = True) -> Dict[str, Any]:
    """The param-group keys that the half-lives set for ``cfg.optimizer`` at ``tokens_per_step``
    (for Muon, of its Muon groups or, with ``use_muon=False``, its AdamW groups)."""
    beta1, beta2 = _coefficients(cfg, tokens_per_step)
    adam_betas = (beta1 if beta1 is not None else cfg.beta1, beta2)
    kind = cfg.optimizer
    if kind == "muon":
        return {"momentum": beta1 if beta1 is not None else 0.95} if use_muon else {"betas": adam_betas}
    if kind == "sgd":
        return {"momentum": beta1 if beta1 is not None else 0.0}
    if kind in ("adafactor", "adafactor-sr"):
        return {"beta1": beta1, "beta2": beta2}
    return {"betas": adam_betas}


def set_coefficients(optimizer: Any, cfg: TrainConfig, tokens_per_step: float) -> None:
    """Recomputes every group's half-life coefficients for a new number of tokens per step."""
    for group in optimizer.param_groups:
        group.update(coefficient_keys(cfg, tokens_per_step, bool(group.get("use_muon", True))))


def build_optimizer(cfg: TrainConfig, model: Transformer, tokens_per_step: float) -> Any:
    """The optimizer of ``cfg.optimizer`` over ``model``, or a :class:`StepInBackward` wrapping it.

    Coefficients come from half-lives in tokens (Marek et al., 2025): beta2 from ``t2`` for every
    rule that keeps a second moment; beta1 (momentum) from ``t1`` when given, else 0.9 for Adam
    and none for SGD and Adafactor (the paper's vanilla forms). Muon steps the blocks' matrices and
    AdamW the embeddings.
    """
    import smallbatch_rs as sb

    coefficients = coefficient_keys(cfg, tokens_per_step)
    lr, wd = cfg.resolved_lr, cfg.weight_decay
    named = list(model.named_parameters())
    seed = cfg.seed
    kind = cfg.optimizer
    if kind == "torch-adamw":
        return torch.optim.AdamW(
            [p for _, p in named], lr=lr, weight_decay=wd, capturable=cfg.cuda_graphs, **coefficients
        )
    groups: List[Dict[str, Any]]
    if kind == "muon":
        matrices = {id(p) for p in model.matrix_parameters()}
        groups = [
            {"params": [p for _, p in named if id(p) in matrices], "param_names": [n for n, p in named if id(p) in matrices], "use_muon": True},
            {"params": [p for _, p in named if id(p) not in matrices], "param_names": [n for n, p in named if id(p) not in matrices], "use_muon": False},
        ]
        cls: Any = sb.Muon
        kwargs: Dict[str, Any] = dict(
            lr=lr, weight_decay=wd, nesterov=False, adamw_lr=DEFAULT_LR["adamw"],
            adamw_betas=coefficient_keys(cfg, tokens_per_step, use_muon=False)["betas"], adamw_weight_decay=wd,
            **coefficients,
        )
    else:
        groups = [{"params": [p for _, p in named], "param_names": [n for n, _ in named]}]
        classes = {"sgd": sb.SGD, "adam": sb.Adam, "adamw": sb.AdamW, "adafactor": sb.Adafactor, "adafactor-sr": sb.AdafactorSR}
        if kind in classes:
            cls, kwargs = classes[kind], dict(lr=lr, weight_decay=wd, **coefficients)
        else:  # pragma: no cover - validate() rejects it first
            raise TrainError(f"unknown optimizer {kind!r}")
    if cfg.resolved_dtype == "bf16":
        kwargs["stochastic_rounding"] = True
    kwargs["seed"] = seed
    if cfg.cuda_graphs:
        kwargs["capturable"] = True  # the replayed step reads its counts and lr on the device
    if cfg.step_in_backward:
        return StepInBackward(groups, cls, **kwargs)
    return cls(groups, **kwargs)


def lr_factor(step: int, steps: int, warmup_steps: int) -> float:
    """Linear warmup from 0 over ``warmup_steps``, then cosine decay to 0 at ``steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup_steps) / span))


def measure_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Dense matmul FLOP/s on this device in the model's dtype (the best of a few runs): the
    denominator of MFU, measured rather than read off a data sheet."""
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    best = min(timed(lambda: a @ b, device) for _ in range(8))
    return 2.0 * n**3 / best


def reset_peak_memory(device: torch.device) -> None:
    """Starts measuring the peak from now: torch's allocator statistics on CUDA; on Linux the
    process's peak resident set (``/proc/self/clear_refs``), so that setting up (the FLOP/s probe,
    the data) does not count as training."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux: the peak then covers the whole process
        pass


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: the peak of torch's allocator. CPU: the process's peak resident set since
    :func:`reset_peak_memory` (everything the process touched, torch's runtime included)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t``: a DTensor's local shard, else ``t``."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) and hasattr(t, "placements") else t


def _bytes(t: torch.Tensor) -> int:
    local = _local(t)
    return local.numel() * local.element_size()


def memory_accounting(model: torch.nn.Module, optimizer: Any) -> Dict[str, int]:
    """Bytes of weights, optimizer state and gradients this process keeps between backward and
    step (what the paper's memory comparison counts; stepping inside backward keeps no gradients).

    Per rank: a sharded (FSDP) parameter counts its local shard, and so do its state and its
    gradient; DDP replicas hold everything, so each counts the whole model."""
    params = sum(_bytes(p) for p in model.parameters())
    in_backward = isinstance(optimizer, StepInBackward)
    optimizers = optimizer.optimizers if in_backward else [optimizer]
    state = 0
    seen = set()
    for opt in optimizers:
        tables = getattr(opt, "_tables", None)
        if tables is not None:  # this package's optimizers: their state buffers (local shards when sharded)
            state += sum(tg.state_bytes() for tg in tables)
            continue
        for entry in opt.state.values():
            for t in entry.values():
                local = _local(t) if torch.is_tensor(t) else None
                if local is not None and local.dim() > 0 and local.data_ptr() not in seen:
                    seen.add(local.data_ptr())
                    state += local.numel() * local.element_size()
    grads = 0 if in_backward else sum(_bytes(p) for p in model.parameters() if p.requires_grad)
    return {"param_bytes": params, "optimizer_state_bytes": state, "grad_buffer_bytes": grads}


@torch.no_grad()
def evaluate(model: Transformer, chunks: ChunkedTokens, device: torch.device) -> float:
    """Mean cross-entropy over the held-out chunks."""
    if len(chunks.val_chunks) == 0:
        return float("nan")
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    for start in range(0, len(chunks.val_chunks), EVAL_BATCH):
        ids = chunks.val_chunks[start : start + EVAL_BATCH]
        x, y = chunks.batch(ids)
        loss = model(x.to(device), y.to(device))
        total += loss.double() * len(ids)
        count += len(ids)
    model.train(was_training)
    return float(total / count)


# --- the run --------------------------------------------------------------------------------


def compile_setting(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether the run compiles its model: ``--compile`` / ``--no-compile``, else
    ``SMALLBATCH_RS_COMPILE`` (0 or 1), else on the CPU (measured faster there, see
    docs/benchmarks.md) and not on CUDA (not measured yet) nor with FSDP."""
    if cfg.compile is not None:
        return cfg.compile
    env = compile_from_environment()
    if env is not None:
        return env
    return device.type == "cpu" and not cfg.fsdp


def compile_from_environment() -> Optional[bool]:
    """``SMALLBATCH_RS_COMPILE``: 1 or 0, or None when unset."""
    env = os.environ.get("SMALLBATCH_RS_COMPILE", "").strip()
    if env in ("0", "1"):
        return env == "1"
    if env:
        raise TrainError(f"SMALLBATCH_RS_COMPILE must be 0 or 1, got {env!r}")
    return None


def compile_error_line(e: BaseException) -> str:
    """A failed compilation in a few words: the exception's type and first line."""
    first = (str(e).strip().splitlines() or [""])[0][:160]
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


class _Forward:
    """The training forward pass: ``torch.compile(module)`` until compilation fails, then the
    module itself. Compilation happens at the first call (and its backward); a failure there,
    for example without a C++ compiler for the CPU backend, is reported in one line and the run
    goes on eager."""

    def __init__(self, module: torch.nn.Module, compile: bool, main: bool):
        self.module, self.main = module, main
        self.compiled: Optional[Any] = torch.compile(module) if compile else None
        self.proven = not compile

    @property
    def is_compiled(self) -> bool:
        return self.compiled is not None

    def loss_and_backward(self, x: torch.Tensor, y: torch.Tensor, scale: int) -> torch.Tensor:
        """The loss of ``(x, y)``, its gradient (divided by ``scale``) accumulated."""
        if self.proven:
            loss = (self.compiled if self.compiled is not None else self.module)(x, y)
            (loss / scale if scale > 1 else loss).backward()
            return loss
        try:
            loss = self.compiled(x, y)  # type: ignore[misc]
            (loss / scale if scale > 1 else loss).backward()
        except Exception as e:  # compilation failed: nothing was stepped, gradients are dropped
            if self.main:
                _say(f"torch.compile is unavailable here ({compile_error_line(e)}); training eager")
            self.compiled, self.proven = None, True
            for p in self.module.parameters():
                p.grad = None
            return self.loss_and_backward(x, y, scale)
        self.proven = True
        return loss


def lr_tensors_on(optimizer: Any, device: torch.device) -> None:
    """Makes every group's learning rate a 0-dim tensor on ``device``: a captured step reads it
    where it lives, and schedules fill it in place."""
    for group in optimizer.param_groups:
        group["lr"] = torch.tensor(float(group["lr"]), device=device)


class GraphedStep:
    """``--cuda-graphs``: zero_grad, forward, backward and the optimizer step of one batch,
    captured once in a CUDA graph and replayed with the batch copied into static input buffers
    (torch's whole-network capture). The first :data:`WARMUP_STEPS` steps run eager on a side
    stream (kernels loaded, optimizer state created, autograd's buffers sized); the step after
    them captures. Gradients live in the graph's memory and are overwritten at each replay; the
    optimizer is capturable, so its step counts and the learning rate (a tensor the schedule
    fills in place) are read on the device. Evaluation, logging and checkpoints run outside."""

    WARMUP_STEPS = 3

    def __init__(self, model: torch.nn.Module, optimizer: Any, device: torch.device):
        self.model, self.optimizer, self.device = model, optimizer, device
        self.graph: Optional[Any] = None
        self.static_x: Optional[torch.Tensor] = None
        self.static_y: Optional[torch.Tensor] = None
        self.static_loss: Optional[torch.Tensor] = None
        self.warmed = 0
        self.side = torch.cuda.Stream(device)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One training step on ``(x, y)``; returns its loss (a device tensor)."""
        if self.graph is not None:
            assert self.static_x is not None and self.static_y is not None and self.static_loss is not None
            self.static_x.copy_(x, non_blocking=True)
            self.static_y.copy_(y, non_blocking=True)
            self.graph.replay()
            return self.static_loss
        self.side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.side):
            if self.warmed < self.WARMUP_STEPS:
                self.optimizer.zero_grad(set_to_none=True)
                loss = self.model(x, y)
                loss.backward()
                self.optimizer.step()
                self.warmed += 1
            else:
                loss = self._capture(x, y)
        torch.cuda.current_stream(self.device).wait_stream(self.side)
        return loss

    def _capture(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.static_x, self.static_y = x.clone(), y.clone()
        graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph, stream=self.side):
            self.static_loss = self.model(self.static_x, self.static_y)
            self.static_loss.backward()
            self.optimizer.step()
        self.graph = graph
        graph.replay()  # capturing ran nothing: this is the step's work
        return self.static_loss


class _StepClock:
    """Time of each training step and of its optimizer part, accumulated into ``totals``.

    On the CPU: host wall-clock. On a GPU: CUDA events recorded on the stream, read only at
    :meth:`flush` (log intervals, checkpoints, the end), so timing adds no host synchronisation
    to the step. A step stepped inside backward reports the host time spent in its hooks.
    """

    def __init__(self, device: torch.device, totals: Dict[str, float]):
        self.cuda, self.totals = device.type == "cuda", totals
        self.pending: List[Tuple[Any, Any, Any, Optional[float]]] = []

    def _mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        self._start = self._mark()

    def backward_done(self) -> None:
        self._mid = self._mark()

    def end(self, host_optimizer_seconds: Optional[float] = None) -> None:
        end = self._mark()
        if self.cuda:
            self.pending.append((self._start, self._mid, end, host_optimizer_seconds))
            return
        self._last = (end - self._start, host_optimizer_seconds if host_optimizer_seconds is not None else end - self._mid)
        self.totals["train_seconds"] += self._last[0]
        self.totals["optimizer_seconds"] += self._last[1]

    def drop_last(self) -> None:
        """Leaves the step just ended out of the totals."""
        if self.cuda:
            self.pending.pop()
            return
        self.totals["train_seconds"] -= self._last[0]
        self.totals["optimizer_seconds"] -= self._last[1]

    def flush(self) -> None:
        if not self.pending:
            return
        self.pending[-1][2].synchronize()
        for start, mid, end, host in self.pending:
            self.totals["train_seconds"] += start.elapsed_time(end) / 1e3
            self.totals["optimizer_seconds"] += host if host is not None else mid.elapsed_time(end) / 1e3
        self.pending.clear()


class _Metrics:
    """metrics.jsonl (one record per log interval and per validation), kept on the main rank."""

    def __init__(self, path: Path, enabled: bool, resume_step: Optional[int]):
        self.path, self.enabled = path, enabled
        self.records: List[Dict[str, Any]] = []
        if not enabled:
            return
        if resume_step is not None and path.is_file():
            # Records past the checkpoint belong to the interrupted future; the resumed run rewrites them.
            for line in path.read_text().splitlines():
                rec = json.loads(line)
                if rec.get("step", 0) <= resume_step:
                    self.records.append(rec)
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))

    def write(self, record: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.records.append(record)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def train(cfg: TrainConfig) -> Dict[str, Any]:
    """Runs (or resumes) one training run and returns its summary (also ``summary.json``)."""
    cfg.validate()
    dist_info = init_distributed(cfg.device, cfg.fsdp)
    try:
        return _run(cfg, dist_info)
    finally:
        if dist_info.own_group:
            torch.distributed.destroy_process_group()


def _run(cfg: TrainConfig, dist_info: Distributed) -> Dict[str, Any]:
    from .data import load_data

    if dist_info.enabled and cfg.step_in_backward and not cfg.fsdp:
        raise TrainError(
            "--step-in-backward steps before DistributedDataParallel averages gradients across replicas: "
            "not with torchrun (with --fsdp each shard is stepped after its gradients are reduced)"
        )
    if dist_info.enabled and cfg.batch_size % (dist_info.world * cfg.grad_accum):
        raise TrainError(
            f"--batch-size {cfg.batch_size} must be a multiple of processes x --grad-accum "
            f"({dist_info.world} x {cfg.grad_accum})"
        )
    if cfg.grad_accum > 1 and not dist_info.enabled:
        _say(
            f"warning: --grad-accum {cfg.grad_accum} on one device costs the same compute as --batch-size "
            f"{cfg.batch_size // cfg.grad_accum} without accumulation but takes {cfg.grad_accum}x fewer optimizer "
            "steps; Marek et al. (2025) find accumulation wasteful on a single device"
        )
    device = resolve_device(cfg.device, dist_info.local_rank)
    if cfg.cuda_graphs and device.type != "cuda":
        raise TrainError(f"--cuda-graphs needs a CUDA device (this run is on {device})")
    if cfg.cuda_graphs and dist_info.enabled:
        raise TrainError("--cuda-graphs runs on one process: not with torchrun")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # events, NCCL and the native kernels use the current device
    dtype = torch.bfloat16 if cfg.resolved_dtype == "bf16" else torch.float32
    out = Path(cfg.out)
    checkpoint_path = out / "checkpoint.safetensors"
    resume_state: Optional[ckpt.Checkpoint] = None
    sharded_resume: Optional[ckpt.ShardedCheckpoint] = None
    if cfg.resume and cfg.fsdp:
        found = ckpt.sharded_dir(out)
        if found is None:
            hint = f"; {checkpoint_path.name} there is from a run without --fsdp: resume it without --fsdp" if checkpoint_path.is_file() else ""
            raise TrainError(f"--resume: no checkpoint in {out} (expected {ckpt.SHARDED_DIR}/, written with --fsdp{hint})")
        sharded_resume = ckpt.read_sharded(found)
        ckpt.check_config(sharded_resume.config, cfg)
        if sharded_resume.world_size != dist_info.world and dist_info.main:
            _say(
                f"warning: the checkpoint was written by {sharded_resume.world_size} processes, this run has "
                f"{dist_info.world}: the shards are redistributed and the run goes on with the same batches, "
                "but gradients are summed in another order, so it is not bit for bit the run it would have been"
            )
    elif cfg.resume:
        if not checkpoint_path.is_file():
            hint = f"; {ckpt.SHARDED_DIR}/ there is from a run with --fsdp: resume it with --fsdp" if ckpt.sharded_dir(out) else ""
            raise TrainError(f"--resume: no checkpoint in {out} (expected {checkpoint_path.name}{hint})")
        resume_state = ckpt.read(checkpoint_path)
        ckpt.check_config(resume_state.config, cfg)
    if dist_info.main:
        out.mkdir(parents=True, exist_ok=True)

    seq_len = cfg.resolved_seq_len
    vocab_target = PRESETS[cfg.preset].vocab_size
    # The main rank tokenizes (and caches) first, so replicas do not all train the tokenizer.
    if dist_info.enabled and not dist_info.main:
        torch.distributed.barrier()
    chunks, tok = load_data(cfg.data, vocab_target, seq_len, cfg.val_tokens, cfg.seed, cfg.tokenizer, progress=cfg.progress and dist_info.main)
    if dist_info.enabled and dist_info.main:
        torch.distributed.barrier()
    mcfg = cfg.model_config(tok.get_vocab_size())

    torch.manual_seed(cfg.seed)
    model = Transformer(mcfg).to(device=device, dtype=dtype)
    n_params = model.num_params()
    if cfg.fsdp:
        shard_model(model, device)  # before the optimizer, which then holds the sharded parameters
    sizes = parse_schedule(cfg.batch_schedule) if cfg.batch_schedule is not None else None
    if sizes is not None and dist_info.enabled:
        raise TrainError("--batch-schedule runs on one process: not with torchrun")
    tokens_per_step = (sizes[0] if sizes else cfg.batch_size) * seq_len
    planned = cfg.tokens if cfg.tokens is not None else 20 * mcfg.chinchilla_params()
    available = (len(chunks.train_order) // (1 if sizes else cfg.batch_size)) * (seq_len if sizes else tokens_per_step)
    if planned > available:
        if dist_info.main:
            _say(
                f"the data holds {available:,} training tokens at this batch size: training one epoch of it "
                f"instead of {int(planned):,} tokens" + ("" if cfg.tokens is not None else " (20 per parameter)")
            )
        planned = available
    schedule = BatchSchedule(sizes, planned, seq_len) if sizes else BatchSchedule([cfg.batch_size], planned, seq_len)
    steps = schedule.steps if sizes else int(planned // tokens_per_step)
    if steps < 1 or (sizes and planned < sum(sizes) * seq_len):
        raise TrainError(f"--tokens {planned:g} is less than one step of {tokens_per_step} tokens" if not sizes else
                         f"--tokens {planned:g} is less than one step of each batch size of --batch-schedule")
    warmup_steps = max(1, round(cfg.warmup * steps)) if cfg.warmup > 0 else 0
    eval_every = max(1, int((cfg.eval_every or planned / 10) // tokens_per_step))
    checkpoint_every = int(cfg.checkpoint_every // tokens_per_step) if cfg.checkpoint_every else 0
    stop_step = min(steps, max(1, int(cfg.stop_after // tokens_per_step))) if cfg.stop_after else steps
    tokens_at = schedule.tokens_before  # tokens read by the first n steps
    if sizes:
        # Positions in tokens: the steps differ in size.
        stop_step = min(steps, max(1, schedule.step_at_tokens(cfg.stop_after))) if cfg.stop_after else steps
        eval_tokens = cfg.eval_every or planned / 10
        warmup_sequences = max(1, round(cfg.warmup * schedule.sequences)) if cfg.warmup > 0 else 0

    optimizer = build_optimizer(cfg, model, tokens_per_step)
    base_lrs = [float(g["lr"]) for g in optimizer.param_groups]
    if cfg.cuda_graphs:
        lr_tensors_on(optimizer, device)
    ddp_model: torch.nn.Module = model
    if dist_info.enabled and not cfg.fsdp:
        from torch.nn.parallel import DistributedDataParallel

        ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    compiling = compile_setting(cfg, device)
    if compiling and cfg.fsdp:
        raise TrainError("--compile with --fsdp is not supported yet: drop --compile (FSDP runs eager)")
    forward = _Forward(ddp_model, compiling, dist_info.main)
    graphed = GraphedStep(model, optimizer, device) if cfg.cuda_graphs else None
    if compiling and dist_info.main:
        _say("compiling the model with torch.compile: the first step takes a while (--no-compile runs eager)")

    start_step = 0
    # Steps that compiled the model are timed apart (compile_seconds) and left out of tokens/s.
    totals = {"train_seconds": 0.0, "optimizer_seconds": 0.0, "compile_seconds": 0.0, "untimed_steps": 0.0}
    if resume_state is not None:
        ckpt.restore(resume_state, model, optimizer, device)
        start_step = resume_state.step
        totals.update(resume_state.totals)
    if sharded_resume is not None:
        ckpt.restore_sharded(sharded_resume, model, optimizer, device)
        start_step = sharded_resume.step
        totals.update(sharded_resume.totals)
    resumed = resume_state is not None or sharded_resume is not None
    metrics = _Metrics(out / "metrics.jsonl", dist_info.main, start_step if resumed else None)
    peak_flops = measure_peak_flops(device, dtype)
    reset_peak_memory(device)

    clock = _StepClock(device, totals)

    def save_checkpoint(step: int) -> None:
        clock.flush()
        if cfg.fsdp:
            ckpt.write_sharded(out, model, optimizer, step, cfg, totals, device, dist_info.main)
        elif dist_info.main:
            ckpt.write(checkpoint_path, model, optimizer, step, cfg, totals)

    bar = None
    if cfg.progress and dist_info.main:
        from tqdm import tqdm

        bar = tqdm(
            total=tokens_at(steps), initial=tokens_at(start_step), unit="tok", unit_scale=True,
            desc=f"{cfg.optimizer} B={cfg.batch_size}", file=sys.stderr, dynamic_ncols=True,
        )
    parts = dist_info.world * cfg.grad_accum
    window_loss = torch.zeros((), dtype=torch.float64, device=device)
    window_steps, window_start = 0, time.perf_counter()
    window_tokens_start = tokens_at(start_step)
    last_train_loss = float("nan")
    val_loss = float("nan")
    model.train()
    step = start_step
    interrupted = False
    if start_step == 0:
        metrics.write({"step": 0, "tokens": 0, "val_loss": evaluate(model, chunks, device)})
    try:
        while step < stop_step:
            if sizes:
                # The learning rate follows tokens; half-life coefficients follow the batch size.
                factor = lr_factor(schedule.sequences_before(step), schedule.sequences, warmup_sequences)
                if step == start_step or schedule.phase_start[schedule.phase(step)] == step:
                    set_coefficients(optimizer, cfg, schedule.batch(step)[0] * seq_len)
            else:
                factor = lr_factor(step, steps, warmup_steps)
            for group, base in zip(optimizer.param_groups, base_lrs):
                if isinstance(group["lr"], torch.Tensor):
                    group["lr"].fill_(base * factor)  # in place: a captured step reads this tensor
                else:
                    group["lr"] = base * factor
            compiling_now = not forward.proven
            started = time.perf_counter()
            clock.start()
            if isinstance(optimizer, StepInBackward):
                optimizer.reset_timer()
            if graphed is not None:
                x, y = chunks.train_batch(step, cfg.batch_size, part=0, parts=1)
                compiling_now = graphed.graph is None  # warm-up and capture are timed apart
                loss = graphed(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
                window_loss.add_(loss.detach())
            for micro in range(cfg.grad_accum if graphed is None else 0):
                if sizes:
                    b, first = schedule.batch(step)
                    x, y = chunks.batch(chunks.train_order[first : first + b])
                else:
                    x, y = chunks.train_batch(step, cfg.batch_size, part=dist_info.rank * cfg.grad_accum + micro, parts=parts)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                sync_now = micro == cfg.grad_accum - 1
                context: Any = contextlib.nullcontext()
                if cfg.fsdp and cfg.grad_accum > 1:
                    # Micro-batches before the last accumulate unsharded gradients; the last one
                    # reduce-scatters their sum (as DDP's no_sync, one reduction per step).
                    model.set_requires_gradient_sync(sync_now)  # type: ignore[operator]
                elif dist_info.enabled and not cfg.fsdp and not sync_now:
                    context = ddp_model.no_sync()  # type: ignore[operator]
                with context:
                    loss = forward.loss_and_backward(x, y, cfg.grad_accum)
                # One in-place op per step (float32 added into the float64 sum).
                window_loss.add_(loss.detach(), alpha=1.0 / cfg.grad_accum)
            clock.backward_done()
            if isinstance(optimizer, StepInBackward):
                if cfg.fsdp and step == start_step:
                    _check_stepped_in_backward(model)
                clock.end(host_optimizer_seconds=optimizer.step_seconds)
            elif graphed is not None:
                clock.end(host_optimizer_seconds=0.0)  # inside the graph: not measured apart
            else:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                clock.end()
            if compiling_now:
                clock.drop_last()
                sync_device(device)
                totals["compile_seconds"] += time.perf_counter() - started
                totals["untimed_steps"] += 1
                totals["untimed_tokens"] = totals.get("untimed_tokens", 0.0) + tokens_at(step + 1) - tokens_at(step)
            step += 1
            window_steps += 1
            if bar is not None:
                bar.update(tokens_at(step) - tokens_at(step - 1))
            if step % cfg.log_every == 0 or step == stop_step:
                clock.flush()
                last_train_loss = float(window_loss) / window_steps
                if dist_info.enabled:
                    last_train_loss = _mean_across(last_train_loss, device)
                now = time.perf_counter()
                rate = (tokens_at(step) - window_tokens_start) / max(now - window_start, 1e-9)
                metrics.write({
                    "step": step, "tokens": tokens_at(step), "train_loss": last_train_loss,
                    "lr": base_lrs[0] * factor, "tokens_per_s": rate,
                })
                if bar is not None:
                    bar.set_postfix(loss=f"{last_train_loss:.3f}", refresh=False)
                window_loss.zero_()
                window_steps, window_start, window_tokens_start = 0, now, tokens_at(step)
            if (schedule.crossed(step, eval_tokens) if sizes else step % eval_every == 0) or step == steps:
                val_loss = evaluate(model, chunks, device)
                metrics.write({"step": step, "tokens": tokens_at(step), "val_loss": val_loss})
                if bar is not None:
                    bar.write(f"step {step:>7}  tokens {tokens_at(step):>12,}  val loss {val_loss:.4f}")
            if sizes:
                checkpoint_now = bool(cfg.checkpoint_every) and schedule.crossed(step, cfg.checkpoint_every)
            else:
                checkpoint_now = bool(checkpoint_every) and step % checkpoint_every == 0
            if checkpoint_now and step < stop_step:
                save_checkpoint(step)
    except KeyboardInterrupt:
        interrupted = True
        if cfg.fsdp and dist_info.enabled:
            if dist_info.main:
                _say(f"interrupted at step {step}: the ranks may stand at different steps, so no sharded checkpoint "
                     "is written (the last one stays; --checkpoint-every writes them along the way)")
        elif bar is not None:
            bar.write(f"interrupted at step {step}: writing a checkpoint (continue with --resume)")
    finally:
        if bar is not None:
            bar.close()
    peak_mem = peak_memory_bytes(device)
    clock.flush()
    # A sharded checkpoint takes every rank; after Ctrl-C they may stand at different steps.
    if not (interrupted and cfg.fsdp and dist_info.enabled):
        save_checkpoint(step)
    if math.isnan(val_loss) or step != steps:
        val_loss = evaluate(model, chunks, device) if not interrupted else val_loss
    train_seconds = max(totals["train_seconds"], 1e-9)
    # Global tokens per second: every replica takes part in each step of batch_size sequences.
    tokens_per_s = max(step - int(totals["untimed_steps"]), 0) * tokens_per_step / train_seconds
    if sizes:
        tokens_per_s = max(tokens_at(step) - totals.get("untimed_tokens", 0.0), 0.0) / train_seconds
    summary: Dict[str, Any] = {
        "final_val_loss": val_loss,
        # The best possible loss on the data, where it is known (markov: data), else None.
        "floor": chunks.floor,
        "final_train_loss": last_train_loss,
        "tokens_per_s": tokens_per_s,
        "mfu": tokens_per_s * mcfg.flops_per_token() / (peak_flops * dist_info.world),
        "peak_flops": peak_flops,
        "peak_mem_bytes": peak_mem,
        "optimizer_share": totals["optimizer_seconds"] / train_seconds if not cfg.cuda_graphs else None,
        "cuda_graphs": cfg.cuda_graphs,
        "compiled": forward.is_compiled,
        "compile_seconds": totals["compile_seconds"],
        "steps": step,
        "total_steps": steps,
        "tokens": tokens_at(step),
        "complete": step == steps,
        "params": n_params,
        "model": dataclasses.asdict(mcfg),
        "device": str(device),
        "dtype": cfg.resolved_dtype,
        "world_size": dist_info.world,
        "lr": cfg.resolved_lr,
        # At the last step's batch size (the one the run ended with, under --batch-schedule).
        "betas": list(_coefficients(cfg, schedule.batch(max(0, min(step, steps) - 1))[0] * seq_len if sizes else tokens_per_step)),
        "config": dataclasses.asdict(cfg),
    }
    own = {"rank": dist_info.rank, **memory_accounting(model, optimizer), "peak_mem_bytes": peak_mem}
    per_rank = [own]
    if dist_info.enabled and not interrupted:
        per_rank = [{} for _ in range(dist_info.world)]
        torch.distributed.all_gather_object(per_rank, own)
    summary.update({k: v for k, v in own.items() if k not in ("rank", "peak_mem_bytes")})
    summary["per_rank"] = per_rank
    if dist_info.main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        plot_losses(metrics.records, out / "loss.png", f"{cfg.preset} · {cfg.optimizer} · batch size {cfg.batch_size}")
    if interrupted:
        raise KeyboardInterrupt
    return summary


def _check_stepped_in_backward(model: torch.nn.Module) -> None:
    """Under FSDP a parameter is stepped from its post-accumulate-grad hook, which FSDP calls once
    it has reduce-scattered the gradient into the sharded parameter; a gradient left over means
    that this torch's FSDP does not call those hooks, and nothing was stepped."""
    left = [name for name, p in model.named_parameters() if p.grad is not None]
    if left:
        raise TrainError(
            f"--step-in-backward --fsdp: torch {torch.__version__}'s FSDP did not call the post-accumulate-grad "
            f"hooks of its sharded parameters after reducing their gradients ({left[0]} was not stepped); "
            "drop --step-in-backward or use a torch whose FSDP2 calls them"
        )


def _mean_across(value: float, device: torch.device) -> float:
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def plot_losses(records: List[Dict[str, Any]], path: Path, title: str) -> None:
    """Training loss (per log interval) and validation loss against tokens, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["tokens"], r["train_loss"]) for r in records if "train_loss" in r]
    val = [(r["tokens"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train", color="tab:blue", linewidth=1.2)
    if val:
        ax.plot(*zip(*val), label="validation", color="tab:orange", marker="o", markersize=3)
    ax.set_xlabel("tokens")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
