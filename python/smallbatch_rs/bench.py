"""Side-by-side optimizer-step benchmark: smallbatch_rs against what users would pick instead.

    smallbatch-rs bench [--quick] [--json PATH] [--markdown [PATH]] [--repeats N] [--scenes a,b,c]

In one process, interleaved, median of repeated runs: this machine's memory bandwidth (a large
copy), then each of our optimizers against torch's implementations of the same rule in three
scenes: (a) 16M float32 parameters in 24 matrices, (b) 1000 tensors of 64x64, (c) scene (a) with
bf16 parameters (ours with stochastic rounding; torch's rounds to nearest, the nearest thing it
has). Reports ms per step, effective GB/s of the rule's minimal memory traffic, the fraction of the
measured copy bandwidth, and the ratio to each torch variant (> 1: ours is faster).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

import smallbatch_rs as sb

# Minimal bytes moved per parameter: every buffer read once plus every buffer written once.
TRAFFIC = {
    ("SGD", 4): 12,  # read p, g; write p
    ("SGD+momentum", 4): 20,
    ("AdamW", 4): 28,  # read p, g, m, v; write p, m, v
    ("Adafactor", 4): 12,  # factored state is negligible
    ("Muon", 4): 20,
    ("SGD", 2): 6,
    ("AdamW", 2): 22,
    ("Adafactor", 2): 6,
}


def _scene_shapes(scene: str, quick: bool) -> List[Tuple[int, ...]]:
    if scene in ("a", "c"):
        side = 128 if quick else 817  # 24 x 817^2 ~ 16M
        return [(side, side)] * 24
    return [(64, 64)] * (50 if quick else 1000)


def _params(shapes, dtype) -> List[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    ps = []
    for s in shapes:
        p = torch.nn.Parameter((torch.randn(s, generator=g) * 0.02).to(dtype))
        p.grad = (torch.randn(s, generator=g) * 1e-3).to(dtype)
        ps.append(p)
    return ps


def _time(fn: Callable[[], object], repeats: int) -> List[float]:
    fn()  # warm-up: state allocation, kernel selection
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def copy_bandwidth(numel: int, repeats: int) -> float:
    """GB/s of a torch copy (read + write) of ``numel`` floats."""
    src, dst = torch.randn(numel), torch.empty(numel)
    times = _time(lambda: dst.copy_(src), repeats)
    return 8 * numel / statistics.median(times) / 1e9


def _candidates(rule: str, dtype: torch.dtype) -> Dict[str, Callable[[list], torch.optim.Optimizer]]:
    bf16 = dtype == torch.bfloat16
    sr = dict(stochastic_rounding=True, seed=0) if bf16 else {}
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


def run(scenes=("a", "b", "c"), quick: bool = False, repeats: int = 7, rules=("SGD", "AdamW", "Adafactor", "Muon")):
    bandwidth = copy_bandwidth((1 << 20) if quick else (64 << 20), repeats)
    records: List[Dict[str, object]] = [
        dict(scene="copy", impl="torch.copy_", rule="copy", ms=None, gbps=round(bandwidth, 2), fraction_of_copy=1.0)
    ]
    for scene in scenes:
        dtype = torch.bfloat16 if scene == "c" else torch.float32
        shapes = _scene_shapes(scene, quick)
        numel = sum(int(torch.Size(s).numel()) for s in shapes)
        for rule in rules:
            if rule == "Muon" and scene != "b" and not quick:
                continue  # GEMM-bound at 16M parameters: measured on (b) only to keep the run short
            opts = {}
            for name, make in _candidates(rule, dtype).items():
                ps = _params(shapes, dtype)
                opts[name] = make(ps)
            times: Dict[str, List[float]] = {name: [] for name in opts}
            for opt in opts.values():
                opt.step()  # warm-up
            for _ in range(repeats):  # interleaved: the machine's noise hits every candidate alike
                for name, opt in opts.items():
                    t0 = time.perf_counter()
                    opt.step()
                    times[name].append(time.perf_counter() - t0)
            traffic = TRAFFIC.get((rule, dtype.itemsize), 12) * numel
            ours_name = next(n for n in opts if n.startswith("smallbatch_rs"))
            ours_ms = statistics.median(times[ours_name]) * 1e3
            for name in opts:
                ms = statistics.median(times[name]) * 1e3
                gbps = traffic / (ms / 1e3) / 1e9
                records.append(
                    dict(
                        scene=scene, impl=name, rule=rule, ms=round(ms, 3), gbps=round(gbps, 2),
                        fraction_of_copy=round(gbps / bandwidth, 3), params=numel,
                        ours_speedup=round(ms / ours_ms, 2) if name != ours_name else None,
                    )
                )
    return records


def format_table(records) -> str:
    lines = [f"{'scene':<6}{'impl':<30}{'ms/step':>10}{'GB/s':>9}{'of copy':>9}{'ours x':>8}"]
    for r in records:
        ms = "" if r["ms"] is None else f"{r['ms']:.2f}"
        sp = "" if r.get("ours_speedup") is None else f"{r['ours_speedup']:.2f}"
        lines.append(f"{r['scene']:<6}{r['impl']:<30}{ms:>10}{r['gbps']:>9.1f}{r['fraction_of_copy']:>9.2f}{sp:>8}")
    return "\n".join(lines)


def write_markdown(records, path: str, header: str) -> None:
    """Replaces the measured table in ``path`` (between the markers) with this run's, keeping the
    surrounding prose; creates the file when missing."""
    import os
    import platform

    begin, end = "<!-- bench:begin -->", "<!-- bench:end -->"
    block = "\n".join(
        [
            begin,
            f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()} ({os.cpu_count()} cores), {header}",
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


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="Optimizer step: smallbatch_rs vs torch.optim, side by side.")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test, not a measurement)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--scenes", default="a,b,c")
    ap.add_argument("--json", metavar="PATH", help="write one record per measurement")
    ap.add_argument(
        "--markdown", nargs="?", const="docs/benchmarks.md", metavar="PATH",
        help="update the measured table in docs/benchmarks.md (or PATH)",
    )
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    records = run(tuple(args.scenes.split(",")), args.quick, args.repeats)
    header = f"torch {torch.__version__}, threads {torch.get_num_threads()}; smallbatch_rs {sb.backend_info()}"
    print(header)
    print(format_table(records))
    print("ours x: how many times faster smallbatch_rs is than that implementation (median step time)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    if args.markdown:
        write_markdown(records, args.markdown, header)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
