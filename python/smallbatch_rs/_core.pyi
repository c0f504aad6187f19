"""Type stubs of the native extension (checked against it by ``mypy.stubtest``).

The step functions take raw addresses (``Tensor.data_ptr()``) of flat buffers that the torch layer
owns; they are private: use :class:`smallbatch_rs.SGD` / :class:`smallbatch_rs.AdamW` instead.
"""

from typing import Any, final

__version__: str
__all__ = [
    "SegmentTable",
    "__version__",
    "adam_step",
    "backend_info",
    "beta_from_halflife",
    "halflife_from_beta",
    "scale_beta",
    "sgd_step",
]

@final
class SegmentTable:
    """Layout of a param group's tensors, packed back to back in one flat buffer."""

    def __new__(cls, numels: list[int]) -> SegmentTable: ...
    @property
    def total(self) -> int: ...
    @property
    def offsets(self) -> list[int]: ...
    @property
    def numels(self) -> list[int]: ...
    def __len__(self) -> int: ...

def sgd_step(
    table: SegmentTable,
    stepped: bytes,
    steps: int,
    param: int,
    grad: int,
    momentum_buffer: int,
    *,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
) -> None:
    """One SGD step. ``stepped`` has one byte per tensor (non-zero: step it); ``steps`` is the
    address of one float64 counter per tensor; the rest are addresses of float32 flat buffers of
    ``table.total`` elements (``momentum_buffer`` may be 0 when ``momentum == 0``)."""

def adam_step(
    table: SegmentTable,
    stepped: bytes,
    steps: int,
    param: int,
    grad: int,
    exp_avg: int,
    exp_avg_sq: int,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    maximize: bool,
) -> None:
    """One Adam/AdamW step over flat float32 buffers given by address (see :func:`sgd_step`)."""

def beta_from_halflife(halflife_tokens: float, tokens_per_step: float) -> float: ...
def halflife_from_beta(beta: float, tokens_per_step: float) -> float: ...
def scale_beta(beta: float, from_tokens_per_step: float, to_tokens_per_step: float) -> float: ...
def backend_info() -> dict[str, Any]: ...
