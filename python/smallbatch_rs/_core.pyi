"""Type stubs of the native extension (checked against it by ``mypy.stubtest``).

The step functions take raw addresses (``Tensor.data_ptr()``) of tensors the torch layer owns: each
parameter's and gradient's own memory, the optimizer's flat state buffers and its host step
counters. One function per rule runs on the CPU (``device=None``) or on a CUDA device
(``device=(ordinal, cuda_stream)``, the raw ``torch.cuda.current_stream().cuda_stream``; state on
that device, step counters on the host). They are private: use :class:`smallbatch_rs.SGD` /
:class:`smallbatch_rs.AdamW` instead.
"""

from typing import Any, Callable, final

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
    "cuda_compile_all",
    "cuda_nvrtc_version",
    "beta_from_halflife",
    "halflife_from_beta",
    "muon_step",
    "orthogonalize",
    "round_to_bf16",
    "scale_beta",
    "sgd_step",
]

@final
class SegmentTable:
    """Layout of a param group's tensors: each a range of one index space, which indexes the
    optimizer's flat state and counts the random bits of stochastic rounding."""

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


@final
class CudaWorkspace:
    """Device memory a CUDA param group keeps between steps: Adafactor's segment table and
    scratch, Muon's Newton-Schulz workspace and cuBLAS handle. Allocated at the group's first
    step (which must run outside any CUDA graph capture), freed when the object is."""

    def __new__(cls, ordinal: int) -> CudaWorkspace: ...
    @property
    def ordinal(self) -> int:
        """The device the workspace's memory is on."""

def sgd_step(
    table: SegmentTable,
    stepped: bytes,
    steps: int,
    params: list[int],
    grads: list[int],
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
    device: tuple[int, int] | None = None,
    draws: list[int] | None = None,
    capturable: bool = False,
    lr_tensor: tuple[int, str] | None = None,
) -> None:
    """One SGD step of a param group. ``stepped`` has one byte per tensor (non-zero: step it);
    ``steps`` is the host address of one float64 counter per tensor; ``params`` and ``grads`` the
    address of each tensor's parameters and gradient (element 0; the same layout in both; 0 or
    anything for tensors not stepped), of ``param_dtype`` ("float32" or "bfloat16"; bf16 results
    are rounded by ``rounding``, "nearest" or "stochastic" with ``seed`` and ``stream``); state
    buffers are float32, one element per element of the table (``momentum_buffer`` may be 0 when
    ``momentum == 0``). ``draws`` gives, per tensor, the index its element 0 draws its
    stochastic-rounding bits at (default: its offset in the table): a shard of a larger tensor
    passes its place in the unsharded group and rounds as the unsharded step would.

    ``capturable=True`` (also for the other steps; torch's name): ``steps`` are the counters
    on the group's device (host memory for a CPU group) and the learning rate is read from
    ``lr_tensor=(address, "float32" | "float64")``, a 0-dim tensor there, or else is ``lr``. On
    CUDA the kernels read both and advance the counters, so the launches do not change from
    step to step (a CUDA graph replays them); the results equal a plain step's."""

def adam_step(
    table: SegmentTable,
    stepped: bytes,
    steps: int,
    params: list[int],
    grads: list[int],
    exp_avg: int,
    exp_avg_sq: int,
    max_exp_avg_sq: int = 0,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    maximize: bool,
    amsgrad: bool = False,
    param_dtype: str = "float32",
    rounding: str = "nearest",
    seed: int = 0,
    stream: int = 0,
    device: tuple[int, int] | None = None,
    draws: list[int] | None = None,
    capturable: bool = False,
    lr_tensor: tuple[int, str] | None = None,
) -> None:
    """One Adam/AdamW step of a param group (see :func:`sgd_step`); ``max_exp_avg_sq`` is used
    with ``amsgrad`` only."""

def adafactor_step(
    table: SegmentTable,
    layout: AdafactorLayout,
    stepped: bytes,
    steps: int,
    params: list[int],
    grads: list[int],
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
    device: tuple[int, int] | None = None,
    draws: list[int] | None = None,
    workspace: CudaWorkspace | None = None,
    shards: tuple[list[int], list[int], list[int]] | None = None,
    sum_across_ranks: Callable[..., object] | None = None,
    exchange: tuple[int, int] | None = None,
    capturable: bool = False,
    lr_tensor: tuple[int, str] | None = None,
) -> None:
    """One Adafactor step of a param group (tensors' matrices row-major; ``exp_avg`` may be 0
    when ``beta1 == 0``; ``beta2=None`` uses the schedule ``1 - t ** beta2_decay``). On CUDA it
    needs the group's ``workspace``: the segment table is uploaded only when the set of stepped
    tensors changes, and a step is launches only.

    With ``shards=(split, numels, rows)`` the tensors are this rank's shards of larger ones: per
    tensor, ``split`` is 0 (whole on every rank), 1 (elements or whole matrices spread over ranks)
    or 2 (the rows of its matrix spread), ``numels`` the whole tensor's elements and ``rows`` its
    matrix's rows. On the CPU, ``sum_across_ranks(buf)`` must replace the float64 values in
    ``buf`` (native byte order) with their sums over the ranks, in place. On CUDA,
    ``exchange=(address, length)`` is a float64 vector on the device (at least the step's sums:
    ``3 + cols`` per tensor always suffices), and ``sum_across_ranks(first, count)`` must sum
    elements ``first .. first + count`` of it over the ranks in place, in order on ``stream``
    (e.g. ``dist.all_reduce`` of that slice). It is called twice per step with the GIL held, and
    an exception it raises propagates unchanged."""

def muon_step(
    table: SegmentTable,
    stepped: bytes,
    steps: int,
    params: list[int],
    grads: list[int],
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
    device: tuple[int, int] | None = None,
    draws: list[int] | None = None,
    workspace: CudaWorkspace | None = None,
    whole: list[tuple[int, int]] | None = None,
    orthogonalize: Callable[..., object] | None = None,
    updates: tuple[int, int] | None = None,
    capturable: bool = False,
    lr_tensor: tuple[int, str] | None = None,
) -> None:
    """One Muon step: each tensor is a batch of row-major matrices as ``table`` describes;
    Newton-Schulz in float32 with a native multi-threaded GEMM on the CPU, or in cuBLAS on CUDA
    (with the group's ``workspace``; inputs float32 or, ``ns_precision="bfloat16"``, bf16).

    With ``whole`` the tensors are this rank's shards of larger matrices: ``whole[i]`` is the
    ``(rows, cols)`` of tensor ``i``'s whole matrices (they scale its learning rate), and the
    float32 momentum outputs ``U`` (every stepped tensor's local elements, back to back in tensor
    order) must be replaced with this rank's elements of the orthogonalised whole matrices, in
    place: on the CPU by ``orthogonalize(buf)``, on ``buf``; on CUDA by ``orthogonalize()``, on
    the device vector ``updates=(address, length)`` (float32, at least the local elements), in
    order on ``stream``. It is called once per step with the GIL held, and an exception it raises
    propagates unchanged."""

def orthogonalize(
    src: int,
    dst: int,
    shapes: list[tuple[int, int]],
    *,
    ns_coefficients: tuple[float, float, float],
    ns_steps: int,
    eps: float,
    ns_precision: str = "float32",
    device: tuple[int, int] | None = None,
    workspace: CudaWorkspace | None = None,
) -> None:
    """Orthogonalizes the float32 row-major matrices of ``shapes`` stored back to back at
    ``src`` into the same places at ``dst`` (Muon's Newton-Schulz iteration): host addresses
    (small matrices side by side on the core's threads), or with ``device=(ordinal, stream)``
    device addresses, on that stream with a Muon group's ``workspace`` (cuBLAS, products in
    float32 or ``ns_precision="bfloat16"``; the same bits as ``muon_step`` for the same
    matrices)."""

def round_to_bf16(
    src: int,
    dst: int,
    n: int,
    *,
    stochastic: bool,
    seed: int = 0,
    step: int = 0,
    stream: int = 0,
    device: tuple[int, int] | None = None,
) -> None:
    """Rounds ``n`` float32 values at address ``src`` to bf16 bits at ``dst``: stochastically
    (Philox bits at (seed, step, element index, stream)) or to nearest even."""

def beta_from_halflife(halflife_tokens: float, tokens_per_step: float) -> float: ...
def halflife_from_beta(beta: float, tokens_per_step: float) -> float: ...
def scale_beta(beta: float, from_tokens_per_step: float, to_tokens_per_step: float) -> float: ...
def backend_info() -> dict[str, Any]: ...
def use_openmp_threads(path: str) -> bool: ...
def cuda_compile_all(arch: str) -> list[str]:
    """Compiles every CUDA kernel for ``arch`` (e.g. "sm_90") with NVRTC; returns their names."""

def cuda_nvrtc_version() -> tuple[int, int]:
    """NVRTC's (major, minor); RuntimeError when it cannot be loaded."""
