"""The paper's decoder-only transformer (Marek et al., 2025, following their JAX code).

Pre-norm blocks; RMSNorm without a learnable scale; QK-norm (RMSNorm over the head dim) with RoPE
(base 10000) applied after it; head dim 128 by default; a GELU (tanh) MLP of width 4D; no biases;
untied input and output embeddings; cross-entropy in float32. Dense weights are xavier-uniform,
embeddings N(0, 1/D).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape of the model. ``vocab_size`` is fixed by the tokenizer when training starts."""

    dim: int
    layers: int
    seq_len: int
    head_dim: int = 128
    vocab_size: int = 50257
    rope_base: float = 10000.0

    @property
    def heads(self) -> int:
        return self.dim // self.head_dim

    def validate(self) -> None:
        for name in ("dim", "layers", "seq_len", "head_dim", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"model {name} must be an integer >= 1, got {value!r}")
        if self.dim % self.head_dim:
            raise ValueError(f"model dim {self.dim} is not a multiple of head_dim {self.head_dim}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")

    def chinchilla_params(self) -> int:
        """The parameter count the paper's token budget uses: 12*L*D^2 + D*V."""
        return 12 * self.layers * self.dim**2 + self.dim * self.vocab_size

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6 per weight (forward 2, backward 4), plus attention scores
        and their weighted sum (6*L*T*D with causal masking halving 12*L*T*D)."""
        weights = 12 * self.layers * self.dim**2 + self.dim * self.vocab_size
        return 6.0 * weights + 6.0 * self.layers * self.seq_len * self.dim


#: The paper's model sizes, plus ``tiny``, which trains in minutes on two CPU cores.
PRESETS: Dict[str, ModelConfig] = {
    "tiny": ModelConfig(dim=64, layers=2, seq_len=64, head_dim=32, vocab_size=2048),
    "lm30m": ModelConfig(dim=384, layers=6, seq_len=512, head_dim=128, vocab_size=50257),
    "gpt2-124m": ModelConfig(dim=768, layers=12, seq_len=1024, head_dim=128, vocab_size=50257),
    "gpt3-1.3b": ModelConfig(dim=2048, layers=24, seq_len=2048, head_dim=128, vocab_size=50257),
}


def rms_norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    """RMSNorm without a learnable scale, computed in float32 for bf16 inputs."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rope_tables(seq_len: int, head_dim: int, base: float, device: Optional[torch.device] = None) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotary angles, ``[seq_len, head_dim/2]`` each, in float32."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    angles = torch.arange(seq_len, dtype=torch.float64, device=device)[:, None] * inv_freq[None, :]
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotates pairs (x[..., :h/2], x[..., h/2:]) of ``x`` ``[batch, heads, T, head_dim]``."""
    t = x.shape[-2]
    cos, sin = cos[:t], sin[:t]
    x32 = x.float()
    half = x32.shape[-1] // 2
    x1, x2 = x32[..., :half], x32[..., half:]
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.to(x.dtype)


class Block(nn.Module):
    """Pre-norm attention (QK-norm, RoPE) and MLP (GELU tanh, width 4D), both residual."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.fc = nn.Linear(d, 4 * d, bias=False)
        self.fc_out = nn.Linear(4 * d, d, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        b, t, d = x.shape
        h, hd = self.cfg.heads, self.cfg.head_dim
        q, k, v = self.qkv(rms_norm(x)).view(b, t, 3, h, hd).permute(2, 0, 3, 1, 4)
        q = apply_rope(rms_norm(q), cos, sin)
        k = apply_rope(rms_norm(k), cos, sin)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.fc_out(F.gelu(self.fc(rms_norm(x)), approximate="tanh"))


class Transformer(nn.Module):
    """Token ids ``[batch, T]`` to logits ``[batch, T, vocab]``; :meth:`loss` for training."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.unembed = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.seq_len, cfg.head_dim, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.embed.weight, std=1.0 / math.sqrt(self.cfg.dim))
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)

    def forward(self, tokens: Tensor, targets: Optional[Tensor] = None) -> Tensor:
        """Logits ``[batch, T, vocab]``; with ``targets``, the mean next-token cross-entropy in
        float32 instead (through ``forward`` so that DistributedDataParallel sees it)."""
        if tokens.shape[-1] > self.cfg.seq_len:
            raise ValueError(f"sequence of {tokens.shape[-1]} tokens is longer than the model's {self.cfg.seq_len}")
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, self.rope_cos, self.rope_sin)
        logits = self.unembed(rms_norm(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    def matrix_parameters(self) -> list:
        """The weights Muon should orthogonalise: every dense matrix inside the blocks (not the
        embeddings, which the paper steps with AdamW)."""
        return [p for p in self.blocks.parameters() if p.dim() == 2]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
