"""The ``smallbatch-rs`` command (also ``python -m smallbatch_rs``).

Subcommands:
  halflife   convert between an EMA coefficient (beta), its half-life in tokens, the batch size
             and the sequence length (the paper's rule: keep the half-life fixed in tokens)
  bench      the optimizer step against torch.optim, side by side (see smallbatch_rs.bench)

Bad arguments exit with status 2 and one line saying what is wrong.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, NoReturn, Optional

from . import halflife as hl

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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="smallbatch-rs", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser(
        "halflife", help="convert between beta, half-life in tokens and batch size",
        description=HALFLIFE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--beta", type=float, help="an EMA coefficient in (0, 1)")
    p.add_argument("--t-half", type=float, help="a half-life in tokens")
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
    args = parser.parse_args(argv)
    try:
        if args.seq_len <= 0:
            raise ValueError(f"--seq-len must be >= 1, got {args.seq_len}")
        return args.run(args)
    except ValueError as e:
        print(f"smallbatch-rs {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
