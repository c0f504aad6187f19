"""Train a small character-level transformer at batch size 1 with smallbatch_rs.AdamW.

The optimizer drops into an ordinary torch loop; beta2 comes from a half-life in tokens
(Marek et al., 2025: keep t2 fixed in tokens, and batch size 1 trains as well as large batches).
The text is built in: the standard library's own docstrings, so nothing is downloaded.

    python examples/torch_loop.py [--steps 600] [--seq-len 64] [--torch]
"""

from __future__ import annotations

import argparse
import inspect
import math
import time

import torch

import smallbatch_rs


def corpus() -> str:
    """Docstrings of a fixed list of standard-library modules: the same text on every machine."""
    import collections, functools, itertools, json, pathlib, textwrap, typing  # noqa: E401

    parts = []
    for module in (collections, functools, itertools, json, pathlib, textwrap, typing):
        for _, obj in sorted(vars(module).items()):
            doc = inspect.getdoc(obj)
            if doc and (inspect.isfunction(obj) or inspect.isclass(obj)):
                parts.append(doc)
    return "\n\n".join(parts)


class CharTransformer(torch.nn.Module):
    def __init__(self, vocab: int, dim: int = 64, layers: int = 2, seq_len: int = 64):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.pos = torch.nn.Parameter(torch.randn(seq_len, dim) * 0.02)
        layer = torch.nn.TransformerEncoderLayer(dim, nhead=4, dim_feedforward=4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = torch.nn.Linear(dim, vocab, bias=False)
        self.register_buffer("mask", torch.nn.Transformer.generate_square_subsequent_mask(seq_len), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        h = self.embed(tokens) + self.pos[:t]
        return self.head(self.blocks(h, mask=self.mask[:t, :t], is_causal=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--t2", type=float, default=2e5, help="half-life of beta2 in tokens")
    ap.add_argument("--torch", action="store_true", help="use torch.optim.AdamW(fused=True) instead, to compare")
    args = ap.parse_args()

    torch.manual_seed(0)
    text = corpus()
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text], dtype=torch.long)
    split = int(0.9 * len(data))
    train_data, val_data = data[:split], data[split:]
    T = args.seq_len
    model = CharTransformer(len(chars), seq_len=T)
    n_params = sum(p.numel() for p in model.parameters())

    tokens_per_step = 1 * T  # batch size 1
    if args.torch:
        beta2 = smallbatch_rs.halflife.beta_from_halflife(args.t2, tokens_per_step)
        opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, beta2), fused=True)
    else:
        opt = smallbatch_rs.AdamW(model.parameters(), lr=args.lr, t2=args.t2, tokens_per_step=tokens_per_step)
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))
    )

    @torch.no_grad()
    def val_loss() -> float:
        losses = []
        for i in range(0, min(len(val_data) - T - 1, 40 * T), T):
            x, y = val_data[i : i + T][None], val_data[i + 1 : i + T + 1][None]
            losses.append(torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()).item())
        return sum(losses) / len(losses)

    name = "torch.optim.AdamW(fused)" if args.torch else "smallbatch_rs.AdamW"
    print(f"{len(text):,} characters, vocabulary {len(chars)}, model {n_params:,} parameters")
    print(f"optimizer {name}, batch size 1 x {T} tokens, beta2 = {opt.param_groups[0]['betas'][1]:.6f} (t2 = {args.t2:g} tokens)")
    print(f"backend {smallbatch_rs.backend_info()}")
    print(f"step {0:5d}  val loss {val_loss():.3f}")
    g = torch.Generator().manual_seed(1)
    t_opt = t_total = 0.0
    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        i = int(torch.randint(0, len(train_data) - T - 1, (1,), generator=g))
        x, y = train_data[i : i + T][None], train_data[i + 1 : i + T + 1][None]
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        t1 = time.perf_counter()
        opt.step()
        sched.step()
        t2 = time.perf_counter()
        t_opt += t2 - t1
        t_total += t2 - t0
        if step % (args.steps // 6 or 1) == 0 or step == args.steps:
            print(f"step {step:5d}  train loss {loss.item():.3f}  val loss {val_loss():.3f}")
    print(f"{args.steps} steps in {t_total:.1f} s; optimizer step {1e3 * t_opt / args.steps:.2f} ms/step ({100 * t_opt / t_total:.1f}% of step time)")


if __name__ == "__main__":
    main()
