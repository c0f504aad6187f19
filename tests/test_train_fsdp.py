"""The trainer on several processes with sharded weights (``smallbatch-rs train --fsdp``, FSDP2)
and the ZeRO optimizer wrapper: FSDP trains as DDP (every rule, bit for bit) and as one process
over the same global batches, a sharded checkpoint resumes bit for bit (and on another number of
processes), stepping inside backward equals the normal step, and summary.json counts each rank's
bytes.

One torchrun start (2 gloo processes) runs every multi-process case of this module, one after the
other in one process group, as tests/test_train.py's DDP test does: the start, importing torch in
each process, is most of its time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch
import torch.distributed as dist
from conftest import free_port

from smallbatch_rs import cli
from smallbatch_rs.train import TrainConfig

pytestmark = [
    pytest.mark.skipif(not dist.is_available(), reason="this torch build has no torch.distributed"),
    pytest.mark.usefixtures("shared_cache"),
]

STEPS = 20
STOP = 8  # the interrupted run stops after this many steps
# 2 micro-batches of one sequence per process and step, for 10 steps
ACCUM = ("--batch-size", "4", "--grad-accum", "2", "--tokens", str(128 * 10))




def _argv(optimizer: str, out: Path, *extra: str) -> List[str]:
    """A run of 20 steps of 2 sequences (one per process under torchrun), a train loss per step."""
    return ["train", "--preset", "tiny", "--seq-len", "32", "--tokens", str(64 * STEPS), "--batch-size", "2",
            "--val-tokens", "2048", "--eval-every", str(64 * STEPS), "--log-every", "1", "--no-progress",
            "--device", "cpu", "--optimizer", optimizer, "--out", str(out), *extra]


# Each process runs the list in order: CLI invocations, a copy of a run's folder (rank 0, then a
# barrier) and the ZeRO check, which writes each rank's results as JSON.
_RUNS = """\
import copy, json, shutil, sys
import torch, torch.distributed as dist
from smallbatch_rs.cli import main

def zero(out):
    # ZeroRedundancyOptimizer(optimizer_class=smallbatch_rs.AdamW) under DDP: each rank steps its
    # partition; the parameters equal DDP's with a whole AdamW on every rank, and the consolidated
    # state dict loads into a plain AdamW.
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP
    import smallbatch_rs as sb
    rank = dist.get_rank()
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    ref_net = copy.deepcopy(net)
    model, ref = DDP(net), DDP(ref_net)
    kwargs = dict(lr=1e-2, weight_decay=0.1, t2=1e4, tokens_per_step=4)
    opt = ZeroRedundancyOptimizer(net.parameters(), optimizer_class=sb.AdamW, **kwargs)
    ref_opt = sb.AdamW(ref_net.parameters(), **kwargs)
    for step in range(3):
        g = torch.Generator().manual_seed(100 + step)
        x, y = torch.randn(4, 8, generator=g), torch.randn(4, 4, generator=g)
        half = slice(2 * rank, 2 * rank + 2)
        for m, o in ((model, opt), (ref, ref_opt)):
            torch.nn.functional.mse_loss(m(x[half]), y[half]).backward()
            o.step()
            o.zero_grad()
    res = {"param_diff": max((p - q).abs().max().item() for p, q in zip(net.parameters(), ref_net.parameters())),
           "local_params": sum(len(g["params"]) for g in opt.optim.param_groups),
           "beta2": opt.optim.param_groups[0]["betas"][1]}
    opt.consolidate_state_dict(to=0)
    if rank == 0:
        loaded = sb.AdamW(copy.deepcopy(ref_net).parameters(), **kwargs)
        loaded.load_state_dict(opt.state_dict())
        a, b = loaded.state_dict()["state"], ref_opt.state_dict()["state"]
        res["state_diff"] = max((a[i][k] - b[i][k]).abs().max().item() for i in b for k in b[i])
    with open(f"{out}/zero-rank{rank}.json", "w") as f:
        json.dump(res, f)

for entry in json.loads(sys.argv[1]):
    if "argv" in entry:
        if main(entry["argv"]) != 0:
            sys.exit(f"smallbatch-rs {' '.join(entry['argv'])} failed")
    elif "copy" in entry:
        if dist.get_rank() == 0:
            shutil.copytree(*entry["copy"])
        dist.barrier()
    else:
        zero(entry["zero"])
"""


#: Rules run under --fsdp and DDP on 2 processes (SGD and AdamW also as one process); stopped and
#: resumed (AdafactorSR: bf16 weights with stochastic rounding); stepped inside backward.
MATCHED = ("sgd", "adamw", "adafactor", "muon")
RESUMED = ("adamw", "adafactor-sr")
IN_BACKWARD = ("adamw", "adafactor", "muon")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Dict[str, Path]:
    """Output folders: 1-process runs (plain, and --fsdp over a group of one), then under one
    torchrun of 2 processes: --fsdp and DDP runs of several rules, --fsdp runs stopped after 8
    steps (copied aside) and resumed, --fsdp runs stepped inside backward, --fsdp and DDP with
    gradient accumulation, and ZeRO."""
    tmp = tmp_path_factory.mktemp("fsdp-train")
    out: Dict[str, Path] = {}

    def folder(name: str) -> Path:
        out[name] = tmp / name
        return out[name]

    for opt in ("sgd", "adamw"):
        assert cli.main(_argv(opt, folder(f"single-{opt}"))) == 0
    assert cli.main(_argv("adamw", folder("fsdp1-adamw"), "--fsdp")) == 0
    assert not dist.is_initialized()  # the group of one is gone with its run

    entries: List[Dict[str, Any]] = []
    for opt in MATCHED:
        entries += [{"argv": _argv(opt, folder(f"fsdp-{opt}"), "--fsdp")}, {"argv": _argv(opt, folder(f"ddp-{opt}"))}]
    for opt in IN_BACKWARD:
        if opt not in MATCHED:
            entries.append({"argv": _argv(opt, folder(f"fsdp-{opt}"), "--fsdp")})
        entries.append({"argv": _argv(opt, folder(f"sib-{opt}"), "--fsdp", "--step-in-backward")})
    for opt in RESUMED:
        if opt not in MATCHED:
            entries.append({"argv": _argv(opt, folder(f"fsdp-{opt}"), "--fsdp")})
        split, stopped = folder(f"split-{opt}"), folder(f"stopped-{opt}")
        entries += [
            {"argv": _argv(opt, split, "--fsdp", "--stop-after", str(64 * STOP))},
            {"copy": [str(split), str(stopped)]},
            {"argv": _argv(opt, split, "--fsdp", "--resume")},
        ]
    entries += [
        {"argv": _argv("adamw", folder("fsdp-accum"), "--fsdp", *ACCUM)},
        {"argv": _argv("adamw", folder("ddp-accum"), *ACCUM)},
        {"zero": str(tmp)},
    ]
    script = tmp / "runs.py"
    script.write_text(_RUNS)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), str(script), json.dumps(entries)],
        capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    out["zero"] = tmp
    return out


def _summary(out: Path) -> Dict[str, Any]:
    return json.loads((out / "summary.json").read_text())


def _records(out: Path) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _train_losses(out: Path) -> List[float]:
    return [r["train_loss"] for r in _records(out) if "train_loss" in r]


def _losses(out: Path) -> List[Any]:
    """Every metrics record's step and losses (not its throughput, which is the machine's)."""
    return [(r["step"], r.get("train_loss"), r.get("val_loss")) for r in _records(out)]


def _checkpoint(out: Path) -> Dict[str, Any]:
    """The whole model and optimizer state of a run's checkpoint: the sharded folder gathered by
    torch's converter, or the safetensors file."""
    if (out / "checkpoint").is_dir():
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        whole = out.parent / f"{out.name}-whole.pt"
        if not whole.exists():
            dcp_to_torch_save(str(out / "checkpoint"), str(whole))
        return torch.load(str(whole), weights_only=False)
    from safetensors.torch import load_file

    tensors = load_file(str(out / "checkpoint.safetensors"))
    return {"model": {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}}


def _model(out: Path) -> Dict[str, torch.Tensor]:
    return _checkpoint(out)["model"]


def _assert_equal_models(a: Path, b: Path) -> None:
    ma, mb = _model(a), _model(b)
    assert ma.keys() == mb.keys()
    for k in ma:
        assert torch.equal(ma[k], mb[k]), f"{a.name} vs {b.name}: {k} differs by {(ma[k] - mb[k]).abs().max().item():.3g}"


def _assert_close_to_one_process(optimizer: str, sharded: Path, single: Path) -> None:
    """tests/test_train.py's DDP check, for the same reason: the two runs add the same
    per-sequence gradients in different orders (a backward over 2 sequences vs. two backwards of
    one, reduced), so their gradients differ in the last bits. SGD is linear in them: 1e-6
    everywhere. Adam(W) divides by sqrt of the second moment, which follows the rounding where an
    element's gradients nearly cancel: at most 1 element in 10^4 drifts past 1e-5, none by more
    than one step (the peak lr). A summed instead of averaged gradient, a rank stepping on its own
    gradient or another schedule breaks these by orders of magnitude."""
    a, b = _model(single), _model(sharded)
    assert a.keys() == b.keys()
    if optimizer == "sgd":
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"sgd {k}: {m}")
        return
    one_step = TrainConfig(optimizer=optimizer).resolved_lr
    numel = sum(v.numel() for v in a.values())
    drifted = {k: int((~torch.isclose(b[k], a[k], rtol=1e-4, atol=1e-5)).sum()) for k in a}
    assert sum(drifted.values()) <= numel // 10_000, {k: n for k, n in drifted.items() if n}
    for k in a:
        worst = (b[k] - a[k]).abs().max().item()
        assert worst <= one_step, f"{optimizer} {k}: an element differs by {worst:.3g} > one step ({one_step:g})"


@pytest.mark.parametrize("optimizer", [opt for opt in MATCHED if opt not in ("sgd", "adamw")])
def test_fsdp_matches_ddp_for_every_rule(runs, optimizer):
    """The rules that reduce over whole tensors, under --fsdp on 2 processes against DDP's run.
    Muon gathers each matrix whose rows are spread over the ranks to one rank and orthogonalises
    it whole: DDP's bits. Adafactor adds the two ranks' partial column sums of squared gradients
    and RMS sums, in float64, in another order than one process adds all rows, so it agrees to
    rounding in principle (these runs agree bit for bit): weights to 1e-6, losses to 1e-6
    relative, where a sum or a mean taken over one rank's rows alone is off by percents."""
    sharded, ddp = runs[f"fsdp-{optimizer}"], runs[f"ddp-{optimizer}"]
    assert _summary(sharded)["steps"] == STEPS
    if optimizer == "muon":
        _assert_equal_models(sharded, ddp)
        assert _losses(sharded) == _losses(ddp)
        return
    a, b = _model(ddp), _model(sharded)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{optimizer} {k}: {m}")
    records, records_ddp = _losses(sharded), _losses(ddp)
    assert [r[0] for r in records] == [r[0] for r in records_ddp]
    for (step, *losses), (_, *losses_ddp) in zip(records, records_ddp):
        for x, y in zip(losses, losses_ddp):
            assert (x is None and y is None) or x == pytest.approx(y, rel=1e-6), step


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_fsdp_two_processes_match_ddp_and_one_process(runs, optimizer):
    """2 processes with one sequence each under --fsdp: the DDP run's bits (each gradient element
    is the sum of the same two numbers halved, which is exact, and each shard is stepped as the
    whole tensor), and one process with batch size 2 to the summation order's rounding: per-step
    train losses and the final held-out loss to 1e-5 relative (1e-7 measured; a 1% different
    learning rate moves the final loss by 7e-4), weights as tests/test_train.py's DDP test."""
    sharded, ddp, single = runs[f"fsdp-{optimizer}"], runs[f"ddp-{optimizer}"], runs[f"single-{optimizer}"]
    s_fsdp, s_single = _summary(sharded), _summary(single)
    assert s_fsdp["world_size"] == 2 and s_fsdp["config"]["fsdp"] is True
    assert s_fsdp["steps"] == s_single["steps"] == STEPS and s_fsdp["tokens"] == s_single["tokens"]
    assert (sharded / "checkpoint" / "trainer.json").is_file() and not (sharded / "checkpoint.safetensors").exists()

    _assert_equal_models(sharded, ddp)
    assert _losses(sharded) == _losses(ddp)

    losses, reference = _train_losses(sharded), _train_losses(single)
    assert len(losses) == len(reference) == STEPS
    for step, (x, y) in enumerate(zip(losses, reference), 1):
        assert x == pytest.approx(y, rel=1e-5), f"step {step}"
    assert s_fsdp["final_val_loss"] == pytest.approx(s_single["final_val_loss"], rel=1e-5)
    _assert_close_to_one_process(optimizer, sharded, single)


def test_fsdp_grad_accum_matches_ddp(runs):
    """--grad-accum 2 under --fsdp: the first micro-batch accumulates unsharded gradients without
    reducing them (set_requires_gradient_sync(False), DDP's no_sync), the second reduce-scatters
    their sum: DDP's bits."""
    s = _summary(runs["fsdp-accum"])
    assert s["steps"] == 10 and s["config"]["grad_accum"] == 2
    _assert_equal_models(runs["fsdp-accum"], runs["ddp-accum"])
    assert _losses(runs["fsdp-accum"]) == _losses(runs["ddp-accum"])


def test_fsdp_in_one_process_equals_the_plain_run(runs):
    """--fsdp without torchrun: FSDP over a process group of one, the plain run's bits."""
    a, b = runs["fsdp1-adamw"], runs["single-adamw"]
    assert _summary(a)["world_size"] == 1 and _summary(a)["config"]["fsdp"] is True
    _assert_equal_models(a, b)
    assert _losses(a) == _losses(b)


@pytest.mark.parametrize("optimizer", RESUMED)
def test_fsdp_resume_equals_uninterrupted_run(runs, optimizer):
    """Stopped after 8 of 20 steps (sharded checkpoint) and resumed: the uninterrupted run's
    weights, optimizer state and every loss, bit for bit (AdafactorSR: its stochastic rounding
    goes on with the same bits)."""
    stopped_dir, split_dir, whole_dir = runs[f"stopped-{optimizer}"], runs[f"split-{optimizer}"], runs[f"fsdp-{optimizer}"]
    stopped = json.loads((stopped_dir / "checkpoint" / "trainer.json").read_text())
    assert stopped["step"] == STOP and stopped["world_size"] == 2
    assert _summary(stopped_dir)["steps"] == STOP and not _summary(stopped_dir)["complete"]
    assert not list(split_dir.glob(".checkpoint*"))  # the temporary folders are gone

    whole, split = _checkpoint(whole_dir), _checkpoint(split_dir)
    _assert_equal_models(whole_dir, split_dir)
    state_a, state_b = whole["optim"]["state"], split["optim"]["state"]
    assert state_a.keys() == state_b.keys() and len(state_a) == 10
    for name in state_a:
        assert state_a[name].keys() == state_b[name].keys() and "step" in state_a[name]
        for k in state_a[name]:
            assert torch.equal(state_a[name][k], state_b[name][k]), (name, k)
    assert _losses(split_dir) == _losses(whole_dir)
    assert _summary(split_dir)["final_val_loss"] == _summary(whole_dir)["final_val_loss"]


def test_fsdp_checkpoint_resumes_on_another_number_of_processes(runs, tmp_path, capsys):
    """The 2-process checkpoint resumed by one process (DCP redistributes the shards): the same
    batches, so the 2-process run's result to the summation order's rounding, with a warning."""
    import shutil

    out = tmp_path / "resumed"
    shutil.copytree(runs["stopped-adamw"], out)
    assert cli.main(_argv("adamw", out, "--fsdp", "--resume")) == 0
    assert "the checkpoint was written by 2 processes, this run has 1" in capsys.readouterr().err
    s = _summary(out)
    assert s["steps"] == STEPS and s["world_size"] == 1
    assert s["final_val_loss"] == pytest.approx(_summary(runs["fsdp-adamw"])["final_val_loss"], rel=1e-5)
    _assert_close_to_one_process("adamw", out, runs["fsdp-adamw"])


@pytest.mark.parametrize("optimizer", IN_BACKWARD)
def test_fsdp_step_in_backward_equals_the_normal_step(runs, optimizer):
    """FSDP2 calls a sharded parameter's post-accumulate-grad hooks once it has reduce-scattered
    its gradient, so --step-in-backward steps each shard with the averaged gradient (Adafactor's
    and Muon's collectives run inside backward, in the same order on every rank): the normal
    step's bits, and no gradient kept between backward and step."""
    sib, normal = runs[f"sib-{optimizer}"], runs[f"fsdp-{optimizer}"]
    _assert_equal_models(sib, normal)
    assert _losses(sib) == _losses(normal)
    s = _summary(sib)
    assert s["config"]["step_in_backward"] is True
    assert s["grad_buffer_bytes"] == 0 and all(r["grad_buffer_bytes"] == 0 for r in s["per_rank"])


def test_a_torch_whose_fsdp_skips_the_hooks_is_named():
    """Should FSDP not call the hooks (another torch), the first step finds gradients left over."""
    from smallbatch_rs.train.trainer import TrainError, _check_stepped_in_backward

    model = torch.nn.Linear(2, 2)
    _check_stepped_in_backward(model)
    model.weight.grad = torch.zeros(2, 2)
    with pytest.raises(TrainError, match=r"FSDP did not call the post-accumulate-grad hooks .*\(weight was not stepped\)"):
        _check_stepped_in_backward(model)


def test_summary_counts_each_ranks_bytes(runs):
    """param_bytes, optimizer_state_bytes and grad_buffer_bytes are the rank's own (rank 0's at
    the top, every rank's in per_rank): under --fsdp the 2 shards add up to the one-process run's
    bytes, about half each; DDP replicas hold it all."""
    single = _summary(runs["single-adamw"])
    keys = ("param_bytes", "optimizer_state_bytes", "grad_buffer_bytes")
    assert [r["rank"] for r in single["per_rank"]] == [0]
    assert all(single["per_rank"][0][k] == single[k] > 0 for k in keys)
    # AdamW: two float32 moments per float32 weight; a gradient per weight.
    assert single["optimizer_state_bytes"] == 2 * single["param_bytes"] == 2 * single["grad_buffer_bytes"]
    fsdp, ddp = _summary(runs["fsdp-adamw"]), _summary(runs["ddp-adamw"])
    for s, sharded in ((fsdp, True), (ddp, False)):
        ranks = s["per_rank"]
        assert [r["rank"] for r in ranks] == [0, 1]
        assert all(r["peak_mem_bytes"] > 0 for r in ranks)
        assert all(s[k] == ranks[0][k] for k in keys)
        for k in keys:
            if sharded:
                assert sum(r[k] for r in ranks) == single[k], k
                assert all(abs(r[k] - single[k] / 2) <= 0.05 * single[k] for r in ranks), (k, ranks)
            else:
                assert all(r[k] == single[k] for r in ranks), k


def test_zero_redundancy_optimizer_steps_ours(runs):
    """torch's ZeroRedundancyOptimizer with optimizer_class=smallbatch_rs.AdamW (half-life
    arguments passed on) under DDP: each rank holds part of the parameters' state, the weights
    equal DDP's with a whole AdamW per rank bit for bit, and the consolidated state dict loads
    into an AdamW with the same state."""
    ranks = [json.loads((runs["zero"] / f"zero-rank{r}.json").read_text()) for r in range(2)]
    assert all(r["param_diff"] == 0.0 for r in ranks)
    assert sorted(r["local_params"] for r in ranks) == [1, 3]  # 4 tensors partitioned by size
    assert all(r["beta2"] == pytest.approx(0.5 ** (4 / 1e4)) for r in ranks)  # t2 and tokens_per_step passed on
    assert ranks[0]["state_diff"] == 0.0


def test_a_crash_between_the_renames_leaves_a_resumable_checkpoint(runs, tmp_path):
    """A crash after checkpoint/ was moved aside and before the new one took its place leaves
    .checkpoint.old/ (and a half-written .checkpoint.tmp/): --resume reads the former, and its
    checkpoint replaces both."""
    import shutil

    out = tmp_path / "crashed"
    shutil.copytree(runs["fsdp1-adamw"], out)
    (out / "checkpoint").rename(out / ".checkpoint.old")
    (out / ".checkpoint.tmp").mkdir()
    (out / ".checkpoint.tmp" / "__0_0.distcp").write_bytes(b"half")
    assert cli.main(_argv("adamw", out, "--fsdp", "--resume")) == 0
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint"]
    assert json.loads((out / "checkpoint" / "trainer.json").read_text())["step"] == STEPS
    _assert_equal_models(out, runs["fsdp1-adamw"])


def test_resume_names_the_other_kind_of_checkpoint(runs, tmp_path, capsys):
    import shutil

    plain, sharded = tmp_path / "plain", tmp_path / "sharded"
    shutil.copytree(runs["single-adamw"], plain)
    shutil.copytree(runs["fsdp1-adamw"], sharded)
    assert cli.main(_argv("adamw", plain, "--fsdp", "--resume")) == 2
    err = capsys.readouterr().err
    assert "--resume: no checkpoint in" in err and "checkpoint.safetensors there is from a run without --fsdp" in err
    assert cli.main(_argv("adamw", sharded, "--resume")) == 2
    err = capsys.readouterr().err
    assert "--resume: no checkpoint in" in err and "checkpoint/ there is from a run with --fsdp: resume it with --fsdp" in err
    (sharded / "checkpoint" / "trainer.json").write_text('{"format": "something else"}')
    assert cli.main(_argv("adamw", sharded, "--fsdp", "--resume")) == 2
    assert "is not a smallbatch-rs-sharded-checkpoint-1 checkpoint" in capsys.readouterr().err
    assert not dist.is_initialized()
