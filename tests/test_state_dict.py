"""Checkpoints in torch's layout: round trips with torch.optim in both directions, and resume."""

from __future__ import annotations

import io

import pytest
import torch

import smallbatch_rs as sb
from conftest import assert_models_close, make_batches, make_pair, train


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize(
    "ours_cls,theirs_cls,kwargs",
    [
        (sb.AdamW, torch.optim.AdamW, dict(lr=2e-3, weight_decay=0.05)),
        (sb.Adam, torch.optim.Adam, dict(lr=2e-3, betas=(0.8, 0.99))),
        (sb.SGD, torch.optim.SGD, dict(lr=0.02, momentum=0.9, nesterov=True)),
    ],
)
@pytest.mark.parametrize("direction", ["ours_to_torch", "torch_to_ours"])
def test_checkpoint_moves_between_torch_and_ours(ours_cls, theirs_cls, kwargs, direction):
    """Train N steps with one implementation, save, load into the other, continue: equals an
    uninterrupted torch run."""
    first_cls, second_cls = (ours_cls, theirs_cls) if direction == "ours_to_torch" else (theirs_cls, ours_cls)
    batches = make_batches(60)
    model, reference_model = make_pair()

    first = first_cls(model.parameters(), **kwargs)
    list(train(model, first, batches[:30]))
    checkpoint = _roundtrip({"model": model.state_dict(), "opt": first.state_dict()})

    resumed_model, _ = make_pair(seed=123)
    resumed_model.load_state_dict(checkpoint["model"])
    second = second_cls(resumed_model.parameters(), **kwargs)
    second.load_state_dict(checkpoint["opt"])
    list(train(resumed_model, second, batches[30:]))

    reference = theirs_cls(reference_model.parameters(), **kwargs)
    list(train(reference_model, reference, batches))
    assert_models_close(resumed_model, reference_model)


def test_state_dict_layout_matches_torch():
    model, twin = make_pair()
    ours = sb.AdamW(model.parameters(), lr=1e-3)
    theirs = torch.optim.AdamW(twin.parameters(), lr=1e-3)
    batches = make_batches(3)
    list(train(model, ours, batches))
    list(train(twin, theirs, batches))
    sd_ours, sd_theirs = ours.state_dict(), theirs.state_dict()
    assert sd_ours["state"].keys() == sd_theirs["state"].keys()
    for k in sd_theirs["state"]:
        assert sd_ours["state"][k].keys() == sd_theirs["state"][k].keys() == {"step", "exp_avg", "exp_avg_sq"}
        assert sd_ours["state"][k]["step"].dim() == 0
        assert sd_ours["state"][k]["exp_avg"].shape == sd_theirs["state"][k]["exp_avg"].shape
    g_ours, g_theirs = sd_ours["param_groups"][0], sd_theirs["param_groups"][0]
    for key in ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "decoupled_weight_decay", "params"):
        assert g_ours[key] == g_theirs[key], key


def test_resume_is_bit_exact():
    """N steps, save, load into a fresh optimizer and model, N more: equal to 2N uninterrupted steps."""
    batches = make_batches(40)
    straight, model = make_pair()
    opt = sb.AdamW(straight.parameters(), lr=3e-3, t2=1e4, tokens_per_step=12)
    list(train(straight, opt, batches))

    first = sb.AdamW(model.parameters(), lr=3e-3, t2=1e4, tokens_per_step=12)
    list(train(model, first, batches[:20]))
    checkpoint = _roundtrip({"model": model.state_dict(), "opt": first.state_dict()})
    resumed, _ = make_pair(seed=7)
    resumed.load_state_dict(checkpoint["model"])
    second = sb.AdamW(resumed.parameters(), lr=1.0)  # hyperparameters come from the checkpoint
    second.load_state_dict(checkpoint["opt"])
    assert second.param_groups[0]["lr"] == 3e-3 and second.param_groups[0]["t2"] == 1e4
    list(train(resumed, second, batches[20:]))
    assert_models_close(resumed, straight, rtol=0, atol=0)


def test_state_views_share_the_flat_buffers():
    """state_dict() copies nothing: its tensors are views of the buffers the native step updates."""
    model, _ = make_pair()
    opt = sb.Adam(model.parameters(), lr=1e-3)
    list(train(model, opt, make_batches(2)))
    tg = opt._tables[0]
    for p in model.parameters():
        st = opt.state[p]
        assert st["exp_avg"].untyped_storage().data_ptr() == tg.state_flat["exp_avg"].untyped_storage().data_ptr()
        assert st["step"].untyped_storage().data_ptr() == tg.steps.untyped_storage().data_ptr()
    before = {id(p): opt.state[p]["exp_avg"].clone() for p in model.parameters()}
    list(train(model, opt, make_batches(1, seed=5)))
    assert any(not torch.equal(before[id(p)], opt.state[p]["exp_avg"]) for p in model.parameters())


def test_load_own_state_dict_in_place():
    """Loading a state_dict whose tensors are this optimizer's own views is harmless."""
    model, twin = make_pair()
    opt = sb.AdamW(model.parameters(), lr=1e-3)
    ref = torch.optim.AdamW(twin.parameters(), lr=1e-3)
    batches = make_batches(20)
    list(train(model, opt, batches[:10]))
    list(train(twin, ref, batches[:10]))
    opt.load_state_dict(opt.state_dict())
    list(train(model, opt, batches[10:]))
    list(train(twin, ref, batches[10:]))
    assert_models_close(model, twin)


def test_loading_empty_state_resets():
    model, twin = make_pair()
    opt = sb.Adam(model.parameters(), lr=1e-3)
    list(train(model, opt, make_batches(5)))
    fresh = sb.Adam(twin.parameters(), lr=1e-3)
    opt.load_state_dict(fresh.state_dict())
    assert len(opt.state) == 0
    assert float(opt._tables[0].steps.abs().sum()) == 0.0
    # A reset optimizer behaves like a new one from here on.
    twin.load_state_dict(model.state_dict())
    batches = make_batches(5, seed=3)
    list(train(model, opt, batches))
    list(train(twin, fresh, batches))
    assert_models_close(model, twin, rtol=0, atol=0)


_COPYABLE = {
    "AdamW": (lambda ps: sb.AdamW(ps, lr=1e-2, t2=1e4, tokens_per_step=64), torch.float32),
    "SGD": (lambda ps: sb.SGD(ps, lr=0.1, momentum=0.9), torch.float32),
    "Adafactor": (lambda ps: sb.Adafactor(ps, min_dim_size_to_factor=8, beta1=0.9), torch.float32),
    "AdafactorSR": (lambda ps: sb.AdafactorSR(ps, min_dim_size_to_factor=8, seed=3), torch.bfloat16),
    "Muon": (lambda ps: sb.Muon(ps, lr=0.02), torch.float32),
}


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("name", sorted(_COPYABLE))
def test_a_copied_optimizer_steps_as_the_original(name, how):
    """copy.deepcopy and pickle give an optimizer with its own flat buffers and the original's
    state: stepped with the same gradients, it gives the original's bits and leaves the original
    untouched."""
    import copy
    import pickle

    make, dtype = _COPYABLE[name]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 130), torch.nn.Linear(130, 7)).to(dtype)
    opt = make(model.parameters())
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(3, 40, generator=g).to(dtype)).float().square().mean().backward()
        opt.step()
    twin = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    before = [p.detach().clone() for p in model.parameters()]

    def step_twice(o):
        params = [p for group in o.param_groups for p in group["params"]]
        for _ in range(2):
            for k, p in enumerate(params):
                p.grad = torch.full_like(p, 0.01 * (k + 1))
            o.step()
        return params

    copied = step_twice(twin)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before)), "stepping the copy moved the original"
    original = step_twice(opt)
    for k, (a, b) in enumerate(zip(original, copied)):
        assert torch.equal(a, b), f"parameter {k} differs"
    ours, theirs = opt.state_dict()["state"], twin.state_dict()["state"]
    assert ours.keys() == theirs.keys()
    for key in ours:
        for field, value in ours[key].items():
            other = theirs[key][field]
            same = torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other
            assert same, f"state {key} {field}"
