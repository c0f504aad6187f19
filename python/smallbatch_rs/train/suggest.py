"""The batch-size advisor: the paper's rule, measured on this machine.

Marek et al. (2025): use the smallest batch size that keeps the hardware busy. Throughput
(tokens/s) rises with the batch size until the device saturates; past that point a larger batch
only takes fewer, bigger steps for the same compute. :func:`suggest_batch_size` measures full
training steps (forward, backward, optimizer) at batch sizes 1, 2, 4, ... on random tokens, with
the model eager and compiled (``torch.compile``; ``--no-compile`` or ``SMALLBATCH_RS_COMPILE=0``
measures eager only), and recommends the smallest batch size whose throughput (the faster of the
two) is within ``tolerance`` of the best, together with the beta2 that batch size gets from the
half-life ``t2``.
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
from .trainer import build_optimizer, compile_error_line, compile_from_environment, measure_peak_flops, resolve_device


@dataclasses.dataclass
class BatchMeasurement:
    batch_size: int
    #: The faster mode's throughput (what ``train`` reaches with the matching ``--compile``).
    tokens_per_s: float
    mfu: float
    beta2: float
    ms_per_step: float
    #: Throughput with the model eager, and compiled (None: not measured or not available).
    eager_tokens_per_s: float = 0.0
    compiled_tokens_per_s: Optional[float] = None


def _time_steps(forward: Any, optimizer: Any, batch: int, seq_len: int, vocab: int, device: torch.device, steps: int) -> float:
    """Seconds per training step (median of ``steps`` after two warm-up steps, which also
    compile a compiled ``forward`` for this batch size)."""
    gen = torch.Generator().manual_seed(batch)
    x = torch.randint(0, vocab, (batch, seq_len), generator=gen).to(device)
    y = torch.randint(0, vocab, (batch, seq_len), generator=gen).to(device)

    def step() -> None:
        forward(x, y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = sorted([timed(step, device) for _ in range(steps + 2)][2:])
    return times[len(times) // 2]


def _measures_compiled(cfg: TrainConfig) -> bool:
    """Whether compiled steps are measured: unless ``--no-compile`` or SMALLBATCH_RS_COMPILE=0."""
    if cfg.compile is not None:
        return cfg.compile
    return compile_from_environment() is not False


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
    batches = [1 << k for k in range(int(math.log2(max_batch_size)) + 1)]
    modes = ["eager", "compiled"] if _measures_compiled(cfg) else ["eager"]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(batches) * len(modes), desc="batch sizes", file=sys.stderr, leave=False)
    seconds: Dict[str, Dict[int, float]] = {mode: {} for mode in modes}
    compile_error = None
    for mode in modes:
        # One model per mode: a compiled model recompiles once for a new batch size, then
        # treats the batch dim as dynamic. Each batch size gets a fresh optimizer.
        torch.manual_seed(cfg.seed)
        model = Transformer(mcfg).to(device=device, dtype=dtype)
        forward: Any = torch.compile(model) if mode == "compiled" else model
        for batch in batches:
            if mode == "compiled" and batch not in seconds["eager"]:
                break  # eager ran out of memory here
            run_cfg = dataclasses.replace(cfg, batch_size=batch, step_in_backward=False)
            optimizer = build_optimizer(run_cfg, model, batch * mcfg.seq_len)
            try:
                seconds[mode][batch] = _time_steps(forward, optimizer, batch, mcfg.seq_len, mcfg.vocab_size, device, steps)
            except torch.cuda.OutOfMemoryError:
                break
            except Exception as e:
                if mode != "compiled":
                    raise
                compile_error = compile_error_line(e)
                break
            finally:
                del optimizer
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            if bar is not None:
                bar.update(1)
        del model, forward
    if bar is not None:
        bar.close()
    if compile_error is not None:
        print(f"smallbatch-rs suggest-batch-size: torch.compile is unavailable here ({compile_error}); "
              "measuring eager steps only", file=sys.stderr)
        seconds.pop("compiled", None)
    rows: List[BatchMeasurement] = []
    for batch, eager_s in seconds["eager"].items():
        tokens = batch * mcfg.seq_len
        compiled_s = seconds.get("compiled", {}).get(batch)
        best_s = min(eager_s, compiled_s) if compiled_s is not None else eager_s
        tokens_per_s = tokens / best_s
        rows.append(BatchMeasurement(
            batch_size=batch, tokens_per_s=tokens_per_s, mfu=tokens_per_s * mcfg.flops_per_token() / peak,
            beta2=halflife.beta_from_halflife(cfg.t2, tokens), ms_per_step=best_s * 1e3,
            eager_tokens_per_s=tokens / eager_s,
            compiled_tokens_per_s=None if compiled_s is None else tokens / compiled_s,
        ))
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
        f"{'batch':>6} {'eager tok/s':>12} {'compiled':>10} {'ms/step':>9} {'tokens/s':>11} {'MFU':>7} {'beta2':>10}",
    ]
    best = max(r["tokens_per_s"] for r in result["rows"])
    for r in result["rows"]:
        mark = "  <- recommended" if r["batch_size"] == result["recommended_batch_size"] else ""
        compiled = "-" if r.get("compiled_tokens_per_s") is None else f"{r['compiled_tokens_per_s']:,.0f}"
        lines.append(
            f"{r['batch_size']:>6} {r['eager_tokens_per_s']:>12,.0f} {compiled:>10} {r['ms_per_step']:>9.2f} "
            f"{r['tokens_per_s']:>11,.0f} {r['mfu']:>7.1%} {r['beta2']:>10.6f}{mark}"
        )
    chosen = next(r for r in result["rows"] if r["batch_size"] == result["recommended_batch_size"])
    compiled_faster = (chosen.get("compiled_tokens_per_s") or 0) > chosen["eager_tokens_per_s"]
    flag = " --compile" if compiled_faster else " --no-compile" if chosen.get("compiled_tokens_per_s") else ""
    lines.append(
        f"recommended: --batch-size {result['recommended_batch_size']}{flag} (the smallest within "
        f"{result['tolerance']:.0%} of the best throughput, {best:,.0f} tokens/s; tokens/s is the faster of "
        "eager and compiled)"
    )
    return "\n".join(lines)
