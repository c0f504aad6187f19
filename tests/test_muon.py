"""Muon: parity with torch.optim.Muon (whose Newton-Schulz is swapped for a float32 one), the
built-in AdamW for non-matrix parameters, batched and flattened tensors, state, bf16."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.optim._muon as torch_muon

import smallbatch_rs as sb
from smallbatch_rs.halflife import beta_from_halflife


def newton_schulz_fp32(grad, ns_coefficients, ns_steps, eps):
    """torch.optim.Muon's iteration in float32 (torch runs it in bf16): the reference."""
    a, b, c = ns_coefficients
    x = grad.to(torch.float32, copy=True)
    tall = grad.size(-2) > grad.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(ns_steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if tall else x


@pytest.fixture
def fp32_torch_muon(monkeypatch):
    monkeypatch.setattr(torch_muon, "_zeropower_via_newtonschulz", newton_schulz_fp32)


def _mlp(seed=0, bias=False):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(20, 64, bias=bias), torch.nn.Tanh(), torch.nn.Linear(64, 10, bias=bias)
    )


def _batches(n, seed=1, d_in=20, d_out=10):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, d_in, generator=g), torch.randn(8, d_out, generator=g)) for _ in range(n)]


def _train(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _close(a, b, rtol=1e-4, atol=1e-6):
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize(
    "kwargs",
    [dict(lr=0.02), dict(lr=0.02, nesterov=False, weight_decay=0.0), dict(lr=0.01, adjust_lr_fn="match_rms_adamw", momentum=0.9)],
    ids=["default", "no_nesterov", "match_rms"],
)
def test_matches_torch_muon(fp32_torch_muon, kwargs):
    ours_model = _mlp()
    theirs_model = copy.deepcopy(ours_model)
    ours = sb.Muon(ours_model.parameters(), **kwargs)
    theirs = torch.optim.Muon(theirs_model.parameters(), **kwargs)
    batches = _batches(50)
    _train(ours_model, ours, batches)
    _train(theirs_model, theirs, batches)
    _close(ours_model, theirs_model)
    for p, q in zip(ours_model.parameters(), theirs_model.parameters()):
        torch.testing.assert_close(ours.state[p]["momentum_buffer"], theirs.state[q]["momentum_buffer"], rtol=1e-4, atol=1e-7)


def test_non_matrices_go_to_the_builtin_adamw(fp32_torch_muon):
    """Biases are split into an AdamW group; the result equals torch Muon on the matrices plus
    torch AdamW on the rest."""
    ours_model = _mlp(bias=True)
    theirs_model = copy.deepcopy(ours_model)
    ours = sb.Muon(ours_model.parameters(), lr=0.02, adamw_lr=1e-3, adamw_betas=(0.8, 0.95), adamw_weight_decay=0.01)
    assert [g["use_muon"] for g in ours.param_groups] == [True, False]
    matrices = [p for p in theirs_model.parameters() if p.dim() == 2]
    vectors = [p for p in theirs_model.parameters() if p.dim() < 2]
    muon = torch.optim.Muon(matrices, lr=0.02)
    adamw = torch.optim.AdamW(vectors, lr=1e-3, betas=(0.8, 0.95), weight_decay=0.01)
    batches = _batches(40)
    _train(ours_model, ours, batches)
    for x, y in batches:
        muon.zero_grad()
        adamw.zero_grad()
        torch.nn.functional.mse_loss(theirs_model(x), y).backward()
        muon.step()
        adamw.step()
    _close(ours_model, theirs_model)
    bias = ours_model[0].bias
    assert set(ours.state[bias]) == {"step", "exp_avg", "exp_avg_sq"}


def test_explicit_adamw_group_for_embeddings_and_halflives():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(50, 16)
    body = torch.nn.Linear(16, 16, bias=False)
    opt = sb.Muon(
        [{"params": body.parameters()}, {"params": emb.parameters(), "use_muon": False, "lr": 1e-2, "t2": 1e5}],
        t1=2048, tokens_per_step=512,
    )
    muon_group, adamw_group = opt.param_groups
    assert muon_group["momentum"] == pytest.approx(beta_from_halflife(2048, 512))
    assert adamw_group["lr"] == 1e-2 and adamw_group["betas"] == (0.9, beta_from_halflife(1e5, 512))
    (emb(torch.tensor([[1, 2, 3]])) @ body.weight).sum().backward()
    opt.step()
    assert set(opt.state[emb.weight]) == {"step", "exp_avg", "exp_avg_sq"}
    assert set(opt.state[body.weight]) == {"momentum_buffer"}


def test_vector_in_a_muon_group_is_an_error():
    w, b = torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(4))
    with pytest.raises(
        ValueError,
        match=r"^smallbatch_rs\.Muon: parameter 1 \(param group 0, index 1, shape \(4,\)\) is not a matrix; put it in a param group with use_muon=False",
    ):
        sb.Muon([{"params": [w, b], "use_muon": True}])


@pytest.mark.parametrize("flatten", [False, True])
def test_tensors_with_more_dims(flatten):
    """A (2, 6, 5) tensor is two matrices (per-head), or one 2 x 30 matrix when flattened."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(2, 6, 5))
    g = torch.randn(2, 6, 5)
    w0 = w.detach().clone()
    w.grad = g.clone()
    sb.Muon([w], lr=0.1, weight_decay=0.0, flatten=flatten).step()
    u = g + 0.95 * (0.05 * g - g)  # first step: B = 0.05 G; Nesterov: G + mu (B - G)
    if flatten:
        expected = w0 - 0.1 * 1.0 * newton_schulz_fp32(u.reshape(2, 30), (3.4445, -4.775, 2.0315), 5, 1e-7).reshape(2, 6, 5)
    else:
        scale = (6 / 5) ** 0.5
        expected = w0 - 0.1 * scale * newton_schulz_fp32(u, (3.4445, -4.775, 2.0315), 5, 1e-7)
    torch.testing.assert_close(w.detach(), expected, rtol=1e-4, atol=1e-6)


def test_checkpoint_round_trip_with_torch(fp32_torch_muon):
    batches = _batches(30)
    model, reference = _mlp(), _mlp()
    reference.load_state_dict(model.state_dict())
    ours = sb.Muon(model.parameters(), lr=0.02)
    _train(model, ours, batches[:15])
    buf = io.BytesIO()
    torch.save(ours.state_dict(), buf)
    buf.seek(0)
    theirs = torch.optim.Muon(model.parameters(), lr=0.02)
    theirs.load_state_dict(torch.load(buf, weights_only=True))
    _train(model, theirs, batches[15:])
    ref = torch.optim.Muon(reference.parameters(), lr=0.02)
    _train(reference, ref, batches)
    _close(model, reference)


def test_bf16_resume_is_bit_exact():
    batches = [(x.bfloat16(), y.bfloat16()) for x, y in _batches(20)]
    kwargs = dict(lr=0.02, stochastic_rounding=True, seed=4)
    model = _mlp(bias=True).bfloat16()
    start = copy.deepcopy(model.state_dict())
    _train(model, sb.Muon(model.parameters(), **kwargs), batches)
    straight = copy.deepcopy(model.state_dict())
    model.load_state_dict(start)
    first = sb.Muon(model.parameters(), **kwargs)
    _train(model, first, batches[:10])
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    second = sb.Muon(model.parameters(), **kwargs)
    second.load_state_dict(torch.load(buf, weights_only=True))
    _train(model, second, batches[10:])
    for k, v in model.state_dict().items():
        assert v.dtype == torch.bfloat16
        assert torch.equal(v.view(torch.int16), straight[k].view(torch.int16)), k
