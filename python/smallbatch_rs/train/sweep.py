"""``smallbatch-rs sweep``: the paper's experiments, at small scale, with this package.

Each experiment is a grid of training runs at a fixed token budget. Runs execute as separate
``smallbatch-rs train`` processes (``--jobs`` at a time, the cores shared between them), each in
its own folder under ``--out``; a run whose ``summary.json`` says it completed is not run again,
so an interrupted sweep resumes where it stopped. Every run becomes one row of ``results.csv``
(also rendered as Markdown tables in ``results.md``), and each experiment gets a plot.

Experiments (Marek et al., 2025):
  beta2       Adam at batch sizes 1..64 with beta2 fixed at 0.95 versus the half-life t2 fixed at
              the value that gives 0.95 at the largest batch size (Fig. 5 / the Xiao replication)
  optimizers  SGD (no momentum), Adam, Adafactor and Muon across batch sizes (Fig. 1a)
  lr          a learning-rate sweep at batch size 1 versus a large batch size (robustness)
  accum       batch size 1 versus 16 micro-batches accumulated to 16, at equal tokens
  memory      bytes per parameter of weights, optimizer state and gradients for full training with
              Adam fp32, AdafactorSR bf16 with step-in-backward, SGD bf16 with stochastic rounding,
              and LoRA (Fig. 8's memory axis), measured in fresh processes
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from .. import halflife
from ._files import atomic_path

EXPERIMENTS = ("beta2", "optimizers", "lr", "accum", "memory")
CSV_FIELDS = [
    "experiment", "run", "optimizer", "batch_size", "grad_accum", "lr", "beta2_rule", "beta2", "t2", "tokens",
    "final_val_loss", "tokens_per_s", "mfu", "optimizer_share", "peak_mem_bytes", "bytes_per_param", "wall_s", "status",
]


@dataclasses.dataclass
class Run:
    """One training run of a sweep: its name, its flags, and what the table should say about it."""

    experiment: str
    name: str
    flags: Dict[str, Any]
    labels: Dict[str, Any]


@dataclasses.dataclass
class SweepSettings:
    preset: str = "tiny"
    seq_len: Optional[int] = None  # None: the preset's
    device: str = "auto"
    tokens: float = 500_000
    batch_sizes: tuple = (1, 4, 16, 64)
    jobs: int = 1
    quick: bool = False

    @classmethod
    def for_mode(cls, quick: bool) -> "SweepSettings":
        if quick:
            return cls(seq_len=32, tokens=32 * 4 * 12, batch_sizes=(1, 4), quick=True)
        return cls()


def plan(experiment: str, s: SweepSettings) -> List[Run]:
    """The runs of one experiment."""
    from .config import DEFAULT_LR

    from .model import PRESETS

    if s.preset not in PRESETS:
        raise ValueError(f"unknown preset {s.preset!r} (choose from {', '.join(PRESETS)})")
    seq_len = s.seq_len or PRESETS[s.preset].seq_len
    base = {"preset": s.preset, "seq-len": seq_len, "tokens": int(s.tokens), "val-tokens": 8192 if not s.quick else 1024,
            "device": s.device}
    runs: List[Run] = []
    largest = max(s.batch_sizes)
    if experiment == "beta2":
        t2 = halflife.halflife_from_beta(0.95, largest * seq_len)
        for b in s.batch_sizes:
            runs.append(Run("beta2", f"adam-b{b}-fixed-beta2", dict(base, optimizer="adam", **{"batch-size": b, "beta2": 0.95}),
                            dict(optimizer="adam", batch_size=b, beta2_rule="fixed beta2", beta2=0.95, t2="")))
            runs.append(Run("beta2", f"adam-b{b}-fixed-t2", dict(base, optimizer="adam", **{"batch-size": b, "t2": t2}),
                            dict(optimizer="adam", batch_size=b, beta2_rule="fixed t2", beta2=halflife.beta_from_halflife(t2, b * seq_len), t2=round(t2))))
    elif experiment == "optimizers":
        t2 = halflife.halflife_from_beta(0.95, largest * seq_len)
        for opt in ("sgd", "adam", "adafactor", "muon"):
            for b in s.batch_sizes:
                runs.append(Run("optimizers", f"{opt}-b{b}", dict(base, optimizer=opt, **{"batch-size": b, "t2": t2}),
                                dict(optimizer=opt, batch_size=b, beta2_rule="fixed t2", t2=round(t2))))
    elif experiment == "lr":
        t2 = halflife.halflife_from_beta(0.95, largest * seq_len)
        factors = (0.25, 1, 4) if s.quick else (0.125, 0.25, 0.5, 1, 2, 4, 8)
        for b in (1, largest):
            for f in factors:
                lr = DEFAULT_LR["adam"] * f
                runs.append(Run("lr", f"adam-b{b}-lr{lr:.2e}", dict(base, optimizer="adam", lr=lr, **{"batch-size": b, "t2": t2}),
                                dict(optimizer="adam", batch_size=b, lr=lr, beta2_rule="fixed t2", t2=round(t2))))
    elif experiment == "accum":
        micro = 4 if s.quick else 16
        runs.append(Run("accum", "adam-b1", dict(base, optimizer="adam", **{"batch-size": 1}),
                        dict(optimizer="adam", batch_size=1, grad_accum=1)))
        runs.append(Run("accum", f"adam-b{micro}-accum{micro}", dict(base, optimizer="adam", **{"batch-size": micro, "grad-accum": micro}),
                        dict(optimizer="adam", batch_size=micro, grad_accum=micro)))
    elif experiment == "memory":
        for mode in MEMORY_MODES:
            runs.append(Run("memory", mode, {"memory-mode": mode, "quick": s.quick}, dict(optimizer=mode)))
    else:
        raise ValueError(f"unknown experiment {experiment!r} (choose from {', '.join(EXPERIMENTS)})")
    return runs


# --- running ----------------------------------------------------------------------------------


def _env(threads: int) -> Dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads)
    env["SMALLBATCH_NUM_THREADS"] = str(threads)
    return env


def _execute(run: Run, folder: Path, threads: int) -> Dict[str, Any]:
    """Runs one training run (or memory measurement) in a fresh process; returns its CSV row."""
    summary_path = folder / "summary.json"
    row: Dict[str, Any] = {"experiment": run.experiment, "run": run.name, **run.labels}
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        differs = _differing_setting(run, summary)
        if differs:
            row.update(status=f"failed: {folder} holds a run with {differs}; use another --out")
            return row
        if summary.get("complete", False):
            return _row(row, summary, status="cached")
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if run.experiment == "memory":
        cmd = [sys.executable, "-m", "smallbatch_rs.train.memory", run.flags["memory-mode"], str(summary_path)]
        if run.flags.get("quick"):
            cmd.append("--quick")
    else:
        cmd = [sys.executable, "-m", "smallbatch_rs", "train", "--no-progress", "--out", str(folder)]
        resume = (folder / "checkpoint.safetensors").is_file()
        if resume:
            cmd.append("--resume")
        for key, value in run.flags.items():
            cmd += [f"--{key}", str(value)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env(threads))
    (folder / "log.txt").write_text(done.stdout + done.stderr)
    if done.returncode != 0 or not summary_path.is_file():
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        row.update(status=f"failed: {last}", wall_s=round(time.perf_counter() - start, 1))
        return row
    return _row(row, json.loads(summary_path.read_text()), status="ok", wall_s=time.perf_counter() - start)


def _differing_setting(run: Run, summary: Dict[str, Any]) -> Optional[str]:
    """The first flag of ``run`` that the finished run in its folder was not trained with."""
    cfg = summary.get("config")
    if run.experiment == "memory" or not isinstance(cfg, dict):
        return None
    for key, value in run.flags.items():
        name = key.replace("-", "_")
        if name not in cfg or name == "device":
            continue
        saved = cfg[name]
        same = math.isclose(float(saved), float(value), rel_tol=1e-9) if isinstance(saved, (int, float)) and not isinstance(saved, bool) else saved == value
        if not same:
            return f"--{key} {saved}, not {value}"
    return None


def _row(row: Dict[str, Any], summary: Dict[str, Any], status: str, wall_s: Optional[float] = None) -> Dict[str, Any]:
    cfg = summary.get("config", {})
    row.setdefault("lr", summary.get("lr", ""))
    row.setdefault("grad_accum", cfg.get("grad_accum", 1))
    if "betas" in summary and not row.get("beta2") and row.get("optimizer") != "sgd":
        row["beta2"] = summary["betas"][1]
    per_param = summary.get("bytes_per_param")
    if per_param is None and summary.get("params"):
        per_param = (summary.get("param_bytes", 0) + summary.get("optimizer_state_bytes", 0) + summary.get("grad_buffer_bytes", 0)) / summary["params"]
    row.update(
        tokens=summary.get("tokens", ""), final_val_loss=summary.get("final_val_loss", ""),
        tokens_per_s=summary.get("tokens_per_s", ""), mfu=summary.get("mfu", ""),
        optimizer_share=summary.get("optimizer_share", ""), peak_mem_bytes=summary.get("peak_mem_bytes", ""),
        bytes_per_param=per_param if per_param is not None else "", status=status,
    )
    if wall_s is not None:
        row["wall_s"] = round(wall_s, 1)
    return row


def run_sweep(experiments: List[str], out: Path, settings: SweepSettings, progress: bool = True) -> List[Dict[str, Any]]:
    """Runs (or reuses) every run of ``experiments``; writes ``results.csv`` and the plots."""
    out.mkdir(parents=True, exist_ok=True)
    runs = [r for e in experiments for r in plan(e, settings)]
    for r in runs:  # refuse before running anything, so results.csv keeps the finished runs' rows
        summary_path = out / r.experiment / r.name / "summary.json"
        if summary_path.is_file():
            differs = _differing_setting(r, json.loads(summary_path.read_text()))
            if differs:
                raise ValueError(f"{summary_path.parent} holds a run with {differs}; use another --out")
    threads = max(1, (os.cpu_count() or 1) // settings.jobs)
    rows: List[Optional[Dict[str, Any]]] = [None] * len(runs)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(runs), desc="sweep", unit="run", file=sys.stderr)
    with concurrent.futures.ThreadPoolExecutor(max_workers=settings.jobs) as pool:
        futures = {pool.submit(_execute, r, out / r.experiment / r.name, threads): i for i, r in enumerate(runs)}
        for fut in concurrent.futures.as_completed(futures):
            i = futures[fut]
            row = rows[i] = fut.result()
            if bar is not None:
                bar.set_postfix_str(f"{runs[i].name}: {row.get('final_val_loss') or row.get('bytes_per_param')}", refresh=False)
                bar.update(1)
    if bar is not None:
        bar.close()
    done = [r for r in rows if r is not None]
    write_csv(out / "results.csv", done)
    with (out / "results.csv").open(newline="") as f:
        all_rows = list(csv.DictReader(f))
    (out / "results.md").write_text(markdown_tables(all_rows))
    for e in experiments:
        plot_experiment(e, [r for r in done if r["experiment"] == e], out / f"{e}.png")
    return done


def write_csv(path: Path, rows: List[Dict[str, Any]]) -> None:
    """Merges ``rows`` into the CSV at ``path`` (a re-run replaces rows of the same run)."""
    existing: Dict[tuple, Dict[str, Any]] = {}
    if path.is_file():
        with path.open(newline="") as f:
            for r in csv.DictReader(f):
                existing[(r["experiment"], r["run"])] = r
    for r in rows:
        existing[(r["experiment"], r["run"])] = {k: r.get(k, "") for k in CSV_FIELDS}
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in existing.values():
            w.writerow({k: r.get(k, "") for k in CSV_FIELDS})


# --- report ---------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 3) -> str:
    x = _num(value)
    if math.isnan(x):
        return str(value) if value not in (None, "") else "-"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}".rstrip("0").rstrip(".") if digits else f"{x:.0f}"


def markdown_tables(rows: List[Dict[str, Any]]) -> str:
    """One Markdown table per experiment, from ``results.csv`` rows."""
    parts: List[str] = []
    for e in EXPERIMENTS:
        rs = [r for r in rows if r["experiment"] == e]
        if not rs:
            continue
        parts.append(f"### {e}\n")
        if e == "memory":
            parts.append("| run | bytes/param (weights + state + grads) | peak RSS (MB) |\n|---|---:|---:|")
            for r in rs:
                parts.append(f"| {r['run']} | {_fmt(r['bytes_per_param'], 2)} | {_num(r['peak_mem_bytes']) / 1e6:,.0f} |")
        else:
            parts.append("| run | batch size | accum | lr | beta2 | final val loss | tokens/s | optimizer share |")
            parts.append("|---|---:|---:|---:|---:|---:|---:|---:|")
            for r in sorted(rs, key=lambda r: (r.get("optimizer", ""), r.get("beta2_rule", ""), _num(r["batch_size"]), _num(r["lr"]))):
                parts.append(
                    f"| {r['run']} | {r['batch_size']} | {r.get('grad_accum') or 1} | {_fmt(r['lr'], 4)} | "
                    f"{_fmt(r['beta2'], 6)} | {_fmt(r['final_val_loss'], 3)} | {_fmt(r['tokens_per_s'], 0)} | "
                    f"{_num(r['optimizer_share']):.1%} |"
                )
        parts.append("")
    return "\n".join(parts)


# --- plots ----------------------------------------------------------------------------------


def _num(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


TITLES = {
    "beta2": "Adam at equal tokens: beta2 fixed at 0.95 vs half-life t2 fixed",
    "optimizers": "Optimizers across batch sizes at equal tokens",
    "lr": "Adam: learning-rate sensitivity, small vs large batch",
    "accum": "Batch size 1 vs gradient accumulation at equal tokens",
    "memory": "Memory of full training per parameter",
}


def plot_experiment(experiment: str, rows: List[Dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if str(r.get("status", "")).startswith(("ok", "cached"))]
    if not ok:
        return
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    if experiment in ("beta2", "optimizers"):
        key = "beta2_rule" if experiment == "beta2" else "optimizer"
        for label in sorted({r[key] for r in ok}):
            pts = sorted((_num(r["batch_size"]), _num(r["final_val_loss"])) for r in ok if r[key] == label)
            ax.plot(*zip(*pts), marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size (sequences)")
        ax.set_ylabel("final validation loss")
    elif experiment == "lr":
        for b in sorted({int(_num(r["batch_size"])) for r in ok}):
            pts = sorted((_num(r["lr"]), _num(r["final_val_loss"])) for r in ok if int(_num(r["batch_size"])) == b)
            ax.plot(*zip(*pts), marker="o", label=f"batch size {b}")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("final validation loss")
    elif experiment == "accum":
        names = [r["run"] for r in ok]
        ax.bar(names, [_num(r["final_val_loss"]) for r in ok], color=["tab:blue", "tab:orange"][: len(ok)])
        ax.set_ylabel("final validation loss")
        for i, r in enumerate(ok):
            ax.annotate(f"{_num(r['tokens_per_s']):,.0f} tok/s", (i, _num(r["final_val_loss"])), ha="center", va="bottom")
    elif experiment == "memory":
        names = [r["run"] for r in ok]
        values = [_num(r["bytes_per_param"]) for r in ok]
        ax.barh(names, values, color="tab:green")
        for i, v in enumerate(values):
            ax.annotate(f"{v:.1f}", (v, i), xytext=(3, 0), textcoords="offset points", va="center")
        ax.set_xlabel("bytes/param: weights + state + gradients")
    ax.set_title(TITLES[experiment], fontsize=10)
    ax.grid(alpha=0.3)
    if experiment in ("beta2", "optimizers", "lr"):
        ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)


from .memory import MEMORY_MODES  # noqa: E402  (after the definitions the memory module does not need)
