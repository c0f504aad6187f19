"""The trainer's --compile: the compiled model trains as the eager one (to compiled kernels'
rounding), resumes bit for bit, steps inside backward, falls back to eager in one line when
compilation fails, and its default follows the flag, SMALLBATCH_RS_COMPILE and the device."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from smallbatch_rs import cli
from smallbatch_rs.train import TrainConfig, train
from smallbatch_rs.train.trainer import TrainError, compile_setting

pytestmark = pytest.mark.usefixtures("shared_cache")

# One model shape for every compiled run here, so the compiler's cache serves all but the first.
FAST = dict(preset="tiny", seq_len=32, val_tokens=2048, progress=False, log_every=5, tokens=32 * 30)


def _train_losses(out: Path) -> list:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["train_loss"] for r in rows if "train_loss" in r]


def _model(out: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(str(out / "checkpoint.safetensors")).items() if k.startswith("model/")}


def test_compiled_run_follows_the_eager_run_and_resumes_bit_for_bit(tmp_path):
    eager = train(TrainConfig(**FAST, compile=False, out=str(tmp_path / "eager")))
    compiled = train(TrainConfig(**FAST, compile=True, out=str(tmp_path / "compiled")))
    assert compiled["compiled"] and not eager["compiled"]
    assert compiled["compile_seconds"] > 0 and eager["compile_seconds"] == 0
    # Inductor fuses and reorders float operations: the same run to rounding, not bit for bit.
    a, b = _train_losses(tmp_path / "eager"), _train_losses(tmp_path / "compiled")
    assert len(a) == len(b) == 6
    worst = max(abs(x - y) / abs(x) for x, y in zip(a, b))
    assert worst < 1e-3, worst
    assert math.isclose(compiled["final_val_loss"], eager["final_val_loss"], rel_tol=1e-3)
    # Stopped and resumed (recompiling in the new run): the uninterrupted compiled run, bit for bit.
    train(TrainConfig(**FAST, compile=True, out=str(tmp_path / "split"), stop_after=32 * 12))
    resumed = train(TrainConfig(**FAST, compile=True, out=str(tmp_path / "split"), resume=True))
    whole, split = _model(tmp_path / "compiled"), _model(tmp_path / "split")
    assert all(torch.equal(whole[k], split[k]) for k in whole)
    assert resumed["final_val_loss"] == compiled["final_val_loss"]


def test_compiled_step_in_backward_equals_the_compiled_normal_step(tmp_path):
    normal = train(TrainConfig(**FAST, compile=True, out=str(tmp_path / "normal")))
    fused = train(TrainConfig(**FAST, compile=True, step_in_backward=True, out=str(tmp_path / "fused")))
    a, b = _model(tmp_path / "normal"), _model(tmp_path / "fused")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert fused["final_val_loss"] == normal["final_val_loss"] and fused["compiled"]


def test_failed_compilation_trains_eager_after_one_line(tmp_path, monkeypatch, capsys):
    def broken_compile(module, *args, **kwargs):
        def run(*a, **k):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\n(details)")

        return run

    eager = train(TrainConfig(**FAST, compile=False, out=str(tmp_path / "eager")))
    capsys.readouterr()
    monkeypatch.setattr(torch, "compile", broken_compile)
    fallback = train(TrainConfig(**FAST, compile=True, out=str(tmp_path / "fallback")))
    err = [line for line in capsys.readouterr().err.splitlines() if "torch.compile is unavailable" in line]
    assert err == [
        "smallbatch-rs train: torch.compile is unavailable here (RuntimeError: InvalidCxxCompiler: No working C++ "
        "compiler found); training eager"
    ]
    assert not fallback["compiled"]
    # Nothing of the failed attempt remains: the eager run, bit for bit.
    a, b = _model(tmp_path / "eager"), _model(tmp_path / "fallback")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_compile_default_follows_flag_environment_and_device(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    monkeypatch.delenv("SMALLBATCH_RS_COMPILE", raising=False)
    assert compile_setting(TrainConfig(), cpu) is True
    assert compile_setting(TrainConfig(), cuda) is False
    assert compile_setting(TrainConfig(fsdp=True), cpu) is False
    assert compile_setting(TrainConfig(compile=False), cpu) is False
    assert compile_setting(TrainConfig(compile=True), cuda) is True
    monkeypatch.setenv("SMALLBATCH_RS_COMPILE", "0")
    assert compile_setting(TrainConfig(), cpu) is False
    assert compile_setting(TrainConfig(compile=True), cpu) is True
    monkeypatch.setenv("SMALLBATCH_RS_COMPILE", "1")
    assert compile_setting(TrainConfig(), cuda) is True
    monkeypatch.setenv("SMALLBATCH_RS_COMPILE", "yes")
    with pytest.raises(TrainError, match="SMALLBATCH_RS_COMPILE must be 0 or 1, got 'yes'"):
        compile_setting(TrainConfig(), cpu)


def test_compile_with_fsdp_exits_2_with_one_line(tmp_path, capsys):
    assert cli.main(["train", "--compile", "--fsdp", "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "smallbatch-rs train: error: --compile with --fsdp is not supported yet: drop --compile (FSDP runs eager)"
    assert not (tmp_path / "o").exists()


def test_suggest_batch_size_measures_eager_and_compiled(tmp_path, capsys):
    path = tmp_path / "s.json"
    rc = cli.main(["suggest-batch-size", "--preset", "tiny", "--seq-len", "32", "--max-batch-size", "2", "--steps", "2",
                   "--no-progress", "--device", "cpu", "--compile", "--json", str(path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "eager tok/s" in out and "compiled" in out and "recommended: --batch-size" in out
    rows = json.loads(path.read_text())["rows"]
    assert [r["batch_size"] for r in rows] == [1, 2]
    for r in rows:
        assert r["eager_tokens_per_s"] > 0 and r["compiled_tokens_per_s"] > 0
        assert r["tokens_per_s"] == pytest.approx(max(r["eager_tokens_per_s"], r["compiled_tokens_per_s"]))
        assert r["graphed_tokens_per_s"] is None  # CUDA graphs: CUDA only
    assert "graphed" not in out


def test_suggest_table_recommends_the_fastest_mode_of_the_chosen_batch_size():
    from smallbatch_rs.train.suggest import format_table

    def row(batch, eager, compiled, graphed):
        best = max(v for v in (eager, compiled, graphed) if v is not None)
        return dict(batch_size=batch, tokens_per_s=best, mfu=0.1, beta2=0.99, ms_per_step=1.0,
                    eager_tokens_per_s=eager, compiled_tokens_per_s=compiled, graphed_tokens_per_s=graphed)

    result = dict(preset="lm30m", device="cuda:0", dtype="bf16", optimizer="adamw", seq_len=512, t2=10e6,
                  tolerance=0.9, rows=[row(1, 1000.0, 1500.0, 9000.0), row(2, 2000.0, 2500.0, 9500.0)],
                  recommended_batch_size=1)
    text = format_table(result)
    assert text.splitlines()[1].split()[:6] == ["batch", "eager", "tok/s", "compiled", "graphed", "ms/step"]
    assert "9,000" in text.splitlines()[2]
    assert text.splitlines()[-1].startswith("recommended: --batch-size 1 --cuda-graphs (")
    assert "fastest of eager, compiled and graphed" in text
    result["rows"][0]["graphed_tokens_per_s"] = None
    result["rows"][1]["graphed_tokens_per_s"] = None
    text = format_table(result)
    assert "graphed" not in text and text.splitlines()[-1].startswith("recommended: --batch-size 1 --compile (")
