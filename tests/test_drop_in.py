"""The user's tensors stay the user's: whatever a training loop does to parameters and gradients,
our optimizers behave like torch.optim run on a deep copy of the same model with the same data,
and never move, alias or replace a parameter's storage or its ``.grad``.

Each comparison builds the model twice from one seed, steps one copy with ours and the other with
the torch optimizer of the same rule and hyperparameters, and compares parameters with
``assert_close(rtol=1e-5, atol=1e-6)``. Cases that the library gets wrong today keep the correct
assertion and are marked ``xfail(strict=True)``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import smallbatch_rs as sb

RTOL, ATOL = 1e-5, 1e-6

CONFIGS = [
    pytest.param(sb.SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=0.01), id="SGD"),
    pytest.param(sb.Adam, torch.optim.Adam, dict(lr=0.01, weight_decay=0.01), id="Adam"),
    pytest.param(sb.AdamW, torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1), id="AdamW"),
]
ADAM_CONFIGS = CONFIGS[1:]


class Net(nn.Module):
    """A small MLP with a branch (``extra``) that the forward pass uses only when asked."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 3)
        self.extra = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, use_extra: bool = False) -> torch.Tensor:
        h = torch.tanh(self.fc1(x))
        y = self.fc2(h)
        return y + self.extra(h) if use_extra else y


def _pair(factory=Net, seed: int = 0):
    torch.manual_seed(seed)
    model = factory()
    return model, copy.deepcopy(model)


def _batches(n: int, seed: int = 1, inputs: int = 6, outputs: int = 3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(5, inputs, generator=g), torch.randn(5, outputs, generator=g)) for _ in range(n)]


def _assert_params_close(ours: nn.Module, theirs: nn.Module) -> None:
    ours_named, theirs_named = list(ours.named_parameters()), list(theirs.named_parameters())
    assert [n for n, _ in ours_named] == [n for n, _ in theirs_named]
    for (name, a), (_, b) in zip(ours_named, theirs_named):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --- identity ------------------------------------------------------------------------------------


@pytest.mark.parametrize("ours_cls,theirs_cls,kwargs", CONFIGS)
def test_parameter_objects_are_unchanged(ours_cls, theirs_cls, kwargs):
    """model.parameters() yields the same objects (same ids, names, shapes, dtypes) before and after
    constructing the optimizer and stepping."""
    model, _ = _pair()
    before = list(model.named_parameters())
    ids = [id(p) for _, p in before]
    meta = [(p.shape, p.dtype, p.stride(), p.requires_grad) for _, p in before]

    opt = ours_cls(model.parameters(), **kwargs)
    assert [id(p) for p in model.parameters()] == ids
    for x, y in _batches(3):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()

    after = list(model.named_parameters())
    assert [n for n, _ in after] == [n for n, _ in before]
    assert all(a is b for (_, a), (_, b) in zip(after, before))
    assert [id(p) for p in model.parameters()] == ids
    assert [(p.shape, p.dtype, p.stride(), p.requires_grad) for _, p in after] == meta
    assert all(isinstance(p, nn.Parameter) for _, p in after)
    assert opt.param_groups[0]["params"] == [p for _, p in before]


@pytest.mark.parametrize("ours_cls,theirs_cls,kwargs", CONFIGS)
def test_model_state_dict_unchanged_by_construction(ours_cls, theirs_cls, kwargs):
    """Constructing the optimizer keeps model.state_dict()'s keys, order, values, shapes and strides."""
    model, _ = _pair()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    strides = {k: v.stride() for k, v in model.state_dict().items()}
    ours_cls(model.parameters(), **kwargs)
    after = model.state_dict()
    assert list(after.keys()) == list(before.keys())
    for k in before:
        assert torch.equal(after[k], before[k]), k
        assert after[k].dtype == before[k].dtype and after[k].stride() == strides[k], k


# --- tied, frozen and unused parameters -------------------------------------------------------


class TiedLM(nn.Module):
    """Embedding and output head share one nn.Parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 6)
        self.mid = nn.Linear(6, 6)
        self.head = nn.Linear(6, 12, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mid(self.emb(tokens))))


@pytest.mark.parametrize("ours_cls,theirs_cls,kwargs", CONFIGS)
def test_tied_parameters_stay_tied(ours_cls, theirs_cls, kwargs):
    """A parameter shared by embedding and head stays one object with one storage, and training
    matches torch."""
    model, reference = _pair(TiedLM)
    opt, ref_opt = ours_cls(model.parameters(), **kwargs), theirs_cls(reference.parameters(), **kwargs)
    g = torch.Generator().manual_seed(3)
    for _ in range(6):
        tokens = torch.randint(0, 12, (4, 5), generator=g)
        target = torch.randint(0, 12, (4, 5), generator=g)
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad()
            F.cross_entropy(m(tokens).reshape(-1, 12), target.reshape(-1)).backward()
            o.step()
        assert model.head.weight is model.emb.weight
        assert model.head.weight.data_ptr() == model.emb.weight.data_ptr()
    assert len(list(model.parameters())) == 3
    _assert_params_close(model, reference)


@pytest.mark.parametrize("ours_cls,theirs_cls,kwargs", CONFIGS)
@pytest.mark.parametrize("set_to_none", [True, False])
def test_frozen_parameters_never_change(ours_cls, theirs_cls, kwargs, set_to_none):
    """requires_grad=False parameters given to the optimizer are never changed (not even by weight
    decay) and get no state, with either zero_grad mode."""
    model, reference = _pair()
    for m in (model, reference):
        m.fc1.weight.requires_grad_(False)
    frozen_before = model.fc1.weight.detach().clone()
    opt, ref_opt = ours_cls(model.parameters(), **kwargs), theirs_cls(reference.parameters(), **kwargs)
    for x, y in _batches(5):
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad(set_to_none=set_to_none)
            F.mse_loss(m(x, use_extra=True), y).backward()
            o.step()
    assert torch.equal(model.fc1.weight.detach(), frozen_before)
    assert model.fc1.weight.grad is None
    assert model.fc1.weight not in opt.state
    assert reference.fc1.weight not in ref_opt.state
    _assert_params_close(model, reference)


@pytest.mark.parametrize("ours_cls,theirs_cls,kwargs", CONFIGS)
def test_parameter_without_gradient_is_skipped(ours_cls, theirs_cls, kwargs):
    """A module unused for the first steps is skipped as torch.optim skips a None grad (no state,
    values unchanged, even with weight decay); once used, training matches torch."""
    model, reference = _pair()
    extra_before = [p.detach().clone() for p in model.extra.parameters()]
    opt, ref_opt = ours_cls(model.parameters(), **kwargs), theirs_cls(reference.parameters(), **kwargs)
    for step, (x, y) in enumerate(_batches(8)):
        use_extra = step >= 4
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad()
            F.mse_loss(m(x, use_extra), y).backward()
            o.step()
        if not use_extra:
            for p, before in zip(model.extra.parameters(), extra_before):
                assert torch.equal(p.detach(), before)
                assert p not in opt.state
            used = list(model.fc1.parameters()) + list(model.fc2.parameters())
            assert {id(p) for p in opt.state} == {id(p) for p in used}
        _assert_params_close(model, reference)
    for p in model.extra.parameters():
        assert p in opt.state
    assert [float(opt.state[p].get("step", -1)) for p in model.parameters()] == [
        float(ref_opt.state[p].get("step", -1)) for p in reference.parameters()
    ]


# --- zero_grad and where gradients live --------------------------------------------------------


@pytest.mark.parametrize("ours_cls,theirs_cls,kwargs", CONFIGS)
@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_modes_match_torch(ours_cls, theirs_cls, kwargs, set_to_none):
    """opt.zero_grad(set_to_none=...) + backward + step matches torch over several steps."""
    model, reference = _pair()
    opt, ref_opt = ours_cls(model.parameters(), **kwargs), theirs_cls(reference.parameters(), **kwargs)
    for x, y in _batches(6):
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad(set_to_none=set_to_none)
            F.mse_loss(m(x, use_extra=True), y).backward()
            o.step()
        _assert_params_close(model, reference)


@pytest.mark.parametrize("ours_cls,theirs_cls,kwargs", ADAM_CONFIGS)
def test_zero_grad_false_after_set_to_none_steps_zero_grads(ours_cls, theirs_cls, kwargs):
    """torch semantic: after zero_grad(set_to_none=False) a parameter whose grad was a tensor still
    steps with a zero gradient (Adam keeps moving it from its moments) while a None grad is skipped."""
    model, reference = _pair()
    opt, ref_opt = ours_cls(model.parameters(), **kwargs), theirs_cls(reference.parameters(), **kwargs)
    batches = _batches(6)
    for x, y in batches[:2]:  # every parameter receives a gradient
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad()
            F.mse_loss(m(x, use_extra=True), y).backward()
            o.step()
    for x, y in batches[2:]:  # extra stops receiving gradients but its grad is a zero tensor
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad(set_to_none=False)
            F.mse_loss(m(x), y).backward()
            o.step()
        _assert_params_close(model, reference)
    assert [float(opt.state[p]["step"]) for p in model.extra.parameters()] == [
        float(ref_opt.state[p]["step"]) for p in reference.extra.parameters()
    ]


@pytest.mark.parametrize("ours_cls,theirs_cls,kwargs", CONFIGS)
def test_zero_grad_false_keeps_never_used_parameters_skipped(ours_cls, theirs_cls, kwargs):
    """zero_grad(set_to_none=False) on a model with an unused module: torch keeps its grads None and
    never steps it; we must not either."""
    model, reference = _pair()
    extra_before = [p.detach().clone() for p in model.extra.parameters()]
    opt, ref_opt = ours_cls(model.parameters(), **kwargs), theirs_cls(reference.parameters(), **kwargs)
    for x, y in _batches(5):
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad(set_to_none=False)
            F.mse_loss(m(x), y).backward()
            o.step()
    assert all(p.grad is None for p in reference.extra.parameters())
    for p, before in zip(model.extra.parameters(), extra_before):
        assert p not in opt.state
        assert torch.equal(p.detach(), before)
    _assert_params_close(model, reference)


@pytest.mark.parametrize("ours_cls,theirs_cls,kwargs", CONFIGS)
def test_storage_and_gradients_stay_where_torch_put_them(ours_cls, theirs_cls, kwargs):
    """Building and stepping never moves a parameter's storage or replaces its ``.grad``: the
    step reads and writes them in place; zero_grad() leaves None, as torch's does, and
    zero_grad(set_to_none=False) zeroes the same gradient tensors."""
    model, _ = _pair()
    ptrs = [p.data_ptr() for p in model.parameters()]
    storages = [p.untyped_storage().data_ptr() for p in model.parameters()]
    opt = ours_cls(model.parameters(), **kwargs)
    assert all(p.grad is None for p in model.parameters())
    for x, y in _batches(3):
        opt.zero_grad()
        assert all(p.grad is None for p in model.parameters())
        F.mse_loss(model(x, use_extra=True), y).backward()
        grads = [(p.grad, p.grad.data_ptr(), p.grad.clone()) for p in model.parameters()]
        opt.step()
        for p, (g, gptr, values) in zip(model.parameters(), grads):
            assert p.grad is g and g.data_ptr() == gptr and torch.equal(g, values)
        assert [p.data_ptr() for p in model.parameters()] == ptrs
        assert [p.untyped_storage().data_ptr() for p in model.parameters()] == storages
    grads = [p.grad for p in model.parameters()]
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is g and torch.count_nonzero(g) == 0 for p, g in zip(model.parameters(), grads))
    # Each parameter owns its storage alone: nothing of the optimizer's lives in it.
    assert all(p.untyped_storage().nbytes() == p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.parametrize("ours_cls,theirs_cls,kwargs", CONFIGS)
def test_model_zero_grad_and_assigned_grads(ours_cls, theirs_cls, kwargs):
    """model.zero_grad() (grads set to None, backward makes fresh tensors) and hand-assigned
    ``p.grad = tensor`` are picked up and match torch."""
    model, reference = _pair()
    opt, ref_opt = ours_cls(model.parameters(), **kwargs), theirs_cls(reference.parameters(), **kwargs)
    for x, y in _batches(4):
        for m, o in ((model, opt), (reference, ref_opt)):
            m.zero_grad()
            assert all(p.grad is None for p in m.parameters())
            F.mse_loss(m(x, use_extra=True), y).backward()
            o.step()
        _assert_params_close(model, reference)

    g = torch.Generator().manual_seed(7)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=g) for p in model.parameters()]
        for m, o in ((model, opt), (reference, ref_opt)):
            for p, grad in zip(m.parameters(), grads):
                p.grad = grad.clone()
            o.step()
        _assert_params_close(model, reference)
    # Only some parameters get an assigned grad; the others' grads are None, so they are skipped.
    for m, o in ((model, opt), (reference, ref_opt)):
        m.zero_grad()
        m.fc2.weight.grad = torch.ones_like(m.fc2.weight)
        o.step()
    _assert_params_close(model, reference)


@pytest.mark.parametrize("ours_cls,theirs_cls,kwargs", CONFIGS)
def test_gradient_accumulation(ours_cls, theirs_cls, kwargs):
    """Two backward passes without zero_grad in between accumulate, then one step: matches torch."""
    model, reference = _pair()
    opt, ref_opt = ours_cls(model.parameters(), **kwargs), theirs_cls(reference.parameters(), **kwargs)
    batches = _batches(8)
    for (x1, y1), (x2, y2) in zip(batches[::2], batches[1::2]):
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad()
            (F.mse_loss(m(x1, use_extra=True), y1) / 2).backward()
            (F.mse_loss(m(x2, use_extra=True), y2) / 2).backward()
            o.step()
        _assert_params_close(model, reference)


@pytest.mark.parametrize("ours_cls,theirs_cls,kwargs", CONFIGS)
def test_clip_grad_norm_matches_torch(ours_cls, theirs_cls, kwargs):
    """torch.nn.utils.clip_grad_norm_ between backward and step matches torch (norms too)."""
    model, reference = _pair()
    opt, ref_opt = ours_cls(model.parameters(), **kwargs), theirs_cls(reference.parameters(), **kwargs)
    for x, y in _batches(6):
        norms = []
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad()
            (10 * F.mse_loss(m(x, use_extra=True), y)).backward()
            norms.append(torch.nn.utils.clip_grad_norm_(m.parameters(), max_norm=0.5))
            o.step()
        torch.testing.assert_close(norms[0], norms[1], rtol=RTOL, atol=ATOL)
        _assert_params_close(model, reference)


@pytest.mark.parametrize("ours_cls,theirs_cls,kwargs", CONFIGS)
def test_clip_grad_norm_with_unused_module(ours_cls, theirs_cls, kwargs):
    """clip_grad_norm_ with a module that gets no gradient: it stays skipped, as in torch."""
    model, reference = _pair()
    extra_before = [p.detach().clone() for p in model.extra.parameters()]
    opt, ref_opt = ours_cls(model.parameters(), **kwargs), theirs_cls(reference.parameters(), **kwargs)
    for x, y in _batches(5):
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad()
            F.mse_loss(m(x), y).backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), max_norm=0.5)
            o.step()
    for p, before in zip(model.extra.parameters(), extra_before):
        assert p not in opt.state
        assert torch.equal(p.detach(), before)
    _assert_params_close(model, reference)


# --- parameters replaced or converted behind the optimizer's back ------------------------------


@pytest.mark.parametrize("ours_cls,theirs_cls,kwargs", CONFIGS)
def test_load_state_dict_assign_matches_torch(ours_cls, theirs_cls, kwargs):
    """model.load_state_dict(sd, assign=True) after building the optimizer: torch puts new Parameter
    objects into the model, so torch.optim keeps stepping the old ones and the model's new parameters
    stay at the loaded values. Ours does exactly the same (model and optimizer-held tensors match)."""
    model, reference = _pair()
    opt, ref_opt = ours_cls(model.parameters(), **kwargs), theirs_cls(reference.parameters(), **kwargs)
    held, ref_held = list(model.parameters()), list(reference.parameters())
    torch.manual_seed(5)
    loaded = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    model.load_state_dict(copy.deepcopy(loaded), assign=True)
    reference.load_state_dict(copy.deepcopy(loaded), assign=True)
    assert [a is b for a, b in zip(model.parameters(), held)] == [a is b for a, b in zip(reference.parameters(), ref_held)]
    for x, y in _batches(4):
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad()
            F.mse_loss(m(x, use_extra=True), y).backward()
            o.step()
    _assert_params_close(model, reference)
    for a, b in zip(held, ref_held):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("ours_cls,theirs_cls,kwargs", CONFIGS)
def test_load_state_dict_assign_with_swap_is_detected(ours_cls, theirs_cls, kwargs):
    """With torch.__future__.set_swap_module_params_on_conversion(True), load_state_dict(assign=True)
    swaps new data into the same Parameter objects: detected at the next step, the model's actual
    parameters keep training and match torch."""
    model, reference = _pair()
    opt, ref_opt = ours_cls(model.parameters(), **kwargs), theirs_cls(reference.parameters(), **kwargs)
    batches = _batches(6)
    for x, y in batches[:2]:
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad()
            F.mse_loss(m(x, use_extra=True), y).backward()
            o.step()
    held = list(model.parameters())
    torch.manual_seed(5)
    loaded = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.load_state_dict(copy.deepcopy(loaded), assign=True)
        reference.load_state_dict(copy.deepcopy(loaded), assign=True)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(previous)
    assert all(a is b for a, b in zip(model.parameters(), held))
    for x, y in batches[2:]:
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad()
            F.mse_loss(m(x, use_extra=True), y).backward()
            o.step()
        _assert_params_close(model, reference)
    for name, p in model.named_parameters():
        assert not torch.equal(p.detach(), loaded[name]), f"{name} was not updated after the swap"


@pytest.mark.parametrize("ours_cls,theirs_cls,kwargs", CONFIGS)
def test_parameter_data_replaced(ours_cls, theirs_cls, kwargs):
    """``p.data = new_tensor`` (same shape/dtype/device) after construction: later steps update the
    new tensors in place, exactly as torch does."""
    model, reference = _pair()
    opt, ref_opt = ours_cls(model.parameters(), **kwargs), theirs_cls(reference.parameters(), **kwargs)
    torch.manual_seed(9)
    new = [torch.randn_like(p) for p in model.parameters()]
    for m in (model, reference):
        for p, v in zip(m.parameters(), new):
            p.data = v.clone()
    ptrs = [p.data_ptr() for p in model.parameters()]
    for x, y in _batches(4):
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad()
            F.mse_loss(m(x, use_extra=True), y).backward()
            o.step()
        _assert_params_close(model, reference)
    assert [p.data_ptr() for p in model.parameters()] == ptrs


@pytest.mark.parametrize("ours_cls,theirs_cls,kwargs", CONFIGS)
@pytest.mark.parametrize("named", [False, True])
def test_converting_model_to_float64_raises_at_step(ours_cls, theirs_cls, kwargs, named):
    """model.double() after the optimizer was created is reported at step() as a TypeError naming
    the parameter and its new dtype (float64 has no native kernels); nothing is stepped."""
    model, _ = _pair()
    opt = ours_cls(model.named_parameters() if named else model.parameters(), **kwargs)
    model.double()
    x, y = _batches(1)[0]
    F.mse_loss(model(x.double()), y.double()).backward()
    before = [p.detach().clone() for p in model.parameters()]
    who = "parameter 'fc1.weight'" if named else "parameter 0"
    message = (
        f"smallbatch_rs.{ours_cls.__name__} supports float32 and bfloat16 parameters: {who} "
        "(param group 0, index 0, shape (8, 6)) is now torch.float64"
    )
    with pytest.raises(TypeError) as info:
        opt.step()
    assert str(info.value) == message
    assert model.fc1.weight.dtype == torch.float64
    assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))


# --- groups -------------------------------------------------------------------------------------


@pytest.mark.parametrize("ours_cls,theirs_cls,kwargs", CONFIGS)
def test_two_param_groups_with_different_lr(ours_cls, theirs_cls, kwargs):
    """Two groups with their own lr (and weight decay) train like torch's."""
    model, reference = _pair()

    def groups(m):
        return [
            {"params": list(m.fc1.parameters()), "lr": kwargs["lr"] * 3},
            {"params": list(m.fc2.parameters()) + list(m.extra.parameters()), "weight_decay": 0.0},
        ]

    opt, ref_opt = ours_cls(groups(model), **kwargs), theirs_cls(groups(reference), **kwargs)
    assert len(opt._tables) == 2
    for x, y in _batches(6):
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad()
            F.mse_loss(m(x, use_extra=True), y).backward()
            o.step()
        _assert_params_close(model, reference)


@pytest.mark.parametrize("ours_cls,theirs_cls,kwargs", CONFIGS)
def test_add_param_group_later(ours_cls, theirs_cls, kwargs):
    """A group added after some steps (a module unfrozen mid-training) trains like torch's."""
    model, reference = _pair()
    opt = ours_cls(list(model.fc1.parameters()) + list(model.fc2.parameters()), **kwargs)
    ref_opt = theirs_cls(list(reference.fc1.parameters()) + list(reference.fc2.parameters()), **kwargs)
    batches = _batches(8)
    for step, (x, y) in enumerate(batches):
        if step == 3:
            opt.add_param_group({"params": list(model.extra.parameters()), "lr": kwargs["lr"] / 2})
            ref_opt.add_param_group({"params": list(reference.extra.parameters()), "lr": kwargs["lr"] / 2})
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad()
            F.mse_loss(m(x, use_extra=True), y).backward()
            o.step()
        _assert_params_close(model, reference)
    assert len(opt.param_groups) == len(opt._tables) == 2


# --- layouts ------------------------------------------------------------------------------------


class Transposed(nn.Module):
    """Holds a transposed (non-contiguous, dense) weight and a zero-element parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 6).t())  # shape (6, 3), strides (1, 6)
        self.empty = nn.Parameter(torch.zeros(0, 3))
        self.b = nn.Parameter(torch.randn(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w + self.b + self.empty.sum(0)


@pytest.mark.parametrize("ours_cls,theirs_cls,kwargs", CONFIGS)
def test_transposed_parameter_keeps_strides(ours_cls, theirs_cls, kwargs):
    """A transposed parameter keeps its shape, strides and values through construction and steps."""
    model, reference = _pair(Transposed)
    assert model.w.stride() == (1, 6) and not model.w.is_contiguous()
    values = model.w.detach().clone()
    opt, ref_opt = ours_cls(model.parameters(), **kwargs), theirs_cls(reference.parameters(), **kwargs)
    assert model.w.shape == (6, 3) and model.w.stride() == (1, 6)
    assert torch.equal(model.w.detach(), values)
    for x, y in _batches(5):
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad()
            F.mse_loss(m(x), y).backward()
            o.step()
        assert model.w.stride() == (1, 6)
        assert model.w.grad.stride() == reference.w.grad.stride() == (1, 6)
        _assert_params_close(model, reference)


@pytest.mark.parametrize("ours_cls,theirs_cls,kwargs", CONFIGS)
def test_zero_element_parameters(ours_cls, theirs_cls, kwargs):
    """Parameters with zero elements (alone in a group, or among others) step without error and the
    rest of the model matches torch."""
    model, reference = _pair(Transposed)
    lone, ref_lone = nn.Parameter(torch.zeros(4, 0)), nn.Parameter(torch.zeros(4, 0))
    opt = ours_cls([{"params": list(model.parameters())}, {"params": [lone]}], **kwargs)
    ref_opt = theirs_cls([{"params": list(reference.parameters())}, {"params": [ref_lone]}], **kwargs)
    for x, y in _batches(4):
        for m, p, o in ((model, lone, opt), (reference, ref_lone, ref_opt)):
            o.zero_grad()
            (F.mse_loss(m(x), y) + p.sum()).backward()
            o.step()
        _assert_params_close(model, reference)
    assert model.empty.shape == (0, 3) and lone.shape == (4, 0)
    assert (model.empty in opt.state) == (reference.empty in ref_opt.state)


# --- closure and schedulers -------------------------------------------------------------------


@pytest.mark.parametrize("ours_cls,theirs_cls,kwargs", CONFIGS)
def test_step_with_closure(ours_cls, theirs_cls, kwargs):
    """step(closure) evaluates the closure with grad enabled and returns exactly what it returned;
    training through closures matches torch."""
    model, reference = _pair()
    opt, ref_opt = ours_cls(model.parameters(), **kwargs), theirs_cls(reference.parameters(), **kwargs)
    for x, y in _batches(5):
        returned = {}

        def make_closure(m, o, key):
            def closure():
                o.zero_grad()
                loss = F.mse_loss(m(x, use_extra=True), y)
                loss.backward()
                returned[key] = loss
                return loss

            return closure

        ours_loss = opt.step(make_closure(model, opt, "ours"))
        ref_loss = ref_opt.step(make_closure(reference, ref_opt, "torch"))
        assert ours_loss is returned["ours"]
        torch.testing.assert_close(ours_loss, ref_loss, rtol=RTOL, atol=ATOL)
        _assert_params_close(model, reference)
    assert opt.step() is None


def _lambda(step: int) -> float:
    return 1.0 / (1.0 + 0.3 * step)


SCHEDULERS = [
    pytest.param(lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=5, gamma=0.5), id="StepLR"),
    pytest.param(lambda o: torch.optim.lr_scheduler.LambdaLR(o, _lambda), id="LambdaLR"),
]


@pytest.mark.parametrize("ours_cls,theirs_cls,kwargs", CONFIGS)
@pytest.mark.parametrize("make_sched", SCHEDULERS)
@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float_lr", "tensor_lr"])
def test_lr_scheduler_drives_lr_like_torch(ours_cls, theirs_cls, kwargs, make_sched, tensor_lr):
    """StepLR / LambdaLR set our lr exactly as torch's (float or tensor lr): the same lr every step
    and the same parameters over 20 steps."""
    kwargs = dict(kwargs)
    if tensor_lr:
        kwargs["lr"] = torch.tensor(kwargs["lr"])
    model, reference = _pair()
    opt = ours_cls(model.parameters(), **{k: (v.clone() if torch.is_tensor(v) else v) for k, v in kwargs.items()})
    ref_opt = theirs_cls(reference.parameters(), **{k: (v.clone() if torch.is_tensor(v) else v) for k, v in kwargs.items()})
    sched, ref_sched = make_sched(opt), make_sched(ref_opt)
    for x, y in _batches(20):
        for m, o, s in ((model, opt, sched), (reference, ref_opt, ref_sched)):
            o.zero_grad()
            F.mse_loss(m(x, use_extra=True), y).backward()
            o.step()
            s.step()
        lr, ref_lr = opt.param_groups[0]["lr"], ref_opt.param_groups[0]["lr"]
        assert torch.is_tensor(lr) == torch.is_tensor(ref_lr) == tensor_lr
        assert float(lr) == float(ref_lr)
        assert sched.get_last_lr() == ref_sched.get_last_lr()
        _assert_params_close(model, reference)


@pytest.mark.parametrize("ours_cls,theirs_cls,kwargs", CONFIGS)
def test_parameter_unfrozen_after_construction(ours_cls, theirs_cls, kwargs):
    """A parameter frozen when the optimizer is built and unfrozen later trains like torch's from then on."""
    model, reference = _pair()
    for m in (model, reference):
        m.fc1.weight.requires_grad_(False)
    opt, ref_opt = ours_cls(model.parameters(), **kwargs), theirs_cls(reference.parameters(), **kwargs)
    for step, (x, y) in enumerate(_batches(8)):
        if step == 3:
            for m in (model, reference):
                m.fc1.weight.requires_grad_(True)
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad()
            F.mse_loss(m(x, use_extra=True), y).backward()
            o.step()
        _assert_params_close(model, reference)
    assert model.fc1.weight in opt.state or ours_cls is sb.SGD and not kwargs.get("momentum")


# --- conversions and replacements after construction ------------------------------------------


def _train(model, opt, batches, **forward):
    for x, y in batches:
        opt.zero_grad()
        F.mse_loss(model(x.to(next(model.parameters()).dtype), **forward).float(), y).backward()
        opt.step()


ALL_RULES = CONFIGS + [
    pytest.param(sb.Adafactor, None, dict(lr=0.01, min_dim_size_to_factor=4), id="Adafactor"),
    pytest.param(sb.Muon, None, dict(lr=0.02, adamw_lr=0.01), id="Muon"),
]


@pytest.mark.parametrize("ours_cls,theirs_cls,kwargs", ALL_RULES)
def test_model_to_bfloat16_after_steps_is_followed(ours_cls, theirs_cls, kwargs):
    """model.to(torch.bfloat16) after some steps: the optimizer follows the converted parameters
    (its state stays float32) and steps exactly as an optimizer built on the converted model
    with the state it had."""
    model, _ = _pair()
    opt = ours_cls(model.parameters(), **kwargs)
    batches = _batches(5)
    _train(model, opt, batches[:2], use_extra=True)
    twin = copy.deepcopy(model).to(torch.bfloat16)
    twin_opt = ours_cls(twin.parameters(), **kwargs)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    model.to(torch.bfloat16)
    _train(model, opt, batches[2:], use_extra=True)
    _train(twin, twin_opt, batches[2:], use_extra=True)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b)
    for st in opt.state_dict()["state"].values():
        assert all(v.dtype in (torch.float32, torch.float64) for v in st.values() if torch.is_tensor(v))


@pytest.mark.parametrize("ours_cls,theirs_cls,kwargs", CONFIGS)
def test_parameters_swapped_to_an_unsupported_device_are_a_clear_error(ours_cls, theirs_cls, kwargs):
    """model.to(device) keeps the Parameter objects only when torch swaps tensors
    (torch.__future__.set_swap_module_params_on_conversion); the optimizer then follows them to
    another CPU or CUDA device with its state, and names the parameter on a device it cannot
    step (meta here), before anything moves."""
    model, _ = _pair()
    opt = ours_cls(model.named_parameters(), **kwargs)
    _train(model, opt, _batches(1), use_extra=True)
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        held = list(model.parameters())
        model.to("meta")
    finally:
        torch.__future__.set_swap_module_params_on_conversion(previous)
    assert all(a is b for a, b in zip(model.parameters(), held))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    state = copy.deepcopy(opt.state_dict())
    with pytest.raises(RuntimeError, match=r"parameter 'fc1\.weight' \(param group 0, index 0, shape \(8, 6\)\) is now on meta"):
        opt.step()
    for (k, a), b in zip(opt.state_dict()["state"].items(), state["state"].values()):
        assert all(torch.equal(a[n], b[n]) for n in a), k


class TwoVectors(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(4))
        self.b = nn.Parameter(torch.randn(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.a.sum() * x).sum() + (self.b**2).sum()


@pytest.mark.parametrize("ours_cls,theirs_cls,kwargs", CONFIGS)
def test_parameter_replaced_by_another_shape(ours_cls, theirs_cls, kwargs):
    """``p.data = t`` of another shape before the first step is followed (torch.optim has no state
    yet either); after the optimizer made state for the group it is an error naming the
    parameter and both shapes, and nothing is stepped."""
    model, reference = _pair(TwoVectors)
    opt, ref_opt = ours_cls(model.named_parameters(), **kwargs), theirs_cls(reference.parameters(), **kwargs)
    for m in (model, reference):
        m.b.data = torch.arange(5.0)
    x = torch.randn(2)
    for _ in range(3):
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad()
            m(x).backward()
            o.step()
        _assert_params_close(model, reference)
    model.b.data = torch.zeros(6)
    model.b.grad = torch.zeros(6)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"parameter 'b' \(param group 0, index 1, shape \(6,\)\) changed shape from \(5,\) to \(6,\)"):
        opt.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))


class Doubled(nn.Module):
    """A parametrization: the module sees twice the stored tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x

    def right_inverse(self, x: torch.Tensor) -> torch.Tensor:
        return x / 2


@pytest.mark.parametrize("ours_cls,theirs_cls,kwargs", CONFIGS)
def test_parametrization_registered_after_construction(ours_cls, theirs_cls, kwargs):
    """torch.nn.utils.parametrize after the optimizer was built: the same Parameter object gets new
    storage (the right inverse of its value); the optimizer follows it, as torch.optim does."""
    from torch.nn.utils import parametrize

    model, reference = _pair()
    opt, ref_opt = ours_cls(model.parameters(), **kwargs), theirs_cls(reference.parameters(), **kwargs)
    batches = _batches(6)
    for i, (x, y) in enumerate(batches):
        if i == 2:
            for m in (model, reference):
                weight = m.fc1.weight
                parametrize.register_parametrization(m.fc1, "weight", Doubled())
                assert m.fc1.parametrizations.weight.original is weight
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad()
            F.mse_loss(m(x, use_extra=True), y).backward()
            o.step()
        _assert_params_close(model, reference)


# --- layouts ----------------------------------------------------------------------------------------


class Conv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.conv(x)).flatten(1))


def _conv_batches(n: int):
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(2, 3, 6, 6, generator=g), torch.randn(2, 3, generator=g)) for _ in range(n)]


@pytest.mark.parametrize("ours_cls,theirs_cls,kwargs", CONFIGS)
@pytest.mark.parametrize("when", ["before", "after"])
def test_channels_last_parameters(ours_cls, theirs_cls, kwargs, when):
    """Conv weights in channels_last (converted before or after the optimizer was built) are
    stepped in their own layout and match torch; the layout is kept."""
    model, reference = _pair(Conv)
    if when == "before":
        for m in (model, reference):
            m.to(memory_format=torch.channels_last)
    opt, ref_opt = ours_cls(model.parameters(), **kwargs), theirs_cls(reference.parameters(), **kwargs)
    for i, (x, y) in enumerate(_conv_batches(5)):
        if when == "after" and i == 2:
            for m in (model, reference):
                m.to(memory_format=torch.channels_last)
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad()
            F.mse_loss(m(x.to(memory_format=torch.channels_last)), y).backward()
            o.step()
        _assert_params_close(model, reference)
    assert model.conv.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("ours_cls,theirs_cls,kwargs", CONFIGS)
def test_gradient_in_another_layout_than_its_parameter(ours_cls, theirs_cls, kwargs):
    """A gradient assigned in another layout than its parameter (a contiguous gradient for a
    channels_last weight, a transposed one for a contiguous weight) steps the right elements."""
    model, reference = _pair(Conv)
    for m in (model, reference):
        m.conv.to(memory_format=torch.channels_last)
    opt, ref_opt = ours_cls(model.parameters(), **kwargs), theirs_cls(reference.parameters(), **kwargs)
    g = torch.Generator().manual_seed(8)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=g) for p in model.parameters()]
        for m, o in ((model, opt), (reference, ref_opt)):
            for p, grad in zip(m.parameters(), grads):
                p.grad = grad.t().contiguous().t() if grad.dim() == 2 else grad.clone()
            assert m.conv.weight.grad.is_contiguous() and not m.conv.weight.is_contiguous()
            o.step()
        _assert_params_close(model, reference)


class Strided(nn.Module):
    """A parameter that is a view with gaps (every other column of a larger tensor)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 8)[:, ::2])
        self.b = nn.Parameter(torch.randn(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w + self.b


@pytest.mark.parametrize("ours_cls,theirs_cls,kwargs", CONFIGS)
def test_parameter_with_gaps(ours_cls, theirs_cls, kwargs):
    """A non-dense parameter is stepped through a copy written back in place: its storage and
    strides stay, the elements between it are untouched, and the values match torch."""
    model, reference = _pair(Strided)
    base = model.w.detach().as_strided((6, 8), (8, 1))
    gaps = base[:, 1::2].clone()
    ptr, strides = model.w.data_ptr(), model.w.stride()
    opt, ref_opt = ours_cls(model.parameters(), **kwargs), theirs_cls(reference.parameters(), **kwargs)
    for x, y in _batches(4, inputs=6, outputs=4):
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad()
            F.mse_loss(m(x), y).backward()
            o.step()
        _assert_params_close(model, reference)
    assert model.w.data_ptr() == ptr and model.w.stride() == strides
    assert torch.equal(base[:, 1::2], gaps)


def test_adafactor_follows_a_reshaped_parameter_before_its_first_step():
    """A parameter replaced by a matrix before the first step is factored like one given at
    construction (the table and Adafactor's layout are laid out again)."""
    p = nn.Parameter(torch.randn(6))
    opt = sb.Adafactor([p], lr=0.01, min_dim_size_to_factor=2)
    p.data = torch.randn(4, 5)
    p.grad = torch.randn(4, 5)
    q = nn.Parameter(p.detach().clone())
    q.grad = p.grad.clone()
    ref = sb.Adafactor([q], lr=0.01, min_dim_size_to_factor=2)
    opt.step()
    ref.step()
    assert torch.equal(p, q)
    assert set(opt.state[p]) == set(ref.state[q]) == {"step", "row_var", "col_var"}


ROW_MAJOR = [
    pytest.param(sb.Adafactor, dict(lr=0.01, min_dim_size_to_factor=2, beta1=0.9), id="Adafactor"),
    pytest.param(sb.Muon, dict(lr=0.02), id="Muon"),
]


@pytest.mark.parametrize("cls,kwargs", ROW_MAJOR)
@pytest.mark.parametrize("layout", ["transposed", "channels_last", "gaps"])
def test_row_major_rules_accept_non_contiguous_parameters(cls, kwargs, layout):
    """Adafactor and Muon see matrices row-major: a transposed, channels_last or gapped parameter
    (and its gradient) gives bit for bit what the same values stored contiguously give."""
    torch.manual_seed(0)
    shape = (4, 3, 5, 6)
    values = torch.randn(shape)
    if layout == "transposed":
        odd = nn.Parameter(values.flatten(1).t().contiguous().t().view(shape))
    elif layout == "channels_last":
        odd = nn.Parameter(values.contiguous(memory_format=torch.channels_last))
    else:
        odd = nn.Parameter(torch.zeros(4, 3, 5, 12)[..., ::2].copy_(values))
    plain = nn.Parameter(values.clone())
    assert not odd.is_contiguous() and torch.equal(odd, plain)
    ours, ref = cls([odd], **kwargs), cls([plain], **kwargs)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        grad = torch.randn(shape, generator=g)
        odd.grad = torch.empty_like(odd).copy_(grad)
        plain.grad = grad.clone()
        ours.step()
        ref.step()
        assert torch.equal(odd.detach(), plain.detach())
    assert not odd.is_contiguous()
    for name, value in ref.state_dict()["state"][0].items():
        assert torch.equal(ours.state_dict()["state"][0][name], value), name


# --- saving the model with the libraries users save with ------------------------------------------


def _trained(cls=sb.AdamW, **kwargs):
    model, _ = _pair()
    opt = cls(model.parameters(), **(kwargs or dict(lr=0.01)))
    _train(model, opt, _batches(3), use_extra=True)
    return model, opt


def test_safetensors_save_model_and_load_model(tmp_path):
    """safetensors' save_model/load_model round trip (it refuses tensors that share storage)."""
    from safetensors.torch import load_model, save_model

    model, opt = _trained()
    save_model(model, str(tmp_path / "model.safetensors"))
    other, _ = _pair(seed=3)
    load_model(other, str(tmp_path / "model.safetensors"))
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)


def test_torch_save_of_a_submodule_writes_only_its_bytes(tmp_path):
    model, opt = _trained()
    torch.save(model.fc2.state_dict(), tmp_path / "fc2.pt")
    torch.save({k: v.clone() for k, v in model.fc2.state_dict().items()}, tmp_path / "fc2_clone.pt")
    # The same bytes as a copy of its own tensors, give or take the archive's bookkeeping.
    size, alone = (tmp_path / "fc2.pt").stat().st_size, (tmp_path / "fc2_clone.pt").stat().st_size
    assert abs(size - alone) < 64, (size, alone)


@pytest.mark.parametrize("cls", [sb.AdamW, sb.SGD, sb.Adafactor])
def test_accelerate_save_state_and_load_state(cls, tmp_path):
    """accelerate's save_state/load_state with our optimizer: resuming continues bit for bit."""
    from accelerate import Accelerator

    kwargs = dict(lr=0.01, momentum=0.9) if cls is sb.SGD else dict(lr=0.01)
    batches = _batches(6)
    model, _ = _pair()
    acc = Accelerator(cpu=True, project_dir=str(tmp_path))
    model, opt = acc.prepare(model, cls(model.parameters(), **kwargs))
    _train(model, opt, batches[:3], use_extra=True)
    acc.save_state(str(tmp_path / "ckpt"))
    _train(model, opt, batches[3:], use_extra=True)

    other, _ = _pair(seed=11)
    acc2 = Accelerator(cpu=True, project_dir=str(tmp_path))
    other, other_opt = acc2.prepare(other, cls(other.parameters(), **kwargs))
    acc2.load_state(str(tmp_path / "ckpt"))
    _train(other, other_opt, batches[3:], use_extra=True)
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)
