"""Shared fixtures: small deterministic models and a training loop that runs ours and torch's side by side."""

from __future__ import annotations

import copy
import os
import socket
from typing import Callable, Iterator

import pytest
import torch

torch.set_num_threads(1)  # deterministic torch kernels: parity must not depend on torch's threading

# The trainer compiles its model by default on the CPU; the tests' runs are a few dozen steps of
# many different models, where compiling each would dominate the suite. Tests of --compile ask
# for it explicitly. (Inherited by the trainer processes the tests start.)
os.environ.setdefault("SMALLBATCH_RS_COMPILE", "0")


class TinyNet(torch.nn.Module):
    """A small MLP with a layer norm and an embedding: several shapes, odd sizes, biases."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(11, 7)
        self.fc1 = torch.nn.Linear(7, 33)
        self.norm = torch.nn.LayerNorm(33)
        self.fc2 = torch.nn.Linear(33, 5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens).mean(dim=1)
        return self.fc2(torch.tanh(self.norm(self.fc1(h))))


def make_batches(steps: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 11, (4, 3), generator=g), torch.randn(4, 5, generator=g)) for _ in range(steps)]


def make_pair(seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The same freshly initialised model twice: one for ours, one for torch's optimizer."""
    torch.manual_seed(seed)
    model = TinyNet()
    return model, copy.deepcopy(model)


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, batches, sched=None) -> Iterator[float]:
    """Plain loop; with ``maximize=True`` the objective is the negated loss, so it still converges."""
    sign = -1.0 if opt.param_groups[0].get("maximize") else 1.0
    for tokens, target in batches:
        opt.zero_grad()
        loss = sign * torch.nn.functional.mse_loss(model(tokens), target)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        yield float(loss.detach())


def assert_models_close(ours: torch.nn.Module, theirs: torch.nn.Module, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    for (name, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters()):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.fixture
def pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    return make_pair()


OptFactory = Callable[..., torch.optim.Optimizer]


def free_port() -> int:
    """A TCP port free on this machine now, for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory):
    """One tokenizer and shard cache for the trainer's tests (subprocesses inherit it)."""
    path = tmp_path_factory.mktemp("smallbatch-cache")
    old = os.environ.get("SMALLBATCH_CACHE")
    os.environ["SMALLBATCH_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("SMALLBATCH_CACHE", None)
    else:
        os.environ["SMALLBATCH_CACHE"] = old
