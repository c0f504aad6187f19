"""Wall-clock timing that counts a device's queued work: shared by the benchmark
(``smallbatch_rs.bench``), the trainer's peak-FLOP probe and the batch-size advisor.

On a GPU kernels run asynchronously: a time taken on the host alone measures how long it took to
queue them. ``timed`` synchronises before and after; ``timed_steps`` times back-to-back calls
between CUDA events, so that host overhead counts only where it exceeds the device's work.
"""

from __future__ import annotations

import time
from typing import Callable

import torch


def sync(device: torch.device) -> None:
    """Waits for the work queued on ``device`` (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds ``fn`` takes, its device work included."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def timed_steps(fn: Callable[[], object], device: torch.device, steps: int = 1) -> float:
    """Seconds per call of ``fn``, timed over ``steps`` back-to-back calls (CUDA events on a GPU)."""
    if device.type != "cuda":
        return timed(fn, device)
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / steps
