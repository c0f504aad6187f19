"""The benchmark command runs on tiny sizes and writes its records (no timing is asserted)."""

from __future__ import annotations

import json

from smallbatch_rs import bench


def test_bench_quick_writes_records(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--repeats", "1", "--scenes", "b,c", "--json", str(out)]) == 0
    records = json.loads(out.read_text())
    assert records[0]["scene"] == "copy" and records[0]["gbps"] > 0
    impls = {(r["scene"], r["impl"]) for r in records}
    for scene in ("b", "c"):
        assert (scene, "smallbatch_rs.AdamW") in impls and (scene, "torch.AdamW(fused)") in impls
    assert ("c", "smallbatch_rs.AdafactorSR") in impls
    for r in records[1:]:
        assert {"scene", "impl", "ms", "gbps"} <= r.keys() and r["ms"] > 0
    assert "ours x" in capsys.readouterr().out


def test_bench_markdown_replaces_only_its_table(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Title\n\nprose before\n<!-- bench:begin -->\nold\n<!-- bench:end -->\nprose after\n")
    assert bench.main(["--quick", "--repeats", "1", "--scenes", "b", "--markdown", str(doc)]) == 0
    text = doc.read_text()
    assert "prose before" in text and "prose after" in text and "old" not in text
    assert "smallbatch_rs.AdamW" in text and text.count("<!-- bench:begin -->") == 1
