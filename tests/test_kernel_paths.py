"""The test hook ``forced`` really selects the kernel path: without this, the "fused"/"split"
parametrisations of the other files could silently test one path twice.

Relies on ``tritonnorm.kernels.config.chosen_configs()`` (the config of each kernel's most recent
launch); skipped where the library does not provide it.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from helpers import kernel_path

import tritonnorm as tn

config = pytest.importorskip("tritonnorm.kernels.config")
if not hasattr(config, "chosen_configs"):
    pytest.skip("no chosen_configs() to observe launches", allow_module_level=True)


def _splits() -> dict[str, int]:
    """SPLIT of every reduction kernel launched since the last reset."""
    out = {}
    for name, desc in config.chosen_configs().items():
        m = re.search(r"\bSPLIT=(\d+)", desc)
        if m:
            out[name] = int(m.group(1))
    return out


def _run(norm, x, path, split=3):
    config.reset_chosen_configs()
    x = x.clone().requires_grad_()
    with kernel_path(path, split=split):
        y = tn.batch_norm(x, None, None, training=True) if norm == "bn" else tn.instance_norm(x)
        y.backward(torch.ones_like(y))
    return y, x.grad


@pytest.mark.parametrize("norm", ["bn", "in"])
@pytest.mark.parametrize("split", [2, 3, 7])
def test_forced_split_launches_split_reductions(device, norm, split):
    # (2, 3, 5): 10 values per channel, 5 per instance: split=7 leaves some programs empty.
    _run(norm, torch.randn(2, 3, 5, device=device), "split", split)
    splits = _splits()
    assert len(splits) >= 2, f"expected statistics and gradient reductions: {splits}"
    assert set(splits.values()) == {split}, splits


@pytest.mark.parametrize("norm", ["bn", "in"])
def test_forced_fused_launches_single_program_reductions(device, norm):
    _run(norm, torch.randn(2, 3, 5, device=device), "fused")
    splits = _splits()
    assert splits and set(splits.values()) == {1}, splits


@pytest.mark.parametrize("split", [2, 7])
@pytest.mark.parametrize("norm", ["bn", "in"])
def test_empty_split_programs_are_harmless(device, norm, split):
    # More split programs than values in a reduction: the empty partials (count 0) must not
    # disturb Chan's combination (no 0/0 NaN, no bias).
    x = torch.randn(3, 2, 2, device=device, dtype=torch.float64)
    y, gx = _run(norm, x, "split", split)
    xr = x.clone().requires_grad_()
    yr = F.batch_norm(xr, None, None, training=True) if norm == "bn" else F.instance_norm(xr)
    yr.backward(torch.ones_like(yr))
    torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, xr.grad, rtol=1e-9, atol=1e-9)


def test_fused_request_too_long_falls_back_to_split(device):
    # 27000 values per channel do not fit one tile: forced(fused=True) silently splits, and the
    # result is still right.
    x = torch.randn(3, 2, 9000, device=device) + 1.0
    y, _ = _run("bn", x, "fused")
    ref = F.batch_norm(x.double(), None, None, training=True)
    torch.testing.assert_close(y.double(), ref, rtol=2e-5, atol=2e-5)
