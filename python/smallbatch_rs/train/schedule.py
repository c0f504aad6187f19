"""Batch-size schedules: ``train --batch-schedule 1,4,16``.

The run's tokens are split into equal shares, one per batch size, taken in order: with 3M tokens
and ``1,4,16`` the first million tokens go in steps of one sequence, the next in steps of four,
the last in steps of sixteen. At each change the optimizer's coefficients given as half-lives in
tokens (``--t1``, ``--t2``) are recomputed for the new tokens per step (Marek et al., 2025: a
fixed half-life, not a fixed beta), and the learning-rate schedule (warmup, cosine) runs over
tokens rather than steps. Data is read in the same order as by any run of the same seed: batch
after batch of the one-epoch order.
"""

from __future__ import annotations

import bisect
from typing import List, Sequence, Tuple


def parse_schedule(text: str) -> List[int]:
    """The batch sizes of ``--batch-schedule`` (comma-separated integers >= 1)."""
    sizes = []
    for part in str(text).split(","):
        part = part.strip()
        try:
            b = int(part)
        except ValueError:
            raise ValueError(f"--batch-schedule takes batch sizes separated by commas (e.g. 1,4,16), got {text!r}") from None
        if b < 1:
            raise ValueError(f"--batch-schedule: batch sizes must be >= 1, got {b} in {text!r}")
        sizes.append(b)
    return sizes


class BatchSchedule:
    """Which batch size each step takes, and where in the data it reads.

    Phase ``i`` takes ``steps[i]`` steps of ``sizes[i]`` sequences of ``seq_len`` tokens:
    ``floor(tokens / len(sizes) / (sizes[i] * seq_len))`` of them (at least one)."""

    def __init__(self, sizes: Sequence[int], tokens: float, seq_len: int):
        if not sizes:
            raise ValueError("--batch-schedule needs at least one batch size")
        self.sizes = list(sizes)
        self.seq_len = seq_len
        share = tokens / len(self.sizes)
        self.phase_steps = [max(1, int(share // (b * seq_len))) for b in self.sizes]
        #: First step of each phase, and the sequences read before it.
        self.phase_start: List[int] = []
        self.phase_sequences: List[int] = []
        step = sequences = 0
        for b, n in zip(self.sizes, self.phase_steps):
            self.phase_start.append(step)
            self.phase_sequences.append(sequences)
            step += n
            sequences += n * b
        self.steps = step
        self.sequences = sequences

    def phase(self, step: int) -> int:
        """The phase step ``step`` (0-based) belongs to."""
        return bisect.bisect_right(self.phase_start, step) - 1

    def batch(self, step: int) -> Tuple[int, int]:
        """``(batch size, first sequence)`` of step ``step`` in the run's data order."""
        i = self.phase(step)
        b = self.sizes[i]
        return b, self.phase_sequences[i] + (step - self.phase_start[i]) * b

    def sequences_before(self, step: int) -> int:
        """Sequences read by steps ``0 .. step - 1`` (``step`` may be :attr:`steps`)."""
        if step >= self.steps:
            return self.sequences
        return self.batch(step)[1]

    def tokens_before(self, step: int) -> int:
        return self.sequences_before(step) * self.seq_len

    def step_at_tokens(self, tokens: float) -> int:
        """The number of steps after which at least ``tokens`` tokens have been read (at most
        :attr:`steps`)."""
        lo, hi = 0, self.steps
        while lo < hi:
            mid = (lo + hi) // 2
            if self.tokens_before(mid) >= tokens:
                hi = mid
            else:
                lo = mid + 1
        return lo

    def crossed(self, step: int, every_tokens: float) -> bool:
        """Whether the tokens read after ``step`` steps reached a new multiple of ``every_tokens``."""
        return self.tokens_before(step) // every_tokens != self.tokens_before(step - 1) // every_tokens
