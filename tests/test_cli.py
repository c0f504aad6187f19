"""The smallbatch-rs command: half-life tables, and one-line errors with exit status 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from smallbatch_rs.cli import main


def test_halflife_table_matches_the_paper(capsys):
    assert main(["halflife", "--t-half", "10e6", "--seq-len", "512", "--batch-size", "1,4,16,64"]) == 0
    out = capsys.readouterr().out.splitlines()
    betas = [line.split()[2] for line in out[1:]]
    assert betas == ["0.999965", "0.999858", "0.999432", "0.997731"]


def test_halflife_scales_a_beta_between_batch_sizes(capsys):
    assert main(["halflife", "--beta", "0.95", "--batch-size", "512", "--to-batch-size", "1"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert rows[0][:3] == ["512", "262144", "0.950000"]
    assert rows[1][:3] == ["1", "512", "0.999900"]
    assert rows[0][3] == rows[1][3], "same half-life"


@pytest.mark.parametrize(
    "argv,message",
    [
        (["halflife", "--beta", "1.5"], "smallbatch-rs halflife: error: invalid beta: 1.5 (must be in (0, 1))"),
        (["halflife", "--batch-size", "0", "--beta", "0.9"], "smallbatch-rs halflife: error: argument --batch-size: batch sizes must be >= 1, got '0'"),
        (["halflife", "--beta", "0.9", "--t-half", "5"], "smallbatch-rs halflife: error: give exactly one of --beta and --t-half"),
        (["halflife", "--t-half", "-3"], "smallbatch-rs halflife: error: invalid halflife_tokens: -3 (must be finite and > 0)"),
        (["halflife", "--beta", "0.9", "--seq-len", "0"], "smallbatch-rs halflife: error: --seq-len must be >= 1, got 0"),
        (["frobnicate"], "smallbatch-rs: error: argument command: invalid choice: 'frobnicate' (choose from 'train', 'suggest-batch-size', 'sweep', 'halflife', 'bench')"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        code = main(argv)
        raise SystemExit(code)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [message]


def test_module_entry_point():
    res = subprocess.run(
        [sys.executable, "-m", "smallbatch_rs", "halflife", "--t-half", "1e6", "--batch-size", "2"],
        capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 0 and "0.999290" in res.stdout
