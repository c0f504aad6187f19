"""Side-by-side optimizer-step benchmark: smallbatch_rs against what users would pick instead.

    smallbatch-rs bench [--quick] [--device cpu|cuda] [--json PATH] [--markdown [PATH]]
                        [--repeats N] [--scenes a,b,c,d,e]

In one process, interleaved, median of repeated runs: this device's memory bandwidth (a large
copy), then each of our optimizers against torch's implementations of the same rule in four
scenes: (a) 16M float32 parameters in 24 matrices, (b) 1000 tensors of 64x64, (c) scene (a) with
bf16 parameters (ours with stochastic rounding; torch's rounds to nearest, the nearest thing it
has), (d) one batch-size-1 training step of the ``lm30m`` preset on random tokens, the optimizer
step timed apart from the forward and backward passes. Reports ms per step, effective GB/s of the
rule's minimal memory traffic, the fraction of the measured copy bandwidth, the ratio to each
torch variant (> 1: ours is faster) and, in (d), the optimizer's share of the whole step.

Scene (e), run only when asked for (``--scenes e``), is training end to end at batch size 1 on the
``tiny`` preset: tokens/s of ``smallbatch-rs train`` eager and compiled (``--compile``), against
plain loops (zero_grad, forward, backward, step) of the model eager and under ``torch.compile``
with ``torch.optim.AdamW(fused=True)``, and compiled with ours; each as a ratio to the eager
trainer. The trainer's tokens/s leave out the step that compiles (reported apart), the loops time
their steps after two warm-up steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple, TypeVar

import torch

import smallbatch_rs as sb
from smallbatch_rs._timing import timed, timed_steps

# Minimal bytes moved per parameter, keyed by (rule, bytes per parameter): every buffer read once
# plus every buffer written once. benches/update_throughput.rs (module `traffic`) uses the same
# numbers; tests/test_bench_smoke.py checks that the two tables agree.
TRAFFIC: Dict[Tuple[str, int], int] = {
    ("copy", 4): 8,  # read src, write dst
    ("SGD", 4): 12,  # read p, g; write p
    ("SGD+momentum", 4): 20,  # and the momentum buffer, read and written
    ("AdamW", 4): 28,  # read p, g, m, v; write p, m, v
    ("Adafactor", 4): 12,  # factored state (rows + cols per matrix) is negligible
    ("Muon", 4): 20,  # read p, g, momentum; write p, momentum (the products are its work)
    ("SGD", 2): 6,
    ("SGD+momentum", 2): 14,
    ("AdamW", 2): 22,  # bf16 p, g; fp32 m, v
    ("Adafactor", 2): 6,
    ("Muon", 2): 14,  # bf16 p, g; fp32 momentum
    ("round", 2): 6,  # stochastic rounding alone: read fp32, write bf16
}

SCENES = ("a", "b", "c", "d")
#: Scenes run only when named: (e) trains whole runs and takes minutes.
EXTRA_SCENES = ("e",)


class BenchError(Exception):
    """A request this machine cannot serve (reported as one line, status 2)."""


# --- timing ------------------------------------------------------------------------------------


# On a GPU a step shorter than SHORT_STEP_S is timed as GPU_STEPS_PER_SAMPLE back-to-back steps
# between two synchronisations, with CUDA events: its kernels take tens of microseconds, as long
# as a host round trip, and in training the host queues the step behind the backward pass instead
# of waiting for it. Only such steps are profiled for their kernel time (a slow for-loop step
# launches thousands of kernels, and the profiler's bookkeeping of them takes minutes).
GPU_STEPS_PER_SAMPLE = 10
SHORT_STEP_S = 2e-3


def kernel_seconds(fn: Callable[[], object], device: torch.device, steps: int = 3) -> Optional[float]:
    """Seconds of GPU kernel time per call of ``fn`` (the sum of the durations of the kernels it
    launches, from torch's profiler: host overhead and launch gaps excluded), or None when the
    profiler records no kernel."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA], acc_events=True) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize(device)
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    total_us = sum(e.time_range.elapsed_us() for e in kernels)
    return total_us / 1e6 / steps if total_us > 0 else None


def copy_bandwidth(numel: int, repeats: int, device: torch.device = torch.device("cpu")) -> float:
    """GB/s of a torch copy (read + write) of ``numel`` floats on ``device`` (device to device)."""
    src, dst = torch.randn(numel, device=device), torch.empty(numel, device=device)
    dst.copy_(src)  # warm-up: page faults, lazy allocation
    times = [timed_steps(lambda: dst.copy_(src), device, GPU_STEPS_PER_SAMPLE) for _ in range(repeats)]
    return TRAFFIC[("copy", 4)] * numel / statistics.median(times) / 1e9


# --- scenes a, b, c: the optimizer step alone ------------------------------------------------


def _scene_shapes(scene: str, quick: bool) -> List[Tuple[int, ...]]:
    if scene in ("a", "c"):
        side = 128 if quick else 817  # 24 x 817^2 ~ 16M
        return [(side, side)] * 24
    return [(64, 64)] * (50 if quick else 1000)


def _params(shapes, dtype, device) -> List[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    ps = []
    for s in shapes:
        p = torch.nn.Parameter((torch.randn(s, generator=g) * 0.02).to(device=device, dtype=dtype))
        p.grad = (torch.randn(s, generator=g) * 1e-3).to(device=device, dtype=dtype)
        ps.append(p)
    return ps


def _candidates(rule: str, dtype: torch.dtype) -> Dict[str, Callable[[list], torch.optim.Optimizer]]:
    bf16 = dtype == torch.bfloat16
    sr: Dict[str, Any] = dict(stochastic_rounding=True, seed=0) if bf16 else {}
    if rule == "AdamW":
        out = {
            "smallbatch_rs.AdamW": lambda ps: sb.AdamW(ps, lr=1e-3, **sr),
            "torch.AdamW(fused)": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
            "torch.AdamW(foreach)": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
            "torch.AdamW(for-loop)": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=False),
        }
    elif rule == "SGD":
        out = {
            "smallbatch_rs.SGD": lambda ps: sb.SGD(ps, lr=1e-3, **sr),
            "torch.SGD(fused)": lambda ps: torch.optim.SGD(ps, lr=1e-3, fused=True),
            "torch.SGD(foreach)": lambda ps: torch.optim.SGD(ps, lr=1e-3, foreach=True),
            "torch.SGD(for-loop)": lambda ps: torch.optim.SGD(ps, lr=1e-3, foreach=False),
        }
    elif rule == "Adafactor":
        out = {
            ("smallbatch_rs.AdafactorSR" if bf16 else "smallbatch_rs.Adafactor"): lambda ps: sb.Adafactor(
                ps, lr=1e-2, eps=(None, 1e-3), min_dim_size_to_factor=1, step_size_cap=True, **sr
            ),
            "torch.Adafactor(for-loop)": lambda ps: torch.optim.Adafactor(ps, lr=1e-2, foreach=False),
            "torch.Adafactor(foreach)": lambda ps: torch.optim.Adafactor(ps, lr=1e-2, foreach=True),
        }
    else:  # Muon
        out = {
            "smallbatch_rs.Muon": lambda ps: sb.Muon(ps, lr=0.02, **sr),
            "torch.Muon": lambda ps: torch.optim.Muon(ps, lr=0.02),
        }
    return out


def _is_ours(name: str) -> bool:
    return name.startswith("smallbatch_rs.")


T = TypeVar("T")


def _try_torch(name: str, make: Callable[[], T], skipped: List[str]) -> Optional[T]:
    """``make()``, or None (noted in ``skipped``) when a torch variant does not exist for this
    device or dtype. Ours must always work: its errors propagate."""
    if _is_ours(name):
        return make()
    try:
        return make()
    except (RuntimeError, NotImplementedError, ValueError, TypeError) as e:
        skipped.append(f"{name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
        return None


def _step_scene(scene: str, rule: str, quick: bool, repeats: int, device: torch.device, bandwidth: float, skipped):
    dtype = torch.bfloat16 if scene == "c" else torch.float32
    shapes = _scene_shapes(scene, quick)
    numel = sum(int(torch.Size(s).numel()) for s in shapes)
    opts: Dict[str, torch.optim.Optimizer] = {}
    short: Dict[str, bool] = {}  # steps timed in groups and profiled (on a GPU)
    for name, make in _candidates(rule, dtype).items():

        def build(make=make):
            opt = make(_params(shapes, dtype, device))
            timed(opt.step, device)  # warm-up: state allocation, kernel selection or compilation
            return opt, timed(opt.step, device) < SHORT_STEP_S

        built = _try_torch(name, build, skipped)
        if built is not None:
            opts[name], short[name] = built
    times: Dict[str, List[float]] = {name: [] for name in opts}
    for _ in range(repeats):  # interleaved: the machine's noise hits every candidate alike
        for name, opt in opts.items():
            times[name].append(timed_steps(opt.step, device, GPU_STEPS_PER_SAMPLE if short[name] else 1))
    kernel_s: Dict[str, Optional[float]] = {}
    if device.type == "cuda":
        for name, opt in opts.items():
            if not short[name]:
                continue
            try:
                kernel_s[name] = kernel_seconds(opt.step, device)
            except Exception as e:  # the profiler is a diagnostic: its failure must not lose the run
                skipped.append(f"kernel time of {name}: {type(e).__name__}: {e}")
    traffic = TRAFFIC[(rule, dtype.itemsize)] * numel
    ours_name = next(n for n in opts if _is_ours(n))
    ours_ms = statistics.median(times[ours_name]) * 1e3
    records = []
    for name in opts:
        ms = statistics.median(times[name]) * 1e3
        gbps = traffic / (ms / 1e3) / 1e9
        records.append(
            dict(
                scene=scene, impl=name, rule=rule, dtype=str(dtype).replace("torch.", ""), ms=round(ms, 3),
                gbps=round(gbps, 2), fraction_of_copy=round(gbps / bandwidth, 3), params=numel,
                ours_speedup=round(ms / ours_ms, 2) if name != ours_name else None,
                spread_ms=[round(min(times[name]) * 1e3, 3), round(max(times[name]) * 1e3, 3)],
            )
        )
        if kernel_s.get(name):
            k_gbps = traffic / kernel_s[name] / 1e9
            records[-1].update(
                kernel_ms=round(kernel_s[name] * 1e3, 4), kernel_gbps=round(k_gbps, 2),
                kernel_fraction_of_copy=round(k_gbps / bandwidth, 3),
            )
    return records


# --- scene d: one batch-size-1 training step ----------------------------------------------------


def lm_config(quick: bool):
    """The ``lm30m`` preset, or (quick) a small model of the same kind that trains in a blink."""
    from .train.model import PRESETS

    base = PRESETS["lm30m"]
    if quick:
        return dataclasses.replace(base, dim=64, layers=2, seq_len=32, head_dim=32, vocab_size=512)
    return base


# (impl name, trainer optimizer or torch variant, dtype, rule and traffic key)
_SCENE_D = [
    ("smallbatch_rs.AdamW", "adamw", torch.float32, "AdamW"),
    ("torch.AdamW(fused)", "fused", torch.float32, "AdamW"),
    ("torch.AdamW(foreach)", "foreach", torch.float32, "AdamW"),
    ("smallbatch_rs.SGD", "sgd", torch.float32, "SGD"),
    ("smallbatch_rs.Adafactor", "adafactor", torch.float32, "Adafactor"),
    ("smallbatch_rs.Muon", "muon", torch.float32, "Muon"),
    ("smallbatch_rs.AdafactorSR", "adafactor-sr", torch.bfloat16, "Adafactor"),
]


def _training_step_scene(quick: bool, repeats: int, device: torch.device, bandwidth: float, skipped):
    """Each candidate trains its own copy of the same model on the same random tokens: zero_grad,
    forward and backward timed together, then the optimizer step alone. Our optimizers are built
    as ``smallbatch-rs train`` builds them (half-life betas, Muon for the blocks' matrices and
    AdamW for the embeddings)."""
    from .train.config import TrainConfig
    from .train.model import Transformer
    from .train.trainer import build_optimizer

    mcfg = lm_config(quick)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, mcfg.vocab_size, (1, mcfg.seq_len + 1), generator=g).to(device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    def fwd_bwd(model, opt):
        opt.zero_grad(set_to_none=True)
        model(inputs, targets).backward()

    def one_step(model, opt):
        return timed(lambda: fwd_bwd(model, opt), device), timed(opt.step, device)

    runs = {}
    for name, kind, dtype, rule in _SCENE_D:

        def build(kind=kind, dtype=dtype):
            torch.manual_seed(0)
            model = Transformer(mcfg).to(device=device, dtype=dtype)
            if kind in ("fused", "foreach"):
                opt = torch.optim.AdamW(model.parameters(), lr=1e-3, **{kind: True})
            else:
                opt = build_optimizer(TrainConfig(optimizer=kind, dtype=None), model, float(mcfg.seq_len))
            one_step(model, opt)  # warm-up: state allocation, kernel selection or compilation
            return model, opt

        built = _try_torch(name, build, skipped)
        if built is not None:
            runs[name] = (built, dtype, rule)

    times: Dict[str, List[Tuple[float, float]]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, ((model, opt), _, _) in runs.items():
            times[name].append(one_step(model, opt))

    ours_adamw = statistics.median(t for _, t in times["smallbatch_rs.AdamW"]) if "smallbatch_rs.AdamW" in times else None
    records = []
    for name, ((model, _), dtype, rule) in runs.items():
        fb = statistics.median(f for f, _ in times[name])
        opt_s = statistics.median(t for _, t in times[name])
        share = statistics.median(t / (f + t) for f, t in times[name])
        numel = sum(p.numel() for p in model.parameters())
        if rule == "Muon":  # Muon steps the blocks' matrices, AdamW the embeddings
            matrices = sum(p.numel() for p in model.matrix_parameters())
            traffic = TRAFFIC[("Muon", dtype.itemsize)] * matrices + TRAFFIC[("AdamW", dtype.itemsize)] * (numel - matrices)
        else:
            traffic = TRAFFIC[(rule, dtype.itemsize)] * numel
        gbps = traffic / opt_s / 1e9
        records.append(
            dict(
                scene="d", impl=name, rule=rule, dtype=str(dtype).replace("torch.", ""), ms=round(opt_s * 1e3, 3),
                gbps=round(gbps, 2), fraction_of_copy=round(gbps / bandwidth, 3), params=numel,
                ours_speedup=round(opt_s / ours_adamw, 2) if name.startswith("torch.AdamW") and ours_adamw else None,
                fwd_bwd_ms=round(fb * 1e3, 3), step_ms=round((fb + opt_s) * 1e3, 3),
                optimizer_share=round(share, 4),
                share_spread=[round(min(t / (f + t) for f, t in times[name]), 4), round(max(t / (f + t) for f, t in times[name]), 4)],
            )
        )
    return records


def _end_to_end_scene(quick: bool, repeats: int, device: torch.device) -> List[Dict[str, object]]:
    """Scene (e): tokens/s of whole batch-size-1 training on the tiny preset (see the module's
    docstring), repeats interleaved, medians."""
    import tempfile

    from .train import TrainConfig, train
    from .train.model import PRESETS, Transformer

    mcfg = PRESETS["tiny"]
    steps = 60 if quick else 2000
    tokens = steps * mcfg.seq_len
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, mcfg.vocab_size, (1, mcfg.seq_len + 1), generator=g).to(device)
    x, y = batch[:, :-1], batch[:, 1:]

    def trainer(compile: bool) -> Callable[[str], float]:
        def run(out: str) -> float:
            cfg = TrainConfig(preset="tiny", tokens=tokens, val_tokens=2048, eval_every=float(tokens), progress=False,
                              device=device.type, compile=compile, out=out)
            return float(train(cfg)["tokens_per_s"])
        return run

    def loop(compile: bool, ours: bool) -> Callable[[str], float]:
        def run(_: str) -> float:
            torch.manual_seed(0)
            model = Transformer(mcfg).to(device)
            fwd = torch.compile(model) if compile else model
            if ours:
                opt: Any = sb.AdamW(model.parameters(), lr=1e-3)
            else:
                opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)

            def step() -> None:
                opt.zero_grad(set_to_none=True)
                fwd(x, y).backward()
                opt.step()

            for _ in range(2):
                step()
            seconds = timed(lambda: [step() for _ in range(steps)], device)
            return steps * mcfg.seq_len / seconds
        return run

    cases = {
        "train (eager)": trainer(False),
        "train --compile": trainer(True),
        "loop eager + torch.AdamW(fused)": loop(False, False),
        "loop compiled + torch.AdamW(fused)": loop(True, False),
        "loop compiled + smallbatch_rs.AdamW": loop(True, True),
    }
    rates: Dict[str, List[float]] = {name: [] for name in cases}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            for k, (name, run) in enumerate(cases.items()):
                rates[name].append(run(os.path.join(tmp, f"{k}-{r}")))
    base = statistics.median(rates["train (eager)"])
    return [
        dict(scene="e", impl=name, tokens_per_s=round(statistics.median(v)), vs_eager_trainer=round(statistics.median(v) / base, 2),
             spread=[round(min(v)), round(max(v))])
        for name, v in rates.items()
    ]


# --- the run ------------------------------------------------------------------------------------


def run(
    scenes=SCENES,
    quick: bool = False,
    repeats: int = 7,
    rules=("SGD", "AdamW", "Adafactor", "Muon"),
    device: str = "cpu",
    skipped: Optional[List[str]] = None,
):
    """One record per measurement (see the module's docstring); ``skipped`` collects the torch
    variants that do not exist on this device."""
    dev = torch.device(device)
    skipped = [] if skipped is None else skipped
    bandwidth = copy_bandwidth((1 << 20) if quick else (64 << 20), repeats, dev)
    records: List[Dict[str, object]] = [
        dict(scene="copy", impl="torch.copy_", rule="copy", ms=None, gbps=round(bandwidth, 2), fraction_of_copy=1.0)
    ]
    for scene in scenes:
        if scene == "d":
            records += _training_step_scene(quick, repeats, dev, bandwidth, skipped)
            continue
        if scene == "e":
            records += _end_to_end_scene(quick, repeats, dev)
            continue
        for rule in rules:
            if rule == "Muon" and scene != "b" and not quick:
                continue  # GEMM-bound at 16M parameters: measured on (b) only to keep the run short
            records += _step_scene(scene, rule, quick, repeats, dev, bandwidth, skipped)
    return records


def format_table(records) -> str:
    """The printed table; on a GPU two more columns: kernel time per step and its fraction of copy."""
    kernels = any("kernel_ms" in r for r in records)
    head = f"{'scene':<6}{'impl':<30}{'ms/step':>10}{'GB/s':>9}{'of copy':>9}{'ours x':>8}{'share':>8}"
    lines = [head + (f"{'kern ms':>10}{'of copy':>9}" if kernels else "")]
    end_to_end = [r for r in records if r["scene"] == "e"]
    records = [r for r in records if r["scene"] != "e"]
    if not records:
        lines = []
    for r in records:
        ms = "" if r["ms"] is None else f"{r['ms']:.3f}"
        sp = "" if r.get("ours_speedup") is None else f"{r['ours_speedup']:.2f}"
        share = "" if r.get("optimizer_share") is None else f"{100 * r['optimizer_share']:.1f}%"
        line = f"{r['scene']:<6}{r['impl']:<30}{ms:>10}{r['gbps']:>9.1f}{r['fraction_of_copy']:>9.2f}{sp:>8}{share:>8}"
        if kernels and "kernel_ms" in r:
            line += f"{r['kernel_ms']:>10.3f}{r['kernel_fraction_of_copy']:>9.2f}"
        lines.append(line)
    if end_to_end:
        if lines:
            lines.append("")
        lines.append(f"{'scene':<6}{'training at batch size 1, tiny preset':<40}{'tokens/s':>10}{'x eager train':>15}{'spread':>18}")
        for r in end_to_end:
            lo, hi = r["spread"]  # type: ignore[misc]
            lines.append(f"{'e':<6}{r['impl']:<40}{r['tokens_per_s']:>10}{r['vs_eager_trainer']:>15.2f}{f'{lo}-{hi}':>18}")
    return "\n".join(lines)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(device: str) -> str:
    """The machine and versions a run was measured with, for the table's header."""
    if device == "cuda":
        where = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    else:
        where = f"{_cpu_name()}, {platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
    info = sb.backend_info()
    return (
        f"{where}; torch {torch.__version__}; smallbatch_rs {info.get('version')} "
        f"(simd {info.get('simd')}, threads {info.get('threads')})"
    )


def write_markdown(records, path: str, header: str, device: str = "cpu") -> None:
    """Replaces ``device``'s measured table in ``path`` (between its markers) with this run's,
    keeping the surrounding prose and the other device's table; creates the file when missing."""
    tag = "bench" if device == "cpu" else f"bench-{device}"
    begin, end = f"<!-- {tag}:begin -->", f"<!-- {tag}:end -->"
    block = "\n".join(
        [
            begin,
            f"Measured {time.strftime('%Y-%m-%d')} on {header}.",
            "",
            "```",
            format_table(records),
            "```",
            end,
        ]
    )
    text = open(path).read() if os.path.exists(path) else "# Optimizer-step benchmarks\n\n" + begin + "\n" + end + "\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(text)


def _scenes(value: str) -> Tuple[str, ...]:
    scenes = tuple(s.strip() for s in value.split(",") if s.strip())
    known = SCENES + EXTRA_SCENES
    bad = [s for s in scenes if s not in known]
    if bad or not scenes:
        raise argparse.ArgumentTypeError(f"unknown scene(s) {','.join(bad) or value!r} (choose from {','.join(known)})")
    return scenes


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        prog="smallbatch-rs bench", description="Optimizer step: smallbatch_rs vs torch.optim, side by side."
    )
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test, not a measurement)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--scenes", type=_scenes, default=SCENES, help="comma-separated, from a,b,c,d,e (default: a,b,c,d; e trains whole runs)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where parameters live (default cpu)")
    ap.add_argument("--json", metavar="PATH", help="write one record per measurement")
    ap.add_argument(
        "--markdown", nargs="?", const="docs/benchmarks.md", metavar="PATH",
        help="update this device's measured table in docs/benchmarks.md (or PATH)",
    )
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    try:
        if args.device == "cuda" and not torch.cuda.is_available():
            raise BenchError("--device cuda: torch sees no CUDA device on this machine")
        skipped: List[str] = []
        records = run(args.scenes, args.quick, args.repeats, device=args.device, skipped=skipped)
    except BenchError as e:
        print(f"smallbatch-rs bench: error: {e}", file=sys.stderr)
        return 2
    header = describe(args.device)
    print(header)
    print(format_table(records))
    print("ours x: how many times faster smallbatch_rs is than that implementation (median step time)")
    if "d" in args.scenes:
        print("share: the optimizer step's share of a whole training step (median over repeats)")
    for s in skipped:
        print(f"skipped (not available here): {s}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    if args.markdown:
        write_markdown(records, args.markdown, header, args.device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
