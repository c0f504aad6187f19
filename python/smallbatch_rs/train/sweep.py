"""``smallbatch-rs sweep``: the paper's experiments, at small scale, with this package, each
configuration at its own best learning rate.

The unit of a sweep is a **cell**: one configuration (optimizer, batch size, beta2 rule, ...)
whose learning rate is tuned. A cell runs a grid of learning rates in factors of 2 around the
optimizer's default and, while the best loss sits at an edge of the grid, extends the grid past
that edge (``max_extend`` times per side at most), so the best value is bracketed; then, where
an experiment asks for it, repeats the best learning rate with further seeds. Experiments share
cells (Adam with t2 fixed serves the beta2, optimizers, lr and accum experiments).

Runs execute as separate ``smallbatch-rs train`` processes (cells ``--jobs`` at a time, the
cores shared between them), each in its own folder under ``OUT/runs``; a run whose
``summary.json`` says it completed is not run again and an interrupted one resumes from its
checkpoint, so an interrupted sweep picks up where it stopped and reaches the same tuning
decisions. ``results.csv`` (one row per run and experiment) and ``results.md`` are rewritten
after every finished cell, so a partial sweep leaves a usable table; each experiment gets a plot
when the sweep ends.

The default data is ``markov:`` (a synthetic language whose best possible loss, its entropy
rate, is known: see :mod:`smallbatch_rs.train.markov`), so losses read as nats above that
floor; ``--data embedded`` runs the same grids on the embedded text corpus. The default budget
gives the largest batch size 1000 steps.

Experiments (Marek et al., 2025):
  beta2       Adam at batch sizes 1..64 with beta2 fixed at 0.95 versus the half-life t2 fixed at
              the value that gives 0.95 at the largest batch size (Fig. 5 / the Xiao replication)
  optimizers  SGD (no momentum), Adam, Adafactor and Muon across batch sizes (Fig. 1a)
  lr          the learning-rate grids of Adam (t2 fixed) at every batch size: sensitivity, and the
              best learning rate by batch size (Fig. 4's heatmap)
  accum       batch size 1 versus 16 micro-batches of 1 accumulated (the largest batch size when 16
              is not in the grid), at equal tokens
  schedule    beyond the paper (its first open question): Adam whose batch size grows during the
              run (1 -> 4 -> 16, equal token shares, beta2 recomputed from t2 at each change)
              against the fixed batch sizes, at equal tokens
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
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from .. import halflife
from ._files import atomic_path

EXPERIMENTS = ("beta2", "optimizers", "lr", "accum", "schedule", "memory")
CSV_FIELDS = [
    "experiment", "run", "cell", "optimizer", "batch_size", "grad_accum", "lr", "seed", "best", "beta2_rule", "beta2",
    "t2", "tokens", "steps", "final_val_loss", "floor", "tokens_per_s", "mfu", "optimizer_share", "peak_mem_bytes",
    "bytes_per_param", "wall_s", "status",
]


@dataclasses.dataclass(frozen=True)
class Cell:
    """A configuration whose learning rate is tuned: its flags (all but ``lr`` and ``seed``),
    what the table says about it, and whether its best learning rate is repeated with seeds."""

    name: str
    optimizer: str
    flags: Tuple[Tuple[str, Any], ...]
    labels: Tuple[Tuple[str, Any], ...]
    seeds: bool = False

    @property
    def batch_size(self) -> int:
        """The batch size (the first one of a batch-size schedule)."""
        flags = dict(self.flags)
        if "batch-schedule" in flags:
            return int(str(flags["batch-schedule"]).split(",")[0])
        return int(flags["batch-size"])


@dataclasses.dataclass
class Run:
    """One training run: its experiment, name, flags and labels (memory runs; a tuned cell's
    runs are made by :func:`run_of`)."""

    experiment: str
    name: str
    flags: Dict[str, Any]
    labels: Dict[str, Any]


@dataclasses.dataclass
class SweepSettings:
    preset: str = "tiny"
    seq_len: Optional[int] = 32
    device: str = "auto"
    #: Tokens per run; None: enough for 1000 steps at the largest batch size.
    tokens: Optional[float] = None
    batch_sizes: tuple = (1, 4, 16, 64)
    jobs: int = 1
    quick: bool = False
    data: str = "markov:"
    #: Seeds of the best learning rate at the smallest and largest batch sizes.
    seeds: int = 3
    #: The first grid: the optimizer's default learning rate times 2**k (extended as needed).
    grid: tuple = (-1, 0, 1)
    #: Points a grid may grow by on each side while its best loss is at that edge.
    max_extend: int = 3

    @classmethod
    def for_mode(cls, quick: bool) -> "SweepSettings":
        if quick:
            return cls(tokens=32 * 4 * 12, batch_sizes=(1, 4), quick=True, data="markov:vocab=128,branch=8,tokens=40k",
                       seeds=2, grid=(-1, 0), max_extend=1)
        return cls()

    def budget(self) -> int:
        seq_len = self.resolved_seq_len
        return int(self.tokens) if self.tokens is not None else 1000 * max(self.batch_sizes) * seq_len

    @property
    def resolved_seq_len(self) -> int:
        from .model import PRESETS

        return self.seq_len or PRESETS[self.preset].seq_len


def cells(experiment: str, s: SweepSettings) -> List[Cell]:
    """The tuned cells of one experiment (none for memory)."""
    from .model import PRESETS

    if s.preset not in PRESETS:
        raise ValueError(f"unknown preset {s.preset!r} (choose from {', '.join(PRESETS)})")
    seq_len = s.resolved_seq_len
    base = (("preset", s.preset), ("seq-len", seq_len), ("tokens", s.budget()),
            ("val-tokens", 8192 if not s.quick else 1024), ("device", s.device), ("data", s.data))
    smallest, largest = min(s.batch_sizes), max(s.batch_sizes)
    t2 = halflife.halflife_from_beta(0.95, largest * seq_len)

    def cell(opt: str, b: int, name: str, extra: Tuple[Tuple[str, Any], ...], labels: Dict[str, Any]) -> Cell:
        flags = base + (("optimizer", opt), ("batch-size", b)) + extra
        return Cell(name, opt, flags, tuple(sorted(dict(optimizer=opt, batch_size=b, **labels).items())),
                    seeds=b in (smallest, largest) and experiment in ("beta2", "optimizers"))

    def fixed_t2(opt: str, b: int) -> Cell:
        beta2 = halflife.beta_from_halflife(t2, b * seq_len) if opt != "sgd" else ""
        return cell(opt, b, f"{opt}-b{b}", (("t2", t2),), dict(beta2_rule="fixed t2", beta2=beta2, t2=round(t2)))

    if experiment == "beta2":
        out = []
        for b in s.batch_sizes:
            out.append(cell("adam", b, f"adam-b{b}-beta2-0.95", (("beta2", 0.95),),
                            dict(beta2_rule="fixed beta2", beta2=0.95, t2="")))
            out.append(fixed_t2("adam", b))
        return out
    if experiment == "optimizers":
        return [fixed_t2(opt, b) for opt in ("sgd", "adam", "adafactor", "muon") for b in s.batch_sizes]
    if experiment == "lr":
        return [fixed_t2("adam", b) for b in s.batch_sizes]
    if experiment == "accum":
        micro = 16 if 16 in s.batch_sizes else largest
        accum = cell("adam", micro, f"adam-b{micro}-accum{micro}", (("t2", t2), ("grad-accum", micro)),
                     dict(beta2_rule="fixed t2", beta2=halflife.beta_from_halflife(t2, micro * seq_len), t2=round(t2),
                          grad_accum=micro))
        return [fixed_t2("adam", smallest), accum]
    if experiment == "schedule":
        fixed = [b for b in s.batch_sizes if b <= 16]
        sizes = ",".join(str(b) for b in fixed)
        growing = Cell(f"adam-schedule-{'-'.join(map(str, fixed))}", "adam",
                       base + (("optimizer", "adam"), ("batch-schedule", sizes), ("t2", t2)),
                       tuple(sorted(dict(optimizer="adam", batch_size=sizes, beta2_rule="fixed t2", beta2="",
                                         t2=round(t2)).items())))
        return [fixed_t2("adam", b) for b in fixed] + [growing]
    if experiment == "memory":
        return []
    raise ValueError(f"unknown experiment {experiment!r} (choose from {', '.join(EXPERIMENTS)})")


def plan(experiment: str, s: SweepSettings) -> List[Run]:
    """The first runs of one experiment: every cell's first grid at seed 0 (tuning may add
    points and seeds), or the memory measurements."""
    if experiment == "memory":
        return [Run("memory", mode, {"memory-mode": mode, "quick": s.quick}, dict(optimizer=mode)) for mode in MEMORY_MODES]
    return [run_of(experiment, c, k, 0, s) for c in cells(experiment, s) for k in s.grid]


def lr_of(cell: Cell, k: int) -> float:
    """Point ``k`` of a cell's grid: the optimizer's default learning rate times 2**k."""
    from .config import DEFAULT_LR

    return DEFAULT_LR[cell.optimizer] * 2.0**k


def run_of(experiment: str, cell: Cell, k: int, seed: int, s: SweepSettings) -> Run:
    lr = lr_of(cell, k)
    flags = dict(cell.flags, lr=lr, seed=seed)
    labels = dict(cell.labels, cell=cell.name, lr=lr, seed=seed)
    return Run(experiment, f"{cell.name}/lr{lr:.4g}-seed{seed}", flags, labels)


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
    floor = summary.get("floor")
    row.update(
        tokens=summary.get("tokens", ""), steps=summary.get("steps", ""), final_val_loss=summary.get("final_val_loss", ""),
        floor="" if floor is None else floor,
        tokens_per_s=summary.get("tokens_per_s", ""), mfu=summary.get("mfu", ""),
        optimizer_share=summary.get("optimizer_share", ""), peak_mem_bytes=summary.get("peak_mem_bytes", ""),
        bytes_per_param=per_param if per_param is not None else "", status=status,
    )
    if wall_s is not None:
        row["wall_s"] = round(wall_s, 1)
    return row


def _loss(row: Dict[str, Any]) -> float:
    """A run's final validation loss for choosing the best learning rate (failed or diverged
    runs rank last)."""
    x = _num(row.get("final_val_loss"))
    ok = str(row.get("status", "")).startswith(("ok", "cached"))
    return x if ok and math.isfinite(x) else math.inf


@dataclasses.dataclass
class CellResult:
    """A tuned cell: its grid's rows (seed 0) by exponent, the best exponent, and the rows of
    the best learning rate's further seeds."""

    cell: Cell
    grid: Dict[int, Dict[str, Any]]
    best: int
    seed_rows: List[Dict[str, Any]]

    def rows(self, experiment: str) -> List[Dict[str, Any]]:
        out = [dict(r, experiment=experiment, best=k == self.best) for k, r in sorted(self.grid.items())]
        out += [dict(r, experiment=experiment, best=True) for r in self.seed_rows]
        return out


def tune(cell: Cell, s: SweepSettings, out: Path, threads: int, on_run: Callable[[Dict[str, Any]], None]) -> CellResult:
    """Runs a cell's grid, extends it past an edge while the best loss is there (at most
    ``s.max_extend`` points per side), then repeats the best learning rate with seeds
    1..``s.seeds - 1`` if the cell asks for seeds."""

    def run(k: int, seed: int = 0) -> Dict[str, Any]:
        r = run_of("", cell, k, seed, s)
        row = _execute(r, out / "runs" / r.name, threads)
        on_run(row)
        return row

    grid = {k: run(k) for k in s.grid}
    grown = {-1: 0, 1: 0}
    while True:
        ks = sorted(grid)
        best = min(ks, key=lambda k: (_loss(grid[k]), k))
        side = -1 if best == ks[0] else 1 if best == ks[-1] else 0
        if side == 0 or grown[side] >= s.max_extend:
            break
        k = ks[0] - 1 if side < 0 else ks[-1] + 1
        grown[side] += 1
        grid[k] = run(k)
    seed_rows = [run(best, seed) for seed in range(1, s.seeds)] if cell.seeds else []
    return CellResult(cell, grid, best, seed_rows)


def run_sweep(experiments: List[str], out: Path, settings: SweepSettings, progress: bool = True) -> List[Dict[str, Any]]:
    """Tunes every cell of ``experiments`` (cells shared by experiments run once) and runs the
    memory measurements; rewrites ``results.csv`` and ``results.md`` after each cell and draws
    the plots at the end. Returns the rows of this invocation."""
    out.mkdir(parents=True, exist_ok=True)
    plans = {e: cells(e, settings) for e in experiments}
    unique: Dict[str, Cell] = {}
    for cs in plans.values():
        for c in cs:
            prev = unique.get(c.name)
            unique[c.name] = c if prev is None else dataclasses.replace(prev, seeds=prev.seeds or c.seeds)
    # Refuse before running anything, so results.csv keeps the finished runs' rows.
    for c in unique.values():
        for summary_path in sorted((out / "runs" / c.name).glob("*/summary.json")):
            differs = _differing_setting(Run("", c.name, dict(c.flags), {}), json.loads(summary_path.read_text()))
            if differs:
                raise ValueError(f"{summary_path.parent} holds a run with {differs}; use another --out")
    memory = plan("memory", settings) if "memory" in experiments else []
    for r in memory:
        summary_path = out / "memory" / r.name / "summary.json"
        if summary_path.is_file() and _differing_setting(r, json.loads(summary_path.read_text())):
            raise ValueError(f"{summary_path.parent} holds another measurement; use another --out")
    threads = max(1, (os.cpu_count() or 1) // settings.jobs)
    estimate = sum(len(settings.grid) + (settings.seeds - 1 if c.seeds else 0) for c in unique.values()) + len(memory)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=estimate, desc="sweep", unit="run", file=sys.stderr)
    lock = threading.Lock()
    tuned: Dict[str, CellResult] = {}
    memory_rows: List[Dict[str, Any]] = []

    def on_run(row: Dict[str, Any]) -> None:
        with lock:
            if bar is not None:
                if bar.n >= bar.total:
                    bar.total += 1
                bar.set_postfix_str(f"{row['run']}: {row.get('final_val_loss') or row.get('bytes_per_param')}", refresh=False)
                bar.update(1)

    def rows_so_far() -> List[Dict[str, Any]]:
        rows = [r for e, cs in plans.items() for c in cs if c.name in tuned for r in tuned[c.name].rows(e)]
        return rows + memory_rows

    def publish() -> None:
        write_csv(out / "results.csv", rows_so_far())
        with (out / "results.csv").open(newline="") as f:
            (out / "results.md").write_text(markdown_tables(list(csv.DictReader(f))))

    def tune_and_publish(c: Cell) -> None:
        result = tune(c, settings, out, threads, on_run)
        with lock:
            tuned[c.name] = result
            publish()

    def measure(r: Run) -> None:
        row = _execute(r, out / "memory" / r.name, threads)
        on_run(row)
        with lock:
            memory_rows.append(row)
            publish()

    with concurrent.futures.ThreadPoolExecutor(max_workers=settings.jobs) as pool:
        futures = [pool.submit(tune_and_publish, c) for c in unique.values()] + [pool.submit(measure, r) for r in memory]
        for fut in concurrent.futures.as_completed(futures):
            fut.result()
    if bar is not None:
        bar.close()
    done = rows_so_far()
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


@dataclasses.dataclass
class CellSummary:
    """A cell as results.csv has it: its grid (lr -> loss at seed 0), best learning rate, the
    best learning rate's losses over seeds, and the data's floor."""

    name: str
    rows: List[Dict[str, Any]]

    @property
    def first(self) -> Dict[str, Any]:
        return self.rows[0]

    @property
    def grid(self) -> Dict[float, float]:
        return {_num(r["lr"]): _loss(r) for r in self.rows if int(_num(r.get("seed") or 0)) == 0}

    @property
    def best_lr(self) -> float:
        best = [_num(r["lr"]) for r in self.rows if str(r.get("best")) == "True" and int(_num(r.get("seed") or 0)) == 0]
        return best[0] if best else min(self.grid, key=lambda lr: self.grid[lr])

    @property
    def at_edge(self) -> bool:
        lrs = sorted(self.grid)
        return len(lrs) > 1 and self.best_lr in (lrs[0], lrs[-1])

    @property
    def seed_losses(self) -> List[float]:
        return [_loss(r) for r in self.rows if str(r.get("best")) == "True"]

    @property
    def floor(self) -> float:
        return _num(self.first.get("floor"))

    def mean_sd(self) -> Tuple[float, float, int]:
        xs = [x for x in self.seed_losses if math.isfinite(x)]
        if not xs:
            return math.nan, math.nan, 0
        return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else math.nan, len(xs)


def cell_summaries(rows: List[Dict[str, Any]], experiment: str) -> List[CellSummary]:
    """The cells of ``experiment`` in ``rows``, in order of (optimizer, beta2 rule, batch size)."""
    by_cell: Dict[str, List[Dict[str, Any]]] = {}
    for r in rows:
        if r["experiment"] == experiment and r.get("cell"):
            by_cell.setdefault(r["cell"], []).append(r)
    summaries = [CellSummary(name, rs) for name, rs in by_cell.items()]
    def batch_key(c: CellSummary) -> float:
        b = _num(c.first["batch_size"])
        return b if math.isfinite(b) else math.inf  # a schedule after the fixed batch sizes

    return sorted(summaries, key=lambda c: (c.first.get("optimizer", ""), c.first.get("beta2_rule", ""),
                                             _num(c.first.get("grad_accum") or 1), batch_key(c)))


def markdown_tables(rows: List[Dict[str, Any]]) -> str:
    """Markdown tables from ``results.csv`` rows: per experiment, each cell at its best learning
    rate (with the seeds' mean and standard deviation where repeated); for lr, the grids."""
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
            parts.append("")
            continue
        summaries = cell_summaries(rows, e)
        if e == "lr":
            lrs = sorted({lr for c in summaries for lr in c.grid})
            parts.append("| lr | " + " | ".join(f"B={c.first['batch_size']}" for c in summaries) + " |")
            parts.append("|---:|" + "---:|" * len(summaries))
            for lr in lrs:
                cells_text = []
                for c in summaries:
                    x = c.grid.get(lr)
                    text = "" if x is None else ("diverged" if not math.isfinite(x) else f"{x:.3f}")
                    cells_text.append(f"**{text}**" if x is not None and lr == c.best_lr else text)
                parts.append(f"| {lr:.4g} | " + " | ".join(cells_text) + " |")
            parts.append("")
            parts.append("Best learning rate by batch size: " + ", ".join(
                f"B={c.first['batch_size']}: {c.best_lr:.4g}{' (at the grid edge)' if c.at_edge else ''}" for c in summaries))
            parts.append("")
            continue
        parts.append("| cell | optimizer | batch | accum | beta2 | best lr | grid | loss | above floor | seeds: mean ± sd (n) |")
        parts.append("|---|---|---:|---:|---:|---:|---|---:|---:|---|")
        for c in summaries:
            f = c.first
            lrs = sorted(c.grid)
            loss = c.grid.get(c.best_lr, math.nan)
            mean, sd, n = c.mean_sd()
            seeds = f"{mean:.3f} ± {sd:.3f} ({n})" if n > 1 else ""
            above = loss - c.floor if math.isfinite(c.floor) else math.nan
            edge = " (edge)" if c.at_edge else ""
            parts.append(
                f"| {c.name} | {f.get('optimizer', '')} | {f['batch_size']} | {f.get('grad_accum') or 1} | "
                f"{_fmt(f.get('beta2'), 6)} | {c.best_lr:.4g}{edge} | {lrs[0]:.3g}..{lrs[-1]:.3g} ({len(lrs)}) | "
                f"{_fmt(loss, 3)} | {_fmt(above, 3)} | {seeds} |"
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
    "beta2": "Adam at equal tokens, tuned: beta2 fixed at 0.95 vs half-life t2 fixed",
    "optimizers": "Optimizers across batch sizes at equal tokens, each at its best lr",
    "lr": "Adam (t2 fixed): final loss by learning rate and batch size",
    "accum": "Batch size 1 vs gradient accumulation at equal tokens",
    "schedule": "Adam: a growing batch size vs fixed ones at equal tokens, each at its best lr",
    "memory": "Memory of full training per parameter",
}


def plot_experiment(experiment: str, rows: List[Dict[str, Any]], path: Path) -> None:
    """The experiment's plot: loss (nats above the floor where known) at each cell's best
    learning rate against batch size, with the seeds' spread; the lr grids as a heatmap; bars
    for accumulation and memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if str(r.get("status", "")).startswith(("ok", "cached"))]
    if not ok:
        return
    summaries = cell_summaries(ok, experiment)
    floor = next((c.floor for c in summaries if math.isfinite(c.floor)), math.nan)
    shift = floor if math.isfinite(floor) else 0.0
    ylabel = "final validation loss above the floor (nats)" if math.isfinite(floor) else "final validation loss"
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    if experiment in ("beta2", "optimizers"):
        key = "beta2_rule" if experiment == "beta2" else "optimizer"
        for label in sorted({c.first.get(key, "") for c in summaries}):
            mine = sorted((c for c in summaries if c.first.get(key, "") == label), key=lambda c: _num(c.first["batch_size"]))
            xs = [_num(c.first["batch_size"]) for c in mine]
            ys = [c.grid.get(c.best_lr, math.nan) - shift for c in mine]
            line = ax.plot(xs, ys, marker="o", label=label)[0]
            for c, x in zip(mine, xs):
                mean, sd, n = c.mean_sd()
                if n > 1 and math.isfinite(sd):
                    ax.errorbar([x], [mean - shift], yerr=[sd], color=line.get_color(), capsize=3)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size (sequences), each at its best learning rate")
        ax.set_ylabel(ylabel)
        ax.legend()
    elif experiment == "lr":
        lrs = sorted({lr for c in summaries for lr in c.grid})
        grid = [[c.grid.get(lr, math.nan) - shift for c in summaries] for lr in lrs]
        finite = [x for row in grid for x in row if math.isfinite(x)]
        image = ax.imshow(grid, aspect="auto", origin="lower", cmap="viridis_r",
                          vmin=min(finite) if finite else None, vmax=(min(finite) + 2.0) if finite else None)
        ax.set_xticks(range(len(summaries)), [c.first["batch_size"] for c in summaries])
        ax.set_yticks(range(len(lrs)), [f"{lr:.3g}" for lr in lrs])
        for j, c in enumerate(summaries):
            ax.plot([j], [lrs.index(c.best_lr)], marker="*", color="white", markersize=12, markeredgecolor="black")
        fig.colorbar(image, ax=ax, label=ylabel)
        ax.set_xlabel("batch size (sequences)")
        ax.set_ylabel("learning rate (star: best)")
    elif experiment in ("accum", "schedule"):
        names = [c.name for c in summaries]
        values = [c.grid.get(c.best_lr, math.nan) - shift for c in summaries]
        colors = ["tab:blue"] * (len(names) - 1) + ["tab:orange"]
        ax.bar(names, values, color=colors)
        ax.tick_params(axis="x", labelsize=8)
        ax.set_ylabel(ylabel)
        for i, c in enumerate(summaries):
            best = next(r for r in c.rows if _num(r["lr"]) == c.best_lr)
            ax.annotate(f"lr {c.best_lr:.3g}, {_num(best['tokens_per_s']):,.0f} tok/s", (i, values[i]), ha="center", va="bottom")
    elif experiment == "memory":
        names = [r["run"] for r in ok]
        values = [_num(r["bytes_per_param"]) for r in ok]
        ax.barh(names, values, color="tab:green")
        for i, v in enumerate(values):
            ax.annotate(f"{v:.1f}", (v, i), xytext=(3, 0), textcoords="offset points", va="center")
        ax.set_xlabel("bytes/param: weights + state + gradients")
    ax.set_title(TITLES[experiment], fontsize=10)
    if experiment != "lr":
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)


from .memory import MEMORY_MODES  # noqa: E402  (after the definitions the memory module does not need)
