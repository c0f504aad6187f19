"""On an NVIDIA GPU: every CUDA rule (SGD, Adam, AdamW, Adafactor, AdafactorSR, Muon) equals the
CPU core, AdamW equals torch's fused AdamW, steps are captured and replayed in a CUDA graph, and
work on a side stream is ordered correctly.

Skipped without a GPU (run with ``pytest -m cuda`` on a machine that has one)."""

from __future__ import annotations

import copy

import pytest
import torch

import smallbatch_rs as sb

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU: CUDA tests need an NVIDIA GPU and driver"),
]

CASES = {
    "SGD": lambda ps, **kw: sb.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01, **kw),
    "Adam": lambda ps, **kw: sb.Adam(ps, lr=1e-2, weight_decay=0.01, **kw),
    "AdamW": lambda ps, **kw: sb.AdamW(ps, lr=1e-2, weight_decay=0.1, **kw),
}


def _model(dtype):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(33, 257), torch.nn.Tanh(), torch.nn.Linear(257, 65)).to(dtype)


def _grads(model, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g).to(p.dtype) for p in model.parameters()]


def _capture(step):
    """Captures ``step()`` in a CUDA graph on a side stream (as torch's docs do); returns the graph
    and the stream."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side):
        with torch.cuda.graph(graph, stream=side):
            step()
    torch.cuda.current_stream().wait_stream(side)
    return graph, side


def _train_backward(model, opt, steps=5):
    for s in range(steps):
        opt.zero_grad()
        g = torch.Generator().manual_seed(s)
        x = torch.randn(4, 33, generator=g).to(next(model.parameters()))
        model(x).float().square().mean().backward()
        opt.step()


def _step_both(models, opts, steps=5):
    """Steps the CPU and the GPU optimizer on the same gradients. A backward pass would not give
    them: the devices' matrix products round differently, and Adam magnifies that where the
    second moment is small (seen on an H100: 1.5e-4 relative after five steps)."""
    for s in range(steps):
        grads = _grads(models[0], s)
        for m, opt in zip(models, opts):
            for p, g in zip(m.parameters(), grads):
                p.grad = g.to(p.device)
            opt.step()


@pytest.mark.parametrize("name", CASES)
def test_cuda_equals_cpu_fp32(name):
    cpu = _model(torch.float32)
    gpu = copy.deepcopy(cpu).cuda()
    opts = [CASES[name](m.parameters()) for m in (cpu, gpu)]
    _step_both((cpu, gpu), opts)
    for a, b in zip(cpu.parameters(), gpu.parameters()):
        torch.testing.assert_close(b.detach().cpu(), a.detach(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", CASES)
def test_cuda_fp32_is_bit_identical_to_cpu(name):
    """Stronger than the issue's 1e-6: the kernels use the CPU core's operations in its order,
    correctly rounded and never fused (common.cuh), so weights and state agree bit for bit."""
    cpu = _model(torch.float32)
    gpu = copy.deepcopy(cpu).cuda()
    opts = [CASES[name](m.parameters()) for m in (cpu, gpu)]
    _step_both((cpu, gpu), opts)
    for a, b in zip(cpu.parameters(), gpu.parameters()):
        assert torch.equal(b.detach().cpu(), a.detach())
        for key, value in opts[0].state[a].items():
            if torch.is_tensor(value) and value.numel() > 1:
                assert torch.equal(opts[1].state[b][key].cpu(), value), key


@pytest.mark.parametrize("name", CASES)
def test_cuda_stochastic_rounding_is_bit_identical_to_cpu(name):
    """bf16 weights, same seed: the GPU's stochastic rounding draws the CPU's bits. Gradients are
    fed identically (no backward, whose bf16 matmuls differ between devices)."""
    cpu = _model(torch.bfloat16)
    gpu = copy.deepcopy(cpu).cuda()
    opts = [CASES[name](m.parameters(), stochastic_rounding=True, seed=7) for m in (cpu, gpu)]
    for s in range(4):
        for m, opt in zip((cpu, gpu), opts):
            for p, g in zip(m.parameters(), _grads(cpu, s)):
                p.grad = g.to(p.device)
            opt.step()
    for a, b in zip(cpu.parameters(), gpu.parameters()):
        assert torch.equal(b.detach().cpu().view(torch.int16), a.detach().view(torch.int16))


@pytest.mark.parametrize("name", CASES)
def test_cuda_bf16_round_to_nearest_is_bit_identical_to_cpu(name):
    """bf16 weights rounded to nearest: the same bits on both devices, over a buffer long enough
    for whole 256-element tiles and a partial one (the bf16 SGD kernel treats them differently)."""
    cpu = _model(torch.bfloat16)
    gpu = copy.deepcopy(cpu).cuda()
    opts = [CASES[name](m.parameters()) for m in (cpu, gpu)]
    _step_both((cpu, gpu), opts, steps=3)
    for a, b in zip(cpu.parameters(), gpu.parameters()):
        assert torch.equal(b.detach().cpu().view(torch.int16), a.detach().view(torch.int16))


def test_stochastic_round_cuda_equals_cpu():
    x = torch.randn(1_000_003) * 3
    for seed, step, stream in ((0, 0, 0), (123, 45, 6)):
        a = sb.stochastic_round(x, seed, step, stream)
        b = sb.stochastic_round(x.cuda(), seed, step, stream).cpu()
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))


def test_adamw_equals_torch_fused():
    ours_model = _model(torch.float32).cuda()
    theirs_model = copy.deepcopy(ours_model)
    _train_backward(ours_model, sb.AdamW(ours_model.parameters(), lr=1e-2, weight_decay=0.1), 20)
    _train_backward(theirs_model, torch.optim.AdamW(theirs_model.parameters(), lr=1e-2, weight_decay=0.1, fused=True), 20)
    for a, b in zip(ours_model.parameters(), theirs_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_step_in_a_cuda_graph():
    """The step launches on torch's current stream with no host sync: it can be captured and replayed."""
    model = _model(torch.float32).cuda()
    ref = copy.deepcopy(model)
    opt = sb.AdamW(model.parameters(), lr=1e-3)
    ref_opt = sb.AdamW(ref.parameters(), lr=1e-3)
    for p in list(model.parameters()) + list(ref.parameters()):
        p.grad = torch.ones_like(p)
    opt.step()  # warm-up outside capture: compiles and loads the kernels, creates state
    ref_opt.step()
    graph, _ = _capture(opt.step)
    # the step counter is host-side: replays reuse the captured step's constants
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))


def test_side_stream_ordering():
    """A step issued on a side stream after work on that stream sees that work's gradients."""
    model = _model(torch.float32).cuda()
    twin = copy.deepcopy(model)
    opt, twin_opt = sb.SGD(model.parameters(), lr=0.1), sb.SGD(twin.parameters(), lr=0.1)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        for p in model.parameters():
            p.grad = torch.full_like(p, 2.0)
        opt.step()
    torch.cuda.synchronize()
    for p in twin.parameters():
        p.grad = torch.full_like(p, 2.0)
    twin_opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


# --- tensors where torch keeps them: many of them, odd sizes, amsgrad, graphs, moves -----------


def _many(dtype, device="cpu", count=230):
    """More tensors than one launch takes (96), of sizes that make whole and partial warp tiles,
    each in its own allocation."""
    g = torch.Generator().manual_seed(5)
    sizes = [1 + (37 * i) % 700 for i in range(count)] + [4096, 8, 1000]
    return [torch.nn.Parameter((torch.randn(n, generator=g) * 0.1).to(dtype).to(device)) for n in sizes]


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_tensors_equal_cpu_bit_for_bit(name, dtype):
    """Several tensor lists per step, some tensors without a gradient some steps (mixed step
    counts), stochastic rounding for bf16: weights and state equal the CPU's bits."""
    cpu = _many(dtype)
    gpu = _twin(cpu)
    kw = dict(stochastic_rounding=True, seed=3) if dtype == torch.bfloat16 else {}
    opts = [CASES[name](ps, **kw) for ps in (cpu, gpu)]
    for s in range(4):
        g = torch.Generator().manual_seed(50 + s)
        grads = [torch.randn(p.shape, generator=g).to(dtype) for p in cpu]
        for ps, opt in zip((cpu, gpu), opts):
            for i, (p, grad) in enumerate(zip(ps, grads)):
                p.grad = None if (i + s) % 7 == 0 else grad.to(p.device)
            opt.step()
    for a, b in zip(cpu, gpu):
        assert torch.equal(b.detach().cpu().view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                           a.detach().view(torch.int16 if dtype == torch.bfloat16 else torch.int32))


@pytest.mark.parametrize("cls", [sb.Adam, sb.AdamW])
def test_amsgrad_equals_cpu_bit_for_bit(cls):
    cpu = _model(torch.float32)
    gpu = copy.deepcopy(cpu).cuda()
    opts = [cls(m.parameters(), lr=1e-2, amsgrad=True) for m in (cpu, gpu)]
    _step_both((cpu, gpu), opts)
    for a, b in zip(cpu.parameters(), gpu.parameters()):
        assert torch.equal(b.detach().cpu(), a.detach())
        assert torch.equal(opts[1].state[b]["max_exp_avg_sq"].cpu(), opts[0].state[a]["max_exp_avg_sq"])


@pytest.mark.parametrize("name", CASES)
def test_graph_with_static_gradients_replays_the_eager_step(name):
    """zero_grad(set_to_none=False) keeps every gradient where it is, so a captured step reads the
    current gradients at each replay; with a constant lr the replayed SGD equals eager steps (Adam's
    bias corrections are the captured step's, see the README)."""
    model = _model(torch.float32).cuda()
    twin = copy.deepcopy(model)
    opt, twin_opt = CASES[name](model.parameters()), CASES[name](twin.parameters())
    for m, o in ((model, opt), (twin, twin_opt)):
        for p in m.parameters():
            p.grad = torch.zeros_like(p)
        o.step()  # warm-up outside the capture
    graph, _ = _capture(opt.step)
    for s in range(3):
        grads = _grads(model, 10 + s)
        for m in (model, twin):
            for p, g in zip(m.parameters(), grads):
                p.grad.copy_(g.to(p.device))
        graph.replay()
        twin_opt.step()
    torch.cuda.synchronize()
    if name == "SGD":
        for a, b in zip(model.parameters(), twin.parameters()):
            assert torch.equal(a, b)
    else:
        assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("name", CASES)
def test_state_follows_parameters_swapped_to_the_gpu(name):
    """With torch's tensor swapping, model.to("cuda") keeps the Parameter objects: the optimizer
    moves its state along and continues on the GPU where the CPU would have."""
    cpu = _model(torch.float32)
    moved = copy.deepcopy(cpu)
    opts = [CASES[name](m.parameters()) for m in (cpu, moved)]
    _step_both((cpu, moved), opts, steps=2)
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        moved.cuda()
    finally:
        torch.__future__.set_swap_module_params_on_conversion(previous)
    for s in range(2, 4):
        grads = _grads(cpu, s)
        for m, opt in ((cpu, opts[0]), (moved, opts[1])):
            for p, g in zip(m.parameters(), grads):
                p.grad = g.to(p.device)
            opt.step()
    for a, b in zip(cpu.parameters(), moved.parameters()):
        assert b.is_cuda and torch.equal(b.detach().cpu(), a.detach())
        for key, value in opts[1].state[b].items():
            if torch.is_tensor(value) and value.numel() > 1:
                assert value.is_cuda, key


# --- Adafactor and Muon -------------------------------------------------------------------------

# Shapes that reach every Adafactor path: a batch of factored matrices, a factored matrix, a small
# (unfactored) matrix, a vector, and a vector of several 4096-element units.
_SHAPES = [(2, 40, 24), (257, 33), (33, 20), (65,), (10000,)]

ADAFACTOR_CASES = {
    # the paper's form: eps1 added, factored when the smaller dim is >= 16
    "paper": dict(lr=1e-2, min_dim_size_to_factor=16),
    # torch.optim.Adafactor's form: clamps instead of eps1, every matrix factored, capped step size
    "torch": dict(lr=1e-2, eps=(None, 1e-3), min_dim_size_to_factor=1, step_size_cap=True, weight_decay=0.01),
    # momentum, constant beta2, maximize, absolute step size, looser clipping
    "momentum": dict(lr=1e-3, beta1=0.9, beta2=0.999, min_dim_size_to_factor=16, maximize=True, relative_step=False, d=1.5),
}


def _params(dtype, device="cpu"):
    g = torch.Generator().manual_seed(1)
    return [torch.nn.Parameter((torch.randn(s, generator=g) * 0.1).to(dtype).to(device)) for s in _SHAPES]


def _twin(params):
    """The same values on the GPU."""
    return [torch.nn.Parameter(p.detach().clone().cuda()) for p in params]


def _feed(params, step, skip=()):
    """Gradients that depend only on the step (drawn on the CPU, so both devices get the same
    values), with every third row of each matrix zero (factored rows the step skips); tensors in
    ``skip`` get none this step."""
    g = torch.Generator().manual_seed(100 + step)
    for i, p in enumerate(params):
        grad = torch.randn(p.shape, generator=g).to(p.dtype)
        if grad.dim() >= 2:
            grad[..., 1::3, :] = 0
        p.grad = None if i in skip else grad.to(p.device)


def _run(params, opt, steps, skips):
    for s in range(steps):
        _feed(params, s, skips.get(s, ()))
        opt.step()


# Tensor 1 gets no gradient at step 2: the CUDA table is uploaded again for the new stepped set,
# and from then on tensor 1 lags one step behind the others (two runs of step counts).
_SKIPS = {2: (1,), 3: (4,)}


@pytest.mark.parametrize("case", ADAFACTOR_CASES)
def test_adafactor_cuda_equals_cpu_fp32(case):
    cpu = _params(torch.float32)
    gpu = _twin(cpu)
    opt_cpu = sb.Adafactor(cpu, **ADAFACTOR_CASES[case])
    opt_gpu = sb.Adafactor(gpu, **ADAFACTOR_CASES[case])
    _run(cpu, opt_cpu, 6, _SKIPS)
    _run(gpu, opt_gpu, 6, _SKIPS)
    for a, b in zip(cpu, gpu):
        torch.testing.assert_close(b.detach().cpu(), a.detach(), rtol=1e-6, atol=1e-6)
        sa, sg = opt_cpu.state[a], opt_gpu.state[b]
        assert sa.keys() == sg.keys()
        for name in sa:
            want, got = sa[name], sg[name]
            if name == "step":
                assert float(got) == float(want)
            else:
                torch.testing.assert_close(got.cpu(), want, rtol=1e-6, atol=1e-12, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("case", ["paper", "torch", "momentum"])
@pytest.mark.parametrize("stochastic", [True, False])
def test_adafactor_bf16_cuda_is_bit_identical_to_cpu(case, stochastic):
    """bf16 weights: AdafactorSR's stochastic rounding draws the CPU's bits (same seed, step and
    element), and round-to-nearest rounds the same f32 values. The f64 sums of squares are added
    in another order on the GPU; they change an f32 value only in a near-tie (about 2^-29 per
    rounding), so these small tensors come out identical."""
    cls = sb.AdafactorSR if stochastic else sb.Adafactor
    cpu = _params(torch.bfloat16)
    gpu = _twin(cpu)
    opt_cpu = cls(cpu, seed=11, **ADAFACTOR_CASES[case])
    opt_gpu = cls(gpu, seed=11, **ADAFACTOR_CASES[case])
    _run(cpu, opt_cpu, 5, _SKIPS)
    _run(gpu, opt_gpu, 5, _SKIPS)
    for i, (a, b) in enumerate(zip(cpu, gpu)):
        same = torch.equal(b.detach().cpu().view(torch.int16), a.detach().view(torch.int16))
        assert same, f"tensor {i} {tuple(a.shape)} differs"


def test_adafactor_mixed_cpu_and_cuda_groups():
    """One optimizer, a CPU group and a CUDA group: each steps on its own device."""
    cpu_a, cpu_b = _params(torch.float32), _params(torch.float32)
    gpu_b = _twin(cpu_b)
    mixed = sb.Adafactor([{"params": cpu_a}, {"params": gpu_b}], lr=1e-2, min_dim_size_to_factor=16)
    ref_a = [torch.nn.Parameter(p.detach().clone()) for p in cpu_a]
    ref = sb.Adafactor([{"params": ref_a}, {"params": cpu_b}], lr=1e-2, min_dim_size_to_factor=16)
    for s in range(3):
        for ps in (cpu_a, gpu_b, ref_a, cpu_b):
            _feed(ps, s)
        mixed.step()
        ref.step()
    for a, b in zip(ref_a, cpu_a):
        assert torch.equal(a, b)
    for a, b in zip(cpu_b, gpu_b):
        torch.testing.assert_close(b.detach().cpu(), a.detach(), rtol=1e-6, atol=1e-6)


def test_adafactor_step_in_a_cuda_graph():
    """An Adafactor step (set-step, five phases) is captured and replayed. With a constant beta2
    and no step-size cap the step count changes nothing in fp32, so each replay equals one more
    eager step of a twin optimizer, bit for bit."""
    params = _params(torch.float32, "cuda")
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    kw = dict(lr=1e-2, beta2=0.999, beta1=0.9, min_dim_size_to_factor=16)
    opt, twin_opt = sb.Adafactor(params, **kw), sb.Adafactor(twin, **kw)
    _feed(params, 0)
    _feed(twin, 0)
    opt.step()  # warm-up outside capture: kernels compiled, table uploaded, scratch allocated
    twin_opt.step()
    torch.cuda.synchronize()
    graph, _ = _capture(opt.step)
    for _ in range(3):
        graph.replay()
        twin_opt.step()  # the same gradients: every .grad still holds step 0's
    torch.cuda.synchronize()
    for a, b in zip(params, twin):
        assert torch.equal(a, b)
        for name in ("row_var", "col_var", "variance", "exp_avg"):
            if name in opt.state[a]:
                assert torch.equal(opt.state[a][name], twin_opt.state[b][name]), name


def _muon_params(dtype, device="cpu"):
    g = torch.Generator().manual_seed(2)
    shapes = [(48, 20), (20, 48), (3, 16, 24), (48, 20), (31,)]
    return [torch.nn.Parameter((torch.randn(s, generator=g) * 0.1).to(dtype).to(device)) for s in shapes]


def _muon(params, **kw):
    # use_muon unset: matrices go to Muon, the vector to the built-in AdamW (also on CUDA)
    return sb.Muon(params, lr=0.02, weight_decay=0.1, adamw_lr=1e-3, **kw)


# Newton-Schulz tolerance. cuBLAS and the CPU's GEMM add in different orders (and the CPU fuses
# multiply-adds), so each product differs by about 1e-6 relative; five quintic steps amplify an
# error at most by the slope of a s + b s^3 + c s^5, below a = 3.4445 per step (3.4445^5 < 500),
# so the orthogonalised update differs by less than 5e-4 of its largest entry. 2e-3 of the
# largest entry of the CPU's update leaves a margin of 4.
NS_FP32_TOL = 2e-3


def _updates(before, after):
    return [(b.detach().float().cpu() - a.detach().float().cpu()) for a, b in zip(before, after)]


def test_muon_cuda_matches_cpu_fp32():
    cpu = _muon_params(torch.float32)
    gpu = _twin(cpu)
    opt_cpu, opt_gpu = _muon(cpu), _muon(gpu)
    for s in range(4):
        before_cpu = [p.detach().clone() for p in cpu]
        before_gpu = [p.detach().clone() for p in gpu]
        _feed(cpu, s, (1,) if s == 2 else ())
        _feed(gpu, s, (1,) if s == 2 else ())
        opt_cpu.step()
        opt_gpu.step()
        du_cpu, du_gpu = _updates(before_cpu, cpu), _updates(before_gpu, gpu)
        for i, (uc, ug) in enumerate(zip(du_cpu, du_gpu)):
            if cpu[i].dim() == 1:
                continue  # AdamW: compared below
            scale = uc.abs().max().item()
            err = (ug - uc).abs().max().item()
            assert err <= NS_FP32_TOL * scale + 1e-12, f"step {s}, tensor {i}: {err} vs update {scale}"
    for i, (a, b) in enumerate(zip(cpu, gpu)):
        sa, sg = opt_cpu.state[a], opt_gpu.state[b]
        if a.dim() >= 2:
            # momentum depends on the gradients only: elementwise, bit for bit
            assert torch.equal(sg["momentum_buffer"].cpu(), sa["momentum_buffer"]), i
            torch.testing.assert_close(b.detach().cpu(), a.detach(), rtol=0, atol=4 * NS_FP32_TOL * 0.02 * 2)
        else:
            torch.testing.assert_close(b.detach().cpu(), a.detach(), rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(sg["exp_avg_sq"].cpu(), sa["exp_avg_sq"], rtol=1e-6, atol=0)


def test_muon_cuda_bf16_products_follow_fp32():
    """ns_precision="bfloat16": the products take bf16 operands (f32 accumulation), as torch's
    Muon does. bf16 keeps 8 bits, so the update only follows the f32 one in direction and size."""
    cpu = _muon_params(torch.float32)
    gpu = _twin(cpu)
    opt_cpu, opt_gpu = _muon(cpu), _muon(gpu, ns_precision="bfloat16")
    before = [p.detach().clone() for p in cpu]
    _feed(cpu, 0)
    _feed(gpu, 0)
    opt_cpu.step()
    opt_gpu.step()
    for i, (uc, ug) in enumerate(zip(_updates(before, cpu), _updates(before, gpu))):
        if cpu[i].dim() == 1:
            continue
        assert torch.isfinite(ug).all()
        cos = torch.nn.functional.cosine_similarity(uc.flatten(), ug.flatten(), dim=0).item()
        assert cos > 0.97, (i, cos)
        assert abs(ug.norm().item() / uc.norm().item() - 1) < 0.05, i


def test_muon_bf16_weights_on_cuda_are_deterministic_and_close_to_cpu():
    """bf16 weights with stochastic rounding: two CUDA runs give the same bits (cuBLAS is
    deterministic on one GPU), and the weights stay within a few bf16 ulps of the CPU's (the
    Newton-Schulz results differ slightly, so the rounding may differ by one ulp)."""
    runs = []
    for _ in range(2):
        gpu = _muon_params(torch.bfloat16, "cuda")
        opt = _muon(gpu, stochastic_rounding=True, seed=5)
        _run(gpu, opt, 3, {})
        runs.append([p.detach().cpu() for p in gpu])
    for a, b in zip(*runs):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))
    cpu = _muon_params(torch.bfloat16)
    _run(cpu, _muon(cpu, stochastic_rounding=True, seed=5), 3, {})
    for a, b in zip(cpu, runs[0]):
        torch.testing.assert_close(b.float(), a.detach().float(), rtol=2 ** -6, atol=1e-3)


def test_muon_step_in_a_cuda_graph():
    """A Muon step (momentum, norm, cuBLAS products, update) is captured and replayed: each replay
    equals one more eager step of a twin (fp32 weights, so the step count changes nothing)."""
    params = [p for p in _muon_params(torch.float32, "cuda") if p.dim() >= 2]
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt, twin_opt = _muon(params), _muon(twin)
    _feed(params, 0)
    _feed(twin, 0)
    opt.step()  # warm-up: kernels, cuBLAS handle and workspace
    twin_opt.step()
    torch.cuda.synchronize()
    graph, side = _capture(opt.step)
    for _ in range(2):
        graph.replay()
        with torch.cuda.stream(side):
            twin_opt.step()  # same stream as the capture: the same cuBLAS configuration
        torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    # cuBLAS may pick another kernel inside a capture than outside, so the products (not the
    # elementwise parts) can differ in rounding: about 1e-6 of the update, far below 1e-5.
    for a, b in zip(params, twin):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_steps_launch_on_torchs_current_stream():
    """The raw stream handle the optimizers launch on is torch's current stream, also inside a
    side-stream context."""
    from smallbatch_rs.optim.base import _current_raw_stream

    assert _current_raw_stream(0) == torch.cuda.current_stream(0).cuda_stream
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        assert _current_raw_stream(0) == side.cuda_stream != torch.cuda.default_stream(0).cuda_stream


# --- capturable=True: counted steps ---------------------------------------------------------------

CAPTURABLE = {
    "SGD": lambda ps, lr, **kw: sb.SGD(ps, lr=lr, momentum=0.9, nesterov=True, weight_decay=0.01, **kw),
    "Adam": lambda ps, lr, **kw: sb.Adam(ps, lr=lr, amsgrad=True, weight_decay=0.01, **kw),
    "AdamW": lambda ps, lr, **kw: sb.AdamW(ps, lr=lr, weight_decay=0.1, t2=20000.0, tokens_per_step=64, **kw),
    "Adafactor": lambda ps, lr, **kw: sb.Adafactor(ps, lr=lr, beta1=0.9, **kw),
    "Muon": lambda ps, lr, **kw: sb.Muon(ps, lr=lr, **kw),
}


@pytest.mark.parametrize("name", list(CAPTURABLE))
def test_capturable_cuda_steps_follow_plain_cuda_steps_across_a_schedule(name):
    """Counted kernels (counts and a float32 lr tensor on the GPU, bias corrections and beta2
    weights computed there) against the plain CUDA step under the same LambdaLR schedule: the
    same up to the device's f64 pow against the host's (a last-bit difference in a bias
    correction at most; on the CPU emulator they are bit for bit)."""
    plain = _model(torch.float32).cuda()
    counted = copy.deepcopy(plain)
    opts = [
        CAPTURABLE[name](plain.parameters(), torch.tensor(0.02, device="cuda")),
        CAPTURABLE[name](counted.parameters(), torch.tensor(0.02, device="cuda"), capturable=True),
    ]
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda t: 1.0 / (1 + t)) for o in opts]
    for s in range(6):
        grads = _grads(plain, s)
        for model, opt in zip((plain, counted), opts):
            for p, g in zip(model.parameters(), grads):
                p.grad = g.cuda()
            opt.step()
        for sched in scheds:
            sched.step()
    for p, q in zip(plain.parameters(), counted.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
        step = opts[1].state[q].get("step")
        if step is not None:
            assert step.device == q.device and step.item() == 6.0


@pytest.mark.parametrize("name", list(CAPTURABLE))
def test_a_graph_of_forward_backward_and_capturable_step_replays_the_eager_run(name):
    """torch's whole-network capture (warm-up on a side stream, then zero_grad / forward /
    backward / step in one graph, replayed with static inputs) under a LambdaLR schedule that
    moves a tensor lr in place: the replayed run follows an eager run with a plain step."""
    torch.manual_seed(0)
    data = [(torch.randn(4, 33, device="cuda"), torch.randn(4, 65, device="cuda")) for _ in range(10)]

    def loss_of(model, x, y):
        return (model(x) - y).square().mean()

    eager = _model(torch.float32).cuda()
    graphed = copy.deepcopy(eager)
    eager_opt = CAPTURABLE[name](eager.parameters(), 0.02)
    opt = CAPTURABLE[name](graphed.parameters(), torch.tensor(0.02, device="cuda"), capturable=True)
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda t: 1.0 / (1 + t)) for o in (eager_opt, opt)]
    static_x, static_y = data[0][0].clone(), data[0][1].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x, y in data[:3]:  # warm-up: kernels loaded, state created, autograd's buffers sized
            for model, o in ((eager, eager_opt), (graphed, opt)):
                o.zero_grad(set_to_none=True)
                loss_of(model, x, y).backward()
                o.step()
            for sched in scheds:
                sched.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        loss_of(graphed, static_x, static_y).backward()
        opt.step()
    for x, y in data[3:]:
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        eager_opt.zero_grad(set_to_none=True)
        loss_of(eager, x, y).backward()
        eager_opt.step()
        for sched in scheds:
            sched.step()
    torch.cuda.synchronize()
    for p, q in zip(eager.parameters(), graphed.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
    step = opt.state[next(graphed.parameters())].get("step")
    if step is not None:
        assert step.item() == 10.0  # 3 warm-up steps and 7 replays, counted on the device


def test_capturable_needs_the_lr_tensor_and_hyperparameters_where_the_step_can_read_them():
    model = _model(torch.float32).cuda()
    with pytest.raises(ValueError, match=r"a tensor lr must be on the parameters' device \(param group 0: lr on cpu, parameters on cuda:0\)"):
        sb.AdamW(model.parameters(), lr=torch.tensor(0.01), capturable=True)
    with pytest.raises(ValueError, match=r"only lr may be a tensor on the device \(param group 0: betas is on cuda:0\)"):
        sb.Adam(model.parameters(), betas=(torch.tensor(0.9, device="cuda"), torch.tensor(0.99, device="cuda")), capturable=True)


def test_trainer_cuda_graphs_follow_the_eager_run_and_resume_bit_for_bit(tmp_path):
    """``train --cuda-graphs`` (warm-up, one capture, replays with static inputs, the schedule
    moving a tensor lr) against the eager trainer at batch size 1, and a graphed run stopped and
    resumed against an uninterrupted graphed one."""
    import json

    from smallbatch_rs.train import TrainConfig, train

    common = dict(preset="tiny", seq_len=32, val_tokens=2048, progress=False, log_every=20, device="cuda",
                  optimizer="adamw", tokens=32 * 40)
    eager = train(TrainConfig(**common, out=str(tmp_path / "eager")))
    graphed = train(TrainConfig(**common, cuda_graphs=True, out=str(tmp_path / "graphed")))
    assert graphed["cuda_graphs"] and graphed["steps"] == eager["steps"] == 40
    assert abs(graphed["final_val_loss"] - eager["final_val_loss"]) < 1e-3
    train(TrainConfig(**common, cuda_graphs=True, out=str(tmp_path / "split"), stop_after=32 * 15))
    resumed = train(TrainConfig(**common, cuda_graphs=True, out=str(tmp_path / "split"), resume=True))
    whole = json.loads((tmp_path / "graphed" / "summary.json").read_text())
    assert resumed["final_val_loss"] == whole["final_val_loss"]


def test_suggest_batch_size_measures_graphed_steps_on_cuda():
    from smallbatch_rs.train import TrainConfig
    from smallbatch_rs.train.suggest import format_table, suggest_batch_size

    cfg = TrainConfig(preset="tiny", seq_len=32, device="cuda", optimizer="adamw", compile=False, progress=False)
    result = suggest_batch_size(cfg, max_batch_size=4, steps=3, progress=False)
    for r in result["rows"]:
        assert r["graphed_tokens_per_s"] > 0
        assert r["tokens_per_s"] == pytest.approx(max(r["eager_tokens_per_s"], r["graphed_tokens_per_s"]))
    assert "graphed" in format_table(result)
