"""Adafactor: parity with torch.optim.Adafactor, the paper's form against a plain reference, state."""

from __future__ import annotations

import copy
import io

import pytest
import torch

import smallbatch_rs as sb
from smallbatch_rs.halflife import beta_from_halflife

TORCH_COMPATIBLE = dict(eps=(None, 1e-3), min_dim_size_to_factor=1, step_size_cap=True)


class Net(torch.nn.Module):
    """2-D weights (factored), vectors (unfactored), a 3-D tensor (per-matrix factoring), a scalar."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(7, 33)
        self.b = torch.nn.Linear(33, 5)
        self.heads = torch.nn.Parameter(torch.randn(2, 3, 4))
        self.scale = torch.nn.Parameter(torch.tensor(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x))) * self.scale + self.heads.square().mean()


def _pair(seed: int = 0):
    torch.manual_seed(seed)
    m = Net()
    return m, copy.deepcopy(m)


def _batches(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 7, generator=g), torch.randn(4, 5, generator=g)) for _ in range(n)]


def _train(model, opt, batches, sign=1.0):
    for x, y in batches:
        opt.zero_grad()
        (sign * torch.nn.functional.mse_loss(model(x), y)).backward()
        opt.step()


def _close(a, b, rtol=1e-5, atol=1e-6):
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize(
    "kwargs",
    [dict(lr=1e-2), dict(lr=3e-2, weight_decay=0.05), dict(lr=1e-2, beta2_decay=-0.5, d=2.0), dict(lr=1e-2, maximize=True)],
    ids=["default", "weight_decay", "decay_and_d", "maximize"],
)
def test_matches_torch_adafactor(kwargs):
    """100 steps against torch.optim.Adafactor with matching settings: parameters and state to rtol 1e-5."""
    ours_model, theirs_model = _pair()
    ours = sb.Adafactor(ours_model.parameters(), **TORCH_COMPATIBLE, **kwargs)
    theirs = torch.optim.Adafactor(theirs_model.parameters(), **kwargs)
    batches = _batches(100)
    sign = -1.0 if kwargs.get("maximize") else 1.0
    _train(ours_model, ours, batches, sign)
    _train(theirs_model, theirs, batches, sign)
    _close(ours_model, theirs_model)
    for p, q in zip(ours_model.parameters(), theirs_model.parameters()):
        s, t = ours.state[p], theirs.state[q]
        assert s.keys() == t.keys()
        for key in s:
            torch.testing.assert_close(s[key].to(t[key].dtype), t[key], rtol=1e-5, atol=1e-9)


def test_rows_without_gradient_match_torch():
    """At batch size 1 most rows of a token embedding get no gradient; the step skips them where
    that changes nothing. Against torch.optim.Adafactor, which steps every row, with and without
    weight decay (where zero rows do move)."""
    for weight_decay in (0.0, 0.1):
        g = torch.Generator().manual_seed(3)
        shapes = [(300, 64), (2, 50, 40), (64,)]
        ours = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
        theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
        opt_ours = sb.Adafactor(ours, lr=1e-2, weight_decay=weight_decay, **TORCH_COMPATIBLE)
        opt_theirs = torch.optim.Adafactor(theirs, lr=1e-2, weight_decay=weight_decay)
        for step in range(30):
            for p, q in zip(ours, theirs):
                grad = torch.randn(p.shape, generator=g)
                if grad.dim() >= 2:
                    # a few rows (a different few each step) get a gradient, the rest none
                    keep = torch.rand(grad.shape[:-1], generator=g) < 0.1
                    grad = grad * keep.unsqueeze(-1)
                p.grad, q.grad = grad.clone(), grad.clone()
            opt_ours.step()
            opt_theirs.step()
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def _reference_adafactor(params, grads, state, *, lr, beta2, eps1, eps2, d, min_dim, beta1=0.0, weight_decay=0.0):
    """The paper's Adafactor written out plainly in float64 (an independent reference)."""
    for p, g in zip(params, grads):
        st = state.setdefault(id(p), {})
        g = g.double()
        factored = p.dim() >= 2 and min(p.shape[-2:]) >= min_dim
        sq = g * g + eps1
        if factored:
            r = st["r"] = beta2 * st.get("r", torch.zeros_like(sq.mean(-1))) + (1 - beta2) * sq.mean(-1)
            c = st["c"] = beta2 * st.get("c", torch.zeros_like(sq.mean(-2))) + (1 - beta2) * sq.mean(-2)
            v = r.unsqueeze(-1) * c.unsqueeze(-2) / r.mean(-1, keepdim=True).unsqueeze(-1)
        else:
            v = st["v"] = beta2 * st.get("v", torch.zeros_like(sq)) + (1 - beta2) * sq
        u = g / v.sqrt()
        u = u / max(1.0, float(u.square().mean().sqrt()) / d)
        if beta1:
            u = st["m"] = beta1 * st.get("m", torch.zeros_like(u)) + (1 - beta1) * u
        alpha = lr * max(eps2, float(p.detach().double().square().mean().sqrt()))
        new = p.double() * (1 - lr * weight_decay) - alpha * u
        with torch.no_grad():
            p.copy_(new.float())


@pytest.mark.parametrize("min_dim,beta1", [(128, 0.0), (3, 0.0), (3, 0.9)], ids=["unfactored", "factored", "momentum"])
def test_paper_form_matches_reference(min_dim, beta1):
    """Default (paper) settings with beta2 from t2: eps1 added to G^2, no step-size cap, against
    a float64 reference."""
    t2, tps = 2000.0, 12.0
    model, ref_model = _pair()
    kwargs = dict(t2=t2, tokens_per_step=tps, min_dim_size_to_factor=min_dim, weight_decay=0.01)
    if beta1:
        kwargs["beta1"] = beta1
    opt = sb.Adafactor(model.parameters(), lr=1e-2, **kwargs)
    beta2 = beta_from_halflife(t2, tps)
    assert opt.param_groups[0]["beta2"] == beta2
    state: dict = {}
    for x, y in _batches(30):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        ref_model.zero_grad()
        torch.nn.functional.mse_loss(ref_model(x), y).backward()
        params = list(ref_model.parameters())
        _reference_adafactor(
            params, [p.grad for p in params], state, lr=1e-2, beta2=beta2, eps1=1e-30, eps2=1e-3, d=1.0,
            min_dim=min_dim, beta1=beta1, weight_decay=0.01,
        )
    _close(model, ref_model, rtol=2e-5, atol=1e-6)
    factored = {n for n, p in model.named_parameters() if "row_var" in opt.state[p]}
    assert factored == ({"a.weight", "b.weight", "heads"} if min_dim == 3 else set())


def test_state_is_small():
    """Factored state is rows + columns, not a full second moment."""
    model = torch.nn.Linear(256, 512, bias=False)
    opt = sb.Adafactor(model.parameters())
    model(torch.randn(2, 256)).sum().backward()
    opt.step()
    st = opt.state[model.weight]
    assert st["row_var"].shape == (512, 1) and st["col_var"].shape == (1, 256)
    assert "variance" not in st and "exp_avg" not in st


@pytest.mark.parametrize("direction", ["ours_to_torch", "torch_to_ours"])
def test_checkpoint_moves_between_torch_and_ours(direction):
    batches = _batches(40)
    model, reference = _pair()
    ours_cls = lambda ps: sb.Adafactor(ps, lr=1e-2, **TORCH_COMPATIBLE)  # noqa: E731
    theirs_cls = lambda ps: torch.optim.Adafactor(ps, lr=1e-2)  # noqa: E731
    first, second = (ours_cls, theirs_cls) if direction == "ours_to_torch" else (theirs_cls, ours_cls)
    opt = first(model.parameters())
    _train(model, opt, batches[:20])
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    opt2 = second(model.parameters())
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    _train(model, opt2, batches[20:])
    ref = theirs_cls(reference.parameters())
    _train(reference, ref, batches)
    _close(model, reference)


def test_resume_is_bit_exact():
    batches = _batches(30)
    straight, model = _pair()
    kwargs = dict(lr=1e-2, t2=500.0, tokens_per_step=4, beta1=0.8, min_dim_size_to_factor=4)
    _train(straight, sb.Adafactor(straight.parameters(), **kwargs), batches)
    first = sb.Adafactor(model.parameters(), **kwargs)
    _train(model, first, batches[:15])
    buf = io.BytesIO()
    torch.save({"m": model.state_dict(), "o": first.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    resumed, _ = _pair(seed=3)
    resumed.load_state_dict(ck["m"])
    second = sb.Adafactor(resumed.parameters(), **kwargs)
    second.load_state_dict(ck["o"])
    _train(resumed, second, batches[15:])
    _close(resumed, straight, rtol=0, atol=0)


def test_bad_hyperparameters():
    p = [torch.nn.Parameter(torch.randn(3, 3))]
    with pytest.raises(ValueError, match=r"^smallbatch_rs\.Adafactor: invalid d: 0\.5 \(param group 0; must be finite and >= 1\)$"):
        sb.Adafactor(p, d=0.5)
    with pytest.raises(ValueError, match=r"invalid beta2_decay: 0\.3 \(param group 0; must be finite and <= 0"):
        sb.Adafactor(p, beta2_decay=0.3)
    with pytest.raises(ValueError, match=r"give either beta2 or the half-life t2, not both"):
        sb.Adafactor(p, beta2=0.99, t2=1e6, tokens_per_step=512)
    with pytest.raises(ValueError, match=r"invalid beta1: 1\.0 \(param group 0; must be in \[0, 1\)\)"):
        sb.Adafactor(p, beta1=1.0)
    with pytest.raises(ValueError, match=r"invalid eps2: -1 \(param group 0; must be finite and >= 0\)"):
        sb.Adafactor(p, eps=(None, -1))
    with pytest.raises(ValueError, match=r"invalid min_dim_size_to_factor: -2"):
        sb.Adafactor(p, min_dim_size_to_factor=-2)
