"""On an NVIDIA GPU: every CUDA rule equals the CPU core, AdamW equals torch's fused AdamW, a
step is captured and replayed in a CUDA graph, and work on a side stream is ordered correctly.

Skipped without a GPU (run with ``pytest -m cuda`` on a machine that has one)."""

from __future__ import annotations

import copy

import pytest
import torch

import smallbatch_rs as sb

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU: CUDA tests need an NVIDIA GPU and driver"),
]

CASES = {
    "SGD": lambda ps, **kw: sb.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01, **kw),
    "Adam": lambda ps, **kw: sb.Adam(ps, lr=1e-2, weight_decay=0.01, **kw),
    "AdamW": lambda ps, **kw: sb.AdamW(ps, lr=1e-2, weight_decay=0.1, **kw),
}


def _model(dtype):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(33, 257), torch.nn.Tanh(), torch.nn.Linear(257, 65)).to(dtype)


def _grads(model, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g).to(p.dtype) for p in model.parameters()]


def _train_backward(model, opt, steps=5):
    for s in range(steps):
        opt.zero_grad()
        g = torch.Generator().manual_seed(s)
        x = torch.randn(4, 33, generator=g).to(next(model.parameters()))
        model(x).float().square().mean().backward()
        opt.step()


@pytest.mark.parametrize("name", CASES)
def test_cuda_equals_cpu_fp32(name):
    cpu = _model(torch.float32)
    gpu = copy.deepcopy(cpu).cuda()
    _train_backward(cpu, CASES[name](cpu.parameters()))
    _train_backward(gpu, CASES[name](gpu.parameters()))
    for a, b in zip(cpu.parameters(), gpu.parameters()):
        torch.testing.assert_close(b.detach().cpu(), a.detach(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", CASES)
def test_cuda_stochastic_rounding_is_bit_identical_to_cpu(name):
    """bf16 weights, same seed: the GPU's stochastic rounding draws the CPU's bits. Gradients are
    fed identically (no backward, whose bf16 matmuls differ between devices)."""
    cpu = _model(torch.bfloat16)
    gpu = copy.deepcopy(cpu).cuda()
    opts = [CASES[name](m.parameters(), stochastic_rounding=True, seed=7) for m in (cpu, gpu)]
    for s in range(4):
        for m, opt in zip((cpu, gpu), opts):
            for p, g in zip(m.parameters(), _grads(cpu, s)):
                p.grad = g.to(p.device)
            opt.step()
    for a, b in zip(cpu.parameters(), gpu.parameters()):
        assert torch.equal(b.detach().cpu().view(torch.int16), a.detach().view(torch.int16))


def test_stochastic_round_cuda_equals_cpu():
    x = torch.randn(1_000_003) * 3
    for seed, step, stream in ((0, 0, 0), (123, 45, 6)):
        a = sb.stochastic_round(x, seed, step, stream)
        b = sb.stochastic_round(x.cuda(), seed, step, stream).cpu()
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))


def test_adamw_equals_torch_fused():
    ours_model = _model(torch.float32).cuda()
    theirs_model = copy.deepcopy(ours_model)
    _train_backward(ours_model, sb.AdamW(ours_model.parameters(), lr=1e-2, weight_decay=0.1), 20)
    _train_backward(theirs_model, torch.optim.AdamW(theirs_model.parameters(), lr=1e-2, weight_decay=0.1, fused=True), 20)
    for a, b in zip(ours_model.parameters(), theirs_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_step_in_a_cuda_graph():
    """The step launches on torch's current stream with no host sync: it can be captured and replayed."""
    model = _model(torch.float32).cuda()
    ref = copy.deepcopy(model)
    opt = sb.AdamW(model.parameters(), lr=1e-3)
    ref_opt = sb.AdamW(ref.parameters(), lr=1e-3)
    for p in list(model.parameters()) + list(ref.parameters()):
        p.grad = torch.ones_like(p)
    opt.step()  # warm-up outside capture: compiles and loads the kernels, creates state
    ref_opt.step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side):
        with torch.cuda.graph(graph, stream=side):
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    # the step counter is host-side: replays reuse the captured step's constants
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))


def test_side_stream_ordering():
    """A step issued on a side stream after work on that stream sees that work's gradients."""
    model = _model(torch.float32).cuda()
    twin = copy.deepcopy(model)
    opt, twin_opt = sb.SGD(model.parameters(), lr=0.1), sb.SGD(twin.parameters(), lr=0.1)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        for p in model.parameters():
            p.grad = torch.full_like(p, 2.0)
        opt.step()
    torch.cuda.synchronize()
    for p in twin.parameters():
        p.grad = torch.full_like(p, 2.0)
    twin_opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
