"""One rank of the FSDP2 tests (tests/test_fsdp.py starts a few of these as gloo processes).

Usage: ``python fsdp_worker.py OUT_DIR CASE [CASE ...]`` with RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT set. Each case runs in the one process group; the rank writes ``OUT_DIR/rank{r}.json``:
per case, the largest differences it measured (the test asserts on them), or the error.

The reference for every comparison is the same optimizer (or torch.optim's) on an unsharded copy
of the model, given the very gradients the sharded model got (gathered from the shards), so a
difference is the optimizer's and not that of forward passes run in another order.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, Tuple

import torch
import torch.distributed as dist
from torch import nn

torch.set_num_threads(1)

import smallbatch_rs as sb  # noqa: E402

CASES: Dict[str, Callable[[str], Dict[str, Any]]] = {}


def case(fn: Callable[[str], Dict[str, Any]]) -> Callable[[str], Dict[str, Any]]:
    CASES[fn.__name__] = fn
    return fn


class Net(nn.Module):
    """Shapes that shard unevenly over 2 ranks: 11 embedding rows (6 + 5), a 13-row weight
    (7 + 6), a 5-row one (3 + 2), a one-row gain (1 + 0: rank 1 holds nothing), a batch of 3
    matrices (2 + 1), vectors."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.fc1 = nn.Linear(6, 13)
        self.fc2 = nn.Linear(13, 5)
        self.gain = nn.Parameter(torch.ones(1, 5))
        self.heads = nn.Parameter(torch.randn(3, 5, 5) * 0.2)
        self.norm = nn.LayerNorm(5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens).mean(dim=1)
        out = self.norm(self.fc2(torch.tanh(self.fc1(h)))) * self.gain
        return out + torch.einsum("bi,kij->bj", out, self.heads)


#: Where the ranks' tensors live: "cpu" (gloo), or "cuda" (NCCL, one GPU per rank).
DEVICE = os.environ.get("FSDP_TEST_DEVICE", "cpu")


def mesh(world: int | None = None) -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(DEVICE, (world or dist.get_world_size(),))


def make_models(seed: int = 0, dtype: torch.dtype = torch.float32, reshard: bool = True) -> Tuple[nn.Module, nn.Module]:
    """(sharded, unsharded) copies of one freshly initialised Net."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    ref = Net().to(dtype=dtype, device=DEVICE)
    model = copy.deepcopy(ref)
    m = mesh()
    for sub in (model.embed, model.fc1, model.fc2, model.norm):
        fully_shard(sub, mesh=m, reshard_after_forward=reshard)
    fully_shard(model, mesh=m, reshard_after_forward=reshard)
    return model, ref


def batch(step: int) -> Tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, 11, (4, 3), generator=g).to(DEVICE), torch.randn(4, 5, generator=g).to(DEVICE)


def backward(model: nn.Module, step: int) -> None:
    """The same batch on every rank: FSDP's averaged gradient is then the one-process gradient."""
    tokens, target = batch(step)
    out = model(tokens)
    torch.nn.functional.mse_loss(out.float(), target).backward()


def copy_grads(model: nn.Module, ref: nn.Module) -> None:
    """Gives the unsharded copy the sharded model's gradients (None where it has none)."""
    for p, q in zip(model.parameters(), ref.parameters()):
        q.grad = None if p.grad is None else p.grad.full_tensor()


def max_diff(model: nn.Module, ref: nn.Module) -> float:
    """Largest |difference| between the sharded model's parameters and the unsharded copy's."""
    worst = 0.0
    for p, q in zip(model.parameters(), ref.parameters()):
        full = p.full_tensor()
        worst = max(worst, (full.float() - q.float()).abs().max().item() if full.numel() else 0.0)
    return worst


def full_state(opt: torch.optim.Optimizer) -> List[Dict[str, torch.Tensor]]:
    """The optimizer's state per parameter (in param order), whole tensors."""
    out = []
    for group in opt.param_groups:
        for p in group["params"]:
            entry = opt.state.get(p, {})
            out.append({k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in entry.items()})
    return out


def state_diff(a: List[Dict[str, torch.Tensor]], b: List[Dict[str, torch.Tensor]]) -> float:
    worst = 0.0
    assert len(a) == len(b)
    for ea, eb in zip(a, b):
        assert set(ea) == set(eb), (set(ea), set(eb))
        for k in ea:
            x, y = ea[k], eb[k]
            assert tuple(x.shape) == tuple(y.shape), (k, x.shape, y.shape)
            if x.numel():
                worst = max(worst, (x.double() - y.double()).abs().max().item())
    return worst


def groups_of(model: nn.Module) -> List[Dict[str, Any]]:
    """Two param groups: matrices, and the rest with a smaller lr."""
    mats = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": mats}, {"params": rest, "lr_scale": 0.5}]


def run_pair(model: nn.Module, ref: nn.Module, make_opt: Callable[[Any], torch.optim.Optimizer], steps: int,
             drop: Tuple[int, ...] = (1,)) -> Dict[str, Any]:
    """Steps both models with the same gradients; on the steps in ``drop`` the fc2 weight has no
    gradient. Returns the largest parameter and state differences seen over the run."""
    opt, ref_opt = make_opt(model), make_opt(ref)
    worst_param = worst_state = 0.0
    for step in range(steps):
        backward(model, step)
        if step in drop:
            model.fc2.weight.grad = None
        copy_grads(model, ref)
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
        worst_param = max(worst_param, max_diff(model, ref))
        worst_state = max(worst_state, state_diff(full_state(opt), full_state(ref_opt)))
    return {"param": worst_param, "state": worst_state}


def scaled_groups(model: nn.Module, lr: float) -> List[Dict[str, Any]]:
    return [{"params": g["params"], "lr": lr * g.get("lr_scale", 1.0)} for g in groups_of(model)]


ELEMENTWISE: Dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "SGD": lambda m: sb.SGD(scaled_groups(m, 0.1), momentum=0.9, nesterov=True, weight_decay=0.01),
    "Adam": lambda m: sb.Adam(scaled_groups(m, 1e-2), amsgrad=True, weight_decay=0.01),
    "AdamW": lambda m: sb.AdamW(scaled_groups(m, 1e-2), weight_decay=0.1),
    "AdamW-SR": lambda m: sb.AdamW(scaled_groups(m, 1e-2), weight_decay=0.1, stochastic_rounding=True, seed=7),
    "SGD-SR": lambda m: sb.SGD(scaled_groups(m, 0.05), momentum=0.5, stochastic_rounding=True, seed=3),
}


@case
def elementwise(_: str) -> Dict[str, Any]:
    """Every elementwise rule, float32 and bf16 (stochastic rounding), resharding after forward
    or not: the sharded step equals the unsharded one bit for bit."""
    out = {}
    for name, make_opt in ELEMENTWISE.items():
        dtype = torch.bfloat16 if name.endswith("-SR") else torch.float32
        for reshard in (True, False):
            if reshard is False and name not in ("AdamW", "AdamW-SR"):
                continue
            model, ref = make_models(dtype=dtype, reshard=reshard)
            out[f"{name} reshard={reshard}"] = run_pair(model, ref, make_opt, steps=3)
    return out


ADAFACTOR: Dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "Adafactor": lambda m: sb.Adafactor(scaled_groups(m, 1e-2), min_dim_size_to_factor=1, beta1=0.9, weight_decay=0.01),
    "Adafactor-torch": lambda m: sb.Adafactor(
        scaled_groups(m, 1e-2), eps=(None, 1e-3), step_size_cap=True, min_dim_size_to_factor=2),
    "AdafactorSR": lambda m: sb.AdafactorSR(scaled_groups(m, 1e-2), min_dim_size_to_factor=1, seed=11),
}


@case
def adafactor(_: str) -> Dict[str, Any]:
    """Adafactor with its statistics combined across ranks: factored matrices whose rows are
    spread (one with no row on rank 1), a batch of matrices spread, unfactored tensors spread;
    momentum, torch's epsilon handling, bf16 with stochastic rounding."""
    out = {}
    for name, make_opt in ADAFACTOR.items():
        dtype = torch.bfloat16 if name.endswith("SR") else torch.float32
        for reshard in (True, False):
            if reshard is False and name != "AdafactorSR":
                continue
            model, ref = make_models(dtype=dtype, reshard=reshard)
            out[f"{name} reshard={reshard}"] = run_pair(model, ref, make_opt, steps=3)
    return out


MUON: Dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "Muon": lambda m: sb.Muon(m.parameters(), lr=0.02, weight_decay=0.1, adamw_lr=1e-2),
    "Muon-flatten": lambda m: sb.Muon(
        m.parameters(), lr=0.02, nesterov=False, flatten=True, adjust_lr_fn="match_rms_adamw", ns_steps=3),
    "Muon-SR": lambda m: sb.Muon(m.parameters(), lr=0.02, stochastic_rounding=True, seed=13),
}


@case
def muon(_: str) -> Dict[str, Any]:
    """Muon: matrices whose rows are spread are gathered to an owning rank, orthogonalised there
    and scattered back; a batch of matrices spread over ranks is orthogonalised where it is
    (flatten=True makes it one matrix spread by rows instead); the AdamW groups of vectors step
    their shards; bf16 with stochastic rounding."""
    out = {}
    for name, make_opt in MUON.items():
        dtype = torch.bfloat16 if name.endswith("-SR") else torch.float32
        model, ref = make_models(dtype=dtype)
        out[name] = run_pair(model, ref, make_opt, steps=3)
    return out


@case
def errors(_: str) -> Dict[str, Any]:
    """Placements other than Shard(0)/Replicate, and DTensors mixed with plain tensors, are
    refused when the group is added, naming the parameter."""
    from torch.distributed.tensor import Shard, distribute_tensor

    m = mesh()
    col = nn.Parameter(distribute_tensor(torch.randn(4, 6), m, [Shard(1)]))
    out: Dict[str, Any] = {}
    try:
        sb.AdamW([{"params": [col], "param_names": ["attn.wq"]}])
    except ValueError as e:
        out["tensor_parallel"] = str(e)
    row = nn.Parameter(distribute_tensor(torch.randn(4, 6), m, [Shard(0)]))
    try:
        sb.SGD([row, nn.Parameter(torch.randn(3))], lr=0.1)
    except ValueError as e:
        out["mixed"] = str(e)
    return out


CHECKPOINT_STEPS = (2, 2)  # steps before the checkpoint, steps after it


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        backward(model, step)
        opt.step()
        opt.zero_grad()


def _params(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {n: p.full_tensor().clone() for n, p in model.named_parameters()}


def _same(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() if a[k].numel() else 0.0 for k in a)


DCP_RULES: Dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "SGD": lambda m: sb.SGD(m.parameters(), lr=0.1, momentum=0.9),
    "AdamW-SR": lambda m: sb.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1, stochastic_rounding=True, seed=5),
    "AdafactorSR": lambda m: sb.AdafactorSR(m.parameters(), lr=1e-2, min_dim_size_to_factor=1, beta1=0.9, seed=5),
    "Muon-SR": lambda m: sb.Muon(m.parameters(), lr=0.02, stochastic_rounding=True, seed=5),
}


@case
def dcp_checkpoint(out_dir: str) -> Dict[str, Any]:
    """Sharded DCP save and load: a run resumed from the checkpoint (into a model and optimizer
    initialised otherwise) equals the uninterrupted run bit for bit; the state DCP's helpers
    initialise (a step with zero gradients and lr=0) changes no parameter. Leaves each rule's
    checkpoint and final parameters in OUT_DIR for the 1-rank load."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict)

    before, after = CHECKPOINT_STEPS
    out: Dict[str, Any] = {}
    for name, make_opt in DCP_RULES.items():
        dtype = torch.bfloat16 if name.endswith("-SR") else torch.float32
        path = os.path.join(out_dir, f"ckpt-{name}")
        model, _ = make_models(seed=1, dtype=dtype)
        opt = make_opt(model)
        _train(model, opt, range(before))
        dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=path)
        _train(model, opt, range(before, before + after))
        expected = _params(model)
        if dist.get_rank() == 0:
            torch.save(expected, os.path.join(out_dir, f"expected-{name}.pt"))

        fresh, _ = make_models(seed=2, dtype=dtype)
        fresh_opt = make_opt(fresh)
        untouched = _params(fresh)
        state = {"model": get_model_state_dict(fresh), "optim": get_optimizer_state_dict(fresh, fresh_opt)}
        init_change = _same(untouched, _params(fresh))
        dcp.load(state, checkpoint_id=path)
        set_model_state_dict(fresh, state["model"])
        set_optimizer_state_dict(fresh, fresh_opt, state["optim"])
        _train(fresh, fresh_opt, range(before, before + after))
        out[name] = {"resumed": _same(expected, _params(fresh)), "init_step_change": init_change}
    return out


def load_into_one_rank(out_dir: str) -> Dict[str, Any]:
    """World size 1: loads the 2-rank checkpoints into a 1-rank FSDP model and continues."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict)

    before, after = CHECKPOINT_STEPS
    out: Dict[str, Any] = {}
    for name, make_opt in DCP_RULES.items():
        dtype = torch.bfloat16 if name.endswith("-SR") else torch.float32
        model, _ = make_models(seed=3, dtype=dtype)
        opt = make_opt(model)
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        dcp.load(state, checkpoint_id=os.path.join(out_dir, f"ckpt-{name}"))
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, opt, state["optim"])
        _train(model, opt, range(before, before + after))
        expected = torch.load(os.path.join(out_dir, f"expected-{name}.pt"))
        out[name] = {"resumed": _same(expected, _params(model))}
    return out


CASES["load_into_one_rank"] = load_into_one_rank


@case
def torch_optim_roundtrip(_: str) -> Dict[str, Any]:
    """Full (unsharded) optimizer state dicts: ours, sharded, into torch.optim's optimizer on an
    unsharded model and back; both continue as the uninterrupted sharded run."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict)

    full = StateDictOptions(full_state_dict=True)
    out: Dict[str, Any] = {}
    rules = {
        "SGD": (lambda ps: sb.SGD(ps, lr=0.1, momentum=0.9), lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)),
        "Adam": (lambda ps: sb.Adam(ps, lr=1e-2), lambda ps: torch.optim.Adam(ps, lr=1e-2)),
        "AdamW": (lambda ps: sb.AdamW(ps, lr=1e-2, weight_decay=0.1), lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1)),
    }
    for name, (ours, theirs) in rules.items():
        model, ref = make_models(seed=4)
        opt = ours(model.parameters())
        _train(model, opt, range(2))
        # A copy, as a checkpoint file would hold: the state dict's tensors are the optimizer's
        # own (as torch.optim's are), which a second optimizer loading them would share.
        sd = copy.deepcopy(get_optimizer_state_dict(model, opt, options=full))
        for p, q in zip(model.parameters(), ref.parameters()):
            q.data.copy_(p.full_tensor())
        torch_opt = theirs(ref.parameters())
        # The unsharded model takes the full state dict as its own (not full_state_dict=True:
        # torch's loader for that trips over param-group keys its optimizer does not have).
        set_optimizer_state_dict(ref, torch_opt, sd)
        # Both go on: torch's on the unsharded model with the sharded model's gradients.
        worst = 0.0
        for step in range(2, 4):
            backward(model, step)
            copy_grads(model, ref)
            opt.step()
            torch_opt.step()
            opt.zero_grad()
            torch_opt.zero_grad()
            worst = max(worst, max_diff(model, ref))
        # And back: torch's state into a fresh sharded optimizer of ours.
        back_sd = copy.deepcopy(get_optimizer_state_dict(ref, torch_opt, options=full))
        model2, _ = make_models(seed=5)
        with torch.no_grad():
            for p, q in zip(model2.parameters(), ref.parameters()):
                p.to_local().copy_(_local_rows(p, q))
        opt2 = ours(model2.parameters())
        set_optimizer_state_dict(model2, opt2, back_sd, options=full)
        back = 0.0
        for step in range(4, 6):
            backward(model2, step)
            copy_grads(model2, ref)
            opt2.step()
            torch_opt.step()
            opt2.zero_grad()
            torch_opt.zero_grad()
            back = max(back, max_diff(model2, ref))
        out[name] = {"to_torch": worst, "from_torch": back}
    return out


def _local_rows(p: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """The rows of ``whole`` that DTensor ``p``'s shard holds on this rank."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return whole.detach().narrow(0, offset[0] if shape[0] else 0, shape[0])


@case
def every_rule(_: str) -> Dict[str, Any]:
    """Every rule on FSDP2 (on a GPU: over NCCL; with one rank each parameter is whole, so
    Adafactor and Muon run their CUDA kernels unsharded) against the unsharded copy."""
    rules = {**ELEMENTWISE, **ADAFACTOR, **MUON}
    out = {}
    for name, make_opt in rules.items():
        dtype = torch.bfloat16 if name.endswith("SR") else torch.float32
        model, ref = make_models(dtype=dtype)
        out[name] = run_pair(model, ref, make_opt, steps=3)
    return out


@case
def forced_split(_: str) -> Dict[str, Any]:
    """Adafactor and Muon on one rank with every tensor treated as spread over the ranks: on a
    GPU their CUDA sharded paths run (the exchange packed by the kernels and all-reduced over
    NCCL, Muon's updates gathered to their owner, orthogonalised in cuBLAS and scattered back)
    with sums and gathers over one rank, so the result is the unsharded one."""
    from smallbatch_rs import _sharding

    init = _sharding.Sharding.__init__

    def spread_everything(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        self.split = [True] * len(self.split)

    _sharding.Sharding.__init__ = spread_everything  # type: ignore[method-assign]
    try:
        out = {}
        for name, make_opt in {**ADAFACTOR, **MUON}.items():
            dtype = torch.bfloat16 if name.endswith("SR") else torch.float32
            model, ref = make_models(dtype=dtype)
            out[name] = run_pair(model, ref, make_opt, steps=3)
        return out
    finally:
        _sharding.Sharding.__init__ = init  # type: ignore[method-assign]


def main() -> None:
    out_dir, names = sys.argv[1], sys.argv[2:]
    if DEVICE == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if DEVICE == "cuda" else "gloo")
    rank = dist.get_rank()
    results: Dict[str, Any] = {}
    for name in names:
        t0 = time.perf_counter()
        try:
            results[name] = {"result": CASES[name](out_dir)}
        except Exception:  # reported to the test, which fails with it
            results[name] = {"error": traceback.format_exc()}
        results[name]["seconds"] = time.perf_counter() - t0
        dist.barrier()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
