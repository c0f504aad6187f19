"""The batch-size advisor: the paper's rule, measured on this machine.

Marek et al. (2025): use the smallest batch size that keeps the hardware busy. Throughput
(tokens/s) rises with the batch size until the device saturates; past that point a larger batch
only takes fewer, bigger steps for the same compute. :func:`suggest_batch_size` measures full
training steps (forward, backward, optimizer) at batch sizes 1, 2, 4, ... on random tokens and
recommends the smallest whose throughput is within ``tolerance`` of the best, together with the
beta2 that batch size gets from the half-life ``t2``.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import Any, Dict, List, Optional

import torch

from .._timing import timed

from .. import halflife
from .config import TrainConfig
from .model import PRESETS, Transformer
from .trainer import build_optimizer, measure_peak_flops, resolve_device


@dataclasses.dataclass
class BatchMeasurement:
    batch_size: int
    tokens_per_s: float
    mfu: float
    beta2: float
    ms_per_step: float


def _time_steps(model: Transformer, optimizer: Any, batch: int, seq_len: int, vocab: int, device: torch.device, steps: int) -> float:
    """Seconds per training step (median of ``steps`` after two warm-up steps)."""
    gen = torch.Generator().manual_seed(batch)
    x = torch.randint(0, vocab, (batch, seq_len), generator=gen).to(device)
    y = torch.randint(0, vocab, (batch, seq_len), generator=gen).to(device)

    def step() -> None:
        model(x, y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = sorted([timed(step, device) for _ in range(steps + 2)][2:])
    return times[len(times) // 2]


def suggest_batch_size(
    cfg: TrainConfig,
    max_batch_size: int = 64,
    tolerance: float = 0.9,
    steps: int = 5,
    progress: bool = True,
) -> Dict[str, Any]:
    """Measures throughput at batch sizes 1, 2, 4, ... up to ``max_batch_size`` (or until memory
    runs out) and returns the table and the recommendation (smallest batch size within
    ``tolerance`` of the best tokens/s)."""
    if not 0 < tolerance <= 1:
        raise ValueError(f"--tolerance must be in (0, 1], got {tolerance!r}")
    if max_batch_size < 1:
        raise ValueError(f"--max-batch-size must be >= 1, got {max_batch_size!r}")
    device = resolve_device(cfg.device)
    dtype = torch.bfloat16 if cfg.resolved_dtype == "bf16" else torch.float32
    mcfg = cfg.model_config(PRESETS[cfg.preset].vocab_size)
    peak = measure_peak_flops(device, dtype)
    rows: List[BatchMeasurement] = []
    batch = 1
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=int(math.log2(max_batch_size)) + 1, desc="batch sizes", file=sys.stderr, leave=False)
    while batch <= max_batch_size:
        torch.manual_seed(cfg.seed)
        model = Transformer(mcfg).to(device=device, dtype=dtype)
        run_cfg = dataclasses.replace(cfg, batch_size=batch, step_in_backward=False)
        optimizer = build_optimizer(run_cfg, model, batch * mcfg.seq_len)
        try:
            seconds = _time_steps(model, optimizer, batch, mcfg.seq_len, mcfg.vocab_size, device, steps)
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            del optimizer, model
            if device.type == "cuda":
                torch.cuda.empty_cache()
        tokens_per_s = batch * mcfg.seq_len / seconds
        rows.append(BatchMeasurement(
            batch_size=batch, tokens_per_s=tokens_per_s, mfu=tokens_per_s * mcfg.flops_per_token() / peak,
            beta2=halflife.beta_from_halflife(cfg.t2, batch * mcfg.seq_len), ms_per_step=seconds * 1e3,
        ))
        if bar is not None:
            bar.update(1)
        batch *= 2
    if bar is not None:
        bar.close()
    if not rows:
        raise ValueError(f"preset {cfg.preset} does not fit on {device} even at batch size 1")
    best = max(r.tokens_per_s for r in rows)
    chosen = next(r for r in rows if r.tokens_per_s >= tolerance * best)
    return {
        "preset": cfg.preset,
        "device": str(device),
        "dtype": cfg.resolved_dtype,
        "optimizer": cfg.optimizer,
        "seq_len": mcfg.seq_len,
        "t2": cfg.t2,
        "tolerance": tolerance,
        "peak_flops": peak,
        "rows": [dataclasses.asdict(r) for r in rows],
        "recommended_batch_size": chosen.batch_size,
    }


def format_table(result: Dict[str, Any]) -> str:
    lines = [
        f"{result['preset']} on {result['device']} ({result['dtype']}, {result['optimizer']}, "
        f"T={result['seq_len']}, t2={result['t2']:,.0f} tokens)",
        f"{'batch':>6} {'ms/step':>9} {'tokens/s':>11} {'MFU':>7} {'beta2':>10}",
    ]
    best = max(r["tokens_per_s"] for r in result["rows"])
    for r in result["rows"]:
        mark = "  <- recommended" if r["batch_size"] == result["recommended_batch_size"] else ""
        lines.append(
            f"{r['batch_size']:>6} {r['ms_per_step']:>9.2f} {r['tokens_per_s']:>11,.0f} {r['mfu']:>7.1%} "
            f"{r['beta2']:>10.6f}{mark}"
        )
    lines.append(
        f"recommended: --batch-size {result['recommended_batch_size']} (the smallest within "
        f"{result['tolerance']:.0%} of the best throughput, {best:,.0f} tokens/s)"
    )
    return "\n".join(lines)
