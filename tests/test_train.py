"""The trainer and its CLI: the model, the data pipeline, the loop's guarantees (loss falls, resume
is bit-exact, step-in-backward equals the normal step and needs less memory, DDP equals one process
over the same global batch), the outputs, and every bad-config case."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch

from conftest import free_port
from smallbatch_rs import cli
from smallbatch_rs.train import PRESETS, TrainConfig, Transformer, train
from smallbatch_rs.train import data as data_mod
from smallbatch_rs.train.model import ModelConfig, apply_rope, rope_tables
from smallbatch_rs.train.trainer import lr_factor

# One tokenizer and shard cache for the trainer's tests.
pytestmark = pytest.mark.usefixtures("shared_cache")

# A small, fast run on the embedded corpus: tiny preset, short sequences.
FAST = dict(preset="tiny", seq_len=32, val_tokens=2048, progress=False, log_every=20)




def _model_tensors(out: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(str(out / "checkpoint.safetensors")).items() if k.startswith("model/")}


def _assert_same_model(a: Path, b: Path) -> None:
    ta, tb = _model_tensors(a), _model_tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


# --- model ----------------------------------------------------------------------------------


def test_model_matches_the_paper():
    cfg = ModelConfig(dim=64, layers=2, seq_len=16, head_dim=32, vocab_size=100)
    torch.manual_seed(0)
    m = Transformer(cfg)
    # no biases, untied embeddings, no norm scales: only embeddings and dense matrices
    names = {n for n, _ in m.named_parameters()}
    assert names == {"embed.weight", "unembed.weight"} | {
        f"blocks.{i}.{w}.weight" for i in range(2) for w in ("qkv", "proj", "fc", "fc_out")
    }
    assert m.embed.weight.data_ptr() != m.unembed.weight.data_ptr()
    assert m.blocks[0].fc.weight.shape == (4 * 64, 64)
    # embeddings N(0, 1/D); dense xavier-uniform bounds
    assert abs(m.embed.weight.std().item() - 1 / 8) < 0.01
    bound = math.sqrt(6 / (64 + 192))
    assert m.blocks[0].qkv.weight.abs().max().item() <= bound
    # causal: changing a later token leaves earlier logits unchanged
    x = torch.randint(0, 100, (1, 16))
    x2 = x.clone()
    x2[0, 10] = (x[0, 10] + 1) % 100
    with torch.no_grad():
        assert torch.allclose(m(x)[0, :10], m(x2)[0, :10])
        assert not torch.allclose(m(x)[0, 10:], m(x2)[0, 10:])


def test_rope_rotates_pairs_and_is_relative():
    cos, sin = rope_tables(8, 4, 10000.0)
    q = torch.randn(1, 1, 8, 4)
    k = torch.randn(1, 1, 8, 4)
    rq, rk = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    assert torch.allclose(rq.norm(dim=-1), q.norm(dim=-1), atol=1e-5)
    # same vectors at every position: the score depends only on the offset
    qs, ks = apply_rope(q[:, :, :1].expand(1, 1, 8, 4), cos, sin), apply_rope(k[:, :, :1].expand(1, 1, 8, 4), cos, sin)
    s = qs[0, 0] @ ks[0, 0].T
    assert torch.allclose(s[3, 1], s[5, 3], atol=1e-5)


def test_presets_and_token_budget():
    assert PRESETS["lm30m"].dim == 384 and PRESETS["lm30m"].layers == 6 and PRESETS["lm30m"].seq_len == 512
    assert PRESETS["gpt2-124m"].dim == 768 and PRESETS["gpt3-1.3b"].layers == 24
    cfg = PRESETS["lm30m"]
    assert cfg.chinchilla_params() == 12 * 6 * 384**2 + 384 * 50257
    assert all(p.head_dim == 128 for n, p in PRESETS.items() if n != "tiny")


def test_lr_schedule_warms_up_then_decays_to_zero():
    steps, warm = 100, 5
    f = [lr_factor(s, steps, warm) for s in range(steps)]
    assert f[0] == pytest.approx(0.2) and f[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[5:], f[6:]))
    assert 0 < f[-1] < 0.01


# --- data -----------------------------------------------------------------------------------


def test_data_files_folders_and_errors(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\n" * 3)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n')
    assert data_mod.load_documents(str(tmp_path / "a.txt")) == ["hello world\n" * 3]
    assert data_mod.load_documents(str(tmp_path)) == ["hello world\n" * 3, "one", "two"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": 1}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: each jsonl record needs a string field 'text'"):
        data_mod.load_documents(str(bad))
    with pytest.raises(ValueError, match="data file not found: nope/missing.txt"):
        data_mod.load_documents("nope/missing.txt")
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match=r"don't know how to read .*x.csv"):
        data_mod.load_documents(str(tmp_path / "x.csv"))


def test_chunks_are_disjoint_and_validation_is_seed_independent():
    chunks, tok = data_mod.load_data(None, 2048, 32, 4096, seed=1)
    other, _ = data_mod.load_data(None, 2048, 32, 4096, seed=2)
    assert tok.get_vocab_size() == 2048
    assert set(chunks.val_chunks.tolist()).isdisjoint(chunks.train_order.tolist())
    assert len(set(chunks.train_order.tolist())) == len(chunks.train_order)
    assert chunks.val_chunks.tolist() == other.val_chunks.tolist()
    assert chunks.train_order.tolist() != other.train_order.tolist()
    starts = sorted(int(chunks.index[k][1]) for k in range(len(chunks.index)) if chunks.index[k][0] == 0)
    assert all(b - a == 33 for a, b in zip(starts, starts[1:]))  # non-overlapping chunks of T+1
    x, y = chunks.train_batch(0, 4, part=1, parts=2)
    assert x.shape == (2, 32) and torch.equal(x[:, 1:], y[:, :-1])


def test_user_text_and_tokenizer(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text(" ".join(f"word{i % 50}" for i in range(20000)))
    chunks, tok = data_mod.load_data(str(text), 300, 16, 256, seed=0)
    tok.save(str(tmp_path / "tok.json"))
    again, tok2 = data_mod.load_data(str(text), 999, 16, 256, seed=0, tokenizer_path=str(tmp_path / "tok.json"))
    assert tok2.get_vocab_size() == tok.get_vocab_size()
    assert again.store.total == chunks.store.total


# --- training runs --------------------------------------------------------------------------


def test_tiny_loss_falls_and_outputs_parse(tmp_path):
    out = tmp_path / "run"
    rc = cli.main(["train", "--preset", "tiny", "--seq-len", "32", "--tokens", "24k", "--val-tokens", "2048",
                   "--no-progress", "--out", str(out), "--log-every", "50"])
    assert rc == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    assert records[0]["step"] == 0 and vals[0] > 7.0  # about ln(2048) before training
    summary = json.loads((out / "summary.json").read_text())
    for key in ("final_val_loss", "tokens_per_s", "mfu", "peak_mem_bytes", "optimizer_share"):
        assert isinstance(summary[key], (int, float)) and math.isfinite(summary[key]), key
    assert summary["final_val_loss"] < vals[0] - 1.0
    assert 0 < summary["optimizer_share"] < 1 and 0 < summary["mfu"] < 1
    assert summary["complete"] and summary["tokens"] == summary["total_steps"] * 32
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "checkpoint.safetensors").stat().st_size > summary["param_bytes"]


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor-sr", "muon"])
def test_resume_equals_uninterrupted_run(tmp_path, optimizer):
    common = dict(FAST, optimizer=optimizer, tokens=32 * 60)
    whole = train(TrainConfig(**common, out=str(tmp_path / "whole")))
    train(TrainConfig(**common, out=str(tmp_path / "split"), stop_after=32 * 25))
    partial = json.loads((tmp_path / "split" / "summary.json").read_text())
    assert partial["steps"] == 25 and not partial["complete"]
    resumed = train(TrainConfig(**common, out=str(tmp_path / "split"), resume=True))
    _assert_same_model(tmp_path / "whole", tmp_path / "split")
    assert resumed["final_val_loss"] == whole["final_val_loss"]
    assert resumed["steps"] == whole["steps"] == 60


def test_resume_refuses_a_different_run(tmp_path, capsys):
    out = str(tmp_path / "r")
    train(TrainConfig(**FAST, tokens=32 * 4, out=out))
    rc = cli.main(["train", "--preset", "tiny", "--seq-len", "32", "--tokens", "128", "--out", out, "--resume", "--optimizer", "sgd", "--no-progress"])
    assert rc == 2
    assert "--resume: the checkpoint was written with --optimizer 'adamw', this run has 'sgd'" in capsys.readouterr().err
    rc = cli.main(["train", "--out", str(tmp_path / "empty"), "--resume", "--no-progress"])
    assert rc == 2
    assert "--resume: no checkpoint in" in capsys.readouterr().err


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor", "muon"])
def test_step_in_backward_equals_the_normal_step(tmp_path, optimizer):
    common = dict(FAST, optimizer=optimizer, tokens=32 * 30)
    normal = train(TrainConfig(**common, out=str(tmp_path / "normal")))
    fused = train(TrainConfig(**common, out=str(tmp_path / "fused"), step_in_backward=True))
    _assert_same_model(tmp_path / "normal", tmp_path / "fused")
    assert fused["final_val_loss"] == normal["final_val_loss"]
    assert normal["grad_buffer_bytes"] == normal["param_bytes"] and fused["grad_buffer_bytes"] == 0


def test_step_in_backward_lowers_peak_memory(tmp_path):
    """Peak resident memory in fresh processes: the full gradient buffer (58 MB here) is gone."""
    script = (
        "import json, sys\n"
        "from smallbatch_rs.train import TrainConfig, train\n"
        "s = train(TrainConfig(dim=512, layers=4, head_dim=64, seq_len=32, tokens=32 * 4, val_tokens=32,\n"
        "    progress=False, out=sys.argv[1], step_in_backward=sys.argv[2] == '1'))\n"
        "print(json.dumps(s))\n"
    )
    peaks = {}
    for sib in ("0", "1"):
        done = subprocess.run([sys.executable, "-c", script, str(tmp_path / sib), sib], capture_output=True, text=True, check=True)
        peaks[sib] = json.loads(done.stdout.splitlines()[-1])
    grad_bytes = peaks["0"]["grad_buffer_bytes"]
    assert grad_bytes == peaks["0"]["param_bytes"] > 50e6
    assert peaks["1"]["peak_mem_bytes"] < peaks["0"]["peak_mem_bytes"] - grad_bytes // 2


def test_grad_accum_warns_and_matches_one_big_batch(tmp_path, capsys):
    common = dict(FAST, tokens=64 * 20, batch_size=2)
    one = train(TrainConfig(**common, out=str(tmp_path / "one")))
    acc = train(TrainConfig(**common, out=str(tmp_path / "acc"), grad_accum=2))
    assert "--grad-accum 2 on one device" in capsys.readouterr().err
    assert acc["final_val_loss"] == pytest.approx(one["final_val_loss"], rel=1e-4)


# One torchrun for both rules (its start-up, three processes importing torch, is most of the time):
# each process runs the CLI's main once per rule, in the one process group.
_DDP_RUNS = """\
import json, sys
from smallbatch_rs.cli import main
for argv in json.loads(sys.argv[1]):
    if main(argv) != 0:
        sys.exit(f"smallbatch-rs {' '.join(argv)} failed")
"""


def _single_and_ddp_runs(tmp_path: Path, optimizers: Tuple[str, ...]) -> Dict[str, Tuple[Path, Path]]:
    """Each optimizer's run (2 sequences per step, 20 steps) as one process and under torchrun with
    2 gloo processes: {optimizer: (single, ddp)} output folders."""
    def argv(optimizer: str, out: Path) -> List[str]:
        return ["train", "--preset", "tiny", "--seq-len", "32", "--tokens", str(64 * 20), "--batch-size", "2",
                "--val-tokens", "2048", "--eval-every", str(64 * 20), "--no-progress", "--device", "cpu",
                "--optimizer", optimizer, "--out", str(out)]

    outs = {opt: (tmp_path / f"single-{opt}", tmp_path / f"ddp-{opt}") for opt in optimizers}
    for opt, (single, _) in outs.items():
        assert cli.main(argv(opt, single)) == 0
    script = tmp_path / "ddp_runs.py"
    script.write_text(_DDP_RUNS)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), str(script), json.dumps([argv(opt, ddp) for opt, (_, ddp) in outs.items()])],
        capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for opt, (single, ddp) in outs.items():
        sa, sb = (json.loads((p / "summary.json").read_text()) for p in (single, ddp))
        assert sb["world_size"] == 2 and sb["steps"] == sa["steps"] == 20 and sb["tokens"] == sa["tokens"], opt
        # The held-out loss averages over every weight: a few drifted elements do not move it.
        assert sb["final_val_loss"] == pytest.approx(sa["final_val_loss"], rel=1e-5), opt
    return outs


def test_ddp_two_processes_match_one(tmp_path):
    """torchrun with 2 gloo processes, one sequence each, equals one process with batch size 2.

    The two runs add the same per-sequence gradients in different orders (DDP's all-reduce of two
    halves vs. one backward over the batch, and each host's torch kernels pick their own order;
    ATEN_CPU_CAPABILITY=avx2 reproduces an AVX2 host's), so their gradients differ in the last
    bits. What that does to the weights depends on the rule:

    - SGD is linear in the gradient: the weights differ by lr times those rounding differences,
      which stay near 1e-7 here while SGD moves the weights by about 2e-3 (median) over the run. So
      they must agree to 1e-6 everywhere. A gradient that DDP summed instead of averaged, a replica
      stepping on its own gradient, or another learning-rate schedule moves them by ~1e-3.
    - Adam(W) divides by the root of the second moment. Where an element's gradients are tiny or
      nearly cancel (rare embedding rows, a few MLP weights), sqrt(v) is of the order of their
      rounding error and the step's size and even sign follow the rounding: such an element drifts
      by a fraction of one step (up to 3.6e-5 with lr 2e-3 measured across torch's AVX-512, AVX2
      and scalar kernels; a fixed 1e-5 tolerance failed on an AVX2 host). Every other element
      agrees to 1e-6. So the check is the mechanism's: all but a handful of elements (at most 1 in
      10^4, 36 here; 1 measured) agree to 1e-5, and none differs by more than one step (the peak
      lr). A real divergence is not a handful: a 1% different learning rate puts 65% outside.
    - The held-out loss is an average over every weight and agrees to 1e-5 relative for both
      (3e-8 measured; the 1% learning-rate change moves it by 7e-4).
    """
    runs = _single_and_ddp_runs(tmp_path, ("sgd", "adamw"))
    a, b = (_model_tensors(p) for p in runs["sgd"])
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"sgd {k}: {m}")

    a, b = (_model_tensors(p) for p in runs["adamw"])
    assert a.keys() == b.keys()
    one_step = TrainConfig(optimizer="adamw").resolved_lr
    numel = sum(v.numel() for v in a.values())
    drifted = {k: int((~torch.isclose(b[k], a[k], rtol=1e-4, atol=1e-5)).sum()) for k in a}
    assert sum(drifted.values()) <= numel // 10_000, {k: n for k, n in drifted.items() if n}
    for k in a:
        worst = (b[k] - a[k]).abs().max().item()
        assert worst <= one_step, f"adamw {k}: an element differs by {worst:.3g} > one step ({one_step:g})"


# --- CLI ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--optimizer", "lion"], "argument --optimizer: invalid choice: 'lion'"),
        (["--tokens", "-5"], "--tokens must be a number of tokens > 0, got -5.0"),
        (["--data", "missing/corpus.txt"], "data file not found: missing/corpus.txt"),
        (["--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
        (["--batch-size", "3", "--grad-accum", "2"], "--batch-size 3 is not a multiple of --grad-accum 2"),
        (["--step-in-backward", "--grad-accum", "2", "--batch-size", "2"], "--step-in-backward steps inside each backward"),
        (["--optimizer", "adafactor-sr", "--dtype", "fp32"], "adafactor-sr stores bf16 weights"),
        (["--t2", "0"], "--t2 must be a half-life in tokens > 0"),
        (["--config", "nope.toml"], "config file not found: nope.toml"),
        (["--cuda-graphs", "--device", "cpu"], "--cuda-graphs needs a CUDA device: drop it, or run with --device cuda"),
        (["--cuda-graphs", "--device", "cuda", "--grad-accum", "2", "--batch-size", "2"],
         "--cuda-graphs replays one captured step of one batch: drop --grad-accum"),
        (["--cuda-graphs", "--device", "cuda", "--step-in-backward"],
         "--cuda-graphs captures the step after backward: drop --step-in-backward"),
        (["--cuda-graphs", "--device", "cuda", "--compile"], "--cuda-graphs captures the eager model: drop --compile"),
    ],
)
def test_bad_config_exits_2_with_one_line(argv, message, capsys, tmp_path):
    assert cli.main(["train", "--out", str(tmp_path / "o"), "--no-progress", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: --cuda-graphs would run")
def test_cuda_graphs_on_a_machine_without_a_gpu_exits_2(capsys, tmp_path):
    assert cli.main(["train", "--cuda-graphs", "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("--cuda-graphs needs a CUDA device (this run is on cpu)") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_toml_config_and_flags_override(tmp_path, capsys):
    conf = tmp_path / "run.toml"
    conf.write_text('[train]\npreset = "tiny"\nseq-len = 32\ntokens = 640\noptimizer = "sgd"\nval_tokens = 1024\n')
    out = tmp_path / "o"
    assert cli.main(["train", "--config", str(conf), "--optimizer", "adam", "--out", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["optimizer"] == "adam" and summary["config"]["seq_len"] == 32 and summary["steps"] == 20
    conf.write_text("batch_sise = 4\n")
    assert cli.main(["train", "--config", str(conf), "--out", str(out)]) == 2
    assert "unknown setting 'batch_sise'" in capsys.readouterr().err


def test_every_optimizer_trains(tmp_path):
    for opt in ("sgd", "adam", "adafactor", "torch-adamw"):
        s = train(TrainConfig(**FAST, optimizer=opt, tokens=32 * 10, out=str(tmp_path / opt)))
        assert math.isfinite(s["final_val_loss"]) and s["steps"] == 10


def test_suggest_batch_size(tmp_path, capsys):
    path = tmp_path / "s.json"
    rc = cli.main(["suggest-batch-size", "--preset", "tiny", "--max-batch-size", "4", "--steps", "2", "--no-progress",
                   "--device", "cpu", "--json", str(path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "recommended: --batch-size" in out and "beta2" in out
    result = json.loads(path.read_text())
    assert [r["batch_size"] for r in result["rows"]] == [1, 2, 4]
    best = max(r["tokens_per_s"] for r in result["rows"])
    chosen = next(r for r in result["rows"] if r["batch_size"] == result["recommended_batch_size"])
    assert chosen["tokens_per_s"] >= 0.9 * best
    assert all(r["tokens_per_s"] < 0.9 * best for r in result["rows"] if r["batch_size"] < chosen["batch_size"])
    assert result["rows"][0]["beta2"] == pytest.approx(0.5 ** (64 / 10e6))


def test_hugging_face_dataset_name(monkeypatch):
    """A name that is not a path loads through `datasets` (a stand-in module here: no network)."""
    import types

    class FakeDataset:
        column_names = ["text", "id"]

        def __getitem__(self, key):
            assert key == "text"
            return ["first document", "", "second document"]

    calls = []
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda name, split: calls.append((name, split)) or FakeDataset()  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert data_mod.load_documents("someone/corpus") == ["first document", "second document"]
    assert calls == [("someone/corpus", "train")]
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(ValueError, match=r"data file not found: someone/corpus \(to use a Hugging Face dataset of that name, pip install datasets\)"):
        data_mod.load_documents("someone/corpus")


def test_parquet_text_column(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow is not installed: parquet data needs it")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["alpha beta", "", "gamma"], "id": [1, 2, 3]}), tmp_path / "d.parquet")
    assert data_mod.load_documents(str(tmp_path / "d.parquet")) == ["alpha beta", "gamma"]
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"bad.parquet has no 'text' column"):
        data_mod.load_documents(str(tmp_path / "bad.parquet"))


# --- batch-size schedules ---------------------------------------------------------------------


def test_batch_schedules_split_the_tokens_into_equal_shares():
    from smallbatch_rs.train.schedule import BatchSchedule, parse_schedule

    s = BatchSchedule(parse_schedule("1, 4,16"), 48_000, 32)
    assert s.phase_steps == [500, 125, 31] and s.steps == 656
    assert [s.batch(t) for t in (0, 499, 500, 624, 625, 655)] == [(1, 0), (1, 499), (4, 500), (4, 996), (16, 1000), (16, 1480)]
    assert s.tokens_before(500) == 16_000 and s.tokens_before(656) == s.sequences * 32 == 1496 * 32
    assert s.step_at_tokens(16_000) == 500 and s.step_at_tokens(16_001) == 501 and s.step_at_tokens(10**9) == 656
    assert s.crossed(500, 16_000) and not s.crossed(501, 16_000)
    for bad, message in [("1,x", "takes batch sizes separated by commas"), ("4,0", "batch sizes must be >= 1, got 0")]:
        with pytest.raises(ValueError, match=message):
            parse_schedule(bad)


def test_a_batch_schedule_recomputes_half_life_coefficients_and_resumes_bit_for_bit(tmp_path):
    from smallbatch_rs.train import checkpoint as ckpt
    from smallbatch_rs.train.checkpoint import _unflatten

    common = dict(FAST, optimizer="adamw", tokens=32 * 60, batch_schedule="1,2,4", t2=2000.0)
    whole = train(TrainConfig(**common, out=str(tmp_path / "whole")))
    assert whole["steps"] == 20 + 10 + 5 and whole["tokens"] == 32 * 60 and whole["complete"]
    state = ckpt.read(tmp_path / "whole" / "checkpoint.safetensors")
    betas = _unflatten(state.optimizer_skeleton, state.tensors)["param_groups"][0]["betas"]
    assert betas[1] == pytest.approx(0.5 ** (4 * 32 / 2000.0)) == whole["betas"][1]
    records = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["tokens"] == 32 * 60
    train(TrainConfig(**common, out=str(tmp_path / "split"), stop_after=32 * 30))  # inside the second phase
    partial = json.loads((tmp_path / "split" / "summary.json").read_text())
    assert partial["steps"] == 25 and not partial["complete"]
    resumed = train(TrainConfig(**common, out=str(tmp_path / "split"), resume=True))
    _assert_same_model(tmp_path / "whole", tmp_path / "split")
    assert resumed["final_val_loss"] == whole["final_val_loss"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--batch-schedule", "1,4", "--batch-size", "4"], "--batch-schedule sets the batch size step by step: drop --batch-size"),
        (["--batch-schedule", "1,4", "--grad-accum", "2"], "--batch-schedule sets the batch size step by step: drop --grad-accum"),
        (["--batch-schedule", "1,four"], "--batch-schedule takes batch sizes separated by commas (e.g. 1,4,16), got '1,four'"),
    ],
)
def test_bad_batch_schedules_exit_2_with_one_line(argv, message, capsys, tmp_path):
    assert cli.main(["train", "--out", str(tmp_path / "o"), "--no-progress", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
