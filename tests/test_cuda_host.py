"""The CUDA paths' host-side checks, which need no GPU: what is refused before any device work."""

from __future__ import annotations

import pytest
import torch

import smallbatch_rs as sb
from smallbatch_rs import _core


def test_every_rule_routes_cuda_parameters():
    for cls in (sb.SGD, sb.Adam, sb.AdamW, sb.Adafactor, sb.AdafactorSR, sb.Muon):
        assert cls.cuda_supported, cls.__name__


def test_bf16_newton_schulz_is_cuda_only():
    w = torch.nn.Parameter(torch.randn(8, 4))
    with pytest.raises(ValueError, match=r"invalid ns_precision: 'bfloat16' .*CPU parameters"):
        sb.Muon([w], ns_precision="bfloat16")
    with pytest.raises(ValueError, match=r"invalid ns_precision: 'float16'"):
        sb.Muon([w], ns_precision="float16")
    opt = sb.Muon([w])
    assert opt.param_groups[0]["ns_precision"] == "float32"


def test_workspace_checks_its_device_before_touching_cuda():
    with pytest.raises(ValueError, match="invalid CUDA device ordinal -1"):
        _core.CudaWorkspace(-1)
    ws = _core.CudaWorkspace(1)
    assert (ws.ordinal, repr(ws)) == (1, "CudaWorkspace(ordinal=1)")
    table = _core.SegmentTable([6], [[1, 2, 3]])
    layout = _core.AdafactorLayout(table, [True])
    steps = torch.zeros(1, dtype=torch.float64)
    with pytest.raises(ValueError, match="belongs to device 1, not device 0"):
        _core.adafactor_step(
            table, layout, b"\x01", steps.data_ptr(), [8], [8], 8, 8, 8, 0, lr=1e-2, beta1=0.0,
            beta2=None, beta2_decay=-0.8, eps1=None, eps2=1e-3, clip_threshold=1.0, relative_step=True,
            cap_lr_at_inv_sqrt_step=True, weight_decay=0.0, maximize=False, device=(0, 0), workspace=ws,
        )
    with pytest.raises(ValueError, match="a CUDA step of this rule needs a workspace"):
        _core.adafactor_step(
            table, layout, b"\x01", steps.data_ptr(), [8], [8], 8, 8, 8, 0, lr=1e-2, beta1=0.0,
            beta2=None, beta2_decay=-0.8, eps1=None, eps2=1e-3, clip_threshold=1.0, relative_step=True,
            cap_lr_at_inv_sqrt_step=True, weight_decay=0.0, maximize=False, device=(1, 0),
        )
    with pytest.raises(ValueError, match="ns_precision must be 'float32' or 'bfloat16', not \"fp8\""):
        _core.muon_step(
            table, b"\x01", steps.data_ptr(), [8], [8], 8, lr=1e-2, momentum=0.9, nesterov=True,
            weight_decay=0.0, ns_coefficients=(3.4445, -4.775, 2.0315), ns_steps=5, eps=1e-7,
            adjust_lr_fn=None, maximize=False, ns_precision="fp8", device=(1, 0), workspace=ws,
        )
    assert float(steps[0]) == 0.0, "nothing advanced"
