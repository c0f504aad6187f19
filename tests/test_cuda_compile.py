"""CUDA kernels compile through NVRTC for sm_80 and sm_90 (no GPU needed)."""

from __future__ import annotations

import pytest

import smallbatch_rs.cuda as sbcuda

EXPECTED_FAMILIES = ("sgd", "adam", "adafactor", "muon", "round")


def _need_nvrtc() -> None:
    if sbcuda.find_nvrtc() is None:
        try:
            sbcuda.nvrtc_version()
        except RuntimeError as e:
            pytest.skip(f"no NVRTC library installed: {e}")


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_every_kernel_compiles(arch):
    _need_nvrtc()
    names = sbcuda.compile_all(arch)
    assert len(names) == len(set(names)), "kernel names are unique"
    for family in EXPECTED_FAMILIES:
        assert any(family in n for n in names), (family, names)
    assert any(n.endswith("bf16") for n in names) and any(n.endswith("f32") for n in names)


def test_nvrtc_version_and_bad_arch():
    _need_nvrtc()
    major, minor = sbcuda.nvrtc_version()
    assert major >= 11
    with pytest.raises(RuntimeError, match=r'^invalid CUDA architecture "sm90" \(expected e\.g\. "sm_90"\)$'):
        sbcuda.compile_all("sm90")


def test_extra_nvrtc_options_from_the_environment(monkeypatch):
    """SMALLBATCH_NVRTC_OPTIONS adds options to every compile: a register budget compiles, an
    unknown option fails with NVRTC's complaint naming it."""
    _need_nvrtc()
    monkeypatch.setenv("SMALLBATCH_NVRTC_OPTIONS", "--maxrregcount=32")
    assert sbcuda.compile_all("sm_90")
    monkeypatch.setenv("SMALLBATCH_NVRTC_OPTIONS", "--no-such-option")
    with pytest.raises(RuntimeError, match="no-such-option"):
        sbcuda.compile_all("sm_90")


def test_import_touches_no_cuda():
    """Importing the package loads no NVIDIA library (a CPU-only user never touches CUDA)."""
    import subprocess
    import sys

    code = (
        "import smallbatch_rs, torch\n"
        "maps = open('/proc/self/maps').read()\n"
        "print('nvrtc' in maps and 'smallbatch' in maps)\n"
        "m = torch.nn.Linear(3, 3); o = smallbatch_rs.AdamW(m.parameters()); m(torch.ones(1, 3)).sum().backward(); o.step()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
