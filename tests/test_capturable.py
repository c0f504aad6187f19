"""``capturable=True`` (torch's name): step counts on the parameters' device and a tensor learning
rate read where it lives, so that a CUDA graph can capture the step and replay it. On the CPU the
mode runs every rule, and its results equal a plain step's bit for bit across an LR schedule
(float, float32-tensor and float64-tensor lr), parameters whose gradient is sometimes None, a
resume from a plain optimizer's state dict, and a ``set_tokens_per_step`` change. On CUDA the
counted kernels of SGD and Adam(W) are checked against the plain step in tests/test_cuda.py."""

from __future__ import annotations

import pytest
import torch

import smallbatch_rs as sb
from smallbatch_rs import _core

RULES = {
    "SGD": lambda ps, lr, **kw: sb.SGD(ps, lr=lr, momentum=0.9, nesterov=True, **kw),
    "SGD-halflife-SR": lambda ps, lr, **kw: sb.SGD(
        ps, lr=lr, t1=2000.0, tokens_per_step=256, stochastic_rounding=True, seed=5, **kw
    ),
    "Adam": lambda ps, lr, **kw: sb.Adam(ps, lr=lr, amsgrad=True, weight_decay=0.01, **kw),
    "AdamW-halflife": lambda ps, lr, **kw: sb.AdamW(ps, lr=lr, t2=20000.0, tokens_per_step=256, **kw),
    "AdamW-SR": lambda ps, lr, **kw: sb.AdamW(ps, lr=lr, stochastic_rounding=True, seed=2, **kw),
    "Adafactor": lambda ps, lr, **kw: sb.Adafactor(ps, lr=lr, beta1=0.9, t2=8000.0, tokens_per_step=256, **kw),
    "AdafactorSR": lambda ps, lr, **kw: sb.AdafactorSR(ps, lr=lr, seed=3, **kw),
    "Muon": lambda ps, lr, **kw: sb.Muon(ps, lr=lr, **kw),
}

LRS = {
    "float": lambda: 0.02,
    "float32 tensor": lambda: torch.tensor(0.02, dtype=torch.float32),
    "float64 tensor": lambda: torch.tensor(0.02, dtype=torch.float64),
}


def _model(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).to(dtype)


def _backward(model: torch.nn.Module, t: int) -> None:
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(t)).to(next(model.parameters()).dtype)
    model(x).float().square().mean().backward()
    if t % 3 == 1:
        model[2].bias.grad = None  # a parameter that skips a step keeps its own count


def _run(name: str, lr_kind: str, capturable: bool, resume_at: int = 3, steps: int = 7):
    """A LambdaLR run; at ``resume_at`` the optimizer is replaced by a new one (capturable or
    not) loaded from a plain optimizer's state dict, and the tokens per step change."""
    dtype = torch.bfloat16 if name.endswith("SR") else torch.float32
    model = _model(dtype)
    opt = RULES[name](model.parameters(), LRS[lr_kind]())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))
    for t in range(steps):
        if t == resume_at:
            saved = opt.state_dict()
            opt = RULES[name](model.parameters(), LRS[lr_kind](), capturable=capturable)
            opt.load_state_dict(saved)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t), last_epoch=t - 1)
            if "halflife" in name or name == "Adafactor":
                opt.set_tokens_per_step(512)
        _backward(model, t)
        opt.step()
        opt.zero_grad()
        sched.step()
    return model, opt


@pytest.mark.parametrize("lr_kind", list(LRS))
@pytest.mark.parametrize("name", list(RULES))
def test_capturable_steps_equal_plain_steps_on_the_cpu(name, lr_kind):
    plain, plain_opt = _run(name, lr_kind, capturable=False)
    model, opt = _run(name, lr_kind, capturable=True)
    assert opt.param_groups[0]["capturable"] is True
    for p, q in zip(model.parameters(), plain.parameters()):
        assert torch.equal(p, q), name
        for key, value in plain_opt.state[q].items():
            assert torch.equal(opt.state[p][key], value), (name, key)
    # The last bias skipped steps 1 and 4: its own count.
    if "step" in opt.state[model[2].bias]:
        assert opt.state[model[2].bias]["step"].item() == 5.0 and opt.state[model[0].bias]["step"].item() == 7.0


def test_a_capturable_step_reads_the_tensor_lr_where_it_lives():
    """The native call receives the tensor's address, not a copy of its value: writing the
    tensor in place between steps (what LR schedulers do) moves the step."""
    model = _model(torch.float32)
    lr = torch.tensor(0.0)
    opt = sb.AdamW(model.parameters(), lr=lr, capturable=True)
    before = [p.detach().clone() for p in model.parameters()]
    _backward(model, 0)
    opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before)), "lr 0 with weight decay changes nothing"
    lr.fill_(0.1)
    _backward(model, 1)
    opt.step()
    assert not torch.equal(model[0].weight, before[0])


def test_capturable_checks_the_lr_tensor():
    model = _model(torch.float32)
    with pytest.raises(TypeError, match=r"smallbatch_rs.Adam: with capturable=True a tensor lr must be float32 or float64 \(param group 0: torch.float16\)"):
        sb.Adam(model.parameters(), lr=torch.tensor(0.01, dtype=torch.float16), capturable=True)


def test_the_binding_reads_lr_tensors_only_in_capturable_steps():
    table = _core.SegmentTable([2])
    p = torch.ones(2)
    g = torch.ones(2)
    steps = torch.zeros(1, dtype=torch.float64)
    lr = torch.tensor(0.5)
    args = (table, b"\x01", steps.data_ptr(), [p.data_ptr()], [g.data_ptr()], 0)
    hyper = dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False)
    with pytest.raises(ValueError, match="lr_tensor is read only by capturable steps"):
        _core.sgd_step(*args, lr=0.1, lr_tensor=(lr.data_ptr(), "float32"), **hyper)
    with pytest.raises(ValueError, match="lr_tensor must be float32 or float64, got float16"):
        _core.sgd_step(*args, lr=0.1, capturable=True, lr_tensor=(lr.data_ptr(), "float16"), **hyper)
    _core.sgd_step(*args, lr=0.1, capturable=True, lr_tensor=(lr.data_ptr(), "float32"), **hyper)
    assert p.tolist() == [0.5, 0.5] and steps.item() == 1.0


@pytest.mark.parametrize("cls", [sb.Adafactor, sb.Muon])
def test_capturable_refuses_tensors_spread_over_ranks_for_rules_that_exchange_statistics(cls):
    """Adafactor's and Muon's sharded steps combine statistics through collectives called from
    the host: their capturable mode is for whole tensors. (The check, on a table marked as
    holding split shards; tests/test_fsdp.py runs the real DTensor groups.)"""
    from types import SimpleNamespace

    model = _model(torch.float32)
    opt = cls(model.parameters(), capturable=True)
    tg = opt._tables[0]
    tg.sharding = SimpleNamespace(split=[1] * len(tg.params))
    with pytest.raises(NotImplementedError, match=r"capturable=True is not supported for tensors spread over several ranks \(param group 0"):
        opt._check_capturable(opt.param_groups[0], 0, tg)
    tg.sharding = SimpleNamespace(split=[0] * len(tg.params))  # replicated: whole tensors on every rank
    opt._check_capturable(opt.param_groups[0], 0, tg)
