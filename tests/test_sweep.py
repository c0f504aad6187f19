"""smallbatch-rs sweep: the quick form of two experiments runs, writes its CSV and plots, and a
second invocation reuses the finished runs."""

from __future__ import annotations

import csv
import os

import pytest

from smallbatch_rs import cli
from smallbatch_rs.train import sweep


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SMALLBATCH_CACHE", os.environ.get("SMALLBATCH_CACHE") or str(tmp_path_factory.mktemp("cache")))


def test_quick_sweep_writes_rows_and_plots_and_resumes(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert cli.main(["sweep", "accum", "memory", "--quick", "--out", str(out), "--no-progress"]) == 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["experiment"] for r in rows].count("accum") == 2
    assert {r["run"] for r in rows if r["experiment"] == "memory"} == set(sweep.MEMORY_MODES)
    assert all(r["status"] == "ok" for r in rows)
    per_param = {r["run"]: float(r["bytes_per_param"]) for r in rows if r["experiment"] == "memory"}
    # the paper's memory axis: Adam 16 bytes/param with a gradient buffer, 12 without, ~2 with bf16
    assert per_param["adam-fp32"] == 16.0 and per_param["adam-fp32-step-in-backward"] == 12.0
    assert per_param["sgd-sr-bf16-step-in-backward"] == 2.0
    assert 2.0 < per_param["adafactor-sr-bf16-step-in-backward"] < 2.1
    assert 2.0 < per_param["lora-r8-bf16"] < 2.5
    for name in ("accum.png", "memory.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert cli.main(["sweep", "accum", "--quick", "--out", str(out), "--no-progress"]) == 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert {r["status"] for r in rows if r["experiment"] == "accum"} == {"cached"}
    assert len(rows) == 2 + len(sweep.MEMORY_MODES)
    # the same folder with another budget is refused before anything runs
    assert cli.main(["sweep", "accum", "--quick", "--tokens", "3000", "--out", str(out), "--no-progress"]) == 2
    assert "holds a run with --tokens 1536.0, not 3000; use another --out" in capsys.readouterr().err


def test_plans_have_the_papers_shape():
    s = sweep.SweepSettings()
    beta2 = sweep.plan("beta2", s)
    assert len(beta2) == 8 and {r.labels["beta2_rule"] for r in beta2} == {"fixed beta2", "fixed t2"}
    fixed_t2 = {r.labels["batch_size"]: r.labels["beta2"] for r in beta2 if r.labels["beta2_rule"] == "fixed t2"}
    assert fixed_t2[64] == pytest.approx(0.95) and fixed_t2[1] == pytest.approx(0.95 ** (1 / 64))
    assert {r.labels["optimizer"] for r in sweep.plan("optimizers", s)} == {"sgd", "adam", "adafactor", "muon"}
    with pytest.raises(ValueError, match="unknown experiment 'nope'"):
        sweep.plan("nope", s)
