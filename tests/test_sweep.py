"""smallbatch-rs sweep: tuned cells (a learning-rate grid extended past an edge while the best
loss is there, the best learning rate repeated with seeds), cells shared between experiments,
results.csv with the required columns, plots, resuming, and refusing a folder of another sweep."""

from __future__ import annotations

import csv
import os

import pytest

from smallbatch_rs import cli
from smallbatch_rs.train import sweep


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SMALLBATCH_CACHE", os.environ.get("SMALLBATCH_CACHE") or str(tmp_path_factory.mktemp("cache")))


def test_quick_sweep_tunes_writes_rows_and_plots_and_resumes(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert cli.main(["sweep", "accum", "lr", "schedule", "memory", "--quick", "--out", str(out), "--no-progress"]) == 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    for column in ("experiment", "optimizer", "batch_size", "lr", "seed", "tokens", "steps", "final_val_loss", "floor"):
        assert column in rows[0], column
    trained = [r for r in rows if r["experiment"] != "memory"]
    assert all(r["status"] == "ok" for r in rows)
    assert all(float(r["floor"]) > 0 and int(r["steps"]) > 0 for r in trained)
    # accum and lr share the batch-size-1 Adam cell: its runs ran once, listed under both.
    b1 = {r["run"] for r in trained if r["cell"] == "adam-b1" and r["experiment"] == "accum"}
    assert b1 == {r["run"] for r in trained if r["cell"] == "adam-b1" and r["experiment"] == "lr"}
    assert len(list((out / "runs" / "adam-b1").glob("*/summary.json"))) == len(b1)
    # Each cell: a grid in factors of 2 whose best point is inside it or the grid grew to its limit.
    for name in {r["cell"] for r in trained}:
        cell = list({r["run"]: r for r in trained if r["cell"] == name}.values())  # once per run
        grid = sorted({float(r["lr"]) for r in cell})
        assert all(b / a == pytest.approx(2.0) for a, b in zip(grid, grid[1:]))
        assert 2 <= len(grid) <= 2 + 2 * 1
        best = [r for r in cell if r["best"] == "True"]
        assert len({r["lr"] for r in best}) == 1
        loss = {float(r["lr"]): float(r["final_val_loss"]) for r in cell}
        assert loss[float(best[0]["lr"])] == min(loss.values())
        if float(best[0]["lr"]) in (grid[0], grid[-1]) and len(grid) < 4:
            # stopped at an edge only because that side reached max_extend
            side = "low" if float(best[0]["lr"]) == grid[0] else "high"
            assert len(grid) == 3, (name, side, grid)
    per_param = {r["run"]: float(r["bytes_per_param"]) for r in rows if r["experiment"] == "memory"}
    assert per_param["adam-fp32"] == 16.0 and per_param["adam-fp32-step-in-backward"] == 12.0
    assert per_param["sgd-sr-bf16-step-in-backward"] == 2.0
    # The growing batch size ran as one run per learning rate, over the same tokens.
    growing = [r for r in trained if r["cell"] == "adam-schedule-1-4"]
    assert growing and {r["batch_size"] for r in growing} == {"1,4"}
    assert {r["tokens"] for r in growing} == {r["tokens"] for r in trained if r["cell"] == "adam-b1"}
    for name in ("accum.png", "lr.png", "schedule.png", "memory.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    md = (out / "results.md").read_text()
    assert "### lr" in md and "Best learning rate by batch size: B=1:" in md and "above floor" in md
    capsys.readouterr()
    assert cli.main(["sweep", "accum", "--quick", "--out", str(out), "--no-progress"]) == 0
    again = list(csv.DictReader((out / "results.csv").open()))
    assert {r["status"] for r in again if r["experiment"] == "accum"} == {"cached"}
    assert len(again) == len(rows)
    # the same folder with another budget is refused before anything runs
    assert cli.main(["sweep", "accum", "--quick", "--tokens", "3000", "--out", str(out), "--no-progress"]) == 2
    assert "holds a run with --tokens 1536.0, not 3000; use another --out" in capsys.readouterr().err


def test_seeds_repeat_the_best_learning_rate_at_the_smallest_and_largest_batch_sizes(tmp_path):
    s = sweep.SweepSettings.for_mode(quick=True)
    s.batch_sizes = (1,)
    s.seeds, s.grid, s.max_extend = 3, (0,), 0
    rows = sweep.run_sweep(["beta2"], tmp_path / "s", s, progress=False)
    for cell in ("adam-b1", "adam-b1-beta2-0.95"):
        mine = [r for r in rows if r["cell"] == cell]
        best = [r for r in mine if r["best"]]
        assert sorted(r["seed"] for r in best) == [0, 1, 2] and len({r["lr"] for r in best}) == 1
        assert len({r["final_val_loss"] for r in best}) == 3, "seeds change the run"
    md = (tmp_path / "s" / "results.md").read_text()
    assert "± " in md and "(3)" in md


def test_cells_have_the_papers_shape_and_a_budget_of_1000_steps_at_the_largest_batch():
    s = sweep.SweepSettings()
    assert s.budget() == 1000 * 64 * 32
    beta2 = sweep.cells("beta2", s)
    assert len(beta2) == 8 and {dict(c.labels)["beta2_rule"] for c in beta2} == {"fixed beta2", "fixed t2"}
    fixed_t2 = {c.batch_size: dict(c.labels)["beta2"] for c in beta2 if dict(c.labels)["beta2_rule"] == "fixed t2"}
    assert fixed_t2[64] == pytest.approx(0.95) and fixed_t2[1] == pytest.approx(0.95 ** (1 / 64))
    assert {c.batch_size for c in beta2 if c.seeds} == {1, 64}
    assert {c.optimizer for c in sweep.cells("optimizers", s)} == {"sgd", "adam", "adafactor", "muon"}
    assert [c.name for c in sweep.cells("accum", s)] == ["adam-b1", "adam-b16-accum16"]
    growing = sweep.cells("schedule", s)
    assert [c.name for c in growing] == ["adam-b1", "adam-b4", "adam-b16", "adam-schedule-1-4-16"]
    assert dict(growing[-1].flags)["batch-schedule"] == "1,4,16" and "batch-size" not in dict(growing[-1].flags)
    assert len(sweep.plan("optimizers", s)) == 16 * len(s.grid)
    with pytest.raises(ValueError, match="unknown experiment 'nope'"):
        sweep.plan("nope", s)
