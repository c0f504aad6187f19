"""Atomic file writes: readers (a resumed run, a concurrent sweep job, a second rank) never see a
half-written cache entry, checkpoint, table or plot."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary name beside ``path`` (same suffix, so writers that infer the format from it
    still work) that is renamed over ``path`` when the block succeeds, and removed otherwise."""
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
