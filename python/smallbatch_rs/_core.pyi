"""Type stubs of the native extension (checked against it by ``mypy.stubtest``).

The step functions take raw addresses (``Tensor.data_ptr()``) of flat buffers that the torch layer
owns; they are private: use :class:`smallbatch_rs.SGD` / :class:`smallbatch_rs.AdamW` instead.
"""

from typing import Any, final

__version__: str
__all__ = [
    "AdafactorLayout",
    "CudaWorkspace",
    "SegmentTable",
    "__version__",
    "adafactor_step",
    "adam_step",
    "backend_info",
    "use_openmp_threads",
    "cuda_adafactor_step",
    "cuda_adam_step",
    "cuda_compile_all",
    "cuda_muon_step",
    "cuda_nvrtc_version",
    "cuda_round_to_bf16",
    "cuda_sgd_step",
    "beta_from_halflife",
    "halflife_from_beta",
    "muon_step",
    "round_to_bf16",
    "scale_beta",
    "sgd_step",
]

@final
class SegmentTable:
    """Layout of a param group's tensors, packed back to back in one flat buffer."""

    def __new__(cls, numels: list[int], matrices: list[list[int]] | None = None) -> SegmentTable: ...
    @property
    def total(self) -> int: ...
    @property
    def offsets(self) -> list[int]: ...
    @property
    def numels(self) -> list[int]: ...
    def __len__(self) -> int: ...

@final
class AdafactorLayout:
    """Where Adafactor keeps each tensor's second moments: factored row and column EMAs, or a
    full-size variance, each packed in tensor order in its own flat buffer."""

    def __new__(cls, table: SegmentTable, factored: list[bool]) -> AdafactorLayout: ...
    @property
    def factored(self) -> list[bool]: ...
    @property
    def row_offsets(self) -> list[int]: ...
    @property
    def col_offsets(self) -> list[int]: ...
    @property
    def variance_offsets(self) -> list[int]: ...
    @property
    def row_total(self) -> int: ...
    @property
    def col_total(self) -> int: ...
    @property
    def variance_total(self) -> int: ...

def adafactor_step(
    table: SegmentTable,
    layout: AdafactorLayout,
    stepped: bytes,
    steps: int,
    param: int,
    grad: int,
    row_var: int,
    col_var: int,
    variance: int,
    exp_avg: int,
    *,
    lr: float,
    beta1: float,
    beta2: float | None,
    beta2_decay: float,
    eps1: float | None,
    eps2: float,
    clip_threshold: float,
    relative_step: bool,
    cap_lr_at_inv_sqrt_step: bool,
    weight_decay: float,
    maximize: bool,
    param_dtype: str = "float32",
    rounding: str = "nearest",
    seed: int = 0,
    stream: int = 0,
) -> None:
    """One Adafactor step over flat float32 buffers given by address (``exp_avg`` may be 0 when
    ``beta1 == 0``; ``beta2=None`` uses the schedule ``1 - t ** beta2_decay``)."""

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
    param_dtype: str = "float32",
    rounding: str = "nearest",
    seed: int = 0,
    stream: int = 0,
) -> None:
    """One SGD step. ``stepped`` has one byte per tensor (non-zero: step it); ``steps`` is the
    address of one float64 counter per tensor; ``param`` and ``grad`` hold ``table.total``
    elements of ``param_dtype`` ("float32" or "bfloat16"; bf16 results are rounded by
    ``rounding``, "nearest" or "stochastic" with ``seed`` and ``stream``); state buffers are
    float32 (``momentum_buffer`` may be 0 when ``momentum == 0``)."""

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
    param_dtype: str = "float32",
    rounding: str = "nearest",
    seed: int = 0,
    stream: int = 0,
) -> None:
    """One Adam/AdamW step over flat float32 buffers given by address (see :func:`sgd_step`)."""

def muon_step(
    table: SegmentTable,
    stepped: bytes,
    steps: int,
    param: int,
    grad: int,
    momentum_buffer: int,
    *,
    lr: float,
    momentum: float,
    nesterov: bool,
    weight_decay: float,
    ns_coefficients: tuple[float, float, float],
    ns_steps: int,
    eps: float,
    adjust_lr_fn: str | None,
    maximize: bool,
    param_dtype: str = "float32",
    rounding: str = "nearest",
    seed: int = 0,
    stream: int = 0,
) -> None:
    """One Muon step: each tensor is a batch of matrices as ``table`` describes; Newton-Schulz in
    float32 with a native multi-threaded GEMM."""

def round_to_bf16(
    src: int, dst: int, n: int, *, stochastic: bool, seed: int = 0, step: int = 0, stream: int = 0
) -> None:
    """Rounds ``n`` float32 values at address ``src`` to bf16 bits at ``dst``: stochastically
    (Philox bits at (seed, step, element index, stream)) or to nearest even."""

def beta_from_halflife(halflife_tokens: float, tokens_per_step: float) -> float: ...
def halflife_from_beta(beta: float, tokens_per_step: float) -> float: ...
def scale_beta(beta: float, from_tokens_per_step: float, to_tokens_per_step: float) -> float: ...
def backend_info() -> dict[str, Any]: ...
def use_openmp_threads(path: str) -> bool: ...

# --- CUDA: device pointers (``Tensor.data_ptr()`` of CUDA tensors), launched on ``cuda_stream``
# (``torch.cuda.current_stream().cuda_stream``); ``steps`` stays a host address.

def cuda_compile_all(arch: str) -> list[str]:
    """Compiles every CUDA kernel for ``arch`` (e.g. "sm_90") with NVRTC; returns their names."""

def cuda_nvrtc_version() -> tuple[int, int]:
    """NVRTC's (major, minor); RuntimeError when it cannot be loaded."""

def cuda_sgd_step(
    table: SegmentTable,
    stepped: bytes,
    steps: int,
    ordinal: int,
    cuda_stream: int,
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
    param_dtype: str = "float32",
    rounding: str = "nearest",
    seed: int = 0,
    stream: int = 0,
) -> None:
    """One SGD step of a CUDA param group: one launch per run of equal step counts."""

def cuda_adam_step(
    table: SegmentTable,
    stepped: bytes,
    steps: int,
    ordinal: int,
    cuda_stream: int,
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
    param_dtype: str = "float32",
    rounding: str = "nearest",
    seed: int = 0,
    stream: int = 0,
) -> None:
    """One Adam/AdamW step of a CUDA param group."""

@final
class CudaWorkspace:
    """Device memory a CUDA param group keeps between steps: Adafactor's segment table and
    scratch, Muon's Newton-Schulz workspace and cuBLAS handle. Allocated at the group's first
    step (which must run outside any CUDA graph capture), freed when the object is."""

    def __new__(cls, ordinal: int) -> CudaWorkspace: ...
    @property
    def ordinal(self) -> int:
        """The device the workspace's memory is on."""

def cuda_adafactor_step(
    workspace: CudaWorkspace,
    table: SegmentTable,
    layout: AdafactorLayout,
    stepped: bytes,
    steps: int,
    ordinal: int,
    cuda_stream: int,
    param: int,
    grad: int,
    row_var: int,
    col_var: int,
    variance: int,
    exp_avg: int,
    *,
    lr: float,
    beta1: float,
    beta2: float | None,
    beta2_decay: float,
    eps1: float | None,
    eps2: float,
    clip_threshold: float,
    relative_step: bool,
    cap_lr_at_inv_sqrt_step: bool,
    weight_decay: float,
    maximize: bool,
    param_dtype: str = "float32",
    rounding: str = "nearest",
    seed: int = 0,
    stream: int = 0,
) -> None:
    """One Adafactor step of a CUDA param group (the math of :func:`adafactor_step`): the
    segment table is uploaded only when the set of stepped tensors changes; a step is launches only."""

def cuda_muon_step(
    workspace: CudaWorkspace,
    table: SegmentTable,
    stepped: bytes,
    steps: int,
    ordinal: int,
    cuda_stream: int,
    param: int,
    grad: int,
    momentum_buffer: int,
    *,
    lr: float,
    momentum: float,
    nesterov: bool,
    weight_decay: float,
    ns_coefficients: tuple[float, float, float],
    ns_steps: int,
    eps: float,
    adjust_lr_fn: str | None,
    maximize: bool,
    ns_precision: str = "float32",
    param_dtype: str = "float32",
    rounding: str = "nearest",
    seed: int = 0,
    stream: int = 0,
) -> None:
    """One Muon step of a CUDA param group (the math of :func:`muon_step`): Newton-Schulz products
    in cuBLAS with float32 accumulation, inputs in float32 or (``ns_precision="bfloat16"``) bf16."""

def cuda_round_to_bf16(
    ordinal: int,
    cuda_stream: int,
    src: int,
    dst: int,
    n: int,
    *,
    stochastic: bool,
    seed: int = 0,
    step: int = 0,
    stream: int = 0,
) -> None:
    """Rounds ``n`` floats at device address ``src`` to bf16 bits at ``dst``."""
