"""The trainer's settings: defaults, an optional TOML file, command-line flags, and their checks.

Hyperparameters are in tokens, as in the paper: the batch size is a number of sequences, but the
budget (``tokens``), the warmup and the optimizer's memory (half-lives ``t1``/``t2``) are counted in
tokens, so they keep their meaning when the batch size changes.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, Dict, Optional

from .model import PRESETS, ModelConfig

OPTIMIZERS = ("sgd", "adam", "adamw", "adafactor", "adafactor-sr", "muon", "torch-adamw")

#: Learning rates that train every preset well at batch size 1 (override with --lr).
DEFAULT_LR = {
    "sgd": 0.5,
    "adam": 2e-3,
    "adamw": 2e-3,
    "torch-adamw": 2e-3,
    "adafactor": 1e-2,
    "adafactor-sr": 1e-2,
    "muon": 0.02,
}


@dataclasses.dataclass
class TrainConfig:
    """Everything a run depends on; written to ``summary.json`` and checked on ``--resume``."""

    preset: str = "tiny"
    data: Optional[str] = None
    tokenizer: Optional[str] = None
    optimizer: str = "adamw"
    batch_size: int = 1
    grad_accum: int = 1
    seq_len: Optional[int] = None
    dim: Optional[int] = None
    layers: Optional[int] = None
    head_dim: Optional[int] = None
    tokens: Optional[float] = None
    lr: Optional[float] = None
    warmup: float = 0.05
    t1: Optional[float] = None
    t2: float = 10e6
    beta1: float = 0.9
    beta2: Optional[float] = None
    weight_decay: float = 0.0
    seed: int = 0
    device: str = "auto"
    dtype: Optional[str] = None
    out: str = "runs/latest"
    resume: bool = False
    step_in_backward: bool = False
    fsdp: bool = False
    #: torch.compile the model: None follows ``SMALLBATCH_RS_COMPILE`` (0 / 1) when set, else
    #: compiles on the CPU, where it is measured faster (docs/benchmarks.md), and not on CUDA.
    compile: Optional[bool] = None
    #: Capture zero_grad/forward/backward/step in one CUDA graph after a warm-up and replay it
    #: (CUDA; the optimizer runs with capturable=True and tensor learning rates).
    cuda_graphs: bool = False
    #: Batch sizes taken in turn, each for an equal share of the tokens (e.g. "1,4,16"; see
    #: smallbatch_rs.train.schedule); overrides batch_size.
    batch_schedule: Optional[str] = None
    eval_every: Optional[float] = None
    val_tokens: int = 32768
    checkpoint_every: Optional[float] = None
    stop_after: Optional[float] = None
    log_every: int = 50
    progress: bool = True

    def model_config(self, vocab_size: int) -> ModelConfig:
        base = PRESETS[self.preset]
        changes: Dict[str, Any] = {"vocab_size": vocab_size}
        for key in ("seq_len", "dim", "layers", "head_dim"):
            value = getattr(self, key)
            if value is not None:
                changes[key] = value
        cfg = dataclasses.replace(base, **changes)
        cfg.validate()
        return cfg

    @property
    def resolved_seq_len(self) -> int:
        return self.seq_len if self.seq_len is not None else PRESETS[self.preset].seq_len

    @property
    def resolved_dtype(self) -> str:
        if self.dtype is not None:
            return self.dtype
        return "bf16" if self.optimizer == "adafactor-sr" else "fp32"

    @property
    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]

    def validate(self) -> None:
        """Raises ValueError with one line naming the bad setting."""
        if self.batch_schedule is not None:
            from .schedule import parse_schedule

            parse_schedule(self.batch_schedule)
            for flag, on in (("--batch-size", self.batch_size != 1), ("--grad-accum", self.grad_accum != 1),
                             ("--step-in-backward", self.step_in_backward), ("--fsdp", self.fsdp),
                             ("--cuda-graphs", self.cuda_graphs)):
                if on:
                    raise ValueError(f"--batch-schedule sets the batch size step by step: drop {flag}")
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r} (choose from {', '.join(PRESETS)})")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r} (choose from {', '.join(OPTIMIZERS)})")
        for key in ("batch_size", "grad_accum", "val_tokens", "log_every"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "val_tokens" else 1):
                raise ValueError(f"--{key.replace('_', '-')} must be an integer >= {0 if key == 'val_tokens' else 1}, got {value!r}")
        for key in ("seq_len", "dim", "layers", "head_dim"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"--{key.replace('_', '-')} must be an integer >= 1, got {value!r}")
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"--batch-size {self.batch_size} is not a multiple of --grad-accum {self.grad_accum} "
                "(each micro-batch has batch-size / grad-accum sequences)"
            )
        for key in ("tokens", "eval_every", "checkpoint_every", "stop_after", "t1"):
            value = getattr(self, key)
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"--{key.replace('_', '-')} must be a number of tokens > 0, got {value!r}")
        if not (isinstance(self.t2, (int, float)) and self.t2 > 0):
            raise ValueError(f"--t2 must be a half-life in tokens > 0, got {self.t2!r}")
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and self.lr >= 0):
            raise ValueError(f"--lr must be >= 0, got {self.lr!r}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"--warmup is a fraction of the run in [0, 1), got {self.warmup!r}")
        if not 0 <= self.beta1 < 1:
            raise ValueError(f"--beta1 must be in [0, 1), got {self.beta1!r}")
        if self.beta2 is not None and not 0 <= self.beta2 < 1:
            raise ValueError(f"--beta2 must be in [0, 1), got {self.beta2!r}")
        if self.weight_decay < 0:
            raise ValueError(f"--weight-decay must be >= 0, got {self.weight_decay!r}")
        if self.dtype not in (None, "fp32", "bf16"):
            raise ValueError(f"--dtype must be fp32 or bf16, got {self.dtype!r}")
        if self.optimizer == "adafactor-sr" and self.resolved_dtype != "bf16":
            raise ValueError("--optimizer adafactor-sr stores bf16 weights with stochastic rounding; drop --dtype fp32 or use adafactor")
        if self.compile not in (None, True, False):
            raise ValueError(f"--compile is on or off, got {self.compile!r}")
        if self.compile and self.fsdp:
            raise ValueError("--compile with --fsdp is not supported yet: drop --compile (FSDP runs eager)")
        if self.device != "auto" and not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"--device must be auto, cpu or cuda[:N], got {self.device!r}")
        if self.data is not None and self.data.startswith("markov:"):
            from .markov import MarkovSpec

            MarkovSpec.parse(self.data)
        elif self.data is not None and self.data != "embedded":
            from .data import looks_like_path

            if looks_like_path(self.data) and not Path(self.data).exists():
                raise ValueError(f"data file not found: {self.data}")
        if self.tokenizer is not None and not Path(self.tokenizer).is_file():
            raise ValueError(f"tokenizer file not found: {self.tokenizer}")
        if self.step_in_backward and self.grad_accum > 1:
            raise ValueError("--step-in-backward steps inside each backward, so it cannot accumulate: drop --grad-accum")
        if self.step_in_backward and self.optimizer == "torch-adamw":
            raise ValueError("--step-in-backward needs one of this package's optimizers, not torch-adamw")
        if self.cuda_graphs:
            if self.device == "cpu":
                raise ValueError("--cuda-graphs needs a CUDA device: drop it, or run with --device cuda")
            if self.grad_accum > 1:
                raise ValueError("--cuda-graphs replays one captured step of one batch: drop --grad-accum")
            if self.step_in_backward:
                raise ValueError("--cuda-graphs captures the step after backward: drop --step-in-backward")
            if self.fsdp:
                raise ValueError("--cuda-graphs with --fsdp is not supported: drop one of them")
            if self.compile:
                raise ValueError("--cuda-graphs captures the eager model: drop --compile")
        if not isinstance(self.fsdp, bool):
            raise ValueError(f"--fsdp is a switch (true or false), got {self.fsdp!r}")


def load_toml(path: str) -> Dict[str, Any]:
    """Settings from a TOML file (keys as the flags, with - or _), checked against TrainConfig."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.9/3.10
        import tomli as tomllib
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"config file not found: {path}")
    try:
        raw = tomllib.loads(file.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"config file {path}: {e}") from None
    raw = raw.get("train", raw)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    settings = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in known:
            raise ValueError(f"config file {path}: unknown setting {key!r}")
        settings[name] = value
    return settings
