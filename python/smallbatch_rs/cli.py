"""The ``smallbatch-rs`` command (also ``python -m smallbatch_rs``).

Subcommands:
  train               train the paper's transformer (batch size 1 by default) on the embedded
                      corpus or your data, with this package's optimizers
  suggest-batch-size  measure tokens/s at batch sizes 1, 2, 4, ... and recommend the smallest
                      that keeps this machine busy (the paper's rule)
  sweep               the paper's experiments (beta2 rule, optimizers, learning rates, gradient
                      accumulation, memory) as resumable grids of runs, with a CSV and plots
  halflife            convert between an EMA coefficient (beta), its half-life in tokens, the batch
                      size and the sequence length (the paper's rule: keep the half-life fixed in tokens)
  bench               the optimizer step against torch.optim, side by side (see smallbatch_rs.bench)

Bad arguments exit with status 2 and one line saying what is wrong. train, suggest-batch-size
and sweep need the trainer's extras (``pip install "smallbatch-rs[train]"``); without one of
them they exit with status 2 and one line naming it. halflife and bench need only torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any, Dict, List, NoReturn, Optional

from . import halflife as hl

# What the trainer imports beyond torch: the `train` extra of pyproject.toml (tomli reads --config
# files before Python 3.11). The optimizers, halflife and bench need none of it.
TRAIN_EXTRA = ("numpy", "tokenizers", "safetensors", "tqdm", "matplotlib") + (("tomli",) if sys.version_info < (3, 11) else ())
TRAIN_COMMANDS = ("train", "suggest-batch-size", "sweep")
INSTALL_TRAIN = 'pip install "smallbatch-rs[train]"'


def _missing_train_module() -> Optional[str]:
    """The first module of the trainer's extras that cannot be imported, or None."""
    import importlib.util

    for name in TRAIN_EXTRA:
        try:
            if importlib.util.find_spec(name) is None:
                return name
        except (ImportError, ValueError):
            return name
    return None


def _needs_train_extra(command: str, module: str) -> str:
    return f"smallbatch-rs {command}: error: this command needs the module {module!r}, which is not installed: {INSTALL_TRAIN}"

HALFLIFE_HELP = """\
Half-lives in tokens. An EMA with coefficient beta forgets half of a gradient after
t_half = B*T*ln(1/2)/ln(beta) tokens, with B sequences of T tokens per optimizer step.
Marek et al. (2025) keep t_half fixed (10M tokens for Adam's beta2 at their scale) whatever the
batch size, so beta2 = 0.5 ** (B*T / t_half) moves towards 1 as the batch size falls.

examples:
  smallbatch-rs halflife --t-half 10e6 --seq-len 512 --batch-size 1,4,16,64
  smallbatch-rs halflife --beta 0.95 --seq-len 512 --batch-size 512
  smallbatch-rs halflife --beta 0.95 --seq-len 512 --batch-size 512 --to-batch-size 1
"""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit status 2)."""

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _batch_sizes(text: str) -> List[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"batch sizes must be integers, got {text!r}") from None
    if not sizes or any(b <= 0 for b in sizes):
        raise argparse.ArgumentTypeError(f"batch sizes must be >= 1, got {text!r}")
    return sizes


def _halflife(args: argparse.Namespace) -> int:
    if (args.beta is None) == (args.t_half is None):
        raise ValueError("give exactly one of --beta and --t-half")
    rows = []
    for batch in args.batch_size:
        tokens = batch * args.seq_len
        if args.t_half is not None:
            beta = hl.beta_from_halflife(args.t_half, tokens)
            rows.append((batch, tokens, beta, args.t_half))
        else:
            t_half = hl.halflife_from_beta(args.beta, tokens)
            rows.append((batch, tokens, args.beta, t_half))
    if args.to_batch_size is not None:
        if args.beta is None or len(args.batch_size) != 1:
            raise ValueError("--to-batch-size needs --beta and a single --batch-size")
        t_half = rows[0][3]
        for batch in args.to_batch_size:
            tokens = batch * args.seq_len
            rows.append((batch, tokens, hl.scale_beta(args.beta, args.batch_size[0] * args.seq_len, tokens), t_half))
    print(f"{'batch':>7} {'tokens/step':>12} {'beta':>10} {'half-life (tokens)':>20}")
    for batch, tokens, beta, t_half in rows:
        print(f"{batch:>7} {tokens:>12} {beta:>10.6f} {t_half:>20,.0f}")
    return 0


TRAIN_HELP = """\
Train the paper's decoder-only transformer (pre-norm, RMSNorm without scale, QK-norm, RoPE, GELU
MLP, untied embeddings) with batch size 1 and no gradient accumulation by default.

Hyperparameters are counted in tokens, as in Marek et al. (2025):
  --tokens      the budget (default: 20 tokens per parameter, at most one epoch of the data)
  --warmup      the first fraction of the run warms the learning rate up from 0 (then cosine to 0)
  --t1, --t2    half-lives of the optimizer's moving averages, in tokens. Each step consumes
                B*T tokens (batch size x sequence length), so the coefficient is
                beta = 0.5 ** (B*T / t_half): with t2 fixed (10M tokens by default) beta2 moves
                towards 1 as the batch size falls, which is what makes small batches train well.
                Without --t1, Adam's beta1 is --beta1 (0.9); SGD and Adafactor keep no momentum.
Token counts accept suffixes: 500k, 10M, 2B.

Settings can also come from a TOML file (--config), with the flags' names as keys; flags win.
Outputs in --out: metrics.jsonl, loss.png, summary.json and checkpoint.safetensors (with --fsdp,
the folder checkpoint/). summary.json counts the bytes each process keeps for weights, optimizer
state and gradients (param_bytes, optimizer_state_bytes, grad_buffer_bytes: this rank's; per_rank:
every rank's, with its peak_mem_bytes).

Several processes: torchrun --nproc_per_node N -m smallbatch_rs train ... splits each batch of
--batch-size sequences over the N processes and averages their gradients, so N processes train as
one would on the same batches:
  (default)     DistributedDataParallel: every process holds the whole model, its gradients and
                the optimizer state
  --fsdp        FSDP2 (fully_shard per transformer block, then the root): every process holds
                1/N of the weights, gradients and optimizer state, and steps its shards; the
                checkpoint is sharded (torch.distributed.checkpoint, one file per process, in
                checkpoint/); --resume --fsdp continues it bit for bit on as many processes,
                and on another number redistributes the shards. --step-in-backward works with
                it. Without torchrun, --fsdp runs FSDP over a process group of one.

examples:
  smallbatch-rs train --preset tiny --out runs/tiny
  smallbatch-rs train --preset tiny --optimizer adafactor-sr --step-in-backward --out runs/sr
  smallbatch-rs train --preset lm30m --data corpus.jsonl --batch-size 4 --t2 10M --device cuda
  torchrun --nproc_per_node 2 -m smallbatch_rs train --preset lm30m --batch-size 2 --fsdp --out runs/fsdp
"""

SUGGEST_HELP = """\
Measure full training steps (forward, backward, optimizer) of a preset at batch sizes 1, 2, 4, ...
on this machine and recommend the smallest batch size within --tolerance of the best tokens/s:
beyond it a larger batch buys no speed, only fewer optimizer steps (Marek et al., 2025).
The table also shows the beta2 each batch size gets from the half-life --t2.
"""


def _tokens(text: str) -> float:
    """A token count: a number, optionally with a k/M/B suffix."""
    scale = {"k": 1e3, "m": 1e6, "b": 1e9}
    t = text.strip()
    try:
        if t and t[-1].lower() in scale:
            return float(t[:-1]) * scale[t[-1].lower()]
        return float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of tokens: {text!r}") from None


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    from .train.config import OPTIMIZERS
    from .train.model import PRESETS

    p.add_argument("--config", help="TOML file with settings (keys as the flags); flags given here win")
    p.add_argument("--preset", choices=list(PRESETS), help="model size (default tiny)")
    p.add_argument("--optimizer", choices=list(OPTIMIZERS), help="update rule (default adamw)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: the preset's)")
    p.add_argument("--dim", type=int, help="override the preset's model width")
    p.add_argument("--layers", type=int, help="override the preset's depth")
    p.add_argument("--head-dim", type=int, help="override the head dim (the paper: 128)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: per optimizer)")
    p.add_argument("--t1", type=_tokens, help="half-life of the first moment / momentum, in tokens")
    p.add_argument("--t2", type=_tokens, help="half-life of the second moment, in tokens (default 10M)")
    p.add_argument("--beta1", type=float, help="Adam's beta1 when --t1 is not given (default 0.9)")
    p.add_argument("--beta2", type=float, help="a fixed beta2 instead of the half-life --t2 (not scaled with the batch size)")
    p.add_argument("--weight-decay", type=float, help="decoupled weight decay (default 0)")
    p.add_argument("--seed", type=int, help="seed of the model, the data order and stochastic rounding (default 0)")
    p.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="weights' dtype (default fp32; bf16 for adafactor-sr)")


def _config_from(args: argparse.Namespace) -> Any:
    from .train.config import TrainConfig, load_toml

    settings: Dict[str, Any] = {}
    if getattr(args, "config", None):
        settings.update(load_toml(args.config))
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for key, value in vars(args).items():
        if key in fields and value is not None:
            settings[key] = value
    if getattr(args, "no_progress", False):
        settings["progress"] = False
    return TrainConfig(**settings)


def _train(args: argparse.Namespace) -> int:
    from .train import trainer

    cfg = _config_from(args)
    try:
        summary = trainer.train(cfg)
    except KeyboardInterrupt:
        return 130
    except NotImplementedError as e:  # an optimizer that cannot step this setup (yet): one line
        print(f"smallbatch-rs train: error: {e}", file=sys.stderr)
        return 2
    if trainer.init_distributed(cfg.device).main:
        keys = ("final_val_loss", "tokens_per_s", "mfu", "peak_mem_bytes", "optimizer_share")
        print(json.dumps({k: summary[k] for k in keys}))
    return 0


def _suggest(args: argparse.Namespace) -> int:
    from .train import suggest

    cfg = _config_from(args)
    cfg.validate()
    result = suggest.suggest_batch_size(
        cfg, max_batch_size=args.max_batch_size, tolerance=args.tolerance, steps=args.steps,
        progress=not args.no_progress,
    )
    print(suggest.format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .train import sweep

    names = list(sweep.EXPERIMENTS) if "all" in args.experiments else args.experiments
    settings = sweep.SweepSettings.for_mode(args.quick)
    if args.tokens is not None:
        settings.tokens = args.tokens
    if args.preset is not None:
        settings.preset = args.preset
    if args.sweep_seq_len is not None:
        settings.seq_len = args.sweep_seq_len
    settings.device = args.device
    if args.data is not None:
        settings.data = args.data
    if args.seeds is not None:
        if args.seeds < 1:
            raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
        settings.seeds = args.seeds
    if args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    settings.jobs = args.jobs
    rows = sweep.run_sweep(names, Path(args.out), settings, progress=not args.no_progress)
    failed = [r for r in rows if str(r.get("status", "")).startswith("failed")]
    for r in failed:
        print(f"smallbatch-rs sweep: {r['experiment']}/{r['run']} {r['status']}", file=sys.stderr)
    print(f"{len(rows) - len(failed)} of {len(rows)} runs done; table: {Path(args.out) / 'results.csv'}")
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="smallbatch-rs", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    fmt = argparse.RawDescriptionHelpFormatter
    t = sub.add_parser("train", help="train the paper's transformer at batch size 1", description=TRAIN_HELP, formatter_class=fmt)
    _add_model_flags(t)
    t.add_argument("--data", help="text/.md/.jsonl/.parquet file or folder, a Hugging Face dataset name, or markov:vocab=2048,branch=64,zipf=1.2,seed=0 "
                   "(a synthetic language whose best possible loss is known; default: the embedded corpus)")
    t.add_argument("--tokenizer", help="a tokenizer.json to use instead of training a BPE on the data")
    t.add_argument("--batch-size", type=int, help="sequences per optimizer step (default 1)")
    t.add_argument("--grad-accum", type=int, help="micro-batches per step (default 1; wasteful on one device)")
    t.add_argument("--batch-schedule", help="batch sizes taken in turn, each for an equal share of the tokens, e.g. 1,4,16 "
                   "(half-life coefficients recomputed at each change; instead of --batch-size)")
    t.add_argument("--tokens", type=_tokens, help="training budget in tokens (default 20 per parameter)")
    t.add_argument("--warmup", type=float, help="warmup fraction of the run (default 0.05)")
    t.add_argument("--out", help="output folder (default runs/latest)")
    t.add_argument("--resume", action="store_true", default=None, help="continue from --out's checkpoint, bit for bit")
    t.add_argument("--step-in-backward", action="store_true", default=None,
                   help="step each parameter inside backward and free its gradient (not under DDP; with --fsdp, as each shard's gradient is reduced)")
    t.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on the CPU, where it is faster; the first step compiles)")
    t.add_argument("--cuda-graphs", action="store_true", default=None,
                   help="capture forward, backward and the optimizer step in one CUDA graph after a warm-up and replay it (CUDA)")
    t.add_argument("--fsdp", action="store_true", default=None,
                   help="shard weights, gradients and optimizer state over the torchrun processes (FSDP2) instead of DDP; sharded checkpoints")
    t.add_argument("--eval-every", type=_tokens, help="validate every this many tokens (default: 10 times per run)")
    t.add_argument("--val-tokens", type=int, help="held-out tokens for validation (default 32768)")
    t.add_argument("--checkpoint-every", type=_tokens, help="also checkpoint every this many tokens (default: at the end)")
    t.add_argument("--stop-after", type=_tokens, help="stop after this many tokens, keeping the run's schedule (continue with --resume)")
    t.add_argument("--log-every", type=int, help="steps per metrics record (default 50)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(run=_train)
    s = sub.add_parser("suggest-batch-size", help="measure throughput per batch size and recommend one", description=SUGGEST_HELP, formatter_class=fmt)
    _add_model_flags(s)
    s.add_argument("--max-batch-size", type=int, default=64, help="largest batch size to try (default 64)")
    s.add_argument("--tolerance", type=float, default=0.9, help="fraction of the best throughput to accept (default 0.9)")
    s.add_argument("--steps", type=int, default=5, help="timed steps per batch size (default 5)")
    s.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also measure steps of the compiled model (default: yes, unless SMALLBATCH_RS_COMPILE=0)")
    s.add_argument("--json", help="also write the measurements to this JSON file")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(run=_suggest)
    from .train.sweep import EXPERIMENTS

    w = sub.add_parser("sweep", help="the paper's experiments as grids of training runs", description=(
        "Training runs at a fixed token budget, each configuration at its best learning rate: a grid in factors "
        "of 2, extended while the best loss is at its edge; the best learning rate repeated with --seeds seeds at "
        "the smallest and largest batch sizes. Runs go --jobs cells at a time as separate processes, resumable "
        "(finished runs are reused); one row per run in OUT/results.csv, rewritten after every cell, and a plot "
        "per experiment.\n\n"
        "experiments: beta2 (fixed beta2 vs fixed t2 across batch sizes), optimizers (SGD, Adam, Adafactor, "
        "Muon across batch sizes), lr (Adam's learning-rate grids by batch size), accum (batch size 1 "
        "vs accumulation at equal tokens), schedule (a batch size growing 1 -> 4 -> 16 vs fixed ones), memory (bytes "
        "per parameter), or all"), formatter_class=fmt)
    w.add_argument("experiments", nargs="+", choices=[*EXPERIMENTS, "all"])
    w.add_argument("--out", default="runs/sweep", help="output folder (default runs/sweep)")
    w.add_argument("--jobs", type=int, default=1, help="runs at a time; the cores are split between them (default 1)")
    w.add_argument("--quick", action="store_true", help="tiny budgets and fewer runs (a smoke test)")
    w.add_argument("--tokens", type=_tokens, help="token budget per run (default: 1000 steps of the largest batch size; quick: 1.5k)")
    w.add_argument("--data", help="data of every run (default markov:, a synthetic language with a known floor; or embedded, or as for train)")
    w.add_argument("--seeds", type=int, help="seeds of the best learning rate at the smallest and largest batch sizes (default 3)")
    w.add_argument("--preset", help="model preset (default tiny; lm30m and up on a GPU)")
    w.add_argument("--seq-len", dest="sweep_seq_len", type=int, help="tokens per sequence (default 32)")
    w.add_argument("--device", default="auto", help="device of every run: auto (default), cpu, cuda")
    w.add_argument("--no-progress", action="store_true", help="no progress bar")
    w.set_defaults(run=_sweep, seq_len=None)
    p = sub.add_parser(
        "halflife", help="convert between beta, half-life in tokens and batch size",
        description=HALFLIFE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--beta", type=float, help="an EMA coefficient in (0, 1)")
    p.add_argument("--t-half", type=_tokens, help="a half-life in tokens (suffixes k, M, B: 10M)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (default 512)")
    p.add_argument("--batch-size", type=_batch_sizes, default=[1], help="batch size(s), comma-separated (default 1)")
    p.add_argument("--to-batch-size", type=_batch_sizes, help="scale --beta to these batch sizes at the same half-life")
    p.set_defaults(run=_halflife)
    b = sub.add_parser("bench", help="the optimizer step against torch.optim, side by side", add_help=False)
    b.set_defaults(run=None)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        from . import bench

        return bench.main(argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # a usage error (already printed as one line) or --help
        return int(e.code or 0)
    if args.command in TRAIN_COMMANDS:
        missing = _missing_train_module()
        if missing is not None:
            print(_needs_train_extra(args.command, missing), file=sys.stderr)
            return 2
    try:
        if args.seq_len is not None and args.seq_len <= 0:
            raise ValueError(f"--seq-len must be >= 1, got {args.seq_len}")
        return args.run(args)
    except ValueError as e:
        print(f"smallbatch-rs {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:  # found above but broken, or imported by name elsewhere
        top = (e.name or "").split(".")[0]
        if args.command not in TRAIN_COMMANDS or top not in TRAIN_EXTRA:
            raise
        print(_needs_train_extra(args.command, top), file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
