"""FSDP2 (``fully_shard``) and DCP: every rule steps the local shards of DTensor parameters and
matches the same optimizer on an unsharded copy of the model given the same gradients.

Each test starts the ranks of tests/fsdp_worker.py as gloo processes on this machine (a process
start, importing torch, is most of a test's time, so each start runs several cases) and asserts
on the differences the ranks measured. The model shards unevenly over 2 ranks, and one of its
parameters has no rows at all on rank 1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict

import pytest
import torch
import torch.distributed as dist
from conftest import free_port

WORKER = Path(__file__).with_name("fsdp_worker.py")

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="this torch build has no torch.distributed")


def run_ranks(out: Path, world: int, *cases: str, device: str = "cpu") -> Dict[str, Any]:
    """Runs ``cases`` on ``world`` ranks (gloo on the CPU, NCCL on GPUs); returns rank 0's results
    per case (after checking that every rank finished every case without error)."""
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), OMP_NUM_THREADS="1",
               FSDP_TEST_DEVICE=device)
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(out), *cases],
            env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for r in range(world)
    ]
    logs = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        logs.append(err)
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} exited with {p.returncode}:\n{logs[r][-4000:]}"
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    for r, res in enumerate(results):
        for name in cases:
            assert "error" not in res[name], f"rank {r}, case {name}:\n{res[name]['error']}"
    return {name: results[0][name]["result"] for name in cases}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Dict[str, Any]:
    """One 2-rank start for the cases of this module; the checkpoints it leaves are loaded on
    one rank by ``test_two_rank_checkpoint_loads_into_one_rank``."""
    out = tmp_path_factory.mktemp("fsdp")
    results = run_ranks(out, 2, "elementwise", "adafactor", "muon", "errors", "dcp_checkpoint", "torch_optim_roundtrip")
    results["out"] = out
    return results


def test_elementwise_rules_step_shards_exactly_as_unsharded(two_ranks):
    """SGD (Nesterov, weight decay), Adam (amsgrad), AdamW, and bf16 AdamW and SGD with stochastic
    rounding; two param groups, a gradient missing on one step, uneven and empty shards, both
    reshard_after_forward settings: parameters and state equal the unsharded run bit for bit
    (bf16 too, as each shard draws its elements' own random bits)."""
    runs = two_ranks["elementwise"]
    assert len(runs) == 7
    for name, diff in runs.items():
        assert diff == {"param": 0.0, "state": 0.0}, name


def test_adafactor_combines_statistics_across_ranks(two_ranks):
    """Adafactor (momentum and weight decay; torch's epsilon handling with the step-size cap) and
    AdafactorSR on bf16: factored matrices whose rows are spread over the ranks (one with no row
    on rank 1), a batch of matrices spread, unfactored tensors spread. Column sums, the mean of
    the row EMAs and the RMS sums are added across ranks in f64 in another order than one process
    adds them, so equality is to rounding in principle; these runs agree bit for bit (0.0)."""
    runs = two_ranks["adafactor"]
    assert len(runs) == 4
    for name, diff in runs.items():
        assert diff["param"] <= 1e-6 and diff["state"] <= 1e-6, (name, diff)


def test_muon_orthogonalises_whole_matrices(two_ranks):
    """Muon (with its AdamW groups), flattened and not, Nesterov or not, bf16 with stochastic
    rounding: matrices whose rows are spread are orthogonalised whole on one rank each and
    scattered back; the result is the unsharded step's bit for bit."""
    runs = two_ranks["muon"]
    assert len(runs) == 3
    for name, diff in runs.items():
        assert diff == {"param": 0.0, "state": 0.0}, name


def test_unsupported_placements_and_mixed_groups_are_refused(two_ranks):
    errs = two_ranks["errors"]
    assert "parameter 'attn.wq'" in errs["tensor_parallel"]
    assert "placements (S(1))" in errs["tensor_parallel"] or "Shard(dim=1)" in errs["tensor_parallel"]
    assert "must be sharded on dim 0" in errs["tensor_parallel"]
    assert "mixes DTensor parameters" in errs["mixed"] and "parameter 1" in errs["mixed"]


def test_dcp_sharded_checkpoint_resumes_bit_for_bit(two_ranks):
    """dcp.save / dcp.load of get_/set_optimizer_state_dict into a model and optimizer
    initialised otherwise, for SGD, and bf16 AdamW, AdafactorSR (with momentum) and Muon with
    stochastic rounding; and the step with
    zero gradients and lr=0 that DCP's helpers take to create state changes no parameter."""
    for name, res in two_ranks["dcp_checkpoint"].items():
        assert res == {"resumed": 0.0, "init_step_change": 0.0}, name


def test_full_state_dict_goes_to_torch_optim_and_back(two_ranks):
    """Full state dicts between our sharded optimizer and torch.optim's on an unsharded model:
    both continue as the sharded run, to torch's rounding (its kernels differ from ours in the
    last bits)."""
    for name, res in two_ranks["torch_optim_roundtrip"].items():
        assert res["to_torch"] < 1e-6 and res["from_torch"] < 1e-6, (name, res)


def test_two_rank_checkpoint_loads_into_one_rank(two_ranks):
    res = run_ranks(Path(two_ranks["out"]), 1, "load_into_one_rank")["load_into_one_rank"]
    for name, r in res.items():
        assert r == {"resumed": 0.0}, name


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU: CUDA tests need an NVIDIA GPU and driver")
def test_every_rule_on_one_gpu_over_nccl(tmp_path):
    """FSDP2 over NCCL with one rank on one GPU: every rule's CUDA step of the (whole) local
    tensors equals the unsharded model's, bit for bit (the same kernels on the same values);
    then Adafactor and Muon with every tensor treated as spread over the ranks, which runs their
    CUDA sharded paths (sums and gathers over NCCL, of one rank). Several GPUs cannot be tested
    here; the sharded CUDA paths are checked with ranks as threads on the emulator
    (rust/cuda-emu/tests/adafactor_shards.rs, muon_shards.rs)."""
    res = run_ranks(tmp_path, 1, "every_rule", "forced_split", device="cuda")
    for name, diff in res["every_rule"].items():
        assert diff == {"param": 0.0, "state": 0.0}, (name, diff)
    for name, diff in res["forced_split"].items():
        # Adafactor's sharded path sums the row EMAs in another order than its row-mean kernel.
        assert diff["param"] <= 1e-6 and diff["state"] <= 1e-6, (name, diff)


def test_sharded_paths_on_one_rank(tmp_path):
    """Adafactor and Muon on one gloo rank with every tensor treated as spread over the ranks
    (the code path of several ranks, with sums and gathers over one): the unsharded result."""
    res = run_ranks(tmp_path, 1, "forced_split")["forced_split"]
    for name, diff in res.items():
        assert diff["param"] <= 1e-6 and diff["state"] <= 1e-6, (name, diff)
