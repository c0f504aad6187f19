"""The smallbatch-rs command: half-life tables, one-line errors with exit status 2, and what runs
without the trainer's extras (`pip install smallbatch-rs` brings only torch)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from smallbatch_rs.cli import TRAIN_EXTRA, main


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


def test_halflife_takes_token_suffixes(capsys):
    assert main(["halflife", "--t-half", "10M", "--seq-len", "512", "--batch-size", "1"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[2] == "0.999965"


@pytest.mark.parametrize(
    "argv, module",
    [
        (["train", "--preset", "tiny"], "tokenizers"),
        (["train", "--preset", "tiny"], "matplotlib"),
        (["suggest-batch-size", "--preset", "tiny"], "numpy"),
        (["sweep", "beta2", "--quick"], "safetensors"),
    ],
)
def test_trainer_commands_name_a_missing_extra(argv, module, monkeypatch, capsys, tmp_path):
    """Without the `train` extra the trainer's commands stop before any work, with one line that
    names the module and the install command."""
    monkeypatch.setitem(sys.modules, module, None)  # what `import module` sees when it is not installed
    out = tmp_path / "out"
    rest = ["--no-progress"] + (["--out", str(out)] if argv[0] != "suggest-batch-size" else [])
    assert main([*argv, *rest]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"smallbatch-rs {argv[0]}: error: this command needs the module {module!r}, which is not installed: "
        'pip install "smallbatch-rs[train]"'
    ]
    assert not out.exists()


def _run_python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)


def test_the_optimizers_import_none_of_the_trainer_extra():
    """`import smallbatch_rs`, optimizer steps and the command's parser load none of the trainer's
    dependencies. torch itself loads numpy, and tqdm (torch.hub) when they are installed, so what
    counts is what is new after torch has been imported and has stepped its own AdamW."""
    res = _run_python(
        "import json, sys, torch\n"
        "m = torch.nn.Linear(4, 2)\n"
        "def step(opt):\n"
        "    m(torch.ones(3, 4)).square().sum().backward()\n"
        "    opt.step()\n"
        "step(torch.optim.AdamW(m.parameters(), lr=1e-2))\n"
        "before = set(sys.modules)\n"
        "import smallbatch_rs\n"
        "for cls in (smallbatch_rs.AdamW, smallbatch_rs.SGD, smallbatch_rs.Adafactor, smallbatch_rs.Muon):\n"
        "    step(cls(m.parameters(), lr=1e-2))\n"
        "from smallbatch_rs import cli\n"
        "cli.build_parser()\n"
        "print(json.dumps(sorted({k.split('.')[0] for k in set(sys.modules) - before})))\n"
    )
    assert res.returncode == 0, res.stderr[-3000:]
    new = set(json.loads(res.stdout.splitlines()[-1]))
    assert "smallbatch_rs" in new and new.isdisjoint(TRAIN_EXTRA), new & set(TRAIN_EXTRA)


def test_optimizers_halflife_and_help_work_without_the_trainer_extra(tmp_path):
    """With every module of the extra (numpy too) unimportable: the optimizers step, halflife and
    train --help run, and train exits 2 naming the first missing module."""
    res = _run_python(
        "import sys, warnings\n"
        f"for name in {TRAIN_EXTRA!r}:\n"
        "    sys.modules[name] = None\n"
        "warnings.simplefilter('ignore')  # torch: 'Failed to initialize NumPy'\n"
        "import torch, smallbatch_rs\n"
        "from smallbatch_rs.cli import main\n"
        "m = torch.nn.Linear(4, 2)\n"
        "opt = smallbatch_rs.AdamW(m.parameters(), lr=1e-2)\n"
        "m(torch.ones(3, 4)).square().sum().backward()\n"
        "opt.step()\n"
        "assert main(['halflife', '--t-half', '10M', '--seq-len', '512', '--batch-size', '1']) == 0\n"
        "assert main(['train', '--help']) == 0\n"
        "sys.exit(main(['train', '--no-progress', '--out', sys.argv[1]]))\n",
        str(tmp_path / "never"),
    )
    assert res.returncode == 2, res.stderr[-3000:]
    assert "0.999965" in res.stdout and "usage: smallbatch-rs train" in res.stdout
    assert res.stderr.strip().splitlines()[-1] == (
        "smallbatch-rs train: error: this command needs the module 'numpy', which is not installed: "
        'pip install "smallbatch-rs[train]"'
    )
    assert not (tmp_path / "never").exists()
