"""bf16 weights: stochastic rounding (its bits, unbiasedness, NaN/Inf), and optimizers on bf16
parameters with float32 state, rounded to nearest or stochastically."""

from __future__ import annotations

import io
import math

import pytest
import torch

import smallbatch_rs as sb

M0, M1, W0, W1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85
MASK = 0xFFFFFFFF


def philox4x32_10(ctr, key):
    """Random123's Philox4x32-10, written out plainly: the independent reference."""
    c, k = list(ctr), list(key)
    for r in range(10):
        if r:
            k = [(k[0] + W0) & MASK, (k[1] + W1) & MASK]
        p0, p1 = M0 * c[0], M1 * c[2]
        c = [((p1 >> 32) ^ c[1] ^ k[0]) & MASK, p1 & MASK, ((p0 >> 32) ^ c[3] ^ k[1]) & MASK, p0 & MASK]
    return c


def reference_random_u16(seed, step, stream, index):
    block, lane = divmod(index, 8)
    out = philox4x32_10([block & MASK, block >> 32, step & MASK, stream], [seed & MASK, seed >> 32])
    return (out[lane // 2] >> (16 * (lane % 2))) & 0xFFFF


def reference_stochastic_round(x: torch.Tensor, seed, step=0, stream=0) -> torch.Tensor:
    bits = x.view(torch.int32).tolist()
    out = []
    for i, b in enumerate(bits):
        u = b & MASK
        if (u & 0x7FFFFFFF) > 0x7F800000:
            out.append((u >> 16) | 0x40)
        else:
            out.append(((u + reference_random_u16(seed, step, stream, i)) & MASK) >> 16)
    return torch.tensor([v - 0x10000 if v >= 0x8000 else v for v in out], dtype=torch.int16).view(torch.bfloat16)


def test_reference_philox_known_answers():
    assert philox4x32_10([0, 0, 0, 0], [0, 0]) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert philox4x32_10([MASK] * 4, [MASK, MASK]) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    assert philox4x32_10([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0]) == [
        0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1,
    ]


@pytest.mark.parametrize("seed,step,stream", [(0, 0, 0), (12345, 7, 3), (2**63 + 5, 2**33 + 1, 2**31)])
def test_stochastic_round_bits_match_the_definition(seed, step, stream):
    """Every output bit equals the documented definition (Philox at (index // 8, step, stream))."""
    x = torch.randn(301) * torch.logspace(-3, 3, 301)
    x[::50] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1.0, 3.0])[: len(x[::50])]
    ours = sb.stochastic_round(x, seed, step, stream)
    ref = reference_stochastic_round(x, seed, step % 2**32, stream)
    assert torch.equal(ours.view(torch.int16), ref.view(torch.int16))


def test_stochastic_round_is_unbiased():
    for value in (1.0 + 2**-10, -3.3, 1e-3, 123.456, 2.0**-130):  # the last one is subnormal
        x = torch.full((200_000,), value)
        y = sb.stochastic_round(x, seed=1).float()
        lo, hi = y.min().item(), y.max().item()
        spread = hi - lo
        assert len(torch.unique(y)) <= 2, "only the two neighbours"
        se = max(spread, 1e-45) / 2 / math.sqrt(len(x))
        assert abs(y.double().mean().item() - value) < 5 * se + 1e-12 * abs(value), value


def test_stochastic_round_determinism_nan_inf_exact():
    x = torch.randn(10_000)
    a, b = sb.stochastic_round(x, seed=3, step=2), sb.stochastic_round(x, seed=3, step=2)
    assert torch.equal(a.view(torch.int16), b.view(torch.int16))
    assert not torch.equal(a.view(torch.int16), sb.stochastic_round(x, seed=4, step=2).view(torch.int16))
    assert not torch.equal(a.view(torch.int16), sb.stochastic_round(x, seed=3, step=3).view(torch.int16))
    special = torch.tensor([float("nan"), -float("nan"), float("inf"), -float("inf")])
    out = sb.stochastic_round(special, seed=9).float()
    assert out[:2].isnan().all() and out[2] == float("inf") and out[3] == -float("inf")
    exact = torch.randn(1000).bfloat16().float()
    assert torch.equal(sb.stochastic_round(exact, seed=5), exact.bfloat16())
    assert torch.equal(sb.round_to_nearest_bf16(x).view(torch.int16), x.bfloat16().view(torch.int16))


def test_stochastic_round_bad_input():
    with pytest.raises(TypeError, match=r"^smallbatch_rs\.stochastic_round: expected a float32 tensor, got torch\.float64$"):
        sb.stochastic_round(torch.zeros(3, dtype=torch.float64), seed=0)
    with pytest.raises(ValueError, match=r"seed and step must be in \[0, 2\*\*64\)"):
        sb.stochastic_round(torch.zeros(3), seed=-1)


def _bf16_param(values):
    return torch.nn.Parameter(values.clone().bfloat16())


@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize(
    "make",
    [
        lambda ps, **kw: sb.AdamW(ps, lr=1e-2, weight_decay=0.1, **kw),
        lambda ps, **kw: sb.SGD(ps, lr=1e-2, momentum=0.9, **kw),
        lambda ps, **kw: sb.Adafactor(ps, lr=1e-2, min_dim_size_to_factor=4, **kw),
    ],
    ids=["AdamW", "SGD", "Adafactor"],
)
def test_bf16_step_is_the_float32_step_rounded(make, stochastic):
    """A step on bf16 weights equals the same step on float32 copies (float32 state, the bf16
    gradient upcast), rounded to bf16: to nearest, or stochastically with exactly the bits
    stochastic_round gives for (seed, step 1, the element's index, the group's index)."""
    torch.manual_seed(0)
    w = _bf16_param(torch.randn(6, 40))
    w.grad = torch.randn(6, 40).bfloat16()
    w32 = torch.nn.Parameter(w.detach().float())
    w32.grad = w.grad.float()
    make([w], stochastic_rounding=stochastic, seed=77).step()
    make([w32]).step()
    expected = sb.stochastic_round(w32.detach(), seed=77, step=1, stream=0) if stochastic else w32.detach().bfloat16()
    assert w.dtype == torch.bfloat16, "no silent upcast of the weights"
    assert torch.equal(w.detach().view(torch.int16), expected.view(torch.int16))


def test_why_stochastic_rounding_matters():
    """bf16 weights and a learning rate so small that round-to-nearest never changes them:
    AdafactorSR still fits a small regression, plain bf16 Adafactor stays exactly where it began."""
    torch.manual_seed(0)
    # weights in [4, 8), where bf16's spacing is 2**-5: every update of this run is below half of it
    target = (6.0 + 0.5 * torch.randn(8, 16)).clamp(4.5, 7.5)
    start = (target + 0.25 * torch.randn(8, 16)).clamp(4.2, 7.8).bfloat16()
    x = torch.randn(2000, 16) / 4
    y = x @ target.T
    results = {}
    for stochastic in (False, True):
        w = torch.nn.Parameter(start.clone())
        opt = sb.Adafactor([w], lr=2e-4, beta2=0.999, min_dim_size_to_factor=1, stochastic_rounding=stochastic, seed=1)
        for step in range(1500):
            xb, yb = x[step % 2000 : step % 2000 + 1], y[step % 2000 : step % 2000 + 1]  # batch size 1
            opt.zero_grad()
            torch.nn.functional.mse_loss(xb.bfloat16() @ w.T, yb.bfloat16()).backward()
            opt.step()
        results[stochastic] = w.detach().float()
    assert torch.equal(results[False], start.float()), "round-to-nearest drops every update"
    err_start = (start.float() - target).square().mean()
    err_sr = (results[True] - target).square().mean()
    assert err_sr < 0.3 * err_start, (float(err_start), float(err_sr))


def test_adafactor_sr_resume_is_bit_exact():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3)).bfloat16()
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    data = [(torch.randn(1, 12).bfloat16(), torch.randn(1, 3).bfloat16()) for _ in range(30)]

    def run(model, opt, batches):
        for x, y in batches:
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x).float(), y.float()).backward()
            opt.step()

    kwargs = dict(lr=1e-2, t2=1e3, tokens_per_step=1, min_dim_size_to_factor=8, seed=11)
    run(model, sb.AdafactorSR(model.parameters(), **kwargs), data)
    straight = {k: v.clone() for k, v in model.state_dict().items()}

    model.load_state_dict(snapshot)
    first = sb.AdafactorSR(model.parameters(), **kwargs)
    run(model, first, data[:15])
    buf = io.BytesIO()
    torch.save({"m": model.state_dict(), "o": first.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    model.load_state_dict(ck["m"])
    second = sb.AdafactorSR(model.parameters(), **kwargs)
    second.load_state_dict(ck["o"])
    run(model, second, data[15:])
    for k in straight:
        assert torch.equal(model.state_dict()[k].view(torch.int16), straight[k].view(torch.int16)), k
    state = second.state[model[0].weight]
    assert state["row_var"].dtype == torch.float32 and model[0].weight.dtype == torch.bfloat16
