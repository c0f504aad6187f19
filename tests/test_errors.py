"""Bad input: every rejected argument, parameter or state raises the right exception type with a
message that names the culprit, and a rejection leaves the optimizer and the parameters as they were.

Messages are pinned exactly (``str(exc) == ...``) or with ``re.escape`` so that a reworded message
is a deliberate change. Cases that the library gets wrong today are kept with the correct
assertion and marked ``xfail(strict=True)``.
"""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from torch import nn

import smallbatch_rs as sb
from smallbatch_rs import halflife

ALL = [sb.SGD, sb.Adam, sb.AdamW]
ADAMS = [sb.Adam, sb.AdamW]
NAN, INF = float("nan"), float("inf")


def _params(*shapes):
    shapes = shapes or ((3, 2),)
    return [nn.Parameter(torch.randn(*s)) for s in shapes]


def _name(cls) -> str:
    return f"smallbatch_rs.{cls.__name__}"


def _raises_exactly(exc_type, message):
    """``pytest.raises`` that matches the whole message, not a prefix."""
    return pytest.raises(exc_type, match="^" + re.escape(message) + "$")


def _snapshot(params):
    """What must not change when an optimizer rejects something: object, storage, values, grad."""
    return [(p, p.data_ptr(), p.detach().clone(), p.grad) for p in params]


def _assert_untouched(snapshot):
    for p, ptr, values, grad in snapshot:
        assert p.data_ptr() == ptr, "parameter storage was moved by a rejected call"
        assert torch.equal(p.detach(), values), "parameter values changed by a rejected call"
        assert p.grad is grad, "parameter .grad was replaced by a rejected call"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --- hyperparameters given to the constructor -----------------------------------------------


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("lr,shown", [(-1.0, "-1.0"), (NAN, "nan"), (INF, "inf"), (-INF, "-inf")])
def test_invalid_lr(cls, lr, shown):
    """Negative, NaN and infinite learning rates are a ValueError naming lr and its value."""
    with _raises_exactly(ValueError, f"{_name(cls)}: invalid lr: {shown} (param group 0; must be finite and >= 0)"):
        cls(_params(), lr=lr)


@pytest.mark.parametrize("cls", ALL)
def test_invalid_tensor_lr(cls):
    """A negative 0-dim tensor lr is rejected like a float one."""
    with _raises_exactly(
        ValueError, f"{_name(cls)}: invalid lr: tensor(-1.) (param group 0; must be finite and >= 0)"
    ):
        cls(_params(), lr=torch.tensor(-1.0))


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("wd,shown", [(-0.1, "-0.1"), (NAN, "nan"), (INF, "inf")])
def test_invalid_weight_decay(cls, wd, shown):
    """weight_decay must be finite and >= 0."""
    with _raises_exactly(
        ValueError, f"{_name(cls)}: invalid weight_decay: {shown} (param group 0; must be finite and >= 0)"
    ):
        cls(_params(), weight_decay=wd)


@pytest.mark.parametrize("cls", ADAMS)
@pytest.mark.parametrize(
    "betas,which,shown",
    [
        ((-0.1, 0.999), "beta1", "-0.1"),
        ((1.0, 0.999), "beta1", "1.0"),
        ((1.5, 0.999), "beta1", "1.5"),
        ((NAN, 0.999), "beta1", "nan"),
        ((0.9, -0.1), "beta2", "-0.1"),
        ((0.9, 1.0), "beta2", "1.0"),
        ((0.9, INF), "beta2", "inf"),
        ((0.9, NAN), "beta2", "nan"),
    ],
)
def test_betas_out_of_range(cls, betas, which, shown):
    """Each beta must lie in [0, 1); the error says which one (beta1 or beta2)."""
    with _raises_exactly(ValueError, f"{_name(cls)}: invalid {which}: {shown} (param group 0; must be in [0, 1))"):
        cls(_params(), betas=betas)


@pytest.mark.parametrize("cls", ADAMS)
@pytest.mark.parametrize("betas", [(0.9,), (0.9, 0.99, 0.999), ()])
def test_betas_not_a_pair(cls, betas):
    """betas of the wrong length is a ValueError naming betas."""
    with _raises_exactly(
        ValueError, f"{_name(cls)}: invalid betas: {betas!r} (param group 0; must be a pair (beta1, beta2))"
    ):
        cls(_params(), betas=betas)


@pytest.mark.parametrize("cls", ADAMS)
def test_betas_scalar_names_betas(cls):
    """betas=0.9 (not a pair) is reported like any other malformed betas."""
    with _raises_exactly(ValueError, f"{_name(cls)}: invalid betas: 0.9 (param group 0; must be a pair (beta1, beta2))"):
        cls(_params(), betas=0.9)


@pytest.mark.parametrize("cls", ADAMS)
@pytest.mark.parametrize("eps,shown", [(-1e-8, "-1e-08"), (NAN, "nan"), (INF, "inf")])
def test_invalid_eps(cls, eps, shown):
    """eps must be finite and >= 0."""
    with _raises_exactly(ValueError, f"{_name(cls)}: invalid eps: {shown} (param group 0; must be finite and >= 0)"):
        cls(_params(), eps=eps)


@pytest.mark.parametrize(
    "kwargs,name,shown",
    [
        (dict(momentum=-0.1), "momentum", "-0.1"),
        (dict(momentum=NAN), "momentum", "nan"),
        (dict(momentum=0.9, dampening=-0.1), "dampening", "-0.1"),
        (dict(momentum=0.9, dampening=INF), "dampening", "inf"),
    ],
)
def test_sgd_invalid_momentum_dampening(kwargs, name, shown):
    """SGD's momentum and dampening must be finite and >= 0."""
    with _raises_exactly(
        ValueError, f"smallbatch_rs.SGD: invalid {name}: {shown} (param group 0; must be finite and >= 0)"
    ):
        sb.SGD(_params(), lr=0.1, **kwargs)


@pytest.mark.parametrize(
    "kwargs,shown",
    [
        (dict(nesterov=True), "momentum=0.0, dampening=0.0"),
        (dict(nesterov=True, momentum=0.0), "momentum=0.0, dampening=0.0"),
        (dict(nesterov=True, momentum=0.9, dampening=0.1), "momentum=0.9, dampening=0.1"),
    ],
)
def test_sgd_nesterov_requirements(kwargs, shown):
    """Nesterov needs momentum > 0 and dampening == 0; the message shows both values."""
    with _raises_exactly(
        ValueError,
        f"smallbatch_rs.SGD: Nesterov momentum requires a momentum and zero dampening (param group 0: {shown})",
    ):
        sb.SGD(_params(), lr=0.1, **kwargs)


# --- half-lives given to the constructor -----------------------------------------------------


@pytest.mark.parametrize("cls", ADAMS)
@pytest.mark.parametrize("halflives", [dict(t1=100.0), dict(t2=1000.0), dict(t1=100.0, t2=1000.0)])
def test_betas_and_halflives_together(cls, halflives):
    """Giving betas and t1/t2 to the constructor is ambiguous and rejected."""
    with _raises_exactly(ValueError, f"{_name(cls)}: give either betas or the half-lives t1/t2, not both"):
        cls(_params(), betas=(0.9, 0.99), tokens_per_step=10, **halflives)


@pytest.mark.parametrize("cls", ADAMS)
@pytest.mark.parametrize("hl", ["t1", "t2"])
def test_betas_and_halflife_in_one_param_group(cls, hl):
    """Giving betas and a half-life inside one param group dict names the half-life and the group."""
    groups = [{"params": _params()}, {"params": _params(), "betas": (0.9, 0.99), hl: 1000.0}]
    with _raises_exactly(ValueError, f"{_name(cls)}: give either betas or the half-life {hl}, not both (param group 1)"):
        cls(groups, tokens_per_step=10)


def test_sgd_momentum_and_t1_together():
    """SGD: momentum and its half-life t1 together are rejected, in the constructor and in a group."""
    with _raises_exactly(ValueError, "smallbatch_rs.SGD: give either momentum or the half-life t1, not both"):
        sb.SGD(_params(), momentum=0.9, t1=100.0, tokens_per_step=10)
    with _raises_exactly(ValueError, "smallbatch_rs.SGD: give either momentum or the half-life t1, not both (param group 0)"):
        sb.SGD([{"params": _params(), "momentum": 0.9, "t1": 100.0}], tokens_per_step=10)


@pytest.mark.parametrize(
    "cls,hl",
    [(sb.SGD, "t1"), (sb.Adam, "t1"), (sb.Adam, "t2"), (sb.AdamW, "t1"), (sb.AdamW, "t2")],
)
def test_halflife_without_tokens_per_step(cls, hl):
    """A half-life in tokens without tokens_per_step cannot be turned into a coefficient."""
    with _raises_exactly(
        ValueError,
        f"{_name(cls)}: {hl}=100 is a half-life in tokens and needs tokens_per_step "
        "(tokens per optimizer step = batch size x sequence length)",
    ):
        cls(_params(), **{hl: 100})


@pytest.mark.parametrize(
    "cls,hl",
    [(sb.SGD, "t1"), (sb.Adam, "t1"), (sb.Adam, "t2"), (sb.AdamW, "t2")],
)
@pytest.mark.parametrize("value,shown", [(0, "0"), (-5, "-5"), (NAN, "nan"), (INF, "inf")])
def test_invalid_halflife(cls, hl, value, shown):
    """Half-lives must be finite and > 0."""
    with _raises_exactly(
        ValueError,
        f"{_name(cls)}: invalid {hl}: {shown} (param group 0; must be a finite half-life in tokens > 0)",
    ):
        cls(_params(), tokens_per_step=10, **{hl: value})


@pytest.mark.parametrize("cls,hl", [(sb.SGD, "t1"), (sb.Adam, "t2"), (sb.AdamW, "t2")])
@pytest.mark.parametrize("value,shown", [(0, "0"), (-1, "-1"), (NAN, "nan"), (INF, "inf")])
def test_invalid_tokens_per_step(cls, hl, value, shown):
    """tokens_per_step must be finite and > 0, with or without a half-life that needs it."""
    message = f"{_name(cls)}: invalid tokens_per_step: {shown} (param group 0; must be finite and > 0)"
    with _raises_exactly(ValueError, message):
        cls(_params(), tokens_per_step=value, **{hl: 1000.0})
    with _raises_exactly(ValueError, message):
        cls(_params(), tokens_per_step=value)


@pytest.mark.parametrize("cls,hl", [(sb.SGD, "t1"), (sb.Adam, "t2"), (sb.AdamW, "t2")])
@pytest.mark.parametrize("value,shown", [(0, "0"), (-10, "-10"), (NAN, "nan")])
def test_set_tokens_per_step_invalid(cls, hl, value, shown):
    """set_tokens_per_step(bad) is a ValueError and leaves every group's coefficients as they were."""
    opt = cls([{"params": _params()}, {"params": _params()}], tokens_per_step=16, **{hl: 1000.0})
    before = copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])
    with _raises_exactly(
        ValueError, f"{_name(cls)}: invalid tokens_per_step: {shown} (param group 0; must be finite and > 0)"
    ):
        opt.set_tokens_per_step(value)
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == before


# --- param groups -----------------------------------------------------------------------------


@pytest.mark.parametrize("cls", ALL)
def test_param_group_with_bad_lr_names_the_group(cls):
    """A bad lr in the second param group dict names "param group 1"."""
    with _raises_exactly(ValueError, f"{_name(cls)}: invalid lr: -1 (param group 1; must be finite and >= 0)"):
        cls([{"params": _params()}, {"params": _params(), "lr": -1}], lr=0.1)


@pytest.mark.parametrize("cls", ALL)
def test_empty_parameter_list(cls):
    """No parameters at all: torch's own ValueError; an empty added group names its index."""
    with _raises_exactly(ValueError, "optimizer got an empty parameter list"):
        cls([])
    opt = cls(_params())
    with _raises_exactly(ValueError, f"{_name(cls)}: param group 1 has no parameters"):
        opt.add_param_group({"params": []})
    assert len(opt.param_groups) == 1 and len(opt._tables) == 1


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_complex_parameters(cls, dtype):
    """Complex parameters are a TypeError naming the parameter and its dtype."""
    with _raises_exactly(
        TypeError,
        f"{_name(cls)} does not support complex parameters: parameter 0 (param group 0, index 0, shape (3,)) is {dtype}",
    ):
        cls([nn.Parameter(torch.randn(3, dtype=dtype))])


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_unsupported_float_dtypes(cls, dtype):
    """float64 / float16 parameters are a TypeError naming the dtype and the parameter."""
    params = [nn.Parameter(torch.randn(2, 2)), nn.Parameter(torch.randn(4, dtype=dtype))]
    snap = _snapshot(params)
    with _raises_exactly(
        TypeError,
        f"{_name(cls)} supports float32 and bfloat16 parameters: parameter 1 (param group 0, index 1, shape (4,)) is {dtype}",
    ):
        cls(params)
    _assert_untouched(snap)


@pytest.mark.parametrize("cls", ALL)
def test_group_mixing_float32_and_bfloat16(cls):
    """One flat buffer holds one dtype: a group mixing float32 and bfloat16 is a TypeError."""
    params = [nn.Parameter(torch.randn(2, 2)), nn.Parameter(torch.randn(4, dtype=torch.bfloat16))]
    snap = _snapshot(params)
    with _raises_exactly(
        TypeError, f"{_name(cls)}: param group 0 mixes dtypes ['torch.bfloat16', 'torch.float32']"
    ):
        cls(params)
    _assert_untouched(snap)


@pytest.mark.parametrize("cls", ALL)
def test_parameters_on_different_devices(cls):
    """A group mixing CPU and meta parameters is a RuntimeError listing both devices."""
    params = [nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(3, device="meta"))]
    snap = _snapshot(params[:1])
    with _raises_exactly(
        RuntimeError,
        f"{_name(cls)}: param group 0 has parameters on different devices (cpu, meta); "
        "put each device's parameters in a group of their own",
    ):
        cls(params)
    _assert_untouched(snap)


@pytest.mark.parametrize("cls", ALL)
def test_non_cpu_group(cls):
    """A group on a device this build does not step (meta) is a RuntimeError naming parameter and device."""
    with _raises_exactly(
        RuntimeError,
        f"{_name(cls)}: parameter 0 (param group 0, index 0, shape (2, 3)) is on meta; "
        "only CPU and CUDA parameters are supported",
    ):
        cls([nn.Parameter(torch.randn(2, 3, device="meta"))])


# --- gradients --------------------------------------------------------------------------------


def _sparse_embedding():
    return nn.Embedding(10, 4, sparse=True)


def _sparse_message(cls, who="parameter 0"):
    return (
        f"{_name(cls)} does not support sparse gradients: {who} (param group 0, index 0, shape (10, 4)) "
        "has a torch.sparse_coo gradient (for an embedding, use sparse=False)"
    )


@pytest.mark.parametrize("cls", ALL)
def test_sparse_gradient_present_at_construction(cls):
    """A parameter that already holds a sparse gradient is rejected at the first step, by name;
    nothing moves."""
    emb = _sparse_embedding()
    emb(torch.tensor([1, 2])).sum().backward()
    opt = cls(emb.parameters(), lr=0.1)
    before = emb.weight.detach().clone()
    with _raises_exactly(RuntimeError, _sparse_message(cls)):
        opt.step()
    assert torch.equal(emb.weight.detach(), before) and opt.state_dict()["state"] == {}


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("zero_grad", ["model", "optimizer"])
def test_sparse_gradient_in_ordinary_loop(cls, zero_grad):
    """Embedding(sparse=True) in a plain training loop: backward works as in torch, and step()
    raises naming the parameter; the parameter is untouched and a dense gradient steps again."""
    emb = _sparse_embedding()
    opt = cls(emb.named_parameters(), lr=0.1)
    before = emb.weight.detach().clone()
    (emb if zero_grad == "model" else opt).zero_grad()
    emb(torch.tensor([1, 2])).sum().backward()
    with _raises_exactly(RuntimeError, _sparse_message(cls, "parameter 'weight'")):
        opt.step()
    assert torch.equal(emb.weight.detach(), before)
    emb.weight.grad = torch.ones_like(emb.weight)
    opt.step()
    assert not torch.equal(emb.weight.detach(), before)


def _param_with_float64_grad(shape=(3, 2)):
    p = nn.Parameter(torch.randn(*shape))
    p.grad = torch.zeros_like(p)
    p.grad.data = torch.zeros(p.shape, dtype=torch.float64)  # torch lets .data change the dtype
    assert p.grad.dtype == torch.float64
    return p


@pytest.mark.parametrize("cls", ALL)
def test_gradient_dtype_differs_from_parameter(cls):
    """A float64 gradient on a float32 parameter is a TypeError at step naming the parameter and
    both dtypes."""
    opt = cls([_param_with_float64_grad()])
    with _raises_exactly(
        TypeError,
        f"{_name(cls)}: gradient of parameter 0 (param group 0, index 0, shape (3, 2)) is torch.float64 "
        "but the parameter is torch.float32",
    ):
        opt.step()


@pytest.mark.parametrize("cls", ALL)
def test_gradient_dtype_assigned_after_construction(cls):
    """A float64 gradient slipped in after a step is caught at the next step, parameters unchanged."""
    p = nn.Parameter(torch.randn(3, 2))
    opt = cls([p], lr=0.1)
    p.grad = torch.ones_like(p)
    opt.step()
    before = p.detach().clone()
    p.grad.data = torch.ones(p.shape, dtype=torch.float64)
    with _raises_exactly(
        TypeError,
        f"{_name(cls)}: gradient of parameter 0 (param group 0, index 0, shape (3, 2)) is torch.float64 "
        "but the parameter is torch.float32",
    ):
        opt.step()
    assert torch.equal(p.detach(), before)


@pytest.mark.parametrize("cls", ALL)
def test_rejected_gradient_leaves_parameters_in_place(cls):
    """A group rejected because of a gradient does not move any of its parameters or grads."""
    ok = nn.Parameter(torch.randn(3))
    ok.grad = torch.ones(3)
    params = [ok, _param_with_float64_grad()]
    snap = _snapshot(params)
    opt = cls(params)
    with pytest.raises(TypeError, match=re.escape("gradient of parameter 1 (param group 0, index 1, shape (3, 2))")):
        opt.step()
    _assert_untouched(snap)


# --- named parameters ---------------------------------------------------------------------------


@pytest.mark.parametrize("cls", ALL)
def test_named_parameters_name_the_culprit(cls):
    """Built from model.named_parameters(), errors say "parameter 'weight'" instead of an index."""
    model = nn.Linear(3, 2).double()
    with _raises_exactly(
        TypeError,
        f"{_name(cls)} supports float32 and bfloat16 parameters: parameter 'weight' (param group 0, index 0, shape (2, 3)) "
        "is torch.float64",
    ):
        cls(model.named_parameters())

    meta = nn.Linear(3, 2, device="meta")
    with _raises_exactly(
        RuntimeError,
        f"{_name(cls)}: parameter 'weight' (param group 0, index 0, shape (2, 3)) is on meta; "
        "only CPU and CUDA parameters are supported",
    ):
        cls(meta.named_parameters())

    model = nn.Linear(3, 2)
    model.bias.grad = torch.zeros_like(model.bias)
    model.bias.grad.data = torch.zeros(2, dtype=torch.float64)
    opt = cls(model.named_parameters())
    with _raises_exactly(
        TypeError,
        f"{_name(cls)}: gradient of parameter 'bias' (param group 0, index 1, shape (2,)) is torch.float64 "
        "but the parameter is torch.float32",
    ):
        opt.step()


@pytest.mark.parametrize("cls", ALL)
def test_named_parameters_in_added_group(cls):
    """add_param_group with param_names uses those names in its errors."""
    model = nn.Linear(3, 2)
    opt = cls(model.named_parameters())
    extra = nn.Parameter(torch.randn(3, dtype=torch.float64))
    with _raises_exactly(
        TypeError,
        f"{_name(cls)} supports float32 and bfloat16 parameters: parameter 'extra' (param group 1, index 0, shape (3,)) "
        "is torch.float64",
    ):
        opt.add_param_group({"params": [extra], "param_names": ["extra"]})


# --- rejected add_param_group leaves everything as it was ---------------------------------------


def _bad_group_cases():
    """(id, factory returning (group dict, parameters to watch), exception type, message fragment)."""

    def bad_lr():
        p = _params((4,))
        return {"params": p, "lr": -1.0}, p

    def mixed_devices():
        p = nn.Parameter(torch.randn(4))
        return {"params": [p, nn.Parameter(torch.randn(4, device="meta"))]}, [p]

    def float64():
        p = [nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(4, dtype=torch.float64))]
        return {"params": p}, p

    def complex_():
        p = [nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(4, dtype=torch.complex64))]
        return {"params": p}, p

    def meta():
        return {"params": [nn.Parameter(torch.randn(4, device="meta"))]}, []

    def halflife_without_tps():
        p = _params((4,))
        return {"params": p, "t1": 100.0, "tokens_per_step": None}, p

    return [
        ("bad_lr", bad_lr, ValueError, "invalid lr: -1.0 (param group 1; must be finite and >= 0)"),
        ("mixed_devices", mixed_devices, RuntimeError, "param group 1 has parameters on different devices (cpu, meta)"),
        ("float64", float64, TypeError, "parameter 1 (param group 1, index 1, shape (4,)) is torch.float64"),
        ("complex", complex_, TypeError, "parameter 1 (param group 1, index 1, shape (4,)) is torch.complex64"),
        ("meta", meta, RuntimeError, "parameter 0 (param group 1, index 0, shape (4,)) is on meta"),
        ("halflife_without_tps", halflife_without_tps, ValueError, "t1=100.0 is a half-life in tokens and needs tokens_per_step"),
    ]


def _check_rejected_group_leaves_optimizer_intact(cls, factory, exc_type, fragment):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = cls(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    groups_before = list(opt.param_groups)
    params_before = [list(g["params"]) for g in opt.param_groups]
    tables_before = list(opt._tables)
    state_before = {k: {n: v.clone() for n, v in s.items()} for k, s in opt.state_dict()["state"].items()}

    group, watched = factory()
    snap = _snapshot(watched)
    with pytest.raises(exc_type, match=re.escape(fragment)):
        opt.add_param_group(group)

    assert len(opt.param_groups) == len(groups_before)
    assert all(a is b for a, b in zip(opt.param_groups, groups_before))
    assert [list(g["params"]) for g in opt.param_groups] == params_before
    assert opt._tables == tables_before
    _assert_untouched(snap)
    state_after = opt.state_dict()["state"]
    assert state_after.keys() == state_before.keys()
    for k in state_before:
        for n in state_before[k]:
            assert torch.equal(state_after[k][n], state_before[k][n])
    # The optimizer still works: another step moves the original parameters.
    before = model.weight.detach().clone()
    opt.zero_grad()
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    assert not torch.equal(model.weight.detach(), before)


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("case", _bad_group_cases(), ids=lambda c: c[0])
def test_rejected_add_param_group_leaves_optimizer_intact(cls, case):
    """A rejected add_param_group keeps the previous groups, tables and state, and does not move
    the rejected parameters' data or replace their grads."""
    _, factory, exc_type, fragment = case
    _check_rejected_group_leaves_optimizer_intact(cls, factory, exc_type, fragment)


def _grad_dtype_group():
    ok = nn.Parameter(torch.randn(4))
    ok.grad = torch.ones(4)
    bad = _param_with_float64_grad((4,))
    return {"params": [ok, bad]}, [ok, bad]


def _sparse_grad_group():
    emb = _sparse_embedding()
    emb(torch.tensor([1, 2])).sum().backward()
    return {"params": [emb.weight]}, [emb.weight]


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize(
    "factory,exc_type,fragment",
    [
        (_grad_dtype_group, TypeError, "gradient of parameter 1 (param group 1, index 1, shape (4,)) is torch.float64"),
        (_sparse_grad_group, RuntimeError, "parameter 0 (param group 1, index 0, shape (10, 4)) has a torch.sparse_coo gradient"),
    ],
    ids=["grad_dtype", "sparse_grad"],
)
def test_bad_gradient_in_a_later_group_steps_nothing(cls, factory, exc_type, fragment):
    """A group whose gradient cannot be stepped is added (gradients are checked when they are
    used, as torch.optim does) and step() then raises naming it, before any group moved: the
    earlier group's parameters and state are as they were, and the bad group's too."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = cls(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    model(torch.randn(4, 3)).sum().backward()
    group, watched = factory()
    opt.add_param_group(group)
    state_before = _state_copy(opt)
    snap = _snapshot(list(model.parameters()) + watched)
    with pytest.raises(exc_type, match=re.escape(fragment)):
        opt.step()
    _assert_untouched(snap)
    _assert_state_equal(_state_copy(opt), state_before)


# --- bad hyperparameters set later, caught at step() -----------------------------------------


def _two_steps_model(cls, groups=1, **kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    if groups == 1:
        opt = cls(model.parameters(), lr=0.1, **kwargs)
    else:
        opt = cls([{"params": model[0].parameters()}, {"params": model[1].parameters()}], lr=0.1, **kwargs)
    model(torch.randn(4, 3)).pow(2).sum().backward()
    opt.step()
    opt.zero_grad()
    model(torch.randn(4, 3)).pow(2).sum().backward()
    return model, opt


def _state_copy(opt):
    return {k: {n: v.clone() for n, v in s.items()} for k, s in opt.state_dict()["state"].items()}


def _assert_state_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].keys() == b[k].keys()
        for n in a[k]:
            assert torch.equal(a[k][n], b[k][n]), f"state {k}/{n} changed"


LATER_CASES = [
    (sb.SGD, "lr", -1, "invalid lr: -1 (param group 0; must be finite and >= 0)"),
    (sb.SGD, "lr", NAN, "invalid lr: nan (param group 0; must be finite and >= 0)"),
    (sb.SGD, "momentum", -0.5, "invalid momentum: -0.5 (param group 0; must be finite and >= 0)"),
    (sb.SGD, "nesterov", True, "Nesterov momentum requires a momentum and zero dampening (param group 0: momentum=0.9, dampening=0.5)"),
    (sb.Adam, "lr", -1, "invalid lr: -1 (param group 0; must be finite and >= 0)"),
    (sb.Adam, "lr", torch.tensor(INF), "invalid lr: tensor(inf) (param group 0; must be finite and >= 0)"),
    (sb.Adam, "betas", (0.9, 1.0), "invalid beta2: 1.0 (param group 0; must be in [0, 1))"),
    (sb.Adam, "betas", 0.9, "invalid betas: 0.9 (param group 0; must be a pair (beta1, beta2))"),
    (sb.Adam, "eps", -1.0, "invalid eps: -1.0 (param group 0; must be finite and >= 0)"),
    (sb.AdamW, "lr", -1, "invalid lr: -1 (param group 0; must be finite and >= 0)"),
    (sb.AdamW, "weight_decay", -0.1, "invalid weight_decay: -0.1 (param group 0; must be finite and >= 0)"),
    (sb.AdamW, "betas", (-0.1, 0.9), "invalid beta1: -0.1 (param group 0; must be in [0, 1))"),
]


@pytest.mark.parametrize(
    "cls,key,value,tail", LATER_CASES, ids=[f"{c.__name__}-{k}-{v}" for c, k, v, _ in LATER_CASES]
)
def test_bad_hyperparameter_set_later_is_caught_at_step(cls, key, value, tail):
    """group[key] = bad before step(): ValueError naming the group; parameters and state unchanged;
    after restoring the value the next step is exactly the step that was refused."""
    kwargs = dict(momentum=0.9, dampening=0.5) if cls is sb.SGD else {}
    model, opt = _two_steps_model(cls, **kwargs)
    reference, ref_opt = _two_steps_model(cls, **kwargs)
    params_before = [p.detach().clone() for p in model.parameters()]
    state_before = _state_copy(opt)

    good = opt.param_groups[0][key]
    opt.param_groups[0][key] = value
    with _raises_exactly(ValueError, f"{_name(cls)}: {tail}"):
        opt.step()
    for p, before in zip(model.parameters(), params_before):
        assert torch.equal(p.detach(), before)
    _assert_state_equal(_state_copy(opt), state_before)

    opt.param_groups[0][key] = good
    opt.step()
    ref_opt.step()
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("cls", ALL)
def test_bad_lr_in_second_group_steps_nothing(cls):
    """group 1 lr = -1: step() raises naming param group 1 and no parameter of any group moved."""
    kwargs = dict(momentum=0.9) if cls is sb.SGD else {}
    model, opt = _two_steps_model(cls, groups=2, **kwargs)
    params_before = [p.detach().clone() for p in model.parameters()]
    state_before = _state_copy(opt)
    opt.param_groups[1]["lr"] = -1
    with _raises_exactly(ValueError, f"{_name(cls)}: invalid lr: -1 (param group 1; must be finite and >= 0)"):
        opt.step()
    _assert_state_equal(_state_copy(opt), state_before)
    for p, before in zip(model.parameters(), params_before):
        assert torch.equal(p.detach(), before)


# --- load_state_dict ----------------------------------------------------------------------------


def _trained_adam():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = sb.Adam(model.named_parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize(
    "mutate,message",
    [
        (
            lambda sd: sd["state"][1].__setitem__("exp_avg_sq", torch.zeros(5)),
            "smallbatch_rs.Adam: loaded state 'exp_avg_sq' of parameter 'bias' (param group 0, index 1, shape (2,)) "
            "has shape (5,), expected (2,)",
        ),
        (
            lambda sd: sd["state"][0].__setitem__("exp_avg", torch.zeros(3, 2)),
            "smallbatch_rs.Adam: loaded state 'exp_avg' of parameter 'weight' (param group 0, index 0, shape (2, 3)) "
            "has shape (3, 2), expected (2, 3)",
        ),
        (
            lambda sd: sd["state"][0].__setitem__("exp_avg", "oops"),
            "smallbatch_rs.Adam: loaded state 'exp_avg' of parameter 'weight' (param group 0, index 0, shape (2, 3)) "
            "has shape str, expected (2, 3)",
        ),
        (
            lambda sd: sd["state"][0].__setitem__("step", torch.tensor(-1.0)),
            "smallbatch_rs.Adam: loaded step of parameter 'weight' (param group 0, index 0, shape (2, 3)) is -1.0",
        ),
    ],
    ids=["wrong_shape", "transposed_shape", "not_a_tensor", "negative_step"],
)
def test_load_state_dict_rejects_bad_state(mutate, message):
    """A state dict whose state does not fit a parameter is a ValueError naming that parameter, and
    the optimizer's state is unchanged afterwards (later steps unaffected)."""
    model, opt = _trained_adam()
    sd = copy.deepcopy(opt.state_dict())
    mutate(sd)
    before = _state_copy(opt)
    with _raises_exactly(ValueError, message):
        opt.load_state_dict(sd)
    _assert_state_equal(_state_copy(opt), before)

    reference, ref_opt = _trained_adam()
    x = torch.randn(4, 3)
    for m, o in ((model, opt), (reference, ref_opt)):
        o.zero_grad()
        m(x).sum().backward()
        o.step()
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# --- half-life functions ------------------------------------------------------------------------

BAD_POSITIVE = [(0, "0"), (-1, "-1"), (-0.5, "-0.5"), (NAN, "NaN"), (INF, "inf"), (-INF, "-inf")]


@pytest.mark.parametrize("value,shown", BAD_POSITIVE)
def test_beta_from_halflife_rejects(value, shown):
    """beta_from_halflife names halflife_tokens or tokens_per_step when it is not finite and > 0."""
    with _raises_exactly(ValueError, f"invalid halflife_tokens: {shown} (must be finite and > 0)"):
        halflife.beta_from_halflife(value, 512)
    with _raises_exactly(ValueError, f"invalid tokens_per_step: {shown} (must be finite and > 0)"):
        halflife.beta_from_halflife(1e6, value)


@pytest.mark.parametrize("value,shown", BAD_POSITIVE)
def test_halflife_from_beta_rejects_tokens_per_step(value, shown):
    """halflife_from_beta names tokens_per_step when it is not finite and > 0."""
    with _raises_exactly(ValueError, f"invalid tokens_per_step: {shown} (must be finite and > 0)"):
        halflife.halflife_from_beta(0.9, value)


@pytest.mark.parametrize("value,shown", BAD_POSITIVE)
def test_scale_beta_rejects_tokens_per_step(value, shown):
    """scale_beta names from_tokens_per_step / to_tokens_per_step when not finite and > 0."""
    with _raises_exactly(ValueError, f"invalid from_tokens_per_step: {shown} (must be finite and > 0)"):
        halflife.scale_beta(0.9, value, 512)
    with _raises_exactly(ValueError, f"invalid to_tokens_per_step: {shown} (must be finite and > 0)"):
        halflife.scale_beta(0.9, 512, value)


@pytest.mark.parametrize(
    "beta,shown", [(0, "0"), (1, "1"), (-0.5, "-0.5"), (1.5, "1.5"), (NAN, "NaN"), (INF, "inf"), (-INF, "-inf")]
)
def test_beta_outside_open_unit_interval(beta, shown):
    """halflife_from_beta and scale_beta name beta when it is not in (0, 1)."""
    with _raises_exactly(ValueError, f"invalid beta: {shown} (must be in (0, 1))"):
        halflife.halflife_from_beta(beta, 512)
    with _raises_exactly(ValueError, f"invalid beta: {shown} (must be in (0, 1))"):
        halflife.scale_beta(beta, 512, 1024)


def test_halflife_functions_accept_valid_edges():
    """Sanity: values just inside the ranges are accepted and round-trip."""
    beta = halflife.beta_from_halflife(1e7, 1)
    assert 0 < beta < 1
    assert math.isclose(halflife.halflife_from_beta(beta, 1), 1e7, rel_tol=1e-6)
    assert math.isclose(halflife.scale_beta(beta, 1, 64), halflife.beta_from_halflife(1e7, 64), rel_tol=1e-12)
