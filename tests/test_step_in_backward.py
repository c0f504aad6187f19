"""StepInBackward: every rule stepped inside backward equals the same rule stepped after it, with
no persistent gradient buffer; state round-trips; bad use is refused."""

from __future__ import annotations

import pytest
import torch

import smallbatch_rs as sb
from smallbatch_rs import StepInBackward

RULES = [
    (sb.SGD, dict(lr=0.1, momentum=0.9)),
    (sb.Adam, dict(lr=1e-2)),
    (sb.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    (sb.Adafactor, dict(lr=1e-2)),
    (sb.Muon, dict(lr=1e-2)),
]


def _model(dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4)).to(dtype)


def _loss(model: torch.nn.Module, i: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(i)
    x = torch.randn(5, 8, generator=g).to(next(model.parameters()).dtype)
    return model(x).float().pow(2).mean()


@pytest.mark.parametrize("cls, kwargs", RULES, ids=[c.__name__ for c, _ in RULES])
def test_equals_the_step_after_backward(cls, kwargs):
    a, b = _model(), _model()
    opt = cls(a.parameters(), **kwargs)
    stepper = StepInBackward(b.parameters(), cls, **kwargs)
    for i in range(6):
        _loss(a, i).backward()
        opt.step()
        opt.zero_grad()
        _loss(b, i).backward()
        assert all(p.grad is None for p in b.parameters())
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    # no gradient outlives its parameter's step
    assert all(p.grad is None for p in b.parameters())


def test_bf16_stochastic_rounding_moves_weights_and_is_reproducible():
    runs = []
    for _ in range(2):
        m = _model(torch.bfloat16)
        before = [p.detach().clone() for p in m.parameters()]
        StepInBackward(m.parameters(), sb.AdafactorSR, lr=1e-3, seed=7)
        for i in range(3):
            _loss(m, i).backward()
        assert any(not torch.equal(p, q) for p, q in zip(m.parameters(), before))
        runs.append([p.detach().clone() for p in m.parameters()])
    assert all(torch.equal(p, q) for p, q in zip(*runs))


def test_state_dict_round_trip_and_lr_schedule():
    a, b = _model(), _model()
    sa = StepInBackward(a.named_parameters(), sb.AdamW, lr=1e-2)
    for i in range(3):
        _loss(a, i).backward()
    b.load_state_dict(a.state_dict())
    sb_ = StepInBackward(b.named_parameters(), sb.AdamW, lr=1e-2)
    sb_.load_state_dict(sa.state_dict())
    for s in (sa, sb_):
        for g in s.param_groups:
            g["lr"] = 5e-3
    for i in range(3, 6):
        _loss(a, i).backward()
        _loss(b, i).backward()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert len(sa.param_groups) == 4 and sa.param_groups[0]["param_names"] == ["0.weight"]


def test_remove_stops_stepping_and_errors():
    m = _model()
    stepper = StepInBackward(m.parameters(), sb.SGD, lr=0.1)
    stepper.remove()
    before = [p.detach().clone() for p in m.parameters()]
    _loss(m, 0).backward()
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), before))
    with pytest.raises(TypeError, match="StepInBackward needs a smallbatch_rs optimizer class, got <class 'torch.optim.adamw.AdamW'>"):
        StepInBackward(m.parameters(), torch.optim.AdamW, lr=0.1)
    with pytest.raises(ValueError, match="StepInBackward: got an empty parameter list"):
        StepInBackward([], sb.SGD, lr=0.1)
    with pytest.raises(ValueError, match=r"the state has 1 optimizers, this one has 4"):
        StepInBackward(_model().parameters(), sb.SGD, lr=0.1).load_state_dict({"optimizers": [{}]})
