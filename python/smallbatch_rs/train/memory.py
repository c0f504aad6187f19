"""Bytes per parameter of full training, the paper's memory axis (Fig. 8), measured.

    python -m smallbatch_rs.train.memory MODE SUMMARY.json [--quick]

Runs a few batch-size-1 training steps of one model in this (fresh) process and writes what the
weights, the optimizer state and the persistent gradient buffers take per model parameter (the
``bytes_per_param`` the paper plots), and the resident memory the process grew by per parameter
(``measured_bytes_per_param``: the same plus activations, transient gradients and allocator slack).
LoRA puts rank-8 adapters on every dense matrix of the blocks with the base weights frozen in
bf16: peft's when it is installed, else a minimal adapter of the same shape.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Dict, List

import torch
from torch import nn

MEMORY_MODES = (
    "adam-fp32",
    "adam-fp32-step-in-backward",
    "adafactor-sr-bf16-step-in-backward",
    "sgd-sr-bf16-step-in-backward",
    "lora-r8-bf16",
)


def _rss_bytes(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process, from /proc (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


class LoRALinear(nn.Module):
    """``W x + (B A x) * alpha / r`` with ``W`` frozen and the rank-r factors trained in float32."""

    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float = 16.0):
        super().__init__()
        self.base = base
        base.weight.requires_grad_(False)
        self.a = nn.Parameter(torch.randn(rank, base.in_features) / math.sqrt(base.in_features))
        self.b = nn.Parameter(torch.zeros(base.out_features, rank))
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        adapter = (x.float() @ self.a.T) @ self.b.T * self.scale
        return self.base(x) + adapter.to(x.dtype)


LORA_TARGETS = ["qkv", "proj", "fc", "fc_out"]


def _with_lora(model: nn.Module) -> tuple:
    """``model`` with rank-8 LoRA on every dense matrix of the blocks, base weights frozen: with
    peft when it is installed, else with :class:`LoRALinear`. Returns ``(model, implementation)``."""
    try:
        import peft
    except ImportError:
        pass
    else:
        config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS)
        return peft.get_peft_model(model, config), f"peft {peft.__version__}"
    for p in model.parameters():
        p.requires_grad_(False)
    for block in model.blocks:  # type: ignore[union-attr]
        for name in LORA_TARGETS:
            setattr(block, name, LoRALinear(getattr(block, name)))
    return model, "minimal adapter (peft not installed)"


def measure(mode: str, quick: bool) -> Dict[str, object]:
    import smallbatch_rs as sb

    from .model import ModelConfig, Transformer
    from .trainer import memory_accounting

    if mode not in MEMORY_MODES:
        raise ValueError(f"unknown memory mode {mode!r} (choose from {', '.join(MEMORY_MODES)})")
    cfg = ModelConfig(dim=256 if quick else 512, layers=2 if quick else 8, seq_len=64, head_dim=64, vocab_size=8192)
    torch.manual_seed(0)
    baseline = _rss_bytes("VmRSS")
    bf16 = "bf16" in mode
    model = Transformer(cfg).to(torch.bfloat16 if bf16 else torch.float32)
    n_params = model.num_params()
    step_in_backward = "step-in-backward" in mode
    lora_impl = None
    if mode.startswith("lora"):
        model, lora_impl = _with_lora(model)
        trainable: List[nn.Parameter] = [p for p in model.parameters() if p.requires_grad]
        opt: object = sb.AdamW(trainable, lr=1e-3, t2=10e6, tokens_per_step=cfg.seq_len)
    elif mode.startswith("adam"):
        opt = (sb.StepInBackward(model.parameters(), sb.AdamW, lr=1e-3, t2=10e6, tokens_per_step=cfg.seq_len)
               if step_in_backward else sb.AdamW(model.parameters(), lr=1e-3, t2=10e6, tokens_per_step=cfg.seq_len))
    elif mode.startswith("adafactor"):
        opt = sb.StepInBackward(model.parameters(), sb.AdafactorSR, lr=1e-2, t2=10e6, tokens_per_step=cfg.seq_len)
    else:
        opt = sb.StepInBackward(model.parameters(), sb.SGD, lr=0.1, stochastic_rounding=True)
    x = torch.randint(0, cfg.vocab_size, (1, cfg.seq_len))
    y = torch.randint(0, cfg.vocab_size, (1, cfg.seq_len))
    for _ in range(3):
        model(x, y).backward()
        if not isinstance(opt, sb.StepInBackward):
            opt.step()  # type: ignore[attr-defined]
            opt.zero_grad()  # type: ignore[attr-defined]
    peak = _rss_bytes("VmHWM")
    acct = memory_accounting(model, opt)
    if mode.startswith("lora"):
        # The adapters' weights are trained parameters too: count them with the frozen base.
        acct["param_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    total = acct["param_bytes"] + acct["optimizer_state_bytes"] + acct["grad_buffer_bytes"]
    return {
        "mode": mode,
        "params": n_params,
        **acct,
        "bytes_per_param": total / n_params,
        "measured_bytes_per_param": (peak - baseline) / n_params,
        "peak_mem_bytes": peak,
        "complete": True,
        **({"lora": lora_impl} if lora_impl else {}),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=MEMORY_MODES)
    parser.add_argument("summary")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    result = measure(args.mode, args.quick)
    Path(args.summary).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
