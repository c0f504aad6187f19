"""Half-life math and betas given as half-lives in tokens."""

from __future__ import annotations

import math

import pytest
import torch

import smallbatch_rs as sb
from smallbatch_rs.halflife import beta_from_halflife, halflife_from_beta, scale_beta


@pytest.mark.parametrize(
    "batch,expected",
    [(1, 0.999965), (4, 0.999858), (16, 0.999432), (64, 0.997731), (256, 0.990956), (1024, 0.964312), (4096, 0.864708)],
)
def test_paper_values(batch, expected):
    """t2 = 10M tokens, T = 512: the beta2 values in the paper's table."""
    assert round(beta_from_halflife(10e6, batch * 512), 6) == expected


def test_hand_computed():
    assert beta_from_halflife(1000, 1000) == 0.5
    assert beta_from_halflife(2000, 1000) == pytest.approx(math.sqrt(0.5), rel=1e-15)
    assert halflife_from_beta(0.5, 512) == pytest.approx(512, rel=1e-15)
    assert halflife_from_beta(0.999965, 512) == pytest.approx(512 * math.log(0.5) / math.log(0.999965), rel=1e-15)
    assert scale_beta(0.9, 1, 2) == pytest.approx(0.81, rel=1e-15)
    assert scale_beta(0.999965, 512, 64 * 512) == pytest.approx(0.999965**64, rel=1e-15)


def test_round_trip():
    for beta in (0.1, 0.9, 0.95, 0.999, 0.999965):
        t = halflife_from_beta(beta, 512)
        assert beta_from_halflife(t, 512) == pytest.approx(beta, rel=1e-13)


def _model():
    torch.manual_seed(0)
    return torch.nn.Linear(3, 2)


def test_adam_betas_from_halflives():
    opt = sb.AdamW(_model().parameters(), t1=1e4, t2=10e6, tokens_per_step=512)
    b1, b2 = opt.param_groups[0]["betas"]
    assert b1 == beta_from_halflife(1e4, 512)
    assert round(b2, 6) == 0.999965
    opt.set_tokens_per_step(64 * 512)
    assert round(opt.param_groups[0]["betas"][1], 6) == 0.997731
    assert opt.param_groups[0]["tokens_per_step"] == 64 * 512


def test_only_t2_keeps_default_beta1():
    opt = sb.Adam(_model().parameters(), t2=10e6, tokens_per_step=512)
    assert opt.param_groups[0]["betas"][0] == 0.9


def test_group_level_halflife_and_explicit_betas():
    m = _model()
    opt = sb.AdamW(
        [{"params": [m.weight], "t2": 1e6}, {"params": [m.bias], "betas": (0.5, 0.6)}],
        t2=10e6,
        tokens_per_step=100,
    )
    assert opt.param_groups[0]["betas"][1] == beta_from_halflife(1e6, 100)
    assert opt.param_groups[1]["betas"] == (0.5, 0.6)
    opt.set_tokens_per_step(200)
    assert opt.param_groups[0]["betas"][1] == beta_from_halflife(1e6, 200)
    assert opt.param_groups[1]["betas"] == (0.5, 0.6), "explicit betas are not rescaled"


def test_sgd_momentum_from_halflife():
    opt = sb.SGD(_model().parameters(), lr=0.1, t1=2048, tokens_per_step=512)
    assert opt.param_groups[0]["momentum"] == pytest.approx(0.5**0.25)


def test_halflife_too_long_for_float64_names_the_halflife():
    with pytest.raises(ValueError, match=r"^smallbatch_rs\.Adam: invalid t2: 1e\+30 \(param group 0; must be short enough"):
        sb.Adam(_model().parameters(), t2=1e30, tokens_per_step=1)


def test_set_tokens_per_step_rejects_bad_values_and_changes_nothing():
    opt = sb.AdamW(_model().parameters(), t2=1e6, tokens_per_step=512)
    before = [dict(g, params=None) for g in opt.param_groups]
    with pytest.raises(ValueError, match=r"invalid tokens_per_step: 0 \(param group 0; must be finite and > 0\)"):
        opt.set_tokens_per_step(0)
    assert [dict(g, params=None) for g in opt.param_groups] == before


def test_duplicate_parameter_in_a_group_warns_and_is_kept_once():
    """torch.optim warns about a parameter listed twice in a group; ours warns the same way and
    steps it once (torch would apply its update twice)."""
    m = _model()
    with pytest.warns(UserWarning, match="duplicate parameters"):
        opt = sb.SGD([m.weight, m.bias, m.weight], lr=0.5)
    assert opt.param_groups[0]["params"] == [m.weight, m.bias]
    before = m.weight.detach().clone()
    m.weight.grad = torch.ones_like(m.weight)
    opt.step()
    assert torch.equal(m.weight.detach(), before - 0.5)
