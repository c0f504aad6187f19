"""The benchmark command runs on tiny sizes and writes its records (no timing is asserted)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from smallbatch_rs import bench

ROOT = Path(__file__).resolve().parents[1]


def test_bench_quick_writes_records(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--repeats", "1", "--scenes", "b,c,d", "--json", str(out)]) == 0
    records = json.loads(out.read_text())
    assert records[0]["scene"] == "copy" and records[0]["gbps"] > 0
    impls = {(r["scene"], r["impl"]) for r in records}
    for scene in ("b", "c"):
        assert (scene, "smallbatch_rs.AdamW") in impls and (scene, "torch.AdamW(fused)") in impls
    assert ("c", "smallbatch_rs.AdafactorSR") in impls
    for r in records[1:]:
        assert {"scene", "impl", "ms", "gbps"} <= r.keys() and r["ms"] > 0
    assert "ours x" in capsys.readouterr().out


def test_bench_quick_training_step_reports_the_optimizer_share(tmp_path):
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--repeats", "1", "--scenes", "d", "--json", str(out)]) == 0
    d = [r for r in json.loads(out.read_text()) if r["scene"] == "d"]
    impls = {r["impl"] for r in d}
    assert {"smallbatch_rs.AdamW", "smallbatch_rs.AdafactorSR", "torch.AdamW(foreach)"} <= impls
    for r in d:
        assert {"scene", "impl", "ms", "gbps", "optimizer_share", "fwd_bwd_ms", "step_ms"} <= r.keys()
        assert r["ms"] > 0 and 0 < r["optimizer_share"] < 1
    by_impl = {r["impl"]: r for r in d}
    assert by_impl["smallbatch_rs.AdafactorSR"]["dtype"] == "bfloat16"
    assert by_impl["smallbatch_rs.AdamW"]["dtype"] == "float32"


def test_bench_markdown_replaces_only_its_table(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Title\n\nprose before\n<!-- bench:begin -->\nold\n<!-- bench:end -->\nprose after\n")
    assert bench.main(["--quick", "--repeats", "1", "--scenes", "b", "--markdown", str(doc)]) == 0
    text = doc.read_text()
    assert "prose before" in text and "prose after" in text and "old" not in text
    assert "smallbatch_rs.AdamW" in text and text.count("<!-- bench:begin -->") == 1


def test_bench_markdown_keeps_each_devices_table_apart(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text(
        "<!-- bench:begin -->\ncpu table\n<!-- bench:end -->\n"
        "<!-- bench-cuda:begin -->\ngpu table\n<!-- bench-cuda:end -->\n"
    )
    record = {"scene": "b", "impl": "smallbatch_rs.AdamW", "ms": 1.0, "gbps": 2.0, "fraction_of_copy": 0.5}
    bench.write_markdown([record], str(doc), "a GPU", device="cuda")
    text = doc.read_text()
    assert "cpu table" in text and "gpu table" not in text and "Measured" in text
    assert text.index("<!-- bench:end -->") < text.index("<!-- bench-cuda:begin -->")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_bench_cuda_without_a_gpu_is_one_line_and_status_2(capsys):
    assert bench.main(["--quick", "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cuda" in err


def test_traffic_tables_agree():
    """The criterion bench and this benchmark divide by the same bytes per parameter."""
    names = {
        "COPY_F32": ("copy", 4),
        "SGD_F32": ("SGD", 4),
        "SGD_MOMENTUM_F32": ("SGD+momentum", 4),
        "ADAMW_F32": ("AdamW", 4),
        "ADAFACTOR_F32": ("Adafactor", 4),
        "MUON_F32": ("Muon", 4),
        "SGD_BF16": ("SGD", 2),
        "SGD_MOMENTUM_BF16": ("SGD+momentum", 2),
        "ADAMW_BF16": ("AdamW", 2),
        "ADAFACTOR_BF16": ("Adafactor", 2),
        "MUON_BF16": ("Muon", 2),
        "ROUND_F32_TO_BF16": ("round", 2),
    }
    source = (ROOT / "benches" / "update_throughput.rs").read_text()
    rust = {m[1]: int(m[2]) for m in re.finditer(r"pub const (\w+): u64 = (\d+);", source)}
    assert set(rust) == set(names)
    assert {names[k]: v for k, v in rust.items()} == bench.TRAFFIC
