"""Ours against torch.optim: 200 steps on a small model, parameters equal to rtol 1e-5."""

from __future__ import annotations

import pytest
import torch

import smallbatch_rs as sb
from conftest import assert_models_close, make_batches, make_pair, train

STEPS = 200

SGD_CASES = [
    dict(lr=0.05),
    dict(lr=0.05, weight_decay=0.01),
    dict(lr=0.02, momentum=0.9),
    dict(lr=0.02, momentum=0.9, dampening=0.3, weight_decay=0.001),
    dict(lr=0.02, momentum=0.9, nesterov=True),
    dict(lr=0.02, momentum=0.5, nesterov=True, weight_decay=0.01, maximize=False),
    dict(lr=0.01, momentum=0.9, maximize=True),
]

ADAM_CASES = [
    dict(lr=1e-3),
    dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-6),
    dict(lr=1e-3, weight_decay=0.1),
    dict(lr=1e-3, betas=(0.3, 0.99)),  # 1 - beta1 >= 0.5: torch's other lerp branch
    dict(lr=1e-3, maximize=True),
]


def _run(ours_cls, theirs_cls, kwargs, steps=STEPS):
    ours_model, theirs_model = make_pair()
    ours = ours_cls(ours_model.parameters(), **kwargs)
    theirs = theirs_cls(theirs_model.parameters(), **kwargs)
    batches = make_batches(steps)
    ours_losses = list(train(ours_model, ours, batches))
    theirs_losses = list(train(theirs_model, theirs, batches))
    return ours_model, theirs_model, ours_losses, theirs_losses, ours, theirs


@pytest.mark.parametrize("kwargs", SGD_CASES, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_sgd_matches_torch(kwargs):
    ours_model, theirs_model, ours_losses, theirs_losses, ours, theirs = _run(sb.SGD, torch.optim.SGD, kwargs)
    assert_models_close(ours_model, theirs_model)
    if kwargs.get("momentum", 0) == 0:
        assert len(ours.state) == 0, "SGD without momentum keeps no state"
    else:
        for p_ours, p_theirs in zip(ours_model.parameters(), theirs_model.parameters()):
            torch.testing.assert_close(
                ours.state[p_ours]["momentum_buffer"], theirs.state[p_theirs]["momentum_buffer"], rtol=1e-5, atol=1e-6
            )


@pytest.mark.parametrize("kwargs", ADAM_CASES, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_adam_matches_torch(name, kwargs):
    ours_model, theirs_model, ours_losses, theirs_losses, ours, theirs = _run(
        getattr(sb, name), getattr(torch.optim, name), kwargs
    )
    assert_models_close(ours_model, theirs_model)
    for p_ours, p_theirs in zip(ours_model.parameters(), theirs_model.parameters()):
        s_ours, s_theirs = ours.state[p_ours], theirs.state[p_theirs]
        assert float(s_ours["step"]) == float(s_theirs["step"]) == STEPS
        torch.testing.assert_close(s_ours["exp_avg"], s_theirs["exp_avg"], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(s_ours["exp_avg_sq"], s_theirs["exp_avg_sq"], rtol=1e-5, atol=1e-9)


def test_adamw_matches_torch_fused():
    """torch's fused CPU AdamW is what speed-minded users run: same numbers."""
    kwargs = dict(lr=2e-3, weight_decay=0.05)
    ours_model, theirs_model = make_pair()
    ours = sb.AdamW(ours_model.parameters(), **kwargs)
    theirs = torch.optim.AdamW(theirs_model.parameters(), fused=True, **kwargs)
    batches = make_batches(STEPS)
    list(train(ours_model, ours, batches))
    list(train(theirs_model, theirs, batches))
    assert_models_close(ours_model, theirs_model)


def test_adam_decoupled_flag_is_adamw():
    ours_model, theirs_model = make_pair()
    a = sb.Adam(ours_model.parameters(), lr=1e-3, weight_decay=0.1, decoupled_weight_decay=True)
    b = sb.AdamW(theirs_model.parameters(), lr=1e-3, weight_decay=0.1)
    batches = make_batches(20)
    list(train(ours_model, a, batches))
    list(train(theirs_model, b, batches))
    assert_models_close(ours_model, theirs_model, rtol=0, atol=0)


def test_param_groups_with_different_hyperparameters():
    ours_model, theirs_model = make_pair()

    def groups(model):
        return [
            {"params": list(model.embed.parameters()) + list(model.fc1.parameters()), "lr": 3e-3},
            {"params": list(model.norm.parameters()) + list(model.fc2.parameters()), "weight_decay": 0.2, "betas": (0.5, 0.9)},
        ]

    ours = sb.AdamW(groups(ours_model), lr=1e-3)
    theirs = torch.optim.AdamW(groups(theirs_model), lr=1e-3)
    batches = make_batches(50)
    list(train(ours_model, ours, batches))
    list(train(theirs_model, theirs, batches))
    assert_models_close(ours_model, theirs_model)
    assert len(ours._tables) == 2


def test_lr_scheduler_and_tensor_lr():
    ours_model, theirs_model = make_pair()
    ours = sb.AdamW(ours_model.parameters(), lr=torch.tensor(0.01))
    theirs = torch.optim.AdamW(theirs_model.parameters(), lr=torch.tensor(0.01))
    warm_cos = lambda step: min(1.0, (step + 1) / 10) * 0.5 * (1 + __import__("math").cos(step / 60 * 3.14159))
    s_ours = torch.optim.lr_scheduler.LambdaLR(ours, warm_cos)
    s_theirs = torch.optim.lr_scheduler.LambdaLR(theirs, warm_cos)
    batches = make_batches(60)
    list(train(ours_model, ours, batches, s_ours))
    list(train(theirs_model, theirs, batches, s_theirs))
    assert_models_close(ours_model, theirs_model)
    assert float(ours.param_groups[0]["lr"]) == pytest.approx(float(theirs.param_groups[0]["lr"]))


def test_step_lr_scheduler_sgd():
    ours_model, theirs_model = make_pair()
    ours = sb.SGD(ours_model.parameters(), lr=0.1, momentum=0.9)
    theirs = torch.optim.SGD(theirs_model.parameters(), lr=0.1, momentum=0.9)
    s_ours = torch.optim.lr_scheduler.StepLR(ours, step_size=7, gamma=0.5)
    s_theirs = torch.optim.lr_scheduler.StepLR(theirs, step_size=7, gamma=0.5)
    batches = make_batches(40)
    list(train(ours_model, ours, batches, s_ours))
    list(train(theirs_model, theirs, batches, s_theirs))
    assert_models_close(ours_model, theirs_model)
    assert s_ours.get_last_lr() == s_theirs.get_last_lr()


def test_closure_returns_loss_and_matches():
    ours_model, theirs_model = make_pair()
    ours = sb.Adam(ours_model.parameters(), lr=1e-2)
    theirs = torch.optim.Adam(theirs_model.parameters(), lr=1e-2)
    for tokens, target in make_batches(10):
        results = []
        for model, opt in ((ours_model, ours), (theirs_model, theirs)):
            def closure(model=model, opt=opt):
                opt.zero_grad()
                loss = torch.nn.functional.mse_loss(model(tokens), target)
                loss.backward()
                return loss
            results.append(opt.step(closure))
        assert float(results[0]) == pytest.approx(float(results[1]), rel=1e-5)
    assert_models_close(ours_model, theirs_model)
