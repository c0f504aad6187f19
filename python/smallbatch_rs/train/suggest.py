"""The batch-size advisor: the paper's rule, measured on this machine.

Marek et al. (2025): use the smallest batch size that keeps the hardware busy. Throughput
(tokens/s) rises with the batch size until the device saturates; past that point a larger batch
only takes fewer, bigger steps for the same compute. :func:`suggest_batch_size` measures full
training steps (forward, backward, optimizer) at batch sizes 1, 2, 4, ... on random tokens, with
the model eager and compiled (``torch.compile``; ``--no-compile`` or ``SMALLBATCH_RS_COMPILE=0``
measures eager only) and, on CUDA, the whole step captured in a CUDA graph and replayed (what
``train --cuda-graphs`` does), and recommends the smallest batch size whose throughput (the
fastest mode's) is within ``tolerance`` of the best, together with the beta2 that batch size
gets from the half-life ``t2``.
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
from .trainer import (
    GraphedStep,
    build_optimizer,
    compile_error_line,
    compile_from_environment,
    lr_tensors_on,
    measure_peak_flops,
    resolve_device,
)


@dataclasses.dataclass
class BatchMeasurement:
    batch_size: int
    #: The faster mode's throughput (what ``train`` reaches with the matching ``--compile``).
    tokens_per_s: float
    mfu: float
    beta2: float
    ms_per_step: float
    #: Throughput with the model eager, compiled, and the whole step replayed from a CUDA graph
    #: (None: not measured or not available; graphs on CUDA only).
    eager_tokens_per_s: float = 0.0
    compiled_tokens_per_s: Optional[float] = None
    graphed_tokens_per_s: Optional[float] = None


def _time_steps(forward: Any, optimizer: Any, batch: int, seq_len: int, vocab: int, device: torch.device,
                steps: int, graphed: bool = False) -> float:
    """Seconds per training step (median of ``steps`` after the warm-up steps: two, which also
    compile a compiled ``forward`` for this batch size, or with ``graphed`` the eager warm-up and
    the capture of a :class:`GraphedStep`)."""
    gen = torch.Generator().manual_seed(batch)
    x = torch.randint(0, vocab, (batch, seq_len), generator=gen).to(device)
    y = torch.randint(0, vocab, (batch, seq_len), generator=gen).to(device)
    warmup = 2
    if graphed:
        replay = GraphedStep(forward, optimizer, device)
        warmup = GraphedStep.WARMUP_STEPS + 1

        def step() -> None:
            replay(x, y)
    else:
        def step() -> None:
            forward(x, y).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    times = sorted([timed(step, device) for _ in range(steps + warmup)][warmup:])
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
    if device.type == "cuda":
        modes.append("graphed")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(batches) * len(modes), desc="batch sizes", file=sys.stderr, leave=False)
    seconds: Dict[str, Dict[int, float]] = {mode: {} for mode in modes}
    failed: Dict[str, str] = {}  # mode -> what went wrong (compilation, capture)
    for mode in modes:
        # One model per mode: a compiled model recompiles once for a new batch size, then
        # treats the batch dim as dynamic. Each batch size gets a fresh optimizer.
        torch.manual_seed(cfg.seed)
        model = Transformer(mcfg).to(device=device, dtype=dtype)
        forward: Any = torch.compile(model) if mode == "compiled" else model
        for batch in batches:
            if mode != "eager" and batch not in seconds["eager"]:
                break  # eager ran out of memory here
            graphed = mode == "graphed"
            run_cfg = dataclasses.replace(cfg, batch_size=batch, step_in_backward=False, cuda_graphs=graphed)
            optimizer = build_optimizer(run_cfg, model, batch * mcfg.seq_len)
            if graphed:
                lr_tensors_on(optimizer, device)
            try:
                seconds[mode][batch] = _time_steps(
                    forward, optimizer, batch, mcfg.seq_len, mcfg.vocab_size, device, steps, graphed=graphed
                )
            except torch.cuda.OutOfMemoryError:
                break
            except Exception as e:
                if mode == "eager":
                    raise
                failed[mode] = compile_error_line(e)
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
    for mode, error in failed.items():
        what = "torch.compile is unavailable here" if mode == "compiled" else "capturing the step in a CUDA graph failed"
        print(f"smallbatch-rs suggest-batch-size: {what} ({error}); leaving out {mode} steps", file=sys.stderr)
        seconds.pop(mode, None)
    rows: List[BatchMeasurement] = []
    for batch, eager_s in seconds["eager"].items():
        tokens = batch * mcfg.seq_len
        compiled_s = seconds.get("compiled", {}).get(batch)
        graphed_s = seconds.get("graphed", {}).get(batch)
        best_s = min(s for s in (eager_s, compiled_s, graphed_s) if s is not None)
        tokens_per_s = tokens / best_s
        rows.append(BatchMeasurement(
            batch_size=batch, tokens_per_s=tokens_per_s, mfu=tokens_per_s * mcfg.flops_per_token() / peak,
            beta2=halflife.beta_from_halflife(cfg.t2, tokens), ms_per_step=best_s * 1e3,
            eager_tokens_per_s=tokens / eager_s,
            compiled_tokens_per_s=None if compiled_s is None else tokens / compiled_s,
            graphed_tokens_per_s=None if graphed_s is None else tokens / graphed_s,
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


def _mode_flags(row: Dict[str, Any]) -> str:
    """The train flags of a row's fastest mode."""
    measured = {"eager": row["eager_tokens_per_s"], "compiled": row.get("compiled_tokens_per_s"),
                "graphed": row.get("graphed_tokens_per_s")}
    fastest = max((m for m, v in measured.items() if v is not None), key=lambda m: measured[m] or 0.0)
    if fastest == "graphed":
        return " --cuda-graphs"
    if fastest == "compiled":
        return " --compile"
    return " --no-compile" if measured["compiled"] is not None else ""


def format_table(result: Dict[str, Any]) -> str:
    graphs = any(r.get("graphed_tokens_per_s") is not None for r in result["rows"])
    lines = [
        f"{result['preset']} on {result['device']} ({result['dtype']}, {result['optimizer']}, "
        f"T={result['seq_len']}, t2={result['t2']:,.0f} tokens)",
        f"{'batch':>6} {'eager tok/s':>12} {'compiled':>10}" + (f" {'graphed':>10}" if graphs else "")
        + f" {'ms/step':>9} {'tokens/s':>11} {'MFU':>7} {'beta2':>10}",
    ]
    best = max(r["tokens_per_s"] for r in result["rows"])

    def cell(value: Optional[float]) -> str:
        return "-" if value is None else f"{value:,.0f}"

    for r in result["rows"]:
        mark = "  <- recommended" if r["batch_size"] == result["recommended_batch_size"] else ""
        graphed = f" {cell(r.get('graphed_tokens_per_s')):>10}" if graphs else ""
        lines.append(
            f"{r['batch_size']:>6} {r['eager_tokens_per_s']:>12,.0f} {cell(r.get('compiled_tokens_per_s')):>10}{graphed} "
            f"{r['ms_per_step']:>9.2f} {r['tokens_per_s']:>11,.0f} {r['mfu']:>7.1%} {r['beta2']:>10.6f}{mark}"
        )
    chosen = next(r for r in result["rows"] if r["batch_size"] == result["recommended_batch_size"])
    modes = "eager, compiled and graphed" if graphs else "eager and compiled"
    lines.append(
        f"recommended: --batch-size {result['recommended_batch_size']}{_mode_flags(chosen)} (the smallest within "
        f"{result['tolerance']:.0%} of the best throughput, {best:,.0f} tokens/s; tokens/s is the fastest of "
        f"{modes})"
    )
    return "\n".join(lines)
