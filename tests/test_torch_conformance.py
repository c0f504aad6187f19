"""torch.optim's own conformance inputs for the rules torch shares with us (SGD, Adam, AdamW):
each of the error inputs of torch's ``optim_db`` raises (or warns) what torch raises, and
amsgrad steps and checkpoints like torch's."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import smallbatch_rs as sb

common_optimizers = pytest.importorskip(
    "torch.testing._internal.common_optimizers", reason="torch's optimizer test inputs need expecttest"
)

OURS = {"SGD": sb.SGD, "Adam": sb.Adam, "AdamW": sb.AdamW}


def _error_inputs():
    cases = []
    for info in common_optimizers.optim_db:
        name = info.optim_cls.__name__
        if name not in OURS:
            continue
        for k, error in enumerate(info.optim_error_inputs_func(device="cpu", dtype=torch.float32)):
            cases.append(pytest.param(name, info.optim_cls, error, id=f"{name}-{k}-{error.optimizer_error_input.desc}"))
    return cases


def _outcome(cls, error):
    """What constructing (and, for step errors, stepping) ``cls`` with the error input does: the
    exception type raised, or the warning categories seen."""
    given = error.optimizer_error_input
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        try:
            opt = cls(copy.copy(given.params), **given.kwargs)
            if error.error_on == common_optimizers.OptimizerErrorEnum.STEP_ERROR:
                opt.step()
        except Exception as raised:  # noqa: BLE001 - the type is what is compared
            return type(raised), []
    return None, [w.category for w in seen]


CASES = _error_inputs()


def test_torch_has_the_error_inputs_we_check():
    assert len(CASES) >= 30


@pytest.mark.parametrize("name,theirs,error", CASES)
def test_error_inputs_raise_what_torch_raises(name, theirs, error):
    expected = error.error_type
    raised, warned = _outcome(OURS[name], error)
    if issubclass(expected, Warning):
        assert any(issubclass(w, expected) for w in warned), (raised, warned)
    else:
        assert raised is not None and issubclass(raised, expected), (raised, warned)
    # and torch itself does the same with these inputs (the reference is current)
    t_raised, t_warned = _outcome(theirs, error)
    assert (t_raised is None) == (raised is None)
    if raised is not None:
        assert issubclass(raised, t_raised) or issubclass(t_raised, raised), (raised, t_raised)


def _pair(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2))
    return model, copy.deepcopy(model)


def _batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 5, generator=g), torch.randn(4, 2, generator=g)) for _ in range(n)]


def _train(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("ours_cls,theirs_cls", [(sb.Adam, torch.optim.Adam), (sb.AdamW, torch.optim.AdamW)])
@pytest.mark.parametrize("kwargs", [dict(lr=0.01), dict(lr=0.01, weight_decay=0.1, maximize=True)])
def test_amsgrad_matches_torch_and_checkpoints_both_ways(ours_cls, theirs_cls, kwargs):
    """amsgrad=True: the same parameters and state (``max_exp_avg_sq``) as torch's, and a
    checkpoint moves between the two in both directions."""
    ours_model, theirs_model = _pair()
    ours = ours_cls(ours_model.parameters(), amsgrad=True, **kwargs)
    theirs = theirs_cls(theirs_model.parameters(), amsgrad=True, **kwargs)
    batches = _batches(12)
    _train(ours_model, ours, batches[:6])
    _train(theirs_model, theirs, batches[:6])
    for a, b in zip(ours_model.parameters(), theirs_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for sa, sb_ in zip(ours.state_dict()["state"].values(), theirs.state_dict()["state"].values()):
        assert set(sa) == set(sb_) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
        torch.testing.assert_close(sa["max_exp_avg_sq"], sb_["max_exp_avg_sq"], rtol=1e-5, atol=1e-9)

    # ours -> torch and torch -> ours, each continuing where the other stopped
    ours_to_torch_model, torch_to_ours_model = copy.deepcopy(ours_model), copy.deepcopy(theirs_model)
    # (copies, as a file would be: torch's loader keeps the very tensors it is given)
    t2 = theirs_cls(ours_to_torch_model.parameters(), amsgrad=True, **kwargs)
    t2.load_state_dict(copy.deepcopy(ours.state_dict()))
    o2 = ours_cls(torch_to_ours_model.parameters(), amsgrad=True, **kwargs)
    o2.load_state_dict(copy.deepcopy(theirs.state_dict()))
    for model, opt in ((ours_model, ours), (theirs_model, theirs), (ours_to_torch_model, t2), (torch_to_ours_model, o2)):
        _train(model, opt, batches[6:])
    for a, b, c, d in zip(*(m.parameters() for m in (ours_model, theirs_model, ours_to_torch_model, torch_to_ours_model))):
        for other in (b, c, d):
            torch.testing.assert_close(a, other, rtol=1e-5, atol=1e-6)


def test_amsgrad_in_one_param_group_only():
    """amsgrad is per param group, as in torch: only that group keeps ``max_exp_avg_sq``."""
    ours_model, theirs_model = _pair()
    groups = lambda m: [{"params": m[0].parameters(), "amsgrad": True}, {"params": m[2].parameters()}]  # noqa: E731
    ours, theirs = sb.Adam(groups(ours_model), lr=0.01), torch.optim.Adam(groups(theirs_model), lr=0.01)
    batches = _batches(5)
    _train(ours_model, ours, batches)
    _train(theirs_model, theirs, batches)
    for a, b in zip(ours_model.parameters(), theirs_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    keys = [set(s) for s in ours.state_dict()["state"].values()]
    assert keys == [set(s) for s in theirs.state_dict()["state"].values()]
    assert "max_exp_avg_sq" in keys[0] and "max_exp_avg_sq" not in keys[-1]


@pytest.mark.parametrize("cls", [sb.SGD, sb.Adam, sb.AdamW])
def test_torch_implementation_switches_are_accepted(cls):
    """foreach / fused, as torch code passes them, change nothing (the step is always native)."""
    model, twin = _pair()
    a = cls(model.parameters(), lr=0.01, foreach=True)
    b = cls(twin.parameters(), lr=0.01, fused=True)
    batches = _batches(3)
    _train(model, a, batches)
    _train(twin, b, batches)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    assert a.param_groups[0]["foreach"] is True and b.param_groups[0]["fused"] is True
