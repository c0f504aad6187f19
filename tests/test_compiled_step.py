"""``opt.step()`` under torch.compile: one custom operator (``torch.ops.smallbatch_rs.step``)
that declares what it mutates; the compiled step equals the eager one bit for bit across a
learning-rate schedule (float or tensor lr), does not recompile when the schedule moves, and
writes its results into copies when the compiler hands it copies."""

from __future__ import annotations

import copy
import gc

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import smallbatch_rs as sb

@pytest.fixture(autouse=True)
def fresh_compiler():
    # Every run here compiles the same lambda: without a reset, dynamo's per-code recompile
    # limit would send later tests to eager.
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


RULES = {
    "SGD": lambda ps, lr: sb.SGD(ps, lr=lr, momentum=0.9, nesterov=True),
    "Adam": lambda ps, lr: sb.Adam(ps, lr=lr, amsgrad=True),
    "AdamW": lambda ps, lr: sb.AdamW(ps, lr=lr, weight_decay=0.1),
    "Adafactor": lambda ps, lr: sb.Adafactor(ps, lr=lr, beta1=0.9),
    "AdafactorSR": lambda ps, lr: sb.AdafactorSR(ps, lr=lr, seed=3),
    "Muon": lambda ps, lr: sb.Muon(ps, lr=lr),
}


def _model(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).to(dtype)


def _backward(model: torch.nn.Module, t: int) -> None:
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(t)).to(next(model.parameters()).dtype)
    model(x).float().square().mean().backward()


def _run(name: str, tensor_lr: bool, compiled: bool, steps: int = 6, backend: object = "inductor"):
    dtype = torch.bfloat16 if name.endswith("SR") else torch.float32
    model = _model(dtype)
    lr = torch.tensor(0.02, dtype=torch.float64) if tensor_lr else 0.02
    opt = RULES[name](model.parameters(), lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))
    step = torch.compile(lambda: opt.step(), backend=backend) if compiled else opt.step
    for t in range(steps):
        _backward(model, t)
        step()
        opt.zero_grad()
        sched.step()
    return model, opt


@pytest.mark.parametrize("name", list(RULES))
def test_compiled_step_equals_the_eager_step(name):
    eager, eager_opt = _run(name, tensor_lr=False, compiled=False)
    for tensor_lr in (False, True):
        model, opt = _run(name, tensor_lr=tensor_lr, compiled=True)
        for p, q in zip(model.parameters(), eager.parameters()):
            assert torch.equal(p, q), (name, tensor_lr)
        for p, q in zip(model.parameters(), eager.parameters()):
            for key, value in eager_opt.state[q].items():
                assert torch.equal(opt.state[p][key], value), (name, tensor_lr, key)
        if tensor_lr:
            # The scheduler moved the tensor in place; the step read it each time.
            assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)
            assert opt.param_groups[0]["lr"].item() == pytest.approx(0.02 / 7)


@pytest.mark.parametrize("tensor_lr", [False, True])
def test_a_schedule_does_not_recompile(tensor_lr):
    counter = CompileCounter()
    _run("AdamW", tensor_lr=tensor_lr, compiled=True, steps=8, backend=counter)
    # The first step is traced; the state it creates is traced once more; then nothing, while
    # the learning rate moves every step.
    assert counter.frame_count == 2


def test_copies_of_the_mutated_tensors_receive_the_results():
    model, ref = _model(torch.float32), _model(torch.float32)
    opt, ref_opt = sb.AdamW(model.parameters(), lr=0.01), sb.AdamW(ref.parameters(), lr=0.01)
    for m in (model, ref):
        _backward(m, 0)
    ref_opt.step()
    from smallbatch_rs.optim import compiled

    params, grads, state = compiled.mutated_tensors(opt)
    copies = [p.detach().clone() for p in params]
    state_copies = [s.clone() for s in state]
    torch.ops.smallbatch_rs.step(opt._op_handle, copies, grads, state_copies)
    for c, p, q in zip(copies, model.parameters(), ref.parameters()):
        assert torch.equal(p, q) and torch.equal(c, q)
    assert torch.equal(state_copies[0], opt._tables[0].steps)


def test_a_copied_optimizer_has_its_own_handle_and_a_freed_one_is_named():
    model = _model(torch.float32)
    opt = sb.SGD(model.parameters(), lr=0.1)
    twin = copy.deepcopy(opt)
    assert twin._op_handle != opt._op_handle
    handle = opt._op_handle
    params, grads, state = [], [], []
    del opt, twin
    gc.collect()
    with pytest.raises(RuntimeError, match=f"smallbatch_rs::step: no optimizer has handle {handle} \\(it was freed\\)"):
        torch.ops.smallbatch_rs.step(handle, params, grads, state)
