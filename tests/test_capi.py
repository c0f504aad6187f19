"""The C API (rust/capi) against the Python API: the same rule, seed and data give the same bits.

The shared library is loaded with ctypes from ``target/release`` (``make test`` builds it with
``cargo test --workspace --release`` first), or from the path in ``SMALLBATCH_CAPI_LIB``. Without
it these tests are skipped.
"""

from __future__ import annotations

import ctypes
import os
import struct
import sys
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import pytest
import torch

import smallbatch_rs
from smallbatch_rs import halflife

ROOT = Path(__file__).resolve().parent.parent
_NAMES = {"linux": "libsmallbatch_capi.so", "darwin": "libsmallbatch_capi.dylib", "win32": "smallbatch_capi.dll"}


def _library_path() -> Path:
    env = os.environ.get("SMALLBATCH_CAPI_LIB")
    if env:
        return Path(env)
    return ROOT / "target" / "release" / _NAMES.get(sys.platform, _NAMES["linux"])


_PATH = _library_path()
if not _PATH.is_file():
    pytest.skip(
        f"the C API library is not built ({_PATH} is missing): cargo build --release -p smallbatch-capi",
        allow_module_level=True,
    )

c_u8, c_u16, c_u32, c_u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64
c_double, c_float, c_size_t, c_void_p = ctypes.c_double, ctypes.c_float, ctypes.c_size_t, ctypes.c_void_p

# Values of the header's enums.
SGD, ADAM, ADAMW, ADAFACTOR, MUON = range(5)
F32, BF16 = 0, 1
NEAREST, STOCHASTIC = 0, 1
OK = 0
MAX_DIMS = 8


class Config(ctypes.Structure):
    """SmallbatchConfig, field for field as in rust/capi/include/smallbatch.h."""

    _fields_ = [
        ("rule", c_u32),
        ("param_dtype", c_u32),
        ("rounding", c_u32),
        ("stream", c_u32),
        ("seed", c_u64),
        ("lr", c_double),
        ("momentum", c_double),
        ("dampening", c_double),
        ("beta1", c_double),
        ("beta2", c_double),
        ("beta2_decay", c_double),
        ("t1", c_double),
        ("t2", c_double),
        ("tokens_per_step", c_double),
        ("eps", c_double),
        ("eps1", c_double),
        ("eps2", c_double),
        ("clip_threshold", c_double),
        ("weight_decay", c_double),
        ("min_dim_size_to_factor", c_size_t),
        ("ns_coefficients", c_float * 3),
        ("ns_steps", c_u32),
        ("adjust_lr", c_u32),
        ("nesterov", c_u8),
        ("maximize", c_u8),
        ("relative_step", c_u8),
        ("step_size_cap", c_u8),
    ]


class Tensor(ctypes.Structure):
    """SmallbatchTensor."""

    _fields_ = [("ndim", c_u32), ("shape", c_size_t * MAX_DIMS)]


def _load() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(_PATH))
    status = ctypes.c_int
    sigs = {
        "smallbatch_version": (ctypes.c_char_p, []),
        "smallbatch_last_error": (ctypes.c_char_p, []),
        "smallbatch_config_size": (c_size_t, []),
        "smallbatch_config_default": (status, [c_u32, ctypes.POINTER(Config)]),
        "smallbatch_optimizer_new": (
            status,
            [ctypes.POINTER(Config), ctypes.POINTER(Tensor), c_size_t, ctypes.POINTER(c_void_p)],
        ),
        "smallbatch_optimizer_free": (None, [c_void_p]),
        "smallbatch_optimizer_step_f32": (status, [c_void_p, c_void_p, c_void_p, c_size_t]),
        "smallbatch_optimizer_step_bf16": (status, [c_void_p, c_void_p, c_void_p, c_size_t]),
        "smallbatch_optimizer_state_size": (status, [c_void_p, ctypes.POINTER(c_size_t)]),
        "smallbatch_optimizer_export_state": (status, [c_void_p, c_void_p, c_size_t, ctypes.POINTER(c_size_t)]),
        "smallbatch_beta_from_halflife": (status, [c_double, c_double, ctypes.POINTER(c_double)]),
        "smallbatch_halflife_from_beta": (status, [c_double, c_double, ctypes.POINTER(c_double)]),
        "smallbatch_scale_beta": (status, [c_double, c_double, c_double, ctypes.POINTER(c_double)]),
        "smallbatch_stochastic_round": (status, [c_void_p, c_void_p, c_size_t, c_u64, c_u64, c_u32]),
    }
    for name, (restype, argtypes) in sigs.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


LIB = _load()


def _check(status: int) -> None:
    assert status == OK, f"status {status}: {LIB.smallbatch_last_error().decode()}"


def default_config(rule: int, **fields: object) -> Config:
    cfg = Config()
    _check(LIB.smallbatch_config_default(rule, ctypes.byref(cfg)))
    for key, value in fields.items():
        if key == "ns_coefficients":
            cfg.ns_coefficients = (c_float * 3)(*value)
        else:
            setattr(cfg, key, value)
    return cfg


class COptimizer:
    """A C API optimizer over one flat parameter buffer."""

    def __init__(self, cfg: Config, shapes: Sequence[Tuple[int, ...]]) -> None:
        table = (Tensor * len(shapes))()
        for t, shape in zip(table, shapes):
            t.ndim = len(shape)
            t.shape[: len(shape)] = shape
        handle = c_void_p()
        _check(LIB.smallbatch_optimizer_new(ctypes.byref(cfg), table, len(shapes), ctypes.byref(handle)))
        self.handle = handle
        self.bf16 = cfg.param_dtype == BF16

    def step(self, param: torch.Tensor, grad: torch.Tensor) -> None:
        assert param.is_contiguous() and grad.is_contiguous() and param.numel() == grad.numel()
        fn = LIB.smallbatch_optimizer_step_bf16 if self.bf16 else LIB.smallbatch_optimizer_step_f32
        _check(fn(self.handle, param.data_ptr(), grad.data_ptr(), param.numel()))

    def export_state(self) -> bytes:
        size = c_size_t()
        _check(LIB.smallbatch_optimizer_state_size(self.handle, ctypes.byref(size)))
        buf = ctypes.create_string_buffer(size.value)
        written = c_size_t()
        _check(LIB.smallbatch_optimizer_export_state(self.handle, buf, size.value, ctypes.byref(written)))
        return buf.raw[: written.value]

    def __del__(self) -> None:
        LIB.smallbatch_optimizer_free(self.handle)


def parse_state(data: bytes) -> Tuple[List[float], Dict[str, torch.Tensor]]:
    """Step counters and named buffers of exported state (the layout documented in rust/capi/src/state.rs)."""
    assert data[:8] == b"SBSTATE\0"
    version, _rule, n = struct.unpack_from("<IIQ", data, 8)
    assert version == 1
    pos = 24 + 32 * n
    steps = list(struct.unpack_from(f"<{n}d", data, pos))
    pos += 8 * n
    (m,) = struct.unpack_from("<Q", data, pos)
    pos += 8
    buffers = {}
    for _ in range(m):
        name = data[pos : pos + 16].rstrip(b"\0").decode()
        (length,) = struct.unpack_from("<Q", data, pos + 16)
        pos += 24
        buffers[name] = torch.frombuffer(bytearray(data[pos : pos + 4 * length]), dtype=torch.float32)
        pos += 4 * length
    assert pos == len(data) - 8  # the checksum follows
    return steps, buffers


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    view = torch.int16 if a.dtype == torch.bfloat16 else torch.int32
    return a.dtype == b.dtype and torch.equal(a.reshape(-1).view(view), b.reshape(-1).view(view))


def run_both(
    make_python_opt, cfg: Config, shapes: Sequence[Tuple[int, ...]], dtype: torch.dtype, steps: int = 6
) -> Tuple[List[torch.nn.Parameter], torch.optim.Optimizer, torch.Tensor, COptimizer]:
    """Trains the same parameters with the Python optimizer and the C API optimizer on the same
    gradients; returns the Python parameters and optimizer, and the C API's flat buffer and handle."""
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    params = [torch.nn.Parameter(t.clone()) for t in init]
    opt = make_python_opt(params)
    flat = torch.cat([t.reshape(-1) for t in init])
    copt = COptimizer(cfg, shapes)
    for _ in range(steps):
        grads = [torch.randn(s, generator=g).to(dtype) for s in shapes]
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        opt.step()
        copt.step(flat, torch.cat([gr.reshape(-1) for gr in grads]))
    return params, opt, flat, copt


SHAPES = [(4, 6), (6,), (2, 3, 5)]


def flat_of(params: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


def test_library_matches_the_package() -> None:
    assert LIB.smallbatch_version().decode() == smallbatch_rs.backend_info()["version"]
    assert ctypes.sizeof(Config) == LIB.smallbatch_config_size(), "Config above is out of date with the header"


def test_sgd_matches() -> None:
    cfg = default_config(SGD, lr=0.05, momentum=0.9, nesterov=1, weight_decay=1e-3)
    params, _, flat, _ = run_both(
        lambda ps: smallbatch_rs.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
        cfg,
        SHAPES,
        torch.float32,
    )
    assert same_bits(flat, flat_of(params))


def test_sgd_momentum_from_halflife_matches() -> None:
    cfg = default_config(SGD, lr=0.05, t1=2048.0, tokens_per_step=512.0, dampening=0.1)
    params, _, flat, _ = run_both(
        lambda ps: smallbatch_rs.SGD(ps, lr=0.05, t1=2048.0, tokens_per_step=512.0, dampening=0.1),
        cfg,
        SHAPES,
        torch.float32,
    )
    assert same_bits(flat, flat_of(params))


def test_adam_matches() -> None:
    cfg = default_config(ADAM, lr=1e-2, weight_decay=1e-2, beta1=0.8)
    params, _, flat, _ = run_both(
        lambda ps: smallbatch_rs.Adam(ps, lr=1e-2, weight_decay=1e-2, betas=(0.8, 0.999)), cfg, SHAPES, torch.float32
    )
    assert same_bits(flat, flat_of(params))


def test_adamw_halflife_matches_with_state() -> None:
    cfg = default_config(ADAMW, lr=3e-3, t2=10e6, tokens_per_step=512.0)
    params, opt, flat, copt = run_both(
        lambda ps: smallbatch_rs.AdamW(ps, lr=3e-3, t2=10e6, tokens_per_step=512.0), cfg, SHAPES, torch.float32
    )
    assert same_bits(flat, flat_of(params))
    steps, buffers = parse_state(copt.export_state())
    assert steps == [6.0, 6.0, 6.0]
    assert list(buffers) == ["exp_avg", "exp_avg_sq"]
    for name in buffers:
        assert same_bits(buffers[name], flat_of([opt.state[p][name] for p in params])), name


def test_adamw_bf16_stochastic_rounding_matches() -> None:
    cfg = default_config(ADAMW, lr=1e-3, param_dtype=BF16, rounding=STOCHASTIC, seed=7)
    params, _, flat, _ = run_both(
        lambda ps: smallbatch_rs.AdamW(ps, lr=1e-3, stochastic_rounding=True, seed=7), cfg, SHAPES, torch.bfloat16
    )
    assert same_bits(flat, flat_of(params))


def test_adafactor_sr_matches() -> None:
    cfg = default_config(
        ADAFACTOR,
        lr=1e-2,
        t2=1e4,
        tokens_per_step=64.0,
        min_dim_size_to_factor=2,
        param_dtype=BF16,
        rounding=STOCHASTIC,
        seed=11,
    )
    params, opt, flat, copt = run_both(
        lambda ps: smallbatch_rs.AdafactorSR(
            ps, lr=1e-2, t2=1e4, tokens_per_step=64.0, min_dim_size_to_factor=2, seed=11
        ),
        cfg,
        SHAPES,
        torch.bfloat16,
    )
    assert same_bits(flat, flat_of(params))
    _, buffers = parse_state(copt.export_state())
    assert same_bits(buffers["row_var"], flat_of([opt.state[p]["row_var"] for p in params if p.dim() >= 2]))
    assert same_bits(buffers["variance"], flat_of([opt.state[params[1]]["variance"]]))


def test_adafactor_torch_form_with_momentum_matches() -> None:
    cfg = default_config(
        ADAFACTOR, lr=1e-2, eps1=0.0, min_dim_size_to_factor=1, step_size_cap=1, beta1=0.9, weight_decay=0.01
    )
    params, _, flat, _ = run_both(
        lambda ps: smallbatch_rs.Adafactor(
            ps, lr=1e-2, eps=(None, 1e-3), min_dim_size_to_factor=1, step_size_cap=True, beta1=0.9, weight_decay=0.01
        ),
        cfg,
        SHAPES,
        torch.float32,
    )
    assert same_bits(flat, flat_of(params))


def test_muon_matches() -> None:
    shapes = [(8, 6), (2, 3, 4)]
    cfg = default_config(MUON, lr=2e-2, weight_decay=0.05, adjust_lr=1)
    params, _, flat, _ = run_both(
        lambda ps: smallbatch_rs.Muon(ps, lr=2e-2, weight_decay=0.05, adjust_lr_fn="match_rms_adamw"),
        cfg,
        shapes,
        torch.float32,
    )
    assert same_bits(flat, flat_of(params))


def test_halflife_functions_match() -> None:
    out = c_double()
    _check(LIB.smallbatch_beta_from_halflife(10e6, 512.0, ctypes.byref(out)))
    assert out.value == halflife.beta_from_halflife(10e6, 512.0)
    _check(LIB.smallbatch_halflife_from_beta(0.999, 2048.0, ctypes.byref(out)))
    assert out.value == halflife.halflife_from_beta(0.999, 2048.0)
    _check(LIB.smallbatch_scale_beta(0.95, 512.0, 64.0, ctypes.byref(out)))
    assert out.value == halflife.scale_beta(0.95, 512.0, 64.0)
    status = LIB.smallbatch_beta_from_halflife(float("nan"), 512.0, ctypes.byref(out))
    assert status == 2  # SMALLBATCH_STATUS_INVALID_VALUE
    assert "invalid halflife_tokens: NaN" in LIB.smallbatch_last_error().decode()


def test_stochastic_round_matches() -> None:
    x = torch.randn(50_000, generator=torch.Generator().manual_seed(3))
    out = torch.empty(x.shape, dtype=torch.bfloat16)
    _check(LIB.smallbatch_stochastic_round(x.data_ptr(), out.data_ptr(), x.numel(), 5, 9, 2))
    assert same_bits(out, smallbatch_rs.stochastic_round(x, seed=5, step=9, stream=2))
