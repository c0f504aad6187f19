"""What every optimizer shares: schedulers, closures, resume (stochastic rounding included), bf16
weights kept bf16, and the same bad-input errors."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import smallbatch_rs as sb

OPTIMIZERS = {
    "SGD": lambda ps, **kw: sb.SGD(ps, lr=0.05, momentum=0.9, **kw),
    "Adam": lambda ps, **kw: sb.Adam(ps, lr=1e-2, **kw),
    "AdamW": lambda ps, **kw: sb.AdamW(ps, lr=1e-2, t2=1e4, tokens_per_step=8, **kw),
    "Adafactor": lambda ps, **kw: sb.Adafactor(ps, lr=1e-2, min_dim_size_to_factor=4, **kw),
    "AdafactorSR": lambda ps, **kw: sb.AdafactorSR(ps, lr=1e-2, min_dim_size_to_factor=4, **kw),
    "Muon": lambda ps, **kw: sb.Muon(ps, lr=0.02, **kw),
}
CLASSES = {"SGD": sb.SGD, "Adam": sb.Adam, "AdamW": sb.AdamW, "Adafactor": sb.Adafactor, "AdafactorSR": sb.AdafactorSR, "Muon": sb.Muon}


def _model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)


def _batches(n, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(2, 6, generator=g).to(dtype), torch.randn(2, 3, generator=g).to(dtype)) for _ in range(n)]


def _train(model, opt, batches, sched=None):
    for x, y in batches:
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x).float(), y.float()).backward()
        opt.step()
        if sched is not None:
            sched.step()


def _bits(model):
    return [p.detach().view(torch.int16 if p.dtype == torch.bfloat16 else torch.int32).clone() for p in model.parameters()]


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_resume_is_bit_exact(name, dtype):
    """N steps, save (model + optimizer), load into fresh objects, N more == 2N straight, bit for
    bit, with stochastic rounding on for bf16 weights."""
    kw = dict(stochastic_rounding=True, seed=9) if dtype == torch.bfloat16 else {}
    batches = _batches(16, dtype)
    model = _model(dtype)
    start = copy.deepcopy(model.state_dict())
    _train(model, OPTIMIZERS[name](model.parameters(), **kw), batches)
    straight = _bits(model)

    model.load_state_dict(start)
    first = OPTIMIZERS[name](model.parameters(), **kw)
    _train(model, first, batches[:8])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": first.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    resumed = _model(dtype, seed=5)
    resumed.load_state_dict(ck["model"])
    second = OPTIMIZERS[name](resumed.parameters(), **kw)
    second.load_state_dict(ck["opt"])
    _train(resumed, second, batches[8:])
    for a, b in zip(_bits(resumed), straight):
        assert torch.equal(a, b)
    assert all(p.dtype == dtype for p in resumed.parameters()), "weights are never upcast"


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_scheduler_drives_every_group(name):
    """An LR scheduler sets the lr each step uses: a schedule that reaches 0 freezes the weights."""
    model = _model()
    opt = OPTIMIZERS[name](model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 if s < 3 else 0.0)
    batches = _batches(6)
    _train(model, opt, batches[:3], sched)
    frozen = _bits(model)
    _train(model, opt, batches[3:], sched)
    moved = [not torch.equal(a, b) for a, b in zip(frozen, _bits(model))]
    # weight decay is lr * wd, so lr = 0 stops everything
    assert not any(moved)
    assert all(g["lr"] == 0.0 for g in opt.param_groups)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_closure(name):
    model = _model()
    opt = OPTIMIZERS[name](model.parameters())
    x, y = _batches(1)[0]

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    before = _bits(model)
    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.requires_grad
    assert any(not torch.equal(a, b) for a, b in zip(before, _bits(model)))


@pytest.mark.parametrize("name", CLASSES)
def test_shared_bad_inputs(name):
    cls = CLASSES[name]
    full = f"smallbatch_rs.{name}"
    w = nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match=rf"^{full}: invalid lr: -1\.0 \(param group 0; must be finite and >= 0\)$"):
        cls([w], lr=-1.0)
    with pytest.raises(TypeError, match=rf"^{full} supports float32 and bfloat16 parameters: parameter 0 "):
        cls([nn.Parameter(torch.randn(4, 4, dtype=torch.float64))])
    with pytest.raises(TypeError, match=rf"^{full} does not support complex parameters"):
        cls([nn.Parameter(torch.randn(4, 4, dtype=torch.complex64))])
    with pytest.raises(RuntimeError, match=rf"^{full}: param group 0 has parameters on different devices \(cpu, meta\)"):
        cls([nn.Parameter(torch.randn(4, 4)), nn.Parameter(torch.randn(4, 4, device="meta"))])
    emb = nn.Embedding(10, 4, sparse=True)
    opt = cls([{"params": emb.parameters(), "use_muon": False}] if name == "Muon" else emb.parameters())
    emb(torch.tensor([1])).sum().backward()
    before = emb.weight.detach().clone()
    with pytest.raises(RuntimeError, match=rf"^{full} does not support sparse gradients: parameter 0 .* has a torch\.sparse_coo gradient"):
        opt.step()
    assert opt.state == {} or all(len(s) == 0 for s in opt.state.values())
    assert torch.equal(emb.weight, before)
